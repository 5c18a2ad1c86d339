//! The storage operations on one stream at a time: appends, reads and the
//! rest, each a few statements against the tables. Creates and deletes are
//! in `lifecycle`.
//!
//! Appends are optimistic: the stream's row and the claiming producer's
//! state are read (or remembered from this node's last append to the
//! stream), [`rules::plan_append`] decides, and one statement writes the
//! records, the new tail and writer state, and the producer's state,
//! provided the row's `version` is still the one decided on. When another
//! writer got there first, the append reads the row and decides again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deadpool_postgres::{GenericClient, Pool};

use super::error::{db, is_unique_violation, pool};
use super::read::{chain, scan, Limit};
use super::row::{columns, micros, StreamRow, COLUMNS};
use super::wake::{tail_wait, Waiters, WakeChannel};
use crate::offset::{Offset, ReadFrom};
use crate::storage::rules::{self, AppendPlan, WriterState};
use crate::storage::{
    Append, AppendOutcome, Appended, Listed, Read, ReadResult, StreamError, StreamErrorKind,
    StreamInfo,
};

/// How many times an operation that lost a race to another writer is tried
/// again before the client is asked to retry.
pub(super) const ATTEMPTS: usize = 64;

/// Sliding-TTL renewals not yet written, by stream id: microseconds since
/// the epoch.
pub(super) type Touches = Arc<Mutex<HashMap<i64, i64>>>;

/// What every operation needs.
pub(super) struct Store {
    pub(super) pool: Pool,
    pub(super) waiters: Arc<Waiters>,
    pub(super) channel: Box<dyn WakeChannel>,
    pub(super) touches: Touches,
    pub(super) recheck: Duration,
    /// One slot per stream appended to on this node, so that this node's
    /// writers to one stream queue instead of racing each other (only
    /// writers on other nodes can make an append decide again), holding
    /// the row the last append left.
    pub(super) appending: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
    /// Streams this node appended many rows to since they were merged.
    pub(super) to_compact: Mutex<HashSet<i64>>,
}

/// After this many rows appended to a stream, its small rows are merged.
pub(super) const COMPACT_AFTER: i32 = 16;

/// A stream's row and writer state as this node's last append to it left
/// them: the next append decides on it without reading the row again.
pub(super) struct Cached {
    stream: StreamRow,
    writer: WriterState,
}

impl Cached {
    /// Whether `append` can be decided on this: the stream looks alive, and
    /// the claiming producer, if any, is known.
    fn usable(&self, store: &Store, append: &Append) -> bool {
        !self.stream.deleted
            && !store.is_expired(&self.stream, append.now)
            && append
                .producer
                .as_ref()
                .is_none_or(|claim| self.writer.producers.contains_key(&claim.id))
    }
}

/// Why an attempt at an operation ended.
pub(super) enum Failed {
    /// Give the client this answer.
    Answer(StreamError),
    /// Another writer changed what the attempt read: try again.
    Raced,
}

impl From<StreamError> for Failed {
    fn from(e: StreamError) -> Self {
        Failed::Answer(e)
    }
}

impl From<tokio_postgres::Error> for Failed {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let raced = is_unique_violation(&e)
            || matches!(
                e.code(),
                Some(&SqlState::T_R_SERIALIZATION_FAILURE | &SqlState::T_R_DEADLOCK_DETECTED)
            );
        if raced {
            Failed::Raced
        } else {
            Failed::Answer(db(e))
        }
    }
}

/// A pause before attempt `attempt + 1` after losing a race: none for the
/// first few, then a random wait that grows, so that writers on several
/// nodes stop colliding in step and none loses every time.
async fn backoff(attempt: usize) {
    const FREE: usize = 4;
    if attempt < FREE {
        return;
    }
    let ceiling_us = 100 * (attempt - FREE + 1).min(20) as u32;
    // Nanoseconds of the clock are random enough to spread writers out.
    let noise = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let wait = std::time::Duration::from_micros(u64::from(noise % ceiling_us.max(1)));
    tokio::time::sleep(wait).await;
}

pub(super) fn contended() -> StreamError {
    StreamError::new(
        StreamErrorKind::Unavailable,
        "too many concurrent writers, retry later",
    )
}

impl Store {
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Client, StreamError> {
        self.pool.get().await.map_err(pool)
    }

    fn local_touch(&self, id: i64) -> Option<i64> {
        self.touches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    /// Renews a sliding TTL in memory; the flusher writes it within a
    /// second, so reads do not each cost a write.
    fn touch(&self, stream: &StreamRow, now: SystemTime) {
        if matches!(stream.expiry, crate::stream::Expiry::Ttl(_)) {
            let now = micros(now);
            let mut touches = self.touches.lock().unwrap_or_else(PoisonError::into_inner);
            let at = touches.entry(stream.id).or_insert(now);
            *at = (*at).max(now);
        }
    }

    pub(super) fn is_expired(&self, stream: &StreamRow, now: SystemTime) -> bool {
        stream.expired(self.local_touch(stream.id), now)
    }

    /// Wakes readers of `ids` here and on other nodes.
    pub(super) fn changed(&self, ids: &[i64]) {
        for &id in ids {
            self.waiters.wake(id as u64);
            self.channel.publish(id as u64);
        }
    }

    /// The stream at `path`, read without a lock.
    async fn find(
        &self,
        client: &impl GenericClient,
        path: &str,
    ) -> Result<Option<StreamRow>, StreamError> {
        let sql = format!("SELECT {COLUMNS} FROM ds_streams s WHERE s.path = $1");
        let statement = client.prepare_cached(&sql).await.map_err(db)?;
        let row = client.query_opt(&statement, &[&path]).await.map_err(db)?;
        row.as_ref().map(StreamRow::parse).transpose()
    }

    /// The slot this node's appends to `path` queue on, with what the last
    /// of them left.
    fn append_slot(&self, path: &str) -> Arc<tokio::sync::Mutex<Option<Cached>>> {
        let mut slots = self
            .appending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(path) {
            return slot.clone();
        }
        if slots.len() >= 4096 {
            // Forget the streams no append is using now.
            slots.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        let slot = Arc::new(tokio::sync::Mutex::new(None));
        slots.insert(path.to_owned(), slot.clone());
        slot
    }

    /// Appends. This node's appends to one stream queue on its slot, and
    /// while no other node writes to it each needs one round trip: it is
    /// decided on the row the previous one left, and the write's version
    /// guard catches any change made elsewhere, after which the row is read
    /// again.
    pub(super) async fn append(&self, append: Append) -> Result<Appended, StreamError> {
        let slot = self.append_slot(&append.path);
        let mut cached = slot.lock().await;
        for attempt in 0..ATTEMPTS {
            let usable = cached.take().filter(|c| c.usable(self, &append));
            match self.try_append(append.clone(), usable).await {
                Ok((done, left)) => {
                    *cached = left;
                    return Ok(done);
                }
                Err(Failed::Answer(e)) => return Err(e),
                Err(Failed::Raced) => backoff(attempt).await,
            }
        }
        Err(contended())
    }

    /// The stream's row and the claiming producer's state, read now;
    /// `None` when the stream has expired and must be deleted first.
    async fn writer_state(
        &self,
        client: &deadpool_postgres::Client,
        append: &Append,
    ) -> Result<Option<(StreamRow, WriterState)>, Failed> {
        let sql = format!(
            "SELECT {COLUMNS}, p.epoch, p.last_seq FROM ds_streams s
               LEFT JOIN ds_producers p ON p.stream_id = s.id AND p.producer = $2
              WHERE s.path = $1"
        );
        let statement = client.prepare_cached(&sql).await?;
        let producer_id = append.producer.as_ref().map(|p| p.id.as_str());
        let Some(row) = client
            .query_opt(&statement, &[&append.path, &producer_id])
            .await?
        else {
            return Err(StreamError::not_found().into());
        };
        let stream = StreamRow::parse(&row)?;
        if self.is_expired(&stream, append.now) {
            return Ok(None);
        }
        if stream.deleted {
            return Err(StreamError::gone().into());
        }
        let mut writer = WriterState {
            closed: stream.closed,
            stream_seq: stream.stream_seq.clone(),
            producers: HashMap::new(),
        };
        if let (Some(id), Some(epoch), Some(last_seq)) = (
            producer_id,
            row.get::<_, Option<i64>>(21),
            row.get::<_, Option<i64>>(22),
        ) {
            let state = crate::producer::ProducerState {
                epoch: epoch as u64,
                last_seq: last_seq as u64,
            };
            writer.producers.insert(id.to_owned(), state);
        }
        Ok(Some((stream, writer)))
    }

    /// One attempt at an append, decided on `cached` when given, else on
    /// the row read now. Returns what the next append may start from.
    async fn try_append(
        &self,
        append: Append,
        cached: Option<Cached>,
    ) -> Result<(Appended, Option<Cached>), Failed> {
        let now = append.now;
        let client = self.client().await?;
        let from_cache = cached.is_some();
        let (stream, mut writer) = match cached {
            Some(c) => (c.stream, c.writer),
            None => match self.writer_state(&client, &append).await? {
                Some(found) => found,
                None => {
                    drop(client);
                    self.expire(&append.path, now).await?;
                    return Err(Failed::Raced);
                }
            },
        };
        // Only a write is checked by its version guard: any other answer
        // decided on a remembered row is decided again on a fresh one.
        let planned = rules::plan_append(&stream.content_type, stream.tail, &writer, append);
        let (records, producer, stream_seq, close) = match planned {
            Ok(AppendPlan::Write {
                records,
                producer,
                stream_seq,
                close,
            }) => (records, producer, stream_seq, close),
            _ if from_cache => return Err(Failed::Raced),
            Ok(AppendPlan::Duplicate(producer)) => {
                let done = Appended {
                    info: stream.info(),
                    appended: false,
                    outcome: AppendOutcome::Duplicate { producer },
                };
                return Ok((done, Some(Cached { stream, writer })));
            }
            Ok(AppendPlan::AlreadyClosed) => {
                let done = Appended {
                    info: stream.info(),
                    appended: false,
                    outcome: AppendOutcome::AlreadyClosed,
                };
                return Ok((done, Some(Cached { stream, writer })));
            }
            Err(e) => return Err(e.into()),
        };
        let tail = records
            .iter()
            .try_fold(stream.tail, |at, r| at.after_record(r.len()))
            .ok_or_else(|| StreamError::new(StreamErrorKind::Full, "stream is full"))?;
        let (lens, data) = pack(&records)?;
        let (old_index, old_pos) = columns(stream.tail);
        let (tail_index, tail_pos) = columns(tail);
        let (producer_name, epoch, last_seq) = match &producer {
            Some((id, state)) => (
                Some(id.as_str()),
                Some(state.epoch as i64),
                Some(state.last_seq as i64),
            ),
            None => (None, None, None),
        };
        let rows_added = i32::from(!records.is_empty());
        let statement = client
            .prepare_cached(
                "WITH upd AS (
                    UPDATE ds_streams
                       SET tail_index = $3, tail_pos = $4, closed = closed OR $5,
                           stream_seq = coalesce($6, stream_seq),
                           touched_us = greatest(touched_us, $7),
                           version = version + 1, uncompacted = uncompacted + $8
                     WHERE id = $1 AND version = $2
                 RETURNING id, uncompacted
                 ), ins AS (
                    INSERT INTO ds_chunks (stream_id, start_index, start_pos, end_index, lens, data)
                    SELECT id, $9, $10, $3, $11, $12 FROM upd WHERE $8 > 0
                 ), producer AS (
                    INSERT INTO ds_producers (stream_id, producer, epoch, last_seq)
                    SELECT id, $13, $14, $15 FROM upd WHERE $13::text IS NOT NULL
                    ON CONFLICT (stream_id, producer)
                    DO UPDATE SET epoch = excluded.epoch, last_seq = excluded.last_seq
                 )
                 SELECT uncompacted FROM upd",
            )
            .await?;
        let written = client
            .query_opt(
                &statement,
                &[
                    &stream.id,
                    &stream.version,
                    &tail_index,
                    &tail_pos,
                    &close,
                    &stream_seq,
                    &micros(now),
                    &rows_added,
                    &old_index,
                    &old_pos,
                    &lens,
                    &data,
                    &producer_name,
                    &epoch,
                    &last_seq,
                ],
            )
            .await?;
        let Some(uncompacted) = written.map(|row| row.get::<_, i32>(0)) else {
            return Err(Failed::Raced);
        };
        if rows_added > 0 && uncompacted % COMPACT_AFTER == 0 {
            self.to_compact
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(stream.id);
        }
        self.changed(&[stream.id]);
        let appended = !records.is_empty();
        let outcome = AppendOutcome::Written {
            producer: producer.as_ref().map(|(_, state)| *state),
        };
        writer.record(producer, stream_seq, close);
        let stream = StreamRow {
            tail,
            closed: writer.closed,
            stream_seq: writer.stream_seq.clone(),
            touched: stream.touched.max(micros(now)),
            version: stream.version + 1,
            ..stream
        };
        let done = Appended {
            info: stream.info(),
            appended,
            outcome,
        };
        Ok((done, Some(Cached { stream, writer })))
    }

    pub(super) async fn read(&self, read: Read) -> Result<ReadResult, StreamError> {
        for _ in 0..ATTEMPTS {
            let client = self.client().await?;
            let Some(stream) = self.find(&client, &read.path).await? else {
                return Err(StreamError::not_found());
            };
            if self.is_expired(&stream, read.now) {
                drop(client);
                self.expire(&stream.path, read.now).await?;
                continue;
            }
            if stream.deleted {
                return Err(StreamError::gone());
            }
            return self.read_from(&client, stream, &read).await;
        }
        Err(contended())
    }

    async fn read_from(
        &self,
        client: &impl GenericClient,
        stream: StreamRow,
        read: &Read,
    ) -> Result<ReadResult, StreamError> {
        let info = stream.info();
        let not_a_position = || StreamError::invalid("offset is not a position in this stream");
        let start = match read.from {
            ReadFrom::Start => Offset::ZERO,
            ReadFrom::Now => info.tail,
            ReadFrom::At(at) if at <= info.tail => at,
            ReadFrom::At(_) => return Err(not_a_position()),
        };
        let found = if start < info.tail {
            let segments =
                chain(client, stream.id, stream.source_id, stream.base, info.tail).await?;
            let limit = Limit {
                bytes: read.max_bytes,
                records: usize::MAX,
                data: true,
            };
            let found = scan(client, &segments, start, limit).await?;
            if found.is_empty() {
                return Err(not_a_position());
            }
            found
        } else {
            Vec::new()
        };
        self.touch(&stream, read.now);
        let next = found
            .last()
            .and_then(|f| f.start.after_record(f.len))
            .unwrap_or(start);
        let records: Vec<Bytes> = found.into_iter().filter_map(|f| f.data).collect();
        let wait = if read.subscribe && !info.closed && records.is_empty() {
            Some(self.wait(client, &stream).await?)
        } else {
            None
        };
        Ok(ReadResult {
            info,
            start,
            next,
            records,
            wait,
        })
    }

    /// A wait for the next change of `stream`, which was read at its tail.
    async fn wait(
        &self,
        client: &impl GenericClient,
        stream: &StreamRow,
    ) -> Result<crate::live::TailWait, StreamError> {
        let rx = self.waiters.subscribe(stream.id as u64);
        // Subscribed after the tail was read: a change in between would be
        // missed, so look again and wake at once if there was one.
        let statement = client
            .prepare_cached("SELECT version FROM ds_streams WHERE id = $1")
            .await
            .map_err(db)?;
        let now = client
            .query_opt(&statement, &[&stream.id])
            .await
            .map_err(db)?;
        if now.map(|row| row.get::<_, i64>(0)) != Some(stream.version) {
            return Ok(crate::live::TailWait::new(std::future::ready(())));
        }
        Ok(tail_wait(rx, self.recheck))
    }

    pub(super) async fn head(&self, path: &str) -> Result<StreamInfo, StreamError> {
        let now = SystemTime::now();
        for _ in 0..ATTEMPTS {
            let client = self.client().await?;
            let Some(stream) = self.find(&client, path).await? else {
                return Err(StreamError::not_found());
            };
            if self.is_expired(&stream, now) {
                drop(client);
                self.expire(path, now).await?;
                continue;
            }
            if stream.deleted {
                return Err(StreamError::gone());
            }
            return Ok(stream.info());
        }
        Err(contended())
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StreamError> {
        let now = SystemTime::now();
        let client = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM ds_streams s
              WHERE NOT s.deleted AND left(s.path, length($1)) = $1
              ORDER BY s.path COLLATE \"C\""
        );
        let rows = client.query(&sql, &[&prefix]).await.map_err(db)?;
        let mut listed = Vec::with_capacity(rows.len());
        for row in &rows {
            let stream = StreamRow::parse(row)?;
            if !self.is_expired(&stream, now) {
                listed.push(Listed {
                    path: stream.path,
                    tail: stream.tail,
                });
            }
        }
        Ok(listed)
    }

    pub(super) async fn set_meta(
        &self,
        key: &str,
        value: Option<Bytes>,
    ) -> Result<(), StreamError> {
        let client = self.client().await?;
        match value {
            Some(value) => client
                .execute(
                    "INSERT INTO ds_meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&key, &value.as_ref()],
                )
                .await
                .map_err(db)?,
            None => client
                .execute("DELETE FROM ds_meta WHERE key = $1", &[&key])
                .await
                .map_err(db)?,
        };
        Ok(())
    }

    pub(super) async fn list_meta(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Bytes)>, StreamError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key, value FROM ds_meta WHERE left(key, length($1)) = $1
                  ORDER BY key COLLATE \"C\"",
                &[&prefix],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), Bytes::from(row.get::<_, Vec<u8>>(1))))
            .collect())
    }
}

/// Records as one chunk row: their lengths and their bytes end to end.
pub(super) fn pack(records: &[Bytes]) -> Result<(Vec<i32>, Vec<u8>), StreamError> {
    let too_big = || StreamError::invalid("a record is larger than 2 GiB");
    let lens = records
        .iter()
        .map(|r| i32::try_from(r.len()).map_err(|_| too_big()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut data = Vec::with_capacity(records.iter().map(Bytes::len).sum());
    for record in records {
        data.extend_from_slice(record);
    }
    Ok((lens, data))
}
