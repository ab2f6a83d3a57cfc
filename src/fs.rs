//! The async core of the filesystem: lookup, getattr, readdir, open, read, release, statfs.
//!
//! It knows nothing of FUSE: it takes inode numbers and handles and returns plain structs or
//! an [`FsError`], so unit tests drive it with the fake client and the `fuse` adapter only
//! translates. Anything that may touch the network is `async`; the rest answers from memory.

pub mod bulk;
pub mod error;
pub mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

/// A block being fetched; clones await the same request.
type SharedFetch = Shared<BoxFuture<'static, Result<Block, crate::client::ClientError>>>;

use crate::cache::{Block, BlockCache, BlockKey};
use crate::client::{ClientError, ListRequest, ObjectClient, ObjectVersion, list_all};
use crate::inode::{FileInfo, Ino, InodeTable, Kind, Lookup, NodeView, ROOT};
use crate::prefetch::Readahead;
pub use error::FsError;
use verify::{Verdict, Verifier};

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
    /// Read-ahead window of a sequential reader: first size, and the cap it doubles up to.
    pub readahead_min: u64,
    pub readahead_max: u64,
    /// Largest single ranged GET; longer runs are split so they proceed in parallel.
    pub max_request: u64,
    /// Objects up to this size are fetched whole, in one request, on a read at offset 0.
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
}

#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: Kind,
    pub name: Arc<str>,
    /// Present for everything but `.` and `..` (readdirplus needs it).
    pub attr: Attr,
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

/// Counters of the read path (request counters live in the client).
#[derive(Debug, Default)]
pub struct FsStats {
    pub read_bytes: AtomicU64,
    pub prefetch_bytes: AtomicU64,
    /// Handles that served a whole object whose bytes matched its CRC32C.
    pub objects_verified: AtomicU64,
    /// Whole objects served in pieces whose CRC32C did not match (the read failed with EIO).
    pub verify_failures: AtomicU64,
    /// Files fetched before they were opened (`FsConfig::next_files`).
    pub files_prefetched: AtomicU64,
}

/// Fetches in flight, by block (hashed on every block a read touches: foldhash, not SipHash).
type InflightMap = HashMap<BlockKey, SharedFetch, foldhash::fast::RandomState>;

/// What a read returned, for `Fs::served`.
pub struct Served {
    handle: Arc<Handle>,
    offset: u64,
    end: u64,
}

/// An open file: the object version it reads, fixed at open.
struct Handle {
    ino: Ino,
    object: Arc<str>,
    info: FileInfo,
    readahead: Mutex<Readahead>,
    /// Checks the bytes this handle serves against the object's CRC32C (None without one).
    verifier: Mutex<Option<Verifier>>,
    /// Bytes served through this handle failed the CRC32C: every later read fails too (the
    /// kernel may retry a failed read-ahead page with a plain read, which must not succeed).
    poisoned: std::sync::atomic::AtomicBool,
    /// A read through this handle reached the end of the object.
    finished: std::sync::atomic::AtomicBool,
}

impl Handle {
    /// The cache key of block `index` of this handle's object version.
    fn key(&self, index: u64) -> BlockKey {
        BlockKey {
            object: self.object.clone(),
            generation: self.info.generation,
            index,
        }
    }

    fn version(&self) -> ObjectVersion<'_> {
        ObjectVersion {
            name: &self.object,
            generation: self.info.generation,
            size: self.info.size,
            crc32c: self.info.crc32c,
        }
    }
}

pub struct Fs {
    cfg: FsConfig,
    client: Arc<dyn ObjectClient>,
    cache: Arc<dyn BlockCache>,
    inodes: InodeTable,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    dir_handles: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_handle: AtomicU64,
    /// One listing per directory at a time; latecomers wait for it and reuse its result.
    list_locks: Mutex<HashMap<Ino, Arc<tokio::sync::Mutex<()>>>>,
    mount_time: SystemTime,
    /// Permits of one block each for read-ahead in flight (see `FsConfig::prefetch_budget`).
    prefetch_permits: Arc<tokio::sync::Semaphore>,
    /// Blocks being fetched now, each a shared future, so concurrent readers of a block (and
    /// read-ahead) cause one request.
    inflight: Arc<Mutex<InflightMap>>,
    stats: FsStats,
    /// Files whose served bytes failed their CRC32C: their next open drops the page cache.
    suspect: Mutex<std::collections::HashSet<Ino>>,
    /// While a bulk load runs, lookups in directories it has not finished are answered by a
    /// targeted request instead of a listing of the whole parent.
    bulk_loading: std::sync::atomic::AtomicBool,
    /// Signalled after each page of the bulk load (and at its end), for readdirs waiting for
    /// the load to reach their directory.
    bulk_progress: tokio::sync::Notify,
    /// Called when an object is seen to have changed under the mount (snapshot invalidation).
    #[allow(clippy::type_complexity)]
    on_change: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Which files readers are expected to read next (see `file_finished`).
    walk: Mutex<Walk>,
    /// How much readers read big objects whole lately: +1 for each read to its end, -2 for
    /// each closed before (a header scan, a random reader), within 0..=WHOLE_MAX. From
    /// WHOLE_TRUST on, a new open's first read at offset 0 starts with a wide read-ahead
    /// window instead of growing one over several round trips (see `Readahead::warm`).
    whole_readers: std::sync::atomic::AtomicU32,
}

const WHOLE_MAX: u32 = 8;
const WHOLE_TRUST: u32 = 4;

/// Readers going through files in key order. A file read to its end that one of the last
/// `RECENT` finished files predicted (it is among their next `next_files + 8` files) scores a
/// hit, any other a miss; once hits outweigh misses (a score of 3: the fourth file in a row),
/// the files after each finished one are fetched before they are opened. Parallel readers
/// that finish files a little out of order still score, while a shuffled epoch (a DataLoader)
/// hits only by chance, at most `RECENT * window / files` of the time, and a header scan never
/// reads to the end at all.
#[derive(Default)]
struct Walk {
    /// Successors of the last `RECENT` finished files, oldest first.
    recent: std::collections::VecDeque<Vec<Ino>>,
    /// The last files read to their end: never fetched ahead again (the reader may be done
    /// with a file before the note that the previous one finished is taken).
    done: std::collections::VecDeque<Ino>,
    score: u32,
}

const RECENT: usize = 8;

impl Fs {
    pub fn new(cfg: FsConfig, client: Arc<dyn ObjectClient>, cache: Arc<dyn BlockCache>) -> Self {
        let inodes = InodeTable::new(cfg.metadata_ttl);
        let permits = (cfg.prefetch_budget / cfg.block_size.max(1)) as usize;
        Fs {
            cfg,
            client,
            cache,
            inodes,
            handles: Mutex::default(),
            dir_handles: Mutex::default(),
            next_handle: AtomicU64::new(1),
            list_locks: Mutex::default(),
            mount_time: SystemTime::now(),
            prefetch_permits: Arc::new(tokio::sync::Semaphore::new(permits)),
            inflight: Arc::default(),
            stats: FsStats::default(),
            suspect: Mutex::default(),
            bulk_loading: Default::default(),
            bulk_progress: Default::default(),
            on_change: Mutex::default(),
            walk: Mutex::default(),
            whole_readers: Default::default(),
        }
    }

    /// Registers what to do when an object is found changed under the mount.
    pub fn set_on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.on_change.lock().unwrap() = Some(Box::new(f));
    }

    pub fn stats(&self) -> &FsStats {
        &self.stats
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
        &self.cache
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
            },
        }
    }

    /// Lists directory `dir` (all pages) into the inode table, once.
    async fn ensure_listed(&self, dir: Ino) -> Result<(), FsError> {
        if self.inodes.is_listed(dir) {
            return Ok(());
        }
        let lock = self
            .list_locks
            .lock()
            .unwrap()
            .entry(dir)
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if self.inodes.is_listed(dir) {
            return Ok(());
        }
        let dir_rel = self.inodes.rel_path(dir);
        let prefix = format!("{}{}", self.cfg.prefix, dir_rel);
        let req = ListRequest {
            prefix: prefix.clone(),
            delimiter: Some("/".into()),
            max_results: Some(1000),
            ..Default::default()
        };
        let page = list_all(self.client.as_ref(), &req)
            .await
            .inspect_err(|e| {
                tracing::warn!(prefix = %prefix, error = %e, "listing failed");
            })?;
        let mut present = std::collections::HashSet::new();
        for p in &page.prefixes {
            let Some(rel) = p.strip_prefix(&self.cfg.prefix) else {
                continue;
            };
            match self.inodes.insert_dir(rel) {
                Ok(_) => {
                    present.insert(leaf_name(rel).to_string());
                }
                Err(why) => tracing::warn!(prefix = %p, "skipping directory: {why}"),
            }
        }
        for m in &page.items {
            if m.name.strip_prefix(&self.cfg.prefix) == Some(dir_rel.as_str()) {
                // The placeholder object of this very directory.
                continue;
            }
            if let Some((_, rel)) = self.insert_meta(m) {
                present.insert(leaf_name(rel).to_string());
            }
        }
        let present: std::collections::HashSet<&str> = present.iter().map(|s| s.as_str()).collect();
        self.inodes.prune_children(dir, &present);
        self.inodes.mark_listed(dir);
        self.list_locks.lock().unwrap().remove(&dir);
        Ok(())
    }

    pub async fn lookup(&self, parent: Ino, name: &str) -> Result<Attr, FsError> {
        let mut asked = false;
        loop {
            match self.lookup_cached(parent, name) {
                Some(r) => return r,
                None if asked => return Err(FsError::NotFound),
                None => {
                    if self.bulk_loading.load(Ordering::Relaxed) {
                        self.targeted_lookup(parent, name).await?;
                    } else {
                        self.ensure_listed(parent).await?;
                    }
                    asked = true;
                }
            }
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
            Lookup::Absent => Some(Err(FsError::NotFound)),
            Lookup::NotDir => Some(Err(FsError::NotDir)),
            Lookup::Unknown => None,
        }
    }

    /// Finds one name without listing its parent: the object itself and the first entry
    /// under `name/`, asked concurrently (one round trip).
    async fn targeted_lookup(&self, parent: Ino, name: &str) -> Result<(), FsError> {
        if crate::inode::invalid_component(name).is_some() {
            return Ok(());
        }
        let key = format!(
            "{}{}{}",
            self.cfg.prefix,
            self.inodes.rel_path(parent),
            name
        );
        let dir_req = ListRequest {
            prefix: format!("{key}/"),
            max_results: Some(1),
            ..Default::default()
        };
        let (obj, under) = tokio::join!(self.client.stat(&key), self.client.list_page(&dir_req));
        if let Ok(p) = &under
            && (!p.items.is_empty() || !p.prefixes.is_empty())
        {
            let _ = self
                .inodes
                .insert_dir(&dir_req.prefix[self.cfg.prefix.len()..]);
            return Ok(());
        }
        match obj {
            Ok(m) => {
                self.insert_meta(&m);
                Ok(())
            }
            Err(crate::client::ClientError::NotFound(_)) => {
                under.map(|_| ()).map_err(FsError::from)
            }
            Err(e) => Err(e.into()),
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

    /// Calls `add(next_offset, entry)` for the entries of a listed directory from index
    /// `offset` on (`.`, `..`, then children in name order) until it returns true (the reply
    /// is full). Answers from the inode table without copying the directory, which matters
    /// when a tree walk reads ~300,000 directories. None when the directory needs a listing
    /// first (or is not a directory).
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
        for (name, attr) in dots.into_iter().skip(offset as usize) {
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
        let skip = offset.saturating_sub(2) as usize;
        self.inodes.visit_children(ino, skip, &mut |name, child| {
            next += 1;
            let e = EntryRef {
                ino: child.ino,
                kind: child.kind,
                name,
                attr: self.attr_of(&child),
            };
            add(next, e)
        })
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
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
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
        let info = v.file.expect("a file node has file info");
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(self.new_handle(ino, info));
        self.handles.lock().unwrap().insert(fh, h);
        Ok(fh)
    }

    fn new_handle(&self, ino: Ino, info: FileInfo) -> Handle {
        let size = info.size;
        Handle {
            ino,
            verifier: Mutex::new(info.crc32c.map(|c| Verifier::new(c, info.size))),
            poisoned: Default::default(),
            finished: Default::default(),
            object: Arc::from(format!("{}{}", self.cfg.prefix, self.inodes.rel_path(ino))),
            info,
            readahead: Mutex::new({
                let r = Readahead::new(self.cfg.readahead_min, self.cfg.readahead_max)
                    .aligned(self.cfg.max_request);
                if size > self.cfg.small_object
                    && self.whole_readers.load(Ordering::Relaxed) >= WHOLE_TRUST
                {
                    r.warm(self.cfg.readahead_max / 4)
                } else {
                    r
                }
            }),
        }
    }

    /// File `ino` was read to its end: note it, and when readers are going through files in
    /// key order, fetch the next ones (see `Walk`).
    fn file_finished(&self, ino: Ino) {
        let n = self.cfg.next_files;
        if n == 0 {
            return;
        }
        let next = self.inodes.next_files(ino, n + 8);
        let ahead: Vec<Ino> = {
            let mut w = self.walk.lock().unwrap();
            let hit = w.recent.iter().any(|succ| succ.contains(&ino));
            w.score = if hit {
                (w.score + 1).min(8)
            } else {
                w.score.saturating_sub(2)
            };
            if w.recent.len() == RECENT {
                w.recent.pop_front();
            }
            w.recent.push_back(next.clone());
            if w.done.len() == 64 {
                w.done.pop_front();
            }
            w.done.push_back(ino);
            if w.score < 3 {
                return;
            }
            // Not the ones read already.
            let done = &w.done;
            next.iter()
                .take(n)
                .copied()
                .filter(|f| !done.contains(f))
                .collect()
        };
        let open: std::collections::HashSet<Ino> = self
            .handles
            .lock()
            .unwrap()
            .values()
            .map(|h| h.ino)
            .collect();
        for f in ahead {
            if open.contains(&f) {
                continue; // being read now
            }
            let Some(info) = self.inodes.get(f).and_then(|v| v.file) else {
                continue;
            };
            if info.size == 0 {
                continue;
            }
            let bs = self.cfg.block_size;
            // The first request's worth: a JPG whole (one CRC-checked GET), a DICOM's start.
            let last = (info.size - 1) / bs;
            let h = Arc::new(self.new_handle(f, info));
            let last = last.min(self.cfg.max_request / bs - 1);
            if self.prefetch(&h, 0, last) > 0 {
                self.stats.files_prefetched.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn release(&self, fh: u64) {
        let h = self.handles.lock().unwrap().remove(&fh);
        // A big object closed before its end, after reading some of it: not a whole-file
        // reader (a header scan, a random reader).
        if let Some(h) = h
            && h.info.size > self.cfg.small_object
            && !h.finished.load(Ordering::Relaxed)
            && h.readahead.lock().unwrap().reads() > 0
        {
            let _ = self
                .whole_readers
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(2))
                });
        }
    }

    /// Reads up to `size` bytes at `offset`. Returns fewer only at end of file.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        Ok(self.read_for_kernel(fh, offset, size).await?.0)
    }

    /// `read`, plus a token for `served` once the bytes are delivered. The token keeps the
    /// handle's identity: the kernel may release the handle before `served` runs (a reader
    /// that got the end of a file closes it at once).
    pub async fn read_for_kernel(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<(Bytes, Served), FsError> {
        let h = self
            .handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        if h.poisoned.load(Ordering::Relaxed) {
            return Err(FsError::Client(ClientError::Interrupted(format!(
                "{}: bytes served through this handle failed their CRC32C; reopen the file",
                h.object
            ))));
        }
        let file_size = h.info.size;
        if offset >= file_size || size == 0 {
            let served = Served {
                handle: h,
                offset,
                end: offset,
            };
            return Ok((Bytes::new(), served));
        }
        let end = (offset + size as u64).min(file_size);
        let bs = self.cfg.block_size;

        // What to fetch is decided, and registered in flight, under the handle's read-ahead
        // lock: the kernel sends a reader's pieces concurrently, and a piece registering its
        // own fetch between another's decision and registration would split a whole-object
        // fetch in two.
        let (first, last) = (offset / bs, (end - 1) / bs);
        let waits = {
            let mut r = h.readahead.lock().unwrap();
            let first_read = r.reads() == 0;
            // Read-ahead first, so its requests are on the wire while we wait for ours.
            let ahead = r.on_read(offset, end, file_size);
            if !ahead.is_empty() {
                self.prefetch(&h, ahead.start / bs, (ahead.end - 1) / bs);
            }
            // A small object is fetched whole, in one request, by a read from its start or
            // by the first read of an open (the kernel sends a whole-file reader's first
            // 1 MiB pieces at once, and the one at 1 MiB may come first). The blocks this read
            // does not need are fetched like read-ahead: only missing ones, in the background.
            if file_size <= self.cfg.small_object && (offset == 0 || first_read) {
                let started = self.fetch_blocks(&h, 0, (file_size - 1) / bs, false);
                if !started.is_empty() {
                    tokio::spawn(async move {
                        for w in started {
                            let _ = w.await;
                        }
                    });
                }
            }
            self.fetch_blocks(&h, first, last, true)
        };
        let mut blocks = Vec::with_capacity(waits.len());
        for w in waits {
            match w.await {
                Ok(b) => blocks.push(b),
                Err(e) => {
                    tracing::warn!(object = %h.object, generation = h.info.generation, error = %e, "read failed");
                    let e = FsError::Client(e);
                    if e.errno() == libc::ESTALE {
                        self.object_changed(&h.object).await;
                    }
                    return Err(e);
                }
            }
        }
        let start = (offset - first * bs) as usize;
        let len = (end - offset) as usize;
        let data = if blocks.windows(2).all(|w| w[0].followed_by(&w[1])) {
            // All from one GET's buffer (the usual case): one slice of it, no copy.
            blocks[0].slice_on(start, start + len)
        } else {
            let mut out = BytesMut::with_capacity((end - offset) as usize);
            for (i, b) in (first..=last).zip(blocks) {
                let bstart = i * bs;
                let from = offset.max(bstart) - bstart;
                let to = end.min(bstart + b.len() as u64) - bstart;
                out.extend_from_slice(&b.as_slice()[from as usize..to as usize]);
            }
            out.freeze()
        };
        self.verify(&h, offset, &data).await?;
        self.stats
            .read_bytes
            .fetch_add(end - offset, Ordering::Relaxed);
        if end == file_size
            && file_size > self.cfg.small_object
            && !h.finished.swap(true, Ordering::Relaxed)
        {
            let _ = self
                .whole_readers
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some((v + 1).min(WHOLE_MAX))
                });
        }
        if end == file_size {
            // Noted before the reader gets the bytes, so it cannot have opened the next file
            // yet (and read it, which read-ahead would then fetch a second time).
            self.file_finished(h.ino);
        }
        let served = Served {
            handle: h,
            offset,
            end,
        };
        Ok((data, served))
    }

    /// The reply to a buffered read was delivered, so the kernel's page cache now holds its
    /// bytes (objects are immutable per generation and opened with FOPEN_KEEP_CACHE, so it
    /// keeps them across opens). The blocks the read covered whole are dropped from our cache:
    /// keeping a second copy would only double the memory a streaming reader uses, and
    /// dropping it lets the receive buffer it came in be reused at once (`client::pool`)
    /// instead of faulting in fresh memory for every request. Blocks read only in part stay,
    /// for the read that wants the rest. (O_DIRECT reads skip this: they bypass the page cache.)
    pub async fn served(&self, s: Served) {
        let (size, bs) = (s.handle.info.size, self.cfg.block_size);
        // Whole blocks: from the first starting in the range to the last ending in it (the
        // tail block ends at the end of the object).
        let end = if s.end == size {
            size.div_ceil(bs)
        } else {
            s.end / bs
        };
        self.drop_blocks(&s.handle, s.offset.div_ceil(bs)..end)
            .await;
    }

    /// Removes blocks `blocks` of `h`'s object version from the cache.
    async fn drop_blocks(&self, h: &Handle, blocks: std::ops::Range<u64>) {
        for index in blocks {
            self.cache.remove(&h.key(index)).await;
        }
    }

    /// Feeds served bytes to the handle's CRC32C check. A mismatch fails this read and every
    /// later one on the handle with EIO, and drops the object's cached blocks and its kernel
    /// page cache (at the next open), so a new open fetches and checks the file afresh.
    async fn verify(&self, h: &Arc<Handle>, offset: u64, data: &[u8]) -> Result<(), FsError> {
        let verdict = {
            let mut v = h.verifier.lock().unwrap();
            match v.as_mut() {
                Some(v) => v.feed(offset, data),
                None => return Ok(()),
            }
        };
        match verdict {
            Verdict::Verified => {
                self.stats.objects_verified.fetch_add(1, Ordering::Relaxed);
                // Count each handle once.
                *h.verifier.lock().unwrap() = None;
                Ok(())
            }
            Verdict::Mismatch(got) => {
                self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                let want = h.info.crc32c.unwrap_or_default();
                tracing::error!(
                    object = %h.object,
                    generation = h.info.generation,
                    "CRC32C of the {} bytes served is {got:08x}, the listing says {want:08x}: \
                     read fails with EIO and the cached copy is dropped",
                    h.info.size
                );
                self.drop_blocks(h, 0..h.info.size.div_ceil(self.cfg.block_size))
                    .await;
                self.suspect.lock().unwrap().insert(h.ino);
                h.poisoned.store(true, Ordering::Relaxed);
                Err(FsError::Client(ClientError::Interrupted(format!(
                    "{}: CRC32C mismatch over the whole object",
                    h.object
                ))))
            }
            Verdict::Pending | Verdict::GaveUp => Ok(()),
        }
    }

    /// Whether the kernel may keep its page cache for `ino` across opens: yes, unless bytes
    /// of it failed their checksum since (then this open drops the kernel's copy, once).
    pub fn keep_cache(&self, ino: Ino) -> bool {
        !self.suspect.lock().unwrap().remove(&ino)
    }

    /// Fetches blocks `first..=last` ahead of the reader within the read-ahead budget.
    ///
    /// Requests are cut at multiples of `max_request` in the object, and read-ahead windows
    /// end on such a multiple: a streaming reader then fetches the object in identical
    /// full-size pieces, whose receive buffers are recycled (`client::pool`) instead of being
    /// mapped, faulted in and zeroed afresh for every request.
    /// Returns how many blocks it asked for (cached and in-flight ones are skipped).
    fn prefetch(&self, h: &Arc<Handle>, first: u64, last: u64) -> u64 {
        let bs = self.cfg.block_size;
        let per_request = (self.cfg.max_request / bs).max(1);
        let mut start = first;
        let mut asked = 0;
        while start <= last {
            let stop = ((start / per_request + 1) * per_request - 1).min(last);
            let n = (stop - start + 1) as u32;
            let Ok(permit) = self.prefetch_permits.clone().try_acquire_many_owned(n) else {
                return asked; // over budget: the reader will fetch on demand
            };
            let waits = self.fetch_blocks(h, start, stop, false);
            asked += waits.len() as u64;
            self.stats
                .prefetch_bytes
                .fetch_add(waits.len() as u64 * bs, Ordering::Relaxed);
            tokio::spawn(async move {
                // A failed read-ahead is not an error: the reader will fetch (and report) it.
                for w in waits {
                    let _ = w.await;
                }
                drop(permit);
            });
            start = stop + 1;
        }
        asked
    }

    /// Futures for blocks `first..=last`: cached ones resolve at once, blocks being fetched
    /// join that fetch, and each run of the rest is fetched with one ranged GET (split at
    /// `max_request`). With `demand` false, cached blocks are skipped (read-ahead).
    fn fetch_blocks(
        &self,
        h: &Arc<Handle>,
        first: u64,
        last: u64,
        demand: bool,
    ) -> Vec<SharedFetch> {
        let key = |index| h.key(index);
        let bs = self.cfg.block_size;
        let per_request = (self.cfg.max_request / bs).max(1);
        let mut out = Vec::new();
        let mut inflight = self.inflight.lock().unwrap();
        let mut run: Option<u64> = None; // start of the current run of missing blocks
        let mut i = first;
        while i <= last + 1 {
            let missing = i <= last && {
                let k = key(i);
                if let Some(f) = inflight.get(&k) {
                    if demand {
                        out.push((i, f.clone()));
                    }
                    false
                } else if self.cache.contains(&k) {
                    if demand {
                        let cache = self.cache.clone();
                        let (k2, obj) = (k.clone(), h.clone());
                        let (client, size) = (self.client.clone(), h.info.size);
                        // Evicted between the check and the get: fetch that one block.
                        let f = async move {
                            match cache.get(&k2).await {
                                Some(b) => Ok(b),
                                None => {
                                    let s = k2.index * bs;
                                    client
                                        .get_range(obj.version(), s, (s + bs).min(size))
                                        .await
                                        .map(Block::whole)
                                }
                            }
                        };
                        out.push((i, f.boxed().shared()));
                    }
                    false
                } else {
                    true
                }
            };
            match (missing, run) {
                (true, None) => run = Some(i),
                (true, Some(s)) if i - s == per_request => {
                    out.extend(self.start_fetch(h, s, i - 1, &mut inflight));
                    run = Some(i);
                }
                (false, Some(s)) => {
                    out.extend(self.start_fetch(h, s, i - 1, &mut inflight));
                    run = None;
                }
                _ => {}
            }
            i += 1;
        }
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, f)| f).collect()
    }

    /// Registers one GET for blocks `a..=b` and returns a future per block.
    fn start_fetch(
        &self,
        h: &Arc<Handle>,
        a: u64,
        b: u64,
        inflight: &mut InflightMap,
    ) -> Vec<(u64, SharedFetch)> {
        let bs = self.cfg.block_size;
        let size = h.info.size;
        let (start, end) = (a * bs, ((b + 1) * bs).min(size));
        let (client, cache, registry) = (
            self.client.clone(),
            self.cache.clone(),
            self.inflight.clone(),
        );
        let h2 = h.clone();
        let block = move |data: &Bytes, i: u64| {
            let from = ((i - a) * bs) as usize;
            let to = (from + bs as usize).min(data.len());
            Block::new(data.clone(), from, to - from)
        };
        let span = async move {
            let r = client.get_range(h2.version(), start, end).await;
            if let Ok(data) = &r {
                for i in a..=b {
                    cache.insert(h2.key(i), block(data, i)).await;
                }
            }
            let mut m = registry.lock().unwrap();
            for i in a..=b {
                m.remove(&h2.key(i));
            }
            r
        }
        .boxed()
        .shared();
        (a..=b)
            .map(|i| {
                let f: SharedFetch = span
                    .clone()
                    .map(move |r| r.map(|d| block(&d, i)))
                    .boxed()
                    .shared();
                inflight.insert(h.key(i), f.clone());
                (i, f)
            })
            .collect()
    }

    /// A pinned read found the object gone or replaced: refresh its entry so the next open
    /// sees the live version, and tell the owner (a persisted snapshot is no longer true).
    async fn object_changed(&self, object: &str) {
        tracing::warn!(
            object,
            "object changed under the mount; its open handles get ESTALE"
        );
        if let Some(f) = self.on_change.lock().unwrap().as_ref() {
            f();
        }
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

/// Last component of a relative path (`a/b/` → `b`, `a/c` → `c`).
fn leaf_name(rel: &str) -> &str {
    let t = rel.strip_suffix('/').unwrap_or(rel);
    t.rsplit('/').next().unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MemoryCache;
    use crate::client::ClientError;
    use crate::client::fake::FakeClient;

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn setup(prefix: &str) -> (Arc<FakeClient>, Fs) {
        let c = Arc::new(FakeClient::new("b").with_page_cap(7));
        c.put("top.txt", "hello");
        c.put("empty", "");
        c.put("big.bin", data(5 * 1024 * 1024 + 123, 1));
        for i in 0..25 {
            c.put(&format!("dir/many/f{i:03}"), data(10, i as u8));
        }
        c.put("dir/placeholder/", "");
        c.put("dir/sub/x", "x");
        let cfg = FsConfig {
            prefix: prefix.into(),
            block_size: 1 << 20,
            ..Default::default()
        };
        let fs = Fs::new(cfg, c.clone(), Arc::new(MemoryCache::new(64 << 20)));
        (c, fs)
    }

    async fn path(fs: &Fs, p: &str) -> Result<Attr, FsError> {
        let mut ino = ROOT;
        let mut a = fs.getattr(ROOT)?;
        for comp in p.split('/').filter(|c| !c.is_empty()) {
            a = fs.lookup(ino, comp).await?;
            ino = a.ino;
        }
        Ok(a)
    }

    #[tokio::test]
    async fn lookup_and_readdir_page_through_listings() {
        let (c, fs) = setup("");
        let many = path(&fs, "dir/many").await.unwrap();
        assert_eq!(many.kind, Kind::Dir);
        let before = c.list_calls.load(Ordering::Relaxed);
        let fh = fs.opendir(many.ino).await.unwrap();
        let names: Vec<_> = fs
            .readdir(fh)
            .unwrap()
            .iter()
            .map(|e| e.name.to_string())
            .collect();
        assert_eq!(names.len(), 27);
        assert_eq!(&names[..3], [".", "..", "f000"]);
        // 25 entries at 7 per page: 4 pages
        assert_eq!(c.list_calls.load(Ordering::Relaxed) - before, 4);
        // listed once: a second opendir and lookups cost nothing
        let fh2 = fs.opendir(many.ino).await.unwrap();
        fs.lookup(many.ino, "f007").await.unwrap();
        assert!(matches!(
            fs.lookup(many.ino, "nope").await,
            Err(FsError::NotFound)
        ));
        assert_eq!(c.list_calls.load(Ordering::Relaxed) - before, 4);
        fs.releasedir(fh);
        fs.releasedir(fh2);
        // placeholder object is a directory
        assert_eq!(path(&fs, "dir/placeholder").await.unwrap().kind, Kind::Dir);
        assert!(matches!(path(&fs, "top.txt/x").await, Err(FsError::NotDir)));
    }

    #[tokio::test]
    async fn entries_from_pages_by_offset_without_io() {
        let (c, fs) = setup("");
        let many = path(&fs, "dir/many").await.unwrap();
        let all: Vec<String> = fs
            .entries(many.ino)
            .await
            .unwrap()
            .iter()
            .map(|e| e.name.to_string())
            .collect();
        let before = c.requests();
        // Pages of 5, each resumed at the offset the previous page handed out.
        let (mut got, mut offset) = (Vec::new(), 0);
        loop {
            let mut page = Vec::new();
            fs.entries_from(many.ino, offset, |next, e| {
                if page.len() == 5 {
                    return true;
                }
                page.push(e.name.to_string());
                offset = next;
                false
            })
            .unwrap();
            if page.is_empty() {
                break;
            }
            got.extend(page);
        }
        assert_eq!(got, all);
        assert_eq!(&got[..3], [".", "..", "f000"]);
        assert_eq!(c.requests(), before);
        // A directory not listed yet needs a listing: None.
        let sub = path(&fs, "dir").await.unwrap();
        let d = fs.lookup(sub.ino, "sub").await.unwrap();
        assert!(fs.entries_from(d.ino, 0, |_, _| false).is_none());
        assert!(fs.lookup_cached(d.ino, "x").is_none());
    }

    #[tokio::test]
    async fn reads_ranges_exactly() {
        let (_c, fs) = setup("");
        let src = data(5 * 1024 * 1024 + 123, 1);
        let a = path(&fs, "big.bin").await.unwrap();
        assert_eq!(a.size, src.len() as u64);
        let fh = fs.open(a.ino, false).unwrap();
        let mut rng = 12345u64;
        for _ in 0..200 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (rng >> 16) % (src.len() as u64 + 10);
            let len = ((rng >> 40) % (3 << 20)) as u32;
            let got = fs.read(fh, off, len).await.unwrap();
            let s = (off as usize).min(src.len());
            let e = (off as usize + len as usize).min(src.len());
            assert_eq!(&got[..], &src[s..e], "off {off} len {len}");
        }
        // last byte, past EOF, 0-byte file
        let last = fs.read(fh, src.len() as u64 - 1, 10).await.unwrap();
        assert_eq!(&last[..], &src[src.len() - 1..]);
        assert!(fs.read(fh, src.len() as u64, 10).await.unwrap().is_empty());
        let e = path(&fs, "empty").await.unwrap();
        let fh0 = fs.open(e.ino, false).unwrap();
        assert!(fs.read(fh0, 0, 4096).await.unwrap().is_empty());
        assert!(matches!(fs.open(e.ino, true), Err(FsError::ReadOnly)));
        let d = path(&fs, "dir").await.unwrap();
        assert!(matches!(fs.open(d.ino, false), Err(FsError::IsDir)));
    }

    /// Reads `rel` whole through the kernel path (`read_for_kernel` + `served`), in 1 MiB reads.
    async fn read_whole(fs: &Fs, rel: &str) -> Vec<u8> {
        let a = path(fs, rel).await.unwrap();
        let fh = fs.open(a.ino, false).unwrap();
        let mut out = Vec::new();
        loop {
            let (d, s) = fs
                .read_for_kernel(fh, out.len() as u64, 1 << 20)
                .await
                .unwrap();
            fs.served(s).await;
            if d.is_empty() {
                break;
            }
            out.extend_from_slice(&d);
        }
        fs.release(fh);
        out
    }

    /// The tree loaded up front, as a mount's eager load does (the walk follows loaded
    /// directories only).
    async fn loaded(fs: Fs) -> Arc<Fs> {
        let fs = Arc::new(fs);
        fs.bulk_load(&super::bulk::BulkOptions::default())
            .await
            .unwrap();
        fs
    }

    /// An `Fs` on `c` with `cfg` and a 64 MiB cache, its tree loaded.
    async fn loaded_with(c: &Arc<FakeClient>, cfg: FsConfig) -> Arc<Fs> {
        loaded(Fs::new(
            cfg,
            c.clone(),
            Arc::new(MemoryCache::new(64 << 20)),
        ))
        .await
    }

    /// Settles spawned read-ahead tasks.
    async fn settle(fs: &Fs) {
        for _ in 0..100 {
            if fs.inflight.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn whole_file_readers_get_read_ahead_from_their_first_read() {
        let c = Arc::new(FakeClient::new("b"));
        let size = 6_000_000;
        let names: Vec<String> = (0..8).map(|i| format!("d/{i}.dcm")).collect();
        for (i, n) in names.iter().enumerate() {
            c.put(n, data(size, i as u8));
        }
        let cfg = FsConfig {
            next_files: 0,
            ..Default::default()
        };
        let fs = loaded_with(&c, cfg).await;
        let ahead = || fs.stats().prefetch_bytes.load(Ordering::Relaxed);
        // The first read of a file: fetches only itself while nothing is known.
        let first_read = |i: usize| {
            let fs = &fs;
            let name = names[i].clone();
            async move {
                let ino = path(fs, &name).await.unwrap().ino;
                let fh = fs.open(ino, false).unwrap();
                let (d, s) = fs.read_for_kernel(fh, 0, 16384).await.unwrap();
                assert_eq!(&d[..], &data(size, i as u8)[..16384]);
                fs.served(s).await;
                fh
            }
        };
        let before = ahead();
        let fh = first_read(0).await;
        assert_eq!(ahead(), before, "a first read alone reads nothing ahead");
        fs.release(fh);
        // Four files read whole ...
        for (i, n) in names.iter().enumerate().take(5).skip(1) {
            assert_eq!(read_whole(&fs, n).await, data(size, i as u8));
        }
        settle(&fs).await;
        // ... and the next open's first read fetches the rest of its file at once.
        let before = ahead();
        let fh = first_read(5).await;
        assert!(
            ahead() - before >= size as u64 - 65536,
            "read ahead {} of {size}",
            ahead() - before
        );
        fs.release(fh);
        settle(&fs).await;
        // That one was closed early (a header scan), like the next: trust is gone.
        let fh = first_read(6).await;
        fs.release(fh);
        settle(&fs).await;
        let before = ahead();
        let fh = first_read(7).await;
        assert_eq!(
            ahead(),
            before,
            "header scans: no read-ahead on a first read"
        );
        fs.release(fh);
    }

    #[tokio::test]
    async fn a_small_object_is_fetched_whole_whichever_piece_comes_first() {
        // The kernel sends a whole-file reader's 1 MiB pieces at once; the one at 1 MiB may
        // arrive first. Either way the object costs one request.
        let c = Arc::new(FakeClient::new("b"));
        let body = data(1_600_000, 7);
        c.put("img.jpg", body.clone());
        c.put("big.dcm", data(13_000_000, 9));
        let fs = loaded_with(&c, FsConfig::default()).await;
        let gets = || c.get_calls.load(Ordering::Relaxed);
        let ino = path(&fs, "img.jpg").await.unwrap().ino;
        let fh = fs.open(ino, false).unwrap();
        let (tail, _) = fs.read_for_kernel(fh, 1 << 20, 1 << 20).await.unwrap();
        assert_eq!(&tail[..], &body[1 << 20..]);
        let (head, _) = fs.read_for_kernel(fh, 0, 1 << 20).await.unwrap();
        assert_eq!(&head[..], &body[..1 << 20]);
        assert_eq!(gets(), 1, "one request for the whole object");
        settle(&fs).await;
        // A big object's first read still fetches only what it asks (a header scan).
        let ino = path(&fs, "big.dcm").await.unwrap().ino;
        let fh = fs.open(ino, false).unwrap();
        let (d, _) = fs.read_for_kernel(fh, 1 << 20, 16384).await.unwrap();
        let big = data(13_000_000, 9);
        assert_eq!(&d[..], &big[1 << 20..(1 << 20) + 16384]);
        assert_eq!(gets(), 2);
        let (d, _) = fs.read_for_kernel(fh, 0, 4096).await.unwrap();
        assert_eq!(&d[..], &big[..4096]);
        assert_eq!(gets(), 3, "the start of the big object was not fetched");
    }

    #[tokio::test]
    async fn files_read_in_key_order_are_fetched_before_they_are_opened() {
        let c = Arc::new(FakeClient::new("b"));
        let names: Vec<String> = (0..20)
            .map(|i| format!("walk/p1{}/s{i:02}/img.jpg", i / 10))
            .collect();
        for (i, n) in names.iter().enumerate() {
            c.put(n, data(100_000 + i, i as u8));
            c.put(&format!("walk/p1{}/s{i:02}.txt", i / 10), "report");
        }
        // A bigger set for the shuffled epoch: a window of successors covers little of it.
        let many: Vec<String> = (0..2000)
            .map(|i| format!("many/p{}/s{i:04}/img.jpg", i / 100))
            .collect();
        for n in &many {
            c.put(n, "x".repeat(100));
        }
        let cfg = FsConfig {
            next_files: 3,
            ..Default::default()
        };
        let fs = loaded_with(&c, cfg).await;
        let gets = || c.get_calls.load(Ordering::Relaxed);
        // Four files in order build the streak; from then on each next file was fetched
        // before its open, so reading it costs no request.
        for (i, n) in names.iter().enumerate().take(4) {
            assert_eq!(read_whole(&fs, n).await, data(100_000 + i, i as u8));
        }
        settle(&fs).await;
        assert_eq!(
            fs.stats().files_prefetched.load(Ordering::Relaxed),
            3,
            "files 5-7"
        );
        for (i, n) in names.iter().enumerate().skip(4) {
            let before = gets();
            assert_eq!(read_whole(&fs, n).await, data(100_000 + i, i as u8), "{n}");
            assert_eq!(
                gets(),
                before,
                "{n} was fetched ahead (across directories too)"
            );
            settle(&fs).await;
        }
        // Each file was fetched once: no report (.txt) and nothing twice.
        assert_eq!(gets(), 20);

        // Out of order (a shuffled epoch): no streak, nothing fetched ahead.
        let fs = loaded_with(&c, FsConfig::default()).await;
        let mut x = 7u64;
        for _ in 0..60 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            read_whole(&fs, &many[(x >> 33) as usize % many.len()]).await;
        }
        settle(&fs).await;
        assert_eq!(fs.stats().files_prefetched.load(Ordering::Relaxed), 0);

        // A header scan (first bytes of each file, in order) never reads to the end.
        let fs = loaded_with(&c, FsConfig::default()).await;
        for n in &names {
            let a = path(&fs, n).await.unwrap();
            let fh = fs.open(a.ino, false).unwrap();
            let (_, s) = fs.read_for_kernel(fh, 0, 16384).await.unwrap();
            fs.served(s).await;
            fs.release(fh);
        }
        settle(&fs).await;
        assert_eq!(fs.stats().files_prefetched.load(Ordering::Relaxed), 0);

        // --prefetch-files 0: never.
        let fs = loaded(Fs::new(
            FsConfig {
                next_files: 0,
                ..Default::default()
            },
            c.clone(),
            Arc::new(MemoryCache::new(64 << 20)),
        ))
        .await;
        for n in &names {
            read_whole(&fs, n).await;
        }
        settle(&fs).await;
        assert_eq!(fs.stats().files_prefetched.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn served_blocks_leave_the_cache_partial_ones_stay() {
        // 1 MiB blocks; big.bin is 5 MiB + 123 bytes.
        let (c, fs) = setup("");
        let a = path(&fs, "big.bin").await.unwrap();
        let fh = fs.open(a.ino, false).unwrap();
        let generation = fs.handles.lock().unwrap()[&fh].info.generation;
        let key = |index| BlockKey {
            object: Arc::from("big.bin"),
            generation,
            index,
        };
        let m = 1u64 << 20;
        let (got, served) = fs.read_for_kernel(fh, m / 2, (2 * m) as u32).await.unwrap();
        assert_eq!(got.len() as u64, 2 * m);
        for i in 0..=2 {
            assert!(
                fs.cache.contains(&key(i)),
                "block {i} cached after the read"
            );
        }
        // The kernel got bytes 0.5..2.5 MiB: only block 1 was covered whole.
        fs.served(served).await;
        assert!(fs.cache.contains(&key(0)));
        assert!(
            !fs.cache.contains(&key(1)),
            "a block served whole is dropped"
        );
        assert!(fs.cache.contains(&key(2)));
        // The tail block counts as whole when served up to the end of the object.
        let before = c.requests();
        let (tail, served) = fs.read_for_kernel(fh, 5 * m, 4096).await.unwrap();
        assert_eq!(tail.len(), 123);
        // ... even when the handle was released first (the reader closed the file).
        fs.release(fh);
        fs.served(served).await;
        assert!(!fs.cache.contains(&key(5)));
        // A dropped block read again (O_DIRECT, or after the kernel evicted it) is fetched
        // again, with the right bytes.
        let fh = fs.open(a.ino, false).unwrap();
        let again = fs.read(fh, m, m as u32).await.unwrap();
        assert_eq!(
            &again[..],
            &data(5 * 1024 * 1024 + 123, 1)[m as usize..2 * m as usize]
        );
        assert!(c.requests() > before);
    }

    #[tokio::test]
    async fn prefix_mounts_a_subtree() {
        let (_c, fs) = setup("dir/");
        let fh = fs.opendir(ROOT).await.unwrap();
        let names: Vec<_> = fs
            .readdir(fh)
            .unwrap()
            .iter()
            .map(|e| e.name.to_string())
            .collect();
        assert_eq!(names, [".", "..", "many", "placeholder", "sub"]);
        let x = path(&fs, "sub/x").await.unwrap();
        let h = fs.open(x.ino, false).unwrap();
        assert_eq!(&fs.read(h, 0, 10).await.unwrap()[..], b"x");
    }

    #[tokio::test]
    async fn errors_map_and_recover() {
        let (c, fs) = setup("");
        c.fail_next(
            1,
            ClientError::Denied {
                status: 403,
                message: "no".into(),
            },
        );
        let e = fs.lookup(ROOT, "top.txt").await.unwrap_err();
        assert_eq!(e.errno(), libc::EACCES);
        // the failed listing was not recorded as complete: the next lookup lists again
        let a = fs.lookup(ROOT, "top.txt").await.unwrap();
        let fh = fs.open(a.ino, false).unwrap();
        c.fail_next(
            1,
            ClientError::Network {
                endpoint: "e".into(),
                cause: "reset".into(),
            },
        );
        assert_eq!(fs.read(fh, 0, 5).await.unwrap_err().errno(), libc::EIO);
        assert_eq!(&fs.read(fh, 0, 5).await.unwrap()[..], b"hello");
        // object replaced under the mount: the open handle's generation is gone → ESTALE
        c.put("top.txt", "world");
        let fs2 = fs; // same mount
        let h2 = fh;
        let err = fs2.read(h2, 0, 5).await;
        // block 0 is cached from the earlier read of this generation: still the old bytes
        assert_eq!(&err.unwrap()[..], b"hello");
        let big = path(&fs2, "big.bin").await.unwrap();
        let hb = fs2.open(big.ino, false).unwrap();
        c.put("big.bin", "replaced");
        assert_eq!(fs2.read(hb, 0, 10).await.unwrap_err().errno(), libc::ESTALE);
    }

    #[tokio::test]
    async fn cached_blocks_cost_no_requests() {
        let (c, fs) = setup("");
        let a = path(&fs, "big.bin").await.unwrap();
        let fh = fs.open(a.ino, false).unwrap();
        let mut off = 0;
        while off < a.size {
            off += fs.read(fh, off, 128 * 1024).await.unwrap().len() as u64;
        }
        let gets = c.get_calls.load(Ordering::Relaxed);
        assert!(
            gets <= 6,
            "{gets} requests for 6 blocks: runs of blocks share a request"
        );
        let fh2 = fs.open(a.ino, false).unwrap();
        fs.read(fh2, 0, 4096).await.unwrap();
        fs.read(fh2, 3 << 20, 4096).await.unwrap();
        assert_eq!(c.get_calls.load(Ordering::Relaxed), gets);
    }
}
