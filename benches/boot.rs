//! Boot benchmark: nixvm beside QEMU microvm and, when `CLOUD_HYPERVISOR=` and
//! `FIRECRACKER=` name their binaries, Cloud Hypervisor and Firecracker: same guest, same run.
//!
//! `cargo bench -p nixvm --bench boot`. NIXVM_BENCH_RUNS (default 6) boots of each VMM,
//! interleaved: process spawn → the guest init's `NIXVM-TEST: init` line, spawn → exit,
//! nixvm's own setup time (its `first KVM_RUN` log line), the child's peak RSS and, where the
//! kernel's debugfs is readable (it is mounted if need be), KVM's count of the VM's exits by
//! kind. Where /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[path = "common.rs"]
mod common;

use common::{KVM_STATS, Result, git_commit, output, stats};

const MARKER: &str = "NIXVM-TEST: init";
const CMDLINE: &str = "console=ttyS0 quiet nixvm.action=poweroff";
/// Firecracker ends when the guest reboots, not when it powers off.
const FC_CMDLINE: &str = "console=ttyS0 quiet nixvm.action=reboot reboot=k panic=1";
const TIMEOUT: Duration = Duration::from_secs(120);

/// The table's rows: name, unit, and whether to print ratios; then one row per KVM counter.
const ROWS: [(&str, &str, bool); 4] = [
    ("boot → init", "s", true),
    ("total (spawn → exit)", "s", false),
    ("setup (start → first KVM_RUN)", "ms", false),
    ("peak RSS", "MiB", true),
];

/// One boot of one VMM: its values for ROWS and KVM_STATS, and why it failed.
struct Run {
    values: Vec<Option<f64>>,
    failure: Option<String>,
}

/// A VMM compared: a column of the table.
struct Vmm {
    name: &'static str,
    command: Command,
    runs: Vec<Run>,
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("boot bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no root")?;
    let assets = root.join("target/e2e-assets");
    if std::env::var_os("NIXVM_BENCH_INSIDE").is_some() {
        return measure(root, &assets);
    }
    let built = Command::new(root.join("resources/assets.sh"))
        .arg(&assets)
        .status()?;
    if !built.success() {
        return Err(format!("resources/assets.sh failed: {built}").into());
    }
    let route = output(&mut Command::new(root.join("resources/kvm-route.sh")))?;
    if let Some(why) = route.strip_prefix("none") {
        println!("skipped: {}", why.trim_start_matches(':').trim());
        return Ok(());
    } else if route != "l1" {
        return measure(root, &assets);
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

fn measure(root: &Path, assets: &Path) -> Result<()> {
    let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(6), |n| n.parse())?;
    common::mount_debugfs();
    let (kernel, initrd) = (assets.join("vmlinux"), assets.join("initramfs.cpio.gz"));
    let mut nixvm = Command::new(env!("CARGO_BIN_EXE_nixvm"));
    nixvm.env("NIXVM_LOG", "info").arg("--kernel").arg(&kernel);
    nixvm
        .arg("--initrd")
        .arg(&initrd)
        .arg("--cmdline")
        .arg(CMDLINE);
    nixvm.args("--cpus 1 --memory 256M --serial stdio".split(' '));
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args("-M microvm,rtc=on -accel kvm -cpu host -m 256 -smp 1 -nodefaults".split(' '));
    qemu.args("-no-reboot -display none -serial stdio -monitor none".split(' '));
    qemu.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd);
    qemu.args(["-append", CMDLINE]);
    let vmm = |name, command| Vmm {
        name,
        command,
        runs: Vec::new(),
    };
    let mut vmms = vec![vmm("nixvm", nixvm), vmm("QEMU microvm", qemu)];
    if let Some(ch) =
        common::cloud_hypervisor("boot", Command::new, &kernel, &initrd, CMDLINE, "size=256M")
    {
        vmms.push(vmm("Cloud Hypervisor", ch));
    }
    match std::env::var_os("FIRECRACKER") {
        Some(p) => {
            let config = std::env::temp_dir().join("nixvm-boot-bench-fc.json");
            let json = |p: &Path| format!("{:?}", p.display().to_string());
            std::fs::write(
                &config,
                format!(
                    r#"{{"boot-source": {{"kernel_image_path": {}, "initrd_path": {}, "boot_args": "{FC_CMDLINE}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 256}}, "drives": []}}"#,
                    json(&kernel),
                    json(&initrd)
                ),
            )?;
            let mut fc = Command::new(p);
            fc.arg("--no-api").arg("--config-file").arg(&config);
            vmms.push(vmm("Firecracker", fc));
        }
        None => eprintln!("boot bench: FIRECRACKER is not set: no Firecracker column"),
    }

    for i in 1..=runs {
        for v in &mut vmms {
            let run = boot(&mut v.command)?;
            let [init, total] = [0, 1].map(|n| run.values[n].unwrap_or_default());
            match &run.failure {
                Some(why) => eprintln!("run {i} {}: FAILED: {why}", v.name),
                None => eprintln!("run {i} {}: init {init:.2} s, exit {total:.2} s", v.name),
            }
            v.runs.push(run);
        }
    }

    header(root, assets, runs)?;
    for v in &vmms {
        println!("- {}: `{}`", v.name, common::command_line(&v.command, root));
    }
    println!();
    table(&vmms);
    let all: usize = vmms.iter().map(|v| v.runs.len()).sum();
    let failed = all - vmms.iter().map(|v| ok(&v.runs).count()).sum::<usize>();
    if failed > 0 {
        return Err(format!("{failed} of {all} runs failed").into());
    }
    Ok(())
}

/// Runs `cmd` ([`common::run_vm`]): the time to the init marker and to its exit, nixvm's
/// set-up time and the peak RSS.
fn boot(cmd: &mut Command) -> Result<Run> {
    let mut c = common::run_vm(cmd, TIMEOUT, &[MARKER], common::Done::Exit)?;
    let boot = c.seen[0];
    if boot.is_none() {
        c.fail(format!("no `{MARKER}` line"));
    }
    // nixvm logs "vcpu0: first KVM_RUN <N> ms after start".
    let setup_ms = c.stderr.lines().find_map(|l| {
        let rest = l.split("first KVM_RUN ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    });
    // ru_maxrss is in KiB on Linux.
    let rss_mib = c.max_rss_kib as f64 / 1024.0;
    let secs = |d: Duration| d.as_secs_f64();
    let mut values = vec![boot.map(secs), Some(secs(c.total)), setup_ms, Some(rss_mib)];
    values.extend(KVM_STATS.iter().map(|(file, _)| {
        c.kvm
            .iter()
            .find(|(f, _)| f == file)
            .map(|(_, n)| *n as f64)
    }));
    Ok(Run {
        values,
        failure: c.failure,
    })
}

/// The facts around the table: when, where, what.
fn header(root: &Path, assets: &Path, runs: usize) -> Result<()> {
    let commit = git_commit(root).or_else(|| std::env::var("NIXVM_BENCH_COMMIT").ok());
    let kver = std::fs::read_to_string(assets.join("kver")).unwrap_or_default();
    common::header(commit.as_deref())?;
    println!(
        "- guest: Debian {} vmlinux (PVH), busybox initramfs, 1 vCPU, 256 MiB",
        kver.trim()
    );
    println!(
        "- cmdline: `{CMDLINE}` (Firecracker: `{FC_CMDLINE}`); {runs} runs of each VMM, interleaved"
    );
    Ok(())
}

/// Prints the Markdown table, nixvm first, then each other VMM, then nixvm / each other;
/// failed runs are left out of the statistics, and counters no run had are left out.
fn table(vmms: &[Vmm]) {
    let others = &vmms[1..];
    let names: Vec<&str> = vmms.iter().map(|v| v.name).collect();
    let ratios: Vec<String> = others
        .iter()
        .map(|v| format!("nixvm / {}", v.name))
        .collect();
    println!(
        "| median (min–max) | {} | {} |",
        names.join(" | "),
        ratios.join(" | ")
    );
    println!("|---|{}", "---|".repeat(vmms.len() + others.len()));
    let rows = ROWS
        .into_iter()
        .chain(KVM_STATS.iter().map(|(_, name)| (*name, "", true)));
    for (row, (name, unit, ratio)) in rows.enumerate() {
        let cells: Vec<Option<(f64, f64, f64)>> = vmms
            .iter()
            .map(|v| stats(ok(&v.runs).filter_map(|r| r.values[row]).collect()))
            .collect();
        if row >= ROWS.len() && cells.iter().all(Option::is_none) {
            continue;
        }
        let show = |s: &Option<(f64, f64, f64)>| match *s {
            Some((m, lo, hi)) if unit == "s" => format!("{m:.2} s ({lo:.2}–{hi:.2})"),
            Some((m, lo, hi)) if unit.is_empty() => format!("{m:.0} ({lo:.0}–{hi:.0})"),
            Some((m, lo, hi)) => format!("{m:.1} {unit} ({lo:.1}–{hi:.1})"),
            None => "–".into(),
        };
        let shown: Vec<String> = cells.iter().map(show).collect();
        let r: Vec<String> = cells[1..]
            .iter()
            .map(|other| match (cells[0], other) {
                (Some((x, ..)), Some((y, ..))) if ratio && *y > 0.0 => format!("**{:.2}**", x / y),
                _ => String::new(),
            })
            .collect();
        println!("| {name} | {} | {} |", shown.join(" | "), r.join(" | "));
    }
    let counts: Vec<String> = vmms
        .iter()
        .map(|v| format!("{}/{}", ok(&v.runs).count(), v.runs.len()))
        .collect();
    println!(
        "| runs ok | {} | {} |",
        counts.join(" | "),
        vec![""; others.len()].join(" | ")
    );
}

/// The runs that succeeded.
fn ok(runs: &[Run]) -> impl Iterator<Item = &Run> {
    runs.iter().filter(|r| r.failure.is_none())
}
