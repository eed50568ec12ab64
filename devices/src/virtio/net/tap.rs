//! The TAP side of virtio-net: attaching to an existing TAP (or taking an inherited TAP or
//! macvtap fd) with the virtio-net header on, setting offloads, and the MAC derived from an
//! interface's name.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::HDR_LEN;

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// The two TAP ioctls a device makes once the VM runs (seccomp lists name them).
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
pub(super) const TUN_F_CSUM: u32 = 0x01;
pub(super) const TUN_F_TSO4: u32 = 0x02;
pub(super) const TUN_F_TSO6: u32 = 0x04;
pub(super) const TUN_F_TSO_ECN: u32 = 0x08;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/net/tun")]
    Tun(#[source] io::Error),
    #[error(
        "there is no network interface {0:?} (nixvm does not create TAP devices: \
         `ip tuntap add {0} mode tap user $USER vnet_hdr` does)"
    )]
    NoSuchInterface(String),
    #[error("network interface {0:?} is not a TAP device")]
    NotTap(String),
    #[error(
        "not allowed to attach to TAP {0:?}: it belongs to another user \
         (create it with `ip tuntap add {0} mode tap user $USER vnet_hdr`)"
    )]
    TapPermission(String),
    #[error("TAP {0:?} is in use by another process")]
    TapBusy(String),
    #[error("cannot attach to TAP {name:?}")]
    TapAttach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("fd {0} is not an open file descriptor")]
    FdNotOpen(RawFd),
    #[error("fd {0} is not a TAP or macvtap device")]
    FdNotTap(RawFd),
    #[error("the TAP on fd {0} was opened without vnet_hdr (IFF_VNET_HDR), which nixvm needs")]
    FdNoVnetHdr(RawFd),
    #[error("cannot set up TAP {name:?}")]
    TapSetup {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// An attached TAP (or macvtap) queue, non-blocking, with the virtio-net header on.
pub struct Tap {
    pub(super) file: File,
    pub(super) name: String,
}

impl Tap {
    /// Attaches to the existing TAP `name`, as a multi-queue TAP if it was created so.
    pub fn open(name: &str) -> Result<Tap, Error> {
        let cname = std::ffi::CString::new(name).map_err(|_| Error::NotTap(name.to_owned()))?;
        if name.len() >= libc::IFNAMSIZ {
            return Err(Error::NoSuchInterface(name.to_owned()));
        }
        // SAFETY: if_nametoindex reads the NUL-terminated string only.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            // TUNSETIFF would create it (given the privilege): never do that.
            return Err(Error::NoSuchInterface(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::Tun)?;
        let mut req = IfReq::default();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let base = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        let mut err = None;
        // A multi_queue TAP refuses a single-queue attach with EINVAL, and the other way round.
        for flags in [base, base | IFF_MULTI_QUEUE] {
            req.flags = flags;
            // SAFETY: TUNSETIFF reads an ifreq, which `req` is (with padding to its full size).
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } == 0 {
                let tap = Tap {
                    file,
                    name: name.to_owned(),
                };
                tap.set_vnet_hdr_size()?;
                return Ok(tap);
            }
            err = Some(io::Error::last_os_error());
            if err.as_ref().and_then(|e| e.raw_os_error()) != Some(libc::EINVAL) {
                break;
            }
        }
        let e = err.expect("one attempt made");
        let name = name.to_owned();
        Err(match e.raw_os_error() {
            Some(libc::EPERM) => Error::TapPermission(name),
            Some(libc::EBUSY) => Error::TapBusy(name),
            Some(libc::EINVAL) => Error::NotTap(name),
            _ => Error::TapAttach { name, source: e },
        })
    }

    /// Takes over an inherited, open TAP or macvtap fd.
    pub fn from_fd(fd: RawFd) -> Result<Tap, Error> {
        // SAFETY: F_GETFD only inspects the descriptor.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::FdNotOpen(fd));
        }
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes an ifreq into `req`; fds of other kinds refuse it.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } != 0 || req.flags & IFF_TAP == 0 {
            return Err(Error::FdNotTap(fd));
        }
        if req.flags & IFF_VNET_HDR == 0 {
            // A macvtap queue may turn it on now; an attached TAP cannot.
            req.flags |= IFF_VNET_HDR;
            // SAFETY: as above, TUNSETIFF reads the ifreq.
            if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) } != 0 {
                return Err(Error::FdNoVnetHdr(fd));
            }
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        // SAFETY: the fd is open (checked) and nixvm was handed it to own.
        let file = unsafe { File::from_raw_fd(fd) };
        let setup = |source| Error::TapSetup {
            name: name.clone(),
            source,
        };
        // SAFETY: fcntl flag calls on our own descriptor.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(setup(io::Error::last_os_error()));
            }
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        let tap = Tap { file, name };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_vnet_hdr_size(&self) -> Result<(), Error> {
        let size = libc::c_int::try_from(HDR_LEN).expect("12");
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } != 0 {
            return Err(Error::TapSetup {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the TAP which offloaded frames the guest accepts (TUN_F_* flags).
    pub(super) fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A locally administered unicast MAC derived from the interface name: 02 followed by the
/// first five bytes of the name's 64-bit FNV-1a hash. The same TAP gets the same MAC on
/// every start, so the guest's DHCP leases and neighbours stay valid.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

#[cfg(any(test, feature = "test-utils"))]
impl Tap {
    /// A stand-in TAP for tests and fuzzing: one end of a non-blocking SEQPACKET socketpair
    /// (datagrams keep frame boundaries as a TAP does), and the other end, the "host".
    pub fn socketpair(name: &str) -> io::Result<(Tap, File)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills the two-element array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are new and ours.
        let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let tap = Tap {
            file: a,
            name: name.to_owned(),
        };
        Ok((tap, b))
    }
}
