//! `--net passt`: user-mode networking without root or a TAP. nixvm starts passt with one
//! end of a socket pair (`passt --fd`), which speaks the length-prefixed frame protocol of
//! QEMU's `-netdev stream`, and attaches the interface to the other end. passt gives the
//! guest the host's addresses by DHCP/NDP, maps the gateway address to the host's loopback,
//! and forwards the host ports asked for (`-t`/`-u`) to the guest. It quits when nixvm's end
//! closes; nixvm also kills and reaps it when the VM ends.
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nixvm_storefs::daemon::{PrivatePath, Process, set_cloexec};

use crate::config::Forward;

/// How long passt may take to set up (bind the forwarded ports) before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot start passt: {0} is not installed or not in PATH (install passt, or give \
         --net passt=PROGRAM)"
    )]
    NotFound(PathBuf),
    #[error("cannot start passt ({program})")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("passt ({program}) stopped while starting, with {status} (its messages are above)")]
    Exited {
        program: PathBuf,
        status: ExitStatus,
    },
    #[error("passt ({program}) was not ready after {} s", READY_TIMEOUT.as_secs())]
    Timeout { program: PathBuf },
}

impl Error {
    /// Errors that are the user's to fix (exit status 2): no passt, or one that refused
    /// its arguments (a forwarded port in use).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::NotFound(_) | Error::Exited { .. })
    }
}

/// The passt arguments for a VM end on fd `fd`, ready when `pid_file` is written.
fn args(fd: i32, pid_file: &Path, forwards: &[Forward]) -> Vec<String> {
    let mut a: Vec<String> = ["--foreground", "--quiet", "--stderr", "--fd"]
        .map(String::from)
        .into();
    a.push(fd.to_string());
    a.push("--pid".into());
    a.push(pid_file.display().to_string());
    for f in forwards {
        a.push(if f.udp { "-u" } else { "-t" }.into());
        a.push(f.passt_spec());
    }
    a
}

/// Starts `program` (passt) for one interface and waits until it has set up: its process
/// and nixvm's end of the connection.
pub fn spawn(program: &Path, forwards: &[Forward]) -> Result<(Process, OwnedFd), Error> {
    let spawn_err = |source| Error::Spawn {
        program: program.to_owned(),
        source,
    };
    let (ours, theirs) = UnixStream::pair().map_err(spawn_err)?;
    let pid_file = PrivatePath::new("passt", "pid").map_err(spawn_err)?;
    let fd = theirs.as_raw_fd();
    // passt inherits its end by number. Nothing else spawns processes while a VM is being
    // built, so no other child can pick it up meanwhile.
    set_cloexec(fd, false).map_err(spawn_err)?;
    let child = Command::new(program)
        .args(args(fd, &pid_file.path, forwards))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn();
    drop(theirs);
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(program.to_owned()));
        }
        Err(e) => return Err(spawn_err(e)),
    };
    // passt writes its pid file once its ports are bound and it serves the connection.
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Exited {
                program: program.to_owned(),
                status,
            });
        }
        if std::fs::metadata(&pid_file.path).is_ok_and(|m| m.len() > 0) {
            return Ok((Process::from(child), ours.into()));
        }
        if start.elapsed() > READY_TIMEOUT {
            drop(Process::from(child));
            return Err(Error::Timeout {
                program: program.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passt_arguments() {
        let f: Vec<Forward> = ["2222:22", "udp:5353", "127.0.0.1/8080:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            args(5, Path::new("/run/p/pid"), &f).join(" "),
            "--foreground --quiet --stderr --fd 5 --pid /run/p/pid \
             -t 2222:22 -u 5353:5353 -t 127.0.0.1/8080:80"
        );
    }

    #[test]
    fn missing_program_is_named() {
        let e = spawn(Path::new("/nonexistent/passt"), &[]).err().unwrap();
        assert!(e.is_usage());
        assert!(
            e.to_string()
                .contains("/nonexistent/passt is not installed"),
            "{e}"
        );
    }

    /// A program that fails at once is reported with its status, and one that gets ready
    /// (writes the pid file) is accepted. `sh` stands in for passt.
    #[test]
    fn readiness_and_early_exit() {
        let dir = std::env::temp_dir().join(format!("nixvm-passt-test.{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fail = dir.join("fail");
        let ok = dir.join("ok");
        std::fs::write(&fail, "#!/bin/sh\necho refused >&2\nexit 1\n").unwrap();
        // Finds the pid file after --pid, writes it, then waits for its connection to close.
        std::fs::write(
            &ok,
            "#!/bin/sh\nwhile [ \"$1\" != --pid ]; do shift; done\necho $$ > \"$2\"\nexec sleep 30\n",
        )
        .unwrap();
        for p in [&fail, &ok] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let e = spawn(&fail, &[]).err().unwrap();
        assert!(matches!(e, Error::Exited { .. }) && e.is_usage(), "{e}");
        let (process, _fd) = spawn(&ok, &[]).unwrap();
        drop(process);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
