//! The guest-physical memory layout of an x86_64 nixvm guest.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4, then PDPT and 4 PDs (identity map of 4 GiB)
//! 0x0000_6000  PVH start_info + tables  0x0002_0000  kernel command line
//! 0x0000_7000  zero page (boot_params)  0x0009_fc00  EBDA start (end of low RAM)
//! 0x0000_8ff0  boot stack               0x000e_0000  ACPI tables (RSDP first), reserved
//!                                       0x000f_0000  SMBIOS entry point and tables, reserved
//! 0x0010_0000  high RAM: kernel, initrd (placed as high as allowed), ...
//! 0xc000_0000  32-bit MMIO gap up to 4 GiB: PCI BARs, virtio-mmio devices from 0xd000_0000, IOAPIC,
//!              LAPIC, KVM TSS/identity map
//! 0x1_0000_0000 the RAM above 3 GiB, if any
//! ```
use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// The largest command line we accept (Linux's COMMAND_LINE_SIZE on x86 is 2048, NUL included).
pub const CMDLINE_MAX_LEN: usize = 2047;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0xf_0000;
/// The SMBIOS entry point (the start of the BIOS area a guest without firmware scans) and
/// the structures after it, up to the reset vector.
pub const SMBIOS_START: u64 = 0xf_0000;
pub const SMBIOS_END: u64 = BIOS_RESET_VECTOR;
/// Where a real-mode `ljmp $0xf000,$0xfff0` lands: Linux's last-resort "BIOS" reboot.
pub const BIOS_RESET_VECTOR: u64 = 0xf_fff0;
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; RAM beyond it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// PCI BARs (virtio-pci devices, `--transport pci`): the host bridge's memory window, from
/// the start of the gap up to the virtio-mmio windows.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO_END: u64 = VIRTIO_MMIO_START;
/// virtio-mmio devices: one 4 KiB window each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC inputs free for devices: not the legacy ones (0-4 timer/keyboard/serial, 8 RTC,
/// 9 ACPI, 12 mouse).
pub const DEVICE_GSIS: [u32; 16] = [5, 6, 7, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;

// The machine's I/O ports and interrupt lines (the ACPI tables describe them, the vmm wires
// devices to them).
/// The first serial port (8 ports), always present, and its interrupt.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// The i8042 controller: data port 0x60 and command port 0x64, one 5-port range.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORTS: u64 = 5;
/// The keyboard's interrupt, when there is a keyboard.
pub const I8042_IRQ: u32 = 1;
/// The CMOS RTC: index and data ports.
pub const CMOS_PORT: u16 = 0x70;
pub const CMOS_PORTS: u64 = 2;
/// PCI configuration mechanism #1: the address register at 0xCF8, the data at 0xCFC.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_PORTS: u64 = 8;
/// The first GSI for MSI routes (past the IOAPIC's 24 inputs).
pub const MSI_GSI_START: u32 = 24;
/// The FADT sleep control/status register and, next to it, the reset register.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const RESET_PORT: u16 = 0x601;
pub const PM_PORTS: u64 = 2;
/// The ACPI power management timer (32-bit port, 24-bit count): where QEMU's q35 and Cloud
/// Hypervisor have theirs.
pub const PM_TIMER_PORT: u16 = 0x608;
pub const PM_TIMER_PORTS: u64 = 4;
/// The interrupt of the Generic Event Device: it only ever means "power button pressed".
pub const GED_GSI: u32 = 9;

/// Smallest guest memory nixvm accepts.
pub const MIN_MEMORY: u64 = 64 << 20;

/// Kinds of address ranges in the e820 / PVH memory map (same numbering in both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the guest's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    pub start: u64,
    pub size: u64,
    pub kind: RangeKind,
}

/// The RAM regions backing `mem_size` bytes of guest memory, skipping the 32-bit MMIO gap.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// The memory map the guest sees (e820 for bzImage, the PVH memmap for ELF).
pub fn memory_map(mem_size: u64) -> Vec<MemoryRange> {
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut map = vec![
        MemoryRange {
            start: 0,
            size: EBDA_START,
            kind: RangeKind::Ram,
        },
        MemoryRange {
            start: ACPI_START,
            size: HIGH_RAM_START - ACPI_START,
            kind: RangeKind::Reserved,
        },
        MemoryRange {
            start: HIGH_RAM_START,
            size: low_end - HIGH_RAM_START,
            kind: RangeKind::Ram,
        },
    ];
    if mem_size > MMIO_GAP_START {
        map.push(MemoryRange {
            start: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: RangeKind::Ram,
        });
    }
    map
}

/// The end (exclusive) of the RAM below the MMIO gap: the highest place an initrd can go.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let map = memory_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].start + map[2].size, 512 << 20);
        assert!(map.iter().all(|r| r.start + r.size <= 512 << 20));
    }

    #[test]
    fn large_memory_skips_the_gap() {
        let size = 4u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            regions[1],
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START)
        );
        let ram: u64 = memory_map(size)
            .iter()
            .filter(|r| r.kind == RangeKind::Ram)
            .map(|r| r.size)
            .sum();
        // All RAM but the EBDA..1 MiB window is usable.
        assert_eq!(ram, size - (HIGH_RAM_START - EBDA_START));
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
    }

    #[test]
    fn map_is_sorted_and_disjoint() {
        for size in [MIN_MEMORY, 384 << 20, 3 << 30, 5 << 30] {
            let map = memory_map(size);
            for w in map.windows(2) {
                assert!(w[0].start + w[0].size <= w[1].start, "{size:#x}: {w:?}");
            }
        }
    }

    #[test]
    fn fixed_structures_fit_below_the_ebda() {
        for a in [
            GDT_START,
            PVH_INFO_START,
            ZERO_PAGE_START,
            PML4_START,
            PDE_START + 4 * 0x1000,
        ] {
            assert!(a <= CMDLINE_START);
        }
        assert!(CMDLINE_START + (CMDLINE_MAX_LEN as u64) < EBDA_START);
    }
}
