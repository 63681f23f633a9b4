//! The rate limit on client ops forwarded to logic `Receive`.

use tokio::time::Instant;

/// Window in which rate-limited `Receive` ops are counted toward a flood close.
const FLOOD_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// What to do with one op bound for logic `Receive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Forward,
    Drop,
    /// Dropped, and the connection has flooded long enough to be closed.
    Close,
}

/// Per-connection token bucket for ops forwarded to logic `Receive`.
///
/// Logic's `Receive` is where upstream messages cost the cluster (goim
/// forwards every op, unlimited); a client may burst up to `burst` ops,
/// then `rate` per second. Ops over the limit are dropped, and a client that
/// keeps flooding — `flood_close` drops within [`FLOOD_WINDOW`] — is closed:
/// a well-behaved client never gets there, and a flooding one would
/// otherwise hold a connection slot and a reader busy forever.
#[derive(Debug)]
pub(super) struct ReceiveLimit {
    /// Refill per second; 0 disables the limit.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    flood_close: u32,
    window_start: Instant,
    window_drops: u32,
}

impl ReceiveLimit {
    pub(super) fn new(config: &crate::Config) -> ReceiveLimit {
        let now = Instant::now();
        let burst = f64::from(config.receive_burst.max(1));
        ReceiveLimit {
            rate: f64::from(config.receive_rate),
            burst,
            tokens: burst,
            last: now,
            flood_close: config.receive_flood_close,
            window_start: now,
            window_drops: 0,
        }
    }

    pub(super) fn check(&mut self, now: Instant) -> Verdict {
        if self.rate <= 0.0 {
            return Verdict::Forward;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Forward;
        }
        if now.saturating_duration_since(self.window_start) >= FLOOD_WINDOW {
            self.window_start = now;
            self.window_drops = 0;
        }
        self.window_drops += 1;
        if self.flood_close > 0 && self.window_drops >= self.flood_close {
            Verdict::Close
        } else {
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limit(rate: u32, burst: u32, flood_close: u32) -> ReceiveLimit {
        let mut config = crate::Config::new("c", "l");
        config.receive_rate = rate;
        config.receive_burst = burst;
        config.receive_flood_close = flood_close;
        ReceiveLimit::new(&config)
    }

    #[test]
    fn receive_limit_bursts_then_refills_at_its_rate() {
        let mut l = limit(10, 3, 0);
        let t0 = l.last;
        let verdicts: Vec<_> = (0..5).map(|_| l.check(t0)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Forward,
                Verdict::Forward,
                Verdict::Forward,
                Verdict::Drop,
                Verdict::Drop
            ]
        );
        // 10/s: one token per 100 ms, never more than the burst.
        assert_eq!(l.check(t0 + Duration::from_millis(150)), Verdict::Forward);
        assert_eq!(l.check(t0 + Duration::from_millis(160)), Verdict::Drop);
        let later = t0 + Duration::from_secs(60);
        let forwarded = (0..10)
            .filter(|_| l.check(later) == Verdict::Forward)
            .count();
        assert_eq!(forwarded, 3);
    }

    #[test]
    fn receive_limit_closes_a_sustained_flood_only() {
        let mut l = limit(1, 1, 3);
        let t0 = l.last;
        assert_eq!(l.check(t0), Verdict::Forward);
        assert_eq!(l.check(t0), Verdict::Drop);
        assert_eq!(l.check(t0), Verdict::Drop);
        // A new window forgets earlier drops.
        let t1 = t0 + FLOOD_WINDOW + Duration::from_millis(1);
        assert_eq!(l.check(t1), Verdict::Forward);
        assert_eq!(l.check(t1), Verdict::Drop);
        assert_eq!(l.check(t1), Verdict::Drop);
        assert_eq!(l.check(t1), Verdict::Close);
        let mut unlimited = limit(0, 1, 1);
        assert!((0..100).all(|_| unlimited.check(t0) == Verdict::Forward));
    }
}
