//! A guest driving a virtio-mmio device as it likes: register writes and reads, guest memory
//! contents (descriptor tables, rings, request headers) and queue kicks, in any order, on
//! virtio-rng, virtio-blk (a scratch image) and virtio-net (a socketpair as the TAP, with
//! frames arriving from the "host"). nixvm must not panic, hang or allocate without bound;
//! the devices' worker threads are stopped (joined) at the end of every input, so a worker
//! spinning on a bad queue shows as a timeout.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nixvm_devices::bus::BusDevice;
use nixvm_devices::virtio::block::{Block, Disk, DiskOptions};
use nixvm_devices::virtio::mmio::MmioTransport;
use nixvm_devices::virtio::net::{Net, Tap};
use nixvm_devices::virtio::rng::Rng;
use nixvm_devices::virtio::{Memory, VirtioDevice, test_utils::memory};
use vm_memory::{Bytes, GuestAddress};
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

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = Memory::new(memory(MEM));
    let mut host_end = None;
    let device: Box<dyn VirtioDevice> = match input.u8() % 3 {
        0 => Box::new(Rng::default()),
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
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(device, mem.clone(), irq).unwrap();
    let m = memory_of(&mem);
    for _ in 0..256 {
        if input.0.is_empty() {
            break;
        }
        match input.u8() % 6 {
            // A register write: offset in the window (registers and config space).
            0 | 1 => {
                let off = u64::from(input.u32() % 0x200);
                let v = input.u32();
                t.write(off, &v.to_le_bytes());
            }
            2 => {
                let off = u64::from(input.u32() % 0x200);
                let mut b = [0u8; 4];
                t.read(off, &mut b);
            }
            // Guest memory: up to 64 bytes anywhere.
            3 => {
                let at = u64::from(input.u32()) % MEM as u64;
                let n = usize::from(input.u8() % 64);
                let bytes = input.bytes(n).to_vec();
                let _ = m.write_slice(&bytes, GuestAddress(at));
            }
            // A kick (QueueNotify is an ioeventfd in nixvm; the transport forwards it).
            4 => {
                let q = input.u32() % 3;
                t.write(0x50, &q.to_le_bytes());
                t.settle();
            }
            // A frame from the host side of the TAP.
            _ => {
                let n = usize::from(input.u8()) * 4;
                let frame = input.bytes(n).to_vec();
                if let Some(h) = host_end.as_mut() {
                    let _ = h.write(&frame);
                }
            }
        }
    }
    // The driver resets the device: its workers stop (a spinning one would hang here).
    t.write(0x70, &0u32.to_le_bytes());
});

fn memory_of(mem: &Memory) -> nixvm_devices::virtio::GuestMemoryMmap {
    use vm_memory::GuestAddressSpace;
    (*mem.memory()).clone()
}
