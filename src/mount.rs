//! From a resolved plan (`plan`) to a live mount: the start-up checks in order (`checks`), the
//! credentials, a probe that proves access, the kernel session, and a clean unmount on
//! SIGINT/SIGTERM or an external `umount`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;

use crate::cache::MemoryCache;
use crate::checks;
use crate::cli::{MetadataMode, MountArgs};
use crate::client::auth::TokenSource;
use crate::client::gcs::{GcsClient, RetryConfig};
use crate::client::{ClientError, ListRequest, ObjectClient};
use crate::daemon::Notify;
use crate::fs::Fs;
use crate::fuse::FuseAdapter;
use crate::plan::{Env, MountPlan};

/// The checks that need no mount point: FUSE on this machine, the plan's (bucket, endpoint),
/// then the credentials, whose token provider it returns. Stops at the first failure, with
/// its error.
pub async fn prepare(plan: &MountPlan) -> anyhow::Result<TokenSource> {
    let uid = Env::capture().uid;
    checks::first_failure(checks::fuse(plan.allow_other, uid))?;
    checks::first_failure(checks::plan(plan))?;
    let mut tokens = TokenSource::build(&plan.credentials).await;
    checks::first_failure([checks::credentials(&tokens)])?;
    if let Ok(t) = &mut tokens {
        t.identify().await;
    }
    Ok(tokens?)
}

/// The failed access check's error: the probe's error explained.
fn access_error(plan: &MountPlan, e: &ClientError) -> anyhow::Error {
    checks::access(&plan.gcs, &plan.fs.prefix, Err(e))
        .error()
        .unwrap_or_else(|| anyhow::anyhow!("{e}"))
}

/// A running mount.
pub struct Mounted {
    pub mountpoint: PathBuf,
    pub fs: Arc<Fs>,
    pub client: Arc<GcsClient>,
    unmounter: crate::session::KernelMount,
    done: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    /// Registered before mounting, so a signal that arrives as soon as the mount shows is
    /// handled (not fatal).
    signals: Signals,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mounted {
    /// Checks the mount point, proves access with one small listing (or one object's
    /// metadata, with a snapshot), then mounts: `tokens` are from [`prepare`], which runs
    /// the checks before these. Stops at the first failed check; nothing is mounted on error.
    pub async fn start(plan: MountPlan, tokens: TokenSource) -> anyhow::Result<Self> {
        let signals = Signals::new()?;
        let mp = &plan.mountpoint;
        checks::first_failure([checks::mount_point(mp)])?;
        // Resolved once, here: the mount lands on this directory whatever its path names by
        // the time the checks below are done (see `session`).
        let pinned = crate::session::MountPoint::open(mp)
            .with_context(|| format!("cannot resolve {}", mp.display()))?;
        let mountpoint = pinned.path.clone();

        let client = Arc::new(GcsClient::new(plan.gcs.clone(), tokens)?);
        // Access checks before mounting fail fast; reads later get the full retry budget.
        let probe_client = client.with_retry(RetryConfig::startup().min(&plan.gcs.retry));
        let disk = match &plan.disk {
            Some(d) => Some(open_disk(d, &plan, &mountpoint).await?),
            None => None,
        };
        let memory = MemoryCache::new(plan.block_cache);
        let cache: Arc<dyn crate::cache::BlockCache> = match &disk {
            Some(d) => Arc::new(crate::read::tiered::TieredCache::new(memory, d.clone())),
            None => Arc::new(memory),
        };
        let passthrough = plan.disk.as_ref().is_some_and(|d| d.passthrough);
        let new_fs = || {
            Arc::new(
                Fs::new(plan.fs.clone(), client.clone(), cache.clone())
                    .with_disk(disk.clone(), passthrough),
            )
        };
        let mut fs = new_fs();

        // Metadata: from the snapshot if there is a good one, else (eager) a bulk load after
        // mounting, which writes a new snapshot when it completes.
        let eager = match plan.metadata {
            MetadataMode::Lazy => None,
            MetadataMode::Eager => Some(u64::MAX),
            MetadataMode::Auto if plan.fs.metadata_ttl.is_some() => None,
            MetadataMode::Auto => Some(crate::fs::bulk::BulkOptions::default().max_objects),
        };
        let snapshot = match (&plan.snapshot_dir, eager) {
            (Some(dir), Some(_)) if plan.fs.metadata_ttl.is_none() => {
                let key = crate::snapshot::SnapshotKey {
                    endpoint: plan.gcs.endpoint.clone(),
                    bucket: plan.gcs.bucket.clone(),
                    prefix: plan.fs.prefix.clone(),
                };
                Some((crate::snapshot::path_for(dir, &key), key))
            }
            _ => None,
        };
        let mut from_snapshot = false;
        if let Some((path, key)) = &snapshot {
            let t = std::time::Instant::now();
            let (path2, key2, fs2) = (path.clone(), key.clone(), fs.clone());
            match tokio::task::spawn_blocking(move || {
                crate::snapshot::load(&path2, &key2, None, fs2.inodes())
            })
            .await?
            {
                Ok(n) => {
                    fs.inodes().mark_subtree_listed(crate::inode::ROOT);
                    from_snapshot = true;
                    tracing::info!(
                        "metadata: {n} entries from snapshot {} in {:?}",
                        path.display(),
                        t.elapsed()
                    );
                }
                Err(crate::snapshot::LoadError::Missing) => {}
                Err(e) => {
                    tracing::warn!(
                        "ignoring metadata snapshot {}: {e}; listing afresh",
                        path.display()
                    );
                    if !matches!(e, crate::snapshot::LoadError::Untrusted(_)) {
                        let _ = std::fs::remove_file(path);
                    }
                    fs = new_fs();
                }
            }
        }
        // Which permissions the identity holds, so a missing one is named; a server without
        // testPermissions skips this, and the probe below explains what it finds. A network
        // failure is the probe's failure already: said now, not asked again.
        let perms = probe_client
            .test_permissions(&[checks::LIST, checks::GET])
            .await;
        if let Err(e @ ClientError::Network { .. }) = &perms {
            return Err(access_error(&plan, e));
        }
        let held = perms.as_deref();
        let perm_check = checks::permissions(&plan.gcs, probe_client.credentials(), held);
        tracing::info!("{perm_check}");
        checks::first_failure([perm_check])?;
        // Prove access before mounting: with a snapshot, one object read of metadata (no
        // listing); otherwise one small listing.
        let known = if from_snapshot {
            fs.inodes().any_file()
        } else {
            None
        };
        if let Some(ino) = known {
            let name = format!("{}{}", plan.fs.prefix, fs.inodes().rel_path(ino));
            let want = fs
                .inodes()
                .get(ino)
                .and_then(|v| v.file)
                .map(|f| f.generation);
            match probe_client.stat(&name).await {
                Ok(m) if Some(m.generation) == want => {}
                Ok(_) | Err(ClientError::NotFound(_)) => {
                    tracing::warn!(
                        "metadata snapshot is out of date ({name} changed); listing afresh"
                    );
                    if let Some((path, _)) = &snapshot {
                        let _ = std::fs::remove_file(path);
                    }
                    fs = new_fs();
                    from_snapshot = false;
                }
                Err(e) => return Err(access_error(&plan, &e)),
            }
        }
        if !from_snapshot {
            let probe = ListRequest {
                prefix: plan.fs.prefix.clone(),
                delimiter: Some("/".into()),
                max_results: Some(1),
                ..Default::default()
            };
            let page = probe_client
                .list_page(&probe)
                .await
                .map_err(|e| access_error(&plan, &e))?;
            if page.items.is_empty() && page.prefixes.is_empty() {
                tracing::warn!(
                    "gs://{}/{} holds no objects: the mount will be empty",
                    plan.gcs.bucket,
                    plan.fs.prefix
                );
            }
        }

        if from_snapshot {
            fs.confirm_misses();
        }
        if let Some((path, _)) = &snapshot {
            // An object seen changed makes the snapshot untrue: the next mount lists afresh.
            let p = path.clone();
            fs.set_on_change(move || {
                let _ = std::fs::remove_file(&p);
            });
        }
        let spin = crate::spin::Spinner::start(plan.spin)?;
        let adapter =
            FuseAdapter::new(fs.clone(), tokio::runtime::Handle::current()).with_spin(spin);

        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(plan.target()),
            fuser::MountOption::Subtype("physiofs".into()),
            fuser::MountOption::RO,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoAtime,
            fuser::MountOption::DefaultPermissions,
        ];
        config.acl = if plan.allow_other {
            fuser::SessionACL::All
        } else {
            fuser::SessionACL::Owner
        };
        // One FUSE thread: it never waits on the network (reads are answered by tokio tasks,
        // metadata from memory), and a tree walk, one request at a time, ran 20-30% faster
        // with one thread than with two (fewer cross-CPU wakeups on a 2-core VM).
        config.n_threads = Some(1);
        config.clone_fd = true;

        let mp2 = pinned;
        let fsname = plan.target();
        let allow_other = plan.allow_other;
        let (session, unmounter) = tokio::task::spawn_blocking(move || {
            crate::session::mount(adapter, mp2, &fsname, allow_other, config)
        })
            .await?
            .map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EPERM) {
                    " (not root: install fuse3 so fusermount3 exists; for --allow-other enable user_allow_other in /etc/fuse.conf)"
                } else if e.kind() == std::io::ErrorKind::NotFound {
                    " (is /dev/fuse present and fuse3 installed?)"
                } else {
                    ""
                };
                anyhow::anyhow!("cannot mount on {}: {e}{hint}", mountpoint.display())
            })?;
        if let (Some(max_objects), false) = (eager, from_snapshot) {
            let fs = fs.clone();
            tokio::spawn(async move {
                let opts = crate::fs::bulk::BulkOptions {
                    max_objects,
                    ..Default::default()
                };
                match fs.bulk_load(&opts).await {
                    Ok(st) if st.complete => {
                        tracing::info!(
                            "metadata: {} objects in {:.1?} with {} list requests",
                            st.objects,
                            st.elapsed,
                            st.list_requests
                        );
                        if let Some((path, key)) = snapshot {
                            let r = tokio::task::spawn_blocking(move || {
                                crate::snapshot::save(&path, &key, fs.inodes()).map(|n| (n, path))
                            })
                            .await;
                            match r {
                                Ok(Ok((n, path))) => {
                                    tracing::info!(
                                        "metadata: snapshot of {n} entries saved to {}",
                                        path.display()
                                    )
                                }
                                Ok(Err(e)) => tracing::warn!("metadata snapshot not saved: {e}"),
                                Err(e) => tracing::warn!("metadata snapshot not saved: {e}"),
                            }
                        }
                    }
                    Ok(st) => tracing::warn!(
                        "metadata: stopped after {} objects (--metadata auto caps at {}); \
                         directories beyond are listed when used (use --metadata eager to load all)",
                        st.objects,
                        opts.max_objects
                    ),
                    Err(e) => tracing::warn!(
                        "metadata: bulk load failed ({e}); directories are listed when used"
                    ),
                }
            });
        }
        let (tx, done) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("physiofs-fuse".into())
            .spawn(move || {
                let r = session.run();
                let _ = tx.send(r);
            })?;
        let mp3 = mountpoint.clone();
        let _ =
            tokio::task::spawn_blocking(move || crate::session::tune_readahead(&mp3, 4096)).await;
        Ok(Mounted {
            mountpoint,
            fs,
            client,
            unmounter,
            done,
            signals,
            thread: Some(thread),
        })
    }

    /// Unmounts (lazily if busy) and waits for the session to end.
    pub async fn unmount(mut self) -> anyhow::Result<()> {
        // (KernelMount already falls back to a lazy detach when the mount is busy.)
        if let Err(e) = self.unmounter.unmount() {
            tracing::warn!("unmount of {} failed: {e}", self.mountpoint.display());
        }
        self.finish().await
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        let r = (&mut self.done).await;
        self.finish_with(r).await
    }

    async fn finish_with(
        mut self,
        r: Result<std::io::Result<()>, tokio::sync::oneshot::error::RecvError>,
    ) -> anyhow::Result<()> {
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.log_stats();
        match r {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("FUSE session ended with an error: {e}")),
        }
    }

    fn log_stats(&self) {
        let s = &self.client.stats;
        let c = self.fs.cache().stats();
        tracing::info!(
            list = s.list_requests.load(Ordering::Relaxed),
            stat = s.stat_requests.load(Ordering::Relaxed),
            get = s.get_requests.load(Ordering::Relaxed),
            retries = s.retries.load(Ordering::Relaxed),
            resumes = s.resumes.load(Ordering::Relaxed),
            checksum_mismatches = s.checksum_mismatches.load(Ordering::Relaxed),
            bytes_fetched = s.bytes_fetched.load(Ordering::Relaxed),
            cache_hits = c.hits.load(Ordering::Relaxed),
            cache_misses = c.misses.load(Ordering::Relaxed),
            read_bytes = self.fs.stats().read_bytes.load(Ordering::Relaxed),
            prefetch_bytes = self.fs.stats().prefetch_bytes.load(Ordering::Relaxed),
            files_prefetched = self.fs.stats().files_prefetched.load(Ordering::Relaxed),
            objects_verified = self.fs.stats().objects_verified.load(Ordering::Relaxed),
            verify_failures = self.fs.stats().verify_failures.load(Ordering::Relaxed),
            "unmounted {}",
            self.mountpoint.display()
        );
    }

    /// Serves until SIGINT/SIGTERM (then unmounts) or until someone runs `umount`. SIGHUP
    /// (the terminal went away) unmounts a foreground mount cleanly rather than dying with
    /// the mount in place; a background mount has no terminal and ignores it.
    pub async fn serve_until_signal(mut self, background: bool) -> anyhow::Result<()> {
        let s = &mut self.signals;
        let ended = loop {
            tokio::select! {
                _ = s.term.recv() => break None,
                _ = s.int.recv() => break None,
                _ = s.hup.recv() => {
                    if !background {
                        tracing::info!("SIGHUP: unmounting {}", self.mountpoint.display());
                        break None;
                    }
                    tracing::info!("SIGHUP ignored (background mount; stop it with umount)");
                }
                r = &mut self.done => break Some(r),
            }
        };
        match ended {
            None => self.unmount().await,
            Some(r) => self.finish_with(r).await,
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Opens the disk tier of a mount: its size resolved against the filesystem holding it.
async fn open_disk(
    d: &crate::plan::DiskPlan,
    plan: &MountPlan,
    mountpoint: &std::path::Path,
) -> anyhow::Result<Arc<crate::read::disk::DiskCache>> {
    use crate::read::disk::{DiskCache, DiskConfig, filesystem_space};
    checks::first_failure([checks::cache_dir(Some(d))])?;
    let (total, _) = filesystem_space(&d.dir)
        .map_err(|e| anyhow::anyhow!("--cache-dir {}: {e}", d.dir.display()))?;
    let cfg = DiskConfig {
        dir: d.dir.clone(),
        capacity: d.size.resolve(total),
        block_size: plan.fs.block_size,
        namespace: format!("{} {}", plan.gcs.endpoint, plan.gcs.bucket),
        reserve: total / 20,
    };
    let holder = format!("mounted at {}", mountpoint.display());
    let t = std::time::Instant::now();
    let disk = tokio::task::spawn_blocking(move || DiskCache::open(cfg, &holder)).await??;
    let s = disk.summary();
    tracing::info!(
        "disk cache: {} objects ({} complete, {}) of at most {} in {} (index read in {:?})",
        s.objects,
        s.complete,
        bytesize::ByteSize::b(s.bytes),
        bytesize::ByteSize::b(disk.capacity()),
        d.dir.display(),
        t.elapsed()
    );
    Ok(Arc::new(disk))
}

/// `physiofs mount`: mount and serve until unmounted. A background mount (`notify`) reports
/// the mount ready to the waiting parent once it serves.
pub async fn run(args: MountArgs, notify: Option<&Notify>) -> anyhow::Result<()> {
    crate::stale::check_mountpoint(&args.mountpoint, args.force)?;
    let mut plan = MountPlan::resolve(&args, &Env::capture_for(&args))?;
    let tokens = prepare(&plan).await?;
    plan.bill_metadata_project(&tokens).await;
    eprintln!("physiofs: credentials: {}", tokens.credentials());
    tracing::info!("credentials: {}", tokens.credentials());
    match &plan.billing {
        Some(b) => eprintln!("physiofs: billing project: {b}"),
        None => eprintln!("physiofs: billing project: none"),
    }
    let target = plan.target();
    let endpoint = plan.gcs.endpoint.clone();
    // Bound before mounting: a taken port fails with nothing mounted, and the endpoint
    // answers as soon as the mount is there (early scrapes wait in the backlog).
    let metrics = match plan.metrics_addr {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let mounted = Mounted::start(plan, tokens).await?;
    if let Some(m) = metrics {
        eprintln!("physiofs: metrics at http://{}/metrics", m.local);
        m.serve(mounted.client.stats.clone(), mounted.fs.clone());
    }
    let stop = if notify.is_some() { "" } else { " or Ctrl-C" };
    let line = format!(
        "physiofs: mounted {target} ({endpoint}) read-only at {}; stop with `umount {}`{stop}",
        mounted.mountpoint.display(),
        mounted.mountpoint.display()
    );
    eprintln!("{line}");
    if let Some(n) = notify {
        n.ready(&line);
    }
    mounted.serve_until_signal(notify.is_some()).await
}
