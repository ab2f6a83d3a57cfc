//! `physiofs demo`: the whole product on one machine, with nothing to set up.
//!
//! It starts the testbed in-process, serving a small MIMIC-CXR-shaped DICOM model as a
//! requester-pays bucket, and mounts it through the ordinary client path (HTTP, billing
//! project, listing, ranged reads): what a user sees is what the real mount does.

use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::{DemoArgs, MountArgs, SourceArgs};
use crate::model::{DatasetModel, ModelConfig, ModelKind};
use crate::mount::Mounted;
use crate::plan::{Env, MountPlan};
use crate::testbed::{self, ModelSource, TestbedOptions};

/// The mount the demo makes: `physiofs mount` with its defaults, with the demo's cache size,
/// on the in-process testbed at `endpoint` serving `bucket` (requester-pays, anonymous).
pub fn mount_args(
    args: &DemoArgs,
    mountpoint: PathBuf,
    endpoint: String,
    bucket: String,
) -> MountArgs {
    let defaults = MountArgs::defaults(mountpoint);
    MountArgs {
        source: SourceArgs {
            bucket,
            endpoint: Some(endpoint),
            billing_project: Some("physiofs-demo".into()),
            anonymous: true,
            ..defaults.source.clone()
        },
        cache_size: args.cache_size,
        // The demo's server lives only as long as the demo: nothing worth persisting.
        metadata_cache: Some("off".into()),
        verbose: args.verbose,
        ..defaults
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let model = DatasetModel::shared(ModelConfig {
        kind: args.model,
        patients: args.patients.clamp(1, 10_000),
        seed: 0,
        size_scale: args.size_scale.clamp(1e-6, 4.0),
    });
    let bucket = model.bucket().to_string();
    let (images, studies, objects) = (
        model.image_count(),
        model.study_count(),
        model.object_count(),
    );
    let server = testbed::start(
        TestbedOptions {
            requester_pays: true,
            ..Default::default()
        },
        Arc::new(ModelSource::new(vec![model])),
    )
    .await?;

    let (mountpoint, _tmp) = match &args.mountpoint {
        Some(p) => {
            std::fs::create_dir_all(p)?;
            (p.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("physiofs-demo-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mount = mount_args(&args, mountpoint, server.endpoint(), bucket.clone());
    let started = async {
        let plan = MountPlan::resolve(&mount, &Env::capture())?;
        let tokens = crate::mount::prepare(&plan).await?;
        Mounted::start(plan, tokens).await
    };
    let mounted = match started.await {
        Ok(m) => m,
        Err(e) => {
            server.shutdown().await;
            return Err(e);
        }
    };
    let m = mounted.mountpoint.display().to_string();
    let ext = if args.model == ModelKind::Dicom {
        "dcm"
    } else {
        "jpg"
    };
    println!(
        "physiofs demo: a MIMIC-CXR-shaped bucket gs://{bucket} ({} patients, {studies} studies, \
         {images} images, {objects} objects) served by the built-in GCS testbed at {} and mounted read-only at {m}\n\
         \n\
         Try, in another terminal:\n\
         \x20 ls {m}\n\
         \x20 find {m}/files -name '*.{ext}' | head\n\
         \x20 zcat {m}/cxr-record-list.csv.gz | head -3\n\
         \x20 python3 -c \"import pydicom, glob; f = sorted(glob.glob('{m}/files/p1*/p*/s*/*.dcm'))[0]; d = pydicom.dcmread(f); print(f, d.PatientID, d.ViewPosition, d.pixel_array.shape)\"\n\
         \x20 python3 examples/read_dicom.py {m}\n\
         \n\
         Press Ctrl-C to unmount and exit.",
        args.patients,
        server.endpoint()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let result = if args.exit_after_ready {
        mounted.unmount().await
    } else {
        mounted.serve_until_signal(false).await
    };
    server.shutdown().await;
    println!("physiofs demo: unmounted {m}");
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str]) -> Command {
        Cli::try_parse_from(argv).unwrap().command
    }

    /// The demo resolves its mount like `physiofs mount` does: `--cache-size` is split the same
    /// way (a hand-made plan once left read-ahead at its 64 MiB default, so a 64 MiB demo got a
    /// 1 MiB block cache), and every other setting is mount's default.
    #[test]
    fn demo_cache_size_splits_like_mount() {
        let env = Env::default();
        let Command::Demo(demo) = parse(&["physiofs", "demo", "--cache-size", "64MiB"]) else {
            panic!("not the demo")
        };
        let args = mount_args(&demo, "/m".into(), "http://127.0.0.1:1".into(), "b".into());
        let demo = MountPlan::resolve(&args, &env).unwrap();
        let Command::Mount(mount) = parse(&["physiofs", "mount", "--cache-size", "64MiB", "/m"])
        else {
            panic!("not a mount")
        };
        let mount = MountPlan::resolve(&mount, &env).unwrap();
        assert_eq!(
            (demo.block_cache, demo.fs.prefetch_budget),
            (48 << 20, 16 << 20)
        );
        assert_eq!(
            (demo.block_cache, demo.fs.prefetch_budget),
            (mount.block_cache, mount.fs.prefetch_budget)
        );
        assert_eq!(format!("{:?}", demo.fs), format!("{:?}", mount.fs));
        assert_eq!(
            format!("{:?}", demo.gcs.retry),
            format!("{:?}", mount.gcs.retry)
        );
        assert_eq!(demo.gcs.stall_timeout, mount.gcs.stall_timeout);
        // What the demo changes: its own server, anonymous, requester-pays, no snapshot.
        assert_eq!(demo.gcs.endpoint, "http://127.0.0.1:1");
        assert_eq!(demo.credentials.to_string(), "anonymous (--anonymous)");
        assert_eq!(demo.gcs.billing_project.as_deref(), Some("physiofs-demo"));
        assert_eq!(demo.snapshot_dir, None);
    }
}
