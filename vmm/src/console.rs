//! The event loop's console subscriber: each console's input (stdin, the socket client, the
//! socket nixvm connected to) and its socket's listener, for the serial port and the
//! virtio-console alike, and the VM's exit event (which ends the loop).
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nixvm_devices::console::SocketConsole;
use nixvm_devices::lock;
use nixvm_devices::serial::SerialDevice;
use nixvm_devices::virtio::console::ConsoleInput;
use vmm_sys_util::eventfd::EventFd;

use crate::lifecycle::{Exit, ExitState};
use crate::unix::Listener;

const EXIT: u32 = 0;
/// Each port's tokens: its drained event, its listener, its input source.
const DRAINED: u32 = 0;
const LISTENER: u32 = 1;
const SOURCE: u32 = 2;
const TOKENS: u32 = 3;

/// Where console input comes from.
pub enum Input {
    None,
    Stdin,
    Socket {
        listener: Listener,
        console: Arc<Mutex<SocketConsole>>,
        client: Option<UnixStream>,
    },
    /// The socket nixvm connected to (`connect=`).
    Stream(UnixStream),
}

/// What takes a console's input.
pub trait InputSink: Send {
    /// Takes as much of `bytes` as it has room for; returns how many.
    fn enqueue_input(&mut self, bytes: &[u8]) -> usize;
}

impl InputSink for Arc<Mutex<SerialDevice>> {
    fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        lock(self).enqueue_input(bytes)
    }
}

impl InputSink for ConsoleInput {
    fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.enqueue(bytes)
    }
}

/// One console: its input, and the device that takes it.
pub struct Port {
    name: &'static str,
    sink: Box<dyn InputSink>,
    /// Written by the device when it has taken all input given.
    drained: EventFd,
    input: Input,
    /// Input read but not yet taken by the device; while there is some, reading pauses.
    pending: Vec<u8>,
}

impl Port {
    pub fn new(
        name: &'static str,
        sink: Box<dyn InputSink>,
        drained: EventFd,
        input: Input,
    ) -> Port {
        Port {
            name,
            sink,
            drained,
            input,
            pending: Vec::new(),
        }
    }

    /// The fd of the current input source, if it is readable now.
    fn source(&self) -> Option<RawFd> {
        match &self.input {
            Input::Stdin => Some(libc::STDIN_FILENO),
            Input::Socket {
                client: Some(c), ..
            } => Some(c.as_raw_fd()),
            Input::Stream(s) => Some(s.as_raw_fd()),
            _ => None,
        }
    }

    fn watch_source(&mut self, ops: &mut EventOps, base: u32) {
        if let Some(fd) = self.source() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, base + SOURCE, EventSet::IN)) {
                // /dev/null or a regular file cannot be polled: no console input then.
                log::debug!(
                    "{} input is not pollable ({e:?}); the guest gets no input",
                    self.name
                );
                if matches!(self.input, Input::Stdin) {
                    self.input = Input::None;
                }
            }
        }
    }

    fn unwatch_source(&mut self, ops: &mut EventOps, base: u32) {
        if let Some(fd) = self.source() {
            let _ = ops.remove(Events::with_data_raw(fd, base + SOURCE, EventSet::IN));
        }
    }

    /// Hands pending input to the device; true if all of it went.
    fn feed(&mut self) -> bool {
        if !self.pending.is_empty() {
            let n = self.sink.enqueue_input(&self.pending);
            self.pending.drain(..n);
        }
        self.pending.is_empty()
    }

    fn read_input(&mut self, ops: &mut EventOps, base: u32) {
        let mut buf = [0u8; 4096];
        let got = match &mut self.input {
            Input::Stdin => {
                // SAFETY: reading into a buffer we own, of the length we pass.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
            }
            Input::Socket {
                client: Some(c), ..
            } => c.read(&mut buf),
            Input::Stream(s) => s.read(&mut buf),
            _ => Ok(0),
        };
        match got {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Ok(0) | Err(_) => self.input_closed(ops, base),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                if !self.feed() {
                    // The guest is not reading: stop reading until it drains what it has.
                    self.unwatch_source(ops, base);
                }
            }
        }
    }

    fn input_closed(&mut self, ops: &mut EventOps, base: u32) {
        self.unwatch_source(ops, base);
        match &mut self.input {
            Input::Socket {
                console, client, ..
            } => {
                log::info!("{} client detached", self.name);
                lock(console).detach();
                *client = None;
            }
            Input::Stream(_) => {
                log::info!("{}: the socket it connected to closed", self.name);
                self.input = Input::None;
            }
            _ => {
                log::debug!("{} input closed", self.name);
                self.input = Input::None;
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps, base: u32) {
        let Input::Socket {
            listener,
            console,
            client,
        } = &mut self.input
        else {
            return;
        };
        let Ok((stream, _)) = listener.listener.accept() else {
            return;
        };
        if client.is_some() {
            let mut s = stream;
            let _ = s.write_all(b"nixvm: another client is attached to this console\r\n");
            return;
        }
        let Ok(reader) = stream.try_clone() else {
            return;
        };
        if lock(console).attach(stream).is_ok() {
            log::info!("{} client attached", self.name);
            *client = Some(reader);
            if self.pending.is_empty() {
                self.watch_source(ops, base);
            }
        }
    }
}

pub struct Controller {
    exit: Arc<ExitState>,
    ports: Vec<Port>,
    pub done: bool,
}

impl Controller {
    pub fn new(exit: Arc<ExitState>, ports: Vec<Port>) -> Self {
        Controller {
            exit,
            ports,
            done: false,
        }
    }
}

/// The tokens of port `i` start here.
fn base(i: usize) -> u32 {
    1 + u32::try_from(i).expect("a few ports") * TOKENS
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![(self.exit.evt.as_raw_fd(), EXIT)];
        for (i, p) in self.ports.iter().enumerate() {
            fds.push((p.drained.as_raw_fd(), base(i) + DRAINED));
            if let Input::Socket { listener, .. } = &p.input {
                fds.push((listener.listener.as_raw_fd(), base(i) + LISTENER));
            }
        }
        for (fd, token) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
                self.exit
                    .request_exit(Exit::Failed("cannot set up the event loop".into()));
            }
        }
        for (i, p) in self.ports.iter_mut().enumerate() {
            p.watch_source(ops, base(i));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == EXIT {
            let _ = self.exit.evt.read();
            self.done = true;
            return;
        }
        let i = ((token - 1) / TOKENS) as usize;
        let Some(p) = self.ports.get_mut(i) else {
            log::warn!("event loop: unexpected token {token}");
            return;
        };
        let b = base(i);
        match token - b {
            DRAINED => {
                let _ = p.drained.read();
                let was_blocked = !p.pending.is_empty();
                if p.feed() && was_blocked {
                    p.watch_source(ops, b);
                }
            }
            LISTENER => p.accept(ops, b),
            _ => p.read_input(ops, b),
        }
    }
}
