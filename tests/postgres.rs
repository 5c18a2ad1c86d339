//! `PostgresStorage` beyond the storage contract: two nodes sharing one
//! database, concurrent writers, connections killed under load, the
//! database becoming unreachable, and small rows being merged.
//!
//! Each test uses a schema of its own in the database `DS_TEST_DATABASE_URL`
//! names (by default the local one), and prints why and passes without
//! checking anything when none is reachable.

#![cfg(feature = "postgres")]

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use support::postgres::Schema;
use support::{Options, Server};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tower_durable_streams::offset::{Offset, ReadFrom};
use tower_durable_streams::storage::{
    Append, Create, PostgresStorage, Read, StorageRequest, StorageResponse, StreamErrorKind,
};
use tower_durable_streams::stream::{ContentType, StreamConfig};

const TEXT: (&str, &str) = ("content-type", "text/plain");

fn text() -> Option<ContentType> {
    ContentType::parse("text/plain")
}

async fn create(storage: &PostgresStorage, path: &str) {
    let create = Create {
        path: path.into(),
        config: StreamConfig {
            content_type: text(),
            ..StreamConfig::default()
        },
        body: Bytes::new(),
        now: SystemTime::now(),
    };
    let response = storage
        .clone()
        .oneshot(StorageRequest::Create(create))
        .await;
    assert!(matches!(response, Ok(StorageResponse::Created { .. })));
}

async fn append(
    storage: &PostgresStorage,
    path: &str,
    record: String,
) -> Result<Offset, StreamErrorKind> {
    let append = Append {
        path: path.into(),
        content_type: text(),
        records: Ok(vec![Bytes::from(record)]),
        close: false,
        stream_seq: None,
        producer: None,
        now: SystemTime::now(),
    };
    match storage
        .clone()
        .oneshot(StorageRequest::Append(append))
        .await
    {
        Ok(StorageResponse::Appended(appended)) => Ok(appended.info.tail),
        Ok(other) => panic!("append answered {other:?}"),
        Err(e) => Err(e.kind().clone()),
    }
}

fn read(path: &str, from: ReadFrom, max_bytes: usize) -> StorageRequest {
    StorageRequest::Read(Read {
        path: path.into(),
        from,
        max_bytes,
        subscribe: false,
        now: SystemTime::now(),
    })
}

/// Every record of `path`, read `max_bytes` at a time.
async fn records(storage: &PostgresStorage, path: &str, max_bytes: usize) -> Vec<String> {
    let mut all = Vec::new();
    let mut from = ReadFrom::Start;
    loop {
        let response = storage.clone().oneshot(read(path, from, max_bytes)).await;
        let Ok(StorageResponse::Read(result)) = response else {
            panic!("read answered {response:?}");
        };
        if result.records.is_empty() {
            return all;
        }
        let bytes: usize = result.records.iter().map(Bytes::len).sum();
        assert!(bytes <= max_bytes || result.records.len() == 1);
        all.extend(
            result
                .records
                .iter()
                .map(|r| String::from_utf8(r.to_vec()).expect("text records")),
        );
        from = ReadFrom::At(result.next);
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// A long-poll on node B is answered by an append on node A. B re-checks
/// only every 30 seconds, past the long-poll timeout, so only the
/// notification from A can wake it in time.
#[tokio::test]
async fn a_reader_on_one_node_is_woken_by_an_append_on_another() {
    let schema = Schema::new();
    let slow_recheck = || schema.builder().recheck_interval(Duration::from_secs(30));
    let Some(node_a) = schema.connect(slow_recheck()).await else {
        return;
    };
    let node_b = schema.connect(slow_recheck()).await.expect("second node");
    let options = Options {
        long_poll_timeout: Duration::from_secs(10),
        ..Options::default()
    };
    let a = Server::over(node_a, options.clone()).await;
    let b = Server::over(node_b, options).await;

    let created = a.put("s", &[TEXT], "").await;
    assert_eq!(created.status, StatusCode::CREATED);
    let mut offset = created.next_offset();
    let mut latencies = Vec::new();
    for i in 0..200 {
        let poll = b.spawn_get(format!("s?offset={offset}&live=long-poll"));
        // Let the long-poll reach its wait.
        tokio::time::sleep(Duration::from_millis(15)).await;
        let sent = Instant::now();
        let appended = a.post("s", &[TEXT], format!("m{i}")).await;
        assert!(appended.status.is_success(), "{appended:?}");
        let (reply, _) = poll.await.expect("the long-poll task");
        latencies.push(sent.elapsed());
        assert_eq!(reply.status, StatusCode::OK, "round {i}: {reply:?}");
        assert_eq!(reply.text(), format!("m{i}"));
        offset = reply.next_offset();
    }
    latencies.sort_unstable();
    let (p50, p99) = (percentile(&latencies, 50), percentile(&latencies, 99));
    eprintln!(
        "cross-node wake, append on A to long-poll answer on B, {} rounds: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
    );
    assert!(p99 < Duration::from_millis(500), "p99 {p99:?}");
}

/// Writers on two nodes appending to one stream, and to a stream each:
/// every acknowledged append is there once, in the order of its offset,
/// and the rate is printed. On one stream the nodes race, and each append
/// that lost decides again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_each_stored_once() {
    let schema = Schema::new();
    let Some(storage) = schema.connect(schema.builder().pool_size(16)).await else {
        return;
    };
    let other_node = schema
        .connect(schema.builder().pool_size(16))
        .await
        .expect("second node");
    for shared in [true, false] {
        let writers = 16;
        let paths: Vec<String> = (0..writers)
            .map(|w| {
                if shared {
                    "one".into()
                } else {
                    format!("own{w}")
                }
            })
            .collect();
        for path in paths.iter().collect::<HashSet<_>>() {
            create(&storage, path).await;
        }
        let started = Instant::now();
        let run_for = Duration::from_secs(2);
        // An append refused as Unavailable ("too many concurrent writers,
        // retry later", or no connection in time) was not acknowledged: a
        // client retries it. Each writer goes on with a new record, so a
        // refused one is told apart from the acknowledged ones.
        type Outcome = (Vec<(Offset, String)>, Vec<String>);
        let tasks: Vec<JoinHandle<Outcome>> = (0..writers)
            .map(|w| {
                let storage = if w % 2 == 0 { &storage } else { &other_node }.clone();
                let path = paths[w].clone();
                tokio::spawn(async move {
                    let (mut acked, mut refused) = (Vec::new(), Vec::new());
                    let mut i = 0;
                    while started.elapsed() < run_for {
                        let record = format!("w{w}-{i}");
                        match append(&storage, &path, record.clone()).await {
                            Ok(tail) => acked.push((tail, record)),
                            Err(StreamErrorKind::Unavailable) => {
                                refused.push(record);
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(e) => panic!("append: {e:?}"),
                        }
                        i += 1;
                    }
                    (acked, refused)
                })
            })
            .collect();
        let (mut acked, mut refused) = (Vec::new(), HashSet::new());
        for task in tasks {
            let (mine, not) = task.await.expect("writer");
            acked.extend(mine);
            refused.extend(not);
        }
        let elapsed = started.elapsed();
        eprintln!(
            "{} writers on two nodes, {}: {} appends in {:.2} s = {:.0} appends/s, {} refused",
            writers,
            if shared {
                "one stream"
            } else {
                "a stream each"
            },
            acked.len(),
            elapsed.as_secs_f64(),
            acked.len() as f64 / elapsed.as_secs_f64(),
            refused.len()
        );
        for path in paths.iter().collect::<HashSet<_>>() {
            // A refused append is stored at most once, if its commit
            // landed but its answer did not; nothing else is stored but
            // what was acknowledged.
            let mut stored = records(&storage, path, 64 * 1024).await;
            let before = stored.len();
            stored.retain(|r| !refused.contains(r.as_str()));
            let unique: HashSet<&String> = stored.iter().collect();
            assert_eq!(unique.len(), stored.len(), "{path}: a record stored twice");
            assert!(before - stored.len() <= refused.len());
            let mut mine: Vec<&(Offset, String)> = acked
                .iter()
                .filter(|(_, r)| {
                    paths[r[1..].split('-').next().unwrap().parse::<usize>().unwrap()] == *path
                })
                .collect();
            mine.sort_unstable();
            let expected: Vec<&str> = mine.iter().map(|(_, r)| r.as_str()).collect();
            assert_eq!(stored, expected, "{path}: stored in offset order");
        }
    }
}

/// Backends killed while writers append: failures are `Unavailable`, the
/// storage reconnects, and every acknowledged append is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_lose_no_acknowledged_append() {
    let schema = Schema::new();
    let Some(storage) = schema.storage().await else {
        return;
    };
    let listener = schema
        .connect(schema.builder().recheck_interval(Duration::from_secs(30)))
        .await
        .expect("second node");
    create(&storage, "s").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<JoinHandle<(Vec<String>, usize)>> = (0..8)
        .map(|w| {
            let storage = storage.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut acked, mut failed) = (Vec::new(), 0);
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let record = format!("w{w}-{i}");
                    match append(&storage, "s", record.clone()).await {
                        Ok(_) => acked.push(record),
                        Err(StreamErrorKind::Unavailable) => failed += 1,
                        Err(other) => panic!("append failed with {other:?}"),
                    }
                    i += 1;
                }
                (acked, failed)
            })
        })
        .collect();
    let kill = format!(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE application_name = 'durable-streams/{}'",
        schema.name
    );
    let mut killed = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        killed += schema.query_i64(&kill).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut acked, mut failed) = (Vec::new(), 0);
    for writer in writers {
        let (a, f) = writer.await.expect("writer");
        acked.extend(a);
        failed += f;
    }
    eprintln!(
        "{killed} backends killed; {} appends acknowledged, {failed} refused as unavailable",
        acked.len()
    );
    assert!(killed > 0);

    let stored = records(&storage, "s", 1 << 20).await;
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an append stored twice");
    for record in &acked {
        assert!(unique.contains(record), "acknowledged {record} lost");
    }

    // The other node's listener reconnected: an append here wakes it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let response = listener
        .clone()
        .oneshot(StorageRequest::Read(Read {
            subscribe: true,
            ..match read("s", ReadFrom::Now, 1) {
                StorageRequest::Read(r) => r,
                _ => unreachable!(),
            }
        }))
        .await;
    let Ok(StorageResponse::Read(at_tail)) = response else {
        panic!("read answered {response:?}");
    };
    let wait = at_tail.wait.expect("a wait at the tail");
    append(&storage, "s", "after".into())
        .await
        .expect("append after the kills");
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("the other node is woken");
}

/// A TCP proxy in front of PostgreSQL that can be cut off.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let up = Arc::new(AtomicBool::new(true));
        let links = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (up, links) = (up.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue;
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().unwrap().push(link);
                }
            })
        };
        Self {
            addr,
            up,
            links,
            _accept: accept,
        }
    }

    /// Closes every connection and refuses new ones.
    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// With the database cut off, requests get 503 with a clear message and
/// nothing is written; once it is back, the same server serves again.
#[tokio::test]
async fn an_unreachable_database_gives_503_and_recovers() {
    let schema = Schema::new();
    // Make sure the tables exist, and find the real server.
    if schema.storage().await.is_none() {
        return;
    }
    let config = tokio_postgres::Config::from_str(&schema.url).expect("a database URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve the database host")
        .next()
        .expect("an address");
    let proxy = Proxy::start(upstream).await;
    let via_proxy = format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or("postgres"),
        proxy.addr,
        config.get_dbname().unwrap_or("postgres"),
    );
    let storage = PostgresStorage::builder(via_proxy)
        .schema(&schema.name)
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("storage through the proxy");
    let server = Server::over(storage, Options::default()).await;
    assert_eq!(
        server.put("s", &[TEXT], "a").await.status,
        StatusCode::CREATED
    );

    proxy.down();
    for _ in 0..3 {
        let refused = server.post("s", &[TEXT], "b").await;
        assert_eq!(
            refused.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{refused:?}"
        );
        assert!(
            refused.text().contains("database unavailable"),
            "{refused:?}"
        );
    }
    let read = server.get("s?offset=-1").await;
    assert_eq!(read.status, StatusCode::SERVICE_UNAVAILABLE);

    proxy.up();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = server.post("s", &[TEXT], "c").await.status;
        if status.is_success() {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read = server.get("s?offset=-1").await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.text(), "ac");
}

/// A thousand small appends end up in a few rows, and reads still return
/// whole records within their byte limit.
#[tokio::test]
async fn small_appends_are_merged_into_few_rows() {
    let schema = Schema::new();
    let Some(storage) = schema.storage().await else {
        return;
    };
    create(&storage, "s").await;
    let mut expected = Vec::new();
    for i in 0..1000 {
        let record = format!("r{i:04}");
        append(&storage, "s", record.clone()).await.expect("append");
        expected.push(record);
    }
    let rows = "SELECT count(*) FROM ds_chunks";
    let deadline = Instant::now() + Duration::from_secs(15);
    while schema.query_i64(rows).await > 4 {
        assert!(Instant::now() < deadline, "rows were not merged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "1000 appends of 5 bytes: {} rows",
        schema.query_i64(rows).await
    );
    for max_bytes in [0, 7, 12, 4096] {
        assert_eq!(
            records(&storage, "s", max_bytes).await,
            expected,
            "{max_bytes}"
        );
    }
    // A read from inside a merged row starts exactly there.
    let response = storage
        .clone()
        .oneshot(read("s", ReadFrom::At(Offset::new(500, 2500).unwrap()), 10))
        .await;
    let Ok(StorageResponse::Read(result)) = response else {
        panic!("read answered {response:?}");
    };
    assert_eq!(result.records, [Bytes::from("r0500"), Bytes::from("r0501")]);
    let response = storage
        .clone()
        .oneshot(read("s", ReadFrom::At(Offset::new(500, 2501).unwrap()), 10))
        .await;
    assert_eq!(response.unwrap_err().kind(), &StreamErrorKind::Invalid);
}

/// Text PostgreSQL cannot store is refused as invalid, not as a failure.
#[tokio::test]
async fn paths_the_database_cannot_store_are_invalid() {
    let schema = Schema::new();
    let Some(storage) = schema.storage().await else {
        return;
    };
    // Hex digits of a simple generator: long, and not compressible.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let long: String = (0..12_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).expect("a hex digit")
        })
        .collect();
    for path in ["nul\0inside".to_owned(), long] {
        let create = Create {
            path: path.clone(),
            config: StreamConfig {
                content_type: text(),
                ..StreamConfig::default()
            },
            body: Bytes::new(),
            now: SystemTime::now(),
        };
        let refused = storage
            .clone()
            .oneshot(StorageRequest::Create(create))
            .await
            .expect_err("refused");
        assert_eq!(refused.kind(), &StreamErrorKind::Invalid, "{refused}");
        let read = storage
            .clone()
            .oneshot(read(&path, ReadFrom::Start, 10))
            .await;
        assert!(
            matches!(
                read.as_ref().map_err(|e| e.kind()),
                Err(StreamErrorKind::Invalid | StreamErrorKind::NotFound)
            ),
            "{read:?}"
        );
    }
}

/// Two `durable-streams serve --storage postgres` processes on one schema:
/// a long-poll on B is answered by an append on A though B re-checks only
/// every 30 seconds, past the long-poll timeout.
#[cfg(feature = "server")]
#[tokio::test]
async fn two_server_processes_share_streams_and_wake_each_other() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use std::process::{Child, Command, Stdio};

    struct Running(Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let schema = Schema::new();
    if schema.storage().await.is_none() {
        return;
    }
    let start = |port: u16| {
        Running(
            Command::new(env!("CARGO_BIN_EXE_durable-streams"))
                .args([
                    "serve",
                    "--storage",
                    "postgres",
                    "--long-poll-timeout",
                    "10s",
                ])
                .args([
                    "--database-url",
                    &schema.url,
                    "--database-schema",
                    &schema.name,
                ])
                .args(["--addr", &format!("127.0.0.1:{port}")])
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the server binary"),
        )
    };
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let (port_a, port_b) = (free_port(), free_port());
    let _a = start(port_a);
    let _b = start(port_b);
    for port in [port_a, port_b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "server on {port} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |method: &str, port: u16, query: &str, body: &'static str| {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{port}/v1/stream/shared{query}"))
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("a request");
        let client = client.clone();
        async move {
            let response = client.request(request).await.expect("a response");
            let status = response.status();
            let next = response
                .headers()
                .get("stream-next-offset")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response
                .into_body()
                .collect()
                .await
                .expect("a body")
                .to_bytes();
            (status, next, body)
        }
    };

    let (status, next, _) = send("PUT", port_a, "", "").await;
    assert_eq!(status, StatusCode::CREATED);
    let mut offset = next.expect("an offset");
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let poll = tokio::spawn(send(
            "GET",
            port_b,
            &format!("?offset={offset}&live=long-poll"),
            "",
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = Instant::now();
        let (status, _, _) = send("POST", port_a, "", "hello").await;
        assert!(status.is_success());
        let (status, next, body) = poll.await.expect("the long-poll");
        latencies.push(sent.elapsed());
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
        offset = next.expect("an offset");
    }
    latencies.sort_unstable();
    let max = latencies[latencies.len() - 1];
    eprintln!(
        "two processes: append on A to long-poll answer on B, p50 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 50).as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    assert!(max < Duration::from_millis(500), "{latencies:?}");
}

/// Reads renew a sliding TTL in memory, written once a second: another
/// node, which sees only the database, finds the stream alive long past
/// its TTL as long as the first keeps reading it.
#[tokio::test]
async fn ttl_renewals_by_reads_reach_other_nodes() {
    let schema = Schema::new();
    let Some(reader) = schema.storage().await else {
        return;
    };
    let other = schema.storage().await.expect("second node");
    let create = Create {
        path: "ttl".into(),
        config: StreamConfig {
            content_type: text(),
            expiry: tower_durable_streams::stream::Expiry::Ttl(2),
            ..StreamConfig::default()
        },
        body: Bytes::from_static(b"x"),
        now: SystemTime::now(),
    };
    reader
        .clone()
        .oneshot(StorageRequest::Create(create))
        .await
        .expect("created");
    let head = |storage: &PostgresStorage| {
        storage
            .clone()
            .oneshot(StorageRequest::Head { path: "ttl".into() })
    };
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let read = reader
            .clone()
            .oneshot(read("ttl", ReadFrom::Start, 10))
            .await;
        assert!(read.is_ok(), "{read:?}");
    }
    // Four seconds after creation, twice the TTL.
    assert!(head(&other).await.is_ok(), "the other node saw no renewal");
    // Unread for longer than the TTL, it is gone everywhere.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let gone = head(&other).await.expect_err("expired");
    assert_eq!(gone.kind(), &StreamErrorKind::NotFound);
}

/// Start-up migrates once; a schema newer than the code is refused.
#[tokio::test]
async fn the_schema_is_versioned() {
    let schema = Schema::new();
    let Some(first) = schema.storage().await else {
        return;
    };
    create(&first, "kept").await;
    let version = "SELECT version::bigint FROM ds_schema_version";
    assert_eq!(schema.query_i64(version).await, 1);
    // Starting again finds the tables as they are.
    let again = schema.storage().await.expect("second start");
    let head = again
        .clone()
        .oneshot(StorageRequest::Head {
            path: "kept".into(),
        })
        .await;
    assert!(head.is_ok(), "{head:?}");
    assert_eq!(schema.query_i64(version).await, 1);

    schema
        .execute(&format!(
            "UPDATE \"{}\".ds_schema_version SET version = 99",
            schema.name
        ))
        .await
        .expect("bump the version");
    let refused = schema
        .builder()
        .connect()
        .await
        .expect_err("a newer schema is refused");
    assert_eq!(refused.kind(), &StreamErrorKind::Unavailable);
    assert!(refused.to_string().contains("version 99"), "{refused}");
}
