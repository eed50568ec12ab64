//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with DSDT) and MADT.
//!
//! The platform is hardware-reduced ACPI (as Cloud Hypervisor's): no legacy PIC/PIT use by the
//! guest, power-off through the FADT sleep control register, reset through the reset register.
//! Devices (later: virtio-mmio, the power button) are described by AML appended to the DSDT.
use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    self, CMOS_PORT, CMOS_PORTS, COM1_IRQ, COM1_PORT, GED_GSI, I8042_IRQ, I8042_PORT,
    PCI_CONFIG_PORT, PM_TIMER_PORT, PM_TIMER_PORTS, RESET_PORT, SLEEP_CONTROL_PORT,
};
use vm_memory::GuestMemoryBackend;

const OEM_ID: [u8; 6] = *b"NIXVM ";
const OEM_TABLE_ID: [u8; 8] = *b"NIXVMTBL";
const OEM_REVISION: u32 = 1;

/// Writing this to the FADT reset register (`layout::RESET_PORT`) resets the machine.
pub const RESET_VALUE: u8 = 1;
/// The S5 (soft-off) sleep type that `\_S5_` announces.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register: SLP_TYP in bits 2..4, SLP_EN is bit 5.
pub const fn sleep_control_is_s5(value: u8) -> bool {
    value & (1 << 5) != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE
}

const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_PWR_BUTTON: u32 = 1 << 4; // set: no fixed-feature power button
const FADT_SLP_BUTTON: u32 = 1 << 5; // set: no fixed-feature sleep button

const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the ACPI tables ({0} bytes) do not fit in their reserved area")]
    TooLarge(u64),
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Debug, Default)]
pub struct AcpiConfig {
    pub cpus: u8,
    /// AML of the devices, appended to the DSDT.
    pub device_aml: Vec<u8>,
}

/// A virtio-mmio device as Linux's virtio_mmio driver finds it through ACPI (`LNRO0005`, as
/// QEMU's microvm machine describes them).
pub fn virtio_mmio_aml(index: u8, base: u64, size: u64, gsi: u32) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    // ACPI names are four characters: V, two hex digits, _.
    let name = format!(
        "_SB_.V{}{}_",
        HEX[usize::from(index >> 4)] as char,
        HEX[usize::from(index & 0xf)] as char
    );
    let (base, size) = (
        u32::try_from(base).expect("below 4 GiB"),
        u32::try_from(size).expect("small"),
    );
    let mut aml = Vec::new();
    aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &index),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, base, size),
                    &aml::Interrupt::new(true, true, false, false, gsi),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut aml);
    aml
}

/// The PCI host bridge of bus 0 (Linux finds its devices through configuration mechanism
/// #1) with BARs in `window` (start, end exclusive). Its devices use MSI-X, so there is no
/// `_PRT`.
pub fn pci_host_bridge_aml(window: (u64, u64)) -> Vec<u8> {
    let (start, end) = (
        u32::try_from(window.0).expect("below 4 GiB"),
        u32::try_from(window.1 - 1).expect("below 4 GiB"),
    );
    let mut aml = Vec::new();
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        start,
                        end,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut aml);
    aml
}

/// The same device for a guest booted with `acpi=off` (needs CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
/// The PS/2 keyboard behind the i8042 (PNP0303), for a VM a monitor sends keys to: Linux
/// finds the controller only through this (the FADT says there is no legacy i8042).
pub fn i8042_keyboard_aml() -> Vec<u8> {
    let mut out = Vec::new();
    aml::Device::new(
        "_SB_.KBD_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(I8042_PORT, I8042_PORT, 1, 1),
                    &aml::IO::new(I8042_PORT + 4, I8042_PORT + 4, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, I8042_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

pub fn virtio_mmio_cmdline(base: u64, size: u64, gsi: u32) -> String {
    format!("virtio_mmio.device={}K@{base:#x}:{gsi}", size >> 10)
}

/// The power button of a hardware-reduced platform (as Cloud Hypervisor's): a button device
/// (PNP0C0C) and a Generic Event Device (ACPI0013) whose interrupt makes Linux run `_EVT`,
/// which notifies the button; the button driver then reports KEY_POWER to systemd-logind or
/// acpid. The GED's interrupt has no other use, so `_EVT` needs no event register.
fn power_button_aml(body: &mut Vec<u8>) {
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(body);
    let button = aml::Path::new("\\_SB_.PWRB");
    let pressed: u8 = 0x80;
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_GSI,
                )]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&aml::Notify::new(&button, &pressed)],
            ),
        ],
    )
    .to_aml_bytes(body);
}

fn dsdt(config: &AcpiConfig) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut body);
    // COM1 must be described: a hardware-reduced platform has no legacy ISA interrupts, so the
    // guest only routes IRQ 4 for a device whose resources name it.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                    &aml::IO::new(COM1_PORT, COM1_PORT, 0, 8),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // The CMOS RTC, as QEMU's microvm describes it (PNP0B00): without it a hardware-reduced
    // guest's rtc_cmos fails to probe (-EINVAL) and there is no /dev/rtc0. No interrupt: the
    // clock raises none, and rtc_cmos then runs without alarms.
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    CMOS_PORT,
                    CMOS_PORT,
                    1,
                    u8::try_from(CMOS_PORTS).expect("two ports"),
                )]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    power_button_aml(&mut body);
    body.extend_from_slice(&config.device_aml);
    dsdt.append_slice(&body);
    dsdt
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // IAPC_BOOT_ARCH (offset 109) stays 0: no legacy devices, no i8042 to probe; the CMOS RTC
    // is there (its "not present" bit is clear).
    fadt.write(
        112,
        FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON,
    );
    // The PM timer, 24 bits (TMR_VAL_EXT clear). The spec lets a hardware-reduced OSPM ignore
    // these fields; Linux on x86 reads X_PM_TMR_BLK all the same (ACPICA does not fill the X
    // fields from the 32-bit ones in a hardware-reduced FADT, so it is set here itself).
    fadt.write(76, u32::from(PM_TIMER_PORT)); // PM_TMR_BLK
    fadt.write(91, u8::try_from(PM_TIMER_PORTS).expect("four ports")); // PM_TMR_LEN
    fadt.write(208, GenericAddress::io_port_address::<u32>(PM_TIMER_PORT)); // X_PM_TMR_BLK
    fadt.write(116, GenericAddress::io_port_address::<u8>(RESET_PORT));
    fadt.write(128, RESET_VALUE);
    fadt.write(131, 3u8); // FADT minor version: 6.3
    fadt.write(140, dsdt_addr); // X_DSDT
    fadt.write(
        244,
        GenericAddress::io_port_address::<u8>(SLEEP_CONTROL_PORT),
    );
    fadt.write(
        256,
        GenericAddress::io_port_address::<u8>(SLEEP_CONTROL_PORT),
    );
    fadt.write(268, *b"NIXVMKVM"); // hypervisor vendor identity
    fadt.update_checksum();
    fadt
}

fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write(36, u32::try_from(layout::APIC_START).expect("below 4 GiB"));
    for id in 0..cpus {
        // Processor UID, APIC id, flags: enabled.
        madt.append_slice(&[MADT_LOCAL_APIC, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![MADT_IO_APIC, 12, 0, 0];
    ioapic.extend_from_slice(
        &u32::try_from(layout::IOAPIC_START)
            .expect("below 4 GiB")
            .to_le_bytes(),
    );
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    madt.append_slice(&ioapic);
    // LINT1 of every processor is the NMI input.
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    madt.update_checksum();
    madt
}

/// Writes the tables at [`layout::ACPI_START`]; returns the RSDP's address.
pub fn write_acpi_tables(
    mem: &impl GuestMemoryBackend,
    config: &AcpiConfig,
) -> Result<GuestAddress, Error> {
    let rsdp_addr = layout::ACPI_START;
    let mut next = rsdp_addr + align16(Rsdp::len() as u64);
    let mut place = |sdt: &Sdt| -> Result<u64, Error> {
        let at = next;
        next = at + align16(sdt.len() as u64);
        if next > layout::ACPI_END {
            return Err(Error::TooLarge(next - rsdp_addr));
        }
        mem.write_slice(sdt.as_slice(), GuestAddress(at))
            .map_err(Error::Write)?;
        Ok(at)
    };
    let mut dsdt = dsdt(config);
    dsdt.update_checksum();
    let dsdt_addr = place(&dsdt)?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(config.cpus))?;
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.append(fadt_addr);
    xsdt.append(madt_addr);
    xsdt.update_checksum();
    let xsdt_addr = place(&xsdt)?;
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(Error::Write)?;
    Ok(GuestAddress(rsdp_addr))
}

fn align16(n: u64) -> u64 {
    n.div_ceil(16) * 16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> vm_memory::GuestMemoryMmap {
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn table(m: &impl GuestMemoryBackend, addr: u64) -> Vec<u8> {
        let len = m.read_obj::<u32>(GuestAddress(addr + 4)).unwrap() as usize;
        let mut t = vec![0u8; len];
        m.read_slice(&mut t, GuestAddress(addr)).unwrap();
        t
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_link_up_and_checksum() {
        let m = mem();
        let rsdp = write_acpi_tables(
            &m,
            &AcpiConfig {
                cpus: 4,
                device_aml: vec![],
            },
        )
        .unwrap();
        let mut r = [0u8; 36];
        m.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(sums_to_zero(&r[..20]) && sums_to_zero(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table(&m, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&m, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(sums_to_zero(&fadt));
        assert_eq!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & FADT_HW_REDUCED_ACPI,
            FADT_HW_REDUCED_ACPI
        );
        // The PM timer: X_PM_TMR_BLK a 32-bit I/O port register at PM_TIMER_PORT.
        assert_eq!(fadt[208..212], [1, 32, 0, 3]);
        assert_eq!(
            u64::from_le_bytes(fadt[212..220].try_into().unwrap()),
            u64::from(PM_TIMER_PORT)
        );
        assert_eq!(
            u32::from_le_bytes(fadt[76..80].try_into().unwrap()),
            u32::from(PM_TIMER_PORT)
        );
        assert_eq!(fadt[91], 4);
        let dsdt = table(&m, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(sums_to_zero(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        // PNP0B00, EISA-compressed, with the CMOS ports.
        assert!(dsdt.windows(4).any(|w| w == 0x000b_d041u32.to_le_bytes()));
        assert!(dsdt.windows(4).any(|w| w == b"RTC_"));
        let madt = table(&m, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(sums_to_zero(&madt));
        let lapics = madt[44..]
            .chunks(8)
            .take_while(|c| c[0] == MADT_LOCAL_APIC)
            .count();
        assert_eq!(lapics, 4);
        // All tables stay in the reserved window.
        for a in [xsdt_addr, entries[0], entries[1]] {
            assert!((layout::ACPI_START..layout::ACPI_END).contains(&a));
        }
    }

    #[test]
    fn device_aml_lands_in_the_dsdt() {
        let m = mem();
        let rsdp = write_acpi_tables(
            &m,
            &AcpiConfig {
                cpus: 1,
                device_aml: b"MARKER".to_vec(),
            },
        )
        .unwrap();
        let mut all = vec![0u8; (layout::ACPI_END - rsdp.0) as usize];
        m.read_slice(&mut all, rsdp).unwrap();
        assert!(all.windows(6).any(|w| w == b"MARKER"));
        // The power button and its event device are always there.
        for id in [
            &b"ACPI0013"[..],
            b"_EVT",
            b"PWRB",
            &0x0c0c_d041u32.to_le_bytes(),
        ] {
            assert!(all.windows(id.len()).any(|w| w == id), "{id:?}");
        }
    }

    #[test]
    fn virtio_mmio_descriptions() {
        let aml = virtio_mmio_aml(0x1b, 0xd000_1000, 0x1000, 6);
        assert!(aml.windows(8).any(|w| w == b"LNRO0005"));
        assert!(aml.windows(4).any(|w| w == b"V1B_"));
        assert!(aml.windows(4).any(|w| w == 0xd000_1000u32.to_le_bytes()));
        assert_eq!(
            virtio_mmio_cmdline(0xd000_0000, 0x1000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn sleep_control_decoding() {
        assert!(sleep_control_is_s5((5 << 2) | (1 << 5)));
        assert!(!sleep_control_is_s5(5 << 2)); // no SLP_EN
        assert!(!sleep_control_is_s5((3 << 2) | (1 << 5))); // S3
    }
}
