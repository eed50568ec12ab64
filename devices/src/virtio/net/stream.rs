//! The stream side of virtio-net: frames over a connected stream socket, each a 32-bit
//! big-endian length followed by the Ethernet frame, without a virtio-net header. It is the
//! protocol of QEMU's `-netdev stream` (and `-net socket`), which passt speaks on its UNIX
//! socket and on an inherited fd (`passt --fd`).
//!
//! A stream has no frame boundaries of its own, so both directions keep what is half done:
//! received bytes until a frame is whole, and the rest of a frame the socket took only part
//! of. That state lives here, not in the device's worker, so that a device reset cannot
//! leave the stream out of step. Offloads are not offered on a stream (there is no header to
//! carry them), so frames are whole and checksummed both ways.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::super::GuestMemoryMmap;
use super::super::buffers::Segment;
use super::{MAX_FRAME, put_frame};

/// Received bytes kept at most: room for a whole largest frame and its length, and for a
/// few small ones more per read.
const IN_CAP: usize = 4 + MAX_FRAME + 64 * 1024;

/// A connected stream socket speaking the length-prefixed frame protocol.
pub struct Stream {
    file: File,
    name: String,
    state: Mutex<State>,
}

struct State {
    /// Received bytes, `inbuf[start..end]` not yet taken.
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes of sent frames the socket has not taken yet, from `out_start`.
    out: Vec<u8>,
    out_start: usize,
}

impl Stream {
    /// Takes a connected stream socket (made non-blocking here); `name` says what it is in
    /// messages (a socket path, or "passt").
    pub fn new(sock: std::os::unix::net::UnixStream, name: &str) -> io::Result<Stream> {
        sock.set_nonblocking(true)?;
        let file = File::from(OwnedFd::from(sock));
        Ok(Stream {
            file,
            name: name.to_owned(),
            state: Mutex::new(State {
                inbuf: vec![0; IN_CAP].into_boxed_slice(),
                start: 0,
                end: 0,
                out: Vec::new(),
                out_start: 0,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Only the device's worker takes it; a panic there leaves nothing half-updated that
        // matters more than the stream itself, which the next read or write checks.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next received frame into `dst` after a zeroed virtio-net header: its length with
    /// the header, as a TAP read gives it. WouldBlock until a whole frame is there;
    /// UnexpectedEof once the peer closed; InvalidData if a length is larger than a frame
    /// can be (the stream is out of step and cannot be read further).
    pub(super) fn recv(&self, mem: &GuestMemoryMmap, segs: &[Segment]) -> io::Result<usize> {
        let mut s = self.state();
        // A whole frame always fits once what is there moves to the front, so two reads
        // take all the peer has sent; the third round only looks.
        for round in 0..3 {
            let have = s.end - s.start;
            if have >= 4 {
                let at = s.start;
                let len = u32::from_be_bytes(s.inbuf[at..at + 4].try_into().expect("4"));
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a frame of {len} bytes is announced (at most {MAX_FRAME})"),
                    ));
                }
                if have >= 4 + len {
                    let n = put_frame(mem, segs, &s.inbuf[at + 4..at + 4 + len]);
                    s.start += 4 + len;
                    return Ok(n);
                }
            }
            if round == 2 {
                break;
            }
            if s.start > 0 {
                let (start, end) = (s.start, s.end);
                s.inbuf.copy_within(start..end, 0);
                s.end -= start;
                s.start = 0;
            }
            let end = s.end;
            match (&self.file).read(&mut s.inbuf[end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => s.end += n,
                Err(e) => return Err(e),
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// Queues one Ethernet frame of `frame_len` bytes, which `fill` writes, for [`flush`]
    /// to send. False if `fill` failed (nothing queued).
    ///
    /// [`flush`]: Stream::flush
    pub(super) fn send(&self, frame_len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        let mut s = self.state();
        let at = s.out.len();
        let len = u32::try_from(frame_len).expect("at most MAX_FRAME");
        s.out.extend_from_slice(&len.to_be_bytes());
        s.out.resize(at + 4 + frame_len, 0);
        if !fill(&mut s.out[at + 4..]) {
            s.out.truncate(at);
            return false;
        }
        true
    }

    /// Sends what is queued. True when nothing is left (more frames may be sent).
    pub(super) fn flush(&self) -> io::Result<bool> {
        let mut s = self.state();
        // Each write takes bytes or stops the loop.
        while s.out_start < s.out.len() {
            match (&self.file).write(&s.out[s.out_start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => s.out_start += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        s.out.clear();
        s.out_start = 0;
        Ok(true)
    }

    /// Whether sent frames are waiting for the socket to take them.
    pub(super) fn backlogged(&self) -> bool {
        let s = self.state();
        s.out_start < s.out.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::HDR_LEN;
    use super::*;
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress};

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::new(a, "test").unwrap(), b)
    }

    fn recv_into(s: &Stream, room: usize) -> io::Result<Vec<u8>> {
        super::super::read_frame(room, |m, segs| s.recv(m, segs))
    }

    fn recv(s: &Stream) -> io::Result<Vec<u8>> {
        recv_into(s, HDR_LEN + MAX_FRAME)
    }

    #[test]
    fn frames_split_anywhere_are_put_together() {
        let (s, mut peer) = pair();
        let f1: Vec<u8> = (0..60).collect();
        let f2 = vec![7u8; 1500];
        let mut bytes = Vec::new();
        for f in [&f1, &f2] {
            bytes.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
            bytes.extend_from_slice(f);
        }
        // The first frame's length in two pieces, the rest in one.
        peer.write_all(&bytes[..2]).unwrap();
        assert_eq!(recv(&s).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        peer.write_all(&bytes[2..]).unwrap();
        let got = recv(&s).unwrap();
        assert_eq!(&got[..HDR_LEN], &[0; HDR_LEN]);
        assert_eq!(&got[HDR_LEN..], &f1[..]);
        assert_eq!(&recv(&s).unwrap()[HDR_LEN..], &f2[..]);
        assert_eq!(recv(&s).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(peer);
        assert_eq!(recv(&s).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn oversized_length_is_an_error() {
        let (s, mut peer) = pair();
        peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert_eq!(recv(&s).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_frame_larger_than_the_buffers_is_passed_over() {
        let (s, mut peer) = pair();
        for f in [vec![1u8; 100], vec![2u8; 50]] {
            peer.write_all(&u32::try_from(f.len()).unwrap().to_be_bytes())
                .unwrap();
            peer.write_all(&f).unwrap();
        }
        let m = crate::virtio::test_utils::memory(1 << 20);
        let n = s.recv(&m, &[(GuestAddress(0), HDR_LEN + 60)]).unwrap();
        assert_eq!(n, HDR_LEN + 100, "its length, beyond the room");
        let mut untouched = [0xffu8; 16];
        m.read_slice(&mut untouched, GuestAddress(0)).unwrap();
        assert_eq!(untouched, [0; 16], "nothing written");
        assert_eq!(recv(&s).unwrap()[HDR_LEN..], [2u8; 50], "the next frame");
    }

    #[test]
    fn largest_frames_in_a_row() {
        let (s, mut peer) = pair();
        let writer = std::thread::spawn(move || {
            for i in 0..4u8 {
                peer.write_all(&u32::try_from(MAX_FRAME).unwrap().to_be_bytes())
                    .unwrap();
                peer.write_all(&vec![i; MAX_FRAME]).unwrap();
            }
        });
        let mut got = 0u8;
        while got < 4 {
            match recv(&s) {
                Ok(dst) => {
                    assert_eq!(dst.len(), HDR_LEN + MAX_FRAME);
                    assert!(dst[HDR_LEN..].iter().all(|&b| b == got));
                    got += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
        writer.join().unwrap();
    }

    #[test]
    fn a_full_socket_keeps_the_rest_for_later() {
        let (s, mut peer) = pair();
        let frame = vec![5u8; 60_000];
        let mut sent = 0;
        while !s.backlogged() {
            assert!(s.send(frame.len(), |b| {
                b.copy_from_slice(&frame);
                true
            }));
            s.flush().unwrap();
            sent += 1;
            assert!(sent < 1000, "the socket never filled");
        }
        assert!(!s.flush().unwrap());
        // Read everything: each frame arrives whole and in order.
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4 + 60_000];
            for _ in 0..sent {
                peer.read_exact(&mut buf).unwrap();
                assert_eq!(buf[..4], 60_000u32.to_be_bytes());
                assert!(buf[4..].iter().all(|&b| b == 5));
            }
        });
        while !s.flush().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        reader.join().unwrap();
        assert!(!s.backlogged());
    }
}
