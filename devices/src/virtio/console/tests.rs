//! The device's worker against a scripted guest (mock queues) and real sockets.
use super::*;
use crate::virtio::test_utils::{CountingIrq, memory};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const WRITE: u16 = 2;
const NEXT: u16 = 1;

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An activated device with its two queues and their kicks.
struct Setup {
    mem: GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    kicks: Vec<EventFd>,
    dev: Console,
}

fn setup(out: ConsoleOut, input: ConsoleInput) -> Setup {
    let mem = memory(16 << 20);
    let m: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
    let rx = MockSplitQueue::create(m, GuestAddress(0), 256);
    let tx = MockSplitQueue::create(m, GuestAddress(0x1_0000), 256);
    let mut dev = Console::new(out, input).unwrap();
    let evts: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    dev.activate(
        Memory::new(mem.clone()),
        Arc::new(CountingIrq::default()),
        queues.into_iter().zip(evts).collect(),
    )
    .unwrap();
    Setup {
        mem,
        rx,
        tx,
        kicks,
        dev,
    }
}

fn input() -> (ConsoleInput, EventFd) {
    let drained = EventFd::new(EFD_NONBLOCK).unwrap();
    (
        ConsoleInput::new(drained.try_clone().unwrap()).unwrap(),
        drained,
    )
}

#[test]
fn output_waits_for_a_full_socket_and_loses_nothing() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (inp, _) = input();
    let s = setup(ConsoleOut::Stream(ours), inp);
    // 128 chains of 16 KiB, two descriptors each: 2 MiB, far more than a socket buffer.
    let mut sent = Vec::new();
    let mut descs = Vec::new();
    for i in 0..128u64 {
        let at = 0x10_0000 + i * 0x4000;
        let data: Vec<u8> = (0..0x4000u32).map(|b| (b as u64 * 7 + i) as u8).collect();
        s.mem.write_slice(&data, GuestAddress(at)).unwrap();
        sent.extend_from_slice(&data);
        descs.push(RawDescriptor::from(Descriptor::new(
            at,
            0x1000,
            NEXT,
            (2 * i + 1) as u16,
        )));
        descs.push(RawDescriptor::from(Descriptor::new(
            at + 0x1000,
            0x3000,
            0,
            0,
        )));
    }
    s.tx.add_desc_chains(&descs, 0).unwrap();
    s.kicks[TRANSMITQ].write(1).unwrap();
    // Nobody reads: the device stops where the socket is full, and says so to no one.
    std::thread::sleep(Duration::from_millis(200));
    let used = s.tx.used().idx().load();
    assert!(
        used < 128,
        "all {used} chains done though the socket is full"
    );
    let mut got = vec![0u8; sent.len()];
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    peer.read_exact(&mut got).unwrap();
    assert!(got == sent, "output differs from what the guest wrote");
    wait_for("every chain completed", || s.tx.used().idx().load() == 128);
    drop(s.dev);
}

#[test]
fn input_goes_into_receive_buffers_and_the_reader_hears_when_it_is_gone() {
    let (inp, drained) = input();
    let s = setup(ConsoleOut::Off, inp.clone());
    assert_eq!(inp.enqueue(&[b'x'; 100]), 100);
    // No buffers yet: it waits.
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        drained.read().is_err(),
        "drained before the guest had buffers"
    );
    let descs: Vec<RawDescriptor> = (0..3u64)
        .map(|i| RawDescriptor::from(Descriptor::new(0x20_0000 + i * 0x100, 40, WRITE, 0)))
        .collect();
    s.rx.add_desc_chains(&descs, 0).unwrap();
    s.kicks[RECEIVEQ].write(1).unwrap();
    wait_for("three buffers used", || s.rx.used().idx().load() == 3);
    let lens: Vec<u32> = (0..3)
        .map(|i| s.rx.used().ring().ref_at(i).unwrap().load().len())
        .collect();
    assert_eq!(lens, [40, 40, 20]);
    wait_for("drained signalled", || drained.read().is_ok());
    // At most INPUT_CAP is held; the rest is the reader's to keep.
    assert_eq!(inp.enqueue(&vec![0; INPUT_CAP + 5]), INPUT_CAP);
    assert_eq!(inp.enqueue(b"more"), 0);
    drop(s.dev);
}

#[test]
fn bad_and_oversized_chains_are_completed_not_served_whole() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (inp, _) = input();
    let s = setup(ConsoleOut::Stream(ours), inp);
    // One chain outside guest memory, then one of 16 descriptors that each claim all of it.
    let mut descs = vec![RawDescriptor::from(Descriptor::new(
        0xffff_0000_0000,
        64,
        0,
        0,
    ))];
    s.tx.add_desc_chains(&descs, 0).unwrap();
    descs = (0..16u16)
        .map(|i| {
            RawDescriptor::from(Descriptor::new(
                0,
                16 << 20,
                if i < 15 { NEXT } else { 0 },
                i + 2,
            ))
        })
        .collect();
    s.tx.add_desc_chains(&descs, 1).unwrap();
    s.kicks[TRANSMITQ].write(1).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; MAX_TX_CHAIN];
    peer.read_exact(&mut got).unwrap();
    wait_for("both chains completed", || s.tx.used().idx().load() == 2);
    peer.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(
        peer.read(&mut [0u8; 16]).is_err(),
        "more than MAX_TX_CHAIN went out"
    );
    drop(s.dev);
}

#[test]
fn a_peer_that_goes_away_ends_output_not_the_device() {
    let (ours, peer) = UnixStream::pair().unwrap();
    let (inp, _) = input();
    let s = setup(ConsoleOut::Stream(ours), inp);
    drop(peer);
    s.mem
        .write_slice(b"hello", GuestAddress(0x10_0000))
        .unwrap();
    for i in 0..2u16 {
        s.tx.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x10_0000, 5, 0, 0))],
            i,
        )
        .unwrap();
        s.kicks[TRANSMITQ].write(1).unwrap();
        wait_for("chain completed", || s.tx.used().idx().load() == i + 1);
    }
    let mut dev = s.dev;
    assert!(dev.reset());
}

#[test]
fn a_socket_console_waits_for_a_slow_client_too() {
    use crate::console::SocketConsole;
    let console = Arc::new(Mutex::new(SocketConsole::default()));
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (inp, _) = input();
    let s = setup(ConsoleOut::Socket(console.clone()), inp);
    lock(&console).attach(ours).unwrap();
    let mut sent = Vec::new();
    let mut descs = Vec::new();
    for i in 0..64u64 {
        let at = 0x10_0000 + i * 0x8000;
        let data: Vec<u8> = (0..0x8000u32).map(|b| (b as u64 * 13 + i) as u8).collect();
        s.mem.write_slice(&data, GuestAddress(at)).unwrap();
        sent.extend_from_slice(&data);
        descs.push(RawDescriptor::from(Descriptor::new(at, 0x8000, 0, 0)));
    }
    s.tx.add_desc_chains(&descs, 0).unwrap();
    s.kicks[TRANSMITQ].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        s.tx.used().idx().load() < 64,
        "2 MiB went to a client that reads nothing"
    );
    let mut got = vec![0u8; sent.len()];
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    peer.read_exact(&mut got).unwrap();
    assert!(got == sent, "the client's bytes differ from the guest's");
    wait_for("every chain completed", || s.tx.used().idx().load() == 64);
    drop(s.dev);
}
