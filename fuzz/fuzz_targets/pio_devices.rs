//! A guest driving the legacy port-I/O devices as it likes: the i8042 with its PS/2 keyboard
//! (controller commands and their data bytes, keyboard commands and their parameters, reads
//! of status and data in any order), with keys from a monitor's `sendkey` arriving in
//! between, the CMOS RTC, the ACPI PM registers and the PM timer. nixvm must not panic, and
//! what the keyboard keeps for the guest stays bounded whatever the guest does not read.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nixvm_devices::bus::BusDevice;
use nixvm_devices::cmos::Cmos;
use nixvm_devices::i8042::I8042;
use nixvm_devices::pm::{AcpiPm, PmTimer};
use nixvm_devices::{ExitRequest, GuestExit};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

struct NoExit;
impl ExitRequest for NoExit {
    fn request(&self, _what: GuestExit) {}
}

/// Key names a monitor may send, known and not.
const KEYS: &[&str] = &[
    "ctrl", "alt", "delete", "shift", "a", "ret", "0x0C", "0x7f", "kp_enter", "meta_l", "nope",
];

fuzz_target!(|data: &[u8]| {
    let exit: Arc<dyn ExitRequest> = Arc::new(NoExit);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut kbd = I8042::with_keyboard(exit.clone(), irq);
    let mut cmos = Cmos::default();
    let mut pm = AcpiPm::new(exit, |v| v == 5, 0x0f);
    let mut timer = PmTimer::new();
    for op in data.chunks(3) {
        let [what, offset, value] = [op[0], *op.get(1).unwrap_or(&0), *op.get(2).unwrap_or(&0)];
        let dev: &mut dyn BusDevice = match what % 4 {
            0 => &mut kbd,
            1 => &mut cmos,
            2 => &mut pm,
            _ => &mut timer,
        };
        let offset = u64::from(offset % 8);
        match what / 4 % 4 {
            0 | 1 => dev.write(offset, &[value]),
            2 => {
                // Port reads are 1, 2 or 4 bytes wide.
                let mut b = [0u8; 4];
                dev.read(offset, &mut b[..[1, 2, 4][usize::from(value % 3)]]);
            }
            _ => {
                let n = usize::from(value % 4);
                let names: Vec<&str> = (0..n)
                    .map(|i| KEYS[(usize::from(value) + i * 7) % KEYS.len()])
                    .collect();
                let _ = kbd.send_keys(&names);
            }
        }
    }
    // Whatever was left unread is bounded: a few dozen reads empty it.
    let mut status = [0u8; 1];
    for _ in 0..200 {
        kbd.read(4, &mut status);
        if status[0] & 1 == 0 {
            return;
        }
        kbd.read(0, &mut [0u8; 1]);
    }
    panic!("the keyboard's buffer did not empty in 200 reads");
});
