//! A hostile guest: `resources/hostile-guest.c` drives every virtio device (virtio-mmio
//! windows through /dev/mem, or virtio-pci functions through their BARs) as a broken or
//! malicious driver would, while the test keeps pinging nixvm.
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::lifecycle::api_guest;
use crate::net::{NetNs, in_netns, join, open_tap_fd};

/// The checks of the hostile boot, in the order `hostile_boot` returns them.
pub(crate) const HOSTILE_NAMES: [&str; 3] = [
    "hostile_guest_nixvm_keeps_answering",
    "hostile_guest_broken_queues_need_reset",
    "hostile_guest_devices_work_after",
];

/// The same checks with the devices on virtio-pci (`--transport pci`), and MSI-X games.
pub(crate) const HOSTILE_PCI_NAMES: [&str; 3] = [
    "hostile_pci_guest_nixvm_keeps_answering",
    "hostile_pci_guest_broken_queues_need_reset",
    "hostile_pci_guest_devices_work_after",
];

/// One boot with two data disks, a share served by storefs, virtio-rng, vsock and (as root) a NIC on
/// a TAP, on `transport` (mmio or pci); the guest unbinds its virtio drivers and runs the
/// hostile driver against all of them.
pub(crate) fn hostile_boot(
    g: &Guest,
    bin: &Path,
    transport: &str,
) -> Result<Vec<TestResult>, String> {
    let pci = transport == "pci";
    let data = disk_image("hostile-data.img", 1 << 20, |i| {
        u8::try_from((i * 13 + 7) % 256).unwrap()
    });
    let (exe_disk, copy_exe) = exe_disk(bin, "vdb")?;
    let share = temp_dir().join("hostile-share");
    std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
    std::fs::write(share.join("file"), "x").map_err(|e| e.to_string())?;

    let (drivers, hostile) = if pci {
        ("/sys/bus/pci/drivers/virtio-pci", "/tmp/hostile-guest pci")
    } else {
        (
            "/sys/bus/platform/drivers/virtio-mmio",
            "/tmp/hostile-guest",
        )
    };
    let script = format!(
        r#"
{copy_exe}
cd {drivers}
for d in *; do
  case $d in bind|unbind|uevent|module|new_id|remove_id) ;; *) echo "$d" > unbind ;; esac
done
cd /
echo "NIXVM-TEST: unbound=$(ls /sys/bus/virtio/devices | wc -l)"
{hostile}
echo "NIXVM-TEST: hostile_exit=$?"
# Time for the test to stop pinging before the power-off takes the socket away.
sleep 3
"#
    );
    let d1 = format!("path={}", data.display());
    let d2 = format!("path={},readonly=on", exe_disk.display());
    let fs = format!("tag=hostile,path={},readonly=on", share.display());
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let ns = if root_user {
        Some(NetNs::new(&["nxtaph"])?)
    } else {
        None
    };
    let tap = match &ns {
        Some(ns) => Some(join(in_netns(&ns.0, || open_tap_fd("nxtaph")))?),
        None => None,
    };
    let net = tap.map(|fd| format!("fd={fd}"));
    let mut extra = vec![
        "--disk", &d1, "--disk", &d2, "--fs", &fs, "--memory", "256M", "--vsock", "cid=9",
    ];
    extra.extend(["--transport", transport]);
    if let Some(n) = &net {
        extra.extend(["--net", n]);
    }
    let (mut vm, sock) = api_guest(g, "hostile", &script, &extra)?;
    if let Some(fd) = tap {
        // SAFETY: the TAP fd is ours; nixvm has its own copy by now.
        unsafe { libc::close(fd) };
    }

    // Ping all along: every answer within the ping's own timeout.
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let (stop, sock) = (stop.clone(), sock.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed, mut slowest) = (0u32, Vec::new(), Duration::ZERO);
            while !stop.load(Ordering::Acquire) {
                let start = Instant::now();
                if sock.exists() {
                    let s = sock.to_str().expect("utf-8 path");
                    let r = nixvm(
                        &["ctl", "--api-socket", s, "ping"],
                        &[],
                        Duration::from_secs(60),
                    );
                    slowest = slowest.max(start.elapsed());
                    if r.code() == Some(0) {
                        ok += 1;
                    } else {
                        failed.push(r.describe());
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            (ok, failed, slowest)
        })
    };
    let done = vm.wait_for("NIXVM-TEST: hostile_exit=");
    stop.store(true, Ordering::Release);
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT);
    let (pings, ping_failures, slowest) = pinger.join().map_err(|_| "pinger panicked")?;
    done?;
    let status = status?;
    drop(ns);

    let keeps_answering = || -> TestResult {
        vm.expect("hostile_exit", "0")?;
        vm.expect("hostile", "done")?;
        check!(
            ping_failures.is_empty() && pings > 0,
            "{pings} pings answered (slowest {slowest:?}); failed: {ping_failures:?}"
        );
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm after the guest powered off: {status:?}\nconsole:\n{}",
            vm.seen
        );
        Ok(())
    };
    // Queues in states no device can serve put the device in DEVICE_NEEDS_RESET.
    let mut kinds = vec!["blk0", "blk1", "blk2", "rng0"];
    if net.is_some() {
        kinds.push("net0");
    }
    // (An unready queue is simply not served, and invalid queue sizes are not taken: both
    // leave the device quiet, and the games go on.)
    let need_reset = || -> TestResult {
        for k in &kinds {
            vm.expect(&format!("{k}_ahead"), "needs_reset")?;
            vm.expect(&format!("{k}_wild_ring"), "needs_reset")?;
        }
        // The share's rings are storefs' to serve: a ring outside guest memory is refused
        // when nixvm hands it over.
        vm.expect("fs0_wild_ring", "needs_reset")?;
        // virtio-pci: MSI-X on with garbage in its table; a vector past the table refused
        // (NO_VECTOR), the one in it taken, and the error signalled through it.
        // And a BAR the guest tries to move stays where the device is.
        if pci {
            for k in &kinds {
                vm.expect(&format!("{k}_msix"), "config:0,queue:ffff,needs_reset")?;
            }
            for k in kinds.iter().chain(&["fs0"]) {
                vm.expect(&format!("{k}_bar"), "mask:ffff8000,kept")?;
            }
        }
        Ok(())
    };
    let work_after = || -> TestResult {
        // The kinds above, the share and the vsock device (whose receive queue is only
        // touched when it has something to send: the games leave it quiet).
        vm.expect("hostile_devices", &(kinds.len() + 2).to_string())?;
        // Bad chains (zero-length, looping, outside memory) are each completed, with an
        // error where they carry a status, and the queue goes on.
        for k in kinds.iter().chain(&["fs0"]) {
            vm.expect(&format!("{k}_zero_length"), "used:6,quiet")?;
            vm.expect(&format!("{k}_loop"), "used:3,quiet")?;
            vm.expect(&format!("{k}_wild_address"), "used:3,quiet")?;
        }
        // The first disk's first bytes, (i * 13 + 7) % 256.
        vm.expect("blk0_alive", "status:0,first:0714212e")?;
        vm.expect("blk0_discard_huge", "used:1,status:1")?;
        vm.expect("blk0_write_zeroes_huge", "used:1,status:1")?;
        vm.expect("blk0_write_past_end", "used:1,status:1")?;
        vm.expect("blk0_reset_mid_request", "ok")?;
        vm.expect("rng0_alive", "bytes:64")?;
        vm.expect("fs0_alive", "error:0,major:7")?;
        if net.is_some() {
            vm.expect("net0_alive", "ok")?;
        }
        Ok(())
    };
    Ok(vec![keeps_answering(), need_reset(), work_after()])
}
