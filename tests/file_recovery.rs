//! `FileStorage` keeps its durability contract across a close and a reopen,
//! and recovers from a damaged log, checked through its
//! `Service<StorageRequest>` interface as `tests/storage_contract.rs` does.
//!
//! Dropping a store closes it: its writer finishes what is buffered, and the
//! directory lock is released. Damage is done to the files of a closed store,
//! as a crash or a bad disk would leave them; the log's format (a `u32`
//! length and a CRC-32C before each frame's body) is in
//! `src/storage/file/frame.rs`.

#![cfg(feature = "file")]

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio_test::task;
use tower::ServiceExt;
use tower_durable_streams::offset::{Offset, ReadFrom};
use tower_durable_streams::producer::{ProducerClaim, ProducerState};
use tower_durable_streams::storage::file::DEFAULT_SEGMENT_SIZE;
use tower_durable_streams::storage::{
    Append, AppendOutcome, Appended, Create, FileStorage, Read, StorageRequest, StorageResponse,
    StreamErrorKind, StreamInfo, SyncMode,
};
use tower_durable_streams::stream::{ContentType, Expiry, ForkRequest, StreamConfig};

// ---------------------------------------------------------------------------
// A store, seen through the Service interface
// ---------------------------------------------------------------------------

type Outcome<T> = Result<T, StreamErrorKind>;

/// An open `FileStorage`. Dropping it closes the store.
struct Store(FileStorage);

fn open(dir: &Path) -> Store {
    Store(FileStorage::open(dir).unwrap_or_else(|e| panic!("{} opens: {e}", dir.display())))
}

/// A store that acknowledges after `write(2)`, for tests that write much and
/// close cleanly before anything is damaged.
fn open_fast(dir: &Path, segment_size: u64) -> Store {
    let storage = FileStorage::builder()
        .sync(SyncMode::Write)
        .segment_size(segment_size)
        .open(dir)
        .unwrap_or_else(|e| panic!("{} opens: {e}", dir.display()));
    Store(storage)
}

impl Store {
    async fn call(&self, request: StorageRequest) -> Outcome<StorageResponse> {
        self.0
            .clone()
            .oneshot(request)
            .await
            .map_err(|e| e.kind().clone())
    }

    async fn create(&self, create: Create) -> Outcome<(bool, StreamInfo)> {
        match self.call(StorageRequest::Create(create)).await? {
            StorageResponse::Created { created, info } => Ok((created, info)),
            other => panic!("create answered {other:?}"),
        }
    }

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

    /// Appends text that must be accepted.
    async fn push(&self, path: &str, body: &str) -> Offset {
        let appended = self.append(post(path, body)).await.unwrap();
        assert!(appended.appended);
        appended.info.tail
    }

    async fn read_from(&self, path: &str, from: ReadFrom, now: SystemTime) -> Outcome<Vec<String>> {
        let read = Read {
            path: path.into(),
            from,
            max_bytes: 64 << 20,
            subscribe: false,
            now,
        };
        match self.call(StorageRequest::Read(read)).await? {
            StorageResponse::Read(result) => {
                assert!(result.up_to_date(), "one read returns everything");
                Ok(texts(&result.records))
            }
            other => panic!("read answered {other:?}"),
        }
    }

    /// Every record from the start.
    async fn all(&self, path: &str) -> Outcome<Vec<String>> {
        self.read_from(path, ReadFrom::Start, SystemTime::now())
            .await
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

    /// What a reader can learn of each of `paths`: `HEAD` (identity, content
    /// type, tail, closure, expiry) and every record, or the error of each.
    /// Reads renew sliding TTLs but log nothing.
    async fn observe(&self, paths: &[&str]) -> Vec<String> {
        let mut seen = Vec::new();
        for path in paths {
            let head = self.head(path).await.map(|info| {
                format!(
                    "id={} type={} tail={} closed={} expiry={:?}",
                    info.id,
                    info.content_type.as_str(),
                    info.tail,
                    info.closed,
                    info.expiry
                )
            });
            seen.push(format!("{path}: {head:?} {:?}", self.all(path).await));
        }
        seen
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

fn content_type(value: &str) -> Option<ContentType> {
    ContentType::parse(value)
}

fn put(path: &str) -> Create {
    Create {
        path: path.into(),
        config: StreamConfig {
            content_type: content_type("text/plain"),
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
        content_type: content_type("text/plain"),
        records: Ok(vec![Bytes::copy_from_slice(body.as_bytes())]),
        close: false,
        stream_seq: None,
        producer: None,
        now: SystemTime::now(),
    }
}

fn post_json(path: &str, messages: &[&str]) -> Append {
    Append {
        content_type: content_type("application/json"),
        records: Ok(messages
            .iter()
            .map(|m| Bytes::copy_from_slice(m.as_bytes()))
            .collect()),
        ..post(path, "")
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

fn by(mut append: Append, producer: &str, epoch: u64, seq: u64) -> Append {
    append.producer = Some(ProducerClaim {
        id: producer.into(),
        epoch,
        seq,
    });
    append
}

fn with_seq(mut append: Append, seq: &str) -> Append {
    append.stream_seq = Some(seq.into());
    append
}

fn closing(mut append: Append) -> Append {
    append.close = true;
    append
}

fn texts(records: &[Bytes]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.to_vec()).expect("UTF-8 record"))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn state(epoch: u64, last_seq: u64) -> ProducerState {
    ProducerState { epoch, last_seq }
}

fn written(epoch: u64, last_seq: u64) -> AppendOutcome {
    AppendOutcome::Written {
        producer: Some(state(epoch, last_seq)),
    }
}

fn duplicate(epoch: u64, last_seq: u64) -> AppendOutcome {
    AppendOutcome::Duplicate {
        producer: state(epoch, last_seq),
    }
}

// ---------------------------------------------------------------------------
// The files of a closed store
// ---------------------------------------------------------------------------

/// The log's segment files, in order.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read the data directory")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.len() == 24 && name.ends_with(".log")
        })
        .collect();
    found.sort();
    found
}

fn last_segment(dir: &Path) -> PathBuf {
    segments(dir)
        .pop()
        .expect("the store has written a segment")
}

/// Where a segment's frames end: its length less its tail of zeros, which
/// the writer keeps ahead of itself when it syncs. (The records in these
/// tests are text, so no frame ends in a zero byte.)
fn frames_end(path: &Path) -> u64 {
    let bytes = fs::read(path).expect("read a segment file");
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// Every segment's bytes, by name: what a reopen with no writes must leave
/// alone.
fn log_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    segments(dir)
        .into_iter()
        .map(|path| {
            let bytes = fs::read(&path).expect("read a segment");
            (path, bytes)
        })
        .collect()
}

/// A copy of a closed store's directory, to damage without touching the
/// original.
fn copy_store(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("a temporary directory");
    for entry in fs::read_dir(from).expect("read the data directory") {
        let entry = entry.expect("a directory entry");
        fs::copy(entry.path(), to.path().join(entry.file_name())).expect("copy a store file");
    }
    to
}

fn truncate(path: &Path, at: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(at).unwrap();
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut file = OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

fn zero(path: &Path, from: u64, count: usize) {
    let mut bytes = fs::read(path).unwrap();
    let from = from as usize;
    bytes[from..from + count].fill(0);
    fs::write(path, bytes).unwrap();
}

// ---------------------------------------------------------------------------
// Everything survives a close and a reopen
// ---------------------------------------------------------------------------

/// Every stream [`populate`] makes.
const ALL: &[&str] = &[
    "text",
    "json",
    "octets",
    "ttl",
    "expires",
    "closed",
    "born-closed",
    "producer",
    "producer-closed",
    "seq",
    "src",
    "fork",
    "fork-mid-record",
    "fork-of-fork",
    "gone-src",
    "gone-src-fork",
    "deleted",
    "never",
];

/// When `expires` expires: far enough ahead that it stays while the test
/// runs.
fn expires_at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(4_102_444_800) + Duration::from_nanos(123_456_789)
}

/// One stream of every kind the store must bring back. Returns the id of
/// the last stream created, which is deleted.
async fn populate(s: &Store) -> u64 {
    s.create_new(put_with("text", "first")).await;
    s.push("text", "second").await;
    s.push("text", "line\nbreak and \u{2028} separator").await;

    let mut json = put_with("json", r#"[{"a":1},[2,3]]"#);
    json.config.content_type = content_type("application/json; charset=utf-8");
    s.create_new(json).await;
    s.append(post_json("json", &["4", r#""five""#]))
        .await
        .unwrap();

    let mut octets = put("octets");
    octets.config.content_type = None;
    octets.body = Bytes::from_static(&[0, 159, 146, 150, 255]);
    s.create_new(octets).await;

    let mut ttl = put_with("ttl", "t");
    ttl.config.expiry = Expiry::Ttl(3600);
    s.create_new(ttl).await;
    let mut expires = put_with("expires", "e");
    expires.config.expiry = Expiry::At(expires_at());
    s.create_new(expires).await;

    s.create_new(put_with("closed", "before close")).await;
    s.append(close("closed")).await.unwrap();
    let mut born_closed = put_with("born-closed", "only");
    born_closed.config.closed = true;
    s.create_new(born_closed).await;

    s.create_new(put("producer")).await;
    for seq in 0..3 {
        let outcome = s
            .append(by(post("producer", &format!("p{seq}")), "p", 0, seq))
            .await
            .unwrap()
            .outcome;
        assert_eq!(outcome, written(0, seq));
    }
    s.append(by(post("producer", "q0"), "q", 4, 0))
        .await
        .unwrap();

    s.create_new(put("producer-closed")).await;
    let outcome = s
        .append(closing(by(post("producer-closed", "last"), "p", 0, 0)))
        .await
        .unwrap()
        .outcome;
    assert_eq!(outcome, written(0, 0));

    s.create_new(put("seq")).await;
    s.append(with_seq(post("seq", "s1"), "0005")).await.unwrap();

    s.create_new(put_with("src", "s-one")).await;
    let mid = s.push("src", "s-two").await;
    s.push("src", "s-three").await;
    s.create_new(fork("fork", "src", Some(mid), 0)).await;
    s.push("fork", "f-own").await;
    s.create_new(fork("fork-mid-record", "src", Some(mid), 3))
        .await;
    s.create_new(fork("fork-of-fork", "fork", None, 0)).await;
    s.push("fork-of-fork", "ff-own").await;

    s.create_new(put_with("gone-src", "g")).await;
    s.create_new(fork("gone-src-fork", "gone-src", None, 0))
        .await;
    s.delete("gone-src").await.unwrap();

    let deleted = s.create_new(put_with("deleted", "d")).await;
    s.delete("deleted").await.unwrap();
    deleted.id
}

/// What [`populate`] leaves, as readers see it. Checked once, so that later
/// comparisons of observations compare the right thing.
async fn check_populated(s: &Store) {
    assert_eq!(
        s.all("text").await.unwrap(),
        strings(&["first", "second", "line\nbreak and \u{2028} separator"])
    );
    assert_eq!(
        s.all("json").await.unwrap(),
        strings(&[r#"{"a":1}"#, "[2,3]", "4", r#""five""#])
    );
    let json = s.head("json").await.unwrap();
    assert_eq!(
        json.content_type.as_str(),
        "application/json; charset=utf-8"
    );
    assert_eq!(
        s.head("octets").await.unwrap().content_type.as_str(),
        ContentType::DEFAULT
    );
    assert_eq!(s.head("ttl").await.unwrap().expiry, Expiry::Ttl(3600));
    assert_eq!(
        s.head("expires").await.unwrap().expiry,
        Expiry::At(expires_at())
    );
    assert!(s.head("closed").await.unwrap().closed);
    assert!(s.head("born-closed").await.unwrap().closed);
    assert!(!s.head("text").await.unwrap().closed);
    assert_eq!(
        s.all("producer").await.unwrap(),
        strings(&["p0", "p1", "p2", "q0"])
    );
    assert!(s.head("producer-closed").await.unwrap().closed);
    assert_eq!(
        s.all("fork").await.unwrap(),
        strings(&["s-one", "s-two", "f-own"])
    );
    assert_eq!(
        s.all("fork-mid-record").await.unwrap(),
        strings(&["s-one", "s-two", "s-t"])
    );
    assert_eq!(
        s.all("fork-of-fork").await.unwrap(),
        strings(&["s-one", "s-two", "f-own", "ff-own"])
    );
    assert_eq!(s.head("gone-src").await.unwrap_err(), StreamErrorKind::Gone);
    assert_eq!(s.all("gone-src").await.unwrap_err(), StreamErrorKind::Gone);
    assert_eq!(s.all("gone-src-fork").await.unwrap(), strings(&["g"]));
    assert_eq!(
        s.head("deleted").await.unwrap_err(),
        StreamErrorKind::NotFound
    );
    assert_eq!(
        s.head("never").await.unwrap_err(),
        StreamErrorKind::NotFound
    );
}

/// Octet records are not UTF-8, so [`Store::observe`] cannot show them;
/// their bytes are compared here.
async fn octets(s: &Store) -> Vec<Bytes> {
    let read = Read {
        path: "octets".into(),
        from: ReadFrom::Start,
        max_bytes: 1 << 20,
        subscribe: false,
        now: SystemTime::now(),
    };
    match s.call(StorageRequest::Read(read)).await.unwrap() {
        StorageResponse::Read(result) => result.records,
        other => panic!("read answered {other:?}"),
    }
}

/// [`Store::observe`] of [`ALL`], less the octet stream's undecodable bytes.
async fn observe_all(s: &Store) -> (Vec<String>, Vec<Bytes>) {
    let paths: Vec<&str> = ALL.iter().copied().filter(|p| *p != "octets").collect();
    let mut seen = s.observe(&paths).await;
    let head = s.head("octets").await.unwrap();
    seen.push(format!("octets: {} {}", head.id, head.tail));
    (seen, octets(s).await)
}

#[tokio::test]
async fn every_kind_of_state_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (before, last_id) = {
        let s = open(dir.path());
        let last_id = populate(&s).await;
        check_populated(&s).await;
        (observe_all(&s).await, last_id)
    };
    assert_eq!(before.1, vec![Bytes::from_static(&[0, 159, 146, 150, 255])]);

    // Reopening twice in a row gives the same state, and a reopen that
    // writes nothing leaves the log's bytes as they were.
    let files = log_bytes(dir.path());
    for reopen in 1..=2 {
        let s = open(dir.path());
        assert_eq!(observe_all(&s).await, before, "after reopen {reopen}");
        check_populated(&s).await;
        drop(s);
        assert!(log_bytes(dir.path()) == files, "reopen {reopen} wrote");
    }

    // The writer state came back too: producers, Stream-Seq and closure go
    // on where they were.
    let s = open(dir.path());
    let retry = s.append(by(post("producer", "p2"), "p", 0, 2)).await;
    assert_eq!(retry.unwrap().outcome, duplicate(0, 2));
    let gap = s.append(by(post("producer", "p4"), "p", 0, 4)).await;
    assert_eq!(
        gap.unwrap_err(),
        StreamErrorKind::SequenceGap {
            expected: 3,
            received: 4
        }
    );
    let stale = s.append(by(post("producer", "q-old"), "q", 3, 0)).await;
    assert_eq!(
        stale.unwrap_err(),
        StreamErrorKind::StaleEpoch { current: 4 }
    );
    let next = s.append(by(post("producer", "p3"), "p", 0, 3)).await;
    assert_eq!(next.unwrap().outcome, written(0, 3));

    // The closing append's retry is a duplicate; anything else is refused.
    let retry = s
        .append(closing(by(post("producer-closed", "last"), "p", 0, 0)))
        .await;
    assert_eq!(retry.unwrap().outcome, duplicate(0, 0));
    let after = s.append(post("producer-closed", "more")).await;
    assert!(matches!(after, Err(StreamErrorKind::Closed { .. })));
    let closed = s.append(post("closed", "more")).await;
    assert!(matches!(closed, Err(StreamErrorKind::Closed { .. })));
    let again = s.append(close("closed")).await.unwrap().outcome;
    assert_eq!(again, AppendOutcome::AlreadyClosed);

    let equal = s.append(with_seq(post("seq", "s-again"), "0005")).await;
    assert_eq!(equal.unwrap_err(), StreamErrorKind::SeqRegression);
    let lower = s.append(with_seq(post("seq", "s-lower"), "00049")).await;
    assert_eq!(lower.unwrap_err(), StreamErrorKind::SeqRegression);
    s.append(with_seq(post("seq", "s2"), "0006")).await.unwrap();

    // Idempotent re-creation still matches the recovered configuration.
    let mut ttl = put("ttl");
    ttl.config.expiry = Expiry::Ttl(3600);
    assert!(!s.create(ttl).await.unwrap().0);
    let mut other = put("ttl");
    other.config.expiry = Expiry::Ttl(60);
    assert_eq!(
        s.create(other).await.unwrap_err(),
        StreamErrorKind::Conflict
    );
    let mut json = put("json");
    json.config.content_type = content_type("application/json");
    assert!(!s.create(json).await.unwrap().0);
    let same_fork = fork("fork", "src", Some(offset_after(&s, "src", 2).await), 0);
    assert!(!s.create(same_fork).await.unwrap().0);
    // An id is never handed out twice, even after a restart, so ETags of
    // a new stream never match an old one's.
    let fresh = s.create_new(put("fresh")).await;
    assert!(fresh.id > last_id, "id {} reused", fresh.id);

    let changed = observe_all(&s).await;
    drop(s);
    let s = open(dir.path());
    assert_eq!(observe_all(&s).await, changed);
    assert_eq!(
        s.all("producer").await.unwrap(),
        strings(&["p0", "p1", "p2", "q0", "p3"])
    );
    assert_eq!(s.all("seq").await.unwrap(), strings(&["s1", "s2"]));
}

/// The offset after the first `records` records of `path`.
async fn offset_after(s: &Store, path: &str, records: usize) -> Offset {
    let mut at = Offset::ZERO;
    for record in s.all(path).await.unwrap().iter().take(records) {
        at = at.after_record(record.len()).unwrap();
    }
    at
}

#[tokio::test]
async fn soft_deleted_sources_and_cascades_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        // a <- b <- c, and src <- fork; every source deleted while read.
        s.create_new(put_with("a", "a1")).await;
        s.create_new(fork("b", "a", None, 0)).await;
        s.push("b", "b1").await;
        s.create_new(fork("c", "b", None, 0)).await;
        s.push("c", "c1").await;
        s.delete("a").await.unwrap();
        s.delete("b").await.unwrap();
        s.create_new(put_with("src", "x")).await;
        s.create_new(fork("fork", "src", None, 0)).await;
        s.delete("src").await.unwrap();
    }

    let s = open(dir.path());
    for gone in ["a", "b", "src"] {
        assert_eq!(s.head(gone).await.unwrap_err(), StreamErrorKind::Gone);
        assert_eq!(s.all(gone).await.unwrap_err(), StreamErrorKind::Gone);
        // The path stays blocked while the forks read from it.
        assert_eq!(
            s.create(put(gone)).await.unwrap_err(),
            StreamErrorKind::Conflict
        );
        assert!(matches!(
            s.append(post(gone, "no")).await,
            Err(StreamErrorKind::Gone)
        ));
    }
    assert_eq!(s.all("c").await.unwrap(), strings(&["a1", "b1", "c1"]));
    assert_eq!(s.all("fork").await.unwrap(), strings(&["x"]));
    s.push("fork", "y").await;

    // The last fork's delete releases the whole deleted chain.
    s.delete("c").await.unwrap();
    for path in ["a", "b", "c"] {
        assert_eq!(s.head(path).await.unwrap_err(), StreamErrorKind::NotFound);
    }
    // The reference count came back exactly: one delete frees `src`.
    assert_eq!(s.head("src").await.unwrap_err(), StreamErrorKind::Gone);
    s.delete("fork").await.unwrap();
    assert_eq!(s.head("src").await.unwrap_err(), StreamErrorKind::NotFound);
    drop(s);

    for _ in 0..2 {
        let s = open(dir.path());
        for path in ["a", "b", "c", "src", "fork"] {
            assert_eq!(s.head(path).await.unwrap_err(), StreamErrorKind::NotFound);
        }
    }
    let s = open(dir.path());
    s.create_new(put("a")).await;
    assert_eq!(s.all("a").await.unwrap(), Vec::<String>::new());
    s.create_new(put_with("src", "new")).await;
    assert_eq!(s.all("src").await.unwrap(), strings(&["new"]));
}

#[tokio::test]
async fn expiry_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let soon = SystemTime::now() + Duration::from_secs(30);
    {
        let s = open(dir.path());
        let mut ttl = put_with("ttl", "t");
        ttl.config.expiry = Expiry::Ttl(20);
        s.create_new(ttl).await;
        let mut at = put_with("at", "a");
        at.config.expiry = Expiry::At(soon);
        s.create_new(at).await;
        let mut later = put_with("later", "l");
        later.config.expiry = Expiry::At(soon);
        s.create_new(later).await;
    }
    let s = open(dir.path());
    assert_eq!(s.head("ttl").await.unwrap().expiry, Expiry::Ttl(20));
    assert_eq!(s.head("at").await.unwrap().expiry, Expiry::At(soon));
    // Expires-At is absolute: a request made after it finds nothing, and
    // the deletion that it caused is durable.
    let past = soon + Duration::from_secs(1);
    assert_eq!(
        s.read_from("at", ReadFrom::Start, past).await.unwrap_err(),
        StreamErrorKind::NotFound
    );
    // A sliding TTL restarts from the reopen, so it still lives before
    // twenty seconds pass from now, and not after.
    let now = SystemTime::now();
    assert_eq!(
        s.read_from("ttl", ReadFrom::Start, now + Duration::from_secs(19))
            .await
            .unwrap(),
        strings(&["t"])
    );
    assert_eq!(
        s.read_from("ttl", ReadFrom::Start, now + Duration::from_secs(40))
            .await
            .unwrap_err(),
        StreamErrorKind::NotFound
    );
    drop(s);

    let s = open(dir.path());
    assert_eq!(s.head("at").await.unwrap_err(), StreamErrorKind::NotFound);
    assert_eq!(s.head("ttl").await.unwrap_err(), StreamErrorKind::NotFound);
    assert_eq!(s.all("later").await.unwrap(), strings(&["l"]));
    // The freed paths can be created again.
    s.create_new(put("at")).await;
    s.create_new(put("ttl")).await;
}

// ---------------------------------------------------------------------------
// An acknowledged answer is what readers see
// ---------------------------------------------------------------------------

/// A client that gives up on a write leaves it decided and logged; its
/// retry is then answered from the recorded state (a duplicate, an
/// idempotent create). Once that answer is given, readers must see the
/// data it acknowledges, before any restart as after it.
#[tokio::test]
async fn an_abandoned_write_is_visible_once_its_retry_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());

    // A create whose caller went away after it was logged.
    let mut abandoned = task::spawn(
        s.0.clone()
            .oneshot(StorageRequest::Create(put_with("s", "first"))),
    );
    // One poll logs it; it may or may not be durable already.
    let _ = abandoned.poll();
    drop(abandoned);
    let (created, _) = s.create(put_with("s", "first")).await.unwrap();
    assert!(!created, "the retry finds the stream the first try made");
    assert_eq!(s.all("s").await.unwrap(), strings(&["first"]));

    // A producer's append whose caller went away after it was logged.
    let mut abandoned =
        task::spawn(
            s.0.clone()
                .oneshot(StorageRequest::Append(by(post("s", "p0"), "p", 0, 0))),
        );
    let _ = abandoned.poll();
    drop(abandoned);
    let retry = s.append(by(post("s", "p0"), "p", 0, 0)).await.unwrap();
    assert_eq!(retry.outcome, duplicate(0, 0));
    assert_eq!(s.all("s").await.unwrap(), strings(&["first", "p0"]));
    assert_eq!(s.head("s").await.unwrap().tail, retry.info.tail);

    // A closing append abandoned the same way; its retry reports closure.
    let mut abandoned = task::spawn(s.0.clone().oneshot(StorageRequest::Append(closing(by(
        post("s", "p1"),
        "p",
        0,
        1,
    )))));
    let _ = abandoned.poll();
    drop(abandoned);
    let retry = s
        .append(closing(by(post("s", "p1"), "p", 0, 1)))
        .await
        .unwrap();
    assert_eq!(retry.outcome, duplicate(0, 1));
    assert!(retry.info.closed);
    assert!(s.head("s").await.unwrap().closed);
    assert_eq!(s.all("s").await.unwrap(), strings(&["first", "p0", "p1"]));
    drop(s);

    let s = open(dir.path());
    assert_eq!(s.all("s").await.unwrap(), strings(&["first", "p0", "p1"]));
    assert!(s.head("s").await.unwrap().closed);
}

// ---------------------------------------------------------------------------
// A damaged log
// ---------------------------------------------------------------------------

/// A store whose last frame is one producer's append-and-close with a
/// `Stream-Seq`: producer state, closure, sequence and data all in that
/// frame. Returns the directory, what readers saw before that frame, and
/// where it begins and ends in the last segment.
async fn store_with_a_last_frame() -> (tempfile::TempDir, Vec<String>, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = open(dir.path());
        s.create_new(put_with("s", "one")).await;
        s.push("s", "two").await;
        let outcome = s.append(by(post("s", "p0"), "p", 0, 0)).await.unwrap();
        assert_eq!(outcome.outcome, written(0, 0));
        s.append(with_seq(post("s", "seq1"), "0001")).await.unwrap();
        s.create_new(put_with("other", "o")).await;
        s.observe(&["s", "other"]).await
    };
    let start = frames_end(&last_segment(dir.path()));
    {
        let s = open(dir.path());
        let last = with_seq(
            closing(by(post("s", "p1 is the last frame"), "p", 0, 1)),
            "0002",
        );
        assert_eq!(s.append(last).await.unwrap().outcome, written(0, 1));
    }
    let end = frames_end(&last_segment(dir.path()));
    assert!(end > start + 8, "the last frame has a body");
    (dir, before, start, end)
}

/// After damage past `good`, the store opens with exactly `before`, its
/// last segment cut back to `good`; a new write is accepted and survives
/// another reopen.
async fn recovers_to(dir: &Path, before: &[String], good: u64, case: &str) {
    let s = open(dir);
    assert_eq!(s.observe(&["s", "other"]).await, before, "{case}");
    assert_eq!(
        frames_end(&last_segment(dir)),
        good,
        "{case}: cut at the last good frame"
    );
    // The lost frame is wholly gone: its producer seq, its Stream-Seq and its
    // closure are all free again, and a retry of it is new data.
    let retry = with_seq(closing(by(post("s", "p1 retried"), "p", 0, 1)), "0002");
    let retried = s.append(retry).await.unwrap();
    assert_eq!(retried.outcome, written(0, 1), "{case}");
    s.push("other", "o2").await;
    drop(s);

    for reopen in 0..2 {
        let s = open(dir);
        let records = s.all("s").await.unwrap();
        assert_eq!(
            records,
            strings(&["one", "two", "p0", "seq1", "p1 retried"]),
            "{case}, reopen {reopen}"
        );
        assert!(s.head("s").await.unwrap().closed, "{case}");
        assert_eq!(s.all("other").await.unwrap(), strings(&["o", "o2"]));
        let dup = s.append(by(post("s", "p1 retried"), "p", 0, 1)).await;
        assert_eq!(dup.unwrap().outcome, duplicate(0, 1), "{case}");
    }
}

#[tokio::test]
async fn a_torn_last_frame_is_cut_and_wholly_absent() {
    let (dir, before, start, end) = store_with_a_last_frame().await;

    // Untouched, the last frame is there: the cuts below are what removes it.
    {
        let copy = copy_store(dir.path());
        let s = open(copy.path());
        assert_eq!(
            s.all("s").await.unwrap(),
            strings(&["one", "two", "p0", "seq1", "p1 is the last frame"])
        );
        assert!(s.head("s").await.unwrap().closed);
    }

    let body = end - start - 8;
    let cuts = [
        start + 1,
        start + 4,
        start + 7,
        start + 8,
        start + 9,
        start + 8 + body / 2,
        end - 1,
    ];
    for cut in cuts {
        let copy = copy_store(dir.path());
        truncate(&last_segment(copy.path()), cut);
        let case = format!("cut at {cut} in frame {start}..{end}");
        recovers_to(copy.path(), &before, start, &case).await;
    }
}

#[tokio::test]
async fn garbage_after_the_last_frame_is_cut() {
    let (dir, _, _, end) = store_with_a_last_frame().await;
    let full = {
        let s = open(dir.path());
        s.observe(&["s", "other"]).await
    };

    let mut wrong_crc = Vec::new();
    wrong_crc.extend_from_slice(&12u32.to_le_bytes());
    wrong_crc.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    wrong_crc.extend_from_slice(&[2; 12]);
    let mut too_long = Vec::new();
    too_long.extend_from_slice(&u32::MAX.to_le_bytes());
    too_long.extend_from_slice(&[0; 20]);
    let garbage: [(&str, Vec<u8>); 5] = [
        ("0xff bytes", vec![0xff; 100]),
        ("zero bytes", vec![0; 4096]),
        ("a short header", vec![7, 0, 0]),
        ("a frame with a wrong checksum", wrong_crc),
        ("a header claiming 4 GiB", too_long),
    ];
    for (what, bytes) in garbage {
        let copy = copy_store(dir.path());
        append_bytes(&last_segment(copy.path()), &bytes);
        let s = open(copy.path());
        assert_eq!(s.observe(&["s", "other"]).await, full, "{what}");
        assert_eq!(
            frames_end(&last_segment(copy.path())),
            end,
            "{what}: cut back"
        );
        s.push("other", "o2").await;
        drop(s);
        let s = open(copy.path());
        assert_eq!(
            s.all("other").await.unwrap(),
            strings(&["o", "o2"]),
            "{what}"
        );
        assert_eq!(
            s.all("s").await.unwrap(),
            strings(&["one", "two", "p0", "seq1", "p1 is the last frame"]),
            "{what}"
        );
    }
}

/// Writes `count` appends of about `size` bytes to stream `s`, each
/// acknowledged before the next. Returns each record and where its frame
/// ends: (segment file, length).
///
/// The store's maintenance may take a snapshot once the log has grown by a
/// segment and half a second has passed; damage before a snapshot's point is
/// not replayed, so these stores are written and closed well within that.
async fn numbered_appends(
    s: &Store,
    dir: &Path,
    count: usize,
    size: usize,
) -> Vec<(String, PathBuf, u64)> {
    s.create_new(put("s")).await;
    let mut ends = Vec::new();
    for i in 0..count {
        let record = format!("record {i:04} {}", "x".repeat(size - i % 97));
        s.push("s", &record).await;
        // An acknowledged append has been written: the file ends with it.
        let segment = last_segment(dir);
        let end = frames_end(&segment);
        ends.push((record, segment, end));
    }
    ends
}

#[tokio::test]
async fn a_zeroed_page_ends_the_log_at_the_frame_it_hits() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let s = open_fast(dir.path(), DEFAULT_SEGMENT_SIZE);
        numbered_appends(&s, dir.path(), 400, 100).await
    };
    let segment = last_segment(dir.path());
    assert_eq!(segments(dir.path()).len(), 1);
    let size = frames_end(&segment);
    assert!(size > 8 * 4096, "the segment spans pages: {size}");
    let page = (size / 4096 / 2) * 4096;
    zero(&segment, page, 4096);

    // Frames wholly before the page are intact; the frame the page hits and
    // everything after it are gone.
    let kept: Vec<String> = written
        .iter()
        .filter(|(_, _, end)| *end <= page)
        .map(|(record, _, _)| record.clone())
        .collect();
    let good = written
        .iter()
        .map(|(_, _, end)| *end)
        .filter(|end| *end <= page)
        .max()
        .unwrap();
    assert!(kept.len() > 100 && kept.len() < 400);
    for reopen in 0..2 {
        let s = open(dir.path());
        assert_eq!(s.all("s").await.unwrap(), kept, "reopen {reopen}");
        assert_eq!(frames_end(&segment), good, "cut at the damaged frame");
        let head = s.head("s").await.unwrap();
        assert_eq!(head.tail.index(), kept.len() as u64);
    }
    let s = open(dir.path());
    s.push("s", "after the damage").await;
    drop(s);
    let s = open(dir.path());
    let mut expected = kept.clone();
    expected.push("after the damage".into());
    assert_eq!(s.all("s").await.unwrap(), expected);
}

#[tokio::test]
async fn segments_after_a_damaged_frame_are_set_aside() {
    const SEGMENT: u64 = 16 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let s = open_fast(dir.path(), SEGMENT);
        numbered_appends(&s, dir.path(), 40, 2000).await
    };
    let files = segments(dir.path());
    assert!(files.len() >= 4, "several segments: {files:?}");
    let damaged = files[1].clone();
    let page = 4096;
    assert!(frames_end(&damaged) > page + 4096);
    zero(&damaged, page, 4096);

    let kept: Vec<String> = written
        .iter()
        .filter(|(_, segment, end)| *segment == files[0] || (*segment == damaged && *end <= page))
        .map(|(record, _, _)| record.clone())
        .collect();
    assert!(kept.len() > 5 && kept.len() < 20, "{}", kept.len());
    {
        let s = open_fast(dir.path(), SEGMENT);
        assert_eq!(s.all("s").await.unwrap(), kept);
        // Later segments are renamed, not replayed and not deleted.
        assert_eq!(segments(dir.path()), files[..2].to_vec());
        for later in &files[2..] {
            assert!(!later.exists());
            assert!(later.with_extension("log.corrupt").exists(), "{later:?}");
        }
        // The log goes on from the cut, into new segments.
        for i in 0..30 {
            s.push("s", &format!("after {i:03} {}", "y".repeat(1000)))
                .await;
        }
    }
    let s = open_fast(dir.path(), SEGMENT);
    let records = s.all("s").await.unwrap();
    assert_eq!(records[..kept.len()], kept[..]);
    assert_eq!(records.len(), kept.len() + 30);
    assert!(records[kept.len()].starts_with("after 000"));
    assert!(records[kept.len() + 29].starts_with("after 029"));
    assert!(segments(dir.path()).len() > 2);
}

/// A durable store zeroes each segment ahead of its frames, so that a sync
/// overwrites bytes the file has instead of growing it. Those zeros, at the
/// end of the last segment or of any earlier one, are where the frames end:
/// nothing is cut, set aside or lost, and writing goes on over them.
#[tokio::test]
async fn zeros_ahead_of_the_frames_are_the_end_of_the_log_not_damage() {
    const SEGMENT: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let open_durable = || {
        Store(
            FileStorage::builder()
                .sync(SyncMode::Fsync)
                .segment_size(SEGMENT)
                .open(dir.path())
                .expect("the store opens"),
        )
    };
    let record = |i: usize| format!("record {i:04} {}", "z".repeat(900));
    {
        let s = open_durable();
        s.create_new(put("s")).await;
        for i in 0..200 {
            s.push("s", &record(i)).await;
        }
    }
    let files = segments(dir.path());
    assert!(files.len() >= 3, "{} segments", files.len());
    let zeroed = files
        .iter()
        .filter(|f| fs::metadata(f).unwrap().len() > frames_end(f))
        .count();
    assert!(
        zeroed >= files.len() - 1,
        "{zeroed} of {} zeroed ahead",
        files.len()
    );
    let before = log_bytes(dir.path());

    let mut expected: Vec<String> = (0..200).map(record).collect();
    {
        let s = open_durable();
        assert_eq!(s.all("s").await.unwrap(), expected);
        assert_eq!(log_bytes(dir.path()), before, "recovery changed the log");
        for i in 200..260 {
            s.push("s", &record(i)).await;
        }
    }
    expected.extend((200..260).map(record));
    for _ in 0..2 {
        let s = open_durable();
        assert_eq!(s.all("s").await.unwrap(), expected);
    }
    assert!(!fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .path()
        .extension()
        .is_some_and(|x| x == "corrupt")));
}

// ---------------------------------------------------------------------------
// Opening
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_second_open_of_the_same_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    first.create_new(put_with("s", "kept")).await;
    for _ in 0..2 {
        let err = FileStorage::open(dir.path()).expect_err("the directory is locked");
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
        let message = err.to_string();
        assert!(message.contains("in use"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }
    // The refused open changed nothing for the first.
    first.push("s", "still").await;
    drop(first);
    let s = open(dir.path());
    assert_eq!(s.all("s").await.unwrap(), strings(&["kept", "still"]));
}

#[test]
fn bad_data_directories_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, "not a directory").unwrap();

    let err = |path: &Path| match FileStorage::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    };
    let message = err(&file);
    assert!(message.contains("data directory"), "{message}");
    assert!(message.contains("a-file"), "{message}");
    let message = err(&file.join("below"));
    assert!(message.contains("data directory"), "{message}");

    // A LOCK that cannot be opened for writing.
    let locked = dir.path().join("lock-is-a-dir");
    fs::create_dir_all(locked.join("LOCK")).unwrap();
    let message = err(&locked);
    assert!(message.contains("lock-is-a-dir"), "{message}");

    // A segment that cannot be read.
    let unreadable = dir.path().join("segment-is-a-dir");
    fs::create_dir_all(unreadable.join(format!("{:020}.log", 1))).unwrap();
    let message = err(&unreadable);
    assert!(message.contains("recover"), "{message}");
    assert!(message.contains("segment-is-a-dir"), "{message}");

    // A directory without permissions, unless this process ignores them
    // (root does).
    use std::os::unix::fs::PermissionsExt;
    let closed = dir.path().join("no-permissions");
    fs::create_dir(&closed).unwrap();
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::File::create(closed.join("probe")).is_err() {
        let message = err(&closed);
        assert!(message.contains("no-permissions"), "{message}");
    }
    fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
}

/// A write whose caller goes away before it is answered, and that nobody
/// retries, still becomes visible to readers once it is durable: an
/// abandoned close must reach readers as EOF, not stay hidden until the next
/// write or a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_write_becomes_visible_without_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_new(put_with("s", "data")).await;

    let mut abandoned = task::spawn(
        s.0.clone()
            .oneshot(StorageRequest::Append(closing(post("s", "last")))),
    );
    let _ = abandoned.poll();
    drop(abandoned);

    let start = std::time::Instant::now();
    loop {
        let head = s.head("s").await.unwrap();
        if head.closed {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "the abandoned close is still hidden"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(s.all("s").await.unwrap(), strings(&["data", "last"]));
}

/// Damage to a segment before the snapshot point is not replayed, so the
/// frame checksums never see it; each record's own checksum, checked on
/// read, refuses to serve the damaged bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_before_the_snapshot_is_refused_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = open_fast(dir.path(), 16 * 1024);
    s.create_new(put("s")).await;
    for i in 0..40 {
        let body = format!("{i:02}{}", "x".repeat(2046));
        s.push("s", &body).await;
    }
    let snapshot = dir.path().join("snapshot.bin");
    let start = std::time::Instant::now();
    while !snapshot.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no snapshot was written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(s);

    let first = segments(dir.path()).into_iter().next().unwrap();
    zero(&first, 4096, 4096);
    let s = open(dir.path());
    assert_eq!(s.all("s").await.unwrap_err(), StreamErrorKind::Unavailable);
    // Records in other segments still read.
    let head = s.head("s").await.unwrap();
    assert_eq!(head.tail.index(), 40);
}

impl Store {
    async fn set_meta(&self, key: &str, value: Option<&'static str>) {
        let request = StorageRequest::SetMeta {
            key: key.into(),
            value: value.map(|v| Bytes::from_static(v.as_bytes())),
        };
        let answer = self.call(request).await.unwrap();
        assert!(matches!(answer, StorageResponse::MetaSet), "{answer:?}");
    }

    async fn meta(&self) -> Vec<(String, String)> {
        let request = StorageRequest::ListMeta {
            prefix: String::new(),
        };
        match self.call(request).await.unwrap() {
            StorageResponse::Meta(entries) => entries
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8(v.to_vec()).unwrap()))
                .collect(),
            other => panic!("list meta answered {other:?}"),
        }
    }
}

/// Metadata (where subscriptions keep their state and signing key) comes
/// back after a restart, whether replayed from the log or loaded from a
/// snapshot, with removals and replacements applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_survives_reopen_from_the_log_and_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.set_meta("a", Some("1")).await;
    s.set_meta("b", Some("2")).await;
    s.set_meta("a", Some("one")).await;
    s.set_meta("b", None).await;
    drop(s);
    let expected = vec![("a".to_owned(), "one".to_owned())];
    let s = open(dir.path());
    assert_eq!(s.meta().await, expected, "replayed from the log");

    drop(s);
    let s = open_fast(dir.path(), 16 * 1024);
    s.set_meta("c", Some("3")).await;
    s.create_new(put("s")).await;
    for _ in 0..20 {
        s.push("s", &"x".repeat(2048)).await;
    }
    let snapshot = dir.path().join("snapshot.bin");
    let start = std::time::Instant::now();
    while !snapshot.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no snapshot was written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s.set_meta("d", Some("after the snapshot")).await;
    drop(s);
    let s = open(dir.path());
    assert_eq!(
        s.meta().await,
        [
            ("a".to_owned(), "one".to_owned()),
            ("c".to_owned(), "3".to_owned()),
            ("d".to_owned(), "after the snapshot".to_owned()),
        ]
    );
}
