//! The values of the options: sizes, the consoles, and the `key=value,…` specs of
//! --disk, --net, --fs and --memory (one parser, [`key_values`]). Each is the flag's value,
//! the JSON field's value and, once `VmConfig::validate` has checked it, the VM's.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nixvm_devices::virtio::block;
use serde::{Deserialize, Serialize};

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

/// Where a console goes (`--serial`, `--console`): `stdio`, `off`, `file=PATH`,
/// `socket=PATH` (nixvm listens; one client at a time, the last 64 KiB replayed to it) or
/// `connect=PATH` (nixvm connects to a socket another program listens on).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ConsoleConfig {
    #[default]
    Stdio,
    Off,
    File(PathBuf),
    Socket(PathBuf),
    Connect(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid console {0:?}: use stdio, off, file=PATH, socket=PATH or connect=PATH")]
pub struct ConsoleError(String);

impl FromStr for ConsoleConfig {
    type Err = ConsoleError;
    fn from_str(s: &str) -> std::result::Result<Self, ConsoleError> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "off" => Ok(ConsoleConfig::Off),
            _ => match s.split_once('=') {
                Some(("file", p)) if !p.is_empty() => Ok(ConsoleConfig::File(p.into())),
                Some(("socket", p)) if !p.is_empty() => Ok(ConsoleConfig::Socket(p.into())),
                Some(("connect", p)) if !p.is_empty() => Ok(ConsoleConfig::Connect(p.into())),
                _ => Err(ConsoleError(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleConfig::Stdio => f.write_str("stdio"),
            ConsoleConfig::Off => f.write_str("off"),
            ConsoleConfig::File(p) => write!(f, "file={}", p.display()),
            ConsoleConfig::Socket(p) => write!(f, "socket={}", p.display()),
            ConsoleConfig::Connect(p) => write!(f, "connect={}", p.display()),
        }
    }
}

impl Serialize for ConsoleConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConsoleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where the human monitor is (`--monitor`): `socket=PATH` (nixvm listens) or `connect=PATH`
/// (nixvm connects to a socket a test driver listens on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MonitorConfig {
    Socket(PathBuf),
    Connect(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid monitor {0:?}: use socket=PATH or connect=PATH")]
pub struct MonitorError(String);

impl FromStr for MonitorConfig {
    type Err = MonitorError;
    fn from_str(s: &str) -> std::result::Result<Self, MonitorError> {
        match ConsoleConfig::from_str(s) {
            Ok(ConsoleConfig::Socket(p)) => Ok(MonitorConfig::Socket(p)),
            Ok(ConsoleConfig::Connect(p)) => Ok(MonitorConfig::Connect(p)),
            _ => Err(MonitorError(s.to_owned())),
        }
    }
}

impl fmt::Display for MonitorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MonitorConfig::Socket(p) => write!(f, "socket={}", p.display()),
            MonitorConfig::Connect(p) => write!(f, "connect={}", p.display()),
        }
    }
}

impl Serialize for MonitorConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MonitorConfig {
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
/// --memory's tail): the pairs in order, or None if a key is empty or given twice. A bare
/// `key` is `key=` (an empty value), which only options that take one accept (`passt`).
/// Values are checked by the option that knows them.
pub fn key_values(s: &str) -> Option<Vec<(&str, &str)>> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for part in s.split(',') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
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

/// One `--net`: `tap=NAME`, `fd=N`, `socket=PATH`, `vde=DIR`,
/// `passt[=PROGRAM][,forward=PORTS]` or `local`,
/// each `[,mac=MAC]`; in JSON an object with the same names (`{"tap": "tap0", "mac":
/// "52:54:00:12:34:56"}`, `{"passt": "passt", "forward": ["2222:22"]}`, `{"local": true}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// A UNIX stream socket to connect to, speaking QEMU's `-netdev stream` protocol
    /// (`passt --socket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// A `vde_switch`'s directory (`vde_switch -s DIR`): a port on that switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vde: Option<PathBuf>,
    /// The passt program nixvm starts for this interface (bare `passt`: from PATH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passt: Option<PathBuf>,
    /// Host ports passt forwards to the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<Forward>,
    /// A link that reaches only nixvm, which answers DHCP, ARP and ping as the gateway of
    /// 10.0.2.0/24 (`devices::virtio::net::local`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
}

impl NetConfig {
    /// How many of tap, fd, socket, vde, passt and local are given (one is right).
    pub fn kinds(&self) -> usize {
        [
            self.tap.is_some(),
            self.fd.is_some(),
            self.socket.is_some(),
            self.vde.is_some(),
            self.passt.is_some(),
            self.local,
        ]
        .into_iter()
        .filter(|&b| b)
        .count()
    }

    pub const SYNTAX: &'static str = "tap=NAME, fd=N, socket=PATH, vde=DIR, \
        passt[=PROGRAM][,forward=[udp:][ADDR/]HOSTPORT[:GUESTPORT][+...]] or local, each \
        [,mac=MAC]";
}

/// A host port passt forwards to the guest: `[tcp:|udp:][ADDR/]HOSTPORT[:GUESTPORT]`, the
/// guest port the host port's number unless given; ADDR binds one host address only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub udp: bool,
    pub host_addr: Option<std::net::IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
}

impl Forward {
    /// The forward as passt's -t/-u port specification.
    pub fn passt_spec(&self) -> String {
        let addr = self.host_addr.map(|a| format!("{a}/")).unwrap_or_default();
        format!("{addr}{}:{}", self.host_port, self.guest_port)
    }
}

impl FromStr for Forward {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let (udp, rest) = match s.split_once(':') {
            Some(("udp", r)) => (true, r),
            Some(("tcp", r)) => (false, r),
            _ => (false, s),
        };
        let (host_addr, ports) = match rest.rsplit_once('/') {
            Some((a, p)) => (Some(a.parse().map_err(|_| ())?), p),
            None => (None, rest),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or(());
        let (host_port, guest_port) = match ports.split_once(':') {
            Some((h, g)) => (port(h)?, port(g)?),
            None => (port(ports)?, port(ports)?),
        };
        Ok(Forward {
            udp,
            host_addr,
            host_port,
            guest_port,
        })
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = if self.udp { "udp:" } else { "" };
        write!(f, "{proto}{}", self.passt_spec())
    }
}

impl Serialize for Forward {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Forward {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|()| {
            serde::de::Error::custom(format!(
                "invalid port forward {s:?}: use [udp:][ADDR/]HOSTPORT[:GUESTPORT]"
            ))
        })
    }
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
                "socket" if !v.is_empty() => net.socket = Some(v.into()),
                "vde" if !v.is_empty() => net.vde = Some(v.into()),
                "passt" => net.passt = Some(if v.is_empty() { "passt" } else { v }.into()),
                "local" if v.is_empty() => net.local = true,
                "forward" => {
                    net.forward = v
                        .split('+')
                        .map(str::parse)
                        .collect::<std::result::Result<_, ()>>()
                        .map_err(|()| err())?;
                }
                "mac" => net.mac = Some(v.parse().map_err(|()| err())?),
                _ => return Err(err()),
            }
        }
        if net.kinds() != 1 || (!net.forward.is_empty() && net.passt.is_none()) {
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

/// How the virtio devices attach to the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio: a 4 KiB register window and an interrupt line each (described by ACPI,
    /// or by the command line with acpi=off).
    #[default]
    Mmio,
    /// virtio-pci on PCI bus 0, interrupts by MSI-X.
    Pci,
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

/// `--vsock cid=N[,socket=PATH]`: the virtio-vsock device with guest CID N; host programs
/// connect to PATH (`CONNECT <port>\n`) and the guest's connections to host port P reach
/// `PATH_P`. In JSON an object with the same names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub cid: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl VsockConfig {
    pub const SYNTAX: &'static str = "cid=N[,socket=PATH]";
    /// The CID a VM gets when only readiness needs the device (`--notify-socket`).
    pub const DEFAULT_CID: u64 = 3;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid vsock device {0:?}: use {syntax}", syntax = VsockConfig::SYNTAX)]
pub struct VsockError(String);

impl FromStr for VsockConfig {
    type Err = VsockError;
    fn from_str(s: &str) -> std::result::Result<Self, VsockError> {
        let err = || VsockError(s.to_owned());
        let (mut cid, mut socket) = (None, None);
        for (k, v) in key_values(s).ok_or_else(err)? {
            match (k, v) {
                ("cid", v) => cid = Some(v.parse().map_err(|_| err())?),
                ("socket", v) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => return Err(err()),
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or_else(err)?,
            socket,
        })
    }
}
