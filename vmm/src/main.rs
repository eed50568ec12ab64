//! nixvm: a KVM virtual machine monitor for NixOS guests.
// Tests build fixtures with plain casts; the program itself is checked without this.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

mod api;
mod config;
mod console;
mod control;
mod cpuid;
mod device_manager;
mod hmp;
mod lifecycle;
mod msi;
mod passt;
mod qmp;
mod seccomp;
mod terminal;
mod unix;
mod vcpu;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use config::{Settings, VmConfig};
use lifecycle::{EXIT_FAILED, EXIT_USAGE};

/// Boots a Linux kernel (bzImage or PVH ELF vmlinux) in a KVM virtual machine.
#[derive(Debug, Parser)]
#[command(
    name = "nixvm",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_help = "Exit status: 0 the guest powered off; 1 nixvm failed; 2 usage error; 3 the guest \
                  rebooted (start nixvm again to boot it again); 4 stopped after `ctl shutdown` \
                  timed out; 128+N nixvm stopped on signal N.\n\
                  SIGTERM presses the ACPI power button (and stops the VM after \
                  --shutdown-timeout); a second SIGTERM stops it at once.\n\
                  Environment: NIXVM_LOG=error|warn|info|debug|trace (default warn); \
                  NIXVM_KVM_DEVICE (default /dev/kvm); NIXVM_VHOST_USER_WAIT (default 30)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
    /// Settings as JSON (same names as these flags); flags override it.
    #[arg(long, value_name = "FILE.json")]
    config: Option<PathBuf>,
    /// Check everything, print the resolved configuration as JSON, and exit.
    #[arg(long)]
    dry_run: bool,
    /// QEMU options (what the NixOS test driver appends to a start script), each mapped to
    /// its nixvm setting; one nixvm cannot honour is an error naming it.
    #[arg(last = true, value_name = "QEMU_OPTION")]
    qemu: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve DIR read-only as a virtio-fs vhost-user back end on SOCKET (nixvm's own, for the
    /// Nix store; `--fs tag=T,socket=SOCKET` connects to it, and `--fs tag=T,path=DIR,readonly=on`
    /// starts one by itself). Serves one connection; ends when the VMM disconnects.
    Storefs {
        /// The vhost-user socket to create and listen on.
        #[arg(long, value_name = "PATH", required_unless_present = "listen_fd")]
        socket: Option<PathBuf>,
        /// An inherited listening socket instead of --socket (how nixvm starts it).
        #[arg(long, value_name = "FD", conflicts_with = "socket")]
        listen_fd: Option<i32>,
        /// The directory to serve, read-only.
        #[arg(long, value_name = "DIR")]
        path: PathBuf,
        /// Request queues to serve, each with its own thread (1 to 16).
        #[arg(long, value_name = "N", default_value_t = 4)]
        queues: u16,
    },
    /// Talk to a running nixvm through its control socket.
    Ctl {
        /// The VM's --api-socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCmd {
    /// Press the power button and wait until the guest powered off and nixvm exited; stop it
    /// hard after the timeout. Exit 0: powered off; 1: had to be stopped; 2: no VM there.
    Shutdown {
        /// Seconds to wait for the guest [default: the VM's --shutdown-timeout].
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Print the VM's state and settings as JSON.
    Info,
    /// Stop the vCPUs.
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Check that nixvm answers.
    Ping,
}

fn ctl(socket: &std::path::Path, cmd: &CtlCmd) -> u8 {
    let req = match cmd {
        CtlCmd::Shutdown { timeout } => api::Request::Shutdown { timeout: *timeout },
        CtlCmd::Info => api::Request::Info,
        CtlCmd::Pause => api::Request::Pause,
        CtlCmd::Resume => api::Request::Resume,
        CtlCmd::Ping => api::Request::Ping,
    };
    match api::call(socket, &req) {
        Ok(v) => {
            match cmd {
                CtlCmd::Info => println!(
                    "{}",
                    serde_json::to_string_pretty(&v.info).unwrap_or_default()
                ),
                CtlCmd::Shutdown { .. } => {
                    if v.result != Some(api::ShutdownResult::PoweredOff) {
                        let result = v.result.map_or("no result".to_owned(), |r| {
                            serde_json::to_string(&r).unwrap_or_default()
                        });
                        eprintln!(
                            "nixvm ctl: the guest did not power off in time; nixvm stopped it ({})",
                            result.trim_matches('"')
                        );
                        return api::CTL_FORCED;
                    }
                    println!("powered off");
                }
                _ => println!("{}", v.line()),
            }
            api::CTL_OK
        }
        Err(e) => {
            report("nixvm ctl", &e);
            e.status()
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Vm(#[from] vm::Error),
}

impl Error {
    fn status(&self) -> u8 {
        match self {
            Error::Config(_) => EXIT_USAGE,
            Error::Vm(e) if e.is_usage() => EXIT_USAGE,
            Error::Vm(_) => EXIT_FAILED,
        }
    }
}

/// The one logger: messages on stderr, level from NIXVM_LOG (error, warn, info, debug, trace).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            // In raw terminal mode a bare \n does not return the carriage.
            eprint!(
                "nixvm: {}: {}\r\n",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_logger() {
    static LOGGER: StderrLogger = StderrLogger;
    let level = std::env::var("NIXVM_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

fn resolve(cli: &Cli) -> Result<VmConfig, Error> {
    let file = match &cli.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    let mut settings = file.merge(cli.settings.clone());
    if !cli.qemu.is_empty() {
        let mut qemu = config::qemu::settings(&cli.qemu).map_err(config::Error::from)?;
        let nets = qemu.nets.take();
        settings = settings.merge(qemu);
        if let Some(nets) = nets {
            settings.nets.get_or_insert_with(Vec::new).extend(nets);
        }
    }
    // Run as a Type=notify unit: the guest's readiness is the unit's.
    if settings.notify_socket.is_none() {
        settings.notify_socket = std::env::var("NOTIFY_SOCKET").ok();
    }
    Ok(VmConfig::validate(settings, config::host_memory())?)
}

fn run(cli: Cli) -> Result<u8, Error> {
    let config = resolve(&cli)?;
    if cli.dry_run {
        println!(
            "{}",
            serde_json::to_string_pretty(&config).expect("config serializes")
        );
        return Ok(0);
    }
    let raw = config.has_stdio_console();
    let vm = vm::Vm::build(&config)?;
    let (exit, waiters) = vm.run(raw)?;
    // The VM is gone and the control socket closed: answer `ctl shutdown`; it returns when
    // this process exits.
    for mut w in waiters {
        use std::io::Write;
        let _ = writeln!(w, "{}", control::shutdown_answer(&exit));
    }
    if let lifecycle::Exit::Failed(why) = &exit {
        log::error!("{why}");
    } else {
        log::info!("VM ended: {exit:?}");
    }
    Ok(exit.status())
}

fn main() -> ExitCode {
    lifecycle::started();
    init_logger();
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Ctl { api_socket, cmd }) => return ExitCode::from(ctl(api_socket, cmd)),
        Some(Command::Storefs {
            socket,
            listen_fd,
            path,
            queues,
        }) => {
            let opts = nixvm_storefs::daemon::Options {
                listen: match (socket, listen_fd) {
                    (Some(s), _) => nixvm_storefs::daemon::Listen::Socket(s.clone()),
                    (None, Some(fd)) => nixvm_storefs::daemon::Listen::Fd(*fd),
                    (None, None) => unreachable!("clap requires one"),
                },
                dir: path.clone(),
                request_queues: *queues,
            };
            return match nixvm_storefs::daemon::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report("nixvm storefs", &e);
                    ExitCode::from(if e.is_usage() {
                        EXIT_USAGE
                    } else {
                        EXIT_FAILED
                    })
                }
            };
        }
        None => {}
    }
    match run(cli) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            report("nixvm", &e);
            ExitCode::from(e.status())
        }
    }
}

/// The one error printer: `PROGRAM: error: its source: …` on one line, each cause once
/// (transparent wrappers repeat their source's text).
fn report(program: &str, e: &dyn std::error::Error) {
    let mut msg = format!("{program}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    eprintln!("{msg}");
}
