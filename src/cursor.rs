//! Live-read cursors (PROTOCOL.md section 10.1): the number of 20-second
//! intervals since 2024-10-09T00:00:00Z, pushed past any cursor the client
//! echoes so that cached responses cannot loop.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 2024-10-09T00:00:00Z in Unix seconds.
const CURSOR_EPOCH_SECS: u64 = 1_728_432_000;
const INTERVAL: Duration = Duration::from_secs(20);

/// The cursor for a live response at `now`, given the client's `cursor`
/// query parameter.
pub(crate) fn next_cursor(now: SystemTime, echoed: Option<&str>) -> u64 {
    let since_epoch = now
        .duration_since(UNIX_EPOCH + Duration::from_secs(CURSOR_EPOCH_SECS))
        .unwrap_or_default();
    let current = since_epoch.as_secs() / INTERVAL.as_secs();
    match echoed.and_then(|c| c.parse::<u64>().ok()) {
        // A cursor too large to move past is junk, like one that is not a
        // number.
        Some(client) if client >= current && client < u64::MAX / 2 => {
            // 1 to 3600 seconds of jitter, in whole intervals, at least one.
            let jitter_secs = 1 + random() % 3600;
            client.saturating_add((jitter_secs / INTERVAL.as_secs()).max(1))
        }
        _ => current,
    }
}

fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_intervals_from_the_epoch() {
        let at = UNIX_EPOCH + Duration::from_secs(CURSOR_EPOCH_SECS + 45);
        assert_eq!(next_cursor(at, None), 2);
        assert_eq!(next_cursor(at, Some("1")), 2);
        assert_eq!(next_cursor(at, Some("junk")), 2);
    }

    #[test]
    fn moves_past_an_echoed_cursor() {
        let at = UNIX_EPOCH + Duration::from_secs(CURSOR_EPOCH_SECS + 45);
        for _ in 0..100 {
            let c = next_cursor(at, Some("2"));
            assert!((3..=2 + 180).contains(&c), "{c}");
        }
        assert!(next_cursor(at, Some("1000")) > 1000);
    }
}
