//! Small, stable (platform- and version-independent) hashing and PRNG helpers.
//!
//! Everything the model generates is a pure function of these; never use
//! `std::hash` here (its output is not guaranteed stable across releases).

pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64 finaliser.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of two words.
#[inline]
pub fn hash2(a: u64, b: u64) -> u64 {
    mix64(a ^ mix64(b.wrapping_add(GOLDEN)))
}

/// Hash of three words.
#[inline]
pub fn hash3(a: u64, b: u64, c: u64) -> u64 {
    hash2(hash2(a, b), c)
}

/// Stable hash of a byte string under a seed.
pub fn hash_bytes(seed: u64, s: &[u8]) -> u64 {
    let mut h = mix64(seed ^ (s.len() as u64).wrapping_mul(GOLDEN));
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        h = mix64(h ^ w).wrapping_add(GOLDEN);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = mix64(h ^ u64::from_le_bytes(b)).wrapping_add(GOLDEN);
    }
    mix64(h)
}

pub fn hash_str(seed: u64, s: &str) -> u64 {
    hash_bytes(seed, s.as_bytes())
}

/// Sequential splitmix64 generator (used at construction time).
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }
    /// Uniform in [0, 1).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in [0, n) (n > 0), multiply-shift (negligible bias).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

const WY0: u64 = 0xa076_1d64_78bd_642f;
const WY1: u64 = 0xe703_7ed1_a0b4_28db;

/// Word `b` of the stream for `key` (wyrand output for counter `key + (b+1)*WY0`).
/// One 64x64->128 multiply per 8 bytes; deliberately scalar (SSE2 has no
/// 64-bit multiply, so a vectorised splitmix is slower than this).
#[inline(always)]
pub fn stream_word(key: u64, b: u64) -> u64 {
    wy(key.wrapping_add(b.wrapping_add(1).wrapping_mul(WY0)))
}

#[inline(always)]
fn wy(s: u64) -> u64 {
    let t = (s as u128).wrapping_mul((s ^ WY1) as u128);
    ((t >> 64) as u64) ^ (t as u64)
}

/// Counter-mode byte stream: byte `i` of the stream for `key` is byte `i % 8`
/// (little endian) of `stream_word(key, i / 8)`. Fills `buf` with the stream
/// bytes starting at absolute position `off`.
pub fn fill_stream(key: u64, off: u64, buf: &mut [u8]) {
    if buf.is_empty() {
        return;
    }
    let mut pos = 0usize;
    let mut block = off / 8;
    let skip = (off % 8) as usize;
    if skip != 0 {
        let w = stream_word(key, block).to_le_bytes();
        let n = (8 - skip).min(buf.len());
        buf[..n].copy_from_slice(&w[skip..skip + n]);
        pos = n;
        block += 1;
    }
    let mut chunks = buf[pos..].chunks_exact_mut(8);
    let mut s = key.wrapping_add(block.wrapping_add(1).wrapping_mul(WY0));
    for c in &mut chunks {
        c.copy_from_slice(&wy(s).to_le_bytes());
        s = s.wrapping_add(WY0);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let w = wy(s).to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&w[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_offset_consistent() {
        let mut whole = vec![0u8; 1000];
        fill_stream(42, 0, &mut whole);
        for off in 0..40usize {
            for len in [0usize, 1, 3, 7, 8, 9, 17, 100] {
                let mut b = vec![0u8; len];
                fill_stream(42, off as u64, &mut b);
                assert_eq!(&b[..], &whole[off..off + len]);
            }
        }
    }
}
