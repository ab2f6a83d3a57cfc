//! Listing directories into the inode table: a whole directory (all pages, once, shared by
//! concurrent callers), or one name without listing its parent (while a bulk load runs).

use super::{Fs, FsError};
use crate::client::{ListRequest, list_all};
use crate::inode::Ino;

/// Listings of one directory in a row whose children were dropped under them before
/// [`Fs::ensure_listed`] gives up (it then answers as if unlisted).
const LIST_ATTEMPTS: usize = 3;

impl Fs {
    /// Lists directory `dir` (all pages) into the inode table, once.
    pub(super) async fn ensure_listed(&self, dir: Ino) -> Result<(), FsError> {
        if self.inodes.is_listed(dir) {
            return Ok(());
        }
        let lock = self
            .list_locks
            .lock()
            .unwrap()
            .entry(dir)
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        // A listing the kernel waits for cannot lose its directory (the kernel holds it, so
        // nothing of it is dropped); one nobody holds may, and is simply done again.
        for _ in 0..LIST_ATTEMPTS {
            if self.inodes.is_listed(dir) || self.list_once(dir).await? {
                break;
            }
        }
        self.list_locks.lock().unwrap().remove(&dir);
        Ok(())
    }

    /// One listing of `dir` (all pages) into the inode table; false when its children were
    /// dropped meanwhile, so it is not marked complete (true too when `dir` is no directory).
    async fn list_once(&self, dir: Ino) -> Result<bool, FsError> {
        // A drop of the children while the listing runs moves the epoch on: then the listing
        // does not mark the directory complete (see the inode table's module rules).
        let epoch = self.inodes.listing_epoch(dir);
        if epoch == 0 {
            // Not a directory (any more): nothing to list.
            return Ok(true);
        }
        let dir_rel = self.inodes.rel_path(dir);
        let prefix = format!("{}{}", self.cfg.prefix, dir_rel);
        let req = ListRequest {
            prefix: prefix.clone(),
            delimiter: Some("/".into()),
            max_results: Some(1000),
            ..Default::default()
        };
        let page = list_all(self.client.as_ref(), &req)
            .await
            .inspect_err(|e| {
                tracing::warn!(prefix = %prefix, error = %e, "listing failed");
            })?;
        let mut present = std::collections::HashSet::new();
        for p in &page.prefixes {
            let Some(rel) = p.strip_prefix(&self.cfg.prefix) else {
                continue;
            };
            match self.inodes.insert_dir(rel) {
                Ok(_) => {
                    present.insert(leaf_name(rel).to_string());
                }
                Err(why) => tracing::warn!(prefix = %p, "skipping directory: {why}"),
            }
        }
        for m in &page.items {
            if m.name.strip_prefix(&self.cfg.prefix) == Some(dir_rel.as_str()) {
                // The placeholder object of this very directory.
                continue;
            }
            if let Some((_, rel)) = self.insert_meta(m) {
                present.insert(leaf_name(rel).to_string());
            }
        }
        let present: std::collections::HashSet<&str> = present.iter().map(|s| s.as_str()).collect();
        let done = self.inodes.finish_listing(dir, epoch, &present);
        if !done {
            tracing::debug!(prefix = %prefix, "children dropped while listing: listing again");
        }
        Ok(done)
    }

    /// Finds one name without listing its parent: the object itself and the first entry
    /// under `name/`, asked concurrently (one round trip).
    pub(super) async fn targeted_lookup(&self, parent: Ino, name: &str) -> Result<(), FsError> {
        if crate::inode::invalid_component(name).is_some() {
            return Ok(());
        }
        let key = format!(
            "{}{}{}",
            self.cfg.prefix,
            self.inodes.rel_path(parent),
            name
        );
        let dir_req = ListRequest {
            prefix: format!("{key}/"),
            max_results: Some(1),
            ..Default::default()
        };
        let (obj, under) = tokio::join!(self.client.stat(&key), self.client.list_page(&dir_req));
        if let Ok(p) = &under
            && (!p.items.is_empty() || !p.prefixes.is_empty())
        {
            let _ = self
                .inodes
                .insert_dir(&dir_req.prefix[self.cfg.prefix.len()..]);
            return Ok(());
        }
        match obj {
            Ok(m) => {
                self.insert_meta(&m);
                Ok(())
            }
            Err(crate::client::ClientError::NotFound(_)) => {
                under.map(|_| ()).map_err(FsError::from)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Last component of a relative path (`a/b/` → `b`, `a/c` → `c`).
fn leaf_name(rel: &str) -> &str {
    let t = rel.strip_suffix('/').unwrap_or(rel);
    t.rsplit('/').next().unwrap_or(t)
}
