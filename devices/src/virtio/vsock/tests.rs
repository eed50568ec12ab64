//! The device against a scripted guest (mock queues) and real UNIX sockets on the host side.
use super::*;
use crate::virtio::test_utils::{CountingIrq, memory};
use std::path::Path;
use std::time::{Duration, Instant};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const WRITE: u16 = 2;
const CID: u64 = 3;
const TX_AREA: u64 = 0x10_0000;
const RX_AREA: u64 = 0x40_0000;
const AREA: u64 = 0x30_0000;

/// A guest driving the device's queues by hand.
struct Guest {
    mem: Memory,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    mux: Muxer,
    next_desc: [u16; 2],
    next_addr: [u64; 2],
    rx_used_seen: u16,
    rx_bufs: HashMap<u16, u64>,
}

fn leak(m: &Memory) -> &'static GuestMemoryMmap {
    Box::leak(Box::new(m.memory().clone()))
}

fn tmp(name: &str) -> PathBuf {
    crate::test_utils::scratch_dir(&format!("vsock-{name}"))
}

impl Guest {
    fn new(host: HostSide) -> Guest {
        let mem = Memory::new(memory(8 << 20));
        let m = leak(&mem);
        let rx = MockSplitQueue::create(m, GuestAddress(0), 256);
        let tx = MockSplitQueue::create(m, GuestAddress(0x1_0000), 256);
        let mux = Muxer::new(
            CID,
            Arc::new(host),
            mem.clone(),
            Arc::new(CountingIrq::default()),
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
        )
        .unwrap();
        Guest {
            mem,
            rx,
            tx,
            mux,
            next_desc: [0, 0],
            next_addr: [RX_AREA, TX_AREA],
            rx_used_seen: 0,
            rx_bufs: HashMap::new(),
        }
    }

    fn alloc(&mut self, q: usize, len: u64) -> (u16, u64) {
        let base = if q == 0 { RX_AREA } else { TX_AREA };
        if self.next_addr[q] + len > base + AREA {
            self.next_addr[q] = base;
        }
        let at = self.next_addr[q];
        self.next_addr[q] += len.next_multiple_of(64);
        let d = self.next_desc[q];
        self.next_desc[q] = (d + 1) % 256;
        (d, at)
    }

    fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    /// Queues one packet on the transmit queue and lets the device take it.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = u32::try_from(data.len()).unwrap();
        let bytes = [&hdr.bytes()[..], data].concat();
        self.send_raw(&bytes);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let (d, at) = self.alloc(1, bytes.len() as u64);
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(at))
            .unwrap();
        let len = u32::try_from(bytes.len()).unwrap();
        self.tx
            .add_desc_chains(&[RawDescriptor::from(Descriptor::new(at, len, 0, 0))], d)
            .unwrap();
        while self.mux.process_tx() {}
    }

    /// Gives the device `n` receive buffers of `size` bytes.
    fn give_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let (d, at) = self.alloc(0, u64::from(size));
            self.rx_bufs.insert(d, at);
            self.rx
                .add_desc_chains(
                    &[RawDescriptor::from(Descriptor::new(at, size, WRITE, 0))],
                    d,
                )
                .unwrap();
        }
    }

    /// Runs the device (host events, then sending) and returns the packets it put into
    /// receive buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.mux.host_events();
        while !self.mux.process_rx() {}
        let m = self.mem.memory();
        let mut out = Vec::new();
        let used = self.rx.used().idx().load();
        while self.rx_used_seen != used {
            let e = self
                .rx
                .used()
                .ring()
                .ref_at(usize::from(self.rx_used_seen % 256))
                .unwrap()
                .load();
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let at = self.rx_bufs[&u16::try_from(e.id()).unwrap()];
            let mut h = [0u8; HDR_LEN];
            m.read_slice(&mut h, GuestAddress(at)).unwrap();
            let hdr = Header::parse(&h);
            assert_eq!(e.len() as usize, HDR_LEN + hdr.len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            m.read_slice(&mut data, GuestAddress(at + HDR_LEN as u64))
                .unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Runs the device until `cond` holds for what it sent (collected), for at most 5 s.
    fn until(&mut self, cond: impl Fn(&[(Header, Vec<u8>)]) -> bool) -> Vec<(Header, Vec<u8>)> {
        let start = Instant::now();
        let mut all = Vec::new();
        loop {
            all.extend(self.received());
            if cond(&all) || start.elapsed() > Duration::from_secs(5) {
                return all;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn host_with_socket(dir: &Path) -> HostSide {
    let listener = UnixListener::bind(dir.join("v.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    HostSide {
        listener: Some(listener),
        path: Some(dir.join("v.sock")),
        notify: None,
    }
}

fn ops(p: &[(Header, Vec<u8>)]) -> Vec<u16> {
    p.iter().map(|x| x.0.op).collect()
}

#[test]
fn guest_connects_to_a_host_socket_and_both_talk() {
    let dir = tmp("g2h");
    let server = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    let mut g = Guest::new(host_with_socket(&dir));
    g.give_rx(16, 4096);
    g.send(g.hdr(OP_REQUEST, 1234, 5000), &[]);
    let got = g.received();
    assert_eq!(ops(&got), [OP_RESPONSE]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5000, 1234));
    assert_eq!(got[0].0.buf_alloc, BUF_ALLOC);
    let (mut s, _) = server.accept().unwrap();
    g.send(g.hdr(OP_RW, 1234, 5000), b"hello");
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    s.write_all(b"world").unwrap();
    let got = g.until(|p| !p.is_empty());
    assert_eq!(ops(&got), [OP_RW]);
    assert_eq!(got[0].1, b"world");
    assert_eq!(got[0].0.fwd_cnt, 5, "the device tells what it forwarded");
    // The host program closes: the guest hears SHUTDOWN(SEND), in the same wake-up that
    // found the end (nothing else would wake the device for it).
    drop(s);
    std::thread::sleep(Duration::from_millis(20));
    let got = g.received();
    assert_eq!(ops(&got), [OP_SHUTDOWN]);
    assert_eq!(got[0].0.flags, SHUTDOWN_SEND);
    // The guest closes too: RST, and the connection is gone.
    let mut h = g.hdr(OP_SHUTDOWN, 1234, 5000);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(h, &[]);
    assert_eq!(ops(&g.received()), [OP_RST]);
    assert!(g.mux.conns.is_empty() && g.mux.fds.is_empty());
}

#[test]
fn host_connects_with_the_connect_line() {
    let dir = tmp("h2g");
    let mut g = Guest::new(host_with_socket(&dir));
    g.give_rx(16, 4096);
    let mut c = UnixStream::connect(dir.join("v.sock")).unwrap();
    c.write_all(b"CONNECT 52\nfirst bytes").unwrap();
    let got = g.until(|p| !p.is_empty());
    assert_eq!(ops(&got), [OP_REQUEST]);
    let local = got[0].0.src_port;
    assert_eq!(got[0].0.dst_port, 52);
    assert!(local >= FIRST_LOCAL_PORT);
    g.send(g.hdr(OP_RESPONSE, 52, local), &[]);
    let mut line = [0u8; 14];
    c.read_exact(&mut line).unwrap();
    assert_eq!(std::str::from_utf8(&line).unwrap(), format!("OK {local}\n"));
    // What followed the line is the connection's first data.
    let got = g.until(|p| !p.is_empty());
    assert_eq!(got[0].1, b"first bytes");
    // A second client that sends garbage is closed; an unknown guest packet gets RST.
    let mut bad = UnixStream::connect(dir.join("v.sock")).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    for _ in 0..1000 {
        g.received();
        if g.mux.pending.is_empty() && g.mux.conns.len() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut b = [0u8; 1];
    assert_eq!(bad.read(&mut b).unwrap(), 0);
    g.send(g.hdr(OP_RW, 9, 9), b"x");
    g.send(g.hdr(OP_RST, 9, 9), &[]);
    assert_eq!(ops(&g.received()), [OP_RST], "one RST, none for the RST");
    // The guest resets the connection: the host program sees it end.
    g.send(g.hdr(OP_RST, 52, local), &[]);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.read(&mut b).unwrap(), 0);
}

#[test]
fn the_device_never_sends_past_the_guests_credit() {
    let dir = tmp("credit");
    let server = UnixListener::bind(dir.join("v.sock_7")).unwrap();
    let mut g = Guest::new(host_with_socket(&dir));
    g.give_rx(64, 4096);
    let mut h = g.hdr(OP_REQUEST, 1, 7);
    h.buf_alloc = 1000;
    g.send(h, &[]);
    let (mut s, _) = server.accept().unwrap();
    g.received();
    s.write_all(&[7u8; 5000]).unwrap();
    let got = g.until(|p| p.iter().map(|x| x.1.len()).sum::<usize>() >= 1000);
    std::thread::sleep(Duration::from_millis(50));
    let more = g.received();
    let sent: usize = got.iter().chain(&more).map(|x| x.1.len()).sum();
    assert_eq!(sent, 1000, "exactly the credit");
    // The guest consumed it all and says so: the rest comes.
    let mut u = g.hdr(OP_CREDIT_UPDATE, 1, 7);
    u.buf_alloc = 1000;
    u.fwd_cnt = 1000;
    g.send(u, &[]);
    let got = g.until(|p| p.iter().map(|x| x.1.len()).sum::<usize>() >= 1000);
    assert_eq!(got.iter().map(|x| x.1.len()).sum::<usize>(), 1000);
}

#[test]
fn guest_data_waits_for_a_slow_host_and_credit_comes_back() {
    let dir = tmp("slow");
    let server = UnixListener::bind(dir.join("v.sock_8")).unwrap();
    let mut g = Guest::new(host_with_socket(&dir));
    g.give_rx(128, 4096);
    g.send(g.hdr(OP_REQUEST, 2, 8), &[]);
    let (mut s, _) = server.accept().unwrap();
    g.received();
    // The whole advertised buffer, in 64 KiB packets, while the host reads nothing.
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..(BUF_ALLOC as usize / chunk.len()) {
        g.send(g.hdr(OP_RW, 2, 8), &chunk);
    }
    assert!(g.mux.conns.contains_key(&(8, 2)), "within credit: kept");
    // The host reads it all; the device flushes as the socket drains and says so.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut b = vec![0u8; 65536];
        while all.len() < BUF_ALLOC as usize {
            let n = s.read(&mut b).unwrap();
            all.extend_from_slice(&b[..n]);
        }
        (s, all)
    });
    let mut got = Vec::new();
    let start = Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(10) {
        got.extend(g.received());
        std::thread::sleep(Duration::from_millis(2));
    }
    let (s, all) = reader.join().unwrap();
    got.extend(g.received());
    // The device reported what it forwarded, to within the update threshold.
    assert!(got.iter().any(|x| x.0.fwd_cnt > BUF_ALLOC - BUF_ALLOC / 4));
    assert!(all.chunks(65536).all(|c| c == &chunk[..]));
    assert!(got.iter().any(|x| x.0.op == OP_CREDIT_UPDATE));
    // A guest that ignores its credit while the host does not read: once the socket and the
    // device's buffer are full, reset (never more than BUF_ALLOC held).
    for _ in 0..64 {
        g.send(g.hdr(OP_RW, 2, 8), &chunk);
        let held = g.mux.conns.get(&(8, 2)).map_or(0, |c| c.pending.len());
        assert!(held <= BUF_ALLOC as usize + CONNECT_LINE_MAX);
        if held == 0 && !g.mux.conns.contains_key(&(8, 2)) {
            break;
        }
    }
    let got = g.until(|p| p.iter().any(|x| x.0.op == OP_RST));
    assert!(got.iter().any(|x| x.0.op == OP_RST));
    assert!(g.mux.conns.is_empty());
    drop(s);
}

#[test]
fn bad_packets_and_buffers_do_not_hurt() {
    let dir = tmp("bad");
    let mut g = Guest::new(host_with_socket(&dir));
    g.give_rx(8, 4096);
    // Short header, a payload longer than the buffer, a wrong source CID, another type, no
    // one listening: none stops the device; each answerable one gets an RST.
    g.send_raw(&[1, 2, 3]);
    let mut h = g.hdr(OP_RW, 1, 1);
    h.len = 60000;
    g.send_raw(&h.bytes());
    let mut h = g.hdr(OP_REQUEST, 1, 2);
    h.src_cid = 99;
    g.send(h, &[]);
    let mut h = g.hdr(OP_REQUEST, 1, 3);
    h.kind = 2;
    g.send(h, &[]);
    g.send(g.hdr(OP_REQUEST, 1, 4), &[]);
    let got = g.received();
    assert_eq!(ops(&got), [OP_RST, OP_RST, OP_RST]);
    // Receive buffers that are device-readable or shorter than a header go back empty.
    g.rx.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(RX_AREA, 4096, 0, 0))],
        200,
    )
    .unwrap();
    g.rx_bufs.insert(200, RX_AREA);
    // Too many resets at once are bounded.
    for p in 0..1000 {
        g.send(g.hdr(OP_RW, 5, p), b"x");
    }
    assert!(g.mux.resets.len() <= MAX_PENDING_RESETS);
}

#[test]
fn connections_are_bounded() {
    let dir = tmp("many");
    let _server = UnixListener::bind(dir.join("v.sock_9")).unwrap();
    let mut g = Guest::new(host_with_socket(&dir));
    for p in 0..(MAX_CONNS as u32 + 10) {
        g.send(g.hdr(OP_REQUEST, 1000 + p, 9), &[]);
    }
    assert_eq!(g.mux.conns.len(), MAX_CONNS);
}

/// A device that relays notifications to a socket the test reads, and a guest connection to
/// its notify port (guest port 77).
fn notify_guest(name: &str) -> (Guest, UnixDatagram) {
    let sock = tmp(name).join("notify");
    let host_end = UnixDatagram::bind(&sock).unwrap();
    host_end
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut g = Guest::new(HostSide {
        listener: None,
        path: None,
        notify: Some(Notify::new(sock.display().to_string()).unwrap()),
    });
    g.give_rx(8, 4096);
    g.send(g.hdr(OP_REQUEST, 77, NOTIFY_PORT), &[]);
    (g, host_end)
}

#[test]
fn sd_notify_messages_are_relayed_filtered() {
    let (mut g, host_end) = notify_guest("notify");
    assert_eq!(ops(&g.received()), [OP_RESPONSE]);
    g.send(g.hdr(OP_RW, 77, NOTIFY_PORT), b"READY=1\nMAINPID=1\n");
    g.send(g.hdr(OP_RW, 77, NOTIFY_PORT), b"STATUS=up and running");
    let mut h = g.hdr(OP_SHUTDOWN, 77, NOTIFY_PORT);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(h, &[]);
    let mut b = [0u8; 256];
    host_end
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = host_end.recv(&mut b).unwrap();
    assert_eq!(&b[..n], b"READY=1\nSTATUS=up and running");
    assert!(ops(&g.received()).contains(&OP_RST));
    // Without a socket path, other ports are refused.
    g.send(g.hdr(OP_REQUEST, 78, 5000), &[]);
    assert_eq!(ops(&g.received()), [OP_RST]);
}

#[test]
fn what_is_relayed() {
    assert_eq!(
        relayed(b"READY=1\nSTATUS=Ready."),
        Some("READY=1\nSTATUS=Ready.".into())
    );
    assert_eq!(relayed(b"X_SYSTEMD_UNIT_ACTIVE=shutdown.target"), None);
    assert_eq!(relayed(b"MAINPID=1\nFDSTORE=1\nRELOADING=1"), None);
    assert_eq!(
        relayed(b"EXIT_STATUS=0\nX_SYSTEMD_SHUTDOWN=poweroff"),
        Some("STOPPING=1".into())
    );
    assert_eq!(relayed(b"EXIT_STATUS=0\nX_SYSTEMD_SHUTDOWN=reboot"), None);
}

#[test]
fn a_notification_left_open_is_relayed_when_the_device_goes() {
    let (mut g, host_end) = notify_guest("notify-open");
    g.send(
        g.hdr(OP_RW, 77, NOTIFY_PORT),
        b"EXIT_STATUS=0\nX_SYSTEMD_SHUTDOWN=poweroff",
    );
    drop(g);
    let mut b = [0u8; 64];
    host_end
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = host_end.recv(&mut b).unwrap();
    assert_eq!(&b[..n], b"STOPPING=1");
}
