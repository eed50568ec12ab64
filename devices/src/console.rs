//! Where a console's output goes (the serial port's and virtio-console's alike): stdout, a
//! file, a UNIX socket that one client at a time attaches to (with the last 64 KiB kept for
//! late comers), or a socket nixvm connected to.
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::lock;

/// How much console output a socket console keeps for a client that attaches later.
pub const RING_SIZE: usize = 64 * 1024;

/// The guest's console output, kept for and sent to the attached socket client.
#[derive(Default)]
pub struct SocketConsole {
    ring: VecDeque<u8>,
    client: Option<UnixStream>,
}

impl SocketConsole {
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
            self.client = Some(c);
        }
        Ok(())
    }

    pub fn detach(&mut self) -> Option<UnixStream> {
        self.client.take()
    }

    pub fn has_client(&self) -> bool {
        self.client.is_some()
    }

    fn push(&mut self, bytes: &[u8]) {
        let overflow = (self.ring.len() + bytes.len()).saturating_sub(RING_SIZE);
        self.ring.drain(..overflow.min(self.ring.len()));
        self.ring
            .extend(&bytes[bytes.len().saturating_sub(RING_SIZE)..]);
        if let Some(c) = self.client.as_mut() {
            if send(c, bytes).is_err() {
                self.client = None;
            }
        }
    }

    #[cfg(test)]
    fn kept(&self) -> Vec<u8> {
        self.ring.iter().copied().collect()
    }
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
    /// The descriptor to poll for room when a write would block: only a stream's can.
    pub fn poll_fd(&self) -> Option<RawFd> {
        match self {
            ConsoleOut::Stream(s) => Some(s.as_raw_fd()),
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
                lock(s).push(buf);
                Ok(buf.len())
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
}
