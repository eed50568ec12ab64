//! FUSE requests from a guest to nixvm's storefs, over a tree with directories, files,
//! symlinks (relative, absolute, escaping, looping), a FIFO and hard links. storefs must
//! answer each (or drop it) without panicking, hanging, or allocating without bound, and never
//! reach outside the tree.
#![no_main]

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nixvm_storefs::StoreFs;

fn tree() -> &'static PathBuf {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("nixvm-fuzz-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("pkg/bin")).unwrap();
        std::fs::write(d.join("pkg/bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::write(d.join("pkg/data"), vec![7u8; 100_000]).unwrap();
        std::fs::hard_link(d.join("pkg/data"), d.join("pkg/data-link")).unwrap();
        symlink("bin/hello", d.join("pkg/rel")).unwrap();
        symlink("/etc/passwd", d.join("pkg/abs")).unwrap();
        symlink("../../..", d.join("pkg/up")).unwrap();
        symlink("loop", d.join("pkg/loop")).unwrap();
        let fifo = std::ffi::CString::new(d.join("pkg/fifo").into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path.
        unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
        for i in 0..50 {
            std::fs::write(d.join(format!("f{i}")), format!("{i}")).unwrap();
        }
        d
    })
}

fn fs() -> &'static StoreFs {
    static FS: OnceLock<StoreFs> = OnceLock::new();
    FS.get_or_init(|| StoreFs::with_max_cached_fds(tree(), 8).unwrap())
}

fuzz_target!(|data: &[u8]| {
    // Several requests per input, so that node ids and handles from one are used by the
    // next: each is a 16-bit length (room for the reply) and that many request bytes.
    let mut rest = data;
    while rest.len() >= 4 {
        let room = usize::from(u16::from_le_bytes([rest[0], rest[1]])) * 32;
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
        let end = (4 + len).min(rest.len());
        let request = &rest[4..end];
        if let Some(reply) = fs().handle(request, room) {
            assert!(reply.len() >= 16, "a reply has a header");
        }
        rest = &rest[end..];
    }
});
