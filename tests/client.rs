//! The client against this crate's server (in process), against the real
//! binary across a SIGKILL and restart, and against scripted responses for
//! the traps real clients fell into (case C36).

#![cfg(feature = "client")]

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::{Options, Server, PREFIX};
use tokio::net::TcpListener;
use tower_durable_streams::client::{
    Backoff, Chunk, Client, CreateOptions, ErrorKind, Live, ProducerOptions, ReadOptions,
};

const PATIENCE: Duration = Duration::from_secs(20);

fn client(addr: SocketAddr) -> Client {
    Client::builder(format!("http://{addr}{PREFIX}"))
        .backoff(
            Backoff::new()
                .initial(Duration::from_millis(20))
                .max(Duration::from_millis(200)),
        )
        .build()
        .expect("a client")
}

async fn fast_server() -> Server {
    Server::with(Options {
        long_poll_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await
}

/// Every chunk of a reader until it ends, or panics after the patience.
async fn collect(mut reader: tower_durable_streams::client::Reader) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Ok(Some(Ok(chunk))) => chunks.push(chunk),
            Ok(Some(Err(e))) => panic!("read failed: {e}"),
            Ok(None) => return chunks,
            Err(_) => panic!("the reader did not end; so far {chunks:?}"),
        }
    }
}

fn text(chunks: &[Chunk]) -> String {
    chunks
        .iter()
        .map(|c| String::from_utf8(c.data.to_vec()).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// Stream operations
// ---------------------------------------------------------------------------

#[tokio::test]
async fn create_append_head_close_delete() {
    let server = Server::start().await;
    let client = client(server.addr());
    let s = client.stream("ops/a");
    let created = s
        .create(
            CreateOptions::new()
                .content_type("text/plain")
                .ttl(3600)
                .body("hello "),
        )
        .await
        .unwrap();
    assert!(created.created);
    let again = s
        .create(
            CreateOptions::new()
                .content_type("text/plain")
                .ttl(3600)
                .body("hello "),
        )
        .await
        .unwrap();
    assert!(!again.created, "an identical PUT is 200");
    let other = s
        .create(CreateOptions::new().content_type("application/json"))
        .await;
    assert_eq!(other.unwrap_err().kind(), &ErrorKind::Conflict);

    let appended = s.append("world").await.unwrap();
    assert!(appended.next_offset > created.next_offset);
    let head = s.head().await.unwrap();
    assert_eq!(head.next_offset, appended.next_offset);
    assert_eq!(head.ttl, Some(3600));
    assert!(!head.closed);
    let wrong = s.append_with("application/json", "{}").await.unwrap_err();
    assert_eq!(wrong.kind(), &ErrorKind::Conflict);

    let closed = s.close_with("text/plain", "!").await.unwrap();
    assert!(closed.closed);
    let refused = s.append("more").await.unwrap_err();
    assert!(refused.is_closed(), "{refused}");
    assert!(s.close().await.unwrap().closed, "closing again is fine");
    assert_eq!(
        text(&collect(s.read(ReadOptions::new())).await),
        "hello world!"
    );

    s.delete().await.unwrap();
    let gone = s.head().await.unwrap_err();
    assert!(gone.is_not_found());
    assert_eq!(gone.status(), Some(StatusCode::NOT_FOUND));
    assert!(client
        .stream("ops/none")
        .append("x")
        .await
        .unwrap_err()
        .is_not_found());
}

#[tokio::test]
async fn forks_read_their_source_up_to_the_fork_point() {
    let server = Server::start().await;
    let client = client(server.addr());
    let source = client.stream("fork/src");
    source
        .create(CreateOptions::new().content_type("text/plain").body("abc"))
        .await
        .unwrap();
    let at = source.append("def").await.unwrap().next_offset;
    source.append("ghi").await.unwrap();
    let fork = client.stream("fork/f");
    let path = format!("{PREFIX}/fork/src");
    fork.create(CreateOptions::new().fork(path, Some(at), 1))
        .await
        .unwrap();
    fork.append("X").await.unwrap();
    assert_eq!(
        text(&collect(fork.read(ReadOptions::new())).await),
        "abcdefgX"
    );
}

// ---------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn catch_up_ends_up_to_date_and_resumes_from_a_saved_offset() {
    let server = Server::start().await;
    let client = client(server.addr());
    let s = client.stream("read/a");
    s.create(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    let empty = collect(s.read(ReadOptions::new())).await;
    assert_eq!(empty.len(), 1, "one empty chunk that says it caught up");
    assert!(empty[0].up_to_date && empty[0].is_empty());

    s.append("one ").await.unwrap();
    let first = collect(s.read(ReadOptions::new())).await;
    let saved = first.last().unwrap().next_offset.clone();
    s.append("two").await.unwrap();
    let rest = collect(s.read(ReadOptions::new().offset(saved))).await;
    assert_eq!(text(&rest), "two");
    let now = collect(s.read(ReadOptions::new().offset("now"))).await;
    assert!(now.iter().all(Chunk::is_empty));
}

#[tokio::test]
async fn every_live_mode_follows_appends_and_ends_at_closure() {
    let server = fast_server().await;
    let client = client(server.addr());
    for (n, live) in [Live::LongPoll, Live::Sse, Live::Auto]
        .into_iter()
        .enumerate()
    {
        for content_type in ["text/plain", "application/octet-stream"] {
            let s = client.stream(&format!("live/{n}/{}", content_type.replace('/', "-")));
            s.create(CreateOptions::new().content_type(content_type).body("a"))
                .await
                .unwrap();
            let reader = s.read(ReadOptions::new().live(live));
            let writer = {
                let s = s.clone();
                tokio::spawn(async move {
                    for piece in ["b", "c", "d"] {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        s.append(piece).await.unwrap();
                    }
                    s.close_with(content_type, "e").await.unwrap();
                })
            };
            let chunks = collect(reader).await;
            writer.await.unwrap();
            assert_eq!(text(&chunks), "abcde", "{live:?} {content_type}");
            let last = chunks.last().unwrap();
            assert!(last.closed && last.up_to_date, "{live:?} ends at closure");
            let tail = s.head().await.unwrap().next_offset;
            assert_eq!(last.next_offset, tail);
        }
    }
}

#[tokio::test]
async fn json_streams_yield_typed_messages_in_every_mode() {
    let server = fast_server().await;
    let client = client(server.addr());
    for (n, live) in [Live::Off, Live::LongPoll, Live::Sse]
        .into_iter()
        .enumerate()
    {
        let s = client.stream(&format!("json/{n}"));
        s.create(
            CreateOptions::new()
                .content_type("application/json")
                .body(r#"[{"n":1},{"n":2}]"#),
        )
        .await
        .unwrap();
        s.append(r#"{"n":3}"#).await.unwrap();
        if live != Live::Off {
            s.close().await.unwrap();
        }
        let mut messages = Vec::new();
        for chunk in collect(s.read(ReadOptions::new().live(live))).await {
            messages.extend(chunk.json::<Value>().unwrap());
        }
        assert_eq!(
            messages,
            [json!({"n":1}), json!({"n":2}), json!({"n":3})],
            "{live:?}"
        );
    }
}

/// A reader and an idempotent producer on the real binary, across a
/// SIGKILL and restart of the server on the same port and data: the reader
/// sees every message once, in order, and the producer's retries are
/// deduplicated.
#[cfg(feature = "server")]
#[tokio::test]
async fn a_reader_and_a_producer_cross_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let mut server = binary::start(addr, dir.path());
    let client = Client::builder(format!("http://{addr}{PREFIX}"))
        .backoff(
            Backoff::new()
                .initial(Duration::from_millis(20))
                .max(Duration::from_millis(200))
                .retries(Some(200)),
        )
        .build()
        .unwrap();
    let s = client.stream("restart/a");
    s.create(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    let reader = s.read(ReadOptions::new().live(Live::Auto));
    let producer = s.idempotent_producer(
        "writer-1",
        0,
        ProducerOptions::new()
            .content_type("text/plain")
            .linger(Duration::from_millis(1)),
    );
    let mut expected = String::new();
    for i in 0..60 {
        let line = format!("{i};");
        expected.push_str(&line);
        let ack = producer.append(line).await.unwrap();
        if i % 20 == 10 {
            // SIGKILL the server while this append may be in flight.
            drop(server);
            server = binary::start(addr, dir.path());
        }
        if i % 5 == 0 {
            ack.await.unwrap();
        }
    }
    producer.close(None).await.unwrap();
    let chunks = collect(reader).await;
    assert_eq!(text(&chunks), expected);
    assert!(chunks.last().unwrap().closed);
    drop(server);
}

#[cfg(feature = "server")]
mod binary {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// The server process, SIGKILLed and reaped when dropped.
    pub struct Running(Child);

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    pub fn start(addr: SocketAddr, data: &Path) -> Running {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut child = Command::new(env!("CARGO_BIN_EXE_durable-streams"))
            .args(["serve", "--storage", "file", "--long-poll-timeout", "300ms"])
            .arg("--data-dir")
            .arg(data)
            .arg("--addr")
            .arg(addr.to_string())
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the server binary");
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the server did not start");
            if let Ok(Some(status)) = child.try_wait() {
                let _ = child.wait();
                // The port may still be held by the old process: try again.
                assert!(Instant::now() < deadline, "the server exited: {status}");
                std::thread::sleep(Duration::from_millis(50));
                return start(addr, data);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Running(child)
    }
}

// ---------------------------------------------------------------------------
// Producers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn producers_batch_in_order_and_json_appends_are_one_message_each() {
    let server = Server::start().await;
    let client = client(server.addr());
    let s = client.stream("produce/json");
    s.create(CreateOptions::new().content_type("application/json"))
        .await
        .unwrap();
    let producer = s.producer(ProducerOptions::new().linger(Duration::from_millis(20)));
    let mut acks = Vec::new();
    for n in 0..200 {
        acks.push(producer.append_json(&json!({ "n": n })).await.unwrap());
    }
    // An array is one message too, not flattened into several.
    producer.append_json(&json!([1, 2])).await.unwrap();
    producer.flush().await.unwrap();
    let offsets: Vec<String> = futures_util::future::join_all(acks)
        .await
        .into_iter()
        .map(|a| a.unwrap().next_offset)
        .collect();
    let distinct: std::collections::BTreeSet<_> = offsets.iter().collect();
    assert!(
        distinct.len() < 50,
        "200 appends went in {} batches",
        distinct.len()
    );
    assert!(
        offsets.windows(2).all(|w| w[0] <= w[1]),
        "acks come in order"
    );
    let mut messages = Vec::new();
    for chunk in collect(s.read(ReadOptions::new())).await {
        messages.extend(chunk.json::<Value>().unwrap());
    }
    assert_eq!(messages.len(), 201);
    assert!(messages[..200].iter().enumerate().all(|(i, m)| m["n"] == i));
    assert_eq!(messages[200], json!([1, 2]));
}

#[tokio::test]
async fn an_idempotent_producer_claims_with_auto_claim_and_closes_once() {
    let server = Server::start().await;
    let client = client(server.addr());
    let s = client.stream("produce/idem");
    s.create(CreateOptions::new().content_type("text/plain"))
        .await
        .unwrap();
    // Another process owns the id at epoch 4.
    let owner = [
        ("content-type", "text/plain"),
        ("producer-id", "p"),
        ("producer-epoch", "4"),
        ("producer-seq", "0"),
    ];
    let reply = server.post("produce/idem", &owner, "old;").await;
    assert_eq!(reply.status, StatusCode::OK);

    let fenced = s.idempotent_producer("p", 0, ProducerOptions::new());
    let failed = fenced.append("zombie;").await.unwrap().await.unwrap_err();
    assert_eq!(failed.kind(), &ErrorKind::StaleEpoch { current: 4 });
    assert!(
        fenced.flush().await.is_err(),
        "a failed producer stays failed"
    );

    let claimer = s.idempotent_producer("p", 0, ProducerOptions::new().auto_claim(true));
    claimer.append("new;").await.unwrap().await.unwrap();
    let closed = claimer
        .close(Some(Bytes::from_static(b"last")))
        .await
        .unwrap();
    assert!(closed.closed);
    assert_eq!(
        text(&collect(s.read(ReadOptions::new())).await),
        "old;new;last"
    );
    let head = server.head("produce/idem").await;
    assert_eq!(head.header("stream-closed"), Some("true"));
}

// ---------------------------------------------------------------------------
// Scripted responses (C36)
// ---------------------------------------------------------------------------

/// A server that answers each request with the next scripted response and
/// records what was asked.
struct Script {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

type Canned = (u16, Vec<(&'static str, &'static str)>, &'static str);

impl Script {
    async fn start(responses: Vec<Canned>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let queue = Arc::new(Mutex::new(VecDeque::from(responses)));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let queue = queue.clone();
                let seen = seen.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    seen.lock()
                        .unwrap()
                        .push(format!("{} {}", request.method(), request.uri()));
                    let next = queue.lock().unwrap().pop_front();
                    async move {
                        let (status, headers, body) =
                            next.unwrap_or((503, vec![("retry-after", "60")], ""));
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        for (name, value) in headers {
                            response.headers_mut().insert(name, value.parse().unwrap());
                        }
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self { addr, requests }
    }

    fn client(&self) -> Client {
        client(self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

const SSE: (&str, &str) = ("content-type", "text/event-stream");

/// Reads until `n` chunks arrived, or panics.
async fn take(reader: &mut tower_durable_streams::client::Reader, n: usize) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    while chunks.len() < n {
        let next = tokio::time::timeout(PATIENCE, reader.next()).await;
        chunks.push(
            next.expect("a chunk in time")
                .expect("more chunks")
                .expect("no error"),
        );
    }
    chunks
}

#[tokio::test]
async fn c36_two_data_events_before_one_control_are_both_delivered_then_it_reconnects() {
    let script = Script::start(vec![
        (
            200,
            vec![
                ("content-type", "application/json"),
                ("stream-next-offset", "0"),
                ("stream-up-to-date", "true"),
            ],
            "[]",
        ),
        (
            200,
            vec![SSE],
            "event: data\ndata: [{\"id\":1}]\n\nevent: data\ndata: [{\"id\":2}]\n\n\
             event: control\ndata: {\"streamNextOffset\":\"100\",\"streamCursor\":\"7\",\"upToDate\":true}\n\n",
        ),
        (
            200,
            vec![SSE],
            "event: control\ndata: {\"streamNextOffset\":\"100\",\"streamClosed\":true}\n\n",
        ),
    ])
    .await;
    let s = script.client().stream("s");
    let chunks = collect(s.read(ReadOptions::new().live(Live::Auto))).await;
    let messages: Vec<Value> = chunks
        .iter()
        .flat_map(|c| c.json::<Value>().unwrap())
        .collect();
    assert_eq!(messages, [json!({"id":1}), json!({"id":2})]);
    assert!(chunks.last().unwrap().closed);
    let requests = script.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(
        requests[2].contains("offset=100") && requests[2].contains("cursor=7"),
        "{requests:?}"
    );
}

#[tokio::test]
async fn c36_an_empty_sse_batch_does_not_stall_the_reader() {
    let script = Script::start(vec![
        (
            200,
            vec![
                ("content-type", "application/json"),
                ("stream-next-offset", "0"),
                ("stream-up-to-date", "true"),
            ],
            "[]",
        ),
        (
            200,
            vec![SSE],
            "event: data\ndata: []\n\nevent: control\ndata: {\"streamNextOffset\":\"100\",\"upToDate\":false}\n\n\
             event: data\ndata: [{\"id\":1}]\n\nevent: control\ndata: {\"streamNextOffset\":\"200\",\"upToDate\":true}\n\n",
        ),
    ])
    .await;
    let mut reader = script
        .client()
        .stream("s")
        .read(ReadOptions::new().live(Live::Auto));
    // The catch-up's empty "up to date", then the message, with no more
    // data needed to get it out.
    let chunks = take(&mut reader, 2).await;
    assert_eq!(chunks[1].json::<Value>().unwrap(), [json!({"id":1})]);
    assert_eq!(chunks[1].next_offset, "200");
}

#[tokio::test]
async fn c36_sse_lines_lose_exactly_one_space_and_any_line_ending_works() {
    let script = Script::start(vec![
        (
            200,
            vec![("content-type", "text/plain"), ("stream-next-offset", "0")],
            "",
        ),
        (
            200,
            vec![SSE],
            "event: data\r\ndata:  two\rdata: a\u{2028}b\n\r\nevent:  data\ndata: not data\n\n\
             event: control\r\ndata: {\"streamNextOffset\":\"5\",\"streamClosed\":true}\r\n\r\n",
        ),
    ])
    .await;
    let chunks = collect(
        script
            .client()
            .stream("s")
            .read(ReadOptions::new().live(Live::Sse)),
    )
    .await;
    assert_eq!(text(&chunks), " two\na\u{2028}b");
    assert!(chunks.last().unwrap().closed);
}

#[tokio::test]
async fn c36_head_404_with_a_json_type_and_no_body_is_not_found_once() {
    let script = Script::start(vec![(404, vec![("content-type", "application/json")], "")]).await;
    let error = script.client().stream("s").head().await.unwrap_err();
    assert!(error.is_not_found(), "{error}");
    assert_eq!(script.requests().len(), 1, "no retries");
}

#[tokio::test]
async fn c36_closure_without_a_cursor_ends_without_reconnecting() {
    let script = Script::start(vec![(
        204,
        vec![
            ("stream-next-offset", "300"),
            ("stream-up-to-date", "true"),
            ("stream-closed", "true"),
        ],
        "",
    )])
    .await;
    let chunks = collect(
        script
            .client()
            .stream("s")
            .read(ReadOptions::new().live(Live::LongPoll)),
    )
    .await;
    assert_eq!(chunks.len(), 1);
    assert!(chunks[0].closed && chunks[0].cursor.is_none());
    assert_eq!(chunks[0].next_offset, "300");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(script.requests().len(), 1);
}

#[tokio::test]
async fn readers_retry_5xx_and_honour_retry_after() {
    let script = Script::start(vec![
        (503, vec![], "busy"),
        (429, vec![("retry-after", "1")], ""),
        (
            200,
            vec![
                ("content-type", "text/plain"),
                ("stream-next-offset", "9"),
                ("stream-up-to-date", "true"),
            ],
            "payload",
        ),
    ])
    .await;
    let started = tokio::time::Instant::now();
    let chunks = collect(script.client().stream("s").read(ReadOptions::new())).await;
    assert_eq!(text(&chunks), "payload");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After was honoured"
    );
    assert_eq!(script.requests().len(), 3);
    // A 4xx is final.
    let script = Script::start(vec![(400, vec![], "bad offset")]).await;
    let mut reader = script
        .client()
        .stream("s")
        .read(ReadOptions::new().live(Live::LongPoll));
    let error = reader.next().await.unwrap().unwrap_err();
    assert_eq!(error.kind(), &ErrorKind::BadRequest);
    assert!(reader.next().await.is_none());
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

#[cfg(feature = "server")]
#[tokio::test]
async fn cli_commands_drive_a_stream_end_to_end() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    let server = Server::start().await;
    let url = format!("http://{}{PREFIX}/cli/s", server.addr());
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_durable-streams"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the binary");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    tokio::task::spawn_blocking(move || {
        let url = url.as_str();
        let created = run(
            &["create", url, "--content-type", "text/plain", "--data", "a"],
            "",
        );
        assert!(created.0 && created.1.starts_with("created"), "{created:?}");
        assert!(run(&["append", url, "b", "c"], "").0);
        assert!(run(&["append", url], "d\ne\n").0);
        let read = run(&["read", url], "");
        assert_eq!(read.1, "abcd\ne\n");
        assert!(read.2.contains("next offset"), "{read:?}");
        let head = run(&["head", url], "");
        assert!(head.1.contains("content type: text/plain") && head.1.contains("closed: false"));
        assert!(run(&["close", url, "--data", "!"], "").0);
        let read = run(&["read", "--follow", url], "");
        assert_eq!(read.1, "abcd\ne\n!", "--follow ends at closure");
        let refused = run(&["append", url, "late"], "");
        assert!(!refused.0 && refused.2.contains("closed"), "{refused:?}");
        assert!(run(&["delete", url], "").0);
        let gone = run(&["head", url], "");
        assert!(!gone.0 && gone.2.contains("not found"), "{gone:?}");
    })
    .await
    .unwrap();
}
