//! The control socket, the power button, signals and --on-reboot.
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// Guest script lines: busybox acpid powers the guest off on the ACPI power button.
pub(crate) const ACPID: &str = r#"
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho "NIXVM-TEST: button" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /tmp/acpid.log
# acpid forks, then opens the input devices: a button pressed before that is lost.
sleep 2
"#;

/// Guest script lines: a line every 0.3 s, forever.
pub(crate) const TICKS: &str = r#"
echo "NIXVM-TEST: ready"
i=0
while :; do i=$((i + 1)); echo "tick $i"; sleep 0.3; done
"#;

/// Runs `nixvm ctl --api-socket SOCK ARGS`.
pub(crate) fn ctl(sock: &Path, args: &[&str]) -> Run {
    let s = sock.to_str().expect("utf-8 path");
    let mut all = vec!["ctl", "--api-socket", s];
    all.extend(args);
    nixvm(&all, &[], BOOT_TIMEOUT)
}

/// A guest that runs `script` with a control socket; returns it streaming its console.
pub(crate) fn api_guest(
    g: &Guest,
    name: &str,
    script: &str,
    extra: &[&str],
) -> Result<(Streaming, PathBuf), String> {
    let sock = temp_dir().join(format!("{name}-api.sock"));
    let disk = script_disk(&format!("{name}-script.img"), script);
    let d = format!("path={},readonly=on", disk.display());
    let cl = cmdline("script");
    let s = sock.to_str().expect("utf-8 path");
    let mut args = g.args(&g.vmlinuz, &cl);
    // The script disk last: the guest runs the script of its last disk.
    args.extend(extra);
    args.extend(["--api-socket", s, "--disk", &d]);
    let mut cmd = Command::new(NIXVM);
    cmd.args(&args).stdin(Stdio::null());
    Ok((Streaming::spawn_command(cmd)?, sock))
}

pub(crate) fn lifecycle_tests(t: &mut Runner, g: &Guest) {
    t.run_retry("api_ping_info_pause_resume", || {
        // A socket file a crashed nixvm left behind does not stop the next one.
        let stale = temp_dir().join("pause-api.sock");
        drop(UnixListener::bind(&stale).map_err(|e| e.to_string())?);
        let (mut vm, sock) = api_guest(g, "pause", &format!("{ACPID}{TICKS}"), &[])?;
        vm.wait_for("tick 2")?;
        let ping = ctl(&sock, &["ping"]);
        check!(
            ping.code() == Some(0) && ping.stdout.contains("\"protocol\":1"),
            "ping: {}",
            ping.describe()
        );
        let info = ctl(&sock, &["info"]);
        check!(
            info.code() == Some(0)
                && info.stdout.contains("\"state\": \"running\"")
                && info.stdout.contains("\"vcpus\": 1"),
            "info: {}",
            info.describe()
        );
        let pause = ctl(&sock, &["pause"]);
        check!(pause.code() == Some(0), "pause: {}", pause.describe());
        // Lines already on their way may still come; then nothing for 3 s.
        std::thread::sleep(Duration::from_millis(500));
        while vm.lines.try_recv().is_ok() {}
        std::thread::sleep(Duration::from_secs(3));
        let during: Vec<String> = vm.lines.try_iter().collect();
        check!(
            during.is_empty(),
            "the console advanced while paused: {during:?}"
        );
        let info = ctl(&sock, &["info"]);
        check!(
            info.stdout.contains("\"state\": \"paused\""),
            "info while paused: {}",
            info.describe()
        );
        let resume = ctl(&sock, &["resume"]);
        check!(resume.code() == Some(0), "resume: {}", resume.describe());
        vm.wait_for("tick ")?;
        let down = ctl(&sock, &["shutdown", "--timeout", "120"]);
        let status = wait_timeout(&mut vm.child, Duration::from_secs(30));
        check!(
            down.code() == Some(0),
            "shutdown of a guest with acpid: {}",
            down.describe()
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the guest powered off: {status:?}"
        );
        check!(!sock.exists(), "control socket left behind");
        Ok(())
    });
    t.run_retry("api_shutdown_powers_off_exit_0", || {
        let (mut vm, sock) = api_guest(g, "down", &format!("{ACPID}{TICKS}"), &[])?;
        vm.wait_for("NIXVM-TEST: ready")?;
        let down = ctl(&sock, &["shutdown"]);
        let status = wait_timeout(&mut vm.child, Duration::from_secs(30));
        let _ = vm.wait_for("NIXVM-TEST: button");
        check!(
            down.code() == Some(0) && down.stdout.contains("powered off"),
            "ctl shutdown: {}",
            down.describe()
        );
        check!(
            vm.seen.contains("NIXVM-TEST: button"),
            "acpid never saw the button:\n{}",
            vm.seen
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm: {status:?}"
        );
        Ok(())
    });
    t.run_retry("sigterm_powers_off_through_acpid_exit_0", || {
        let (mut vm, _sock) = api_guest(g, "term0", &format!("{ACPID}{TICKS}"), &[])?;
        vm.wait_for("NIXVM-TEST: ready")?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "after SIGTERM, with acpid: {status:?}"
        );
        Ok(())
    });
    let mut attempt = 0;
    t.run_retry("on_reboot_restart_boots_again", || {
        // Each attempt with files of its own: inside L1 a stalled attempt's nixvm once outlived
        // SIGKILL, holding its socket and its image's lock.
        attempt += 1;
        let name = format!("restart{attempt}");
        // A counter on the first disk: the guest reboots twice, then powers off.
        let counter = disk_image(&format!("{name}-counter.img"), 4096, |_| 0);
        let c = format!("path={}", counter.display());
        let script = r#"
n=$(head -c 8 /dev/vda | tr -dc 0-9)
n=$(( ${n:-0} + 1 ))
printf '%08d' $n > /tmp/c
dd if=/tmp/c of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
echo "NIXVM-TEST: boot_count=$n"
if [ $n -lt 3 ]; then reboot -f; sleep 60; fi
"#;
        let (mut vm, _sock) =
            api_guest(g, &name, script, &["--on-reboot", "restart", "--disk", &c])?;
        vm.wait_for("NIXVM-TEST: boot_count=3")?;
        let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);
        vm.no_triple_fault()?;
        let boots = vm.seen.matches("NIXVM-TEST: init").count();
        check!(
            boots == 3 && vm.seen.contains("boot_count=1") && vm.seen.contains("boot_count=2"),
            "{boots} boots; {}",
            vm.console()
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the third boot powered off: {status:?}"
        );
        Ok(())
    });
    let mut attempt = 0;
    t.run_retry("pci_restart_with_disk_net_fs_console", || {
        // virtio-pci through a reboot in place: each boot uses a disk, a network interface,
        // a storefs share (vhost-user: the back end signals the queues' MSI-X vector) and
        // the virtio-console, so every device has its vectors routed again after the reset.
        attempt += 1;
        let name = format!("pcirestart{attempt}");
        let counter = disk_image(&format!("{name}-counter.img"), 4096, |_| 0);
        let store = temp_dir().join(format!("{name}-store"));
        std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
        std::fs::write(store.join("hello"), "from-the-store\n").map_err(|e| e.to_string())?;
        let hvc = temp_dir().join(format!("{name}-hvc.log"));
        let script = r#"
n=$(head -c 8 /dev/vda | tr -dc 0-9)
n=$(( ${n:-0} + 1 ))
printf '%08d' $n > /tmp/c
dd if=/tmp/c of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
ip link set eth0 up
printf '#!/bin/sh\n[ "$1" = bound ] && echo "$ip/$mask" > /tmp/lease\nexit 0\n' > /tmp/dhcp.sh
chmod +x /tmp/dhcp.sh
udhcpc -i eth0 -n -q -t 20 -T 2 -s /tmp/dhcp.sh >/dev/null 2>&1
mkdir -p /mnt/s && mount -t virtiofs st /mnt/s
echo "pci-hvc-$n" > /dev/hvc0
echo "NIXVM-TEST: pci_boot=$n,$(cat /mnt/s/hello),$(cat /tmp/lease)"
if [ "$n" -lt 2 ]; then reboot -f; sleep 60; fi
"#;
        let (c, fs, console) = (
            format!("path={}", counter.display()),
            format!("tag=st,path={},readonly=on", store.display()),
            format!("file={}", hvc.display()),
        );
        let extra = [
            "--transport",
            "pci",
            "--on-reboot",
            "restart",
            "--disk",
            &c,
            "--net",
            "local",
            "--fs",
            &fs,
            "--console",
            &console,
        ];
        let (mut vm, _sock) = api_guest(g, &name, script, &extra)?;
        vm.wait_for("NIXVM-TEST: pci_boot=2")?;
        let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);
        vm.no_triple_fault()?;
        for n in 1..=2 {
            let want = format!("NIXVM-TEST: pci_boot={n},from-the-store,10.0.2.15/24");
            check!(vm.seen.contains(&want), "no {want:?}:\n{}", vm.console());
        }
        let out = std::fs::read_to_string(&hvc).unwrap_or_default();
        check!(
            out.contains("pci-hvc-1") && out.contains("pci-hvc-2"),
            "hvc0 output: {out:?}"
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the second boot powered off: {status:?}"
        );
        Ok(())
    });
    t.run_retry("api_shutdown_forced_after_timeout", || {
        // No acpid: the button means nothing to this guest.
        let (mut vm, sock) = api_guest(g, "forced", TICKS, &[])?;
        vm.wait_for("NIXVM-TEST: ready")?;
        let down = ctl(&sock, &["shutdown", "--timeout", "3"]);
        let status = wait_timeout(&mut vm.child, Duration::from_secs(30));
        check!(
            down.code() == Some(1) && down.stderr.contains("did not power off"),
            "ctl shutdown of a guest that ignores the button: {}",
            down.describe()
        );
        check!(
            status.and_then(|s| s.code()) == Some(4),
            "nixvm after a forced stop: {status:?}"
        );
        Ok(())
    });
}

/// A QMP client as a test driver's (`nixos/lib/test-driver/.../qmp.py`): JSON lines, the
/// answers and the events apart.
pub(crate) struct Qmp {
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    events: Vec<serde_json::Value>,
}

impl Qmp {
    pub(crate) fn connect(path: &Path) -> Result<Qmp, String> {
        let s = std::os::unix::net::UnixStream::connect(path).map_err(|e| format!("qmp: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        Ok(Qmp {
            r: std::io::BufReader::new(s),
            events: Vec::new(),
        })
    }

    fn line(&mut self) -> Result<serde_json::Value, String> {
        use std::io::BufRead;
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Err("QMP socket closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("not JSON: {line:?}: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// The next line that is not an event (events are kept).
    pub(crate) fn answer(&mut self) -> Result<serde_json::Value, String> {
        loop {
            let v = self.line()?;
            if v.get("event").is_none() {
                return Ok(v);
            }
            self.events.push(v);
        }
    }

    pub(crate) fn execute(&mut self, cmd: &str) -> Result<serde_json::Value, String> {
        let line = format!("{}\n", serde_json::json!({"execute": cmd, "id": cmd}));
        self.r
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| e.to_string())?;
        self.answer()
    }

    /// Reads until an event named `name` came (or the socket closed); returns it.
    fn event(&mut self, name: &str) -> Result<serde_json::Value, String> {
        loop {
            if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
                return Ok(e.clone());
            }
            match self.line() {
                Ok(v) if v.get("event").is_some() => self.events.push(v),
                Ok(v) => return Err(format!("an answer while waiting for {name}: {v}")),
                Err(e) => {
                    let names: Vec<String> =
                        self.events.iter().map(|e| e["event"].to_string()).collect();
                    return Err(format!("no {name} event ({e}); events: {names:?}"));
                }
            }
        }
    }
}

/// Reads a monitor connection up to its next prompt; returns what came before it.
pub(crate) fn monitor_answer(m: &mut std::os::unix::net::UnixStream) -> Result<String, String> {
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    while !got.ends_with(b"(qemu) ") {
        match m.read(&mut b) {
            Ok(0) => {
                return Err(format!(
                    "monitor closed after {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => {
                return Err(format!(
                    "monitor: {e} after {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
        }
    }
    Ok(String::from_utf8_lossy(&got[..got.len() - 7]).into_owned())
}

pub(crate) fn monitor_command(
    m: &mut std::os::unix::net::UnixStream,
    cmd: &str,
) -> Result<String, String> {
    m.write_all(format!("{cmd}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    monitor_answer(m)
}

/// The human monitor as the NixOS test driver uses it: it listens, nixvm connects.
fn monitor_checks(m: &mut std::os::unix::net::UnixStream) -> TestResult {
    let banner = monitor_answer(m)?;
    check!(banner.contains("monitor"), "monitor banner: {banner:?}");
    let st = monitor_command(m, "info status")?;
    check!(st.contains("VM status: running"), "info status: {st:?}");
    monitor_command(m, "stop")?;
    let st = monitor_command(m, "info status")?;
    check!(
        st.contains("VM status: paused"),
        "info status after stop: {st:?}"
    );
    monitor_command(m, "cont")?;
    let shot = monitor_command(m, "screendump /tmp/x.ppm")?;
    check!(shot.contains("no display"), "screendump: {shot:?}");
    let bad = monitor_command(m, "frobnicate")?;
    check!(
        bad.contains("unknown command"),
        "an unknown command: {bad:?}"
    );
    Ok(())
}

pub(crate) fn qmp_tests(t: &mut Runner, g: &Guest) {
    t.run_retry("qmp_status_stop_cont_powerdown_and_monitor", || {
        let qmp = temp_dir().join("q.qmp");
        let q = qmp.to_str().unwrap_or("");
        let mon_path = temp_dir().join("monitor.sock");
        let _ = std::fs::remove_file(&mon_path);
        let mon_l = UnixListener::bind(&mon_path).map_err(|e| e.to_string())?;
        let mon = format!("connect={}", mon_path.display());
        let (mut vm, _) = api_guest(
            g,
            "qmp",
            &format!("{ACPID}{TICKS}"),
            &["--qmp", q, "--monitor", &mon],
        )?;
        let mut m = accept_within(&mon_l, Duration::from_secs(60))?;
        m.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        vm.wait_for("tick 2")?;
        monitor_checks(&mut m)?;
        let mut c = Qmp::connect(&qmp)?;
        let hello = c.answer()?;
        check!(hello.get("QMP").is_some(), "greeting: {hello}");
        let early = c.execute("query-status")?;
        check!(
            early["error"]["class"] == "CommandNotFound",
            "before negotiation: {early}"
        );
        let caps = c.execute("qmp_capabilities")?;
        check!(
            caps["return"] == serde_json::json!({}) && caps["id"] == "qmp_capabilities",
            "qmp_capabilities: {caps}"
        );
        let st = c.execute("query-status")?;
        check!(st["return"]["running"] == true, "query-status: {st}");
        let stop = c.execute("stop")?;
        check!(stop.get("return").is_some(), "stop: {stop}");
        c.event("STOP")?;
        let st = c.execute("query-status")?;
        check!(st["return"]["status"] == "paused", "while stopped: {st}");
        let cont = c.execute("cont")?;
        check!(cont.get("return").is_some(), "cont: {cont}");
        c.event("RESUME")?;
        vm.wait_for("tick ")?;
        let down = c.execute("system_powerdown")?;
        check!(down.get("return").is_some(), "system_powerdown: {down}");
        c.event("POWERDOWN")?;
        let shutdown = c.event("SHUTDOWN")?;
        let status = wait_timeout(&mut vm.child, Duration::from_secs(60));
        check!(
            shutdown["data"] == serde_json::json!({"guest": true, "reason": "guest-shutdown"}),
            "SHUTDOWN: {shutdown}"
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the guest powered off: {status:?}"
        );
        check!(!qmp.exists(), "QMP socket left behind");
        Ok(())
    });
    t.run_retry("monitor_sendkey_ctrl_alt_delete_reboots", || {
        let mon_path = temp_dir().join("keys-monitor.sock");
        let _ = std::fs::remove_file(&mon_path);
        let mon_l = UnixListener::bind(&mon_path).map_err(|e| e.to_string())?;
        let mon = format!("connect={}", mon_path.display());
        // With kernel.ctrl-alt-del = 1 the kernel reboots at once on the chord (no init
        // involved): nixvm then exits 3.
        let script = format!(
            r#"
for i in $(seq 50); do
  grep -q 'AT Translated Set 2 keyboard' /proc/bus/input/devices && break
  sleep 0.2
done
echo "NIXVM-TEST: kbd=$(grep -c 'AT Translated Set 2 keyboard' /proc/bus/input/devices)"
echo 1 > /proc/sys/kernel/ctrl-alt-del
{TICKS}"#
        );
        let (mut vm, _) = api_guest(g, "keys", &script, &["--monitor", &mon])?;
        let mut m = accept_within(&mon_l, Duration::from_secs(60))?;
        m.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        monitor_answer(&mut m)?;
        vm.wait_for("tick 2")?;
        vm.expect("kbd", "1")?;
        let bad = monitor_command(&mut m, "sendkey ctrl-hyper")?;
        check!(bad.contains("unknown key"), "sendkey ctrl-hyper: {bad:?}");
        let ok = monitor_command(&mut m, "sendkey ctrl-alt-delete")?;
        check!(ok.trim().is_empty(), "sendkey ctrl-alt-delete: {ok:?}");
        let status = wait_timeout(&mut vm.child, Duration::from_secs(60));
        check!(
            status.and_then(|s| s.code()) == Some(3),
            "nixvm after ctrl-alt-delete: {status:?}\n{}",
            vm.seen
        );
        Ok(())
    });
    t.run_retry("qmp_quit_exits_0", || {
        let qmp = temp_dir().join("quit.qmp");
        let q = qmp.to_str().unwrap_or("");
        let (mut vm, _) = api_guest(g, "quit", TICKS, &["--qmp", q])?;
        vm.wait_for("tick 2")?;
        let mut c = Qmp::connect(&qmp)?;
        c.answer()?;
        c.execute("qmp_capabilities")?;
        let quit = c.execute("quit")?;
        check!(quit.get("return").is_some(), "quit: {quit}");
        let shutdown = c.event("SHUTDOWN")?;
        let status = wait_timeout(&mut vm.child, Duration::from_secs(30));
        check!(
            shutdown["data"]["reason"] == "host-qmp-quit",
            "SHUTDOWN: {shutdown}"
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after quit: {status:?}"
        );
        Ok(())
    });
}
