//! A stream's row, and the conversions between Rust values and columns.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::Row;

use crate::offset::Offset;
use crate::storage::rules::Existing;
use crate::storage::{StreamError, StreamInfo};
use crate::stream::{ContentType, Expiry, ForkPoint};

/// The columns [`StreamRow::parse`] reads, of table `ds_streams` named `s`.
pub(super) const COLUMNS: &str = "s.id, s.path, s.content_type, s.ttl_secs, s.expires_secs, \
    s.expires_nanos, s.touched_us, s.closed, s.stream_seq, s.fork_source, s.fork_anchor_index, \
    s.fork_anchor_pos, s.fork_sub, s.source_id, s.base_index, s.base_pos, s.tail_index, \
    s.tail_pos, s.forks, s.deleted, s.version";

/// One row of `ds_streams`.
#[derive(Debug, Clone)]
pub(super) struct StreamRow {
    pub(super) id: i64,
    pub(super) path: String,
    pub(super) content_type: ContentType,
    pub(super) expiry: Expiry,
    pub(super) touched: i64,
    pub(super) closed: bool,
    pub(super) stream_seq: Option<String>,
    pub(super) fork: Option<ForkPoint>,
    pub(super) source_id: Option<i64>,
    pub(super) base: Offset,
    pub(super) tail: Offset,
    pub(super) forks: i64,
    pub(super) deleted: bool,
    pub(super) version: i64,
}

impl StreamRow {
    /// Reads the row from the first [`COLUMNS`] of `row`.
    pub(super) fn parse(row: &Row) -> Result<Self, StreamError> {
        let corrupt = |what: &str| StreamError::internal(format!("stored stream has a bad {what}"));
        let content_type: String = row.get(2);
        let content_type =
            ContentType::parse(&content_type).ok_or_else(|| corrupt("content type"))?;
        let expiry = match (row.get::<_, Option<i64>>(3), row.get::<_, Option<i64>>(4)) {
            (Some(ttl), _) => Expiry::Ttl(u64::try_from(ttl).map_err(|_| corrupt("TTL"))?),
            (None, Some(secs)) => Expiry::At(
                from_epoch(secs, row.get::<_, Option<i32>>(5).unwrap_or(0))
                    .ok_or_else(|| corrupt("expiry"))?,
            ),
            (None, None) => Expiry::Never,
        };
        let fork = match row.get::<_, Option<String>>(9) {
            None => None,
            Some(source) => Some(ForkPoint {
                source,
                anchor: offset(row.get(10), row.get(11))?,
                sub_offset: u64::try_from(row.get::<_, i64>(12))
                    .map_err(|_| corrupt("fork sub-offset"))?,
            }),
        };
        Ok(Self {
            id: row.get(0),
            path: row.get(1),
            content_type,
            expiry,
            touched: row.get(6),
            closed: row.get(7),
            stream_seq: row.get(8),
            fork,
            source_id: row.get(13),
            base: offset(row.get(14), row.get(15))?,
            tail: offset(row.get(16), row.get(17))?,
            forks: row.get(18),
            deleted: row.get(19),
            version: row.get(20),
        })
    }

    /// What every response about the stream tells.
    pub(super) fn info(&self) -> StreamInfo {
        StreamInfo {
            id: self.id as u64,
            content_type: self.content_type.clone(),
            tail: self.tail,
            closed: self.closed,
            expiry: self.expiry,
        }
    }

    /// The stream as [`rules::same_config`](crate::storage::rules::same_config)
    /// compares it.
    pub(super) fn existing(&self) -> Existing<'_> {
        Existing {
            content_type: &self.content_type,
            expiry: self.expiry,
            closed: self.closed,
            fork: self.fork.as_ref(),
        }
    }

    /// Whether the stream has expired at `now`, had it been touched last at
    /// the later of its stored time and `local` (a renewal not yet written).
    pub(super) fn expired(&self, local: Option<i64>, now: SystemTime) -> bool {
        let touched = local.map_or(self.touched, |t| t.max(self.touched));
        !self.deleted && self.expiry.is_expired(from_micros(touched), now)
    }
}

/// An offset from its two columns.
pub(super) fn offset(index: i64, position: i64) -> Result<Offset, StreamError> {
    u64::try_from(index)
        .ok()
        .zip(u64::try_from(position).ok())
        .and_then(|(i, p)| Offset::new(i, p))
        .ok_or_else(|| StreamError::internal("stored offset out of range"))
}

/// An offset's two columns. Offsets have at most sixteen digits, so both
/// fit.
pub(super) fn columns(offset: Offset) -> (i64, i64) {
    (offset.index() as i64, offset.position() as i64)
}

/// Microseconds since the Unix epoch, saturating.
pub(super) fn micros(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

fn from_micros(micros: i64) -> SystemTime {
    let magnitude = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

/// An instant as whole seconds since the epoch (floored) and nanoseconds
/// past them, exactly; `None` beyond what a bigint of seconds holds.
pub(super) fn to_epoch(time: SystemTime) -> Option<(i64, i32)> {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => Some((
            i64::try_from(after.as_secs()).ok()?,
            i32::try_from(after.subsec_nanos()).ok()?,
        )),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).ok()?;
            Some(match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, i32::try_from(1_000_000_000 - n).ok()?),
            })
        }
    }
}

fn from_epoch(secs: i64, nanos: i32) -> Option<SystemTime> {
    let nanos = Duration::from_nanos(u64::try_from(nanos).ok()?);
    let whole = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH.checked_add(whole)?.checked_add(nanos)
    } else {
        UNIX_EPOCH.checked_sub(whole)?.checked_add(nanos)
    }
}

/// An expiry as columns `ttl_secs`, `expires_secs` and `expires_nanos`.
pub(super) type ExpiryColumns = (Option<i64>, Option<i64>, Option<i32>);

/// An expiry's columns: TTL seconds, or the instant's seconds and
/// nanoseconds.
pub(super) fn expiry_columns(expiry: Expiry) -> Result<ExpiryColumns, StreamError> {
    let too_far = || StreamError::invalid("expiry is too far away");
    Ok(match expiry {
        Expiry::Never => (None, None, None),
        Expiry::Ttl(secs) => (
            Some(i64::try_from(secs).map_err(|_| too_far())?),
            None,
            None,
        ),
        Expiry::At(at) => {
            let (secs, nanos) = to_epoch(at).ok_or_else(too_far)?;
            (None, Some(secs), Some(nanos))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_exactly() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 1),
            UNIX_EPOCH - Duration::from_secs(86_400),
        ] {
            let (secs, nanos) = to_epoch(t).unwrap();
            assert_eq!(from_epoch(secs, nanos), Some(t));
        }
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(from_micros(micros(t)), t);
        assert_eq!(
            from_micros(micros(UNIX_EPOCH - Duration::from_micros(7))),
            UNIX_EPOCH - Duration::from_micros(7)
        );
    }
}
