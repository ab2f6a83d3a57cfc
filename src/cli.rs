//! Command-line interface (clap derive): the arguments of every subcommand, and nothing else.
//!
//! Declarations only, so that any module may import them: what the arguments mean is decided
//! in `plan` (a mount), `demo` and `testbed`, and the values are parsed by `units`. Defaults
//! are chosen for MIMIC-CXR on a GCE VM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::model::ModelKind;
use crate::testbed::knobs::{Malformed, parse_bandwidth};
use crate::testbed::overlay::{SyntheticSpec, parse_synthetic};
use crate::units::{absolute_path, parse_dir_or_off, parse_mode, parse_rate, parse_size};

/// The value parser of every path argument (`value_parser = path()`): made absolute against the
/// current directory as the command line is parsed ([`absolute_path`]: prepended, not
/// resolved), so a path means the same after `--background` has moved to `/`. The test
/// `every_path_argument_is_made_absolute` holds every PathBuf argument to it.
fn path() -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().try_map(|s| absolute_path(&s))
}

pub const DEFAULT_BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";
pub const GCS_ENDPOINT: &str = "https://storage.googleapis.com";

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
    Demo(DemoArgs),
    /// Serve a GCS JSON API testbed on loopback (a dataset model or a local folder), with
    /// latency, bandwidth and fault knobs, for tests and benchmarks.
    Testbed(TestbedArgs),
    /// Check a setup without mounting: FUSE, credentials and whose they are, the billing
    /// project, the connection, list and read access to the bucket, a sample read's speed.
    /// Takes `mount`'s flags (the mount point is optional). Exit 0 only if a mount would work.
    Doctor(DoctorArgs),
    /// Fetch objects into --cache-dir ahead of a training run (straight into the cache dir,
    /// or through the mount that holds it), so every epoch reads from local disk.
    Warm(WarmArgs),
    /// Inspect, empty or re-check a --cache-dir.
    Cache(CacheArgs),
}

/// `physiofs warm`: the bucket flags of `mount` (the same [`SourceArgs`], described by
/// reference to mount's), what to fetch, and how many at once. Resolved through a mount's plan,
/// so warm and mount agree on every default.
#[derive(Debug, Clone, Args)]
#[command(mut_args(warm_help))]
pub struct WarmArgs {
    /// Object names relative to the bucket prefix (`files/p10/p10000032/s50414267/x.dcm`),
    /// paths under a physiofs mount point, or sub-trees (`files/p10/`).
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,

    /// A file of paths, one a line, or a CSV (optionally .gz) with a `path` column, such as
    /// MIMIC-CXR's `cxr-record-list.csv.gz`.
    #[arg(value_parser = path(), long, value_name = "FILE")]
    pub from_list: Option<PathBuf>,

    /// Objects fetched at once.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub jobs: usize,

    /// Also check every warmed file against the bucket's SHA256SUMS.txt and list mismatches.
    #[arg(long)]
    pub verify_sums: bool,

    /// The cache dir to fill (the mount's --cache-dir).
    #[arg(value_parser = path(), long, value_name = "DIR", help_heading = "Cache")]
    pub cache_dir: PathBuf,

    /// As `mount --disk-cache-size`.
    #[arg(
        long,
        default_value = "50%",
        value_name = "SIZE|N%",
        value_parser = crate::units::parse_size_or_share,
        help_heading = "Cache"
    )]
    pub disk_cache_size: crate::units::SizeOrShare,

    #[command(flatten)]
    pub source: SourceArgs,

    /// As `mount --retries`.
    #[arg(long, help_heading = "Network")]
    pub retries: Option<u32>,

    /// More log output (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Warm's help for the flags it shares with `mount` ([`SourceArgs`]): by reference to mount's.
fn warm_help(a: clap::Arg) -> clap::Arg {
    let help = match a.get_id().as_str() {
        "bucket" => "As `mount --bucket`",
        "prefix" => "As `mount --prefix`: names are relative to it",
        "billing_project" => {
            return a
                .help("As `mount --billing-project`")
                .env("PHYSIOFS_BILLING_PROJECT");
        }
        "endpoint" => "As `mount --endpoint`",
        "anonymous" => "As `mount --anonymous`",
        "key_file" => "As `mount --key-file`",
        "token_file" => "As `mount --token-file`",
        _ => return a,
    };
    a.help(help)
}

/// `physiofs cache`.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CacheAction {
    /// Objects, complete objects, bytes and journal size (works next to a running mount).
    Stats(CacheDirArg),
    /// Delete everything the cache dir holds (refused while a mount or warm uses it).
    Clear(CacheDirArg),
    /// Re-check every stored block against its CRC32C; drop versions with a bad one.
    Verify(CacheDirArg),
}

#[derive(Debug, Clone, Args)]
pub struct CacheDirArg {
    /// The cache dir (a mount's --cache-dir).
    #[arg(value_parser = path(), long, value_name = "DIR")]
    pub cache_dir: PathBuf,
}

/// `physiofs doctor [MOUNTPOINT] [mount flags]`.
#[derive(Debug, Clone, Args)]
#[command(mut_arg("mountpoint", |a| a.required(false).default_value(".")))]
pub struct DoctorArgs {
    #[command(flatten)]
    pub mount: MountArgs,
}

/// Which bucket, and the credentials to read it with: the flags `mount` (and so `doctor`) and
/// `warm` share.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Bucket to mount: NAME or gs://NAME[/PREFIX].
    #[arg(long, default_value = DEFAULT_BUCKET, help_heading = "Bucket")]
    pub bucket: String,

    /// Mount only objects under this prefix (e.g. `files/p10`).
    #[arg(long, help_heading = "Bucket")]
    pub prefix: Option<String>,

    /// Google Cloud project billed for requests, sent as `userProject` on every call.
    /// PhysioNet's buckets are requester-pays, so one is required for them. If not given:
    /// PHYSIOFS_BILLING_PROJECT, GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT, the active
    /// gcloud configuration's core/project, then the service-account key's project_id.
    #[arg(long, help_heading = "Bucket")]
    pub billing_project: Option<String>,

    /// Service root URL; `/storage/v1` is appended. For emulators and private endpoints.
    #[arg(long, help_heading = "Bucket")]
    pub endpoint: Option<String>,

    /// Send no credentials (public buckets, emulators).
    #[arg(long, help_heading = "Auth")]
    pub anonymous: bool,

    /// Service-account JSON key file (instead of application-default credentials).
    #[arg(
        value_parser = path(),
        long,
        value_name = "FILE",
        help_heading = "Auth",
        conflicts_with = "anonymous"
    )]
    pub key_file: Option<PathBuf>,

    /// A file holding an OAuth access token (e.g. `gcloud auth print-access-token > FILE`,
    /// or one a sidecar rotates): read again whenever it changes. Without this or --key-file,
    /// GOOGLE_OAUTH_ACCESS_TOKEN, if set, is used as the token.
    #[arg(
        value_parser = path(),
        long,
        value_name = "FILE",
        help_heading = "Auth",
        conflicts_with_all = ["anonymous", "key_file"]
    )]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// Directory to mount on (must exist).
    #[arg(value_parser = path())]
    pub mountpoint: PathBuf,

    #[command(flatten)]
    pub source: SourceArgs,

    /// Send credentials to a plain-http:// `--endpoint` on this machine (127.0.0.1, ::1,
    /// localhost). Without it such an endpoint with credentials is refused: any local user
    /// could have bound that port first and would read the bearer token. Never allowed for
    /// another host.
    #[arg(long, help_heading = "Auth")]
    pub allow_insecure_endpoint: bool,

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
    #[arg(long, value_name = "DIR|off", value_parser = parse_dir_or_off, help_heading = "Metadata")]
    pub metadata_cache: Option<String>,

    /// Memory for cached file data, e.g. `512MiB`, `2GiB`.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, help_heading = "Cache")]
    pub cache_size: u64,

    /// When whole files are read one after another in key order (a sorted walk, e.g.
    /// `for f in sorted(glob(...))`), fetch the next N before they are opened (a JPG whole, the
    /// first 4 MiB of a DICOM). Shuffled readers and header scans never trigger it. 0 = off.
    #[arg(long, default_value_t = 8, value_name = "N", help_heading = "Cache")]
    pub prefetch_files: usize,

    /// Keep fetched file data on local disk here (e.g. a local NVMe SSD), across unmounts,
    /// remounts and reboots: every epoch after the first reads from disk. Off unless given.
    /// fstab: `cache_dir=DIR`.
    #[arg(value_parser = path(), long, value_name = "DIR", help_heading = "Cache")]
    pub cache_dir: Option<PathBuf>,

    /// Most file data kept in --cache-dir: a size (`300GiB`) or a share of its filesystem
    /// (`50%`). Least recently used objects are evicted beyond it, and writing stops while the
    /// filesystem has less than 5% free, so the cache cannot fill the disk.
    #[arg(long, default_value = "50%", value_name = "SIZE|N%", value_parser = crate::units::parse_size_or_share, help_heading = "Cache")]
    pub disk_cache_size: crate::units::SizeOrShare,

    /// Serve files complete in --cache-dir through physiofs instead of letting the kernel read
    /// them directly (FUSE passthrough, used by default on root mounts on Linux 6.9+).
    #[arg(long, help_heading = "Cache")]
    pub no_passthrough: bool,

    /// Keep one CPU spinning while FUSE requests arrive less than this many microseconds apart
    /// (0 = off), so it never halts between them. Speeds up tree walks (`find`, `os.walk`) on VMs
    /// whose hypervisor wakes a halted vCPU slowly, at the cost of that CPU while requests keep
    /// coming; an idle mount uses none. See the README's benchmark for what it buys here.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "MICROSECONDS",
        help_heading = "Mount"
    )]
    pub spin_us: u64,

    /// Attempts per request, the first included, before a read fails with EIO. Throttling
    /// (429), server errors (5xx), timeouts and broken connections are retried with
    /// exponential backoff and full jitter; Retry-After is honoured.
    #[arg(long, default_value_t = 20, value_name = "N", help_heading = "Network")]
    pub retries: u32,

    /// A request, all its attempts and all its bytes, ends this long after it began (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Network")]
    pub retry_deadline: std::time::Duration,

    /// Abandon a response that sends no bytes for this long, and ask again (a media read
    /// resumes from its first missing byte).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION", help_heading = "Network")]
    pub stall_timeout: std::time::Duration,

    /// Also trust the certificate authorities in this PEM file (a TLS-inspecting proxy, a
    /// private endpoint, the testbed's `--tls-ca-out`). SSL_CERT_FILE works too.
    #[arg(
        value_parser = path(),
        long,
        value_name = "FILE",
        env = "SSL_CERT_FILE",
        help_heading = "Network"
    )]
    pub ca_file: Option<PathBuf>,

    /// HTTP version spoken to storage over HTTPS: `http1` (a pool of connections, one request
    /// each: the faster for bulk reads) or `http2` (requests multiplexed over few connections).
    #[arg(long, value_enum, default_value = "http1", help_heading = "Network")]
    pub http_protocol: HttpProtocol,

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
    #[arg(value_parser = path(), long, value_name = "FILE", help_heading = "Logging")]
    pub log_file: Option<PathBuf>,
}

/// `--http-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HttpProtocol {
    Http1,
    Http2,
}

/// `--http2` of the testbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetadataMode {
    Auto,
    Eager,
    Lazy,
}

impl MountArgs {
    /// `physiofs mount MOUNTPOINT` with every other flag at its default: what `demo` starts
    /// from, so the demo mounts with exactly the settings a plain mount gets.
    pub fn defaults(mountpoint: PathBuf) -> MountArgs {
        #[derive(Parser)]
        struct Mount {
            #[command(flatten)]
            args: MountArgs,
        }
        // A placeholder positional (a real one could look like a flag); no flag is given, so
        // nothing can fail to parse.
        let mut args = Mount::try_parse_from(["physiofs", "."])
            .expect("`physiofs mount .` parses")
            .args;
        args.mountpoint = mountpoint;
        args
    }
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where to mount (default: a new temporary directory, removed afterwards).
    #[arg(value_parser = path())]
    pub mountpoint: Option<PathBuf>,
    /// Patients in the demo dataset (the real one has 65,379).
    #[arg(long, default_value_t = 20)]
    pub patients: u32,
    /// Which bucket to model: dicom or jpg.
    #[arg(long, default_value = "dicom")]
    pub model: ModelKind,
    /// Scale of file sizes (1.0 = real sizes, ~13.6 MB per DICOM).
    #[arg(long, default_value_t = 1.0)]
    pub size_scale: f64,
    /// Memory for cached file data.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// Unmount and exit right after printing the instructions (for scripts and tests).
    #[arg(long, hide = true)]
    pub exit_after_ready: bool,
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Which dataset model the testbed serves (`--model`, `--add-model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TestbedModel {
    Dicom,
    Jpg,
}

/// `--bandwidth`: bytes per second, 0 = unlimited (the testbed's knob reads it so).
fn parse_bandwidth_arg(s: &str) -> Result<u64, String> {
    Ok(parse_bandwidth(s)?.unwrap_or(0))
}

/// Command-line arguments of the testbed server.
#[derive(clap::Args, Clone, Debug)]
pub struct TestbedArgs {
    /// Address to listen on (port 0 = pick a free one).
    #[arg(long, default_value = "127.0.0.1:4443")]
    pub addr: SocketAddr,
    /// Serve a local folder (one sub-folder per bucket) instead of the dataset model.
    #[arg(value_parser = path(), long)]
    pub dir: Option<PathBuf>,
    /// Dataset model to serve (when --dir is not given).
    #[arg(long, value_enum, default_value = "dicom")]
    pub model: TestbedModel,
    /// Also serve this model, in its own bucket, with the same --patients/--seed/--size-scale
    /// (repeatable; e.g. `--model dicom --add-model jpg` serves both buckets).
    #[arg(long, value_enum)]
    pub add_model: Vec<TestbedModel>,
    /// Add a pseudo-random object of SIZE bytes: `NAME=SIZE` (in the first model's bucket) or
    /// `gs://BUCKET/NAME=SIZE` (repeatable; e.g. `bench/1g.bin=1GiB`). Costs ~1 MiB of memory
    /// whatever the size; content depends only on the name. Works with --dir too.
    #[arg(long, value_name = "NAME=SIZE", value_parser = parse_synthetic)]
    pub synthetic: Vec<SyntheticSpec>,
    /// Number of patients in the dataset model.
    #[arg(long, default_value_t = 100)]
    pub patients: u64,
    /// Seed for the dataset model and for fault injection (deterministic).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scale factor for object sizes in the dataset model.
    #[arg(long, default_value_t = 1.0)]
    pub size_scale: f64,
    /// Delay before the response headers of every storage request (e.g. 30ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub first_byte_latency: Duration,
    /// Per-connection body rate cap, e.g. 200MB/s (default unlimited).
    #[arg(long, value_parser = parse_bandwidth_arg)]
    pub bandwidth: Option<u64>,
    /// Fraction of storage requests answered 429 or 503.
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Fraction of media responses whose connection is reset mid-body.
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Fraction of media responses that end early (fewer bytes than Content-Length).
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub truncate_rate: f64,
    /// Fraction of media responses that hang mid-body for --stall-duration, then close.
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub stall_rate: f64,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub stall_duration: Duration,
    /// Reject requests without userProject= (400), like a requester-pays bucket.
    #[arg(long)]
    pub requester_pays: bool,
    /// The caller may not list BUCKET: listings answer 403, testPermissions leaves out
    /// storage.objects.list (repeatable).
    #[arg(long, value_name = "BUCKET")]
    pub deny_list: Vec<String>,
    /// The caller may list BUCKET but not read its objects: reads answer 403,
    /// testPermissions leaves out storage.objects.get (repeatable).
    #[arg(long, value_name = "BUCKET")]
    pub deny_get: Vec<String>,
    /// Require `Authorization: Bearer TOKEN` with one of these tokens (repeatable; `tok-*` = prefix).
    #[arg(long = "require-token")]
    pub require_token: Vec<String>,
    /// A token is accepted only for this long after its first use (default: forever).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub token_ttl: Option<Duration>,
    /// Fraction of media bodies with one byte flipped (lengths intact).
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub corrupt_rate: f64,
    /// Extra first-byte latency, uniform in [0, this).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency_jitter: Duration,
    /// Malform every answer of one kind (for client tests).
    #[arg(long, value_enum)]
    pub malformed: Option<Malformed>,
    /// Serve HTTPS with a self-signed certificate for 127.0.0.1 and localhost, made at start.
    #[arg(long)]
    pub tls: bool,
    /// Write the certificate (PEM) that clients must trust to this file (with --tls), e.g. for
    /// `physiofs mount --ca-file`, `curl --cacert`, `rclone --ca-cert`.
    #[arg(value_parser = path(), long, value_name = "FILE", requires = "tls")]
    pub tls_ca_out: Option<PathBuf>,
    /// Offer HTTP/2 by ALPN (with --tls); `off` leaves clients only http/1.1.
    #[arg(long, value_enum, default_value = "on")]
    pub http2: OnOff,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_takes_mount_flags_and_an_optional_mount_point() {
        let doctor = |argv: &[&str]| match Cli::try_parse_from(argv).unwrap().command {
            Command::Doctor(a) => a.mount,
            other => panic!("{other:?}"),
        };
        let a = doctor(&[
            "physiofs",
            "doctor",
            "--bucket",
            "b",
            "--billing-project",
            "p",
        ]);
        assert_eq!(
            (a.mountpoint, a.source.bucket, a.source.billing_project),
            (
                std::env::current_dir().unwrap(),
                "b".into(),
                Some("p".into())
            )
        );
        assert_eq!(
            doctor(&["physiofs", "doctor", "/mnt/x"]).mountpoint,
            PathBuf::from("/mnt/x")
        );
    }

    #[test]
    fn mount_defaults_are_the_flags_defaults() {
        let d = MountArgs::defaults(PathBuf::from("--not-a-flag"));
        let parsed = match Cli::try_parse_from(["physiofs", "mount", "/m"])
            .unwrap()
            .command
        {
            Command::Mount(a) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(d.mountpoint, PathBuf::from("--not-a-flag"));
        assert_eq!(d.cache_size, 1 << 30);
        assert_eq!(
            format!(
                "{:?}",
                MountArgs {
                    mountpoint: "/m".into(),
                    ..d
                }
            ),
            format!("{parsed:?}")
        );
    }

    /// Every path a subcommand takes, flag or positional, is absolute once parsed: a relative
    /// one names the same file after `--background` moves the process to `/`. Walks the whole
    /// CLI, so a path argument added later without `value_parser = path()` fails here.
    #[test]
    fn every_path_argument_is_made_absolute() {
        use clap::CommandFactory;
        let cwd = std::env::current_dir().unwrap();
        let mut checked = Vec::new();
        let mut pending = vec![Cli::command()];
        while let Some(cmd) = pending.pop() {
            pending.extend(cmd.get_subcommands().cloned());
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                let is_path = arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>();
                if !is_path && id != "metadata_cache" {
                    continue;
                }
                let argv: Vec<String> = match arg.get_long() {
                    Some(long) => vec!["x".into(), format!("--{long}"), "rel/p".into()],
                    None => vec!["x".into(), "rel/p".into()],
                };
                let m = cmd
                    .clone()
                    .ignore_errors(true)
                    .try_get_matches_from(&argv)
                    .unwrap_or_else(|e| panic!("{} {argv:?}: {e}", cmd.get_name()));
                let got = if is_path {
                    m.get_one::<PathBuf>(id).cloned()
                } else {
                    m.get_one::<String>(id).map(PathBuf::from)
                };
                assert_eq!(got, Some(cwd.join("rel/p")), "{} {argv:?}", cmd.get_name());
                checked.push(format!("{} {id}", cmd.get_name()));
            }
        }
        // The walk saw the paths it is meant to (and so would see a new one).
        for want in [
            "mount mountpoint",
            "mount ca_file",
            "mount key_file",
            "mount token_file",
            "mount log_file",
            "mount cache_dir",
            "mount metadata_cache",
            "doctor mountpoint",
            "warm from_list",
            "warm cache_dir",
            "demo mountpoint",
            "testbed tls_ca_out",
            "stats cache_dir",
        ] {
            assert!(
                checked.iter().any(|c| c == want),
                "{want} not in {checked:?}"
            );
        }
        // An environment value goes through the same parser (`SSL_CERT_FILE` for --ca-file).
        let m = Cli::try_parse_from(["physiofs", "mount", "m", "--metadata-cache", "off"]).unwrap();
        let Command::Mount(a) = m.command else {
            panic!()
        };
        assert_eq!(a.metadata_cache.as_deref(), Some("off"));
        assert_eq!(a.mountpoint, cwd.join("m"));
    }
}
