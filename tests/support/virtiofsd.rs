//! The upstream virtiofsd as the e2e tests and the fs bench start it (one copy for both,
//! included with `#[path]`).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The upstream virtiofsd: $NIXVM_VIRTIOFSD, else on PATH, else in cargo's bin directory.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NIXVM_VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|c| c.join("bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

/// Starts `bin` serving `dir` read-only on `socket` (a stale socket file is removed first).
/// It does not wait for the socket: nixvm does (`NIXVM_VHOST_USER_WAIT`); QEMU's caller must.
pub fn spawn(bin: &Path, dir: &Path, socket: &Path) -> std::io::Result<Child> {
    let _ = std::fs::remove_file(socket);
    Command::new(bin)
        .arg("--shared-dir")
        .arg(dir)
        .arg("--socket-path")
        .arg(socket)
        // Inside L1 the root is a chroot, where the namespace sandbox cannot pivot_root.
        .args(["--sandbox", "chroot", "--readonly", "--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
}
