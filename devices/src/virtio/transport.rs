//! What the two transports (virtio-mmio and virtio-pci) share: feature negotiation, the
//! device status state machine, queue set-up, activation and reset. The transports only
//! decode their registers into these calls, and differ in how an interrupt reaches the
//! driver ([`TransportInterrupt`]).
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_config;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::lock;

use super::{F_EVENT_IDX, F_VERSION_1, Interrupt, Memory, VIRTIO_MMIO_INT_CONFIG, VirtioDevice};

pub const STATUS_ACKNOWLEDGE: u32 = virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const STATUS_DRIVER: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER;
pub const STATUS_DRIVER_OK: u32 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_NEEDS_RESET: u32 = virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
pub const STATUS_FAILED: u32 = virtio_config::VIRTIO_CONFIG_S_FAILED;

/// A transport's interrupt: what [`Interrupt`] gives the device, and what the transport
/// itself reads back and clears.
pub trait TransportInterrupt: Interrupt + 'static {
    /// The device asked for a reset ([`Interrupt::needs_reset`]).
    fn broken(&self) -> bool;
    /// Forgets pending interrupts and a reset request (the device was reset).
    fn clear(&self);
}

/// The transport-independent state of one virtio device.
pub struct VirtioCommon<I> {
    /// Locked by the transport for config space and feature negotiation, and by the
    /// activation thread while the device starts: a vCPU never waits for an activation (a
    /// vhost-user handshake) unless it touches that device's config space meanwhile.
    pub device: Arc<Mutex<Box<dyn VirtioDevice>>>,
    /// What the transport needs of the device at any time, read once.
    pub device_type: u32,
    queue_max_sizes: Vec<u16>,
    pub signals_directly: bool,
    /// The thread activating the device, while it runs (joined at reset).
    activation: Option<JoinHandle<()>>,
    mem: Memory,
    pub irq: Arc<I>,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub status: u32,
    pub active: bool,
    /// Bumped whenever the device's config space changes under the driver.
    pub config_generation: u32,
    /// The transport's name, for warnings.
    name: &'static str,
}

impl<I: TransportInterrupt> VirtioCommon<I> {
    pub fn new(
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        mem: Memory,
        irq: Arc<I>,
    ) -> std::io::Result<Self> {
        let queue_evts = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let queue_max_sizes = device.queue_max_sizes().to_vec();
        let queues = fresh_queues(&queue_max_sizes);
        Ok(VirtioCommon {
            device_type: device.device_type(),
            signals_directly: device.signals_directly(),
            queue_max_sizes,
            activation: None,
            device: Arc::new(Mutex::new(device)),
            mem,
            irq,
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            status: 0,
            active: false,
            config_generation: 0,
            name,
        })
    }

    /// The queue the driver selected, while queues may be configured (before the device
    /// runs).
    pub fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.active || self.status & STATUS_FEATURES_OK == 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The selected queue, to read its settings.
    pub fn queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    pub fn device_features(&self) -> u64 {
        lock(&self.device).avail_features() | F_VERSION_1
    }

    /// The device features of the page the driver selected.
    pub fn device_features_page(&self) -> u32 {
        match self.device_features_sel {
            0 => low_half(self.device_features()),
            1 => low_half(self.device_features() >> 32),
            _ => 0,
        }
    }

    /// The driver's features for the selected page, while it may still choose.
    pub fn write_driver_features(&mut self, v: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            crate::guest_warn!("{}: driver features outside negotiation ignored", self.name);
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => crate::guest_warn!(
                "{}: driver features page {} ignored",
                self.name,
                self.driver_features_sel
            ),
        }
    }

    /// The device status as the driver reads it.
    pub fn read_status(&self) -> u32 {
        self.status
            | if self.irq.broken() {
                STATUS_NEEDS_RESET
            } else {
                0
            }
    }

    /// The selected queue's notification, as if its ioeventfd had fired (a transport's
    /// notify register reached nixvm itself).
    pub fn notify(&self, queue: u32) {
        match self.queue_evts.get(queue as usize) {
            Some(evt) => {
                let _ = evt.write(1);
            }
            None => crate::guest_warn!("{}: notify of unknown queue {queue}", self.name),
        }
    }

    /// Resets the device, as a driver writing 0 to the status does.
    pub fn reset(&mut self) {
        self.settle();
        if self.active && !lock(&self.device).reset() {
            crate::guest_warn!(
                "{}: device type {} cannot be reset",
                self.name,
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
        self.irq.clear();
    }

    pub fn set_status(&mut self, v: u32) {
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
                "{}: status {v:#x} drops bits of {:#x}; ignored",
                self.name,
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let unknown = self.acked_features & !self.device_features();
            if unknown != 0 || self.acked_features & F_VERSION_1 == 0 {
                crate::guest_warn!(
                    "{}: driver accepted features {unknown:#x} we did not offer, or not VERSION_1",
                    self.name
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
                "{}: the driver gave up on device type {}",
                self.name,
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
                    "{}: queue {i} of device type {} is not valid",
                    self.name,
                    self.device_type
                );
                self.irq.needs_reset();
                return;
            }
            q.set_event_idx(event_idx);
            let evt = match self.queue_evts[i].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    log::error!("{}: {e}", self.name);
                    self.irq.needs_reset();
                    return;
                }
            };
            queues.push((q, evt));
        }
        let (device, mem, irq, device_type, name) = (
            self.device.clone(),
            self.mem.clone(),
            self.irq.clone(),
            self.device_type,
            self.name,
        );
        let started = std::thread::Builder::new()
            .name(format!("virtio-{device_type}-activate"))
            .spawn(move || {
                let irq_dyn: Arc<dyn Interrupt> = irq.clone();
                if let Err(e) = lock(&device).activate(mem, irq_dyn, queues) {
                    crate::guest_warn!("{name}: cannot activate device type {device_type}: {e}");
                    irq.needs_reset();
                }
            });
        match started {
            Ok(h) => {
                self.active = true;
                self.activation = Some(h);
            }
            Err(e) => {
                log::error!("{}: cannot start device type {device_type}: {e}", self.name);
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

/// A virtio device on a transport, as the vmm handles it after building it: reset with the
/// machine, its link set by a monitor.
pub trait VirtioTransport: crate::bus::BusDevice {
    fn device_type(&self) -> u32;
    /// [`VirtioCommon::set_link`].
    fn set_link(&mut self, up: bool) -> bool;
    /// [`VirtioCommon::settle`].
    fn settle(&mut self);
}

/// A transport: the registers it decodes over the one state machine.
pub trait TransportRegisters: crate::bus::BusDevice {
    type Irq: TransportInterrupt;
    fn common(&self) -> &VirtioCommon<Self::Irq>;
    fn common_mut(&mut self) -> &mut VirtioCommon<Self::Irq>;
}

impl<T: TransportRegisters> VirtioTransport for T {
    fn device_type(&self) -> u32 {
        self.common().device_type
    }
    fn set_link(&mut self, up: bool) -> bool {
        self.common_mut().set_link(up)
    }
    fn settle(&mut self) {
        self.common_mut().settle();
    }
}

pub fn low_half(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked")
}

fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}
