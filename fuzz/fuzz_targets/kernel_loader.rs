//! Kernel images as a user might hand nixvm: any file. Detecting the format and loading it
//! (bzImage or ELF/PVH) into guest memory must fail with an error, never panic, hang or
//! write outside guest memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nixvm_boot::kernel;

fn path() -> &'static std::path::PathBuf {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("nixvm-fuzz-kernel-{}", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    std::fs::write(p, data).unwrap();
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 32 << 20)])
        .unwrap();
    let mut f = std::fs::File::open(p).unwrap();
    if kernel::detect(p, &mut f).is_ok() {
        if let Ok(k) = kernel::load_kernel(&mem, p) {
            let _ = k.initrd_limit(32 << 20);
        }
    }
});
