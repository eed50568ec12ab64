//! Boot benchmark: nixvm beside QEMU microvm, same guest, same run.
//!
//! `cargo bench -p nixvm --bench boot`. NIXVM_BENCH_RUNS (default 6) boots of each VMM,
//! interleaved: process spawn → the guest init's `NIXVM-TEST: init` line, spawn → exit,
//! nixvm's own setup time (its `first KVM_RUN` log line) and the child's peak RSS.
//! Where /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[path = "common.rs"]
mod common;

use common::{Result, git_commit, output, stats};

const MARKER: &str = "NIXVM-TEST: init";
const CMDLINE: &str = "console=ttyS0 quiet nixvm.action=poweroff";
const TIMEOUT: Duration = Duration::from_secs(120);

/// The table's rows: name, unit, and whether to print the nixvm/QEMU ratio.
const ROWS: [(&str, &str, bool); 4] = [
    ("boot → init", "s", true),
    ("total (spawn → exit)", "s", false),
    ("setup (start → first KVM_RUN)", "ms", false),
    ("peak RSS", "MiB", true),
];

/// One boot of one VMM: its values for ROWS, and why it failed.
struct Run {
    values: [Option<f64>; 4],
    failure: Option<String>,
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

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        for (name, cmd, results) in [
            ("nixvm", &mut nixvm, &mut ours),
            ("qemu", &mut qemu, &mut theirs),
        ] {
            let run = boot(cmd)?;
            let [init, total, ..] = run.values.map(Option::unwrap_or_default);
            match &run.failure {
                Some(why) => eprintln!("run {i} {name}: FAILED: {why}"),
                None => eprintln!("run {i} {name}: init {init:.2} s, exit {total:.2} s"),
            }
            results.push(run);
        }
    }

    header(root, assets, runs)?;
    table(&ours, &theirs);
    let failed = 2 * runs - ok(&ours).count() - ok(&theirs).count();
    if failed > 0 {
        return Err(format!("{failed} of {} runs failed", 2 * runs).into());
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
    let values = [boot.map(secs), Some(secs(c.total)), setup_ms, Some(rss_mib)];
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
    println!("- cmdline: `{CMDLINE}`; {runs} runs of each VMM, interleaved\n");
    Ok(())
}

/// Prints the Markdown table; failed runs are left out of the statistics.
fn table(ours: &[Run], theirs: &[Run]) {
    println!("| median (min–max) | nixvm | QEMU microvm | nixvm / QEMU |");
    println!("|---|---|---|---|");
    for (row, (name, unit, ratio)) in ROWS.into_iter().enumerate() {
        let cell = |runs: &[Run]| stats(ok(runs).filter_map(|r| r.values[row]).collect());
        let (a, b) = (cell(ours), cell(theirs));
        let show = |s: Option<(f64, f64, f64)>| match s {
            Some((m, lo, hi)) if unit == "s" => format!("{m:.2} s ({lo:.2}–{hi:.2})"),
            Some((m, lo, hi)) => format!("{m:.1} {unit} ({lo:.1}–{hi:.1})"),
            None => "–".into(),
        };
        let r = match (a, b) {
            (Some((x, ..)), Some((y, ..))) if ratio => format!("**{:.2}**", x / y),
            _ => String::new(),
        };
        println!("| {name} | {} | {} | {r} |", show(a), show(b));
    }
    let (n, m) = (ours.len(), theirs.len());
    let (a, b) = (ok(ours).count(), ok(theirs).count());
    println!("| runs ok | {a}/{n} | {b}/{m} | |");
}

/// The runs that succeeded.
fn ok(runs: &[Run]) -> impl Iterator<Item = &Run> {
    runs.iter().filter(|r| r.failure.is_none())
}
