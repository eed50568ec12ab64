//! nixvm's devices: the legacy PC devices (serial, i8042, CMOS RTC, ACPI power management),
//! the PCI bus with MSI-X, and the virtio devices behind the virtio-mmio and virtio-pci
//! transports. No KVM here: the vmm crate wires devices to vCPU exits, irqfds, ioeventfds and
//! MSI routes.
// Tests build fixtures with plain casts; the library code is checked without this.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

pub mod bus;
pub mod cmos;
pub mod console;
pub mod i8042;
pub mod pci;
pub mod pm;
pub mod ratelimit;
pub mod seccomp;
pub mod serial;
pub mod virtio;

/// Locks a mutex, carrying on if another thread panicked while holding it: what nixvm keeps
/// behind locks (device registers, queue state, caches) is updated in single steps, and one
/// thread's panic must not take the console or a disk away from the others.
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a device can ask of the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register).
    Reset,
}

/// Receives a device's request to end the VM. The vmm implements it; the first request wins.
pub trait ExitRequest: Send + Sync {
    fn request(&self, what: GuestExit);
}

#[cfg(test)]
pub(crate) mod test_utils {
    use super::*;
    use std::sync::Mutex;

    /// Records the exit requests it gets.
    #[derive(Default)]
    pub struct RecordExit(pub Mutex<Vec<GuestExit>>);
    impl ExitRequest for RecordExit {
        fn request(&self, what: GuestExit) {
            self.0.lock().unwrap().push(what);
        }
    }

    /// An empty directory of this test process's own, named `what`.
    pub fn scratch_dir(what: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("nixvm-{}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
