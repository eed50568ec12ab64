//! The FUSE wire format (the subset of `linux/fuse.h` that a read-only server needs).
//!
//! Every struct is `#[repr(C)]`, has no implicit padding and is plain old data, so it is
//! [`ByteValued`]. The protocol is little-endian and so are the hosts nixvm runs on (x86_64,
//! aarch64 under KVM with a guest of the same endianness): parsing copies bytes into a
//! zeroed struct ([`read_struct`]), which also removes any alignment requirement on the input.
use vm_memory::ByteValued;

pub const KERNEL_VERSION: u32 = 7;
/// The highest minor version we speak.
pub const KERNEL_MINOR_VERSION: u32 = 38;
/// The oldest minor version we accept (the reply layouts we send exist since 7.23).
pub const MIN_KERNEL_MINOR_VERSION: u32 = 23;
pub const ROOT_ID: u64 = 1;

// Opcodes.
pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const READLINK: u32 = 5;
pub const SYMLINK: u32 = 6;
pub const MKNOD: u32 = 8;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const RENAME: u32 = 12;
pub const LINK: u32 = 13;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const SETXATTR: u32 = 21;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const REMOVEXATTR: u32 = 24;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const GETLK: u32 = 31;
pub const SETLK: u32 = 32;
pub const SETLKW: u32 = 33;
pub const ACCESS: u32 = 34;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const BMAP: u32 = 37;
pub const DESTROY: u32 = 38;
pub const IOCTL: u32 = 39;
pub const POLL: u32 = 40;
pub const NOTIFY_REPLY: u32 = 41;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;
pub const RENAME2: u32 = 45;
pub const LSEEK: u32 = 46;
pub const COPY_FILE_RANGE: u32 = 47;
pub const SETUPMAPPING: u32 = 48;
pub const REMOVEMAPPING: u32 = 49;
pub const SYNCFS: u32 = 50;
pub const TMPFILE: u32 = 51;
pub const STATX: u32 = 52;

// INIT flags (fuse_init_in/out.flags).
pub const ASYNC_READ: u32 = 1 << 0;
pub const DO_READDIRPLUS: u32 = 1 << 13;
pub const READDIRPLUS_AUTO: u32 = 1 << 14;
pub const PARALLEL_DIROPS: u32 = 1 << 18;
pub const MAX_PAGES: u32 = 1 << 22;
pub const CACHE_SYMLINKS: u32 = 1 << 23;
pub const INIT_EXT: u32 = 1 << 30;

// fuse_open_out.open_flags.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;

/// Directory entries are padded to this.
pub const DIRENT_ALIGN: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
    pub padding: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

/// The 7.36+ layout; older kernels send only the first 16 bytes (the rest reads as zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub max_stack_depth: u32,
    pub unused: [u32; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetattrIn {
    pub getattr_flags: u32,
    pub dummy: u32,
    pub fh: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub backing_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForgetIn {
    pub nlookup: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchForgetIn {
    pub count: u32,
    pub dummy: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForgetOne {
    pub nodeid: u64,
    pub nlookup: u64,
}

/// Followed by `namelen` bytes of name, padded to [`DIRENT_ALIGN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub typ: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Direntplus {
    pub entry_out: EntryOut,
    pub dirent: Dirent,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kstatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatfsOut {
    pub st: Kstatfs,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LseekIn {
    pub fh: u64,
    pub offset: u64,
    pub whence: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LseekOut {
    pub offset: u64,
}

/// GETXATTR and LISTXATTR; GETXATTR's is followed by the NUL-terminated name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetxattrIn {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GetxattrOut {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessIn {
    pub mask: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushIn {
    pub fh: u64,
    pub unused: u32,
    pub padding: u32,
    pub lock_owner: u64,
}

macro_rules! byte_valued {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: a #[repr(C)] struct of integers (and arrays of them, and such structs)
            // laid out without implicit padding (the size asserts below check it), so every
            // byte pattern is a valid value.
            unsafe impl ByteValued for $t {}
        )*
    };
}

byte_valued!(
    InHeader,
    OutHeader,
    InitIn,
    InitOut,
    Attr,
    EntryOut,
    AttrOut,
    GetattrIn,
    OpenIn,
    OpenOut,
    ReadIn,
    ReleaseIn,
    ForgetIn,
    BatchForgetIn,
    ForgetOne,
    Dirent,
    Direntplus,
    Kstatfs,
    StatfsOut,
    LseekIn,
    LseekOut,
    GetxattrIn,
    GetxattrOut,
    AccessIn,
    FlushIn,
);

// The sizes of linux/fuse.h: a mismatch would mean padding or a wrong field.
const _: () = {
    use std::mem::size_of;
    assert!(size_of::<InHeader>() == 40);
    assert!(size_of::<OutHeader>() == 16);
    assert!(size_of::<InitIn>() == 64);
    assert!(size_of::<InitOut>() == 64);
    assert!(size_of::<Attr>() == 88);
    assert!(size_of::<EntryOut>() == 128);
    assert!(size_of::<AttrOut>() == 104);
    assert!(size_of::<GetattrIn>() == 16);
    assert!(size_of::<OpenIn>() == 8);
    assert!(size_of::<OpenOut>() == 16);
    assert!(size_of::<ReadIn>() == 40);
    assert!(size_of::<ReleaseIn>() == 24);
    assert!(size_of::<ForgetIn>() == 8);
    assert!(size_of::<BatchForgetIn>() == 8);
    assert!(size_of::<ForgetOne>() == 16);
    assert!(size_of::<Dirent>() == 24);
    assert!(size_of::<Direntplus>() == 152);
    assert!(size_of::<Kstatfs>() == 80);
    assert!(size_of::<StatfsOut>() == 80);
    assert!(size_of::<LseekIn>() == 24);
    assert!(size_of::<LseekOut>() == 8);
    assert!(size_of::<GetxattrIn>() == 8);
    assert!(size_of::<GetxattrOut>() == 8);
    assert!(size_of::<AccessIn>() == 8);
    assert!(size_of::<FlushIn>() == 24);
};

/// Reads a `T` from the start of `buf`; returns it and the bytes after it, or None if `buf`
/// is shorter than `T`.
pub fn read_struct<T: ByteValued + Default>(buf: &[u8]) -> Option<(T, &[u8])> {
    let n = std::mem::size_of::<T>();
    let (head, rest) = buf.split_at_checked(n)?;
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(head);
    Some((v, rest))
}

/// Reads a `T` from the start of `buf`, zero-filling what `buf` lacks (for structs that grew
/// over protocol versions, like [`InitIn`]).
pub fn read_struct_prefix<T: ByteValued + Default>(buf: &[u8]) -> T {
    let mut v = T::default();
    let dst = v.as_mut_slice();
    let n = dst.len().min(buf.len());
    dst[..n].copy_from_slice(&buf[..n]);
    v
}

/// The size of a directory entry record with a `namelen`-byte name, `header` bytes of
/// fixed part included, padded to [`DIRENT_ALIGN`].
pub fn dirent_size(header: usize, namelen: usize) -> usize {
    (header + namelen).div_ceil(DIRENT_ALIGN) * DIRENT_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_short_unaligned_and_prefix() {
        assert!(read_struct::<InHeader>(&[0u8; 39]).is_none());
        // Unaligned input parses the same.
        let mut b = [0u8; 42];
        b[1] = 40;
        b[5] = LOOKUP as u8;
        let (h, rest) = read_struct::<InHeader>(&b[1..]).unwrap();
        assert_eq!(h.len, 40);
        assert_eq!(h.opcode, LOOKUP);
        assert_eq!(rest.len(), 1);
        let i: InitIn = read_struct_prefix(&[7, 0, 0, 0, 31, 0, 0, 0]);
        assert_eq!((i.major, i.minor, i.flags), (7, 31, 0));
        assert_eq!(dirent_size(24, 1), 32);
        assert_eq!(dirent_size(24, 8), 32);
        assert_eq!(dirent_size(24, 9), 40);
    }
}
