//! The block cache: fixed-size pieces of object versions, bounded by bytes.
//!
//! Keys name an object *version* (name + generation), so a cached block can never be served
//! for a different version. Every block carries the CRC32C of its bytes from the moment it
//! arrives, so any tier (memory now, disk next) can check a block before it is served.
//! [`BlockCache`] is the one interface of every tier; it keeps two operations apart that look
//! alike: [`BlockCache::release`] ("this memory may go: the bytes are safe elsewhere") and
//! [`BlockCache::invalidate`] ("these bytes are wrong: drop them everywhere"). A persistent
//! tier keeps its copy on the first and deletes it on the second. [`MemoryCache`] is moka
//! weighed by bytes. De-duplication of concurrent fetches lives in the read path
//! (`read::fetch`), which fetches runs of blocks in one request.

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
        let crc32c = crc32c::crc32c(&span[start..start + len]);
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
        crc32c::crc32c(self.as_slice()) == self.crc32c
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

    /// The block's bytes are wrong (or belong to a version found bad): drop it from every
    /// tier.
    async fn invalidate(&self, key: &BlockKey);

    /// Bytes currently held.
    fn weighted_size(&self) -> u64;

    fn stats(&self) -> &CacheStats;
}

pub struct MemoryCache {
    inner: moka::future::Cache<BlockKey, Block, foldhash::fast::RandomState>,
    capacity: u64,
    /// Bytes inserted since eviction last ran: moka evicts in batches, so without a nudge a
    /// fast reader could overshoot the bound by whatever arrives between batches.
    since_maintenance: AtomicU64,
    stats: CacheStats,
}

impl MemoryCache {
    /// A cache holding at most `capacity` bytes of block data.
    pub fn new(capacity: u64) -> Self {
        let inner = moka::future::Cache::builder()
            .max_capacity(capacity)
            // Plain LRU: moka's default (TinyLFU) refuses to admit new entries that are seen
            // less often than old ones, which for a streaming reader means read-ahead blocks
            // are dropped on arrival and fetched again.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|_k: &BlockKey, v: &Block| -> u32 {
                // Key and bookkeeping overhead is small next to a block; count the payload.
                (v.len() as u64 + 64).min(u32::MAX as u64) as u32
            })
            // Keys are hashed on every block lookup (32 per MiB read): a fast hasher, not SipHash.
            .build_with_hasher(foldhash::fast::RandomState::default());
        MemoryCache {
            inner,
            capacity,
            since_maintenance: AtomicU64::new(0),
            stats: CacheStats::default(),
        }
    }
}

#[async_trait]
impl BlockCache for MemoryCache {
    async fn get(&self, key: &BlockKey) -> Option<Block> {
        let r = self.inner.get(key).await;
        match r {
            Some(_) => &self.stats.hits,
            None => &self.stats.misses,
        }
        .fetch_add(1, Ordering::Relaxed);
        r
    }

    async fn insert(&self, key: BlockKey, block: Block) {
        let n = block.len() as u64;
        self.inner.insert(key, block).await;
        if self.since_maintenance.fetch_add(n, Ordering::Relaxed) + n > self.capacity / 16 {
            self.since_maintenance.store(0, Ordering::Relaxed);
            self.inner.run_pending_tasks().await;
        }
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.inner.contains_key(key)
    }

    async fn release(&self, key: &BlockKey) {
        self.inner.invalidate(key).await;
    }

    async fn invalidate(&self, key: &BlockKey) {
        self.inner.invalidate(key).await;
    }

    fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    fn stats(&self) -> &CacheStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        c.inner.run_pending_tasks().await;
        for i in 100..104 {
            assert!(c.contains(&key(i)), "block {i} was not admitted");
        }
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
        c.inner.run_pending_tasks().await;
        assert!(c.weighted_size() <= 4 << 20, "{}", c.weighted_size());
        c.insert(key(1000), Block::whole(Bytes::from_static(b"x")))
            .await;
        assert_eq!(c.get(&key(1000)).await.unwrap().as_slice(), b"x");
        assert!(c.get(&key(1001)).await.is_none());
        assert_eq!(c.stats().hits.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats().misses.load(Ordering::Relaxed), 1);
    }
}
