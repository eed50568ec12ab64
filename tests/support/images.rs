//! Disk images as the e2e tests and the benches copy them (one copy for both, included with
//! `#[path]`).
#![allow(dead_code)] // not every includer uses every helper
use std::path::Path;
use std::process::Command;

/// Copies the disk image `from` to `to`, keeping its holes (a 1 GiB root with ~300 MiB in it
/// stays ~300 MiB).
pub fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()?;
    if !cp.success() {
        return Err(std::io::Error::other(format!(
            "cannot copy {} to {}: cp {cp}",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}
