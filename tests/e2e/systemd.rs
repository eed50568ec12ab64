//! A real systemd guest (Debian trixie, systemd 257, from `resources/systemd-guest.sh`) under
//! nixvm: credentials from SMBIOS, readiness relayed to a notify socket, the RTC, the power
//! button through logind, a clean power-off, a root shell on hvc0 as the NixOS test
//! driver's backdoor, and the driver's `reboot()` (ctrl-alt-delete on the monitor) coming
//! back (`--on-reboot restart`). The VM is started as the NixOS test driver starts a machine:
//! its start script, rendered by nix/lib/runner.nix (with a virtiofsd for the driver's shared
//! directory), run by `sh -c` in a state directory with the driver's QEMU options appended,
//! the monitor and the shell sockets listened on by the test, QMP negotiated, commands run
//! with the driver's protocol, files copied through the shared directory both ways, and
//! `send_console` text read from the serial console in the guest.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::images::copy_sparse;
use crate::lifecycle::{Qmp, monitor_answer, monitor_command};
use crate::vsock::{big, send_to_guest_port, sha_server};

pub(crate) const SYSTEMD_NAMES: [&str; 12] = [
    "systemd_guest_reaches_multi_user",
    "systemd_credential_imported",
    "systemd_ready_relayed_after_default_target",
    "systemd_rtc_and_power_button",
    "systemd_power_button_powers_off_cleanly",
    "systemd_hvc0_backdoor_shell",
    "systemd_ctrl_alt_delete_reboots",
    "systemd_test_driver_contract",
    "systemd_vsock_guest_to_host_16m",
    "systemd_vsock_host_to_guest_16m",
    "systemd_copy_through_shared_dir",
    "systemd_send_console",
];

/// The backdoor's banner on hvc0 (as NixOS's test instrumentation prints it).
const BANNER: &str = "Spawning backdoor root shell...";

/// Talks to the guest's backdoor shell on hvc0 as a test driver does: waits for the banner,
/// runs a command, reads its output. Returns the connection, for more commands.
fn backdoor(l: &UnixListener) -> Result<BufReader<UnixStream>, String> {
    let conn = accept_within(l, Duration::from_secs(60))?;
    conn.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(conn);
    let mut seen = String::new();
    let mut line = String::new();
    while !line.contains(BANNER) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err(format!("hvc0 closed before the banner; read {seen:?}")),
            Ok(_) => seen.push_str(&line),
            Err(e) => return Err(format!("no banner on hvc0 ({e}); read {seen:?}")),
        }
    }
    let (status, out) = execute(&mut r, r#"echo "HVC-$((6 * 7))-$(id -u)""#)?;
    check!(
        status == 0 && out == "HVC-42-0\n",
        "the backdoor shell answered {out:?} ({status})"
    );
    Ok(r)
}

/// Runs a command on the backdoor as the test driver's `execute` does: its output comes back
/// base64-encoded on one line, then its exit status.
fn execute(r: &mut BufReader<UnixStream>, command: &str) -> Result<(i32, String), String> {
    let quoted = format!("'{}'", command.replace('\'', r"'\''"));
    let line =
        format!("timeout 900 bash -c {quoted} | (base64 -w 0; echo)\necho ${{PIPESTATUS[0]}}\n");
    r.get_mut()
        .write_all(line.as_bytes())
        .map_err(|e| e.to_string())?;
    // No answer within the read timeout: the connection is closed, so that the commands
    // after this one fail at once instead of waiting as long each, and the boot runs once
    // more (the nested route's freeze; the boot reports what nixvm's threads were doing).
    let silent = |r: &BufReader<UnixStream>, what: &str, e: std::io::Error| {
        let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
        format!("no {what} of {command:?} on hvc0: {e} {STALLED}")
    };
    let mut out = String::new();
    if let Err(e) = r.read_line(&mut out) {
        return Err(silent(r, "output", e));
    }
    let mut status = String::new();
    if let Err(e) = r.read_line(&mut status) {
        return Err(silent(r, "status", e));
    }
    let bytes = base64_decode(out.trim_end())
        .ok_or_else(|| format!("the output of {command:?} is not base64: {out:?}"))?;
    let status = status
        .trim()
        .parse()
        .map_err(|_| format!("the status of {command:?} is {status:?}"))?;
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Standard base64, as `base64 -w 0` writes it.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in s {
        acc = (acc << 6) | u32::from(val(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// Where `resources/systemd-guest.sh` puts the guest (built on the host, before L1).
pub(crate) fn systemd_guest_dir() -> PathBuf {
    root().join("target/systemd-guest")
}

/// Why the guest is not there, as the build said (`target/systemd-guest.skip`).
pub(crate) fn systemd_guest_missing() -> Option<String> {
    if systemd_guest_dir().join("stamp").exists() {
        return None;
    }
    Some(
        std::fs::read_to_string(root().join("target/systemd-guest.skip"))
            .unwrap_or_else(|_| "resources/systemd-guest.sh did not run".into())
            .trim()
            .to_owned(),
    )
}

/// Builds the guest (host side: it needs Debian's mirror); a reason it could not, for the
/// tests to report.
pub(crate) fn build_systemd_guest() {
    let skip = root().join("target/systemd-guest.skip");
    let out = Command::new(root().join("resources/systemd-guest.sh"))
        .arg(assets())
        .arg(systemd_guest_dir())
        .output();
    let why = match out {
        Ok(o) if o.status.success() => {
            let _ = std::fs::remove_file(&skip);
            return;
        }
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            let why = text
                .lines()
                .find_map(|l| l.strip_prefix("systemd-guest: skipped: "))
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    format!("resources/systemd-guest.sh failed: {}", tail(&text, 5))
                });
            println!("e2e: the systemd guest: {why}");
            why
        }
        Err(e) => format!("resources/systemd-guest.sh: {e}"),
    };
    let _ = std::fs::write(skip, why);
}

/// `tool` is resources/vsock-io, built static: the guest gets it on /dev/vdb.
pub(crate) fn systemd_boot(g: &Guest, tool: &Path) -> Result<Vec<TestResult>, String> {
    let e = |e: std::io::Error| e.to_string();
    let dir = systemd_guest_dir();
    let tmp = temp_dir().join("systemd");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(e)?;
    // A writable copy of the root (the build's stays as it is), holes kept.
    let img = tmp.join("root.img");
    copy_sparse(&dir.join("root.img"), &img).map_err(e)?;
    let notify_path = tmp.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).map_err(e)?;
    let heard: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    {
        let heard = heard.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = notify.recv(&mut b) {
                let msg = String::from_utf8_lossy(&b[..n]).into_owned();
                heard.lock().unwrap().push((Instant::now(), msg));
            }
        });
    }
    let shell = tmp.join("shell.sock");
    let shell_l = UnixListener::bind(&shell).map_err(e)?;
    let shell_talk = std::thread::spawn(move || backdoor(&shell_l));
    let api = tmp.join("api.sock");
    let monitor = tmp.join("monitor.sock");
    let mon_l = UnixListener::bind(&monitor).map_err(e)?;
    let qmp = tmp.join("qmp.sock");
    let initrd = dir.join("initrd.img");
    let (exe, copy_exe) = exe_disk(tool, "vdb")?;
    let vsock = tmp.join("v.sock");
    sha_server(&tmp.join("v.sock_6000"))?;
    let greeting = tmp.join("greeting");
    std::fs::write(&greeting, "hello from the host").map_err(e)?;
    let virtiofsd = crate::virtiofsd::find()
        .ok_or("no virtiofsd for the shared directory (cargo install virtiofsd --locked)")?;
    // The machine's start script, as a NixOS system.build.vm's run-<name>-vm: rendered by
    // nix/lib/runner.nix as the test module renders a node's, with the driver's shared
    // directory ($SHARED_DIR, linked where the runner starts) on a virtiofsd it starts.
    let p = |p: &Path| nix_string(&p.display().to_string());
    let description = format!(
        r#"{{
          name = "trixie"; nixvm = {nixvm};
          kernel = {kernel}; initrd = {initrd};
          # clocksource=acpi_pm: what nixpkgs' test-instrumentation.nix gives every node.
          kernelParams = [ "console=ttyS0" "root=/dev/vda" "rw" "quiet" "panic=-1"
            "clocksource=acpi_pm" ];
          # One vCPU, as qemu-vm.nix's default (virtualisation.cores = 1). With two, this
          # boot stalled on CI machines where the busybox guests' did not: a soft lockup of
          # 708 s with the second vCPU not run at all; both vCPUs busy for minutes without
          # the guest getting anywhere; 10 min without a line on the console.
          bootParams = [ ]; vcpu = 1; mem = 1024;
          # virtio-pci, as nix/modules/qemu-vm-runner.nix gives test nodes (QEMU's bus).
          transport = "pci";
          volumes = [ {{ image = {img}; }} {{ image = {exe}; readOnly = true; }} ];
          preStart = "ln -sfn \"\$SHARED_DIR\" share-shared";
          shares = [ {{ tag = "shared"; source = "share-shared"; mountPoint = "/tmp/shared";
            backend = "virtiofsd"; socket = "virtiofs-shared.sock"; }} ];
          virtiofsd = {virtiofsd};
          # Inside L1 the root is a chroot, where the namespace sandbox cannot pivot_root.
          virtiofsdArgs = [ "--sandbox" "chroot" "--log-level" "error" ];
          vsock = {{ cid = 3; socket = {vsock}; }};
          credentials = {{ "nixvm.greeting" = {greeting}; }};
          socket = {api}; onReboot = "restart";
          # A clean power-off of this guest takes tens of seconds inside L1.
          shutdownTimeout = 150;
          extraArgs = [ "--notify-socket" {notify} ];
        }}"#,
        nixvm = nix_string(NIXVM),
        kernel = nix_string(&g.vmlinuz),
        initrd = p(&initrd),
        img = p(&img),
        exe = p(&exe),
        virtiofsd = p(&virtiofsd),
        vsock = p(&vsock),
        greeting = p(&greeting),
        api = p(&api),
        notify = p(&notify_path),
    );
    let runner = tmp.join("run-trixie-vm");
    std::fs::write(&runner, render_runner(&description)?).map_err(e)?;
    std::fs::set_permissions(&runner, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(e)?;
    // What the test driver runs (QemuStartCommand.cmd, allow_reboot): the script and its
    // options, by `sh -c` in the machine's state directory, with its environment.
    let state = tmp.join("vm-state-trixie");
    let shared = tmp.join("shared-xchg");
    std::fs::create_dir_all(&state).map_err(e)?;
    std::fs::create_dir_all(&shared).map_err(e)?;
    let start = format!(
        "{} -qmp unix:{},server=on,wait=off -monitor unix:{} -chardev socket,id=shell,path={} \
         -device virtio-serial -device virtconsole,chardev=shell -device virtio-rng-pci \
         -serial stdio -nographic",
        runner.display(),
        qmp.display(),
        monitor.display(),
        shell.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(start)
        .current_dir(&state)
        .env("TMPDIR", &state)
        .env("SHARED_DIR", &shared)
        .env("USE_TMPDIR", "1")
        .stdin(std::process::Stdio::piped());
    // Its own process group: a boot that ends early (and runs once more) leaves no nixvm or
    // virtiofsd of the start script's behind.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut vm = Streaming::spawn_command(cmd)?;
    let _group = KillGroup(vm.child.id());
    // Where the time goes: CI machines differ several-fold, and this is the longest boot.
    let spawned = Instant::now();
    let phase = |what: &str| {
        println!(
            "e2e: systemd guest: {what} after {} s",
            spawned.elapsed().as_secs()
        );
    };
    // The driver accepts the monitor, reads up to its prompt, and negotiates QMP at once.
    let mut driver = (|| {
        let mut m = accept_within(&mon_l, Duration::from_secs(60))?;
        m.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        monitor_answer(&mut m)?;
        let mut q = Qmp::connect(&qmp)?;
        let hello = q.answer()?;
        check!(hello.get("QMP").is_some(), "QMP greeting: {hello}");
        let caps = q.execute("qmp_capabilities")?;
        check!(caps.get("return").is_some(), "qmp_capabilities: {caps}");
        let st = monitor_command(&mut m, "info status")?;
        check!(st.contains("running"), "info status: {st:?}");
        Ok((m, q))
    })();
    vm.wait_for_within("NIXVM-TEST: unit-start", Duration::from_secs(600))?;
    let unit_started = Instant::now();
    phase("the unit started");
    let done = vm.wait_for_within("NIXVM-TEST: unit-done", Duration::from_secs(120));
    phase("the unit ended (multi-user)");
    // The nested route's hazard: a guest that reset by itself (nixvm booted it again in
    // place) is not this boot's result; the boot runs once more.
    if vm.seen.matches("NIXVM-TEST: unit-start").count() > 1 {
        return Err(format!(
            "{STALLED} (the guest reset without asking); {}",
            vm.tails(40)
        ));
    }
    let mut hvc = shell_talk
        .join()
        .unwrap_or_else(|_| Err("the backdoor thread panicked".into()));
    phase("the backdoor answered");
    // The guest's own account of its boot, beside the phases above.
    if let Ok(r) = hvc.as_mut() {
        let analyze = "systemd-analyze time; systemd-analyze blame --no-pager | head -n 8";
        match execute(r, analyze) {
            Ok((_, out)) => {
                for l in out.lines() {
                    println!("e2e: systemd guest: {}", l.trim());
                }
            }
            Err(e) if e.contains(STALLED) => hvc = Err(e),
            Err(_) => {}
        }
    }
    // More of the driver's protocol: a command's exit status, a unit's state.
    let contract = driver
        .as_ref()
        .map(drop)
        .map_err(Clone::clone)
        .and_then(|()| {
            let r = hvc
                .as_mut()
                .map_err(|e| format!("no backdoor shell: {e}"))?;
            let (status, _) = execute(r, "echo on stdout; echo on stderr >&2; exit 3")?;
            check!(status == 3, "a command's exit status came back as {status}");
            let (status, out) = execute(r, "systemctl is-active multi-user.target")?;
            check!(
                status == 0 && out == "active\n",
                "systemctl is-active multi-user.target: {out:?} ({status})"
            );
            let clock = "cat /sys/devices/system/clocksource/clocksource0/current_clocksource";
            let (status, out) = execute(r, clock)?;
            check!(
                status == 0 && out == "acpi_pm\n",
                "the guest's clock source with clocksource=acpi_pm: {out:?} ({status})"
            );
            // Every virtio device on PCI bus 0, as under QEMU: the two disks, the shared
            // directory, vsock, the backdoor's console and the driver's virtio-rng.
            let (status, out) = execute(r, "readlink -f /sys/bus/virtio/devices/*")?;
            let on_pci = out.lines().filter(|l| l.contains("/pci0000:00/")).count();
            check!(
                status == 0 && on_pci == out.lines().count() && on_pci >= 6,
                "the guest's virtio devices, which should all be on PCI: {out:?} ({status})"
            );
            Ok(())
        });
    // vsock both ways, 16 MiB each, driven through the backdoor.
    let (vsock_up, vsock_down) = match hvc.as_mut() {
        Err(e) => (
            Err(format!("no backdoor shell: {e}")),
            Err(format!("no backdoor shell: {e}")),
        ),
        Ok(r) => vsock_both_ways(r, &copy_exe, &vsock),
    };
    // copy_from_host and copy_from_vm: through the shared directory, which the guest mounts
    // where qemu-vm.nix mounts it.
    let copy = match hvc.as_mut() {
        Err(e) => Err(format!("no backdoor shell: {e}")),
        Ok(r) => copy_both_ways(r, &shared),
    };
    // send_console: the driver writes to the start script's stdin, the serial console's input.
    let console = match hvc.as_mut() {
        Err(e) => Err(format!("no backdoor shell: {e}")),
        Ok(r) => send_console(r, &mut vm),
    };
    phase("vsock, copies and send_console done");
    // The backdoor stopped answering: the boot runs once more, after saying what nixvm's
    // threads were doing (a freeze of the route leaves them waiting; a hang of ours, not).
    if let Some(e) = [&contract, &vsock_up, &vsock_down, &copy, &console]
        .into_iter()
        .find_map(|r| r.as_ref().err().filter(|e| e.contains(STALLED)))
    {
        return Err(format!("{e}; {}\n{}", vm.tails(15), vm.stall_report()));
    }
    // systemd says READY=1 once the default target is reached, after the unit.
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready_at = loop {
        let found = heard
            .lock()
            .unwrap()
            .iter()
            .find(|(_, m)| m.lines().any(|l| l == "READY=1"))
            .map(|(t, _)| *t);
        if found.is_some() || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The driver's reboot(): ctrl-alt-delete on the monitor, through the PS/2 keyboard;
    // systemd's ctrl-alt-del.target reboots cleanly, and nixvm boots the guest again in
    // place; it reaches multi-user once more.
    let reboot = (|| {
        let (m, _) = driver
            .as_mut()
            .map_err(|e| format!("no monitor to reboot through: {e}"))?;
        let said = monitor_command(m, "sendkey ctrl-alt-delete")?;
        check!(said.trim().is_empty(), "sendkey ctrl-alt-delete: {said:?}");
        vm.wait_for_within("reboot: Restarting system", Duration::from_secs(300))?;
        vm.wait_for_within("NIXVM-TEST: unit-done", Duration::from_secs(900))?;
        let boots = vm.seen.matches("NIXVM-TEST: unit-start").count();
        let asked = vm.seen.matches("reboot: Restarting system").count();
        // More boots than the guest asked for: it also reset by itself, the hazard the first
        // boot is checked for too, and the boot runs once more.
        let unasked = if boots > asked + 1 { STALLED } else { "" };
        check!(
            boots == 2,
            "{boots} boots for one reboot, {asked} of them asked for by the guest {unasked}; {}",
            vm.tails(40)
        );
        Ok(())
    })();
    if let Err(e) = &reboot
        && e.contains(STALLED)
    {
        return Err(e.clone());
    }
    phase("rebooted to multi-user");
    // The power button: logind powers the guest off, nixvm exits 0.
    let ctl = nixvm(
        &[
            "ctl",
            "--api-socket",
            api.to_str().unwrap_or(""),
            "shutdown",
        ],
        &[],
        Duration::from_secs(180),
    );
    let status = wait_timeout(&mut vm.child, Duration::from_secs(60));
    phase("powered off");
    std::thread::sleep(Duration::from_millis(200));
    let heard: Vec<String> = heard
        .lock()
        .unwrap()
        .iter()
        .map(|(_, m)| m.clone())
        .collect();
    for l in vm
        .seen
        .lines()
        .filter(|l| l.contains("NIXVM-TEST: journal: "))
    {
        println!("e2e: systemd guest {}", l.trim_end());
    }
    let multi_user = done.map(drop);
    let cred = vm.expect("cred", "hello from the host");
    let ready = (|| {
        let at = ready_at
            .ok_or_else(|| format!("no READY=1 reached the notify socket; heard {heard:?}"))?;
        check!(
            at >= unit_started + Duration::from_secs(4),
            "READY=1 came {:?} after the unit started, which sleeps 5 s before the default \
             target can be reached",
            at.saturating_duration_since(unit_started)
        );
        check!(
            heard
                .iter()
                .any(|m| m.lines().any(|l| l.starts_with("STATUS="))),
            "no STATUS= relayed; heard {heard:?}"
        );
        check!(
            heard.iter().all(|m| m.lines().all(|l| l == "READY=1"
                || l == "STOPPING=1"
                || l == "RELOADING=1"
                || l.starts_with("STATUS="))),
            "relayed more than readiness and status: {heard:?}"
        );
        Ok(())
    })();
    let machine = vm.expect("powerkey", "1").and_then(|()| {
        let rtc = vm.marker("rtc").unwrap_or_default();
        check!(rtc.starts_with("rtc_cmos"), "the guest's rtc0: {rtc:?}");
        Ok(())
    });
    let poweroff = (|| {
        check!(
            ctl.code() == Some(0),
            "nixvm ctl shutdown: {}",
            ctl.describe()
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the power button: {status:?}\nconsole:\n{}",
            tail(&vm.seen, 30)
        );
        check!(
            heard.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
            "no STOPPING=1 relayed at power-off; heard {heard:?}"
        );
        Ok(())
    })();
    let results = vec![
        multi_user,
        cred,
        ready,
        machine,
        poweroff,
        hvc.map(drop),
        reboot,
        contract,
        vsock_up,
        vsock_down,
        copy,
        console,
    ];
    // The guest's kernel saw a CPU not run for many seconds (a soft lockup, an RCU stall):
    // what went wrong after that is the nested route's, and the boot runs once more. The
    // report of nixvm's threads, printed while the test waited, tells whose it was.
    let starved = ["soft lockup - CPU#", "rcu_preempt detected stalls"]
        .iter()
        .find(|m| vm.seen.contains(*m));
    if let (Some(m), Some(Err(e))) = (starved, results.iter().find(|r| r.is_err())) {
        return Err(format!(
            "{e}\n{STALLED} (the guest's kernel reported {m:?}); console:\n{}",
            tail(&vm.seen, 40)
        ));
    }
    Ok(results)
}

/// Kills a process group when dropped (declared after the `Streaming` whose child leads it,
/// so dropped before that child is reaped and its id freed).
struct KillGroup(u32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0) {
            // SAFETY: kill(2) on the process group our own child leads.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// The driver's copy_from_host and copy_from_vm: files through the shared directory, which
/// the guest's fstab mounts on /tmp/shared as qemu-vm.nix's fileSystems do.
fn copy_both_ways(r: &mut BufReader<UnixStream>, shared: &Path) -> TestResult {
    let (status, out) = execute(r, "findmnt -n -o FSTYPE,SOURCE /tmp/shared")?;
    check!(
        status == 0 && out.trim() == "virtiofs shared",
        "the shared directory on /tmp/shared: {out:?} ({status})"
    );
    let data: Vec<u8> = (0..1usize << 20)
        .map(|i| u8::try_from((i * 7 + i / 977) % 256).unwrap_or(0))
        .collect();
    std::fs::write(shared.join("from-host.bin"), &data).map_err(|e| e.to_string())?;
    let (status, out) = execute(
        r,
        "cp /tmp/shared/from-host.bin /root/ && sha256sum < /root/from-host.bin | cut -d' ' -f1",
    )?;
    check!(
        status == 0 && out.trim() == sha256_bytes(&data),
        "copy_from_host: the guest's copy hashes to {out:?} ({status})"
    );
    let (status, out) = execute(
        r,
        "head -c 1048576 /dev/urandom > /root/out.bin && cp /root/out.bin /tmp/shared/from-vm.bin \
         && sync && sha256sum < /root/out.bin | cut -d' ' -f1",
    )?;
    let got = std::fs::read(shared.join("from-vm.bin")).unwrap_or_default();
    check!(
        status == 0 && out.trim() == sha256_bytes(&got),
        "copy_from_vm: the guest wrote {out:?} ({status}), the host has {} bytes hashing to {}",
        got.len(),
        sha256_bytes(&got)
    );
    Ok(())
}

/// A line written to the start script's stdin arrives on the guest's /dev/ttyS0.
fn send_console(r: &mut BufReader<UnixStream>, vm: &mut Streaming) -> TestResult {
    // The getty systemd starts on the console would read it first.
    let (status, out) = execute(
        r,
        "systemctl stop serial-getty@ttyS0.service; \
         setsid sh -c 'timeout 120 head -n 1 /dev/ttyS0 > /tmp/from-serial' \
         < /dev/null > /dev/null 2>&1 & sleep 2",
    )?;
    check!(
        status == 0,
        "reading ttyS0 in the guest: {out:?} ({status})"
    );
    vm.child
        .stdin
        .as_mut()
        .ok_or("the start script has no stdin")?
        .write_all(b"send-console-42\n")
        .map_err(|e| e.to_string())?;
    let (status, out) = execute(
        r,
        "for i in $(seq 150); do [ -s /tmp/from-serial ] && break; sleep 0.2; done; \
         cat /tmp/from-serial",
    )?;
    check!(
        status == 0 && out.trim_end() == "send-console-42",
        "the guest read {out:?} ({status}) on ttyS0"
    );
    Ok(())
}

/// `s` as a Nix string literal.
fn nix_string(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('$', "\\$")
    )
}

/// The runner script nix/lib/runner.nix renders from `description` (a Nix expression),
/// evaluated without a store (`nix eval --store dummy://`, as nix-runner-boot.sh does).
fn render_runner(description: &str) -> Result<String, String> {
    let expr = format!(
        "((import {}) ({description})).script",
        nix_string(&root().join("nix/lib/runner.nix").display().to_string())
    );
    let out = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "--store",
            "dummy://",
        ])
        .args(["eval", "--impure", "--raw", "--expr", &expr])
        .output()
        .map_err(|e| format!("nix (to render the runner): {e}"))?;
    check!(
        out.status.success(),
        "nix/lib/runner.nix did not render the runner: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).map_err(|e| e.to_string())
}

/// Guest → host: 16 MiB to a host program listening on `<vsock>_6000`, which answers with
/// their sha256; host → guest: 16 MiB into a guest listener on port 7000 through
/// `CONNECT 7000`. The guest's side runs as backdoor commands. (The busybox guest's vsock
/// tests move 64 MiB; here what counts is the systemd guest's driver under the driver's
/// protocol, and the slow nested route's time.)
fn vsock_both_ways(
    r: &mut BufReader<UnixStream>,
    copy_exe: &str,
    vsock: &Path,
) -> (TestResult, TestResult) {
    let big = big().min(16 << 20);
    let up = (|| {
        let (status, out) = execute(r, copy_exe)?;
        check!(
            status == 0,
            "copying vsock-io into the guest: {out:?} ({status})"
        );
        let (status, out) = execute(
            r,
            &format!(
                "head -c {big} /dev/urandom > /tmp/up && sha256sum < /tmp/up | cut -d' ' -f1 \
                 && /tmp/vsock-io connect 2 6000 < /tmp/up; rm -f /tmp/up"
            ),
        )?;
        let lines: Vec<&str> = out.lines().collect();
        check!(
            status == 0 && lines.len() == 2 && lines[0].len() == 64 && lines[0] == lines[1],
            "guest to host: the guest's sha256 and the host's answer: {out:?} ({status})"
        );
        Ok(())
    })();
    let down = (|| {
        let (status, out) = execute(
            r,
            "/tmp/vsock-io listen 7000 < /dev/null > /tmp/down & echo $! > /tmp/down.pid; sleep 1",
        )?;
        check!(
            status == 0,
            "starting the guest's listener: {out:?} ({status})"
        );
        let data: Vec<u8> = (0..big)
            .map(|i| u8::try_from((i * 13 + i / 4096) % 256).unwrap_or(0))
            .collect();
        send_to_guest_port(vsock, 7000, &data)?;
        let (status, out) = execute(
            r,
            "p=$(cat /tmp/down.pid); for i in $(seq 600); do [ -e /proc/$p ] || break; sleep 0.2; done; \
             sha256sum < /tmp/down | cut -d' ' -f1",
        )?;
        check!(
            status == 0 && out.trim() == sha256_bytes(&data),
            "host to guest: the guest's sha256 {out:?} ({status}), sent {}",
            sha256_bytes(&data)
        );
        Ok(())
    })();
    (up, down)
}
