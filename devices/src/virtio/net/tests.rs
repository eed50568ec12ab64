use super::*;
use crate::virtio::test_utils::{CountingIrq, memory};
use std::fs::File;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const WRITE: u16 = 2;
const NEXT: u16 = 1;

/// A socketpair standing in for the TAP: datagrams keep frame boundaries as a TAP does.
fn fake_tap() -> (Arc<Backend>, File) {
    let (tap, host) = Tap::socketpair("test0").unwrap();
    (Arc::new(tap.into()), host)
}

fn all_features() -> u64 {
    Net::new(
        Tap {
            file: File::open("/dev/null").unwrap(),
            name: "x".into(),
        },
        None,
    )
    .avail_features()
}

fn path(
    mem: &Memory,
    rx: &MockSplitQueue<GuestMemoryMmap>,
    tx: &MockSplitQueue<GuestMemoryMmap>,
    acked: u64,
) -> (DataPath, File, Arc<CountingIrq>) {
    let (tap, other) = fake_tap();
    path_on(tap, other, mem, rx, tx, acked)
}

fn path_on(
    tap: Arc<Backend>,
    other: File,
    mem: &Memory,
    rx: &MockSplitQueue<GuestMemoryMmap>,
    tx: &MockSplitQueue<GuestMemoryMmap>,
    acked: u64,
) -> (DataPath, File, Arc<CountingIrq>) {
    let irq = Arc::new(CountingIrq::default());
    let wire = Wire {
        tap,
        stats: Arc::default(),
        acked,
        link: Arc::new(AtomicBool::new(true)),
        gone: false.into(),
    };
    let p = DataPath::new(
        wire,
        mem.clone(),
        irq.clone(),
        rx.create_queue().unwrap(),
        tx.create_queue().unwrap(),
    );
    (p, other, irq)
}

fn recv(f: &File) -> Option<Vec<u8>> {
    let mut b = vec![0u8; 70000];
    // SAFETY: reading into our own buffer.
    let n = unsafe { libc::read(f.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
    let n = usize::try_from(n).ok()?;
    b.truncate(n);
    Some(b)
}

fn send(f: &File, b: &[u8]) {
    // SAFETY: writing our own buffer.
    let n = unsafe { libc::write(f.as_raw_fd(), b.as_ptr().cast(), b.len()) };
    assert_eq!(usize::try_from(n).unwrap(), b.len());
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

#[test]
fn tx_sends_frames_and_drops_bad_ones() {
    let mem = Memory::new(memory(4 << 20));
    let m = mem.memory();
    let (rx, tx) = (
        MockSplitQueue::create(&*m, GuestAddress(0), 16),
        MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
    );
    let (mut p, other, irq) = path(&mem, &rx, &tx, all_features());
    let good = [vec![0u8; HDR_LEN], frame(100, 1)].concat();
    m.write_slice(&good[..HDR_LEN], GuestAddress(0x10_0000))
        .unwrap();
    m.write_slice(&good[HDR_LEN..], GuestAddress(0x11_0000))
        .unwrap();
    // Header with unknown flags.
    m.write_slice(&[0x80; HDR_LEN], GuestAddress(0x12_0000))
        .unwrap();
    let d = |a: u64, l: u32, f: u16, n: u16| RawDescriptor::from(Descriptor::new(a, l, f, n));
    tx.add_desc_chains(
        &[
            // 0-1: a good frame split over two descriptors.
            d(0x10_0000, 12, NEXT, 1),
            d(0x11_0000, 100, 0, 0),
            // 2: too short.
            d(0x10_0000, 12, 0, 0),
            // 3-4: a device-writable buffer.
            d(0x10_0000, 12, NEXT, 4),
            d(0x11_0000, 100, WRITE, 0),
            // 5: garbage header.
            d(0x12_0000, 200, 0, 0),
            // 6: over 64 KiB.
            d(0x20_0000, 70000, 0, 0),
            // 7: outside guest memory.
            d(0xf000_0000, 200, 0, 0),
        ],
        0,
    )
    .unwrap();
    p.process_tx();
    assert_eq!(recv(&other).unwrap(), good);
    assert!(recv(&other).is_none(), "only the good frame went out");
    assert_eq!(tx.used().idx().load(), 6, "every chain completed");
    assert_eq!(p.wire.stats.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(p.wire.stats.tx_dropped.load(Ordering::Relaxed), 5);
    assert_eq!(irq.0.lock().unwrap().len(), 1);
}

#[test]
fn tx_header_checks() {
    let mem = Memory::new(memory(1 << 20));
    let m = mem.memory();
    let q = MockSplitQueue::create(&*m, GuestAddress(0), 16);
    let base = VIRTIO_F_VERSION_1_BIT;
    let (mut p, _other, _) = path(&mem, &q, &q, base);
    let h = |flags: u32, gso: u32, size: u16, start: u16, off: u16| {
        let mut b = [0u8; HDR_LEN];
        b[0] = u8::try_from(flags).unwrap();
        b[1] = u8::try_from(gso).unwrap();
        b[4..6].copy_from_slice(&size.to_le_bytes());
        b[6..8].copy_from_slice(&start.to_le_bytes());
        b[8..10].copy_from_slice(&off.to_le_bytes());
        b
    };
    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    assert!(p.wire.check_tx_header(&h(0, 0, 0, 0, 0), 60).is_ok());
    assert!(
        p.wire.check_tx_header(&h(csum, 0, 0, 34, 16), 60).is_err(),
        "no CSUM"
    );
    p.wire.acked = all_features();
    assert!(p.wire.check_tx_header(&h(csum, 0, 0, 34, 16), 60).is_ok());
    assert!(
        p.wire.check_tx_header(&h(csum, 0, 0, 50, 16), 60).is_err(),
        "past the end"
    );
    let tcp4 = VIRTIO_NET_HDR_GSO_TCPV4;
    assert!(
        p.wire
            .check_tx_header(&h(csum, tcp4, 1448, 34, 16), 9000)
            .is_ok()
    );
    assert!(
        p.wire
            .check_tx_header(&h(csum, tcp4, 0, 34, 16), 9000)
            .is_err()
    );
    assert!(
        p.wire
            .check_tx_header(&h(0, tcp4, 1448, 0, 0), 9000)
            .is_err()
    );
    let udp = VIRTIO_NET_HDR_GSO_UDP;
    assert!(
        p.wire
            .check_tx_header(&h(csum, udp, 1448, 34, 6), 9000)
            .is_err()
    );
    assert!(
        p.wire
            .check_tx_header(&h(0, VIRTIO_NET_HDR_GSO_ECN, 0, 0, 0), 60)
            .is_err()
    );
}

const VIRTIO_F_VERSION_1_BIT: u64 = super::super::F_VERSION_1;

#[test]
fn rx_merges_buffers_and_waits_for_them() {
    let mem = Memory::new(memory(4 << 20));
    let m = mem.memory();
    let (rx, tx) = (
        MockSplitQueue::create(&*m, GuestAddress(0), 16),
        MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
    );
    let (mut p, other, irq) = path(&mem, &rx, &tx, all_features());
    // No buffers yet: the frame waits and the TAP is no longer polled.
    let big = [vec![0u8; HDR_LEN], frame(3000, 7)].concat();
    send(&other, &big);
    p.process_rx();
    assert!(p.rx_blocked);
    assert_eq!(rx.used().idx().load(), 0);
    // 1500-byte buffers at 0x10_0000, 0x10_1000, ... (descriptor i at 0x10_0000 + i * 4 KiB).
    let add = |from: u16, n: u16| {
        let descs: Vec<RawDescriptor> = (from..from + n)
            .map(|i| {
                let at = 0x10_0000 + u64::from(i) * 0x1000;
                RawDescriptor::from(Descriptor::new(at, 1500, WRITE, 0))
            })
            .collect();
        rx.add_desc_chains(&descs, from).unwrap();
    };
    // Three: less than the largest frame needs, and the ring has room for more, so the
    // frame still waits.
    add(0, 3);
    p.process_rx();
    assert!(p.rx_blocked);
    assert_eq!(rx.used().idx().load(), 0);
    // The whole ring (16 x 1500 bytes): all the guest can give. The 3012 bytes go
    // straight into the first three buffers.
    add(3, 13);
    p.process_rx();
    assert_eq!(rx.used().idx().load(), 3);
    let lens: Vec<u32> = (0..3)
        .map(|i| rx.used().ring().ref_at(i).unwrap().load().len())
        .collect();
    assert_eq!(lens, [1500, 1500, 12]);
    let mut got = vec![0u8; 3012];
    for (i, n) in lens.iter().enumerate() {
        let n = usize::try_from(*n).unwrap();
        let at = GuestAddress(0x10_0000 + 0x1000 * u64::try_from(i).unwrap());
        m.read_slice(&mut got[i * 1500..i * 1500 + n], at).unwrap();
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(got[HDR_LEN..], big[HDR_LEN..]);
    assert_eq!(irq.0.lock().unwrap().len(), 1);
    assert_eq!(p.wire.stats.rx_frames.load(Ordering::Relaxed), 1);
    // Thirteen buffers left, less than the next frame may need: the TAP is not read until
    // the guest gives back the ring; then the next frame goes into the first one left.
    assert!(p.rx_blocked);
    let small = [vec![0u8; HDR_LEN], frame(100, 8)].concat();
    send(&other, &small);
    add(0, 3);
    p.process_rx();
    let e = rx.used().ring().ref_at(3).unwrap().load();
    assert_eq!((e.id(), e.len()), (3, 112));
}

#[test]
fn rx_without_mergeable_buffers_drops_what_does_not_fit() {
    let mem = Memory::new(memory(4 << 20));
    let m = mem.memory();
    let (rx, tx) = (
        MockSplitQueue::create(&*m, GuestAddress(0), 16),
        MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
    );
    let acked = all_features() & !bit(VIRTIO_NET_F_MRG_RXBUF);
    let (mut p, other, _) = path(&mem, &rx, &tx, acked);
    let d = |a: u64, f: u16| RawDescriptor::from(Descriptor::new(a, 1500, f, 0));
    rx.add_desc_chains(
        &[d(0x10_0000, WRITE), d(0x20_0000, 0), d(0x30_0000, WRITE)],
        0,
    )
    .unwrap();
    send(&other, &[vec![0u8; HDR_LEN], frame(3000, 1)].concat());
    let small = [vec![0u8; HDR_LEN], frame(60, 2)].concat();
    send(&other, &small);
    send(&other, &[5u8; 4]); // a runt
    p.process_rx();
    // The big frame is dropped and its buffer 0 kept for the small one; the readable
    // chain 1 goes back empty; buffer 2 waits for the next frame (the runt is dropped).
    assert_eq!(rx.used().idx().load(), 2);
    let e = |i| rx.used().ring().ref_at(i).unwrap().load();
    assert_eq!((e(0).id(), e(0).len()), (0, 72));
    assert_eq!((e(1).id(), e(1).len()), (1, 0));
    let mut got = vec![0u8; 72];
    m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(got[HDR_LEN..], small[HDR_LEN..]);
    assert_eq!(p.wire.stats.rx_dropped.load(Ordering::Relaxed), 2);
    send(&other, &small);
    p.process_rx();
    assert_eq!((e(2).id(), e(2).len()), (2, 72));
}

#[test]
fn rx_buffers_too_short_for_a_header_go_back_empty() {
    let mem = Memory::new(memory(4 << 20));
    let m = mem.memory();
    let (rx, tx) = (
        MockSplitQueue::create(&*m, GuestAddress(0), 16),
        MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
    );
    let (mut p, other, _) = path(&mem, &rx, &tx, all_features());
    // A full ring of zero-length and 11-byte buffers, and one outside guest memory: no
    // frame can go in, each goes back empty once, and the frame waits in the TAP.
    let d = |i: u64| {
        let len = if i % 2 == 0 { 0 } else { 11 };
        let addr = if i == 15 { 1 << 40 } else { 0x10_0000 + i * 16 };
        RawDescriptor::from(Descriptor::new(addr, len, WRITE, 0))
    };
    let descs: Vec<RawDescriptor> = (0..16).map(d).collect();
    rx.add_desc_chains(&descs, 0).unwrap();
    send(&other, &[vec![0u8; HDR_LEN], frame(60, 1)].concat());
    p.process_rx();
    assert_eq!(rx.used().idx().load(), 16, "every chain returned empty");
    assert!(p.rx_blocked);
    assert!(recv(&other).is_none(), "nothing came back");
    assert!(p.rxq.ready(), "not broken");
}

#[test]
fn a_tx_index_too_far_ahead_needs_a_reset_not_a_spin() {
    let mem = Memory::new(memory(4 << 20));
    let m = mem.memory();
    let (rx, tx) = (
        MockSplitQueue::create(&*m, GuestAddress(0), 16),
        MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
    );
    let (mut p, _other, irq) = path(&mem, &rx, &tx, all_features());
    tx.avail().idx().store(u16::to_le(40));
    p.process_tx();
    assert!(!p.txq.ready(), "the queue is no longer served");
    assert_eq!(
        *irq.0.lock().unwrap(),
        [crate::virtio::VIRTIO_MMIO_INT_CONFIG]
    );
    p.process_tx();
    assert_eq!(irq.0.lock().unwrap().len(), 1, "said once");
}

#[test]
fn config_and_mac() {
    let mac = mac_from_name("tap0");
    assert_eq!(mac[0], 0x02, "locally administered unicast");
    assert_eq!(mac, mac_from_name("tap0"), "stable");
    assert_ne!(mac, mac_from_name("tap1"));
    // README's rule, FNV-1a 64 of the name (computed independently): 02 + its first 5 bytes.
    assert_eq!(mac, [0x02, 0xd9, 0x63, 0xfc, 0xef, 0x07]);
    let (tap, _o) = fake_tap();
    let tap = Arc::try_unwrap(tap).ok().unwrap();
    let n = Net::new(tap, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    let mut c = [0u8; 10];
    n.read_config(0, &mut c);
    assert_eq!(c, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0]);
    assert_ne!(n.avail_features() & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
    // set_link: the status bit, and whether it changed.
    let mut n = n;
    assert_eq!(n.set_link(false), Some(true));
    assert_eq!(n.set_link(false), Some(false));
    n.read_config(6, &mut c[..2]);
    assert_eq!(c[..2], [0, 0], "link down");
    assert_eq!(n.set_link(true), Some(true));
    n.read_config(6, &mut c[..2]);
    assert_eq!(c[..2], [1, 0], "link up");
}

#[test]
fn a_link_that_is_down_drops_frames_both_ways() {
    let mem = Memory::new(memory(4 << 20));
    let m = mem.memory();
    let (rx, tx) = (
        MockSplitQueue::create(&*m, GuestAddress(0), 16),
        MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 16),
    );
    let (mut p, other, _irq) = path(&mem, &rx, &tx, all_features());
    p.wire.link.store(false, Ordering::SeqCst);
    let good = [vec![0u8; HDR_LEN], frame(100, 1)].concat();
    m.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    let d = |a: u64, l: u32, f: u16| RawDescriptor::from(Descriptor::new(a, l, f, 0));
    tx.add_desc_chains(&[d(0x10_0000, 112, 0)], 0).unwrap();
    p.process_tx();
    assert!(
        recv(&other).is_none(),
        "a frame went out on a link that is down"
    );
    assert_eq!(tx.used().idx().load(), 1, "the chain still completes");
    rx.add_desc_chains(&[d(0x20_0000, 70_000, WRITE)], 0)
        .unwrap();
    send(&other, &good);
    p.process_rx();
    assert_eq!(
        rx.used().idx().load(),
        0,
        "a frame came in on a link that is down"
    );
    assert_eq!(p.wire.stats.rx_dropped.load(Ordering::Relaxed), 1);
    // Up again: frames flow.
    p.wire.link.store(true, Ordering::SeqCst);
    send(&other, &good);
    p.process_rx();
    assert_eq!(rx.used().idx().load(), 1);
}

#[test]
fn open_errors_name_the_problem() {
    assert!(matches!(
        Tap::open("nixvm-no-such0"),
        Err(Error::NoSuchInterface(_))
    ));
    assert!(matches!(
        Tap::open("lo"),
        Err(Error::NotTap(_) | Error::Tun(_) | Error::TapPermission(_))
    ));
    assert!(matches!(Tap::from_fd(-1), Err(Error::FdNotOpen(-1))));
    let f = File::open("/dev/null").unwrap();
    let fd = f.as_raw_fd();
    assert!(matches!(Tap::from_fd(fd), Err(Error::FdNotTap(_))));
}

/// A stream: no offloads offered; frames go out length-prefixed without the header, in
/// order, and a socket that takes no more holds the rest in the queue until it does; frames
/// come in with a zeroed header.
#[test]
fn stream_frames_both_ways_with_backpressure() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let (a, b) = UnixStream::pair().unwrap();
    let stream = Stream::new(a, "stream0").unwrap();
    let features = Net::new(
        Stream::new(UnixStream::pair().unwrap().0, "s").unwrap(),
        None,
    )
    .avail_features();
    assert_eq!(features & bit(VIRTIO_NET_F_CSUM), 0);
    assert_eq!(features & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
    let mem = Memory::new(memory(16 << 20));
    let m = mem.memory();
    let (rx, tx) = (
        MockSplitQueue::create(&*m, GuestAddress(0), 256),
        MockSplitQueue::create(&*m, GuestAddress(0x1_0000), 256),
    );
    let mut peer = File::from(std::os::fd::OwnedFd::from(b));
    let (mut p, _, _irq) = path_on(
        Arc::new(stream.into()),
        peer.try_clone().unwrap(),
        &mem,
        &rx,
        &tx,
        features,
    );
    // 100 frames of 60000 bytes: far more than a socket buffer holds.
    let n = 100u16;
    let data = frame(60_000, 3);
    m.write_slice(&[0u8; HDR_LEN], GuestAddress(0x10_0000))
        .unwrap();
    m.write_slice(&data, GuestAddress(0x20_0000)).unwrap();
    let d = |a: u64, l: u32, f: u16, n: u16| RawDescriptor::from(Descriptor::new(a, l, f, n));
    let chains: Vec<RawDescriptor> = (0..n)
        .flat_map(|i| {
            [
                d(0x10_0000, 12, NEXT, 2 * i + 1),
                d(0x20_0000, 60_000, 0, 0),
            ]
        })
        .collect();
    tx.add_desc_chains(&chains, 0).unwrap();
    p.process_tx();
    let first = tx.used().idx().load();
    assert!(first < n, "the socket filled ({first} of {n} sent)");
    assert!(p.wire.tap.backlogged());
    // The peer reads; each POLLOUT (here: each call) sends more until all are gone.
    let mut got = 0u16;
    let mut buf = vec![0u8; 4 + 60_000];
    while got < n {
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(buf[..4], 60_000u32.to_be_bytes());
        assert!(buf[4..] == data[..], "frame {got} arrived whole");
        got += 1;
        p.process_tx();
    }
    assert_eq!(tx.used().idx().load(), n, "every chain completed");
    assert!(!p.wire.tap.backlogged());
    assert_eq!(p.wire.stats.tx_frames.load(Ordering::Relaxed), u64::from(n));
    // Receive: one length-prefixed frame lands after a zeroed header.
    let incoming = frame(1000, 9);
    let mut bytes = 1000u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&incoming);
    std::io::Write::write_all(&mut peer, &bytes).unwrap();
    rx.add_desc_chains(&[d(0x40_0000, 70_000, WRITE, 0)], 0)
        .unwrap();
    p.process_rx();
    assert_eq!(rx.used().idx().load(), 1);
    let mut got = vec![0u8; HDR_LEN + 1000];
    m.read_slice(&mut got, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(&got[..10], &[0; 10]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&got[HDR_LEN..], &incoming[..]);
    // The peer closes: the device stops using it and drops what the guest sends.
    drop(peer);
    rx.add_desc_chains(&[d(0x50_0000, 70_000, WRITE, 0)], 1)
        .unwrap();
    p.process_rx();
    assert!(p.wire.is_gone());
}
