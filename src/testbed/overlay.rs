//! Synthetic objects (`--synthetic NAME=SIZE`) layered over another source.
//!
//! A synthetic object is pseudo-random content of any size generated on the fly by
//! [`MemSource::insert_prng`] (a 1 GiB object costs 1 MiB of memory), for benchmarks that need
//! one big object next to the dataset model. Synthetic objects shadow base objects of the same
//! name; listings are the sorted union of both.

use std::sync::Arc;

use super::mem::MemSource;
use super::source::{ObjectSource, SourceObject};

/// One `--synthetic [gs://BUCKET/]NAME=SIZE` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// None = the model's bucket.
    pub bucket: Option<String>,
    pub name: String,
    pub size: u64,
}

/// Parses `NAME=SIZE` or `gs://BUCKET/NAME=SIZE` (SIZE like `1GiB`, `256MiB`, `1000`).
pub fn parse_synthetic(s: &str) -> Result<SyntheticSpec, String> {
    let (lhs, size) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=SIZE, e.g. bench/1g.bin=1GiB"))?;
    let size = crate::units::parse_size(size)?;
    let (bucket, name) = match lhs.strip_prefix("gs://") {
        Some(rest) => match rest.split_once('/') {
            Some((b, n)) if !b.is_empty() && !n.is_empty() => (Some(b.to_string()), n.to_string()),
            _ => return Err(format!("{s:?}: expected gs://BUCKET/NAME=SIZE")),
        },
        None => (None, lhs.to_string()),
    };
    if name.is_empty() || name.starts_with('/') || name.ends_with('/') {
        return Err(format!("{s:?}: bad object name {name:?}"));
    }
    Ok(SyntheticSpec { bucket, name, size })
}

/// Seed of a synthetic object's content: a function of its name only (FNV-1a).
pub fn synthetic_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds the in-memory source for `specs`; `default_bucket` is used for specs without one.
pub fn synthetic_source(
    specs: &[SyntheticSpec],
    default_bucket: Option<&str>,
) -> anyhow::Result<MemSource> {
    let mut m = MemSource::new();
    for s in specs {
        let b = match (&s.bucket, default_bucket) {
            (Some(b), _) => b.as_str(),
            (None, Some(d)) => d,
            (None, None) => anyhow::bail!(
                "--synthetic {}: name the bucket (gs://BUCKET/{}={}) when serving --dir",
                s.name,
                s.name,
                s.size
            ),
        };
        m.insert_prng(b, &s.name, s.size, synthetic_seed(&s.name));
    }
    Ok(m)
}

/// Sorted union of two `list_from` answers (`a` wins on equal names), at most `limit` long.
fn merge_lists(
    a: Option<Vec<SourceObject>>,
    b: Option<Vec<SourceObject>>,
    limit: usize,
) -> Option<Vec<SourceObject>> {
    let (a, b) = match (a, b) {
        (None, None) => return None,
        (Some(a), None) => return Some(a.into_iter().take(limit).collect()),
        (None, Some(b)) => return Some(b.into_iter().take(limit).collect()),
        (Some(a), Some(b)) => (a, b),
    };
    let mut out = Vec::with_capacity(limit.min(a.len() + b.len()));
    let (mut ia, mut ib) = (a.into_iter().peekable(), b.into_iter().peekable());
    while out.len() < limit {
        let take_a = match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(x), Some(y)) => {
                if x.name.as_bytes() == y.name.as_bytes() {
                    ib.next();
                    true
                } else {
                    x.name.as_bytes() < y.name.as_bytes()
                }
            }
        };
        let next = if take_a { ia.next() } else { ib.next() };
        out.extend(next);
    }
    Some(out)
}

/// `extra` (synthetic objects) over `base`.
pub struct Overlay {
    base: Arc<dyn ObjectSource>,
    extra: MemSource,
}

impl Overlay {
    pub fn new(base: Arc<dyn ObjectSource>, extra: MemSource) -> Self {
        Overlay { base, extra }
    }
}

/// The buckets of `base` and `extra`, sorted.
fn union_buckets(mut v: Vec<String>, extra: &MemSource) -> Vec<String> {
    for b in extra.buckets() {
        if !v.contains(&b) {
            v.push(b);
        }
    }
    v.sort();
    v
}

impl Overlay {
    /// The layer that holds `obj`: the extra objects shadow the base.
    fn owner(&self, bucket: &str, obj: &SourceObject) -> &dyn ObjectSource {
        if self.extra.stat(bucket, &obj.name).is_some() {
            &self.extra
        } else {
            &*self.base
        }
    }
}

impl ObjectSource for Overlay {
    fn buckets(&self) -> Vec<String> {
        union_buckets(self.base.buckets(), &self.extra)
    }

    fn list_from(&self, bucket: &str, start: &str, limit: usize) -> Option<Vec<SourceObject>> {
        merge_lists(
            self.extra.list_from(bucket, start, limit),
            self.base.list_from(bucket, start, limit),
            limit,
        )
    }

    fn stat(&self, bucket: &str, name: &str) -> Option<SourceObject> {
        self.extra
            .stat(bucket, name)
            .or_else(|| self.base.stat(bucket, name))
    }

    fn read_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        self.owner(bucket, obj).read_at(bucket, obj, offset, buf)
    }

    fn bytes_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        max: usize,
    ) -> Option<std::io::Result<bytes::Bytes>> {
        self.owner(bucket, obj).bytes_at(bucket, obj, offset, max)
    }

    fn hashes(&self, bucket: &str, obj: &SourceObject) -> Option<(String, Option<String>)> {
        self.owner(bucket, obj).hashes(bucket, obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            parse_synthetic("bench/1g.bin=1GiB").unwrap(),
            SyntheticSpec {
                bucket: None,
                name: "bench/1g.bin".into(),
                size: 1 << 30
            }
        );
        assert_eq!(
            parse_synthetic("gs://b/x=y=1000").unwrap(),
            SyntheticSpec {
                bucket: Some("b".into()),
                name: "x=y".into(),
                size: 1000
            }
        );
        assert!(parse_synthetic("noequals").is_err());
        assert!(parse_synthetic("a=lots").is_err());
        assert!(parse_synthetic("gs://b=1").is_err());
        assert!(parse_synthetic("dir/=1").is_err());
    }

    #[test]
    fn overlay_merges_and_shadows() {
        let mut base = MemSource::new();
        base.insert("b", "a.txt", &b"base-a"[..]);
        base.insert("b", "c.txt", &b"base-c"[..]);
        let specs = [
            parse_synthetic("b.bin=3MiB").unwrap(),
            parse_synthetic("c.txt=10").unwrap(),
            parse_synthetic("gs://other/z=5").unwrap(),
        ];
        let extra = synthetic_source(&specs, Some("b")).unwrap();
        let o = Overlay::new(Arc::new(base), extra);
        assert_eq!(o.buckets(), ["b", "other"]);
        let names: Vec<_> = o
            .list_from("b", "", 100)
            .unwrap()
            .into_iter()
            .map(|x| x.name)
            .collect();
        assert_eq!(names, ["a.txt", "b.bin", "c.txt"]);
        assert_eq!(o.list_from("b", "b", 1).unwrap()[0].name, "b.bin");
        assert_eq!(o.stat("b", "c.txt").unwrap().size, 10);
        let big = o.stat("b", "b.bin").unwrap();
        assert_eq!(big.size, 3 << 20);
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        o.read_at("b", &big, (1 << 20) - 100, &mut x).unwrap();
        o.read_at("b", &big, (1 << 20) - 100, &mut y).unwrap();
        assert_eq!(x, y);
        assert!(x.iter().any(|&v| v != 0));
        let a = o.stat("b", "a.txt").unwrap();
        let mut buf = vec![0u8; 6];
        o.read_at("b", &a, 0, &mut buf).unwrap();
        assert_eq!(&buf, b"base-a");
        assert!(o.list_from("nope", "", 1).is_none());
        assert!(synthetic_source(&specs[..1], None).is_err());
    }
}
