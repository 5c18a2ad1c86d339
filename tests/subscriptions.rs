//! Subscriptions (PROTOCOL.md sections 6 and 7) over HTTP, against the real
//! `durable-streams` binary with file storage, and a webhook receiver of the
//! test's own on loopback.
//!
//! - webhook deliveries are signed with the key the JWKS publishes, and
//!   `{"done": true}` acks the wake's snapshot;
//! - callbacks need the wake's token, and stale wakes are fenced;
//! - failed deliveries back off exponentially, and a restart between a
//!   failure and its retry keeps both the schedule and the signing key;
//! - pull-wake claims are exclusive, heartbeats extend the lease, an expired
//!   lease re-wakes pending work under a new generation;
//! - SSRF targets and malformed requests are refused and create nothing.

#![cfg(feature = "server")]

use std::collections::VecDeque;
use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use bytes::Bytes;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const BINARY: &str = env!("CARGO_BIN_EXE_durable-streams");
const PREFIX: &str = "/v1/stream";
/// How long a test waits for something the server does on its own.
const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// The server process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Server {
    /// `durable-streams serve --storage file` on `data`, with the localhost
    /// webhook exception when `dev`.
    fn start(data: &Path, dev: bool) -> Self {
        let log = data.with_extension("log");
        for _ in 0..5 {
            let addr = StdListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port");
            let out = File::create(&log).expect("create the server log");
            let mut command = Command::new(BINARY);
            command
                .args(["serve", "--storage", "file", "--long-poll-timeout", "500ms"])
                .arg("--data-dir")
                .arg(data)
                .arg("--addr")
                .arg(addr.to_string())
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("clone the log"))
                .stderr(out);
            if dev {
                command.arg("--allow-localhost-webhooks");
            }
            let child = command.spawn().expect("start the server binary");
            let mut server = Server {
                child,
                addr,
                client: Client::builder(TokioExecutor::new()).build_http(),
            };
            if server.wait_healthy() {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        panic!(
            "the server did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn wait_healthy(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// SIGKILL, with no chance to finish anything.
    fn crash(mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// One request to `path` below the prefix.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{PREFIX}/{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).expect("a request");
        let exchange = async {
            let response = self.client.request(request).await.expect("an answer");
            let status = response.status();
            let body = response.into_body().collect().await.expect("a body");
            (status, body.to_bytes())
        };
        tokio::time::timeout(PATIENCE, exchange)
            .await
            .expect("the server answers in time")
    }

    /// A request with a JSON body (`Value::Null` for none) and an optional
    /// bearer token; the answer parsed as JSON (`Null` when empty).
    async fn json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth));
        }
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let (status, answer) = self.send(method, path, &headers, body).await;
        let value = if answer.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&answer)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&answer)))
        };
        (status, value)
    }

    /// Creates a text stream with `body`; returns its tail.
    async fn create(&self, path: &str, content_type: &str, body: &str) -> String {
        let response = self.raw(Method::PUT, path, content_type, body).await;
        assert_eq!(response.status(), StatusCode::CREATED, "create {path}");
        next_offset(&response)
    }

    /// Appends `body`; returns the new tail.
    async fn append(&self, path: &str, body: &str) -> String {
        let response = self.raw(Method::POST, path, "text/plain", body).await;
        assert!(response.status().is_success(), "append to {path}");
        next_offset(&response)
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> Response<Incoming> {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{PREFIX}/{path}", self.addr))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("a request");
        self.client.request(request).await.expect("an answer")
    }

    async fn subscription(&self, id: &str) -> Value {
        let (status, body) = self
            .json(
                Method::GET,
                &format!("__ds/subscriptions/{id}"),
                None,
                Value::Null,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Polls the subscription until `ready` holds.
    async fn subscription_when(&self, id: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let body = self.subscription(id).await;
            if ready(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "subscription never got there: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The public key the JWKS publishes, with its `kid`.
    async fn jwks_key(&self) -> (String, VerifyingKey) {
        let (status, body) = self.send(Method::GET, "__ds/jwks.json", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        let jwks: Value = serde_json::from_slice(&body).expect("a JWK Set");
        let key = &jwks["keys"][0];
        assert_eq!(
            (key["kty"].as_str(), key["crv"].as_str()),
            (Some("OKP"), Some("Ed25519"))
        );
        let x = B64
            .decode(key["x"].as_str().expect("x"))
            .expect("base64url x");
        let x: [u8; 32] = x.try_into().expect("32 bytes");
        let kid = key["kid"].as_str().expect("kid").to_owned();
        (kid, VerifyingKey::from_bytes(&x).expect("an Ed25519 key"))
    }

    /// Every wake event in the wake stream `path`.
    async fn wake_events(&self, path: &str) -> Vec<Value> {
        let (status, body) = self
            .send(Method::GET, &format!("{path}?offset=-1"), &[], "")
            .await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice::<Vec<Value>>(&body).expect("a JSON array")
    }

    /// Waits for the wake event of `generation` in the wake stream `path`.
    async fn wake_event(&self, path: &str, generation: u64) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let events = self.wake_events(path).await;
            if let Some(event) = events.iter().find(|e| e["generation"] == generation) {
                return event.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no wake {generation}: {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn next_offset(response: &Response<Incoming>) -> String {
    response.headers()["stream-next-offset"]
        .to_str()
        .expect("an ASCII offset")
        .to_owned()
}

// ---------------------------------------------------------------------------
// A webhook receiver
// ---------------------------------------------------------------------------

/// How the receiver answers one delivery.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// `500`.
    Fail,
    /// `200` with `{"done": true}`.
    Done,
    /// `200` with no body: the worker will call back.
    Accepted,
}

/// One webhook request as received.
#[derive(Debug)]
struct Delivery {
    at: SystemTime,
    signature: String,
    body: Bytes,
    json: Value,
}

impl Delivery {
    /// Checks the `Webhook-Signature` against `key`: `kid` as published,
    /// a fresh timestamp, and an Ed25519 signature over `t.body`.
    fn verify(&self, kid: &str, key: &VerifyingKey) {
        let mut parts = self.signature.split(',');
        let mut field = |name: &str| {
            let part = parts.next().expect("a signature part");
            part.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .unwrap_or_else(|| panic!("{name}= in {}", self.signature))
                .to_owned()
        };
        let t = field("t");
        assert_eq!(field("kid"), kid);
        let signature = B64.decode(field("ed25519")).expect("base64url signature");
        let signature = Signature::from_slice(&signature).expect("64 bytes");
        let sent: u64 = t.parse().expect("a decimal timestamp");
        let now = unix_secs(SystemTime::now());
        assert!(
            sent.abs_diff(now) < 300,
            "timestamp {sent} outside the replay window"
        );
        let mut message = t.into_bytes();
        message.push(b'.');
        message.extend_from_slice(&self.body);
        key.verify(&message, &signature)
            .expect("the signature verifies with the published key");
        let mut tampered = message.clone();
        tampered.push(b' ');
        assert!(key.verify(&tampered, &signature).is_err());
    }
}

struct Hook {
    url: String,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
}

impl Hook {
    /// A receiver that answers with `script` in turn, then `Done`.
    async fn start(script: &[Reply]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("an address"));
        let (tx, deliveries) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let replies = script;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let replies = replies.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let tx = tx.clone();
                    let replies = replies.clone();
                    async move {
                        let signature = request
                            .headers()
                            .get("webhook-signature")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = request.into_body().collect().await?.to_bytes();
                        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let reply = replies.lock().unwrap().pop_front().unwrap_or(Reply::Done);
                        let _ = tx.send(Delivery {
                            at: SystemTime::now(),
                            signature,
                            body,
                            json,
                        });
                        let (status, answer) = match reply {
                            Reply::Fail => (500, ""),
                            Reply::Done => (200, r#"{"done":true}"#),
                            Reply::Accepted => (200, ""),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(answer)));
                        *response.status_mut() = StatusCode::from_u16(status).expect("a status");
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self { url, deliveries }
    }

    async fn next(&mut self) -> Delivery {
        tokio::time::timeout(PATIENCE, self.deliveries.recv())
            .await
            .expect("a webhook delivery in time")
            .expect("the receiver runs")
    }

    /// Asserts that nothing is delivered for `quiet`.
    async fn none_for(&mut self, quiet: Duration) {
        if let Ok(Some(delivery)) = tokio::time::timeout(quiet, self.deliveries.recv()).await {
            panic!("unexpected delivery: {}", delivery.json);
        }
    }
}

fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// `next_attempt_at` of a subscription, in Unix milliseconds.
fn next_attempt_ms(subscription: &Value) -> Option<u64> {
    let text = subscription["next_attempt_at"].as_str()?;
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 time");
    Some((at.unix_timestamp_nanos() / 1_000_000) as u64)
}

/// The link of `path` in a subscription or wake body.
fn link<'a>(body: &'a Value, path: &str) -> &'a Value {
    body["streams"]
        .as_array()
        .and_then(|links| links.iter().find(|l| l["path"] == path))
        .unwrap_or_else(|| panic!("no link for {path} in {body}"))
}

fn webhook(id: &str, hook: &Hook, pattern: &str) -> (String, Value) {
    let body = json!({
        "type": "webhook",
        "pattern": pattern,
        "webhook": { "url": hook.url },
        "lease_ttl_ms": 5000,
    });
    (format!("__ds/subscriptions/{id}"), body)
}

// ---------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------

#[tokio::test]
async fn webhooks_are_signed_with_the_published_key_and_done_acks_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), true);
    let mut hook = Hook::start(&[]).await;
    let before = server.create("events/old", "text/plain", "history").await;

    let (path, body) = webhook("hooks", &hook, "events/*");
    let (status, created) = server.json(Method::PUT, &path, None, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (kid, key) = server.jwks_key().await;
    assert_eq!(created["webhook"]["signing"]["kid"], kid.as_str());
    let jwks_url = created["webhook"]["signing"]["jwks_url"].as_str().unwrap();
    assert!(
        jwks_url.ends_with("/v1/stream/__ds/jwks.json"),
        "{jwks_url}"
    );
    // An existing stream is linked at its tail: no history is replayed.
    assert_eq!(
        link(&created, "events/old")["acked_offset"],
        before.as_str()
    );
    hook.none_for(Duration::from_millis(300)).await;

    let tail = server.append("events/old", " and more").await;
    let delivery = hook.next().await;
    delivery.verify(&kid, &key);
    let wake = &delivery.json;
    assert_eq!(wake["subscription_id"], "hooks");
    assert_eq!(wake["generation"], 1);
    let linked = link(wake, "events/old");
    assert_eq!(linked["acked_offset"], before.as_str());
    assert_eq!(linked["tail_offset"], tail.as_str());
    assert_eq!(linked["has_pending"], true);
    let callback = wake["callback_url"].as_str().unwrap();
    assert!(callback.ends_with("/v1/stream/__ds/subscriptions/hooks/callback"));

    // `{"done": true}` acks the tails of the wake.
    let acked = server
        .subscription_when("hooks", |s| {
            link(s, "events/old")["acked_offset"] == tail.as_str()
        })
        .await;
    assert_eq!(acked["status"], "active");

    // A stream created later is linked before its first write, which wakes.
    server.create("events/new", "text/plain", "first").await;
    let delivery = hook.next().await;
    delivery.verify(&kid, &key);
    assert_eq!(delivery.json["generation"], 2);
    assert_eq!(link(&delivery.json, "events/new")["has_pending"], true);
    assert_eq!(link(&delivery.json, "events/old")["has_pending"], false);
    // Streams outside the pattern wake nothing.
    server.create("other/x", "text/plain", "x").await;
    hook.none_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn callbacks_need_the_wakes_token_and_stale_wakes_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), true);
    let mut hook = Hook::start(&[Reply::Accepted, Reply::Accepted]).await;
    server.create("jobs/a", "text/plain", "").await;
    let (path, body) = webhook("cb", &hook, "jobs/*");
    assert_eq!(
        server.json(Method::PUT, &path, None, body).await.0,
        StatusCode::CREATED
    );
    let tail = server.append("jobs/a", "job").await;
    let wake = hook.next().await.json;
    let token = wake["callback_token"].as_str().unwrap().to_owned();
    let wake_id = wake["wake_id"].as_str().unwrap().to_owned();
    let callback = "__ds/subscriptions/cb/callback";
    let ack = |wake_id: &str, generation: u64| {
        json!({
            "wake_id": wake_id,
            "generation": generation,
            "acks": [{ "stream": "jobs/a", "offset": tail }],
            "done": true,
        })
    };

    let (status, _) = server
        .json(Method::POST, callback, None, ack(&wake_id, 1))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    let (status, _) = server
        .json(
            Method::POST,
            callback,
            Some("forged.token"),
            ack(&wake_id, 1),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a forged token");
    for (wake_id, generation) in [("w_other", 1), (wake_id.as_str(), 2), (wake_id.as_str(), 0)] {
        let (status, body) = server
            .json(
                Method::POST,
                callback,
                Some(&token),
                ack(wake_id, generation),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{wake_id} {generation}");
        assert_eq!(body["error"]["code"], "FENCED");
    }
    let zero = link(&server.subscription("cb").await, "jobs/a")["acked_offset"].clone();
    assert_ne!(zero, tail.as_str(), "refused callbacks advance nothing");

    let (status, body) = server
        .json(Method::POST, callback, Some(&token), ack(&wake_id, 1))
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"ok": true, "next_wake": false}))
    );
    assert_eq!(
        link(&server.subscription("cb").await, "jobs/a")["acked_offset"],
        tail.as_str()
    );
    // The same callback again is for a wake that has ended.
    let (status, body) = server
        .json(Method::POST, callback, Some(&token), ack(&wake_id, 1))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "FENCED");

    // After deletion, an in-flight wake's callback fails and moves nothing.
    let later = server.append("jobs/a", "another").await;
    let wake = hook.next().await.json;
    assert_eq!(wake["generation"], 2);
    let status = server
        .json(Method::DELETE, "__ds/subscriptions/cb", None, Value::Null)
        .await
        .0;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let late = json!({
        "wake_id": wake["wake_id"],
        "generation": 2,
        "acks": [{ "stream": "jobs/a", "offset": later }],
        "done": true,
    });
    let token = wake["callback_token"].as_str().unwrap();
    let (status, _) = server.json(Method::POST, callback, Some(token), late).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .json(Method::GET, "__ds/subscriptions/cb", None, Value::Null)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Fails twice, restarts the server (SIGKILL) while the second retry is
/// scheduled, and checks that the retry comes at the stored time, signed
/// with the same key, and that the attempt count carried on.
#[tokio::test]
async fn a_restart_keeps_the_retry_schedule_and_the_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, true);
    let mut hook = Hook::start(&[Reply::Fail, Reply::Fail, Reply::Fail]).await;
    server.create("feed/a", "text/plain", "").await;
    let (path, body) = webhook("retry", &hook, "feed/*");
    assert_eq!(
        server.json(Method::PUT, &path, None, body).await.0,
        StatusCode::CREATED
    );
    let (kid, key) = server.jwks_key().await;
    let tail = server.append("feed/a", "event").await;

    // First failure: retried after 1 s, give or take 20%.
    let first = hook.next().await;
    let failed = server
        .subscription_when("retry", |s| next_attempt_ms(s).is_some())
        .await;
    assert_eq!(failed["status"], "failed");
    let retry_at = next_attempt_ms(&failed).unwrap();
    let delay = retry_at - unix_ms(first.at);
    assert!(
        (750..=1_250).contains(&delay),
        "first retry after {delay} ms"
    );
    let second = hook.next().await;
    assert!(
        unix_ms(second.at) + 20 >= retry_at,
        "retried before its time"
    );
    assert_eq!(second.json["generation"], 2, "each attempt is a new wake");

    // Second failure: after 2 s. Crash and restart before it is due.
    let failed = server
        .subscription_when("retry", |s| {
            next_attempt_ms(s).is_some_and(|at| at > retry_at)
        })
        .await;
    let retry_at = next_attempt_ms(&failed).unwrap();
    let delay = retry_at - unix_ms(second.at);
    assert!(
        (1_550..=2_450).contains(&delay),
        "second retry after {delay} ms"
    );
    server.crash();
    let server = Server::start(&data, true);
    let restarted = unix_ms(SystemTime::now());
    assert!(
        restarted < retry_at,
        "the restart took too long to test anything"
    );

    let after = server.subscription("retry").await;
    assert_eq!(after["status"], "failed");
    assert_eq!(
        next_attempt_ms(&after),
        Some(retry_at),
        "the schedule survives"
    );
    assert_eq!(
        server.jwks_key().await,
        (kid.clone(), key),
        "the key survives"
    );

    let third = hook.next().await;
    assert!(
        unix_ms(third.at) + 20 >= retry_at,
        "retried before its time"
    );
    third.verify(&kid, &key);
    // Third failure: the attempt count carried over, so 4 s.
    let failed = server
        .subscription_when("retry", |s| {
            next_attempt_ms(s).is_some_and(|at| at > retry_at)
        })
        .await;
    let retry_at = next_attempt_ms(&failed).unwrap();
    let delay = retry_at - unix_ms(third.at);
    assert!(
        (3_150..=4_850).contains(&delay),
        "third retry after {delay} ms"
    );

    let fourth = hook.next().await;
    assert!(
        unix_ms(fourth.at) + 20 >= retry_at,
        "retried before its time"
    );
    fourth.verify(&kid, &key);
    let done = server
        .subscription_when("retry", |s| s["status"] == "active")
        .await;
    assert!(done.get("next_attempt_at").is_none(), "{done}");
    assert_eq!(link(&done, "feed/a")["acked_offset"], tail.as_str());
}

// ---------------------------------------------------------------------------
// Pull-wake
// ---------------------------------------------------------------------------

#[tokio::test]
async fn pull_wake_claims_are_exclusive_and_expired_leases_wake_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), false);
    server.create("wake/pool", "application/json", "").await;
    server.create("jobs/a", "text/plain", "").await;
    let sub = "__ds/subscriptions/workers";
    let spec = json!({
        "type": "pull-wake",
        "pattern": "jobs/*",
        "wake_stream": "wake/pool",
        "lease_ttl_ms": 1000,
    });
    assert_eq!(
        server.json(Method::PUT, sub, None, spec).await.0,
        StatusCode::CREATED
    );
    let claim = format!("{sub}/claim");
    let ack = format!("{sub}/ack");
    let release = format!("{sub}/release");
    let worker = |name: &str| json!({ "worker": name });

    let (status, _) = server.json(Method::POST, &claim, None, worker("w1")).await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing is pending yet");
    assert!(server.wake_events("wake/pool").await.is_empty());

    let tail = server.append("jobs/a", "job").await;
    let event = server.wake_event("wake/pool", 1).await;
    assert_eq!(event["type"], "wake");
    assert_eq!(event["subscription_id"], "workers");
    assert_eq!(event["stream"], "jobs/a");

    let (status, first) = server.json(Method::POST, &claim, None, worker("w1")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["generation"], 1);
    assert_eq!(first["lease_ttl_ms"], 1000);
    assert_eq!(link(&first, "jobs/a")["tail_offset"], tail.as_str());
    let token = first["token"].as_str().unwrap().to_owned();
    let wake_id = first["wake_id"].as_str().unwrap().to_owned();

    let (status, busy) = server.json(Method::POST, &claim, None, worker("w2")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(busy["error"]["code"], "ALREADY_CLAIMED");
    assert_eq!(busy["error"]["current_holder"], "w1");
    assert_eq!(busy["error"]["generation"], 1);

    // A heartbeat (an ack without done) extends the lease.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let beat = json!({ "wake_id": wake_id, "generation": 1 });
    let (status, body) = server.json(Method::POST, &ack, Some(&token), beat).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _) = server.json(Method::POST, &claim, None, worker("w2")).await;
    assert_eq!(status, StatusCode::CONFLICT, "the heartbeat kept the lease");

    // Without further heartbeats the lease ends, and the pending work is
    // woken again under a new generation.
    server.wake_event("wake/pool", 2).await;
    let stale = json!({
        "wake_id": wake_id,
        "generation": 1,
        "acks": [{ "stream": "jobs/a", "offset": tail }],
        "done": true,
    });
    let (status, body) = server.json(Method::POST, &ack, Some(&token), stale).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "FENCED");
    let stale_release = json!({ "wake_id": wake_id, "generation": 1 });
    let (status, _) = server
        .json(Method::POST, &release, Some(&token), stale_release)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_ne!(
        link(&server.subscription("workers").await, "jobs/a")["acked_offset"],
        tail.as_str()
    );

    let (status, second) = server.json(Method::POST, &claim, None, worker("w2")).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["generation"], 2);
    let token = second["token"].as_str().unwrap().to_owned();
    let done = json!({
        "wake_id": second["wake_id"],
        "generation": 2,
        "acks": [{ "stream": "jobs/a", "offset": tail }],
        "done": true,
    });
    let (status, body) = server.json(Method::POST, &ack, Some(&token), done).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"ok": true, "next_wake": false}))
    );
    assert_eq!(
        link(&server.subscription("workers").await, "jobs/a")["acked_offset"],
        tail.as_str()
    );

    // Releasing without acking leaves the work pending: it is woken again.
    server.append("jobs/a", "next job").await;
    server.wake_event("wake/pool", 3).await;
    let (status, third) = server.json(Method::POST, &claim, None, worker("w1")).await;
    assert_eq!(status, StatusCode::OK, "{third}");
    let token = third["token"].as_str().unwrap();
    let give_back = json!({ "wake_id": third["wake_id"], "generation": 3 });
    let (status, _) = server
        .json(Method::POST, &release, Some(token), give_back)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    server.wake_event("wake/pool", 4).await;
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ssrf_targets_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("prod"), false);
    let refused = [
        "http://localhost:9/hook",
        "http://127.0.0.1:9/hook",
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://10.1.2.3/hook",
        "https://172.16.0.1/hook",
        "https://192.168.0.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[fe80::1]/hook",
        "https://[fd12::1]/hook",
        "https://[::ffff:192.168.0.1]/hook",
        "https://metadata.google.internal/computeMetadata/v1",
        "https://0.0.0.0/hook",
        "http://hooks.example.com/hook",
        "ftp://hooks.example.com/hook",
        "https://user:secret@hooks.example.com/hook",
        "not a url",
    ];
    for url in refused {
        let spec = json!({ "type": "webhook", "pattern": "a/*", "webhook": { "url": url } });
        let (status, body) = server
            .json(Method::PUT, "__ds/subscriptions/s", None, spec)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
        assert_eq!(body["error"]["code"], "WEBHOOK_URL_REJECTED", "{url}");
        let (status, _) = server
            .json(Method::GET, "__ds/subscriptions/s", None, Value::Null)
            .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{url} created a subscription"
        );
    }
    let public = json!({
        "type": "webhook",
        "pattern": "a/*",
        "webhook": { "url": "https://hooks.example.com/hook" },
    });
    let (status, _) = server
        .json(Method::PUT, "__ds/subscriptions/s", None, public)
        .await;
    assert_eq!(status, StatusCode::CREATED);

    // The development exception covers loopback, and nothing else.
    let dev = Server::start(&dir.path().join("dev"), true);
    for (n, (url, expected)) in [
        ("http://localhost:9/hook", StatusCode::CREATED),
        ("http://127.0.0.1:9/hook", StatusCode::CREATED),
        ("https://192.168.0.1/hook", StatusCode::BAD_REQUEST),
        ("http://10.0.0.1/hook", StatusCode::BAD_REQUEST),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("__ds/subscriptions/dev-{n}");
        let spec = json!({ "type": "webhook", "pattern": "a/*", "webhook": { "url": url } });
        assert_eq!(
            dev.json(Method::PUT, &id, None, spec).await.0,
            expected,
            "{url}"
        );
    }
}

#[tokio::test]
async fn malformed_subscription_requests_are_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), false);
    let put = |body: &'static str| {
        let server = &server;
        async move {
            let headers = [("content-type", "application/json")];
            server
                .send(Method::PUT, "__ds/subscriptions/bad", &headers, body)
                .await
        }
    };
    for body in [
        "",
        "not json",
        "[]",
        r#"{"pattern":"a/*","wake_stream":"w"}"#,
        r#"{"type":"carrier-pigeon","pattern":"a/*"}"#,
        r#"{"type":"pull-wake","wake_stream":"w"}"#,
        r#"{"type":"pull-wake","pattern":"a/*"}"#,
        r#"{"type":"webhook","pattern":"a/*"}"#,
        r#"{"type":"pull-wake","pattern":"a/*","wake_stream":"w","lease_ttl_ms":999}"#,
        r#"{"type":"pull-wake","pattern":"a/*","wake_stream":"w","lease_ttl_ms":600001}"#,
        r#"{"type":"pull-wake","pattern":"a/*","wake_stream":"w","lease_ttl_ms":-5}"#,
        r#"{"type":"pull-wake","streams":["a/../b"],"wake_stream":"w"}"#,
        r#"{"type":"pull-wake","pattern":"a/*","wake_stream":"../w"}"#,
    ] {
        let (status, answer) = put(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer:?}");
        let error: Value = serde_json::from_slice(&answer).expect("a JSON error");
        assert!(error["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let (status, _) = server
        .json(Method::GET, "__ds/subscriptions/bad", None, Value::Null)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let too_big = format!(
        r#"{{"type":"pull-wake","pattern":"a/*","wake_stream":"w","description":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let headers = [("content-type", "application/json")];
    let (status, _) = server
        .send(Method::PUT, "__ds/subscriptions/bad", &headers, too_big)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    for id in ["has%20space", "semi;colon", &"x".repeat(300)] {
        let (status, _) = server
            .send(Method::GET, &format!("__ds/subscriptions/{id}"), &[], "")
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{id}");
    }
    let (status, _) = server.send(Method::GET, "__ds/nothing-here", &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.send(Method::POST, "__ds/jwks.json", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // Reserved paths are never streams.
    let (status, _) = server
        .send(
            Method::PUT,
            "__ds/mine",
            &[("content-type", "text/plain")],
            "",
        )
        .await;
    assert!(status.is_client_error(), "{status}");
}

// ---------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------

/// A stream that matched a pattern but was written to without the
/// subscription hearing of it (the process died in between) is linked when
/// the subscriptions are loaded again, with all its data pending.
#[tokio::test]
async fn streams_missed_before_a_restart_are_linked_when_loading() {
    use tower::ServiceExt;
    use tower_durable_streams::storage::{Create, StorageRequest};
    use tower_durable_streams::stream::{ContentType, StreamConfig};
    use tower_durable_streams::subscription::Subscriptions;
    use tower_durable_streams::{DurableStreamsService, MemoryStorage};

    let storage = MemoryStorage::new();
    let request = |method: Method, path: &str, body: &str| {
        Request::builder()
            .method(method)
            .uri(format!("{PREFIX}/{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("a request")
    };
    let service = |storage: MemoryStorage| {
        DurableStreamsService::new(storage)
            .prefix(PREFIX)
            .subscriptions(Subscriptions::new())
    };
    let before = service(storage.clone());
    let spec = r#"{"type":"pull-wake","pattern":"jobs/*","wake_stream":"wake"}"#;
    let created = before
        .oneshot(request(Method::PUT, "__ds/subscriptions/s", spec))
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);

    // Written to storage directly: no service saw it.
    let create = Create {
        path: "jobs/missed".into(),
        config: StreamConfig {
            content_type: ContentType::parse("text/plain"),
            ..StreamConfig::default()
        },
        body: Bytes::from_static(b"work"),
        now: SystemTime::now(),
    };
    storage
        .clone()
        .oneshot(StorageRequest::Create(create))
        .await
        .unwrap();

    let after = service(storage);
    let response = after
        .oneshot(request(Method::GET, "__ds/subscriptions/s", ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    let missed = link(&body, "jobs/missed");
    assert_eq!(missed["link_type"], "glob");
    assert_eq!(missed["acked_offset"], "0000000000000000_0000000000000000");
}
