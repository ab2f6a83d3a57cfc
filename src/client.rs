//! The only door to the network.
//!
//! Everything physiofs knows about a bucket arrives through [`ObjectClient`]: a page of a
//! listing, one object's metadata, or a byte range of one object version. Keeping the surface
//! this small is what lets the core be tested against [`fake::FakeClient`] with every request
//! counted, and lets retries, counters and fault handling live in one place per implementation.
//! There are deliberately no write methods: the mount is read-only by construction.

pub mod auth;
pub mod error;
pub mod failure;
pub mod fake;
pub mod gcs;
pub mod media;
pub mod pool;
pub mod tls13;

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use error::ClientError;

/// The largest ranged GET the filesystem makes (a run of missing blocks is split at this
/// size); receive buffers of exactly this size are recycled (see [`pool`]).
pub const FULL_REQUEST: u64 = 4 << 20;

/// What a listing or a metadata call tells us about one object version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Full object name in the bucket (not relative to the mount prefix).
    pub name: String,
    pub size: u64,
    /// GCS object generation; every media read is pinned to it.
    pub generation: i64,
    /// `updated` from the listing; shown as mtime.
    pub updated: SystemTime,
    /// CRC32C of the whole object (decoded from the base64 GCS sends), when the server sent it.
    pub crc32c: Option<u32>,
}

/// The object version a read is pinned to: what the listing said about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectVersion<'a> {
    pub name: &'a str,
    pub generation: i64,
    /// The listed size: decides how to ask (a whole object is read without a Range header)
    /// and is what every answer is checked against.
    pub size: u64,
    /// The listed CRC32C; a read of the whole object is verified against it.
    pub crc32c: Option<u32>,
}

/// Decodes GCS's crc32c field: base64 of the big-endian checksum.
pub fn parse_crc32c(b64: &str) -> Option<u32> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub items: Vec<ObjectMeta>,
    /// Common prefixes (only with a delimiter), each ending in the delimiter.
    pub prefixes: Vec<String>,
    pub next_page_token: Option<String>,
}

/// Parameters of one listing request. `Default` lists the whole bucket flat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListRequest {
    pub prefix: String,
    /// `Some("/")` for a per-directory listing, `None` for a flat one.
    pub delimiter: Option<String>,
    pub page_token: Option<String>,
    /// Upper bound on items + prefixes per page (GCS caps at 1,000).
    pub max_results: Option<u32>,
    /// Inclusive lower bound on names (for splitting a flat listing into key ranges).
    pub start_offset: Option<String>,
    /// Exclusive upper bound on names.
    pub end_offset: Option<String>,
}

/// The read-only object store interface.
#[async_trait]
pub trait ObjectClient: Send + Sync + 'static {
    /// The bucket this client reads.
    fn bucket(&self) -> &str;

    /// One page of a listing.
    async fn list_page(&self, req: &ListRequest) -> Result<ListPage, ClientError>;

    /// Metadata of the live version of one object.
    async fn stat(&self, name: &str) -> Result<ObjectMeta, ClientError>;

    /// Bytes `[start, end)` of one object version. Returns exactly `end - start` bytes of that
    /// generation or an error; a read of the whole object is checked against its CRC32C.
    async fn get_range(
        &self,
        obj: ObjectVersion<'_>,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ClientError>;

    /// As [`get_range`](Self::get_range), with the CRC32C of each `block`-byte piece of the
    /// answer (counted from `start`; the last piece may be shorter). A client that streams
    /// takes them as the bytes arrive, which costs far less than a second pass later.
    async fn get_range_blocks(
        &self,
        obj: ObjectVersion<'_>,
        start: u64,
        end: u64,
        block: u64,
    ) -> Result<(Bytes, Vec<u32>), ClientError> {
        let data = self.get_range(obj, start, end).await?;
        let crcs = data
            .chunks(block.max(1) as usize)
            .map(crate::crc::crc32c)
            .collect();
        Ok((data, crcs))
    }
}

/// Most pages one listing may take: 20 million entries at GCS's 1,000 per page, far beyond
/// any real bucket. A server handing out new page tokens forever is stopped here.
pub const MAX_LIST_PAGES: usize = 20_000;

/// Lists every page of `req` and merges them: items in order, prefixes de-duplicated
/// (some servers repeat a prefix on several pages). Stops with an error on a page token
/// that repeats, so a misbehaving server cannot loop us forever.
pub async fn list_all(
    client: &dyn ObjectClient,
    req: &ListRequest,
) -> Result<ListPage, ClientError> {
    let mut out = ListPage::default();
    let mut seen_prefixes = std::collections::HashSet::new();
    let mut seen_tokens = std::collections::HashSet::new();
    let mut req = req.clone();
    for _ in 0..MAX_LIST_PAGES {
        let page = client.list_page(&req).await?;
        out.items.extend(page.items);
        for p in page.prefixes {
            if seen_prefixes.insert(p.clone()) {
                out.prefixes.push(p);
            }
        }
        match page.next_page_token {
            Some(tok) if !tok.is_empty() => {
                if !seen_tokens.insert(tok.clone()) {
                    return Err(ClientError::Malformed(format!(
                        "listing of gs://{}/{} returned the same nextPageToken twice",
                        client.bucket(),
                        req.prefix
                    )));
                }
                req.page_token = Some(tok);
            }
            _ => {
                out.prefixes.sort();
                return Ok(out);
            }
        }
    }
    Err(ClientError::Malformed(format!(
        "listing of gs://{}/{} did not end after {MAX_LIST_PAGES} pages: the server keeps \
         sending new nextPageTokens; refusing to go on",
        client.bucket(),
        req.prefix
    )))
}
