//! A descriptor chain's guest buffers: split into what the device reads and what it writes
//! ([`ChainBuffers`]), cut at a byte offset ([`split`]), copied out of and into guest memory
//! ([`gather`], [`scatter`]), or handed to the kernel as iovecs ([`GuestIovecs`]) so that
//! file data moves between a file and guest memory in one preadv/pwritev (virtio-blk, the
//! storefs READ) or a TAP gets a frame in one writev. Every device that needs raw segments
//! uses these; one that only reads and writes bytes in order uses virtio-queue's
//! `Reader`/`Writer`.
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// A guest buffer: address and length.
pub type Segment = (GuestAddress, usize);

/// The most iovecs one readv/preadv/pwritev takes (Linux's UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// A chain's buffers in chain order: those the device reads (a request's header and data)
/// and those it writes (a reply). The chain's own iterator stops after the queue size's
/// worth of descriptors, so these stay bounded.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    /// A readable buffer came after a writable one, which the spec forbids.
    pub misordered: bool,
}

impl ChainBuffers {
    pub fn of<M>(chain: DescriptorChain<M>) -> ChainBuffers
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory + Sized,
    {
        let mut b = ChainBuffers::default();
        for d in chain {
            let seg = (d.addr(), d.len() as usize);
            if d.is_write_only() {
                b.writable.push(seg);
            } else {
                b.misordered |= !b.writable.is_empty();
                b.readable.push(seg);
            }
        }
        b
    }
}

/// The bytes the segments hold together.
pub fn total(segs: &[Segment]) -> usize {
    segs.iter().map(|s| s.1).sum()
}

/// The first `n` bytes of `segs` and the rest; None if `segs` are shorter.
pub fn split(segs: &[Segment], n: usize) -> Option<(Vec<Segment>, Vec<Segment>)> {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = n;
    for &(addr, len) in segs {
        let take = len.min(left);
        if take > 0 {
            head.push((addr, take));
        }
        if len > take {
            tail.push((addr.checked_add(take as u64)?, len - take));
        }
        left -= take;
    }
    (left == 0).then_some((head, tail))
}

/// Copies guest buffers into `out` (as far as `out` reaches); false if one is outside guest
/// memory or they hold less than `out`.
pub fn gather<B: Bitmap>(mem: &GuestMemoryMmap<B>, segs: &[Segment], out: &mut [u8]) -> bool {
    let mut done = 0;
    for &(addr, len) in segs {
        let n = len.min(out.len() - done);
        if n > 0 && mem.read_slice(&mut out[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// Copies `data` into guest buffers (as far as it reaches); false if one is outside guest
/// memory or they hold less than `data`.
pub fn scatter<B: Bitmap>(mem: &GuestMemoryMmap<B>, segs: &[Segment], data: &[u8]) -> bool {
    let mut done = 0;
    for &(addr, len) in segs {
        let n = len.min(data.len() - done);
        if n > 0 && mem.write_slice(&data[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

/// Guest buffers as iovecs for preadv/pwritev, valid while the guest memory they were taken
/// from is borrowed.
pub struct GuestIovecs<'a> {
    iovs: Vec<libc::iovec>,
    _mem: std::marker::PhantomData<&'a ()>,
}

impl<'a> GuestIovecs<'a> {
    /// The buffers `segs` (address, length) of `mem`; an error if one is not all inside it.
    pub fn new<B: Bitmap>(
        mem: &'a GuestMemoryMmap<B>,
        segs: &[(GuestAddress, usize)],
    ) -> io::Result<Self> {
        let mut iovs = Vec::with_capacity(segs.len());
        for &(addr, len) in segs {
            let slice = mem.get_slice(addr, len).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("guest buffer: {e}"))
            })?;
            // The device may write there: tell the dirty bitmap.
            slice.bitmap().mark_dirty(0, len);
            iovs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len,
            });
        }
        Ok(GuestIovecs {
            iovs,
            _mem: std::marker::PhantomData,
        })
    }

    /// The iovecs themselves, for a submission that outlives this borrow (io_uring): whoever
    /// hands them to the kernel keeps the guest memory they point into mapped until it is
    /// done with them.
    pub fn into_raw(self) -> Vec<libc::iovec> {
        self.iovs
    }

    /// writev to `fd` (a TAP: one frame); returns the bytes written.
    pub fn writev(&self, fd: RawFd) -> io::Result<usize> {
        let count = libc::c_int::try_from(self.iovs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec points into guest memory that `'a` keeps mapped, with the
        // length get_slice checked; writev only reads those bytes.
        let n = unsafe { libc::writev(fd, self.iovs.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// readv from `fd` (a TAP: one frame) into the buffers and then one spare byte of
    /// nixvm's, so that a frame longer than the buffers shows as a length beyond them
    /// whether the kernel returns the frame's length or only what it wrote. Returns that
    /// length. At most IOV_MAX - 1 buffers are filled.
    pub fn readv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut spare = 0u8;
        self.iovs.truncate(IOV_MAX - 1);
        self.iovs.push(libc::iovec {
            iov_base: (&raw mut spare).cast(),
            iov_len: 1,
        });
        let count = libc::c_int::try_from(self.iovs.len()).expect("IOV_MAX");
        // SAFETY: every iovec points into guest memory that `'a` keeps mapped, with the
        // length get_slice checked (and marked dirty), or at `spare`, which outlives the
        // call; readv writes only those bytes.
        let n = unsafe { libc::readv(fd, self.iovs.as_ptr(), count) };
        self.iovs.pop();
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// One datagram from the socket `fd` into the buffers; returns its whole length, more
    /// than they hold if it was cut short (MSG_TRUNC).
    pub fn recv_datagram(&self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.iovs.as_ptr().cast_mut();
        msg.msg_iovlen = self.iovs.len().min(IOV_MAX);
        // SAFETY: the iovecs point into guest memory that `'a` keeps mapped, with the
        // length get_slice checked; recvmsg writes only those bytes and reads `msg`.
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_TRUNC) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// preadv or pwritev at `offset` until every byte has moved (the end of the file first
    /// is an UnexpectedEof error).
    pub fn transfer_all(&mut self, file: &File, offset: u64, write: bool) -> io::Result<()> {
        let want: usize = self.iovs.iter().map(|i| i.iov_len).sum();
        if self.transfer(file, offset, write)? < want {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// preadv or pwritev at `offset` until every byte has moved or the file ends; returns
    /// how many bytes moved.
    pub fn transfer(&mut self, file: &File, mut offset: u64, write: bool) -> io::Result<usize> {
        let mut iovs = &mut self.iovs[..];
        let mut moved = 0;
        while iovs.first().is_some_and(|i| i.iov_len == 0) {
            iovs = &mut iovs[1..];
        }
        while !iovs.is_empty() {
            let count = libc::c_int::try_from(iovs.len().min(IOV_MAX)).expect("IOV_MAX");
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: every iovec points into guest memory that `'a` keeps mapped, with the
            // length get_slice checked; the kernel reads or writes only those bytes.
            let n = unsafe {
                if write {
                    libc::pwritev(file.as_raw_fd(), iovs.as_ptr(), count, off)
                } else {
                    libc::preadv(file.as_raw_fd(), iovs.as_ptr(), count, off)
                }
            };
            let mut n = match usize::try_from(n) {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            offset += n as u64;
            moved += n;
            while n > 0 {
                let first = &mut iovs[0];
                if n >= first.iov_len {
                    n -= first.iov_len;
                    iovs = &mut iovs[1..];
                } else {
                    // SAFETY: n < iov_len, so the new base stays inside the same buffer.
                    first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n).cast() };
                    first.iov_len -= n;
                    n = 0;
                }
            }
            while iovs.first().is_some_and(|i| i.iov_len == 0) {
                iovs = &mut iovs[1..];
            }
        }
        Ok(moved)
    }
}
