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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::cli::{GCS_ENDPOINT, MetadataMode, MountArgs};
use crate::client::auth::{
    CredentialKind, CredentialSource, Credentials, GCE_METADATA_HOST,
    GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_OAUTH_ACCESS_TOKEN,
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
    /// `CLOUDSDK_CONFIG`: gcloud's configuration directory, instead of ~/.config/gcloud.
    pub cloudsdk_config: Option<PathBuf>,
    /// Whether `GOOGLE_OAUTH_ACCESS_TOKEN` holds something (its value, a token, is read only
    /// when the provider is built, and kept nowhere else).
    pub google_oauth_access_token: bool,
    /// `GCE_METADATA_HOST`: the metadata server's `host[:port]`, instead of the VM's.
    pub gce_metadata_host: Option<String>,
    /// Where metadata snapshots go by default (`XDG_CACHE_HOME`, `HOME`, or root's
    /// `/var/cache`); None = nowhere to put them.
    pub cache_dir: Option<PathBuf>,
    /// `PHYSIOFS_BILLING_PROJECT`, `GOOGLE_CLOUD_PROJECT`, `CLOUDSDK_CORE_PROJECT` (empty
    /// counts as unset).
    pub physiofs_billing_project: Option<String>,
    pub google_cloud_project: Option<String>,
    pub cloudsdk_core_project: Option<String>,
    /// The active gcloud configuration's `core/project`, and the file it was read from.
    pub gcloud_project: Option<(String, PathBuf)>,
    /// The `project_id` of the service-account keys that may be used (`--key-file`'s,
    /// `GOOGLE_APPLICATION_CREDENTIALS`'s), by path.
    pub key_projects: BTreeMap<PathBuf, String>,
}

impl Env {
    /// The environment of this process, now.
    pub fn capture() -> Env {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut env = Env {
            uid,
            gid,
            storage_emulator_host: var("STORAGE_EMULATOR_HOST"),
            google_application_credentials: var(GOOGLE_APPLICATION_CREDENTIALS),
            home: var("HOME").map(PathBuf::from),
            cloudsdk_config: var("CLOUDSDK_CONFIG").map(PathBuf::from),
            google_oauth_access_token: var(GOOGLE_OAUTH_ACCESS_TOKEN).is_some(),
            gce_metadata_host: var(GCE_METADATA_HOST),
            cache_dir: crate::snapshot::default_dir(),
            physiofs_billing_project: var("PHYSIOFS_BILLING_PROJECT"),
            google_cloud_project: var("GOOGLE_CLOUD_PROJECT"),
            cloudsdk_core_project: var("CLOUDSDK_CORE_PROJECT"),
            gcloud_project: gcloud_config_dir(var("CLOUDSDK_CONFIG"), var("HOME"))
                .and_then(|dir| gcloud_project(&dir)),
            key_projects: BTreeMap::new(),
        };
        if let Some(path) = env.google_application_credentials.clone() {
            env.read_key_project(Path::new(&path));
        }
        env
    }

    /// [`Env::capture`], plus the `project_id` of `args`'s `--key-file`.
    pub fn capture_for(args: &MountArgs) -> Env {
        let mut env = Env::capture();
        if let Some(key) = &args.source.key_file {
            env.read_key_project(key);
        }
        env
    }

    /// Remembers a key file's `project_id`, if it is readable and has one.
    fn read_key_project(&mut self, path: &Path) {
        let project = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| Some(v.get("project_id")?.as_str()?.trim().to_string()))
            .filter(|p| !p.is_empty());
        if let Some(p) = project {
            self.key_projects.insert(path.to_path_buf(), p);
        }
    }
}

/// gcloud's configuration directory: `CLOUDSDK_CONFIG`, else `~/.config/gcloud`.
fn gcloud_config_dir(cloudsdk_config: Option<String>, home: Option<String>) -> Option<PathBuf> {
    match (cloudsdk_config, home) {
        (Some(dir), _) => Some(PathBuf::from(dir)),
        (None, Some(home)) => Some(Path::new(&home).join(".config/gcloud")),
        (None, None) => None,
    }
}

/// The active configuration's `core/project`: `active_config` names it (default `default`),
/// `configurations/config_NAME` is an INI file.
pub fn gcloud_project(dir: &Path) -> Option<(String, PathBuf)> {
    let name = std::fs::read_to_string(dir.join("active_config"))
        .ok()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let file = dir.join("configurations").join(format!("config_{name}"));
    let text = std::fs::read_to_string(&file).ok()?;
    ini_value(&text, "core", "project").map(|p| (p, file))
}

/// `key` in `[section]` of an INI text (gcloud's own format: `key = value`, `#`/`;` comments).
fn ini_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s.trim().to_string();
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            let v = v.trim();
            return (!v.is_empty()).then(|| v.to_string());
        }
    }
    None
}

/// Which project is billed for requests (`userProject`), and where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingProject {
    pub project: String,
    pub source: BillingSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BillingSource {
    /// `--billing-project`.
    Flag,
    /// An environment variable.
    Variable(&'static str),
    /// `core/project` of the active gcloud configuration, in this file.
    GcloudConfig(PathBuf),
    /// `project_id` of the service-account key in use.
    KeyFile(PathBuf),
    /// The project of the VM, from its metadata server (found at start-up, not resolution).
    MetadataServer,
}

impl std::fmt::Display for BillingProject {
    /// e.g. `my-proj (from GOOGLE_CLOUD_PROJECT)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (", self.project)?;
        match &self.source {
            BillingSource::Flag => f.write_str("--billing-project")?,
            BillingSource::Variable(name) => write!(f, "from {name}")?,
            BillingSource::GcloudConfig(file) => {
                write!(f, "core/project of gcloud configuration {}", file.display())?
            }
            BillingSource::KeyFile(file) => write!(f, "project_id of key {}", file.display())?,
            BillingSource::MetadataServer => {
                f.write_str("the VM's project, from its metadata server")?
            }
        }
        f.write_str(")")
    }
}

/// The billing project: `--billing-project`, then `PHYSIOFS_BILLING_PROJECT`,
/// `GOOGLE_CLOUD_PROJECT`, `CLOUDSDK_CORE_PROJECT`, the active gcloud configuration's
/// `core/project`, the service-account key's `project_id` (the first found). The last
/// source, the metadata server's project, needs I/O: [`MountPlan::bill_metadata_project`].
fn billing_project(
    args: &MountArgs,
    env: &Env,
    credentials: &Credentials,
) -> Option<BillingProject> {
    let found = |project: &str, source| BillingProject {
        project: project.to_string(),
        source,
    };
    if let Some(p) = args.source.billing_project.as_deref().map(str::trim)
        && !p.is_empty()
    {
        return Some(found(p, BillingSource::Flag));
    }
    let vars = [
        ("PHYSIOFS_BILLING_PROJECT", &env.physiofs_billing_project),
        ("GOOGLE_CLOUD_PROJECT", &env.google_cloud_project),
        ("CLOUDSDK_CORE_PROJECT", &env.cloudsdk_core_project),
    ];
    if let Some((name, Some(p))) = vars.into_iter().find(|(_, v)| v.is_some()) {
        return Some(found(p.trim(), BillingSource::Variable(name)));
    }
    if let Some((p, file)) = &env.gcloud_project {
        return Some(found(p, BillingSource::GcloudConfig(file.clone())));
    }
    let key = match (&credentials.kind, &credentials.source) {
        (CredentialKind::Anonymous, _) => None,
        (_, CredentialSource::File(path)) => Some(path.clone()),
        (_, CredentialSource::Variable { name, value })
            if *name == GOOGLE_APPLICATION_CREDENTIALS =>
        {
            Some(PathBuf::from(value))
        }
        _ => None,
    }?;
    let p = env.key_projects.get(&key)?;
    Some(found(p, BillingSource::KeyFile(key)))
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
    /// The billing project and where it was found (its name is `gcs.billing_project`).
    pub billing: Option<BillingProject>,
    pub fs: FsConfig,
    /// Bytes of the block cache: `--cache-size` less the read-ahead budget (`fs.prefetch_budget`).
    pub block_cache: u64,
    pub allow_other: bool,
    pub metadata: MetadataMode,
    /// Directory of metadata snapshots; None = off.
    pub snapshot_dir: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    /// The disk tier; None = off.
    pub disk: Option<DiskPlan>,
    /// `--spin-us`: how long the FUSE spinner keeps a CPU awake after a request (zero: off).
    pub spin: std::time::Duration,
}

/// The disk tier asked for: where, and how big (resolved against its filesystem at mount).
#[derive(Clone, Debug)]
pub struct DiskPlan {
    pub dir: PathBuf,
    pub size: crate::units::SizeOrShare,
    pub passthrough: bool,
}

/// Smallest block cache, whatever `--cache-size` says: a few reads' worth of blocks.
const MIN_BLOCK_CACHE: u64 = 1 << 20;

impl MountPlan {
    /// Decides everything about a mount from `args` and `env`, without I/O. Fails only on
    /// arguments that contradict each other; what can be checked (an empty bucket name, an
    /// endpoint that is not a URL) is left to `checks::plan`, so `doctor` can show it too.
    pub fn resolve(args: &MountArgs, env: &Env) -> anyhow::Result<MountPlan> {
        let (bucket, url_prefix) = parse_bucket(&args.source.bucket);
        let prefix = match (&url_prefix, &args.source.prefix) {
            (Some(a), Some(b)) => {
                bail!("both --bucket gs://{bucket}/{a} and --prefix {b} give a prefix; use one")
            }
            (a, b) => normalize_prefix(a.as_deref().or(b.as_deref())),
        };
        let emulator = env.storage_emulator_host.as_deref();
        let endpoint = match (&args.source.endpoint, emulator) {
            (Some(e), _) => e.trim_end_matches('/').to_string(),
            (None, Some(h)) => emulator_endpoint(h),
            (None, None) => GCS_ENDPOINT.to_string(),
        };
        let credentials = credentials(args, env);
        let billing = billing_project(args, env, &credentials);
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
            bucket_arg: args.source.bucket.clone(),
            gcs: GcsConfig {
                endpoint,
                bucket,
                billing_project: billing.as_ref().map(|b| b.project.clone()),
                retry: RetryConfig {
                    max_attempts: args.retries.max(1),
                    deadline: args.retry_deadline,
                    ..RetryConfig::default()
                },
                // Connections kept for reuse: the read-ahead budget in full-size requests, and
                // the foreground reads and listings beside it; as many as demand reads may
                // have in flight at once (the read path caps them with the same function).
                pool_size: crate::read::fetch::demand_requests(fs.prefetch_budget, fs.max_request)
                    as usize,
                stall_timeout: args.stall_timeout,
                ca_file: args.ca_file.clone(),
                protocol: args.http_protocol,
            },
            credentials,
            billing,
            fs,
            block_cache,
            allow_other: args.allow_other,
            metadata: args.metadata,
            snapshot_dir,
            metrics_addr: args.metrics_addr,
            disk: args.cache_dir.as_ref().map(|dir| DiskPlan {
                dir: dir.clone(),
                size: args.disk_cache_size,
                passthrough: !args.no_passthrough,
            }),
            spin: std::time::Duration::from_micros(args.spin_us),
        })
    }

    /// With no billing project found, the metadata server's project (`tokens` from a VM's
    /// service account), as the last source. Asks nothing for other credentials, so a mount
    /// off GCE never waits on a metadata server that is not there.
    pub async fn bill_metadata_project(&mut self, tokens: &crate::client::auth::TokenSource) {
        if self.billing.is_some() {
            return;
        }
        if let Some(project) = tokens.metadata_project().await {
            self.gcs.billing_project = Some(project.clone());
            self.billing = Some(BillingProject {
                project,
                source: BillingSource::MetadataServer,
            });
        }
    }

    /// `gs://BUCKET/PREFIX`, as the mount is named.
    pub fn target(&self) -> String {
        format!("gs://{}/{}", self.gcs.bucket, self.fs.prefix)
    }
}

/// Which credentials: `--anonymous`; none for an emulator found through STORAGE_EMULATOR_HOST
/// (an explicit `--endpoint` may be a private endpoint that wants them); `--token-file`;
/// `--key-file`; GOOGLE_OAUTH_ACCESS_TOKEN; else application-default credentials, from
/// GOOGLE_APPLICATION_CREDENTIALS when it is set. What is named on the command line wins
/// over the environment.
fn credentials(args: &MountArgs, env: &Env) -> Credentials {
    let with = |kind, source| Credentials {
        kind,
        source,
        account: None,
    };
    match (&env.storage_emulator_host, &args.source.key_file) {
        _ if args.source.anonymous => Credentials::anonymous(CredentialSource::Flag("--anonymous")),
        (Some(host), _) if args.source.endpoint.is_none() => {
            Credentials::anonymous(CredentialSource::Variable {
                name: "STORAGE_EMULATOR_HOST",
                value: host.clone(),
            })
        }
        _ if args.source.token_file.is_some() => with(
            CredentialKind::TokenFile,
            CredentialSource::File(args.source.token_file.clone().unwrap_or_default()),
        ),
        (_, Some(key)) => with(
            CredentialKind::ServiceAccountKey,
            CredentialSource::File(key.clone()),
        ),
        _ if env.google_oauth_access_token => with(
            CredentialKind::AccessTokenVariable,
            CredentialSource::Variable {
                name: GOOGLE_OAUTH_ACCESS_TOKEN,
                value: String::new(),
            },
        ),
        (_, None) => with(
            CredentialKind::ApplicationDefault,
            match &env.google_application_credentials {
                Some(path) => CredentialSource::Variable {
                    name: GOOGLE_APPLICATION_CREDENTIALS,
                    value: path.clone(),
                },
                None => CredentialSource::Search {
                    gcloud_file: gcloud_config_dir(
                        env.cloudsdk_config
                            .as_ref()
                            .map(|p| p.display().to_string()),
                        env.home.as_ref().map(|p| p.display().to_string()),
                    )
                    .map(|d| d.join("application_default_credentials.json")),
                    metadata_host: env.gce_metadata_host.clone(),
                },
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    trait TryMount {
        fn try_parse_from_mount(flags: &[&str]) -> Result<MountArgs, clap::Error>;
    }
    impl TryMount for MountArgs {
        fn try_parse_from_mount(flags: &[&str]) -> Result<MountArgs, clap::Error> {
            let argv = ["physiofs", "mount"].iter().chain(flags).chain(&["/m"]);
            match Cli::try_parse_from(argv)?.command {
                Command::Mount(a) => Ok(a),
                other => panic!("{other:?}"),
            }
        }
    }

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
                ),
                metadata_host: None,
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

        // A token file, then the token variable, win over application-default credentials;
        // the flags win over the variable. The variable's value is never in the plan.
        let tok = Env {
            google_oauth_access_token: true,
            ..gac.clone()
        };
        let p = resolve(&["--token-file", "/run/tok"], &tok);
        assert_eq!(
            (p.credentials.kind, p.credentials.to_string()),
            (
                CredentialKind::TokenFile,
                "access-token file /run/tok".into()
            )
        );
        let p = resolve(&["--key-file", "/k.json"], &tok);
        assert_eq!(p.credentials.kind, CredentialKind::ServiceAccountKey);
        let p = resolve(&[], &tok);
        assert_eq!(
            p.credentials.to_string(),
            "access token from GOOGLE_OAUTH_ACCESS_TOKEN"
        );
        assert!(!format!("{p:?}").contains("ya29"), "{p:?}");
        assert!(
            MountArgs::try_parse_from_mount(&["--token-file", "/t", "--key-file", "/k"]).is_err()
        );

        // CLOUDSDK_CONFIG moves gcloud's file; GCE_METADATA_HOST is kept for the search.
        let moved = Env {
            cloudsdk_config: Some("/etc/gcloud-u".into()),
            gce_metadata_host: Some("127.0.0.1:9".into()),
            ..env()
        };
        assert_eq!(
            resolve(&[], &moved).credentials.source,
            CredentialSource::Search {
                gcloud_file: Some("/etc/gcloud-u/application_default_credentials.json".into()),
                metadata_host: Some("127.0.0.1:9".into()),
            }
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

    #[test]
    fn billing_project_is_found_in_order_and_says_where() {
        let key = PathBuf::from("/k.json");
        let full = Env {
            physiofs_billing_project: Some("p-physiofs".into()),
            google_cloud_project: Some("p-google".into()),
            cloudsdk_core_project: Some("p-cloudsdk".into()),
            gcloud_project: Some(("p-gcloud".into(), "/g/configurations/config_work".into())),
            key_projects: [(key.clone(), "p-key".to_string())].into(),
            ..env()
        };
        let found = |flags: &[&str], env: &Env| resolve(flags, env).billing.map(|b| b.to_string());
        let key_flag = ["--key-file", "/k.json"];
        let with = |flag: &'static str| {
            let mut f = key_flag.to_vec();
            f.extend(["--billing-project", flag]);
            f
        };
        assert_eq!(
            found(&with("p-flag"), &full).as_deref(),
            Some("p-flag (--billing-project)")
        );
        // An empty flag counts as not given.
        assert_eq!(
            found(&with(""), &full).as_deref(),
            Some("p-physiofs (from PHYSIOFS_BILLING_PROJECT)")
        );
        let mut e = full.clone();
        e.physiofs_billing_project = None;
        assert_eq!(
            found(&key_flag, &e).as_deref(),
            Some("p-google (from GOOGLE_CLOUD_PROJECT)")
        );
        e.google_cloud_project = None;
        assert_eq!(
            found(&key_flag, &e).as_deref(),
            Some("p-cloudsdk (from CLOUDSDK_CORE_PROJECT)")
        );
        e.cloudsdk_core_project = None;
        assert_eq!(
            found(&key_flag, &e).as_deref(),
            Some("p-gcloud (core/project of gcloud configuration /g/configurations/config_work)")
        );
        e.gcloud_project = None;
        let p = resolve(&key_flag, &e);
        assert_eq!(
            p.billing.as_ref().map(|b| b.to_string()).as_deref(),
            Some("p-key (project_id of key /k.json)")
        );
        // What was found is what is sent as userProject.
        assert_eq!(p.gcs.billing_project.as_deref(), Some("p-key"));
        // The key's project counts only when that key is used: not anonymous, not another.
        assert_eq!(found(&["--anonymous"], &e), None);
        assert_eq!(found(&["--key-file", "/other.json"], &e), None);
        let gac = Env {
            google_application_credentials: Some("/k.json".into()),
            ..e.clone()
        };
        assert_eq!(
            found(&[], &gac).as_deref(),
            Some("p-key (project_id of key /k.json)")
        );
        assert_eq!(resolve(&[], &env()).gcs.billing_project, None);
    }

    #[test]
    fn the_active_gcloud_configuration_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(gcloud_project(d), None);
        std::fs::create_dir(d.join("configurations")).unwrap();
        let default = d.join("configurations/config_default");
        std::fs::write(&default, "[core]\naccount = a@b.org\nproject = p-default\n").unwrap();
        assert_eq!(gcloud_project(d), Some(("p-default".into(), default)));
        // active_config names another configuration; its [core] project, not another section's.
        std::fs::write(d.join("active_config"), "work\n").unwrap();
        let work = d.join("configurations/config_work");
        std::fs::write(
            &work,
            "# comment\n[compute]\nproject = not-this\n[core]\n  project =  p-work \n",
        )
        .unwrap();
        assert_eq!(gcloud_project(d), Some(("p-work".into(), work.clone())));
        std::fs::write(&work, "[core]\naccount = a@b.org\nproject =\n").unwrap();
        assert_eq!(gcloud_project(d), None);
        // CLOUDSDK_CONFIG wins over HOME.
        assert_eq!(
            gcloud_config_dir(Some("/c".into()), Some("/h".into())),
            Some("/c".into())
        );
        assert_eq!(
            gcloud_config_dir(None, Some("/h".into())),
            Some("/h/.config/gcloud".into())
        );
    }

    #[test]
    fn a_key_files_project_id_is_captured() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k.json");
        std::fs::write(&k, r#"{"type":"service_account","project_id":"p-key"}"#).unwrap();
        let mut e = Env::default();
        e.read_key_project(&k);
        e.read_key_project(&dir.path().join("missing.json"));
        assert_eq!(e.key_projects, [(k, "p-key".to_string())].into());
    }
}
