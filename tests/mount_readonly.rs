//! Every write operation through the mount fails with EROFS and changes nothing in the bucket.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::process::Command;
use std::time::Duration;

use common::*;

const BUCKET: &str = "ro";

/// Everything observable about the bucket: listing metadata and content of every object.
fn snapshot(gcs: &FakeGcs) -> BTreeMap<String, (ObjectInfo, String)> {
    gcs.list(BUCKET, "")
        .into_iter()
        .map(|o| {
            let h = sha256_hex(&gcs.download(BUCKET, &o.name));
            (o.name.clone(), (o, h))
        })
        .collect()
}

fn setup() -> (tempfile::TempDir, FakeGcs) {
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), BUCKET, "a.txt", b"alpha\n");
    seed_file(seed.path(), BUCKET, "b.txt", b"bravo\n");
    seed_file(seed.path(), BUCKET, "dir/c.txt", b"charlie\n");
    seed_file(seed.path(), BUCKET, "dir/sub/d.txt", b"delta\n");
    let gcs = FakeGcs::start(seed.path());
    gcs.upload(BUCKET, "ph/", b"");
    (seed, gcs)
}

#[test]
fn shell_write_operations_fail_with_erofs() {
    let (_seed, gcs) = setup();
    let before = snapshot(&gcs);
    let m = Mount::start(&gcs, BUCKET, &[]);
    let tree_before = walk(&m.path);

    let cmds: &[&[&str]] = &[
        &["touch", "new"],
        &["touch", "a.txt"],
        &["sh", "-c", "echo x > a.txt"],
        &["sh", "-c", "echo x >> a.txt"],
        &["sh", "-c", "echo x > new.txt"],
        &["sh", "-c", "echo x > dir/new.txt"],
        &["cp", "/etc/hostname", "copied"],
        &["rm", "a.txt"],
        &["rm", "-f", "dir/c.txt"],
        &["rm", "-rf", "dir"],
        &["rmdir", "ph"],
        &["mkdir", "d"],
        &["mkdir", "dir/d2"],
        &["mv", "a.txt", "b.txt"],
        &["mv", "a.txt", "z.txt"],
        &["mv", "a.txt", "dir/"],
        &["mv", "dir", "dir2"],
        &["chmod", "777", "a.txt"],
        &["chmod", "777", "dir"],
        &["chown", "1:1", "a.txt"],
        &["truncate", "-s0", "a.txt"],
        &["truncate", "-s", "100", "b.txt"],
        &["ln", "-s", "a.txt", "link"],
        &["ln", "a.txt", "hard"],
        &["mkfifo", "fifo"],
        &["touch", "-d", "2001-01-01", "b.txt"],
    ];
    let mut failures = Vec::new();
    for c in cmds {
        let out = run_timeout(
            Command::new(c[0]).args(&c[1..]).current_dir(&m.path),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("Read-only file system") {
            failures.push(format!(
                "{c:?}: exit {}, stderr {:?}",
                out.status,
                stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "write operations that did not fail with EROFS:\n{}\n{}",
        failures.join("\n"),
        m.diag()
    );

    assert_eq!(
        walk(&m.path),
        tree_before,
        "the tree changed through the mount\n{}",
        m.diag()
    );
    assert_eq!(fs::read(m.join("a.txt")).unwrap(), b"alpha\n");
    assert_eq!(fs::read(m.join("b.txt")).unwrap(), b"bravo\n");
    m.unmount();
    assert_eq!(snapshot(&gcs), before, "the bucket changed");
}

#[test]
fn write_syscalls_fail_with_erofs() {
    let (_seed, gcs) = setup();
    let before = snapshot(&gcs);
    let m = Mount::start(&gcs, BUCKET, &[]);
    let erofs = |what: &str, r: std::io::Result<()>| {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{what} succeeded on a read-only mount\n{}", m.diag()));
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "{what}: {e}\n{}",
            m.diag()
        );
    };
    erofs(
        "open(a.txt, O_WRONLY)",
        OpenOptions::new()
            .write(true)
            .open(m.join("a.txt"))
            .map(drop),
    );
    erofs(
        "open(a.txt, O_RDWR)",
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("a.txt"))
            .map(drop),
    );
    erofs(
        "open(a.txt, O_APPEND)",
        OpenOptions::new()
            .append(true)
            .open(m.join("a.txt"))
            .map(drop),
    );
    erofs(
        "open(new, O_CREAT)",
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.join("new"))
            .map(drop),
    );
    erofs(
        "open(new, O_CREAT|O_EXCL)",
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.join("new"))
            .map(drop),
    );
    erofs("unlink", fs::remove_file(m.join("a.txt")));
    erofs("rmdir", fs::remove_dir(m.join("ph")));
    erofs("mkdir", fs::create_dir(m.join("newdir")));
    erofs("rename", fs::rename(m.join("a.txt"), m.join("c.txt")));
    erofs("symlink", std::os::unix::fs::symlink("a.txt", m.join("sl")));
    erofs("link", fs::hard_link(m.join("a.txt"), m.join("hl")));
    use std::os::unix::fs::PermissionsExt;
    erofs(
        "chmod",
        fs::set_permissions(m.join("a.txt"), fs::Permissions::from_mode(0o777)),
    );
    // A read-only open still works, and a read-only handle cannot be written through.
    let f = OpenOptions::new().read(true).open(m.join("a.txt")).unwrap();
    let e = std::io::Write::write(&mut &f, b"x").expect_err("write on O_RDONLY handle");
    assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    drop(f);
    m.unmount();
    assert_eq!(snapshot(&gcs), before, "the bucket changed");
}
