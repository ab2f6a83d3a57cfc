//! Bounds on what a huge bucket or a busy local user can make a real mount do: the work
//! behind a readdir of a huge flat directory, the inode table after the kernel forgets, and
//! the mount still serving when the process is out of descriptors. Each is counted (entries
//! visited, table entries, CPU ticks), never timed.

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
