//! How a VM ends, and what nixvm's exit status says about it.
//!
//! | exit status | meaning |
//! |---|---|
//! | 0 | the guest powered off |
//! | 1 | nixvm failed while the VM ran (the message says why) |
//! | 2 | usage error: nothing was started |
//! | 3 | the guest rebooted (i8042 or ACPI reset, triple fault, `panic=-1`): restart nixvm |
//! | 128+N | nixvm got signal N (SIGTERM, SIGINT, SIGHUP) and stopped the VM |
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nixvm_devices::{ExitRequest, GuestExit};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub const EXIT_POWEROFF: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_REBOOT: u8 = 3;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    PowerOff,
    Reset,
    Signal(i32),
    Failed(String),
}

impl Exit {
    pub fn status(&self) -> u8 {
        match self {
            Exit::PowerOff => EXIT_POWEROFF,
            Exit::Reset => EXIT_REBOOT,
            Exit::Signal(n) => 128u8.saturating_add(u8::try_from(*n).unwrap_or(0)),
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

/// The signal that last arrived, if any.
pub fn caught_signal() -> i32 {
    SIGNAL_NUM.load(Ordering::SeqCst)
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
    }
}
