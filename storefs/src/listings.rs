//! Directory listings, shared: the handles that read the same directory, unchanged since it
//! was listed, share one listing (a guest opening /nix/store a hundred times holds it once),
//! and all listings together hold at most [`MAX_LISTING_BYTES`]; past that, a READDIR that
//! needs a new listing gets ENOMEM. A listing lives while a handle holds it.
use std::collections::HashMap;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use nixvm_devices::lock;

use crate::host::Res;
use crate::inodes::DirEntry;

/// The most all live listings may hold (names and entries).
pub const MAX_LISTING_BYTES: usize = 256 << 20;

/// What a directory looked like when it was listed: its modification and change times (an
/// entry added or removed changes both).
pub(crate) type Stamp = [i64; 4];

pub(crate) fn stamp(st: &libc::stat) -> Stamp {
    [st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec]
}

/// One directory's entries, counted against the total while alive.
pub(crate) struct Listing {
    pub(crate) entries: Vec<DirEntry>,
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl Drop for Listing {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub(crate) struct Listings {
    by_node: Mutex<HashMap<u64, (Stamp, Weak<Listing>)>>,
    total: Arc<AtomicUsize>,
}

impl Listings {
    /// The listing of directory `node` as of `stamp`: a live one that matches, else a new
    /// one from `list` (run without holding the table).
    pub(crate) fn get(
        &self,
        node: u64,
        stamp: Stamp,
        list: impl FnOnce() -> Res<Vec<DirEntry>>,
    ) -> Res<Arc<Listing>> {
        if let Some(l) = lock(&self.by_node)
            .get(&node)
            .filter(|(s, _)| *s == stamp)
            .and_then(|(_, l)| l.upgrade())
        {
            return Ok(l);
        }
        let entries = list()?;
        let bytes = entries
            .iter()
            .map(|e| size_of::<DirEntry>() + e.name.as_bytes_with_nul().len())
            .sum::<usize>()
            + size_of::<Listing>();
        if self.total.fetch_add(bytes, Ordering::Relaxed) + bytes > MAX_LISTING_BYTES {
            self.total.fetch_sub(bytes, Ordering::Relaxed);
            nixvm_devices::guest_warn!(
                "storefs: directory listings would hold more than {MAX_LISTING_BYTES} bytes"
            );
            return Err(libc::ENOMEM);
        }
        let listing = Arc::new(Listing {
            entries,
            bytes,
            total: self.total.clone(),
        });
        let mut by_node = lock(&self.by_node);
        // Forget the listings no handle holds any more, now and then.
        if by_node.len() >= 1024 {
            by_node.retain(|_, (_, l)| l.strong_count() > 0);
        }
        by_node.insert(node, (stamp, Arc::downgrade(&listing)));
        Ok(listing)
    }

    /// What the live listings hold, in bytes.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn entries(n: usize) -> Vec<DirEntry> {
        (0..n)
            .map(|i| DirEntry {
                name: CString::new(format!("entry-{i}")).unwrap(),
                ino: i as u64,
                typ: 0,
            })
            .collect()
    }

    #[test]
    fn handles_of_one_directory_share_its_listing() {
        let l = Listings::default();
        let mut listed = 0;
        let a = l.get(7, [1; 4], || {
            listed += 1;
            Ok(entries(1000))
        });
        let a = a.unwrap();
        let held = l.bytes();
        let b = l.get(7, [1; 4], || panic!("shared")).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((listed, l.bytes()), (1, held));
        // The directory changed: a new listing for whoever starts reading it now.
        let c = l.get(7, [2; 4], || Ok(entries(3))).unwrap();
        assert_eq!(c.entries.len(), 3);
        drop((a, b, c));
        assert_eq!(l.bytes(), 0, "nothing held once no handle holds it");
    }

    #[test]
    fn the_total_is_bounded() {
        let l = Listings::default();
        let per = MAX_LISTING_BYTES / 4;
        let big = || Ok(entries(per / (size_of::<DirEntry>() + 12)));
        let held: Vec<_> = (0..3)
            .map(|node| l.get(node, [0; 4], big).unwrap())
            .collect();
        assert!(matches!(l.get(99, [0; 4], big), Err(libc::ENOMEM)));
        drop(held);
        assert!(l.get(99, [0; 4], big).is_ok(), "room again");
    }
}
