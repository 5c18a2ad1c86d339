//! Work each node does in the background: writing batched TTL renewals,
//! merging small record rows, and deleting expired streams nobody asks for.

use std::sync::{PoisonError, Weak};
use std::time::{Duration, SystemTime};

use super::error::db;
use super::row::{StreamRow, COLUMNS};
use super::store::{Store, COMPACT_AFTER};
use crate::storage::StreamError;

/// A row smaller than this is merged with its neighbours.
const SMALL_ROW: i32 = 16 * 1024;
/// Merged rows grow to about this size.
const TARGET_ROW: i64 = 64 * 1024;
/// How often renewals are written and rows merged.
const TICK: Duration = Duration::from_secs(1);
/// How often expired streams are looked for.
const SWEEP_EVERY: u32 = 10;
/// A stream is swept only once it expired this long ago, so that renewals
/// other nodes have not written yet are not overtaken.
const SWEEP_GRACE: Duration = Duration::from_secs(5);

/// Runs until the store is dropped.
pub(super) async fn run(store: Weak<Store>) {
    let mut ticks = 0u32;
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(store) = store.upgrade() else {
            return;
        };
        ticks = ticks.wrapping_add(1);
        if let Err(e) = flush_touches(&store).await {
            tracing::debug!(error = %e, "TTL renewals not written yet");
        }
        if let Err(e) = compact(&store, ticks == 1).await {
            tracing::debug!(error = %e, "compaction skipped");
        }
        if ticks.is_multiple_of(SWEEP_EVERY) {
            if let Err(e) = sweep(&store).await {
                tracing::debug!(error = %e, "expiry sweep skipped");
            }
        }
    }
}

/// Writes the renewals reads made, in one statement.
pub(super) async fn flush_touches(store: &Store) -> Result<(), StreamError> {
    let (ids, times): (Vec<i64>, Vec<i64>) = store
        .touches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(id, at)| (*id, *at))
        .unzip();
    if ids.is_empty() {
        return Ok(());
    }
    let client = store.pool.get().await.map_err(super::error::pool)?;
    client
        .execute(
            "UPDATE ds_streams s SET touched_us = greatest(s.touched_us, v.at)
               FROM unnest($1::bigint[], $2::bigint[]) AS v(id, at) WHERE s.id = v.id",
            &[&ids, &times],
        )
        .await
        .map_err(db)?;
    // Renewals made meanwhile are newer and stay.
    let mut touches = store.touches.lock().unwrap_or_else(PoisonError::into_inner);
    for (id, at) in ids.iter().zip(&times) {
        if touches.get(id) == Some(at) {
            touches.remove(id);
        }
    }
    Ok(())
}

/// Merges runs of small rows of the streams this node appended many rows
/// to; at start-up, of every stream that gained many, whichever node
/// appended them (it may have stopped before merging).
pub(super) async fn compact(store: &Store, everything: bool) -> Result<(), StreamError> {
    let mut ids: Vec<i64> = std::mem::take(
        &mut *store
            .to_compact
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    )
    .into_iter()
    .collect();
    if everything {
        let client = store.pool.get().await.map_err(super::error::pool)?;
        ids.extend(
            client
                .query(
                    "SELECT id FROM ds_streams WHERE uncompacted >= $1",
                    &[&COMPACT_AFTER],
                )
                .await
                .map_err(db)?
                .iter()
                .map(|row| row.get::<_, i64>(0)),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    for (i, id) in ids.iter().enumerate() {
        if let Err(e) = compact_stream(store, *id).await {
            // Try the rest again next time.
            store
                .to_compact
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(&ids[i..]);
            return Err(e);
        }
    }
    Ok(())
}

async fn compact_stream(store: &Store, id: i64) -> Result<(), StreamError> {
    let mut client = store.pool.get().await.map_err(super::error::pool)?;
    let tx = client.transaction().await.map_err(db)?;
    // Another node may be at it; and the stream must not be deleted
    // meanwhile, which KEY SHARE prevents without holding up appends.
    let claimed: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(7345, (($1::bigint) % 2147483647)::integer)",
            &[&id],
        )
        .await
        .map_err(db)?
        .get(0);
    let Some(seen) = (match claimed {
        true => tx
            .query_opt(
                "SELECT uncompacted FROM ds_streams WHERE id = $1 FOR KEY SHARE",
                &[&id],
            )
            .await
            .map_err(db)?
            .map(|row| row.get::<_, i32>(0)),
        false => None,
    }) else {
        return Ok(());
    };
    let rows = tx
        .query(
            "SELECT start_index, end_index, octet_length(data) FROM ds_chunks
              WHERE stream_id = $1 ORDER BY start_index",
            &[&id],
        )
        .await
        .map_err(db)?;
    let mut groups: Vec<(i64, i64, usize)> = Vec::new();
    let mut current: Option<(i64, i64, usize, i64)> = None;
    for row in &rows {
        let (start, end, size): (i64, i64, i32) = (row.get(0), row.get(1), row.get(2));
        let fits = |c: &(i64, i64, usize, i64)| {
            c.1 == start && size < SMALL_ROW && c.3 + i64::from(size) <= TARGET_ROW
        };
        match current.as_mut() {
            Some(c) if fits(c) => {
                c.1 = end;
                c.2 += 1;
                c.3 += i64::from(size);
            }
            _ => {
                if let Some((s, e, n, _)) = current.take() {
                    groups.push((s, e, n));
                }
                current = (size < SMALL_ROW).then_some((start, end, 1, i64::from(size)));
            }
        }
    }
    groups.extend(current.map(|(s, e, n, _)| (s, e, n)));
    let mut merged = 0usize;
    for (start, end, count) in groups.into_iter().filter(|g| g.2 > 1) {
        let rows = tx
            .query(
                "DELETE FROM ds_chunks WHERE stream_id = $1 AND start_index >= $2
                   AND start_index < $3 RETURNING start_index, start_pos, lens, data",
                &[&id, &start, &end],
            )
            .await
            .map_err(db)?;
        let mut parts: Vec<(i64, i64, Vec<i32>, Vec<u8>)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        parts.sort_unstable_by_key(|p| p.0);
        let start_pos = parts.first().map_or(0, |p| p.1);
        let mut lens = Vec::new();
        let mut data = Vec::new();
        for (_, _, l, d) in parts {
            lens.extend(l);
            data.extend(d);
        }
        tx.execute(
            "INSERT INTO ds_chunks (stream_id, start_index, start_pos, end_index, lens, data)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&id, &start, &start_pos, &end, &lens, &data],
        )
        .await
        .map_err(db)?;
        merged += count;
    }
    tx.execute(
        "UPDATE ds_streams SET uncompacted = greatest(uncompacted - $2, 0) WHERE id = $1",
        &[&id, &seen],
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    if merged > 0 {
        tracing::debug!(id, rows = merged, "merged small rows");
    }
    Ok(())
}

/// Deletes streams that expired a while ago.
pub(super) async fn sweep(store: &Store) -> Result<(), StreamError> {
    let Some(now) = SystemTime::now().checked_sub(SWEEP_GRACE) else {
        return Ok(());
    };
    let client = store.pool.get().await.map_err(super::error::pool)?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM ds_streams s
                  WHERE NOT s.deleted AND (s.ttl_secs IS NOT NULL OR s.expires_secs IS NOT NULL)"
            ),
            &[],
        )
        .await
        .map_err(db)?;
    drop(client);
    for row in &rows {
        let stream = StreamRow::parse(row)?;
        if store.is_expired(&stream, now) {
            store.expire(&stream.path, now).await?;
        }
    }
    Ok(())
}
