//! A mount point left stale by a killed physiofs ("Transport endpoint is not connected"): the
//! next `physiofs mount` says so and how to clear it, mounting nothing on top, and `--force`
//! lazily unmounts the dead mount first and then mounts.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "stale";

/// Detaches every mount on `mnt` and kills the processes a failed test left behind.
struct Cleanup {
    mnt: PathBuf,
    pids: Vec<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for _ in 0..8 {
            if mounts_on(&self.mnt) == 0 {
                break;
            }
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        for pid in &self.pids {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
}

/// How many mounts are stacked on `target` (/proc/mounts lists each one).
fn mounts_on(target: &Path) -> usize {
    mounts().iter().filter(|m| m.target == target).count()
}

/// `physiofs mount --background EXTRA... MNT` against the emulator; returns (success, stderr).
fn background_mount(gcs: &FakeGcs, dir: &Path, mnt: &Path, extra: &[&str]) -> (bool, String) {
    let mut args: Vec<OsString> = emulator_args(gcs, BUCKET, extra);
    args.push("--background".into());
    args.push("--log-file".into());
    args.push(dir.join("physiofs.log").into());
    let mut cmd = physiofs_command(&args, mnt);
    cmd.env("XDG_CACHE_HOME", dir.join("xdg-cache"));
    let out = run_timeout(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stderr)
}

#[test]
fn a_stale_mount_point_is_reported_then_cleared_with_force() {
    let seed = tempfile::tempdir().unwrap();
    let data = random_bytes(1501, 200_003);
    seed_file(seed.path(), BUCKET, "files/p10/x.dcm", &data);
    let gcs = FakeGcs::start(seed.path());
    let (dir, mnt) = mountpoint_dir();
    let mut guard = Cleanup {
        mnt: mnt.clone(),
        pids: Vec::new(),
    };

    let (ok, stderr) = background_mount(&gcs, dir.path(), &mnt, &[]);
    assert!(ok, "first mount failed:\n{stderr}");
    let pid = background_pid(&stderr);
    guard.pids.push(pid);
    assert_eq!(sha256_file(&mnt.join("files/p10/x.dcm")), sha256_hex(&data));

    // Killed with no chance to unmount: the mount stays, served by nobody.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while process_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!process_running(pid), "physiofs {pid} survived SIGKILL");
    assert_eq!(
        mounts_on(&mnt),
        1,
        "the killed mount must still be in place"
    );
    let err = fs::read_dir(&mnt).map(|_| ()).unwrap_err();
    // ENOTCONN, or ECONNABORTED once the kernel has aborted the connection.
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOTCONN | libc::ECONNABORTED)
        ),
        "a dead FUSE mount answers ENOTCONN: {err}"
    );

    // Without --force: refused, with what happened and both ways to clear it.
    let (ok, stderr) = background_mount(&gcs, dir.path(), &mnt, &[]);
    assert!(!ok, "mounted on top of a stale mount:\n{stderr}");
    for want in [
        "is a stale mount",
        "Transport endpoint is not connected",
        "fuse.physiofs mount of gs://stale/",
        &format!("umount -l {}", mnt.display()),
        &format!("fusermount3 -uz {}", mnt.display()),
        "--force",
    ] {
        assert!(stderr.contains(want), "no {want:?} in:\n{stderr}");
    }
    assert_eq!(mounts_on(&mnt), 1, "a refused mount must add nothing");

    // The same from the foreground: the check does not depend on --background.
    let args = emulator_args(&gcs, BUCKET, &[]);
    let (status, stderr) = expect_mount_failure_on_stale(&args, &mnt);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("is a stale mount"), "{stderr}");

    // --force: the dead mount is detached, the new one takes its place (not stacked on it).
    let (ok, stderr) = background_mount(&gcs, dir.path(), &mnt, &["--force"]);
    assert!(ok, "--force mount failed:\n{stderr}");
    let pid = background_pid(&stderr);
    guard.pids.push(pid);
    assert_eq!(
        mounts_on(&mnt),
        1,
        "exactly the new mount is on {}",
        mnt.display()
    );
    assert_eq!(sha256_file(&mnt.join("files/p10/x.dcm")), sha256_hex(&data));
    let log = fs::read_to_string(dir.path().join("physiofs.log")).unwrap();
    assert!(
        log.contains("--force: lazily unmounting the fuse.physiofs mount of gs://stale/"),
        "the log should say what --force did:\n{log}"
    );

    // --force on a healthy mount point changes nothing: a plain umount still ends it.
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    assert_eq!(mounts_on(&mnt), 0);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while process_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !process_running(pid),
        "physiofs {pid} still running after umount"
    );
}

/// A foreground `physiofs mount` on the stale `mnt`: its exit code and stderr (the stale
/// mount itself stays, so `expect_mount_failure`'s nothing-mounted check does not apply).
fn expect_mount_failure_on_stale(args: &[OsString], mnt: &Path) -> (Option<i32>, String) {
    let out = run_timeout(&mut physiofs_command(args, mnt), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        mounts_on(mnt),
        1,
        "a refused mount must add nothing:\n{stderr}"
    );
    (out.status.code(), stderr)
}
