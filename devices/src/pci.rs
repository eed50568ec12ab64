//! PCI bus 0 as a guest without firmware finds it: configuration mechanism #1 (an address
//! register at port 0xCF8, the data at 0xCFC..0xCFF), a host bridge at 00:00.0, each
//! function's configuration space with its BARs and capabilities, and MSI-X.
//!
//! BARs stay where nixvm placed them (the ACPI host bridge window holds exactly them, so the
//! guest has no reason to move them): a BAR answers the sizing protocol (all ones written,
//! its size mask read back), and any other write that would move it is refused, the BAR
//! reading back where it is (Linux then says "error updating" instead of using a device that
//! is not where it thinks).
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::lock;

/// Configuration space a function has (the conventional 256 bytes; no extended space).
pub const CONFIG_SIZE: usize = 256;
/// Functions on bus 0: device numbers 0..32, function 0 each.
pub const MAX_DEVICES: usize = 32;

const VENDOR_ID: usize = 0x00;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const FIRST_CAPABILITY: usize = 0x40;

/// Command register bits a driver may set: I/O space, memory space, bus master, INTx
/// disable.
const COMMAND_WRITABLE: u16 = 0x0407;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// The MSI-X capability's ID and its Message Control bits.
const CAP_ID_MSIX: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// One MSI-X table entry: address low, address high, data, vector control (bit 0: masked).
pub const MSIX_ENTRY_SIZE: u64 = 16;

/// What identifies a function.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class, subclass, programming interface.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A function's configuration space: its bytes and which bits of them the driver may write.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    /// Where the next capability goes, and the byte holding the pointer to it.
    next_capability: usize,
    last_pointer: usize,
    /// Where each implemented BAR is (its offset, its address).
    bars: Vec<(usize, u32)>,
}

impl ConfigSpace {
    /// A type 0 header (header type 0: the zero byte at 0x0e) with no BARs and no
    /// capabilities yet.
    pub fn new(id: Identity) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            next_capability: FIRST_CAPABILITY,
            last_pointer: CAPABILITIES_POINTER,
            bars: Vec::new(),
        };
        c.put(VENDOR_ID, &id.vendor.to_le_bytes());
        c.put(VENDOR_ID + 2, &id.device.to_le_bytes());
        c.put(
            REVISION,
            &(id.class << 8 | u32::from(id.revision)).to_le_bytes(),
        );
        c.put(SUBSYSTEM_VENDOR_ID, &id.subsystem_vendor.to_le_bytes());
        c.put(SUBSYSTEM_VENDOR_ID + 2, &id.subsystem.to_le_bytes());
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Sets bytes whatever the driver may write (the function's own registers).
    pub(crate) fn put(&mut self, offset: usize, v: &[u8]) {
        self.bytes[offset..offset + v.len()].copy_from_slice(v);
    }

    /// BAR `index` as a 32-bit, non-prefetchable memory BAR of `size` bytes (a power of
    /// two) at `addr` (aligned to it).
    pub fn set_bar(&mut self, index: usize, addr: u32, size: u32) {
        debug_assert!(size.is_power_of_two() && addr % size == 0);
        let at = BAR0 + 4 * index;
        self.put(at, &addr.to_le_bytes());
        self.writable[at..at + 4].copy_from_slice(&(!(size - 1)).to_le_bytes());
        self.bars.retain(|&(o, _)| o != at);
        self.bars.push((at, addr));
    }

    /// Appends a capability (`body` without its ID and next-pointer bytes), of which the
    /// bits in `writable` (same length as `body`) are the driver's. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_capability;
        let end = at + 2 + body.len();
        assert!(
            end <= CONFIG_SIZE,
            "capabilities fit in the configuration space"
        );
        self.bytes[at] = id;
        self.put(at + 2, body);
        self.writable[at + 2..end].copy_from_slice(writable);
        self.bytes[self.last_pointer] = u8::try_from(at).expect("below 256");
        self.last_pointer = at + 1;
        self.next_capability = end.next_multiple_of(4);
        let status = u16::from_le_bytes([self.bytes[STATUS], self.bytes[STATUS + 1]]);
        self.put(STATUS, &(status | STATUS_CAPABILITIES).to_le_bytes());
        at
    }

    /// Reads `data.len()` bytes at `offset`; what lies outside the space reads as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset.saturating_add(data.len())) {
            Some(b) => data.copy_from_slice(b),
            None => data.fill(0xff),
        }
    }

    /// Writes the driver's bits of `data` at `offset`; the rest stays.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= CONFIG_SIZE) else {
            return;
        };
        for (i, v) in (offset..end).zip(data) {
            let w = self.writable[i];
            self.bytes[i] = (self.bytes[i] & !w) | (v & w);
        }
        // A BAR written: the sizing pattern stays (read back as the size mask), anything
        // else puts it back where it is.
        for &(at, addr) in &self.bars {
            if offset < at + 4 && at < end && dword(&self.bytes, at) != dword(&self.writable, at) {
                self.bytes[at..at + 4].copy_from_slice(&addr.to_le_bytes());
            }
        }
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// Back to what the function had at power-on: `pristine`'s bytes.
    pub fn restore(&mut self, pristine: &ConfigSpace) {
        self.bytes = pristine.bytes;
    }
}

/// The little-endian dword of `bytes` at `at` (at most `CONFIG_SIZE - 4`).
fn dword(bytes: &[u8; CONFIG_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A function on the bus, as configuration cycles reach it.
pub trait PciFunction: Send {
    /// Reads 1, 2 or 4 bytes at `offset` (aligned to their size, within the 256 bytes).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

/// The host bridge at 00:00.0: Linux's configuration mechanism #1 check looks for one.
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge(ConfigSpace::new(Identity {
            vendor: 0x8086, // Intel: what Linux's sanity check accepts (as Cloud Hypervisor's)
            device: 0x0d57,
            revision: 0,
            class: 0x06_00_00, // bridge, host
            subsystem_vendor: 0,
            subsystem: 0,
        }))
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&mut self, _: usize, _: &[u8]) {}
}

/// Bus 0 behind ports 0xCF8..0xCFF: the address register, then the data window.
pub struct PciRoot {
    address: u32,
    devices: Vec<Option<Arc<Mutex<dyn PciFunction>>>>,
}

const ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of the address register that are kept: enable, bus, device, function, register.
const ADDRESS_BITS: u32 = 0x80ff_fffc;

impl Default for PciRoot {
    fn default() -> Self {
        let mut devices: Vec<Option<Arc<Mutex<dyn PciFunction>>>> = vec![None; MAX_DEVICES];
        devices[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        PciRoot {
            address: 0,
            devices,
        }
    }
}

impl PciRoot {
    /// Puts `function` at device number `slot` (1..32; 0 is the host bridge).
    pub fn attach(&mut self, slot: usize, function: Arc<Mutex<dyn PciFunction>>) {
        assert!((1..MAX_DEVICES).contains(&slot) && self.devices[slot].is_none());
        self.devices[slot] = Some(function);
    }

    /// The function and the configuration offset the address register and `port_offset`
    /// (0..4 in the data window) select, if there is one.
    fn selected(&self, port_offset: u64) -> Option<(&Arc<Mutex<dyn PciFunction>>, usize)> {
        let a = self.address;
        let (bus, device, function) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        if a & ADDRESS_ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        let dev = self.devices[device as usize].as_ref()?;
        let register = (a & 0xfc) as usize;
        Some((dev, register + usize::try_from(port_offset).ok()?))
    }
}

/// An access of 1, 2 or 4 bytes that stays within its naturally aligned dword.
fn aligned(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset % len as u64 == 0
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..8 if aligned(offset - 4, data.len()) => {
                if let Some((dev, at)) = self.selected(offset - 4) {
                    lock(dev).config_read(at, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                self.address = v & ADDRESS_BITS;
            }
            4..8 if aligned(offset - 4, data.len()) => {
                if let Some((dev, at)) = self.selected(offset - 4) {
                    lock(dev).config_write(at, data);
                }
            }
            _ => {} // e.g. Linux's byte write to 0xCFB when it probes for mechanism #1
        }
    }

    /// The address register only: each function is reset through the bus that holds its
    /// BAR (a machine reset resets both buses).
    fn reset(&mut self) {
        self.address = 0;
    }
}

/// An MSI message: where a vector writes, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where the vectors of a function go: the vmm binds each vector's eventfd to a KVM MSI
/// route while the vector may fire, and unbinds it while it is masked (what the eventfd
/// collects meanwhile is delivered when it is bound again: the pending bit).
pub trait MsiRoutes: Send {
    fn route(&mut self, vector: usize, message: Option<MsiMessage>);
}

/// A function's MSI-X capability and table.
pub struct Msix {
    /// Each entry's four dwords.
    table: Vec<[u32; 4]>,
    /// The capability's offset in configuration space.
    cap: usize,
    control: u16,
    routes: Box<dyn MsiRoutes>,
    /// What each vector is routed to now.
    live: Vec<Option<MsiMessage>>,
}

impl Msix {
    /// Adds the capability to `config`: `vectors` entries, the table at `table_offset` in
    /// BAR `bar`, the pending bits at `pba_offset` in it.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: u16,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
        routes: Box<dyn MsiRoutes>,
    ) -> Self {
        assert!((1..=2048).contains(&vectors));
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[..2].copy_from_slice(&(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes());
        let cap = config.add_capability(CAP_ID_MSIX, &body, &writable);
        let n = usize::from(vectors);
        Msix {
            table: vec![[0, 0, 0, 1]; n],
            cap,
            control: 0,
            routes,
            live: vec![None; n],
        }
    }

    /// Whether a configuration write at `offset` of `len` bytes touched Message Control.
    pub fn control_touched(&self, offset: usize, len: usize) -> bool {
        offset < self.cap + 4 && self.cap + 2 < offset + len
    }

    /// The driver wrote Message Control (its value now in `config`).
    pub fn control_written(&mut self, config: &ConfigSpace) {
        self.control = config.u16_at(self.cap + 2);
        self.update();
    }

    /// A read of the table (offset from its start); 4 or 8 bytes, aligned.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            if let Some(v) = self.dword(offset + 4 * i as u64, chunk.len()) {
                chunk.copy_from_slice(&self.table[v.0][v.1].to_le_bytes());
            }
        }
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(4).enumerate() {
            if let Some((entry, word)) = self.dword(offset + 4 * i as u64, chunk.len()) {
                let v = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
                self.table[entry][word] = if word == 3 { v & 1 } else { v };
            }
        }
        self.update();
    }

    /// The entry and dword an access of `len` bytes at `offset` is, when it is one.
    fn dword(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if len != 4 || offset % 4 != 0 {
            crate::guest_warn!("pci: MSI-X table access of {len} bytes at {offset:#x} ignored");
            return None;
        }
        let entry = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
        let word = usize::try_from(offset % MSIX_ENTRY_SIZE / 4).expect("below 4");
        (entry < self.table.len()).then_some((entry, word))
    }

    /// Routes every vector that may fire to its message, and none of the others.
    fn update(&mut self) {
        let on = self.control & (MSIX_ENABLE | MSIX_FUNCTION_MASK) == MSIX_ENABLE;
        for (v, e) in self.table.iter().enumerate() {
            let want = (on && e[3] & 1 == 0).then_some(MsiMessage {
                address: u64::from(e[1]) << 32 | u64::from(e[0]),
                data: e[2],
            });
            if self.live[v] != want {
                self.live[v] = want;
                self.routes.route(v, want);
            }
        }
    }

    /// Every vector masked, MSI-X off (a machine reset).
    pub fn reset(&mut self) {
        self.table.fill([0, 0, 0, 1]);
        self.control = 0;
        self.update();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(root: &mut PciRoot, dev: u32, reg: u32, len: usize) -> u32 {
        let addr = ADDRESS_ENABLE | dev << 11 | (reg & 0xfc);
        root.write(0, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        root.read(4 + u64::from(reg & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn mechanism_one_finds_the_host_bridge_and_nothing_else() {
        let mut root = PciRoot::default();
        // Linux's probe: the address register reads back what was written.
        root.write(3, &[1]);
        root.write(0, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        root.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        assert_eq!(cfg_read(&mut root, 0, 0, 4), 0x0d57_8086);
        assert_eq!(cfg_read(&mut root, 0, 0x0a, 2), 0x0600, "host bridge class");
        assert_eq!(cfg_read(&mut root, 1, 0, 4), 0xffff_ffff, "empty slot");
        assert_eq!(
            cfg_read(&mut root, 0, 1, 2),
            0xffff,
            "misaligned reads as ones"
        );
    }

    #[test]
    fn a_bar_answers_sizing_and_capabilities_chain() {
        let mut c = ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        c.set_bar(0, 0xc000_8000, 0x8000);
        c.write(BAR0, &[0xff; 4]);
        let mut b = [0u8; 4];
        c.read(BAR0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_8000);
        c.write(BAR0, &0xc000_8000u32.to_le_bytes());
        c.read(BAR0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xc000_8000);
        // A move (whole or in part) is refused: the BAR stays where the device is.
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        c.read(BAR0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xc000_8000, "not moved");
        c.write(BAR0 + 2, &0xd000u16.to_le_bytes());
        c.read(BAR0, &mut b);
        assert_eq!(
            u32::from_le_bytes(b),
            0xc000_8000,
            "nor a move of its upper half"
        );
        c.write(BAR0 - 2, &[0; 4]);
        c.read(BAR0, &mut b);
        assert_eq!(
            u32::from_le_bytes(b),
            0xc000_8000,
            "a write across its start neither"
        );
        c.read(BAR0 + 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0, "BAR1 is not implemented");
        let a = c.add_capability(9, &[1, 2], &[0, 0]);
        let m = c.add_capability(CAP_ID_MSIX, &[0; 10], &[0; 10]);
        assert_eq!((a, m), (0x40, 0x44));
        assert_eq!(c.bytes[CAPABILITIES_POINTER], 0x40);
        assert_eq!((c.bytes[0x41], c.bytes[0x45]), (0x44, 0));
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(0, &[0; 4]);
        assert_eq!(c.u16_at(0), 0x1af4, "identity is read-only");
    }

    type Routed = Vec<(usize, Option<MsiMessage>)>;
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Routed>>);
    impl MsiRoutes for Log {
        fn route(&mut self, vector: usize, message: Option<MsiMessage>) {
            self.0.lock().unwrap().push((vector, message));
        }
    }

    #[test]
    fn vectors_are_routed_only_while_enabled_and_unmasked() {
        let mut c = HostBridge::default().0;
        let log = Log::default();
        let mut m = Msix::new(&mut c, 2, 0, 0x4000, 0x5000, Box::new(log.clone()));
        let w = |m: &mut Msix, off: u64, v: u32| m.table_write(off, &v.to_le_bytes());
        w(&mut m, 0, 0xfee0_0000);
        w(&mut m, 8, 0x41);
        w(&mut m, 12, 0); // unmasked, but MSI-X is off
        assert!(log.0.lock().unwrap().is_empty());
        let ctl = m.cap + 2;
        assert!(m.control_touched(ctl, 2) && !m.control_touched(m.cap + 4, 4));
        c.write(ctl, &MSIX_ENABLE.to_le_bytes());
        m.control_written(&c);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(*log.0.lock().unwrap(), vec![(0, Some(msg))]);
        c.write(ctl, &(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes());
        m.control_written(&c);
        assert_eq!(log.0.lock().unwrap().last(), Some(&(0, None)));
        w(&mut m, 2 * MSIX_ENTRY_SIZE, 1); // beyond the table: ignored
        m.table_write(1, &[0; 4]); // misaligned: ignored
        let mut b = [0u8; 8];
        m.table_read(8, &mut b);
        assert_eq!(b, [0x41, 0, 0, 0, 0, 0, 0, 0]);
        m.reset();
        assert_eq!(log.0.lock().unwrap().len(), 2, "nothing was routed");
    }
}
