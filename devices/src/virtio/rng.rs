//! virtio-rng: entropy from the host's getrandom(2).
use std::io::Write;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::worker::Worker;
use super::{
    ActivateError, F_EVENT_IDX, GuestMemoryMmap, Interrupt, Memory, VIRTIO_ID_RNG, VirtioDevice,
};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request.
const MAX_CHUNK: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
}

/// Fills every writable buffer of one request; returns the bytes written.
pub fn fill_request(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else {
        crate::guest_warn!("virtio-rng: request outside guest memory dropped");
        return 0;
    };
    let mut buf = vec![0u8; writer.available_bytes().min(MAX_CHUNK)];
    let filled = host_random(&mut buf);
    match writer.write_all(&buf[..filled]) {
        Ok(()) => u32::try_from(filled).unwrap_or(0),
        Err(e) => {
            crate::guest_warn!("virtio-rng: {e}");
            0
        }
    }
}

/// The kernel's CRNG output, without ever blocking: a host whose CRNG is not initialized
/// yet (a young VM, no hardware entropy) would otherwise stall the device, and the VM's
/// teardown with it. GRND_INSECURE (Linux 5.6+) is the same generator, not waiting for it.
fn host_random(buf: &mut [u8]) -> usize {
    const GRND_INSECURE: libc::c_uint = 0x0004;
    let mut filled = 0;
    let mut flags = libc::GRND_NONBLOCK;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most the remaining length into our buffer.
        let n = unsafe {
            libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, flags)
        };
        match usize::try_from(n) {
            Ok(n) if n > 0 => filled += n,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
                && flags != GRND_INSECURE =>
            {
                flags = GRND_INSECURE;
            }
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    filled
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        F_EVENT_IDX
    }
    fn activate(
        &mut self,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let worker = super::serve_single_queue("virtio-rng", mem, irq, queues, move |chain, m| {
            fill_request(chain, m)
        })?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.worker.take();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{CountingIrq, memory};
    use virtio_queue::QueueOwnedT;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE

    #[test]
    fn fills_the_buffer_and_interrupts() {
        let mem = memory(1 << 20);
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x8000, 512, WRITE, 0))],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let irq = CountingIrq::default();
        super::super::process_queue(&mut q, &mem, &irq, |c| fill_request(c, &mem));
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert!(got.iter().any(|&b| b != 0), "random bytes arrived");
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 512);
        assert_eq!(irq.0.lock().unwrap().len(), 1);
        assert!(q.iter(&mem).unwrap().next().is_none());
    }

    #[test]
    fn read_only_or_bad_buffers_get_nothing() {
        let mem = memory(1 << 20);
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x8000, 64, 0, 0))], 0)
            .unwrap();
        vq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                0xffff_0000,
                64,
                WRITE,
                0,
            ))],
            1,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        super::super::process_queue(&mut q, &mem, &CountingIrq::default(), |c| {
            fill_request(c, &mem)
        });
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 0);
    }
}
