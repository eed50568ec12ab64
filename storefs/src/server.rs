//! [`StoreFs`]: FUSE requests in, replies out; the per-opcode handlers.
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use nixvm_devices::lock;

use vm_memory::ByteValued;

use crate::Error;
use crate::host::*;
use crate::inodes::*;
use crate::listings::{Listings, stamp};
use nixvm_devices::virtio::fuse::{self, *};

/// How long the guest may cache entries and attributes, in seconds: a day, since store
/// paths never change once they exist.
pub const TIMEOUT_SECS: u64 = 24 * 60 * 60;
/// How many nodes keep an open O_PATH descriptor (the root's is extra).
pub const DEFAULT_MAX_CACHED_FDS: usize = 4096;
/// How many file and directory handles may be open at once (each holds a descriptor).
pub const MAX_HANDLES: usize = 16384;
/// The largest READ/READDIR reply body: 256 pages of 4 KiB (negotiated with FUSE_MAX_PAGES).
pub const MAX_TRANSFER: usize = 1 << 20;
const MAX_PAGES_OURS: u16 = 256;
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;
const OUT_HEADER: usize = size_of::<OutHeader>();
const OUT_HEADER_LEN: u32 = 16;
const _: () = assert!(OUT_HEADER_LEN as usize == OUT_HEADER);

fn attr_of(st: &libc::stat) -> Attr {
    let major = u64::from(libc::major(st.st_rdev));
    let minor = u64::from(libc::minor(st.st_rdev));
    // The kernel's new_encode_dev.
    let rdev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: u32::try_from(st.st_atime_nsec).unwrap_or(0),
        mtimensec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
        ctimensec: u32::try_from(st.st_ctime_nsec).unwrap_or(0),
        mode: st.st_mode,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: u32::try_from(rdev).unwrap_or(0),
        blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
        flags: 0,
    }
}

fn entry_out(nodeid: u64, st: &libc::stat) -> EntryOut {
    EntryOut {
        nodeid,
        generation: 0,
        entry_valid: TIMEOUT_SECS,
        attr_valid: TIMEOUT_SECS,
        entry_valid_nsec: 0,
        attr_valid_nsec: 0,
        attr: attr_of(st),
    }
}

/// The NUL-terminated single path component at the start of `body`.
fn parse_name(body: &[u8]) -> Res<&CStr> {
    let nul = body.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
    let name = &body[..nul];
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    if name.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    CStr::from_bytes_with_nul(&body[..=nul]).map_err(|_| libc::EINVAL)
}

fn parse<T: ByteValued + Default>(body: &[u8]) -> Res<(T, &[u8])> {
    read_struct::<T>(body).ok_or(libc::EINVAL)
}

fn reply_struct<T: ByteValued>(v: &T) -> Res<Vec<u8>> {
    Ok(v.as_slice().to_vec())
}

/// A read-only FUSE server over one host directory. See the module docs.
pub struct StoreFs {
    root: Arc<OwnedFd>,
    root_ino: u64,
    inodes: Mutex<Inodes>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    listings: Listings,
    /// Requests served, by opcode (the last slot counts opcodes beyond it), logged at the
    /// end with NIXVM_LOG=debug.
    served: [AtomicU64; 64],
}

impl StoreFs {
    /// Logs how many requests of each kind were served (NIXVM_LOG=debug).
    pub fn log_served(&self) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        let served: Vec<String> = (0u32..)
            .zip(&self.served)
            .filter_map(|(op, n)| match n.load(Ordering::Relaxed) {
                0 => None,
                n => Some(format!("{} ×{n}", opcode_name(op))),
            })
            .collect();
        log::debug!("storefs: requests served: {}", served.join(", "));
    }
}

/// A FUSE opcode's name, for the counts.
fn opcode_name(op: u32) -> String {
    let name = match op {
        fuse::LOOKUP => "LOOKUP",
        fuse::FORGET => "FORGET",
        fuse::GETATTR => "GETATTR",
        fuse::READLINK => "READLINK",
        fuse::OPEN => "OPEN",
        fuse::READ => "READ",
        fuse::STATFS => "STATFS",
        fuse::RELEASE => "RELEASE",
        fuse::FLUSH => "FLUSH",
        fuse::INIT => "INIT",
        fuse::OPENDIR => "OPENDIR",
        fuse::READDIR => "READDIR",
        fuse::RELEASEDIR => "RELEASEDIR",
        fuse::ACCESS => "ACCESS",
        fuse::BATCH_FORGET => "BATCH_FORGET",
        fuse::READDIRPLUS => "READDIRPLUS",
        fuse::GETXATTR => "GETXATTR",
        fuse::LISTXATTR => "LISTXATTR",
        fuse::LSEEK => "LSEEK",
        fuse::DESTROY => "DESTROY",
        _ => return format!("opcode {op}"),
    };
    name.to_owned()
}

impl StoreFs {
    /// Serves DIR read-only. Errors if DIR cannot be opened as a directory.
    pub fn new(dir: &Path) -> Result<StoreFs, Error> {
        Self::with_max_cached_fds(dir, DEFAULT_MAX_CACHED_FDS)
    }

    /// As [`StoreFs::new`], keeping at most `max_fds` (at least 1) node descriptors open.
    pub fn with_max_cached_fds(dir: &Path, max_fds: usize) -> Result<StoreFs, Error> {
        let err = |source| Error::OpenRoot {
            path: dir.to_path_buf(),
            source,
        };
        let root: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(err)?
            .into();
        let st = stat_fd(root.as_raw_fd()).map_err(|e| err(io::Error::from_raw_os_error(e)))?;
        Ok(StoreFs {
            root: Arc::new(root),
            root_ino: st.st_ino,
            inodes: Mutex::new(Inodes {
                nodes: HashMap::new(),
                by_host: HashMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
                next_id: ROOT_ID + 1,
                max_fds,
            }),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            listings: Listings::default(),
            served: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    /// Handles one FUSE request: `request` is the whole device-readable part of a virtio-fs
    /// descriptor chain (fuse_in_header + opcode body), `max_reply` the device-writable room.
    /// Returns the reply bytes (fuse_out_header + body), or None for requests that take no
    /// reply (FORGET, BATCH_FORGET). Never panics on any input.
    ///
    /// A request shorter than a fuse_in_header, or whose `len` disagrees with the bytes
    /// given, answers EINVAL (with unique 0 when the header itself is cut short). A reply
    /// that would not fit in `max_reply` becomes ERANGE; if not even the 16-byte header
    /// fits, that header is still returned and the caller cannot deliver it.
    pub fn handle(&self, request: &[u8], max_reply: usize) -> Option<Vec<u8>> {
        let Some((h, body)) = read_struct::<InHeader>(request) else {
            nixvm_devices::guest_warn!("storefs: request of {} bytes is too short", request.len());
            return Some(error_reply(0, libc::EINVAL));
        };
        self.count(h.opcode);
        let forget = h.opcode == fuse::FORGET || h.opcode == fuse::BATCH_FORGET;
        if usize::try_from(h.len).ok() != Some(request.len()) {
            nixvm_devices::guest_warn!(
                "storefs: request says {} bytes, has {}",
                h.len,
                request.len()
            );
            return if forget {
                None
            } else {
                Some(error_reply(h.unique, libc::EINVAL))
            };
        }
        if forget {
            self.forget(&h, body);
            return None;
        }
        let room = max_reply.saturating_sub(OUT_HEADER);
        let result = self.dispatch(&h, body, room);
        Some(match result {
            Ok(body) if body.len() <= room => ok_reply(h.unique, &body),
            Ok(_) => error_reply(h.unique, libc::ERANGE),
            Err(e) => error_reply(h.unique, e),
        })
    }

    /// As [`StoreFs::handle`], but a well-formed READ's data is not copied into the reply:
    /// `read_into(file, offset, len)` reads up to `len` bytes of `file` at `offset` straight
    /// into the data part of the caller's reply buffers (after the 16-byte header) and says how
    /// many it read (fewer at the end of the file). The reply is then only the header, whose
    /// `len` counts the data too.
    pub fn handle_into(
        &self,
        request: &[u8],
        max_reply: usize,
        read_into: &mut dyn FnMut(&File, u64, usize) -> io::Result<usize>,
    ) -> Option<Vec<u8>> {
        match read_struct::<InHeader>(request) {
            Some((h, body))
                if h.opcode == fuse::READ && usize::try_from(h.len).ok() == Some(request.len()) =>
            {
                self.count(h.opcode);
                let room = max_reply.saturating_sub(OUT_HEADER);
                Some(match self.read_with(body, room, read_into) {
                    Ok(n) => {
                        let mut header = ok_reply(h.unique, &[]);
                        let len = u32::try_from(OUT_HEADER + n).unwrap_or(u32::MAX);
                        header[..4].copy_from_slice(&len.to_le_bytes());
                        header
                    }
                    Err(e) => error_reply(h.unique, e),
                })
            }
            _ => self.handle(request, max_reply),
        }
    }

    fn count(&self, opcode: u32) {
        let last = self.served.len() - 1;
        let slot = usize::try_from(opcode).map_or(last, |o| o.min(last));
        self.served[slot].fetch_add(1, Ordering::Relaxed);
    }

    fn dispatch(&self, h: &InHeader, body: &[u8], room: usize) -> Res<Vec<u8>> {
        let node = h.nodeid;
        match h.opcode {
            fuse::INIT => self.init(body),
            fuse::DESTROY => self.destroy(),
            fuse::LOOKUP => {
                let name = parse_name(body)?;
                reply_struct(&self.lookup(node, name)?)
            }
            fuse::GETATTR => self.getattr(node),
            fuse::READLINK => self.readlink(node),
            fuse::OPEN => self.open(node, body, false),
            fuse::OPENDIR => self.open(node, body, true),
            fuse::READ => self.read(body, room),
            fuse::READDIR => self.readdir(body, room, false),
            fuse::READDIRPLUS => self.readdir(body, room, true),
            fuse::RELEASE => self.release(body, false),
            fuse::RELEASEDIR => self.release(body, true),
            fuse::STATFS => self.statfs(),
            fuse::ACCESS => self.access(node, body),
            fuse::FLUSH => {
                let (f, _) = parse::<FlushIn>(body)?;
                match self.handle_of(f.fh)?.as_ref() {
                    Handle::File(_) => Ok(Vec::new()),
                    Handle::Dir { .. } => Err(libc::EBADF),
                }
            }
            fuse::LSEEK => self.lseek(body),
            fuse::GETXATTR => {
                let (_, rest) = parse::<GetxattrIn>(body)?;
                rest.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
                Err(libc::ENOSYS)
            }
            fuse::LISTXATTR => {
                parse::<GetxattrIn>(body)?;
                Err(libc::ENOSYS)
            }
            fuse::FSYNC | fuse::FSYNCDIR | fuse::SYNCFS => Ok(Vec::new()),
            fuse::SETATTR
            | fuse::SYMLINK
            | fuse::MKNOD
            | fuse::MKDIR
            | fuse::UNLINK
            | fuse::RMDIR
            | fuse::RENAME
            | fuse::RENAME2
            | fuse::LINK
            | fuse::WRITE
            | fuse::SETXATTR
            | fuse::REMOVEXATTR
            | fuse::CREATE
            | fuse::FALLOCATE
            | fuse::COPY_FILE_RANGE
            | fuse::TMPFILE => Err(libc::EROFS),
            op => {
                log::debug!("storefs: opcode {op} is not implemented");
                Err(libc::ENOSYS)
            }
        }
    }

    fn init(&self, body: &[u8]) -> Res<Vec<u8>> {
        if body.len() < 16 {
            return Err(libc::EINVAL);
        }
        let i: InitIn = read_struct_prefix(body);
        if i.major < KERNEL_VERSION {
            nixvm_devices::guest_warn!("storefs: guest FUSE {}.{} is too old", i.major, i.minor);
            return Err(libc::EPROTO);
        }
        if i.major > KERNEL_VERSION {
            // The guest retries INIT with our major.
            return reply_struct(&InitOut {
                major: KERNEL_VERSION,
                minor: KERNEL_MINOR_VERSION,
                ..Default::default()
            });
        }
        if i.minor < MIN_KERNEL_MINOR_VERSION {
            nixvm_devices::guest_warn!("storefs: guest FUSE 7.{} is too old", i.minor);
            return Err(libc::EPROTO);
        }
        let ours = ASYNC_READ
            | DO_READDIRPLUS
            | READDIRPLUS_AUTO
            | PARALLEL_DIROPS
            | MAX_PAGES
            | CACHE_SYMLINKS;
        let flags = i.flags & ours;
        let max_transfer = u32::try_from(MAX_TRANSFER).unwrap_or(u32::MAX);
        reply_struct(&InitOut {
            major: KERNEL_VERSION,
            minor: i.minor.min(KERNEL_MINOR_VERSION),
            max_readahead: i.max_readahead.min(max_transfer),
            flags,
            max_background: 64,
            congestion_threshold: 48,
            max_write: max_transfer,
            time_gran: 1,
            max_pages: if flags & MAX_PAGES != 0 {
                MAX_PAGES_OURS
            } else {
                0
            },
            ..Default::default()
        })
    }

    fn destroy(&self) -> Res<Vec<u8>> {
        self.handles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let mut inodes = lock(&self.inodes);
        inodes.nodes.clear();
        inodes.by_host.clear();
        inodes.lru.clear();
        Ok(Vec::new())
    }

    fn fd_of(&self, id: u64) -> Res<Arc<OwnedFd>> {
        if id == ROOT_ID {
            return Ok(self.root.clone());
        }
        lock(&self.inodes).fd_of(id, &self.root)
    }

    fn lookup(&self, parent: u64, name: &CStr) -> Res<EntryOut> {
        let pfd = self.fd_of(parent)?;
        let fd = open_beneath(pfd.as_raw_fd(), name, libc::O_PATH | libc::O_NOFOLLOW)?;
        let st = stat_fd(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut inodes = lock(&self.inodes);
        if parent != ROOT_ID && !inodes.nodes.contains_key(&parent) {
            return Err(libc::EBADF);
        }
        let id = if let Some(&id) = inodes.by_host.get(&key) {
            let n = inodes.nodes.get_mut(&id).ok_or(libc::EIO)?;
            n.nlookup = n.nlookup.saturating_add(1);
            if n.fd.is_none() {
                inodes.cache_fd(id, Arc::new(fd));
            }
            id
        } else {
            let id = inodes.next_id;
            inodes.next_id += 1;
            inodes.nodes.insert(
                id,
                Node {
                    parent,
                    name: name.to_owned(),
                    dev: st.st_dev,
                    ino: st.st_ino,
                    nlookup: 1,
                    children: 0,
                    fd: None,
                    lru_tick: 0,
                },
            );
            inodes.by_host.insert(key, id);
            if let Some(p) = inodes.nodes.get_mut(&parent) {
                p.children += 1;
            }
            inodes.cache_fd(id, Arc::new(fd));
            id
        };
        Ok(entry_out(id, &st))
    }

    fn forget(&self, h: &InHeader, body: &[u8]) {
        if h.opcode == fuse::FORGET {
            if let Some((f, _)) = read_struct::<ForgetIn>(body) {
                lock(&self.inodes).forget(h.nodeid, f.nlookup);
            }
            return;
        }
        let Some((b, mut rest)) = read_struct::<BatchForgetIn>(body) else {
            return;
        };
        let fits = usize::try_from(b.count)
            .ok()
            .and_then(|c| c.checked_mul(size_of::<ForgetOne>()))
            .is_some_and(|n| n <= rest.len());
        if !fits {
            nixvm_devices::guest_warn!(
                "storefs: BATCH_FORGET of {} does not fit its request",
                b.count
            );
            return;
        }
        let mut inodes = lock(&self.inodes);
        for _ in 0..b.count {
            let Some((one, r)) = read_struct::<ForgetOne>(rest) else {
                break;
            };
            inodes.forget(one.nodeid, one.nlookup);
            rest = r;
        }
    }

    fn getattr(&self, node: u64) -> Res<Vec<u8>> {
        let fd = self.fd_of(node)?;
        let st = stat_fd(fd.as_raw_fd())?;
        reply_struct(&AttrOut {
            attr_valid: TIMEOUT_SECS,
            attr_valid_nsec: 0,
            dummy: 0,
            attr: attr_of(&st),
        })
    }

    fn readlink(&self, node: u64) -> Res<Vec<u8>> {
        let fd = self.fd_of(node)?;
        // readlinkat(fd, "") says ENOENT for what is not a symlink; readlink(2) says EINVAL.
        if file_type(&stat_fd(fd.as_raw_fd())?) != libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        let mut buf = vec![0u8; PATH_MAX];
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes; the path is "".
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| last_errno())?;
        buf.truncate(n);
        Ok(buf)
    }

    fn add_handle(&self, h: Handle) -> Res<u64> {
        let mut handles = self.handles.write().unwrap_or_else(|e| e.into_inner());
        if handles.len() >= MAX_HANDLES {
            nixvm_devices::guest_warn!("storefs: {MAX_HANDLES} handles are open already");
            return Err(libc::ENFILE);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        handles.insert(fh, Arc::new(h));
        Ok(fh)
    }

    fn handle_of(&self, fh: u64) -> Res<Arc<Handle>> {
        self.handles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(libc::EBADF)
    }

    fn open(&self, node: u64, body: &[u8], dir: bool) -> Res<Vec<u8>> {
        let (o, _) = parse::<OpenIn>(body)?;
        let flags = i32::try_from(o.flags).map_err(|_| libc::EINVAL)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
        {
            return Err(libc::EROFS);
        }
        let fd = self.fd_of(node)?;
        let st = stat_fd(fd.as_raw_fd())?;
        let (handle, open_flags) = match (file_type(&st), dir) {
            (libc::S_IFREG, false) => {
                (Handle::File(reopen_file(fd.as_raw_fd())?), FOPEN_KEEP_CACHE)
            }
            // Below the share's top, a directory's listing is part of an immutable store
            // path: the guest keeps it in its page cache (CACHE_DIR), and across opens
            // (KEEP_CACHE: else Linux drops it at each open). The top itself (the store,
            // which gains paths) is listed afresh at each open.
            (libc::S_IFDIR, true) => (
                Handle::Dir {
                    node,
                    fd,
                    entries: Mutex::new(None),
                },
                if node == ROOT_ID {
                    0
                } else {
                    FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE
                },
            ),
            (_, true) => return Err(libc::ENOTDIR),
            (libc::S_IFDIR, false) => return Err(libc::EISDIR),
            (libc::S_IFLNK, false) => return Err(libc::ELOOP),
            (_, false) => return Err(libc::EACCES),
        };
        let fh = self.add_handle(handle)?;
        reply_struct(&OpenOut {
            fh,
            open_flags,
            backing_id: 0,
        })
    }

    fn release(&self, body: &[u8], dir: bool) -> Res<Vec<u8>> {
        let (r, _) = parse::<ReleaseIn>(body)?;
        let mut handles = self.handles.write().unwrap_or_else(|e| e.into_inner());
        match handles
            .get(&r.fh)
            .map(|h| matches!(h.as_ref(), Handle::Dir { .. }))
        {
            Some(is_dir) if is_dir == dir => {
                handles.remove(&r.fh);
                Ok(Vec::new())
            }
            _ => Err(libc::EBADF),
        }
    }

    fn read(&self, body: &[u8], room: usize) -> Res<Vec<u8>> {
        let mut buf = Vec::new();
        let n = self.read_with(body, room, &mut |file, offset, size| {
            buf.resize(size, 0);
            let mut done = 0;
            while done < size {
                let off = offset
                    .checked_add(done as u64)
                    .ok_or(io::ErrorKind::InvalidInput)?;
                match file.read_at(&mut buf[done..], off) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(done)
        })?;
        buf.truncate(n);
        Ok(buf)
    }

    /// A READ: checks the handle and bounds the size (the request's, the room, MAX_TRANSFER),
    /// then lets `read_into` move the data; returns how many bytes it read.
    fn read_with(
        &self,
        body: &[u8],
        room: usize,
        read_into: &mut dyn FnMut(&File, u64, usize) -> io::Result<usize>,
    ) -> Res<usize> {
        let (r, _) = parse::<ReadIn>(body)?;
        let h = self.handle_of(r.fh)?;
        let Handle::File(file) = h.as_ref() else {
            return Err(libc::EISDIR);
        };
        let size = usize::try_from(r.size)
            .unwrap_or(usize::MAX)
            .min(room)
            .min(MAX_TRANSFER);
        r.offset.checked_add(size as u64).ok_or(libc::EINVAL)?;
        match read_into(file, r.offset, size) {
            Ok(n) => Ok(n.min(size)),
            Err(e) => Err(errno_of(&e)),
        }
    }

    fn list_dir(&self, node: u64, fd: &OwnedFd) -> Res<Vec<DirEntry>> {
        let parent_ino = if node == ROOT_ID {
            self.root_ino
        } else {
            let inodes = lock(&self.inodes);
            inodes
                .nodes
                .get(&node)
                .and_then(|n| {
                    if n.parent == ROOT_ID {
                        Some(self.root_ino)
                    } else {
                        inodes.nodes.get(&n.parent).map(|p| p.ino)
                    }
                })
                .unwrap_or(self.root_ino)
        };
        let own_ino = stat_fd(fd.as_raw_fd())?.st_ino;
        let mut out = vec![
            DirEntry {
                name: c".".to_owned(),
                ino: own_ino,
                typ: u32::from(libc::DT_DIR),
            },
            DirEntry {
                name: c"..".to_owned(),
                ino: parent_ino,
                typ: u32::from(libc::DT_DIR),
            },
        ];
        let rd = std::fs::read_dir(proc_path(fd.as_raw_fd())).map_err(|e| errno_of(&e))?;
        for e in rd {
            let e = e.map_err(|e| errno_of(&e))?;
            let Ok(name) = CString::new(e.file_name().as_bytes()) else {
                continue;
            };
            let typ = match e.file_type() {
                Ok(t) if t.is_dir() => libc::DT_DIR,
                Ok(t) if t.is_file() => libc::DT_REG,
                Ok(t) if t.is_symlink() => libc::DT_LNK,
                Ok(t) if t.is_fifo() => libc::DT_FIFO,
                Ok(t) if t.is_char_device() => libc::DT_CHR,
                Ok(t) if t.is_block_device() => libc::DT_BLK,
                Ok(t) if t.is_socket() => libc::DT_SOCK,
                _ => libc::DT_UNKNOWN,
            };
            out.push(DirEntry {
                name,
                ino: e.ino(),
                typ: u32::from(typ),
            });
        }
        Ok(out)
    }

    fn readdir(&self, body: &[u8], room: usize, plus: bool) -> Res<Vec<u8>> {
        let (r, _) = parse::<ReadIn>(body)?;
        let h = self.handle_of(r.fh)?;
        let Handle::Dir { node, fd, entries } = h.as_ref() else {
            return Err(libc::ENOTDIR);
        };
        let size = usize::try_from(r.size)
            .unwrap_or(usize::MAX)
            .min(room)
            .min(MAX_TRANSFER);
        let list = {
            let mut cached = lock(entries);
            match cached.as_ref() {
                Some(l) if r.offset != 0 => l.clone(),
                _ => {
                    let now = stamp(&stat_fd(fd.as_raw_fd())?);
                    let l = self.listings.get(*node, now, || self.list_dir(*node, fd))?;
                    *cached = Some(l.clone());
                    l
                }
            }
        };
        let start = usize::try_from(r.offset).unwrap_or(usize::MAX);
        let header = if plus {
            size_of::<Direntplus>()
        } else {
            size_of::<Dirent>()
        };
        let mut out = Vec::new();
        for (i, e) in list.entries.iter().enumerate().skip(start) {
            let name = e.name.as_bytes();
            let rec = dirent_size(header, name.len());
            if out.len() + rec > size {
                break;
            }
            let mut dirent = Dirent {
                ino: e.ino,
                off: i as u64 + 1,
                namelen: u32::try_from(name.len()).map_err(|_| libc::EIO)?,
                typ: e.typ,
            };
            if plus {
                let entry = if name == b"." || name == b".." {
                    EntryOut::default()
                } else {
                    // A name that vanished since the listing gets no entry (node id 0).
                    self.lookup(*node, &e.name).unwrap_or_default()
                };
                if entry.nodeid != 0 {
                    dirent.ino = entry.attr.ino;
                }
                out.extend_from_slice(entry.as_slice());
            }
            out.extend_from_slice(dirent.as_slice());
            out.extend_from_slice(name);
            out.resize(out.len() + rec - header - name.len(), 0);
        }
        Ok(out)
    }

    fn statfs(&self) -> Res<Vec<u8>> {
        // SAFETY: all-zero is a valid `statfs` (plain integers).
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on our own descriptor with a valid out pointer.
        if unsafe { libc::fstatfs(self.root.as_raw_fd(), &mut s) } != 0 {
            return Err(last_errno());
        }
        reply_struct(&StatfsOut {
            st: Kstatfs {
                blocks: s.f_blocks,
                bfree: s.f_bfree,
                bavail: s.f_bavail,
                files: s.f_files,
                ffree: s.f_ffree,
                bsize: u32::try_from(s.f_bsize).unwrap_or(4096),
                namelen: u32::try_from(s.f_namelen).unwrap_or(255),
                frsize: u32::try_from(s.f_frsize).unwrap_or(4096),
                ..Default::default()
            },
        })
    }

    /// W_OK answers EROFS; X_OK on a non-directory without any execute bit EACCES; the
    /// rest 0 (the guest kernel checks permissions against the attributes itself).
    fn access(&self, node: u64, body: &[u8]) -> Res<Vec<u8>> {
        let (a, _) = parse::<AccessIn>(body)?;
        let fd = self.fd_of(node)?;
        let st = stat_fd(fd.as_raw_fd())?;
        let mask = i32::try_from(a.mask).map_err(|_| libc::EINVAL)?;
        if mask & libc::W_OK != 0 {
            return Err(libc::EROFS);
        }
        if mask & libc::X_OK != 0 && file_type(&st) != libc::S_IFDIR && st.st_mode & 0o111 == 0 {
            return Err(libc::EACCES);
        }
        Ok(Vec::new())
    }

    fn lseek(&self, body: &[u8]) -> Res<Vec<u8>> {
        let (l, _) = parse::<LseekIn>(body)?;
        let h = self.handle_of(l.fh)?;
        let Handle::File(file) = h.as_ref() else {
            return Err(libc::EBADF);
        };
        let whence = i32::try_from(l.whence).map_err(|_| libc::EINVAL)?;
        if ![
            libc::SEEK_SET,
            libc::SEEK_END,
            libc::SEEK_DATA,
            libc::SEEK_HOLE,
        ]
        .contains(&whence)
        {
            return Err(libc::EINVAL);
        }
        let off = i64::try_from(l.offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: lseek on our own descriptor; reads use pread, so its position is unused.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        let offset = u64::try_from(r).map_err(|_| last_errno())?;
        reply_struct(&LseekOut { offset })
    }
}

fn ok_reply(unique: u64, body: &[u8]) -> Vec<u8> {
    let len = OUT_HEADER + body.len();
    let h = OutHeader {
        len: u32::try_from(len).unwrap_or(u32::MAX),
        error: 0,
        unique,
    };
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(h.as_slice());
    v.extend_from_slice(body);
    v
}

fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    OutHeader {
        len: OUT_HEADER_LEN,
        error: -errno,
        unique,
    }
    .as_slice()
    .to_vec()
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
