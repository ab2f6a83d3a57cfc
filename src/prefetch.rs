//! Read-ahead decisions for one open file, as a pure state machine.
//!
//! A reader that keeps asking for the byte after its last read is sequential: the window of
//! blocks fetched ahead of it starts small and doubles while that holds, up to a cap. Any
//! jump resets it, so random readers fetch only what they ask for.

#[derive(Clone, Debug)]
pub struct Readahead {
    /// Offset one past the last read; a read starting here is sequential.
    next_offset: u64,
    /// Blocks to keep fetched ahead of the reader.
    window: u64,
    /// First block not yet requested ahead.
    ahead_until: u64,
    max_window: u64,
}

impl Readahead {
    pub fn new(max_window: u64) -> Self {
        Readahead {
            next_offset: 0,
            window: 0,
            ahead_until: 0,
            max_window,
        }
    }

    /// Records a read of `[offset, end)` touching blocks up to `last_block`, and returns the
    /// range of blocks (`start..end`) to fetch ahead now, clipped to `block_count`.
    pub fn on_read(
        &mut self,
        offset: u64,
        end: u64,
        last_block: u64,
        block_count: u64,
    ) -> std::ops::Range<u64> {
        let sequential = offset == self.next_offset;
        self.next_offset = end;
        if sequential {
            self.window = (self.window * 2).clamp(1, self.max_window.max(1));
        } else {
            self.window = 0;
            self.ahead_until = last_block + 1;
            return 0..0;
        }
        if self.max_window == 0 {
            return 0..0;
        }
        let from = self.ahead_until.max(last_block + 1);
        let to = (last_block + 1 + self.window).min(block_count);
        if from >= to {
            return 0..0;
        }
        self.ahead_until = to;
        from..to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_sequential_and_resets_on_seek() {
        let mut r = Readahead::new(8);
        assert_eq!(r.on_read(0, 10, 0, 100), 1..2);
        assert_eq!(r.on_read(10, 20, 0, 100), 2..3);
        assert_eq!(r.on_read(20, 30, 0, 100), 3..5);
        // jump: nothing ahead
        assert_eq!(r.on_read(5000, 5010, 50, 100), 0..0);
        assert_eq!(r.on_read(5010, 5020, 50, 100), 51..52);
        // clipped to the file
        let mut r = Readahead::new(8);
        assert_eq!(r.on_read(0, 1, 0, 1), 0..0);
    }

    #[test]
    fn window_caps() {
        let mut r = Readahead::new(4);
        let mut last = 0..0;
        for b in 0..20 {
            last = r.on_read(b, b + 1, b, 1000);
        }
        assert!(last.end - 19 - 1 <= 4);
    }
}
