//! End-to-end CRC32C check of a file read in pieces.
//!
//! GCS gives one checksum per object, none per range, so a big object read with ranged GETs
//! cannot be checked piece by piece. What can be checked is the whole: every handle feeds the
//! bytes it served, and once they cover the object their CRC32C (combined from the pieces, in
//! any order the kernel asked for them) must equal the listed one. On a mismatch the read
//! that completed the coverage fails with EIO, so a program that reads a file to its end
//! either saw the object's exact bytes or got an error.

use std::collections::BTreeMap;

/// What feeding a piece concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not everything has been seen yet.
    Pending,
    /// Every byte was seen and the CRC32C matches.
    Verified,
    /// Every byte was seen and the CRC32C is this, not the listed one.
    Mismatch(u32),
    /// The pieces overlapped in a way that cannot be combined, or too many arrived out of
    /// order: this handle stops checking (nothing is claimed either way).
    GaveUp,
}

pub struct Verifier {
    want: u32,
    size: u64,
    /// `[0, next)` has been seen; `crc` is its CRC32C.
    next: u64,
    crc: u32,
    /// Pieces seen beyond `next`: start -> (end, crc of the piece).
    ahead: BTreeMap<u64, (u64, u32)>,
    done: Option<Verdict>,
}

/// Out-of-order pieces remembered per handle before giving up (kernel read-ahead reorders a
/// few requests, a random reader would need unbounded memory).
const MAX_AHEAD: usize = 512;

impl Verifier {
    pub fn new(want: u32, size: u64) -> Self {
        Verifier {
            want,
            size,
            next: 0,
            crc: 0,
            ahead: BTreeMap::new(),
            done: None,
        }
    }

    /// Feeds the bytes served for `[offset, offset + data.len())`.
    pub fn feed(&mut self, offset: u64, data: &[u8]) -> Verdict {
        self.feed_with_crc(offset, data, crc32c::crc32c(data))
    }

    /// `feed`, given the CRC32C of `data` (the read path has it from the blocks' CRCs): a
    /// piece that continues the prefix seen so far, or lands ahead of it, is combined without
    /// reading its bytes again; only one that overlaps the prefix is checksummed in part.
    pub fn feed_with_crc(&mut self, offset: u64, data: &[u8], crc: u32) -> Verdict {
        if let Some(v) = self.done {
            // Decided: re-reads change nothing (after a mismatch the owner starts a new one).
            return v;
        }
        let end = offset + data.len() as u64;
        if data.is_empty() || end <= self.next {
            return self.conclude();
        }
        if offset <= self.next {
            let skip = (self.next - offset) as usize;
            self.crc = if skip == 0 {
                super::crc::combine(self.crc, crc, data.len())
            } else {
                crc32c::crc32c_append(self.crc, &data[skip..])
            };
            self.next = end;
            while let Some((&a, &(b, c))) = self.ahead.first_key_value() {
                if a > self.next {
                    break;
                }
                self.ahead.pop_first();
                if b <= self.next {
                    continue; // already covered
                }
                if a < self.next {
                    // Partial overlap: a piece's CRC cannot be split.
                    self.done = Some(Verdict::GaveUp);
                    return Verdict::GaveUp;
                }
                self.crc = super::crc::combine(self.crc, c, (b - a) as usize);
                self.next = b;
            }
        } else {
            if self.ahead.len() >= MAX_AHEAD {
                self.done = Some(Verdict::GaveUp);
                return Verdict::GaveUp;
            }
            match self.ahead.get(&offset) {
                Some(&(e, _)) if e >= end => {}
                _ => {
                    self.ahead.insert(offset, (end, crc));
                }
            }
        }
        self.conclude()
    }

    fn conclude(&mut self) -> Verdict {
        if self.next < self.size {
            return Verdict::Pending;
        }
        let v = if self.crc == self.want {
            Verdict::Verified
        } else {
            Verdict::Mismatch(self.crc)
        };
        self.done = Some(v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn in_order_reorder_and_rereads() {
        let d = data(10_000);
        let want = crc32c::crc32c(&d);
        let mut v = Verifier::new(want, d.len() as u64);
        assert_eq!(v.feed(0, &d[..4096]), Verdict::Pending);
        // Out of order, then a re-read of the start, then the gap.
        assert_eq!(v.feed(8192, &d[8192..]), Verdict::Pending);
        assert_eq!(v.feed(0, &d[..100]), Verdict::Pending);
        assert_eq!(v.feed(4096, &d[4096..8192]), Verdict::Verified);
        assert_eq!(v.feed(0, &d[..10]), Verdict::Verified);
    }

    #[test]
    fn one_wrong_byte_is_a_mismatch() {
        let d = data(300_000);
        let want = crc32c::crc32c(&d);
        let mut bad = d.clone();
        bad[123_456] ^= 1;
        let mut v = Verifier::new(want, d.len() as u64);
        for (i, c) in bad.chunks(131_072).enumerate().rev() {
            let r = v.feed(i as u64 * 131_072, c);
            if i > 0 {
                assert_eq!(r, Verdict::Pending);
            } else {
                assert!(matches!(r, Verdict::Mismatch(_)));
            }
        }
    }

    #[test]
    fn overlapping_start_is_trimmed_but_partial_overlap_ahead_gives_up() {
        let d = data(1000);
        let want = crc32c::crc32c(&d);
        let mut v = Verifier::new(want, 1000);
        assert_eq!(v.feed(0, &d[..600]), Verdict::Pending);
        assert_eq!(v.feed(500, &d[500..]), Verdict::Verified);
        let mut v = Verifier::new(want, 1000);
        assert_eq!(v.feed(500, &d[500..]), Verdict::Pending);
        assert_eq!(v.feed(0, &d[..600]), Verdict::GaveUp);
    }

    #[test]
    fn empty_object() {
        let mut v = Verifier::new(0, 0);
        assert_eq!(v.feed(0, &[]), Verdict::Verified);
    }
}
