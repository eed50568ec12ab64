//! [`StoreFs`]: node table, handle table and the per-opcode handlers.
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::lock;

use vm_memory::ByteValued;

use super::Error;
use super::fuse::{self, *};

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

/// A failed request: the errno it answers with.
type Res<T> = Result<T, i32>;

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Opens `name` (one component) beneath `dirfd` without following any symlink or magic link.
fn open_beneath(dirfd: RawFd, name: &CStr, flags: i32) -> Res<OwnedFd> {
    // SAFETY: all-zero is a valid open_how (plain integers); libc marks it non-exhaustive.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from(flags | libc::O_CLOEXEC).map_err(|_| libc::EINVAL)?;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `name` is NUL-terminated and `how` a valid open_how of the size we pass; the
    // kernel only reads them. On success the result is a new descriptor that we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            name.as_ptr(),
            &how as *const libc::open_how,
            size_of::<libc::open_how>(),
        )
    };
    if r < 0 {
        return Err(last_errno());
    }
    let fd = RawFd::try_from(r).map_err(|_| libc::EIO)?;
    // SAFETY: openat2 succeeded, so `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Stats what `fd` (an O_PATH descriptor, possibly of a symlink) refers to.
fn stat_fd(fd: RawFd) -> Res<libc::stat> {
    // SAFETY: all-zero is a valid `stat` (plain integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty NUL-terminated string and `st` a valid out pointer.
    let r = unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(last_errno());
    }
    Ok(st)
}

fn file_type(st: &libc::stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

/// Reopens what the O_PATH descriptor `fd` refers to, for reading (the caller checked that it
/// is a regular file or a directory: never a symlink, FIFO or device).
fn proc_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

fn reopen_file(fd: RawFd) -> Res<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(proc_path(fd))
        .map_err(|e| errno_of(&e))
}

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

/// A FUSE node other than the root.
struct Node {
    parent: u64,
    name: CString,
    dev: u64,
    ino: u64,
    /// The guest's lookup count.
    nlookup: u64,
    /// Known nodes whose `parent` is this one: they need it to reopen themselves.
    children: u64,
    /// The O_PATH descriptor, while in the LRU cache.
    fd: Option<Arc<OwnedFd>>,
    lru_tick: u64,
}

struct Inodes {
    nodes: HashMap<u64, Node>,
    by_host: HashMap<(u64, u64), u64>,
    /// Nodes holding a descriptor, least recently used first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    next_id: u64,
    max_fds: usize,
}

impl Inodes {
    fn touch(&mut self, id: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(n) = self.nodes.get_mut(&id) {
            self.lru.remove(&n.lru_tick);
            n.lru_tick = tick;
            self.lru.insert(tick, id);
        }
    }

    fn cache_fd(&mut self, id: u64, fd: Arc<OwnedFd>) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.fd = Some(fd);
        self.touch(id);
        while self.lru.len() > self.max_fds.max(1) {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some(v) = self.nodes.get_mut(&victim) {
                v.fd = None;
            }
        }
    }

    /// The O_PATH descriptor of `id`, reopened through the parent chain if evicted.
    fn fd_of(&mut self, id: u64, root: &Arc<OwnedFd>) -> Res<Arc<OwnedFd>> {
        let mut chain = Vec::new();
        let mut cur = id;
        let base = loop {
            if cur == ROOT_ID {
                break root.clone();
            }
            let n = self.nodes.get(&cur).ok_or(libc::EBADF)?;
            if let Some(fd) = &n.fd {
                let fd = fd.clone();
                self.touch(cur);
                break fd;
            }
            chain.push(cur);
            if chain.len() > self.nodes.len() {
                log::error!("storefs: node {id}'s parent chain has a cycle");
                return Err(libc::EIO);
            }
            cur = n.parent;
        };
        let mut fd = base;
        for &c in chain.iter().rev() {
            let n = self.nodes.get(&c).ok_or(libc::EBADF)?;
            let new = open_beneath(fd.as_raw_fd(), &n.name, libc::O_PATH | libc::O_NOFOLLOW)
                .map_err(|e| if e == libc::ENOENT { libc::ESTALE } else { e })?;
            let st = stat_fd(new.as_raw_fd())?;
            if (st.st_dev, st.st_ino) != (n.dev, n.ino) {
                return Err(libc::ESTALE);
            }
            let new = Arc::new(new);
            self.cache_fd(c, new.clone());
            fd = new;
        }
        Ok(fd)
    }

    fn remove(&mut self, mut id: u64) {
        while id != ROOT_ID {
            let Some(n) = self.nodes.remove(&id) else {
                return;
            };
            if self.by_host.get(&(n.dev, n.ino)) == Some(&id) {
                self.by_host.remove(&(n.dev, n.ino));
            }
            if n.fd.is_some() {
                self.lru.remove(&n.lru_tick);
            }
            let Some(p) = self.nodes.get_mut(&n.parent) else {
                return;
            };
            p.children = p.children.saturating_sub(1);
            if p.nlookup != 0 || p.children != 0 {
                return;
            }
            id = n.parent;
        }
    }

    fn forget(&mut self, id: u64, nlookup: u64) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.nlookup = n.nlookup.saturating_sub(nlookup);
        if n.nlookup == 0 && n.children == 0 {
            self.remove(id);
        }
    }
}

struct DirEntry {
    name: CString,
    ino: u64,
    typ: u32,
}

enum Handle {
    File(File),
    Dir {
        node: u64,
        fd: Arc<OwnedFd>,
        /// The listing, taken at the first READDIR and again at each offset 0 (rewinddir).
        entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
    },
}

/// A read-only FUSE server over one host directory. See the module docs.
pub struct StoreFs {
    root: Arc<OwnedFd>,
    root_ino: u64,
    inodes: Mutex<Inodes>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
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
            log::warn!("storefs: request of {} bytes is too short", request.len());
            return Some(error_reply(0, libc::EINVAL));
        };
        let forget = h.opcode == fuse::FORGET || h.opcode == fuse::BATCH_FORGET;
        if usize::try_from(h.len).ok() != Some(request.len()) {
            log::warn!(
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
            log::warn!("storefs: guest FUSE {}.{} is too old", i.major, i.minor);
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
            log::warn!("storefs: guest FUSE 7.{} is too old", i.minor);
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
            log::warn!(
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
            log::warn!("storefs: {MAX_HANDLES} handles are open already");
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
            (libc::S_IFDIR, true) => (
                Handle::Dir {
                    node,
                    fd,
                    entries: Mutex::new(None),
                },
                0,
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
                    let l = Arc::new(self.list_dir(*node, fd)?);
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
        for (i, e) in list.iter().enumerate().skip(start) {
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
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    struct Tree(PathBuf);
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const BIG: usize = 3 << 20;

    fn tree() -> Tree {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "nixvm-storefs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("a/b/c")).unwrap();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::create_dir_all(d.join("many")).unwrap();
        std::fs::create_dir_all(d.join("empty")).unwrap();
        std::fs::write(d.join("hello.txt"), b"hello world\n").unwrap();
        std::fs::write(d.join("a/b/c/deep.txt"), b"deep").unwrap();
        std::fs::write(d.join("bin/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(d.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(d.join("hello.txt"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        std::fs::write(d.join("big.bin"), &big).unwrap();
        // Sparse: 4 KiB of data, then a hole up to 8 MiB.
        let sparse = File::create(d.join("sparse")).unwrap();
        sparse.write_at(&[1u8; 4096], 0).unwrap();
        sparse.set_len(8 << 20).unwrap();
        for i in 0..50 {
            std::fs::write(d.join(format!("many/file-{i:03}")), b"x").unwrap();
        }
        std::os::unix::fs::symlink("hello.txt", d.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", d.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../..", d.join("up")).unwrap();
        Tree(d)
    }

    fn req(op: u32, node: u64, body: &[u8]) -> Vec<u8> {
        let h = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode: op,
            unique: 0x1234,
            nodeid: node,
            ..Default::default()
        };
        let mut v = h.as_slice().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// Sends a request; returns the reply's error (0 or a positive errno) and body.
    fn call(fs: &StoreFs, op: u32, node: u64, body: &[u8]) -> (i32, Vec<u8>) {
        call_room(fs, op, node, body, 1 << 21)
    }

    fn call_room(fs: &StoreFs, op: u32, node: u64, body: &[u8], room: usize) -> (i32, Vec<u8>) {
        let r = fs.handle(&req(op, node, body), room).expect("a reply");
        let (h, rest) = read_struct::<OutHeader>(&r).unwrap();
        assert_eq!(h.len as usize, r.len());
        assert_eq!(h.unique, 0x1234);
        assert!(r.len() <= room);
        if h.error != 0 {
            assert_eq!(rest.len(), 0);
        }
        (-h.error, rest.to_vec())
    }

    fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
        [a, b].concat()
    }

    fn name(s: &str) -> Vec<u8> {
        cat(s.as_bytes(), &[0])
    }

    fn init(fs: &StoreFs, flags: u32) -> InitOut {
        let i = InitIn {
            major: 7,
            minor: 41,
            max_readahead: 128 << 10,
            flags,
            ..Default::default()
        };
        let (e, b) = call(fs, INIT, 0, i.as_slice());
        assert_eq!(e, 0);
        read_struct::<InitOut>(&b).unwrap().0
    }

    fn lookup(fs: &StoreFs, parent: u64, n: &str) -> Result<EntryOut, i32> {
        let (e, b) = call(fs, LOOKUP, parent, &name(n));
        if e != 0 {
            return Err(e);
        }
        assert_eq!(b.len(), size_of::<EntryOut>());
        Ok(read_struct::<EntryOut>(&b).unwrap().0)
    }

    fn getattr(fs: &StoreFs, node: u64) -> Result<Attr, i32> {
        let (e, b) = call(fs, GETATTR, node, GetattrIn::default().as_slice());
        if e != 0 {
            return Err(e);
        }
        Ok(read_struct::<AttrOut>(&b).unwrap().0.attr)
    }

    fn open(fs: &StoreFs, op: u32, node: u64, flags: i32) -> Result<OpenOut, i32> {
        let o = OpenIn {
            flags: flags as u32,
            open_flags: 0,
        };
        let (e, b) = call(fs, op, node, o.as_slice());
        if e != 0 {
            return Err(e);
        }
        Ok(read_struct::<OpenOut>(&b).unwrap().0)
    }

    fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
        ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        }
        .as_slice()
        .to_vec()
    }

    fn read(fs: &StoreFs, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        match call(fs, READ, 0, &read_in(fh, offset, size)) {
            (0, b) => Ok(b),
            (e, _) => Err(e),
        }
    }

    fn path_of(fs: &StoreFs, path: &str) -> EntryOut {
        let mut e = EntryOut {
            nodeid: ROOT_ID,
            ..Default::default()
        };
        for c in path.split('/') {
            e = lookup(fs, e.nodeid, c).unwrap();
        }
        e
    }

    /// Parses a READDIR(PLUS) body: (name, off, ino, typ, entry node id).
    fn parse_dir(mut b: &[u8], plus: bool) -> Vec<(String, u64, u64, u32, u64)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let mut nodeid = 0;
            if plus {
                let (e, rest) = read_struct::<EntryOut>(b).unwrap();
                nodeid = e.nodeid;
                if nodeid != 0 {
                    assert_eq!(e.entry_valid, TIMEOUT_SECS);
                }
                b = rest;
            }
            let (d, rest) = read_struct::<Dirent>(b).unwrap();
            let n = String::from_utf8(rest[..d.namelen as usize].to_vec()).unwrap();
            let header = if plus { 152 } else { 24 };
            let rec = dirent_size(header, d.namelen as usize) - size_of::<Dirent>();
            let rec = if plus {
                rec - size_of::<EntryOut>()
            } else {
                rec
            };
            b = &rest[rec..];
            out.push((n, d.off, d.ino, d.typ, nodeid));
        }
        out
    }

    #[test]
    fn storefs_new_errors() {
        assert!(StoreFs::new(Path::new("/nonexistent/nixvm-storefs")).is_err());
        let t = tree();
        assert!(StoreFs::new(&t.0.join("hello.txt")).is_err());
    }

    #[test]
    fn storefs_init_negotiates() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        let all = u32::MAX;
        let o = init(&fs, all);
        assert_eq!((o.major, o.minor), (7, 38));
        assert_eq!(
            o.flags,
            ASYNC_READ
                | DO_READDIRPLUS
                | READDIRPLUS_AUTO
                | PARALLEL_DIROPS
                | MAX_PAGES
                | CACHE_SYMLINKS
        );
        assert_eq!(o.max_pages, 256);
        assert_eq!(o.max_readahead, 128 << 10);
        // Only flags the guest offered.
        let o = init(&fs, DO_READDIRPLUS | INIT_EXT | (1 << 31));
        assert_eq!(o.flags, DO_READDIRPLUS);
        assert_eq!(o.max_pages, 0);
        // An older minor is echoed; a 16-byte (pre-7.36) body is fine.
        let old = [7u32, 31, 65536, MAX_PAGES];
        let body: Vec<u8> = old.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (e, b) = call(&fs, INIT, 0, &body);
        assert_eq!(e, 0);
        let o = read_struct::<InitOut>(&b).unwrap().0;
        assert_eq!((o.major, o.minor, o.flags), (7, 31, MAX_PAGES));
        // Too old, too short, a newer major.
        let body: Vec<u8> = [7u32, 8, 0, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(call(&fs, INIT, 0, &body).0, libc::EPROTO);
        assert_eq!(call(&fs, INIT, 0, &body[..8]).0, libc::EINVAL);
        let body: Vec<u8> = [8u32, 0, 0, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let (e, b) = call(&fs, INIT, 0, &body);
        assert_eq!(e, 0);
        assert_eq!(read_struct::<InitOut>(&b).unwrap().0.major, 7);
    }

    #[test]
    fn storefs_reads_into_the_callers_buffers() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        let e = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        let o = open(&fs, OPEN, e.nodeid, libc::O_RDONLY).unwrap();
        let placed = std::cell::RefCell::new(Vec::new());
        let mut into = |f: &File, off: u64, len: usize| {
            let mut b = vec![0u8; len];
            let n = f.read_at(&mut b, off)?;
            *placed.borrow_mut() = b[..n].to_vec();
            Ok(n)
        };
        // Only the header comes back; its len counts the data the callback placed.
        let r = fs
            .handle_into(&req(READ, 0, &read_in(o.fh, 6, 100)), 16 + 3, &mut into)
            .unwrap();
        let (h, rest) = read_struct::<OutHeader>(&r).unwrap();
        assert_eq!(
            (h.len, h.error, h.unique, rest.len()),
            (16 + 3, 0, 0x1234, 0)
        );
        assert_eq!(*placed.borrow(), b"wor");
        // Errors are whole replies; other opcodes are answered as by handle().
        let r = fs
            .handle_into(&req(READ, 0, &read_in(999, 0, 10)), 4096, &mut into)
            .unwrap();
        let (h, _) = read_struct::<OutHeader>(&r).unwrap();
        assert_eq!((h.len, h.error), (16, -libc::EBADF));
        let r = fs
            .handle_into(&req(GETATTR, ROOT_ID, &[0u8; 16]), 4096, &mut into)
            .unwrap();
        assert_eq!(
            r,
            fs.handle(&req(GETATTR, ROOT_ID, &[0u8; 16]), 4096).unwrap()
        );
    }

    #[test]
    fn storefs_lookup_getattr_read() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        let root = getattr(&fs, ROOT_ID).unwrap();
        assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);
        let e = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        assert!(e.nodeid > ROOT_ID);
        assert_eq!(e.entry_valid, TIMEOUT_SECS);
        assert_eq!(e.attr_valid, TIMEOUT_SECS);
        assert_eq!(e.attr.size, 12);
        assert_eq!(e.attr.mode, libc::S_IFREG | 0o644);
        // The same host inode, the same node id.
        assert_eq!(lookup(&fs, ROOT_ID, "hello.txt").unwrap().nodeid, e.nodeid);
        assert_eq!(getattr(&fs, e.nodeid).unwrap(), e.attr);
        let x = path_of(&fs, "bin/run.sh");
        assert_eq!(x.attr.mode, libc::S_IFREG | 0o755);
        let d = path_of(&fs, "a/b/c/deep.txt");
        assert_eq!(d.attr.size, 4);
        assert_eq!(lookup(&fs, ROOT_ID, "nope").unwrap_err(), libc::ENOENT);
        assert_eq!(lookup(&fs, e.nodeid, "x").unwrap_err(), libc::ENOTDIR);

        let o = open(&fs, OPEN, e.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(o.open_flags, FOPEN_KEEP_CACHE);
        assert_eq!(read(&fs, o.fh, 0, 4096).unwrap(), b"hello world\n");
        assert_eq!(read(&fs, o.fh, 6, 3).unwrap(), b"wor");
        assert_eq!(read(&fs, o.fh, 100, 10).unwrap(), b"");
        let f = FlushIn {
            fh: o.fh,
            ..Default::default()
        };
        assert_eq!(call(&fs, FLUSH, e.nodeid, f.as_slice()).0, 0);
        let r = ReleaseIn {
            fh: o.fh,
            ..Default::default()
        };
        assert_eq!(call(&fs, RELEASE, e.nodeid, r.as_slice()).0, 0);
        assert_eq!(read(&fs, o.fh, 0, 10).unwrap_err(), libc::EBADF);
        assert_eq!(call(&fs, RELEASE, e.nodeid, r.as_slice()).0, libc::EBADF);
        assert_eq!(call(&fs, FLUSH, e.nodeid, f.as_slice()).0, libc::EBADF);

        // The big file: a read is bounded by the request, the room and MAX_TRANSFER.
        let big = lookup(&fs, ROOT_ID, "big.bin").unwrap();
        assert_eq!(big.attr.size, BIG as u64);
        let o = open(&fs, OPEN, big.nodeid, libc::O_RDONLY).unwrap();
        let b = read(&fs, o.fh, 1000, 1 << 20).unwrap();
        assert_eq!(b.len(), 1 << 20);
        assert!(
            b.iter()
                .enumerate()
                .all(|(i, &v)| v == ((i + 1000) % 251) as u8)
        );
        let b = read(&fs, o.fh, 0, u32::MAX).unwrap();
        assert_eq!(b.len(), MAX_TRANSFER);
        let (e2, b) = call_room(&fs, READ, 0, &read_in(o.fh, 0, 1 << 20), 16 + 100);
        assert_eq!((e2, b.len()), (0, 100));
        let b = read(&fs, o.fh, BIG as u64 - 10, 4096).unwrap();
        assert_eq!(b.len(), 10);
        assert_eq!(
            read(&fs, o.fh, u64::MAX - 1, 4096).unwrap_err(),
            libc::EINVAL
        );
    }

    #[test]
    fn storefs_readlink_and_symlinks_stay_inside() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        for (n, target) in [
            ("link", "hello.txt"),
            ("escape", "/etc"),
            ("up", "../../../.."),
        ] {
            let e = lookup(&fs, ROOT_ID, n).unwrap();
            assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{n}");
            let (err, b) = call(&fs, READLINK, e.nodeid, &[]);
            assert_eq!((err, b.as_slice()), (0, target.as_bytes()));
            // Nothing reads through the symlink.
            assert_eq!(lookup(&fs, e.nodeid, "passwd").unwrap_err(), libc::ENOTDIR);
            assert_eq!(lookup(&fs, e.nodeid, "hosts").unwrap_err(), libc::ENOTDIR);
            assert_eq!(
                open(&fs, OPEN, e.nodeid, libc::O_RDONLY).unwrap_err(),
                libc::ELOOP
            );
            assert_eq!(
                open(&fs, OPENDIR, e.nodeid, libc::O_RDONLY).unwrap_err(),
                libc::ENOTDIR
            );
            assert_eq!(
                getattr(&fs, e.nodeid).unwrap().mode & libc::S_IFMT,
                libc::S_IFLNK
            );
        }
        let f = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        assert_eq!(call(&fs, READLINK, f.nodeid, &[]).0, libc::EINVAL);
        // Escaping names.
        for bad in ["..", ".", "/etc", "a/b", "../hello.txt", "", "/"] {
            assert_eq!(
                lookup(&fs, ROOT_ID, bad).unwrap_err(),
                libc::EINVAL,
                "{bad:?}"
            );
        }
        let c = path_of(&fs, "a/b/c");
        assert_eq!(lookup(&fs, c.nodeid, "..").unwrap_err(), libc::EINVAL);
        assert_eq!(lookup(&fs, ROOT_ID, "etc").unwrap_err(), libc::ENOENT);
        assert_eq!(
            lookup(&fs, ROOT_ID, &"x".repeat(256)).unwrap_err(),
            libc::ENAMETOOLONG
        );
        // No NUL.
        assert_eq!(call(&fs, LOOKUP, ROOT_ID, b"hello.txt").0, libc::EINVAL);
        assert_eq!(call(&fs, LOOKUP, ROOT_ID, b"").0, libc::EINVAL);
    }

    #[test]
    fn storefs_readdir_and_readdirplus_across_calls() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        let many = lookup(&fs, ROOT_ID, "many").unwrap();
        for plus in [false, true] {
            let op = if plus { READDIRPLUS } else { READDIR };
            let o = open(
                &fs,
                OPENDIR,
                many.nodeid,
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
            .unwrap();
            let mut all = Vec::new();
            let mut off = 0;
            let mut calls = 0;
            loop {
                let (e, b) = call(&fs, op, many.nodeid, &read_in(o.fh, off, 1024));
                assert_eq!(e, 0);
                assert!(b.len() <= 1024);
                let got = parse_dir(&b, plus);
                if got.is_empty() {
                    break;
                }
                calls += 1;
                off = got.last().unwrap().1;
                all.extend(got);
            }
            assert!(calls >= 2, "{calls}");
            let mut names: Vec<_> = all.iter().map(|e| e.0.clone()).collect();
            assert_eq!(&names[..2], [".", ".."]);
            names.sort();
            names.dedup();
            assert_eq!(names.len(), 52);
            for (n, _, ino, typ, nodeid) in &all {
                if n.starts_with("file-") {
                    assert_eq!(*typ, u32::from(libc::DT_REG));
                    let e = lookup(&fs, many.nodeid, n).unwrap();
                    assert_eq!(*ino, e.attr.ino);
                    if plus {
                        assert_eq!(*nodeid, e.nodeid);
                    }
                } else {
                    assert_eq!(*typ, u32::from(libc::DT_DIR));
                    assert_eq!(*nodeid, 0);
                }
            }
            let r = ReleaseIn {
                fh: o.fh,
                ..Default::default()
            };
            assert_eq!(call(&fs, RELEASE, 0, r.as_slice()).0, libc::EBADF);
            assert_eq!(call(&fs, RELEASEDIR, 0, r.as_slice()).0, 0);
            assert_eq!(call(&fs, op, 0, &read_in(o.fh, 0, 4096)).0, libc::EBADF);
        }
        // The root lists its entries with types; a too-small buffer gives nothing.
        let o = open(&fs, OPENDIR, ROOT_ID, libc::O_RDONLY).unwrap();
        let (e, b) = call(&fs, READDIR, ROOT_ID, &read_in(o.fh, 0, 1 << 16));
        assert_eq!(e, 0);
        let got = parse_dir(&b, false);
        let find = |n: &str| got.iter().find(|e| e.0 == n).unwrap().3;
        assert_eq!(find("link"), u32::from(libc::DT_LNK));
        assert_eq!(find("a"), u32::from(libc::DT_DIR));
        assert_eq!(find("big.bin"), u32::from(libc::DT_REG));
        let (e, b) = call(&fs, READDIR, ROOT_ID, &read_in(o.fh, 0, 10));
        assert_eq!((e, b.len()), (0, 0));
        let (e, b) = call(&fs, READDIRPLUS, ROOT_ID, &read_in(o.fh, u64::MAX, 4096));
        assert_eq!((e, b.len()), (0, 0));
        // A file handle is not a directory handle, and the other way round.
        let f = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        assert_eq!(open(&fs, OPENDIR, f.nodeid, 0).unwrap_err(), libc::ENOTDIR);
        assert_eq!(open(&fs, OPEN, ROOT_ID, 0).unwrap_err(), libc::EISDIR);
        let fo = open(&fs, OPEN, f.nodeid, 0).unwrap();
        assert_eq!(
            call(&fs, READDIR, 0, &read_in(fo.fh, 0, 4096)).0,
            libc::ENOTDIR
        );
        assert_eq!(read(&fs, o.fh, 0, 10).unwrap_err(), libc::EISDIR);
    }

    #[test]
    fn storefs_new_host_files_appear() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        assert_eq!(lookup(&fs, ROOT_ID, "later").unwrap_err(), libc::ENOENT);
        let empty = lookup(&fs, ROOT_ID, "empty").unwrap();
        let o = open(&fs, OPENDIR, empty.nodeid, 0).unwrap();
        let (_, b) = call(&fs, READDIR, 0, &read_in(o.fh, 0, 4096));
        assert_eq!(parse_dir(&b, false).len(), 2);
        std::fs::write(t.0.join("later"), b"new").unwrap();
        std::fs::write(t.0.join("empty/new"), b"new").unwrap();
        assert_eq!(lookup(&fs, ROOT_ID, "later").unwrap().attr.size, 3);
        // A rewind (offset 0) lists again.
        let (_, b) = call(&fs, READDIR, 0, &read_in(o.fh, 0, 4096));
        assert_eq!(parse_dir(&b, false).len(), 3);
    }

    #[test]
    fn storefs_forget_drops_nodes() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        let e = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        let forget =
            |node, n: u64| fs.handle(&req(FORGET, node, ForgetIn { nlookup: n }.as_slice()), 4096);
        assert_eq!(forget(e.nodeid, 1), None);
        assert!(getattr(&fs, e.nodeid).is_ok());
        assert_eq!(forget(e.nodeid, 1), None);
        assert_eq!(getattr(&fs, e.nodeid).unwrap_err(), libc::EBADF);
        assert_eq!(call(&fs, READLINK, e.nodeid, &[]).0, libc::EBADF);
        assert_eq!(lookup(&fs, e.nodeid, "x").unwrap_err(), libc::EBADF);
        // Forgetting unknown nodes, the root, or with a bad length: no reply, no harm.
        assert_eq!(forget(999, 1), None);
        assert_eq!(forget(ROOT_ID, 100), None);
        assert_eq!(fs.handle(&req(FORGET, 5, &[1, 2]), 4096), None);
        let mut bad = req(FORGET, 5, &[0; 8]);
        bad[0] = 200;
        assert_eq!(fs.handle(&bad, 4096), None);
        assert!(getattr(&fs, ROOT_ID).is_ok());
        // A looked-up-again file gets a new node id.
        let e2 = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        assert_ne!(e2.nodeid, e.nodeid);

        // A child keeps its forgotten parent alive until it goes too.
        let c = path_of(&fs, "a/b/c");
        let deep = lookup(&fs, c.nodeid, "deep.txt").unwrap();
        let a = lookup(&fs, ROOT_ID, "a").unwrap();
        let b = lookup(&fs, a.nodeid, "b").unwrap();
        let mut batch = BatchForgetIn { count: 3, dummy: 0 }.as_slice().to_vec();
        for (node, n) in [(a.nodeid, 2), (b.nodeid, 2), (c.nodeid, 1)] {
            batch.extend_from_slice(
                ForgetOne {
                    nodeid: node,
                    nlookup: n,
                }
                .as_slice(),
            );
        }
        assert_eq!(fs.handle(&req(BATCH_FORGET, 0, &batch), 4096), None);
        assert!(getattr(&fs, a.nodeid).is_ok());
        assert_eq!(getattr(&fs, deep.nodeid).unwrap().size, 4);
        // A batch whose count does not fit is ignored as a whole.
        let mut huge = BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        }
        .as_slice()
        .to_vec();
        huge.extend_from_slice(
            ForgetOne {
                nodeid: deep.nodeid,
                nlookup: 1,
            }
            .as_slice(),
        );
        assert_eq!(fs.handle(&req(BATCH_FORGET, 0, &huge), 4096), None);
        assert!(getattr(&fs, deep.nodeid).is_ok());
        forget(deep.nodeid, 1);
        for n in [deep.nodeid, c.nodeid, b.nodeid, a.nodeid] {
            assert_eq!(getattr(&fs, n).unwrap_err(), libc::EBADF);
        }
        assert!(
            lock(&fs.inodes)
                .nodes
                .values()
                .all(|n| n.name.as_bytes() == b"hello.txt")
        );
    }

    #[test]
    fn storefs_bounded_fd_cache_reopens() {
        let t = tree();
        let fs = StoreFs::with_max_cached_fds(&t.0, 2).unwrap();
        init(&fs, u32::MAX);
        let deep = path_of(&fs, "a/b/c/deep.txt");
        let many = lookup(&fs, ROOT_ID, "many").unwrap();
        let files: Vec<_> = (0..20)
            .map(|i| lookup(&fs, many.nodeid, &format!("file-{i:03}")).unwrap())
            .collect();
        assert!(lock(&fs.inodes).lru.len() <= 2);
        let open_fds = lock(&fs.inodes)
            .nodes
            .values()
            .filter(|n| n.fd.is_some())
            .count();
        assert!(open_fds <= 2);
        // Evicted nodes are reopened through their parents.
        assert_eq!(getattr(&fs, deep.nodeid).unwrap().size, 4);
        let o = open(&fs, OPEN, deep.nodeid, 0).unwrap();
        assert_eq!(read(&fs, o.fh, 0, 100).unwrap(), b"deep");
        for f in &files {
            assert_eq!(getattr(&fs, f.nodeid).unwrap().ino, f.attr.ino);
        }
        assert_eq!(
            lookup(&fs, deep.nodeid - 1, "deep.txt").unwrap().nodeid,
            deep.nodeid
        );
        // A node replaced on the host is stale, not silently another file.
        std::fs::remove_file(t.0.join("a/b/c/deep.txt")).unwrap();
        std::fs::write(t.0.join("a/b/c/deep.txt"), b"other").unwrap();
        for f in &files {
            getattr(&fs, f.nodeid).unwrap();
        }
        assert_eq!(getattr(&fs, deep.nodeid).unwrap_err(), libc::ESTALE);
    }

    #[test]
    fn storefs_read_only_answers() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        let f = lookup(&fs, ROOT_ID, "hello.txt").unwrap();
        for flags in [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_TRUNC,
            libc::O_CREAT,
        ] {
            assert_eq!(open(&fs, OPEN, f.nodeid, flags).unwrap_err(), libc::EROFS);
        }
        assert_eq!(
            open(&fs, OPENDIR, ROOT_ID, libc::O_RDWR).unwrap_err(),
            libc::EROFS
        );
        for op in [
            SETATTR,
            SYMLINK,
            MKNOD,
            MKDIR,
            UNLINK,
            RMDIR,
            RENAME,
            RENAME2,
            LINK,
            WRITE,
            SETXATTR,
            REMOVEXATTR,
            CREATE,
            FALLOCATE,
            COPY_FILE_RANGE,
            TMPFILE,
        ] {
            assert_eq!(
                call(&fs, op, f.nodeid, &[0; 64]).0,
                libc::EROFS,
                "opcode {op}"
            );
        }
        for op in [FSYNC, FSYNCDIR, SYNCFS] {
            assert_eq!(call(&fs, op, f.nodeid, &[0; 16]).0, 0);
        }
        for op in [
            0,
            7,
            19,
            GETLK,
            SETLK,
            IOCTL,
            POLL,
            BMAP,
            STATX,
            53,
            4096,
            u32::MAX,
        ] {
            assert_eq!(
                call(&fs, op, f.nodeid, &[0; 64]).0,
                libc::ENOSYS,
                "opcode {op}"
            );
        }
        // ACCESS.
        let access = |node, mask: i32| {
            call(
                &fs,
                ACCESS,
                node,
                AccessIn {
                    mask: mask as u32,
                    padding: 0,
                }
                .as_slice(),
            )
            .0
        };
        assert_eq!(access(f.nodeid, libc::R_OK), 0);
        assert_eq!(access(f.nodeid, libc::F_OK), 0);
        assert_eq!(access(f.nodeid, libc::W_OK), libc::EROFS);
        assert_eq!(access(f.nodeid, libc::X_OK), libc::EACCES);
        let x = path_of(&fs, "bin/run.sh");
        assert_eq!(access(x.nodeid, libc::X_OK | libc::R_OK), 0);
        assert_eq!(access(ROOT_ID, libc::X_OK), 0);
        assert_eq!(access(ROOT_ID, libc::W_OK), libc::EROFS);
        assert_eq!(access(777, libc::R_OK), libc::EBADF);
        // xattrs.
        let g = cat(
            GetxattrIn {
                size: 100,
                padding: 0,
            }
            .as_slice(),
            b"user.x\0",
        );
        assert_eq!(call(&fs, GETXATTR, f.nodeid, &g).0, libc::ENOSYS);
        assert_eq!(call(&fs, GETXATTR, f.nodeid, &g[..10]).0, libc::EINVAL);
        assert_eq!(call(&fs, LISTXATTR, f.nodeid, &g[..8]).0, libc::ENOSYS);
        assert_eq!(call(&fs, LISTXATTR, f.nodeid, &g[..4]).0, libc::EINVAL);
        // STATFS.
        let (e, b) = call(&fs, STATFS, ROOT_ID, &[]);
        assert_eq!(e, 0);
        let s = read_struct::<StatfsOut>(&b).unwrap().0;
        assert!(s.st.bsize > 0 && s.st.namelen > 0);
        // DESTROY forgets everything.
        assert_eq!(call(&fs, DESTROY, 0, &[]).0, 0);
        assert_eq!(getattr(&fs, f.nodeid).unwrap_err(), libc::EBADF);
        assert!(getattr(&fs, ROOT_ID).is_ok());
    }

    #[test]
    fn storefs_lseek() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        init(&fs, u32::MAX);
        let s = lookup(&fs, ROOT_ID, "sparse").unwrap();
        let o = open(&fs, OPEN, s.nodeid, 0).unwrap();
        let seek = |fh, offset, whence: i32| {
            let l = LseekIn {
                fh,
                offset,
                whence: whence as u32,
                padding: 0,
            };
            match call(&fs, LSEEK, s.nodeid, l.as_slice()) {
                (0, b) => Ok(read_struct::<LseekOut>(&b).unwrap().0.offset),
                (e, _) => Err(e),
            }
        };
        assert_eq!(seek(o.fh, 0, libc::SEEK_DATA), Ok(0));
        let hole = seek(o.fh, 0, libc::SEEK_HOLE).unwrap();
        assert!((4096..=8 << 20).contains(&hole), "{hole}");
        assert_eq!(seek(o.fh, 9 << 20, libc::SEEK_DATA), Err(libc::ENXIO));
        assert_eq!(seek(o.fh, 0, libc::SEEK_END), Ok(8 << 20));
        assert_eq!(seek(o.fh, 0, libc::SEEK_CUR), Err(libc::EINVAL));
        assert_eq!(seek(o.fh, 0, 99), Err(libc::EINVAL));
        assert_eq!(seek(o.fh, u64::MAX, libc::SEEK_SET), Err(libc::EINVAL));
        assert_eq!(seek(12345, 0, libc::SEEK_DATA), Err(libc::EBADF));
        let d = open(&fs, OPENDIR, ROOT_ID, 0).unwrap();
        assert_eq!(seek(d.fh, 0, libc::SEEK_DATA), Err(libc::EBADF));
    }

    #[test]
    fn storefs_concurrent_requests() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<StoreFs>();
        let t = tree();
        let fs = StoreFs::with_max_cached_fds(&t.0, 3).unwrap();
        init(&fs, u32::MAX);
        let many = lookup(&fs, ROOT_ID, "many").unwrap();
        std::thread::scope(|s| {
            for th in 0..4u64 {
                let fs = &fs;
                s.spawn(move || {
                    for round in 0..30u64 {
                        let i = (th * 7 + round) % 50;
                        let e = lookup(fs, many.nodeid, &format!("file-{i:03}")).unwrap();
                        let o = open(fs, OPEN, e.nodeid, 0).unwrap();
                        assert_eq!(read(fs, o.fh, 0, 10).unwrap(), b"x");
                        let r = ReleaseIn {
                            fh: o.fh,
                            ..Default::default()
                        };
                        assert_eq!(call(fs, RELEASE, 0, r.as_slice()).0, 0);
                        let d = path_of(fs, "a/b/c/deep.txt");
                        assert_eq!(getattr(fs, d.nodeid).unwrap().size, 4);
                        for n in [d.nodeid, e.nodeid] {
                            let f = ForgetIn { nlookup: 1 };
                            assert_eq!(fs.handle(&req(FORGET, n, f.as_slice()), 4096), None);
                        }
                    }
                });
            }
        });
        // a, b and c were looked up 120 times each and never forgotten; the rest is gone.
        let inodes = lock(&fs.inodes);
        let mut left: Vec<_> = inodes.nodes.values().map(|n| n.name.clone()).collect();
        left.sort();
        assert_eq!(
            left,
            [
                c"a".to_owned(),
                c"b".to_owned(),
                c"c".to_owned(),
                c"many".to_owned()
            ]
        );
        assert!(inodes.lru.len() <= 3);
    }

    #[test]
    fn storefs_malformed_requests() {
        let t = tree();
        let fs = StoreFs::new(&t.0).unwrap();
        // Shorter than a header: EINVAL with unique 0.
        for n in [0, 1, 39] {
            let r = fs.handle(&vec![0xff; n], 4096).unwrap();
            let h = read_struct::<OutHeader>(&r).unwrap().0;
            assert_eq!((h.len, h.error, h.unique), (16, -libc::EINVAL, 0));
        }
        // len disagreeing with the bytes, both ways.
        for len in [0u32, 39, 41, 1000, u32::MAX] {
            let mut r = req(GETATTR, ROOT_ID, &[0; 16]);
            r[..4].copy_from_slice(&len.to_le_bytes());
            let out = fs.handle(&r, 4096).unwrap();
            let h = read_struct::<OutHeader>(&out).unwrap().0;
            assert_eq!((h.error, h.unique), (-libc::EINVAL, 0x1234), "len {len}");
        }
        // Short bodies.
        for op in [
            OPEN,
            OPENDIR,
            READ,
            READDIR,
            READDIRPLUS,
            RELEASE,
            RELEASEDIR,
            ACCESS,
            FLUSH,
            LSEEK,
        ] {
            assert_eq!(
                call(&fs, op, ROOT_ID, &[0; 7]).0,
                libc::EINVAL,
                "opcode {op}"
            );
        }
        // Unknown nodes and handles.
        assert_eq!(getattr(&fs, 0).unwrap_err(), libc::EBADF);
        assert_eq!(getattr(&fs, u64::MAX).unwrap_err(), libc::EBADF);
        assert_eq!(lookup(&fs, 424242, "hello.txt").unwrap_err(), libc::EBADF);
        assert_eq!(open(&fs, OPEN, 424242, 0).unwrap_err(), libc::EBADF);
        assert_eq!(read(&fs, 0, 0, 10).unwrap_err(), libc::EBADF);
        assert_eq!(read(&fs, u64::MAX, 0, u32::MAX).unwrap_err(), libc::EBADF);
        // A reply that does not fit the room: ERANGE; no room at all: still a header.
        let (e, _) = call_room(&fs, GETATTR, ROOT_ID, &[0; 16], 16 + 50);
        assert_eq!(e, libc::ERANGE);
        let r = fs.handle(&req(GETATTR, ROOT_ID, &[0; 16]), 0).unwrap();
        assert_eq!(r.len(), 16);
        // Random garbage never panics.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            let mut buf: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if buf.len() >= 40 {
                buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
                buf[4..8].copy_from_slice(&(((x >> 8) % 56) as u32).to_le_bytes());
                buf[16..24].copy_from_slice(&((x >> 20) % 4).to_le_bytes());
            }
            let _ = fs.handle(&buf, (x % 8192) as usize);
        }
    }
}
