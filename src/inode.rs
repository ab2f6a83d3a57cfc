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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    parent: Ino,
    name: Arc<str>,
    data: NodeData,
}

enum NodeData {
    Dir {
        children: BTreeMap<Arc<str>, Ino>,
        /// When the directory's listing was last complete (None: never).
        listed: Option<Instant>,
    },
    File(FileInfo),
}

pub struct InodeTable {
    inner: RwLock<Vec<Node>>,
    /// See [`InodeTable::visited`].
    visited: AtomicU64,
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
        let dummy = Node {
            parent: 0,
            name: Arc::from(""),
            data: NodeData::File(FileInfo {
                size: 0,
                mtime: SystemTime::UNIX_EPOCH,
                generation: 0,
                crc32c: None,
            }),
        };
        let root = Node {
            parent: ROOT,
            name: Arc::from(""),
            data: new_dir(),
        };
        InodeTable {
            inner: RwLock::new(vec![dummy, root]),
            visited: AtomicU64::new(0),
            ttl,
        }
    }

    /// Number of inodes, the root included.
    pub fn len(&self) -> usize {
        self.inner.read().unwrap().len() - 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn get(&self, ino: Ino) -> Option<NodeView> {
        let nodes = self.inner.read().unwrap();
        if ino == 0 {
            return None;
        }
        nodes.get(ino as usize).map(|n| view(ino, n))
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Lookup {
        let nodes = self.inner.read().unwrap();
        match nodes.get(parent as usize).map(|n| &n.data) {
            Some(NodeData::Dir { children, listed }) => match children.get(name) {
                Some(&ino) => Lookup::Found(view(ino, &nodes[ino as usize])),
                None if fresh(listed, self.ttl) => Lookup::Absent,
                None => Lookup::Unknown,
            },
            _ => Lookup::NotDir,
        }
    }

    pub fn is_listed(&self, dir: Ino) -> bool {
        match self
            .inner
            .read()
            .unwrap()
            .get(dir as usize)
            .map(|n| &n.data)
        {
            Some(NodeData::Dir { listed, .. }) => fresh(listed, self.ttl),
            _ => false,
        }
    }

    pub fn mark_listed(&self, dir: Ino) {
        if let Some(NodeData::Dir { listed, .. }) = self
            .inner
            .write()
            .unwrap()
            .get_mut(dir as usize)
            .map(|n| &mut n.data)
        {
            *listed = Some(Instant::now());
        }
    }

    /// Marks `dir` and every directory below it as completely listed (after a flat listing
    /// of the whole sub-tree).
    pub fn mark_subtree_listed(&self, dir: Ino) {
        let now = Instant::now();
        let mut nodes = self.inner.write().unwrap();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            if let Some(NodeData::Dir { children, listed }) =
                nodes.get_mut(d as usize).map(|n| &mut n.data)
            {
                *listed = Some(now);
                stack.extend(children.values().copied());
            }
        }
    }

    /// Removes children of `dir` whose names are not in `present` (after a fresh listing
    /// shows they are gone). Their inodes stay allocated, so open handles stay valid.
    pub fn prune_children(&self, dir: Ino, present: &std::collections::HashSet<&str>) {
        if let Some(NodeData::Dir { children, .. }) = self
            .inner
            .write()
            .unwrap()
            .get_mut(dir as usize)
            .map(|n| &mut n.data)
        {
            children.retain(|name, _| present.contains(&**name));
        }
    }

    /// Some file in the table, if any (used to prove access without a listing).
    pub fn any_file(&self) -> Option<Ino> {
        let nodes = self.inner.read().unwrap();
        (2..nodes.len())
            .find(|&i| matches!(nodes[i].data, NodeData::File(_)))
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
        match &nodes.get(dir as usize)?.data {
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
        let NodeData::Dir { children, .. } = &nodes.get(dir as usize)?.data else {
            return None;
        };
        let from = match after {
            None => children.range::<str, _>((Unbounded, Unbounded)),
            Some(a) => match nodes.get(a as usize) {
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
        let n = nodes.get(child as usize)?;
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
        let Some(node) = nodes.get(ino as usize) else {
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
        },
        NodeData::File(f) => NodeView {
            ino,
            parent: n.parent,
            kind: Kind::File,
            file: Some(f.clone()),
        },
    }
}

fn add_child(nodes: &mut Vec<Node>, parent: Ino, name: &str, data: NodeData) -> Ino {
    let ino = nodes.len() as Ino;
    let name: Arc<str> = Arc::from(name);
    nodes.push(Node {
        parent,
        name: name.clone(),
        data,
    });
    if let NodeData::Dir { children, .. } = &mut nodes[parent as usize].data {
        children.insert(name, ino);
    }
    ino
}

/// Walks/creates the directories of `rel` (no trailing slash; empty = root).
fn ensure_dirs(nodes: &mut Vec<Node>, rel: &str) -> Result<Ino, String> {
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
                add_child(nodes, cur, comp, new_dir())
            }
            None => add_child(nodes, cur, comp, new_dir()),
        };
        end += 1;
    }
    Ok(cur)
}

fn new_dir() -> NodeData {
    NodeData::Dir {
        children: BTreeMap::new(),
        listed: None,
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
}
