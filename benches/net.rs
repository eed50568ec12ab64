//! Network benchmark: nixvm's virtio-net beside QEMU microvm's, same guest, same TAP, same run.
//!
//! `cargo bench -p nixvm --bench net`. NIXVM_BENCH_RUNS (default 3) runs of each VMM,
//! interleaved. Each run boots the guest with one NIC on a TAP (created `vnet_hdr`) in a
//! network namespace whose side of the link is 10.77.0.1/24, where `iperf3 -s` listens; the
//! guest (10.77.0.2, iperf3 from this host's Debian package added to its initramfs) measures
//! TCP throughput guest → host and host → guest (`iperf3 -c`, `-R`), SECONDS each, and the
//! round-trip time of 20 pings. QEMU runs with `vhost=off` (its own virtio-net, in user space
//! like nixvm's) and, where /dev/vhost-net exists, with `vhost=on` (the kernel's vhost-net);
//! Cloud Hypervisor (its virtio-net in user space) when `CLOUD_HYPERVISOR=` names its binary;
//! NIXVM_BENCH_SETUPS (parts of the columns' names, comma-separated) for only some of them.
//! Where /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).
//! Needs root (network namespaces); installs Debian's iperf3 when there is none.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[path = "common.rs"]
mod common;

use common::{Result, git_commit, output, stats};
use common::{command_line, path_arg};

const CMDLINE: &str = "console=ttyS0 quiet nixvm.action=script";
const TIMEOUT: Duration = Duration::from_secs(240);
/// Seconds of each iperf3 test (after one omitted second of slow start).
const SECONDS: u32 = 5;
/// The network namespace of the runs (a stale one of that name is deleted first).
const NETNS: &str = "nixvm-bench-net";
/// The TAP in it, reused by every run.
const TAP: &str = "nbtap0";
/// What the guest runs (from its script disk). SECONDS is replaced.
const SCRIPT: &str = r#"
ip link set lo up
ip addr add 10.77.0.2/24 dev eth0
ip link set eth0 up
# The link and the host's ARP entry: up to 60 tries.
n=0
until ping -c 1 -W 1 10.77.0.1 >/dev/null 2>&1; do
  n=$((n + 1))
  if [ $n -ge 60 ]; then echo "NIXVM-BENCH: error=no ping reply from 10.77.0.1"; exit 0; fi
done
ping -c 20 -i 0.2 10.77.0.1 > /tmp/ping 2>&1
cat /tmp/ping
awk '/packets received/ { print "NIXVM-BENCH: ping_received=" $4 }
  /min\/avg\/max/ { split($4, t, "/")
    print "NIXVM-BENCH: ping_min_ms=" t[1]; print "NIXVM-BENCH: ping_avg_ms=" t[2] }' /tmp/ping
# tcp KEY [ARGS]: one iperf3 test; KEY= the receiver's Mbit/s.
tcp() {
  key=$1
  shift
  echo "NIXVM-BENCH: start=$key"
  iperf3 -c 10.77.0.1 -t SECONDS -O 1 -f m --connect-timeout 10000 "$@" > /tmp/iperf 2>&1
  rc=$?
  cat /tmp/iperf
  if [ $rc -ne 0 ]; then echo "NIXVM-BENCH: error=iperf3 $* exited with $rc"; return; fi
  awk -v k="$key" '/receiver/ { for (i = 2; i <= NF; i++)
    if ($i == "Mbits/sec") print "NIXVM-BENCH: " k "=" $(i - 1) }' /tmp/iperf
}
tcp up_mbits
tcp down_mbits -R
echo "NIXVM-BENCH: done"
"#;

/// The table's rows: name, unit, and the key of the guest's `NIXVM-BENCH: key=value` line.
const ROWS: [(&str, &str, &str); 4] = [
    ("TCP guest → host", "Mbit/s", "up_mbits"),
    ("TCP host → guest", "Mbit/s", "down_mbits"),
    ("ping RTT avg", "ms", "ping_avg_ms"),
    ("ping RTT min", "ms", "ping_min_ms"),
];

/// One run of the guest by one VMM: its values for ROWS, and why it failed.
struct Run {
    values: Vec<Option<f64>>,
    failure: Option<String>,
    /// KVM's counters for the whole run, for the run's line ([`common::KVM_STATS`]).
    kvm: String,
}

/// The files the runs share, all under target/net-bench.
struct Files {
    /// A copy of the nixvm binary this bench was built with: the checkout's target/ may be
    /// rebuilt from other sources while the runs wait for the L1 guest.
    nixvm: PathBuf,
    /// The test guest's initramfs with iperf3 and its libraries added.
    initrd: PathBuf,
    /// The script disk: the guest's only disk.
    script: PathBuf,
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("net bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no root")?;
    let assets = root.join("target/e2e-assets");
    let dir = root.join("target/net-bench");
    let files = Files {
        nixvm: dir.join("nixvm"),
        initrd: dir.join("initramfs.cpio.gz"),
        script: dir.join("script.img"),
    };
    if std::env::var_os("NIXVM_BENCH_INSIDE").is_some() {
        return measure(root, &assets, &files);
    }
    let built = Command::new(root.join("resources/assets.sh"))
        .arg(&assets)
        .status()?;
    if !built.success() {
        return Err(format!("resources/assets.sh failed: {built}").into());
    }
    install_iperf3()?;
    prepare(&assets, &dir, &files)?;
    let route = output(&mut Command::new(root.join("resources/kvm-route.sh")))?;
    if let Some(why) = route.strip_prefix("none") {
        println!("skipped: {}", why.trim_start_matches(':').trim());
        return Ok(());
    } else if route != "l1" {
        return measure(root, &assets, &files);
    }
    // Run this very executable again inside L1; l1run.sh exports the NIXVM_* variables.
    let mut l1 = Command::new(root.join("resources/l1run.sh"));
    l1.current_dir(root).arg("--").arg(std::env::current_exe()?);
    let host = output(Command::new("uname").arg("-r"))?;
    l1.env("NIXVM_BENCH_INSIDE", "1")
        .env("NIXVM_BENCH_ROUTE", "l1");
    l1.env("NIXVM_BENCH_HOST_KERNEL", host);
    if let Some(commit) = git_commit(root) {
        l1.env("NIXVM_BENCH_COMMIT", commit);
    }
    std::process::exit(l1.status()?.code().unwrap_or(125));
}

/// Installs Debian's iperf3 unless there is one (the L1 guest sees this host's / read-only).
fn install_iperf3() -> Result<()> {
    if which("iperf3").is_ok() {
        return Ok(());
    }
    eprintln!("net bench: installing iperf3 (apt-get)");
    let mut apt = Command::new("apt-get");
    apt.env("DEBIAN_FRONTEND", "noninteractive");
    let status = apt.args(["install", "-y", "-q", "iperf3"]).status()?;
    if !status.success() {
        return Err(format!("apt-get install iperf3 failed ({status}): it needs root").into());
    }
    Ok(())
}

/// The path of the executable `name` on PATH.
fn which(name: &str) -> Result<PathBuf> {
    let found = Command::new("sh")
        .args(["-c", "command -v \"$0\"", name])
        .output()?;
    let path = String::from_utf8(found.stdout)?.trim().to_string();
    if !found.status.success() || !path.starts_with('/') {
        return Err(format!("no {name} on PATH").into());
    }
    Ok(PathBuf::from(path))
}

/// Builds the initramfs with iperf3 and the script disk.
fn prepare(assets: &Path, dir: &Path, files: &Files) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(&files.nixvm);
    std::fs::copy(env!("CARGO_BIN_EXE_nixvm"), &files.nixvm)?;
    // iperf3 and every library ldd names (the loader included), at their own paths, in a
    // second newc archive after the first: the kernel unpacks both.
    let iperf3 = which("iperf3")?;
    let libs = output(Command::new("ldd").arg(&iperf3))?;
    let mut paths = vec![iperf3];
    for line in libs.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", "/lib64/ld-linux-….so.2 (0x…)"
        let path = line
            .split("=>")
            .last()
            .and_then(|s| s.split_whitespace().next());
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            paths.push(PathBuf::from(path));
        }
    }
    let tree = dir.join("cpio");
    let _ = std::fs::remove_dir_all(&tree);
    for path in &paths {
        let to = tree.join(path.strip_prefix("/")?);
        std::fs::create_dir_all(to.parent().ok_or("no parent")?)?;
        // Through symlinks: the file's contents under the name the loader looks for.
        std::fs::copy(path, &to)?;
    }
    let pack = "find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1";
    let extra = Command::new("sh")
        .args(["-c", pack])
        .current_dir(&tree)
        .output()?;
    if !extra.status.success() || extra.stdout.is_empty() {
        let err = String::from_utf8_lossy(&extra.stderr);
        return Err(format!("packing iperf3 failed: {}", err.trim()).into());
    }
    let mut initrd = std::fs::read(assets.join("initramfs.cpio.gz"))?;
    initrd.extend_from_slice(&extra.stdout);
    std::fs::write(&files.initrd, initrd)?;

    // Padded with newlines to 64 KiB, so that the kernel's partition probes stay inside it.
    let mut disk = SCRIPT.replace("SECONDS", &SECONDS.to_string()).into_bytes();
    disk.resize(64 << 10, b'\n');
    std::fs::write(&files.script, disk)?;
    Ok(())
}

/// The network namespace with the TAP; deleted (TAP and all) when dropped.
struct NetNs;

impl NetNs {
    fn new() -> Result<NetNs> {
        let _ = Command::new("ip")
            .args(["netns", "del", NETNS])
            .stderr(Stdio::null())
            .status();
        output(Command::new("ip").args(["netns", "add", NETNS]))?;
        let ns = NetNs;
        let ip = |args: &str| output(Command::new("ip").args(["-n", NETNS]).args(args.split(' ')));
        ip("link set lo up")?;
        ip(&format!("tuntap add {TAP} mode tap vnet_hdr"))?;
        ip(&format!("addr add 10.77.0.1/24 dev {TAP}"))?;
        ip(&format!("link set {TAP} up"))?;
        Ok(ns)
    }

    /// `ip netns exec NETNS program`.
    fn command(program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", NETNS]).arg(program);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let del = Command::new("ip").args(["netns", "del", NETNS]).status();
        if !del.is_ok_and(|s| s.success()) {
            eprintln!("net bench: could not delete network namespace {NETNS}");
        }
    }
}

/// `iperf3 -s` in the namespace, killed when dropped.
struct Server(Child);

impl Server {
    fn start() -> Result<Server> {
        let mut cmd = NetNs::command("iperf3");
        cmd.arg("-s").stdin(Stdio::null()).stdout(Stdio::null());
        Ok(Server(cmd.stderr(Stdio::null()).spawn()?))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn measure(root: &Path, assets: &Path, files: &Files) -> Result<()> {
    let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(3), |n| n.parse())?;
    // The commit when this bench was built and started (under L1 the runs may begin much
    // later, after other L1 guests, in a checkout that has changed since).
    let commit = std::env::var("NIXVM_BENCH_COMMIT")
        .ok()
        .or_else(|| git_commit(root));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: network namespaces and TAPs need root");
        return Ok(());
    }
    which("iperf3")?;
    common::mount_debugfs();
    let kernel = assets.join("vmlinux");
    let mut nixvm = NetNs::command(&files.nixvm);
    nixvm
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&files.initrd);
    nixvm.args(["--cmdline", CMDLINE]);
    nixvm.args("--cpus 1 --memory 256M --serial stdio --rng off --net".split(' '));
    nixvm.arg(format!("tap={TAP}")).arg("--disk");
    nixvm.arg(path_arg("path=", &files.script, ",readonly=on"));
    nixvm.args(common::nixvm_args());
    let qemu = |vhost: &str| {
        let mut qemu = NetNs::command("qemu-system-x86_64");
        qemu.args("-M microvm,rtc=on -accel kvm -cpu host -m 256 -smp 1 -nodefaults".split(' '));
        qemu.args("-no-reboot -display none -serial stdio -monitor none".split(' '));
        qemu.arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&files.initrd);
        qemu.args(["-append", CMDLINE, "-drive"]);
        qemu.arg(path_arg(
            "file=",
            &files.script,
            ",if=none,id=d0,format=raw,readonly=on",
        ));
        qemu.args(["-device", "virtio-blk-device,drive=d0", "-netdev"]);
        qemu.arg(format!(
            "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}"
        ));
        qemu.args(["-device", "virtio-net-device,netdev=n0"]);
        qemu
    };
    let mut vmms = vec![("nixvm", nixvm), ("QEMU microvm (vhost=off)", qemu("off"))];
    if Path::new("/dev/vhost-net").exists() {
        vmms.push(("QEMU microvm, vhost-net (vhost=on)", qemu("on")));
    } else {
        eprintln!("net bench: no /dev/vhost-net: no vhost=on column");
    }
    let initrd = &files.initrd;
    if let Some(mut ch) = common::cloud_hypervisor(
        "net",
        NetNs::command,
        &kernel,
        initrd,
        CMDLINE,
        (1, "size=256M"),
    ) {
        ch.arg("--net").arg(format!("tap={TAP}")).arg("--disk");
        ch.arg(common::ch_disk(&files.script, ",readonly=on"));
        vmms.push(("Cloud Hypervisor", ch));
    }
    common::only_named("NIXVM_BENCH_SETUPS", &mut vmms, |(name, _)| name)?;
    if vmms[0].0 != "nixvm" {
        return Err("NIXVM_BENCH_SETUPS must keep nixvm: the ratios are nixvm's".into());
    }

    let ns = NetNs::new()?;
    let mut results: Vec<Vec<Run>> = vmms.iter().map(|_| Vec::new()).collect();
    for i in 1..=runs {
        for ((name, cmd), results) in vmms.iter_mut().zip(&mut results) {
            let server = Server::start()?;
            let run = run(cmd);
            drop(server);
            let run = run?;
            match &run.failure {
                Some(why) => eprintln!("run {i} {name}: FAILED: {why}"),
                None => {
                    let v: Vec<f64> = run.values.iter().map(|v| v.unwrap_or_default()).collect();
                    eprintln!(
                        "run {i} {name}: up {:.1} Mbit/s, down {:.1} Mbit/s, ping avg {:.3} ms; \
                         KVM: {}",
                        v[0], v[1], v[2], run.kvm
                    );
                }
            }
            results.push(run);
        }
    }
    drop(ns);

    header(assets, runs, commit.as_deref())?;
    for (name, cmd) in &vmms {
        println!("- {name}: `{}`", command_line(cmd, root));
    }
    println!();
    table(&vmms.iter().map(|(n, _)| *n).collect::<Vec<_>>(), &results);
    let total: usize = results.iter().map(Vec::len).sum();
    let failed = total - results.iter().map(|r| ok(r).count()).sum::<usize>();
    if failed > 0 {
        return Err(format!("{failed} of {total} runs failed").into());
    }
    Ok(())
}

/// Runs `cmd` ([`common::run_vm`]) and reads the rows' values from its marks.
fn run(cmd: &mut Command) -> Result<Run> {
    let mut c = common::run_vm(cmd, TIMEOUT, &[], common::Done::Mark)?;
    let values: Vec<Option<f64>> = ROWS.iter().map(|(_, _, key)| c.value(key)).collect();
    let errors = c.errors().join("; ");
    if !errors.is_empty() {
        c.fail(format!("guest: {errors}"));
    } else if values.iter().any(Option::is_none) {
        c.fail(format!("incomplete output: {:?}", c.marks));
    } else if c.value("ping_received").is_some_and(|n| n < 20.0) {
        c.fail(format!("pings lost: {:?}", c.marks));
    }
    Ok(Run {
        values,
        kvm: c.kvm_line(),
        failure: c.failure,
    })
}

/// The facts around the table: when, where, what.
fn header(assets: &Path, runs: usize, commit: Option<&str>) -> Result<()> {
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    let uname = output(Command::new("uname").arg("-r"))?;
    let kver = std::fs::read_to_string(assets.join("kver")).unwrap_or_default();
    let qemu = output(Command::new("qemu-system-x86_64").arg("--version"))?;
    let iperf3 = output(Command::new("iperf3").arg("--version"))?;
    let first = |s: &str| s.lines().next().unwrap_or_default().to_string();
    println!("\n- date: {date}");
    match std::env::var("NIXVM_BENCH_HOST_KERNEL") {
        Ok(host) => println!("- kernel (uname -r): host {host}, L1 {uname}"),
        Err(_) => println!("- kernel (uname -r): {uname}"),
    }
    if common::in_l1() {
        println!("- route: l1, the VMMs and the iperf3 server inside an L1 QEMU guest on");
        println!("  TCG-emulated AMD SVM: absolute figures are far below a real host's");
    } else {
        println!("- route: direct (this host's /dev/kvm)");
    }
    println!("- commit: {}", commit.unwrap_or("unknown"));
    println!(
        "- guest: Debian {} vmlinux (PVH), busybox initramfs + iperf3, 1 vCPU, 256 MiB",
        kver.trim()
    );
    println!(
        "- network: TAP {TAP} (vnet_hdr) in netns {NETNS}, 10.77.0.1/24 ↔ guest eth0 \
         10.77.0.2; `iperf3 -s` in the netns; guest: `iperf3 -c 10.77.0.1 -t {SECONDS} -O 1 \
         -f m` (and `-R`), `ping -c 20 -i 0.2 10.77.0.1`"
    );
    println!("- {}; {}", first(&qemu), first(&iperf3));
    println!("- runs of each: {runs}, interleaved; cmdline `{CMDLINE}`");
    Ok(())
}

/// Prints the Markdown table, one column per VMM and nixvm's ratio to each of the others;
/// failed runs are left out of the statistics.
fn table(names: &[&str], results: &[Vec<Run>]) {
    let others = &names[1..];
    let ratios: Vec<String> = others.iter().map(|n| format!("nixvm / {n}")).collect();
    println!(
        "| median (min–max) | {} | {} |",
        names.join(" | "),
        ratios.join(" | ")
    );
    println!("|---|{}", "---|".repeat(names.len() + others.len()));
    for (row, (name, unit, _)) in ROWS.into_iter().enumerate() {
        let cells: Vec<Option<(f64, f64, f64)>> = results
            .iter()
            .map(|runs| stats(ok(runs).filter_map(|r| r.values[row]).collect()))
            .collect();
        let show = |s: &Option<(f64, f64, f64)>| match s {
            Some((m, lo, hi)) if unit == "ms" => format!("{m:.3} {unit} ({lo:.3}–{hi:.3})"),
            Some((m, lo, hi)) => format!("{m:.0} {unit} ({lo:.0}–{hi:.0})"),
            None => "–".into(),
        };
        let ratio = |y: &Option<(f64, f64, f64)>| match (cells[0], y) {
            (Some((x, ..)), Some((y, ..))) if *y > 0.0 => format!("**{:.2}**", x / y),
            _ => String::new(),
        };
        let shown: Vec<String> = cells.iter().map(show).collect();
        let ratios: Vec<String> = cells[1..].iter().map(ratio).collect();
        println!(
            "| {name} | {} | {} |",
            shown.join(" | "),
            ratios.join(" | ")
        );
    }
    let counts: Vec<String> = results
        .iter()
        .map(|r| format!("{}/{}", ok(r).count(), r.len()))
        .collect();
    println!(
        "| runs ok | {} |{}",
        counts.join(" | "),
        " |".repeat(others.len())
    );
}

/// The runs that succeeded.
fn ok(runs: &[Run]) -> impl Iterator<Item = &Run> {
    runs.iter().filter(|r| r.failure.is_none())
}
