//! Dropping what a back-end process does not need, once it has opened what it serves: a
//! mount namespace whose root holds only the served directory and /proc, Landlock (the file
//! system becomes read-only and shrinks to one directory) and a seccomp allow-list of system
//! calls. The first two are best effort where the kernel or the host's policy lacks them
//! (unprivileged user namespaces, Landlock's LSM); all of them only ever take rights away.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nixvm_devices::seccomp::{self, Allow, READ_ONLY_OPEN, THREADS_ONLY, any, when};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {0} to sandbox its server")]
    Open(std::path::PathBuf, #[source] std::io::Error),
    #[error("Landlock: {0}")]
    Landlock(&'static str, #[source] std::io::Error),
    #[error("seccomp filter")]
    Seccomp(#[source] seccomp::Error),
}

/// What Landlock did.
#[derive(Debug, PartialEq, Eq)]
pub enum Landlock {
    /// In force, at this ABI version.
    Enforced(i64),
    /// This kernel has no Landlock (or it is disabled).
    Unsupported,
}

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;
const ACCESS_FS_READ_FILE: u64 = 1 << 2;
const ACCESS_FS_READ_DIR: u64 = 1 << 3;
/// EXECUTE .. MAKE_SYM: the rights of ABI 1.
const ACCESS_FS_V1: u64 = (1 << 13) - 1;
const ACCESS_FS_REFER: u64 = 1 << 13;
const ACCESS_FS_TRUNCATE: u64 = 1 << 14;
const ACCESS_FS_IOCTL_DEV: u64 = 1 << 15;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Restricts the calling thread, and the threads it starts from now on, to reading files and
/// listing directories under `dir` (an O_PATH descriptor of it): no writes anywhere,
/// nothing opened outside `dir` (descriptors already open keep working). Call it before
/// starting threads.
pub fn landlock_read_only(dir: &OwnedFd) -> Result<Landlock, Error> {
    let last_err = |what| Error::Landlock(what, std::io::Error::last_os_error());
    // SAFETY: the version query takes no attribute (null, size 0) and returns a number.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if abi < 1 {
        return Ok(Landlock::Unsupported);
    }
    let mut handled = ACCESS_FS_V1;
    if abi >= 2 {
        handled |= ACCESS_FS_REFER;
    }
    if abi >= 3 {
        handled |= ACCESS_FS_TRUNCATE;
    }
    if abi >= 5 {
        handled |= ACCESS_FS_IOCTL_DEV;
    }
    let attr = RulesetAttr {
        handled_access_fs: handled,
    };
    // SAFETY: `attr` is a valid ruleset attribute of the size passed; the call returns a new
    // descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &raw const attr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        )
    };
    if fd < 0 {
        return Err(last_err("create a ruleset"));
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| last_err("create a ruleset"))?;
    // SAFETY: `fd` is the new ruleset descriptor, owned by nobody else.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd) };
    let rule = PathBeneathAttr {
        allowed_access: (ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR) & handled,
        parent_fd: dir.as_raw_fd(),
    };
    // SAFETY: both descriptors are open; `rule` is a valid path-beneath attribute.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &raw const rule,
            0u32,
        )
    };
    if r != 0 {
        return Err(last_err("add the rule"));
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers; Landlock requires it unprivileged.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(last_err("set no_new_privs"));
    }
    // SAFETY: the ruleset descriptor is open; the call only restricts this thread.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) } != 0 {
        return Err(last_err("restrict this process"));
    }
    Ok(Landlock::Enforced(abi))
}

/// `dir` as an O_PATH descriptor, for [`landlock_read_only`] and [`mount_namespace`].
pub fn open_dir(dir: &Path) -> Result<OwnedFd, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| Error::Open(dir.to_owned(), e))?
        .into())
}

/// What the mount namespace step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Namespace {
    /// The process's root is now a tmpfs holding only `/proc` and the served directory.
    Entered,
    /// Not possible here (why). A failure after unshare leaves the process in namespaces of
    /// its own with the old root, which can only hide things, never grant any.
    Unavailable(String),
}

/// Moves the process into a mount namespace of its own (with a user namespace when not
/// root) whose root is a small tmpfs holding only /proc and `dir` (bound read-only), so that
/// nothing else of the host's file system is reachable by path. Descriptors stay valid.
/// The process must be single-threaded. Best effort: where user namespaces are not allowed,
/// nothing changes and it says why; a failure half-way leaves the process in its own
/// namespace with the old root, which only hides things.
pub fn mount_namespace(dir: &OwnedFd) -> Namespace {
    use std::ffi::CString;
    let fail = |what: &str| Namespace::Unavailable(format!("{what}: {}", io_last()));
    // DIR's path, read while still in the namespace it was opened in (afterwards the link
    // reads relative to that namespace's root, which may not be this process's root).
    let base = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let target = match std::fs::read_link(&base).map(|p| p.into_os_string().into_string()) {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return Namespace::Unavailable("the directory's path is not UTF-8".into()),
        Err(e) => return Namespace::Unavailable(format!("{base}: {e}")),
    };
    let target = target.as_str();
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let flags = if uid == 0 {
        libc::CLONE_NEWNS
    } else {
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS
    };
    // SAFETY: unshare takes flags; it fails (EINVAL) rather than misbehave if threads exist.
    if unsafe { libc::unshare(flags) } != 0 {
        return fail("unshare");
    }
    if uid != 0 {
        let maps = [
            ("/proc/self/setgroups", "deny".to_string()),
            ("/proc/self/uid_map", format!("{uid} {uid} 1")),
            ("/proc/self/gid_map", format!("{gid} {gid} 1")),
        ];
        for (file, text) in maps {
            if let Err(e) = std::fs::write(file, text) {
                return Namespace::Unavailable(format!("{file}: {e}"));
            }
        }
    }
    let c = |s: &str| CString::new(s).expect("no NUL");
    let mount =
        |src: Option<&str>, target: &str, fstype: Option<&str>, flags, data: Option<&str>| {
            let (src, target) = (src.map(c), c(target));
            let (fstype, data) = (fstype.map(c), data.map(c));
            let p = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
            // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
            let r = unsafe {
                libc::mount(p(&src), target.as_ptr(), p(&fstype), flags, p(&data).cast())
            };
            if r == 0 { Ok(()) } else { Err(io_last()) }
        };
    let step = |what: &str, r: std::io::Result<()>| {
        r.map_err(|e| Namespace::Unavailable(format!("{what}: {e}")))
    };
    let run = || -> Result<(), Namespace> {
        step(
            "make / private",
            mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None),
        )?;
        // DIR as this namespace sees it (descriptors opened before unshare name the old
        // namespace's mounts, which cannot be bound here), kept for the bind below.
        let here: OwnedFd = std::fs::File::open(target)
            .map_err(|e| Namespace::Unavailable(format!("{target}: {e}")))?
            .into();
        // The tmpfs goes over DIR's own path (it surely exists).
        let new_root = target;
        step(
            "mount a tmpfs root",
            mount(
                Some("nixvm-storefs"),
                new_root,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("size=64k,mode=0755"),
            ),
        )?;
        for d in ["proc", "dir"] {
            std::fs::create_dir(format!("{new_root}/{d}"))
                .map_err(|e| Namespace::Unavailable(format!("{new_root}/{d}: {e}")))?;
        }
        step(
            "bind the directory",
            mount(
                Some(&format!("/proc/self/fd/{}", here.as_raw_fd())),
                &format!("{new_root}/dir"),
                None,
                // Not recursive: the new root's tmpfs is itself mounted below DIR now.
                libc::MS_BIND,
                None,
            ),
        )?;
        // Read-only where the host's mount flags allow it (Landlock and seccomp stop writes
        // anyway).
        let _ = mount(
            None,
            &format!("{new_root}/dir"),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        );
        step(
            "bind /proc",
            mount(
                Some("/proc"),
                &format!("{new_root}/proc"),
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            ),
        )?;
        std::env::set_current_dir(new_root)
            .map_err(|e| Namespace::Unavailable(format!("chdir {new_root}: {e}")))?;
        let dot = c(".");
        // SAFETY: pivot_root takes two NUL-terminated paths; "." twice stacks the old root
        // under the new one, which is then detached.
        if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
            return Err(fail("pivot_root"));
        }
        // SAFETY: umount2 takes a NUL-terminated path and flags.
        if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(fail("detach the old root"));
        }
        std::env::set_current_dir("/")
            .map_err(|e| Namespace::Unavailable(format!("chdir /: {e}")))?;
        Ok(())
    };
    match run() {
        Ok(()) => Namespace::Entered,
        Err(n) => n,
    }
}

fn io_last() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// The system calls a vhost-user back end serving files read-only makes once it runs, beside
/// the runtime's (`seccomp::RUNTIME`): the vhost-user socket and eventfds, epoll, threads,
/// reading files and directories through descriptors. Anything else stops the back end (a
/// SIGSYS that names the call), as does opening a file other than for reading or mapping
/// memory executable.
const BACKEND: &[Allow] = &[
    any(libc::SYS_readv),
    any(libc::SYS_pread64),
    any(libc::SYS_preadv),
    any(libc::SYS_preadv2),
    any(libc::SYS_recvmsg),
    any(libc::SYS_recvfrom),
    any(libc::SYS_sendmsg),
    any(libc::SYS_sendto),
    any(libc::SYS_shutdown),
    any(libc::SYS_accept4),
    any(libc::SYS_getsockopt),
    any(libc::SYS_dup),
    when(libc::SYS_openat, READ_ONLY_OPEN),
    // Its flags are in a struct the filter cannot read; it opens O_PATH beneath the share
    // (host.rs), and Landlock and the read-only mount keep it from writing.
    any(libc::SYS_openat2),
    any(libc::SYS_getdents64),
    any(libc::SYS_readlinkat),
    any(libc::SYS_fstat),
    any(libc::SYS_newfstatat),
    any(libc::SYS_statx),
    any(libc::SYS_fstatfs),
    any(libc::SYS_lseek),
    any(libc::SYS_epoll_create1),
    any(libc::SYS_epoll_ctl),
    any(libc::SYS_epoll_wait),
    any(libc::SYS_epoll_pwait),
    any(libc::SYS_eventfd2),
    any(libc::SYS_poll),
    any(libc::SYS_ppoll),
    // Threads only: the back end never starts a process.
    when(libc::SYS_clone, THREADS_ONLY),
    any(libc::SYS_clone3),
    any(libc::SYS_rt_sigaction),
];

/// Allows only [`BACKEND`] from now on, in every thread of the process; any other call
/// stops the back end with a line naming it.
pub fn seccomp_backend() -> Result<(), Error> {
    seccomp::report_violations("nixvm storefs").map_err(Error::Seccomp)?;
    let program = seccomp::program(&[seccomp::RUNTIME, BACKEND], seccomp::Mode::On)
        .map_err(Error::Seccomp)?;
    seccomp::apply_all_threads(program.as_ref()).map_err(Error::Seccomp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each check runs in a thread of its own: both restrictions bind the calling thread
    /// (seccomp without TSYNC), so the test process stays unrestricted.
    #[test]
    fn landlock_leaves_reading_inside_and_nothing_else() {
        let base = std::env::temp_dir().join(format!("nixvm-landlock-{}", std::process::id()));
        let inside = base.join("inside");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("f"), "in").unwrap();
        std::fs::write(base.join("outside"), "out").unwrap();
        use std::os::unix::fs::OpenOptionsExt;
        let pre: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(inside.join("f"))
            .unwrap()
            .into();
        let (i, b) = (inside.clone(), base.clone());
        let got = std::thread::spawn(move || {
            let mode = landlock_read_only(&open_dir(&i).unwrap()).unwrap();
            if mode == Landlock::Unsupported {
                return None;
            }
            let read_inside = std::fs::read_to_string(i.join("f")).ok();
            let listed = std::fs::read_dir(&i).map(|d| d.count()).ok();
            let read_outside = std::fs::read_to_string(b.join("outside")).is_ok();
            let write_inside = std::fs::write(i.join("new"), "x").is_ok();
            // A node held as O_PATH, reopened through /proc as the file server does.
            let reopened =
                std::fs::read_to_string(format!("/proc/self/fd/{}", pre.as_raw_fd())).ok();
            Some((read_inside, listed, read_outside, write_inside, reopened))
        })
        .join()
        .unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        let Some(got) = got else {
            println!("skipped: this kernel has no Landlock");
            return;
        };
        assert_eq!(
            got,
            (Some("in".into()), Some(1), false, false, Some("in".into()))
        );
    }

    #[test]
    fn the_filter_refuses_what_is_not_listed() {
        // Misses fail with EPERM here, where the daemon's filter would stop it.
        let program = seccomp::compile_errno(&[seccomp::RUNTIME, BACKEND]).unwrap();
        let (pid, uid, read_only, write) = std::thread::spawn(move || {
            seccompiler::apply_filter(&program).unwrap();
            let path = c"/proc/self/stat";
            // SAFETY: getpid and getuid take no arguments; openat gets a NUL-terminated
            // path, and the descriptor it may return is closed at once.
            unsafe {
                let open = |flags| {
                    let fd = libc::openat(libc::AT_FDCWD, path.as_ptr(), flags);
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    fd >= 0
                };
                (
                    libc::syscall(libc::SYS_getpid),
                    libc::syscall(libc::SYS_getuid),
                    open(libc::O_RDONLY | libc::O_CLOEXEC),
                    open(libc::O_WRONLY | libc::O_CLOEXEC),
                )
            }
        })
        .join()
        .unwrap();
        assert!(pid > 0, "getpid is allowed");
        assert_eq!(uid, -1, "getuid is not");
        assert!(read_only, "opening for reading is allowed");
        assert!(!write, "opening for writing is not");
    }
}
