//! File storage gives the space of deleted and expired streams back, and a
//! snapshot plus the log after it recovers the same state.
#![cfg(feature = "file")]

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tower::ServiceExt;
use tower_durable_streams::offset::ReadFrom;
use tower_durable_streams::storage::{
    Append, Create, FileStorage, Read, StorageRequest, StorageResponse,
};
use tower_durable_streams::stream::{ContentType, Expiry, StreamConfig};

fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

async fn call(storage: &FileStorage, request: StorageRequest) -> StorageResponse {
    storage
        .clone()
        .oneshot(request)
        .await
        .expect("request succeeds")
}

async fn create(storage: &FileStorage, path: &str, expiry: Expiry) {
    let config = StreamConfig {
        content_type: ContentType::parse("text/plain"),
        expiry,
        ..StreamConfig::default()
    };
    let create = Create {
        path: path.into(),
        config,
        body: Bytes::new(),
        now: SystemTime::now(),
    };
    call(storage, StorageRequest::Create(create)).await;
}

async fn append(storage: &FileStorage, path: &str, body: Bytes) {
    let append = Append {
        path: path.into(),
        content_type: ContentType::parse("text/plain"),
        records: Ok(vec![body]),
        close: false,
        stream_seq: None,
        producer: None,
        now: SystemTime::now(),
    };
    call(storage, StorageRequest::Append(append)).await;
}

async fn read_all(storage: &FileStorage, path: &str) -> Vec<u8> {
    let read = Read {
        path: path.into(),
        from: ReadFrom::Start,
        max_bytes: usize::MAX,
        subscribe: false,
        now: SystemTime::now(),
    };
    match call(storage, StorageRequest::Read(read)).await {
        StorageResponse::Read(result) => result.records.concat(),
        other => panic!("{other:?}"),
    }
}

/// Waits until `done` holds, checking every 100 ms for up to `limit`.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_and_expired_streams_give_their_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::builder()
        .segment_size(64 * 1024)
        .open(dir.path())
        .unwrap();
    create(&storage, "keep", Expiry::Never).await;
    create(&storage, "gone", Expiry::Never).await;
    create(&storage, "brief", Expiry::Ttl(1)).await;
    let chunk = Bytes::from(vec![b'x'; 8 * 1024]);
    for _ in 0..64 {
        append(&storage, "gone", chunk.clone()).await;
        append(&storage, "brief", chunk.clone()).await;
    }
    // The kept stream's data sits in the last segments only.
    append(&storage, "keep", Bytes::from_static(b"kept")).await;
    let before = log_bytes(dir.path());
    assert!(before > 1024 * 1024, "{before} bytes of log");

    call(
        &storage,
        StorageRequest::Delete {
            path: "gone".into(),
        },
    )
    .await;
    // "brief" expires after a second without reads or writes; nobody reads
    // it again, so only the maintenance sweep can delete it.
    let reclaimed = eventually(Duration::from_secs(15), || {
        log_bytes(dir.path()) < 256 * 1024
    })
    .await;
    assert!(reclaimed, "log still holds {} bytes", log_bytes(dir.path()));

    assert_eq!(read_all(&storage, "keep").await, b"kept");
    drop(storage);

    // The snapshot and the log after it bring back exactly what is left.
    let storage = FileStorage::open(dir.path()).unwrap();
    assert_eq!(read_all(&storage, "keep").await, b"kept");
    for path in ["gone", "brief"] {
        let head = storage
            .clone()
            .oneshot(StorageRequest::Head { path: path.into() })
            .await;
        assert!(head.unwrap_err().is_not_found(), "{path} came back");
    }
    append(&storage, "keep", Bytes::from_static(b" again")).await;
    drop(storage);
    let storage = FileStorage::open(dir.path()).unwrap();
    assert_eq!(read_all(&storage, "keep").await, b"kept again");
}
