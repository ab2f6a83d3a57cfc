//! The server (hyper 1): routing, GCS handlers, faults, streaming bodies.
//!
//! Plain connections speak HTTP/1.1, as the emulators do. With TLS the client's ALPN choice
//! decides between h2 and http/1.1, as with storage.googleapis.com, so the client's real
//! HTTPS path (handshake, record layer, HTTP/2 flow control) is what a test exercises. A
//! fault means the same on both: a reset kills the TCP connection (with every h2 stream on
//! it), a truncation ends the body short of its Content-Length, a stall hangs one response.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::json::{BucketJson, ListJson, ObjectJson, error_body, etag};
use super::knobs::{Knobs, KnobsUpdate, Malformed, Rng};
use super::listing::{self, ListError, ListParams};
use super::source::{ObjectSource, SourceObject};
use super::stats::{FaultKind, RequestKind, Stats};

/// Size of the chunks media bodies are produced in.
pub const CHUNK: usize = 256 * 1024;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) struct Shared {
    pub source: Arc<dyn ObjectSource>,
    pub knobs: RwLock<Arc<Knobs>>,
    pub initial: Knobs,
    pub rng: Mutex<Rng>,
    pub token_first_use: Mutex<HashMap<String, Instant>>,
    pub stats: Stats,
}

impl Shared {
    pub fn new(source: Arc<dyn ObjectSource>, knobs: Knobs, seed: u64) -> Self {
        Shared {
            source,
            knobs: RwLock::new(Arc::new(knobs.clone())),
            initial: knobs,
            rng: Mutex::new(Rng::new(seed)),
            token_first_use: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        }
    }
    fn knobs(&self) -> Arc<Knobs> {
        self.knobs.read().unwrap().clone()
    }
    fn unit(&self) -> f64 {
        self.rng.lock().unwrap().unit()
    }
}

// ---------------------------------------------------------------- connections

/// A TCP stream that is closed with a RST (SO_LINGER 0) when `rst` was set.
struct ConnIo {
    stream: TcpStream,
    rst: Arc<AtomicBool>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.rst.load(Ordering::Relaxed) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Per-connection token bucket (virtual-time pacing). On tokio's clock, so that a test with
/// the clock paused measures the pacing exactly.
struct Pacer {
    next: tokio::time::Instant,
}

impl Pacer {
    /// Reserve `n` bytes at `rate`; returns when they may be sent.
    fn reserve(&mut self, n: usize, rate: u64) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let start = self.next.max(now);
        self.next = start + Duration::from_secs_f64(n as f64 / rate as f64);
        start
    }
}

struct ConnCtx {
    shared: Arc<Shared>,
    local: SocketAddr,
    pacer: Arc<Mutex<Pacer>>,
    rst: Arc<AtomicBool>,
    /// Woken by an injected reset: the connection is dropped (RST) at once, which on h2 also
    /// breaks every other stream on it, as a real reset does.
    kill: Arc<tokio::sync::Notify>,
    /// `https` or `http`, for the URLs the server writes (`selfLink`, `mediaLink`).
    scheme: &'static str,
    h2: bool,
}

pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    local: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let _ = stream.set_nodelay(true);
    let rst = Arc::new(AtomicBool::new(false));
    let io = ConnIo {
        stream,
        rst: rst.clone(),
    };
    match tls {
        None => serve_http(shared, io, local, rst, "http", false).await,
        Some(acceptor) => match acceptor.accept(io).await {
            Ok(tls) => {
                let conn = tls.get_ref().1;
                let h2 = conn.alpn_protocol() == Some(b"h2");
                let suite = format!(
                    "{:?} {:?}",
                    conn.protocol_version()
                        .unwrap_or(tokio_rustls::rustls::ProtocolVersion::Unknown(0)),
                    conn.negotiated_cipher_suite()
                        .map(|s| s.suite())
                        .unwrap_or(tokio_rustls::rustls::CipherSuite::Unknown(0))
                );
                let resumed =
                    conn.handshake_kind() == Some(tokio_rustls::rustls::HandshakeKind::Resumed);
                shared.stats.tls_handshake(suite, resumed);
                serve_http(shared, tls, local, rst, "https", h2).await
            }
            Err(e) => {
                shared.stats.tls_handshake_failed();
                tracing::debug!("testbed TLS handshake failed: {e}");
            }
        },
    }
}

async fn serve_http<I>(
    shared: Arc<Shared>,
    io: I,
    local: SocketAddr,
    rst: Arc<AtomicBool>,
    scheme: &'static str,
    h2: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let kill = Arc::new(tokio::sync::Notify::new());
    let ctx = Arc::new(ConnCtx {
        shared,
        local,
        pacer: Arc::new(Mutex::new(Pacer {
            next: tokio::time::Instant::now(),
        })),
        rst,
        kill: kill.clone(),
        scheme,
        h2,
    });
    let io = hyper_util::rt::TokioIo::new(io);
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { handle(ctx, req).await }
    });
    let res = if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        // GCS's front ends advertise 100 concurrent streams; windows as large as a media
        // block so flow control, not the testbed, is what a client's settings decide.
        b.max_concurrent_streams(100)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(1 << 20)
            .max_send_buf_size(4 << 20);
        tokio::select! {
            r = b.serve_connection(io, svc) => r,
            _ = kill.notified() => Ok(()),
        }
    } else {
        tokio::select! {
            r = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .max_buf_size(4 << 20)
                .serve_connection(io, svc) => r,
            _ = kill.notified() => Ok(()),
        }
    };
    if let Err(e) = res {
        tracing::debug!("testbed connection ended: {e}");
    }
}

/// The TLS side of a `--tls` testbed: a fresh self-signed certificate and the ALPN offer.
pub(crate) struct TlsSetup {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The certificate (PEM) clients must trust.
    pub ca_pem: String,
}

pub(crate) fn tls_setup(http2: bool) -> anyhow::Result<TlsSetup> {
    use tokio_rustls::rustls;
    let names = vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "::1".to_string(),
    ];
    let ck = rcgen::generate_simple_self_signed(names)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)?;
    cfg.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsSetup {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        ca_pem: ck.cert.pem(),
    })
}

// ---------------------------------------------------------------- bodies

enum Fault {
    Reset,
    Truncate,
    Stall(Duration),
}

pub(crate) struct TBody {
    kind: BodyKind,
}

enum BodyKind {
    Full(Option<Bytes>),
    Media(Box<MediaBody>),
}

struct MediaBody {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    len: u64,
    sent: u64,
    pending: Option<Bytes>,
    ready: Option<Bytes>,
    fault: Option<(u64, Fault)>,
    bandwidth: Option<u64>,
    pacer: Arc<Mutex<Pacer>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
    /// Reset/truncate to carry out once the sleep (letting hyper flush what was sent) ends.
    finishing: Option<Fault>,
    /// Body offset of the one byte to flip (`corrupt_rate`).
    corrupt_at: Option<u64>,
    done: bool,
    shared: Arc<Shared>,
    rst: Arc<AtomicBool>,
    kill: Arc<tokio::sync::Notify>,
}

impl TBody {
    fn full(b: impl Into<Bytes>) -> Self {
        TBody {
            kind: BodyKind::Full(Some(b.into())),
        }
    }
    fn empty() -> Self {
        TBody {
            kind: BodyKind::Full(None),
        }
    }
}

#[derive(Debug)]
struct BodyAbort(&'static str);
impl std::fmt::Display for BodyAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for BodyAbort {}

impl Body for TBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            BodyKind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BodyKind::Media(m) => m.poll(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Full(b) => b.is_none(),
            BodyKind::Media(m) => m.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            BodyKind::Media(m) => SizeHint::with_exact(m.len - m.sent),
        }
    }
}

impl MediaBody {
    fn emit(&mut self, b: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let b = match self.corrupt_at {
            Some(at) if at >= self.sent && at < self.sent + b.len() as u64 => {
                let mut v = b.to_vec();
                v[(at - self.sent) as usize] ^= 0x5A;
                Bytes::from(v)
            }
            _ => b,
        };
        self.sent += b.len() as u64;
        self.shared.stats.bytes(b.len() as u64);
        Poll::Ready(Some(Ok(Frame::data(b))))
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(s) = &mut self.sleep {
                ready!(s.as_mut().poll(cx));
                self.sleep = None;
                if self.stalled {
                    self.done = true;
                    return Poll::Ready(Some(Err(Box::new(BodyAbort(
                        "testbed: stall over, closing",
                    )))));
                }
                match self.finishing.take() {
                    Some(Fault::Reset) => {
                        self.done = true;
                        self.rst.store(true, Ordering::Relaxed);
                        self.kill.notify_one();
                        return Poll::Ready(Some(Err(Box::new(BodyAbort(
                            "testbed: injected reset",
                        )))));
                    }
                    Some(_) => {
                        // Truncate: end early; hyper sees fewer bytes than Content-Length and closes.
                        self.done = true;
                        return Poll::Ready(None);
                    }
                    None => {}
                }
                if let Some(b) = self.ready.take() {
                    return self.emit(b);
                }
            }
            // Fault point reached?
            if let Some((at, _)) = &self.fault
                && self.sent >= *at
            {
                let (_, f) = self.fault.take().unwrap();
                match f {
                    Fault::Reset | Fault::Truncate => {
                        // Pause so that hyper flushes the part already produced, then cut.
                        self.finishing = Some(f);
                        self.sleep = Some(Box::pin(tokio::time::sleep(Duration::from_millis(20))));
                        continue;
                    }
                    Fault::Stall(d) => {
                        self.stalled = true;
                        self.sleep = Some(Box::pin(tokio::time::sleep(d)));
                        continue;
                    }
                }
            }
            let mut chunk = match self.pending.take() {
                Some(c) => c,
                None => match ready!(self.rx.poll_recv(cx)) {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        self.done = true;
                        tracing::warn!("testbed: source read failed: {e}");
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    None => {
                        self.done = true;
                        return Poll::Ready(None);
                    }
                },
            };
            let mut n = chunk.len();
            if let Some((at, _)) = &self.fault {
                n = n.min((*at - self.sent) as usize);
            }
            if let Some(rate) = self.bandwidth {
                n = n.min(((rate / 50) as usize).max(4096));
            }
            let piece = chunk.split_to(n);
            if !chunk.is_empty() {
                self.pending = Some(chunk);
            }
            if let Some(rate) = self.bandwidth {
                let at = self.pacer.lock().unwrap().reserve(piece.len(), rate);
                if at > tokio::time::Instant::now() + Duration::from_millis(1) {
                    self.shared.stats.throttled(piece.len() as u64);
                    self.ready = Some(piece);
                    self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                    continue;
                }
            }
            return self.emit(piece);
        }
    }
}

// ---------------------------------------------------------------- helpers

type Resp = Response<TBody>;

#[derive(Debug)]
struct Abort;
impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("testbed: connection aborted (unavailable)")
    }
}
impl std::error::Error for Abort {}

fn json_resp(status: u16, body: String) -> Resp {
    let mut r = Response::new(TBody::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, no-store, max-age=0, must-revalidate"),
    );
    r
}

fn err_resp(status: u16, message: &str, reason: &str) -> Resp {
    json_resp(status, error_body(status, message, reason))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialize")
}

fn pct_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for part in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let dec = |s: &str| pct_decode(&s.replace('+', " ")).unwrap_or_default();
        m.insert(dec(k), dec(v));
    }
    m
}

enum Route {
    ListBuckets,
    Bucket(String),
    List(String),
    Object {
        bucket: String,
        name: String,
        download: bool,
    },
    TestPermissions(String),
    Unknown,
}

fn route(path: &str) -> Route {
    let (download, rest) = if let Some(r) = path.strip_prefix("/download/storage/v1/b") {
        (true, r)
    } else if let Some(r) = path.strip_prefix("/storage/v1/b") {
        (false, r)
    } else {
        return Route::Unknown;
    };
    if rest.is_empty() || rest == "/" {
        return if download {
            Route::Unknown
        } else {
            Route::ListBuckets
        };
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Route::Unknown;
    };
    let (bucket_enc, tail) = match rest.split_once('/') {
        Some((b, t)) => (b, Some(t)),
        None => (rest, None),
    };
    let Some(bucket) = pct_decode(bucket_enc) else {
        return Route::Unknown;
    };
    match tail {
        None | Some("") if !download => Route::Bucket(bucket),
        Some("o") | Some("o/") if !download => Route::List(bucket),
        Some("iam/testPermissions") if !download => Route::TestPermissions(bucket),
        Some(t) => match t.strip_prefix("o/") {
            Some(obj) if !obj.is_empty() => match pct_decode(obj) {
                Some(name) => Route::Object {
                    bucket,
                    name,
                    download,
                },
                None => Route::Unknown,
            },
            _ => Route::Unknown,
        },
        None => Route::Unknown,
    }
}

fn base_url(ctx: &ConnCtx, req: &Request<Incoming>) -> String {
    // h2 carries the host as :authority (in the URI), not as a Host header.
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) => format!("{}://{h}", ctx.scheme),
        None => format!("{}://{}", ctx.scheme, ctx.local),
    }
}

async fn read_body(mut body: Incoming, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let f = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match f {
            None => return Ok(out),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(fr)) => {
                if let Ok(d) = fr.into_data() {
                    out.extend_from_slice(&d);
                    if out.len() > limit {
                        return Err("body too large".into());
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- handling

/// A stand-in for Google's OAuth token endpoint (`token_uri` of a service-account key or of
/// user credentials): accepts a JWT-bearer grant asking for the read-only storage scope, or
/// a refresh-token grant, and hands out a fresh random `tbtok-…` token. Any other scope is
/// refused, so a client that asks for more fails.
async fn oauth_token(ctx: &ConnCtx, req: Request<Incoming>) -> Resp {
    use base64::Engine;
    if req.method() != Method::POST {
        return err_resp(405, "POST only", "methodNotAllowed");
    }
    let body = match read_body(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(e) => return err_resp(400, &e, "invalid"),
    };
    let form = parse_query(std::str::from_utf8(&body).ok());
    let has = |k: &str| form.get(k).is_some_and(|v| !v.is_empty());
    let refresh = form.get("grant_type").map(String::as_str) == Some("refresh_token");
    if refresh && !(has("refresh_token") && has("client_id") && has("client_secret")) {
        return json_resp(
            400,
            r#"{"error":"invalid_request","error_description":"refresh_token, client_id and client_secret are required"}"#.into(),
        );
    }
    if refresh {
        return json_resp(200, fresh_token(ctx));
    }
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return json_resp(400, r#"{"error":"unsupported_grant_type"}"#.into());
    }
    let claims = form
        .get("assertion")
        .and_then(|a| a.split('.').nth(1))
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok());
    let scope = claims
        .as_ref()
        .and_then(|c| c["scope"].as_str())
        .unwrap_or_default();
    if scope != crate::client::auth::SCOPE_READ_ONLY {
        return json_resp(
            400,
            format!(
                r#"{{"error":"invalid_scope","error_description":"testbed grants only the read-only scope, not {scope:?}"}}"#
            ),
        );
    }
    json_resp(200, fresh_token(ctx))
}

/// Google's token-info endpoint: the account of an access token (form body or query
/// `access_token`), always [`super::TESTBED_USER_EMAIL`]; 400 without a token.
async fn token_info(req: Request<Incoming>) -> Resp {
    let mut form = parse_query(req.uri().query());
    if req.method() == Method::POST {
        let body = read_body(req.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        form.extend(parse_query(std::str::from_utf8(&body).ok()));
    }
    if form.get("access_token").is_none_or(|t| t.is_empty()) {
        return json_resp(
            400,
            r#"{"error":"invalid_request","error_description":"access_token is required"}"#.into(),
        );
    }
    json_resp(
        200,
        serde_json::json!({
            "email": super::TESTBED_USER_EMAIL,
            "email_verified": "true",
            "scope": crate::client::auth::SCOPE_READ_ONLY,
            "expires_in": "3599",
        })
        .to_string(),
    )
}

/// A GCE metadata server (what GCE_METADATA_HOST points Google's libraries at): the VM's
/// service-account token, its email and the project; only with `Metadata-Flavor: Google`,
/// as the real one.
fn metadata(ctx: &ConnCtx, req: &Request<Incoming>, path: &str) -> Resp {
    let text = |body: &str| {
        let mut r = Response::new(TBody::full(body.to_string()));
        let h = r.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/text"));
        h.insert("metadata-flavor", HeaderValue::from_static("Google"));
        r
    };
    let flavor = req
        .headers()
        .get("metadata-flavor")
        .and_then(|v| v.to_str().ok());
    if flavor != Some("Google") {
        return err_resp(403, "Missing Metadata-Flavor:Google header.", "forbidden");
    }
    match path {
        "instance/service-accounts/default/email" => text(super::TESTBED_VM_EMAIL),
        "project/project-id" => text(super::TESTBED_VM_PROJECT),
        "instance/service-accounts/default/token" => json_resp(200, fresh_token(ctx)),
        _ => err_resp(404, "Not Found", "notFound"),
    }
}

/// `storage.objects.list` and `storage.objects.get`, as named by the knobs' grants: a 403 for
/// a listing of a `deny_list` bucket, or a read of a `deny_get` bucket's object.
fn denied_by_grant(r: &Route, kind: RequestKind, knobs: &Knobs) -> Option<Resp> {
    let (bucket, perm, what) = match (r, kind) {
        (Route::List(b), RequestKind::List) if knobs.deny_list.contains(b) => {
            (b, "storage.objects.list", "bucket")
        }
        (Route::Object { bucket, .. }, RequestKind::GetMeta | RequestKind::GetMedia)
            if knobs.deny_get.contains(bucket) =>
        {
            (bucket, "storage.objects.get", "object")
        }
        _ => return None,
    };
    Some(err_resp(
        403,
        &format!(
            "testbed-caller@physiofs-testbed.iam.gserviceaccount.com does not have {perm} access to the Google Cloud Storage {what} of {bucket}. Permission '{perm}' denied on resource (or it may not exist)."
        ),
        "forbidden",
    ))
}

/// `GET /storage/v1/b/B/iam/testPermissions?permissions=P...`: the asked permissions the
/// caller holds. Like GCS: no token (when tokens are required) is 401, a token the bucket
/// does not know holds none, a requester-pays bucket wants userProject, a missing bucket 404.
fn test_permissions(
    shared: &Shared,
    knobs: &Knobs,
    req: &Request<Incoming>,
    bucket: &str,
    _query: &HashMap<String, String>,
) -> Resp {
    if req.method() != Method::GET {
        return err_resp(405, "GET only", "methodNotAllowed");
    }
    let asked: Vec<String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "permissions")
        .filter_map(|(_, v)| pct_decode(v))
        .collect();
    let query = parse_query(req.uri().query());
    let mut holds = true;
    if !knobs.require_tokens.is_empty()
        && let Err(resp) = check_auth(
            shared,
            knobs,
            req,
            &Route::Bucket(bucket.into()),
            RequestKind::Bucket,
        )
    {
        if resp.status() == StatusCode::UNAUTHORIZED {
            return resp;
        }
        holds = false;
    }
    if knobs.requester_pays && query.get("userProject").is_none_or(|p| p.is_empty()) {
        return err_resp(
            400,
            "Bucket is requester pays bucket but no user project provided.",
            "required",
        );
    }
    if !shared.source.buckets().iter().any(|b| b == bucket) {
        return err_resp(404, "The specified bucket does not exist.", "notFound");
    }
    let granted = |p: &str| match p {
        "storage.objects.list" => !knobs.deny_list.iter().any(|b| b == bucket),
        "storage.objects.get" => !knobs.deny_get.iter().any(|b| b == bucket),
        _ => false,
    };
    let permissions: Vec<&String> = asked.iter().filter(|p| holds && granted(p)).collect();
    let mut v = serde_json::json!({"kind": "storage#testIamPermissionsResponse"});
    if !permissions.is_empty() {
        v["permissions"] = serde_json::json!(permissions);
    }
    json_resp(200, v.to_string())
}

/// A new random `tbtok-…` bearer token, as a token endpoint's JSON answer.
fn fresh_token(ctx: &ConnCtx) -> String {
    let token = format!(
        "tbtok-{:016x}{:016x}",
        ctx.shared.rng.lock().unwrap().next_u64(),
        fastrand::u64(..)
    );
    format!(r#"{{"access_token":"{token}","expires_in":3600,"token_type":"Bearer"}}"#)
}

/// Breaks a successful answer the way `m` says (when `m` applies to this kind of request).
async fn malform(resp: Resp, kind: RequestKind, m: Malformed, shared: &Shared) -> Resp {
    let json_kind = matches!(kind, RequestKind::List | RequestKind::GetMeta);
    let media = matches!(kind, RequestKind::GetMedia);
    let applies = match m {
        Malformed::BadJson
        | Malformed::MissingSize
        | Malformed::NonNumericSize
        | Malformed::BadCrc => json_kind,
        Malformed::RepeatToken | Malformed::HugePage => matches!(kind, RequestKind::List),
        Malformed::NoContentRange | Malformed::WrongContentRange => {
            media && resp.status() == StatusCode::PARTIAL_CONTENT
        }
        Malformed::WrongGeneration | Malformed::ShortBody => media,
    };
    if !applies {
        return resp;
    }
    shared.stats.fault(FaultKind::Malformed);
    let (mut parts, body) = resp.into_parts();
    let h = &mut parts.headers;
    if media {
        match m {
            Malformed::NoContentRange => {
                h.remove("content-range");
            }
            Malformed::WrongContentRange => {
                let cr = h
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if let Some((a, rest)) = cr.strip_prefix("bytes ").and_then(|r| r.split_once('-'))
                    && let Ok(a) = a.parse::<u64>()
                {
                    let v = format!("bytes {}-{rest}", a + 1);
                    h.insert("content-range", HeaderValue::from_str(&v).unwrap());
                }
            }
            Malformed::WrongGeneration => {
                let g = header_number(h, "x-goog-generation");
                h.insert("x-goog-generation", HeaderValue::from(g + 1));
            }
            _ => {
                // ShortBody: announce more than is sent; hyper ends the connection short.
                let n = header_number(h, "content-length");
                h.insert("content-length", HeaderValue::from(n + 7));
            }
        }
        return Response::from_parts(parts, body);
    }
    let BodyKind::Full(Some(bytes)) = body.kind else {
        return Response::from_parts(parts, body);
    };
    let out: Vec<u8> = match m {
        Malformed::BadJson => bytes[..bytes.len() / 2].to_vec(),
        _ => {
            let mut v: serde_json::Value = match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(_) => return Response::from_parts(parts, TBody::full(bytes)),
            };
            let mut objects: Vec<&mut serde_json::Value> = Vec::new();
            let single = v.get("items").is_none() && v.get("name").is_some();
            if single {
                objects.push(&mut v);
            } else if let Some(items) = v.get_mut("items").and_then(|i| i.as_array_mut()) {
                objects.extend(items.iter_mut());
            }
            for o in objects {
                match m {
                    Malformed::MissingSize => {
                        o.as_object_mut().map(|o| o.remove("size"));
                    }
                    Malformed::NonNumericSize => o["size"] = "12 bytes".into(),
                    Malformed::BadCrc => o["crc32c"] = "not-base64!".into(),
                    _ => {}
                }
            }
            match m {
                Malformed::RepeatToken => v["nextPageToken"] = "loop".into(),
                Malformed::HugePage => v["padding"] = "x".repeat(65 << 20).into(),
                _ => {}
            }
            serde_json::to_vec(&v).unwrap()
        }
    };
    parts.headers.remove("content-length");
    Response::from_parts(parts, TBody::full(out))
}

async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Result<Resp, Abort> {
    let path = req.uri().path().to_string();
    if path.starts_with("/_testbed/") {
        return Ok(control(&ctx, req, &path).await);
    }
    if path == "/token" {
        return Ok(oauth_token(&ctx, req).await);
    }
    if path == "/tokeninfo" {
        return Ok(token_info(req).await);
    }
    if let Some(rest) = path.strip_prefix("/computeMetadata/v1/") {
        return Ok(metadata(&ctx, &req, rest));
    }
    let shared = &ctx.shared;
    let query = parse_query(req.uri().query());
    let r = route(&path);
    let is_get = req.method() == Method::GET || req.method() == Method::HEAD;
    let kind = match (&r, is_get) {
        (Route::List(_), true) => RequestKind::List,
        (Route::Bucket(_) | Route::ListBuckets, true) => RequestKind::Bucket,
        (Route::Object { download: true, .. }, true) => RequestKind::GetMedia,
        (Route::Object { .. }, true) if query.get("alt").map(String::as_str) == Some("media") => {
            RequestKind::GetMedia
        }
        (Route::Object { .. }, true) => RequestKind::GetMeta,
        (Route::TestPermissions(_), true) => RequestKind::Permissions,
        _ => RequestKind::Other,
    };
    shared.stats.request(kind);
    shared.stats.protocol(ctx.h2);
    let knobs = shared.knobs();

    if knobs.unavailable {
        ctx.rst.store(true, Ordering::Relaxed);
        ctx.kill.notify_one();
        return Err(Abort);
    }
    let latency = knobs.first_byte_latency + knobs.latency_jitter.mul_f64(shared.unit());
    if !latency.is_zero() {
        shared.stats.delayed(latency);
        tokio::time::sleep(latency).await;
    }

    let mut resp = respond(&ctx, req, r, kind, &query, &knobs).await;
    if let Some(m) = knobs.malformed
        && resp.status().is_success()
    {
        resp = malform(resp, kind, m, shared).await;
    }
    shared.stats.status(resp.status().as_u16());
    if let BodyKind::Full(Some(b)) = &resp.body().kind {
        shared.stats.bytes(b.len() as u64);
    }
    Ok(resp)
}

async fn respond(
    ctx: &Arc<ConnCtx>,
    req: Request<Incoming>,
    r: Route,
    kind: RequestKind,
    query: &HashMap<String, String>,
    knobs: &Knobs,
) -> Resp {
    let shared = &ctx.shared;
    if knobs.fail_rate > 0.0 && shared.unit() < knobs.fail_rate {
        let mut resp = if shared.unit() < 0.5 {
            shared.stats.fault(FaultKind::Fail429);
            err_resp(
                429,
                "The rate of requests to this bucket exceeds the rate limit. Please reduce the rate of requests.",
                "rateLimitExceeded",
            )
        } else {
            shared.stats.fault(FaultKind::Fail503);
            err_resp(
                503,
                "We encountered an internal error. Please try again.",
                "backendError",
            )
        };
        if shared.unit() < 0.5 {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        return resp;
    }

    if let Route::TestPermissions(bucket) = &r {
        return test_permissions(shared, knobs, &req, bucket, query);
    }
    if !knobs.require_tokens.is_empty()
        && let Err(resp) = check_auth(shared, knobs, &req, &r, kind)
    {
        return resp;
    }
    if let Some(resp) = denied_by_grant(&r, kind, knobs) {
        return resp;
    }
    if knobs.requester_pays && query.get("userProject").is_none_or(|p| p.is_empty()) {
        return err_resp(
            400,
            "Bucket is requester pays bucket but no user project provided.",
            "required",
        );
    }

    let base = base_url(ctx, &req);
    let src = shared.source.clone();
    match r {
        Route::ListBuckets if kind != RequestKind::Other => {
            let items: Vec<BucketJson> = src
                .buckets()
                .iter()
                .map(|b| BucketJson::new(&base, b))
                .collect();
            json_resp(
                200,
                serde_json::json!({"kind": "storage#buckets", "items": items}).to_string(),
            )
        }
        Route::Bucket(b) if kind != RequestKind::Other => {
            if src.buckets().contains(&b) {
                json_resp(200, to_json(&BucketJson::new(&base, &b)))
            } else {
                err_resp(404, "The specified bucket does not exist.", "notFound")
            }
        }
        Route::List(b) if kind != RequestKind::Other => {
            let p = ListParams {
                prefix: query.get("prefix").cloned().unwrap_or_default(),
                delimiter: query.get("delimiter").cloned(),
                page_token: query.get("pageToken").cloned(),
                max_results: match query.get("maxResults").map(|m| m.parse::<usize>()) {
                    None => None,
                    Some(Ok(n)) => Some(n),
                    Some(Err(_)) => {
                        return err_resp(400, "Invalid value for maxResults", "invalid");
                    }
                },
                start_offset: query.get("startOffset").cloned(),
                end_offset: query.get("endOffset").cloned(),
            };
            let scan = Arc::new(ScanCounter::new(src.clone()));
            let counted = scan.clone();
            let res = tokio::task::spawn_blocking(move || {
                listing::list(&*counted, &b, &p).map(|page| {
                    let items = page
                        .items
                        .iter()
                        .map(|o| ObjectJson::new(&base, &b, o, src.hashes(&b, o)))
                        .collect();
                    to_json(&ListJson {
                        kind: "storage#objects",
                        next_page_token: page.next_page_token,
                        prefixes: page.prefixes,
                        items,
                    })
                })
            })
            .await
            .expect("list task");
            shared.stats.scanned(scan.scanned.load(Ordering::Relaxed));
            match res {
                Ok(body) => json_resp(200, body),
                Err(ListError::NoSuchBucket) => {
                    err_resp(404, "The specified bucket does not exist.", "notFound")
                }
                Err(ListError::BadPageToken) => err_resp(400, "Invalid page token.", "invalid"),
            }
        }
        Route::Object { bucket, name, .. } if kind != RequestKind::Other => {
            let media = kind == RequestKind::GetMedia;
            object(ctx, &req, &base, bucket, name, media, query, knobs).await
        }
        _ => err_resp(404, "Not Found", "notFound"),
    }
}

/// The source as the listing code sees it, counting the objects it reads (`list_scanned`).
struct ScanCounter {
    inner: Arc<dyn ObjectSource>,
    scanned: std::sync::atomic::AtomicU64,
}

impl ScanCounter {
    fn new(inner: Arc<dyn ObjectSource>) -> Self {
        ScanCounter {
            inner,
            scanned: Default::default(),
        }
    }
}

impl ObjectSource for ScanCounter {
    fn buckets(&self) -> Vec<String> {
        self.inner.buckets()
    }
    fn list_from(&self, bucket: &str, start: &str, limit: usize) -> Option<Vec<SourceObject>> {
        let v = self.inner.list_from(bucket, start, limit)?;
        self.scanned.fetch_add(v.len() as u64, Ordering::Relaxed);
        Some(v)
    }
    fn stat(&self, bucket: &str, name: &str) -> Option<SourceObject> {
        self.inner.stat(bucket, name)
    }
    fn read_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        self.inner.read_at(bucket, obj, offset, buf)
    }
    fn bytes_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        max: usize,
    ) -> Option<std::io::Result<Bytes>> {
        self.inner.bytes_at(bucket, obj, offset, max)
    }
    fn hashes(&self, bucket: &str, obj: &SourceObject) -> Option<(String, Option<String>)> {
        self.inner.hashes(bucket, obj)
    }
}

#[allow(clippy::result_large_err)]
fn check_auth(
    shared: &Shared,
    knobs: &Knobs,
    req: &Request<Incoming>,
    r: &Route,
    kind: RequestKind,
) -> Result<(), Resp> {
    let (perm, what) = match (r, kind) {
        (_, RequestKind::List) => ("storage.objects.list", "bucket"),
        (Route::Bucket(_) | Route::ListBuckets, _) => ("storage.buckets.get", "bucket"),
        _ => ("storage.objects.get", "object"),
    };
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        let mut resp = err_resp(
            401,
            &format!(
                "Anonymous caller does not have {perm} access to the Google Cloud Storage {what}. Permission '{perm}' denied on resource (or it may not exist)."
            ),
            "required",
        );
        resp.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Bearer realm=\"https://accounts.google.com/\""),
        );
        return Err(resp);
    };
    let matches = |list: &[String]| {
        list.iter().any(|t| match t.strip_suffix('*') {
            Some(prefix) => token.starts_with(prefix),
            None => t == token,
        })
    };
    let invalid = || {
        let mut resp = err_resp(401, "Invalid Credentials", "authError");
        resp.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static(
                "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
            ),
        );
        resp
    };
    if matches(&knobs.revoked_tokens) {
        return Err(invalid());
    }
    if !matches(&knobs.require_tokens) {
        return Err(err_resp(
            403,
            &format!(
                "testbed-caller@physiofs-testbed.iam.gserviceaccount.com does not have {perm} access to the Google Cloud Storage {what}. Permission '{perm}' denied on resource (or it may not exist)."
            ),
            "forbidden",
        ));
    }
    if let Some(ttl) = knobs.token_ttl {
        let now = Instant::now();
        let first = *shared
            .token_first_use
            .lock()
            .unwrap()
            .entry(token.to_string())
            .or_insert(now);
        if now.duration_since(first) > ttl {
            return Err(invalid());
        }
    }
    Ok(())
}

/// Parsed `Range` header: Some(Ok((start, end_inclusive))) / Some(Err(())) = unsatisfiable / None = whole.
fn parse_range(h: Option<&str>, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = h?.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || size == 0 {
            return Some(Err(()));
        }
        return Some(Ok((size.saturating_sub(n), size - 1)));
    }
    let start: u64 = a.parse().ok()?;
    let end: Option<u64> = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    if let Some(e) = end
        && e < start
    {
        return None;
    }
    if start >= size {
        return Some(Err(()));
    }
    Some(Ok((start, end.unwrap_or(u64::MAX).min(size - 1))))
}

#[allow(clippy::too_many_arguments)]
async fn object(
    ctx: &Arc<ConnCtx>,
    req: &Request<Incoming>,
    base: &str,
    bucket: String,
    name: String,
    media: bool,
    query: &HashMap<String, String>,
    knobs: &Knobs,
) -> Resp {
    let shared = &ctx.shared;
    let src = shared.source.clone();
    let (b2, n2) = (bucket.clone(), name.clone());
    let found = tokio::task::spawn_blocking(move || {
        let o = src.stat(&b2, &n2)?;
        let h = src.hashes(&b2, &o);
        Some((o, h))
    })
    .await
    .expect("stat task");
    let not_found = || err_resp(404, &format!("No such object: {bucket}/{name}"), "notFound");
    let Some((obj, hashes)) = found else {
        if !shared.source.buckets().contains(&bucket) {
            return err_resp(404, "The specified bucket does not exist.", "notFound");
        }
        return not_found();
    };
    if let Some(g) = query.get("generation").filter(|g| !g.is_empty()) {
        match g.parse::<i64>() {
            Ok(g) if g == obj.generation => {}
            Ok(_) => return not_found(),
            Err(_) => {
                return err_resp(400, &format!("Invalid argument: generation={g}"), "invalid");
            }
        }
    }
    for (param, want_match) in [("ifGenerationMatch", true), ("ifGenerationNotMatch", false)] {
        if let Some(Ok(g)) = query.get(param).map(|g| g.parse::<i64>())
            && (g == obj.generation) != want_match
        {
            return if want_match {
                err_resp(
                    412,
                    "At least one of the pre-conditions you specified did not hold.",
                    "conditionNotMet",
                )
            } else {
                let mut r = Response::new(TBody::empty());
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            };
        }
    }
    if !media {
        return json_resp(200, to_json(&ObjectJson::new(base, &bucket, &obj, hashes)));
    }

    let size = obj.size;
    let range = parse_range(
        req.headers().get("range").and_then(|h| h.to_str().ok()),
        size,
    );
    let (status, start, len) = match range {
        Some(Err(())) => {
            let mut r = err_resp(
                416,
                "Request range not satisfiable",
                "requestedRangeNotSatisfiable",
            );
            r.headers_mut().insert(
                "content-range",
                HeaderValue::from_str(&format!("bytes */{size}")).unwrap(),
            );
            return r;
        }
        Some(Ok((a, b))) => (206, a, b - a + 1),
        None => (200, 0, size),
    };

    let corrupt_at = (len > 0 && knobs.corrupt_rate > 0.0 && shared.unit() < knobs.corrupt_rate)
        .then(|| {
            shared.stats.fault(FaultKind::Corrupt);
            ((len as f64 * shared.unit()) as u64).min(len - 1)
        });
    let fault = if len > 0 {
        let u = shared.unit();
        let cut = |u: f64| -> u64 {
            // Somewhere in the middle: 10%..90% of the body, at least 1 byte short of the end.
            let f = 0.1 + 0.8 * u;
            ((len as f64 * f) as u64).min(len - 1)
        };
        let (r1, r2, r3) = (
            knobs.reset_rate,
            knobs.reset_rate + knobs.truncate_rate,
            knobs.reset_rate + knobs.truncate_rate + knobs.stall_rate,
        );
        if u < r1 {
            shared.stats.fault(FaultKind::Reset);
            Some((cut(shared.unit()), Fault::Reset))
        } else if u < r2 {
            shared.stats.fault(FaultKind::Truncate);
            Some((cut(shared.unit()), Fault::Truncate))
        } else if u < r3 {
            shared.stats.fault(FaultKind::Stall);
            Some((cut(shared.unit()), Fault::Stall(knobs.stall_duration)))
        } else {
            None
        }
    } else {
        None
    };

    let body = if len == 0 {
        TBody::empty()
    } else {
        let (tx, rx) = mpsc::channel(4);
        let src = shared.source.clone();
        let b = bucket.clone();
        let o = obj.clone();
        tokio::task::spawn_blocking(move || produce(&*src, &b, &o, start, len, tx));
        TBody {
            kind: BodyKind::Media(Box::new(MediaBody {
                rx,
                len,
                sent: 0,
                pending: None,
                ready: None,
                fault,
                bandwidth: knobs.bandwidth,
                pacer: ctx.pacer.clone(),
                sleep: None,
                stalled: false,
                finishing: None,
                done: false,
                shared: shared.clone(),
                rst: ctx.rst.clone(),
                kill: ctx.kill.clone(),
                corrupt_at,
            })),
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    let h = r.headers_mut();
    let hv =
        |s: String| HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("?"));
    h.insert("content-type", hv(obj.content_type.clone()));
    h.insert("content-length", hv(len.to_string()));
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert("etag", hv(format!("\"{}\"", etag(obj.generation))));
    h.insert("x-goog-generation", hv(obj.generation.to_string()));
    h.insert("x-goog-metageneration", HeaderValue::from_static("1"));
    h.insert("x-goog-stored-content-length", hv(size.to_string()));
    h.insert(
        "x-goog-stored-content-encoding",
        HeaderValue::from_static("identity"),
    );
    h.insert("x-goog-storage-class", HeaderValue::from_static("STANDARD"));
    h.insert("last-modified", hv(httpdate(obj.updated_unix)));
    h.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, no-store, max-age=0, must-revalidate"),
    );
    if let Some((crc, md5)) = &hashes {
        let v = match md5 {
            Some(m) => format!("crc32c={crc},md5={m}"),
            None => format!("crc32c={crc}"),
        };
        h.insert("x-goog-hash", hv(v));
    }
    if status == 206 {
        h.insert(
            "content-range",
            hv(format!("bytes {start}-{}/{size}", start + len - 1)),
        );
    }
    r
}

fn httpdate(unix: i64) -> String {
    // RFC 7231 IMF-fixdate, from the RFC 3339 rendering.
    let s = super::json::rfc3339_millis(unix);
    let (y, mo, d) = (&s[0..4], &s[5..7], &s[8..10]);
    let days = unix.div_euclid(86_400);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months[mo.parse::<usize>().unwrap_or(1) - 1];
    format!("{wd}, {d} {m} {y} {} GMT", &s[11..19])
}

/// Blocking producer: read the range in pieces of up to CHUNK bytes and hand them to the body
/// (shared with the source when it holds them in memory, else read into a fresh buffer).
fn produce(
    src: &dyn ObjectSource,
    bucket: &str,
    obj: &SourceObject,
    start: u64,
    len: u64,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(CHUNK);
        let r = match src.bytes_at(bucket, obj, start + off, n) {
            Some(r) => r,
            None => {
                let mut buf = vec![0u8; n];
                src.read_at(bucket, obj, start + off, &mut buf)
                    .map(|_| Bytes::from(buf))
            }
        };
        let got = r.as_ref().map_or(0, |b| b.len() as u64);
        let failed = r.is_err() || got == 0;
        if tx.blocking_send(r).is_err() || failed {
            return;
        }
        off += got;
    }
}

// ---------------------------------------------------------------- control

async fn control(ctx: &ConnCtx, req: Request<Incoming>, path: &str) -> Resp {
    let shared = &ctx.shared;
    let method = req.method().clone();
    match (method, path.trim_end_matches('/')) {
        (Method::GET, "/_testbed/stats") => json_resp(200, to_json(&shared.stats.snapshot())),
        (Method::POST, "/_testbed/stats/reset") => {
            shared.stats.reset();
            json_resp(200, to_json(&shared.stats.snapshot()))
        }
        (Method::GET, "/_testbed/faults") => json_resp(200, to_json(&*shared.knobs())),
        (Method::POST, "/_testbed/faults") => {
            let body = match read_body(req.into_body(), 1 << 20).await {
                Ok(b) => b,
                Err(e) => return err_resp(400, &e, "invalid"),
            };
            let upd: KnobsUpdate = if body.iter().all(u8::is_ascii_whitespace) {
                KnobsUpdate::default()
            } else {
                match serde_json::from_slice(&body) {
                    Ok(u) => u,
                    Err(e) => return err_resp(400, &format!("bad knobs JSON: {e}"), "invalid"),
                }
            };
            let mut guard = shared.knobs.write().unwrap();
            let mut k = (**guard).clone();
            if let Err(e) = upd.apply(&mut k, &shared.initial) {
                return err_resp(400, &e, "invalid");
            }
            *guard = Arc::new(k.clone());
            drop(guard);
            if upd.forget_tokens {
                shared.token_first_use.lock().unwrap().clear();
            }
            json_resp(200, to_json(&k))
        }
        _ => err_resp(404, "Not Found", "notFound"),
    }
}

/// A numeric response header, 0 when absent or not a number.
fn header_number(h: &hyper::HeaderMap, name: &str) -> i64 {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Some(Ok((0, 9))));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Some(Ok((90, 99))));
        assert_eq!(parse_range(Some("bytes=90-200"), 100), Some(Ok((90, 99))));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Some(Ok((90, 99))));
        assert_eq!(parse_range(Some("bytes=-1000"), 100), Some(Ok((0, 99))));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Some(Err(())));
        assert_eq!(parse_range(Some("bytes=0-"), 0), Some(Err(())));
        assert_eq!(parse_range(Some("bytes=-5"), 0), Some(Err(())));
        assert_eq!(parse_range(Some("bytes=5-1"), 100), None);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), None);
        assert_eq!(parse_range(Some("items=0-1"), 100), None);
        assert_eq!(parse_range(Some("bytes=x-1"), 100), None);
        assert_eq!(parse_range(None, 100), None);
    }

    #[test]
    fn routes() {
        assert!(matches!(route("/storage/v1/b/bk"), Route::Bucket(b) if b == "bk"));
        assert!(matches!(route("/storage/v1/b/bk/o"), Route::List(b) if b == "bk"));
        assert!(
            matches!(route("/storage/v1/b/bk/o/a%2Fb%20c"), Route::Object{bucket, name, download: false} if bucket == "bk" && name == "a/b c")
        );
        assert!(
            matches!(route("/download/storage/v1/b/bk/o/a/b"), Route::Object{name, download: true, ..} if name == "a/b")
        );
        assert!(matches!(route("/storage/v1/b"), Route::ListBuckets));
        assert!(matches!(route("/nope"), Route::Unknown));
        assert!(matches!(route("/download/storage/v1/b/bk"), Route::Unknown));
    }

    #[test]
    fn http_date() {
        assert_eq!(httpdate(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 GMT");
    }
}
