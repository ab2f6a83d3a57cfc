//! Memory in front of disk, behind the one cache interface.
//!
//! A block is looked up in memory, then on disk (checked against its CRC32C there, and kept
//! in memory for the next reader). New blocks go to both: to memory at once, to disk in the
//! background, one run per request. `release` frees memory only (the disk copy is what the
//! next epoch reads); `invalidate` drops both.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;

use super::cache::{Block, BlockCache, BlockKey, CacheStats, MemoryCache};
use super::disk::DiskCache;
use super::object::Object;

pub struct TieredCache {
    memory: MemoryCache,
    disk: Arc<DiskCache>,
    stats: CacheStats,
}

impl TieredCache {
    pub fn new(memory: MemoryCache, disk: Arc<DiskCache>) -> Self {
        TieredCache {
            memory,
            disk,
            stats: CacheStats::default(),
        }
    }

    pub fn disk(&self) -> &Arc<DiskCache> {
        &self.disk
    }
}

/// The object version of a key, for the disk tier (which only needs name and generation to
/// find it; size and CRC come from its own index).
fn key_object(key: &BlockKey, size: u64) -> Object {
    Object {
        name: key.object.clone(),
        generation: key.generation,
        size,
        crc32c: None,
    }
}

#[async_trait]
impl BlockCache for TieredCache {
    async fn get(&self, key: &BlockKey) -> Option<Block> {
        if let Some(b) = self.memory.get(key).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Some(b);
        }
        let (disk, k) = (self.disk.clone(), key.clone());
        let found = tokio::task::spawn_blocking(move || {
            let size = disk.size_of(&k.object, k.generation)?;
            disk.get(&key_object(&k, size), k.index)
        })
        .await
        .ok()
        .flatten();
        match found {
            Some(b) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.memory.insert(key.clone(), b.clone()).await;
                Some(b)
            }
            None => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    async fn insert(&self, key: BlockKey, block: Block) {
        self.memory.insert(key, block).await;
    }

    async fn insert_run(&self, obj: &Object, first: u64, blocks: &[Block]) {
        self.memory.insert_run(obj, first, blocks).await;
        self.disk.write_run(obj, first, blocks);
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.memory.contains(key)
            || self
                .disk
                .contains_key(&key.object, key.generation, key.index)
    }

    async fn release(&self, key: &BlockKey) {
        self.memory.release(key).await;
    }

    async fn release_part(&self, key: &BlockKey, bytes: u64) {
        self.memory.release_part(key, bytes).await;
    }

    async fn invalidate(&self, key: &BlockKey) {
        self.memory.invalidate(key).await;
        if let Some(size) = self.disk.size_of(&key.object, key.generation) {
            self.disk.invalidate(&key_object(key, size));
        }
    }

    async fn drop_unproven(&self, key: &BlockKey, right: Option<u32>) {
        self.memory.drop_unproven(key, right).await;
    }

    fn weighted_size(&self) -> u64 {
        self.memory.weighted_size()
    }

    fn stats(&self) -> &CacheStats {
        &self.stats
    }
}
