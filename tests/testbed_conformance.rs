//! The testbed and fake-gcs-server, seeded from the same folder, answer the client-facing
//! JSON API calls physiofs makes the same way: listings (prefix, delimiter, paging, offsets),
//! object metadata, whole and ranged media downloads, 416 and 404s. Plain HTTP (reqwest), no
//! physiofs client code involved, and everything is also checked against the seed folder itself.
//!
//! Where the two differ by design, each one's documented behaviour is asserted instead:
//! - without `maxResults`, the testbed (like GCS) caps a page at 1,000 entries; the emulator
//!   returns everything in one page;
//! - with a delimiter, the testbed (like GCS) counts items and prefixes towards `maxResults` and
//!   never repeats a prefix; the emulator counts items only, returns every prefix on page one
//!   and repeats some on later pages.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::*;
use physiofs::model::{DatasetModel, JPG_BUCKET, ModelConfig, ModelKind, write_model_to_dir};

const CONF: &str = "conf";
const BIG: &str = "big.bin";
const BIG_LEN: usize = 3 * MIB + 123;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Emulator,
    Testbed,
}

struct Server {
    which: Which,
    endpoint: String,
}

impl Server {
    fn name(&self) -> &'static str {
        match self.which {
            Which::Emulator => "fake-gcs-server",
            Which::Testbed => "testbed",
        }
    }

    fn get(&self, path_and_query: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_get(
            &format!("{}/storage/v1{path_and_query}", self.endpoint),
            headers,
        )
    }

    fn json(&self, path_and_query: &str) -> (u16, serde_json::Value) {
        let r = self.get(path_and_query, &[]);
        (r.status, r.json())
    }

    fn media(&self, bucket: &str, name: &str, range: Option<&str>) -> HttpResponse {
        let q = format!("/b/{}/o/{}?alt=media", enc(bucket), enc(name));
        match range {
            Some(r) => self.get(&q, &[("Range", r)]),
            None => self.get(&q, &[]),
        }
    }

    /// One listing page.
    fn page(&self, bucket: &str, query: &str) -> Page {
        let (st, v) = self.json(&format!("/b/{}/o?{query}", enc(bucket)));
        assert_eq!(st, 200, "{}: list {bucket}?{query}: {v}", self.name());
        Page::from_json(&v)
    }

    /// Every page of a listing (following nextPageToken), in order.
    fn pages(&self, bucket: &str, query: &str) -> Vec<Page> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = query.to_string();
            if let Some(t) = &token {
                q += &format!("&pageToken={}", enc(t));
            }
            let p = self.page(bucket, &q);
            token = p.next.clone();
            out.push(p);
            assert!(out.len() < 10_000, "{}: endless listing", self.name());
            if token.is_none() {
                return out;
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Page {
    items: Vec<String>,
    prefixes: Vec<String>,
    next: Option<String>,
}

impl Page {
    fn from_json(v: &serde_json::Value) -> Page {
        let strs = |a: &serde_json::Value, f: &dyn Fn(&serde_json::Value) -> String| {
            a.as_array()
                .map(|a| a.iter().map(f).collect())
                .unwrap_or_default()
        };
        Page {
            items: strs(&v["items"], &|o| o["name"].as_str().unwrap().to_string()),
            prefixes: strs(&v["prefixes"], &|p| p.as_str().unwrap().to_string()),
            next: v["nextPageToken"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        }
    }
}

/// Merged, de-duplicated (items, prefixes) of a paged listing.
fn merged(pages: &[Page]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut items = BTreeSet::new();
    let mut prefixes = BTreeSet::new();
    for p in pages {
        items.extend(p.items.iter().cloned());
        prefixes.extend(p.prefixes.iter().cloned());
    }
    (items, prefixes)
}

/// What a listing of `names` with `prefix` / `delimiter` must return (GCS semantics).
fn expected(
    names: &BTreeSet<String>,
    prefix: &str,
    delim: Option<&str>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut items = BTreeSet::new();
    let mut prefixes = BTreeSet::new();
    for n in names.iter().filter(|n| n.starts_with(prefix)) {
        match delim.and_then(|d| n[prefix.len()..].find(d).map(|i| (i, d))) {
            Some((i, d)) => {
                prefixes.insert(n[..prefix.len() + i + d.len()].to_string());
            }
            None => {
                items.insert(n.clone());
            }
        }
    }
    (items, prefixes)
}

/// The seed folder: bucket `conf` (hand-made edge cases) and a small JPG dataset model.
/// Returns bucket -> (name -> content).
fn seed(dir: &Path) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let mut conf: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..1500 {
        let n = format!("many/f{i:04}");
        conf.insert(n.clone(), n.into_bytes());
    }
    for n in [
        "a.txt",
        "m.txt",
        "z/y",
        "d1/x",
        "d1/sub/deep.txt",
        "d1/sub/deeper/leaf.txt",
        "odd/with space.txt",
        "odd/ünïcødé – ✓.txt",
        "odd/a+b.txt",
        "odd/100%.txt",
        "odd/q?h#.txt",
    ] {
        conf.insert(n.to_string(), format!("content of {n}\n").into_bytes());
    }
    conf.insert("empty.bin".into(), Vec::new());
    conf.insert(BIG.into(), random_bytes(42, BIG_LEN));
    for (n, data) in &conf {
        seed_file(dir, CONF, n, data);
    }

    let model = DatasetModel::new(ModelConfig {
        kind: ModelKind::Jpg,
        patients: 6,
        seed: 3,
        size_scale: 0.005,
    });
    let jpg_dir = dir.join(JPG_BUCKET);
    let n = write_model_to_dir(&model, &jpg_dir).unwrap();
    assert_eq!(n, model.object_count());
    let mut jpg = BTreeMap::new();
    for o in model.list_from("", usize::MAX) {
        let data = std::fs::read(jpg_dir.join(&o.name)).unwrap();
        jpg.insert(o.name, data);
    }
    BTreeMap::from([(CONF.to_string(), conf), (JPG_BUCKET.to_string(), jpg)])
}

#[test]
fn testbed_and_emulator_agree_on_the_client_facing_api() {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = seed(dir.path());
    let gcs = FakeGcs::start(dir.path());
    let tb = TestbedProc::start(&[
        "--dir",
        dir.path().to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let servers = [
        Server {
            which: Which::Emulator,
            endpoint: gcs.endpoint(),
        },
        Server {
            which: Which::Testbed,
            endpoint: tb.endpoint.clone(),
        },
    ];
    let names = |b: &str| -> BTreeSet<String> { data[b].keys().cloned().collect() };

    // ---- Listing: prefix / delimiter, merged over all pages --------------------------------
    let cases: &[(&str, &str, Option<&str>)] = &[
        (CONF, "", Some("/")),
        (CONF, "", None),
        (CONF, "many/", Some("/")),
        (CONF, "many/f1", None),
        (CONF, "d1/", Some("/")),
        (CONF, "d1/", None),
        (CONF, "d1/sub/", Some("/")),
        (CONF, "odd/", Some("/")),
        (CONF, "nothing/", Some("/")),
        (CONF, "a.txt", None),
        (JPG_BUCKET, "", Some("/")),
        (JPG_BUCKET, "files/", Some("/")),
        (JPG_BUCKET, "files/p1", Some("/")),
        (JPG_BUCKET, "files/", None),
    ];
    for (bucket, prefix, delim) in cases {
        let want = expected(&names(bucket), prefix, *delim);
        let mut q = format!("prefix={}&maxResults=1000", enc(prefix));
        if let Some(d) = delim {
            q += &format!("&delimiter={}", enc(d));
        }
        let mut got = Vec::new();
        for s in &servers {
            let g = merged(&s.pages(bucket, &q));
            assert_eq!(
                g,
                want,
                "{}: listing {bucket}?{q} (merged pages) differs from the seed folder",
                s.name()
            );
            got.push(g);
        }
        assert_eq!(got[0], got[1]);
    }

    // ---- Page size without maxResults: the documented difference -------------------------
    for s in &servers {
        let p = s.page(CONF, "prefix=many/");
        match s.which {
            Which::Testbed => {
                assert_eq!(p.items.len(), 1000, "testbed: 1,000-entry cap like GCS");
                let tok = p.next.expect("testbed: a capped page has nextPageToken");
                let p2 = s.page(CONF, &format!("prefix=many/&pageToken={}", enc(&tok)));
                assert_eq!(p2.items.len(), 500);
                assert!(p2.next.is_none());
                assert_eq!(p2.items[0], "many/f1000");
            }
            Which::Emulator => {
                assert_eq!(p.items.len(), 1500, "fake-gcs-server: no page cap");
                assert!(p.next.is_none());
            }
        }
    }

    // ---- Paging with maxResults (no delimiter): identical on both ---------------------------
    let all_many: Vec<String> = names(CONF)
        .into_iter()
        .filter(|n| n.starts_with("many/"))
        .collect();
    for s in &servers {
        let pages = s.pages(CONF, "prefix=many/&maxResults=100");
        assert_eq!(
            pages.len(),
            15,
            "{}: 1,500 objects in pages of 100",
            s.name()
        );
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(p.items.len(), 100, "{}: page {i}", s.name());
            assert_eq!(
                p.next.is_some(),
                i < 14,
                "{}: nextPageToken on page {i}",
                s.name()
            );
        }
        let flat: Vec<String> = pages.iter().flat_map(|p| p.items.clone()).collect();
        assert_eq!(
            flat,
            all_many,
            "{}: paged items in order, no repeats",
            s.name()
        );
    }
    // An exact multiple, and maxResults=1.
    for s in &servers {
        let pages = s.pages(CONF, "prefix=d1/&maxResults=1");
        let flat: Vec<String> = pages.iter().flat_map(|p| p.items.clone()).collect();
        assert_eq!(
            flat,
            ["d1/sub/deep.txt", "d1/sub/deeper/leaf.txt", "d1/x"],
            "{}",
            s.name()
        );
        assert_eq!(pages.len(), 3, "{}: no empty trailing page", s.name());
    }

    // ---- Paging with a delimiter: merged results equal, page shapes as documented -----------
    let want_root = expected(&names(CONF), "", Some("/"));
    for s in &servers {
        let pages = s.pages(CONF, "delimiter=/&maxResults=2");
        assert_eq!(merged(&pages), want_root, "{}", s.name());
        match s.which {
            Which::Testbed => {
                let mut seen = BTreeSet::new();
                for p in &pages {
                    assert!(p.items.len() + p.prefixes.len() <= 2, "testbed page {p:?}");
                    for x in &p.prefixes {
                        assert!(seen.insert(x.clone()), "testbed repeated prefix {x}");
                    }
                }
                let entries = want_root.0.len() + want_root.1.len();
                assert_eq!(pages.len(), entries.div_ceil(2));
            }
            Which::Emulator => {
                for p in &pages {
                    assert!(p.items.len() <= 2, "emulator page {p:?}");
                }
                let first: BTreeSet<String> = pages[0].prefixes.iter().cloned().collect();
                assert_eq!(first, want_root.1, "emulator: every prefix on page one");
            }
        }
    }

    // ---- startOffset / endOffset ------------------------------------------------------------
    for s in &servers {
        let pages = s.pages(
            CONF,
            "prefix=many/&startOffset=many/f0500&endOffset=many/f0600&maxResults=1000",
        );
        let flat: Vec<String> = pages.iter().flat_map(|p| p.items.clone()).collect();
        assert_eq!(
            flat,
            all_many[500..600],
            "{}: startOffset/endOffset",
            s.name()
        );
    }

    // ---- Object metadata --------------------------------------------------------------------
    let jpg_names = names(JPG_BUCKET);
    let jpg_image = jpg_names
        .iter()
        .find(|n| n.ends_with(".jpg"))
        .unwrap()
        .clone();
    let meta_cases: Vec<(&str, String)> = vec![
        (CONF, "a.txt".into()),
        (CONF, "d1/sub/deeper/leaf.txt".into()),
        (CONF, "odd/with space.txt".into()),
        (CONF, "odd/ünïcødé – ✓.txt".into()),
        (CONF, "odd/a+b.txt".into()),
        (CONF, "odd/100%.txt".into()),
        (CONF, "odd/q?h#.txt".into()),
        (CONF, "empty.bin".into()),
        (CONF, BIG.into()),
        (JPG_BUCKET, jpg_image.clone()),
        (JPG_BUCKET, "mimic-cxr-2.0.0-metadata.csv.gz".into()),
        (JPG_BUCKET, "IMAGE_FILENAMES".into()),
    ];
    let mut hashes_compared = 0;
    for (bucket, name) in &meta_cases {
        let content = &data[*bucket][name];
        let mut hashes = Vec::new();
        for s in &servers {
            let (st, v) = s.json(&format!("/b/{}/o/{}", enc(bucket), enc(name)));
            assert_eq!(st, 200, "{}: metadata of {bucket}/{name}: {v}", s.name());
            assert_eq!(v["name"], name.as_str(), "{}: {v}", s.name());
            assert_eq!(v["bucket"], *bucket, "{}: {v}", s.name());
            assert_eq!(
                v["size"],
                content.len().to_string(),
                "{}: size of {name} (a string, as in GCS)",
                s.name()
            );
            let generation = v["generation"].as_str().unwrap_or("");
            assert!(
                !generation.is_empty() && generation.bytes().all(|b| b.is_ascii_digit()),
                "{}: generation of {name}: {v}",
                s.name()
            );
            hashes.push((v["md5Hash"].clone(), v["crc32c"].clone()));
        }
        // Hashes are optional; where both servers give one, it is the same.
        for i in 0..2 {
            let (a, b) = if i == 0 {
                (&hashes[0].0, &hashes[1].0)
            } else {
                (&hashes[0].1, &hashes[1].1)
            };
            if a.is_string() && b.is_string() {
                assert_eq!(a, b, "{} of {bucket}/{name}", ["md5Hash", "crc32c"][i]);
                hashes_compared += 1;
            }
        }
    }

    // Both compute md5Hash and crc32c for objects this small.
    assert_eq!(
        hashes_compared,
        2 * meta_cases.len(),
        "md5Hash/crc32c pairs compared"
    );

    // ---- alt=media, whole -------------------------------------------------------------------
    for (bucket, name) in &meta_cases {
        let content = &data[*bucket][name];
        for s in &servers {
            let r = s.media(bucket, name, None);
            assert_eq!(
                r.status,
                200,
                "{}: GET {bucket}/{name}: {}",
                s.name(),
                r.text()
            );
            assert!(
                r.body == *content,
                "{}: body of {bucket}/{name}: {} bytes, want {}",
                s.name(),
                r.body.len(),
                content.len()
            );
            if let Some(cl) = r.header("content-length") {
                assert_eq!(
                    cl,
                    content.len().to_string(),
                    "{}: Content-Length",
                    s.name()
                );
            }
        }
    }

    // ---- Ranges -----------------------------------------------------------------------------
    let big = &data[CONF][BIG];
    let n = BIG_LEN as u64;
    // (Range header, first byte, last byte)
    let ranges: Vec<(String, u64, u64)> = vec![
        ("bytes=0-0".into(), 0, 0),
        ("bytes=0-99".into(), 0, 99),
        ("bytes=1000-1048575".into(), 1000, 1_048_575),
        (format!("bytes={}-{}", n - 10, n - 1), n - 10, n - 1),
        (format!("bytes=100-{}", n + 5000), 100, n - 1), // end past EOF: clamped
        ("bytes=2097152-".into(), 2_097_152, n - 1),
        (format!("bytes={}-", n - 1), n - 1, n - 1),
        ("bytes=-1".into(), n - 1, n - 1),
        ("bytes=-4096".into(), n - 4096, n - 1),
        (format!("bytes=-{}", n + 10), 0, n - 1), // suffix longer than the object: all of it
    ];
    for (range, a, b) in &ranges {
        let mut bodies = Vec::new();
        for s in &servers {
            let r = s.media(CONF, BIG, Some(range));
            assert_eq!(r.status, 206, "{}: Range {range}: {}", s.name(), r.text());
            assert_eq!(
                r.header("content-range").as_deref(),
                Some(format!("bytes {a}-{b}/{n}").as_str()),
                "{}: Content-Range for {range}",
                s.name()
            );
            assert!(
                r.body[..] == big[*a as usize..=*b as usize],
                "{}: bytes of {range}: got {} bytes",
                s.name(),
                r.body.len()
            );
            bodies.push(r.body);
        }
        assert!(bodies[0] == bodies[1]);
    }
    // A small object with an odd name, too.
    let small = &data[CONF]["odd/a+b.txt"];
    for s in &servers {
        let r = s.media(CONF, "odd/a+b.txt", Some("bytes=3-6"));
        assert_eq!(r.status, 206, "{}", s.name());
        assert_eq!(r.body, small[3..=6], "{}", s.name());
        assert_eq!(
            r.header("content-range").as_deref(),
            Some(format!("bytes 3-6/{}", small.len()).as_str())
        );
    }

    // ---- 416 beyond EOF ---------------------------------------------------------------------
    for range in [
        format!("bytes={n}-"),
        format!("bytes={}-{}", n + 10, n + 20),
        format!("bytes={n}-{}", n + 1),
    ] {
        for s in &servers {
            let r = s.media(CONF, BIG, Some(&range));
            assert_eq!(r.status, 416, "{}: Range {range}: {}", s.name(), r.text());
        }
    }
    for s in &servers {
        let r = s.media(CONF, "empty.bin", Some("bytes=0-0"));
        assert_eq!(r.status, 416, "{}: a range of a 0-byte object", s.name());
        let r = s.media(CONF, "empty.bin", None);
        assert_eq!((r.status, r.body.len()), (200, 0), "{}", s.name());
    }

    // ---- 404s -------------------------------------------------------------------------------
    for s in &servers {
        let nb = "no-such-bucket-physiofs";
        let checks = [
            (
                "missing object metadata",
                format!("/b/{CONF}/o/{}", enc("nope/x.txt")),
            ),
            (
                "missing object media",
                format!("/b/{CONF}/o/{}?alt=media", enc("nope/x.txt")),
            ),
            (
                "missing object, prefix of others",
                format!("/b/{CONF}/o/{}", enc("many")),
            ),
            ("missing bucket metadata", format!("/b/{nb}")),
            (
                "missing bucket listing",
                format!("/b/{nb}/o?prefix=a/&delimiter=/"),
            ),
            (
                "missing bucket object",
                format!("/b/{nb}/o/{}", enc("a.txt")),
            ),
            (
                "missing bucket media",
                format!("/b/{nb}/o/{}?alt=media", enc("a.txt")),
            ),
        ];
        for (what, q) in checks {
            let r = s.get(&q, &[]);
            assert_eq!(r.status, 404, "{}: {what} ({q}): {}", s.name(), r.text());
        }
        // A listing of an existing bucket with no matches is 200 and empty, not 404.
        let p = s.page(CONF, "prefix=nothing/");
        assert!(p.items.is_empty() && p.prefixes.is_empty() && p.next.is_none());
    }

    eprintln!(
        "conformance: {} listing cases, {} objects, {} ranges on both servers in {:.2} s",
        cases.len(),
        meta_cases.len(),
        ranges.len(),
        t0.elapsed().as_secs_f64()
    );
}
