//! physiofs: PhysioNet's MIMIC-CXR buckets on Google Cloud Storage as a read-only local tree.
//!
//! The layers, from the kernel down: [`fuse`] (thin adapter) → [`fs`] (metadata core: the
//! tree from listings, [`inode`], [`snapshot`]) → [`read`] (the read path: handles, fetch
//! planning, read-ahead, verification, the memory and disk tiers) → [`client`] (the only
//! network access). [`cli`] declares the arguments, [`units`] parses their values, [`plan`]
//! resolves a mount from them (for `mount`, the mount(8) [`helper`] and [`demo`] alike),
//! [`checks`] are its start-up checks as data, and [`mount`] wires it all.

pub mod checks;
pub mod cli;
pub mod client;
pub mod crc;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod helper;
pub mod inode;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod mount;
pub mod plan;
pub mod read;
pub mod session;
pub mod snapshot;
pub mod spin;
pub mod stale;
pub mod testbed;
pub mod units;
pub mod warm;

/// The block cache, where it was before the read path had its own module.
pub use read::cache;
