//! Open files: what each handle reads and how, and which handles are open on each inode.
//!
//! A handle pins the object version listed at open, its reader's read-ahead state and the
//! check of the bytes it served against the object's CRC32C. Per inode, the table knows how
//! many handles are open and in which mode: the walk prefetch skips files being read, and a
//! kernel passthrough open (served by the kernel from a backing file) cannot share an inode
//! with a normal open, so the open path must know which kind an inode has.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::fetch::Object;
use super::readahead::Readahead;
use super::verify::Verifier;
use crate::inode::Ino;

/// How a handle's reads are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// physiofs answers each read.
    Served,
    /// The kernel reads a local backing file directly; no read reaches physiofs.
    Passthrough,
}

pub struct Handle {
    pub ino: Ino,
    pub object: Object,
    pub mode: Mutex<OpenMode>,
    pub readahead: Mutex<Readahead>,
    /// Checks the bytes this handle serves against the object's CRC32C (None without one, or
    /// once decided).
    pub verifier: Mutex<Option<Verifier>>,
    /// Bytes served through this handle failed the CRC32C: every later read fails too (the
    /// kernel may retry a failed read-ahead page with a plain read, which must not succeed).
    pub poisoned: AtomicBool,
    /// A read through this handle reached the end of the object.
    pub finished: AtomicBool,
    /// A read through this handle started at a multiple of [`super::KERNEL_READ`] (offset 0
    /// included): the file is being read, not just a few pages the page cache lost refilled.
    pub piece_read: AtomicBool,
}

impl Handle {
    pub fn new(ino: Ino, object: Object, mode: OpenMode, readahead: Readahead) -> Self {
        Handle {
            ino,
            verifier: Mutex::new(object.crc32c.map(|c| Verifier::new(c, object.size))),
            object,
            mode: Mutex::new(mode),
            readahead: Mutex::new(readahead),
            poisoned: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            piece_read: AtomicBool::new(false),
        }
    }
}

/// Handles open on one inode, by mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeOpens {
    pub served: u32,
    pub passthrough: u32,
}

impl InodeOpens {
    fn count(&mut self, mode: OpenMode) -> &mut u32 {
        match mode {
            OpenMode::Served => &mut self.served,
            OpenMode::Passthrough => &mut self.passthrough,
        }
    }
}

/// Open handles by number, and per inode.
#[derive(Default)]
pub struct Handles {
    by_fh: HashMap<u64, Arc<Handle>>,
    by_ino: HashMap<Ino, InodeOpens>,
    next: u64,
}

impl Handles {
    /// Adds a handle and returns its number.
    pub fn insert(&mut self, h: Arc<Handle>) -> u64 {
        self.next += 1;
        let mode = *h.mode.lock().unwrap();
        *self.by_ino.entry(h.ino).or_default().count(mode) += 1;
        self.by_fh.insert(self.next, h);
        self.next
    }

    pub fn get(&self, fh: u64) -> Option<&Arc<Handle>> {
        self.by_fh.get(&fh)
    }

    pub fn remove(&mut self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.by_fh.remove(&fh)?;
        let mode = *h.mode.lock().unwrap();
        if let Some(o) = self.by_ino.get_mut(&h.ino) {
            let c = o.count(mode);
            *c = c.saturating_sub(1);
            if *o == InodeOpens::default() {
                self.by_ino.remove(&h.ino);
            }
        }
        Some(h)
    }

    /// Handle `fh` is served by physiofs after all (the kernel refused its backing file).
    pub fn demote(&mut self, fh: u64) {
        let Some(h) = self.by_fh.get(&fh) else {
            return;
        };
        let mut mode = h.mode.lock().unwrap();
        if *mode == OpenMode::Passthrough {
            *mode = OpenMode::Served;
            let o = self.by_ino.entry(h.ino).or_default();
            o.passthrough = o.passthrough.saturating_sub(1);
            o.served += 1;
        }
    }

    /// Handles open on `ino` now.
    pub fn on_inode(&self, ino: Ino) -> InodeOpens {
        self.by_ino.get(&ino).copied().unwrap_or_default()
    }

    pub fn is_open(&self, ino: Ino) -> bool {
        self.by_ino.contains_key(&ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(ino: Ino, mode: OpenMode) -> Arc<Handle> {
        let obj = Object {
            name: Arc::from("o"),
            generation: 1,
            size: 10,
            crc32c: None,
        };
        Arc::new(Handle::new(ino, obj, mode, Readahead::new(1, 2)))
    }

    #[test]
    fn opens_are_counted_per_inode_and_mode() {
        let mut t = Handles::default();
        let a = t.insert(handle(5, OpenMode::Served));
        let b = t.insert(handle(5, OpenMode::Served));
        let c = t.insert(handle(6, OpenMode::Passthrough));
        assert_ne!(a, b);
        assert_eq!(
            t.on_inode(5),
            InodeOpens {
                served: 2,
                passthrough: 0
            }
        );
        assert_eq!(t.on_inode(6).passthrough, 1);
        t.remove(a);
        assert_eq!(t.on_inode(5).served, 1);
        t.remove(b);
        t.remove(c);
        assert!(!t.is_open(5) && !t.is_open(6));
        let d = t.insert(handle(7, OpenMode::Passthrough));
        t.demote(d);
        assert_eq!(
            t.on_inode(7),
            InodeOpens {
                served: 1,
                passthrough: 0
            }
        );
        t.remove(d);
        // A handle removed twice changes nothing.
        assert!(t.remove(b).is_none());
        assert_eq!(t.on_inode(5), InodeOpens::default());
    }
}
