//! The VDE side of virtio-net: a port on a `vde_switch` (Virtual Distributed Ethernet), what
//! the NixOS test driver starts per vlan and QEMU joins with `-netdev vde,sock=DIR`.
//!
//! The switch listens on `DIR/ctl` (a stream socket). A client binds a datagram socket of its
//! own, sends the switch a request naming it (magic, version 3, "new control", the socket's
//! address, a description), and reads back the address of the switch's datagram socket for
//! that port. From then on every datagram is one Ethernet frame, without a virtio-net header,
//! so no offloads are offered. The port lives as long as the control connection. No root and
//! no TAP: it works inside a build sandbox.
//!
//! A switch whose queue is full (a UNIX datagram socket takes a few frames at a time) holds the
//! guest's transmit queue back until it has room, as QEMU's blocking send does, instead of
//! dropping the frame.
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::super::GuestMemoryMmap;
use super::super::buffers::{GuestIovecs, Segment, scatter, split};
use super::HDR_LEN;

const SWITCH_MAGIC: u32 = 0xfeed_face;
const VERSION: u32 = 3;
const REQ_NEW_CONTROL: u32 = 0;
/// `struct sockaddr_un`: the family and 108 bytes of path.
const SUN_PATH: usize = 108;
const SOCKADDR_UN: usize = 2 + SUN_PATH;
/// How long the switch may take to answer the request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A port on a VDE switch.
pub struct Vde {
    data: UnixDatagram,
    /// Held open: the switch closes the port when it closes.
    _ctl: UnixStream,
    name: String,
    /// A frame the switch had no room for yet; nothing else is sent before it.
    held: Mutex<Vec<u8>>,
}

impl Vde {
    /// Joins the switch whose directory is `dir` (as `vde_switch -s DIR` made it).
    pub fn connect(dir: &Path) -> io::Result<Vde> {
        let mut ctl = UnixStream::connect(dir.join("ctl"))?;
        let (data, local) = bind_data_socket(dir)?;
        let answer = handshake(&mut ctl, &local);
        // The switch has connected to it (or failed): the name is not needed any more.
        let _ = std::fs::remove_file(&local);
        data.connect(answer?)?;
        data.set_nonblocking(true)?;
        Ok(Vde {
            data,
            _ctl: ctl,
            name: format!("vde:{}", dir.display()),
            held: Mutex::new(Vec::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    fn held(&self) -> MutexGuard<'_, Vec<u8>> {
        // Only the device's worker takes it.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one frame of `frame_len` bytes, which `fill` writes, for [`Vde::flush`] to send.
    /// False if `fill` failed, or a frame is still held (the queue is not served then).
    pub(super) fn send(&self, frame_len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        let mut held = self.held();
        if !held.is_empty() {
            return false;
        }
        held.resize(frame_len, 0);
        if !fill(&mut held) {
            held.clear();
            return false;
        }
        true
    }

    /// Sends the held frame: true when none is left, false while the switch has no room.
    pub(super) fn flush(&self) -> io::Result<bool> {
        let mut held = self.held();
        while !held.is_empty() {
            match self.data.send(&held) {
                Ok(_) => held.clear(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    held.clear();
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    /// Whether a frame waits for the switch to have room.
    pub(super) fn backlogged(&self) -> bool {
        !self.held().is_empty()
    }

    /// One frame into the guest buffers `segs` after a zeroed virtio-net header: its length
    /// with the header, as a TAP read gives it (more than `segs` hold: cut short);
    /// WouldBlock when none waits.
    pub(super) fn recv(&self, mem: &GuestMemoryMmap, segs: &[Segment]) -> io::Result<usize> {
        let (hdr, data) = split(segs, HDR_LEN).ok_or(io::ErrorKind::InvalidInput)?;
        let n = GuestIovecs::new(mem, &data)?.recv_datagram(self.data.as_raw_fd())?;
        scatter(mem, &hdr, &[0; HDR_LEN]);
        Ok(HDR_LEN + n)
    }
}

/// A datagram socket bound in the switch's directory (where the switch can reach it), else
/// in the temporary directory: the socket and its path.
fn bind_data_socket(dir: &Path) -> io::Result<(UnixDatagram, PathBuf)> {
    let pid = std::process::id();
    let mut last = io::Error::from(io::ErrorKind::AddrInUse);
    for base in [dir.to_path_buf(), std::env::temp_dir()] {
        for n in 0..64 {
            let path = base.join(format!(".nixvm-{pid}-{n}"));
            match UnixDatagram::bind(&path) {
                Ok(s) => return Ok((s, path)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
    }
    Err(last)
}

/// Asks the switch for a port reaching `local`; returns the path of the switch's end.
fn handshake(ctl: &mut UnixStream, local: &Path) -> io::Result<PathBuf> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let path = local.as_os_str().as_bytes();
    if path.len() >= SUN_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the switch's directory has too long a path for a socket address",
        ));
    }
    let mut req = Vec::with_capacity(12 + SOCKADDR_UN + 16);
    req.extend_from_slice(&SWITCH_MAGIC.to_ne_bytes());
    req.extend_from_slice(&VERSION.to_ne_bytes());
    req.extend_from_slice(&REQ_NEW_CONTROL.to_ne_bytes());
    let family = u16::try_from(libc::AF_UNIX).expect("1");
    req.extend_from_slice(&family.to_ne_bytes());
    let mut sun_path = [0u8; SUN_PATH];
    sun_path[..path.len()].copy_from_slice(path);
    req.extend_from_slice(&sun_path);
    req.extend_from_slice(format!("nixvm PID={}", std::process::id()).as_bytes());
    ctl.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    ctl.write_all(&req)?;
    let mut answer = [0u8; SOCKADDR_UN];
    ctl.read_exact(&mut answer).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "the switch closed the connection (no free port?)",
        ),
        _ => e,
    })?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the switch's answer is not a path",
        )
    };
    if u16::from_ne_bytes([answer[0], answer[1]]) != family {
        return Err(bad());
    }
    let sun = &answer[2..];
    let len = sun.iter().position(|&b| b == 0).unwrap_or(sun.len());
    if len == 0 {
        return Err(bad());
    }
    ctl.set_read_timeout(None)?;
    Ok(PathBuf::from(std::ffi::OsString::from_vec(
        sun[..len].to_vec(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use vm_memory::GuestAddress;

    fn recv_into(v: &Vde, room: usize) -> io::Result<Vec<u8>> {
        super::super::read_frame(room, |m, segs| v.recv(m, segs))
    }

    /// A switch's side of the handshake, as vde_switch answers it, then one frame each way.
    #[test]
    fn joins_a_switch_and_moves_frames_both_ways() {
        let dir = crate::test_utils::scratch_dir("vde-join");
        let l = UnixListener::bind(dir.join("ctl")).unwrap();
        let port = dir.join("001");
        let switch_data = UnixDatagram::bind(&port).unwrap();
        let switch = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 12 + SOCKADDR_UN];
            c.read_exact(&mut req).unwrap();
            assert_eq!(
                u32::from_ne_bytes(req[0..4].try_into().unwrap()),
                SWITCH_MAGIC
            );
            assert_eq!(u32::from_ne_bytes(req[4..8].try_into().unwrap()), VERSION);
            let sun = &req[14..];
            let len = sun.iter().position(|&b| b == 0).unwrap();
            let client = PathBuf::from(std::str::from_utf8(&sun[..len]).unwrap());
            switch_data.connect(&client).unwrap();
            let mut answer = [0u8; SOCKADDR_UN];
            answer[..2].copy_from_slice(&req[12..14]);
            let p = port.to_str().unwrap().as_bytes();
            answer[2..2 + p.len()].copy_from_slice(p);
            c.write_all(&answer).unwrap();
            (c, switch_data)
        });
        let vde = Vde::connect(&dir).unwrap();
        let (_ctl, switch_data) = switch.join().unwrap();
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 2,
            "the client's socket name was left behind"
        );
        switch_data.send(b"frame-to-guest").unwrap();
        let got = recv_into(&vde, 64).unwrap();
        assert_eq!(&got[..HDR_LEN], &[0; HDR_LEN]);
        assert_eq!(&got[HDR_LEN..], b"frame-to-guest");
        assert_eq!(
            recv_into(&vde, 64).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A datagram longer than the buffers: its whole length, and only what fits.
        switch_data.send(b"a longer frame to the guest").unwrap();
        let m = crate::virtio::test_utils::memory(1 << 20);
        let n = vde.recv(&m, &[(GuestAddress(0), HDR_LEN + 8)]).unwrap();
        assert_eq!(n, HDR_LEN + 27);
        let mut buf = [0xffu8; 64];
        vde.data.send(b"frame-from-guest").unwrap();
        let n = switch_data.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"frame-from-guest");
        // A switch that does not keep up: the frame is held, not dropped, until it has room.
        let mut sent = 0;
        loop {
            assert!(vde.send(3, |b| {
                b.copy_from_slice(b"abc");
                true
            }));
            if !vde.flush().unwrap() {
                break;
            }
            sent += 1;
            assert!(sent < 100_000, "the switch's queue never filled");
        }
        assert!(vde.backlogged());
        assert!(
            !vde.send(3, |_| true),
            "a second frame taken while one is held"
        );
        for _ in 0..=sent {
            assert_eq!(switch_data.recv(&mut buf).unwrap(), 3);
            if vde.flush().unwrap() {
                break;
            }
        }
        assert!(!vde.backlogged());
    }

    /// Two ports on a real vde_switch (Debian's vde2) reach each other.
    #[test]
    fn two_ports_on_a_real_vde_switch() {
        use std::process::{Command, Stdio};
        let dir = crate::test_utils::scratch_dir("vde-real");
        let sw = dir.join("switch");
        let child = Command::new("vde_switch")
            .arg("-s")
            .arg(&sw)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            assert!(std::env::var_os("CI").is_none(), "CI has no vde_switch");
            eprintln!("skipped: no vde_switch (apt install vde2)");
            return;
        };
        for _ in 0..600 {
            if sw.join("ctl").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let a = Vde::connect(&sw).unwrap();
        let b = Vde::connect(&sw).unwrap();
        // Broadcast first (the switch learns a's MAC), then unicast back to it.
        let mut frame = vec![0xffu8; 6];
        frame.extend([2, 0, 0, 0, 0, 0xa]);
        frame.extend([0x88, 0xb5]);
        frame.extend(b"hello over vde");
        let got = |v: &Vde| {
            for _ in 0..500 {
                match recv_into(v, 2048) {
                    Ok(got) => return got,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("no frame came");
        };
        a.data.send(&frame).unwrap();
        assert_eq!(&got(&b)[HDR_LEN..], &frame[..]);
        let mut back = frame[6..12].to_vec();
        back.extend([2, 0, 0, 0, 0, 0xb, 0x88, 0xb5]);
        back.extend(b"and back");
        b.data.send(&back).unwrap();
        assert_eq!(&got(&a)[HDR_LEN..], &back[..]);
        // A full-sized frame (1500 bytes of payload), as TCP sends them.
        let mut big = back[..14].to_vec();
        big.extend((0..1500u32).map(|i| i as u8));
        b.data.send(&big).unwrap();
        assert_eq!(&got(&a)[HDR_LEN..], &big[..]);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_switch_that_hangs_up_is_an_error() {
        let dir = crate::test_utils::scratch_dir("vde-hangup");
        let l = UnixListener::bind(dir.join("ctl")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 12];
            c.read_exact(&mut req).unwrap();
        });
        let e = Vde::connect(&dir).err().expect("no port");
        t.join().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(Vde::connect(&dir.join("nothing")).is_err());
    }
}
