//! Rate limits for log lines that a peer can cause at will (malformed
//! requests, refused handshakes): a flood of bad input must not become a
//! flood of log lines.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets at most `burst` lines through per `interval` and counts the rest;
/// the next line let through reports how many were held back.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    burst: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    let_through: u32,
    suppressed: u64,
}

impl LogLimit {
    /// At most `burst` lines every `interval`.
    pub const fn new(burst: u32, interval: Duration) -> Self {
        LogLimit {
            interval,
            burst,
            window: Mutex::new(Window {
                started: None,
                let_through: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines held
    /// back since the last one let through; `None` when it must be dropped.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.started
            .is_none_or(|s| now.duration_since(s) >= self.interval)
        {
            w.started = Some(now);
            w.let_through = 0;
        }
        if w.let_through >= self.burst {
            w.suppressed += 1;
            return None;
        }
        w.let_through += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_counted_until_the_next_window() {
        let limit = LogLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let first: Vec<_> = (0..3).map(|_| limit.allow_at(t0)).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0)]);
        for _ in 0..1000 {
            assert_eq!(limit.allow_at(t0 + Duration::from_secs(5)), None);
        }
        // The next window's first line carries the count of lines held back.
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(limit.allow_at(t0 + Duration::from_secs(11)), Some(0));
    }
}
