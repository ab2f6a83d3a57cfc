//! The inode table: the tree the kernel sees, built from object names.
//!
//! GCS has no directories, only names; a directory here is any prefix that some name continues
//! past a `/`. Entries arrive from listings — per-directory pages (lazy metadata, misses) and
//! flat listings of whole sub-trees (the bulk load) — and from the snapshot, through the same
//! two calls, [`InodeTable::insert_object`] and [`InodeTable::insert_dir`], which create the
//! implied parent directories as they go.
//! Nodes hold only their own name component; a full object name is rebuilt by walking parents,
//! so no node carries a path string.
//!
//! Naming rules (a GCS name is any UTF-8 string; a POSIX path component is not):
//! - a component that is empty (`a//b`), `.` or `..`, longer than 255 bytes, or holds a NUL is
//!   not representable: the object is skipped, with one warning;
//! - an object `x` alongside a prefix `x/`: the directory wins, the object is skipped with a warning;
//! - an object named `d/` (a folder placeholder) is shown as the directory `d`, not as a file.
//!
//! Lifetimes: the kernel holds an inode from each entry it is handed (a lookup answer, a
//! readdirplus entry) until it forgets it. Each node counts those ([`InodeTable::remember`],
//! [`InodeTable::forget`]), and how many nodes of its sub-tree are held, so a lazily browsed
//! mount need not keep every name it ever showed: a directory the kernel holds nothing of (it,
//! and nothing below it) drops its children and is listed again when next used. Three rules
//! keep that from ever losing an entry:
//! - nothing is dropped while a bulk load runs ([`InodeTable::loading`]), and a directory a
//!   bulk load or the snapshot listed is kept with all it holds: those trees are whole by
//!   design (a listing per directory to get them back would cost more than their memory);
//! - a listing of a directory begins at its epoch ([`InodeTable::listing_epoch`]) and completes
//!   only if that is still the epoch ([`InodeTable::finish_listing`]); every drop, and every
//!   reuse of a slot, gives the directory a new one, so a listing begun before a drop can
//!   neither prune nor mark complete what it did not see whole;
//! - a dropped slot is reused only with a new FUSE generation ([`NodeView::ino_gen`]), and only
//!   once the kernel forgot every reference to it (no held node lies below an unheld one).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub type Ino = u64;
pub const ROOT: Ino = 1;

/// Longest name component Linux accepts.
pub const NAME_MAX: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// What the kernel needs to know about one object version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub size: u64,
    pub mtime: SystemTime,
    pub generation: i64,
    /// CRC32C of the whole object from the listing; whole-object reads are checked against it.
    pub crc32c: Option<u32>,
}

/// A copy of one node's state, handed out so no lock is held while it is used.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub ino: Ino,
    pub parent: Ino,
    pub kind: Kind,
    /// Files only.
    pub file: Option<FileInfo>,
    /// The FUSE generation of the inode number: how often its slot was reused (0 for the
    /// first node that had it, the root always). Replies carry it, so the kernel never takes
    /// a reused number for the node it held before.
    pub ino_gen: u64,
}

#[derive(Debug)]
pub enum Lookup {
    Found(NodeView),
    /// The directory's listing is complete and has no such name.
    Absent,
    /// The directory has not been listed yet: the answer needs a listing.
    Unknown,
    NotDir,
}

struct Node {
    /// 0 for a free slot (and the unused slot 0).
    parent: Ino,
    name: Arc<str>,
    data: NodeData,
    /// Entries the kernel was handed for this node minus those it forgot.
    lookups: AtomicU64,
    /// Nodes of this sub-tree (itself included) with `lookups > 0`. Changed with atomics
    /// under the read lock, so it is exact whenever the write lock is held.
    held: AtomicI64,
    /// See [`NodeView::ino_gen`]; kept across the slot's free spells.
    ino_gen: u64,
}

enum NodeData {
    Dir {
        children: BTreeMap<Arc<str>, Ino>,
        /// When the directory's listing was last complete (None: never).
        listed: Option<Instant>,
        /// Listed by a bulk load or from the snapshot, once: kept whole for good.
        kept: bool,
        /// Unique over the table's life; a new one at every drop of the children.
        epoch: u64,
    },
    File(FileInfo),
}

/// The nodes, indexed by inode number, and the free slots.
struct Nodes {
    v: Vec<Node>,
    free: Vec<Ino>,
    next_epoch: u64,
}

impl std::ops::Deref for Nodes {
    type Target = Vec<Node>;
    fn deref(&self) -> &Vec<Node> {
        &self.v
    }
}

impl std::ops::DerefMut for Nodes {
    fn deref_mut(&mut self) -> &mut Vec<Node> {
        &mut self.v
    }
}

impl Nodes {
    /// The live node `ino` (not a free slot, not slot 0).
    fn live(&self, ino: Ino) -> Option<&Node> {
        self.v.get(ino as usize).filter(|n| n.parent != 0)
    }

    fn live_mut(&mut self, ino: Ino) -> Option<&mut Node> {
        self.v.get_mut(ino as usize).filter(|n| n.parent != 0)
    }

    fn new_dir(&mut self) -> NodeData {
        self.next_epoch += 1;
        NodeData::Dir {
            children: BTreeMap::new(),
            listed: None,
            kept: false,
            epoch: self.next_epoch,
        }
    }

    /// Adds `delta` to the held count of `ino` and of each of its ancestors.
    fn propagate(&self, ino: Ino, delta: i64) {
        let mut cur = ino;
        while let Some(n) = self.live(cur) {
            n.held.fetch_add(delta, Ordering::Relaxed);
            if cur == ROOT {
                break;
            }
            cur = n.parent;
        }
    }

    /// The directories whose children a forget of `ino` might let go, outermost first: `ino`
    /// and its unheld ancestors below the root, when `ino` itself is unheld; only those not
    /// kept, with children, count.
    fn drop_candidates(&self, ino: Ino) -> Vec<Ino> {
        let mut chain = Vec::new();
        let mut cur = ino;
        while let Some(n) = self.live(cur) {
            if cur == ROOT || n.held.load(Ordering::Relaxed) != 0 {
                break;
            }
            if let NodeData::Dir {
                children,
                kept: false,
                ..
            } = &n.data
                && !children.is_empty()
            {
                chain.push(cur);
            }
            cur = n.parent;
        }
        chain.reverse();
        chain
    }
}

pub struct InodeTable {
    inner: RwLock<Nodes>,
    /// See [`InodeTable::visited`].
    visited: AtomicU64,
    /// Bulk loads running: no drop while any is (see [`InodeTable::loading`]).
    loads: AtomicUsize,
    /// Nodes dropped so far (see [`InodeTable::dropped`]).
    dropped: AtomicU64,
    /// How long a complete listing stays trusted; None = for the life of the mount.
    ttl: Option<Duration>,
}

fn fresh(listed: &Option<Instant>, ttl: Option<Duration>) -> bool {
    match (listed, ttl) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(t), Some(ttl)) => t.elapsed() < ttl,
    }
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new(None)
    }
}

/// Why a name component cannot be shown, if it cannot.
pub fn invalid_component(c: &str) -> Option<&'static str> {
    if c.is_empty() {
        Some("empty path component (`//`)")
    } else if c == "." || c == ".." {
        Some("`.` or `..` path component")
    } else if c.len() > NAME_MAX {
        Some("path component longer than 255 bytes")
    } else if c.contains('\0') {
        Some("NUL byte in name")
    } else {
        None
    }
}

impl InodeTable {
    pub fn new(ttl: Option<Duration>) -> Self {
        let mut nodes = Nodes {
            v: vec![free_node(0)],
            free: Vec::new(),
            next_epoch: 0,
        };
        let root = Node {
            parent: ROOT,
            name: Arc::from(""),
            data: nodes.new_dir(),
            lookups: AtomicU64::new(0),
            held: AtomicI64::new(0),
            ino_gen: 0,
        };
        nodes.v.push(root);
        InodeTable {
            inner: RwLock::new(nodes),
            visited: AtomicU64::new(0),
            loads: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            ttl,
        }
    }

    /// Number of inodes, the root included (free slots are not).
    pub fn len(&self) -> usize {
        let nodes = self.inner.read().unwrap();
        nodes.v.len() - 1 - nodes.free.len()
    }

    /// Nodes dropped because the kernel forgot them, over the table's life.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn get(&self, ino: Ino) -> Option<NodeView> {
        let nodes = self.inner.read().unwrap();
        nodes.live(ino).map(|n| view(ino, n))
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Lookup {
        let nodes = self.inner.read().unwrap();
        match nodes.live(parent).map(|n| &n.data) {
            Some(NodeData::Dir {
                children, listed, ..
            }) => match children.get(name) {
                Some(&ino) => Lookup::Found(view(ino, &nodes[ino as usize])),
                None if fresh(listed, self.ttl) => Lookup::Absent,
                None => Lookup::Unknown,
            },
            _ => Lookup::NotDir,
        }
    }

    pub fn is_listed(&self, dir: Ino) -> bool {
        match self.inner.read().unwrap().live(dir).map(|n| &n.data) {
            Some(NodeData::Dir { listed, .. }) => fresh(listed, self.ttl),
            _ => false,
        }
    }

    /// Marks `dir` completely listed by a bulk load, which keeps it (see the module rules).
    /// A listing of the directory on its own completes with [`InodeTable::finish_listing`].
    pub fn mark_listed(&self, dir: Ino) {
        if let Some(NodeData::Dir { listed, kept, .. }) = self
            .inner
            .write()
            .unwrap()
            .live_mut(dir)
            .map(|n| &mut n.data)
        {
            *listed = Some(Instant::now());
            *kept = true;
        }
    }

    /// Marks `dir` and every directory below it as completely listed (after a flat listing
    /// of the whole sub-tree, or loading the snapshot), and kept.
    pub fn mark_subtree_listed(&self, dir: Ino) {
        let now = Instant::now();
        let mut nodes = self.inner.write().unwrap();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            if let Some(NodeData::Dir {
                children,
                listed,
                kept,
                ..
            }) = nodes.live_mut(d).map(|n| &mut n.data)
            {
                *listed = Some(now);
                *kept = true;
                stack.extend(children.values().copied());
            }
        }
    }

    /// Where a listing of `dir` on its own begins: hand it to [`InodeTable::finish_listing`].
    /// 0 (which no directory has) when `dir` is not a directory.
    pub fn listing_epoch(&self, dir: Ino) -> u64 {
        match self.inner.read().unwrap().live(dir).map(|n| &n.data) {
            Some(NodeData::Dir { epoch, .. }) => *epoch,
            _ => 0,
        }
    }

    /// Completes a listing of `dir` on its own that began at `epoch`: removes the children
    /// whose names are not in `present` (the listing shows they are gone; their inodes stay
    /// allocated, so open handles stay valid) and marks it listed. Does neither, and returns
    /// false, when the directory is no longer at that epoch (its children were dropped, or its
    /// slot freed or reused, since the listing began): then what the listing saw need not be
    /// all the directory holds, and it is listed again when next used.
    pub fn finish_listing(
        &self,
        dir: Ino,
        at: u64,
        present: &std::collections::HashSet<&str>,
    ) -> bool {
        let mut nodes = self.inner.write().unwrap();
        let Some(NodeData::Dir {
            children,
            listed,
            epoch,
            ..
        }) = nodes.live_mut(dir).map(|n| &mut n.data)
        else {
            return false;
        };
        if *epoch != at {
            return false;
        }
        children.retain(|name, _| present.contains(&**name));
        *listed = Some(Instant::now());
        true
    }

    /// A bulk load begins: nothing is dropped until the returned guard is gone. A drop
    /// while one runs could free directories it is still filling (and is about to mark
    /// complete) or slots it still refers to.
    pub fn loading(&self) -> LoadGuard<'_> {
        // Taken under the write lock, so no drop is half done when it returns.
        let _nodes = self.inner.write().unwrap();
        self.loads.fetch_add(1, Ordering::SeqCst);
        LoadGuard(self)
    }

    /// The kernel was handed an entry for `ino` (a lookup answer or a readdirplus entry) with
    /// generation `ino_gen`: it holds one more reference until it forgets it. Call it before the
    /// reply is sent. False when `ino` is not that node (freed or reused since; never
    /// expected: the kernel holds the directory an entry is found in).
    pub fn remember(&self, ino: Ino, ino_gen: u64) -> bool {
        remember_in(&self.inner.read().unwrap(), ino, ino_gen)
    }

    /// [`InodeTable::remember`] for each of `entries` (the entries of one readdirplus reply).
    /// Returns how many were not the node they name.
    pub fn remember_all(&self, entries: &[(Ino, u64)]) -> usize {
        if entries.is_empty() {
            return 0;
        }
        let nodes = self.inner.read().unwrap();
        entries
            .iter()
            .filter(|&&(ino, ino_gen)| !remember_in(&nodes, ino, ino_gen))
            .count()
    }

    /// References the kernel holds to `ino` (entries handed minus forgotten).
    pub fn lookups(&self, ino: Ino) -> u64 {
        let nodes = self.inner.read().unwrap();
        nodes
            .live(ino)
            .map_or(0, |n| n.lookups.load(Ordering::Relaxed))
    }

    /// The kernel forgot `n` references to `ino`. When that leaves a directory not kept (see
    /// the module rules) with nothing of it held, its children are dropped (it stays, not
    /// listed, and is listed again when next used) and their slots freed for reuse: the
    /// outermost such directory among `ino` and its ancestors. The root is never forgotten.
    /// Returns the number of nodes dropped.
    pub fn forget(&self, ino: Ino, n: u64) -> usize {
        if ino == ROOT || n == 0 {
            return 0;
        }
        {
            let nodes = self.inner.read().unwrap();
            let Some(node) = nodes.live(ino) else {
                return 0;
            };
            let prev = node
                .lookups
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    Some(c.saturating_sub(n))
                })
                .unwrap_or(0);
            if prev == 0 || prev > n {
                return 0;
            }
            nodes.propagate(ino, -1);
            if self.loads.load(Ordering::SeqCst) > 0 || nodes.drop_candidates(ino).is_empty() {
                return 0;
            }
        }
        self.drop_unheld(ino)
    }

    /// Drops the children of the outermost directory [`Nodes::drop_candidates`] names for
    /// `ino` that holds no kept directory, checked afresh under the write lock.
    fn drop_unheld(&self, ino: Ino) -> usize {
        let mut nodes = self.inner.write().unwrap();
        if self.loads.load(Ordering::SeqCst) > 0 {
            return 0;
        }
        'candidates: for dir in nodes.drop_candidates(ino) {
            let mut below = Vec::new();
            let mut stack = vec![dir];
            while let Some(d) = stack.pop() {
                let NodeData::Dir { children, .. } = &nodes[d as usize].data else {
                    continue;
                };
                for &c in children.values() {
                    let child = &nodes[c as usize];
                    if child.held.load(Ordering::Relaxed) != 0
                        || matches!(child.data, NodeData::Dir { kept: true, .. })
                    {
                        continue 'candidates;
                    }
                    below.push(c);
                    stack.push(c);
                }
            }
            nodes.next_epoch += 1;
            let next = nodes.next_epoch;
            if let NodeData::Dir {
                children,
                listed,
                epoch,
                ..
            } = &mut nodes[dir as usize].data
            {
                children.clear();
                *listed = None;
                *epoch = next;
            }
            for &c in &below {
                let ino_gen = nodes[c as usize].ino_gen;
                nodes[c as usize] = free_node(ino_gen);
            }
            nodes.free.extend_from_slice(&below);
            self.dropped
                .fetch_add(below.len() as u64, Ordering::Relaxed);
            return below.len();
        }
        0
    }

    /// Some file in the table, if any (used to prove access without a listing).
    pub fn any_file(&self) -> Option<Ino> {
        let nodes = self.inner.read().unwrap();
        (2..nodes.len())
            .find(|&i| nodes[i].parent != 0 && matches!(nodes[i].data, NodeData::File(_)))
            .map(|i| i as Ino)
    }

    /// Resolves a relative directory path (`a/b`, `a/b/` or ``) to its inode, if present.
    pub fn find_dir(&self, rel: &str) -> Option<Ino> {
        let nodes = self.inner.read().unwrap();
        let mut cur = ROOT;
        for comp in rel.split('/').filter(|c| !c.is_empty()) {
            let NodeData::Dir { children, .. } = &nodes[cur as usize].data else {
                return None;
            };
            cur = *children.get(comp)?;
        }
        matches!(nodes[cur as usize].data, NodeData::Dir { .. }).then_some(cur)
    }

    /// Every node below the root in depth-first name order: (relative path, file info or
    /// None for a directory). Used to persist the table.
    pub fn export(&self) -> Vec<(String, Option<FileInfo>)> {
        let mut out = Vec::new();
        let _ = self.for_each_entry(&mut |name, file| {
            out.push((name.to_string(), file.cloned()));
            Ok(())
        });
        out
    }

    /// Calls `f` for every node below the root in depth-first name order with its relative
    /// path, without materializing the list (a million names would cost ~100 MB). Holds the
    /// read lock throughout; stops at the first error.
    pub fn for_each_entry(
        &self,
        f: &mut dyn FnMut(&str, Option<&FileInfo>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        // Iterative (a stack of open directories), so a name of thousands of components
        // cannot overflow the thread's stack; the order is the recursive pre-order.
        let nodes = self.inner.read().unwrap();
        let NodeData::Dir { children, .. } = &nodes[ROOT as usize].data else {
            return Ok(());
        };
        let mut path = String::new();
        let mut stack = vec![(children.iter(), 0usize)];
        while let Some((iter, base)) = stack.last_mut() {
            let base = *base;
            let Some((name, &ino)) = iter.next() else {
                stack.pop();
                continue;
            };
            path.truncate(base);
            path.push_str(name);
            match &nodes[ino as usize].data {
                NodeData::File(info) => f(&path, Some(info))?,
                NodeData::Dir { children, .. } => {
                    f(&path, None)?;
                    path.push('/');
                    stack.push((children.iter(), path.len()));
                }
            }
        }
        Ok(())
    }

    /// Children of a directory, in name order.
    pub fn children(&self, dir: Ino) -> Option<Vec<(Arc<str>, NodeView)>> {
        let nodes = self.inner.read().unwrap();
        match &nodes.live(dir)?.data {
            NodeData::Dir { children, .. } => Some(
                children
                    .iter()
                    .map(|(n, &i)| (n.clone(), view(i, &nodes[i as usize])))
                    .collect(),
            ),
            NodeData::File(_) => None,
        }
    }

    /// Calls `f(name, child)` for the children of `dir` in name order, starting after the
    /// child `after` (None: from the first), until it returns true. Resuming costs one tree
    /// descent, not a step per earlier child, so listing a directory of n entries in pages
    /// costs O(n log n), not O(n²). The child is found by its name, which its node keeps even
    /// after a fresh listing dropped it, so names added or removed meanwhile neither repeat nor
    /// hide others. A child of another directory resumes nowhere (nothing is visited). Holds
    /// the read lock throughout, so `f` must be quick. None when `dir` is not a directory.
    pub fn visit_children(
        &self,
        dir: Ino,
        after: Option<Ino>,
        f: &mut dyn FnMut(&str, NodeView) -> bool,
    ) -> Option<()> {
        use std::ops::Bound::{Excluded, Unbounded};
        let nodes = self.inner.read().unwrap();
        let NodeData::Dir { children, .. } = &nodes.live(dir)?.data else {
            return None;
        };
        let from = match after {
            None => children.range::<str, _>((Unbounded, Unbounded)),
            Some(a) => match nodes.live(a) {
                Some(n) if n.parent == dir && a != ROOT => {
                    children.range::<str, _>((Excluded(&*n.name), Unbounded))
                }
                _ => return Some(()),
            },
        };
        for (name, &ino) in from {
            self.visited.fetch_add(1, Ordering::Relaxed);
            if f(name, view(ino, &nodes[ino as usize])) {
                break;
            }
        }
        Some(())
    }

    /// Children handed to [`InodeTable::visit_children`] callers so far (each entry a readdir
    /// offered, including the one that did not fit a full reply).
    pub fn visited(&self) -> u64 {
        self.visited.load(Ordering::Relaxed)
    }

    /// The name of `child` if it is (or was, before a fresh listing dropped it) a child of
    /// `dir`: where a readdir resuming after it picks up.
    pub fn child_name(&self, dir: Ino, child: Ino) -> Option<Arc<str>> {
        let nodes = self.inner.read().unwrap();
        let n = nodes.live(child)?;
        (n.parent == dir && child != ROOT).then(|| n.name.clone())
    }

    /// Up to `n` files that follow file `ino` in key order (a depth-first walk in name order,
    /// as a sorted listing or `sorted(glob(...))` meets them), keeping only names with the same
    /// extension as `ino`'s (`.dcm` after `.dcm`, skipping the `.txt` reports beside them).
    /// Visits at most `64 * n` nodes, so a tree of empty directories cannot make it slow.
    pub fn next_files(&self, ino: Ino, n: usize) -> Vec<Ino> {
        use std::ops::Bound::{Excluded, Unbounded};
        let nodes = self.inner.read().unwrap();
        let mut out = Vec::new();
        let Some(node) = nodes.live(ino) else {
            return out;
        };
        if !matches!(node.data, NodeData::File(_)) || ino == ROOT {
            return out;
        }
        let ext = |name: &str| name.rfind('.').map(|i| name[i..].to_owned());
        let want = ext(&node.name);
        let mut budget = 64 * n.max(1);
        // A stack of (directory, resume after this name); a file's siblings come first.
        let mut stack: Vec<(Ino, Option<Arc<str>>)> = Vec::new();
        let mut cur = node.parent;
        // The ancestors, innermost last, so the walk climbs once a directory is done.
        let mut chain = Vec::new();
        while cur != ROOT && cur != 0 {
            chain.push((nodes[cur as usize].parent, nodes[cur as usize].name.clone()));
            cur = nodes[cur as usize].parent;
        }
        for (dir, after) in chain.into_iter().rev() {
            stack.push((dir, Some(after)));
        }
        stack.push((node.parent, Some(node.name.clone())));
        while let Some((dir, after)) = stack.pop() {
            let NodeData::Dir { children, .. } = &nodes[dir as usize].data else {
                continue;
            };
            let range = match &after {
                Some(a) => children.range::<str, _>((Excluded(&**a), Unbounded)),
                None => children.range::<str, _>((Unbounded, Unbounded)),
            };
            for (child_name, &child) in range {
                if budget == 0 || out.len() >= n {
                    return out;
                }
                budget -= 1;
                match &nodes[child as usize].data {
                    NodeData::File(_) => {
                        if ext(child_name) == want {
                            out.push(child);
                        }
                    }
                    NodeData::Dir { .. } => {
                        // Finish this directory's later names after the subdirectory.
                        stack.push((dir, Some(child_name.clone())));
                        stack.push((child, None));
                        break;
                    }
                }
            }
        }
        out
    }

    /// The node's path relative to the mount root: `a/b` for a file, `a/b/` for a directory,
    /// `` for the root. Prepend the mount prefix to get the object name or listing prefix.
    pub fn rel_path(&self, ino: Ino) -> String {
        let nodes = self.inner.read().unwrap();
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT && cur != 0 {
            let n = &nodes[cur as usize];
            parts.push(n.name.clone());
            cur = n.parent;
        }
        let mut out = String::new();
        for p in parts.iter().rev() {
            out.push_str(p);
            out.push('/');
        }
        if matches!(nodes[ino as usize].data, NodeData::File(_)) {
            out.pop();
        }
        out
    }

    /// Adds (or updates) the object at `rel` (relative to the mount root), creating implied
    /// parent directories. A trailing `/` makes it a directory placeholder. Returns the inode,
    /// or `Err(reason)` when the name cannot be shown (see the module rules).
    pub fn insert_object(&self, rel: &str, info: FileInfo) -> Result<Ino, String> {
        if let Some(dir) = rel.strip_suffix('/') {
            return self.insert_dir(dir);
        }
        let (dir, leaf) = match rel.rfind('/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => ("", rel),
        };
        if let Some(why) = invalid_component(leaf).or_else(|| {
            (!dir.is_empty())
                .then(|| dir.split('/').find_map(invalid_component))
                .flatten()
        }) {
            return Err(why.to_string());
        }
        let mut nodes = self.inner.write().unwrap();
        let parent = ensure_dirs(&mut nodes, dir)?;
        let NodeData::Dir { children, .. } = &nodes[parent as usize].data else {
            unreachable!("ensure_dirs returns a directory")
        };
        match children.get(leaf).copied() {
            Some(ino) => match &mut nodes[ino as usize].data {
                NodeData::File(old) => {
                    *old = info;
                    Ok(ino)
                }
                NodeData::Dir { .. } => {
                    Err("an object and a directory share this name; the directory is shown".into())
                }
            },
            None => Ok(add_child(&mut nodes, parent, leaf, NodeData::File(info))),
        }
    }

    /// Adds the directory at `rel` (with or without a trailing `/`) and its parents.
    pub fn insert_dir(&self, rel: &str) -> Result<Ino, String> {
        let mut nodes = self.inner.write().unwrap();
        ensure_dirs(&mut nodes, rel.strip_suffix('/').unwrap_or(rel))
    }
}

fn view(ino: Ino, n: &Node) -> NodeView {
    match &n.data {
        NodeData::Dir { .. } => NodeView {
            ino,
            parent: n.parent,
            kind: Kind::Dir,
            file: None,
            ino_gen: n.ino_gen,
        },
        NodeData::File(f) => NodeView {
            ino,
            parent: n.parent,
            kind: Kind::File,
            file: Some(f.clone()),
            ino_gen: n.ino_gen,
        },
    }
}

/// See [`InodeTable::remember`].
fn remember_in(nodes: &Nodes, ino: Ino, ino_gen: u64) -> bool {
    match nodes.live(ino) {
        Some(n) if n.ino_gen == ino_gen => {
            if n.lookups.fetch_add(1, Ordering::Relaxed) == 0 {
                nodes.propagate(ino, 1);
            }
            true
        }
        _ => false,
    }
}

/// A bulk load running (see [`InodeTable::loading`]).
pub struct LoadGuard<'a>(&'a InodeTable);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.0.loads.fetch_sub(1, Ordering::SeqCst);
    }
}

fn add_child(nodes: &mut Nodes, parent: Ino, name: &str, data: NodeData) -> Ino {
    let name: Arc<str> = Arc::from(name);
    let mut node = Node {
        parent,
        name: name.clone(),
        data,
        lookups: AtomicU64::new(0),
        held: AtomicI64::new(0),
        ino_gen: 0,
    };
    let ino = match nodes.free.pop() {
        Some(ino) => {
            // A new generation: the kernel may have held this number before, for another node.
            node.ino_gen = nodes.v[ino as usize].ino_gen + 1;
            nodes.v[ino as usize] = node;
            ino
        }
        None => {
            nodes.v.push(node);
            (nodes.v.len() - 1) as Ino
        }
    };
    if let NodeData::Dir { children, .. } = &mut nodes.v[parent as usize].data {
        children.insert(name, ino);
    }
    ino
}

/// Walks/creates the directories of `rel` (no trailing slash; empty = root).
fn ensure_dirs(nodes: &mut Nodes, rel: &str) -> Result<Ino, String> {
    let mut cur = ROOT;
    if rel.is_empty() {
        return Ok(cur);
    }
    // Check every component before creating any: a skipped name leaves no directories behind.
    if let Some(why) = rel.split('/').find_map(invalid_component) {
        return Err(why.to_string());
    }
    let mut end = 0;
    for comp in rel.split('/') {
        end += comp.len();
        let NodeData::Dir { children, .. } = &nodes[cur as usize].data else {
            unreachable!("cur is always a directory")
        };
        cur = match children.get(comp).copied() {
            Some(ino) if matches!(nodes[ino as usize].data, NodeData::Dir { .. }) => ino,
            Some(_) => {
                // A file of this name was listed first: the directory wins. The file node is
                // unlinked (a new inode is made so no cached handle sees its kind change).
                tracing::warn!(
                    object = ?&rel[..end],
                    "skipping object: an object and a directory share this name; the directory is shown"
                );
                let dir = nodes.new_dir();
                add_child(nodes, cur, comp, dir)
            }
            None => {
                let dir = nodes.new_dir();
                add_child(nodes, cur, comp, dir)
            }
        };
        end += 1;
    }
    Ok(cur)
}

/// An unused slot (parent 0, which no live node has) whose last node had generation `ino_gen`.
fn free_node(ino_gen: u64) -> Node {
    Node {
        parent: 0,
        name: Arc::from(""),
        data: NodeData::File(FileInfo {
            size: 0,
            mtime: SystemTime::UNIX_EPOCH,
            generation: 0,
            crc32c: None,
        }),
        lookups: AtomicU64::new(0),
        held: AtomicI64::new(0),
        ino_gen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64) -> FileInfo {
        FileInfo {
            size,
            mtime: SystemTime::UNIX_EPOCH,
            generation: 1,
            crc32c: None,
        }
    }

    #[test]
    fn next_files_walk_key_order_with_the_same_extension() {
        let t = InodeTable::new(None);
        let names = [
            "files/p10/p1/s1.txt",
            "files/p10/p1/s1/a.dcm",
            "files/p10/p1/s1/b.dcm",
            "files/p10/p1/s2.txt",
            "files/p10/p1/s2/c.dcm",
            "files/p10/p2/s3/d.dcm",
            "files/p10/p2/s3/e.jpg",
            "files/p11/p3/s4/f.dcm",
            "files/p11/p3/s5/",
            "files/p11/p3/s6/g.dcm",
            "z.dcm",
        ];
        let ino: std::collections::HashMap<&str, Ino> = names
            .iter()
            .map(|n| (*n, t.insert_object(n, info(1)).unwrap()))
            .collect();
        let rel = |v: Vec<Ino>| v.iter().map(|&i| t.rel_path(i)).collect::<Vec<_>>();
        assert_eq!(
            rel(t.next_files(ino["files/p10/p1/s1/a.dcm"], 10)),
            [
                "files/p10/p1/s1/b.dcm",
                "files/p10/p1/s2/c.dcm",
                "files/p10/p2/s3/d.dcm",
                "files/p11/p3/s4/f.dcm",
                "files/p11/p3/s6/g.dcm",
                "z.dcm"
            ]
        );
        assert_eq!(
            rel(t.next_files(ino["files/p10/p1/s2/c.dcm"], 2)),
            ["files/p10/p2/s3/d.dcm", "files/p11/p3/s4/f.dcm"]
        );
        assert_eq!(
            rel(t.next_files(ino["files/p10/p1/s1.txt"], 5)),
            ["files/p10/p1/s2.txt"]
        );
        assert!(t.next_files(ino["z.dcm"], 5).is_empty());
        assert!(t.next_files(ino["files/p10/p2/s3/e.jpg"], 5).is_empty());
        let files = t.find_dir("files").unwrap();
        assert!(
            t.next_files(files, 5).is_empty(),
            "a directory has no next file"
        );
        // The walk is bounded: 64 nodes per file asked for.
        let t = InodeTable::new(None);
        let first = t.insert_object("a/0.dcm", info(1)).unwrap();
        for i in 0..200 {
            t.insert_dir(&format!("a/e{i:03}/")).unwrap();
        }
        t.insert_object("a/z.dcm", info(1)).unwrap();
        assert!(t.next_files(first, 1).is_empty());
        assert_eq!(t.next_files(first, 4).len(), 1);
    }

    #[test]
    fn flat_names_build_a_tree() {
        let t = InodeTable::new(None);
        let f = t.insert_object("files/p10/p1000/s5.txt", info(3)).unwrap();
        t.insert_object("files/p10/p1000/s5/a.dcm", info(9))
            .unwrap();
        t.insert_object("LICENSE.txt", info(1)).unwrap();
        assert_eq!(t.rel_path(f), "files/p10/p1000/s5.txt");
        let Lookup::Found(files) = t.lookup(ROOT, "files") else {
            panic!()
        };
        assert_eq!(files.kind, Kind::Dir);
        assert_eq!(t.rel_path(files.ino), "files/");
        let names: Vec<_> = t
            .children(ROOT)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(names, ["LICENSE.txt", "files"]);
        assert!(matches!(t.lookup(ROOT, "nope"), Lookup::Unknown));
        t.mark_listed(ROOT);
        assert!(matches!(t.lookup(ROOT, "nope"), Lookup::Absent));
        assert!(matches!(t.lookup(f, "x"), Lookup::NotDir));
    }

    #[test]
    fn placeholders_and_conflicts() {
        let t = InodeTable::new(None);
        let d = t.insert_object("d/", info(0)).unwrap();
        assert_eq!(t.get(d).unwrap().kind, Kind::Dir);
        // file x then dir x/: directory wins
        t.insert_object("x", info(1)).unwrap();
        t.insert_object("x/y", info(1)).unwrap();
        let Lookup::Found(x) = t.lookup(ROOT, "x") else {
            panic!()
        };
        assert_eq!(x.kind, Kind::Dir);
        // dir first, then file: file skipped
        assert!(t.insert_object("x", info(1)).is_err());
        for bad in ["a//b", "./x", "../x", "a/./b", "a/../b", &"n".repeat(256)] {
            assert!(t.insert_object(bad, info(1)).is_err(), "{bad}");
        }
        assert!(t.insert_object(&"n".repeat(255), info(1)).is_ok());
    }

    #[test]
    fn subtree_listing_export_and_ttl() {
        let t = InodeTable::new(None);
        t.insert_object("a/b/c", info(1)).unwrap();
        t.insert_object("a/d", info(2)).unwrap();
        t.insert_dir("e/").unwrap();
        let a = t.find_dir("a").unwrap();
        t.mark_subtree_listed(a);
        assert!(t.is_listed(a) && t.is_listed(t.find_dir("a/b/").unwrap()));
        assert!(!t.is_listed(ROOT));
        let names: Vec<_> = t
            .export()
            .into_iter()
            .map(|(n, f)| (n, f.is_some()))
            .collect();
        assert_eq!(
            names,
            [
                ("a".to_string(), false),
                ("a/b".to_string(), false),
                ("a/b/c".to_string(), true),
                ("a/d".to_string(), true),
                ("e".to_string(), false)
            ]
        );
        let short = InodeTable::new(Some(Duration::from_millis(1)));
        short.mark_listed(ROOT);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!short.is_listed(ROOT));
    }

    #[test]
    fn relisting_updates_in_place() {
        let t = InodeTable::new(None);
        let a = t.insert_object("a", info(1)).unwrap();
        let b = t.insert_object("a", info(5)).unwrap();
        assert_eq!(a, b);
        assert_eq!(t.get(a).unwrap().file.unwrap().size, 5);
    }

    impl InodeTable {
        /// Lists `dir` on its own as `ensure_listed` does: `names` (relative to the root) are
        /// what the listing returns, its direct children are what it saw present.
        fn list_lazily(&self, dir: Ino, names: &[&str]) -> bool {
            let e = self.listing_epoch(dir);
            self.fill(dir, e, names)
        }

        fn fill(&self, dir: Ino, epoch: u64, names: &[&str]) -> bool {
            let base = self.rel_path(dir);
            let mut present = std::collections::HashSet::new();
            for n in names {
                let rest = n.strip_prefix(base.as_str()).unwrap();
                match rest.split_once('/') {
                    Some((d, _)) => {
                        self.insert_dir(&format!("{base}{d}")).unwrap();
                        present.insert(d);
                    }
                    None => {
                        self.insert_object(n, info(1)).unwrap();
                        present.insert(rest);
                    }
                }
            }
            self.finish_listing(dir, epoch, &present)
        }

        fn found(&self, dir: Ino, name: &str) -> NodeView {
            match self.lookup(dir, name) {
                Lookup::Found(v) => v,
                other => panic!("{name}: {other:?}"),
            }
        }

        /// A lookup answer handed to the kernel.
        fn hand(&self, dir: Ino, name: &str) -> NodeView {
            let v = self.found(dir, name);
            assert!(self.remember(v.ino, v.ino_gen));
            v
        }
    }

    /// A directory listed on its own that the kernel forgot, with nothing below it held,
    /// drops its children (it stays, not listed, and is listed again when used); a held child
    /// keeps them; the freed slots are reused with a new generation, so a reply never hands
    /// the kernel an old number for a new node under the generation it held.
    #[test]
    fn forgotten_lazy_directories_drop_their_children() {
        let t = InodeTable::new(None);
        assert!(t.list_lazily(ROOT, &["d/x", "e"]));
        let d = t.hand(ROOT, "d");
        assert!(t.list_lazily(d.ino, &["d/x", "d/y", "d/sub/z"]));
        let sub = t.found(d.ino, "sub");
        assert!(t.list_lazily(sub.ino, &["d/sub/z"]));
        let before = t.len();
        let x = t.hand(d.ino, "x");
        assert_eq!(t.forget(d.ino, 1), 0, "x is still held");
        assert!(t.is_listed(d.ino));
        assert_eq!(t.lookups(d.ino), 0);
        // The last reference below d goes: d's children go with it.
        assert_eq!(t.forget(x.ino, 1), 4, "x, y, sub, sub/z");
        assert_eq!(t.len(), before - 4);
        assert_eq!(t.dropped(), 4);
        assert!(!t.is_listed(d.ino));
        assert!(matches!(t.lookup(d.ino, "x"), Lookup::Unknown));
        assert!(t.get(x.ino).is_none() && t.get(sub.ino).is_none());
        assert!(!t.remember(x.ino, x.ino_gen), "a freed slot is no node");
        // d itself is kept by its listed parent, with its number and generation.
        assert_eq!(t.found(ROOT, "d").ino, d.ino);
        assert_eq!(t.get(d.ino).unwrap().ino_gen, 0);
        // Listed again: the table grows back into the freed slots, under new generations.
        assert!(t.list_lazily(d.ino, &["d/x", "d/y", "d/sub/z"]));
        assert!(t.list_lazily(t.found(d.ino, "sub").ino, &["d/sub/z"]));
        assert_eq!(t.len(), before);
        let x2 = t.found(d.ino, "x");
        assert!(x2.ino_gen > 0, "a reused slot has a new generation");
        assert!(!t.remember(x2.ino, 0), "the old generation names no node");
        // Forgetting more than was handed, or the root, drops nothing.
        assert_eq!(t.forget(x2.ino, 5), 0);
        assert_eq!(t.forget(ROOT, 1), 0);
        assert_eq!(t.len(), before);
    }

    /// The epoch rule: a listing that began before the directory's children were dropped
    /// (or before its slot was freed and reused) neither prunes nor marks it complete; one
    /// that begins after does.
    #[test]
    fn a_listing_begun_before_a_drop_does_not_complete() {
        let t = InodeTable::new(None);
        assert!(t.list_lazily(ROOT, &["d/x"]));
        let d = t.hand(ROOT, "d");
        assert!(t.list_lazily(d.ino, &["d/x", "d/y"]));
        // A second listing of d begins and has seen `x` when the kernel forgets d.
        let begun = t.listing_epoch(d.ino);
        t.insert_object("d/x", info(1)).unwrap();
        assert_eq!(t.forget(d.ino, 1), 2);
        t.insert_object("d/w", info(1)).unwrap();
        assert!(
            !t.finish_listing(d.ino, begun, &["x", "w"].into_iter().collect()),
            "begun before the drop"
        );
        assert!(!t.is_listed(d.ino));
        assert!(
            matches!(t.lookup(d.ino, "y"), Lookup::Unknown),
            "y not absent"
        );
        // A listing begun now completes.
        assert!(t.list_lazily(d.ino, &["d/x", "d/y"]));
        assert!(t.is_listed(d.ino));
        assert!(matches!(t.lookup(d.ino, "w"), Lookup::Absent));
        // A directory whose slot was freed and reused: the old listing names the slot, whose
        // epoch is another's now.
        let sub_listing = {
            assert!(t.list_lazily(d.ino, &["d/x", "d/y", "d/s/z"]));
            let s = t.found(d.ino, "s");
            (s.ino, t.listing_epoch(s.ino))
        };
        assert!(t.remember(d.ino, d.ino_gen));
        assert_eq!(t.forget(d.ino, 1), 3, "x, y, s");
        // Three directories take the three freed slots, s's among them.
        assert!(t.list_lazily(d.ino, &["d/q1/r", "d/q2/r", "d/q3/r"]));
        let q = t.get(sub_listing.0).unwrap();
        assert_eq!((q.kind, q.parent), (Kind::Dir, d.ino), "s's slot reused");
        assert!(!t.finish_listing(q.ino, sub_listing.1, &Default::default()));
        assert!(!t.is_listed(q.ino));
        assert_ne!(t.listing_epoch(q.ino), sub_listing.1);
    }

    /// Nothing is dropped while a bulk load runs, nor in a tree a bulk load or the snapshot
    /// listed (kept), nor in a lazily listed directory holding such a tree.
    #[test]
    fn loads_and_kept_trees_drop_nothing() {
        let t = InodeTable::new(None);
        assert!(t.list_lazily(ROOT, &["lazy/a", "bulk/b", "mixed/m"]));
        let lazy = t.hand(ROOT, "lazy");
        assert!(t.list_lazily(lazy.ino, &["lazy/a", "lazy/b"]));
        {
            let _load = t.loading();
            assert_eq!(t.forget(lazy.ino, 1), 0, "a load runs");
        }
        assert!(t.is_listed(lazy.ino));
        let bulk = t.hand(ROOT, "bulk");
        t.insert_object("bulk/b/c", info(1)).unwrap();
        t.mark_subtree_listed(bulk.ino);
        assert_eq!(t.forget(bulk.ino, 1), 0, "listed in bulk");
        let mixed = t.hand(ROOT, "mixed");
        assert!(t.list_lazily(mixed.ino, &["mixed/m", "mixed/k/f"]));
        t.mark_listed(t.found(mixed.ino, "k").ino);
        assert_eq!(
            t.forget(mixed.ino, 1),
            0,
            "holds a directory listed in bulk"
        );
        assert!(t.is_listed(mixed.ino));
        // Once the load is over, the lazy directory goes when the kernel forgets it again.
        assert!(t.remember(lazy.ino, lazy.ino_gen));
        assert_eq!(t.forget(lazy.ino, 1), 2);
    }
}
