//! The VM's configuration: one struct that the JSON config file and the command line both
//! fill (flags override the file), and one `validate` that checks it before anything starts.
use std::fs::File;
use std::path::{Path, PathBuf};

use nixvm_boot::kernel::{self, KernelFormat};
use nixvm_boot::layout::MIN_MEMORY;
use nixvm_devices::seccomp::Mode;
use nixvm_devices::virtio::block;
use serde::{Deserialize, Serialize};

pub mod qemu;
mod specs;
pub use specs::*;

/// Most vCPUs a VM can have: xAPIC ids in the MADT are 8 bits and 0xff is the broadcast id.
pub const MAX_CPUS: u32 = 254;
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY: Size = Size(512 << 20);
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
pub const DEFAULT_SHUTDOWN_TIMEOUT: u64 = 30;
/// virtio devices a VM can have: one interrupt line each.
pub const MAX_DEVICES: usize = nixvm_boot::layout::DEVICE_GSIS.len();
use crate::lifecycle::MAX_SHUTDOWN_TIMEOUT;
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
        "{0} virtio devices (disks, network interfaces, shares, rng, vsock, console) are more than nixvm can attach (at most {MAX_DEVICES})"
    )]
    TooManyDevices(usize),
    #[error("--transport pci needs ACPI, which the kernel command line turns off (acpi=off)")]
    PciWithoutAcpi,
    #[error("TAP name {0:?} is not a valid interface name (1 to {IFNAME_MAX} bytes, no '/')")]
    TapName(String),
    #[error("fd {0} of a network interface is not a file descriptor number")]
    NetFd(i32),
    #[error("a network interface needs exactly one of tap=, fd=, socket=, vde=, passt and local")]
    NetKind,
    #[error("forward= is for passt network interfaces (--net passt,forward=...)")]
    ForwardWithoutPasst,
    #[error("host port {0} is forwarded twice")]
    DuplicateForward(String),
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
    #[error(
        "--shutdown-timeout {0} is more than the {MAX_SHUTDOWN_TIMEOUT} seconds nixvm can wait"
    )]
    ShutdownTimeout(u64),
    #[error("fd {0} is given to two network interfaces; each needs its own TAP fd")]
    DuplicateNetFd(i32),
    #[error("the directory of control socket {0} does not exist")]
    ApiSocketDir(PathBuf),
    #[error("the directory of QMP socket {0} does not exist")]
    QmpDir(PathBuf),
    #[error("the directory of monitor socket {0} does not exist")]
    MonitorDir(PathBuf),
    #[error("the directory of {which} {kind} {path} does not exist")]
    ConsoleDir {
        which: &'static str,
        kind: &'static str,
        path: PathBuf,
    },
    #[error(
        "--serial and --console cannot both be stdio: send one elsewhere (off, file=, socket=, connect=)"
    )]
    TwoStdioConsoles,
    #[error("--uuid {0:?} is not a UUID (like 12345678-9abc-def0-1234-56789abcdef0)")]
    Uuid(String),
    #[error("--smbios-oem-string {0:?} must not be empty or hold a NUL byte")]
    OemString(String),
    #[error("--credential {0:?} is not NAME=VALUE or NAME=@FILE with a file name as NAME")]
    Credential(String),
    #[error("cannot read the file of credential {name}: {path}")]
    CredentialFile {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--vsock cid={0}: a guest's CID must be from 3 to 4294967294")]
    VsockCid(u64),
    #[error("the directory of vsock socket {0} does not exist")]
    VsockDir(PathBuf),
    #[error(
        "the credentials and OEM strings take {0} bytes, more than the SMBIOS tables hold ({room} bytes): pass large secrets another way (a virtio-fs share)",
        room = nixvm_boot::smbios::OEM_STRINGS_ROOM
    )]
    SmbiosTooLarge(usize),
    #[error(transparent)]
    Qemu(#[from] qemu::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

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
    /// Serial console (ttyS0): stdio, off, file=PATH, socket=PATH (nixvm listens) or
    /// connect=PATH (nixvm connects) [default: stdio, or off when --console is stdio].
    #[arg(long, value_name = "WHERE")]
    pub serial: Option<ConsoleConfig>,
    /// A virtio-console (hvc0): stdio, off, file=PATH, socket=PATH (nixvm listens) or
    /// connect=PATH (nixvm connects) [default: off, no device].
    #[arg(long, value_name = "WHERE")]
    pub console: Option<ConsoleConfig>,
    /// A virtio-blk disk, path=PATH[,readonly=on][,serial=STR][,direct=on]; repeatable: the
    /// first is the guest's /dev/vda, the next /dev/vdb, ...
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Option<Vec<DiskConfig>>,
    /// A virtio-net interface: on an existing TAP, tap=NAME; on an inherited TAP/macvtap fd,
    /// fd=N; on a UNIX stream socket speaking QEMU's -netdev stream protocol, socket=PATH
    /// (passt --socket); on a port of a vde_switch, vde=DIR (the switch's -s directory, as
    /// QEMU's -netdev vde,sock=DIR); on a passt that nixvm starts, passt[=PROGRAM][,forward=[udp:][ADDR/]HOSTPORT[:GUESTPORT][+...]] (host ports to
    /// the guest); or on a link to nixvm alone, local (it answers DHCP with 10.0.2.15/24,
    /// and ARP and ping for the gateway 10.0.2.2; nothing else goes anywhere). vde=, passt
    /// and local need no root. Each [,mac=MAC]; repeatable: eth0, eth1, ... Without mac= the
    /// MAC is 02: and five bytes of a hash of the TAP's name, socket's path, "vde:DIR",
    /// "passt" or "local" with the interface's index.
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
    /// How virtio devices attach: mmio (a register window and interrupt line each) or pci
    /// (virtio-pci on a PCI bus with MSI-X interrupts, which the guest takes without an exit
    /// to nixvm; needs ACPI) [default: mmio].
    #[arg(long, value_name = "mmio|pci", value_enum)]
    pub transport: Option<Transport>,
    /// A control socket (mode 0600) for `nixvm ctl`: JSON lines, see README.md.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// A QMP socket (mode 0600): QEMU's machine protocol, the subset test drivers use
    /// (query-status, stop, cont, system_powerdown, system_reset, quit; events).
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,
    /// QEMU's human monitor (the commands test drivers type): socket=PATH (nixvm listens)
    /// or connect=PATH (nixvm connects). The VM then has a PS/2 keyboard its sendkey types on.
    #[arg(long, value_name = "socket=PATH|connect=PATH")]
    pub monitor: Option<MonitorConfig>,
    /// Seconds a guest has to power off after the power button (SIGTERM, `ctl shutdown`)
    /// before nixvm stops it [default: 30].
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,
    /// What a guest reboot does: exit (status 3, for a supervisor to start nixvm again) or
    /// restart (boot the VM again in place: fresh memory, devices reset) [default: exit].
    #[arg(long, value_name = "exit|restart", value_enum)]
    pub on_reboot: Option<OnReboot>,
    /// Seccomp filters on every nixvm thread: on (a system call outside a thread's list stops
    /// nixvm, naming the call), log (the kernel logs such calls and lets them through), off
    /// [default: on].
    #[arg(long, value_name = "on|log|off")]
    pub seccomp: Option<Mode>,
    /// The system UUID the guest sees (SMBIOS type 1: /sys/class/dmi/id/product_uuid)
    /// [default: none, all zeros].
    #[arg(long, value_name = "UUID")]
    pub uuid: Option<String>,
    /// An SMBIOS OEM string (type 11) for the guest; repeatable.
    #[arg(long = "smbios-oem-string", value_name = "STR")]
    pub oem_strings: Option<Vec<String>>,
    /// A systemd credential for the guest, NAME=VALUE or NAME=@FILE (the file's bytes): an
    /// SMBIOS OEM string `io.systemd.credential.binary:NAME=<base64>`, which the guest's
    /// systemd puts in /run/credentials/@system/NAME. Repeatable.
    #[arg(long = "credential", value_name = "NAME=VALUE|NAME=@FILE")]
    pub credentials: Option<Vec<String>>,
    /// A virtio-vsock device, cid=N[,socket=PATH]: the guest's CID (3 or more); host programs
    /// connect to the UNIX socket PATH and write `CONNECT <port>\n` to reach guest port
    /// <port>; the guest's connections to host port P reach the UNIX socket PATH_P.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<VsockConfig>,
    /// Relay the guest's systemd readiness (READY=1, STATUS=, STOPPING=1) to this sd_notify
    /// socket (a path, or @name for an abstract one) [default: $NOTIFY_SOCKET].
    #[arg(long, value_name = "PATH")]
    pub notify_socket: Option<String>,
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
    pub serial: ConsoleConfig,
    /// The virtio-console (hvc0); Off: no device.
    pub console: ConsoleConfig,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub fs: Vec<FsConfig>,
    /// Guest RAM is a shared memfd mapping (vhost-user backends map it), else private
    /// anonymous memory.
    pub shared_memory: bool,
    pub rng: bool,
    pub transport: Transport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qmp: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorConfig>,
    /// Seconds between pressing the power button and stopping the VM hard.
    pub shutdown_timeout: u64,
    pub on_reboot: OnReboot,
    pub seccomp: Mode,
    /// The SMBIOS system UUID, canonical form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// SMBIOS type 11 strings: the --smbios-oem-string ones, then the credentials. Not
    /// shown by `--dry-run` or `ctl info` (they may be secrets): only their number.
    #[serde(serialize_with = "count_only")]
    pub oem_strings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Where the guest's readiness goes (the vsock device relays it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_socket: Option<String>,
}

fn count_only<S: serde::Serializer>(v: &[String], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(v.len() as u64)
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
        let console = file.console.unwrap_or(ConsoleConfig::Off);
        let serial = file.serial.unwrap_or(if console == ConsoleConfig::Stdio {
            ConsoleConfig::Off
        } else {
            ConsoleConfig::Stdio
        });
        if serial == ConsoleConfig::Stdio && console == ConsoleConfig::Stdio {
            return Err(Error::TwoStdioConsoles);
        }
        for (which, c) in [("serial", &serial), ("console", &console)] {
            let (kind, path) = match c {
                ConsoleConfig::File(p) => ("file", p),
                ConsoleConfig::Socket(p) => ("socket", p),
                _ => continue,
            };
            if !parent_dir_exists(path) {
                return Err(Error::ConsoleDir {
                    which,
                    kind,
                    path: path.clone(),
                });
            }
        }
        if let Some(p) = file.api_socket.as_ref().filter(|p| !parent_dir_exists(p)) {
            return Err(Error::ApiSocketDir(p.clone()));
        }
        if let Some(p) = file.qmp.as_ref().filter(|p| !parent_dir_exists(p)) {
            return Err(Error::QmpDir(p.clone()));
        }
        if let Some(MonitorConfig::Socket(p)) = file.monitor.as_ref() {
            if !parent_dir_exists(p) {
                return Err(Error::MonitorDir(p.clone()));
            }
        }
        let disks = file.disks.unwrap_or_default();
        for d in &disks {
            check_disk(d)?;
        }
        let nets = file.nets.unwrap_or_default();
        for (i, n) in nets.iter().enumerate() {
            check_net(n)?;
            if let Some(fd) =
                n.fd.filter(|fd| nets[..i].iter().any(|m| m.fd == Some(*fd)))
            {
                return Err(Error::DuplicateNetFd(fd));
            }
        }
        let shutdown_timeout = file.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
        if shutdown_timeout > MAX_SHUTDOWN_TIMEOUT {
            return Err(Error::ShutdownTimeout(shutdown_timeout));
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
        let notify_socket = file.notify_socket.filter(|s| !s.is_empty());
        let mut vsock = file.vsock;
        if let Some(v) = &vsock {
            // 0-2 are the hypervisor, local and host; u32::MAX is "any".
            if !(3..u64::from(u32::MAX)).contains(&v.cid) {
                return Err(Error::VsockCid(v.cid));
            }
            if let Some(p) = v.socket.as_ref().filter(|p| !parent_dir_exists(p)) {
                return Err(Error::VsockDir(p.clone()));
            }
        }
        if notify_socket.is_some() {
            vsock.get_or_insert(VsockConfig {
                cid: VsockConfig::DEFAULT_CID,
                socket: None,
            });
        }
        let devices = disks.len()
            + nets.len()
            + fs.len()
            + usize::from(rng)
            + usize::from(vsock.is_some())
            + usize::from(console != ConsoleConfig::Off);
        if devices > MAX_DEVICES {
            return Err(Error::TooManyDevices(devices));
        }
        let transport = file.transport.unwrap_or_default();
        if transport == Transport::Pci && cmdline.split_whitespace().any(|w| w == "acpi=off") {
            return Err(Error::PciWithoutAcpi);
        }
        let uuid = match &file.uuid {
            Some(u) => Some(
                uuid::Uuid::try_parse(u)
                    .map_err(|_| Error::Uuid(u.clone()))?
                    .hyphenated()
                    .to_string(),
            ),
            None => None,
        };
        let mut oem_strings = file.oem_strings.unwrap_or_default();
        if let Some(bad) = oem_strings
            .iter()
            .find(|s| s.is_empty() || s.contains('\0'))
        {
            return Err(Error::OemString(bad.clone()));
        }
        for c in file.credentials.unwrap_or_default() {
            oem_strings.push(credential(&c)?);
        }
        if notify_socket.is_some() {
            // systemd (v254+) reads where to send its notifications from this credential.
            oem_strings.push(format!(
                "io.systemd.credential:vmm.notify_socket=vsock-stream:2:{}",
                nixvm_devices::virtio::vsock::NOTIFY_PORT
            ));
        }
        let smbios: usize = oem_strings.iter().map(|s| s.len() + 1).sum();
        if smbios > nixvm_boot::smbios::OEM_STRINGS_ROOM {
            return Err(Error::SmbiosTooLarge(smbios));
        }
        Ok(VmConfig {
            kernel,
            kernel_format: format.to_string(),
            initrd: file.initrd,
            cmdline,
            cpus: u8::try_from(cpus).expect("checked against MAX_CPUS"),
            memory,
            serial,
            console,
            disks,
            nets,
            fs,
            shared_memory,
            rng,
            transport,
            api_socket: file.api_socket,
            qmp: file.qmp,
            monitor: file.monitor,
            shutdown_timeout,
            on_reboot: file.on_reboot.unwrap_or_default(),
            seccomp: file.seccomp.unwrap_or(Mode::On),
            uuid,
            oem_strings,
            vsock,
            notify_socket,
        })
    }

    /// Whether a console is on nixvm's stdin and stdout.
    pub fn has_stdio_console(&self) -> bool {
        self.serial == ConsoleConfig::Stdio || self.console == ConsoleConfig::Stdio
    }

    /// What the SMBIOS tables say about this VM.
    pub fn smbios(&self) -> nixvm_boot::smbios::SmbiosConfig {
        nixvm_boot::smbios::SmbiosConfig {
            uuid: self
                .uuid
                .as_deref()
                .and_then(|u| uuid::Uuid::try_parse(u).ok())
                .map_or([0; 16], |u| u.to_bytes_le()),
            oem_strings: self.oem_strings.clone(),
        }
    }
}

/// A `--credential NAME=VALUE|NAME=@FILE` as its OEM string. NAME is what systemd accepts as a
/// credential name: a file name (not empty, `.` or `..`, no `/`, at most 255 bytes).
fn credential(spec: &str) -> Result<String> {
    let bad = || Error::Credential(spec.to_owned());
    let (name, value) = spec.split_once('=').ok_or_else(bad)?;
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.contains(['/', '\0'])
    {
        return Err(bad());
    }
    let bytes = match value.strip_prefix('@') {
        Some(path) => std::fs::read(path).map_err(|source| Error::CredentialFile {
            name: name.to_owned(),
            path: path.into(),
            source,
        })?,
        None => value.as_bytes().to_vec(),
    };
    Ok(nixvm_boot::smbios::credential_string(name, &bytes))
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

/// One of tap=, fd=, socket=, vde=, passt and local, a name an interface can have, forwards only for
/// passt and each host port once, a unicast MAC. Whether the TAP exists and may be
/// attached, or the socket listens, is found when the VM starts (a running VM may hold it
/// now).
fn check_net(n: &NetConfig) -> Result<()> {
    if n.kinds() != 1 {
        return Err(Error::NetKind);
    }
    match (&n.tap, n.fd) {
        (Some(t), _) if t.is_empty() || t.len() > IFNAME_MAX || t.contains(['/', '\0']) => {
            return Err(Error::TapName(t.clone()));
        }
        (_, Some(fd)) if fd < 0 => return Err(Error::NetFd(fd)),
        _ => {}
    }
    if !n.forward.is_empty() && n.passt.is_none() {
        return Err(Error::ForwardWithoutPasst);
    }
    for (i, f) in n.forward.iter().enumerate() {
        if n.forward[..i]
            .iter()
            .any(|g| g.udp == f.udp && g.host_port == f.host_port)
        {
            return Err(Error::DuplicateForward(f.to_string()));
        }
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
mod tests;
