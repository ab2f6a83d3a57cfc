//! Parsers of the values people type: sizes, octal modes, fractions, bucket URLs, prefixes,
//! emulator addresses, paths.
//!
//! One place, imported by the argument declarations (`cli`), the plan that resolves them and
//! the testbed alike, so a size means the same thing everywhere and this module depends on
//! nothing of the crate (nothing here can close an import cycle).

/// Parses `1048576`, `64MiB`, `2GiB`, `1.5GB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size (try 512MiB or 2GiB): {e}"))
}

/// A size given as bytes or as a share of a filesystem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SizeOrShare {
    Bytes(u64),
    /// Percent of the filesystem's size, in (0, 100].
    Percent(f64),
}

impl SizeOrShare {
    /// Bytes, given the size of the filesystem it is a share of.
    pub fn resolve(self, filesystem: u64) -> u64 {
        match self {
            SizeOrShare::Bytes(b) => b,
            SizeOrShare::Percent(p) => (filesystem as f64 * p / 100.0) as u64,
        }
    }
}

/// Parses `200GiB`, `1000000` or `80%`.
pub fn parse_size_or_share(s: &str) -> Result<SizeOrShare, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 100.0 => Ok(SizeOrShare::Percent(v)),
            _ => Err(format!("{s:?} is not a share of the disk (try 50%)")),
        };
    }
    parse_size(t).map(SizeOrShare::Bytes)
}

/// Parses an octal mode like `0444` or `755`.
pub fn parse_mode(s: &str) -> Result<u16, String> {
    let t = s.trim().trim_start_matches("0o");
    match u16::from_str_radix(t, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        // Files of a remote bucket have no use for them, and a setuid or setgid file shown by
        // a root mount is one more thing for a local user to aim at.
        Ok(m) if m <= 0o7777 => Err(format!(
            "{s:?} sets setuid, setgid or sticky bits (04000/02000/01000), which physiofs \
             refuses; give permission bits only, like {:04o}",
            m & 0o777
        )),
        _ => Err(format!("{s:?} is not an octal mode like 0444")),
    }
}

/// Parses a fraction within 0..=1, e.g. `0.05`.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not within 0..=1"))
    }
}

/// Splits `gs://NAME/PREFIX` (or `NAME`) into bucket and optional prefix.
pub fn parse_bucket(s: &str) -> (String, Option<String>) {
    let t = s.strip_prefix("gs://").unwrap_or(s);
    match t.split_once('/') {
        Some((b, p)) if !p.is_empty() => (b.to_string(), Some(p.to_string())),
        Some((b, _)) => (b.to_string(), None),
        None => (t.to_string(), None),
    }
}

/// Normalizes a prefix to `` or `a/b/`.
pub fn normalize_prefix(p: Option<&str>) -> String {
    let t = p.unwrap_or("").trim_matches('/');
    if t.is_empty() {
        String::new()
    } else {
        format!("{t}/")
    }
}

/// A path as given, made absolute against the current directory: what every path argument
/// becomes when the command line is parsed, so that it still names the same file once
/// `--background` has moved the process to `/`. Only the current directory is prepended
/// ([`std::path::absolute`]): nothing is read, no symlink is resolved and `..` stays, so what
/// the path finally names is decided where it always was (the mount point is pinned by
/// `session`, the log file opened with `O_NOFOLLOW`, ...). Empty is refused.
pub fn absolute_path(path: &std::ffi::OsStr) -> Result<std::path::PathBuf, String> {
    if path.is_empty() {
        return Err("an empty path names no file".into());
    }
    std::path::absolute(path).map_err(|e| format!("cannot make {path:?} absolute: {e}"))
}

/// A directory or a word that turns it off (`off`, `none`, kept as they are): the directory
/// made absolute like [`absolute_path`].
pub fn parse_dir_or_off(s: &str) -> Result<String, String> {
    if matches!(s, "off" | "none") {
        return Ok(s.to_string());
    }
    Ok(absolute_path(s.as_ref())?.to_string_lossy().into_owned())
}

/// Turns `STORAGE_EMULATOR_HOST` (`host:port` or a URL) into a service root URL.
pub fn emulator_endpoint(v: &str) -> String {
    let v = v.trim().trim_end_matches('/');
    if v.starts_with("http://") || v.starts_with("https://") {
        v.to_string()
    } else {
        format!("http://{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn sizes_modes_buckets() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_mode("0444").unwrap(), 0o444);
        assert!(parse_mode("999").is_err());
        let e = parse_mode("4755").unwrap_err();
        assert!(e.contains("setuid") && e.contains("0755"), "{e}");
        assert!(parse_mode("1777").is_err());
        assert_eq!(parse_rate("0.25").unwrap(), 0.25);
        assert!(parse_rate("1.5").is_err());
        assert!(parse_rate("often").is_err());
        assert_eq!(
            parse_bucket("gs://b/files/p10"),
            ("b".into(), Some("files/p10".into()))
        );
        assert_eq!(parse_bucket("gs://b/"), ("b".into(), None));
        assert_eq!(parse_bucket("b"), ("b".into(), None));
        assert_eq!(normalize_prefix(Some("/files/p10/")), "files/p10/");
        assert_eq!(normalize_prefix(None), "");
        assert_eq!(emulator_endpoint("localhost:4443"), "http://localhost:4443");
        assert_eq!(emulator_endpoint("https://x:1/"), "https://x:1");
    }

    #[test]
    fn paths_are_made_absolute_without_being_resolved() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_path("ca.pem".as_ref()).unwrap(),
            cwd.join("ca.pem")
        );
        // `..` and whatever symlinks the path crosses are left for the kernel to resolve.
        assert_eq!(
            absolute_path("../x/./y".as_ref()).unwrap(),
            cwd.join("../x/y")
        );
        assert_eq!(
            absolute_path("/etc/x".as_ref()).unwrap(),
            Path::new("/etc/x")
        );
        assert!(absolute_path("".as_ref()).is_err());
        assert_eq!(parse_dir_or_off("off").unwrap(), "off");
        assert_eq!(parse_dir_or_off("none").unwrap(), "none");
        assert_eq!(
            parse_dir_or_off("snap").unwrap(),
            cwd.join("snap").to_string_lossy()
        );
    }
}
