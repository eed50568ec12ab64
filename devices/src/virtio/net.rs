//! virtio-net on a TAP device the host created beforehand (or an inherited TAP/macvtap fd).
//!
//! nixvm never creates or configures interfaces: it attaches to an existing TAP by name
//! (TUNSETIFF, which needs no privilege when the TAP belongs to nixvm's user) or takes an
//! open fd. Frames carry the 12-byte virtio-net header on both sides (IFF_VNET_HDR with
//! TUNSETVNETHDRSZ), so checksum and segmentation offloads pass through untouched; the
//! offloads the guest accepts are set on the TAP (TUNSETOFFLOAD).
//!
//! One worker thread per device polls the two queues' eventfds and the TAP. While the guest
//! has no receive buffers, the TAP is not polled (frames wait in its own queue) until the
//! guest adds buffers. Bad frames from the guest are dropped and counted.
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::buffers::{ChainBuffers, GuestIovecs, gather, scatter, total};
use super::queue;
use super::worker::Worker;
use super::{
    ActivateError, F_EVENT_IDX, GuestMemoryMmap, Interrupt, Memory, VIRTIO_ID_NET,
    VIRTIO_MMIO_INT_VRING, VirtioDevice, read_config_bytes,
};

const QUEUE_SIZE: u16 = 256;
/// The virtio-net header with F_VERSION_1: `virtio_net_hdr_v1`, num_buffers included.
pub const HDR_LEN: usize = 12;
/// The largest frame: a 64 KiB IP packet with an Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = 65550;
const ETH_HLEN: usize = 14;

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_TSO_ECN: u32 = 0x08;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/net/tun")]
    Tun(#[source] io::Error),
    #[error(
        "there is no network interface {0:?} (nixvm does not create TAP devices: \
         `ip tuntap add {0} mode tap user $USER vnet_hdr` does)"
    )]
    NoSuchInterface(String),
    #[error("network interface {0:?} is not a TAP device")]
    NotTap(String),
    #[error(
        "not allowed to attach to TAP {0:?}: it belongs to another user \
         (create it with `ip tuntap add {0} mode tap user $USER vnet_hdr`)"
    )]
    TapPermission(String),
    #[error("TAP {0:?} is in use by another process")]
    TapBusy(String),
    #[error("cannot attach to TAP {name:?}")]
    TapAttach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("fd {0} is not an open file descriptor")]
    FdNotOpen(RawFd),
    #[error("fd {0} is not a TAP or macvtap device")]
    FdNotTap(RawFd),
    #[error("the TAP on fd {0} was opened without vnet_hdr (IFF_VNET_HDR), which nixvm needs")]
    FdNoVnetHdr(RawFd),
    #[error("cannot set up TAP {name:?}")]
    TapSetup {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// An attached TAP (or macvtap) queue, non-blocking, with the virtio-net header on.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP `name`, as a multi-queue TAP if it was created so.
    pub fn open(name: &str) -> Result<Tap, Error> {
        let cname = std::ffi::CString::new(name).map_err(|_| Error::NotTap(name.to_owned()))?;
        if name.len() >= libc::IFNAMSIZ {
            return Err(Error::NoSuchInterface(name.to_owned()));
        }
        // SAFETY: if_nametoindex reads the NUL-terminated string only.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            // TUNSETIFF would create it (given the privilege): never do that.
            return Err(Error::NoSuchInterface(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::Tun)?;
        let mut req = IfReq::default();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let base = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        let mut err = None;
        // A multi_queue TAP refuses a single-queue attach with EINVAL, and the other way round.
        for flags in [base, base | IFF_MULTI_QUEUE] {
            req.flags = flags;
            // SAFETY: TUNSETIFF reads an ifreq, which `req` is (with padding to its full size).
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } == 0 {
                let tap = Tap {
                    file,
                    name: name.to_owned(),
                };
                tap.set_vnet_hdr_size()?;
                return Ok(tap);
            }
            err = Some(io::Error::last_os_error());
            if err.as_ref().and_then(|e| e.raw_os_error()) != Some(libc::EINVAL) {
                break;
            }
        }
        let e = err.expect("one attempt made");
        let name = name.to_owned();
        Err(match e.raw_os_error() {
            Some(libc::EPERM) => Error::TapPermission(name),
            Some(libc::EBUSY) => Error::TapBusy(name),
            Some(libc::EINVAL) => Error::NotTap(name),
            _ => Error::TapAttach { name, source: e },
        })
    }

    /// Takes over an inherited, open TAP or macvtap fd.
    pub fn from_fd(fd: RawFd) -> Result<Tap, Error> {
        // SAFETY: F_GETFD only inspects the descriptor.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::FdNotOpen(fd));
        }
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes an ifreq into `req`; fds of other kinds refuse it.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } != 0 || req.flags & IFF_TAP == 0 {
            return Err(Error::FdNotTap(fd));
        }
        if req.flags & IFF_VNET_HDR == 0 {
            // A macvtap queue may turn it on now; an attached TAP cannot.
            req.flags |= IFF_VNET_HDR;
            // SAFETY: as above, TUNSETIFF reads the ifreq.
            if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) } != 0 {
                return Err(Error::FdNoVnetHdr(fd));
            }
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        // SAFETY: the fd is open (checked) and nixvm was handed it to own.
        let file = unsafe { File::from_raw_fd(fd) };
        let setup = |source| Error::TapSetup {
            name: name.clone(),
            source,
        };
        // SAFETY: fcntl flag calls on our own descriptor.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(setup(io::Error::last_os_error()));
            }
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        let tap = Tap { file, name };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_vnet_hdr_size(&self) -> Result<(), Error> {
        let size = libc::c_int::try_from(HDR_LEN).expect("12");
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } != 0 {
            return Err(Error::TapSetup {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the TAP which offloaded frames the guest accepts (TUN_F_* flags).
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A locally administered unicast MAC derived from the interface name: 02 followed by the
/// first five bytes of the name's 64-bit FNV-1a hash. The same TAP gets the same MAC on
/// every start, so the guest's DHCP leases and neighbours stay valid.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

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

/// The virtio-net device.
pub struct Net {
    tap: Arc<Tap>,
    config: [u8; 12],
    acked: u64,
    stats: Arc<Stats>,
    worker: Option<Worker>,
}

impl Net {
    /// A device on `tap` with the given MAC (else one derived from the TAP's name).
    pub fn new(tap: Tap, mac: Option<[u8; 6]>) -> Net {
        let mac = mac.unwrap_or_else(|| mac_from_name(tap.name()));
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&mac);
        let up = u16::try_from(VIRTIO_NET_S_LINK_UP).expect("1");
        config[6..8].copy_from_slice(&up.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        Net {
            tap: Arc::new(tap),
            config,
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
        F_EVENT_IDX
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CSUM)
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
        if let Err(e) = self.tap.set_offload(offload) {
            log::warn!("virtio-net {}: cannot set offloads: {e}", self.tap.name());
        }
        let mut q = queues.into_iter();
        let (Some((rxq, rx_evt)), Some((txq, tx_evt))) = (q.next(), q.next()) else {
            return Err(ActivateError::BadQueue(0));
        };
        let fds = vec![
            (rx_evt.as_raw_fd(), libc::POLLIN),
            (tx_evt.as_raw_fd(), libc::POLLIN),
            (self.tap.file.as_raw_fd(), libc::POLLIN),
        ];
        let mut path = DataPath::new(self.tap.clone(), mem, irq, rxq, txq, acked, self.stats());
        let name = format!("virtio-net-{}", self.tap.name());
        let worker = Worker::spawn_poll(name, fds, move |ready, interest| {
            if ready[0] != 0 {
                let _ = rx_evt.read();
            }
            if ready[1] != 0 {
                let _ = tx_evt.read();
                path.process_tx();
            }
            if ready[2] & (libc::POLLERR | libc::POLLHUP) != 0 {
                log::error!("virtio-net {}: the TAP is gone", path.wire.tap.name());
                interest[2] = -1;
                return;
            }
            if ready[0] != 0 || ready[2] != 0 {
                path.process_rx();
            }
            interest[2] = if path.rx_blocked { 0 } else { libc::POLLIN };
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.worker.take();
        true
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

/// What a receive attempt did with the frame.
enum Rx {
    Delivered,
    NoBuffers,
    Dropped,
    /// The receive queue is broken: it is not served again until a reset.
    Broken(queue::QueueError),
}

/// The queues and the TAP, owned by the worker thread.
struct DataPath {
    wire: Wire,
    mem: Memory,
    irq: Arc<dyn Interrupt>,
    rxq: Queue,
    txq: Queue,
    /// One frame read from the TAP (header included) and its length; a frame that found no
    /// buffers waits here until the guest adds some.
    frame: Vec<u8>,
    pending: usize,
    /// The guest has no receive buffers: the TAP is not polled until it adds some.
    rx_blocked: bool,
}

impl DataPath {
    fn new(
        tap: Arc<Tap>,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        rxq: Queue,
        txq: Queue,
        acked: u64,
        stats: Arc<Stats>,
    ) -> DataPath {
        DataPath {
            wire: Wire { tap, stats, acked },
            mem,
            irq,
            rxq,
            txq,
            frame: vec![0; HDR_LEN + MAX_FRAME],
            pending: 0,
            rx_blocked: false,
        }
    }

    /// Sends every frame the guest queued to the TAP.
    fn process_tx(&mut self) {
        let mem = self.mem.memory();
        let wire = &self.wire;
        let served = queue::for_each_chain(&mut self.txq, &*mem, |q, chain| {
            let head = chain.head_index();
            wire.send(chain, &mem);
            if let Err(e) = q.add_used(&*mem, head, 0) {
                log::warn!("virtio-net: cannot complete tx descriptor {head}: {e}");
            }
            std::ops::ControlFlow::Continue(())
        });
        match served {
            Ok(true) if self.txq.needs_notification(&*mem).unwrap_or(true) => {
                self.irq.trigger(VIRTIO_MMIO_INT_VRING);
            }
            Ok(_) => {}
            Err(e) => super::broken_queue(&mut self.txq, self.irq.as_ref(), &e),
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers until one side runs dry.
    fn process_rx(&mut self) {
        let mem = self.mem.memory();
        if !self.rxq.ready() {
            // Never set up, or stopped as broken: frames wait in the TAP until a reset.
            self.rx_blocked = true;
            return;
        }
        self.rx_blocked = false;
        let mut used_any = false;
        if let Err(e) = self.rxq.disable_notification(&*mem) {
            log::warn!("virtio-net: bad rx used ring: {e}");
            return;
        }
        loop {
            if self.pending == 0 {
                // SAFETY: reading into our own buffer of that length.
                let n = unsafe {
                    libc::read(
                        self.wire.tap.file.as_raw_fd(),
                        self.frame.as_mut_ptr().cast(),
                        self.frame.len(),
                    )
                };
                match usize::try_from(n) {
                    Ok(n) if n < HDR_LEN + ETH_HLEN => {
                        self.wire.stats.drop_frame(true, "runt frame from the TAP");
                        continue;
                    }
                    Ok(n) => self.pending = n,
                    Err(_) => {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        if e.kind() != io::ErrorKind::WouldBlock {
                            log::warn!("virtio-net {}: TAP read: {e}", self.wire.tap.name());
                        }
                        break;
                    }
                }
            }
            match self.deliver(&mem) {
                Rx::Delivered => {
                    self.pending = 0;
                    used_any = true;
                    self.wire.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                }
                Rx::Dropped => {
                    self.pending = 0;
                    used_any = true;
                }
                Rx::NoBuffers => {
                    self.rx_blocked = true;
                    break;
                }
                Rx::Broken(e) => {
                    super::broken_queue(&mut self.rxq, self.irq.as_ref(), &e);
                    self.rx_blocked = true;
                    return;
                }
            }
        }
        if used_any && self.rxq.needs_notification(&*mem).unwrap_or(true) {
            self.irq.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// Puts the pending frame into receive buffers: as many chains as it needs with mergeable
    /// buffers, else one chain that must hold it whole.
    fn deliver(&mut self, mem: &GuestMemoryMmap) -> Rx {
        let len = self.pending;
        let mergeable = self.wire.has(VIRTIO_NET_F_MRG_RXBUF);
        let start = self.rxq.next_avail();
        let mut chains: Vec<(u16, Vec<(GuestAddress, usize)>)> = Vec::new();
        let mut room = 0usize;
        let mut malformed = Vec::new();
        // One frame never takes more chains than the ring holds (zero-length buffers would).
        let limit = usize::from(self.rxq.size());
        let mut rechecked = false;
        while room < len
            && (mergeable || chains.is_empty())
            && chains.len() + malformed.len() < limit
        {
            let chain = match queue::pop(&mut self.rxq, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    match self.rxq.enable_notification(mem) {
                        // Buffers arrived meanwhile: look once more.
                        Ok(true) if !rechecked => {
                            rechecked = true;
                            continue;
                        }
                        Ok(true) => return Rx::Broken(queue::QueueError::Stuck),
                        Ok(false) => {}
                        Err(e) => return Rx::Broken(e.into()),
                    }
                    // Put back what was taken; the guest's next buffers wake us.
                    self.rxq.set_next_avail(start);
                    return Rx::NoBuffers;
                }
                Err(e) => return Rx::Broken(e),
            };
            rechecked = false;
            let head = chain.head_index();
            let bufs = ChainBuffers::of(chain);
            if !bufs.readable.is_empty() {
                // Handed back empty with this frame (not before: a rollback re-reads it).
                malformed.push(head);
                continue;
            }
            room += total(&bufs.writable);
            chains.push((head, bufs.writable));
        }
        for head in malformed {
            log::warn!("virtio-net: rx chain {head} has device-readable buffers; returned empty");
            let _ = self.rxq.add_used(mem, head, 0);
        }
        if room < len {
            // Without mergeable buffers a frame larger than the guest's buffer cannot go in.
            for (head, _) in chains {
                let _ = self.rxq.add_used(mem, head, 0);
            }
            self.wire
                .stats
                .drop_frame(true, "larger than the guest's receive buffer");
            return Rx::Dropped;
        }
        // At most the queue size (a u16), as `limit` keeps it.
        let num_buffers = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        self.frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut done = 0;
        for (head, segs) in chains {
            let n = total(&segs).min(len - done);
            let mut written = 0;
            if done < len {
                if scatter(mem, &segs, &self.frame[done..done + n]) {
                    done += n;
                    written = u32::try_from(n).unwrap_or(0); // at most 64 KiB
                } else {
                    log::warn!("virtio-net: rx buffer outside guest memory");
                    done = len + 1; // the frame is lost; the rest go back empty
                }
            }
            if let Err(e) = self.rxq.add_used(mem, head, written) {
                log::warn!("virtio-net: cannot complete rx descriptor {head}: {e}");
            }
        }
        if done != len {
            self.wire
                .stats
                .drop_frame(true, "receive buffer outside guest memory");
            return Rx::Dropped;
        }
        Rx::Delivered
    }
}

/// The TAP side of a device: the TAP, the frame counters and the negotiated features.
struct Wire {
    tap: Arc<Tap>,
    stats: Arc<Stats>,
    acked: u64,
}

impl Wire {
    fn has(&self, f: u32) -> bool {
        self.acked & bit(f) != 0
    }

    /// Writes one guest frame (header + data) to the TAP, or drops it.
    fn send<M>(&self, chain: DescriptorChain<M>, mem: &GuestMemoryMmap)
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
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
        let Ok(iovs) = GuestIovecs::new(mem, &segs) else {
            return self.stats.drop_frame(false, "buffer outside guest memory");
        };
        if let Err(e) = iovs.writev(self.tap.file.as_raw_fd()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{CountingIrq, memory};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    /// A socketpair standing in for the TAP: datagrams keep frame boundaries as a TAP does.
    fn fake_tap() -> (Arc<Tap>, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills the two-element array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both fds are new and ours.
        let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        (
            Arc::new(Tap {
                file: a,
                name: "test0".into(),
            }),
            b,
        )
    }

    fn all_features() -> u64 {
        Net::new(
            Tap {
                file: File::open("/dev/null").unwrap(),
                name: "x".into(),
            },
            None,
        )
        .avail_features()
    }

    fn path(
        mem: &Memory,
        rx: &MockSplitQueue<GuestMemoryMmap>,
        tx: &MockSplitQueue<GuestMemoryMmap>,
        acked: u64,
    ) -> (DataPath, File, Arc<CountingIrq>) {
        let (tap, other) = fake_tap();
        let irq = Arc::new(CountingIrq::default());
        let p = DataPath::new(
            tap,
            mem.clone(),
            irq.clone(),
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            acked,
            Arc::default(),
        );
        (p, other, irq)
    }

    fn recv(f: &File) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 70000];
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::read(f.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        let n = usize::try_from(n).ok()?;
        b.truncate(n);
        Some(b)
    }

    fn send(f: &File, b: &[u8]) {
        // SAFETY: writing our own buffer.
        let n = unsafe { libc::write(f.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        assert_eq!(usize::try_from(n).unwrap(), b.len());
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
            .collect()
    }

    #[test]
    fn tx_sends_frames_and_drops_bad_ones() {
        let mem = Memory::new(memory(4 << 20));
        let m = mem.memory();
        let (rx, tx) = (
            MockSplitQueue::create(&*m, GuestAddress(0), 16),
            MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
        );
        let (mut p, other, irq) = path(&mem, &rx, &tx, all_features());
        let good = [vec![0u8; HDR_LEN], frame(100, 1)].concat();
        m.write_slice(&good[..HDR_LEN], GuestAddress(0x10_0000))
            .unwrap();
        m.write_slice(&good[HDR_LEN..], GuestAddress(0x11_0000))
            .unwrap();
        // Header with unknown flags.
        m.write_slice(&[0x80; HDR_LEN], GuestAddress(0x12_0000))
            .unwrap();
        let d = |a: u64, l: u32, f: u16, n: u16| RawDescriptor::from(Descriptor::new(a, l, f, n));
        tx.add_desc_chains(
            &[
                // 0-1: a good frame split over two descriptors.
                d(0x10_0000, 12, NEXT, 1),
                d(0x11_0000, 100, 0, 0),
                // 2: too short.
                d(0x10_0000, 12, 0, 0),
                // 3-4: a device-writable buffer.
                d(0x10_0000, 12, NEXT, 4),
                d(0x11_0000, 100, WRITE, 0),
                // 5: garbage header.
                d(0x12_0000, 200, 0, 0),
                // 6: over 64 KiB.
                d(0x20_0000, 70000, 0, 0),
                // 7: outside guest memory.
                d(0xf000_0000, 200, 0, 0),
            ],
            0,
        )
        .unwrap();
        p.process_tx();
        assert_eq!(recv(&other).unwrap(), good);
        assert!(recv(&other).is_none(), "only the good frame went out");
        assert_eq!(tx.used().idx().load(), 6, "every chain completed");
        assert_eq!(p.wire.stats.tx_frames.load(Ordering::Relaxed), 1);
        assert_eq!(p.wire.stats.tx_dropped.load(Ordering::Relaxed), 5);
        assert_eq!(irq.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn tx_header_checks() {
        let mem = Memory::new(memory(1 << 20));
        let m = mem.memory();
        let q = MockSplitQueue::create(&*m, GuestAddress(0), 16);
        let base = VIRTIO_F_VERSION_1_BIT;
        let (mut p, _other, _) = path(&mem, &q, &q, base);
        let h = |flags: u32, gso: u32, size: u16, start: u16, off: u16| {
            let mut b = [0u8; HDR_LEN];
            b[0] = u8::try_from(flags).unwrap();
            b[1] = u8::try_from(gso).unwrap();
            b[4..6].copy_from_slice(&size.to_le_bytes());
            b[6..8].copy_from_slice(&start.to_le_bytes());
            b[8..10].copy_from_slice(&off.to_le_bytes());
            b
        };
        let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        assert!(p.wire.check_tx_header(&h(0, 0, 0, 0, 0), 60).is_ok());
        assert!(
            p.wire.check_tx_header(&h(csum, 0, 0, 34, 16), 60).is_err(),
            "no CSUM"
        );
        p.wire.acked = all_features();
        assert!(p.wire.check_tx_header(&h(csum, 0, 0, 34, 16), 60).is_ok());
        assert!(
            p.wire.check_tx_header(&h(csum, 0, 0, 50, 16), 60).is_err(),
            "past the end"
        );
        let tcp4 = VIRTIO_NET_HDR_GSO_TCPV4;
        assert!(
            p.wire
                .check_tx_header(&h(csum, tcp4, 1448, 34, 16), 9000)
                .is_ok()
        );
        assert!(
            p.wire
                .check_tx_header(&h(csum, tcp4, 0, 34, 16), 9000)
                .is_err()
        );
        assert!(
            p.wire
                .check_tx_header(&h(0, tcp4, 1448, 0, 0), 9000)
                .is_err()
        );
        let udp = VIRTIO_NET_HDR_GSO_UDP;
        assert!(
            p.wire
                .check_tx_header(&h(csum, udp, 1448, 34, 6), 9000)
                .is_err()
        );
        assert!(
            p.wire
                .check_tx_header(&h(0, VIRTIO_NET_HDR_GSO_ECN, 0, 0, 0), 60)
                .is_err()
        );
    }

    const VIRTIO_F_VERSION_1_BIT: u64 = super::super::F_VERSION_1;

    #[test]
    fn rx_merges_buffers_and_waits_for_them() {
        let mem = Memory::new(memory(4 << 20));
        let m = mem.memory();
        let (rx, tx) = (
            MockSplitQueue::create(&*m, GuestAddress(0), 16),
            MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
        );
        let (mut p, other, irq) = path(&mem, &rx, &tx, all_features());
        // No buffers yet: the frame waits and the TAP is no longer polled.
        let big = [vec![0u8; HDR_LEN], frame(3000, 7)].concat();
        send(&other, &big);
        p.process_rx();
        assert!(p.rx_blocked);
        assert_eq!(rx.used().idx().load(), 0);
        // Three 1500-byte buffers: the 3012 bytes take all three.
        let d = |a: u64| RawDescriptor::from(Descriptor::new(a, 1500, WRITE, 0));
        rx.add_desc_chains(&[d(0x10_0000), d(0x20_0000), d(0x30_0000)], 0)
            .unwrap();
        p.process_rx();
        assert!(!p.rx_blocked, "the TAP is empty, not the queue");
        assert_eq!(rx.used().idx().load(), 3);
        let lens: Vec<u32> = (0..3)
            .map(|i| rx.used().ring().ref_at(i).unwrap().load().len())
            .collect();
        assert_eq!(lens, [1500, 1500, 12]);
        let mut got = vec![0u8; 3012];
        for (i, a) in [0x10_0000u64, 0x20_0000, 0x30_0000].iter().enumerate() {
            let n = usize::try_from(lens[i]).unwrap();
            m.read_slice(&mut got[i * 1500..i * 1500 + n], GuestAddress(*a))
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[HDR_LEN..], big[HDR_LEN..]);
        assert_eq!(irq.0.lock().unwrap().len(), 1);
        assert_eq!(p.wire.stats.rx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn rx_without_mergeable_buffers_drops_what_does_not_fit() {
        let mem = Memory::new(memory(4 << 20));
        let m = mem.memory();
        let (rx, tx) = (
            MockSplitQueue::create(&*m, GuestAddress(0), 16),
            MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
        );
        let acked = all_features() & !bit(VIRTIO_NET_F_MRG_RXBUF);
        let (mut p, other, _) = path(&mem, &rx, &tx, acked);
        let d = |a: u64, f: u16| RawDescriptor::from(Descriptor::new(a, 1500, f, 0));
        rx.add_desc_chains(
            &[d(0x10_0000, WRITE), d(0x20_0000, 0), d(0x30_0000, WRITE)],
            0,
        )
        .unwrap();
        send(&other, &[vec![0u8; HDR_LEN], frame(3000, 1)].concat());
        let small = [vec![0u8; HDR_LEN], frame(60, 2)].concat();
        send(&other, &small);
        send(&other, &[5u8; 4]); // a runt
        p.process_rx();
        // Big frame: dropped with buffer 0 returned empty; the readable chain 1 returned
        // empty; the small frame in buffer 2.
        assert_eq!(rx.used().idx().load(), 3);
        let e = |i| rx.used().ring().ref_at(i).unwrap().load();
        assert_eq!((e(0).id(), e(0).len()), (0, 0));
        assert_eq!((e(1).id(), e(1).len()), (1, 0));
        assert_eq!((e(2).id(), e(2).len()), (2, 72));
        let mut got = vec![0u8; 72];
        m.read_slice(&mut got, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(got[HDR_LEN..], small[HDR_LEN..]);
        assert_eq!(p.wire.stats.rx_dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn rx_zero_length_buffers_drop_the_frame_not_nixvm() {
        let mem = Memory::new(memory(4 << 20));
        let m = mem.memory();
        let (rx, tx) = (
            MockSplitQueue::create(&*m, GuestAddress(0), 16),
            MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
        );
        let (mut p, other, _) = path(&mem, &rx, &tx, all_features());
        // A full ring of zero-length buffers: the frame cannot go in, and no more than the
        // ring's 16 chains are taken for it.
        let d = |i: u64| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 16, 0, WRITE, 0));
        let descs: Vec<RawDescriptor> = (0..16).map(d).collect();
        rx.add_desc_chains(&descs, 0).unwrap();
        send(&other, &[vec![0u8; HDR_LEN], frame(60, 1)].concat());
        p.process_rx();
        assert_eq!(rx.used().idx().load(), 16, "every chain returned empty");
        assert_eq!(p.wire.stats.rx_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_tx_index_too_far_ahead_needs_a_reset_not_a_spin() {
        let mem = Memory::new(memory(4 << 20));
        let m = mem.memory();
        let (rx, tx) = (
            MockSplitQueue::create(&*m, GuestAddress(0), 16),
            MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
        );
        let (mut p, _other, irq) = path(&mem, &rx, &tx, all_features());
        tx.avail().idx().store(u16::to_le(40));
        p.process_tx();
        assert!(!p.txq.ready(), "the queue is no longer served");
        assert_eq!(
            *irq.0.lock().unwrap(),
            [crate::virtio::VIRTIO_MMIO_INT_CONFIG]
        );
        p.process_tx();
        assert_eq!(irq.0.lock().unwrap().len(), 1, "said once");
    }

    #[test]
    fn config_and_mac() {
        let mac = mac_from_name("tap0");
        assert_eq!(mac[0], 0x02, "locally administered unicast");
        assert_eq!(mac, mac_from_name("tap0"), "stable");
        assert_ne!(mac, mac_from_name("tap1"));
        // README's rule, FNV-1a 64 of the name (computed independently): 02 + its first 5 bytes.
        assert_eq!(mac, [0x02, 0xd9, 0x63, 0xfc, 0xef, 0x07]);
        let (tap, _o) = fake_tap();
        let tap = Arc::try_unwrap(tap).ok().unwrap();
        let n = Net::new(tap, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        let mut c = [0u8; 10];
        n.read_config(0, &mut c);
        assert_eq!(c, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0]);
        assert_ne!(n.avail_features() & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
    }

    #[test]
    fn open_errors_name_the_problem() {
        assert!(matches!(
            Tap::open("nixvm-no-such0"),
            Err(Error::NoSuchInterface(_))
        ));
        assert!(matches!(
            Tap::open("lo"),
            Err(Error::NotTap(_) | Error::Tun(_) | Error::TapPermission(_))
        ));
        assert!(matches!(Tap::from_fd(-1), Err(Error::FdNotOpen(-1))));
        let f = File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        assert!(matches!(Tap::from_fd(fd), Err(Error::FdNotTap(_))));
    }
}
