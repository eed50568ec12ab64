//! Recognising and loading kernels and initrds.
//!
//! The format is detected from the file: a bzImage (Linux boot protocol, entered at its
//! 64-bit entry point) or an uncompressed ELF `vmlinux` entered through its PVH note.
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, KernelLoader, PvhBootCapability, bzimage::BzImage, elf::Elf};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use vm_memory::GuestMemoryBackend;

/// bzImage header fields (offsets into the file, from Documentation/arch/x86/boot.rst).
const BOOT_FLAG_OFFSET: usize = 0x1fe;
const HEADER_MAGIC_OFFSET: usize = 0x202;
const VERSION_OFFSET: usize = 0x206;
const XLOADFLAGS_OFFSET: usize = 0x236;
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry point lies this far into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// ELF note announcing the PVH 32-bit entry point (XEN_ELFNOTE_PHYS32_ENTRY).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kernel {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel {path} is neither a bzImage nor an x86_64 ELF vmlinux (unrecognised kernel format)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("kernel {path} is a bzImage without a 64-bit entry point (boot protocol {version:#x})")]
    No64BitEntry { path: PathBuf, version: u16 },
    #[error(
        "ELF kernel {path} has no PVH entry note (build it with CONFIG_PVH=y, or pass the bzImage)"
    )]
    NoPvhNote { path: PathBuf },
    #[error("cannot load kernel {path} into guest memory")]
    Load {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory between the kernel's end ({kernel_end:#x}) and {limit:#x}: give the VM more memory"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot copy initrd {path} into guest memory")]
    InitrdCopy {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A kernel format nixvm can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage, entered at its 64-bit entry point with a zero page.
    BzImage,
    /// An ELF vmlinux, entered at its PVH entry point with an `hvm_start_info`.
    ElfPvh,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::BzImage => "bzImage",
            KernelFormat::ElfPvh => "elf-pvh",
        })
    }
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Read {
        path: path.to_owned(),
        source,
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Reads up to `buf.len()` bytes from `offset`; returns how many were read.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    file.seek(SeekFrom::Start(offset))?;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Finds out what kind of kernel `file` is, checking that nixvm can enter it.
pub fn detect(path: &Path, file: &mut File) -> Result<KernelFormat> {
    let mut head = [0u8; 0x240];
    let n = read_at(file, 0, &mut head).map_err(read_err(path))?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        // ELFCLASS64, little endian, x86_64.
        if head.len() < 64 || head[4] != 2 || head[5] != 1 || u16_at(head, 0x12) != EM_X86_64 {
            return Err(Error::UnknownFormat {
                path: path.to_owned(),
            });
        }
        return if has_pvh_note(file, head).map_err(read_err(path))? {
            Ok(KernelFormat::ElfPvh)
        } else {
            Err(Error::NoPvhNote {
                path: path.to_owned(),
            })
        };
    }
    if head.len() >= 0x240
        && u16_at(head, BOOT_FLAG_OFFSET) == 0xaa55
        && &head[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4] == b"HdrS"
    {
        let version = u16_at(head, VERSION_OFFSET);
        if version < 0x020c || u16_at(head, XLOADFLAGS_OFFSET) & XLF_KERNEL_64 == 0 {
            return Err(Error::No64BitEntry {
                path: path.to_owned(),
                version,
            });
        }
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::UnknownFormat {
        path: path.to_owned(),
    })
}

/// Whether the ELF file has a XEN_ELFNOTE_PHYS32_ENTRY note in one of its PT_NOTE segments.
fn has_pvh_note(file: &mut File, ehdr: &[u8]) -> io::Result<bool> {
    let phoff = u64_at(ehdr, 0x20);
    let phentsize = u64::from(u16_at(ehdr, 0x36));
    let phnum = u64::from(u16_at(ehdr, 0x38));
    for i in 0..phnum.min(64) {
        let mut ph = [0u8; 56];
        if read_at(file, phoff + i * phentsize, &mut ph)? < ph.len() || u32_at(&ph, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&ph, 8), u64_at(&ph, 32).min(1 << 20));
        let mut notes = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let n = read_at(file, offset, &mut notes)?;
        if find_note(&notes[..n], b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Walks a buffer of ELF notes looking for one with this name and type.
fn find_note(mut notes: &[u8], name: &[u8], kind: u32) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0) as usize;
        let descsz = u32_at(notes, 4) as usize;
        let ty = u32_at(notes, 8);
        let name_end = 12 + namesz;
        if notes.len() < name_end {
            return false;
        }
        if ty == kind && &notes[12..name_end] == name {
            return true;
        }
        let next = 12 + align4(namesz) + align4(descsz);
        if next > notes.len() {
            return false;
        }
        notes = &notes[next..];
    }
    false
}

/// Where and how to enter a loaded kernel.
#[derive(Clone, Copy, Debug)]
pub enum Entry {
    /// 64-bit entry of a bzImage; its setup header goes into the zero page.
    BzImage {
        entry: GuestAddress,
        header: setup_header,
    },
    /// 32-bit PVH entry of an ELF kernel.
    Pvh { entry: GuestAddress },
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: Entry,
    /// First byte after the kernel image: the initrd goes above it.
    pub end: u64,
}

impl LoadedKernel {
    /// The highest address (exclusive) the initrd may reach.
    pub fn initrd_limit(&self, mem_size: u64) -> u64 {
        let ram_end = layout::low_ram_end(mem_size);
        match self.entry {
            Entry::BzImage { header, .. } if header.initrd_addr_max != 0 => {
                ram_end.min(u64::from(header.initrd_addr_max) + 1)
            }
            _ => ram_end,
        }
    }
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &impl GuestMemoryBackend, path: &Path) -> Result<LoadedKernel> {
    let mut file = File::open(path).map_err(read_err(path))?;
    let format = detect(path, &mut file)?;
    let load_err = |source| Error::Load {
        path: path.to_owned(),
        source,
    };
    let highmem = Some(GuestAddress(layout::HIGH_RAM_START));
    match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            let header = r.setup_header.ok_or(Error::UnknownFormat {
                path: path.to_owned(),
            })?;
            Ok(LoadedKernel {
                entry: Entry::BzImage {
                    entry: GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                    header,
                },
                end: r.kernel_end,
            })
        }
        KernelFormat::ElfPvh => {
            let r = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
                    entry: Entry::Pvh { entry },
                    end: r.kernel_end,
                }),
                _ => Err(Error::NoPvhNote {
                    path: path.to_owned(),
                }),
            }
        }
    }
}

/// Where an initrd of `size` bytes goes: page aligned, as high as allowed.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let top = limit.checked_sub(size)? & !0xfff;
    (top >= kernel_end).then_some(top)
}

/// Copies the initrd at `path` into guest memory; returns (address, size).
pub fn load_initrd(
    mem: &impl GuestMemoryBackend,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<(GuestAddress, u64)> {
    let initrd_err = |source| Error::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(initrd_err)?;
    let size = file.metadata().map_err(initrd_err)?.len();
    let limit = kernel.initrd_limit(mem_size);
    let addr = initrd_address(size, kernel.end, limit).ok_or(Error::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end: kernel.end,
        limit,
    })?;
    let len = usize::try_from(size).expect("initrd size fits in guest memory");
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| Error::InitrdCopy {
            path: path.to_owned(),
            source,
        })?;
    Ok((GuestAddress(addr), size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!("nixvm-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        let f = File::open(&path).unwrap();
        (path, f)
    }

    fn bzimage_header(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(b"HdrS");
        b[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&version.to_le_bytes());
        b[XLOADFLAGS_OFFSET..XLOADFLAGS_OFFSET + 2].copy_from_slice(&xloadflags.to_le_bytes());
        b
    }

    /// A minimal ELF64 x86_64 header with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x100];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        b[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        b.extend_from_slice(notes);
        b
    }

    fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&ty.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn detects_bzimage() {
        let (p, mut f) = temp_file("bz", &bzimage_header(0x020f, XLF_KERNEL_64));
        assert_eq!(detect(&p, &mut f).unwrap(), KernelFormat::BzImage);
    }

    #[test]
    fn rejects_bzimage_without_64bit_entry() {
        let (p, mut f) = temp_file("bz32", &bzimage_header(0x020a, 0));
        assert!(matches!(
            detect(&p, &mut f),
            Err(Error::No64BitEntry {
                version: 0x020a,
                ..
            })
        ));
    }

    #[test]
    fn detects_elf_with_pvh_note_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0000u32.to_le_bytes(),
        ));
        let (p, mut f) = temp_file("pvh", &elf_with_notes(&notes));
        assert_eq!(detect(&p, &mut f).unwrap(), KernelFormat::ElfPvh);
    }

    #[test]
    fn rejects_elf_without_pvh_note() {
        let (p, mut f) = temp_file("nopvh", &elf_with_notes(&note(b"Xen\0", 17, &[0; 4])));
        assert!(matches!(detect(&p, &mut f), Err(Error::NoPvhNote { .. })));
    }

    #[test]
    fn rejects_garbage_and_truncated_files() {
        for (name, bytes) in [
            ("empty", &b""[..]),
            ("text", b"#!/bin/sh\necho hi\n"),
            ("elf", b"\x7fELF"),
        ] {
            let (p, mut f) = temp_file(name, bytes);
            assert!(
                matches!(detect(&p, &mut f), Err(Error::UnknownFormat { .. })),
                "{name}"
            );
        }
    }

    #[test]
    fn malformed_notes_do_not_panic() {
        assert!(!find_note(&[0xff; 12], b"Xen\0", 18));
        let mut n = note(b"Xen\0", 18, &[0; 4]);
        n[0] = 200; // namesz past the end
        assert!(!find_note(&n, b"Xen\0", 18));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        assert_eq!(
            initrd_address(0x1800, 0x200_0000, 0x1000_0000),
            Some(0x1000_0000 - 0x2000)
        );
        assert_eq!(
            initrd_address(0x1000, 0x200_0000, 0x1000_0000),
            Some(0x1000_0000 - 0x1000)
        );
        // Does not fit above the kernel.
        assert_eq!(initrd_address(0x0f00_0000, 0x200_0000, 0x1000_0000), None);
        assert_eq!(initrd_address(0x2000_0000, 0, 0x1000_0000), None);
    }
}
