//! `physiofs demo`: what a new user runs first. Mounts for real (kernel FUSE), runs the shipped
//! examples against the mount with the test venv's python, checks SHA256SUMS.txt with
//! coreutils, and checks that Ctrl-C (SIGINT) unmounts and exits 0.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Unmounts (lazily) on drop if a test failed while the demo was still mounted.
struct UnmountGuard(PathBuf);

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        if mount_entry(&self.0).is_some() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

const READY: &str = "Press Ctrl-C to unmount and exit.";

/// Waits for the demo's instructions, then for the mount itself in /proc/mounts.
fn wait_ready(demo: &mut PhysiofsProc, mnt: &Path) {
    demo.wait_for_line(MOUNT_TIMEOUT, |l| l.contains(READY));
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while mount_entry(mnt).is_none() {
        demo.assert_alive();
        assert!(
            Instant::now() < deadline,
            "the demo printed its instructions but {} is not in /proc/mounts\n{}",
            mnt.display(),
            demo.diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGINT, then: exit status 0 within EXIT_TIMEOUT, the goodbye line, nothing mounted.
fn interrupt_and_check(demo: &mut PhysiofsProc, mnt: &Path) {
    demo.signal(libc::SIGINT);
    let st = demo.wait_exit(EXIT_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "physiofs demo did not exit within {EXIT_TIMEOUT:?} after SIGINT\n{}",
            demo.diag()
        )
    });
    assert!(
        st.success(),
        "physiofs demo exited with {st} after SIGINT, expected 0\n{}",
        demo.diag()
    );
    assert_not_mounted(mnt, &format!("after SIGINT to the demo\n{}", demo.diag()));
    std::thread::sleep(Duration::from_millis(100)); // stdout reader thread
    assert!(
        demo.stdout()
            .contains(&format!("physiofs demo: unmounted {}", mnt.display())),
        "no goodbye line\n{}",
        demo.diag()
    );
}

fn torch_importable() -> bool {
    std::process::Command::new(python())
        .args(["-c", "import torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn demo_mount_examples_checksums_and_ctrl_c() {
    let t0 = Instant::now();
    let (_dir, mnt) = mountpoint_dir();
    let _guard = UnmountGuard(mnt.clone());
    let mut demo = PhysiofsProc::spawn(&[OsStr::new("demo"), mnt.as_os_str()]);
    wait_ready(&mut demo, &mnt);
    eprintln!("demo ready in {:.2} s", t0.elapsed().as_secs_f64());

    // The banner describes the default model (20 patients, DICOM) and the mountpoint.
    let out = demo.stdout();
    assert!(
        out.contains("gs://mimic-cxr-2.0.0.physionet.org (20 patients")
            && out.contains(&format!("mounted read-only at {}", mnt.display()))
            && out.contains("examples/read_dicom.py"),
        "unexpected banner:\n{out}"
    );
    let mut top: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(
        top,
        [
            "LICENSE.txt",
            "SHA256SUMS.txt",
            "cxr-record-list.csv.gz",
            "cxr-study-list.csv.gz",
            "files"
        ]
    );

    // examples/read_dicom.py: header scan of 12 files, then one full pixel_array.
    let stdout = run_python_ok(
        &repo_root().join("examples/read_dicom.py"),
        &[mnt.as_os_str(), OsStr::new("-n"), OsStr::new("12")],
        Duration::from_secs(180),
    );
    eprintln!("{stdout}");
    for want in [
        "found 12 DICOM files via cxr-record-list.csv.gz",
        "header scan: 12 files in",
        "PatientID/StudyID match the path: 12/12",
        "dtype uint16",
    ] {
        assert!(
            stdout.contains(want),
            "read_dicom.py output lacks {want:?}:\n{stdout}"
        );
    }
    // One header row per file: PatientID (8 digits) StudyID (8 digits) view RxC UID.
    let rows = stdout
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() == 5
                && f[0].len() == 8
                && f[1].len() == 8
                && ["PA", "AP", "LATERAL", "LL"].contains(&f[2])
                && f[3].contains('x')
                && f[4].starts_with(&format!("2.25.{}", f[1]))
        })
        .count();
    assert_eq!(rows, 12, "header rows in:\n{stdout}");
    let shape_line = stdout
        .lines()
        .find(|l| l.contains("shape ("))
        .unwrap_or_else(|| panic!("no shape line in:\n{stdout}"));
    assert!(shape_line.contains("min ") && shape_line.contains("max "));

    // examples/torch_dataset.py with 4 workers; CI has no torch, so the Pool path runs.
    let torch = torch_importable();
    let stdout = run_python_ok(
        &repo_root().join("examples/torch_dataset.py"),
        &[
            mnt.as_os_str(),
            OsStr::new("--workers"),
            OsStr::new("4"),
            OsStr::new("--limit"),
            OsStr::new("24"),
        ],
        Duration::from_secs(300),
    );
    eprintln!("{stdout}");
    assert!(
        stdout.contains(&format!("dataset: 24 dicom images from {}", mnt.display())),
        "{stdout}"
    );
    if torch {
        assert!(
            stdout.contains("DataLoader(batch_size=16, num_workers=4)"),
            "{stdout}"
        );
    } else {
        assert!(
            stdout.contains(
                "torch is not installed: skipping the torch DataLoader parts; \
                 running the same Dataset through multiprocessing.Pool(4)"
            ),
            "{stdout}"
        );
        assert!(
            stdout.contains("loaded 24 images (item array (1, 224, 224))"),
            "{stdout}"
        );
    }
    let rate: f64 = stdout
        .lines()
        .find_map(|l| {
            let (a, _) = l.split_once(" images/s")?;
            a.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no images/s in:\n{stdout}"));
    assert!(rate > 0.0, "{stdout}");

    // examples/read_metadata.R: base R + data.table read the record list, readBin the header.
    let out = Command::new("Rscript")
        .arg(repo_root().join("examples/read_metadata.R"))
        .arg(&mnt)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run Rscript ({e}): run `bash scripts/setup-test-env.sh` to install R")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "read_metadata.R failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("same as read.csv: TRUE"), "{stdout}");
    assert!(stdout.contains("-> DICOM Part 10 file"), "{stdout}");
    assert!(stdout.contains(": match the record list"), "{stdout}");

    // Every checksum in SHA256SUMS.txt verifies through the mount.
    let ok = sha256sum_check(&mnt);
    assert_eq!(
        ok, 3,
        "SHA256SUMS.txt of the DICOM bucket covers the 3 other top-level files"
    );

    demo.assert_alive();
    interrupt_and_check(&mut demo, &mnt);
    eprintln!("demo test total {:.2} s", t0.elapsed().as_secs_f64());
}

#[test]
fn demo_without_mountpoint_uses_a_temp_dir_and_removes_it() {
    let mut demo = PhysiofsProc::spawn(&["demo", "--size-scale", "0.01"]);
    demo.wait_for_line(MOUNT_TIMEOUT, |l| l.contains(READY));
    let out = demo.stdout();
    const AT: &str = "mounted read-only at ";
    let mnt = out
        .lines()
        .find_map(|l| l.split_once(AT).map(|(_, p)| PathBuf::from(p.trim())))
        .unwrap_or_else(|| panic!("no mountpoint in the banner:\n{out}"));
    let _guard = UnmountGuard(mnt.clone());
    assert!(
        mnt.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("physiofs-demo-"),
        "temp mountpoint {}",
        mnt.display()
    );
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while mount_entry(&mnt).is_none() {
        demo.assert_alive();
        assert!(Instant::now() < deadline, "{} never mounted", mnt.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    // (`fuse` or `fuse.physiofs`, depending on how fuser mounts; mount_tree.rs pins that down.)
    let e = mount_entry(&mnt).unwrap();
    assert!(e.fstype.starts_with("fuse"), "{e:?}");
    assert!(e.options.iter().any(|o| o == "ro"), "{e:?}");
    assert!(mnt.join("cxr-record-list.csv.gz").is_file());

    interrupt_and_check(&mut demo, &mnt);
    assert!(
        !mnt.exists(),
        "the demo's temporary mountpoint {} is still there after exit",
        mnt.display()
    );
}
