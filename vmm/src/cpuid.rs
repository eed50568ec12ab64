//! Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID: APIC ids, topology (all vCPUs are
//! cores of one socket, one thread each), the hypervisor bit, the TSC-deadline timer, and the
//! host's processor name (KVM reports those leaves empty). KVM's own PV leaves
//! (0x4000_0000..) come from KVM as they are.
use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
/// The processor name string: 48 bytes in three leaves.
const LEAF_BRAND: u32 = 0x8000_0002;
const LEAF_BRAND_LAST: u32 = LEAF_BRAND + 2;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to hold `n` distinct ids.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// What the guest's CPUID takes from the host besides KVM's supported leaves.
pub struct Host {
    /// The processor name leaves ([`host_brand`]).
    pub brand: [[u32; 4]; 3],
    /// KVM emulates the local APIC timer's TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER),
    /// which KVM_GET_SUPPORTED_CPUID leaves out: the VMM sets the bit, as QEMU, Cloud
    /// Hypervisor and Firecracker do. Without it Linux programs the timer by its initial count
    /// and first calibrates it against another clock, which a guest with it skips.
    pub tsc_deadline: bool,
}

/// The host's processor name leaves (eax, ebx, ecx, edx of 0x8000_0002..=0x8000_0004), as
/// QEMU's `-cpu host` and Cloud Hypervisor give them to the guest (its /proc/cpuinfo
/// "model name"); zeros where the host has none.
pub fn host_brand() -> [[u32; 4]; 3] {
    use std::arch::x86_64::__cpuid;
    let mut brand = [[0; 4]; 3];
    if __cpuid(0x8000_0000).eax >= LEAF_BRAND_LAST {
        for (leaf, regs) in (LEAF_BRAND..).zip(&mut brand) {
            let r = __cpuid(leaf);
            *regs = [r.eax, r.ebx, r.ecx, r.edx];
        }
    }
    brand
}

/// CPUID for vCPU `id` (also its APIC id) of `cpus`, with `host`'s processor name where KVM
/// has its leaves.
pub fn for_vcpu(supported: &CpuId, id: u8, cpus: u8, host: &Host) -> CpuId {
    let (id32, n) = (u32::from(id), u32::from(cpus));
    let max_basic = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // APIC id, logical processors per package, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (id32 << 24) | (n << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // Cores per package - 1 in 31:26; L3 shared by all, L1/L2 by one.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | ((n - 1).min(63) << 26);
            }
            LEAF_AMD_SIZE => {
                // NC: cores - 1; ApicIdCoreIdSize: bits for core ids.
                e.ecx = (e.ecx & !0xf0ff) | ((id_bits(n) & 0xf) << 12) | (n - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = id32; // extended APIC id
                e.ebx = id32 & 0xff; // core id, one thread per core
                e.ecx = 0; // node 0
            }
            f @ LEAF_BRAND..=LEAF_BRAND_LAST => {
                let [a, b, c, d] = host.brand[(f - LEAF_BRAND) as usize];
                (e.eax, e.ebx, e.ecx, e.edx) = (a, b, c, d);
            }
            _ => {}
        }
    }
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if leaf > max_basic {
            continue;
        }
        // Level 0: SMT (1 thread), level 1: cores (all vCPUs), level 2: invalid (ends the list).
        let levels = [(0, 1, 1u32), (id_bits(n), n, 2u32), (0, 0, 0u32)];
        for (index, (shift, count, kind)) in (0u32..).zip(levels) {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: count,
                ecx: (kind << 8) | index,
                edx: id32,
                ..Default::default()
            });
        }
    }
    CpuId::from_entries(&entries).expect("no more entries than KVM gave plus six")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let e = |function, index, eax| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(0, 0, 0xd),
            e(1, 0, 0),
            e(4, 0, 0x21),
            e(4, 3, 0x63),
            e(0xb, 0, 7),
            e(0x8000_0002, 0, 0),
            e(0x8000_0003, 0, 0),
            e(0x8000_0004, 0, 0),
            e(0x8000_0008, 0, 0),
        ])
        .unwrap()
    }

    fn host(brand: [[u32; 4]; 3], tsc_deadline: bool) -> Host {
        Host {
            brand,
            tsc_deadline,
        }
    }

    fn get(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_topology() {
        let c = for_vcpu(&supported(), 3, 4, &host([[0; 4]; 3], true));
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert!(l1.ecx & ECX_HYPERVISOR != 0 && l1.edx & EDX_HTT != 0);
        assert!(l1.ecx & ECX_TSC_DEADLINE != 0);
        let smt = get(&c, 0xb, 0);
        let core = get(&c, 0xb, 1);
        assert_eq!((smt.ebx, smt.edx, smt.ecx >> 8), (1, 3, 1));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
        assert_eq!(get(&c, 0xb, 2).ecx >> 8, 0);
        // KVM's own 0xb entry was replaced, not duplicated; 0x1f is beyond the max leaf.
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(!c.as_slice().iter().any(|e| e.function == 0x1f));
        assert_eq!(get(&c, 4, 0).eax >> 26, 3);
        assert_eq!((get(&c, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xff, 3);
    }

    #[test]
    fn single_cpu() {
        let c = for_vcpu(&supported(), 0, 1, &host([[0; 4]; 3], false));
        assert_eq!(get(&c, 1, 0).edx & EDX_HTT, 0);
        // Only where KVM emulates it.
        assert_eq!(get(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(get(&c, 0xb, 1).eax, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(5), 3);
    }

    #[test]
    fn processor_name() {
        // "AMD EPYC Processor", padded with NULs to 48 bytes, as CPUID gives it.
        let mut name = [0u8; 48];
        name[..18].copy_from_slice(b"AMD EPYC Processor");
        let mut brand = [[0; 4]; 3];
        for (regs, chunk) in brand.iter_mut().flatten().zip(name.chunks(4)) {
            *regs = u32::from_le_bytes(chunk.try_into().unwrap());
        }
        let c = for_vcpu(&supported(), 1, 2, &host(brand, true));
        let got: Vec<u8> = (LEAF_BRAND..=LEAF_BRAND_LAST)
            .flat_map(|f| {
                let e = get(&c, f, 0);
                [e.eax, e.ebx, e.ecx, e.edx]
            })
            .flat_map(u32::to_le_bytes)
            .collect();
        assert_eq!(got, name);
        // The host's own: whatever it is, it is what the guest gets.
        let brand = host_brand();
        let c = for_vcpu(&supported(), 0, 1, &host(brand, true));
        assert_eq!(get(&c, 0x8000_0003, 0).ebx, brand[1][1]);
    }
}
