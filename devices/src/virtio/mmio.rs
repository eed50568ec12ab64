//! The virtio-mmio transport, register layout version 2 (virtio 1.x, no legacy).
//!
//! The driver's register accesses arrive here from vCPU exits (except QueueNotify, which the
//! vmm turns into a KVM ioeventfd per queue). Anything a driver writes out of order or out
//! of range is ignored with a warning; nothing here panics on guest input.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::{virtio_config, virtio_mmio as mmio};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::BusDevice;
use crate::lock;

use super::{
    F_EVENT_IDX, F_VERSION_1, Interrupt, Memory, MmioInterrupt, VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING, VirtioDevice,
};

/// Size of one device's MMIO window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// QueueNotify: where the vmm places each queue's ioeventfd (data = queue index).
pub const QUEUE_NOTIFY: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_NOTIFY);
/// InterruptACK: reading InterruptStatus acknowledges ([`MmioInterrupt::take`]), so the vmm
/// sinks the driver's 4-byte writes of these values (every combination of the two status
/// bits) in [`MmioTransport::ack_sink`], a KVM ioeventfd: one exit to nixvm fewer per
/// interrupt. Any other write is ignored here too.
pub const INTERRUPT_ACK: u64 = reg(mmio::VIRTIO_MMIO_INTERRUPT_ACK);
pub const ACK_VALUES: std::ops::RangeInclusive<u32> =
    0..=VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e49_5856; // "NIXV"

#[cfg(test)]
const STATUS_ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
const STATUS_DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
const STATUS_FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;

/// A register's offset in the window (the bindings type them u32).
const fn reg(offset: u32) -> u64 {
    offset as u64
}
const MAGIC_VALUE: u64 = reg(mmio::VIRTIO_MMIO_MAGIC_VALUE);
const VERSION_REG: u64 = reg(mmio::VIRTIO_MMIO_VERSION);
const DEVICE_ID: u64 = reg(mmio::VIRTIO_MMIO_DEVICE_ID);
const VENDOR_ID: u64 = reg(mmio::VIRTIO_MMIO_VENDOR_ID);
const DEVICE_FEATURES: u64 = reg(mmio::VIRTIO_MMIO_DEVICE_FEATURES);
const DEVICE_FEATURES_SEL: u64 = reg(mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL);
const DRIVER_FEATURES: u64 = reg(mmio::VIRTIO_MMIO_DRIVER_FEATURES);
const DRIVER_FEATURES_SEL: u64 = reg(mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL);
const QUEUE_SEL: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_SEL);
const QUEUE_NUM_MAX: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_NUM_MAX);
const QUEUE_NUM: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_NUM);
const QUEUE_READY: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_READY);
const INTERRUPT_STATUS: u64 = reg(mmio::VIRTIO_MMIO_INTERRUPT_STATUS);
const STATUS: u64 = reg(mmio::VIRTIO_MMIO_STATUS);
const QUEUE_DESC_LOW: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_DESC_LOW);
const QUEUE_DESC_HIGH: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH);
const QUEUE_AVAIL_LOW: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW);
const QUEUE_AVAIL_HIGH: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
const QUEUE_USED_LOW: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_USED_LOW);
const QUEUE_USED_HIGH: u64 = reg(mmio::VIRTIO_MMIO_QUEUE_USED_HIGH);
const SHM_SEL: u64 = reg(mmio::VIRTIO_MMIO_SHM_SEL);
const SHM_LEN_LOW: u64 = reg(mmio::VIRTIO_MMIO_SHM_LEN_LOW);
const SHM_LEN_HIGH: u64 = reg(mmio::VIRTIO_MMIO_SHM_LEN_HIGH);
const SHM_BASE_LOW: u64 = reg(mmio::VIRTIO_MMIO_SHM_BASE_LOW);
const SHM_BASE_HIGH: u64 = reg(mmio::VIRTIO_MMIO_SHM_BASE_HIGH);
const CONFIG_GENERATION: u64 = reg(mmio::VIRTIO_MMIO_CONFIG_GENERATION);
/// Device config space starts here.
const CONFIG: u64 = reg(mmio::VIRTIO_MMIO_CONFIG);

pub struct MmioTransport {
    /// Locked by the transport for config space and feature negotiation, and by the
    /// activation thread while the device starts: a vCPU never waits for an activation (a
    /// vhost-user handshake) unless it touches that device's config space meanwhile.
    device: Arc<Mutex<Box<dyn VirtioDevice>>>,
    /// What the transport needs of the device at any time, read once.
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    signals_directly: bool,
    /// The thread activating the device, while it runs (joined at reset).
    activation: Option<JoinHandle<()>>,
    mem: Memory,
    irq: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    /// Where the driver's InterruptACK writes go (never read: see [`INTERRUPT_ACK`]).
    ack_sink: EventFd,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    status: u32,
    active: bool,
    /// Bumped whenever the device's config space changes under the driver.
    config_generation: u32,
}

impl MmioTransport {
    /// `irq_evt` is the eventfd wired to this device's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Memory,
        irq_evt: EventFd,
    ) -> std::io::Result<Self> {
        let queue_evts = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let queue_max_sizes = device.queue_max_sizes().to_vec();
        let queues = fresh_queues(&queue_max_sizes);
        Ok(MmioTransport {
            device_type: device.device_type(),
            signals_directly: device.signals_directly(),
            queue_max_sizes,
            activation: None,
            device: Arc::new(Mutex::new(device)),
            mem,
            irq: Arc::new(MmioInterrupt::new(irq_evt)),
            queues,
            queue_evts,
            ack_sink: EventFd::new(EFD_NONBLOCK)?,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            active: false,
            config_generation: 0,
        })
    }

    /// One eventfd per queue: the vmm registers each as an ioeventfd on QueueNotify.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd the vmm registers on InterruptACK for each of [`ACK_VALUES`].
    pub fn ack_sink(&self) -> &EventFd {
        &self.ack_sink
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is only meaningful before the device runs.
        if self.active || self.status & STATUS_FEATURES_OK == 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn device_features(&self) -> u64 {
        lock(&self.device).avail_features() | F_VERSION_1
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 {
            crate::guest_warn!(
                "virtio-mmio: {}-byte read of register {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => low_half(self.device_features()),
                1 => low_half(self.device_features() >> 32),
                _ => 0,
            },
            QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => {
                let direct = self.active && self.signals_directly;
                self.irq.take() | if direct { VIRTIO_MMIO_INT_VRING } else { 0 }
            }
            STATUS => {
                let broken = self.irq.broken.load(Ordering::SeqCst);
                self.status | if broken { STATUS_NEEDS_RESET } else { 0 }
            }
            // SHMLen and SHMBase: no shared memory regions, which the spec says as all ones
            // (a zero length would be a region; virtio-fs would try to use it for DAX).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::guest_warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock(&self.device).write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                "virtio-mmio: {}-byte write of register {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let features_open = self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) == STATUS_DRIVER;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES if features_open => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => crate::guest_warn!(
                    "virtio-mmio: driver features page {} ignored",
                    self.driver_features_sel
                ),
            },
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue checks the size (power of two, not above max) itself.
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => crate::guest_warn!("virtio-mmio: notify of unknown queue {v}"),
            },
            INTERRUPT_ACK => {} // acknowledged by the read
            STATUS => self.set_status(v),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH
            | QUEUE_USED_LOW | QUEUE_USED_HIGH => {
                if let Some(q) = self.selected_queue() {
                    let (lo, hi) =
                        if matches!(offset, QUEUE_DESC_LOW | QUEUE_AVAIL_LOW | QUEUE_USED_LOW) {
                            (Some(v), None)
                        } else {
                            (None, Some(v))
                        };
                    match offset {
                        QUEUE_DESC_LOW | QUEUE_DESC_HIGH => q.set_desc_table_address(lo, hi),
                        QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            SHM_SEL => {} // SHMSel: every region reads as absent
            _ => crate::guest_warn!("virtio-mmio: write {v:#x} to register {offset:#x} ignored"),
        }
    }

    /// Resets the device as a driver writing 0 to Status does, and for a machine reset.
    fn reset(&mut self) {
        self.settle();
        if self.active && !lock(&self.device).reset() {
            crate::guest_warn!(
                "virtio-mmio: device type {} cannot be reset",
                self.device_type
            );
            self.irq.needs_reset();
            return;
        }
        self.active = false;
        self.queues = fresh_queues(&self.queue_max_sizes);
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.status = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.irq.status.store(0, Ordering::SeqCst);
        self.irq.broken.store(false, Ordering::SeqCst);
    }
}

impl MmioTransport {
    fn set_status(&mut self, v: u32) {
        // DEVICE_NEEDS_RESET is the device's to set (`Interrupt::needs_reset`, read back
        // through the status register) and a reset's to clear: a driver writing the status
        // it read back neither sets nor keeps it.
        if v == 0 {
            self.reset();
            return;
        }
        let v = v & !STATUS_NEEDS_RESET;
        if v & self.status != self.status {
            crate::guest_warn!(
                "virtio-mmio: status {v:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let unknown = self.acked_features & !self.device_features();
            if unknown != 0 || self.acked_features & F_VERSION_1 == 0 {
                crate::guest_warn!(
                    "virtio-mmio: driver accepted features {unknown:#x} we did not offer, or not VERSION_1"
                );
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            lock(&self.device).set_acked_features(self.acked_features);
        }
        self.status = v;
        if new & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK != 0 && !self.active {
            self.activate();
        }
        if new & STATUS_FAILED != 0 {
            crate::guest_warn!(
                "virtio-mmio: the driver gave up on device type {}",
                self.device_type
            );
        }
    }

    /// Hands the queues to the device. The device starts on a thread of its own (a
    /// vhost-user device's handshake with its back end may take a while, or never end), so
    /// the vCPU that wrote DRIVER_OK goes on at once; a device that fails to start reports
    /// NEEDS_RESET.
    fn activate(&mut self) {
        let mem = self.mem.memory();
        let event_idx = self.acked_features & F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        // The queues move into the device; the transport keeps fresh ones until a reset.
        let configured = std::mem::replace(&mut self.queues, fresh_queues(&self.queue_max_sizes));
        for (i, mut q) in configured.into_iter().enumerate() {
            if q.ready() && !q.is_valid(&*mem) {
                crate::guest_warn!(
                    "virtio-mmio: queue {i} of device type {} is not valid",
                    self.device_type
                );
                self.irq.needs_reset();
                return;
            }
            q.set_event_idx(event_idx);
            let evt = match self.queue_evts[i].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    log::error!("virtio-mmio: {e}");
                    self.irq.needs_reset();
                    return;
                }
            };
            queues.push((q, evt));
        }
        let (device, mem, irq, device_type) = (
            self.device.clone(),
            self.mem.clone(),
            self.irq.clone(),
            self.device_type,
        );
        let started = std::thread::Builder::new()
            .name(format!("virtio-{device_type}-activate"))
            .spawn(move || {
                let irq_dyn: Arc<dyn Interrupt> = irq.clone();
                if let Err(e) = lock(&device).activate(mem, irq_dyn, queues) {
                    crate::guest_warn!(
                        "virtio-mmio: cannot activate device type {device_type}: {e}"
                    );
                    irq.needs_reset();
                }
            });
        match started {
            Ok(h) => {
                self.active = true;
                self.activation = Some(h);
            }
            Err(e) => {
                log::error!("virtio-mmio: cannot start device type {device_type}: {e}");
                self.irq.needs_reset();
            }
        }
    }

    /// Sets the link of a network device; the driver sees the change (a new config generation
    /// and a configuration change interrupt). False if the device has no link.
    pub fn set_link(&mut self, up: bool) -> bool {
        let Some(changed) = lock(&self.device).set_link(up) else {
            return false;
        };
        if changed {
            self.config_generation = self.config_generation.wrapping_add(1);
            if self.status & STATUS_DRIVER_OK != 0 {
                self.irq.trigger(VIRTIO_MMIO_INT_CONFIG);
            }
        }
        true
    }

    /// Waits until a device being activated has started (or failed to).
    pub fn settle(&mut self) {
        if let Some(h) = self.activation.take() {
            let _ = h.join();
        }
    }
}

fn low_half(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked")
}

fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::VIRTIO_MMIO_INT_CONFIG;
    use crate::virtio::test_utils::memory;
    use std::sync::Mutex;

    /// A device that records what the transport does to it.
    #[derive(Default, Clone)]
    struct Probe(Arc<Mutex<(u64, usize, usize)>>); // acked features, activations, resets

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
            crate::virtio::read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn activate(
            &mut self,
            _: Memory,
            _: Arc<dyn Interrupt>,
            q: Vec<(Queue, EventFd)>,
        ) -> Result<(), super::super::ActivateError> {
            assert_eq!(q.len(), 2);
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.0.lock().unwrap().2 += 1;
            true
        }
    }

    fn transport() -> (MmioTransport, Probe) {
        let probe = Probe::default();
        let mem = Memory::new(memory(1 << 20));
        let t = MmioTransport::new(
            Box::new(probe.clone()),
            mem,
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        (t, probe)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the device to DRIVER_OK with both queues in guest memory.
    fn bring_up(t: &mut MmioTransport) {
        w(t, 0x70, STATUS_ACKNOWLEDGE);
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 0);
        w(t, 0x20, F_EVENT_IDX as u32);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(t, 0x70) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        for (i, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            w(t, 0x30, i);
            w(t, 0x38, 8);
            w(t, 0x80, base);
            w(t, 0x90, base + 0x800);
            w(t, 0xa0, base + 0x1000);
            w(t, 0x44, 1);
        }
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        t.settle();
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 42);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 in the high word");
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), F_EVENT_IDX as u32 | 1);
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 8);
        w(&mut t, 0x30, 9);
        assert_eq!(r(&mut t, 0x34), 0, "no such queue");
        let mut b = [0u8; 2];
        t.read(0x101, &mut b);
        assert_eq!(b, [2, 3]);
    }

    #[test]
    fn activates_with_features_and_resets() {
        let (mut t, probe) = transport();
        bring_up(&mut t);
        assert_eq!(probe.0.lock().unwrap().1, 1, "activated once");
        assert_eq!(probe.0.lock().unwrap().0, F_EVENT_IDX | F_VERSION_1);
        // Queue registers are frozen while running.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 2);
        w(&mut t, 0x70, 0);
        assert_eq!(probe.0.lock().unwrap().2, 1, "reset reached the device");
        assert_eq!(r(&mut t, 0x70), 0);
        bring_up(&mut t);
        assert_eq!(probe.0.lock().unwrap().1, 2, "re-activated after reset");
    }

    #[test]
    fn refuses_features_not_offered() {
        let (mut t, probe) = transport();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 7);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        w(&mut t, 0x70, 0xff);
        assert_eq!(probe.0.lock().unwrap().1, 0, "never activated");
    }

    #[test]
    fn bad_rings_need_reset_not_a_panic() {
        let (mut t, probe) = transport();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 8);
        w(&mut t, 0x80, 0xffff_f000); // outside the 1 MiB of memory
        w(&mut t, 0x84, 0x10);
        w(&mut t, 0x44, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(probe.0.lock().unwrap().1, 0);
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, 0x60) & VIRTIO_MMIO_INT_CONFIG, 0);
        assert_eq!(r(&mut t, 0x60), 0, "acknowledged by the read");
        w(&mut t, 0x64, VIRTIO_MMIO_INT_CONFIG);
        // The driver adds FAILED to the status it read back (NEEDS_RESET included): taken,
        // and NEEDS_RESET stays the device's until a reset clears both.
        let back = r(&mut t, 0x70);
        w(&mut t, 0x70, back | STATUS_FAILED);
        assert_eq!(r(&mut t, 0x70), back | STATUS_FAILED);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        assert_eq!(
            r(&mut t, 0x70),
            back | STATUS_FAILED,
            "dropping bits is ignored"
        );
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn nonsense_is_ignored() {
        let (mut t, _) = transport();
        for off in (0..0x100).step_by(4) {
            w(&mut t, off, 0xffff_ffff);
            r(&mut t, off);
        }
        t.write(0x70, &[1, 2]);
        t.write(0x30, &[]);
        let mut b = [0u8; 3];
        t.read(0x10, &mut b);
        t.read(u64::MAX, &mut b);
        t.write(u64::MAX - 1, &[0; 8]);
        w(&mut t, QUEUE_NOTIFY, 7);
        w(&mut t, QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    }

    /// A device whose activation blocks (a vhost-user back end that never answers).
    struct Stuck(Arc<Mutex<()>>);

    impl VirtioDevice for Stuck {
        fn device_type(&self) -> u32 {
            26
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn avail_features(&self) -> u64 {
            0
        }
        fn activate(
            &mut self,
            _: Memory,
            _: Arc<dyn Interrupt>,
            _: Vec<(Queue, EventFd)>,
        ) -> Result<(), super::super::ActivateError> {
            drop(self.0.lock().unwrap());
            Err(super::super::ActivateError::NoNotifier)
        }
        fn reset(&mut self) -> bool {
            true
        }
    }

    #[test]
    fn a_slow_activation_does_not_hold_the_vcpu() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let mut t = MmioTransport::new(
            Box::new(Stuck(gate.clone())),
            Memory::new(memory(1 << 20)),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        // DRIVER_OK returns while the device is still starting; the registers answer.
        w(&mut t, 0x70, all);
        assert_eq!(r(&mut t, 0x70), all);
        assert_eq!(r(&mut t, 0x8), 26);
        r(&mut t, 0x60);
        drop(held);
        t.settle();
        // The activation failed: the device needs a reset, and a reset clears that.
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, 0x60) & VIRTIO_MMIO_INT_CONFIG, 0);
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn no_shared_memory_regions() {
        let (mut t, _) = transport();
        w(&mut t, 0xac, 0);
        for off in [0xb0, 0xb4, 0xb8, 0xbc] {
            assert_eq!(r(&mut t, off), u32::MAX, "{off:#x}");
        }
    }
}
