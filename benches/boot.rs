//! Boot benchmark: nixvm beside QEMU microvm and, when `CLOUD_HYPERVISOR=` and
//! `FIRECRACKER=` name their binaries, Cloud Hypervisor and Firecracker: same guest, same run.
//!
//! `cargo bench -p nixvm --bench boot`. NIXVM_BENCH_RUNS (default 6) boots of each VMM,
//! interleaved: process spawn → the guest's marker line, spawn → exit, nixvm's own setup
//! time (its `first KVM_RUN` log line), the child's peak RSS and, where the kernel's debugfs
//! is readable (it is mounted if need be), KVM's count of the VM's exits by kind. Two
//! guests, a table each: the busybox test guest (to its init's `NIXVM-TEST: init`, then it
//! powers off), and the Debian systemd guest of `resources/systemd-guest.sh` (built on the
//! host; it needs root and Debian's mirror, the table is skipped without it) with its root
//! on a read-only virtio-blk disk: to its report unit's start (multi-user's last unit), then
//! it powers off through systemd. Where /dev/kvm cannot boot Linux it re-runs itself
//! inside L1 (resources/l1run.sh). NIXVM_BENCH_GUESTS and NIXVM_BENCH_SETUPS (parts of the
//! guests' and columns' names, comma-separated) keep only some; NIXVM_BENCH_CPUS (default 1)
//! gives every VMM that many vCPUs; NIXVM_BENCH_VERBOSE makes it a diagnostic run (no
//! `quiet`, `printk.time=1`). `NIXVM_BENCH_GUESTS=systemd NIXVM_BENCH_CPUS=2
//! NIXVM_BENCH_RUNS=20` repeats the 2-vCPU systemd boot to catch a reset, whose report keeps
//! the console's last lines.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[path = "common.rs"]
mod common;

use common::{KVM_STATS, Result, Route, git_commit, stats};

/// A guest every VMM boots, and what its table calls its rows.
struct Guest {
    /// What NIXVM_BENCH_GUESTS picks it by.
    name: &'static str,
    what: String,
    kernel: PathBuf,
    initrd: PathBuf,
    /// The root disk's image (/dev/vda), if the guest has one: each boot gets a fresh copy
    /// ([`scratch_disk`]) to write to.
    disk: Option<PathBuf>,
    cmdline: String,
    /// Firecracker ends when the guest resets, not when it powers off.
    fc_cmdline: String,
    memory_mib: u32,
    cpus: u32,
    /// The console line that ends the boot.
    marker: &'static str,
    timeout: Duration,
    /// The table's rows: name, unit, and whether to print ratios; then one row per KVM
    /// counter.
    rows: [(&'static str, &'static str, bool); 4],
}

/// The busybox test guest: init, a marker, power-off.
fn busybox(assets: &Path, cpus: u32) -> Guest {
    let kver = std::fs::read_to_string(assets.join("kver")).unwrap_or_default();
    Guest {
        name: "busybox",
        what: format!(
            "Debian {} vmlinux (PVH), busybox initramfs, {cpus} vCPU, 256 MiB",
            kver.trim()
        ),
        kernel: assets.join("vmlinux"),
        initrd: assets.join("initramfs.cpio.gz"),
        disk: None,
        cmdline: "console=ttyS0 quiet nixvm.action=poweroff".into(),
        fc_cmdline: "console=ttyS0 quiet nixvm.action=reboot reboot=k panic=1".into(),
        memory_mib: 256,
        cpus,
        marker: "NIXVM-TEST: init",
        timeout: Duration::from_secs(120),
        rows: [
            ("boot → init", "s", true),
            ("total (spawn → exit)", "s", false),
            ("setup (start → first KVM_RUN)", "ms", false),
            ("peak RSS", "MiB", true),
        ],
    }
}

/// The Debian systemd guest (`resources/systemd-guest.sh`): its initrd mounts the root, systemd
/// boots to multi-user, whose report unit powers off.
fn systemd(assets: &Path, dir: &Path, cpus: u32) -> Guest {
    // No hvc0 for the backdoor shell's unit to wait for (it is the test driver's).
    let root = "console=ttyS0 root=/dev/vda rw quiet systemd.mask=nixvm-backdoor.service";
    Guest {
        name: "systemd",
        what: format!(
            "Debian trixie (systemd 257) from resources/systemd-guest.sh, the same vmlinux, \
             its initramfs-tools initrd, root on virtio-blk (a fresh copy of the image for \
             each boot), {cpus} vCPU, 1 GiB"
        ),
        kernel: assets.join("vmlinux"),
        initrd: dir.join("initrd.img"),
        disk: Some(dir.join("root.img")),
        cmdline: format!("{root} panic=-1 nixvm.action=poweroff"),
        fc_cmdline: format!("{root} panic=1 nixvm.action=reboot reboot=k"),
        memory_mib: 1024,
        cpus,
        marker: "NIXVM-TEST: unit-start",
        timeout: Duration::from_secs(900),
        rows: [
            ("boot → multi-user (its report unit)", "s", true),
            ("spawn → exit (systemd powered off)", "s", true),
            ("setup (start → first KVM_RUN)", "ms", false),
            ("peak RSS", "MiB", true),
        ],
    }
}

/// One boot of one VMM: its values for the rows and KVM_STATS, and why it failed.
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
    let root = common::root();
    let systemd_dir = root.join("target/systemd-guest");
    if std::env::var_os("NIXVM_BENCH_INSIDE").is_none() {
        // Built on the host (it needs Debian's mirror); L1 sees the tree read-only.
        if common::build_systemd_guest(&common::build_assets()?)?.is_none() {
            eprintln!("boot bench: resources/systemd-guest.sh could not build its guest");
        }
    }
    match common::route()? {
        Route::Here => measure(&root, &systemd_dir),
        Route::Skipped(why) => {
            println!("skipped: {why}");
            Ok(())
        }
        Route::RanInL1(code) => std::process::exit(code),
    }
}

fn measure(root: &Path, systemd_dir: &Path) -> Result<()> {
    let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(6), |n| n.parse())?;
    let cpus: u32 = std::env::var("NIXVM_BENCH_CPUS").map_or(Ok(1), |n| n.parse())?;
    common::mount_debugfs();
    let assets = root.join("target/e2e-assets");
    let mut guests = vec![busybox(&assets, cpus)];
    if systemd_dir.join("stamp").exists() {
        guests.push(systemd(&assets, systemd_dir, cpus));
    } else {
        eprintln!("boot bench: no systemd guest (resources/systemd-guest.sh): one table");
    }
    common::only_named("NIXVM_BENCH_GUESTS", &mut guests, |g| g.name)?;
    // A diagnostic run (not a timed one): the guest's console says what it does, and when.
    if std::env::var_os("NIXVM_BENCH_VERBOSE").is_some() {
        for g in &mut guests {
            for cmdline in [&mut g.cmdline, &mut g.fc_cmdline] {
                *cmdline = cmdline.replace(" quiet", "") + " printk.time=1";
            }
        }
    }
    let commit = git_commit(root).or_else(|| std::env::var("NIXVM_BENCH_COMMIT").ok());
    let mut tables = Vec::new();
    let (mut all, mut failed) = (0, 0);
    for g in &guests {
        let mut vmms = vmms(g)?;
        for i in 1..=runs {
            for v in &mut vmms {
                if let Some(image) = &g.disk {
                    common::images::copy_sparse(image, &scratch_disk())?;
                }
                let run = boot(&mut v.command, g)?;
                let [up, total] = [0, 1].map(|n| run.values[n].unwrap_or_default());
                match &run.failure {
                    Some(why) => eprintln!("run {i} {}: FAILED: {why}", v.name),
                    None => eprintln!("run {i} {}: up {up:.2} s, exit {total:.2} s", v.name),
                }
                v.runs.push(run);
            }
        }
        if g.disk.is_some() {
            let _ = std::fs::remove_file(scratch_disk());
        }
        all += vmms.iter().map(|v| v.runs.len()).sum::<usize>();
        failed += vmms
            .iter()
            .map(|v| v.runs.len() - ok(&v.runs).count())
            .sum::<usize>();
        tables.push(vmms);
    }

    common::header(commit.as_deref())?;
    println!("- {runs} runs of each VMM, interleaved");
    for (g, vmms) in guests.iter().zip(&tables) {
        println!("\n- guest: {}", g.what);
        println!(
            "- cmdline: `{}` (Firecracker: `{}`)",
            g.cmdline, g.fc_cmdline
        );
        for v in vmms {
            println!("- {}: `{}`", v.name, common::command_line(&v.command, root));
        }
        println!();
        table(vmms, &g.rows);
    }
    if failed > 0 {
        return Err(format!("{failed} of {all} runs failed").into());
    }
    Ok(())
}

/// The VMMs that boot `g`: nixvm, QEMU microvm, and Cloud Hypervisor and Firecracker when
/// their binaries are named.
fn vmms(g: &Guest) -> Result<Vec<Vmm>> {
    let mem = g.memory_mib;
    let mut nixvm = Command::new(env!("CARGO_BIN_EXE_nixvm"));
    nixvm
        .env("NIXVM_LOG", "info")
        .arg("--kernel")
        .arg(&g.kernel);
    nixvm.arg("--initrd").arg(&g.initrd);
    let cpus = g.cpus.to_string();
    nixvm.args(["--cmdline", &g.cmdline, "--memory", &format!("{mem}M")]);
    nixvm.args(["--cpus", &cpus, "--serial", "stdio"]);
    nixvm.args(common::nixvm_args());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args("-M microvm,rtc=on -accel kvm -cpu host -nodefaults".split(' '));
    qemu.args(["-smp", &cpus, "-m", &mem.to_string()]);
    qemu.args("-no-reboot -display none -serial stdio -monitor none".split(' '));
    qemu.arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd);
    qemu.args(["-append", &g.cmdline]);
    let ch = common::cloud_hypervisor(
        "boot",
        Command::new,
        &g.kernel,
        &g.initrd,
        &g.cmdline,
        (g.cpus, &format!("size={mem}M")),
    );
    let disk = g.disk.as_ref().map(|_| scratch_disk());
    if let Some(disk) = &disk {
        nixvm.arg("--disk").arg(format!("path={}", disk.display()));
        qemu.arg("-drive")
            .arg(format!("file={},if=none,id=d0,format=raw", disk.display()));
        qemu.args(["-device", "virtio-blk-device,drive=d0"]);
    }
    let vmm = |name, command| Vmm {
        name,
        command,
        runs: Vec::new(),
    };
    let mut vmms = vec![vmm("nixvm", nixvm), vmm("QEMU microvm", qemu)];
    if let Some(mut ch) = ch {
        if let Some(disk) = &disk {
            ch.arg("--disk").arg(common::ch_disk(disk, ""));
        }
        vmms.push(vmm("Cloud Hypervisor", ch));
    }
    match std::env::var_os("FIRECRACKER") {
        Some(p) => {
            let config = std::env::temp_dir().join(format!("nixvm-boot-bench-fc-{mem}.json"));
            let json = |p: &Path| format!("{:?}", p.display().to_string());
            let drives = disk.as_deref().map_or(String::new(), |d| {
                format!(
                    r#"{{"drive_id": "root", "path_on_host": {}, "is_root_device": false, "is_read_only": false}}"#,
                    json(d)
                )
            });
            std::fs::write(
                &config,
                format!(
                    r#"{{"boot-source": {{"kernel_image_path": {}, "initrd_path": {}, "boot_args": "{}"}}, "machine-config": {{"vcpu_count": {cpus}, "mem_size_mib": {mem}}}, "drives": [{drives}]}}"#,
                    json(&g.kernel),
                    json(&g.initrd),
                    g.fc_cmdline
                ),
            )?;
            let mut fc = Command::new(p);
            fc.arg("--no-api").arg("--config-file").arg(&config);
            vmms.push(vmm("Firecracker", fc));
        }
        None => eprintln!("boot bench: FIRECRACKER is not set: no Firecracker column"),
    }
    common::only_named("NIXVM_BENCH_SETUPS", &mut vmms, |v| v.name)?;
    if vmms[0].name != "nixvm" {
        return Err("NIXVM_BENCH_SETUPS must keep nixvm: the ratios are nixvm's".into());
    }
    Ok(vmms)
}

/// Where a guest's root disk is copied for each boot (inside L1, its own tmpfs).
fn scratch_disk() -> PathBuf {
    std::env::temp_dir().join("nixvm-boot-bench-root.img")
}

/// Runs `cmd` ([`common::run_vm`]): the time to the guest's marker and to its exit, nixvm's
/// set-up time and the peak RSS.
fn boot(cmd: &mut Command, g: &Guest) -> Result<Run> {
    let mut c = common::run_vm(cmd, g.timeout, &[g.marker], common::Done::Exit)?;
    let boot = c.seen[0];
    if boot.is_none() {
        c.fail(format!("no `{}` line", g.marker));
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

/// Prints the Markdown table, nixvm first, then each other VMM, then nixvm / each other;
/// failed runs are left out of the statistics, and counters no run had are left out.
fn table(vmms: &[Vmm], rows: &[(&str, &str, bool)]) {
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
    let all = rows
        .iter()
        .copied()
        .chain(KVM_STATS.iter().map(|(_, name)| (*name, "", true)));
    for (row, (name, unit, ratio)) in all.enumerate() {
        let cells: Vec<Option<(f64, f64, f64)>> = vmms
            .iter()
            .map(|v| stats(ok(&v.runs).filter_map(|r| r.values[row]).collect()))
            .collect();
        if row >= rows.len() && cells.iter().all(Option::is_none) {
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
