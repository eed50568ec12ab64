//! Boot benchmark: nixvm beside QEMU microvm, same guest, same run.
//!
//! `cargo bench -p nixvm --bench boot`. NIXVM_BENCH_RUNS (default 6) boots of each VMM,
//! interleaved: process spawn → the guest init's `NIXVM-TEST: init` line, spawn → exit,
//! nixvm's own setup time (its `first KVM_RUN` log line) and the child's peak RSS.
//! Where /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

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

/// Spawns `cmd`, times it to the init marker and to its exit, and reaps it with wait4.
fn boot(cmd: &mut Command) -> Result<Run> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let id = child.id();
    let pid = libc::pid_t::try_from(id)?;
    let (tx, rx) = mpsc::channel();
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let out = thread::spawn(move || {
        let mut line = Vec::new();
        while matches!(stdout.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            if String::from_utf8_lossy(&line).contains(MARKER) {
                let _ = tx.send(start.elapsed());
            }
            line.clear();
        }
    });
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let err = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });

    // Kills the child at TIMEOUT; gives up on it 10 s later. Stopped by dropping `done`.
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        let timeout = mpsc::RecvTimeoutError::Timeout;
        if wait.recv_timeout(TIMEOUT) != Err(timeout) {
            return false;
        }
        eprintln!("pid {pid}: timed out after {TIMEOUT:?}, killing it");
        // SAFETY: sending a signal; the child is not reaped before `done` is dropped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if wait.recv_timeout(Duration::from_secs(10)) == Err(timeout) {
            eprintln!("boot bench: pid {pid} survived SIGKILL for 10 s");
            std::process::exit(1);
        }
        true
    });
    // Waits for the exit without reaping: the pid stays ours while the watchdog runs.
    // SAFETY: all-zero bytes are a valid `siginfo_t`, which waitid only writes.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child; `info` is valid for writes.
    if unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let total = start.elapsed();
    drop(done);
    let timed_out = watchdog.join().map_err(|_| "watchdog panicked")?;
    let mut status = 0;
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our exited, unreaped child; `status` and `usage` are valid for writes.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
        return Err(std::io::Error::last_os_error().into());
    }
    out.join().map_err(|_| "stdout reader panicked")?;
    let stderr = err.join().map_err(|_| "stderr reader panicked")?;
    let boot = rx.try_iter().next();
    let seen = if boot.is_some() { "after" } else { "before" };
    let mut failure = if timed_out {
        Some(format!("timed out {seen} the init line, killed"))
    } else if libc::WIFSIGNALED(status) {
        Some(format!("killed by signal {}", libc::WTERMSIG(status)))
    } else if libc::WEXITSTATUS(status) != 0 {
        Some(format!("exit status {}", libc::WEXITSTATUS(status)))
    } else if boot.is_none() {
        Some(format!("no `{MARKER}` line"))
    } else {
        None
    };
    if let Some(why) = &mut failure {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        why.extend(tail.iter().rev().map(|l| format!("\n    {}", l.trim_end())));
    }
    // nixvm logs "vcpu0: first KVM_RUN <N> ms after start".
    let setup_ms = stderr.lines().find_map(|l| {
        let rest = l.split("first KVM_RUN ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    });
    // ru_maxrss is in KiB on Linux.
    let rss_mib = usage.ru_maxrss as f64 / 1024.0;
    let secs = |d: Duration| d.as_secs_f64();
    let values = [boot.map(secs), Some(secs(total)), setup_ms, Some(rss_mib)];
    Ok(Run { values, failure })
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
