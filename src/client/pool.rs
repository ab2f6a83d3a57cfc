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
