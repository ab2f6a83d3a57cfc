//! `physiofs warm` and `physiofs cache` as real processes against the testbed: what warm
//! fetched, a mount on the same cache dir reads with no media request, every byte exact; a
//! second warm fetches nothing; a missing object fails warm naming it; next to a running mount
//! warm reads through it; `cache stats|verify|clear` report and refuse as they say.

mod common;

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";

fn media_gets(tb: &TestbedProc) -> u64 {
    tb.stats()["requests"]["get_media"].as_u64().unwrap()
}

struct Setup {
    tb: TestbedProc,
    tmp: tempfile::TempDir,
    cache: PathBuf,
    /// (sha256, name) of every file of the model, read through a mount without a cache.
    sums: Vec<(String, String)>,
}

/// A small DICOM model (about 40 files of ~0.7 MB) and the sha256 of each file, read through
/// a mount without a cache dir.
fn setup() -> Setup {
    let tb = TestbedProc::small_dicom();
    let m = Mount::start_with(&tb.mount_args(BUCKET, &["--metadata-cache", "off"]), &[]);
    let mut sums = Vec::new();
    walk_files(&m.path, &m.path, &mut sums);
    sums.sort_by(|a, b| a.1.cmp(&b.1));
    m.unmount();
    assert!(sums.len() > 20, "{} files in the model", sums.len());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    Setup {
        tb,
        tmp,
        cache,
        sums,
    }
}

impl Setup {
    fn mount(&self, extra: &[&str]) -> (Mount, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "--cache-dir",
            self.cache.to_str().unwrap(),
            "--metadata-cache",
            "off",
            "--metrics-addr",
            &addr,
            // No read-ahead of neighbouring files: every media request is one a reader asked for.
            "--prefetch-files",
            "0",
        ];
        args.extend_from_slice(extra);
        (
            Mount::start_with(&self.tb.mount_args(BUCKET, &args), &[]),
            addr,
        )
    }

    /// `physiofs warm --cache-dir C (testbed flags) ARGS...`.
    fn warm(&self, args: &[&str]) -> Output {
        let mut full: Vec<OsString> = vec![
            "warm".into(),
            "--cache-dir".into(),
            self.cache.clone().into(),
        ];
        full.extend(self.tb.mount_args(BUCKET, args));
        physiofs(&full)
    }

    fn cache_cmd(&self, action: &str) -> Output {
        physiofs(&[
            "cache".into(),
            action.into(),
            "--cache-dir".into(),
            self.cache.clone().into(),
        ])
    }

    /// A list file of the first `n` DICOM files of the model.
    fn list(&self, n: usize, extra: &[&str]) -> (PathBuf, Vec<(String, String)>) {
        let picked: Vec<(String, String)> = self
            .sums
            .iter()
            .filter(|(_, name)| name.ends_with(".dcm"))
            .take(n)
            .cloned()
            .collect();
        assert_eq!(picked.len(), n);
        let mut text: String = picked.iter().map(|(_, n)| format!("{n}\n")).collect();
        for e in extra {
            text.push_str(e);
            text.push('\n');
        }
        let path = self.tmp.path().join("list.txt");
        std::fs::write(&path, text).unwrap();
        (path, picked)
    }
}

fn walk_files(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            walk_files(root, &e.path(), out);
        } else {
            let rel = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((sha256_file(&e.path()), rel));
        }
    }
}

fn physiofs(args: &[OsString]) -> Output {
    let mut cmd = Command::new(physiofs_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .env_remove("PHYSIOFS_BILLING_PROJECT")
        .env_remove("STORAGE_EMULATOR_HOST")
        .env("NO_PROXY", "127.0.0.1,localhost");
    run_timeout(&mut cmd, Duration::from_secs(120))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Reads `files` through the mount and checks each against its sha256.
fn read_exact(root: &Path, files: &[(String, String)]) {
    for (sha, name) in files {
        let got = sha256_file(&root.join(name));
        assert_eq!(&got, sha, "{name} read through the mount");
    }
}

/// The `key: N` value of `cache stats`.
fn stat_value(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_warmed_list_is_read_by_a_mount_with_no_media_request_and_a_second_warm_fetches_nothing() {
    let s = setup();
    let (list, files) = s.list(10, &[]);
    s.tb.reset_stats();
    let out = s.warm(&["--from-list", list.to_str().unwrap(), "--jobs", "4"]);
    assert!(out.status.success(), "warm failed: {}", stderr(&out));
    assert!(
        stderr(&out).contains("writing straight into"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("10 fetched"), "{}", stderr(&out));
    assert!(media_gets(&s.tb) >= 10, "{}", s.tb.stats());

    s.tb.reset_stats();
    let out = s.warm(&["--from-list", list.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("0 fetched"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("10 already cached"),
        "{}",
        stderr(&out)
    );
    assert_eq!(media_gets(&s.tb), 0, "second warm: {}", s.tb.stats());

    for extra in [&[][..], &["--no-passthrough"][..]] {
        let (m, _) = s.mount(extra);
        s.tb.reset_stats();
        read_exact(&m.path, &files);
        assert_eq!(media_gets(&s.tb), 0, "{extra:?}: {}", s.tb.stats());
        m.unmount();
    }

    // `cache stats` agrees: ten complete objects, their bytes.
    let bytes: u64 = {
        let (m, _) = s.mount(&[]);
        let b = files
            .iter()
            .map(|(_, n)| std::fs::metadata(m.join(n)).unwrap().len())
            .sum();
        m.unmount();
        b
    };
    let out = s.cache_cmd("stats");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(stat_value(&text, "objects"), 10, "{text}");
    assert_eq!(stat_value(&text, "complete objects"), 10, "{text}");
    assert_eq!(stat_value(&text, "bytes"), bytes, "{text}");
    assert!(stat_value(&text, "journal bytes") > 0, "{text}");
}

#[test]
fn a_missing_object_makes_warm_fail_naming_it_and_the_rest_is_warmed() {
    let s = setup();
    let missing = "files/p99/p99999999/s1/nope.dcm";
    let (list, files) = s.list(3, &[missing]);
    let out = s.warm(&["--from-list", list.to_str().unwrap()]);
    assert!(!out.status.success(), "warm of a missing object succeeded");
    let err = stderr(&out);
    assert!(err.contains(missing), "{err}");
    assert!(
        err.contains("3 fetched") && err.contains("1 failed"),
        "{err}"
    );
    let (m, _) = s.mount(&[]);
    s.tb.reset_stats();
    read_exact(&m.path, &files);
    assert_eq!(media_gets(&s.tb), 0, "{}", s.tb.stats());
    m.unmount();
}

#[test]
fn warm_takes_a_csv_gz_with_a_path_column_and_sub_trees() {
    let s = setup();
    // The model's own record list: a CSV.gz whose `path` column names the DICOM files.
    let csv = s.tmp.path().join("cxr-record-list.csv.gz");
    {
        let m = Mount::start_with(&s.tb.mount_args(BUCKET, &["--metadata-cache", "off"]), &[]);
        std::fs::copy(m.join("cxr-record-list.csv.gz"), &csv).unwrap();
        m.unmount();
    }
    let out = s.warm(&["--from-list", csv.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dcm: Vec<(String, String)> = s
        .sums
        .iter()
        .filter(|(_, n)| n.ends_with(".dcm"))
        .cloned()
        .collect();
    assert!(
        stderr(&out).contains(&format!("{} fetched", dcm.len())),
        "{} DICOM files: {}",
        dcm.len(),
        stderr(&out)
    );
    // A sub-tree: everything under files/ (the DICOM files are cached; the rest is new).
    let out = s.warm(&["files/"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{} already cached", dcm.len())),
        "{}",
        stderr(&out)
    );
    // The top-level files, checked against the model's SHA256SUMS.txt (which lists them).
    let out = s.warm(&["LICENSE.txt", "cxr-record-list.csv.gz", "--verify-sums"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("2 checked against SHA256SUMS.txt, 0 mismatches"),
        "{}",
        stderr(&out)
    );
    let under_files: Vec<(String, String)> = s
        .sums
        .iter()
        .filter(|(_, n)| n.starts_with("files/"))
        .cloned()
        .collect();
    let (m, _) = s.mount(&[]);
    s.tb.reset_stats();
    read_exact(&m.path, &under_files);
    assert_eq!(media_gets(&s.tb), 0, "{}", s.tb.stats());
    m.unmount();
}

#[test]
fn next_to_a_running_mount_warm_reads_through_it_and_a_remount_needs_no_media_request() {
    let s = setup();
    let (list, files) = s.list(8, &[]);
    let (m, _) = s.mount(&[]);
    s.tb.reset_stats();
    // Paths under the mount point work as well as names.
    let abs = m.join(&files[0].1);
    let out = s.warm(&[
        "--from-list",
        list.to_str().unwrap(),
        abs.to_str().unwrap(),
        "--verify-sums",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("reading the files through it") && err.contains(&m.path.display().to_string()),
        "{err}"
    );
    assert!(err.contains("8 fetched"), "{err}");
    assert!(err.contains(", 0 mismatches"), "{err}");
    assert!(
        media_gets(&s.tb) >= 8,
        "the mount fetched them: {}",
        s.tb.stats()
    );

    // `cache stats` works while the mount holds the dir, and `cache clear` is refused.
    let out = s.cache_cmd("stats");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stat_value(&stdout(&out), "complete objects") >= 8,
        "{}",
        stdout(&out)
    );
    let out = s.cache_cmd("clear");
    assert!(!out.status.success(), "clear while mounted succeeded");
    assert!(
        stderr(&out).contains("in use") && stderr(&out).contains(&m.path.display().to_string()),
        "{}",
        stderr(&out)
    );
    m.unmount();

    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop the page cache (needs root)");
    let (m, _) = s.mount(&[]);
    s.tb.reset_stats();
    read_exact(&m.path, &files);
    assert_eq!(media_gets(&s.tb), 0, "{}", s.tb.stats());
    m.unmount();

    let out = s.cache_cmd("clear");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.cache_cmd("stats");
    assert_eq!(stat_value(&stdout(&out), "objects"), 0, "{}", stdout(&out));
    let (m, _) = s.mount(&[]);
    s.tb.reset_stats();
    read_exact(&m.path, &files[..1]);
    assert!(media_gets(&s.tb) > 0, "a cleared cache is fetched again");
    m.unmount();
}

#[test]
fn cache_verify_drops_a_stored_object_with_a_flipped_byte() {
    let s = setup();
    let (list, files) = s.list(4, &[]);
    let out = s.warm(&["--from-list", list.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.cache_cmd("verify");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("verified 4 object versions: 0 dropped"),
        "{}",
        stdout(&out)
    );

    // Flip one byte in the middle of one stored file.
    let objects = s.cache.join("physiofs-cache-v1/objects");
    let stored: PathBuf = std::fs::read_dir(&objects)
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .next()
        .unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&stored)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, len / 2).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], len / 2).unwrap();
    drop(f);

    let out = s.cache_cmd("verify");
    assert!(
        !out.status.success(),
        "verify with a flipped byte succeeded"
    );
    assert!(
        stdout(&out).contains("verified 4 object versions: 1 dropped"),
        "{}",
        stdout(&out)
    );
    let out = s.cache_cmd("stats");
    assert_eq!(
        stat_value(&stdout(&out), "complete objects"),
        3,
        "{}",
        stdout(&out)
    );
    // The dropped one is fetched again, exactly.
    let (m, _) = s.mount(&[]);
    s.tb.reset_stats();
    read_exact(&m.path, &files);
    assert!(media_gets(&s.tb) > 0, "{}", s.tb.stats());
    m.unmount();
}
