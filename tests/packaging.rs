//! The two ways users install physiofs, built by `scripts/package.sh` and installed for real:
//!
//! - the Debian package with `apt-get install`: `/usr/bin/physiofs`, mounted through an
//!   /etc/fstab-style line (`mount -T FSTAB MOUNTPOINT`, which runs fuse3's mount.fuse3, which
//!   finds `physiofs` on the standard PATH), and the `physiofs@.service` command lines run as
//!   systemd would run them with the packaged example env file; then `apt-get purge` leaves
//!   nothing behind;
//! - the Python wheel with `pip install` in a fresh venv: `physiofs` on the venv's PATH, and
//!   from Python `physiofs.mount(...)` as a context manager (pydicom reads through it, nothing
//!   is mounted after the block), `MountError` with physiofs's message for a bad bucket, a
//!   stale mount point reported and then cleared with `force=True`.
//!
//! Both mount the testbed (a requester-pays model of the MIMIC-CXR DICOM bucket). The package
//! is installed machine-wide, so these tests take a machine-wide lock (other test binaries or
//! checkouts on the same machine wait), and refuse to touch a `/usr/bin/physiofs` that is not
//! from this package.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "mimic-cxr-2.0.0.physionet.org";
const INSTALLED: &str = "/usr/bin/physiofs";
/// PATH as mount(8) and systemd give it to helpers and services (no test directories).
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ---------------------------------------------------------------------------------------------
// Building the packages, once, under a machine-wide lock
// ---------------------------------------------------------------------------------------------

/// Held for a whole test: `flock` on a file in the temp dir, so tests that install or look for
/// the package never overlap, in this binary or any other process on the machine.
struct MachineLock(#[allow(dead_code)] File);

fn machine_lock() -> MachineLock {
    let path = std::env::temp_dir().join("physiofs-packaging-tests.lock");
    let f = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        r,
        0,
        "flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    MachineLock(f)
}

struct Packages {
    deb: PathBuf,
    wheel: PathBuf,
}

/// `scripts/package.sh`, once per test binary. It runs `cargo build --release`, which finds
/// the build fresh: `cargo test` builds the binary with dev-dependency features merged in and
/// leaves that one at target/release/physiofs, so packaging it as it is (`--no-build`) would
/// ship the test build, and maturin's own `cargo build` would then swap the file under it.
fn packages() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| {
        let release = repo_root().join("target/release/physiofs");
        assert_eq!(
            physiofs_bin(),
            release,
            "package.sh packages the release build: run the tests with --release \
             (bash scripts/test.sh does)"
        );
        let out_dir = repo_root().join("target/package-tests");
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("scripts/package.sh"))
            .env("PHYSIOFS_PACKAGE_DIR", &out_dir)
            .current_dir(repo_root());
        // The nested cargo (cargo-deb, maturin) must see the environment a plain shell has,
        // not this test's CARGO_* variables, so it finds the release build fresh.
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str()
                && k.starts_with("CARGO_")
                && k != "CARGO_HOME"
            {
                cmd.env_remove(k);
            }
        }
        let t0 = Instant::now();
        let out = run_timeout(&mut cmd, Duration::from_secs(600));
        let (stdout, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "scripts/package.sh failed ({}); run `bash scripts/setup-test-env.sh` for cargo-deb \
             and maturin\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}",
            out.status
        );
        eprintln!(
            "packages built in {:.1} s:\n{stdout}",
            t0.elapsed().as_secs_f64()
        );
        let built: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
        let find = |ext: &str| {
            built
                .iter()
                .find(|p| p.extension().is_some_and(|e| e == ext) && p.exists())
                .unwrap_or_else(|| panic!("package.sh printed no .{ext}:\n{stdout}\n{stderr}"))
                .clone()
        };
        Packages {
            deb: find("deb"),
            wheel: find("whl"),
        }
    })
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, panicking with its output unless it exits 0; returns stdout.
fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let out = run_timeout(cmd, timeout);
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "{cmd:?} exited with {}\n---- stdout ----\n{stdout}\n---- stderr ----\n{stderr}",
        out.status
    );
    stdout
}

// ---------------------------------------------------------------------------------------------
// The Debian package
// ---------------------------------------------------------------------------------------------

fn apt_get(args: &[&str]) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// `dpkg-query -W -f=FORMAT physiofs`, or None when dpkg knows no such package.
fn dpkg_field(format: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", &format!("-f={format}"), "physiofs"])
        .stderr(Stdio::null())
        .output()
        .expect("dpkg-query (this test needs a Debian system)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn installed() -> bool {
    dpkg_field("${Status}").is_some_and(|s| s == "install ok installed")
}

/// Before installing: a `/usr/bin/physiofs` from anything but this package is not ours to
/// replace; one left installed by an earlier, interrupted run is purged.
fn preflight() {
    if Path::new(INSTALLED).exists() {
        let owner = Command::new("dpkg")
            .args(["-S", INSTALLED])
            .output()
            .unwrap();
        let owner = String::from_utf8_lossy(&owner.stdout).into_owned();
        assert!(
            owner.starts_with("physiofs: "),
            "{INSTALLED} exists and is not from the physiofs package ({owner:?}); this test \
             installs and removes the package and will not replace it: move it away first"
        );
    }
    if dpkg_field("${Status}").is_some() {
        eprintln!("purging a physiofs package left by an earlier run");
        run_ok(
            &mut apt_get(&["purge", "-y", "-q", "physiofs"]),
            Duration::from_secs(300),
        );
    }
}

/// Purges the package and detaches mounts if a test stops half-way.
struct PackageGuard {
    mounts: Vec<PathBuf>,
}

impl Drop for PackageGuard {
    fn drop(&mut self) {
        for m in &self.mounts {
            if mount_entry(m).is_some() {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        if std::thread::panicking() && dpkg_field("${Status}").is_some() {
            let _ = apt_get(&["purge", "-y", "-q", "physiofs"])
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// The first DICOM of the testbed's bucket and its bytes (through the JSON API).
fn first_dicom(tb: &TestbedProc) -> (String, Vec<u8>) {
    let list = http_get(
        &format!(
            "{}/storage/v1/b/{BUCKET}/o?prefix=files/&userProject=test-project",
            tb.endpoint
        ),
        &[],
    )
    .json();
    let name = list["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .filter_map(|i| i["name"].as_str())
                .find(|n| n.ends_with(".dcm"))
        })
        .unwrap_or_else(|| panic!("no .dcm in the testbed listing: {list}"))
        .to_string();
    let media = http_get(
        &format!(
            "{}/storage/v1/b/{BUCKET}/o/{}?alt=media&userProject=test-project",
            tb.endpoint,
            enc(&name)
        ),
        &[],
    );
    assert_eq!(media.status, 200, "GET {name}: {}", media.text());
    (name, media.body)
}

fn wait_gone(pid: i32, what: &str) {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while process_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !process_running(pid),
        "physiofs {pid} still running after {what}"
    );
}

#[test]
fn debian_package_installs_mounts_from_fstab_and_purges_cleanly() {
    let _lock = machine_lock();
    let pk = packages();
    preflight();
    let work = tempfile::Builder::new()
        .prefix("physiofs-deb-")
        .tempdir()
        .unwrap();
    let work_dir = work.path().canonicalize().unwrap();
    let mnt = work_dir.join("fstab-mnt");
    let unit_mnt = work_dir.join("unit-mnt");
    let _guard = PackageGuard {
        mounts: vec![mnt.clone(), unit_mnt.clone()],
    };

    // Install, as a user would: `apt install ./physiofs_*.deb`.
    let deb = pk.deb.to_str().unwrap();
    run_ok(
        &mut apt_get(&["install", "-y", "-q", deb]),
        Duration::from_secs(300),
    );
    assert!(installed(), "dpkg does not list physiofs as installed");
    let depends = dpkg_field("${Depends}").unwrap();
    assert!(depends.contains("fuse3"), "Depends: {depends}");
    let version = run_ok(Command::new(INSTALLED).arg("--version"), EXIT_TIMEOUT);
    assert_eq!(
        version.trim(),
        format!("physiofs {}", env!("CARGO_PKG_VERSION"))
    );
    let files = run_ok(Command::new("dpkg").args(["-L", "physiofs"]), EXIT_TIMEOUT);
    let unit = files
        .lines()
        .find(|l| l.ends_with("/systemd/system/physiofs@.service"))
        .unwrap_or_else(|| panic!("no physiofs@.service in the package:\n{files}"))
        .to_string();
    for want in [
        "/etc/physiofs/example.env",
        "/usr/share/doc/physiofs/README.md",
        "/usr/share/doc/physiofs/examples/read_dicom.py",
    ] {
        assert!(
            files.lines().any(|l| l == want) && Path::new(want).exists(),
            "{want} not installed:\n{files}"
        );
    }
    let conffiles = dpkg_field("${Conffiles}").unwrap();
    assert!(
        conffiles.contains("/etc/physiofs/example.env"),
        "the example env file must be a conffile (kept across upgrades once edited): {conffiles}"
    );
    // systemd's own checks of the unit: it reports problems as messages (its exit status
    // stays 0 for most of them), so any output is a failure.
    let verify = Command::new("systemd-analyze")
        .args(["verify", &unit])
        .output()
        .expect("systemd-analyze (Debian's systemd; scripts/setup-test-env.sh installs it)");
    let (vout, verr) = texts(&verify);
    assert!(
        verify.status.success() && vout.trim().is_empty() && verr.trim().is_empty(),
        "systemd-analyze verify {unit}:\n{vout}{verr}"
    );

    let tb = TestbedProc::start(&[
        "--addr",
        "127.0.0.1:0",
        "--patients",
        "2",
        "--requester-pays",
    ]);
    let (name, want) = first_dicom(&tb);
    let want_sha = sha256_hex(&want);

    // An fstab line as in the README, plus the testbed's endpoint and a snapshot folder;
    // mount(8) runs it with no HOME and the system PATH, as at boot.
    fs::create_dir(&mnt).unwrap();
    let fstab = work_dir.join("fstab");
    fs::write(
        &fstab,
        format!(
            "# physiofs test\ngs://{BUCKET}/files  {}  fuse.physiofs  \
             ro,_netdev,billing_project=test-project,endpoint={},anonymous,\
             metadata_cache={},log_file={}  0 0\n",
            mnt.display(),
            tb.endpoint,
            work_dir.join("snapshots").display(),
            work_dir.join("fstab-mount.log").display()
        ),
    )
    .unwrap();
    let mut mount = Command::new("mount");
    mount
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .env_clear()
        .env("PATH", SYSTEM_PATH);
    let out = run_timeout(&mut mount, Duration::from_secs(120));
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "mount -T {} failed:\n{stdout}{stderr}",
        fstab.display()
    );
    let entry = mount_entry(&mnt).unwrap_or_else(|| panic!("not mounted:\n{stdout}{stderr}"));
    assert_eq!(entry.fstype, "fuse.physiofs");
    assert_eq!(entry.source, format!("gs://{BUCKET}/files/"));
    let pid = background_pid(&format!("{stdout}{stderr}"));
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        Path::new(INSTALLED),
        "the mount must be served by the packaged binary"
    );
    let rel = name.strip_prefix("files/").unwrap();
    assert_eq!(
        sha256_file(&mnt.join(rel)),
        want_sha,
        "{rel} through the fstab mount"
    );
    run_ok(Command::new("umount").arg(&mnt), Duration::from_secs(60));
    assert_not_mounted(&mnt, "after umount");
    wait_gone(pid, "umount");

    run_unit_like_systemd(&unit, &tb, &unit_mnt, &work_dir, rel, &want_sha);

    // Purge: nothing of the package is left.
    run_ok(
        &mut apt_get(&["purge", "-y", "-q", "physiofs"]),
        Duration::from_secs(300),
    );
    assert!(!installed(), "physiofs still installed after purge");
    for gone in [
        INSTALLED,
        "/etc/physiofs",
        unit.as_str(),
        "/usr/share/doc/physiofs",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after apt-get purge");
    }
}

/// Runs the unit's ExecStartPre, ExecStart and ExecStartPost as systemd would (its variable
/// expansion, the EnvironmentFile, the system PATH and no HOME), with the packaged
/// /etc/physiofs/example.env as the env file but the mount point and options pointed at the
/// testbed; checks the mount serves once ExecStartPost returns, then stops it as
/// `systemctl stop` does (SIGTERM): exit 0, nothing mounted.
fn run_unit_like_systemd(
    unit: &str,
    tb: &TestbedProc,
    mnt: &Path,
    work: &Path,
    rel: &str,
    want_sha: &str,
) {
    let text = fs::read_to_string(unit).unwrap();
    let service = unit_section(&text, "Service");
    let env_file = service["EnvironmentFile"][0].replace("%i", "example");
    assert_eq!(env_file, "/etc/physiofs/example.env");
    let mut env = parse_env_file(&fs::read_to_string(&env_file).unwrap());
    for key in [
        "MOUNTPOINT",
        "BUCKET",
        "PHYSIOFS_BILLING_PROJECT",
        "PHYSIOFS_OPTIONS",
    ] {
        assert!(env.contains_key(key), "{env_file} sets no {key}: {env:?}");
    }
    assert_eq!(env["BUCKET"], format!("gs://{BUCKET}"));
    env.insert("MOUNTPOINT".into(), mnt.display().to_string());
    env.insert(
        "PHYSIOFS_OPTIONS".into(),
        format!(
            "--endpoint {} --anonymous --metadata-cache {}",
            tb.endpoint,
            work.join("unit-snapshots").display()
        ),
    );
    let command = |key: &str| -> Command {
        let lines = &service[key];
        assert_eq!(lines.len(), 1, "one {key}= expected: {lines:?}");
        let argv = systemd_argv(&lines[0], &env);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .envs(&env);
        cmd
    };
    run_ok(&mut command("ExecStartPre"), Duration::from_secs(30));
    assert!(mnt.is_dir(), "ExecStartPre should create {}", mnt.display());
    let log = work.join("unit.log");
    let mut main = command("ExecStart");
    main.stdin(Stdio::null())
        .stdout(File::create(&log).unwrap())
        .stderr(File::create(&log).unwrap());
    let mut child = main.spawn().expect("spawn ExecStart");
    let post = run_timeout(&mut command("ExecStartPost"), Duration::from_secs(150));
    let unit_log = || fs::read_to_string(&log).unwrap_or_default();
    assert!(
        post.status.success(),
        "ExecStartPost did not see the mount ready ({}):\n{}",
        post.status,
        unit_log()
    );
    assert_eq!(
        mount_entry(mnt).map(|e| e.fstype),
        Some("fuse.physiofs".into()),
        "{}",
        unit_log()
    );
    // The example's BUCKET is the whole bucket, so the file is under files/.
    let file = mnt.join("files").join(rel);
    assert_eq!(
        sha256_file(&file),
        want_sha,
        "{rel} through the unit's mount"
    );
    // systemctl stop: SIGTERM to the main process (KillMode=mixed).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ExecStart did not exit on SIGTERM:\n{}", unit_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "ExecStart exited with {status} on SIGTERM:\n{}",
        unit_log()
    );
    assert_not_mounted(mnt, &format!("after SIGTERM\n{}", unit_log()));
}

/// `KEY=VALUE` lines of one unit section (keys may repeat).
fn unit_section(text: &str, name: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{name}]");
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

/// systemd's EnvironmentFile= syntax, the subset the example uses: `KEY=VALUE`, comments.
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("bad env line {l:?}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A unit's command line as systemd runs it: split into words (quotes group and are
/// removed), then in each word `$$` is a literal `$` and `${NAME}` the variable's value, and a
/// word that is exactly `$NAME` becomes the value split at whitespace. (Unit specifiers such
/// as `%i` are not expected in these lines.)
fn systemd_argv(line: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    assert!(!line.contains('%'), "unexpected specifier in {line:?}");
    let mut words: Vec<String> = Vec::new();
    let mut cur: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.get_or_insert_default().push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                cur.get_or_insert_default();
            }
            (None, c) if c.is_whitespace() => words.extend(cur.take()),
            (None, c) => cur.get_or_insert_default().push(c),
        }
    }
    assert!(quote.is_none(), "unbalanced quotes in {line:?}");
    words.extend(cur.take());
    let var = |name: &str| env.get(name).cloned().unwrap_or_default();
    let mut argv = Vec::new();
    for w in words {
        if let Some(name) = w
            .strip_prefix('$')
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            argv.extend(var(name).split_whitespace().map(str::to_string));
            continue;
        }
        let mut out = String::new();
        let mut rest = w.as_str();
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            rest = &rest[i..];
            if let Some(r) = rest.strip_prefix("$$") {
                out.push('$');
                rest = r;
            } else if let Some(r) = rest.strip_prefix("${") {
                let end = r
                    .find('}')
                    .unwrap_or_else(|| panic!("unclosed ${{ in {w:?}"));
                out.push_str(&var(&r[..end]));
                rest = &r[end + 1..];
            } else {
                out.push('$');
                rest = &rest[1..];
            }
        }
        out.push_str(rest);
        argv.push(out);
    }
    argv
}

#[test]
fn systemd_command_lines_expand_like_systemd() {
    let env: BTreeMap<String, String> = [("MOUNTPOINT", "/mnt/x"), ("OPTS", "--a 1  --b")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        systemd_argv(
            r#"/bin/p mount ${MOUNTPOINT} $OPTS x${MOUNTPOINT}y $UNSET /bin/sh -c 'test "$$MOUNTPOINT"'"#,
            &env
        ),
        [
            "/bin/p",
            "mount",
            "/mnt/x",
            "--a",
            "1",
            "--b",
            "x/mnt/xy",
            "/bin/sh",
            "-c",
            "test \"$MOUNTPOINT\"",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// The Python wheel
// ---------------------------------------------------------------------------------------------

/// What the Python side does, in a fresh venv with only the wheel and pydicom; it prints one
/// JSON object for the Rust side to check.
const PY_SCRIPT: &str = r#"
import hashlib, json, os, shutil, signal, sys, time
import physiofs, pydicom

mnt, endpoint, rel, cache = sys.argv[1:5]
common = dict(billing_project="test-project", endpoint=endpoint, anonymous=True,
              metadata_cache=cache)
out = {"binary": physiofs.binary(), "which": shutil.which("physiofs")}

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False

def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

with physiofs.mount(mnt, bucket="gs://mimic-cxr-2.0.0.physionet.org", **common) as m:
    out["inside"] = {"ismount": os.path.ismount(mnt), "mounted": m.mounted, "pid": m.pid}
    path = m.path / rel
    out["sha256"] = sha(path)
    out["patient_id"] = str(pydicom.dcmread(path).PatientID)
out["after"] = {"ismount": os.path.ismount(mnt), "mounted": m.mounted}

try:
    physiofs.mount(mnt, bucket="no-such-bucket", **common)
    out["bad_bucket"] = None
except physiofs.MountError as e:
    out["bad_bucket"] = {"message": str(e), "returncode": e.returncode,
                         "ismount": os.path.ismount(mnt)}

# Stale: kill the serving process; the next mount reports it, force=True clears it.
m = physiofs.mount(mnt, **common)
os.kill(m.pid, signal.SIGKILL)
deadline = time.monotonic() + 20
while alive(m.pid) and time.monotonic() < deadline:
    time.sleep(0.02)
try:
    physiofs.mount(mnt, **common)
    out["stale"] = None
except physiofs.MountError as e:
    out["stale"] = str(e)
with physiofs.mount(mnt, force=True, **common) as m2:
    out["forced_sha256"] = sha(m2.path / rel)
    out["forced_pid"] = m2.pid
out["after_force"] = {"ismount": os.path.ismount(mnt), "mounted": m2.mounted}
print(json.dumps(out))
"#;

#[test]
fn python_wheel_installs_in_a_fresh_venv_and_mounts_from_python() {
    let _lock = machine_lock();
    let pk = packages();
    assert!(
        !Path::new(INSTALLED).exists(),
        "{INSTALLED} exists: the wheel test must find the wheel's own binary, not that one"
    );
    let work = tempfile::Builder::new()
        .prefix("physiofs-wheel-")
        .tempdir()
        .unwrap();
    let work_dir = work.path().canonicalize().unwrap();
    let mnt = work_dir.join("mnt");
    let mut guard = PackageGuard {
        mounts: vec![mnt.clone()],
    };

    // A fresh venv with nothing but the wheel (and pydicom, from PyPI).
    let venv = work_dir.join("venv");
    run_ok(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        Duration::from_secs(120),
    );
    let py = venv.join("bin/python");
    run_ok(
        Command::new(&py)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg(&pk.wheel)
            .arg("pydicom"),
        Duration::from_secs(300),
    );
    let bin = venv.join("bin/physiofs");
    let version = run_ok(Command::new(&bin).arg("--version"), EXIT_TIMEOUT);
    assert_eq!(
        version.trim(),
        format!("physiofs {}", env!("CARGO_PKG_VERSION"))
    );

    let tb = TestbedProc::start(&[
        "--addr",
        "127.0.0.1:0",
        "--patients",
        "2",
        "--requester-pays",
    ]);
    let (name, want) = first_dicom(&tb);
    let rel = name.strip_prefix("files/").unwrap();
    let script = work_dir.join("check.py");
    fs::write(&script, PY_SCRIPT).unwrap();
    let path = format!("{}:/usr/bin:/bin", venv.join("bin").display());
    let mut cmd = Command::new(&py);
    cmd.arg(&script)
        .args([
            mnt.as_os_str(),
            OsString::from(&tb.endpoint).as_os_str(),
            Path::new("files").join(rel).as_os_str(),
            work_dir.join("snapshots").as_os_str(),
        ])
        .env_clear()
        .env("PATH", &path)
        .env("HOME", &work_dir);
    let out = run_timeout(&mut cmd, Duration::from_secs(300));
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "the Python check failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("no JSON from the Python check ({e}):\n{stdout}\n{stderr}"));
    eprintln!("python: {r}");

    // The module runs the wheel's binary, which is what the venv's PATH finds.
    let bin_s = bin.to_str().unwrap();
    assert_eq!(r["binary"], bin_s, "{r}");
    assert_eq!(r["which"], bin_s, "{r}");
    // Mounted while inside the block, exact bytes, pydicom reads it; gone after the block.
    assert_eq!(r["inside"]["ismount"], true, "{r}");
    assert_eq!(r["inside"]["mounted"], true, "{r}");
    assert_eq!(r["sha256"], sha256_hex(&want), "{r}");
    let subject = rel.split('/').nth(1).unwrap().trim_start_matches('p');
    assert_eq!(r["patient_id"], subject, "PatientID vs the path {rel}: {r}");
    assert_eq!(r["after"]["ismount"], false, "{r}");
    assert_eq!(r["after"]["mounted"], false, "{r}");
    let pid = r["inside"]["pid"].as_i64().expect("the mount's process id") as i32;
    assert!(
        !process_running(pid),
        "physiofs {pid} still running after the with block"
    );
    // A bad bucket: MountError with physiofs's own message, nothing mounted.
    let bad = &r["bad_bucket"];
    let msg = bad["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no MountError: {r}"));
    assert!(
        msg.contains("no-such-bucket") && msg.contains("does not exist"),
        "MountError should carry physiofs's message: {msg}"
    );
    assert!(!msg.starts_with("physiofs: error:"), "{msg}");
    assert_eq!(bad["returncode"], 1, "{r}");
    assert_eq!(bad["ismount"], false, "{r}");
    // Stale: reported with the way out, then cleared by force=True.
    let stale = r["stale"]
        .as_str()
        .unwrap_or_else(|| panic!("stale mount not reported: {r}"));
    for want in [
        "is a stale mount",
        "Transport endpoint is not connected",
        "umount -l",
        "--force",
    ] {
        assert!(stale.contains(want), "no {want:?} in {stale}");
    }
    assert_eq!(r["forced_sha256"], sha256_hex(&want), "{r}");
    assert_eq!(r["after_force"]["mounted"], false, "{r}");
    let forced = r["forced_pid"].as_i64().unwrap() as i32;
    assert!(
        !process_running(forced),
        "physiofs {forced} still running after the with block"
    );
    assert_not_mounted(&mnt, "after the Python check");
    guard.mounts.clear();
}
