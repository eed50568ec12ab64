//! Console benchmark: the guest's output through the serial port (ttyS0) and through a
//! virtio-console (hvc0), and a verbose boot with either as the kernel's console; nixvm beside
//! QEMU microvm and, when `CLOUD_HYPERVISOR=/path/to/cloud-hypervisor` is set, Cloud
//! Hypervisor, same guest, same run.
//!
//! `cargo bench -p nixvm --bench console`. NIXVM_BENCH_RUNS (default 3) rounds, each VMM in
//! turn. In each round, per VMM:
//! - one boot runs a script (`nixvm.action=script`) that writes SERIAL_KIB of base64 text to
//!   /dev/ttyS0 and HVC_MIB to /dev/hvc0 (both raw, no echo), timing each in the guest
//!   (/proc/uptime); the hvc0 output goes to a file whose size must match what the guest wrote;
//! - two boots without `quiet` power off at once (`nixvm.action=poweroff`), one with
//!   `console=ttyS0`, one with `console=hvc0` (the serial port then off): spawn → exit.
//!
//! Where /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[path = "common.rs"]
mod common;

use common::{Done, Result, Route, git_commit, run_vm, script_disk, stats};

const TIMEOUT: Duration = Duration::from_secs(300);
const SERIAL_KIB: usize = 64;
const HVC_MIB: usize = 16;
/// base64 text of (about) the given sizes, written raw to each console in turn.
const SCRIPT: &str = r#"
head -c $((SERIAL_KIB * 768)) /dev/urandom | base64 > /tmp/ser
head -c $((HVC_MIB * 786432)) /dev/urandom | base64 > /tmp/hvc
now() { cut -d' ' -f1 /proc/uptime; }
stty -F /dev/ttyS0 raw -echo
t0=$(now); cat /tmp/ser > /dev/ttyS0; t1=$(now)
echo
echo "NIXVM-BENCH: serial_kbs=$(awk -v b=$(wc -c < /tmp/ser) -v s="$t1" -v t="$t0" 'BEGIN { printf "%.3f", b / (s - t) / 1e3 }')"
exec 3<>/dev/hvc0
stty raw -echo <&3
t0=$(now); cat /tmp/hvc >&3; t1=$(now)
echo "NIXVM-BENCH: hvc_bytes=$(wc -c < /tmp/hvc)"
echo "NIXVM-BENCH: hvc_mbs=$(awk -v b=$(wc -c < /tmp/hvc) -v s="$t1" -v t="$t0" 'BEGIN { printf "%.3f", b / (s - t) / 1e6 }')"
echo "NIXVM-BENCH: done"
"#;

const ROWS: [(&str, &str); 4] = [
    ("guest output to ttyS0", "kB/s"),
    ("guest output to hvc0", "MB/s"),
    ("verbose boot → power-off, console=ttyS0", "s"),
    ("verbose boot → power-off, console=hvc0", "s"),
];
/// Rows where less is better.
const LOWER_IS_BETTER: [bool; 4] = [false, false, true, true];

/// A VMM under test: how it is started for each kind of run.
struct Vmm {
    name: &'static str,
    program: PathBuf,
    args: fn(&Files, &Spec) -> Vec<String>,
}

/// One run's set-up: the command line, the script disk (or none), where hvc0's output goes
/// (or none: no virtio-console), whether the serial port is on stdout.
struct Spec<'a> {
    cmdline: &'a str,
    disk: Option<&'a Path>,
    hvc: Option<&'a Path>,
    serial: bool,
}

struct Files {
    kernel: PathBuf,
    initrd: PathBuf,
    script: PathBuf,
    dir: PathBuf,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn nixvm_args(f: &Files, r: &Spec) -> Vec<String> {
    let (cmdline, disk, hvc, serial) = (r.cmdline, r.disk, r.hvc, r.serial);
    let mut a: Vec<String> = [
        "--kernel",
        &s(&f.kernel),
        "--initrd",
        &s(&f.initrd),
        "--cmdline",
        cmdline,
    ]
    .map(String::from)
    .into();
    a.extend(
        "--cpus 1 --memory 256M --rng off"
            .split(' ')
            .map(String::from),
    );
    a.extend([
        "--serial".into(),
        if serial { "stdio" } else { "off" }.into(),
    ]);
    if let Some(d) = disk {
        a.extend(["--disk".into(), format!("path={},readonly=on", s(d))]);
    }
    if let Some(h) = hvc {
        a.extend(["--console".into(), format!("file={}", s(h))]);
    }
    a
}

fn qemu_args(f: &Files, r: &Spec) -> Vec<String> {
    let (cmdline, disk, hvc, serial) = (r.cmdline, r.disk, r.hvc, r.serial);
    let mut a: Vec<String> = "-M microvm,rtc=on -accel kvm -cpu host -m 256 -smp 1 -nodefaults -no-reboot -display none -monitor none"
        .split(' ')
        .map(String::from)
        .collect();
    a.extend([
        "-serial".into(),
        if serial { "stdio" } else { "none" }.into(),
    ]);
    a.extend([
        "-kernel".into(),
        s(&f.kernel),
        "-initrd".into(),
        s(&f.initrd),
    ]);
    a.extend(["-append".into(), cmdline.into()]);
    if let Some(d) = disk {
        a.extend([
            "-drive".into(),
            format!("file={},if=none,id=d0,format=raw,readonly=on", s(d)),
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
        ]);
    }
    if let Some(h) = hvc {
        a.extend([
            "-chardev".into(),
            format!("file,id=hvc,path={}", s(h)),
            "-device".into(),
            "virtio-serial-device".into(),
            "-device".into(),
            "virtconsole,chardev=hvc".into(),
        ]);
    }
    a
}

fn ch_args(f: &Files, r: &Spec) -> Vec<String> {
    let (cmdline, disk, hvc, serial) = (r.cmdline, r.disk, r.hvc, r.serial);
    let mut a: Vec<String> = [
        "--kernel",
        &s(&f.kernel),
        "--initramfs",
        &s(&f.initrd),
        "--cmdline",
        cmdline,
    ]
    .map(String::from)
    .into();
    a.extend(
        "--cpus boot=1 --memory size=256M"
            .split(' ')
            .map(String::from),
    );
    a.extend(["--serial".into(), if serial { "tty" } else { "off" }.into()]);
    a.extend([
        "--console".into(),
        hvc.map_or("off".into(), |h| format!("file={}", s(h))),
    ]);
    if let Some(d) = disk {
        let disk = common::ch_disk(d, ",readonly=on");
        a.extend(["--disk".into(), disk.to_string_lossy().into_owned()]);
    }
    a
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("console bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<()> {
    match common::route()? {
        Route::Here => measure(),
        Route::Skipped(why) => {
            println!("skipped: {why}");
            Ok(())
        }
        Route::RanInL1(code) => std::process::exit(code),
    }
}

fn measure() -> Result<()> {
    let root = common::root();
    let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(3), |n| n.parse())?;
    let commit = git_commit(&root).or_else(|| std::env::var("NIXVM_BENCH_COMMIT").ok());
    let assets = root.join("target/e2e-assets");
    // Scratch files in L1's own /tmp (the host's tree is read-only there).
    let dir = std::env::temp_dir().join(format!("nixvm-console-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let files = Files {
        kernel: assets.join("vmlinux"),
        initrd: assets.join("initramfs.cpio.gz"),
        script: dir.join("script.img"),
        dir: dir.clone(),
    };
    let script = SCRIPT
        .replace("SERIAL_KIB", &SERIAL_KIB.to_string())
        .replace("HVC_MIB", &HVC_MIB.to_string());
    script_disk(&files.script, &script)?;
    let mut vmms = vec![
        Vmm {
            name: "nixvm",
            program: env!("CARGO_BIN_EXE_nixvm").into(),
            args: nixvm_args,
        },
        Vmm {
            name: "QEMU microvm",
            program: "qemu-system-x86_64".into(),
            args: qemu_args,
        },
    ];
    match std::env::var_os("CLOUD_HYPERVISOR") {
        Some(p) => vmms.push(Vmm {
            name: "Cloud Hypervisor",
            program: p.into(),
            args: ch_args,
        }),
        None => eprintln!("console bench: CLOUD_HYPERVISOR is not set: no Cloud Hypervisor column"),
    }
    // results[vmm][row]: the values of the runs that worked.
    let mut results = vec![vec![Vec::new(); ROWS.len()]; vmms.len()];
    let mut failed = 0;
    for round in 1..=runs {
        for (v, vmm) in vmms.iter().enumerate() {
            match round_of(vmm, &files) {
                Ok(values) => {
                    eprintln!("round {round} {}: {values:?}", vmm.name);
                    for (row, x) in values.into_iter().enumerate() {
                        results[v][row].push(x);
                    }
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("round {round} {}: FAILED: {e}", vmm.name);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    common::header(commit.as_deref())?;
    let kver = std::fs::read_to_string(assets.join("kver")).unwrap_or_default();
    println!(
        "- guest: Debian {} vmlinux (PVH), busybox initramfs, 1 vCPU, 256 MiB; {SERIAL_KIB} KiB \
         to ttyS0 and {HVC_MIB} MiB to hvc0 (base64 text, raw tty), timed in the guest",
        kver.trim()
    );
    println!("- {runs} rounds, the VMMs in turn\n");
    table(&vmms, &results);
    if failed > 0 {
        return Err(format!("{failed} rounds failed").into());
    }
    Ok(())
}

/// One round of one VMM: the four rows' values.
fn round_of(vmm: &Vmm, f: &Files) -> Result<[f64; 4]> {
    let hvc_out = f.dir.join("hvc.out");
    let _ = std::fs::remove_file(&hvc_out);
    let output = Spec {
        cmdline: "console=ttyS0 quiet nixvm.action=script",
        disk: Some(&f.script),
        hvc: Some(&hvc_out),
        serial: true,
    };
    let c = run(vmm, f, &output, Done::Mark)?;
    let got = std::fs::metadata(&hvc_out).map_or(0, |m| m.len());
    let want = c.value("hvc_bytes").unwrap_or(-1.0);
    if got as f64 != want {
        return Err(format!("hvc0: the guest wrote {want} bytes, the file has {got}").into());
    }
    let serial = c.value("serial_kbs").ok_or("no serial_kbs")?;
    let hvc = c.value("hvc_mbs").ok_or("no hvc_mbs")?;
    let on_serial = Spec {
        cmdline: "console=ttyS0 nixvm.action=poweroff",
        disk: None,
        hvc: None,
        serial: true,
    };
    let on_serial = run(vmm, f, &on_serial, Done::Exit)?.total;
    let on_hvc = Spec {
        cmdline: "console=hvc0 nixvm.action=poweroff",
        disk: None,
        hvc: Some(&hvc_out),
        serial: false,
    };
    let on_hvc = run(vmm, f, &on_hvc, Done::Exit)?.total;
    Ok([serial, hvc, on_serial.as_secs_f64(), on_hvc.as_secs_f64()])
}

/// Runs `vmm` as `spec` says; an error if the run failed.
fn run(vmm: &Vmm, f: &Files, spec: &Spec, done: Done) -> Result<common::Console> {
    let mut cmd = Command::new(&vmm.program);
    cmd.args((vmm.args)(f, spec));
    let c = run_vm(&mut cmd, TIMEOUT, &[], done)?;
    match &c.failure {
        Some(why) => Err(why.clone().into()),
        None => Ok(c),
    }
}

/// The Markdown table: medians (min–max), and nixvm's ratio to the best other VMM.
fn table(vmms: &[Vmm], results: &[Vec<Vec<f64>>]) {
    let names: Vec<&str> = vmms.iter().map(|v| v.name).collect();
    println!(
        "| median (min–max) | {} | nixvm / best other |",
        names.join(" | ")
    );
    println!("|---|{}---|", "---|".repeat(names.len()));
    for (row, (name, unit)) in ROWS.iter().enumerate() {
        let cells: Vec<Option<(f64, f64, f64)>> =
            results.iter().map(|r| stats(r[row].clone())).collect();
        let shown: Vec<String> = cells
            .iter()
            .map(|c| match c {
                Some((m, lo, hi)) => format!("{m:.2} {unit} ({lo:.2}–{hi:.2})"),
                None => "–".into(),
            })
            .collect();
        let others = cells[1..].iter().flatten().map(|c| c.0);
        let best = if LOWER_IS_BETTER[row] {
            others.reduce(f64::min)
        } else {
            others.reduce(f64::max)
        };
        let ratio = match (cells[0], best) {
            (Some((ours, ..)), Some(b)) => format!("**{:.2}**", ours / b),
            _ => String::new(),
        };
        println!("| {name} | {} | {ratio} |", shown.join(" | "));
    }
}
