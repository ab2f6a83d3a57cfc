//! Faults and bad answers through a real kernel mount of the testbed: every byte read is the
//! object's exact byte or the read fails with an errno, and the mount keeps serving.
//!
//! Expected contents come from the server itself, fetched directly (no mount) before any
//! fault is switched on: SHA256SUMS.txt for the model files, a plain GET for the big
//! synthetic objects. Files are read by reader processes (`tests/py/read_files.py`) that
//! report each file's SHA-256 or the errno of the call that failed, and the test checks every
//! file, every call and every reader's exit status. That a fault happened, and how it was
//! survived, is counted: by the testbed (faults injected, requests delayed) and by physiofs
//! (`--metrics-addr`: retries, resumes, checksum mismatches).

mod common;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const JPG: &str = "mimic-cxr-jpg-2.1.0.physionet.org";

/// `(sha256, name)` of every model file, from SHA256SUMS.txt fetched directly.
fn model_sums(tb: &TestbedProc, bucket: &str) -> Vec<(String, String)> {
    let r = http_get(
        &format!(
            "{}/storage/v1/b/{bucket}/o/SHA256SUMS.txt?alt=media",
            tb.endpoint
        ),
        &[],
    );
    assert_eq!(r.status, 200);
    let sums = parse_sums(&r.text());
    assert!(sums.len() > 100, "SHA256SUMS.txt has {} lines", sums.len());
    sums
}

/// SHA-256 of an object fetched directly from the testbed (no faults may be on).
fn direct_sha(tb: &TestbedProc, bucket: &str, name: &str) -> String {
    let r = http_get(
        &format!(
            "{}/storage/v1/b/{bucket}/o/{}?alt=media",
            tb.endpoint,
            enc(name)
        ),
        &[],
    );
    assert_eq!(r.status, 200, "direct GET {name}");
    sha256_hex(&r.body)
}

/// How long the readers of one check may take (they fail the test, killed, after that).
const READ_TIMEOUT: Duration = Duration::from_secs(900);

/// SHA-256 of a file read through the mount, or the read error.
fn mount_sha(path: &Path) -> Result<String, std::io::Error> {
    let mut f = fs::File::open(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(sha256_hex(&buf))
}

fn fault_total(s: &serde_json::Value) -> u64 {
    s["faults"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

/// A mount of the JPG bucket for the fault tests: no snapshot, a 1 s stall timeout (the
/// testbed's stalls last 60 s, so only the timeout can rescue a read), metrics on. Returns the
/// mount and its metrics address.
fn fault_mount(tb: &TestbedProc) -> (Mount, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let args = tb.mount_args(
        JPG,
        &[
            "--metadata-cache",
            "off",
            "--stall-timeout",
            "1s",
            "--metrics-addr",
            &addr,
        ],
    );
    (Mount::start_with(&args, &[]), addr)
}

/// The soak: 5% 503/429, 2% resets mid-body, 1% truncated bodies, 1% stalls and random
/// latency, 8 parallel readers over 1,000 files plus big ranged objects: every SHA-256
/// matches, no read call fails, every reader exits 0.
#[test]
fn soak_with_faults_every_byte_right() {
    let bigs: Vec<String> = (0..4).map(|i| format!("big/{i}.bin")).collect();
    let mut args = vec![
        "--model",
        "jpg",
        "--patients",
        "190",
        "--size-scale",
        "0.3",
        "--addr",
        "127.0.0.1:0",
        "--seed",
        "7",
    ];
    let specs: Vec<String> = bigs.iter().map(|b| format!("{b}=40MiB")).collect();
    for s in &specs {
        args.extend(["--synthetic", s.as_str()]);
    }
    let tb = TestbedProc::start(&args);
    let mut sums: Vec<_> = model_sums(&tb, JPG)
        .into_iter()
        .filter(|(_, n)| n.ends_with(".jpg"))
        .take(1000)
        .collect();
    assert_eq!(sums.len(), 1000, "the model must have 1,000 JPGs");
    for b in &bigs {
        sums.push((direct_sha(&tb, JPG, b), b.clone()));
    }

    let (m, addr) = fault_mount(&tb);
    tb.set_faults(
        r#"{"fail_rate":0.05,"reset_rate":0.02,"truncate_rate":0.01,"stall_rate":0.01,
            "stall_duration":"60s","latency_jitter":"20ms","first_byte_latency":"2ms"}"#,
    );
    let t0 = Instant::now();
    let report = read_files(&m.path, &sums, 8, READ_TIMEOUT);
    let took = t0.elapsed();
    tb.set_faults(r#"{"reset":true}"#);
    let s = tb.stats();
    let injected = fault_total(&s);
    eprintln!(
        "SOAK: {} files read by {} readers in {took:.1?} ({} read to the end, failed calls \
         {:?}); faults injected {} ({}), {} requests delayed; physiofs retries {} resumes {} \
         checksum mismatches {}",
        sums.len(),
        report.readers,
        report.read.len(),
        report.errnos,
        injected,
        s["faults"],
        s["delayed_requests"],
        prometheus_metric(&addr, "retries_total"),
        prometheus_metric(&addr, "resumes_total"),
        prometheus_metric(&addr, "checksum_mismatches_total"),
    );
    report.assert_all_right(&sums, &m.diag());
    // The faults really happened, of every kind asked for.
    for k in ["fail_429", "fail_503", "reset", "truncate", "stall"] {
        assert!(s["faults"][k].as_u64().unwrap() > 0, "no {k} injected: {s}");
    }
    assert!(
        s["delayed_requests"].as_u64().unwrap() > 0,
        "no request delayed: {s}"
    );
    // And physiofs rode them out the way it should: retried the refusals, resumed the broken
    // bodies.
    assert!(
        prometheus_metric(&addr, "retries_total") > 0,
        "no request was retried"
    );
    assert!(
        prometheus_metric(&addr, "resumes_total") > 0,
        "no body was resumed"
    );
    m.unmount();
}

/// How a round of `each_fault_alone` shows that its fault was met and how it was survived.
enum Survived {
    /// The testbed injected faults and this physiofs counter moved.
    Counter(&'static str),
    /// The testbed held back the answers of (nearly) every request of the round.
    Delayed,
}

/// Each fault alone, on files no earlier round touched: the right bytes, no failed call, and
/// the counters show the fault was met and survived the way it should be (retry, resume,
/// checksum), or for latency that the answers were in fact held back.
#[test]
fn each_fault_alone() {
    use Survived::*;
    let rounds: &[(&str, &str, Survived)] = &[
        ("fail", r#"{"fail_rate":0.3}"#, Counter("retries_total")),
        ("reset", r#"{"reset_rate":0.3}"#, Counter("resumes_total")),
        (
            "truncate",
            r#"{"truncate_rate":0.3}"#,
            Counter("resumes_total"),
        ),
        (
            "stall",
            r#"{"stall_rate":0.2,"stall_duration":"60s"}"#,
            Counter("resumes_total"),
        ),
        (
            "corrupt",
            r#"{"corrupt_rate":0.3}"#,
            Counter("checksum_mismatches_total"),
        ),
        ("latency", r#"{"latency_jitter":"150ms"}"#, Delayed),
    ];
    let specs: Vec<String> = (0..rounds.len())
        .map(|i| format!("big/{i}.bin=24MiB"))
        .collect();
    let mut args = vec![
        "--model",
        "jpg",
        "--patients",
        "60",
        "--size-scale",
        "0.3",
        "--addr",
        "127.0.0.1:0",
    ];
    for s in &specs {
        args.extend(["--synthetic", s.as_str()]);
    }
    let tb = TestbedProc::start(&args);
    let jpgs: Vec<_> = model_sums(&tb, JPG)
        .into_iter()
        .filter(|(_, n)| n.ends_with(".jpg"))
        .collect();
    let per = jpgs.len() / rounds.len();
    assert!(per >= 30, "{} JPGs for {} rounds", jpgs.len(), rounds.len());
    let (m, addr) = fault_mount(&tb);
    for (i, (name, knob, survived)) in rounds.iter().enumerate() {
        let big = format!("big/{i}.bin");
        let mut sums = jpgs[i * per..(i + 1) * per].to_vec();
        // Corruption of a whole-object answer is caught by its CRC32C and asked again, so
        // that round reads whole objects only; corrupt ranges of a big object are caught at
        // the end of the file (EIO), see `corrupt_big_object_is_never_read_silently`.
        if *name != "corrupt" {
            sums.push((direct_sha(&tb, JPG, &big), big));
        }
        let before_tb = tb.stats();
        let before = match survived {
            Counter(c) => prometheus_metric(&addr, c),
            Delayed => 0,
        };
        tb.set_faults(knob);
        let report = read_files(&m.path, &sums, 4, READ_TIMEOUT);
        tb.set_faults(r#"{"reset":true}"#);
        let after_tb = tb.stats();
        let injected = fault_total(&after_tb) - fault_total(&before_tb);
        let delta = |k: &str| after_tb[k].as_u64().unwrap() - before_tb[k].as_u64().unwrap();
        let (delayed, delayed_us) = (delta("delayed_requests"), delta("delayed_micros"));
        eprintln!(
            "FAULT {name}: {} files, {injected} faults injected, {delayed} requests delayed",
            sums.len()
        );
        report.assert_all_right(&sums, &format!("round {name}\n{}", m.diag()));
        match survived {
            Counter(c) => {
                let after = prometheus_metric(&addr, c);
                eprintln!("FAULT {name}: {c} {before} -> {after}");
                assert!(injected > 0, "{name}: nothing injected");
                assert!(after > before, "{name}: {c} did not move");
            }
            Delayed => {
                // Every file of the round needs a GET while the knob is on, but for at most
                // the two that share a folder with the previous round's last file (read ahead
                // then); the jitter is uniform in [0, 150 ms).
                let want = sums.len() as u64 - 2;
                assert!(
                    delayed >= want,
                    "{name}: {delayed} requests delayed for {} files (want >= {want})",
                    sums.len()
                );
                let mean = Duration::from_micros(delayed_us / delayed);
                assert!(
                    mean > Duration::ZERO && mean < Duration::from_millis(150),
                    "{name}: mean delay {mean:?}"
                );
            }
        }
    }
    m.unmount();
}

/// A big object read in ranged pieces whose bytes arrive corrupted: the whole-file CRC32C
/// check fails the read with EIO (no program reading to the end gets wrong bytes silently),
/// and once the server is healthy the same file reads right in the same mount.
#[test]
fn corrupt_big_object_is_never_read_silently() {
    let tb = TestbedProc::start(&[
        "--model",
        "jpg",
        "--patients",
        "5",
        "--size-scale",
        "0.1",
        "--addr",
        "127.0.0.1:0",
        "--synthetic",
        "big/c.bin=24MiB",
    ]);
    let want = direct_sha(&tb, JPG, "big/c.bin");
    let addr = format!("127.0.0.1:{}", free_port());
    let m = Mount::start_with(
        &tb.mount_args(JPG, &["--metadata-cache", "off", "--metrics-addr", &addr]),
        &[],
    );
    let path = m.join("big/c.bin");
    tb.set_faults(r#"{"corrupt_rate":1.0}"#);
    let err = mount_sha(&path).expect_err("a corrupted object was read without an error");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // `cat` (a real client) sees the error too, and exits non-zero.
    let out = Command::new("cat")
        .arg(&path)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "cat read a corrupted object to the end"
    );
    assert!(prometheus_metric(&addr, "verify_failures_total") >= 2);
    let log = fs::read_to_string(m.stderr_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("CRC32C") && l.contains("big/c.bin")),
        "{log}"
    );
    tb.set_faults(r#"{"corrupt_rate":0.0}"#);
    assert_eq!(
        mount_sha(&path).unwrap(),
        want,
        "after the server recovered"
    );
    assert!(prometheus_metric(&addr, "objects_verified_total") >= 1);
    // A second, warm read (kernel page cache) is still right.
    assert_eq!(mount_sha(&path).unwrap(), want);
    m.unmount();
}

/// Malformed answers: a read fails with an errno (never wrong bytes), one log line names the
/// object, the mount stays up, and the same read works once the server behaves.
#[test]
fn malformed_answers_fail_cleanly_and_recover() {
    let media = [
        ("wrong-content-range", libc::EIO),
        ("no-content-range", libc::EIO),
        ("short-body", libc::EIO),
        ("wrong-generation", libc::ESTALE),
    ];
    let specs: Vec<String> = (0..media.len())
        .map(|i| format!("big/{i}.bin=6MiB"))
        .collect();
    let mut args = vec![
        "--model",
        "dicom",
        "--patients",
        "30",
        "--size-scale",
        "0.01",
        "--addr",
        "127.0.0.1:0",
    ];
    for s in &specs {
        args.extend(["--synthetic", s.as_str()]);
    }
    let bucket = "mimic-cxr-2.0.0.physionet.org";
    let tb = TestbedProc::start(&args);
    let want: Vec<String> = (0..media.len())
        .map(|i| direct_sha(&tb, bucket, &format!("big/{i}.bin")))
        .collect();
    let m = Mount::start_with(
        &tb.mount_args(
            bucket,
            &[
                "--metadata",
                "lazy",
                "--metadata-cache",
                "off",
                "--retries",
                "3",
            ],
        ),
        &[],
    );
    for (i, (kind, errno)) in media.iter().enumerate() {
        let path = m.join(format!("big/{i}.bin"));
        tb.set_faults(&format!(r#"{{"malformed":"{kind}"}}"#));
        // A ranged read in the middle (a 206 answer), then the whole file.
        let mut f = fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 65536];
        let err = std::os::unix::fs::FileExt::read_at(&f, &mut buf, 3 << 20)
            .expect_err(&format!("{kind}: a read succeeded"));
        assert_eq!(err.raw_os_error(), Some(*errno), "{kind}: {err}");
        let err = f.read_to_end(&mut Vec::new()).expect_err(kind);
        assert_eq!(err.raw_os_error(), Some(*errno), "{kind}: {err}");
        drop(f);
        tb.set_faults(r#"{"malformed":"none"}"#);
        if *kind == "wrong-generation" {
            // The object "changed": the entry is refreshed; a new open reads the live version.
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(mount_sha(&path).unwrap(), want[i], "{kind}: after recovery");
        let log = fs::read_to_string(m.stderr_path()).unwrap();
        assert!(
            log.lines().any(|l| l.contains(&format!("big/{i}.bin"))),
            "{kind}: no log line names the object:\n{log}"
        );
    }

    // Listing answers, in lazy mode (one listing per directory): the directory fails with EIO,
    // the failure is not remembered, and it lists fine once the server behaves.
    let mut dirs: Vec<String> = Vec::new();
    for pnn in fs::read_dir(m.join("files")).unwrap() {
        let pnn = pnn.unwrap().file_name().into_string().unwrap();
        for p in fs::read_dir(m.join(format!("files/{pnn}"))).unwrap() {
            dirs.push(format!(
                "{pnn}/{}",
                p.unwrap().file_name().into_string().unwrap()
            ));
        }
    }
    let listing = [
        "bad-json",
        "missing-size",
        "non-numeric-size",
        "bad-crc",
        "repeat-token",
        "huge-page",
    ];
    assert!(dirs.len() >= listing.len());
    for (kind, d) in listing.iter().zip(&dirs) {
        let dir = m.join(format!("files/{d}"));
        tb.set_faults(&format!(r#"{{"malformed":"{kind}"}}"#));
        let err = fs::read_dir(&dir)
            .and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
            .expect_err(&format!("{kind}: listing succeeded"));
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{kind}: {err}");
        tb.set_faults(r#"{"malformed":"none"}"#);
        let n = fs::read_dir(&dir).unwrap().count();
        assert!(n > 0, "{kind}: empty after recovery");
    }
    let s = tb.stats();
    assert!(s["faults"]["malformed"].as_u64().unwrap() >= 10, "{s}");
    m.unmount();

    // At mount time, a broken listing stops the mount with a message naming the cause.
    tb.set_faults(r#"{"malformed":"bad-json"}"#);
    let (_d, mnt) = mountpoint_dir();
    let out = run_timeout(
        &mut physiofs_command(&tb.mount_args(bucket, &["--metadata-cache", "off"]), &mnt),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not valid JSON"), "{err}");
    assert_not_mounted(&mnt, "broken listing at mount time");
}

/// The server disappears for 30 s and comes back: a read that spans the outage completes
/// with the right bytes, a mount with a short retry budget fails only the reads made during
/// the outage, and both serve again without a remount.
#[test]
fn server_outage_30s_then_back() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let tb_args = [
        "--model",
        "jpg",
        "--patients",
        "20",
        "--size-scale",
        "0.3",
        "--addr",
        addr.as_str(),
    ];
    let mut tb = TestbedProc::start(&tb_args);
    let sums: Vec<_> = model_sums(&tb, JPG)
        .into_iter()
        .filter(|(_, n)| n.ends_with(".jpg"))
        .collect();
    assert!(sums.len() >= 6);
    // The default retry budget (20 attempts within 60 s) is meant to ride out this outage.
    let patient = tb.mount_args(JPG, &["--metadata-cache", "off"]);
    let patient = Mount::start_with(&patient, &[]);
    let hasty = Mount::start_with(
        &tb.mount_args(
            JPG,
            &[
                "--metadata-cache",
                "off",
                "--retries",
                "3",
                "--retry-deadline",
                "5s",
            ],
        ),
        &[],
    );
    let sha = |m: &Mount, i: usize| mount_sha(&m.join(&sums[i].1));
    assert_eq!(sha(&patient, 0).unwrap(), sums[0].0);
    assert_eq!(sha(&hasty, 0).unwrap(), sums[0].0);

    // Down.
    tb.proc.signal(libc::SIGKILL);
    let _ = tb.proc.wait_exit(Duration::from_secs(10));
    let t0 = Instant::now();
    let path = patient.join(&sums[1].1);
    let waiting = std::thread::spawn(move || mount_sha(&path));
    let err = sha(&hasty, 2).expect_err("a read with the server down succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    eprintln!(
        "OUTAGE: short-budget read failed with EIO after {:.1?}",
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_secs(30).saturating_sub(t0.elapsed()));
    assert!(
        !waiting.is_finished(),
        "the read did not wait for the server"
    );

    // Back, on the same address.
    tb = TestbedProc::start(&tb_args);
    let got = waiting
        .join()
        .unwrap()
        .expect("the read spanning the outage failed");
    eprintln!(
        "OUTAGE: read spanning the outage finished after {:.1?}",
        t0.elapsed()
    );
    assert_eq!(got, sums[1].0);
    for (i, (want, _)) in sums.iter().enumerate().take(6).skip(2) {
        assert_eq!(
            &sha(&hasty, i).unwrap(),
            want,
            "hasty mount after the outage"
        );
        assert_eq!(
            &sha(&patient, i).unwrap(),
            want,
            "patient mount after the outage"
        );
    }
    let _ = &tb;
    patient.unmount();
    hasty.unmount();
}

/// A service-account key whose token endpoint is the testbed: the mount gets a token for the
/// read-only scope (the testbed refuses any other), sends it, and never writes it to its log,
/// even at trace level.
#[test]
fn tokens_never_logged() {
    let tb = TestbedProc::start(&[
        "--model",
        "jpg",
        "--patients",
        "10",
        "--size-scale",
        "0.1",
        "--addr",
        "127.0.0.1:0",
        "--require-token",
        "tbtok-*",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let private_key = fs::read_to_string(&pem).unwrap();
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "k1",
        "private_key": private_key,
        "client_email": "reader@test-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": format!("{}/token", tb.endpoint),
    });
    let key_path = dir.path().join("key.json");
    fs::write(&key_path, key.to_string()).unwrap();

    let args: Vec<std::ffi::OsString> = vec![
        "--endpoint".into(),
        tb.endpoint.clone().into(),
        "--bucket".into(),
        JPG.into(),
        "--billing-project".into(),
        "test-project".into(),
        "--key-file".into(),
        key_path.clone().into(),
        "--allow-insecure-endpoint".into(),
        "--metadata-cache".into(),
        "off".into(),
        "--log-level".into(),
        "trace".into(),
    ];
    let mut m = Mount::start_with(&args, &[]);
    let sums: Vec<_> = parse_sums(&fs::read_to_string(m.join("SHA256SUMS.txt")).unwrap());
    read_files(&m.path, &sums, 2, READ_TIMEOUT).assert_all_right(&sums, &m.diag());
    let s = tb.stats();
    assert_eq!(
        s["responses"]["401"].as_u64().unwrap_or(0),
        0,
        "requests were refused: {s}"
    );
    assert!(s["requests"]["get_media"].as_u64().unwrap() > 0, "{s}");
    m.signal(libc::SIGINT);
    assert!(
        m.wait_exit(Duration::from_secs(30)).is_some(),
        "{}",
        m.diag()
    );
    let log = fs::read_to_string(m.stderr_path()).unwrap();
    let trace_lines = log.lines().filter(|l| l.contains("TRACE")).count();
    assert!(
        trace_lines > 50,
        "trace logging was not on ({trace_lines} lines)"
    );
    assert!(!log.contains("tbtok-"), "a bearer token is in the log");
    assert!(
        !log.to_ascii_lowercase().contains("bearer "),
        "an Authorization header is in the log"
    );
    let key_line = private_key.lines().nth(3).unwrap();
    assert!(!log.contains(key_line), "the private key is in the log");
    assert!(!log.contains("assertion="), "the signed JWT is in the log");
}
