//! virtio-net on a TAP device the host created beforehand (or an inherited TAP/macvtap fd),
//! on a stream socket to a user-mode network stack such as passt, or on a VDE switch's port.
//!
//! nixvm never creates or configures interfaces: it attaches to an existing TAP by name
//! (TUNSETIFF, which needs no privilege when the TAP belongs to nixvm's user) or takes an
//! open fd. Frames carry the 12-byte virtio-net header on both sides (IFF_VNET_HDR with
//! TUNSETVNETHDRSZ), so checksum and segmentation offloads pass through untouched; the
//! offloads the guest accepts are set on the TAP (TUNSETOFFLOAD). A stream ([`Stream`])
//! carries frames without a header, so no offloads are offered on it; nor on a VDE port
//! ([`Vde`]), whose datagrams are bare frames.
//!
//! One worker thread per device polls the two queues' eventfds and the TAP or socket. A
//! frame from the TAP is read straight into the guest's receive buffers (one readv), which
//! the device takes from the ring beforehand: with mergeable buffers, enough for the largest
//! frame (or the whole ring, if it holds less). While the guest has not given that much, the
//! TAP is not polled (frames wait in its own queue) until it adds buffers; while a socket
//! takes no more, the guest's frames wait in its transmit queue. Bad frames from the guest
//! are dropped and counted.
use std::collections::VecDeque;
use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

pub mod local;
mod stream;
mod tap;
mod vde;

pub use stream::Stream;
pub use tap::{Error, TUNSETOFFLOAD, TUNSETVNETHDRSZ, Tap, mac_from_name};
use tap::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6};
pub use vde::Vde;

use super::buffers::{ChainBuffers, GuestIovecs, IOV_MAX, Segment, gather, scatter, split, total};
use super::queue;
use super::worker::Worker;
use super::{
    ActivateError, F_EVENT_IDX, GuestMemoryMmap, Interrupt, Memory, VIRTIO_ID_NET,
    VIRTIO_MMIO_INT_VRING, VirtioDevice, read_config_bytes,
};

const QUEUE_SIZE: u16 = 256;
/// The virtio-net header with F_VERSION_1: `virtio_net_hdr_v1`, num_buffers included.
pub const HDR_LEN: usize = 12;
/// Where the header's last field, num_buffers (le16), starts.
const NUM_BUFFERS_AT: usize = HDR_LEN - 2;
/// The largest frame: a 64 KiB IP packet with an Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = 65550;
const ETH_HLEN: usize = 14;

/// Frames moved and dropped, per device.
#[derive(Default, Debug)]
pub struct Stats {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_dropped: AtomicU64,
}

impl Stats {
    /// Counts a dropped frame; logs the first and then every power of two.
    fn drop_frame(&self, rx: bool, why: &str) {
        let c = if rx {
            &self.rx_dropped
        } else {
            &self.tx_dropped
        };
        let n = c.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            let dir = if rx { "received" } else { "sent" };
            log::warn!("virtio-net: frame {dir} dropped: {why} ({n} so far)");
        }
    }
}

/// Where a device's frames go: a TAP, a stream socket, or a VDE switch.
pub enum Backend {
    Tap(Tap),
    Stream(Stream),
    Vde(Vde),
}

impl From<Vde> for Backend {
    fn from(v: Vde) -> Backend {
        Backend::Vde(v)
    }
}

impl From<Tap> for Backend {
    fn from(t: Tap) -> Backend {
        Backend::Tap(t)
    }
}

impl From<Stream> for Backend {
    fn from(s: Stream) -> Backend {
        Backend::Stream(s)
    }
}

impl Backend {
    /// The TAP's name, or what the stream is.
    pub fn name(&self) -> &str {
        match self {
            Backend::Tap(t) => t.name(),
            Backend::Stream(s) => s.name(),
            Backend::Vde(v) => v.name(),
        }
    }

    /// Whether frames carry the virtio-net header on the host side (offloads possible).
    fn has_header(&self) -> bool {
        matches!(self, Backend::Tap(_))
    }

    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Backend::Tap(t) => t.file.as_raw_fd(),
            Backend::Stream(s) => s.fd(),
            Backend::Vde(v) => v.fd(),
        }
    }

    /// Reads one frame, virtio-net header first, into the guest buffers `segs` (at most
    /// IOV_MAX - 1): its length, or WouldBlock. A length beyond what `segs` hold means the
    /// frame did not fit: it was cut short or not written, and is lost.
    fn recv(&self, mem: &GuestMemoryMmap, segs: &[Segment]) -> io::Result<usize> {
        match self {
            Backend::Tap(t) => GuestIovecs::new(mem, segs)?.readv(t.file.as_raw_fd()),
            Backend::Stream(s) => s.recv(mem, segs),
            Backend::Vde(v) => v.recv(mem, segs),
        }
    }

    /// Takes a frame (without the header) that `fill` writes, for a backend that sends from
    /// its own buffer (see `Wire::flush`); false if `fill` failed or it cannot take it.
    fn take_frame(&self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> bool {
        match self {
            Backend::Stream(s) => s.send(len, fill),
            Backend::Vde(v) => v.send(len, fill),
            Backend::Tap(_) => false,
        }
    }

    /// Whether frames the guest sent wait for the backend to take them (it is not offered
    /// more until they are gone).
    fn backlogged(&self) -> bool {
        match self {
            Backend::Tap(_) => false,
            Backend::Stream(s) => s.backlogged(),
            Backend::Vde(v) => v.backlogged(),
        }
    }
}

/// The virtio-net device.
pub struct Net {
    tap: Arc<Backend>,
    config: [u8; 12],
    /// The link as `set_link` left it; while down, frames are dropped both ways.
    link: Arc<AtomicBool>,
    acked: u64,
    stats: Arc<Stats>,
    worker: Option<Worker>,
}

impl Net {
    /// A device on `tap` (a TAP or a stream) with the given MAC (else one derived from the
    /// backend's name).
    pub fn new(tap: impl Into<Backend>, mac: Option<[u8; 6]>) -> Net {
        let tap = tap.into();
        let mac = mac.unwrap_or_else(|| mac_from_name(tap.name()));
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&mac);
        let up = u16::try_from(VIRTIO_NET_S_LINK_UP).expect("1");
        config[6..8].copy_from_slice(&up.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        Net {
            tap: Arc::new(tap),
            config,
            link: Arc::new(AtomicBool::new(true)),
            acked: 0,
            stats: Arc::default(),
            worker: None,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.config[0..6].try_into().expect("6")
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

fn bit(f: u32) -> u64 {
    1 << f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        let base = F_EVENT_IDX
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF);
        if !self.tap.has_header() {
            return base;
        }
        base | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let acked = self.acked;
        let has = |f: u32| acked & bit(f) != 0;
        let mut offload = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            offload |= TUN_F_CSUM;
            for (f, t) in [
                (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
                (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
            ] {
                if has(f) {
                    offload |= t;
                }
            }
        }
        if let Backend::Tap(tap) = &*self.tap
            && let Err(e) = tap.set_offload(offload)
        {
            crate::guest_warn!("virtio-net {}: cannot set offloads: {e}", tap.name());
        }
        let mut q = queues.into_iter();
        let (Some((rxq, rx_evt)), Some((txq, tx_evt))) = (q.next(), q.next()) else {
            return Err(ActivateError::BadQueue(0));
        };
        let fds = vec![
            (rx_evt.as_raw_fd(), libc::POLLIN),
            (tx_evt.as_raw_fd(), libc::POLLIN),
            (self.tap.fd(), libc::POLLIN),
        ];
        let wire = Wire {
            tap: self.tap.clone(),
            stats: self.stats(),
            acked,
            link: self.link.clone(),
            gone: false.into(),
        };
        let mut path = DataPath::new(wire, mem, irq, rxq, txq);
        let name = format!("virtio-net-{}", self.tap.name());
        let worker = Worker::spawn_poll(name, fds, move |ready, interest| {
            if ready[0] != 0 {
                let _ = rx_evt.read();
            }
            if ready[1] != 0 {
                let _ = tx_evt.read();
            }
            if ready[1] != 0 || ready[2] & libc::POLLOUT != 0 {
                path.process_tx();
            }
            if ready[2] & (libc::POLLIN | libc::POLLOUT) == 0
                && ready[2] & (libc::POLLERR | libc::POLLHUP) != 0
            {
                path.wire.gone("it hung up");
            }
            if !path.wire.is_gone() && (ready[0] != 0 || ready[2] & libc::POLLIN != 0) {
                path.process_rx();
            }
            interest[2] = if path.wire.is_gone() {
                -1
            } else {
                let rx = if path.rx_blocked { 0 } else { libc::POLLIN };
                let tx = if path.wire.tap.backlogged() {
                    libc::POLLOUT
                } else {
                    0
                };
                rx | tx
            };
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.worker.take();
        true
    }
    fn set_link(&mut self, up: bool) -> Option<bool> {
        let status = if up {
            u16::try_from(VIRTIO_NET_S_LINK_UP).expect("1")
        } else {
            0
        };
        self.link.store(up, Ordering::SeqCst);
        let old = u16::from_le_bytes([self.config[6], self.config[7]]);
        self.config[6..8].copy_from_slice(&status.to_le_bytes());
        Some(old != status)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.worker.take();
        let s = &self.stats;
        let (tx, rx) = (
            s.tx_dropped.load(Ordering::Relaxed),
            s.rx_dropped.load(Ordering::Relaxed),
        );
        if tx + rx > 0 {
            log::info!(
                "virtio-net {}: {tx} sent and {rx} received frames were dropped",
                self.tap.name()
            );
        }
    }
}

/// Writes a frame that came without a header (from a stream) into guest buffers after a
/// zeroed header; returns its length with the header, as a TAP read gives it (if that is
/// more than `segs` hold, nothing is written). The buffers were checked to be in guest
/// memory when they were taken.
fn put_frame(mem: &GuestMemoryMmap, segs: &[Segment], frame: &[u8]) -> usize {
    let len = HDR_LEN + frame.len();
    if len <= total(segs)
        && let Some((hdr, rest)) = split(segs, HDR_LEN)
    {
        scatter(mem, &hdr, &[0; HDR_LEN]);
        scatter(mem, &rest, frame);
    }
    len
}

/// The queues and the TAP, owned by the worker thread.
struct DataPath {
    wire: Wire,
    mem: Memory,
    irq: Arc<dyn Interrupt>,
    rxq: Queue,
    txq: Queue,
    /// Receive chains taken from the ring before a frame is there for them, in ring order,
    /// with the bytes they hold together: the next frame is read straight into them.
    held: VecDeque<(u16, Vec<Segment>)>,
    held_room: usize,
    /// The guest has no receive buffers (or too few): the TAP is not polled until it adds
    /// some.
    rx_blocked: bool,
}

impl DataPath {
    fn new(wire: Wire, mem: Memory, irq: Arc<dyn Interrupt>, rxq: Queue, txq: Queue) -> DataPath {
        DataPath {
            wire,
            mem,
            irq,
            rxq,
            txq,
            held: VecDeque::new(),
            held_room: 0,
            rx_blocked: false,
        }
    }

    /// Sends every frame the guest queued to the TAP, or to the socket until it takes no
    /// more (the rest wait in the queue until it does).
    fn process_tx(&mut self) {
        let mem = self.mem.memory();
        let wire = &self.wire;
        if !wire.flush() {
            return;
        }
        let served = queue::for_each_chain(&mut self.txq, &*mem, |q, chain| {
            let head = chain.head_index();
            wire.send(chain, &mem);
            if let Err(e) = q.add_used(&*mem, head, 0) {
                crate::guest_warn!("virtio-net: cannot complete tx descriptor {head}: {e}");
            }
            if wire.tap.backlogged() {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        });
        match served {
            Ok(true) if self.txq.needs_notification(&*mem).unwrap_or(true) => {
                self.irq.trigger(VIRTIO_MMIO_INT_VRING);
            }
            Ok(_) => {}
            Err(e) => super::broken_queue(&mut self.txq, self.irq.as_ref(), &e),
        }
    }

    /// Reads frames from the TAP straight into the guest's receive buffers until one side
    /// runs dry.
    fn process_rx(&mut self) {
        let mem = self.mem.memory();
        if !self.rxq.ready() {
            // Never set up, or stopped as broken: frames wait in the TAP until a reset.
            self.rx_blocked = true;
            return;
        }
        self.rx_blocked = false;
        if let Err(e) = self.rxq.disable_notification(&*mem) {
            crate::guest_warn!("virtio-net: bad rx used ring: {e}");
            return;
        }
        let used_before = self.rxq.next_used();
        loop {
            match self.hold_buffers(&mem) {
                Ok(true) => {}
                Ok(false) => {
                    self.rx_blocked = true;
                    break;
                }
                Err(e) => {
                    super::broken_queue(&mut self.rxq, self.irq.as_ref(), &e);
                    self.rx_blocked = true;
                    return;
                }
            }
            // What the largest frame needs, in as many buffers as one readv takes.
            let mut segs = Vec::new();
            let mut room = 0;
            for &seg in self.held.iter().flat_map(|(_, segs)| segs) {
                if room >= HDR_LEN + MAX_FRAME || segs.len() == IOV_MAX - 1 {
                    break;
                }
                segs.push(seg);
                room += seg.1;
            }
            let n = match self.wire.tap.recv(&mem, &segs) {
                Ok(n) if n < HDR_LEN + ETH_HLEN => {
                    self.wire.stats.drop_frame(true, "runt frame from the host");
                    continue;
                }
                Ok(_) if !self.wire.link_up() => {
                    self.wire
                        .stats
                        .drop_frame(true, "the link is down (set_link)");
                    continue;
                }
                Ok(n) if n > room => {
                    // The buffers stay for the next frame.
                    self.wire
                        .stats
                        .drop_frame(true, "larger than the guest's receive buffer");
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if !matches!(*self.wire.tap, Backend::Tap(_)) {
                        // Closed, out of step, or the switch is gone: nothing more can
                        // be read from it.
                        self.wire.gone(&e.to_string());
                    } else {
                        crate::guest_warn!("virtio-net {}: TAP read: {e}", self.wire.tap.name());
                    }
                    break;
                }
            };
            if let Err(e) = self.complete_frame(&mem, n) {
                super::broken_queue(&mut self.rxq, self.irq.as_ref(), &e);
                self.rx_blocked = true;
                return;
            }
            self.wire.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        }
        if self.rxq.next_used() != used_before
            && queue::needs_notification_since(&self.rxq, &*mem, used_before)
        {
            self.irq.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// Takes receive chains from the ring until they hold the largest frame (with mergeable
    /// buffers; without, one chain holds one frame), or the guest has handed over the whole
    /// ring. Ok(false) if that is not so yet: notifications are on, and the guest's next
    /// buffers wake the worker. A chain that cannot take a frame (device-readable buffers,
    /// no room for the header, outside guest memory) goes back empty at once.
    fn hold_buffers(&mut self, mem: &GuestMemoryMmap) -> Result<bool, queue::QueueError> {
        let mergeable = self.wire.has(VIRTIO_NET_F_MRG_RXBUF);
        let size = usize::from(self.rxq.size());
        let mut returned = Vec::new();
        let mut rechecked = false;
        // Every pop takes a new ring entry, so at most a ring's worth of them.
        let result = loop {
            let enough = if mergeable {
                self.held_room >= HDR_LEN + MAX_FRAME || self.held.len() >= size
            } else {
                !self.held.is_empty()
            };
            if enough {
                break Ok(true);
            }
            if returned.len() >= size {
                break Ok(false);
            }
            let chain = match queue::pop(&mut self.rxq, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => match self.rxq.enable_notification(mem) {
                    // Buffers arrived meanwhile: look once more.
                    Ok(true) if !rechecked => {
                        rechecked = true;
                        continue;
                    }
                    Ok(true) => break Err(queue::QueueError::Stuck),
                    Ok(false) => break Ok(false),
                    Err(e) => break Err(e.into()),
                },
                Err(e) => break Err(e),
            };
            rechecked = false;
            let head = chain.head_index();
            let bufs = ChainBuffers::of(chain);
            let room = total(&bufs.writable);
            let why = if !bufs.readable.is_empty() {
                Some("has device-readable buffers")
            } else if room < HDR_LEN {
                Some("is shorter than a header")
            } else if GuestIovecs::new(mem, &bufs.writable).is_err() {
                Some("is outside guest memory")
            } else {
                None
            };
            if let Some(why) = why {
                crate::guest_warn!("virtio-net: rx chain {head} {why}; returned empty");
                returned.push((head, 0));
                continue;
            }
            self.held_room += room;
            self.held.push_back((head, bufs.writable));
        };
        if !returned.is_empty() {
            queue::add_used_together(&mut self.rxq, mem, &returned)?;
        }
        result
    }

    /// Completes the held chains that the frame of `n` bytes, just read into them, filled
    /// (`n` is at most what they hold): all at once, with their count in the header's
    /// num_buffers, so that the driver never sees the frame's first buffer before the rest.
    fn complete_frame(&mut self, mem: &GuestMemoryMmap, n: usize) -> Result<(), queue::QueueError> {
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut done = 0;
        for (head, segs) in &self.held {
            if done >= n {
                break;
            }
            let take = total(segs).min(n - done);
            done += take;
            used.push((*head, u32::try_from(take).unwrap_or(u32::MAX))); // at most 64 KiB
        }
        // At most the queue size (a u16), as the chains held are.
        let num_buffers = u16::try_from(used.len()).unwrap_or(u16::MAX);
        // The first chain holds the header (each holds at least one).
        if let Some((_, first)) = self.held.front()
            && let Some((_, at)) = split(first, NUM_BUFFERS_AT)
        {
            scatter(mem, &at, &num_buffers.to_le_bytes());
        }
        for _ in 0..used.len() {
            if let Some((_, segs)) = self.held.pop_front() {
                self.held_room -= total(&segs);
            }
        }
        queue::add_used_together(&mut self.rxq, mem, &used)
    }
}

/// The host side of a device: the TAP or stream, the frame counters and the negotiated
/// features.
struct Wire {
    tap: Arc<Backend>,
    stats: Arc<Stats>,
    acked: u64,
    link: Arc<AtomicBool>,
    /// The backend is closed or broken: nothing is read from it, frames to it are dropped.
    gone: std::cell::Cell<bool>,
}

impl Wire {
    fn has(&self, f: u32) -> bool {
        self.acked & bit(f) != 0
    }

    fn is_gone(&self) -> bool {
        self.gone.get()
    }

    fn link_up(&self) -> bool {
        self.link.load(Ordering::Relaxed)
    }

    /// The backend cannot be used any more (said once).
    fn gone(&self, why: &str) {
        if !self.gone.replace(true) {
            log::error!(
                "virtio-net {}: the connection to the host is lost ({why}); \
                 the guest's network is down",
                self.tap.name()
            );
        }
    }

    /// Sends what waits for a stream or a switch; true when more frames may go.
    fn flush(&self) -> bool {
        let flushed = match &*self.tap {
            _ if self.is_gone() => return true,
            Backend::Stream(s) => s.flush(),
            Backend::Vde(v) => v.flush(),
            Backend::Tap(_) => return true,
        };
        flushed.unwrap_or_else(|e| {
            self.gone(&e.to_string());
            true
        })
    }

    /// Writes one guest frame (header + data) to the TAP, or drops it.
    fn send<M>(&self, chain: DescriptorChain<M>, mem: &GuestMemoryMmap)
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        if !self.link_up() {
            return self.stats.drop_frame(false, "the link is down (set_link)");
        }
        let bufs = ChainBuffers::of(chain);
        if !bufs.writable.is_empty() {
            return self
                .stats
                .drop_frame(false, "device-writable buffer in a tx chain");
        }
        let segs = bufs.readable;
        let len = total(&segs);
        if len < HDR_LEN + ETH_HLEN {
            return self
                .stats
                .drop_frame(false, "shorter than a header and an Ethernet header");
        }
        if len > HDR_LEN + MAX_FRAME {
            return self.stats.drop_frame(false, "larger than 64 KiB");
        }
        let mut hdr = [0u8; HDR_LEN];
        if !gather(mem, &segs, &mut hdr) {
            return self.stats.drop_frame(false, "buffer outside guest memory");
        }
        if let Err(why) = self.check_tx_header(&hdr, len - HDR_LEN) {
            return self.stats.drop_frame(false, why);
        }
        let tap = match &*self.tap {
            _ if self.is_gone() => return self.stats.drop_frame(false, "the host side is gone"),
            // Without the header: length-prefixed on a stream, a datagram to a switch.
            Backend::Stream(_) | Backend::Vde(_) => {
                let Some((_, frame)) = split(&segs, HDR_LEN) else {
                    return self.stats.drop_frame(false, "buffer outside guest memory");
                };
                if !self
                    .tap
                    .take_frame(len - HDR_LEN, |buf| gather(mem, &frame, buf))
                {
                    return self.stats.drop_frame(false, "buffer outside guest memory");
                }
                self.flush();
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Backend::Tap(tap) => tap,
        };
        let Ok(iovs) = GuestIovecs::new(mem, &segs) else {
            return self.stats.drop_frame(false, "buffer outside guest memory");
        };
        if let Err(e) = iovs.writev(tap.file.as_raw_fd()) {
            let why = if e.kind() == io::ErrorKind::WouldBlock {
                "the TAP's queue is full".to_owned()
            } else {
                format!("the TAP refused it: {e}")
            };
            return self.stats.drop_frame(false, &why);
        }
        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// A transmit header asks only for what was negotiated, and its offsets lie in the frame.
    fn check_tx_header(&self, h: &[u8; HDR_LEN], frame_len: usize) -> Result<(), &'static str> {
        let flags = u32::from(h[0]);
        let gso_type = u32::from(h[1]);
        let gso_size = u16::from_le_bytes([h[4], h[5]]);
        let csum_start = usize::from(u16::from_le_bytes([h[6], h[7]]));
        let csum_offset = usize::from(u16::from_le_bytes([h[8], h[9]]));
        if flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
            return Err("unknown header flags");
        }
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            if !self.has(VIRTIO_NET_F_CSUM) {
                return Err("checksum offload not negotiated");
            }
            if csum_start + csum_offset + 2 > frame_len {
                return Err("checksum offsets outside the frame");
            }
        }
        let ecn = gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        let need = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE if !ecn => return Ok(()),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            _ => return Err("unknown segmentation type"),
        };
        if !self.has(need) || (ecn && !self.has(VIRTIO_NET_F_HOST_ECN)) {
            return Err("segmentation offload not negotiated");
        }
        if gso_size == 0 || flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
            return Err("segmentation without a segment size or checksum offload");
        }
        Ok(())
    }
}

/// One frame that `recv` reads into `room` bytes of guest memory (the header's bytes set
/// beforehand, to see them zeroed): what landed there, header included, or the error.
#[cfg(test)]
fn read_frame(
    room: usize,
    recv: impl FnOnce(&GuestMemoryMmap, &[Segment]) -> io::Result<usize>,
) -> io::Result<Vec<u8>> {
    use vm_memory::{Bytes, GuestAddress};
    let m = super::test_utils::memory(1 << 20);
    m.write_slice(&[0xff; HDR_LEN], GuestAddress(0)).unwrap();
    let n = recv(&m, &[(GuestAddress(0), room)])?;
    assert!(n <= room, "{n} bytes announced, {room} bytes of room");
    let mut got = vec![0; n];
    m.read_slice(&mut got, GuestAddress(0)).unwrap();
    Ok(got)
}

#[cfg(test)]
mod tests;
