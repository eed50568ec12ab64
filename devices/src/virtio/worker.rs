//! A device's worker thread: waits on its queues' eventfds and runs a handler for each one
//! that fires, until it is stopped.
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `handler(i)` whenever `evts[i]` fires (after draining it).
    pub fn spawn<F>(name: String, evts: Vec<EventFd>, mut handler: F) -> std::io::Result<Worker>
    where
        F: FnMut(usize) + Send + 'static,
    {
        let fds = evts.iter().map(|e| (e.as_raw_fd(), libc::POLLIN)).collect();
        Worker::spawn_poll(name, fds, move |ready, _| {
            for (i, evt) in evts.iter().enumerate() {
                if ready[i] != 0 {
                    let _ = evt.read();
                    handler(i);
                }
            }
        })
    }

    /// Polls `fds` and runs `handler(revents, interest)` whenever one is ready. Each fd is
    /// polled for what `interest[i]` says: the events given with it at first, then whatever
    /// the handler leaves there (0 pauses an fd, as a network device does while the guest has no buffers; a
    /// negative value ignores it entirely, errors and hang-ups included).
    /// The fds must stay open while the worker runs (the handler usually owns them).
    pub fn spawn_poll<F>(
        name: String,
        fds: Vec<(RawFd, i16)>,
        mut handler: F,
    ) -> std::io::Result<Worker>
    where
        F: FnMut(&[i16], &mut [i16]) + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let thread = spawn_thread(name, move || {
            let n = fds.len();
            let (fds, mut interest): (Vec<RawFd>, Vec<i16>) = fds.into_iter().unzip();
            let mut ready = vec![0i16; n];
            let mut pfds: Vec<libc::pollfd> = fds
                .iter()
                .copied()
                .chain(std::iter::once(stop_rx.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            loop {
                for ((p, &want), &fd) in pfds.iter_mut().zip(&interest).zip(&fds) {
                    // A negative interest drops the fd from the poll (errors included).
                    p.fd = if want < 0 { -1 } else { fd };
                    p.events = want.max(0);
                }
                // SAFETY: pfds is a valid array of pollfd of the length we pass.
                let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
                if r < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    log::error!(
                        "virtio worker: poll failed: {}",
                        std::io::Error::last_os_error()
                    );
                    return;
                }
                if pfds[n].revents != 0 {
                    return;
                }
                for (r, p) in ready.iter_mut().zip(&pfds) {
                    *r = p.revents;
                }
                if ready.iter().any(|&r| r != 0) {
                    handler(&ready, &mut interest);
                }
            }
        })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a device thread: named `name`, and under the device threads' seccomp filter
/// ([`crate::seccomp::enter_worker`]) before `f` runs. A thread that cannot install it
/// does not run `f`.
pub fn spawn_thread(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let Err(e) = crate::seccomp::enter_worker() {
                let why = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                log::error!("{name}: {e}{why}; the thread does not start");
                return;
            }
            f()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_the_handler_per_event_and_stops() {
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kick1 = evts[1].try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        let mut w = Worker::spawn("test".into(), evts, move |i| tx.send(i).unwrap()).unwrap();
        kick1.write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            1
        );
        w.stop();
        assert!(rx.recv().is_err(), "handler dropped with the thread");
    }
}
