//! virtio-fs through a vhost-user backend (virtiofsd): nixvm serves the config space (the
//! tag) and hands the backend guest memory, the queues, each queue's ioeventfd as its kick
//! and the device's irqfd as its call, so requests and completions never pass through
//! nixvm's threads.
//!
//! The backend's socket may appear a moment after nixvm starts: connecting waits for it,
//! bounded. If the backend dies while the VM runs, nixvm logs it and takes the queues over,
//! answering every request with EIO, so the guest sees I/O errors on that mount instead of
//! hanging.
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::fuse;
use super::worker::Worker;
use super::{
    ActivateError, F_VERSION_1, GuestMemoryMmap, Interrupt, Memory, VIRTIO_ID_FS, VirtioDevice,
    read_config_bytes,
};

/// The tag is at most this long (the config space field).
pub const TAG_MAX: usize = 36;
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// At most this many request queues (besides the high-priority queue).
pub const MAX_REQUEST_QUEUES: u16 = 16;
/// Longest nixvm waits for the back end to answer while setting the device up or resetting
/// it (a vCPU may be waiting); then the connection is shut down, as if the back end died.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "nothing listens on vhost-user socket {socket} (waited {}s for the backend, e.g. virtiofsd, to start)",
        waited.as_secs()
    )]
    NoBackend { socket: PathBuf, waited: Duration },
    #[error("cannot connect to vhost-user socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the vhost-user backend on {socket} failed the handshake ({step})")]
    Handshake {
        socket: PathBuf,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user backend on {socket} does not offer VIRTIO_F_VERSION_1")]
    NoVersion1 { socket: PathBuf },
    #[error("the vhost-user backend on {socket} serves {queues} queues; virtio-fs needs 2")]
    TooFewQueues { socket: PathBuf, queues: u64 },
}

/// Why the back end refused the device's set-up at activation.
#[derive(Debug, thiserror::Error)]
pub enum SetUpError {
    #[error("{step}{}", queue.map_or(String::new(), |q| format!(" of queue {q}")))]
    Step {
        /// None for the device-wide steps.
        queue: Option<usize>,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("guest memory is not shareable")]
    Memory(#[source] vhost::Error),
    #[error("queue {queue}'s {what} at {addr:#x} is outside guest memory")]
    Ring {
        queue: usize,
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What `--fs` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsOptions {
    pub tag: String,
    pub socket: PathBuf,
    pub queue_size: u16,
    /// Request queues wanted (1..=MAX_REQUEST_QUEUES); fewer if the backend serves fewer.
    pub request_queues: u16,
}

/// The virtio-fs device, its backend connected.
pub struct VhostUserFs {
    socket: PathBuf,
    tag: String,
    frontend: Frontend,
    /// The same connection, watched for the backend hanging up.
    stream: UnixStream,
    backend_features: u64,
    protocol: bool,
    acked: u64,
    /// One size per queue: the high-priority queue, then the request queues.
    queue_sizes: Vec<u16>,
    config: [u8; TAG_MAX + 4],
    watcher: Option<Worker>,
}

/// Connects to `socket`, waiting up to `wait` for a listener to appear there.
fn connect(socket: &Path, wait: Duration) -> Result<UnixStream, Error> {
    let deadline = Instant::now() + wait;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                if Instant::now() >= deadline {
                    return Err(Error::NoBackend {
                        socket: socket.to_owned(),
                        waited: wait,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(Error::Connect {
                    socket: socket.to_owned(),
                    source,
                });
            }
        }
    }
}

impl VhostUserFs {
    /// Connects to the backend (waiting up to `wait` for its socket) and negotiates.
    pub fn connect(opts: &FsOptions, wait: Duration) -> Result<VhostUserFs, Error> {
        let stream = connect(&opts.socket, wait)?;
        let socket = || opts.socket.clone();
        let handshake = |step| {
            move |source| Error::Handshake {
                socket: opts.socket.clone(),
                step,
                source,
            }
        };
        let wanted_queues = 1 + u64::from(opts.request_queues.clamp(1, MAX_REQUEST_QUEUES));
        let clone = stream.try_clone().map_err(|source| Error::Connect {
            socket: socket(),
            source,
        })?;
        let mut frontend = Frontend::from_stream(clone, wanted_queues);
        frontend.set_owner().map_err(handshake("set_owner"))?;
        let backend_features = frontend.get_features().map_err(handshake("get_features"))?;
        if backend_features & F_VERSION_1 == 0 {
            return Err(Error::NoVersion1 { socket: socket() });
        }
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        // Without MQ the backend serves the two queues every virtio-fs backend has.
        let mut num_queues = 2;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(handshake("get_protocol_features"))?;
            let wanted = offered & VhostUserProtocolFeatures::MQ;
            frontend
                .set_protocol_features(wanted)
                .map_err(handshake("set_protocol_features"))?;
            if wanted.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend
                    .get_queue_num()
                    .map_err(handshake("get_queue_num"))?;
                if n < 2 {
                    return Err(Error::TooFewQueues {
                        socket: socket(),
                        queues: n,
                    });
                }
                num_queues = n.min(wanted_queues);
            }
        }
        let mut config = [0u8; TAG_MAX + 4];
        let n = opts.tag.len().min(TAG_MAX);
        config[..n].copy_from_slice(&opts.tag.as_bytes()[..n]);
        let num_queues = usize::try_from(num_queues).expect("at most 1 + MAX_REQUEST_QUEUES");
        let request_queues = u32::try_from(num_queues - 1).expect("small");
        config[TAG_MAX..].copy_from_slice(&request_queues.to_le_bytes());
        Ok(VhostUserFs {
            socket: opts.socket.clone(),
            tag: opts.tag.clone(),
            frontend,
            stream,
            backend_features,
            protocol,
            acked: 0,
            queue_sizes: vec![opts.queue_size; num_queues],
            config,
            watcher: None,
        })
    }

    /// Sends the backend the memory table and the rings.
    fn set_up(
        &mut self,
        mem: &GuestMemoryMmap,
        call: &EventFd,
        queues: &[(Queue, EventFd)],
    ) -> Result<(), SetUpError> {
        let fe = &mut self.frontend;
        let device_step = |step| {
            move |source| SetUpError::Step {
                queue: None,
                step,
                source,
            }
        };
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.set_features(self.acked | (self.backend_features & protocol_bit))
            .map_err(device_step("set_features"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(SetUpError::Memory)?;
        fe.set_mem_table(&regions)
            .map_err(device_step("set_mem_table"))?;
        for (i, (q, kick)) in queues.iter().enumerate() {
            if !q.ready() {
                // A driver may leave request queues unused (Linux before 6.11 uses one).
                continue;
            }
            let host = |a: u64, what| {
                mem.get_host_address(GuestAddress(a))
                    .map(|p| p as u64)
                    .map_err(|source| SetUpError::Ring {
                        queue: i,
                        what,
                        addr: a,
                        source,
                    })
            };
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table(), "descriptor table")?,
                used_ring_addr: host(q.used_ring(), "used ring")?,
                avail_ring_addr: host(q.avail_ring(), "available ring")?,
                log_addr: None,
            };
            let step = |r: Result<(), vhost::Error>, step| {
                r.map_err(|source| SetUpError::Step {
                    queue: Some(i),
                    step,
                    source,
                })
            };
            step(fe.set_vring_num(i, q.size()), "set_vring_num")?;
            step(fe.set_vring_addr(i, &cfg), "set_vring_addr")?;
            step(fe.set_vring_base(i, q.next_avail()), "set_vring_base")?;
            step(fe.set_vring_call(i, call), "set_vring_call")?;
            step(fe.set_vring_kick(i, kick), "set_vring_kick")?;
            if self.protocol {
                step(fe.set_vring_enable(i, true), "set_vring_enable")?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn avail_features(&self) -> u64 {
        // PROTOCOL_FEATURES is between nixvm and the backend, not for the guest.
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn signals_directly(&self) -> bool {
        true
    }
    fn activate(
        &mut self,
        mem: Memory,
        irq: Arc<dyn Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        let call = irq
            .notifier()
            .ok_or(ActivateError::NoNotifier)?
            .try_clone()
            .map_err(ActivateError::Thread)?;
        let fd = self.stream.as_raw_fd();
        with_deadline(fd, BACKEND_TIMEOUT, || {
            self.set_up(&mem.memory(), &call, &queues)
        })
        .map_err(|e| ActivateError::Backend(Box::new(e)))?;
        let mut fallback = Fallback {
            mem,
            irq,
            queues,
            failed: false,
        };
        // Until the backend goes, only its hang-up matters (not its replies: the frontend
        // reads those), and the kicks are the backend's.
        let mut fds = vec![(self.stream.as_raw_fd(), libc::POLLRDHUP)];
        fds.extend(fallback.queues.iter().map(|(_, e)| (e.as_raw_fd(), 0)));
        let (tag, socket) = (self.tag.clone(), self.socket.clone());
        let worker = Worker::spawn_poll(format!("virtio-fs-{tag}"), fds, move |ready, interest| {
            if !fallback.failed {
                if ready[0] == 0 {
                    return;
                }
                log::error!(
                    "virtio-fs {tag}: the vhost-user backend on {} has gone away; \
                     the guest's file operations on this share now fail with EIO",
                    socket.display()
                );
                fallback.take_over();
                interest[0] = -1;
                for i in interest.iter_mut().skip(1) {
                    *i = libc::POLLIN;
                }
            }
            for (i, r) in ready.iter().enumerate().skip(1) {
                if *r != 0 {
                    let _ = fallback.queues[i - 1].1.read();
                }
            }
            fallback.answer_all();
        })
        .map_err(ActivateError::Thread)?;
        self.watcher = Some(worker);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.watcher.take();
        let fd = self.stream.as_raw_fd();
        let (frontend, tag, n) = (&mut self.frontend, &self.tag, self.queue_sizes.len());
        with_deadline(fd, BACKEND_TIMEOUT, || {
            for i in 0..n {
                // Stops the ring in the backend; a dead backend has nothing to stop.
                if let Err(e) = frontend.get_vring_base(i) {
                    log::debug!("virtio-fs {tag}: get_vring_base({i}): {e}");
                }
            }
        });
        true
    }
}

/// Runs `f`, which talks to the back end on the connection `fd`; if it has not returned
/// after `timeout`, shuts the connection down so that it fails instead of blocking on a
/// back end that stopped answering (then the device goes on as if the back end had died).
fn with_deadline<T>(fd: std::os::fd::RawFd, timeout: Duration, f: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = super::worker::spawn_thread("vhost-user-deadline".into(), move || {
        if wait.recv_timeout(timeout) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            log::error!(
                "virtio-fs: the vhost-user back end did not answer within {timeout:?}: disconnecting it"
            );
            // SAFETY: shutdown on a descriptor the caller keeps open until we are joined.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    });
    let r = f();
    drop(done);
    match watchdog {
        Ok(t) => {
            let _ = t.join();
        }
        // Without the thread there is no deadline; the call ran as it always could.
        Err(e) => log::warn!("virtio-fs: no deadline for the back end: {e}"),
    }
    r
}

/// The queues as nixvm serves them once the backend is gone: every request fails with EIO.
struct Fallback {
    mem: Memory,
    irq: Arc<dyn Interrupt>,
    queues: Vec<(Queue, EventFd)>,
    failed: bool,
}

impl Fallback {
    /// Picks the rings up where the backend left them: after the last request it completed
    /// (requests it had taken but not answered are answered again, now with EIO).
    fn take_over(&mut self) {
        self.failed = true;
        let mem = self.mem.memory();
        for (q, _) in &mut self.queues {
            let idx_at = GuestAddress(q.used_ring()).unchecked_add(2);
            let used = mem.read_obj::<u16>(idx_at).map(u16::from_le).unwrap_or(0);
            q.set_next_avail(used);
            q.set_next_used(used);
        }
    }

    /// Answers every request waiting, with the queue's notification protocol (EVENT_IDX
    /// included: the driver only kicks again once told where to).
    fn answer_all(&mut self) {
        let mem = self.mem.memory();
        for (q, _) in &mut self.queues {
            super::process_queue(q, &mem, self.irq.as_ref(), |chain| answer_eio(chain, &mem));
        }
    }
}

/// Answers one FUSE request with EIO (FORGETs get no answer); returns the bytes written.
fn answer_eio<M>(chain: virtio_queue::DescriptorChain<M>, mem: &GuestMemoryMmap) -> u32
where
    M: Clone + std::ops::Deref<Target = GuestMemoryMmap>,
{
    let (Ok(mut request), Ok(mut reply)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return 0;
    };
    let Ok(header) = request.read_obj::<fuse::InHeader>() else {
        return 0;
    };
    if matches!(header.opcode, fuse::FORGET | fuse::BATCH_FORGET) {
        return 0;
    }
    let len = u32::try_from(size_of::<fuse::OutHeader>()).unwrap_or(0);
    let out = fuse::OutHeader {
        len,
        error: -libc::EIO,
        unique: header.unique,
    };
    match reply.write_obj(out) {
        Ok(()) => len,
        Err(_) => 0,
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        self.watcher.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{CountingIrq, memory};
    use std::os::unix::net::UnixListener;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;

    #[test]
    fn a_missing_socket_is_waited_for_then_named() {
        let sock = std::env::temp_dir().join(format!("nixvm-fs-none-{}.sock", std::process::id()));
        let opts = FsOptions {
            tag: "t".into(),
            socket: sock.clone(),
            queue_size: 8,
            request_queues: 1,
        };
        let start = Instant::now();
        let e = VhostUserFs::connect(&opts, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300), "it waited");
        assert!(matches!(e, Error::NoBackend { .. }));
        assert!(e.to_string().contains(&sock.display().to_string()));
    }

    #[test]
    fn a_back_end_that_stops_answering_is_cut_off_at_the_deadline() {
        use std::io::Read;
        let (mut ours, _silent) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        let start = Instant::now();
        let got = with_deadline(fd, Duration::from_millis(200), || {
            let mut b = [0u8; 1];
            ours.read(&mut b)
        });
        assert_eq!(got.unwrap(), 0, "the read ends (EOF) instead of blocking");
        assert!(start.elapsed() < Duration::from_secs(5));
        // An answer in time leaves the connection alone.
        let (a, mut b) = UnixStream::pair().unwrap();
        with_deadline(a.as_raw_fd(), Duration::from_secs(5), || {
            std::io::Write::write_all(&mut b, b"x").unwrap()
        });
        let mut buf = [0u8; 1];
        (&a).read_exact(&mut buf).unwrap();
        std::io::Write::write_all(&mut b, b"y").unwrap();
        (&a).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"y");
    }

    #[test]
    fn a_socket_that_appears_late_is_connected_to() {
        let sock = std::env::temp_dir().join(format!("nixvm-fs-late-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let s2 = sock.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let l = UnixListener::bind(&s2).unwrap();
            // Accept, then hang up: the handshake fails, but the connection was made.
            drop(l.accept().unwrap());
        });
        let opts = FsOptions {
            tag: "t".into(),
            socket: sock.clone(),
            queue_size: 8,
            request_queues: 1,
        };
        let e = VhostUserFs::connect(&opts, Duration::from_secs(10))
            .err()
            .unwrap();
        t.join().unwrap();
        assert!(matches!(e, Error::Handshake { .. }), "{e}");
        let _ = std::fs::remove_file(&sock);
    }

    #[test]
    fn a_dead_backend_s_requests_fail_with_eio() {
        let mem = Memory::new(memory(1 << 20));
        let m = mem.memory();
        let vq = MockSplitQueue::new(&*m, 16);
        // A LOOKUP (opcode 1) with unique 77, and a FORGET.
        let mut lookup = [0u8; 40];
        lookup[4..8].copy_from_slice(&1u32.to_le_bytes());
        lookup[8..16].copy_from_slice(&77u64.to_le_bytes());
        m.write_slice(&lookup, GuestAddress(0x1_0000)).unwrap();
        let mut forget = [0u8; 40];
        forget[4..8].copy_from_slice(&fuse::FORGET.to_le_bytes());
        m.write_slice(&forget, GuestAddress(0x1_1000)).unwrap();
        let d = |a: u64, l: u32, f: u16, n: u16| RawDescriptor::from(Descriptor::new(a, l, f, n));
        vq.add_desc_chains(
            &[
                d(0x1_0000, 40, 1, 1),
                d(0x2_0000, 128, 2, 0),
                d(0x1_1000, 48, 0, 0),
            ],
            0,
        )
        .unwrap();
        let q: Queue = vq.create_queue().unwrap();
        let irq = Arc::new(CountingIrq::default());
        let mut f = Fallback {
            mem: mem.clone(),
            irq: irq.clone(),
            queues: vec![(q, EventFd::new(0).unwrap())],
            failed: false,
        };
        f.take_over();
        f.answer_all();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 16);
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 0);
        let mut reply = [0u8; 16];
        m.read_slice(&mut reply, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            -libc::EIO
        );
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 77);
        assert_eq!(irq.0.lock().unwrap().len(), 1);
    }
}
