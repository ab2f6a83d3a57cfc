//! physiofs: PhysioNet's MIMIC-CXR buckets on Google Cloud Storage as a read-only local tree.
//!
//! The layers, from the kernel down: [`fuse`] (thin adapter) → [`fs`] (metadata core: the
//! tree from listings, [`inode`], [`snapshot`]) → [`read`] (the read path: handles, fetch
//! planning, read-ahead, verification, the block cache) → [`client`] (the only network
//! access). [`mount`] wires them together for the CLI.

pub mod cli;
pub mod client;
pub mod daemon;
pub mod demo;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod helper;
pub mod inode;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod mount;
pub mod read;
pub mod session;
pub mod snapshot;
pub mod testbed;

/// The block cache, where it was before the read path had its own module.
pub use read::cache;
