//! Booting an x86_64 Linux guest: the guest-physical memory layout, loading a kernel
//! (bzImage through the Linux boot protocol, or an ELF `vmlinux` through its PVH entry),
//! the initrd, the zero page / PVH `start_info`, the CPU state at the entry point, and the
//! ACPI and SMBIOS tables.
//!
//! Everything here is a pure function over guest memory: no KVM.
// Tests build fixtures with plain casts; the library code is checked without this.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod acpi;
pub mod cpu;
pub mod kernel;
pub mod layout;
pub mod params;
pub mod smbios;
