//! A device's worker thread: waits on its queues' eventfds and runs a handler for each one
//! that fires, until it is stopped.
use std::os::fd::AsRawFd;
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
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut fds: Vec<libc::pollfd> = evts
                .iter()
                .map(|e| e.as_raw_fd())
                .chain(std::iter::once(stop_rx.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            loop {
                // SAFETY: fds is a valid array of pollfd of the length we pass.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if n < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    log::error!(
                        "virtio worker: poll failed: {}",
                        std::io::Error::last_os_error()
                    );
                    return;
                }
                if fds[evts.len()].revents != 0 {
                    return;
                }
                for i in 0..evts.len() {
                    if fds[i].revents != 0 {
                        let _ = evts[i].read();
                        handler(i);
                    }
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
