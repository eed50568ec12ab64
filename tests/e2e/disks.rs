//! virtio-blk and virtio-rng.
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// The checks of the disks boot, in the order `disks_boot` returns them.
pub(crate) const BLK_NAMES: [&str; 9] = [
    "blk_sha256_matches_host",
    "blk_order_and_serials",
    "blk_readonly_refuses_writes",
    "blk_flushed_write_survives_kill_9",
    "blk_second_vm_on_locked_image_fails",
    "blk_driver_reload",
    "blk_parallel_requests",
    "rng_hwrng_gives_bytes",
    "blk_devices_are_virtio_mmio",
];

/// The same boot with `--transport pci`.
pub(crate) const PCI_NAMES: [&str; 9] = [
    "pci_blk_sha256_matches_host",
    "pci_blk_order_and_serials",
    "pci_blk_readonly_refuses_writes",
    "pci_blk_flushed_write_survives_kill_9",
    "pci_blk_second_vm_on_locked_image_fails",
    "pci_blk_driver_reload",
    "pci_blk_parallel_requests",
    "pci_rng_hwrng_gives_bytes",
    "pci_devices_on_bus_0_with_msix",
];

/// One boot with three disks (data, read-only, scratch) plus the script disk and virtio-rng,
/// on `transport` (mmio or pci); returns the result of each check, in the order of
/// `BLK_NAMES`.
pub(crate) fn disks_boot(g: &Guest, transport: &str) -> Result<Vec<TestResult>, String> {
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
echo "NIXVM-TEST: vda_path=$(readlink /sys/block/vda)"
echo "NIXVM-TEST: msix=$(grep -c 'PCI-MSI.*virtio' /proc/interrupts),ioapic=$(grep -c 'IO-APIC.*virtio' /proc/interrupts)"
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
        "--cpus",
        "2",
        "--disk",
        &d1,
        "--disk",
        &d2,
        "--disk",
        &d3,
        "--disk",
        &d4,
        "--transport",
        transport,
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
    // Where the guest found the disk, and how the devices interrupt it: on virtio-pci, two
    // MSI-X vectors for each of the five devices and no interrupt line.
    let path = vm.marker("vda_path");
    let placed = match transport {
        "pci" => path
            .as_deref()
            .is_some_and(|p| p.contains("/pci0000:00/0000:00:01.0/virtio"))
            .then_some(())
            .ok_or_else(|| format!("vda is at {path:?}"))
            .and_then(|()| is("msix", "10,ioapic=0")),
        _ => path
            .as_deref()
            .is_some_and(|p| p.contains("/platform/LNRO0005:"))
            .then_some(())
            .ok_or_else(|| format!("vda is at {path:?}"))
            .and_then(|()| is("msix", "0,ioapic=5")),
    };
    Ok(vec![
        sha,
        order,
        readonly,
        flushed(),
        locked(),
        reload,
        parallel,
        rng,
        placed,
    ])
}

/// Every FLUSH the guest sends reaches the disk as an fdatasync of the image: nixvm runs
/// under `strace -e trace=fdatasync,fsync`, the guest counts its own flush requests
/// (/sys/block/vda/stat, field 16) around five fsync'd writes.
pub(crate) fn flush_is_fdatasync(g: &Guest) -> TestResult {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        return Err("needs strace (Debian package strace; resources/dev.sh installs it)".into());
    }
    let image = disk_image("flush.img", 1 << 20, |_| 0);
    let script = script_disk(
        "flush-script.img",
        r#"
flushes() { set -- $(cat /sys/block/vda/stat); echo "${16}"; }
before=$(flushes)
for i in 1 2 3 4 5; do
  printf 'flush %s' "$i" | dd of=/dev/vda bs=512 seek=$i conv=fsync,notrunc 2>/dev/null
done
echo "NIXVM-TEST: flushes=$(( $(flushes) - before ))"
"#,
    );
    let log = temp_dir().join("flush.strace");
    let (d1, d2) = (
        format!("path={}", image.display()),
        format!("path={},readonly=on", script.display()),
    );
    let cl = cmdline("script");
    let mut args = vec![
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=fdatasync,fsync",
        "-o",
        log.to_str().expect("utf-8 path"),
        NIXVM,
    ];
    args.extend(g.args(&g.vmlinuz, &cl));
    args.extend(["--disk", &d1, "--disk", &d2]);
    let mut cmd = std::process::Command::new("strace");
    cmd.args(&args).stdin(std::process::Stdio::null());
    let mut vm = Streaming::spawn_command(cmd)?;
    let line = vm.wait_for("NIXVM-TEST: flushes=")?;
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT)?;
    check!(
        status.and_then(|s| s.code()) == Some(0),
        "nixvm under strace: {status:?}\n{}",
        vm.seen
    );
    let flushes: usize = line
        .trim_end_matches('\r')
        .rsplit('=')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad marker {line:?}"))?;
    let trace = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
    let name = format!("<{}>", image.display());
    let syncs = trace
        .lines()
        .filter(|l| l.contains("fdatasync(") && l.contains(&name))
        .count();
    check!(
        flushes >= 5,
        "the guest sent {flushes} flushes for 5 fsyncs"
    );
    check!(
        syncs == flushes,
        "{flushes} FLUSH requests, {syncs} fdatasync calls on the image:\n{trace}"
    );
    Ok(())
}
