//! The boot vCPU's state at the kernel entry: GDT, identity page tables, control registers.
//!
//! Described here without KVM types; the vmm crate turns [`EntryState`] into `kvm_sregs`/`kvm_regs`.
use vm_memory::{Bytes, GuestAddress};

use crate::kernel::Entry;
use crate::layout;
use vm_memory::GuestMemoryBackend;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// Number of 1 GiB page directories in the boot identity map (covers 0..4 GiB).
const IDENTITY_MAP_GIB: u64 = 4;
const IDT_START: u64 = layout::GDT_START + 0x20;

/// A segment as KVM wants it, decoded from its GDT descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
}

/// Builds a GDT descriptor from access/flags (`0xF0FF` layout: flags<<12 | access), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT descriptor into a segment with the given table index.
#[expect(
    clippy::cast_possible_truncation,
    reason = "each field is masked to its width first"
)]
pub fn segment_from_gdt(entry: u64, index: u16) -> Segment {
    let limit = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let g = ((entry >> 55) & 1) as u8;
    Segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With 4 KiB granularity the limit counts pages: KVM wants it in bytes.
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
    }
}

/// Register state of the boot vCPU at the kernel's entry point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    /// bzImage: address of the zero page.
    pub rsi: u64,
    /// PVH: address of hvm_start_info.
    pub rbx: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub code: Segment,
    pub data: Segment,
    pub tss: Segment,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub idt_base: u64,
    pub idt_limit: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write the boot GDT or page tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Writes the GDT (and, for the 64-bit entry, identity page tables) and returns the entry state.
/// `params` is the zero page or start_info address from [`crate::params::write_boot_params`].
pub fn setup_entry(
    mem: &impl GuestMemoryBackend,
    entry: &Entry,
    params: GuestAddress,
) -> Result<EntryState, Error> {
    let long_mode = matches!(entry, Entry::BzImage { .. });
    let code = if long_mode {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    let gdt = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_START + 8 * i as u64))
            .map_err(Error::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(Error::Write)?;
    let mut state = EntryState {
        rflags: 0x2,
        code: segment_from_gdt(gdt[1], 1),
        data: segment_from_gdt(gdt[2], 2),
        tss: segment_from_gdt(gdt[3], 3),
        gdt_base: layout::GDT_START,
        gdt_limit: u16::try_from(std::mem::size_of_val(&gdt) - 1).expect("4 entries"),
        idt_base: IDT_START,
        idt_limit: 7,
        ..Default::default()
    };
    write_reset_vector(mem)?;
    match *entry {
        Entry::BzImage { entry, .. } => {
            write_identity_map(mem)?;
            state.rip = entry.0;
            state.rsp = layout::BOOT_STACK_POINTER;
            state.rsi = params.0;
            state.cr0 = CR0_PE | CR0_ET | CR0_PG;
            state.cr3 = layout::PML4_START;
            state.cr4 = CR4_PAE;
            state.efer = EFER_LME | EFER_LMA;
        }
        Entry::Pvh { entry } => {
            state.rip = entry.0;
            state.rbx = params.0;
            state.cr0 = CR0_PE | CR0_ET;
        }
    }
    Ok(state)
}

/// Real-mode code at the BIOS reset vector: `mov al,0xfe; out 0x64,al; hlt; jmp $-1`.
const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes the reset-vector stub. On a hardware-reduced ACPI platform without EFI, Linux's
/// reboot falls through to jumping to the BIOS at F000:FFF0; there is no BIOS, so the stub
/// pulses the i8042 reset line, and every reboot method ends in a reset.
pub fn write_reset_vector(mem: &impl GuestMemoryBackend) -> Result<(), Error> {
    mem.write_slice(&RESET_STUB, GuestAddress(layout::BIOS_RESET_VECTOR))
        .map_err(Error::Write)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: PML4 → one PDPT → four page directories.
fn write_identity_map(mem: &impl GuestMemoryBackend) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).map_err(Error::Write);
    w(layout::PDPTE_START | PRESENT_RW, layout::PML4_START)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = layout::PDE_START + gib * 0x1000;
        w(pd | PRESENT_RW, layout::PDPTE_START + gib * 8)?;
        for i in 0..512u64 {
            w(((gib * 512 + i) << 21) | PRESENT_RW | HUGE, pd + i * 8)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bootparam::setup_header;

    fn mem() -> vm_memory::GuestMemoryMmap {
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_as_kvm_expects() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (
                code64.selector,
                code64.type_,
                code64.l,
                code64.db,
                code64.s,
                code64.present
            ),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.g), (0, 1, 1));
        let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (24, 0xb, 0));
        let seg = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 2);
        assert_eq!((seg.base, seg.limit, seg.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn long_mode_entry_maps_4gib_identically() {
        let m = mem();
        let e = Entry::BzImage {
            entry: GuestAddress(0x10_0200),
            header: setup_header::default(),
        };
        let s = setup_entry(&m, &e, GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!(
            (s.rip, s.rsi, s.cr3),
            (0x10_0200, layout::ZERO_PAGE_START, layout::PML4_START)
        );
        assert!(s.cr0 & CR0_PG != 0 && s.cr4 & CR4_PAE != 0 && s.efer & EFER_LMA != 0);
        let r = |a: u64| m.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(layout::PML4_START), layout::PDPTE_START | 3);
        // The page for address 3.5 GiB maps to itself.
        let addr: u64 = 0xe000_0000;
        let pd = r(layout::PDPTE_START + (addr >> 30) * 8) & !0xfff;
        assert_eq!(r(pd + ((addr >> 21) & 511) * 8), addr | 0x83);
        assert_eq!(r(layout::GDT_START), 0);
        let mut stub = [0u8; 4];
        m.read_slice(&mut stub, GuestAddress(layout::BIOS_RESET_VECTOR))
            .unwrap();
        assert_eq!(stub, [0xb0, 0xfe, 0xe6, 0x64], "mov al,0xfe; out 0x64,al");
    }

    #[test]
    fn pvh_entry_is_32bit_protected_mode() {
        let m = mem();
        let s = setup_entry(
            &m,
            &Entry::Pvh {
                entry: GuestAddress(0x100_0000),
            },
            GuestAddress(0x6000),
        )
        .unwrap();
        assert_eq!((s.rip, s.rbx), (0x100_0000, 0x6000));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer, 0);
        assert_eq!((s.code.l, s.code.db), (0, 1));
    }
}
