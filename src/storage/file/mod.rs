//! [`FileStorage`]: streams kept in a write-ahead log on local disk.
//!
//! Every change to a stream (a create, an append with the producer and
//! `Stream-Seq` state it implies, a close, a delete) is one checksummed frame
//! in a shared log of numbered segment files. A write is acknowledged only
//! once its frame is durable; concurrent writes to any streams share one
//! `fdatasync` (group commit). Producer state, closure and data commit in the
//! same frame, so after a crash an acknowledged append is present exactly
//! once, and an unacknowledged one is wholly present or wholly absent.
//!
//! On open, the log is replayed: every stream comes back with its content
//! type, expiry, closure, forks, soft deletes and producer state. A frame
//! that is cut short or fails its checksum ends the log, and the segment is
//! truncated there. A tail of zeros is no damage: the writer fills the space
//! ahead of it with zeros, so that a sync need not grow the file. Sliding
//! TTLs restart from the time of recovery, since reads that renewed them are
//! not logged.
//!
//! The directory is locked while open: a second server on the same data
//! fails to start.
//!
//! # Example
//!
//! ```
//! use tower_durable_streams::storage::{FileStorage, SyncMode};
//!
//! let dir = std::env::temp_dir().join(format!("ds-doc-{}", std::process::id()));
//! let storage = FileStorage::builder().sync(SyncMode::Fsync).open(&dir)?;
//! // A second open of the same directory is refused while `storage` lives.
//! assert!(FileStorage::builder().open(&dir).is_err());
//! drop(storage);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), std::io::Error>(())
//! ```

mod codec;
mod frame;
mod log;
mod snapshot;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use tower_service::Service;

use self::log::{segment_path, sync_dir, FileLog};
use super::engine::{Engine, Log};
use super::index::{Chunk, Index, Location};
use super::{StorageRequest, StorageResponse, StreamError};
use crate::BoxFuture;

/// The default size at which a segment file is closed and the next begun:
/// 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// When a write counts as done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncMode {
    /// After `fdatasync`: acknowledged writes survive a crash of the process
    /// and of the machine (power loss). The default.
    #[default]
    Fsync,
    /// After `write(2)`: acknowledged writes survive a crash of the process,
    /// since the kernel holds them, but not a crash of the machine.
    Write,
}

/// A storage backend that keeps streams on local disk. See the
/// [module docs](self).
///
/// Cloning is cheap; clones share the open store, which closes (finishing
/// pending writes) when the last clone is dropped.
#[derive(Clone)]
pub struct FileStorage {
    engine: Arc<Engine<FileLog>>,
    _maintenance: Arc<Maintenance>,
}

/// Options for opening a [`FileStorage`].
#[derive(Debug, Clone)]
pub struct FileStorageBuilder {
    sync: SyncMode,
    segment_size: u64,
}

impl FileStorage {
    /// Opens (or creates) the store in `dir` with the default options.
    ///
    /// # Errors
    ///
    /// When the directory cannot be created, read or written, when another
    /// process has it open, or when its log cannot be read.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        Self::builder().open(dir)
    }

    /// Options for opening a store.
    pub fn builder() -> FileStorageBuilder {
        FileStorageBuilder {
            sync: SyncMode::default(),
            segment_size: DEFAULT_SEGMENT_SIZE,
        }
    }
}

impl FileStorageBuilder {
    /// When a write counts as done. Default is [`SyncMode::Fsync`].
    pub fn sync(mut self, sync: SyncMode) -> Self {
        self.sync = sync;
        self
    }

    /// The size at which a segment file is closed and the next begun.
    /// Default is 64 MiB.
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes.max(4096);
        self
    }

    /// Opens (or creates) the store in `dir`, replaying its log.
    ///
    /// # Errors
    ///
    /// When the directory cannot be created, read or written, when another
    /// process has it open, or when its log cannot be read.
    pub fn open(self, dir: impl AsRef<Path>) -> io::Result<FileStorage> {
        let dir = dir.as_ref().to_path_buf();
        let context = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
        };
        fs::create_dir_all(&dir).map_err(|e| context("cannot create data directory", e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| context("cannot write to data directory", e))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "data directory {} is in use by another process",
                    dir.display()
                ),
            ),
            fs::TryLockError::Error(e) => context("cannot lock data directory", e),
        })?;

        let started = Instant::now();
        let (index, segment, pos) =
            recover(&dir).map_err(|e| context("cannot recover the log in", e))?;
        let log = FileLog::start(
            dir.clone(),
            self.sync,
            self.segment_size,
            segment,
            pos,
            lock,
        )
        .map_err(|e| context("cannot open the log in", e))?;
        tracing::info!(
            dir = %dir.display(),
            streams = index.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "file storage recovered"
        );
        let engine = Arc::new(Engine::new(index, log));
        let maintenance = Maintenance::start(&engine, dir, self.segment_size)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start maintenance: {e}")))?;
        Ok(FileStorage {
            engine,
            _maintenance: Arc::new(maintenance),
        })
    }
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage").finish_non_exhaustive()
    }
}

impl Service<StorageRequest> for FileStorage {
    type Response = StorageResponse;
    type Error = StreamError;
    type Future = BoxFuture<Result<StorageResponse, StreamError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: StorageRequest) -> Self::Future {
        let engine = self.engine.clone();
        Box::pin(async move { engine.handle(request).await })
    }
}

/// The segment numbers in `dir`, in order.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(number) = name.strip_suffix(".log").filter(|n| n.len() == 20) {
            if let Ok(number) = number.parse() {
                found.push(number);
            }
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Rebuilds the index: the snapshot, if any, then the log after it. Returns
/// the index and where the log continues: the last segment and the position
/// after its last whole frame.
fn recover(dir: &Path) -> io::Result<(Index, u64, u64)> {
    let now = SystemTime::now();
    let (mut index, start) = match snapshot::read(dir)? {
        Some(s) => {
            let mut index = Index::import(s.next_id, s.streams, now);
            index.import_meta(s.meta);
            (index, (s.segment, s.pos))
        }
        None => (Index::default(), (0, 0)),
    };
    let segments: Vec<u64> = segments(dir)?
        .into_iter()
        .filter(|s| *s >= start.0)
        .collect();
    if start.1 > 0 && segments.first() != Some(&start.0) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "segment {} that the snapshot continues in is missing",
                start.0
            ),
        ));
    }
    let mut end = (start.0.max(1), start.1);
    for (i, &segment) in segments.iter().enumerate() {
        let path = segment_path(dir, segment);
        let mut data = Vec::new();
        File::open(&path)?.read_to_end(&mut data)?;
        let from = if segment == start.0 {
            start.1 as usize
        } else {
            0
        };
        if data.len() < from {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is shorter than the snapshot says", path.display()),
            ));
        }
        let (pos, torn) = replay(&data, from, segment, &mut index, now);
        end = (segment, pos as u64);
        if torn.is_some() && data[pos..].iter().all(|&b| b == 0) {
            // No frame begins with a zero length, so a tail of zeros holds
            // none: it is space the writer zeroed ahead of itself.
            continue;
        }
        if let Some(why) = torn {
            tracing::warn!(segment = %path.display(), pos, why, "cutting the log at a torn frame");
            let file = OpenOptions::new().write(true).open(&path)?;
            file.set_len(pos as u64)?;
            file.sync_all()?;
            for &later in &segments[i + 1..] {
                let from = segment_path(dir, later);
                let to = from.with_extension("log.corrupt");
                tracing::error!(
                    segment = %from.display(),
                    "segment after a torn frame cannot be replayed; set aside"
                );
                fs::rename(&from, &to)?;
            }
            sync_dir(dir)?;
            break;
        }
    }
    index.publish_all();
    Ok((index, end.0, end.1))
}

/// The maintenance thread: it deletes expired streams, snapshots the index
/// after enough log or any deletes, and then removes segments that neither
/// recovery nor any stream needs. Dropping it stops the thread and waits for
/// it, so that the store is closed when the last [`FileStorage`] is dropped.
struct Maintenance {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Maintenance {
    const PERIOD: Duration = Duration::from_millis(500);
    const MIN_DELETE_SNAPSHOT_GAP: Duration = Duration::from_secs(5);

    fn start(engine: &Arc<Engine<FileLog>>, dir: PathBuf, snapshot_every: u64) -> io::Result<Self> {
        let weak = Arc::downgrade(engine);
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (mut lsn, mut deletes) = engine.log().activity();
        let mut last_snapshot = Instant::now();
        let stopping = stop.clone();
        let thread = thread::Builder::new()
            .name("durable-streams-maintenance".into())
            .spawn(move || loop {
                {
                    let (flag, wake) = &*stopping;
                    let guard = flag.lock().unwrap_or_else(PoisonError::into_inner);
                    let (guard, _) = wake
                        .wait_timeout_while(guard, Self::PERIOD, |stop| !*stop)
                        .unwrap_or_else(PoisonError::into_inner);
                    if *guard {
                        return;
                    }
                }
                let Some(engine) = weak.upgrade() else {
                    return;
                };
                engine.sweep(SystemTime::now());
                let (now_lsn, now_deletes) = engine.log().activity();
                let grown = now_lsn - lsn >= snapshot_every;
                let deleted = now_deletes != deletes
                    && last_snapshot.elapsed() >= Self::MIN_DELETE_SNAPSHOT_GAP;
                if grown || deleted {
                    match snapshot_and_clean(&engine, &dir) {
                        Ok(()) => {
                            (lsn, deletes) = (now_lsn, now_deletes);
                            last_snapshot = Instant::now();
                        }
                        Err(e) => tracing::error!(error = %e, "snapshot failed"),
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes a snapshot, then deletes the segments it made unnecessary.
fn snapshot_and_clean(engine: &Engine<FileLog>, dir: &Path) -> io::Result<()> {
    let started = Instant::now();
    let (saved, meta, ticket, in_use, (segment, pos)) = {
        let index = engine.lock();
        let Some(saved) = index.export() else {
            return Ok(());
        };
        let in_use = index.segments_in_use();
        (
            saved,
            index.meta(""),
            engine.log().ticket(),
            in_use,
            engine.log().position(),
        )
    };
    let (next_id, streams) = saved;
    let bytes = snapshot::encode(&snapshot::Snapshot {
        segment,
        pos,
        next_id,
        streams,
        meta,
    });
    engine.log().wait_durable(ticket)?;
    snapshot::write(dir, &bytes)?;
    let mut removed = 0;
    for old in segments(dir)? {
        if old < segment && !in_use.contains(&old) {
            engine.log().remove_segment(old)?;
            removed += 1;
        }
    }
    tracing::debug!(
        bytes = bytes.len(),
        removed_segments = removed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot written"
    );
    Ok(())
}

/// Replays one segment's frames. Returns the position after the last whole
/// frame, and why replay stopped early, if it did.
fn replay(
    data: &[u8],
    from: usize,
    segment: u64,
    index: &mut Index,
    now: SystemTime,
) -> (usize, Option<&'static str>) {
    let mut pos = from;
    while pos < data.len() {
        let Some(header) = data.get(pos..pos + frame::HEADER_LEN) else {
            return (pos, Some("truncated header"));
        };
        let Some((len, crc)) = frame::body_len(header.try_into().expect("header length")) else {
            return (pos, Some("invalid frame length"));
        };
        let Some(body) = data.get(pos + frame::HEADER_LEN..pos + frame::HEADER_LEN + len) else {
            return (pos, Some("truncated frame"));
        };
        let Ok((op, ranges)) = frame::decode(body, crc) else {
            return (pos, Some("checksum mismatch or malformed frame"));
        };
        let chunks = ranges
            .into_iter()
            .map(|range| {
                Chunk::Disk(Location {
                    segment,
                    pos: (pos + range.start) as u64,
                    len: range.len() as u32,
                    crc: crc32c::crc32c(&data[pos + range.start..pos + range.end]),
                })
            })
            .collect();
        index.apply(op, chunks, now);
        pos += frame::HEADER_LEN + len;
    }
    (pos, None)
}
