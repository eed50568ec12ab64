//! virtio-blk on a raw image file or block device.
//!
//! Requests never run on a vCPU: the device's worker thread takes them off the queue and
//! submits the reads and writes to an io_uring ([`uring`]), several in flight at once, each
//! moving data straight between the file and guest memory; where io_uring cannot be set up,
//! a pool of IO_THREADS threads serves them with preadv/pwritev. Every malformed
//! request completes with VIRTIO_BLK_S_IOERR or UNSUPP, or (when it has no room for a
//! status byte) is dropped with a warning.
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Queue};
use vmm_sys_util::eventfd::EventFd;

use super::buffers::{ChainBuffers, GuestIovecs, Segment, gather, scatter, split, total};
use super::{
    ActivateError, F_EVENT_IDX, GuestMemoryMmap, Interrupt, Memory, QueuePool, VIRTIO_ID_BLOCK,
    VirtioDevice, read_config_bytes,
};

pub const SECTOR_SIZE: u64 = 512;
/// The longest disk serial: the device's id field.
pub const SERIAL_MAX: usize = VIRTIO_BLK_ID_BYTES as usize;
const QUEUE_SIZE: u16 = 256;
/// Largest data segment and number of segments the guest may put in one request.
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest request we serve: SEG_MAX segments of SIZE_MAX bytes is far more than Linux sends.
const MAX_REQUEST: usize = 32 << 20;
const MAX_DISCARD_SECTORS: u32 = u32::MAX;
const MAX_DISCARD_SEG: u32 = 32;
/// Requests in flight per disk: each runs on its own thread, so a slow read does not hold
/// up the others, and the host's storage sees a queue deeper than one.
const IO_THREADS: usize = 8;
/// O_DIRECT buffers are aligned to this.
const DIRECT_ALIGN: usize = 4096;

// The status values are small numbers in the spec; the bindings type them u32.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const _: () = assert!(S_OK as u32 == VIRTIO_BLK_S_OK && S_IOERR as u32 == VIRTIO_BLK_S_IOERR);
const _: () = assert!(S_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    Size { path: PathBuf, size: u64 },
    #[error("disk image {path} is in use by another process (it holds the image's lock)")]
    Locked { path: PathBuf },
}

/// What `--disk` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    pub path: PathBuf,
    pub readonly: bool,
    pub serial: Option<String>,
    pub direct: bool,
}

/// Opens a disk image with the access `opts` asks for; returns it with its size, which must be
/// whole sectors. Takes no lock: `--dry-run` checks images a running VM may hold.
pub fn open_image(opts: &DiskOptions) -> Result<(File, u64), Error> {
    let path = &opts.path;
    let open_err = |source| Error::Open {
        path: path.clone(),
        source,
    };
    let mut o = OpenOptions::new();
    o.read(true).write(!opts.readonly);
    if opts.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let mut file = o.open(path).map_err(open_err)?;
    // Block devices report their size through seeking to the end.
    let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
    if size % SECTOR_SIZE != 0 {
        return Err(Error::Size {
            path: path.clone(),
            size,
        });
    }
    Ok((file, size))
}

// QEMU's image locks (block/file-posix.c): open file description locks on single bytes,
// permission n held at byte 100 + n and "nobody else may have permission n" at 200 + n.
const QEMU_PERM_BASE: i64 = 100;
const QEMU_SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;

/// Locks an image as QEMU does, so that nixvm and QEMU exclude each other: a writable image
/// is locked whole, exclusively (no reader or writer, nixvm or QEMU, can take a lock on it);
/// a read-only one takes QEMU's "reads consistently" and "shares no writes" bytes, shared
/// (other readers may come; a writer, which needs them, may not), and refuses an image
/// someone holds the write permission of. Open file description locks: they belong to this
/// open file, not to the process, and go with it.
fn lock_image(file: &File, readonly: bool) -> io::Result<()> {
    if !readonly {
        return ofd_lock(file, libc::F_OFD_SETLK, libc::F_WRLCK, 0, 0).map(drop);
    }
    if ofd_lock(
        file,
        libc::F_OFD_GETLK,
        libc::F_WRLCK,
        QEMU_PERM_BASE + PERM_WRITE,
        1,
    )? {
        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
    }
    for byte in [
        QEMU_PERM_BASE + PERM_CONSISTENT_READ,
        QEMU_SHARED_BASE + PERM_WRITE,
    ] {
        ofd_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte, 1)?;
    }
    Ok(())
}

/// One fcntl lock call on `len` bytes at `start` (0: to the end). For F_OFD_GETLK, whether
/// another lock conflicts.
fn ofd_lock(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_int,
    start: i64,
    len: i64,
) -> io::Result<bool> {
    let short = |v: libc::c_int| {
        libc::c_short::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let mut fl = libc::flock {
        l_type: short(kind)?,
        l_whence: short(libc::SEEK_SET)?,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    // SAFETY: fcntl with a lock command reads (and for GETLK writes) the flock struct we pass,
    // on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cmd == libc::F_OFD_GETLK && libc::c_int::from(fl.l_type) != libc::F_UNLCK)
}

/// A read or write: the guest buffers, the byte offset on the disk, the direction.
struct Transfer {
    segs: Vec<Segment>,
    offset: u64,
    write: bool,
}

/// What a request asks for once taken apart: a transfer still to run, or its result (the
/// status and the bytes of data written into the chain).
enum Request {
    Transfer(Transfer),
    Done(u8, usize),
}

/// A request's chain taken apart: where its status byte goes, and what it asks for.
struct Parsed {
    status_at: Vec<Segment>,
    request: Request,
}

/// Writes a request's status byte; returns the bytes written into its chain (data +
/// status), or 0 if the status byte is outside guest memory (the request is dropped).
fn finish(mem: &GuestMemoryMmap, status_at: &[Segment], status: u8, written: usize) -> u32 {
    if !scatter(mem, status_at, &[status]) {
        crate::guest_warn!("virtio-blk: request whose status byte is outside guest memory dropped");
        return 0;
    }
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// An open, locked disk image.
pub struct Disk {
    file: File,
    readonly: bool,
    direct: bool,
    sectors: u64,
    id: [u8; SERIAL_MAX],
}

impl Disk {
    /// Opens and locks the image (see [`lock_image`]): exclusively when writable, shared
    /// with other readers when read-only, so a second VM, nixvm's or QEMU's, cannot write
    /// under a first one.
    pub fn open(opts: &DiskOptions) -> Result<Disk, Error> {
        let (file, size) = open_image(opts)?;
        lock_image(&file, opts.readonly).map_err(|e| {
            let path = opts.path.clone();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EACCES) => Error::Locked { path },
                _ => Error::Open { path, source: e },
            }
        })?;
        let mut id = [0u8; SERIAL_MAX];
        if let Some(s) = &opts.serial {
            let n = s.len().min(id.len());
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        Ok(Disk {
            file,
            readonly: opts.readonly,
            direct: opts.direct,
            sectors: size / SECTOR_SIZE,
            id,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The byte range of `len` bytes at `sector`, if it lies on the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let end = sector.checked_add(len.div_ceil(SECTOR_SIZE))?;
        (end <= self.sectors && len % SECTOR_SIZE == 0).then(|| sector * SECTOR_SIZE)
    }

    fn buffer(&self, len: usize) -> AlignedBuf {
        AlignedBuf::new(len, if self.direct { DIRECT_ALIGN } else { 1 })
    }

    /// Serves one request; returns the bytes written into the chain (data + status).
    pub fn handle<M>(&self, chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> u32
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let Some(parsed) = self.parse(chain, mem) else {
            return 0;
        };
        let (status, written) = match parsed.request {
            Request::Transfer(t) => self.run(mem, &t),
            Request::Done(status, written) => (status, written),
        };
        finish(mem, &parsed.status_at, status, written)
    }

    /// Takes a chain apart and serves it, all but a read or write, which it returns for the
    /// caller to run (in place or on io_uring). None if the chain has no room for a status
    /// byte: it is dropped with a warning.
    fn parse<M>(&self, chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Option<Parsed>
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let bufs = ChainBuffers::of(chain);
        let Some(data_len) = total(&bufs.writable).checked_sub(1) else {
            crate::guest_warn!("virtio-blk: request without a status byte dropped");
            return None;
        };
        let (data_w, status_at) = split(&bufs.writable, data_len).expect("data_len < total");
        let request = if bufs.misordered {
            crate::guest_warn!("virtio-blk: request with readable buffers after writable ones");
            Request::Done(S_IOERR, 0)
        } else {
            self.request(mem, &bufs.readable, data_w)
        };
        Some(Parsed { status_at, request })
    }

    /// Runs the request whose header and data for the device are in `readable`, and whose
    /// data for the driver goes to `data_w`, all but a read or write, which it returns.
    fn request(
        &self,
        mem: &GuestMemoryMmap,
        readable: &[Segment],
        data_w: Vec<Segment>,
    ) -> Request {
        let mut header = [0u8; 16];
        let Some((h, data_r)) = split(readable, header.len()) else {
            return Request::Done(S_IOERR, 0);
        };
        if !gather(mem, &h, &mut header) {
            return Request::Done(S_IOERR, 0);
        }
        let ty = u32::from_le_bytes(header[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        let (status, written) = match ty {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = ty == VIRTIO_BLK_T_OUT;
                let segs = if write { data_r } else { data_w };
                let len = total(&segs);
                if (write && self.readonly) || len == 0 || len > MAX_REQUEST {
                    return Request::Done(S_IOERR, 0);
                }
                let Some(offset) = self.range(sector, len as u64) else {
                    log::debug!("virtio-blk: {len} bytes at sector {sector} are off the disk");
                    return Request::Done(S_IOERR, 0);
                };
                return Request::Transfer(Transfer {
                    segs,
                    offset,
                    write,
                });
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.readonly {
                    return Request::Done(S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        crate::guest_warn!("virtio-blk: flush: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = total(&data_w).min(self.id.len());
                let (to, _) = split(&data_w, n).expect("n <= total");
                if scatter(mem, &to, &self.id[..n]) {
                    (S_OK, n)
                } else {
                    (S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if !self.readonly => {
                // The guest's length is checked before anything is allocated for it.
                let len = total(&data_r);
                if len > MAX_DISCARD_SEG as usize * 16 {
                    return Request::Done(S_IOERR, 0);
                }
                let mut segments = vec![0u8; len];
                if !gather(mem, &data_r, &mut segments) {
                    return Request::Done(S_IOERR, 0);
                }
                let zero = ty == VIRTIO_BLK_T_WRITE_ZEROES;
                (self.discard_or_zero(zero, &mut segments.as_slice()), 0)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (S_IOERR, 0),
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                (S_UNSUPP, 0)
            }
        };
        Request::Done(status, written)
    }

    /// Runs a read or write in place: its status and the bytes of data written.
    fn run(&self, mem: &GuestMemoryMmap, t: &Transfer) -> (u8, usize) {
        let len = total(&t.segs);
        match self.transfer(mem, &t.segs, t.offset, t.write) {
            Ok(()) => (S_OK, if t.write { 0 } else { len }),
            Err(e) => {
                crate::guest_warn!("virtio-blk: {len} bytes at {}: {e}", t.offset);
                (S_IOERR, 0)
            }
        }
    }

    /// Whether a transfer can go straight between the file and guest memory: always, but
    /// with O_DIRECT only for buffers whole sectors long at sector-aligned addresses.
    fn direct_ok(&self, segs: &[Segment]) -> bool {
        let aligned = |(a, l): &Segment| a.0 % SECTOR_SIZE == 0 && *l as u64 % SECTOR_SIZE == 0;
        !self.direct || segs.iter().all(aligned)
    }

    /// Reads the disk at `offset` into the guest buffers `segs`, or writes them there.
    /// Straight between the file and guest memory (preadv/pwritev) where O_DIRECT allows it,
    /// else through an aligned bounce buffer.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        segs: &[Segment],
        offset: u64,
        write: bool,
    ) -> io::Result<()> {
        if self.direct_ok(segs) {
            let mut iovs = GuestIovecs::new(mem, segs)?;
            match iovs.transfer_all(&self.file, offset, write) {
                // The device wants more alignment than a sector: bounce.
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {}
                r => return r,
            }
        }
        let mut buf = self.buffer(total(segs));
        let outside = || io::Error::new(io::ErrorKind::InvalidInput, "buffer outside guest memory");
        if write {
            if !gather(mem, segs, buf.as_mut()) {
                return Err(outside());
            }
            self.file.write_all_at(buf.as_mut(), offset)
        } else {
            self.file.read_exact_at(buf.as_mut(), offset)?;
            if scatter(mem, segs, buf.as_mut()) {
                Ok(())
            } else {
                Err(outside())
            }
        }
    }

    /// DISCARD / WRITE_ZEROES: segments of {sector: u64, num_sectors: u32, flags: u32}.
    fn discard_or_zero(&self, zero: bool, reader: &mut impl Read) -> u8 {
        let mut segments = 0;
        let mut seg = [0u8; 16];
        while reader.read_exact(&mut seg).is_ok() {
            segments += 1;
            if segments > MAX_DISCARD_SEG {
                return S_IOERR;
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8"));
            let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().expect("4")));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4"));
            let len = count * SECTOR_SIZE;
            // Only WRITE_ZEROES knows a flag (unmap); anything else is malformed.
            if flags & !u32::from(zero) != 0 {
                return S_UNSUPP;
            }
            let Some(offset) = self.range(sector, len) else {
                return S_IOERR;
            };
            if !self.punch(offset, len, zero) {
                return S_IOERR;
            }
        }
        if segments == 0 { S_IOERR } else { S_OK }
    }

    /// Frees (discard) or zeroes a range. A discard the file system cannot do is a no-op;
    /// zeroes fall back to writing them.
    fn punch(&self, offset: u64, len: u64, zero: bool) -> bool {
        let fd = self.file.as_raw_fd();
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return false;
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on our own descriptor, range checked against the disk.
        if unsafe { libc::fallocate(fd, mode, off, l) } == 0 {
            return true;
        }
        if !zero {
            return true;
        }
        // SAFETY: as above.
        if unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        } == 0
        {
            return true;
        }
        const CHUNK: u64 = 1 << 20;
        let mut zeros = self.buffer(usize::try_from(len.min(CHUNK)).expect("at most 1 MiB"));
        let mut done = 0;
        while done < len {
            let n = usize::try_from((len - done).min(CHUNK)).expect("at most 1 MiB");
            if self
                .file
                .write_all_at(&zeros.as_mut()[..n], offset + done)
                .is_err()
            {
                return false;
            }
            done += n as u64;
        }
        true
    }
}

/// A byte buffer aligned for O_DIRECT (the bounce buffer between guest memory and the file).
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live, initialized allocation of layout.size() bytes that we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// What serves an activated disk's queue (until dropped).
enum Serving {
    Ring { _worker: super::worker::Worker },
    Pool { _pool: QueuePool },
}

/// The virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    config: [u8; 60],
    serving: Option<Serving>,
    /// Whether to try io_uring (tests turn it off to exercise the pool).
    ring: bool,
}

impl Block {
    pub fn new(disk: Disk) -> Self {
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&disk.sectors.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size: SECTOR_SIZE
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard alignment: a sector
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        config[56] = 1; // write zeroes may unmap
        Block {
            disk: Arc::new(disk),
            config,
            serving: None,
            ring: true,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        let mut f = F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.disk.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let disk = self.disk.clone();
        let ring = if self.ring {
            uring::Ring::new()
                .inspect_err(|e| {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(|| {
                        log::info!(
                            "virtio-blk: no io_uring ({e}): requests run on {IO_THREADS} threads"
                        );
                    });
                })
                .ok()
        } else {
            None
        };
        self.serving = Some(match ring {
            Some(ring) => Serving::Ring {
                _worker: uring::spawn(disk, ring, mem, irq, queues)?,
            },
            None => Serving::Pool {
                _pool: QueuePool::spawn(
                    "virtio-blk",
                    IO_THREADS,
                    mem,
                    irq,
                    queues,
                    move |c, m| disk.handle(c, m),
                )?,
            },
        });
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.serving.take();
        true
    }
}

#[cfg(test)]
mod tests;
mod uring;
