//! The dataset model, served by `physiofs testbed` (a separate process, as in a benchmark) and
//! mounted with `physiofs mount` through the kernel, looks like the real buckets to real
//! clients: `find` shows exactly the model's objects, and `tests/py/check_mount.py` (pydicom on
//! every .dcm, PIL on every .jpg, pandas on every CSV, identities cross-checked against
//! cxr-record-list.csv.gz / the metadata CSV, `sha256sum -c SHA256SUMS.txt`) passes on the mount.

mod common;

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use common::*;
use physiofs::model::{DICOM_BUCKET, DatasetModel, JPG_BUCKET, ModelConfig, ModelKind};

const PATIENTS: u32 = 8;
const SIZE_SCALE: f64 = 0.01;

fn check(kind: ModelKind) {
    let t0 = Instant::now();
    let (kind_arg, bucket) = match kind {
        ModelKind::Dicom => ("dicom", DICOM_BUCKET),
        ModelKind::Jpg => ("jpg", JPG_BUCKET),
    };
    let patients = PATIENTS.to_string();
    let scale = SIZE_SCALE.to_string();
    let testbed = TestbedProc::start(&[
        "--model",
        kind_arg,
        "--patients",
        &patients,
        "--size-scale",
        &scale,
        "--addr",
        "127.0.0.1:0",
    ]);
    let mut mount = Mount::start_with(&testbed.mount_args(bucket, &[]), &[]);

    // The same model, built in the test from the library.
    let model = DatasetModel::new(ModelConfig {
        kind,
        patients: PATIENTS,
        seed: 0,
        size_scale: SIZE_SCALE,
    });
    assert_eq!(model.bucket(), bucket);
    let want_count = model.object_count();
    let objects = model.list_from("", usize::MAX);
    assert_eq!(
        objects.len() as u64,
        want_count,
        "list_from vs object_count"
    );

    // `find -type f` count, then the whole tree (files and implied directories).
    let tree = find_tree(&mount.path);
    let files = tree.values().filter(|k| **k == Kind::File).count();
    assert_eq!(
        files as u64, want_count,
        "find -type f on the {kind_arg} mount: {files} files, the model has {want_count} objects"
    );
    let want_tree = implied_tree(objects.iter().map(|o| o.name.as_str()), "");
    let diff = tree_diff(&tree, &want_tree);
    assert!(
        diff.is_empty(),
        "mount tree differs from the model:\n{diff}"
    );
    // Sizes as the model says.
    for o in objects.iter().step_by(7) {
        let md = std::fs::metadata(mount.join(&o.name)).unwrap();
        assert_eq!(md.len(), o.size, "size of {}", o.name);
    }

    // The Python check of a bucket directory, on the mount.
    let out = run_python_ok(
        &repo_root().join("tests/py/check_mount.py"),
        &[mount.path.as_os_str(), OsStr::new(kind_arg)],
        Duration::from_secs(300),
    );
    eprintln!("{out}");
    let images = model.image_count();
    let studies = model.study_count();
    let (want1, want2) = match kind {
        ModelKind::Dicom => (
            format!("dicom: checked {images} images, {studies} reports, 4 top-level files: OK"),
            format!("check_mount dicom: {images} index rows cross-checked against the files: OK"),
        ),
        ModelKind::Jpg => (
            format!("jpg: checked {images} images, 0 reports, 8 top-level files: OK"),
            // metadata + split: one row per image each
            format!(
                "check_mount jpg: {} index rows cross-checked against the files: OK",
                2 * images
            ),
        ),
    };
    assert!(
        out.contains(&want1) && out.contains(&want2),
        "check_mount.py output lacks {want1:?} / {want2:?}:\n{out}"
    );
    // SHA256SUMS.txt again, from here: the DICOM one covers the 3 other top-level files, the
    // JPG one (a model this small) every other object.
    let ok = sha256sum_check(&mount.path);
    let want_ok = match kind {
        ModelKind::Dicom => 3,
        ModelKind::Jpg => want_count as usize - 1,
    };
    assert_eq!(ok, want_ok, "sha256sum -c OK lines");

    // The JPG example, too.
    if kind == ModelKind::Jpg {
        let out = run_python_ok(
            &repo_root().join("examples/read_jpg.py"),
            &[mount.path.as_os_str(), OsStr::new("-n"), OsStr::new("10")],
            Duration::from_secs(120),
        );
        eprintln!("{out}");
        for want in [
            "found 10 JPG files via IMAGE_FILENAMES",
            &format!("metadata: {images} rows from mimic-cxr-2.0.0-metadata.csv.gz"),
            "decoded 10 images in",
            "modes: {'L': 10}",
            "size matches metadata Rows x Columns: 10/10",
        ] {
            assert!(
                out.contains(want),
                "read_jpg.py output lacks {want:?}:\n{out}"
            );
        }
    }

    mount.assert_alive();
    mount.unmount();
    drop(testbed);
    eprintln!(
        "{kind_arg}: {want_count} objects checked through the mount in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn dicom_model_mount_passes_the_python_checks() {
    check(ModelKind::Dicom);
}

#[test]
fn jpg_model_mount_passes_the_python_checks() {
    check(ModelKind::Jpg);
}
