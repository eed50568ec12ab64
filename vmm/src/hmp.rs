//! QEMU's human monitor (HMP), the commands test drivers type (`--monitor connect=PATH` or
//! `socket=PATH`): text lines in, text and the `(qemu) ` prompt out. The NixOS test driver
//! listens on a socket, lets the VMM connect, and reads up to the prompt after each command.
//!
//! | command | what nixvm does |
//! |---|---|
//! | `info status` | `VM status: running` or `paused` |
//! | `stop`, `cont` (`c`) | pauses and resumes the vCPUs |
//! | `system_powerdown` | presses the ACPI power button |
//! | `system_reset` | resets the machine (exit 3, or a new boot with `--on-reboot restart`) |
//! | `quit` (`q`) | stops the VM at once; nixvm exits 0 |
//! | `screendump`, `sendkey`, `set_link`, `hostfwd_add`, … | a sentence saying nixvm cannot |

/// The banner a monitor client reads first, then the prompt.
pub const BANNER: &str = "QEMU 7.2.0 monitor - nixvm - type 'help' for more information\r\n";
pub const PROMPT: &str = "(qemu) ";

/// What a monitor line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Nothing,
    Help,
    InfoStatus,
    Stop,
    Cont,
    Powerdown,
    Reset,
    Quit,
    /// A command nixvm knows of but cannot do; the sentence says why.
    Cannot(String),
    Unknown(String),
}

/// Reads one monitor line.
pub fn parse(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else {
        return Command::Nothing;
    };
    match (cmd, words.next()) {
        ("help" | "?", _) => Command::Help,
        ("info", Some("status")) => Command::InfoStatus,
        ("stop", _) => Command::Stop,
        ("cont" | "c", _) => Command::Cont,
        ("system_powerdown", _) => Command::Powerdown,
        ("system_reset", _) => Command::Reset,
        ("quit" | "q", _) => Command::Quit,
        ("screendump", _) => Command::Cannot(
            "screendump: nixvm has no display (a VM without graphics has no screen to dump)"
                .into(),
        ),
        ("sendkey", _) => Command::Cannot(
            "sendkey: nixvm has no keyboard for the guest (use the serial console or QMP system_powerdown/system_reset)".into(),
        ),
        ("set_link" | "hostfwd_add" | "hostfwd_remove" | "device_add" | "device_del"
        | "migrate" | "savevm" | "loadvm", _) => {
            Command::Cannot(format!("{cmd}: not supported by nixvm"))
        }
        _ => Command::Unknown(cmd.to_owned()),
    }
}

/// The text `help` prints.
pub fn help() -> String {
    [
        "info status -- show the VM's status",
        "stop -- pause the VM",
        "cont|c -- resume the VM",
        "system_powerdown -- press the power button",
        "system_reset -- reset the machine",
        "quit|q -- stop the VM at once",
    ]
    .join("\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        assert_eq!(parse(""), Command::Nothing);
        assert_eq!(parse("  info   status \r"), Command::InfoStatus);
        assert_eq!(parse("c"), Command::Cont);
        assert_eq!(parse("quit"), Command::Quit);
        assert!(
            matches!(parse("screendump /tmp/x.ppm"), Command::Cannot(s) if s.contains("no display"))
        );
        assert!(matches!(
            parse("sendkey ctrl-alt-delete"),
            Command::Cannot(_)
        ));
        assert!(matches!(
            parse("set_link virtio-net-pci.1 off"),
            Command::Cannot(_)
        ));
        assert_eq!(parse("frobnicate 1"), Command::Unknown("frobnicate".into()));
        assert_eq!(parse("info"), Command::Unknown("info".into()));
    }
}
