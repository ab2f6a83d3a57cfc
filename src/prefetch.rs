//! Read-ahead decisions for one open file, as a pure state machine.
//!
//! A reader whose reads keep landing near the furthest byte read so far is sequential (the
//! kernel issues read-ahead requests concurrently, so they may arrive slightly out of order).
//! The window of bytes fetched ahead starts at `min_window` on the second sequential read and
//! quadruples while that holds, up to `max_window`. Any jump resets it, so random readers and
//! header scans fetch only what they ask for.

use std::ops::Range;

/// How far from the furthest byte read a read may start and still count as sequential.
const SLACK: u64 = 2 << 20;

#[derive(Clone, Debug)]
pub struct Readahead {
    /// One past the furthest byte read.
    pos: u64,
    reads: u64,
    /// Bytes to keep fetched ahead of `pos`.
    window: u64,
    /// Bytes already requested ahead up to here.
    ahead_until: u64,
    min_window: u64,
    max_window: u64,
}

impl Readahead {
    pub fn new(min_window: u64, max_window: u64) -> Self {
        Readahead {
            pos: 0,
            reads: 0,
            window: 0,
            ahead_until: 0,
            min_window: min_window.min(max_window),
            max_window,
        }
    }

    /// Records a read of `[offset, end)` of a `size`-byte file and returns the byte range to
    /// fetch ahead now (empty if none).
    #[must_use]
    pub fn on_read(&mut self, offset: u64, end: u64, size: u64) -> Range<u64> {
        let first = self.reads == 0;
        self.reads += 1;
        let near = offset + SLACK >= self.pos && offset <= self.pos + SLACK;
        if first || !near || self.max_window == 0 {
            // A first read (maybe a header scan) or a jump: fetch only what is asked.
            self.window = 0;
            self.pos = end;
            self.ahead_until = end;
            return 0..0;
        }
        self.pos = self.pos.max(end);
        self.window = if self.window == 0 {
            self.min_window
        } else {
            (self.window * 4).min(self.max_window)
        };
        let from = self.ahead_until.max(self.pos);
        let to = (self.pos + self.window).min(size);
        // Refill only once half the window is used up, so each refill is one big request
        // rather than a trickle of small ones (the end of the file is always fetched).
        if from >= to || (to < size && to - from < self.window / 2) {
            return 0..0;
        }
        self.ahead_until = to;
        from..to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn first_read_and_jumps_fetch_nothing_ahead() {
        let mut r = Readahead::new(M, 32 * M);
        assert_eq!(r.on_read(0, 16384, 100 * M), 0..0);
        assert_eq!(r.on_read(50 * M, 50 * M + 65536, 100 * M), 0..0);
        assert_eq!(r.on_read(10 * M, 10 * M + 65536, 100 * M), 0..0);
    }

    #[test]
    fn grows_while_sequential_tolerating_reordering() {
        let k = 128 * 1024;
        let mut r = Readahead::new(M, 16 * M);
        assert_eq!(r.on_read(0, k, 100 * M), 0..0);
        assert_eq!(r.on_read(2 * k, 3 * k, 100 * M), 3 * k..3 * k + M);
        // an earlier kernel read-ahead arriving late still counts as sequential
        assert_eq!(r.on_read(k, 2 * k, 100 * M), 3 * k + M..3 * k + 4 * M);
        assert_eq!(
            r.on_read(3 * k, 4 * k, 100 * M),
            3 * k + 4 * M..4 * k + 16 * M
        );
        // capped at max_window ahead of the reader, refilled in one piece once half is used
        let mut refills = Vec::new();
        let mut off = 4 * k;
        while off < 40 * M {
            let a = r.on_read(off, off + k, 100 * M);
            if !a.is_empty() {
                refills.push(a);
            }
            off += k;
        }
        assert_eq!(refills[0].start, 4 * k + 16 * M);
        for w in refills.windows(2) {
            assert_eq!(w[0].end, w[1].start, "refills are contiguous");
        }
        assert!(refills.iter().all(|a| a.end - a.start >= 8 * M));
        // clipped to the file
        let mut r = Readahead::new(M, 4 * M);
        let _ = r.on_read(0, k, 2 * k);
        assert_eq!(r.on_read(k, 2 * k, 2 * k), 0..0);
    }
}
