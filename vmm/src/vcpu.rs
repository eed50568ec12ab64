//! vCPUs: their initial state (CPUID, MSRs, FPU, LAPIC, and for the boot vCPU the registers
//! at the kernel entry) and the thread that runs each one, handling its exits.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd};
use nixvm_boot::cpu::{EntryState, Segment};
use nixvm_devices::bus::Bus;

use crate::lifecycle::{Exit, ExitState, PauseGate};

/// The buses a vCPU's exits go to.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set up vCPU {id}: {what}")]
    Setup {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs of vCPU {id}")]
    Msrs { id: u8, set: usize, wanted: usize },
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn setup_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Setup { id, what, source }
}

/// Sets up vCPU `id`; the boot vCPU (id 0) also gets the kernel entry state. The others wait
/// for the guest's INIT/SIPI in the in-kernel LAPIC.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    entry: Option<&EntryState>,
) -> Result<(), Error> {
    vcpu.set_cpuid2(cpuid).map_err(setup_err(id, "CPUID"))?;
    let msrs: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let wanted = msrs.len();
    let msrs = Msrs::from_entries(&msrs).expect("a handful of MSRs");
    let set = vcpu.set_msrs(&msrs).map_err(setup_err(id, "MSRs"))?;
    if set != wanted {
        return Err(Error::Msrs { id, set, wanted });
    }
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })
    .map_err(setup_err(id, "FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(setup_err(id, "LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(setup_err(id, "LAPIC"))?;
    if let Some(s) = entry {
        let mut sregs = vcpu
            .get_sregs()
            .map_err(setup_err(id, "special registers"))?;
        let code = kvm_seg(&s.code);
        let data = kvm_seg(&s.data);
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_seg(&s.tss);
        sregs.gdt.base = s.gdt_base;
        sregs.gdt.limit = s.gdt_limit;
        sregs.idt.base = s.idt_base;
        sregs.idt.limit = s.idt_limit;
        sregs.cr0 = s.cr0;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.efer = s.efer;
        vcpu.set_sregs(&sregs)
            .map_err(setup_err(id, "special registers"))?;
        let regs = kvm_regs {
            rip: s.rip,
            rsp: s.rsp,
            rbp: s.rsp,
            rsi: s.rsi,
            rbx: s.rbx,
            rflags: s.rflags,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(setup_err(id, "registers"))?;
    }
    Ok(())
}

/// A vCPU's architectural state as it was before the guest first ran: restoring it (and the
/// MSRs `configure` sets) is a reset for `--on-reboot restart`.
pub struct InitialState {
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_bindings::kvm_lapic_state,
    mp_state: kvm_bindings::kvm_mp_state,
    events: kvm_bindings::kvm_vcpu_events,
    xcrs: Option<kvm_bindings::kvm_xcrs>,
}

// KVM's paravirtual MSRs point into guest memory; a rebooted guest must not find the old
// kernel's addresses there (KVM would keep writing the clock to them).
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

impl InitialState {
    pub fn save(vcpu: &VcpuFd, id: u8) -> Result<InitialState, Error> {
        let e = |what| setup_err(id, what);
        Ok(InitialState {
            regs: vcpu.get_regs().map_err(e("registers"))?,
            sregs: vcpu.get_sregs().map_err(e("special registers"))?,
            fpu: vcpu.get_fpu().map_err(e("FPU"))?,
            lapic: vcpu.get_lapic().map_err(e("LAPIC"))?,
            mp_state: vcpu.get_mp_state().map_err(e("MP state"))?,
            events: vcpu.get_vcpu_events().map_err(e("events"))?,
            xcrs: vcpu.get_xcrs().ok(),
        })
    }

    /// Puts the vCPU back as it was before the first boot.
    pub fn restore(&self, vcpu: &VcpuFd, id: u8, cpuid: &CpuId) -> Result<(), Error> {
        let e = |what| setup_err(id, what);
        configure(vcpu, id, cpuid, None)?;
        let pv: Vec<kvm_msr_entry> = [
            MSR_KVM_SYSTEM_TIME_NEW,
            MSR_KVM_WALL_CLOCK_NEW,
            MSR_KVM_ASYNC_PF_EN,
            MSR_KVM_STEAL_TIME,
            MSR_KVM_PV_EOI_EN,
        ]
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
        // Best effort: a host without one of them never let the guest set it either.
        for m in pv {
            let one = Msrs::from_entries(&[m]).expect("one MSR");
            let _ = vcpu.set_msrs(&one);
        }
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).map_err(e("XCRs"))?;
        }
        vcpu.set_sregs(&self.sregs)
            .map_err(e("special registers"))?;
        vcpu.set_regs(&self.regs).map_err(e("registers"))?;
        vcpu.set_fpu(&self.fpu).map_err(e("FPU"))?;
        vcpu.set_lapic(&self.lapic).map_err(e("LAPIC"))?;
        vcpu.set_vcpu_events(&self.events).map_err(e("events"))?;
        vcpu.set_mp_state(self.mp_state).map_err(e("MP state"))?;
        Ok(())
    }
}

fn kvm_seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: u8::from(s.present == 0),
        padding: 0,
    }
}

/// Sets the delivery mode (bits 8..10) of a local vector table entry.
fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

/// Runs a vCPU until the VM stops (`stop` set and the thread kicked with a signal) or the
/// guest does something that ends the VM.
pub fn run(
    mut vcpu: VcpuFd,
    id: u8,
    bus: Arc<Buses>,
    exit: Arc<ExitState>,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
) -> VcpuFd {
    gate.register();
    if id == 0 {
        // benches/boot.rs reads this line: nixvm's own setup time.
        log::info!(
            "vcpu0: first KVM_RUN {} ms after start",
            crate::lifecycle::started().elapsed().as_millis()
        );
    }
    // Exits by kind, logged when the thread ends (NIXVM_LOG=debug; issue 18's breakdown).
    let mut counts = log::log_enabled!(log::Level::Debug).then(ExitCounts::default);
    while !stop.load(Ordering::Acquire) {
        gate.wait_while_paused();
        if stop.load(Ordering::Acquire) {
            break;
        }
        let result = vcpu.run();
        if let Some(c) = &mut counts {
            c.count(&result);
        }
        match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !bus.pio.read(u64::from(port), data) {
                    log::trace!("vcpu{id}: read of unknown port {port:#x}");
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !(0x3f8..0x400).contains(&port) {
                    log::trace!("vcpu{id}: out {port:#x} {data:x?}");
                }
                if !bus.pio.write(u64::from(port), data) {
                    log::trace!("vcpu{id}: write to unknown port {port:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !bus.mmio.read(addr, data) {
                    log::debug!("vcpu{id}: read of unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !bus.mmio.write(addr, data) {
                    log::debug!("vcpu{id}: write to unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                // At most once per boot: the reset ends this run of the guest.
                log::warn!(
                    "vCPU {id}: triple fault in the guest{}; resetting it",
                    where_it_stopped(&vcpu)
                );
                exit.request_exit(Exit::Reset);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => exit.request_exit(Exit::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => exit.request_exit(Exit::Reset),
                other => log::warn!("vcpu{id}: ignored system event {other}"),
            },
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::InternalError) => {
                exit.request_exit(Exit::Failed(format!(
                    "vCPU {id}: KVM internal error (emulation failure)"
                )));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                exit.request_exit(Exit::Failed(format!(
                    "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
                )));
            }
            Ok(other) => log::warn!("vcpu{id}: ignored exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => exit.request_exit(Exit::Failed(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
        if exit.is_exiting() {
            break;
        }
    }
    if let Some(c) = counts {
        log::debug!("vcpu{id}: exits: {c}");
    }
    vcpu
}

/// How many exits of each kind a vCPU took: port I/O by port, MMIO by 4 KiB page, the rest
/// by kind.
#[derive(Default)]
struct ExitCounts {
    pio: BTreeMap<u16, u64>,
    mmio: BTreeMap<u64, u64>,
    hlt: u64,
    intr: u64,
    other: u64,
}

impl ExitCounts {
    fn count(&mut self, exit: &Result<VcpuExit, kvm_ioctls::Error>) {
        match exit {
            Ok(VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _)) => {
                *self.pio.entry(*port).or_default() += 1;
            }
            Ok(VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _)) => {
                *self.mmio.entry(addr & !0xfff).or_default() += 1;
            }
            Ok(VcpuExit::Hlt) => self.hlt += 1,
            Ok(VcpuExit::Intr) | Err(_) => self.intr += 1,
            Ok(_) => self.other += 1,
        }
    }
}

impl std::fmt::Display for ExitCounts {
    /// "N in all; port I/O N (0x3f8 ×N, …); MMIO N (0xd0000000 ×N, …); HLT N; …", the
    /// busiest ports and pages first.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn busiest<K: std::fmt::LowerHex + Copy>(m: &BTreeMap<K, u64>) -> String {
            let mut v: Vec<(K, u64)> = m.iter().map(|(k, n)| (*k, *n)).collect();
            v.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
            let shown: Vec<String> = v
                .iter()
                .take(12)
                .map(|(k, n)| format!("{k:#x} ×{n}"))
                .collect();
            shown.join(", ")
        }
        let (pio, mmio) = (
            self.pio.values().sum::<u64>(),
            self.mmio.values().sum::<u64>(),
        );
        write!(
            f,
            "{} in all; port I/O {pio} ({}); MMIO {mmio} ({}); HLT {}; signals/interrupted {}; other {}",
            pio + mmio + self.hlt + self.intr + self.other,
            busiest(&self.pio),
            busiest(&self.mmio),
            self.hlt,
            self.intr,
            self.other
        )
    }
}

/// Where the vCPU stopped (for the triple-fault warning): " at RIP … (…)", or nothing if
/// KVM would not say.
fn where_it_stopped(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => stopped_at(&r, &s),
        _ => String::new(),
    }
}

/// [`where_it_stopped`] from the registers. KVM on AMD (SVM) puts a vCPU that triple-faulted
/// into its INIT state before it reports the shutdown (the VMCB is undefined after a SHUTDOWN
/// intercept: `shutdown_interception` in arch/x86/kvm/svm/svm.c), so the reset vector there
/// says nothing about where the guest was.
fn stopped_at(r: &kvm_regs, s: &kvm_bindings::kvm_sregs) -> String {
    if r.rip == 0xfff0 && s.cs.selector == 0xf000 && s.cs.base == 0xffff_0000 {
        return " (where is unknown: KVM left the vCPU in its INIT state, as it does on AMD)"
            .into();
    }
    format!(
        " at RIP {:#x} (RSP {:#x}, CR0 {:#x}, CR2 {:#x}, CR3 {:#x}, CR4 {:#x}, EFER {:#x}, \
         IDT {:#x}+{:#x}, CS {:#x})",
        r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit, s.cs.selector
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triple_fault_place_unless_init_state() {
        let mut r = kvm_regs {
            rip: 0xffff_ffff_8100_1234,
            ..Default::default()
        };
        let mut s = kvm_bindings::kvm_sregs::default();
        s.cs.selector = 0x10;
        assert!(stopped_at(&r, &s).starts_with(" at RIP 0xffffffff81001234 "));
        // What KVM on AMD reports after a triple fault: the INIT state.
        r.rip = 0xfff0;
        s.cs.selector = 0xf000;
        s.cs.base = 0xffff_0000;
        assert!(stopped_at(&r, &s).contains("unknown"));
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x20;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x20);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }

    #[test]
    fn segments_convert() {
        let s =
            nixvm_boot::cpu::segment_from_gdt(nixvm_boot::cpu::gdt_entry(0xa09b, 0, 0xfffff), 1);
        let k = kvm_seg(&s);
        assert_eq!(
            (k.selector, k.l, k.present, k.unusable, k.limit),
            (8, 1, 1, 0, 0xffff_ffff)
        );
    }
}
