//! Creating and deleting streams, expiry included: the operations that
//! change several streams' rows at once (a fork source's reference count,
//! a chain of deleted sources), each in a transaction that locks them.

use std::time::SystemTime;

use deadpool_postgres::Transaction;

use super::error::db;
use super::read::{chain, scan, Limit, Preloaded};
use super::row::{columns, expiry_columns, micros, StreamRow, COLUMNS};
use super::store::{contended, pack, Failed, Store, ATTEMPTS};
use crate::offset::Offset;
use crate::storage::rules;
use crate::storage::{Create, StreamError, StreamErrorKind, StreamInfo};

impl Store {
    /// Deletes the stream at `path` if it has expired at `now`.
    pub(super) async fn expire(&self, path: &str, now: SystemTime) -> Result<(), StreamError> {
        for _ in 0..ATTEMPTS {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            let changed = match locked(&tx, path).await? {
                Some(stream) if self.is_expired(&stream, now) => {
                    tracing::debug!(stream = %path, "stream expired");
                    match delete_locked(&tx, stream).await {
                        Ok(changed) => changed,
                        Err(Failed::Raced) => continue,
                        Err(Failed::Answer(e)) => return Err(e),
                    }
                }
                _ => return Ok(()),
            };
            match tx.commit().await.map_err(Failed::from) {
                Ok(()) => {}
                Err(Failed::Raced) => continue,
                Err(Failed::Answer(e)) => return Err(e),
            }
            self.changed(&changed);
            return Ok(());
        }
        Err(contended())
    }

    pub(super) async fn create(&self, create: Create) -> Result<(bool, StreamInfo), StreamError> {
        for _ in 0..ATTEMPTS {
            match self.try_create(create.clone()).await {
                Ok(done) => return Ok(done),
                Err(Failed::Answer(e)) => return Err(e),
                Err(Failed::Raced) => continue,
            }
        }
        Err(contended())
    }

    async fn try_create(&self, create: Create) -> Result<(bool, StreamInfo), Failed> {
        let now = create.now;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut changed = Vec::new();

        let mut existing = locked(&tx, &create.path).await?;
        if let Some(stream) = existing.take_if(|s| self.is_expired(s, now)) {
            changed.extend(delete_locked(&tx, stream).await?);
            existing = locked(&tx, &create.path).await?;
        }
        if let Some(stream) = existing {
            tx.rollback().await?;
            self.changed(&changed);
            if stream.deleted {
                return Err(
                    StreamError::conflict("stream was deleted and is kept for its forks").into(),
                );
            }
            return if rules::same_config(&stream.existing(), &create.config) {
                Ok((false, stream.info()))
            } else {
                Err(StreamError::conflict("stream exists with a different configuration").into())
            };
        }

        let Create {
            path, config, body, ..
        } = create;
        let (content_type, expiry, fork, base, mut records) = match &config.fork {
            None => (
                config.content_type.clone().unwrap_or_default(),
                config.expiry,
                None,
                Offset::ZERO,
                Vec::new(),
            ),
            Some(request) => {
                let mut source = locked(&tx, &request.source).await?;
                if let Some(stream) = source.take_if(|s| self.is_expired(s, now)) {
                    changed.extend(delete_locked(&tx, stream).await?);
                    source = locked(&tx, &request.source).await?;
                }
                let source = match source {
                    None => {
                        return Err(StreamError::new(
                            StreamErrorKind::NotFound,
                            "fork source not found",
                        )
                        .into())
                    }
                    Some(s) if s.deleted => {
                        return Err(StreamError::conflict("fork source was deleted").into())
                    }
                    Some(s) => s,
                };
                let content_type = match &config.content_type {
                    Some(ct) if !ct.matches(&source.content_type) => {
                        return Err(StreamError::new(
                            StreamErrorKind::ContentTypeMismatch,
                            "content type does not match the fork source's",
                        )
                        .into())
                    }
                    _ => source.content_type.clone(),
                };
                let json = content_type.is_json();
                let view = preload(&tx, &source, json, request).await?;
                let resolved = rules::resolve_fork(&view, json, request)?;
                (
                    content_type,
                    rules::fork_expiry(source.expiry, config.expiry),
                    Some((resolved.point, source.id)),
                    resolved.base,
                    resolved.prefix.into_iter().collect::<Vec<_>>(),
                )
            }
        };
        records.extend(
            rules::records(&content_type, body, true).map_err(|b| StreamError::invalid(b.0))?,
        );
        let tail = records
            .iter()
            .try_fold(base, |at, r| at.after_record(r.len()))
            .ok_or_else(|| StreamError::new(StreamErrorKind::Full, "stream is full"))?;

        let (ttl, expires_secs, expires_nanos) = expiry_columns(expiry)?;
        let (fork_source, anchor, sub, source_id) = match &fork {
            Some((point, source)) => {
                let sub = i64::try_from(point.sub_offset)
                    .map_err(|_| StreamError::invalid("fork sub-offset is too large"))?;
                (
                    Some(point.source.clone()),
                    Some(columns(point.anchor)),
                    Some(sub),
                    Some(*source),
                )
            }
            None => (None, None, None, None),
        };
        let (base_index, base_pos) = columns(base);
        let (tail_index, tail_pos) = columns(tail);
        let row = tx
            .query_one(
                "INSERT INTO ds_streams (id, path, content_type, ttl_secs, expires_secs,
                     expires_nanos, touched_us, closed, fork_source, fork_anchor_index,
                     fork_anchor_pos, fork_sub, source_id, base_index, base_pos, tail_index,
                     tail_pos)
                 VALUES (nextval('ds_stream_ids'), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                     $11, $12, $13, $14, $15, $16)
                 RETURNING id",
                &[
                    &path,
                    &content_type.as_str(),
                    &ttl,
                    &expires_secs,
                    &expires_nanos,
                    &micros(now),
                    &config.closed,
                    &fork_source,
                    &anchor.map(|a| a.0),
                    &anchor.map(|a| a.1),
                    &sub,
                    &source_id,
                    &base_index,
                    &base_pos,
                    &tail_index,
                    &tail_pos,
                ],
            )
            .await?;
        let id: i64 = row.get(0);
        if !records.is_empty() {
            let (lens, data) = pack(&records)?;
            tx.execute(
                "INSERT INTO ds_chunks (stream_id, start_index, start_pos, end_index, lens, data)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &base_index, &base_pos, &tail_index, &lens, &data],
            )
            .await?;
        }
        if let Some(source) = source_id {
            tx.execute(
                "UPDATE ds_streams SET forks = forks + 1, version = version + 1 WHERE id = $1",
                &[&source],
            )
            .await?;
        }
        tx.commit().await?;
        self.changed(&changed);
        tracing::debug!(stream = %path, id, "stream created");
        Ok((
            true,
            StreamInfo {
                id: id as u64,
                content_type,
                tail,
                closed: config.closed,
                expiry,
            },
        ))
    }

    pub(super) async fn delete(&self, path: &str) -> Result<(), StreamError> {
        let now = SystemTime::now();
        for _ in 0..ATTEMPTS {
            match self.try_delete(path, now).await {
                Ok(()) => return Ok(()),
                Err(Failed::Answer(e)) => return Err(e),
                Err(Failed::Raced) => continue,
            }
        }
        Err(contended())
    }

    async fn try_delete(&self, path: &str, now: SystemTime) -> Result<(), Failed> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(stream) = locked(&tx, path).await? else {
            return Err(StreamError::not_found().into());
        };
        let mut changed = Vec::new();
        let stream = if self.is_expired(&stream, now) {
            changed.extend(delete_locked(&tx, stream).await?);
            match locked(&tx, path).await? {
                Some(s) => s,
                None => {
                    tx.commit().await?;
                    self.changed(&changed);
                    return Err(StreamError::not_found().into());
                }
            }
        } else {
            stream
        };
        if stream.deleted {
            tx.commit().await?;
            self.changed(&changed);
            return Err(StreamError::gone().into());
        }
        changed.extend(delete_locked(&tx, stream).await?);
        tx.commit().await?;
        self.changed(&changed);
        Ok(())
    }
}

/// The stream at `path`, locked until the transaction ends.
async fn locked(tx: &Transaction<'_>, path: &str) -> Result<Option<StreamRow>, StreamError> {
    let sql = format!("SELECT {COLUMNS} FROM ds_streams s WHERE s.path = $1 FOR UPDATE");
    let statement = tx.prepare_cached(&sql).await.map_err(db)?;
    let row = tx.query_opt(&statement, &[&path]).await.map_err(db)?;
    row.as_ref().map(StreamRow::parse).transpose()
}

/// Deletes a locked stream: softly while forks read from it, else with its
/// records, releasing its source and removing every ancestor that was
/// deleted and is no longer read. Returns the streams that changed.
async fn delete_locked(tx: &Transaction<'_>, stream: StreamRow) -> Result<Vec<i64>, Failed> {
    if stream.forks > 0 {
        tx.execute(
            "UPDATE ds_streams SET deleted = true, version = version + 1 WHERE id = $1",
            &[&stream.id],
        )
        .await?;
        return Ok(vec![stream.id]);
    }
    let mut removed = Vec::new();
    let mut next = Some(stream.id);
    while let Some(id) = next.take() {
        tx.execute("DELETE FROM ds_chunks WHERE stream_id = $1", &[&id])
            .await?;
        tx.execute("DELETE FROM ds_producers WHERE stream_id = $1", &[&id])
            .await?;
        let source: Option<Option<i64>> = tx
            .query_opt(
                "DELETE FROM ds_streams WHERE id = $1 RETURNING source_id",
                &[&id],
            )
            .await?
            .map(|row| row.get(0));
        removed.push(id);
        if let Some(Some(source)) = source {
            let released = tx
                .query_opt(
                    "UPDATE ds_streams SET forks = forks - 1, version = version + 1
                      WHERE id = $1 RETURNING deleted AND forks <= 0",
                    &[&source],
                )
                .await?;
            if released.is_some_and(|row| row.get::<_, bool>(0)) {
                next = Some(source);
            }
        }
    }
    Ok(removed)
}

/// The source's records a fork request needs, fetched ahead of
/// [`rules::resolve_fork`].
async fn preload(
    tx: &Transaction<'_>,
    source: &StreamRow,
    json: bool,
    request: &crate::stream::ForkRequest,
) -> Result<Preloaded, StreamError> {
    let tail = source.tail;
    let anchor = request.offset.unwrap_or(tail);
    if anchor >= tail {
        return Ok(Preloaded::new(tail, Vec::new()));
    }
    let left = tail.index() - anchor.index();
    let limit = if json {
        Limit {
            bytes: usize::MAX,
            records: usize::try_from(request.sub_offset.clamp(1, left)).unwrap_or(usize::MAX),
            data: false,
        }
    } else {
        Limit {
            bytes: usize::MAX,
            records: 1,
            data: request.sub_offset > 0,
        }
    };
    let segments = chain(tx, source.id, source.source_id, source.base, tail).await?;
    let found = scan(tx, &segments, anchor, limit).await?;
    Ok(Preloaded::new(tail, found))
}
