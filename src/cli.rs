//! Command-line interface (clap derive). Defaults are chosen for MIMIC-CXR on a GCE VM.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub const DEFAULT_BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";
pub const GCS_ENDPOINT: &str = "https://storage.googleapis.com";
/// Default for `--stall-timeout`.
pub const DEFAULT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "physiofs",
    version,
    about = "Mount PhysioNet's MIMIC-CXR buckets on Google Cloud Storage as a read-only local directory",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount a bucket (or a sub-tree of it) read-only at MOUNTPOINT.
    Mount(MountArgs),
    /// Start the built-in GCS testbed with a small MIMIC-CXR-shaped dataset and mount it
    /// (no credentials, no network). Ctrl-C unmounts.
    Demo(crate::demo::DemoArgs),
    /// Serve a GCS JSON API testbed on loopback (a dataset model or a local folder), with
    /// latency, bandwidth and fault knobs, for tests and benchmarks.
    Testbed(crate::testbed::TestbedArgs),
}

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// Directory to mount on (must exist).
    pub mountpoint: PathBuf,

    /// Bucket to mount: NAME or gs://NAME[/PREFIX].
    #[arg(long, default_value = DEFAULT_BUCKET, help_heading = "Bucket")]
    pub bucket: String,

    /// Mount only objects under this prefix (e.g. `files/p10`).
    #[arg(long, help_heading = "Bucket")]
    pub prefix: Option<String>,

    /// Google Cloud project billed for requests, sent as `userProject` on every call.
    /// PhysioNet's buckets are requester-pays, so this is required for them.
    #[arg(long, env = "PHYSIOFS_BILLING_PROJECT", help_heading = "Bucket")]
    pub billing_project: Option<String>,

    /// Service root URL; `/storage/v1` is appended. For emulators and private endpoints.
    #[arg(long, help_heading = "Bucket")]
    pub endpoint: Option<String>,

    /// Send no credentials (public buckets, emulators).
    #[arg(long, help_heading = "Auth")]
    pub anonymous: bool,

    /// Service-account JSON key file (instead of application-default credentials).
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Auth",
        conflicts_with = "anonymous"
    )]
    pub key_file: Option<PathBuf>,

    /// How directory metadata is loaded: `eager` lists the whole tree at mount with flat
    /// listings (about one request per 1,000 objects), in the background; `lazy` lists each
    /// directory when first used; `auto` is eager up to 3 million objects, and lazy when
    /// --metadata-ttl is set.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Metadata")]
    pub metadata: MetadataMode,

    /// How long listings are trusted, e.g. `10m` (default: for the life of the mount, right
    /// for PhysioNet's immutable releases; set it for buckets that change).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Metadata")]
    pub metadata_ttl: Option<std::time::Duration>,

    /// Where the metadata snapshot is kept, so a remount needs no listing
    /// (default ~/.cache/physiofs; `off` disables it).
    #[arg(long, value_name = "DIR|off", help_heading = "Metadata")]
    pub metadata_cache: Option<String>,

    /// Memory for cached file data, e.g. `512MiB`, `2GiB`.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, help_heading = "Cache")]
    pub cache_size: u64,

    /// When whole files are read one after another in key order (a sorted walk, e.g.
    /// `for f in sorted(glob(...))`), fetch the next N before they are opened (a JPG whole, the
    /// first 4 MiB of a DICOM). Shuffled readers and header scans never trigger it. 0 = off.
    #[arg(long, default_value_t = 8, value_name = "N", help_heading = "Cache")]
    pub prefetch_files: usize,

    /// Attempts per request, the first included, before a read fails with EIO. Throttling
    /// (429), server errors (5xx), timeouts and broken connections are retried with
    /// exponential backoff and full jitter; Retry-After is honoured.
    #[arg(long, default_value_t = 20, value_name = "N", help_heading = "Network")]
    pub retries: u32,

    /// Give up retrying a request after this long without progress (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Network")]
    pub retry_deadline: std::time::Duration,

    /// Abandon a response that sends no bytes for this long, and ask again (a media read
    /// resumes from its first missing byte).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Network")]
    pub stall_timeout: std::time::Duration,

    /// Owner uid of every file (default: the user running physiofs).
    #[arg(long, help_heading = "Mount")]
    pub uid: Option<u32>,

    /// Owner gid of every file (default: the group running physiofs).
    #[arg(long, help_heading = "Mount")]
    pub gid: Option<u32>,

    /// Permission bits of files, octal.
    #[arg(long, default_value = "0444", value_parser = parse_mode, help_heading = "Mount")]
    pub file_mode: u16,

    /// Permission bits of directories, octal.
    #[arg(long, default_value = "0555", value_parser = parse_mode, help_heading = "Mount")]
    pub dir_mode: u16,

    /// Let other users see the mount (needs `user_allow_other` in /etc/fuse.conf when not root).
    /// Permissions are then enforced by the kernel from --file-mode/--dir-mode.
    #[arg(long, help_heading = "Mount")]
    pub allow_other: bool,

    /// Stay in the foreground until unmounted (the default; Ctrl-C unmounts).
    #[arg(
        long,
        short = 'f',
        help_heading = "Mount",
        conflicts_with = "background"
    )]
    pub foreground: bool,

    /// Detach and run in the background; return once the mount is ready (exit 0) or has
    /// failed (exit 1, with the error). Logs go to --log-file, by default
    /// ~/.cache/physiofs/logs/<mountpoint>.log. Stop it with `umount MOUNTPOINT`.
    #[arg(long, alias = "daemon", help_heading = "Mount")]
    pub background: bool,

    /// If the mount point is a stale mount left by a killed process ("Transport endpoint is
    /// not connected"), unmount it lazily first instead of failing.
    #[arg(long, help_heading = "Mount")]
    pub force: bool,

    /// Serve counters (requests, bytes, cache hits) in Prometheus format at this address,
    /// e.g. `127.0.0.1:9464`.
    #[arg(long, value_name = "ADDR", help_heading = "Logging")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, help_heading = "Logging")]
    pub verbose: u8,

    /// Log filter, e.g. `info`, `debug`, `physiofs=trace` (overrides -v; RUST_LOG also works).
    #[arg(long, value_name = "LEVEL", help_heading = "Logging")]
    pub log_level: Option<String>,

    /// Append log lines to this file instead of stderr.
    #[arg(long, value_name = "FILE", help_heading = "Logging")]
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetadataMode {
    Auto,
    Eager,
    Lazy,
}

/// Parses `1048576`, `64MiB`, `2GiB`, `1.5GB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size (try 512MiB or 2GiB): {e}"))
}

/// Parses an octal mode like `0444` or `755`.
pub fn parse_mode(s: &str) -> Result<u16, String> {
    let t = s.trim().trim_start_matches("0o");
    match u16::from_str_radix(t, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode like 0444")),
    }
}

/// Splits `gs://NAME/PREFIX` (or `NAME`) into bucket and optional prefix.
pub fn parse_bucket(s: &str) -> (String, Option<String>) {
    let t = s.strip_prefix("gs://").unwrap_or(s);
    match t.split_once('/') {
        Some((b, p)) if !p.is_empty() => (b.to_string(), Some(p.to_string())),
        Some((b, _)) => (b.to_string(), None),
        None => (t.to_string(), None),
    }
}

/// Normalizes a prefix to `` or `a/b/`.
pub fn normalize_prefix(p: Option<&str>) -> String {
    let t = p.unwrap_or("").trim_matches('/');
    if t.is_empty() {
        String::new()
    } else {
        format!("{t}/")
    }
}

/// Turns `STORAGE_EMULATOR_HOST` (`host:port` or a URL) into a service root URL.
pub fn emulator_endpoint(v: &str) -> String {
    let v = v.trim().trim_end_matches('/');
    if v.starts_with("http://") || v.starts_with("https://") {
        v.to_string()
    } else {
        format!("http://{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_modes_buckets() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_mode("0444").unwrap(), 0o444);
        assert!(parse_mode("999").is_err());
        assert_eq!(
            parse_bucket("gs://b/files/p10"),
            ("b".into(), Some("files/p10".into()))
        );
        assert_eq!(parse_bucket("gs://b/"), ("b".into(), None));
        assert_eq!(parse_bucket("b"), ("b".into(), None));
        assert_eq!(normalize_prefix(Some("/files/p10/")), "files/p10/");
        assert_eq!(normalize_prefix(None), "");
        assert_eq!(emulator_endpoint("localhost:4443"), "http://localhost:4443");
        assert_eq!(emulator_endpoint("https://x:1/"), "https://x:1");
    }
}
