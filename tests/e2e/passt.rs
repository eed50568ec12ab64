//! `--net passt`: user-mode networking with nixvm running as an unprivileged user. The
//! test gives passt a network namespace with a default route (which passt takes the
//! guest's addresses from; the L1 guest has no network of its own) and runs nixvm in it as
//! `nobody`, with a KVM device node of its own.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::net::{NetNs, in_netns, ip, join, open_tap_fd};

pub(crate) const PASST_NAMES: [&str; 3] = [
    "passt_dhcp_and_large_mtu",
    "passt_guest_reaches_host_loopback",
    "passt_forwarded_port_reaches_guest",
];

const BYTES: usize = 4 << 20;

/// Whether passt is installed (dev.sh installs it).
pub(crate) fn have_passt() -> bool {
    installed("passt", "--version")
}

/// A network namespace with a TAP (held open, so that its link is up) and a default route
/// through it: what passt needs to find the addresses it gives the guest.
fn routed_ns() -> Result<(NetNs, i32), String> {
    let ns = NetNs::new(&["nxpasst0"])?;
    let fd = join(in_netns(&ns.0, || open_tap_fd("nxpasst0")))?;
    ip(&["-n", &ns.0, "route", "add", "default", "via", "10.77.0.254"])?;
    Ok((ns, fd))
}

/// A KVM device node only `nobody` may open (the real /dev/kvm is left as it is).
fn kvm_node_for_nobody(dir: &std::path::Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?
        .rdev();
    let node = dir.join("kvm-nobody");
    let _ = std::fs::remove_file(&node);
    let c = std::ffi::CString::new(node.to_str().expect("utf-8 path")).expect("no NUL");
    // SAFETY: mknod and chown with a NUL-terminated path.
    unsafe {
        if libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, rdev) != 0
            || libc::chown(c.as_ptr(), 65534, 65534) != 0
        {
            return Err(format!(
                "mknod {}: {}",
                node.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(node)
}

fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..BYTES / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn sha256(data: &[u8]) -> String {
    let p = temp_dir().join(format!("passt-sha-{}", data.len()));
    std::fs::write(&p, data).expect("temp file");
    let h = sha256_hex(&p);
    let _ = std::fs::remove_file(&p);
    h
}

/// One boot as `nobody` behind passt: the guest takes its address by DHCP (with passt's
/// MTU), fetches 4 MiB from a server on the host's loopback through the gateway address,
/// sends 4 MiB back the same way, and serves 4 MiB on a port the host forwards to it.
pub(crate) fn passt_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
    let (ns, tap) = routed_ns()?;
    // The TAP's fd stays with the test (close-on-exec for the VM): it only keeps the link up.
    // SAFETY: F_SETFD on our own open fd.
    unsafe { libc::fcntl(tap, libc::F_SETFD, libc::FD_CLOEXEC) };
    let tmp = temp_dir();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
    }
    let kvm = kvm_node_for_nobody(&tmp)?;
    let from_host = pattern(0x0fed_cba9_8765_4321);
    let from_host_sha = sha256(&from_host);
    // The host's loopback services: one sends, one receives.
    let (sender, receiver) = join(in_netns(&ns.0, || {
        let s = TcpListener::bind("127.0.0.1:8081").map_err(|e| format!("bind: {e}"))?;
        let r = TcpListener::bind("127.0.0.1:8082").map_err(|e| format!("bind: {e}"))?;
        Ok((s, r))
    }))?;
    let serve = std::thread::spawn(move || -> Result<(), String> {
        let (mut c, _) = sender.accept().map_err(|e| e.to_string())?;
        c.write_all(&from_host).map_err(|e| format!("sending: {e}"))
    });
    let collect = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let (mut c, _) = receiver.accept().map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        c.read_to_end(&mut got)
            .map_err(|e| format!("receiving: {e}"))?;
        Ok(got)
    });
    let script = script_disk(
        "passt-script.img",
        r#"
ip link set lo up
ip link set eth0 up
cat > /tmp/dhcp.sh <<'EOF'
#!/bin/sh
[ "$1" = bound ] || exit 0
ifconfig "$interface" "$ip" netmask "$subnet"
[ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
route add default gw "${router%% *}"
echo "$ip,$router,$mtu" > /tmp/lease
EOF
chmod +x /tmp/dhcp.sh
udhcpc -i eth0 -n -q -t 20 -T 2 -O mtu -s /tmp/dhcp.sh >/dev/null 2>&1
echo "NIXVM-TEST: dhcp=$(cat /tmp/lease)"
gw=$(ip route | awk '/^default/ {print $3}')
nc "$gw" 8081 > /tmp/fetched
echo "NIXVM-TEST: fetched=$(wc -c < /tmp/fetched),$(sha256sum /tmp/fetched | cut -d' ' -f1)"
rm /tmp/fetched
dd if=/dev/urandom of=/tmp/out bs=1M count=4 2>/dev/null
echo "NIXVM-TEST: sent_sha256=$(sha256sum /tmp/out | cut -d' ' -f1)"
nc "$gw" 8082 < /tmp/out
rm /tmp/out
mkdir /tmp/www
dd if=/dev/urandom of=/tmp/www/serve bs=1M count=4 2>/dev/null
echo "NIXVM-TEST: serving_sha256=$(sha256sum /tmp/www/serve | cut -d' ' -f1)"
# httpd listens before it returns; it closes each connection after its answer.
httpd -p 8080 -h /tmp/www
echo "NIXVM-TEST: listening"
# Served once the connection on port 8080 (1F90) is in TIME_WAIT (06): the answer went out
# and the host closed its side too.
until grep -qs ':1F90 [0-9A-F]*:[0-9A-F]* 06' /proc/net/tcp /proc/net/tcp6; do sleep 0.2; done
echo "NIXVM-TEST: served=0"
"#,
    );
    let cl = cmdline("script");
    let d = format!("path={},readonly=on", script.display());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(NIXVM)
        .args(g.args(&g.vmlinuz, &cl))
        .args([
            "--memory",
            "512M",
            "--net",
            "passt,forward=18080:8080",
            "--disk",
            &d,
        ])
        .env("NIXVM_KVM_DEVICE", &kvm)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null());
    let mut vm = Streaming::spawn_command(cmd)?;
    let listening = vm.wait_for("NIXVM-TEST: listening");
    // Fetched from a thread: meanwhile this one waits for the guest to finish, saying now
    // and then that it still waits (a long silence would be taken for a frozen L1).
    let fetcher = listening.clone().map(|_| {
        in_netns(&ns.0, move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut s = loop {
                match TcpStream::connect("127.0.0.1:18080") {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!("connect: {e}"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            s.write_all(b"GET /serve HTTP/1.0\r\n\r\n")
                .map_err(|e| format!("asking: {e}"))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .map_err(|e| format!("receiving: {e}"))?;
            let body = got
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| got[i + 4..].to_vec())
                .ok_or_else(|| format!("no HTTP answer in {} bytes", got.len()))?;
            check!(body.len() == BYTES, "{} bytes of {BYTES} came", body.len());
            Ok(body)
        })
    });
    let guest_served = listening.and_then(|_| vm.wait_for("NIXVM-TEST: served="));
    let fetched = fetcher.and_then(join);
    // A guest that froze before powering off (the route's hazard) boots once more, after
    // the clean-up below.
    let status = vm.exit_within(BOOT_TIMEOUT);
    // Servers the guest never reached stop waiting for it.
    let _ = join(in_netns(&ns.0, || {
        let _ = TcpStream::connect("127.0.0.1:8081");
        let _ = TcpStream::connect("127.0.0.1:8082");
        Ok(())
    }));
    let served = serve.join().map_err(|_| "server panicked".to_owned())?;
    let collected = if served.is_ok() {
        collect
            .join()
            .map_err(|_| "collector panicked".to_owned())?
    } else {
        Err("not reached".into())
    };
    let _ = std::fs::remove_file(&kvm);
    // SAFETY: closing the TAP fd we opened, once.
    unsafe { libc::close(tap) };
    drop(ns);
    let status = status?;
    let exited = || {
        check!(
            status.and_then(|s| s.code()) == Some(0),
            "nixvm (as nobody) after the guest powered off: {status:?}\nconsole:\n{}\nstderr (tail):\n{}",
            vm.seen,
            tail(&std::fs::read_to_string(&vm.stderr).unwrap_or_default(), 20)
        );
        Ok(())
    };

    let dhcp = exited().and_then(|()| vm.expect("dhcp", "10.77.0.1,10.77.0.254,65520"));
    let loopback = served
        .and_then(|()| vm.expect("fetched", &format!("{BYTES},{from_host_sha}")))
        .and_then(|()| {
            let got = collected?;
            vm.expect("sent_sha256", &sha256(&got))
        });
    let forwarded = fetched
        .and_then(|got| vm.expect("serving_sha256", &sha256(&got)))
        .and(guest_served.map(drop));
    Ok(vec![dhcp, loopback, forwarded])
}
