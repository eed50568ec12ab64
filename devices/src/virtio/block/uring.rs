//! virtio-blk reads and writes on io_uring: the worker thread takes requests off the queue
//! and submits each read or write as one readv/writev straight between the file and guest
//! memory, all of a pass in one io_uring_enter, then goes back to the queue; the kernel runs
//! them side by side and signals their completions on an eventfd the same worker polls, which
//! puts them in the used ring. No request waits for a thread. Everything else (flush, id,
//! discard, a transfer O_DIRECT cannot take straight) runs in place on the worker, as the
//! pool's threads would run it. Where io_uring cannot be set up the pool serves the disk.
use std::io;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryLoadGuard};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Disk, QUEUE_SIZE, Request, S_OK, Transfer, finish};
use crate::virtio::buffers::{GuestIovecs, Segment, total};
use crate::virtio::worker::Worker;
use crate::virtio::{
    ActivateError, GuestMemoryMmap, Interrupt, Memory, VIRTIO_MMIO_INT_VRING, broken_queue, queue,
};

/// An io_uring for one disk and the eventfd its completions signal. Made where the device is
/// activated, so that a host without io_uring (`kernel.io_uring_disabled`, a container's
/// seccomp profile) shows before a worker starts, and the pool serves the disk instead.
pub(super) struct Ring {
    ring: IoUring,
    done: EventFd,
}

impl Ring {
    pub(super) fn new() -> io::Result<Ring> {
        let ring = IoUring::new(u32::from(QUEUE_SIZE))?;
        let done = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(done.as_raw_fd())?;
        Ok(Ring { ring, done })
    }
}

/// A submission's iovecs: pointers into guest memory that the [`InFlight`] holding them keeps
/// mapped.
struct Iovecs {
    _iovs: Vec<libc::iovec>,
}

// SAFETY: the pointers are into guest memory, which the load guard beside them keeps mapped
// wherever they go; only the worker thread that owns them hands them to the kernel.
unsafe impl Send for Iovecs {}

/// A read or write the kernel holds: its chain's head and status byte, the transfer (to run
/// again in place if the kernel does not finish it), its iovecs and the guest memory they
/// point into.
struct InFlight {
    head: u16,
    status_at: Vec<Segment>,
    transfer: Transfer,
    _iovs: Iovecs,
    _mem: GuestMemoryLoadGuard<GuestMemoryMmap>,
}

/// The worker's state: the queue, the ring, and the requests in flight by submission
/// (user_data) number.
struct Server {
    disk: Arc<Disk>,
    ring: Ring,
    queue: Queue,
    irq: Arc<dyn Interrupt>,
    mem: Memory,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

/// Starts the worker that serves the disk's only queue on `ring`.
pub(super) fn spawn(
    disk: Arc<Disk>,
    ring: Ring,
    mem: Memory,
    irq: Arc<dyn Interrupt>,
    queues: Vec<(Queue, EventFd)>,
) -> Result<Worker, ActivateError> {
    let (queue, kick) = queues
        .into_iter()
        .next()
        .ok_or(ActivateError::BadQueue(0))?;
    let fds = vec![
        (kick.as_raw_fd(), libc::POLLIN),
        (ring.done.as_raw_fd(), libc::POLLIN),
    ];
    let n = usize::from(QUEUE_SIZE);
    let mut server = Server {
        disk,
        ring,
        queue,
        irq,
        mem,
        slots: (0..n).map(|_| None).collect(),
        free: (0..n).rev().collect(),
    };
    Worker::spawn_poll("virtio-blk".to_owned(), fds, move |ready, _| {
        if ready[0] != 0 {
            let _ = kick.read();
        }
        if ready[1] != 0 {
            let _ = server.ring.done.read();
        }
        // Completions first: they free room for the requests waiting in the queue.
        server.reap();
        server.take();
    })
    .map_err(ActivateError::Thread)
}

impl Server {
    /// Takes the requests the driver queued, as long as there is a free slot (at most the
    /// queue size in flight: a driver cannot have more outstanding; one that republishes
    /// heads waits in the ring until completions free slots), submits the reads and writes
    /// in one call and completes the rest in place.
    fn take(&mut self) {
        let m = self.mem.memory();
        let (disk, ring, queue) = (&self.disk, &mut self.ring, &mut self.queue);
        let (slots, free) = (&mut self.slots, &mut self.free);
        let mut done = Vec::new();
        let mut submitted = false;
        let served = queue::for_each_chain(queue, m.clone(), |_, chain| {
            let head = chain.head_index();
            let Some(parsed) = disk.parse(chain, &m) else {
                done.push((head, 0));
                return ControlFlow::Continue(());
            };
            let (status, written) = match parsed.request {
                Request::Done(status, written) => (status, written),
                Request::Transfer(t) if !disk.direct_ok(&t.segs) => disk.run(&m, &t),
                Request::Transfer(t) => {
                    let slot = free.pop().expect("a chain is taken only with a free slot");
                    let fd = types::Fd(disk.file.as_raw_fd());
                    match GuestIovecs::new(&m, &t.segs).map(GuestIovecs::into_raw) {
                        Ok(iovs) => {
                            // At most the queue size of descriptors, far below u32::MAX.
                            let count = u32::try_from(iovs.len()).unwrap_or(u32::MAX);
                            let entry = if t.write {
                                opcode::Writev::new(fd, iovs.as_ptr(), count)
                                    .offset(t.offset)
                                    .build()
                            } else {
                                opcode::Readv::new(fd, iovs.as_ptr(), count)
                                    .offset(t.offset)
                                    .build()
                            };
                            let entry = entry.user_data(slot as u64);
                            // SAFETY: the iovecs (their heap buffer does not move with the
                            // Vec) and the guest memory they point into stay in slots[slot]
                            // until its completion is reaped; dropping the server waits for
                            // every completion first.
                            let pushed = unsafe { ring.ring.submission().push(&entry) }.is_ok();
                            if pushed {
                                slots[slot] = Some(InFlight {
                                    head,
                                    status_at: parsed.status_at,
                                    transfer: t,
                                    _iovs: Iovecs { _iovs: iovs },
                                    _mem: m.clone(),
                                });
                                submitted = true;
                                return if free.is_empty() {
                                    ControlFlow::Break(())
                                } else {
                                    ControlFlow::Continue(())
                                };
                            }
                            free.push(slot);
                            disk.run(&m, &t)
                        }
                        Err(_) => {
                            free.push(slot);
                            disk.run(&m, &t)
                        }
                    }
                }
            };
            done.push((head, finish(&m, &parsed.status_at, status, written)));
            ControlFlow::Continue(())
        });
        if submitted && let Err(e) = ring.ring.submit() {
            // Left in the submission ring: the next call submits them.
            log::warn!("virtio-blk: io_uring submit: {e}");
        }
        if let Err(e) = served {
            broken_queue(queue, self.irq.as_ref(), &e);
        }
        self.complete(&m, &done);
    }

    /// Completes what the kernel finished: a read or write that moved every byte is done; a
    /// short one or one the kernel refused (O_DIRECT wanting more alignment than a sector)
    /// runs again in place, which finishes it, bounces it, or reports the error.
    fn reap(&mut self) {
        let m = self.mem.memory();
        let finished: Vec<(u64, i32)> = self
            .ring
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut done = Vec::with_capacity(finished.len());
        for (slot, result) in finished {
            let Some(f) = usize::try_from(slot)
                .ok()
                .and_then(|i| Some((i, self.slots.get_mut(i)?.take()?)))
                .map(|(i, f)| {
                    self.free.push(i);
                    f
                })
            else {
                continue;
            };
            let len = total(&f.transfer.segs);
            let (status, written) = if usize::try_from(result).is_ok_and(|n| n == len) {
                (S_OK, if f.transfer.write { 0 } else { len })
            } else {
                self.disk.run(&m, &f.transfer)
            };
            done.push((f.head, finish(&m, &f.status_at, status, written)));
        }
        self.complete(&m, &done);
    }

    /// Puts finished chains (head, bytes written) in the used ring and interrupts the driver
    /// once if it wants to know.
    fn complete(&mut self, m: &GuestMemoryMmap, done: &[(u16, u32)]) {
        if done.is_empty() {
            return;
        }
        for &(head, len) in done {
            if let Err(e) = self.queue.add_used(m, head, len) {
                crate::guest_warn!("virtio-blk: cannot complete descriptor {head}: {e}");
            }
        }
        if self.queue.needs_notification(m).unwrap_or(true) {
            self.irq.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }
}

impl Drop for Server {
    /// The kernel may still write into guest memory for the requests in flight: waits for
    /// every one before the memory can be given back (a reset, a reboot, the end).
    fn drop(&mut self) {
        let mut left = self.slots.iter().filter(|s| s.is_some()).count();
        while left > 0 {
            match self.ring.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("virtio-blk: waiting for {left} requests in flight: {e}");
                    // Their guest memory stays mapped for good rather than be written after
                    // it was given back.
                    for f in self.slots.iter_mut().filter_map(Option::take) {
                        std::mem::forget(f);
                    }
                    return;
                }
            }
            for c in self.ring.ring.completion() {
                let slot = usize::try_from(c.user_data()).ok();
                if slot.and_then(|i| self.slots.get_mut(i)?.take()).is_some() {
                    left -= 1;
                }
            }
        }
    }
}
