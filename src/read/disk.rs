//! The disk tier: object bytes kept on local disk across unmounts, remounts and reboots.
//!
//! Layout under `--cache-dir DIR` (directories 0700, files 0600, never opened through a
//! symlink, refused when another user owns them or can write them):
//!
//! ```text
//! DIR/physiofs-cache-v1/lock              flock: one mount (or warm) at a time; says who
//! DIR/physiofs-cache-v1/journal           the index: append-only records, each with a CRC32C
//! DIR/physiofs-cache-v1/objects/XX/ID     one sparse file per object version, bytes at their offsets
//! ```
//!
//! The journal is the only thing read at start-up (no cached file is opened or stat'ed): an
//! object record (id, endpoint and bucket, name, generation, size, CRC32C) when a version is
//! first stored, a run record (id, first block, the CRC32C of each block) after each run of
//! blocks is written, a drop record when a version is evicted or found corrupt. Blocks are
//! written before the record that names them, and every block is checked against its CRC32C
//! before it is served, so a crash in the middle of a write (or a torn tail of the journal,
//! which start-up truncates) can lose data but never serve wrong bytes. An object whose every
//! block is present is *complete*; its block CRCs combined must equal the listed CRC32C, and
//! the first open of it in a mount reads it back whole and checks that again before it is
//! handed to the kernel for passthrough.
//!
//! Eviction is least-recently-used by object version, down to 95% of the bound once it is
//! exceeded. (For epochs larger than the cache LRU keeps the most recent files; a cyclic
//! reader gains nothing from any policy that cannot hold the whole epoch, so the bound should
//! be sized to the epoch.)

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::cache::Block;
use super::object::Object;

const MAGIC: &[u8; 16] = b"physiofs-cache1\n";
const OBJECT: u8 = 1;
const RUN: u8 = 2;
const DROP: u8 = 3;

/// Settings of the disk tier.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// `--cache-dir`.
    pub dir: PathBuf,
    /// Most bytes of object data kept (`--disk-cache-size`, resolved).
    pub capacity: u64,
    pub block_size: u64,
    /// Endpoint and bucket: with the object name and generation, the key of a version.
    pub namespace: String,
    /// Free bytes the filesystem must keep: nothing is written while it has fewer.
    pub reserve: u64,
}

/// Size and free bytes of the filesystem holding `dir`.
pub fn filesystem_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let f = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * f, st.f_bavail as u64 * f))
}

/// Counters of the disk tier.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Stored blocks or files whose bytes did not match their CRC32C (dropped, fetched again).
    pub corrupt: AtomicU64,
    pub evicted_objects: AtomicU64,
    /// Runs not written because the writer was behind (the bytes were served anyway).
    pub skipped_runs: AtomicU64,
}

/// What the index says about the tier, for `cache stats` and the start-up log line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskSummary {
    pub objects: u64,
    pub complete: u64,
    pub bytes: u64,
    pub journal_bytes: u64,
}

struct Entry {
    namespace: Arc<str>,
    name: Arc<str>,
    generation: i64,
    size: u64,
    crc32c: Option<u32>,
    /// CRC32C of each block; meaningful where `present`.
    crcs: Vec<u32>,
    present: Vec<bool>,
    n_present: u64,
    last_used: u64,
    /// Read back whole and checked in this process (before its first passthrough open).
    verified: bool,
}

impl Entry {
    fn blocks(&self) -> u64 {
        self.present.len() as u64
    }

    fn complete(&self) -> bool {
        self.n_present == self.blocks()
    }

    fn bytes(&self, bs: u64) -> u64 {
        if self.complete() {
            return self.size;
        }
        self.n_present * bs
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<u32, Entry>,
    /// Versions of this namespace, by (name, generation).
    by_key: HashMap<(Arc<str>, i64), u32>,
    next_id: u32,
    used: u64,
    tick: u64,
    journal_bytes: u64,
}

pub struct DiskCache {
    root: PathBuf,
    cfg: DiskConfig,
    namespace: Arc<str>,
    state: Mutex<State>,
    journal: Mutex<File>,
    /// Bytes queued for writing; beyond the cap, runs are skipped rather than queued.
    queued: AtomicU64,
    /// Bytes written since the filesystem's free space was last checked, and whether it had
    /// more than the reserve then.
    since_space_check: AtomicU64,
    space_ok: std::sync::atomic::AtomicBool,
    stats: DiskStats,
    _lock: File,
}

/// Bytes that may wait to be written before new runs are skipped.
const MAX_QUEUED: u64 = 256 << 20;

impl DiskCache {
    /// Opens (or creates) the tier under `cfg.dir`, taking its lock and reading the journal.
    /// `holder` says who holds the lock (shown to a second mount that is refused).
    pub fn open(cfg: DiskConfig, holder: &str) -> anyhow::Result<Self> {
        let root = cfg.dir.join("physiofs-cache-v1");
        private_dir(&cfg.dir, true)?;
        private_dir(&root, true)?;
        private_dir(&root.join("objects"), true)?;
        let lock = open_private(&root.join("lock"), true)?;
        // SAFETY: flock on an fd we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            let mut who = String::new();
            let _ = (&lock).read_to_string(&mut who);
            anyhow::bail!(
                "cache dir {} is in use by another physiofs ({}); use another --cache-dir, or stop that one first",
                cfg.dir.display(),
                who.trim()
            );
        }
        lock.set_len(0)?;
        lock.write_all_at(
            format!("pid {} {holder}\n", std::process::id()).as_bytes(),
            0,
        )?;
        let namespace: Arc<str> = Arc::from(cfg.namespace.as_str());
        let jpath = root.join("journal");
        let (state, journal) = replay(&jpath, cfg.block_size, &namespace)?;
        let cache = DiskCache {
            root,
            cfg,
            namespace,
            state: Mutex::new(state),
            journal: Mutex::new(journal),
            queued: AtomicU64::new(0),
            since_space_check: AtomicU64::new(u64::MAX / 2),
            space_ok: std::sync::atomic::AtomicBool::new(true),
            stats: DiskStats::default(),
            _lock: lock,
        };
        cache.compact_if_worth_it()?;
        Ok(cache)
    }

    pub fn stats(&self) -> &DiskStats {
        &self.stats
    }

    pub fn capacity(&self) -> u64 {
        self.cfg.capacity
    }

    pub fn summary(&self) -> DiskSummary {
        let st = self.state.lock().unwrap();
        DiskSummary {
            objects: st.entries.len() as u64,
            complete: st.entries.values().filter(|e| e.complete()).count() as u64,
            bytes: st.used,
            journal_bytes: st.journal_bytes,
        }
    }

    fn path_of(&self, id: u32) -> PathBuf {
        self.root
            .join("objects")
            .join(format!("{:02x}", id & 0xff))
            .join(format!("{id:08x}"))
    }

    fn lookup(&self, st: &State, obj: &Object) -> Option<u32> {
        st.by_key.get(&(obj.name.clone(), obj.generation)).copied()
    }

    /// Whether block `index` of `obj` is stored.
    pub fn contains(&self, obj: &Object, index: u64) -> bool {
        self.contains_key(&obj.name, obj.generation, index)
    }

    /// Whether block `index` of version `generation` of `name` is stored.
    pub fn contains_key(&self, name: &Arc<str>, generation: i64, index: u64) -> bool {
        let st = self.state.lock().unwrap();
        st.by_key
            .get(&(name.clone(), generation))
            .and_then(|id| st.entries.get(id))
            .is_some_and(|e| e.present.get(index as usize) == Some(&true))
    }

    /// The size of a stored version, if any of it is stored.
    pub fn size_of(&self, name: &Arc<str>, generation: i64) -> Option<u64> {
        let st = self.state.lock().unwrap();
        let id = st.by_key.get(&(name.clone(), generation))?;
        st.entries.get(id).map(|e| e.size)
    }

    /// Whether every byte of `obj` is stored.
    pub fn is_complete(&self, obj: &Object) -> bool {
        let st = self.state.lock().unwrap();
        self.lookup(&st, obj)
            .and_then(|id| st.entries.get(&id))
            .is_some_and(|e| e.complete())
    }

    /// Block `index` of `obj`, read back and checked against its CRC32C. A block that fails
    /// the check drops the whole version (it is fetched again) with one log line.
    pub fn get(&self, obj: &Object, index: u64) -> Option<Block> {
        let bs = self.cfg.block_size;
        let (id, crc) = {
            let mut st = self.state.lock().unwrap();
            st.tick += 1;
            let tick = st.tick;
            let id = self.lookup(&st, obj)?;
            let e = st.entries.get_mut(&id)?;
            if e.present.get(index as usize) != Some(&true) {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            e.last_used = tick;
            (id, e.crcs[index as usize])
        };
        let start = index * bs;
        let len = (obj.size - start).min(bs) as usize;
        let mut buf = vec![0u8; len];
        let ok = open_private(&self.path_of(id), false)
            .and_then(|f| f.read_exact_at(&mut buf, start).map_err(Into::into))
            .is_ok();
        let block = Block::with_crc32c(bytes::Bytes::from(buf), 0, len, crc);
        if !ok || !block.is_intact() {
            self.corrupt(obj, id, &format!("block {index} does not match its CRC32C"));
            return None;
        }
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(block)
    }

    /// Drops a version found corrupt, with one log line.
    fn corrupt(&self, obj: &Object, id: u32, why: &str) {
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            object = %obj.name,
            generation = obj.generation,
            "disk cache: {} is corrupt ({why}): dropped, fetching it again",
            self.path_of(id).display()
        );
        self.drop_id(id);
    }

    /// Drops `obj` from the tier (its bytes are wrong).
    pub fn invalidate(&self, obj: &Object) {
        let id = self.lookup(&self.state.lock().unwrap(), obj);
        if let Some(id) = id {
            self.drop_id(id);
        }
    }

    fn drop_id(&self, id: u32) {
        let mut st = self.state.lock().unwrap();
        self.drop_locked(&mut st, id);
    }

    fn drop_locked(&self, st: &mut State, id: u32) {
        let Some(e) = st.entries.remove(&id) else {
            return;
        };
        st.used -= e.bytes(self.cfg.block_size);
        if *e.namespace == *self.namespace {
            st.by_key.remove(&(e.name.clone(), e.generation));
        }
        let _ = std::fs::remove_file(self.path_of(id));
        let mut rec = vec![DROP];
        rec.extend_from_slice(&id.to_le_bytes());
        self.append(st, &rec);
    }

    /// Queues blocks `first..` of `obj` for writing, in the background. Skipped (and counted)
    /// when the writer is more than `MAX_QUEUED` behind: the bytes were served anyway.
    pub fn write_run(self: &Arc<Self>, obj: &Object, first: u64, blocks: &[Block]) {
        let bytes: u64 = blocks.iter().map(|b| b.len() as u64).sum();
        if self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > MAX_QUEUED {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            self.stats.skipped_runs.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (me, obj, blocks) = (self.clone(), obj.clone(), blocks.to_vec());
        // Detached: the JoinHandle is dropped; the write finishes on its own.
        drop(tokio::task::spawn_blocking(move || {
            if let Err(e) = me.write_now(&obj, first, &blocks) {
                tracing::warn!(object = %obj.name, "disk cache: write failed: {e}");
            }
            me.queued.fetch_sub(bytes, Ordering::Relaxed);
        }));
    }

    /// Whether the filesystem has more free space than the reserve (checked every 64 MiB
    /// written).
    fn has_space(&self, bytes: u64) -> bool {
        if self.since_space_check.fetch_add(bytes, Ordering::Relaxed) >= 64 << 20 {
            self.since_space_check.store(0, Ordering::Relaxed);
            let ok = filesystem_space(&self.root).is_ok_and(|(_, free)| free > self.cfg.reserve);
            if !ok && self.space_ok.load(Ordering::Relaxed) {
                tracing::warn!(
                    "disk cache: the filesystem of {} has less than {} free: not caching more \
                     until it has",
                    self.root.display(),
                    bytesize::ByteSize::b(self.cfg.reserve)
                );
            }
            self.space_ok.store(ok, Ordering::Relaxed);
        }
        self.space_ok.load(Ordering::Relaxed)
    }

    /// Writes blocks `first..` of `obj` now: the bytes, then the record that names them.
    pub fn write_now(&self, obj: &Object, first: u64, blocks: &[Block]) -> anyhow::Result<()> {
        let bs = self.cfg.block_size;
        if !self.has_space(blocks.iter().map(|b| b.len() as u64).sum()) {
            self.stats.skipped_runs.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Only blocks not stored yet, each whole (the tail block of the object may be short).
        let missing = |e: &Entry, i: u64, b: &Block| {
            e.present.get(i as usize) == Some(&false)
                && b.len() as u64 == (obj.size - i * bs).min(bs)
        };
        let (id, todo): (u32, Vec<(u64, &Block)>) = {
            let mut st = self.state.lock().unwrap();
            let id = match self.lookup(&st, obj) {
                Some(id) => id,
                None => self.new_entry(&mut st, obj)?,
            };
            let e = &st.entries[&id];
            let todo = (first..)
                .zip(blocks)
                .filter(|(i, b)| missing(e, *i, b))
                .collect();
            (id, todo)
        };
        if todo.is_empty() {
            return Ok(());
        }
        // The bytes go to disk without the index lock, so writers of different objects (warm's
        // many fetches, a mount's readers) write in parallel; the journal says they are there
        // only after they are.
        let f = self.data_file(id)?;
        for (i, b) in &todo {
            f.write_all_at(b.as_slice(), i * bs)?;
        }
        let mut st = self.state.lock().unwrap();
        let Some(e) = st.entries.get(&id) else {
            // Dropped meanwhile (evicted, invalidated): what was written belongs to no entry.
            drop(st);
            let _ = std::fs::remove_file(self.path_of(id));
            return Ok(());
        };
        // Another writer may have stored some of them meanwhile.
        let todo: Vec<(u64, &Block)> = todo
            .into_iter()
            .filter(|(i, b)| missing(e, *i, b))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        self.record_runs(&mut st, id, &todo);
        st.tick += 1;
        let tick = st.tick;
        let e = st.entries.get_mut(&id).expect("entry exists");
        let mut added = 0;
        for (i, b) in &todo {
            e.present[*i as usize] = true;
            e.crcs[*i as usize] = b.crc32c();
            e.n_present += 1;
            added += 1;
        }
        e.last_used = tick;
        let was = (e.n_present - added) * bs;
        let now = e.bytes(bs);
        let bad_whole = e.complete() && e.crc32c.is_some_and(|c| c != whole_crc(e, bs));
        st.used = st.used - was + now;
        self.stats.bytes_written.fetch_add(
            todo.iter().map(|(_, b)| b.len() as u64).sum(),
            Ordering::Relaxed,
        );
        if bad_whole {
            drop(st);
            self.corrupt(obj, id, "its blocks do not add up to the listed CRC32C");
            return Ok(());
        }
        self.evict(&mut st);
        Ok(())
    }

    /// Appends the journal records of blocks `todo` of version `id` (written already): one
    /// record per run of consecutive blocks.
    fn record_runs(&self, st: &mut State, id: u32, todo: &[(u64, &Block)]) {
        let mut k = 0;
        while k < todo.len() {
            let mut j = k;
            while j + 1 < todo.len() && todo[j + 1].0 == todo[j].0 + 1 {
                j += 1;
            }
            let crcs: Vec<u32> = todo[k..=j].iter().map(|(_, b)| b.crc32c()).collect();
            let r = run_record(id, todo[k].0, &crcs);
            self.append(st, &r);
            k = j + 1;
        }
    }

    fn new_entry(&self, st: &mut State, obj: &Object) -> anyhow::Result<u32> {
        let id = st.next_id;
        st.next_id += 1;
        let n = obj.size.div_ceil(self.cfg.block_size) as usize;
        let e = Entry {
            namespace: self.namespace.clone(),
            name: obj.name.clone(),
            generation: obj.generation,
            size: obj.size,
            crc32c: obj.crc32c,
            crcs: vec![0; n],
            present: vec![false; n],
            n_present: 0,
            last_used: st.tick,
            verified: false,
        };
        let rec = object_record(id, &e);
        self.append(st, &rec);
        st.entries.insert(id, e);
        st.by_key.insert((obj.name.clone(), obj.generation), id);
        // A file left by a crash before its record was written (or by a lost journal) holds
        // nothing this index vouches for.
        let path = self.path_of(id);
        let _ = std::fs::remove_file(&path);
        Ok(id)
    }

    fn data_file(&self, id: u32) -> anyhow::Result<File> {
        let path = self.path_of(id);
        private_dir(path.parent().expect("objects/XX"), true)?;
        match open_private(&path, false) {
            Ok(f) => Ok(f),
            // Another writer of this version may create it first.
            Err(_) => create_private(&path).or_else(|e| open_private(&path, false).map_err(|_| e)),
        }
    }

    /// Evicts least-recently-used versions until the tier is within 95% of its bound.
    fn evict(&self, st: &mut State) {
        if st.used <= self.cfg.capacity {
            return;
        }
        let target = self.cfg.capacity / 20 * 19;
        let mut order: Vec<(u64, u32)> = st
            .entries
            .iter()
            .map(|(id, e)| (e.last_used, *id))
            .collect();
        order.sort_unstable();
        for (_, id) in order {
            if st.used <= target {
                break;
            }
            self.drop_locked(st, id);
            self.stats.evicted_objects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The data file of a complete version, checked whole against the listed CRC32C once in
    /// this process: what a passthrough open hands to the kernel. None when it is not
    /// complete or fails the check (then it is dropped, to be fetched again).
    pub fn verified_file(&self, obj: &Object) -> Option<File> {
        let (id, verified) = {
            let st = self.state.lock().unwrap();
            let id = self.lookup(&st, obj)?;
            let e = st.entries.get(&id)?;
            if !e.complete() {
                return None;
            }
            (id, e.verified)
        };
        let f = open_private(&self.path_of(id), false).ok()?;
        if !verified {
            let want = {
                let st = self.state.lock().unwrap();
                st.entries.get(&id).map(|e| {
                    e.crc32c
                        .unwrap_or_else(|| whole_crc(e, self.cfg.block_size))
                })
            };
            match crc_of_file(&f, obj.size) {
                Ok(got) if Some(got) == want => {}
                _ => {
                    self.corrupt(obj, id, "the file does not match the object's CRC32C");
                    return None;
                }
            }
            if let Some(e) = self.state.lock().unwrap().entries.get_mut(&id) {
                e.verified = true;
            }
        }
        Some(f)
    }

    /// Re-checks every stored block of every version; drops the versions with a bad one.
    /// Returns (versions checked, versions dropped).
    pub fn verify_all(&self) -> (u64, u64) {
        let ids: Vec<(u32, Object)> = {
            let st = self.state.lock().unwrap();
            st.entries
                .iter()
                .map(|(id, e)| {
                    (
                        *id,
                        Object {
                            name: e.name.clone(),
                            generation: e.generation,
                            size: e.size,
                            crc32c: e.crc32c,
                        },
                    )
                })
                .collect()
        };
        let bs = self.cfg.block_size;
        let mut bad = 0;
        for (id, obj) in &ids {
            let blocks: Vec<(u64, u32)> = {
                let st = self.state.lock().unwrap();
                let Some(e) = st.entries.get(id) else {
                    continue;
                };
                (0..e.blocks())
                    .filter(|i| e.present[*i as usize])
                    .map(|i| (i, e.crcs[i as usize]))
                    .collect()
            };
            let f = open_private(&self.path_of(*id), false);
            let ok = f.is_ok_and(|f| {
                blocks.iter().all(|(i, crc)| {
                    let len = (obj.size - i * bs).min(bs) as usize;
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, i * bs).is_ok() && crate::crc::crc32c(&buf) == *crc
                })
            });
            if !ok {
                bad += 1;
                self.corrupt(obj, *id, "a stored block does not match its CRC32C");
            }
        }
        (ids.len() as u64, bad)
    }

    /// Appends one record (length, CRC32C, payload) to the journal.
    fn append(&self, st: &mut State, payload: &[u8]) {
        let mut rec = Vec::with_capacity(payload.len() + 8);
        frame(&mut rec, payload);
        let mut j = self.journal.lock().unwrap();
        if let Err(e) = j.write_all(&rec) {
            tracing::warn!("disk cache: journal write failed: {e}");
        }
        st.journal_bytes += rec.len() as u64;
    }

    /// Rewrites the journal when most of it describes what is gone.
    fn compact_if_worth_it(&self) -> anyhow::Result<()> {
        let mut st = self.state.lock().unwrap();
        let live: u64 = st
            .entries
            .values()
            .map(|e| 64 + e.name.len() as u64 + e.n_present * 4)
            .sum();
        if st.journal_bytes < (1 << 20) || st.journal_bytes < 2 * live {
            return Ok(());
        }
        let tmp = self.root.join("journal.new");
        let _ = std::fs::remove_file(&tmp);
        let mut f = create_private(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&self.cfg.block_size.to_le_bytes())?;
        let mut out = Vec::new();
        let mut ids: Vec<&u32> = st.entries.keys().collect();
        ids.sort();
        for id in ids {
            let e = &st.entries[id];
            frame(&mut out, &object_record(*id, e));
            let mut i = 0;
            while i < e.blocks() {
                if !e.present[i as usize] {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j + 1 < e.blocks() && e.present[(j + 1) as usize] {
                    j += 1;
                }
                let r = run_record(*id, i, &e.crcs[i as usize..=j as usize]);
                frame(&mut out, &r);
                i = j + 1;
            }
        }
        f.write_all(&out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.root.join("journal"))?;
        *self.journal.lock().unwrap() = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.root.join("journal"))?;
        st.journal_bytes = 24 + out.len() as u64;
        Ok(())
    }
}

/// The payload of an object record.
fn object_record(id: u32, e: &Entry) -> Vec<u8> {
    let mut rec = vec![OBJECT];
    rec.extend_from_slice(&id.to_le_bytes());
    rec.extend_from_slice(&e.size.to_le_bytes());
    rec.extend_from_slice(&e.generation.to_le_bytes());
    rec.push(e.crc32c.is_some() as u8);
    rec.extend_from_slice(&e.crc32c.unwrap_or(0).to_le_bytes());
    put_str(&mut rec, &e.namespace);
    put_str(&mut rec, &e.name);
    rec
}

/// The payload of a run record: blocks `first..` of version `id`, with their CRC32Cs.
fn run_record(id: u32, first: u64, crcs: &[u32]) -> Vec<u8> {
    let mut r = vec![RUN];
    r.extend_from_slice(&id.to_le_bytes());
    r.extend_from_slice(&first.to_le_bytes());
    r.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
    for c in crcs {
        r.extend_from_slice(&c.to_le_bytes());
    }
    r
}

fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crate::crc::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn put_str(rec: &mut Vec<u8>, s: &str) {
    rec.extend_from_slice(&(s.len() as u16).to_le_bytes());
    rec.extend_from_slice(s.as_bytes());
}

/// The CRC32C of a complete entry, combined from its blocks' CRCs.
fn whole_crc(e: &Entry, bs: u64) -> u32 {
    let mut crc = 0u32;
    for (i, c) in e.crcs.iter().enumerate() {
        let len = (e.size - i as u64 * bs).min(bs) as usize;
        crc = super::crc::combine(crc, *c, len);
    }
    crc
}

fn crc_of_file(f: &File, size: u64) -> std::io::Result<u32> {
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut crc) = (0u64, 0u32);
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        crc = crate::crc::append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(crc)
}

/// Reads the journal into the index. A record that fails its CRC ends the journal there (a
/// torn write at a crash): the rest is cut off. A journal of another format or block size is
/// started afresh, with its objects.
fn replay(path: &Path, bs: u64, namespace: &Arc<str>) -> anyhow::Result<(State, File)> {
    let mut st = State::default();
    let data = match open_private(path, false) {
        Ok(mut f) => {
            let mut d = Vec::new();
            f.read_to_end(&mut d)?;
            d
        }
        Err(_) => Vec::new(),
    };
    if !header_ok(&data, bs) {
        if !data.is_empty() {
            tracing::warn!(
                "disk cache: {} is of another format or block size: starting afresh",
                path.display()
            );
            if let Some(objects) = path.parent().map(|p| p.join("objects")) {
                let _ = std::fs::remove_dir_all(&objects);
                private_dir(&objects, true)?;
            }
        }
        let _ = std::fs::remove_file(path);
        let mut f = create_private(path)?;
        f.write_all(MAGIC)?;
        f.write_all(&bs.to_le_bytes())?;
        st.journal_bytes = 24;
        drop(f);
        let f = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        return Ok((st, f));
    }
    let at = apply_records(&mut st, &data, bs, namespace);
    if at < data.len() {
        tracing::warn!(
            "disk cache: journal {} ends in a torn record at byte {at}: cut there",
            path.display()
        );
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        f.set_len(at as u64)?;
    }
    st.journal_bytes = at as u64;
    st.used = st.entries.values().map(|e| e.bytes(bs)).sum();
    let f = OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    Ok((st, f))
}

/// Whether `data` starts with this format's header for block size `bs`.
fn header_ok(data: &[u8], bs: u64) -> bool {
    data.len() >= 24 && &data[..16] == MAGIC && data[16..24] == bs.to_le_bytes()
}

/// Applies the records after the header of journal `data` to `st`, up to the first torn or
/// malformed one; returns where the good records end.
fn apply_records(st: &mut State, data: &[u8], bs: u64, namespace: &Arc<str>) -> usize {
    let mut at = 24usize;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let Some(payload) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if crate::crc::crc32c(payload) != crc || apply(st, payload, bs, namespace).is_none() {
            break;
        }
        at += 8 + len;
    }
    at
}

/// Applies one journal record; None if it is malformed.
fn apply(st: &mut State, p: &[u8], bs: u64, namespace: &Arc<str>) -> Option<()> {
    let mut r = Reader(p);
    match r.u8()? {
        OBJECT => {
            let id = r.u32()?;
            let size = r.u64()?;
            let generation = r.u64()? as i64;
            let has = r.u8()? == 1;
            let crc = r.u32()?;
            let ns: Arc<str> = Arc::from(r.str()?);
            let name: Arc<str> = Arc::from(r.str()?);
            let n = size.div_ceil(bs) as usize;
            st.next_id = st.next_id.max(id + 1);
            st.tick += 1;
            if *ns == **namespace {
                st.by_key.insert((name.clone(), generation), id);
            }
            st.entries.insert(
                id,
                Entry {
                    namespace: ns,
                    name,
                    generation,
                    size,
                    crc32c: has.then_some(crc),
                    crcs: vec![0; n],
                    present: vec![false; n],
                    n_present: 0,
                    last_used: st.tick,
                    verified: false,
                },
            );
        }
        RUN => {
            let id = r.u32()?;
            let first = r.u64()?;
            let n = r.u32()? as u64;
            st.tick += 1;
            let tick = st.tick;
            let e = st.entries.get_mut(&id)?;
            for i in first..first + n {
                let c = r.u32()?;
                let slot = e.present.get_mut(i as usize)?;
                if !*slot {
                    *slot = true;
                    e.n_present += 1;
                }
                e.crcs[i as usize] = c;
            }
            e.last_used = tick;
        }
        DROP => {
            let id = r.u32()?;
            if let Some(e) = st.entries.remove(&id)
                && *e.namespace == **namespace
            {
                st.by_key.remove(&(e.name, e.generation));
            }
        }
        _ => return None,
    }
    Some(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Creates `dir` 0700 if missing; refuses one that is a symlink, or (`own`: ours to write in)
/// owned by another user or writable by group or others.
pub fn private_dir(dir: &Path, own: bool) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) => {
            if m.file_type().is_symlink() && own {
                anyhow::bail!(
                    "{} is a symlink: refusing to keep the cache there",
                    dir.display()
                );
            }
            let m = std::fs::metadata(dir)?;
            if !m.is_dir() {
                anyhow::bail!("{} is not a directory", dir.display());
            }
            // SAFETY: geteuid cannot fail.
            let me = unsafe { libc::geteuid() };
            if own && (m.uid() != me || m.mode() & 0o022 != 0) {
                anyhow::bail!(
                    "{} is owned by uid {} with mode {:o}: the cache must be in a directory only \
                     you can write (fix: `chown {me} {0} && chmod 700 {0}`, or another --cache-dir)",
                    dir.display(),
                    m.uid(),
                    m.mode() & 0o7777
                );
            }
            Ok(())
        }
        Err(_) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    anyhow::anyhow!("cannot create the cache dir {}: {e}", dir.display())
                })?;
            Ok(())
        }
    }
}

/// Opens an existing file for reading and writing, never through a symlink.
fn open_private(path: &Path, create: bool) -> anyhow::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600);
    if create {
        o.create(true);
    }
    o.open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Creates a new file 0600, exclusively (never an existing file or a symlink).
fn create_private(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))
}

/// Reads the summary of a cache dir without taking it (for `cache stats` next to a mount).
pub fn summary_of(dir: &Path, bs: u64) -> anyhow::Result<DiskSummary> {
    let path = dir.join("physiofs-cache-v1").join("journal");
    let mut d = Vec::new();
    open_private(&path, false)?.read_to_end(&mut d)?;
    let mut st = State::default();
    if header_ok(&d, bs) {
        apply_records(&mut st, &d, bs, &Arc::from(""));
    }
    Ok(DiskSummary {
        objects: st.entries.len() as u64,
        complete: st.entries.values().filter(|e| e.complete()).count() as u64,
        bytes: st.entries.values().map(|e| e.bytes(bs)).sum(),
        journal_bytes: d.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn cfg(dir: &Path, capacity: u64) -> DiskConfig {
        DiskConfig {
            dir: dir.to_path_buf(),
            capacity,
            block_size: 1000,
            namespace: "http://e b".into(),
            reserve: 0,
        }
    }

    fn object(name: &str, data: &[u8]) -> Object {
        Object {
            name: Arc::from(name),
            generation: 7,
            size: data.len() as u64,
            crc32c: Some(crc32c::crc32c(data)),
        }
    }

    fn blocks(data: &[u8], first: u64, n: u64) -> Vec<Block> {
        let span = Bytes::copy_from_slice(data);
        (first..first + n)
            .map(|i| {
                let s = (i * 1000) as usize;
                Block::new(span.clone(), s, (data.len() - s).min(1000))
            })
            .collect()
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 13 % 251) as u8).collect()
    }

    #[test]
    fn survives_reopen_and_serves_exact_blocks() {
        let t = tempfile::tempdir().unwrap();
        let d = data(3500);
        let o = object("a/b.dcm", &d);
        {
            let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
            c.write_now(&o, 0, &blocks(&d, 0, 2)).unwrap();
            assert!(!c.is_complete(&o));
            c.write_now(&o, 2, &blocks(&d, 2, 2)).unwrap();
            assert!(c.is_complete(&o));
        }
        let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
        assert_eq!(c.summary().objects, 1);
        assert_eq!(c.summary().complete, 1);
        for i in 0..4 {
            let b = c.get(&o, i).unwrap();
            let s = (i * 1000) as usize;
            assert_eq!(b.as_slice(), &d[s..(s + 1000).min(3500)]);
        }
        // Another generation is another object.
        let mut o2 = o.clone();
        o2.generation = 8;
        assert!(c.get(&o2, 0).is_none());
        assert!(c.verified_file(&o).is_some());
    }

    #[test]
    fn a_second_opener_is_refused_naming_the_holder() {
        let t = tempfile::tempdir().unwrap();
        let _a = DiskCache::open(cfg(t.path(), 1 << 20), "mounted at /mnt/x").unwrap();
        let e = DiskCache::open(cfg(t.path(), 1 << 20), "b")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in use") && e.contains("/mnt/x"), "{e}");
    }

    #[test]
    fn a_flipped_byte_is_caught_and_the_version_dropped() {
        let t = tempfile::tempdir().unwrap();
        let d = data(2500);
        let o = object("x", &d);
        let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
        c.write_now(&o, 0, &blocks(&d, 0, 3)).unwrap();
        let path = c.path_of(0);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[d[1500] ^ 1], 1500).unwrap();
        assert!(c.get(&o, 0).is_some());
        assert!(c.get(&o, 1).is_none(), "corrupt block served");
        assert_eq!(c.stats().corrupt.load(Ordering::Relaxed), 1);
        assert!(!c.contains(&o, 0), "the whole version is dropped");
        assert!(!path.exists());
    }

    #[test]
    fn a_corrupt_complete_file_is_not_handed_out() {
        let t = tempfile::tempdir().unwrap();
        let d = data(2500);
        let o = object("x", &d);
        {
            let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
            c.write_now(&o, 0, &blocks(&d, 0, 3)).unwrap();
            let f = OpenOptions::new().write(true).open(c.path_of(0)).unwrap();
            f.write_all_at(&[d[10] ^ 0x80], 10).unwrap();
        }
        let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
        assert!(c.verified_file(&o).is_none());
        assert!(!c.is_complete(&o));
    }

    #[test]
    fn a_torn_journal_tail_is_cut_and_nothing_wrong_is_served() {
        let t = tempfile::tempdir().unwrap();
        let d = data(4000);
        let o = object("x", &d);
        {
            let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
            c.write_now(&o, 0, &blocks(&d, 0, 2)).unwrap();
            c.write_now(&o, 2, &blocks(&d, 2, 2)).unwrap();
        }
        let j = t.path().join("physiofs-cache-v1/journal");
        let len = std::fs::metadata(&j).unwrap().len();
        // Cut the last record in the middle, as a crash during its write would.
        let f = OpenOptions::new().write(true).open(&j).unwrap();
        f.set_len(len - 5).unwrap();
        let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
        assert!(c.get(&o, 1).is_some());
        assert!(c.get(&o, 2).is_none(), "the torn run is forgotten");
        assert!(!c.is_complete(&o));
        // And writing goes on after the cut.
        c.write_now(&o, 2, &blocks(&d, 2, 2)).unwrap();
        drop(c);
        let c = DiskCache::open(cfg(t.path(), 1 << 20), "test").unwrap();
        assert!(c.is_complete(&o));
    }

    #[test]
    fn bounded_by_lru_eviction() {
        let t = tempfile::tempdir().unwrap();
        let c = DiskCache::open(cfg(t.path(), 10_000), "test").unwrap();
        let d = data(3000);
        for k in 0..10 {
            let o = object(&format!("f{k}"), &d);
            c.write_now(&o, 0, &blocks(&d, 0, 3)).unwrap();
            assert!(c.summary().bytes <= 10_000, "{:?}", c.summary());
            // f0 is read all along: never the least recently used.
            assert!(c.get(&object("f0", &d), 0).is_some(), "f0 evicted at {k}");
        }
        assert!(c.stats().evicted_objects.load(Ordering::Relaxed) >= 6);
        assert!(c.get(&object("f9", &d), 0).is_some());
        assert!(c.get(&object("f1", &d), 0).is_none());
    }

    #[test]
    fn refuses_a_cache_dir_others_can_write() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("c");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let e = DiskCache::open(cfg(&dir, 1 << 20), "t")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("only you can write"), "{e}");
    }
}
