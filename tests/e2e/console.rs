//! The serial console: a terminal on stdio, and a socket to attach to.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Opens a pseudo-terminal; returns (master, slave) as files.
pub(crate) fn open_pty() -> Result<(std::fs::File, std::fs::File), String> {
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

pub(crate) fn lflag(f: &std::fs::File) -> libc::tcflag_t {
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
pub(crate) fn stdio_terminal(g: &Guest) -> TestResult {
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
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT)?;
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
pub(crate) fn socket_guest(
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
pub(crate) fn connect_console(sock: &Path) -> Result<BufReader<UnixStream>, String> {
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
pub(crate) fn serial_socket(g: &Guest) -> TestResult {
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

pub(crate) const HVC_NAMES: [&str; 2] =
    ["hvc0_connect_both_ways", "hvc0_4m_slow_reader_nothing_lost"];

/// Bytes the guest sends through hvc0 while the host does not read.
const HVC_BIG: usize = 4 << 20;

/// `--console connect=PATH` (what a test driver does): nixvm connects to the socket the test
/// listens on; a line goes each way on the guest's /dev/hvc0, then the guest writes 4 MiB
/// while the test does not read for a while: the guest must wait, not lose bytes.
pub(crate) fn hvc_boot(g: &Guest) -> Result<Vec<TestResult>, String> {
    let sock = temp_dir().join("hvc.sock");
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).map_err(|e| e.to_string())?;
    let script = script_disk(
        "hvc-script.img",
        &format!(
            r#"
echo "NIXVM-TEST: hvc=$(ls /dev/hvc0 2>&1)"
exec 3<>/dev/hvc0
stty raw -echo <&3
echo "hvc-hello-from-guest" >&3
read -r line <&3
echo "NIXVM-TEST: hvc_got=$line"
head -c {HVC_BIG} /dev/urandom > /tmp/big
echo "NIXVM-TEST: big_sha=$(sha256sum < /tmp/big | cut -d' ' -f1)"
cat /tmp/big >&3
echo "NIXVM-TEST: big_sent"
exec 3>&-
"#
        ),
    );
    let cl = cmdline("script");
    let con = format!("connect={}", sock.display());
    let d = format!("path={},readonly=on", script.display());
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend(["--console", &con, "--disk", &d]);
    let mut vm = Streaming::spawn(&args)?;
    let conn = accept_within(&l, Duration::from_secs(60))?;
    conn.set_read_timeout(Some(BOOT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut hvc = BufReader::new(conn);
    let both_ways = (|| {
        let mut line = String::new();
        hvc.read_line(&mut line).map_err(|e| format!("hvc0: {e}"))?;
        check!(
            line == "hvc-hello-from-guest\n",
            "first line on hvc0: {line:?}"
        );
        hvc.get_mut()
            .write_all(b"host-says-hi\n")
            .map_err(|e| e.to_string())?;
        vm.wait_for("NIXVM-TEST: hvc_got=")?;
        vm.expect("hvc_got", "host-says-hi")
    })();
    let slow = (|| {
        both_ways.clone()?;
        vm.wait_for("NIXVM-TEST: big_sha=")?;
        // Not reading: far more than the socket's buffers waits in the guest.
        std::thread::sleep(Duration::from_secs(3));
        check!(
            !vm.seen.contains("big_sent"),
            "the guest finished writing 4 MiB that nobody read"
        );
        let mut big = vec![0u8; HVC_BIG];
        hvc.read_exact(&mut big)
            .map_err(|e| format!("reading 4 MiB from hvc0: {e}"))?;
        vm.wait_for("NIXVM-TEST: big_sent")?;
        vm.expect("big_sha", &sha256_bytes(&big))
    })();
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT)?;
    // A boot that stalled or reset is retried as a whole.
    if let Err(e) = both_ways.as_ref().and(slow.as_ref()) {
        if e.contains(STALLED) {
            return Err(e.clone());
        }
    }
    Ok(vec![
        both_ways.and_then(|()| {
            check!(
                status.and_then(|s| s.code()) == Some(0),
                "nixvm ended with {status:?}"
            );
            Ok(())
        }),
        slow,
    ])
}

/// `--console socket=PATH`: what the guest wrote on hvc0 before anyone attached is replayed
/// to the client that attaches; its input reaches the guest. With `console=hvc0` on the
/// command line, the kernel's messages go there too once the driver is loaded. Then 4 MiB
/// that the attached client does not read for a while arrive whole: the guest waits.
pub(crate) fn hvc_socket(g: &Guest) -> TestResult {
    let sock = temp_dir().join("hvc-listen.sock");
    let script = script_disk(
        "hvc-socket-script.img",
        &format!(
            r#"
exec 3<>/dev/hvc0
stty raw -echo <&3
echo "hvc-early-line" >&3
echo "<2>nixvm-kmsg-on-hvc0" > /dev/kmsg
echo "NIXVM-TEST: early_written"
read -r line <&3
echo "NIXVM-TEST: hvc_got=$line"
echo "reply:$line" >&3
dmesg -n 1
head -c {HVC_BIG} /dev/urandom > /tmp/big
echo "NIXVM-TEST: big_sha=$(sha256sum < /tmp/big | cut -d' ' -f1)"
echo "big-begin" >&3
cat /tmp/big >&3
echo "NIXVM-TEST: big_sent"
sleep 1
"#
        ),
    );
    let cl = format!("{} console=hvc0", cmdline("script"));
    let con = format!("socket={}", sock.display());
    let d = format!("path={},readonly=on", script.display());
    let mut args = g.args(&g.vmlinuz, &cl);
    args.extend(["--console", &con, "--disk", &d]);
    let mut vm = Streaming::spawn(&args)?;
    let result = (|| {
        vm.wait_for("NIXVM-TEST: early_written")?;
        let mut c = connect_console(&sock)?;
        let replay = read_until(&mut c, "nixvm-kmsg-on-hvc0", Duration::from_secs(30))?;
        check!(
            replay.contains("hvc-early-line"),
            "no replay of the guest's early hvc0 output:\n{replay}"
        );
        c.get_mut()
            .write_all(b"from-socket\n")
            .map_err(|e| e.to_string())?;
        read_until(&mut c, "reply:from-socket", Duration::from_secs(60))?;
        vm.wait_for("NIXVM-TEST: hvc_got=")?;
        vm.expect("hvc_got", "from-socket")?;
        // An attached client that does not read for a while: the guest waits, and the
        // client gets every byte.
        vm.wait_for("NIXVM-TEST: big_sha=")?;
        read_until(&mut c, "big-begin", Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_secs(3));
        check!(
            !vm.seen.contains("big_sent"),
            "the guest finished writing 4 MiB that the attached client did not read"
        );
        c.get_ref()
            .set_read_timeout(Some(BOOT_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut big = vec![0u8; HVC_BIG];
        if let Err(e) = c.read_exact(&mut big) {
            // The socket closes early when nixvm ends: say how (a guest that reset by
            // itself is the route's hazard, retried).
            return Err(format!(
                "reading 4 MiB from the console socket: {e}; {}; {}",
                vm.ending(),
                vm.console()
            ));
        }
        vm.wait_for("NIXVM-TEST: big_sent")?;
        vm.expect("big_sha", &sha256_bytes(&big))
    })();
    // A guest that froze before powering off (the route's hazard) boots once more.
    let status = vm.exit_within(BOOT_TIMEOUT)?;
    result?;
    check!(
        status.and_then(|s| s.code()) == Some(0),
        "nixvm ended with {status:?}"
    );
    check!(!sock.exists(), "socket file left behind");
    Ok(())
}
