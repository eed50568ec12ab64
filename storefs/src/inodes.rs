//! The node table (FUSE node ids ↔ host inodes, with an LRU of O_PATH descriptors) and the
//! open handles.
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nixvm_devices::virtio::fuse::ROOT_ID;

use crate::host::{Res, open_beneath, stat_fd};

/// A FUSE node other than the root.
pub(crate) struct Node {
    pub(crate) parent: u64,
    pub(crate) name: CString,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    /// The guest's lookup count.
    pub(crate) nlookup: u64,
    /// Known nodes whose `parent` is this one: they need it to reopen themselves.
    pub(crate) children: u64,
    /// The O_PATH descriptor, while in the LRU cache.
    pub(crate) fd: Option<Arc<OwnedFd>>,
    pub(crate) lru_tick: u64,
}

pub(crate) struct Inodes {
    pub(crate) nodes: HashMap<u64, Node>,
    pub(crate) by_host: HashMap<(u64, u64), u64>,
    /// Nodes holding a descriptor, least recently used first.
    pub(crate) lru: BTreeMap<u64, u64>,
    pub(crate) tick: u64,
    pub(crate) next_id: u64,
    pub(crate) max_fds: usize,
}

impl Inodes {
    pub(crate) fn touch(&mut self, id: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(n) = self.nodes.get_mut(&id) {
            self.lru.remove(&n.lru_tick);
            n.lru_tick = tick;
            self.lru.insert(tick, id);
        }
    }

    pub(crate) fn cache_fd(&mut self, id: u64, fd: Arc<OwnedFd>) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.fd = Some(fd);
        self.touch(id);
        while self.lru.len() > self.max_fds.max(1) {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some(v) = self.nodes.get_mut(&victim) {
                v.fd = None;
            }
        }
    }

    /// The O_PATH descriptor of `id`, reopened through the parent chain if evicted.
    pub(crate) fn fd_of(&mut self, id: u64, root: &Arc<OwnedFd>) -> Res<Arc<OwnedFd>> {
        let mut chain = Vec::new();
        let mut cur = id;
        let base = loop {
            if cur == ROOT_ID {
                break root.clone();
            }
            let n = self.nodes.get(&cur).ok_or(libc::EBADF)?;
            if let Some(fd) = &n.fd {
                let fd = fd.clone();
                self.touch(cur);
                break fd;
            }
            chain.push(cur);
            if chain.len() > self.nodes.len() {
                log::error!("storefs: node {id}'s parent chain has a cycle");
                return Err(libc::EIO);
            }
            cur = n.parent;
        };
        let mut fd = base;
        for &c in chain.iter().rev() {
            let n = self.nodes.get(&c).ok_or(libc::EBADF)?;
            let new = open_beneath(fd.as_raw_fd(), &n.name, libc::O_PATH | libc::O_NOFOLLOW)
                .map_err(|e| if e == libc::ENOENT { libc::ESTALE } else { e })?;
            let st = stat_fd(new.as_raw_fd())?;
            if (st.st_dev, st.st_ino) != (n.dev, n.ino) {
                return Err(libc::ESTALE);
            }
            let new = Arc::new(new);
            self.cache_fd(c, new.clone());
            fd = new;
        }
        Ok(fd)
    }

    pub(crate) fn remove(&mut self, mut id: u64) {
        while id != ROOT_ID {
            let Some(n) = self.nodes.remove(&id) else {
                return;
            };
            if self.by_host.get(&(n.dev, n.ino)) == Some(&id) {
                self.by_host.remove(&(n.dev, n.ino));
            }
            if n.fd.is_some() {
                self.lru.remove(&n.lru_tick);
            }
            let Some(p) = self.nodes.get_mut(&n.parent) else {
                return;
            };
            p.children = p.children.saturating_sub(1);
            if p.nlookup != 0 || p.children != 0 {
                return;
            }
            id = n.parent;
        }
    }

    pub(crate) fn forget(&mut self, id: u64, nlookup: u64) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.nlookup = n.nlookup.saturating_sub(nlookup);
        if n.nlookup == 0 && n.children == 0 {
            self.remove(id);
        }
    }
}

pub(crate) struct DirEntry {
    pub(crate) name: CString,
    pub(crate) ino: u64,
    pub(crate) typ: u32,
}

pub(crate) enum Handle {
    File(File),
    Dir {
        node: u64,
        fd: Arc<OwnedFd>,
        /// The listing, taken at the first READDIR and again at each offset 0 (rewinddir);
        /// shared with the other handles of an unchanged directory.
        entries: Mutex<Option<Arc<crate::listings::Listing>>>,
    },
}
