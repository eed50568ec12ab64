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
//! | `sendkey KEYS` | presses and releases keys (`ctrl-alt-delete`) on the PS/2 keyboard |
//! | `set_link virtio-net-pci.N on\|off` | the link of the Nth `--net` (from 0), as the guest sees it |
//! | `screendump`, `hostfwd_add`, … | a sentence saying nixvm cannot |

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
    /// Keys joined by `-`, QEMU's names.
    SendKey(String),
    /// A network interface's name and whether its link goes up.
    SetLink {
        name: String,
        up: bool,
    },
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
            "screendump: nixvm has no display (a VM without graphics has no screen to dump)".into(),
        ),
        ("sendkey", Some(keys)) => Command::SendKey(keys.to_owned()),
        ("sendkey", None) => {
            Command::Cannot("sendkey: which keys? (sendkey ctrl-alt-delete)".into())
        }
        ("set_link", Some(name)) => match words.next() {
            Some("on") => Command::SetLink {
                name: name.to_owned(),
                up: true,
            },
            Some("off") => Command::SetLink {
                name: name.to_owned(),
                up: false,
            },
            _ => Command::Cannot("set_link: set_link NAME on|off".into()),
        },
        (
            "set_link" | "hostfwd_add" | "hostfwd_remove" | "device_add" | "device_del" | "migrate"
            | "savevm" | "loadvm",
            _,
        ) => Command::Cannot(format!("{cmd}: not supported by nixvm")),
        _ => Command::Unknown(cmd.to_owned()),
    }
}

/// Which `--net` (from 0) a NIC name means: QEMU's names for the Nth virtio-net device,
/// `virtio-net-pci.N` (what the NixOS test driver uses) or `virtio-net-device.N`.
pub fn nic_index(name: &str) -> Option<usize> {
    let (model, n) = name.rsplit_once('.')?;
    match model {
        "virtio-net-pci" | "virtio-net-device" => n.parse().ok(),
        _ => None,
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
        "sendkey keys -- press and release keys, e.g. ctrl-alt-delete",
        "set_link name on|off -- the link of virtio-net-pci.N, the Nth --net from 0",
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
        assert_eq!(
            parse("sendkey ctrl-alt-delete 200"),
            Command::SendKey("ctrl-alt-delete".into())
        );
        assert!(matches!(parse("sendkey"), Command::Cannot(_)));
        assert_eq!(
            parse("set_link virtio-net-pci.1 off"),
            Command::SetLink {
                name: "virtio-net-pci.1".into(),
                up: false
            }
        );
        assert!(matches!(parse("set_link x maybe"), Command::Cannot(_)));
        assert!(matches!(
            parse("hostfwd_add tcp::22-:22"),
            Command::Cannot(_)
        ));
        assert_eq!(nic_index("virtio-net-pci.1"), Some(1));
        assert_eq!(nic_index("virtio-net-device.0"), Some(0));
        assert_eq!(nic_index("e1000.0"), None);
        assert_eq!(nic_index("virtio-net-pci.x"), None);
        assert_eq!(parse("frobnicate 1"), Command::Unknown("frobnicate".into()));
        assert_eq!(parse("info"), Command::Unknown("info".into()));
    }
}
