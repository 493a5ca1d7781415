//! Limits on what a guest can make the host do over and over: log lines it triggers, events it
//! reports. A [`RateLimit`] lets a burst through, then a steady rate, and counts what it held
//! back, so the next line that passes can say how many were suppressed. [`guest_log!`] puts one
//! behind each call site of a guest-triggered log line: one shim serves one pod, so a guest
//! flooding one line never hides another pod's, nor the same pod's other lines.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A token bucket: `burst` events at once, refilled at one per `every`.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    every: Duration,
    bucket: Mutex<Option<Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

impl RateLimit {
    /// `burst` events at once, then one per `every`.
    pub const fn new(burst: u32, every: Duration) -> RateLimit {
        RateLimit { burst, every, bucket: Mutex::new(None) }
    }

    /// Whether an event at `now` may go ahead: `Some(n)` with the number held back since the
    /// last one that did, `None` when this one is held back (and counted).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut guard = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = guard.get_or_insert(Bucket { tokens: self.burst, refilled: now, suppressed: 0 });
        let elapsed = now.saturating_duration_since(bucket.refilled);
        let earned = (elapsed.as_nanos() / self.every.as_nanos().max(1)).min(u128::from(self.burst)) as u32;
        if earned > 0 {
            bucket.tokens = bucket.tokens.saturating_add(earned).min(self.burst);
            bucket.refilled = now;
        }
        if bucket.tokens == 0 {
            bucket.suppressed = bucket.suppressed.saturating_add(1);
            return None;
        }
        bucket.tokens -= 1;
        Some(std::mem::take(&mut bucket.suppressed))
    }
}

/// How many lines of one guest-triggered call site pass at once, and then how often one does.
pub const GUEST_LOG_BURST: u32 = 10;
pub const GUEST_LOG_EVERY: Duration = Duration::from_secs(1);

/// A `tracing` event the guest can trigger, limited per call site ([`GUEST_LOG_BURST`] lines,
/// then one per [`GUEST_LOG_EVERY`]); a line after suppressed ones carries `suppressed = N`.
/// `guest_log!(warn, %err, "message")` takes what `tracing::warn!` takes.
#[macro_export]
macro_rules! guest_log {
    ($level:ident, $($rest:tt)+) => {{
        static LIMIT: $crate::rate_limit::RateLimit =
            $crate::rate_limit::RateLimit::new($crate::rate_limit::GUEST_LOG_BURST, $crate::rate_limit::GUEST_LOG_EVERY);
        if let Some(suppressed) = LIMIT.admit(::std::time::Instant::now()) {
            ::tracing::$level!(suppressed, $($rest)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_passes_its_burst_then_one_per_period_and_counts_the_rest() {
        let limit = RateLimit::new(3, Duration::from_secs(1));
        let start = Instant::now();
        let passed: Vec<Option<u64>> = (0..1000).map(|_| limit.admit(start)).collect();
        assert_eq!(passed.iter().filter(|p| p.is_some()).count(), 3, "the burst, then nothing");
        // A second later one more passes, saying how many were held back.
        assert_eq!(limit.admit(start + Duration::from_secs(1)), Some(997));
        assert_eq!(limit.admit(start + Duration::from_secs(1)), None);
        // A long quiet refills the burst, not more.
        let later = start + Duration::from_secs(3600);
        assert_eq!((0..10).filter(|_| limit.admit(later).is_some()).count(), 3);
    }
}
