//! `physiofs mount --background`: the command returns once the mount serves (so
//! `mount --background ... && python train.py` never races it), the process is detached
//! (own session, cwd `/`, not our child), logs go to a file, `umount` ends it; a failure is
//! reported by the command itself with nothing left mounted or running. And `--log-file`.

mod common;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "bg";

/// Unmounts and kills whatever a failed test left behind.
struct Cleanup {
    mnt: PathBuf,
    pid: Option<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if mount_entry(&self.mnt).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(pid) = self.pid {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// `/proc/PID/stat` fields after the command name: state, ppid, pgrp, session.
fn proc_stat(pid: i32) -> Option<(char, i32, i32, i32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f[0].chars().next()?,
        f[1].parse().ok()?,
        f[2].parse().ok()?,
        f[3].parse().ok()?,
    ))
}

/// The background process id from the command's "(process N, log FILE)".
fn process_id(stderr: &str) -> Option<i32> {
    stderr
        .split("(process ")
        .nth(1)?
        .split(',')
        .next()?
        .parse()
        .ok()
}

/// Running: present and not a zombie (in a container nobody may reap it).
/// Unmounts `mnt` and waits for background process `pid` to end with it.
fn umount_and_wait_for_exit(mnt: &Path, pid: i32) {
    let st = Command::new("umount").arg(mnt).status().unwrap();
    assert!(st.success());
    let t = Instant::now();
    while running(pid) {
        assert!(
            t.elapsed() < EXIT_TIMEOUT,
            "the background process outlived its mount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn running(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((st, ..)) if st != 'Z' && st != 'X')
}

fn background_command(gcs: &FakeGcs, dir: &Path, mountpoint: &str, extra: &[&str]) -> Command {
    let mut args: Vec<OsString> = emulator_args(gcs, BUCKET, extra);
    args.push("--background".into());
    let mut cmd = physiofs_command(&args, Path::new(mountpoint));
    // A relative mountpoint, resolved against the command's directory.
    cmd.current_dir(dir)
        .env("XDG_CACHE_HOME", dir.join("xdg-cache"));
    cmd
}

#[test]
fn background_mount_is_ready_when_the_command_returns() {
    let seed = tempfile::tempdir().unwrap();
    let mut want = Vec::new();
    for i in 0..5 {
        let data = random_bytes(700 + i, 300_000 + i as usize * 1000);
        let name = format!("files/p10/p1000{i}/s5000{i}/img{i}.dcm");
        seed_file(seed.path(), BUCKET, &name, &data);
        want.push((name, sha256_hex(&data)));
    }
    let gcs = FakeGcs::start(seed.path());
    let (dir, mnt) = mountpoint_dir();
    let mut guard = Cleanup {
        mnt: mnt.clone(),
        pid: None,
    };

    let out = run_timeout(
        &mut background_command(&gcs, dir.path(), "mnt", &[]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "mount --background failed:\n{stderr}");
    // Mounted by the time the command returned: no polling.
    let entry = mount_entry(&mnt).unwrap_or_else(|| panic!("not mounted at return:\n{stderr}"));
    assert_eq!(entry.fstype, "fuse.physiofs");
    assert!(stderr.contains("mounted gs://bg/"), "{stderr}");
    let pid = process_id(&stderr).unwrap_or_else(|| panic!("no process id in:\n{stderr}"));
    guard.pid = Some(pid);

    // Detached: its own session, not our child, in `/`.
    let (state, ppid, _pgrp, sid) = proc_stat(pid).expect("the background process is running");
    assert!(state != 'Z', "the background process is a zombie");
    assert_ne!(ppid as u32, std::process::id(), "still our child");
    assert_eq!(sid, pid, "not a session leader (setsid)");
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/")
    );

    for (name, hash) in &want {
        assert_eq!(&sha256_file(&mnt.join(name)), hash, "{name}");
    }

    // The default log file is named after the mountpoint.
    let log_dir = dir.path().join("xdg-cache/physiofs/logs");
    let logs: Vec<_> = fs::read_dir(&log_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", log_dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let log = logs[0].clone();
    assert!(
        log.file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("-mnt.log"),
        "{}",
        log.display()
    );
    assert!(stderr.contains(&log.display().to_string()), "{stderr}");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("mounted gs://bg/"), "{text}");

    // It has no terminal: SIGHUP is logged and ignored, and it keeps serving.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let t = Instant::now();
    while !fs::read_to_string(&log).unwrap().contains("SIGHUP ignored") {
        assert!(t.elapsed() < EXIT_TIMEOUT, "SIGHUP not logged");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(running(pid), "SIGHUP ended the background process");
    assert_eq!(&sha256_file(&mnt.join(&want[0].0)), &want[0].1);

    // umount ends the process cleanly, with its counters in the log.
    umount_and_wait_for_exit(&mnt, pid);
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("unmounted"), "{text}");
    assert_not_mounted(&mnt, "after umount");
}

#[test]
fn background_mount_failure_is_reported_by_the_command() {
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), BUCKET, "a.txt", b"x");
    let gcs = FakeGcs::start(seed.path());
    let (dir, mnt) = mountpoint_dir();
    let _guard = Cleanup {
        mnt: mnt.clone(),
        pid: None,
    };
    // The bucket does not exist: the foreground's error, from the command itself.
    let mut args: Vec<OsString> = emulator_args(&gcs, "no-such-bucket-bg", &[]);
    args.push("--background".into());
    let mut cmd = physiofs_command(&args, &mnt);
    cmd.env("XDG_CACHE_HOME", dir.path().join("xdg-cache"));
    let out = run_timeout(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("physiofs: error:") && stderr.contains("no-such-bucket-bg"),
        "{stderr}"
    );
    assert_not_mounted(&mnt, "after a failed background mount");
    // ... and no process is left serving it.
    let t = Instant::now();
    loop {
        let alive: Vec<i32> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&pid| {
                running(pid)
                    && fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("no-such-bucket-bg"))
            })
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(t.elapsed() < EXIT_TIMEOUT, "left running: {alive:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A mountpoint that is not there: refused before anything starts.
    let out = run_timeout(
        &mut background_command(&gcs, dir.path(), "missing-dir", &[]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing-dir") && stderr.contains("mkdir -p"),
        "{stderr}"
    );

    // --foreground and --background contradict each other.
    let out = run_timeout(
        &mut background_command(&gcs, dir.path(), "mnt", &["--foreground"]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--foreground"), "{stderr}");
    assert_not_mounted(&mnt, "after a refused command line");
}

#[test]
fn log_file_takes_the_log_lines() {
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), BUCKET, "a/b.txt", b"hello");
    let gcs = FakeGcs::start(seed.path());
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("sub/physiofs.log");
    let m = Mount::start(
        &gcs,
        BUCKET,
        &["--log-file", log.to_str().unwrap(), "--log-level", "info"],
    );
    assert_eq!(fs::read(m.join("a/b.txt")).unwrap(), b"hello");
    let stderr = m.stderr_tail();
    assert!(
        stderr.contains("mounted gs://bg/") && !stderr.contains("metadata:"),
        "stderr keeps the mount line only:\n{stderr}"
    );
    m.unmount();
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("metadata:"), "log file:\n{text}");
    assert!(text.contains("unmounted"), "log file:\n{text}");
}

/// `mount.fuse3` (Debian's fuse3, what `mount -t fuse.physiofs` and /etc/fstab run) finds
/// `physiofs` on PATH and runs it as `physiofs SOURCE MOUNTPOINT -o OPTIONS`.
fn mount_fuse3() -> PathBuf {
    ["/sbin/mount.fuse3", "/usr/sbin/mount.fuse3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("mount.fuse3 missing: scripts/setup-test-env.sh installs Debian's fuse3")
}

#[test]
fn fstab_style_mount_through_the_fuse3_helper() {
    let seed = tempfile::tempdir().unwrap();
    let data = random_bytes(77, 123_457);
    seed_file(seed.path(), BUCKET, "files/p10/x.dcm", &data);
    let gcs = FakeGcs::start(seed.path());
    let (dir, mnt) = mountpoint_dir();
    let mut guard = Cleanup {
        mnt: mnt.clone(),
        pid: None,
    };
    let bin_dir = physiofs_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // What an fstab line `gs://bg/files /mnt/x fuse.physiofs ro,_netdev,endpoint=...,... 0 0`
    // hands the helper (mount(8) adds the generic options).
    let opts = format!(
        "ro,nodev,nosuid,_netdev,x-systemd.automount,endpoint={},anonymous,file_mode=0440,\
         metadata_cache={}",
        gcs.endpoint(),
        dir.path().join("snap").display()
    );
    let helper = |source: &str, opts: &str| {
        let mut cmd = Command::new(mount_fuse3());
        cmd.arg(source)
            .arg(&mnt)
            .args(["-t", "fuse.physiofs", "-o", opts])
            .env("PATH", &path)
            .env("XDG_CACHE_HOME", dir.path().join("xdg-cache"))
            .env_remove("STORAGE_EMULATOR_HOST")
            .env_remove("RUST_LOG");
        run_timeout(&mut cmd, Duration::from_secs(60))
    };
    let out = helper("gs://bg/files", &opts);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "mount.fuse3 failed:\n{stderr}");
    assert!(
        mount_entry(&mnt).is_some(),
        "not mounted at return:\n{stderr}"
    );
    guard.pid = process_id(&stderr);
    // The prefix from the source, the mode from the options.
    let f = mnt.join("p10/x.dcm");
    assert_eq!(sha256_file(&f), sha256_hex(&data));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
        0o440
    );
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success());
    assert_not_mounted(&mnt, "after umount");

    // A misspelt option: the helper fails naming it, and nothing is mounted.
    let out = helper("gs://bg", &format!("{opts},cache_sise=1G"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a bad option mounted:\n{stderr}");
    assert!(
        stderr.contains("cache_sise") && stderr.contains("cache-size"),
        "{stderr}"
    );
    assert_not_mounted(&mnt, "after a bad option");
}

/// Relative paths name what they name in the command's directory, though the background
/// process runs in `/`: a TLS testbed mounted with `--ca-file ca.pem --log-file
/// logs/physiofs.log --cache-dir cache mnt`, all relative to a temp cwd, serves the model's
/// bytes exactly and logs where it was told to.
#[test]
fn background_mount_takes_paths_relative_to_the_command_directory() {
    use physiofs::model::{DatasetModel, JPG_BUCKET, ModelConfig, ModelKind};
    let tb = TlsTestbed::start(&[
        "--model",
        "jpg",
        "--patients",
        "3",
        "--size-scale",
        "0.1",
        "--addr",
        "127.0.0.1:0",
    ]);
    let model = DatasetModel::new(ModelConfig {
        kind: ModelKind::Jpg,
        patients: 3,
        seed: 0,
        size_scale: 0.1,
    });
    let obj = model
        .list_from("files/", 1000)
        .into_iter()
        .find(|o| o.name.ends_with(".jpg"))
        .expect("the model has a JPG");
    let want = model.read_all(&obj);

    let (dir, mnt) = mountpoint_dir();
    let mut guard = Cleanup {
        mnt: mnt.clone(),
        pid: None,
    };
    fs::copy(&tb.ca_file, dir.path().join("ca.pem")).unwrap();
    let mut args = tb.testbed.mount_args(
        JPG_BUCKET,
        &[
            "--ca-file",
            "ca.pem",
            "--log-file",
            "logs/physiofs.log",
            "--cache-dir",
            "cache",
            "--background",
        ],
    );
    args.push("mnt".into());
    let mut cmd = Command::new(physiofs_bin());
    cmd.arg("mount")
        .args(&args)
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .env_remove("SSL_CERT_FILE")
        .env_remove("STORAGE_EMULATOR_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("RUST_LOG")
        .env("XDG_CACHE_HOME", dir.path().join("xdg-cache"))
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let out = run_timeout(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "mount --background with relative paths failed:\n{stderr}"
    );
    mount_entry(&mnt).unwrap_or_else(|| panic!("not mounted at return:\n{stderr}"));
    let pid = process_id(&stderr).unwrap_or_else(|| panic!("no process id in:\n{stderr}"));
    guard.pid = Some(pid);
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/"),
        "the background process should have moved to /"
    );

    let got = fs::read(mnt.join(&obj.name)).unwrap();
    assert!(got == want, "{}: bytes differ from the model", obj.name);

    let log = dir.path().join("logs/physiofs.log");
    let text = fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert!(text.contains("mounted gs://"), "{text}");
    assert!(
        stderr.contains(&log.display().to_string()),
        "the command names the log it writes:\n{stderr}"
    );
    // The disk cache is the `cache` of the command's directory, and holds what was read.
    assert!(
        dir.path().join("cache/physiofs-cache-v1").is_dir(),
        "no disk cache in {}",
        dir.path().join("cache").display()
    );

    umount_and_wait_for_exit(&mnt, pid);
    assert_not_mounted(&mnt, "after umount");
}
