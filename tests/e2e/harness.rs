//! The harness: running nixvm, reading its console, the test runner and its helpers.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const NIXVM: &str = env!("CARGO_BIN_EXE_nixvm");
pub(crate) const INSIDE: &str = "NIXVM_E2E_INSIDE";
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
/// Marks a failure where nothing happened before a timeout. The L1 route (nested KVM under
/// TCG) now and then freezes a guest, whichever VMM runs it: such a test runs once more.
pub(crate) const STALLED: &str = "(stalled: no progress before the timeout)";
/// The result line's word for a test that stalled in every attempt: the runner outside L1
/// runs it again in a fresh L1 guest (the route's stalls come in runs within one guest: CI,
/// 2026-11-30, two in a row of one boot, then one of the next).
pub(crate) const STALLED_RESULT: &str = "FAILED (stalled)";
/// A NixOS-style command line; it must reach /proc/cmdline byte for byte.
pub(crate) const NIXOS_ARGS: &str = "init=/nix/store/3m6ai0zm3rg7a2z1s2ad1xfzdc0wz6kn-nixos-system-x-24.11/init regInfo=/nix/store/ijgclfphrd1vzk6qvbwzy0mbcgqnfzgf-closure-info/registration";

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

pub(crate) fn assets() -> PathBuf {
    root().join("target/e2e-assets")
}

pub(crate) fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nixvm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

pub(crate) type TestResult = Result<(), String>;

/// Whether `program` runs (with `arg`, which makes it print and exit).
pub(crate) fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// What the boot tests are doing, and since when (for the heartbeat).
static WORKING_ON: Mutex<Option<(String, Instant)>> = Mutex::new(None);

/// Longest one piece of work (a test, or a boot with its retry) may take before the heartbeat
/// stops vouching for it: then the caller outside L1 sees silence and takes the L1 run for
/// stuck, as it would a frozen L1.
const STUCK: Duration = Duration::from_secs(25 * 60);

/// Tells the heartbeat what runs now.
pub(crate) fn working_on(what: &str) {
    *WORKING_ON.lock().unwrap() = Some((what.to_owned(), Instant::now()));
}

/// Inside L1: says once a minute what runs and for how long. The caller outside watches for
/// silence to find a frozen L1 guest; with this, silence means that L1 stopped (or a test ran
/// past `STUCK`), not that a host-side step (building a tree, hashing it) took long.
pub(crate) fn start_heartbeat() {
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_secs(60));
            let now = WORKING_ON.lock().unwrap().clone();
            if let Some((what, since)) = now.filter(|(_, since)| since.elapsed() < STUCK) {
                println!(
                    "e2e: alive: {what} for {} s ({})",
                    since.elapsed().as_secs(),
                    memory_left()
                );
            }
        }
    });
}

/// The machine's available memory, as /proc/meminfo says: an L1 guest that ran out of memory
/// stops without a word, so the heartbeat says how much was left.
fn memory_left() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: u64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(format!("{} MiB available", kib / 1024))
        })
        .unwrap_or_else(|| "available memory unknown".to_owned())
}

/// Runs tests, prints `test NAME ... ok|FAILED|skipped`, and counts.
#[derive(Default)]
pub(crate) struct Runner {
    pub(crate) filter: Option<String>,
    pub(crate) passed: usize,
    pub(crate) failed: Vec<String>,
    pub(crate) skipped: usize,
}

impl Runner {
    pub(crate) fn wants(&self, name: &str) -> bool {
        // A filter is one or more comma-separated parts of test names.
        self.filter
            .as_deref()
            .is_none_or(|f| f.split(',').any(|p| name.contains(p)))
    }

    pub(crate) fn record(&mut self, name: &str, result: TestResult) {
        working_on(&format!("what follows {name}"));
        match result {
            Ok(()) => {
                println!("test {name} ... ok");
                self.passed += 1;
            }
            Err(why) => {
                let result = if why.contains(STALLED) {
                    STALLED_RESULT
                } else {
                    "FAILED"
                };
                println!(
                    "test {name} ... {result}\n    {}",
                    why.replace('\n', "\n    ")
                );
                self.failed.push(name.to_owned());
            }
        }
    }

    pub(crate) fn run(&mut self, name: &str, f: impl FnOnce() -> TestResult) {
        if self.wants(name) {
            working_on(name);
            let r = f();
            self.record(name, r);
        }
    }

    /// Like `run`, but a test that stalled runs once more (and says so).
    pub(crate) fn run_retry(&mut self, name: &str, mut f: impl FnMut() -> TestResult) {
        if self.wants(name) {
            let r = retry_stalled(name, &mut f, |r| {
                r.as_ref().is_err_and(|e| e.contains(STALLED))
            });
            self.record(name, r);
        }
    }

    /// A test that cannot run here: skipped, saying why, or failed under CI (`CI=true`,
    /// which the L1 guest learns as `NIXVM_E2E_CI`), where everything must run.
    pub(crate) fn skip(&mut self, name: &str, why: &str) {
        if !self.wants(name) {
            return;
        }
        if in_ci() {
            self.record(name, Err(format!("cannot run here ({why}), and CI must")));
        } else {
            println!("test {name} ... skipped: {why}");
            self.skipped += 1;
        }
    }
}

/// Whether this runs under CI, where every test must run.
pub(crate) fn in_ci() -> bool {
    ["CI", "NIXVM_E2E_CI"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| v == "true" || v == "1"))
}

/// The last `n` lines of `s`.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a finished nixvm run left behind.
pub(crate) struct Run {
    pub(crate) status: Option<ExitStatus>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    pub(crate) fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub(crate) fn markers(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("NIXVM-TEST: "))
            .collect()
    }

    pub(crate) fn marker(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.markers()
            .into_iter()
            .find_map(|m| m.strip_prefix(prefix.as_str()))
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "exit {:?}{}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            self.status,
            if self.status.is_none() { STALLED } else { "" },
            tail(&self.stdout, 15),
            tail(&self.stderr, 15)
        )
    }
}

/// Runs nixvm to completion (killing it after `timeout`), stdin from /dev/null.
pub(crate) fn nixvm(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Run {
    let mut cmd = Command::new(NIXVM);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn nixvm");
    // Collected as it comes, so that a process that cannot be reaped cannot hang the tests.
    let collect = |mut r: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let done = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut chunk) {
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (buf, done)
    };
    let (out, out_done) = collect(Box::new(child.stdout.take().expect("stdout")));
    let (err, err_done) = collect(Box::new(child.stderr.take().expect("stderr")));
    let status = wait_timeout(&mut child, timeout);
    for done in [out_done, err_done] {
        let start = Instant::now();
        while !done.is_finished() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    Run {
        status,
        stdout: text(&out),
        stderr: text(&err),
    }
}

/// Waits for the child, killing it after `timeout`. Never waits forever: a process stuck in
/// the kernel (seen with nested KVM) is left behind and reported as `None`.
pub(crate) fn wait_timeout(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<ExitStatus> {
    let start = Instant::now();
    let mut killed = false;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return (!killed).then_some(s);
        }
        if !killed && start.elapsed() > timeout {
            let _ = child.kill();
            killed = true;
        }
        if killed && start.elapsed() > timeout + Duration::from_secs(30) {
            eprintln!(
                "e2e: nixvm (pid {}) did not die after SIGKILL; leaving it",
                child.id()
            );
            if std::env::var_os(INSIDE).is_some() {
                // Stuck in L1's kernel: seen twice, and after it every boot in that L1 guest
                // stalled and no nixvm could be killed. The guest is done for; the tests not
                // yet finished run in a new one.
                println!(
                    "e2e: a process outlived SIGKILL: L1's kernel is stuck; ending this L1 guest"
                );
                std::process::exit(125);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- usage errors (host)

/// A usage error: exit status 2 and one line on stderr that names `needle`.
pub(crate) fn usage_error(args: &[&str], envs: &[(&str, &str)], needle: &str) -> TestResult {
    let r = nixvm(args, envs, Duration::from_secs(30));
    check!(
        r.code() == Some(2),
        "wanted exit status 2, got {:?}; stderr: {}",
        r.code(),
        r.stderr
    );
    let first = r.stderr.lines().next().unwrap_or("");
    check!(
        first.contains(needle),
        "stderr does not name {needle:?}: {}",
        r.stderr
    );
    check!(
        !r.stderr.contains("panicked") && !r.stderr.contains("backtrace"),
        "not a clean error: {}",
        r.stderr
    );
    Ok(())
}

/// Like `usage_error`, for nixvm's own errors (not clap's): exactly one line.
pub(crate) fn one_line_usage_error(
    args: &[&str],
    envs: &[(&str, &str)],
    needle: &str,
) -> TestResult {
    usage_error(args, envs, needle)?;
    let r = nixvm(args, envs, Duration::from_secs(30));
    check!(
        r.stderr.trim_end().lines().count() == 1,
        "more than one line: {}",
        r.stderr
    );
    Ok(())
}

pub(crate) struct Guest {
    pub(crate) vmlinuz: String,
    pub(crate) vmlinux: String,
    pub(crate) initrd: String,
}

impl Guest {
    pub(crate) fn args<'a>(&'a self, kernel: &'a str, cmdline: &'a str) -> Vec<&'a str> {
        vec![
            "--kernel",
            kernel,
            "--initrd",
            &self.initrd,
            "--cmdline",
            cmdline,
        ]
    }
}

pub(crate) fn cmdline(action: &str) -> String {
    format!("console=ttyS0 quiet panic=-1 {NIXOS_ARGS} nixvm.action={action}")
}

pub(crate) fn boot(args: &[&str]) -> Run {
    boot_env(args, &[])
}

pub(crate) fn boot_env(args: &[&str], envs: &[(&str, &str)]) -> Run {
    retry_stalled(
        "boot",
        || nixvm(args, envs, BOOT_TIMEOUT),
        |r| r.status.is_none() || spontaneous_reset(r.code(), &r.stdout, &r.stderr),
    )
}

/// The guest reset (exit 3) without asking for it: before its init ran, or by a triple fault
/// (nixvm's warning on stderr; also before the guest printed anything) while its test did not
/// reboot or panic it. The nested-KVM route does that now and then, with QEMU as with nixvm;
/// such a boot runs once more. (`console` is what the guest printed.)
pub(crate) fn spontaneous_reset(code: Option<i32>, console: &str, stderr: &str) -> bool {
    let asked = ["NIXVM-TEST: reboot", "NIXVM-TEST: panic"]
        .iter()
        .any(|m| console.contains(m));
    let before_init = !console.is_empty() && !console.contains("NIXVM-TEST: init");
    code == Some(3) && (before_init || (stderr.contains(TRIPLE_FAULT) && !asked))
}

/// L1's tracefs, mounted if need be; None outside L1 or where it cannot be had.
fn tracefs() -> Option<&'static Path> {
    std::env::var_os(INSIDE)?;
    let dir = Path::new("/sys/kernel/tracing");
    if !dir.join("trace").exists() {
        Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(dir)
            .status()
            .ok()?;
    }
    Some(dir)
}

/// A trace instance of L1's (its own buffer; [`kvm_exits_report`] uses the main one) that
/// keeps its guests' shutdown exits (triple faults) and the exceptions KVM injected into
/// them. On AMD, KVM puts a vCPU that triple-faulted into its INIT state before nixvm can
/// ask where it was (vmm/src/vcpu.rs); the exit's trace event still has the guest's RIP.
const SHUTDOWN_TRACE: &str = "instances/nixvm-e2e-shutdowns";

/// Starts [`SHUTDOWN_TRACE`] inside L1 (best effort: a run without it only says less).
pub(crate) fn trace_shutdowns() {
    let Some(dir) = tracefs() else { return };
    let dir = dir.join(SHUTDOWN_TRACE);
    let _ = std::fs::create_dir(&dir);
    let exit = dir.join("events/kvm/kvm_exit");
    // SVM_EXIT_SHUTDOWN: L1's KVM runs on (emulated) AMD SVM.
    let _ = std::fs::write(exit.join("filter"), "exit_reason == 127");
    let _ = std::fs::write(exit.join("enable"), "1");
    let _ = std::fs::write(dir.join("events/kvm/kvm_inj_exception/enable"), "1");
}

/// The last `n` events of [`SHUTDOWN_TRACE`] ("kvm_exit: vcpu 0 reason shutdown rip 0x…",
/// "kvm_inj_exception: #GP (0x0)"), for a guest that reset without asking.
pub(crate) fn shutdown_trace(n: usize) -> Option<String> {
    let trace = std::fs::read_to_string(tracefs()?.join(SHUTDOWN_TRACE).join("trace")).ok()?;
    let events: Vec<&str> = trace.lines().filter(|l| !l.starts_with('#')).collect();
    let last = &events[events.len().saturating_sub(n)..];
    Some(format!(
        "e2e: L1's last shutdown exits and injected exceptions ({SHUTDOWN_TRACE}):\n{}",
        last.join("\n")
    ))
}

/// What nixvm says on stderr when the guest triple-faults (vmm/src/vcpu.rs).
const TRIPLE_FAULT: &str = "triple fault in the guest";

/// How many times a stalled run is tried in all (a stall of the systemd boot costs minutes).
const ATTEMPTS: usize = 2;

/// Runs `f`, and again (up to [`ATTEMPTS`] in all) while `stalled` says its result is a
/// stall.
pub(crate) fn retry_stalled<T>(
    what: &str,
    mut f: impl FnMut() -> T,
    stalled: impl Fn(&T) -> bool,
) -> T {
    working_on(what);
    let mut result = f();
    for _ in 1..ATTEMPTS {
        if !stalled(&result) {
            break;
        }
        println!(
            "e2e: {what} stalled or the guest reset without asking (known hazards of the nested-KVM route); once more"
        );
        if let Some(trace) = shutdown_trace(12) {
            println!("{trace}");
        }
        working_on(what);
        result = f();
    }
    result
}

pub(crate) fn expect_markers(r: &Run, want: &[&str]) -> TestResult {
    let got = r.markers();
    for w in want {
        check!(
            got.iter().any(|g| g.starts_with(w)),
            "no marker {w:?} on the console\n{}",
            r.describe()
        );
    }
    Ok(())
}

/// Checks that the guest printed the marker `NIXVM-TEST: key=want`.
pub(crate) fn expect_marker(r: &Run, key: &str, want: &str) -> TestResult {
    check!(
        r.marker(key) == Some(want),
        "guest saw {key}={:?}, expected {want:?}\n{}",
        r.marker(key),
        r.describe()
    );
    Ok(())
}

/// Runs one boot that checks several things (once more if it stalled) and reports each
/// check under its name; `boot` returns the checks' results in the order of `names`.
pub(crate) fn group(
    t: &mut Runner,
    names: &[&str],
    what: &str,
    boot: impl FnMut() -> Result<Vec<TestResult>, String>,
) {
    if !names.iter().any(|n| t.wants(n)) {
        return;
    }
    let stalled = |r: &Result<_, String>| r.as_ref().is_err_and(|e| e.contains(STALLED));
    let mut boot = boot;
    let attempt = || {
        let r = boot();
        if let Some(e) = r.as_ref().err().filter(|e| e.contains(STALLED)) {
            // What the guest had printed: tells a freeze of the route from a hang of ours.
            let tail = tail(e, 25);
            println!("e2e: {what} stalled; its console ended with:\n{tail}");
        }
        r
    };
    match retry_stalled(what, attempt, stalled) {
        Ok(results) => {
            for (name, result) in names.iter().zip(results) {
                t.run(name, || result);
            }
        }
        Err(e) => {
            // Said once in full: CI shows only the tail of the output, which a dozen copies
            // of the same console would fill. A stall stays one for each check.
            let again = if e.contains(STALLED) {
                format!("as above: {what} {STALLED}")
            } else {
                format!("as above: {what}")
            };
            let mut why = e;
            for name in names {
                t.run(name, || Err(std::mem::replace(&mut why, again.clone())));
            }
        }
    }
}

/// Reads from the console socket until `want` appears; returns everything read.
pub(crate) fn read_until(
    s: &mut BufReader<UnixStream>,
    want: &str,
    timeout: Duration,
) -> Result<String, String> {
    let start = Instant::now();
    let mut seen = String::new();
    while start.elapsed() < timeout {
        let mut line = Vec::new();
        match s.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                seen.push_str(&String::from_utf8_lossy(&line));
                if seen.contains(want) {
                    return Ok(seen);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("console socket: {e}; read so far:\n{seen}")),
        }
    }
    Err(format!(
        "{want:?} did not appear on the console socket {STALLED}; read:\n{seen}"
    ))
}

/// Waits up to `timeout` for a connection to `l` (nixvm's `connect=`); blocking again after.
pub(crate) fn accept_within(l: &UnixListener, timeout: Duration) -> Result<UnixStream, String> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("nixvm never connected to {l:?}: {e}")),
        }
    }
}

/// What every thread of `pid` and of its descendants is doing: its state, the system call
/// it is in and the CPU time it used. When a guest stops making progress, this tells a vCPU
/// thread that is runnable and inside KVM_RUN (the nested route not running the guest) from
/// one of nixvm's threads waiting on something.
fn threads_report(pid: u32) -> String {
    // Parent of each process, from /proc/N/stat (the field after the command's ")").
    let stat = |path: &Path| -> Option<(String, Vec<String>)> {
        let s = std::fs::read_to_string(path).ok()?;
        let (head, rest) = s.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        Some((comm, rest.split_whitespace().map(str::to_owned).collect()))
    };
    let mut family = vec![pid];
    let mut procs: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((_, f)) = stat(&e.path().join("stat")) {
            if let Some(ppid) = f.get(1).and_then(|p| p.parse().ok()) {
                procs.push((n, ppid));
            }
        }
    }
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(
            procs
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(n, _)| *n),
        );
        i += 1;
    }
    // SAFETY: sysconf has no preconditions.
    let ticks =
        f64::from(u32::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100));
    let mut out = String::from("e2e: threads of the VM's processes (state, system call, CPU s):");
    // Threads asleep that used under a second (device workers waiting for work) are counted,
    // not listed: the report is for the ones that run.
    let mut idle = 0;
    for p in family {
        let tasks = Path::new("/proc").join(p.to_string()).join("task");
        for t in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            let Some((comm, f)) = stat(&t.path().join("stat")) else {
                continue;
            };
            let cpu = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let syscall = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
            let syscall = syscall.split_whitespace().next().unwrap_or("?").to_owned();
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let state = f.first().map_or("?", String::as_str);
            if state == "S" && cpu(11) + cpu(12) < ticks {
                idle += 1;
                continue;
            }
            out.push_str(&format!(
                "\n  {p}/{} {comm} {} syscall {syscall} wchan {wchan} cpu {:.1}",
                t.file_name().to_string_lossy(),
                state,
                (cpu(11) + cpu(12)) / ticks,
            ));
        }
    }
    out.push_str(&format!("\n  and {idle} asleep, under 1 CPU s each"));
    out
}

/// What the guest's vCPUs did for two seconds, as L1's KVM saw it (its `kvm_exit` trace
/// events, by vCPU: how many exits, of which kinds, at which guest addresses). A vCPU with
/// no exits while its thread runs is one the route does not run; one exiting at the same
/// few addresses is a guest in a loop. Inside L1 only (its tracefs, mounted if need be).
fn kvm_exits_report() -> Option<String> {
    let dir = tracefs()?;
    let enable = dir.join("events/kvm/kvm_exit/enable");
    std::fs::write(dir.join("trace"), "").ok()?;
    std::fs::write(&enable, "1").ok()?;
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&enable, "0").ok()?;
    let mut trace = String::new();
    std::fs::File::open(dir.join("trace"))
        .ok()?
        .take(8 << 20)
        .read_to_string(&mut trace)
        .ok()?;
    // "... kvm_exit: vcpu 0 reason hlt rip 0xffffffff81c3e1b5 info1 ..." (SVM, Linux 6.1);
    // for a nested page fault (npf) info1 is the error code and info2 the guest physical
    // address (an MMIO register of nixvm's, or RAM: then L1's KVM had to map or emulate).
    let mut by_vcpu: std::collections::BTreeMap<String, Vec<(String, String, Option<String>)>> =
        std::collections::BTreeMap::new();
    for l in trace.lines() {
        let Some((_, ev)) = l.split_once("kvm_exit: ") else {
            continue;
        };
        let w: Vec<&str> = ev.split_whitespace().collect();
        let after = |k: &str| {
            w.iter()
                .position(|x| *x == k)
                .and_then(|i| w.get(i + 1))
                .map_or_else(|| "?".to_owned(), |v| (*v).to_owned())
        };
        let reason = after("reason");
        let gpa =
            (reason == "npf").then(|| format!("{} (error {})", after("info2"), after("info1")));
        by_vcpu
            .entry(after("vcpu"))
            .or_default()
            .push((reason, after("rip"), gpa));
    }
    // The most frequent values, "value×count", at most `n`.
    let top = |vals: Vec<&String>, n: usize| {
        let mut counts: std::collections::HashMap<&String, usize> =
            std::collections::HashMap::new();
        for v in vals {
            *counts.entry(v).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        counts
            .iter()
            .take(n)
            .map(|(v, c)| format!("{v}×{c}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = String::from("e2e: the guests' exits in 2 s (L1's kvm_exit trace):");
    if by_vcpu.is_empty() {
        out.push_str(" none");
    }
    for (vcpu, exits) in &by_vcpu {
        out.push_str(&format!(
            "\n  vcpu {vcpu}: {} exits; {}; rip {}",
            exits.len(),
            top(exits.iter().map(|e| &e.0).collect(), 5),
            top(exits.iter().map(|e| &e.1).collect(), 4)
        ));
        let npf: Vec<&String> = exits.iter().filter_map(|e| e.2.as_ref()).collect();
        if !npf.is_empty() {
            out.push_str(&format!("; npf at {}", top(npf, 3)));
        }
    }
    Some(out)
}

/// nixvm running with stdout read line by line in the background.
pub(crate) struct Streaming {
    pub(crate) child: std::process::Child,
    pub(crate) lines: std::sync::mpsc::Receiver<String>,
    pub(crate) seen: String,
    /// Where the child's stderr goes: its tail is part of a failure.
    pub(crate) stderr: PathBuf,
}

/// The lines of `out` as they come, read by a thread of their own.
pub(crate) fn line_channel(
    out: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    lines
}

impl Streaming {
    pub(crate) fn spawn(args: &[&str]) -> Result<Streaming, String> {
        Self::spawn_with_stdin(args, Stdio::null())
    }

    pub(crate) fn spawn_with_stdin(args: &[&str], stdin: Stdio) -> Result<Streaming, String> {
        let mut cmd = Command::new(NIXVM);
        cmd.args(args).stdin(stdin);
        Self::spawn_command(cmd)
    }

    pub(crate) fn spawn_command(mut cmd: Command) -> Result<Streaming, String> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr = temp_dir().join(format!("streaming-{n}.stderr"));
        let err = std::fs::File::create(&stderr).map_err(|e| e.to_string())?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| e.to_string())?;
        let lines = line_channel(child.stdout.take().unwrap());
        Ok(Streaming {
            child,
            lines,
            seen: String::new(),
            stderr,
        })
    }

    /// What nixvm's threads and the guest's vCPUs are doing ([`threads_report`],
    /// [`kvm_exits_report`]): said when a guest stops making progress.
    pub(crate) fn stall_report(&self) -> String {
        let exits = kvm_exits_report().unwrap_or_default();
        format!("{}\n{exits}", threads_report(self.child.id()))
    }

    /// Keeps a console line read.
    pub(crate) fn push_line(&mut self, l: &str) {
        self.seen.push_str(l);
        self.seen.push('\n');
    }

    /// Waits for a line containing `want`; returns it.
    pub(crate) fn wait_for(&mut self, want: &str) -> Result<String, String> {
        self.wait_for_within(want, BOOT_TIMEOUT)
    }

    /// Like `wait_for`, with its own timeout. Says now and then that it still waits, so that
    /// a long wait inside L1 is not taken for a frozen L1.
    pub(crate) fn wait_for_within(
        &mut self,
        want: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut say = Instant::now() + Duration::from_secs(120);
        let mut ended = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if Instant::now() >= say {
                println!("e2e: still waiting for {want:?}");
                println!("{}", self.stall_report());
                say += Duration::from_secs(120);
            }
            match self.lines.recv_timeout(left.min(Duration::from_secs(10))) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Ok(l) => {
                    self.push_line(&l);
                    if l.contains(want) {
                        return Ok(l);
                    }
                }
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        let how = if ended {
            format!("before the output ended {}", self.ending())
        } else {
            STALLED.to_owned()
        };
        Err(format!("{want:?} never appeared {how}; {}", self.console()))
    }

    /// How nixvm ended (waiting a little for it): its exit status, or, when the guest reset
    /// without asking, the mark of a stall, which the nested route's hazard is retried as.
    /// Judged on the whole console: its remaining lines are read first (for up to 10 s).
    pub(crate) fn ending(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.push_line(&l);
            if Instant::now() > until {
                break;
            }
        }
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let status = wait_timeout(&mut self.child, Duration::from_secs(5));
        let code = status.and_then(|s| s.code());
        if spontaneous_reset(code, &self.seen, &err) {
            format!("{STALLED} (the guest reset without asking)")
        } else if let Some(status) = status {
            format!("({status})")
        } else {
            "(nixvm still runs)".to_owned()
        }
    }

    /// Err, the mark of a stall (which the test's retry boots once more), when nixvm reset the
    /// guest for a triple fault: in a test whose guest reboots in place (`--on-reboot
    /// restart`), nixvm does not exit, and the nested route's spontaneous reset shows only as
    /// a boot too many. Such a test's own reboots (`reboot -f`) never triple-fault.
    pub(crate) fn no_triple_fault(&self) -> TestResult {
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        check!(
            !err.contains(TRIPLE_FAULT),
            "{STALLED} (the guest reset without asking); {}",
            self.console()
        );
        Ok(())
    }

    /// Waits up to `timeout` for nixvm to exit, reading the console meanwhile: its status, or
    /// None when it did not exit although the guest had powered off (a hang of ours: killed,
    /// after printing what its threads and the guest's vCPUs were doing). Err (a stall, which
    /// the caller's retry boots once more) when the guest stopped before it powered off, the
    /// route's freeze.
    pub(crate) fn exit_within(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, String> {
        use std::sync::mpsc::RecvTimeoutError;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.push_line(&l);
                }
                return Ok(Some(status));
            }
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => self.push_line(&l),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let report = self.stall_report();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let what = format!("nixvm did not exit within {} s", timeout.as_secs());
        if self.seen.contains("reboot: Power down") {
            println!("e2e: {what} after the guest powered off:\n{report}");
            return Ok(None);
        }
        Err(format!("{what} {STALLED}; {}\n{report}", self.tails(15)))
    }

    /// The console so far and the tail of nixvm's stderr, for a failure.
    pub(crate) fn console(&self) -> String {
        self.report("console", &self.seen)
    }

    /// The console's last `n` lines and the tail of nixvm's stderr (where it says why it
    /// reset a guest), for a failure in a long run.
    pub(crate) fn tails(&self, n: usize) -> String {
        self.report(&format!("console (last {n} lines)"), &tail(&self.seen, n))
    }

    fn report(&self, what: &str, console: &str) -> String {
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("{what}:\n{console}\nstderr (tail):\n{}", tail(&err, 15))
    }

    /// The marker `key` has the value `want`; the console in the failure.
    pub(crate) fn expect(&self, key: &str, want: &str) -> TestResult {
        let got = self.marker(key).unwrap_or_default();
        check!(
            got == want,
            "{key}: {got:?}, wanted {want:?}\nconsole:\n{}",
            self.seen
        );
        Ok(())
    }

    pub(crate) fn marker(&self, key: &str) -> Option<String> {
        let prefix = format!("NIXVM-TEST: {key}=");
        self.seen.lines().find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix(prefix.as_str())
                .map(|v| without_kernel_message(v).to_owned())
        })
    }
}

/// Whether `line` is a kernel message ("[  377.38] watchdog: ..."): in the L1 run's output,
/// L1's own console, which a frozen L1 guest fills with its soft-lockup reports.
pub(crate) fn is_kernel_message(line: &str) -> bool {
    let line = line.trim_start();
    !line.is_empty() && without_kernel_message(line).is_empty()
}

/// A console line up to a kernel message that the kernel wrote into it (the guest's own
/// console output and printk share the serial port: "value[   92.37] platform ...").
fn without_kernel_message(line: &str) -> &str {
    let stamped = |rest: &str| {
        let rest = rest.trim_start();
        let (secs, after) = rest.split_once('.').unwrap_or(("", ""));
        let digits = after.split_once(']').map_or("", |(d, _)| d);
        !secs.is_empty()
            && secs.bytes().all(|b| b.is_ascii_digit())
            && !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
    };
    line.match_indices('[')
        .find(|(i, _)| stamped(&line[i + 1..]))
        .map_or(line, |(i, _)| &line[..i])
}

impl Drop for Streaming {
    fn drop(&mut self) {
        wait_timeout(&mut self.child, Duration::ZERO);
    }
}

/// A raw disk image of `len` bytes: `fill(i)` gives byte i.
pub(crate) fn disk_image(name: &str, len: usize, fill: impl Fn(usize) -> u8) -> PathBuf {
    let p = temp_dir().join(name);
    std::fs::write(&p, (0..len).map(fill).collect::<Vec<u8>>()).unwrap();
    p
}

/// A disk holding a guest script, padded with newlines to whole sectors.
pub(crate) fn script_disk(name: &str, script: &str) -> PathBuf {
    let mut b = script.as_bytes().to_vec();
    b.resize(b.len().div_ceil(512) * 512 + 512, b'\n');
    let p = temp_dir().join(name);
    std::fs::write(&p, b).unwrap();
    p
}

pub(crate) fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    first_word(&out.stdout)
}

/// The sha256 of bytes in memory, by the same sha256sum.
pub(crate) fn sha256_bytes(b: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("piped");
    let data = b.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    let _ = feeder.join();
    first_word(&out.stdout)
}

/// sha256sum's answer: the hash before the file name.
fn first_word(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

pub(crate) fn sh(script: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(root().join("resources").join(script))
        .args(args)
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run resources/{script}: {e}"))?;
    if !out.status.success() {
        return Err(format!("resources/{script} failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn guest() -> Guest {
    let a = assets();
    let s = |f: &str| a.join(f).to_str().expect("utf-8 path").to_owned();
    Guest {
        vmlinuz: s("vmlinuz"),
        vmlinux: s("vmlinux"),
        initrd: s("initramfs.cpio.gz"),
    }
}

/// Builds `resources/NAME.c` as a static binary for the test guest; Err (with why) without a
/// C compiler.
pub(crate) fn build_static(name: &str) -> Result<PathBuf, String> {
    let out = temp_dir().join(name);
    let src = root().join(format!("resources/{name}.c"));
    let r = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .map_err(|e| format!("no C compiler (cc: {e}; Debian packages gcc libc6-dev)"))?;
    if !r.status.success() {
        return Err(format!(
            "cc -static failed (Debian packages gcc libc6-dev): {}",
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(out)
}

/// A read-only disk holding an executable, and the script line that copies it to
/// /tmp/NAME in the guest (`disk` is the guest's device, e.g. vdb).
pub(crate) fn exe_disk(bin: &Path, disk: &str) -> Result<(PathBuf, String), String> {
    let exe = std::fs::read(bin).map_err(|e| e.to_string())?;
    let name = bin
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("exe")
        .to_owned();
    let size = exe.len();
    let img = disk_image(&format!("{name}-exe.img"), size.div_ceil(512) * 512, |i| {
        exe.get(i).copied().unwrap_or(0)
    });
    let line = format!("head -c {size} /dev/{disk} > /tmp/{name} && chmod +x /tmp/{name}");
    Ok((img, line))
}
