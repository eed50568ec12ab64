//! The event loop's console subscriber: console input (stdin, or the socket client), the
//! console socket's listener, and the VM's exit event (which ends the loop).
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nixvm_devices::lock;
use nixvm_devices::serial::{SerialDevice, SocketConsole};
use vmm_sys_util::eventfd::EventFd;

use crate::lifecycle::{Exit, ExitState};
use crate::unix::Listener;

const EXIT: u32 = 0;
const STDIN: u32 = 2;
const DRAINED: u32 = 3;
const LISTENER: u32 = 4;
const CLIENT: u32 = 5;

/// Where console input comes from.
pub enum Input {
    None,
    Stdin,
    Socket {
        listener: Listener,
        console: Arc<Mutex<SocketConsole>>,
        client: Option<UnixStream>,
    },
}

pub struct Controller {
    exit: Arc<ExitState>,
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    input: Input,
    /// Input read but not yet taken by the UART; while there is some, reading pauses.
    pending: Vec<u8>,
    pub done: bool,
}

impl Controller {
    pub fn new(
        exit: Arc<ExitState>,
        serial: Arc<Mutex<SerialDevice>>,
        drained: EventFd,
        input: Input,
    ) -> Self {
        Controller {
            exit,
            serial,
            drained,
            input,
            pending: Vec::new(),
            done: false,
        }
    }

    /// The fd and token of the current input source, if it is readable now.
    fn source(&self) -> Option<(RawFd, u32)> {
        match &self.input {
            Input::Stdin => Some((libc::STDIN_FILENO, STDIN)),
            Input::Socket {
                client: Some(c), ..
            } => Some((c.as_raw_fd(), CLIENT)),
            _ => None,
        }
    }

    fn watch_source(&mut self, ops: &mut EventOps) {
        if let Some((fd, token)) = self.source() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                // /dev/null or a regular file cannot be polled: no console input then.
                log::debug!("console input is not pollable ({e:?}); the guest gets no input");
                if token == STDIN {
                    self.input = Input::None;
                }
            }
        }
    }

    fn unwatch_source(&mut self, ops: &mut EventOps) {
        if let Some((fd, token)) = self.source() {
            let _ = ops.remove(Events::with_data_raw(fd, token, EventSet::IN));
        }
    }

    /// Hands pending input to the UART; true if all of it went.
    fn feed(&mut self) -> bool {
        if !self.pending.is_empty() {
            let n = lock(&self.serial).enqueue_input(&self.pending);
            self.pending.drain(..n);
        }
        self.pending.is_empty()
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
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
            _ => Ok(0),
        };
        match got {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Ok(0) | Err(_) => self.input_closed(ops),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                if !self.feed() {
                    // The guest is not reading: stop reading until it drains the FIFO.
                    self.unwatch_source(ops);
                }
            }
        }
    }

    fn input_closed(&mut self, ops: &mut EventOps) {
        self.unwatch_source(ops);
        match &mut self.input {
            Input::Socket {
                console, client, ..
            } => {
                log::info!("console client detached");
                lock(console).detach();
                *client = None;
            }
            _ => {
                log::debug!("console input closed");
                self.input = Input::None;
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
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
            log::info!("console client attached");
            *client = Some(reader);
            if self.pending.is_empty() {
                self.watch_source(ops);
            }
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.exit.evt.as_raw_fd(), EXIT),
            (self.drained.as_raw_fd(), DRAINED),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
                self.exit
                    .request_exit(Exit::Failed("cannot set up the event loop".into()));
            }
        }
        if let Input::Socket { listener, .. } = &self.input {
            let fd = listener.listener.as_raw_fd();
            if ops
                .add(Events::with_data_raw(fd, LISTENER, EventSet::IN))
                .is_err()
            {
                self.exit
                    .request_exit(Exit::Failed("cannot watch the console socket".into()));
            }
        }
        self.watch_source(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EXIT => {
                let _ = self.exit.evt.read();
                self.done = true;
            }
            DRAINED => {
                let _ = self.drained.read();
                let was_blocked = !self.pending.is_empty();
                if self.feed() && was_blocked {
                    self.watch_source(ops);
                }
            }
            LISTENER => self.accept(ops),
            STDIN | CLIENT => self.read_input(ops),
            other => log::warn!("event loop: unexpected token {other}"),
        }
    }
}
