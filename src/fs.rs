//! The async core of the filesystem: lookup, getattr, readdir, open, read, release, statfs.
//!
//! It knows nothing of FUSE: it takes inode numbers and handles and returns plain structs or
//! an [`FsError`], so unit tests drive it with the fake client and the `fuse` adapter only
//! translates. Anything that may touch the network is `async`; the rest answers from memory.

pub mod bulk;
mod listing;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::client::ObjectClient;
pub use crate::error::FsError;
use crate::inode::{FileInfo, Ino, InodeTable, Kind, Lookup, NodeView, ROOT};
use crate::read::{BlockCache, Catalog, Object, ReadConfig, ReadPath};
pub use crate::read::{ReadStats as FsStats, Served};

/// Settings of the core, with defaults that suit an immutable dataset.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Object-name prefix shown as the mount root: empty or ending in `/`.
    pub prefix: String,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits of files (default 0444: read-only for everyone).
    pub file_mode: u16,
    /// Permission bits of directories (default 0555).
    pub dir_mode: u16,
    /// How long the kernel may cache attributes and entries. The dataset never changes, so
    /// long is right; every kernel round trip saved is a syscall made faster.
    pub attr_ttl: Duration,
    /// Size of a cache block: the unit of caching, not of requests (a request fetches a run
    /// of blocks). Small (32 KiB) so a random or header read fetches little more than asked
    /// (an unaligned 64 KiB read costs at most 96 KiB).
    pub block_size: u64,
    /// Read-ahead window of a sequential reader: first size, and the cap it grows up to
    /// (fourfold per sequential read). 64 MiB, measured against 128 and 256 MiB (a 1 GiB
    /// object read with dd, 3 fresh mounts each, bench VM, 2026-12-02): at 30 ms over plain
    /// HTTP 128 MiB was 17% faster (960 vs 825 MB/s) but took 8% more CPU per GiB and twice
    /// the memory (240 vs 110 MiB), over TLS no clear gain (634-814 vs 653-671 MB/s), and
    /// 256 MiB cost 25-40% more CPU per GiB (fresh 4 MiB buffers page-faulting) for no gain
    /// anywhere. MIMIC-CXR files are far below the window; it only matters for big objects.
    pub readahead_min: u64,
    pub readahead_max: u64,
    /// Largest single ranged GET; longer runs are split so they proceed in parallel.
    pub max_request: u64,
    /// Objects up to this size are fetched whole, in one request, by the first read of an
    /// open or any read at offset 0.
    pub small_object: u64,
    /// Most bytes being fetched ahead at once, over all open files. Read-ahead beyond it is
    /// skipped (readers then fetch on demand), so memory stays bounded however many files
    /// are read at once.
    pub prefetch_budget: u64,
    /// How long a directory listing is trusted; None = for the life of the mount (the
    /// PhysioNet buckets are immutable releases).
    pub metadata_ttl: Option<Duration>,
    /// Files fetched ahead of a reader that reads whole files one after another in key order
    /// (their first `max_request` bytes: all of a JPG); 0 = never.
    pub next_files: usize,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            prefix: String::new(),
            uid: 0,
            gid: 0,
            file_mode: 0o444,
            dir_mode: 0o555,
            attr_ttl: Duration::from_secs(24 * 3600),
            block_size: 32 << 10,
            readahead_min: 1 << 20,
            readahead_max: 64 << 20,
            max_request: crate::client::FULL_REQUEST,
            small_object: 4 << 20,
            prefetch_budget: 64 << 20,
            metadata_ttl: None,
            next_files: 8,
        }
    }
}

impl FsConfig {
    /// The read path's share of these settings.
    pub fn read_config(&self) -> ReadConfig {
        ReadConfig {
            block_size: self.block_size,
            readahead_min: self.readahead_min,
            readahead_max: self.readahead_max,
            max_request: self.max_request,
            small_object: self.small_object,
            prefetch_budget: self.prefetch_budget,
            next_files: self.next_files,
        }
    }
}

/// Attributes of one inode, ready for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
    /// The FUSE generation of `ino` (see `NodeView::ino_gen`).
    pub ino_gen: u64,
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Arc<str>,
    /// Present for everything but `.` and `..` (readdirplus needs it).
    pub attr: Attr,
}

/// Offsets 1 and 2 resume after `.` and `..`; a child's offset is its inode plus this.
const DOTS: u64 = 2;

/// The readdir offset that resumes after child `ino` of a listed directory: a cookie naming
/// the child (its inode), not its index, so a reader deep in a directory of a million names
/// resumes without stepping over the ones before it. Child inodes are at least 2, so cookies
/// never collide with 1 and 2.
pub fn dir_offset(ino: Ino) -> u64 {
    ino + DOTS
}

/// A directory entry borrowed from the inode table while a reply is filled.
#[derive(Debug)]
pub struct EntryRef<'a> {
    pub ino: Ino,
    pub kind: Kind,
    pub name: &'a str,
    pub attr: Attr,
}

#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// The metadata core: the tree from listings (lookup, getattr, readdir, statfs); opens and
/// reads go to the read path.
pub struct Fs {
    cfg: FsConfig,
    client: Arc<dyn ObjectClient>,
    inodes: Arc<InodeTable>,
    reader: ReadPath,
    dir_handles: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_dir_handle: AtomicU64,
    /// One listing per directory at a time; latecomers wait for it and reuse its result.
    list_locks: Mutex<HashMap<Ino, Arc<tokio::sync::Mutex<()>>>>,
    mount_time: SystemTime,
    /// While a bulk load runs, lookups in directories it has not finished are answered by a
    /// targeted request instead of a listing of the whole parent.
    bulk_loading: std::sync::atomic::AtomicBool,
    /// Signalled after each page of the bulk load (and at its end), for readdirs waiting for
    /// the load to reach their directory.
    bulk_progress: tokio::sync::Notify,
    /// Called when an object is seen to have changed under the mount (snapshot invalidation).
    #[allow(clippy::type_complexity)]
    on_change: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The tree came from a snapshot: a name it lacks is asked of the server before the
    /// answer is ENOENT (see [`Fs::confirm_misses`]).
    confirm_misses: std::sync::atomic::AtomicBool,
}

/// The read path's view of the tree: file order and object versions, from the inode table.
struct Names {
    inodes: Arc<InodeTable>,
    prefix: String,
}

impl Catalog for Names {
    fn next_files(&self, ino: Ino, n: usize) -> Vec<Ino> {
        self.inodes.next_files(ino, n)
    }

    fn object(&self, ino: Ino) -> Option<Object> {
        let info = self.inodes.get(ino)?.file?;
        Some(Object {
            name: Arc::from(format!("{}{}", self.prefix, self.inodes.rel_path(ino))),
            generation: info.generation,
            size: info.size,
            crc32c: info.crc32c,
        })
    }
}

impl Fs {
    pub fn new(cfg: FsConfig, client: Arc<dyn ObjectClient>, cache: Arc<dyn BlockCache>) -> Self {
        let inodes = Arc::new(InodeTable::new(cfg.metadata_ttl));
        let names = Arc::new(Names {
            inodes: inodes.clone(),
            prefix: cfg.prefix.clone(),
        });
        let reader = ReadPath::new(cfg.read_config(), client.clone(), cache, names);
        Fs {
            cfg,
            client,
            inodes,
            reader,
            dir_handles: Mutex::default(),
            next_dir_handle: AtomicU64::new(1),
            list_locks: Mutex::default(),
            mount_time: SystemTime::now(),
            bulk_loading: Default::default(),
            bulk_progress: Default::default(),
            on_change: Mutex::default(),
            confirm_misses: Default::default(),
        }
    }

    /// A name the tree lacks is asked of the server (one stat and a one-item listing of
    /// `NAME/`) before a lookup answers ENOENT. For a tree loaded from a snapshot: the snapshot
    /// is keyed by endpoint, bucket and prefix, and checked at mount by one of its objects, but
    /// a bucket that gained objects since (or another server on the same address, such as an
    /// emulator started again on a port an earlier one used) passes that check. A name found
    /// this way is added, and the snapshot is dropped (`set_on_change`) so the next mount lists
    /// afresh. The kernel caches the answer either way, so each missing name is asked once.
    pub fn confirm_misses(&self) {
        self.confirm_misses.store(true, Ordering::Relaxed);
    }

    /// Registers what to do when an object is found changed under the mount.
    pub fn set_on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.on_change.lock().unwrap() = Some(Box::new(f));
    }

    /// The bucket was seen to differ from the tree loaded (an object replaced, or one the
    /// tree lacked): tells the owner, whose persisted snapshot is no longer true.
    fn tree_changed(&self) {
        if let Some(f) = self.on_change.lock().unwrap().as_ref() {
            f();
        }
    }

    pub fn stats(&self) -> &FsStats {
        self.reader.stats()
    }

    /// The read path (opens, reads, the block cache).
    pub fn reader(&self) -> &ReadPath {
        &self.reader
    }

    pub fn client(&self) -> &Arc<dyn ObjectClient> {
        &self.client
    }

    /// Adds one listed object to the inode table. Returns its inode and its path relative to
    /// the mount root, or None when it is outside the prefix or cannot be shown.
    fn insert_meta<'a>(&self, m: &'a crate::client::ObjectMeta) -> Option<(Ino, &'a str)> {
        let rel = m.name.strip_prefix(&self.cfg.prefix)?;
        if rel.is_empty() {
            return None;
        }
        let info = FileInfo {
            size: m.size,
            mtime: m.updated,
            generation: m.generation,
            crc32c: m.crc32c,
        };
        match self.inodes.insert_object(rel, info) {
            Ok(ino) => Some((ino, rel)),
            Err(why) => {
                tracing::warn!(object = %m.name, "skipping object: {why}");
                None
            }
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn inodes(&self) -> &InodeTable {
        &self.inodes
    }

    pub fn cache(&self) -> &Arc<dyn BlockCache> {
        self.reader.cache()
    }

    fn attr_of(&self, v: &NodeView) -> Attr {
        match (&v.kind, &v.file) {
            (Kind::File, Some(f)) => Attr {
                ino: v.ino,
                kind: Kind::File,
                size: f.size,
                mtime: f.mtime,
                perm: self.cfg.file_mode,
                nlink: 1,
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                blksize: self.cfg.block_size.min(u32::MAX as u64) as u32,
                ino_gen: v.ino_gen,
            },
            _ => Attr {
                ino: v.ino,
                kind: Kind::Dir,
                size: 4096,
                mtime: self.mount_time,
                perm: self.cfg.dir_mode,
                nlink: 2,
                uid: self.cfg.uid,
                gid: self.cfg.gid,
                blksize: 4096,
                ino_gen: v.ino_gen,
            },
        }
    }

    pub async fn lookup(&self, parent: Ino, name: &str) -> Result<Attr, FsError> {
        let mut asked = false;
        loop {
            match self.lookup_cached(parent, name) {
                Some(r) => return r,
                None if asked => return Err(FsError::NotFound),
                None => {
                    if matches!(self.inodes.lookup(parent, name), Lookup::Absent) {
                        self.confirm_miss(parent, name).await;
                    } else if self.bulk_loading.load(Ordering::Relaxed) {
                        self.targeted_lookup(parent, name).await?;
                    } else {
                        self.ensure_listed(parent).await?;
                    }
                    asked = true;
                }
            }
        }
    }

    /// Asks the server for a name a snapshot's tree lacks (see [`Fs::confirm_misses`]). When
    /// the server cannot be asked, the snapshot's answer stands (ENOENT, not EIO: a mount
    /// working from its snapshot and disk cache answers as before).
    async fn confirm_miss(&self, parent: Ino, name: &str) {
        if let Err(e) = self.targeted_lookup(parent, name).await {
            tracing::debug!("could not confirm that {name:?} is absent: {e}");
            return;
        }
        if let Lookup::Found(_) = self.inodes.lookup(parent, name) {
            tracing::warn!(
                "metadata snapshot is out of date: {}{} is on the server but not in it; \
                 it is deleted, and the next mount lists afresh",
                self.inodes.rel_path(parent),
                name.escape_debug()
            );
            self.tree_changed();
        }
    }

    /// `lookup` answered from memory; None when the answer needs a request (the parent is
    /// not listed and does not hold the name).
    pub fn lookup_cached(&self, parent: Ino, name: &str) -> Option<Result<Attr, FsError>> {
        if name.len() > 255 {
            // No such name can be shown (objects with one are skipped): say why, not ENOENT.
            return Some(Err(FsError::NameTooLong));
        }
        match self.inodes.lookup(parent, name) {
            Lookup::Found(v) => Some(Ok(self.attr_of(&v))),
            // A snapshot's "absent" needs the server's word (see `confirm_misses`).
            Lookup::Absent if self.confirm_misses.load(Ordering::Relaxed) => None,
            Lookup::Absent => Some(Err(FsError::NotFound)),
            Lookup::NotDir => Some(Err(FsError::NotDir)),
            Lookup::Unknown => None,
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        self.inodes
            .get(ino)
            .map(|v| self.attr_of(&v))
            .ok_or(FsError::NotFound)
    }

    /// The entries of a directory (`.`, `..`, then children in name order), listing it first
    /// if needed.
    pub async fn entries(&self, ino: Ino) -> Result<Vec<DirEntry>, FsError> {
        let v = self.inodes.get(ino).ok_or(FsError::NotFound)?;
        if v.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        self.await_bulk_load(ino).await;
        self.ensure_listed(ino).await?;
        self.entries_listed(ino).ok_or(FsError::NotDir)
    }

    /// The entries of a directory whose listing is complete, without any I/O; None when it
    /// would need a listing (or is not a directory).
    pub fn entries_listed(&self, ino: Ino) -> Option<Vec<DirEntry>> {
        if !self.inodes.is_listed(ino) {
            return None;
        }
        let v = self.inodes.get(ino)?;
        let me = self.attr_of(&v);
        let parent = self
            .getattr(if ino == ROOT { ROOT } else { v.parent })
            .ok()?;
        let children = self.inodes.children(ino)?;
        let mut entries = Vec::with_capacity(children.len() + 2);
        entries.push(DirEntry {
            ino,
            kind: Kind::Dir,
            name: Arc::from("."),
            attr: me,
        });
        entries.push(DirEntry {
            ino: parent.ino,
            kind: Kind::Dir,
            name: Arc::from(".."),
            attr: parent,
        });
        for (name, child) in children {
            entries.push(DirEntry {
                ino: child.ino,
                kind: child.kind,
                name,
                attr: self.attr_of(&child),
            });
        }
        Some(entries)
    }

    /// Calls `add(next_offset, entry)` for the entries of a listed directory from `offset` on
    /// (`.`, `..`, then children in name order) until it returns true (the reply is full).
    /// Answers from the inode table without copying the directory, which matters when a tree
    /// walk reads ~300,000 directories. Offsets are [`dir_offset`] cookies, so each call resumes
    /// with one tree descent however far into a huge directory it is. None when the directory
    /// needs a listing first (or is not a directory).
    pub fn entries_from(
        &self,
        ino: Ino,
        offset: u64,
        mut add: impl FnMut(u64, EntryRef<'_>) -> bool,
    ) -> Option<()> {
        if !self.inodes.is_listed(ino) {
            return None;
        }
        let v = self.inodes.get(ino)?;
        if v.kind != Kind::Dir {
            return None;
        }
        let dots = [
            (".", self.attr_of(&v)),
            (
                "..",
                self.getattr(if ino == ROOT { ROOT } else { v.parent })
                    .ok()?,
            ),
        ];
        let mut next = offset;
        for (name, attr) in dots.into_iter().skip(offset.min(2) as usize) {
            next += 1;
            let e = EntryRef {
                ino: attr.ino,
                kind: Kind::Dir,
                name,
                attr,
            };
            if add(next, e) {
                return Some(());
            }
        }
        let after = (offset > 2).then(|| offset - DOTS);
        self.inodes.visit_children(ino, after, &mut |name, child| {
            let e = EntryRef {
                ino: child.ino,
                kind: child.kind,
                name,
                attr: self.attr_of(&child),
            };
            add(dir_offset(child.ino), e)
        })
    }

    /// [`Fs::entries_from`] over entries already copied out of directory `dir` (by
    /// [`Fs::entries`]), with the same offsets: where to resume is found by a binary search
    /// on the name.
    pub fn entries_from_copy(
        &self,
        dir: Ino,
        entries: &[DirEntry],
        offset: u64,
        mut add: impl FnMut(u64, EntryRef<'_>) -> bool,
    ) {
        let start = match offset {
            0..=2 => offset as usize,
            c => match self.inodes.child_name(dir, c - DOTS) {
                Some(name) => {
                    let kids = entries.get(2..).unwrap_or_default();
                    2 + kids.partition_point(|e| *e.name <= *name)
                }
                None => entries.len(),
            },
        };
        for (i, e) in entries.iter().enumerate().skip(start) {
            let next = if i < 2 {
                i as u64 + 1
            } else {
                dir_offset(e.ino)
            };
            let r = EntryRef {
                ino: e.ino,
                kind: e.kind,
                name: &e.name,
                attr: e.attr.clone(),
            };
            if add(next, r) {
                break;
            }
        }
    }

    /// Opens a directory: lists it if needed and snapshots its entries, so readdir offsets
    /// stay stable for the life of the handle.
    pub async fn opendir(&self, ino: Ino) -> Result<u64, FsError> {
        let entries = self.entries(ino).await?;
        Ok(self.add_dir_handle(entries))
    }

    /// `opendir` without I/O, for a directory already listed.
    pub fn opendir_listed(&self, ino: Ino) -> Option<u64> {
        self.entries_listed(ino).map(|e| self.add_dir_handle(e))
    }

    fn add_dir_handle(&self, entries: Vec<DirEntry>) -> u64 {
        let fh = self.next_dir_handle.fetch_add(1, Ordering::Relaxed);
        self.dir_handles
            .lock()
            .unwrap()
            .insert(fh, Arc::new(entries));
        fh
    }

    /// Entries of an open directory from `offset` on (offset = index of the first entry).
    pub fn readdir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>, FsError> {
        self.dir_handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dir_handles.lock().unwrap().remove(&fh);
    }

    /// Opens a file for reading, pinning the object version listed now.
    pub fn open(&self, ino: Ino, write: bool) -> Result<u64, FsError> {
        let v = self.inodes.get(ino).ok_or(FsError::NotFound)?;
        if v.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        Ok(self.reader.open(ino, self.object_of(ino, &v)))
    }

    /// `open` for the kernel: with passthrough when the object is complete on disk (see
    /// `ReadPath::open_for_kernel`).
    pub async fn open_for_kernel(
        &self,
        ino: Ino,
        write: bool,
    ) -> Result<crate::read::Opened, FsError> {
        let v = self.inodes.get(ino).ok_or(FsError::NotFound)?;
        if v.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        let object = self.object_of(ino, &v);
        Ok(self.reader.open_for_kernel(ino, object).await)
    }

    fn object_of(&self, ino: Ino, v: &NodeView) -> Object {
        let info: &FileInfo = v.file.as_ref().expect("a file node has file info");
        Object {
            name: Arc::from(format!("{}{}", self.cfg.prefix, self.inodes.rel_path(ino))),
            generation: info.generation,
            size: info.size,
            crc32c: info.crc32c,
        }
    }

    /// Adds the persistent tier and the passthrough choice to the read path.
    pub fn with_disk(
        mut self,
        disk: Option<Arc<crate::read::disk::DiskCache>>,
        passthrough: bool,
    ) -> Self {
        self.reader = self.reader.with_disk(disk, passthrough);
        self
    }

    /// Closes handle `fh`; returns how it was served.
    pub fn release(&self, fh: u64) -> Option<crate::read::OpenMode> {
        self.reader.release(fh)
    }

    /// Whether the kernel may keep its page cache for `ino` across opens (see
    /// `ReadPath::keep_cache`).
    pub fn keep_cache(&self, ino: Ino) -> bool {
        self.reader.keep_cache(ino)
    }

    /// Reads up to `size` bytes at `offset`. Returns fewer only at end of file.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        Ok(self.read_for_kernel(fh, offset, size, false).await?.0)
    }

    /// `read`, plus a token for `served` once the bytes are delivered. A read that finds its
    /// object gone or replaced (ESTALE) refreshes the object's entry.
    pub async fn read_for_kernel(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        buffered: bool,
    ) -> Result<(Bytes, Served), FsError> {
        let r = self.reader.read(fh, offset, size, buffered).await;
        if let Err(e) = &r
            && e.errno() == libc::ESTALE
            && let Some(obj) = self.reader.object_of(fh)
        {
            self.object_changed(&obj.name).await;
        }
        r
    }

    /// The bytes of a buffered read reached the kernel's page cache (see `ReadPath::served`).
    pub async fn served(&self, s: Served) {
        self.reader.served(s).await;
    }

    /// A pinned read found the object gone or replaced: refresh its entry so the next open
    /// sees the live version, and tell the owner (a persisted snapshot is no longer true).
    async fn object_changed(&self, object: &str) {
        tracing::warn!(
            object,
            "object changed under the mount; its open handles get ESTALE"
        );
        self.tree_changed();
        if let Ok(m) = self.client.stat(object).await {
            self.insert_meta(&m);
        }
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 0,
            files: self.inodes.len() as u64,
            bsize: 4096,
            namelen: crate::inode::NAME_MAX as u32,
        }
    }
}
