//! The composition root: from a mount's arguments and the environment to everything a mount
//! needs, decided in one pure function.
//!
//! `mount`, the mount(8) helper (which becomes `mount` arguments) and `demo` (which starts
//! from `mount`'s defaults) all go through [`MountPlan::resolve`], so they cannot disagree on
//! what a flag means: how `--cache-size` splits between the block cache and read-ahead, which
//! credentials are used, where snapshots go. Resolution reads nothing but its inputs (the
//! environment is captured once, in [`Env`], so tests give their own) and does no I/O; what
//! needs the file system or the network (the mount point, building the token provider, the
//! access probe) is checked afterwards, as `checks` in order.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;

use crate::cli::{GCS_ENDPOINT, MetadataMode, MountArgs};
use crate::client::auth::{
    CredentialKind, CredentialSource, Credentials, GOOGLE_APPLICATION_CREDENTIALS,
};
use crate::client::gcs::{GcsConfig, RetryConfig, plain_http};
use crate::fs::FsConfig;
use crate::units::{emulator_endpoint, normalize_prefix, parse_bucket};

/// What resolution reads from the process: environment variables and who we run as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    pub uid: u32,
    pub gid: u32,
    /// `STORAGE_EMULATOR_HOST` (empty counts as unset).
    pub storage_emulator_host: Option<String>,
    /// `GOOGLE_APPLICATION_CREDENTIALS` (empty counts as unset).
    pub google_application_credentials: Option<String>,
    /// `HOME`: where gcloud keeps application-default credentials.
    pub home: Option<PathBuf>,
    /// Where metadata snapshots go by default (`XDG_CACHE_HOME`, `HOME`, or root's
    /// `/var/cache`); None = nowhere to put them.
    pub cache_dir: Option<PathBuf>,
}

impl Env {
    /// The environment of this process, now.
    pub fn capture() -> Env {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Env {
            uid,
            gid,
            storage_emulator_host: var("STORAGE_EMULATOR_HOST"),
            google_application_credentials: var(GOOGLE_APPLICATION_CREDENTIALS),
            home: var("HOME").map(PathBuf::from),
            cache_dir: crate::snapshot::default_dir(),
        }
    }
}

/// Everything needed to mount, resolved from the command line and the environment.
#[derive(Clone, Debug)]
pub struct MountPlan {
    pub mountpoint: PathBuf,
    /// `--bucket` as given (the bucket check quotes it).
    pub bucket_arg: String,
    pub gcs: GcsConfig,
    /// Which credentials; built into a token provider after resolution.
    pub credentials: Credentials,
    pub fs: FsConfig,
    /// Bytes of the block cache: `--cache-size` less the read-ahead budget (`fs.prefetch_budget`).
    pub block_cache: u64,
    pub allow_other: bool,
    pub metadata: MetadataMode,
    /// Directory of metadata snapshots; None = off.
    pub snapshot_dir: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
}

/// Smallest block cache, whatever `--cache-size` says: a few reads' worth of blocks.
const MIN_BLOCK_CACHE: u64 = 1 << 20;

impl MountPlan {
    /// Decides everything about a mount from `args` and `env`, without I/O. Fails only on
    /// arguments that contradict each other; what can be checked (an empty bucket name, an
    /// endpoint that is not a URL) is left to `checks::plan`, so `doctor` can show it too.
    pub fn resolve(args: &MountArgs, env: &Env) -> anyhow::Result<MountPlan> {
        let (bucket, url_prefix) = parse_bucket(&args.bucket);
        let prefix = match (&url_prefix, &args.prefix) {
            (Some(a), Some(b)) => {
                bail!("both --bucket gs://{bucket}/{a} and --prefix {b} give a prefix; use one")
            }
            (a, b) => normalize_prefix(a.as_deref().or(b.as_deref())),
        };
        let emulator = env.storage_emulator_host.as_deref();
        let endpoint = match (&args.endpoint, emulator) {
            (Some(e), _) => e.trim_end_matches('/').to_string(),
            (None, Some(h)) => emulator_endpoint(h),
            (None, None) => GCS_ENDPOINT.to_string(),
        };
        let credentials = credentials(args, env);
        if credentials.kind != CredentialKind::Anonymous
            && let Some(loopback) = plain_http(&endpoint)
        {
            if !loopback {
                bail!(
                    "--endpoint {endpoint} is plain HTTP to another host: the bearer token of \
                     {credentials} would travel in clear; use https://, or --anonymous for a \
                     server that needs no credentials"
                );
            }
            if !args.allow_insecure_endpoint {
                bail!(
                    "--endpoint {endpoint} is plain HTTP: the bearer token of {credentials} would \
                     travel in clear, to whoever bound that port first; use https://, \
                     --anonymous for an emulator, or --allow-insecure-endpoint to send it to \
                     this loopback endpoint anyway"
                );
            }
        }
        let snapshot_dir = match args.metadata_cache.as_deref() {
            Some("off") | Some("none") => None,
            Some(d) => Some(PathBuf::from(d)),
            None => env.cache_dir.clone(),
        };
        let mut fs = FsConfig {
            prefix,
            uid: args.uid.unwrap_or(env.uid),
            gid: args.gid.unwrap_or(env.gid),
            file_mode: args.file_mode,
            dir_mode: args.dir_mode,
            metadata_ttl: args.metadata_ttl,
            next_files: args.prefetch_files,
            ..FsConfig::default()
        };
        if let Some(ttl) = args.metadata_ttl {
            fs.attr_ttl = fs.attr_ttl.min(ttl);
        }
        // --cache-size is the whole data budget: read-ahead in flight gets a quarter of it
        // (within sane bounds) and the block cache the rest.
        fs.prefetch_budget = (args.cache_size / 4).clamp(1 << 20, 256 << 20);
        let block_cache = args
            .cache_size
            .saturating_sub(fs.prefetch_budget)
            .max(MIN_BLOCK_CACHE);
        Ok(MountPlan {
            mountpoint: args.mountpoint.clone(),
            bucket_arg: args.bucket.clone(),
            gcs: GcsConfig {
                endpoint,
                bucket,
                billing_project: args.billing_project.clone().filter(|p| !p.is_empty()),
                retry: RetryConfig {
                    max_attempts: args.retries.max(1),
                    deadline: args.retry_deadline,
                    ..RetryConfig::default()
                },
                pool_size: 64,
                stall_timeout: args.stall_timeout,
            },
            credentials,
            fs,
            block_cache,
            allow_other: args.allow_other,
            metadata: args.metadata,
            snapshot_dir,
            metrics_addr: args.metrics_addr,
        })
    }

    /// `gs://BUCKET/PREFIX`, as the mount is named.
    pub fn target(&self) -> String {
        format!("gs://{}/{}", self.gcs.bucket, self.fs.prefix)
    }
}

/// Which credentials: `--anonymous`; none for an emulator found through STORAGE_EMULATOR_HOST
/// (an explicit `--endpoint` may be a private endpoint that wants them); `--key-file`; else
/// application-default credentials, from GOOGLE_APPLICATION_CREDENTIALS when it is set.
fn credentials(args: &MountArgs, env: &Env) -> Credentials {
    match (&env.storage_emulator_host, &args.key_file) {
        _ if args.anonymous => Credentials::anonymous(CredentialSource::Flag("--anonymous")),
        (Some(host), _) if args.endpoint.is_none() => {
            Credentials::anonymous(CredentialSource::Variable {
                name: "STORAGE_EMULATOR_HOST",
                value: host.clone(),
            })
        }
        (_, Some(key)) => Credentials {
            kind: CredentialKind::ServiceAccountKey,
            source: CredentialSource::File(key.clone()),
            account: None,
        },
        (_, None) => Credentials {
            kind: CredentialKind::ApplicationDefault,
            source: match &env.google_application_credentials {
                Some(path) => CredentialSource::Variable {
                    name: GOOGLE_APPLICATION_CREDENTIALS,
                    value: path.clone(),
                },
                None => CredentialSource::Search {
                    gcloud_file: env
                        .home
                        .as_ref()
                        .map(|h| h.join(".config/gcloud/application_default_credentials.json")),
                },
            },
            account: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn mount_args(flags: &[&str]) -> MountArgs {
        let argv = ["physiofs", "mount"].iter().chain(flags).chain(&["/m"]);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Mount(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn env() -> Env {
        Env {
            uid: 1234,
            gid: 5678,
            home: Some("/home/u".into()),
            cache_dir: Some("/home/u/.cache/physiofs".into()),
            ..Env::default()
        }
    }

    fn resolve(flags: &[&str], env: &Env) -> MountPlan {
        MountPlan::resolve(&mount_args(flags), env).unwrap()
    }

    #[test]
    fn credentials_never_go_in_clear_unless_asked_for_on_loopback() {
        let refused = |flags: &[&str]| {
            MountPlan::resolve(&mount_args(flags), &env())
                .unwrap_err()
                .to_string()
        };
        let e = refused(&[
            "--endpoint",
            "http://127.0.0.1:4443",
            "--key-file",
            "/k.json",
        ]);
        assert!(e.contains("--allow-insecure-endpoint"), "{e}");
        let e = refused(&[
            "--endpoint",
            "http://10.0.0.1:4443",
            "--key-file",
            "/k.json",
            "--allow-insecure-endpoint",
        ]);
        assert!(e.contains("another host"), "{e}");
        // Application-default credentials are credentials too.
        let e = refused(&["--endpoint", "http://localhost:1"]);
        assert!(e.contains("in clear"), "{e}");
        resolve(
            &[
                "--endpoint",
                "http://[::1]:4443",
                "--key-file",
                "/k.json",
                "--allow-insecure-endpoint",
            ],
            &env(),
        );
        resolve(&["--endpoint", "http://10.0.0.1:1", "--anonymous"], &env());
        resolve(
            &["--endpoint", "https://10.0.0.1", "--key-file", "/k"],
            &env(),
        );
    }

    #[test]
    fn cache_size_splits_into_block_cache_and_read_ahead() {
        let split = |size: &str| {
            let p = resolve(&["--cache-size", size], &env());
            (p.block_cache, p.fs.prefetch_budget)
        };
        assert_eq!(split("64MiB"), (48 << 20, 16 << 20));
        assert_eq!(split("1GiB"), (768 << 20, 256 << 20));
        // Read-ahead is capped at 256 MiB, and gets at least 1 MiB.
        assert_eq!(split("4GiB"), ((4 << 30) - (256 << 20), 256 << 20));
        assert_eq!(split("2MiB"), (1 << 20, 1 << 20));
        // The block cache never drops below 1 MiB.
        assert_eq!(split("1MiB"), (1 << 20, 1 << 20));
    }

    #[test]
    fn bucket_url_prefix_and_endpoint() {
        let p = resolve(&["--bucket", "gs://b/files/p10"], &env());
        assert_eq!(
            (p.gcs.bucket.as_str(), p.fs.prefix.as_str()),
            ("b", "files/p10/")
        );
        assert_eq!(p.target(), "gs://b/files/p10/");
        assert_eq!(p.gcs.endpoint, GCS_ENDPOINT);
        let p = resolve(&["--prefix", "/a/b/"], &env());
        assert_eq!(p.gcs.bucket, crate::cli::DEFAULT_BUCKET);
        assert_eq!(p.fs.prefix, "a/b/");
        let e = MountPlan::resolve(
            &mount_args(&["--bucket", "gs://b/x", "--prefix", "y"]),
            &env(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("use one"), "{e}");
        // Names that checks refuse still resolve, so `doctor` can show them.
        let p = resolve(&["--bucket", "gs://", "--endpoint", "ftp://x/"], &env());
        assert_eq!(
            (p.gcs.bucket.as_str(), p.gcs.endpoint.as_str()),
            ("", "ftp://x")
        );
    }

    #[test]
    fn credentials_are_chosen_from_flags_and_environment() {
        let emu = Env {
            storage_emulator_host: Some("localhost:4443".into()),
            ..env()
        };
        let p = resolve(&[], &emu);
        assert_eq!(p.gcs.endpoint, "http://localhost:4443");
        assert_eq!(p.credentials.kind, CredentialKind::Anonymous);
        assert_eq!(
            p.credentials.to_string(),
            "anonymous (STORAGE_EMULATOR_HOST=localhost:4443)"
        );
        // An explicit endpoint wins over the emulator, and is not assumed anonymous.
        let p = resolve(&["--endpoint", "https://private.example/"], &emu);
        assert_eq!(p.gcs.endpoint, "https://private.example");
        assert_eq!(p.credentials.kind, CredentialKind::ApplicationDefault);
        assert_eq!(
            p.credentials.source,
            CredentialSource::Search {
                gcloud_file: Some(
                    "/home/u/.config/gcloud/application_default_credentials.json".into()
                )
            }
        );
        let p = resolve(&["--anonymous"], &env());
        assert_eq!(p.credentials.to_string(), "anonymous (--anonymous)");
        let p = resolve(&["--key-file", "/k.json"], &emu);
        assert_eq!(p.gcs.endpoint, "http://localhost:4443");
        assert_eq!(p.credentials.kind, CredentialKind::Anonymous);
        let p = resolve(&["--key-file", "/k.json"], &env());
        assert_eq!(
            (p.credentials.kind, p.credentials.to_string()),
            (
                CredentialKind::ServiceAccountKey,
                "service-account key /k.json".into()
            )
        );
        let gac = Env {
            google_application_credentials: Some("/sa.json".into()),
            ..env()
        };
        let p = resolve(&[], &gac);
        assert_eq!(
            p.credentials.to_string(),
            "application-default credentials from GOOGLE_APPLICATION_CREDENTIALS=/sa.json"
        );
    }

    #[test]
    fn ownership_modes_metadata_and_network() {
        let p = resolve(&[], &env());
        assert_eq!((p.fs.uid, p.fs.gid), (1234, 5678));
        assert_eq!(p.snapshot_dir, Some("/home/u/.cache/physiofs".into()));
        assert_eq!(p.gcs.retry.max_attempts, 20);
        assert_eq!(p.gcs.retry.deadline, std::time::Duration::from_secs(60));
        assert_eq!(p.gcs.stall_timeout, std::time::Duration::from_secs(10));
        assert_eq!(p.fs.next_files, 8);
        let p = resolve(
            &[
                "--uid",
                "1",
                "--gid",
                "2",
                "--file-mode",
                "0440",
                "--metadata-ttl",
                "5m",
                "--metadata-cache",
                "off",
                "--retries",
                "0",
                "--billing-project",
                "proj",
            ],
            &env(),
        );
        assert_eq!((p.fs.uid, p.fs.gid, p.fs.file_mode), (1, 2, 0o440));
        assert_eq!(p.fs.metadata_ttl, Some(std::time::Duration::from_secs(300)));
        assert!(p.fs.attr_ttl <= std::time::Duration::from_secs(300));
        assert_eq!(p.snapshot_dir, None);
        assert_eq!(p.gcs.retry.max_attempts, 1);
        assert_eq!(p.gcs.billing_project.as_deref(), Some("proj"));
        let p = resolve(&["--metadata-cache", "/var/snap"], &Env::default());
        assert_eq!(p.snapshot_dir, Some("/var/snap".into()));
        assert_eq!(resolve(&[], &Env::default()).snapshot_dir, None);
    }
}
