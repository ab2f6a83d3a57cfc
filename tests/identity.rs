//! Whose credentials a mount uses, shown and checked, against `physiofs testbed` playing
//! Google: its OAuth token endpoint, token info, a GCE metadata server (GCE_METADATA_HOST)
//! and testIamPermissions with per-bucket grants (`--deny-list`, `--deny-get`). Each kind of
//! credentials shows its source and account; a missing permission is named, with the account,
//! the bucket and the fix, by `doctor` and by `mount` (which exits 1 and leaves no mount); a
//! token that expires during a long read is replaced without the reader seeing an error.
//! Nothing here contacts Google.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::*;

const BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";
const USER: &str = "physionet-user@example.org";
const VM: &str = "vm-sa@testbed-vm-project.iam.gserviceaccount.com";

/// A requester-pays testbed that accepts only the tokens it grants (`tbtok-…`), plus `extra`.
fn testbed(extra: &[&str]) -> TestbedProc {
    let mut args = vec![
        "--addr",
        "127.0.0.1:0",
        "--patients",
        "2",
        "--size-scale",
        "0.01",
        "--requester-pays",
        "--require-token",
        "tbtok-*",
    ];
    args.extend_from_slice(extra);
    TestbedProc::start(&args)
}

/// What `gcloud auth application-default login` writes, in a CLOUDSDK_CONFIG directory, with
/// the testbed as its token_uri: returns the directory and the file.
fn gcloud_user(home: &Path, endpoint: &str) -> (PathBuf, PathBuf) {
    let dir = home.join("gcloud");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("application_default_credentials.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "type": "authorized_user",
            "client_id": "cid.apps.googleusercontent.com",
            "client_secret": "secret",
            "refresh_token": "1//refresh",
            "token_uri": format!("{endpoint}/token"),
        })
        .to_string(),
    )
    .unwrap();
    (dir, file)
}

fn doctor_args<'a>(endpoint: &'a str, bucket: &'a str) -> Vec<&'a str> {
    vec![
        "doctor",
        "--endpoint",
        endpoint,
        "--allow-insecure-endpoint",
        "--billing-project",
        "p",
        "--bucket",
        bucket,
    ]
}

#[test]
fn a_gcloud_user_is_named_by_token_info_and_holds_both_permissions() {
    let tb = testbed(&[]);
    let home = tempfile::tempdir().unwrap();
    let (dir, file) = gcloud_user(home.path(), &tb.endpoint);
    let env = [("CLOUDSDK_CONFIG", dir.to_str().unwrap())];
    let (code, out, err) = physiofs_isolated(home.path(), &doctor_args(&tb.endpoint, BUCKET), &env);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        doctor_line(&out, "credentials"),
        format!(
            "✓ credentials: gcloud application-default user credentials {} ({USER})",
            file.display()
        )
    );
    assert_eq!(
        doctor_line(&out, "permissions"),
        format!(
            "✓ permissions: {USER} may list and read gs://{BUCKET} (storage.objects.list, \
             storage.objects.get)"
        )
    );
    assert!(
        !out.contains("tbtok-") && !err.contains("tbtok-"),
        "a token was printed"
    );
}

#[test]
fn can_list_but_not_read_and_cannot_list_get_their_own_messages() {
    let tb = testbed(&["--deny-get", BUCKET]);
    // The testbed serves one bucket: another one plays the bucket that grants nothing.
    let unlisted = testbed(&["--deny-list", BUCKET]);
    let home = tempfile::tempdir().unwrap();
    let (dir, _) = gcloud_user(home.path(), &tb.endpoint);
    let env = [("CLOUDSDK_CONFIG", dir.to_str().unwrap())];

    let (code, out, _) = physiofs_isolated(home.path(), &doctor_args(&tb.endpoint, BUCKET), &env);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        doctor_line(&out, "permissions"),
        format!(
            "✗ permissions: {USER} can list gs://{BUCKET} but not read its objects: it lacks \
             storage.objects.get"
        )
    );
    assert!(out.contains("wait ten minutes, then mount again"), "{out}");
    // The probe agrees: listing works, the read is refused.
    assert!(doctor_line(&out, "access").starts_with('✓'), "{out}");
    assert!(doctor_line(&out, "read").starts_with("✗ read:"), "{out}");

    let (dir2, _) = gcloud_user(&home.path().join("second"), &unlisted.endpoint);
    let env2 = [("CLOUDSDK_CONFIG", dir2.to_str().unwrap())];
    let (code, out, _) =
        physiofs_isolated(home.path(), &doctor_args(&unlisted.endpoint, BUCKET), &env2);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        doctor_line(&out, "permissions"),
        format!("✗ permissions: {USER} cannot list gs://{BUCKET}: it lacks storage.objects.list")
    );
    assert!(
        out.contains("open the MIMIC-CXR page and click \"Request access using Google Cloud\"")
            && out.contains(&format!("with the Google account {USER}")),
        "{out}"
    );

    // mount says the same, exits 1, and leaves nothing mounted.
    let mnt = tempfile::tempdir().unwrap();
    let mp = mnt.path().to_str().unwrap();
    let (code, _, err) = physiofs_isolated(
        home.path(),
        &[
            "mount",
            "--endpoint",
            &tb.endpoint,
            "--allow-insecure-endpoint",
            "--billing-project",
            "p",
            "--bucket",
            BUCKET,
            mp,
        ],
        &env,
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("physiofs: credentials: gcloud application-default user credentials")
            && err.contains(&format!("({USER})")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{USER} can list gs://{BUCKET} but not read its objects"
        )) && err.contains("hint: PhysioNet grants both together"),
        "{err}"
    );
    assert_not_mounted(mnt.path(), "a mount refused for a missing permission");
    let (code, _, err) = physiofs_isolated(
        home.path(),
        &[
            "mount",
            "--endpoint",
            &unlisted.endpoint,
            "--allow-insecure-endpoint",
            "--billing-project",
            "p",
            "--bucket",
            BUCKET,
            mp,
        ],
        &env2,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot list gs://"), "{err}");
    assert_not_mounted(mnt.path(), "a mount refused for a missing permission");
}

#[test]
fn the_vm_account_and_project_come_from_the_metadata_server() {
    let tb = testbed(&[]);
    let home = tempfile::tempdir().unwrap();
    let host = tb.endpoint.trim_start_matches("http://").to_string();
    let env = [("GCE_METADATA_HOST", host.as_str())];
    let args = [
        "doctor",
        "--endpoint",
        &tb.endpoint,
        "--allow-insecure-endpoint",
        "--bucket",
        BUCKET,
    ];
    let (code, out, err) = physiofs_isolated(home.path(), &args, &env);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        doctor_line(&out, "credentials"),
        format!("✓ credentials: the VM's service account (GCE metadata server) ({VM})")
    );
    // The last billing source, and it reached every request (requester-pays testbed).
    assert_eq!(
        doctor_line(&out, "billing project"),
        "✓ billing project: testbed-vm-project (the VM's project, from its metadata server)"
    );
    assert!(doctor_line(&out, "read").starts_with('✓'), "{out}");
    // Any other source wins over it.
    let (_, out, _) = physiofs_isolated(
        home.path(),
        &args,
        &[env[0], ("GOOGLE_CLOUD_PROJECT", "gp")],
    );
    assert_eq!(
        doctor_line(&out, "billing project"),
        "✓ billing project: gp (from GOOGLE_CLOUD_PROJECT)"
    );
    // The VM's account without access: the fix is to use one's own.
    let tb = testbed(&["--deny-list", BUCKET]);
    let host = tb.endpoint.trim_start_matches("http://").to_string();
    let args = [
        "doctor",
        "--endpoint",
        &tb.endpoint,
        "--allow-insecure-endpoint",
        "--bucket",
        BUCKET,
    ];
    let (code, out, _) = physiofs_isolated(home.path(), &args, &[("GCE_METADATA_HOST", &host)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        doctor_line(&out, "permissions").starts_with(&format!("✗ permissions: {VM} cannot list")),
        "{out}"
    );
    assert!(out.contains("use your own account instead"), "{out}");
}

/// A token minted by the testbed's /token (a refresh-token grant), for direct requests.
fn mint(endpoint: &str) -> String {
    let r = http_post(
        &format!("{endpoint}/token"),
        "grant_type=refresh_token&client_id=c&client_secret=s&refresh_token=r",
    );
    r.json()["access_token"].as_str().unwrap().to_string()
}

#[test]
fn a_token_file_and_the_token_variable() {
    let tb = TestbedProc::start(&[
        "--addr",
        "127.0.0.1:0",
        "--patients",
        "1",
        "--size-scale",
        "0.01",
        "--require-token",
        "ya29.file-*",
    ]);
    let home = tempfile::tempdir().unwrap();
    let token = home.path().join("token");
    let args = |t: &str| {
        vec![
            "doctor".to_string(),
            "--endpoint".into(),
            tb.endpoint.clone(),
            "--allow-insecure-endpoint".into(),
            "--bucket".into(),
            BUCKET.into(),
            "--billing-project".into(),
            "p".into(),
            "--token-file".into(),
            t.to_string(),
        ]
    };
    let a = args(token.to_str().unwrap());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    // Missing, then empty: the credentials check names the file and the fix.
    let (code, out, _) = physiofs_isolated(home.path(), &a, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        doctor_line(&out, "credentials").starts_with(&format!(
            "✗ credentials: credentials: cannot read the token file {}",
            token.display()
        )),
        "{out}"
    );
    assert!(out.contains("print-access-token > FILE"), "{out}");
    std::fs::write(&token, "\n").unwrap();
    let (code, out, _) = physiofs_isolated(home.path(), &a, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        doctor_line(&out, "credentials").contains("is empty"),
        "{out}"
    );

    std::fs::write(&token, "ya29.file-1\n").unwrap();
    let (code, out, _) = physiofs_isolated(home.path(), &a, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        doctor_line(&out, "credentials"),
        format!("✓ credentials: access-token file {}", token.display())
    );
    assert!(!out.contains("ya29"), "{out}");

    // GOOGLE_OAUTH_ACCESS_TOKEN: shown by name only.
    let a = &a[..a.len() - 2];
    let (code, out, err) = physiofs_isolated(
        home.path(),
        a,
        &[("GOOGLE_OAUTH_ACCESS_TOKEN", "ya29.file-from-variable")],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        doctor_line(&out, "credentials"),
        "✓ credentials: access token from GOOGLE_OAUTH_ACCESS_TOKEN"
    );
    assert!(!out.contains("ya29") && !err.contains("ya29"), "{out}{err}");

    // A mount through a token file: the identity line, and reads that work.
    let mnt = Mount::start_with(
        &[
            "--endpoint".into(),
            tb.endpoint.clone().into(),
            "--allow-insecure-endpoint".into(),
            "--bucket".into(),
            BUCKET.into(),
            "--token-file".into(),
            token.clone().into(),
        ],
        &[],
    );
    let listing = std::fs::read_dir(mnt.join("")).unwrap().count();
    assert!(listing > 0);
    assert!(
        mnt.stderr_tail().contains(&format!(
            "credentials: access-token file {}",
            token.display()
        )),
        "{}",
        mnt.stderr_tail()
    );
}

/// Once mounted, the testbed accepts each token for 200 ms after its first use. A reader
/// reads the start of a large file, pauses past that (so the token the mount holds has
/// expired, as an hour-long token does under a long job), then reads the rest: the requests
/// for the rest meet the expired token (the testbed counts the 401s it sent), each is
/// refreshed and asked again, and the reader gets every byte with no error, nothing logged as
/// refused.
#[test]
fn a_token_that_expires_during_a_long_read_is_survived() {
    let tb = TestbedProc::start(&[
        "--addr",
        "127.0.0.1:0",
        "--patients",
        "1",
        "--require-token",
        "tbtok-*",
    ]);
    let home = tempfile::tempdir().unwrap();
    let (dir, _) = gcloud_user(home.path(), &tb.endpoint);
    // The largest object, and its bytes, fetched directly with a token of its own.
    let tok = mint(&tb.endpoint);
    let auth = format!("Bearer {tok}");
    let list = http_get(
        &format!("{}/storage/v1/b/{BUCKET}/o", tb.endpoint),
        &[("authorization", &auth)],
    )
    .json();
    let big = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|o| o["size"].as_str().unwrap().parse::<u64>().unwrap())
        .unwrap()
        .clone();
    let name = big["name"].as_str().unwrap().to_string();
    let size: u64 = big["size"].as_str().unwrap().parse().unwrap();
    assert!(
        size > 3_000_000,
        "{name} is {size} bytes: too small to outlast the TTL"
    );

    let mnt = Mount::start_with(
        &[
            "--endpoint".into(),
            tb.endpoint.clone().into(),
            "--allow-insecure-endpoint".into(),
            "--bucket".into(),
            BUCKET.into(),
            "--billing-project".into(),
            "p".into(),
        ],
        &[("CLOUDSDK_CONFIG", dir.to_str().unwrap())],
    );
    let set = http_post(
        &format!("{}/_testbed/faults", tb.endpoint),
        r#"{"token_ttl":"200ms"}"#,
    );
    assert_eq!(set.status, 200, "{}", set.text());
    let before = tb.stats()["responses"]["401"].as_u64().unwrap_or(0);
    let mut got = vec![0u8; 4096];
    let mut f = std::fs::File::open(mnt.join(&name)).unwrap();
    f.read_exact(&mut got).unwrap();
    // Not a measurement: a pause longer than the token's life, so it expires mid-read.
    std::thread::sleep(std::time::Duration::from_millis(400));
    f.read_to_end(&mut got)
        .expect("the read survives expired tokens");
    let after = tb.stats()["responses"]["401"].as_u64().unwrap_or(0);
    assert_eq!(got.len() as u64, size);
    // A fresh token for the direct fetch (its first use is in time).
    let tok = mint(&tb.endpoint);
    let want = http_get(
        &format!(
            "{}/storage/v1/b/{BUCKET}/o/{}?alt=media",
            tb.endpoint,
            enc(&name)
        ),
        &[("authorization", &format!("Bearer {tok}"))],
    );
    assert_eq!(want.status, 200);
    assert!(sha256_hex(&got) == sha256_hex(&want.body), "bytes differ");
    assert!(
        after > before,
        "no token expired during the read ({before} → {after} 401s): {}",
        tb.stats()
    );
    assert!(
        !mnt.stderr_tail().contains("refused"),
        "a refresh was logged as a refusal: {}",
        mnt.stderr_tail()
    );
}

/// A small testbed that accepts only tokens matching `require`, and an eager mount that reads
/// its token from a file (returned, in a temp dir kept alive by the tuple) holding `first`.
fn token_file_mount(
    require: &str,
    first: &str,
) -> (TestbedProc, tempfile::TempDir, PathBuf, Mount) {
    let tb = TestbedProc::start(&[
        "--addr",
        "127.0.0.1:0",
        "--patients",
        "1",
        "--size-scale",
        "0.01",
        "--require-token",
        require,
    ]);
    let home = tempfile::tempdir().unwrap();
    let token = home.path().join("token");
    std::fs::write(&token, format!("{first}\n")).unwrap();
    let mnt = Mount::start_with(
        &[
            "--endpoint".into(),
            tb.endpoint.clone().into(),
            "--allow-insecure-endpoint".into(),
            "--bucket".into(),
            BUCKET.into(),
            "--token-file".into(),
            token.clone().into(),
            "--metadata".into(),
            "eager".into(),
        ],
        &[],
    );
    (tb, home, token, mnt)
}

/// A token that stays refused (a token file nobody renews, past its life): each request is
/// asked once more after reading the file again, then the reader gets EACCES, and the log
/// says why once, however many reads fail.
#[test]
fn a_token_still_refused_after_a_refresh_is_eacces_logged_once() {
    let (tb, _home, _token, mnt) = token_file_mount("ya29.stale", "ya29.stale");
    let files: Vec<PathBuf> = walk(&mnt.join(""))
        .into_iter()
        .filter(|(_, k)| matches!(k, Kind::File))
        .map(|(p, _)| mnt.join(p))
        .take(3)
        .collect();
    assert_eq!(files.len(), 3);
    // Listed; from now on the token is accepted once more at most.
    let set = http_post(
        &format!("{}/_testbed/faults", tb.endpoint),
        r#"{"token_ttl":"1ns","forget_tokens":true}"#,
    );
    assert_eq!(set.status, 200, "{}", set.text());
    let mut refused = 0;
    for f in &files {
        match std::fs::read(f) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => refused += 1,
            Ok(_) => {}
            other => panic!("{}: {other:?}", f.display()),
        }
    }
    // The first read may use up the token's one accepted use; all later ones are refused.
    assert!(refused >= 2, "{refused} of 3 reads refused");
    let log = mnt.stderr_tail();
    assert_eq!(
        log.matches("the server refused access-token file").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("HTTP 401") && log.contains("even with a fresh token"),
        "{log}"
    );
    assert!(tb.stats()["responses"]["401"].as_u64() >= Some(4));
}

/// A token file whose token is rotated under a running mount, the old token revoked at the
/// same moment (the testbed answers it 401 Invalid Credentials, as GCS answers a revoked
/// token). The file is rewritten in place with its size and modification time kept, so
/// nothing but the 401 can tell physiofs to read it again: the read that meets the 401 reads
/// the file again, is asked once more with the new token, and gets every byte; nothing is
/// logged as refused.
#[test]
fn a_rotated_token_file_is_read_again_after_a_401() {
    use std::io::{Seek, Write};
    let (tb, _home, token, mnt) = token_file_mount("ya29.rot-*", "ya29.rot-1");
    let files: Vec<String> = walk(&mnt.join(""))
        .into_iter()
        .filter(|(_, k)| matches!(k, Kind::File))
        .map(|(p, _)| p)
        .take(2)
        .collect();
    assert_eq!(files.len(), 2);
    let direct = |name: &str| {
        let r = http_get(
            &format!(
                "{}/storage/v1/b/{BUCKET}/o/{}?alt=media",
                tb.endpoint,
                enc(name)
            ),
            &[("authorization", "Bearer ya29.rot-direct")],
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        r.body
    };
    let got = std::fs::read(mnt.join(&files[0])).unwrap();
    assert!(got == direct(&files[0]), "{}: bytes differ", files[0]);

    // Rotate: same inode, same size, the old modification time put back.
    let before = std::fs::metadata(&token).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&token)
        .unwrap();
    f.write_all(b"ya29.rot-2\n").unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    f.rewind().unwrap();
    drop(f);
    let after = std::fs::metadata(&token).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (after.modified().unwrap(), after.len(), after.ino()),
        (before.modified().unwrap(), before.len(), before.ino()),
        "the rewrite must not show in the file's stamp"
    );
    let set = http_post(
        &format!("{}/_testbed/faults", tb.endpoint),
        r#"{"revoke_tokens":["ya29.rot-1"]}"#,
    );
    assert_eq!(set.status, 200, "{}", set.text());
    let refused_before = tb.stats()["responses"]["401"].as_u64().unwrap_or(0);

    let got = std::fs::read(mnt.join(&files[1])).expect("the read survives the rotation");
    assert!(got == direct(&files[1]), "{}: bytes differ", files[1]);
    let refused_after = tb.stats()["responses"]["401"].as_u64().unwrap_or(0);
    assert!(
        refused_after > refused_before,
        "the old token was never refused ({refused_before} → {refused_after} 401s): {}",
        tb.stats()
    );
    let log = mnt.stderr_tail();
    assert!(
        !log.contains("refused"),
        "a refresh was logged as a refusal: {log}"
    );
}
