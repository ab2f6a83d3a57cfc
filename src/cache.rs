//! The block cache: fixed-size pieces of object versions, bounded by bytes.
//!
//! Keys name an object *version* (name + generation), so a cached block can never be served
//! for a different version. [`BlockCache`] is a trait so a disk tier can sit behind the memory
//! one later; [`MemoryCache`] is moka weighed by bytes, which also de-duplicates concurrent
//! fetches of the same block (two readers of one block cause one request).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;

use crate::client::ClientError;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct BlockKey {
    pub object: Arc<str>,
    pub generation: i64,
    pub index: u64,
}

#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

#[async_trait]
pub trait BlockCache: Send + Sync + 'static {
    /// The block for `key`, running `fetch` only if it is neither cached nor being fetched.
    async fn get_or_fetch(
        &self,
        key: BlockKey,
        fetch: BoxFuture<'static, Result<Bytes, ClientError>>,
    ) -> Result<Bytes, ClientError>;

    /// Whether the block is cached right now (no fetch).
    fn contains(&self, key: &BlockKey) -> bool;

    /// Bytes currently held.
    fn weighted_size(&self) -> u64;

    fn stats(&self) -> &CacheStats;
}

pub struct MemoryCache {
    inner: moka::future::Cache<BlockKey, Bytes>,
    stats: CacheStats,
}

impl MemoryCache {
    /// A cache holding at most `capacity` bytes of block data.
    pub fn new(capacity: u64) -> Self {
        let inner = moka::future::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_k: &BlockKey, v: &Bytes| -> u32 {
                // Key and bookkeeping overhead is small next to a block; count the payload.
                (v.len() as u64 + 64).min(u32::MAX as u64) as u32
            })
            .build();
        MemoryCache {
            inner,
            stats: CacheStats::default(),
        }
    }
}

#[async_trait]
impl BlockCache for MemoryCache {
    async fn get_or_fetch(
        &self,
        key: BlockKey,
        fetch: BoxFuture<'static, Result<Bytes, ClientError>>,
    ) -> Result<Bytes, ClientError> {
        if let Some(b) = self.inner.get(&key).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.inner
            .try_get_with(key, fetch)
            .await
            .map_err(|e: Arc<ClientError>| (*e).clone())
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.inner.contains_key(key)
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

    fn key(i: u64) -> BlockKey {
        BlockKey {
            object: Arc::from("o"),
            generation: 1,
            index: i,
        }
    }

    #[tokio::test]
    async fn bounded_by_bytes_and_dedups() {
        let c = MemoryCache::new(4 << 20);
        for i in 0..64 {
            let b = c
                .get_or_fetch(
                    key(i),
                    Box::pin(async { Ok(Bytes::from(vec![0u8; 1 << 20])) }),
                )
                .await
                .unwrap();
            assert_eq!(b.len(), 1 << 20);
        }
        c.inner.run_pending_tasks().await;
        assert!(c.weighted_size() <= 4 << 20, "{}", c.weighted_size());
        // A cached block is not fetched again.
        let k = key(1000);
        c.get_or_fetch(k.clone(), Box::pin(async { Ok(Bytes::from_static(b"x")) }))
            .await
            .unwrap();
        let again = c
            .get_or_fetch(k, Box::pin(async { panic!("fetched twice") }))
            .await
            .unwrap();
        assert_eq!(&again[..], b"x");
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let c = MemoryCache::new(1 << 20);
        let e = c
            .get_or_fetch(
                key(0),
                Box::pin(async { Err(ClientError::Malformed("x".into())) }),
            )
            .await;
        assert!(e.is_err());
        let ok = c
            .get_or_fetch(key(0), Box::pin(async { Ok(Bytes::from_static(b"y")) }))
            .await
            .unwrap();
        assert_eq!(&ok[..], b"y");
    }
}
