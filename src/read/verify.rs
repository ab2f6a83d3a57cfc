//! End-to-end CRC32C check of a file read in pieces.
//!
//! GCS gives one checksum per object, none per range, so a big object read with ranged GETs
//! cannot be checked piece by piece. What can be checked is the whole: every handle feeds the
//! bytes it served, and once they cover the object their CRC32C (combined from the pieces, in
//! any order the kernel asked for them) must equal the listed one. On a mismatch the read
//! that completed the coverage fails with EIO, so a program that reads a file to its end
//! either saw the object's exact bytes or got an error.
//!
//! A verified handle proves the bytes it served, not the rest of the answers they came in.
//! A block its reads served in parts may have come in two answers (the first left the cache
//! between the reads), and the copy cached now can hold a wrong byte in the part that was
//! served from the other one. So the verifier also keeps the CRC32C of each part of such a
//! block ([`CutBlocks`]): once the handle is verified, the parts give the block's right
//! CRC32C, and a cached copy whose own CRC32C differs is dropped by the read path.

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
    /// Blocks served in parts, and the parts.
    pub cut: CutBlocks,
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
            cut: CutBlocks::default(),
        }
    }

    /// Feeds the bytes served for `[offset, offset + data.len())`.
    pub fn feed(&mut self, offset: u64, data: &[u8]) -> Verdict {
        self.feed_with_crc(offset, data, crate::crc::crc32c(data))
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
                crate::crc::append(self.crc, &data[skip..])
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

/// Parts kept per handle before giving up on naming the cut blocks (then every block of the
/// object counts as cut): a reader in 62 KiB pieces of a 32 MiB file cuts about 1,000.
const MAX_PARTS: usize = 2048;

/// The blocks a handle served in parts: for each part, its block, where it lies in the block
/// and the CRC32C of the bytes served.
#[derive(Default)]
pub struct CutBlocks {
    /// (block, from, to, crc); emptied once more than [`MAX_PARTS`] came.
    parts: Vec<(u64, u32, u32, u32)>,
    overflowed: bool,
}

impl CutBlocks {
    /// Bytes `from..to` of `block` were served, with this CRC32C.
    pub fn note(&mut self, block: u64, from: u32, to: u32, crc: u32) {
        if self.overflowed {
            return;
        }
        if self.parts.len() >= MAX_PARTS {
            self.parts = Vec::new();
            self.overflowed = true;
        } else {
            self.parts.push((block, from, to, crc));
        }
    }

    /// Each cut block with the CRC32C of its served bytes when its parts tile it exactly
    /// (`len(block)` gives its length), None for a block whose parts overlap or leave a gap.
    /// None overall when there were too many parts to keep: every block counts as cut.
    pub fn served_crcs(&self, len: impl Fn(u64) -> u64) -> Option<Vec<(u64, Option<u32>)>> {
        if self.overflowed {
            return None;
        }
        let mut parts = self.parts.clone();
        parts.sort_unstable();
        parts.dedup();
        let mut out = Vec::new();
        for group in parts.chunk_by(|a, b| a.0 == b.0) {
            let block = group[0].0;
            let mut covered = 0u64;
            let mut crc = Some(0u32);
            for &(_, from, to, c) in group {
                let (from, to) = (from as u64, to as u64);
                if to <= covered {
                    continue; // served again, inside what is covered
                }
                crc = match crc {
                    Some(acc) if from == covered => {
                        Some(super::crc::combine(acc, c, (to - from) as usize))
                    }
                    _ => None, // a gap or an overlap: a part's CRC cannot be split
                };
                covered = to;
            }
            out.push((block, crc.filter(|_| covered == len(block))));
        }
        Some(out)
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
    fn cut_blocks_give_the_crc_of_their_parts() {
        let d = data(10_000);
        let crc = |a: usize, b: usize| crc32c::crc32c(&d[a..b]);
        let mut c = CutBlocks::default();
        // Block 1 (4096..8192) served in two parts, out of order; block 2 (8192..10000)
        // in two parts with a gap; block 0 in overlapping parts.
        c.note(1, 1000, 4096, crc(5096, 8192));
        c.note(1, 0, 1000, crc(4096, 5096));
        c.note(2, 0, 100, crc(8192, 8292));
        c.note(2, 200, 1808, crc(8392, 10_000));
        c.note(0, 0, 3000, crc(0, 3000));
        c.note(0, 2000, 4096, crc(2000, 4096));
        let len = |b: u64| 4096.min(10_000 - b * 4096);
        assert_eq!(
            c.served_crcs(len),
            Some(vec![(0, None), (1, Some(crc(4096, 8192))), (2, None)])
        );
        for i in 0..=MAX_PARTS as u32 {
            c.note(3, i, i + 1, 0);
        }
        assert_eq!(
            c.served_crcs(len),
            None,
            "too many parts: every block counts as cut"
        );
    }

    #[test]
    fn empty_object() {
        let mut v = Verifier::new(0, 0);
        assert_eq!(v.feed(0, &[]), Verdict::Verified);
    }
}
