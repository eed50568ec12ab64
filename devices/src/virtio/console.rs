//! virtio-console: the guest's `/dev/hvc0`, a single port (no MULTIPORT), moving a buffer per
//! notification instead of a byte per vCPU exit as the serial port does.
//!
//! Output (the transmit queue) goes to a [`ConsoleOut`] from the device's worker. Nothing is
//! dropped: when a connected socket cannot take more, the chain being written goes back to
//! the ring (with how far it got) and the worker waits for the socket to have room; the guest
//! waits with it. Input comes from whoever reads the host side (stdin, a socket client)
//! through a [`ConsoleInput`], which holds at most [`INPUT_CAP`] bytes until the guest gives
//! receive buffers; the reader is told through an eventfd when it has all gone in.
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::worker::Worker;
use super::{
    ActivateError, F_EVENT_IDX, GuestMemoryMmap, Interrupt, Memory, VIRTIO_ID_CONSOLE,
    VirtioDevice, serve_queue,
};
use crate::console::ConsoleOut;
use crate::lock;

const QUEUE_SIZE: u16 = 256;
const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;
/// Input held for the guest at most; the reader pauses beyond it.
pub const INPUT_CAP: usize = 64 << 10;
/// The most of one transmit chain that goes out: a driver writes a page or so at a time, and
/// a chain claiming more (its descriptors may all alias the same guest memory) must not
/// keep the worker copying.
pub const MAX_TX_CHAIN: usize = 1 << 20;
/// Bytes moved per write.
const CHUNK: usize = 16 << 10;

/// Host input on its way to the guest, shared by the reader and the device.
#[derive(Clone)]
pub struct ConsoleInput(Arc<InputShared>);

struct InputShared {
    bytes: Mutex<VecDeque<u8>>,
    /// Wakes the worker: there is input.
    kick: EventFd,
    /// Tells the reader that everything it gave went to the guest.
    drained: EventFd,
}

impl ConsoleInput {
    /// `drained` is written each time the guest has taken all input held.
    pub fn new(drained: EventFd) -> io::Result<ConsoleInput> {
        Ok(ConsoleInput(Arc::new(InputShared {
            bytes: Mutex::new(VecDeque::new()),
            kick: EventFd::new(EFD_NONBLOCK)?,
            drained,
        })))
    }

    /// Holds as much of `bytes` as fits for the guest; returns how many.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        let mut held = lock(&self.0.bytes);
        let n = bytes.len().min(INPUT_CAP - held.len());
        held.extend(&bytes[..n]);
        drop(held);
        if n > 0 {
            let _ = self.0.kick.write(1);
        }
        n
    }

    /// Fills one receive chain from the held input; `Break` if there is none to give.
    fn fill(
        &self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> ControlFlow<(), u32> {
        let mut held = lock(&self.0.bytes);
        if held.is_empty() {
            return ControlFlow::Break(());
        }
        let Ok(mut w) = chain.writer(mem) else {
            crate::guest_warn!("virtio-console: receive buffer outside guest memory dropped");
            return ControlFlow::Continue(0);
        };
        let n = w.available_bytes().min(held.len());
        let (a, b) = held.as_slices();
        let (a, b) = (&a[..n.min(a.len())], &b[..n - n.min(a.len())]);
        if let Err(e) = w.write_all(a).and_then(|()| w.write_all(b)) {
            crate::guest_warn!("virtio-console: {e}");
            return ControlFlow::Continue(0);
        }
        held.drain(..n);
        if held.is_empty() {
            let _ = self.0.drained.write(1);
        }
        ControlFlow::Continue(u32::try_from(n).unwrap_or(0))
    }
}

/// The output side: the sink, and how much of the chain at the head of the transmit ring it
/// has already taken (that chain went back to the ring when the sink was full).
struct Output {
    out: ConsoleOut,
    sent: usize,
    failed: bool,
    /// Guest bytes on their way out.
    buf: Vec<u8>,
}

/// Whether a chain went out whole, or the sink is full.
enum Sent {
    All,
    Full,
}

impl Output {
    fn send(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Sent {
        let Ok(mut r) = chain.reader(mem) else {
            crate::guest_warn!("virtio-console: transmit buffer outside guest memory dropped");
            return Sent::All;
        };
        let total = r.available_bytes();
        if total > MAX_TX_CHAIN {
            crate::guest_warn!(
                "virtio-console: a {total}-byte transmit chain: only its first {MAX_TX_CHAIN} bytes go out"
            );
        }
        let mut rest = match r.split_at(self.sent.min(total)) {
            Ok(rest) => rest,
            Err(_) => return Sent::All,
        };
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(CHUNK, 0);
        let sent = self.copy_out(&mut rest, &mut buf, total.min(MAX_TX_CHAIN));
        self.buf = buf;
        sent
    }

    /// Writes the reader's bytes to the sink until `limit` bytes of the chain went out.
    fn copy_out(&mut self, rest: &mut impl Read, buf: &mut [u8], limit: usize) -> Sent {
        while self.sent < limit {
            let want = buf.len().min(limit - self.sent);
            let Ok(got) = rest.read(&mut buf[..want]) else {
                break;
            };
            if got == 0 {
                break;
            }
            let mut piece = &buf[..got];
            while !piece.is_empty() {
                match self.out.write(piece) {
                    Ok(0) => {
                        self.lost(&io::ErrorKind::WriteZero.into());
                        break;
                    }
                    Ok(n) => {
                        piece = &piece[n..];
                        self.sent += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Only a connected socket can be full: wait for room.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::Full,
                    Err(e) => {
                        self.lost(&e);
                        self.sent += piece.len();
                        break;
                    }
                }
            }
        }
        let _ = self.out.flush();
        self.sent = 0;
        Sent::All
    }

    /// The sink failed (a closed stdout, a peer that went away): output is dropped from now
    /// on, said once.
    fn lost(&mut self, e: &io::Error) {
        if !self.failed {
            log::warn!("virtio-console: console output lost: {e}");
            self.failed = true;
        }
        self.out = ConsoleOut::Off;
    }
}

pub struct Console {
    output: Arc<Mutex<Output>>,
    input: ConsoleInput,
    worker: Option<Worker>,
}

impl Console {
    /// A connected socket is made non-blocking, and a socket console waits for a slow
    /// client instead of dropping for it: the worker never waits in a write, and loses
    /// nothing.
    pub fn new(out: ConsoleOut, input: ConsoleInput) -> io::Result<Console> {
        match &out {
            ConsoleOut::Stream(s) => s.set_nonblocking(true)?,
            ConsoleOut::Socket(s) => lock(s).wait_for_client()?,
            _ => {}
        }
        Ok(Console {
            output: Arc::new(Mutex::new(Output {
                out,
                sent: 0,
                failed: false,
                buf: Vec::new(),
            })),
            input,
            worker: None,
        })
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        F_EVENT_IDX
    }
    fn activate(
        &mut self,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let (mut queues, evts): (Vec<Queue>, Vec<EventFd>) = queues.into_iter().unzip();
        if queues.len() != 2 {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        let mut txq = queues.pop().ok_or(ActivateError::BadQueue(TRANSMITQ))?;
        let mut rxq = queues.pop().ok_or(ActivateError::BadQueue(RECEIVEQ))?;
        let input = self.input.clone();
        let output = self.output.clone();
        let out_fd = lock(&output).out.poll_fd();
        let kick = input.0.kick.try_clone().map_err(ActivateError::Thread)?;
        // Polled: the two queues, the input kick, and the sink while it is full.
        let mut evts = evts;
        evts.push(kick);
        let mut fds: Vec<(i32, i16)> = evts
            .iter()
            .map(|e| (std::os::fd::AsRawFd::as_raw_fd(e), libc::POLLIN))
            .collect();
        let (sink_fd, sink_events) = out_fd.unwrap_or((-1, 0));
        fds.push((sink_fd, -1));
        let sink = fds.len() - 1;
        let worker = Worker::spawn_poll("virtio-console".into(), fds, move |ready, interest| {
            for (evt, &r) in evts.iter().zip(ready) {
                if r != 0 {
                    let _ = evt.read();
                }
            }
            let m = mem.memory();
            let mut out = lock(&output);
            let mut full = false;
            serve_queue(&mut txq, &m, irq.as_ref(), |chain| {
                match out.send(chain, &m) {
                    Sent::All => ControlFlow::Continue(0),
                    Sent::Full => {
                        full = true;
                        ControlFlow::Break(())
                    }
                }
            });
            // A sink that failed meanwhile is Off now: nothing to poll.
            interest[sink] = if full && out.out.poll_fd().is_some() {
                sink_events
            } else {
                -1
            };
            drop(out);
            serve_queue(&mut rxq, &m, irq.as_ref(), |chain| input.fill(chain, &m));
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.worker.take();
        lock(&self.output).sent = 0;
        true
    }
}

#[cfg(test)]
mod tests;
