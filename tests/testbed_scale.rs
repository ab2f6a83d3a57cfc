//! The testbed at full MIMIC-CXR scale (65,379 patients, 227,835 studies, 377,110 DICOMs):
//! listing pages deep inside the bucket answer quickly and the server stays small, because the
//! model is computed, not stored. Prints the measured numbers (see them with `--nocapture`).

mod common;

use std::time::Duration;

use common::*;
use physiofs::model::{DICOM_BUCKET, FULL_PATIENTS};

/// Generous: a page takes milliseconds in practice.
const PAGE_BOUND: Duration = Duration::from_secs(5);
const RSS_BOUND_KIB: u64 = 200 * 1024;

fn names(v: &serde_json::Value, key: &str, field: Option<&str>) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| match field {
                    Some(f) => x[f].as_str().unwrap().to_string(),
                    None => x.as_str().unwrap().to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn timed_get(tb: &TestbedProc, what: &str, path_and_query: &str) -> serde_json::Value {
    let url = format!("{}/storage/v1{path_and_query}", tb.endpoint);
    let r = http_get(&url, &[]);
    assert_eq!(r.status, 200, "{what}: GET {url}: {}", r.text());
    println!(
        "SCALE: {what}: {:.1} ms ({} bytes)",
        r.elapsed.as_secs_f64() * 1e3,
        r.body.len()
    );
    assert!(
        r.elapsed < PAGE_BOUND,
        "{what} took {:?} (bound {PAGE_BOUND:?}): GET {url}",
        r.elapsed
    );
    r.json()
}

#[test]
fn full_scale_dicom_model_lists_fast_in_little_memory() {
    let patients = FULL_PATIENTS.to_string();
    let tb = TestbedProc::start_timeout(
        &[
            "--model",
            "dicom",
            "--patients",
            &patients,
            "--addr",
            "127.0.0.1:0",
        ],
        Duration::from_secs(180),
    );
    println!(
        "SCALE: testbed with {patients} patients listening after {:.2} s; {}",
        tb.startup.as_secs_f64(),
        memory_report(tb.pid())
    );
    let b = DICOM_BUCKET;

    // 1. The first page of a directory listing deep in the bucket: 1,000 patient prefixes.
    let v = timed_get(
        &tb,
        "first page of files/p15/ with delimiter",
        &format!("/b/{b}/o?prefix=files/p15/&delimiter=/"),
    );
    let prefixes = names(&v, "prefixes", None);
    assert_eq!(
        prefixes.len(),
        1000,
        "a full page of patient folders (p15 has thousands)"
    );
    assert!(names(&v, "items", Some("name")).is_empty());
    for p in &prefixes {
        let id = p
            .strip_prefix("files/p15/p")
            .and_then(|r| r.strip_suffix('/'))
            .unwrap_or_else(|| panic!("prefix {p}"));
        assert!(
            id.len() == 8 && id.starts_with("15") && id.bytes().all(|c| c.is_ascii_digit()),
            "prefix {p}"
        );
    }
    assert!(prefixes.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    let token = v["nextPageToken"]
        .as_str()
        .expect("more than 1,000 patients under p15: nextPageToken")
        .to_string();
    let v = timed_get(
        &tb,
        "second page of files/p15/ with delimiter",
        &format!(
            "/b/{b}/o?prefix=files/p15/&delimiter=/&pageToken={}",
            enc(&token)
        ),
    );
    let second = names(&v, "prefixes", None);
    assert!(!second.is_empty() && second[0] > prefixes[999]);

    // 2. A flat page of 1,000 objects starting in the middle of the bucket.
    let start = "files/p15/p15500000/";
    let v = timed_get(
        &tb,
        "flat page, maxResults=1000, startOffset in the middle",
        &format!("/b/{b}/o?maxResults=1000&startOffset={}", enc(start)),
    );
    let items = names(&v, "items", Some("name"));
    assert_eq!(items.len(), 1000);
    assert!(items[0].as_str() >= start, "first item {}", items[0]);
    assert!(items.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    assert!(items.iter().any(|n| n.ends_with(".dcm")) && items.iter().any(|n| n.ends_with(".txt")));
    let sizes: Vec<u64> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["name"].as_str().unwrap().ends_with(".dcm"))
        .map(|o| o["size"].as_str().unwrap().parse().unwrap())
        .collect();
    let mean = sizes.iter().sum::<u64>() as f64 / sizes.len() as f64;
    assert!(
        (5e6..30e6).contains(&mean),
        "full-size DICOMs average ~13.6 MB, got {mean:.0}"
    );
    assert!(v["nextPageToken"].is_string());

    // 3. The object metadata of one of them (the mount's stat path).
    let one = items.iter().find(|n| n.ends_with(".dcm")).unwrap();
    let v = timed_get(&tb, "object metadata", &format!("/b/{b}/o/{}", enc(one)));
    assert_eq!(v["name"], one.as_str());

    let rss = rss_kib(tb.pid()).expect("testbed still running");
    println!(
        "SCALE: testbed VmRSS after the requests: {:.1} MiB (bound {} MiB); {}",
        rss as f64 / 1024.0,
        RSS_BOUND_KIB / 1024,
        memory_report(tb.pid())
    );
    assert!(
        rss < RSS_BOUND_KIB,
        "testbed VmRSS {rss} KiB >= {RSS_BOUND_KIB} KiB at full scale"
    );
    let mut tb = tb;
    tb.proc.assert_alive();
}
