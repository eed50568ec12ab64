//! `--net vde=DIR`: two VMs on one `vde_switch`, as the NixOS test driver runs a vlan, with
//! no root and no TAP; the monitor's `set_link` taking one VM's link down and up; and
//! `--net local` as that VM's eth0, where the driver's machines have QEMU's user network.
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::lifecycle::{monitor_answer, monitor_command};

pub(crate) const VDE_NAMES: [&str; 4] = [
    "vde_two_vms_ping",
    "vde_two_vms_tcp_1m",
    "vde_set_link_off_blocks_on_restores",
    "net_local_dhcp_and_gateway_ping",
];

/// Bytes the first VM fetches from the second (HTTP over TCP).
const VDE_BYTES: usize = 1 << 20;

pub(crate) fn have_vde_switch() -> bool {
    installed("vde_switch", "--help")
}

/// A `vde_switch -s DIR` as the driver starts it (its console on a pipe we hold open),
/// killed when dropped.
struct Switch {
    child: Child,
    dir: std::path::PathBuf,
}

impl Switch {
    fn start(name: &str) -> Result<Switch, String> {
        let dir = temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let child = Command::new("vde_switch")
            .arg("-s")
            .arg(&dir)
            .args(["--dirmode", "0700"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("vde_switch: {e}"))?;
        let s = Switch { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.dir.join("ctl").exists() {
            check!(Instant::now() < deadline, "vde_switch made no ctl socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first VM, with the NICs of a test driver's machine (eth0 the local network, eth1 the
/// vlan): takes a DHCP lease on eth0 and pings its gateway; pings the second VM, fetches its
/// bytes; then waits for the host to take its eth1 link down (carrier off, the second
/// unreachable) and up again.
const FIRST: &str = r#"
ip link set lo up
ip link set eth0 up
cat > /tmp/dhcp.sh <<'EOF'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add "$ip/$mask" dev "$interface"
echo "$ip/$mask,$router" > /tmp/lease
EOF
chmod +x /tmp/dhcp.sh
udhcpc -i eth0 -n -q -t 20 -T 2 -s /tmp/dhcp.sh >/dev/null 2>&1
echo "NIXVM-TEST: lease=$(cat /tmp/lease)"
if ping -c 1 -W 5 10.0.2.2 >/dev/null 2>&1; then r=ok; else r=failed; fi
echo "NIXVM-TEST: gateway_ping=$r"
if ping -c 1 -W 2 10.0.2.3 >/dev/null 2>&1; then r=answered; else r=silent; fi
echo "NIXVM-TEST: other_ping=$r"
ip addr add 10.88.0.1/24 dev eth1
ip link set eth1 up
echo "NIXVM-TEST: mac=$(cat /sys/class/net/eth1/address)"
echo "NIXVM-TEST: listening"
r=failed
for i in $(seq 60); do ping -c 1 -W 2 10.88.0.2 >/dev/null 2>&1 && { r=ok; break; }; done
echo "NIXVM-TEST: ping=$r"
# The second VM serves its bytes over HTTP once it has them (a length, so the end is clear).
for i in $(seq 120); do wget -q -O /tmp/in http://10.88.0.2:8080/out && break; sleep 1; done
echo "NIXVM-TEST: received=$(wc -c < /tmp/in),$(sha256sum < /tmp/in | cut -d' ' -f1)"
echo "NIXVM-TEST: link_test"
c=x
for i in $(seq 600); do c=$(cat /sys/class/net/eth1/carrier); [ "$c" = 0 ] && break; sleep 0.1; done
echo "NIXVM-TEST: carrier_off=$c"
if ping -c 1 -W 3 10.88.0.2 >/dev/null 2>&1; then b=no; else b=yes; fi
echo "NIXVM-TEST: blocked=$b"
for i in $(seq 600); do c=$(cat /sys/class/net/eth1/carrier); [ "$c" = 1 ] && break; sleep 0.1; done
echo "NIXVM-TEST: carrier_on=$c"
r=failed
for i in $(seq 30); do ping -c 1 -W 2 10.88.0.2 >/dev/null 2>&1 && { r=ok; break; }; done
echo "NIXVM-TEST: unblocked=$r"
# Tells the second VM it may stop.
ip addr add 10.88.0.3/24 dev eth1
sleep 2
"#;

/// Two VMs on one switch, each with its MAC given as the driver gives it: they ping each
/// other, the first fetches 1 MiB from the second over HTTP (sha256 on both sides), and the
/// first's vlan link goes down and up through `set_link virtio-net-pci.1` on its monitor, the
/// driver's `block()` and `unblock()`. The first's eth0 is `--net local`. Both are on
/// virtio-pci, as nixosModules.test gives a test node's devices.
pub(crate) fn vde_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
    let switch = Switch::start("vde1.ctl")?;
    let first = script_disk("vde-a.img", FIRST);
    let second = script_disk(
        "vde-b.img",
        &format!(
            r#"
ip link set lo up
ip addr add 10.88.0.2/24 dev eth0
ip link set eth0 up
echo "NIXVM-TEST: mac=$(cat /sys/class/net/eth0/address)"
r=failed
for i in $(seq 60); do ping -c 1 -W 2 10.88.0.1 >/dev/null 2>&1 && {{ r=ok; break; }}; done
echo "NIXVM-TEST: ping=$r"
mkdir /www
head -c {VDE_BYTES} /dev/urandom > /www/out
echo "NIXVM-TEST: sent=$(sha256sum < /www/out | cut -d' ' -f1)"
httpd -p 8080 -h /www
# Up until the first VM is done (it fetches, then pings this one around its link test).
for i in $(seq 600); do ping -c 1 -W 1 10.88.0.3 >/dev/null 2>&1 && break; done
"#
        ),
    );
    let mon_path = temp_dir().join("vde-monitor.sock");
    let _ = std::fs::remove_file(&mon_path);
    let mon_l = UnixListener::bind(&mon_path).map_err(|e| e.to_string())?;
    let mon = format!("connect={}", mon_path.display());
    let cl = cmdline("script");
    let spawn = |script: &std::path::Path, mac: &str, extra: &[&str]| {
        let d = format!("path={},readonly=on", script.display());
        let n = format!("vde={},mac={mac}", switch.dir.display());
        let mut args = g.args(&g.vmlinuz, &cl);
        args.extend(extra);
        args.extend(["--transport", "pci", "--net", &n, "--disk", &d]);
        Streaming::spawn(&args)
    };
    let mut a = spawn(
        &first,
        "52:54:00:12:01:01",
        &["--monitor", &mon, "--net", "local,mac=52:54:00:12:34:56"],
    )?;
    let mut m = accept_within(&mon_l, Duration::from_secs(60))?;
    m.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    monitor_answer(&mut m)?;
    a.wait_for("NIXVM-TEST: listening")?;
    let mut b = spawn(&second, "52:54:00:12:01:02", &[])?;
    let ran = (|| {
        b.wait_for("NIXVM-TEST: sent=")?;
        a.wait_for("NIXVM-TEST: received=")?;
        Ok::<(), String>(())
    })();
    let link = ran.clone().and_then(|()| {
        a.wait_for("NIXVM-TEST: link_test")?;
        let none = monitor_command(&mut m, "set_link virtio-net-pci.2 off")?;
        check!(none.contains("not found"), "a third NIC: {none:?}");
        let off = monitor_command(&mut m, "set_link virtio-net-pci.1 off")?;
        check!(off.trim().is_empty(), "set_link off: {off:?}");
        a.wait_for("NIXVM-TEST: blocked=")?;
        monitor_command(&mut m, "set_link virtio-net-pci.1 on")?;
        a.wait_for("NIXVM-TEST: unblocked=")?;
        a.expect("carrier_off", "0")
            .and(a.expect("blocked", "yes"))
            .and(a.expect("carrier_on", "1"))
            .and(a.expect("unblocked", "ok"))
    });
    // After a failure the VMs are stopped at once.
    let end = if link.is_ok() {
        BOOT_TIMEOUT
    } else {
        Duration::ZERO
    };
    let (sa, sb) = (
        wait_timeout(&mut a.child, end),
        wait_timeout(&mut b.child, end),
    );
    for vm in [&mut a, &mut b] {
        while let Ok(l) = vm.lines.try_recv() {
            vm.push_line(&l);
        }
    }
    let logs = || {
        let err = |vm: &Streaming| std::fs::read_to_string(&vm.stderr).unwrap_or_default();
        format!(
            "the second VM's console:\n{}\nnixvm's messages: first:\n{}\nsecond:\n{}",
            b.seen,
            tail(&err(&a), 20),
            tail(&err(&b), 20)
        )
    };
    // A stalled boot is retried as a whole.
    ran.map_err(|e| format!("{e}\n{}", logs()))?;
    let ping = a
        .expect("mac", "52:54:00:12:01:01")
        .and(b.expect("mac", "52:54:00:12:01:02"))
        .and(a.expect("ping", "ok"))
        .and(b.expect("ping", "ok"))
        .and_then(|()| {
            check!(
                sa.and_then(|s| s.code()) == Some(0) && sb.and_then(|s| s.code()) == Some(0),
                "the VMs ended with {sa:?} and {sb:?}"
            );
            Ok(())
        });
    let sent = b.marker("sent").unwrap_or_default();
    let tcp = a
        .expect("received", &format!("{VDE_BYTES},{sent}"))
        .map_err(|e| format!("{e}\n{}", logs()));
    let local = a
        .expect("lease", "10.0.2.15/24,10.0.2.2")
        .and(a.expect("gateway_ping", "ok"))
        .and(a.expect("other_ping", "silent"));
    drop(switch);
    Ok(vec![ping, tcp, link, local])
}
