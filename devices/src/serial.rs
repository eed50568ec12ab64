//! The 16550A UART on COM1 (vm-superio); its output goes to a [`ConsoleOut`].
use std::io;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::console::ConsoleOut;

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
    use crate::console::SocketConsole;
    use crate::lock;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
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
