//! The block cache: fixed-size pieces of object versions, bounded by bytes.
//!
//! Keys name an object *version* (name + generation), so a cached block can never be served
//! for a different version. Every block carries the CRC32C of its bytes from the moment it
//! arrives, so any tier (memory now, disk next) can check a block before it is served.
//! [`BlockCache`] is the one interface of every tier; it keeps two operations apart that look
//! alike: [`BlockCache::release`] ("this memory may go: the bytes are safe elsewhere") and
//! [`BlockCache::invalidate`] ("these bytes are wrong: drop them everywhere"). A persistent
//! tier keeps its copy on the first and deletes it on the second. [`MemoryCache`] is moka
//! weighed by bytes, with one entry per run of blocks one request brought (a block index
//! finds a block's run), so a stream costs moka work per 4 MiB request, not per 32 KiB
//! block. De-duplication of concurrent fetches lives in the read path (`read::fetch`), which
//! fetches runs of blocks in one request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

pub use super::object::BlockKey;
use super::object::Object;

#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

/// One cached block: a window into the buffer of the GET that fetched it. Blocks fetched by
/// one request share that buffer, so a read spanning several of them is served as one slice
/// of it, without copying. The CRC32C of its bytes is taken when it arrives and travels with
/// it to every tier.
#[derive(Clone, Debug)]
pub struct Block {
    span: Bytes,
    start: usize,
    len: usize,
    crc32c: u32,
}

impl Block {
    /// Bytes `start..start + len` of `span`, checksummed now.
    pub fn new(span: Bytes, start: usize, len: usize) -> Block {
        assert!(start + len <= span.len(), "block outside its span");
        let crc32c = crate::crc::crc32c(&span[start..start + len]);
        Block {
            span,
            start,
            len,
            crc32c,
        }
    }

    /// A block whose CRC32C is already known (read back from a tier that stored it).
    pub fn with_crc32c(span: Bytes, start: usize, len: usize, crc32c: u32) -> Block {
        assert!(start + len <= span.len(), "block outside its span");
        Block {
            span,
            start,
            len,
            crc32c,
        }
    }

    /// The CRC32C of the block's bytes as they arrived.
    pub fn crc32c(&self) -> u32 {
        self.crc32c
    }

    /// Whether the bytes still match the CRC32C they arrived with.
    pub fn is_intact(&self) -> bool {
        crate::crc::crc32c(self.as_slice()) == self.crc32c
    }

    /// A block that is its own buffer.
    pub fn whole(b: Bytes) -> Block {
        let len = b.len();
        Block::new(b, 0, len)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.span[self.start..self.start + self.len]
    }

    /// `next` starts right where this block ends, in the same buffer.
    pub fn followed_by(&self, next: &Block) -> bool {
        self.span.as_ptr() == next.span.as_ptr()
            && self.span.len() == next.span.len()
            && self.start + self.len == next.start
    }

    /// Bytes `from..to` counted from this block's start, reaching into the following blocks
    /// of the same buffer (the caller checked `followed_by`).
    pub fn slice_on(&self, from: usize, to: usize) -> Bytes {
        self.span.slice(self.start + from..self.start + to)
    }
}

#[async_trait]
pub trait BlockCache: Send + Sync + 'static {
    async fn get(&self, key: &BlockKey) -> Option<Block>;

    async fn insert(&self, key: BlockKey, block: Block);

    /// Inserts blocks `first..` of `obj`, as one request brought them (a persistent tier
    /// writes them as one run).
    async fn insert_run(&self, obj: &Object, first: u64, blocks: &[Block]) {
        for (i, b) in (first..).zip(blocks) {
            self.insert(obj.key(i), b.clone()).await;
        }
    }

    /// Whether the block is cached right now.
    fn contains(&self, key: &BlockKey) -> bool;

    /// The block's bytes are held elsewhere now (the kernel's page cache): its memory may be
    /// freed. A persistent tier keeps its copy.
    async fn release(&self, key: &BlockKey);

    /// `bytes` more of the block's bytes are held elsewhere now (the kernel's page cache got
    /// part of it in one read): once all of its bytes are, it is released.
    async fn release_part(&self, key: &BlockKey, bytes: u64) {
        let _ = (key, bytes);
    }

    /// The block's bytes are wrong (or belong to a version found bad): drop it from every
    /// tier.
    async fn invalidate(&self, key: &BlockKey);

    /// The block's right CRC32C is `right` (None: not known): drop the copy in memory unless
    /// its own CRC32C is that one. A persistent tier keeps its copy (checked whole before it
    /// is handed out as a file).
    async fn drop_unproven(&self, key: &BlockKey, right: Option<u32>);

    /// Bytes currently held.
    fn weighted_size(&self) -> u64;

    fn stats(&self) -> &CacheStats;
}

/// The blocks one request brought, cached as one entry. A stream's blocks arrive together
/// and leave together (each is released once the kernel holds it), so one moka entry per run
/// instead of one per 32 KiB block spares moka an insert, a removal and their bookkeeping per
/// block: with an entry per block that was ~12% of a mount's CPU on a DICOM epoch. The run's
/// memory is one buffer anyway, freed only when its last block goes.
struct Run {
    id: u64,
    /// What it counts for against the capacity: its bytes when cached, plus 64 per block.
    weight: u64,
    /// The key of the run's first block; block `i` is `first.index + i`.
    first: BlockKey,
    /// `None` once released.
    blocks: std::sync::Mutex<Vec<Option<Block>>>,
    /// Bytes of each block the kernel got in reads that covered it only in part.
    parts: std::sync::Mutex<Vec<u64>>,
}

impl Run {
    fn key(&self, i: usize) -> BlockKey {
        BlockKey {
            index: self.first.index + i as u64,
            ..self.first.clone()
        }
    }
}

/// Where a cached block lives: its run (by id, and weakly, so the index never keeps a run's
/// memory alive once moka dropped it) and its place in the run.
type Slot = (u64, usize, std::sync::Weak<Run>);
type Index = std::collections::HashMap<BlockKey, Slot, foldhash::fast::RandomState>;

pub struct MemoryCache {
    runs: moka::future::Cache<u64, Arc<Run>, foldhash::fast::RandomState>,
    index: Arc<std::sync::Mutex<Index>>,
    /// Bytes of the runs cached now (moka's own weighted size lags until its next
    /// maintenance, by a whole run at a time).
    held: Arc<AtomicU64>,
    next_id: AtomicU64,
    capacity: u64,
    /// Bytes inserted since eviction last ran: moka evicts in batches, so without a nudge a
    /// fast reader could overshoot the bound by whatever arrives between batches.
    since_maintenance: AtomicU64,
    stats: CacheStats,
}

impl MemoryCache {
    /// A cache holding at most `capacity` bytes of block data.
    pub fn new(capacity: u64) -> Self {
        let index: Arc<std::sync::Mutex<Index>> = Arc::default();
        let on_evict = Arc::downgrade(&index);
        let held: Arc<AtomicU64> = Arc::default();
        let held_by_listener = held.clone();
        let runs = moka::future::Cache::builder()
            .max_capacity(capacity)
            // Plain LRU: moka's default (TinyLFU) refuses to admit new entries that are seen
            // less often than old ones, which for a streaming reader means read-ahead blocks
            // are dropped on arrival and fetched again.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|_k: &u64, run: &Arc<Run>| -> u32 { run.weight.min(u32::MAX as u64) as u32 })
            // A run evicted (not emptied by releases, whose blocks already left the index):
            // forget its blocks' places, unless a newer run holds them now.
            .eviction_listener(move |_k, run: Arc<Run>, cause| {
                held_by_listener.fetch_sub(run.weight, Ordering::Relaxed);
                if cause == moka::notification::RemovalCause::Explicit {
                    return;
                }
                let Some(index) = on_evict.upgrade() else {
                    return;
                };
                let n = run.blocks.lock().unwrap().len();
                let mut index = index.lock().unwrap();
                for i in 0..n {
                    let key = run.key(i);
                    if index.get(&key).is_some_and(|s| s.0 == run.id) {
                        index.remove(&key);
                    }
                }
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        MemoryCache {
            runs,
            index,
            held,
            next_id: AtomicU64::new(1),
            capacity,
            since_maintenance: AtomicU64::new(0),
            stats: CacheStats::default(),
        }
    }

    /// Caches `blocks` as one run whose first block is `first`.
    async fn insert_blocks(&self, first: BlockKey, blocks: &[Block]) {
        if blocks.is_empty() {
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let weight = blocks.iter().map(|b| b.len() as u64 + 64).sum();
        self.held.fetch_add(weight, Ordering::Relaxed);
        let run = Arc::new(Run {
            id,
            weight,
            first,
            blocks: std::sync::Mutex::new(blocks.iter().cloned().map(Some).collect()),
            parts: std::sync::Mutex::new(vec![0; blocks.len()]),
        });
        // In moka first, so a block is never indexed to a run moka does not know yet.
        self.runs.insert(id, run.clone()).await;
        let mut displaced = Vec::new();
        {
            let mut index = self.index.lock().unwrap();
            for i in 0..blocks.len() {
                if let Some(old) = index.insert(run.key(i), (id, i, Arc::downgrade(&run))) {
                    displaced.push(old);
                }
            }
        }
        // A block cached again: the older run no longer serves it.
        for slot in displaced {
            self.drop_slot(slot).await;
        }
        let n: u64 = blocks.iter().map(|b| b.len() as u64).sum();
        if self.since_maintenance.fetch_add(n, Ordering::Relaxed) + n > self.capacity / 16 {
            self.since_maintenance.store(0, Ordering::Relaxed);
            self.runs.run_pending_tasks().await;
        }
    }

    /// Empties one block's place in its run; a run left with no block leaves the cache.
    async fn drop_slot(&self, (id, i, run): Slot) {
        let Some(run) = run.upgrade() else {
            return;
        };
        let empty = {
            let mut blocks = run.blocks.lock().unwrap();
            blocks[i] = None;
            blocks.iter().all(Option::is_none)
        };
        if empty {
            self.runs.invalidate(&id).await;
        }
    }

    /// Drops `key` from memory.
    async fn forget(&self, key: &BlockKey) {
        let slot = self.index.lock().unwrap().remove(key);
        if let Some(slot) = slot {
            self.drop_slot(slot).await;
        }
    }
}

#[async_trait]
impl BlockCache for MemoryCache {
    async fn get(&self, key: &BlockKey) -> Option<Block> {
        let slot = self.index.lock().unwrap().get(key).map(|s| (s.0, s.1));
        let r = match slot {
            // The run from moka itself, so the lookup counts as a use of it (LRU).
            Some((id, i)) => match self.runs.get(&id).await {
                Some(run) => run.blocks.lock().unwrap()[i].clone(),
                None => {
                    // Evicted meanwhile: forget the stale place.
                    let mut index = self.index.lock().unwrap();
                    if index.get(key).is_some_and(|s| s.0 == id) {
                        index.remove(key);
                    }
                    None
                }
            },
            None => None,
        };
        match r {
            Some(_) => &self.stats.hits,
            None => &self.stats.misses,
        }
        .fetch_add(1, Ordering::Relaxed);
        r
    }

    async fn insert(&self, key: BlockKey, block: Block) {
        self.insert_blocks(key, std::slice::from_ref(&block)).await;
    }

    async fn insert_run(&self, obj: &Object, first: u64, blocks: &[Block]) {
        self.insert_blocks(obj.key(first), blocks).await;
    }

    fn contains(&self, key: &BlockKey) -> bool {
        let slot = self.index.lock().unwrap().get(key).cloned();
        slot.and_then(|(id, i, run)| {
            let run = run.upgrade()?;
            let present = run.blocks.lock().unwrap()[i].is_some();
            Some(present && self.runs.contains_key(&id))
        })
        .unwrap_or(false)
    }

    async fn release(&self, key: &BlockKey) {
        self.forget(key).await;
    }

    async fn release_part(&self, key: &BlockKey, bytes: u64) {
        let slot = self.index.lock().unwrap().get(key).cloned();
        let Some((_, i, run)) = slot else {
            return;
        };
        let Some(run) = run.upgrade() else {
            return;
        };
        let len = run.blocks.lock().unwrap()[i]
            .as_ref()
            .map_or(0, |b| b.len() as u64);
        let done = {
            let mut parts = run.parts.lock().unwrap();
            parts[i] += bytes;
            parts[i] >= len
        };
        if done {
            self.forget(key).await;
        }
    }

    async fn invalidate(&self, key: &BlockKey) {
        self.forget(key).await;
    }

    async fn drop_unproven(&self, key: &BlockKey, right: Option<u32>) {
        let slot = self.index.lock().unwrap().get(key).cloned();
        let proven = slot.and_then(|(_, i, run)| {
            let run = run.upgrade()?;
            let b = run.blocks.lock().unwrap()[i].as_ref().map(Block::crc32c);
            b.map(|c| Some(c) == right)
        });
        if proven == Some(false) {
            self.forget(key).await;
        }
    }

    fn weighted_size(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    fn stats(&self) -> &CacheStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> BlockKey {
        BlockKey {
            object: Arc::from("o"),
            generation: 1,
            index: i,
        }
    }

    #[tokio::test]
    async fn streaming_inserts_are_admitted() {
        // Old blocks read twice must not keep new blocks out (TinyLFU would).
        let c = MemoryCache::new(8 << 20);
        for i in 0..8 {
            c.insert(key(i), Block::whole(Bytes::from(vec![0u8; 1 << 20])))
                .await;
            c.get(&key(i)).await;
            c.get(&key(i)).await;
        }
        for i in 100..104 {
            c.insert(key(i), Block::whole(Bytes::from(vec![1u8; 1 << 20])))
                .await;
        }
        c.runs.run_pending_tasks().await;
        for i in 100..104 {
            assert!(c.contains(&key(i)), "block {i} was not admitted");
        }
    }

    fn obj(size: u64) -> Object {
        Object {
            name: Arc::from("o"),
            generation: 1,
            size,
            crc32c: None,
        }
    }

    fn run_of(n: usize, fill: u8) -> Vec<Block> {
        let span = Bytes::from(vec![fill; n * 1024]);
        (0..n)
            .map(|i| Block::new(span.clone(), i * 1024, 1024))
            .collect()
    }

    #[tokio::test]
    async fn a_run_leaves_when_its_last_block_is_released() {
        let c = MemoryCache::new(1 << 20);
        let obj = obj(1 << 20);
        c.insert_run(&obj, 10, &run_of(4, 7)).await;
        for i in 10..14 {
            let b = c.get(&obj.key(i)).await.expect("cached");
            assert_eq!(b.as_slice(), &[7u8; 1024][..]);
            assert!(c.contains(&obj.key(i)));
        }
        assert!(c.get(&obj.key(14)).await.is_none());
        for i in 10..13 {
            c.release(&obj.key(i)).await;
            assert!(!c.contains(&obj.key(i)) && c.get(&obj.key(i)).await.is_none());
        }
        c.runs.run_pending_tasks().await;
        assert!(c.weighted_size() > 0, "one block left holds the run");
        assert!(c.get(&obj.key(13)).await.is_some());
        c.release(&obj.key(13)).await;
        c.runs.run_pending_tasks().await;
        assert_eq!(c.weighted_size(), 0);
        assert_eq!(c.runs.entry_count(), 0);
        assert!(c.index.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_block_served_in_parts_is_released_once_all_of_it_was() {
        let c = MemoryCache::new(1 << 20);
        let obj = obj(1 << 20);
        c.insert_run(&obj, 0, &run_of(1, 3)).await;
        c.release_part(&obj.key(0), 1000).await;
        assert!(c.contains(&obj.key(0)), "24 bytes not served yet");
        c.release_part(&obj.key(0), 24).await;
        assert!(!c.contains(&obj.key(0)));
        c.runs.run_pending_tasks().await;
        assert_eq!(c.weighted_size(), 0);
    }

    #[tokio::test]
    async fn a_block_cached_again_is_served_from_its_new_run() {
        let c = MemoryCache::new(1 << 20);
        let obj = obj(1 << 20);
        c.insert_run(&obj, 0, &run_of(2, 1)).await;
        c.insert_run(&obj, 1, &run_of(2, 2)).await;
        assert_eq!(c.get(&obj.key(0)).await.unwrap().as_slice()[0], 1);
        assert_eq!(c.get(&obj.key(1)).await.unwrap().as_slice()[0], 2);
        // The first run has one block left; releasing it empties that run.
        c.release(&obj.key(0)).await;
        c.runs.run_pending_tasks().await;
        assert_eq!(c.runs.entry_count(), 1);
        assert_eq!(c.get(&obj.key(2)).await.unwrap().as_slice()[0], 2);
    }

    #[tokio::test]
    async fn evicted_runs_leave_no_index_behind() {
        let c = MemoryCache::new(64 * 1024);
        let obj = obj(1 << 30);
        for r in 0..200u64 {
            c.insert_run(&obj, r * 8, &run_of(8, r as u8)).await;
        }
        c.runs.run_pending_tasks().await;
        assert!(
            c.weighted_size() <= 64 * 1024 + 8 * 1088,
            "{}",
            c.weighted_size()
        );
        let indexed = c.index.lock().unwrap().len();
        assert!(indexed <= 8 * 9, "{indexed} blocks indexed");
        // What is indexed is served, with its own bytes.
        let last = c
            .get(&obj.key(199 * 8 + 3))
            .await
            .expect("newest run cached");
        assert_eq!(last.as_slice()[0], 199);
    }

    #[test]
    fn blocks_carry_the_crc32c_of_their_bytes() {
        let span = Bytes::from_static(b"0123456789abcdef");
        let b = Block::new(span.clone(), 4, 8);
        assert_eq!(b.crc32c(), crc32c::crc32c(b"456789ab"));
        assert!(b.is_intact());
        // A block read back with a CRC that does not match its bytes is caught.
        let bad = Block::with_crc32c(span, 4, 8, b.crc32c() ^ 1);
        assert!(!bad.is_intact());
    }

    #[tokio::test]
    async fn bounded_by_bytes() {
        let c = MemoryCache::new(4 << 20);
        for i in 0..64 {
            c.insert(key(i), Block::whole(Bytes::from(vec![0u8; 1 << 20])))
                .await;
            assert!(c.weighted_size() <= 5 << 20, "{}", c.weighted_size());
        }
        c.runs.run_pending_tasks().await;
        assert!(c.weighted_size() <= 4 << 20, "{}", c.weighted_size());
        c.insert(key(1000), Block::whole(Bytes::from_static(b"x")))
            .await;
        assert_eq!(c.get(&key(1000)).await.unwrap().as_slice(), b"x");
        assert!(c.get(&key(1001)).await.is_none());
        assert_eq!(c.stats().hits.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats().misses.load(Ordering::Relaxed), 1);
    }
}
