//! `nixvm storefs --socket PATH --path DIR`: nixvm's own read-only virtio-fs back end, a
//! vhost-user daemon (the `vhost-user-backend` crate) serving DIR with
//! [`StoreFs`]. It runs as its own process, so that a bug in file
//! serving cannot take a VMM with it; `nixvm --fs tag=T,socket=PATH` connects to it as it
//! does to virtiofsd, and `nixvm --fs tag=T,path=DIR,readonly=on` starts one itself
//! ([`spawn`]) on a listening socket it hands over (`--listen-fd`), so no socket is left
//! for anyone to manage. The high-priority queue and each request queue have a thread.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use nixvm_devices::virtio::buffers::{self, ChainBuffers, GuestIovecs, total};
use nixvm_devices::virtio::fuse::OutHeader;
use nixvm_devices::virtio::queue;

use crate::StoreFs;
use nixvm_devices::virtio::{F_EVENT_IDX, F_VERSION_1};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

/// Guest memory as the back end maps it from the frontend's table: vhost-user-backend's
/// type, without the dirty bitmap nixvm's own guest memory has (vhost-user-backend needs a
/// bitmap it can replace, which vm-memory's AtomicBitmap is not).
type BackendMemory = GuestMemoryAtomic<GuestMemoryMmap>;

const QUEUE_SIZE: usize = 1024;
/// The most of a request that is read from the guest.
const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: crate::Error,
    },
    #[error("vhost-user daemon on {socket}: {message}")]
    Daemon { socket: PathBuf, message: String },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sandbox the back end")]
    Sandbox(#[from] crate::sandbox::Error),
    #[error("--listen-fd {0} is not a listening socket")]
    ListenFd(RawFd),
    #[error("--queues {0} must be from 1 to 16")]
    Queues(u16),
    #[error("cannot start nixvm storefs for {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the error is the caller's (exit status 2: nothing was served) rather than
    /// one met while serving.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Dir { .. } | Error::Listen { .. } | Error::ListenFd(_) | Error::Queues(_)
        )
    }
}

/// Where the daemon takes its one connection from.
#[derive(Debug)]
pub enum Listen {
    /// Bind a socket at this path (replacing a stale one).
    Socket(PathBuf),
    /// A listening socket inherited from the process that started it.
    Fd(RawFd),
}

/// What `nixvm storefs` is asked to do.
#[derive(Debug)]
pub struct Options {
    pub listen: Listen,
    pub dir: PathBuf,
    /// Request queues served (besides the high-priority queue), each by its own thread.
    pub request_queues: u16,
}

struct Backend {
    fs: StoreFs,
    /// The high-priority queue and the request queues.
    num_queues: usize,
    mem: std::sync::RwLock<BackendMemory>,
    exits: Vec<(EventConsumer, EventNotifier)>,
}

impl Backend {
    /// Serves every request waiting on `vring` ([`queue::for_each_chain`]). Each reply is
    /// signalled at once (as EVENT_IDX allows), not after the whole batch: the guest goes on
    /// with a read while its readahead is served. A queue the driver broke is not served
    /// again (the frontend's reset sets it up anew).
    fn serve(&self, vring: &VringRwLock) -> std::io::Result<()> {
        let mem: GuestMemoryLoadGuard<GuestMemoryMmap> =
            self.mem.read().unwrap_or_else(|e| e.into_inner()).memory();
        let mut state = vring.get_mut();
        // The call notifier and the queue sit in the same state; the queue is borrowed
        // mutably below. A second handle on the notifier's descriptor (not a dup: two system
        // calls per kick saved) that never closes it.
        let call = state.get_call().as_ref().map(|c| {
            // SAFETY: the descriptor belongs to the notifier in `state`, whose write guard
            // is held until this function returns, so it stays open and unchanged while
            // this handle exists; ManuallyDrop keeps the handle from closing it.
            std::mem::ManuallyDrop::new(unsafe { EventNotifier::from_raw_fd(c.as_raw_fd()) })
        });
        let queue = state.get_queue_mut();
        let mut signal_err = None;
        let served = queue::for_each_chain(queue, &*mem, |q, chain| {
            let head = chain.head_index();
            let len = self.answer(chain, &mem);
            if q.add_used(&*mem, head, len).is_err() {
                nixvm_devices::guest_warn!("storefs: cannot complete descriptor {head}");
            }
            if q.needs_notification(&*mem).unwrap_or(true) {
                if let Some(Err(e)) = call.as_ref().map(|c| c.notify()) {
                    signal_err.get_or_insert(e);
                }
            }
            std::ops::ControlFlow::Continue(())
        });
        if let Err(e) = served {
            nixvm_devices::guest_warn!("storefs: a queue is broken ({e}); it is no longer served");
            queue.set_ready(false);
        }
        signal_err.map_or(Ok(()), Err)
    }

    /// One FUSE request: the readable part in, the reply into the writable part.
    fn answer<M>(&self, chain: virtio_queue::DescriptorChain<M>, mem: &GuestMemoryMmap) -> u32
    where
        M: std::ops::Deref<Target = GuestMemoryMmap>,
    {
        let bufs = ChainBuffers::of(chain);
        let out = bufs.writable;
        // Requests are small (a header and a name or two): a guest's length beyond
        // MAX_REQUEST is not read, and the server sees a malformed request.
        let mut request = vec![0u8; total(&bufs.readable).min(MAX_REQUEST)];
        if !buffers::gather(mem, &bufs.readable, &mut request) {
            return 0;
        }
        let room = total(&out);
        // File data goes from the file straight into the guest's buffers.
        let mut read_into = |file: &std::fs::File, offset: u64, len: usize| {
            read_into_guest(mem, &out, OUT_HEADER, file, offset, len)
        };
        let Some(reply) = self.fs.handle_into(&request, room, &mut read_into) else {
            return 0;
        };
        if !buffers::scatter(mem, &out, &reply) {
            return 0;
        }
        // The header's `len` is what the guest gets: the reply's bytes, and for a READ also
        // the data already placed after the header.
        let said = reply
            .get(..4)
            .map_or(0, |l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]));
        said.min(u32::try_from(room).unwrap_or(u32::MAX))
    }
}

/// The size of a FUSE reply header.
const OUT_HEADER: usize = size_of::<OutHeader>();

/// Reads up to `len` bytes of `file` at `offset` into the guest buffers `out`, after their
/// first `skip` bytes; returns how many it read (fewer at the end of the file).
fn read_into_guest(
    mem: &GuestMemoryMmap,
    out: &[buffers::Segment],
    skip: usize,
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> std::io::Result<usize> {
    let outside = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let (_, after) = buffers::split(out, skip).ok_or_else(outside)?;
    let segs = buffers::split(&after, len.min(total(&after)))
        .ok_or_else(outside)?
        .0;
    GuestIovecs::new(mem, &segs)?.transfer(file, offset, false)
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }
    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }
    fn set_event_idx(&self, _enabled: bool) {
        // The vrings' queues know it (the daemon sets it on them): queue::for_each_chain
        // follows whichever protocol was negotiated.
    }
    fn update_memory(&self, mem: BackendMemory) -> std::io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }
    /// One thread per queue: a long read on a request queue does not hold up FORGETs, and
    /// a guest that spreads requests over the queues (Linux 6.11 and later) gets them served
    /// in parallel.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|i| 1 << i).collect()
    }
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(v) => self.serve(v),
            None => Ok(()),
        }
    }
}

/// Serves `opts.dir` on the one connection it accepts, until the VMM disconnects.
pub fn run(opts: &Options) -> Result<(), Error> {
    let socket = match &opts.listen {
        Listen::Socket(p) => p.clone(),
        Listen::Fd(fd) => PathBuf::from(format!("fd {fd}")),
    };
    let daemon_err = |message: String| Error::Daemon {
        socket: socket.clone(),
        message,
    };
    if !(1..=nixvm_devices::virtio::fs::MAX_REQUEST_QUEUES).contains(&opts.request_queues) {
        return Err(Error::Queues(opts.request_queues));
    }
    let num_queues = 1 + usize::from(opts.request_queues);
    let limit = raise_fd_limit();
    limit_memory();
    // Half the descriptors for cached nodes, the rest for the guest's open files.
    let cached = crate::DEFAULT_MAX_CACHED_FDS.min(limit / 2);
    let dir = &opts.dir;
    let fs = StoreFs::with_max_cached_fds(dir, cached).map_err(|source| Error::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let listener = match &opts.listen {
        Listen::Socket(p) => {
            let _ = std::fs::remove_file(p);
            UnixListener::bind(p).map_err(|source| Error::Listen {
                path: p.clone(),
                source,
            })?
        }
        Listen::Fd(fd) => inherited_listener(*fd)?,
    };
    let mut listener = vhost::vhost_user::Listener::from(listener);
    // Everything to open is open: from here on only reading under DIR. Both steps come
    // before any thread starts (a user namespace needs a single thread; Landlock binds the
    // threads started after it).
    let dir_fd = crate::sandbox::open_dir(dir)?;
    match crate::sandbox::mount_namespace(&dir_fd) {
        crate::sandbox::Namespace::Entered => {
            log::info!("storefs: in a mount namespace holding only /proc and the directory");
        }
        crate::sandbox::Namespace::Unavailable(why) => {
            log::info!("storefs: no mount namespace ({why}); relying on Landlock and seccomp");
        }
    }
    match crate::sandbox::landlock_read_only(&dir_fd) {
        Ok(crate::sandbox::Landlock::Enforced(abi)) => {
            log::info!(
                "storefs: Landlock (ABI {abi}): read-only, {}",
                dir.display()
            );
        }
        Ok(crate::sandbox::Landlock::Unsupported) => {
            log::info!("storefs: this kernel has no Landlock; relying on seccomp");
        }
        Err(e) => log::warn!("storefs: not sandboxed by Landlock: {e}"),
    }
    let exits = (0..num_queues)
        .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| daemon_err(e.to_string()))?;
    let backend = Arc::new(Backend {
        fs,
        num_queues,
        mem: std::sync::RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
        exits,
    });
    let mut daemon = VhostUserDaemon::new(
        "nixvm-storefs".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| daemon_err(e.to_string()))?;
    crate::sandbox::seccomp_backend()?;
    daemon
        .start(&mut listener)
        .map_err(|e| daemon_err(e.to_string()))?;
    // Connected: nobody else is to connect. (A --socket file stays: the sandbox can no
    // longer remove it; the next start replaces it.)
    drop(listener);
    let served = daemon.wait();
    backend.fs.log_served();
    for (_, n) in &backend.exits {
        let _ = n.notify();
    }
    use vhost::vhost_user::Error as Protocol;
    match served {
        Ok(()) => Ok(()),
        // The VMM hanging up is how a session ends.
        Err(vhost_user_backend::Error::HandleRequest(
            Protocol::Disconnected | Protocol::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(daemon_err(e.to_string())),
    }
}

/// Takes over the listening socket `fd` that the starting process left open for us.
fn inherited_listener(fd: RawFd) -> Result<UnixListener, Error> {
    let mut listening: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("4");
    // SAFETY: getsockopt writes at most `len` bytes into the valid `listening`; on a number
    // that is no socket it fails without touching anything.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut len,
        )
    };
    if r != 0 || listening == 0 {
        return Err(Error::ListenFd(fd));
    }
    // SAFETY: `fd` is an open listening socket (checked above) that this process was given
    // to own; nothing else in it uses that number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = set_cloexec(owned.as_raw_fd(), true);
    Ok(UnixListener::from(owned))
}

pub fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor number only read and set its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A helper process of a VM: a `nixvm storefs` serving one `--fs path=` share, or a passt
/// for a `--net passt` interface. Each ends by itself when the VM's connection closes;
/// dropping this kills it (it holds no data) and reaps it.
pub struct Process(Child);

impl From<Child> for Process {
    fn from(c: Child) -> Process {
        Process(c)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A path in a fresh directory only this user can enter (under $XDG_RUNTIME_DIR, else the
/// temporary directory), for a just-started back end's socket or pid file; both are removed
/// when this is dropped.
pub struct PrivatePath {
    dir: PathBuf,
    pub path: PathBuf,
}

impl PrivatePath {
    /// `name` in a new directory `nixvm-WHAT.PID.N`.
    pub fn new(what: &str, name: &str) -> std::io::Result<PrivatePath> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let mut n = 0u32;
        loop {
            let d = base.join(format!("nixvm-{what}.{}.{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&d) {
                Ok(()) => {
                    return Ok(PrivatePath {
                        path: d.join(name),
                        dir: d,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for PrivatePath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Starts `nixvm storefs` (this same executable) serving `dir` read-only on a fresh
/// listening socket; connect to the returned socket, then drop it.
pub fn spawn(dir: &Path, request_queues: u16) -> Result<(Process, PrivatePath), Error> {
    let spawn_err = |source| Error::Spawn {
        path: dir.to_owned(),
        source,
    };
    let socket = PrivatePath::new("storefs", "sock").map_err(spawn_err)?;
    let listener = UnixListener::bind(&socket.path).map_err(|source| Error::Listen {
        path: socket.path.clone(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(spawn_err)?;
    let fd = listener.as_raw_fd();
    // The child inherits the listener by number. Nothing else spawns processes while a VM
    // is being built, so no other child can pick it up meanwhile.
    set_cloexec(fd, false).map_err(spawn_err)?;
    let child = Command::new(exe)
        .arg("storefs")
        .arg("--listen-fd")
        .arg(fd.to_string())
        .arg("--path")
        .arg(dir)
        .arg("--queues")
        .arg(request_queues.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(spawn_err)?;
    drop(listener);
    Ok((Process(child), socket))
}

/// The most private memory (heap, thread stacks) the back end may have: far more than it
/// needs (its caches are bounded: descriptors, listings), far less than a host has. The
/// guest memory it maps is shared and does not count.
pub const MAX_DATA: u64 = 1 << 30;

/// Caps the process's private memory (RLIMIT_DATA) at [`MAX_DATA`], so that a bug the guest
/// finds cannot make it take the host's memory: allocations past it fail (and the back end
/// dies) instead.
fn limit_memory() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_DATA, &mut r) != 0 {
            return;
        }
        let cap = MAX_DATA.min(r.rlim_max);
        r.rlim_cur = cap;
        r.rlim_max = cap;
        if libc::setrlimit(libc::RLIMIT_DATA, &r) != 0 {
            log::warn!(
                "storefs: cannot limit its memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one (the node cache and open handles want up to
/// `DEFAULT_MAX_CACHED_FDS + MAX_HANDLES` descriptors, more than the usual soft 1024); returns
/// the limit in force.
fn raise_fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the valid `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        } else {
            log::warn!(
                "storefs: cannot raise the open-file limit to {}",
                lim.rlim_max
            );
        }
    }
    let limit = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    log::info!("storefs: open-file limit {limit}");
    limit
}
