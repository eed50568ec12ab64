//! How a VM ends, and what nixvm's exit status says about it.
//!
//! | exit status | meaning |
//! |---|---|
//! | 0 | the guest powered off, or a QMP client sent `quit` |
//! | 1 | nixvm failed while the VM ran (the message says why) |
//! | 2 | usage error: nothing was started |
//! | 3 | the guest rebooted (i8042 or ACPI reset, triple fault, `panic=-1`): restart nixvm |
//! | 4 | `nixvm ctl shutdown` pressed the power button, the guest did not power off within the timeout, and nixvm stopped it |
//! | 128+N | nixvm got signal N and stopped the VM: SIGTERM (SIGINT when not interactive) only after the guest ignored the power button for `--shutdown-timeout`, or at a second one; SIGHUP at once |
//!
//! SIGTERM (and SIGINT when the console is not an interactive terminal) presses the ACPI power
//! button: a guest that powers off makes nixvm exit 0.
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nixvm_devices::{ExitRequest, GuestExit};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub const EXIT_POWEROFF: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_REBOOT: u8 = 3;
pub const EXIT_FORCED: u8 = 4;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    PowerOff,
    Reset,
    Signal(i32),
    /// Stopped after a control-socket shutdown timed out.
    Forced,
    /// A QMP client's `quit`: stopped at once, as QEMU does (exit status 0).
    Quit,
    Failed(String),
}

impl Exit {
    pub fn status(&self) -> u8 {
        match self {
            Exit::PowerOff | Exit::Quit => EXIT_POWEROFF,
            Exit::Reset => EXIT_REBOOT,
            Exit::Signal(n) => 128u8.saturating_add(u8::try_from(*n).unwrap_or(0)),
            Exit::Forced => EXIT_FORCED,
            Exit::Failed(_) => EXIT_FAILED,
        }
    }
}

/// The VM's one exit: the first request wins and wakes the event loop through `evt`.
pub struct ExitState {
    exit: Mutex<Option<Exit>>,
    exiting: AtomicBool,
    pub evt: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            exit: Mutex::new(None),
            exiting: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn request_exit(&self, exit: Exit) {
        let mut slot = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            log::debug!("exit requested: {exit:?}");
            *slot = Some(exit);
            self.exiting.store(true, Ordering::Release);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot wake the event loop: {e}");
            }
        }
    }

    pub fn is_exiting(&self) -> bool {
        self.exiting.load(Ordering::Acquire)
    }

    /// For a reboot in place: no exit requested any more.
    pub fn clear(&self) {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.exiting.store(false, Ordering::Release);
        let _ = self.evt.read();
    }

    pub fn take(&self) -> Option<Exit> {
        self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ExitRequest for ExitState {
    fn request(&self, what: GuestExit) {
        self.request_exit(match what {
            GuestExit::PowerOff => Exit::PowerOff,
            GuestExit::Reset => Exit::Reset,
        });
    }
}

// Signals that stop the VM: the handler only records the number and writes to an eventfd.
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNAL_NUM: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNAL_NUM.store(num, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` outlives the call and is 8 bytes long.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP signal `evt` instead of killing nixvm.
pub fn catch_stop_signals(evt: &EventFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

/// Pausing the vCPUs: a paused vCPU thread parks here until resumed (or the VM stops).
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    released: bool,
    parked: usize,
    threads: Vec<libc::pthread_t>,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vCPU thread says who it is, so that pausing can kick it out of KVM_RUN.
    pub fn register(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push(me);
    }

    /// Called by a vCPU thread between runs: blocks while the VM is paused.
    pub fn wait_while_paused(&self) {
        let mut s = self.lock();
        if !s.paused || s.released {
            return;
        }
        s.parked += 1;
        self.cv.notify_all();
        while s.paused && !s.released {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
    }

    /// Pauses: kicks every vCPU (`kick` signal) and waits until all are parked. False if
    /// they did not all stop within `timeout`.
    pub fn pause(&self, kick: i32, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        s.paused = true;
        loop {
            if s.parked == s.threads.len() {
                return true;
            }
            for t in &s.threads {
                // SAFETY: the thread ids are of live vCPU threads (they unregister only by
                // the VM's teardown, which happens on this same event-loop thread).
                unsafe { libc::pthread_kill(*t, kick) };
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(std::time::Duration::from_millis(20));
            s = self
                .cv
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn resume(&self) {
        self.lock().paused = false;
        self.cv.notify_all();
    }

    /// After a reboot in place: the new vCPU threads register again.
    pub fn reopen(&self) {
        let mut s = self.lock();
        s.released = false;
        s.paused = false;
        s.threads.clear();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// For the VM's teardown: nobody parks any more.
    pub fn release_all(&self) {
        self.lock().released = true;
        self.cv.notify_all();
    }
}

/// The signal that last arrived, if any.
pub fn caught_signal() -> i32 {
    SIGNAL_NUM.load(Ordering::SeqCst)
}

/// The longest wait for a guest to power off (about 136 years): longer ones would overflow
/// the timer, and a `ctl shutdown` asking for more gets this.
pub const MAX_SHUTDOWN_TIMEOUT: u64 = u32::MAX as u64;

static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// When nixvm started (for the setup-time log line and `info`'s uptime); the first call,
/// early in `main`, sets it.
pub fn started() -> std::time::Instant {
    *STARTED.get_or_init(std::time::Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins_and_maps_to_status() {
        let s = ExitState::new().unwrap();
        assert!(!s.is_exiting());
        s.request(GuestExit::Reset);
        s.request_exit(Exit::PowerOff);
        assert!(s.is_exiting());
        assert_eq!(s.take(), Some(Exit::Reset));
        assert_eq!(s.evt.read().unwrap(), 1);
        assert_eq!(Exit::Reset.status(), 3);
        assert_eq!(Exit::PowerOff.status(), 0);
        assert_eq!(Exit::Signal(15).status(), 143);
        assert_eq!(Exit::Failed("x".into()).status(), 1);
        assert_eq!(Exit::Forced.status(), 4);
    }
}
