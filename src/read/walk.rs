//! Workload heuristics that span files: readers walking through files in key order (fetch
//! the next ones before they are opened), and readers that read big objects whole (open a
//! wide read-ahead window at once). Both are plain state, decided from what readers did; the
//! read path acts on the answers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::inode::Ino;

/// How many finished files' successors are remembered.
const RECENT: usize = 8;
/// How many files read to their end are never fetched ahead again.
const DONE: usize = 64;
/// Score from which the walk is trusted (the fourth predicted file in a row).
const TRUST: u32 = 3;

/// Readers going through files in key order. A file read to its end that one of the last
/// `RECENT` finished files predicted (it is among their successors) scores a hit, any other a
/// miss; once hits outweigh misses, the files after each finished one are fetched before
/// they are opened. Parallel readers that finish files a little out of order still score,
/// while a shuffled epoch (a DataLoader) hits only by chance, at most `RECENT * window /
/// files` of the time, and a header scan never reads to the end at all. (The read path keeps a
/// second `Walk` for header scans, fed with files closed after reading only their start.)
#[derive(Default)]
pub struct Walk {
    /// Successors of the last `RECENT` finished files, oldest first.
    recent: VecDeque<Vec<Ino>>,
    /// The last files read to their end: never fetched ahead again (the reader may be done
    /// with a file before the note that the previous one finished is taken).
    done: VecDeque<Ino>,
    score: u32,
}

impl Walk {
    /// File `ino` was read to its end; `next` are the files after it in key order (more than
    /// `n`, so readers slightly out of order still score). Returns the files to fetch ahead
    /// now: up to `n` of `next` not read already, or none unless readers are walking.
    pub fn finished(&mut self, ino: Ino, next: Vec<Ino>, n: usize) -> Vec<Ino> {
        let hit = self.recent.iter().any(|succ| succ.contains(&ino));
        self.score = if hit {
            (self.score + 1).min(8)
        } else {
            self.score.saturating_sub(2)
        };
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        if self.done.len() == DONE {
            self.done.pop_front();
        }
        self.done.push_back(ino);
        let ahead = if self.score < TRUST {
            Vec::new()
        } else {
            next.iter()
                .take(n)
                .copied()
                .filter(|f| !self.done.contains(f))
                .collect()
        };
        self.recent.push_back(next);
        ahead
    }
}

/// Whether readers have lately been reading big objects whole: +1 for each read to its end,
/// -2 for each closed before (a header scan, a random reader), within `0..=MAX`. From `TRUST`
/// on, a new open's first read at offset 0 starts with a wide read-ahead window instead of
/// growing one over several round trips (`Readahead::warm`).
#[derive(Default)]
pub struct WholeReaders(AtomicU32);

impl WholeReaders {
    const MAX: u32 = 8;
    const TRUST: u32 = 4;

    pub fn read_to_end(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some((v + 1).min(Self::MAX))
            });
    }

    pub fn closed_early(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(2))
            });
    }

    pub fn trusted(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= Self::TRUST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn succ(i: Ino, n: usize) -> Vec<Ino> {
        (i + 1..=i + n as u64).collect()
    }

    #[test]
    fn a_walk_in_key_order_is_trusted_from_the_fourth_file() {
        let mut w = Walk::default();
        let mut fetched = Vec::new();
        for f in 10..20 {
            fetched.push(w.finished(f, succ(f, 16), 8));
        }
        // Files 10..13: no prediction yet or not enough hits.
        assert!(fetched[..3].iter().all(|a| a.is_empty()), "{fetched:?}");
        // From the fourth on, the next 8 (not read yet) are fetched.
        assert_eq!(fetched[3], succ(13, 8));
        assert_eq!(fetched[9], succ(19, 8));
    }

    #[test]
    fn shuffled_readers_never_trigger_it() {
        let mut w = Walk::default();
        // A deterministic shuffle of 100,000 files: a finish lands among the successors of
        // the last few about once in 800, never three times running.
        let mut f: u64 = 7;
        for _ in 0..5000 {
            f = (f * 7919 + 13) % 100_000;
            assert!(w.finished(f, succ(f, 16), 8).is_empty(), "triggered at {f}");
        }
    }

    #[test]
    fn files_read_already_are_not_fetched_again() {
        let mut w = Walk::default();
        for f in [10, 11, 12, 13] {
            w.finished(f, succ(f, 16), 8);
        }
        // Readers slightly out of order: 15 finished before 14.
        let a = w.finished(15, succ(15, 16), 8);
        assert!(!a.contains(&15));
        let b = w.finished(14, succ(14, 16), 8);
        assert!(!b.contains(&15), "15 was read to its end already: {b:?}");
    }

    #[test]
    fn whole_readers_score() {
        let s = WholeReaders::default();
        for _ in 0..3 {
            s.read_to_end();
        }
        assert!(!s.trusted());
        s.read_to_end();
        assert!(s.trusted());
        // Two early closes (a header scan) undo it.
        s.closed_early();
        assert!(!s.trusted());
        for _ in 0..20 {
            s.read_to_end();
        }
        // Capped at 8: however long the run, three early closes bring it below trust.
        s.closed_early();
        s.closed_early();
        assert!(s.trusted());
        s.closed_early();
        assert!(!s.trusted());
    }
}
