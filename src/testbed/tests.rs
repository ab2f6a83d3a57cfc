//! End-to-end tests: a plain HTTP/1.1 client (hyper) against an in-process testbed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use hyper::HeaderMap;
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::*;

struct Got {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    body_err: Option<String>,
    /// On tokio's clock: exact (virtual) time in a test with the clock paused.
    headers_at: Duration,
    total: Duration,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, h: &str) -> Option<&str> {
        self.headers.get(h).and_then(|v| v.to_str().ok())
    }
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Got, String> {
    let t0 = Instant::now();
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, String>(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = send
        .send_request(b.body(body.to_string()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let headers_at = t0.elapsed();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut inc = resp.into_body();
    let mut out = Vec::new();
    let mut body_err = None;
    loop {
        match std::future::poll_fn(|cx| std::pin::Pin::new(&mut inc).poll_frame(cx)).await {
            None => break,
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => {
                body_err = Some(format!("{e:?}"));
                break;
            }
        }
    }
    Ok(Got {
        status,
        headers,
        body: out,
        body_err,
        headers_at,
        total: t0.elapsed(),
    })
}

async fn get(addr: SocketAddr, path: &str) -> Got {
    request(addr, "GET", path, &[], "").await.unwrap()
}

async fn get_h(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    request(addr, "GET", path, headers, "").await.unwrap()
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> Got {
    request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        body,
    )
    .await
    .unwrap()
}

fn small_source() -> MemSource {
    let mut m = MemSource::new();
    m.insert("bkt", "files/p10/a.txt", &b"hello world"[..]);
    m.insert(
        "bkt",
        "files/p10/b.dcm",
        (0..100_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    m.insert("bkt", "empty", Bytes::new());
    m.insert(
        "bkt",
        "big.bin",
        (0..4_000_000u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>(),
    );
    m
}

async fn server(opts: TestbedOptions, src: MemSource) -> TestbedHandle {
    start(opts, Arc::new(src)).await.unwrap()
}

fn enc(s: &str) -> String {
    json::encode_segment(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_and_offsets() {
    let mut m = MemSource::new();
    for i in 0..2500 {
        m.insert("bkt", &format!("many/obj{i:05}"), &b"x"[..]);
    }
    m.insert("bkt", "other/z", &b"z"[..]);
    let h = server(TestbedOptions::default(), m).await;
    let a = h.addr();

    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/storage/v1/b/bkt/o?prefix=many%2F".to_string();
        if let Some(t) = &token {
            path.push_str(&format!("&pageToken={t}"));
        }
        let g = get(a, &path).await;
        assert_eq!(g.status, 200);
        let j = g.json();
        assert_eq!(j["kind"], "storage#objects");
        assert!(
            j.get("prefixes").is_none(),
            "empty prefixes must be omitted"
        );
        pages += 1;
        for it in j["items"].as_array().unwrap() {
            names.push(it["name"].as_str().unwrap().to_string());
        }
        match j.get("nextPageToken").and_then(Value::as_str) {
            Some(t) => {
                token = Some(
                    percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC)
                        .to_string(),
                )
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 2500);
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, names);

    // maxResults caps lower.
    let j = get(a, "/storage/v1/b/bkt/o?prefix=many/&maxResults=10")
        .await
        .json();
    assert_eq!(j["items"].as_array().unwrap().len(), 10);
    assert!(j["nextPageToken"].is_string());
    // maxResults above 1000 is capped.
    let j = get(a, "/storage/v1/b/bkt/o?maxResults=5000").await.json();
    assert_eq!(j["items"].as_array().unwrap().len(), 1000);

    // startOffset inclusive, endOffset exclusive.
    let j = get(
        a,
        "/storage/v1/b/bkt/o?startOffset=many/obj00010&endOffset=many/obj00013",
    )
    .await
    .json();
    let got: Vec<&str> = j["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["many/obj00010", "many/obj00011", "many/obj00012"]);
    assert!(j.get("nextPageToken").is_none());

    // Delimiter: prefixes, once each, across pages.
    let j = get(a, "/storage/v1/b/bkt/o?delimiter=/").await.json();
    assert_eq!(j["prefixes"], serde_json::json!(["many/", "other/"]));
    assert!(j.get("items").is_none(), "empty items must be omitted");
    let j = get(a, "/storage/v1/b/bkt/o?delimiter=/&maxResults=1")
        .await
        .json();
    assert_eq!(j["prefixes"], serde_json::json!(["many/"]));
    let t = j["nextPageToken"].as_str().unwrap().to_string();
    let j = get(
        a,
        &format!("/storage/v1/b/bkt/o?delimiter=/&maxResults=1&pageToken={t}"),
    )
    .await
    .json();
    assert_eq!(j["prefixes"], serde_json::json!(["other/"]));
    assert!(j.get("nextPageToken").is_none());

    // A page out of 2,500 reads one batch from the source (a page and the one after it).
    let before = h.stats().list_scanned;
    let g = get(
        a,
        "/storage/v1/b/bkt/o?prefix=many/&startOffset=many/obj01200",
    )
    .await;
    assert_eq!(g.status, 200);
    assert_eq!(g.json()["items"].as_array().unwrap().len(), 1000);
    assert_eq!(h.stats().list_scanned - before, 1001);

    // Missing bucket.
    let g = get(a, "/storage/v1/b/nope/o").await;
    assert_eq!(g.status, 404);
    assert_eq!(
        g.json()["error"]["message"],
        "The specified bucket does not exist."
    );
    assert_eq!(h.stats().requests.list, 11);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_bucket() {
    let src = small_source();
    let obj = src.stat("bkt", "files/p10/a.txt").unwrap();
    let h = server(TestbedOptions::default(), src).await;
    let a = h.addr();
    let g = get(a, "/storage/v1/b/bkt/o/files%2Fp10%2Fa.txt").await;
    assert_eq!(g.status, 200);
    let j = g.json();
    assert_eq!(j["kind"], "storage#object");
    assert_eq!(j["name"], "files/p10/a.txt");
    assert_eq!(j["bucket"], "bkt");
    assert_eq!(j["size"], "11");
    assert_eq!(j["generation"], obj.generation.to_string());
    assert_eq!(j["metageneration"], "1");
    assert_eq!(j["id"], format!("bkt/files/p10/a.txt/{}", obj.generation));
    assert_eq!(j["contentType"], "text/plain");
    assert_eq!(j["storageClass"], "STANDARD");
    assert_eq!(j["updated"], "2023-11-14T22:13:20.000Z");
    assert_eq!(j["timeCreated"], "2023-11-14T22:13:20.000Z");
    // crc32c("hello world") = 0xc99465aa
    assert_eq!(j["crc32c"], "yZRlqg==");
    assert_eq!(j["md5Hash"], "XrY7u+Ae7tCTyyK7j1rNww==");
    assert!(j["etag"].is_string());

    let g = get(a, "/storage/v1/b/bkt/o/files%2Fp10%2Fnope").await;
    assert_eq!(g.status, 404);
    let e = g.json();
    assert_eq!(e["error"]["code"], 404);
    assert_eq!(e["error"]["message"], "No such object: bkt/files/p10/nope");
    assert_eq!(e["error"]["errors"][0]["reason"], "notFound");
    assert_eq!(e["error"]["errors"][0]["domain"], "global");

    let g = get(a, "/storage/v1/b/bkt").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.json()["kind"], "storage#bucket");
    assert_eq!(g.json()["name"], "bkt");
    assert_eq!(g.json()["location"], "US");
    let g = get(a, "/storage/v1/b/nope").await;
    assert_eq!(g.status, 404);
    assert_eq!(
        g.json()["error"]["message"],
        "The specified bucket does not exist."
    );

    // Generation pin.
    let g = get(
        a,
        &format!(
            "/storage/v1/b/bkt/o/files%2Fp10%2Fa.txt?alt=media&generation={}",
            obj.generation
        ),
    )
    .await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, b"hello world");
    let g = get(
        a,
        &format!(
            "/storage/v1/b/bkt/o/files%2Fp10%2Fa.txt?alt=media&generation={}",
            obj.generation + 1
        ),
    )
    .await;
    assert_eq!(g.status, 404);
    assert_eq!(
        g.json()["error"]["message"],
        "No such object: bkt/files/p10/a.txt"
    );
    let g = get(
        a,
        &format!(
            "/storage/v1/b/bkt/o/files%2Fp10%2Fa.txt?generation={}",
            obj.generation - 1
        ),
    )
    .await;
    assert_eq!(g.status, 404);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_and_ranges() {
    let src = small_source();
    let want = src.content("bkt", "files/p10/b.dcm").unwrap();
    let big = src.content("bkt", "big.bin").unwrap();
    let gen_ = src.stat("bkt", "files/p10/b.dcm").unwrap().generation;
    let h = server(TestbedOptions::default(), src).await;
    let a = h.addr();
    let p = "/storage/v1/b/bkt/o/files%2Fp10%2Fb.dcm?alt=media";

    let g = get(a, p).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, want);
    assert_eq!(g.header("content-length"), Some("100000"));
    assert_eq!(
        g.header("x-goog-generation"),
        Some(gen_.to_string().as_str())
    );
    assert_eq!(g.header("x-goog-metageneration"), Some("1"));
    assert_eq!(g.header("x-goog-stored-content-length"), Some("100000"));
    assert_eq!(g.header("accept-ranges"), Some("bytes"));
    assert_eq!(g.header("content-type"), Some("application/dicom"));
    assert!(g.header("etag").is_some());
    let (c, m) = source::gcs_hashes(&want);
    assert_eq!(
        g.header("x-goog-hash"),
        Some(format!("crc32c={c},md5={m}").as_str())
    );

    // Big body streams in several chunks, intact.
    let g = get(a, "/download/storage/v1/b/bkt/o/big.bin?alt=media").await;
    assert_eq!(g.status, 200);
    assert!(g.body == big, "big body differs");

    for (range, status, cr, body) in [
        (
            "bytes=0-9",
            206,
            Some("bytes 0-9/100000"),
            want[0..10].to_vec(),
        ),
        (
            "bytes=99990-",
            206,
            Some("bytes 99990-99999/100000"),
            want[99990..].to_vec(),
        ),
        (
            "bytes=-5",
            206,
            Some("bytes 99995-99999/100000"),
            want[99995..].to_vec(),
        ),
        (
            "bytes=99995-200000",
            206,
            Some("bytes 99995-99999/100000"),
            want[99995..].to_vec(),
        ),
        ("bytes=5-1", 200, None, want.clone()),
        ("bytes=0-1,5-6", 200, None, want.clone()),
        ("garbage", 200, None, want.clone()),
    ] {
        let g = get_h(a, p, &[("range", range)]).await;
        assert_eq!(g.status, status, "{range}");
        assert_eq!(g.header("content-range"), cr, "{range}");
        assert_eq!(g.body, body, "{range}");
        assert_eq!(g.header("content-length").unwrap(), body.len().to_string());
    }
    let g = get_h(a, p, &[("range", "bytes=100000-")]).await;
    assert_eq!(g.status, 416);
    assert_eq!(g.header("content-range"), Some("bytes */100000"));
    assert_eq!(g.json()["error"]["code"], 416);

    // 0-byte object: 200 empty, any range 416.
    let g = get(a, "/storage/v1/b/bkt/o/empty?alt=media").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.header("content-length"), Some("0"));
    assert!(g.body.is_empty());
    for r in ["bytes=0-", "bytes=0-0", "bytes=-1"] {
        let g = get_h(a, "/storage/v1/b/bkt/o/empty?alt=media", &[("range", r)]).await;
        assert_eq!(g.status, 416, "{r}");
    }
    let st = h.stats();
    assert_eq!(st.responses_with(206), 4);
    assert_eq!(st.responses_with(416), 4);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_names() {
    let names = [
        "with space.txt",
        "uni/ÄÖü 日本.txt",
        "pct%20lit",
        "plus+sign",
        "hash#tag",
        "q?mark",
        "a/b/c",
        "semi;colon&amp=x",
    ];
    let mut m = MemSource::new();
    for n in names {
        m.insert("bkt", n, n.as_bytes().to_vec());
    }
    let h = server(TestbedOptions::default(), m).await;
    let a = h.addr();
    for n in names {
        let g = get(a, &format!("/storage/v1/b/bkt/o/{}", enc(n))).await;
        assert_eq!(g.status, 200, "{n}");
        assert_eq!(g.json()["name"], n);
        let g = get(a, &format!("/storage/v1/b/bkt/o/{}?alt=media", enc(n))).await;
        assert_eq!(g.status, 200, "{n}");
        assert_eq!(g.body, n.as_bytes());
        // selfLink round-trips.
        let j = get(a, &format!("/storage/v1/b/bkt/o/{}", enc(n)))
            .await
            .json();
        assert!(j["selfLink"].as_str().unwrap().ends_with(&enc(n)));
    }
    // Prefix query with special characters (form encoding: '+' = space, %2B = '+').
    let j = get(a, "/storage/v1/b/bkt/o?prefix=plus%2B").await.json();
    assert_eq!(j["items"][0]["name"], "plus+sign");
    let j = get(a, "/storage/v1/b/bkt/o?prefix=with+sp").await.json();
    assert_eq!(j["items"][0]["name"], "with space.txt");
    let j = get(a, "/storage/v1/b/bkt/o?prefix=uni%2F%C3%84")
        .await
        .json();
    assert_eq!(j["items"].as_array().unwrap().len(), 1);
    h.shutdown().await;
}

/// Tokio's clock advances only by the timers that fire; with it paused, a delay is measured
/// exactly, whatever the load on the machine. Timer resolution is 1 ms.
///
/// The clock cannot advance while a blocking task runs, and the server reads bodies in one
/// (`produce`), blocked while its channel of four 256 KiB chunks is full: paused-clock tests
/// use bodies of one chunk, whose producer is done before the body is sent.
fn assert_about(what: &str, got: Duration, want: Duration) {
    assert!(
        got >= want && got <= want + Duration::from_millis(3),
        "{what}: {got:?} on the paused clock, want {want:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn latency_knob() {
    let opts = TestbedOptions {
        first_byte_latency: Duration::from_millis(150),
        ..Default::default()
    };
    let h = server(opts, small_source()).await;
    let a = h.addr();
    let paths = [
        "/storage/v1/b/bkt/o",
        "/storage/v1/b/bkt/o/empty",
        "/storage/v1/b/bkt/o/empty?alt=media",
        "/storage/v1/b/bkt",
    ];
    for p in paths {
        let g = get(a, p).await;
        assert_eq!(g.status, 200, "{p}");
        assert_about(p, g.headers_at, Duration::from_millis(150));
    }
    let st = h.stats();
    assert_eq!(st.delayed_requests, 4, "{st:?}");
    assert_eq!(st.delayed_micros, 4 * 150_000, "{st:?}");
    // Not for the control endpoints.
    let g = get(a, "/_testbed/stats").await;
    assert_about("/_testbed/stats", g.headers_at, Duration::ZERO);
    // Changed at runtime, jitter included.
    let g = post(a, "/_testbed/faults", r#"{"first_byte_latency":"0s"}"#).await;
    assert_eq!(g.status, 200);
    assert_about("/_testbed/faults", g.headers_at, Duration::ZERO);
    let g = get(a, "/storage/v1/b/bkt").await;
    assert_about("latency 0", g.headers_at, Duration::ZERO);
    assert_eq!(h.stats().delayed_requests, 4);
    post(a, "/_testbed/faults", r#"{"latency_jitter":"100ms"}"#).await;
    let mut waited = Duration::ZERO;
    for p in paths {
        waited += get(a, p).await.headers_at;
    }
    let st = h.stats();
    assert_eq!(st.delayed_requests, 8, "{st:?}");
    let jitter = Duration::from_micros(st.delayed_micros - 4 * 150_000);
    assert!(jitter > Duration::ZERO && jitter < Duration::from_millis(400));
    assert!(
        waited >= jitter && waited <= jitter + Duration::from_millis(8),
        "clients waited {waited:?} for {jitter:?} of jitter"
    );
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn bandwidth_knob() {
    let opts = TestbedOptions {
        bandwidth: Some(500_000),
        ..Default::default()
    };
    let h = server(opts, small_source()).await;
    let a = h.addr();
    const OBJ: &str = "/storage/v1/b/bkt/o/files%2Fp10%2Fb.dcm?alt=media";
    let g = get(a, OBJ).await;
    assert_eq!(g.body.len(), 100_000);
    // 100 kB at 500 kB/s, paced in pieces of 1/50 s (10 kB, 20 ms): the first piece goes at
    // once, the tenth after 9 × 20 ms.
    assert_about("100 kB at 500 kB/s", g.total, Duration::from_millis(180));
    let st = h.stats();
    assert_eq!(st.throttled_bytes, 90_000, "{st:?}");
    // The cap is per connection: a new one starts with a full allowance.
    let g = get(a, OBJ).await;
    assert_about("second connection", g.total, Duration::from_millis(180));
    assert_eq!(h.stats().throttled_bytes, 180_000);
    // Runtime change to unlimited.
    post(a, "/_testbed/faults", r#"{"bandwidth":"unlimited"}"#).await;
    let g = get(a, OBJ).await;
    assert_eq!(g.body.len(), 100_000);
    assert_about("unlimited", g.total, Duration::ZERO);
    assert_eq!(h.stats().throttled_bytes, 180_000);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_rate_knob() {
    let opts = TestbedOptions {
        fail_rate: 1.0,
        seed: 7,
        ..Default::default()
    };
    let h = server(opts, small_source()).await;
    let a = h.addr();
    let (mut n429, mut n503, mut retry_after) = (0, 0, 0);
    for _ in 0..40 {
        let g = get(a, "/storage/v1/b/bkt/o/empty?alt=media").await;
        let j = g.json();
        assert_eq!(j["error"]["code"], g.status);
        match g.status {
            429 => {
                n429 += 1;
                assert_eq!(j["error"]["errors"][0]["reason"], "rateLimitExceeded");
            }
            503 => {
                n503 += 1;
                assert_eq!(j["error"]["errors"][0]["reason"], "backendError");
            }
            s => panic!("status {s}"),
        }
        if g.header("retry-after") == Some("1") {
            retry_after += 1;
        }
    }
    assert!(n429 > 0 && n503 > 0 && retry_after > 0 && retry_after < 40);
    // Control endpoint is never faulted.
    let g = get(a, "/_testbed/stats").await;
    assert_eq!(g.status, 200);
    let st: StatsSnapshot = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(st.faults.fail_429, n429);
    assert_eq!(st.faults.fail_503, n503);
    assert_eq!(st.requests.get_media, 40);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_truncate_stall() {
    let h = server(
        TestbedOptions {
            reset_rate: 1.0,
            ..Default::default()
        },
        small_source(),
    )
    .await;
    let a = h.addr();
    let g = get(a, "/storage/v1/b/bkt/o/big.bin?alt=media").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.header("content-length"), Some("4000000"));
    assert!(g.body_err.is_some(), "reset must be a body error");
    assert!(g.body.len() < 4_000_000 && !g.body.is_empty());
    println!("reset: got {} bytes, error {:?}", g.body.len(), g.body_err);
    // Metadata is not affected.
    assert_eq!(get(a, "/storage/v1/b/bkt/o/big.bin").await.status, 200);
    // A range response is cut too.
    let g = get_h(
        a,
        "/storage/v1/b/bkt/o/big.bin?alt=media",
        &[("range", "bytes=0-99999")],
    )
    .await;
    assert_eq!(g.status, 206);
    assert!(g.body_err.is_some() && g.body.len() < 100_000);
    assert_eq!(h.stats().faults.reset, 2);

    // Truncate.
    post(
        a,
        "/_testbed/faults",
        r#"{"reset_rate":0,"truncate_rate":1}"#,
    )
    .await;
    let g = get(a, "/storage/v1/b/bkt/o/files%2Fp10%2Fb.dcm?alt=media").await;
    assert_eq!(g.header("content-length"), Some("100000"));
    assert!(
        g.body.len() < 100_000 && !g.body.is_empty(),
        "{}",
        g.body.len()
    );
    assert!(g.body_err.is_some());
    println!(
        "truncate: got {} bytes, error {:?}",
        g.body.len(),
        g.body_err
    );
    assert_eq!(h.stats().faults.truncate, 1);

    // Back to normal.
    post(a, "/_testbed/faults", r#"{"truncate_rate":0}"#).await;
    let g = get(a, "/storage/v1/b/bkt/o/big.bin?alt=media").await;
    assert!(g.body_err.is_none() && g.body.len() == 4_000_000);
    h.shutdown().await;
}

/// A stalled body stops part-way for `stall_duration`, then the connection closes (measured
/// on the paused clock); a client with a shorter timeout gives up first.
#[tokio::test(start_paused = true)]
async fn stall_knob() {
    let opts = TestbedOptions {
        stall_rate: 1.0,
        stall_duration: Duration::from_millis(600),
        ..Default::default()
    };
    let h = server(opts, small_source()).await;
    let a = h.addr();
    const OBJ: &str = "/storage/v1/b/bkt/o/files%2Fp10%2Fb.dcm?alt=media";
    let g = get(a, OBJ).await;
    assert_eq!(g.status, 200);
    assert_about("stalled body", g.total, Duration::from_millis(600));
    assert!(g.body.len() < 100_000);
    assert!(g.body_err.is_some());
    assert_eq!(h.stats().faults.stall, 1);
    // A stalled body hangs: a client timeout fires first.
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_millis(300), get(a, OBJ)).await;
    assert!(r.is_err(), "stalled read should time out");
    assert_about("client timeout", t0.elapsed(), Duration::from_millis(300));
    assert_eq!(h.stats().faults.stall, 2);

    // Back to normal.
    post(a, "/_testbed/faults", r#"{"stall_rate":0}"#).await;
    let g = get(a, OBJ).await;
    assert!(g.body_err.is_none() && g.body.len() == 100_000);
    assert_about("no stall", g.total, Duration::ZERO);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_closes_connections() {
    let h = server(TestbedOptions::default(), small_source()).await;
    let a = h.addr();
    let g = post(a, "/_testbed/faults", r#"{"unavailable":true}"#).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.json()["unavailable"], true);
    let r = request(a, "GET", "/storage/v1/b/bkt", &[], "").await;
    assert!(r.is_err(), "expected a connection error");
    assert_eq!(get(a, "/_testbed/stats").await.status, 200);
    post(a, "/_testbed/faults", r#"{"unavailable":false}"#).await;
    assert_eq!(get(a, "/storage/v1/b/bkt").await.status, 200);
    // Bad knob JSON is a 400.
    assert_eq!(
        post(a, "/_testbed/faults", r#"{"fail_rate":2}"#)
            .await
            .status,
        400
    );
    assert_eq!(
        post(a, "/_testbed/faults", r#"{"bogus":1}"#).await.status,
        400
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requester_pays_knob() {
    let h = server(
        TestbedOptions {
            requester_pays: true,
            ..Default::default()
        },
        small_source(),
    )
    .await;
    let a = h.addr();
    for p in [
        "/storage/v1/b/bkt/o",
        "/storage/v1/b/bkt/o/empty",
        "/storage/v1/b/bkt/o/empty?alt=media",
    ] {
        let g = get(a, p).await;
        assert_eq!(g.status, 400, "{p}");
        let j = g.json();
        assert_eq!(
            j["error"]["message"],
            "Bucket is requester pays bucket but no user project provided."
        );
        assert_eq!(j["error"]["errors"][0]["reason"], "required");
    }
    assert_eq!(
        get(a, "/storage/v1/b/bkt/o?userProject=my-proj")
            .await
            .status,
        200
    );
    assert_eq!(
        get(a, "/storage/v1/b/bkt/o/empty?alt=media&userProject=my-proj")
            .await
            .status,
        200
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_ttl() {
    let opts = TestbedOptions {
        require_tokens: vec!["good".into(), "tok-*".into()],
        token_ttl: Some(Duration::from_millis(400)),
        ..Default::default()
    };
    let h = server(opts, small_source()).await;
    let a = h.addr();
    let g = get(a, "/storage/v1/b/bkt/o").await;
    assert_eq!(g.status, 401);
    assert_eq!(
        g.json()["error"]["message"],
        "Anonymous caller does not have storage.objects.list access to the Google Cloud Storage bucket. Permission 'storage.objects.list' denied on resource (or it may not exist)."
    );
    let g = get(a, "/storage/v1/b/bkt/o/empty?alt=media").await;
    assert_eq!(g.status, 401);
    assert!(
        g.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not have storage.objects.get access")
    );
    let g = get_h(
        a,
        "/storage/v1/b/bkt/o/empty",
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(g.status, 403);
    let msg = g.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains(" does not have storage.objects.get access "),
        "{msg}"
    );
    let g = get_h(
        a,
        "/storage/v1/b/bkt/o",
        &[("authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(g.status, 403);

    for t in ["good", "tok-1"] {
        let auth = format!("Bearer {t}");
        let g = get_h(a, "/storage/v1/b/bkt/o", &[("authorization", &auth)]).await;
        assert_eq!(g.status, 200, "{t}");
    }
    tokio::time::sleep(Duration::from_millis(450)).await;
    // Expired after TTL since first use.
    for t in ["good", "tok-1"] {
        let auth = format!("Bearer {t}");
        let g = get_h(
            a,
            "/storage/v1/b/bkt/o/empty?alt=media",
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(g.status, 401, "{t}");
        assert_eq!(g.json()["error"]["message"], "Invalid Credentials");
    }
    // A refreshed token works (its own TTL starts now).
    let g = get_h(
        a,
        "/storage/v1/b/bkt/o/empty?alt=media",
        &[("authorization", "Bearer tok-2")],
    )
    .await;
    assert_eq!(g.status, 200);
    // Forgetting first uses revives old tokens.
    post(a, "/_testbed/faults", r#"{"forget_tokens":true}"#).await;
    let g = get_h(
        a,
        "/storage/v1/b/bkt/o/empty?alt=media",
        &[("authorization", "Bearer tok-1")],
    )
    .await;
    assert_eq!(g.status, 200);
    h.shutdown().await;
}

/// A revoked token is answered 401 Invalid Credentials (as GCS answers one), though the
/// required tokens accept it; other tokens are served, and revoking nothing restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_invalid_credentials() {
    let opts = TestbedOptions {
        require_tokens: vec!["tok-*".into()],
        ..Default::default()
    };
    let h = server(opts, small_source()).await;
    let a = h.addr();
    let status = |t: &'static str| async move {
        let auth = format!("Bearer {t}");
        let g = get_h(
            a,
            "/storage/v1/b/bkt/o/empty?alt=media",
            &[("authorization", &auth)],
        )
        .await;
        let message = (g.status != 200).then(|| g.json()["error"]["message"].to_string());
        (g.status, message)
    };
    assert_eq!(status("tok-1").await.0, 200);
    post(a, "/_testbed/faults", r#"{"revoke_tokens":["tok-1"]}"#).await;
    assert_eq!(
        status("tok-1").await,
        (401, Some("\"Invalid Credentials\"".to_string()))
    );
    assert_eq!(status("tok-2").await.0, 200);
    post(a, "/_testbed/faults", r#"{"revoke_tokens":[]}"#).await;
    assert_eq!(status("tok-1").await.0, 200);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_counters() {
    let h = server(TestbedOptions::default(), small_source()).await;
    let a = h.addr();
    get(a, "/storage/v1/b/bkt/o").await;
    get(a, "/storage/v1/b/bkt/o/empty").await;
    get(a, "/storage/v1/b/bkt/o/files%2Fp10%2Fa.txt?alt=media").await;
    get(
        a,
        "/download/storage/v1/b/bkt/o/files%2Fp10%2Fa.txt?alt=media",
    )
    .await;
    get(a, "/storage/v1/b/bkt").await;
    get(a, "/what").await;
    let g = get(a, "/_testbed/stats").await;
    let j = g.json();
    assert_eq!(j["requests"]["list"], 1);
    assert_eq!(j["requests"]["get_meta"], 1);
    assert_eq!(j["requests"]["get_media"], 2);
    assert_eq!(j["requests"]["bucket"], 1);
    assert_eq!(j["requests"]["other"], 1);
    assert_eq!(j["responses"]["200"], 5);
    assert_eq!(j["responses"]["404"], 1);
    assert_eq!(j["faults"]["reset"], 0);
    assert!(j["bytes_sent"].as_u64().unwrap() >= 22);
    let g = post(a, "/_testbed/stats/reset", "").await;
    assert_eq!(g.status, 200);
    let st = h.stats();
    assert_eq!(st, StatsSnapshot::default());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_source_serves_folder() {
    let root = std::env::temp_dir().join(format!("testbed-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("bucket-a/files/p10/p10000032")).unwrap();
    std::fs::create_dir_all(root.join("bucket-b")).unwrap();
    std::fs::write(
        root.join("bucket-a/files/p10/p10000032/s1.txt"),
        b"FINDINGS: none",
    )
    .unwrap();
    std::fs::write(root.join("bucket-a/top.csv"), b"a,b\n").unwrap();
    std::fs::write(root.join("not-a-bucket.txt"), b"x").unwrap();
    let src = DirSource::new(&root).unwrap();
    assert_eq!(src.object_count(), 2);
    assert_eq!(src.buckets(), vec!["bucket-a", "bucket-b"]);
    let h = start(TestbedOptions::default(), Arc::new(src))
        .await
        .unwrap();
    let a = h.addr();
    let j = get(a, "/storage/v1/b/bucket-a/o?prefix=files/&delimiter=/")
        .await
        .json();
    assert_eq!(j["prefixes"], serde_json::json!(["files/p10/"]));
    let j = get(a, "/storage/v1/b/bucket-a/o").await.json();
    assert_eq!(j["items"][0]["name"], "files/p10/p10000032/s1.txt");
    assert_eq!(j["items"][0]["contentType"], "text/plain");
    assert_eq!(j["items"][1]["name"], "top.csv");
    let (c, _) = source::gcs_hashes(b"FINDINGS: none");
    assert_eq!(j["items"][0]["crc32c"], c);
    let g = get(
        a,
        "/storage/v1/b/bucket-a/o/files%2Fp10%2Fp10000032%2Fs1.txt?alt=media",
    )
    .await;
    assert_eq!(g.body, b"FINDINGS: none");
    let g = get_h(
        a,
        "/storage/v1/b/bucket-a/o/files%2Fp10%2Fp10000032%2Fs1.txt?alt=media",
        &[("range", "bytes=10-")],
    )
    .await;
    assert_eq!(g.status, 206);
    assert_eq!(g.body, b"none");
    assert_eq!(
        get(a, "/storage/v1/b/bucket-b/o").await.json()["kind"],
        "storage#objects"
    );
    h.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn args_parse() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        tb: TestbedArgs,
    }
    let c = Cli::try_parse_from([
        "x",
        "--addr",
        "127.0.0.1:0",
        "--model",
        "jpg",
        "--patients",
        "5",
        "--seed",
        "3",
        "--size-scale",
        "0.5",
        "--first-byte-latency",
        "30ms",
        "--bandwidth",
        "200MB/s",
        "--fail-rate",
        "0.05",
        "--reset-rate",
        "0.01",
        "--truncate-rate",
        "0.01",
        "--stall-rate",
        "0.01",
        "--stall-duration",
        "5s",
        "--requester-pays",
        "--require-token",
        "tok-1",
        "--require-token",
        "tok-2",
        "--token-ttl",
        "60s",
    ])
    .unwrap();
    assert_eq!(c.tb.model, ModelKind::Jpg);
    let o = TestbedOptions::from(&c.tb);
    assert_eq!(o.bandwidth, Some(200_000_000));
    assert_eq!(o.first_byte_latency, Duration::from_millis(30));
    assert_eq!(o.require_tokens, vec!["tok-1", "tok-2"]);
    assert_eq!(o.token_ttl, Some(Duration::from_secs(60)));
    assert_eq!(o.seed, 3);
    assert!(Cli::try_parse_from(["x", "--fail-rate", "1.5"]).is_err());
    let d = Cli::try_parse_from(["x"]).unwrap();
    assert_eq!(d.tb.addr.port(), 4443);
    assert_eq!(TestbedOptions::from(&d.tb).bandwidth, None);
}

/// Throughput of one 1 GiB read (printed, not asserted). Uses curl when available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_1gib() {
    let mut m = MemSource::new();
    m.insert_prng("bkt", "huge.bin", 1 << 30, 42);
    let h = server(TestbedOptions::default(), m).await;
    let url = format!("{}/storage/v1/b/bkt/o/huge.bin?alt=media", h.endpoint());
    let curl = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{speed_download}",
            &url,
        ])
        .output()
        .await;
    match curl {
        Ok(out) if out.status.success() => {
            let s = String::from_utf8_lossy(&out.stdout);
            let mut it = s.split_whitespace();
            let size: f64 = it.next().unwrap().parse().unwrap();
            let speed: f64 = it.next().unwrap().parse().unwrap();
            assert_eq!(size as u64, 1 << 30);
            println!("THROUGHPUT curl 1 GiB: {:.2} GB/s", speed / 1e9);
        }
        _ => {
            // Fallback: the hyper client in-process, counting bytes only.
            let t0 = Instant::now();
            let g = get(h.addr(), "/storage/v1/b/bkt/o/huge.bin?alt=media").await;
            assert_eq!(g.body.len(), 1 << 30);
            println!(
                "THROUGHPUT hyper 1 GiB: {:.2} GB/s",
                (1u64 << 30) as f64 / t0.elapsed().as_secs_f64() / 1e9
            );
        }
    }
    h.shutdown().await;
}

/// A full-scale (~605,000 objects) bucket: a listing page reads about a page of objects from
/// the source (plus those under the prefixes it collapses), never the bucket. Counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_at_full_scale() {
    let mut m = MemSource::new();
    let mut n = 0u64;
    'fill: for p in 10..20 {
        for pat in 0..6_500u64 {
            for s in 0..3 {
                for v in 0..3 {
                    m.insert_prng(
                        "mimic",
                        &format!("files/p{p}/p{p}{pat:06}/s{s}/v{v}.dcm"),
                        10,
                        n,
                    );
                    n += 1;
                    if n == 605_000 {
                        break 'fill;
                    }
                }
            }
        }
    }
    let h = server(TestbedOptions::default(), m).await;
    let a = h.addr();
    for p in [
        "/storage/v1/b/mimic/o",
        "/storage/v1/b/mimic/o?prefix=files/p15/",
        "/storage/v1/b/mimic/o?prefix=files/&delimiter=/",
        "/storage/v1/b/mimic/o?prefix=files/p19/&delimiter=/",
        "/storage/v1/b/mimic/o?startOffset=files/p17/p17003000&delimiter=/&prefix=files/p17/",
    ] {
        h.reset_stats();
        let t0 = std::time::Instant::now();
        let g = get(a, p).await;
        let el = t0.elapsed();
        let scanned = h.stats().list_scanned;
        assert_eq!(g.status, 200);
        let j = g.json();
        let ni = j.get("items").and_then(Value::as_array).map_or(0, Vec::len);
        let np = j
            .get("prefixes")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        println!("full-scale list {p}: {ni} items + {np} prefixes, {scanned} objects read, {el:?}");
        assert!(ni + np > 0 && ni + np <= 1000);
        // One batch (1,001) for the page, each item, and for each prefix the objects under
        // it up to one batch before the listing jumps past it: 60,500 under `files/pNN/`,
        // 9 under a patient's.
        let under = |pfx: &Value| match pfx.as_str().unwrap().matches('/').count() {
            2 => 1001,
            _ => 9,
        };
        let mut prefixes: Vec<&Value> = j
            .get("prefixes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        prefixes.dedup();
        let bound = 1001 + ni as u64 + prefixes.iter().map(|p| under(p)).sum::<u64>();
        assert!(
            scanned <= bound,
            "{p}: {scanned} objects read from the source for {ni} items + {np} prefixes \
             (bound {bound}; the bucket has 605,000)"
        );
        assert_eq!(prefixes.len(), np, "{p}: a prefix repeated");
    }
    let j = get(a, "/storage/v1/b/mimic/o?prefix=files/&delimiter=/")
        .await
        .json();
    assert_eq!(j["prefixes"].as_array().unwrap().len(), 10);
    assert!(j.get("nextPageToken").is_none());
    h.shutdown().await;
}

/// Same seed, same request sequence => same faults; many concurrent requests under faults stay sane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_are_deterministic_and_concurrency_is_safe() {
    let opts = TestbedOptions {
        fail_rate: 0.3,
        truncate_rate: 0.5,
        seed: 99,
        ..Default::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let h = server(opts.clone(), small_source()).await;
        let mut seq = Vec::new();
        for _ in 0..30 {
            let g = get(
                h.addr(),
                "/storage/v1/b/bkt/o/files%2Fp10%2Fb.dcm?alt=media",
            )
            .await;
            seq.push((g.status, g.body_err.is_some()));
        }
        runs.push(seq);
        h.shutdown().await;
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].iter().any(|(s, _)| *s != 200) && runs[0].iter().any(|(_, e)| *e));

    let h = server(opts, small_source()).await;
    let a = h.addr();
    let mut tasks = Vec::new();
    for i in 0..64 {
        tasks.push(tokio::spawn(async move {
            let p = if i % 2 == 0 {
                "/download/storage/v1/b/bkt/o/big.bin?alt=media"
            } else {
                "/storage/v1/b/bkt/o?prefix=files/"
            };
            get(a, p).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let g = t.await.unwrap();
        assert!([200, 429, 503].contains(&g.status));
        if g.status == 200 && g.body_err.is_none() {
            ok += 1;
        }
    }
    assert!(ok > 0);
    let st = h.stats();
    assert_eq!(st.requests.get_media + st.requests.list, 64);
    assert_eq!(
        st.faults.fail_429 + st.faults.fail_503,
        st.responses_with(429) + st.responses_with(503)
    );
    h.shutdown().await;
}

/// A request naming a model object with a multi-byte character where the model expects digits
/// is a 404 (the name is checked before it is sliced), and the server keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_names_with_multibyte_characters_are_404() {
    use crate::model::{DICOM_BUCKET, DatasetModel, ModelConfig, ModelKind};
    let m = Arc::new(DatasetModel::new(ModelConfig {
        kind: ModelKind::Dicom,
        patients: 3,
        seed: 1,
        size_scale: 0.001,
    }));
    let real = m
        .list_from("files/", 100)
        .into_iter()
        .find(|o| o.name.ends_with(".dcm"))
        .unwrap()
        .name;
    let h = start(
        TestbedOptions::default(),
        Arc::new(ModelSource::new(vec![m])),
    )
    .await
    .unwrap();
    let a = h.addr();
    // `files/p` + 21 bytes, then a 2-byte character across the end of the study id; and one in
    // the dicom id, at the same byte length.
    let across_study = format!("{}é{}", &real[..28], &real[29..]);
    let in_dicom_id = format!("{}é{}", &real[..35], &real[37..]);
    for bad in [across_study, in_dicom_id] {
        for q in ["", "?alt=media"] {
            let g = get(
                a,
                &format!("/storage/v1/b/{DICOM_BUCKET}/o/{}{q}", enc(&bad)),
            )
            .await;
            assert_eq!(
                g.status,
                404,
                "{bad}{q}: {}",
                String::from_utf8_lossy(&g.body)
            );
        }
    }
    let g = get(a, &format!("/storage/v1/b/{DICOM_BUCKET}/o/{}", enc(&real))).await;
    assert_eq!(g.status, 200);
    assert_eq!(h.stats().responses_with(404), 4);
    h.shutdown().await;
}
