//! The path real GCS takes: HTTPS, with HTTP/1.1 or HTTP/2 chosen by ALPN. `physiofs testbed
//! --tls` (a separate process, with a certificate made at start) is mounted through the kernel
//! with `--ca-file`; `sha256sum -c` over the JPG model proves every byte, and the testbed's
//! protocol counters prove which HTTP version carried them. Without the certificate the mount
//! must fail at start, saying the certificate is not trusted and naming `--ca-file`; resets,
//! truncations and stalls over TLS must be survived as over plain HTTP. Behind a proxy
//! (`HTTP_PROXY`), every request goes through it, media reads included (they then leave
//! physiofs's own connections for reqwest's, which know proxies), unless `NO_PROXY` names
//! the endpoint.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
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

/// Mounts, checks every file with `sha256sum -c`, unmounts: the testbed's http1 and h2
/// request counts, and the mount's media connections whose TLS records it opened itself.
fn read_all_counted(tb: &TlsTestbed, extra: &[&str]) -> (u64, u64, u64) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut flags = extra.to_vec();
    flags.extend(["--metrics-addr", &addr]);
    let args = tb.mount_args(JPG_BUCKET, &flags);
    let mount = Mount::start_with(&args, &[]);
    let ok = sha256sum_check(&mount.path);
    assert_eq!(
        ok,
        want_sums(),
        "sha256sum -c OK lines over TLS ({extra:?})"
    );
    let own = prometheus_metric(&addr, "media_connections_tls_own_records_total");
    mount.unmount();
    let s = tb.stats();
    (
        counter(&s, "protocols", "http1"),
        counter(&s, "protocols", "http2"),
        own,
    )
}

fn read_all(tb: &TlsTestbed, extra: &[&str]) -> (u64, u64) {
    let (h1, h2, _) = read_all_counted(tb, extra);
    (h1, h2)
}

#[test]
fn http1_over_tls_reads_the_model_exactly() {
    let tb = jpg_testbed(&[]);
    let (h1, h2, own) = read_all_counted(&tb, &["--http-protocol", "http1"]);
    assert!(h1 > 0, "no request was served over http/1.1");
    assert_eq!(h2, 0, "--http-protocol http1 must never speak h2");
    assert!(
        own > 0,
        "TLS 1.3 media reads must open their records in the receive buffer (client::tls13)"
    );
    // The suite physiofs offers first is the one a server that follows the client's order
    // (as the testbed's rustls does) picks: every media connection the mount made used it.
    let stats = tb.stats();
    let aes128 = stats["protocols"]["tls_suites"]["TLSv1_3 TLS13_AES_128_GCM_SHA256"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        aes128 >= own,
        "{own} media connections, {aes128} handshakes on TLS_AES_128_GCM_SHA256: {}",
        stats["protocols"]
    );
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

/// A forward proxy for plain HTTP that sends every connection to `upstream`, whatever host the
/// request names, and keeps everything clients sent (the request lines say what went through).
struct Proxy {
    addr: String,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(&upstream).unwrap();
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let log = log.clone();
                thread::spawn(move || {
                    let mut b = [0u8; 16 << 10];
                    while let Ok(n) = c_in.read(&mut b) {
                        if n == 0 || s_out.write_all(&b[..n]).is_err() {
                            break;
                        }
                        log.lock().unwrap().extend_from_slice(&b[..n]);
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Proxy { addr, sent }
    }

    /// How many requests the clients sent through the proxy whose line contains `needle`.
    fn requests_with(&self, needle: &str) -> usize {
        let sent = String::from_utf8_lossy(&self.sent.lock().unwrap()).into_owned();
        sent.lines()
            .filter(|l| l.starts_with("GET ") && l.contains(needle))
            .count()
    }
}

#[test]
fn behind_a_proxy_every_request_goes_through_it_media_reads_included() {
    let tb = TestbedProc::start(&[
        "--model",
        "jpg",
        "--patients",
        &PATIENTS.to_string(),
        "--size-scale",
        &SIZE_SCALE.to_string(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let upstream = tb.endpoint.trim_start_matches("http://").to_string();
    let proxy = Proxy::start(upstream.clone());
    // A host that no resolver knows: only the proxy can reach it, so a media read that went
    // straight to the endpoint would fail and `sha256sum -c` with it.
    let port = upstream.rsplit(':').next().unwrap();
    let endpoint = format!("http://storage.physiofs-test.invalid:{port}");
    let mut args = tb.mount_args(JPG_BUCKET, &[]);
    let at = args.iter().position(|a| a == "--endpoint").unwrap() + 1;
    args[at] = endpoint.clone().into();
    let proxy_url = format!("http://{}", proxy.addr);
    let mount = Mount::start_with(&args, &[("HTTP_PROXY", &proxy_url)]);
    let ok = sha256sum_check(&mount.path);
    assert_eq!(ok, want_sums(), "sha256sum -c OK lines behind the proxy");
    mount.unmount();
    let media = proxy.requests_with("alt=media");
    let listings = proxy.requests_with("/storage/v1/b/");
    assert!(
        media >= want_sums(),
        "{media} media GETs went through the proxy, for {} files read",
        want_sums()
    );
    assert!(listings > 0, "no listing went through the proxy");
    assert_eq!(
        proxy.requests_with(&format!("GET {endpoint}/")),
        proxy.requests_with("GET "),
        "every request through the proxy names the endpoint in absolute form"
    );
    // The endpoint in NO_PROXY (the harness sets 127.0.0.1): nothing goes through the proxy.
    let before = proxy.requests_with("GET ");
    let mount = Mount::start_with(
        &tb.mount_args(JPG_BUCKET, &[]),
        &[("HTTP_PROXY", &proxy_url)],
    );
    assert_eq!(sha256sum_check(&mount.path), want_sums());
    mount.unmount();
    assert_eq!(
        proxy.requests_with("GET "),
        before,
        "NO_PROXY names the endpoint, yet requests went through the proxy"
    );
}

/// A TCP forwarder that damages what the server sends: on every connection, one bit of the
/// byte at each of `at` (offsets in that connection's server-to-client stream). Returns its
/// address and the count of bytes it damaged.
fn damaging_forwarder(upstream: String, at: &'static [u64]) -> (String, Arc<Mutex<u64>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let flips = Arc::new(Mutex::new(0u64));
    let count = flips.clone();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            let count = count.clone();
            thread::spawn(move || {
                let mut b = vec![0u8; 64 << 10];
                let mut passed = 0u64;
                while let Ok(n) = s_in.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    for &off in at {
                        if (passed..passed + n as u64).contains(&off) {
                            b[(off - passed) as usize] ^= 0x04;
                            *count.lock().unwrap() += 1;
                        }
                    }
                    passed += n as u64;
                    if c_out.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, flips)
}

/// TLS records damaged on the wire (as a faulty path or middlebox would): the record fails its
/// authentication, nothing of it is used, the read is asked again from its first missing
/// byte, and every file still reads exactly. Media reads open their records themselves
/// (client::tls13), listings are reqwest's: both must come through.
#[test]
fn damaged_tls_records_are_retried_and_every_byte_is_right() {
    let tb = jpg_testbed(&[]);
    let upstream = tb
        .testbed
        .endpoint
        .trim_start_matches("https://")
        .to_string();
    let (fwd, flips) = damaging_forwarder(upstream, &[70_000, 300_000, 900_000]);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = tb.mount_args(JPG_BUCKET, &["--metrics-addr", &addr]);
    let at = args.iter().position(|a| a == "--endpoint").unwrap() + 1;
    args[at] = format!("https://{fwd}").into();
    let mount = Mount::start_with(&args, &[]);
    assert_eq!(
        sha256sum_check(&mount.path),
        want_sums(),
        "sha256sum -c OK lines with damaged TLS records"
    );
    let own = prometheus_metric(&addr, "media_connections_tls_own_records_total");
    let again =
        prometheus_metric(&addr, "retries_total") + prometheus_metric(&addr, "resumes_total");
    mount.unmount();
    let flips = *flips.lock().unwrap();
    assert!(own > 0, "media reads did not open their own records");
    assert!(
        flips > 0,
        "the forwarder damaged nothing: the test proves nothing"
    );
    assert!(
        again > 0,
        "{flips} bytes damaged, yet no request was retried or resumed"
    );
}
