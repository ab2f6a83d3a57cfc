//! Unit tests of the core (metadata and, through it, the read path) against the fake client.
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
    let visited = fs.inodes().visited();
    // Pages of 5, each resumed at the offset the previous page handed out.
    let (mut got, mut offset, mut pages) = (Vec::new(), 0, 0u64);
    let mut offsets = Vec::new();
    loop {
        pages += 1;
        offsets.push(offset);
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
    // Each page resumes where the last ended: it offers the children it returns and the one
    // that did not fit, never stepping over earlier ones (which made paging quadratic).
    let children = all.len() as u64 - 2;
    assert!(
        fs.inodes().visited() - visited <= children + pages,
        "{} children visited for {children} in {pages} pages",
        fs.inodes().visited() - visited
    );
    // A copy of the entries (a directory answered after a listing) pages with the same offsets.
    let copy = fs.entries(many.ino).await.unwrap();
    for (i, &offset) in offsets.iter().enumerate() {
        let mut page = Vec::new();
        fs.entries_from_copy(many.ino, &copy, offset, |_, e| {
            page.push(e.name.to_string());
            page.len() == 5
        });
        let want: Vec<String> = got.iter().skip(i * 5).take(5).cloned().collect();
        assert_eq!(page, want, "page from offset {offset}");
    }
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
            .read_for_kernel(fh, out.len() as u64, 1 << 20, true)
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

/// Waits for every fetch in flight (read-ahead, walk prefetch) to land in the cache. The
/// fake client answers at once, so this takes a few scheduler turns; a fetch still in flight
/// after seconds is a hang, and fails the test instead of letting it assert on a half-done
/// state.
async fn settle(fs: &Fs) {
    for _ in 0..2000 {
        if fs.reader().fetcher().in_flight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "{} blocks still in flight after 10 s",
        fs.reader().fetcher().in_flight()
    );
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
            let (d, s) = fs.read_for_kernel(fh, 0, 16384, true).await.unwrap();
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
async fn a_first_whole_kernel_piece_at_zero_reads_ahead_at_once() {
    let c = Arc::new(FakeClient::new("b"));
    let size = 40_000_000;
    for i in 0..3u8 {
        c.put(&format!("big/{i}.bin"), data(size, i));
    }
    let cfg = FsConfig {
        next_files: 0,
        ..Default::default()
    };
    let window = cfg.readahead_max / 4;
    let fs = loaded_with(&c, cfg).await;
    let ahead = || fs.stats().prefetch_bytes.load(Ordering::Relaxed);
    let first_read = |i: u8, len: u64| {
        let fs = &fs;
        async move {
            let ino = path(fs, &format!("big/{i}.bin")).await.unwrap().ino;
            let fh = fs.open(ino, false).unwrap();
            let before = ahead();
            read_checked(fs, fh, &data(size, i), 0, len, true).await;
            let got = ahead() - before;
            settle(fs).await;
            fs.release(fh);
            got
        }
    };
    // dd bs=1M on a fresh mount: the first 1 MiB piece opens the window (to the request
    // boundary past it).
    let got = first_read(0, crate::read::KERNEL_READ).await;
    assert!(got >= window, "read ahead {got}, want >= {window}");
    // A header scan's first read (the kernel's 64 KiB), and cat's (512 KiB): none.
    assert_eq!(first_read(1, 65536).await, 0);
    assert_eq!(first_read(2, 512 << 10).await, 0);
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
    let (tail, _) = fs
        .read_for_kernel(fh, 1 << 20, 1 << 20, true)
        .await
        .unwrap();
    assert_eq!(&tail[..], &body[1 << 20..]);
    let (head, _) = fs.read_for_kernel(fh, 0, 1 << 20, true).await.unwrap();
    assert_eq!(&head[..], &body[..1 << 20]);
    assert_eq!(gets(), 1, "one request for the whole object");
    settle(&fs).await;
    // A big object's first read still fetches only what it asks (a header scan).
    let ino = path(&fs, "big.dcm").await.unwrap().ino;
    let fh = fs.open(ino, false).unwrap();
    let (d, _) = fs.read_for_kernel(fh, 1 << 20, 16384, true).await.unwrap();
    let big = data(13_000_000, 9);
    assert_eq!(&d[..], &big[1 << 20..(1 << 20) + 16384]);
    assert_eq!(gets(), 2);
    let (d, _) = fs.read_for_kernel(fh, 0, 4096, true).await.unwrap();
    assert_eq!(&d[..], &big[..4096]);
    assert_eq!(gets(), 3, "the start of the big object was not fetched");
}

#[tokio::test]
async fn pages_the_page_cache_lost_are_refilled_from_there_on() {
    // A later epoch whose page cache lost a few pages here and there (memory pressure, or
    // proactive reclaim): the kernel's first read of an open is the first hole, at some page
    // in the file. One request fetches from there to the end (the reader's later holes in the
    // file are then at hand), not the bytes before it; one that reaches the file's end sets
    // off no walk prefetch: the next files are in the page cache.
    let c = Arc::new(FakeClient::new("b"));
    let names: Vec<String> = (0..12).map(|i| format!("p1/s{i:02}/img.jpg")).collect();
    let size = |i: usize| 1_600_000 + i;
    for (i, n) in names.iter().enumerate() {
        c.put(n, data(size(i), i as u8));
    }
    let cfg = FsConfig {
        next_files: 3,
        ..Default::default()
    };
    let fs = loaded_with(&c, cfg).await;
    let (gets, bytes) = (
        || c.get_calls.load(Ordering::Relaxed),
        || c.get_bytes.load(Ordering::Relaxed),
    );
    let prefetched = || fs.stats().files_prefetched.load(Ordering::Relaxed);
    // The first epoch: whole files in key order, so the walk prefetch is on (files 4-6).
    for (i, n) in names.iter().enumerate().take(4) {
        assert_eq!(read_whole(&fs, n).await, data(size(i), i as u8));
    }
    settle(&fs).await;
    assert_eq!(prefetched(), 3);
    // Reads of one open, each a hole: (offset, length).
    let refill = |i: usize, holes: Vec<(u64, u64)>| {
        let (fs, n) = (fs.clone(), names[i].clone());
        async move {
            let a = path(&fs, &n).await.unwrap();
            let fh = fs.open(a.ino, false).unwrap();
            let want = data(size(i), i as u8);
            for (offset, len) in holes {
                read_checked(&fs, fh, &want, offset, len, true).await;
            }
            fs.release(fh);
            settle(&fs).await;
        }
    };
    // Three pages at page 200 of file 8 (block 25 starts there), then two further on.
    let (g, b) = (gets(), bytes());
    refill(8, vec![(200 * 4096, 3 * 4096), (300 * 4096, 2 * 4096)]).await;
    assert_eq!(gets(), g + 1, "one request for both holes");
    assert_eq!(bytes() - b, size(8) as u64 - 200 * 4096, "from the hole on");
    // The last pages of file 9, up to its end.
    let last = size(9) as u64 / 4096 * 4096 - 4096;
    refill(9, vec![(last, size(9) as u64 - last)]).await;
    assert_eq!(gets(), g + 2);
    assert_eq!(
        prefetched(),
        3,
        "a refill at a file's end prefetches nothing"
    );
    // A reader's first piece at 1 MiB (the kernel's pieces of a whole-file read arrive in
    // any order) still fetches the whole object, and reaching the end still counts.
    let b = bytes();
    refill(10, vec![(1 << 20, size(10) as u64 - (1 << 20))]).await;
    assert!(bytes() - b >= size(10) as u64, "file 10 was fetched whole");
    assert_eq!(prefetched(), 4, "the file after 10 was fetched ahead");
    assert_eq!(gets(), g + 4, "file 10 whole in one request, and file 11");
}

/// The kernel's pieces of a whole-file read of a small object, the one at 1 MiB first: the
/// first fetches the object whole, and its part goes to the page cache (and leaves ours)
/// before the piece at 0 comes. That piece must not ask again for what the first asked for.
/// (CI caught this as 49 GETs for 48 JPGs in `mount_metadata`, once in a few dozen runs.)
#[tokio::test]
async fn a_small_object_read_from_its_second_piece_first_costs_one_request() {
    let c = Arc::new(FakeClient::new("b"));
    let size = (1 << 20) + 143_224;
    c.put("x.jpg", data(size, 7));
    let cfg = FsConfig {
        next_files: 0,
        ..Default::default()
    };
    let fs = loaded_with(&c, cfg).await;
    let (gets, bytes) = (
        || c.get_calls.load(Ordering::Relaxed),
        || c.get_bytes.load(Ordering::Relaxed),
    );
    let want = data(size, 7);
    let a = path(&fs, "x.jpg").await.unwrap();
    let fh = fs.open(a.ino, false).unwrap();
    read_checked(&fs, fh, &want, 1 << 20, size as u64 - (1 << 20), true).await;
    settle(&fs).await;
    read_checked(&fs, fh, &want, 0, 1 << 20, true).await;
    settle(&fs).await;
    fs.release(fh);
    assert_eq!(gets(), 1, "the object whole, once");
    assert_eq!(bytes(), size as u64, "each byte fetched once");
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

    // A header scan (first bytes of each file, in order) never reads to the end: no
    // whole-file walk, but the header walk fetches the start of the next files (these small
    // objects whole, as their first read would) from the fifth on.
    let fs = loaded_with(&c, FsConfig::default()).await;
    for (i, n) in names.iter().enumerate() {
        let a = path(&fs, n).await.unwrap();
        let before = gets();
        let fh = fs.open(a.ino, false).unwrap();
        let (got, s) = fs.read_for_kernel(fh, 0, 16384, true).await.unwrap();
        assert_eq!(got[..], data(100_000 + i, i as u8)[..16384], "{n}");
        fs.served(s).await;
        fs.release(fh);
        settle(&fs).await;
        if i >= 5 {
            assert_eq!(gets(), before, "{n}'s start was fetched ahead");
        }
    }
    let st = fs.stats();
    let headers = st.headers_prefetched.load(Ordering::Relaxed);
    assert_eq!(st.files_prefetched.load(Ordering::Relaxed), headers);
    assert_eq!(headers, 16, "files 5-20");

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
    let obj = fs.reader().object_of(fh).unwrap();
    let key = |index| obj.key(index);
    let m = 1u64 << 20;
    let (got, served) = fs
        .read_for_kernel(fh, m / 2, (2 * m) as u32, true)
        .await
        .unwrap();
    assert_eq!(got.len() as u64, 2 * m);
    for i in 0..=2 {
        assert!(
            fs.cache().contains(&key(i)),
            "block {i} cached after the read"
        );
    }
    // The kernel got bytes 0.5..2.5 MiB: only block 1 was covered whole.
    fs.served(served).await;
    assert!(fs.cache().contains(&key(0)));
    assert!(
        !fs.cache().contains(&key(1)),
        "a block served whole is dropped"
    );
    assert!(fs.cache().contains(&key(2)));
    // The tail block counts as whole when served up to the end of the object.
    let before = c.requests();
    let (tail, served) = fs.read_for_kernel(fh, 5 * m, 4096, true).await.unwrap();
    assert_eq!(tail.len(), 123);
    // ... even when the handle was released first (the reader closed the file).
    fs.release(fh);
    fs.served(served).await;
    assert!(!fs.cache().contains(&key(5)));
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

/// Reads `len` bytes at `off` through `fh` as the kernel would, checks them against `src`,
/// and (as the adapter does) reports them served only when bound for the page cache.
async fn read_checked(fs: &Fs, fh: u64, src: &[u8], off: u64, len: u64, buffered: bool) {
    let (got, served) = fs
        .read_for_kernel(fh, off, len as u32, buffered)
        .await
        .unwrap();
    assert_eq!(&got[..], &src[off as usize..(off + len) as usize]);
    if buffered {
        fs.served(served).await;
    }
}

/// A random reader's reads (jumps in a big object) leave nothing in the cache, part-blocks
/// included: it seldom reads next to its last read, and a kept part-block pins the whole
/// receive buffer it came in. A first read and a sequential one keep their part-blocks.
#[tokio::test]
async fn a_random_readers_part_blocks_leave_the_cache_too() {
    let m = 1u64 << 20;
    let c = Arc::new(FakeClient::new("b"));
    let src = data(20 * m as usize, 7);
    c.put("big.bin", src.clone());
    let cfg = FsConfig {
        block_size: m,
        ..Default::default()
    };
    let fs = loaded_with(&c, cfg).await;
    let a = path(&fs, "big.bin").await.unwrap();
    let fh = fs.open(a.ino, false).unwrap();
    let obj = fs.reader().object_of(fh).unwrap();
    let cached = |i| fs.cache().contains(&obj.key(i));
    let read = |off: u64, len: u64| read_checked(&fs, fh, &src, off, len, true);
    // The first read, then two jumps, each across a block boundary.
    read(m + m / 2, m).await;
    read(10 * m + m / 2, m).await;
    read(16 * m + m / 2, m).await;
    assert!(cached(1) && cached(2), "a first read keeps its part-blocks");
    for i in [10, 11, 16, 17] {
        assert!(!cached(i), "block {i} of a random read is still cached");
    }
    // A read continuing the last one is no jump, but still a random reader's (the kernel
    // sends a random read in touching pieces when the pages between are cached): its
    // part-block at the end goes too.
    read(17 * m + m / 2, 3 * m / 4).await;
    assert!(!cached(18), "a random reader's part-block is still cached");
    settle(&fs).await;
}

/// A random read for the page cache fetches exactly its bytes in one request and caches
/// nothing (its blocks would leave at once); one not for the page cache (`O_DIRECT`) fetches
/// blocks and keeps them, and a random read whose block is at hand takes it.
#[tokio::test]
async fn a_random_read_for_the_page_cache_fetches_just_its_bytes() {
    let m = 1u64 << 20;
    let c = Arc::new(FakeClient::new("b"));
    let src = data(20 * m as usize, 9);
    c.put("big.bin", src.clone());
    let cfg = FsConfig {
        block_size: m,
        ..Default::default()
    };
    let fs = loaded_with(&c, cfg).await;
    let a = path(&fs, "big.bin").await.unwrap();
    let fh = fs.open(a.ino, false).unwrap();
    let obj = fs.reader().object_of(fh).unwrap();
    let cached = |i| fs.cache().contains(&obj.key(i));
    let fetched = || {
        (
            c.get_calls.load(Ordering::Relaxed),
            c.get_bytes.load(Ordering::Relaxed),
        )
    };
    let read = |off: u64, len: u64, buffered: bool| read_checked(&fs, fh, &src, off, len, buffered);
    // A first read fetches its blocks.
    read(m + m / 2, 4096, true).await;
    assert_eq!(fs.reader().stats().direct_reads.load(Ordering::Relaxed), 0);
    // A jump: exactly its bytes, one request, nothing cached.
    let before = fetched();
    read(10 * m + 100, 65536, true).await;
    assert_eq!(fetched(), (before.0 + 1, before.1 + 65536));
    assert!(!cached(10));
    assert_eq!(fs.reader().stats().direct_reads.load(Ordering::Relaxed), 1);
    // Not for the page cache: whole blocks, kept.
    let before = fetched();
    read(16 * m + 5, 65536, false).await;
    assert_eq!(fetched(), (before.0 + 1, before.1 + m));
    assert!(cached(16));
    // A random read inside a block at hand takes it: no request.
    let before = fetched();
    read(16 * m + 70_000, 1000, true).await;
    read(3 * m, 1000, true).await;
    assert_eq!(fetched().0, before.0 + 1, "only the read at 3 MiB asked");
    assert_eq!(fs.reader().stats().direct_reads.load(Ordering::Relaxed), 2);
    settle(&fs).await;
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
