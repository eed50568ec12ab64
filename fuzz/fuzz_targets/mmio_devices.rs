//! A guest driving a virtio device on virtio-mmio or virtio-pci (its BAR, its configuration
//! space through the PCI ports, MSI-X table and enable bits) as it likes: register writes
//! and reads, guest memory
//! contents (descriptor tables, rings, request headers) and queue kicks, in any order, on
//! virtio-rng, virtio-blk (a scratch image), virtio-net (a socketpair as the TAP, with
//! frames arriving from the "host") and the virtio-fs frontend (a scripted vhost-user back
//! end that answers the frontend and hangs up after as many messages as the input says, so
//! that nixvm's own EIO fallback serves the guest's rings) and virtio-vsock (host programs
//! connecting to its socket and writing what the input says, a host socket the guest can
//! connect to) and virtio-console (its output a socket the host reads only when the input
//! says, so it fills up; its input what the input says). nixvm must not panic, hang or
//! allocate without bound; the devices' worker threads are stopped (joined) at the end of
//! every input, so a worker spinning on a bad queue shows as a timeout.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nixvm_devices::bus::BusDevice;
use nixvm_devices::console::ConsoleOut;
use nixvm_devices::pci::{MsiMessage, MsiRoutes, PciRoot};
use nixvm_devices::virtio::block::{Block, Disk, DiskOptions};
use nixvm_devices::virtio::console::{Console, ConsoleInput};
use nixvm_devices::virtio::fs::{FsOptions, VhostUserFs};
use nixvm_devices::virtio::mmio::MmioTransport;
use nixvm_devices::virtio::net::{Net, Tap};
use nixvm_devices::virtio::pci::{self, PciTransport};
use nixvm_devices::virtio::rng::Rng;
use nixvm_devices::virtio::transport::VirtioTransport as _;
use nixvm_devices::virtio::vsock::{HostSide, Vsock};
use nixvm_devices::virtio::{Memory, VirtioDevice, test_utils::memory};
use vm_memory::{Bytes, FileOffset, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Guest memory: 1 MiB, so that most addresses the input picks are inside it.
const MEM: usize = 1 << 20;

fn image() -> &'static std::path::Path {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("nixvm-fuzz-{}.img", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 << 10]).unwrap();
        p
    })
}

/// Reads the input a piece at a time; runs out as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.bytes(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(b)
    }
}

/// Guest memory in a memfd, as a vhost-user back end needs it.
fn shared_memory() -> nixvm_devices::virtio::GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor it returns is ours.
    let file = unsafe {
        let fd = libc::memfd_create(c"nixvm-fuzz".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        std::fs::File::from_raw_fd(fd)
    };
    file.set_len(MEM as u64).unwrap();
    nixvm_devices::virtio::GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// A vhost-user back end that answers what the frontend asks (features, ring bases) and
/// hangs up after `messages` messages.
fn scripted_backend(listener: UnixListener, messages: u8) {
    let Ok((mut s, _)) = listener.accept() else {
        return;
    };
    for _ in 0..messages {
        let mut hdr = [0u8; 12];
        if s.read_exact(&mut hdr).is_err() {
            return;
        }
        let request = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size.min(4096)];
        if size > 4096 || s.read_exact(&mut body).is_err() {
            return;
        }
        let reply: Option<Vec<u8>> = match request {
            // GET_FEATURES: VERSION_1 only (no protocol features: two queues).
            1 => Some((1u64 << 32).to_le_bytes().to_vec()),
            // GET_VRING_BASE: the queue's index, base 0.
            11 => Some([&body[..4.min(body.len())], &[0u8; 4][..]].concat()),
            _ => None,
        };
        if let Some(payload) = reply {
            let mut m = request.to_le_bytes().to_vec();
            m.extend(0x5u32.to_le_bytes()); // version 1, reply
            m.extend(u32::try_from(payload.len()).unwrap().to_le_bytes());
            m.extend(payload);
            if s.write_all(&m).is_err() {
                return;
            }
        }
    }
}

/// MSI-X routes that go nowhere (the vmm's bind KVM irqfds).
struct NoRoutes;
impl MsiRoutes for NoRoutes {
    fn route(&mut self, _: usize, _: Option<MsiMessage>) {}
}

/// The device on one of the two transports, as a guest reaches it.
enum Transport {
    Mmio(MmioTransport),
    /// The PCI ports (the function at device number 1) and the function's BAR.
    Pci(PciRoot, Arc<Mutex<PciTransport>>),
}

impl Transport {
    fn new(device: Box<dyn VirtioDevice>, mem: &Memory, pci: bool) -> Transport {
        if !pci {
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            return Transport::Mmio(MmioTransport::new(device, mem.clone(), irq).unwrap());
        }
        let vectors = (0..pci::VECTORS)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let t = PciTransport::new(
            device,
            mem.clone(),
            0xc000_0000,
            vectors,
            Box::new(NoRoutes),
        );
        let t = Arc::new(Mutex::new(t.unwrap()));
        let mut root = PciRoot::default();
        root.attach(1, t.clone());
        Transport::Pci(root, t)
    }

    /// A register access anywhere in the window (4 bytes, as virtio-mmio's registers are) or
    /// the BAR (1, 2, 4 or 8 bytes).
    fn access(&mut self, input: &mut Input, write: bool) {
        let len = match self {
            Transport::Mmio(_) => 4,
            Transport::Pci(..) => [1, 2, 4, 8][usize::from(input.u8() % 4)],
        };
        let (off, mut b) = (input.u32(), [0u8; 8]);
        b.copy_from_slice(&u64::from(input.u32()).to_le_bytes());
        let mut access = |dev: &mut dyn BusDevice, off: u64| {
            if write {
                dev.write(off, &b[..len]);
            } else {
                dev.read(off, &mut b[..len]);
            }
        };
        match self {
            Transport::Mmio(t) => access(t, u64::from(off % 0x200)),
            Transport::Pci(_, t) => access(&mut *t.lock().unwrap(), u64::from(off) % pci::BAR_SIZE),
        }
    }

    /// A configuration space access through the ports: address, then data (PCI only).
    fn config(&mut self, input: &mut Input) {
        let Transport::Pci(root, _) = self else {
            return;
        };
        let address = 0x8000_0800 | (input.u32() & 0xfc);
        root.write(0, &address.to_le_bytes());
        let (port, v) = (u64::from(input.u8() % 4), input.u32());
        if v & 1 == 0 {
            root.write(4 + port, &v.to_le_bytes()[..1 << (v >> 1 & 1)]);
        } else {
            root.read(4 + port, &mut [0u8; 4]);
        }
    }

    fn kick(&mut self, q: u32) {
        match self {
            Transport::Mmio(t) => {
                t.write(0x50, &q.to_le_bytes());
                t.settle();
            }
            Transport::Pci(_, t) => {
                let mut t = t.lock().unwrap();
                t.write(pci::NOTIFY + 4 * u64::from(q), &(q as u16).to_le_bytes());
                t.settle();
            }
        }
    }

    /// The driver resets the device (Status 0).
    fn reset(&mut self) {
        match self {
            Transport::Mmio(t) => t.write(0x70, &0u32.to_le_bytes()),
            Transport::Pci(root, t) => {
                t.lock().unwrap().write(0x14, &[0]);
                root.reset();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let first = input.u8();
    let (kind, on_pci) = (first % 6, first & 0x80 != 0);
    let mem = Memory::new(if kind == 3 {
        shared_memory()
    } else {
        memory(MEM)
    });
    let mut host_end = None;
    let mut backend = None;
    let mut vsock_dir = None;
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut port5 = None;
    let mut console = None;
    let device: Box<dyn VirtioDevice> = match kind {
        0 => Box::new(Rng::default()),
        5 => {
            let (ours, host) = UnixStream::pair().unwrap();
            let _ = host.set_nonblocking(true);
            let drained = EventFd::new(EFD_NONBLOCK).unwrap();
            let keys = ConsoleInput::new(drained).unwrap();
            console = Some((host, keys.clone()));
            Box::new(Console::new(ConsoleOut::Stream(ours), keys).unwrap())
        }
        4 => {
            let dir = std::env::temp_dir().join(format!("nixvm-fuzz-vsock-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let listener = UnixListener::bind(dir.join("v.sock")).unwrap();
            // A host port the guest can reach (nobody accepts: the backlog holds them).
            port5 = UnixListener::bind(dir.join("v.sock_5")).ok();
            let host = HostSide {
                listener: Some(listener),
                path: Some(dir.join("v.sock")),
                notify: None,
            };
            vsock_dir = Some(dir);
            Box::new(Vsock::new(3, host).unwrap())
        }
        3 => {
            let sock = std::env::temp_dir().join(format!("nixvm-fuzz-{}.sock", std::process::id()));
            let _ = std::fs::remove_file(&sock);
            let listener = UnixListener::bind(&sock).unwrap();
            let messages = input.u8();
            backend = Some(std::thread::spawn(move || {
                scripted_backend(listener, messages)
            }));
            let opts = FsOptions {
                tag: "fuzz".into(),
                socket: sock.clone(),
                queue_size: 16,
                request_queues: 1,
            };
            let fs = VhostUserFs::connect(&opts, Duration::from_secs(1));
            let _ = std::fs::remove_file(&sock);
            match fs {
                Ok(fs) => Box::new(fs),
                Err(_) => {
                    let _ = backend.take().map(|b| b.join());
                    return;
                }
            }
        }
        1 => {
            let opts = DiskOptions {
                path: image().to_owned(),
                ..Default::default()
            };
            match Disk::open(&opts) {
                Ok(d) => Box::new(Block::new(d)),
                Err(_) => return, // held by a previous input still being dropped
            }
        }
        _ => {
            let (tap, host) = Tap::socketpair("fuzz0").unwrap();
            host_end = Some(host);
            Box::new(Net::new(tap, None))
        }
    };
    let mut t = Transport::new(device, &mem, on_pci);
    let m = memory_of(&mem);
    for _ in 0..256 {
        if input.0.is_empty() {
            break;
        }
        match input.u8() % 7 {
            // A register write or read: in the window or BAR (registers and config space).
            0 | 1 => t.access(&mut input, true),
            2 => t.access(&mut input, false),
            6 => t.config(&mut input),
            // Guest memory: up to 64 bytes anywhere.
            3 => {
                let at = u64::from(input.u32()) % MEM as u64;
                let n = usize::from(input.u8() % 64);
                let bytes = input.bytes(n).to_vec();
                let _ = m.write_slice(&bytes, GuestAddress(at));
            }
            // A kick (QueueNotify is an ioeventfd in nixvm; the transport forwards it).
            4 => t.kick(input.u32() % 3),
            // A frame from the host side of the TAP.
            _ => {
                let n = usize::from(input.u8()) * 4;
                let frame = input.bytes(n).to_vec();
                if let Some(h) = host_end.as_mut() {
                    let _ = h.write(&frame);
                }
                // console: keys for the guest, and the host reads its output now and then.
                if let Some((host, keys)) = console.as_mut() {
                    keys.enqueue(&frame);
                    if frame.first().is_some_and(|b| b & 1 == 0) {
                        let _ = host.read(&mut [0u8; 4096]);
                    }
                }
                // vsock: a new host client (up to 8) or more bytes from the last one.
                if let Some(dir) = &vsock_dir {
                    if clients.len() < 8 && frame.first().is_some_and(|b| b & 1 == 0) {
                        if let Ok(c) = UnixStream::connect(dir.join("v.sock")) {
                            let _ = c.set_nonblocking(true);
                            clients.push(c);
                        }
                    }
                    if let Some(c) = clients.last_mut() {
                        let _ = c.write(&frame);
                    }
                }
            }
        }
    }
    // The driver resets the device: its workers stop (a spinning one would hang here).
    t.reset();
    // Dropping the device hangs up on the back end, which then ends.
    drop(t);
    drop(clients);
    drop(port5);
    if let Some(b) = backend {
        b.join().unwrap();
    }
    if let Some(dir) = vsock_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
});

fn memory_of(mem: &Memory) -> nixvm_devices::virtio::GuestMemoryMmap {
    use vm_memory::GuestAddressSpace;
    (*mem.memory()).clone()
}
