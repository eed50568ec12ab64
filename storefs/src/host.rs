//! The host system calls storefs makes: resolving one name beneath a directory without
//! following links, stat, and reopening an O_PATH descriptor for reading.
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// A failed request: the errno it answers with.
pub(crate) type Res<T> = Result<T, i32>;

pub(crate) fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Opens `name` (one component) beneath `dirfd` without following any symlink or magic link.
pub(crate) fn open_beneath(dirfd: RawFd, name: &CStr, flags: i32) -> Res<OwnedFd> {
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
pub(crate) fn stat_fd(fd: RawFd) -> Res<libc::stat> {
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

pub(crate) fn file_type(st: &libc::stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

/// Reopens what the O_PATH descriptor `fd` refers to, for reading (the caller checked that it
/// is a regular file or a directory: never a symlink, FIFO or device).
pub(crate) fn proc_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

pub(crate) fn reopen_file(fd: RawFd) -> Res<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(proc_path(fd))
        .map_err(|e| errno_of(&e))
}
