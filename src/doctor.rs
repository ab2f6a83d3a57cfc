//! `physiofs doctor`: every start-up check of a mount, run to the end and printed one per
//! line, so a setup can be checked (and each problem fixed) without mounting.
//!
//! First-time users mostly fail before they read a byte: the wrong Google account, access
//! requested minutes ago, no billing project, no fuse3. A mount stops at the first of these;
//! `doctor` shows them all, with the same checks and the same messages (`checks`), plus what
//! a mount does not need to know up front: a sample read's latency and throughput, and
//! whether the kernel can pass reads through.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::checks::{self, Check, ReadSample};
use crate::cli::DoctorArgs;
use crate::client::auth::TokenSource;
use crate::client::gcs::{GcsClient, RetryConfig};
use crate::client::{ListRequest, ObjectClient, ObjectVersion};
use crate::plan::{Env, MountPlan};

/// Bytes of the small read (its time is about the time to the first byte) and of the larger
/// one (for throughput).
const SMALL_READ: u64 = 4 << 10;
const BULK_READ: u64 = 4 << 20;

/// Runs every check, prints one line each, and fails (exit 1) if any check a mount needs
/// failed.
pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let mount = args.mount;
    let mut plan = MountPlan::resolve(&mount, &Env::capture_for(&mount))?;
    let given_mount_point = mount.mountpoint != Path::new(".");
    let list = checklist(&mut plan, given_mount_point).await;
    for c in &list {
        println!("{c}");
    }
    let failed = list.iter().filter(|c| c.failed()).count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} checks failed: fix them (see each `fix:` line) and run \
             `physiofs doctor` again",
            list.len()
        );
    }
    println!(
        "physiofs doctor: everything a mount of {} needs is in place",
        plan.target()
    );
    Ok(())
}

/// Every check, in the order a mount meets them; those that need an earlier one (a token, a
/// connection, a listed object) are skipped when it failed.
pub async fn checklist(plan: &mut MountPlan, mount_point: bool) -> Vec<Check> {
    let uid = Env::capture().uid;
    let mut out = checks::fuse(plan.allow_other, uid);
    if mount_point {
        out.push(checks::mount_point(&plan.mountpoint));
    }
    let plan_checks = checks::plan(plan);
    let plan_ok = !plan_checks.iter().any(Check::failed);
    out.extend(plan_checks);
    let mut tokens = TokenSource::build(&plan.credentials).await;
    if let Ok(t) = &mut tokens {
        t.identify().await;
        plan.bill_metadata_project(t).await;
    }
    out.push(checks::credentials(&tokens));
    out.push(checks::billing(plan));
    let plan = &*plan;
    let connected = match plan_ok {
        true => connect(&plan.gcs.endpoint).await,
        false => Err("the endpoint is not a URL".into()),
    };
    let reachable = connected.is_ok();
    out.push(checks::connection(&plan.gcs.endpoint, connected));

    let client = match (tokens, reachable && plan_ok) {
        (Ok(t), true) => GcsClient::new(plan.gcs.clone(), t)
            .map(|c| c.with_retry(RetryConfig::startup().min(&plan.gcs.retry)))
            .ok(),
        _ => None,
    };
    match client {
        Some(client) => out.extend(bucket_checks(plan, &client).await),
        None => {
            let why = "needs credentials, a bucket name and a connection";
            out.push(Check::skip("permissions", why));
            out.push(Check::skip("access", why));
            out.push(Check::skip("read", why));
            out.push(Check::skip("speed", why));
        }
    }
    out.push(passthrough(uid));
    out.push(crate::checks::cache_dir(plan.disk.as_ref()));
    out
}

/// One-item listing, a small read of the first object, and a larger one for throughput.
async fn bucket_checks(plan: &MountPlan, client: &GcsClient) -> Vec<Check> {
    let prefix = &plan.fs.prefix;
    let probe = ListRequest {
        prefix: prefix.clone(),
        max_results: Some(1),
        ..Default::default()
    };
    let held = client.test_permissions(&[checks::LIST, checks::GET]).await;
    let permissions = checks::permissions(&plan.gcs, client.credentials(), held.as_deref());
    let page = client.list_page(&probe).await;
    let first = page.as_ref().ok().and_then(|p| p.items.first().cloned());
    let listed = match (&page, &first) {
        (Ok(_), Some(o)) => Ok(format!(
            "can list gs://{}/{prefix} (first object {})",
            plan.gcs.bucket, o.name
        )),
        (Ok(_), None) => Ok(format!(
            "can list gs://{}/{prefix}, which holds no objects",
            plan.gcs.bucket
        )),
        (Err(e), _) => Err(e),
    };
    let access = checks::access(&plan.gcs, prefix, listed);
    let Some(obj) = first else {
        return vec![
            permissions,
            access,
            checks::read(&plan.gcs, None),
            checks::speed(None),
        ];
    };
    let version = ObjectVersion {
        name: &obj.name,
        generation: obj.generation,
        size: obj.size,
        crc32c: obj.crc32c,
    };
    let t = Instant::now();
    let small = client.get_range(version, 0, obj.size.min(SMALL_READ)).await;
    let first_byte = t.elapsed();
    let sample = match small {
        Ok(b) => {
            let bulk = if obj.size > SMALL_READ {
                let t = Instant::now();
                let end = obj.size.min(BULK_READ);
                client
                    .get_range(version, 0, end)
                    .await
                    .ok()
                    .map(|b| (b.len() as u64, t.elapsed()))
            } else {
                None
            };
            Ok(ReadSample {
                object: obj.name.clone(),
                bytes: b.len() as u64,
                first_byte,
                bulk,
            })
        }
        Err(e) => Err(e),
    };
    let read = checks::read(
        &plan.gcs,
        Some(match &sample {
            Ok(s) => Ok(s.clone()),
            Err(e) => Err((obj.name.clone(), e)),
        }),
    );
    vec![
        permissions,
        access,
        read,
        checks::speed(sample.as_ref().ok()),
    ]
}

/// Resolves the endpoint's host and opens one TCP connection to it (5 s at most).
async fn connect(endpoint: &str) -> Result<std::net::SocketAddr, String> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| e.to_string())?;
    let host = url
        .host_str()
        .ok_or("the endpoint names no host")?
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let attempt = tokio::net::TcpStream::connect((host.as_str(), port));
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(s)) => s.peer_addr().map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer from {host}:{port} within 5 s")),
    }
}

/// The kernel's release and, if readable, its config (`/proc/config.gz`, else
/// `/boot/config-RELEASE`).
fn passthrough(uid: u32) -> Check {
    use std::io::Read;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_default();
    let config = std::fs::File::open("/proc/config.gz")
        .ok()
        .and_then(|f| {
            let mut text = String::new();
            flate2::read::GzDecoder::new(f)
                .read_to_string(&mut text)
                .ok()
                .map(|_| text)
        })
        .or_else(|| std::fs::read_to_string(format!("/boot/config-{release}")).ok());
    checks::passthrough(uid, &release, config.as_deref())
}
