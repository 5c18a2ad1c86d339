//! When to try again: exponential backoff with full jitter, and the
//! server's `Retry-After`.

use std::time::Duration;

use http::HeaderMap;

/// How a client retries requests that got no answer, a `5xx` or a `429`.
///
/// Each delay is random between zero and `initial * 2^attempt`, capped at
/// `max` (full jitter), unless the server sent `Retry-After`, which is
/// honoured as it is. Defaults: 100 ms initial, 10 s most, 10 retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    retries: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            retries: Some(10),
        }
    }
}

impl Backoff {
    /// The default policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// The base of the first delay.
    pub fn initial(mut self, delay: Duration) -> Self {
        self.initial = delay;
        self
    }

    /// The longest delay.
    pub fn max(mut self, delay: Duration) -> Self {
        self.max = delay;
        self
    }

    /// How many times one request is retried; `None` retries for ever.
    pub fn retries(mut self, retries: Option<u32>) -> Self {
        self.retries = retries;
        self
    }

    /// No retries at all.
    pub fn never() -> Self {
        Self::default().retries(Some(0))
    }

    /// Whether retry number `attempt` (from 1) is allowed.
    pub(crate) fn allows(&self, attempt: u32) -> bool {
        self.retries.is_none_or(|most| attempt <= most)
    }

    /// The delay before retry number `attempt` (from 1).
    pub(crate) fn delay(&self, attempt: u32, headers: Option<&HeaderMap>) -> Duration {
        if let Some(after) = headers.and_then(retry_after) {
            return after.min(self.max.max(Duration::from_secs(60)));
        }
        let ceiling = self
            .initial
            .saturating_mul(1 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        ceiling.mul_f64(random_fraction())
    }
}

/// `Retry-After` in seconds (an HTTP date is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A number from 0.0 to 1.0.
fn random_fraction() -> f64 {
    let mut bytes = [0; 4];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_below_it() {
        let backoff = Backoff::new()
            .initial(Duration::from_millis(100))
            .max(Duration::from_secs(1));
        for attempt in 1..30 {
            let ceiling = Duration::from_millis(100 * (1 << (attempt - 1).min(20)));
            assert!(backoff.delay(attempt, None) <= ceiling.min(Duration::from_secs(1)));
        }
    }

    #[test]
    fn retry_after_wins() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, "2".parse().unwrap());
        let backoff = Backoff::new();
        assert_eq!(backoff.delay(1, Some(&headers)), Duration::from_secs(2));
    }

    #[test]
    fn retries_are_counted() {
        let backoff = Backoff::new().retries(Some(2));
        assert!(backoff.allows(2));
        assert!(!backoff.allows(3));
        assert!(Backoff::new().retries(None).allows(1_000_000));
        assert!(!Backoff::never().allows(1));
    }
}
