//! The VM's devices: creating them, wiring them to KVM (port and MMIO buses, irqfds,
//! ioeventfds) and describing them to the guest (DSDT AML, or `virtio_mmio.device=` on the
//! command line of an `acpi=off` guest). The I/O-port, IRQ and MMIO map itself is
//! `nixvm_boot::layout`'s. `vm.rs` builds, runs and reboots the VM around these.
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use nixvm_boot::{acpi, layout};
use nixvm_devices::bus::BusDevice;
use nixvm_devices::console::ConsoleOut;
use nixvm_devices::pci::PciRoot;
use nixvm_devices::serial::{InputDrained, SerialDevice, SerialIrq};
use nixvm_devices::virtio::block::{self, Block, Disk};
use nixvm_devices::virtio::console::{Console, ConsoleInput};
use nixvm_devices::virtio::mmio::MmioTransport;
use nixvm_devices::virtio::pci::{self, PciTransport};
use nixvm_devices::virtio::transport::VirtioTransport;
use nixvm_devices::virtio::{GuestMemoryMmap, VirtioDevice, fs, mmio, net, rng::Rng, vsock};
use nixvm_devices::{
    cmos::Cmos,
    i8042::I8042,
    pm::{AcpiPm, PmTimer},
};
use nixvm_storefs::daemon as storefs;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::{Transport as TransportKind, VmConfig};
use crate::lifecycle::ExitState;
use crate::msi::{GsiRouting, VectorRoutes};
use crate::passt;
use crate::vcpu::Buses;
use crate::vm::{KvmError, kvm_err};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Disk(#[from] block::Error),
    #[error(transparent)]
    Net(#[from] net::Error),
    #[error("cannot connect to network socket {path}")]
    NetSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot join the VDE switch {}", dir.display())]
    NetVde {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the gateway of a local network interface")]
    NetLocal(#[source] std::io::Error),
    #[error("cannot set up network stream {name}")]
    NetStream {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Passt(#[from] passt::Error),
    #[error(transparent)]
    Fs(#[from] fs::Error),
    #[error(transparent)]
    Storefs(#[from] storefs::Error),
    #[error("cannot set up the vsock device (CID {cid})")]
    Vsock {
        cid: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the virtio console")]
    Console(#[source] std::io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

impl Error {
    /// Errors that are the user's to fix (exit status 2), as opposed to failures.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Disk(_) | Error::NetSocket { .. } | Error::NetVde { .. } => true,
            Error::Passt(e) => e.is_usage(),
            Error::Net(e) => !matches!(e, net::Error::TapSetup { .. }),
            Error::Fs(e) => !matches!(e, fs::Error::Handshake { .. }),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A virtio device's transport, shared with the bus its registers are on.
pub type Transport = Arc<Mutex<dyn VirtioTransport>>;

/// Everything the devices add to a VM.
pub struct Devices {
    pub buses: Buses,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Written when the guest has drained the serial input buffer.
    pub serial_drained: EventFd,
    pub transports: Vec<Transport>,
    /// The devices' DSDT AML, and the command line (with their `virtio_mmio.device=`
    /// entries when the guest has acpi=off).
    pub aml: Vec<u8>,
    pub cmdline: String,
    /// `nixvm storefs` processes serving `path=` shares: the VM stops them after everything
    /// else.
    pub backends: Vec<storefs::Process>,
    /// The keyboard a monitor's `sendkey` types on (only with `--monitor`).
    pub keyboard: Option<Arc<Mutex<I8042>>>,
}

impl Devices {
    pub fn create(
        vm: &Arc<VmFd>,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
        config: &VmConfig,
        exit: &Arc<ExitState>,
        console_out: ConsoleOut,
        virtio_console: Option<(ConsoleOut, ConsoleInput)>,
        vsock_listener: Option<&crate::unix::Listener>,
    ) -> Result<Devices> {
        let (serial, serial_drained) = create_serial(vm, console_out)?;
        let mut buses = Buses::default();
        let keyboard = match config.monitor {
            Some(_) => Some(create_keyboard(vm, exit)?),
            None => None,
        };
        add_legacy_devices(&mut buses, exit, serial.clone(), keyboard.clone());
        let mut backends = Vec::new();
        let (mut aml, cmdline, transports) = add_virtio_devices(
            vm,
            &mut buses,
            mem,
            config,
            &mut backends,
            virtio_console,
            vsock_listener,
        )?;
        if keyboard.is_some() {
            aml.extend(acpi::i8042_keyboard_aml());
        }
        Ok(Devices {
            buses,
            serial,
            serial_drained,
            transports,
            aml,
            cmdline,
            backends,
            keyboard,
        })
    }
}

/// The i8042 with a keyboard on IRQ 1.
fn create_keyboard(vm: &VmFd, exit: &Arc<ExitState>) -> Result<Arc<Mutex<I8042>>> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&irq, layout::I8042_IRQ)
        .map_err(kvm_err("connect the keyboard interrupt"))?;
    Ok(Arc::new(Mutex::new(I8042::with_keyboard(
        exit.clone(),
        irq,
    ))))
}

/// The fixed PC devices on the port-I/O bus; the i8042 is `keyboard` when there is one.
fn add_legacy_devices(
    buses: &mut Buses,
    exit: &Arc<ExitState>,
    serial: Arc<Mutex<SerialDevice>>,
    keyboard: Option<Arc<Mutex<I8042>>>,
) {
    let pm = AcpiPm::new(exit.clone(), acpi::sleep_control_is_s5, acpi::RESET_VALUE);
    type Device = Arc<Mutex<dyn BusDevice>>;
    let i8042: Device = keyboard.unwrap_or_else(|| Arc::new(Mutex::new(I8042::new(exit.clone()))));
    let devices: [(u16, u64, Device); 5] = [
        (layout::COM1_PORT, 8, serial),
        (layout::I8042_PORT, layout::I8042_PORTS, i8042),
        (
            layout::CMOS_PORT,
            layout::CMOS_PORTS,
            Arc::new(Mutex::new(Cmos::default())),
        ),
        (
            layout::SLEEP_CONTROL_PORT,
            layout::PM_PORTS,
            Arc::new(Mutex::new(pm)),
        ),
        (
            layout::PM_TIMER_PORT,
            layout::PM_TIMER_PORTS,
            Arc::new(Mutex::new(PmTimer::new())),
        ),
    ];
    for (port, len, dev) in devices {
        buses
            .pio
            .insert(u64::from(port), len, dev)
            .expect("fixed, disjoint ports");
    }
}

/// How long to wait for a vhost-user backend's socket: NIXVM_VHOST_USER_WAIT seconds, else 30.
fn vhost_user_wait() -> std::time::Duration {
    let secs = std::env::var("NIXVM_VHOST_USER_WAIT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(30.0);
    std::time::Duration::from_secs_f64(secs)
}

/// Disks (in command-line order: vda, vdb, ...), network interfaces (eth0, eth1, ...),
/// virtio-fs shares, then the entropy device, vsock and the console, each in its own
/// virtio-mmio window with an irqfd and one ioeventfd per queue. Returns their DSDT AML and
/// the command line (with `virtio_mmio.device=` entries instead when the guest has acpi=off).
/// The back-end processes started for `path=` shares and passt interfaces go into
/// `backends`.
fn add_virtio_devices(
    vm: &Arc<VmFd>,
    buses: &mut Buses,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    config: &VmConfig,
    backends: &mut Vec<storefs::Process>,
    virtio_console: Option<(ConsoleOut, ConsoleInput)>,
    vsock_listener: Option<&crate::unix::Listener>,
) -> Result<(Vec<u8>, String, Vec<Transport>)> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut transports: Vec<Transport> = Vec::new();
    for d in &config.disks {
        devices.push(Box::new(Block::new(Disk::open(&d.options())?)));
    }
    for (i, n) in config.nets.iter().enumerate() {
        let backend: net::Backend = match (&n.tap, n.fd, &n.socket, &n.vde, &n.passt) {
            (Some(name), ..) => net::Tap::open(name)?.into(),
            (_, Some(fd), ..) => net::Tap::from_fd(fd)?.into(),
            (_, _, Some(path), ..) => {
                let conn = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
                    Error::NetSocket {
                        path: path.clone(),
                        source,
                    }
                })?;
                stream(conn, &path.display().to_string())?.into()
            }
            (.., Some(dir), _) => net::Vde::connect(dir)
                .map_err(|source| Error::NetVde {
                    dir: dir.clone(),
                    source,
                })?
                .into(),
            (.., Some(program)) => {
                let (process, conn) = passt::spawn(program, &n.forward)?;
                backends.push(process);
                stream(conn.into(), &format!("passt{i}"))?.into()
            }
            _ if n.local => {
                let conn = net::local::spawn(&format!("local{i}")).map_err(Error::NetLocal)?;
                stream(conn, &format!("local{i}"))?.into()
            }
            _ => unreachable!("validated: one of tap, fd, socket, vde, passt, local"),
        };
        devices.push(Box::new(net::Net::new(backend, n.mac.map(|m| m.0))));
    }
    let wait = vhost_user_wait();
    for f in &config.fs {
        let device = match (&f.socket, &f.path) {
            (Some(socket), _) => fs::VhostUserFs::connect(&f.options(socket, config.cpus), wait)?,
            (None, Some(dir)) => {
                let queues = f.request_queues(config.cpus);
                let (process, socket) = storefs::spawn(dir, queues)?;
                backends.push(process);
                // It listens already: connecting does not wait.
                fs::VhostUserFs::connect(&f.options(&socket.path, config.cpus), wait)?
            }
            (None, None) => unreachable!("validated: socket or path"),
        };
        devices.push(Box::new(device));
    }
    if config.rng {
        devices.push(Box::new(Rng::default()));
    }
    if let Some(v) = &config.vsock {
        let io = |source| Error::Vsock { cid: v.cid, source };
        let notify = match &config.notify_socket {
            Some(target) => Some(vsock::Notify::new(target.clone()).map_err(io)?),
            None => None,
        };
        let host = vsock::HostSide {
            listener: match vsock_listener {
                Some(l) => Some(l.listener.try_clone().map_err(io)?),
                None => None,
            },
            path: v.socket.clone(),
            notify,
        };
        devices.push(Box::new(vsock::Vsock::new(v.cid, host).map_err(io)?));
    }
    if let Some((out, input)) = virtio_console {
        let console = Console::new(out, input).map_err(Error::Console)?;
        devices.push(Box::new(console));
    }
    if config.transport == TransportKind::Pci {
        return add_pci_devices(vm, buses, mem, devices, config.cmdline.clone());
    }
    let acpi_off = config.cmdline.split_whitespace().any(|w| w == "acpi=off");
    // The PCI bus holds only its host bridge here: a guest that probes for PCI (every x86
    // kernel does) finds configuration mechanism #1 and an empty bus, not "PCI: Fatal: No
    // config space access function found" on its console.
    let mut aml = add_pci_root(buses, PciRoot::default());
    let mut cmdline = config.cmdline.clone();
    for (i, dev) in devices.into_iter().enumerate() {
        let index = u8::try_from(i).expect("validated device count");
        let base = layout::VIRTIO_MMIO_START + u64::from(index) * layout::VIRTIO_MMIO_SIZE;
        let gsi = layout::DEVICE_GSIS[i];
        let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(kvm_err("connect a virtio interrupt"))?;
        let transport = MmioTransport::new(dev, mem.clone(), irq).map_err(Error::EventFd)?;
        for (q, evt) in (0u32..).zip(transport.queue_evts()) {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + mmio::QUEUE_NOTIFY), q)
                .map_err(kvm_err("register a virtio queue notifier"))?;
        }
        for v in mmio::ACK_VALUES {
            let ack = IoEventAddress::Mmio(base + mmio::INTERRUPT_ACK);
            vm.register_ioevent(transport.ack_sink(), &ack, v)
                .map_err(kvm_err("register a virtio interrupt acknowledgement"))?;
        }
        buses
            .mmio
            .insert(base, layout::VIRTIO_MMIO_SIZE, {
                let t = Arc::new(Mutex::new(transport));
                transports.push(t.clone());
                t
            })
            .expect("disjoint windows");
        if acpi_off {
            cmdline.push(' ');
            cmdline.push_str(&acpi::virtio_mmio_cmdline(
                base,
                layout::VIRTIO_MMIO_SIZE,
                gsi,
            ));
        } else {
            aml.extend(acpi::virtio_mmio_aml(
                index,
                base,
                layout::VIRTIO_MMIO_SIZE,
                gsi,
            ));
        }
    }
    Ok((aml, cmdline, transports))
}

/// `devices` as virtio-pci functions on bus 0 (device numbers from 1), each with its BAR
/// in the host bridge's window, an ioeventfd per queue and its MSI-X vectors routed through
/// KVM. Returns the host bridge's AML, the command line and the transports.
fn add_pci_devices(
    vm: &Arc<VmFd>,
    buses: &mut Buses,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    devices: Vec<Box<dyn VirtioDevice>>,
    cmdline: String,
) -> Result<(Vec<u8>, String, Vec<Transport>)> {
    let routing = GsiRouting::new(vm.clone());
    let mut root = PciRoot::default();
    let mut transports: Vec<Transport> = Vec::new();
    for (i, dev) in (0u64..).zip(devices) {
        let bar = layout::PCI_MMIO_START + i * pci::BAR_SIZE;
        assert!(
            bar + pci::BAR_SIZE <= layout::PCI_MMIO_END,
            "validated device count"
        );
        let vectors = (0..pci::VECTORS)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::EventFd)?;
        let clones = vectors
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::EventFd)?;
        let routes = Box::new(VectorRoutes::new(&routing, clones));
        let bar32 = u32::try_from(bar).expect("below 4 GiB");
        let transport =
            PciTransport::new(dev, mem.clone(), bar32, vectors, routes).map_err(Error::EventFd)?;
        for (q, evt) in (0u64..).zip(transport.queue_evts()) {
            let at = bar + pci::NOTIFY + q * u64::from(pci::NOTIFY_MULTIPLIER);
            vm.register_ioevent(evt, &IoEventAddress::Mmio(at), NoDatamatch)
                .map_err(kvm_err("register a virtio queue notifier"))?;
        }
        let t = Arc::new(Mutex::new(transport));
        buses
            .mmio
            .insert(bar, pci::BAR_SIZE, t.clone())
            .expect("disjoint BARs");
        root.attach(usize::try_from(i + 1).expect("small"), t.clone());
        transports.push(t);
    }
    Ok((add_pci_root(buses, root), cmdline, transports))
}

/// `root` on the configuration ports; returns its host bridge's AML.
fn add_pci_root(buses: &mut Buses, root: PciRoot) -> Vec<u8> {
    buses
        .pio
        .insert(
            u64::from(layout::PCI_CONFIG_PORT),
            layout::PCI_CONFIG_PORTS,
            Arc::new(Mutex::new(root)),
        )
        .expect("fixed, disjoint ports");
    acpi::pci_host_bridge_aml((layout::PCI_MMIO_START, layout::PCI_MMIO_END))
}

/// A network interface's stream connection, made ready for the device.
fn stream(conn: std::os::unix::net::UnixStream, name: &str) -> Result<net::Stream> {
    net::Stream::new(conn, name).map_err(|source| Error::NetStream {
        name: name.to_owned(),
        source,
    })
}

/// COM1 with its interrupt wired to its IRQ; returns it and the "input drained" eventfd.
fn create_serial(vm: &VmFd, out: ConsoleOut) -> Result<(Arc<Mutex<SerialDevice>>, EventFd)> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&irq, layout::COM1_IRQ)
        .map_err(kvm_err("connect the serial interrupt"))?;
    let drained = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
    let dev = SerialDevice::new(
        SerialIrq(irq),
        InputDrained(drained.try_clone().map_err(Error::EventFd)?),
        out,
    );
    Ok((Arc::new(Mutex::new(dev)), drained))
}
