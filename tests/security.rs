//! A hostile or broken server, and a hostile local user, against the client and the mount.
//!
//! Each test plays the attacker: a tiny loopback server answering what no real GCS would
//! (an endless error body, a body that drips, a redirect, endless page tokens), or a local
//! user planting files where a root mount writes. Each shows the mount fails safe: memory
//! within its bound, an error within the retry budget, no token sent, nothing written
//! outside physiofs's own files.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use physiofs::client::auth::TokenSource;
use physiofs::client::gcs::{GcsClient, GcsConfig, HttpProtocol, RetryConfig};
use physiofs::client::{ObjectClient, ObjectVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the fake server does with each request after reading its headers.
#[derive(Clone, Copy)]
enum Answer {
    /// 503 with a chunked body that never ends (stops at `LIMIT` bytes).
    EndlessError,
    /// 503 with a chunked body of one byte every 50 ms, forever.
    DrippingError,
    /// A media answer (206 for the asked range, or 200 for all of `DRIP_SIZE`) whose body
    /// comes a byte every 20 ms: it never stalls, and `hang_up` bytes in the server closes
    /// the connection (so every attempt makes progress), if set.
    DrippingMedia { hang_up: Option<u64> },
    /// 302 to the same path on another port.
    Redirect(u16),
    /// 200 with an empty body (a server that only counts what it is asked).
    Empty,
}

/// More than any bound of the client, so a client without one is caught reading it all.
const LIMIT: u64 = 512 << 20;

/// A loopback HTTP/1.1 server; records the request heads it saw and, per connection, how
/// many body bytes it wrote before the client hung up.
struct Hostile {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    sent: Arc<Mutex<Vec<u64>>>,
}

impl Hostile {
    async fn start(answer: Answer) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (heads.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let (h, s) = (h.clone(), s.clone());
                tokio::spawn(async move {
                    let n = serve(conn, answer, &h).await;
                    s.lock().unwrap().push(n);
                });
            }
        });
        Hostile { port, heads, sent }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until `n` connections have ended, and returns their byte counts.
    async fn connections(&self, n: usize) -> Vec<u64> {
        for _ in 0..600 {
            if self.sent.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.sent.lock().unwrap().clone()
    }
}

/// Reads one request head, answers it; returns the body bytes written.
async fn serve(mut conn: TcpStream, answer: Answer, heads: &Mutex<Vec<String>>) -> u64 {
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut b).await {
            Ok(0) | Err(_) => return 0,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    let simple = match answer {
        Answer::Redirect(port) => Some(format!(
            "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{port}/storage/v1/b/b/o/x\r\n\
             content-length: 0\r\n\r\n"
        )),
        Answer::Empty => Some("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_string()),
        _ => None,
    };
    if let Some(a) = simple {
        let _ = conn.write_all(a.as_bytes()).await;
        return 0;
    }
    if let Answer::DrippingMedia { hang_up } = answer {
        return drip_media(conn, &String::from_utf8_lossy(&head), hang_up).await;
    }
    let start = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
                  transfer-encoding: chunked\r\n\r\n";
    if conn.write_all(start).await.is_err() {
        return 0;
    }
    let mut sent = 0u64;
    match answer {
        Answer::EndlessError => {
            let data = vec![b'x'; 64 << 10];
            let mut chunk = format!("{:x}\r\n", data.len()).into_bytes();
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            while sent < LIMIT {
                if conn.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += data.len() as u64;
            }
        }
        Answer::Redirect(_) | Answer::Empty | Answer::DrippingMedia { .. } => unreachable!(),
        Answer::DrippingError => loop {
            if conn.write_all(b"1\r\nx\r\n").await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    }
    sent
}

/// Size of the object `DrippingMedia` serves.
const DRIP_SIZE: u64 = 1 << 20;

/// Answers a media request a byte at a time (see `Answer::DrippingMedia`).
async fn drip_media(mut conn: TcpStream, head: &str, hang_up: Option<u64>) -> u64 {
    let range = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        let v = v.trim().strip_prefix("bytes=")?;
        let (a, b) = v.split_once('-')?;
        k.eq_ignore_ascii_case("range")
            .then(|| (a.parse::<u64>().ok(), b.parse::<u64>().ok()))
    });
    let start_line = match range {
        Some((Some(a), Some(b))) => format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {a}-{b}/{DRIP_SIZE}\r\n\
             content-length: {}\r\n\r\n",
            b + 1 - a
        ),
        _ => format!("HTTP/1.1 200 OK\r\ncontent-length: {DRIP_SIZE}\r\n\r\n"),
    };
    if conn.write_all(start_line.as_bytes()).await.is_err() {
        return 0;
    }
    let mut sent = 0u64;
    while hang_up.is_none_or(|h| sent < h) {
        if conn.write_all(b"x").await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sent
}

fn client(endpoint: String, retry: RetryConfig) -> GcsClient {
    GcsClient::new(
        GcsConfig {
            endpoint,
            bucket: "b".into(),
            billing_project: None,
            retry,
            pool_size: 4,
            stall_timeout: Duration::from_secs(5),
            ca_file: None,
            protocol: HttpProtocol::Http1,
        },
        TokenSource::Anonymous,
    )
    .unwrap()
}

fn quick_retry(deadline: Duration) -> RetryConfig {
    RetryConfig {
        max_attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        deadline,
    }
}

#[tokio::test]
async fn an_endless_error_body_is_read_only_up_to_its_cap() {
    let server = Hostile::start(Answer::EndlessError).await;
    let c = client(server.endpoint(), quick_retry(Duration::from_secs(30)));
    let err = c.stat("x").await.unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");
    let sent = server.connections(3).await;
    assert_eq!(sent.len(), 3, "one connection per attempt: {sent:?}");
    // The client reads 64 KiB of each; what else went out sat in socket buffers when it hung
    // up. A client reading the whole body would have taken all LIMIT bytes.
    for n in &sent {
        assert!(
            *n < 64 << 20,
            "server wrote {n} bytes before the client hung up"
        );
    }
}

#[tokio::test]
async fn a_dripping_error_body_ends_at_the_retry_deadline() {
    let server = Hostile::start(Answer::DrippingError).await;
    let c = client(server.endpoint(), quick_retry(Duration::from_secs(2)));
    // The body never stalls (a byte every 50 ms, the stall timeout is 5 s), so only a
    // deadline on the whole attempt can end it; the outer bound only keeps a broken client
    // from hanging the test.
    let got = tokio::time::timeout(Duration::from_secs(60), c.stat("x")).await;
    let err = got
        .expect("the request must give up at its retry deadline")
        .unwrap_err();
    assert!(err.to_string().contains("--retry-deadline"), "{err}");
}

/// A media body that keeps arriving, a byte at a time, never trips the stall timeout; the
/// read still ends at its retry deadline, whether the body drips on one connection or the
/// server hangs up after a few bytes each time so that every attempt makes progress.
#[tokio::test]
async fn a_dripping_media_body_ends_at_the_retry_deadline() {
    let obj = ObjectVersion {
        name: "x",
        generation: 1,
        size: DRIP_SIZE,
        crc32c: None,
    };
    for hang_up in [None, Some(5)] {
        let server = Hostile::start(Answer::DrippingMedia { hang_up }).await;
        let retry = RetryConfig {
            max_attempts: 1000,
            ..quick_retry(Duration::from_secs(2))
        };
        let c = client(server.endpoint(), retry);
        // The outer bound only keeps a client without the deadline from hanging the test.
        let got = tokio::time::timeout(Duration::from_secs(60), c.get_range(obj, 0, DRIP_SIZE))
            .await
            .unwrap_or_else(|_| panic!("hang_up {hang_up:?}: the read outlived its deadline"));
        let err = got.unwrap_err();
        assert!(
            err.to_string().contains("--retry-deadline") || hang_up.is_some(),
            "hang_up {hang_up:?}: {err}"
        );
        let attempts = server.heads.lock().unwrap().len();
        let received: u64 = server.connections(attempts).await.iter().sum();
        assert!(
            received < DRIP_SIZE / 100,
            "hang_up {hang_up:?}: {received} bytes arrived over {attempts} attempts"
        );
        if hang_up.is_none() {
            assert_eq!(
                attempts, 1,
                "an attempt ended by the deadline is not retried"
            );
        }
    }
}

#[tokio::test]
async fn a_redirect_is_an_error_and_is_not_followed() {
    let other = Hostile::start(Answer::Empty).await;
    let server = Hostile::start(Answer::Redirect(other.port)).await;
    let c = GcsClient::new(
        GcsConfig {
            endpoint: server.endpoint(),
            bucket: "b".into(),
            billing_project: None,
            retry: quick_retry(Duration::from_secs(10)),
            pool_size: 4,
            stall_timeout: Duration::from_secs(5),
            ca_file: None,
            protocol: HttpProtocol::Http1,
        },
        TokenSource::fixed("secret-token"),
    )
    .unwrap();
    let err = c.stat("x").await.unwrap_err();
    assert_eq!(err.status(), Some(302), "{err}");
    assert!(err.to_string().contains("not followed"), "{err}");
    assert_eq!(
        server.heads.lock().unwrap().len(),
        1,
        "a 3xx is not retried"
    );
    // Give a follower time to reach the other server; it must have seen nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        other.heads.lock().unwrap().is_empty(),
        "the redirect was followed"
    );
}

#[tokio::test]
async fn credentials_never_go_in_clear_to_another_host() {
    let refused = GcsClient::new(
        GcsConfig {
            endpoint: "http://192.0.2.1:4443".into(),
            bucket: "b".into(),
            billing_project: None,
            retry: RetryConfig::default(),
            pool_size: 1,
            stall_timeout: Duration::from_secs(5),
            ca_file: None,
            protocol: HttpProtocol::Http1,
        },
        TokenSource::fixed("secret-token"),
    );
    let err = refused
        .err()
        .expect("a token over plain HTTP to another host");
    assert!(err.to_string().contains("https://"), "{err}");
}

/// `mount --endpoint http://127.0.0.1:PORT --key-file K` refuses before it sends anything;
/// with `--allow-insecure-endpoint` it gets as far as asking the server.
#[test]
fn a_loopback_http_endpoint_with_a_key_file_needs_the_flag() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(Hostile::start(Answer::Empty));
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let key = dir.path().join("key.json");
    std::fs::write(&key, "{}").unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(common::physiofs_bin());
        cmd.arg("mount")
            .args(["--endpoint", &server.endpoint(), "--bucket", "b"])
            .arg("--key-file")
            .arg(&key)
            .args(["--metadata-cache", "off"])
            .args(extra)
            .arg(&mnt);
        common::run_timeout(&mut cmd, Duration::from_secs(60))
    };
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--allow-insecure-endpoint"), "{stderr}");
    assert!(
        server.heads.lock().unwrap().is_empty(),
        "a request went out before the refusal"
    );
    // With the flag the mount goes on (and fails later on the useless key file).
    let out = run(&["--allow-insecure-endpoint"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("--allow-insecure-endpoint"), "{stderr}");
}

#[tokio::test]
async fn a_newline_in_an_object_name_cannot_forge_a_log_line() {
    let server = Hostile::start(Answer::Empty).await;
    let c = client(server.endpoint(), quick_retry(Duration::from_secs(5)));
    let forged = "x\n2026-01-01T00:00:00Z  INFO physiofs: all good";
    let err = c.stat(forged).await.unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("x\\n2026"), "{err}");
}

#[test]
fn an_over_long_name_is_dropped_from_a_listing_and_refused_by_stat() {
    use physiofs::client::gcs::{MAX_NAME_BYTES, parse_list_page, parse_object};
    let long = "a/".repeat(30_000) + "f";
    let entry = |name: &str| {
        serde_json::json!({"name": name, "size": "1", "generation": "1",
                           "updated": "2020-01-01T00:00:00Z"})
    };
    let page = serde_json::json!({
        "items": [entry(&long), entry("good"), entry(&"b".repeat(MAX_NAME_BYTES))],
        "prefixes": [long.clone() + "/", "dir/"],
    });
    let page = parse_list_page(page.to_string().as_bytes(), "test").unwrap();
    let names: Vec<_> = page.items.iter().map(|o| o.name.len()).collect();
    assert_eq!(names, vec![4, MAX_NAME_BYTES], "the long name is dropped");
    assert_eq!(page.prefixes, vec!["dir/".to_string()]);
    let err = parse_object(entry(&long).to_string().as_bytes(), "test").unwrap_err();
    assert!(err.to_string().contains("1024"), "{err}");
}

/// 10,000 nested directories (a name no server may send, but a table can hold): saving and
/// loading a snapshot of it walks the tree without recursion, on a small stack.
#[test]
fn a_deep_tree_is_walked_without_recursion() {
    use physiofs::inode::{FileInfo, InodeTable};
    use physiofs::snapshot::{SnapshotKey, load, path_for, save};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let walker = std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(move || {
            let t = InodeTable::new(None);
            let deep = "a/".repeat(10_000) + "f";
            let info = FileInfo {
                size: 1,
                mtime: std::time::UNIX_EPOCH,
                generation: 1,
                crc32c: None,
            };
            t.insert_object(&deep, info).unwrap();
            let key = SnapshotKey {
                endpoint: "http://x".into(),
                bucket: "b".into(),
                prefix: "".into(),
            };
            let path = path_for(&d, &key);
            let saved = save(&path, &key, &t).unwrap();
            let back = InodeTable::new(None);
            let loaded = load(&path, &key, None, &back).unwrap();
            (saved, loaded)
        })
        .unwrap();
    let (saved, loaded) = walker.join().expect("the walk overflowed its stack");
    assert_eq!((saved, loaded), (10_001, 10_001));
}

struct EndlessPages {
    pages: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl ObjectClient for EndlessPages {
    fn bucket(&self) -> &str {
        "b"
    }
    async fn list_page(
        &self,
        _: &physiofs::client::ListRequest,
    ) -> Result<physiofs::client::ListPage, physiofs::client::ClientError> {
        let n = self
            .pages
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(physiofs::client::ListPage {
            next_page_token: Some(format!("token-{n}")),
            ..Default::default()
        })
    }
    async fn stat(
        &self,
        name: &str,
    ) -> Result<physiofs::client::ObjectMeta, physiofs::client::ClientError> {
        Err(physiofs::client::ClientError::NotFound(name.into()))
    }
    async fn get_range(
        &self,
        _: physiofs::client::ObjectVersion<'_>,
        _: u64,
        _: u64,
    ) -> Result<bytes::Bytes, physiofs::client::ClientError> {
        unreachable!()
    }
}

#[tokio::test]
async fn a_listing_with_endless_page_tokens_is_cut_off() {
    use physiofs::client::{MAX_LIST_PAGES, list_all};
    let c = EndlessPages {
        pages: Default::default(),
    };
    let err = list_all(&c, &Default::default()).await.unwrap_err();
    assert!(err.to_string().contains("did not end"), "{err}");
    assert_eq!(
        c.pages.load(std::sync::atomic::Ordering::Relaxed),
        MAX_LIST_PAGES
    );
}

/// A local user, `physiofs-test-user` (made here if missing), owning a directory.
fn other_user() -> Option<u32> {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the planted-file tests need root to play a root mount");
        return None;
    }
    let name = "physiofs-test-user";
    let id = || {
        std::process::Command::new("id")
            .args(["-u", name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    };
    if id().is_none() {
        let st = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", name])
            .status()
            .expect("useradd");
        assert!(st.success() || id().is_some(), "useradd {name} failed");
    }
    Some(id().expect("the test user exists"))
}

#[test]
fn root_writes_nothing_through_a_users_symlink_and_reads_no_users_snapshot() {
    use physiofs::inode::InodeTable;
    use physiofs::snapshot::{LoadError, SnapshotKey, load, path_for, save};
    let Some(uid) = other_user() else { return };
    let top = tempfile::tempdir().unwrap();
    let victim = top.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // The user's directory, with a link where root would write its snapshot and its log.
    let theirs = top.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(uid), Some(uid)).unwrap();
    let key = SnapshotKey {
        endpoint: "http://x".into(),
        bucket: "b".into(),
        prefix: "".into(),
    };
    let planted = path_for(&theirs, &key);
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    std::os::unix::fs::lchown(&planted, Some(uid), Some(uid)).unwrap();
    let log = theirs.join("mount.log");
    std::os::unix::fs::symlink(&victim, &log).unwrap();

    let table = InodeTable::new(None);
    let e = save(&planted, &key, &table).unwrap_err();
    assert!(e.to_string().contains("--metadata-cache"), "{e}");
    let e = physiofs::daemon::open_log(&log).unwrap_err();
    assert!(format!("{e:#}").contains("--log-file"), "{e:#}");
    assert!(matches!(
        load(&planted, &key, None, &InodeTable::new(None)),
        Err(LoadError::Untrusted(_))
    ));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(
        std::fs::read_dir(&theirs).unwrap().count(),
        2,
        "nothing new"
    );

    // In root's own directory: a snapshot the user wrote (or could write) is not read.
    let ours = top.path().join("ours");
    let path = path_for(&ours, &key);
    save(&path, &key, &table).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&ours), mode(&path)), (0o700, 0o600));
    assert!(load(&path, &key, None, &InodeTable::new(None)).is_ok());
    std::os::unix::fs::chown(&path, Some(uid), None).unwrap();
    let e = load(&path, &key, None, &InodeTable::new(None)).unwrap_err();
    assert!(matches!(e, LoadError::Untrusted(_)), "{e}");
    std::os::unix::fs::chown(&path, Some(0), None).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = load(&path, &key, None, &InodeTable::new(None)).unwrap_err();
    assert!(matches!(e, LoadError::Untrusted(_)), "{e}");
    // The log in a directory of root's own is private.
    let f = physiofs::daemon::open_log(&ours.join("logs/m.log")).unwrap();
    drop(f);
    assert_eq!(mode(&ours.join("logs/m.log")), 0o600);
}

/// The mount point is resolved once, when the mount starts: a user who owns a directory on
/// its path and swaps the mount point for a symlink while physiofs is still checking access
/// (here: while the testbed holds its first request) does not get root to mount over the
/// symlink's target; the mount lands on the directory that was checked, and unmounting takes
/// it off there.
#[test]
fn a_mount_point_swapped_for_a_symlink_during_the_checks_is_not_followed() {
    use common::{TestbedProc, assert_not_mounted, mount_entry, physiofs_command};
    use std::fs::{self, File};
    let uid = other_user().expect("root: the test plays a root mount");
    let tb = TestbedProc::start(&[
        "--model",
        "dicom",
        "--patients",
        "2",
        "--size-scale",
        "0.001",
        "--first-byte-latency",
        "1500ms",
        "--addr",
        "127.0.0.1:0",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let theirs = tmp.path().join("theirs");
    let victim = tmp.path().join("victim");
    fs::create_dir(&theirs).unwrap();
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("root-only"), b"root's").unwrap();
    let mnt = theirs.join("mnt");
    fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::chown(&theirs, Some(uid), Some(uid)).unwrap();
    std::os::unix::fs::chown(&mnt, Some(uid), Some(uid)).unwrap();

    let log = tmp.path().join("physiofs.log");
    let args = tb.mount_args(
        "mimic-cxr-2.0.0.physionet.org",
        &["--metadata-cache", "off"],
    );
    let mut child = physiofs_command(&args, &mnt)
        .stdout(File::create(&log).unwrap())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // physiofs has resolved the mount point once its first request reaches the testbed.
    let t0 = std::time::Instant::now();
    while tb.stats()["requests"]
        .as_object()
        .unwrap()
        .values()
        .all(|v| v == 0)
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "no request came");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The user swaps the mount point for a symlink to a directory of root's.
    let swap = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "sh",
            "-c",
            "mv \"$1/mnt\" \"$1/mnt.orig\" && ln -s \"$2\" \"$1/mnt\"",
            "sh",
        ])
        .arg(&theirs)
        .arg(&victim)
        .status()
        .unwrap();
    assert!(swap.success(), "the user could not swap the mount point");
    let orig = theirs.join("mnt.orig");
    let t0 = std::time::Instant::now();
    while mount_entry(&orig).is_none() && mount_entry(&victim).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60) && child.try_wait().unwrap().is_none(),
            "physiofs did not mount: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        mount_entry(&victim).is_none(),
        "root mounted over the symlink's target"
    );
    assert!(
        mount_entry(&orig).is_some(),
        "the mount is on the checked directory"
    );
    assert_eq!(fs::read(victim.join("root-only")).unwrap(), b"root's");
    // SIGTERM: physiofs unmounts the directory it mounted, through its descriptor.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert_not_mounted(&orig, "after SIGTERM");
    assert!(mount_entry(&victim).is_none());
}
