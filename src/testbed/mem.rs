//! A small in-memory `ObjectSource`, for tests and benchmarks.
//!
//! Objects are either literal bytes or pseudo-random content of any size that is
//! generated on the fly (so a 1 GiB object costs 1 MiB of memory).

use std::collections::BTreeMap;

use bytes::Bytes;

use super::source::{ObjectSource, SourceObject, gcs_hashes};

const PRNG_TABLE: usize = 1 << 20;

/// Pseudo-random objects up to this size are hashed when inserted.
pub const PRNG_HASH_LIMIT: u64 = 256 << 20;

#[derive(Clone)]
enum Content {
    Bytes(Bytes),
    Prng(u64),
}

#[derive(Clone)]
struct Entry {
    obj: SourceObject,
    content: Content,
    hashes: Option<(String, Option<String>)>,
}

/// In-memory source. Build it with `&mut self` methods, then wrap it in an `Arc`.
#[derive(Default)]
pub struct MemSource {
    buckets: BTreeMap<String, BTreeMap<String, Entry>>,
    table: Option<Bytes>,
    /// Base value for `updated_unix` (default 1_700_000_000).
    pub base_time: i64,
}

pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn guess_content_type(name: &str) -> &'static str {
    let lower = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match lower.as_str() {
        "dcm" => "application/dicom",
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "txt" => "text/plain",
        "csv" => "text/csv",
        "gz" => "application/gzip",
        "json" => "application/json",
        "html" | "htm" => "text/html",
        _ => "application/octet-stream",
    }
}

pub(crate) fn content_type_for(name: &str) -> String {
    guess_content_type(name).to_string()
}

impl MemSource {
    pub fn new() -> Self {
        MemSource {
            base_time: 1_700_000_000,
            ..Default::default()
        }
    }

    pub fn add_bucket(&mut self, bucket: &str) -> &mut Self {
        self.buckets.entry(bucket.to_string()).or_default();
        self
    }

    fn next_generation(&self) -> i64 {
        let n: usize = self.buckets.values().map(|b| b.len()).sum();
        1_700_000_000_000_000 + n as i64 + 1
    }

    /// Insert (or replace) an object with literal content; hashes are computed when <= 16 MiB.
    pub fn insert(&mut self, bucket: &str, name: &str, data: impl Into<Bytes>) -> SourceObject {
        let data: Bytes = data.into();
        let generation = self.next_generation();
        let obj = SourceObject {
            name: name.to_string(),
            size: data.len() as u64,
            generation,
            updated_unix: self.base_time,
            content_type: content_type_for(name),
        };
        let hashes = if data.len() <= 16 << 20 {
            let (c, m) = gcs_hashes(&data);
            Some((c, Some(m)))
        } else {
            None
        };
        self.buckets.entry(bucket.to_string()).or_default().insert(
            name.to_string(),
            Entry {
                obj: obj.clone(),
                content: Content::Bytes(data),
                hashes,
            },
        );
        obj
    }

    /// Insert an object of `size` pseudo-random bytes (content determined by `seed` and offset).
    /// Objects up to [`PRNG_HASH_LIMIT`] get crc32c/md5Hash like any GCS object; bigger ones
    /// are listed without (hashing them would cost startup time for nothing).
    pub fn insert_prng(&mut self, bucket: &str, name: &str, size: u64, seed: u64) -> SourceObject {
        if self.table.is_none() {
            let mut st = 0x5EED_u64;
            let mut t = vec![0u8; PRNG_TABLE];
            for c in t.chunks_mut(8) {
                c.copy_from_slice(&splitmix64(&mut st).to_le_bytes());
            }
            self.table = Some(Bytes::from(t));
        }
        let generation = self.next_generation();
        let obj = SourceObject {
            name: name.to_string(),
            size,
            generation,
            updated_unix: self.base_time,
            content_type: content_type_for(name),
        };
        self.buckets.entry(bucket.to_string()).or_default().insert(
            name.to_string(),
            Entry {
                obj: obj.clone(),
                content: Content::Prng(seed),
                hashes: None,
            },
        );
        if size <= PRNG_HASH_LIMIT {
            let mut h = super::source::GcsHasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < size {
                let n = (size - off).min(buf.len() as u64) as usize;
                self.fill_prng(seed, off, &mut buf[..n]);
                h.update(&buf[..n]);
                off += n as u64;
            }
            let (crc, md5) = h.finish();
            if let Some(e) = self.buckets.get_mut(bucket).and_then(|b| b.get_mut(name)) {
                e.hashes = Some((crc, Some(md5)));
            }
        }
        obj
    }

    /// Set the generation of an existing object (for generation tests).
    pub fn set_generation(&mut self, bucket: &str, name: &str, generation: i64) {
        if let Some(e) = self.buckets.get_mut(bucket).and_then(|b| b.get_mut(name)) {
            e.obj.generation = generation;
        }
    }

    /// The bytes a PRNG object of this `seed` holds at `offset..offset+buf.len()`.
    fn fill_prng(&self, seed: u64, offset: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let seg = self.prng_segment(seed, offset + done as u64, buf.len() - done);
            buf[done..done + seg.len()].copy_from_slice(&seg);
            done += seg.len();
        }
    }

    /// The PRNG object's bytes from `off`: one piece of the table (up to `max` bytes, within
    /// one table-sized block of the object and one wrap of the table), shared, not copied.
    fn prng_segment(&self, seed: u64, off: u64, max: usize) -> Bytes {
        let table = self.table.as_ref().expect("prng table");
        let block = off / PRNG_TABLE as u64;
        let within = (off % PRNG_TABLE as u64) as usize;
        let mut st = seed ^ block.wrapping_mul(0xA076_1D64_78BD_642F);
        let rot = (splitmix64(&mut st) % PRNG_TABLE as u64) as usize;
        let idx = (within + rot) % PRNG_TABLE;
        let n = (PRNG_TABLE - within).min(PRNG_TABLE - idx).min(max);
        table.slice(idx..idx + n)
    }

    fn entry(&self, bucket: &str, obj: &SourceObject) -> std::io::Result<&Entry> {
        self.buckets
            .get(bucket)
            .and_then(|b| b.get(&obj.name))
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such object"))
    }

    /// Convenience: the full content of an object (for test assertions).
    pub fn content(&self, bucket: &str, name: &str) -> Option<Vec<u8>> {
        let e = self.buckets.get(bucket)?.get(name)?;
        let mut v = vec![0u8; e.obj.size as usize];
        self.read_at(bucket, &e.obj, 0, &mut v).ok()?;
        Some(v)
    }
}

impl ObjectSource for MemSource {
    fn buckets(&self) -> Vec<String> {
        self.buckets.keys().cloned().collect()
    }

    fn list_from(&self, bucket: &str, start: &str, limit: usize) -> Option<Vec<SourceObject>> {
        let b = self.buckets.get(bucket)?;
        Some(
            b.range::<str, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
                .take(limit)
                .map(|(_, e)| e.obj.clone())
                .collect(),
        )
    }

    fn stat(&self, bucket: &str, name: &str) -> Option<SourceObject> {
        self.buckets.get(bucket)?.get(name).map(|e| e.obj.clone())
    }

    fn read_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        let e = self.entry(bucket, obj)?;
        if offset + buf.len() as u64 > e.obj.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        match &e.content {
            Content::Bytes(b) => {
                let o = offset as usize;
                buf.copy_from_slice(&b[o..o + buf.len()]);
            }
            Content::Prng(seed) => self.fill_prng(*seed, offset, buf),
        }
        Ok(())
    }

    fn bytes_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        max: usize,
    ) -> Option<std::io::Result<Bytes>> {
        let e = match self.entry(bucket, obj) {
            Ok(e) => e,
            Err(err) => return Some(Err(err)),
        };
        if offset >= e.obj.size || max == 0 {
            return Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past end",
            )));
        }
        let max = max.min((e.obj.size - offset) as usize);
        Some(Ok(match &e.content {
            Content::Bytes(b) => b.slice(offset as usize..offset as usize + max),
            Content::Prng(seed) => self.prng_segment(*seed, offset, max),
        }))
    }

    fn hashes(&self, bucket: &str, obj: &SourceObject) -> Option<(String, Option<String>)> {
        self.buckets.get(bucket)?.get(&obj.name)?.hashes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bodies are served from `bytes_at` (shared pieces) where a source has it: its pieces
    /// must be exactly the bytes `read_at` gives, from any offset, across table blocks.
    #[test]
    fn bytes_at_pieces_are_the_bytes_read_at_gives() {
        let mut m = MemSource::default();
        let size = 3 * PRNG_TABLE as u64 + 12_345;
        let p = m.insert_prng("b", "big", size, 7);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let d = m.insert("b", "small", data.clone());
        for (obj, from) in [
            (&p, 0u64),
            (&p, PRNG_TABLE as u64 - 100),
            (&p, 2 * PRNG_TABLE as u64 + 5),
            (&d, 0),
            (&d, 99_999),
        ] {
            let len = (obj.size - from).min(PRNG_TABLE as u64 + 777) as usize;
            let mut want = vec![0u8; len];
            m.read_at("b", obj, from, &mut want).unwrap();
            let mut got = Vec::new();
            while got.len() < len {
                let piece = m
                    .bytes_at("b", obj, from + got.len() as u64, len - got.len())
                    .expect("in-memory source")
                    .unwrap();
                assert!(!piece.is_empty() && piece.len() <= len - got.len());
                got.extend_from_slice(&piece);
            }
            assert!(got == want, "{} from {from}", obj.name);
        }
        assert!(
            m.bytes_at("b", &d, 100_000, 10).unwrap().is_err(),
            "past the end"
        );
        assert_eq!(
            &m.bytes_at("b", &d, 99_990, 1 << 20).unwrap().unwrap()[..],
            &data[99_990..]
        );
    }
}
