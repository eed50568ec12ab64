use super::*;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;

struct Tree(PathBuf);
impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BIG: usize = 3 << 20;

fn tree() -> Tree {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "nixvm-storefs-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("a/b/c")).unwrap();
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::create_dir_all(d.join("many")).unwrap();
    std::fs::create_dir_all(d.join("empty")).unwrap();
    std::fs::write(d.join("hello.txt"), b"hello world\n").unwrap();
    std::fs::write(d.join("a/b/c/deep.txt"), b"deep").unwrap();
    std::fs::write(d.join("bin/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(d.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.join("hello.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.join("big.bin"), &big).unwrap();
    // Sparse: 4 KiB of data, then a hole up to 8 MiB.
    let sparse = File::create(d.join("sparse")).unwrap();
    sparse.write_at(&[1u8; 4096], 0).unwrap();
    sparse.set_len(8 << 20).unwrap();
    for i in 0..50 {
        std::fs::write(d.join(format!("many/file-{i:03}")), b"x").unwrap();
    }
    std::os::unix::fs::symlink("hello.txt", d.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc", d.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../../..", d.join("up")).unwrap();
    Tree(d)
}

fn req(op: u32, node: u64, body: &[u8]) -> Vec<u8> {
    let h = InHeader {
        len: (size_of::<InHeader>() + body.len()) as u32,
        opcode: op,
        unique: 0x1234,
        nodeid: node,
        ..Default::default()
    };
    let mut v = h.as_slice().to_vec();
    v.extend_from_slice(body);
    v
}

/// Sends a request; returns the reply's error (0 or a positive errno) and body.
fn call(fs: &StoreFs, op: u32, node: u64, body: &[u8]) -> (i32, Vec<u8>) {
    call_room(fs, op, node, body, 1 << 21)
}

fn call_room(fs: &StoreFs, op: u32, node: u64, body: &[u8], room: usize) -> (i32, Vec<u8>) {
    let r = fs.handle(&req(op, node, body), room).expect("a reply");
    let (h, rest) = read_struct::<OutHeader>(&r).unwrap();
    assert_eq!(h.len as usize, r.len());
    assert_eq!(h.unique, 0x1234);
    assert!(r.len() <= room);
    if h.error != 0 {
        assert_eq!(rest.len(), 0);
    }
    (-h.error, rest.to_vec())
}

fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b].concat()
}

fn name(s: &str) -> Vec<u8> {
    cat(s.as_bytes(), &[0])
}

fn init(fs: &StoreFs, flags: u32) -> InitOut {
    let i = InitIn {
        major: 7,
        minor: 41,
        max_readahead: 128 << 10,
        flags,
        ..Default::default()
    };
    let (e, b) = call(fs, INIT, 0, i.as_slice());
    assert_eq!(e, 0);
    read_struct::<InitOut>(&b).unwrap().0
}

fn lookup(fs: &StoreFs, parent: u64, n: &str) -> Result<EntryOut, i32> {
    let (e, b) = call(fs, LOOKUP, parent, &name(n));
    if e != 0 {
        return Err(e);
    }
    assert_eq!(b.len(), size_of::<EntryOut>());
    Ok(read_struct::<EntryOut>(&b).unwrap().0)
}

fn getattr(fs: &StoreFs, node: u64) -> Result<Attr, i32> {
    let (e, b) = call(fs, GETATTR, node, GetattrIn::default().as_slice());
    if e != 0 {
        return Err(e);
    }
    Ok(read_struct::<AttrOut>(&b).unwrap().0.attr)
}

fn open(fs: &StoreFs, op: u32, node: u64, flags: i32) -> Result<OpenOut, i32> {
    let o = OpenIn {
        flags: flags as u32,
        open_flags: 0,
    };
    let (e, b) = call(fs, op, node, o.as_slice());
    if e != 0 {
        return Err(e);
    }
    Ok(read_struct::<OpenOut>(&b).unwrap().0)
}

fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    ReadIn {
        fh,
        offset,
        size,
        ..Default::default()
    }
    .as_slice()
    .to_vec()
}

fn read(fs: &StoreFs, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
    match call(fs, READ, 0, &read_in(fh, offset, size)) {
        (0, b) => Ok(b),
        (e, _) => Err(e),
    }
}

fn path_of(fs: &StoreFs, path: &str) -> EntryOut {
    let mut e = EntryOut {
        nodeid: ROOT_ID,
        ..Default::default()
    };
    for c in path.split('/') {
        e = lookup(fs, e.nodeid, c).unwrap();
    }
    e
}

/// Parses a READDIR(PLUS) body: (name, off, ino, typ, entry node id).
fn parse_dir(mut b: &[u8], plus: bool) -> Vec<(String, u64, u64, u32, u64)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let mut nodeid = 0;
        if plus {
            let (e, rest) = read_struct::<EntryOut>(b).unwrap();
            nodeid = e.nodeid;
            if nodeid != 0 {
                assert_eq!(e.entry_valid, TIMEOUT_SECS);
            }
            b = rest;
        }
        let (d, rest) = read_struct::<Dirent>(b).unwrap();
        let n = String::from_utf8(rest[..d.namelen as usize].to_vec()).unwrap();
        let header = if plus { 152 } else { 24 };
        let rec = dirent_size(header, d.namelen as usize) - size_of::<Dirent>();
        let rec = if plus {
            rec - size_of::<EntryOut>()
        } else {
            rec
        };
        b = &rest[rec..];
        out.push((n, d.off, d.ino, d.typ, nodeid));
    }
    out
}

#[test]
fn storefs_new_errors() {
    assert!(StoreFs::new(Path::new("/nonexistent/nixvm-storefs")).is_err());
    let t = tree();
    assert!(StoreFs::new(&t.0.join("hello.txt")).is_err());
}

#[test]
fn storefs_init_negotiates() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    let all = u32::MAX;
    let o = init(&fs, all);
    assert_eq!((o.major, o.minor), (7, 38));
    assert_eq!(
        o.flags,
        ASYNC_READ
            | DO_READDIRPLUS
            | READDIRPLUS_AUTO
            | PARALLEL_DIROPS
            | MAX_PAGES
            | CACHE_SYMLINKS
    );
    assert_eq!(o.max_pages, 256);
    assert_eq!(o.max_readahead, 128 << 10);
    // Only flags the guest offered.
    let o = init(&fs, DO_READDIRPLUS | INIT_EXT | (1 << 31));
    assert_eq!(o.flags, DO_READDIRPLUS);
    assert_eq!(o.max_pages, 0);
    // An older minor is echoed; a 16-byte (pre-7.36) body is fine.
    let old = [7u32, 31, 65536, MAX_PAGES];
    let body: Vec<u8> = old.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (e, b) = call(&fs, INIT, 0, &body);
    assert_eq!(e, 0);
    let o = read_struct::<InitOut>(&b).unwrap().0;
    assert_eq!((o.major, o.minor, o.flags), (7, 31, MAX_PAGES));
    // Too old, too short, a newer major.
    let body: Vec<u8> = [7u32, 8, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(call(&fs, INIT, 0, &body).0, libc::EPROTO);
    assert_eq!(call(&fs, INIT, 0, &body[..8]).0, libc::EINVAL);
    let body: Vec<u8> = [8u32, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let (e, b) = call(&fs, INIT, 0, &body);
    assert_eq!(e, 0);
    assert_eq!(read_struct::<InitOut>(&b).unwrap().0.major, 7);
}

#[test]
fn storefs_reads_into_the_callers_buffers() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    let e = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    let o = open(&fs, OPEN, e.nodeid, libc::O_RDONLY).unwrap();
    let placed = std::cell::RefCell::new(Vec::new());
    let mut into = |f: &File, off: u64, len: usize| {
        let mut b = vec![0u8; len];
        let n = f.read_at(&mut b, off)?;
        *placed.borrow_mut() = b[..n].to_vec();
        Ok(n)
    };
    // Only the header comes back; its len counts the data the callback placed.
    let r = fs
        .handle_into(&req(READ, 0, &read_in(o.fh, 6, 100)), 16 + 3, &mut into)
        .unwrap();
    let (h, rest) = read_struct::<OutHeader>(&r).unwrap();
    assert_eq!(
        (h.len, h.error, h.unique, rest.len()),
        (16 + 3, 0, 0x1234, 0)
    );
    assert_eq!(*placed.borrow(), b"wor");
    // Errors are whole replies; other opcodes are answered as by handle().
    let r = fs
        .handle_into(&req(READ, 0, &read_in(999, 0, 10)), 4096, &mut into)
        .unwrap();
    let (h, _) = read_struct::<OutHeader>(&r).unwrap();
    assert_eq!((h.len, h.error), (16, -libc::EBADF));
    let r = fs
        .handle_into(&req(GETATTR, ROOT_ID, &[0u8; 16]), 4096, &mut into)
        .unwrap();
    assert_eq!(
        r,
        fs.handle(&req(GETATTR, ROOT_ID, &[0u8; 16]), 4096).unwrap()
    );
}

#[test]
fn storefs_lookup_getattr_read() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    let root = getattr(&fs, ROOT_ID).unwrap();
    assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);
    let e = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    assert!(e.nodeid > ROOT_ID);
    assert_eq!(e.entry_valid, TIMEOUT_SECS);
    assert_eq!(e.attr_valid, TIMEOUT_SECS);
    assert_eq!(e.attr.size, 12);
    assert_eq!(e.attr.mode, libc::S_IFREG | 0o644);
    // The same host inode, the same node id.
    assert_eq!(lookup(&fs, ROOT_ID, "hello.txt").unwrap().nodeid, e.nodeid);
    assert_eq!(getattr(&fs, e.nodeid).unwrap(), e.attr);
    let x = path_of(&fs, "bin/run.sh");
    assert_eq!(x.attr.mode, libc::S_IFREG | 0o755);
    let d = path_of(&fs, "a/b/c/deep.txt");
    assert_eq!(d.attr.size, 4);
    assert_eq!(lookup(&fs, ROOT_ID, "nope").unwrap_err(), libc::ENOENT);
    assert_eq!(lookup(&fs, e.nodeid, "x").unwrap_err(), libc::ENOTDIR);

    let o = open(&fs, OPEN, e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(o.open_flags, FOPEN_KEEP_CACHE);
    assert_eq!(read(&fs, o.fh, 0, 4096).unwrap(), b"hello world\n");
    assert_eq!(read(&fs, o.fh, 6, 3).unwrap(), b"wor");
    assert_eq!(read(&fs, o.fh, 100, 10).unwrap(), b"");
    let f = FlushIn {
        fh: o.fh,
        ..Default::default()
    };
    assert_eq!(call(&fs, FLUSH, e.nodeid, f.as_slice()).0, 0);
    let r = ReleaseIn {
        fh: o.fh,
        ..Default::default()
    };
    assert_eq!(call(&fs, RELEASE, e.nodeid, r.as_slice()).0, 0);
    assert_eq!(read(&fs, o.fh, 0, 10).unwrap_err(), libc::EBADF);
    assert_eq!(call(&fs, RELEASE, e.nodeid, r.as_slice()).0, libc::EBADF);
    assert_eq!(call(&fs, FLUSH, e.nodeid, f.as_slice()).0, libc::EBADF);

    // The big file: a read is bounded by the request, the room and MAX_TRANSFER.
    let big = lookup(&fs, ROOT_ID, "big.bin").unwrap();
    assert_eq!(big.attr.size, BIG as u64);
    let o = open(&fs, OPEN, big.nodeid, libc::O_RDONLY).unwrap();
    let b = read(&fs, o.fh, 1000, 1 << 20).unwrap();
    assert_eq!(b.len(), 1 << 20);
    assert!(
        b.iter()
            .enumerate()
            .all(|(i, &v)| v == ((i + 1000) % 251) as u8)
    );
    let b = read(&fs, o.fh, 0, u32::MAX).unwrap();
    assert_eq!(b.len(), MAX_TRANSFER);
    let (e2, b) = call_room(&fs, READ, 0, &read_in(o.fh, 0, 1 << 20), 16 + 100);
    assert_eq!((e2, b.len()), (0, 100));
    let b = read(&fs, o.fh, BIG as u64 - 10, 4096).unwrap();
    assert_eq!(b.len(), 10);
    assert_eq!(
        read(&fs, o.fh, u64::MAX - 1, 4096).unwrap_err(),
        libc::EINVAL
    );
}

#[test]
fn storefs_readlink_and_symlinks_stay_inside() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    for (n, target) in [
        ("link", "hello.txt"),
        ("escape", "/etc"),
        ("up", "../../../.."),
    ] {
        let e = lookup(&fs, ROOT_ID, n).unwrap();
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{n}");
        let (err, b) = call(&fs, READLINK, e.nodeid, &[]);
        assert_eq!((err, b.as_slice()), (0, target.as_bytes()));
        // Nothing reads through the symlink.
        assert_eq!(lookup(&fs, e.nodeid, "passwd").unwrap_err(), libc::ENOTDIR);
        assert_eq!(lookup(&fs, e.nodeid, "hosts").unwrap_err(), libc::ENOTDIR);
        assert_eq!(
            open(&fs, OPEN, e.nodeid, libc::O_RDONLY).unwrap_err(),
            libc::ELOOP
        );
        assert_eq!(
            open(&fs, OPENDIR, e.nodeid, libc::O_RDONLY).unwrap_err(),
            libc::ENOTDIR
        );
        assert_eq!(
            getattr(&fs, e.nodeid).unwrap().mode & libc::S_IFMT,
            libc::S_IFLNK
        );
    }
    let f = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    assert_eq!(call(&fs, READLINK, f.nodeid, &[]).0, libc::EINVAL);
    // Escaping names.
    for bad in ["..", ".", "/etc", "a/b", "../hello.txt", "", "/"] {
        assert_eq!(
            lookup(&fs, ROOT_ID, bad).unwrap_err(),
            libc::EINVAL,
            "{bad:?}"
        );
    }
    let c = path_of(&fs, "a/b/c");
    assert_eq!(lookup(&fs, c.nodeid, "..").unwrap_err(), libc::EINVAL);
    assert_eq!(lookup(&fs, ROOT_ID, "etc").unwrap_err(), libc::ENOENT);
    assert_eq!(
        lookup(&fs, ROOT_ID, &"x".repeat(256)).unwrap_err(),
        libc::ENAMETOOLONG
    );
    // No NUL.
    assert_eq!(call(&fs, LOOKUP, ROOT_ID, b"hello.txt").0, libc::EINVAL);
    assert_eq!(call(&fs, LOOKUP, ROOT_ID, b"").0, libc::EINVAL);
}

#[test]
fn storefs_readdir_and_readdirplus_across_calls() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    let many = lookup(&fs, ROOT_ID, "many").unwrap();
    for plus in [false, true] {
        let op = if plus { READDIRPLUS } else { READDIR };
        let o = open(
            &fs,
            OPENDIR,
            many.nodeid,
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
        .unwrap();
        let mut all = Vec::new();
        let mut off = 0;
        let mut calls = 0;
        loop {
            let (e, b) = call(&fs, op, many.nodeid, &read_in(o.fh, off, 1024));
            assert_eq!(e, 0);
            assert!(b.len() <= 1024);
            let got = parse_dir(&b, plus);
            if got.is_empty() {
                break;
            }
            calls += 1;
            off = got.last().unwrap().1;
            all.extend(got);
        }
        assert!(calls >= 2, "{calls}");
        let mut names: Vec<_> = all.iter().map(|e| e.0.clone()).collect();
        assert_eq!(&names[..2], [".", ".."]);
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 52);
        for (n, _, ino, typ, nodeid) in &all {
            if n.starts_with("file-") {
                assert_eq!(*typ, u32::from(libc::DT_REG));
                let e = lookup(&fs, many.nodeid, n).unwrap();
                assert_eq!(*ino, e.attr.ino);
                if plus {
                    assert_eq!(*nodeid, e.nodeid);
                }
            } else {
                assert_eq!(*typ, u32::from(libc::DT_DIR));
                assert_eq!(*nodeid, 0);
            }
        }
        let r = ReleaseIn {
            fh: o.fh,
            ..Default::default()
        };
        assert_eq!(call(&fs, RELEASE, 0, r.as_slice()).0, libc::EBADF);
        assert_eq!(call(&fs, RELEASEDIR, 0, r.as_slice()).0, 0);
        assert_eq!(call(&fs, op, 0, &read_in(o.fh, 0, 4096)).0, libc::EBADF);
    }
    // The root lists its entries with types; a too-small buffer gives nothing.
    let o = open(&fs, OPENDIR, ROOT_ID, libc::O_RDONLY).unwrap();
    let (e, b) = call(&fs, READDIR, ROOT_ID, &read_in(o.fh, 0, 1 << 16));
    assert_eq!(e, 0);
    let got = parse_dir(&b, false);
    let find = |n: &str| got.iter().find(|e| e.0 == n).unwrap().3;
    assert_eq!(find("link"), u32::from(libc::DT_LNK));
    assert_eq!(find("a"), u32::from(libc::DT_DIR));
    assert_eq!(find("big.bin"), u32::from(libc::DT_REG));
    let (e, b) = call(&fs, READDIR, ROOT_ID, &read_in(o.fh, 0, 10));
    assert_eq!((e, b.len()), (0, 0));
    let (e, b) = call(&fs, READDIRPLUS, ROOT_ID, &read_in(o.fh, u64::MAX, 4096));
    assert_eq!((e, b.len()), (0, 0));
    // A file handle is not a directory handle, and the other way round.
    let f = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    assert_eq!(open(&fs, OPENDIR, f.nodeid, 0).unwrap_err(), libc::ENOTDIR);
    assert_eq!(open(&fs, OPEN, ROOT_ID, 0).unwrap_err(), libc::EISDIR);
    let fo = open(&fs, OPEN, f.nodeid, 0).unwrap();
    assert_eq!(
        call(&fs, READDIR, 0, &read_in(fo.fh, 0, 4096)).0,
        libc::ENOTDIR
    );
    assert_eq!(read(&fs, o.fh, 0, 10).unwrap_err(), libc::EISDIR);
}

#[test]
fn storefs_new_host_files_appear() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    assert_eq!(lookup(&fs, ROOT_ID, "later").unwrap_err(), libc::ENOENT);
    let empty = lookup(&fs, ROOT_ID, "empty").unwrap();
    let o = open(&fs, OPENDIR, empty.nodeid, 0).unwrap();
    let (_, b) = call(&fs, READDIR, 0, &read_in(o.fh, 0, 4096));
    assert_eq!(parse_dir(&b, false).len(), 2);
    // The guest caches the listings below the root, not the root's, which gains paths.
    assert_eq!(o.open_flags, FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE);
    assert_eq!(open(&fs, OPENDIR, ROOT_ID, 0).unwrap().open_flags, 0);
    std::fs::write(t.0.join("later"), b"new").unwrap();
    std::fs::write(t.0.join("empty/new"), b"new").unwrap();
    assert_eq!(lookup(&fs, ROOT_ID, "later").unwrap().attr.size, 3);
    // A rewind (offset 0) lists again.
    let (_, b) = call(&fs, READDIR, 0, &read_in(o.fh, 0, 4096));
    assert_eq!(parse_dir(&b, false).len(), 3);
}

#[test]
fn storefs_forget_drops_nodes() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    let e = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    let forget =
        |node, n: u64| fs.handle(&req(FORGET, node, ForgetIn { nlookup: n }.as_slice()), 4096);
    assert_eq!(forget(e.nodeid, 1), None);
    assert!(getattr(&fs, e.nodeid).is_ok());
    assert_eq!(forget(e.nodeid, 1), None);
    assert_eq!(getattr(&fs, e.nodeid).unwrap_err(), libc::EBADF);
    assert_eq!(call(&fs, READLINK, e.nodeid, &[]).0, libc::EBADF);
    assert_eq!(lookup(&fs, e.nodeid, "x").unwrap_err(), libc::EBADF);
    // Forgetting unknown nodes, the root, or with a bad length: no reply, no harm.
    assert_eq!(forget(999, 1), None);
    assert_eq!(forget(ROOT_ID, 100), None);
    assert_eq!(fs.handle(&req(FORGET, 5, &[1, 2]), 4096), None);
    let mut bad = req(FORGET, 5, &[0; 8]);
    bad[0] = 200;
    assert_eq!(fs.handle(&bad, 4096), None);
    assert!(getattr(&fs, ROOT_ID).is_ok());
    // A looked-up-again file gets a new node id.
    let e2 = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    assert_ne!(e2.nodeid, e.nodeid);

    // A child keeps its forgotten parent alive until it goes too.
    let c = path_of(&fs, "a/b/c");
    let deep = lookup(&fs, c.nodeid, "deep.txt").unwrap();
    let a = lookup(&fs, ROOT_ID, "a").unwrap();
    let b = lookup(&fs, a.nodeid, "b").unwrap();
    let mut batch = BatchForgetIn { count: 3, dummy: 0 }.as_slice().to_vec();
    for (node, n) in [(a.nodeid, 2), (b.nodeid, 2), (c.nodeid, 1)] {
        batch.extend_from_slice(
            ForgetOne {
                nodeid: node,
                nlookup: n,
            }
            .as_slice(),
        );
    }
    assert_eq!(fs.handle(&req(BATCH_FORGET, 0, &batch), 4096), None);
    assert!(getattr(&fs, a.nodeid).is_ok());
    assert_eq!(getattr(&fs, deep.nodeid).unwrap().size, 4);
    // A batch whose count does not fit is ignored as a whole.
    let mut huge = BatchForgetIn {
        count: u32::MAX,
        dummy: 0,
    }
    .as_slice()
    .to_vec();
    huge.extend_from_slice(
        ForgetOne {
            nodeid: deep.nodeid,
            nlookup: 1,
        }
        .as_slice(),
    );
    assert_eq!(fs.handle(&req(BATCH_FORGET, 0, &huge), 4096), None);
    assert!(getattr(&fs, deep.nodeid).is_ok());
    forget(deep.nodeid, 1);
    for n in [deep.nodeid, c.nodeid, b.nodeid, a.nodeid] {
        assert_eq!(getattr(&fs, n).unwrap_err(), libc::EBADF);
    }
    assert!(
        lock(&fs.inodes)
            .nodes
            .values()
            .all(|n| n.name.as_bytes() == b"hello.txt")
    );
}

#[test]
fn storefs_bounded_fd_cache_reopens() {
    let t = tree();
    let fs = StoreFs::with_max_cached_fds(&t.0, 2).unwrap();
    init(&fs, u32::MAX);
    let deep = path_of(&fs, "a/b/c/deep.txt");
    let many = lookup(&fs, ROOT_ID, "many").unwrap();
    let files: Vec<_> = (0..20)
        .map(|i| lookup(&fs, many.nodeid, &format!("file-{i:03}")).unwrap())
        .collect();
    assert!(lock(&fs.inodes).lru.len() <= 2);
    let open_fds = lock(&fs.inodes)
        .nodes
        .values()
        .filter(|n| n.fd.is_some())
        .count();
    assert!(open_fds <= 2);
    // Evicted nodes are reopened through their parents.
    assert_eq!(getattr(&fs, deep.nodeid).unwrap().size, 4);
    let o = open(&fs, OPEN, deep.nodeid, 0).unwrap();
    assert_eq!(read(&fs, o.fh, 0, 100).unwrap(), b"deep");
    for f in &files {
        assert_eq!(getattr(&fs, f.nodeid).unwrap().ino, f.attr.ino);
    }
    assert_eq!(
        lookup(&fs, deep.nodeid - 1, "deep.txt").unwrap().nodeid,
        deep.nodeid
    );
    // A node replaced on the host is stale, not silently another file.
    std::fs::remove_file(t.0.join("a/b/c/deep.txt")).unwrap();
    std::fs::write(t.0.join("a/b/c/deep.txt"), b"other").unwrap();
    for f in &files {
        getattr(&fs, f.nodeid).unwrap();
    }
    assert_eq!(getattr(&fs, deep.nodeid).unwrap_err(), libc::ESTALE);
}

#[test]
fn storefs_read_only_answers() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    let f = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_CREAT,
    ] {
        assert_eq!(open(&fs, OPEN, f.nodeid, flags).unwrap_err(), libc::EROFS);
    }
    assert_eq!(
        open(&fs, OPENDIR, ROOT_ID, libc::O_RDWR).unwrap_err(),
        libc::EROFS
    );
    for op in [
        SETATTR,
        SYMLINK,
        MKNOD,
        MKDIR,
        UNLINK,
        RMDIR,
        RENAME,
        RENAME2,
        LINK,
        WRITE,
        SETXATTR,
        REMOVEXATTR,
        CREATE,
        FALLOCATE,
        COPY_FILE_RANGE,
        TMPFILE,
    ] {
        assert_eq!(
            call(&fs, op, f.nodeid, &[0; 64]).0,
            libc::EROFS,
            "opcode {op}"
        );
    }
    for op in [FSYNC, FSYNCDIR, SYNCFS] {
        assert_eq!(call(&fs, op, f.nodeid, &[0; 16]).0, 0);
    }
    for op in [
        0,
        7,
        19,
        GETLK,
        SETLK,
        IOCTL,
        POLL,
        BMAP,
        STATX,
        53,
        4096,
        u32::MAX,
    ] {
        assert_eq!(
            call(&fs, op, f.nodeid, &[0; 64]).0,
            libc::ENOSYS,
            "opcode {op}"
        );
    }
    // ACCESS.
    let access = |node, mask: i32| {
        call(
            &fs,
            ACCESS,
            node,
            AccessIn {
                mask: mask as u32,
                padding: 0,
            }
            .as_slice(),
        )
        .0
    };
    assert_eq!(access(f.nodeid, libc::R_OK), 0);
    assert_eq!(access(f.nodeid, libc::F_OK), 0);
    assert_eq!(access(f.nodeid, libc::W_OK), libc::EROFS);
    assert_eq!(access(f.nodeid, libc::X_OK), libc::EACCES);
    let x = path_of(&fs, "bin/run.sh");
    assert_eq!(access(x.nodeid, libc::X_OK | libc::R_OK), 0);
    assert_eq!(access(ROOT_ID, libc::X_OK), 0);
    assert_eq!(access(ROOT_ID, libc::W_OK), libc::EROFS);
    assert_eq!(access(777, libc::R_OK), libc::EBADF);
    // xattrs.
    let g = cat(
        GetxattrIn {
            size: 100,
            padding: 0,
        }
        .as_slice(),
        b"user.x\0",
    );
    assert_eq!(call(&fs, GETXATTR, f.nodeid, &g).0, libc::ENOSYS);
    assert_eq!(call(&fs, GETXATTR, f.nodeid, &g[..10]).0, libc::EINVAL);
    assert_eq!(call(&fs, LISTXATTR, f.nodeid, &g[..8]).0, libc::ENOSYS);
    assert_eq!(call(&fs, LISTXATTR, f.nodeid, &g[..4]).0, libc::EINVAL);
    // STATFS.
    let (e, b) = call(&fs, STATFS, ROOT_ID, &[]);
    assert_eq!(e, 0);
    let s = read_struct::<StatfsOut>(&b).unwrap().0;
    assert!(s.st.bsize > 0 && s.st.namelen > 0);
    // DESTROY forgets everything.
    assert_eq!(call(&fs, DESTROY, 0, &[]).0, 0);
    assert_eq!(getattr(&fs, f.nodeid).unwrap_err(), libc::EBADF);
    assert!(getattr(&fs, ROOT_ID).is_ok());
}

#[test]
fn storefs_lseek() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    init(&fs, u32::MAX);
    let s = lookup(&fs, ROOT_ID, "sparse").unwrap();
    let o = open(&fs, OPEN, s.nodeid, 0).unwrap();
    let seek = |fh, offset, whence: i32| {
        let l = LseekIn {
            fh,
            offset,
            whence: whence as u32,
            padding: 0,
        };
        match call(&fs, LSEEK, s.nodeid, l.as_slice()) {
            (0, b) => Ok(read_struct::<LseekOut>(&b).unwrap().0.offset),
            (e, _) => Err(e),
        }
    };
    assert_eq!(seek(o.fh, 0, libc::SEEK_DATA), Ok(0));
    let hole = seek(o.fh, 0, libc::SEEK_HOLE).unwrap();
    assert!((4096..=8 << 20).contains(&hole), "{hole}");
    assert_eq!(seek(o.fh, 9 << 20, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(o.fh, 0, libc::SEEK_END), Ok(8 << 20));
    assert_eq!(seek(o.fh, 0, libc::SEEK_CUR), Err(libc::EINVAL));
    assert_eq!(seek(o.fh, 0, 99), Err(libc::EINVAL));
    assert_eq!(seek(o.fh, u64::MAX, libc::SEEK_SET), Err(libc::EINVAL));
    assert_eq!(seek(12345, 0, libc::SEEK_DATA), Err(libc::EBADF));
    let d = open(&fs, OPENDIR, ROOT_ID, 0).unwrap();
    assert_eq!(seek(d.fh, 0, libc::SEEK_DATA), Err(libc::EBADF));
}

#[test]
fn storefs_concurrent_requests() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<StoreFs>();
    let t = tree();
    let fs = StoreFs::with_max_cached_fds(&t.0, 3).unwrap();
    init(&fs, u32::MAX);
    let many = lookup(&fs, ROOT_ID, "many").unwrap();
    std::thread::scope(|s| {
        for th in 0..4u64 {
            let fs = &fs;
            s.spawn(move || {
                for round in 0..30u64 {
                    let i = (th * 7 + round) % 50;
                    let e = lookup(fs, many.nodeid, &format!("file-{i:03}")).unwrap();
                    let o = open(fs, OPEN, e.nodeid, 0).unwrap();
                    assert_eq!(read(fs, o.fh, 0, 10).unwrap(), b"x");
                    let r = ReleaseIn {
                        fh: o.fh,
                        ..Default::default()
                    };
                    assert_eq!(call(fs, RELEASE, 0, r.as_slice()).0, 0);
                    let d = path_of(fs, "a/b/c/deep.txt");
                    assert_eq!(getattr(fs, d.nodeid).unwrap().size, 4);
                    for n in [d.nodeid, e.nodeid] {
                        let f = ForgetIn { nlookup: 1 };
                        assert_eq!(fs.handle(&req(FORGET, n, f.as_slice()), 4096), None);
                    }
                }
            });
        }
    });
    // a, b and c were looked up 120 times each and never forgotten; the rest is gone.
    let inodes = lock(&fs.inodes);
    let mut left: Vec<_> = inodes.nodes.values().map(|n| n.name.clone()).collect();
    left.sort();
    assert_eq!(
        left,
        [
            c"a".to_owned(),
            c"b".to_owned(),
            c"c".to_owned(),
            c"many".to_owned()
        ]
    );
    assert!(inodes.lru.len() <= 3);
}

#[test]
fn storefs_malformed_requests() {
    let t = tree();
    let fs = StoreFs::new(&t.0).unwrap();
    // Shorter than a header: EINVAL with unique 0.
    for n in [0, 1, 39] {
        let r = fs.handle(&vec![0xff; n], 4096).unwrap();
        let h = read_struct::<OutHeader>(&r).unwrap().0;
        assert_eq!((h.len, h.error, h.unique), (16, -libc::EINVAL, 0));
    }
    // len disagreeing with the bytes, both ways.
    for len in [0u32, 39, 41, 1000, u32::MAX] {
        let mut r = req(GETATTR, ROOT_ID, &[0; 16]);
        r[..4].copy_from_slice(&len.to_le_bytes());
        let out = fs.handle(&r, 4096).unwrap();
        let h = read_struct::<OutHeader>(&out).unwrap().0;
        assert_eq!((h.error, h.unique), (-libc::EINVAL, 0x1234), "len {len}");
    }
    // Short bodies.
    for op in [
        OPEN,
        OPENDIR,
        READ,
        READDIR,
        READDIRPLUS,
        RELEASE,
        RELEASEDIR,
        ACCESS,
        FLUSH,
        LSEEK,
    ] {
        assert_eq!(
            call(&fs, op, ROOT_ID, &[0; 7]).0,
            libc::EINVAL,
            "opcode {op}"
        );
    }
    // Unknown nodes and handles.
    assert_eq!(getattr(&fs, 0).unwrap_err(), libc::EBADF);
    assert_eq!(getattr(&fs, u64::MAX).unwrap_err(), libc::EBADF);
    assert_eq!(lookup(&fs, 424242, "hello.txt").unwrap_err(), libc::EBADF);
    assert_eq!(open(&fs, OPEN, 424242, 0).unwrap_err(), libc::EBADF);
    assert_eq!(read(&fs, 0, 0, 10).unwrap_err(), libc::EBADF);
    assert_eq!(read(&fs, u64::MAX, 0, u32::MAX).unwrap_err(), libc::EBADF);
    // A reply that does not fit the room: ERANGE; no room at all: still a header.
    let (e, _) = call_room(&fs, GETATTR, ROOT_ID, &[0; 16], 16 + 50);
    assert_eq!(e, libc::ERANGE);
    let r = fs.handle(&req(GETATTR, ROOT_ID, &[0; 16]), 0).unwrap();
    assert_eq!(r.len(), 16);
    // Random garbage never panics.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..20000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 200) as usize;
        let mut buf: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
        if buf.len() >= 40 {
            buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
            buf[4..8].copy_from_slice(&(((x >> 8) % 56) as u32).to_le_bytes());
            buf[16..24].copy_from_slice(&((x >> 20) % 4).to_le_bytes());
        }
        let _ = fs.handle(&buf, (x % 8192) as usize);
    }
}
