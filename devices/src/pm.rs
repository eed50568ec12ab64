//! The ACPI hardware-reduced power management registers named in the FADT: the sleep
//! control/status register (S5 = power off) and the reset register.
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequest, GuestExit};

/// Registered at the FADT's sleep control port with a length of 2: offset 0 is the sleep
/// control/status register, offset 1 the reset register.
pub struct AcpiPm {
    exit: Arc<dyn ExitRequest>,
    is_s5: fn(u8) -> bool,
    reset_value: u8,
}

impl AcpiPm {
    /// `is_s5` decodes a sleep control value (nixvm-boot's `acpi::sleep_control_is_s5`).
    pub fn new(exit: Arc<dyn ExitRequest>, is_s5: fn(u8) -> bool, reset_value: u8) -> Self {
        AcpiPm {
            exit,
            is_s5,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if (self.is_s5)(value) => {
                log::info!("acpi: the guest entered S5 (soft off)");
                self.exit.request(GuestExit::PowerOff)
            }
            1 if value == self.reset_value => {
                log::info!("acpi: the guest wrote the reset register");
                self.exit.request(GuestExit::Reset)
            }
            _ => log::debug!("acpi pm: ignored write {value:#x} at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordExit;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let rec = Arc::new(RecordExit::default());
        let mut pm = AcpiPm::new(rec.clone(), |v| v == 0x34, 1);
        pm.write(0, &[0x14]);
        pm.write(1, &[2]);
        pm.write(7, &[1]);
        pm.write(0, &[]);
        assert!(rec.0.lock().unwrap().is_empty());
        pm.write(0, &[0x34]);
        pm.write(1, &[1]);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![GuestExit::PowerOff, GuestExit::Reset]
        );
    }
}
