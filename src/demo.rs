//! `physiofs demo`: the whole product on one machine, with nothing to set up.
//!
//! It starts the testbed in-process, serving a small MIMIC-CXR-shaped DICOM model as a
//! requester-pays bucket, and mounts it through the ordinary client path (HTTP, billing
//! project, listing, ranged reads): what a user sees is what the real mount does.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::client::auth::TokenSource;
use crate::client::gcs::{GcsConfig, RetryConfig};
use crate::fs::FsConfig;
use crate::model::{DatasetModel, ModelConfig, ModelKind};
use crate::mount::{MountPlan, Mounted};
use crate::testbed::{self, ModelSource, TestbedOptions};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where to mount (default: a new temporary directory, removed afterwards).
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
    #[arg(long, default_value = "256MiB", value_parser = crate::cli::parse_size)]
    pub cache_size: u64,
    /// Unmount and exit right after printing the instructions (for scripts and tests).
    #[arg(long, hide = true)]
    pub exit_after_ready: bool,
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
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
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let plan = MountPlan {
        mountpoint: mountpoint.clone(),
        gcs: GcsConfig {
            endpoint: server.endpoint(),
            bucket: bucket.clone(),
            billing_project: Some("physiofs-demo".into()),
            retry: RetryConfig::default(),
            pool_size: 64,
            stall_timeout: crate::cli::DEFAULT_STALL_TIMEOUT,
        },
        tokens: TokenSource::Anonymous,
        fs: FsConfig {
            uid,
            gid,
            ..FsConfig::default()
        },
        cache_size: args.cache_size,
        allow_other: false,
        metadata: crate::cli::MetadataMode::Auto,
        // The demo's server lives only as long as the demo: nothing worth persisting.
        snapshot_dir: None,
    };
    let mounted = match Mounted::start(plan).await {
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
