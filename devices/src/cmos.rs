//! A CMOS real-time clock (MC146818) at ports 0x70/0x71, showing the host's UTC time.
//!
//! Stock kernels build rtc_cmos in and wait seconds probing a missing one. The time registers
//! are read-only here (the guest's writes to them are ignored); the other bytes are RAM.
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;
const B_BINARY: u8 = 1 << 2;
const B_24H: u8 = 1 << 1;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> u64,
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's civil_from_days).
#[expect(
    clippy::cast_possible_truncation,
    reason = "day is 1..=31 and month 1..=12"
)]
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl Cmos {
    pub fn with_clock(now: fn() -> u64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate; UIP never set
        ram[REG_B] = B_24H;
        ram[REG_D] = 0x80; // valid RAM and time
        Cmos { index: 0, ram, now }
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.ram[REG_B] & B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    #[expect(
        clippy::cast_possible_truncation,
        reason = "weekday is 1..=7, century below 100 for u32 years"
    )]
    fn register(&self, index: usize) -> u8 {
        let secs = (self.now)();
        let days = i64::try_from(secs / 86_400).unwrap_or(0);
        let tod = (secs % 86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        match index {
            0x00 => self.encode(tod % 60),
            0x02 => self.encode(tod / 60 % 60),
            0x04 => self.encode(tod / 3600),
            0x06 => self.encode(((days + 4).rem_euclid(7) + 1) as u32), // 1 = Sunday
            0x07 => self.encode(day),
            0x08 => self.encode(month),
            0x09 => self.encode((year % 100) as u32),
            REG_CENTURY => self.encode((year / 100) as u32),
            REG_C => 0, // no interrupt flags
            i => self.ram[i],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == 1 {
            self.register(usize::from(self.index))
        } else {
            0xff
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match (offset, usize::from(self.index)) {
            // Bit 7 of the index port is the NMI mask.
            (0, _) => self.index = value & 0x7f,
            (1, 0x00..=0x09 | REG_C | REG_D | REG_CENTURY) => {
                log::debug!(
                    "cmos: ignored write {value:#x} to register {:#x}",
                    self.index
                )
            }
            // Only the data mode and 24-hour bits of register B mean something here.
            (1, REG_B) => self.ram[REG_B] = (value & B_BINARY) | B_24H,
            (1, i) => self.ram[i] = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn shows_time_in_bcd_and_binary() {
        // 2026-11-21 13:45:07 UTC, a Saturday.
        let mut c = Cmos::with_clock(|| 1_795_268_707);
        let got: Vec<u8> = [0u8, 2, 4, 6, 7, 8, 9, 0x32]
            .iter()
            .map(|&r| read(&mut c, r))
            .collect();
        assert_eq!(got, vec![0x07, 0x45, 0x13, 0x07, 0x21, 0x11, 0x26, 0x20]);
        c.write(0, &[REG_B as u8]);
        c.write(1, &[B_BINARY]);
        assert_eq!(read(&mut c, 4), 13);
        assert_eq!(read(&mut c, 9), 26);
        assert_eq!(read(&mut c, REG_B as u8), B_BINARY | B_24H);
    }

    #[test]
    fn status_registers_let_the_kernel_read() {
        let mut c = Cmos::default();
        assert_eq!(
            read(&mut c, REG_A as u8) & 0x80,
            0,
            "update in progress never set"
        );
        assert_eq!(read(&mut c, REG_D as u8), 0x80);
        // Time writes are ignored, other RAM keeps its value, out of range is harmless.
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(0, &[0x0d]);
        c.write(1, &[0]);
        assert_eq!(read(&mut c, 0x0d), 0x80);
        let mut b = [0u8; 2];
        c.read(0, &mut b);
        c.write(5, &[1]);
        c.write(1, &[]);
    }

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_778), (2026, 11, 21));
    }
}
