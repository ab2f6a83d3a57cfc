//! The `ObjectSource` abstraction the testbed serves objects from.

#[derive(Clone, Debug)]
pub struct SourceObject {
    pub name: String,
    pub size: u64,
    pub generation: i64,
    pub updated_unix: i64,
    pub content_type: String,
}

pub trait ObjectSource: Send + Sync + 'static {
    fn buckets(&self) -> Vec<String>;
    /// Up to `limit` objects of `bucket` with name >= start, byte-wise lexicographic order. None = no such bucket.
    fn list_from(&self, bucket: &str, start: &str, limit: usize) -> Option<Vec<SourceObject>>;
    fn stat(&self, bucket: &str, name: &str) -> Option<SourceObject>;
    /// Fill buf with bytes [offset, offset+buf.len()) of the object (caller keeps it within size).
    fn read_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()>;
    /// Up to `max` bytes of the object from `offset` (at least one, within its size) without
    /// copying them, for a source that holds its bytes in memory; `None`: use `read_at`.
    /// Serving a body from shared buffers spares the testbed a fill and a copy per byte, CPU
    /// that on a small machine it would otherwise take from the client under test.
    fn bytes_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        max: usize,
    ) -> Option<std::io::Result<bytes::Bytes>> {
        let _ = (bucket, obj, offset, max);
        None
    }
    /// Optional whole-object hashes (base64 crc32c / md5 as GCS gives them), None when too costly.
    fn hashes(&self, bucket: &str, obj: &SourceObject) -> Option<(String, Option<String>)> {
        let _ = (bucket, obj);
        None
    }
}

/// Hashes of a whole byte slice, encoded as GCS does (base64 of the big-endian crc32c, base64 of the md5 digest).
pub fn gcs_hashes(data: &[u8]) -> (String, String) {
    let crc = crate::crc::crc32c(data);
    let md5 = md5::compute(data);
    (b64(&crc.to_be_bytes()), b64(&md5.0))
}

/// Incremental hasher producing the same encoding as [`gcs_hashes`].
pub struct GcsHasher {
    crc: u32,
    md5: md5::Context,
}

impl Default for GcsHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl GcsHasher {
    pub fn new() -> Self {
        GcsHasher {
            crc: 0,
            md5: md5::Context::new(),
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        self.crc = crate::crc::append(self.crc, data);
        self.md5.consume(data);
    }
    pub fn finish(self) -> (String, String) {
        (b64(&self.crc.to_be_bytes()), b64(&self.md5.finalize().0))
    }
}

pub(crate) fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}
