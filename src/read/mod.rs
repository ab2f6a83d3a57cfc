//! The read path: open files, what to fetch for each read, read-ahead and the walk prefetch,
//! whole-object verification, and the block cache.
//!
//! The metadata core (`fs`) resolves an inode to the object version listed for it and hands
//! opens and reads here; nothing in this module knows about directories or listings. Bytes
//! come only through [`Fetcher`], keyed by an [`Object`] and a range, so every consumer
//! (an open file, a file fetched before it is opened, later the disk fill and `warm`) shares
//! one de-duplicated, budgeted, cached path to the network.
//!
//! ```text
//! ReadPath ── handle.rs   handles, per-inode opens
//!          ├─ readahead.rs per-handle window (pure state machine)
//!          ├─ walk.rs     cross-file heuristics (key-order walks, whole-file readers)
//!          ├─ verify.rs   CRC32C of what a handle served, against the listing
//!          └─ fetch.rs ── cache.rs (tiers behind one interface) ── client (the network)
//! ```

pub mod budget;
pub mod cache;
pub use crate::crc;
pub mod disk;
pub mod fetch;
pub mod handle;
pub mod object;
pub mod readahead;
pub mod tiered;
pub mod verify;
pub mod walk;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::client::ObjectClient;
use crate::error::FsError;
use crate::inode::Ino;
pub use cache::{Block, BlockCache, BlockKey, MemoryCache};
use disk::DiskCache;
pub use fetch::{Fetcher, Object};
pub use handle::OpenMode;
use handle::{Handle, Handles, InodeOpens};
use readahead::Readahead;
use verify::Verdict;
use walk::{Walk, WholeReaders};

/// The size of the pieces the kernel cuts a buffered reader's reads into: 256 pages, the
/// kernel's default `fs.fuse.max_pages_limit` (physiofs asks for more). Its read-ahead starts
/// at the file's start and sends pieces at multiples of this. A read the page cache could not
/// serve whole because it lost a few pages (memory pressure, proactive reclaim) starts at any
/// page instead, and tells nothing about how the file is being read.
pub const KERNEL_READ: u64 = 1 << 20;

/// A handle closed having read no further than this from offset 0 read a header.
const HEADER_MAX: u64 = 1 << 20;

/// A header scan in key order fetches `next_files` times this many files ahead: parallel
/// readers (a DataLoader's workers, a thread pool) have the next dozen or so open already.
const HEADER_FILES_PER_NEXT: usize = 4;

/// Whether a read at `offset` is where one of the kernel's pieces of a read starts.
fn kernel_piece(offset: u64) -> bool {
    offset.is_multiple_of(KERNEL_READ)
}

/// Settings of the read path (see `FsConfig` for what each means and why its default).
#[derive(Clone, Debug)]
pub struct ReadConfig {
    pub block_size: u64,
    pub readahead_min: u64,
    pub readahead_max: u64,
    pub max_request: u64,
    pub small_object: u64,
    pub prefetch_budget: u64,
    pub next_files: usize,
}

/// Counters of the read path (request counters live in the client).
#[derive(Debug, Default)]
pub struct ReadStats {
    pub read_bytes: AtomicU64,
    pub prefetch_bytes: AtomicU64,
    /// Handles that served a whole object whose bytes matched its CRC32C.
    pub objects_verified: AtomicU64,
    /// Whole objects served in pieces whose CRC32C did not match (the read failed with EIO).
    pub verify_failures: AtomicU64,
    /// Files fetched before they were opened (`ReadConfig::next_files`).
    pub files_prefetched: AtomicU64,
    /// Of those, files whose start was fetched for a header scan in key order.
    pub headers_prefetched: AtomicU64,
    /// Opens answered with a backing file the kernel reads directly (no read reaches us).
    pub passthrough_opens: AtomicU64,
    /// Random reads fetched as exactly their range, caching nothing (`Fetcher::direct`).
    pub direct_reads: AtomicU64,
}

/// What the read path needs to know of the tree: which files follow a file in key order, and
/// which object version a file is.
pub trait Catalog: Send + Sync + 'static {
    /// Up to `n` files after `ino` in key order (see `InodeTable::next_files`).
    fn next_files(&self, ino: Ino, n: usize) -> Vec<Ino>;
    /// The object version listed for file `ino`.
    fn object(&self, ino: Ino) -> Option<Object>;
}

/// What a read returned, for [`ReadPath::served`]. It keeps the handle: the kernel may
/// release the handle before `served` runs (a reader that got the end of a file closes it at
/// once).
pub struct Served {
    handle: Arc<Handle>,
    offset: u64,
    end: u64,
    /// A random read (a jump, or any read of a random reader, in a big object): the blocks it
    /// covered in part are released too (see [`ReadPath::served`]).
    random: bool,
    /// Its bytes came from blocks (not from a request of exactly its range, which cached
    /// nothing): there are blocks to release.
    blocks: bool,
}

/// Where a read's bytes come from.
enum Source {
    /// Blocks: cached, in flight, or fetched now.
    Blocks(Vec<fetch::SharedFetch>),
    /// One request of exactly the read's range, cached nowhere (see [`fetch::Fetcher::direct`]).
    Direct(futures::future::BoxFuture<'static, Result<(Bytes, u32), crate::client::ClientError>>),
}

pub struct ReadPath {
    cfg: ReadConfig,
    fetcher: Fetcher,
    catalog: Arc<dyn Catalog>,
    handles: Mutex<Handles>,
    stats: ReadStats,
    /// Files whose served bytes failed their CRC32C: their next open drops the page cache.
    suspect: Mutex<HashSet<Ino>>,
    walk: Mutex<Walk>,
    /// The same for header scans: files closed after reading only their start.
    header_walk: Mutex<Walk>,
    whole_readers: WholeReaders,
    /// The persistent tier, whose complete objects can be opened with passthrough.
    disk: Option<Arc<DiskCache>>,
    /// Passthrough opens are offered (a disk tier, the flag, and the kernel agreed).
    passthrough: AtomicBool,
}

/// A file opened for the kernel: its handle, and how the kernel is to read it.
pub struct Opened {
    pub fh: u64,
    pub via: Via,
}

/// How an opened file is read.
pub enum Via {
    /// Through us (FUSE reads).
    Served,
    /// By the kernel from a backing file: this open's verified cache file, or `None` to use
    /// the one the inode's other passthrough handles already use (an inode cannot mix modes,
    /// and that file stays valid while it is open even if the cache has since dropped it).
    Passthrough(Option<std::fs::File>),
}

impl ReadPath {
    pub fn new(
        cfg: ReadConfig,
        client: Arc<dyn ObjectClient>,
        cache: Arc<dyn BlockCache>,
        catalog: Arc<dyn Catalog>,
    ) -> Self {
        let fetcher = Fetcher::new(
            client,
            cache,
            cfg.block_size,
            cfg.max_request,
            cfg.prefetch_budget,
        );
        ReadPath {
            cfg,
            fetcher,
            catalog,
            handles: Mutex::default(),
            stats: ReadStats::default(),
            suspect: Mutex::default(),
            walk: Mutex::default(),
            header_walk: Mutex::default(),
            whole_readers: WholeReaders::default(),
            disk: None,
            passthrough: AtomicBool::new(false),
        }
    }

    /// Adds the persistent tier (the same one the cache holds) and whether complete objects
    /// on it may be opened with passthrough.
    pub fn with_disk(mut self, disk: Option<Arc<DiskCache>>, passthrough: bool) -> Self {
        self.passthrough = AtomicBool::new(passthrough && disk.is_some());
        self.disk = disk;
        self
    }

    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.disk.as_ref()
    }

    /// Whether opens may be answered with passthrough.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Passthrough is off from now on (the kernel refused it: not root, or no support).
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    pub fn cache(&self) -> &Arc<dyn BlockCache> {
        self.fetcher.cache()
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// Opens file `ino`, pinned to `object`. Returns the handle number.
    pub fn open(&self, ino: Ino, object: Object) -> u64 {
        let readahead = self.readahead_for(&object);
        let h = Arc::new(Handle::new(ino, object, OpenMode::Served, readahead));
        self.handles.lock().unwrap().insert(h)
    }

    /// The read-ahead state of a new handle on `obj`: a wide first window when readers have
    /// been reading big objects whole, or when the first read is a whole kernel piece at the
    /// start (a reader of large reads: see [`Readahead::bulk`]). Never for a small object,
    /// which its first read fetches whole in one request (checked against its CRC32C by the
    /// client): a window would fetch part of it in a ranged request first.
    fn readahead_for(&self, obj: &Object) -> Readahead {
        let r = Readahead::new(self.cfg.readahead_min, self.cfg.readahead_max)
            .aligned(self.cfg.max_request);
        if obj.size <= self.cfg.small_object {
            return r;
        }
        let first = self.cfg.readahead_max / 4;
        if self.whole_readers.trusted() {
            r.warm(first)
        } else {
            r.bulk(KERNEL_READ, first)
        }
    }

    /// Opens file `ino` for the kernel: with passthrough when its object version is complete
    /// on disk and checked whole, or when other handles on the inode already read through
    /// passthrough (the kernel refuses a served open next to them: ETXTBSY), and no handle on
    /// it is served by us (nor the reverse); else served by us.
    pub async fn open_for_kernel(&self, ino: Ino, object: Object) -> Opened {
        if let Some(disk) = self.disk.clone()
            && self.passthrough()
            && self.opens(ino).served == 0
        {
            let o = object.clone();
            let file = tokio::task::spawn_blocking(move || disk.verified_file(&o))
                .await
                .ok()
                .flatten();
            let mut handles = self.handles.lock().unwrap();
            let on = handles.on_inode(ino);
            if on.served == 0 && (file.is_some() || on.passthrough > 0) {
                let readahead = self.readahead_for(&object);
                let h = Handle::new(ino, object, OpenMode::Passthrough, readahead);
                let fh = handles.insert(Arc::new(h));
                self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                return Opened {
                    fh,
                    via: Via::Passthrough(file),
                };
            }
        }
        Opened {
            fh: self.open(ino, object),
            via: Via::Served,
        }
    }

    /// Handle `fh` was opened for passthrough but the kernel refused the backing file: it is
    /// served by us instead.
    pub fn demote(&self, fh: u64) {
        self.handles.lock().unwrap().demote(fh);
        self.stats.passthrough_opens.fetch_sub(1, Ordering::Relaxed);
    }

    /// Handles open on `ino`, by mode.
    pub fn opens(&self, ino: Ino) -> InodeOpens {
        self.handles.lock().unwrap().on_inode(ino)
    }

    /// The object version handle `fh` reads.
    pub fn object_of(&self, fh: u64) -> Option<Object> {
        let handles = self.handles.lock().unwrap();
        handles.get(fh).map(|h| h.object.clone())
    }

    /// Closes handle `fh`; returns how it was served (None for an unknown handle).
    pub fn release(&self, fh: u64) -> Option<OpenMode> {
        let h = self.handles.lock().unwrap().remove(fh);
        let mode = h.as_ref().map(|h| *h.mode.lock().unwrap());
        // A big object closed before its end, after reading some of it: not a whole-file
        // reader (a header scan, a random reader).
        if let Some(h) = h
            && !h.finished.load(Ordering::Relaxed)
        {
            let (reads, header) = {
                let r = h.readahead.lock().unwrap();
                (r.reads(), r.header_len(h.object.size, HEADER_MAX))
            };
            if reads > 0 && h.object.size > self.cfg.small_object {
                self.whole_readers.closed_early();
            }
            // Only its start was read, from offset 0 on (not a refill of lost pages).
            if let Some(len) = header
                && h.piece_read.load(Ordering::Relaxed)
            {
                self.header_read(h.ino, len);
            }
        }
        mode
    }

    /// File `ino` was closed after its first `len` bytes were read: when readers are going
    /// through files in key order reading only their headers, fetch the start of the files
    /// after it (as many bytes as this one's reads took; a small object whole, as its first
    /// read would). Each header is otherwise one first-byte latency, so a scan in key order
    /// would run at one file per latency per reader. Further ahead than the whole-file walk
    /// ([`HEADER_FILES_PER_NEXT`]): the next few files are open in parallel readers already.
    fn header_read(&self, ino: Ino, len: u64) {
        let n = self.cfg.next_files * HEADER_FILES_PER_NEXT;
        if n == 0 || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let next = self.catalog.next_files(ino, n + 8);
        let ahead = self.header_walk.lock().unwrap().finished(ino, next, n);
        let len = len
            .next_multiple_of(self.cfg.block_size)
            .max(self.cfg.block_size);
        let (small, first) = (self.cfg.small_object, self.cfg.max_request);
        let fetched = self.fetch_starts(ahead, |obj| {
            if obj.size <= small {
                0..obj.size.min(first)
            } else {
                0..len.min(obj.size)
            }
        });
        self.stats
            .headers_prefetched
            .fetch_add(fetched, Ordering::Relaxed);
    }

    /// Whether the kernel may keep its page cache for `ino` across opens: yes, unless bytes
    /// of it failed their checksum since (then this open drops the kernel's copy, once).
    pub fn keep_cache(&self, ino: Ino) -> bool {
        !self.suspect.lock().unwrap().remove(&ino)
    }

    /// Reads up to `size` bytes at `offset` through handle `fh` (fewer only at the end of the
    /// object), and a token for [`ReadPath::served`] once they are delivered. `buffered`: the
    /// bytes go to the kernel's page cache (not an `O_DIRECT` read, nor a read for physiofs
    /// itself), so a random read need not keep them.
    pub async fn read(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        buffered: bool,
    ) -> Result<(Bytes, Served), FsError> {
        let h = self
            .handles
            .lock()
            .unwrap()
            .get(fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        if h.poisoned.load(Ordering::Relaxed) {
            return Err(FsError::Corrupt(format!(
                "{}: bytes served through this handle failed their CRC32C; reopen the file",
                h.object.name
            )));
        }
        let file_size = h.object.size;
        if kernel_piece(offset) {
            h.piece_read.store(true, Ordering::Relaxed);
        }
        let end = offset.saturating_add(size as u64).min(file_size);
        if offset >= end {
            let served = Served {
                handle: h,
                offset,
                end: offset,
                random: false,
                blocks: false,
            };
            return Ok((Bytes::new(), served));
        }
        let (source, random) = self.plan(&h, offset, end, buffered);
        let blocks = matches!(source, Source::Blocks(_));
        let got = match source {
            Source::Blocks(waits) => {
                fetch::assemble_parts(self.cfg.block_size, waits, offset, end).await
            }
            Source::Direct(f) => f.await.map(|(data, crc)| (data, crc, [None, None])),
        };
        let (data, crc, parts) = got.map_err(|e| {
                tracing::warn!(object = %h.object.name, generation = h.object.generation, error = %e, "read failed");
                FsError::Client(e)
            })?;
        self.verify(&h, offset, &data, crc, parts).await?;
        self.stats
            .read_bytes
            .fetch_add(end - offset, Ordering::Relaxed);
        if end == file_size {
            self.reached_end(&h);
        }
        let served = Served {
            handle: h,
            offset,
            end,
            random,
            blocks,
        };
        Ok((data, served))
    }

    /// Decides what to fetch for a read of `[offset, end)` and returns the futures of its
    /// blocks. Decided, and registered in flight, under the handle's read-ahead lock: the
    /// kernel sends a reader's pieces concurrently, and a piece registering its own fetch
    /// between another's decision and registration would split a whole-object fetch in two.
    /// Also says whether the read is a random one: a read of a big object that jumped, or any
    /// read of a reader that reads at random (its reads the kernel split in touching pieces
    /// included). A random read for the page cache, with no disk tier to fill, fetches exactly
    /// its range when none of its blocks is at hand.
    fn plan(&self, h: &Handle, offset: u64, end: u64, buffered: bool) -> (Source, bool) {
        let obj = &h.object;
        let mut r = h.readahead.lock().unwrap();
        let first_read = r.reads() == 0;
        // Read-ahead first, so its requests are on the wire while we wait for ours.
        let ahead = r.on_read(offset, end, obj.size);
        let random = (r.jumped() || r.random_reader()) && obj.size > self.cfg.small_object;
        if !ahead.is_empty() {
            self.prefetched(self.fetcher.prefetch(obj, ahead));
        }
        // A small object is fetched whole, in one request, by a read from its start or by the
        // first read of an open at a piece's place (the kernel sends a whole-file reader's
        // first 1 MiB pieces at once, and the one at 1 MiB may come first). A first read
        // elsewhere is the kernel refilling pages its cache lost (or a reader starting in the
        // middle): the bytes before it are still there, so it fetches from its own start to
        // the object's end, in one request, and the reader's later holes in the file are at
        // hand. The blocks this read does not need are fetched like read-ahead: only missing
        // ones, in the background. Not again what an earlier read of this handle asked for:
        // its blocks may have been served to the page cache, and left ours, since (the piece
        // at 1 MiB first, then the one at 0, would fetch the part after 1 MiB twice).
        if obj.size <= self.cfg.small_object && (offset == 0 || first_read) {
            let from = if kernel_piece(offset) { 0 } else { offset };
            let to = r.small_asked_from().unwrap_or(obj.size);
            if from < to {
                self.fetcher.background(obj, from..to);
                r.set_small_asked_from(from);
            }
        }
        if random
            && buffered
            && self.disk.is_none()
            && let Some(f) = self.fetcher.direct(obj, offset..end)
        {
            self.stats.direct_reads.fetch_add(1, Ordering::Relaxed);
            return (Source::Direct(f), random);
        }
        (
            Source::Blocks(self.fetcher.demand(obj, offset..end)),
            random,
        )
    }

    /// A read through `h` reached the end of its object: score the whole-file readers, and
    /// note the file for the walk prefetch before the reader gets the bytes (so it cannot have
    /// opened the next file yet, which read-ahead would then fetch a second time). Only when
    /// the handle read the file in the kernel's pieces: a refill of a few lost pages at its
    /// end (a warm epoch whose page cache has holes) says nothing about the next files, which
    /// the page cache most likely still holds.
    fn reached_end(&self, h: &Handle) {
        if !h.piece_read.load(Ordering::Relaxed) {
            return;
        }
        if h.object.size > self.cfg.small_object && !h.finished.swap(true, Ordering::Relaxed) {
            self.whole_readers.read_to_end();
        }
        self.file_finished(h.ino);
    }

    /// File `ino` was read to its end: when readers are going through files in key order,
    /// fetch the next ones (their first request's worth: a JPG whole, a DICOM's start).
    fn file_finished(&self, ino: Ino) {
        let n = self.cfg.next_files;
        if n == 0 {
            return;
        }
        let next = self.catalog.next_files(ino, n + 8);
        let ahead = self.walk.lock().unwrap().finished(ino, next, n);
        let first = self.cfg.max_request;
        self.fetch_starts(ahead, |obj| 0..obj.size.min(first));
    }

    /// Fetches `range(obj)` of each of `files` not open now, within the read-ahead budget;
    /// returns how many files it asked anything for (counted in `files_prefetched`).
    fn fetch_starts(
        &self,
        files: Vec<Ino>,
        range: impl Fn(&Object) -> std::ops::Range<u64>,
    ) -> u64 {
        let mut fetched = 0;
        for f in files {
            if self.handles.lock().unwrap().is_open(f) {
                continue; // being read now
            }
            let Some(obj) = self.catalog.object(f) else {
                continue;
            };
            let blocks = self.fetcher.prefetch(&obj, range(&obj));
            if blocks > 0 {
                self.prefetched(blocks);
                fetched += 1;
            }
        }
        self.stats
            .files_prefetched
            .fetch_add(fetched, Ordering::Relaxed);
        fetched
    }

    fn prefetched(&self, blocks: u64) {
        self.stats
            .prefetch_bytes
            .fetch_add(blocks * self.cfg.block_size, Ordering::Relaxed);
    }

    /// The reply to a buffered read was delivered, so the kernel's page cache now holds its
    /// bytes (objects are immutable per generation and opened with FOPEN_KEEP_CACHE, so it
    /// keeps them across opens). The blocks the read covered whole are released from our
    /// memory: keeping a second copy would only double the memory a streaming reader uses,
    /// and releasing it lets the receive buffer it came in be reused at once (`client::pool`)
    /// instead of faulting in fresh memory for every request. Blocks read only in part stay,
    /// for the read that wants the rest, and are released once reads got all of their bytes,
    /// except after a random read (see [`Served`]): a random reader seldom reads next to its
    /// last read, and a part-block kept would pin the whole run of blocks (one request's
    /// receive buffer) it came in, so a random epoch would grow the mount by every request's
    /// buffer until the cache is full (`rand8` in bench/: peak RSS 225 -> 40 MiB, ~20% less
    /// CPU per read, from page faults on fresh memory). A read that does continue one fetches
    /// the part again in its own request. (O_DIRECT reads skip this: they bypass the page
    /// cache.)
    pub async fn served(&self, s: Served) {
        if !s.blocks {
            return;
        }
        let (size, bs) = (s.handle.object.size, self.cfg.block_size);
        // A random read: every block it covers. Otherwise whole blocks: from the first
        // starting in the range to the last ending in it (the tail block ends at the end of
        // the object).
        let (first, end) = if s.random {
            (s.offset / bs, s.end.div_ceil(bs))
        } else if s.end == size {
            (s.offset.div_ceil(bs), size.div_ceil(bs))
        } else {
            (s.offset.div_ceil(bs), s.end / bs)
        };
        if first < end {
            self.fetcher.release(&s.handle.object, first..end).await;
        }
        // Blocks the read covered in part: counted, and released once the kernel got all
        // of their bytes (its pieces of a stream seldom end on a block boundary, and a block
        // kept would keep its whole request's buffer cached).
        if !s.random {
            let touched = s.offset / bs..s.end.div_ceil(bs);
            for b in touched.filter(|b| !(first..end).contains(b)) {
                let part = s.end.min((b + 1) * bs) - s.offset.max(b * bs);
                self.fetcher.release_part(&s.handle.object, b, part).await;
            }
        }
    }

    /// A handle was verified, so the bytes it served are right; but a block it was served
    /// in parts may have come in two answers, and the copy in memory now may hold a wrong
    /// byte in the part served from the other one, which nothing has checked. Its parts give
    /// the block's right CRC32C: a copy in memory with another one leaves (so does any copy of
    /// a cut block whose parts do not tile it), and no later reader is served it unchecked.
    async fn drop_unproven_cut_blocks(&self, obj: &Object, cut: &verify::CutBlocks) {
        let bs = self.cfg.block_size;
        let len = |b: u64| bs.min(obj.size - b * bs);
        match cut.served_crcs(len) {
            Some(blocks) => {
                for (b, right) in blocks {
                    self.fetcher.drop_unproven(obj, b, right).await;
                }
            }
            None => {
                for b in 0..obj.size.div_ceil(bs) {
                    self.fetcher.drop_unproven(obj, b, None).await;
                }
            }
        }
    }

    /// Feeds served bytes to the handle's CRC32C check. A mismatch fails this read and every
    /// later one on the handle with EIO, and invalidates the object's cached blocks and its
    /// kernel page cache (at the next open), so a new open fetches and checks it afresh.
    /// `parts`: the blocks at the read's edges that it served only in part.
    async fn verify(
        &self,
        h: &Handle,
        offset: u64,
        data: &[u8],
        crc: u32,
        parts: [Option<fetch::Part>; 2],
    ) -> Result<(), FsError> {
        let verdict = {
            let mut v = h.verifier.lock().unwrap();
            match v.as_mut() {
                Some(v) => {
                    for (block, from, to, crc) in parts.into_iter().flatten() {
                        v.cut.note(block, from, to, crc);
                    }
                    v.feed_with_crc(offset, data, crc)
                }
                None => return Ok(()),
            }
        };
        match verdict {
            Verdict::Verified => {
                self.stats.objects_verified.fetch_add(1, Ordering::Relaxed);
                // Count each handle once.
                let v = h.verifier.lock().unwrap().take();
                if let Some(v) = v {
                    self.drop_unproven_cut_blocks(&h.object, &v.cut).await;
                }
                Ok(())
            }
            Verdict::Mismatch(got) => {
                self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                let obj = &h.object;
                let want = obj.crc32c.unwrap_or_default();
                tracing::error!(
                    object = %obj.name,
                    generation = obj.generation,
                    "CRC32C of the {} bytes served is {got:08x}, the listing says {want:08x}: \
                     read fails with EIO and the cached copy is dropped",
                    obj.size
                );
                self.fetcher.invalidate(obj).await;
                self.suspect.lock().unwrap().insert(h.ino);
                h.poisoned.store(true, Ordering::Relaxed);
                Err(FsError::Corrupt(format!(
                    "{}: CRC32C mismatch over the whole object",
                    obj.name
                )))
            }
            Verdict::Pending | Verdict::GaveUp => Ok(()),
        }
    }
}
