//! Building and running a VM, as one ordered recipe: open KVM, create the VM and its memory,
//! load the kernel and initrd, write the boot tables, create the devices and vCPUs; then run
//! one thread per vCPU and the event loop on this thread until the VM ends.
use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use nixvm_boot::{acpi, cpu, kernel, layout, params, smbios};
use nixvm_devices::console::{ConsoleOut, SocketConsole};
use nixvm_devices::virtio::GuestMemoryMmap;
use nixvm_devices::virtio::console::ConsoleInput;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{
    FileOffset, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::{ConsoleConfig, MonitorConfig, OnReboot, VmConfig};
use crate::console::{Controller, Input, Port};
use crate::control::{Control, ControlParts, MonitorEnd, VmInfo};
use crate::device_manager::{self, Devices};
use crate::lifecycle::{self, Exit, ExitState, PauseGate};
use crate::seccomp;
use crate::unix::Listener;
use crate::vcpu::Buses;
use crate::{cpuid, terminal, unix, vcpu};
use nixvm_storefs::daemon as storefs;

/// Where nixvm looks for KVM; `NIXVM_KVM_DEVICE` overrides it (tests use this).
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0} does not exist: this host has no KVM (enable virtualization, load kvm-intel or kvm-amd)"
    )]
    KvmMissing(PathBuf),
    #[error("{0} is not readable and writable by this user: add the user to the `kvm` group")]
    KvmAccess(PathBuf),
    #[error("cannot open {path}")]
    KvmOpen {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0} is not a KVM device")]
    NotKvm(PathBuf),
    #[error("{path} speaks KVM API version {version}, nixvm needs 12")]
    KvmApi { path: PathBuf, version: i32 },
    #[error("this host's KVM lacks the capability {0}, which nixvm needs")]
    KvmCap(&'static str),
    #[error("--cpus {cpus} is more than this host's KVM allows ({max})")]
    TooManyVcpus { cpus: u8, max: usize },
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("cannot allocate {0} bytes of guest memory")]
    Memory(u64, #[source] std::io::Error),
    #[error("cannot map guest memory")]
    MapMemory(#[source] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Kernel(#[from] kernel::Error),
    #[error(transparent)]
    Params(#[from] params::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Smbios(#[from] smbios::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("cannot create {which} file {path}")]
    ConsoleFile {
        which: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    ConsoleSocket(&'static str, #[source] unix::Error),
    #[error("cannot connect the {which} to {path}")]
    ConsoleConnect {
        which: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket")]
    ApiSocket(#[source] unix::Error),
    #[error("vsock socket")]
    VsockSocket(#[source] unix::Error),
    #[error("QMP socket")]
    QmpSocket(#[source] unix::Error),
    #[error("monitor socket")]
    MonitorSocket(#[source] unix::Error),
    #[error("cannot connect the monitor to {path}")]
    MonitorConnect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("seccomp")]
    Seccomp(#[source] crate::seccomp::Error),
}

impl Error {
    /// Errors that are the user's to fix (exit status 2), as opposed to failures.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::KvmMissing(_)
            | Error::KvmAccess(_)
            | Error::NotKvm(_)
            | Error::KvmApi { .. }
            | Error::KvmCap(_)
            | Error::TooManyVcpus { .. }
            | Error::Kernel(_)
            | Error::ConsoleFile { .. }
            | Error::ConsoleConnect { .. }
            | Error::MonitorConnect { .. } => true,
            Error::Devices(e) => e.is_usage(),
            Error::Params(e) => !matches!(e, params::Error::Write(_)),
            Error::ConsoleSocket(_, e)
            | Error::ApiSocket(e)
            | Error::VsockSocket(e)
            | Error::QmpSocket(e)
            | Error::MonitorSocket(e) => !matches!(e, unix::Error::Bind { .. }),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A KVM ioctl that failed, and what nixvm was doing with it.
#[derive(Debug, thiserror::Error)]
#[error("KVM failed to {what}")]
pub struct KvmError {
    what: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

/// For `map_err` on a KVM call: names what it was for.
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError { what, source }
}

/// Opens KVM with errors that say what to do.
pub fn open_kvm() -> Result<Kvm> {
    let path = PathBuf::from(
        std::env::var_os("NIXVM_KVM_DEVICE").unwrap_or_else(|| DEFAULT_KVM_DEVICE.into()),
    );
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::KvmMissing(path.clone()))?;
    let kvm = Kvm::new_with_path(&c).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing(path.clone()),
        libc::EACCES | libc::EPERM | libc::EROFS => Error::KvmAccess(path.clone()),
        _ => Error::KvmOpen {
            path: path.clone(),
            source,
        },
    })?;
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(Error::NotKvm(path));
    }
    if version != 12 {
        return Err(Error::KvmApi { path, version });
    }
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::Ioeventfd, "IOEVENTFD"),
        (Cap::UserMemory, "USER_MEMORY"),
        (Cap::SetTssAddr, "SET_TSS_ADDR"),
        (Cap::SetIdentityMapAddr, "SET_IDENTITY_MAP_ADDR"),
        (Cap::ExtCpuid, "EXT_CPUID"),
        (Cap::Pit2, "PIT2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    Ok(kvm)
}

/// Guest RAM, split around the 32-bit MMIO gap: one memfd mapped shared when `shared` (so
/// vhost-user back ends can map it), else private anonymous memory. Each region is mapped at a
/// 2 MiB-aligned address and advised for transparent huge pages (as QEMU and Cloud Hypervisor
/// do): KVM maps the guest with 2 MiB pages only where the host's mapping is huge and aligned
/// like the guest address, and 4 KiB mappings cost a fault per page (issue 18: ~20 000 of
/// them while the test guest boots, where QEMU took under 200).
fn create_memory(size: u64, shared: bool) -> Result<GuestMemoryMmap> {
    let file = if shared {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked below.
        let fd = unsafe { libc::memfd_create(c"nixvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memory(size, std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|e| Error::Memory(size, e))?;
        Some(Arc::new(file))
    } else {
        None
    };
    let mut offset = 0;
    let mut regions = Vec::new();
    for (addr, len) in layout::ram_regions(size) {
        let file_offset = file
            .as_ref()
            .map(|f| FileOffset::from_arc(f.clone(), offset));
        offset += len;
        let len = usize::try_from(len).expect("64-bit host");
        let region = map_huge_aligned(len, file_offset).map_err(|e| Error::Memory(size, e))?;
        let region = GuestRegionMmap::new(region, addr)
            .ok_or(Error::MapMemory(FromRangesError::InvalidGuestRegion))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| Error::MapMemory(FromRangesError::Collection(e)))
}

/// Maps `len` bytes (of `file` if given, shared; else private anonymous memory) at a 2 MiB
/// boundary, advised for transparent huge pages. The mapping stays for the life of the
/// process (the guest's memory does).
fn map_huge_aligned(
    len: usize,
    file: Option<FileOffset>,
) -> std::io::Result<MmapRegion<AtomicBitmap>> {
    use std::os::fd::AsRawFd;
    const HUGE: usize = 2 << 20;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = match file {
        Some(_) => libc::MAP_SHARED,
        None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    };
    let (fd, off) = match &file {
        Some(f) => (
            f.file().as_raw_fd(),
            libc::off_t::try_from(f.start()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        ),
        None => (-1, 0),
    };
    let os = std::io::Error::last_os_error;
    // SAFETY: a fresh inaccessible reservation at an address the kernel picks; nothing else
    // refers to it.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + HUGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        return Err(os());
    }
    let start = reserved as usize;
    let aligned = start.next_multiple_of(HUGE);
    // SAFETY: MAP_FIXED inside our own reservation (aligned + len <= start + len + HUGE), which
    // nothing else uses; then the reservation's unused head and tail are returned.
    let addr = unsafe {
        let addr = libc::mmap(
            aligned as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            off,
        );
        if addr != libc::MAP_FAILED {
            if aligned > start {
                libc::munmap(reserved, aligned - start);
            }
            let end = aligned + len;
            if start + len + HUGE > end {
                libc::munmap(end as *mut libc::c_void, start + len + HUGE - end);
            }
            // Only advice: a kernel without transparent huge pages says EINVAL.
            libc::madvise(addr, len, libc::MADV_HUGEPAGE);
        } else {
            libc::munmap(reserved, len + HUGE);
        }
        addr
    };
    if addr == libc::MAP_FAILED {
        return Err(os());
    }
    let mut builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
        .with_mmap_prot(prot)
        .with_mmap_flags(flags);
    if let Some(f) = file {
        builder = builder.with_file_offset(f);
    }
    // SAFETY: addr..addr + len is the mapping made above, which is never unmapped.
    unsafe { builder.with_raw_mmap_pointer(addr.cast()) }
        .build()
        .map_err(std::io::Error::other)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("two regions"),
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which the
        // Vm keeps alive as long as the VmFd.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(())
}

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: vCPU fds before the VM fd, the memory last.
    vcpus: Vec<VcpuFd>,
    /// What a reboot in place (`--on-reboot restart`) puts back.
    reset: ResetState,
    bus: Arc<Buses>,
    exit: Arc<ExitState>,
    controller: Arc<Mutex<Controller>>,
    control: Arc<Mutex<Control>>,
    gate: Arc<PauseGate>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// `nixvm storefs` processes serving `path=` shares: stopped after everything else.
    _backends: Vec<storefs::Process>,
    filters: Arc<seccomp::Filters>,
    /// The vsock device's socket file, removed at the end.
    _vsock_listener: Option<Listener>,
}

/// The machine as it was before the guest first ran.
struct ResetState {
    config: VmConfig,
    cmdline: String,
    device_aml: Vec<u8>,
    cpuids: Vec<kvm_bindings::CpuId>,
    vcpus: Vec<vcpu::InitialState>,
    irqchips: Vec<kvm_bindings::kvm_irqchip>,
    pit: kvm_bindings::kvm_pit_state2,
}

/// Loads the kernel, initrd, ACPI tables and boot parameters into guest memory; returns the
/// boot vCPU's entry state.
fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    device_aml: &[u8],
    cmdline: &str,
) -> Result<cpu::EntryState> {
    let loaded = kernel::load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(kernel::load_initrd(mem, path, &loaded, config.memory.0)?),
        None => None,
    };
    let rsdp = acpi::write_acpi_tables(
        mem,
        &acpi::AcpiConfig {
            cpus: config.cpus,
            device_aml: device_aml.to_vec(),
        },
    )?;
    smbios::write_smbios_tables(mem, &config.smbios())?;
    let boot_info = params::BootInfo {
        cmdline,
        initrd,
        rsdp,
        memory_map: layout::memory_map(config.memory.0),
    };
    let params_addr = params::write_boot_params(mem, &loaded, &boot_info)?;
    Ok(cpu::setup_entry(mem, &loaded.entry, params_addr)?)
}

/// Gives all guest memory back to the host, so that it reads as zeros again.
fn zero_memory(mem: &GuestMemoryMmap) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for r in mem.iter() {
        let len = r.len();
        let rc = match r.file_offset() {
            Some(fo) => {
                let (off, l) = (
                    i64::try_from(fo.start()).unwrap_or(i64::MAX),
                    i64::try_from(len).unwrap_or(i64::MAX),
                );
                // SAFETY: punching a hole in our own memfd, inside the region's range.
                unsafe {
                    libc::fallocate(
                        fo.file().as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        l,
                    )
                }
            }
            // SAFETY: the range is this region's private anonymous mapping; afterwards it
            // reads as zeros. No reference into it is held (the vCPUs are stopped).
            None => unsafe {
                libc::madvise(
                    r.as_ptr().cast(),
                    usize::try_from(len).expect("64-bit host"),
                    libc::MADV_DONTNEED,
                )
            },
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Vm {
    pub fn build(config: &VmConfig) -> Result<Vm> {
        // First: device threads take their filter from here as they start.
        let filters = Arc::new(seccomp::Filters::new(config.seccomp).map_err(Error::Seccomp)?);
        let (console_out, input) = open_console(&config.serial, "serial console")?;
        let virtio_console = match &config.console {
            ConsoleConfig::Off => None,
            c => Some(open_console(c, "virtio console")?),
        };
        // Also before KVM: a socket another nixvm holds is the user's to fix.
        let api_listener = match &config.api_socket {
            Some(path) => Some(Listener::bind(path).map_err(Error::ApiSocket)?),
            None => None,
        };
        let qmp_listener = match &config.qmp {
            Some(path) => Some(Listener::bind(path).map_err(Error::QmpSocket)?),
            None => None,
        };
        let monitor = match &config.monitor {
            Some(MonitorConfig::Socket(path)) => Some(MonitorEnd::Listen(
                Listener::bind(path).map_err(Error::MonitorSocket)?,
            )),
            Some(MonitorConfig::Connect(path)) => Some(MonitorEnd::Connected(
                UnixStream::connect(path).map_err(|source| Error::MonitorConnect {
                    path: path.clone(),
                    source,
                })?,
            )),
            None => None,
        };
        let vsock_listener = match config.vsock.as_ref().and_then(|v| v.socket.as_ref()) {
            Some(path) => Some(Listener::bind(path).map_err(Error::VsockSocket)?),
            None => None,
        };
        let kvm = open_kvm()?;
        let max = kvm.get_max_vcpus();
        if usize::from(config.cpus) > max {
            return Err(Error::TooManyVcpus {
                cpus: config.cpus,
                max,
            });
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        vm.set_tss_address(usize::try_from(layout::KVM_TSS_START).expect("64-bit host"))
            .map_err(kvm_err("set the TSS address"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("set the identity map address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the interrupt controllers"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create the PIT"))?;

        let mem = create_memory(config.memory.0, config.shared_memory)?;
        register_memory(&vm, &mem)?;

        let mem = GuestMemoryAtomic::new(mem);

        // Devices first: the ACPI tables (or, with acpi=off, the command line) describe them.
        let exit = Arc::new(ExitState::new().map_err(Error::EventFd)?);
        let (hvc, hvc_port) = match virtio_console {
            Some((out, input)) => {
                let drained = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
                let sink = ConsoleInput::new(drained.try_clone().map_err(Error::EventFd)?)
                    .map_err(Error::EventFd)?;
                let port = Port::new("virtio console", Box::new(sink.clone()), drained, input);
                (Some((out, sink)), Some(port))
            }
            None => (None, None),
        };
        let Devices {
            buses,
            serial,
            serial_drained: drained,
            transports,
            aml: device_aml,
            cmdline,
            backends,
            keyboard,
        } = Devices::create(
            &vm,
            &mem,
            config,
            &exit,
            console_out,
            hvc,
            vsock_listener.as_ref(),
        )?;
        let power_button = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&power_button, layout::GED_GSI)
            .map_err(kvm_err("connect the power button"))?;

        let entry = load_guest(&mem.memory(), config, &device_aml, &cmdline)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its CPUID"))?;
        let host = cpuid::Host {
            brand: cpuid::host_brand(),
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        let (mut cpuids, mut initial) = (Vec::new(), Vec::new());
        for id in 0..config.cpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            let cpuid = cpuid::for_vcpu(&supported, id, config.cpus, &host);
            vcpu::configure(&vcpu, id, &cpuid, (id == 0).then_some(&entry))?;
            if config.on_reboot == OnReboot::Restart {
                initial.push(vcpu::InitialState::save(&vcpu, id)?);
            }
            cpuids.push(cpuid);
            vcpus.push(vcpu);
        }
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm_err("read the interrupt controllers"))?;
            irqchips.push(chip);
        }
        let pit = vm.get_pit2().map_err(kvm_err("read the PIT"))?;
        let nics = transports
            .iter()
            .filter(|t| {
                nixvm_devices::lock(t).device_type() == nixvm_devices::virtio::VIRTIO_ID_NET
            })
            .cloned()
            .collect();
        let reset = ResetState {
            config: config.clone(),
            cmdline,
            device_aml,
            cpuids,
            vcpus: initial,
            irqchips,
            pit,
        };

        let signal_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        lifecycle::catch_stop_signals(&signal_evt).map_err(Error::EventFd)?;
        let serial_port = Port::new("serial console", Box::new(serial), drained, input);
        let ports = std::iter::once(serial_port).chain(hvc_port).collect();
        let controller = Arc::new(Mutex::new(Controller::new(exit.clone(), ports)));
        let gate = Arc::new(PauseGate::default());
        let interactive = config.has_stdio_console()
            // SAFETY: isatty only inspects the descriptor.
            && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        let control = Arc::new(Mutex::new(Control::new(ControlParts {
            exit: exit.clone(),
            signal_evt,
            power_button,
            gate: gate.clone(),
            kick: kick_signal(),
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout),
            interactive,
            info: VmInfo {
                vcpus: config.cpus,
                memory: config.memory.to_string(),
                config: serde_json::to_value(config).unwrap_or_default(),
            },
            listener: api_listener,
            qmp_listener,
            monitor,
            keyboard,
            nics,
        })));
        Ok(Vm {
            vcpus,
            reset,
            bus: Arc::new(buses),
            exit,
            controller,
            control,
            gate,
            vm,
            _kvm: kvm,
            mem,
            _backends: backends,
            filters,
            _vsock_listener: vsock_listener,
        })
    }

    /// Runs the VM until it ends (a guest reboot with `--on-reboot restart` boots it again
    /// in place); returns how it ended, and the control-socket connections that wait for
    /// that answer (the socket itself is closed by then).
    pub fn run(mut self, raw_terminal: bool) -> Result<(Exit, Vec<UnixStream>)> {
        let _terminal = if raw_terminal {
            terminal::RawTerminal::enable()
        } else {
            None
        };
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(Error::EventLoop)?;
        em.add_subscriber(self.controller.clone());
        em.add_subscriber(self.control.clone());
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| Error::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
        // From here on the main thread, and the vCPU threads it starts, are filtered.
        nixvm_devices::seccomp::apply(self.filters.vmm.as_ref()).map_err(Error::Seccomp)?;
        let exit = loop {
            let exit = self.run_once(&mut em);
            if exit == Exit::Reset && self.reset.config.on_reboot == OnReboot::Restart {
                log::info!("the guest rebooted: booting it again in place");
                nixvm_devices::lock(&self.control).guest_reset();
                if let Err(e) = self.reboot() {
                    break Exit::Failed(format!("cannot reboot the VM in place: {e}"));
                }
                continue;
            }
            break exit;
        };
        let waiters = nixvm_devices::lock(&self.control).finish(&exit);
        Ok((exit, waiters))
    }

    /// Runs the vCPUs until the VM stops; takes them back.
    fn run_once(
        &mut self,
        em: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    ) -> Exit {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<(JoinHandle<VcpuFd>, Arc<AtomicBool>)> = Vec::new();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let id = u8::try_from(id).expect("at most 254 vCPUs");
            let (bus, exit, stop) = (self.bus.clone(), self.exit.clone(), stop.clone());
            let (gate, filters) = (self.gate.clone(), self.filters.clone());
            let finished = Arc::new(AtomicBool::new(false));
            let done = finished.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Err(e) = nixvm_devices::seccomp::apply(filters.vcpu.as_ref()) {
                        exit.request_exit(Exit::Failed(format!("vCPU {id}: {e}")));
                        done.store(true, Ordering::Release);
                        return vcpu;
                    }
                    let vcpu = vcpu::run(vcpu, id, bus, exit, stop, gate);
                    done.store(true, Ordering::Release);
                    vcpu
                });
            match spawned {
                Ok(handle) => threads.push((handle, finished)),
                Err(e) => {
                    self.exit
                        .request_exit(Exit::Failed(format!("cannot start vCPU thread {id}: {e}")));
                    break;
                }
            }
        }

        while !nixvm_devices::lock(&self.controller).done {
            if let Err(e) = em.run() {
                self.exit
                    .request_exit(Exit::Failed(format!("event loop failed: {e:?}")));
                break;
            }
        }

        stop.store(true, Ordering::Release);
        self.gate.release_all();
        for (handle, finished) in threads {
            // A vCPU blocked in KVM_RUN (halted, say) leaves it when signalled. Kick until it
            // is out: a signal that lands just before it enters KVM_RUN would be missed.
            while !finished.load(Ordering::Acquire) {
                use vmm_sys_util::signal::Killable;
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(2));
            }
            if let Ok(vcpu) = handle.join() {
                self.vcpus.push(vcpu);
            }
        }
        self.exit
            .take()
            .unwrap_or(Exit::Failed("the VM stopped for no recorded reason".into()))
    }

    /// Puts the machine back as it was before the first boot: devices reset, memory zeroed,
    /// kernel, initrd and tables loaded again, interrupt controllers and vCPUs reset.
    fn reboot(&mut self) -> Result<()> {
        let r = &self.reset;
        if self.vcpus.len() != r.vcpus.len() {
            return Err(Error::Thread(std::io::Error::other(
                "a vCPU thread was lost",
            )));
        }
        // The virtio transports (MMIO) and the legacy devices (port I/O).
        self.bus.mmio.reset();
        self.bus.pio.reset();
        let mem = self.mem.memory();
        zero_memory(&mem).map_err(|e| Error::Memory(r.config.memory.0, e))?;
        load_guest(&mem, &r.config, &r.device_aml, &r.cmdline)?;
        for chip in &r.irqchips {
            self.vm
                .set_irqchip(chip)
                .map_err(kvm_err("reset the interrupt controllers"))?;
        }
        self.vm.set_pit2(&r.pit).map_err(kvm_err("reset the PIT"))?;
        for (id, vcpu) in self.vcpus.iter().enumerate() {
            let id8 = u8::try_from(id).expect("at most 254 vCPUs");
            r.vcpus[id].restore(vcpu, id8, &r.cpuids[id])?;
        }
        self.gate.reopen();
        self.exit.clear();
        nixvm_devices::lock(&self.controller).done = false;
        Ok(())
    }
}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Opens where a console goes. Done first, before KVM: a busy socket is the user's to fix.
fn open_console(config: &ConsoleConfig, which: &'static str) -> Result<(ConsoleOut, Input)> {
    Ok(match config {
        ConsoleConfig::Stdio => (ConsoleOut::Stdout(std::io::stdout()), Input::Stdin),
        ConsoleConfig::Off => (ConsoleOut::Off, Input::None),
        ConsoleConfig::File(path) => {
            let f = File::create(path).map_err(|source| Error::ConsoleFile {
                which,
                path: path.clone(),
                source,
            })?;
            (ConsoleOut::File(f), Input::None)
        }
        ConsoleConfig::Socket(path) => {
            let listener = unix::Listener::bind(Path::new(path))
                .map_err(|e| Error::ConsoleSocket(which, e))?;
            let console = Arc::new(Mutex::new(SocketConsole::default()));
            (
                ConsoleOut::Socket(console.clone()),
                Input::Socket {
                    listener,
                    console,
                    client: None,
                },
            )
        }
        ConsoleConfig::Connect(path) => {
            let connect_err = |source| Error::ConsoleConnect {
                which,
                path: path.clone(),
                source,
            };
            let stream = UnixStream::connect(path).map_err(connect_err)?;
            let out = stream.try_clone().map_err(connect_err)?;
            (ConsoleOut::Stream(out), Input::Stream(stream))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn guest_memory_is_huge_page_aligned() {
        for shared in [false, true] {
            // 5 GiB: two regions, around the 32-bit MMIO gap (reserved, not touched).
            let mem = create_memory(5 << 30, shared).unwrap();
            assert_eq!(mem.num_regions(), 2);
            for r in mem.iter() {
                assert_eq!(r.as_ptr() as usize % (2 << 20), 0, "shared: {shared}");
                assert_eq!(r.file_offset().is_some(), shared);
            }
            mem.write_obj(0xabcd_u64, GuestAddress(4 << 30)).unwrap();
            assert_eq!(mem.read_obj::<u64>(GuestAddress(4 << 30)).unwrap(), 0xabcd);
        }
    }
}
