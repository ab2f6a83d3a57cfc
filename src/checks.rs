//! Start-up checks as data: each says what it looked at and passed, or what is wrong and how
//! to fix it, or why it was skipped.
//!
//! `mount` runs them in order and stops at the first failure, with that failure as its error;
//! a report (`doctor`) can run them all and print every line. Keeping the explanations here,
//! as values, means both say the same thing, and each explanation can be tested on its own.

use std::path::Path;

use crate::client::ClientError;
use crate::client::auth::{AuthError, TokenSource};
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
    /// One line per check for a report, e.g. `ok    bucket: b` or `FAIL  mount point: ...`
    /// followed by an indented `fix:` line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Outcome::Pass(found) => write!(f, "ok    {}: {found}", self.name),
            Outcome::Fail { cause, fix } => {
                write!(f, "FAIL  {}: {cause}\n      fix: {fix}", self.name)
            }
            Outcome::Skip(why) => write!(f, "skip  {}: {why}", self.name),
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
            "the bucket {} does not exist at {} (check --bucket; for an emulator check --endpoint)",
            gcs.bucket, gcs.endpoint
        ),
        ClientError::Denied { status: 400, .. } => {
            "the bucket is requester-pays: pass --billing-project YOUR_GCP_PROJECT".to_string()
        }
        ClientError::Denied { status: 401, .. } => "no valid credentials: run `gcloud auth \
             application-default login` (or pass --key-file)"
            .to_string(),
        ClientError::Denied { .. } => "this Google account has no access: sign the MIMIC-CXR \
             data use agreement on PhysioNet and request Google Cloud access there, using the \
             account you authenticate with; the billing project also needs serviceusage \
             permission"
            .to_string(),
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
        assert_eq!(all[0].to_string(), "ok    a: fine");
        assert_eq!(all[1].to_string(), "skip  b: why");
        assert_eq!(
            Check::fail("c", "broken", "mend it").to_string(),
            "FAIL  c: broken\n      fix: mend it"
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
}
