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

impl Ring {
    /// Queues `t` as submission `slot`: one readv or writev straight between the file and
    /// guest memory. Returns its iovecs, which must stay (with the memory they point into)
    /// until the completion of `slot` is reaped; None if it could not be queued (a buffer
    /// outside guest memory, a full ring): then it is the caller's to run in place.
    fn push(
        &mut self,
        disk: &Disk,
        m: &GuestMemoryMmap,
        t: &Transfer,
        slot: usize,
    ) -> Option<Vec<libc::iovec>> {
        let iovs = GuestIovecs::new(m, &t.segs).ok()?.into_raw();
        let fd = types::Fd(disk.file.as_raw_fd());
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
        // SAFETY: the caller keeps the iovecs (their heap buffer does not move with the Vec)
        // and the guest memory they point into until the completion of `slot` is reaped;
        // dropping the server waits for every completion first.
        unsafe { self.ring.submission().push(&entry) }.ok()?;
        Some(iovs)
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
    let mut server = Server::new(disk, ring, queue, irq, mem);
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
    fn new(
        disk: Arc<Disk>,
        ring: Ring,
        queue: Queue,
        irq: Arc<dyn Interrupt>,
        mem: Memory,
    ) -> Self {
        let n = usize::from(QUEUE_SIZE);
        Server {
            disk,
            ring,
            queue,
            irq,
            mem,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
        }
    }

    /// Takes the requests the driver queued, as long as there is a free slot (at most the
    /// queue size in flight: a driver cannot have more outstanding; one that republishes
    /// heads waits in the ring until completions free slots), submits the reads and writes
    /// in one call and completes the rest in place.
    fn take(&mut self) {
        if self.free.is_empty() {
            return; // a completion frees one and comes back here
        }
        let m = self.mem.memory();
        let (disk, ring, queue) = (&self.disk, &mut self.ring, &mut self.queue);
        let (slots, free) = (&mut self.slots, &mut self.free);
        let mut done = Vec::new();
        let mut submitted = false;
        // A chain is taken only with a free slot: there is one now, and the loop stops
        // when a submission takes the last.
        let served = queue::for_each_chain(queue, m.clone(), |_, chain| {
            let head = chain.head_index();
            let Some(parsed) = disk.parse(chain, &m) else {
                done.push((head, 0));
                return ControlFlow::Continue(());
            };
            let (status, written) = match parsed.request {
                Request::Done(status, written) => (status, written),
                Request::Transfer(t) if !disk.direct_ok(&t.segs) => disk.run(&m, &t),
                Request::Transfer(t) => match free.pop() {
                    Some(slot) => match ring.push(disk, &m, &t, slot) {
                        Some(iovs) => {
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
                        None => {
                            free.push(slot);
                            disk.run(&m, &t)
                        }
                    },
                    None => disk.run(&m, &t),
                },
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

    /// The request in flight as submission `slot`, no longer in flight (its slot free).
    fn release(&mut self, slot: u64) -> Option<InFlight> {
        let i = usize::try_from(slot).ok()?;
        let f = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(f)
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
            let Some(f) = self.release(slot) else {
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
            let finished: Vec<u64> = self.ring.ring.completion().map(|c| c.user_data()).collect();
            for slot in finished {
                if self.release(slot).is_some() {
                    left -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{CountingIrq, memory};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// A driver with more requests out than there are slots (it republished heads) leaves
    /// the rest in the ring, and the worker takes them once completions free slots: no
    /// panic, nothing lost.
    #[test]
    fn requests_beyond_the_slots_wait_in_the_ring() {
        let mem = Memory::new(memory(1 << 20));
        let m = mem.memory();
        let vq = MockSplitQueue::new(&*m, 16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        m.write_slice(&h, GuestAddress(0x1_0000)).unwrap();
        let d = |a: u64, l: u32, f: u16, n: u16| RawDescriptor::from(Descriptor::new(a, l, f, n));
        vq.add_desc_chains(
            &[
                d(0x1_0000, 16, 1, 1),
                d(0x2_0000, 512, 2 | 1, 2),
                d(0x3_0000, 1, 2, 0),
            ],
            0,
        )
        .unwrap();
        let (disk, _) = crate::virtio::block::tests::disk("slots", false);
        let irq = Arc::new(CountingIrq::default());
        let mut s = Server::new(
            Arc::new(disk),
            Ring::new().unwrap(),
            vq.create_queue().unwrap(),
            irq,
            mem.clone(),
        );
        let free = std::mem::take(&mut s.free);
        s.take();
        assert_eq!(vq.used().idx().load(), 0, "no slot: the request waits");
        s.free = free;
        s.take();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while vq.used().idx().load() == 0 {
            assert!(std::time::Instant::now() < deadline, "never completed");
            std::thread::sleep(std::time::Duration::from_millis(1));
            s.reap();
        }
        let mut data = [0u8; 512];
        m.read_slice(&mut data, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(data, [1u8; 512], "sector 0");
    }
}
