//! SMBIOS tables where a guest without firmware looks for them: an SMBIOS 3.0 entry point in
//! the 0xF0000 BIOS area (Linux's `dmi_scan_machine` scans it on 16-byte boundaries), then the
//! structures: BIOS information (type 0), system information (type 1: vendor, product, UUID),
//! OEM strings (type 11, where systemd finds credentials) and the end of table (type 127).
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{SMBIOS_END, SMBIOS_START};

const VENDOR: &str = "nixvm";
const PRODUCT: &str = "nixvm";
const VERSION: &str = env!("CARGO_PKG_VERSION");
const ENTRY_POINT_LEN: u8 = 24;

const TYPE_BIOS: u8 = 0;
const TYPE_SYSTEM: u8 = 1;
const TYPE_OEM_STRINGS: u8 = 11;
const TYPE_END: u8 = 127;
/// BIOS characteristics: "not supported" (bit 3); extension byte 2: "is a virtual machine"
/// (bit 4).
const BIOS_CHARACTERISTICS_NOT_SUPPORTED: u64 = 1 << 3;
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// System information: woken by the power switch.
const WAKE_UP_POWER_SWITCH: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the SMBIOS tables ({0} bytes) do not fit in the 64 KiB BIOS area")]
    TooLarge(usize),
    #[error("an SMBIOS string may not be empty or hold a NUL byte")]
    BadString,
    #[error("cannot write the SMBIOS tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the tables say beyond nixvm's own name.
#[derive(Clone, Debug, Default)]
pub struct SmbiosConfig {
    /// The system UUID as SMBIOS stores it (first three fields little-endian); zeros: none.
    pub uuid: [u8; 16],
    /// Type 11 OEM strings, in order.
    pub oem_strings: Vec<String>,
}

/// One structure: its formatted part (the header's type, then the fields after the 4-byte
/// header), and its strings, numbered from 1 in the order they are added.
struct Structure {
    kind: u8,
    fields: Vec<u8>,
    strings: Vec<u8>,
    count: u8,
}

impl Structure {
    fn new(kind: u8) -> Self {
        Structure {
            kind,
            fields: Vec::new(),
            strings: Vec::new(),
            count: 0,
        }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.fields.extend_from_slice(b);
        self
    }

    /// Adds a string and its number as a field.
    fn string(&mut self, s: &str) -> Result<&mut Self, Error> {
        let n = self.add_string(s)?;
        Ok(self.bytes(&[n]))
    }

    fn add_string(&mut self, s: &str) -> Result<u8, Error> {
        if s.is_empty() || s.contains('\0') {
            return Err(Error::BadString);
        }
        // A structure holds at most 255 strings: more do not fit in the table's one-byte
        // numbers (the caller's count check comes first).
        self.count = self.count.checked_add(1).ok_or(Error::BadString)?;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        Ok(self.count)
    }

    fn write(&self, handle: u16, out: &mut Vec<u8>) {
        let len = u8::try_from(4 + self.fields.len()).expect("fixed structures are short");
        out.extend_from_slice(&[self.kind, len]);
        out.extend_from_slice(&handle.to_le_bytes());
        out.extend_from_slice(&self.fields);
        if self.strings.is_empty() {
            out.extend_from_slice(&[0, 0]);
        } else {
            out.extend_from_slice(&self.strings);
            out.push(0);
        }
    }
}

/// The structure table (everything the entry point points at).
fn structures(config: &SmbiosConfig) -> Result<Vec<u8>, Error> {
    let mut all = Vec::new();
    let mut bios = Structure::new(TYPE_BIOS);
    bios.string(VENDOR)?
        .string(VERSION)?
        .bytes(&0xe000u16.to_le_bytes()) // BIOS segment (nominal)
        .string("11/28/2026")?
        .bytes(&[0]) // ROM size: 64 KiB
        .bytes(&BIOS_CHARACTERISTICS_NOT_SUPPORTED.to_le_bytes())
        .bytes(&[0, BIOS_EXT2_VIRTUAL_MACHINE])
        .bytes(&[0, 0, 0xff, 0xff]); // BIOS and embedded controller releases: none
    bios.write(0, &mut all);
    let mut system = Structure::new(TYPE_SYSTEM);
    system
        .string(VENDOR)?
        .string(PRODUCT)?
        .string(VERSION)?
        .bytes(&[0]) // serial number: none
        .bytes(&config.uuid)
        .bytes(&[WAKE_UP_POWER_SWITCH, 0])
        .string(PRODUCT)?; // family
    system.write(1, &mut all);
    if !config.oem_strings.is_empty() {
        let mut oem = Structure::new(TYPE_OEM_STRINGS);
        let count = u8::try_from(config.oem_strings.len()).map_err(|_| Error::BadString)?;
        oem.bytes(&[count]);
        for s in &config.oem_strings {
            oem.add_string(s)?;
        }
        oem.write(2, &mut all);
    }
    Structure::new(TYPE_END).write(0xfffe, &mut all);
    Ok(all)
}

/// The SMBIOS 3.0 entry point for a structure table of `len` bytes at `table`.
fn entry_point(table: u64, len: u32) -> [u8; ENTRY_POINT_LEN as usize] {
    let mut e = [0u8; ENTRY_POINT_LEN as usize];
    e[..5].copy_from_slice(b"_SM3_");
    e[6] = ENTRY_POINT_LEN;
    e[7] = 3; // SMBIOS 3.2
    e[8] = 2;
    e[10] = 1; // entry point revision: 3.0
    e[12..16].copy_from_slice(&len.to_le_bytes());
    e[16..24].copy_from_slice(&table.to_le_bytes());
    e[5] = e.iter().fold(0u8, |a, b| a.wrapping_sub(*b));
    e
}

/// Writes the entry point at [`SMBIOS_START`] and the structures after it.
pub fn write_smbios_tables(
    mem: &impl GuestMemoryBackend,
    config: &SmbiosConfig,
) -> Result<(), Error> {
    let table = structures(config)?;
    let at = SMBIOS_START + 32;
    let room = usize::try_from(SMBIOS_END - at).expect("64 KiB");
    if table.len() > room {
        return Err(Error::TooLarge(table.len() + 32));
    }
    let len = u32::try_from(table.len()).expect("checked against the room");
    mem.write_slice(&table, GuestAddress(at))
        .map_err(Error::Write)?;
    mem.write_slice(&entry_point(at, len), GuestAddress(SMBIOS_START))
        .map_err(Error::Write)
}

/// The most the OEM strings may hold together (with their NULs), for a clear error before the
/// VM is built: the 64 KiB area less the fixed structures.
pub const OEM_STRINGS_ROOM: usize = {
    let area = SMBIOS_END - SMBIOS_START;
    assert!(area <= 0x1_0000);
    #[allow(clippy::cast_possible_truncation)] // at most 64 KiB: asserted above
    let area = area as usize;
    area - 512
};

/// systemd's form of a credential in an OEM string: `io.systemd.credential.binary:NAME=`
/// and the value in base64 (any bytes).
pub fn credential_string(name: &str, value: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = format!("io.systemd.credential.binary:{name}=");
    for chunk in value.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> vm_memory::GuestMemoryMmap {
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    /// The structures as (type, formatted bytes, strings), walked as Linux's dmi_walk does.
    fn walk(m: &vm_memory::GuestMemoryMmap) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut e = [0u8; 24];
        m.read_slice(&mut e, GuestAddress(SMBIOS_START)).unwrap();
        assert_eq!(&e[..5], b"_SM3_");
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = u32::from_le_bytes(e[12..16].try_into().unwrap()) as usize;
        let at = u64::from_le_bytes(e[16..24].try_into().unwrap());
        assert!(at >= SMBIOS_START + 24 && at + len as u64 <= SMBIOS_END);
        let mut t = vec![0u8; len];
        m.read_slice(&mut t, GuestAddress(at)).unwrap();
        let mut out = Vec::new();
        let mut i = 0;
        while i < t.len() {
            let (kind, slen) = (t[i], t[i + 1] as usize);
            let fields = t[i..i + slen].to_vec();
            let mut j = i + slen;
            let mut strings = Vec::new();
            while t[j] != 0 {
                let end = j + t[j..].iter().position(|b| *b == 0).unwrap();
                strings.push(String::from_utf8(t[j..end].to_vec()).unwrap());
                j = end + 1;
            }
            if strings.is_empty() {
                j += 1; // the empty string set is two NULs
            }
            out.push((kind, fields, strings));
            i = j + 1;
        }
        assert_eq!(i, t.len(), "the length covers the table exactly");
        out
    }

    #[test]
    fn entry_point_and_structures() {
        let m = mem();
        let uuid = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        let oem = vec!["first".to_owned(), credential_string("c", b"x")];
        write_smbios_tables(
            &m,
            &SmbiosConfig {
                uuid,
                oem_strings: oem.clone(),
            },
        )
        .unwrap();
        let s = walk(&m);
        assert_eq!(
            s.iter().map(|x| x.0).collect::<Vec<_>>(),
            [TYPE_BIOS, TYPE_SYSTEM, TYPE_OEM_STRINGS, TYPE_END]
        );
        // Type 0: 0x18 bytes in SMBIOS 3.x, vendor is string 1, "virtual machine" bit.
        assert_eq!(s[0].1.len(), 0x18);
        assert_eq!(s[0].2[s[0].1[4] as usize - 1], "nixvm");
        assert_eq!(
            s[0].1[0x13] & BIOS_EXT2_VIRTUAL_MACHINE,
            BIOS_EXT2_VIRTUAL_MACHINE
        );
        // Type 1: 0x1b bytes, manufacturer and product, the UUID at offset 8.
        assert_eq!(s[1].1.len(), 0x1b);
        assert_eq!(s[1].2[s[1].1[4] as usize - 1], "nixvm");
        assert_eq!(s[1].2[s[1].1[5] as usize - 1], "nixvm");
        assert_eq!(s[1].1[8..24], uuid);
        // Type 11: the count, then the strings in order.
        assert_eq!(s[2].1[4], 2);
        assert_eq!(s[2].2, oem);
        assert_eq!(s[3].1.len(), 4);
    }

    #[test]
    fn no_oem_strings_no_type_11() {
        let m = mem();
        write_smbios_tables(&m, &SmbiosConfig::default()).unwrap();
        assert!(walk(&m).iter().all(|x| x.0 != TYPE_OEM_STRINGS));
    }

    #[test]
    fn limits() {
        let m = mem();
        let big = SmbiosConfig {
            oem_strings: vec!["x".repeat(OEM_STRINGS_ROOM + 512)],
            ..SmbiosConfig::default()
        };
        assert!(matches!(
            write_smbios_tables(&m, &big),
            Err(Error::TooLarge(_))
        ));
        let fits = SmbiosConfig {
            oem_strings: vec!["x".repeat(OEM_STRINGS_ROOM - 1)],
            ..SmbiosConfig::default()
        };
        write_smbios_tables(&m, &fits).unwrap();
        for bad in ["", "a\0b"] {
            let c = SmbiosConfig {
                oem_strings: vec![bad.to_owned()],
                ..SmbiosConfig::default()
            };
            assert!(matches!(write_smbios_tables(&m, &c), Err(Error::BadString)));
        }
        let many = SmbiosConfig {
            oem_strings: vec!["s".to_owned(); 256],
            ..SmbiosConfig::default()
        };
        assert!(write_smbios_tables(&m, &many).is_err());
    }

    #[test]
    fn credentials_in_base64() {
        assert_eq!(
            credential_string("n", b""),
            "io.systemd.credential.binary:n="
        );
        assert_eq!(
            credential_string("n", b"f"),
            "io.systemd.credential.binary:n=Zg=="
        );
        assert_eq!(
            credential_string("n", b"fo"),
            "io.systemd.credential.binary:n=Zm8="
        );
        assert_eq!(
            credential_string("n", b"foo"),
            "io.systemd.credential.binary:n=Zm9v"
        );
        assert_eq!(
            credential_string("n", b"foobar\n\xff"),
            "io.systemd.credential.binary:n=Zm9vYmFyCv8="
        );
    }
}
