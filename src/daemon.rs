//! `physiofs mount --background`: detach from the terminal, and return only once the mount
//! is ready (or has failed, with the error the foreground would have printed).
//!
//! The process forks before any thread exists. The parent waits on a pipe; the child starts a
//! new session, moves to `/` (so it keeps no directory busy), sends its output to the log
//! file, mounts, and reports on the pipe: `ok` and the line to print, or the error. A parent
//! that reads neither (the child died) says so and points at the log. So
//! `physiofs mount --background ... /mnt/x && python train.py` never races the mount.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, bail};

use crate::cli::MountArgs;

/// The child's end of the readiness pipe. Whatever is said first wins; dropping it unsaid
/// (a crash) tells the parent the mount died before it was ready.
pub struct Notify {
    pipe: Mutex<Option<File>>,
}

impl Notify {
    /// The mount is serving: the parent prints `line` and exits 0.
    pub fn ready(&self, line: &str) {
        self.say(&format!("ok\n{line}"));
    }

    /// The mount failed before it was ready: the parent prints `error` and exits 1.
    pub fn failed(&self, error: &str) {
        self.say(&format!("error\n{error}"));
    }

    fn say(&self, msg: &str) {
        if let Some(mut f) = self.pipe.lock().unwrap().take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }
}

/// Where a background mount logs without `--log-file`: `<cache dir>/logs/<mountpoint>.log`,
/// e.g. `~/.cache/physiofs/logs/mnt-mimic-cxr.log`.
pub fn default_log_file(mountpoint: &Path) -> Option<PathBuf> {
    let name: String = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = if name.is_empty() { "root".into() } else { name };
    crate::snapshot::default_dir().map(|d| d.join("logs").join(format!("{name}.log")))
}

/// Environment variables that name a file or directory and are read after the fork:
/// made absolute like the path arguments (which `cli` makes absolute as it parses them), since
/// the background process runs in `/`.
const PATH_VARIABLES: &[&str] = &["GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"];

/// Makes the relative paths in [`PATH_VARIABLES`] absolute. Must run before any thread exists.
fn absolutize_environment() -> anyhow::Result<()> {
    for name in PATH_VARIABLES {
        let Some(value) = std::env::var_os(name) else {
            continue;
        };
        let p = Path::new(&value);
        if !p.as_os_str().is_empty() && p.is_relative() {
            let abs = std::path::absolute(p)
                .with_context(|| format!("cannot make {name}={} absolute", p.display()))?;
            // SAFETY: no other thread exists yet (this runs before the runtime is built).
            unsafe { std::env::set_var(name, abs) };
        }
    }
    Ok(())
}

/// Opens (creating its directory) the log file for appending.
pub fn open_log(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
    // A directory another user owns, or may write in (not sticky), lets them plant a symlink
    // where the log goes; a root mount would then append to a file of their choosing.
    let m = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot read the log directory {}", dir.display()))?;
    let open_to_others = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
    if !m.is_dir() || (m.uid() != 0 && m.uid() != me) || open_to_others {
        bail!(
            "refusing the log directory {}: owned by uid {} with mode {:o}, so another user \
             could replace the log with a symlink; pass --log-file in a directory only this \
             user (or root) can write",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        );
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open the log file {} (--log-file; a symlink there is refused)",
                path.display()
            )
        })?;
    let fm = file.metadata()?;
    if fm.uid() != me || !fm.is_file() {
        bail!(
            "refusing the log file {}: it is owned by uid {}, not {me}; remove it or pass \
             another --log-file",
            path.display(),
            fm.uid()
        );
    }
    Ok(file)
}

/// Forks. In the parent this waits for the child's report and exits; in the child it returns
/// the `Notify` to report with, with stdin on /dev/null and stdout and stderr on the log file.
/// Must run before any thread is started.
pub fn detach(args: &mut MountArgs) -> anyhow::Result<Notify> {
    // The path arguments are absolute already (`cli::path`).
    absolutize_environment()?;
    let log_path = match &args.log_file {
        Some(p) => p.clone(),
        None => match default_log_file(&args.mountpoint) {
            Some(p) => p,
            None => bail!(
                "--background needs somewhere to log: neither HOME nor XDG_CACHE_HOME is set; \
                 pass --log-file FILE"
            ),
        },
    };
    args.log_file = Some(log_path.clone());
    let log = open_log(&log_path)?;
    let devnull = File::open("/dev/null").context("cannot open /dev/null")?;

    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: single-threaded here (checked by the caller's contract: before the runtime).
    match unsafe { libc::fork() } {
        -1 => bail!("cannot fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: plain syscalls on descriptors we own.
            unsafe {
                libc::setsid();
                libc::dup2(devnull.as_raw_fd(), 0);
                libc::dup2(log.as_raw_fd(), 1);
                libc::dup2(log.as_raw_fd(), 2);
            }
            std::env::set_current_dir("/").context("cannot change to /")?;
            eprintln!(
                "physiofs: background process {} started at {}",
                std::process::id(),
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
            Ok(Notify {
                pipe: Mutex::new(Some(File::from(write_end))),
            })
        }
        child => {
            drop(write_end);
            let mut report = String::new();
            let _ = File::from(read_end).read_to_string(&mut report);
            match report.split_once('\n') {
                Some(("ok", line)) => {
                    eprintln!("{line} (process {child}, log {})", log_path.display());
                    std::process::exit(0);
                }
                Some(("error", e)) => {
                    eprintln!("physiofs: error: {e}");
                    std::process::exit(1);
                }
                _ => {
                    eprintln!(
                        "physiofs: error: the background process {child} exited before the mount \
                         was ready; its log is {}",
                        log_path.display()
                    );
                    std::process::exit(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_names_follow_the_mountpoint() {
        let p = default_log_file(Path::new("/mnt/mimic-cxr")).unwrap();
        assert_eq!(p.file_name().unwrap(), "mnt-mimic-cxr.log");
        assert_eq!(p.parent().unwrap().file_name().unwrap(), "logs");
        let p = default_log_file(Path::new("/")).unwrap();
        assert_eq!(p.file_name().unwrap(), "root.log");
    }
}
