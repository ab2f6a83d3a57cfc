//! Start-up checks as data: each says what it looked at and passed, or what is wrong and how
//! to fix it, or why it was skipped.
//!
//! `mount` runs them in order and stops at the first failure, with that failure as its error;
//! a report (`doctor`) can run them all and print every line. Keeping the explanations here,
//! as values, means both say the same thing, and each explanation can be tested on its own.

use std::path::Path;
use std::time::Duration;

use crate::client::ClientError;
use crate::client::auth::{AuthError, CredentialKind, Credentials, TokenSource};
use crate::client::gcs::GcsConfig;
use crate::plan::MountPlan;

/// One start-up check and how it came out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Fine; what was found.
    Pass(String),
    /// Wrong: what, and what to do about it.
    Fail { cause: String, fix: String },
    /// Not looked at, and why (e.g. an earlier check failed that this one needs).
    Skip(String),
}

impl Check {
    pub fn pass(name: &'static str, found: impl Into<String>) -> Self {
        Check {
            name,
            outcome: Outcome::Pass(found.into()),
        }
    }

    pub fn fail(name: &'static str, cause: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            outcome: Outcome::Fail {
                cause: cause.into(),
                fix: fix.into(),
            },
        }
    }

    pub fn skip(name: &'static str, reason: impl Into<String>) -> Self {
        Check {
            name,
            outcome: Outcome::Skip(reason.into()),
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Fail { .. })
    }

    /// The error a failed check stops the mount with: the cause, then the fix on a `hint:`
    /// line. None if it did not fail.
    pub fn error(&self) -> Option<anyhow::Error> {
        match &self.outcome {
            Outcome::Fail { cause, fix } => Some(anyhow::anyhow!("{cause}\n  hint: {fix}")),
            _ => None,
        }
    }
}

impl std::fmt::Display for Check {
    /// One line per check for a report, e.g. `✓ bucket: b` or `✗ mount point: ...` followed
    /// by an indented `fix:` line; `-` for a check not made.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Outcome::Pass(found) => write!(f, "✓ {}: {found}", self.name),
            Outcome::Fail { cause, fix } => {
                write!(f, "✗ {}: {cause}\n    fix: {fix}", self.name)
            }
            Outcome::Skip(why) => write!(f, "- {}: {why}", self.name),
        }
    }
}

/// Runs checks in order (a lazy iterator runs only those up to the first failure) and
/// stops at the first failure, as `mount` does: its error, or every check that passed.
pub fn first_failure(checks: impl IntoIterator<Item = Check>) -> anyhow::Result<Vec<Check>> {
    let mut done = Vec::new();
    for c in checks {
        if let Some(e) = c.error() {
            return Err(e);
        }
        done.push(c);
    }
    Ok(done)
}

/// What to do when a requester-pays bucket is asked without a billing project.
const NO_BILLING_PROJECT: &str = "the bucket is requester-pays and no billing project was \
     found: pass --billing-project YOUR_GCP_PROJECT (or set PHYSIOFS_BILLING_PROJECT or \
     GOOGLE_CLOUD_PROJECT, or run `gcloud config set project YOUR_GCP_PROJECT`)";

/// What mounting needs of the machine: the FUSE device, `fusermount3` (not root), and
/// `user_allow_other` (with `--allow-other`), for user `uid`.
pub fn fuse(allow_other_wanted: bool, uid: u32) -> Vec<Check> {
    vec![
        fuse_device(Path::new("/dev/fuse")),
        fusermount(uid, std::env::var_os("PATH").as_deref()),
        allow_other(allow_other_wanted, uid, Path::new("/etc/fuse.conf")),
    ]
}

/// The kernel's FUSE device exists (the fuse module is loaded, or built in).
pub fn fuse_device(dev: &Path) -> Check {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(dev) {
        Ok(m) if m.file_type().is_char_device() => {
            Check::pass("fuse device", format!("{} is present", dev.display()))
        }
        Ok(_) => Check::fail(
            "fuse device",
            format!("{} is not a character device", dev.display()),
            "load the fuse module (`sudo modprobe fuse`); in a container pass --device /dev/fuse",
        ),
        Err(e) => Check::fail(
            "fuse device",
            format!("{} is missing: {e}", dev.display()),
            "load the fuse module (`sudo modprobe fuse`) and install fuse3; in a container \
             pass --device /dev/fuse --cap-add SYS_ADMIN",
        ),
    }
}

/// Who is not root mounts through `fusermount3` (fuse3's setuid helper), found on `path`
/// (`PATH`'s value); root mounts with the mount syscall.
pub fn fusermount(uid: u32, path: Option<&std::ffi::OsStr>) -> Check {
    if uid == 0 {
        return Check::skip(
            "fusermount3",
            "not needed: root mounts with the mount syscall",
        );
    }
    let found = path
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .map(|d| d.join("fusermount3"))
        .find(|p| p.is_file());
    match found {
        Some(p) => Check::pass("fusermount3", p.display().to_string()),
        None => Check::fail(
            "fusermount3",
            "fusermount3 is not on PATH (mounting as a user needs it)",
            "install fuse3 (`sudo apt install fuse3`, `sudo dnf install fuse3`)",
        ),
    }
}

/// With `--allow-other`, a user's mount needs `user_allow_other` in /etc/fuse.conf.
pub fn allow_other(wanted: bool, uid: u32, fuse_conf: &Path) -> Check {
    const NAME: &str = "user_allow_other";
    if !wanted {
        return Check::skip(NAME, "not needed without --allow-other");
    }
    if uid == 0 {
        return Check::skip(NAME, "not needed: root may mount with --allow-other");
    }
    let enabled = std::fs::read_to_string(fuse_conf)
        .map(|t| {
            t.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .any(|l| l == NAME)
        })
        .unwrap_or(false);
    if enabled {
        Check::pass(NAME, format!("enabled in {}", fuse_conf.display()))
    } else {
        Check::fail(
            NAME,
            format!("--allow-other needs {NAME} in {}", fuse_conf.display()),
            format!(
                "add a line `{NAME}` to {} (as root), or mount without --allow-other",
                fuse_conf.display()
            ),
        )
    }
}

/// The billing project found, and where; none is a failure only for PhysioNet's buckets,
/// which are all requester-pays.
pub fn billing(plan: &MountPlan) -> Check {
    const NAME: &str = "billing project";
    match &plan.billing {
        Some(b) => Check::pass(NAME, b.to_string()),
        None if plan.gcs.bucket.ends_with(".physionet.org") => Check::fail(
            NAME,
            format!(
                "none found, and gs://{} is requester-pays (looked at --billing-project, \
                 PHYSIOFS_BILLING_PROJECT, GOOGLE_CLOUD_PROJECT, CLOUDSDK_CORE_PROJECT, the \
                 gcloud configuration's core/project, the key's project_id)",
                plan.gcs.bucket
            ),
            NO_BILLING_PROJECT,
        ),
        None => Check::pass(NAME, "none (fine unless the bucket is requester-pays)"),
    }
}

/// A TCP connection to the endpoint's host could be made (name resolution included):
/// `connected` is the address reached, or why not.
pub fn connection(endpoint: &str, connected: Result<std::net::SocketAddr, String>) -> Check {
    match connected {
        Ok(addr) => Check::pass("connection", format!("{endpoint} ({addr})")),
        Err(e) => Check::fail(
            "connection",
            format!("cannot connect to {endpoint}: {e}"),
            format!(
                "is the endpoint {endpoint} right and reachable? (--endpoint, \
                 STORAGE_EMULATOR_HOST; a proxy or firewall in between; DNS)"
            ),
        ),
    }
}

/// One small ranged read of `object`, what it took, or why it failed.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadSample {
    pub object: String,
    pub bytes: u64,
    /// From sending the small request to its last byte (it is small, so this is about the
    /// time to the first byte).
    pub first_byte: Duration,
    /// A larger read's bytes and time, for throughput.
    pub bulk: Option<(u64, Duration)>,
}

/// The read check: `object` could be read (or which error), explained like the access check.
pub fn read(gcs: &GcsConfig, read: Option<Result<ReadSample, (String, &ClientError)>>) -> Check {
    const NAME: &str = "read";
    let (object, e) = match read {
        None => return Check::skip(NAME, "no object to read (the listing failed or was empty)"),
        Some(Ok(r)) => {
            return Check::pass(
                NAME,
                format!("gs://{}/{} ({} bytes)", gcs.bucket, r.object, r.bytes),
            );
        }
        Some(Err((object, e))) => (object, e),
    };
    let fix = match e {
        ClientError::Denied { status: 403, .. } | ClientError::Denied { status: 401, .. } => {
            "listing works but reading does not: on PhysioNet, sign the data use agreement \
             and click \"Request access using Google Cloud\" on the MIMIC-CXR (or \
             MIMIC-CXR-JPG) page with the account above, then wait ten minutes"
                .to_string()
        }
        ClientError::Denied { status: 400, .. } => NO_BILLING_PROJECT.to_string(),
        _ => "see the message above".to_string(),
    };
    Check::fail(
        NAME,
        format!("cannot read gs://{}/{object}: {e}", gcs.bucket),
        fix,
    )
}

/// First-byte latency and throughput of the read (never a failure: slow still works).
pub fn speed(read: Option<&ReadSample>) -> Check {
    const NAME: &str = "speed";
    let Some(r) = read else {
        return Check::skip(NAME, "nothing was read");
    };
    let mut found = format!("first byte in {} ms", r.first_byte.as_millis());
    if let Some((bytes, took)) = r.bulk {
        let rate = bytes as f64 / took.as_secs_f64().max(1e-6) / 1e6;
        found.push_str(&format!(", {rate:.1} MB/s over {bytes} bytes"));
    }
    Check::pass(NAME, found)
}

/// Whether the kernel can pass reads of cached files straight to them (FUSE passthrough,
/// Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH, root only). Never a failure: without it reads
/// go through physiofs. `config` is the kernel config text, if readable.
/// `--cache-dir`: a directory only this user can write, on a filesystem with room.
pub fn cache_dir(disk: Option<&crate::plan::DiskPlan>) -> Check {
    const NAME: &str = "cache dir";
    let Some(d) = disk else {
        return Check::skip(NAME, "no --cache-dir: file data is cached in memory only");
    };
    if let Err(e) = crate::read::disk::private_dir(&d.dir, true) {
        return Check::fail(
            NAME,
            format!("{e:#}"),
            "use a directory only you can write, e.g. on a local SSD: --cache-dir /mnt/disks/nvme/physiofs",
        );
    }
    match crate::read::disk::filesystem_space(&d.dir) {
        Ok((total, free)) if free > total / 20 => Check::pass(
            NAME,
            format!(
                "{}: {} free of {}, cache bound {}",
                d.dir.display(),
                bytesize::ByteSize::b(free),
                bytesize::ByteSize::b(total),
                bytesize::ByteSize::b(d.size.resolve(total))
            ),
        ),
        Ok((total, free)) => Check::fail(
            NAME,
            format!(
                "{} has {} free of {}: under the 5% the cache leaves free, nothing would be cached",
                d.dir.display(),
                bytesize::ByteSize::b(free),
                bytesize::ByteSize::b(total)
            ),
            "free space there, or use --cache-dir on another filesystem",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{}: {e}", d.dir.display()),
            "pass an existing, writable --cache-dir",
        ),
    }
}

pub fn passthrough(uid: u32, release: &str, config: Option<&str>) -> Check {
    const NAME: &str = "passthrough";
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    if version.len() < 2 || (version[0], version[1]) < (6, 9) {
        return Check::skip(
            NAME,
            format!("kernel {release} has none (it needs 6.9 or later); reads go through physiofs"),
        );
    }
    if let Some(c) = config
        && !c.lines().any(|l| l.trim() == "CONFIG_FUSE_PASSTHROUGH=y")
    {
        return Check::skip(
            NAME,
            format!("kernel {release} is built without CONFIG_FUSE_PASSTHROUGH"),
        );
    }
    let built = if config.is_some() {
        "CONFIG_FUSE_PASSTHROUGH=y"
    } else {
        "kernel config not readable"
    };
    if uid != 0 {
        return Check::skip(
            NAME,
            format!("kernel {release} ({built}), but it needs root (CAP_SYS_ADMIN)"),
        );
    }
    Check::pass(NAME, format!("kernel {release} ({built})"))
}

/// What can be checked of a plan without I/O: the bucket name and the endpoint URL.
pub fn plan(plan: &MountPlan) -> Vec<Check> {
    vec![bucket(plan), endpoint(plan)]
}

fn bucket(plan: &MountPlan) -> Check {
    if plan.gcs.bucket.is_empty() {
        return Check::fail(
            "bucket",
            format!("--bucket {:?} names no bucket", plan.bucket_arg),
            "use NAME or gs://NAME[/PREFIX]",
        );
    }
    Check::pass("bucket", plan.target())
}

fn endpoint(plan: &MountPlan) -> Check {
    let e = &plan.gcs.endpoint;
    if !e.starts_with("http://") && !e.starts_with("https://") {
        return Check::fail(
            "endpoint",
            format!("--endpoint {e:?} is not an http:// or https:// URL"),
            "give a service root such as http://127.0.0.1:4443 (an emulator) or \
             https://storage.googleapis.com",
        );
    }
    Check::pass("endpoint", e.clone())
}

/// Whether the token provider could be built, and whose credentials it uses.
pub fn credentials(built: &Result<TokenSource, AuthError>) -> Check {
    match built {
        Ok(t) => Check::pass("credentials", t.credentials().to_string()),
        Err(e) => Check::fail(
            "credentials",
            format!("credentials: {}", e.cause),
            e.fix.clone(),
        ),
    }
}

/// The two permissions reading a bucket needs, asked of it at start-up.
pub const LIST: &str = "storage.objects.list";
pub const GET: &str = "storage.objects.get";

/// Which of [`LIST`] and [`GET`] the identity holds on the bucket (`answer`, from
/// testPermissions), so "cannot list" and "can list but not read" get their own message, each
/// naming the account, the bucket and the one thing to do. A server that does not answer
/// testPermissions (an emulator: 404, 501, something else) skips this check: the access
/// probe that follows explains what it finds instead.
pub fn permissions(
    gcs: &GcsConfig,
    who: &Credentials,
    answer: Result<&[String], &ClientError>,
) -> Check {
    const NAME: &str = "permissions";
    let held = match answer {
        Ok(held) => held,
        Err(e) => {
            return Check::skip(
                NAME,
                format!("not asked of the server ({e}); the listing below checks access"),
            );
        }
    };
    let has = |p: &str| held.iter().any(|h| h == p);
    let bucket = &gcs.bucket;
    let account = match &who.account {
        Some(a) => a.clone(),
        None => format!("the account of {who}"),
    };
    let physionet = bucket.ends_with(".physionet.org");
    let request = format!(
        "on PhysioNet, sign in, open the {} page and click \"Request access using Google \
         Cloud\" with the Google account {account}; access takes about ten minutes to apply",
        dataset_page(bucket)
    );
    let own_account = "these are the VM's service-account credentials, not your PhysioNet \
         identity: use your own account instead (`gcloud auth application-default login` with \
         the Google account registered on PhysioNet, then mount again)";
    match (has(LIST), has(GET)) {
        (true, true) => Check::pass(
            NAME,
            format!("{account} may list and read gs://{bucket} ({LIST}, {GET})"),
        ),
        (false, _) => Check::fail(
            NAME,
            format!("{account} cannot list gs://{bucket}: it lacks {LIST}"),
            match who.kind {
                CredentialKind::MetadataServer => own_account.to_string(),
                CredentialKind::Anonymous => "pass credentials: run `gcloud auth \
                     application-default login` (or --key-file, --token-file), then mount again"
                    .to_string(),
                _ if physionet => request,
                _ => {
                    format!("ask the bucket's owner to grant {account} roles/storage.objectViewer")
                }
            },
        ),
        (true, false) => Check::fail(
            NAME,
            format!("{account} can list gs://{bucket} but not read its objects: it lacks {GET}"),
            match who.kind {
                CredentialKind::MetadataServer => own_account.to_string(),
                _ if physionet => format!(
                    "PhysioNet grants both together, so access was requested only minutes \
                     ago and is still being applied: wait ten minutes, then mount again (if it \
                     lasts, request access again on the {} page with {account})",
                    dataset_page(bucket)
                ),
                _ => {
                    format!("ask the bucket's owner to grant {account} roles/storage.objectViewer")
                }
            },
        ),
    }
}

/// The PhysioNet page where access to `bucket` is requested.
fn dataset_page(bucket: &str) -> &'static str {
    if bucket == crate::model::JPG_BUCKET {
        "MIMIC-CXR-JPG"
    } else if bucket == crate::model::DICOM_BUCKET {
        "MIMIC-CXR"
    } else {
        "MIMIC-CXR (or MIMIC-CXR-JPG)"
    }
}

/// The mount point exists and is a directory (physiofs never creates it).
pub fn mount_point(mp: &Path) -> Check {
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => {
            Check::pass("mount point", format!("{} is a directory", mp.display()))
        }
        Ok(_) => Check::fail(
            "mount point",
            format!("mount point {} is not a directory", mp.display()),
            "mount on an empty directory you own",
        ),
        Err(e) => Check::fail(
            "mount point",
            format!("mount point {} is not usable: {e}", mp.display()),
            format!("create it with `mkdir -p {}`", mp.display()),
        ),
    }
}

/// The access probe (one small listing, or one object's metadata when the tree comes from a
/// snapshot): `probed` is what it found, or the error, explained in words a user can act on.
pub fn access(gcs: &GcsConfig, prefix: &str, probed: Result<String, &ClientError>) -> Check {
    let e = match probed {
        Ok(found) => return Check::pass("access", found),
        Err(e) => e,
    };
    let fix = match e {
        ClientError::NotFound(_) => format!(
            "the bucket {} does not exist at {} (check --bucket; for an emulator check \
             --endpoint). PhysioNet's buckets are {} (MIMIC-CXR, DICOM) and {} (MIMIC-CXR-JPG)",
            gcs.bucket,
            gcs.endpoint,
            crate::model::DICOM_BUCKET,
            crate::model::JPG_BUCKET
        ),
        ClientError::Denied { status: 400, .. } if gcs.billing_project.is_none() => {
            NO_BILLING_PROJECT.to_string()
        }
        ClientError::Denied { status: 400, .. } => format!(
            "check that the billing project {} exists and is yours (--billing-project)",
            gcs.billing_project.as_deref().unwrap_or_default()
        ),
        ClientError::Denied { status: 401, .. } => "no valid credentials: run `gcloud auth \
             application-default login` (or pass --key-file)"
            .to_string(),
        ClientError::Denied { message, .. } if message.contains("serviceusage") => format!(
            "the account may not bill the project {}: grant it serviceusage.services.use \
             there (the role Service Usage Consumer), or use a project of your own \
             (--billing-project)",
            gcs.billing_project
                .as_deref()
                .unwrap_or("named by --billing-project")
        ),
        ClientError::Denied { .. } => "this Google account has no access: sign the MIMIC-CXR \
             data use agreement on PhysioNet and request Google Cloud access there, using the \
             account you authenticate with; the billing project also needs serviceusage \
             permission"
            .to_string(),
        ClientError::Network { cause, .. }
            if cause.starts_with(crate::client::gcs::UNTRUSTED_CERTIFICATE) =>
        {
            format!(
                "pass --ca-file FILE (or set SSL_CERT_FILE) with the PEM certificate of the \
                 authority that signed {}'s certificate: a TLS-inspecting proxy's CA, or the \
                 testbed's --tls-ca-out file",
                gcs.endpoint
            )
        }
        ClientError::Network { .. } => format!(
            "is the endpoint {} right and reachable? (--endpoint, STORAGE_EMULATOR_HOST)",
            gcs.endpoint
        ),
        _ => "see the message above".to_string(),
    };
    Check::fail(
        "access",
        format!("cannot list gs://{}/{prefix}: {e}", gcs.bucket),
        fix,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::plan::{Env, MountPlan};
    use clap::Parser;

    fn plan(flags: &[&str]) -> MountPlan {
        let argv = ["physiofs", "mount"].iter().chain(flags).chain(&["/m"]);
        let Command::Mount(a) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not a mount")
        };
        MountPlan::resolve(&a, &Env::default()).unwrap()
    }

    fn error_of(c: &Check) -> String {
        format!("{:#}", c.error().expect("a failure"))
    }

    #[test]
    fn the_plan_checks_bucket_and_endpoint() {
        let ok = super::plan(&plan(&[
            "--bucket",
            "gs://b/p",
            "--endpoint",
            "http://h:1",
            "--anonymous",
        ]));
        assert_eq!(
            ok,
            [
                Check::pass("bucket", "gs://b/p/"),
                Check::pass("endpoint", "http://h:1")
            ]
        );
        let bad = super::plan(&plan(&["--bucket", "gs://", "--endpoint", "h:1"]));
        assert!(bad.iter().all(Check::failed), "{bad:?}");
        let e = error_of(&bad[0]);
        assert_eq!(
            e,
            "--bucket \"gs://\" names no bucket\n  hint: use NAME or gs://NAME[/PREFIX]"
        );
        assert!(error_of(&bad[1]).contains("\"h:1\""), "{bad:?}");
        // mount stops at the first failure, with its message.
        let e = first_failure(bad).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            error_of(&Check::fail(
                "bucket",
                "--bucket \"gs://\" names no bucket",
                "use NAME or gs://NAME[/PREFIX]"
            ))
        );
    }

    #[test]
    fn the_runner_stops_at_the_first_failure() {
        let mut ran = Vec::new();
        let checks = [
            Check::pass("a", "fine"),
            Check::skip("b", "not needed"),
            Check::fail("c", "broken", "mend it"),
            Check::fail("d", "also broken", "never reached"),
        ];
        let e = first_failure(checks.into_iter().inspect(|c| ran.push(c.name))).unwrap_err();
        assert_eq!(format!("{e:#}"), "broken\n  hint: mend it");
        assert_eq!(ran, ["a", "b", "c"]);
        let all = first_failure([Check::pass("a", "fine"), Check::skip("b", "why")]).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].to_string(), "✓ a: fine");
        assert_eq!(all[1].to_string(), "- b: why");
        assert_eq!(
            Check::fail("c", "broken", "mend it").to_string(),
            "✗ c: broken\n    fix: mend it"
        );
    }

    #[test]
    fn mount_point_must_be_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!mount_point(dir.path()).failed());
        let missing = dir.path().join("missing-dir");
        let e = error_of(&mount_point(&missing));
        assert!(
            e.contains("missing-dir") && e.contains("is not usable"),
            "{e}"
        );
        assert!(
            e.contains(&format!("mkdir -p {}", missing.display())),
            "{e}"
        );
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let e = error_of(&mount_point(&file));
        assert!(e.contains("a-file") && e.contains("not a directory"), "{e}");
    }

    #[test]
    fn access_failures_are_explained() {
        let gcs = plan(&["--bucket", "b", "--endpoint", "http://h:1", "--anonymous"]).gcs;
        let explain = |e: ClientError| error_of(&access(&gcs, "p/", Err(&e)));
        let denied = |status| ClientError::Denied {
            status,
            message: "no".into(),
        };
        let e = explain(ClientError::NotFound("b".into()));
        assert!(
            e.starts_with("cannot list gs://b/p/: not found (HTTP 404)"),
            "{e}"
        );
        assert!(
            e.contains("does not exist at http://h:1") && e.contains("--bucket"),
            "{e}"
        );
        assert!(explain(denied(400)).contains("--billing-project"));
        assert!(explain(denied(401)).contains("gcloud auth application-default login"));
        assert!(explain(denied(403)).contains("data use agreement"));
        let e = explain(ClientError::Network {
            endpoint: "http://h:1".into(),
            cause: "refused".into(),
        });
        assert!(
            e.contains("cannot reach http://h:1") && e.contains("reachable?"),
            "{e}"
        );
        assert!(explain(ClientError::Malformed("x".into())).contains("see the message above"));
        assert_eq!(
            access(&gcs, "p/", Ok("listed gs://b/p/".into())),
            Check::pass("access", "listed gs://b/p/")
        );
    }

    #[test]
    fn missing_permissions_name_the_account_the_bucket_and_the_fix() {
        use crate::client::auth::CredentialSource;
        let gcs = plan(&["--bucket", crate::model::JPG_BUCKET]).gcs;
        let user = Credentials {
            kind: CredentialKind::GcloudUser,
            source: CredentialSource::File("/adc.json".into()),
            account: Some("me@example.org".into()),
        };
        let vm = Credentials {
            kind: CredentialKind::MetadataServer,
            account: Some("sa@p.iam.gserviceaccount.com".into()),
            ..user.clone()
        };
        let held = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = permissions(&gcs, &user, Ok(&held(&[LIST, GET])));
        assert!(
            !ok.failed() && ok.to_string().contains("me@example.org"),
            "{ok}"
        );

        let e = error_of(&permissions(&gcs, &user, Ok(&held(&[]))));
        assert!(
            e.starts_with(&format!(
                "me@example.org cannot list gs://{}: it lacks storage.objects.list",
                crate::model::JPG_BUCKET
            )),
            "{e}"
        );
        assert!(
            e.contains("MIMIC-CXR-JPG page") && e.contains("Request access using Google Cloud"),
            "{e}"
        );
        let e = error_of(&permissions(&gcs, &user, Ok(&held(&[LIST]))));
        assert!(
            e.contains("can list gs://") && e.contains("but not read") && e.contains(GET),
            "{e}"
        );
        assert!(e.contains("wait ten minutes"), "{e}");
        // The VM's own account: the fix is to use one's own.
        let e = error_of(&permissions(&gcs, &vm, Ok(&held(&[LIST]))));
        assert!(
            e.starts_with("sa@p.iam.gserviceaccount.com can list")
                && e.contains("your own account"),
            "{e}"
        );
        // No account known: the credentials line stands in for it.
        let nobody = Credentials {
            account: None,
            ..user.clone()
        };
        let e = error_of(&permissions(&gcs, &nobody, Ok(&held(&[]))));
        assert!(
            e.starts_with("the account of gcloud application-default"),
            "{e}"
        );
        // A server without testPermissions: skipped, the listing decides.
        let e = ClientError::NotFound("no such route".into());
        assert!(matches!(
            permissions(&gcs, &user, Err(&e)).outcome,
            Outcome::Skip(_)
        ));
        let e = ClientError::Http {
            status: 501,
            message: "not implemented".into(),
        };
        assert!(matches!(
            permissions(&gcs, &user, Err(&e)).outcome,
            Outcome::Skip(_)
        ));
    }

    #[test]
    fn credentials_say_whose_or_why_not() {
        let e = AuthError {
            cause: "no Google credentials found (x)".into(),
            fix: "run gcloud".into(),
        };
        assert_eq!(
            error_of(&credentials(&Err(e))),
            "credentials: no Google credentials found (x)\n  hint: run gcloud"
        );
        let c = credentials(&Ok(TokenSource::Anonymous));
        assert_eq!(c, Check::pass("credentials", "anonymous"));
    }

    #[test]
    fn fuse_device_fusermount_and_allow_other() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!fuse_device(Path::new("/dev/null")).failed());
        let e = error_of(&fuse_device(&dir.path().join("fuse")));
        assert!(
            e.contains("is missing") && e.contains("modprobe fuse"),
            "{e}"
        );
        assert!(error_of(&fuse_device(dir.path())).contains("not a character device"));

        assert!(matches!(fusermount(0, None).outcome, Outcome::Skip(_)));
        let e = error_of(&fusermount(1000, Some(dir.path().as_os_str())));
        assert!(
            e.contains("not on PATH") && e.contains("install fuse3"),
            "{e}"
        );
        std::fs::write(dir.path().join("fusermount3"), b"").unwrap();
        let path = std::env::join_paths(["/nonexistent".into(), dir.path().to_path_buf()]).unwrap();
        assert_eq!(
            fusermount(1000, Some(&path)),
            Check::pass(
                "fusermount3",
                dir.path().join("fusermount3").display().to_string()
            )
        );

        let conf = dir.path().join("fuse.conf");
        assert!(matches!(
            allow_other(false, 1000, &conf).outcome,
            Outcome::Skip(_)
        ));
        assert!(matches!(
            allow_other(true, 0, &conf).outcome,
            Outcome::Skip(_)
        ));
        std::fs::write(&conf, "# user_allow_other\nmount_max = 1000\n").unwrap();
        let e = error_of(&allow_other(true, 1000, &conf));
        assert!(e.contains("add a line `user_allow_other`"), "{e}");
        std::fs::write(&conf, "mount_max = 1000\n user_allow_other \n").unwrap();
        assert!(!allow_other(true, 1000, &conf).failed());
    }

    #[test]
    fn billing_is_required_only_for_physionet_buckets() {
        let e = error_of(&billing(&plan(&[
            "--bucket",
            "mimic-cxr-2.0.0.physionet.org",
        ])));
        assert!(
            e.contains("none found") && e.contains("GOOGLE_CLOUD_PROJECT"),
            "{e}"
        );
        assert!(!billing(&plan(&["--bucket", "other"])).failed());
        let ok = billing(&plan(&["--billing-project", "p"]));
        assert_eq!(ok, Check::pass("billing project", "p (--billing-project)"));
        // The access check says the same when a requester-pays bucket answers 400.
        let gcs = plan(&["--bucket", "b"]).gcs;
        let denied = ClientError::Denied {
            status: 400,
            message: "requester pays".into(),
        };
        assert!(error_of(&access(&gcs, "", Err(&denied))).contains(NO_BILLING_PROJECT));
        let gcs = plan(&["--bucket", "b", "--billing-project", "p"]).gcs;
        assert!(error_of(&access(&gcs, "", Err(&denied))).contains("billing project p exists"));
    }

    #[test]
    fn reads_speed_and_passthrough() {
        let gcs = plan(&["--bucket", "b"]).gcs;
        let sample = ReadSample {
            object: "LICENSE.txt".into(),
            bytes: 4096,
            first_byte: Duration::from_millis(12),
            bulk: Some((2_000_000, Duration::from_secs(1))),
        };
        assert_eq!(
            read(&gcs, Some(Ok(sample.clone()))),
            Check::pass("read", "gs://b/LICENSE.txt (4096 bytes)")
        );
        let denied = ClientError::Denied {
            status: 403,
            message: "no".into(),
        };
        let e = error_of(&read(&gcs, Some(Err(("x".into(), &denied)))));
        assert!(
            e.starts_with("cannot read gs://b/x") && e.contains("wait ten minutes"),
            "{e}"
        );
        assert!(matches!(read(&gcs, None).outcome, Outcome::Skip(_)));
        assert_eq!(
            speed(Some(&sample)),
            Check::pass("speed", "first byte in 12 ms, 2.0 MB/s over 2000000 bytes")
        );
        let skipped = |c: Check| match c.outcome {
            Outcome::Skip(why) => why,
            o => panic!("{o:?}"),
        };
        assert!(skipped(passthrough(0, "6.8.0-45-generic", None)).contains("needs 6.9"));
        assert!(
            skipped(passthrough(0, "6.12.1", Some("CONFIG_FUSE_FS=y\n")))
                .contains("without CONFIG_FUSE_PASSTHROUGH")
        );
        assert!(skipped(passthrough(1000, "6.12.1", None)).contains("needs root"));
        assert_eq!(
            passthrough(0, "6.18.44-fc", Some("CONFIG_FUSE_PASSTHROUGH=y\n")),
            Check::pass(
                "passthrough",
                "kernel 6.18.44-fc (CONFIG_FUSE_PASSTHROUGH=y)"
            )
        );
    }
}
