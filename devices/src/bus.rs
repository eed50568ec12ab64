//! The port-I/O bus: which device answers which port. Unknown ports read as all ones and
//! ignore writes, as on real hardware; the guest cannot make nixvm fail through them.
use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error)]
#[error("port range {base:#x}+{len} overlaps another device")]
pub struct Overlap {
    pub base: u16,
    pub len: u16,
}

impl PioBus {
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), Overlap> {
        let end = u32::from(base) + u32::from(len);
        if len == 0
            || end > 0x1_0000
            || self.ranges.iter().any(|r| {
                u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
            })
        {
            return Err(Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    /// A guest read; returns whether a device answered.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
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
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((r, off)) => {
                lock(&r.device).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if another thread panicked while holding it: device state is
/// plain data, and one vCPU's panic must not take the console away from the others.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u16, u8)>);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_port_and_ignores_unknown_ports() {
        let mut bus = PioBus::default();
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
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = PioBus::default();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x60, 1, dev.clone()).unwrap();
        bus.insert(0x64, 1, dev.clone()).unwrap();
        assert!(bus.insert(0x5f, 2, dev.clone()).is_err());
        assert!(bus.insert(0xfff0, 0x20, dev.clone()).is_err());
        assert!(bus.insert(0x10, 0, dev).is_err());
    }
}
