//! Bounds on what a huge bucket or a busy local user can make a real mount do: the work
//! behind a readdir of a huge flat directory, the mount still serving when the process is
//! out of descriptors, and the bytes and GETs that `O_DIRECT` readers (which the page cache
//! does not absorb) can have in flight. Each is counted (entries visited, CPU ticks, peaks of
//! bytes and requests in flight, the testbed's GETs), never timed.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Barrier;

use common::*;

const BUCKET: &str = "flat";

/// A testbed serving `BUCKET` from a local folder with `n` empty objects `big/f{i:06}` and a
/// small one.
fn flat_testbed(dir: &Path, n: usize) -> TestbedProc {
    let big = dir.join(BUCKET).join("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..n {
        std::fs::File::create(big.join(format!("f{i:06}"))).unwrap();
    }
    std::fs::write(dir.join(BUCKET).join("small.txt"), b"small\n").unwrap();
    TestbedProc::start(&["--dir", dir.to_str().unwrap(), "--addr", "127.0.0.1:0"])
}

/// `ls -f` of a 100,000-entry flat directory (readdir resumed at its offset ~1,000 times) is
/// complete and exact, in the eager and the lazy metadata modes, and the readdirs step over
/// each child about once: resuming at an offset never walks the entries before it.
#[test]
fn a_huge_flat_directory_lists_exactly_without_rescanning() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let tb = flat_testbed(dir.path(), N);
    let want: BTreeSet<String> = (0..N).map(|i| format!("f{i:06}")).collect();
    for mode in ["eager", "lazy"] {
        let addr = format!("127.0.0.1:{}", free_port());
        let args = tb.mount_args(
            BUCKET,
            &[
                "--metadata",
                mode,
                "--metadata-cache",
                "off",
                "--metrics-addr",
                &addr,
            ],
        );
        let m = Mount::start_with(&args, &[]);
        // Twice (the kernel may answer the second from its own cache).
        let before = prometheus_metric(&addr, "readdir_entries_visited_total");
        let first = ls_f(&m.join("big"));
        let names = ls_f(&m.join("big"));
        let visited = prometheus_metric(&addr, "readdir_entries_visited_total") - before;
        for got in [&first, &names] {
            assert_eq!(
                got.len(),
                N + 2,
                "{mode}: ls -f printed {} names",
                got.len()
            );
            let set: BTreeSet<String> = got
                .iter()
                .filter(|n| *n != "." && *n != "..")
                .cloned()
                .collect();
            assert!(set == want, "{mode}: the names differ from the bucket's");
        }
        // Each reply offers one entry that does not fit; ~1,000 replies for 100,000 names.
        // Skipping to the offset instead would have visited ~N²/2000 = 5 million per ls.
        let n = N as u64;
        assert!(
            (n / 2..=2 * (n + n / 10)).contains(&visited),
            "{mode}: {visited} children visited to list {N}"
        );
        assert_eq!(
            std::fs::read(m.join("small.txt")).unwrap(),
            b"small\n",
            "{mode}"
        );
        m.unmount();
    }
}

/// The metrics endpoint with the process out of descriptors: connections are opened until the
/// mount's descriptor table is full and its `accept` fails; the mount still serves exact reads
/// (over the connections its pool holds), and the failing `accept` costs next to no CPU (it
/// pauses instead of spinning).
#[test]
fn metrics_with_descriptors_exhausted_keeps_serving_without_spinning() {
    const FILES: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(BUCKET).join("d");
    std::fs::create_dir_all(&p).unwrap();
    for f in 0..FILES {
        std::fs::write(p.join(format!("f{f:02}")), random_bytes(f as u64, 100_000)).unwrap();
    }
    let tb = TestbedProc::start(&[
        "--dir",
        dir.path().to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let addr = format!("127.0.0.1:{}", free_port());
    let args = tb.mount_args(
        BUCKET,
        &["--metadata-cache", "off", "--metrics-addr", &addr],
    );
    let mut m = Mount::start_with(&args, &[]);
    // Warm the client's connection pool, then leave the process 4 spare descriptors.
    assert_eq!(
        std::fs::read(m.join("d/f00")).unwrap(),
        random_bytes(0, 100_000)
    );
    let pid = m.pid();
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let limit = open_fds() + 4;
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .unwrap();
    assert!(st.success(), "prlimit failed");
    // More connections than the endpoint serves at once and than descriptors are left; none
    // sends a request, so each holds its descriptor until the 5 s header timeout.
    let held: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let mut full = false;
    for _ in 0..50 {
        if open_fds() >= limit {
            full = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        full,
        "the mount's descriptors never ran out ({} of {limit})",
        open_fds()
    );
    let ticks_before = cpu_ticks(pid);
    for f in 1..FILES {
        let got = std::fs::read(m.join(format!("d/f{f:02}"))).unwrap();
        assert!(got == random_bytes(f as u64, 100_000), "d/f{f:02} differs");
    }
    // Stay out of descriptors a while (the held connections keep them taken).
    std::thread::sleep(std::time::Duration::from_secs(2));
    let spent = cpu_ticks(pid) - ticks_before;
    assert!(open_fds() >= limit - 1, "descriptors were freed early");
    // A busy accept loop burns every tick (about 200 in 2 s at 100 Hz).
    assert!(spent < 40, "{spent} CPU ticks while out of descriptors");
    drop(held);
    m.assert_alive();
    m.unmount();
}

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 of stat(5); after the comm field they are the 12th and 13th.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The names `ls -f` prints (one per line, unsorted, `.` and `..` included).
fn ls_f(dir: &Path) -> Vec<String> {
    let out = Command::new("ls").arg("-f").arg(dir).output().unwrap();
    assert!(out.status.success(), "ls -f {}: {:?}", dir.display(), out);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Opens `path` with `O_DIRECT`: every read goes to the mount, none is answered by (or fills)
/// the kernel's page cache.
fn open_direct(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", path.display()))
}

/// `len` bytes at `offset` of `f` (fewer at its end), read with `O_DIRECT` in pieces of at
/// most `piece` bytes into a page-aligned buffer (offsets and lengths multiples of 4 KiB).
fn pread_direct(f: &File, offset: u64, len: usize, piece: usize) -> Vec<u8> {
    let mut raw = vec![0u8; piece + 4096];
    let at = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[at..at + piece];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let want = piece.min(len - out.len()).next_multiple_of(4096);
        let n = f
            .read_at(&mut buf[..want], offset + out.len() as u64)
            .unwrap_or_else(|e| panic!("O_DIRECT pread at {}: {e}", offset + out.len() as u64));
        if n == 0 {
            break;
        }
        let keep = n.min(len - out.len());
        out.extend_from_slice(&buf[..keep]);
    }
    out
}

/// A testbed serving `BUCKET` from a local folder of `objects` (name, bytes), with
/// `first_byte_latency` before every answer.
fn folder_testbed(dir: &Path, objects: &[(String, &[u8])], latency: &str) -> TestbedProc {
    for (name, data) in objects {
        let p = dir.join(BUCKET).join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    TestbedProc::start(&[
        "--dir",
        dir.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--first-byte-latency",
        latency,
    ])
}

/// Many `O_DIRECT` readers at once (any local user can be one under `--allow-other`) wait in
/// the demand budget instead of growing memory: 32 readers of 32 distinct 4 MiB objects (each
/// fetched whole, 8 times the budget together) under 40 ms first-byte latency with a 32 MiB
/// cache (a 16 MiB demand budget) get exact bytes while the demand bytes in flight never pass
/// the budget; then 64 threads of 4 KiB `O_DIRECT` reads at scattered blocks of a 32 MiB
/// object (one 32 KiB GET each, 2 MiB in all: the byte budget alone would let all of them fly)
/// never have more GETs in flight than the request cap. The mount serves exact bytes after.
#[test]
fn o_direct_readers_stay_within_the_demand_budget_in_bytes_and_requests() {
    const READERS: usize = 32;
    const SIZE: usize = 4 * MIB;
    const BIG: usize = 32 * MIB;
    const BLOCK: usize = 32 * KIB;
    const THREADS: usize = 64;
    const READS: usize = 16; // per thread: THREADS * READS = every block of BIG once
    let dir = tempfile::tempdir().unwrap();
    let small: Vec<Vec<u8>> = (0..READERS)
        .map(|i| random_bytes(100 + i as u64, SIZE))
        .collect();
    let big = random_bytes(7, BIG);
    let mut objects: Vec<(String, &[u8])> = small
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("d/f{i:02}"), &d[..]))
        .collect();
    objects.push(("big.bin".to_string(), &big[..]));
    let tb = folder_testbed(dir.path(), &objects, "40ms");
    let addr = format!("127.0.0.1:{}", free_port());
    let args = tb.mount_args(
        BUCKET,
        &[
            "--cache-size",
            "32MiB",
            "--prefetch-files",
            "0",
            "--metadata-cache",
            "off",
            "--metrics-addr",
            &addr,
        ],
    );
    let mut m = Mount::start_with(&args, &[]);
    let metric = |name| prometheus_metric(&addr, name);
    let budget = metric("demand_budget_bytes");
    let slots = metric("demand_budget_requests");
    // What the test relies on: the readers together want far more than the budget, and the
    // small readers more GETs at once than the cap.
    assert_eq!(
        budget,
        16 * MIB as u64,
        "--cache-size 32MiB: 16 MiB demand budget"
    );
    assert!((READERS * SIZE) as u64 >= 8 * budget);
    assert!(
        (THREADS as u64) >= 3 * slots,
        "{slots} request slots for {THREADS} threads"
    );

    // 32 readers of distinct 4 MiB objects, 1 MiB O_DIRECT reads, all started at once.
    let start = Barrier::new(READERS);
    std::thread::scope(|s| {
        for (i, want) in small.iter().enumerate() {
            let (m, start) = (&m, &start);
            s.spawn(move || {
                let f = open_direct(&m.join(format!("d/f{i:02}")));
                start.wait();
                let got = pread_direct(&f, 0, SIZE + 1, MIB);
                assert!(got == *want, "d/f{i:02}: {} bytes, not its own", got.len());
            });
        }
    });
    let peak = metric("demand_bytes_in_flight_peak");
    assert!(
        peak > 0 && peak <= budget,
        "{peak} demand bytes in flight at once, budget {budget}\n{}",
        m.diag()
    );
    assert_eq!(metric("demand_fetches_waiting"), 0);

    // 64 threads, each reading 4 KiB from 16 blocks of big.bin no one else reads, a fresh
    // O_DIRECT open for each read (a first read at an offset other than 0 is never read
    // ahead, so each is one demand GET of its block).
    let start = Barrier::new(THREADS);
    let blocks = BIG / BLOCK;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (m, start, big) = (&m, &start, &big);
            s.spawn(move || {
                start.wait();
                for j in 0..READS {
                    // Scattered: consecutive reads of a thread are blocks far apart.
                    let b = (j * THREADS + t) * 269 % blocks;
                    let off = b * BLOCK + 4096 * (1 + (t + j) % 7);
                    let f = open_direct(&m.join("big.bin"));
                    let got = pread_direct(&f, off as u64, 4096, 4096);
                    assert!(got == big[off..off + 4096], "big.bin at {off}: other bytes");
                }
            });
        }
    });
    let requests = metric("demand_requests_in_flight_peak");
    assert!(
        requests > 0 && requests <= slots,
        "{requests} demand GETs in flight at once, cap {slots}\n{}",
        m.diag()
    );
    let peak = metric("demand_bytes_in_flight_peak");
    assert!(
        peak <= budget,
        "{peak} demand bytes in flight, budget {budget}"
    );
    println!(
        "BOUNDS: demand peak {peak} of {budget} bytes, {requests} of {slots} GETs; \
         all media in flight peak {} bytes",
        metric("fetch_bytes_in_flight_peak")
    );

    // Still serving: a plain read of one object, and a whole O_DIRECT one.
    assert!(std::fs::read(m.join("d/f05")).unwrap() == small[5]);
    assert!(pread_direct(&open_direct(&m.join("big.bin")), 0, BIG, MIB) == big);
    m.assert_alive();
    m.unmount();
}

/// Two readers of the same cold block (two handles, `O_DIRECT`, so the kernel cannot merge
/// them) cost one GET: the second arrives while the first's GET waits out a 3 s first-byte
/// latency (it is on the testbed's count already) and joins it instead of fetching the block
/// again, or finding it cached (no cache hit).
#[test]
fn two_readers_of_one_cold_block_cause_one_get() {
    const SIZE: usize = 16 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(11, SIZE);
    let tb = folder_testbed(dir.path(), &[("one.bin".to_string(), &data[..])], "0s");
    let addr = format!("127.0.0.1:{}", free_port());
    let args = tb.mount_args(
        BUCKET,
        &[
            "--prefetch-files",
            "0",
            "--metadata-cache",
            "off",
            "--metrics-addr",
            &addr,
        ],
    );
    let m = Mount::start_with(&args, &[]);
    let path = m.join("one.bin");
    // Both handles are open before anything is counted (an open sends no request).
    let (fa, fb) = (open_direct(&path), open_direct(&path));
    let off = 5 * MIB + 8 * KIB; // inside block 162, far from the start: no read-ahead
    let want = &data[off..off + 4096];
    tb.set_faults(r#"{"first_byte_latency":"3s"}"#);
    tb.reset_stats();
    let hits = prometheus_metric(&addr, "cache_hits_total");
    let gets = || tb.stats()["requests"]["get_media"].as_u64().unwrap();
    std::thread::scope(|s| {
        let a = s.spawn(|| pread_direct(&fa, off as u64, 4096, 4096));
        // The first reader's GET has reached the testbed (counted on arrival, then held).
        let mut waited = 0;
        while gets() == 0 {
            assert!(waited < 400, "the first read sent no GET in 20 s");
            std::thread::sleep(std::time::Duration::from_millis(50));
            waited += 1;
        }
        let b = s.spawn(|| pread_direct(&fb, off as u64, 4096, 4096));
        assert!(a.join().unwrap() == want, "first reader: other bytes");
        assert!(b.join().unwrap() == want, "second reader: other bytes");
    });
    let st = tb.stats();
    assert_eq!(gets(), 1, "one GET for both readers: {st}");
    assert_eq!(
        st["bytes_sent"].as_u64().unwrap(),
        32 * KIB as u64,
        "one block sent: {st}"
    );
    assert_eq!(
        prometheus_metric(&addr, "cache_hits_total"),
        hits,
        "the second reader joined the GET in flight, it did not find the block cached"
    );
    tb.set_faults(r#"{"first_byte_latency":"0s"}"#);
    drop((fa, fb));
    m.unmount();
}
