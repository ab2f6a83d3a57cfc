//! Listing directories into the inode table: a whole directory (all pages, once, shared by
//! concurrent callers), or one name without listing its parent (while a bulk load runs).

use super::{Fs, FsError};
use crate::client::{ListRequest, list_all};
use crate::inode::Ino;

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
        if self.inodes.is_listed(dir) {
            return Ok(());
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
        self.inodes.prune_children(dir, &present);
        self.inodes.mark_listed(dir);
        self.list_locks.lock().unwrap().remove(&dir);
        Ok(())
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
