//! QEMU options after `--`: what the NixOS test driver appends to a machine's start script
//! (and what qemu-vm.nix's runners pass on from `$QEMU_OPTS`), each mapped to the nixvm
//! setting that does the same; an option nixvm cannot honour is an error naming it.
//!
//! | QEMU | nixvm |
//! |---|---|
//! | `-qmp unix:PATH,server=on,wait=off` | `--qmp PATH` |
//! | `-monitor unix:PATH` (`,server…`: listen) | `--monitor connect=PATH` (`socket=PATH`) |
//! | `-chardev socket,id=ID,path=PATH` + `-device virtconsole,chardev=ID` | `--console connect=PATH` (`socket=` with `server`) |
//! | `-device virtio-serial` | (the virtio-console has its own transport) |
//! | `-device virtio-rng-pci` | `--rng on` |
//! | `-serial stdio`, `-serial none` | `--serial stdio`, `--serial off` |
//! | `-netdev vde,id=ID,sock=DIR` + `-device virtio-net-pci,netdev=ID[,mac=MAC]` | `--net vde=DIR[,mac=MAC]` (after the other `--net`s, in order) |
//! | `-no-reboot` | `--on-reboot exit` |
//! | `-nographic`, `-display none` | (nixvm has no display) |
use std::collections::HashMap;
use std::path::PathBuf;

use super::specs::key_values;
use super::{ConsoleConfig, MonitorConfig, NetConfig, OnReboot, Settings};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(
        "the QEMU option `{0}` has no nixvm equivalent (nixvm maps -qmp, -monitor, -chardev \
         socket, -device virtio-serial|virtconsole|virtio-rng-pci|virtio-net-pci, -netdev vde, \
         -serial stdio|none, -no-reboot, -nographic)"
    )]
    Unsupported(String),
    #[error("the QEMU option {0} needs a value")]
    Missing(String),
    #[error("the QEMU option `{option} {value}` {why}")]
    Bad {
        option: String,
        value: String,
        why: &'static str,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// A UNIX socket in QEMU's chardev syntax: its path and whether QEMU would listen on it.
struct Socket {
    path: PathBuf,
    server: bool,
}

/// `unix:PATH[,server[=on]][,wait=off]`, or a `-chardev socket,…` with `path=`.
fn socket(option: &str, value: &str, pairs: &[(&str, &str)], path: Option<&str>) -> Result<Socket> {
    let bad = |why| Error::Bad {
        option: option.to_owned(),
        value: value.to_owned(),
        why,
    };
    let mut server = false;
    for &(k, v) in pairs {
        match (k, v) {
            ("server", "" | "on") => server = true,
            ("server", "off") | ("wait" | "nowait", _) | ("id", _) | ("path", _) => {}
            _ => return Err(bad("has an option nixvm does not know")),
        }
    }
    match path {
        Some(p) if !p.is_empty() => Ok(Socket {
            path: p.into(),
            server,
        }),
        _ => Err(bad("names no UNIX socket path")),
    }
}

/// The settings `args` (QEMU options) ask for; `nets` in it are to be added after the
/// command line's.
pub fn settings(args: &[String]) -> Result<Settings> {
    let mut s = Settings::default();
    let mut chardevs: HashMap<String, Socket> = HashMap::new();
    let mut netdevs: HashMap<String, PathBuf> = HashMap::new();
    let mut nics: Vec<(String, String)> = Vec::new();
    let mut console: Option<String> = None;
    let mut it = args.iter();
    while let Some(option) = it.next() {
        let name = option
            .strip_prefix("--")
            .or_else(|| option.strip_prefix('-'));
        let Some(name) = name else {
            return Err(Error::Unsupported(option.clone()));
        };
        match name {
            "nographic" => continue,
            "no-reboot" => {
                s.on_reboot = Some(OnReboot::Exit);
                continue;
            }
            "qmp" | "monitor" | "chardev" | "device" | "netdev" | "serial" | "display" => {}
            _ => return Err(Error::Unsupported(option.clone())),
        }
        let value = it.next().ok_or_else(|| Error::Missing(option.clone()))?;
        let bad = |why| Error::Bad {
            option: option.clone(),
            value: value.clone(),
            why,
        };
        let pairs = key_values(value).ok_or_else(|| bad("is not QEMU's key=value list"))?;
        let (first, _) = pairs[0];
        let get = |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|&(_, v)| v);
        match name {
            "qmp" | "monitor" => {
                let Some(path) = first.strip_prefix("unix:") else {
                    return Err(bad("is not a UNIX socket (unix:PATH)"));
                };
                let sock = socket(option, value, &pairs[1..], Some(path))?;
                if name == "qmp" {
                    if !sock.server {
                        return Err(bad("connects out: nixvm's QMP listens (server=on)"));
                    }
                    s.qmp = Some(sock.path);
                } else {
                    s.monitor = Some(if sock.server {
                        MonitorConfig::Socket(sock.path)
                    } else {
                        MonitorConfig::Connect(sock.path)
                    });
                }
            }
            "chardev" => {
                if first != "socket" {
                    return Err(bad("is not a socket chardev"));
                }
                let id = get("id").ok_or_else(|| bad("has no id="))?;
                let sock = socket(option, value, &pairs[1..], get("path"))?;
                chardevs.insert(id.to_owned(), sock);
            }
            "netdev" => {
                if first != "vde" {
                    return Err(bad("is not a vde netdev (nixvm joins VDE switches)"));
                }
                let id = get("id").ok_or_else(|| bad("has no id="))?;
                let sock = get("sock").filter(|p| !p.is_empty());
                let sock = sock.ok_or_else(|| bad("has no sock="))?;
                if pairs
                    .iter()
                    .any(|(k, _)| !matches!(*k, "vde" | "id" | "sock"))
                {
                    return Err(bad("has an option nixvm does not know"));
                }
                netdevs.insert(id.to_owned(), sock.into());
            }
            "device" => match first {
                "virtio-serial" | "virtio-serial-pci" | "virtio-serial-device" => {}
                "virtconsole" => {
                    let id = get("chardev").ok_or_else(|| bad("has no chardev="))?;
                    if console.replace(id.to_owned()).is_some() {
                        return Err(bad("is a second console; nixvm has one"));
                    }
                }
                "virtio-rng-pci" | "virtio-rng-device" => s.rng = Some(true),
                "virtio-net-pci" | "virtio-net-device" => {
                    let id = get("netdev").ok_or_else(|| bad("has no netdev="))?;
                    let mac = get("mac").map(|m| format!(",mac={m}")).unwrap_or_default();
                    nics.push((id.to_owned(), mac));
                }
                _ => return Err(Error::Unsupported(format!("{option} {value}"))),
            },
            "serial" => match value.as_str() {
                "stdio" => s.serial = Some(ConsoleConfig::Stdio),
                "none" | "null" => s.serial = Some(ConsoleConfig::Off),
                _ => return Err(Error::Unsupported(format!("{option} {value}"))),
            },
            "display" if value == "none" => {}
            _ => return Err(Error::Unsupported(format!("{option} {value}"))),
        }
    }
    if let Some(id) = console {
        let Some(sock) = chardevs.remove(&id) else {
            return Err(Error::Bad {
                option: "-device".into(),
                value: format!("virtconsole,chardev={id}"),
                why: "names a chardev that is not given",
            });
        };
        s.console = Some(if sock.server {
            ConsoleConfig::Socket(sock.path)
        } else {
            ConsoleConfig::Connect(sock.path)
        });
    }
    let mut nets = Vec::new();
    for (id, mac) in nics {
        let Some(dir) = netdevs.remove(&id) else {
            return Err(Error::Bad {
                option: "-device".into(),
                value: format!("virtio-net-pci,netdev={id}"),
                why: "names a netdev that is not given",
            });
        };
        let spec = format!("vde={}{mac}", dir.display());
        let net: NetConfig = spec.parse().map_err(|_| Error::Bad {
            option: "-device".into(),
            value: format!("virtio-net-pci,netdev={id}{mac}"),
            why: "has a MAC address or socket nixvm cannot take",
        })?;
        nets.push(net);
    }
    if !nets.is_empty() {
        s.nets = Some(nets);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// What the NixOS test driver appends (`QemuStartCommand.cmd`), and a vlan NIC as
    /// nixos/lib/testing's network module adds it.
    #[test]
    fn the_test_drivers_options() {
        let s = settings(&args(
            "-qmp unix:/s/vm-state-m/qmp,server=on,wait=off -monitor unix:/s/vm-state-m/monitor \
             -chardev socket,id=shell,path=/s/vm-state-m/shell -device virtio-serial \
             -device virtconsole,chardev=shell -device virtio-rng-pci -serial stdio -no-reboot \
             -nographic -device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:01 \
             -netdev vde,id=vlan1,sock=/tmp/vde1.ctl",
        ))
        .unwrap();
        assert_eq!(s.qmp, Some("/s/vm-state-m/qmp".into()));
        assert_eq!(
            s.monitor,
            Some(MonitorConfig::Connect("/s/vm-state-m/monitor".into()))
        );
        assert_eq!(
            s.console,
            Some(ConsoleConfig::Connect("/s/vm-state-m/shell".into()))
        );
        assert_eq!(s.serial, Some(ConsoleConfig::Stdio));
        assert_eq!(s.rng, Some(true));
        assert_eq!(s.on_reboot, Some(OnReboot::Exit));
        let nets = s.nets.unwrap();
        assert_eq!(nets.len(), 1);
        assert_eq!(nets[0].vde, Some("/tmp/vde1.ctl".into()));
        assert_eq!(nets[0].mac.unwrap().to_string(), "52:54:00:12:01:01");
        // The older spelling.
        let s = settings(&args(
            "-qmp unix:/q,server,nowait -monitor unix:/m,server,nowait",
        ))
        .unwrap();
        assert_eq!(s.qmp, Some("/q".into()));
        assert_eq!(s.monitor, Some(MonitorConfig::Socket("/m".into())));
    }

    #[test]
    fn what_nixvm_cannot_do_is_named() {
        for (a, named) in [
            ("-vga std", "-vga"),
            ("-device e1000,netdev=n", "e1000"),
            ("-netdev user,id=n", "vde"),
            ("-serial chardev:x", "chardev:x"),
            ("-qmp tcp:localhost:4444", "UNIX"),
            ("-qmp unix:/q", "listens"),
            ("-chardev file,id=x,path=/f", "socket chardev"),
            ("-device virtconsole,chardev=nope", "not given"),
            ("-device virtio-net-pci,netdev=nope", "not given"),
            (
                "-device virtio-net-pci,netdev=n,mac=zz -netdev vde,id=n,sock=/v",
                "MAC",
            ),
            ("-netdev vde,id=n,sock=/v,group=kvm", "does not know"),
            ("-monitor", "needs a value"),
            ("stray", "stray"),
        ] {
            let e = settings(&args(a)).unwrap_err().to_string();
            assert!(e.contains(named), "{a}: {e}");
        }
    }
}
