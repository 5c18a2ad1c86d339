//! Crash test of file storage against the real `durable-streams` binary.
//!
//! Each round runs concurrent writers against `durable-streams serve
//! --storage file` for a short random time, SIGKILLs the server in the
//! middle of their writes, restarts it on the same data directory and checks
//! every stream against what the writers were told:
//!
//! - every acknowledged (2xx) append is present exactly once, byte for byte,
//!   in the order each writer sent it;
//! - nothing appears that was never sent, or that the server refused;
//! - no record is cut short (a torn frame);
//! - an append that was sent but not answered is present at most once;
//! - an idempotent producer's retry after the restart of a sequence number
//!   that was acknowledged gets `204 No Content` and adds nothing;
//! - an acknowledged create is there, and an acknowledged delete stays done;
//! - a producer's old epoch stays fenced after a new one began.
//!
//! The writers: plain appenders sharing three `text/plain` streams, whose
//! bodies (`w3.0.17:padding;`) tell who sent them and in what order;
//! idempotent producers, two to a stream, which sometimes give up on a
//! request at once and resend it, as a client with a short timeout does;
//! and a creator that makes new streams and deletes every other one.
//!
//! State accumulates across rounds on the same data directory, so each
//! recovery replays everything before it. Rounds alternate `--sync fsync`
//! and `--sync write` (both survive a crash of the process), and every fifth
//! runs long enough for the server to write a snapshot, so that later
//! recoveries start from one. A second server on the same data is refused
//! while the first runs.
//!
//! The number of rounds comes from `CRASH_ROUNDS` (default 5, so that the
//! normal test run stays short). The bar the durability issue set is
//! `CRASH_ROUNDS=50`:
//!
//! ```text
//! CRASH_ROUNDS=50 cargo test --all-features --test crash -- --nocapture
//! ```
//!
//! `CRASH_SEED` fixes the random choices (writers' streams, body sizes,
//! round lengths) of a run; the seed of every run is printed.

#![cfg(feature = "server")]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const BINARY: &str = env!("CARGO_BIN_EXE_durable-streams");
const PREFIX: &str = "/v1/stream";

/// Plain appenders, and the streams they share.
const APPENDERS: usize = 4;
const APPEND_STREAMS: usize = 3;
/// Idempotent producers, two to a stream.
const PRODUCERS: usize = 4;
const PRODUCER_STREAMS: usize = 2;

/// How long any one request may take before the writer gives up on it.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Bodies that describe themselves
// ---------------------------------------------------------------------------

/// One append: who sent it and its place in that writer's sequence. Plain
/// appenders and creators use epoch 0; producers use their epoch and seq.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Token {
    writer: String,
    epoch: u64,
    seq: u64,
}

impl Token {
    fn new(writer: &str, epoch: u64, seq: u64) -> Self {
        Self {
            writer: writer.to_owned(),
            epoch,
            seq,
        }
    }

    /// The body: `writer.epoch.seq:padding;`, the padding's length and
    /// letters a function of the rest, so that any change to a byte shows.
    /// Most bodies are short; one in 40 is about 20 KiB.
    fn body(&self) -> String {
        let id = format!("{}.{}.{}", self.writer, self.epoch, self.seq);
        let mut hash = fnv(id.as_bytes());
        let len = if hash.is_multiple_of(40) {
            16_384 + (hash % 8192) as usize
        } else {
            (hash % 120) as usize
        };
        let mut body = String::with_capacity(id.len() + len + 2);
        body.push_str(&id);
        body.push(':');
        for _ in 0..len {
            hash = hash.wrapping_mul(0x100_0000_01b3) ^ (hash >> 29);
            body.push(char::from(
                b"abcdefghijklmnopqrstuvwxyz0123456789"[(hash % 36) as usize],
            ));
        }
        body.push(';');
        body
    }

    /// The token a stored body names, if it is well formed.
    fn parse(piece: &str) -> Option<Self> {
        let (id, _) = piece.split_once(':')?;
        let mut parts = id.split('.');
        let writer = parts.next()?;
        let epoch = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        if parts.next().is_some() || writer.is_empty() {
            return None;
        }
        Some(Self::new(writer, epoch, seq))
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A small deterministic generator (xorshift64*), so a failing run can be
/// repeated with its seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fork(&mut self) -> Rng {
        Rng(self.next() | 1)
    }
}

// ---------------------------------------------------------------------------
// What the writers were told
// ---------------------------------------------------------------------------

/// What became of a request, as its sender knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// A 2xx answer: the server promised it is stored.
    Acked,
    /// Sent, and no answer came (the server died, or the client gave up).
    Unknown,
    /// Refused with a 4xx: it must not be stored.
    Refused,
}

/// Every request the writers made, by stream.
#[derive(Default)]
struct Ledger {
    /// The bodies sent to each stream, and what became of them.
    appends: BTreeMap<String, HashMap<Token, Fate>>,
    /// The streams created: what became of each `PUT`, and of its
    /// `DELETE` if one was sent.
    streams: BTreeMap<String, (Fate, Option<Fate>)>,
    /// What went wrong while the server was meant to be up.
    faults: Vec<String>,
}

type Shared = Arc<Mutex<Ledger>>;

fn note(ledger: &Shared, stream: &str, token: &Token, fate: Fate) {
    let mut ledger = ledger.lock().unwrap();
    let fates = ledger.appends.entry(stream.to_owned()).or_default();
    let entry = fates.entry(token.clone()).or_insert(fate);
    // A retry can turn an unknown fate into an acknowledged one, never back.
    if *entry != Fate::Acked {
        *entry = fate;
    }
}

fn fault(ledger: &Shared, what: String) {
    ledger.lock().unwrap().faults.push(what);
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// The server process, killed when dropped so a failing test leaves none.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts `durable-streams serve --storage file` on `data` and waits
    /// until it answers `/health`.
    fn start(data: &Path, logs: &Path, round: usize, sync: &str) -> Self {
        for attempt in 0..5 {
            let addr = free_port();
            let log = logs.join(format!("server-{round}-{attempt}.log"));
            let out = File::create(&log).expect("create the server log");
            let err = out.try_clone().expect("clone the server log");
            let child = Command::new(BINARY)
                .args(["serve", "--storage", "file", "--sync", sync])
                .arg("--data-dir")
                .arg(data)
                .arg("--addr")
                .arg(addr.to_string())
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("start the server binary");
            let mut server = Server { child, addr, log };
            if server.wait_healthy() {
                return server;
            }
            // Most likely another process took the port: try another.
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!(
            "the server did not start; see the logs in {}",
            logs.display()
        );
    }

    fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!(
                    "server exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                return false;
            }
            if health(self.addr) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGKILL: no chance to finish anything.
    fn crash(mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// `GET /health` over a plain socket.
fn health(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    if conn.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

// ---------------------------------------------------------------------------
// A client
// ---------------------------------------------------------------------------

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
struct Http {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new())
            // A request is sent once; only the writer decides to resend.
            .retry_canceled_requests(false)
            .build_http();
        Self { addr, client }
    }

    /// One request; `Err` when no whole answer came.
    async fn send(
        &self,
        method: Method,
        stream: &str,
        headers: &[(&str, String)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{PREFIX}/{stream}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(body.into()))
            .expect("a valid request");
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?;
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            })
        };
        tokio::time::timeout(REQUEST_LIMIT, exchange)
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
    }

    fn text() -> (&'static str, String) {
        ("content-type", "text/plain".to_owned())
    }
}

// ---------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------

/// Whether the server has been killed: errors after it are expected.
type Killed = Arc<AtomicBool>;

/// A plain appender: posts its next body to a random stream of its set,
/// one at a time, until the server dies. It never resends, since a plain
/// append has no deduplication.
struct Appender {
    name: String,
    next: u64,
    rng: Rng,
}

impl Appender {
    async fn run(mut self, http: Http, ledger: Shared, killed: Killed) -> Self {
        loop {
            let stream = format!("append-{}", self.rng.below(APPEND_STREAMS as u64));
            let token = Token::new(&self.name, 0, self.next);
            self.next += 1;
            note(&ledger, &stream, &token, Fate::Unknown);
            let reply = http
                .send(Method::POST, &stream, &[Http::text()], token.body())
                .await;
            match reply {
                Ok(r) if r.status == StatusCode::NO_CONTENT => {
                    note(&ledger, &stream, &token, Fate::Acked);
                }
                Ok(r) => {
                    note(&ledger, &stream, &token, Fate::Refused);
                    fault(
                        &ledger,
                        format!("{stream}: {token:?} answered {}", r.status),
                    );
                }
                Err(e) => {
                    if !killed.load(Ordering::SeqCst) {
                        fault(&ledger, format!("{stream}: {token:?} failed live: {e}"));
                    }
                    return self;
                }
            }
        }
    }
}

/// An idempotent producer on one stream. A request that got no answer is
/// resent with the same epoch and seq, as a real client does: at once when
/// the client itself gave up, and after the restart when the server died.
struct Producer {
    id: String,
    stream: String,
    epoch: u64,
    /// The next seq to send, once the pending one (if any) is settled.
    next: u64,
    /// A seq sent without an answer yet.
    pending: Option<u64>,
    /// The last seq acknowledged in this epoch.
    acked: Option<u64>,
    rng: Rng,
}

impl Producer {
    fn headers(&self, epoch: u64, seq: u64) -> Vec<(&'static str, String)> {
        vec![
            Http::text(),
            ("producer-id", self.id.clone()),
            ("producer-epoch", epoch.to_string()),
            ("producer-seq", seq.to_string()),
        ]
    }

    /// Sends `seq` of the current epoch and records what became of it. A
    /// `204` (duplicate) is right only for a seq sent before (`pending`).
    /// With `abandon`, the client gives up after a moment, as one with a
    /// short timeout does: the server may or may not have taken the append.
    async fn send(&mut self, http: &Http, ledger: &Shared, seq: u64, abandon: bool) -> Sent {
        let token = Token::new(&self.id, self.epoch, seq);
        let retried = self.pending == Some(seq);
        note(ledger, &self.stream, &token, Fate::Unknown);
        let headers = self.headers(self.epoch, seq);
        let wait = Duration::from_micros(self.rng.below(3000));
        let request = http.send(Method::POST, &self.stream, &headers, token.body());
        let reply = if abandon {
            tokio::time::timeout(wait, request)
                .await
                .unwrap_or_else(|_| Err("abandoned".into()))
        } else {
            request.await
        };
        let Ok(reply) = reply else {
            self.pending = Some(seq);
            return Sent::NoAnswer;
        };
        // On success the epoch is echoed, and Producer-Seq is the highest
        // seq accepted: this one when new, this one or later when a
        // duplicate.
        let epoch_echoed = reply.header("producer-epoch") == Some(&*self.epoch.to_string());
        let highest: Option<u64> = reply.header("producer-seq").and_then(|v| v.parse().ok());
        let fine = match reply.status {
            StatusCode::OK => epoch_echoed && highest == Some(seq),
            StatusCode::NO_CONTENT => retried && epoch_echoed && highest >= Some(seq),
            _ => false,
        };
        if !fine {
            note(ledger, &self.stream, &token, Fate::Refused);
            fault(
                ledger,
                format!(
                    "{}: {token:?} (sent before: {retried}) answered {} {:?} {:?}",
                    self.stream, reply.status, reply.headers, reply.body
                ),
            );
            self.pending = None;
            self.next = seq + 1;
            return Sent::Refused;
        }
        note(ledger, &self.stream, &token, Fate::Acked);
        self.pending = None;
        let last = self.acked.map_or(seq, |acked| acked.max(seq));
        (self.acked, self.next) = (Some(last), last + 1);
        Sent::Acked(reply.status)
    }

    async fn run(mut self, http: Http, ledger: Shared, killed: Killed) -> Self {
        loop {
            let seq = self.pending.unwrap_or(self.next);
            let abandon = self.rng.below(10) == 0;
            if let Sent::NoAnswer = self.send(&http, &ledger, seq, abandon).await {
                if killed.load(Ordering::SeqCst) {
                    return self;
                }
                if !abandon {
                    fault(
                        &ledger,
                        format!("{}: {} seq {seq} failed live", self.stream, self.id),
                    );
                    return self;
                }
            }
        }
    }

    /// After a restart: settle the seq that got no answer, then resend the
    /// last two acknowledged ones, which must be duplicates. Returns how
    /// many resends were answered 204.
    async fn after_restart(&mut self, http: &Http, ledger: &Shared) -> usize {
        if let Some(seq) = self.pending {
            if let Sent::Acked(_) = self.send(http, ledger, seq, false).await {
                // Stored once before the crash (204) or now (200); the
                // check of the stream tells which, and that it is once.
            } else {
                fault(
                    ledger,
                    format!("{}: retry of {seq} after restart failed", self.id),
                );
            }
        }
        let Some(last) = self.acked else {
            return 0;
        };
        let mut duplicates = 0;
        for seq in [last, last.saturating_sub(1)] {
            self.pending = Some(seq);
            match self.send(http, ledger, seq, false).await {
                Sent::Acked(StatusCode::NO_CONTENT) => duplicates += 1,
                other => fault(
                    ledger,
                    format!(
                        "{}: resending acknowledged seq {seq} after restart: {other:?}, not 204",
                        self.id
                    ),
                ),
            }
        }
        duplicates
    }

    /// Starts a new epoch, as a restarted producer does, and checks that the
    /// old one is fenced: its append is refused and never stored.
    async fn bump_epoch(&mut self, http: &Http, ledger: &Shared) {
        let old = self.epoch;
        (self.epoch, self.acked, self.pending, self.next) = (old + 1, None, None, 0);
        if !matches!(
            self.send(http, ledger, 0, false).await,
            Sent::Acked(StatusCode::OK)
        ) {
            fault(
                ledger,
                format!("{}: epoch {} was refused", self.id, self.epoch),
            );
        }
        let zombie = Token::new(&self.id, old, 1 << 40);
        note(ledger, &self.stream, &zombie, Fate::Refused);
        let reply = http
            .send(
                Method::POST,
                &self.stream,
                &self.headers(old, 1 << 40),
                zombie.body(),
            )
            .await;
        match reply {
            Ok(r)
                if r.status == StatusCode::FORBIDDEN
                    && r.header("producer-epoch") == Some(&*self.epoch.to_string()) => {}
            Ok(r) => fault(
                ledger,
                format!("{}: zombie epoch {old} answered {}", self.id, r.status),
            ),
            Err(e) => fault(ledger, format!("{}: zombie epoch {old}: {e}", self.id)),
        }
    }
}

#[derive(Debug)]
enum Sent {
    Acked(StatusCode),
    Refused,
    NoAnswer,
}

/// Creates new streams, each with one body, and deletes every other one
/// again, until the server dies.
async fn create_streams(round: usize, http: Http, ledger: Shared, killed: Killed) {
    let set = |stream: &str, fates: (Fate, Option<Fate>)| {
        ledger
            .lock()
            .unwrap()
            .streams
            .insert(stream.to_owned(), fates);
    };
    let failed = |what: String, e: String| {
        if !killed.load(Ordering::SeqCst) {
            fault(&ledger, format!("{what} failed live: {e}"));
        }
    };
    for n in 0.. {
        let stream = format!("created-{round}-{n}");
        let token = Token::new("c", round as u64, n);
        set(&stream, (Fate::Unknown, None));
        note(&ledger, &stream, &token, Fate::Unknown);
        let reply = http
            .send(Method::PUT, &stream, &[Http::text()], token.body())
            .await;
        match reply {
            Ok(r) if r.status == StatusCode::CREATED => {}
            Ok(r) => {
                fault(&ledger, format!("creating {stream} answered {}", r.status));
                set(&stream, (Fate::Refused, None));
                note(&ledger, &stream, &token, Fate::Refused);
                continue;
            }
            Err(e) => return failed(format!("creating {stream}"), e),
        }
        set(&stream, (Fate::Acked, None));
        note(&ledger, &stream, &token, Fate::Acked);
        if n % 2 == 1 {
            set(&stream, (Fate::Acked, Some(Fate::Unknown)));
            match http.send(Method::DELETE, &stream, &[], Bytes::new()).await {
                Ok(r) if r.status == StatusCode::NO_CONTENT => {
                    set(&stream, (Fate::Acked, Some(Fate::Acked)));
                }
                Ok(r) => fault(&ledger, format!("deleting {stream} answered {}", r.status)),
                Err(e) => return failed(format!("deleting {stream}"), e),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------
// Checking
// ---------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Tally {
    /// Acknowledged appends found exactly once, in order, byte-exact.
    acked_checked: usize,
    /// Unacknowledged appends found stored (allowed, at most once).
    unknown_present: usize,
    /// Unacknowledged appends not stored (allowed).
    unknown_absent: usize,
    /// Acknowledged appends missing.
    lost: usize,
    /// Appends stored more than once.
    duplicated: usize,
    /// Stored records that are cut short or altered.
    torn: usize,
    /// Stored records never sent, or refused.
    foreign: usize,
    /// Out of a writer's order.
    reordered: usize,
    /// Producer resends after a restart answered 204.
    duplicate_retries: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.acked_checked += other.acked_checked;
        self.unknown_present += other.unknown_present;
        self.unknown_absent += other.unknown_absent;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.torn += other.torn;
        self.foreign += other.foreign;
        self.reordered += other.reordered;
        self.duplicate_retries += other.duplicate_retries;
    }
}

/// Every byte of `stream`, read from the start until up to date; `None`
/// when it does not exist.
async fn read_all(http: &Http, stream: &str) -> Option<String> {
    let mut text = String::new();
    let mut offset = "-1".to_owned();
    loop {
        let reply = http
            .send(
                Method::GET,
                &format!("{stream}?offset={offset}"),
                &[],
                Bytes::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("reading {stream}: {e}"));
        if reply.status == StatusCode::NOT_FOUND && offset == "-1" {
            return None;
        }
        assert_eq!(reply.status, StatusCode::OK, "reading {stream}");
        text.push_str(std::str::from_utf8(&reply.body).expect("text/plain bodies are UTF-8"));
        offset = reply
            .header("stream-next-offset")
            .expect("a read names the next offset")
            .to_owned();
        if reply.header("stream-up-to-date") == Some("true") {
            return Some(text);
        }
    }
}

/// Checks every stream the writers touched against the ledger.
async fn verify(http: &Http, ledger: &Ledger, tally: &mut Tally, problems: &mut Vec<String>) {
    for (stream, fates) in &ledger.appends {
        let (created, deleted) = ledger.streams[stream];
        let must_exist = created == Fate::Acked && deleted.is_none();
        let text = read_all(http, stream).await;
        if deleted == Some(Fate::Acked) {
            // A deleted stream stays deleted; what it held is not checked.
            if text.is_some() {
                tally.foreign += 1;
                problems.push(format!("{stream}: deleted, yet back"));
            }
            continue;
        }
        let Some(text) = text else {
            if must_exist {
                problems.push(format!("{stream}: missing"));
                tally.lost += fates.values().filter(|f| **f == Fate::Acked).count();
            } else {
                tally.unknown_absent += fates.len();
            }
            continue;
        };

        let mut seen: HashMap<&Token, usize> = HashMap::new();
        let mut last: HashMap<&str, (u64, u64)> = HashMap::new();
        for piece in text.split_inclusive(';') {
            if !piece.ends_with(';') {
                tally.torn += 1;
                problems.push(format!("{stream}: torn record at the end: {piece:.80}"));
                break;
            }
            let Some(token) = Token::parse(piece) else {
                tally.torn += 1;
                problems.push(format!("{stream}: malformed record {piece:.80}"));
                continue;
            };
            let Some((token, fate)) = fates.get_key_value(&token) else {
                tally.foreign += 1;
                problems.push(format!("{stream}: {token:?} was never sent here"));
                continue;
            };
            if token.body() != piece {
                tally.torn += 1;
                problems.push(format!(
                    "{stream}: {token:?} is stored altered: {piece:.80}"
                ));
            }
            if *fate == Fate::Refused {
                tally.foreign += 1;
                problems.push(format!("{stream}: {token:?} was refused, yet stored"));
            }
            let count = seen.entry(token).or_default();
            *count += 1;
            if *count > 1 {
                tally.duplicated += 1;
                problems.push(format!("{stream}: {token:?} is stored {count} times"));
            }
            let place = (token.epoch, token.seq);
            if let Some(before) = last.insert(&token.writer, place) {
                if before >= place {
                    tally.reordered += 1;
                    problems.push(format!("{stream}: {token:?} stored after {before:?}"));
                }
            }
        }

        for (token, fate) in fates {
            let present = seen.contains_key(token);
            match (fate, present) {
                (Fate::Acked, true) => tally.acked_checked += 1,
                (Fate::Acked, false) => {
                    tally.lost += 1;
                    problems.push(format!("{stream}: acknowledged {token:?} is lost"));
                }
                (Fate::Unknown, true) => tally.unknown_present += 1,
                (Fate::Unknown, false) => tally.unknown_absent += 1,
                (Fate::Refused, _) => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

/// When the server last wrote its snapshot, if it has one (for the log of
/// the run only: whether a recovery started from a snapshot).
fn snapshot_time(data: &Path) -> Option<SystemTime> {
    std::fs::metadata(data.join("snapshot.bin"))
        .and_then(|m| m.modified())
        .ok()
}

fn rounds() -> usize {
    std::env::var("CRASH_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("CRASH_ROUNDS is a number"))
        .unwrap_or(5)
}

fn seed() -> u64 {
    std::env::var("CRASH_SEED")
        .ok()
        .map(|v| v.parse().expect("CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        })
        | 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let rounds = rounds();
    let seed = seed();
    eprintln!("crash test: {rounds} rounds, CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let data = tempfile::tempdir().expect("a data directory");
    let logs = tempfile::tempdir().expect("a log directory");
    let ledger: Shared = Arc::default();
    let mut tally = Tally::default();
    let mut snapshots = 0;

    let mut server = Server::start(data.path(), logs.path(), 0, "fsync");
    let http = Http::new(server.addr);

    // A second server on the same data refuses to start while the first
    // runs.
    let second = Command::new(BINARY)
        .args(["serve", "--storage", "file", "--data-dir"])
        .arg(data.path())
        .arg("--addr")
        .arg(free_port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run a second server");
    assert!(!second.status.success(), "a second server started");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use"), "{stderr}");

    for stream in (0..APPEND_STREAMS)
        .map(|i| format!("append-{i}"))
        .chain((0..PRODUCER_STREAMS).map(|i| format!("produce-{i}")))
    {
        let reply = http
            .send(Method::PUT, &stream, &[Http::text()], Bytes::new())
            .await
            .expect("create a stream");
        assert_eq!(reply.status, StatusCode::CREATED);
        let mut ledger = ledger.lock().unwrap();
        ledger.streams.insert(stream.clone(), (Fate::Acked, None));
        ledger.appends.entry(stream).or_default();
    }

    let mut appenders: Vec<Appender> = (0..APPENDERS)
        .map(|i| Appender {
            name: format!("w{i}"),
            next: 0,
            rng: rng.fork(),
        })
        .collect();
    let mut producers: Vec<Producer> = (0..PRODUCERS)
        .map(|i| Producer {
            id: format!("p{i}"),
            stream: format!("produce-{}", i % PRODUCER_STREAMS),
            epoch: 0,
            next: 0,
            pending: None,
            acked: None,
            rng: rng.fork(),
        })
        .collect();

    for round in 1..=rounds {
        let snapshot_before = snapshot_time(data.path());
        let killed: Killed = Arc::default();
        let http = Http::new(server.addr);
        let appending: Vec<_> = appenders
            .drain(..)
            .map(|a| tokio::spawn(a.run(http.clone(), ledger.clone(), killed.clone())))
            .collect();
        let producing: Vec<_> = producers
            .drain(..)
            .map(|p| tokio::spawn(p.run(http.clone(), ledger.clone(), killed.clone())))
            .collect();
        let creating = tokio::spawn(create_streams(
            round,
            http.clone(),
            ledger.clone(),
            killed.clone(),
        ));

        // Kill the server while the writers are busy. Every fifth round
        // runs long enough for the server to snapshot its index (it does
        // once deletes have happened and five seconds have passed since it
        // started), so that recovery starts from a snapshot.
        let run = if round % 5 == 0 {
            5_500 + rng.below(1500)
        } else {
            200 + rng.below(1300)
        };
        tokio::time::sleep(Duration::from_millis(run)).await;
        killed.store(true, Ordering::SeqCst);
        server.crash();

        for task in appending {
            appenders.push(task.await.expect("an appender"));
        }
        for task in producing {
            producers.push(task.await.expect("a producer"));
        }
        creating.await.expect("the creator");
        let snapshotted = snapshot_time(data.path()) != snapshot_before;
        snapshots += usize::from(snapshotted);

        // Half the rounds acknowledge after write(2) rather than
        // fdatasync: both survive a crash of the process.
        let sync = if round % 2 == 0 { "write" } else { "fsync" };
        server = Server::start(data.path(), logs.path(), round, sync);
        let http = Http::new(server.addr);

        let mut this_round = Tally::default();
        for producer in &mut producers {
            this_round.duplicate_retries += producer.after_restart(&http, &ledger).await;
        }
        // One producer begins a new epoch every third round.
        if round % 3 == 0 {
            let producer = &mut producers[round % PRODUCERS];
            producer.bump_epoch(&http, &ledger).await;
        }

        // The ledger is checked as it stands now; no writer is running.
        let (mut problems, snapshot) = {
            let ledger = ledger.lock().unwrap();
            let snapshot = Ledger {
                appends: ledger.appends.clone(),
                streams: ledger.streams.clone(),
                faults: Vec::new(),
            };
            (ledger.faults.clone(), snapshot)
        };
        verify(&http, &snapshot, &mut this_round, &mut problems).await;
        eprintln!(
            "round {round}: killed after {run} ms (new snapshot: {snapshotted}), \
             restarted with --sync {sync}; \
             {} acknowledged appends checked, {} unacknowledged stored, {} unacknowledged absent",
            this_round.acked_checked, this_round.unknown_present, this_round.unknown_absent
        );
        assert!(
            problems.is_empty(),
            "round {round} (CRASH_SEED={seed}): {} problems:\n{}\n{this_round:?}",
            problems.len(),
            problems.join("\n")
        );
        tally.add(&this_round);
    }

    // Acknowledged appends to streams that were not deleted afterwards.
    let distinct = {
        let ledger = ledger.lock().unwrap();
        ledger
            .appends
            .iter()
            .filter(|(stream, _)| ledger.streams[*stream].1 != Some(Fate::Acked))
            .flat_map(|(_, fates)| fates.values())
            .filter(|fate| **fate == Fate::Acked)
            .count()
    };
    eprintln!(
        "crash test: {rounds} rounds ({snapshots} with a new snapshot), \
         {distinct} acknowledged appends, {} checks of them in all, \
         {} producer resends answered 204; lost {}, duplicated {}, torn {}, \
         foreign {}, reordered {}",
        tally.acked_checked,
        tally.duplicate_retries,
        tally.lost,
        tally.duplicated,
        tally.torn,
        tally.foreign,
        tally.reordered
    );
    drop(server);
}
