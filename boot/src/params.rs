//! What the kernel reads at its entry: the command line, and either the zero page
//! (`boot_params`, bzImage) or the PVH `hvm_start_info` (ELF), with the memory map.
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress};

use crate::kernel::{Entry, LoadedKernel};
use crate::layout::{self, MemoryRange};
use vm_memory::GuestMemoryBackend;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("too many memory map entries ({0})")]
    TooManyRanges(usize),
    #[error("cannot write boot parameters into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

pub type Result<T> = std::result::Result<T, Error>;

const KERNEL_LOADER_OTHER: u8 = 0xff;
const HVM_START_MAGIC: u32 = 0x336e_c578;
const PVH_MODLIST_OFFSET: u64 = 0x40;
const PVH_MEMMAP_OFFSET: u64 = 0x80;

/// The longest command line this kernel takes (bzImage headers say; PVH has Linux's limit).
pub fn cmdline_max(kernel: &LoadedKernel) -> usize {
    match kernel.entry {
        Entry::BzImage { header, .. } if header.cmdline_size != 0 => {
            (header.cmdline_size as usize).min(layout::CMDLINE_MAX_LEN)
        }
        _ => layout::CMDLINE_MAX_LEN,
    }
}

/// Checks that `cmdline` can be passed verbatim to a kernel that takes `max` bytes.
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<()> {
    if cmdline.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Everything the boot parameters describe.
#[derive(Clone, Debug)]
pub struct BootInfo<'a> {
    pub cmdline: &'a str,
    pub initrd: Option<(GuestAddress, u64)>,
    pub rsdp: GuestAddress,
    pub memory_map: Vec<MemoryRange>,
}

/// Writes the command line and the zero page or start_info. Returns the address that goes into
/// `rsi` (bzImage) or `rbx` (PVH).
pub fn write_boot_params(
    mem: &impl GuestMemoryBackend,
    kernel: &LoadedKernel,
    info: &BootInfo<'_>,
) -> Result<GuestAddress> {
    check_cmdline(info.cmdline, cmdline_max(kernel))?;
    let mut bytes = info.cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(Error::Write)?;
    match kernel.entry {
        Entry::BzImage { header, .. } => write_zero_page(mem, header, info),
        Entry::Pvh { .. } => write_start_info(mem, info),
    }
}

fn write_zero_page(
    mem: &impl GuestMemoryBackend,
    header: linux_loader::loader::bootparam::setup_header,
    info: &BootInfo<'_>,
) -> Result<GuestAddress> {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = u32::try_from(layout::CMDLINE_START).expect("below 4 GiB");
    params.hdr.cmdline_size = u32::try_from(info.cmdline.len()).expect("checked length");
    if let Some((addr, size)) = info.initrd {
        // The initrd lies below 4 GiB (initrd_limit), so these fit.
        params.hdr.ramdisk_image = u32::try_from(addr.0).expect("initrd below 4 GiB");
        params.hdr.ramdisk_size = u32::try_from(size).expect("initrd below 4 GiB");
    }
    params.acpi_rsdp_addr = info.rsdp.0;
    if info.memory_map.len() > params.e820_table.len() {
        return Err(Error::TooManyRanges(info.memory_map.len()));
    }
    for (slot, range) in params.e820_table.iter_mut().zip(&info.memory_map) {
        *slot = boot_e820_entry {
            addr: range.start,
            size: range.size,
            r#type: range.kind as u32,
        };
    }
    params.e820_entries = u8::try_from(info.memory_map.len()).expect("checked above");
    let addr = GuestAddress(layout::ZERO_PAGE_START);
    mem.write_obj(params, addr).map_err(Error::Write)?;
    Ok(addr)
}

/// Little-endian byte builder for the PVH structures (linux-loader's have no ByteValued).
#[derive(Default)]
struct Le(Vec<u8>);
impl Le {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// Writes `hvm_start_info` (version 1), the module list (the initrd) and the memory map.
fn write_start_info(mem: &impl GuestMemoryBackend, info: &BootInfo<'_>) -> Result<GuestAddress> {
    let base = layout::PVH_INFO_START;
    let max_ranges = (layout::ZERO_PAGE_START - base - PVH_MEMMAP_OFFSET) / 24;
    if info.memory_map.len() as u64 > max_ranges {
        return Err(Error::TooManyRanges(info.memory_map.len()));
    }
    let nr_modules = u32::from(info.initrd.is_some());
    let start_info = Le::default()
        .u32(HVM_START_MAGIC)
        .u32(1) // version
        .u32(0) // flags
        .u32(nr_modules)
        .u64(if nr_modules > 0 {
            base + PVH_MODLIST_OFFSET
        } else {
            0
        })
        .u64(layout::CMDLINE_START)
        .u64(info.rsdp.0)
        .u64(base + PVH_MEMMAP_OFFSET)
        .u32(u32::try_from(info.memory_map.len()).expect("checked above"))
        .u32(0);
    let write = |bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(Error::Write)
    };
    write(&start_info.0, base)?;
    if let Some((addr, size)) = info.initrd {
        let module = Le::default().u64(addr.0).u64(size).u64(0).u64(0);
        write(&module.0, base + PVH_MODLIST_OFFSET)?;
    }
    let mut map = Le::default();
    for r in &info.memory_map {
        map = map.u64(r.start).u64(r.size).u32(r.kind as u32).u32(0);
    }
    write(&map.0, base + PVH_MEMMAP_OFFSET)?;
    Ok(GuestAddress(base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bootparam::setup_header;

    fn mem() -> vm_memory::GuestMemoryMmap {
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn info(cmdline: &str) -> BootInfo<'_> {
        BootInfo {
            cmdline,
            initrd: Some((GuestAddress(0x300_0000), 0x1234)),
            rsdp: GuestAddress(layout::ACPI_START),
            memory_map: layout::memory_map(64 << 20),
        }
    }

    const NIXOS_CMDLINE: &str = "console=ttyS0 init=/nix/store/0000000000000000000000000000000a-nixos-system-x/init regInfo=/nix/store/0000000000000000000000000000000b-closure-info/registration  x=\"a b\"";

    #[test]
    fn zero_page_has_cmdline_initrd_e820_and_rsdp() {
        let m = mem();
        let header = setup_header {
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        let k = LoadedKernel {
            entry: Entry::BzImage {
                entry: GuestAddress(0x100200),
                header,
            },
            end: 0x200_0000,
        };
        let at = write_boot_params(&m, &k, &info(NIXOS_CMDLINE)).unwrap();
        assert_eq!(at.0, layout::ZERO_PAGE_START);
        let p: boot_params = m.read_obj(at).unwrap();
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, layout::CMDLINE_START);
        assert_eq!({ p.hdr.cmdline_size } as usize, NIXOS_CMDLINE.len());
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (0x10_0000, (64 << 20) - 0x10_0000, 1)
        );
        // Verbatim, NUL terminated.
        let mut buf = vec![0u8; NIXOS_CMDLINE.len() + 1];
        m.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf[..NIXOS_CMDLINE.len()], NIXOS_CMDLINE.as_bytes());
        assert_eq!(buf[NIXOS_CMDLINE.len()], 0);
    }

    #[test]
    fn start_info_has_magic_module_and_memmap() {
        let m = mem();
        let k = LoadedKernel {
            entry: Entry::Pvh {
                entry: GuestAddress(0x100_0000),
            },
            end: 0x200_0000,
        };
        let at = write_boot_params(&m, &k, &info("console=ttyS0")).unwrap();
        let r32 = |off: u64| m.read_obj::<u32>(GuestAddress(at.0 + off)).unwrap();
        let r64 = |off: u64| m.read_obj::<u64>(GuestAddress(at.0 + off)).unwrap();
        assert_eq!(r32(0), HVM_START_MAGIC);
        assert_eq!(r32(4), 1);
        assert_eq!(r32(12), 1); // nr_modules
        let modlist = r64(16);
        assert_eq!(r64(24), layout::CMDLINE_START);
        assert_eq!(r64(32), layout::ACPI_START);
        let memmap = r64(40);
        assert_eq!(r32(48), 3);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(modlist)).unwrap(),
            0x300_0000
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(modlist + 8)).unwrap(),
            0x1234
        );
        // Third range: high RAM, type 1.
        let e = memmap + 2 * 24;
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(e)).unwrap(),
            layout::HIGH_RAM_START
        );
        assert_eq!(m.read_obj::<u32>(GuestAddress(e + 16)).unwrap(), 1);
        // No initrd: no modules.
        let mut i = info("x");
        i.initrd = None;
        write_boot_params(&m, &k, &i).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(at.0 + 12)).unwrap(), 0);
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline(&"a".repeat(2047), 2047).is_ok());
        assert!(matches!(
            check_cmdline(&"a".repeat(2048), 2047),
            Err(Error::CmdlineTooLong { len: 2048, .. })
        ));
        assert!(matches!(
            check_cmdline("a\0b", 2047),
            Err(Error::CmdlineNul)
        ));
        let header = setup_header {
            cmdline_size: 255,
            ..Default::default()
        };
        let k = LoadedKernel {
            entry: Entry::BzImage {
                entry: GuestAddress(0),
                header,
            },
            end: 0,
        };
        assert_eq!(cmdline_max(&k), 255);
    }
}
