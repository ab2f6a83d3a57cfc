//! Stale mount points: a FUSE filesystem whose process died (kill -9, out of memory, a crash)
//! leaves its mount in place with nobody serving it, and every access to the mount point then
//! fails with `ENOTCONN` ("Transport endpoint is not connected"). `physiofs mount` on such a
//! path would otherwise report only "mount point is not usable", which does not say that a
//! dead mount is in the way or how to clear it. So the mount point is checked first: a stale
//! mount is named (its filesystem and source from `/proc/self/mountinfo`) with the commands
//! that clear it, or, with `--force`, lazily unmounted before mounting again. A lazy unmount
//! (`MNT_DETACH`) is the one that works on a dead FUSE mount: a plain one can fail with
//! `EBUSY` while anything still holds a file or directory under it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Stacked stale mounts (a mount point remounted and killed several times) are peeled off one
/// by one; past this many something else keeps re-creating them.
const MAX_LAZY_UNMOUNTS: usize = 16;

/// One line of `/proc/self/mountinfo`, the fields this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Checks that `path` is not a stale mount (or under one). With `force`, clears stale mounts
/// on it with a lazy unmount instead of failing. Any other problem with the path (missing, not
/// a directory) is left to the caller's own checks, which word it for that case.
pub fn check_mountpoint(path: &Path, force: bool) -> anyhow::Result<()> {
    for _ in 0..MAX_LAZY_UNMOUNTS {
        let Some(err) = stale_error(path) else {
            return Ok(());
        };
        // "Transport endpoint is not connected", without Rust's " (os error 107)".
        let err = err.to_string();
        let err = err.split(" (os error").next().unwrap_or(&err);
        let abs = absolute(path);
        let found = find_mount(&read_mountinfo(), &abs);
        let target = found
            .as_ref()
            .map_or(abs.clone(), |m| m.mount_point.clone());
        let what = match &found {
            Some(m) => format!(
                "the {} mount of {} on {}",
                m.fstype,
                m.source,
                target.display()
            ),
            None => format!("a mount on {}", target.display()),
        };
        if !force {
            bail!(
                "mount point {} is a stale mount (\"{err}\"): {what} lost the process that served \
                 it (it was killed or crashed without unmounting). Clear it with `umount -l {t}` \
                 (as root) or `fusermount3 -uz {t}`, or pass --force to have physiofs do that \
                 before mounting",
                path.display(),
                t = target.display(),
            );
        }
        tracing::warn!("--force: lazily unmounting {what} ({err})");
        lazy_unmount(&target).with_context(|| format!("--force could not clear {what}"))?;
    }
    bail!(
        "mount point {} is still stale after {MAX_LAZY_UNMOUNTS} lazy unmounts; \
         see `findmnt {}`",
        path.display(),
        path.display()
    )
}

/// The error that makes `path` stale, if it is: `ENOTCONN` from a FUSE mount whose daemon is
/// gone, or `ECONNABORTED` from one whose connection was aborted
/// (`/sys/fs/fuse/connections/N/abort`). `stat` alone is not enough: the kernel answers it
/// from cached attributes for a while after the daemon died, so `statfs`, which always asks
/// the daemon, is tried too.
fn stale_error(path: &Path) -> Option<std::io::Error> {
    let is_stale =
        |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED));
    if let Err(e) = std::fs::metadata(path) {
        return is_stale(&e).then_some(e);
    }
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) } == 0 {
        return None;
    }
    let e = std::io::Error::last_os_error();
    is_stale(&e).then_some(e)
}

/// `path` made absolute and its parent resolved (the parent is not stale when the path is
/// the stale mount itself, and mountinfo shows resolved paths); the last component cannot be
/// resolved, since resolving it is what fails.
fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(p) => p.join(name),
            Err(_) => abs,
        },
        _ => abs,
    }
}

fn read_mountinfo() -> Vec<MountInfo> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| parse_mountinfo(&s))
        .unwrap_or_default()
}

/// Parses `/proc/self/mountinfo` (see proc(5)): `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS
/// [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`, with octal escapes in paths.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mount_point = fields.get(4).filter(|_| sep > 4)?;
            Some(MountInfo {
                mount_point: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(mount_point))),
                fstype: fields.get(sep + 1)?.to_string(),
                source: String::from_utf8_lossy(&unescape(fields.get(sep + 2)?)).into_owned(),
            })
        })
        .collect()
}

/// The mount `path` is on or under: the last-mounted entry with the longest mount point that
/// is `path` or one of its ancestors (a FUSE one preferred, since only FUSE goes stale this
/// way).
pub fn find_mount(mounts: &[MountInfo], path: &Path) -> Option<MountInfo> {
    let covering = || {
        mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| path.starts_with(&m.mount_point))
    };
    let best = |fuse_only: bool| {
        covering()
            .filter(|(_, m)| !fuse_only || m.fstype == "fuse" || m.fstype.starts_with("fuse."))
            .max_by_key(|(i, m)| (m.mount_point.as_os_str().len(), *i))
            .map(|(_, m)| m.clone())
    };
    best(true).or_else(|| best(false))
}

/// Undoes mountinfo's `\ooo` octal escapes (space, tab, newline, backslash).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Detaches the mount on `target`: `umount2(MNT_DETACH)` as root, `fusermount3 -uz`
/// otherwise (the setuid helper is how a user unmounts a FUSE mount).
fn lazy_unmount(target: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let c = CString::new(target.as_os_str().as_bytes())
            .context("the mount point path contains a NUL byte")?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        bail!(
            "umount -l {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
    let out = std::process::Command::new("fusermount3")
        .arg("-uz")
        .arg(target)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run fusermount3 (install Debian's fuse3)")?;
    if !out.status.success() {
        bail!(
            "fusermount3 -uz {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /proc rw,nosuid - proc proc rw
41 22 0:35 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
88 41 0:52 / /tmp/a\\040b/mnt ro,nosuid,nodev,noatime - fuse.physiofs gs://bucket/files/ ro,user_id=0
89 88 0:53 / /tmp/a\\040b/mnt ro - fuse.physiofs gs://other/ ro,user_id=0
";

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 5);
        assert_eq!(m[3].mount_point, PathBuf::from("/tmp/a b/mnt"));
        assert_eq!(m[3].fstype, "fuse.physiofs");
        assert_eq!(m[3].source, "gs://bucket/files/");
        // Optional fields (shared:N) before the separator do not shift the rest.
        assert_eq!(m[2].fstype, "tmpfs");
        assert!(parse_mountinfo("garbage line\n").is_empty());
    }

    #[test]
    fn the_covering_mount_is_the_deepest_and_last() {
        let m = parse_mountinfo(MOUNTINFO);
        let on = find_mount(&m, Path::new("/tmp/a b/mnt")).unwrap();
        assert_eq!(
            on.source, "gs://other/",
            "the last of stacked mounts is on top"
        );
        let under = find_mount(&m, Path::new("/tmp/a b/mnt/sub/dir")).unwrap();
        assert_eq!(under.mount_point, PathBuf::from("/tmp/a b/mnt"));
        // `/tmp/a b/mntx` is not under `/tmp/a b/mnt`: components, not string prefixes.
        let beside = find_mount(&m, Path::new("/tmp/a b/mntx")).unwrap();
        assert_eq!(beside.fstype, "tmpfs");
    }

    #[test]
    fn healthy_and_missing_paths_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        check_mountpoint(dir.path(), false).unwrap();
        check_mountpoint(&dir.path().join("missing"), true).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        check_mountpoint(&file, false).unwrap();
    }
}
