//! The i8042 keyboard controller. Writing 0xFE (pulse reset line) to the command port resets
//! the machine (`reboot=k`) in every VM. With a keyboard ([`I8042::with_keyboard`], given when
//! a monitor can send keys), it is also the PS/2 controller and AT keyboard Linux's `i8042`
//! and `atkbd` drivers probe: the controller's command byte, self tests, the keyboard's
//! reset, ID, LED, rate and scan-code-set commands, and keys from [`I8042::send_keys`] as
//! scan codes (set 2, or set 1 while the controller translates, as Linux keeps it), one byte
//! per interrupt on IRQ 1. No mouse (the AUX port is absent).
use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::{ExitRequest, GuestExit};

/// The command port's offset from the data port (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

// Status register.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

// Command byte (CTR).
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_AUX_DIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// The command byte at power-on (and after a machine reset).
const CTR_POWER_ON: u8 = CTR_KBD_INT | CTR_SYS | CTR_AUX_DIS | CTR_XLATE;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;

/// Bytes waiting for the guest at most (the keyboard's own buffer); keys that do not fit are
/// dropped.
const OUT_CAP: usize = 64;

/// A key: its set-1 and set-2 scan codes, and whether it has the 0xE0 prefix.
struct Key {
    name: &'static str,
    set1: u8,
    set2: u8,
    extended: bool,
}

const fn k(name: &'static str, set1: u8, set2: u8) -> Key {
    Key {
        name,
        set1,
        set2,
        extended: false,
    }
}

const fn e(name: &'static str, set1: u8, set2: u8) -> Key {
    Key {
        name,
        set1,
        set2,
        extended: true,
    }
}

/// QEMU's key names (`sendkey`) with their scan codes.
const KEYS: &[Key] = &[
    k("esc", 0x01, 0x76),
    k("1", 0x02, 0x16),
    k("2", 0x03, 0x1e),
    k("3", 0x04, 0x26),
    k("4", 0x05, 0x25),
    k("5", 0x06, 0x2e),
    k("6", 0x07, 0x36),
    k("7", 0x08, 0x3d),
    k("8", 0x09, 0x3e),
    k("9", 0x0a, 0x46),
    k("0", 0x0b, 0x45),
    k("minus", 0x0c, 0x4e),
    k("equal", 0x0d, 0x55),
    k("backspace", 0x0e, 0x66),
    k("tab", 0x0f, 0x0d),
    k("q", 0x10, 0x15),
    k("w", 0x11, 0x1d),
    k("e", 0x12, 0x24),
    k("r", 0x13, 0x2d),
    k("t", 0x14, 0x2c),
    k("y", 0x15, 0x35),
    k("u", 0x16, 0x3c),
    k("i", 0x17, 0x43),
    k("o", 0x18, 0x44),
    k("p", 0x19, 0x4d),
    k("bracket_left", 0x1a, 0x54),
    k("bracket_right", 0x1b, 0x5b),
    k("ret", 0x1c, 0x5a),
    k("ctrl", 0x1d, 0x14),
    k("a", 0x1e, 0x1c),
    k("s", 0x1f, 0x1b),
    k("d", 0x20, 0x23),
    k("f", 0x21, 0x2b),
    k("g", 0x22, 0x34),
    k("h", 0x23, 0x33),
    k("j", 0x24, 0x3b),
    k("k", 0x25, 0x42),
    k("l", 0x26, 0x4b),
    k("semicolon", 0x27, 0x4c),
    k("apostrophe", 0x28, 0x52),
    k("grave_accent", 0x29, 0x0e),
    k("shift", 0x2a, 0x12),
    k("backslash", 0x2b, 0x5d),
    k("z", 0x2c, 0x1a),
    k("x", 0x2d, 0x22),
    k("c", 0x2e, 0x21),
    k("v", 0x2f, 0x2a),
    k("b", 0x30, 0x32),
    k("n", 0x31, 0x31),
    k("m", 0x32, 0x3a),
    k("comma", 0x33, 0x41),
    k("dot", 0x34, 0x49),
    k("slash", 0x35, 0x4a),
    k("shift_r", 0x36, 0x59),
    k("asterisk", 0x37, 0x7c),
    k("alt", 0x38, 0x11),
    k("spc", 0x39, 0x29),
    k("caps_lock", 0x3a, 0x58),
    k("f1", 0x3b, 0x05),
    k("f2", 0x3c, 0x06),
    k("f3", 0x3d, 0x04),
    k("f4", 0x3e, 0x0c),
    k("f5", 0x3f, 0x03),
    k("f6", 0x40, 0x0b),
    k("f7", 0x41, 0x83),
    k("f8", 0x42, 0x0a),
    k("f9", 0x43, 0x01),
    k("f10", 0x44, 0x09),
    k("less", 0x56, 0x61),
    k("f11", 0x57, 0x78),
    k("f12", 0x58, 0x07),
    e("kp_enter", 0x1c, 0x5a),
    e("ctrl_r", 0x1d, 0x14),
    e("kp_divide", 0x35, 0x4a),
    e("alt_r", 0x38, 0x11),
    e("home", 0x47, 0x6c),
    e("up", 0x48, 0x75),
    e("pgup", 0x49, 0x7d),
    e("left", 0x4b, 0x6b),
    e("right", 0x4d, 0x74),
    e("end", 0x4f, 0x69),
    e("down", 0x50, 0x72),
    e("pgdn", 0x51, 0x7a),
    e("insert", 0x52, 0x70),
    e("delete", 0x53, 0x71),
    e("meta_l", 0x5b, 0x1f),
    e("meta_r", 0x5c, 0x27),
    e("menu", 0x5d, 0x2f),
];

/// Names QEMU also accepts for some keys.
fn alias(name: &str) -> &str {
    match name {
        "control" => "ctrl",
        "del" => "delete",
        "return" | "enter" => "ret",
        "space" => "spc",
        "escape" => "esc",
        "alt_l" => "alt",
        "ctrl_l" | "control_l" => "ctrl",
        "shift_l" => "shift",
        "page_up" => "pgup",
        "page_down" => "pgdn",
        "period" => "dot",
        n => n,
    }
}

/// A key by QEMU's name, or by its set-1 scan code in hex (`0x0C`, as the NixOS test driver
/// types `-`).
fn find_key(name: &str) -> Option<&'static Key> {
    let hex = name
        .strip_prefix("0x")
        .and_then(|h| u8::from_str_radix(h, 16).ok());
    match hex {
        Some(code) => KEYS.iter().find(|k| k.set1 == code && !k.extended),
        None => {
            let name = alias(name);
            KEYS.iter().find(|k| k.name == name)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("unknown key: '{0}'")]
    Unknown(String),
    #[error("the guest has no keyboard")]
    NoKeyboard,
    #[error("the keyboard's buffer is full (the guest does not read it)")]
    Full,
}

/// A keyboard (the controller's device port) and what it waits for.
struct Keyboard {
    irq: EventFd,
    /// A keyboard command waiting for its parameter byte.
    pending: Option<u8>,
    /// Scanning on (0xF4), off (0xF5).
    enabled: bool,
}

pub struct I8042 {
    exit: Arc<dyn ExitRequest>,
    keyboard: Option<Keyboard>,
    ctr: u8,
    /// Whether the last write went to the command port.
    last_was_command: bool,
    /// A controller command waiting for its data byte.
    pending: Option<u8>,
    out: VecDeque<u8>,
}

impl I8042 {
    /// The controller without a keyboard: only its reset line.
    pub fn new(exit: Arc<dyn ExitRequest>) -> Self {
        I8042 {
            exit,
            keyboard: None,
            ctr: CTR_POWER_ON,
            last_was_command: false,
            pending: None,
            out: VecDeque::new(),
        }
    }

    /// The controller with a keyboard whose interrupt (IRQ 1) is `irq`.
    pub fn with_keyboard(exit: Arc<dyn ExitRequest>, irq: EventFd) -> Self {
        let mut dev = I8042::new(exit);
        dev.keyboard = Some(Keyboard {
            irq,
            pending: None,
            enabled: true,
        });
        dev
    }

    /// Presses the keys named (QEMU's names, as `sendkey ctrl-alt-delete` joins them) in
    /// order and releases them in reverse. Nothing is sent if a name is unknown or the
    /// buffer has no room for all of it.
    pub fn send_keys(&mut self, names: &[&str]) -> Result<(), KeyError> {
        if self.keyboard.is_none() {
            return Err(KeyError::NoKeyboard);
        }
        let keys = names
            .iter()
            .map(|n| find_key(n).ok_or_else(|| KeyError::Unknown((*n).to_owned())))
            .collect::<Result<Vec<_>, _>>()?;
        let xlate = self.ctr & CTR_XLATE != 0;
        let mut bytes = Vec::new();
        let mut code = |key: &Key, release: bool| {
            if key.extended {
                bytes.push(0xe0);
            }
            match (xlate, release) {
                (true, false) => bytes.push(key.set1),
                (true, true) => bytes.push(key.set1 | 0x80),
                (false, false) => bytes.push(key.set2),
                (false, true) => bytes.extend([0xf0, key.set2]),
            }
        };
        for key in &keys {
            code(key, false);
        }
        for key in keys.iter().rev() {
            code(key, true);
        }
        if self.out.len() + bytes.len() > OUT_CAP {
            return Err(KeyError::Full);
        }
        for b in bytes {
            self.push(b);
        }
        Ok(())
    }

    /// Queues a byte for the guest; raises the interrupt when it becomes the next one.
    fn push(&mut self, b: u8) {
        if self.out.len() >= OUT_CAP {
            return;
        }
        self.out.push_back(b);
        if self.out.len() == 1 {
            self.interrupt();
        }
    }

    fn interrupt(&self) {
        if self.ctr & CTR_KBD_INT != 0
            && let Some(kbd) = &self.keyboard
        {
            let _ = kbd.irq.write(1);
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYS | STATUS_UNLOCKED;
        if !self.out.is_empty() {
            s |= STATUS_OBF;
        }
        if self.last_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_PULSE_RESET => {
                log::info!("i8042: the guest pulsed the reset line");
                self.exit.request(GuestExit::Reset);
            }
            _ if self.keyboard.is_none() => {}
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DIS,
            // No AUX port: its clock line reads as stuck low.
            CMD_AUX_TEST => self.push(0x01),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE | CMD_KBD_ENABLE => {}
            CMD_READ_INPUT => self.push(0x00),
            CMD_READ_OUTPUT => self.push(0x01),
            _ => {}
        }
    }

    fn data(&mut self, b: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => {
                let was_on = self.ctr & CTR_KBD_INT != 0;
                self.ctr = b;
                if !was_on && !self.out.is_empty() {
                    self.interrupt();
                }
            }
            Some(CMD_WRITE_KBD_OUT) => self.push(b),
            // Output port (A20, reset: bit 0 low would reset; Linux never clears it),
            // and the absent AUX port.
            Some(_) => {}
            None => self.keyboard_write(b),
        }
    }

    fn keyboard_write(&mut self, b: u8) {
        let xlate = self.ctr & CTR_XLATE != 0;
        let Some(kbd) = self.keyboard.as_mut() else {
            return;
        };
        let replies: &[u8] = match kbd.pending.take() {
            // The scan code set: 0 asks which (2; 0x41 as the controller translates it).
            Some(KBD_SCANCODE_SET) if b == 0 => &[KBD_ACK, if xlate { 0x41 } else { 0x02 }],
            Some(_) => &[KBD_ACK],
            None => match b {
                KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => {
                    kbd.pending = Some(b);
                    &[KBD_ACK]
                }
                KBD_ECHO => &[KBD_ECHO],
                KBD_GET_ID if xlate => &[KBD_ACK, 0xab, 0x41],
                KBD_GET_ID => &[KBD_ACK, 0xab, 0x83],
                0xf4 => {
                    kbd.enabled = true;
                    &[KBD_ACK]
                }
                0xf5 => {
                    kbd.enabled = false;
                    &[KBD_ACK]
                }
                KBD_RESET => {
                    kbd.enabled = true;
                    &[KBD_ACK, KBD_BAT_OK]
                }
                0xf6..=0xfe => &[KBD_ACK],
                _ => &[KBD_RESEND],
            },
        };
        for &r in replies {
            self.push(r);
        }
    }
}

/// Registered at the data port (0x60) with a length of 5, covering the command port at offset 4.
impl BusDevice for I8042 {
    /// The power-on state: scanning on, nothing buffered or half-done.
    fn reset(&mut self) {
        self.ctr = CTR_POWER_ON;
        self.last_was_command = false;
        self.pending = None;
        self.out.clear();
        if let Some(k) = &mut self.keyboard {
            k.pending = None;
            k.enabled = true;
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.keyboard.is_none() {
            // Status 0: output buffer empty, input buffer empty. Data: nothing.
            data.fill(0);
            return;
        }
        let b = match offset {
            COMMAND_OFFSET => self.status(),
            0 => {
                let b = self.out.pop_front().unwrap_or(0);
                if !self.out.is_empty() {
                    // One byte per interrupt, as the real controller delivers them.
                    self.interrupt();
                }
                b
            }
            _ => 0,
        };
        data.fill(b);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else {
            return;
        };
        match offset {
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.pending = None;
                self.command(b);
            }
            0 => {
                self.last_was_command = false;
                self.data(b);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordExit;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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
        assert_eq!(dev.send_keys(&["a"]), Err(KeyError::NoKeyboard));
    }

    fn keyboard() -> (I8042, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::with_keyboard(Arc::new(RecordExit::default()), irq.try_clone().unwrap());
        (dev, irq)
    }

    /// Everything the guest can read now, as Linux's interrupt handler reads it: a byte
    /// per status check.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut got = Vec::new();
        for _ in 0..100 {
            let mut s = [0u8];
            dev.read(4, &mut s);
            if s[0] & STATUS_OBF == 0 {
                break;
            }
            let mut b = [0u8];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        got
    }

    /// The probe Linux's i8042 and atkbd drivers make, answered as a PC's controller does.
    #[test]
    fn answers_the_linux_probe() {
        let (mut dev, irq) = keyboard();
        assert!(drain(&mut dev).is_empty());
        dev.write(4, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut dev), [0x55]);
        dev.write(4, &[CMD_READ_CTR]);
        let ctr = drain(&mut dev)[0];
        assert_ne!(ctr & CTR_XLATE, 0, "translating, as firmware leaves it");
        // Interrupts off while the driver sets up; a reply waits without one.
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[ctr & !CTR_KBD_INT]);
        let _ = irq.read();
        dev.write(4, &[CMD_KBD_TEST]);
        assert!(irq.read().is_err(), "interrupt with KBD_INT off");
        assert_eq!(drain(&mut dev), [0x00]);
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[ctr]);
        // atkbd: reset, ID, LEDs, rate, enable.
        dev.write(0, &[KBD_RESET]);
        assert!(irq.read().is_ok(), "no interrupt for the reply");
        assert_eq!(drain(&mut dev), [KBD_ACK, KBD_BAT_OK]);
        dev.write(0, &[KBD_GET_ID]);
        assert_eq!(drain(&mut dev), [KBD_ACK, 0xab, 0x41]);
        dev.write(0, &[KBD_SET_LEDS]);
        dev.write(0, &[0x00]);
        dev.write(0, &[KBD_SET_RATE]);
        dev.write(0, &[0x20]);
        dev.write(0, &[0xf4]);
        assert_eq!(drain(&mut dev), [KBD_ACK; 5]);
        dev.write(0, &[0x42]);
        assert_eq!(drain(&mut dev), [KBD_RESEND]);
    }

    #[test]
    fn ctrl_alt_delete_as_scan_codes() {
        let (mut dev, _irq) = keyboard();
        dev.send_keys(&["ctrl", "alt", "delete"]).unwrap();
        assert_eq!(
            drain(&mut dev),
            [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d],
            "set 1 while translating"
        );
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[CTR_KBD_INT | CTR_SYS]);
        dev.send_keys(&["shift", "a"]).unwrap();
        assert_eq!(drain(&mut dev), [0x12, 0x1c, 0xf0, 0x1c, 0xf0, 0x12]);
        // The test driver's `_`: shift and the minus key by its set-1 code.
        dev.send_keys(&["shift", "0x0C"]).unwrap();
        assert_eq!(drain(&mut dev), [0x12, 0x4e, 0xf0, 0x4e, 0xf0, 0x12]);
        assert!(dev.send_keys(&["0x7f"]).is_err());
        assert_eq!(
            dev.send_keys(&["ctrl", "hyper"]),
            Err(KeyError::Unknown("hyper".into()))
        );
        assert!(drain(&mut dev).is_empty(), "half a chord was sent");
    }

    #[test]
    fn a_machine_reset_restores_the_power_on_state() {
        let (mut dev, _irq) = keyboard();
        // Before the reset: translation off, scanning off, a command half-written and a
        // reply nobody read.
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[CTR_KBD_INT | CTR_SYS]);
        dev.write(0, &[0xf5]);
        dev.write(0, &[KBD_GET_ID]);
        dev.write(0, &[KBD_SET_LEDS]);
        dev.reset();
        assert!(drain(&mut dev).is_empty(), "nothing left buffered");
        dev.send_keys(&["a"]).unwrap();
        assert_eq!(drain(&mut dev), [0x1e, 0x9e], "scanning on, set 1 again");
        dev.write(0, &[0x00]); // not the parameter of the LED command from before
        assert_eq!(drain(&mut dev), [KBD_RESEND]);
    }

    #[test]
    fn a_guest_that_never_reads_fills_nothing_beyond_the_buffer() {
        let (mut dev, _irq) = keyboard();
        let mut sent = 0;
        while dev.send_keys(&["a"]).is_ok() {
            sent += 1;
            assert!(sent <= OUT_CAP);
        }
        assert_eq!(dev.send_keys(&["a"]), Err(KeyError::Full));
        // The guest writing commands without reading: replies are bounded too.
        for _ in 0..1000 {
            dev.write(0, &[KBD_GET_ID]);
        }
        assert!(drain(&mut dev).len() <= OUT_CAP);
    }
}
