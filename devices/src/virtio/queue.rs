//! The one way nixvm takes chains off a virtqueue: every device, the blk pool and the storefs
//! back end use [`for_each_chain`] (or [`pop`] where a consumer takes chains one at a time,
//! as virtio-net's receive path does).
//!
//! A queue in a state no correct driver produces (its available index more than the queue
//! size ahead, an available ring that cannot be read, a queue served before it was made
//! ready) ends the loop with a [`QueueError`] instead of spinning: the caller stops serving
//! that queue and asks the driver for a reset ([`super::Interrupt::needs_reset`]).
use std::ops::{ControlFlow, Deref};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue's rings are inconsistent")]
    Ring(#[from] virtio_queue::Error),
    #[error("the available index moved but no descriptor chain could be read")]
    Stuck,
}

/// Takes the next available chain, if there is one. An error means the queue is broken.
pub fn pop<M>(queue: &mut Queue, mem: M) -> Result<Option<DescriptorChain<M>>, QueueError>
where
    M: Clone + Deref,
    M::Target: GuestMemory + Sized,
{
    Ok(queue.iter(mem)?.next())
}

/// Hands every available chain to `f` (with the queue, so that it can complete the chain),
/// keeping notifications off while there is work, as the spec describes for EVENT_IDX: the
/// loop ends when the driver has nothing more and notifications are on again. `f` may stop
/// the loop early (`Break`: it can take no more now); notifications then stay off, and the
/// caller must come back by itself. Returns whether any chain was taken. A queue that was
/// never made ready has nothing to serve.
pub fn for_each_chain<M, F>(queue: &mut Queue, mem: M, mut f: F) -> Result<bool, QueueError>
where
    M: Clone + Deref,
    M::Target: GuestMemory + Sized,
    F: FnMut(&mut Queue, DescriptorChain<M>) -> ControlFlow<()>,
{
    if !queue.ready() {
        return Ok(false);
    }
    let mut took_any = false;
    // The driver published more after the last pass: this pass must find it.
    let mut more = false;
    loop {
        queue.disable_notification(&*mem)?;
        let mut took = false;
        while let Some(chain) = pop(queue, mem.clone())? {
            took = true;
            if f(queue, chain).is_break() {
                return Ok(true);
            }
        }
        if more && !took {
            return Err(QueueError::Stuck);
        }
        took_any |= took;
        if !queue.enable_notification(&*mem)? {
            return Ok(took_any);
        }
        more = true;
    }
}

/// Completes the chains `used` (head, bytes written) together: their used elements are
/// written first, then the used index moves past all of them in one store, so the driver
/// never sees part of them (a frame spread over several receive buffers must arrive whole:
/// Linux drops a mergeable frame whose buffers are not all in the used ring yet). The queue's
/// own [`QueueT::needs_notification`] does not count these: ask [`needs_notification_since`].
pub fn add_used_together<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    used: &[(u16, u32)],
) -> Result<(), QueueError> {
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};
    let (ring, size) = (queue.used_ring(), queue.size());
    let mut next = queue.next_used();
    for &(head, len) in used {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex.into());
        }
        // The used ring: flags and index (2 bytes each), then 8-byte elements.
        let slot = ring + 4 + u64::from(next % size) * 8;
        // An element: the chain's head and the bytes written, little-endian.
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(slot))
            .map_err(virtio_queue::Error::GuestMemory)?;
        next = next.wrapping_add(1);
    }
    mem.store(next.to_le(), GuestAddress(ring + 2), Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)?;
    queue.set_next_used(next);
    Ok(())
}

/// Whether the driver wants an interrupt for what was completed since the used index was
/// `old` (EVENT_IDX: its used_event lies in between; without it, always, as
/// [`QueueT::needs_notification`] answers). Unreadable rings say yes.
pub fn needs_notification_since<M: GuestMemory>(queue: &Queue, mem: &M, old: u16) -> bool {
    use std::sync::atomic::{Ordering, fence};
    use vm_memory::{Bytes, GuestAddress};
    if !queue.event_idx_enabled() {
        return true;
    }
    let new = queue.next_used();
    // Every used element and the index are written before used_event is read.
    fence(Ordering::SeqCst);
    // used_event follows the available ring's flags, index and `size` entries.
    let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
    match mem.load::<u16>(GuestAddress(at), Ordering::Acquire) {
        Ok(event) => {
            let event = u16::from_le(event);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::memory;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn queue_with(
        mem: &crate::virtio::GuestMemoryMmap,
        chains: u16,
    ) -> (MockSplitQueue<'_, crate::virtio::GuestMemoryMmap>, Queue) {
        let mock = MockSplitQueue::new(mem, 16);
        let descs: Vec<RawDescriptor> = (0..chains)
            .map(|i| {
                RawDescriptor::from(Descriptor::new(0x10_000 + u64::from(i) * 0x100, 16, 0, 0))
            })
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        (mock, q)
    }

    #[test]
    fn chains_completed_together_appear_at_once() {
        use std::sync::atomic::Ordering;
        let mem = memory(1 << 20);
        let (_mock, mut q) = queue_with(&mem, 3);
        let used_idx = |q: &Queue| {
            mem.load::<u16>(GuestAddress(q.used_ring() + 2), Ordering::Acquire)
                .unwrap()
        };
        add_used_together(&mut q, &mem, &[(0, 10), (1, 20), (2, 0)]).unwrap();
        assert_eq!((used_idx(&q), q.next_used()), (3, 3));
        let elem = |i: u64| {
            let at = GuestAddress(q.used_ring() + 4 + i * 8);
            (
                mem.read_obj::<u32>(at).unwrap(),
                mem.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
            )
        };
        assert_eq!([elem(0), elem(1), elem(2)], [(0, 10), (1, 20), (2, 0)]);
        // A head beyond the ring completes nothing.
        assert!(add_used_together(&mut q, &mem, &[(16, 0)]).is_err());
        assert_eq!((used_idx(&q), q.next_used()), (3, 3));
        // EVENT_IDX: an interrupt only when used_event was passed since `old`.
        q.set_event_idx(true);
        let used_event = GuestAddress(q.avail_ring() + 4 + 2 * u64::from(q.size()));
        mem.write_obj(1u16, used_event).unwrap();
        assert!(needs_notification_since(&q, &mem, 0));
        assert!(!needs_notification_since(&q, &mem, 2));
        mem.write_obj(5u16, used_event).unwrap();
        assert!(!needs_notification_since(&q, &mem, 0));
        q.set_event_idx(false);
        assert!(needs_notification_since(&q, &mem, 3));
    }

    #[test]
    fn serves_every_chain_once() {
        let mem = memory(1 << 20);
        let (_mock, mut q) = queue_with(&mem, 3);
        let mut heads = Vec::new();
        let took = for_each_chain(&mut q, &mem, |q, c| {
            heads.push(c.head_index());
            q.add_used(&mem, c.head_index(), 0).unwrap();
            ControlFlow::Continue(())
        })
        .unwrap();
        assert!(took);
        assert_eq!(heads, [0, 1, 2]);
        assert!(!for_each_chain(&mut q, &mem, |_, _| panic!("nothing left")).unwrap());
        // A consumer that can take one chain now gets one; the rest wait in the ring.
        let (_mock, mut q) = queue_with(&mem, 3);
        let mut n = 0;
        for_each_chain(&mut q, &mem, |_, _| {
            n += 1;
            ControlFlow::Break(())
        })
        .unwrap();
        assert_eq!((n, q.next_avail()), (1, 1));
    }

    #[test]
    fn an_index_too_far_ahead_is_an_error_not_a_spin() {
        let mem = memory(1 << 20);
        let (mock, mut q) = queue_with(&mem, 1);
        // The driver claims 17 chains on a 16-entry ring.
        mem.write_obj(17u16, mock.avail_addr().unchecked_add(2))
            .unwrap();
        let r = for_each_chain(&mut q, &mem, |_, _| ControlFlow::Continue(()));
        assert!(matches!(r, Err(QueueError::Ring(_))), "{r:?}");
    }

    #[test]
    fn an_unready_queue_has_nothing_to_serve() {
        let mem = memory(1 << 20);
        let (_mock, mut q) = queue_with(&mem, 2);
        q.set_ready(false);
        assert!(!for_each_chain(&mut q, &mem, |_, _| panic!("not ready")).unwrap());
        // Even with an available ring at 0 whose index is not zero.
        let mut fresh = Queue::new(16).unwrap();
        mem.write_obj(5u16, GuestAddress(2)).unwrap();
        assert!(!for_each_chain(&mut fresh, &mem, |_, _| ControlFlow::Continue(())).unwrap());
    }

    #[test]
    fn an_unreadable_available_ring_is_an_error() {
        let mem = memory(1 << 20);
        let (_mock, mut q) = queue_with(&mem, 1);
        // The available ring's entries lie beyond guest memory; its index does not.
        let near_end = (1u64 << 20) - 4;
        mem.write_obj(1u16, GuestAddress(near_end + 2)).unwrap();
        q.set_avail_ring_address(Some(near_end as u32), Some(0));
        let r = for_each_chain(&mut q, &mem, |_, _| ControlFlow::Continue(()));
        assert!(matches!(r, Err(QueueError::Stuck)), "{r:?}");
    }
}
