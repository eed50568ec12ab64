//! Guest buffers as iovecs, so that file data moves between a file and guest memory in one
//! preadv/pwritev (virtio-blk; nixvm storefs's READ).
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
            let count = libc::c_int::try_from(iovs.len().min(1024)).expect("at most IOV_MAX");
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
