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
use reqwest::StatusCode;
use serde::Deserialize;

use super::auth::TokenSource;
use super::{ClientError, ListPage, ListRequest, ObjectClient, ObjectMeta};

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

impl Default for RetryConfig {
    fn default() -> Self {
        // Enough to ride out a short throttling burst or a server restart, short enough that a
        // reader blocked on a dead network hears EIO within a minute.
        RetryConfig {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
        }
    }
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
}

/// Counters of what the client sent and received; cheap to read at any time.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub list_requests: AtomicU64,
    pub stat_requests: AtomicU64,
    pub get_requests: AtomicU64,
    pub retries: AtomicU64,
    pub bytes_fetched: AtomicU64,
}

pub struct GcsClient {
    http: reqwest::Client,
    cfg: GcsConfig,
    tokens: TokenSource,
    objects_url: String,
    pub stats: Arc<ClientStats>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    List,
    Stat,
    Get,
}

impl GcsClient {
    pub fn new(cfg: GcsConfig, tokens: TokenSource) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .pool_max_idle_per_host(cfg.pool_size)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30))
            .user_agent(concat!("physiofs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Network {
                endpoint: cfg.endpoint.clone(),
                cause: format!("cannot build HTTP client: {e}"),
            })?;
        let endpoint = cfg.endpoint.trim_end_matches('/').to_string();
        let objects_url = format!(
            "{endpoint}/storage/v1/b/{}/o",
            utf8_percent_encode(&cfg.bucket, SEGMENT)
        );
        Ok(GcsClient {
            http,
            cfg: GcsConfig { endpoint, ..cfg },
            tokens,
            objects_url,
            stats: Arc::default(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.cfg.endpoint
    }

    fn object_url(&self, name: &str) -> String {
        format!(
            "{}/{}",
            self.objects_url,
            utf8_percent_encode(name, SEGMENT)
        )
    }

    fn url_with(&self, base: &str, params: &[(&str, String)]) -> Result<reqwest::Url, ClientError> {
        let mut url = reqwest::Url::parse(base)
            .map_err(|e| ClientError::Malformed(format!("bad URL {base}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v);
            }
            if let Some(p) = &self.cfg.billing_project {
                q.append_pair("userProject", p);
            }
        }
        Ok(url)
    }

    /// Sends one logical request, retrying transient failures with exponential backoff and
    /// full jitter. `check` turns a response into a value or an error; it runs inside the
    /// retry loop, so a broken body is retried like a failed connect.
    async fn send<T, F, Fut>(
        &self,
        kind: Kind,
        url: reqwest::Url,
        headers: &[(&str, String)],
        check: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(reqwest::Response) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let started = Instant::now();
        let retry = &self.cfg.retry;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match kind {
                Kind::List => &self.stats.list_requests,
                Kind::Stat => &self.stats.stat_requests,
                Kind::Get => &self.stats.get_requests,
            }
            .fetch_add(1, Ordering::Relaxed);
            let mut req = self.http.get(url.clone());
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Some(tok) = self.tokens.token().await? {
                req = req.bearer_auth(tok);
            }
            let mut retry_after = None;
            let result = match req.send().await {
                Ok(resp) => {
                    retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    check(resp).await
                }
                Err(e) => Err(self.network_error(&e)),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.is_transient()
                        && attempt < retry.max_attempts
                        && started.elapsed() < retry.deadline =>
                {
                    let cap = retry
                        .base_delay
                        .saturating_mul(1u32 << attempt.min(16))
                        .min(retry.max_delay);
                    let mut delay = cap.mul_f64(fastrand::f64());
                    if let Some(ra) = retry_after {
                        delay = delay.max(ra.min(retry.max_delay));
                    }
                    tracing::debug!(?kind, attempt, error = %e, ?delay, "retrying");
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn network_error(&self, e: &reqwest::Error) -> ClientError {
        // reqwest's Display hides the cause chain; keep the innermost message, it says what happened.
        let mut cause = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            cause = s.to_string();
            src = s.source();
        }
        ClientError::Network {
            endpoint: self.cfg.endpoint.clone(),
            cause,
        }
    }
}

/// Turns a non-success response into the right error, with the server's own message.
async fn error_from(resp: reqwest::Response, what: &str) -> ClientError {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
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

impl ObjectJson {
    fn into_meta(self) -> Result<ObjectMeta, ClientError> {
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
            .parse("generation", &self.name)? as i64;
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
        Ok(ObjectMeta {
            name: self.name,
            size,
            generation,
            updated,
            crc32c: self.crc32c,
        })
    }
}

/// Parses `bytes a-b/total`.
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, total.parse().ok()?))
}

async fn read_body(resp: reqwest::Response, what: &str) -> Result<Bytes, ClientError> {
    resp.bytes()
        .await
        .map_err(|e| ClientError::Malformed(format!("body error reading {what}: {e}")))
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
        let url = self.url_with(&self.objects_url, &params)?;
        let bucket = &self.cfg.bucket;
        let what = format!("bucket gs://{bucket}");
        let json: ObjectsJson = self
            .send(Kind::List, url, &[], |resp| {
                let what = what.clone();
                async move {
                    if !resp.status().is_success() {
                        return Err(error_from(resp, &what).await);
                    }
                    let body = read_body(resp, &what).await?;
                    serde_json::from_slice(&body).map_err(|e| {
                        ClientError::Malformed(format!("listing of {what} is not valid JSON: {e}"))
                    })
                }
            })
            .await?;
        Ok(ListPage {
            items: json
                .items
                .into_iter()
                .map(ObjectJson::into_meta)
                .collect::<Result<_, _>>()?,
            prefixes: json.prefixes,
            next_page_token: json.next_page_token.filter(|t| !t.is_empty()),
        })
    }

    async fn stat(&self, name: &str) -> Result<ObjectMeta, ClientError> {
        let url = self.url_with(
            &self.object_url(name),
            &[("fields", "name,size,generation,updated,crc32c".to_string())],
        )?;
        let what = format!("gs://{}/{name}", self.cfg.bucket);
        let json: ObjectJson = self
            .send(Kind::Stat, url, &[], |resp| {
                let what = what.clone();
                async move {
                    if !resp.status().is_success() {
                        return Err(error_from(resp, &what).await);
                    }
                    let body = read_body(resp, &what).await?;
                    serde_json::from_slice(&body)
                        .map_err(|e| ClientError::Malformed(format!("metadata of {what}: {e}")))
                }
            })
            .await?;
        json.into_meta()
    }

    async fn get_range(
        &self,
        name: &str,
        generation: i64,
        object_size: u64,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ClientError> {
        if start >= end {
            return Ok(Bytes::new());
        }
        if end > object_size {
            return Err(ClientError::Malformed(format!(
                "read of gs://{}/{name} asked bytes {start}..{end} of a {object_size}-byte object",
                self.cfg.bucket
            )));
        }
        let url = self.url_with(
            &self.object_url(name),
            &[
                ("alt", "media".to_string()),
                ("generation", generation.to_string()),
            ],
        )?;
        let whole = start == 0 && end == object_size;
        let mut headers = Vec::new();
        if !whole {
            headers.push(("range", format!("bytes={}-{}", start, end - 1)));
        }
        let what = format!("gs://{}/{name}#{generation}", self.cfg.bucket);
        let stats = self.stats.clone();
        self.send(Kind::Get, url, &headers, |resp| {
            let what = what.clone();
            let stats = stats.clone();
            async move {
                let status = resp.status();
                if !status.is_success() {
                    return Err(error_from(resp, &what).await);
                }
                if let Some(g) = resp.headers().get("x-goog-generation") {
                    let g = g.to_str().unwrap_or_default();
                    if g != generation.to_string() {
                        return Err(ClientError::Stale(format!(
                            "{what}: server sent generation {g}"
                        )));
                    }
                }
                // Where in the object does this body start, and how long must it be?
                let (body_start, expect_len) = if status == StatusCode::PARTIAL_CONTENT {
                    let cr = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_content_range)
                        .ok_or_else(|| {
                            ClientError::Malformed(format!(
                                "{what}: 206 without a valid Content-Range"
                            ))
                        })?;
                    if cr.0 != start || cr.1 + 1 != end || cr.2 != object_size {
                        return Err(ClientError::Malformed(format!(
                            "{what}: asked bytes {start}-{} of {object_size}, got {}-{}/{}",
                            end - 1,
                            cr.0,
                            cr.1,
                            cr.2
                        )));
                    }
                    (start, end - start)
                } else {
                    // 200: the whole object (a server may ignore Range).
                    (0, object_size)
                };
                // Stream the body into a buffer of exactly the asked size (no over-allocation,
                // so the cache's byte count is the memory used). A server that ignored the
                // Range sends the whole object: keep only the asked part and stop early.
                let mut resp = resp;
                let want = (end - start) as usize;
                let mut buf = BytesMut::with_capacity(want);
                let mut pos = body_start;
                let body_end = body_start + expect_len;
                while let Some(chunk) = resp.chunk().await.map_err(|e| {
                    ClientError::Malformed(format!("body error reading {what}: {e}"))
                })? {
                    stats
                        .bytes_fetched
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    let (cstart, cend) = (pos, pos + chunk.len() as u64);
                    pos = cend;
                    if cend > body_end {
                        return Err(ClientError::Malformed(format!(
                            "long body for {what}: more than the {expect_len} bytes announced"
                        )));
                    }
                    let (a, b) = (cstart.max(start), cend.min(end));
                    if a < b {
                        buf.extend_from_slice(&chunk[(a - cstart) as usize..(b - cstart) as usize]);
                    }
                    if pos >= end && body_end > end {
                        // The rest is beyond what we asked (a 200 for a range): drop it.
                        break;
                    }
                }
                if buf.len() != want {
                    return Err(ClientError::Malformed(format!(
                        "short body for {what}: expected {want} bytes, got {}",
                        buf.len()
                    )));
                }
                Ok(buf.freeze())
            }
        })
        .await
    }
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

    #[test]
    fn names_are_one_segment() {
        let c = GcsClient::new(
            GcsConfig {
                endpoint: "http://127.0.0.1:1/".into(),
                bucket: "b".into(),
                billing_project: Some("proj".into()),
                retry: RetryConfig::default(),
                pool_size: 1,
            },
            TokenSource::Anonymous,
        )
        .unwrap();
        assert_eq!(
            c.object_url("a/b c%+#?é"),
            "http://127.0.0.1:1/storage/v1/b/b/o/a%2Fb%20c%25%2B%23%3F%C3%A9"
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
}
