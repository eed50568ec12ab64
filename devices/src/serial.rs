//! The 16550A UART on COM1 (vm-superio) and where its output goes: stdout, a file, or a UNIX
//! socket that one client at a time attaches to, with the last 64 KiB kept for late comers.
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::lock;

/// How much console output a socket console keeps for a client that attaches later.
pub const RING_SIZE: usize = 64 * 1024;

/// Raises the UART's interrupt line by signalling an eventfd (a KVM irqfd).
pub struct SerialIrq(pub EventFd);

impl Trigger for SerialIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals `evt` when the guest has drained the input FIFO, so input can flow again.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal drained input: {e}");
        }
    }
}

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

/// Where the UART's output goes.
pub enum ConsoleOut {
    Stdout(io::Stdout),
    File(File),
    Socket(Arc<Mutex<SocketConsole>>),
    Off,
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

/// COM1 on the port-I/O bus.
pub struct SerialDevice {
    uart: Serial<SerialIrq, InputDrained, ConsoleOut>,
    write_failed: bool,
}

impl SerialDevice {
    pub fn new(irq: SerialIrq, drained: InputDrained, out: ConsoleOut) -> Self {
        SerialDevice {
            uart: Serial::with_events(irq, drained, out),
            write_failed: false,
        }
    }

    /// Queues guest input; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e}");
                0
            }
        }
    }

    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |off| self.uart.read(off));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value) {
            // A closed stdout or full disk must not stop the guest; say it once.
            if !self.write_failed {
                log::warn!("serial: console output lost: {e}");
                self.write_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device(out: ConsoleOut) -> (SerialDevice, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(
            SerialIrq(irq.try_clone().unwrap()),
            InputDrained(drained.try_clone().unwrap()),
            out,
        );
        (dev, drained)
    }

    #[test]
    fn output_goes_to_the_socket_ring_and_late_client_gets_it() {
        let console = Arc::new(Mutex::new(SocketConsole::default()));
        let (mut dev, _) = device(ConsoleOut::Socket(console.clone()));
        for b in b"hello" {
            dev.write(0, &[*b]);
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        lock(&console).attach(a).unwrap();
        dev.write(0, b"!");
        let mut got = [0u8; 6];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello!");
        // A second client is refused while the first is attached.
        let (c, _d) = UnixStream::pair().unwrap();
        assert!(lock(&console).attach(c).is_err());
        // The first client going away frees the console.
        drop(b);
        dev.write(0, b"x");
        dev.write(0, b"y");
        assert!(!lock(&console).has_client());
    }

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

    #[test]
    fn input_reaches_the_guest_and_draining_signals() {
        let (mut dev, drained) = device(ConsoleOut::Off);
        dev.write(1, &[1]); // IER: receive interrupts
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut b = [0u8];
        dev.read(5, &mut b); // LSR: data ready
        assert_eq!(b[0] & 1, 1);
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert!(drained.read().is_ok());
        // A full FIFO takes no more.
        let cap = dev.input_capacity();
        assert_eq!(dev.enqueue_input(&vec![0; cap + 10]), cap);
        assert_eq!(dev.enqueue_input(b"x"), 0);
    }

    #[test]
    fn odd_offsets_and_sizes_are_harmless() {
        let (mut dev, _) = device(ConsoleOut::Off);
        let mut b = [0u8; 4];
        dev.read(300, &mut b);
        dev.write(300, &[1]);
        dev.write(0, &[]);
    }
}
