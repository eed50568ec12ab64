//! virtio-vsock with UNIX sockets on the host side (`--vsock cid=N,socket=PATH`), against a
//! busybox guest with a small static AF_VSOCK tool (`resources/vsock-io.c`).
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;

pub(crate) const VSOCK_NAMES: [&str; 4] = [
    "vsock_guest_to_host_64m",
    "vsock_host_to_guest_64m",
    "vsock_16_connections_at_once",
    "vsock_nothing_left_behind",
];

/// Bytes each way (NIXVM_E2E_VSOCK_BYTES: less, when debugging).
pub(crate) fn big() -> usize {
    std::env::var("NIXVM_E2E_VSOCK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20)
}

/// Reads a connection to its end, answers with the sha256 of what came, closes.
fn answer_sha(mut s: UnixStream) -> std::io::Result<()> {
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    s.write_all(format!("{}\n", sha256_bytes(&all)).as_bytes())
}

/// Host → guest as a host program does it: connects to the vsock device's socket `sock`,
/// asks for guest `port` (`CONNECT <port>`, answered `OK …`), sends `data`, ends its side
/// and reads until the guest closes.
pub(crate) fn send_to_guest_port(sock: &Path, port: u32, data: &[u8]) -> Result<(), String> {
    let mut c = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    c.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&c)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    check!(
        line.starts_with("OK "),
        "answer to CONNECT {port}: {line:?}"
    );
    c.write_all(data).map_err(|e| e.to_string())?;
    c.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).map_err(|e| e.to_string())?;
    Ok(())
}

/// Serves every connection to `path` with [`answer_sha`], each in its own thread.
pub(crate) fn sha_server(path: &Path) -> Result<(), String> {
    let l = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || answer_sha(s));
        }
    });
    Ok(())
}

/// nixvm's open sockets.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

pub(crate) fn vsock_boot(g: &Guest, tool: &Path) -> Result<Vec<TestResult>, String> {
    let dir: PathBuf = temp_dir().join("vsock");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("v.sock");
    sha_server(&dir.join("v.sock_6000"))?;
    sha_server(&dir.join("v.sock_6001"))?;
    let (exe, copy_exe) = exe_disk(tool, "vda")?;
    let big = big();
    let script = script_disk(
        "vsock-script.img",
        &format!(
            r#"
{copy_exe}
head -c {big} /dev/urandom > /tmp/up
echo "NIXVM-TEST: up_sha=$(sha256sum < /tmp/up | cut -d' ' -f1)"
echo "NIXVM-TEST: up_reply=$(/tmp/vsock-io connect 2 6000 < /tmp/up)"
rm /tmp/up
head -c 1048576 /dev/urandom > /tmp/small
echo "NIXVM-TEST: small_sha=$(sha256sum < /tmp/small | cut -d' ' -f1)"
i=0
while [ $i -lt 16 ]; do /tmp/vsock-io connect 2 6001 < /tmp/small > /tmp/r$i & i=$((i + 1)); done
wait
echo "NIXVM-TEST: many=$(cat /tmp/r* | sort | uniq -c | awk '{{printf "%s:%s;", $1, $2}}')"
/tmp/vsock-io listen 7000 < /dev/null > /tmp/down &
sleep 2
echo "NIXVM-TEST: listening"
wait
echo "NIXVM-TEST: down_sha=$(sha256sum < /tmp/down | cut -d' ' -f1)"
echo "NIXVM-TEST: done"
sleep 5
"#
        ),
    );
    let cl = cmdline("script");
    let d1 = format!("path={},readonly=on", exe.display());
    let d2 = format!("path={},readonly=on", script.display());
    let v = format!("cid=5,socket={}", sock.display());
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend([
        "--memory", "512M", "--vsock", &v, "--disk", &d1, "--disk", &d2,
    ]);
    let mut vm = Streaming::spawn(&args)?;
    let pid = vm.child.id();
    vm.wait_for("NIXVM-TEST: up_sha=")?;
    // The device is up and has no connection yet.
    let sockets_before = sockets_of(pid);
    vm.wait_for("NIXVM-TEST: listening")?;
    // Host → guest: CONNECT, OK, 64 MiB, and the end of it.
    let down: Vec<u8> = (0..big)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 256).unwrap())
        .collect();
    let down_sha = sha256_bytes(&down);
    let host_to_guest = send_to_guest_port(&sock, 7000, &down);
    vm.wait_for("NIXVM-TEST: done")?;
    // The guest's sockets are closed: nixvm holds no more than before (poll: the last
    // RSTs may still be on their way).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sockets_after = sockets_of(pid);
    while sockets_after != sockets_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        sockets_after = sockets_of(pid);
    }
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT)?;
    let up_sha = vm.marker("up_sha").unwrap_or_default();
    let small_sha = vm.marker("small_sha").unwrap_or_default();
    Ok(vec![
        vm.expect("up_reply", &up_sha).and_then(|()| {
            check!(up_sha.len() == 64, "the guest's sha256: {up_sha:?}");
            Ok(())
        }),
        host_to_guest.and_then(|()| vm.expect("down_sha", &down_sha)),
        vm.expect("many", &format!("16:{small_sha};")),
        (|| {
            check!(
                sockets_after == sockets_before,
                "nixvm had {sockets_before} sockets open before the connections and \
                 {sockets_after} after they closed"
            );
            check!(
                status.and_then(|s| s.code()) == Some(0),
                "nixvm at power-off: {status:?}"
            );
            check!(!sock.exists(), "{} left behind", sock.display());
            Ok(())
        })(),
    ])
}
