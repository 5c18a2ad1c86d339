//! A full disk refuses writes with `Full` (507 over HTTP), keeps what was
//! acknowledged readable, and corrupts nothing: the store reopens with every
//! acknowledged append.
//!
//! The test mounts a small tmpfs, so it needs root; elsewhere it says so and
//! passes without checking anything.
#![cfg(all(feature = "file", target_os = "linux"))]

use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use bytes::Bytes;
use tower::ServiceExt;
use tower_durable_streams::offset::ReadFrom;
use tower_durable_streams::storage::{
    Append, Create, FileStorage, Read, StorageRequest, StorageResponse, StreamErrorKind,
};
use tower_durable_streams::stream::{ContentType, StreamConfig};

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|out| out.status.success());
        mounted.then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn append(body: Bytes) -> StorageRequest {
    StorageRequest::Append(Append {
        path: "s".into(),
        content_type: ContentType::parse("text/plain"),
        records: Ok(vec![body]),
        close: false,
        stream_seq: None,
        producer: None,
        now: SystemTime::now(),
    })
}

async fn read_all(storage: &FileStorage) -> Vec<u8> {
    let read = Read {
        path: "s".into(),
        from: ReadFrom::Start,
        max_bytes: usize::MAX,
        subscribe: false,
        now: SystemTime::now(),
    };
    match storage.clone().oneshot(StorageRequest::Read(read)).await {
        Ok(StorageResponse::Read(result)) => result.records.concat(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_and_loses_nothing() {
    let Some(disk) = Tmpfs::mount("256k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let storage = FileStorage::open(disk.path()).unwrap();
    let create = Create {
        path: "s".into(),
        config: StreamConfig {
            content_type: ContentType::parse("text/plain"),
            ..StreamConfig::default()
        },
        body: Bytes::new(),
        now: SystemTime::now(),
    };
    storage
        .clone()
        .oneshot(StorageRequest::Create(create))
        .await
        .unwrap();

    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for i in 0..100u8 {
        let body = Bytes::from(vec![b'a' + i % 26; 8 * 1024]);
        match storage.clone().oneshot(append(body.clone())).await {
            Ok(_) => acknowledged.extend_from_slice(&body),
            Err(e) => {
                refusal = Some(e.kind().clone());
                break;
            }
        }
    }
    assert_eq!(
        refusal,
        Some(StreamErrorKind::Full),
        "the disk never filled up"
    );
    // Later writes are refused too, and reads still serve what was acknowledged.
    let again = storage
        .clone()
        .oneshot(append(Bytes::from_static(b"x")))
        .await;
    assert!(matches!(again.unwrap_err().kind(), StreamErrorKind::Full));
    assert_eq!(read_all(&storage).await, acknowledged);
    drop(storage);

    let storage = FileStorage::open(disk.path()).unwrap();
    assert_eq!(read_all(&storage).await, acknowledged);
}
