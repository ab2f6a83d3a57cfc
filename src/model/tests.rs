use super::*;
use std::collections::HashSet;
use std::time::Instant;

fn model(kind: ModelKind, patients: u32, seed: u64, size_scale: f64) -> DatasetModel {
    DatasetModel::new(ModelConfig {
        kind,
        patients,
        seed,
        size_scale,
    })
}

fn all_objects(m: &DatasetModel) -> Vec<ModelObject> {
    let mut out = Vec::new();
    let mut start = String::new();
    loop {
        let page = m.list_from(&start, 97);
        if page.is_empty() {
            break;
        }
        start = format!("{}\0", page.last().unwrap().name);
        out.extend(page);
    }
    out
}

/// Names enumerated independently of list_from, brute-force sorted.
fn brute_names(m: &DatasetModel) -> Vec<String> {
    let mut v: Vec<String> = m.top_names.iter().map(|s| s.to_string()).collect();
    for g in 0..m.pop.studies.len() {
        let st = m.study(g);
        if m.kind() == ModelKind::Dicom {
            v.push(files::report_path(st.subject, st.study));
        }
        for img in &st.images {
            v.push(files::image_path(
                st.subject,
                st.study,
                &format_dicom_id(&img.id),
                m.ext(),
            ));
        }
    }
    v.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    v
}

#[test]
fn kind_parse_display() {
    assert_eq!("dicom".parse::<ModelKind>().unwrap(), ModelKind::Dicom);
    assert_eq!("jpg".parse::<ModelKind>().unwrap(), ModelKind::Jpg);
    assert!("png".parse::<ModelKind>().is_err());
    assert_eq!(ModelKind::Dicom.to_string(), "dicom");
    assert_eq!(ModelKind::Jpg.to_string(), "jpg");
    assert_eq!(
        model(ModelKind::Dicom, 1, 0, 0.01).bucket(),
        "mimic-cxr-2.0.0.physionet.org"
    );
    assert_eq!(
        model(ModelKind::Jpg, 1, 0, 0.01).bucket(),
        "mimic-cxr-jpg-2.1.0.physionet.org"
    );
}

#[test]
fn top_names_sorted() {
    for t in [&files::DICOM_TOP[..], &files::JPG_TOP[..]] {
        let mut s = t.to_vec();
        s.sort();
        assert_eq!(s, t);
    }
}

#[test]
fn deterministic_same_seed() {
    for kind in [ModelKind::Dicom, ModelKind::Jpg] {
        let a = model(kind, 40, 7, 0.002);
        let b = model(kind, 40, 7, 0.002);
        let la = all_objects(&a);
        let lb = all_objects(&b);
        assert_eq!(la, lb);
        for o in la.iter().step_by(7) {
            assert_eq!(a.read_all(o), b.read_all(o), "{}", o.name);
        }
    }
}

#[test]
fn different_seed_different_ids() {
    let a = model(ModelKind::Dicom, 200, 1, 0.01);
    let b = model(ModelKind::Dicom, 200, 2, 0.01);
    let sa: HashSet<u32> = a.pop.subjects.iter().copied().collect();
    let sb: HashSet<u32> = b.pop.subjects.iter().copied().collect();
    assert!(sa.intersection(&sb).count() < 20);
    let na: HashSet<String> = all_objects(&a).into_iter().map(|o| o.name).collect();
    let nb: HashSet<String> = all_objects(&b).into_iter().map(|o| o.name).collect();
    assert!(na.intersection(&nb).count() <= 8); // top-level names only
}

#[test]
fn dicom_and_jpg_share_population() {
    let d = model(ModelKind::Dicom, 30, 5, 0.01);
    let j = model(ModelKind::Jpg, 30, 5, 0.01);
    let dn: Vec<String> = all_objects(&d)
        .into_iter()
        .filter(|o| o.name.ends_with(".dcm"))
        .map(|o| o.name.trim_end_matches(".dcm").to_string())
        .collect();
    let jn: Vec<String> = all_objects(&j)
        .into_iter()
        .filter(|o| o.name.ends_with(".jpg"))
        .map(|o| o.name.trim_end_matches(".jpg").to_string())
        .collect();
    assert_eq!(dn, jn);
}

/// Full scale: the real counts, a small population index, and nothing else computed at
/// construction (no study, no top-level file, no base JPEG): that is why building the
/// full-scale model is quick, checked by counts rather than by the clock.
#[test]
fn full_scale_counts_memory_and_lazy_construction() {
    let t = Instant::now();
    let m = model(ModelKind::Jpg, 65_379, 0, 1.0);
    eprintln!("full-scale construction: {:?}", t.elapsed());
    assert_eq!(
        Work::take(&m.work.studies),
        0,
        "studies computed at construction"
    );
    assert!(
        m.tops.get().is_none(),
        "top-level files built at construction"
    );
    assert!(
        m.jpeg_bases.iter().all(|b| b.get().is_none())
            && m.pixel_gens.iter().all(|g| g.get().is_none()),
        "images prepared at construction"
    );
    let m = model(ModelKind::Dicom, 65_379, 0, 1.0);
    assert_eq!(
        Work::take(&m.work.studies),
        0,
        "studies computed at construction"
    );
    assert_eq!(m.patient_count(), 65_379);
    assert_eq!(m.study_count(), 227_835);
    assert_eq!(m.image_count(), 377_110);
    assert_eq!(m.object_count(), 4 + 227_835 + 377_110);
    let p = &m.pop;
    let heap = p.subjects.capacity() * 4
        + p.subj_start.capacity() * 4
        + p.studies.capacity() * 4
        + p.img_start.capacity() * 4;
    eprintln!("population heap: {} bytes", heap);
    assert!(heap < 10_000_000);
    // uniqueness / ranges
    let subj: HashSet<u32> = p.subjects.iter().copied().collect();
    assert_eq!(subj.len(), 65_379);
    assert!(p.subjects.windows(2).all(|w| w[0] < w[1]));
    assert!(
        p.subjects
            .iter()
            .all(|&s| (10_000_032..=19_999_997).contains(&s))
    );
    let stud: HashSet<u32> = p.studies.iter().copied().collect();
    assert_eq!(stud.len(), 227_835);
    assert!(
        p.studies
            .iter()
            .all(|&s| (50_000_000..=59_999_999).contains(&s))
    );
    let mut ids = HashSet::with_capacity(377_110);
    let mut pixels = 0f64;
    let mut max_per_patient = 0;
    for si in 0..p.subjects.len() {
        max_per_patient = max_per_patient.max(p.subj_start[si + 1] - p.subj_start[si]);
    }
    for g in 0..p.studies.len() {
        let st = m.study(g);
        assert!((1..=3).contains(&st.images.len()));
        for img in &st.images {
            assert!(ids.insert(img.id));
            let (r, c) = scaled_dims(img.dims, 1.0);
            pixels += r as f64 * c as f64;
        }
    }
    let mean_mb = pixels * 2.0 / 377_110.0 / 1e6;
    eprintln!("mean DICOM pixel bytes: {mean_mb:.2} MB; max studies/patient {max_per_patient}");
    assert!((13.0..14.2).contains(&mean_mb));
}

/// A page of 1,000 entries in the middle of the full-scale bucket (227,835 studies) computes
/// the studies of that page plus a binary search for its start, never a scan: counted, so a
/// slow machine cannot fail it and a fast one cannot hide a scan.
#[test]
fn full_scale_list_touches_one_page_of_studies() {
    // Every study has at least one entry; the search for the start is ~18 probes.
    const BOUND: u64 = 1000 + 1 + 40;
    for kind in [ModelKind::Dicom, ModelKind::Jpg] {
        let m = model(kind, 65_379, 3, 1.0);
        if kind == ModelKind::Jpg {
            // JPG sizes need the (lazily encoded) base JPEGs.
            let t = Instant::now();
            m.prewarm();
            eprintln!("jpg: prewarm {:?}", t.elapsed());
        }
        Work::take(&m.work.studies);
        let t = Instant::now();
        let page = m.list_from("files/p15/", 1000);
        let studies = Work::take(&m.work.studies);
        eprintln!(
            "{kind}: list_from 1000 entries mid-bucket: {studies} studies computed in {:?} \
             (first {})",
            t.elapsed(),
            page[0].name
        );
        assert_eq!(page.len(), 1000);
        assert!(page.windows(2).all(|w| w[0].name < w[1].name));
        assert!(
            studies <= BOUND,
            "{kind}: a page of 1,000 computed {studies} studies (bound {BOUND})"
        );
        let p2 = m.list_from(&format!("{}\0", page[499].name), 1000);
        let studies = Work::take(&m.work.studies);
        assert!(studies <= BOUND, "{kind}: second page: {studies} studies");
        assert_eq!(p2[..500], page[500..]);
        let t = Instant::now();
        let first = m.list_from("", 1000);
        eprintln!(
            "{kind}: first page incl. top-level files (builds CSVs): {:?}",
            t.elapsed()
        );
        for o in first.iter().filter(|o| !o.name.starts_with("files/")) {
            eprintln!("  {} {} bytes", o.name, o.size);
        }
        let last = m.list_from("files/p19/p19999", 1000);
        assert!(!last.is_empty());
    }
}

fn check_listing(m: &DatasetModel) {
    let brute = brute_names(m);
    let listed: Vec<String> = all_objects(m).into_iter().map(|o| o.name).collect();
    assert_eq!(listed, brute);
    assert_eq!(listed.len() as u64, m.object_count());
    let next = |key: &str| -> Option<&String> {
        let i = brute.partition_point(|n| n.as_bytes() < key.as_bytes());
        brute.get(i)
    };
    let mut keys: Vec<String> = vec![
        "".into(),
        "A".into(),
        "LICENSE".into(),
        "M".into(),
        "files".into(),
        "files/".into(),
        "files/p".into(),
        "files/p1".into(),
        "files/p10/".into(),
        "files/p10/p1000".into(),
        "files/p2".into(),
        "g".into(),
        "mimic".into(),
        "zzz".into(),
        "\u{7f}".into(),
    ];
    for n in &brute {
        keys.push(n.clone());
        keys.push(format!("{n}\0"));
        keys.push(format!("{n}/"));
        keys.push(format!("{n}0"));
        for cut in [1usize, 5, 9, 12, 15, 20, 21, 23, 24, 30, 40, 60] {
            if n.len() > cut {
                keys.push(n[..n.len() - cut].to_string());
            }
        }
        // bump last char
        let mut b = n.clone().into_bytes();
        if let Some(l) = b.last_mut() {
            *l = l.wrapping_add(1).min(0x7e);
        }
        keys.push(String::from_utf8(b).unwrap());
    }
    for k in &keys {
        let got = m.list_from(k, 3);
        let i = brute.partition_point(|n| n.as_bytes() < k.as_bytes());
        let want: Vec<&String> = brute[i..].iter().take(3).collect();
        let gotn: Vec<&String> = got.iter().map(|o| &o.name).collect();
        assert_eq!(gotn, want, "start key {k:?}");
        assert_eq!(got.first().map(|o| &o.name), next(k));
    }
    // stat agrees with list; unknown names are None
    for o in all_objects(m) {
        assert_eq!(m.stat(&o.name).as_ref(), Some(&o));
    }
    for bad in [
        "",
        "files/",
        "files/p10",
        "LICENSE",
        "files/p10/p10000032/s50414267.txt",
        "README.md",
    ] {
        assert!(m.stat(bad).is_none(), "{bad}");
    }
    for n in brute.iter().filter(|n| n.starts_with("files/")).take(20) {
        assert!(m.stat(&format!("{n}x")).is_none());
        assert!(m.stat(&n.replace("files/p1", "files/p2")).is_none());
        assert!(m.stat(&n[..n.len() - 1]).is_none());
    }
}

#[test]
fn listing_matches_bruteforce_dicom() {
    check_listing(&model(ModelKind::Dicom, 25, 11, 0.001));
    check_listing(&model(ModelKind::Dicom, 1, 12, 0.001));
    check_listing(&model(ModelKind::Dicom, 0, 12, 0.001));
}

#[test]
fn listing_matches_bruteforce_jpg() {
    check_listing(&model(ModelKind::Jpg, 25, 11, 0.001));
    check_listing(&model(ModelKind::Jpg, 1, 13, 0.001));
}

#[test]
fn small_scale_proportions() {
    let m = model(ModelKind::Dicom, 1000, 9, 0.01);
    assert_eq!(m.patient_count(), 1000);
    assert_eq!(m.study_count(), (1000 * 227_835 + 65_379 / 2) / 65_379);
    assert_eq!(m.image_count(), (1000 * 377_110 + 65_379 / 2) / 65_379);
}

#[test]
fn read_at_matches_whole() {
    for kind in [ModelKind::Dicom, ModelKind::Jpg] {
        let m = model(kind, 6, 21, 0.02);
        let objs = all_objects(&m);
        let mut r = rng::SplitMix::new(99);
        for o in &objs {
            let whole = m.read_all(o);
            assert_eq!(whole.len() as u64, o.size);
            for _ in 0..30 {
                let off = r.below(o.size) as usize;
                let len = r.below((o.size as usize - off) as u64 + 1) as usize;
                let len = if r.below(2) == 0 { len.min(40) } else { len };
                let mut b = vec![0xAAu8; len];
                m.read_at(o, off as u64, &mut b);
                assert_eq!(
                    &b[..],
                    &whole[off..off + len],
                    "{} off {off} len {len}",
                    o.name
                );
            }
        }
    }
}

#[test]
fn dicom_structure() {
    let m = model(ModelKind::Dicom, 3, 4, 0.01);
    for o in all_objects(&m).iter().filter(|o| o.name.ends_with(".dcm")) {
        let b = m.read_all(o);
        assert_eq!(&b[128..132], b"DICM");
        assert!(b[..128].iter().all(|&x| x == 0));
        let st_subject = &o.name[11..19];
        let s = String::from_utf8_lossy(&b[..2000.min(b.len())]);
        assert!(s.contains(st_subject));
        // pixel values fit in 12 bits: find PixelData header
        let pos = b
            .windows(8)
            .position(|w| w == [0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0])
            .unwrap();
        let len = u32::from_le_bytes(b[pos + 8..pos + 12].try_into().unwrap()) as usize;
        assert_eq!(pos + 12 + len, b.len());
        let px = &b[pos + 12..];
        assert!(
            px.chunks_exact(2)
                .all(|c| u16::from_le_bytes([c[0], c[1]]) <= 4095)
        );
    }
}

/// Reading one image piece by piece builds its context (DICOM header, JPG layout) once and
/// then only generates the bytes asked for. Counted; the throughput is printed for
/// information only.
#[test]
fn piecewise_reads_share_one_image_context() {
    for (kind, piece, passes) in [
        (ModelKind::Dicom, 8 << 20, 4),
        (ModelKind::Jpg, 1 << 20, 20),
    ] {
        let m = model(kind, 10, 1, 1.0);
        // The first image, without building the top-level files (the JPG SHA256SUMS.txt of a
        // small model reads every image).
        let o = m
            .list_from("files/", 4)
            .into_iter()
            .find(|o| o.name.ends_with(m.ext()))
            .unwrap();
        Work::take(&m.work.image_ctxs);
        let mut buf = vec![0u8; piece];
        let (mut total, mut reads) = (0u64, 0u64);
        let t = Instant::now();
        for _ in 0..passes {
            let mut off = 0;
            while off < o.size {
                let n = ((o.size - off) as usize).min(buf.len());
                m.read_at(&o, off, &mut buf[..n]);
                off += n as u64;
                total += n as u64;
                reads += 1;
            }
        }
        eprintln!(
            "{kind} read_at: {:.2} GB/s ({} byte object, {} KiB reads)",
            total as f64 / t.elapsed().as_secs_f64() / 1e9,
            o.size,
            piece >> 10
        );
        assert!(reads > passes, "{kind}: the object fits in one read");
        assert_eq!(
            Work::take(&m.work.image_ctxs),
            1,
            "{kind}: {reads} reads of one object rebuilt its context"
        );
    }
}

#[test]
fn python_check_written_model() {
    // The test venv made by scripts/setup-test-env.sh (pydicom, pillow, pandas, numpy).
    let venv = std::env::var_os("PHYSIOFS_VENV")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `bash scripts/setup-test-env.sh` (or scripts/test.sh)",
        py.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/check_model.py");
    for kind in [ModelKind::Dicom, ModelKind::Jpg] {
        let dir = std::env::temp_dir().join(format!(
            "physiofs-model-check-{kind}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let m = model(kind, 12, 77, 0.01);
        let n = write_model_to_dir(&m, &dir).unwrap();
        assert_eq!(n, m.object_count());
        let out = std::process::Command::new(&py)
            .arg(&script)
            .arg(&dir)
            .arg(kind.to_string())
            .output()
            .unwrap();
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "check_model.py failed for {kind}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `(rows, cols, components)` of a JPEG's baseline frame header (SOF0), walking the marker
/// segments from SOI; panics naming what is wrong.
fn jpeg_frame(b: &[u8]) -> (u32, u32, u8) {
    assert_eq!(b[..2], [0xFF, 0xD8], "no SOI");
    assert_eq!(b[b.len() - 2..], [0xFF, 0xD9], "no EOI at the end");
    let mut i = 2;
    loop {
        assert_eq!(b[i], 0xFF, "no marker at byte {i}");
        let (marker, len) = (b[i + 1], u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize);
        assert_ne!(marker, 0xDA, "SOS before any SOF0");
        if marker == 0xC0 {
            let rows = u16::from_be_bytes([b[i + 5], b[i + 6]]) as u32;
            let cols = u16::from_be_bytes([b[i + 7], b[i + 8]]) as u32;
            return (rows, cols, b[i + 9]);
        }
        i += 2 + len;
    }
}

/// Each base JPEG is a baseline grayscale JPEG of its variant's dimensions, its insertion
/// point is right after the JFIF APP0 segment, and it is smaller than the smallest size an
/// object of that variant aims at (70% of the mean bytes per pixel), so the padding, not the
/// encoder, sets every full-scale object's size.
#[test]
fn base_jpegs_have_their_dims_and_fit_under_every_target() {
    for i in 0..attrs::DIMS.len() {
        let (r, c) = scaled_dims(i, 1.0);
        let t = Instant::now();
        let b = jpeg::encode_base(r, c);
        eprintln!(
            "base jpeg {r}x{c}: {} bytes in {:?}",
            b.bytes.len(),
            t.elapsed()
        );
        assert_eq!(jpeg_frame(&b.bytes), (r, c, 1), "variant {i}");
        assert_eq!(
            &b.bytes[2..4],
            [0xFF, 0xE0],
            "variant {i}: no APP0 after SOI"
        );
        assert_eq!(&b.bytes[6..11], b"JFIF\0", "variant {i}: APP0 is not JFIF");
        let app0_end = 4 + u16::from_be_bytes([b.bytes[4], b.bytes[5]]) as usize;
        assert_eq!(b.ins, app0_end, "variant {i}: padding goes after APP0");
        assert_eq!(
            b.bytes[b.ins], 0xFF,
            "variant {i}: insertion point is not a marker"
        );
        let smallest_target = jpeg::BYTES_PER_PIXEL * r as f64 * c as f64 * 0.7;
        assert!(
            (b.bytes.len() as f64) < smallest_target - jpeg::MIN_PAD as f64,
            "variant {i}: base {} bytes >= smallest target {smallest_target:.0}",
            b.bytes.len()
        );
    }
}

#[test]
fn sha256sums_coverage() {
    use sha2::{Digest, Sha256};
    // Small JPG model: every object except SHA256SUMS.txt itself.
    let m = model(ModelKind::Jpg, 5, 3, 0.001);
    assert!(m.object_count() <= SHA256_ALL_MAX_OBJECTS);
    let objs = all_objects(&m);
    let sums = String::from_utf8(m.read_all(&m.stat("SHA256SUMS.txt").unwrap())).unwrap();
    let lines: Vec<&str> = sums.lines().collect();
    assert_eq!(lines.len(), objs.len() - 1);
    for o in objs.iter().filter(|o| o.name != "SHA256SUMS.txt") {
        let want = format!("{}  {}", hex(&Sha256::digest(m.read_all(o))), o.name);
        assert!(lines.contains(&want.as_str()), "{}", o.name);
    }
    // Large JPG model and any DICOM model: the other top-level files only.
    for m in [
        model(ModelKind::Jpg, 400, 3, 0.0001),
        model(ModelKind::Dicom, 5, 3, 0.001),
    ] {
        let sums = String::from_utf8(m.read_all(&m.stat("SHA256SUMS.txt").unwrap())).unwrap();
        let names: Vec<&str> = sums
            .lines()
            .map(|l| l.split_once("  ").unwrap().1)
            .collect();
        let want: Vec<&str> = m
            .top_names
            .iter()
            .copied()
            .filter(|n| *n != "SHA256SUMS.txt")
            .collect();
        assert_eq!(names, want);
    }
}

/// Object names come from requests: `stat` must refuse a malformed one, never panic on it. A
/// multi-byte character across a fixed field boundary (`é` at bytes 21..23 after `files/p`,
/// across the end of the study id; or inside the dicom id, at the same byte length) once
/// panicked in a slice taken before the bytes were checked.
#[test]
fn stat_refuses_names_with_multibyte_characters_anywhere() {
    let m = model(ModelKind::Dicom, 5, 3, 0.001);
    let objs = all_objects(&m);
    let image = objs.iter().find(|o| o.name.ends_with(".dcm")).unwrap();
    let report = objs.iter().find(|o| o.name.ends_with(".txt")).unwrap();
    for base in [image.name.as_str(), report.name.as_str()] {
        let chars: Vec<char> = base.chars().collect();
        for i in 0..chars.len() {
            for c in ['é', '€', '😀'] {
                // In place of as many ASCII characters as it has bytes (same byte length), in
                // place of one, and inserted.
                let w = c.len_utf8();
                let edits = [(i, (i + w).min(chars.len())), (i, i + 1), (i, i)];
                for (a, z) in edits {
                    let mut v = chars.clone();
                    v.splice(a..z, [c]);
                    let bad: String = v.iter().collect();
                    assert_eq!(m.stat(&bad), None, "{bad}");
                }
            }
        }
    }
    assert_eq!(m.stat("files/p10/p10000032/s5041426é.txt"), None);
    assert_eq!(m.stat("files/p10/p10000032/s5041426é/x.dcm"), None);
}
