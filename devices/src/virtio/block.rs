//! virtio-blk on a raw image file or block device.
//!
//! Requests never run on a vCPU: the device's worker thread takes them off the queue and a
//! pool of IO_THREADS threads serves them, several in flight at once, each moving data
//! straight between the file and guest memory (preadv/pwritev). Every malformed
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

/// An open, locked disk image.
pub struct Disk {
    file: File,
    readonly: bool,
    direct: bool,
    sectors: u64,
    id: [u8; SERIAL_MAX],
}

impl Disk {
    /// Opens and locks the image: exclusively when writable, shared when read-only, so a
    /// second VM cannot write under a first one.
    pub fn open(opts: &DiskOptions) -> Result<Disk, Error> {
        let (file, size) = open_image(opts)?;
        let lock = if opts.readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            let path = opts.path.clone();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                Error::Locked { path }
            } else {
                Error::Open { path, source: e }
            });
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
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
        (end <= self.sectors && len % SECTOR_SIZE == 0).then_some(sector * SECTOR_SIZE)
    }

    fn buffer(&self, len: usize) -> AlignedBuf {
        AlignedBuf::new(len, if self.direct { DIRECT_ALIGN } else { 1 })
    }

    /// Serves one request; returns the bytes written into the chain (data + status).
    pub fn handle<M>(&self, chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> u32
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let bufs = ChainBuffers::of(chain);
        let Some(data_len) = total(&bufs.writable).checked_sub(1) else {
            log::warn!("virtio-blk: request without a status byte dropped");
            return 0;
        };
        let (data_w, status_at) = split(&bufs.writable, data_len).expect("data_len < total");
        let (status, written) = if bufs.misordered {
            log::warn!("virtio-blk: request with readable buffers after writable ones");
            (S_IOERR, 0)
        } else {
            self.request(mem, &bufs.readable, &data_w)
        };
        if !scatter(mem, &status_at, &[status]) {
            log::warn!("virtio-blk: request whose status byte is outside guest memory dropped");
            return 0;
        }
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    /// Runs the request whose header and data for the device are in `readable`, and whose
    /// data for the driver goes to `data_w`. Returns the status and the bytes of data written.
    fn request(
        &self,
        mem: &GuestMemoryMmap,
        readable: &[Segment],
        data_w: &[Segment],
    ) -> (u8, usize) {
        let mut header = [0u8; 16];
        let Some((h, data_r)) = split(readable, header.len()) else {
            return (S_IOERR, 0);
        };
        if !gather(mem, &h, &mut header) {
            return (S_IOERR, 0);
        }
        let ty = u32::from_le_bytes(header[0..4].try_into().expect("4"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        match ty {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = ty == VIRTIO_BLK_T_OUT;
                let segs = if write { &data_r[..] } else { data_w };
                let len = total(segs);
                if (write && self.readonly) || len == 0 || len > MAX_REQUEST {
                    return (S_IOERR, 0);
                }
                let Some(offset) = self.range(sector, len as u64) else {
                    log::debug!("virtio-blk: {len} bytes at sector {sector} are off the disk");
                    return (S_IOERR, 0);
                };
                match self.transfer(mem, segs, offset, write) {
                    Ok(()) => (S_OK, if write { 0 } else { len }),
                    Err(e) => {
                        log::warn!("virtio-blk: {len} bytes at {offset}: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.readonly {
                    return (S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        log::warn!("virtio-blk: flush: {e}");
                        (S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = total(data_w).min(self.id.len());
                let (to, _) = split(data_w, n).expect("n <= total");
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
                    return (S_IOERR, 0);
                }
                let mut segments = vec![0u8; len];
                if !gather(mem, &data_r, &mut segments) {
                    return (S_IOERR, 0);
                }
                let zero = ty == VIRTIO_BLK_T_WRITE_ZEROES;
                (self.discard_or_zero(zero, &mut segments.as_slice()), 0)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (S_IOERR, 0),
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                (S_UNSUPP, 0)
            }
        }
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
        let aligned = |(a, l): &Segment| a.0 % SECTOR_SIZE == 0 && *l as u64 % SECTOR_SIZE == 0;
        if !self.direct || segs.iter().all(aligned) {
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

/// The virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    config: [u8; 60],
    pool: Option<QueuePool>,
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
            pool: None,
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
        let pool = QueuePool::spawn("virtio-blk", IO_THREADS, mem, irq, queues, move |c, m| {
            disk.handle(c, m)
        })?;
        self.pool = Some(pool);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.pool.take();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::memory;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    fn image(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("nixvm-blk-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// 4 sectors, each filled with its own number.
    fn disk(name: &str, readonly: bool) -> (Disk, PathBuf) {
        let bytes: Vec<u8> = (0..4u8).flat_map(|s| [s + 1; 512]).collect();
        let path = image(name, &bytes);
        let opts = DiskOptions {
            path: path.clone(),
            readonly,
            serial: Some("nixvm-serial-0123456789".into()),
            direct: false,
        };
        (Disk::open(&opts).unwrap(), path)
    }

    /// Runs one request: a header, the given data descriptors (addr, len, device-writable),
    /// and a status byte if `status`. Returns (status byte, used length).
    fn run(
        d: &Disk,
        mem: &GuestMemoryMmap,
        ty: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
        status: bool,
    ) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0))];
        for &(addr, len, w) in data {
            descs.push(RawDescriptor::from(Descriptor::new(
                addr,
                len,
                if w { WRITE } else { 0 },
                0,
            )));
        }
        if status {
            descs.push(RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)));
        }
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(&descs).unwrap();
        let used = d.handle(chain, mem);
        (mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), used)
    }

    fn guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn reads_and_writes_the_last_sector() {
        let mem = memory(1 << 20);
        let (d, path) = disk("rw", false);
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_IN, 3, &[(DATA, 512, true)], true),
            (S_OK, 513)
        );
        assert_eq!(guest(&mem, DATA, 512), vec![4u8; 512]);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_OUT, 3, &[(DATA, 512, false)], true),
            (S_OK, 1)
        );
        assert_eq!(run(&d, &mem, VIRTIO_BLK_T_FLUSH, 0, &[], true), (S_OK, 1));
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[1536..], &[0xab; 512][..]);
        assert_eq!(&on_disk[..512], &[1u8; 512][..]);
        // A read split over two descriptors.
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_IN,
                0,
                &[(DATA, 512, true), (DATA + 0x1000, 1024, true)],
                true
            ),
            (S_OK, 1537)
        );
        assert_eq!(
            guest(&mem, DATA + 0x1000, 1024),
            [vec![2u8; 512], vec![3u8; 512]].concat()
        );
    }

    #[test]
    fn requests_off_the_disk_or_misaligned_fail_with_ioerr() {
        let mem = memory(1 << 20);
        let (d, _) = disk("range", false);
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_IN, 3, &[(DATA, 1024, true)], true),
            (S_IOERR, 1)
        );
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_IN, 4, &[(DATA, 512, true)], true),
            (S_IOERR, 1)
        );
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_IN,
                u64::MAX,
                &[(DATA, 512, true)],
                true
            ),
            (S_IOERR, 1)
        );
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)], true),
            (S_IOERR, 1)
        );
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_OUT, 0, &[(DATA, 100, false)], true),
            (S_IOERR, 1)
        );
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_OUT, 4, &[(DATA, 512, false)], true),
            (S_IOERR, 1)
        );
    }

    #[test]
    fn malformed_chains_never_panic() {
        let mem = memory(1 << 20);
        let (d, _) = disk("bad", false);
        // No status byte: nothing can be reported, the request is dropped.
        assert_eq!(run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[], false).1, 0);
        // Data for a read in a device-readable buffer: no room to read into.
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)], true),
            (S_IOERR, 1)
        );
        // A write with no data.
        assert_eq!(run(&d, &mem, VIRTIO_BLK_T_OUT, 0, &[], true), (S_IOERR, 1));
        // Data outside guest RAM: an I/O error.
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_IN,
                0,
                &[(0xffff_0000, 512, true)],
                true
            ),
            (S_IOERR, 1)
        );
        // The status byte outside guest RAM: nothing to report to, dropped.
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0)),
                RawDescriptor::from(Descriptor::new(0xffff_0000, 1, WRITE, 0)),
            ])
            .unwrap();
        assert_eq!(d.handle(chain, &mem), 0);
        // A readable buffer after a writable one: the spec forbids it.
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0)),
                RawDescriptor::from(Descriptor::new(DATA, 512, WRITE, 0)),
                RawDescriptor::from(Descriptor::new(DATA + 0x1000, 512, 0, 0)),
                RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
            ])
            .unwrap();
        assert_eq!(d.handle(chain, &mem), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
        // A header split over two descriptors and the status byte sharing the data's
        // descriptor: any framing is valid.
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(HDR, 8, 0, 0)),
                RawDescriptor::from(Descriptor::new(HDR + 8, 8, 0, 0)),
                RawDescriptor::from(Descriptor::new(DATA, 513, WRITE, 0)),
            ])
            .unwrap();
        mem.write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap(); // IN, sector 0
        assert_eq!(d.handle(chain, &mem), 513);
        assert_eq!(
            guest(&mem, DATA, 513),
            [vec![1u8; 512], vec![S_OK]].concat()
        );
        // Unknown request type.
        assert_eq!(run(&d, &mem, 99, 0, &[], true), (S_UNSUPP, 1));
        // The header itself device-writable (wrong direction): no header to read.
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(HDR, 16, WRITE, 0)),
                RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
            ])
            .unwrap();
        assert_eq!(d.handle(chain, &mem), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let mem = memory(1 << 20);
        let (d, path) = disk("misc", false);
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)], true),
            (S_OK, 21)
        );
        assert_eq!(&guest(&mem, DATA, 20), b"nixvm-serial-0123456");
        let segment = |sector: u64, n: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&n.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&s, GuestAddress(DATA)).unwrap();
        };
        segment(1, 2, 0);
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                &[(DATA, 16, false)],
                true
            ),
            (S_OK, 1)
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 2048, "size kept");
        assert_eq!(&on_disk[512..1536], &[0u8; 1024][..]);
        assert_eq!(&on_disk[1536..], &[4u8; 512][..]);
        let discard = || {
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_DISCARD,
                0,
                &[(DATA, 16, false)],
                true,
            )
        };
        segment(3, 1, 0);
        assert_eq!(discard(), (S_OK, 1));
        segment(3, 2, 0);
        assert_eq!(discard(), (S_IOERR, 1), "past the end");
        segment(0, 1, 2);
        assert_eq!(discard(), (S_UNSUPP, 1), "unknown flag");
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_DISCARD, 0, &[], true),
            (S_IOERR, 1),
            "no segment"
        );
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mem = memory(1 << 20);
        let (d, path) = disk("ro", true);
        let b = Block::new(
            Disk::open(&DiskOptions {
                path: path.clone(),
                readonly: true,
                ..Default::default()
            })
            .unwrap(),
        );
        assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(b.avail_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)], true),
            (S_IOERR, 1)
        );
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_DISCARD,
                0,
                &[(DATA, 16, false)],
                true
            ),
            (S_IOERR, 1)
        );
        assert_eq!(
            run(&d, &mem, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)], true),
            (S_OK, 513)
        );
        assert_eq!(std::fs::read(&path).unwrap()[..512], [1u8; 512]);
    }

    #[test]
    fn direct_io_bounces_through_aligned_buffers() {
        let mem = memory(1 << 20);
        let bytes: Vec<u8> = (0..4u8).flat_map(|s| [s + 1; 512]).collect();
        let path = image("direct", &bytes);
        let opts = DiskOptions {
            path: path.clone(),
            direct: true,
            ..Default::default()
        };
        let d = match Disk::open(&opts) {
            Ok(d) => d,
            Err(Error::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("skipped: the temp file system has no O_DIRECT");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        // Guest buffers at odd addresses: the I/O goes through an aligned bounce buffer.
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_IN,
                1,
                &[(DATA + 3, 1024, true)],
                true
            ),
            (S_OK, 1025)
        );
        assert_eq!(
            guest(&mem, DATA + 3, 1024),
            [vec![2u8; 512], vec![3u8; 512]].concat()
        );
        mem.write_slice(&[0xcd; 512], GuestAddress(DATA + 7))
            .unwrap();
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_OUT,
                0,
                &[(DATA + 7, 512, false)],
                true
            ),
            (S_OK, 1)
        );
        assert_eq!(std::fs::read(&path).unwrap()[..512], [0xcd; 512]);
        // Sector-aligned guest buffers: straight between the file and guest memory.
        assert_eq!(
            run(
                &d,
                &mem,
                VIRTIO_BLK_T_IN,
                0,
                &[(DATA, 512, true), (DATA + 0x1000, 1024, true)],
                true
            ),
            (S_OK, 1537)
        );
        assert_eq!(
            guest(&mem, DATA + 0x1000, 1024),
            [vec![2u8; 512], vec![3u8; 512]].concat()
        );
        assert_eq!(guest(&mem, DATA, 512), [0xcd; 512]);
    }

    #[test]
    fn requests_are_served_in_parallel_and_all_complete() {
        use crate::virtio::test_utils::CountingIrq;
        use vm_memory::GuestAddressSpace;
        use vmm_sys_util::eventfd::EFD_NONBLOCK;
        const N: u16 = 12;
        let atomic = Memory::new(memory(1 << 20));
        let mem = atomic.memory();
        let (d, _) = disk("pool", false);
        let vq = MockSplitQueue::new(&*mem, 64);
        let mut descs = Vec::new();
        for i in 0..N {
            let (hdr, data, status) = (
                HDR + u64::from(i) * 16,
                DATA + u64::from(i) * 0x1000,
                STATUS + u64::from(i),
            );
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            h[8..16].copy_from_slice(&u64::from(i % 4).to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let next = |k: u16| 3 * i + k;
            descs.push(RawDescriptor::from(Descriptor::new(hdr, 16, 1, next(1))));
            descs.push(RawDescriptor::from(Descriptor::new(
                data,
                512,
                WRITE | 1,
                next(2),
            )));
            descs.push(RawDescriptor::from(Descriptor::new(status, 1, WRITE, 0)));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let q: Queue = vq.create_queue().unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(CountingIrq::default());
        let mut b = Block::new(d);
        b.activate(
            atomic.clone(),
            irq.clone(),
            vec![(q, kick.try_clone().unwrap())],
        )
        .unwrap();
        kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while vq.used().idx().load() < N {
            assert!(
                std::time::Instant::now() < deadline,
                "requests never completed"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(b.reset(), "the pool stops");
        let mut heads: Vec<u32> = (0..N)
            .map(|k| vq.used().ring().ref_at(k.into()).unwrap().load().id())
            .collect();
        heads.sort_unstable();
        assert_eq!(heads, (0..N).map(|i| 3 * u32::from(i)).collect::<Vec<_>>());
        for i in 0..N {
            let byte = u8::try_from(i % 4 + 1).unwrap();
            assert_eq!(guest(&mem, STATUS + u64::from(i), 1), [S_OK]);
            assert_eq!(guest(&mem, DATA + u64::from(i) * 0x1000, 512), [byte; 512]);
        }
        assert!(
            !irq.0.lock().unwrap().is_empty(),
            "the driver was interrupted"
        );
    }

    #[test]
    fn config_space_and_open_errors() {
        let (d, path) = disk("cfg", false);
        let b = Block::new(d);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 4);
        let mut seg = [0u8; 4];
        b.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        let mut past = [0xffu8; 8];
        b.read_config(1000, &mut past);
        assert_eq!(past, [0; 8]);
        // Locked while `b` holds it, writable or read-only.
        let rw = DiskOptions {
            path: path.clone(),
            ..Default::default()
        };
        assert!(matches!(Disk::open(&rw), Err(Error::Locked { .. })));
        assert!(matches!(
            Disk::open(&DiskOptions {
                readonly: true,
                ..rw.clone()
            }),
            Err(Error::Locked { .. })
        ));
        drop(b);
        assert!(Disk::open(&rw).is_ok(), "lock released with the device");
        let odd = image("odd", &[0u8; 1000]);
        assert!(matches!(
            Disk::open(&DiskOptions {
                path: odd,
                ..Default::default()
            }),
            Err(Error::Size { size: 1000, .. })
        ));
        assert!(matches!(
            Disk::open(&DiskOptions {
                path: "/nonexistent/disk.img".into(),
                ..Default::default()
            }),
            Err(Error::Open { .. })
        ));
    }
}
