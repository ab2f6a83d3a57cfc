//! The object version a read is pinned to.

use std::sync::Arc;

use crate::client::ObjectVersion;

/// The object version a read is pinned to, owned: what the listing said about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// Full object name in the bucket.
    pub name: Arc<str>,
    pub generation: i64,
    pub size: u64,
    /// CRC32C of the whole object, when the listing gave one.
    pub crc32c: Option<u32>,
}

impl Object {
    pub fn version(&self) -> ObjectVersion<'_> {
        ObjectVersion {
            name: &self.name,
            generation: self.generation,
            size: self.size,
            crc32c: self.crc32c,
        }
    }

    /// The cache key of block `index` of this version.
    pub fn key(&self, index: u64) -> BlockKey {
        BlockKey {
            object: self.name.clone(),
            generation: self.generation,
            index,
        }
    }
}

/// The cache key of one block of one object version.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct BlockKey {
    pub object: Arc<str>,
    pub generation: i64,
    pub index: u64,
}
