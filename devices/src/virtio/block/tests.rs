use super::*;
use crate::virtio::test_utils::memory;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const WRITE: u16 = 2;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;

fn image(name: &str, bytes: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("nixvm-blk-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// 4 sectors, each filled with its own number.
pub(super) fn disk(name: &str, readonly: bool) -> (Disk, PathBuf) {
    let bytes: Vec<u8> = (0..4u8).flat_map(|s| [s + 1; 512]).collect();
    let path = image(name, &bytes);
    let opts = DiskOptions {
        path: path.clone(),
        readonly,
        serial: Some("nixvm-serial-0123456789".into()),
        direct: false,
    };
    (Disk::open(&opts).unwrap(), path)
}

/// Runs one request: a header, the given data descriptors (addr, len, device-writable),
/// and a status byte if `status`. Returns (status byte, used length).
fn run(
    d: &Disk,
    mem: &GuestMemoryMmap,
    ty: u32,
    sector: u64,
    data: &[(u64, u32, bool)],
    status: bool,
) -> (u8, u32) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut descs = vec![RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0))];
    for &(addr, len, w) in data {
        descs.push(RawDescriptor::from(Descriptor::new(
            addr,
            len,
            if w { WRITE } else { 0 },
            0,
        )));
    }
    if status {
        descs.push(RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)));
    }
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(&descs).unwrap();
    let used = d.handle(chain, mem);
    (mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), used)
}

fn guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

#[test]
fn reads_and_writes_the_last_sector() {
    let mem = memory(1 << 20);
    let (d, path) = disk("rw", false);
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)], true),
        (S_OK, 513)
    );
    assert_eq!(guest(&mem, DATA, 512), vec![4u8; 512]);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_OUT, 3, &[(DATA, 512, false)], true),
        (S_OK, 1)
    );
    assert_eq!(run(&d, &mem, VIRTIO_BLK_T_FLUSH, 0, &[], true), (S_OK, 1));
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[1536..], &[0xab; 512][..]);
    assert_eq!(&on_disk[..512], &[1u8; 512][..]);
    // A read split over two descriptors.
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[(DATA, 512, true), (DATA + 0x1000, 1024, true)],
            true
        ),
        (S_OK, 1537)
    );
    assert_eq!(
        guest(&mem, DATA + 0x1000, 1024),
        [vec![2u8; 512], vec![3u8; 512]].concat()
    );
}

#[test]
fn requests_off_the_disk_or_misaligned_fail_with_ioerr() {
    let mem = memory(1 << 20);
    let (d, _) = disk("range", false);
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_IN, 3, &[(DATA, 1024, true)], true),
        (S_IOERR, 1)
    );
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_IN, 4, &[(DATA, 512, true)], true),
        (S_IOERR, 1)
    );
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_IN,
            u64::MAX,
            &[(DATA, 512, true)],
            true
        ),
        (S_IOERR, 1)
    );
    // Far off the disk, where sector * 512 overflows (seen from the e2e hostile guest: the
    // offset was computed before the range check said no).
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_OUT,
            1 << 60,
            &[(DATA, 512, false)],
            true
        ),
        (S_IOERR, 1)
    );
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)], true),
        (S_IOERR, 1)
    );
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_OUT, 0, &[(DATA, 100, false)], true),
        (S_IOERR, 1)
    );
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_OUT, 4, &[(DATA, 512, false)], true),
        (S_IOERR, 1)
    );
}

#[test]
fn malformed_chains_never_panic() {
    let mem = memory(1 << 20);
    let (d, _) = disk("bad", false);
    // No status byte: nothing can be reported, the request is dropped.
    assert_eq!(run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[], false).1, 0);
    // Data for a read in a device-readable buffer: no room to read into.
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)], true),
        (S_IOERR, 1)
    );
    // A write with no data.
    assert_eq!(run(&d, &mem, VIRTIO_BLK_T_OUT, 0, &[], true), (S_IOERR, 1));
    // Data outside guest RAM: an I/O error.
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[(0xffff_0000, 512, true)],
            true
        ),
        (S_IOERR, 1)
    );
    // The status byte outside guest RAM: nothing to report to, dropped.
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq
        .build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(0xffff_0000, 1, WRITE, 0)),
        ])
        .unwrap();
    assert_eq!(d.handle(chain, &mem), 0);
    // A readable buffer after a writable one: the spec forbids it.
    let chain = vq
        .build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(DATA, 512, WRITE, 0)),
            RawDescriptor::from(Descriptor::new(DATA + 0x1000, 512, 0, 0)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
        ])
        .unwrap();
    assert_eq!(d.handle(chain, &mem), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    // A header split over two descriptors and the status byte sharing the data's
    // descriptor: any framing is valid.
    let chain = vq
        .build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(HDR, 8, 0, 0)),
            RawDescriptor::from(Descriptor::new(HDR + 8, 8, 0, 0)),
            RawDescriptor::from(Descriptor::new(DATA, 513, WRITE, 0)),
        ])
        .unwrap();
    mem.write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap(); // IN, sector 0
    assert_eq!(d.handle(chain, &mem), 513);
    assert_eq!(
        guest(&mem, DATA, 513),
        [vec![1u8; 512], vec![S_OK]].concat()
    );
    // Unknown request type.
    assert_eq!(run(&d, &mem, 99, 0, &[], true), (S_UNSUPP, 1));
    // The header itself device-writable (wrong direction): no header to read.
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq
        .build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(HDR, 16, WRITE, 0)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
        ])
        .unwrap();
    assert_eq!(d.handle(chain, &mem), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
}

#[test]
fn get_id_discard_and_write_zeroes() {
    let mem = memory(1 << 20);
    let (d, path) = disk("misc", false);
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)], true),
        (S_OK, 21)
    );
    assert_eq!(&guest(&mem, DATA, 20), b"nixvm-serial-0123456");
    let segment = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(DATA)).unwrap();
    };
    segment(1, 2, 0);
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[(DATA, 16, false)],
            true
        ),
        (S_OK, 1)
    );
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.len(), 2048, "size kept");
    assert_eq!(&on_disk[512..1536], &[0u8; 1024][..]);
    assert_eq!(&on_disk[1536..], &[4u8; 512][..]);
    let discard = || {
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[(DATA, 16, false)],
            true,
        )
    };
    segment(3, 1, 0);
    assert_eq!(discard(), (S_OK, 1));
    segment(3, 2, 0);
    assert_eq!(discard(), (S_IOERR, 1), "past the end");
    segment(0, 1, 2);
    assert_eq!(discard(), (S_UNSUPP, 1), "unknown flag");
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_DISCARD, 0, &[], true),
        (S_IOERR, 1),
        "no segment"
    );
}

#[test]
fn read_only_disks_refuse_writes() {
    let mem = memory(1 << 20);
    let (d, path) = disk("ro", true);
    let b = Block::new(
        Disk::open(&DiskOptions {
            path: path.clone(),
            readonly: true,
            ..Default::default()
        })
        .unwrap(),
    );
    assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(b.avail_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)], true),
        (S_IOERR, 1)
    );
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[(DATA, 16, false)],
            true
        ),
        (S_IOERR, 1)
    );
    assert_eq!(
        run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)], true),
        (S_OK, 513)
    );
    assert_eq!(std::fs::read(&path).unwrap()[..512], [1u8; 512]);
}

#[test]
fn direct_io_bounces_through_aligned_buffers() {
    let mem = memory(1 << 20);
    let bytes: Vec<u8> = (0..4u8).flat_map(|s| [s + 1; 512]).collect();
    let path = image("direct", &bytes);
    let opts = DiskOptions {
        path: path.clone(),
        direct: true,
        ..Default::default()
    };
    let d = match Disk::open(&opts) {
        Ok(d) => d,
        Err(Error::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("skipped: the temp file system has no O_DIRECT");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // Guest buffers at odd addresses: the I/O goes through an aligned bounce buffer.
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_IN,
            1,
            &[(DATA + 3, 1024, true)],
            true
        ),
        (S_OK, 1025)
    );
    assert_eq!(
        guest(&mem, DATA + 3, 1024),
        [vec![2u8; 512], vec![3u8; 512]].concat()
    );
    mem.write_slice(&[0xcd; 512], GuestAddress(DATA + 7))
        .unwrap();
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_OUT,
            0,
            &[(DATA + 7, 512, false)],
            true
        ),
        (S_OK, 1)
    );
    assert_eq!(std::fs::read(&path).unwrap()[..512], [0xcd; 512]);
    // Sector-aligned guest buffers: straight between the file and guest memory.
    assert_eq!(
        run(
            &d,
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            &[(DATA, 512, true), (DATA + 0x1000, 1024, true)],
            true
        ),
        (S_OK, 1537)
    );
    assert_eq!(
        guest(&mem, DATA + 0x1000, 1024),
        [vec![2u8; 512], vec![3u8; 512]].concat()
    );
    assert_eq!(guest(&mem, DATA, 512), [0xcd; 512]);
}

/// On io_uring, and on the pool of threads where io_uring is not there.
#[test]
fn requests_are_served_in_parallel_and_all_complete() {
    served_in_parallel(true);
    served_in_parallel(false);
}

fn served_in_parallel(ring: bool) {
    use crate::virtio::test_utils::CountingIrq;
    use vm_memory::GuestAddressSpace;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;
    const N: u16 = 12;
    let atomic = Memory::new(memory(1 << 20));
    let mem = atomic.memory();
    let (d, _) = disk(if ring { "ring" } else { "pool" }, false);
    let vq = MockSplitQueue::new(&*mem, 64);
    let mut descs = Vec::new();
    for i in 0..N {
        let (hdr, data, status) = (
            HDR + u64::from(i) * 16,
            DATA + u64::from(i) * 0x1000,
            STATUS + u64::from(i),
        );
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&u64::from(i % 4).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let next = |k: u16| 3 * i + k;
        descs.push(RawDescriptor::from(Descriptor::new(hdr, 16, 1, next(1))));
        descs.push(RawDescriptor::from(Descriptor::new(
            data,
            512,
            WRITE | 1,
            next(2),
        )));
        descs.push(RawDescriptor::from(Descriptor::new(status, 1, WRITE, 0)));
    }
    vq.add_desc_chains(&descs, 0).unwrap();
    let q: Queue = vq.create_queue().unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(CountingIrq::default());
    let mut b = Block::new(d);
    b.ring = ring;
    b.activate(
        atomic.clone(),
        irq.clone(),
        vec![(q, kick.try_clone().unwrap())],
    )
    .unwrap();
    kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while vq.used().idx().load() < N {
        assert!(
            std::time::Instant::now() < deadline,
            "requests never completed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if ring {
        assert!(
            matches!(b.serving, Some(Serving::Ring { .. })),
            "io_uring is there"
        );
    }
    assert!(b.reset(), "the worker stops");
    let mut heads: Vec<u32> = (0..N)
        .map(|k| vq.used().ring().ref_at(k.into()).unwrap().load().id())
        .collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..N).map(|i| 3 * u32::from(i)).collect::<Vec<_>>());
    for i in 0..N {
        let byte = u8::try_from(i % 4 + 1).unwrap();
        assert_eq!(guest(&mem, STATUS + u64::from(i), 1), [S_OK]);
        assert_eq!(guest(&mem, DATA + u64::from(i) * 0x1000, 512), [byte; 512]);
    }
    assert!(
        !irq.0.lock().unwrap().is_empty(),
        "the driver was interrupted"
    );
}

#[test]
fn config_space_and_open_errors() {
    let (d, path) = disk("cfg", false);
    let b = Block::new(d);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 4);
    let mut seg = [0u8; 4];
    b.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    let mut past = [0xffu8; 8];
    b.read_config(1000, &mut past);
    assert_eq!(past, [0; 8]);
    // Locked while `b` holds it, writable or read-only.
    let rw = DiskOptions {
        path: path.clone(),
        ..Default::default()
    };
    assert!(matches!(Disk::open(&rw), Err(Error::Locked { .. })));
    assert!(matches!(
        Disk::open(&DiskOptions {
            readonly: true,
            ..rw.clone()
        }),
        Err(Error::Locked { .. })
    ));
    drop(b);
    assert!(Disk::open(&rw).is_ok(), "lock released with the device");
    // Readers share; a writer is kept out while they read, and they while it writes.
    let ro = DiskOptions {
        readonly: true,
        ..rw.clone()
    };
    let (r1, r2) = (Disk::open(&ro).unwrap(), Disk::open(&ro).unwrap());
    assert!(matches!(Disk::open(&rw), Err(Error::Locked { .. })));
    drop((r1, r2));
    let odd = image("odd", &[0u8; 1000]);
    assert!(matches!(
        Disk::open(&DiskOptions {
            path: odd,
            ..Default::default()
        }),
        Err(Error::Size { size: 1000, .. })
    ));
    assert!(matches!(
        Disk::open(&DiskOptions {
            path: "/nonexistent/disk.img".into(),
            ..Default::default()
        }),
        Err(Error::Open { .. })
    ));
}

/// QEMU sees nixvm's locks, and nixvm sees QEMU's (qemu-io; skipped without it).
#[test]
fn locks_exclude_qemu() {
    let qemu_io = |args: &[&str], path: &std::path::Path| {
        std::process::Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(args)
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()
    };
    let path = image("qemu-lock", &[0u8; 4096]);
    let Ok(out) = qemu_io(&["-r", "-c", "read 0 512"], &path) else {
        eprintln!("skipped: no qemu-io");
        return;
    };
    let ok = |o: std::process::Output| {
        o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("lock")
    };
    assert!(ok(out), "qemu-io reads a free image");
    let rw = DiskOptions {
        path: path.clone(),
        ..Default::default()
    };
    let ro = DiskOptions {
        readonly: true,
        ..rw.clone()
    };
    // nixvm writing: QEMU can neither read nor write it.
    let d = Disk::open(&rw).unwrap();
    assert!(!ok(qemu_io(&["-r", "-c", "read 0 512"], &path).unwrap()));
    assert!(!ok(qemu_io(&["-c", "write 0 512"], &path).unwrap()));
    drop(d);
    // nixvm reading: QEMU may read it too, not write it.
    let d = Disk::open(&ro).unwrap();
    assert!(
        ok(qemu_io(&["-r", "-c", "read 0 512"], &path).unwrap()),
        "readers share"
    );
    assert!(
        !ok(qemu_io(&["-c", "write 0 512"], &path).unwrap()),
        "no writer under a reader"
    );
    drop(d);
    // QEMU writing (qemu-io holds the image while its command runs): nixvm stays out.
    let mut writer = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "sleep 3000"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let (writable, readonly) = (Disk::open(&rw), Disk::open(&ro));
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(
        matches!(writable, Err(Error::Locked { .. })),
        "writer under QEMU's writer"
    );
    assert!(
        matches!(readonly, Err(Error::Locked { .. })),
        "reader under QEMU's writer"
    );
}

/// A host where io_uring cannot be set up (here: a seccomp filter that refuses it, as
/// container profiles do) gives an error where the disk is activated, not a panic; the disk
/// then runs on the pool of threads (`served_in_parallel(false)` above).
#[test]
fn no_io_uring_is_an_error_the_pool_covers() {
    std::thread::spawn(|| {
        use crate::seccomp::{RUNTIME, any, apply, compile_errno};
        let p = compile_errno(&[RUNTIME, &[any(libc::SYS_eventfd2)]]).unwrap();
        apply(Some(&p)).unwrap();
        let e = super::uring::Ring::new().err().expect("io_uring refused");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    })
    .join()
    .unwrap();
}
