//! The directory tree through a real kernel mount: names, kinds, sizes, mtimes, odd
//! characters, placeholders, sub-tree mounts, ownership options, and how the mount is told
//! where the emulator is.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use common::*;

const BUCKET: &str = "tree";

/// Names with characters that need care in URLs and on the command line.
const ODD: &[&str] = &[
    "odd/with space.txt",
    "odd/ünïcødé✓.txt",
    "odd/100%.txt",
    "odd/100%25.txt",
    "odd/a+b.txt",
    "odd/hash#1.txt",
    "odd/what?.txt",
    "odd/semi;colon&amp=.txt",
    "odd/dir with space/ñ/x#?%+.txt",
];

/// Seeds the tree bucket: nested prefixes, a 2,500-file directory (spans listing pages), a
/// directory with 1,100 sub-directories, odd names; then uploads placeholders and a late
/// object (different mtime). Returns the emulator.
fn tree_bucket() -> (tempfile::TempDir, FakeGcs) {
    let seed = tempfile::tempdir().unwrap();
    let s = seed.path();
    seed_file(s, BUCKET, "top.txt", b"top\n");
    seed_file(s, BUCKET, "empty.bin", b"");
    seed_file(s, BUCKET, "nested/sibling.txt", b"sibling");
    seed_file(s, BUCKET, "nested/a/x.bin", &random_bytes(1, 5000));
    seed_file(s, BUCKET, "nested/a/b/c/deep.txt", b"deep down");
    for i in 0..2500 {
        // Varying sizes so a size mix-up between entries shows.
        seed_file(
            s,
            BUCKET,
            &format!("big/f{i:04}"),
            format!("{i}").repeat(i % 7 + 1).as_bytes(),
        );
    }
    for i in 0..1100 {
        seed_file(s, BUCKET, &format!("manydirs/d{i:04}/file"), b"f");
    }
    for (i, n) in ODD.iter().enumerate() {
        seed_file(s, BUCKET, n, format!("odd content {i}").as_bytes());
    }
    let gcs = FakeGcs::start(s);
    // Uploaded later, so its `updated` differs from the seeded ones.
    std::thread::sleep(Duration::from_millis(1100));
    gcs.upload(BUCKET, "nested/", b""); // placeholder of a directory that has children
    gcs.upload(BUCKET, "nested/a/b/", b"");
    gcs.upload(BUCKET, "lonely/", b""); // placeholder only: an empty directory
    gcs.upload(BUCKET, "late/uploaded.txt", b"uploaded later");
    (seed, gcs)
}

fn listing_names(gcs: &FakeGcs) -> Vec<String> {
    gcs.list(BUCKET, "").into_iter().map(|o| o.name).collect()
}

fn check_tree(m: &Mount, want: &BTreeMap<String, Kind>, what: &str) {
    let got = find_tree(&m.path);
    let diff = tree_diff(&got, want);
    assert!(
        diff.is_empty(),
        "`find {}` differs from the {what}:\n{diff}{}",
        m.path.display(),
        m.diag()
    );
    let walked = walk(&m.path);
    let diff = tree_diff(&walked, want);
    assert!(
        diff.is_empty(),
        "readdir+lstat walk differs from the {what}:\n{diff}{}",
        m.diag()
    );
}

#[test]
fn find_equals_object_set() {
    let (_seed, gcs) = tree_bucket();
    let names = listing_names(&gcs);
    assert!(names.len() > 3600, "emulator lists {} objects", names.len());
    let want = implied_tree(names.iter().map(String::as_str), "");
    assert_eq!(want.get("big/f2499"), Some(&Kind::File));
    assert_eq!(want.get("lonely"), Some(&Kind::Dir));

    let m = Mount::start(&gcs, BUCKET, &[]);
    check_tree(&m, &want, "emulator listing");
    // A second pass (now served from caches) must agree too.
    check_tree(&m, &want, "emulator listing (second pass)");

    // The 2,500-entry directory, listed by ls, has every entry once.
    let out = run_timeout(
        Command::new("ls").arg("-1").arg(m.join("big")),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "ls big: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let want_ls: Vec<String> = (0..2500).map(|i| format!("f{i:04}")).collect();
    assert_eq!(ls.len(), 2500, "{}", m.diag());
    assert_eq!(ls, want_ls);
    m.unmount();
}

#[test]
fn proc_mounts_shows_fuse_physiofs_ro() {
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), "small", "f.txt", b"f");
    let gcs = FakeGcs::start(seed.path());
    let m = Mount::start(&gcs, "small", &[]);
    let e = m.entry();
    assert!(
        e.options.iter().any(|o| o == "ro"),
        "mount options lack ro: {e:?}"
    );
    assert_eq!(e.fstype, "fuse.physiofs", "fstype in /proc/mounts: {e:?}");
    m.unmount();
}

#[test]
fn stat_sizes_and_mtimes_match_listing() {
    let (_seed, gcs) = tree_bucket();
    let objects = gcs.list(BUCKET, "");
    let m = Mount::start(&gcs, BUCKET, &[]);
    let mut mtimes = std::collections::BTreeSet::new();
    let mut bad = Vec::new();
    for o in &objects {
        if let Some(dir) = o.name.strip_suffix('/') {
            let md = fs::metadata(m.join(dir))
                .unwrap_or_else(|e| panic!("stat placeholder dir {dir}: {e}\n{}", m.diag()));
            assert!(md.is_dir(), "{dir} should be a directory\n{}", m.diag());
            continue;
        }
        let p = m.join(&o.name);
        let md = fs::symlink_metadata(&p)
            .unwrap_or_else(|e| panic!("stat {}: {e}\n{}", o.name, m.diag()));
        let (secs, _) = o.mtime();
        mtimes.insert(secs);
        if !md.is_file() || md.len() != o.size || md.mtime() != secs {
            bad.push(format!(
                "{}: file={} size={} (listing {}) mtime={} (listing {} = {})",
                o.name,
                md.is_file(),
                md.len(),
                o.size,
                md.mtime(),
                secs,
                o.updated
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} entries differ from the listing:\n{}\n{}",
        bad.len(),
        objects.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        m.diag()
    );
    assert!(
        mtimes.len() >= 2,
        "test data should have at least two distinct mtimes: {mtimes:?}"
    );
    // Directories are directories (and not files) all the way down.
    for d in [
        "nested",
        "nested/a",
        "nested/a/b",
        "nested/a/b/c",
        "big",
        "manydirs/d0999",
        "odd/dir with space/ñ",
    ] {
        assert!(fs::metadata(m.join(d)).unwrap().is_dir(), "{d}");
    }
    m.unmount();
}

#[test]
fn odd_names_lookup_and_read() {
    let (_seed, gcs) = tree_bucket();
    let m = Mount::start(&gcs, BUCKET, &[]);
    for (i, n) in ODD.iter().enumerate() {
        let want = format!("odd content {i}");
        // Direct lookup (no readdir first) then read.
        let got = fs::read_to_string(m.join(n))
            .unwrap_or_else(|e| panic!("read {n:?}: {e}\n{}", m.diag()));
        assert_eq!(got, want, "{n:?}");
        assert_eq!(
            fs::metadata(m.join(n)).unwrap().len(),
            want.len() as u64,
            "{n:?}"
        );
        // The way a shell user does it.
        let out = run_timeout(Command::new("cat").arg(m.join(n)), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "cat {n:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            m.diag()
        );
        assert_eq!(out.stdout, want.as_bytes());
    }
    // Names that must NOT exist (an encoding mix-up would make them appear).
    for n in [
        "odd/with%20space.txt",
        "odd/a b.txt",
        "odd/hash",
        "odd/what",
        "odd/100%2525.txt",
    ] {
        let e = fs::metadata(m.join(n)).expect_err(n);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{n}: {e}");
    }
    let mut listed: Vec<String> = fs::read_dir(m.join("odd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want: Vec<String> = ODD
        .iter()
        .map(|n| {
            n.trim_start_matches("odd/")
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    want.sort();
    want.dedup();
    assert_eq!(listed, want);
    m.unmount();
}

#[test]
fn placeholder_is_a_directory_only() {
    let (_seed, gcs) = tree_bucket();
    let m = Mount::start(&gcs, BUCKET, &["--log-level", "debug"]);
    let lonely = m.join("lonely");
    assert!(fs::metadata(&lonely).unwrap().is_dir(), "{}", m.diag());
    assert_eq!(
        fs::read_dir(&lonely).unwrap().count(),
        0,
        "placeholder-only dir must be empty"
    );
    let e = fs::read(&lonely).expect_err("reading a directory");
    assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{e}");

    let root: Vec<(String, bool)> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.file_type().unwrap().is_dir(),
            )
        })
        .collect();
    let n_nested: Vec<_> = root.iter().filter(|(n, _)| n == "nested").collect();
    assert_eq!(n_nested, [&("nested".to_string(), true)], "root: {root:?}");
    assert!(root.iter().any(|(n, d)| n == "lonely" && *d));
    assert!(!root.iter().any(|(n, _)| n.is_empty()));

    let mut nested: Vec<String> = fs::read_dir(m.join("nested"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    nested.sort();
    assert_eq!(
        nested,
        ["a", "sibling.txt"],
        "the placeholder `nested/` must not list as an entry"
    );
    let mut b: Vec<String> = fs::read_dir(m.join("nested/a/b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    b.sort();
    assert_eq!(b, ["c"]);
    m.unmount();
}

#[test]
fn prefix_mounts_only_the_subtree() {
    let (_seed, gcs) = tree_bucket();
    let names = listing_names(&gcs);

    let m = Mount::start(&gcs, BUCKET, &["--prefix", "nested/"]);
    let want = implied_tree(names.iter().map(String::as_str), "nested/");
    assert!(want.contains_key("a/b/c/deep.txt") && want.contains_key("sibling.txt"));
    check_tree(&m, &want, "listing under nested/");
    assert_eq!(
        fs::read_to_string(m.join("a/b/c/deep.txt")).unwrap(),
        "deep down"
    );
    assert!(
        fs::metadata(m.join("top.txt")).is_err(),
        "top.txt is outside the prefix"
    );
    m.unmount();

    // gs://BUCKET/PREFIX form, no trailing slash.
    let args = vec![
        "--endpoint".into(),
        gcs.endpoint().into(),
        "--anonymous".into(),
        "--bucket".into(),
        format!("gs://{BUCKET}/nested/a").into(),
    ];
    let m = Mount::start_with(&args, &[]);
    let want = implied_tree(names.iter().map(String::as_str), "nested/a/");
    check_tree(&m, &want, "listing under nested/a/");
    assert_eq!(fs::read(m.join("x.bin")).unwrap(), random_bytes(1, 5000));
    m.unmount();
}

#[test]
fn empty_bucket_and_mount_options() {
    let seed = tempfile::tempdir().unwrap();
    seed_bucket(seed.path(), "empty");
    seed_file(seed.path(), "one", "only.txt", b"1");
    let gcs = FakeGcs::start(seed.path());

    let m = Mount::start(&gcs, "empty", &["--foreground", "-v"]);
    let out = run_timeout(
        Command::new("ls").arg("-la").arg(&m.path),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "ls -la: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.diag()
    );
    assert!(walk(&m.path).is_empty());
    let out = run_timeout(
        Command::new("stat").arg("-f").arg(&m.path),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "stat -f (statfs): {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.diag()
    );
    let e = fs::metadata(m.join("nothing")).expect_err("lookup in an empty bucket");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    m.unmount();

    let m = Mount::start(
        &gcs,
        "one",
        &[
            "--uid",
            "1234",
            "--gid",
            "2345",
            "--file-mode",
            "0440",
            "--dir-mode",
            "0550",
            "--allow-other",
        ],
    );
    let e = m.entry();
    assert!(
        e.options.iter().any(|o| o == "allow_other"),
        "--allow-other not in {e:?}"
    );
    let f = fs::metadata(m.join("only.txt")).unwrap();
    let d = fs::metadata(&m.path).unwrap();
    assert_eq!(
        (f.uid(), f.gid(), f.mode() & 0o7777),
        (1234, 2345, 0o440),
        "file owner/mode\n{}",
        m.diag()
    );
    assert_eq!(
        (d.uid(), d.gid(), d.mode() & 0o7777),
        (1234, 2345, 0o550),
        "root dir owner/mode\n{}",
        m.diag()
    );
    assert_eq!(fs::read(m.join("only.txt")).unwrap(), b"1");
    m.unmount();
}

#[test]
fn emulator_host_env_and_billing_project() {
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), "env", "dir/file.txt", b"via env");
    let gcs = FakeGcs::start(seed.path());
    let hostport = format!("127.0.0.1:{}", gcs.port);

    // host:port form, no --endpoint and no --anonymous: the env implies no credentials.
    let args = vec!["--bucket".into(), "env".into()];
    let m = Mount::start_with(&args, &[("STORAGE_EMULATOR_HOST", &hostport)]);
    assert_eq!(
        fs::read(m.join("dir/file.txt")).unwrap(),
        b"via env",
        "{}",
        m.diag()
    );
    m.unmount();

    // URL form, plus --billing-project: every request carries userProject.
    let before = gcs.request_log().len();
    let args = vec![
        "--bucket".into(),
        "env".into(),
        "--billing-project".into(),
        "my-billing".into(),
    ];
    let m = Mount::start_with(&args, &[("STORAGE_EMULATOR_HOST", &gcs.endpoint())]);
    assert_eq!(
        fs::read(m.join("dir/file.txt")).unwrap(),
        b"via env",
        "{}",
        m.diag()
    );
    assert!(walk(&m.path).contains_key("dir/file.txt"));
    m.unmount();
    let reqs: Vec<String> = gcs.request_log()[before..].to_vec();
    assert!(
        reqs.iter().any(|r| r.contains("alt=media")),
        "no media read logged: {reqs:?}"
    );
    let missing: Vec<&String> = reqs
        .iter()
        .filter(|r| !r.contains("userProject=my-billing"))
        .collect();
    assert!(
        missing.is_empty(),
        "requests without userProject=my-billing: {missing:?}"
    );
}

#[test]
fn harness_implied_tree() {
    // The expectation builder itself (no mount).
    let t = implied_tree(["a/b/c.txt", "a/", "x", "p/q/", "pre/z"], "");
    let want: BTreeMap<String, Kind> = [
        ("a", Kind::Dir),
        ("a/b", Kind::Dir),
        ("a/b/c.txt", Kind::File),
        ("x", Kind::File),
        ("p", Kind::Dir),
        ("p/q", Kind::Dir),
        ("pre", Kind::Dir),
        ("pre/z", Kind::File),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(t, want);
    let t = implied_tree(["a/", "a/b", "ab"], "a/");
    assert_eq!(
        t.into_iter().collect::<Vec<_>>(),
        [("b".to_string(), Kind::File)]
    );
}

/// Names GCS allows but POSIX cannot show, through a real mount: each follows the rule in
/// README ("Odd names"), nothing crashes or loops, nothing appears outside the mount, and each
/// skipped name gets a warning naming it.
#[test]
fn posix_odd_names_follow_the_rules() {
    const B: &str = "posix-odd";
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), B, "w/ok.txt", b"ok");
    let gcs = FakeGcs::start(seed.path());
    let long = format!("w/{}.txt", "n".repeat(256));
    let skipped = [
        "w/a//b.txt",
        "w/./dot.txt",
        "w/../escape.txt",
        "../escape2.txt",
        "w/c/../escape3.txt",
        long.as_str(),
    ];
    for n in skipped {
        gcs.upload(B, n, b"must not show");
    }
    gcs.upload(B, "w/new\nline.txt", b"newline");
    gcs.upload(B, "w/x", b"file x"); // a file next to the prefix x/
    gcs.upload(B, "w/x/inner.txt", b"inner");
    gcs.upload(
        B,
        &format!("w/{}.txt", "m".repeat(251)),
        b"255 bytes exactly",
    );

    let m = Mount::start(&gcs, B, &[]);
    let mut tree = find_tree(&m.path);
    // `w/a/` and `w/c/` are prefixes GCS itself reports (of `w/a//b.txt`, `w/c/../…`): they
    // may show as directories, but empty ones; the skipped objects never show.
    for d in ["w/a", "w/c"] {
        if let Some(k) = tree.remove(d) {
            assert_eq!(k, Kind::Dir, "{d}");
            assert_eq!(
                fs::read_dir(m.join(d)).unwrap().count(),
                0,
                "{d} is not empty"
            );
        }
    }
    let names: Vec<&str> = tree.keys().map(String::as_str).collect();
    let max = format!("w/{}.txt", "m".repeat(251));
    let mut want = vec![
        "w",
        "w/new\nline.txt",
        "w/ok.txt",
        "w/x",
        "w/x/inner.txt",
        &max,
    ];
    want.sort();
    assert_eq!(names, want, "\n{}", m.diag());
    assert_eq!(
        tree["w/x"],
        Kind::Dir,
        "the directory wins over the object x"
    );
    assert_eq!(fs::read(m.join("w/new\nline.txt")).unwrap(), b"newline");
    assert_eq!(fs::read(m.join(&max)).unwrap(), b"255 bytes exactly");
    // Nothing escaped: the mount's parent has no escape*.txt, and `..` lookups stay POSIX.
    for e in ["escape.txt", "escape2.txt", "escape3.txt"] {
        assert!(
            !m.path.parent().unwrap().join(e).exists(),
            "{e} outside the mount"
        );
        assert!(
            !m.join(e).exists() && !m.join(format!("w/{e}")).exists(),
            "{e}"
        );
    }
    // Direct lookups of skipped names fail cleanly (ENOENT / ENAMETOOLONG), no hang.
    let e = fs::metadata(m.join(&long)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "{e}");
    let log = fs::read_to_string(m.stderr_path()).unwrap();
    for n in [
        "w/a//b.txt",
        "w/./dot.txt",
        "w/../escape.txt",
        "w/c/../escape3.txt",
        "w/x",
    ] {
        assert!(
            log.lines().any(|l| l.contains("skipping") && l.contains(n)),
            "no warning names {n:?}:\n{log}"
        );
    }
    m.unmount();
}
