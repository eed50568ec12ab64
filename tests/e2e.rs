//! End-to-end tests: the real `nixvm` binary, a real Debian kernel, a busybox test guest.
//!
//! - Usage errors run here, on the host: they start no guest.
//! - Guest boots need a KVM that boots Linux. `resources/kvm-route.sh` says whether /dev/kvm
//!   here does (`direct`), or whether the boots must run inside an L1 guest with emulated
//!   AMD SVM (`l1`: this binary re-runs itself there through `resources/l1run.sh`, once, for
//!   all boots). Where neither works the boots report `skipped: why`; under CI=true a skip
//!   is a failure.
//! - The guest's /init (`resources/guest-init`) prints `NIXVM-TEST: ...` marker lines.
//!
//! Run with `cargo test -p nixvm --test e2e` (a name filter as first argument selects tests).
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NIXVM: &str = env!("CARGO_BIN_EXE_nixvm");
const INSIDE: &str = "NIXVM_E2E_INSIDE";
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
/// Marks a failure where nothing happened before a timeout. The L1 route (nested KVM under
/// TCG) now and then freezes a guest, whichever VMM runs it: such a test runs once more.
const STALLED: &str = "(stalled: no progress before the timeout)";
/// A NixOS-style command line; it must reach /proc/cmdline byte for byte.
const NIXOS_ARGS: &str = "init=/nix/store/3m6ai0zm3rg7a2z1s2ad1xfzdc0wz6kn-nixos-system-x-24.11/init regInfo=/nix/store/ijgclfphrd1vzk6qvbwzy0mbcgqnfzgf-closure-info/registration";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn assets() -> PathBuf {
    root().join("target/e2e-assets")
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nixvm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

type TestResult = Result<(), String>;

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Runs tests, prints `test NAME ... ok|FAILED|skipped`, and counts.
#[derive(Default)]
struct Runner {
    filter: Option<String>,
    passed: usize,
    failed: Vec<String>,
    skipped: usize,
}

impl Runner {
    fn wants(&self, name: &str) -> bool {
        // A filter is one or more comma-separated parts of test names.
        self.filter
            .as_deref()
            .is_none_or(|f| f.split(',').any(|p| name.contains(p)))
    }

    fn record(&mut self, name: &str, result: TestResult) {
        match result {
            Ok(()) => {
                println!("test {name} ... ok");
                self.passed += 1;
            }
            Err(why) => {
                println!(
                    "test {name} ... FAILED\n    {}",
                    why.replace('\n', "\n    ")
                );
                self.failed.push(name.to_owned());
            }
        }
    }

    fn run(&mut self, name: &str, f: impl FnOnce() -> TestResult) {
        if self.wants(name) {
            let r = f();
            self.record(name, r);
        }
    }

    /// Like `run`, but a test that stalled runs once more (and says so).
    fn run_retry(&mut self, name: &str, mut f: impl FnMut() -> TestResult) {
        if self.wants(name) {
            let r = retry_stalled(name, &mut f, |r| {
                r.as_ref().is_err_and(|e| e.contains(STALLED))
            });
            self.record(name, r);
        }
    }

    fn skip(&mut self, name: &str, why: &str) {
        if self.wants(name) {
            println!("test {name} ... skipped: {why}");
            self.skipped += 1;
        }
    }
}

/// What a finished nixvm run left behind.
struct Run {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    fn markers(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("NIXVM-TEST: "))
            .collect()
    }

    fn marker(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.markers()
            .into_iter()
            .find_map(|m| m.strip_prefix(prefix.as_str()))
    }

    fn describe(&self) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "exit {:?}{}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            self.status,
            if self.status.is_none() { STALLED } else { "" },
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

/// Runs nixvm to completion (killing it after `timeout`), stdin from /dev/null.
fn nixvm(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Run {
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
fn wait_timeout(child: &mut std::process::Child, timeout: Duration) -> Option<ExitStatus> {
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
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- usage errors (host)

/// A usage error: exit status 2 and one line on stderr that names `needle`.
fn usage_error(args: &[&str], envs: &[(&str, &str)], needle: &str) -> TestResult {
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
fn one_line_usage_error(args: &[&str], envs: &[(&str, &str)], needle: &str) -> TestResult {
    usage_error(args, envs, needle)?;
    let r = nixvm(args, envs, Duration::from_secs(30));
    check!(
        r.stderr.trim_end().lines().count() == 1,
        "more than one line: {}",
        r.stderr
    );
    Ok(())
}

fn usage_tests(t: &mut Runner, kernel: Option<&Path>) {
    let tmp = temp_dir();
    t.run("usage_missing_kernel", || {
        one_line_usage_error(
            &["--kernel", "/nonexistent/vmlinuz"],
            &[],
            "/nonexistent/vmlinuz",
        )
    });
    t.run("usage_no_kernel_flag", || {
        one_line_usage_error(&[], &[], "--kernel")
    });
    t.run("usage_kernel_is_a_directory", || {
        one_line_usage_error(&["--kernel", "/"], &[], "cannot read kernel /")
    });
    t.run("usage_unrecognised_kernel_format", || {
        let script = root().join("resources/guest-init");
        one_line_usage_error(
            &["--kernel", script.to_str().unwrap()],
            &[],
            "unrecognised kernel format",
        )
    });
    t.run("usage_bad_size_syntax", || {
        usage_error(&["--memory", "12X"], &[], "12X")
    });
    t.run("usage_bad_serial", || {
        usage_error(&["--serial", "tcp=1"], &[], "tcp=1")
    });
    t.run("usage_unknown_config_field", || {
        let f = tmp.join("bad.json");
        std::fs::write(&f, r#"{"kernal": "/boot/vmlinuz"}"#).unwrap();
        one_line_usage_error(&["--config", f.to_str().unwrap()], &[], "kernal")
    });
    t.run("usage_storefs_missing_dir", || {
        let sock = tmp.join("storefs-usage.sock");
        one_line_usage_error(
            &[
                "storefs",
                "--socket",
                sock.to_str().unwrap(),
                "--path",
                "/nonexistent/store",
            ],
            &[],
            "/nonexistent/store",
        )
    });
    let Some(kernel) = kernel else {
        for name in [
            "usage_memory_too_small",
            "usage_memory_too_large",
            "usage_zero_cpus",
            "usage_too_many_cpus",
            "usage_initrd_too_large",
            "usage_kvm_missing",
            "usage_kvm_not_writable",
            "usage_kvm_not_kvm",
            "usage_serial_socket_busy",
            "dry_run_prints_resolved_config",
        ] {
            t.skip(name, "no guest kernel (resources/assets.sh failed)");
        }
        return;
    };
    let k = kernel.to_str().unwrap();
    t.run("usage_memory_too_small", || {
        one_line_usage_error(&["--kernel", k, "--memory", "32M"], &[], "32M")
    });
    t.run("usage_memory_too_large", || {
        one_line_usage_error(&["--kernel", k, "--memory", "64T"], &[], "64T")
    });
    t.run("usage_zero_cpus", || {
        one_line_usage_error(&["--kernel", k, "--cpus", "0"], &[], "--cpus")
    });
    t.run("usage_too_many_cpus", || {
        one_line_usage_error(&["--kernel", k, "--cpus", "999"], &[], "999")
    });
    t.run("usage_initrd_too_large", || {
        let big = tmp.join("big.img");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(200 << 20)
            .unwrap();
        one_line_usage_error(
            &[
                "--kernel",
                k,
                "--initrd",
                big.to_str().unwrap(),
                "--memory",
                "64M",
            ],
            &[],
            "big.img",
        )
    });
    t.run("usage_kvm_missing", || {
        one_line_usage_error(
            &["--kernel", k],
            &[("NIXVM_KVM_DEVICE", "/nonexistent/kvm")],
            "/nonexistent/kvm does not exist",
        )
    });
    t.run("usage_kvm_not_kvm", || {
        one_line_usage_error(
            &["--kernel", k],
            &[("NIXVM_KVM_DEVICE", "/dev/null")],
            "/dev/null is not a KVM device",
        )
    });
    t.run("usage_kvm_not_writable", || kvm_not_writable(k, &tmp));
    t.run("usage_serial_socket_busy", || {
        let sock = tmp.join("busy.sock");
        let _held = UnixListener::bind(&sock).unwrap();
        let arg = format!("socket={}", sock.display());
        one_line_usage_error(&["--kernel", k, "--serial", &arg], &[], "in use")
    });
    t.run("usage_net_no_such_tap", || {
        one_line_usage_error(
            &[
                "--kernel",
                k,
                "--net",
                "tap=nixvm-nosuch0",
                "--serial",
                "off",
            ],
            &[],
            "no network interface \"nixvm-nosuch0\"",
        )
    });
    t.run("usage_net_fd_not_a_tap", || {
        // The test runs nixvm with stdin from /dev/null.
        one_line_usage_error(
            &["--kernel", k, "--net", "fd=0", "--serial", "off"],
            &[],
            "fd 0 is not a TAP",
        )
    });
    t.run("usage_net_bad_spec", || {
        usage_error(
            &["--kernel", k, "--net", "tap=a,fd=3"],
            &[],
            "invalid network interface",
        )
    });
    t.run("usage_api_socket_busy", || {
        let sock = tmp.join("api-busy.sock");
        let _held = UnixListener::bind(&sock).unwrap();
        let arg = sock.to_str().unwrap();
        one_line_usage_error(&["--kernel", k, "--api-socket", arg], &[], "in use")
    });
    t.run("usage_ctl_no_vm", || {
        let sock = tmp.join("nobody.sock");
        let arg = sock.to_str().unwrap();
        one_line_usage_error(
            &["ctl", "--api-socket", arg, "ping"],
            &[],
            "nothing listens",
        )
    });
    t.run("usage_fs_missing_socket", || {
        let sock = tmp.join("nobody-listens.sock");
        let arg = format!("tag=ro-store,socket={}", sock.display());
        one_line_usage_error(
            &["--kernel", k, "--fs", &arg, "--serial", "off"],
            &[("NIXVM_VHOST_USER_WAIT", "1")],
            &format!("nothing listens on vhost-user socket {}", sock.display()),
        )
    });
    t.run("dry_run_prints_resolved_config", || {
        let cfg = tmp.join("vm.json");
        std::fs::write(
            &cfg,
            format!(r#"{{"kernel": "{k}", "memory": "1G", "cpus": 2}}"#),
        )
        .unwrap();
        let r = nixvm(
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--cpus",
                "3",
                "--dry-run",
            ],
            &[],
            Duration::from_secs(30),
        );
        check!(r.code() == Some(0), "dry run failed: {}", r.describe());
        let v: serde_json::Value =
            serde_json::from_str(&r.stdout).map_err(|e| format!("not JSON: {e}: {}", r.stdout))?;
        check!(v["cpus"] == 3, "flag did not override the file: {v}");
        check!(
            v["memory"] == "1G" && v["kernel_format"] == "bzImage",
            "wrong resolved config: {v}"
        );
        check!(
            v["serial"] == "stdio" && v["cmdline"] == "console=ttyS0",
            "wrong defaults: {v}"
        );
        Ok(())
    });
}

/// /dev/kvm that this user cannot open read-write: as root, run nixvm as `nobody`.
fn kvm_not_writable(kernel: &str, tmp: &Path) -> TestResult {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dev = tmp.join("kvm-ro");
    std::fs::write(&dev, b"").unwrap();
    let mut cmd = if root {
        // A world-readable, root-only-writable stand-in, opened by an unprivileged user.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", NIXVM]);
        c
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o444)).unwrap();
        Command::new(NIXVM)
    };
    let out = cmd
        .args(["--kernel", kernel])
        .env("NIXVM_KVM_DEVICE", &dev)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run setpriv: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    check!(
        out.status.code() == Some(2),
        "wanted 2, got {:?}: {stderr}",
        out.status.code()
    );
    check!(
        stderr.contains("kvm` group") && stderr.trim_end().lines().count() == 1,
        "unclear error: {stderr}"
    );
    Ok(())
}

// ---------------------------------------------------------------- guest boots

struct Guest {
    vmlinuz: String,
    vmlinux: String,
    initrd: String,
}

impl Guest {
    fn args<'a>(&'a self, kernel: &'a str, cmdline: &'a str) -> Vec<&'a str> {
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

fn cmdline(action: &str) -> String {
    format!("console=ttyS0 quiet panic=-1 {NIXOS_ARGS} nixvm.action={action}")
}

fn boot(args: &[&str]) -> Run {
    boot_env(args, &[])
}

fn boot_env(args: &[&str], envs: &[(&str, &str)]) -> Run {
    retry_stalled(
        "boot",
        || nixvm(args, envs, BOOT_TIMEOUT),
        |r| r.status.is_none(),
    )
}

/// Runs `f`, and once more if `stalled` says its result is a stall.
fn retry_stalled<T>(what: &str, mut f: impl FnMut() -> T, stalled: impl Fn(&T) -> bool) -> T {
    let first = f();
    if !stalled(&first) {
        return first;
    }
    println!("e2e: {what} stalled (a known freeze of the nested-KVM route); once more");
    f()
}

fn expect_markers(r: &Run, want: &[&str]) -> TestResult {
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

fn boot_tests(t: &mut Runner, g: &Guest) {
    // One boot, several checks: a bzImage with 2 vCPUs, 384M and a NixOS command line.
    let bz_names = [
        "boot_bzimage",
        "cpus_2_online",
        "memory_384m",
        "cmdline_verbatim",
        "poweroff_exits_0",
    ];
    if bz_names.iter().any(|n| t.wants(n)) {
        let cl = cmdline("poweroff");
        let mut args = g.args(&g.vmlinuz, &cl);
        args.extend(["--cpus", "2", "--memory", "384M"]);
        let r = boot(&args);
        t.run("boot_bzimage", || expect_markers(&r, &["init"]));
        t.run("cpus_2_online", || {
            check!(
                r.marker("cpus") == Some("2"),
                "guest saw cpus={:?}\n{}",
                r.marker("cpus"),
                r.describe()
            );
            Ok(())
        });
        t.run("memory_384m", || {
            let kb: u64 = r
                .marker("memtotal_kb")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| r.describe())?;
            // MemTotal is RAM less what the kernel keeps for itself.
            check!(
                (300_000..=393_216).contains(&kb),
                "MemTotal {kb} kB for --memory 384M"
            );
            Ok(())
        });
        t.run("cmdline_verbatim", || {
            check!(
                r.marker("cmdline") == Some(cl.as_str()),
                "guest saw {:?}, we passed {cl:?}",
                r.marker("cmdline")
            );
            Ok(())
        });
        t.run("poweroff_exits_0", || {
            expect_markers(&r, &["poweroff"])?;
            check!(r.code() == Some(0), "poweroff: {}", r.describe());
            Ok(())
        });
    }

    // ELF vmlinux through its PVH entry, 4 vCPUs, reboot, console into a file.
    let pvh_names = [
        "boot_elf_pvh",
        "cpus_4_online",
        "reboot_exits_3",
        "serial_file",
    ];
    if pvh_names.iter().any(|n| t.wants(n)) {
        let log = temp_dir().join("console.log");
        let serial = format!("file={}", log.display());
        let cl = cmdline("reboot");
        let mut args = g.args(&g.vmlinux, &cl);
        args.extend(["--cpus", "4", "--serial", &serial]);
        let r = boot(&args);
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        let r = Run {
            stdout: console,
            ..r
        };
        t.run("boot_elf_pvh", || expect_markers(&r, &["init"]));
        t.run("serial_file", || expect_markers(&r, &["init", "reboot"]));
        t.run("cpus_4_online", || {
            check!(
                r.marker("cpus") == Some("4"),
                "guest saw cpus={:?}\n{}",
                r.marker("cpus"),
                r.describe()
            );
            Ok(())
        });
        t.run("reboot_exits_3", || {
            check!(r.code() == Some(3), "reboot: {}", r.describe());
            Ok(())
        });
    }

    // A kernel panic with panic=-1 reboots; settings from a JSON config file.
    t.run("panic_reboots_exits_3_config_file", || {
        let cfg = temp_dir().join("panic.json");
        let json = serde_json::json!({
            "kernel": g.vmlinuz, "initrd": g.initrd, "cmdline": cmdline("panic"), "memory": 256
        });
        std::fs::write(&cfg, json.to_string()).unwrap();
        let r = boot(&["--config", cfg.to_str().unwrap()]);
        expect_markers(&r, &["init", "panic"])?;
        check!(
            r.stdout.contains("Kernel panic"),
            "no panic seen\n{}",
            r.describe()
        );
        check!(r.code() == Some(3), "panic=-1: {}", r.describe());
        Ok(())
    });

    t.run_retry("serial_socket_attach", || serial_socket(g));

    // Every way a guest reboots ends nixvm with status 3: the i8042 reset line, the ACPI
    // reset register, a triple fault (Linux's default path ends at the BIOS reset vector).
    for (method, cause) in [
        ("k", "the guest pulsed the reset line"),
        ("a", "the guest wrote the reset register"),
        ("t", "triple fault"),
    ] {
        t.run(&format!("reboot_method_{method}_exits_3"), || {
            let cl = format!("{} reboot={method}", cmdline("reboot"));
            let r = boot_env(&g.args(&g.vmlinuz, &cl), &[("NIXVM_LOG", "info")]);
            expect_markers(&r, &["reboot"])?;
            check!(r.code() == Some(3), "reboot={method}: {}", r.describe());
            check!(
                r.stderr.contains(cause),
                "reboot={method} did not reset by {cause:?}: {}",
                r.stderr
            );
            Ok(())
        });
    }

    t.run_retry("stdio_terminal_raw_input_and_restored", || {
        stdio_terminal(g)
    });

    let blk_names = [
        "blk_sha256_matches_host",
        "blk_order_and_serials",
        "blk_readonly_refuses_writes",
        "blk_flushed_write_survives_kill_9",
        "blk_second_vm_on_locked_image_fails",
        "blk_driver_reload",
        "blk_parallel_requests",
        "rng_hwrng_gives_bytes",
    ];
    group(t, &blk_names, "the disks boot", || disks_boot(g));
    lifecycle_tests(t, g);
    nix_runner_test(t);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        for name in NET_NAMES {
            t.skip(name, "creating a network namespace and TAPs needs root");
        }
    } else {
        group(t, &NET_NAMES, "the network boot", || net_boot(g));
    }
    group(t, &STOREFS_NAMES, "the storefs boot", || storefs_boot(g));
    match virtiofsd() {
        Some(bin) => group(t, &FS_NAMES, "the virtio-fs boot", || fs_boot(g, &bin)),
        None => {
            for name in FS_NAMES {
                t.skip(name, "no virtiofsd (cargo install virtiofsd --locked)");
            }
        }
    }

    t.run_retry("sigterm_ignored_button_stops_after_timeout_143", || {
        // The guest waits for a console line that never comes and ignores the power button.
        let (mut child, sock) = socket_guest(g, "term", &["--shutdown-timeout", "2"])?;
        let ready = connect_console(&sock)
            .and_then(|mut c| read_until(&mut c, "NIXVM-TEST: ready", BOOT_TIMEOUT).map(drop));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        ready?;
        check!(
            status.and_then(|s| s.code()) == Some(143),
            "after SIGTERM: {status:?}"
        );
        check!(!sock.exists(), "socket file left behind");
        Ok(())
    });
}

/// Guest script lines: busybox acpid powers the guest off on the ACPI power button.
const ACPID: &str = r#"
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho "NIXVM-TEST: button" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /tmp/acpid.log
# acpid forks, then opens the input devices: a button pressed before that is lost.
sleep 2
"#;

/// Guest script lines: a line every 0.3 s, forever.
const TICKS: &str = r#"
echo "NIXVM-TEST: ready"
i=0
while :; do i=$((i + 1)); echo "tick $i"; sleep 0.3; done
"#;

/// Runs `nixvm ctl --api-socket SOCK ARGS`.
fn ctl(sock: &Path, args: &[&str]) -> Run {
    let s = sock.to_str().expect("utf-8 path");
    let mut all = vec!["ctl", "--api-socket", s];
    all.extend(args);
    nixvm(&all, &[], BOOT_TIMEOUT)
}

/// A guest that runs `script` with a control socket; returns it streaming its console.
fn api_guest(
    g: &Guest,
    name: &str,
    script: &str,
    extra: &[&str],
) -> Result<(Streaming, PathBuf), String> {
    let sock = temp_dir().join(format!("{name}-api.sock"));
    let disk = script_disk(&format!("{name}-script.img"), script);
    let d = format!("path={},readonly=on", disk.display());
    let cl = cmdline("script");
    let s = sock.to_str().expect("utf-8 path");
    let mut args = g.args(&g.vmlinuz, &cl);
    // The script disk last: the guest runs the script of its last disk.
    args.extend(extra);
    args.extend(["--api-socket", s, "--disk", &d]);
    let mut cmd = Command::new(NIXVM);
    cmd.args(&args).stdin(Stdio::null());
    Ok((Streaming::spawn_command(cmd)?, sock))
}

fn lifecycle_tests(t: &mut Runner, g: &Guest) {
    t.run_retry("api_ping_info_pause_resume", || {
        // A socket file a crashed nixvm left behind does not stop the next one.
        let stale = temp_dir().join("pause-api.sock");
        drop(UnixListener::bind(&stale).map_err(|e| e.to_string())?);
        let (mut vm, sock) = api_guest(g, "pause", &format!("{ACPID}{TICKS}"), &[])?;
        vm.wait_for("tick 2")?;
        let ping = ctl(&sock, &["ping"]);
        check!(
            ping.code() == Some(0) && ping.stdout.contains("\"protocol\":1"),
            "ping: {}",
            ping.describe()
        );
        let info = ctl(&sock, &["info"]);
        check!(
            info.code() == Some(0)
                && info.stdout.contains("\"state\": \"running\"")
                && info.stdout.contains("\"vcpus\": 1"),
            "info: {}",
            info.describe()
        );
        let pause = ctl(&sock, &["pause"]);
        check!(pause.code() == Some(0), "pause: {}", pause.describe());
        // Lines already on their way may still come; then nothing for 3 s.
        std::thread::sleep(Duration::from_millis(500));
        while vm.lines.try_recv().is_ok() {}
        std::thread::sleep(Duration::from_secs(3));
        let during: Vec<String> = vm.lines.try_iter().collect();
        check!(
            during.is_empty(),
            "the console advanced while paused: {during:?}"
        );
        let info = ctl(&sock, &["info"]);
        check!(
            info.stdout.contains("\"state\": \"paused\""),
            "info while paused: {}",
            info.describe()
        );
        let resume = ctl(&sock, &["resume"]);
        check!(resume.code() == Some(0), "resume: {}", resume.describe());
        vm.wait_for("tick ")?;
        let down = ctl(&sock, &["shutdown", "--timeout", "120"]);
        let status = wait_timeout(&mut vm.child, Duration::from_secs(30));
        check!(
            down.code() == Some(0),
            "shutdown of a guest with acpid: {}",
            down.describe()
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the guest powered off: {status:?}"
        );
        check!(!sock.exists(), "control socket left behind");
        Ok(())
    });
    t.run_retry("api_shutdown_powers_off_exit_0", || {
        let (mut vm, sock) = api_guest(g, "down", &format!("{ACPID}{TICKS}"), &[])?;
        vm.wait_for("NIXVM-TEST: ready")?;
        let down = ctl(&sock, &["shutdown"]);
        let status = wait_timeout(&mut vm.child, Duration::from_secs(30));
        let _ = vm.wait_for("NIXVM-TEST: button");
        check!(
            down.code() == Some(0) && down.stdout.contains("powered off"),
            "ctl shutdown: {}",
            down.describe()
        );
        check!(
            vm.seen.contains("NIXVM-TEST: button"),
            "acpid never saw the button:\n{}",
            vm.seen
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm: {status:?}"
        );
        Ok(())
    });
    t.run_retry("sigterm_powers_off_through_acpid_exit_0", || {
        let (mut vm, _sock) = api_guest(g, "term0", &format!("{ACPID}{TICKS}"), &[])?;
        vm.wait_for("NIXVM-TEST: ready")?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "after SIGTERM, with acpid: {status:?}"
        );
        Ok(())
    });
    t.run_retry("on_reboot_restart_boots_again", || {
        // A counter on the first disk: the guest reboots twice, then powers off.
        let counter = disk_image("reboot-counter.img", 4096, |_| 0);
        let c = format!("path={}", counter.display());
        let script = r#"
n=$(head -c 8 /dev/vda | tr -dc 0-9)
n=$(( ${n:-0} + 1 ))
printf '%08d' $n > /tmp/c
dd if=/tmp/c of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
echo "NIXVM-TEST: boot_count=$n"
if [ $n -lt 3 ]; then reboot -f; sleep 60; fi
"#;
        let (mut vm, _sock) = api_guest(
            g,
            "restart",
            script,
            &["--on-reboot", "restart", "--disk", &c],
        )?;
        vm.wait_for("NIXVM-TEST: boot_count=3")?;
        let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);
        let boots = vm.seen.matches("NIXVM-TEST: init").count();
        check!(
            boots == 3 && vm.seen.contains("boot_count=1") && vm.seen.contains("boot_count=2"),
            "{boots} boots:\n{}",
            vm.seen
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the third boot powered off: {status:?}"
        );
        Ok(())
    });
    t.run_retry("api_shutdown_forced_after_timeout", || {
        // No acpid: the button means nothing to this guest.
        let (mut vm, sock) = api_guest(g, "forced", TICKS, &[])?;
        vm.wait_for("NIXVM-TEST: ready")?;
        let down = ctl(&sock, &["shutdown", "--timeout", "3"]);
        let status = wait_timeout(&mut vm.child, Duration::from_secs(30));
        check!(
            down.code() == Some(1) && down.stderr.contains("did not power off"),
            "ctl shutdown of a guest that ignores the button: {}",
            down.describe()
        );
        check!(
            status.and_then(|s| s.code()) == Some(4),
            "nixvm after a forced stop: {status:?}"
        );
        Ok(())
    });
}

/// The runner script that nix/lib/runner.nix generates boots a fake NixOS toplevel made of
/// the test guest (resources/nix-runner-boot.sh checks exit 0, the poweroff marker and the
/// NixOS command line).
fn nix_runner_test(t: &mut Runner) {
    const NAME: &str = "nix_runner_boots_fake_toplevel";
    if !t.wants(NAME) {
        return;
    }
    let once = || -> Result<Option<String>, String> {
        let dir = temp_dir().join("nix-runner-boot");
        let log = temp_dir().join("nix-runner-boot.log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(root().join("resources/nix-runner-boot.sh"))
            .arg(&dir)
            .env("NIXVM", NIXVM)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("resources/nix-runner-boot.sh: {e}"))?;
        let status = wait_timeout(&mut child, BOOT_TIMEOUT);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        match status.and_then(|s| s.code()) {
            Some(0) => Ok(None),
            Some(77) => Ok(Some(tail)),
            None => Err(format!("no exit within the timeout {STALLED}:\n{tail}")),
            Some(c) => Err(format!("exit {c}:\n{tail}")),
        }
    };
    let stalled = |r: &Result<_, String>| r.as_ref().is_err_and(|e| e.contains(STALLED));
    match retry_stalled(NAME, once, stalled) {
        Ok(Some(why)) => t.skip(NAME, why.trim()),
        r => t.run(NAME, || r.map(drop)),
    }
}

/// Runs one boot that checks several things (once more if it stalled) and reports each
/// check under its name; `boot` returns the checks' results in the order of `names`.
fn group(
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
            let lines: Vec<&str> = e.lines().collect();
            let tail = lines[lines.len().saturating_sub(25)..].join("\n");
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
            for name in names {
                t.run(name, || Err(e.clone()));
            }
        }
    }
}

const NET_NAMES: [&str; 5] = [
    "net_ping_host",
    "net_tcp_64m_guest_to_host",
    "net_tcp_64m_host_to_guest",
    "net_two_nics_order_and_macs",
    "net_fd_passed_tap",
];

/// Runs `f` on a thread that has entered the network namespace `ns` (sockets and TAPs it
/// opens live there).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> std::thread::JoinHandle<Result<T, String>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let nsf = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on an open namespace fd; it changes only this thread.
        if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        f()
    })
}

fn join<T>(h: std::thread::JoinHandle<Result<T, String>>) -> Result<T, String> {
    h.join().map_err(|_| "thread panicked".to_owned())?
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    check!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A network namespace with TAPs, deleted (TAPs and all) when dropped.
struct NetNs(String);

impl NetNs {
    fn new(taps: &[&str]) -> Result<NetNs, String> {
        let ns = NetNs(format!("nixvm-e2e-{}", std::process::id()));
        let _ = ip(&["netns", "del", &ns.0]);
        ip(&["netns", "add", &ns.0])?;
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        for (i, tap) in taps.iter().enumerate() {
            // A name ending in "mq" makes a multi_queue TAP (which a single-queue attach
            // would fail on with EINVAL).
            let mut add = vec!["-n", &ns.0, "tuntap", "add", tap, "mode", "tap", "vnet_hdr"];
            if tap.ends_with("mq") {
                add.push("multi_queue");
            }
            ip(&add)?;
            ip(&[
                "-n",
                &ns.0,
                "addr",
                "add",
                &format!("10.77.{i}.1/24"),
                "dev",
                tap,
            ])?;
            ip(&["-n", &ns.0, "link", "set", tap, "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// Opens the TAP `name` the way a supervisor would before handing nixvm the fd: attached,
/// with vnet_hdr, inheritable (no close-on-exec).
fn open_tap_fd(name: &str) -> Result<i32, String> {
    let path = std::ffi::CString::new("/dev/net/tun").unwrap();
    // SAFETY: open with a NUL-terminated path; TUNSETIFF reads a 40-byte ifreq.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return Err(format!("/dev/net/tun: {}", std::io::Error::last_os_error()));
        }
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        let flags: i16 = 0x0002 | 0x1000 | 0x4000; // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        if libc::ioctl(fd, 0x4004_54ca, req.as_mut_ptr()) != 0 {
            return Err(format!(
                "TUNSETIFF {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(fd)
    }
}

/// 64 MiB both ways over TCP, checked by sha256 on both sides.
const NET_BYTES: usize = 64 << 20;

/// One boot with three NICs: two TAPs by name (one multi_queue, with a given MAC), one by an
/// inherited fd.
/// The guest pings the host side of each, sends 64 MiB to a listener on the host side of
/// eth0 and receives 64 MiB on its own listener. Returns the results in NET_NAMES order.
fn net_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
    use std::net::{TcpListener, TcpStream};
    let ns = NetNs::new(&["nxtap0", "nxtap1mq", "nxtap2"])?;
    let fd = join(in_netns(&ns.0, || open_tap_fd("nxtap2")))?;
    let listener = join(in_netns(&ns.0, || {
        TcpListener::bind("10.77.0.1:5001").map_err(|e| format!("bind: {e}"))
    }))?;
    // Guest → host: read everything into a file, then hash it.
    let got_path = temp_dir().join("net-from-guest");
    let got_file = got_path.clone();
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        let mut f = std::fs::File::create(&got_file).map_err(|e| e.to_string())?;
        std::io::copy(&mut s, &mut f).map_err(|e| format!("receiving: {e}"))?;
        Ok(())
    });
    // Host → guest: deterministic bytes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..NET_BYTES / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let sent_path = temp_dir().join("net-to-guest");
    std::fs::write(&sent_path, &data).map_err(|e| e.to_string())?;
    let script = script_disk(
        "net-script.img",
        r#"
ip link set lo up
for i in 0 1 2; do
  echo "NIXVM-TEST: mac_eth$i=$(cat /sys/class/net/eth$i/address)"
  ip addr add 10.77.$i.2/24 dev eth$i
  ip link set eth$i up
done
for i in 0 1 2; do
  if ping -c 2 -W 10 10.77.$i.1 >/dev/null 2>&1; then r=ok; else r=failed; fi
  echo "NIXVM-TEST: ping_eth$i=$r"
done
dd if=/dev/urandom of=/tmp/out bs=1M count=64 2>/dev/null
echo "NIXVM-TEST: sent_sha256=$(sha256sum /tmp/out | cut -d' ' -f1)"
nc 10.77.0.1 5001 < /tmp/out
rm /tmp/out
nc -l -p 5002 > /tmp/in &
echo "NIXVM-TEST: listening"
wait
echo "NIXVM-TEST: received=$(wc -c < /tmp/in),$(sha256sum /tmp/in | cut -d' ' -f1)"
"#,
    );
    let cl = cmdline("script");
    let d = format!("path={},readonly=on", script.display());
    let fd_arg = format!("fd={fd}");
    let mut args = vec![
        "netns".to_owned(),
        "exec".to_owned(),
        ns.0.clone(),
        NIXVM.to_owned(),
    ];
    args.extend(g.args(&g.vmlinuz, &cl).iter().map(|a| (*a).to_owned()));
    args.extend(
        [
            "--memory",
            "512M",
            "--net",
            "tap=nxtap0",
            "--net",
            "tap=nxtap1mq,mac=52:54:00:12:34:56",
            "--net",
            &fd_arg,
            "--disk",
            &d,
        ]
        .map(str::to_owned),
    );
    let mut cmd = Command::new("ip");
    cmd.args(&args).stdin(Stdio::null());
    let vm = Streaming::spawn_command(cmd);
    // SAFETY: the child has its copy of the fd now (or never will); ours is closed once.
    unsafe { libc::close(fd) };
    let mut vm = vm?;
    vm.wait_for("NIXVM-TEST: listening")?;
    let to_guest = join(in_netns(&ns.0, move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match TcpStream::connect("10.77.0.2:5002") {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        s.write_all(&data).map_err(|e| format!("sending: {e}"))?;
        Ok(())
    }));
    let received = vm.wait_for("NIXVM-TEST: received=");
    let from_guest = receiver
        .join()
        .map_err(|_| "receiver panicked".to_owned())?;
    received?;
    wait_timeout(&mut vm.child, BOOT_TIMEOUT);

    let is = |key: &str, want: &str| vm.expect(key, want);
    let ping = is("ping_eth0", "ok").and(is("ping_eth1", "ok"));
    let up = from_guest.and_then(|()| {
        let host = sha256_hex(&got_path);
        is("sent_sha256", &host)
    });
    let down = to_guest.and_then(|()| {
        is(
            "received",
            &format!("{NET_BYTES},{}", sha256_hex(&sent_path)),
        )
    });
    let order = is("mac_eth0", &mac_hex(&nixvm_devices_mac("nxtap0")))
        .and(is("mac_eth1", "52:54:00:12:34:56"));
    let fd_ok = is("mac_eth2", &mac_hex(&nixvm_devices_mac("nxtap2"))).and(is("ping_eth2", "ok"));
    let _ = std::fs::remove_file(&got_path);
    let _ = std::fs::remove_file(&sent_path);
    Ok(vec![ping, up, down, order, fd_ok])
}

/// The MAC nixvm derives from an interface name (02 + FNV-1a 64 of the name), as README.md
/// documents it.
fn nixvm_devices_mac(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

fn mac_hex(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

const FS_NAMES: [&str; 6] = [
    "fs_store_checksums_match",
    "fs_symlinks_resolve",
    "fs_executables_run",
    "fs_two_shares",
    "fs_unmount_and_remount",
    "fs_backend_killed_vm_survives",
];

/// The upstream virtiofsd: $NIXVM_VIRTIOFSD, else on PATH, else in cargo's bin directory.
fn virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NIXVM_VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|c| c.join("bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home)
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

/// A virtiofsd serving `dir` on `socket`, killed when dropped.
struct Virtiofsd(std::process::Child);

impl Virtiofsd {
    fn start(bin: &Path, dir: &Path, socket: &Path) -> Result<Virtiofsd, String> {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(bin)
            .arg("--shared-dir")
            .arg(dir)
            .arg("--socket-path")
            .arg(socket)
            // L1 chroots into the host's /, where pivot_root (the namespace sandbox) fails.
            .args(["--sandbox", "chroot", "--readonly", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        Ok(Virtiofsd(child))
    }
}

impl Virtiofsd {
    /// nixvm's own back end, `nixvm storefs`, in virtiofsd's place.
    /// Its log (at level info) goes to `log`.
    fn start_storefs(dir: &Path, socket: &Path, log: &Path) -> Result<Virtiofsd, String> {
        let _ = std::fs::remove_file(socket);
        let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(NIXVM)
            .arg("storefs")
            .arg("--socket")
            .arg(socket)
            .arg("--path")
            .arg(dir)
            .env("NIXVM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("nixvm storefs: {e}"))?;
        Ok(Virtiofsd(child))
    }
}

const STOREFS_NAMES: [&str; 7] = [
    "storefs_checksums_match",
    "storefs_symlinks_and_executables",
    "storefs_writes_fail_erofs",
    "storefs_new_path_appears",
    "storefs_escapes_stay_inside",
    "storefs_path_share_needs_nothing_else",
    "storefs_standalone_daemon",
];

/// One boot with nixvm's own back end serving a small store tree at /nix/.ro-store
/// (`--fs path=`, nixvm starts it) and a second tree through a `nixvm storefs` started by
/// hand (`--fs socket=`). Returns the results in STOREFS_NAMES order.
fn storefs_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let tmp = temp_dir();
    let store = tmp.join("sfs-store");
    let _ = std::fs::remove_dir_all(&store);
    let e = |e: std::io::Error| e.to_string();
    for p in 0..20 {
        let d = store.join(format!("{p:032}-pkg/share"));
        std::fs::create_dir_all(&d).map_err(e)?;
        for f in 0..20 {
            std::fs::write(d.join(format!("f{f}")), format!("{p}/{f}\n")).map_err(e)?;
        }
    }
    let hello = store.join(H_HELLO);
    std::fs::create_dir_all(hello.join("bin")).map_err(e)?;
    std::fs::create_dir_all(hello.join("libexec")).map_err(e)?;
    std::fs::write(hello.join("libexec/hello-real"), "hello-from-store\n").map_err(e)?;
    symlink("../libexec/hello-real", hello.join("bin/hello")).map_err(e)?;
    symlink("/etc/hostname", hello.join("escape")).map_err(e)?;
    let bb = store.join(H_BUSYBOX).join("bin");
    std::fs::create_dir_all(&bb).map_err(e)?;
    std::fs::copy(assets().join("busybox"), bb.join("busybox")).map_err(e)?;
    std::fs::set_permissions(bb.join("busybox"), std::fs::Permissions::from_mode(0o555))
        .map_err(e)?;
    let big: Vec<u8> = (0..16usize << 20)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    std::fs::create_dir_all(store.join(H_BIG)).map_err(e)?;
    std::fs::write(store.join(H_BIG).join("data.bin"), &big).map_err(e)?;
    let host_sha = tree_sha256(&store);
    let side = tmp.join("sfs-side");
    let _ = std::fs::remove_dir_all(&side);
    std::fs::create_dir_all(&side).map_err(e)?;
    std::fs::write(side.join("hello"), "from-the-standalone-daemon\n").map_err(e)?;
    let sock = tmp.join("storefs.sock");
    let daemon_log = tmp.join("sfs-daemon.log");
    let daemon = Virtiofsd::start_storefs(&side, &sock, &daemon_log)?;
    // Where nixvm puts its back end's private socket directory: looked at while it runs.
    let runtime = tmp.join("sfs-runtime");
    let _ = std::fs::remove_dir_all(&runtime);
    std::fs::create_dir_all(&runtime).map_err(e)?;
    let script = script_disk(
        "sfs-script.img",
        &format!(
            r#"
mkdir -p /nix/.ro-store /nix
mount -t virtiofs ro-store /nix/.ro-store && echo "NIXVM-TEST: mounted=ro-store"
mkdir -p /side
mount -t virtiofs side /side -o ro && echo "NIXVM-TEST: side=$(cat /side/hello)"
ln -s /nix/.ro-store /nix/store
cd /nix/.ro-store
echo "NIXVM-TEST: store=$(find . -type f | wc -l),$(find . -type f | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
cd /
echo "NIXVM-TEST: links=$(readlink /nix/store/{H_HELLO}/bin/hello),$(cat /nix/store/{H_HELLO}/bin/hello),$(/nix/store/{H_BUSYBOX}/bin/busybox echo static-ok)"
if touch /nix/.ro-store/newfile 2>/tmp/err; then w=accepted; else w=refused; fi
echo "NIXVM-TEST: write=$w,$(grep -c 'Read-only file system' /tmp/err)"
echo "NIXVM-TEST: escape=$(readlink /nix/.ro-store/{H_HELLO}/escape),$(ls /nix/.ro-store/.. >/dev/null 2>&1 && echo listed)"
echo "NIXVM-TEST: add-a-path"
i=0
while [ ! -e /nix/.ro-store/added-later ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i + 1)); done
echo "NIXVM-TEST: added=$(cat /nix/.ro-store/added-later/msg 2>/dev/null)"
"#
        ),
    );
    let cl = cmdline("script");
    let d = format!("path={},readonly=on", script.display());
    let f = format!("tag=ro-store,path={},readonly=on", store.display());
    let f2 = format!("tag=side,socket={}", sock.display());
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend([
        "--memory", "512M", "--cpus", "2", "--fs", &f, "--fs", &f2, "--disk", &d,
    ]);
    let mut cmd = Command::new(NIXVM);
    cmd.args(&args)
        .stdin(Stdio::null())
        .env("XDG_RUNTIME_DIR", &runtime);
    let mut vm = Streaming::spawn_command(cmd)?;
    let nixvm_pid = vm.child.id();
    vm.wait_for_within("NIXVM-TEST: add-a-path", Duration::from_secs(600))?;
    let backends_while_running = storefs_children(nixvm_pid);
    let left_in_runtime = std::fs::read_dir(&runtime).map_err(e)?.count();
    let added = store.join("added-later");
    std::fs::create_dir_all(&added).map_err(e)?;
    std::fs::write(added.join("msg"), "appeared\n").map_err(e)?;
    vm.wait_for("NIXVM-TEST: added=")?;
    let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);
    let backends_after = storefs_children(nixvm_pid);
    let standalone_exit = {
        let mut d = daemon;
        wait_timeout(&mut d.0, Duration::from_secs(10)).and_then(|s| s.code())
    };
    let is = |key: &str, want: &str| vm.expect(key, want);
    let sums = is("mounted", "ro-store").and(is("store", &format!("403,{host_sha}")));
    let links = is("links", "../libexec/hello-real,hello-from-store,static-ok");
    let erofs = is("write", "refused,1");
    let added = is("added", "appeared").and_then(|()| {
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm with storefs: {status:?}"
        );
        Ok(())
    });
    // The symlink is given to the guest as it is (it resolves in the guest's own /etc, not
    // the host's); `..` of the root is the root.
    let escape = is("escape", "/etc/hostname,listed");
    let own = is("mounted", "ro-store").and_then(|()| {
        check!(
            backends_while_running == 1 && backends_after == 0 && left_in_runtime == 0,
            "nixvm's own back end: {backends_while_running} storefs process(es) while the VM \
             ran, {backends_after} after it ended, {left_in_runtime} entries left in the \
             runtime directory (wanted 1, 0, 0)"
        );
        Ok(())
    });
    let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let standalone = is("side", "from-the-standalone-daemon").and_then(|()| {
        check!(
            standalone_exit == Some(0),
            "the standalone nixvm storefs after the VM disconnected: {standalone_exit:?}\n{log}"
        );
        // Landlock and the mount namespace are best effort (the kernel or the host's policy
        // may not allow them); the daemon must say what became of each.
        for what in ["Landlock (", "mount namespace"] {
            let line = log.lines().find(|l| {
                l.contains(what) || (what.starts_with("Landlock") && l.contains("no Landlock"))
            });
            check!(line.is_some(), "no word on the {what} in its log:\n{log}");
            println!("e2e: nixvm storefs: {}", line.unwrap_or_default());
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_dir_all(&side);
    Ok(vec![sums, links, erofs, added, escape, own, standalone])
}

/// How many `nixvm storefs` processes the process `parent` has as children.
fn storefs_children(parent: u32) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .filter_map(|p| p.ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            ppid == Some(parent) && cmd.split(|b| *b == 0).any(|a| a == b"storefs")
        })
        .count()
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        wait_timeout(&mut self.0, Duration::ZERO);
    }
}

const H_HELLO: &str = "0c6kzph7l0dcbqmjfgfql7ay8mhf2dsj-hello-2.12";
const H_LINKS: &str = "1b9p07z77phvv2hf6gm9f28syp39f99i-links";
const H_BUSYBOX: &str = "2r4q8k1hn7x1gsd7kmhv0jq5d4c1bfsz-busybox-1.36";
const H_BIG: &str = "3x5lv0nw7dj5b0gq0m5h4k7ka9a7rwxf-big";

/// A tree laid out like a Nix store: store paths with nested directories and 10 000 small
/// files, relative and absolute symlinks, an executable, one 256 MiB file.
fn make_store(dir: &Path, busybox: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let _ = std::fs::remove_dir_all(dir);
    for p in 0..100 {
        for d in 0..10 {
            let sub = dir.join(format!("{p:032}-pkg-{p}/share/d{d}"));
            std::fs::create_dir_all(&sub)?;
            for f in 0..10 {
                std::fs::write(
                    sub.join(format!("f{f}")),
                    format!("pkg {p} dir {d} file {f}\n"),
                )?;
            }
        }
    }
    let hello = dir.join(H_HELLO);
    for sub in ["bin", "libexec", "share"] {
        std::fs::create_dir_all(hello.join(sub))?;
    }
    std::fs::write(hello.join("libexec/hello-real"), "hello-from-store\n")?;
    symlink("../libexec/hello-real", hello.join("bin/hello"))?;
    std::fs::write(hello.join("share/msg"), "remount-ok\n")?;
    let links = dir.join(H_LINKS);
    std::fs::create_dir_all(&links)?;
    symlink(format!("/nix/store/{H_HELLO}/libexec"), links.join("lib"))?;
    let bb = dir.join(H_BUSYBOX).join("bin");
    std::fs::create_dir_all(&bb)?;
    std::fs::copy(busybox, bb.join("busybox"))?;
    std::fs::set_permissions(bb.join("busybox"), std::fs::Permissions::from_mode(0o555))?;
    let big = dir.join(H_BIG);
    std::fs::create_dir_all(&big)?;
    let mut f = std::fs::File::create(big.join("data.bin"))?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..256 {
        for c in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    Ok(())
}

/// sha256 over `sha256sum` of every regular file under `dir`, sorted by path, as the guest
/// computes it.
fn tree_sha256(dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1")
        .current_dir(dir)
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One boot with two virtio-fs shares: a Nix-store-like tree (tag ro-store, mounted at
/// /nix/.ro-store as NixOS does) and a small one (tag data). The guest checks the store,
/// unmounts and remounts it; then the test kills the data share's virtiofsd and the guest
/// sees errors there and powers off normally. Returns the results in FS_NAMES order.
fn fs_boot(g: &Guest, virtiofsd: &Path) -> Result<Vec<TestResult>, String> {
    let tmp = temp_dir();
    let (store, data) = (tmp.join("store"), tmp.join("data"));
    make_store(&store, &assets().join("busybox")).map_err(|e| format!("store tree: {e}"))?;
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    std::fs::write(data.join("marker"), "second-share\n").map_err(|e| e.to_string())?;
    let host_sha = tree_sha256(&store);
    let (s1, s2) = (tmp.join("ro-store.sock"), tmp.join("data.sock"));
    let _store_d = Virtiofsd::start(virtiofsd, &store, &s1)?;
    let mut data_d = Virtiofsd::start(virtiofsd, &data, &s2)?;
    let script = script_disk(
        "fs-script.img",
        &format!(
            r#"
mkdir -p /nix/.ro-store /mnt/data
mount -t virtiofs ro-store /nix/.ro-store && echo "NIXVM-TEST: mounted=ro-store"
ln -s /nix/.ro-store /nix/store
mount -t virtiofs data /mnt/data && echo "NIXVM-TEST: mounted=data"
cd /nix/.ro-store
echo "NIXVM-TEST: store=$(find . -type f | wc -l),$(find . -type f | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
cd /
echo "NIXVM-TEST: links=$(readlink /nix/store/{H_HELLO}/bin/hello),$(cat /nix/store/{H_HELLO}/bin/hello),$(cat /nix/store/{H_LINKS}/lib/hello-real)"
bb=/nix/store/{H_BUSYBOX}/bin/busybox
if [ -x $bb ] && [ ! -x /nix/store/{H_HELLO}/share/msg ]; then x=modes-ok; else x=modes-wrong; fi
echo "NIXVM-TEST: exec=$x,$($bb echo static-ok)"
echo "NIXVM-TEST: data=$(cat /mnt/data/marker)"
umount /nix/.ro-store
if [ -e /nix/.ro-store/{H_HELLO} ]; then u=still-there; else u=gone; fi
mount -t virtiofs ro-store /nix/.ro-store
echo "NIXVM-TEST: remount=$u,$(cat /nix/.ro-store/{H_HELLO}/share/msg)"
echo "NIXVM-TEST: kill-data-backend"
i=0
while [ ! -e /nix/.ro-store/backend-killed ] && [ $i -lt 240 ]; do sleep 0.5; i=$((i + 1)); done
if cat /mnt/data/marker >/dev/null 2>&1; then r=still-readable; else r=fails; fi
echo "NIXVM-TEST: after_kill=$r"
"#
        ),
    );
    let cl = cmdline("script");
    let d = format!("path={},readonly=on", script.display());
    let (f1, f2) = (
        format!("tag=ro-store,socket={}", s1.display()),
        format!("tag=data,socket={}", s2.display()),
    );
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend(["--memory", "512M", "--fs", &f1, "--fs", &f2, "--disk", &d]);
    let mut cmd = Command::new(NIXVM);
    cmd.args(&args).stdin(Stdio::null());
    let mut vm = Streaming::spawn_command(cmd)?;
    // Checksumming 10 000 files and 256 MiB through nested KVM takes minutes.
    vm.wait_for_within("NIXVM-TEST: kill-data-backend", Duration::from_secs(900))?;
    data_d.0.kill().map_err(|e| e.to_string())?;
    let _ = data_d.0.wait();
    std::fs::write(store.join("backend-killed"), "").map_err(|e| e.to_string())?;
    vm.wait_for("NIXVM-TEST: after_kill=")?;
    let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);

    let is = |key: &str, want: &str| vm.expect(key, want);
    let sums = is("mounted", "ro-store").and(is("store", &format!("10004,{host_sha}")));
    let links = is(
        "links",
        "../libexec/hello-real,hello-from-store,hello-from-store",
    );
    let exec = is("exec", "modes-ok,static-ok");
    let data_mounted = || {
        vm.seen
            .contains("NIXVM-TEST: mounted=data")
            .then_some(())
            .ok_or_else(|| format!("the data share did not mount\nconsole:\n{}", vm.seen))
    };
    let two = data_mounted().and(is("data", "second-share"));
    let remount = is("remount", "gone,remount-ok");
    let killed = data_mounted()
        .and(is("after_kill", "fails"))
        .and_then(|()| {
            check!(
                status.and_then(|s| s.code()) == Some(0),
                "nixvm after its backend died: {status:?}"
            );
            Ok(())
        });
    let _ = std::fs::remove_dir_all(&store);
    Ok(vec![sums, links, exec, two, remount, killed])
}

/// Reads from the console socket until `want` appears; returns everything read.
fn read_until(
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

/// nixvm running with stdout read line by line in the background.
struct Streaming {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Streaming {
    fn spawn(args: &[&str]) -> Result<Streaming, String> {
        Self::spawn_with_stdin(args, Stdio::null())
    }

    fn spawn_with_stdin(args: &[&str], stdin: Stdio) -> Result<Streaming, String> {
        let mut cmd = Command::new(NIXVM);
        cmd.args(args).stdin(stdin);
        Self::spawn_command(cmd)
    }

    fn spawn_command(mut cmd: Command) -> Result<Streaming, String> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Streaming {
            child,
            lines,
            seen: String::new(),
        })
    }

    /// Waits for a line containing `want`; returns it.
    fn wait_for(&mut self, want: &str) -> Result<String, String> {
        self.wait_for_within(want, BOOT_TIMEOUT)
    }

    /// Like `wait_for`, with its own timeout. Says now and then that it still waits, so that
    /// a long wait inside L1 is not taken for a frozen L1.
    fn wait_for_within(&mut self, want: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut say = Instant::now() + Duration::from_secs(120);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if Instant::now() >= say {
                println!("e2e: still waiting for {want:?}");
                say += Duration::from_secs(120);
            }
            match self.lines.recv_timeout(left.min(Duration::from_secs(10))) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Ok(l) => {
                    self.seen.push_str(&l);
                    self.seen.push('\n');
                    if l.contains(want) {
                        return Ok(l);
                    }
                }
                Err(_) => break,
            }
        }
        Err(format!(
            "{want:?} never appeared {STALLED}; console:\n{}",
            self.seen
        ))
    }

    /// The marker `key` has the value `want`; the console in the failure.
    fn expect(&self, key: &str, want: &str) -> TestResult {
        let got = self.marker(key).unwrap_or_default();
        check!(
            got == want,
            "{key}: {got:?}, wanted {want:?}\nconsole:\n{}",
            self.seen
        );
        Ok(())
    }

    fn marker(&self, key: &str) -> Option<String> {
        let prefix = format!("NIXVM-TEST: {key}=");
        self.seen.lines().find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix(prefix.as_str())
                .map(str::to_owned)
        })
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        wait_timeout(&mut self.child, Duration::ZERO);
    }
}

/// A raw disk image of `len` bytes: `fill(i)` gives byte i.
fn disk_image(name: &str, len: usize, fill: impl Fn(usize) -> u8) -> PathBuf {
    let p = temp_dir().join(name);
    std::fs::write(&p, (0..len).map(fill).collect::<Vec<u8>>()).unwrap();
    p
}

/// A disk holding a guest script, padded with newlines to whole sectors.
fn script_disk(name: &str, script: &str) -> PathBuf {
    let mut b = script.as_bytes().to_vec();
    b.resize(b.len().div_ceil(512) * 512 + 512, b'\n');
    let p = temp_dir().join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// One boot with three disks (data, read-only, scratch) plus the script disk and virtio-rng;
/// returns the result of each check, in the order of `blk_names`.
fn disks_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
    let data = disk_image("data.img", 8 << 20, |i| {
        u8::try_from((i * 7 + i / 4096) % 251).unwrap()
    });
    let ro = disk_image("ro.img", 1 << 20, |_| 0x5a);
    let scratch = disk_image("scratch.img", 4 << 20, |_| 0);
    let script = script_disk(
        "script.img",
        r#"
for d in vda vdb vdc; do
  echo "NIXVM-TEST: disk_$d=size:$(cat /sys/block/$d/size),ro:$(cat /sys/block/$d/ro),serial:$(cat /sys/block/$d/serial)"
done
echo "NIXVM-TEST: sha256_vda=$(sha256sum /dev/vda | cut -d' ' -f1)"
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct 2>/dev/null; then r=accepted; else r=refused; fi
echo "NIXVM-TEST: ro_write=$r"
echo "NIXVM-TEST: hwrng=$(head -c 4096 /dev/hwrng | wc -c),$(cat /sys/class/misc/hw_random/rng_current)"
for i in 0 1 2 3; do
  dd if=/dev/vda of=/tmp/part$i bs=4096 skip=$((i * 512)) count=512 iflag=direct 2>/dev/null &
done
wait
echo "NIXVM-TEST: parallel_sha256_vda=$(cat /tmp/part0 /tmp/part1 /tmp/part2 /tmp/part3 | sha256sum | cut -d' ' -f1)"
for i in 0 1 2 3; do
  dd if=/tmp/part$i of=/dev/vdc bs=4096 seek=$((256 + i * 128)) count=128 oflag=direct 2>/dev/null &
done
wait
rm /tmp/part*
rmmod virtio_blk && insmod /lib/modules/virtio_blk.ko && sleep 1
echo "NIXVM-TEST: reload_sha256_vda=$(sha256sum /dev/vda | cut -d' ' -f1)"
printf 'flushed-by-nixvm-guest' | dd of=/dev/vdc bs=512 seek=10 conv=sync,fsync 2>/dev/null
echo "NIXVM-TEST: wrote"
sleep 1000
"#,
    );
    let disk = |p: &Path, extra: &str| format!("path={}{extra}", p.display());
    let (d1, d2, d3, d4) = (
        disk(&data, ",serial=first-disk"),
        disk(&ro, ",readonly=on,serial=second-disk"),
        disk(&scratch, ""),
        disk(&script, ",readonly=on"),
    );
    let cl = cmdline("script");
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend([
        "--cpus", "2", "--disk", &d1, "--disk", &d2, "--disk", &d3, "--disk", &d4,
    ]);
    let mut vm = Streaming::spawn(&args)?;
    vm.wait_for("NIXVM-TEST: wrote")?;

    // While it runs: a second VM on the scratch image must not start.
    let k = g.vmlinuz.as_str();
    let second = nixvm(
        &["--kernel", k, "--disk", &d3, "--serial", "off"],
        &[],
        Duration::from_secs(60),
    );
    // kill -9 right after the guest's fsync: the bytes must already be in the file.
    wait_timeout(&mut vm.child, Duration::ZERO);
    let on_host = std::fs::read(&scratch).map_err(|e| e.to_string())?;

    let host_sha = sha256_hex(&data);
    // The guest's marker `key` has exactly the value `want`.
    let is = |key: &str, want: &str| vm.expect(key, want);
    let sha = is("sha256_vda", &host_sha);
    let order = is("disk_vda", "size:16384,ro:0,serial:first-disk")
        .and(is("disk_vdb", "size:2048,ro:1,serial:second-disk"))
        .and(is("disk_vdc", "size:8192,ro:0,serial:"));
    let readonly = is("ro_write", "refused").and_then(|()| {
        check!(
            std::fs::read(&ro).unwrap().iter().all(|&b| b == 0x5a),
            "read-only image changed"
        );
        Ok(())
    });
    let flushed = || -> TestResult {
        let want = b"flushed-by-nixvm-guest";
        check!(
            &on_host[5120..5120 + want.len()] == want,
            "the flushed write is not in the image after kill -9"
        );
        Ok(())
    };
    let locked = || -> TestResult {
        check!(second.code() == Some(2), "second VM: {}", second.describe());
        check!(
            second.stderr.contains("in use by another process"),
            "unclear: {}",
            second.stderr
        );
        Ok(())
    };
    let reload = is("reload_sha256_vda", &host_sha);
    // Four readers, then four writers at once: each 512 KiB the writers put at 1 MiB + i *
    // 512 KiB of the scratch disk is the start of reader i's 2 MiB of the data disk.
    let parallel = is("parallel_sha256_vda", &host_sha).and_then(|()| {
        let src = std::fs::read(&data).map_err(|e| e.to_string())?;
        for i in 0..4 {
            let (to, from) = ((1 << 20) + i * (512 << 10), i * (2 << 20));
            check!(
                on_host[to..to + (512 << 10)] == src[from..from + (512 << 10)],
                "parallel write {i} is not in the scratch image"
            );
        }
        Ok(())
    });
    let rng = is("hwrng", "4096,virtio_rng.0");
    Ok(vec![
        sha,
        order,
        readonly,
        flushed(),
        locked(),
        reload,
        parallel,
        rng,
    ])
}

/// Opens a pseudo-terminal; returns (master, slave) as files.
fn open_pty() -> Result<(std::fs::File, std::fs::File), String> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc pty calls; every returned descriptor is checked, ptsname's buffer is
    // copied before the next call.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        if master < 0 || libc::grantpt(master) != 0 || libc::unlockpt(master) != 0 {
            return Err(format!("no pty: {}", std::io::Error::last_os_error()));
        }
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_owned();
        let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if slave < 0 {
            return Err(format!(
                "cannot open {name:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok((
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        ))
    }
}

fn lflag(f: &std::fs::File) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: tcgetattr writes into a zeroed termios we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(f.as_raw_fd(), &mut t);
        t.c_lflag
    }
}

/// `--serial stdio` on a terminal: raw while the VM runs (keys reach the guest unedited),
/// the terminal's own settings back when nixvm exits.
fn stdio_terminal(g: &Guest) -> TestResult {
    let (mut master, slave) = open_pty()?;
    let cooked = lflag(&slave);
    check!(
        cooked & libc::ICANON != 0,
        "a new pty starts in canonical mode"
    );
    let cl = cmdline("echo");
    let tty = slave.try_clone().map_err(|e| e.to_string())?;
    let mut vm = Streaming::spawn_with_stdin(&g.args(&g.vmlinuz, &cl), tty.into())?;
    let result = (|| {
        vm.wait_for("NIXVM-TEST: ready")?;
        let raw = lflag(&slave);
        check!(
            raw & (libc::ICANON | libc::ECHO | libc::ISIG) == 0,
            "not raw while running: {raw:#o}"
        );
        master
            .write_all(b"typed-on-a-tty\r")
            .map_err(|e| e.to_string())?;
        vm.wait_for("NIXVM-TEST: got=typed-on-a-tty")?;
        Ok(())
    })();
    let status = wait_timeout(&mut vm.child, BOOT_TIMEOUT);
    result?;
    check!(
        status.and_then(|s| s.code()) == Some(0),
        "nixvm ended with {status:?}"
    );
    check!(
        lflag(&slave) == cooked,
        "terminal not restored: {:#o} != {cooked:#o}",
        lflag(&slave)
    );
    Ok(())
}

/// Starts nixvm on the test guest waiting for a console line (`nixvm.action=echo`), its
/// console on a socket named after `name`; stderr is piped.
fn socket_guest(
    g: &Guest,
    name: &str,
    extra: &[&str],
) -> Result<(std::process::Child, PathBuf), String> {
    let sock = temp_dir().join(format!("{name}.sock"));
    let serial = format!("socket={}", sock.display());
    let cl = cmdline("echo");
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend(["--serial", &serial]);
    args.extend(extra);
    let child = Command::new(NIXVM)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    Ok((child, sock))
}

/// Connects to a console socket, waiting up to 30 s for nixvm to create it.
fn connect_console(sock: &Path) -> Result<BufReader<UnixStream>, String> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .map_err(|e| e.to_string())?;
                return Ok(BufReader::new(s));
            }
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                return Err(format!("connect: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `--serial socket=`: a first client sees the guest come up and leaves; a second client gets
/// the kept output replayed, types a line, and the guest echoes it.
fn serial_socket(g: &Guest) -> TestResult {
    let (mut child, sock) = socket_guest(g, "console", &[])?;
    let stderr = Arc::new(Mutex::new(String::new()));
    let mut err_pipe = child.stderr.take().unwrap();
    let err_copy = stderr.clone();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        *err_copy.lock().unwrap() = s;
    });
    let result = (|| {
        let mut first = connect_console(&sock)?;
        read_until(&mut first, "NIXVM-TEST: ready", BOOT_TIMEOUT)?;
        drop(first);
        std::thread::sleep(Duration::from_millis(200));
        let mut second = connect_console(&sock)?;
        // Replayed from the ring: the guest printed these before this client attached.
        let replay = read_until(&mut second, "NIXVM-TEST: ready", Duration::from_secs(30))?;
        check!(
            replay.contains("NIXVM-TEST: init"),
            "no replay of earlier output:\n{replay}"
        );
        second
            .get_mut()
            .write_all(b"hello-nixvm\n")
            .map_err(|e| e.to_string())?;
        read_until(
            &mut second,
            "NIXVM-TEST: got=hello-nixvm",
            Duration::from_secs(60),
        )?;
        Ok(())
    })();
    let status = wait_timeout(&mut child, BOOT_TIMEOUT);
    std::thread::sleep(Duration::from_millis(100));
    result.map_err(|e| format!("{e}\nnixvm stderr: {}", stderr.lock().unwrap()))?;
    check!(
        status.and_then(|s| s.code()) == Some(0),
        "nixvm ended with {status:?}"
    );
    check!(!sock.exists(), "socket file left behind");
    Ok(())
}

// ---------------------------------------------------------------- driver

fn sh(script: &str, args: &[&str]) -> Result<String, String> {
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

fn guest() -> Guest {
    let a = assets();
    let s = |f: &str| a.join(f).to_str().expect("utf-8 path").to_owned();
    Guest {
        vmlinuz: s("vmlinuz"),
        vmlinux: s("vmlinux"),
        initrd: s("initramfs.cpio.gz"),
    }
}

/// Inside the route that can boot: run the boot tests, print their lines.
fn inside(filter: Option<String>) -> i32 {
    let mut t = Runner {
        filter,
        ..Default::default()
    };
    boot_tests(&mut t, &guest());
    let _ = std::fs::remove_dir_all(temp_dir());
    i32::from(!t.failed.is_empty())
}

/// Longest an L1 run may go without printing a line before it counts as frozen: more than a
/// boot that stalls and is retried.
const L1_SILENCE: Duration = Duration::from_secs(420);

/// Runs the boot tests matching `filter` inside one L1 guest, counting their results into `t`
/// and their names into `seen`. Returns how the L1 run ended.
fn run_in_l1(filter: &str, t: &mut Runner, seen: &mut Vec<String>) -> String {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(root().join("resources/l1run.sh"))
        .current_dir(root())
        .arg("--")
        .arg(exe)
        .arg(filter)
        .env(INSIDE, "1")
        // Found here: inside, HOME (for ~/.cargo/bin) may not be set.
        .envs(virtiofsd().map(|p| ("NIXVM_VIRTIOFSD", p)))
        .stdout(Stdio::piped())
        .spawn()
        .expect("resources/l1run.sh");
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    loop {
        match lines.recv_timeout(L1_SILENCE) {
            Ok(line) => {
                println!("{line}");
                if let Some((name, result)) = line
                    .strip_prefix("test ")
                    .and_then(|r| r.split_once(" ... "))
                {
                    seen.push(name.to_owned());
                    match result {
                        "ok" => t.passed += 1,
                        r if r.starts_with("skipped") => t.skipped += 1,
                        _ => t.failed.push(name.to_owned()),
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // SIGTERM: l1run.sh traps it and stops its QEMU.
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = wait_timeout(&mut child, Duration::from_secs(30));
                return format!("froze (no output for {} s)", L1_SILENCE.as_secs());
            }
        }
    }
    match child.wait() {
        Ok(status) => format!("ended with {status}"),
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn main() {
    // libtest-style arguments: take the first non-flag as a name filter.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if std::env::var_os(INSIDE).is_some() {
        std::process::exit(inside(filter));
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let mut t = Runner {
        filter: filter.clone(),
        ..Default::default()
    };

    let assets_ok = match sh("assets.sh", &[assets().to_str().unwrap()]) {
        Ok(_) => true,
        Err(e) => {
            println!("e2e: cannot build the guest assets: {e}");
            false
        }
    };
    let vmlinuz = assets().join("vmlinuz");
    usage_tests(&mut t, assets_ok.then_some(vmlinuz.as_path()));

    let route = if assets_ok {
        sh("kvm-route.sh", &[]).unwrap_or_else(|e| format!("none: {e}"))
    } else {
        "none: no guest assets".to_owned()
    };
    println!(
        "e2e: guest boots run {}",
        match route.as_str() {
            "direct" => "directly on /dev/kvm",
            "l1" => "inside an L1 guest (this host's /dev/kvm cannot boot Linux)",
            other => other,
        }
    );
    let boot_names = [
        "boot_bzimage",
        "cpus_2_online",
        "memory_384m",
        "cmdline_verbatim",
        "poweroff_exits_0",
        "boot_elf_pvh",
        "cpus_4_online",
        "reboot_exits_3",
        "serial_file",
        "panic_reboots_exits_3_config_file",
        "serial_socket_attach",
        "reboot_method_k_exits_3",
        "reboot_method_a_exits_3",
        "reboot_method_t_exits_3",
        "stdio_terminal_raw_input_and_restored",
        "sigterm_ignored_button_stops_after_timeout_143",
        "api_ping_info_pause_resume",
        "api_shutdown_powers_off_exit_0",
        "sigterm_powers_off_through_acpid_exit_0",
        "on_reboot_restart_boots_again",
        "nix_runner_boots_fake_toplevel",
        "api_shutdown_forced_after_timeout",
        "blk_sha256_matches_host",
        "blk_order_and_serials",
        "blk_readonly_refuses_writes",
        "blk_flushed_write_survives_kill_9",
        "blk_second_vm_on_locked_image_fails",
        "blk_driver_reload",
        "blk_parallel_requests",
        "rng_hwrng_gives_bytes",
    ];
    let boot_names: Vec<&str> = boot_names
        .into_iter()
        .chain(NET_NAMES)
        .chain(FS_NAMES)
        .chain(STOREFS_NAMES)
        .collect();
    match route.as_str() {
        "direct" => boot_tests(&mut t, &guest()),
        "l1" if boot_names.iter().any(|n| t.wants(n)) => {
            let mut seen: Vec<String> = Vec::new();
            let mut ended = String::new();
            // The nested route sometimes freezes the whole L1 guest: then the tests it had
            // not finished run once more in a fresh one.
            for attempt in 0..2 {
                let todo: Vec<&str> = boot_names
                    .iter()
                    .copied()
                    .filter(|n| t.wants(n) && !seen.iter().any(|s| s == n))
                    .collect();
                if todo.is_empty() {
                    break;
                }
                if attempt > 0 {
                    println!("e2e: the L1 guest {ended}; running the rest in a new one");
                }
                ended = run_in_l1(&todo.join(","), &mut t, &mut seen);
            }
            let missing: Vec<&str> = boot_names
                .into_iter()
                .filter(|n| t.wants(n) && !seen.iter().any(|s| s == n))
                .collect();
            for name in missing {
                t.record(name, Err(format!("did not run: the L1 guest {ended}")));
            }
        }
        "l1" => {}
        why => {
            let why = why.strip_prefix("none: ").unwrap_or(why).to_owned();
            for name in boot_names {
                if in_ci {
                    t.record(
                        name,
                        Err(format!("cannot boot a guest here ({why}), and CI must")),
                    );
                } else {
                    t.skip(name, &why);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(temp_dir());
    println!();
    if !t.failed.is_empty() {
        println!("failures: {}", t.failed.join(", "));
    }
    println!(
        "e2e: {} passed, {} failed, {} skipped",
        t.passed,
        t.failed.len(),
        t.skipped
    );
    std::process::exit(i32::from(!t.failed.is_empty()));
}
