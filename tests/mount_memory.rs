//! Memory stays bounded by `--cache-size` while far more data than that streams through.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "mem";
const N_FILES: usize = 8;
const FILE_SIZE: usize = 40 * MIB;
const CACHE_MIB: u64 = 64;
/// Allowance on top of the cache: runtime, buffers in flight, metadata, allocator slack.
const OVERHEAD_MIB: u64 = 64;

#[test]
fn rss_stays_bounded_by_cache_size() {
    let seed = tempfile::tempdir().unwrap();
    let mut hashes = Vec::new();
    for i in 0..N_FILES {
        let data = random_bytes(9000 + i as u64, FILE_SIZE);
        hashes.push(sha256_hex(&data));
        seed_file(seed.path(), BUCKET, &format!("big/part{i}.bin"), &data);
    }
    let gcs = FakeGcs::start(seed.path());
    let m = Mount::start(&gcs, BUCKET, &["--cache-size", "64MiB"]);
    let pid = m.pid();
    let baseline = rss_kib(pid).unwrap_or(0);

    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };

    // Two readers at once, each streaming half of the files.
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for r in 0..2 {
            let (m, hashes) = (&m, &hashes);
            s.spawn(move || {
                for i in (r..N_FILES).step_by(2) {
                    let got = sha256_file(&m.join(format!("big/part{i}.bin")));
                    assert_eq!(got, hashes[i], "part{i}.bin\n{}", m.diag());
                }
            });
        }
    });
    let elapsed = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid).unwrap_or(0);
    let hwm = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    let report = memory_report(pid);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    // VmHWM is the kernel's own peak; sampling is a cross-check.
    let peak_kib = peak.load(Ordering::Relaxed).max(after).max(hwm);
    let total_mib = (N_FILES * FILE_SIZE / MIB) as f64;
    eprintln!(
        "MEMORY: physiofs --cache-size 64MiB read {total_mib} MiB in {:.1} s ({:.0} MiB/s): \
         RSS baseline {} KiB, peak {} KiB ({:.1} MiB), after {} KiB; {samples} samples; {report}",
        elapsed.as_secs_f64(),
        total_mib / elapsed.as_secs_f64(),
        baseline,
        peak_kib,
        peak_kib as f64 / 1024.0,
        after
    );
    assert!(samples > 5, "too few RSS samples ({samples})");
    let limit_kib = (CACHE_MIB + OVERHEAD_MIB) * 1024;
    assert!(
        peak_kib < limit_kib,
        "peak RSS {peak_kib} KiB exceeds {limit_kib} KiB (cache {CACHE_MIB} MiB + {OVERHEAD_MIB} MiB overhead); {report}\n{}",
        m.diag()
    );
    m.unmount();
}

/// Bytes handed to the kernel's page cache are not kept a second time in the block cache: a
/// streamed file leaves the cache empty (each block fetched once), the next read is served by
/// the kernel with no request, and an O_DIRECT reader (which bypasses the page cache) still
/// gets exact bytes and keeps its blocks cached.
#[test]
fn served_bytes_live_in_the_page_cache_not_twice() {
    const SIZE: usize = 48 * MIB;
    let seed = tempfile::tempdir().unwrap();
    let data = random_bytes(4242, SIZE);
    let want = sha256_hex(&data);
    seed_file(seed.path(), BUCKET, "stream.bin", &data);
    let gcs = FakeGcs::start(seed.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let m = Mount::start(&gcs, BUCKET, &["--metrics-addr", &addr]);
    let metric = |name| prometheus_metric(&addr, name);
    let file = m.join("stream.bin");

    // The first read goes through a locked mapping: its faults are FUSE reads like read()'s,
    // and the pages it brings in stay resident, so the second read below meets a page cache
    // the kernel could not reclaim in between (a busy machine does reclaim fresh file pages).
    let pinned = PinnedMapping::new(&file, SIZE);
    assert_eq!(sha256_hex(pinned.bytes()), want, "{}", m.diag());
    let fetched = metric("bytes_fetched_total");
    assert_eq!(
        fetched,
        SIZE as u64,
        "every byte fetched once\n{}",
        m.diag()
    );
    let cached = metric("cache_bytes");
    assert!(
        cached < 4 * MIB as u64,
        "{cached} bytes still cached after the kernel got them all\n{}",
        m.diag()
    );
    let gets = metric("get_requests_total");
    assert_eq!(sha256_file(&file), want);
    assert_eq!(
        metric("get_requests_total"),
        gets,
        "second read from the page cache"
    );
    drop(pinned);

    // O_DIRECT: no page cache, so the blocks are fetched again and stay in our cache.
    let direct = || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dd if='{}' iflag=direct bs=1M status=none | sha256sum",
                file.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(direct(), want, "O_DIRECT read\n{}", m.diag());
    assert!(metric("bytes_fetched_total") > fetched);
    assert!(
        metric("cache_bytes") >= SIZE as u64,
        "O_DIRECT reads keep their blocks"
    );
    let gets = metric("get_requests_total");
    assert_eq!(direct(), want);
    assert_eq!(
        metric("get_requests_total"),
        gets,
        "second O_DIRECT read from the cache"
    );
    m.unmount();
}

/// A later epoch meets a page cache that lost a few pages of a file (memory pressure, or a
/// host's proactive reclaim: this VM's DAMON `pageout` takes a few MB now and then). The
/// kernel then reads just those pages, at some page inside the file. physiofs fetches from
/// there to the file's end in one request (the later holes are then at hand), not the whole
/// object again, and a refill that reaches a file's end sets off no walk prefetch of the
/// next files, which are still in the page cache. The pages before each hole are pinned
/// (mlock), so nothing but the holes made here can be missing before them.
#[test]
fn pages_the_page_cache_lost_are_refilled_from_the_first_hole_on() {
    const SIZE: usize = 1_500_000; // a JPG's size: fetched whole by a cold read
    const HOLE: usize = 120; // page; its byte offset is a block boundary (15 x 32 KiB)
    let seed = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("p10/s0{i}/img.jpg")).collect();
    let datas: Vec<Vec<u8>> = (0..8).map(|i| random_bytes(600 + i, SIZE)).collect();
    for (n, d) in names.iter().zip(&datas) {
        seed_file(seed.path(), BUCKET, n, d);
    }
    let gcs = FakeGcs::start(seed.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let m = Mount::start(&gcs, BUCKET, &["--metrics-addr", &addr]);
    let metric = |name| prometheus_metric(&addr, name);
    // The first epoch: every file whole, in key order (so the walk prefetch is on).
    for (n, d) in names.iter().zip(&datas) {
        assert_eq!(sha256_file(&m.join(n)), sha256_hex(d), "{}", m.diag());
    }
    std::thread::sleep(Duration::from_millis(300)); // walk prefetches land
    let drop_pages = |path: &std::path::Path, from: usize, pages: usize| {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let len = pages * 4096; // 0: to the end
        // SAFETY: a plain advice call on an open descriptor.
        let r = unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                (from * 4096) as i64,
                len as i64,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0, "posix_fadvise");
    };

    // Two holes in file 2: four pages at HOLE, two further on.
    let file = m.join(&names[2]);
    let pinned = PinnedMapping::new(&file, HOLE * 4096);
    drop_pages(&file, HOLE, 4);
    drop_pages(&file, HOLE + 150, 2);
    let (gets, fetched) = (metric("get_requests_total"), metric("bytes_fetched_total"));
    // The first hole: what it fetches is all the file costs. (Usually one request; two when
    // a block after the hole is still cached from the first epoch, say a page this VM's
    // reclaim took then, refilled in part.)
    let mut hole = vec![0u8; 4 * 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&file).unwrap(),
        &mut hole,
        (HOLE * 4096) as u64,
    )
    .unwrap();
    assert_eq!(hole, datas[2][HOLE * 4096..(HOLE + 4) * 4096]);
    let gets_hole = metric("get_requests_total");
    assert!(gets_hole > gets, "{}", m.diag());
    assert_eq!(sha256_file(&file), sha256_hex(&datas[2]), "{}", m.diag());
    let got = metric("bytes_fetched_total") - fetched;
    assert!(
        got > 0 && got <= (SIZE - HOLE * 4096) as u64,
        "fetched {got} bytes: from the hole on is {}, the whole object {SIZE}\n{}",
        SIZE - HOLE * 4096,
        m.diag()
    );
    assert_eq!(
        metric("get_requests_total"),
        gets_hole,
        "the second hole cost a request\n{}",
        m.diag()
    );
    drop(pinned);

    // The last pages of file 4: refilled, and the files after it are not fetched again.
    let file = m.join(&names[4]);
    let tail = SIZE / 4096 - 3;
    let pinned = PinnedMapping::new(&file, tail * 4096);
    drop_pages(&file, tail, 0);
    let (prefetched, gets) = (
        metric("files_prefetched_total"),
        metric("get_requests_total"),
    );
    assert_eq!(sha256_file(&file), sha256_hex(&datas[4]), "{}", m.diag());
    std::thread::sleep(Duration::from_millis(300));
    // One request, or none when its block is still cached from the first epoch.
    assert!(metric("get_requests_total") - gets <= 1, "{}", m.diag());
    assert_eq!(
        metric("files_prefetched_total"),
        prefetched,
        "a refill of a file's last pages prefetched the next files\n{}",
        m.diag()
    );
    drop(pinned);
    m.unmount();
}

/// A random reader keeps nothing in the block cache, not even the blocks it read in part (each
/// would pin its whole receive buffer): 200 unaligned 64 KiB reads at scattered offsets leave
/// the cache nearly empty, where keeping part-blocks left about two per read (~12 MiB), and
/// every read gets exact bytes.
#[test]
fn random_reads_leave_no_part_blocks_cached() {
    use std::os::unix::fs::FileExt;
    const SIZE: usize = 64 * MIB;
    let seed = tempfile::tempdir().unwrap();
    let data = random_bytes(77, SIZE);
    seed_file(seed.path(), BUCKET, "random.bin", &data);
    let gcs = FakeGcs::start(seed.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let m = Mount::start(&gcs, BUCKET, &["--metrics-addr", &addr]);
    let f = std::fs::File::open(m.join("random.bin")).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut x: u64 = 12345;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((x >> 11) % (SIZE - buf.len()) as u64) | 1; // unaligned
        f.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(
            &buf[..],
            &data[off as usize..off as usize + buf.len()],
            "read at {off}"
        );
    }
    // What stays cached is read-ahead at most: a random reader whose reads the kernel splits
    // into touching pieces opens small windows it may never read, which the cache's LRU
    // bounds. Part-blocks kept would add up to two 32 KiB blocks per read (~12 MiB here).
    let cached = prometheus_metric(&addr, "cache_bytes");
    let ahead = prometheus_metric(&addr, "prefetch_bytes_total");
    assert!(
        cached < ahead + MIB as u64,
        "{cached} bytes cached after 200 random reads, {ahead} of read-ahead\n{}",
        m.diag()
    );
    // Most of them were fetched as exactly their range (the first read, and reads whose
    // blocks were at hand, take blocks).
    let direct = prometheus_metric(&addr, "direct_reads_total");
    assert!(
        direct >= 100,
        "{direct} of 200 random reads fetched as their range\n{}",
        m.diag()
    );
    drop(f);
    m.unmount();
}

/// A program that reads big pieces from a file's start (`dd bs=1M`, Python's `f.read()`)
/// makes the kernel send a whole 1 MiB piece as the open's first read: physiofs opens its
/// read-ahead window on that piece, on a fresh mount, instead of growing one over several
/// first-byte latencies. A header read (16 KiB) and `cat`'s 128 KiB reads make smaller first
/// pieces (the kernel reads ahead 4x and 4x of them) and read nothing ahead.
#[test]
fn a_large_first_read_opens_the_read_ahead_window_at_once() {
    use std::io::Read;
    const SIZE: usize = 24 * MIB;
    let seed = tempfile::tempdir().unwrap();
    let datas: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(900 + i, SIZE)).collect();
    for (i, d) in datas.iter().enumerate() {
        seed_file(seed.path(), BUCKET, &format!("big/{i}.bin"), d);
    }
    let gcs = FakeGcs::start(seed.path());
    let addr = format!("127.0.0.1:{}", free_port());
    let m = Mount::start(&gcs, BUCKET, &["--metrics-addr", &addr]);
    let ahead = || prometheus_metric(&addr, "prefetch_bytes_total");
    let first_read = |i: usize, len: usize| {
        let mut f = std::fs::File::open(m.join(format!("big/{i}.bin"))).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(buf, datas[i][..len], "{}", m.diag());
    };
    first_read(0, 16 << 10);
    first_read(1, 128 << 10);
    assert_eq!(
        ahead(),
        0,
        "small first reads read nothing ahead\n{}",
        m.diag()
    );
    first_read(2, MIB);
    let got = ahead();
    assert!(
        got >= 16 * MIB as u64,
        "a 1 MiB first read read {got} bytes ahead, want the 16 MiB window\n{}",
        m.diag()
    );
    m.unmount();
}

/// A read-only shared mapping of a whole file, populated and locked in memory (`mlock`) as it
/// is made, so its pages stay in the page cache until it is dropped.
struct PinnedMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl PinnedMapping {
    fn new(path: &std::path::Path, len: usize) -> Self {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: a fresh read-only shared mapping of an open file, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: ptr..ptr+len is the mapping made above.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_SEQUENTIAL);
            assert_eq!(
                libc::mlock(ptr, len),
                0,
                "mlock: {}",
                std::io::Error::last_os_error()
            );
        }
        PinnedMapping { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is readable, populated and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for PinnedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new, unmapped once.
        unsafe {
            libc::munlock(self.ptr, self.len);
            libc::munmap(self.ptr, self.len);
        }
    }
}
