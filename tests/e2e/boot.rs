//! Which tests run in which boot (the schedule), the basic boots, and the Nix runner.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{
    console::*, disks::*, fs::*, harness::*, hostile::*, lifecycle::*, net::*, passt::*,
    storefs::*, systemd::*, vde::*, vsock::*,
};

pub(crate) fn boot_tests(t: &mut Runner, g: &Guest) {
    // One boot, several checks: a bzImage with 2 vCPUs, 384M and a NixOS command line.
    let bz_names = [
        "boot_bzimage",
        "cpus_2_online",
        "memory_384m",
        "cmdline_verbatim",
        "poweroff_exits_0",
        "cpu_model_name_is_hosts",
    ];
    if bz_names.iter().any(|n| t.wants(n)) {
        let cl = cmdline("poweroff");
        let mut args = g.args(&g.vmlinuz, &cl);
        args.extend(["--cpus", "2", "--memory", "384M"]);
        let r = boot(&args);
        t.run("boot_bzimage", || expect_markers(&r, &["init"]));
        t.run("cpus_2_online", || expect_marker(&r, "cpus", "2"));
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
        // KVM leaves the processor name's CPUID leaves empty ("AMD 17/01" in the guest's
        // /proc/cpuinfo); nixvm gives the host's, as QEMU's -cpu host does.
        t.run("cpu_model_name_is_hosts", || {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").map_err(|e| e.to_string())?;
            let host = cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, name)| name.trim());
            check!(
                host.is_some() && r.marker("model") == host,
                "guest saw model name {:?}, the host's is {host:?}\n{}",
                r.marker("model"),
                r.describe()
            );
            Ok(())
        });
    }

    // ELF vmlinux through its PVH entry, 4 vCPUs, reboot, console into a file.
    let pvh_names = [
        "boot_elf_pvh",
        "cpus_4_online",
        "reboot_exits_3",
        "serial_file",
        "kvm_clock_by_default",
        "tsc_deadline_timer",
    ];
    if pvh_names.iter().any(|n| t.wants(n)) {
        let log = temp_dir().join("console.log");
        let serial = format!("file={}", log.display());
        let cl = cmdline("reboot");
        let mut args = g.args(&g.vmlinux, &cl);
        args.extend(["--cpus", "4", "--serial", &serial]);
        // The console goes to the file: boot()'s own retry cannot see it.
        let (r, console) = retry_stalled(
            "boot",
            || {
                let r = boot(&args);
                (r, std::fs::read_to_string(&log).unwrap_or_default())
            },
            |(r, console)| spontaneous_reset(r.code(), console, &r.stderr),
        );
        let r = Run {
            stdout: console,
            ..r
        };
        t.run("boot_elf_pvh", || expect_markers(&r, &["init"]));
        t.run("serial_file", || expect_markers(&r, &["init", "reboot"]));
        t.run("cpus_4_online", || expect_marker(&r, "cpus", "4"));
        t.run("reboot_exits_3", || {
            check!(r.code() == Some(3), "reboot: {}", r.describe());
            Ok(())
        });
        // The PM timer is there but not chosen: kvm-clock reads need no exit.
        t.run("kvm_clock_by_default", || {
            expect_marker(&r, "clocksource", "kvm-clock")
        });
        // KVM emulates it; the guest then programs its timer by deadline, uncalibrated.
        t.run("tsc_deadline_timer", || {
            expect_marker(&r, "tsc_deadline", "yes")
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
    group(t, &HVC_NAMES, "the hvc0 boot", || hvc_boot(g));
    t.run_retry("hvc0_socket_replay_and_input", || hvc_socket(g));

    // One boot (one vCPU, as a NixOS test node by default): the SMBIOS tables, the RTC the
    // DSDT describes, and the ACPI PM timer as the clock source a test node asks for (nixpkgs'
    // test-instrumentation.nix: clocksource=acpi_pm).
    if [
        "smbios_uuid_oem_strings_credentials",
        "rtc_cmos_binds_dev_rtc0",
        "clocksource_acpi_pm",
        "mmio_guest_finds_an_empty_pci_bus",
    ]
    .iter()
    .any(|n| t.wants(n))
    {
        let r = machine_boot(g);
        t.run("smbios_uuid_oem_strings_credentials", || smbios(&r));
        t.run("rtc_cmos_binds_dev_rtc0", || {
            // rtc_cmos reads the host's UTC time from the clock: the year shows it ran.
            check!(
                r.marker("rtc").is_some_and(|v| {
                    // "rtc_cmos 00:01,2026-11-28,dev"
                    let f: Vec<&str> = v.split(',').collect();
                    f.len() == 3
                        && f[0].starts_with("rtc_cmos")
                        && f[1].starts_with("20")
                        && f[2] == "dev"
                }),
                "the guest's /dev/rtc0: {:?}\n{}",
                r.marker("rtc"),
                r.describe()
            );
            Ok(())
        });
        t.run("clocksource_acpi_pm", || {
            expect_marker(&r, "clocksource", "acpi_pm")
        });
        // On virtio-mmio the PCI bus has its host bridge and nothing else; the kernel's probe
        // for PCI (a KERN_ERR line, shown under `quiet`) must not say it found no way to it.
        t.run("mmio_guest_finds_an_empty_pci_bus", || {
            check!(
                !r.stdout.contains("No config space access function"),
                "the guest found no PCI configuration space:\n{}",
                r.describe()
            );
            expect_marker(&r, "pci", "0000:00:00.0")
        });
    }

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
            // Inside L1 (AMD SVM), where nixvm cannot tell where a triple fault happened,
            // L1's shutdown trace can: in the kernel's text (the int3 on an empty IDT).
            if let Some(trace) = shutdown_trace(12).filter(|_| method == "t") {
                check!(
                    trace.contains("reason shutdown rip 0xffffffff"),
                    "L1's trace has no shutdown exit in the guest kernel: {trace}"
                );
            }
            Ok(())
        });
    }

    t.run_retry("stdio_terminal_raw_input_and_restored", || {
        stdio_terminal(g)
    });

    group(t, &BLK_NAMES, "the disks boot", || disks_boot(g, "mmio"));
    group(t, &PCI_NAMES, "the PCI disks boot", || disks_boot(g, "pci"));
    t.run_retry("blk_flush_is_fdatasync", || flush_is_fdatasync(g));
    lifecycle_tests(t, g);
    qmp_tests(t, g);
    nix_runner_test(t);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        for name in NET_NAMES {
            t.skip(name, "creating a network namespace and TAPs needs root");
        }
    } else {
        group(t, &NET_NAMES, "the network boot", || net_boot(g));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        for name in PASST_NAMES {
            t.skip(name, "giving passt a routed network namespace needs root");
        }
    } else if !have_passt() {
        for name in PASST_NAMES {
            t.skip(
                name,
                "passt is not installed (resources/dev.sh installs it)",
            );
        }
    } else {
        group(t, &PASST_NAMES, "the passt boot", || passt_boot(g));
    }
    if have_vde_switch() {
        group(t, &VDE_NAMES, "the vde boot", || vde_boot(g));
    } else {
        for name in VDE_NAMES {
            t.skip(
                name,
                "vde_switch is not installed (resources/dev.sh installs vde2)",
            );
        }
    }
    group(t, &STOREFS_NAMES, "the storefs boot", || storefs_boot(g));
    match crate::virtiofsd::find() {
        Some(bin) => group(t, &FS_NAMES, "the virtio-fs boot", || fs_boot(g, &bin)),
        None => {
            for name in FS_NAMES {
                t.skip(name, "no virtiofsd (cargo install virtiofsd --locked)");
            }
        }
    }

    if VSOCK_NAMES.iter().any(|n| t.wants(n)) {
        match build_static("vsock-io") {
            Ok(bin) => group(t, &VSOCK_NAMES, "the vsock boot", || vsock_boot(g, &bin)),
            Err(why) => {
                for name in VSOCK_NAMES {
                    t.skip(name, &why);
                }
            }
        }
    }

    if SYSTEMD_NAMES.iter().any(|n| t.wants(n)) {
        match systemd_guest_missing().map_or_else(|| build_static("vsock-io"), Err) {
            Ok(tool) => group(t, &SYSTEMD_NAMES, "the systemd guest boot", || {
                systemd_boot(g, &tool)
            }),
            Err(why) => {
                for name in SYSTEMD_NAMES {
                    t.skip(name, &why);
                }
            }
        }
    }

    let hostile = [(HOSTILE_NAMES, "mmio"), (HOSTILE_PCI_NAMES, "pci")];
    if hostile.iter().flat_map(|(n, _)| n).any(|n| t.wants(n)) {
        let bin = build_static("hostile-guest");
        for (names, transport) in hostile {
            if !names.iter().any(|n| t.wants(n)) {
                continue;
            }
            match &bin {
                Ok(bin) => group(
                    t,
                    &names,
                    &format!("the hostile guest boot on {transport}"),
                    || hostile_boot(g, bin, transport),
                ),
                Err(why) => {
                    for name in names {
                        t.skip(name, why);
                    }
                }
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

/// The runner script that nix/lib/runner.nix generates boots a fake NixOS toplevel made of
/// the test guest (resources/nix-runner-boot.sh checks exit 0, the poweroff marker and the
/// NixOS command line).
pub(crate) fn nix_runner_test(t: &mut Runner) {
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
        let tail = tail(&text, 15);
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

/// A boot that reports what the guest finds of the machine: SMBIOS, the RTC, the clock source.
fn machine_boot(g: &Guest) -> Run {
    let secret = temp_dir().join("smbios-secret");
    std::fs::write(&secret, "from a file\n").unwrap();
    let script = script_disk(
        "smbios-script.img",
        r#"
d=/sys/class/dmi/id
echo "NIXVM-TEST: dmi=$(cat $d/sys_vendor),$(cat $d/product_name),$(cat $d/bios_vendor),$(cat $d/product_uuid)"
for e in /sys/firmware/dmi/entries/11-*; do
  tail -c +6 "$e/raw" | tr '\0' '\n' | while read -r l; do
    [ -n "$l" ] && echo "NIXVM-TEST: oem=$l"
  done
done
echo "NIXVM-TEST: secret=$(tail -c +6 /sys/firmware/dmi/entries/11-0/raw | tr '\0' '\n' | grep '^io.systemd.credential.binary:secret=' | cut -d= -f2- | base64 -d)"
echo "NIXVM-TEST: rtc=$(cat /sys/class/rtc/rtc0/name),$(cat /sys/class/rtc/rtc0/date),$(test -c /dev/rtc0 && echo dev)"
echo "NIXVM-TEST: pci=$(echo $(ls /sys/bus/pci/devices 2>/dev/null))"
"#,
    );
    let cl = format!("{} clocksource=acpi_pm", cmdline("script"));
    let d = format!("path={},readonly=on", script.display());
    let cred = format!("secret=@{}", secret.display());
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend([
        "--disk",
        &d,
        "--uuid",
        "6FA459EA-EE8A-3CA4-894E-DB77E160355E",
        "--smbios-oem-string",
        "first string",
        "--credential",
        "greeting=hello world",
        "--credential",
        &cred,
    ]);
    boot(&args)
}

/// The SMBIOS tables as the guest's kernel reads them: vendor and product, the --uuid, the
/// OEM strings in order, a --credential from a file decoding to the file's bytes.
fn smbios(r: &Run) -> TestResult {
    check!(
        r.marker("dmi") == Some("nixvm,nixvm,nixvm,6fa459ea-ee8a-3ca4-894e-db77e160355e"),
        "vendor, product, BIOS vendor, UUID: {:?}\n{}",
        r.marker("dmi"),
        r.describe()
    );
    let oem: Vec<&str> = r
        .stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("NIXVM-TEST: oem="))
        .collect();
    check!(
        oem == [
            "first string",
            "io.systemd.credential.binary:greeting=aGVsbG8gd29ybGQ=",
            "io.systemd.credential.binary:secret=ZnJvbSBhIGZpbGUK",
        ],
        "OEM strings {oem:?}\n{}",
        r.describe()
    );
    check!(
        r.marker("secret") == Some("from a file"),
        "the credential from a file: {:?}",
        r.marker("secret")
    );
    Ok(())
}
