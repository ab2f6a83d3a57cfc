//! `physiofs doctor` against `physiofs testbed` (a requester-pays bucket, as PhysioNet's
//! are): a good setup passes every check and exits 0; each bad one gets its ✗ line, its fix
//! and exit 1. The billing project is found from the environment and gcloud's configuration
//! and reaches the listing and the reads (the testbed refuses any request without it).

mod common;

use common::*;

const BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";

fn testbed() -> TestbedProc {
    TestbedProc::start(&[
        "--addr",
        "127.0.0.1:0",
        "--patients",
        "2",
        "--size-scale",
        "0.01",
        "--requester-pays",
    ])
}

#[test]
fn a_good_setup_passes_every_check() {
    let tb = testbed();
    let home = tempfile::tempdir().unwrap();
    let (code, out, err) = physiofs_isolated(
        home.path(),
        &[
            "doctor",
            "--endpoint",
            &tb.endpoint,
            "--anonymous",
            "--billing-project",
            "test-project",
            "--bucket",
            BUCKET,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains('✗'), "{out}");
    for name in [
        "fuse device",
        "bucket",
        "endpoint",
        "credentials",
        "billing project",
        "connection",
        "access",
        "read",
        "speed",
    ] {
        assert!(doctor_line(&out, name).starts_with('✓'), "{name}: {out}");
    }
    assert_eq!(
        doctor_line(&out, "credentials"),
        "✓ credentials: anonymous (--anonymous)"
    );
    assert_eq!(
        doctor_line(&out, "billing project"),
        "✓ billing project: test-project (--billing-project)"
    );
    assert!(doctor_line(&out, "access").contains("can list gs://mimic-cxr-2.0.0.physionet.org/"));
    assert!(
        doctor_line(&out, "speed").contains("first byte in"),
        "{out}"
    );
    // Every line is a check (✓, ✗ or -), then the verdict.
    let last = out.lines().last().unwrap();
    assert!(last.contains("everything a mount of gs://mimic-cxr-2.0.0.physionet.org/ needs"));
    assert!(
        out.lines()
            .filter(|l| *l != last)
            .all(|l| l.starts_with("✓ ") || l.starts_with("- ")),
        "{out}"
    );
    // The listing and both reads carried the billing project (the testbed refuses any
    // request without it, so they would have failed otherwise).
    let stats = tb.stats();
    assert_eq!(stats["requests"]["list"], 1, "{stats}");
    assert!(
        stats["requests"]["get_media"].as_u64() >= Some(1),
        "{stats}"
    );
    assert!(stats["responses"].get("400").is_none(), "{stats}");
}

#[test]
fn no_billing_project_on_a_requester_pays_bucket_fails_with_the_fix() {
    let tb = testbed();
    let home = tempfile::tempdir().unwrap();
    let args = [
        "doctor",
        "--endpoint",
        &tb.endpoint,
        "--anonymous",
        "--bucket",
        BUCKET,
    ];
    let (code, out, err) = physiofs_isolated(home.path(), &args, &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    let billing = doctor_line(&out, "billing project");
    assert!(
        billing.starts_with("✗ billing project: none found"),
        "{out}"
    );
    assert!(out.contains("fix: the bucket is requester-pays and no billing project was found: pass --billing-project"), "{out}");
    // The testbed said so too: the listing was refused (400 without userProject).
    let access = doctor_line(&out, "access");
    assert!(
        access.starts_with("✗ access:") && access.contains("HTTP 400"),
        "{out}"
    );
    assert!(err.contains("checks failed"), "{err}");

    // Found in the environment: from the variable, and said so.
    let (code, out, _) = physiofs_isolated(home.path(), &args, &[("GOOGLE_CLOUD_PROJECT", "gp")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        doctor_line(&out, "billing project"),
        "✓ billing project: gp (from GOOGLE_CLOUD_PROJECT)"
    );
    assert!(doctor_line(&out, "read").starts_with('✓'), "{out}");
    // PHYSIOFS_BILLING_PROJECT comes first.
    let (_, out, _) = physiofs_isolated(
        home.path(),
        &args,
        &[
            ("GOOGLE_CLOUD_PROJECT", "gp"),
            ("PHYSIOFS_BILLING_PROJECT", "pp"),
        ],
    );
    assert_eq!(
        doctor_line(&out, "billing project"),
        "✓ billing project: pp (from PHYSIOFS_BILLING_PROJECT)"
    );

    // From the active gcloud configuration, in CLOUDSDK_CONFIG.
    let gcloud = home.path().join("gcloud-config");
    std::fs::create_dir_all(gcloud.join("configurations")).unwrap();
    std::fs::write(gcloud.join("active_config"), "work").unwrap();
    let conf = gcloud.join("configurations/config_work");
    std::fs::write(
        &conf,
        "[core]\naccount = me@example.org\nproject = from-gcloud\n",
    )
    .unwrap();
    let (code, out, _) = physiofs_isolated(
        home.path(),
        &args,
        &[("CLOUDSDK_CONFIG", gcloud.to_str().unwrap())],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        doctor_line(&out, "billing project"),
        format!(
            "✓ billing project: from-gcloud (core/project of gcloud configuration {})",
            conf.display()
        )
    );
}

#[test]
fn a_missing_bucket_names_the_known_ones() {
    let tb = testbed();
    let home = tempfile::tempdir().unwrap();
    let (code, out, _) = physiofs_isolated(
        home.path(),
        &[
            "doctor",
            "--endpoint",
            &tb.endpoint,
            "--anonymous",
            "--billing-project",
            "p",
            "--bucket",
            "mimic-cxr-9.9.9.physionet.org",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    let access = doctor_line(&out, "access");
    assert!(
        access.starts_with("✗ access:") && access.contains("HTTP 404"),
        "{out}"
    );
    assert!(
        out.contains("does not exist at")
            && out.contains("mimic-cxr-jpg-2.1.0.physionet.org (MIMIC-CXR-JPG)"),
        "{out}"
    );
    assert!(doctor_line(&out, "read").starts_with("- read:"), "{out}");
}

#[test]
fn an_unreachable_endpoint_fails_the_connection_check() {
    // A port nobody listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let (code, out, _) = physiofs_isolated(
        home.path(),
        &[
            "doctor",
            "--endpoint",
            &endpoint,
            "--anonymous",
            "--bucket",
            "b",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    let c = doctor_line(&out, "connection");
    assert!(
        c.starts_with(&format!("✗ connection: cannot connect to {endpoint}")),
        "{out}"
    );
    assert!(out.contains("is the endpoint"), "{out}");
    assert!(
        doctor_line(&out, "access").starts_with("- access:"),
        "{out}"
    );
}

#[test]
fn mount_says_which_billing_project_and_from_where() {
    let tb = testbed();
    let home = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    // A bucket that does not exist: mount prints its identity lines, then stops at the
    // access check with nothing mounted.
    let (code, _, err) = physiofs_isolated(
        home.path(),
        &[
            "mount",
            "--endpoint",
            &tb.endpoint,
            "--anonymous",
            "--bucket",
            "no-such-bucket",
            mnt.path().to_str().unwrap(),
        ],
        &[("CLOUDSDK_CORE_PROJECT", "cp")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("physiofs: credentials: anonymous (--anonymous)"),
        "{err}"
    );
    assert!(
        err.contains("physiofs: billing project: cp (from CLOUDSDK_CORE_PROJECT)"),
        "{err}"
    );
    assert!(err.contains("does not exist"), "{err}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(mnt.path().to_str().unwrap()), "{mounts}");
}
