//! The path real GCS takes: HTTPS, with HTTP/1.1 or HTTP/2 chosen by ALPN. `physiofs testbed
//! --tls` (a separate process, with a certificate made at start) is mounted through the kernel
//! with `--ca-file`; `sha256sum -c` over the JPG model proves every byte, and the testbed's
//! protocol counters prove which HTTP version carried them. Without the certificate the mount
//! must fail at start, saying the certificate is not trusted and naming `--ca-file`; resets,
//! truncations and stalls over TLS must be survived as over plain HTTP.

mod common;

use std::time::Duration;

use common::*;
use physiofs::model::{DatasetModel, JPG_BUCKET, ModelConfig, ModelKind};

const PATIENTS: u32 = 6;
const SIZE_SCALE: f64 = 0.2;

fn jpg_testbed(extra: &[&str]) -> TlsTestbed {
    let patients = PATIENTS.to_string();
    let scale = SIZE_SCALE.to_string();
    let mut args = vec![
        "--model",
        "jpg",
        "--patients",
        &patients,
        "--size-scale",
        &scale,
        "--addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    TlsTestbed::start(&args)
}

/// Every object but SHA256SUMS.txt itself, as `sha256sum -c` on the mount counts them.
fn want_sums() -> usize {
    let model = DatasetModel::new(ModelConfig {
        kind: ModelKind::Jpg,
        patients: PATIENTS,
        seed: 0,
        size_scale: SIZE_SCALE,
    });
    model.object_count() as usize - 1
}

fn counter(stats: &serde_json::Value, group: &str, name: &str) -> u64 {
    stats[group][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {group}.{name} in testbed stats: {stats}"))
}

/// Mounts over TLS with `--http-protocol protocol`, checks every file, and returns the
/// testbed's (http1, http2) request counts.
fn read_all(tb: &TlsTestbed, extra: &[&str]) -> (u64, u64) {
    let mount = Mount::start_with(&tb.mount_args(JPG_BUCKET, extra), &[]);
    let ok = sha256sum_check(&mount.path);
    assert_eq!(
        ok,
        want_sums(),
        "sha256sum -c OK lines over TLS ({extra:?})"
    );
    mount.unmount();
    let s = tb.stats();
    (
        counter(&s, "protocols", "http1"),
        counter(&s, "protocols", "http2"),
    )
}

#[test]
fn http1_over_tls_reads_the_model_exactly() {
    let tb = jpg_testbed(&[]);
    let (h1, h2) = read_all(&tb, &["--http-protocol", "http1"]);
    assert!(h1 > 0, "no request was served over http/1.1");
    assert_eq!(h2, 0, "--http-protocol http1 must never speak h2");
}

#[test]
fn http2_over_tls_reads_the_model_exactly() {
    let tb = jpg_testbed(&[]);
    let (h1, h2) = read_all(&tb, &["--http-protocol", "http2"]);
    assert!(h2 > 0, "no request was served over h2");
    assert_eq!(h1, 0, "ALPN offered h2, yet http/1.1 requests were served");
}

#[test]
fn http2_falls_back_to_http1_when_the_server_refuses_it() {
    let tb = jpg_testbed(&["--http2", "off"]);
    let (h1, h2) = read_all(&tb, &["--http-protocol", "http2"]);
    assert!(h1 > 0, "no request was served over http/1.1");
    assert_eq!(h2, 0, "the testbed offered only http/1.1");
}

#[test]
fn mount_without_the_ca_fails_at_start_naming_the_certificate_and_ca_file() {
    let tb = jpg_testbed(&[]);
    let (_dir, mnt) = mountpoint_dir();
    let (_status, stderr) = expect_mount_failure(
        &tb.testbed.mount_args(JPG_BUCKET, &[]),
        &mnt,
        Duration::from_secs(60),
    );
    assert!(
        stderr.contains("certificate is not trusted"),
        "the error must say the certificate is not trusted:\n{stderr}"
    );
    assert!(
        stderr.contains("--ca-file"),
        "the error must name the --ca-file fix:\n{stderr}"
    );
    let s = tb.stats();
    assert!(
        counter(&s, "protocols", "tls_handshake_failed") > 0,
        "the testbed saw no refused handshake: {s}"
    );
    assert_eq!(
        counter(&s, "protocols", "http1") + counter(&s, "protocols", "http2"),
        0,
        "no request may be sent to an untrusted server"
    );
}

fn faults_survived(protocol: &str) {
    let tb = jpg_testbed(&["--seed", "7"]);
    tb.set_faults(
        r#"{"reset_rate":0.15,"truncate_rate":0.15,"stall_rate":0.1,"stall_duration":"3s"}"#,
    );
    read_all(&tb, &["--http-protocol", protocol, "--stall-timeout", "1s"]);
    let s = tb.stats();
    for f in ["reset", "truncate", "stall"] {
        assert!(
            counter(&s, "faults", f) > 0,
            "no {f} was injected over {protocol}, so the test proves nothing: {s}"
        );
    }
}

#[test]
fn faults_over_tls_http1_are_survived() {
    faults_survived("http1");
}

#[test]
fn faults_over_tls_http2_are_survived() {
    faults_survived("http2");
}
