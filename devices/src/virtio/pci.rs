//! The virtio-pci transport (virtio 1.x "modern" only) with MSI-X.
//!
//! One 32-bit memory BAR holds everything ([`BAR_SIZE`]): the common configuration, the ISR
//! byte, the device configuration, a notification address per queue (the vmm turns each into
//! a KVM ioeventfd) and the MSI-X table and pending bits. Interrupts are MSI-X only (no INTx
//! pin): two vectors, one for configuration changes and one the queues share, each an
//! eventfd the vmm binds to a KVM MSI route. Unlike virtio-mmio, the driver never reads a
//! register to learn why it was interrupted: no exit per interrupt.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::BusDevice;
use crate::lock;
use crate::pci::{ConfigSpace, Identity, MsiRoutes, Msix, PciFunction};

use super::transport::{TransportInterrupt, TransportRegisters, VirtioCommon, low_half};
use super::{
    Interrupt, Memory, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING, VirtioDevice,
};

/// The BAR's layout.
const COMMON: u64 = 0x0000;
const COMMON_LEN: u32 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u32 = 0x1000;
/// Queue N's notification address is `NOTIFY + N * NOTIFY_MULTIPLIER`.
pub const NOTIFY: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
pub const BAR_SIZE: u64 = 0x8000;
/// MSI-X vectors: configuration changes, and the queues (shared). A driver that wants one
/// per queue as well (Linux tries that first) falls back to sharing.
pub const VECTORS: u16 = 2;
/// "No vector" in the vector registers.
const NO_VECTOR: u16 = 0xffff;

/// virtio_pci_cap's cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
/// A window onto BAR 0 through configuration cycles (virtio 1.x, 4.1.4.9: every device has
/// one), for drivers that cannot map the BAR yet (firmware, boot loaders): the driver writes
/// bar, offset and length into the capability, then reading or writing its pci_cfg_data
/// accesses the BAR there.
const CAP_PCI_CFG: u8 = 5;
/// Where in that capability bar, offset, length and pci_cfg_data are.
const WINDOW_BAR: usize = 4;
const WINDOW_OFFSET: usize = 8;
const WINDOW_LENGTH: usize = 12;
const WINDOW_DATA: usize = 16;
const CAP_ID_VENDOR: u8 = 0x09;

/// The PCI IDs of a virtio device: Red Hat's vendor, device 0x1040 + virtio type.
const VENDOR: u16 = 0x1af4;

/// The interrupt of a virtio-pci device: MSI-X vectors by what they signal, and the ISR
/// status (read-to-clear; a driver using MSI-X does not read it).
pub struct PciInterrupt {
    isr: AtomicU32,
    broken: AtomicBool,
    vectors: Vec<EventFd>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    /// What a vhost-user back end signals when the driver gave the queues no vector (it
    /// polls the used rings, as it may): an eventfd nobody waits on.
    unheard: EventFd,
}

impl PciInterrupt {
    fn signal(&self, vector: u16) {
        if let Some(e) = self.vectors.get(usize::from(vector)) {
            if let Err(e) = e.write(1) {
                crate::guest_warn!("virtio-pci: cannot raise an interrupt: {e}");
            }
        }
    }

    fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }
}

impl TransportInterrupt for PciInterrupt {
    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
    fn clear(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.broken.store(false, Ordering::SeqCst);
    }
}

impl Interrupt for PciInterrupt {
    /// Used buffers raise every vector a queue is on (at most the [`VECTORS`]), a
    /// configuration change the configuration vector.
    fn trigger(&self, status: u32) {
        self.isr.fetch_or(status, Ordering::SeqCst);
        if status & VIRTIO_MMIO_INT_VRING != 0 {
            let mut raised = 0u64;
            for q in 0..self.queue_vectors.len() {
                let v = self.queue_vector(q);
                if v < VECTORS && raised & (1 << v) == 0 {
                    raised |= 1 << v;
                    self.signal(v);
                }
            }
        }
        if status & VIRTIO_MMIO_INT_CONFIG != 0 {
            self.signal(self.config_vector.load(Ordering::SeqCst));
        }
    }
    fn needs_reset(&self) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            self.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }
    /// The queues' vector (a vhost-user back end signals every queue through it), or none.
    fn notifier(&self) -> Option<&EventFd> {
        Some(
            self.vectors
                .get(usize::from(self.queue_vector(0)))
                .unwrap_or(&self.unheard),
        )
    }
}

/// Common configuration registers (struct virtio_pci_common_cfg).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
}

pub struct PciTransport {
    common: VirtioCommon<PciInterrupt>,
    config: ConfigSpace,
    /// The configuration space at power-on (a machine reset restores it).
    pristine: ConfigSpace,
    msix: Msix,
    /// The VIRTIO_PCI_CAP_PCI_CFG capability's offset in the configuration space.
    window: usize,
}

impl PciTransport {
    /// `device` with its BAR at `bar` (aligned to [`BAR_SIZE`], below 4 GiB); `vectors`
    /// ([`VECTORS`] eventfds) raise its MSI-X vectors once `routes` has bound them.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Memory,
        bar: u32,
        vectors: Vec<EventFd>,
        routes: Box<dyn MsiRoutes>,
    ) -> std::io::Result<Self> {
        assert_eq!(vectors.len(), usize::from(VECTORS));
        let device_type = device.device_type();
        let queues = device.queue_max_sizes().len();
        let irq = Arc::new(PciInterrupt {
            isr: AtomicU32::new(0),
            broken: AtomicBool::new(false),
            vectors,
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            unheard: EventFd::new(EFD_NONBLOCK)?,
        });
        let common = VirtioCommon::new("virtio-pci", device, mem, irq)?;
        let mut config = ConfigSpace::new(Identity {
            vendor: VENDOR,
            device: 0x1040 + u16::try_from(device_type).unwrap_or(0),
            revision: 1,
            class: class_of(device_type),
            subsystem_vendor: VENDOR,
            subsystem: 0x40,
        });
        config.set_bar(0, bar, u32::try_from(BAR_SIZE).expect("small"));
        let queues = u32::try_from(queues).expect("few queues");
        for (kind, offset, len) in [
            (CAP_COMMON, COMMON, COMMON_LEN),
            (CAP_ISR, ISR, 1),
            (CAP_DEVICE, DEVICE, DEVICE_LEN),
        ] {
            add_virtio_cap(&mut config, kind, offset, len, &[]);
        }
        add_virtio_cap(
            &mut config,
            CAP_NOTIFY,
            NOTIFY,
            queues * NOTIFY_MULTIPLIER,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        );
        // cap_len, cfg_type, bar, id, padding, offset, length, pci_cfg_data: the driver
        // writes bar, offset, length and the data.
        let mut body = vec![20, CAP_PCI_CFG];
        body.resize(18, 0);
        let mut writable = vec![0u8; 18];
        writable[WINDOW_BAR - 2] = 0xff;
        writable[WINDOW_OFFSET - 2..].fill(0xff);
        let window = config.add_capability(CAP_ID_VENDOR, &body, &writable);
        let msix = Msix::new(
            &mut config,
            VECTORS,
            0,
            u32::try_from(MSIX_TABLE).expect("in the BAR"),
            u32::try_from(MSIX_PBA).expect("in the BAR"),
            routes,
        );
        Ok(PciTransport {
            common,
            pristine: config.clone(),
            config,
            msix,
            window,
        })
    }

    /// Whether a configuration access of `len` bytes at `offset` touches pci_cfg_data.
    fn in_window(&self, offset: usize, len: usize) -> bool {
        let data = self.window + WINDOW_DATA;
        offset < data + 4 && data < offset + len
    }

    /// The BAR access the window's bar, offset and length describe: (offset, length), if
    /// the driver described one the specification allows (BAR 0, 1, 2 or 4 bytes, aligned,
    /// inside the BAR).
    fn window_target(&self) -> Option<(u64, usize)> {
        let mut f = [0u8; 4];
        let mut field = |at: usize| {
            self.config.read(self.window + at, &mut f);
            u32::from_le_bytes(f)
        };
        let (bar, offset, length) = (
            field(WINDOW_BAR) & 0xff,
            field(WINDOW_OFFSET),
            field(WINDOW_LENGTH),
        );
        (bar == 0
            && matches!(length, 1 | 2 | 4)
            && offset % length == 0
            && u64::from(offset) + u64::from(length) <= BAR_SIZE)
            .then(|| (u64::from(offset), length as usize))
    }

    /// One eventfd per queue: the vmm registers each as an ioeventfd on its notification
    /// address.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.common.queue_evts
    }

    fn read_common(&mut self, offset: u64, len: usize) -> Option<u32> {
        use common::*;
        let c = &self.common;
        let irq = &c.irq;
        let queue = c.queue_sel as usize;
        Some(match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => c.device_features_sel,
            (DEVICE_FEATURE, 4) => c.device_features_page(),
            (DRIVER_FEATURE_SELECT, 4) => c.driver_features_sel,
            (DRIVER_FEATURE, 4) => match c.driver_features_sel {
                0 => low_half(c.acked_features),
                1 => low_half(c.acked_features >> 32),
                _ => 0,
            },
            (CONFIG_MSIX_VECTOR, 2) => u32::from(irq.config_vector.load(Ordering::SeqCst)),
            (NUM_QUEUES, 2) => u32::try_from(c.queue_evts.len()).expect("few queues"),
            (DEVICE_STATUS, 1) => c.read_status() & 0xff,
            (CONFIG_GENERATION, 1) => c.config_generation & 0xff,
            (QUEUE_SELECT, 2) => c.queue_sel,
            (QUEUE_SIZE, 2) => c.queue().map_or(0, |q| u32::from(q.size())),
            (QUEUE_MSIX_VECTOR, 2) => u32::from(irq.queue_vector(queue)),
            (QUEUE_ENABLE, 2) => c.queue().map_or(0, |q| u32::from(q.ready())),
            (QUEUE_NOTIFY_OFF, 2) => c.queue().map_or(0, |_| c.queue_sel),
            (QUEUE_DESC_LO | QUEUE_DESC_HI, 4) => half(c.queue(), offset, Queue::desc_table),
            (QUEUE_DRIVER_LO | QUEUE_DRIVER_HI, 4) => half(c.queue(), offset, Queue::avail_ring),
            (QUEUE_DEVICE_LO | QUEUE_DEVICE_HI, 4) => half(c.queue(), offset, Queue::used_ring),
            _ => return None,
        })
    }

    fn write_common(&mut self, offset: u64, len: usize, v: u32) -> bool {
        use common::*;
        let c = &mut self.common;
        // A vector beyond the table reads back as NO_VECTOR: the driver sees it was refused.
        let vector = |v: u32| match u16::try_from(v) {
            Ok(v) if v < VECTORS => v,
            _ => NO_VECTOR,
        };
        match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => c.device_features_sel = v,
            (DRIVER_FEATURE_SELECT, 4) => c.driver_features_sel = v,
            (DRIVER_FEATURE, 4) => c.write_driver_features(v),
            (CONFIG_MSIX_VECTOR, 2) => c.irq.config_vector.store(vector(v), Ordering::SeqCst),
            (DEVICE_STATUS, 1) => c.set_status(v),
            (QUEUE_SELECT, 2) => c.queue_sel = v,
            (QUEUE_SIZE, 2) => {
                if let Some(q) = c.selected_queue() {
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(slot) = c.irq.queue_vectors.get(c.queue_sel as usize) {
                    slot.store(vector(v), Ordering::SeqCst);
                }
            }
            (QUEUE_ENABLE, 2) => {
                if let Some(q) = c.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            (QUEUE_DESC_LO..=QUEUE_DEVICE_HI, 4) => {
                if let Some(q) = c.selected_queue() {
                    let (lo, hi) = if offset % 8 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset {
                        QUEUE_DESC_LO | QUEUE_DESC_HI => q.set_desc_table_address(lo, hi),
                        QUEUE_DRIVER_LO | QUEUE_DRIVER_HI => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => return false,
        }
        true
    }
}

/// The 32-bit half at `offset` (even dword: low) of a queue address.
fn half(q: Option<&Queue>, offset: u64, get: fn(&Queue) -> u64) -> u32 {
    q.map_or(0, |q| {
        let a = get(q);
        low_half(if offset % 8 == 0 { a } else { a >> 32 })
    })
}

/// The PCI class code for a virtio device type (what `lspci` shows; drivers match on IDs).
fn class_of(device_type: u32) -> u32 {
    match device_type {
        VIRTIO_ID_NET => 0x02_00_00,     // network, Ethernet
        VIRTIO_ID_BLOCK => 0x01_80_00,   // mass storage, other
        VIRTIO_ID_CONSOLE => 0x07_80_00, // communication, other
        _ => 0xff_00_00,                 // unassigned
    }
}

/// A virtio_pci_cap in BAR 0 (`extra`: what follows it, the notify multiplier).
fn add_virtio_cap(config: &mut ConfigSpace, kind: u8, offset: u64, len: u32, extra: &[u8]) {
    let mut body = vec![
        u8::try_from(16 + extra.len()).expect("small"),
        kind,
        0,
        0,
        0,
        0,
    ];
    body.extend_from_slice(&u32::try_from(offset).expect("in the BAR").to_le_bytes());
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(extra);
    let writable = vec![0; body.len()];
    config.add_capability(CAP_ID_VENDOR, &body, &writable);
}

impl BusDevice for PciTransport {
    /// An access to the BAR.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            COMMON..ISR => match self.read_common(offset, data.len()) {
                Some(v) => data.copy_from_slice(&v.to_le_bytes()[..data.len()]),
                None => crate::guest_warn!(
                    "virtio-pci: {}-byte read of common register {offset:#x} ignored",
                    data.len()
                ),
            },
            ISR if data.len() == 1 => {
                let isr = self.common.irq.isr.swap(0, Ordering::SeqCst);
                data[0] = u8::try_from(isr & 0xff).expect("masked");
            }
            DEVICE..NOTIFY => lock(&self.common.device).read_config(offset - DEVICE, data),
            MSIX_TABLE..MSIX_PBA => self.msix.table_read(offset - MSIX_TABLE, data),
            _ => {} // notifications read as zero; so do the pending bits (see `Msix`)
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            COMMON..ISR => {
                let mut b = [0u8; 4];
                let ok = data.len() <= 4 && {
                    b[..data.len()].copy_from_slice(data);
                    self.write_common(offset, data.len(), u32::from_le_bytes(b))
                };
                if !ok {
                    crate::guest_warn!(
                        "virtio-pci: {}-byte write of common register {offset:#x} ignored",
                        data.len()
                    );
                }
            }
            DEVICE..NOTIFY => lock(&self.common.device).write_config(offset - DEVICE, data),
            NOTIFY..MSIX_TABLE => {
                // Reaches nixvm only without the ioeventfd (tests); the queue is the address.
                let q = (offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
                self.common.notify(u32::try_from(q).unwrap_or(u32::MAX));
            }
            MSIX_TABLE..MSIX_PBA => self.msix.table_write(offset - MSIX_TABLE, data),
            _ => crate::guest_warn!("virtio-pci: write at {offset:#x} ignored"),
        }
    }

    /// A machine reset: the device, its configuration space and its vectors.
    fn reset(&mut self) {
        self.common.reset();
        self.config.restore(&self.pristine);
        self.msix.reset();
        for v in &self.common.irq.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.common
            .irq
            .config_vector
            .store(NO_VECTOR, Ordering::SeqCst);
    }
}

impl PciFunction for PciTransport {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.in_window(offset, data.len())
            && let Some((at, len)) = self.window_target()
        {
            let mut b = [0u8; 4];
            BusDevice::read(self, at, &mut b[..len]);
            self.config.put(self.window + WINDOW_DATA, &b);
        }
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if self.msix.control_touched(offset, data.len()) {
            self.msix.control_written(&self.config);
        }
        if self.in_window(offset, data.len())
            && let Some((at, len)) = self.window_target()
        {
            let mut b = [0u8; 4];
            self.config.read(self.window + WINDOW_DATA, &mut b);
            BusDevice::write(self, at, &b[..len]);
        }
    }
}

impl TransportRegisters for PciTransport {
    type Irq = PciInterrupt;
    fn common(&self) -> &VirtioCommon<PciInterrupt> {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon<PciInterrupt> {
        &mut self.common
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{MsiMessage, PciRoot};
    use crate::virtio::F_EVENT_IDX;
    use crate::virtio::test_utils::{Probe, memory};
    use crate::virtio::transport::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Routes(Arc<Mutex<Vec<Option<MsiMessage>>>>);
    impl MsiRoutes for Routes {
        fn route(&mut self, vector: usize, message: Option<MsiMessage>) {
            let mut r = self.0.lock().unwrap();
            let len = r.len().max(vector + 1);
            r.resize(len, None);
            r[vector] = message;
        }
    }

    struct Rig {
        root: PciRoot,
        t: Arc<Mutex<PciTransport>>,
        vectors: Vec<EventFd>,
        routes: Routes,
        probe: Probe,
    }

    const BAR: u32 = 0xc000_8000;

    fn rig() -> Rig {
        let probe = Probe::default();
        let vectors: Vec<EventFd> = (0..VECTORS)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let clones = vectors.iter().map(|e| e.try_clone().unwrap()).collect();
        let routes = Routes::default();
        let t = PciTransport::new(
            Box::new(probe.clone()),
            Memory::new(memory(1 << 20)),
            BAR,
            clones,
            Box::new(routes.clone()),
        )
        .unwrap();
        let t = Arc::new(Mutex::new(t));
        let mut root = PciRoot::default();
        root.attach(3, t.clone());
        Rig {
            root,
            t,
            vectors,
            routes,
            probe,
        }
    }

    impl Rig {
        fn select(&mut self, reg: u32) {
            let a = 0x8000_0000u32 | 3 << 11 | (reg & 0xfc);
            self.root.write(0, &a.to_le_bytes());
        }
        fn cfg(&mut self, reg: u32, len: usize) -> u32 {
            self.select(reg);
            let mut b = [0u8; 4];
            self.root.read(4 + u64::from(reg & 3), &mut b[..len]);
            u32::from_le_bytes(b)
        }
        fn set_cfg(&mut self, reg: u32, v: &[u8]) {
            self.select(reg);
            self.root.write(4 + u64::from(reg & 3), v);
        }
        fn r(&mut self, off: u64, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.t.lock().unwrap().read(off, &mut b[..len]);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, len: usize, v: u32) {
            self.t.lock().unwrap().write(off, &v.to_le_bytes()[..len]);
        }
        /// The capabilities as Linux's virtio_pci_modern walks them: (cfg_type, offset,
        /// length) of each vendor capability, and the MSI-X capability's offset.
        fn caps(&mut self) -> (Vec<(u32, u32, u32)>, u32) {
            let (mut at, mut found, mut msix) = (self.cfg(0x34, 1), Vec::new(), 0);
            while at != 0 {
                match self.cfg(at, 1) {
                    0x09 => found.push((
                        self.cfg(at + 3, 1),
                        self.cfg(at + 8, 4),
                        self.cfg(at + 12, 4),
                    )),
                    0x11 => msix = at,
                    id => panic!("capability {id:#x}"),
                }
                at = self.cfg(at + 1, 1);
            }
            (found, msix)
        }
    }

    #[test]
    fn identifies_as_a_modern_virtio_device_with_its_regions_in_bar0() {
        let mut r = rig();
        assert_eq!(r.cfg(0, 4), ((0x1040 + 42) << 16) | 0x1af4);
        assert_eq!(r.cfg(8, 1), 1, "revision 1: modern");
        assert_eq!(r.cfg(0x10, 4), BAR);
        assert_eq!(r.cfg(0x3d, 1), 0, "no INTx pin");
        let (caps, msix) = r.caps();
        assert_eq!(
            caps,
            vec![
                (1, 0, 0x38),
                (3, 0x1000, 1),
                (4, 0x2000, 0x1000),
                (2, 0x3000, 2 * NOTIFY_MULTIPLIER),
                (5, 0, 0)
            ]
        );
        assert_eq!(r.cfg(msix + 2, 2), u32::from(VECTORS - 1), "table size");
        assert_eq!(r.cfg(msix + 4, 4), 0x4000, "table in BAR 0");
        assert_eq!(r.r(common::NUM_QUEUES, 2), 2);
        assert_eq!(r.r(DEVICE + 1, 2), 0x0302, "device config");
    }

    /// What Linux's virtio_pci does, with MSI-X on: vectors per queue refused past the
    /// table, the rings set, DRIVER_OK; then a used buffer raises the queues' vector.
    #[test]
    fn msix_bring_up_and_interrupts() {
        let mut r = rig();
        let (_, msix) = r.caps();
        let msg = |v: u32| (0xfee0_0000u32, 0x40 + v);
        for v in 0..u32::from(VECTORS) {
            let (addr, data) = msg(v);
            let e = MSIX_TABLE + u64::from(v) * 16;
            r.w(e, 4, addr);
            r.w(e + 4, 4, 0);
            r.w(e + 8, 4, data);
            r.w(e + 12, 4, 0);
        }
        r.set_cfg(msix + 2, &0x8000u16.to_le_bytes());
        assert_eq!(
            *r.routes.0.lock().unwrap(),
            vec![
                Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x40
                }),
                Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                })
            ]
        );
        r.w(common::DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        r.w(common::DRIVER_FEATURE_SELECT, 4, 0);
        r.w(common::DRIVER_FEATURE, 4, F_EVENT_IDX as u32);
        r.w(common::DRIVER_FEATURE_SELECT, 4, 1);
        r.w(common::DRIVER_FEATURE, 4, 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        r.w(common::DEVICE_STATUS, 1, ok);
        assert_eq!(r.r(common::DEVICE_STATUS, 1), ok);
        r.w(common::CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(r.r(common::CONFIG_MSIX_VECTOR, 2), 0);
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            r.w(common::QUEUE_SELECT, 2, q);
            assert_eq!(r.r(common::QUEUE_SIZE, 2), [16, 8][q as usize]);
            r.w(common::QUEUE_SIZE, 2, 8);
            r.w(common::QUEUE_MSIX_VECTOR, 2, 2 + q);
            assert_eq!(
                r.r(common::QUEUE_MSIX_VECTOR, 2),
                0xffff,
                "beyond the table"
            );
            r.w(common::QUEUE_MSIX_VECTOR, 2, 1);
            assert_eq!(r.r(common::QUEUE_MSIX_VECTOR, 2), 1);
            assert_eq!(r.r(common::QUEUE_NOTIFY_OFF, 2), q);
            for (lo, a) in [
                (common::QUEUE_DESC_LO, base),
                (common::QUEUE_DRIVER_LO, base + 0x800),
                (common::QUEUE_DEVICE_LO, base + 0x1000),
            ] {
                r.w(lo, 4, a);
                r.w(lo + 4, 4, 0);
                assert_eq!(r.r(lo, 4), a);
            }
            r.w(common::QUEUE_ENABLE, 2, 1);
        }
        r.w(common::DEVICE_STATUS, 1, ok | STATUS_DRIVER_OK);
        r.t.lock().unwrap().settle();
        assert_eq!(r.probe.0.lock().unwrap().1, 1, "activated");

        let irq = r.t.lock().unwrap().common.irq.clone();
        irq.trigger(VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            r.vectors[1].read().unwrap(),
            1,
            "both queues share one vector"
        );
        assert!(r.vectors[0].read().is_err());
        irq.trigger(VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(r.vectors[0].read().unwrap(), 1);
        assert_eq!(r.r(ISR, 1), 3, "ISR read-to-clear");
        assert_eq!(r.r(ISR, 1), 0);

        // The notification address reaches the queue's eventfd.
        r.w(NOTIFY + u64::from(NOTIFY_MULTIPLIER), 2, 1);
        assert_eq!(r.t.lock().unwrap().queue_evts()[1].read().unwrap(), 1);

        // A machine reset, as the vmm's: both buses, the port bus's configuration ports and
        // the MMIO bus's BAR. The device, the vectors and MSI-X go back to power-on, the
        // device once.
        r.root.reset();
        r.t.lock().unwrap().reset();
        assert_eq!(r.probe.0.lock().unwrap().2, 1, "device reset once");
        assert_eq!(*r.routes.0.lock().unwrap(), vec![None, None]);
        assert_eq!(r.cfg(msix + 2, 2), u32::from(VECTORS - 1));
        assert_eq!(r.r(common::CONFIG_MSIX_VECTOR, 2), 0xffff);
    }

    /// VIRTIO_PCI_CAP_PCI_CFG: BAR accesses through configuration cycles, as firmware does
    /// them; what the specification does not allow is not done.
    #[test]
    fn pci_cfg_window_reaches_the_bar() {
        let mut r = rig();
        let mut at = r.cfg(0x34, 1);
        while r.cfg(at, 1) != 0x09 || r.cfg(at + 3, 1) != 5 {
            at = r.cfg(at + 1, 1);
            assert_ne!(at, 0, "a PCI_CFG capability");
        }
        assert_eq!(r.cfg(at + 2, 1), 20, "cap_len");
        let set = |r: &mut Rig, offset: u32, length: u32| {
            r.set_cfg(at + 4, &[0]);
            r.set_cfg(at + 8, &offset.to_le_bytes());
            r.set_cfg(at + 12, &length.to_le_bytes());
        };
        set(&mut r, u32::try_from(common::NUM_QUEUES).unwrap(), 2);
        assert_eq!(r.cfg(at + 16, 2), 2, "num_queues read through the window");
        set(&mut r, u32::try_from(common::DEVICE_STATUS).unwrap(), 1);
        r.set_cfg(at + 16, &[STATUS_ACKNOWLEDGE as u8]);
        assert_eq!(r.r(common::DEVICE_STATUS, 1), STATUS_ACKNOWLEDGE);
        assert_eq!(r.cfg(at + 16, 1), STATUS_ACKNOWLEDGE, "and read back");
        // A length of 3, an unaligned offset, past the BAR, another BAR: nothing happens.
        for (offset, length) in [(0x14, 3), (0x13, 2), (0x8000, 4), (0x7ffe, 4)] {
            set(&mut r, offset, length);
            r.set_cfg(at + 16, &[0xff; 4]);
        }
        r.set_cfg(at + 4, &[1]);
        r.set_cfg(at + 8, &0x14u32.to_le_bytes());
        r.set_cfg(at + 12, &1u32.to_le_bytes());
        r.set_cfg(at + 16, &[0]);
        assert_eq!(r.r(common::DEVICE_STATUS, 1), STATUS_ACKNOWLEDGE);
    }

    /// A driver that gives the queues no vector polls them: a vhost-user back end still gets
    /// an eventfd to signal (else the device could not start), and no vector fires.
    #[test]
    fn queues_without_a_vector_still_have_a_notifier() {
        let r = rig();
        let irq = r.t.lock().unwrap().common.irq.clone();
        irq.notifier().expect("a notifier").write(1).unwrap();
        assert!(r.vectors.iter().all(|v| v.read().is_err()));
    }

    #[test]
    fn nonsense_is_ignored() {
        let mut r = rig();
        r.w(common::DEVICE_STATUS, 4, 0xffff_ffff); // wrong width
        assert_eq!(r.r(common::DEVICE_STATUS, 1), 0);
        r.w(common::QUEUE_SELECT, 2, 0xffff);
        assert_eq!(r.r(common::QUEUE_SIZE, 2), 0);
        r.w(common::QUEUE_ENABLE, 2, 1);
        r.w(0x7fff, 1, 1);
        r.w(MSIX_TABLE + 3, 1, 1);
        let mut big = [0u8; 8];
        r.t.lock().unwrap().read(common::QUEUE_DESC_LO, &mut big);
        r.t.lock().unwrap().write(0x0, &[0; 8]);
        r.set_cfg(0xff, &[1]);
        assert_eq!(r.cfg(0xfc, 4), 0);
    }
}
