//! Byte ranges of object versions, from the block cache or the network: the one way any part
//! of physiofs gets object bytes.
//!
//! Everything is keyed by an [`Object`] (a pinned version) and a byte range, not by an open
//! file, so an open handle, the walk prefetch (files no one has opened yet), and later the
//! disk fill and `warm` all go through the same code. A range becomes the cache blocks it
//! touches; cached blocks are served from the cache, blocks already being fetched join that
//! fetch (a shared future), and each run of the rest is one ranged GET, cut at multiples of
//! `max_request` in the object so a stream is fetched in identical pieces whose receive
//! buffers are recycled (`client::pool`). Read-ahead in flight is bounded by a budget of
//! block permits, so memory stays bounded however many files are read at once. Every other
//! GET (demand reads, the rest of a small object) waits its turn in a budget of its own, of
//! bytes and of requests ([`super::budget`]): its blocks are registered in flight when the fetch is decided, before
//! it waits, so a second reader of them joins it instead of fetching them again, and each GET
//! runs in a task of its own, so a granted fetch never waits on whoever happens to await it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::budget::{Budget, Gauge};
use super::cache::{Block, BlockCache, BlockKey};
pub use super::object::Object;
use crate::client::{ClientError, ObjectClient};

/// A block being fetched, or read back from the cache; clones await the same work.
pub type SharedFetch = Shared<BoxFuture<'static, Result<Block, ClientError>>>;

/// The blocks one GET brings, shared by every block's future of that GET.
type SharedSpan = Shared<BoxFuture<'static, Result<Arc<[Block]>, ClientError>>>;

/// Fetches in flight, by block (hashed on every block a read touches: foldhash, not SipHash).
type InflightMap = HashMap<BlockKey, SharedFetch, foldhash::fast::RandomState>;

pub struct Fetcher {
    client: Arc<dyn ObjectClient>,
    cache: Arc<dyn BlockCache>,
    block_size: u64,
    max_request: u64,
    /// Permits of one block each for read-ahead in flight.
    permits: Arc<tokio::sync::Semaphore>,
    /// Bytes of every other GET in flight (demand reads, the rest of a small object).
    demand: Budget,
    /// Bytes of all media GETs in flight (read-ahead and the rest).
    gauge: Arc<Gauge>,
    inflight: Arc<Mutex<InflightMap>>,
}

/// The demand budget that goes with a read-ahead budget of `read_ahead` bytes: as much again,
/// and at least four full requests (so a few readers of big objects are never serialized).
pub fn demand_budget(read_ahead: u64, max_request: u64) -> u64 {
    read_ahead.max(4 * max_request)
}

/// Demand GETs that may be in flight at once with a read-ahead budget of `read_ahead` bytes:
/// the connections the HTTP client keeps for reuse (`plan.rs` sizes its pool with this), the
/// read-ahead budget in full requests and 16 beside them. Small reads (one 32 KiB block each)
/// would otherwise have up to the byte budget / 32 KiB GETs in flight, each its own
/// connection and task.
pub fn demand_requests(read_ahead: u64, max_request: u64) -> u64 {
    read_ahead / max_request.max(1) + 16
}

impl Fetcher {
    /// `budget` bytes of read-ahead may be in flight at once, and [`demand_budget`] bytes in
    /// [`demand_requests`] GETs of the other ones.
    pub fn new(
        client: Arc<dyn ObjectClient>,
        cache: Arc<dyn BlockCache>,
        block_size: u64,
        max_request: u64,
        budget: u64,
    ) -> Self {
        let block_size = block_size.max(1);
        let max_request = max_request.max(block_size);
        Fetcher {
            client,
            cache,
            block_size,
            max_request,
            permits: Arc::new(tokio::sync::Semaphore::new((budget / block_size) as usize)),
            demand: Budget::new(
                demand_budget(budget, max_request),
                demand_requests(budget, max_request),
            ),
            gauge: Arc::default(),
            inflight: Arc::default(),
        }
    }

    /// The same with a demand budget of `bytes` and `requests` instead.
    pub fn with_demand_budget(mut self, bytes: u64, requests: u64) -> Self {
        self.demand = Budget::new(bytes, requests);
        self
    }

    /// The budget (bytes and requests) of demand reads and whole small objects.
    pub fn demand_budget(&self) -> &Budget {
        &self.demand
    }

    /// The most bytes media GETs ever had in flight at once: at most the read-ahead budget
    /// plus the demand budget (or one GET larger than that alone).
    pub fn peak_bytes_in_flight(&self) -> u64 {
        self.gauge.peak()
    }

    pub fn cache(&self) -> &Arc<dyn BlockCache> {
        &self.cache
    }

    pub fn client(&self) -> &Arc<dyn ObjectClient> {
        &self.client
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Blocks being fetched now.
    pub fn in_flight(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }

    /// The blocks `range` touches (empty for an empty range).
    fn blocks_of(&self, obj: &Object, range: &Range<u64>) -> Option<(u64, u64)> {
        let end = range.end.min(obj.size);
        (range.start < end).then(|| (range.start / self.block_size, (end - 1) / self.block_size))
    }

    /// Bytes `range` of `obj` (cut at its end): from the cache where it holds them, joined to
    /// fetches in flight, or fetched now. The entry point for whoever needs bytes.
    pub async fn read(&self, obj: &Object, range: Range<u64>) -> Result<Bytes, ClientError> {
        let waits = self.demand(obj, range.clone());
        let (data, _) =
            assemble(self.block_size, waits, range.start, range.end.min(obj.size)).await?;
        Ok(data)
    }

    /// Futures for every block of `range`: what a reader waits for. Cached blocks resolve
    /// from the cache, blocks in flight join that fetch, the rest are fetched now.
    pub fn demand(&self, obj: &Object, range: Range<u64>) -> Vec<SharedFetch> {
        match self.blocks_of(obj, &range) {
            Some((first, last)) => self.fetch_blocks(obj, first, last, true, false),
            None => Vec::new(),
        }
    }

    /// Fetches exactly `range` of `obj` (cut at its end) in one request, within the demand
    /// budget, and caches nothing: for a random read, whose blocks would leave the cache as
    /// soon as it is served, so fetching whole blocks only cost more bytes (a 64 KiB read at
    /// a random offset covers three 32 KiB blocks) and cache work. Returns the bytes and their
    /// CRC32C. None when a block of the range is cached or in flight: those bytes are at hand
    /// or on their way, and the read takes them.
    pub fn direct(
        &self,
        obj: &Object,
        range: Range<u64>,
    ) -> Option<BoxFuture<'static, Result<(Bytes, u32), ClientError>>> {
        let (first, last) = self.blocks_of(obj, &range)?;
        {
            let inflight = self.inflight.lock().unwrap();
            let held = (first..=last).any(|i| {
                let k = obj.key(i);
                inflight.contains_key(&k) || self.cache.contains(&k)
            });
            if held {
                return None;
            }
        }
        let (start, end) = (range.start, range.end.min(obj.size));
        let ticket = self.demand.reserve(end - start);
        let (client, gauge, o) = (self.client.clone(), self.gauge.clone(), obj.clone());
        Some(
            async move {
                let _grant = ticket.await;
                let _counted = gauge.enter(end - start);
                let (data, crcs) = client
                    .get_range_blocks(o.version(), start, end, end - start)
                    .await?;
                match crcs[..] {
                    [crc] if data.len() as u64 == end - start => Ok((data, crc)),
                    _ => Err(wrong_length(&o, start, end, data.len())),
                }
            }
            .boxed(),
        )
    }

    /// Fetches the blocks of `range` that are neither cached nor in flight, in the background
    /// and within the demand budget, not the read-ahead one (the rest of a small object a
    /// reader is reading). Returns how many blocks it asked for.
    pub fn background(&self, obj: &Object, range: Range<u64>) -> u64 {
        let Some((first, last)) = self.blocks_of(obj, &range) else {
            return 0;
        };
        // Each GET runs in its own task (`start_fetch`): nobody needs to await these.
        self.fetch_blocks(obj, first, last, false, false).len() as u64
    }

    /// Fetches the missing blocks of `range` ahead of a reader, within the read-ahead budget:
    /// one request at a time, stopping at the first the budget cannot hold (the reader then
    /// fetches on demand). Returns how many blocks it asked for.
    pub fn prefetch(&self, obj: &Object, range: Range<u64>) -> u64 {
        let Some((first, last)) = self.blocks_of(obj, &range) else {
            return 0;
        };
        let per_request = self.max_request / self.block_size;
        let mut start = first;
        let mut asked = 0;
        while start <= last {
            let stop = ((start / per_request + 1) * per_request - 1).min(last);
            let n = (stop - start + 1) as u32;
            let Ok(permit) = self.permits.clone().try_acquire_many_owned(n) else {
                return asked;
            };
            let waits = self.fetch_blocks(obj, start, stop, false, true);
            asked += waits.len() as u64;
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

    /// The kernel's page cache holds blocks `blocks` of `obj` now: free their memory.
    pub async fn release(&self, obj: &Object, blocks: Range<u64>) {
        for index in blocks {
            self.cache.release(&obj.key(index)).await;
        }
    }

    /// The kernel's page cache got `bytes` of block `index` of `obj` (a read covering it in
    /// part): the block's memory is freed once all of its bytes went there.
    pub async fn release_part(&self, obj: &Object, index: u64, bytes: u64) {
        self.cache.release_part(&obj.key(index), bytes).await;
    }

    /// A verified handle read block `index` of `obj` in parts, whose bytes have CRC32C
    /// `right` (None: the parts did not tile it): drop the copy in memory unless it is
    /// that one (`BlockCache::drop_unproven`).
    pub async fn drop_unproven(&self, obj: &Object, index: u64, right: Option<u32>) {
        self.cache.drop_unproven(&obj.key(index), right).await;
    }

    /// Bytes of `obj` were found wrong: drop all of its blocks from every tier.
    pub async fn invalidate(&self, obj: &Object) {
        for index in 0..obj.size.div_ceil(self.block_size) {
            self.cache.invalidate(&obj.key(index)).await;
        }
    }

    /// Futures for blocks `first..=last`: cached ones read from the cache, blocks being
    /// fetched join that fetch, and each run of the rest is fetched with one ranged GET
    /// (split at `max_request`). With `demand` false, cached and in-flight blocks are
    /// skipped and only the started fetches are returned. `read_ahead`: the caller holds
    /// read-ahead permits for these blocks; other GETs wait their turn in the demand budget.
    fn fetch_blocks(
        &self,
        obj: &Object,
        first: u64,
        last: u64,
        demand: bool,
        read_ahead: bool,
    ) -> Vec<SharedFetch> {
        let per_request = self.max_request / self.block_size;
        let mut out = Vec::new();
        let mut inflight = self.inflight.lock().unwrap();
        let mut run: Option<u64> = None; // start of the current run of missing blocks
        for i in first..=last + 1 {
            let missing = i <= last && {
                let k = obj.key(i);
                if let Some(f) = inflight.get(&k) {
                    if demand {
                        out.push((i, f.clone()));
                    }
                    false
                } else if self.cache.contains(&k) {
                    if demand {
                        out.push((i, self.cached(obj, k)));
                    }
                    false
                } else {
                    true
                }
            };
            match (missing, run) {
                (true, None) => run = Some(i),
                (true, Some(s)) if i - s == per_request => {
                    out.extend(self.start_fetch(obj, s, i - 1, read_ahead, &mut inflight));
                    run = Some(i);
                }
                (false, Some(s)) => {
                    out.extend(self.start_fetch(obj, s, i - 1, read_ahead, &mut inflight));
                    run = None;
                }
                _ => {}
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, f)| f).collect()
    }

    /// A cached block, or (evicted between the check and the get) that one block fetched,
    /// within the demand budget.
    fn cached(&self, obj: &Object, key: BlockKey) -> SharedFetch {
        let (cache, client, obj, bs) = (
            self.cache.clone(),
            self.client.clone(),
            obj.clone(),
            self.block_size,
        );
        let (budget, gauge) = (self.demand.clone(), self.gauge.clone());
        async move {
            match cache.get(&key).await {
                Some(b) => Ok(b),
                None => {
                    let s = key.index * bs;
                    let e = (s + bs).min(obj.size);
                    let _grant = budget.reserve(e - s).await;
                    let _counted = gauge.enter(e - s);
                    let data = client.get_range(obj.version(), s, e).await?;
                    if data.len() as u64 != e - s {
                        return Err(wrong_length(&obj, s, e, data.len()));
                    }
                    Ok(Block::whole(data))
                }
            }
        }
        .boxed()
        .shared()
    }

    /// Registers one GET for blocks `a..=b` and returns a future per block. The blocks are
    /// cut (and checksummed) once, when the bytes arrive, and go to the cache before the
    /// fetch leaves the in-flight map, so no reader can miss both. Unless `read_ahead` (whose
    /// permits the caller holds), the GET takes its place in the demand budget's queue now
    /// and waits there, registered: whoever needs its blocks meanwhile joins it. It runs in a
    /// task of its own, so once granted it proceeds whoever awaits it (a reader awaits its
    /// blocks in order, and might be waiting on another fetch still queued behind this one).
    fn start_fetch(
        &self,
        obj: &Object,
        a: u64,
        b: u64,
        read_ahead: bool,
        inflight: &mut InflightMap,
    ) -> Vec<(u64, SharedFetch)> {
        let bs = self.block_size;
        let (start, end) = (a * bs, ((b + 1) * bs).min(obj.size));
        let (client, cache, registry, o) = (
            self.client.clone(),
            self.cache.clone(),
            self.inflight.clone(),
            obj.clone(),
        );
        let ticket = (!read_ahead).then(|| self.demand.reserve(end - start));
        let gauge = self.gauge.clone();
        let span: SharedSpan = async move {
            let grant = match ticket {
                Some(t) => Some(t.await),
                None => None,
            };
            let counted = gauge.enter(end - start);
            // An answer of another length is refused before anything is cut (`wrong_length`).
            let r = client
                .get_range_blocks(o.version(), start, end, bs)
                .await
                .and_then(|(data, crcs)| {
                    if data.len() as u64 == end - start && crcs.len() as u64 == b - a + 1 {
                        Ok((data, crcs))
                    } else {
                        Err(wrong_length(&o, start, end, data.len()))
                    }
                })
                .map(|(data, crcs)| {
                    (a..=b)
                        .zip(crcs)
                        .map(|(i, crc)| {
                            let from = ((i - a) * bs) as usize;
                            let to = (from + bs as usize).min(data.len());
                            Block::with_crc32c(data.clone(), from, to - from, crc)
                        })
                        .collect::<Arc<[Block]>>()
                });
            // Landed: the bytes are the cache's to bound now.
            drop((counted, grant));
            if let Ok(blocks) = &r {
                cache.insert_run(&o, a, blocks).await;
            }
            let mut m = registry.lock().unwrap();
            for i in a..=b {
                m.remove(&o.key(i));
            }
            r
        }
        .boxed()
        .shared();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(span.clone().map(drop));
        }
        (a..=b)
            .map(|i| {
                let f: SharedFetch = span
                    .clone()
                    .map(move |r| r.map(|blocks| blocks[(i - a) as usize].clone()))
                    .boxed()
                    .shared();
                inflight.insert(obj.key(i), f.clone());
                (i, f)
            })
            .collect()
    }
}

/// An answer of another length than asked: refused before anything is cut from it or cached
/// (a client bug or a broken server must fail the read, not panic).
fn wrong_length(obj: &Object, start: u64, end: u64, got: usize) -> ClientError {
    ClientError::Malformed(format!(
        "{}: asked for bytes {start}..{end}, got {got} bytes",
        obj.name
    ))
}

/// A block a read covered only in part: (block, from, to, CRC32C of those bytes).
pub type Part = (u64, u32, u32, u32);

/// Waits for the blocks of `[offset, end)` (in order, the first holding `offset`) and returns
/// those bytes (one slice of one GET's buffer when they all came from it, the usual case, no
/// copy; else a copy of the pieces) and their CRC32C: combined from the blocks' own CRCs where
/// a block is covered whole, computed only over the parts of blocks at the edges, so the
/// whole-object check costs no second pass over the bytes.
pub async fn assemble(
    bs: u64,
    waits: Vec<SharedFetch>,
    offset: u64,
    end: u64,
) -> Result<(Bytes, u32), ClientError> {
    let (data, crc, _) = assemble_parts(bs, waits, offset, end).await?;
    Ok((data, crc))
}

/// [`assemble`], plus the blocks at the read's edges that it covered only in part (at most
/// two), for the handle's record of cut blocks (`verify::CutBlocks`).
pub async fn assemble_parts(
    bs: u64,
    waits: Vec<SharedFetch>,
    offset: u64,
    end: u64,
) -> Result<(Bytes, u32, [Option<Part>; 2]), ClientError> {
    let mut edges = [None, None];
    if offset >= end {
        return Ok((Bytes::new(), 0, edges));
    }
    let mut blocks = Vec::with_capacity(waits.len());
    for w in waits {
        blocks.push(w.await?);
    }
    let first = offset / bs;
    let mut crc = 0u32;
    let mut parts = Vec::with_capacity(blocks.len());
    for (i, b) in (first..).zip(&blocks) {
        let bstart = i * bs;
        let from = (offset.max(bstart) - bstart) as usize;
        let to = (end.min(bstart + b.len() as u64) - bstart) as usize;
        let part = if from == 0 && to == b.len() {
            b.crc32c()
        } else {
            let c = crate::crc::crc32c(&b.as_slice()[from..to]);
            edges[usize::from(i != first)] = Some((i, from as u32, to as u32, c));
            c
        };
        crc = super::crc::combine(crc, part, to - from);
        parts.push((from, to));
    }
    let start = (offset - first * bs) as usize;
    let len = (end - offset) as usize;
    if blocks.windows(2).all(|w| w[0].followed_by(&w[1])) {
        return Ok((blocks[0].slice_on(start, start + len), crc, edges));
    }
    let mut out = BytesMut::with_capacity(len);
    for (b, (from, to)) in blocks.iter().zip(parts) {
        out.extend_from_slice(&b.as_slice()[from..to]);
    }
    Ok((out.freeze(), crc, edges))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fake::FakeClient;
    use crate::read::MemoryCache;
    use futures::FutureExt;
    use std::sync::atomic::Ordering;

    fn setup(budget: u64) -> (Arc<FakeClient>, Fetcher, Object) {
        let c = Arc::new(FakeClient::new("b"));
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let m = c.put("o", data);
        let f = Fetcher::new(
            c.clone(),
            Arc::new(MemoryCache::new(1 << 20)),
            1000,
            4000,
            budget,
        );
        let obj = Object {
            name: Arc::from("o"),
            generation: m.generation,
            size: m.size,
            crc32c: m.crc32c,
        };
        (c, f, obj)
    }

    fn want(range: Range<u64>) -> Vec<u8> {
        range.map(|i| ((i as u32) * 7) as u8).collect()
    }

    #[tokio::test]
    async fn ranges_of_an_object_version_without_any_handle() {
        let (c, f, obj) = setup(0);
        // Unaligned, across blocks and request boundaries, cut at the end of the object.
        for r in [
            0..1,
            999..1001,
            1500..3600,
            3500..8200,
            9990..20_000,
            5000..5000,
        ] {
            let got = f.read(&obj, r.clone()).await.unwrap();
            assert_eq!(got.as_ref(), &want(r.start..r.end.min(10_000))[..], "{r:?}");
        }
        // Everything is cached now: reading it all again costs nothing.
        let before = c.get_calls.load(Ordering::Relaxed);
        assert_eq!(
            f.read(&obj, 0..10_000).await.unwrap().as_ref(),
            &want(0..10_000)[..]
        );
        assert_eq!(c.get_calls.load(Ordering::Relaxed), before);
        assert_eq!(f.in_flight(), 0);
    }

    /// The CRC32C `assemble` returns (combined from block CRCs, computed over edge parts) is
    /// that of the bytes it returns: aligned and unaligned, within a block and across blocks
    /// from one GET (a slice) or from several (a copy).
    #[tokio::test]
    async fn assembled_bytes_come_with_their_crc32c() {
        let (_c, f, obj) = setup(0);
        // Blocks 4000.. come from separate GETs (requests of 4,000 bytes).
        for r in [
            0..1000,
            0..10_000,
            1..999,
            500..3500,
            3999..4001,
            2000..9000,
            9000..10_000,
        ] {
            let waits = f.demand(&obj, r.clone());
            let (data, crc) = assemble(1000, waits, r.start, r.end).await.unwrap();
            assert_eq!(data.as_ref(), &want(r.clone())[..], "{r:?}");
            assert_eq!(crc, crc32c::crc32c(&data), "{r:?}");
        }
    }

    #[tokio::test]
    async fn concurrent_readers_of_a_range_share_its_requests() {
        let (c, f, obj) = setup(0);
        let (a, b) = tokio::join!(f.read(&obj, 0..8000), f.read(&obj, 2000..6000));
        assert_eq!(a.unwrap().as_ref(), &want(0..8000)[..]);
        assert_eq!(b.unwrap().as_ref(), &want(2000..6000)[..]);
        // 8,000 bytes in requests of at most 4,000: two GETs, shared by both readers.
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn read_ahead_stays_within_its_budget() {
        // A budget of 3 blocks: a request of 4 blocks does not fit, one of 3 does.
        let (c, f, obj) = setup(3000);
        assert_eq!(f.prefetch(&obj, 0..4000), 0);
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 0);
        assert_eq!(f.prefetch(&obj, 4000..7000), 3);
        // The permits are held until the fetch lands: nothing more fits meanwhile.
        assert_eq!(f.prefetch(&obj, 8000..9000), 0);
        // Once it landed (a few scheduler turns: the fake answers at once), it does.
        let mut asked = 0;
        for _ in 0..1000 {
            tokio::task::yield_now().await;
            asked = f.prefetch(&obj, 8000..9000);
            if asked > 0 {
                break;
            }
        }
        assert_eq!(asked, 1);
    }

    /// Scheduler turns until `cond` holds (the fake answers at once; GETs run in tasks).
    async fn until(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if cond() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        cond()
    }

    #[tokio::test]
    async fn a_demand_fetch_waiting_for_the_budget_is_joined_not_repeated() {
        let (c, f, obj) = setup(0);
        let f = f.with_demand_budget(2000, 100);
        // Someone holds the whole demand budget.
        let held = f.demand_budget().reserve(2000).await;
        let (mut a, mut b) = (
            Box::pin(f.read(&obj, 0..2000)),
            Box::pin(f.read(&obj, 500..1500)),
        );
        for _ in 0..50 {
            assert!((&mut a).now_or_never().is_none());
            assert!((&mut b).now_or_never().is_none());
            tokio::task::yield_now().await;
        }
        // The first reader's GET (blocks 0 and 1) waits registered; the second joined it.
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 0);
        assert_eq!(f.demand_budget().waiting(), 1);
        assert_eq!(f.in_flight(), 2);
        // Read-ahead of the same blocks joins too (nothing to start).
        assert_eq!(f.prefetch(&obj, 0..2000), 0);
        drop(held);
        assert_eq!(a.await.unwrap().as_ref(), &want(0..2000)[..]);
        assert_eq!(b.await.unwrap().as_ref(), &want(500..1500)[..]);
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 1);
        assert!(until(|| f.in_flight() == 0).await);
        assert_eq!(f.demand_budget().gauge().peak(), 2000);
    }

    #[tokio::test]
    async fn demand_fetches_are_granted_in_arrival_order() {
        let (c, f, obj) = setup(0);
        let f = f.with_demand_budget(2000, 100);
        let held = f.demand_budget().reserve(1500).await;
        // Blocks 2..5 (3,000 bytes, more than the budget) arrive first, then block 9, which
        // would fit in what is left but waits behind them.
        let big = f.demand(&obj, 2000..5000);
        let small = f.demand(&obj, 9000..9500);
        assert_eq!(f.demand_budget().waiting(), 2);
        assert!(!until(|| c.get_calls.load(Ordering::Relaxed) > 0).await);
        // Once the budget is free the oversized one goes alone, then the small one.
        drop(held);
        let got = assemble(1000, big, 2000, 5000).await.unwrap().0;
        assert_eq!(got.as_ref(), &want(2000..5000)[..]);
        let got = assemble(1000, small, 9000, 9500).await.unwrap().0;
        assert_eq!(got.as_ref(), &want(9000..9500)[..]);
        // An oversized request is counted at its size, alone: never more than that at once.
        assert_eq!(f.demand_budget().gauge().peak(), 3000);
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn readers_of_more_than_the_budget_all_finish_within_it() {
        let (c, f, obj) = setup(0);
        let f = Arc::new(f.with_demand_budget(2000, 100));
        let readers: Vec<_> = (0..10u64)
            .map(|i| {
                let (f, obj) = (f.clone(), obj.clone());
                tokio::spawn(async move { f.read(&obj, i * 1000..i * 1000 + 1000).await })
            })
            .collect();
        for (i, r) in readers.into_iter().enumerate() {
            let i = i as u64;
            let got = r.await.unwrap().unwrap();
            assert_eq!(got.as_ref(), &want(i * 1000..i * 1000 + 1000)[..]);
        }
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 10);
        assert!(f.demand_budget().gauge().peak() <= 2000);
        assert!(f.peak_bytes_in_flight() <= 2000);
    }

    #[tokio::test]
    async fn many_small_demand_reads_stay_within_the_request_cap() {
        let (c, f, obj) = setup(0);
        // Bytes for every block at once, slots for two GETs.
        let f = Arc::new(f.with_demand_budget(1 << 20, 2));
        // Both slots taken: ten one-block reads queue, registered, with no GET sent.
        let held = (
            f.demand_budget().reserve(1).await,
            f.demand_budget().reserve(1).await,
        );
        let readers: Vec<_> = (0..10u64)
            .map(|i| {
                let (f, obj) = (f.clone(), obj.clone());
                tokio::spawn(async move { f.read(&obj, i * 1000 + 10..i * 1000 + 20).await })
            })
            .collect();
        assert!(until(|| f.demand_budget().waiting() == 10).await);
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 0);
        assert_eq!(f.in_flight(), 10);
        drop(held);
        for (i, r) in readers.into_iter().enumerate() {
            let i = i as u64;
            let got = r.await.unwrap().unwrap();
            assert_eq!(got.as_ref(), &want(i * 1000 + 10..i * 1000 + 20)[..]);
        }
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 10);
        let peak = f.demand_budget().requests_gauge().peak();
        assert!((1..=2).contains(&peak), "{peak} GETs in flight at once");
        assert!(f.peak_bytes_in_flight() <= 2000);
    }

    #[tokio::test]
    async fn released_blocks_are_fetched_again_invalidated_ones_too() {
        let (c, f, obj) = setup(0);
        f.read(&obj, 0..3000).await.unwrap();
        f.release(&obj, 0..2).await;
        assert!(!f.cache().contains(&obj.key(0)));
        assert!(f.cache().contains(&obj.key(2)));
        let before = c.get_calls.load(Ordering::Relaxed);
        assert_eq!(
            f.read(&obj, 0..3000).await.unwrap().as_ref(),
            &want(0..3000)[..]
        );
        assert_eq!(c.get_calls.load(Ordering::Relaxed), before + 1);
        f.invalidate(&obj).await;
        assert!((0..10).all(|i| !f.cache().contains(&obj.key(i))));
    }
}
