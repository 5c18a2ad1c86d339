//! The crate's full stack on a real socket, and small HTTP clients to drive
//! it: hyper's client for ordinary requests, an SSE reader with deadlines,
//! and a raw TCP connection for exact bytes (chunked bodies, `Expect:
//! 100-continue`, aborted uploads).
//!
//! The server keeps streams in `MemoryStorage`, or, with
//! `DS_TEST_STORAGE=file` (and the `file` feature), in a `FileStorage` on a
//! temporary directory of its own, or, with `DS_TEST_STORAGE=postgres` (and
//! the `postgres` feature), in a `PostgresStorage` on a schema of its own in
//! the database `DS_TEST_DATABASE_URL` names (by default the local one):
//!
//! ```text
//! DS_TEST_STORAGE=file cargo test --all-features --test cases
//! DS_TEST_STORAGE=postgres cargo test --all-features --test cases
//! ```

// Each test binary uses a different part of this module.
#![allow(dead_code)]

#[cfg(feature = "postgres")]
pub mod postgres;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tower_durable_streams::service::DEFAULT_MAX_BODY_SIZE;
use tower_durable_streams::storage::{StorageRequest, StorageResponse, StreamError};
use tower_durable_streams::{
    CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};

/// Where streams live, as in the `durable-streams` binary.
pub const PREFIX: &str = "/v1/stream";

/// How long any single exchange may take before a test gives up on it.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(20);

/// The server's knobs.
#[derive(Debug, Clone)]
pub struct Options {
    pub long_poll_timeout: Duration,
    pub sse_lifetime: Duration,
    pub max_body_size: usize,
    pub body_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            long_poll_timeout: Duration::from_secs(5),
            sse_lifetime: Duration::from_secs(60),
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// A running server and a client for it. Clones share both; the server
/// stops accepting when the last clone is dropped.
#[derive(Clone)]
pub struct Server {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    _accept: Arc<AbortOnDrop>,
    /// The data directory of file storage, removed with the last clone.
    _data: Option<Arc<tempfile::TempDir>>,
    /// The schema of PostgreSQL storage, dropped with the last clone.
    #[cfg(feature = "postgres")]
    _schema: Option<Arc<postgres::Schema>>,
}

/// The storage backend `DS_TEST_STORAGE` names: `memory` (the default),
/// `file` or `postgres`.
fn file_storage() -> bool {
    storage_named("file")
}

fn storage_named(name: &str) -> bool {
    match std::env::var("DS_TEST_STORAGE").as_deref() {
        Err(_) | Ok("" | "memory") => false,
        Ok("file") if cfg!(feature = "file") => name == "file",
        Ok("postgres") if cfg!(feature = "postgres") => name == "postgres",
        Ok(other) => panic!(
            "DS_TEST_STORAGE={other}: expected memory, file with --features file, \
             or postgres with --features postgres"
        ),
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Server {
    /// A server with the default options: a 5 s long-poll timeout.
    pub async fn start() -> Self {
        Self::with(Options::default()).await
    }

    /// The stack the binary builds, served on 127.0.0.1 with hyper-util,
    /// over the storage `DS_TEST_STORAGE` names.
    pub async fn with(options: Options) -> Self {
        #[cfg(feature = "file")]
        if file_storage() {
            let dir = tempfile::tempdir().expect("a temporary data directory");
            let storage = tower_durable_streams::storage::FileStorage::open(dir.path())
                .expect("file storage opens");
            let mut server = Self::over(storage, options).await;
            server._data = Some(Arc::new(dir));
            return server;
        }
        #[cfg(feature = "postgres")]
        if storage_named("postgres") {
            let schema = postgres::Schema::new();
            let storage = schema.storage().await.unwrap_or_else(|| {
                panic!("DS_TEST_STORAGE=postgres, but no PostgreSQL is reachable")
            });
            let mut server = Self::over(storage, options).await;
            server._schema = Some(Arc::new(schema));
            return server;
        }
        // Without the `file` or `postgres` feature, this refuses
        // DS_TEST_STORAGE=file or postgres.
        assert!(!file_storage() && !storage_named("postgres"));
        Self::over(MemoryStorage::new(), options).await
    }

    /// The stack the binary builds over `storage`.
    pub async fn over<S>(storage: S, options: Options) -> Self
    where
        S: tower::Service<StorageRequest, Response = StorageResponse, Error = StreamError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
    {
        let streams = ServiceBuilder::new()
            .layer(CacheControlLayer::new())
            .layer(SseLayer::new().connection_lifetime(options.sse_lifetime))
            .layer(LongPollLayer::new().timeout(options.long_poll_timeout))
            .service(
                DurableStreamsService::new(storage)
                    .prefix(PREFIX)
                    .max_body_size(options.max_body_size)
                    .body_timeout(options.body_timeout),
            );
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let accept = tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(streams.clone());
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Self {
            addr,
            client: Client::builder(TokioExecutor::new()).build_http(),
            _accept: Arc::new(AbortOnDrop(accept)),
            _data: None,
            #[cfg(feature = "postgres")]
            _schema: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends a request to `path` (absolute, with any query) and returns the
    /// response with its body still open.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Response<Incoming> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body.into()))
            .expect("the test builds a valid request");
        tokio::time::timeout(EXCHANGE_LIMIT, self.client.request(request))
            .await
            .expect("the server answers in time")
            .expect("the server answers")
    }

    /// Sends a request to `path` (absolute) and reads the whole response.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let (parts, body) = self.send(method, path, headers, body).await.into_parts();
        let body = tokio::time::timeout(EXCHANGE_LIMIT, body.collect())
            .await
            .expect("the body ends in time")
            .expect("the body is readable")
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// `PUT` to the stream `name` (below [`PREFIX`]).
    pub async fn put(&self, name: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        self.request(Method::PUT, &stream(name), headers, body)
            .await
    }

    pub async fn post(
        &self,
        name: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.request(Method::POST, &stream(name), headers, body)
            .await
    }

    /// `GET` of `name_and_query`, such as `"s?offset=-1"`.
    pub async fn get(&self, name_and_query: &str) -> Reply {
        self.request(Method::GET, &stream(name_and_query), &[], Bytes::new())
            .await
    }

    pub async fn head(&self, name_and_query: &str) -> Reply {
        self.request(Method::HEAD, &stream(name_and_query), &[], Bytes::new())
            .await
    }

    pub async fn delete(&self, name: &str) -> Reply {
        self.request(Method::DELETE, &stream(name), &[], Bytes::new())
            .await
    }

    /// A `GET` running in its own task, which also reports how long it took.
    pub fn spawn_get(&self, name_and_query: String) -> JoinHandle<(Reply, Duration)> {
        let server = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = server.get(&name_and_query).await;
            (reply, started.elapsed())
        })
    }

    /// Opens an SSE read of `name_and_query`.
    pub async fn sse(&self, name_and_query: &str) -> EventStream {
        let (parts, body) = self
            .send(Method::GET, &stream(name_and_query), &[], Bytes::new())
            .await
            .into_parts();
        EventStream {
            status: parts.status,
            headers: parts.headers,
            body,
            raw: Vec::new(),
            ended: false,
        }
    }

    /// A raw TCP connection to the server.
    pub async fn connect(&self) -> RawConn {
        let stream = TcpStream::connect(self.addr)
            .await
            .expect("connect to the server");
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends `request` as is on a new connection and reads the reply until
    /// the server closes it (so send `Connection: close`).
    pub async fn raw(&self, request: impl AsRef<[u8]>) -> RawReply {
        let mut conn = self.connect().await;
        conn.send(request).await;
        conn.finish().await
    }

    /// How many of the server's connections the client has closed but the
    /// server still holds (TCP `CLOSE_WAIT` on the server's port): each is a
    /// reader the server has not noticed leaving.
    #[cfg(target_os = "linux")]
    pub fn abandoned_connections(&self) -> usize {
        const CLOSE_WAIT: &str = "08";
        let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
        let port = format!("{:04X}", self.addr.port());
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields.get(1).and_then(|a| a.rsplit(':').next());
                local_port == Some(port.as_str()) && fields.get(3) == Some(&CLOSE_WAIT)
            })
            .count()
    }
}

/// The absolute path of the stream `name_and_query`.
pub fn stream(name_and_query: &str) -> String {
    format!("{PREFIX}/{name_and_query}")
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| {
            v.to_str()
                .expect("the test reads only visible-ASCII headers")
        })
    }

    /// Whether the header is present with the value `true`.
    pub fn is_true(&self, name: &str) -> bool {
        self.header(name) == Some("true")
    }

    /// `Stream-Next-Offset`, which the response must carry.
    pub fn next_offset(&self) -> String {
        self.header("stream-next-offset")
            .unwrap_or_else(|| panic!("no Stream-Next-Offset in {self:?}"))
            .to_owned()
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// One server-sent event, as a WHATWG-conforming parser dispatches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub data: String,
}

impl Event {
    /// The JSON of a control event.
    pub fn control(&self) -> serde_json::Map<String, serde_json::Value> {
        assert_eq!(self.kind, "control", "not a control event: {self:?}");
        match serde_json::from_str(&self.data) {
            Ok(serde_json::Value::Object(map)) => map,
            other => panic!("control data is not a JSON object: {other:?}"),
        }
    }
}

/// An open SSE response.
pub struct EventStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    /// Every byte received so far.
    pub raw: Vec<u8>,
    /// Whether the server ended the response.
    pub ended: bool,
}

impl EventStream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The events received so far.
    pub fn events(&self) -> Vec<Event> {
        parse_events(&self.raw)
    }

    /// Reads until `done` holds for the events so far, the response ends, or
    /// `within` passes; returns the events so far.
    pub async fn read_until(
        &mut self,
        within: Duration,
        done: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + within;
        while !self.ended && !done(&self.events()) {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => break,
                Ok(None) => self.ended = true,
                Ok(Some(frame)) => {
                    let frame = frame.expect("the event stream is readable");
                    if let Ok(data) = frame.into_data() {
                        self.raw.extend_from_slice(&data);
                    }
                }
            }
        }
        self.events()
    }

    /// Reads until the server ends the response or `within` passes.
    pub async fn read_to_end(&mut self, within: Duration) -> Vec<Event> {
        self.read_until(within, |_| false).await
    }
}

/// Parses an event stream as the WHATWG HTML standard does: lines end at
/// CRLF, CR or LF; `data` lines are joined with LF; a blank line dispatches.
pub fn parse_events(raw: &[u8]) -> Vec<Event> {
    let text = String::from_utf8_lossy(raw);
    let mut events = Vec::new();
    let (mut kind, mut data) = (String::new(), String::new());
    let mut rest = text.as_ref();
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                let kind = if kind.is_empty() { "message" } else { &kind };
                events.push(Event {
                    kind: kind.to_owned(),
                    data: std::mem::take(&mut data),
                });
            }
            kind.clear();
            data.clear();
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => kind = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            _ => {}
        }
    }
    events
}

/// A raw TCP connection to the server.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .await
            .expect("write to the server");
    }

    /// Reads the next response head, such as a `100 Continue`.
    pub async fn read_head(&mut self) -> String {
        let read = async {
            loop {
                if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                    let head = self.buf.drain(..end + 4).collect::<Vec<u8>>();
                    return String::from_utf8(head).expect("an ASCII response head");
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.expect("read a head");
                assert!(n > 0, "the connection closed before a response head");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(EXCHANGE_LIMIT, read)
            .await
            .expect("a response head arrives in time")
    }

    /// Reads until the bytes received contain `needle` (true) or `within`
    /// passes or the connection ends (false).
    pub async fn read_until_contains(&mut self, needle: &[u8], within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 4096];
        while find(&self.buf, needle).is_none() {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return false,
            }
        }
        true
    }

    /// Reads until the server closes the connection and returns the final
    /// response, skipping interim (1xx) ones. A reset after the response
    /// arrived (the server refused an unread body) is not an error.
    pub async fn finish(mut self) -> RawReply {
        let read = async {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(EXCHANGE_LIMIT, read)
            .await
            .expect("the server closes the connection in time");
        let mut rest = &self.buf[..];
        loop {
            let end = find(rest, b"\r\n\r\n").unwrap_or_else(|| {
                panic!(
                    "no response head in {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            });
            let head = String::from_utf8(rest[..end].to_vec()).expect("an ASCII response head");
            rest = &rest[end + 4..];
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("a status line");
            if !(100..200).contains(&status) {
                return RawReply {
                    status,
                    head,
                    after_head: rest.to_vec(),
                };
            }
        }
    }
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// Every byte after the head, as sent.
    pub after_head: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body, decoded from its framing.
    pub fn body(&self) -> Vec<u8> {
        if self
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            return dechunk(&self.after_head);
        }
        match self.header("content-length") {
            Some(len) => {
                let len = len.parse().expect("a numeric Content-Length");
                self.after_head[..len].to_vec()
            }
            None => self.after_head.clone(),
        }
    }
}

/// `parts` as an HTTP/1.1 chunked body, one chunk each, with the last chunk.
pub fn chunked(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").expect("a chunk size line");
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .expect("a hexadecimal chunk size");
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
