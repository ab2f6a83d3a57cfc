//! The disk tier through real mounts of the testbed: what one mount fetched, the next reads
//! from local disk (with passthrough on this root mount, served by physiofs with
//! `--no-passthrough`), every byte exact, no media request; corruption, a crash mid-fill and
//! the size bound all fail safe.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";

fn media_gets(tb: &TestbedProc) -> u64 {
    tb.stats()["requests"]["get_media"].as_u64().unwrap()
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop the page cache (needs root)");
}

struct Setup {
    tb: TestbedProc,
    _tmp: tempfile::TempDir,
    cache: PathBuf,
    /// SHA-256 of every object, downloaded from the testbed directly.
    want: std::collections::BTreeMap<String, String>,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let tb = TestbedProc::small_dicom();
    let mut want = std::collections::BTreeMap::new();
    let mut token = String::new();
    loop {
        let url = format!(
            "{}/storage/v1/b/{BUCKET}/o?userProject=test-project&pageToken={}",
            tb.endpoint,
            enc(&token)
        );
        let page = http_get(&url, &[]).json();
        for item in page["items"].as_array().unwrap() {
            let name = item["name"].as_str().unwrap().to_string();
            let url = format!(
                "{}/storage/v1/b/{BUCKET}/o/{}?alt=media&userProject=test-project",
                tb.endpoint,
                enc(&name)
            );
            let body = http_get(&url, &[]).body;
            want.insert(name, sha256_hex(&body));
        }
        match page["nextPageToken"].as_str() {
            Some(t) if !t.is_empty() => token = t.to_string(),
            _ => break,
        }
    }
    assert!(want.len() > 100, "{} objects in the model", want.len());
    Setup {
        tb,
        _tmp: tmp,
        cache,
        want,
    }
}

impl Setup {
    /// Reads every file of the mount whole and compares it with the object; returns how many.
    fn check_all(&self, root: &Path) -> usize {
        for (name, sum) in &self.want {
            let got = sha256_file(&root.join(name));
            assert_eq!(&got, sum, "{name} read through the mount");
        }
        self.want.len()
    }
}

impl Setup {
    fn mount(&self, extra: &[&str]) -> (Mount, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let cache = self.cache.to_str().unwrap();
        let mut args = vec![
            "--cache-dir",
            cache,
            "--metadata-cache",
            "off",
            "--metrics-addr",
            &addr,
        ];
        args.extend_from_slice(extra);
        let m = Mount::start_with(&self.tb.mount_args(BUCKET, &args), &[]);
        (m, addr)
    }
}

/// Stored object files under the cache dir.
fn cache_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let objects = cache.join("physiofs-cache-v1/objects");
    for d in std::fs::read_dir(&objects).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Allocated bytes of the stored object files (they are sparse).
fn cache_allocated(cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    cache_files(cache)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().blocks() * 512)
        .sum()
}

#[test]
fn a_remount_reads_every_byte_from_disk_with_passthrough_and_no_media_request() {
    let s = setup();
    let (m, _) = s.mount(&[]);
    let files = s.check_all(&m.path);
    m.unmount();

    drop_page_cache();
    let (m, addr) = s.mount(&[]);
    s.tb.reset_stats();
    assert_eq!(s.check_all(&m.path), files);
    assert_eq!(
        media_gets(&s.tb),
        0,
        "media requests after a remount: {}",
        s.tb.stats()
    );
    let pt = prometheus_metric(&addr, "passthrough_opens_total");
    assert!(
        pt as usize >= files,
        "{pt} passthrough opens for {files} files"
    );
    // The kernel read the cached files itself: no read request reached physiofs.
    assert_eq!(prometheus_metric(&addr, "read_bytes_total"), 0);

    // A file opened while another handle exists, both ways round, reads exactly (the kernel
    // refuses to mix passthrough and served opens on one inode: physiofs never asks it to).
    let name = "cxr-record-list.csv.gz";
    let a = File::open(m.join(name)).unwrap();
    let b = std::fs::read(m.join(name)).unwrap();
    let mut head = vec![0u8; 64];
    a.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&b[..64], &head[..]);
    drop(a);
    m.unmount();
}

/// A file held open through passthrough, then evicted from the cache by other reads, opens
/// again while that handle lives: through the inode's backing file (the kernel would refuse a
/// served open next to a passthrough one with ETXTBSY), with its exact bytes.
#[test]
fn a_file_held_open_with_passthrough_opens_again_after_its_eviction() {
    let s = setup();
    let names: Vec<&String> = s
        .want
        .keys()
        .filter(|n| n.ends_with(".dcm"))
        .take(30)
        .collect();
    let a = names[0];
    let bound = ["--disk-cache-size", "4MiB"];
    let (m, _) = s.mount(&bound);
    assert_eq!(&sha256_file(&m.join(a)), &s.want[a]);
    m.unmount();

    let (m, addr) = s.mount(&bound);
    let held = File::open(m.join(a)).unwrap();
    assert_eq!(prometheus_metric(&addr, "passthrough_opens_total"), 1);
    for n in &names[1..] {
        assert_eq!(&sha256_file(&m.join(n)), &s.want[*n], "{n}");
    }
    assert!(
        prometheus_metric(&addr, "disk_cache_evicted_objects_total") > 0,
        "nothing was evicted: the test proves nothing"
    );
    // The held object is gone from the cache index (its file lives on for the handle).
    let opens = prometheus_metric(&addr, "passthrough_opens_total");
    let again = std::fs::read(m.join(a)).expect("open again next to the passthrough handle");
    assert_eq!(sha256_hex(&again), s.want[a]);
    assert_eq!(
        prometheus_metric(&addr, "passthrough_opens_total"),
        opens + 1
    );
    let mut head = vec![0u8; 4096];
    held.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&again[..4096], &head[..]);
    drop(held);
    // With no handle left, the next open is an ordinary one (fetched again, served by us).
    assert_eq!(&sha256_file(&m.join(a)), &s.want[a]);
    m.unmount();
}

#[test]
fn without_passthrough_physiofs_serves_the_cached_bytes_itself() {
    let s = setup();
    let (m, _) = s.mount(&["--no-passthrough"]);
    let files = s.check_all(&m.path);
    m.unmount();
    drop_page_cache();
    let (m, addr) = s.mount(&["--no-passthrough"]);
    s.tb.reset_stats();
    assert_eq!(s.check_all(&m.path), files);
    assert_eq!(media_gets(&s.tb), 0, "{}", s.tb.stats());
    assert_eq!(prometheus_metric(&addr, "passthrough_opens_total"), 0);
    assert!(prometheus_metric(&addr, "disk_cache_hits_total") > 0);
    assert!(prometheus_metric(&addr, "read_bytes_total") > 0);
    m.unmount();
}

#[test]
fn a_flipped_byte_in_a_cache_file_is_refetched_and_logged() {
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let s = setup();
        let (m, _) = s.mount(extra);
        let files = s.check_all(&m.path);
        m.unmount();
        // Flip one byte in the middle of every stored file.
        let stored = cache_files(&s.cache);
        assert!(stored.len() >= files, "{} stored for {files}", stored.len());
        for p in &stored {
            let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
            let len = f.metadata().unwrap().len();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, len / 2).unwrap();
            f.write_all_at(&[b[0] ^ 0x5a], len / 2).unwrap();
        }
        drop_page_cache();
        let (m, addr) = s.mount(extra);
        s.tb.reset_stats();
        assert_eq!(s.check_all(&m.path), files, "{extra:?}");
        assert!(
            media_gets(&s.tb) > 0,
            "the corrupt files were fetched again"
        );
        assert!(prometheus_metric(&addr, "disk_cache_corrupt_total") > 0);
        assert!(
            m.stderr_tail().contains("is corrupt"),
            "no log line: {}",
            m.stderr_tail()
        );
        m.unmount();
    }
}

#[test]
fn kill_9_while_filling_then_remount_reads_exactly() {
    let s = setup();
    let (mut m, _) = s.mount(&[]);
    // Readers fill the cache; the mount is killed in the middle.
    let files: Vec<PathBuf> = s.want.keys().map(|n| m.path.join(n)).collect();
    let reader = std::thread::spawn(move || {
        // Errors are expected here: the mount dies under the reader.
        for f in files {
            let _ = std::fs::read(f);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    m.signal(libc::SIGKILL);
    let _ = m.wait_exit(Duration::from_secs(10));
    reader.join().unwrap();
    let _ = std::process::Command::new("umount")
        .args(["-l"])
        .arg(&m.path)
        .status();
    drop(m);
    let (m, _) = s.mount(&[]);
    s.check_all(&m.path);
    m.unmount();
    // And once more, now all from disk.
    drop_page_cache();
    let (m, _) = s.mount(&[]);
    s.tb.reset_stats();
    s.check_all(&m.path);
    assert_eq!(media_gets(&s.tb), 0, "{}", s.tb.stats());
    m.unmount();
}

#[test]
fn reading_three_times_the_bound_keeps_the_cache_under_it() {
    let s = setup();
    let bound: u64 = 8 << 20;
    let (m, addr) = s.mount(&["--disk-cache-size", "8MiB"]);
    let files = s.check_all(&m.path);
    let total: u64 = walk_files(&m.path)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        total > 3 * bound,
        "the model ({total} bytes) must be 3x the bound"
    );
    // Writes land in the background: wait until the tier stopped changing.
    let mut last = u64::MAX;
    for _ in 0..50 {
        let now = prometheus_metric(&addr, "disk_cache_bytes_written_total");
        if now == last {
            break;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(prometheus_metric(&addr, "disk_cache_evicted_objects_total") > 0);
    assert!(prometheus_metric(&addr, "disk_cache_bytes") <= bound);
    let allocated = cache_allocated(&s.cache);
    assert!(
        allocated <= bound + (1 << 20),
        "cache files hold {allocated} bytes, bound {bound}"
    );
    m.unmount();
    // What is left still reads exactly after a remount.
    let (m, _) = s.mount(&["--disk-cache-size", "8MiB"]);
    assert_eq!(s.check_all(&m.path), files);
    m.unmount();
}

#[test]
fn a_second_mount_on_the_same_cache_dir_is_refused_naming_the_first() {
    let s = setup();
    let (m, _) = s.mount(&[]);
    let (_tmp2, mp2) = mountpoint_dir();
    let cache = s.cache.to_str().unwrap();
    let args = s.tb.mount_args(BUCKET, &["--cache-dir", cache]);
    let out = run_timeout(&mut physiofs_command(&args, &mp2), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("in use") && err.contains(&m.path.display().to_string()),
        "{err}"
    );
    assert_not_mounted(&mp2, "second mount on one cache dir");
    m.unmount();
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Restores `/dev/fuse`'s mode when dropped (non-root mounts need Debian's 0666).
struct DevFuseMode(u32);

impl DevFuseMode {
    fn open_to_all() -> DevFuseMode {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o7777;
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
        DevFuseMode(mode)
    }
}

impl Drop for DevFuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0));
    }
}

/// The uid and gid of a system user for non-root mounts, created if missing.
fn test_user() -> (u32, u32) {
    const USER: &str = "physiofs-test";
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .args([flag, USER])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .ok()
    };
    if id("-u").is_none() {
        let st = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", USER])
            .status()
            .expect("useradd (passwd package)");
        assert!(st.success() || id("-u").is_some(), "useradd {USER} failed");
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

#[test]
fn a_non_root_mount_falls_back_to_serving_cached_bytes_and_stays_exact() {
    use std::os::unix::process::CommandExt;
    let s = setup();
    let (uid, gid) = test_user();
    let _fuse = DevFuseMode::open_to_all();
    // A tree the user can reach: a world-traversable temp dir with its own subdirectories.
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        base.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (mp, cache) = (base.path().join("mnt"), base.path().join("cache"));
    for d in [&mp, &cache] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
    }
    let names: Vec<String> = s.want.keys().cloned().collect();
    let round = |expect_no_media: bool| {
        let addr = format!("127.0.0.1:{}", free_port());
        let args = s.tb.mount_args(
            BUCKET,
            &[
                "--cache-dir",
                cache.to_str().unwrap(),
                "--metadata-cache",
                "off",
                "--metrics-addr",
                &addr,
            ],
        );
        let mut cmd = physiofs_command(&args, &mp);
        cmd.uid(uid).gid(gid).env("HOME", base.path());
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let t0 = std::time::Instant::now();
        while mount_entry(&mp).is_none() {
            assert!(
                t0.elapsed() < MOUNT_TIMEOUT,
                "non-root mount did not appear"
            );
            assert!(child.try_wait().unwrap().is_none(), "non-root mount exited");
            std::thread::sleep(Duration::from_millis(50));
        }
        s.tb.reset_stats();
        // Read as the user (without --allow-other, even root may not read the mount).
        let out = std::process::Command::new("sha256sum")
            .args(&names)
            .current_dir(&mp)
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for (sum, name) in parse_sums(&text) {
            assert_eq!(
                Some(&sum),
                s.want.get(&name),
                "{name} read by a non-root mount"
            );
        }
        assert_eq!(parse_sums(&text).len(), names.len());
        assert_eq!(prometheus_metric(&addr, "passthrough_opens_total"), 0);
        if expect_no_media {
            assert_eq!(media_gets(&s.tb), 0, "{}", s.tb.stats());
            assert!(prometheus_metric(&addr, "disk_cache_hits_total") > 0);
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        assert_not_mounted(&mp, "non-root mount after SIGTERM");
    };
    round(false);
    drop_page_cache();
    round(true);
}
