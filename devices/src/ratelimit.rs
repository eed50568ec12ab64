//! Messages a guest can trigger, rate-limited: a guest that repeats a mistake in a loop must
//! not flood the host's logs. Each call site of [`guest_warn!`](crate::guest_warn) logs at
//! most one line per [`INTERVAL`], and the next line it logs says how many it held back.
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per call site this often.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The state of one call site.
pub struct RateLimit {
    /// When it last logged, in ns since the first use of any limit (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    // Never 0, so that 0 can mean "never logged". u64 ns last 584 years.
    u64::try_from(start.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl RateLimit {
    pub const fn new() -> RateLimit {
        RateLimit {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log now; if so, how many lines were held back since the last one.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ns())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let interval = u64::try_from(INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < interval
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

/// `log::warn!` for what a guest did (a bad register access, a malformed request): at most
/// one line per call site per [`INTERVAL`], with the count of those held back.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        match LIMIT.allow() {
            Some(0) => log::warn!($($arg)+),
            Some(n) => log::warn!("{} ({n} more like this held back)", format_args!($($arg)+)),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count() {
        let l = RateLimit::new();
        let s = u64::try_from(INTERVAL.as_nanos()).unwrap();
        assert_eq!(l.allow_at(10), Some(0));
        for t in 11..1000 {
            assert_eq!(l.allow_at(t), None);
        }
        assert_eq!(l.allow_at(10 + s), Some(989), "the held-back count");
        assert_eq!(l.allow_at(11 + s), None);
        assert_eq!(l.allow_at(10 + 2 * s), Some(1));
    }
}
