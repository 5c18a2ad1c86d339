//! The write-ahead log: numbered segment files, one writer thread, group
//! commit.
//!
//! [`FileLog::record`] encodes a frame into a buffer and returns at once; it
//! runs under the index lock, so frames land in the order decisions were
//! made. A writer thread takes whatever has gathered, writes it with one
//! `write`, calls `fdatasync` once for all of it, and then announces the new
//! durable position. Appends from many streams and connections thus share
//! one sync, and the more arrive during a sync, the larger the next batch.
//!
//! When a write or sync fails, nothing after it can be trusted to be on disk:
//! the log refuses every later operation (disk full: 507, other errors: 503)
//! until the process restarts and recovery cuts the log back to its last
//! whole frame.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::thread;

use bytes::Bytes;

use super::frame;
use super::SyncMode;
use crate::storage::engine::Log;
use crate::storage::index::{Chunk, Location, Op};
use crate::storage::{StreamError, StreamErrorKind};

/// Reads larger than this run on the blocking pool.
const INLINE_READ_LIMIT: usize = 256 * 1024;

pub(crate) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.log"))
}

/// What the writer thread has made durable, and who waits for more.
#[derive(Default)]
struct Durable {
    /// Everything recorded before this log position is durable.
    lsn: u64,
    /// The log failed; nothing more will be durable.
    failed: Option<StreamErrorKind>,
    /// Waiting appends by the position they wait for (and a number that
    /// tells apart waiters on one position), so that a sync wakes only the
    /// ones it made durable: with many connections, most of the waiters
    /// are still one batch behind.
    waiters: BTreeMap<(u64, u64), Waker>,
    next_waiter: u64,
}

impl Durable {
    /// Marks everything before `lsn` durable and takes the wakers of those
    /// who waited for it.
    fn advance(&mut self, lsn: u64) -> Vec<Waker> {
        self.lsn = self.lsn.max(lsn);
        let later = self.waiters.split_off(&(self.lsn + 1, 0));
        std::mem::replace(&mut self.waiters, later)
            .into_values()
            .collect()
    }

    /// Marks the log failed and takes every waiter's waker.
    fn fail(&mut self, kind: StreamErrorKind) -> Vec<Waker> {
        self.failed = Some(kind);
        std::mem::take(&mut self.waiters).into_values().collect()
    }
}

#[derive(Debug)]
struct Pending {
    /// The segment being appended to, and the position after the last
    /// recorded frame.
    segment: u64,
    pos: u64,
    /// Every byte ever recorded, across segments: the log position.
    lsn: u64,
    /// Encoded frames not yet written, by segment, in order.
    batches: Vec<(u64, Vec<u8>)>,
    /// How many delete frames were ever recorded.
    deletes: u64,
    failed: Option<StreamErrorKind>,
    closing: bool,
    /// The writer thread is asleep on `wake_writer`. While it is busy it
    /// finds new frames on its own, so only a sleeping writer is woken:
    /// `Condvar::notify_one` is a system call whether anyone waits or not.
    writer_asleep: bool,
}

struct Shared {
    dir: PathBuf,
    sync: SyncMode,
    segment_size: u64,
    pending: Mutex<Pending>,
    wake_writer: Condvar,
    durable: Mutex<Durable>,
    readers: RwLock<HashMap<u64, Arc<File>>>,
    /// Called by the writer thread after each durable batch.
    on_durable: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn durable(&self) -> MutexGuard<'_, Durable> {
        self.durable.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reader(&self, segment: u64) -> io::Result<Arc<File>> {
        if let Some(file) = self
            .readers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&segment)
        {
            return Ok(file.clone());
        }
        let file = Arc::new(File::open(segment_path(&self.dir, segment))?);
        self.readers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(segment, file.clone());
        Ok(file)
    }

    fn read_chunks(&self, chunks: &[Chunk]) -> io::Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            match chunk {
                Chunk::Mem(bytes) => out.push(bytes.clone()),
                Chunk::Disk(at) => {
                    let mut buf = vec![0; at.len as usize];
                    self.reader(at.segment)?.read_exact_at(&mut buf, at.pos)?;
                    if crc32c::crc32c(&buf) != at.crc {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "record at {} in segment {} fails its checksum",
                                at.pos, at.segment
                            ),
                        ));
                    }
                    out.push(Bytes::from(buf));
                }
            }
        }
        Ok(out)
    }
}

/// The file store's log. Dropping it lets the writer thread finish what is
/// buffered and stop.
pub(crate) struct FileLog {
    shared: Arc<Shared>,
    writer: Option<thread::JoinHandle<()>>,
    /// Holds the directory's lock for as long as the log is open.
    _lock: File,
}

impl FileLog {
    /// Starts a log that continues `segment` at `pos`.
    pub(crate) fn start(
        dir: PathBuf,
        sync: SyncMode,
        segment_size: u64,
        segment: u64,
        pos: u64,
        lock: File,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            dir,
            sync,
            segment_size,
            pending: Mutex::new(Pending {
                segment,
                pos,
                lsn: 0,
                batches: Vec::new(),
                deletes: 0,
                failed: None,
                closing: false,
                writer_asleep: false,
            }),
            wake_writer: Condvar::new(),
            durable: Mutex::new(Durable::default()),
            readers: RwLock::new(HashMap::new()),
            on_durable: OnceLock::new(),
        });
        let writer = Writer::open(&shared, segment, pos)?;
        let thread_shared = shared.clone();
        let handle = thread::Builder::new()
            .name("durable-streams-log".into())
            .spawn(move || writer.run(&thread_shared))?;
        Ok(Self {
            shared,
            writer: Some(handle),
            _lock: lock,
        })
    }
}

impl FileLog {
    /// Where the next frame goes: its segment and position.
    pub(crate) fn position(&self) -> (u64, u64) {
        let pending = self.shared.pending();
        (pending.segment, pending.pos)
    }

    /// How much has been recorded: the log position and the number of
    /// deletes.
    pub(crate) fn activity(&self) -> (u64, u64) {
        let pending = self.shared.pending();
        (pending.lsn, pending.deletes)
    }

    /// Blocks the calling (non-async) thread until `ticket` is durable.
    pub(crate) fn wait_durable(&self, ticket: u64) -> io::Result<()> {
        loop {
            {
                let durable = self.shared.durable();
                if durable.lsn >= ticket {
                    return Ok(());
                }
                if durable.failed.is_some() {
                    return Err(io::Error::other("the log failed"));
                }
            }
            thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Deletes a segment no stream needs any more.
    pub(crate) fn remove_segment(&self, segment: u64) -> io::Result<()> {
        self.shared
            .readers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&segment);
        fs::remove_file(segment_path(&self.shared.dir, segment))
    }
}

impl std::fmt::Debug for FileLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLog")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        self.shared.pending().closing = true;
        self.shared.wake_writer.notify_all();
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

fn failure(kind: StreamErrorKind) -> StreamError {
    let message = match kind {
        StreamErrorKind::Full => "storage is full",
        _ => "storage failed; restart the server to recover",
    };
    StreamError::new(kind, message)
}

impl Log for FileLog {
    const IMMEDIATE: bool = false;

    fn record(&self, op: &Op) -> Result<Vec<Chunk>, StreamError> {
        let mut frame = Vec::with_capacity(64 + op.records().iter().map(Bytes::len).sum::<usize>());
        let ranges = frame::encode(op, &mut frame);
        let mut pending = self.shared.pending();
        if let Some(kind) = pending.failed.clone() {
            return Err(failure(kind));
        }
        let len = frame.len() as u64;
        if pending.pos > 0 && pending.pos + len > self.shared.segment_size {
            pending.segment += 1;
            pending.pos = 0;
        }
        let (segment, pos) = (pending.segment, pending.pos);
        let chunks = ranges
            .into_iter()
            .map(|range| {
                Chunk::Disk(Location {
                    segment,
                    pos: pos + range.start as u64,
                    len: range.len() as u32,
                    crc: crc32c::crc32c(&frame[range]),
                })
            })
            .collect();
        match pending.batches.last_mut() {
            Some((last, bytes)) if *last == segment => bytes.extend_from_slice(&frame),
            _ => pending.batches.push((segment, frame)),
        }
        pending.pos += len;
        pending.lsn += len;
        if matches!(op, Op::Delete { .. }) {
            pending.deletes += 1;
        }
        let asleep = std::mem::take(&mut pending.writer_asleep);
        drop(pending);
        if asleep {
            self.shared.wake_writer.notify_one();
        }
        Ok(chunks)
    }

    fn ticket(&self) -> u64 {
        self.shared.pending().lsn
    }

    fn durable(&self, ticket: u64) -> impl Future<Output = Result<(), StreamError>> + Send {
        DurableWait {
            shared: self.shared.clone(),
            ticket,
            key: None,
        }
    }

    fn on_durable(&self, hook: Box<dyn Fn(u64) + Send + Sync>) {
        let _ = self.shared.on_durable.set(hook);
    }

    fn read(
        &self,
        chunks: Vec<Chunk>,
    ) -> impl Future<Output = Result<Vec<Bytes>, StreamError>> + Send {
        let total: usize = chunks.iter().map(Chunk::len).sum();
        let inline = total <= INLINE_READ_LIMIT;
        let result = inline.then(|| self.shared.read_chunks(&chunks));
        let shared = self.shared.clone();
        async move {
            let read = match result {
                Some(read) => read,
                None => tokio::task::spawn_blocking(move || shared.read_chunks(&chunks))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e))),
            };
            read.map_err(|e| {
                tracing::error!(error = %e, "reading the log failed");
                StreamError::new(StreamErrorKind::Unavailable, "could not read the stream")
            })
        }
    }

    fn read_now(&self, chunk: &Chunk) -> Option<Bytes> {
        self.shared
            .read_chunks(std::slice::from_ref(chunk))
            .ok()?
            .pop()
    }
}

/// Resolves once the log is durable past `ticket`, or has failed.
struct DurableWait {
    shared: Arc<Shared>,
    ticket: u64,
    /// Where this wait is registered among the waiters, once it is.
    key: Option<(u64, u64)>,
}

impl Future for DurableWait {
    type Output = Result<(), StreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut durable = this.shared.durable();
        if durable.lsn >= this.ticket {
            // The writer took the waker when it got here.
            this.key = None;
            return Poll::Ready(Ok(()));
        }
        if let Some(kind) = durable.failed.clone() {
            this.key = None;
            return Poll::Ready(Err(failure(kind)));
        }
        match this.key {
            Some(key) => {
                if let Some(waker) = durable.waiters.get_mut(&key) {
                    waker.clone_from(cx.waker());
                }
            }
            None => {
                let key = (this.ticket, durable.next_waiter);
                durable.next_waiter += 1;
                durable.waiters.insert(key, cx.waker().clone());
                this.key = Some(key);
            }
        }
        Poll::Pending
    }
}

impl Drop for DurableWait {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.shared.durable().waiters.remove(&key);
        }
    }
}

/// How far past the last frame the writer fills a segment with zeros, when
/// it syncs with `fdatasync`. A write over bytes the file already has
/// changes none of its metadata, so the sync after it flushes the data
/// alone; a write that grows the file must also commit the file system's
/// journal, which costs about a third more time and CPU on ext4. Recovery
/// takes a tail of zeros for the end of the log.
const ZERO_AHEAD: u64 = 2 * 1024 * 1024;

/// The writer thread's state: the segment file it writes to.
struct Writer {
    segment: u64,
    file: File,
    /// Where the next frame goes.
    pos: u64,
    /// The file's length; what lies past `pos` is zeros.
    len: u64,
    /// Zeroing ahead failed in this segment (the disk is full, say): the
    /// frames alone grow the file from here on.
    no_zeroing: bool,
}

impl Writer {
    fn open(shared: &Shared, segment: u64, pos: u64) -> io::Result<Self> {
        let path = segment_path(&shared.dir, segment);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        sync_dir(&shared.dir)?;
        Ok(Self {
            segment,
            file,
            pos,
            len: len.max(pos),
            no_zeroing: shared.sync != SyncMode::Fsync,
        })
    }

    fn run(mut self, shared: &Shared) {
        loop {
            let (batches, lsn) = {
                let mut pending = shared.pending();
                while pending.batches.is_empty() && !pending.closing {
                    pending.writer_asleep = true;
                    pending = shared
                        .wake_writer
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                pending.writer_asleep = false;
                if pending.batches.is_empty() {
                    return;
                }
                (std::mem::take(&mut pending.batches), pending.lsn)
            };
            match self.write(shared, batches) {
                Ok(()) => {
                    if let Some(hook) = shared.on_durable.get() {
                        hook(lsn);
                    }
                    let woken = shared.durable().advance(lsn);
                    woken.into_iter().for_each(Waker::wake);
                }
                Err(e) => {
                    let kind = if e.kind() == io::ErrorKind::StorageFull {
                        StreamErrorKind::Full
                    } else {
                        StreamErrorKind::Unavailable
                    };
                    tracing::error!(error = %e, "writing the log failed; refusing further writes");
                    shared.pending().failed = Some(kind.clone());
                    let woken = shared.durable().fail(kind);
                    woken.into_iter().for_each(Waker::wake);
                    return;
                }
            }
        }
    }

    fn write(&mut self, shared: &Shared, batches: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        for (segment, bytes) in batches {
            if segment != self.segment {
                self.finish(shared)?;
                *self = Writer::open(shared, segment, 0)?;
            }
            self.file.write_all_at(&bytes, self.pos)?;
            self.pos += bytes.len() as u64;
            self.len = self.len.max(self.pos);
            self.zero_ahead(shared);
        }
        self.finish(shared)
    }

    /// Keeps zeros ahead of `pos`, up to the segment's size. Best effort: a
    /// failure here costs speed, not data.
    fn zero_ahead(&mut self, shared: &Shared) {
        if self.no_zeroing
            || self.len >= shared.segment_size
            || self.len - self.pos > ZERO_AHEAD / 2
        {
            return;
        }
        let end = (self.pos + ZERO_AHEAD).min(shared.segment_size);
        let zeros = vec![0; (end - self.len) as usize];
        match self.file.write_all_at(&zeros, self.len) {
            Ok(()) => self.len = end,
            Err(e) => {
                tracing::debug!(error = %e, segment = self.segment, "cannot zero the log ahead");
                self.no_zeroing = true;
                if let Ok(meta) = self.file.metadata() {
                    self.len = meta.len().max(self.pos);
                }
            }
        }
    }

    fn finish(&mut self, shared: &Shared) -> io::Result<()> {
        match shared.sync {
            SyncMode::Fsync => self.file.sync_data(),
            SyncMode::Write => Ok(()),
        }
    }
}

/// Makes a new file's directory entry durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
