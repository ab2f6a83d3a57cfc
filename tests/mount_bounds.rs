//! Bounds on what a huge bucket or a busy local user can make a real mount do: the work
//! behind a readdir of a huge flat directory, and the mount still serving when the process is
//! out of descriptors. Each is counted (entries visited, CPU ticks), never timed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

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
