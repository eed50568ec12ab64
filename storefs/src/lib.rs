//! nixvm's built-in, read-only virtio-fs back end for the Nix store: `nixvm storefs`, a
//! vhost-user daemon in its own process and sandbox.
//!
//! - [`daemon`]: the vhost-user back end (one thread per queue), the process's set-up, and
//!   [`daemon::spawn`], with which nixvm starts one for `--fs path=`.
//! - [`sandbox`]: the mount namespace, Landlock and seccomp it enters before serving.
//! - [`StoreFs`] (`server`): turns one FUSE request (the device-readable bytes of a
//!   virtio-fs descriptor chain) into one reply; it does no virtqueue work itself. It is pure
//!   request/reply logic over a host directory, so it is unit-tested byte for byte. Its node
//!   and handle tables are in `inodes`, the host system calls it makes in `host`. The FUSE
//!   wire format is the virtio-fs device's: `nixvm_devices::virtio::fuse`.
//!
//! What it serves, and how:
//! - Only the read-only subset: INIT, LOOKUP, FORGET, BATCH_FORGET, GETATTR, READLINK,
//!   OPEN, OPENDIR, READ, READDIR, READDIRPLUS, RELEASE, RELEASEDIR, STATFS, ACCESS, FLUSH,
//!   LSEEK, DESTROY. GETXATTR and LISTXATTR answer ENOSYS (the store has no xattrs, and
//!   ENOSYS lets the guest kernel stop asking, e.g. for security.capability on every exec).
//!   Every write-class opcode answers EROFS; FSYNC, FSYNCDIR and SYNCFS answer 0 (syncing
//!   a read-only file is legal and has nothing to do). Unknown opcodes answer ENOSYS.
//! - Nothing outside the served directory is reachable: the root is held as an O_PATH
//!   descriptor and every name is resolved with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` relative to its parent's O_PATH
//!   descriptor, one component at a time (names with '/', ".", ".." or no NUL are
//!   refused with EINVAL). Symlinks are returned to the guest as symlinks and never
//!   followed on the host.
//! - Node ids: every node keeps (dev, ino), its parent node and its name; the same host
//!   inode gets the same node id while it is known. Open O_PATH descriptors are kept only
//!   for an LRU-bounded set of nodes ([`DEFAULT_MAX_CACHED_FDS`]); an evicted node is
//!   reopened through its parent chain (and checked to still be the same (dev, ino), else
//!   ESTALE), so a store of millions of paths does not exhaust descriptors. Open file and
//!   directory handles hold a descriptor each and are bounded by [`MAX_HANDLES`] (ENFILE).
//!   Unknown node ids and unknown handles answer EBADF. Descriptors beyond the process's
//!   RLIMIT_NOFILE answer EMFILE, so the backend should raise its soft limit to the hard one
//!   (the defaults need up to DEFAULT_MAX_CACHED_FDS + MAX_HANDLES + a few).
//! - Node descriptors are reopened under the node table's lock (a cache miss costs one
//!   openat2 per evicted ancestor); lookups' own openat2 and all I/O run outside it.
//! - Files and directories are opened for reading by reopening the node's O_PATH descriptor
//!   through /proc/self/fd (only after checking it is a regular file or a directory, so
//!   FIFOs, devices and symlinks are never opened), so /proc must be mounted.
//! - The store is immutable, so entries and attributes are valid for [`TIMEOUT_SECS`],
//!   files are opened with FOPEN_KEEP_CACHE and directories below the root with
//!   FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE (the guest lists them once). Failed lookups are
//!   plain ENOENT errors (no negative entry is cached) and the root is listed afresh at each
//!   open, so store paths that appear on the host later are found and listed.
// Tests build fixtures with plain casts; the library code is checked without this.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

use std::io;
use std::path::PathBuf;

pub mod daemon;
mod host;
mod inodes;
mod listings;
pub mod sandbox;
mod server;

pub use server::{DEFAULT_MAX_CACHED_FDS, MAX_HANDLES, MAX_TRANSFER, StoreFs, TIMEOUT_SECS};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path} as a directory to serve")]
    OpenRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
