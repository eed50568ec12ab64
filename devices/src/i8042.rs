//! The i8042 keyboard controller, as far as a VM needs it: writing 0xFE (pulse reset line)
//! to the command port resets the machine (`reboot=k`). There is no keyboard behind it.
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{ExitRequest, GuestExit};

/// The command port's offset from the data port (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;
const CMD_PULSE_RESET: u8 = 0xfe;

pub struct I8042 {
    exit: Arc<dyn ExitRequest>,
}

impl I8042 {
    pub fn new(exit: Arc<dyn ExitRequest>) -> Self {
        I8042 { exit }
    }
}

/// Registered at the data port (0x60) with a length of 5, covering the command port at offset 4.
impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty. Data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_PULSE_RESET) {
            log::info!("i8042: the guest pulsed the reset line");
            self.exit.request(GuestExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordExit;

    #[test]
    fn reset_command_resets() {
        let rec = Arc::new(RecordExit::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(4, &[0xaa]); // self test: ignored
        assert!(rec.0.lock().unwrap().is_empty());
        let mut b = [0xffu8];
        dev.read(4, &mut b);
        assert_eq!(b[0], 0);
        dev.write(4, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestExit::Reset]);
    }
}
