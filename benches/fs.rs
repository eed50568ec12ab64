//! virtio-fs benchmark: nixvm's built-in back end (`--fs path=DIR,readonly=on`, `nixvm
//! storefs`) beside the upstream virtiofsd, served to nixvm, to QEMU microvm
//! (vhost-user-fs-device, memfd memory) and, when `CLOUD_HYPERVISOR=/path/to/cloud-hypervisor`
//! is set, to Cloud Hypervisor (`--fs`, shared memory): same directory, same guest, same run.
//!
//! `cargo bench -p nixvm --bench fs`. NIXVM_BENCH_RUNS (default 3) runs of each, interleaved
//! (each round begins with the next setup); NIXVM_BENCH_SETUPS (parts of the columns' names,
//! comma-separated) for only some columns;
//! a fresh back end for every run. The guest mounts the share read-only (`-o ro`, as the
//! NixOS guest module mounts /nix/.ro-store) and reads one 256 MiB file,
//! runs `find | wc -l` over 10 000 small files twice (cold, then with the guest's caches
//! warm), then `stat`s every file twice, then copies the small files into its own tmpfs and
//! runs the same `find` there (what the guest's own work costs, without virtio-fs). Times
//! are taken on the host, from when the guest's marker lines arrive; "start → share mounted"
//! counts from starting the back end (virtiofsd) or nixvm (which starts its own). Where
//! /dev/kvm cannot boot Linux it re-runs itself inside L1 (resources/l1run.sh).

#[path = "common.rs"]
mod common;
#[path = "../tests/support/virtiofsd.rs"]
mod virtiofsd;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{Console, Result, Route};

const CMDLINE: &str = "console=ttyS0 quiet nixvm.action=script";
const TIMEOUT: Duration = Duration::from_secs(600);
const BIG_MIB: usize = 256;
const SCRIPT: &str = r#"
mkdir -p /mnt
mount -t virtiofs -o ro ro-store /mnt || echo "NIXVM-BENCH: error=mount"
echo "NIXVM-BENCH: read-start"
cat /mnt/big.bin > /dev/null
echo "NIXVM-BENCH: read-end"
echo "NIXVM-BENCH: files=$(find /mnt/t | wc -l)"
echo "NIXVM-BENCH: find-end"
echo "NIXVM-BENCH: files2=$(find /mnt/t | wc -l)"
echo "NIXVM-BENCH: find2-end"
echo "NIXVM-BENCH: stats=$(find /mnt/t -type f | xargs stat -c %s | wc -l)"
echo "NIXVM-BENCH: stat-end"
echo "NIXVM-BENCH: stats2=$(find /mnt/t -type f | xargs stat -c %s | wc -l)"
echo "NIXVM-BENCH: stat2-end"
cp -a /mnt/t /tmp/t
echo "NIXVM-BENCH: copied"
echo "NIXVM-BENCH: files3=$(find /tmp/t | wc -l)"
echo "NIXVM-BENCH: floor-end"
echo "NIXVM-BENCH: done"
"#;

/// The table's rows: name, unit, and how to get the value from a run.
type Measure = fn(&Console) -> Option<f64>;
const ROWS: [(&str, &str, Measure); 7] = [
    ("start → share mounted", "s", |c| {
        Some(c.at("read-start")?.as_secs_f64() + c.value("backend-start")?)
    }),
    ("read 256 MiB file", "MB/s", |c| {
        let t = c.at("read-end")?.checked_sub(c.at("read-start")?)?;
        Some((BIG_MIB << 20) as f64 / 1e6 / t.as_secs_f64())
    }),
    ("find over 10 000 files, cold", "s", |c| {
        Some(
            c.at("find-end")?
                .checked_sub(c.at("read-end")?)?
                .as_secs_f64(),
        )
    }),
    ("the same again (warm caches)", "s", |c| {
        Some(
            c.at("find2-end")?
                .checked_sub(c.at("find-end")?)?
                .as_secs_f64(),
        )
    }),
    ("find + stat of every file", "s", |c| {
        Some(
            c.at("stat-end")?
                .checked_sub(c.at("find2-end")?)?
                .as_secs_f64(),
        )
    }),
    ("the same again", "s", |c| {
        Some(
            c.at("stat2-end")?
                .checked_sub(c.at("stat-end")?)?
                .as_secs_f64(),
        )
    }),
    (
        "find over a copy in the guest's tmpfs (no virtio-fs)",
        "s",
        |c| {
            Some(
                c.at("floor-end")?
                    .checked_sub(c.at("copied")?)?
                    .as_secs_f64(),
            )
        },
    ),
];

/// The columns the ratios compare.
const BUILT_IN: &str = "nixvm built-in";
const WITH_VIRTIOFSD: &str = "nixvm + virtiofsd";

/// A configuration compared: a column of the table.
struct Setup {
    name: &'static str,
    command: Command,
    /// Served by a virtiofsd (started for each run), else by nixvm's own back end.
    virtiofsd: bool,
    /// nixvm's (the rows' ratios compare the built-in back end with the others).
    ours: bool,
}

/// The runs that succeeded.
fn ok(runs: &[Console]) -> Vec<&Console> {
    runs.iter().filter(|c| c.failure.is_none()).collect()
}

fn main() {
    let code = match bench() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fs bench: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn bench() -> Result<i32> {
    let Some(virtiofsd) = virtiofsd::find() else {
        println!("skipped: no virtiofsd (cargo install virtiofsd --locked)");
        return Ok(0);
    };
    // Found here: inside L1, HOME may not lead to it.
    // SAFETY: nothing else runs yet; the variable is read by l1run.sh's child only.
    unsafe { std::env::set_var("NIXVM_VIRTIOFSD", &virtiofsd) };
    match common::route()? {
        Route::Skipped(why) => {
            println!("skipped: {why}");
            Ok(0)
        }
        Route::RanInL1(code) => Ok(code),
        Route::Here => measure(&virtiofsd),
    }
}

/// The shared tree (10 000 small files in 100 directories and one big file), in the
/// temporary directory (a tmpfs inside L1).
fn make_tree(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    for d in 0..100 {
        let sub = dir.join(format!("t/d{d:03}"));
        std::fs::create_dir_all(&sub)?;
        for f in 0..100 {
            std::fs::write(sub.join(format!("f{f:03}")), format!("{d} {f}\n"))?;
        }
    }
    let mut big = std::fs::File::create(dir.join("big.bin"))?;
    let chunk: Vec<u8> = (0..1usize << 20)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    for _ in 0..BIG_MIB {
        big.write_all(&chunk)?;
    }
    Ok(())
}

/// A virtiofsd serving `dir` on `socket`, killed when dropped.
struct Daemon(Child);

impl Daemon {
    fn start(bin: &Path, dir: &Path, socket: &Path) -> Result<Daemon> {
        let child = virtiofsd::spawn(bin, dir, socket)?;
        // Wait for the socket, as a supervisor would (nixvm waits too, QEMU does not).
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(Daemon(child))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn measure(virtiofsd: &Path) -> Result<i32> {
    let root = common::root();
    let runs: usize = std::env::var("NIXVM_BENCH_RUNS").map_or(Ok(3), |n| n.parse())?;
    let commit = common::git_commit(&root).or_else(|| std::env::var("NIXVM_BENCH_COMMIT").ok());
    let assets = root.join("target/e2e-assets");
    let work = std::env::temp_dir().join("nixvm-fs-bench");
    let (tree, socket, script) = (
        work.join("share"),
        work.join("fs.sock"),
        work.join("script.img"),
    );
    make_tree(&tree)?;
    common::script_disk(&script, SCRIPT)?;
    let (kernel, initrd) = (assets.join("vmlinux"), assets.join("initramfs.cpio.gz"));

    let nixvm_with = |share: String| {
        let mut nixvm = Command::new(env!("CARGO_BIN_EXE_nixvm"));
        nixvm
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd);
        nixvm.args(["--cmdline", CMDLINE]);
        nixvm.args("--cpus 1 --memory 256M --serial stdio --rng off".split(' '));
        nixvm.args(common::nixvm_args());
        nixvm.arg("--fs").arg(share);
        nixvm
            .arg("--disk")
            .arg(format!("path={},readonly=on", script.display()));
        nixvm
    };
    let builtin = nixvm_with(format!("tag=ro-store,path={},readonly=on", tree.display()));
    let nixvm = nixvm_with(format!("tag=ro-store,socket={}", socket.display()));
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args("-M microvm,rtc=on,memory-backend=mem -accel kvm -cpu host -m 256".split(' '));
    qemu.args("-object memory-backend-memfd,id=mem,size=256M,share=on".split(' '));
    qemu.args("-smp 1 -nodefaults -no-reboot -display none -serial stdio -monitor none".split(' '));
    qemu.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd);
    qemu.args(["-append", CMDLINE]);
    qemu.arg("-chardev")
        .arg(format!("socket,id=fs0,path={}", socket.display()));
    qemu.args([
        "-device",
        "vhost-user-fs-device,chardev=fs0,tag=ro-store,queue-size=1024",
    ]);
    qemu.arg("-drive").arg(format!(
        "file={},if=none,id=d1,format=raw,readonly=on",
        script.display()
    ));
    qemu.args(["-device", "virtio-blk-device,drive=d1"]);
    let setup = |name, command, virtiofsd, ours| Setup {
        name,
        command,
        virtiofsd,
        ours,
    };
    let mut setups = vec![
        setup(BUILT_IN, builtin, false, true),
        setup(WITH_VIRTIOFSD, nixvm, true, true),
        setup("QEMU + virtiofsd", qemu, true, false),
    ];
    let memory = "size=256M,shared=on";
    if let Some(mut ch) =
        common::cloud_hypervisor("fs", Command::new, &kernel, &initrd, CMDLINE, (1, memory))
    {
        ch.arg("--fs").arg(format!(
            "tag=ro-store,socket={},num_queues=1,queue_size=1024",
            socket.display()
        ));
        ch.arg("--disk")
            .arg(common::ch_disk(&script, ",readonly=on"));
        setups.push(setup("Cloud Hypervisor + virtiofsd", ch, true, false));
    }
    common::only_named("NIXVM_BENCH_SETUPS", &mut setups, |s| s.name)?;

    let mut results: Vec<Vec<Console>> = setups.iter().map(|_| Vec::new()).collect();
    for i in 1..=runs {
        let mut order: Vec<usize> = (0..setups.len()).collect();
        // Each run starts with another setup: the first VM after a while pays for cold caches.
        order.rotate_left((i - 1) % setups.len());
        for n in order {
            let name = setups[n].name;
            let started = std::time::Instant::now();
            let daemon = if setups[n].virtiofsd {
                Some(Daemon::start(virtiofsd, &tree, &socket)?)
            } else {
                None
            };
            let backend_start = started.elapsed().as_secs_f64();
            let mut c = common::run_vm(&mut setups[n].command, TIMEOUT, &[], common::Done::Mark)?;
            drop(daemon);
            // How long the back end took to listen, as a mark the rows can read.
            c.marks
                .push((Duration::ZERO, format!("backend-start={backend_start}")));
            let got = |k: &str| c.value(k).unwrap_or(0.0);
            let (files, stats) = (got("files"), got("stats2"));
            if files != 10_101.0 || stats != 10_000.0 || got("files3") != 10_101.0 {
                c.fail(format!(
                    "the guest saw {files} entries and {stats} files, not 10101 and 10000"
                ));
            }
            match &c.failure {
                Some(why) => eprintln!("run {i} {name}: FAILED: {why}"),
                None => {
                    let v: Vec<String> = ROWS
                        .iter()
                        .map(|(_, u, f)| format!("{:.2} {u}", f(&c).unwrap_or_default()))
                        .collect();
                    eprintln!("run {i} {name}: {}", v.join(", "));
                }
            }
            results[n].push(c);
        }
        // The medians so far, in case the route dies before the table (L1 sometimes does).
        let so_far: Vec<String> = ROWS
            .iter()
            .map(|(name, _, f)| {
                let m: Vec<String> = results
                    .iter()
                    .map(|r| {
                        common::stats(ok(r).into_iter().filter_map(f).collect())
                            .map_or("–".to_string(), |(m, ..)| format!("{m:.2}"))
                    })
                    .collect();
                format!("{name}: {}", m.join(" / "))
            })
            .collect();
        let names: Vec<&str> = setups.iter().map(|s| s.name).collect();
        eprintln!(
            "after round {i} (medians, {}): {}",
            names.join(" / "),
            so_far.join("; ")
        );
    }

    common::header(commit.as_deref())?;
    let kver = std::fs::read_to_string(assets.join("kver")).unwrap_or_default();
    println!(
        "- guest: Debian {} vmlinux (PVH), busybox initramfs, 1 vCPU, 256 MiB; {runs} runs \
         of each, interleaved; virtiofsd {} (`--sandbox chroot --readonly`, cache auto), \
         a fresh one per run, sharing a tmpfs directory",
        kver.trim(),
        common::output(Command::new(virtiofsd).arg("--version")).unwrap_or_default()
    );
    for st in &setups {
        println!(
            "- {}: `{}`",
            st.name,
            common::command_line(&st.command, &root)
        );
    }
    let names: Vec<&str> = setups.iter().map(|s| s.name).collect();
    println!(
        "\n| median (min–max) | {} | built-in / nixvm + virtiofsd | built-in / best other VMM |",
        names.join(" | ")
    );
    println!("|---|{}---|---|", "---|".repeat(setups.len()));
    // The ratios' columns (NIXVM_BENCH_SETUPS may have left one out).
    let at = |name: &str| setups.iter().position(|s| s.name == name);
    let (builtin, with_virtiofsd) = (at(BUILT_IN), at(WITH_VIRTIOFSD));
    for (name, unit, f) in ROWS {
        let cells: Vec<Option<(f64, f64, f64)>> = results
            .iter()
            .map(|r| common::stats(ok(r).into_iter().filter_map(f).collect()))
            .collect();
        let shown: Vec<String> = cells
            .iter()
            .map(|s| match s {
                Some((m, lo, hi)) => format!("{m:.2} {unit} ({lo:.2}–{hi:.2})"),
                None => "–".into(),
            })
            .collect();
        let median = |n: usize| cells[n].map(|(m, ..)| m);
        let built_in = builtin.and_then(median);
        let ratio = |other: Option<f64>| match (built_in, other) {
            (Some(x), Some(y)) if y > 0.0 => format!("**{:.2}**", x / y),
            _ => String::new(),
        };
        // The best of the other VMMs: the highest throughput, the shortest time.
        let others = (0..setups.len())
            .filter(|&n| !setups[n].ours)
            .filter_map(median);
        let best = if unit == "MB/s" {
            others.reduce(f64::max)
        } else {
            others.reduce(f64::min)
        };
        println!(
            "| {name} | {} | {} | {} |",
            shown.join(" | "),
            ratio(with_virtiofsd.and_then(median)),
            ratio(best)
        );
    }
    let counts: Vec<String> = results
        .iter()
        .map(|r| format!("{}/{}", ok(r).len(), r.len()))
        .collect();
    println!("| runs ok | {} | | |", counts.join(" | "));
    let _ = std::fs::remove_dir_all(&work);
    let failed: usize = results.iter().map(|r| r.len() - ok(r).len()).sum();
    if failed > 0 {
        eprintln!("{failed} runs failed");
        return Ok(1);
    }
    Ok(0)
}
