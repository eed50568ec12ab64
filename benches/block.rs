//! Block I/O benchmark: nixvm's virtio-blk beside QEMU microvm's and, when
//! `CLOUD_HYPERVISOR=/path/to/cloud-hypervisor` is set, Cloud Hypervisor's: same guest, same
//! image, same run, and the host's own throughput on that image as the limit.
//!
//! `cargo bench -p nixvm --bench block`. NIXVM_BENCH_RUNS (default 3) runs of each, interleaved.
//! Each run measures, with `benches/guest-io.c` (static, added to the guest's initramfs), on
//! the same raw image file: sequential 1 MiB O_DIRECT reads and writes (MB/s), 4 KiB O_DIRECT
//! random reads with 1 and with 8 threads (IOPS), each for SECONDS of wall time. The guest
//! sees the image as /dev/vda and runs the script on its last disk (`nixvm.action=script`);
//! the host runs the same script on the file. Where /dev/kvm cannot boot Linux it re-runs
//! itself inside L1 (resources/l1run.sh), where all of them run on a loop device over a copy
//! of the image in L1's memory ([`LoopDevice`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[path = "common.rs"]
mod common;

use common::{Result, Route, git_commit, output, stats};
use common::{command_line, path_arg};

const CMDLINE: &str = "console=ttyS0 quiet nixvm.action=script";
const TIMEOUT: Duration = Duration::from_secs(240);
/// Wall time of each mode, in seconds.
const SECONDS: u32 = 4;
/// The data image's size.
const IMAGE_MIB: usize = 256;
/// What the guest (and the host) runs, with IO = the guest-io binary, DEV = the disk.
const SCRIPT: &str = r#"
$IO "$DEV" seqread SECONDS
$IO "$DEV" seqwrite SECONDS
$IO "$DEV" randread SECONDS 1
$IO "$DEV" randread SECONDS 8
echo "NIXVM-BENCH: done"
"#;

/// The table's rows: name, unit, and the key of guest-io's `NIXVM-BENCH: key=value` line.
const ROWS: [(&str, &str, &str); 4] = [
    ("seq read 1 MiB", "MB/s", "seqread_mbs"),
    ("seq write 1 MiB", "MB/s", "seqwrite_mbs"),
    ("rand read 4 KiB, QD1", "IOPS", "randread_qd1_iops"),
    (
        "rand read 4 KiB, QD8 (8 threads)",
        "IOPS",
        "randread_qd8_iops",
    ),
];

/// One run of the script by one VMM (or the host): its values for ROWS, why it failed, and
/// KVM's counters for the whole run (empty for the host).
struct Run {
    values: [Option<f64>; 4],
    failure: Option<String>,
    kvm: String,
}

/// The files the runs share, all under target/block-bench.
struct Files {
    /// The static guest-io binary.
    tool: PathBuf,
    /// The test guest's initramfs with /bin/guest-io added.
    initrd: PathBuf,
    /// The raw data image: /dev/vda in the guest.
    image: PathBuf,
    /// The script disk: the guest's last disk.
    script: PathBuf,
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("block bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<()> {
    let root = common::root();
    let assets = root.join("target/e2e-assets");
    let dir = root.join("target/block-bench");
    let files = Files {
        tool: dir.join("guest-io"),
        initrd: dir.join("initramfs.cpio.gz"),
        image: dir.join("data.img"),
        script: dir.join("script.img"),
    };
    // On the host: L1 sees this tree read-only.
    if std::env::var_os("NIXVM_BENCH_INSIDE").is_none() {
        common::build_assets()?;
        prepare(&root, &assets, &dir, &files)?;
    }
    match common::route()? {
        Route::Here => measure(&root, &assets, &files),
        Route::Skipped(why) => {
            println!("skipped: {why}");
            Ok(())
        }
        Route::RanInL1(code) => std::process::exit(code),
    }
}

/// Builds guest-io, the initramfs with it, the data image and the script disk.
fn prepare(root: &Path, assets: &Path, dir: &Path, files: &Files) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut gcc = Command::new("gcc");
    gcc.args(["-static", "-O2", "-pthread", "-Wall", "-o"]);
    output(gcc.arg(&files.tool).arg(root.join("benches/guest-io.c")))?;

    common::initrd_with(assets, &files.tool, "guest-io", dir, &files.initrd)?;

    // Every block written (no holes, which read without I/O), with a non-zero pattern.
    let len = u64::try_from(IMAGE_MIB << 20)?;
    if std::fs::metadata(&files.image).map_or(true, |m| m.len() != len) {
        let mut image = File::create(&files.image)?;
        let chunk: Vec<u8> = (0..1usize << 20)
            .map(|i| u8::try_from(i % 251 + 1).unwrap_or(1))
            .collect();
        for _ in 0..IMAGE_MIB {
            image.write_all(&chunk)?;
        }
        image.sync_all()?;
    }

    let script = format!("IO=/bin/guest-io DEV=/dev/vda\n{}", script_text());
    common::script_disk(&files.script, &script)
}

fn script_text() -> String {
    SCRIPT.replace("SECONDS", &SECONDS.to_string())
}

fn measure(root: &Path, assets: &Path, files: &Files) -> Result<()> {
    let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(3), |n| n.parse())?;
    // Before the runs: the checkout may change while they go on.
    let commit = git_commit(root).or_else(|| std::env::var("NIXVM_BENCH_COMMIT").ok());
    let kernel = assets.join("vmlinux");
    common::mount_debugfs();
    let loop_device = if common::in_l1() {
        Some(LoopDevice::attach(&files.image)?)
    } else {
        None
    };
    let image = loop_device.as_ref().map_or(&files.image, |l| &l.device);
    let mut nixvm = Command::new(env!("CARGO_BIN_EXE_nixvm"));
    nixvm
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&files.initrd);
    nixvm.args(["--cmdline", CMDLINE]);
    nixvm.args("--cpus 1 --memory 256M --serial stdio --rng off --disk".split(' '));
    nixvm.arg(path_arg("path=", image, ",direct=on"));
    nixvm.arg("--disk");
    nixvm.arg(path_arg("path=", &files.script, ",readonly=on"));
    nixvm.args(common::nixvm_args());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args("-M microvm,rtc=on -accel kvm -cpu host -m 256 -smp 1 -nodefaults".split(' '));
    qemu.args("-no-reboot -display none -serial stdio -monitor none".split(' '));
    qemu.arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&files.initrd);
    qemu.args(["-append", CMDLINE]);
    let drive = ",if=none,id=d0,format=raw,cache=none,aio=threads";
    qemu.arg("-drive").arg(path_arg("file=", image, drive));
    qemu.args(["-device", "virtio-blk-device,drive=d0", "-drive"]);
    qemu.arg(path_arg(
        "file=",
        &files.script,
        ",if=none,id=d1,format=raw,readonly=on",
    ));
    qemu.args(["-device", "virtio-blk-device,drive=d1"]);
    // The host: the same script, on the image file itself.
    let mut host = Command::new("sh");
    host.args(["-c", &script_text()]);
    host.env("IO", &files.tool).env("DEV", image);

    // The columns: the VMMs (nixvm first), then the host's limit.
    let mut columns: Vec<(&str, Command)> = vec![("nixvm", nixvm), ("QEMU microvm", qemu)];
    if let Some(mut ch) = common::cloud_hypervisor(
        "block",
        Command::new,
        &kernel,
        &files.initrd,
        CMDLINE,
        (1, "size=256M"),
    ) {
        // O_DIRECT as nixvm's direct=on and QEMU's cache=none; the script disk last (vdb).
        ch.arg("--disk")
            .arg(common::ch_disk(image, ",direct=on"))
            .arg(common::ch_disk(&files.script, ",readonly=on"));
        columns.push(("Cloud Hypervisor", ch));
    }
    columns.push(("host (limit)", host));
    let mut results: Vec<Vec<Run>> = columns.iter().map(|_| Vec::new()).collect();
    for i in 1..=runs {
        for ((name, cmd), results) in columns.iter_mut().zip(results.iter_mut()) {
            let run = run(cmd)?;
            match &run.failure {
                Some(why) => eprintln!("run {i} {name}: FAILED: {why}"),
                None => {
                    let v = run.values.map(Option::unwrap_or_default);
                    eprintln!(
                        "run {i} {name}: {:.1} / {:.1} MB/s, {:.0} / {:.0} IOPS; KVM: {}",
                        v[0], v[1], v[2], v[3], run.kvm
                    );
                }
            }
            results.push(run);
        }
    }

    let looped = loop_device.is_some();
    header(root, assets, image, looped, runs, commit.as_deref())?;
    for (name, cmd) in &columns[..columns.len() - 1] {
        println!("- {name}: `{}`", command_line(cmd, root));
    }
    println!();
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    table(&names, &results);
    let total = results.iter().map(Vec::len).sum::<usize>();
    let failed = total - results.iter().map(|r| ok(r).count()).sum::<usize>();
    if failed > 0 {
        return Err(format!("{failed} of {total} runs failed").into());
    }
    Ok(())
}

/// The data image on a loop device, inside L1. The image file is on L1's 9p share, where every
/// request is a round trip to the outer QEMU's 9p server (which serves O_DIRECT from the
/// development machine's page cache) through TCG, a cost that swamped the VMMs' differences;
/// L1's tmpfs has no O_DIRECT (a 6.1 kernel). A loop device over a copy in tmpfs takes
/// O_DIRECT from every column, the host row too. Detached and the copy removed when dropped.
struct LoopDevice {
    device: PathBuf,
    copy: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path) -> Result<Self> {
        let copy = std::env::temp_dir().join("nixvm-block-bench-data.img");
        std::fs::copy(image, &copy)?;
        let mut losetup = Command::new("losetup");
        let device = output(losetup.args(["--find", "--show"]).arg(&copy)).map_err(|e| {
            format!("no loop device in L1 (resources/assets.sh loads the `loop` module): {e}")
        })?;
        Ok(Self {
            device: PathBuf::from(device),
            copy,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = std::fs::remove_file(&self.copy);
    }
}

/// Runs `cmd` ([`common::run_vm`]) and reads the rows' values from its marks.
fn run(cmd: &mut Command) -> Result<Run> {
    let mut c = common::run_vm(cmd, TIMEOUT, &[], common::Done::Mark)?;
    let values = ROWS.map(|(_, _, key)| c.value(key));
    let errors = c.errors().join("; ");
    if !errors.is_empty() {
        c.fail(format!("guest-io: {errors}"));
    } else if values.iter().any(Option::is_none) {
        c.fail(format!("incomplete output: {:?}", c.marks));
    }
    Ok(Run {
        values,
        kvm: c.kvm_line(),
        failure: c.failure,
    })
}

/// The facts around the table: when, where, what. `looped`: `image` is the loop device
/// `measure` attached.
fn header(
    root: &Path,
    assets: &Path,
    image: &Path,
    looped: bool,
    runs: usize,
    commit: Option<&str>,
) -> Result<()> {
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    let uname = output(Command::new("uname").arg("-r"))?;
    let kver = std::fs::read_to_string(assets.join("kver")).unwrap_or_default();
    let place = if looped {
        format!(
            "on {}, a loop device over a copy in L1's memory (tmpfs)",
            image.display()
        )
    } else {
        let mut stat = Command::new("stat");
        let statfs = output(stat.args(["-f", "-c", "%T"]).arg(image))?;
        let fs = match mount_type(image) {
            Some(mount) if mount != statfs => format!("{mount} mount, statfs says {statfs}"),
            _ => statfs,
        };
        let file = image.strip_prefix(root).unwrap_or(image);
        format!("file {} ({fs})", file.display())
    };
    println!("\n- date: {date}");
    match std::env::var("NIXVM_BENCH_HOST_KERNEL") {
        Ok(host) => println!("- kernel (uname -r): host {host}, L1 {uname}"),
        Err(_) => println!("- kernel (uname -r): {uname}"),
    }
    if common::in_l1() {
        println!("- route: l1, the VMMs and the host row inside an L1 QEMU guest on TCG-emulated");
        println!(
            "  AMD SVM: absolute figures are far below a real host's, only ratios mean anything"
        );
    } else {
        println!("- route: direct (this host's /dev/kvm)");
    }
    println!("- commit: {}", commit.unwrap_or("unknown"));
    println!(
        "- guest: Debian {} vmlinux (PVH), busybox initramfs + guest-io, 1 vCPU, 256 MiB",
        kver.trim()
    );
    println!(
        "- image: {IMAGE_MIB} MiB raw {place}, /dev/vda in the guest; {SECONDS} s per row \
         and run; runs of each: {runs}, interleaved"
    );
    println!("- cmdline: `{CMDLINE}`");
    Ok(())
}

/// The type of the mount that holds `path` (under L1 the work dir is a 9p mount, whose statfs
/// passes on the host file system's type).
fn mount_type(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut f = line.split(' ');
        let (Some(_), Some(dir), Some(kind)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let longer = best.as_ref().is_none_or(|(n, _)| dir.len() >= *n);
        if path.starts_with(dir) && longer {
            best = Some((dir.len(), kind.to_string()));
        }
    }
    best.map(|(_, kind)| kind)
}

/// Prints the Markdown table, one column per entry of `names` (nixvm first, the host's limit
/// last), with nixvm's ratio to the best other VMM and to the host; failed runs are left out
/// of the statistics.
fn table(names: &[&str], results: &[Vec<Run>]) {
    let vmms = names.len() - 1;
    println!(
        "| median (min–max) | {} | nixvm / best other VMM | nixvm / host |",
        names.join(" | ")
    );
    println!("|---|{}---|---|", "---|".repeat(names.len()));
    for (row, (name, unit, _)) in ROWS.into_iter().enumerate() {
        let cells: Vec<Option<(f64, f64, f64)>> = results
            .iter()
            .map(|runs| stats(ok(runs).filter_map(|r| r.values[row]).collect()))
            .collect();
        let show = |s: &Option<(f64, f64, f64)>| match s {
            Some((m, lo, hi)) if unit == "IOPS" => format!("{m:.0} {unit} ({lo:.0}–{hi:.0})"),
            Some((m, lo, hi)) => format!("{m:.1} {unit} ({lo:.1}–{hi:.1})"),
            None => "–".into(),
        };
        // Higher is better in every row.
        let best_other = cells[1..vmms]
            .iter()
            .flatten()
            .map(|(m, ..)| *m)
            .reduce(f64::max);
        let ratio = |y: Option<f64>| match (cells[0], y) {
            (Some((x, ..)), Some(y)) if y > 0.0 => format!("**{:.2}**", x / y),
            _ => String::new(),
        };
        let shown: Vec<String> = cells.iter().map(show).collect();
        println!(
            "| {name} | {} | {} | {} |",
            shown.join(" | "),
            ratio(best_other),
            ratio(cells[vmms].map(|(m, ..)| m))
        );
    }
    let counts: Vec<String> = results
        .iter()
        .map(|r| format!("{}/{}", ok(r).count(), r.len()))
        .collect();
    println!("| runs ok | {} | | |", counts.join(" | "));
}

/// The runs that succeeded.
fn ok(runs: &[Run]) -> impl Iterator<Item = &Run> {
    runs.iter().filter(|r| r.failure.is_none())
}
