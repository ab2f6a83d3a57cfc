//! The inode table against the kernel's forgets, through a real mount of the testbed serving a
//! local folder: a lazily listed tree the kernel forgets (`drop_caches`) leaves the table, and
//! comes back whole when walked again; an eagerly loaded one is kept; forgets that race lazy
//! listings in flight lose nothing. Counted (the `inodes` gauge, `inodes_dropped_total`,
//! listings), never timed.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const BUCKET: &str = "forget";

/// `drop_caches` is machine-wide: one test's forgets would land in the other's mount mid-count,
/// so the tests of this file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The kernel forgets what it can of every filesystem's dentries and inodes (not the page
/// cache, which the tests need not lose).
fn drop_dentries() {
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop caches (needs root)");
}

/// Waits until gauge `name` stops moving (the kernel sends its forgets as it evicts, and they
/// are answered as they come), at most ~10 s; returns its last value.
fn settled(addr: &str, name: &str) -> u64 {
    let mut last = prometheus_metric(addr, name);
    let mut same = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        let now = prometheus_metric(addr, name);
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same == 3 {
            break;
        }
    }
    last
}

/// `d{d:03}/f{f:04}` objects holding their own name, `dirs` × `files`, under `dir/BUCKET`;
/// returns name → bytes.
fn write_tree(dir: &Path, dirs: usize, files: usize) -> BTreeMap<String, Vec<u8>> {
    let mut want = BTreeMap::new();
    for d in 0..dirs {
        let p = dir.join(BUCKET).join(format!("d{d:03}"));
        std::fs::create_dir_all(&p).unwrap();
        for f in 0..files {
            let name = format!("d{d:03}/f{f:04}");
            let body = format!("{name}\n").into_bytes();
            std::fs::write(dir.join(BUCKET).join(&name), &body).unwrap();
            want.insert(name, body);
        }
    }
    want
}

/// Reads every file of `want` through the mount and names the first whose bytes differ.
fn assert_bytes(m: &Mount, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    for (name, body) in want {
        let got = std::fs::read(m.join(name)).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        assert!(got == *body, "{what}: {name} differs");
    }
}

/// The files `find` shows under the mount, relative.
fn found_files(m: &Mount) -> Vec<String> {
    find_tree(&m.join(""))
        .into_iter()
        .filter(|(_, k)| *k == Kind::File)
        .map(|(n, _)| n)
        .collect()
}

/// After `ls -l` of many lazily listed directories, the kernel's forgets (`drop_caches`) shrink
/// the inode table to the directories the root lists, and a walk afterwards finds every file
/// with exact bytes, listing each directory once again; an eagerly loaded tree is kept whole
/// (a listing per directory to get it back would cost more than its memory).
#[test]
fn forgotten_lazy_directories_shrink_the_inode_table() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const DIRS: usize = 40;
    const FILES: usize = 250;
    let dir = tempfile::tempdir().unwrap();
    let want = write_tree(dir.path(), DIRS, FILES);
    let tb = TestbedProc::start(&[
        "--dir",
        dir.path().to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let all = (DIRS * (FILES + 1) + 1) as u64;
    for mode in ["lazy", "eager"] {
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
        if mode == "eager" {
            assert_eq!(
                settled(&addr, "inodes"),
                all,
                "eager: the load holds the tree"
            );
        }
        for d in 0..DIRS {
            let out = Command::new("ls")
                .arg("-l")
                .arg(m.join(format!("d{d:03}")))
                .output()
                .unwrap();
            assert!(out.status.success(), "{mode}: ls -l: {out:?}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).lines().count(),
                FILES + 1,
                "{mode}: ls -l d{d:03}"
            );
        }
        let inodes = || prometheus_metric(&addr, "inodes");
        assert_eq!(inodes(), all, "{mode}: after ls -l of every directory");
        let lists = prometheus_metric(&addr, "list_requests_total");
        drop_dentries();
        let after = settled(&addr, "inodes");
        let dropped = prometheus_metric(&addr, "inodes_dropped_total");
        if mode == "lazy" {
            assert!(
                after <= (DIRS + 1) as u64,
                "lazy: {after} inodes left of {all} after the kernel forgot them"
            );
            assert_eq!(dropped, all - after, "lazy: dropped count");
        } else {
            assert_eq!((after, dropped), (all, 0), "eager: the loaded tree is kept");
        }
        // The walk afterwards: every file, exact bytes, each directory listed once again.
        assert_eq!(
            found_files(&m).len(),
            want.len(),
            "{mode}: find after the forgets"
        );
        assert_bytes(&m, &want, mode);
        let relisted = prometheus_metric(&addr, "list_requests_total") - lists;
        // Each directory that dropped its FILES children is listed once again, no more.
        assert_eq!(
            relisted,
            dropped / FILES as u64,
            "{mode}: listings after the forgets"
        );
        assert_eq!(inodes(), all, "{mode}: the table holds the tree again");
        m.unmount();
    }
}

/// Forgets racing lazy listings in flight: two `find`s walk a lazy mount over a testbed that
/// holds every answer 20–50 ms (so listings are in flight at any moment), while the kernel is
/// made to forget everything it can over and over. Every walk sees every file, the table drops
/// entries while they run, and after a last round of forgets every file reads exactly.
#[test]
fn forgets_racing_lazy_listings_lose_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const DIRS: usize = 24;
    const SUBS: usize = 3;
    const FILES: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let mut want = BTreeMap::new();
    for d in 0..DIRS {
        for s in 0..SUBS {
            let rel = format!("d{d:03}/s{s}");
            std::fs::create_dir_all(dir.path().join(BUCKET).join(&rel)).unwrap();
            for f in 0..FILES {
                let name = format!("{rel}/f{f:03}");
                let body = format!("{name}\n").into_bytes();
                std::fs::write(dir.path().join(BUCKET).join(&name), &body).unwrap();
                want.insert(name, body);
            }
        }
    }
    let names: Vec<String> = want.keys().cloned().collect();
    let tb = TestbedProc::start(&[
        "--dir",
        dir.path().to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let addr = format!("127.0.0.1:{}", free_port());
    let args = tb.mount_args(
        BUCKET,
        &[
            "--metadata",
            "lazy",
            "--metadata-cache",
            "off",
            "--metrics-addr",
            &addr,
        ],
    );
    let mut m = Mount::start_with(&args, &[]);
    // A first walk, so the forgets have a tree to drop from the start.
    assert_eq!(found_files(&m), names, "first walk");
    tb.set_faults(r#"{"first_byte_latency":"20ms","latency_jitter":"30ms"}"#);
    let dropped_before = prometheus_metric(&addr, "inodes_dropped_total");
    let lists_before = prometheus_metric(&addr, "list_requests_total");
    // Walks go on until the kernel was made to forget 10 times (and each walked 3 times);
    // the forgets go on while any walk runs.
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let (rounds, walkers_done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        let walkers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut walks = Vec::new();
                    while walks.len() < 3 || (rounds.load(Relaxed) < 10 && walks.len() < 50) {
                        walks.push(found_files(&m));
                        // `ls -lR` stats every entry readdirplus handed over: one the table
                        // dropped while the kernel held it fails here.
                        let out = Command::new("ls")
                            .arg("-lR")
                            .arg(m.join(""))
                            .output()
                            .unwrap();
                        let err = String::from_utf8_lossy(&out.stderr);
                        assert!(out.status.success() && err.is_empty(), "ls -lR: {err}");
                        let files = String::from_utf8_lossy(&out.stdout)
                            .lines()
                            .filter(|l| l.starts_with('-'))
                            .count();
                        assert_eq!(files, names.len(), "ls -lR during the forgets");
                    }
                    walkers_done.fetch_add(1, Relaxed);
                    walks
                })
            })
            .collect();
        s.spawn(|| {
            while walkers_done.load(Relaxed) < 2 && rounds.load(Relaxed) < 500 {
                drop_dentries();
                rounds.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        for w in walkers {
            for (i, got) in w.join().unwrap().into_iter().enumerate() {
                assert!(
                    got == names,
                    "walk {i} during the forgets saw {} of {} files; missing e.g. {:?}",
                    got.len(),
                    names.len(),
                    names.iter().find(|n| !got.contains(n))
                );
            }
        }
    });
    let forget_rounds = rounds.load(Relaxed);
    let dropped = prometheus_metric(&addr, "inodes_dropped_total") - dropped_before;
    let lists = prometheus_metric(&addr, "list_requests_total") - lists_before;
    println!(
        "RACE: {forget_rounds} rounds of forgets, {dropped} entries dropped, {lists} listings"
    );
    assert!(forget_rounds > 0, "no forgets while the walks ran");
    assert!(
        dropped > 0 && lists > 0,
        "the walks listed {lists} directories again and {dropped} entries were dropped: the race never happened"
    );
    tb.set_faults(r#"{"first_byte_latency":"0s","latency_jitter":"0s"}"#);
    drop_dentries();
    settled(&addr, "inodes");
    assert_eq!(found_files(&m), names, "walk after the last forgets");
    assert_bytes(&m, &want, "after the forgets");
    m.assert_alive();
    m.unmount();
}
