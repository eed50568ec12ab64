//! virtio-net: TAPs in a network namespace the test creates.
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

pub(crate) const NET_NAMES: [&str; 5] = [
    "net_ping_host",
    "net_tcp_64m_guest_to_host",
    "net_tcp_64m_host_to_guest",
    "net_two_nics_order_and_macs",
    "net_fd_passed_tap",
];

/// Runs `f` on a thread that has entered the network namespace `ns` (sockets and TAPs it
/// opens live there).
pub(crate) fn in_netns<T: Send + 'static>(
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

pub(crate) fn join<T>(h: std::thread::JoinHandle<Result<T, String>>) -> Result<T, String> {
    h.join().map_err(|_| "thread panicked".to_owned())?
}

/// Runs `ip ARGS`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
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
pub(crate) struct NetNs(pub(crate) String);

impl NetNs {
    pub(crate) fn new(taps: &[&str]) -> Result<NetNs, String> {
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
pub(crate) fn open_tap_fd(name: &str) -> Result<i32, String> {
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
pub(crate) const NET_BYTES: usize = 64 << 20;

/// One boot with three NICs: two TAPs by name (one multi_queue, with a given MAC), one by an
/// inherited fd.
/// The guest pings the host side of each, sends 64 MiB to a listener on the host side of
/// eth0 and receives 64 MiB on its own listener. Returns the results in NET_NAMES order.
pub(crate) fn net_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
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
# Frames the guest's driver threw away (a mergeable frame whose buffers it saw only in part).
s=/sys/class/net/eth0/statistics
echo "NIXVM-TEST: rx_errors=$(cat $s/rx_length_errors),$(cat $s/rx_frame_errors)"
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
    let rx_errors = vm.wait_for("NIXVM-TEST: rx_errors=").map(drop);
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
        )?;
        rx_errors?;
        is("rx_errors", "0,0")
    });
    let order = is(
        "mac_eth0",
        &mac_hex(&nixvm_devices::virtio::net::mac_from_name("nxtap0")),
    )
    .and(is("mac_eth1", "52:54:00:12:34:56"));
    let fd_ok = is(
        "mac_eth2",
        &mac_hex(&nixvm_devices::virtio::net::mac_from_name("nxtap2")),
    )
    .and(is("ping_eth2", "ok"));
    let _ = std::fs::remove_file(&got_path);
    let _ = std::fs::remove_file(&sent_path);
    Ok(vec![ping, up, down, order, fd_ok])
}

pub(crate) fn mac_hex(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
