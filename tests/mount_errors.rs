//! Failing before the mount (clear message, non-zero exit, nothing mounted) and ending a
//! mount (umount, SIGTERM, SIGINT, SIGHUP: exit 0, nothing left mounted).

mod common;

use std::ffi::OsString;
use std::fs;
use std::time::{Duration, Instant};

use common::*;

fn one_bucket() -> (tempfile::TempDir, FakeGcs) {
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), "present", "dir/file.txt", b"hello");
    let gcs = FakeGcs::start(seed.path());
    (seed, gcs)
}

#[test]
fn missing_bucket_fails_with_404() {
    let (_seed, gcs) = one_bucket();
    let (_dir, mnt) = mountpoint_dir();
    let args = emulator_args(&gcs, "no-such-bucket-xyz", &[]);
    let (status, stderr) = expect_mount_failure(&args, &mnt, Duration::from_secs(60));
    eprintln!("missing bucket: {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("no-such-bucket-xyz"),
        "stderr should name the bucket:\n{stderr}"
    );
    assert!(
        stderr.contains("404"),
        "stderr should give the HTTP status 404:\n{stderr}"
    );
    assert!(
        stderr.contains("Not Found"),
        "stderr should carry the server's message:\n{stderr}"
    );
}

#[test]
fn unreachable_endpoint_fails_naming_it() {
    let port = free_port(); // nothing listens there
    let endpoint = format!("http://127.0.0.1:{port}");
    let (_dir, mnt) = mountpoint_dir();
    let args: Vec<OsString> = vec![
        "--endpoint".into(),
        endpoint.clone().into(),
        "--anonymous".into(),
        "--bucket".into(),
        "b".into(),
    ];
    let t0 = Instant::now();
    let (status, stderr) = expect_mount_failure(&args, &mnt, Duration::from_secs(120));
    eprintln!(
        "unreachable endpoint: {status} after {:?}; stderr:\n{stderr}",
        t0.elapsed()
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "stderr should name the endpoint {endpoint}:\n{stderr}"
    );
}

/// The checks at mount time have their own small retry budget: a server that resets every
/// connection is asked at most that many times (counted by the server), not the read-time
/// budget's 20 times within a minute that would keep the user waiting.
#[test]
fn mount_time_checks_use_the_small_retry_budget() {
    use physiofs::client::gcs::RetryConfig;
    let tb = TestbedProc::start(&[
        "--model",
        "jpg",
        "--patients",
        "2",
        "--size-scale",
        "0.01",
        "--addr",
        "127.0.0.1:0",
    ]);
    tb.set_faults(r#"{"unavailable":true}"#);
    let (_dir, mnt) = mountpoint_dir();
    let args = tb.mount_args(physiofs::model::JPG_BUCKET, &["--metadata-cache", "off"]);
    let (status, stderr) = expect_mount_failure(&args, &mnt, Duration::from_secs(120));
    let s = tb.stats();
    let asked: u64 = ["permissions", "list", "get_meta", "get_media", "bucket"]
        .iter()
        .map(|k| s["requests"][k].as_u64().unwrap())
        .sum();
    eprintln!("connections reset: {status} after {asked} requests; stderr:\n{stderr}");
    let (startup, reads) = (RetryConfig::startup(), RetryConfig::default());
    assert!(startup.max_attempts < reads.max_attempts);
    assert!(
        (1..=startup.max_attempts as u64).contains(&asked),
        "the mount-time check asked {asked} times (startup budget {} attempts): {s}",
        startup.max_attempts
    );
    assert!(
        stderr.contains(&tb.endpoint["http://".len()..]),
        "stderr should name the endpoint {}:\n{stderr}",
        tb.endpoint
    );
}

#[test]
fn missing_mountpoint_fails_clearly() {
    let (_seed, gcs) = one_bucket();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("does-not-exist");
    let args = emulator_args(&gcs, "present", &[]);
    let (status, stderr) = expect_mount_failure(&args, &mnt, Duration::from_secs(60));
    eprintln!("missing mountpoint: {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("does-not-exist"),
        "stderr should name the mountpoint:\n{stderr}"
    );
    assert!(!mnt.exists(), "physiofs must not create the mountpoint");

    // A mountpoint that is a file is as clearly refused.
    let file = dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let (status, stderr) = expect_mount_failure(&args, &file, Duration::from_secs(60));
    eprintln!("file as mountpoint: {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("a-file"),
        "stderr should name the mountpoint:\n{stderr}"
    );
}

#[test]
fn bad_options_fail_without_mounting() {
    let (_seed, gcs) = one_bucket();
    let (_dir, mnt) = mountpoint_dir();
    for extra in [
        &["--cache-size", "lots"][..],
        &["--file-mode", "rwx"][..],
        &["--no-such-flag"][..],
    ] {
        let args = emulator_args(&gcs, "present", extra);
        let (_, stderr) = expect_mount_failure(&args, &mnt, Duration::from_secs(30));
        assert!(!stderr.trim().is_empty(), "{extra:?} failed silently");
    }
}

/// A `--metrics-addr` whose port another process holds fails before anything is mounted,
/// naming the address and the way out.
#[test]
fn a_taken_metrics_port_fails_before_mounting_naming_it() {
    let (_seed, gcs) = one_bucket();
    let (_dir, mnt) = mountpoint_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let args = emulator_args(&gcs, "present", &["--metrics-addr", &addr]);
    let (_, stderr) = expect_mount_failure(&args, &mnt, Duration::from_secs(30));
    assert!(
        stderr.contains(&format!("--metrics-addr {addr}")) && stderr.contains("127.0.0.1:0"),
        "stderr should name the taken address and the fix:\n{stderr}"
    );
    drop(taken);
}

#[test]
fn missing_key_file_fails_naming_it() {
    let (_seed, gcs) = one_bucket();
    let (dir, mnt) = mountpoint_dir();
    let key = dir.path().join("no-such-key.json");
    let args: Vec<OsString> = vec![
        "--endpoint".into(),
        gcs.endpoint().into(),
        "--key-file".into(),
        key.clone().into(),
        "--allow-insecure-endpoint".into(),
        "--bucket".into(),
        "present".into(),
    ];
    let (status, stderr) = expect_mount_failure(&args, &mnt, Duration::from_secs(60));
    eprintln!("missing key file: {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("no-such-key.json"),
        "stderr should name the key file:\n{stderr}"
    );
}

fn mounted_and_reading(gcs: &FakeGcs) -> Mount {
    let mut m = Mount::start(gcs, "present", &[]);
    assert_eq!(
        fs::read(m.join("dir/file.txt")).unwrap(),
        b"hello",
        "{}",
        m.diag()
    );
    m.assert_alive();
    m
}

/// A mount that gets `sig` unmounts itself and exits 0.
fn signal_unmounts_cleanly(sig: i32, name: &str) {
    let (_seed, gcs) = one_bucket();
    let mut m = mounted_and_reading(&gcs);
    m.signal(sig);
    m.assert_clean_exit(name);
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    signal_unmounts_cleanly(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_unmounts_and_exits_zero() {
    signal_unmounts_cleanly(libc::SIGINT, "SIGINT");
}

#[test]
fn sighup_unmounts_a_foreground_mount_cleanly() {
    // The terminal went away (ssh dropped): unmount rather than leave a dead mount behind.
    signal_unmounts_cleanly(libc::SIGHUP, "SIGHUP");
}

#[test]
fn umount_ends_the_process_with_zero() {
    let (_seed, gcs) = one_bucket();
    let m = mounted_and_reading(&gcs);
    m.unmount();
}

#[test]
fn two_mounts_of_one_bucket_coexist() {
    let (_seed, gcs) = one_bucket();
    let a = mounted_and_reading(&gcs);
    let b = mounted_and_reading(&gcs);
    assert_eq!(
        fs::read(a.join("dir/file.txt")).unwrap(),
        fs::read(b.join("dir/file.txt")).unwrap()
    );
    b.unmount();
    assert_eq!(
        fs::read(a.join("dir/file.txt")).unwrap(),
        b"hello",
        "{}",
        a.diag()
    );
    a.unmount();
}
