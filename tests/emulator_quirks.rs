//! Pins down how fake-gcs-server (the emulator all mount tests run against) behaves where it
//! differs from, or is looser than, real GCS. If an emulator upgrade changes one of these, the
//! mount tests' assumptions need a look. No physiofs involved.

mod common;

use common::*;

fn names(v: &serde_json::Value) -> Vec<String> {
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|o| o["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn prefixes(v: &serde_json::Value) -> Vec<String> {
    v["prefixes"]
        .as_array()
        .map(|a| a.iter().map(|p| p.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn listing_paging_and_ignored_parameters() {
    let seed = tempfile::tempdir().unwrap();
    for i in 0..1500 {
        seed_file(seed.path(), "b", &format!("many/f{i:04}"), b"x");
    }
    seed_file(seed.path(), "b", "a.txt", b"a");
    seed_file(seed.path(), "b", "m.txt", b"m");
    seed_file(seed.path(), "b", "d1/x", b"x");
    seed_file(seed.path(), "b", "z/y", b"y");
    let gcs = FakeGcs::start(seed.path());

    // No page cap without maxResults.
    let (st, v) = gcs.get_json("/b/b/o?prefix=many/");
    assert_eq!(st, 200);
    assert_eq!(names(&v).len(), 1500);
    assert!(v["nextPageToken"].is_null());

    // maxResults=1000 pages; the token is the next object's name.
    let (_, v) = gcs.get_json("/b/b/o?prefix=many/&maxResults=1000");
    assert_eq!(names(&v).len(), 1000);
    assert_eq!(v["nextPageToken"], "many/f1000");

    // With a delimiter, maxResults counts items only: every prefix comes on page one, and
    // the prefixes sorting after the page token show again on the next page.
    let (_, v) = gcs.get_json("/b/b/o?delimiter=/&maxResults=1");
    assert_eq!(names(&v), ["a.txt"]);
    assert_eq!(prefixes(&v), ["d1/", "many/", "z/"]);
    let tok = v["nextPageToken"].as_str().unwrap().to_string();
    assert_eq!(tok, "m.txt");
    let (_, v2) = gcs.get_json(&format!(
        "/b/b/o?delimiter=/&maxResults=1&pageToken={}",
        enc(&tok)
    ));
    assert_eq!(names(&v2), ["m.txt"]);
    assert_eq!(
        prefixes(&v2),
        ["many/", "z/"],
        "prefixes repeat across pages"
    );
    assert!(v2["nextPageToken"].is_null());

    // userProject and fields are ignored: full resources come back.
    let (st, v) = gcs.get_json("/b/b/o?prefix=d1/&fields=items(name)&userProject=someproject");
    assert_eq!(st, 200);
    assert_eq!(names(&v), ["d1/x"]);
    assert!(v["items"][0]["size"].is_string(), "fields is ignored");

    // Missing bucket: 404 whose message does not name the bucket.
    let (st, v) = gcs.get_json("/b/nosuchbucket/o?maxResults=1");
    assert_eq!(st, 404);
    eprintln!("missing bucket answer: {v}");

    // Every request is in the access log.
    assert!(
        gcs.request_log()
            .iter()
            .any(|l| l.contains("userProject=someproject")),
        "{:?}",
        gcs.request_log()
    );
}

#[test]
fn odd_names_placeholders_and_ranges() {
    let seed = tempfile::tempdir().unwrap();
    let odd = [
        "odd/with space.txt",
        "odd/ünïcødé✓.txt",
        "odd/100%.txt",
        "odd/a+b.txt",
        "odd/hash#1.txt",
        "odd/what?.txt",
        "odd/pct%2F.txt",
    ];
    for (i, n) in odd.iter().enumerate() {
        seed_file(seed.path(), "b", n, format!("content {i}").as_bytes());
    }
    seed_file(seed.path(), "b", "empty.bin", b"");
    let gcs = FakeGcs::start(seed.path());
    let listed: Vec<String> = gcs.list("b", "odd/").into_iter().map(|o| o.name).collect();
    let mut want: Vec<String> = odd.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(listed, want, "names seeded from files keep every character");
    for (i, n) in odd.iter().enumerate() {
        assert_eq!(
            gcs.download("b", n),
            format!("content {i}").as_bytes(),
            "{n}"
        );
    }

    // Placeholders can only be uploaded; they list as 0-byte objects and imply a prefix.
    gcs.upload("b", "ph/", b"");
    gcs.upload("b", "ph/inner.txt", b"inner");
    gcs.upload("b", "lonely/", b"");
    let (_, v) = gcs.get_json("/b/b/o?delimiter=/");
    assert_eq!(prefixes(&v), ["lonely/", "odd/", "ph/"]);
    let (_, v) = gcs.get_json("/b/b/o?delimiter=/&prefix=ph/");
    assert_eq!(names(&v), ["ph/", "ph/inner.txt"]);
    assert_eq!(gcs.stat("b", "ph/").unwrap().size, 0);
    // Uploaded objects get the upload time, later than the seeding time.
    assert!(
        gcs.stat("b", "ph/inner.txt").unwrap().mtime()
            >= gcs.stat("b", "empty.bin").unwrap().mtime()
    );

    // Ranges: 206 with Content-Range; 416 at/after EOF and on any range of a 0-byte object.
    let url = |n: &str| format!("{}/storage/v1/b/b/o/{}?alt=media", gcs.endpoint(), enc(n));
    let get = |n: &str, range: &str| {
        let u = url(n);
        let range = range.to_string();
        block_on(async move {
            let r = reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap()
                .get(u)
                .header("Range", range)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            let cr = r
                .headers()
                .get("content-range")
                .map(|h| h.to_str().unwrap().to_string());
            (st, cr, r.bytes().await.unwrap().to_vec())
        })
    };
    let (st, cr, body) = get("odd/a+b.txt", "bytes=1-3");
    assert_eq!(
        (st, cr.as_deref(), &body[..]),
        (206, Some("bytes 1-3/9"), &b"ont"[..])
    );
    assert_eq!(get("odd/a+b.txt", "bytes=9-20").0, 416);
    assert_eq!(get("empty.bin", "bytes=0-0").0, 416);
    assert_eq!(gcs.download("b", "empty.bin"), b"");
}
