//! A persisted copy of the inode table, so a remount is ready without listing again.
//!
//! The file is keyed by (endpoint, bucket, prefix) and holds every name with its size,
//! generation and mtime, gzip-compressed, with a CRC32C over the records. A snapshot that is
//! truncated, corrupt, for another bucket, or older than the allowed age is refused (and
//! rebuilt by a fresh listing), never trusted. If a read finds an object's generation gone,
//! the snapshot is deleted so the next mount lists afresh.
//!
//! Layout: `PHYSIOFS-SNAPSHOT 2\n`, then a gzip stream of: one JSON header line, then records
//! `kind:u8 (0 dir, 1 file, 2 file with crc32c) | name_len:u32 | name |
//! [size:u64 generation:i64 secs:i64 nanos:u32 [crc32c:u32]]`,
//! then `0xFF | count:u64 | crc32c:u32` over all record bytes. Integers little-endian.
//!
//! The CRC catches damage, not forgery, so who could have written the file is checked
//! instead: a snapshot is only read from, and written in, a directory owned by the user
//! physiofs runs as (0700 when created here) whose ancestors no other user can rename, and
//! only if the file itself is owned by that user and writable by no one else. Files are
//! opened without following symlinks, and the temporary file is created exclusively under a
//! random name, so a root mount never writes through a link another user planted.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::inode::{FileInfo, InodeTable};

const MAGIC: &[u8] = b"PHYSIOFS-SNAPSHOT 2\n";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotKey {
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    key: SnapshotKey,
    created_unix: u64,
    entries: u64,
}

/// The default snapshot directory: `$XDG_CACHE_HOME/physiofs` or `~/.cache/physiofs`; for
/// root, `/var/cache/physiofs` unless that base directory is root's own (under `sudo -E` or
/// in a notebook image `HOME` may be a user's, and root must not write there).
pub fn default_dir() -> Option<PathBuf> {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    // The directory, or (not made yet) its nearest existing ancestor, is root's.
    let owned_by_root = |p: &Path| {
        p.ancestors()
            .find_map(|a| std::fs::symlink_metadata(a).ok())
            .is_some_and(|m| m.uid() == 0)
    };
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|x| !x.is_empty())
        .map(|x| (PathBuf::from(&x), PathBuf::from(x).join("physiofs")))
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| (PathBuf::from(&h), PathBuf::from(h).join(".cache/physiofs")))
        });
    match base {
        Some((b, dir)) if !root || owned_by_root(&b) => Some(dir),
        _ => root.then(|| PathBuf::from("/var/cache/physiofs")),
    }
}

/// Why a directory is not safe for state: owned by another user, or it or an ancestor
/// writable by others (who could swap in a symlink). None when it is fine.
pub fn unsafe_dir(dir: &Path) -> Option<String> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    };
    if !m.file_type().is_dir() {
        return Some(format!("{} is not a directory (a symlink?)", dir.display()));
    }
    if m.uid() != me {
        return Some(format!(
            "{} is owned by uid {}, not by uid {me} that physiofs runs as",
            dir.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Some(format!(
            "{} is writable by group or others (mode {:o})",
            dir.display(),
            m.mode() & 0o7777
        ));
    }
    // Ancestors: owned by root or us, and not open to others unless sticky (like /tmp, where
    // others cannot rename what is not theirs).
    let canon = std::fs::canonicalize(dir).ok()?;
    for a in canon.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(a) else {
            continue;
        };
        let foreign = m.uid() != 0 && m.uid() != me;
        let open = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if foreign || open {
            return Some(format!(
                "{} (above it) is owned by uid {} with mode {:o}, so another user can replace it",
                a.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    None
}

fn refused_dir(why: String) -> String {
    format!(
        "{why}; give --metadata-cache a directory only this user can write (created 0700 if \
         missing; /var/cache/physiofs for root), or --metadata-cache off"
    )
}

/// The snapshot file for `key` inside `dir`.
pub fn path_for(dir: &Path, key: &SnapshotKey) -> PathBuf {
    let h = sha2::Sha256::digest(format!("{}\n{}\n{}", key.endpoint, key.bucket, key.prefix));
    let hex: String = h[..10].iter().map(|b| format!("{b:02x}")).collect();
    let safe: String = key
        .bucket
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}-{hex}.snapshot"))
}

fn put_record(buf: &mut Vec<u8>, name: &str, file: Option<&FileInfo>) {
    buf.push(match file {
        None => 0,
        Some(f) if f.crc32c.is_none() => 1,
        Some(_) => 2,
    });
    buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
    buf.extend_from_slice(name.as_bytes());
    if let Some(f) = file {
        let d = f.mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
        buf.extend_from_slice(&f.size.to_le_bytes());
        buf.extend_from_slice(&f.generation.to_le_bytes());
        buf.extend_from_slice(&(d.as_secs() as i64).to_le_bytes());
        buf.extend_from_slice(&d.subsec_nanos().to_le_bytes());
        if let Some(c) = f.crc32c {
            buf.extend_from_slice(&c.to_le_bytes());
        }
    }
}

/// Writes the table atomically (temp file + rename). Returns the entry count.
pub fn save(path: &Path, key: &SnapshotKey, table: &InodeTable) -> std::io::Result<u64> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if let Some(why) = unsafe_dir(dir) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            refused_dir(why),
        ));
    }
    let tmp = path.with_extension(format!(
        "tmp{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let result = (|| {
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC)?;
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
        let header = Header {
            key: key.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            // Written before the records are walked; the trailer holds the real count.
            entries: 0,
        };
        serde_json::to_writer(&mut gz, &header)?;
        gz.write_all(b"\n")?;
        let mut crc = 0u32;
        let mut count = 0u64;
        let mut buf = Vec::with_capacity(1 << 16);
        table.for_each_entry(&mut |name, file| {
            put_record(&mut buf, name, file);
            count += 1;
            if buf.len() >= 1 << 16 {
                crc = crate::crc::append(crc, &buf);
                gz.write_all(&buf)?;
                buf.clear();
            }
            Ok(())
        })?;
        crc = crate::crc::append(crc, &buf);
        gz.write_all(&buf)?;
        gz.write_all(&[0xFF])?;
        gz.write_all(&count.to_le_bytes())?;
        gz.write_all(&crc.to_le_bytes())?;
        let out = gz.finish()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(count)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no snapshot")]
    Missing,
    #[error("snapshot is for another bucket or endpoint")]
    OtherKey,
    #[error("snapshot is older than {0:?}")]
    TooOld(Duration),
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    /// Another user could have written it: not read, and left where it is.
    #[error("snapshot not trusted: {0}")]
    Untrusted(String),
}

fn corrupt(e: impl std::fmt::Display) -> LoadError {
    LoadError::Corrupt(e.to_string())
}

/// Reads a snapshot into `table` (which must be empty). On any error the table may hold part
/// of the snapshot: callers build a fresh table instead of using it.
pub fn load(
    path: &Path,
    key: &SnapshotKey,
    max_age: Option<Duration>,
    table: &InodeTable,
) -> Result<u64, LoadError> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LoadError::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(LoadError::Untrusted(format!(
                "{} is a symlink; remove it",
                path.display()
            )));
        }
        Err(e) => return Err(corrupt(e)),
    };
    if let Some(why) = unsafe_dir(path.parent().unwrap_or(Path::new("."))) {
        return Err(LoadError::Untrusted(refused_dir(why)));
    }
    let m = f.metadata().map_err(corrupt)?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(LoadError::Untrusted(format!(
            "{} is owned by uid {} with mode {:o}, and only a file of uid {me} that no one \
             else can write is read; remove it (the next mount writes a fresh one)",
            path.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    let mut r = BufReader::new(f);
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(corrupt)?;
    if magic != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let mut gz = BufReader::new(flate2::read::GzDecoder::new(r));
    let mut line = String::new();
    gz.read_line(&mut line).map_err(corrupt)?;
    let header: Header = serde_json::from_str(&line).map_err(corrupt)?;
    if header.key != *key {
        return Err(LoadError::OtherKey);
    }
    if let Some(max) = max_age {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now.saturating_sub(header.created_unix) > max.as_secs() {
            return Err(LoadError::TooOld(max));
        }
    }
    let mut crc = 0u32;
    let records_crc;
    let mut count = 0u64;
    let mut read = |n: usize, crc: &mut u32| -> Result<Vec<u8>, LoadError> {
        let mut b = vec![0u8; n];
        gz.read_exact(&mut b)
            .map_err(|e| corrupt(format!("truncated: {e}")))?;
        *crc = crate::crc::append(*crc, &b);
        Ok(b)
    };
    loop {
        let before = crc;
        let kind = read(1, &mut crc)?[0];
        if kind == 0xFF {
            records_crc = before;
            break;
        }
        if kind > 2 {
            return Err(corrupt(format!("bad record kind {kind}")));
        }
        let len = u32::from_le_bytes(read(4, &mut crc)?.try_into().unwrap()) as usize;
        if len == 0 || len > 64 * 1024 {
            return Err(corrupt(format!("bad name length {len}")));
        }
        let name = String::from_utf8(read(len, &mut crc)?).map_err(corrupt)?;
        if kind >= 1 {
            let b = read(if kind == 2 { 32 } else { 28 }, &mut crc)?;
            let size = u64::from_le_bytes(b[0..8].try_into().unwrap());
            let generation = i64::from_le_bytes(b[8..16].try_into().unwrap());
            let secs = i64::from_le_bytes(b[16..24].try_into().unwrap());
            let nanos = u32::from_le_bytes(b[24..28].try_into().unwrap());
            if nanos >= 1_000_000_000 || secs < 0 {
                return Err(corrupt("bad mtime"));
            }
            let mtime = UNIX_EPOCH + Duration::new(secs as u64, nanos);
            let crc32c = (kind == 2).then(|| u32::from_le_bytes(b[28..32].try_into().unwrap()));
            table
                .insert_object(
                    &name,
                    FileInfo {
                        size,
                        mtime,
                        generation,
                        crc32c,
                    },
                )
                .map_err(|e| corrupt(format!("{name:?}: {e}")))?;
        } else {
            table
                .insert_dir(&name)
                .map_err(|e| corrupt(format!("{name:?}: {e}")))?;
        }
        count += 1;
    }
    let mut tail = [0u8; 12];
    gz.read_exact(&mut tail)
        .map_err(|e| corrupt(format!("truncated trailer: {e}")))?;
    let want_count = u64::from_le_bytes(tail[0..8].try_into().unwrap());
    let want_crc = u32::from_le_bytes(tail[8..12].try_into().unwrap());
    if want_count != count {
        return Err(corrupt(format!(
            "{count} records, trailer says {want_count}"
        )));
    }
    if want_crc != records_crc {
        return Err(corrupt("checksum mismatch"));
    }
    let mut rest = Vec::new();
    gz.read_to_end(&mut rest).map_err(corrupt)?;
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SnapshotKey {
        SnapshotKey {
            endpoint: "http://x".into(),
            bucket: "b".into(),
            prefix: "".into(),
        }
    }

    fn table() -> InodeTable {
        let t = InodeTable::new(None);
        for i in 0..500 {
            t.insert_object(
                &format!("files/p1{}/p{i:08}/s5{i:07}.txt", i % 10),
                FileInfo {
                    size: i,
                    mtime: UNIX_EPOCH + Duration::new(1_500_000_000 + i, 123),
                    generation: 1000 + i as i64,
                    crc32c: (i % 3 != 0).then_some(i as u32 * 7919),
                },
            )
            .unwrap();
        }
        t.insert_dir("empty/").unwrap();
        t
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_for(dir.path(), &key());
        let t = table();
        let n = save(&p, &key(), &t).unwrap();
        let t2 = InodeTable::new(None);
        assert_eq!(load(&p, &key(), None, &t2).unwrap(), n);
        assert_eq!(t.export(), t2.export());
    }

    #[test]
    fn refuses_bad_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_for(dir.path(), &key());
        assert!(matches!(
            load(&p, &key(), None, &InodeTable::new(None)),
            Err(LoadError::Missing)
        ));
        save(&p, &key(), &table()).unwrap();
        let other = SnapshotKey {
            bucket: "c".into(),
            ..key()
        };
        assert!(matches!(
            load(&p, &other, None, &InodeTable::new(None)),
            Err(LoadError::OtherKey)
        ));
        let bytes = std::fs::read(&p).unwrap();
        // Truncated anywhere: refused.
        for cut in [10, MAGIC.len() + 5, bytes.len() / 2, bytes.len() - 3] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(
                load(&p, &key(), None, &InodeTable::new(None)).is_err(),
                "cut at {cut}"
            );
        }
        // Any flipped bit in the compressed body: refused (gzip's own CRC or ours).
        for pos in [MAGIC.len() + 40, bytes.len() / 2, bytes.len() - 20] {
            let mut b = bytes.clone();
            b[pos] ^= 0x10;
            std::fs::write(&p, &b).unwrap();
            assert!(
                load(&p, &key(), None, &InodeTable::new(None)).is_err(),
                "flip at {pos}"
            );
        }
    }
}
