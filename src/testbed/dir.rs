//! `DirSource`: serve a local folder. Each sub-folder of the root is a bucket; every
//! regular file below it (recursively) is an object named by its relative path with `/`.
//!
//! The tree is scanned once at construction (a snapshot of names, sizes and mtimes);
//! contents are read from the files on demand with positioned reads.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use super::mem::content_type_for;
use super::source::{GcsHasher, ObjectSource, SourceObject};

/// Files up to this size get crc32c/md5 computed (once, memoized) by default.
pub const DEFAULT_HASH_LIMIT: u64 = 4 << 20;
const OPEN_FILE_CACHE: usize = 128;

struct DirEntry {
    obj: SourceObject,
    path: PathBuf,
}

pub struct DirSource {
    root: PathBuf,
    buckets: BTreeMap<String, BTreeMap<String, DirEntry>>,
    hash_limit: u64,
    #[allow(clippy::type_complexity)]
    hash_cache: Mutex<HashMap<(String, String, i64), (String, Option<String>)>>,
    open_files: Mutex<HashMap<PathBuf, Arc<File>>>,
}

impl DirSource {
    /// Scan `root`: every sub-folder is a bucket.
    pub fn new(root: impl AsRef<Path>) -> io::Result<Self> {
        let root = root.as_ref().to_path_buf();
        let mut buckets = BTreeMap::new();
        for ent in std::fs::read_dir(&root)? {
            let ent = ent?;
            if !ent.file_type()?.is_dir() {
                continue;
            }
            let Some(bucket) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let mut objects = BTreeMap::new();
            scan(&ent.path(), "", &mut objects)?;
            buckets.insert(bucket, objects);
        }
        Ok(DirSource {
            root,
            buckets,
            hash_limit: DEFAULT_HASH_LIMIT,
            hash_cache: Mutex::new(HashMap::new()),
            open_files: Mutex::new(HashMap::new()),
        })
    }

    /// Compute hashes for files up to `limit` bytes (0 = never).
    pub fn with_hash_limit(mut self, limit: u64) -> Self {
        self.hash_limit = limit;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_count(&self) -> usize {
        self.buckets.values().map(|b| b.len()).sum()
    }

    fn entry(&self, bucket: &str, name: &str) -> Option<&DirEntry> {
        self.buckets.get(bucket)?.get(name)
    }

    fn open(&self, path: &Path) -> io::Result<Arc<File>> {
        if let Some(f) = self.open_files.lock().unwrap().get(path) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(path)?);
        let mut cache = self.open_files.lock().unwrap();
        if cache.len() >= OPEN_FILE_CACHE {
            cache.clear();
        }
        cache.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }
}

fn scan(dir: &Path, rel: &str, out: &mut BTreeMap<String, DirEntry>) -> io::Result<()> {
    for ent in std::fs::read_dir(dir)? {
        let ent = ent?;
        let Some(fname) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let name = if rel.is_empty() {
            fname
        } else {
            format!("{rel}/{fname}")
        };
        let path = ent.path();
        // Follow symlinks.
        let md = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => continue,
        };
        if md.is_dir() {
            scan(&path, &name, out)?;
        } else if md.is_file() {
            let mtime = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            let micros = mtime.as_micros() as i64;
            let obj = SourceObject {
                content_type: content_type_for(&name),
                name: name.clone(),
                size: md.len(),
                generation: micros.max(1),
                updated_unix: mtime.as_secs() as i64,
            };
            out.insert(name, DirEntry { obj, path });
        }
    }
    Ok(())
}

impl ObjectSource for DirSource {
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
        self.entry(bucket, name).map(|e| e.obj.clone())
    }

    fn read_at(
        &self,
        bucket: &str,
        obj: &SourceObject,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let e = self
            .entry(bucket, &obj.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such object"))?;
        let f = self.open(&e.path)?;
        f.read_exact_at(buf, offset)
    }

    fn hashes(&self, bucket: &str, obj: &SourceObject) -> Option<(String, Option<String>)> {
        if obj.size > self.hash_limit {
            return None;
        }
        let key = (bucket.to_string(), obj.name.clone(), obj.generation);
        if let Some(h) = self.hash_cache.lock().unwrap().get(&key) {
            return Some(h.clone());
        }
        let e = self.entry(bucket, &obj.name)?;
        let f = self.open(&e.path).ok()?;
        let mut hasher = GcsHasher::new();
        let mut buf = vec![0u8; (obj.size as usize).clamp(1, 1 << 20)];
        let mut off = 0u64;
        while off < obj.size {
            let n = ((obj.size - off) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], off).ok()?;
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        let (c, m) = hasher.finish();
        let h = (c, Some(m));
        self.hash_cache.lock().unwrap().insert(key, h.clone());
        Some(h)
    }
}
