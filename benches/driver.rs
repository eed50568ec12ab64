//! The NixOS test driver's view of a machine: from starting its start script to the first
//! successful `succeed("true")`, then `shutdown()` until the script exits, for nixvm and for
//! QEMU as qemu-vm.nix runs it (q35, KVM, `-cpu max`, a user-mode NIC), same systemd guest
//! (Debian trixie from `resources/systemd-guest.sh`, whose backdoor unit is NixOS's), same run,
//! once with Debian's own initrd and once with one holding only what a NixOS VM's has.
//!
//! Each run does what the driver's `start()` and `succeed()` do: listens on the monitor and
//! the shell sockets, runs `sh -c "<script> -qmp unix:…,server=on,wait=off -monitor unix:…
//! -chardev socket,id=shell,path=… -device virtio-serial -device virtconsole,chardev=shell
//! -device virtio-rng-pci -serial stdio"` in a state directory with TMPDIR, SHARED_DIR and
//! USE_TMPDIR set, accepts the monitor and reads to `(qemu) `, negotiates QMP, accepts the
//! shell, waits for the backdoor's banner and runs `true` with the driver's protocol (output
//! base64 on a line, then `${PIPESTATUS[0]}`). `shutdown()`: `poweroff` on the shell, then the
//! script's exit.
//!
//! Second table: a two-machine test on one vlan, as the driver runs one (a `vde_switch`, each
//! machine's NIC on it with the driver's MAC): the busybox test guests start together, set an
//! address, ping each other and power off; from the start to both exits. QEMU as qemu-vm.nix
//! runs it (q35, `-device virtio-net-pci,netdev=…,mac=… -netdev vde,…,sock=…`).
//!
//! `cargo bench -p nixvm --bench driver`; NIXVM_BENCH_RUNS (default 3) rounds, the VMMs in
//! turn. Where /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;

use common::{Result, Route, git_commit, stats};

/// The backdoor's banner (NixOS's test instrumentation prints it on hvc0).
const BANNER: &str = "Spawning backdoor root shell...";
const TIMEOUT: Duration = Duration::from_secs(600);
/// A test node's: nixpkgs' test-instrumentation.nix adds clocksource=acpi_pm to every node.
const CMDLINE: &str = "console=ttyS0 root=/dev/vda rw quiet panic=-1 clocksource=acpi_pm";

struct Vmm {
    name: &'static str,
    /// The start script's body: runs the VMM on `root.img` (in the state directory) with the
    /// options it is given after its own.
    script: String,
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("driver bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<()> {
    let root = common::root();
    let guest = root.join("target/systemd-guest");
    let dir = root.join("target/driver-bench");
    if std::env::var_os("NIXVM_BENCH_INSIDE").is_none() {
        // Built on the host (it needs Debian's mirror); L1 sees the tree read-only.
        let assets = common::build_assets()?;
        std::fs::create_dir_all(&dir)?;
        for me in [1, 2] {
            let script = PING
                .replace("ME", &me.to_string())
                .replace("PEER", &(3 - me).to_string());
            common::script_disk(&dir.join(format!("ping{me}.img")), &script)?;
        }
        if common::build_systemd_guest(&assets)?.is_none() {
            println!("skipped: resources/systemd-guest.sh could not build the guest");
            return Ok(());
        }
    }
    match common::route()? {
        Route::Here => {
            let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(3), |n| n.parse())?;
            // Both tables, even when the first has failed runs.
            let machine = measure(&root, &guest, runs);
            measure_vlan(&root, &dir, runs).and(machine)
        }
        Route::Skipped(why) => {
            println!("skipped: {why}");
            Ok(())
        }
        Route::RanInL1(code) => std::process::exit(code),
    }
}

/// The guest's two initrds (`resources/systemd-guest.sh`): Debian's with `MODULES=most`, and
/// the same with only the modules a NixOS VM's initrd has (NixOS's qemu-guest profile), whose
/// own share of the boot is nearer a NixOS test node's.
const INITRDS: [(&str, &str); 2] = [
    ("Debian's initrd", "initrd.img"),
    ("NixOS-sized initrd", "initrd-small.img"),
];

/// The start scripts of nixvm and of QEMU as qemu-vm.nix runs it, booting `initrd`: one vCPU
/// and 1 GiB (qemu-vm.nix's defaults, virtualisation.cores and memorySize).
fn vmms(kernel: &Path, initrd: &Path) -> [Vmm; 2] {
    let (k, i) = (kernel.display(), initrd.display());
    [
        Vmm {
            name: "nixvm",
            script: format!(
                "exec {} --kernel {k} --initrd {i} --cmdline '{CMDLINE}' --cpus 1 --memory 1G \
                 --disk path=root.img --net local -- \"$@\"",
                env!("CARGO_BIN_EXE_nixvm")
            ),
        },
        Vmm {
            name: "QEMU q35 (qemu-vm.nix's)",
            script: format!(
                "exec qemu-system-x86_64 -machine q35,accel=kvm -cpu max -name trixie -m 1024 \
                 -smp 1 -device virtio-rng-pci -net nic,netdev=user.0,model=virtio \
                 -netdev user,id=user.0 -kernel {k} -initrd {i} -append '{CMDLINE}' \
                 -drive file=root.img,if=virtio,format=raw,cache=writeback,werror=report \"$@\""
            ),
        },
    ]
}

fn measure(root: &Path, guest: &Path, runs: usize) -> Result<()> {
    let commit = git_commit(root).or_else(|| std::env::var("NIXVM_BENCH_COMMIT").ok());
    let kernel = root.join("target/e2e-assets/vmlinuz");
    let setups: Vec<[Vmm; 2]> = INITRDS
        .iter()
        .map(|(_, file)| vmms(&kernel, &guest.join(file)))
        .collect();
    // State directories in L1's own /tmp (the host's tree is read-only there).
    let tmp = std::env::temp_dir().join(format!("nixvm-driver-bench-{}", std::process::id()));
    // [initrd][vmm][row]
    let mut results = vec![[[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]]; INITRDS.len()];
    let mut failed = vec![[0usize; 2]; INITRDS.len()];
    for round in 1..=runs {
        for (n, (initrd, _)) in INITRDS.iter().enumerate() {
            for (v, vmm) in setups[n].iter().enumerate() {
                let dir = tmp.join(format!("{n}-{v}-{round}"));
                match run(vmm, guest, &dir) {
                    Ok((first, exit)) => {
                        eprintln!(
                            "driver bench: {} ({initrd}) round {round}: first succeed {first:.2} s, \
                             exit {exit:.2} s",
                            vmm.name
                        );
                        results[n][v][0].push(first);
                        results[n][v][1].push(exit);
                    }
                    Err(e) => {
                        eprintln!(
                            "driver bench: {} ({initrd}) round {round} failed: {e}",
                            vmm.name
                        );
                        failed[n][v] += 1;
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    common::header(commit.as_deref())?;
    let sizes: Vec<String> = INITRDS
        .iter()
        .map(|(name, file)| {
            let mb = std::fs::metadata(guest.join(file)).map_or(0, |m| m.len()) as f64 / 1e6;
            format!("{name} {mb:.1} MB")
        })
        .collect();
    println!(
        "- guest: Debian trixie (systemd 257) from resources/systemd-guest.sh, 1 vCPU, 1 GiB, \
         cmdline `{CMDLINE}`; initrds: {}",
        sizes.join(", ")
    );
    println!("- {runs} rounds, the initrds and VMMs in turn\n");
    let names = setups[0].each_ref().map(|v| v.name);
    println!(
        "| median (min–max) | {} | nixvm / {} |",
        names.join(" | "),
        names[1]
    );
    println!("|---|---|---|---|");
    for (n, (initrd, _)) in INITRDS.iter().enumerate() {
        for (row, label) in ["start → first succeed", "start → exit after shutdown()"]
            .iter()
            .enumerate()
        {
            let s = results[n].each_ref().map(|r| stats(r[row].clone()));
            println!(
                "| {label}, {initrd} | {} | {} | {} |",
                cell(s[0]),
                cell(s[1]),
                ratio(s[0], s[1])
            );
        }
    }
    // A VMM's runs that ended well, for each initrd in turn.
    let ok = |v: usize| {
        let counts: Vec<String> = failed
            .iter()
            .map(|f| format!("{}/{runs}", runs - f[v]))
            .collect();
        counts.join(" / ")
    };
    println!(
        "| runs ok ({}) | {} | {} | |",
        INITRDS.map(|(name, _)| name).join(" / "),
        ok(0),
        ok(1)
    );
    if failed.iter().flatten().any(|&f| f > 0) {
        return Err("some runs failed".into());
    }
    Ok(())
}

/// One machine started and used as the driver does; the seconds to the first successful
/// command and to the script's exit after `poweroff`.
fn run(vmm: &Vmm, guest: &Path, dir: &Path) -> Result<(f64, f64)> {
    std::fs::create_dir_all(dir.join("shared"))?;
    common::images::copy_sparse(&guest.join("root.img"), &dir.join("root.img"))?;
    let script = dir.join("run-trixie-vm");
    std::fs::write(&script, format!("#!/bin/sh\n{}\n", vmm.script))?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let (qmp, monitor, shell) = (dir.join("qmp"), dir.join("monitor"), dir.join("shell"));
    let mon_l = UnixListener::bind(&monitor)?;
    let shell_l = UnixListener::bind(&shell)?;
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} -qmp unix:{},server=on,wait=off -monitor unix:{} -chardev socket,id=shell,path={} \
             -device virtio-serial -device virtconsole,chardev=shell -device virtio-rng-pci \
             -serial stdio",
            script.display(),
            qmp.display(),
            monitor.display(),
            shell.display()
        ))
        .current_dir(dir)
        .env("TMPDIR", dir)
        .env("SHARED_DIR", dir.join("shared"))
        .env("USE_TMPDIR", "1")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(dir.join("console"))?)
        .stderr(std::fs::File::create(dir.join("stderr"))?)
        .spawn()?;
    let used = (|| -> Result<(f64, f64)> {
        let mut m = accept(&mon_l, &mut child)?;
        read_until(&mut m, "(qemu) ")?;
        qmp_handshake(&qmp)?;
        let sh = accept(&shell_l, &mut child)?;
        let mut r = BufReader::new(sh);
        let mut line = String::new();
        while !line.contains(BANNER) {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err("the shell closed before the backdoor's banner".into());
            }
        }
        r.get_mut().write_all(
            b"timeout 900 bash -c 'true' | (base64 -w 0; echo)\necho ${PIPESTATUS[0]}\n",
        )?;
        let (mut out, mut status) = (String::new(), String::new());
        r.read_line(&mut out)?;
        r.read_line(&mut status)?;
        if status.trim() != "0" {
            return Err(format!("`true` on the backdoor: status {status:?}").into());
        }
        let first = start.elapsed().as_secs_f64();
        r.get_mut().write_all(b"poweroff\n")?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = child.try_wait()? {
                if !s.success() {
                    return Err(format!("the start script ended with {s}").into());
                }
                return Ok((first, start.elapsed().as_secs_f64()));
            }
            if Instant::now() > deadline {
                return Err("no exit after poweroff".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    if used.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        for (what, n) in [("console", 40), ("stderr", 10)] {
            let text = std::fs::read_to_string(dir.join(what)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(n).collect();
            eprintln!("driver bench: its {what} ends with:");
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
    }
    used
}

/// A table cell: median seconds with min and max, or a dash without runs.
fn cell(s: Option<(f64, f64, f64)>) -> String {
    s.map_or("–".to_owned(), |(med, lo, hi)| {
        format!("{med:.2} s ({lo:.2}–{hi:.2})")
    })
}

/// nixvm's median over QEMU's, in bold, or a dash.
fn ratio(nixvm: Option<(f64, f64, f64)>, qemu: Option<(f64, f64, f64)>) -> String {
    match (nixvm, qemu) {
        (Some((a, _, _)), Some((b, _, _))) => format!("**{:.2}**", a / b),
        _ => "–".to_owned(),
    }
}

/// Each machine of the vlan test: an address, a ping to the other until it answers.
const PING: &str = r#"
ip link set lo up
ip addr add 10.88.0.ME/24 dev eth0
ip link set eth0 up
r=failed
for i in $(seq 300); do ping -c 1 -W 1 10.88.0.PEER >/dev/null 2>&1 && { r=ok; break; }; done
echo "NIXVM-TEST: ping=$r"
# The other may still be waiting for this one's answer.
sleep 2
"#;

/// The two-machine vlan test, nixvm and QEMU in turn.
fn measure_vlan(root: &Path, dir: &Path, runs: usize) -> Result<()> {
    let assets = root.join("target/e2e-assets");
    let (kernel, initrd) = (assets.join("vmlinuz"), assets.join("initramfs.cpio.gz"));
    let cmdline = "console=ttyS0 quiet nixvm.action=script";
    let tmp = std::env::temp_dir().join(format!("nixvm-vlan-bench-{}", std::process::id()));
    let switch = tmp.join("vde1.ctl");
    let machine = |vmm: usize, me: u8| -> Command {
        let mac = format!("52:54:00:12:01:0{me}");
        let script = dir.join(format!("ping{me}.img"));
        if vmm == 0 {
            let mut c = Command::new(env!("CARGO_BIN_EXE_nixvm"));
            c.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd);
            c.args(["--cmdline", cmdline, "--cpus", "1", "--memory", "256M"]);
            c.arg("--net")
                .arg(format!("vde={},mac={mac}", switch.display()));
            c.arg("--disk")
                .arg(format!("path={},readonly=on", script.display()));
            c
        } else {
            let mut c = Command::new("qemu-system-x86_64");
            c.args("-machine q35,accel=kvm -cpu max -m 256 -smp 1 -display none".split(' '));
            c.args("-no-reboot -serial stdio -monitor none".split(' '));
            c.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd);
            c.args(["-append", cmdline, "-device"]);
            c.arg(format!("virtio-net-pci,netdev=vlan1,mac={mac}"));
            c.arg("-netdev")
                .arg(format!("vde,id=vlan1,sock={}", switch.display()));
            c.arg("-drive").arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                script.display()
            ));
            c
        }
    };
    let names = ["nixvm", "QEMU q35 (qemu-vm.nix's)"];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut failed = [0usize; 2];
    for round in 1..=runs {
        for (v, name) in names.iter().enumerate() {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)?;
            match vlan_round(&switch, [machine(v, 1), machine(v, 2)]) {
                Ok(t) => {
                    eprintln!("driver bench: vlan, {name} round {round}: {t:.2} s");
                    results[v].push(t);
                }
                Err(e) => {
                    eprintln!("driver bench: vlan, {name} round {round} failed: {e}");
                    failed[v] += 1;
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "\nTwo machines on one vlan (`vde_switch`), busybox test guests, 1 vCPU, 256 MiB each, \
         cmdline `{cmdline}`: both started at once, each pings the other and powers off.\n"
    );
    println!(
        "| median (min–max) | {} | {} | nixvm / QEMU |",
        names[0], names[1]
    );
    println!("|---|---|---|---|");
    let (a, b) = (stats(results[0].clone()), stats(results[1].clone()));
    println!(
        "| start → both pinged and exited | {} | {} | {} |",
        cell(a),
        cell(b),
        ratio(a, b)
    );
    println!(
        "| runs ok | {}/{runs} | {}/{runs} | |",
        runs - failed[0],
        runs - failed[1]
    );
    if failed.iter().any(|&f| f > 0) {
        return Err("some vlan runs failed".into());
    }
    Ok(())
}

/// A `vde_switch` at `switch`, the two machines started at once; the seconds until both
/// have said their ping worked and exited 0.
fn vlan_round(switch: &Path, machines: [Command; 2]) -> Result<f64> {
    let mut vde = Command::new("vde_switch")
        .arg("-s")
        .arg(switch)
        .args(["--dirmode", "0700"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !switch.join("ctl").exists() {
        if Instant::now() > deadline {
            let _ = vde.kill();
            return Err("vde_switch made no ctl socket".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    let mut children = Vec::new();
    for (i, mut m) in machines.into_iter().enumerate() {
        let mut child = m
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if l.contains("NIXVM-TEST: ping=") {
                    let _ = tx.send((i, l));
                }
            }
        });
        children.push(child);
    }
    let result = (|| -> Result<f64> {
        for _ in 0..2 {
            let (i, l) = rx.recv_timeout(TIMEOUT)?;
            if !l.contains("ping=ok") {
                return Err(format!("machine {}: {l}", i + 1).into());
            }
        }
        for c in &mut children {
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if let Some(s) = c.try_wait()? {
                    if !s.success() {
                        return Err(format!("a machine ended with {s}").into());
                    }
                    break;
                }
                if Instant::now() > deadline {
                    return Err("a machine did not exit".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(start.elapsed().as_secs_f64())
    })();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = vde.kill();
    let _ = vde.wait();
    result
}

/// The VMM's connection to `l`, waiting while the start script runs.
fn accept(l: &UnixListener, child: &mut Child) -> Result<UnixStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                return Ok(s);
            }
            Err(_) if Instant::now() < deadline => {
                if let Some(s) = child.try_wait()? {
                    return Err(format!("the start script ended with {s} before connecting").into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("nothing connected to {l:?}: {e}").into()),
        }
    }
}

fn read_until(s: &mut UnixStream, want: &str) -> Result<()> {
    let mut seen = Vec::new();
    let mut b = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains(want) {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(format!("closed before {want:?}").into());
        }
        seen.extend_from_slice(&b[..n]);
    }
    Ok(())
}

/// The driver's QMP start: connect, read the greeting, `qmp_capabilities`.
fn qmp_handshake(path: &PathBuf) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("QMP {}: {e}", path.display()).into()),
        }
    };
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.contains("QMP") {
        return Err(format!("QMP greeting: {line:?}").into());
    }
    r.get_mut()
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
    line.clear();
    r.read_line(&mut line)?;
    if !line.contains("return") {
        return Err(format!("qmp_capabilities: {line:?}").into());
    }
    Ok(())
}
