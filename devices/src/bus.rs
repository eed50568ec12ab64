//! A bus: which device answers which address, for port I/O and for MMIO alike. Unknown
//! addresses read as all ones and ignore writes, as on real hardware; the guest cannot make
//! nixvm fail through them.
use std::sync::{Arc, Mutex};

use crate::lock;

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Puts the device back in its power-on state (a machine reset: reboot in place). What
    /// a real machine keeps across a reset (CMOS RAM) stays.
    fn reset(&mut self) {}
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error)]
#[error("address range {base:#x}+{len:#x} overlaps another device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0
            || self
                .ranges
                .iter()
                .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (r, addr - r.base))
    }

    /// Resets every device on the bus ([`BusDevice::reset`]).
    pub fn reset(&self) {
        for r in &self.ranges {
            lock(&r.device).reset();
        }
    }

    /// A guest read; returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((r, off)) => {
                lock(&r.device).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest write; returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((r, off)) => {
                lock(&r.device).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_address_and_ignores_unknown_ones() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, 9)]);
        let mut w = [0u8; 4];
        assert!(!bus.read(0x400, &mut w));
        assert_eq!(w, [0xff; 4]);
        assert!(!bus.write(0xffff, &[1, 2, 3, 4]));
        bus.insert(0xd000_0000, 0x1000, dev.clone()).unwrap();
        assert!(bus.read(0xd000_0fff, &mut w));
        assert!(!bus.read(0xd000_1000, &mut w));
        assert!(!bus.read(u64::MAX, &mut w));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x60, 1, dev.clone()).unwrap();
        bus.insert(0x64, 1, dev.clone()).unwrap();
        assert!(bus.insert(0x5f, 2, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX - 0x10, 0x20, dev.clone()).is_err());
        assert!(bus.insert(0x10, 0, dev).is_err());
    }
}
