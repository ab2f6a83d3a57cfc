//! The GCS JSON API client on reqwest.
//!
//! Every request goes through [`GcsClient::send`], the one place where the billing project,
//! the bearer token, retries with backoff and the request counters are applied. Media reads
//! are pinned to the listed generation and every answer is checked (status, Content-Range,
//! length, generation) before a byte is handed to the filesystem.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::auth::{CredentialKind, TokenSource};
use super::media::{Answer, MediaConns};
use super::pool::{BufferPool, Received};
use super::{
    ClientError, ListPage, ListRequest, ObjectClient, ObjectMeta, ObjectVersion, parse_crc32c,
};

/// Characters left as-is in a path segment: RFC 3986 unreserved. Everything else,
/// including `/`, is escaped so an object name always travels as ONE segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Retry policy for idempotent requests (every request we make is one).
#[derive(Clone, Debug)]
pub struct RetryConfig {
    /// Attempts in all, including the first.
    pub max_attempts: u32,
    /// First backoff; doubles per attempt, with full jitter.
    pub base_delay: Duration,
    /// Cap on one backoff sleep.
    pub max_delay: Duration,
    /// Give up once this much time has passed since the first attempt.
    pub deadline: Duration,
}

impl RetryConfig {
    /// For the checks at mount time: a wrong endpoint or a dead network is reported within
    /// seconds, not after the full read-time budget.
    pub fn startup() -> Self {
        RetryConfig {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            deadline: Duration::from_secs(15),
        }
    }

    /// The stricter of two policies, field by field.
    pub fn min(&self, other: &RetryConfig) -> RetryConfig {
        RetryConfig {
            max_attempts: self.max_attempts.min(other.max_attempts),
            base_delay: self.base_delay.min(other.base_delay),
            max_delay: self.max_delay.min(other.max_delay),
            deadline: self.deadline.min(other.deadline),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        // Enough to ride out a short throttling burst or a server restart, short enough that a
        // reader blocked on a dead network hears EIO within a minute.
        RetryConfig {
            max_attempts: 20,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(8),
            deadline: Duration::from_secs(60),
        }
    }
}

/// Retry bookkeeping for one logical request.
///
/// The clock starts at the first attempt and never starts over: a request, however many
/// attempts it takes and however its bytes arrive, ends within the deadline. Progress only
/// resets the attempt count, so a body broken now and then on a flaky network gets its full
/// retries, but a server dripping bytes (or dripping and hanging up, again and again) cannot
/// hold a reader past `--retry-deadline`.
struct Backoff<'a> {
    cfg: &'a RetryConfig,
    /// When the first attempt began.
    since: Instant,
    attempt: u32,
}

impl<'a> Backoff<'a> {
    fn new(cfg: &'a RetryConfig) -> Self {
        Backoff {
            cfg,
            since: Instant::now(),
            attempt: 0,
        }
    }

    /// A broken transfer delivered bytes before it failed: the attempt count starts over (the
    /// deadline does not).
    fn progress(&mut self) {
        self.attempt = 0;
    }

    /// After attempt `self.attempt` failed with `e`: the sleep before the next, or None to give up.
    fn next_delay(&self, e: &ClientError, retry_after: Option<Duration>) -> Option<Duration> {
        backoff_delay(
            self.cfg,
            self.attempt,
            self.since.elapsed(),
            e.is_transient(),
            retry_after,
            fastrand::f64(),
        )
    }
}

/// The retry policy as a pure function: after `attempt` attempts (1 = the first one) of a
/// streak that began `elapsed` ago have failed, the sleep before the next, or None to give up
/// (the failure is not `transient`, or the attempts or the deadline are used up).
///
/// Exponential backoff with full jitter: the sleep is `jitter` (uniform in `[0, 1)`) times a
/// cap of `base_delay * 2^attempt`, at most `max_delay`. A server's `Retry-After` raises it
/// (to at most `max_delay`), and no sleep reaches past the deadline.
fn backoff_delay(
    cfg: &RetryConfig,
    attempt: u32,
    elapsed: Duration,
    transient: bool,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Option<Duration> {
    if !transient || attempt >= cfg.max_attempts || elapsed >= cfg.deadline {
        return None;
    }
    let cap = cfg
        .base_delay
        .saturating_mul(1u32 << attempt.min(16))
        .min(cfg.max_delay);
    let mut delay = cap.mul_f64(jitter);
    if let Some(ra) = retry_after {
        delay = delay.max(ra.min(cfg.max_delay));
    }
    // Never sleep past the deadline.
    Some(delay.min(cfg.deadline.saturating_sub(elapsed)))
}

#[derive(Clone, Debug)]
pub struct GcsConfig {
    /// Service root, e.g. `https://storage.googleapis.com` or `http://127.0.0.1:4443`.
    pub endpoint: String,
    pub bucket: String,
    /// Sent as `userProject` on every call (requester-pays buckets need it).
    pub billing_project: Option<String>,
    pub retry: RetryConfig,
    /// Idle connections kept per host (connection reuse matters more than anything for latency).
    pub pool_size: usize,
    /// A response whose headers or next body bytes take longer than this is abandoned (and
    /// retried; a media body resumes from its first missing byte).
    pub stall_timeout: Duration,
    /// Extra trusted certificate authorities (PEM), besides the built-in web roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// HTTP version over HTTPS (plain-HTTP endpoints always get HTTP/1.1).
    pub protocol: HttpProtocol,
}

pub use crate::cli::HttpProtocol;

/// Everything the protocol choice decides, in one place.
///
/// HTTP/1.1 is the default (README "HTTP/1.1 or HTTP/2"): against the TLS testbed at 30 ms
/// on the 2-core dev VM (`bench/run --tls`, 2026-12-07 07:23 UTC), h1 against h2: DICOM
/// epoch 830 vs 719 MB/s, 16 JPG readers 618 vs 471 MB/s, a 1 GiB sequential read 881 vs
/// 698 MB/s, header scan 485 vs 475 files/s, at 1.3-1.4 CPU s/GiB either way (the same order
/// in the two runs before it that day). With HTTP/1.1 each
/// request in flight has its own connection, so the kernel's TCP windows and one rustls
/// session per connection carry the bytes in parallel; with HTTP/2 all of a mount's requests share one connection, one TLS
/// stream (one core's worth of decryption) and its flow-control windows. gcsfuse defaults to
/// HTTP/1.1 for the same reason; HTTP/2 saves handshakes and sockets where many small
/// requests come at once.
fn apply_protocol(
    b: reqwest::ClientBuilder,
    protocol: HttpProtocol,
    pool_size: usize,
) -> reqwest::ClientBuilder {
    match protocol {
        // One connection per request in flight: keep as many idle as may be busy at once, so
        // a burst after a pause does not pay TCP + TLS handshakes again.
        HttpProtocol::Http1 => b.http1_only().pool_max_idle_per_host(pool_size),
        // One connection for everything: windows large enough that 16 readers with a 4 MiB
        // request each never wait on WINDOW_UPDATE round trips (64 MiB per connection, 8 MiB
        // per stream; the server's MAX_CONCURRENT_STREAMS, 100 at GCS, bounds the streams).
        HttpProtocol::Http2 => b
            .pool_max_idle_per_host(pool_size)
            .http2_initial_stream_window_size(8 << 20)
            .http2_initial_connection_window_size(64 << 20)
            .http2_max_frame_size(1 << 20)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(false),
    }
}

const USER_AGENT: &str = concat!("physiofs/", env!("CARGO_PKG_VERSION"));

/// Whether reqwest sends requests to `endpoint` through a proxy, by the matcher it uses itself
/// (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` in either case, and `NO_PROXY`). Media reads then
/// go through reqwest too: the media connections go straight to the endpoint.
fn proxied(proxies: &hyper_util::client::proxy::matcher::Matcher, endpoint: &str) -> bool {
    match endpoint.parse::<hyper::Uri>() {
        Ok(uri) => proxies.intercept(&uri).is_some(),
        Err(_) => true, // not a URL reqwest could use either; leave it to reqwest
    }
}

/// The TLS setup of both clients (reqwest's and the media connections): the web roots and
/// the certificates of `--ca-file`, TLS 1.2 and 1.3, ALPN for `protocol`.
fn tls_config(cfg: &GcsConfig) -> Result<tokio_rustls::rustls::ClientConfig, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.ca_file {
        let shown = path.display();
        let pem = std::fs::read(path).map_err(|e| format!("--ca-file {shown}: {e}"))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--ca-file {shown}: not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err(format!(
                "--ca-file {shown}: no PEM certificate (BEGIN CERTIFICATE) in it"
            ));
        }
        // A bundle (a system's, through SSL_CERT_FILE) may hold a certificate webpki cannot
        // use; like curl, trust the others, and say so.
        let (_, unusable) = roots.add_parsable_certificates(certs);
        if unusable > 0 {
            tracing::warn!(file = %shown, unusable, "--ca-file: certificates skipped (not usable as trust anchors)");
        }
    }
    let mut provider = rustls::crypto::ring::default_provider();
    // Offer AES-128-GCM first, as Chrome and Go (rclone) do; rustls's default puts
    // AES-256-GCM first. The same protection for this use, and 10 AES rounds per block
    // instead of 14. A 1 GiB read over TLS at 30 ms, 4 alternating pairs, 2026-12-08
    // 00:10 UTC: 938-1,098 MB/s against 836-1,049 with AES-256-GCM, faster in 4 of 4.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = match cfg.protocol {
        HttpProtocol::Http1 => vec![b"http/1.1".to_vec()],
        HttpProtocol::Http2 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(tls)
}

/// The media connections for `endpoint` (`client::media`), with the TLS setup reqwest has;
/// None for HTTP/2 or behind a proxy.
fn media_conns(
    cfg: &GcsConfig,
    endpoint: &str,
    tls: &tokio_rustls::rustls::ClientConfig,
    stats: Arc<super::media::MediaStats>,
) -> Result<Option<Arc<MediaConns>>, ClientError> {
    let proxies = hyper_util::client::proxy::matcher::Matcher::from_system();
    if cfg.protocol != HttpProtocol::Http1 || proxied(&proxies, endpoint) {
        return Ok(None);
    }
    let tls = endpoint.starts_with("https://").then(|| {
        let mut tls = tls.clone();
        // client::tls13 protects the records itself once rustls made the connection.
        tls.enable_secret_extraction = true;
        Arc::new(tls)
    });
    let conns = MediaConns::new(endpoint, tls, cfg.pool_size, Duration::from_secs(10), stats)
        .map_err(|cause| ClientError::Network {
            endpoint: endpoint.to_string(),
            cause,
        })?;
    Ok(Some(Arc::new(conns)))
}

/// Prefix of a `ClientError::Network` cause when the server's certificate was refused, so the
/// start-up check can tell the user about `--ca-file` rather than about reachability.
pub const UNTRUSTED_CERTIFICATE: &str = "TLS: the server's certificate is not trusted";

/// Counters of what the client sent and received; cheap to read at any time.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub list_requests: AtomicU64,
    pub stat_requests: AtomicU64,
    pub get_requests: AtomicU64,
    pub retries: AtomicU64,
    /// Media reads continued from the first missing byte after a broken or stalled body.
    pub resumes: AtomicU64,
    /// Whole-object reads whose CRC32C did not match the listing (each one was asked again).
    pub checksum_mismatches: AtomicU64,
    pub bytes_fetched: AtomicU64,
    /// Requests asked again with a fresh token after an HTTP 401.
    pub token_refreshes: AtomicU64,
    /// `iam/testPermissions` requests (the start-up permission check).
    pub permission_requests: AtomicU64,
    /// How the media connections were made.
    pub media: Arc<super::media::MediaStats>,
}

pub struct GcsClient {
    http: reqwest::Client,
    cfg: GcsConfig,
    tokens: TokenSource,
    objects_url: String,
    /// `objects_url` parsed once: a request's URL is a clone of it with a path and query set,
    /// not a parse of a whole string (host included) per request.
    objects_base: reqwest::Url,
    pub stats: Arc<ClientStats>,
    /// Recycled receive buffers for full-size media requests.
    pool: Arc<BufferPool>,
    /// Media reads' own connections (`client::media`); None when reqwest carries them too
    /// (HTTP/2, or a proxy in the environment).
    media: Option<Arc<MediaConns>>,
    /// The refusals already logged (see `log_refused`).
    refusals: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    List,
    Stat,
    Get,
    Permissions,
}

impl GcsClient {
    pub fn new(cfg: GcsConfig, tokens: TokenSource) -> Result<Self, ClientError> {
        let tls = tls_config(&cfg).map_err(|cause| ClientError::Network {
            endpoint: cfg.endpoint.clone(),
            cause,
        })?;
        let builder = reqwest::Client::builder().use_preconfigured_tls(tls.clone());
        let http = apply_protocol(builder, cfg.protocol, cfg.pool_size)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            // Backstop for list/stat bodies; media bodies are timed per chunk (`stall_timeout`).
            .read_timeout(cfg.stall_timeout + Duration::from_secs(1))
            .user_agent(USER_AGENT)
            // The JSON API never redirects; following one would send the bearer token to
            // whatever host the answer names. A 3xx is an error (see `error_from`).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Network {
                endpoint: cfg.endpoint.clone(),
                cause: format!("cannot build HTTP client: {e}"),
            })?;
        let endpoint = cfg.endpoint.trim_end_matches('/').to_string();
        if tokens.credentials().kind != CredentialKind::Anonymous
            && plain_http(&endpoint) == Some(false)
        {
            return Err(ClientError::Auth(format!(
                "refusing to send the bearer token of {} in clear to {endpoint}: use https://, \
                 or --anonymous for a server that needs no credentials",
                tokens.credentials()
            )));
        }
        let objects_url = format!(
            "{endpoint}/storage/v1/b/{}/o",
            utf8_percent_encode(&cfg.bucket, SEGMENT)
        );
        let objects_base = reqwest::Url::parse(&objects_url).map_err(|e| ClientError::Network {
            endpoint: endpoint.clone(),
            cause: format!("not a URL ({e}): give the endpoint as http(s)://HOST[:PORT]"),
        })?;
        let stats = Arc::new(ClientStats::default());
        let media = media_conns(&cfg, &endpoint, &tls, stats.media.clone())?;
        Ok(GcsClient {
            http,
            media,
            cfg: GcsConfig { endpoint, ..cfg },
            tokens,
            objects_url,
            objects_base,
            stats,
            // 8 x 4 MiB waiting at most: 32 MiB, within the memory slack `--cache-size` allows.
            pool: BufferPool::new(super::FULL_REQUEST as usize, 8),
            refusals: Arc::default(),
        })
    }

    /// The same client (connections, credentials, counters) with another retry policy.
    pub fn with_retry(&self, retry: RetryConfig) -> GcsClient {
        GcsClient {
            http: self.http.clone(),
            cfg: GcsConfig {
                retry,
                ..self.cfg.clone()
            },
            tokens: self.tokens.clone(),
            objects_url: self.objects_url.clone(),
            objects_base: self.objects_base.clone(),
            stats: self.stats.clone(),
            pool: self.pool.clone(),
            media: self.media.clone(),
            refusals: self.refusals.clone(),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.cfg.endpoint
    }

    /// Whose credentials this client sends.
    pub fn credentials(&self) -> &super::auth::Credentials {
        self.tokens.credentials()
    }

    /// Which of `permissions` the caller holds on the bucket
    /// (`GET /b/BUCKET/iam/testPermissions`, with userProject like every call). An answer
    /// that is not a testIamPermissions response (an emulator answering something else) is
    /// `Malformed`, so it is never read as "holds none".
    pub async fn test_permissions(&self, permissions: &[&str]) -> Result<Vec<String>, ClientError> {
        let base = format!(
            "{}/storage/v1/b/{}/iam/testPermissions",
            self.cfg.endpoint,
            utf8_percent_encode(&self.cfg.bucket, SEGMENT)
        );
        let params: Vec<(&str, String)> = permissions
            .iter()
            .map(|p| ("permissions", p.to_string()))
            .collect();
        let url = self.url_with(&base, &params)?;
        let what = format!("permissions on gs://{}", self.cfg.bucket);
        self.get_json(Kind::Permissions, url, what, parse_permissions)
            .await
    }

    fn url_with(&self, base: &str, params: &[(&str, String)]) -> Result<reqwest::Url, ClientError> {
        let url = reqwest::Url::parse(base)
            .map_err(|e| ClientError::Malformed(format!("bad URL {base}: {e}")))?;
        Ok(self.with_query(url, params))
    }

    /// The URL of the object listing (`name` None) or of object `name`, with `params` and the
    /// billing project.
    fn objects_url_with<V: AsRef<str>>(
        &self,
        name: Option<&str>,
        params: &[(&str, V)],
    ) -> reqwest::Url {
        let mut url = self.objects_base.clone();
        if let Some(name) = name {
            // Already percent-encoded, so the path is taken as it is.
            let path = format!("{}/{}", url.path(), utf8_percent_encode(name, SEGMENT));
            url.set_path(&path);
        }
        self.with_query(url, params)
    }

    fn with_query<V: AsRef<str>>(
        &self,
        mut url: reqwest::Url,
        params: &[(&str, V)],
    ) -> reqwest::Url {
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v.as_ref());
            }
            if let Some(p) = &self.cfg.billing_project {
                q.append_pair("userProject", p);
            }
        }
        url
    }

    /// Sends one request once: billing project (in the URL), bearer token, headers, and a
    /// bound on the wait for the response headers.
    async fn send_once(
        &self,
        url: &reqwest::Url,
        headers: &[(&str, String)],
        token: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self.http.get(url.clone());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(tok) = token {
            // reqwest marks this header sensitive: it is never printed by Debug or logs.
            req = req.bearer_auth(tok);
        }
        match tokio::time::timeout(self.cfg.stall_timeout, req.send()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(self.network_error(&e)),
            Err(_) => Err(self.no_response()),
        }
    }

    fn count(&self, kind: Kind) {
        match kind {
            Kind::List => &self.stats.list_requests,
            Kind::Stat => &self.stats.stat_requests,
            Kind::Get => &self.stats.get_requests,
            Kind::Permissions => &self.stats.permission_requests,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    async fn pause(&self, kind: Kind, attempt: u32, e: &ClientError, delay: Duration) {
        tracing::debug!(?kind, attempt, error = %e, ?delay, "retrying");
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(delay).await;
    }

    /// Sends one logical request, retrying transient failures with exponential backoff and
    /// full jitter. `check` turns a response into a value or an error; it runs inside the
    /// retry loop, so a broken body is retried like a failed connect.
    /// A JSON request through `send`: an error status becomes its `ClientError`, a body is
    /// read (bounded) and handed to `parse`.
    async fn get_json<T>(
        &self,
        kind: Kind,
        url: reqwest::Url,
        what: String,
        parse: fn(&[u8], &str) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.send(kind, url, |resp| {
            let what = what.clone();
            async move {
                if !resp.status().is_success() {
                    return Err(error_from(resp, &what).await);
                }
                parse(&read_body(resp, &what).await?, &what)
            }
        })
        .await
    }

    async fn send<T, F, Fut>(
        &self,
        kind: Kind,
        url: reqwest::Url,
        check: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(reqwest::Response) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut backoff = Backoff::new(&self.cfg.retry);
        let mut refreshed = false;
        loop {
            backoff.attempt += 1;
            self.count(kind);
            let token = self.tokens.token().await?;
            let attempt = async {
                match self.send_once(&url, &[], token.as_deref()).await {
                    Ok(resp) => {
                        let ra = retry_after(&resp);
                        (check(resp).await, ra)
                    }
                    Err(e) => (Err(e), None),
                }
            };
            let (result, retry_after) =
                match tokio::time::timeout(self.attempt_budget(&backoff), attempt).await {
                    Ok(r) => r,
                    Err(_) => (Err(self.past_deadline()), None),
                };
            match result {
                Ok(v) => return Ok(v),
                Err(e)
                    if self
                        .refresh_after(&e, &mut refreshed, token.as_deref())
                        .await => {}
                Err(e) => match backoff.next_delay(&e, retry_after) {
                    Some(delay) => self.pause(kind, backoff.attempt, &e, delay).await,
                    None => return Err(self.refused(e)),
                },
            }
        }
    }

    /// After a 401: the token may have expired early or been revoked and replaced, so the
    /// cached one is dropped and the request asked once more with a fresh one (once per
    /// logical request, and only when the credentials can give another token).
    async fn refresh_after(
        &self,
        e: &ClientError,
        refreshed: &mut bool,
        sent: Option<&str>,
    ) -> bool {
        if !matches!(e, ClientError::Denied { status: 401, .. }) || *refreshed {
            return false;
        }
        *refreshed = true;
        let again = self.tokens.invalidate(sent).await;
        if again {
            self.stats.token_refreshes.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("HTTP 401: asking again with a fresh token ({e})");
        }
        again
    }

    /// A request's final error, on its way to the caller. A refusal (HTTP 401/403) is logged
    /// once per distinct cause for the life of the client, not once per request: a mount
    /// whose access ends answers EACCES to every read, and the log says why once. A 401 (a
    /// token refused after a fresh one was asked for, or from credentials that cannot make
    /// another) comes back naming the credentials and what to do about them.
    fn refused(&self, e: ClientError) -> ClientError {
        let ClientError::Denied { status, message } = e else {
            return e;
        };
        let credentials = self.tokens.credentials();
        let cause = format!("HTTP {status}: {message}");
        let (hint, message) = match status {
            401 => {
                let fresh = if self.tokens.can_refresh() {
                    " even with a fresh token"
                } else {
                    ""
                };
                let fix = credentials.refused_fix();
                (
                    format!("{fresh}; reads answer EACCES until the credentials work again. {fix}"),
                    format!("{message} ({credentials} refused{fresh}; {fix})"),
                )
            }
            _ => ("; reads answer EACCES".to_string(), message),
        };
        if self.refusals.lock().unwrap().insert(cause.clone()) {
            tracing::warn!(
                "gs://{}: the server refused {credentials} ({cause}){hint}",
                self.cfg.bucket,
            );
        }
        ClientError::Denied { status, message }
    }

    /// Reads one media answer into `buf`, which holds the bytes `[start, pos)` already
    /// received, where `pos = start + buf.len()` is what this request asked from. Every byte
    /// appended is checked to belong to the asked range of the pinned generation; on error,
    /// `buf` keeps whatever good bytes arrived, so the next attempt resumes after them.
    async fn read_media(
        &self,
        resp: reqwest::Response,
        what: &(dyn std::fmt::Display + Sync),
        obj: ObjectVersion<'_>,
        (start, end): (u64, u64),
        buf: &mut Received,
    ) -> Result<(), ClientError> {
        let pos = start + buf.len() as u64;
        let status = resp.status();
        if !status.is_success() {
            return Err(error_from(resp, what).await);
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let (body_start, body_len) = check_media_head(
            what,
            obj,
            (pos, end),
            status.as_u16(),
            MediaHead {
                generation: header("x-goog-generation").as_deref(),
                encoding: header("content-encoding").as_deref(),
                content_range: header("content-range").as_deref(),
                content_length: resp.content_length(),
            },
        )?;
        // Stream into `buf` (allocated once at the asked size, so the cache's byte count is
        // the memory used). A 200 for a range: skip what we have, stop after what we need.
        let mut resp = resp;
        let mut at = body_start;
        let body_end = body_start + body_len;
        loop {
            let chunk = match tokio::time::timeout(self.cfg.stall_timeout, resp.chunk()).await {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    return Err(ClientError::Interrupted(format!(
                        "body of {what} broke after {} of {} bytes: {}",
                        buf.len(),
                        end - start,
                        self.network_error(&e)
                    )));
                }
                Err(_) => {
                    return Err(ClientError::Interrupted(format!(
                        "body of {what} stalled (no bytes for {}) after {} of {} bytes",
                        humantime::format_duration(self.cfg.stall_timeout),
                        buf.len(),
                        end - start
                    )));
                }
            };
            self.stats
                .bytes_fetched
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let (cstart, cend) = (at, at + chunk.len() as u64);
            at = cend;
            if cend > body_end {
                return Err(ClientError::Malformed(format!(
                    "long body for {what}: more than the {body_len} bytes announced"
                )));
            }
            let next = start + buf.len() as u64;
            let (a, b) = (cstart.max(next), cend.min(end));
            if a < b {
                buf.extend_from_slice(&chunk[(a - cstart) as usize..(b - cstart) as usize]);
            }
            if at >= end {
                // All we asked for is here; the rest of a 200 is not needed.
                break;
            }
        }
        if (buf.len() as u64) < end - start {
            return Err(ClientError::Interrupted(format!(
                "short body for {what}: ended after {} of {} bytes",
                buf.len(),
                end - start
            )));
        }
        Ok(())
    }

    /// `send_once` on the media connections: the request written by this task, the answer's
    /// head read within the stall timeout.
    async fn send_media<'m>(
        &self,
        media: &'m MediaConns,
        url: &reqwest::Url,
        headers: &[(&str, String)],
        token: Option<&str>,
    ) -> Result<Answer<'m>, ClientError> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Some(a) = &auth {
            all.push(("authorization", a));
        }
        all.push(("user-agent", USER_AGENT));
        let target = &url[url::Position::BeforePath..];
        match tokio::time::timeout(self.cfg.stall_timeout, media.get(target, &all)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(self.io_network_error(&e)),
            Err(_) => Err(self.no_response()),
        }
    }

    /// `read_media` for an answer on the media connections: the same checks, the body read
    /// straight into `buf`.
    async fn read_media_answer(
        &self,
        mut answer: Answer<'_>,
        what: &(dyn std::fmt::Display + Sync),
        obj: ObjectVersion<'_>,
        (start, end): (u64, u64),
        buf: &mut Received,
    ) -> Result<(), ClientError> {
        let pos = start + buf.len() as u64;
        let status = answer.head.status;
        if !(200..300).contains(&status) {
            let location = answer.header("location").map(str::to_string);
            let body = if (300..400).contains(&status) {
                Bytes::new()
            } else {
                match tokio::time::timeout(
                    self.cfg.stall_timeout,
                    answer.read_capped(MAX_ERROR_BODY),
                )
                .await
                {
                    Ok(Ok((b, _))) => b,
                    _ => Bytes::new(),
                }
            };
            return Err(error_for(status, location, &body, what));
        }
        let (body_start, body_len) = check_media_head(
            what,
            obj,
            (pos, end),
            status,
            MediaHead {
                generation: answer.header("x-goog-generation"),
                encoding: answer.header("content-encoding"),
                content_range: answer.header("content-range"),
                content_length: answer.content_length(),
            },
        )?;
        let total = end - start;
        // A 200 for a range (or a resumed read): skip what comes before the first byte wanted.
        let mut skip = pos - body_start;
        if skip > 0 {
            let scratch_pool = BufferPool::new(0, 0);
            while skip > 0 {
                let mut scratch = Received::new(scratch_pool.take(64 << 10), 0);
                let max = skip.min(64 << 10) as usize;
                let got = buf.len();
                match self
                    .read_body_part(&mut answer, &mut scratch, max, (what, got, total))
                    .await?
                {
                    0 => break,
                    n => skip -= n as u64,
                }
            }
        }
        let want = total as usize;
        while buf.len() < want && skip == 0 {
            let (room, got) = (want - buf.len(), buf.len());
            if self
                .read_body_part(&mut answer, buf, room, (what, got, total))
                .await?
                == 0
            {
                break;
            }
        }
        if buf.len() < want {
            return Err(ClientError::Interrupted(format!(
                "short body for {what}: ended after {} of {} bytes",
                buf.len(),
                end - start
            )));
        }
        // A 206 whose body does not end where it said (no Content-Length to hold it to).
        if status == 206 && answer.content_length().is_none() {
            let scratch_pool = BufferPool::new(0, 0);
            let mut scratch = Received::new(scratch_pool.take(1), 0);
            if let Ok(Ok(n)) =
                tokio::time::timeout(self.cfg.stall_timeout, answer.read_into(&mut scratch, 1))
                    .await
                && n > 0
            {
                return Err(ClientError::Malformed(format!(
                    "long body for {what}: more than the {body_len} bytes announced"
                )));
            }
        }
        Ok(())
    }

    /// One read of at most `max` body bytes of a media answer into `into`, bounded by the stall
    /// timeout and counted as fetched; 0 at the body's end. `got` is how much of the `total`
    /// wanted the caller holds, for the error's wording.
    async fn read_body_part(
        &self,
        answer: &mut Answer<'_>,
        into: &mut Received,
        max: usize,
        (what, got, total): (&(dyn std::fmt::Display + Sync), usize, u64),
    ) -> Result<usize, ClientError> {
        match tokio::time::timeout(self.cfg.stall_timeout, answer.read_into(into, max)).await {
            Ok(Ok(n)) => {
                self.stats
                    .bytes_fetched
                    .fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Ok(Err(e)) => Err(ClientError::Interrupted(format!(
                "body of {what} broke after {got} of {total} bytes: {}",
                self.io_network_error(&e)
            ))),
            Err(_) => Err(ClientError::Interrupted(format!(
                "body of {what} stalled (no bytes for {}) after {got} of {total} bytes",
                humantime::format_duration(self.cfg.stall_timeout),
            ))),
        }
    }

    /// A connection or protocol failure of the media connections, as `network_error` names
    /// reqwest's (an untrusted certificate says so).
    fn io_network_error(&self, e: &std::io::Error) -> ClientError {
        let mut cause = e.to_string();
        if is_certificate_error(e) {
            cause = format!("{UNTRUSTED_CERTIFICATE} ({cause})");
        }
        ClientError::Network {
            endpoint: self.cfg.endpoint.clone(),
            cause,
        }
    }

    /// How long one attempt may take in all (headers and body): what is left of the retry
    /// deadline. The stall timeout alone does not bound an attempt, since a body that keeps
    /// trickling in never stalls; this does. At least a second, so a tiny deadline still
    /// allows one real try.
    fn attempt_budget(&self, backoff: &Backoff<'_>) -> Duration {
        self.cfg
            .retry
            .deadline
            .saturating_sub(backoff.since.elapsed())
            .max(Duration::from_secs(1))
    }

    /// No answer head within the stall timeout.
    fn no_response(&self) -> ClientError {
        ClientError::Network {
            endpoint: self.cfg.endpoint.clone(),
            cause: format!(
                "no response within {} (stall timeout)",
                humantime::format_duration(self.cfg.stall_timeout)
            ),
        }
    }

    fn past_deadline(&self) -> ClientError {
        ClientError::Network {
            endpoint: self.cfg.endpoint.clone(),
            cause: format!(
                "the answer did not finish within the {} retry deadline (--retry-deadline)",
                humantime::format_duration(self.cfg.retry.deadline)
            ),
        }
    }

    fn network_error(&self, e: &reqwest::Error) -> ClientError {
        // reqwest's Display hides the cause chain; keep the innermost message, it says what happened.
        let mut cause = e.to_string();
        let mut untrusted = false;
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            cause = s.to_string();
            untrusted |= is_certificate_error(s);
            src = s.source();
        }
        if untrusted {
            cause = format!("{UNTRUSTED_CERTIFICATE} ({cause})");
        }
        ClientError::Network {
            endpoint: self.cfg.endpoint.clone(),
            cause,
        }
    }
}

/// A rustls refusal of the peer's certificate (unknown issuer, wrong name, expired), however
/// deep in reqwest's chain (an `io::Error` hides its inner error from `source()`).
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_rustls::rustls::Error as TlsError;
    let tls = e.downcast_ref::<TlsError>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<TlsError>())
    });
    if let Some(tls) = tls {
        return matches!(
            tls,
            TlsError::InvalidCertificate(_) | TlsError::NoCertificatesPresented
        );
    }
    // reqwest's connector boxes the error on the way up, which defeats the downcast: rustls's
    // own wording for the two refusals, then.
    let text = e.to_string();
    text.starts_with("invalid peer certificate") || text.contains("peer sent no certificates")
}

/// For a plain `http://` endpoint, whether its host is this machine (127.0.0.0/8, ::1,
/// `localhost`); None for anything else (https, or not a URL).
pub fn plain_http(endpoint: &str) -> Option<bool> {
    let url = reqwest::Url::parse(endpoint).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    Some(match url.host()? {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(a) => a.is_loopback(),
        url::Host::Ipv6(a) => a.is_loopback(),
    })
}

/// The headers of a media answer that say what its body is.
struct MediaHead<'a> {
    generation: Option<&'a str>,
    encoding: Option<&'a str>,
    content_range: Option<&'a str>,
    content_length: Option<u64>,
}

/// Checks a successful media answer's head against the read of bytes `pos..end` of `obj`
/// (the same version, the stored bytes, the range asked, a body of the right length) and
/// says where in the object its body starts and how long it must be: a 206 holds the range, a
/// 200 the whole object (a server may ignore Range).
fn check_media_head(
    what: &(dyn std::fmt::Display + Sync),
    obj: ObjectVersion<'_>,
    (pos, end): (u64, u64),
    status: u16,
    head: MediaHead<'_>,
) -> Result<(u64, u64), ClientError> {
    if let Some(g) = head.generation
        && g != obj.generation.to_string()
    {
        return Err(ClientError::Stale(format!(
            "{what}: server sent generation {g}"
        )));
    }
    if let Some(enc) = head.encoding
        && !enc.eq_ignore_ascii_case("identity")
        && !enc.eq_ignore_ascii_case("gzip")
    {
        return Err(ClientError::Malformed(format!(
            "{what}: unexpected Content-Encoding {enc:?}"
        )));
    }
    let (body_start, body_len) = if status == 206 {
        let cr = head
            .content_range
            .and_then(parse_content_range)
            .ok_or_else(|| {
                ClientError::Malformed(format!("{what}: 206 without a valid Content-Range"))
            })?;
        if cr.0 != pos || cr.1 + 1 != end || cr.2 != obj.size {
            return Err(ClientError::Malformed(format!(
                "{what}: asked bytes {pos}-{} of {}, got {}-{}/{}",
                end - 1,
                obj.size,
                cr.0,
                cr.1,
                cr.2
            )));
        }
        (pos, end - pos)
    } else {
        (0, obj.size)
    };
    if let Some(cl) = head.content_length
        && cl != body_len
    {
        return Err(ClientError::Malformed(format!(
            "{what}: Content-Length {cl} but {body_len} bytes expected"
        )));
    }
    Ok((body_start, body_len))
}

/// Turns a non-success response into the right error, with the server's own message.
async fn error_from(resp: reqwest::Response, what: &(dyn std::fmt::Display + Sync)) -> ClientError {
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
    // Only the first MAX_ERROR_BODY bytes are read (a broken or hostile server may send an
    // endless error body); the rest is dropped with the connection.
    let body = if resp.status().is_redirection() {
        Bytes::new()
    } else {
        match read_capped(resp, what, MAX_ERROR_BODY).await {
            Ok(Capped::Whole(b)) | Ok(Capped::Cut(b)) => b,
            Err(_) => Bytes::new(),
        }
    };
    error_for(status, location, &body, what)
}

/// The error for a non-success answer: its status, `Location` and (the start of) its body.
fn error_for(
    status: u16,
    location: Option<String>,
    body: &[u8],
    what: &(dyn std::fmt::Display + Sync),
) -> ClientError {
    if (300..400).contains(&status) {
        let to = location.unwrap_or_default();
        return ClientError::Http {
            status,
            message: format!(
                "{what}: redirect to {to:?} not followed (the GCS JSON API never redirects, \
                 so --endpoint is not a GCS endpoint, or something on the way rewrites answers)"
            ),
        };
    }
    let body = String::from_utf8_lossy(body);
    let message = serde_json::from_str::<ErrorJson>(&body)
        .ok()
        .and_then(|e| e.error.message)
        .unwrap_or_else(|| {
            body.chars()
                .take(300)
                .collect::<String>()
                .trim()
                .to_string()
        });
    match status {
        404 => ClientError::NotFound(if message.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {message}")
        }),
        401 | 403 => ClientError::Denied { status, message },
        400 if message.to_ascii_lowercase().contains("requester pays") => {
            ClientError::Denied { status, message }
        }
        _ => ClientError::Http { status, message },
    }
}

#[derive(Deserialize)]
struct ErrorJson {
    error: ErrorBody,
}
#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectsJson {
    #[serde(default)]
    items: Vec<ObjectJson>,
    #[serde(default)]
    prefixes: Vec<String>,
    next_page_token: Option<String>,
}

#[derive(Deserialize)]
struct ObjectJson {
    name: String,
    size: Option<NumOrStr>,
    generation: Option<NumOrStr>,
    updated: Option<String>,
    crc32c: Option<String>,
}

/// GCS sends 64-bit numbers as JSON strings; accept plain numbers too.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

impl NumOrStr {
    fn parse(&self, field: &str, object: &str) -> Result<u64, ClientError> {
        match self {
            NumOrStr::Num(n) => Ok(*n),
            NumOrStr::Str(s) => s.parse().map_err(|_| {
                ClientError::Malformed(format!("{field} of {object:?} is not a number: {s:?}"))
            }),
        }
    }
}

/// GCS refuses object names longer than this many bytes (UTF-8); a longer one is a broken or
/// hostile answer, and would cost a path walk of that length on every lookup.
pub const MAX_NAME_BYTES: usize = 1024;

impl ObjectJson {
    fn into_meta(self) -> Result<ObjectMeta, ClientError> {
        if self.name.len() > MAX_NAME_BYTES {
            return Err(ClientError::Malformed(format!(
                "object name of {} bytes (GCS allows {MAX_NAME_BYTES}) starting {:?}",
                self.name.len(),
                self.name.chars().take(64).collect::<String>()
            )));
        }
        let size = self
            .size
            .as_ref()
            .ok_or_else(|| ClientError::Malformed(format!("object {:?} has no size", self.name)))?
            .parse("size", &self.name)?;
        let generation = self
            .generation
            .as_ref()
            .ok_or_else(|| {
                ClientError::Malformed(format!("object {:?} has no generation", self.name))
            })?
            .parse("generation", &self.name)?;
        let generation = i64::try_from(generation).map_err(|_| {
            ClientError::Malformed(format!(
                "generation of {:?} is out of range: {generation}",
                self.name
            ))
        })?;
        let updated = match &self.updated {
            Some(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map(SystemTime::from)
                .map_err(|e| {
                    ClientError::Malformed(format!(
                        "updated of {:?} is not RFC 3339 ({s:?}): {e}",
                        self.name
                    ))
                })?,
            None => SystemTime::UNIX_EPOCH,
        };
        let crc32c = match &self.crc32c {
            Some(c) => Some(parse_crc32c(c).ok_or_else(|| {
                ClientError::Malformed(format!(
                    "crc32c of {:?} is not base64 of 4 bytes: {c:?}",
                    self.name
                ))
            })?),
            None => None,
        };
        Ok(ObjectMeta {
            name: self.name,
            size,
            generation,
            updated,
            crc32c,
        })
    }
}

/// Parses one page of an objects listing. Every field is checked; nothing is guessed.
pub fn parse_list_page(body: &[u8], what: &str) -> Result<ListPage, ClientError> {
    let json: ObjectsJson = serde_json::from_slice(body)
        .map_err(|e| ClientError::Malformed(format!("listing of {what} is not valid JSON: {e}")))?;
    // An entry with an over-long name is dropped with a warning rather than failing the whole
    // listing: one bad name must not hide every good one.
    let too_long = |name: &str, max: usize| {
        let long = name.len() > max;
        if long {
            tracing::warn!(
                bytes = name.len(),
                start = ?name.chars().take(64).collect::<String>(),
                "skipping a listed name longer than GCS allows ({MAX_NAME_BYTES} bytes)"
            );
        }
        long
    };
    Ok(ListPage {
        items: json
            .items
            .into_iter()
            .filter(|o| !too_long(&o.name, MAX_NAME_BYTES))
            .map(ObjectJson::into_meta)
            .collect::<Result<_, _>>()?,
        prefixes: json
            .prefixes
            .into_iter()
            // A prefix is a name followed by the delimiter.
            .filter(|p| !too_long(p, MAX_NAME_BYTES + 1))
            .collect(),
        next_page_token: json.next_page_token.filter(|t| !t.is_empty()),
    })
}

/// Parses one object's metadata.
/// A testIamPermissions answer: the permissions held (none when the list is absent).
fn parse_permissions(body: &[u8], what: &str) -> Result<Vec<String>, ClientError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ClientError::Malformed(format!("{what}: bad JSON: {e}")))?;
    if v["kind"] != "storage#testIamPermissionsResponse" {
        return Err(ClientError::Malformed(format!(
            "{what}: not a testIamPermissions answer"
        )));
    }
    Ok(v["permissions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

pub fn parse_object(body: &[u8], what: &str) -> Result<ObjectMeta, ClientError> {
    serde_json::from_slice::<ObjectJson>(body)
        .map_err(|e| ClientError::Malformed(format!("metadata of {what} is not valid JSON: {e}")))?
        .into_meta()
}

/// Parses `bytes a-b/total` (a <= b < total).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b, total): (u64, u64, u64) = (a.parse().ok()?, b.parse().ok()?, total.parse().ok()?);
    (a <= b && b < total).then_some((a, b, total))
}

/// Largest listing or metadata answer accepted. A full 1,000-item page is about 300 KB;
/// anything this big is a broken server, and refusing it bounds memory.
const MAX_JSON_BODY: usize = 32 << 20;

/// Largest error body read (the server's message is in its first few hundred bytes).
const MAX_ERROR_BODY: usize = 64 << 10;

/// A body read up to a cap: all of it, or its first `cap` bytes.
enum Capped {
    Whole(Bytes),
    Cut(Bytes),
}

/// Reads at most `cap` bytes of a body; never holds more than `cap` in memory whatever the
/// server sends or announces.
async fn read_capped(
    mut resp: reqwest::Response,
    what: &(dyn std::fmt::Display + Sync),
    cap: usize,
) -> Result<Capped, ClientError> {
    let mut out = BytesMut::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ClientError::Interrupted(format!("body of {what} broke: {e}")))?
    {
        if out.len() + chunk.len() > cap {
            let room = cap - out.len();
            out.extend_from_slice(&chunk[..room]);
            return Ok(Capped::Cut(out.freeze()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Capped::Whole(out.freeze()))
}

async fn read_body(
    resp: reqwest::Response,
    what: &(dyn std::fmt::Display + Sync),
) -> Result<Bytes, ClientError> {
    let too_big = || {
        ClientError::Malformed(format!(
            "answer for {what} is larger than {} MiB",
            MAX_JSON_BODY >> 20
        ))
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_JSON_BODY as u64)
    {
        return Err(too_big());
    }
    match read_capped(resp, what, MAX_JSON_BODY).await? {
        Capped::Whole(b) => Ok(b),
        Capped::Cut(_) => Err(too_big()),
    }
}

#[async_trait]
impl ObjectClient for GcsClient {
    fn bucket(&self) -> &str {
        &self.cfg.bucket
    }

    async fn list_page(&self, req: &ListRequest) -> Result<ListPage, ClientError> {
        let mut params = vec![
            ("prefix", req.prefix.clone()),
            (
                "fields",
                "items(name,size,generation,updated,crc32c),prefixes,nextPageToken".to_string(),
            ),
            ("maxResults", req.max_results.unwrap_or(1000).to_string()),
        ];
        if let Some(d) = &req.delimiter {
            params.push(("delimiter", d.clone()));
        }
        if let Some(t) = &req.page_token {
            params.push(("pageToken", t.clone()));
        }
        if let Some(s) = &req.start_offset {
            params.push(("startOffset", s.clone()));
        }
        if let Some(e) = &req.end_offset {
            params.push(("endOffset", e.clone()));
        }
        let url = self.objects_url_with(None, &params);
        let bucket = &self.cfg.bucket;
        let what = format!("bucket gs://{bucket}");
        self.get_json(Kind::List, url, what, parse_list_page).await
    }

    async fn stat(&self, name: &str) -> Result<ObjectMeta, ClientError> {
        let url = self.objects_url_with(
            Some(name),
            &[("fields", "name,size,generation,updated,crc32c")],
        );
        // Escaped: a name is the server's text, and must not forge lines in the log.
        let what = format!("gs://{}/{}", self.cfg.bucket, name.escape_debug());
        self.get_json(Kind::Stat, url, what, parse_object).await
    }

    async fn get_range(
        &self,
        obj: ObjectVersion<'_>,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ClientError> {
        Ok(self.get_media(obj, start, end, 0).await?.0)
    }

    async fn get_range_blocks(
        &self,
        obj: ObjectVersion<'_>,
        start: u64,
        end: u64,
        block: u64,
    ) -> Result<(Bytes, Vec<u32>), ClientError> {
        self.get_media(obj, start, end, block.max(1)).await
    }
}

impl GcsClient {
    /// One ranged media read with its retries; see [`ObjectClient::get_range_blocks`]
    /// (`block` 0: one CRC for the whole answer).
    async fn get_media(
        &self,
        obj: ObjectVersion<'_>,
        start: u64,
        end: u64,
        block: u64,
    ) -> Result<(Bytes, Vec<u32>), ClientError> {
        if start >= end {
            return Ok((Bytes::new(), Vec::new()));
        }
        let what = VersionName {
            bucket: &self.cfg.bucket,
            obj,
        };
        if end > obj.size {
            return Err(ClientError::Malformed(format!(
                "read of {what} asked bytes {start}..{end} of a {}-byte object",
                obj.size
            )));
        }
        let generation = obj.generation.to_string();
        let url = self.objects_url_with(
            Some(obj.name),
            &[("alt", "media"), ("generation", generation.as_str())],
        );
        let whole = start == 0 && end == obj.size;
        let mut buf = Received::new(self.pool.take((end - start) as usize), block as usize);
        let mut backoff = Backoff::new(&self.cfg.retry);
        let mut refreshed = false;
        loop {
            backoff.attempt += 1;
            self.count(Kind::Get);
            let token = self.tokens.token().await?;
            let pos = start + buf.len() as u64;
            // Stored bytes as they are: with `Accept-Encoding: gzip` GCS never decompresses a
            // gzip-encoded object on the way, so lengths and ranges match the listing.
            let mut headers = vec![("accept-encoding", "gzip".to_string())];
            if !(whole && pos == 0) {
                headers.push(("range", format!("bytes={pos}-{}", end - 1)));
            }
            let had = buf.len();
            let mut retry_after_hint = None;
            let attempt = async {
                if let Some(media) = &self.media {
                    let answer = self
                        .send_media(media, &url, &headers, token.as_deref())
                        .await?;
                    retry_after_hint = answer
                        .header("retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    return self
                        .read_media_answer(answer, &what, obj, (start, end), &mut buf)
                        .await;
                }
                match self.send_once(&url, &headers, token.as_deref()).await {
                    Ok(resp) => {
                        retry_after_hint = retry_after(&resp);
                        self.read_media(resp, &what, obj, (start, end), &mut buf)
                            .await
                    }
                    Err(e) => Err(e),
                }
            };
            // On the deadline the attempt is dropped; `buf` keeps the good bytes it received.
            let mut result = tokio::time::timeout(self.attempt_budget(&backoff), attempt)
                .await
                .unwrap_or_else(|_| Err(self.past_deadline()));
            if result.is_ok()
                && whole
                && let Some(want) = obj.crc32c
            {
                let got = buf.crc32c();
                if got != want {
                    self.stats
                        .checksum_mismatches
                        .fetch_add(1, Ordering::Relaxed);
                    buf.clear();
                    result = Err(ClientError::Checksum(format!(
                        "{what}: CRC32C of the {} bytes received is {got:08x}, the listing says {want:08x}",
                        obj.size
                    )));
                }
            }
            let e = match result {
                Ok(()) => return Ok(buf.finish()),
                Err(e) => e,
            };
            if buf.len() > had {
                backoff.progress();
            }
            if self
                .refresh_after(&e, &mut refreshed, token.as_deref())
                .await
            {
                continue;
            }
            match backoff.next_delay(&e, retry_after_hint) {
                Some(delay) => {
                    if !buf.is_empty() {
                        self.stats.resumes.fetch_add(1, Ordering::Relaxed);
                    }
                    self.pause(Kind::Get, backoff.attempt, &e, delay).await;
                }
                None => return Err(self.refused(e)),
            }
        }
    }
}

/// Names one object version in messages (`gs://BUCKET/NAME#GENERATION`, the name escaped: it
/// is the server's text and must not forge lines in a log), formatted only when a message
/// needs it rather than for every request.
struct VersionName<'a> {
    bucket: &'a str,
    obj: ObjectVersion<'a>,
}

impl std::fmt::Display for VersionName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gs://{}/{}#{}",
            self.bucket,
            self.obj.name.escape_debug(),
            self.obj.generation
        )
    }
}

/// `Retry-After` in seconds, if the server sent one.
fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0, 9, 100)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("garbage"), None);
    }

    /// A config for `tls_config`, with `--ca-file` holding `pem`.
    fn tls_of(
        pem: &str,
        protocol: HttpProtocol,
    ) -> Result<tokio_rustls::rustls::ClientConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, pem).unwrap();
        tls_config(&GcsConfig {
            endpoint: "https://127.0.0.1:1".into(),
            bucket: "b".into(),
            billing_project: None,
            retry: RetryConfig::default(),
            pool_size: 1,
            ca_file: Some(path),
            protocol,
            stall_timeout: Duration::from_secs(10),
        })
    }

    #[test]
    fn ca_file_certificates_are_trusted_and_bad_files_are_named() {
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .unwrap()
            .cert
            .pem();
        let tls = tls_of(&ca, HttpProtocol::Http1).unwrap();
        assert_eq!(tls.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let tls = tls_of(&ca, HttpProtocol::Http2).unwrap();
        assert_eq!(
            tls.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // AES-128-GCM is offered first, and the other suites are still offered.
        let suites: Vec<_> = tls
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites[0],
            tokio_rustls::rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert!(suites.contains(&tokio_rustls::rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
        assert!(
            suites.contains(&tokio_rustls::rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
        // A bundle with one certificate webpki cannot use: the others are still trusted.
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(tls_of(&format!("{junk}{ca}"), HttpProtocol::Http1).is_ok());
        for (pem, says) in [
            ("", "no PEM certificate (BEGIN CERTIFICATE) in it"),
            (
                "not a certificate\n",
                "no PEM certificate (BEGIN CERTIFICATE) in it",
            ),
            (
                "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
                "not PEM certificates",
            ),
        ] {
            let e = tls_of(pem, HttpProtocol::Http1).unwrap_err();
            assert!(
                e.starts_with("--ca-file ") && e.contains(says),
                "{pem:?}: {e}"
            );
        }
    }

    #[test]
    fn media_reads_leave_reqwest_only_where_it_goes_straight_to_the_endpoint() {
        use hyper_util::client::proxy::matcher::Matcher;
        let none = Matcher::builder().build();
        assert!(!proxied(&none, "https://storage.googleapis.com"));
        let corp = Matcher::builder()
            .https("http://proxy.corp:3128")
            .no("metadata.google.internal,.internal.corp,10.0.0.0/8")
            .build();
        assert!(proxied(&corp, "https://storage.googleapis.com"));
        assert!(
            !proxied(&corp, "http://storage.googleapis.com"),
            "HTTPS_PROXY only"
        );
        assert!(!proxied(&corp, "https://gcs.internal.corp"));
        assert!(!proxied(&corp, "https://10.1.2.3:4443"));
        let direct_to_google = Matcher::builder()
            .all("http://proxy.corp:3128")
            .no("googleapis.com")
            .build();
        assert!(!proxied(
            &direct_to_google,
            "https://storage.googleapis.com"
        ));
        assert!(proxied(&direct_to_google, "https://example.org"));
    }

    #[test]
    fn names_are_one_segment() {
        let c = GcsClient::new(
            GcsConfig {
                endpoint: "http://127.0.0.1:1/".into(),
                bucket: "b".into(),
                billing_project: Some("proj".into()),
                retry: RetryConfig::default(),
                pool_size: 1,
                ca_file: None,
                protocol: HttpProtocol::Http1,
                stall_timeout: Duration::from_secs(10),
            },
            TokenSource::Anonymous,
        )
        .unwrap();
        let u = c.objects_url_with(Some("a/b c%+#?é"), &[("alt", "media")]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:1/storage/v1/b/b/o/a%2Fb%20c%25%2B%23%3F%C3%A9?alt=media&userProject=proj"
        );
        // The base is reused: a second URL carries nothing of the first.
        let u = c.objects_url_with(None, &[("prefix", "x/")]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:1/storage/v1/b/b/o?prefix=x%2F&userProject=proj"
        );
        let u = c
            .url_with(&c.objects_url, &[("prefix", "x/".into())])
            .unwrap();
        assert_eq!(u.query(), Some("prefix=x%2F&userProject=proj"));
    }

    #[test]
    fn object_json_rejects_bad_numbers() {
        let j: ObjectJson =
            serde_json::from_str(r#"{"name":"a","size":"12x","generation":"1"}"#).unwrap();
        assert!(matches!(j.into_meta(), Err(ClientError::Malformed(_))));
        let j: ObjectJson = serde_json::from_str(
            r#"{"name":"a","size":"12","generation":"7","updated":"2020-01-02T03:04:05.678Z"}"#,
        )
        .unwrap();
        let m = j.into_meta().unwrap();
        assert_eq!((m.size, m.generation), (12, 7));
    }

    /// Every answer in tests/corpus/gcs is parsed: `*-ok-*` must parse, `*-err-*` must be
    /// refused with an error (never a panic). New odd answers found in the wild go there.
    #[test]
    fn corpus_of_server_answers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/gcs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let body = std::fs::read(&path).unwrap();
            let result = if name.starts_with("list-") {
                parse_list_page(&body, "corpus").map(|_| ())
            } else if name.starts_with("object-") {
                parse_object(&body, "corpus").map(|_| ())
            } else {
                panic!("corpus file {name} must start with list- or object-");
            };
            match (name.contains("-ok-") || name.ends_with("-ok.json"), result) {
                (true, Err(e)) => panic!("{name} should parse: {e}"),
                (false, Ok(())) => panic!("{name} should be refused"),
                (false, Err(e)) => assert!(matches!(e, ClientError::Malformed(_)), "{name}: {e}"),
                (true, Ok(())) => {}
            }
            n += 1;
        }
        assert!(n >= 20, "corpus has only {n} files");
    }

    #[test]
    fn corpus_values_are_exact() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/gcs");
        let page = parse_list_page(
            &std::fs::read(dir.join("list-ok-full-page.json")).unwrap(),
            "c",
        )
        .unwrap();
        assert_eq!(page.items.len(), 1);
        let m = &page.items[0];
        assert_eq!(m.size, 8_934_656);
        assert_eq!(m.generation, 1_549_324_386_736_457);
        assert_eq!(m.crc32c, Some(0xc994_65aa));
        assert_eq!(page.prefixes, ["files/p10/"]);
        assert_eq!(
            page.next_page_token.as_deref(),
            Some("files/p10/p10000032/s50414267.txt")
        );
        let empty = parse_list_page(
            &std::fs::read(dir.join("list-ok-numbers-as-numbers.json")).unwrap(),
            "c",
        )
        .unwrap();
        assert_eq!(
            empty.next_page_token, None,
            "an empty token ends the listing"
        );
    }

    /// The retry policy, driven by a seeded jitter source and a virtual clock.
    mod backoff {
        use super::super::*;

        fn cfg() -> RetryConfig {
            RetryConfig {
                max_attempts: 10,
                base_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(8),
                deadline: Duration::from_secs(60),
            }
        }

        const MS: Duration = Duration::from_millis(1);

        fn delay(c: &RetryConfig, attempt: u32, elapsed_ms: u64, jitter: f64) -> Option<Duration> {
            backoff_delay(
                c,
                attempt,
                Duration::from_millis(elapsed_ms),
                true,
                None,
                jitter,
            )
        }

        /// With the jitter at its top, the sleep is the cap: base * 2^attempt up to max_delay.
        #[test]
        fn caps_grow_exponentially_up_to_max_delay() {
            let c = cfg();
            let top = 1.0 - f64::EPSILON;
            let caps: Vec<u64> = (1..10)
                .map(|a| (delay(&c, a, 0, top).unwrap().as_secs_f64() * 1000.0).round() as u64)
                .collect();
            assert_eq!(caps, [200, 400, 800, 1600, 3200, 6400, 8000, 8000, 8000]);
            // A huge attempt number neither overflows nor passes the cap.
            let mut c2 = c.clone();
            c2.max_attempts = u32::MAX;
            assert_eq!(delay(&c2, 1_000, 0, top).unwrap().as_millis(), 8000);
        }

        /// Full jitter: every sleep is in [0, cap), and a seeded run covers that range.
        #[test]
        fn jitter_stays_within_zero_and_the_cap() {
            let c = cfg();
            let mut rng = fastrand::Rng::with_seed(42);
            for attempt in 1..10 {
                let cap = delay(&c, attempt, 0, 1.0).unwrap();
                let samples: Vec<Duration> = (0..500)
                    .map(|_| delay(&c, attempt, 0, rng.f64()).unwrap())
                    .collect();
                assert!(samples.iter().all(|d| *d < cap), "attempt {attempt}");
                let (lo, hi) = (samples.iter().min().unwrap(), samples.iter().max().unwrap());
                assert!(
                    *lo < cap / 10 && *hi > cap * 9 / 10,
                    "{lo:?}..{hi:?} of {cap:?}"
                );
            }
            assert_eq!(delay(&c, 3, 0, 0.0), Some(Duration::ZERO));
            assert_eq!(delay(&c, 3, 0, 0.5), Some(400 * MS));
        }

        #[test]
        fn retry_after_is_a_floor_capped_by_max_delay() {
            let c = cfg();
            let ra = |secs, jitter| {
                backoff_delay(
                    &c,
                    1,
                    Duration::ZERO,
                    true,
                    Some(Duration::from_secs(secs)),
                    jitter,
                )
                .unwrap()
            };
            // The server asks for more than the jitter drew: the server wins.
            assert_eq!(ra(3, 0.0), Duration::from_secs(3));
            assert_eq!(ra(3, 0.99), Duration::from_secs(3));
            // Never longer than max_delay, whatever the server says.
            assert_eq!(ra(3600, 0.5), Duration::from_secs(8));
            // A Retry-After shorter than the drawn sleep changes nothing.
            let late = backoff_delay(&c, 6, Duration::ZERO, true, Some(MS), 0.5).unwrap();
            assert_eq!(late, 3200 * MS);
        }

        #[test]
        fn deadline_attempts_and_permanent_errors_stop_retries() {
            let c = cfg();
            assert_eq!(delay(&c, 1, 60_000, 0.5), None, "deadline reached");
            assert_eq!(delay(&c, 1, 70_000, 0.5), None, "deadline passed");
            // Close to the deadline the sleep is cut to what is left.
            assert_eq!(delay(&c, 7, 59_990, 0.9), Some(10 * MS));
            let ra = Some(Duration::from_secs(5));
            assert_eq!(
                backoff_delay(&c, 1, 59_000 * MS, true, ra, 0.0),
                Some(1000 * MS)
            );
            assert_eq!(delay(&c, 10, 0, 0.5), None, "max_attempts used");
            assert!(delay(&c, 9, 0, 0.5).is_some());
            assert_eq!(backoff_delay(&c, 1, Duration::ZERO, false, ra, 0.5), None);
        }

        /// A whole retry loop on a virtual clock (each attempt costs 50 ms, then the sleep):
        /// it gives up at the deadline or at max_attempts, whichever comes first, and never
        /// sleeps past the deadline.
        #[test]
        fn a_retry_loop_ends_by_its_budget() {
            let run = |c: &RetryConfig, seed| {
                let mut rng = fastrand::Rng::with_seed(seed);
                let (mut clock, mut attempts) = (Duration::ZERO, 0u32);
                loop {
                    attempts += 1;
                    clock += 50 * MS;
                    match backoff_delay(c, attempts, clock, true, None, rng.f64()) {
                        Some(d) => {
                            clock += d;
                            assert!(clock <= c.deadline, "slept past the deadline: {clock:?}");
                        }
                        None => return (attempts, clock),
                    }
                }
            };
            for seed in 0..50 {
                let (n, _) = run(&cfg(), seed);
                assert_eq!(n, 10, "a 60 s deadline outlasts 10 attempts (seed {seed})");
                let short = RetryConfig {
                    max_attempts: 1000,
                    deadline: Duration::from_secs(5),
                    ..cfg()
                };
                let (n, clock) = run(&short, seed);
                assert!(n < 1000 && n > 3, "seed {seed}: {n} attempts");
                assert!(clock >= short.deadline && clock <= short.deadline + 50 * MS);
            }
            // The default and mount-time policies keep their promises too.
            let (n, _) = run(&RetryConfig::startup(), 1);
            assert_eq!(n, RetryConfig::startup().max_attempts);
        }
    }

    /// `GcsClient` against the in-process testbed, one test per fault knob: what the client
    /// returns and what its counters say (retries, resumes, checksum mismatches, bytes), next
    /// to what the testbed says it injected. Counts and outcomes only; stall timeouts are short
    /// and backoff sleeps are capped at a few milliseconds so the whole module runs in seconds.
    mod against_testbed {
        use super::super::*;
        use crate::client::list_all;
        use crate::testbed::{
            self, KnobsUpdate, MemSource, StatsSnapshot, TestbedHandle, TestbedOptions,
        };

        const BUCKET: &str = "bkt";
        /// Big enough for mid-body faults to fall after several chunks (the testbed sends
        /// 256 KiB ones), odd so no range is aligned.
        const BIG: usize = (2 << 20) + 123;
        const BIG_NAME: &str = "dir/big.bin";
        const SMALL_NAME: &str = "dir/small.txt";

        fn content(len: usize, seed: u64) -> Vec<u8> {
            let mut st = seed;
            let mut v = Vec::with_capacity(len + 8);
            while v.len() < len {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.extend_from_slice(&(st >> 16).to_le_bytes());
            }
            v.truncate(len);
            v
        }

        struct Bed {
            server: TestbedHandle,
            big: Vec<u8>,
        }

        async fn bed(opts: TestbedOptions) -> Bed {
            let big = content(BIG, 7);
            let mut m = MemSource::new();
            m.insert(BUCKET, BIG_NAME, big.clone());
            m.insert(BUCKET, SMALL_NAME, &b"small object"[..]);
            for i in 0..5 {
                m.insert(BUCKET, &format!("list/{i}"), &b"x"[..]);
            }
            let server = testbed::start(opts, Arc::new(m)).await.unwrap();
            Bed { server, big }
        }

        fn retry(max_attempts: u32) -> RetryConfig {
            RetryConfig {
                max_attempts,
                base_delay: Duration::from_millis(1),
                // Also the cap on the testbed's `Retry-After: 1`.
                max_delay: Duration::from_millis(5),
                deadline: Duration::from_secs(60),
            }
        }

        struct Opts {
            max_attempts: u32,
            stall_timeout: Duration,
            billing: Option<&'static str>,
            tokens: TokenSource,
        }

        impl Default for Opts {
            fn default() -> Self {
                Opts {
                    max_attempts: 20,
                    // Long next to anything a healthy loopback answer takes.
                    stall_timeout: Duration::from_secs(2),
                    billing: None,
                    tokens: TokenSource::Anonymous,
                }
            }
        }

        fn client(bed: &Bed, o: Opts) -> GcsClient {
            GcsClient::new(
                GcsConfig {
                    endpoint: bed.server.endpoint(),
                    bucket: BUCKET.into(),
                    billing_project: o.billing.map(String::from),
                    retry: retry(o.max_attempts),
                    pool_size: 4,
                    stall_timeout: o.stall_timeout,
                    ca_file: None,
                    protocol: HttpProtocol::Http1,
                },
                o.tokens,
            )
            .unwrap()
        }

        fn version(m: &ObjectMeta) -> ObjectVersion<'_> {
            ObjectVersion {
                name: &m.name,
                generation: m.generation,
                size: m.size,
                crc32c: m.crc32c,
            }
        }

        fn n(c: &AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }

        /// The big object's metadata, read before any fault is switched on.
        async fn big_meta(bed: &Bed) -> ObjectMeta {
            let m = client(bed, Opts::default()).stat(BIG_NAME).await.unwrap();
            assert!(m.crc32c.is_some(), "the testbed lists a CRC32C");
            m
        }

        /// Turns knobs on after the metadata was read; counters start from zero.
        fn set(bed: &Bed, json: &str) {
            let u: KnobsUpdate = serde_json::from_str(json).unwrap();
            bed.server.update_knobs(&u).unwrap();
            bed.server.reset_stats();
        }

        /// Reads the big object whole (one GET without Range) and in two ranges (206s), and
        /// checks every byte. Returns the bytes asked for.
        async fn read_big(c: &GcsClient, bed: &Bed, m: &ObjectMeta) -> u64 {
            let whole = c.get_range(version(m), 0, m.size).await.unwrap();
            assert!(whole[..] == bed.big[..], "whole read differs");
            let mid = (BIG / 3) as u64;
            let a = c.get_range(version(m), 10, mid).await.unwrap();
            assert!(
                a[..] == bed.big[10..mid as usize],
                "range 10..{mid} differs"
            );
            let b = c.get_range(version(m), mid, m.size - 1).await.unwrap();
            assert!(
                b[..] == bed.big[mid as usize..BIG - 1],
                "range {mid}.. differs"
            );
            m.size + (mid - 10) + (m.size - 1 - mid)
        }

        fn media(s: &StatsSnapshot) -> u64 {
            s.requests.get_media
        }

        #[tokio::test]
        async fn no_knobs_no_retries() {
            let bed = bed(TestbedOptions::default()).await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            let asked = read_big(&c, &bed, &m).await;
            let page = list_all(
                &c,
                &ListRequest {
                    prefix: "list/".into(),
                    max_results: Some(2),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(page.items.len(), 5);
            assert_eq!(n(&c.stats.list_requests), 3);
            assert_eq!(n(&c.stats.get_requests), 3);
            assert_eq!(n(&c.stats.retries), 0);
            assert_eq!(n(&c.stats.resumes), 0);
            assert_eq!(n(&c.stats.bytes_fetched), asked);
            assert_eq!(bed.server.stats().requests.get_media, 3);
        }

        /// 429 and 503 answers (half of them with `Retry-After: 1`, capped by max_delay) are
        /// retried: every failure costs one retry and the reads come out right; when every
        /// answer fails the client gives up after max_attempts with the server's status.
        #[tokio::test]
        async fn fail_rate_is_retried_then_given_up() {
            let bed = bed(TestbedOptions {
                seed: 3,
                ..Default::default()
            })
            .await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            set(&bed, r#"{"fail_rate":0.5}"#);
            let asked = read_big(&c, &bed, &m).await;
            for _ in 0..10 {
                assert_eq!(c.stat(SMALL_NAME).await.unwrap().size, 12);
            }
            let page = list_all(
                &c,
                &ListRequest {
                    prefix: "list/".into(),
                    max_results: Some(2),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(page.items.len(), 5);
            let s = bed.server.stats();
            let failures = s.faults.fail_429 + s.faults.fail_503;
            assert!(
                failures > 5,
                "rate 0.5 over 16+ requests injected only {failures}"
            );
            assert_eq!(n(&c.stats.retries), failures);
            let sent =
                n(&c.stats.list_requests) + n(&c.stats.stat_requests) + n(&c.stats.get_requests);
            assert_eq!(sent, 16 + failures);
            assert_eq!(
                sent,
                s.requests.list + s.requests.get_meta + s.requests.get_media
            );
            assert_eq!(
                n(&c.stats.bytes_fetched),
                asked,
                "failed answers carry no media bytes"
            );

            set(&bed, r#"{"fail_rate":1.0}"#);
            let c = client(
                &bed,
                Opts {
                    max_attempts: 4,
                    ..Default::default()
                },
            );
            let e = c.get_range(version(&m), 0, 100).await.unwrap_err();
            assert!(matches!(e.status(), Some(429 | 503)), "{e}");
            assert_eq!(n(&c.stats.retries), 3);
            assert_eq!(media(&bed.server.stats()), 4);
        }

        /// A connection reset mid-body is retried from the first missing byte: every reset
        /// costs one retry, no byte is fetched twice, the bytes are exact.
        #[tokio::test]
        async fn reset_rate_resumes() {
            let bed = bed(TestbedOptions {
                seed: 5,
                ..Default::default()
            })
            .await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            set(&bed, r#"{"reset_rate":0.5}"#);
            let mut asked = 0;
            for _ in 0..3 {
                asked += read_big(&c, &bed, &m).await;
            }
            let s = bed.server.stats();
            assert!(s.faults.reset > 2, "only {} resets", s.faults.reset);
            assert_eq!(n(&c.stats.retries), s.faults.reset);
            assert_eq!(n(&c.stats.get_requests), media(&s));
            assert_eq!(media(&s), 9 + s.faults.reset);
            // Bytes that arrived before a reset are kept (a reset may also drop some in
            // flight, which the resumed request then asks for): none is fetched twice.
            assert!(n(&c.stats.resumes) <= s.faults.reset);
            assert_eq!(n(&c.stats.bytes_fetched), asked);
        }

        /// A body that ends early is resumed from its first missing byte: one retry and one
        /// resume per truncation, and the bytes fetched add up to exactly what was asked.
        #[tokio::test]
        async fn truncate_rate_resumes_exactly() {
            let bed = bed(TestbedOptions {
                seed: 11,
                ..Default::default()
            })
            .await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            set(&bed, r#"{"truncate_rate":0.5}"#);
            let mut asked = 0;
            for _ in 0..3 {
                asked += read_big(&c, &bed, &m).await;
            }
            let s = bed.server.stats();
            assert!(
                s.faults.truncate > 2,
                "only {} truncations",
                s.faults.truncate
            );
            assert_eq!(n(&c.stats.retries), s.faults.truncate);
            assert_eq!(n(&c.stats.resumes), s.faults.truncate);
            assert_eq!(media(&s), 9 + s.faults.truncate);
            assert_eq!(n(&c.stats.bytes_fetched), asked);
            assert_eq!(n(&c.stats.checksum_mismatches), 0);
        }

        /// A body that stops sending (for far longer than the stall timeout) is abandoned
        /// after `stall_timeout` and resumed from its first missing byte.
        #[tokio::test]
        async fn stall_rate_times_out_and_resumes() {
            let bed = bed(TestbedOptions {
                seed: 2,
                ..Default::default()
            })
            .await;
            let m = big_meta(&bed).await;
            let c = client(
                &bed,
                Opts {
                    stall_timeout: Duration::from_millis(700),
                    ..Default::default()
                },
            );
            set(&bed, r#"{"stall_rate":0.5,"stall_duration":"10min"}"#);
            let asked = read_big(&c, &bed, &m).await;
            let s = bed.server.stats();
            assert!(s.faults.stall >= 1, "no stall injected");
            assert_eq!(n(&c.stats.retries), s.faults.stall);
            assert_eq!(n(&c.stats.resumes), s.faults.stall);
            assert_eq!(media(&s), 3 + s.faults.stall);
            assert_eq!(n(&c.stats.bytes_fetched), asked);
            bed.server.shutdown().await;
        }

        /// A flipped byte in a whole-object answer fails its CRC32C: counted, asked again
        /// (whole), and the bytes come out right. Every answer corrupt: the client gives up
        /// with the checksum error. A ranged answer has no checksum to check (GCS gives one
        /// per object): its flipped byte goes through, which is why the filesystem checks
        /// what each handle served against the object's CRC32C.
        #[tokio::test]
        async fn corrupt_rate_fails_whole_reads_crc_and_passes_ranges() {
            let bed = bed(TestbedOptions {
                seed: 4,
                ..Default::default()
            })
            .await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            set(&bed, r#"{"corrupt_rate":0.5}"#);
            for _ in 0..6 {
                let whole = c.get_range(version(&m), 0, m.size).await.unwrap();
                assert!(whole[..] == bed.big[..]);
            }
            let s = bed.server.stats();
            assert!(
                s.faults.corrupt >= 2,
                "only {} corruptions",
                s.faults.corrupt
            );
            assert_eq!(n(&c.stats.checksum_mismatches), s.faults.corrupt);
            assert_eq!(n(&c.stats.retries), s.faults.corrupt);
            assert_eq!(
                n(&c.stats.resumes),
                0,
                "a corrupt body is fetched again whole"
            );
            assert_eq!(n(&c.stats.bytes_fetched), m.size * (6 + s.faults.corrupt));

            set(&bed, r#"{"corrupt_rate":1.0}"#);
            let c = client(
                &bed,
                Opts {
                    max_attempts: 3,
                    ..Default::default()
                },
            );
            let e = c.get_range(version(&m), 0, m.size).await.unwrap_err();
            assert!(
                matches!(e, ClientError::Checksum(_)) && e.to_string().contains("CRC32C"),
                "{e}"
            );
            assert_eq!(n(&c.stats.checksum_mismatches), 3);
            let part = c.get_range(version(&m), 100, 200_100).await.unwrap();
            let diffs = (0..part.len())
                .filter(|&i| part[i] != bed.big[100 + i])
                .count();
            assert_eq!(diffs, 1, "one flipped byte, passed through unchecked");
            assert_eq!(n(&c.stats.checksum_mismatches), 3);
        }

        /// First-byte latency under the stall timeout costs nothing; over it, each attempt
        /// times out waiting for headers and the client gives up after max_attempts.
        #[tokio::test]
        async fn first_byte_latency_within_and_past_the_stall_timeout() {
            let bed = bed(TestbedOptions::default()).await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            set(&bed, r#"{"first_byte_latency":"50ms"}"#);
            let asked = read_big(&c, &bed, &m).await;
            assert_eq!(n(&c.stats.retries), 0);
            assert_eq!(n(&c.stats.bytes_fetched), asked);

            set(&bed, r#"{"first_byte_latency":"10min"}"#);
            let c = client(
                &bed,
                Opts {
                    max_attempts: 3,
                    stall_timeout: Duration::from_millis(200),
                    ..Default::default()
                },
            );
            let e = c.stat(SMALL_NAME).await.unwrap_err();
            assert!(
                matches!(e, ClientError::Network { .. }) && e.to_string().contains("stall timeout"),
                "{e}"
            );
            assert_eq!(n(&c.stats.retries), 2);
            assert_eq!(n(&c.stats.stat_requests), 3);
            assert_eq!(bed.server.stats().requests.get_meta, 3);
            bed.server.shutdown().await;
        }

        /// Jittered latency below the stall timeout: no retries, exact bytes.
        #[tokio::test]
        async fn latency_jitter_below_the_stall_timeout() {
            let bed = bed(TestbedOptions::default()).await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            set(&bed, r#"{"latency_jitter":"80ms"}"#);
            let asked = read_big(&c, &bed, &m).await;
            for _ in 0..5 {
                c.stat(SMALL_NAME).await.unwrap();
            }
            assert_eq!(n(&c.stats.retries), 0);
            assert_eq!(n(&c.stats.bytes_fetched), asked);
            assert_eq!(bed.server.stats().requests.get_meta, 5);
        }

        /// A bandwidth cap is only slower; a trickle whose next bytes take longer than the
        /// stall timeout (4 KiB pieces 200 ms apart, 100 ms timeout) cannot finish in one
        /// answer, and completes by resuming, never fetching a byte twice.
        #[tokio::test]
        async fn bandwidth_caps_and_a_trickle_resumes() {
            let bed = bed(TestbedOptions::default()).await;
            let m = big_meta(&bed).await;
            let c = client(&bed, Opts::default());
            set(&bed, r#"{"bandwidth":"16MB/s"}"#);
            let whole = c.get_range(version(&m), 0, m.size).await.unwrap();
            assert!(whole[..] == bed.big[..]);
            assert_eq!(n(&c.stats.retries), 0);
            assert_eq!(n(&c.stats.bytes_fetched), m.size);

            set(&bed, r#"{"bandwidth":20000}"#);
            let c = client(
                &bed,
                Opts {
                    stall_timeout: Duration::from_millis(100),
                    ..Default::default()
                },
            );
            let len = 5 * 4096 + 17;
            let part = c.get_range(version(&m), 1000, 1000 + len).await.unwrap();
            assert!(part[..] == bed.big[1000..1000 + len as usize]);
            let resumes = n(&c.stats.resumes);
            assert!(
                (1..=5).contains(&resumes),
                "{resumes} resumes for 6 paced pieces"
            );
            assert_eq!(n(&c.stats.bytes_fetched), len);
            bed.server.shutdown().await;
        }

        /// A requester-pays bucket refuses a client without a billing project (400, not
        /// retried, reported as access denied) and serves one with it.
        #[tokio::test]
        async fn requester_pays_needs_the_billing_project() {
            let bed = bed(TestbedOptions {
                requester_pays: true,
                ..Default::default()
            })
            .await;
            let c = client(&bed, Opts::default());
            let e = c.stat(SMALL_NAME).await.unwrap_err();
            assert!(matches!(e, ClientError::Denied { status: 400, .. }), "{e}");
            assert!(e.to_string().contains("requester pays"), "{e}");
            assert_eq!(n(&c.stats.retries), 0);
            let c = client(
                &bed,
                Opts {
                    billing: Some("my-project"),
                    ..Default::default()
                },
            );
            let m = c.stat(BIG_NAME).await.unwrap();
            assert!(c.get_range(version(&m), 0, 10).await.unwrap()[..] == bed.big[..10]);
            assert!(list_all(&c, &ListRequest::default()).await.is_ok());
        }

        /// Required tokens: no token is 401, an unknown one 403 (neither retried), a token
        /// matching a `prefix*` entry is served.
        #[tokio::test]
        async fn require_tokens() {
            let bed = bed(TestbedOptions {
                require_tokens: vec!["tok-*".into()],
                ..Default::default()
            })
            .await;
            let anon = client(&bed, Opts::default());
            let e = anon.stat(SMALL_NAME).await.unwrap_err();
            assert!(matches!(e, ClientError::Denied { status: 401, .. }), "{e}");
            let wrong = client(
                &bed,
                Opts {
                    tokens: TokenSource::fixed("other"),
                    ..Default::default()
                },
            );
            let e = wrong.list_page(&ListRequest::default()).await.unwrap_err();
            assert!(matches!(e, ClientError::Denied { status: 403, .. }), "{e}");
            assert_eq!(n(&anon.stats.retries) + n(&wrong.stats.retries), 0);
            let ok = client(
                &bed,
                Opts {
                    tokens: TokenSource::fixed("tok-abc"),
                    ..Default::default()
                },
            );
            let m = ok.stat(BIG_NAME).await.unwrap();
            assert!(ok.get_range(version(&m), 0, m.size).await.unwrap()[..] == bed.big[..]);
        }

        /// A token past its TTL (1 ns: only its first use is in time) is refused with 401
        /// and not retried; forgetting tokens on the server restarts the TTL.
        #[tokio::test]
        async fn token_ttl_expires() {
            let bed = bed(TestbedOptions {
                require_tokens: vec!["tok".into()],
                token_ttl: Some(Duration::from_nanos(1)),
                ..Default::default()
            })
            .await;
            let c = client(
                &bed,
                Opts {
                    tokens: TokenSource::fixed("tok"),
                    ..Default::default()
                },
            );
            c.stat(SMALL_NAME).await.unwrap();
            let e = c.stat(SMALL_NAME).await.unwrap_err();
            assert!(matches!(e, ClientError::Denied { status: 401, .. }), "{e}");
            assert!(e.to_string().contains("Invalid Credentials"), "{e}");
            assert_eq!(n(&c.stats.retries), 0);
            set(&bed, r#"{"forget_tokens":true}"#);
            c.stat(SMALL_NAME).await.unwrap();
            assert_eq!(
                n(&c.stats.token_refreshes),
                0,
                "a fixed token is not asked again"
            );
        }

        /// Credentials that can mint another token survive its expiry: each 401 (a token
        /// used past its 1 ns TTL) drops the token, a new one is granted at the testbed's
        /// /token, and the request asked once more; no error reaches the caller, and a large
        /// ranged read in the middle comes back whole.
        #[tokio::test]
        async fn an_expired_token_is_refreshed_and_the_request_asked_again() {
            let bed = bed(TestbedOptions {
                require_tokens: vec!["tbtok-*".into()],
                token_ttl: Some(Duration::from_nanos(1)),
                ..Default::default()
            })
            .await;
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("adc.json");
            std::fs::write(
                &file,
                serde_json::json!({
                    "type": "authorized_user",
                    "client_id": "cid",
                    "client_secret": "s",
                    "refresh_token": "1//r",
                    "token_uri": format!("{}/token", bed.server.endpoint()),
                })
                .to_string(),
            )
            .unwrap();
            let tokens = TokenSource::build(&crate::client::auth::Credentials {
                kind: CredentialKind::ApplicationDefault,
                source: crate::client::auth::CredentialSource::Variable {
                    name: "GOOGLE_APPLICATION_CREDENTIALS",
                    value: file.display().to_string(),
                },
                account: None,
            })
            .await
            .unwrap();
            let c = client(
                &bed,
                Opts {
                    tokens,
                    max_attempts: 1,
                    ..Default::default()
                },
            );
            let meta = c.stat(BIG_NAME).await.unwrap();
            for _ in 0..3 {
                c.stat(SMALL_NAME).await.unwrap();
            }
            let got = c.get_range(version(&meta), 1, meta.size).await.unwrap();
            assert_eq!(&got[..], &bed.big[1..]);
            let s = bed.server.stats();
            // Every request after the first met an expired token once.
            assert_eq!(n(&c.stats.token_refreshes), 4);
            assert_eq!(s.responses_with(401), 4, "{s:?}");
            assert_eq!(n(&c.stats.retries), 0, "a refresh is not a retry");
        }

        /// A service-account key goes through gcp_auth, which keeps a token until it nears
        /// its expiry and cannot be told to drop it: after a 401 the provider is made anew,
        /// so the next request carries a newly granted token (JWT grant at the key's
        /// token_uri). A token refused even then is an error naming the key and the fix.
        #[tokio::test]
        async fn a_service_account_token_refused_early_is_replaced() {
            let bed = bed(TestbedOptions {
                require_tokens: vec!["tbtok-*".into()],
                token_ttl: Some(Duration::from_nanos(1)),
                ..Default::default()
            })
            .await;
            let dir = tempfile::tempdir().unwrap();
            let key = dir.path().join("sa.json");
            std::fs::write(
                &key,
                crate::client::auth::test_key_json(
                    dir.path(),
                    "sa@p.iam.gserviceaccount.com",
                    &format!("{}/token", bed.server.endpoint()),
                ),
            )
            .unwrap();
            let tokens = TokenSource::build(&crate::client::auth::Credentials {
                kind: CredentialKind::ServiceAccountKey,
                source: crate::client::auth::CredentialSource::File(key.clone()),
                account: None,
            })
            .await
            .unwrap();
            let c = client(
                &bed,
                Opts {
                    tokens,
                    max_attempts: 1,
                    ..Default::default()
                },
            );
            // Each token is good for one request: every request after the first meets a
            // 401 and is asked again with a token of a new provider.
            for _ in 0..3 {
                c.stat(SMALL_NAME).await.unwrap();
            }
            assert_eq!(n(&c.stats.token_refreshes), 2);
            assert_eq!(bed.server.stats().responses_with(401), 2);

            // Refused whatever the token: one refresh, then the error says whose and what to do.
            set(&bed, r#"{"revoke_tokens":["tbtok-*"]}"#);
            let e = c.stat(SMALL_NAME).await.unwrap_err();
            assert!(matches!(e, ClientError::Denied { status: 401, .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("Invalid Credentials")
                    && msg.contains(&format!("service-account key {}", key.display()))
                    && msg.contains("even with a fresh token")
                    && msg.contains("make a new key"),
                "{msg}"
            );
            assert_eq!(
                bed.server.stats().responses_with(401),
                2,
                "asked once more, not again"
            );
        }

        /// testPermissions: what the testbed's grants leave, and a server without it is an
        /// error (so the start-up check skips), never "holds nothing".
        #[tokio::test]
        async fn permissions_are_asked_of_the_bucket() {
            let bed = bed(TestbedOptions {
                deny_get: vec![BUCKET.into()],
                requester_pays: true,
                ..Default::default()
            })
            .await;
            let c = client(
                &bed,
                Opts {
                    billing: Some("proj"),
                    ..Default::default()
                },
            );
            let asked = ["storage.objects.list", "storage.objects.get"];
            assert_eq!(
                c.test_permissions(&asked).await.unwrap(),
                ["storage.objects.list"]
            );
            assert_eq!(n(&c.stats.permission_requests), 1);
            // The grant is enforced, not only reported.
            let e = c.stat(SMALL_NAME).await.unwrap_err();
            assert!(matches!(e, ClientError::Denied { status: 403, .. }), "{e}");
            // Without userProject the requester-pays bucket refuses, as GCS does.
            let e = client(&bed, Opts::default())
                .test_permissions(&asked)
                .await
                .unwrap_err();
            assert!(matches!(e, ClientError::Denied { status: 400, .. }), "{e}");
            assert!(matches!(
                parse_permissions(br#"{"kind":"storage#bucket","name":"b"}"#, "p"),
                Err(ClientError::Malformed(_))
            ));
            assert_eq!(
                parse_permissions(br#"{"kind":"storage#testIamPermissionsResponse"}"#, "p")
                    .unwrap(),
                Vec::<String>::new()
            );
        }

        /// An unavailable server resets every connection: retried up to max_attempts, then
        /// a network error; once it is back, the same client reads again.
        #[tokio::test]
        async fn unavailable_is_retried_then_given_up() {
            let bed = bed(TestbedOptions::default()).await;
            let m = big_meta(&bed).await;
            let c = client(
                &bed,
                Opts {
                    max_attempts: 5,
                    ..Default::default()
                },
            );
            set(&bed, r#"{"unavailable":true}"#);
            let e = c.get_range(version(&m), 0, m.size).await.unwrap_err();
            assert!(matches!(e, ClientError::Network { .. }), "{e}");
            assert_eq!(n(&c.stats.retries), 4);
            assert_eq!(media(&bed.server.stats()), 5);
            set(&bed, r#"{"unavailable":false}"#);
            assert!(c.get_range(version(&m), 0, m.size).await.unwrap()[..] == bed.big[..]);
            assert_eq!(n(&c.stats.retries), 4);
        }

        /// Every malformation is refused with an error that is not retried (the same server
        /// would answer the same way); answers of other kinds are unaffected.
        #[tokio::test]
        async fn malformed_answers_are_refused_not_retried() {
            let bed = bed(TestbedOptions::default()).await;
            let m = big_meta(&bed).await;
            let list = ListRequest {
                prefix: "list/".into(),
                ..Default::default()
            };
            for name in [
                "bad-json",
                "missing-size",
                "non-numeric-size",
                "bad-crc",
                "huge-page",
                "repeat-token",
            ] {
                set(&bed, &format!(r#"{{"malformed":"{name}"}}"#));
                let c = client(&bed, Opts::default());
                let e = list_all(&c, &list).await.unwrap_err();
                let stat = c.stat(SMALL_NAME).await;
                let media_ok = c.get_range(version(&m), 0, 10).await;
                assert!(media_ok.is_ok(), "{name} broke a media read");
                match name {
                    // The testbed refuses its own "loop" token when it comes back (it is not one
                    // of its tokens), so the listing ends with that 400 on the second page.
                    "repeat-token" => {
                        assert!(matches!(e, ClientError::Http { status: 400, .. }), "{e}");
                        assert!(e.to_string().contains("page token"), "{e}");
                        assert_eq!(n(&c.stats.list_requests), 2);
                        assert!(stat.is_ok());
                    }
                    "huge-page" => {
                        assert!(matches!(e, ClientError::Malformed(_)), "{name}: {e}");
                        assert!(e.to_string().contains("larger than"), "{e}");
                        assert!(stat.is_ok());
                    }
                    _ => {
                        assert!(matches!(e, ClientError::Malformed(_)), "{name}: {e}");
                        assert!(
                            matches!(stat, Err(ClientError::Malformed(_))),
                            "{name}: {stat:?}"
                        );
                    }
                }
                assert_eq!(n(&c.stats.retries), 0, "{name}");
            }
            for (name, whole_ok) in [
                ("no-content-range", true),
                ("wrong-content-range", true),
                ("wrong-generation", false),
                ("short-body", false),
            ] {
                set(&bed, &format!(r#"{{"malformed":"{name}"}}"#));
                let c = client(&bed, Opts::default());
                let e = c.get_range(version(&m), 5, 5000).await.unwrap_err();
                match name {
                    "wrong-generation" => {
                        assert!(matches!(e, ClientError::Stale(_)), "{name}: {e}")
                    }
                    _ => assert!(matches!(e, ClientError::Malformed(_)), "{name}: {e}"),
                }
                let whole = c.get_range(version(&m), 0, m.size).await;
                assert_eq!(whole.is_ok(), whole_ok, "{name}: {whole:?}");
                assert!(c.stat(SMALL_NAME).await.is_ok(), "{name} broke metadata");
                assert_eq!(n(&c.stats.retries), 0, "{name}");
                assert_eq!(
                    bed.server.stats().faults.malformed,
                    if whole_ok { 1 } else { 2 },
                    "{name}"
                );
            }
        }
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        /// JSON values of any shape, to put where a field is expected.
        fn any_json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(|f| serde_json::json!(f)),
                ".{0,24}".prop_map(serde_json::Value::from),
                "[0-9]{1,25}".prop_map(serde_json::Value::from),
                "[A-Za-z0-9+/=]{0,12}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                    prop::collection::btree_map(".{0,8}", inner, 0..4)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// An object entry whose fields are each either well-formed or arbitrary.
        fn object_entry() -> impl Strategy<Value = serde_json::Value> {
            (
                prop_oneof![".{0,40}".prop_map(serde_json::Value::from), any_json()],
                prop_oneof![
                    any::<u64>().prop_map(|n| serde_json::Value::from(n.to_string())),
                    any_json()
                ],
                prop_oneof![
                    (1i64..i64::MAX).prop_map(|n| serde_json::Value::from(n.to_string())),
                    any_json()
                ],
                prop_oneof![
                    Just(serde_json::Value::from("2020-01-02T03:04:05.678Z")),
                    any_json()
                ],
                prop_oneof![
                    any::<u32>().prop_map(|c| {
                        use base64::Engine;
                        serde_json::Value::from(
                            base64::engine::general_purpose::STANDARD.encode(c.to_be_bytes()),
                        )
                    }),
                    any_json()
                ],
                any::<u8>(),
            )
                .prop_map(|(name, size, generation, updated, crc, drop)| {
                    let mut o = serde_json::Map::new();
                    for (i, (k, v)) in [
                        ("name", name),
                        ("size", size),
                        ("generation", generation),
                        ("updated", updated),
                        ("crc32c", crc),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        if drop & (1 << i) == 0 {
                            o.insert(k.to_string(), v);
                        }
                    }
                    serde_json::Value::Object(o)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse_list_page(&body, "fuzz");
                let _ = parse_object(&body, "fuzz");
                let _ = parse_content_range(&String::from_utf8_lossy(&body));
                let _ = crate::client::parse_crc32c(&String::from_utf8_lossy(&body));
            }

            #[test]
            fn odd_pages_parse_or_fail_cleanly(
                items in prop::collection::vec(object_entry(), 0..6),
                prefixes in prop_oneof![prop::collection::vec(".{0,20}", 0..4).prop_map(serde_json::Value::from), any_json()],
                token in prop_oneof![".{0,20}".prop_map(serde_json::Value::from), any_json()],
            ) {
                let page = serde_json::json!({"items": items, "prefixes": prefixes, "nextPageToken": token});
                let body = serde_json::to_vec(&page).unwrap();
                match parse_list_page(&body, "fuzz") {
                    Ok(p) => {
                        // What parsed is exactly what was sent.
                        prop_assert_eq!(p.items.len(), items.len());
                        for (m, j) in p.items.iter().zip(&items) {
                            prop_assert_eq!(Some(m.name.as_str()), j["name"].as_str());
                            let size = match &j["size"] {
                                serde_json::Value::String(s) => s.parse::<u64>().ok(),
                                v => v.as_u64(),
                            };
                            prop_assert_eq!(Some(m.size), size);
                        }
                    }
                    Err(e) => prop_assert!(matches!(e, ClientError::Malformed(_)), "{e}"),
                }
            }

            #[test]
            fn content_range_round_trips(a in any::<u64>(), len in 1u64..1 << 40, extra in 0u64..1 << 40) {
                let b = a.saturating_add(len - 1);
                let total = b.saturating_add(1 + extra);
                if b < total {
                    prop_assert_eq!(parse_content_range(&format!("bytes {a}-{b}/{total}")), Some((a, b, total)));
                }
                prop_assert_eq!(parse_content_range(&format!("bytes {b}-{a}/{total}")).is_some(), a == b && b < total);
            }

            #[test]
            fn crc32c_round_trips(c in any::<u32>()) {
                use base64::Engine;
                let b64 = base64::engine::general_purpose::STANDARD.encode(c.to_be_bytes());
                prop_assert_eq!(crate::client::parse_crc32c(&b64), Some(c));
            }
        }
    }
}
