//! Where a console's output goes (the serial port's and virtio-console's alike): stdout, a
//! file, a UNIX socket that one client at a time attaches to (with the last 64 KiB kept for
//! late comers), or a socket nixvm connected to.
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::lock;

/// How much console output a socket console keeps for a client that attaches later.
pub const RING_SIZE: usize = 64 * 1024;

/// The guest's console output, kept for and sent to the attached socket client.
#[derive(Default)]
pub struct SocketConsole {
    ring: VecDeque<u8>,
    client: Option<UnixStream>,
    /// Set for a writer that can wait for a slow client (virtio-console's worker; the UART's
    /// vCPU cannot): see [`SocketConsole::offer`].
    waiter: Option<Waiter>,
}

/// What a waiting writer polls: an epoll set that is readable when the attached client's
/// socket has room, or when the client went away (`gone`).
struct Waiter {
    epoll: Epoll,
    gone: EventFd,
}

impl SocketConsole {
    /// Makes the console lossless for its writer, which then polls [`Self::poll_fd`] when
    /// [`Self::offer`] says the client is full.
    pub fn wait_for_client(&mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let gone = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            gone.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        if let Some(c) = &self.client {
            watch(&epoll, c)?;
        }
        self.waiter = Some(Waiter { epoll, gone });
        Ok(())
    }

    /// What a waiting writer polls (for POLLIN) while the client is full.
    pub fn poll_fd(&self) -> Option<RawFd> {
        self.waiter.as_ref().map(|w| w.epoll.as_raw_fd())
    }

    /// Attaches a client (non-blocking from here on) and replays the kept output to it.
    /// Fails if a client is attached already.
    pub fn attach(&mut self, client: UnixStream) -> Result<(), UnixStream> {
        if self.client.is_some() {
            return Err(client);
        }
        client.set_nonblocking(true).ok();
        let (a, b) = self.ring.as_slices();
        let mut c = client;
        if send(&mut c, a).and_then(|()| send(&mut c, b)).is_ok() {
            if let Some(w) = &self.waiter {
                if let Err(e) = watch(&w.epoll, &c) {
                    log::warn!("console: cannot watch the client: {e}");
                }
            }
            self.client = Some(c);
        }
        Ok(())
    }

    pub fn detach(&mut self) -> Option<UnixStream> {
        let c = self.client.take()?;
        if let Some(w) = &self.waiter {
            // The controller holds a clone of the stream: closing ours would not take it
            // out of the epoll set.
            let _ = w.epoll.ctl(
                ControlOperation::Delete,
                c.as_raw_fd(),
                EpollEvent::default(),
            );
            let _ = w.gone.write(1);
        }
        Some(c)
    }

    pub fn has_client(&self) -> bool {
        self.client.is_some()
    }

    /// Keeps `bytes` for clients that attach later.
    fn record(&mut self, bytes: &[u8]) {
        let overflow = (self.ring.len() + bytes.len()).saturating_sub(RING_SIZE);
        self.ring.drain(..overflow.min(self.ring.len()));
        self.ring
            .extend(&bytes[bytes.len().saturating_sub(RING_SIZE)..]);
    }

    /// For the UART: sends what the client takes now, drops the rest for it.
    fn push(&mut self, bytes: &[u8]) {
        self.record(bytes);
        if let Some(c) = self.client.as_mut() {
            if send(c, bytes).is_err() {
                self.detach();
            }
        }
    }

    /// For a waiting writer: sends what the attached client's socket takes now and keeps
    /// that; returns how much (all of it, kept, when no client is attached, or the client
    /// went away). WouldBlock when the client can take nothing now.
    fn offer(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if let Some(w) = &self.waiter {
            let _ = w.gone.read();
        }
        let taken = match self.client.as_mut().map(|c| c.write(bytes)) {
            None => bytes.len(),
            Some(Ok(n)) => n,
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
            Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Some(Err(_)) => {
                self.detach();
                bytes.len()
            }
        };
        self.record(&bytes[..taken]);
        Ok(taken)
    }

    #[cfg(test)]
    fn kept(&self) -> Vec<u8> {
        self.ring.iter().copied().collect()
    }
}

/// Adds a client's socket to a waiter's epoll set, for room to write.
fn watch(epoll: &Epoll, c: &UnixStream) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        c.as_raw_fd(),
        EpollEvent::new(EventSet::OUT, 0),
    )
}

/// Sends without blocking the vCPU: what the client's socket buffer cannot take is dropped
/// (it stays in the ring). Errors other than a full buffer mean the client is gone.
fn send(c: &mut UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match c.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                log::debug!(
                    "serial: console client is slow, dropped {} bytes",
                    bytes.len()
                );
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a console's output goes.
pub enum ConsoleOut {
    Stdout(io::Stdout),
    File(File),
    Socket(Arc<Mutex<SocketConsole>>),
    /// A socket nixvm connected to (`connect=PATH`): nothing is dropped. The serial port
    /// writes to it blocking (the vCPU waits for the reader); virtio-console sets it
    /// non-blocking and waits for [`ConsoleOut::poll_fd`] to take more.
    Stream(UnixStream),
    Off,
}

impl ConsoleOut {
    /// The descriptor to poll, and for which events, for room when a write would block: a
    /// stream's, or a waiting socket console's.
    pub fn poll_fd(&self) -> Option<(RawFd, i16)> {
        match self {
            ConsoleOut::Stream(s) => Some((s.as_raw_fd(), libc::POLLOUT)),
            ConsoleOut::Socket(s) => lock(s).poll_fd().map(|fd| (fd, libc::POLLIN)),
            _ => None,
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOut::Stdout(s) => s.write(buf),
            ConsoleOut::File(f) => f.write(buf),
            ConsoleOut::Socket(s) => {
                let mut s = lock(s);
                if s.waiter.is_some() {
                    s.offer(buf)
                } else {
                    s.push(buf);
                    Ok(buf.len())
                }
            }
            ConsoleOut::Stream(s) => s.write(buf),
            ConsoleOut::Off => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOut::Stdout(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_64k() {
        let mut c = SocketConsole::default();
        c.push(&vec![b'a'; RING_SIZE]);
        c.push(b"bc");
        let kept = c.kept();
        assert_eq!(kept.len(), RING_SIZE);
        assert_eq!(&kept[RING_SIZE - 3..], b"abc");
        c.push(&vec![b'z'; RING_SIZE + 10]);
        assert_eq!(c.kept(), vec![b'z'; RING_SIZE]);
    }

    /// Whether `fd` is readable now.
    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn a_waiting_writer_loses_nothing_for_a_slow_client() {
        use std::io::Read;
        let mut c = SocketConsole::default();
        c.wait_for_client().unwrap();
        let fd = c.poll_fd().unwrap();
        // No client: everything is kept, nothing to wait for.
        assert_eq!(c.offer(b"early").unwrap(), 5);
        let (ours, mut peer) = UnixStream::pair().unwrap();
        c.attach(ours).unwrap();
        let mut replay = [0u8; 5];
        peer.read_exact(&mut replay).unwrap();
        assert_eq!(&replay, b"early");
        // Fill the client's socket: the writer is told to wait, and nothing is kept that
        // the client did not get.
        let chunk = vec![b'x'; 4096];
        let mut sent = 0;
        loop {
            match c.offer(&chunk) {
                Ok(n) => sent += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        assert!(!readable(fd), "the waiter fired while the client is full");
        let mut got = vec![0u8; sent];
        peer.read_exact(&mut got).unwrap();
        assert!(readable(fd), "room again, and the waiter did not say so");
        // The client goes away: the waiter says so, and output is kept again.
        c.detach();
        assert!(readable(fd));
        assert_eq!(c.offer(b"later").unwrap(), 5);
        assert!(!readable(fd), "the departure was not taken");
        assert!(c.kept().ends_with(b"later"));
    }
}
