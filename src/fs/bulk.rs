//! Loading a whole sub-tree's metadata with flat listings.
//!
//! Listing one directory per request costs one request per directory (~293,000 for
//! MIMIC-CXR). A flat listing (no delimiter) returns 1,000 objects per page whatever the
//! depth, so the whole tree costs about one request per 1,000 objects. To go fast the key
//! space is cut into contiguous ranges (`startOffset`/`endOffset`) at the first levels of
//! prefixes (for MIMIC-CXR: `files/p10/` … `files/p19/`), listed in parallel.
//!
//! A flat listing returns names in order, so a directory is complete as soon as its range's
//! listing has moved past it: it is marked listed then, not at the end of the whole load, and
//! a tree walk that starts right after mounting follows the load instead of listing each
//! directory itself. A readdir of a directory the load has not reached waits for it a little
//! (see [`BULK_WAIT`]) before listing the directory on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::try_join_all;

use super::{Fs, FsError};
use crate::client::ListRequest;
use crate::inode::{Kind, ROOT};

#[derive(Clone, Debug)]
pub struct BulkOptions {
    /// Key ranges listed at once.
    pub concurrency: usize,
    /// Target number of key ranges.
    pub ranges: usize,
    /// Stop (and stay lazy) past this many objects: a bucket this big is better browsed
    /// per directory than held in memory.
    pub max_objects: u64,
}

impl Default for BulkOptions {
    fn default() -> Self {
        BulkOptions {
            concurrency: 16,
            ranges: 16,
            max_objects: 3_000_000,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct BulkStats {
    pub objects: u64,
    pub list_requests: u64,
    pub elapsed: Duration,
    /// The whole tree is in the table (false: stopped at max_objects).
    pub complete: bool,
}

/// How long a readdir waits for the bulk load to reach its directory before listing it on
/// its own: a whole load takes seconds, but the range front passes a directory within a page
/// or two once a walk has caught up with it.
pub const BULK_WAIT: Duration = Duration::from_secs(1);

struct LoadingFlag<'a>(&'a Fs);
impl Drop for LoadingFlag<'_> {
    fn drop(&mut self) {
        self.0.bulk_loading.store(false, Ordering::Relaxed);
        self.0.bulk_progress.notify_waiters();
    }
}

/// Follows one key range's flat listing and marks each directory listed once the listing has
/// moved past it. `open` holds the directories containing the last name seen, from the top,
/// each with its full prefix when the directory lies wholly at or after the range start
/// (only such a directory can be complete from this range alone).
struct DirCloser {
    start: String,
    end: Option<String>,
    open: Vec<(u64, Option<String>)>,
}

impl DirCloser {
    fn new(start: &str, end: Option<&str>) -> Self {
        DirCloser {
            start: start.to_string(),
            end: end.map(str::to_string),
            open: Vec::new(),
        }
    }

    /// A name was listed and inserted as inode `ino`: directories not containing it are done.
    fn seen(&mut self, fs: &Fs, ino: u64) {
        let Some(v) = fs.inodes.get(ino) else { return };
        let mut chain = Vec::new();
        let mut cur = if v.kind == Kind::Dir { ino } else { v.parent };
        while cur != ROOT && cur != 0 {
            chain.push(cur);
            cur = fs.inodes.get(cur).map_or(0, |n| n.parent);
        }
        chain.reverse();
        let keep = self
            .open
            .iter()
            .zip(&chain)
            .take_while(|((a, _), b)| a == *b)
            .count();
        for (dir, prefix) in self.open.drain(keep..) {
            if prefix.is_some() {
                fs.inodes.mark_listed(dir);
            }
        }
        for &dir in &chain[keep..] {
            let prefix = format!("{}{}", fs.cfg.prefix, fs.inodes.rel_path(dir));
            let whole = prefix.as_str() >= self.start.as_str();
            self.open.push((dir, whole.then_some(prefix)));
        }
    }

    /// The range is listed to its end: directories still open are done if they end within it.
    fn finish(self, fs: &Fs) {
        for (dir, prefix) in self.open {
            let Some(p) = prefix else { continue };
            let inside = match (&self.end, prefix_end(&p)) {
                (None, _) => true,
                (Some(end), Some(pe)) => pe <= *end,
                (Some(_), None) => false,
            };
            if inside {
                fs.inodes.mark_listed(dir);
            }
        }
    }
}

/// Smallest string greater than every string starting with `p` (for `endOffset`).
fn prefix_end(p: &str) -> Option<String> {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(c) = chars.pop() {
        if let Some(next) = char::from_u32(c as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl Fs {
    /// Loads every object under the mount prefix into the inode table. Lookups that arrive
    /// meanwhile are answered with targeted requests.
    pub async fn bulk_load(self: &Arc<Self>, opts: &BulkOptions) -> Result<BulkStats, FsError> {
        // No drop of forgotten directories while the load fills the tree (it marks directories
        // complete by inode as it passes them); declared first, so it is released last.
        let _loading = self.inodes.loading();
        self.bulk_loading.store(true, Ordering::Relaxed);
        let _flag = LoadingFlag(self);
        let started = Instant::now();
        let requests = AtomicU64::new(0);

        // Discover range boundaries from the first two levels of directories.
        self.ensure_listed(ROOT).await?;
        // Listed for the load: kept like the rest of what it lists.
        self.inodes.mark_listed(ROOT);
        requests.fetch_add(1, Ordering::Relaxed);
        let level1: Vec<_> = self.dir_children(ROOT);
        let mut boundaries: Vec<String> = Vec::new();
        if level1.len() >= opts.ranges {
            boundaries = level1.iter().map(|(_, rel)| rel.clone()).collect();
        } else {
            let sem = tokio::sync::Semaphore::new(opts.concurrency);
            try_join_all(level1.iter().map(|(ino, _)| async {
                let _p = sem.acquire().await;
                requests.fetch_add(1, Ordering::Relaxed);
                self.ensure_listed(*ino).await?;
                self.inodes.mark_listed(*ino);
                Ok::<(), FsError>(())
            }))
            .await?;
            for (ino, rel) in &level1 {
                let sub = self.dir_children(*ino);
                if sub.is_empty() {
                    boundaries.push(rel.clone());
                } else {
                    boundaries.extend(sub.into_iter().map(|(_, r)| r));
                }
            }
        }
        boundaries.sort();
        // Merge neighbours down to about `ranges` contiguous key ranges starting at the
        // boundaries; the first starts at the mount prefix so nothing is missed.
        let step = boundaries.len().div_ceil(opts.ranges.max(1)).max(1);
        let mut starts: Vec<String> = vec![self.cfg.prefix.clone()];
        starts.extend(
            boundaries
                .iter()
                .skip(step)
                .step_by(step)
                .map(|b| format!("{}{b}", self.cfg.prefix)),
        );
        let end_all = prefix_end(&self.cfg.prefix).filter(|_| !self.cfg.prefix.is_empty());
        let ranges: Vec<(String, Option<String>)> = starts
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.clone(),
                    starts.get(i + 1).cloned().or_else(|| end_all.clone()),
                )
            })
            .collect();

        let objects = AtomicU64::new(0);
        let sem = tokio::sync::Semaphore::new(opts.concurrency);
        let results = futures::future::join_all(ranges.iter().map(|(start, end)| async {
            let _p = sem.acquire().await;
            let mut req = ListRequest {
                prefix: self.cfg.prefix.clone(),
                max_results: Some(1000),
                start_offset: Some(start.clone()),
                end_offset: end.clone(),
                ..Default::default()
            };
            let mut tokens = std::collections::HashSet::new();
            let mut closer = DirCloser::new(start, end.as_deref());
            loop {
                if objects.load(Ordering::Relaxed) > opts.max_objects {
                    return Ok::<bool, FsError>(false);
                }
                requests.fetch_add(1, Ordering::Relaxed);
                let page = self.client.list_page(&req).await?;
                for m in &page.items {
                    if let Some((ino, _)) = self.insert_meta(m) {
                        closer.seen(self, ino);
                    }
                }
                objects.fetch_add(page.items.len() as u64, Ordering::Relaxed);
                match page.next_page_token {
                    Some(t) if tokens.insert(t.clone()) => req.page_token = Some(t),
                    Some(_) => {
                        return Err(FsError::Client(crate::client::ClientError::Malformed(
                            "flat listing repeated a nextPageToken".into(),
                        )));
                    }
                    None => {
                        closer.finish(self);
                        self.bulk_progress.notify_waiters();
                        return Ok(true);
                    }
                }
                self.bulk_progress.notify_waiters();
            }
        }))
        .await;
        let mut complete = true;
        for r in results {
            match r {
                Ok(done) => complete &= done,
                Err(e) => {
                    tracing::warn!(error = %e, "bulk metadata load failed; directories will be listed on demand");
                    return Err(e);
                }
            }
        }
        if complete {
            self.inodes.mark_subtree_listed(ROOT);
        }
        Ok(BulkStats {
            objects: objects.load(Ordering::Relaxed),
            list_requests: requests.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            complete,
        })
    }

    /// While a bulk load runs and has not reached directory `dir`, waits for it (at most
    /// [`BULK_WAIT`]), so a readdir costs no listing of its own.
    pub(super) async fn await_bulk_load(&self, dir: u64) {
        let deadline = tokio::time::Instant::now() + BULK_WAIT;
        loop {
            let progress = self.bulk_progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if !self.bulk_loading.load(Ordering::Relaxed) || self.inodes.is_listed(dir) {
                return;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                return;
            }
        }
    }

    /// Child directories of `dir` as (inode, path relative to the mount root with a trailing `/`).
    fn dir_children(&self, dir: u64) -> Vec<(u64, String)> {
        let base = self.inodes.rel_path(dir);
        self.inodes
            .children(dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, v)| v.kind == Kind::Dir)
            .map(|(name, v)| (v.ino, format!("{base}{name}/")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::MemoryCache;
    use crate::client::fake::FakeClient;
    use crate::fs::FsConfig;

    #[test]
    fn prefix_end_is_tight() {
        assert_eq!(prefix_end("files/p10/").as_deref(), Some("files/p100"));
        assert_eq!(prefix_end("a").as_deref(), Some("b"));
        assert_eq!(prefix_end(""), None);
    }

    fn mimic_like(c: &FakeClient) -> usize {
        let mut n = 0;
        for top in ["LICENSE.txt", "SHA256SUMS.txt", "cxr-record-list.csv.gz"] {
            c.put(top, "t");
            n += 1;
        }
        for p in 10..20 {
            for s in 0..30 {
                let subj = format!("files/p{p}/p{p}{s:06}");
                c.put(&format!("{subj}/s5{s:07}.txt"), "r");
                c.put(&format!("{subj}/s5{s:07}/a.dcm"), "d");
                c.put(&format!("{subj}/s5{s:07}/b.dcm"), "d");
                n += 3;
            }
        }
        n
    }

    #[tokio::test]
    async fn loads_everything_with_few_requests() {
        let c = Arc::new(FakeClient::new("b").with_page_cap(50));
        let n = mimic_like(&c);
        let fs = Arc::new(Fs::new(
            FsConfig::default(),
            c.clone(),
            Arc::new(MemoryCache::new(1 << 20)),
        ));
        let st = fs.bulk_load(&BulkOptions::default()).await.unwrap();
        assert!(st.complete);
        assert_eq!(st.objects as usize, n);
        let lists = c.list_calls.load(Ordering::Relaxed) as usize;
        // 2 discovery listings + ceil(90/50) pages per pNN range
        assert!(lists <= 2 + 10 * 2, "{lists} list requests");
        assert_eq!(lists as u64, st.list_requests);
        // Everything answers from memory now: lookups, misses and readdir.
        let before = c.requests();
        let files = fs.lookup(ROOT, "files").await.unwrap();
        let p15 = fs.lookup(files.ino, "p15").await.unwrap();
        let fh = fs.opendir(p15.ino).await.unwrap();
        assert_eq!(fs.readdir(fh).unwrap().len(), 32);
        let subj = fs.lookup(p15.ino, "p15000007").await.unwrap();
        assert!(fs.lookup(subj.ino, "s50000007.txt").await.is_ok());
        assert!(matches!(
            fs.lookup(subj.ino, "missing").await,
            Err(FsError::NotFound)
        ));
        assert_eq!(c.requests(), before);
    }

    #[tokio::test]
    async fn directories_are_listed_as_the_listing_passes_them() {
        let c = Arc::new(FakeClient::new("b").with_page_cap(20));
        mimic_like(&c);
        let fs = Arc::new(Fs::new(
            FsConfig::default(),
            c.clone(),
            Arc::new(MemoryCache::new(1 << 20)),
        ));
        // Stopped early: one page per range, nothing marked by the end of the whole load.
        let st = fs
            .bulk_load(&BulkOptions {
                max_objects: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!st.complete);
        let t = fs.inodes();
        // The first range's first page: the 3 top-level names, then 17 of files/p10/ (3 per
        // subject): subjects 0..5 are complete, the one it stopped in and p10 itself are not.
        for s in 0..5 {
            let subj = t.find_dir(&format!("files/p10/p10{s:06}")).unwrap();
            assert!(t.is_listed(subj), "subject {s}");
            assert!(
                t.is_listed(
                    t.find_dir(&format!("files/p10/p10{s:06}/s5{s:07}"))
                        .unwrap()
                )
            );
        }
        assert!(!t.is_listed(t.find_dir("files/p10/p10000005").unwrap()));
        assert!(!t.is_listed(t.find_dir("files/p10").unwrap()));
        // A listed directory answers from memory, misses included.
        let before = c.requests();
        let subj = t.find_dir("files/p10/p10000002").unwrap();
        assert!(fs.lookup_cached(subj, "nope").is_some());
        assert_eq!(fs.entries(subj).await.unwrap().len(), 4);
        assert_eq!(c.requests(), before);
    }

    #[test]
    fn a_range_marks_only_directories_wholly_inside_it() {
        let fs = Fs::new(
            FsConfig::default(),
            Arc::new(FakeClient::new("b")),
            Arc::new(MemoryCache::new(1 << 20)),
        );
        let names = [
            "files/p10/p1000002/s1/a.dcm",
            "files/p10/p1000002/s1/b.dcm",
            "files/p10/p1000002/s2.txt",
            "files/p10/p1000003/s3/a.dcm",
            "files/p10/p1000004/empty/",
            "files/p10/p1000005/s5/a.dcm",
        ];
        // The range starts inside p10 (p10/ and files/ began in the previous range) and ends
        // inside p1000005/ (which the next range continues).
        let mut closer = DirCloser::new("files/p10/p1000002/", Some("files/p10/p1000005/s5/b"));
        for n in names {
            let ino = fs
                .inodes
                .insert_object(
                    n,
                    crate::inode::FileInfo {
                        size: 1,
                        mtime: std::time::UNIX_EPOCH,
                        generation: 1,
                        crc32c: None,
                    },
                )
                .unwrap();
            closer.seen(&fs, ino);
        }
        closer.finish(&fs);
        let listed = |d: &str| fs.inodes.is_listed(fs.inodes.find_dir(d).unwrap());
        for d in [
            "files/p10/p1000002",
            "files/p10/p1000002/s1",
            "files/p10/p1000003",
            "files/p10/p1000003/s3",
            "files/p10/p1000004",
            "files/p10/p1000004/empty",
        ] {
            assert!(listed(d), "{d} is wholly inside the range");
        }
        for d in [
            "files",
            "files/p10",
            "files/p10/p1000005",
            "files/p10/p1000005/s5",
        ] {
            assert!(!listed(d), "{d} continues outside the range");
        }
    }

    #[tokio::test]
    async fn prefix_mount_and_cap() {
        let c = Arc::new(FakeClient::new("b").with_page_cap(20));
        mimic_like(&c);
        let cfg = FsConfig {
            prefix: "files/p12/".into(),
            ..Default::default()
        };
        let fs = Arc::new(Fs::new(cfg, c.clone(), Arc::new(MemoryCache::new(1 << 20))));
        let st = fs.bulk_load(&BulkOptions::default()).await.unwrap();
        assert!(st.complete);
        assert_eq!(st.objects, 90);
        let capped = Arc::new(Fs::new(
            FsConfig::default(),
            c,
            Arc::new(MemoryCache::new(1 << 20)),
        ));
        let st = capped
            .bulk_load(&BulkOptions {
                max_objects: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!st.complete);
        // Not complete: directories are still listed on demand, correctly.
        let files = capped.lookup(ROOT, "files").await.unwrap();
        let fh = capped.opendir(files.ino).await.unwrap();
        assert_eq!(capped.readdir(fh).unwrap().len(), 12);
    }
}
