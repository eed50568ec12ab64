//! Usage errors and --dry-run: run on the host, no guest started.
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

pub(crate) fn usage_tests(t: &mut Runner, kernel: Option<&Path>) {
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
    t.run("usage_qemu_option_unsupported", || {
        one_line_usage_error(
            &["--kernel", k, "--", "-serial", "stdio", "-vga", "std"],
            &[],
            "the QEMU option `-vga` has no nixvm equivalent",
        )
    });
    t.run("dry_run_maps_the_test_drivers_qemu_options", || {
        // Exactly what the NixOS test driver appends to a start script, and a vlan NIC.
        let d = tmp.display();
        let driver = format!(
            "-qmp unix:{d}/qmp,server=on,wait=off -monitor unix:{d}/monitor \
             -chardev socket,id=shell,path={d}/shell -device virtio-serial \
             -device virtconsole,chardev=shell -device virtio-rng-pci -serial stdio -no-reboot \
             -nographic -device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:01 \
             -netdev vde,id=vlan1,sock={d}/vde1.ctl"
        );
        let mut args = vec!["--kernel", k, "--rng", "off", "--dry-run", "--"];
        args.extend(driver.split_whitespace());
        let r = nixvm(&args, &[], Duration::from_secs(30));
        check!(r.code() == Some(0), "dry run failed: {}", r.describe());
        let v: serde_json::Value =
            serde_json::from_str(&r.stdout).map_err(|e| format!("not JSON: {e}: {}", r.stdout))?;
        let want = serde_json::json!({
            "qmp": format!("{d}/qmp"),
            "monitor": format!("connect={d}/monitor"),
            "console": format!("connect={d}/shell"),
            "serial": "stdio",
            "rng": true,
            "on_reboot": "exit",
            "nets": [{"vde": format!("{d}/vde1.ctl"), "mac": "52:54:00:12:01:01"}],
        });
        for (key, value) in want.as_object().unwrap() {
            check!(
                &v[key] == value,
                "{key}: {} (wanted {value}) in {v}",
                v[key]
            );
        }
        Ok(())
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
pub(crate) fn kvm_not_writable(kernel: &str, tmp: &Path) -> TestResult {
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
