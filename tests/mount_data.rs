//! File contents through a real kernel mount: whole-file hashes, random `pread`s across the
//! read path's block boundaries, concurrent readers, and Python reading files as users do.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

const BUCKET: &str = "data";

/// Sizes around page, 1 MiB and 8 MiB block boundaries, and a ~20 MiB file.
const SIZES: &[(&str, usize)] = &[
    ("sizes/zero", 0),
    ("sizes/one", 1),
    ("sizes/s100", 100),
    ("sizes/p4095", 4095),
    ("sizes/p4096", 4096),
    ("sizes/p4097", 4097),
    ("sizes/k64", 64 * KIB),
    ("sizes/m1-1", MIB - 1),
    ("sizes/m1", MIB),
    ("sizes/m1+1", MIB + 1),
    ("sizes/m3+123", 3 * MIB + 123),
    ("sizes/m8", 8 * MIB),
    ("sizes/m8+5", 8 * MIB + 5),
    ("sizes/m20+777", 20 * MIB + 777),
];

struct Data {
    _seed: tempfile::TempDir,
    gcs: FakeGcs,
    /// Object name → content.
    files: BTreeMap<String, Arc<Vec<u8>>>,
}

fn data_bucket() -> Data {
    let seed = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    for (i, (name, size)) in SIZES.iter().enumerate() {
        files.insert(
            name.to_string(),
            Arc::new(random_bytes(100 + i as u64, *size)),
        );
    }
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..120 {
        let size = rng.random_range(0..48 * KIB);
        files.insert(
            format!("small/{:03}/s{i}.bin", i % 9),
            Arc::new(random_bytes(1000 + i, size)),
        );
    }
    for (name, data) in &files {
        seed_file(seed.path(), BUCKET, name, data);
    }
    let gcs = FakeGcs::start(seed.path());
    Data {
        _seed: seed,
        gcs,
        files,
    }
}

/// pread until `len` bytes or EOF; errors panic with the mount's diagnostics.
fn pread_full(m: &Mount, f: &File, what: &str, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!(
                "pread {what} at {} len {}: {e}\n{}",
                off + got as u64,
                len - got,
                m.diag()
            ),
        }
    }
    buf.truncate(got);
    buf
}

fn check_pread(m: &Mount, f: &File, what: &str, src: &[u8], off: u64, len: usize) {
    let got = pread_full(m, f, what, off, len);
    let start = (off as usize).min(src.len());
    let end = (off as usize).saturating_add(len).min(src.len());
    let want = &src[start..end];
    if got != want {
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "pread {what} (size {}) at {off} len {len}: got {} bytes, want {}; first differing byte at {first_diff:?}\n{}",
            src.len(),
            got.len(),
            want.len(),
            m.diag()
        );
    }
}

#[test]
fn every_file_hash_matches_source() {
    let d = data_bucket();
    let m = Mount::start(&d.gcs, BUCKET, &[]);
    for pass in 0..2 {
        for (name, data) in &d.files {
            let got = sha256_file(&m.join(name));
            assert_eq!(
                got,
                sha256_hex(data),
                "sha256 of {name} (pass {pass})\n{}",
                m.diag()
            );
            assert_eq!(
                fs::metadata(m.join(name)).unwrap().len(),
                data.len() as u64,
                "{name}"
            );
        }
    }
    // A whole file with one big read_to_end too.
    assert_eq!(
        fs::read(m.join("sizes/m8+5")).unwrap(),
        *d.files["sizes/m8+5"]
    );
    m.unmount();
}

#[test]
fn random_preads_match_source() {
    let d = data_bucket();
    let m = Mount::start(&d.gcs, BUCKET, &[]);
    let mut rng = StdRng::seed_from_u64(42);
    for name in [
        "sizes/m3+123",
        "sizes/m8+5",
        "sizes/m20+777",
        "sizes/m1",
        "sizes/p4097",
    ] {
        let src = &d.files[name];
        let n = src.len() as u64;
        let f =
            File::open(m.join(name)).unwrap_or_else(|e| panic!("open {name}: {e}\n{}", m.diag()));
        let m1 = MIB as u64;
        let m8 = 8 * MIB as u64;
        // Boundaries of 1 MiB and 8 MiB blocks, the last byte, EOF and past it.
        let mut cases: Vec<(u64, usize)> = vec![
            (0, 1),
            (0, 4096),
            (m1 - 1, 2),
            (m1 - 100, 200),
            (m1, 1),
            (2 * m1 - 3, 7),
            (m1 - 5, MIB + 10),
            (m8 - 4096, 8192),
            (m8 - 1, 1),
            (m8, 3),
            (m8 - 3 * m1 - 7, 4 * MIB),
            (7 * m1 + 5, 2 * MIB),
            (16 * m1 - 1, 2),
            (n.saturating_sub(1), 1),
            (n.saturating_sub(1), 100),
            (n.saturating_sub(4096), 8192),
            (n, 1),
            (n, 4096),
            (n + 1, 10),
            (n + 10 * m1, 10),
        ];
        for _ in 0..150 {
            let off = rng.random_range(0..n + 1000);
            let len = match rng.random_range(0..4) {
                0 => rng.random_range(1..64),
                1 => rng.random_range(1..128 * KIB),
                2 => rng.random_range(1..3 * MIB),
                _ => 4096,
            };
            cases.push((off, len));
        }
        // Backwards sequential, a pattern that defeats naive read-ahead.
        for k in (0..8u64).rev() {
            cases.push((k * n / 8, 65536));
        }
        for (off, len) in cases {
            check_pread(&m, &f, name, src, off, len);
        }
    }
    // Zero-byte files: open, read 0 bytes at 0 and beyond.
    let f = File::open(m.join("sizes/zero")).unwrap();
    assert!(pread_full(&m, &f, "zero", 0, 10).is_empty());
    assert!(pread_full(&m, &f, "zero", 4096, 10).is_empty());
    drop(f); // an open file keeps the mount busy
    m.unmount();
}

#[test]
fn concurrent_readers_get_exact_bytes() {
    let d = data_bucket();
    let m = Mount::start(&d.gcs, BUCKET, &[]);
    // Two processes hashing the same big file at once (same inode, two handles).
    for name in ["sizes/m20+777", "sizes/m8+5"] {
        let want = sha256_hex(&d.files[name]);
        let spawn = || {
            Command::new("sha256sum")
                .arg(m.join(name))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        for (i, c) in [a, b].into_iter().enumerate() {
            let out = c.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "sha256sum #{i} {name}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                m.diag()
            );
            assert_eq!(
                stdout.split_whitespace().next(),
                Some(want.as_str()),
                "sha256sum #{i} of {name}\n{}",
                m.diag()
            );
        }
    }
    // Four threads doing random preads on one shared handle, and four on their own handles.
    let path = m.join("sizes/m20+777");
    let src = d.files["sizes/m20+777"].clone();
    let shared = Arc::new(File::open(&path).unwrap());
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let src = src.clone();
            let shared = shared.clone();
            let path = path.clone();
            let m = &m;
            s.spawn(move || {
                let own = File::open(&path).unwrap();
                let f: &File = if t % 2 == 0 { &shared } else { &own };
                let mut rng = StdRng::seed_from_u64(1000 + t);
                for _ in 0..60 {
                    let off = rng.random_range(0..src.len() as u64);
                    let len = rng.random_range(1..2 * MIB);
                    check_pread(m, f, &format!("m20+777 (thread {t})"), &src, off, len);
                }
            });
        }
    });
    drop(shared);
    m.unmount();
}

/// Writes a PNG, a DICOM file and a CSV into the seed folder with the venv's libraries.
fn seed_user_formats(seed: &Path) {
    let dir = seed.join(BUCKET).join("formats");
    fs::create_dir_all(&dir).unwrap();
    let script = r#"
import sys, numpy as np, pandas as pd
from PIL import Image
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
d = sys.argv[1]
rng = np.random.default_rng(3)
img = rng.integers(0, 256, size=(300, 257), dtype=np.uint8)
Image.fromarray(img).save(f"{d}/img.png")
pd.DataFrame({"subject_id": np.arange(500), "score": rng.random(500), "label": ["a b", "ü", "x,y", "q\"t", "z"] * 100}).to_csv(f"{d}/table.csv", index=False)
meta = FileMetaDataset()
meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
meta.MediaStorageSOPInstanceUID = generate_uid()
meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds = Dataset()
ds.file_meta = meta
ds.PatientID = "p10000032"
ds.Modality = "DX"
ds.Rows, ds.Columns = 256, 320
ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
ds.PhotometricInterpretation = "MONOCHROME2"
ds.PixelData = rng.integers(0, 4096, size=(256, 320), dtype=np.uint16).tobytes()
ds.save_as(f"{d}/cxr.dcm", enforce_file_format=True)
"#;
    let out = run_timeout(
        Command::new(python()).arg("-c").arg(script).arg(&dir),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "seeding user formats with python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_reads_files_through_the_mount() {
    let seed = tempfile::tempdir().unwrap();
    seed_user_formats(seed.path());
    let mut plain = BTreeMap::new();
    for (i, size) in [0usize, 1, 4095, MIB + 17, 9 * MIB].into_iter().enumerate() {
        let name = format!("plain/f{i}.bin");
        let data = random_bytes(500 + i as u64, size);
        seed_file(seed.path(), BUCKET, &name, &data);
        plain.insert(name, sha256_hex(&data));
    }
    let gcs = FakeGcs::start(seed.path());
    let m = Mount::start(&gcs, BUCKET, &[]);

    // Plain open().read() of whole files, as most user code does.
    let script = r#"
import hashlib, os, sys
root = sys.argv[1]
for rel in sys.argv[2:]:
    with open(os.path.join(root, rel), "rb") as f:
        print(hashlib.sha256(f.read()).hexdigest(), rel)
"#;
    let out = run_timeout(
        Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(&m.path)
            .args(plain.keys()),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "python read failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.diag()
    );
    let got: BTreeMap<String, String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (h, n) = l.split_once(' ').unwrap();
            (n.to_string(), h.to_string())
        })
        .collect();
    assert_eq!(got, plain, "{}", m.diag());

    // The libraries users point at MIMIC-CXR: PIL, pydicom, pandas; compared with the seed.
    let script = r#"
import sys, numpy as np, pandas as pd, pydicom
from PIL import Image
mnt, src = sys.argv[1], sys.argv[2]
a = np.asarray(Image.open(f"{mnt}/formats/img.png")); b = np.asarray(Image.open(f"{src}/formats/img.png"))
assert a.shape == (300, 257) and (a == b).all(), "png differs"
x = pydicom.dcmread(f"{mnt}/formats/cxr.dcm"); y = pydicom.dcmread(f"{src}/formats/cxr.dcm")
assert x.PatientID == "p10000032" and (x.pixel_array == y.pixel_array).all(), "dicom differs"
h = pydicom.dcmread(f"{mnt}/formats/cxr.dcm", stop_before_pixels=True)
assert h.Rows == 256
p = pd.read_csv(f"{mnt}/formats/table.csv"); q = pd.read_csv(f"{src}/formats/table.csv")
assert p.equals(q) and len(p) == 500, "csv differs"
print("ok")
"#;
    let out = run_timeout(
        Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(&m.path)
            .arg(seed.path().join(BUCKET)),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "python format check failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        m.diag()
    );
    m.unmount();
}

/// An object stored with `Content-Encoding: gzip` (the emulator, like GCS, decompresses it on
/// download unless the client accepts gzip): the mount serves the stored bytes, whose length
/// is the listed size, whole and in ranges, and `zcat` decodes them.
#[test]
fn gzip_encoded_objects_read_as_stored() {
    use std::io::Write;
    let seed = tempfile::tempdir().unwrap();
    seed_file(seed.path(), "enc", "plain.txt", b"plain");
    let gcs = FakeGcs::start(seed.path());
    let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let stored = gz.finish().unwrap();
    let info = gcs.upload_encoded("enc", "notes.txt.gz", &stored, Some("gzip"));
    assert_eq!(info.size, stored.len() as u64);
    // The emulator does transcode (so this test means something).
    let plain = http_get(
        &format!(
            "{}/storage/v1/b/enc/o/notes.txt.gz?alt=media",
            gcs.endpoint()
        ),
        &[],
    );
    assert_eq!(plain.body, text.as_bytes(), "emulator did not transcode");

    let m = Mount::start(&gcs, "enc", &[]);
    let p = m.join("notes.txt.gz");
    assert_eq!(fs::metadata(&p).unwrap().len(), stored.len() as u64);
    assert_eq!(fs::read(&p).unwrap(), stored, "whole read");
    let f = File::open(&p).unwrap();
    let mid = stored.len() as u64 / 2;
    assert_eq!(
        pread_full(&m, &f, "gz", mid, 1000),
        stored[mid as usize..mid as usize + 1000]
    );
    drop(f);
    let out = Command::new("zcat").arg(&p).output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, text.as_bytes());
    m.unmount();
}

/// One reader going through files in sorted order (`cat` over a sorted list, as a Python or
/// R loop over `sorted(glob(...))` does): the files after the first few are fetched before
/// they are opened (`files_prefetched_total`), every byte right and each fetched once; files
/// of a bigger set read in shuffled order are not fetched ahead.
#[test]
fn sorted_walk_fetches_next_files_ahead_shuffled_does_not() {
    let seed = tempfile::tempdir().unwrap();
    let mut walk = Vec::new();
    for i in 0..40u64 {
        let name = format!("walk/p1{}/s{i:03}/{i:03}.jpg", i / 20);
        let data = random_bytes(700 + i, 200_000 + i as usize * 1000);
        seed_file(seed.path(), BUCKET, &name, &data);
        seed_file(
            seed.path(),
            BUCKET,
            &format!("walk/p1{}/s{i:03}.txt", i / 20),
            b"r",
        );
        walk.push((name, sha256_hex(&data), data.len() as u64));
    }
    let mut many = Vec::new();
    for i in 0..3000u64 {
        let name = format!("many/p{}/s{i:04}/{i:04}.jpg", i / 300);
        let data = random_bytes(9000 + i, 2000);
        seed_file(seed.path(), BUCKET, &name, &data);
        many.push((name, sha256_hex(&data), data.len() as u64));
    }
    let gcs = FakeGcs::start(seed.path());
    let run = |files: &[&(String, String, u64)]| {
        let addr = format!("127.0.0.1:{}", free_port());
        let m = Mount::start(&gcs, BUCKET, &["--metrics-addr", &addr]);
        for (name, sha, _) in files {
            assert_eq!(&sha256_file(&m.join(name)), sha, "{name}\n{}", m.diag());
        }
        let got = (
            prometheus_metric(&addr, "files_prefetched_total"),
            prometheus_metric(&addr, "bytes_fetched_total"),
        );
        m.unmount();
        got
    };
    let sorted: Vec<_> = walk.iter().collect();
    let (prefetched, fetched) = run(&sorted);
    assert!(
        prefetched >= 28,
        "only {prefetched} of 40 files fetched ahead of a sorted walk"
    );
    let total: u64 = walk.iter().map(|f| f.2).sum();
    assert_eq!(fetched, total, "each file fetched once, no report fetched");
    let mut shuffled: Vec<_> = many.iter().collect();
    shuffled.shuffle(&mut StdRng::seed_from_u64(5));
    shuffled.truncate(60);
    let (prefetched, fetched) = run(&shuffled);
    assert_eq!(prefetched, 0, "a shuffled epoch is not a walk");
    assert_eq!(fetched, shuffled.iter().map(|f| f.2).sum::<u64>());
}

/// A header scan in key order (`dcmread(f, stop_before_pixels=True)` over `sorted(glob(...))`:
/// the first 16 KiB of each DICOM, then close): from the fourth file on, the start of the next
/// files is fetched before they are opened (`headers_prefetched_total`), each header is fetched
/// once, and every byte read is the object's. The same scan in shuffled order fetches nothing
/// ahead.
#[test]
fn sorted_header_scan_fetches_next_headers_ahead_shuffled_does_not() {
    const DICOM: &str = "mimic-cxr-2.0.0.physionet.org";
    const HEAD: usize = 16 << 10;
    let tb = TestbedProc::start(&[
        "--model",
        "dicom",
        "--patients",
        "300",
        "--size-scale",
        "1",
        "--addr",
        "127.0.0.1:0",
    ]);
    let scan = |pick: &dyn Fn(Vec<String>) -> Vec<String>| {
        let addr = format!("127.0.0.1:{}", free_port());
        let args = tb.mount_args(DICOM, &["--metrics-addr", &addr]);
        let m = Mount::start_with(&args, &[]);
        let all: Vec<String> = walk(&m.join("files"))
            .into_iter()
            .filter(|(p, k)| *k == Kind::File && p.ends_with(".dcm"))
            .map(|(p, _)| format!("files/{p}"))
            .collect();
        assert!(all.len() > 500, "{} DICOMs\n{}", all.len(), m.diag());
        let files = pick(all);
        tb.reset_stats();
        for name in &files {
            let mut got = vec![0u8; HEAD];
            let mut f = File::open(m.join(name)).unwrap();
            std::io::Read::read_exact(&mut f, &mut got).unwrap();
            drop(f);
            let url = format!(
                "{}/storage/v1/b/{DICOM}/o/{}?alt=media",
                tb.endpoint,
                enc(name)
            );
            let want = http_get(&url, &[("range", &format!("bytes=0-{}", HEAD - 1))]);
            assert_eq!(got, want.body, "{name}\n{}", m.diag());
        }
        // The reference reads above are media GETs too: one per file.
        let gets = tb.stats()["requests"]["get_media"].as_u64().unwrap() - files.len() as u64;
        let ahead = prometheus_metric(&addr, "headers_prefetched_total");
        m.unmount();
        (files.len() as u64, gets, ahead)
    };
    let (n, gets, ahead) = scan(&|all| all.into_iter().take(40).collect());
    assert!(
        ahead >= 30,
        "only {ahead} of {n} headers fetched ahead of a sorted scan"
    );
    // Each header once (what the scan read, plus at most the 32 files after its last one).
    assert!(gets <= n + 32, "{gets} media GETs for {n} headers");
    let (n, gets, ahead) = scan(&|mut all| {
        all.shuffle(&mut StdRng::seed_from_u64(11));
        all.truncate(40);
        all
    });
    assert_eq!(ahead, 0, "a shuffled scan is not a walk");
    assert_eq!(gets, n, "one GET per header, nothing ahead");
}
