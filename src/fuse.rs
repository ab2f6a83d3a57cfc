//! The thin adapter between the kernel (fuser) and the async core.
//!
//! Each request is copied into owned values and handed to a tokio task that answers the reply
//! object itself, so the FUSE thread goes straight back to reading the next request and no
//! kernel thread ever waits on the network. Answers that need no I/O (getattr, and lookup and
//! readdir in listed directories: all of them once the metadata is loaded) are given inline on
//! the FUSE thread, with no task and no copy of the directory: a `find` over MIMIC-CXR is
//! ~590,000 readdir round trips, and a task hop each costs more than the answer.
//! Every write-type operation answers EROFS.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, DirEntry, EntryRef, Fs, FsError};
use crate::inode::Kind;

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    /// The kernel skips opendir/releasedir (FUSE_NO_OPENDIR_SUPPORT): readdir comes with no
    /// handle and is answered from the inode table by offset. Saves two requests per directory.
    no_opendir: bool,
    /// Backing files handed to the kernel for passthrough, per inode, with the number of
    /// handles using each: one backing id per inode while any of its handles is open (the
    /// kernel reads through it; dropping it closes it).
    backing: std::sync::Arc<BackingMap>,
    /// `--spin-us`: told of every request, keeps a CPU awake while they keep coming.
    spin: Option<Arc<crate::spin::Spinner>>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Fs>, rt: tokio::runtime::Handle) -> Self {
        let ttl = fs.config().attr_ttl;
        FuseAdapter {
            fs,
            rt,
            ttl,
            no_opendir: false,
            backing: Default::default(),
            spin: None,
        }
    }

    /// Spins a CPU while requests come less than `spin` apart (see [`crate::spin`]).
    pub fn with_spin(mut self, spin: Option<Arc<crate::spin::Spinner>>) -> Self {
        self.spin = spin;
        self
    }

    #[inline]
    fn touch(&self) {
        if let Some(s) = &self.spin {
            s.touch();
        }
    }
}

type BackingMap =
    std::sync::Mutex<std::collections::HashMap<u64, (std::sync::Arc<fuser::BackingId>, u32)>>;

/// Answers an open: with passthrough through the inode's backing id (made from this open's
/// file if the inode has none yet), or served by us. A kernel that refuses the backing file
/// (no CAP_SYS_ADMIN: a non-root mount) turns passthrough off for the mount, and this open
/// is served by us.
fn reply_open(fs: &Fs, backing: &BackingMap, ino: u64, o: crate::read::Opened, reply: ReplyOpen) {
    if let crate::read::Via::Passthrough(file) = o.via {
        let mut map = backing.lock().unwrap();
        let id = match (map.get_mut(&ino), file) {
            (Some((id, n)), _) => {
                *n += 1;
                Some(id.clone())
            }
            // The inode's other passthrough handles closed meanwhile and the cache has no
            // verified file for it now: served by us (no passthrough handle is left to clash).
            (None, None) => {
                fs.reader().demote(o.fh);
                None
            }
            (None, Some(file)) => match reply.open_backing(&file) {
                Ok(id) => {
                    let id = std::sync::Arc::new(id);
                    map.insert(ino, (id.clone(), 1));
                    Some(id)
                }
                Err(e) => {
                    tracing::info!(
                        "kernel refused a passthrough backing file ({e}): cached files are \
                         served by physiofs (passthrough needs a root mount on Linux 6.9+)"
                    );
                    fs.reader().disable_passthrough();
                    fs.reader().demote(o.fh);
                    None
                }
            },
        };
        if let Some(id) = id {
            reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), &id);
            return;
        }
    }
    let flags = if fs.keep_cache(ino) {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    };
    reply.opened(FileHandle(o.fh), flags);
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

fn to_fuse(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Attributes for a negative entry whose parent vanished (never expected).
fn unreachable_attr() -> Attr {
    Attr {
        ino: 0,
        kind: Kind::File,
        size: 0,
        mtime: std::time::UNIX_EPOCH,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        blksize: 4096,
        ino_gen: 0,
    }
}

/// Answers a lookup. A name missing from a completely listed directory is answered with
/// inode 0, which the kernel caches as a negative entry for the TTL (Python's import machinery
/// and loaders probe many names that do not exist).
fn reply_lookup(
    fs: &Fs,
    ttl: &Duration,
    parent: INodeNo,
    r: Result<Attr, FsError>,
    reply: ReplyEntry,
) {
    match r {
        // The kernel holds the entry until it forgets it: counted before it is sent.
        Ok(a) if fs.inodes().remember(a.ino, a.ino_gen) => {
            reply.entry(ttl, &to_fuse(&a), Generation(a.ino_gen))
        }
        Ok(a) => {
            tracing::warn!(
                ino = a.ino,
                "lookup found an inode dropped meanwhile; ESTALE"
            );
            reply.error(Errno::ESTALE)
        }
        Err(FsError::NotFound) if fs.inodes().is_listed(parent.0) => {
            let mut attr = to_fuse(&fs.getattr(parent.0).unwrap_or_else(|_| unreachable_attr()));
            attr.ino = INodeNo(0);
            reply.entry(ttl, &attr, Generation(0))
        }
        Err(e) => reply.error(errno(&e)),
    }
}

/// What `readdir` and `readdirplus` have in common: entries come from the inode table by
/// offset (no-opendir mode, answered on the FUSE thread when the directory is listed), or from
/// an open handle's snapshot; `add(next_offset, entry)` returns true when the reply is full.
/// Each entry a readdirplus reply hands over is a lookup the kernel forgets later: it goes on
/// `given` (inode, generation), counted in the inode table before the reply is sent (not
/// while the entries are filled: that holds the table's lock).
trait DirReply: Send + 'static {
    fn add(&mut self, next: u64, e: EntryRef<'_>, ttl: &Duration, given: &mut Given) -> bool;
    fn ok(self);
    fn error(self, e: Errno);
}

type Given = Vec<(u64, u64)>;

impl DirReply for ReplyDirectory {
    fn add(&mut self, next: u64, e: EntryRef<'_>, _ttl: &Duration, _: &mut Given) -> bool {
        ReplyDirectory::add(self, INodeNo(e.ino), next, file_type(e.kind), e.name)
    }
    fn ok(self) {
        ReplyDirectory::ok(self)
    }
    fn error(self, e: Errno) {
        ReplyDirectory::error(self, e)
    }
}

impl DirReply for ReplyDirectoryPlus {
    fn add(&mut self, next: u64, e: EntryRef<'_>, ttl: &Duration, given: &mut Given) -> bool {
        let full = ReplyDirectoryPlus::add(
            self,
            INodeNo(e.ino),
            next,
            e.name,
            ttl,
            &to_fuse(&e.attr),
            Generation(e.attr.ino_gen),
        );
        // The kernel takes no reference for `.` and `..`.
        if !full && e.name != "." && e.name != ".." {
            given.push((e.ino, e.attr.ino_gen));
        }
        full
    }
    fn ok(self) {
        ReplyDirectoryPlus::ok(self)
    }
    fn error(self, e: Errno) {
        ReplyDirectoryPlus::error(self, e)
    }
}

fn fill_from(
    entries: &[DirEntry],
    offset: u64,
    ttl: &Duration,
    given: &mut Given,
    reply: &mut impl DirReply,
) {
    for (i, e) in entries.iter().enumerate().skip(offset as usize) {
        let r = EntryRef {
            ino: e.ino,
            kind: e.kind,
            name: &e.name,
            attr: e.attr.clone(),
        };
        if reply.add((i + 1) as u64, r, ttl, given) {
            break;
        }
    }
}

impl FuseAdapter {
    fn readdir_any(&self, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: impl DirReply) {
        let ttl = self.ttl;
        let mut given = Given::new();
        if !self.no_opendir || fh.0 != 0 {
            return match self.fs.readdir(fh.0) {
                Ok(entries) => {
                    fill_from(&entries, offset, &ttl, &mut given, &mut reply);
                    reply_entries(&self.fs, &given, reply)
                }
                Err(e) => reply.error(errno(&e)),
            };
        }
        if self
            .fs
            .entries_from(ino.0, offset, |next, e| {
                reply.add(next, e, &ttl, &mut given)
            })
            .is_some()
        {
            return reply_entries(&self.fs, &given, reply);
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.entries(ino.0).await {
                Ok(entries) => {
                    fs.entries_from_copy(ino.0, &entries, offset, |next, e| {
                        reply.add(next, e, &ttl, &mut given)
                    });
                    reply_entries(&fs, &given, reply)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }
}

/// Sends a filled readdir reply, once the entries it hands the kernel are counted.
fn reply_entries(fs: &Fs, given: &Given, reply: impl DirReply) {
    let stale = fs.inodes().remember_all(given);
    if stale == 0 {
        return reply.ok();
    }
    tracing::warn!(stale, "readdirplus entries dropped meanwhile; ESTALE");
    reply.error(Errno::ESTALE)
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Let the kernel read ahead in big steps and keep many reads in flight; it only helps.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // One round trip returns names and attributes for `ls -l`.
        if config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS)
            .is_err()
        {
            tracing::debug!("kernel lacks READDIRPLUS");
        }
        // Complete objects of the disk tier are read by the kernel from their backing file.
        if self.fs.reader().passthrough() {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok();
            if !ok {
                tracing::info!(
                    "kernel lacks FUSE passthrough: cached files are served by physiofs"
                );
                self.fs.reader().disable_passthrough();
            }
        }
        // Lookups and readdirs in one directory may run at once.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        if config
            .capabilities()
            .contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            && config
                .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
                .is_ok()
        {
            self.no_opendir = true;
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(s) = &self.spin {
            s.stop();
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.touch();
        let Some(name) = name.to_str() else {
            // Object names are UTF-8; a non-UTF-8 name cannot exist in the bucket.
            reply.error(Errno::ENOENT);
            return;
        };
        // Answered on the FUSE thread when the table knows; a task only when it takes a request.
        if let Some(r) = self.fs.lookup_cached(parent.0, name) {
            return reply_lookup(&self.fs, &self.ttl, parent, r, reply);
        }
        let (fs, ttl, name) = (self.fs.clone(), self.ttl, name.to_owned());
        self.rt.spawn(async move {
            let r = fs.lookup(parent.0, &name).await;
            reply_lookup(&fs, &ttl, parent, r, reply)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.touch();
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &to_fuse(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.touch();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY
            || flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0;
        if self.fs.reader().passthrough() {
            // May read the cached file back whole to check it: not on the FUSE thread.
            let (fs, backing) = (self.fs.clone(), self.backing.clone());
            self.rt.spawn(async move {
                match fs.open_for_kernel(ino.0, write).await {
                    Ok(o) => reply_open(&fs, &backing, ino.0, o, reply),
                    Err(e) => reply.error(errno(&e)),
                }
            });
            return;
        }
        match self.fs.open(ino.0, write) {
            // Objects are immutable per generation: keep the page cache across opens (unless
            // bytes of this file failed their checksum: then this open drops the kernel's copy).
            Ok(fh) if self.fs.keep_cache(ino.0) => {
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.touch();
        let fs = self.fs.clone();
        // A buffered read lands in the kernel's page cache; an O_DIRECT one does not.
        let buffered = flags.0 & libc::O_DIRECT == 0;
        self.rt.spawn(async move {
            match fs.read_for_kernel(fh.0, offset, size, buffered).await {
                Ok((data, served)) => {
                    reply.data(&data);
                    if buffered {
                        fs.served(served).await;
                    }
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.touch();
        // A header scan's close may start fetches of the next files' headers.
        let _rt = self.rt.enter();
        if self.fs.release(fh.0) == Some(crate::read::OpenMode::Passthrough) {
            let mut backing = self.backing.lock().unwrap();
            if let Some((_, n)) = backing.get_mut(&ino.0) {
                *n -= 1;
                if *n == 0 {
                    backing.remove(&ino.0);
                }
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.touch();
        // Nothing is ever written, so there is nothing to flush.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.touch();
        if self.no_opendir {
            // ENOSYS here means "never send opendir again"; readdir then arrives with fh 0.
            reply.error(Errno::ENOSYS);
            return;
        }
        if let Some(fh) = self.fs.opendir_listed(ino.0) {
            reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            );
            return;
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.touch();
        self.readdir_any(ino, fh, offset, reply);
    }

    /// fuser 0.18's `batch_forget` (whose argument type it does not export) calls this once
    /// per inode.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.inodes().forget(ino.0, nlookup);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.touch();
        self.readdir_any(ino, fh, offset, reply);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.touch();
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.touch();
        let s = self.fs.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, s.bsize, s.namelen, s.bsize);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.touch();
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else if self.fs.getattr(ino.0).is_ok() {
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    // Objects have no extended attributes. ENOSYS (not ENODATA) tells the kernel so once and
    // for all: it then answers every later getxattr/listxattr itself (EOPNOTSUPP), and
    // `ls -l`, which asks for ACLs and SELinux labels of each entry, costs no round trips
    // (~20,000 per `ls -l` of a 6,500-entry directory otherwise).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        self.touch();
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        self.touch();
        reply.error(Errno::ENOSYS);
    }

    // ---- everything that would change the bucket: EROFS ----

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}
