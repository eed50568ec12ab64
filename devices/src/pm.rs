//! The ACPI power management registers named in the FADT: the sleep control/status register
//! (S5 = power off), the reset register, and the power management timer.
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The ACPI power management timer (the FADT's PM_TMR_BLK), what a guest reads with
/// `clocksource=acpi_pm` (NixOS test nodes ask for it: a clock that slows down with the host's
/// load). A read-only 24-bit counter at 3.579545 MHz of the host's monotonic time since the
/// machine was made; writes are ignored.
pub struct PmTimer {
    start: Instant,
}

impl PmTimer {
    /// The counter's frequency (ACPI: 3.579545 MHz).
    pub const HZ: u64 = 3_579_545;
    /// The counter's width: 24 bits (the FADT does not set TMR_VAL_EXT).
    const MASK: u32 = 0x00ff_ffff;

    pub fn new() -> Self {
        PmTimer {
            start: Instant::now(),
        }
    }

    /// The counter after `elapsed`, wrapped to 24 bits.
    fn count(elapsed: Duration) -> u32 {
        let ticks = elapsed.as_nanos() * u128::from(Self::HZ) / 1_000_000_000;
        u32::try_from(ticks % (u128::from(Self::MASK) + 1)).unwrap_or(0) // < 2^24: fits
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let count = Self::count(self.start.elapsed()).to_le_bytes();
        let at = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = at
                .checked_add(i)
                .and_then(|o| count.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordExit;

    #[test]
    fn pm_timer_counts_at_3_58_mhz_in_24_bits() {
        assert_eq!(PmTimer::count(Duration::ZERO), 0);
        assert_eq!(PmTimer::count(Duration::from_secs(1)), 3_579_545);
        assert_eq!(PmTimer::count(Duration::from_micros(1)), 3);
        // 2^24 ticks are 4.687 s: then it starts again from 0.
        let wrap = Duration::from_nanos(16_777_216 * 1_000_000_000 / 3_579_545 + 1);
        assert!(PmTimer::count(wrap) < 4);
        assert_eq!(
            PmTimer::count(Duration::from_secs(1_000_000)),
            ((1_000_000u64 * 3_579_545) % (1 << 24)) as u32
        );
    }

    #[test]
    fn pm_timer_reads_its_count_and_ignores_writes() {
        let mut t = PmTimer {
            start: Instant::now() - Duration::from_secs(1),
        };
        t.write(0, &[0xff; 4]);
        let mut d = [0xaa; 4];
        t.read(0, &mut d);
        let first = u32::from_le_bytes(d);
        assert!((3_579_545..1 << 24).contains(&first), "{first}");
        assert_eq!(d[3], 0, "24 bits");
        // Partial and out-of-range reads: the counter's bytes where there are some, else 0.
        let mut d = [0xaa; 2];
        t.read(3, &mut d);
        assert_eq!(d, [0, 0]);
        let mut d = [0xaa; 1];
        t.read(u64::MAX, &mut d);
        assert_eq!(d, [0]);
    }

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
