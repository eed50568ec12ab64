//! What the benchmarks share: the route (direct, or re-run inside L1), running a VMM with a
//! timeout while timing its console lines, statistics, and the Markdown around the tables.
//! Each bench includes it with `#[path = "common.rs"] mod common;`.
#![allow(dead_code)] // not every bench uses every helper

use std::error::Error;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Where a bench measures: here, nowhere (and why), or it already ran inside L1 (the exit
/// status of that run).
pub enum Route {
    Here,
    Skipped(String),
    RanInL1(i32),
}

/// Builds the guest assets (`resources/assets.sh`; nothing to do when they are up to date)
/// and returns their directory.
pub fn build_assets() -> Result<PathBuf> {
    let assets = root().join("target/e2e-assets");
    let built = Command::new(root().join("resources/assets.sh"))
        .arg(&assets)
        .status()?;
    if !built.success() {
        return Err(format!("resources/assets.sh failed: {built}").into());
    }
    Ok(assets)
}

/// Builds the Debian systemd guest into `target/systemd-guest` (`resources/systemd-guest.sh`,
/// on the host: it needs root and Debian's mirror; nothing to do when it is up to date) and
/// returns its directory, or None when it could not be built.
pub fn build_systemd_guest(assets: &Path) -> Result<Option<PathBuf>> {
    let dir = root().join("target/systemd-guest");
    let built = Command::new(root().join("resources/systemd-guest.sh"))
        .arg(assets)
        .arg(&dir)
        .status()?;
    Ok(built.success().then_some(dir))
}

/// Disk image helpers shared with the e2e tests (`images::copy_sparse`).
#[path = "../tests/support/images.rs"]
pub mod images;

/// Writes to `out` the test guest's initramfs with `bin` added as `/bin/NAME`: a second newc
/// archive after the first, which the kernel unpacks too. `scratch` is a directory to use.
pub fn initrd_with(
    assets: &Path,
    bin: &Path,
    name: &str,
    scratch: &Path,
    out: &Path,
) -> Result<()> {
    let tree = scratch.join("cpio");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::copy(bin, tree.join("bin").join(name))?;
    let pack = "find bin | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1";
    let extra = Command::new("sh")
        .args(["-c", pack])
        .current_dir(&tree)
        .output()?;
    if !extra.status.success() || extra.stdout.is_empty() {
        let err = String::from_utf8_lossy(&extra.stderr);
        return Err(format!("packing {name} failed: {}", err.trim()).into());
    }
    let mut initrd = std::fs::read(assets.join("initramfs.cpio.gz"))?;
    initrd.extend_from_slice(&extra.stdout);
    std::fs::write(out, initrd)?;
    Ok(())
}

/// Builds the guest assets and decides where to measure: here (directly on /dev/kvm, or
/// already inside L1), or by running this very executable again inside L1.
pub fn route() -> Result<Route> {
    let root = root();
    if std::env::var_os("NIXVM_BENCH_INSIDE").is_some() {
        return Ok(Route::Here);
    }
    build_assets()?;
    let route = output(&mut Command::new(root.join("resources/kvm-route.sh")))?;
    if let Some(why) = route.strip_prefix("none") {
        return Ok(Route::Skipped(
            why.trim_start_matches(':').trim().to_owned(),
        ));
    } else if route != "l1" {
        return Ok(Route::Here);
    }
    // l1run.sh exports the NIXVM_* variables into L1.
    let mut l1 = Command::new(root.join("resources/l1run.sh"));
    l1.current_dir(&root);
    // The L1 guest's time limit (l1run.sh's default: 1 500 s), for long repeats.
    if let Ok(secs) = std::env::var("NIXVM_BENCH_L1_TIMEOUT") {
        l1.args(["-t", &secs]);
    }
    l1.arg("--").arg(std::env::current_exe()?);
    let host = output(Command::new("uname").arg("-r"))?;
    l1.env("NIXVM_BENCH_INSIDE", "1")
        .env("NIXVM_BENCH_ROUTE", "l1")
        .env("NIXVM_BENCH_HOST_KERNEL", host);
    if let Some(commit) = git_commit(&root) {
        l1.env("NIXVM_BENCH_COMMIT", commit);
    }
    Ok(Route::RanInL1(l1.status()?.code().unwrap_or(125)))
}

/// The extra nixvm flags of NIXVM_BENCH_ARGS (split at spaces): a bench of a setting, e.g.
/// `--transport pci`, against the same columns.
pub fn nixvm_args() -> Vec<String> {
    std::env::var("NIXVM_BENCH_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The environment variable `var` (names, or parts of them, separated by commas:
/// NIXVM_BENCH_SETUPS for columns, NIXVM_BENCH_GUESTS for the boot bench's guests) keeps only
/// the `items` it names, e.g. to leave out a VMM whose guest stalls inside L1; all without it.
pub fn only_named<T>(var: &str, items: &mut Vec<T>, name: impl Fn(&T) -> &str) -> Result<()> {
    let Ok(only) = std::env::var(var) else {
        return Ok(());
    };
    let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
    items.retain(|c| wanted.iter().any(|w| !w.is_empty() && name(c).contains(w)));
    if items.is_empty() {
        return Err(format!("{var}={only} names none of them").into());
    }
    Ok(())
}

/// One run of a VMM: its `NIXVM-BENCH: ...` lines and the console lines it was asked to
/// watch for, each with when it arrived (from the spawn), how long the process lived, its
/// peak RSS and stderr, and why it failed.
pub struct Console {
    pub marks: Vec<(Duration, String)>,
    /// When the first line containing each watched string arrived.
    pub seen: Vec<Option<Duration>>,
    pub total: Duration,
    pub max_rss_kib: i64,
    pub stderr: String,
    pub failure: Option<String>,
    /// KVM's own counters of the VM ([`KVM_STATS`]), as last read while it ran; empty where
    /// the kernel's debugfs is not readable.
    pub kvm: Vec<(&'static str, u64)>,
}

impl Console {
    /// KVM's counters as one line: "exits 5669, io_exits 901, …" (empty without debugfs).
    pub fn kvm_line(&self) -> String {
        let kvm: Vec<String> = self.kvm.iter().map(|(k, n)| format!("{k} {n}")).collect();
        kvm.join(", ")
    }

    /// When the mark `m` arrived.
    pub fn at(&self, m: &str) -> Option<Duration> {
        self.marks.iter().find(|(_, x)| x == m).map(|(t, _)| *t)
    }

    /// The value of a `key=value` mark.
    pub fn value(&self, key: &str) -> Option<f64> {
        self.marks
            .iter()
            .find_map(|(_, m)| m.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    }

    /// The `error=` marks a guest program printed.
    pub fn errors(&self) -> Vec<&str> {
        self.marks
            .iter()
            .filter_map(|(_, m)| m.strip_prefix("error="))
            .collect()
    }

    /// Records a failure found by the caller (with the console's and stderr's last lines).
    pub fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
    }
}

/// How a run must end to count.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Exit status 0 and a final `NIXVM-BENCH: done`.
    Mark,
    /// Exit status 0.
    Exit,
}

/// Spawns `cmd`, timestamps its `NIXVM-BENCH: ` lines and the first line containing each of
/// `watch`, kills it after `timeout` (giving up on it 10 s later), reaps it with wait4 for its
/// peak RSS, and checks that it ended as `done` says.
pub fn run_vm(cmd: &mut Command, timeout: Duration, watch: &[&str], done: Done) -> Result<Console> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let id = child.id();
    let pid = libc::pid_t::try_from(id)?;
    let watch: Vec<String> = watch.iter().map(|w| (*w).to_owned()).collect();
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let out = thread::spawn(move || {
        let (mut line, mut marks, mut tail) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen = vec![None; watch.len()];
        while matches!(stdout.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if let Some(rest) = text.split("NIXVM-BENCH: ").nth(1) {
                marks.push((start.elapsed(), rest.trim().to_string()));
            }
            for (w, s) in watch.iter().zip(&mut seen) {
                if s.is_none() && text.contains(w.as_str()) {
                    *s = Some(start.elapsed());
                }
            }
            // The console's last lines, for a failure's report.
            if tail.len() == 20 {
                tail.remove(0);
            }
            tail.push(text);
            line.clear();
        }
        (marks, seen, tail)
    });
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let err = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });

    let (kvm_stop, kvm_done) = mpsc::channel::<()>();
    let kvm = thread::spawn(move || watch_kvm_stats(id, &kvm_done));
    // Kills the child at `timeout`; gives up on it 10 s later. Stopped by dropping `stop`.
    let (stop, wait) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        let timed_out = mpsc::RecvTimeoutError::Timeout;
        if wait.recv_timeout(timeout) != Err(timed_out) {
            return false;
        }
        eprintln!("pid {pid}: timed out after {timeout:?}, killing it");
        // SAFETY: sending a signal; the child is not reaped before `stop` is dropped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if wait.recv_timeout(Duration::from_secs(10)) == Err(timed_out) {
            eprintln!("bench: pid {pid} survived SIGKILL for 10 s");
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
    drop(stop);
    drop(kvm_stop);
    let kvm = kvm.join().map_err(|_| "KVM stats reader panicked")?;
    let timed_out = watchdog.join().map_err(|_| "watchdog panicked")?;
    let mut status = 0;
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our exited, unreaped child; `status` and `usage` are valid for writes.
    if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } != pid {
        return Err(std::io::Error::last_os_error().into());
    }
    let (marks, seen, tail) = out.join().map_err(|_| "stdout reader panicked")?;
    let stderr = err.join().map_err(|_| "stderr reader panicked")?;
    let mut failure = if timed_out {
        Some(format!("timed out after {timeout:?}, killed"))
    } else if libc::WIFSIGNALED(status) {
        Some(format!("killed by signal {}", libc::WTERMSIG(status)))
    } else if libc::WEXITSTATUS(status) != 0 {
        Some(format!("exit status {}", libc::WEXITSTATUS(status)))
    } else if done == Done::Mark && !marks.iter().any(|(_, m)| m == "done") {
        // QEMU with -no-reboot exits with 0 when the guest resets.
        Some(format!(
            "exited with 0 after {:.0} s before the guest was done (a guest reset?)",
            total.as_secs_f64()
        ))
    } else {
        None
    };
    if let Some(why) = &mut failure {
        why.push_str("\n  console's last lines:");
        why.extend(tail.iter().map(|l| format!("\n    {l}")));
        why.push_str("\n  stderr's last lines:");
        let last: Vec<&str> = stderr.lines().rev().take(5).collect();
        why.extend(last.iter().rev().map(|l| format!("\n    {}", l.trim_end())));
    }
    Ok(Console {
        marks,
        seen,
        total,
        max_rss_kib: usage.ru_maxrss,
        stderr,
        failure,
        kvm,
    })
}

/// Cloud Hypervisor from `CLOUD_HYPERVISOR` (None, with a note that `bench` goes without its
/// column, when it is not set), made by `command` (`Command::new`, or one that runs it in a
/// network namespace): `kernel` and `initrd` booted with `cmdline` on `cpus` vCPUs, `memory`
/// its `--memory` value, the serial console on stdout, no virtio-console. The caller adds
/// devices.
pub fn cloud_hypervisor(
    bench: &str,
    command: impl FnOnce(std::ffi::OsString) -> Command,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    (cpus, memory): (u32, &str),
) -> Option<Command> {
    let Some(program) = std::env::var_os("CLOUD_HYPERVISOR") else {
        eprintln!("{bench} bench: CLOUD_HYPERVISOR is not set: no Cloud Hypervisor column");
        return None;
    };
    let mut ch = command(program);
    ch.arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initrd);
    let cpus = format!("boot={cpus}");
    ch.args(["--cmdline", cmdline, "--cpus", &cpus, "--memory", memory]);
    ch.args(["--serial", "tty", "--console", "off"]);
    Some(ch)
}

/// `prefix` + `path` + `suffix`, for --disk and -drive values.
pub fn path_arg(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s.push(suffix);
    s
}

/// Cloud Hypervisor's `--disk` value for the raw image `path`, with `options` (",readonly=on").
/// The type is given: v53.0 detects a raw image itself but then fails the guest's writes to
/// its sector 0 with EIO ("Autodetected raw image type. Disabling sector 0 writes.", its
/// guard against a guest writing an image format's header).
pub fn ch_disk(path: &Path, options: &str) -> OsString {
    path_arg("path=", path, &format!(",image_type=raw{options}"))
}

/// The counters read from a VM's debugfs directory, with the names the tables give them.
pub const KVM_STATS: [(&str, &str); 7] = [
    ("exits", "KVM exits, all"),
    ("io_exits", "port I/O exits"),
    ("mmio_exits", "MMIO exits"),
    ("halt_exits", "HLT exits"),
    ("pf_fixed", "guest page faults KVM mapped"),
    ("irq_exits", "host interrupt exits"),
    ("insn_emulation", "instructions emulated by KVM"),
];

/// Reads the KVM counters of process `pid`'s VM every 100 ms until `done` is dropped;
/// returns the last reading (the directory goes with the VM). The directory is
/// `/sys/kernel/debug/kvm/<tid>-<fd>/`, `tid` the thread that created the VM (Cloud
/// Hypervisor's is not its main thread).
fn watch_kvm_stats(pid: u32, done: &mpsc::Receiver<()>) -> Vec<(&'static str, u64)> {
    let dir = Path::new("/sys/kernel/debug/kvm");
    let mut last = Vec::new();
    while done.recv_timeout(Duration::from_millis(100)) == Err(mpsc::RecvTimeoutError::Timeout) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return last;
        };
        let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| format!("{}-", t.file_name().to_string_lossy()))
            .collect();
        let vm = entries.flatten().find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            tids.iter().any(|t| name.starts_with(t.as_str()))
        });
        let Some(vm) = vm else { continue };
        let read: Option<Vec<(&'static str, u64)>> = KVM_STATS
            .iter()
            .map(|(file, _)| {
                let text = std::fs::read_to_string(vm.path().join(file)).ok()?;
                Some((*file, text.trim().parse().ok()?))
            })
            .collect();
        if let Some(read) = read {
            last = read;
        }
    }
    last
}

/// Makes KVM's per-VM counters readable (mounts debugfs where it is not, as inside L1);
/// says so when it cannot.
pub fn mount_debugfs() {
    let kvm = Path::new("/sys/kernel/debug/kvm");
    if !kvm.exists() {
        let _ = Command::new("mount")
            .args(["-t", "debugfs", "debugfs", "/sys/kernel/debug"])
            .status();
    }
    if !kvm.exists() {
        eprintln!("bench: no /sys/kernel/debug/kvm: no KVM exit counts");
    }
}

/// A disk holding a guest script (the test guest runs its last disk's script), padded with
/// newlines to 64 KiB so that the kernel's partition probes stay inside it.
pub fn script_disk(path: &Path, script: &str) -> Result<()> {
    let mut disk = script.as_bytes().to_vec();
    disk.resize(64 << 10, b'\n');
    std::fs::write(path, disk)?;
    Ok(())
}

/// Median, min and max of `values` (none when empty).
pub fn stats(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    };
    Some((median, values[0], values[n - 1]))
}

/// `cmd` as one shell-like line, with paths under `root` made relative to it.
pub fn command_line(cmd: &Command, root: &Path) -> String {
    let root = format!("{}/", root.display());
    let words = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    let words: Vec<String> = words
        .map(OsStr::to_string_lossy)
        .map(|w| w.replace(&root, ""))
        .map(|w| if w.contains(' ') { format!("'{w}'") } else { w })
        .collect();
    words.join(" ")
}

/// The lines above a table: date, kernels, route, commit.
pub fn header(commit: Option<&str>) -> Result<()> {
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    let uname = output(Command::new("uname").arg("-r"))?;
    println!("\n- date: {date}");
    match std::env::var("NIXVM_BENCH_HOST_KERNEL") {
        Ok(host) => println!("- kernel (uname -r): host {host}, L1 {uname}"),
        Err(_) => println!("- kernel (uname -r): {uname}"),
    }
    if in_l1() {
        println!("- route: l1, the VMMs inside an L1 QEMU guest on TCG-emulated AMD SVM:");
        println!("  absolute figures are far below a real host's, only ratios mean anything");
    } else {
        println!("- route: direct (this host's /dev/kvm)");
    }
    println!("- commit: {}", commit.unwrap_or("unknown"));
    Ok(())
}

/// Whether this bench runs inside the L1 guest ([`route`] re-ran it there).
pub fn in_l1() -> bool {
    std::env::var("NIXVM_BENCH_ROUTE").is_ok_and(|r| r == "l1")
}

/// Runs `cmd` and returns its trimmed stdout; an error if it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{cmd:?} failed: {}: {}", out.status, err.trim()).into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The short commit, "-dirty" when the work tree differs from it.
pub fn git_commit(root: &Path) -> Option<String> {
    let mut git = Command::new("git");
    let args = ["describe", "--always", "--dirty", "--exclude", "*"];
    output(git.current_dir(root).args(args)).ok()
}
