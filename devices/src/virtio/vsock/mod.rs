//! virtio-vsock with its host side as UNIX sockets, in the protocol Firecracker and Cloud
//! Hypervisor use: a host program connects to the device's socket PATH and writes
//! `CONNECT <port>\n`; once the guest accepts, it reads `OK <host port>\n` and the stream
//! is the connection. A guest connecting to host (CID 2) port P reaches the UNIX socket
//! `PATH_P`, which a host program listens on. No privilege and no kernel module on the host.
//!
//! Flow control is the spec's credit scheme: the device never sends a connection more than
//! the guest's advertised buffer space, and holds at most [`BUF_ALLOC`] bytes of the guest's
//! data per connection that the host program has not taken yet (a guest that sends more is
//! reset). Connections are bounded by [`MAX_CONNS`]; everything is dropped at a device reset.
//!
//! One host port can be served by nixvm itself instead of a socket: [`Notify`], which relays
//! a systemd guest's `sd_notify` messages (READY=1, STATUS=, STOPPING=1) to the host's
//! NOTIFY_SOCKET.
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::buffers::{ChainBuffers, gather, scatter, split, total};
use super::worker::Worker;
use super::{
    ActivateError, F_EVENT_IDX, F_VERSION_1, GuestMemoryMmap, Interrupt, Memory,
    VIRTIO_MMIO_INT_VRING, VirtioDevice, queue, read_config_bytes,
};

pub mod packet;
use packet::*;

#[cfg(test)]
mod tests;

pub const VIRTIO_ID_VSOCK: u32 = 19;
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
/// What each connection can hold of the guest's data that the host has not read yet: the
/// buffer space the device advertises.
pub const BUF_ALLOC: u32 = 256 << 10;
/// The largest payload of one packet either way.
const MAX_PAYLOAD: usize = 64 << 10;
/// Connections (and host clients still writing their CONNECT line) at once.
pub const MAX_CONNS: usize = 256;
/// Resets for packets that belong to no connection, waiting for receive buffers.
const MAX_PENDING_RESETS: usize = 64;
const CONNECT_LINE_MAX: usize = 32;
/// Host ports for host-initiated connections are taken from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Packets sent to the guest per wake-up before the worker lets the transmit side in.
const RX_BUDGET: usize = 256;
/// The most one sd_notify message may hold.
const NOTIFY_MAX: usize = 4096;

/// The host port nixvm itself listens on for the guest's sd_notify messages (systemd's
/// `vmm.notify_socket=vsock-stream:2:<this>`).
pub const NOTIFY_PORT: u32 = 0xffff_fff0;

/// Relays a guest's sd_notify messages to the host's notification socket.
pub struct Notify {
    /// Where: a path, or `@name` for an abstract socket (as NOTIFY_SOCKET says).
    pub target: String,
    socket: UnixDatagram,
}

impl Notify {
    pub fn new(target: String) -> io::Result<Notify> {
        Ok(Notify {
            target,
            socket: UnixDatagram::unbound()?,
        })
    }

    /// Sends what the host's unit should hear of a guest's message: READY=1, STATUS=...,
    /// STOPPING=1, and STOPPING=1 for systemd-shutdown's `X_SYSTEMD_SHUTDOWN=poweroff` (or
    /// halt: nixvm is about to end; a reboot is not an end, nixvm may boot the guest again).
    /// The rest (MAINPID=, FDSTORE=, X_SYSTEMD_...) concerns the guest, not nixvm's unit.
    pub fn relay(&self, msg: &[u8]) {
        let Some(out) = relayed(msg) else {
            return;
        };
        let sent = match self.target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| self.socket.send_to_addr(out.as_bytes(), &a))
            }
            None => self.socket.send_to(out.as_bytes(), &self.target),
        };
        match sent {
            Ok(_) => log::info!("vsock: relayed {out:?} to {}", self.target),
            Err(e) => crate::guest_warn!("vsock: cannot notify {}: {e}", self.target),
        }
    }
}

/// The part of a guest's sd_notify message that nixvm passes on, if any.
fn relayed(msg: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(msg);
    let mut keep: Vec<&str> = Vec::new();
    for l in text.lines() {
        match l {
            "READY=1" | "STOPPING=1" => keep.push(l),
            "X_SYSTEMD_SHUTDOWN=poweroff" | "X_SYSTEMD_SHUTDOWN=halt" => keep.push("STOPPING=1"),
            _ if l.starts_with("STATUS=") => keep.push(l),
            _ => {}
        }
    }
    keep.dedup();
    (!keep.is_empty()).then(|| keep.join("\n"))
}

/// The host side of the device.
pub struct HostSide {
    /// Host programs connect here (`CONNECT <port>\n`).
    pub listener: Option<UnixListener>,
    /// `PATH`: a guest connecting to host port P reaches `PATH_P`.
    pub path: Option<PathBuf>,
    pub notify: Option<Notify>,
}

impl HostSide {
    /// Passes on what a guest's notify connection holds (other connections hold nothing).
    fn relay(&self, conn: &Conn) {
        if let (Some(n), Peer::Notify(msg)) = (&self.notify, &conn.peer) {
            n.relay(msg);
        }
    }
}

pub struct Vsock {
    cid: u64,
    config: [u8; 8],
    host: Arc<HostSide>,
    worker: Option<Worker>,
}

impl Vsock {
    pub fn new(cid: u64, host: HostSide) -> io::Result<Vsock> {
        if let Some(l) = &host.listener {
            l.set_nonblocking(true)?;
        }
        Ok(Vsock {
            cid,
            config: cid.to_le_bytes(),
            host: Arc::new(host),
            worker: None,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn avail_features(&self) -> u64 {
        F_VERSION_1 | F_EVENT_IDX
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let mut q = queues.into_iter();
        let (Some((rxq, rx_evt)), Some((txq, tx_evt)), Some((_evq, ev_evt))) =
            (q.next(), q.next(), q.next())
        else {
            return Err(ActivateError::BadQueue(0));
        };
        let mut mux = Muxer::new(self.cid, self.host.clone(), mem, irq, rxq, txq)
            .map_err(ActivateError::Thread)?;
        let rx_kick = rx_evt.try_clone().map_err(ActivateError::Thread)?;
        let tx_kick = tx_evt.try_clone().map_err(ActivateError::Thread)?;
        let fds = vec![
            (rx_evt.as_raw_fd(), libc::POLLIN),
            (tx_evt.as_raw_fd(), libc::POLLIN),
            (ev_evt.as_raw_fd(), libc::POLLIN),
            (mux.epoll.as_raw_fd(), libc::POLLIN),
        ];
        let worker = Worker::spawn_poll(
            format!("virtio-vsock-{}", self.cid),
            fds,
            move |ready, _| {
                for (evt, r) in [&rx_evt, &tx_evt, &ev_evt].into_iter().zip(ready) {
                    if *r != 0 {
                        let _ = evt.read();
                    }
                }
                if ready[3] != 0 {
                    mux.host_events();
                }
                if ready[1] != 0 && mux.process_tx() {
                    // More than a ring's worth: the rest after the receive side's turn.
                    let _ = tx_kick.write(1);
                }
                if !mux.process_rx() {
                    // Out of budget with more to send: come back after the other side.
                    let _ = rx_kick.write(1);
                }
            },
        )
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.worker.take();
        true
    }
}

/// A connection's host end.
enum Peer {
    Stream(UnixStream),
    /// The guest's sd_notify connection: its bytes, relayed when it closes.
    Notify(Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A host program asked for it; the guest has not answered the REQUEST.
    Connecting,
    Established,
}

/// Control packets a connection owes the guest.
#[derive(Default, Clone, Copy)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
    /// SHUTDOWN with these flags (0: none).
    shutdown: u32,
}

struct Conn {
    peer: Peer,
    state: State,
    owed: Owed,
    /// The guest's data the host program has not taken yet (at most BUF_ALLOC).
    pending: VecDeque<u8>,
    /// Bytes of the guest's data handed to the host program, and the count last told.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// The guest's buffer space and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// The host stream may have data (edge-triggered: until a read would block).
    readable: bool,
    host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    guest_shutdown: u32,
    write_shut: bool,
}

impl Conn {
    fn new(peer: Peer, state: State) -> Conn {
        Conn {
            peer,
            state,
            owed: Owed::default(),
            pending: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: false,
            host_eof: false,
            guest_shutdown: 0,
            write_shut: false,
        }
    }

    /// What the guest can still take.
    fn credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn stream(&mut self) -> Option<&mut UnixStream> {
        match &mut self.peer {
            Peer::Stream(s) => Some(s),
            Peer::Notify(_) => None,
        }
    }

    /// Writes what the guest sent to the host program, as far as it takes it. Err: the host
    /// end is gone.
    fn flush(&mut self) -> io::Result<()> {
        let Peer::Stream(s) = &mut self.peer else {
            return Ok(());
        };
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match s.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.pending.is_empty() && self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            self.write_shut = true;
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        // Tell the guest about freed space before it runs out of what it knows of.
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= BUF_ALLOC / 4 {
            self.owed.credit_update = true;
        }
        Ok(())
    }

    /// The guest closed its end and everything it sent has reached the host program.
    fn finished(&self) -> bool {
        self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && self.pending.is_empty()
    }
}

/// (host port, guest port)
type Key = (u32, u32);

/// A host program that connected and has not finished its CONNECT line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The device's connections and queues, owned by the worker thread.
struct Muxer {
    cid: u64,
    host: Arc<HostSide>,
    mem: Memory,
    irq: Arc<dyn Interrupt>,
    rxq: Queue,
    txq: Queue,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    /// Which connection or pending client an fd in the epoll set is.
    fds: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, Pending>,
    /// RST packets for packets that belonged to no connection: (host port, guest port).
    resets: VecDeque<Key>,
    next_local_port: u32,
    buf: Vec<u8>,
}

impl Drop for Muxer {
    /// A guest that powers off right after its last notification (systemd-shutdown's) may
    /// never close that connection: what it sent is passed on now.
    fn drop(&mut self) {
        for conn in self.conns.values() {
            self.host.relay(conn);
        }
    }
}

/// The epoll token of the listener (fds are never negative).
const LISTENER_TOKEN: u64 = u64::MAX;

impl Muxer {
    fn new(
        cid: u64,
        host: Arc<HostSide>,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        rxq: Queue,
        txq: Queue,
    ) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        if let Some(l) = &host.listener {
            epoll.ctl(
                ControlOperation::Add,
                l.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )?;
        }
        Ok(Muxer {
            cid,
            host,
            mem,
            irq,
            rxq,
            txq,
            epoll,
            conns: HashMap::new(),
            fds: HashMap::new(),
            pending: HashMap::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            buf: vec![0; MAX_PAYLOAD],
        })
    }

    fn watch(&self, fd: RawFd) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, u64::try_from(fd).unwrap_or(0)),
        )
    }

    fn connections(&self) -> usize {
        self.conns.len() + self.pending.len()
    }

    /// Handles what the epoll set reports: new host clients, CONNECT lines, streams that
    /// became readable or writable.
    fn host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("vsock: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == LISTENER_TOKEN {
                self.accept();
                continue;
            }
            let fd = RawFd::try_from(ev.data()).unwrap_or(-1);
            let set = ev.event_set();
            if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
                continue;
            }
            let Some(&key) = self.fds.get(&fd) else {
                continue;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if set.intersects(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
            ) {
                conn.readable = true;
            }
            if set.intersects(EventSet::OUT | EventSet::ERROR) && conn.flush().is_err() {
                self.reset_conn(key);
                continue;
            }
            self.finish_if_done(key);
        }
    }

    fn accept(&mut self) {
        let host = self.host.clone();
        let Some(listener) = &host.listener else {
            return;
        };
        // Bounded by the listener's backlog, and by MAX_CONNS for those kept.
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.connections() >= MAX_CONNS {
                log::warn!("vsock: {MAX_CONNS} connections already; refusing a host client");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if self.watch(fd).is_ok() {
                self.pending.insert(
                    fd,
                    Pending {
                        stream,
                        line: Vec::new(),
                    },
                );
                // Its line may be there already (the edge came before it was watched).
                self.read_connect_line(fd);
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n` (a byte at a time: what follows the line
    /// is the connection's data) and asks the guest for the connection.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    let line = String::from_utf8_lossy(&p.line);
                    break line
                        .strip_prefix("CONNECT ")
                        .and_then(|n| n.trim().parse::<u32>().ok());
                }
                Ok(1) if p.line.len() < CONNECT_LINE_MAX => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Closed, too long, or broken.
                _ => break None,
            }
        };
        let p = self.pending.remove(&fd).expect("looked up above");
        let Some(port) = port else {
            log::info!("vsock: a host client sent no valid CONNECT line; closed");
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            return;
        };
        let local = self.free_local_port(port);
        let mut conn = Conn::new(Peer::Stream(p.stream), State::Connecting);
        conn.owed.request = true;
        self.conns.insert((local, port), conn);
        self.fds.insert(fd, (local, port));
    }

    fn free_local_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if p != NOTIFY_PORT && !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    /// Takes the packets the guest sent, a ring's worth at most; true if there are more (the
    /// caller comes back for them after the other work).
    fn process_tx(&mut self) -> bool {
        let mem = self.mem.memory();
        let mut packets = Vec::new();
        let served = queue::for_each_chain(&mut self.txq, &*mem, |q, chain| {
            let head = chain.head_index();
            let bufs = ChainBuffers::of(chain);
            packets.push(read_packet(&mem, &bufs.readable));
            if let Err(e) = q.add_used(&*mem, head, 0) {
                crate::guest_warn!("virtio-vsock: cannot complete tx descriptor {head}: {e}");
            }
            // The packets are handled between batches: a batch holds at most a ring.
            if packets.len() >= usize::from(QUEUE_SIZE) {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        });
        let more = match served {
            Ok(used) => {
                if used && self.txq.needs_notification(&*mem).unwrap_or(true) {
                    self.irq.trigger(VIRTIO_MMIO_INT_VRING);
                }
                packets.len() >= usize::from(QUEUE_SIZE)
            }
            Err(e) => {
                super::broken_queue(&mut self.txq, self.irq.as_ref(), &e);
                false
            }
        };
        for p in packets {
            match p {
                Ok((hdr, data)) => self.handle(hdr, &data),
                Err(Some(hdr)) => {
                    crate::guest_warn!("virtio-vsock: malformed packet; its connection is reset");
                    if hdr.src_cid == self.cid && hdr.dst_cid == HOST_CID {
                        self.reset_conn((hdr.dst_port, hdr.src_port));
                    }
                }
                Err(None) => crate::guest_warn!("virtio-vsock: malformed packet dropped"),
            }
        }
        more
    }

    /// One packet from the guest.
    fn handle(&mut self, hdr: Header, data: &[u8]) {
        log::trace!("vsock: from the guest: {hdr:?}");
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            crate::guest_warn!(
                "virtio-vsock: packet from CID {} to CID {} dropped",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.kind != TYPE_STREAM {
            self.reset_unknown(hdr.op, key);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == OP_REQUEST {
                self.guest_connect(key, hdr);
            } else {
                self.reset_unknown(hdr.op, key);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                // Before any of the guest's data: nothing can be pending yet.
                conn.pending.extend(ok.bytes());
                // Not the guest's bytes: they do not count towards its credit.
                conn.fwd_cnt = conn
                    .fwd_cnt
                    .wrapping_sub(u32::try_from(ok.len()).unwrap_or(0));
                conn.readable = true;
                if conn.flush().is_err() {
                    self.reset_conn(key);
                }
            }
            OP_RW if conn.state == State::Established => {
                if let Peer::Notify(msg) = &mut conn.peer {
                    if msg.len() + data.len() > NOTIFY_MAX {
                        crate::guest_warn!("virtio-vsock: sd_notify message too long; reset");
                        self.reset_conn(key);
                    } else {
                        msg.extend_from_slice(data);
                        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(hdr.len);
                        conn.owed.credit_update = true;
                    }
                    return;
                }
                // The OK line may still be ahead of the guest's data: it is not the guest's to count.
                if conn.pending.len() + data.len() > BUF_ALLOC as usize + CONNECT_LINE_MAX {
                    crate::guest_warn!(
                        "virtio-vsock: the guest sent past its credit on port {}; reset",
                        key.0
                    );
                    self.reset_conn(key);
                    return;
                }
                conn.pending.extend(data);
                if conn.flush().is_err() {
                    self.reset_conn(key);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => conn.owed.credit_update = true,
            OP_SHUTDOWN => {
                conn.guest_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if let Peer::Notify(_) = conn.peer {
                    if conn.guest_shutdown & SHUTDOWN_SEND != 0 {
                        self.host.relay(conn);
                        self.reset_conn(key);
                    }
                    return;
                }
                if conn.flush().is_err() {
                    self.reset_conn(key);
                    return;
                }
                self.finish_if_done(key);
            }
            OP_RST => {
                self.host.relay(conn);
                self.remove(key);
            }
            _ => self.reset_conn(key),
        }
    }

    /// The guest connects to host port `key.0`: nixvm's notify port, or `PATH_<port>`.
    fn guest_connect(&mut self, key: Key, hdr: Header) {
        if self.connections() >= MAX_CONNS {
            crate::guest_warn!("virtio-vsock: {MAX_CONNS} connections already; refused");
            self.reset_unknown(OP_REQUEST, key);
            return;
        }
        let peer = if key.0 == NOTIFY_PORT && self.host.notify.is_some() {
            Peer::Notify(Vec::new())
        } else {
            let Some(path) = &self.host.path else {
                self.reset_unknown(OP_REQUEST, key);
                return;
            };
            let mut p = path.clone().into_os_string();
            p.push(format!("_{}", key.0));
            match UnixStream::connect(&p).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => {
                    if self.watch(s.as_raw_fd()).is_err() {
                        self.reset_unknown(OP_REQUEST, key);
                        return;
                    }
                    self.fds.insert(s.as_raw_fd(), key);
                    Peer::Stream(s)
                }
                Err(e) => {
                    log::info!(
                        "vsock: the guest's connection to host port {}: {}: {e}",
                        key.0,
                        PathBuf::from(p).display()
                    );
                    self.reset_unknown(OP_REQUEST, key);
                    return;
                }
            }
        };
        let mut conn = Conn::new(peer, State::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.owed.response = true;
        self.conns.insert(key, conn);
    }

    /// Answers a packet that belongs to no connection with RST (never an RST with one).
    fn reset_unknown(&mut self, op: u16, key: Key) {
        if op == OP_RST {
            return;
        }
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(key);
        }
    }

    /// Ends a connection and tells the guest.
    fn reset_conn(&mut self, key: Key) {
        self.remove(key);
        self.reset_unknown(OP_REQUEST, key);
    }

    fn remove(&mut self, key: Key) {
        if let Some(mut conn) = self.conns.remove(&key)
            && let Some(s) = conn.stream()
        {
            let fd = s.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.fds.remove(&fd);
        }
    }

    /// A connection the guest closed whose data all reached the host: RST, and gone.
    fn finish_if_done(&mut self, key: Key) {
        if self.conns.get(&key).is_some_and(Conn::finished) {
            self.reset_conn(key);
        }
    }

    /// Sends the guest what is owed and what the host programs wrote, while it has receive
    /// buffers and credit. False if it stopped for the budget with more to send.
    fn process_rx(&mut self) -> bool {
        if !self.rxq.ready() {
            return true;
        }
        let mem = self.mem.memory();
        let mut sent = 0usize;
        let mut done = true;
        'outer: loop {
            let mut progress = false;
            while let Some(&key) = self.resets.front() {
                let hdr = self.header(key, OP_RST, 0);
                match deliver(&mut self.rxq, &mem, &hdr, &mut self.buf, 0, |_| Ok(0)) {
                    Delivery::Sent(_) => {
                        self.resets.pop_front();
                        sent += 1;
                    }
                    Delivery::Broken(e) => {
                        super::broken_queue(&mut self.rxq, self.irq.as_ref(), &e);
                        break 'outer;
                    }
                    _ => break 'outer,
                }
            }
            let keys: Vec<Key> = self.conns.keys().copied().collect();
            for key in keys {
                if sent >= RX_BUDGET {
                    done = false;
                    break 'outer;
                }
                match self.send_one(&mem, key) {
                    Some(Delivery::Sent(_)) => {
                        sent += 1;
                        progress = true;
                    }
                    Some(Delivery::NoBuffers | Delivery::Broken(_)) => break 'outer,
                    // The host end ended or failed: a SHUTDOWN or RST is owed now.
                    Some(Delivery::Eof | Delivery::HostError) => progress = true,
                    Some(Delivery::NoData) | None => {}
                }
            }
            if !progress {
                break;
            }
        }
        if sent > 0 && self.rxq.needs_notification(&*mem).unwrap_or(true) {
            self.irq.trigger(VIRTIO_MMIO_INT_VRING);
        }
        done
    }

    /// The next packet of one connection: a control packet it owes, or data.
    fn send_one(&mut self, mem: &GuestMemoryMmap, key: Key) -> Option<Delivery> {
        let conn = self.conns.get(&key)?;
        let owed = conn.owed;
        let op = if owed.request {
            OP_REQUEST
        } else if owed.response {
            OP_RESPONSE
        } else if owed.shutdown != 0 {
            OP_SHUTDOWN
        } else if conn.state == State::Established
            && conn.readable
            && !conn.host_eof
            && conn.credit() > 0
            && matches!(conn.peer, Peer::Stream(_))
        {
            OP_RW
        } else if owed.credit_update {
            OP_CREDIT_UPDATE
        } else {
            return None;
        };
        let mut hdr = self.header(key, op, conn.fwd_cnt);
        hdr.flags = if op == OP_SHUTDOWN { owed.shutdown } else { 0 };
        let credit = usize::try_from(conn.credit()).unwrap_or(usize::MAX);
        let conn = self.conns.get_mut(&key)?;
        let result = match (op, &mut conn.peer) {
            (OP_RW, Peer::Stream(stream)) => {
                deliver(&mut self.rxq, mem, &hdr, &mut self.buf, credit, |buf| {
                    read_some(stream, buf)
                })
            }
            _ => deliver(&mut self.rxq, mem, &hdr, &mut self.buf, 0, |_| Ok(0)),
        };
        log::trace!(
            "vsock: to the guest, op {op} on {}:{} (credit {credit}, fwd_cnt {}): {result:?}",
            key.0,
            key.1,
            conn.fwd_cnt
        );
        match &result {
            Delivery::Sent(n) => {
                conn.fwd_cnt_sent = conn.fwd_cnt;
                conn.owed.credit_update = false;
                match op {
                    OP_REQUEST => conn.owed.request = false,
                    OP_RESPONSE => conn.owed.response = false,
                    OP_SHUTDOWN => conn.owed.shutdown = 0,
                    OP_RW => {
                        conn.rx_cnt = conn.rx_cnt.wrapping_add(u32::try_from(*n).unwrap_or(0));
                    }
                    _ => {}
                }
            }
            Delivery::NoData => conn.readable = false,
            Delivery::Eof => {
                // The host program sends no more; the guest's reader sees the end.
                conn.readable = false;
                conn.host_eof = true;
                conn.owed.shutdown = SHUTDOWN_SEND;
            }
            Delivery::HostError => self.reset_conn(key),
            Delivery::NoBuffers => {}
            Delivery::Broken(e) => super::broken_queue(&mut self.rxq, self.irq.as_ref(), e),
        }
        Some(result)
    }

    fn header(&self, key: Key, op: u16, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }
}

/// What became of a packet for the guest.
#[derive(Debug)]
enum Delivery {
    /// In a receive buffer, with this much payload.
    Sent(usize),
    /// The host stream had nothing now (the buffer went back).
    NoData,
    /// The host stream ended (the buffer went back).
    Eof,
    /// The host stream failed (the buffer went back).
    HostError,
    /// The guest has no receive buffers.
    NoBuffers,
    Broken(queue::QueueError),
}

fn read_some(s: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

/// Puts one packet into the guest's next receive buffer: `hdr`, and for RW a payload that
/// `read` fills (at most `max` bytes, as far as the buffer holds). Buffers the guest made
/// wrong (device-readable, shorter than a header) go back empty, a ring's worth at most.
fn deliver(
    rxq: &mut Queue,
    mem: &GuestMemoryMmap,
    hdr: &Header,
    buf: &mut [u8],
    max: usize,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> Delivery {
    let mut rechecked = false;
    for _ in 0..=rxq.size() {
        let start = rxq.next_avail();
        let chain = match queue::pop(rxq, mem) {
            Ok(Some(c)) => c,
            Ok(None) => match rxq.enable_notification(mem) {
                Ok(true) if !rechecked => {
                    rechecked = true;
                    continue;
                }
                Ok(true) => return Delivery::Broken(queue::QueueError::Stuck),
                Ok(false) => return Delivery::NoBuffers,
                Err(e) => return Delivery::Broken(e.into()),
            },
            Err(e) => return Delivery::Broken(e),
        };
        let head = chain.head_index();
        let bufs = ChainBuffers::of(chain);
        let room = total(&bufs.writable);
        let Some((hdr_segs, data_segs)) =
            split(&bufs.writable, HDR_LEN).filter(|_| bufs.readable.is_empty())
        else {
            crate::guest_warn!("virtio-vsock: receive buffer {head} unusable; returned empty");
            let _ = rxq.add_used(mem, head, 0);
            continue;
        };
        let mut h = *hdr;
        let mut n = 0;
        if hdr.op == OP_RW {
            let want = (room - HDR_LEN).min(max).min(buf.len());
            if want == 0 {
                let _ = rxq.add_used(mem, head, 0);
                continue;
            }
            match read(&mut buf[..want]) {
                Ok(0) => {
                    rxq.set_next_avail(start);
                    return Delivery::Eof;
                }
                Ok(k) => n = k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    rxq.set_next_avail(start);
                    return Delivery::NoData;
                }
                Err(_) => {
                    rxq.set_next_avail(start);
                    return Delivery::HostError;
                }
            }
            h.len = u32::try_from(n).unwrap_or(0);
        }
        let ok = scatter(mem, &hdr_segs, &h.bytes()) && scatter(mem, &data_segs, &buf[..n]);
        if !ok {
            crate::guest_warn!("virtio-vsock: receive buffer outside guest memory");
        }
        let len = if ok { HDR_LEN + n } else { 0 };
        if let Err(e) = rxq.add_used(mem, head, u32::try_from(len).unwrap_or(0)) {
            crate::guest_warn!("virtio-vsock: cannot complete rx descriptor {head}: {e}");
        }
        return Delivery::Sent(n);
    }
    Delivery::Broken(queue::QueueError::Stuck)
}

/// A packet the guest sent: its header and payload. Err with the header if the header was
/// readable but the payload not (its connection is reset), Err(None) if not even that.
fn read_packet(
    mem: &GuestMemoryMmap,
    readable: &[(vm_memory::GuestAddress, usize)],
) -> Result<(Header, Vec<u8>), Option<Header>> {
    let mut h = [0u8; HDR_LEN];
    if !gather(mem, readable, &mut h) {
        return Err(None);
    }
    let hdr = Header::parse(&h);
    let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
    if len == 0 {
        return Ok((hdr, Vec::new()));
    }
    if len > MAX_PAYLOAD || hdr.op != OP_RW {
        return Err(Some(hdr));
    }
    let Some((_, data_segs)) = split(readable, HDR_LEN) else {
        return Err(Some(hdr));
    };
    let mut data = vec![0u8; len];
    if !gather(mem, &data_segs, &mut data) {
        return Err(Some(hdr));
    }
    Ok((hdr, data))
}
