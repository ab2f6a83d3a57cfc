//! `physiofs warm` and `physiofs cache`: fill, inspect, empty and re-check a `--cache-dir`.
//!
//! Training runs read the same files every epoch, so fetching them once, ahead of time and
//! with many requests in flight, turns every epoch (the first included) into local-disk reads.
//! Warm resolves its flags through a mount's plan ([`MountPlan::resolve`] and
//! [`mount::prepare`]), so a warmed cache is keyed exactly as the mount that reads it.
//!
//! Two modes, one line says which: with no mount on the cache dir, warm takes the tier's lock
//! and writes the objects straight into it (each range checked against its CRC32C, the journal
//! record after the bytes, so a `kill -9` leaves nothing that verifies but is wrong). Next to a
//! running mount, which holds that lock, warm reads the files through the mount instead: the
//! mount fills its own cache, and a reader opening a file warm is fetching joins that fetch.
//! Objects already complete are skipped, so an interrupted warm resumes where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use sha2::Digest;

use crate::cache::Block;
use crate::cli::{CacheAction, CacheArgs, MountArgs, WarmArgs};
use crate::client::gcs::GcsClient;
use crate::client::{FULL_REQUEST, ListRequest, ObjectClient, list_all};
use crate::plan::{Env, MountPlan};
use crate::read::disk::{DiskCache, DiskConfig, filesystem_space, private_dir, summary_of};
use crate::read::object::Object;

const TIER: &str = "physiofs-cache-v1";

/// The mount's arguments for warm's flags (a placeholder mount point: warm mounts nothing):
/// the same bucket flags, warm's cache dir, and mount's defaults for the rest.
fn mount_args(a: &WarmArgs) -> MountArgs {
    let mut m = MountArgs::defaults(PathBuf::from("/"));
    m.source = a.source.clone();
    m.cache_dir = Some(a.cache_dir.clone());
    m.disk_cache_size = a.disk_cache_size;
    m.metadata_cache = Some("off".into());
    if let Some(r) = a.retries {
        m.retries = r;
    }
    m
}

/// The tier's lock file text, `pid N mounted at /path`: the mount point, when a mount holds it.
pub fn lock_holder_mountpoint(cache_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(cache_dir.join(TIER).join("lock")).ok()?;
    let at = text.find(" mounted at ")?;
    let mp = text[at + " mounted at ".len()..].trim();
    (!mp.is_empty()).then(|| PathBuf::from(mp))
}

/// The lines of a list: paths one a line, or the `path` column of a CSV (optionally gzip).
fn read_list(path: &Path) -> anyhow::Result<Vec<String>> {
    let f = std::fs::File::open(path).with_context(|| format!("--from-list {}", path.display()))?;
    let mut r: Box<dyn Read> = Box::new(std::io::BufReader::new(f));
    let mut magic = [0u8; 2];
    {
        let mut f = std::fs::File::open(path)?;
        let _ = f.read_exact(&mut magic);
    }
    if magic == [0x1f, 0x8b] {
        r = Box::new(flate2::read::MultiGzDecoder::new(r));
    }
    let mut lines = std::io::BufReader::new(r).lines();
    let mut out = Vec::new();
    let first = match lines.next() {
        Some(l) => l.with_context(|| format!("--from-list {}", path.display()))?,
        None => return Ok(out),
    };
    let header: Vec<&str> = first
        .split(',')
        .map(|c| c.trim().trim_matches('"'))
        .collect();
    let column = header.iter().position(|c| *c == "path");
    let csv = column.is_some() || path.to_string_lossy().contains(".csv");
    if csv && column.is_none() {
        bail!(
            "--from-list {}: a CSV needs a `path` column (its header is {first:?})",
            path.display()
        );
    }
    if column.is_none() {
        out.push(first);
    }
    for l in lines {
        let l = l.with_context(|| format!("--from-list {}", path.display()))?;
        match column {
            Some(c) => {
                if let Some(v) = l.split(',').nth(c) {
                    out.push(v.trim().trim_matches('"').to_string());
                }
            }
            None => out.push(l),
        }
    }
    out.retain(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    Ok(out.into_iter().map(|l| l.trim().to_string()).collect())
}

/// Mount points of FUSE filesystems, longest first.
fn fuse_mountpoints() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, mp, ty) = (f.next()?, f.next()?, f.next()?);
            ty.starts_with("fuse")
                .then(|| PathBuf::from(mp.replace("\\040", " ")))
        })
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    v
}

/// A name relative to the bucket prefix: an absolute path loses the mount point it is under.
fn relative_name(p: &str, mounts: &[PathBuf]) -> anyhow::Result<String> {
    if !p.starts_with('/') {
        return Ok(p.trim_start_matches("./").to_string());
    }
    let path = Path::new(p);
    for m in mounts {
        if let Ok(rest) = path.strip_prefix(m) {
            let mut s = rest.to_string_lossy().into_owned();
            if p.ends_with('/') && !s.is_empty() {
                s.push('/');
            }
            return Ok(s);
        }
    }
    bail!(
        "{p} is not under a physiofs mount point: give object names relative to the bucket prefix (files/p10/...)"
    )
}

/// Progress: a bar on a terminal, a plain line every 10 s otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
    files: AtomicU64,
    bytes: AtomicU64,
    /// Grow as names resolve (fetching starts before the last one has).
    total_files: AtomicU64,
    total_bytes: AtomicU64,
    start: Instant,
    plain: bool,
}

impl Progress {
    fn new(total_files: u64, total_bytes: u64) -> Arc<Progress> {
        use std::io::IsTerminal;
        let plain = !std::io::stderr().is_terminal();
        let bar = if plain {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(total_bytes);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        };
        let p = Arc::new(Progress {
            bar,
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            total_files: AtomicU64::new(total_files),
            total_bytes: AtomicU64::new(total_bytes),
            start: Instant::now(),
            plain,
        });
        p.update();
        p
    }

    /// One more object to fetch, of `bytes`.
    fn grow(&self, bytes: u64) {
        self.total_files.fetch_add(1, Ordering::Relaxed);
        self.total_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.bar.inc_length(bytes);
        self.update();
    }

    fn done(&self, bytes: u64) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.update();
    }

    fn update(&self) {
        let f = self.files.load(Ordering::Relaxed);
        self.bar.set_position(self.bytes.load(Ordering::Relaxed));
        self.bar.set_message(format!(
            "{f}/{} files",
            self.total_files.load(Ordering::Relaxed)
        ));
    }

    fn line(&self) -> String {
        let (f, b) = (
            self.files.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        );
        let total_bytes = self.total_bytes.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        let rate = b as f64 / secs;
        let eta = if rate > 0.0 {
            humantime::format_duration(Duration::from_secs(
                ((total_bytes.saturating_sub(b)) as f64 / rate) as u64,
            ))
            .to_string()
        } else {
            "?".into()
        };
        format!(
            "physiofs warm: {f}/{} files, {}/{}, {}/s, ETA {eta}",
            self.total_files.load(Ordering::Relaxed),
            bytesize::ByteSize::b(b),
            bytesize::ByteSize::b(total_bytes),
            bytesize::ByteSize::b(rate as u64)
        )
    }

    /// Prints a plain line every 10 s while `self` lives elsewhere (not on a terminal).
    fn ticker(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if !self.plain {
            return None;
        }
        let p = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                eprintln!("{}", p.line());
            }
        }))
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// What a warm did, for its summary.
#[derive(Default)]
struct Outcome {
    fetched: u64,
    skipped: u64,
    bytes: u64,
    /// Name and why.
    failed: Vec<(String, String)>,
    /// Name and sha256 of each warmed file (with --verify-sums).
    sums: HashMap<String, String>,
}

/// `physiofs warm`.
pub async fn run(args: WarmArgs) -> anyhow::Result<()> {
    let margs = mount_args(&args);
    let plan = MountPlan::resolve(&margs, &Env::capture())?;
    let jobs = args.jobs.max(1);
    let mounts = fuse_mountpoints();
    let mut names = Vec::new();
    if let Some(list) = &args.from_list {
        names.extend(read_list(list)?);
    }
    names.extend(args.paths.iter().cloned());
    if names.is_empty() {
        bail!("nothing to warm: give PATHs or --from-list FILE");
    }
    let names: Vec<String> = names
        .iter()
        .map(|n| relative_name(n, &mounts))
        .collect::<anyhow::Result<_>>()?;

    let dir = args.cache_dir.clone();
    private_dir(&dir, true).map_err(|e| anyhow::anyhow!("--cache-dir: {e}"))?;
    let (total, _) = filesystem_space(&dir)
        .map_err(|e| anyhow::anyhow!("--cache-dir {}: {e}", dir.display()))?;
    let d = plan.disk.as_ref().expect("warm always has a cache dir");
    let cfg = DiskConfig {
        dir: dir.clone(),
        capacity: d.size.resolve(total),
        block_size: plan.fs.block_size,
        namespace: format!("{} {}", plan.gcs.endpoint, plan.gcs.bucket),
        reserve: total / 20,
    };
    let opened =
        tokio::task::spawn_blocking(move || DiskCache::open(cfg, "warming (physiofs warm)"))
            .await?;
    let outcome = match opened {
        Ok(disk) => {
            eprintln!(
                "physiofs warm: writing straight into {} ({} in flight)",
                dir.display(),
                jobs
            );
            direct(&plan, Arc::new(disk), &names, jobs, args.verify_sums).await?
        }
        Err(e) => match lock_holder_mountpoint(&dir) {
            Some(mp) if format!("{e:#}").contains("in use") => {
                eprintln!(
                    "physiofs warm: {} is in use by the mount at {}: reading the files through it \
                     ({} at once), so it fills its own cache",
                    dir.display(),
                    mp.display(),
                    jobs
                );
                through_mount(&mp, &names, jobs, args.verify_sums).await?
            }
            _ => return Err(e),
        },
    };
    let mut mismatches = Vec::new();
    let (mut checked, mut unlisted) = (0, 0);
    if args.verify_sums {
        let manifest = read_manifest(&plan, &dir).await?;
        for (name, got) in &outcome.sums {
            match manifest.get(name) {
                Some(want) if want == got => checked += 1,
                Some(want) => {
                    checked += 1;
                    mismatches.push(format!("{name}: sha256 {got}, SHA256SUMS.txt says {want}"))
                }
                None => unlisted += 1,
            }
        }
        mismatches.sort();
    }
    eprintln!(
        "physiofs warm: {} fetched ({}), {} already cached, {} failed{}",
        outcome.fetched,
        bytesize::ByteSize::b(outcome.bytes),
        outcome.skipped,
        outcome.failed.len(),
        if args.verify_sums {
            format!(
                "; sha256: {checked} checked against SHA256SUMS.txt, {} mismatches, {unlisted} \
                 not listed there",
                mismatches.len()
            )
        } else {
            String::new()
        }
    );
    let mut problems = Vec::new();
    for (name, why) in &outcome.failed {
        problems.push(format!("failed: {name}: {why}"));
    }
    for m in &mismatches {
        problems.push(format!("mismatch: {m}"));
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("  {p}");
        }
        bail!(
            "{} of the objects failed and {} did not match SHA256SUMS.txt (listed above); run warm \
             again to retry: what is cached is skipped",
            outcome.failed.len(),
            mismatches.len()
        );
    }
    Ok(())
}

/// `SHA256SUMS.txt` of the bucket prefix: name (relative to the prefix) to hex digest. Read
/// through the mount when one holds the cache dir (so it costs no extra credentials), else
/// fetched.
async fn read_manifest(plan: &MountPlan, dir: &Path) -> anyhow::Result<HashMap<String, String>> {
    let text = match lock_holder_mountpoint(dir).filter(|mp| mp.join("SHA256SUMS.txt").exists()) {
        Some(mp) => std::fs::read_to_string(mp.join("SHA256SUMS.txt"))?,
        None => {
            let tokens = crate::mount::prepare(plan).await?;
            let client = GcsClient::new(plan.gcs.clone(), tokens)?;
            let name = format!("{}SHA256SUMS.txt", plan.fs.prefix);
            let meta = client
                .stat(&name)
                .await
                .with_context(|| format!("--verify-sums: gs://{}/{name}", plan.gcs.bucket))?;
            let obj = Object {
                name: meta.name.as_str().into(),
                generation: meta.generation,
                size: meta.size,
                crc32c: meta.crc32c,
            };
            let b = client.get_range(obj.version(), 0, obj.size).await?;
            String::from_utf8_lossy(&b).into_owned()
        }
    };
    Ok(text
        .lines()
        .filter_map(|l| {
            let (h, n) = l.split_once(char::is_whitespace)?;
            Some((
                n.trim().trim_start_matches('*').to_string(),
                h.to_lowercase(),
            ))
        })
        .collect())
}

/// Straight into the cache dir: stat (or list) each name and fetch the missing objects whole
/// in ranges of at most [`FULL_REQUEST`], each written (and its journal record) before it is
/// counted.
async fn direct(
    plan: &MountPlan,
    disk: Arc<DiskCache>,
    names: &[String],
    jobs: usize,
    verify_sums: bool,
) -> anyhow::Result<Outcome> {
    let tokens = crate::mount::prepare(plan).await?;
    eprintln!("physiofs warm: credentials: {}", tokens.credentials());
    let client: Arc<dyn ObjectClient> = Arc::new(GcsClient::new(plan.gcs.clone(), tokens)?);
    let prefix = plan.fs.prefix.clone();
    let mut out = Outcome::default();

    // Names resolve to object versions (files by stat, sub-trees by one flat listing) and the
    // missing ones are fetched in one pipeline, each stage with `jobs` requests in flight, so
    // fetching starts with the first resolved name instead of after the last (with a stat per
    // file, two phases took twice the time of the fetches alone).
    let bs = plan.fs.block_size;
    let progress = Progress::new(0, 0);
    let ticker = progress.ticker();
    let (tx, rx) = tokio::sync::mpsc::channel::<(String, Object)>(jobs * 4);
    let resolver = {
        let (client, prefix, disk, progress) = (
            client.clone(),
            prefix.clone(),
            disk.clone(),
            progress.clone(),
        );
        async move {
            let mut objects: BTreeMap<String, Object> = BTreeMap::new();
            let (mut failed, mut skipped) = (Vec::new(), 0u64);
            let mut resolved = futures::stream::iter(names.iter().cloned())
                .map(|n| {
                    let (client, prefix) = (client.clone(), prefix.clone());
                    async move {
                        let r = resolve(&*client, &prefix, &n).await;
                        (n, r)
                    }
                })
                .buffer_unordered(jobs);
            while let Some((n, r)) = resolved.next().await {
                let objs = match r {
                    Ok(objs) => objs,
                    Err(e) => {
                        failed.push((n, e));
                        continue;
                    }
                };
                for o in objs {
                    let rel = o.name[prefix.len()..].to_string();
                    if objects.insert(rel.clone(), o.clone()).is_some() {
                        continue; // named twice
                    }
                    if disk.is_complete(&o) {
                        skipped += 1;
                    } else {
                        progress.grow(o.size);
                        let _ = tx.send((rel, o)).await;
                    }
                }
            }
            (objects, failed, skipped)
        }
    };
    let queue = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let fetches = queue
        .map(|(rel, o)| {
            let (client, disk, progress) = (client.clone(), disk.clone(), progress.clone());
            async move {
                let r = fetch_into(&*client, &disk, &o, bs).await;
                if let Ok(n) = &r {
                    progress.done(*n);
                }
                (rel, r)
            }
        })
        .buffer_unordered(jobs)
        .collect::<Vec<_>>();
    let ((objects, failed, skipped), results) = tokio::join!(resolver, fetches);
    out.failed = failed;
    out.skipped = skipped;
    if let Some(t) = ticker {
        t.abort();
    }
    progress.finish();
    for (rel, r) in results {
        match r {
            Ok(n) => {
                out.fetched += 1;
                out.bytes += n;
            }
            Err(e) => out.failed.push((rel, e)),
        }
    }
    if verify_sums {
        let failed: std::collections::HashSet<String> =
            out.failed.iter().map(|(n, _)| n.clone()).collect();
        for (rel, o) in &objects {
            if failed.contains(rel) {
                continue;
            }
            let (disk, o2) = (disk.clone(), o.clone());
            let sum = tokio::task::spawn_blocking(move || stored_sha256(&disk, &o2, bs)).await?;
            match sum {
                Some(s) => {
                    out.sums.insert(rel.clone(), s);
                }
                None => out.failed.push((
                    rel.clone(),
                    "not complete in the cache after warming".into(),
                )),
            }
        }
    }
    out.failed.sort();
    Ok(out)
}

/// The object versions a name stands for: a sub-tree (`files/p10/`, or a name with no object
/// of its own but objects under it) lists flat; anything else is one object.
async fn resolve(
    client: &dyn ObjectClient,
    prefix: &str,
    rel: &str,
) -> Result<Vec<Object>, String> {
    let full = format!("{prefix}{}", rel.trim_start_matches('/'));
    let list = |p: String| async move {
        let req = ListRequest {
            prefix: p,
            ..ListRequest::default()
        };
        list_all(client, &req).await.map(|page| {
            page.items
                .into_iter()
                .filter(|m| !m.name.ends_with('/'))
                .map(|m| Object {
                    name: m.name.as_str().into(),
                    generation: m.generation,
                    size: m.size,
                    crc32c: m.crc32c,
                })
                .collect::<Vec<_>>()
        })
    };
    if full.is_empty() || full.ends_with('/') {
        return match list(full.clone()).await {
            Ok(v) if !v.is_empty() => Ok(v),
            Ok(_) => Err(format!("no objects under gs://{}/{full}", client.bucket())),
            Err(e) => Err(e.to_string()),
        };
    }
    match client.stat(&full).await {
        Ok(m) => Ok(vec![Object {
            name: m.name.as_str().into(),
            generation: m.generation,
            size: m.size,
            crc32c: m.crc32c,
        }]),
        Err(e) => match list(format!("{full}/")).await {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(format!("gs://{}/{full}: {e}", client.bucket())),
        },
    }
}

/// Fetches `obj` whole into the tier; returns its size once it is complete there.
async fn fetch_into(
    client: &dyn ObjectClient,
    disk: &Arc<DiskCache>,
    obj: &Object,
    bs: u64,
) -> Result<u64, String> {
    // Whole objects up to FULL_REQUEST in one request (checked against their CRC32C), larger
    // ones in block-aligned ranges.
    let step = (FULL_REQUEST / bs).max(1) * bs;
    let mut start = 0;
    while start < obj.size {
        let end = (start + step).min(obj.size);
        let (span, crcs) = client
            .get_range_blocks(obj.version(), start, end, bs)
            .await
            .map_err(|e| e.to_string())?;
        let blocks: Vec<Block> = (start..end)
            .step_by(bs as usize)
            .zip(crcs)
            .map(|(s, crc)| {
                let from = (s - start) as usize;
                Block::with_crc32c(span.clone(), from, ((end - s).min(bs)) as usize, crc)
            })
            .collect();
        if span.len() as u64 != end - start || blocks.len() as u64 != (end - start).div_ceil(bs) {
            return Err(format!(
                "asked for bytes {start}..{end}, got {} bytes in {} pieces",
                span.len(),
                blocks.len()
            ));
        }
        let (disk, o) = (disk.clone(), obj.clone());
        let first = start / bs;
        tokio::task::spawn_blocking(move || disk.write_now(&o, first, &blocks))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing to the cache: {e:#}"))?;
        start = end;
    }
    if !disk.is_complete(obj) {
        return Err(
            "fetched but not kept: the disk cache is at its bound (--disk-cache-size) or its \
             filesystem is nearly full"
                .into(),
        );
    }
    Ok(obj.size)
}

/// The sha256 of a complete stored object, read back block by block (each CRC-checked).
fn stored_sha256(disk: &DiskCache, obj: &Object, bs: u64) -> Option<String> {
    let mut h = sha2::Sha256::new();
    for i in 0..obj.size.div_ceil(bs) {
        h.update(disk.get(obj, i)?.as_slice());
    }
    Some(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Through a running mount: each file read whole by `jobs` threads (the mount fetches and
/// caches it; concurrent readers of the same file share that fetch).
async fn through_mount(
    mp: &Path,
    names: &[String],
    jobs: usize,
    verify_sums: bool,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let mut files: Vec<(String, u64)> = Vec::new();
    for n in names {
        let p = mp.join(n.trim_start_matches('/'));
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => walk(mp, &p, &mut files),
            Ok(m) => files.push((n.trim_start_matches('/').to_string(), m.len())),
            Err(e) => out
                .failed
                .push((n.clone(), format!("{}: {e}", p.display()))),
        }
    }
    files.sort();
    files.dedup();
    let total = files.iter().map(|(_, s)| s).sum();
    let progress = Progress::new(files.len() as u64, total);
    let ticker = progress.ticker();
    let queue = Arc::new(std::sync::Mutex::new(files));
    let mp = mp.to_path_buf();
    let handles: Vec<_> = (0..jobs)
        .map(|_| {
            let (queue, progress, mp) = (queue.clone(), progress.clone(), mp.clone());
            tokio::task::spawn_blocking(move || {
                let mut mine = Vec::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let Some((rel, _)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let r = read_whole(&mp.join(&rel), &mut buf, verify_sums);
                    if let Ok((n, _)) = &r {
                        progress.done(*n);
                    }
                    mine.push((rel, r));
                }
                mine
            })
        })
        .collect();
    for h in handles {
        for (rel, r) in h.await? {
            match r {
                Ok((n, sum)) => {
                    out.fetched += 1;
                    out.bytes += n;
                    if let Some(s) = sum {
                        out.sums.insert(rel, s);
                    }
                }
                Err(e) => out.failed.push((rel, e)),
            }
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    progress.finish();
    out.failed.sort();
    Ok(out)
}

fn walk(mp: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.metadata() {
            Ok(m) if m.is_dir() => walk(mp, &p, out),
            Ok(m) => {
                if let Ok(rel) = p.strip_prefix(mp) {
                    out.push((rel.to_string_lossy().into_owned(), m.len()));
                }
            }
            Err(_) => {}
        }
    }
}

fn read_whole(p: &Path, buf: &mut [u8], sum: bool) -> Result<(u64, Option<String>), String> {
    let mut f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut h = sum.then(sha2::Sha256::new);
    let mut n = 0u64;
    loop {
        let k = f.read(buf).map_err(|e| format!("{}: {e}", p.display()))?;
        if k == 0 {
            break;
        }
        if let Some(h) = &mut h {
            h.update(&buf[..k]);
        }
        n += k as u64;
    }
    Ok((n, h.map(|h| hex(&h.finalize()))))
}

/// The block size the tier is indexed with: the mount's.
fn block_size() -> u64 {
    crate::fs::FsConfig::default().block_size
}

/// Opens the tier to work on it: refused (naming the holder) while a mount or warm has it.
fn open_exclusive(dir: &Path) -> anyhow::Result<DiskCache> {
    if !dir.join(TIER).join("journal").exists() {
        bail!(
            "{} holds no physiofs cache (no {TIER}/journal): is it the --cache-dir of a mount?",
            dir.display()
        );
    }
    open_exclusive_new(dir)
}

fn open_exclusive_new(dir: &Path) -> anyhow::Result<DiskCache> {
    DiskCache::open(
        DiskConfig {
            dir: dir.to_path_buf(),
            capacity: u64::MAX,
            block_size: block_size(),
            namespace: String::new(),
            reserve: 0,
        },
        "running `physiofs cache`",
    )
}

/// `physiofs cache stats|clear|verify`.
pub async fn cache_command(a: CacheArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || match a.action {
        CacheAction::Stats(d) => {
            let s = summary_of(&d.cache_dir, block_size())
                .with_context(|| format!("{} holds no physiofs cache", d.cache_dir.display()))?;
            println!("cache dir: {}", d.cache_dir.display());
            println!("objects: {}", s.objects);
            println!("complete objects: {}", s.complete);
            println!("bytes: {} ({})", s.bytes, bytesize::ByteSize::b(s.bytes));
            println!("journal bytes: {}", s.journal_bytes);
            if let Some(mp) = lock_holder_mountpoint(&d.cache_dir)
                && fuse_mountpoints().contains(&mp)
            {
                println!("in use by the mount at {}", mp.display());
            }
            Ok(())
        }
        CacheAction::Clear(d) => {
            let disk = open_exclusive(&d.cache_dir)?;
            let s = disk.summary();
            let root = d.cache_dir.join(TIER);
            // Hold the lock while deleting: nothing else can open the tier meanwhile.
            std::fs::remove_dir_all(root.join("objects"))
                .with_context(|| format!("clearing {}", root.display()))?;
            std::fs::remove_file(root.join("journal"))
                .with_context(|| format!("clearing {}", root.display()))?;
            drop(disk);
            // A fresh, empty tier in its place.
            drop(open_exclusive_new(&d.cache_dir)?);
            println!(
                "cleared {}: {} objects, {}",
                d.cache_dir.display(),
                s.objects,
                bytesize::ByteSize::b(s.bytes)
            );
            Ok(())
        }
        CacheAction::Verify(d) => {
            let disk = open_exclusive(&d.cache_dir)?;
            let (checked, dropped) = disk.verify_all();
            println!("verified {checked} object versions: {dropped} dropped");
            if dropped > 0 {
                bail!(
                    "{dropped} of {checked} stored object versions had a block that did not match \
                     its CRC32C: dropped (a mount fetches them again)"
                );
            }
            Ok(())
        }
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_lines_or_the_path_column_of_a_csv_gz() {
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("list.txt");
        std::fs::write(&plain, "files/a.dcm\n\n# note\nfiles/b.dcm\n").unwrap();
        assert_eq!(read_list(&plain).unwrap(), ["files/a.dcm", "files/b.dcm"]);
        let gz = d.path().join("l.csv.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(
            &mut e,
            b"subject_id,path\n1,files/p10/x.dcm\n2,files/p11/y.dcm\n",
        )
        .unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        assert_eq!(
            read_list(&gz).unwrap(),
            ["files/p10/x.dcm", "files/p11/y.dcm"]
        );
        let bad = d.path().join("bad.csv");
        std::fs::write(&bad, "a,b\n1,2\n").unwrap();
        assert!(format!("{:#}", read_list(&bad).unwrap_err()).contains("path"));
    }

    #[test]
    fn mount_point_paths_become_names_and_the_lock_file_names_the_mount_point() {
        let m = vec![PathBuf::from("/mnt/cxr/sub"), PathBuf::from("/mnt/cxr")];
        assert_eq!(
            relative_name("/mnt/cxr/files/p10/", &m).unwrap(),
            "files/p10/"
        );
        assert_eq!(relative_name("files/x.dcm", &m).unwrap(), "files/x.dcm");
        assert!(relative_name("/etc/passwd", &m).is_err());
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join(TIER);
        std::fs::create_dir_all(&lock).unwrap();
        std::fs::write(lock.join("lock"), "pid 7 mounted at /mnt/x y\n").unwrap();
        assert_eq!(
            lock_holder_mountpoint(d.path()),
            Some(PathBuf::from("/mnt/x y"))
        );
        std::fs::write(lock.join("lock"), "pid 7 warming (physiofs warm)\n").unwrap();
        assert_eq!(lock_holder_mountpoint(d.path()), None);
    }
}
