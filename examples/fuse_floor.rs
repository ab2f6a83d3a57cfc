//! The floor of a FUSE tree walk on this machine: a filesystem that does no work at all.
//!
//! It mounts a synthetic tree with MIMIC-CXR's shape (10 `pNN` directories, 65,379 patients,
//! 227,835 study directories each with a report beside it, 377,110 images; ~293,000
//! directories) precomputed in memory, and answers every request from it at once on one FUSE
//! thread, with the same kernel options physiofs uses (READDIRPLUS, no opendir, long TTLs).
//! Whatever `find` takes on it is what the kernel's FUSE round trips cost here, before any
//! filesystem does anything: `bench/run` (metadata scenario) times it next to physiofs.
//!
//! ```sh
//! cargo run --release --example fuse_floor -- MOUNTPOINT [PATIENTS]   # until unmounted
//! ```

use std::ffi::OsStr;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags,
    KernelConfig, OpenFlags, ReplyAttr, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen,
    Request,
};

const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const STUDIES: u64 = 227_835;
const IMAGES: u64 = 377_110;
const PATIENTS: u64 = 65_379;

struct Node {
    name: String,
    dir: bool,
    children: Vec<u64>,
}

struct Floor {
    nodes: Vec<Node>,
}

impl Floor {
    /// The tree for `patients` patients, with studies and images spread over them in
    /// MIMIC-CXR's proportions. Inode n is `nodes[n - 1]`.
    fn new(patients: u64) -> Floor {
        let studies = STUDIES * patients / PATIENTS;
        let images = IMAGES * patients / PATIENTS;
        let mut nodes = vec![Node {
            name: String::new(),
            dir: true,
            children: Vec::new(),
        }];
        let add = |nodes: &mut Vec<Node>, parent: u64, name: String, dir: bool| -> u64 {
            nodes.push(Node {
                name,
                dir,
                children: Vec::new(),
            });
            let ino = nodes.len() as u64;
            nodes[parent as usize - 1].children.push(ino);
            ino
        };
        let files = add(&mut nodes, 1, "files".into(), true);
        let groups: Vec<u64> = (10..20)
            .map(|g| add(&mut nodes, files, format!("p{g}"), true))
            .collect();
        let mut study = 0;
        let mut image = 0;
        for p in 0..patients {
            let subject = 10_000_000 + p * 137;
            let pdir = add(
                &mut nodes,
                groups[(p % 10) as usize],
                format!("p{subject}"),
                true,
            );
            while study < studies && study * patients / studies.max(1) <= p {
                let id = 50_000_000 + study * 41;
                add(&mut nodes, pdir, format!("s{id}.txt"), false);
                let sdir = add(&mut nodes, pdir, format!("s{id}"), true);
                while image < images && image * studies / images.max(1) <= study {
                    add(&mut nodes, sdir, format!("{image:08x}-dicom.dcm"), false);
                    image += 1;
                }
                study += 1;
            }
        }
        Floor { nodes }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let n = &self.nodes[ino as usize - 1];
        FileAttr {
            ino: INodeNo(ino),
            size: if n.dir { 0 } else { 13_000_000 },
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if n.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if n.dir { 0o555 } else { 0o444 },
            nlink: if n.dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn get(&self, ino: INodeNo) -> Option<&Node> {
        self.nodes.get((ino.0 as usize).checked_sub(1)?)
    }
}

impl Filesystem for Floor {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.get(parent).and_then(|p| {
            p.children
                .iter()
                .copied()
                .find(|&c| OsStr::new(&self.nodes[c as usize - 1].name) == name)
        });
        match found {
            Some(c) => reply.entry(&TTL, &self.attr(c), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.get(ino) {
            Some(_) => reply.attr(&TTL, &self.attr(ino.0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // ENOSYS: the kernel stops sending opendir/releasedir (FUSE_NO_OPENDIR_SUPPORT).
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.get(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, &c) in n.children.iter().enumerate().skip(offset as usize) {
            let kind = if self.nodes[c as usize - 1].dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(
                INodeNo(c),
                (i + 1) as u64,
                kind,
                &self.nodes[c as usize - 1].name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(n) = self.get(ino) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, &c) in n.children.iter().enumerate().skip(offset as usize) {
            let name = &self.nodes[c as usize - 1].name;
            if reply.add(
                INodeNo(c),
                (i + 1) as u64,
                name,
                &TTL,
                &self.attr(c),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(mountpoint) = args.next() else {
        eprintln!("usage: fuse_floor MOUNTPOINT [PATIENTS]");
        std::process::exit(2);
    };
    let patients = args
        .next()
        .map(|p| p.parse().expect("PATIENTS is a number"))
        .unwrap_or(PATIENTS);
    let fs = Floor::new(patients);
    let files = fs.nodes.iter().filter(|n| !n.dir).count();
    eprintln!(
        "fuse_floor: {} directories, {files} files; mounting at {mountpoint}",
        fs.nodes.len() - files
    );
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("fuse_floor".into()),
        fuser::MountOption::RO,
        fuser::MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(1);
    fuser::Session::new(fs, &mountpoint, &config)?.run()
}
