//! Getting a FUSE session onto a mount point, and off it again.
//!
//! As root we call mount(2) ourselves with the type `fuse.physiofs` (fuser's own direct mount
//! always says plain `fuse`, which hides us from `findmnt -t fuse.physiofs` and `df -t`);
//! otherwise fuser goes through the setuid `fusermount3`, which names the type correctly.
//!
//! The mount point is resolved once, when the mount starts: [`MountPoint::open`] holds an
//! `O_PATH` descriptor of the directory that was checked, and root mounts and unmounts through
//! `/proc/self/fd/N`, which names that directory and nothing else. Mounting by path seconds
//! later (after the access checks) would let a user who owns a directory on the way swap in a
//! symlink meanwhile and have root mount over, or unmount, a directory of their choosing.
//! `fusermount3` does its own safe resolution for non-root mounts.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::fuse::FuseAdapter;

/// The mount point as resolved when the mount started: its path then, and a descriptor of it.
pub struct MountPoint {
    /// Where it was (symlinks resolved), for messages and for `fusermount3`.
    pub path: PathBuf,
    fd: OwnedFd,
}

impl MountPoint {
    /// Resolves `path` (following symlinks, as the user meant it) to the directory it names
    /// now, and holds it.
    pub fn open(path: &Path) -> std::io::Result<MountPoint> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: c is a valid NUL-terminated path; the returned fd is owned below.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::fs::read_link(format!("/proc/self/fd/{raw}"))?;
        Ok(MountPoint { path, fd })
    }

    /// `/proc/self/fd/N`: the held directory, whatever its path names by now.
    fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }
}

/// How to undo the mount.
pub enum KernelMount {
    /// Mounted by us with mount(2) on the held directory.
    Direct(MountPoint),
    /// Mounted by fuser (fusermount3).
    Fuser(fuser::SessionUnmounter, PathBuf),
}

impl KernelMount {
    /// Unmounts; if busy, detaches lazily (the kernel finishes once files are closed).
    pub fn unmount(&mut self) -> std::io::Result<()> {
        match self {
            KernelMount::Direct(mp) => {
                let (c, p) = (CString::new(mp.proc_path())?, &mp.path);
                // SAFETY: c is a valid NUL-terminated path.
                if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                    return Ok(());
                }
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINVAL) {
                    return Ok(()); // already unmounted
                }
                tracing::warn!(
                    "unmount of {} failed ({err}); detaching lazily",
                    p.display()
                );
                // SAFETY: as above.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            KernelMount::Fuser(u, p) => u.unmount().or_else(|err| {
                tracing::warn!(
                    "unmount of {} failed ({err}); detaching lazily",
                    p.display()
                );
                let ok = std::process::Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&*p)
                    .status()
                    .is_ok_and(|s| s.success());
                if ok { Ok(()) } else { Err(err) }
            }),
        }
    }
}

/// Mounts `adapter` on `mountpoint` and completes the FUSE handshake.
pub fn mount(
    adapter: FuseAdapter,
    mountpoint: MountPoint,
    fsname: &str,
    allow_other: bool,
    config: fuser::Config,
) -> std::io::Result<(fuser::Session<FuseAdapter>, KernelMount)> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        match direct_mount(&mountpoint, fsname, allow_other) {
            Ok(fd) => {
                let acl = config.acl;
                return match fuser::Session::from_fd(adapter, fd, acl, config) {
                    Ok(s) => Ok((s, KernelMount::Direct(mountpoint))),
                    Err(e) => {
                        let _ = KernelMount::Direct(mountpoint).unmount();
                        Err(e)
                    }
                };
            }
            // Root without CAP_SYS_ADMIN (a user namespace): let fusermount3 try.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(e),
        }
    }
    let mut s = fuser::Session::new(adapter, &mountpoint.path, &config)?;
    let u = s.unmount_callable();
    Ok((s, KernelMount::Fuser(u, mountpoint.path)))
}

fn direct_mount(
    mountpoint: &MountPoint,
    fsname: &str,
    allow_other: bool,
) -> std::io::Result<OwnedFd> {
    let dev = CString::new("/dev/fuse").unwrap();
    // SAFETY: valid path; the returned fd is owned below.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut opts =
        format!("fd={raw},rootmode=40000,user_id={uid},group_id={gid},default_permissions");
    if allow_other {
        opts.push_str(",allow_other");
    }
    let src = CString::new(fsname.replace(',', "_"))?;
    let target = CString::new(mountpoint.proc_path())?;
    let fstype = CString::new("fuse.physiofs").unwrap();
    let data = CString::new(opts)?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Raises the kernel's read-ahead for this mount (the FUSE connection's backing device) to
/// `kb` KiB. The kernel offers FUSE only 128 KiB, which caps every read request at that size;
/// bigger requests mean fewer round trips through the kernel for sequential readers. Needs
/// root (sysfs); without it the default stays, which is only slower.
pub fn tune_readahead(mountpoint: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!("kernel read-ahead set to {kb} KiB ({path})"),
        Err(e) => tracing::debug!("kernel read-ahead left at default: {path}: {e}"),
    }
}
