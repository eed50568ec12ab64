//! The VM's configuration: one struct that the JSON config file and the command line both
//! fill (flags override the file), and one `validate` that checks it before anything starts.
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nixvm_boot::kernel::{self, KernelFormat};
use nixvm_boot::layout::MIN_MEMORY;
use nixvm_devices::virtio::block;
use serde::{Deserialize, Serialize};

/// Most vCPUs a VM can have: xAPIC ids in the MADT are 8 bits and 0xff is the broadcast id.
pub const MAX_CPUS: u32 = 254;
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY: Size = Size(512 << 20);
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
pub const DEFAULT_SHUTDOWN_TIMEOUT: u64 = 30;
/// virtio devices a VM can have: one interrupt line each.
pub const MAX_DEVICES: usize = nixvm_boot::layout::DEVICE_GSIS.len();
use block::SERIAL_MAX;
/// An interface name without its NUL.
const IFNAME_MAX: usize = libc::IFNAMSIZ - 1;
const FS_QUEUE_SIZE_MIN: u16 = 16;
const FS_QUEUE_SIZE_MAX: u16 = 32768;
use nixvm_devices::virtio::fs::MAX_REQUEST_QUEUES;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no kernel given: pass --kernel PATH (or \"kernel\" in the config file)")]
    NoKernel,
    #[error(transparent)]
    Kernel(#[from] kernel::Error),
    #[error("cannot read initrd {path}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initrd {path} is {size} bytes, too large for {memory} of guest memory: give the VM more --memory"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory: Size,
    },
    #[error("--memory {0} is below the minimum of 64M")]
    MemoryTooSmall(Size),
    #[error("--memory {memory} is more than this host can give ({host} of RAM and swap)")]
    MemoryTooLarge { memory: Size, host: Size },
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {0} is more than the {MAX_CPUS} vCPUs nixvm supports")]
    TooManyCpus(u32),
    #[error("the kernel command line: {0}")]
    Cmdline(#[from] nixvm_boot::params::Error),
    #[error(transparent)]
    Disk(#[from] block::Error),
    #[error("disk serial {0:?} is longer than {SERIAL_MAX} bytes")]
    DiskSerial(String),
    #[error(
        "{0} virtio devices (disks, network interfaces, shares, rng) are more than nixvm can attach (at most {MAX_DEVICES})"
    )]
    TooManyDevices(usize),
    #[error("TAP name {0:?} is not a valid interface name (1 to {IFNAME_MAX} bytes, no '/')")]
    TapName(String),
    #[error("fd {0} of a network interface is not a file descriptor number")]
    NetFd(i32),
    #[error("a network interface needs exactly one of \"tap\" and \"fd\"")]
    NetKind,
    #[error("MAC address {0} is a multicast address, which a network interface cannot have")]
    MulticastMac(Mac),
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    FsTag(String),
    #[error("two virtio-fs shares have the tag {0:?}")]
    FsDuplicateTag(String),
    #[error(
        "virtio-fs queue_size {0} must be a power of two from {FS_QUEUE_SIZE_MIN} to {FS_QUEUE_SIZE_MAX}"
    )]
    FsQueueSize(u16),
    #[error("virtio-fs queues={0} must be from 1 to {MAX_REQUEST_QUEUES}")]
    FsQueues(u16),
    #[error(
        "virtio-fs share {0:?} needs exactly one of socket=PATH (an external back end such as virtiofsd) and path=DIR (served by nixvm)"
    )]
    FsSource(String),
    #[error("virtio-fs share {0:?}: nixvm serves path= read-only, so add readonly=on")]
    FsNotReadOnly(String),
    #[error(
        "virtio-fs share {0:?}: readonly=on is for path= shares; start the socket's back end read-only instead (virtiofsd --readonly)"
    )]
    FsReadOnlySocket(String),
    #[error("the directory {0} to share with path= does not exist or is not a directory")]
    FsDir(PathBuf),
    #[error("the directory of control socket {0} does not exist")]
    ApiSocketDir(PathBuf),
    #[error("the directory of serial {kind} {path} does not exist")]
    SerialDir { kind: &'static str, path: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A memory size: `512M`, `2G`, `1024K`; a bare number is MiB. Shown as the largest exact unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size {0:?}: use a number of MiB or a number with K, M, G or T (e.g. 512M, 2G)")]
pub struct SizeError(String);

impl FromStr for Size {
    type Err = SizeError;
    fn from_str(s: &str) -> std::result::Result<Self, SizeError> {
        let err = || SizeError(s.to_owned());
        let t = s.trim();
        let (num, shift) = match t.char_indices().last().ok_or_else(err)? {
            (i, 'k' | 'K') => (&t[..i], 10),
            (i, 'm' | 'M') => (&t[..i], 20),
            (i, 'g' | 'G') => (&t[..i], 30),
            (i, 't' | 'T') => (&t[..i], 40),
            _ => (t, 20),
        };
        let n: u64 = num.parse().map_err(|_| err())?;
        n.checked_mul(1 << shift).map(Size).ok_or_else(err)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M")] {
            if b != 0 && b % (1 << shift) == 0 {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        if b < 1 << 30 {
            return write!(f, "{}K", b >> 10);
        }
        // Not a whole number of any unit: the host's own figures, shown approximately.
        write!(f, "{:.1}G", b as f64 / f64::from(1u32 << 30))
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Mib(n) => n
                .checked_mul(1 << 20)
                .map(Size)
                .ok_or_else(|| serde::de::Error::custom("size too large")),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Where the serial console goes: `stdio`, `off`, `file=PATH`, `socket=PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SerialConfig {
    #[default]
    Stdio,
    Off,
    File(PathBuf),
    Socket(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid serial {0:?}: use stdio, off, file=PATH or socket=PATH")]
pub struct SerialError(String);

impl FromStr for SerialConfig {
    type Err = SerialError;
    fn from_str(s: &str) -> std::result::Result<Self, SerialError> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "off" => Ok(SerialConfig::Off),
            _ => match s.split_once('=') {
                Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(p.into())),
                Some(("socket", p)) if !p.is_empty() => Ok(SerialConfig::Socket(p.into())),
                _ => Err(SerialError(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => f.write_str("stdio"),
            SerialConfig::Off => f.write_str("off"),
            SerialConfig::File(p) => write!(f, "file={}", p.display()),
            SerialConfig::Socket(p) => write!(f, "socket={}", p.display()),
        }
    }
}

impl Serialize for SerialConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One `--disk`: `path=PATH[,readonly=on][,serial=STR][,direct=on]`; in JSON an object with
/// the same names (`{"path": "...", "readonly": true}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default)]
    pub direct: bool,
}

impl DiskConfig {
    /// What the block device opens.
    pub fn options(&self) -> block::DiskOptions {
        block::DiskOptions {
            path: self.path.clone(),
            readonly: self.readonly,
            serial: self.serial.clone(),
            direct: self.direct,
        }
    }

    pub const SYNTAX: &'static str = "path=PATH[,readonly=on][,serial=STR][,direct=on]";
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid disk {0:?}: use {syntax}", syntax = DiskConfig::SYNTAX)]
pub struct DiskError(String);

/// `on`/`off` (also true/false, yes/no, 1/0).
pub fn parse_switch(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// The one parser of option strings, `key=value,key=value` (--disk, --net, --fs and
/// --memory's tail): the pairs in order, or None if a part has no `=`, a key is empty or
/// given twice. Values are checked by the option that knows them.
pub fn key_values(s: &str) -> Option<Vec<(&str, &str)>> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for part in s.split(',') {
        let (k, v) = part.split_once('=')?;
        if k.is_empty() || pairs.iter().any(|&(seen, _)| seen == k) {
            return None;
        }
        pairs.push((k, v));
    }
    Some(pairs)
}

impl FromStr for DiskConfig {
    type Err = DiskError;
    fn from_str(s: &str) -> std::result::Result<Self, DiskError> {
        let err = || DiskError(s.to_owned());
        let mut disk = DiskConfig::default();
        for (k, v) in key_values(s).ok_or_else(err)? {
            match k {
                "path" if !v.is_empty() => disk.path = v.into(),
                "readonly" => disk.readonly = parse_switch(v).ok_or_else(err)?,
                "direct" => disk.direct = parse_switch(v).ok_or_else(err)?,
                "serial" => disk.serial = Some(v.to_owned()),
                _ => return Err(err()),
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(err());
        }
        Ok(disk)
    }
}

/// A MAC address, `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or(())?;
            if p.len() != 2 {
                return Err(());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|()| serde::de::Error::custom(format!("invalid MAC address {s:?}")))
    }
}

/// One `--net`: `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`; in JSON an object with the same
/// names (`{"tap": "tap0", "mac": "52:54:00:12:34:56"}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
}

impl NetConfig {
    pub const SYNTAX: &'static str = "tap=NAME[,mac=MAC] or fd=N[,mac=MAC]";
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid network interface {0:?}: use {syntax}", syntax = NetConfig::SYNTAX)]
pub struct NetError(String);

impl FromStr for NetConfig {
    type Err = NetError;
    fn from_str(s: &str) -> std::result::Result<Self, NetError> {
        let err = || NetError(s.to_owned());
        let mut net = NetConfig::default();
        for (k, v) in key_values(s).ok_or_else(err)? {
            match k {
                "tap" if !v.is_empty() => net.tap = Some(v.to_owned()),
                "fd" => net.fd = Some(v.parse().map_err(|_| err())?),
                "mac" => net.mac = Some(v.parse().map_err(|()| err())?),
                _ => return Err(err()),
            }
        }
        if net.tap.is_some() == net.fd.is_some() {
            return Err(err());
        }
        Ok(net)
    }
}

/// What a guest reboot does: end nixvm with status 3, or boot the VM again in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    #[default]
    Exit,
    Restart,
}

/// `--memory SIZE[,shared=on]`; in JSON the same string, or a number of MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryArg {
    pub size: Size,
    pub shared: Option<bool>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid memory {0:?}: use SIZE[,shared=on] (e.g. 512M, 2G,shared=on)")]
pub struct MemoryArgError(String);

impl FromStr for MemoryArg {
    type Err = MemoryArgError;
    fn from_str(s: &str) -> std::result::Result<Self, MemoryArgError> {
        let err = || MemoryArgError(s.to_owned());
        let (size, rest) = s.split_once(',').map_or((s, None), |(a, b)| (a, Some(b)));
        let size = size.parse().map_err(|_| err())?;
        let mut shared = None;
        for (k, v) in rest.map_or(Some(Vec::new()), key_values).ok_or_else(err)? {
            match k {
                "shared" => shared = Some(parse_switch(v).ok_or_else(err)?),
                _ => return Err(err()),
            }
        }
        Ok(MemoryArg { size, shared })
    }
}

impl From<Size> for MemoryArg {
    fn from(size: Size) -> MemoryArg {
        MemoryArg { size, shared: None }
    }
}

impl fmt::Display for MemoryArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shared {
            Some(on) => write!(f, "{},shared={}", self.size, if on { "on" } else { "off" }),
            None => write!(f, "{}", self.size),
        }
    }
}

impl Serialize for MemoryArg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MemoryArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Size(Size),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Size(size) => Ok(MemoryArg { size, shared: None }),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// One `--fs`: a virtio-fs share, either served by an external vhost-user backend (e.g.
/// virtiofsd) listening on `socket=PATH`, or a directory `path=DIR,readonly=on` that nixvm
/// serves itself with a `nixvm storefs` process of its own. In JSON an object with the same
/// names (`readonly` a boolean).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
    /// Request queues; default 1 for `socket=`, min(cpus, 4) for `path=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

fn default_fs_queue_size() -> u16 {
    nixvm_devices::virtio::fs::DEFAULT_QUEUE_SIZE
}

impl FsConfig {
    pub const SYNTAX: &'static str =
        "tag=TAG,socket=PATH or tag=TAG,path=DIR,readonly=on, then [,queue_size=N][,queues=N]";

    /// The request queues to ask for, on a VM with `cpus` vCPUs.
    pub fn request_queues(&self, cpus: u8) -> u16 {
        match (self.queues, &self.path) {
            (Some(n), _) => n,
            (None, Some(_)) => u16::from(cpus).clamp(1, 4),
            (None, None) => 1,
        }
    }

    /// The frontend's options, connecting to `socket` (the share's own, or the one of the
    /// backend nixvm started for it).
    pub fn options(&self, socket: &Path, cpus: u8) -> nixvm_devices::virtio::fs::FsOptions {
        nixvm_devices::virtio::fs::FsOptions {
            tag: self.tag.clone(),
            socket: socket.to_owned(),
            queue_size: self.queue_size,
            request_queues: self.request_queues(cpus),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid file system share {0:?}: use {syntax}", syntax = FsConfig::SYNTAX)]
pub struct FsError(String);

impl FromStr for FsConfig {
    type Err = FsError;
    fn from_str(s: &str) -> std::result::Result<Self, FsError> {
        let err = || FsError(s.to_owned());
        let mut tag = None;
        let mut f = FsConfig {
            tag: String::new(),
            socket: None,
            path: None,
            readonly: false,
            queue_size: default_fs_queue_size(),
            queues: None,
        };
        for (k, v) in key_values(s).ok_or_else(err)? {
            match (k, v) {
                ("tag", v) if !v.is_empty() => tag = Some(v.to_owned()),
                ("socket", v) if !v.is_empty() => f.socket = Some(PathBuf::from(v)),
                ("path", v) if !v.is_empty() => f.path = Some(PathBuf::from(v)),
                ("readonly", v) => f.readonly = parse_switch(v).ok_or_else(err)?,
                ("queue_size", v) => f.queue_size = v.parse().map_err(|_| err())?,
                ("queues", v) => f.queues = Some(v.parse().map_err(|_| err())?),
                _ => return Err(err()),
            }
        }
        f.tag = tag.ok_or_else(err)?;
        Ok(f)
    }
}

/// Every setting of a VM, as the command line and the JSON config file both give them: each
/// field is a flag (clap) and a JSON field (serde) at once, every one optional; flags
/// override the file ([`Settings::merge`]), and [`VmConfig::validate`] resolves defaults and
/// checks the result.
#[derive(Clone, Debug, Default, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Kernel: a bzImage or an uncompressed ELF vmlinux with a PVH note (detected from the file).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, passed verbatim [default: console=ttyS0].
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest memory: 512M, 2G; a bare number is MiB [default: 512M]. `,shared=on` maps it
    /// shared (from a memfd), as vhost-user back ends need; on by itself with --fs.
    #[arg(long, value_name = "SIZE[,shared=on]")]
    pub memory: Option<MemoryArg>,
    /// In JSON, the same as `memory`'s `shared=on`.
    #[arg(skip)]
    pub shared_memory: Option<bool>,
    /// Serial console: stdio, off, file=PATH or socket=PATH [default: stdio].
    #[arg(long, value_name = "WHERE")]
    pub serial: Option<SerialConfig>,
    /// A virtio-blk disk, path=PATH[,readonly=on][,serial=STR][,direct=on]; repeatable: the
    /// first is the guest's /dev/vda, the next /dev/vdb, ...
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Option<Vec<DiskConfig>>,
    /// A virtio-net interface on an existing TAP, tap=NAME[,mac=MAC], or on an inherited
    /// TAP/macvtap fd, fd=N[,mac=MAC]; repeatable: eth0, eth1, ... Without mac= the MAC is
    /// 02: and five bytes of a hash of the interface's name (stable across starts).
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Option<Vec<NetConfig>>,
    /// A virtio-fs share: tag=TAG,path=DIR,readonly=on serves DIR read-only with nixvm's own
    /// back end (the Nix store); tag=TAG,socket=PATH uses the vhost-user back end (virtiofsd)
    /// listening on PATH. Both take [,queue_size=N][,queues=N]. The guest mounts it with
    /// `mount -t virtiofs TAG DIR`. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub fs: Option<Vec<FsConfig>>,
    /// The virtio-rng entropy device: on or off [default: on].
    #[arg(long, value_name = "on|off", value_parser = parse_switch_arg)]
    pub rng: Option<bool>,
    /// A control socket (mode 0600) for `nixvm ctl`: JSON lines, see README.md.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Seconds a guest has to power off after the power button (SIGTERM, `ctl shutdown`)
    /// before nixvm stops it [default: 30].
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,
    /// What a guest reboot does: exit (status 3, for a supervisor to start nixvm again) or
    /// restart (boot the VM again in place: fresh memory, devices reset) [default: exit].
    #[arg(long, value_name = "exit|restart", value_enum)]
    pub on_reboot: Option<OnReboot>,
}

fn parse_switch_arg(v: &str) -> std::result::Result<bool, String> {
    parse_switch(v).ok_or_else(|| format!("{v:?} is neither on nor off"))
}

impl Settings {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| Error::ParseConfig {
            path: path.to_owned(),
            source,
        })
    }

    /// `self` overridden by whatever `over` sets, field by field (through their JSON form,
    /// so that no list of fields is kept here).
    pub fn merge(self, over: Settings) -> Settings {
        let (Ok(serde_json::Value::Object(mut base)), Ok(serde_json::Value::Object(over))) =
            (serde_json::to_value(self), serde_json::to_value(over))
        else {
            unreachable!("settings serialize as objects");
        };
        for (k, v) in over {
            if !v.is_null() {
                base.insert(k, v);
            }
        }
        serde_json::from_value(serde_json::Value::Object(base)).expect("merged settings parse")
    }
}

/// The resolved, validated configuration of a VM.
#[derive(Clone, Debug, Serialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub kernel_format: String,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: Size,
    pub serial: SerialConfig,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub fs: Vec<FsConfig>,
    /// Guest RAM is a shared memfd mapping (vhost-user backends map it), else private
    /// anonymous memory.
    pub shared_memory: bool,
    pub rng: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Seconds between pressing the power button and stopping the VM hard.
    pub shutdown_timeout: u64,
    pub on_reboot: OnReboot,
}

impl VmConfig {
    /// Resolves defaults and checks everything that can be checked before the VM starts:
    /// files exist and are readable, the kernel format, sizes. `host_memory` is RAM plus swap.
    pub fn validate(file: Settings, host_memory: u64) -> Result<VmConfig> {
        let cpus = file.cpus.unwrap_or(DEFAULT_CPUS);
        if cpus == 0 {
            return Err(Error::NoCpus);
        }
        if cpus > MAX_CPUS {
            return Err(Error::TooManyCpus(cpus));
        }
        let memory = file.memory.map_or(DEFAULT_MEMORY, |m| m.size);
        if memory.0 < MIN_MEMORY {
            return Err(Error::MemoryTooSmall(memory));
        }
        if memory.0 > host_memory {
            return Err(Error::MemoryTooLarge {
                memory,
                host: Size(host_memory),
            });
        }
        let kernel = file.kernel.ok_or(Error::NoKernel)?;
        let mut kf = File::open(&kernel).map_err(|source| kernel::Error::Read {
            path: kernel.clone(),
            source,
        })?;
        let format = kernel::detect(&kernel, &mut kf)?;
        if let Some(initrd) = &file.initrd {
            let size = File::open(initrd)
                .and_then(|f| f.metadata())
                .map_err(|source| Error::Initrd {
                    path: initrd.clone(),
                    source,
                })?
                .len();
            // The kernel needs room too; the exact check happens when it is loaded.
            let room =
                memory.0.min(nixvm_boot::layout::MMIO_GAP_START) - kernel_footprint(format, &kf);
            if size > room {
                return Err(Error::InitrdTooLarge {
                    path: initrd.clone(),
                    size,
                    memory,
                });
            }
        }
        let cmdline = file.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        nixvm_boot::params::check_cmdline(&cmdline, nixvm_boot::layout::CMDLINE_MAX_LEN)?;
        let serial = file.serial.unwrap_or_default();
        if let SerialConfig::File(p) | SerialConfig::Socket(p) = &serial {
            if !parent_dir_exists(p) {
                let kind = if matches!(serial, SerialConfig::File(_)) {
                    "file"
                } else {
                    "socket"
                };
                return Err(Error::SerialDir {
                    kind,
                    path: p.clone(),
                });
            }
        }
        if let Some(p) = file.api_socket.as_ref().filter(|p| !parent_dir_exists(p)) {
            return Err(Error::ApiSocketDir(p.clone()));
        }
        let disks = file.disks.unwrap_or_default();
        for d in &disks {
            check_disk(d)?;
        }
        let nets = file.nets.unwrap_or_default();
        for n in &nets {
            check_net(n)?;
        }
        let fs = file.fs.unwrap_or_default();
        for (i, f) in fs.iter().enumerate() {
            if f.tag.is_empty() || f.tag.len() > nixvm_devices::virtio::fs::TAG_MAX {
                return Err(Error::FsTag(f.tag.clone()));
            }
            if !f.queue_size.is_power_of_two()
                || !(FS_QUEUE_SIZE_MIN..=FS_QUEUE_SIZE_MAX).contains(&f.queue_size)
            {
                return Err(Error::FsQueueSize(f.queue_size));
            }
            if fs[..i].iter().any(|g| g.tag == f.tag) {
                return Err(Error::FsDuplicateTag(f.tag.clone()));
            }
            if f.queues
                .is_some_and(|q| !(1..=MAX_REQUEST_QUEUES).contains(&q))
            {
                return Err(Error::FsQueues(f.queues.unwrap_or(0)));
            }
            match (&f.socket, &f.path) {
                (Some(_), None) if f.readonly => {
                    return Err(Error::FsReadOnlySocket(f.tag.clone()));
                }
                (Some(_), None) => {}
                (None, Some(_)) if !f.readonly => {
                    return Err(Error::FsNotReadOnly(f.tag.clone()));
                }
                (None, Some(dir)) if !dir.is_dir() => return Err(Error::FsDir(dir.clone())),
                (None, Some(_)) => {}
                _ => return Err(Error::FsSource(f.tag.clone())),
            }
        }
        let shared = file.memory.and_then(|m| m.shared).or(file.shared_memory);
        let shared_memory = shared.unwrap_or(false) || !fs.is_empty();
        let rng = file.rng.unwrap_or(true);
        let devices = disks.len() + nets.len() + fs.len() + usize::from(rng);
        if devices > MAX_DEVICES {
            return Err(Error::TooManyDevices(devices));
        }
        Ok(VmConfig {
            kernel,
            kernel_format: format.to_string(),
            initrd: file.initrd,
            cmdline,
            cpus: u8::try_from(cpus).expect("checked against MAX_CPUS"),
            memory,
            serial,
            disks,
            nets,
            fs,
            shared_memory,
            rng,
            api_socket: file.api_socket,
            shutdown_timeout: file.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
            on_reboot: file.on_reboot.unwrap_or_default(),
        })
    }
}

/// A disk image exists, opens with the access it needs, and holds whole sectors. Its lock is
/// taken when the VM starts (another VM may still be running on it now).
fn check_disk(d: &DiskConfig) -> Result<()> {
    if d.serial.as_ref().is_some_and(|s| s.len() > SERIAL_MAX) {
        return Err(Error::DiskSerial(d.serial.clone().unwrap_or_default()));
    }
    block::open_image(&d.options())?;
    Ok(())
}

/// The directory a file is to be created in exists (a bare name: the current directory).
fn parent_dir_exists(p: &Path) -> bool {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .is_dir()
}

/// One of tap= or fd=, a name an interface can have, a unicast MAC. Whether the TAP exists
/// and may be attached is found when the VM starts (a running VM may hold it now).
fn check_net(n: &NetConfig) -> Result<()> {
    match (&n.tap, n.fd) {
        (Some(t), None) => {
            if t.is_empty() || t.len() > IFNAME_MAX || t.contains(['/', '\0']) {
                return Err(Error::TapName(t.clone()));
            }
        }
        (None, Some(fd)) if fd < 0 => return Err(Error::NetFd(fd)),
        (None, Some(_)) => {}
        _ => return Err(Error::NetKind),
    }
    match n.mac {
        Some(m) if m.0[0] & 1 != 0 => Err(Error::MulticastMac(m)),
        _ => Ok(()),
    }
}

/// A rough lower bound of the memory the kernel occupies (it loads at 1 MiB or 16 MiB).
fn kernel_footprint(format: KernelFormat, file: &File) -> u64 {
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    match format {
        KernelFormat::BzImage => nixvm_boot::layout::HIGH_RAM_START + size,
        KernelFormat::ElfPvh => (16 << 20) + size,
    }
}

/// RAM plus swap of this host, in bytes.
pub fn host_memory() -> u64 {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return u64::MAX;
        }
        (info.totalram as u64)
            .saturating_add(info.totalswap as u64)
            .saturating_mul(u64::from(info.mem_unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sizes() {
        assert_eq!("512M".parse(), Ok(Size(512 << 20)));
        assert_eq!("2G".parse(), Ok(Size(2 << 30)));
        assert_eq!("2g".parse(), Ok(Size(2 << 30)));
        assert_eq!("384".parse(), Ok(Size(384 << 20)));
        assert_eq!("65536K".parse(), Ok(Size(64 << 20)));
        for bad in ["", "M", "12X", "-1", "1.5G", "99999999999999T", " "] {
            assert!(bad.parse::<Size>().is_err(), "{bad:?}");
        }
        assert_eq!(Size(512 << 20).to_string(), "512M");
        assert_eq!(Size(2 << 30).to_string(), "2G");
        assert_eq!(Size(1536 << 20).to_string(), "1536M");
        assert_eq!(Size((23 << 30) + (512 << 20) + 1).to_string(), "23.5G");
    }

    #[test]
    fn serial_specs() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert_eq!(
            "socket=a/b.sock".parse(),
            Ok(SerialConfig::Socket("a/b.sock".into()))
        );
        for bad in ["", "file=", "socket", "tcp=1", "Stdio"] {
            assert!(bad.parse::<SerialConfig>().is_err(), "{bad:?}");
        }
        for s in ["stdio", "off", "file=/x", "socket=/y"] {
            assert_eq!(s.parse::<SerialConfig>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn fs_and_memory_specs() {
        let f: FsConfig = "tag=ro-store,socket=/run/s.sock".parse().unwrap();
        assert_eq!(
            f,
            FsConfig {
                tag: "ro-store".into(),
                socket: Some("/run/s.sock".into()),
                path: None,
                readonly: false,
                queue_size: 1024,
                queues: None,
            }
        );
        assert_eq!(f.request_queues(8), 1);
        let f: FsConfig = "socket=s,tag=t,queue_size=128".parse().unwrap();
        assert_eq!(f.queue_size, 128);
        let f: FsConfig = "tag=store,path=/nix/store,readonly=on,queues=2"
            .parse()
            .unwrap();
        assert_eq!(
            (f.path.as_deref(), f.readonly, f.queues, f.socket),
            (Some(Path::new("/nix/store")), true, Some(2), None)
        );
        let f: FsConfig = "tag=store,path=/nix/store,readonly=on".parse().unwrap();
        assert_eq!((f.request_queues(1), f.request_queues(2)), (1, 2));
        // Switches read the same in every option (key_values + parse_switch).
        let yes: FsConfig = "tag=store,path=/nix/store,readonly=yes".parse().unwrap();
        assert_eq!(yes, f);
        assert_eq!(f.request_queues(64), 4);
        for bad in [
            "",
            "socket=s",
            "tag=,socket=s",
            "tag=t,socket=s,queue_size=x",
            "tag=t,socket=s,cache=auto",
            "tag=t,path=/d,readonly=maybe",
            "tag=t,socket=s,tag=u",
            "tag=t,path=",
            "tag=t,socket=s,queues=-1",
        ] {
            assert!(bad.parse::<FsConfig>().is_err(), "{bad:?}");
        }
        let j: FsConfig = serde_json::from_str(r#"{"tag":"t","socket":"/s"}"#).unwrap();
        assert_eq!(j.queue_size, 1024);
        assert_eq!(
            "2G,shared=on".parse(),
            Ok(MemoryArg {
                size: Size(2 << 30),
                shared: Some(true)
            })
        );
        assert_eq!(
            "512M".parse(),
            Ok(MemoryArg {
                size: Size(512 << 20),
                shared: None
            })
        );
        for bad in ["", "shared=on", "1G,shared=maybe", "1G,huge=on"] {
            assert!(bad.parse::<MemoryArg>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn net_specs() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:AB:cd:ef".parse().unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some(Mac([0x52, 0x54, 0, 0xab, 0xcd, 0xef])));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
        assert_eq!("fd=3".parse::<NetConfig>().unwrap().fd, Some(3));
        for bad in [
            "",
            "tap=",
            "fd=x",
            "tap=a,fd=3",
            "tap=a,tap=b",
            "mac=52:54:00:00:00:01",
            "tap=a,mac=52:54:00:00:00",
            "tap=a,mac=52:54:00:00:00:01:02",
            "tap=a,mac=5:54:00:00:00:01",
            "tap=a,queues=2",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
        }
        let j: NetConfig =
            serde_json::from_str(r#"{"tap":"t","mac":"02:00:00:00:00:01"}"#).unwrap();
        assert_eq!(j.mac, Some(Mac([2, 0, 0, 0, 0, 1])));
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t","mac":"zz"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&j).unwrap(),
            r#"{"tap":"t","mac":"02:00:00:00:00:01"}"#
        );
        assert!(check_net(&j).is_ok());
        let named = |t: &str| NetConfig {
            tap: Some(t.into()),
            ..Default::default()
        };
        assert!(matches!(
            check_net(&named("a-very-long-name0")),
            Err(Error::TapName(_))
        ));
        assert!(matches!(check_net(&named("a/b")), Err(Error::TapName(_))));
        assert!(matches!(
            check_net(&NetConfig {
                fd: Some(-1),
                ..Default::default()
            }),
            Err(Error::NetFd(-1))
        ));
        assert!(matches!(
            check_net(&NetConfig::default()),
            Err(Error::NetKind)
        ));
        assert!(matches!(
            check_net(&NetConfig {
                mac: Some(Mac([1, 0, 0, 0, 0, 0])),
                ..named("t")
            }),
            Err(Error::MulticastMac(_))
        ));
    }

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "path=/a.img,readonly=on,serial=abc,direct=on"
            .parse()
            .unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/a.img".into(),
                readonly: true,
                serial: Some("abc".into()),
                direct: true
            }
        );
        assert!(!"path=b.img".parse::<DiskConfig>().unwrap().readonly);
        for bad in [
            "",
            "/a.img",
            "path=",
            "path=/a,readonly=maybe",
            "path=/a,cache=none",
            "readonly=on",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad:?}");
        }
        let j: DiskConfig = serde_json::from_str(r#"{"path":"/x","readonly":true}"#).unwrap();
        assert!(j.readonly && j.serial.is_none());
        assert!(serde_json::from_str::<DiskConfig>(r#"{"path":"/x","ro":true}"#).is_err());
    }

    #[test]
    fn key_values_is_the_one_option_parser() {
        assert_eq!(
            key_values("a=1,b=,c=x=y"),
            Some(vec![("a", "1"), ("b", ""), ("c", "x=y")])
        );
        for bad in ["", "a", "a=1,", "=1", "a=1,a=2"] {
            assert_eq!(key_values(bad), None, "{bad:?}");
        }
        assert!("path=/a,path=/b".parse::<DiskConfig>().is_err());
        assert!(
            "tap=a,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02"
                .parse::<NetConfig>()
                .is_err()
        );
        assert!("1G,shared=on,shared=off".parse::<MemoryArg>().is_err());
    }

    #[test]
    fn config_file_parses_and_rejects_unknown_fields() {
        let f: Settings = serde_json::from_str(
            r#"{"kernel":"/k","memory":"1G","cpus":2,"serial":"socket=/s","cmdline":"a b"}"#,
        )
        .unwrap();
        assert_eq!(f.memory.map(|m| m.size), Some(Size(1 << 30)));
        assert_eq!(f.serial, Some(SerialConfig::Socket("/s".into())));
        let f: Settings = serde_json::from_str(r#"{"memory":384}"#).unwrap();
        assert_eq!(f.memory.map(|m| m.size), Some(Size(384 << 20)));
        assert!(serde_json::from_str::<Settings>(r#"{"kernal":"/k"}"#).is_err());
        assert!(serde_json::from_str::<Settings>(r#"{"memory":"lots"}"#).is_err());
        assert!(serde_json::from_str::<Settings>(r#"{"serial":"tcp"}"#).is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let file = Settings {
            kernel: Some("/a".into()),
            cpus: Some(2),
            ..Default::default()
        };
        let flags = Settings {
            cpus: Some(4),
            memory: Some("1G,shared=on".parse().unwrap()),
            ..Default::default()
        };
        let m = file.merge(flags);
        assert_eq!(
            (m.kernel, m.cpus, m.memory),
            (
                Some("/a".into()),
                Some(4),
                Some(MemoryArg {
                    size: Size(1 << 30),
                    shared: Some(true)
                })
            )
        );
    }

    fn fake_bzimage() -> PathBuf {
        let path = std::env::temp_dir().join(format!("nixvm-cfg-{}-bz", std::process::id()));
        let mut b = vec![0u8; 0x1000];
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        File::create(&path).unwrap().write_all(&b).unwrap();
        path
    }

    #[test]
    fn validation() {
        let k = fake_bzimage();
        let base = || Settings {
            kernel: Some(k.clone()),
            ..Default::default()
        };
        let v = VmConfig::validate(base(), 1 << 40).unwrap();
        assert_eq!(
            (v.cpus, v.memory, v.serial.clone(), v.kernel_format.as_str()),
            (1, DEFAULT_MEMORY, SerialConfig::Stdio, "bzImage")
        );
        assert_eq!(v.cmdline, DEFAULT_CMDLINE);
        let with = |f: fn(&mut Settings)| {
            let mut c = base();
            f(&mut c);
            VmConfig::validate(c, 1 << 40)
        };
        assert!(matches!(with(|c| c.cpus = Some(0)), Err(Error::NoCpus)));
        // Memory is private unless asked for or a vhost-user device needs it shared.
        assert!(!v.shared_memory);
        assert!(
            with(|c| c.shared_memory = Some(true))
                .unwrap()
                .shared_memory
        );
        let share = |tag: &str, q: u16| FsConfig {
            tag: tag.into(),
            socket: Some("/s".into()),
            path: None,
            readonly: false,
            queue_size: q,
            queues: None,
        };
        let dir = |spec: &str| {
            let mut f: FsConfig = spec.parse().unwrap();
            f.path = f.path.map(|_| std::env::temp_dir());
            f
        };
        let mut c = base();
        c.fs = Some(vec![share("ro-store", 1024)]);
        assert!(VmConfig::validate(c, 1 << 40).unwrap().shared_memory);
        let mut c = base();
        c.fs = Some(vec![dir("tag=a,path=/d,readonly=on")]);
        assert!(VmConfig::validate(c, 1 << 40).unwrap().shared_memory);
        let mut c = base();
        let mut missing = dir("tag=a,path=/d,readonly=on");
        missing.path = Some("/nonexistent/nixvm-share".into());
        c.fs = Some(vec![missing]);
        assert!(matches!(
            VmConfig::validate(c, 1 << 40),
            Err(Error::FsDir(p)) if p == Path::new("/nonexistent/nixvm-share")
        ));
        for (shares, want) in [
            (vec![share("", 8)], "tag"),
            (vec![share(&"x".repeat(37), 1024)], "tag"),
            (vec![share("a", 100)], "queue"),
            (vec![share("a", 8)], "queue"),
            (vec![share("a", 1024), share("a", 1024)], "dup"),
            (vec![dir("tag=a")], "source"),
            (vec![dir("tag=a,socket=/s,path=/d,readonly=on")], "source"),
            (vec![dir("tag=a,path=/d")], "not-ro"),
            (vec![dir("tag=a,socket=/s,readonly=on")], "ro-socket"),
            (vec![dir("tag=a,path=/d,readonly=on,queues=0")], "queues"),
            (vec![dir("tag=a,path=/d,readonly=on,queues=17")], "queues"),
            (vec![dir("tag=a,socket=/s,queues=17")], "queues"),
        ] {
            let mut c = base();
            c.fs = Some(shares);
            let e = VmConfig::validate(c, 1 << 40).unwrap_err();
            let ok = match want {
                "tag" => matches!(e, Error::FsTag(_)),
                "queue" => matches!(e, Error::FsQueueSize(_)),
                "source" => matches!(e, Error::FsSource(_)),
                "not-ro" => matches!(e, Error::FsNotReadOnly(_)),
                "ro-socket" => matches!(e, Error::FsReadOnlySocket(_)),
                "queues" => matches!(e, Error::FsQueues(_)),
                _ => matches!(e, Error::FsDuplicateTag(_)),
            };
            assert!(ok, "{e}");
        }
        assert!(matches!(
            with(|c| c.cpus = Some(255)),
            Err(Error::TooManyCpus(255))
        ));
        assert!(matches!(
            with(|c| c.memory = Some(Size(63 << 20).into())),
            Err(Error::MemoryTooSmall(_))
        ));
        assert!(matches!(
            with(|c| c.memory = Some(Size(2 << 40).into())),
            Err(Error::MemoryTooLarge { .. })
        ));
        assert!(matches!(with(|c| c.kernel = None), Err(Error::NoKernel)));
        assert!(matches!(
            with(|c| c.kernel = Some("/nonexistent/k".into())),
            Err(Error::Kernel(kernel::Error::Read { .. }))
        ));
        assert!(matches!(
            with(|c| c.kernel = Some("/etc/hostname".into())),
            Err(Error::Kernel(kernel::Error::UnknownFormat { .. }))
        ));
        assert!(matches!(
            with(|c| c.initrd = Some("/nonexistent/i".into())),
            Err(Error::Initrd { .. })
        ));
        assert!(matches!(
            with(|c| c.serial = Some(SerialConfig::Socket("/nonexistent/dir/s".into()))),
            Err(Error::SerialDir { .. })
        ));
        assert!(matches!(
            with(|c| c.cmdline = Some("x".repeat(4000))),
            Err(Error::Cmdline(_))
        ));
        // An initrd bigger than memory.
        let big = std::env::temp_dir().join(format!("nixvm-cfg-{}-big", std::process::id()));
        File::create(&big).unwrap().set_len(100 << 20).unwrap();
        let mut c = base();
        c.initrd = Some(big.clone());
        c.memory = Some(Size(64 << 20).into());
        assert!(matches!(
            VmConfig::validate(c, 1 << 40),
            Err(Error::InitrdTooLarge { .. })
        ));
        assert!(host_memory() > 64 << 20);
        // Disks: whole sectors, present, serial of at most 20 bytes.
        let disk = |p: &Path| DiskConfig {
            path: p.to_owned(),
            ..Default::default()
        };
        let odd = std::env::temp_dir().join(format!("nixvm-cfg-{}-odd", std::process::id()));
        File::create(&odd).unwrap().set_len(1000).unwrap();
        let with_disk = |d: DiskConfig| {
            let mut c = base();
            c.disks = Some(vec![d]);
            VmConfig::validate(c, 1 << 40)
        };
        assert!(matches!(
            with_disk(disk(&odd)),
            Err(Error::Disk(block::Error::Size { size: 1000, .. }))
        ));
        assert!(matches!(
            with_disk(disk(Path::new("/nonexistent/disk.img"))),
            Err(Error::Disk(block::Error::Open { .. }))
        ));
        let long_serial = DiskConfig {
            serial: Some("x".repeat(21)),
            ..disk(&k)
        };
        assert!(matches!(with_disk(long_serial), Err(Error::DiskSerial(_))));
        std::fs::File::create(&odd).unwrap().set_len(4096).unwrap();
        let v = with_disk(disk(&odd)).unwrap();
        assert_eq!((v.disks.len(), v.rng), (1, true));
    }
}
