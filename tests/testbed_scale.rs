//! The testbed at full MIMIC-CXR scale (65,379 patients, 227,835 studies, 377,110 DICOMs):
//! a listing page deep inside the bucket reads about a page of objects from the model, not
//! the bucket, and the server stays small, because the model is computed, not stored. The cost
//! is the testbed's own count of objects its listings read (`list_scanned`), not a client's
//! stopwatch; the measured times are printed (see them with `--nocapture`).

mod common;

use std::time::Duration;

use common::*;
use physiofs::model::{DICOM_BUCKET, DatasetModel, FULL_PATIENTS, ModelConfig, ModelKind};

const RSS_BOUND_KIB: u64 = 200 * 1024;
/// What a listing asks of its source at a time: a page and one more.
const BATCH: u64 = 1001;

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

/// GETs `path_and_query` and returns its JSON and how many objects the testbed's listing code
/// read from the model to answer it.
fn counted_get(tb: &TestbedProc, what: &str, path_and_query: &str) -> (serde_json::Value, u64) {
    let url = format!("{}/storage/v1{path_and_query}", tb.endpoint);
    tb.reset_stats();
    let r = http_get(&url, &[]);
    assert_eq!(r.status, 200, "{what}: GET {url}: {}", r.text());
    let scanned = tb.stats()["list_scanned"]
        .as_u64()
        .expect("the testbed's stats have list_scanned");
    println!(
        "SCALE: {what}: {scanned} objects read, {:.1} ms ({} bytes)",
        r.elapsed.as_secs_f64() * 1e3,
        r.body.len()
    );
    (r.json(), scanned)
}

/// Objects of the model whose names start with one of `prefixes` (sorted, adjacent in the
/// bucket): what a delimiter page over them may read, besides one batch.
fn objects_under(model: &DatasetModel, prefixes: &[String]) -> u64 {
    let (first, last) = (&prefixes[0], &prefixes[prefixes.len() - 1]);
    let mut n = 0u64;
    let mut start = first.clone();
    loop {
        let page = model.list_from(&start, 10_000);
        let Some(end) = page
            .iter()
            .position(|o| o.name.as_str() > last.as_str() && !o.name.starts_with(last.as_str()))
        else {
            n += page.len() as u64;
            match page.last() {
                Some(o) => start = format!("{}\0", o.name),
                None => return n,
            }
            continue;
        };
        return n + end as u64;
    }
}

fn assert_scanned(what: &str, scanned: u64, bound: u64) {
    assert!(
        scanned <= bound,
        "{what}: the testbed read {scanned} objects from the model (bound {bound}; the bucket \
         has 605,000)"
    );
}

#[test]
fn full_scale_listing_reads_a_page_not_the_bucket_in_little_memory() {
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
    // The same model as the testbed's (defaults: seed 0, size scale 1), to count what is
    // under a page's prefixes.
    let model = DatasetModel::new(ModelConfig {
        kind: ModelKind::Dicom,
        patients: FULL_PATIENTS as u32,
        seed: 0,
        size_scale: 1.0,
    });

    // 1. The first page of a directory listing deep in the bucket: 1,000 patient prefixes.
    let (v, scanned) = counted_get(
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
    let under = objects_under(&model, &prefixes);
    println!("SCALE: {under} objects under the first page's 1,000 patients");
    assert_scanned("first delimiter page", scanned, BATCH + under);
    let token = v["nextPageToken"]
        .as_str()
        .expect("more than 1,000 patients under p15: nextPageToken")
        .to_string();
    let (v, scanned) = counted_get(
        &tb,
        "second page of files/p15/ with delimiter",
        &format!(
            "/b/{b}/o?prefix=files/p15/&delimiter=/&pageToken={}",
            enc(&token)
        ),
    );
    let second = names(&v, "prefixes", None);
    assert!(!second.is_empty() && second[0] > prefixes[999]);
    assert_scanned(
        "second delimiter page",
        scanned,
        BATCH + objects_under(&model, &second),
    );

    // 2. A flat page of 1,000 objects starting in the middle of the bucket.
    let start = "files/p15/p15500000/";
    let (v, scanned) = counted_get(
        &tb,
        "flat page, maxResults=1000, startOffset in the middle",
        &format!("/b/{b}/o?maxResults=1000&startOffset={}", enc(start)),
    );
    let items = names(&v, "items", Some("name"));
    assert_eq!(items.len(), 1000);
    assert_scanned("flat page", scanned, BATCH);
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
    let (v, scanned) = counted_get(&tb, "object metadata", &format!("/b/{b}/o/{}", enc(one)));
    assert_eq!(v["name"], one.as_str());
    assert_eq!(scanned, 0, "a stat lists nothing");

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
