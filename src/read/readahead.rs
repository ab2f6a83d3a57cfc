//! Read-ahead decisions for one open file, as a pure state machine.
//!
//! A reader whose reads keep landing near the furthest byte read so far is sequential. The
//! kernel splits one large `read(2)` into many 1 MiB requests sent at once, and on a busy
//! machine they reach us in any order, several MiB apart: so a read that touches one of the
//! last few reads also counts as sequential, wherever it lies. The window of bytes fetched ahead starts at `min_window` on the second sequential
//! read and quadruples while that holds, up to `max_window`; once it spans whole requests it
//! ends on a request boundary (`aligned`), so a stream is fetched in identical pieces. Any
//! jump resets it, so random readers and header scans fetch only what they ask for.

use std::ops::Range;

/// How far from the furthest byte read a read may start and still count as sequential.
const SLACK: u64 = 2 << 20;

/// How far behind the furthest byte read a read may start and still count as sequential
/// (the kernel's read-ahead requests, several MiB each, overtake each other).
const BEHIND: u64 = 16 << 20;

/// How many recent reads a read may touch to count as sequential.
const RECENT: usize = 16;

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
    /// Windows end on a multiple of this (1 = anywhere).
    align: u64,
    /// The last `RECENT` reads, as `[start, end)`, in a ring (empty ones are unused slots).
    recent: [(u64, u64); RECENT],
    /// Window for a first read at offset 0 (0 = none: a first read fetches only itself)...
    first_window: u64,
    /// ... if it is at least this long (see [`Readahead::warm`] and [`Readahead::bulk`]).
    first_min_len: u64,
    /// The last read was a jump: not the first, and not near any earlier one.
    jumped: bool,
    /// Jumps so far.
    jumps: u64,
    /// For a small object fetched whole by `ReadPath::plan`: where the fetch of its rest
    /// began (it asked for everything from there to the end).
    small_asked_from: Option<u64>,
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
            align: 1,
            recent: [(0, 0); RECENT],
            first_window: 0,
            first_min_len: 0,
            jumped: false,
            jumps: 0,
            small_asked_from: None,
        }
    }

    /// A first read at offset 0 opens a `window`-byte read-ahead window at once: for a reader
    /// that has been reading whole objects, instead of growing one over several round trips.
    pub fn warm(self, window: u64) -> Self {
        self.bulk(0, window)
    }

    /// A first read at offset 0 of at least `read` bytes opens a `window`-byte window at once.
    /// The kernel sends a whole 1 MiB piece as an open's first read only for a reader whose own
    /// reads are 512 KiB or more (its first read-ahead is twice the read): `dd bs=1M`,
    /// Python's `f.read()`, `numpy.fromfile`, a `readv` of a whole file. Such a reader
    /// streams; growing its window from 1 MiB would cost it three first-byte latencies
    /// before the object flows at full rate. A header scan or `cat` (reads of 128 KiB or
    /// less: first pieces of 512 KiB at most) still starts with no window.
    pub fn bulk(mut self, read: u64, window: u64) -> Self {
        self.first_min_len = read;
        self.first_window = window.min(self.max_window);
        self
    }

    /// Windows end on a multiple of `align` bytes (the request size), so that a stream is
    /// fetched in identical, aligned requests whose buffers can be recycled.
    pub fn aligned(mut self, align: u64) -> Self {
        self.align = align.max(1);
        self
    }

    /// How many reads were recorded.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Where an earlier read asked for the rest of a small object from (see `ReadPath::plan`).
    pub fn small_asked_from(&self) -> Option<u64> {
        self.small_asked_from
    }

    pub fn set_small_asked_from(&mut self, from: u64) {
        self.small_asked_from = Some(from);
    }

    /// How many bytes of a `size`-byte file were read, when the reads were only its start: at
    /// least one read, no jumps, and nothing past `max` nor the file's end (a header: pydicom's
    /// `stop_before_pixels`, PIL's `Image.open`, `file`). None for any other reader.
    pub fn header_len(&self, size: u64, max: u64) -> Option<u64> {
        (self.reads > 0 && self.jumps == 0 && self.pos <= max && self.pos < size)
            .then_some(self.pos)
    }

    /// Whether the last read was a jump (a random read): not the first read, and neither near
    /// the furthest byte read nor touching a recent read.
    pub fn jumped(&self) -> bool {
        self.jumped
    }

    /// Whether the reader reads at random: it jumped twice or more, and has no stream's
    /// window open (reads touching one another, a random read the kernel sent in pieces,
    /// open only a small one).
    pub fn random_reader(&self) -> bool {
        self.jumps >= 2 && self.window < self.min_window.max(1)
    }

    /// Records a read of `[offset, end)` of a `size`-byte file and returns the byte range to
    /// fetch ahead now (empty if none).
    #[must_use]
    pub fn on_read(&mut self, offset: u64, end: u64, size: u64) -> Range<u64> {
        let first = self.reads == 0;
        // Continues a recent read, or leads up to one: a piece of the same large read arriving
        // out of order. (Random reads almost never land exactly next to one another; reading
        // the same bytes again does not count.)
        let touches = self.recent.iter().any(|&(s, e)| {
            s < e
                && ((offset >= s && offset <= e && end > e) || (end >= s && end <= e && offset < s))
        });
        self.recent[(self.reads % RECENT as u64) as usize] = (offset, end);
        self.reads += 1;
        // Near the furthest read, or inside what was already fetched ahead. The kernel's own
        // read-ahead runs several requests at once, which arrive out of order: one may start
        // far into the window, another some MiB behind a later one already answered.
        // A reader that has jumped twice is a random reader until a read touches a recent one:
        // with the page cache part full, the kernel sends such a reader's reads in pieces a
        // little apart (the pages between are cached), which would otherwise count as near and
        // open a window the reader never uses (`rand8` in bench/ with 8,000 reads: 9% of reads
        // opened one, and 3x the bytes read were fetched ahead).
        let random = self.jumps >= 2 && self.window == 0;
        let near = touches
            || (!random
                && if offset < self.pos {
                    let behind = if self.window > 0 { BEHIND } else { SLACK };
                    offset + behind >= self.pos
                } else {
                    offset <= (self.pos + SLACK).max(self.ahead_until)
                });
        self.jumped = !first && !near;
        self.jumps += self.jumped as u64;
        // The start of the file, read first, or second right after the piece it leads up to
        // (the kernel sends a large reader's first pieces at once, and the one at 1 MiB may
        // come first).
        let start = offset == 0 && (first || (self.reads == 2 && touches && self.window == 0));
        if start && self.first_window > 0 && end - offset >= self.first_min_len {
            // A reader of whole objects starting one, or one whose reads are large: read
            // ahead at once.
            self.pos = self.pos.max(end);
            self.ahead_until = self.ahead_until.max(end);
            self.window = self.first_window;
        } else if first || !near || self.max_window == 0 {
            // A first read (maybe a header scan) or a jump: fetch only what is asked.
            self.window = 0;
            self.pos = end;
            self.ahead_until = end;
            return 0..0;
        } else {
            self.pos = self.pos.max(end);
            self.window = if self.window == 0 && random {
                // A random reader turning sequential (or the kernel's own read-ahead for it,
                // which it may never read): start small, and grow as the reads keep coming.
                (self.min_window / 8).max(1)
            } else if self.window == 0 {
                self.min_window
            } else {
                (self.window * 4).min(self.max_window)
            };
        }
        let from = self.ahead_until.max(self.pos);
        // Aligned once the window spans whole requests: a reader that has only just turned
        // sequential (or a random reader that happened to read twice in a row) gets no more
        // than its window.
        let to = if self.window >= self.align {
            (self.pos + self.window).next_multiple_of(self.align)
        } else {
            self.pos + self.window
        }
        .min(size);
        // Refill once a whole request's worth is free (half the window while the window is
        // smaller than a request), so each refill is a full request rather than a trickle of
        // small ones (the end of the file is always fetched).
        let step = if self.align > 1 && self.window >= self.align {
            self.align
        } else {
            self.window / 2
        };
        if from >= to || (to < size && to - from < step) {
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
    fn only_a_files_start_read_is_a_header() {
        let r = Readahead::new(M, 32 * M);
        assert_eq!(r.header_len(100 * M, M), None, "nothing read");
        let mut r = Readahead::new(M, 32 * M);
        let _ = r.on_read(0, 128 << 10, 100 * M);
        assert_eq!(r.header_len(100 * M, M), Some(128 << 10));
        assert_eq!(r.header_len(128 << 10, M), None, "read to its end");
        let _ = r.on_read(128 << 10, 2 * M, 100 * M);
        assert_eq!(r.header_len(100 * M, M), None, "past the header limit");
        let mut r = Readahead::new(M, 32 * M);
        let _ = r.on_read(0, 4096, 100 * M);
        let _ = r.on_read(50 * M, 50 * M + 4096, 100 * M);
        assert_eq!(r.header_len(100 * M, 64 * M), None, "a jump");
    }

    #[test]
    fn first_read_and_jumps_fetch_nothing_ahead() {
        let mut r = Readahead::new(M, 32 * M);
        assert_eq!(r.on_read(0, 16384, 100 * M), 0..0);
        assert!(!r.jumped(), "a first read is not a jump");
        assert_eq!(r.on_read(50 * M, 50 * M + 65536, 100 * M), 0..0);
        assert!(r.jumped());
        assert_eq!(r.on_read(10 * M, 10 * M + 65536, 100 * M), 0..0);
        assert!(r.jumped());
        // a few MiB behind the last read is a jump too for a reader with no window yet
        assert_eq!(r.on_read(4 * M, 4 * M + 65536, 100 * M), 0..0);
        assert!(r.jumped());
        // the read right after one continues it
        let _ = r.on_read(4 * M + 65536, 4 * M + 2 * 65536, 100 * M);
        assert!(!r.jumped());
    }

    #[test]
    fn a_random_reader_needs_a_touching_read_to_open_a_window() {
        let k = 64 * 1024;
        let size = 1000 * M;
        // A reader with no jumps yet: a read a little past the last one is sequential.
        let mut r = Readahead::new(M, 32 * M);
        let _ = r.on_read(10 * M, 10 * M + k, size);
        assert_eq!(
            r.on_read(10 * M + 3 * k, 10 * M + 4 * k, size),
            10 * M + 4 * k..11 * M + 4 * k
        );
        // After two jumps, the same gap is a jump and opens nothing...
        let mut r = Readahead::new(M, 32 * M);
        for at in [10 * M, 500 * M, 200 * M] {
            assert_eq!(r.on_read(at, at + k, size), 0..0);
        }
        assert_eq!(r.on_read(200 * M + 3 * k, 200 * M + 4 * k, size), 0..0);
        assert!(r.jumped());
        // ...and a read that continues the last one does, from an eighth of the first window,
        // growing from there.
        let at = 200 * M + 4 * k;
        assert_eq!(r.on_read(at, at + k, size), at + k..at + k + M / 8);
        assert!(!r.jumped());
        // Not a jump, but still a random reader until its window is a stream's.
        assert!(r.random_reader());
        let a = r.on_read(at + k, at + 2 * k, size);
        assert_eq!(a, at + k + M / 8..at + 2 * k + M / 2);
        assert!(r.random_reader());
        let _ = r.on_read(at + 2 * k, at + 3 * k, size);
        assert!(!r.random_reader(), "a window of 2 MiB is a stream's");
        // One jump does not make a random reader.
        let mut r = Readahead::new(M, 32 * M);
        let _ = r.on_read(0, k, size);
        let _ = r.on_read(500 * M, 500 * M + k, size);
        assert!(r.jumped() && !r.random_reader());
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

    #[test]
    fn an_aligned_stream_refills_one_request_at_a_time() {
        // A stream whose window spans many requests asks for the next one as soon as one is
        // read, so its requests stay staggered: refilled in half-window bursts, they would all
        // wait out the first-byte latency together and leave the link idle meanwhile.
        let mut r = Readahead::new(M, 64 * M).aligned(4 * M);
        let size = 1000 * M;
        let mut refills = Vec::new();
        let mut off = 0;
        while off < 200 * M {
            let a = r.on_read(off, off + M, size);
            if !a.is_empty() {
                refills.push(a);
            }
            off += M;
        }
        for w in refills.windows(2) {
            assert_eq!(w[0].end, w[1].start, "refills are contiguous");
        }
        let full: Vec<_> = refills.iter().filter(|a| a.end >= 64 * M).collect();
        assert!(full.len() > 30, "{refills:?}");
        assert!(
            full.iter()
                .skip(1)
                .all(|a| a.end - a.start == 4 * M && a.end % (4 * M) == 0),
            "{refills:?}"
        );
        assert!(refills.last().unwrap().end <= 200 * M + 64 * M);
    }

    #[test]
    fn kernel_reads_arriving_out_of_order_keep_the_window() {
        // A stream whose window is open: the kernel's read-ahead requests overtake each other,
        // so a read may arrive several MiB behind the furthest one. It must not reset the
        // window (which would fetch again what was already fetched and served).
        let mut r = Readahead::new(M, 64 * M).aligned(4 * M);
        let size = 1000 * M;
        let _ = r.on_read(0, M, size);
        let mut fetched_to = 0;
        for i in 1..12 {
            let a = r.on_read(i * M, (i + 1) * M, size);
            fetched_to = fetched_to.max(a.end);
        }
        assert!(fetched_to >= 64 * M, "window opened: {fetched_to}");
        let a = r.on_read(5 * M, 6 * M, size); // 6 MiB behind the furthest read
        assert!(a.is_empty() || a.start >= fetched_to, "{a:?} refetches");
        for i in 12..80 {
            let a = r.on_read(i * M, (i + 1) * M, size);
            if !a.is_empty() {
                assert!(a.start >= fetched_to, "read at {i} MiB: {a:?} refetches");
                fetched_to = a.end;
            }
        }
        assert!(fetched_to >= 80 * M, "the window stayed open: {fetched_to}");
        // ... while a jump far behind is a jump.
        assert_eq!(r.on_read(500 * M, 501 * M, size), 0..0);
    }

    #[test]
    fn a_large_read_split_by_the_kernel_and_reordered_is_sequential() {
        // Recorded in CI under load: a reader with the first 64 KiB in the page cache read the
        // rest, which reached us as 1 MiB requests in this order, up to 4 MiB apart. Before, every out-of-order one reset the window and
        // read-ahead fetched 15 blocks of the 13 MB file.
        let m = M;
        let base = 65536;
        let order = [0, 1, 5, 2, 6, 3, 7, 4, 8, 11, 9, 10, 12];
        let size = 13_122_792;
        let mut r = Readahead::new(M, 64 * M).aligned(4 * M);
        let mut ahead = 0;
        for i in order {
            let off = base + i * m;
            let a = r.on_read(off, (off + m).min(size), size);
            ahead += a.end - a.start;
        }
        assert!(ahead >= size / 2, "read ahead {ahead} of {size}");
        // Far from the furthest read, re-reading the bytes of a recent read, or reading inside
        // them, is not sequential ...
        let mut r = Readahead::new(M, 64 * M);
        let _ = r.on_read(50 * M, 51 * M, 100 * M);
        assert_eq!(r.on_read(20 * M, 21 * M, 100 * M), 0..0);
        assert_eq!(r.on_read(50 * M, 51 * M, 100 * M), 0..0);
        assert_eq!(r.on_read(20 * M + 4096, 20 * M + 8192, 100 * M), 0..0);
        // ... while reading up to a recent one, or on from it, is.
        assert!(!r.on_read(19 * M, 20 * M, 100 * M).is_empty());
        let mut r = Readahead::new(M, 64 * M);
        let _ = r.on_read(50 * M, 51 * M, 100 * M);
        assert_eq!(r.on_read(20 * M, 21 * M, 100 * M), 0..0);
        assert!(!r.on_read(51 * M, 52 * M, 100 * M).is_empty());
    }

    #[test]
    fn a_warm_start_reads_ahead_from_the_first_read_at_zero_only() {
        let mut r = Readahead::new(M, 64 * M).aligned(4 * M).warm(16 * M);
        // (to the request boundary after 16 MiB past the read)
        assert_eq!(r.on_read(0, 128 * 1024, 100 * M), 128 * 1024..20 * M);
        // and grows from there while sequential
        let a = r.on_read(128 * 1024, M, 100 * M);
        assert!(a.is_empty() || a.start == 20 * M, "{a:?}");
        // A first read elsewhere (a random reader) fetches only itself.
        let mut r = Readahead::new(M, 64 * M).aligned(4 * M).warm(16 * M);
        assert_eq!(r.on_read(50 * M, 50 * M + 65536, 100 * M), 0..0);
        // Clipped to the object.
        let mut r = Readahead::new(M, 64 * M).aligned(4 * M).warm(16 * M);
        assert_eq!(r.on_read(0, M, 13 * M), M..13 * M);
    }

    #[test]
    fn a_first_whole_piece_at_zero_opens_the_bulk_window() {
        let new = || Readahead::new(M, 64 * M).aligned(4 * M).bulk(M, 16 * M);
        // dd bs=1M: the first piece opens 16 MiB at once (to the request boundary past it).
        let mut r = new();
        assert_eq!(r.on_read(0, M, 100 * M), M..20 * M);
        // and the next piece grows it fourfold.
        assert_eq!(r.on_read(M, 2 * M, 100 * M), 20 * M..68 * M);
        // A header scan's first read (the kernel's 64 KiB for a 16 KiB read), and cat's
        // (512 KiB), fetch only themselves.
        assert_eq!(new().on_read(0, 64 * 1024, 100 * M), 0..0);
        assert_eq!(new().on_read(0, 512 * 1024, 100 * M), 0..0);
        // A whole piece elsewhere (a refill, a reader starting in the middle) neither.
        assert_eq!(new().on_read(8 * M, 9 * M, 100 * M), 0..0);
        // The kernel's second piece first, then the first: the window opens on the first.
        let mut r = new();
        assert_eq!(r.on_read(M, 2 * M, 100 * M), 0..0);
        assert_eq!(r.on_read(0, M, 100 * M), 2 * M..20 * M);
        // But not after a jump elsewhere.
        let mut r = new();
        assert_eq!(r.on_read(50 * M, 51 * M, 100 * M), 0..0);
        assert_eq!(r.on_read(0, M, 100 * M), 0..0);
        // Without the option, a first piece fetches only itself.
        let mut r = Readahead::new(M, 64 * M).aligned(4 * M);
        assert_eq!(r.on_read(0, M, 100 * M), 0..0);
    }

    #[test]
    fn aligned_windows_end_on_request_boundaries() {
        let k = 128 * 1024;
        let mut r = Readahead::new(M, 32 * M).aligned(4 * M);
        let size = 1000 * M + 5;
        assert_eq!(r.on_read(0, k, size), 0..0);
        let mut last_end = 0;
        let mut off = k;
        let mut refills = 0;
        while off < size {
            let a = r.on_read(off, (off + M).min(size), size);
            if !a.is_empty() {
                refills += 1;
                // The first window (1 MiB) is what it is; from 4 MiB on, windows are aligned.
                assert!(
                    refills == 1 || a.end.is_multiple_of(4 * M) || a.end == size,
                    "{a:?} is not aligned"
                );
                if last_end != 0 {
                    assert_eq!(a.start, last_end, "refills are contiguous");
                    assert!(a.end - a.start >= 3 * M || a.end == size, "{a:?}");
                }
                last_end = a.end;
            }
            off += M;
        }
        assert_eq!(last_end, size, "read ahead to the end of the file");
        assert!(refills > 10);
    }
}
