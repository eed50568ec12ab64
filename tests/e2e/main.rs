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
use std::process::{Command, Stdio};
use std::time::Duration;

/// Inside the route that can boot: run the boot tests, print their lines.
fn inside(filter: Option<String>) -> i32 {
    start_heartbeat();
    trace_shutdowns();
    let mut t = Runner {
        filter,
        ..Default::default()
    };
    boot_tests(&mut t, &guest());
    let _ = std::fs::remove_dir_all(temp_dir());
    i32::from(!t.failed.is_empty())
}

/// Returns the message as the test's error unless the condition holds.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

mod boot;
mod console;
mod disks;
mod fs;
mod harness;
mod hostile;
#[path = "../support/images.rs"]
mod images;
mod lifecycle;
mod net;
mod passt;
mod storefs;
mod systemd;
mod usage;
mod vde;
#[path = "../support/virtiofsd.rs"]
mod virtiofsd;
mod vsock;

use crate::{
    boot::*, console::HVC_NAMES, disks::*, fs::*, harness::*, hostile::*, net::*, passt::*,
    storefs::*, systemd::*, usage::*, vde::*, vsock::*,
};
/// Longest an L1 run may go without printing a line before it counts as frozen (inside, the
/// heartbeat prints a line a minute while work goes on). L1's kernel messages do not count:
/// a frozen L1 guest prints a soft-lockup report every ~30 s (seen in CI, 2026-11-29: 400 s
/// of them kept a frozen run alive).
const L1_SILENCE: Duration = Duration::from_secs(180);
/// L1 guests a run may take: the nested route freezes or kills one now and then (seen about
/// once per full run; L1's kernel overflowed a vCPU thread's stack, once within a minute), and
/// the tests it had not finished (or that stalled in every attempt there) run again in the
/// next, unless two guests in a row finished none (then the first of those tests is what
/// stops L1, and another guest would only spend the time again), or the guests have taken
/// `L1_BUDGET`.
const L1_ATTEMPTS: usize = 4;
/// No new L1 guest after this long in L1 guests: CI has 90 min in all, and a slow CI machine
/// takes about 50 min for one full pass.
const L1_BUDGET: Duration = Duration::from_secs(55 * 60);
/// The whole L1 run's limit (l1run.sh -t): the boot tests take about 25 min there.
const L1_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Runs the boot tests matching `filter` inside one L1 guest, counting their results into `t`
/// and their names into `seen`, or into `stalled` for those that stalled in every attempt
/// there. Returns how the L1 run ended.
fn run_in_l1(
    filter: &str,
    t: &mut Runner,
    seen: &mut Vec<String>,
    stalled: &mut Vec<String>,
) -> String {
    let exe = std::env::current_exe().expect("own path");
    let started = std::time::Instant::now();
    let mut child = Command::new(root().join("resources/l1run.sh"))
        .current_dir(root())
        .arg("-t")
        .arg(L1_TIMEOUT.as_secs().to_string())
        .arg("--")
        .arg(exe)
        .arg(filter)
        .env(INSIDE, "1")
        .envs(in_ci().then_some(("NIXVM_E2E_CI", "1")))
        // Found here: inside, HOME (for ~/.cargo/bin) may not be set.
        .envs(virtiofsd::find().map(|p| ("NIXVM_VIRTIOFSD", p)))
        .stdout(Stdio::piped())
        .spawn()
        .expect("resources/l1run.sh");
    let lines = line_channel(child.stdout.take().unwrap());
    let mut quiet_until = std::time::Instant::now() + L1_SILENCE;
    loop {
        let wait = quiet_until.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(wait) {
            Ok(line) => {
                println!("{line}");
                if !is_kernel_message(&line) {
                    quiet_until = std::time::Instant::now() + L1_SILENCE;
                }
                // A name already counted (the filter's parts match by substring, so a rerun
                // of `blk_x` also runs `pci_blk_x`) is not counted twice.
                if let Some((name, result)) = line
                    .strip_prefix("test ")
                    .and_then(|r| r.split_once(" ... "))
                    .filter(|(name, _)| !seen.iter().any(|s| s == name))
                {
                    if result == STALLED_RESULT {
                        // Not seen: the next L1 guest runs it again.
                        stalled.push(name.to_owned());
                    } else {
                        seen.push(name.to_owned());
                        match result {
                            "ok" => t.passed += 1,
                            r if r.starts_with("skipped") => t.skipped += 1,
                            _ => t.failed.push(name.to_owned()),
                        }
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // SIGTERM: l1run.sh traps it and stops its QEMU.
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = wait_timeout(&mut child, Duration::from_secs(30));
                return format!(
                    "froze (no output but L1's kernel messages for {} s)",
                    L1_SILENCE.as_secs()
                );
            }
        }
    }
    println!("e2e: the L1 run took {} s", started.elapsed().as_secs());
    match child.wait() {
        Ok(status) => format!("ended with {status}"),
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn main() {
    // A test runner started by a Type=notify unit must not hand its readiness socket to the
    // VMs it boots (nixvm would relay their guests' readiness there).
    // SAFETY: no other thread runs yet.
    unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    // libtest-style arguments: take the first non-flag as a name filter.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if std::env::var_os(INSIDE).is_some() {
        std::process::exit(inside(filter));
    }
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
    if assets_ok && SYSTEMD_NAMES.iter().any(|n| t.wants(n)) {
        build_systemd_guest();
    }
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
        "cpu_model_name_is_hosts",
        "boot_elf_pvh",
        "cpus_4_online",
        "reboot_exits_3",
        "serial_file",
        "kvm_clock_by_default",
        "tsc_deadline_timer",
        "panic_reboots_exits_3_config_file",
        "serial_socket_attach",
        "hvc0_socket_replay_and_input",
        "smbios_uuid_oem_strings_credentials",
        "rtc_cmos_binds_dev_rtc0",
        "clocksource_acpi_pm",
        "mmio_guest_finds_an_empty_pci_bus",
        "reboot_method_k_exits_3",
        "reboot_method_a_exits_3",
        "reboot_method_t_exits_3",
        "stdio_terminal_raw_input_and_restored",
        "sigterm_ignored_button_stops_after_timeout_143",
        "api_ping_info_pause_resume",
        "api_shutdown_powers_off_exit_0",
        "sigterm_powers_off_through_acpid_exit_0",
        "on_reboot_restart_boots_again",
        "pci_restart_with_disk_net_fs_console",
        "nix_runner_boots_fake_toplevel",
        "api_shutdown_forced_after_timeout",
        "qmp_status_stop_cont_powerdown_and_monitor",
        "qmp_quit_exits_0",
        "monitor_sendkey_ctrl_alt_delete_reboots",
        "blk_flush_is_fdatasync",
    ];
    let boot_names: Vec<&str> = boot_names
        .into_iter()
        .chain(BLK_NAMES)
        .chain(PCI_NAMES)
        .chain(NET_NAMES)
        .chain(FS_NAMES)
        .chain(STOREFS_NAMES)
        .chain(HOSTILE_NAMES)
        .chain(HOSTILE_PCI_NAMES)
        .chain(HVC_NAMES)
        .chain(VSOCK_NAMES)
        .chain(SYSTEMD_NAMES)
        .chain(PASST_NAMES)
        .chain(VDE_NAMES)
        .collect();
    match route.as_str() {
        "direct" => boot_tests(&mut t, &guest()),
        "l1" if boot_names.iter().any(|n| t.wants(n)) => {
            let (mut seen, mut stalled): (Vec<String>, Vec<String>) = Default::default();
            let mut ended = String::new();
            let started = std::time::Instant::now();
            let mut fruitless = 0;
            // The nested route sometimes freezes the whole L1 guest: then the tests it had
            // not finished run again in a fresh one, and so do those that stalled in every
            // attempt there.
            for attempt in 0..L1_ATTEMPTS {
                let todo: Vec<&str> = boot_names
                    .iter()
                    .copied()
                    .filter(|n| t.wants(n) && !seen.iter().any(|s| s == n))
                    .collect();
                if todo.is_empty() {
                    break;
                }
                if attempt > 0 {
                    if started.elapsed() > L1_BUDGET {
                        ended.push_str(" when the L1 guests had taken all their time");
                        break;
                    }
                    println!(
                        "e2e: the L1 guest {ended}; its {} unfinished or stalled tests run in a new one",
                        todo.len()
                    );
                }
                let before = seen.len();
                ended = run_in_l1(&todo.join(","), &mut t, &mut seen, &mut stalled);
                fruitless = if seen.len() == before {
                    fruitless + 1
                } else {
                    0
                };
                if fruitless == 2 {
                    ended.push_str(", the second in a row to finish no test");
                    break;
                }
            }
            let missing: Vec<&str> = boot_names
                .into_iter()
                .filter(|n| t.wants(n) && !seen.iter().any(|s| s == n))
                .collect();
            for name in missing {
                let why = if stalled.iter().any(|s| s == name) {
                    format!("stalled in every L1 guest that ran it {STALLED}")
                } else {
                    format!("did not run: the L1 guest {ended}")
                };
                t.record(name, Err(why));
            }
        }
        "l1" => {}
        why => {
            let why = why.strip_prefix("none: ").unwrap_or(why).to_owned();
            for name in boot_names {
                t.skip(name, &format!("cannot boot a guest here: {why}"));
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
