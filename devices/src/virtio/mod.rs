//! virtio 1.x devices and their two transports, virtio-mmio and virtio-pci.
//!
//! A device implements [`VirtioDevice`]; a transport ([`mmio::MmioTransport`],
//! [`pci::PciTransport`]) decodes the driver's register accesses into the one state machine
//! both share ([`transport::VirtioCommon`]), which hands the device its queues when the driver
//! sets DRIVER_OK. Queue work runs on the device's own [`worker`] thread, woken by the queues'
//! eventfds (KVM ioeventfds), and interrupts go out through an eventfd (a KVM irqfd): the data
//! path never needs a vCPU exit.
use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use crate::lock;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod buffers;
pub mod console;
pub mod fs;
pub mod fuse;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod transport;
pub mod vsock;
pub mod worker;

/// Guest memory as the devices see it (the same type as nixvm-boot's).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

pub use virtio_bindings::virtio_ids::{
    VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_FS, VIRTIO_ID_NET, VIRTIO_ID_RNG,
};
/// InterruptStatus bits of virtio-mmio.
pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// Feature bits as masks (the bindings number them).
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// How a device interrupts the driver.
pub trait Interrupt: Send + Sync {
    fn trigger(&self, status: u32);
    /// The device cannot go on (the driver broke a queue): the transport reports
    /// DEVICE_NEEDS_RESET from now until the driver resets the device, and the driver is
    /// told with a configuration change interrupt.
    fn needs_reset(&self) {
        self.trigger(VIRTIO_MMIO_INT_CONFIG);
    }
    /// The eventfd that raises the interrupt (a KVM irqfd), for backends outside nixvm that
    /// signal the guest themselves (vhost-user).
    fn notifier(&self) -> Option<&EventFd> {
        None
    }
}

/// The virtio-mmio interrupt: a status word the driver reads (which acknowledges it, see
/// [`MmioInterrupt::take`]), and an eventfd wired to the device's GSI.
pub struct MmioInterrupt {
    pub status: AtomicU32,
    pub evt: EventFd,
    /// Set by [`Interrupt::needs_reset`]; the transport clears it at reset.
    pub broken: AtomicBool,
}

impl MmioInterrupt {
    pub fn new(evt: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            evt,
            broken: AtomicBool::new(false),
        }
    }
}

impl MmioInterrupt {
    /// Raises the line (the irqfd is an edge; the status word is the level).
    fn raise(&self) {
        if let Err(e) = self.evt.write(1) {
            crate::guest_warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// The driver reads InterruptStatus: it gets the pending bits, and they are cleared, as
    /// virtio-pci's ISR register is read-to-clear. Every driver acknowledges what it read
    /// before it looks at the rings (Linux writes InterruptACK with the value it read, right
    /// after reading), so this is the acknowledgement one exit earlier, and the write itself
    /// never reaches nixvm: the vmm sinks it in a KVM ioeventfd ([`mmio::ACK_VALUES`]). A
    /// notification after the read finds nothing pending and raises a new edge; one before
    /// it is in the value read.
    pub fn take(&self) -> u32 {
        self.status.swap(0, Ordering::SeqCst)
    }
}

impl transport::TransportInterrupt for MmioInterrupt {
    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.broken.store(false, Ordering::SeqCst);
    }
}

impl Interrupt for MmioInterrupt {
    /// Raises the interrupt only for bits not already pending: while they are, the driver
    /// has an interrupt on its way and sees the new work when it handles it (it reads the
    /// status before it looks at the rings). A second edge would only cost it another
    /// interrupt and another exit (reading the status), as a level-triggered line (QEMU's)
    /// does not.
    fn trigger(&self, status: u32) {
        if self.status.fetch_or(status, Ordering::SeqCst) & status != status {
            self.raise();
        }
    }
    fn needs_reset(&self) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            self.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }
    fn notifier(&self) -> Option<&EventFd> {
        Some(&self.evt)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot start the device's worker thread")]
    Thread(#[source] io::Error),
    #[error("queue {0} is not usable (not ready, or its rings are outside guest memory)")]
    BadQueue(usize),
    #[error("the vhost-user back end refused the device's set-up")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the transport gives no eventfd for a back end to signal the guest with")]
    NoNotifier,
}

/// A virtio device behind a transport. Queues move into the device at activation.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    fn set_acked_features(&mut self, _features: u64) {}
    /// Reads device config space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            "virtio type {}: ignored config write of {} bytes at {offset}",
            self.device_type(),
            data.len()
        );
    }
    fn activate(
        &mut self,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError>;
    /// Stops the device's work so it can be activated again. False if it cannot.
    fn reset(&mut self) -> bool;
    /// Sets a network device's link up or down (QEMU's `set_link`): whether that changed
    /// its config space, or None for a device without a link.
    fn set_link(&mut self, _up: bool) -> Option<bool> {
        None
    }
    /// The device's backend raises its interrupt through the irqfd directly (vhost-user), so
    /// the transport cannot track why: InterruptStatus then always says "used buffers", and
    /// the driver checks its queues on every interrupt (harmless when nothing is new).
    fn signals_directly(&self) -> bool {
        false
    }
}

/// Copies `src` into `dst` at `offset`, as far as both reach (config space reads).
pub fn read_config_bytes(src: &[u8], offset: u64, dst: &mut [u8]) {
    dst.fill(0);
    if let Ok(off) = usize::try_from(offset) {
        if off < src.len() {
            let n = dst.len().min(src.len() - off);
            dst[..n].copy_from_slice(&src[off..off + n]);
        }
    }
}

/// Takes every available chain off `queue` ([`queue::for_each_chain`]), lets `handle`
/// complete it (returning the number of bytes written into the chain), and interrupts the
/// driver if it wants to know. A queue the driver broke is not served again until a reset:
/// the device reports that it needs one. Returns false then.
pub fn process_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &dyn Interrupt,
    mut handle: F,
) -> bool
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    serve_queue(queue, mem, irq, |chain| {
        ControlFlow::Continue(handle(chain))
    })
}

/// [`process_queue`] for a device that cannot always take a chain (its host side is full, or
/// it has nothing to put in it): `handle` completes a chain with `Continue(bytes written)`,
/// or declines it with `Break`, which puts the chain back in the ring untouched and ends the
/// loop. Notifications stay off then: the device comes back by itself when it can go on.
pub fn serve_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    irq: &dyn Interrupt,
    mut handle: F,
) -> bool
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> ControlFlow<(), u32>,
{
    let mut used_any = false;
    let served = queue::for_each_chain(queue, mem, |q, chain| {
        let head = chain.head_index();
        let ControlFlow::Continue(len) = handle(chain) else {
            q.go_to_previous_position();
            return ControlFlow::Break(());
        };
        used_any = true;
        if let Err(e) = q.add_used(mem, head, len) {
            crate::guest_warn!("virtio: cannot complete descriptor {head}: {e}");
        }
        ControlFlow::Continue(())
    });
    match served {
        Ok(_) => {
            if used_any && queue.needs_notification(mem).unwrap_or(true) {
                irq.trigger(VIRTIO_MMIO_INT_VRING);
            }
            true
        }
        Err(e) => {
            broken_queue(queue, irq, &e);
            false
        }
    }
}

/// Stops serving a queue the driver broke and asks for a reset (logged once per queue).
pub fn broken_queue(queue: &mut Queue, irq: &dyn Interrupt, e: &queue::QueueError) {
    if !queue.ready() {
        return; // never served, or already stopped
    }
    crate::guest_warn!("virtio: a queue is broken ({e}); the device needs a reset");
    queue.set_ready(false);
    irq.needs_reset();
}

/// Starts a worker thread that serves a device's only queue: each notification runs
/// [`process_queue`] with `handle` (which completes one chain, returning the bytes written).
pub fn serve_single_queue<H>(
    name: &str,
    mem: Memory,
    irq: Arc<dyn Interrupt>,
    queues: Vec<(Queue, EventFd)>,
    mut handle: H,
) -> Result<worker::Worker, ActivateError>
where
    H: FnMut(DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> u32 + Send + 'static,
{
    let (mut queue, evts): (Vec<Queue>, Vec<EventFd>) = queues.into_iter().unzip();
    let mut queue = queue.pop().ok_or(ActivateError::BadQueue(0))?;
    worker::Worker::spawn(name.to_owned(), evts, move |_| {
        let m = mem.memory();
        process_queue(&mut queue, &m, irq.as_ref(), |chain| handle(chain, &m));
    })
    .map_err(ActivateError::Thread)
}

/// A descriptor chain that owns its hold on guest memory, so it can move to another thread.
pub type OwnedChain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// A device's only queue served by a pool of threads: the worker thread takes chains off the
/// queue as they arrive and hands them to `threads` threads, so up to that many requests run
/// at once; each thread completes its chain into the used ring and interrupts the driver
/// when it wants to know. At most the queue's size of chains are taken and not yet completed
/// (a driver cannot have more outstanding; one that republishes heads waits in the ring):
/// the worker stops taking chains there, and the thread that completes one wakes it again.
/// The last chain of each pass the worker serves itself: a lone request (queue depth one)
/// then costs no hand-off to another thread, only the wake-up of the worker by the kick.
/// Dropping the pool finishes the requests in flight first.
pub struct QueuePool {
    worker: Option<worker::Worker>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl QueuePool {
    pub fn spawn<H>(
        name: &str,
        threads: usize,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
        handle: H,
    ) -> Result<QueuePool, ActivateError>
    where
        H: Fn(OwnedChain, &GuestMemoryMmap) -> u32 + Send + Sync + 'static,
    {
        let (queue, evts): (Vec<Queue>, Vec<EventFd>) = queues.into_iter().unzip();
        let queue = Arc::new(Mutex::new(
            queue.into_iter().next().ok_or(ActivateError::BadQueue(0))?,
        ));
        let limit = usize::from(lock(&queue).size());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let kick = evts
            .first()
            .ok_or(ActivateError::BadQueue(0))?
            .try_clone()
            .map_err(ActivateError::Thread)?;
        let (tx, rx) = mpsc::channel::<OwnedChain>();
        let rx = Arc::new(Mutex::new(rx));
        let server = Arc::new(Server {
            handle,
            queue: queue.clone(),
            irq: irq.clone(),
            in_flight: in_flight.clone(),
            limit,
            kick,
        });
        let mut pool = QueuePool {
            worker: None,
            threads: Vec::new(),
        };
        for i in 0..threads {
            let (rx, mem, server) = (rx.clone(), mem.clone(), server.clone());
            let t = worker::spawn_thread(format!("{name}-io{i}"), move || {
                loop {
                    // The receiver is locked only to take one chain: the threads run
                    // their requests in parallel. Ends when the worker, and with it the
                    // sender, is gone.
                    let next = lock(&rx).recv();
                    let Ok(chain) = next else { break };
                    server.serve(chain, &mem.memory());
                }
            })
            .map_err(ActivateError::Thread)?;
            pool.threads.push(t);
        }
        let w = worker::Worker::spawn(name.to_owned(), evts, move |_| {
            if in_flight.load(Ordering::SeqCst) >= limit {
                return; // the thread that completes one wakes this one
            }
            let m = mem.memory();
            let mut q = lock(&queue);
            // Each chain goes to the pool when the next one shows that there is more; the
            // last stays here. The pool threads outlive this thread, so the channel stays
            // open.
            let mut last: Option<OwnedChain> = None;
            let served = queue::for_each_chain(&mut q, m.clone(), |_, chain| {
                if let Some(earlier) = last.replace(chain) {
                    let _ = tx.send(earlier);
                }
                if in_flight.fetch_add(1, Ordering::SeqCst) + 1 >= limit {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            if let Err(e) = served {
                broken_queue(&mut q, irq.as_ref(), &e);
            }
            drop(q);
            if let Some(chain) = last {
                server.serve(chain, &m);
            }
        })
        .map_err(ActivateError::Thread)?;
        pool.worker = Some(w);
        Ok(pool)
    }
}

/// What serving one of a [`QueuePool`]'s chains takes, shared by its threads.
struct Server<H> {
    handle: H,
    queue: Arc<Mutex<Queue>>,
    irq: Arc<dyn Interrupt>,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    /// The worker's queue eventfd.
    kick: EventFd,
}

impl<H: Fn(OwnedChain, &GuestMemoryMmap) -> u32> Server<H> {
    /// Handles `chain`, puts it in the used ring with the bytes written, interrupts the
    /// driver if it wants to know, and wakes the worker if it had stopped at the limit.
    fn serve(&self, chain: OwnedChain, m: &GuestMemoryMmap) {
        let head = chain.head_index();
        let len = (self.handle)(chain, m);
        let mut q = lock(&self.queue);
        if let Err(e) = q.add_used(m, head, len) {
            crate::guest_warn!("virtio: cannot complete descriptor {head}: {e}");
        }
        let notify = q.needs_notification(m).unwrap_or(true);
        drop(q);
        if notify {
            self.irq.trigger(VIRTIO_MMIO_INT_VRING);
        }
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == self.limit {
            let _ = self.kick.write(1);
        }
    }
}

impl Drop for QueuePool {
    fn drop(&mut self) {
        // Stopping the worker drops the sender; the threads finish what they hold, then end.
        self.worker.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils {
    //! Guest memory, a recording interrupt and mock queues for device tests.
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    pub fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("test memory")
    }

    /// A device that records what the transport does to it.
    #[derive(Default, Clone)]
    pub struct Probe(pub Arc<Mutex<(u64, usize, usize)>>); // acked features, activations, resets

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            F_EVENT_IDX | 1
        }
        fn set_acked_features(&mut self, f: u64) {
            self.0.lock().unwrap().0 = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(
            &mut self,
            _: Memory,
            _: Arc<dyn Interrupt>,
            q: Vec<(Queue, EventFd)>,
        ) -> Result<(), ActivateError> {
            assert_eq!(q.len(), 2);
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.0.lock().unwrap().2 += 1;
            true
        }
    }

    /// Counts the interrupts it gets.
    #[derive(Default)]
    pub struct CountingIrq(pub Mutex<Vec<u32>>);
    impl Interrupt for CountingIrq {
        fn trigger(&self, status: u32) {
            self.0.lock().unwrap().push(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::{CountingIrq, memory};
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn mmio_interrupts_are_raised_like_a_level_line() {
        let irq = MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let edges = || irq.evt.read().unwrap_or(0);
        let (vring, config) = (VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INT_CONFIG);
        // Pending bits raise nothing more; a new bit does.
        irq.trigger(vring);
        irq.trigger(vring);
        assert_eq!(edges(), 1);
        irq.trigger(config);
        assert_eq!(edges(), 1);
        // The driver's read takes both bits and raises nothing; the next notification finds
        // nothing pending and raises the line anew.
        assert_eq!(irq.take(), vring | config);
        assert_eq!(edges(), 0);
        irq.trigger(vring);
        assert_eq!(edges(), 1);
        assert_eq!(irq.take(), vring);
    }

    /// Waits until `cond` holds, for at most 5 s.
    fn wait_for(cond: impl Fn() -> bool) -> bool {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    #[test]
    fn the_pool_runs_requests_in_parallel_and_at_most_a_ring_of_them() {
        let mem = memory(1 << 20);
        let mock = MockSplitQueue::new(&mem, 4);
        let descs: Vec<RawDescriptor> = (0..4)
            .map(|i| RawDescriptor::from(Descriptor::new(0x10_000 + i * 0x100, 16, 0, 0)))
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = mock.create_queue().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kicker = kick.try_clone().unwrap();
        let (running, max, started) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let release = Arc::new(AtomicBool::new(false));
        // Lets the requests finish however the test ends (the pool's drop waits for them).
        struct Release(Arc<AtomicBool>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (r, mx, st, rel) = (
            running.clone(),
            max.clone(),
            started.clone(),
            release.clone(),
        );
        let pool = QueuePool::spawn(
            "test",
            8,
            Memory::new(mem.clone()),
            Arc::new(CountingIrq::default()),
            vec![(queue, kick)],
            move |_, _| {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                mx.fetch_max(now, Ordering::SeqCst);
                st.fetch_add(1, Ordering::SeqCst);
                while !rel.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                r.fetch_sub(1, Ordering::SeqCst);
                0
            },
        )
        .unwrap();
        // Dropped before the pool, whose drop waits for the requests.
        let _release_at_end = Release(release.clone());
        kicker.write(1).unwrap();
        // All four requests run at once on four of the eight threads.
        assert!(
            wait_for(|| started.load(Ordering::SeqCst) == 4),
            "started {}",
            started.load(Ordering::SeqCst)
        );
        assert_eq!(max.load(Ordering::SeqCst), 4);
        // The driver republishes the same four heads while none is complete: the pool takes
        // no more than the ring's four.
        mock.avail().idx().store(u16::to_le(8));
        kicker.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            started.load(Ordering::SeqCst),
            4,
            "at most a ring in flight"
        );
        // Once some complete, the worker is woken and takes the rest.
        release.store(true, Ordering::SeqCst);
        assert!(wait_for(|| started.load(Ordering::SeqCst) == 8));
        assert!(wait_for(|| running.load(Ordering::SeqCst) == 0));
        drop(pool);
    }
}
