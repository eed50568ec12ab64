//! The VM's lifecycle in the event loop: stop signals, the graceful shutdown (ACPI power
//! button, then a hard stop after a timeout), and the requests of the control socket's
//! clients (`nixvm ctl`, [`api`]), of QMP clients ([`qmp`]) and of the human monitor
//! ([`hmp`]).
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nixvm_devices::i8042::I8042;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{self, Request};
use crate::device_manager::Transport;
use crate::lifecycle::{self, Exit, ExitState, PauseGate};
use crate::unix::Listener;
use crate::{hmp, qmp};

const SIGNAL: u32 = 10;
const TIMER: u32 = 11;
const LISTENER: u32 = 12;
const QMP_LISTENER: u32 = 13;
const HMP_LISTENER: u32 = 14;
/// Client connections: this plus their fd.
const CLIENT: u32 = 1 << 20;
/// Longest request line a client may send.
const MAX_LINE: usize = 64 << 10;

/// Who asked for the shutdown in progress; it decides how a timeout ends the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Signal(i32),
    Api,
}

/// Which protocol a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ctl,
    /// QMP; `negotiated` once it sent `qmp_capabilities`.
    Qmp {
        negotiated: bool,
    },
    /// The human monitor.
    Hmp,
}

struct Client {
    stream: UnixStream,
    /// Bytes read that do not make a whole line yet.
    pending: Vec<u8>,
    kind: Kind,
}

/// What the control socket reports about the VM.
pub struct VmInfo {
    pub vcpus: u8,
    pub memory: String,
    pub config: serde_json::Value,
}

pub struct Control {
    exit: Arc<ExitState>,
    signal_evt: EventFd,
    power_button: EventFd,
    gate: Arc<PauseGate>,
    kick: i32,
    shutdown_timeout: Duration,
    /// SIGINT from an interactive terminal stops at once (Ctrl-C in raw mode goes to the
    /// guest, so a SIGINT there comes from elsewhere and means "now").
    interactive: bool,
    info: VmInfo,
    shutdown: Option<(Origin, TimerFd)>,
    listener: Option<Listener>,
    qmp_listener: Option<Listener>,
    hmp_listener: Option<Listener>,
    /// A monitor connection nixvm made (`--monitor connect=`), until the event loop starts.
    hmp_connected: Option<UnixStream>,
    clients: HashMap<RawFd, Client>,
    /// Connections waiting for the VM to end (a `shutdown` request each).
    waiters: Vec<UnixStream>,
    keyboard: Option<Arc<Mutex<I8042>>>,
    nics: Vec<Transport>,
}

/// What the control side of a VM is made of (the VM builds it).
pub struct ControlParts {
    pub exit: Arc<ExitState>,
    /// Written by the signal handler thread: SIGTERM, SIGINT, SIGHUP.
    pub signal_evt: EventFd,
    /// Presses the ACPI power button.
    pub power_button: EventFd,
    pub gate: Arc<PauseGate>,
    /// The signal that kicks vCPUs out of KVM_RUN.
    pub kick: i32,
    pub shutdown_timeout: Duration,
    pub interactive: bool,
    pub info: VmInfo,
    pub listener: Option<Listener>,
    /// `--qmp`: QMP clients connect here.
    pub qmp_listener: Option<Listener>,
    /// `--monitor`: where the human monitor is.
    pub monitor: Option<MonitorEnd>,
    /// The keyboard `sendkey` types on.
    pub keyboard: Option<Arc<Mutex<I8042>>>,
    /// The network devices' transports, in `--net` order (`set_link`).
    pub nics: Vec<Transport>,
}

/// The human monitor's socket: nixvm listens on it, or connected to it.
pub enum MonitorEnd {
    Listen(Listener),
    Connected(UnixStream),
}

impl Control {
    pub fn new(p: ControlParts) -> Control {
        let (hmp_listener, hmp_connected) = match p.monitor {
            Some(MonitorEnd::Listen(l)) => (Some(l), None),
            Some(MonitorEnd::Connected(s)) => (None, Some(s)),
            None => (None, None),
        };
        Control {
            exit: p.exit,
            signal_evt: p.signal_evt,
            power_button: p.power_button,
            gate: p.gate,
            kick: p.kick,
            shutdown_timeout: p.shutdown_timeout,
            interactive: p.interactive,
            info: p.info,
            shutdown: None,
            listener: p.listener,
            qmp_listener: p.qmp_listener,
            hmp_listener,
            hmp_connected,
            clients: HashMap::new(),
            waiters: Vec::new(),
            keyboard: p.keyboard,
            nics: p.nics,
        }
    }

    /// For the VM's end: tells QMP clients how it ended; returns the connections waiting
    /// for it; closes the sockets (removes their files).
    pub fn finish(&mut self, exit: &Exit) -> Vec<UnixStream> {
        let (guest, reason) = match exit {
            Exit::PowerOff => (true, "guest-shutdown"),
            // As QEMU with -no-reboot: the reset ends the VM.
            Exit::Reset => (true, "guest-reset"),
            Exit::Signal(_) => (false, "host-signal"),
            Exit::Forced => (false, "host-ui"),
            Exit::Quit => (false, "host-qmp-quit"),
            Exit::Failed(_) => (false, "host-error"),
        };
        self.qmp_event(
            "SHUTDOWN",
            Some(serde_json::json!({"guest": guest, "reason": reason})),
        );
        self.listener = None;
        self.qmp_listener = None;
        self.hmp_listener = None;
        self.clients.clear();
        std::mem::take(&mut self.waiters)
    }

    /// The guest reset and nixvm boots it again in place: QMP clients hear of it.
    pub fn guest_reset(&mut self) {
        self.qmp_event(
            "RESET",
            Some(serde_json::json!({"guest": true, "reason": "guest-reset"})),
        );
    }

    /// Sends an event to every QMP client past negotiation.
    fn qmp_event(&mut self, name: &str, data: Option<serde_json::Value>) {
        let line = qmp::event(name, data);
        let fds: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.kind == Kind::Qmp { negotiated: true })
            .map(|(fd, _)| *fd)
            .collect();
        for fd in fds {
            self.reply(fd, &line);
        }
    }

    /// Presses the power button and arms the hard stop; a second request while one is in
    /// progress changes nothing (a second signal stops at once, see `on_signal`).
    fn begin_shutdown(&mut self, origin: Origin, timeout: Duration, ops: &mut EventOps) {
        if self.shutdown.is_some() {
            return;
        }
        log::info!(
            "pressing the power button; stopping the VM in {} s if it is still running",
            timeout.as_secs()
        );
        self.press_power_button();
        let timer = match TimerFd::new() {
            Ok(mut t) => t
                .reset(timeout.max(Duration::from_millis(1)), None)
                .map(|()| t),
            Err(e) => Err(e),
        };
        match timer {
            Ok(t) => {
                if ops
                    .add(Events::with_data_raw(t.as_raw_fd(), TIMER, EventSet::IN))
                    .is_err()
                {
                    log::error!("cannot watch the shutdown timer; stopping now");
                    self.exit.request_exit(forced(origin));
                }
                self.shutdown = Some((origin, t));
            }
            Err(e) => {
                log::error!("cannot arm the shutdown timer ({e}); stopping now");
                self.exit.request_exit(forced(origin));
            }
        }
    }

    fn on_signal(&mut self, count: u64, ops: &mut EventOps) {
        let sig = lifecycle::caught_signal();
        let graceful = sig == libc::SIGTERM || (sig == libc::SIGINT && !self.interactive);
        if !graceful || count > 1 || self.shutdown.is_some() {
            log::info!("signal {sig}: stopping the VM now");
            self.exit.request_exit(Exit::Signal(sig));
            return;
        }
        self.begin_shutdown(Origin::Signal(sig), self.shutdown_timeout, ops);
    }

    /// Presses the ACPI power button (resuming a paused guest, which could not react).
    fn press_power_button(&mut self) {
        if self.gate.is_paused() {
            self.gate.resume();
            self.qmp_event("RESUME", None);
        }
        if let Err(e) = self.power_button.write(1) {
            log::error!("cannot press the power button: {e}");
        }
        self.qmp_event("POWERDOWN", None);
    }

    /// Stops the vCPUs; an error sentence if they would not stop.
    fn pause(&mut self) -> Result<(), &'static str> {
        if self.shutdown.is_some() {
            return Err("the VM is shutting down");
        }
        if !self.gate.pause(self.kick, Duration::from_secs(5)) {
            self.gate.resume();
            return Err("the vCPUs did not stop within 5 s");
        }
        self.qmp_event("STOP", None);
        Ok(())
    }

    fn resume(&mut self) {
        let was_paused = self.gate.is_paused();
        self.gate.resume();
        if was_paused {
            self.qmp_event("RESUME", None);
        }
    }

    fn accept(&mut self, kind: Kind, ops: &mut EventOps) {
        let l = match kind {
            Kind::Ctl => &self.listener,
            Kind::Qmp { .. } => &self.qmp_listener,
            Kind::Hmp => &self.hmp_listener,
        };
        let Some(l) = l else { return };
        let mut accepted = Vec::new();
        while let Ok((s, _)) = l.listener.accept() {
            accepted.push(s);
        }
        for s in accepted {
            self.add_client(s, kind, ops);
        }
    }

    /// Watches a client connection and greets it as its protocol does.
    fn add_client(&mut self, s: UnixStream, kind: Kind, ops: &mut EventOps) {
        if s.set_nonblocking(true).is_err() {
            return;
        }
        let fd = s.as_raw_fd();
        let Ok(token) = u32::try_from(fd).map(|f| CLIENT + f) else {
            return;
        };
        if ops
            .add(Events::with_data_raw(fd, token, EventSet::IN))
            .is_err()
        {
            return;
        }
        let client = Client {
            stream: s,
            pending: Vec::new(),
            kind,
        };
        self.clients.insert(fd, client);
        match kind {
            Kind::Qmp { .. } => self.reply(fd, &qmp::greeting()),
            Kind::Hmp => self.send(fd, &format!("{}{}", hmp::BANNER, hmp::PROMPT)),
            Kind::Ctl => {}
        }
    }

    fn drop_client(&mut self, fd: RawFd, ops: &mut EventOps) -> Option<UnixStream> {
        let c = self.clients.remove(&fd)?;
        let token = CLIENT + u32::try_from(fd).ok()?;
        let _ = ops.remove(Events::with_data_raw(fd, token, EventSet::IN));
        Some(c.stream)
    }

    fn read_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let mut buf = [0u8; 4096];
        let mut lines = Vec::new();
        let mut closed = false;
        let mut kind = Kind::Ctl;
        if let Some(Client {
            stream: s,
            pending,
            kind: k,
        }) = self.clients.get_mut(&fd)
        {
            kind = *k;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                lines.push(String::from_utf8_lossy(&line).into_owned());
            }
            if pending.len() > MAX_LINE {
                let too_long = match kind {
                    Kind::Ctl | Kind::Hmp => api::Answer::error("request line too long").line(),
                    Kind::Qmp { .. } => qmp::error(None, "GenericError", "request line too long"),
                };
                let _ = s.write_all(format!("{too_long}\n").as_bytes());
                closed = true;
            }
        }
        for line in lines {
            if line.trim().is_empty() {
                continue;
            }
            if let Kind::Qmp { negotiated } = kind {
                kind = self.qmp_request(fd, &line, negotiated);
                continue;
            }
            if kind == Kind::Hmp {
                self.hmp_request(fd, &line);
                continue;
            }
            match api::parse(&line) {
                Ok(Request::Shutdown { timeout }) => {
                    let timeout = timeout.map_or(self.shutdown_timeout, |t| {
                        Duration::from_secs(t.min(lifecycle::MAX_SHUTDOWN_TIMEOUT))
                    });
                    if let Some(s) = self.drop_client(fd, ops) {
                        let _ = s.set_nonblocking(false);
                        self.waiters.push(s);
                    }
                    self.begin_shutdown(Origin::Api, timeout, ops);
                    return;
                }
                Ok(req) => {
                    let answer = self.answer(&req);
                    self.reply(fd, &answer);
                }
                Err(e) => self.reply(fd, &api::Answer::error(&e).line()),
            }
        }
        if closed {
            self.drop_client(fd, ops);
        }
    }

    /// Runs one QMP request; returns the client's kind after it (negotiation).
    fn qmp_request(&mut self, fd: RawFd, line: &str, negotiated: bool) -> Kind {
        let req = qmp::parse(line);
        let id = req.id.as_ref();
        let cmd = match req.command {
            Ok(c) => c,
            Err(answer) => {
                self.reply(fd, &answer);
                return Kind::Qmp { negotiated };
            }
        };
        let answer = match (negotiated, cmd) {
            (false, qmp::Command::Capabilities) => {
                if let Some(c) = self.clients.get_mut(&fd) {
                    c.kind = Kind::Qmp { negotiated: true };
                }
                self.reply(fd, &qmp::ok(id, serde_json::json!({})));
                return Kind::Qmp { negotiated: true };
            }
            (false, _) => qmp::not_negotiated(id),
            (true, qmp::Command::Capabilities) => qmp::error(
                id,
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored",
            ),
            (true, qmp::Command::QueryStatus) => qmp::ok(id, qmp::status(!self.gate.is_paused())),
            (true, qmp::Command::Stop) => match self.pause() {
                Ok(()) => qmp::ok(id, serde_json::json!({})),
                Err(e) => qmp::error(id, "GenericError", e),
            },
            (true, qmp::Command::Cont) => {
                self.resume();
                qmp::ok(id, serde_json::json!({}))
            }
            (true, qmp::Command::Powerdown) => {
                self.press_power_button();
                qmp::ok(id, serde_json::json!({}))
            }
            (true, qmp::Command::Reset) => {
                self.reply(fd, &qmp::ok(id, serde_json::json!({})));
                log::info!("QMP: system_reset");
                self.exit.request_exit(Exit::Reset);
                return Kind::Qmp { negotiated };
            }
            (true, qmp::Command::Quit) => {
                self.reply(fd, &qmp::ok(id, serde_json::json!({})));
                log::info!("QMP: quit");
                self.exit.request_exit(Exit::Quit);
                return Kind::Qmp { negotiated };
            }
        };
        self.reply(fd, &answer);
        Kind::Qmp { negotiated }
    }

    /// Runs one human monitor line; answers with its output and the prompt.
    fn hmp_request(&mut self, fd: RawFd, line: &str) {
        let out = match hmp::parse(line) {
            hmp::Command::Nothing => String::new(),
            hmp::Command::Help => hmp::help(),
            hmp::Command::InfoStatus => format!(
                "VM status: {}",
                if self.gate.is_paused() {
                    "paused"
                } else {
                    "running"
                }
            ),
            hmp::Command::Stop => self.pause().err().unwrap_or_default().to_owned(),
            hmp::Command::Cont => {
                self.resume();
                String::new()
            }
            hmp::Command::Powerdown => {
                self.press_power_button();
                String::new()
            }
            hmp::Command::Reset => {
                log::info!("monitor: system_reset");
                self.exit.request_exit(Exit::Reset);
                String::new()
            }
            hmp::Command::Quit => {
                log::info!("monitor: quit");
                self.exit.request_exit(Exit::Quit);
                return;
            }
            hmp::Command::SendKey(keys) => match &self.keyboard {
                Some(k) => {
                    let names: Vec<&str> = keys.split('-').collect();
                    let sent = nixvm_devices::lock(k).send_keys(&names);
                    sent.err()
                        .map(|e| format!("sendkey: {e}"))
                        .unwrap_or_default()
                }
                None => "sendkey: the guest has no keyboard".into(),
            },
            hmp::Command::SetLink { name, up } => {
                match hmp::nic_index(&name).and_then(|i| self.nics.get(i)) {
                    Some(t) => {
                        log::info!("monitor: set_link {name} {}", if up { "on" } else { "off" });
                        nixvm_devices::lock(t).set_link(up);
                        String::new()
                    }
                    None => format!("Device '{name}' not found"),
                }
            }
            // Also on stderr: a test driver drops the monitor's answer (the NixOS driver's
            // screenshot() goes on to convert a file that is not there), and its log shows
            // nixvm's stderr.
            hmp::Command::Cannot(why) => {
                log::warn!("monitor: {why}");
                why
            }
            hmp::Command::Unknown(cmd) => {
                log::warn!("monitor: unknown command '{cmd}'");
                format!("unknown command: '{cmd}'")
            }
        };
        let out = if out.is_empty() {
            out
        } else {
            format!("{out}\r\n")
        };
        self.send(fd, &format!("{out}{}", hmp::PROMPT));
    }

    /// Sends a line to a client (and its newline).
    fn reply(&mut self, fd: RawFd, line: &str) {
        self.send(fd, &format!("{line}\n"));
    }

    /// Sends text to a client, waiting up to 5 s for it to take it.
    fn send(&mut self, fd: RawFd, text: &str) {
        if let Some(Client { stream: s, .. }) = self.clients.get_mut(&fd) {
            let _ = s.set_nonblocking(false);
            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(text.as_bytes());
            let _ = s.set_nonblocking(true);
        }
    }

    fn state(&self) -> api::State {
        if self.shutdown.is_some() {
            api::State::ShuttingDown
        } else if self.gate.is_paused() {
            api::State::Paused
        } else {
            api::State::Running
        }
    }

    fn answer(&mut self, req: &Request) -> String {
        let mut a = api::Answer::ok();
        match req {
            Request::Ping => {
                a.protocol = Some(api::PROTOCOL);
                a.version = Some(env!("CARGO_PKG_VERSION").to_owned());
            }
            Request::Info => {
                a.info = Some(api::Info {
                    state: self.state(),
                    vcpus: self.info.vcpus,
                    memory: self.info.memory.clone(),
                    uptime_s: lifecycle::started().elapsed().as_secs_f64(),
                    pid: std::process::id(),
                    config: self.info.config.clone(),
                });
            }
            Request::Pause => {
                if let Err(e) = self.pause() {
                    return api::Answer::error(e).line();
                }
                a.state = Some(api::State::Paused);
            }
            Request::Resume => {
                self.resume();
                a.state = Some(api::State::Running);
            }
            Request::Shutdown { .. } => unreachable!("handled by read_client"),
        }
        a.line()
    }
}

/// How a shutdown that timed out ends the VM.
fn forced(origin: Origin) -> Exit {
    match origin {
        Origin::Signal(sig) => Exit::Signal(sig),
        Origin::Api => Exit::Forced,
    }
}

/// The answer for a `shutdown` request, given how the VM ended.
pub fn shutdown_answer(exit: &Exit) -> String {
    let mut a = api::Answer::ok();
    a.result = Some(match exit {
        Exit::PowerOff => api::ShutdownResult::PoweredOff,
        Exit::Forced | Exit::Signal(_) | Exit::Quit => api::ShutdownResult::Forced,
        Exit::Reset => api::ShutdownResult::Rebooted,
        Exit::Failed(_) => api::ShutdownResult::Failed,
    });
    a.line()
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![(self.signal_evt.as_raw_fd(), SIGNAL)];
        for (l, token) in [
            (&self.listener, LISTENER),
            (&self.qmp_listener, QMP_LISTENER),
            (&self.hmp_listener, HMP_LISTENER),
        ] {
            if let Some(l) = l {
                fds.push((l.listener.as_raw_fd(), token));
                let _ = l.listener.set_nonblocking(true);
            }
        }
        for (fd, token) in fds {
            if ops
                .add(Events::with_data_raw(fd, token, EventSet::IN))
                .is_err()
            {
                self.exit
                    .request_exit(Exit::Failed("cannot set up the event loop".into()));
            }
        }
        if let Some(s) = self.hmp_connected.take() {
            self.add_client(s, Kind::Hmp, ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            SIGNAL => {
                let count = self.signal_evt.read().unwrap_or(1);
                self.on_signal(count, ops);
            }
            TIMER => {
                if let Some((origin, t)) = &mut self.shutdown {
                    let _ = t.wait();
                    log::warn!("the guest did not power off in time; stopping it");
                    self.exit.request_exit(forced(*origin));
                }
            }
            LISTENER => self.accept(Kind::Ctl, ops),
            QMP_LISTENER => self.accept(Kind::Qmp { negotiated: false }, ops),
            HMP_LISTENER => self.accept(Kind::Hmp, ops),
            token if token >= CLIENT => {
                if let Ok(fd) = RawFd::try_from(token - CLIENT) {
                    if events.event_set().contains(EventSet::IN) {
                        self.read_client(fd, ops);
                    } else {
                        self.drop_client(fd, ops);
                    }
                }
            }
            other => log::warn!("control: unexpected token {other}"),
        }
    }
}
