//! The storage contract, checked through the `Service` interface alone.
//!
//! Every check in [`checks`] runs against each backend that [`contract!`]
//! names: `MemoryStorage` as it is, `MemoryStorage` behind tower
//! middleware (a timeout, a concurrency limit and a call counter), which must
//! neither change an answer nor lose a call, and the backend written outside
//! the crate in `examples/recording_storage.rs`, which must record every
//! call. The layered backend is also handed to `DurableStreamsService` to
//! show that the stack composes.

#[cfg(feature = "postgres")]
#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod pg;
#[allow(dead_code)]
#[path = "../examples/recording_storage.rs"]
mod recording_storage;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_test::{assert_pending, assert_ready, task};
use tower::limit::ConcurrencyLimit;
use tower::timeout::Timeout;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_durable_streams::live::TailWait;
use tower_durable_streams::offset::{Offset, ReadFrom};
use tower_durable_streams::producer::{ProducerClaim, ProducerState};
#[cfg(feature = "file")]
use tower_durable_streams::storage::FileStorage;
use tower_durable_streams::storage::{
    Append, AppendOutcome, Appended, BadBody, Create, Read, ReadResult, StorageRequest,
    StorageResponse, StreamError, StreamErrorKind, StreamInfo,
};
use tower_durable_streams::stream::{ContentType, Expiry, ForkRequest, StreamConfig};
use tower_durable_streams::MemoryStorage;

// ---------------------------------------------------------------------------
// A backend behind the contract
// ---------------------------------------------------------------------------

/// Any backend, seen only through `Service<StorageRequest>`.
#[derive(Clone)]
struct Store {
    backend: BoxCloneService<StorageRequest, StorageResponse, BoxError>,
    /// Requests this test sent.
    sent: Arc<AtomicUsize>,
    /// How many requests a counting or recording backend saw, when it is
    /// one.
    seen: Option<Arc<dyn Fn() -> usize + Send + Sync>>,
    /// The data directory of a file backend, removed after the test.
    #[cfg_attr(not(feature = "file"), allow(dead_code))]
    _dir: Option<Arc<tempfile::TempDir>>,
    /// The schema of a PostgreSQL backend, dropped after the test.
    #[cfg(feature = "postgres")]
    _schema: Option<Arc<pg::Schema>>,
}

type Outcome<T> = Result<T, StreamErrorKind>;

/// Wraps a backend for the checks.
fn store<S>(backend: S) -> Store
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    Store {
        backend: BoxCloneService::new(backend.map_err(Into::into)),
        sent: Arc::default(),
        seen: None,
        _dir: None,
        #[cfg(feature = "postgres")]
        _schema: None,
    }
}

/// The kind of a backend's error; anything but a [`StreamError`] fails the
/// test.
fn kind(error: BoxError) -> StreamErrorKind {
    match error.downcast::<StreamError>() {
        Ok(error) => error.kind().clone(),
        Err(other) => panic!("not a StreamError: {other}"),
    }
}

impl Store {
    async fn call(&self, request: StorageRequest) -> Outcome<StorageResponse> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.backend.clone().oneshot(request).await.map_err(kind)
    }

    async fn create(&self, create: Create) -> Outcome<(bool, StreamInfo)> {
        match self.call(StorageRequest::Create(create)).await? {
            StorageResponse::Created { created, info } => Ok((created, info)),
            other => panic!("create answered {other:?}"),
        }
    }

    /// Creates a stream that must not exist yet.
    async fn create_new(&self, create: Create) -> StreamInfo {
        let path = create.path.clone();
        match self.create(create).await {
            Ok((true, info)) => info,
            other => panic!("creating {path}: {other:?}"),
        }
    }

    async fn append(&self, append: Append) -> Outcome<Appended> {
        match self.call(StorageRequest::Append(append)).await? {
            StorageResponse::Appended(appended) => Ok(appended),
            other => panic!("append answered {other:?}"),
        }
    }

    /// Appends text that must be accepted; returns the new tail.
    async fn push(&self, path: &str, body: &str) -> Offset {
        let appended = self.append(post(path, body)).await.unwrap();
        assert!(appended.appended);
        appended.info.tail
    }

    async fn read(&self, read: Read) -> Outcome<ReadResult> {
        match self.call(StorageRequest::Read(read)).await? {
            StorageResponse::Read(result) => Ok(result),
            other => panic!("read answered {other:?}"),
        }
    }

    /// Every record from the start, in one read.
    async fn all(&self, path: &str) -> Outcome<Vec<String>> {
        self.read(get(path, ReadFrom::Start))
            .await
            .map(|r| texts(&r.records))
    }

    async fn head(&self, path: &str) -> Outcome<StreamInfo> {
        let path = path.to_owned();
        match self.call(StorageRequest::Head { path }).await? {
            StorageResponse::Head(info) => Ok(info),
            other => panic!("head answered {other:?}"),
        }
    }

    async fn delete(&self, path: &str) -> Outcome<()> {
        let path = path.to_owned();
        match self.call(StorageRequest::Delete { path }).await? {
            StorageResponse::Deleted => Ok(()),
            other => panic!("delete answered {other:?}"),
        }
    }

    /// Checks that the middleware, if any, saw every request exactly once.
    fn finish(&self) {
        if let Some(seen) = &self.seen {
            let sent = self.sent.load(Ordering::SeqCst);
            assert!(sent > 0);
            assert_eq!(seen(), sent);
        }
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

fn text() -> Option<ContentType> {
    ContentType::parse("text/plain")
}

fn json() -> Option<ContentType> {
    ContentType::parse("application/json")
}

fn put(path: &str) -> Create {
    Create {
        path: path.into(),
        config: StreamConfig {
            content_type: text(),
            ..StreamConfig::default()
        },
        body: Bytes::new(),
        now: SystemTime::now(),
    }
}

fn put_with(path: &str, body: &str) -> Create {
    Create {
        body: Bytes::copy_from_slice(body.as_bytes()),
        ..put(path)
    }
}

fn put_json(path: &str, body: &str) -> Create {
    let mut create = put_with(path, body);
    create.config.content_type = json();
    create
}

/// A fork of `source` at `offset` (its tail when `None`).
fn fork(path: &str, source: &str, offset: Option<Offset>, sub_offset: u64) -> Create {
    let mut create = put(path);
    create.config.content_type = None;
    create.config.fork = Some(ForkRequest {
        source: source.into(),
        offset,
        sub_offset,
    });
    create
}

fn post(path: &str, body: &str) -> Append {
    Append {
        path: path.into(),
        content_type: text(),
        records: Ok(vec![Bytes::copy_from_slice(body.as_bytes())]),
        close: false,
        stream_seq: None,
        producer: None,
        now: SystemTime::now(),
    }
}

fn close(path: &str) -> Append {
    Append {
        content_type: None,
        records: Ok(Vec::new()),
        close: true,
        ..post(path, "")
    }
}

fn with_producer(mut append: Append, id: &str, epoch: u64, seq: u64) -> Append {
    append.producer = Some(ProducerClaim {
        id: id.into(),
        epoch,
        seq,
    });
    append
}

fn with_seq(mut append: Append, seq: &str) -> Append {
    append.stream_seq = Some(seq.into());
    append
}

fn get(path: &str, from: ReadFrom) -> Read {
    Read {
        path: path.into(),
        from,
        max_bytes: 1 << 20,
        subscribe: false,
        now: SystemTime::now(),
    }
}

fn subscribe(path: &str, from: ReadFrom) -> Read {
    Read {
        subscribe: true,
        ..get(path, from)
    }
}

fn texts(records: &[Bytes]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.to_vec()).expect("UTF-8 record"))
        .collect()
}

fn offset(index: u64, position: u64) -> Offset {
    Offset::new(index, position).unwrap()
}

fn written(producer: Option<(u64, u64)>) -> AppendOutcome {
    AppendOutcome::Written {
        producer: producer.map(|(epoch, last_seq)| ProducerState { epoch, last_seq }),
    }
}

/// A read at the tail that subscribed: nothing, and a wait.
async fn wait_at_tail(store: &Store, path: &str) -> task::Spawn<TailWait> {
    let result = store.read(subscribe(path, ReadFrom::Now)).await.unwrap();
    assert!(result.records.is_empty());
    task::spawn(
        result
            .wait
            .expect("an open stream at the tail gives a wait"),
    )
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// Counts the requests that pass through it.
#[derive(Clone, Debug)]
struct CountLayer(Arc<AtomicUsize>);

#[derive(Clone, Debug)]
struct Count<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
}

impl<S> Layer<S> for CountLayer {
    type Service = Count<S>;

    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            calls: self.0.clone(),
        }
    }
}

impl<S: Service<R>, R> Service<R> for Count<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> S::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.call(request)
    }
}

/// `MemoryStorage` behind a call counter, a timeout and a concurrency limit.
type Layered = Count<Timeout<ConcurrencyLimit<MemoryStorage>>>;

/// A [`Layered`] backend, with its call counter.
fn layered_memory() -> (Layered, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = ServiceBuilder::new()
        .layer(CountLayer(calls.clone()))
        .timeout(Duration::from_secs(5))
        .concurrency_limit(2)
        .service(MemoryStorage::new());
    (service, calls)
}

async fn memory() -> Option<Store> {
    Some(store(MemoryStorage::new()))
}

#[cfg(feature = "file")]
async fn file() -> Option<Store> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let storage = FileStorage::open(dir.path()).expect("file storage opens");
    Some(Store {
        _dir: Some(Arc::new(dir)),
        ..store(storage)
    })
}

/// `PostgresStorage` in a schema of its own; `None` when no database is
/// reachable.
#[cfg(feature = "postgres")]
async fn postgres() -> Option<Store> {
    let schema = pg::Schema::new();
    let storage = schema.storage().await?;
    Some(Store {
        _schema: Some(Arc::new(schema)),
        ..store(storage)
    })
}

async fn layered() -> Option<Store> {
    let (service, calls) = layered_memory();
    Some(Store {
        seen: Some(Arc::new(move || calls.load(Ordering::SeqCst))),
        ..store(service)
    })
}

/// The example's backend, which must record every request, each answered.
async fn recording() -> Option<Store> {
    let storage = recording_storage::RecordingStorage::new();
    let record = storage.clone();
    let recorded = move || {
        let operations = record.operations();
        assert!(operations.iter().all(|op| op.outcome.is_some()));
        operations.len()
    };
    Some(Store {
        seen: Some(Arc::new(recorded)),
        ..store(storage)
    })
}

/// One test per check per backend.
macro_rules! contract {
    ($backend:ident) => {
        contract!(@each $backend:
            create_is_idempotent_and_conflicts_on_difference,
            appends_return_increasing_offsets,
            appends_are_validated,
            reads_from_start_now_and_saved_offsets,
            max_bytes_returns_whole_records_and_resumes_exactly,
            closed_streams_refuse_appends,
            producers_are_deduplicated_and_fenced,
            producer_outcomes_follow_the_spec_for_every_short_history,
            stream_seq_compares_bytewise,
            forks_read_inherited_data_then_their_own,
            fork_of_a_fork_inside_inherited_data,
            fork_byte_sub_offsets,
            fork_json_sub_offsets,
            forks_start_with_fresh_writer_state,
            fork_creation_errors,
            fork_expiry_follows_the_table,
            deleted_sources_are_gone_while_forks_read_them,
            cleanup_cascades_after_the_last_fork,
            rejected_forks_leak_no_reference,
            ttl_slides_with_reads_and_writes,
            head_does_not_touch_the_ttl,
            expires_at_is_absolute,
            expiry_with_forks,
            subscribe_wakes_on_append,
            subscribe_wakes_on_close_and_delete,
            a_wait_made_before_an_append_is_not_missed,
            a_fork_waits_only_for_its_own_appends,
            no_wait_unless_asked_open_and_at_the_tail,
            metadata_is_set_replaced_removed_and_listed_by_prefix,
            listing_shows_live_streams_with_their_tails,
        );
    };
    (@each $backend:ident: $($check:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $check() {
                    let Some(store) = super::$backend().await else {
                        return;
                    };
                    super::checks::$check(store.clone()).await;
                    store.finish();
                }
            )*
        }
    };
}

contract!(memory);
#[cfg(feature = "file")]
contract!(file);
#[cfg(feature = "postgres")]
contract!(postgres);
contract!(layered);
contract!(recording);

// ---------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------

mod checks {
    use super::*;

    pub async fn create_is_idempotent_and_conflicts_on_difference(s: Store) {
        let info = s.create_new(put("a")).await;
        assert_eq!(info.tail, Offset::ZERO);
        assert!(!info.closed);
        assert_eq!(info.expiry, Expiry::Never);
        assert_eq!(info.content_type.essence(), "text/plain");

        // The same configuration, media type compared without parameters.
        let mut again = put("a");
        again.config.content_type = ContentType::parse("TEXT/Plain; charset=utf-8");
        let (created, same) = s.create(again).await.unwrap();
        assert!(!created);
        assert_eq!(same.id, info.id);

        // Re-confirming reports the stream as it is now.
        let tail = s.push("a", "x").await;
        let (created, now) = s.create(put("a")).await.unwrap();
        assert!(!created);
        assert_eq!(now.tail, tail);
        assert_eq!(s.all("a").await.unwrap(), ["x"]);

        let conflicts = [
            Create {
                config: StreamConfig {
                    content_type: json(),
                    ..StreamConfig::default()
                },
                ..put("a")
            },
            Create {
                config: StreamConfig {
                    content_type: None,
                    ..StreamConfig::default()
                },
                ..put("a")
            },
            Create {
                config: StreamConfig {
                    closed: true,
                    ..put("a").config
                },
                ..put("a")
            },
            Create {
                config: StreamConfig {
                    expiry: Expiry::Ttl(60),
                    ..put("a").config
                },
                ..put("a")
            },
            fork("a", "elsewhere", None, 0),
        ];
        for create in conflicts {
            let config = create.config.clone();
            assert_eq!(
                s.create(create).await.unwrap_err(),
                StreamErrorKind::Conflict,
                "{config:?}"
            );
        }

        // No content type means the default, both ways.
        let mut untyped = put("b");
        untyped.config.content_type = None;
        let info = s.create_new(untyped.clone()).await;
        assert_eq!(info.content_type.as_str(), ContentType::DEFAULT);
        assert!(!s.create(untyped).await.unwrap().0);
        let mut octets = put("b");
        octets.config.content_type = ContentType::parse("application/octet-stream");
        assert!(!s.create(octets).await.unwrap().0);
        assert_eq!(
            s.create(put("b")).await.unwrap_err(),
            StreamErrorKind::Conflict
        );

        // Expiry and closure must match too.
        let mut ttl = put("c");
        ttl.config.expiry = Expiry::Ttl(60);
        ttl.config.closed = true;
        s.create_new(ttl.clone()).await;
        assert!(!s.create(ttl).await.unwrap().0);

        // An initial body is stored; JSON bodies as their messages.
        let info = s.create_new(put_with("d", "hello")).await;
        assert_eq!(info.tail, offset(1, 5));
        let info = s.create_new(put_json("e", r#"[{"a":1}, 2]"#)).await;
        assert_eq!(info.tail, offset(2, 8));
        assert_eq!(s.all("e").await.unwrap(), [r#"{"a":1}"#, "2"]);
        let info = s.create_new(put_json("f", "[]")).await;
        assert_eq!(info.tail, Offset::ZERO);
        assert_eq!(
            s.create(put_json("g", "{oops")).await.unwrap_err(),
            StreamErrorKind::Invalid
        );
        assert_eq!(s.head("g").await.unwrap_err(), StreamErrorKind::NotFound);

        // A new incarnation after deletion is a new stream.
        let old = s.head("d").await.unwrap();
        s.delete("d").await.unwrap();
        let new = s.create_new(put("d")).await;
        assert_ne!(new.id, old.id);
        assert_eq!(new.tail, Offset::ZERO);
        assert!(s.all("d").await.unwrap().is_empty());
    }

    pub async fn appends_return_increasing_offsets(s: Store) {
        s.create_new(put("s")).await;
        let mut last = Offset::ZERO;
        for body in ["a", "bb", "a", "", "x"] {
            if body.is_empty() {
                continue;
            }
            let appended = s.append(post("s", body)).await.unwrap();
            assert!(appended.appended);
            assert_eq!(appended.outcome, written(None));
            let tail = appended.info.tail;
            assert!(tail > last, "{tail} after {last}");
            assert!(tail.to_string() > last.to_string(), "text forms sort too");
            last = tail;
        }
        assert_eq!(s.head("s").await.unwrap().tail, last);

        // Many records at once, as a flattened JSON batch arrives.
        s.create_new(put_json("j", "")).await;
        let mut batch = post("j", "");
        batch.content_type = json();
        batch.records = Ok(vec![
            Bytes::from("1"),
            Bytes::from("[2]"),
            Bytes::from("{}"),
        ]);
        let appended = s.append(batch).await.unwrap();
        assert_eq!(appended.info.tail, offset(3, 6));
        assert_eq!(s.all("j").await.unwrap(), ["1", "[2]", "{}"]);
    }

    pub async fn appends_are_validated(s: Store) {
        s.create_new(put("s")).await;
        let tail = s.push("s", "kept").await;

        let mut wrong_type = post("s", "x");
        wrong_type.content_type = json();
        let mut same_type = post("s", "y");
        same_type.content_type = ContentType::parse("Text/Plain; charset=utf-8");
        let mut untyped = post("s", "x");
        untyped.content_type = None;
        let mut empty = post("s", "");
        empty.records = Ok(Vec::new());
        let mut bad_json = post("s", "x");
        bad_json.records = Err(BadBody("invalid JSON".into()));

        assert_eq!(
            s.append(wrong_type).await.unwrap_err(),
            StreamErrorKind::ContentTypeMismatch
        );
        assert_eq!(
            s.append(untyped).await.unwrap_err(),
            StreamErrorKind::Invalid
        );
        assert_eq!(s.append(empty).await.unwrap_err(), StreamErrorKind::Invalid);
        assert_eq!(
            s.append(bad_json).await.unwrap_err(),
            StreamErrorKind::Invalid
        );
        assert_eq!(
            s.append(post("nowhere", "x")).await.unwrap_err(),
            StreamErrorKind::NotFound
        );
        assert_eq!(s.head("s").await.unwrap().tail, tail);

        assert!(s.append(same_type).await.unwrap().appended);
        assert_eq!(s.all("s").await.unwrap(), ["kept", "y"]);
    }

    pub async fn reads_from_start_now_and_saved_offsets(s: Store) {
        let t1 = s.create_new(put_with("s", "one")).await.tail;
        let t2 = s.push("s", "two").await;
        let t3 = s.push("s", "three").await;

        let all = s.read(get("s", ReadFrom::Start)).await.unwrap();
        assert_eq!(texts(&all.records), ["one", "two", "three"]);
        assert_eq!(all.start, Offset::ZERO);
        assert_eq!(all.next, t3);
        assert_eq!(all.info.tail, t3);
        assert!(all.up_to_date());

        let now = s.read(get("s", ReadFrom::Now)).await.unwrap();
        assert!(now.records.is_empty());
        assert_eq!((now.start, now.next), (t3, t3));
        assert!(now.up_to_date());

        let from_t1 = s.read(get("s", ReadFrom::At(t1))).await.unwrap();
        assert_eq!(texts(&from_t1.records), ["two", "three"]);
        assert_eq!((from_t1.start, from_t1.next), (t1, t3));
        let from_t2 = s.read(get("s", ReadFrom::At(t2))).await.unwrap();
        assert_eq!(texts(&from_t2.records), ["three"]);
        let from_zero = s.read(get("s", ReadFrom::At(Offset::ZERO))).await.unwrap();
        assert_eq!(from_zero.records.len(), 3);
        let at_tail = s.read(get("s", ReadFrom::At(t3))).await.unwrap();
        assert!(at_tail.records.is_empty());
        assert_eq!(at_tail.next, t3);

        // Offsets the stream never returned.
        for bad in [offset(1, 2), offset(2, 3), offset(4, 11), offset(9, 99)] {
            assert_eq!(
                s.read(get("s", ReadFrom::At(bad))).await.unwrap_err(),
                StreamErrorKind::Invalid,
                "{bad}"
            );
        }
        assert_eq!(
            s.read(get("missing", ReadFrom::Start)).await.unwrap_err(),
            StreamErrorKind::NotFound
        );
    }

    pub async fn max_bytes_returns_whole_records_and_resumes_exactly(s: Store) {
        let sizes = [3usize, 4, 5, 6, 1, 1, 9];
        let records: Vec<String> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| char::from(b'a' + i as u8).to_string().repeat(*n))
            .collect();
        s.create_new(put("s")).await;
        for record in &records {
            s.push("s", record).await;
        }

        let mut read = get("s", ReadFrom::Start);
        read.max_bytes = 8;
        let first = s.read(read.clone()).await.unwrap();
        assert_eq!(texts(&first.records), ["aaa", "bbbb"]);
        assert!(!first.up_to_date());
        read.from = ReadFrom::At(first.next);
        let second = s.read(read.clone()).await.unwrap();
        assert_eq!(texts(&second.records), ["ccccc"]);

        // Every limit: chunks are whole records, in order, no more than the
        // limit unless one record alone exceeds it, and as full as it allows.
        for max_bytes in 0..=30 {
            let mut read = get("s", ReadFrom::Start);
            read.max_bytes = max_bytes;
            let mut seen = Vec::new();
            loop {
                let chunk = s.read(read.clone()).await.unwrap();
                if chunk.records.is_empty() {
                    assert!(chunk.up_to_date());
                    assert_eq!(chunk.next, chunk.start);
                    break;
                }
                let got = texts(&chunk.records);
                let bytes: usize = got.iter().map(String::len).sum();
                assert!(bytes <= max_bytes || got.len() == 1, "{max_bytes}: {got:?}");
                if let Some(next) = records.get(seen.len() + got.len()) {
                    assert!(
                        bytes + next.len() > max_bytes,
                        "{max_bytes}: {got:?} not full"
                    );
                }
                seen.extend(got);
                read.from = ReadFrom::At(chunk.next);
            }
            assert_eq!(seen, records, "max_bytes {max_bytes}");
        }

        // JSON messages are records too.
        s.create_new(put_json("j", "[1, 22, 333]")).await;
        let mut read = get("j", ReadFrom::Start);
        read.max_bytes = 3;
        let first = s.read(read.clone()).await.unwrap();
        assert_eq!(texts(&first.records), ["1", "22"]);
        read.from = ReadFrom::At(first.next);
        assert_eq!(texts(&s.read(read).await.unwrap().records), ["333"]);
    }

    pub async fn closed_streams_refuse_appends(s: Store) {
        s.create_new(put("s")).await;
        let tail = s.push("s", "a").await;

        let closing = s.append(close("s")).await.unwrap();
        assert_eq!(closing.outcome, written(None));
        assert!(!closing.appended);
        assert!(closing.info.closed);
        assert_eq!(closing.info.tail, tail);

        let closed = StreamErrorKind::Closed { tail };
        assert_eq!(s.append(post("s", "b")).await.unwrap_err(), closed);
        let mut append_and_close = post("s", "b");
        append_and_close.close = true;
        assert_eq!(s.append(append_and_close).await.unwrap_err(), closed);
        // Closure is checked before content type and sequence.
        let mut wrong_type = with_seq(post("s", "b"), "1");
        wrong_type.content_type = json();
        assert_eq!(s.append(wrong_type).await.unwrap_err(), closed);
        assert_eq!(
            s.append(with_producer(post("s", "b"), "p", 0, 0))
                .await
                .unwrap_err(),
            closed
        );

        let again = s.append(close("s")).await.unwrap();
        assert_eq!(again.outcome, AppendOutcome::AlreadyClosed);
        assert!(again.info.closed);
        // A producer's close-only is refused unless it repeats the write
        // that closed the stream (PROTOCOL.md 5.2.1).
        assert_eq!(
            s.append(with_producer(close("s"), "other", 0, 0))
                .await
                .unwrap_err(),
            closed
        );
        s.create_new(put("p")).await;
        let by_p = s
            .append(with_producer(close("p"), "p", 0, 0))
            .await
            .unwrap();
        assert!(by_p.info.closed);
        let retried = s
            .append(with_producer(close("p"), "p", 0, 0))
            .await
            .unwrap();
        assert!(
            matches!(retried.outcome, AppendOutcome::Duplicate { .. }),
            "{retried:?}"
        );
        let p_tail = by_p.info.tail;
        assert_eq!(
            s.append(with_producer(close("p"), "p", 0, 1))
                .await
                .unwrap_err(),
            StreamErrorKind::Closed { tail: p_tail }
        );

        // The data stays readable.
        let read = s.read(subscribe("s", ReadFrom::Start)).await.unwrap();
        assert_eq!(texts(&read.records), ["a"]);
        assert!(read.info.closed);
        assert!(s.head("s").await.unwrap().closed);

        // A final append closes atomically.
        s.create_new(put("t")).await;
        let mut last = post("t", "final");
        last.close = true;
        let appended = s.append(last).await.unwrap();
        assert!(appended.appended && appended.info.closed);
        assert_eq!(appended.info.tail, offset(1, 5));
        assert_eq!(
            s.append(post("t", "more")).await.unwrap_err(),
            StreamErrorKind::Closed { tail: offset(1, 5) }
        );

        // Closure is part of the configuration a PUT re-confirms.
        assert_eq!(
            s.create(put("t")).await.unwrap_err(),
            StreamErrorKind::Conflict
        );
        let mut closed_put = put("t");
        closed_put.config.closed = true;
        assert!(!s.create(closed_put).await.unwrap().0);

        // Created closed.
        let mut closed_at_birth = put_with("u", "only");
        closed_at_birth.config.closed = true;
        let info = s.create_new(closed_at_birth).await;
        assert!(info.closed);
        assert_eq!(
            s.append(post("u", "x")).await.unwrap_err(),
            StreamErrorKind::Closed { tail: info.tail }
        );
    }

    pub async fn producers_are_deduplicated_and_fenced(s: Store) {
        s.create_new(put("s")).await;
        let append = |epoch, seq, body: &str| with_producer(post("s", body), "w", epoch, seq);

        let first = s.append(append(0, 0, "a")).await.unwrap();
        assert_eq!(first.outcome, written(Some((0, 0))));
        let tail = first.info.tail;
        let retry = s.append(append(0, 0, "a")).await.unwrap();
        assert_eq!(
            retry.outcome,
            AppendOutcome::Duplicate {
                producer: ProducerState {
                    epoch: 0,
                    last_seq: 0
                }
            }
        );
        assert!(!retry.appended);
        assert_eq!(retry.info.tail, tail);

        assert_eq!(
            s.append(append(0, 2, "c")).await.unwrap_err(),
            StreamErrorKind::SequenceGap {
                expected: 1,
                received: 2
            }
        );
        assert_eq!(
            s.append(append(0, 1, "b")).await.unwrap().outcome,
            written(Some((0, 1)))
        );
        // Any sequence at or below the last is a duplicate.
        assert!(matches!(
            s.append(append(0, 0, "a")).await.unwrap().outcome,
            AppendOutcome::Duplicate { producer } if producer.last_seq == 1
        ));
        // A new epoch starts at 0.
        assert_eq!(
            s.append(append(1, 1, "x")).await.unwrap_err(),
            StreamErrorKind::Invalid
        );
        assert_eq!(
            s.append(append(1, 0, "c")).await.unwrap().outcome,
            written(Some((1, 0)))
        );
        // The old epoch is fenced.
        assert_eq!(
            s.append(append(0, 2, "zombie")).await.unwrap_err(),
            StreamErrorKind::StaleEpoch { current: 1 }
        );

        // Producers are independent.
        let other = |seq, body: &str| with_producer(post("s", body), "v", 0, seq);
        assert_eq!(
            s.append(other(3, "x")).await.unwrap_err(),
            StreamErrorKind::SequenceGap {
                expected: 0,
                received: 3
            }
        );
        assert_eq!(
            s.append(other(0, "v")).await.unwrap().outcome,
            written(Some((0, 0)))
        );

        // A producer's final append closes; its retry is still a duplicate.
        let mut last = append(1, 1, "end");
        last.close = true;
        assert!(s.append(last.clone()).await.unwrap().info.closed);
        assert!(matches!(
            s.append(last).await.unwrap().outcome,
            AppendOutcome::Duplicate { .. }
        ));
        assert!(matches!(
            s.append(append(1, 2, "late")).await.unwrap_err(),
            StreamErrorKind::Closed { .. }
        ));

        // Each accepted append stored once; nothing refused was stored.
        assert_eq!(s.all("s").await.unwrap(), ["a", "b", "c", "v", "end"]);
    }

    /// PROTOCOL.md section 5.2.1, "Validation Logic", as a model.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        Accept,
        Duplicate,
        Stale(u64),
        EpochNotAtZero,
        Gap(u64, u64),
    }

    fn model(state: Option<(u64, u64)>, epoch: u64, seq: u64) -> Expect {
        match state {
            None if seq == 0 => Expect::Accept,
            None => Expect::Gap(0, seq),
            Some((current, _)) if epoch < current => Expect::Stale(current),
            Some((current, _)) if epoch > current && seq == 0 => Expect::Accept,
            Some((current, _)) if epoch > current => Expect::EpochNotAtZero,
            Some((_, last)) if seq <= last => Expect::Duplicate,
            Some((_, last)) if seq == last + 1 => Expect::Accept,
            Some((_, last)) => Expect::Gap(last + 1, seq),
        }
    }

    /// Every history of three claims with epochs and sequences in 0..3
    /// (729 histories), checked against the model: the outcome, and that
    /// the stream holds exactly the accepted appends.
    pub async fn producer_outcomes_follow_the_spec_for_every_short_history(s: Store) {
        let claims: Vec<(u64, u64)> = (0..3).flat_map(|e| (0..3).map(move |q| (e, q))).collect();
        let n = claims.len();
        for history in 0..n * n * n {
            let path = format!("p{history}");
            s.create_new(put(&path)).await;
            let mut state = None;
            let mut stored = Vec::new();
            let steps = [history % n, history / n % n, history / (n * n)];
            for (step, &i) in steps.iter().enumerate() {
                let (epoch, seq) = claims[i];
                let body = format!("{step}:{epoch}.{seq}");
                let append = with_producer(post(&path, &body), "p", epoch, seq);
                let got = s.append(append).await;
                let want = model(state, epoch, seq);
                let context = format!("history {steps:?}, step {step}, {state:?}");
                match (want, got) {
                    (Expect::Accept, Ok(a)) => {
                        assert_eq!(a.outcome, written(Some((epoch, seq))), "{context}");
                        state = Some((epoch, seq));
                        stored.push(body);
                    }
                    (Expect::Duplicate, Ok(a)) => {
                        let (epoch, last_seq) = state.unwrap();
                        let producer = ProducerState { epoch, last_seq };
                        assert_eq!(
                            a.outcome,
                            AppendOutcome::Duplicate { producer },
                            "{context}"
                        );
                    }
                    (Expect::Stale(current), Err(kind)) => {
                        assert_eq!(kind, StreamErrorKind::StaleEpoch { current }, "{context}");
                    }
                    (Expect::EpochNotAtZero, Err(kind)) => {
                        assert_eq!(kind, StreamErrorKind::Invalid, "{context}");
                    }
                    (Expect::Gap(expected, received), Err(kind)) => {
                        let gap = StreamErrorKind::SequenceGap { expected, received };
                        assert_eq!(kind, gap, "{context}");
                    }
                    (want, got) => panic!("{context}: wanted {want:?}, got {got:?}"),
                }
            }
            assert_eq!(s.all(&path).await.unwrap(), stored, "history {steps:?}");
        }
    }

    pub async fn stream_seq_compares_bytewise(s: Store) {
        s.create_new(put("s")).await;
        let seq = |v: &str| with_seq(post("s", v), v);
        let regression = StreamErrorKind::SeqRegression;

        s.append(seq("2")).await.unwrap();
        // "10" < "2" byte-wise, though not as numbers.
        assert_eq!(s.append(seq("10")).await.unwrap_err(), regression);
        assert_eq!(s.append(seq("2")).await.unwrap_err(), regression);
        s.append(seq("3")).await.unwrap();
        s.append(seq("a")).await.unwrap();
        // 'B' (0x42) sorts before 'a' (0x61).
        assert_eq!(s.append(seq("B")).await.unwrap_err(), regression);
        assert_eq!(s.append(seq("a")).await.unwrap_err(), regression);
        // Longer with the same prefix is greater.
        s.append(seq("aa")).await.unwrap();
        // An append without Stream-Seq neither checks nor resets it.
        s.push("s", "plain").await;
        assert_eq!(s.append(seq("a0")).await.unwrap_err(), regression);
        s.append(seq("ab")).await.unwrap();

        assert_eq!(
            s.all("s").await.unwrap(),
            ["2", "3", "a", "aa", "plain", "ab"]
        );
    }

    pub async fn forks_read_inherited_data_then_their_own(s: Store) {
        let t1 = s.create_new(put_with("src", "ab")).await.tail;
        let t2 = s.push("src", "cd").await;

        let info = s.create_new(fork("f1", "src", Some(t1), 0)).await;
        assert_eq!(info.tail, t1);
        assert_eq!(info.content_type.essence(), "text/plain");
        assert!(!info.closed);
        assert_eq!(s.all("f1").await.unwrap(), ["ab"]);
        let f1_tail = s.push("f1", "X").await;
        assert!(f1_tail > t1);
        assert_eq!(s.all("f1").await.unwrap(), ["ab", "X"]);
        let from_anchor = s.read(get("f1", ReadFrom::At(t1))).await.unwrap();
        assert_eq!(texts(&from_anchor.records), ["X"]);
        // The source is untouched.
        assert_eq!(s.all("src").await.unwrap(), ["ab", "cd"]);
        s.push("src", "ef").await;
        assert_eq!(s.all("f1").await.unwrap(), ["ab", "X"]);

        // Without an offset, a fork is anchored at the source's tail.
        let info = s.create_new(fork("f2", "src", None, 0)).await;
        assert_eq!(s.all("f2").await.unwrap(), ["ab", "cd", "ef"]);
        assert!(info.tail > t2);

        // A fork of a fork reads through the chain.
        s.create_new(fork("f3", "f1", None, 0)).await;
        s.push("f3", "Y").await;
        assert_eq!(s.all("f3").await.unwrap(), ["ab", "X", "Y"]);

        // Chunked reads cross from inherited to own records exactly.
        let mut read = get("f3", ReadFrom::Start);
        read.max_bytes = 1;
        let mut seen = Vec::new();
        loop {
            let chunk = s.read(read.clone()).await.unwrap();
            if chunk.records.is_empty() {
                break;
            }
            assert_eq!(chunk.records.len(), 1);
            seen.extend(texts(&chunk.records));
            read.from = ReadFrom::At(chunk.next);
        }
        assert_eq!(seen, ["ab", "X", "Y"]);

        // Idempotent fork creation.
        let (created, same) = s.create(fork("f1", "src", Some(t1), 0)).await.unwrap();
        assert!(!created);
        assert_eq!(same.id, s.head("f1").await.unwrap().id);
        assert!(!s.create(fork("f1", "src", None, 0)).await.unwrap().0);
        let mut typed = fork("f1", "src", Some(t1), 0);
        typed.config.content_type = text();
        assert!(!s.create(typed).await.unwrap().0);
        for different in [
            fork("f1", "src", Some(t2), 0),
            fork("f1", "src", Some(t1), 1),
            fork("f1", "f2", Some(t1), 0),
            put("f1"),
        ] {
            assert_eq!(
                s.create(different).await.unwrap_err(),
                StreamErrorKind::Conflict
            );
        }

        // Closed streams can be forked; the fork is open.
        s.append(close("src")).await.unwrap();
        let info = s.create_new(fork("f4", "src", None, 0)).await;
        assert!(!info.closed);
        s.push("f4", "g").await;
        assert_eq!(s.all("f4").await.unwrap(), ["ab", "cd", "ef", "g"]);
    }

    /// A fork anchored inside the data its source inherited sees only what
    /// lies before its anchor, not the rest of the ancestor's records.
    pub async fn fork_of_a_fork_inside_inherited_data(s: Store) {
        let r1 = s.create_new(put_with("a", "r1")).await.tail;
        s.push("a", "r2").await;
        let r3 = s.push("a", "r3").await;
        s.create_new(fork("b", "a", Some(r3), 0)).await;
        s.push("b", "b1").await;

        let info = s.create_new(fork("c", "b", Some(r1), 0)).await;
        assert_eq!(info.tail, r1);
        let read = s.read(get("c", ReadFrom::Start)).await.unwrap();
        assert_eq!(texts(&read.records), ["r1"]);
        assert_eq!(read.next, r1);
        assert!(read.up_to_date());
        s.push("c", "c1").await;
        assert_eq!(s.all("c").await.unwrap(), ["r1", "c1"]);

        // The same with a byte sub-offset into the inherited second record.
        s.create_new(fork("d", "b", Some(r1), 1)).await;
        assert_eq!(s.all("d").await.unwrap(), ["r1", "r"]);
        // A fork of "c" at its anchor sees the same data.
        s.create_new(fork("e", "c", Some(r1), 0)).await;
        assert_eq!(s.all("e").await.unwrap(), ["r1"]);
    }

    pub async fn fork_byte_sub_offsets(s: Store) {
        let t1 = s.create_new(put_with("src", "hello")).await.tail;
        let t2 = s.push("src", "world").await;

        s.create_new(fork("two", "src", Some(Offset::ZERO), 2))
            .await;
        assert_eq!(s.all("two").await.unwrap(), ["he"]);
        s.push("two", "!").await;
        assert_eq!(s.all("two").await.unwrap().concat(), "he!");

        // Exactly one whole record is the next boundary.
        let info = s
            .create_new(fork("five", "src", Some(Offset::ZERO), 5))
            .await;
        assert_eq!(info.tail, t1);
        assert_eq!(s.all("five").await.unwrap(), ["hello"]);

        s.create_new(fork("wor", "src", Some(t1), 3)).await;
        assert_eq!(s.all("wor").await.unwrap().concat(), "hellowor");

        // Past the next boundary, or past the tail.
        for (anchor, sub) in [(Offset::ZERO, 6), (t1, 6), (t2, 1), (t1, u64::MAX)] {
            assert_eq!(
                s.create(fork("bad", "src", Some(anchor), sub))
                    .await
                    .unwrap_err(),
                StreamErrorKind::Invalid,
                "{anchor} + {sub}"
            );
        }
    }

    pub async fn fork_json_sub_offsets(s: Store) {
        let info = s
            .create_new(put_json("src", r#"[1, "two", {"n":3}]"#))
            .await;
        let first = s
            .read(Read {
                max_bytes: 0,
                ..get("src", ReadFrom::Start)
            })
            .await
            .unwrap()
            .next;

        s.create_new(fork("two", "src", Some(Offset::ZERO), 2))
            .await;
        assert_eq!(s.all("two").await.unwrap(), ["1", r#""two""#]);
        s.create_new(fork("all", "src", Some(Offset::ZERO), 3))
            .await;
        assert_eq!(s.head("all").await.unwrap().tail, info.tail);
        s.create_new(fork("next", "src", Some(first), 1)).await;
        assert_eq!(s.all("next").await.unwrap(), ["1", r#""two""#]);
        let mut message = post("next", "");
        message.content_type = json();
        message.records = Ok(vec![Bytes::from("4")]);
        s.append(message).await.unwrap();
        assert_eq!(s.all("next").await.unwrap(), ["1", r#""two""#, "4"]);

        for (anchor, sub) in [(Offset::ZERO, 4), (first, 3), (info.tail, 1)] {
            assert_eq!(
                s.create(fork("bad", "src", Some(anchor), sub))
                    .await
                    .unwrap_err(),
                StreamErrorKind::Invalid,
                "{anchor} + {sub}"
            );
        }
    }

    pub async fn forks_start_with_fresh_writer_state(s: Store) {
        s.create_new(put("src")).await;
        for seq in 0..3 {
            let append = with_producer(post("src", "p"), "w", 2, seq);
            s.append(with_seq(append, "5")).await.ok();
        }
        assert_eq!(s.all("src").await.unwrap(), ["p"]);
        s.append(with_producer(post("src", "q"), "w", 2, 1))
            .await
            .unwrap();

        s.create_new(fork("f", "src", None, 0)).await;
        // The source's producer epoch and last sequence do not carry over.
        let fresh = s
            .append(with_producer(post("f", "x"), "w", 0, 0))
            .await
            .unwrap();
        assert_eq!(fresh.outcome, written(Some((0, 0))));
        // Nor does its Stream-Seq.
        s.append(with_seq(post("f", "y"), "1")).await.unwrap();
        assert_eq!(s.all("f").await.unwrap(), ["p", "q", "x", "y"]);
    }

    pub async fn fork_creation_errors(s: Store) {
        let tail = s.create_new(put_with("src", "abc")).await.tail;
        let cases = [
            (fork("f", "missing", None, 0), StreamErrorKind::NotFound),
            (
                fork("f", "src", Some(offset(2, 9)), 0),
                StreamErrorKind::Invalid,
            ),
            (
                fork("f", "src", Some(offset(1, 2)), 0),
                StreamErrorKind::Invalid,
            ),
            (
                fork("f", "src", Some(offset(0, 1)), 0),
                StreamErrorKind::Invalid,
            ),
            (
                Create {
                    config: StreamConfig {
                        content_type: json(),
                        ..fork("f", "src", None, 0).config
                    },
                    ..put("f")
                },
                StreamErrorKind::ContentTypeMismatch,
            ),
        ];
        for (create, want) in cases {
            let config = create.config.clone();
            assert_eq!(s.create(create).await.unwrap_err(), want, "{config:?}");
            assert_eq!(s.head("f").await.unwrap_err(), StreamErrorKind::NotFound);
        }
        // A matching type, however spelled, is fine.
        let mut typed = fork("f", "src", Some(tail), 0);
        typed.config.content_type = ContentType::parse("text/PLAIN;charset=utf-8");
        s.create_new(typed).await;
        // A fork with an initial body.
        s.create_new(Create {
            body: Bytes::from("own"),
            ..fork("g", "src", None, 0)
        })
        .await;
        assert_eq!(s.all("g").await.unwrap(), ["abc", "own"]);
    }

    pub async fn fork_expiry_follows_the_table(s: Store) {
        let at = SystemTime::now() + Duration::from_secs(3600);
        let later = at + Duration::from_secs(3600);
        let sources = [Expiry::Never, Expiry::Ttl(600), Expiry::At(at)];
        let requests = [Expiry::Never, Expiry::Ttl(900), Expiry::At(later)];
        for (i, source) in sources.into_iter().enumerate() {
            let path = format!("src{i}");
            let mut create = put(&path);
            create.config.expiry = source;
            s.create_new(create).await;
            for (j, requested) in requests.into_iter().enumerate() {
                let mut create = fork(&format!("f{i}{j}"), &path, None, 0);
                create.config.expiry = requested;
                let info = s.create_new(create).await;
                let want = match requested {
                    Expiry::Never => source,
                    own => own,
                };
                assert_eq!(info.expiry, want, "source {source:?}, fork {requested:?}");
            }
        }
    }

    pub async fn deleted_sources_are_gone_while_forks_read_them(s: Store) {
        s.create_new(put_with("src", "a")).await;
        s.create_new(fork("f", "src", None, 0)).await;
        s.push("f", "b").await;
        let mut waiter = wait_at_tail(&s, "src").await;

        s.delete("src").await.unwrap();
        assert_ready!(waiter.poll());
        let gone = StreamErrorKind::Gone;
        assert_eq!(s.all("src").await.unwrap_err(), gone);
        assert_eq!(s.head("src").await.unwrap_err(), gone);
        assert_eq!(s.append(post("src", "x")).await.unwrap_err(), gone);
        assert_eq!(s.delete("src").await.unwrap_err(), gone);
        assert_eq!(
            s.create(put("src")).await.unwrap_err(),
            StreamErrorKind::Conflict
        );
        assert_eq!(
            s.create(fork("g", "src", None, 0)).await.unwrap_err(),
            StreamErrorKind::Conflict
        );

        // The fork reads on, and can itself be forked.
        assert_eq!(s.all("f").await.unwrap(), ["a", "b"]);
        s.create_new(fork("h", "f", None, 0)).await;
        assert_eq!(s.all("h").await.unwrap(), ["a", "b"]);
    }

    pub async fn cleanup_cascades_after_the_last_fork(s: Store) {
        // a <- b <- c, and a <- d.
        s.create_new(put_with("a", "1")).await;
        s.create_new(fork("b", "a", None, 0)).await;
        s.push("b", "2").await;
        s.create_new(fork("c", "b", None, 0)).await;
        s.push("c", "3").await;
        s.create_new(fork("d", "a", None, 0)).await;

        s.delete("a").await.unwrap();
        s.delete("b").await.unwrap();
        assert_eq!(s.all("a").await.unwrap_err(), StreamErrorKind::Gone);
        assert_eq!(s.all("b").await.unwrap_err(), StreamErrorKind::Gone);
        assert_eq!(s.all("c").await.unwrap(), ["1", "2", "3"]);

        // c was b's last fork; a still has d.
        s.delete("c").await.unwrap();
        assert_eq!(s.all("c").await.unwrap_err(), StreamErrorKind::NotFound);
        assert_eq!(s.all("b").await.unwrap_err(), StreamErrorKind::NotFound);
        assert_eq!(s.all("a").await.unwrap_err(), StreamErrorKind::Gone);
        assert_eq!(s.all("d").await.unwrap(), ["1"]);

        s.delete("d").await.unwrap();
        assert_eq!(s.all("a").await.unwrap_err(), StreamErrorKind::NotFound);
        for path in ["a", "b", "c", "d"] {
            assert_eq!(s.create_new(put(path)).await.tail, Offset::ZERO);
        }

        // Deleting a fork of a live source leaves the source alone, and the
        // source is then deleted outright.
        s.create_new(put_with("x", "1")).await;
        s.create_new(fork("y", "x", None, 0)).await;
        s.delete("y").await.unwrap();
        assert_eq!(s.all("x").await.unwrap(), ["1"]);
        s.delete("x").await.unwrap();
        assert_eq!(s.all("x").await.unwrap_err(), StreamErrorKind::NotFound);
    }

    pub async fn rejected_forks_leak_no_reference(s: Store) {
        s.create_new(put_with("src", "abc")).await;
        s.create_new(put_json("jsrc", "[1]")).await;
        s.create_new(put("taken")).await;
        let mut mismatched = fork("f", "src", None, 0);
        mismatched.config.content_type = json();
        let rejected = [
            mismatched,
            fork("f", "src", Some(offset(7, 7)), 0),
            fork("f", "src", Some(Offset::ZERO), 4),
            fork("taken", "src", None, 0),
            Create {
                body: Bytes::from("{not json"),
                ..fork("f", "jsrc", None, 0)
            },
            fork("f", "jsrc", Some(Offset::ZERO), 2),
        ];
        for create in rejected {
            s.create(create).await.unwrap_err();
        }
        // Neither source is held by a fork: deleting them removes them.
        for path in ["src", "jsrc"] {
            s.delete(path).await.unwrap();
            assert_eq!(s.all(path).await.unwrap_err(), StreamErrorKind::NotFound);
            s.create_new(put(path)).await;
        }
    }

    pub async fn ttl_slides_with_reads_and_writes(s: Store) {
        let t0 = SystemTime::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut create = put_with("s", "a");
        create.config.expiry = Expiry::Ttl(1);
        create.now = t0;
        let first = s.create_new(create.clone()).await;
        assert_eq!(first.expiry, Expiry::Ttl(1));

        for (ms, kind) in [(500, "read"), (1_400, "append"), (2_300, "read")] {
            let outcome = if kind == "read" {
                let read = Read {
                    now: at(ms),
                    ..get("s", ReadFrom::Start)
                };
                s.read(read).await.map(drop)
            } else {
                let append = Append {
                    now: at(ms),
                    ..post("s", "b")
                };
                s.append(append).await.map(drop)
            };
            assert_eq!(outcome, Ok(()), "{kind} at {ms} ms");
        }
        // A second after the last touch it is gone, for every operation.
        let late = Read {
            now: at(3_300),
            ..get("s", ReadFrom::Start)
        };
        assert_eq!(s.read(late).await.unwrap_err(), StreamErrorKind::NotFound);
        let late = Append {
            now: at(3_300),
            ..post("s", "c")
        };
        assert_eq!(s.append(late).await.unwrap_err(), StreamErrorKind::NotFound);

        // The path is free again.
        create.now = at(3_400);
        let second = s.create_new(create).await;
        assert_ne!(second.id, first.id);
        assert_eq!(second.tail, offset(1, 1));
    }

    /// `HEAD` carries no time, so the stream is made to have been created
    /// 90 of its 100 seconds ago; had the `HEAD` refreshed it, it would
    /// outlive the read 100.5 seconds after creation.
    pub async fn head_does_not_touch_the_ttl(s: Store) {
        let t0 = SystemTime::now() - Duration::from_secs(90);
        let mut create = put("s");
        create.config.expiry = Expiry::Ttl(100);
        create.now = t0;
        s.create_new(create).await;
        assert_eq!(s.head("s").await.unwrap().expiry, Expiry::Ttl(100));
        let read = Read {
            now: t0 + Duration::from_millis(100_500),
            ..get("s", ReadFrom::Start)
        };
        assert_eq!(s.read(read).await.unwrap_err(), StreamErrorKind::NotFound);
    }

    pub async fn expires_at_is_absolute(s: Store) {
        let t0 = SystemTime::now();
        let mut create = put_with("s", "a");
        create.config.expiry = Expiry::At(t0 + Duration::from_secs(10));
        create.now = t0;
        s.create_new(create.clone()).await;
        for secs in [1, 5, 9] {
            let read = Read {
                now: t0 + Duration::from_secs(secs),
                ..get("s", ReadFrom::Start)
            };
            s.read(read).await.unwrap();
        }
        let read = Read {
            now: t0 + Duration::from_secs(10),
            ..get("s", ReadFrom::Start)
        };
        assert_eq!(s.read(read).await.unwrap_err(), StreamErrorKind::NotFound);
        // Re-creating an expired stream creates a new one.
        create.now = t0 + Duration::from_secs(11);
        create.config.expiry = Expiry::Never;
        s.create_new(create).await;
    }

    pub async fn expiry_with_forks(s: Store) {
        let t0 = SystemTime::now();
        let mut source = put_with("src", "a");
        source.config.expiry = Expiry::Ttl(1);
        source.now = t0;
        s.create_new(source).await;
        let mut own_ttl = fork("f", "src", None, 0);
        own_ttl.config.expiry = Expiry::Ttl(100);
        own_ttl.now = t0;
        s.create_new(own_ttl).await;
        let mut inherited = fork("g", "src", None, 0);
        inherited.now = t0;
        assert_eq!(s.create_new(inherited).await.expiry, Expiry::Ttl(1));

        // The expired source is kept for its forks, and is gone to clients.
        let at = |secs| Read {
            now: t0 + Duration::from_secs(secs),
            ..get("src", ReadFrom::Start)
        };
        assert_eq!(s.read(at(2)).await.unwrap_err(), StreamErrorKind::Gone);
        let mut late_fork = fork("h", "src", None, 0);
        late_fork.now = t0 + Duration::from_secs(2);
        assert!(s.create(late_fork).await.is_err());
        let read_f = |secs| Read {
            path: "f".into(),
            ..at(secs)
        };
        assert_eq!(texts(&s.read(read_f(2)).await.unwrap().records), ["a"]);

        // When both forks have expired, the source is cleaned up too.
        let read_g = Read {
            path: "g".into(),
            ..at(200)
        };
        assert_eq!(s.read(read_g).await.unwrap_err(), StreamErrorKind::NotFound);
        assert_eq!(s.read(at(200)).await.unwrap_err(), StreamErrorKind::Gone);
        assert_eq!(
            s.read(read_f(200)).await.unwrap_err(),
            StreamErrorKind::NotFound
        );
        assert_eq!(
            s.read(at(200)).await.unwrap_err(),
            StreamErrorKind::NotFound
        );
    }

    pub async fn subscribe_wakes_on_append(s: Store) {
        s.create_new(put_with("s", "a")).await;
        let mut wait = wait_at_tail(&s, "s").await;
        assert_pending!(wait.poll());
        s.push("s", "b").await;
        assert!(wait.is_woken());
        assert_ready!(wait.poll());

        // A refused append is no reason to wake; a spurious wake-up would
        // be allowed, so only the accepted append is checked.
        let mut wait = wait_at_tail(&s, "s").await;
        assert_pending!(wait.poll());
        let appended = s.append(with_seq(post("s", "c"), "1")).await.unwrap();
        assert!(appended.appended);
        assert_ready!(wait.poll());
    }

    pub async fn subscribe_wakes_on_close_and_delete(s: Store) {
        s.create_new(put("s")).await;
        let mut wait = wait_at_tail(&s, "s").await;
        assert_pending!(wait.poll());
        s.append(close("s")).await.unwrap();
        assert!(wait.is_woken());
        assert_ready!(wait.poll());

        s.create_new(put("d")).await;
        let mut wait = wait_at_tail(&s, "d").await;
        assert_pending!(wait.poll());
        s.delete("d").await.unwrap();
        assert!(wait.is_woken());
        assert_ready!(wait.poll());
    }

    pub async fn a_wait_made_before_an_append_is_not_missed(s: Store) {
        s.create_new(put("s")).await;
        // Read at the tail, then an append lands before the reader waits.
        let mut wait = wait_at_tail(&s, "s").await;
        s.push("s", "a").await;
        assert_ready!(wait.poll());

        // The same with a close.
        let mut wait = wait_at_tail(&s, "s").await;
        s.append(close("s")).await.unwrap();
        assert_ready!(wait.poll());
    }

    pub async fn a_fork_waits_only_for_its_own_appends(s: Store) {
        s.create_new(put_with("src", "a")).await;
        s.create_new(fork("f", "src", None, 0)).await;
        let mut wait = wait_at_tail(&s, "f").await;
        s.push("src", "not for the fork").await;
        assert_pending!(wait.poll());
        s.push("f", "b").await;
        assert_ready!(wait.poll());
    }

    pub async fn no_wait_unless_asked_open_and_at_the_tail(s: Store) {
        let tail = s.create_new(put_with("s", "a")).await.tail;
        let with_data = s.read(subscribe("s", ReadFrom::Start)).await.unwrap();
        assert!(with_data.wait.is_none());
        let not_asked = s.read(get("s", ReadFrom::At(tail))).await.unwrap();
        assert!(not_asked.wait.is_none());
        s.append(close("s")).await.unwrap();
        let closed = s.read(subscribe("s", ReadFrom::At(tail))).await.unwrap();
        assert!(closed.records.is_empty());
        assert!(closed.info.closed);
        assert!(closed.wait.is_none());
    }

    async fn meta(s: &Store, prefix: &str) -> Vec<(String, Bytes)> {
        let request = StorageRequest::ListMeta {
            prefix: prefix.into(),
        };
        match s.call(request).await.unwrap() {
            StorageResponse::Meta(entries) => entries,
            other => panic!("list meta answered {other:?}"),
        }
    }

    async fn set_meta(s: &Store, key: &str, value: Option<&'static str>) {
        let request = StorageRequest::SetMeta {
            key: key.into(),
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
        };
        let answer = s.call(request).await.unwrap();
        assert!(matches!(answer, StorageResponse::MetaSet), "{answer:?}");
    }

    pub async fn metadata_is_set_replaced_removed_and_listed_by_prefix(s: Store) {
        assert!(meta(&s, "").await.is_empty());
        set_meta(&s, "subs/b", Some("2")).await;
        set_meta(&s, "subs/a", Some("1")).await;
        set_meta(&s, "key", Some("k")).await;
        set_meta(&s, "subs/a", Some("one")).await;
        let entry = |k: &str, v: &'static str| (k.to_owned(), Bytes::from_static(v.as_bytes()));
        assert_eq!(
            meta(&s, "subs/").await,
            [entry("subs/a", "one"), entry("subs/b", "2")]
        );
        set_meta(&s, "subs/b", None).await;
        set_meta(&s, "absent", None).await;
        assert_eq!(
            meta(&s, "").await,
            [entry("key", "k"), entry("subs/a", "one")]
        );
        // Metadata is not a stream.
        assert_eq!(s.head("key").await.unwrap_err(), StreamErrorKind::NotFound);
    }

    pub async fn listing_shows_live_streams_with_their_tails(s: Store) {
        let list = |prefix: &str| {
            let s = s.clone();
            let prefix = prefix.to_owned();
            async move {
                match s.call(StorageRequest::List { prefix }).await.unwrap() {
                    StorageResponse::Streams(listed) => listed
                        .into_iter()
                        .map(|l| (l.path, l.tail))
                        .collect::<Vec<_>>(),
                    other => panic!("list answered {other:?}"),
                }
            }
        };
        let b = s.create_new(put_with("e/b", "bb")).await.tail;
        s.create_new(put("e/a")).await;
        let a = s.push("e/a", "a").await;
        let other = s.create_new(put("other")).await.tail;
        s.create_new(put("e/gone")).await;
        s.delete("e/gone").await.unwrap();
        // A soft-deleted source is not listed either.
        s.create_new(put("e/src")).await;
        s.create_new(fork("fork", "e/src", None, 0)).await;
        s.delete("e/src").await.unwrap();
        assert_eq!(
            list("e/").await,
            [("e/a".to_owned(), a), ("e/b".to_owned(), b)]
        );
        assert_eq!(list("").await.len(), 4);
        assert!(list("").await.contains(&("other".to_owned(), other)));
    }
}

// ---------------------------------------------------------------------------
// Offsets
// ---------------------------------------------------------------------------

/// Text forms round-trip and sort like the offsets they name, over a grid of
/// edge values for both parts.
#[test]
fn offset_text_forms_round_trip_and_sort() {
    const MAX: u64 = 9_999_999_999_999_999;
    let parts = [
        0,
        1,
        9,
        10,
        99,
        100,
        1 << 20,
        u64::from(u32::MAX),
        MAX - 1,
        MAX,
    ];
    let offsets: Vec<Offset> = parts
        .iter()
        .flat_map(|&i| parts.iter().map(move |&p| offset(i, p)))
        .collect();
    for a in &offsets {
        let text = a.to_string();
        assert_eq!(text.len(), 33);
        assert_eq!(text.parse::<Offset>().unwrap(), *a);
        assert_eq!(text.parse::<ReadFrom>().unwrap(), ReadFrom::At(*a));
        for b in &offsets {
            assert_eq!(a.cmp(b), text.cmp(&b.to_string()), "{a} vs {b}");
        }
    }
    assert!(Offset::new(MAX + 1, 0).is_none());
    assert!(Offset::new(0, MAX + 1).is_none());
    assert!(offset(MAX, 0).after_record(0).is_none());
    assert!(offset(0, MAX).after_record(1).is_none());
    assert_eq!(offset(0, MAX - 1).after_record(1), Some(offset(1, MAX)));
}

// ---------------------------------------------------------------------------
// The layered backend behind the HTTP service
// ---------------------------------------------------------------------------

#[tokio::test]
async fn layered_storage_serves_http() {
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower_durable_streams::{DurableStreamsService, LongPollLayer};

    let (storage, calls) = layered_memory();
    let service = ServiceBuilder::new()
        .layer(LongPollLayer::new().timeout(Duration::from_secs(10)))
        .service(DurableStreamsService::new(storage));
    let send = |request: Request<String>| service.clone().oneshot(request);

    let put = Request::put("/s")
        .header("content-type", "text/plain")
        .body(String::from("a"))
        .unwrap();
    let response = send(put).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let tail = response.headers()["stream-next-offset"].clone();
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let uri = format!("/s?offset={}&live=long-poll", tail.to_str().unwrap());
    let poll = tokio::spawn(send(Request::get(uri).body(String::new()).unwrap()));
    // Let the long-poll reach the tail and wait there.
    let reached = async {
        while calls.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reached)
        .await
        .expect("the long-poll never read");

    let post = Request::post("/s")
        .header("content-type", "text/plain")
        .body(String::from("b"))
        .unwrap();
    assert_eq!(send(post).await.unwrap().status(), StatusCode::NO_CONTENT);
    let response = poll.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("stream-cursor"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"b");

    let read = Request::get("/s?offset=-1").body(String::new()).unwrap();
    let response = send(read).await.unwrap();
    assert_eq!(response.headers()["stream-up-to-date"], "true");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ab");

    // A storage error still maps to its status through the middleware.
    let missing = Request::get("/nope").body(String::new()).unwrap();
    assert_eq!(send(missing).await.unwrap().status(), StatusCode::NOT_FOUND);
    let closed = Request::post("/s")
        .header("stream-closed", "true")
        .body(String::new())
        .unwrap();
    assert_eq!(send(closed).await.unwrap().status(), StatusCode::NO_CONTENT);
    let late = Request::post("/s")
        .header("content-type", "text/plain")
        .body(String::from("c"))
        .unwrap();
    let response = send(late).await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(response.headers()["stream-closed"], "true");

    // create, read at tail, append, re-read, read, read, close, append.
    assert_eq!(calls.load(Ordering::SeqCst), 8);
}

// ---------------------------------------------------------------------------
// The example's backend behind the HTTP service
// ---------------------------------------------------------------------------

#[tokio::test]
async fn recording_storage_serves_http_and_records_each_operation() {
    use http::{Request, StatusCode};
    use recording_storage::{Operation, RecordingStorage};
    use tower_durable_streams::DurableStreamsService;

    let storage = RecordingStorage::new();
    let service = DurableStreamsService::new(storage.clone()).prefix("/v1/stream");
    let send = |request: Request<String>| service.clone().oneshot(request);
    let text = |request: http::request::Builder, body: &str| {
        request
            .header("content-type", "text/plain")
            .body(body.to_owned())
            .unwrap()
    };

    let put = send(text(Request::put("/v1/stream/a/b"), "x"))
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let post = send(text(Request::post("/v1/stream/a/b"), "y"))
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::NO_CONTENT);
    let read = Request::get("/v1/stream/a/b?offset=-1").body(String::new());
    assert_eq!(send(read.unwrap()).await.unwrap().status(), StatusCode::OK);
    let missing = Request::head("/v1/stream/nope").body(String::new());
    assert_eq!(
        send(missing.unwrap()).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // Keyed by the path below the prefix, each with its outcome.
    let op = |kind, path: &str, outcome: &str| Operation {
        kind,
        path: path.to_owned(),
        outcome: Some(outcome.to_owned()),
    };
    assert_eq!(
        storage.operations(),
        [
            op("create", "a/b", "ok"),
            op("append", "a/b", "ok"),
            op("read", "a/b", "ok"),
            op("head", "nope", "NotFound"),
        ]
    );
}
