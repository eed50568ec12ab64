//! KVM's GSI routing with MSI routes: the vectors of PCI functions (virtio-pci's MSI-X)
//! reach the guest's local APICs through GSIs from `layout::MSI_GSI_START` up, each bound
//! to its vector's eventfd (an irqfd) while the vector may fire.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use nixvm_boot::layout;
use nixvm_devices::lock;
use nixvm_devices::pci::{MsiMessage, MsiRoutes};
use vmm_sys_util::eventfd::EventFd;

/// The VM's routing table: KVM's default IOAPIC and PIC routes, and the MSI routes.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    msi: BTreeMap<u32, MsiMessage>,
    next: u32,
}

impl GsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Arc<Mutex<GsiRouting>> {
        Arc::new(Mutex::new(GsiRouting {
            vm,
            msi: BTreeMap::new(),
            next: layout::MSI_GSI_START,
        }))
    }

    fn allocate(&mut self) -> u32 {
        let gsi = self.next;
        self.next += 1;
        gsi
    }

    /// Routes `gsi` to `message`, or removes its route; KVM gets the whole table again.
    fn set(&mut self, gsi: u32, message: Option<MsiMessage>) -> Result<(), String> {
        match message {
            Some(m) => self.msi.insert(gsi, m),
            None => self.msi.remove(&gsi),
        };
        let routing = KvmIrqRouting::from_entries(&self.entries()).map_err(|e| format!("{e:?}"))?;
        self.vm.set_gsi_routing(&routing).map_err(|e| e.to_string())
    }

    /// What KVM routes by itself (its default table, which setting a table replaces): GSIs
    /// 0-15 to the IOAPIC pin and the PIC pin of the same number, 16-23 to the IOAPIC;
    /// then the MSI routes.
    fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            e
        };
        let mut entries = Vec::with_capacity(40 + self.msi.len());
        for gsi in 0..layout::MSI_GSI_START {
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 16 {
                let pic = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip(gsi, pic, gsi % 8));
            }
        }
        for (&gsi, m) in &self.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = (m.address & 0xffff_ffff) as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        entries
    }
}

/// One PCI function's vectors: a GSI and an eventfd each.
pub struct VectorRoutes {
    routing: Arc<Mutex<GsiRouting>>,
    /// GSI, eventfd, whether the eventfd is bound to the GSI now.
    vectors: Vec<(u32, EventFd, bool)>,
}

impl VectorRoutes {
    /// GSIs for `vectors` (the eventfds the function raises them with).
    pub fn new(routing: &Arc<Mutex<GsiRouting>>, vectors: Vec<EventFd>) -> VectorRoutes {
        let mut r = lock(routing);
        let vectors = vectors
            .into_iter()
            .map(|e| (r.allocate(), e, false))
            .collect();
        VectorRoutes {
            routing: routing.clone(),
            vectors,
        }
    }
}

impl MsiRoutes for VectorRoutes {
    /// Unbinds a vector before its route goes, and binds it once the route is there: an
    /// interrupt raised while it is unbound stays in the eventfd and is delivered when KVM
    /// binds it again.
    fn route(&mut self, vector: usize, message: Option<MsiMessage>) {
        let Some((gsi, evt, bound)) = self.vectors.get_mut(vector) else {
            return;
        };
        let mut routing = lock(&self.routing);
        let result = (|| {
            if message.is_none() && *bound {
                routing
                    .vm
                    .unregister_irqfd(evt, *gsi)
                    .map_err(|e| e.to_string())?;
                *bound = false;
            }
            routing.set(*gsi, message)?;
            if message.is_some() && !*bound {
                routing
                    .vm
                    .register_irqfd(evt, *gsi)
                    .map_err(|e| e.to_string())?;
                *bound = true;
            }
            Ok::<(), String>(())
        })();
        if let Err(e) = result {
            nixvm_devices::guest_warn!("pci: cannot route MSI-X vector {vector} (GSI {gsi}): {e}");
        }
    }
}
