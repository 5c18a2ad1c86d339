//! Reading records: a stream's fork chain, and the records of a range.
//!
//! A fork stores only its own records. Below its base it reads its
//! source's, up to the fork point, and so on up the chain; nothing is
//! copied when a fork is made.

use std::collections::HashMap;

use bytes::Bytes;
use deadpool_postgres::GenericClient;

use super::error::db;
use super::row::{columns, offset};
use crate::offset::Offset;
use crate::storage::rules::SourceView;
use crate::storage::StreamError;

/// The records of stream `id` from its `base` to `end` (exclusive), as the
/// stream being read sees them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    pub(super) id: i64,
    pub(super) base: Offset,
    pub(super) end: Offset,
}

/// The segments a stream reads, root first: each ancestor up to where the
/// chain below it diverged, then the stream itself up to `tail`.
pub(super) async fn chain(
    client: &impl GenericClient,
    id: i64,
    source: Option<i64>,
    base: Offset,
    tail: Offset,
) -> Result<Vec<Segment>, StreamError> {
    let mut segments = vec![Segment {
        id,
        base,
        end: tail,
    }];
    if source.is_none() {
        return Ok(segments);
    }
    let sql = "WITH RECURSIVE chain(id, source_id, base_index, base_pos, depth) AS (
            SELECT id, source_id, base_index, base_pos, 0 FROM ds_streams WHERE id = $1
            UNION ALL
            SELECT s.id, s.source_id, s.base_index, s.base_pos, c.depth + 1
              FROM ds_streams s JOIN chain c ON s.id = c.source_id
        )
        SELECT id, base_index, base_pos FROM chain WHERE depth > 0 ORDER BY depth";
    let statement = client.prepare_cached(sql).await.map_err(db)?;
    let mut end = base;
    for row in client.query(&statement, &[&id]).await.map_err(db)? {
        let base = offset(row.get(1), row.get(2))?;
        segments.push(Segment {
            id: row.get(0),
            base,
            end,
        });
        // A fork may diverge below its source's own fork point.
        end = end.min(base);
    }
    segments.reverse();
    Ok(segments)
}

/// One record found by [`scan`].
#[derive(Debug, Clone)]
pub(super) struct Found {
    pub(super) start: Offset,
    pub(super) len: usize,
    /// The bytes, when asked for.
    pub(super) data: Option<Bytes>,
}

/// How much [`scan`] gathers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limit {
    /// Stop before a record that would take the total past this, unless it
    /// is the first.
    pub(super) bytes: usize,
    /// Stop after this many records.
    pub(super) records: usize,
    /// Fetch the records' bytes, not only their lengths.
    pub(super) data: bool,
}

/// The records from `from` on, through `segments`, within `limit`.
///
/// Records are contiguous: the first starts at `from` unless `from` is not
/// a record boundary, in which case nothing is returned; the caller tells
/// that apart from the tail.
pub(super) async fn scan(
    client: &impl GenericClient,
    segments: &[Segment],
    from: Offset,
    limit: Limit,
) -> Result<Vec<Found>, StreamError> {
    let sql = if limit.data {
        "SELECT start_index, start_pos, lens, data FROM ds_chunks
          WHERE stream_id = $1 AND end_index > $2 AND start_index < $3
          ORDER BY start_index LIMIT $4"
    } else {
        "SELECT start_index, start_pos, lens FROM ds_chunks
          WHERE stream_id = $1 AND end_index > $2 AND start_index < $3
          ORDER BY start_index LIMIT $4"
    };
    let statement = client.prepare_cached(sql).await.map_err(db)?;
    let mut found = Vec::new();
    let mut bytes = 0usize;
    let mut at = from;
    for segment in segments {
        if at >= segment.end {
            continue;
        }
        if at < segment.base {
            break;
        }
        let mut batch: i64 = 8;
        'rows: loop {
            let (at_index, _) = columns(at);
            let (end_index, _) = columns(segment.end);
            let rows = client
                .query(&statement, &[&segment.id, &at_index, &end_index, &batch])
                .await
                .map_err(db)?;
            let complete = rows.len() < usize::try_from(batch).unwrap_or(usize::MAX);
            for row in &rows {
                let mut start = offset(row.get(0), row.get(1))?;
                let lens: Vec<i32> = row.get(2);
                let data: Option<Bytes> = limit.data.then(|| Bytes::from(row.get::<_, Vec<u8>>(3)));
                let mut skip = 0usize;
                for len in lens {
                    let len = usize::try_from(len)
                        .map_err(|_| StreamError::internal("stored record length is negative"))?;
                    if start >= segment.end {
                        break 'rows;
                    }
                    if start.index() >= at.index() {
                        if start != at
                            || found.len() >= limit.records
                            || (!found.is_empty() && bytes + len > limit.bytes)
                        {
                            return Ok(found);
                        }
                        let record = match &data {
                            Some(data) => Some(data.get(skip..skip + len).map_or_else(
                                || {
                                    Err(StreamError::internal(
                                        "stored chunk is shorter than its records",
                                    ))
                                },
                                |_| Ok(data.slice(skip..skip + len)),
                            )?),
                            None => None,
                        };
                        found.push(Found {
                            start,
                            len,
                            data: record,
                        });
                        bytes += len;
                        at = start
                            .after_record(len)
                            .ok_or_else(|| StreamError::internal("stored offset out of range"))?;
                    }
                    skip += len;
                    start = start
                        .after_record(len)
                        .ok_or_else(|| StreamError::internal("stored offset out of range"))?;
                }
            }
            if complete || at >= segment.end {
                break;
            }
            batch = (batch * 2).min(1024);
        }
    }
    Ok(found)
}

/// A fork source's records near the fork point, fetched before the fork is
/// resolved, since [`SourceView`] cannot wait on the database.
#[derive(Debug)]
pub(super) struct Preloaded {
    pub(super) tail: Offset,
    pub(super) records: HashMap<Offset, (usize, Option<Bytes>)>,
}

impl Preloaded {
    pub(super) fn new(tail: Offset, found: Vec<Found>) -> Self {
        let records = found
            .into_iter()
            .map(|f| (f.start, (f.len, f.data)))
            .collect();
        Self { tail, records }
    }
}

impl SourceView for Preloaded {
    fn tail(&self) -> Offset {
        self.tail
    }

    fn record_len(&self, at: Offset) -> Option<usize> {
        self.records.get(&at).map(|(len, _)| *len)
    }

    fn record_at(&self, at: Offset) -> Option<Bytes> {
        self.records.get(&at).and_then(|(_, data)| data.clone())
    }

    fn is_boundary(&self, at: Offset) -> bool {
        at == self.tail || self.records.contains_key(&at)
    }
}
