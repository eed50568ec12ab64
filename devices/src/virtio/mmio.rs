//! The virtio-mmio transport, register layout version 2 (virtio 1.x, no legacy).
//!
//! The driver's register accesses arrive here from vCPU exits (except QueueNotify, which the
//! vmm turns into a KVM ioeventfd per queue). Anything a driver writes out of order or out
//! of range is ignored with a warning; nothing here panics on guest input.
use std::sync::Arc;

use virtio_bindings::virtio_mmio as mmio;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::BusDevice;
use crate::lock;

use super::transport::{TransportRegisters, VirtioCommon};
use super::{Memory, MmioInterrupt, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VirtioDevice};

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
    common: VirtioCommon<MmioInterrupt>,
    /// Where the driver's InterruptACK writes go (never read: see [`INTERRUPT_ACK`]).
    ack_sink: EventFd,
}

impl MmioTransport {
    /// `irq_evt` is the eventfd wired to this device's interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Memory,
        irq_evt: EventFd,
    ) -> std::io::Result<Self> {
        let irq = Arc::new(MmioInterrupt::new(irq_evt));
        Ok(MmioTransport {
            common: VirtioCommon::new("virtio-mmio", device, mem, irq)?,
            ack_sink: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// One eventfd per queue: the vmm registers each as an ioeventfd on QueueNotify.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.common.queue_evts
    }

    /// The eventfd the vmm registers on InterruptACK for each of [`ACK_VALUES`].
    pub fn ack_sink(&self) -> &EventFd {
        &self.ack_sink
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let c = &mut self.common;
        if offset >= CONFIG {
            lock(&c.device).read_config(offset - CONFIG, data);
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
            DEVICE_ID => c.device_type,
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => c.device_features_page(),
            QUEUE_NUM_MAX => c.queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => c.queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => {
                let direct = c.active && c.signals_directly;
                c.irq.take() | if direct { VIRTIO_MMIO_INT_VRING } else { 0 }
            }
            STATUS => c.read_status(),
            // SHMLen and SHMBase: no shared memory regions, which the spec says as all ones
            // (a zero length would be a region; virtio-fs would try to use it for DAX).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => c.config_generation,
            _ => {
                crate::guest_warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let c = &mut self.common;
        if offset >= CONFIG {
            lock(&c.device).write_config(offset - CONFIG, data);
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
        match offset {
            DEVICE_FEATURES_SEL => c.device_features_sel = v,
            DRIVER_FEATURES => c.write_driver_features(v),
            DRIVER_FEATURES_SEL => c.driver_features_sel = v,
            QUEUE_SEL => c.queue_sel = v,
            QUEUE_NUM => {
                if let Some(q) = c.selected_queue() {
                    // virtio-queue checks the size (power of two, not above max) itself.
                    q.set_size(u16::try_from(v).unwrap_or(0));
                }
            }
            QUEUE_READY => {
                if let Some(q) = c.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => c.notify(v),
            INTERRUPT_ACK => {} // acknowledged by the read
            STATUS => c.set_status(v),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH
            | QUEUE_USED_LOW | QUEUE_USED_HIGH => {
                if let Some(q) = c.selected_queue() {
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
        self.common.reset();
    }
}

impl TransportRegisters for MmioTransport {
    type Irq = MmioInterrupt;
    fn common(&self) -> &VirtioCommon<MmioInterrupt> {
        &self.common
    }
    fn common_mut(&mut self) -> &mut VirtioCommon<MmioInterrupt> {
        &mut self.common
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::VIRTIO_MMIO_INT_CONFIG;
    use crate::virtio::test_utils::{Probe, memory};
    use crate::virtio::transport::*;
    use crate::virtio::{F_EVENT_IDX, F_VERSION_1, Interrupt};
    use std::sync::Mutex;
    use virtio_queue::Queue;

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
