//! physiofs: PhysioNet's MIMIC-CXR buckets on Google Cloud Storage as a read-only local tree.
//!
//! The layers, from the kernel down: [`fuse`] (thin adapter) → [`fs`] (async core) →
//! [`inode`] (tree from names), [`cache`] (block cache), [`prefetch`] (read-ahead) →
//! [`client`] (the only network access). [`mount`] wires them together for the CLI.

pub mod cache;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod demo;
pub mod fs;
pub mod fuse;
pub mod helper;
pub mod inode;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod mount;
pub mod prefetch;
pub mod session;
pub mod snapshot;
pub mod stale;
pub mod testbed;
