//! What the HTTP client costs per ranged GET over TLS, without FUSE: the reqwest client
//! physiofs uses (HTTP/1.1, rustls, a body read chunk by chunk and copied into one buffer)
//! against a bare HTTP/1.1 loop on tokio-rustls that writes the request itself and reads the
//! body straight into the buffer. It is the measurement that led to `client::media`, the
//! connections physiofs now reads media on (README, "Where the mount's CPU goes"); the bare
//! loop itself has no retries, resume, proxies or error bodies. `inplace` goes one step
//! further: after rustls's handshake it takes the TLS 1.3 traffic secrets and decrypts each
//! record itself, in place in the receive buffer, where rustls decrypts into its own buffer
//! and the plaintext is copied out (a measurement of what a record layer of our own would
//! save; AES-GCM only, no key update, tickets skipped).
//!
//! ```sh
//! physiofs testbed --tls --tls-ca-out /tmp/ca.pem --synthetic bench/big.bin=1073741824 \
//!     --first-byte-latency 30ms --addr 127.0.0.1:0 &          # prints its https:// address
//! cargo run --release --example client_probe -- https://127.0.0.1:PORT /tmp/ca.pem \
//!     mimic-cxr-2.0.0.physionet.org bench/big.bin reqwest|raw|inplace rand|seq [GETS]
//! ```
//!
//! `rand`: 8 tasks, 64 KiB GETs at scattered offsets (the rand8 scenario's requests); `seq`:
//! 16 tasks, 4 MiB GETs (a stream's read-ahead). Prints the rate and the process's CPU time
//! per GiB and per GET (`getrusage`: both tokio workers, the TLS work included).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

const USAGE: &str =
    "usage: client_probe HTTPS_ENDPOINT CA_PEM BUCKET OBJECT reqwest|raw|inplace rand|seq [GETS]";
const STALL: Duration = Duration::from_secs(10);

/// Seconds of CPU this process used so far (user + system, every thread).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

type Conn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// The Content-Length of a 206 answer's head.
fn body_length(head: &[u8]) -> Result<usize> {
    let text = std::str::from_utf8(head)?;
    if !text.starts_with("HTTP/1.1 206") {
        bail!(
            "expected 206 Partial Content, got {:?}",
            text.lines().next()
        );
    }
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("206 without a Content-Length")
}

/// The bare loop: one GET per idle connection, body read into the caller's buffer.
struct Bare {
    addr: String,
    host: String,
    tls: tokio_rustls::TlsConnector,
    idle: Mutex<Vec<Conn>>,
    own_idle: Mutex<Vec<OwnConn>>,
}

impl Bare {
    /// The GET of bytes `[start, end)` of `path`.
    fn request(&self, path: &str, start: u64, end: u64) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\naccept-encoding: gzip\r\nrange: bytes={start}-{}\r\n\r\n",
            self.host,
            end - 1
        )
    }

    async fn connect(&self) -> Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone())?;
        self.tls.connect(name, tcp).await.context("TLS handshake")
    }

    async fn get(&self, path: &str, start: u64, end: u64, out: &mut Vec<u8>) -> Result<()> {
        let pooled = self.idle.lock().unwrap().pop();
        let mut c = match pooled {
            Some(c) => c,
            None => self.connect().await?,
        };
        let req = self.request(path, start, end);
        c.write_all(req.as_bytes()).await?;
        // rustls holds what it encrypted until flushed.
        c.flush().await?;
        let mut head = vec![0u8; 16 << 10];
        let mut n = 0;
        let head_end = loop {
            let k = tokio::time::timeout(STALL, c.read(&mut head[n..]))
                .await
                .map_err(|_| anyhow!("no answer head within {STALL:?}"))??;
            if k == 0 {
                bail!("connection closed before the answer head");
            }
            n += k;
            if let Some(p) = head[..n].windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if n == head.len() {
                bail!("answer head longer than {} bytes", head.len());
            }
        };
        let len = body_length(&head[..head_end])?;
        out.clear();
        out.reserve(len);
        out.extend_from_slice(&head[head_end..n]);
        while out.len() < len {
            let k = tokio::time::timeout(STALL, c.read_buf(out))
                .await
                .map_err(|_| anyhow!("body stalled after {} of {len} bytes", out.len()))??;
            if k == 0 {
                bail!("body ended after {} of {len} bytes", out.len());
            }
        }
        if out.len() != len {
            bail!("body longer than its Content-Length {len}");
        }
        self.idle.lock().unwrap().push(c);
        Ok(())
    }
}

/// One direction of a TLS 1.3 connection's record protection (AES-GCM).
struct Keys {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new(secrets: (u64, rustls::ConnectionTrafficSecrets)) -> Result<Keys> {
        use rustls::ConnectionTrafficSecrets as S;
        let (seq, s) = secrets;
        let (alg, key, iv) = match &s {
            S::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
            _ => bail!("inplace: only AES-GCM suites"),
        };
        let key = ring::aead::UnboundKey::new(alg, key.as_ref()).map_err(|_| anyhow!("key"))?;
        Ok(Keys {
            key: ring::aead::LessSafeKey::new(key),
            iv: iv.as_ref().try_into()?,
            seq,
        })
    }

    fn nonce(&mut self) -> ring::aead::Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        ring::aead::Nonce::assume_unique_for_key(n)
    }
}

/// A TLS 1.3 connection after its handshake, records protected here rather than by rustls.
struct OwnConn {
    tcp: tokio::net::TcpStream,
    rx: Keys,
    tx: Keys,
    /// Received, not yet decrypted: the next record's header (and what follows it).
    raw: Vec<u8>,
}

impl OwnConn {
    async fn send(&mut self, plain: &[u8]) -> Result<()> {
        let mut body = Vec::with_capacity(plain.len() + 17);
        body.extend_from_slice(plain);
        body.push(23); // application data
        let len = body.len() + 16;
        let header = [23u8, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.tx.nonce();
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(header), &mut body)
            .map_err(|_| anyhow!("seal"))?;
        let mut rec = header.to_vec();
        rec.extend_from_slice(&body);
        rec.extend_from_slice(tag.as_ref());
        self.tcp.write_all(&rec).await?;
        Ok(())
    }

    /// Reads at least `n` and at most `n + extra` more bytes into `buf` (its spare capacity).
    async fn fill(&mut self, buf: &mut Vec<u8>, n: usize, extra: usize) -> Result<()> {
        use bytes::BufMut;
        let want = buf.len() + n;
        while buf.len() < want {
            let room = want + extra - buf.len();
            let k = tokio::time::timeout(STALL, self.tcp.read_buf(&mut (&mut *buf).limit(room)))
                .await
                .map_err(|_| anyhow!("stalled"))??;
            if k == 0 {
                bail!("connection closed mid-record");
            }
        }
        Ok(())
    }

    /// Reads the next record and appends its plaintext to `out` (decrypted where it landed);
    /// returns its content type.
    async fn record_into(&mut self, out: &mut Vec<u8>) -> Result<u8> {
        if self.raw.len() < 5 {
            let n = 5 - self.raw.len();
            let mut raw = std::mem::take(&mut self.raw);
            self.fill(&mut raw, n, 0).await?;
            self.raw = raw;
        }
        let header: [u8; 5] = self.raw[..5].try_into()?;
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != 23 || len < 17 {
            bail!("unexpected record {header:?}");
        }
        // Whatever of the record came with its header, then the rest straight into `out`.
        let start = out.len();
        let have = (self.raw.len() - 5).min(len);
        out.extend_from_slice(&self.raw[5..5 + have]);
        self.raw.drain(..5 + have);
        // The next record's header in the same read, when it has come already.
        out.reserve(len - have + 5);
        self.fill(out, len - have, 5).await?;
        self.raw.extend_from_slice(&out[start + len..]);
        out.truncate(start + len);
        let nonce = self.rx.nonce();
        let plain = self
            .rx
            .key
            .open_in_place(nonce, ring::aead::Aad::from(header), &mut out[start..])
            .map_err(|_| anyhow!("record failed its authentication"))?
            .len();
        // TLSInnerPlaintext: content, the real type, zero padding.
        let mut end = start + plain;
        while end > start && out[end - 1] == 0 {
            end -= 1;
        }
        if end == start {
            bail!("record without a content type");
        }
        let kind = out[end - 1];
        out.truncate(end - 1);
        Ok(kind)
    }

    async fn get(&mut self, req: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.send(req).await?;
        let mut head = Vec::new();
        let (head_end, len) = loop {
            if self.record_into(&mut head).await? != 23 {
                head.clear(); // a NewSessionTicket
                continue;
            }
            if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break (p + 4, body_length(&head[..p + 4])?);
            }
        };
        out.clear();
        out.reserve(len + (17 << 10));
        out.extend_from_slice(&head[head_end..]);
        while out.len() < len {
            let before = out.len();
            if self.record_into(out).await? != 23 {
                out.truncate(before);
            }
        }
        if out.len() != len {
            bail!("body longer than its Content-Length {len}");
        }
        Ok(())
    }
}

impl Bare {
    async fn connect_own(&self) -> Result<OwnConn> {
        let tls = self.connect().await?;
        let (tcp, conn) = tls.into_inner();
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            bail!("inplace: the server did not speak TLS 1.3");
        }
        let s = conn.dangerous_extract_secrets()?;
        Ok(OwnConn {
            tcp,
            rx: Keys::new(s.rx)?,
            tx: Keys::new(s.tx)?,
            raw: Vec::new(),
        })
    }

    async fn get_own(&self, path: &str, start: u64, end: u64, out: &mut Vec<u8>) -> Result<()> {
        let pooled = self.own_idle.lock().unwrap().pop();
        let mut c = match pooled {
            Some(c) => c,
            None => self.connect_own().await?,
        };
        let req = self.request(path, start, end);
        c.get(req.as_bytes(), out).await?;
        self.own_idle.lock().unwrap().push(c);
        Ok(())
    }
}

/// How physiofs read a media body before `client::media`.
async fn get_reqwest(
    http: &reqwest::Client,
    url: &str,
    start: u64,
    end: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut resp = http
        .get(url)
        .header("range", format!("bytes={start}-{}", end - 1))
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    if resp.status().as_u16() != 206 {
        bail!("expected 206 Partial Content, got {}", resp.status());
    }
    out.clear();
    out.reserve((end - start) as usize);
    while let Some(chunk) = tokio::time::timeout(STALL, resp.chunk())
        .await
        .map_err(|_| anyhow!("body stalled after {} bytes", out.len()))??
    {
        out.extend_from_slice(&chunk);
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 6 {
        bail!("{USAGE}");
    }
    let (endpoint, ca, bucket, object) = (&args[0], &args[1], &args[2], &args[3]);
    let (mode, scenario) = (args[4].as_str(), args[5].as_str());
    let (len, tasks, default_gets): (u64, usize, usize) = match scenario {
        "rand" => (64 << 10, 8, 2000),
        "seq" => (4 << 20, 16, 256),
        _ => bail!("scenario {scenario:?}: rand or seq\n{USAGE}"),
    };
    if !["reqwest", "raw", "inplace"].contains(&mode) {
        bail!("client {mode:?}: reqwest, raw or inplace\n{USAGE}");
    }
    let gets: usize = match args.get(6) {
        Some(g) => g.parse().with_context(|| format!("GETS {g:?}"))?,
        None => default_gets,
    };
    let host_port = endpoint
        .strip_prefix("https://")
        .with_context(|| format!("{endpoint}: give the testbed's https:// address"))?
        .trim_end_matches('/')
        .to_string();
    let pem = std::fs::read(ca).with_context(|| format!("read {ca}"))?;

    let path = format!(
        "/storage/v1/b/{bucket}/o/{}?alt=media",
        object.replace('/', "%2F")
    );
    let url = format!("{endpoint}{path}");
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .http1_only()
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .build()?;
    let size = {
        let meta: serde_json::Value = http
            .get(format!(
                "{endpoint}/storage/v1/b/{bucket}/o/{}",
                object.replace('/', "%2F")
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        meta["size"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .context("object metadata without a size")?
    };
    if size <= len {
        bail!("{object} is {size} bytes: the probe needs more than {len}");
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots.add(c?)?;
    }
    // The suites physiofs offers, in its order (AES-128-GCM first).
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.enable_secret_extraction = mode == "inplace";
    let bare = Arc::new(Bare {
        host: host_port.split(':').next().unwrap_or_default().to_string(),
        addr: host_port,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        idle: Mutex::new(Vec::new()),
        own_idle: Mutex::new(Vec::new()),
    });

    // Offsets: scattered (a multiplicative hash) or one stream of requests.
    let offsets: Vec<u64> = (0..gets as u64)
        .map(|i| match scenario {
            "rand" => i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (size - len),
            _ => (i * len) % (size - len),
        })
        .collect();
    let queue = Arc::new(Mutex::new(offsets));
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut running = Vec::new();
    for _ in 0..tasks {
        let (queue, bare, http, url, path) = (
            queue.clone(),
            bare.clone(),
            http.clone(),
            url.clone(),
            path.clone(),
        );
        let mode = mode.to_string();
        running.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut bytes = 0u64;
            loop {
                let next = queue.lock().unwrap().pop();
                let Some(at) = next else {
                    return Ok::<u64, anyhow::Error>(bytes);
                };
                match mode.as_str() {
                    "raw" => bare.get(&path, at, at + len, &mut out).await?,
                    "inplace" => bare.get_own(&path, at, at + len, &mut out).await?,
                    _ => get_reqwest(&http, &url, at, at + len, &mut out).await?,
                }
                if out.len() as u64 != len {
                    bail!("GET at {at}: {} bytes, {len} asked", out.len());
                }
                bytes += len;
            }
        }));
    }
    let mut total = 0;
    for t in running {
        total += t.await??;
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    println!(
        "{mode} {scenario}: {gets} GETs of {len} bytes, {:.0} MB/s, CPU {:.3} s/GiB, {:.1} us/GET",
        total as f64 / secs / 1e6,
        cpu / (total as f64 / (1u64 << 30) as f64),
        cpu / gets as f64 * 1e6
    );
    Ok(())
}
