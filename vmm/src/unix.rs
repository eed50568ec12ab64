//! UNIX socket listeners (the console and control sockets): only their owner may connect
//! (mode 0600), a crashed nixvm's leftover file does not block them, and a live socket, or
//! one nixvm cannot tell is dead, is never replaced.
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket {0} is in use by another running process (another nixvm?)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error(
        "socket {path} exists and nixvm cannot tell whether it is in use; refusing to replace it"
    )]
    Unknown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A listening socket whose file is removed when it is dropped.
pub struct Listener {
    pub listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` so that only this user can connect (mode 0600). Must be called while
    /// nixvm has one thread (it sets the process's umask for the bind).
    pub fn bind(path: &Path) -> Result<Listener, Error> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::NotASocket(path.to_owned()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(Error::InUse(path.to_owned())),
                // Nobody listens: a leftover from a process that died.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    log::info!("removing stale socket {}", path.display());
                    let _ = std::fs::remove_file(path);
                }
                // Not ours to judge (e.g. another user's, EACCES): leave it.
                Err(source) => {
                    return Err(Error::Unknown {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
        // SAFETY: umask only changes this process's file mode mask; nixvm has one thread
        // while it binds its sockets, so no other file is created meanwhile.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|source| Error::Bind {
            path: path.to_owned(),
            source,
        })?;
        Ok(Listener {
            listener,
            path: path.to_owned(),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_live_one_is_not() {
        let dir = std::env::temp_dir().join(format!("nixvm-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        // A stale file: bound, then the listener closed without removing it.
        drop(UnixListener::bind(&path).unwrap());
        let live = Listener::bind(&path).unwrap();
        assert!(matches!(Listener::bind(&path), Err(Error::InUse(_))));
        drop(live);
        assert!(!path.exists(), "removed on drop");
        let live = Listener::bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may connect");
        drop(live);
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(Listener::bind(&path), Err(Error::NotASocket(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
