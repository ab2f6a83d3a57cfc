//! Recycled receive buffers for full-size media requests.
//!
//! A streaming reader makes one 4 MiB request after another, and each answer lives in the
//! cache until LRU drops it. Allocating every buffer afresh costs more CPU than the copy into
//! it: a buffer that big is a fresh mmap, so each page faults, is zeroed and charged on first
//! touch, and is unmapped again on free. A buffer whose last cached block is dropped comes
//! back here instead and is reused, already mapped. Only buffers of exactly `size` bytes are
//! pooled (a smaller answer in a big buffer would hold memory the cache does not count), and
//! at most `max` wait here, so the pool adds at most `max * size` bytes of memory.

use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

pub struct BufferPool {
    size: usize,
    max: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub fn new(size: usize, max: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            size,
            max,
            free: Mutex::new(Vec::new()),
        })
    }

    /// An empty buffer with room for `want` bytes: a recycled one when `want` is the pooled
    /// size, else a new exact-size allocation.
    pub fn take(self: &Arc<Self>, want: usize) -> PoolBuf {
        let buf = if want == self.size {
            self.free.lock().unwrap().pop()
        } else {
            None
        };
        let mut buf = buf.unwrap_or_else(|| Vec::with_capacity(want));
        buf.clear();
        PoolBuf {
            buf,
            pool: if want == self.size {
                Arc::downgrade(self)
            } else {
                Weak::new()
            },
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap();
        if free.len() < self.max && buf.capacity() == self.size {
            free.push(buf);
        }
    }

    /// Buffers waiting for reuse.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap().len()
    }
}

/// A receive buffer; frozen into `Bytes` that return it to the pool when the last reference
/// (the last cached block cut from it) is dropped.
pub struct PoolBuf {
    buf: Vec<u8>,
    pool: Weak<BufferPool>,
}

impl PoolBuf {
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// A receive buffer that checksums bytes as they are appended, while they are still in the
/// CPU's cache: the CRC32C of every `block`-byte piece (counted from the buffer's start; the
/// last may be shorter). Taking it here instead of in a later pass over the finished buffer
/// saves reading every byte from memory once more.
pub struct Received {
    buf: PoolBuf,
    block: usize,
    /// CRCs of the complete pieces so far.
    crcs: Vec<u32>,
    /// CRC of the piece being filled, and its length.
    cur: u32,
    cur_len: usize,
}

impl Received {
    /// `buf` must be empty; `block` is the piece size (0 = one piece, the whole buffer).
    pub fn new(buf: PoolBuf, block: usize) -> Self {
        debug_assert!(buf.is_empty());
        Received {
            buf,
            block: if block == 0 { usize::MAX } else { block },
            crcs: Vec::new(),
            cur: 0,
            cur_len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        self.checksum(data);
    }

    /// The buffer itself, for a reader that appends to it straight from a connection (no copy
    /// on the way); [`Received::checksum_from`] must follow with the length it had before.
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf.buf
    }

    /// Checksums what was appended through [`Received::vec_mut`] since it was `start` long.
    pub fn checksum_from(&mut self, start: usize) {
        let Received {
            buf,
            block,
            crcs,
            cur,
            cur_len,
        } = self;
        checksum_into(*block, crcs, cur, cur_len, &buf.buf[start..]);
    }

    fn checksum(&mut self, data: &[u8]) {
        let (block, crcs, cur, cur_len) =
            (self.block, &mut self.crcs, &mut self.cur, &mut self.cur_len);
        checksum_into(block, crcs, cur, cur_len, data);
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.crcs.clear();
        (self.cur, self.cur_len) = (0, 0);
    }

    /// CRC32C of everything appended, from the pieces' CRCs.
    pub fn crc32c(&self) -> u32 {
        let mut crc = 0;
        for (i, c) in self.crcs.iter().enumerate() {
            let len = self.block.min(self.buf.len() - i * self.block);
            crc = crate::crc::combine(crc, *c, len);
        }
        if self.cur_len > 0 {
            crc = crate::crc::combine(crc, self.cur, self.cur_len);
        }
        crc
    }

    /// The bytes, and the CRC32C of each piece.
    pub fn finish(mut self) -> (Bytes, Vec<u32>) {
        if self.cur_len > 0 {
            self.crcs.push(self.cur);
        }
        (self.buf.freeze(), self.crcs)
    }
}

/// Takes the CRC32Cs of `data`, appended to a receive buffer: `crcs` of its complete
/// `block`-byte pieces, `cur` and `cur_len` of the piece being filled.
fn checksum_into(
    block: usize,
    crcs: &mut Vec<u32>,
    cur: &mut u32,
    cur_len: &mut usize,
    mut data: &[u8],
) {
    while !data.is_empty() {
        let n = (block - *cur_len).min(data.len());
        *cur = crate::crc::append(*cur, &data[..n]);
        *cur_len += n;
        data = &data[n..];
        if *cur_len == block {
            crcs.push(*cur);
            (*cur, *cur_len) = (0, 0);
        }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_pieces_carry_the_crc32c_of_their_bytes() {
        let pool = BufferPool::new(1024, 2);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for block in [0usize, 1, 100, 4096, 10_000, 20_000] {
            for split in [1usize, 7, 999, 4096, 10_000] {
                let mut r = Received::new(pool.take(data.len()), block);
                for part in data.chunks(split) {
                    r.extend_from_slice(part);
                }
                assert_eq!(
                    r.crc32c(),
                    crc32c::crc32c(&data),
                    "block {block} split {split}"
                );
                let (bytes, crcs) = r.finish();
                assert_eq!(&bytes[..], &data[..]);
                let step = if block == 0 { data.len() } else { block };
                let want: Vec<u32> = data.chunks(step).map(crc32c::crc32c).collect();
                assert_eq!(crcs, want, "block {block} split {split}");
            }
        }
        let mut r = Received::new(pool.take(10), 4);
        r.extend_from_slice(b"abcdef");
        r.clear();
        r.extend_from_slice(b"xyz");
        assert_eq!(r.finish().1, vec![crc32c::crc32c(b"xyz")]);
    }

    #[test]
    fn full_size_buffers_come_back_others_do_not() {
        let pool = BufferPool::new(1024, 2);
        let mut a = pool.take(1024);
        a.extend_from_slice(&[7u8; 1024]);
        let ptr = a.as_slice().as_ptr();
        let bytes = a.freeze();
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.idle(), 1);
        let b = pool.take(1024);
        assert!(b.is_empty());
        assert_eq!(b.buf.as_ptr(), ptr, "the same buffer is reused");
        let small = pool.take(100);
        drop(small);
        assert_eq!(pool.idle(), 0, "only full-size buffers are pooled");
        drop(b);
        for _ in 0..5 {
            drop(pool.take(1024));
        }
        let many: Vec<_> = (0..5).map(|_| pool.take(1024)).collect();
        drop(many);
        assert_eq!(pool.idle(), 2, "at most `max` wait");
    }
}
