//! Whole-tree metadata, snapshots, metrics and request economy, through a real mount of the
//! testbed serving a MIMIC-CXR-shaped DICOM model.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use physiofs::model::{DatasetModel, ModelConfig, ModelKind};

const BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";
const PATIENTS: u32 = 400;

fn count(v: &serde_json::Value, kind: &str) -> u64 {
    v["requests"][kind].as_u64().unwrap()
}

fn find_files(root: &Path) -> usize {
    let out = Command::new("find")
        .arg(root)
        .args(["-type", "f"])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout.iter().filter(|&&b| b == b'\n').count()
}

/// The first `n` objects of a `patients`-patient model of `kind` (real sizes) that `keep` picks.
fn model_objects(
    kind: ModelKind,
    patients: u32,
    n: usize,
    keep: impl Fn(&physiofs::model::ModelObject) -> bool,
) -> (DatasetModel, Vec<physiofs::model::ModelObject>) {
    let model = DatasetModel::new(ModelConfig {
        kind,
        patients,
        seed: 0,
        size_scale: 1.0,
    });
    let objects = model
        .list_from("files/", 100_000)
        .into_iter()
        .filter(|o| keep(o))
        .take(n)
        .collect();
    (model, objects)
}

/// Waits for the background bulk load's "metadata: N objects" log line.
fn wait_loaded(m: &Mount) -> String {
    let t0 = Instant::now();
    loop {
        let log = fs::read_to_string(m.stderr_path()).unwrap_or_default();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("metadata: ") && l.contains(" objects in "))
        {
            return l.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no bulk load line:\n{}",
            m.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bulk_listing_snapshot_remount_and_zero_request_browsing() {
    let model = DatasetModel::new(ModelConfig {
        kind: ModelKind::Dicom,
        patients: PATIENTS,
        seed: 0,
        size_scale: 0.001,
    });
    let objects = model.object_count();
    let tb = TestbedProc::start(&[
        "--model",
        "dicom",
        "--patients",
        "400",
        "--size-scale",
        "0.001",
        "--addr",
        "127.0.0.1:0",
    ]);
    let snapdir = tempfile::tempdir().unwrap();
    let snap = snapdir.path().to_str().unwrap();

    // Fresh mount: one bulk load, about one list request per 1,000 objects plus discovery.
    let m = Mount::start_with(&tb.mount_args(BUCKET, &["--metadata-cache", snap]), &[]);
    let line = wait_loaded(&m);
    eprintln!("METADATA: {line}");
    let listed = count(&tb.stats(), "list");
    // 1 probe + root + files/ + one range per pNN (each < 1,000 objects here) + pages.
    let budget = objects / 1000 + 1 + 2 + 10 + 2;
    assert!(
        listed <= budget,
        "{listed} list requests for {objects} objects (budget {budget})"
    );
    assert_eq!(find_files(&m.path) as u64, objects);

    // Browsing the loaded tree costs no requests at all: find, ls -l, stat, misses.
    tb.reset_stats();
    assert_eq!(find_files(&m.path) as u64, objects);
    let ls = Command::new("ls")
        .arg("-l")
        .arg(m.join("files/p10"))
        .output()
        .unwrap();
    assert!(ls.status.success());
    assert!(!m.join("files/p10/p00000000").exists());
    assert!(!m.join("no-such-file.txt").exists());
    let s = tb.stats();
    assert_eq!(
        count(&s, "list") + count(&s, "get_meta") + count(&s, "get_media"),
        0,
        "{s}"
    );
    m.unmount();

    // Remount: the snapshot makes it ready with zero listings (one metadata GET proves access).
    let snaps: Vec<_> = fs::read_dir(snapdir.path()).unwrap().flatten().collect();
    assert_eq!(snaps.len(), 1, "one snapshot file");
    tb.reset_stats();
    let m = Mount::start_with(&tb.mount_args(BUCKET, &["--metadata-cache", snap]), &[]);
    assert_eq!(find_files(&m.path) as u64, objects);
    let s = tb.stats();
    assert_eq!(count(&s, "list"), 0, "remount listed: {s}");
    assert!(count(&s, "get_meta") <= 1, "{s}");
    m.unmount();

    // A corrupt snapshot is refused and rebuilt, never trusted.
    let path = snaps[0].path();
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    tb.reset_stats();
    let m = Mount::start_with(&tb.mount_args(BUCKET, &["--metadata-cache", snap]), &[]);
    wait_loaded(&m);
    assert_eq!(find_files(&m.path) as u64, objects);
    assert!(count(&tb.stats(), "list") > 0);
    let log = fs::read_to_string(m.stderr_path()).unwrap();
    assert!(log.contains("ignoring metadata snapshot"), "{log}");
    m.unmount();
    assert!(
        fs::metadata(&path).unwrap().len() > bytes.len() as u64 / 2,
        "snapshot rewritten"
    );
}

#[test]
fn lazy_mode_lists_per_directory() {
    let tb = TestbedProc::start(&[
        "--model",
        "dicom",
        "--patients",
        "30",
        "--size-scale",
        "0.001",
        "--addr",
        "127.0.0.1:0",
    ]);
    let m = Mount::start_with(
        &tb.mount_args(BUCKET, &["--metadata", "lazy", "--metadata-cache", "off"]),
        &[],
    );
    tb.reset_stats();
    let names: Vec<_> = fs::read_dir(m.join("files")).unwrap().flatten().collect();
    assert_eq!(names.len(), 10, "p10..p19");
    let s = tb.stats();
    assert!(count(&s, "list") <= 2, "lazy listing of one directory: {s}");
}

#[test]
fn header_reads_cost_one_request_and_metrics_are_served() {
    let tb = TestbedProc::start(&[
        "--model",
        "dicom",
        "--patients",
        "20",
        "--addr",
        "127.0.0.1:0",
    ]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // `--prefetch-files 0`: these headers are read in key order, which would fetch the next
    // files' headers ahead (tested in mount_data.rs); here each read's own cost is counted.
    let m = Mount::start_with(
        &tb.mount_args(
            BUCKET,
            &[
                "--metadata-cache",
                "off",
                "--metrics-addr",
                &addr,
                "--prefetch-files",
                "0",
            ],
        ),
        &[],
    );
    let (model, dicoms) = model_objects(ModelKind::Dicom, 20, 10, |o| o.name.ends_with(".dcm"));
    // Resolve the paths first so only the reads are counted.
    for o in &dicoms {
        assert!(m.join(&o.name).exists());
    }
    tb.reset_stats();
    for o in &dicoms {
        let f = File::open(m.join(&o.name)).unwrap();
        let mut buf = vec![0u8; 16384];
        f.read_exact_at(&mut buf, 0).unwrap();
        let mut want = vec![0u8; 16384];
        model.read_at(o, 0, &mut want);
        assert_eq!(buf, want, "{}", o.name);
    }
    let s = tb.stats();
    assert_eq!(
        count(&s, "get_media"),
        dicoms.len() as u64,
        "one GET per header: {s}"
    );
    let sent = s["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < dicoms.len() as u64 * 512 * 1024,
        "header reads fetched {sent} bytes: {s}"
    );

    // A whole file read through the page cache: exact bytes, each fetched once, in no more
    // requests than the kernel's 1 MiB reads. (How much of it read-ahead fetches depends on
    // the order the kernel's concurrent requests arrive in; under load it sends the whole
    // rest of the file at once.)
    tb.reset_stats();
    let o = &dicoms[0];
    let mut all = Vec::new();
    File::open(m.join(&o.name))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, model.read_all(o));
    let s = tb.stats();
    let gets = count(&s, "get_media");
    assert!(
        gets <= o.size.div_ceil(1 << 20),
        "{gets} GETs for a {} byte file: {s}",
        o.size
    );
    let sent = s["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= o.size,
        "{sent} bytes fetched for a {} byte file",
        o.size
    );

    // The same with O_DIRECT 128 KiB reads, which reach us one at a time in order: after the
    // second, read-ahead fetches the rest in a few large requests.
    tb.reset_stats();
    let ahead_before = prometheus_metric(&addr, "prefetch_bytes_total");
    let o = &dicoms[1];
    let copy = tempfile::NamedTempFile::new().unwrap();
    let out = run_timeout(
        Command::new("dd")
            .arg(format!("if={}", m.join(&o.name).display()))
            .arg(format!("of={}", copy.path().display()))
            .args(["bs=128K", "iflag=direct", "status=none"]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(copy.path()).unwrap() == model.read_all(o),
        "dd got other bytes"
    );
    let s = tb.stats();
    let ahead = prometheus_metric(&addr, "prefetch_bytes_total") - ahead_before;
    assert!(
        ahead >= o.size / 2,
        "read-ahead fetched {ahead} of {} bytes",
        o.size
    );
    let gets = count(&s, "get_media");
    assert!(
        gets <= 8,
        "{gets} GETs for {} bytes in 128 KiB reads: {s}",
        o.size
    );

    let body = String::from_utf8(http_get(&format!("http://{addr}/metrics"), &[]).body).unwrap();
    let metric = |name: &str| prometheus_metric(&addr, name);
    assert!(metric("get_requests_total") > dicoms.len() as u64);
    assert!(metric("read_bytes_total") >= o.size + 16384 * dicoms.len() as u64);
    assert!(metric("bytes_fetched_total") >= o.size);
    assert!(metric("inodes") > 50);
    assert!(body.contains("# TYPE physiofs_cache_bytes gauge"));
}

#[test]
fn a_jpg_epoch_costs_one_request_per_file() {
    // The kernel turns a 1 MiB read(2) of a 1-2 MB JPG into concurrent FUSE reads whose
    // pieces arrive in any order: whichever comes first fetches the whole object, once.
    const JPG_BUCKET: &str = "mimic-cxr-jpg-2.1.0.physionet.org";
    let tb = TestbedProc::start(&[
        "--model",
        "jpg",
        "--patients",
        "30",
        "--addr",
        "127.0.0.1:0",
    ]);
    let addr = format!("127.0.0.1:{}", free_port());
    let m = Mount::start_with(
        &tb.mount_args(
            JPG_BUCKET,
            &[
                "--metadata-cache",
                "off",
                "--prefetch-files",
                "0",
                "--metrics-addr",
                &addr,
            ],
        ),
        &[],
    );
    let (model, jpgs) = model_objects(ModelKind::Jpg, 30, 48, |o| {
        o.name.ends_with(".jpg") && o.size > 1 << 20 && o.size <= 4 << 20
    });
    assert!(jpgs.len() >= 40, "{} JPGs of 1-4 MiB", jpgs.len());
    for o in &jpgs {
        assert!(m.join(&o.name).exists());
    }
    tb.reset_stats();
    let (mnt, jpgs_ref, model) = (&m, &jpgs, &model);
    std::thread::scope(|s| {
        for r in 0..8 {
            s.spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                for o in jpgs_ref.iter().skip(r).step_by(8) {
                    let mut f = File::open(mnt.join(&o.name)).unwrap();
                    let mut all = Vec::new();
                    loop {
                        let n = f.read(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        all.extend_from_slice(&buf[..n]);
                    }
                    assert!(all == model.read_all(o), "{}: other bytes", o.name);
                }
            });
        }
    });
    let s = tb.stats();
    let (gets, sent) = (count(&s, "get_media"), s["bytes_sent"].as_u64().unwrap());
    let total: u64 = jpgs.iter().map(|o| o.size).sum();
    // The kernel may drop a page it has just filled before the reader copies it (memory
    // pressure; this VM's host reclaims page cache proactively), and asks for it again: a
    // refill, which may cost a request of one block. The mount counts what it served.
    let refilled = prometheus_metric(&addr, "read_bytes_total") - total;
    if refilled == 0 {
        assert_eq!(gets, jpgs.len() as u64, "one GET per JPG: {s}");
        assert_eq!(sent, total, "each byte fetched once: {s}");
    } else {
        let pages = refilled.div_ceil(4096);
        eprintln!("the kernel asked again for {refilled} bytes ({pages} pages): {s}");
        assert!(
            gets <= jpgs.len() as u64 + pages,
            "one GET per JPG and per refill: {s}"
        );
        // What the refills asked for, widened to whole 32 KiB blocks at both ends.
        let extra_gets = gets.saturating_sub(jpgs.len() as u64);
        assert!(
            sent <= total + refilled + 2 * (32 << 10) * extra_gets,
            "each byte once, and the refilled pages' blocks: {s}"
        );
    }
}

/// utime + stime, in clock ticks, of the mount's threads named `comm`.
fn thread_ticks(pid: u32, comm: &str) -> Option<u64> {
    let mut found = None;
    for t in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let name = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if name.trim() == comm {
            let stat = fs::read_to_string(t.path().join("stat")).ok()?;
            let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            let ticks: u64 = f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?;
            found = Some(found.unwrap_or(0) + ticks);
        }
    }
    found
}

/// `--spin-us`: a thread spins while requests keep coming (a `find` keeps them coming) and
/// parks once they stop, so the idle mount uses no CPU; the walk is complete and exact.
#[test]
fn spin_us_spins_while_requests_come_and_parks_when_idle() {
    let tb = TestbedProc::start(&[
        "--model",
        "dicom",
        "--patients",
        "200",
        "--size-scale",
        "0.001",
        "--addr",
        "127.0.0.1:0",
    ]);
    let m = Mount::start_with(
        &tb.mount_args(BUCKET, &["--spin-us", "2000", "--metadata-cache", "off"]),
        &[],
    );
    wait_loaded(&m);
    let pid = m.pid();
    let before = thread_ticks(pid, "physiofs-spin").expect("a physiofs-spin thread");
    let (_, objects) = model_objects(ModelKind::Dicom, 200, usize::MAX, |_| true);
    // Walk until the spinner has shown CPU time (a tick is 10 ms; one walk may be shorter).
    let mut walks = 0;
    while thread_ticks(pid, "physiofs-spin").unwrap() == before {
        assert_eq!(find_files(&m.join("files")), objects.len());
        walks += 1;
        assert!(walks < 500, "the spinner used no CPU over {walks} walks");
    }
    // Idle: once parked, it uses no CPU (at most one tick at the edge).
    std::thread::sleep(Duration::from_millis(200));
    let idle0 = thread_ticks(pid, "physiofs-spin").unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let idle = thread_ticks(pid, "physiofs-spin").unwrap() - idle0;
    assert!(idle <= 1, "{idle} ticks of CPU while no request came");
    m.unmount();
}

/// The kernel forgetting what it looked up while the bulk load is still filling the tree
/// (`drop_caches` right after the first `ls`, a 30 ms testbed so the load takes a while)
/// loses nothing: the walk afterwards finds every object. A table that dropped the children
/// of directories the kernel forgot, while the load was adding them, lost thousands here.
#[test]
fn forgets_during_the_bulk_load_lose_no_entry() {
    const N: u32 = 6538;
    let tb = TestbedProc::start(&[
        "--model",
        "dicom",
        "--patients",
        &N.to_string(),
        "--size-scale",
        "0.001",
        "--first-byte-latency",
        "30ms",
        "--addr",
        "127.0.0.1:0",
    ]);
    let m = Mount::start_with(&tb.mount_args(BUCKET, &["--metadata-cache", "off"]), &[]);
    assert!(fs::read_dir(m.join("files")).unwrap().count() > 0);
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop caches (needs root)");
    wait_loaded(&m);
    let (_, objects) = model_objects(ModelKind::Dicom, N, usize::MAX, |_| true);
    assert_eq!(find_files(&m.join("files")), objects.len(), "{}", m.diag());
    m.unmount();
}

/// A snapshot that lacks objects the server has (a bucket that gained objects since, or another
/// server started on the address the snapshot was made from: an emulator on a port an earlier
/// one used, with the same bucket name) passes the mount's check, which reads one object the
/// snapshot holds. The first lookup of a name it lacks asks the server before answering
/// ENOENT: the object and the directory it lacked read exactly, a name that is truly missing
/// is still ENOENT, the snapshot is deleted, and the next mount lists afresh.
#[test]
fn a_snapshot_lacking_objects_the_server_has_is_caught_at_the_first_miss() {
    const B: &str = "grown";
    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str, data: &[u8]| {
        let p = dir.path().join(B).join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    };
    put("a/1.txt", b"one");
    put("c/x.txt", b"x");
    let snapdir = tempfile::tempdir().unwrap();
    let snap = snapdir.path().to_str().unwrap();
    let snapshots = || fs::read_dir(snapdir.path()).unwrap().count();
    let serve =
        |addr: &str| TestbedProc::start(&["--dir", dir.path().to_str().unwrap(), "--addr", addr]);

    // The first server: its tree is loaded and saved.
    let tb = serve("127.0.0.1:0");
    let addr = tb.endpoint.trim_start_matches("http://").to_string();
    let m = Mount::start_with(&tb.mount_args(B, &["--metadata-cache", snap]), &[]);
    wait_loaded(&m);
    let t0 = Instant::now();
    while snapshots() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no snapshot saved:\n{}",
            m.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    m.unmount();
    drop(tb);

    // Another server on the same address, with more objects (the old ones unchanged).
    put("a/2.txt", b"two");
    put("b/3.txt", b"three");
    let tb = serve(&addr);
    let m = Mount::start_with(&tb.mount_args(B, &["--metadata-cache", snap]), &[]);
    let log = || fs::read_to_string(m.stderr_path()).unwrap();
    assert!(log().contains("entries from snapshot"), "{}", log());
    assert_eq!(fs::read(m.join("a/1.txt")).unwrap(), b"one");
    assert_eq!(fs::read(m.join("a/2.txt")).unwrap(), b"two", "{}", m.diag());
    assert_eq!(
        fs::read(m.join("b/3.txt")).unwrap(),
        b"three",
        "{}",
        m.diag()
    );
    let err = fs::metadata(m.join("a/none.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    assert!(
        log().contains("metadata snapshot is out of date"),
        "{}",
        log()
    );
    assert_eq!(snapshots(), 0, "the stale snapshot is deleted");
    m.unmount();

    // The next mount lists afresh and shows every object.
    tb.reset_stats();
    let m = Mount::start_with(&tb.mount_args(B, &["--metadata-cache", snap]), &[]);
    wait_loaded(&m);
    assert!(count(&tb.stats(), "list") > 0);
    assert_eq!(find_files(&m.path), 4);
    m.unmount();
}
