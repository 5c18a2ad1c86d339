//! The upstream client conformance cases (`../shared/reference/client-conformance`,
//! YAML), run against this crate's client and server.
//!
//! Upstream, a Node runner drives a client through an adapter process; that
//! runner is not published. This file is both halves for the Rust client:
//! the runner reads each case, resolves its `${variables}`, runs its
//! operations and checks each `expect` as the upstream runner does; the
//! adapter performs each operation with [`tower_durable_streams::client`],
//! shaping its result as the upstream TypeScript adapter does (status,
//! offset, chunks, error code). Each case gets a server of its own: this
//! crate's stack with a test-only fault layer in front, which serves the
//! cases' `inject-error` actions at `/_test/inject-error`.
//!
//! Every case runs; the test fails if any case fails. Cases that exercise
//! something the Rust client does not have (checked below, with the
//! reason) are reported as skipped, by name. `maxInFlight` is ignored: the
//! Rust idempotent producer keeps one batch in flight, so those cases check
//! that everything arrives, in order, without pipelining.
//!
//! ```text
//! cargo test --all-features --test client_conformance -- --nocapture
//! DS_CASE=autoclaim cargo test ...     # only the cases whose id has it
//! ```

#![cfg(feature = "client")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_durable_streams::client::{
    self, Backoff, Client, CreateOptions, ErrorKind, Live, ProducerOptions, ReadOptions,
};
use tower_durable_streams::{
    CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn cases_dir() -> PathBuf {
    let shared = std::env::var_os("DS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    shared.join("reference/client-conformance")
}

// ---------------------------------------------------------------------------
// The server, with injected faults
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Fault {
    path: String,
    method: Option<String>,
    count: u64,
    status: Option<u16>,
    retry_after: Option<u64>,
    delay_ms: u64,
    drop_connection: bool,
    truncate_body_bytes: Option<usize>,
    corrupt_body: bool,
    sse_event: Option<(String, String)>,
}

impl Fault {
    fn parse(v: &Value) -> Self {
        Self {
            path: v["path"].as_str().unwrap_or_default().to_owned(),
            method: v["method"].as_str().map(str::to_ascii_uppercase),
            count: v["count"].as_u64().unwrap_or(1),
            status: v["status"].as_u64().map(|s| s as u16),
            retry_after: v["retryAfter"].as_u64(),
            delay_ms: v["delayMs"].as_u64().unwrap_or(0) + v["jitterMs"].as_u64().unwrap_or(0) / 2,
            drop_connection: v["dropConnection"].as_bool().unwrap_or(false),
            truncate_body_bytes: v["truncateBodyBytes"].as_u64().map(|n| n as usize),
            corrupt_body: v["corruptBody"].as_bool().unwrap_or(false),
            sse_event: v["injectSseEvent"].as_object().map(|e| {
                (
                    e["eventType"].as_str().unwrap_or_default().to_owned(),
                    e["data"].as_str().unwrap_or_default().to_owned(),
                )
            }),
        }
    }
}

#[derive(Clone, Default)]
struct Faults(Arc<Mutex<Vec<Fault>>>);

impl Faults {
    fn take(&self, path: &str, method: &Method) -> Option<Fault> {
        let mut faults = self.0.lock().unwrap();
        let at = faults.iter().position(|f| {
            f.count > 0
                && f.path == path
                && f.method.as_deref().is_none_or(|m| m == method.as_str())
        })?;
        faults[at].count -= 1;
        let fault = faults[at].clone();
        if faults[at].count == 0 {
            faults.remove(at);
        }
        Some(fault)
    }
}

async fn serve() -> (SocketAddr, Faults) {
    let streams = ServiceBuilder::new()
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new().connection_lifetime(Duration::from_secs(60)))
        .layer(LongPollLayer::new().timeout(Duration::from_millis(500)))
        .service(DurableStreamsService::new(MemoryStorage::new()));
    let faults = Faults::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = faults.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let streams = streams.clone();
            let faults = shared.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                handle(request, streams.clone(), faults.clone())
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, faults)
}

async fn handle<S, B>(
    request: Request<Incoming>,
    streams: S,
    faults: Faults,
) -> Result<Response<Body>, std::io::Error>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = request.uri().path().to_owned();
    if path == "/_test/inject-error" {
        if request.method() == Method::DELETE {
            faults.0.lock().unwrap().clear();
        } else {
            let body = request
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?;
            let fault = Fault::parse(&serde_json::from_slice(&body.to_bytes()).unwrap_or_default());
            faults.0.lock().unwrap().push(fault);
        }
        return Ok(Response::new(full("ok")));
    }
    let fault = faults.take(&path, request.method());
    if std::env::var_os("DS_CASE_TRACE").is_some() {
        eprintln!("{} {} fault={fault:?}", request.method(), request.uri());
    }
    if let Some(fault) = &fault {
        if fault.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
        }
        if fault.drop_connection {
            return Err(std::io::Error::other("injected: drop the connection"));
        }
        if let Some(status) = fault.status {
            let mut response = Response::new(full("injected error"));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(after) = fault.retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", after.to_string().parse().unwrap());
            }
            return Ok(response);
        }
    }
    let response = streams
        .oneshot(request)
        .await
        .unwrap_or_else(|e| match e {});
    let (parts, body) = response.into_parts();
    let body: Body = body.map_err(Into::into).boxed();
    let Some(fault) = fault else {
        return Ok(Response::from_parts(parts, body));
    };
    if let Some((event, data)) = fault.sse_event {
        let injected = Bytes::from(format!("event: {event}\ndata: {data}\n\n"));
        let first = futures_util::stream::once(async move { Ok(Frame::data(injected)) });
        let rest = http_body_util::BodyStream::new(body);
        use futures_util::StreamExt as _;
        let stream = first.chain(rest);
        return Ok(Response::from_parts(
            parts,
            BodyExt::boxed(StreamBody::new(stream)),
        ));
    }
    let mut bytes = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes()
        .to_vec();
    if let Some(n) = fault.truncate_body_bytes {
        bytes.truncate(n);
    }
    if fault.corrupt_body {
        for b in bytes.iter_mut().step_by(3) {
            *b = b'#';
        }
    }
    let mut parts = parts;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(bytes)))
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

// ---------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------

enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

struct Context {
    addr: SocketAddr,
    vars: HashMap<String, Value>,
    content_types: HashMap<String, String>,
    dynamic: Vec<(String, String, u64)>,
    producers: HashMap<(String, String, u64), client::IdempotentProducer>,
    background: HashMap<String, tokio::task::JoinHandle<Value>>,
    raw: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

static STREAMS: AtomicU64 = AtomicU64::new(0);

impl Context {
    fn resolve(&self, text: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find('}').ok_or("unclosed ${")? + start;
            let expr = &rest[start + 2..end];
            if expr == "randomUUID" {
                out.push_str(&format!(
                    "{:016x}",
                    STREAMS.fetch_add(1, Ordering::Relaxed) ^ 0x5eed
                ));
            } else {
                let mut parts = expr.split('.');
                let name = parts.next().unwrap_or_default();
                let mut value = self
                    .vars
                    .get(name)
                    .ok_or(format!("undefined variable {name}"))?
                    .clone();
                for part in parts {
                    value = value.get(part).cloned().unwrap_or(Value::Null);
                }
                match value {
                    Value::String(s) => out.push_str(&s),
                    Value::Null => {}
                    other => out.push_str(&other.to_string()),
                }
            }
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn str_field(&self, op: &Value, name: &str) -> Result<Option<String>, String> {
        op.get(name)
            .and_then(Value::as_str)
            .map(|s| self.resolve(s))
            .transpose()
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with the operation's headers and the dynamic headers, which
    /// are computed once per operation; returns what was sent of them.
    fn client(&mut self, op: &Value) -> (Client, Value) {
        let mut builder = Client::builder(self.base()).backoff(
            Backoff::new()
                .initial(Duration::from_millis(10))
                .max(Duration::from_millis(200))
                .retries(Some(5)),
        );
        let mut sent = serde_json::Map::new();
        for (name, kind, counter) in &mut self.dynamic {
            *counter += 1;
            let value = match kind.as_str() {
                "counter" => counter.to_string(),
                "timestamp" => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    .to_string(),
                token => token.to_owned(),
            };
            builder = builder.header(name, &value);
            sent.insert(name.clone(), json!(value));
        }
        if let Some(headers) = op.get("headers").and_then(Value::as_object) {
            for (name, value) in headers {
                builder = builder.header(name, value.as_str().unwrap_or_default());
            }
        }
        (builder.build().expect("a client"), Value::Object(sent))
    }

    fn content_type(&self, path: &str) -> String {
        self.content_types
            .get(path)
            .cloned()
            .unwrap_or_else(|| "application/octet-stream".to_owned())
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: String,
    ) -> Result<Response<Incoming>, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base()));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.raw.request(request).await.map_err(|e| e.to_string())
    }
}

/// The upstream adapter's error result for a client error.
fn error_result(kind: &str, error: &client::Error) -> Value {
    let message = error.to_string();
    let (code, status) = match error.kind() {
        ErrorKind::NotFound => ("NOT_FOUND", error.status()),
        ErrorKind::Closed => ("STREAM_CLOSED", error.status()),
        ErrorKind::Conflict if message.to_lowercase().contains("seq") => {
            ("SEQUENCE_CONFLICT", error.status())
        }
        ErrorKind::Conflict => ("CONFLICT", error.status()),
        ErrorKind::SequenceGap { .. } => ("SEQUENCE_CONFLICT", error.status()),
        ErrorKind::BadRequest => ("INVALID_OFFSET", error.status()),
        ErrorKind::Protocol => ("PARSE_ERROR", None),
        ErrorKind::Transport => ("NETWORK_ERROR", None),
        ErrorKind::InvalidInput => ("INVALID_ARGUMENT", None),
        _ => ("UNEXPECTED_STATUS", error.status()),
    };
    json!({
        "type": "error",
        "success": false,
        "commandType": kind,
        "status": status.map(|s| s.as_u16()),
        "errorCode": code,
        "message": message,
    })
}

/// Why a case cannot run with this client, if it cannot.
fn unsupported(case: &Value) -> Option<String> {
    let requires = case["requires"].as_array().cloned().unwrap_or_default();
    for op in ["setup", "operations"]
        .iter()
        .flat_map(|k| case[*k].as_array().cloned().unwrap_or_default())
    {
        match op["action"].as_str().unwrap_or_default() {
            "validate" => {
                return Some(
                    "validate checks option objects of the TypeScript client (negative retry counts, \
                     zero batch sizes); the Rust client's types (u32, Duration) cannot hold those values"
                        .into(),
                )
            }
            "set-dynamic-param" => return Some("the Rust client adds no query parameters of its own".into()),
            _ => {}
        }
    }
    let id = case["id"].as_str().unwrap_or_default();
    if id == "sse-strips-single-leading-space" {
        return Some(
            "expects the reference server's framing, `data:` with no space before the payload, \
             so that the client's one-space strip eats a byte of it; this crate's server writes \
             `data: ` and the payload arrives exactly (tests/client.rs checks the strip itself)"
                .into(),
        );
    }
    if id.starts_with("offset-now-") && id.contains("longpoll") {
        return Some(
            "expects the HTTP status (204) of a long-poll; the Rust reader reports a timed-out \
             long-poll as an empty, up-to-date chunk, not by status"
                .into(),
        );
    }
    if requires.iter().any(|r| r == "strictZeroValidation") {
        return Some("strictZeroValidation is a TypeScript client option".into());
    }
    None
}

async fn run_case(case: &Value) -> Outcome {
    if let Some(why) = unsupported(case) {
        return Outcome::Skip(why);
    }
    // Cases upstream skips for one of its own clients (`skip: "Swift
    // implementation broken"`) run here all the same.
    // A server of its own, so that its faults and paths meet no other case.
    let (addr, _faults) = serve().await;
    let mut ctx = Context {
        addr,
        vars: HashMap::new(),
        content_types: HashMap::new(),
        dynamic: Vec::new(),
        producers: HashMap::new(),
        background: HashMap::new(),
        raw: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http(),
    };
    for phase in ["setup", "operations", "cleanup"] {
        for (i, op) in case[phase]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let action = op["action"].as_str().unwrap_or_default().to_owned();
            let result =
                match tokio::time::timeout(Duration::from_secs(30), execute(op, &mut ctx)).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(e)) => return Outcome::Fail(format!("{phase}[{i}] {action}: {e}")),
                    Err(_) => return Outcome::Fail(format!("{phase}[{i}] {action}: timed out")),
                };
            if let (Some(result), Some(expect)) = (&result, op.get("expect")) {
                if let Some(problem) = validate(result, expect) {
                    return Outcome::Fail(format!(
                        "{phase}[{i}] {action}: {problem}; result {result}"
                    ));
                }
            }
        }
    }
    Outcome::Pass
}

/// Runs one operation; `Ok(None)` for operations with no result.
async fn execute(op: &Value, ctx: &mut Context) -> Result<Option<Value>, String> {
    let action = op["action"].as_str().unwrap_or_default();
    let path = ctx.str_field(op, "path")?;
    let expect = op.get("expect").cloned().unwrap_or(Value::Null);
    let result = match action {
        "create" => {
            let path = path.unwrap_or_else(|| {
                format!("/test-stream-{}", STREAMS.fetch_add(1, Ordering::Relaxed))
            });
            if let Some(name) = op["as"].as_str() {
                ctx.vars.insert(name.to_owned(), json!(path));
            }
            let content_type = op["contentType"]
                .as_str()
                .unwrap_or("application/octet-stream")
                .to_owned();
            let mut options = CreateOptions::new().content_type(&content_type);
            if let Some(ttl) = op["ttlSeconds"].as_u64() {
                options = options.ttl(ttl);
            }
            if let Some(at) = op["expiresAt"].as_str() {
                let at =
                    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                        .map_err(|e| e.to_string())?;
                options = options.expires_at(at.into());
            }
            if op["closed"].as_bool() == Some(true) {
                options = options.closed(true);
            }
            if let Some(data) = ctx.str_field(op, "data")? {
                options = options.body(data);
            }
            let (client, _) = ctx.client(op);
            match client.stream(&path).create(options).await {
                Ok(created) => {
                    ctx.content_types.insert(path, content_type);
                    json!({
                        "type": "create", "success": true,
                        "status": if created.created { 201 } else { 200 },
                        "offset": created.next_offset,
                    })
                }
                Err(e) => error_result("create", &e),
            }
        }
        "connect" => {
            let path = path.unwrap_or_default();
            let (client, _) = ctx.client(op);
            match client.stream(&path).head().await {
                Ok(head) => {
                    if let Some(ct) = head.content_type {
                        ctx.content_types.insert(path, ct);
                    }
                    json!({"type": "connect", "success": true, "status": 200, "offset": head.next_offset})
                }
                Err(e) => error_result("connect", &e),
            }
        }
        "append" | "append-batch" => {
            let path = path.unwrap_or_default();
            let items: Vec<Value> = if action == "append" {
                vec![op.clone()]
            } else {
                op["items"].as_array().cloned().unwrap_or_default()
            };
            let (client, sent) = ctx.client(op);
            let stream = client.stream(&path);
            let content_type = ctx.content_type(&path);
            let mut last = Value::Null;
            let mut all = true;
            for item in items {
                let body: Bytes = if let Some(json) = item.get("json") {
                    Bytes::from(json.to_string())
                } else if let Some(b64) = item["binaryData"].as_str() {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| e.to_string())?
                        .into()
                } else {
                    Bytes::from(ctx.str_field(&item, "data")?.unwrap_or_default())
                };
                let appended = match item.get("seq") {
                    Some(seq) => {
                        let seq = seq.as_str().map_or_else(|| seq.to_string(), str::to_owned);
                        stream.append_seq(&content_type, &seq, body).await
                    }
                    None => stream.append_with(&content_type, body).await,
                };
                last = match appended {
                    Ok(a) => json!({
                        "type": "append", "success": true, "status": 200,
                        "offset": a.next_offset, "headersSent": sent,
                    }),
                    Err(e) => {
                        all = false;
                        error_result("append", &e)
                    }
                };
            }
            if action == "append-batch" {
                json!({"type": "append", "success": all, "status": if all { 200 } else { 207 }})
            } else {
                if let (Some(name), Some(offset)) =
                    (expect["storeOffsetAs"].as_str(), last.get("offset"))
                {
                    ctx.vars.insert(name.to_owned(), offset.clone());
                }
                last
            }
        }
        "read" => {
            let path = path.unwrap_or_default();
            let offset = ctx.str_field(op, "offset")?;
            let (client, sent) = ctx.client(op);
            let stream = client.stream(&path);
            let json = ctx
                .content_types
                .get(&path)
                .is_some_and(|ct| ct.contains("application/json"));
            let read = Read {
                live: match &op["live"] {
                    Value::String(s) if s == "long-poll" => Live::LongPoll,
                    Value::String(s) if s == "sse" => Live::Sse,
                    Value::Bool(true) => Live::Auto,
                    _ => Live::Off,
                },
                offset,
                timeout: Duration::from_millis(op["timeoutMs"].as_u64().unwrap_or(5000)),
                max_chunks: op["maxChunks"].as_u64().unwrap_or(100) as usize,
                wait_for_up_to_date: op["waitForUpToDate"].as_bool().unwrap_or(false),
                json,
                sent,
            };
            if op["background"].as_bool() == Some(true) {
                if let Some(name) = op["as"].as_str() {
                    let task = tokio::spawn(read.run(stream));
                    ctx.background.insert(name.to_owned(), task);
                    return Ok(None);
                }
            }
            let result = read.run(stream).await;
            store_read(ctx, &expect, &result);
            result
        }
        "await" => {
            let name = op["ref"].as_str().unwrap_or_default();
            let task = ctx
                .background
                .remove(name)
                .ok_or(format!("no background read {name}"))?;
            let result = task.await.map_err(|e| e.to_string())?;
            store_read(ctx, &expect, &result);
            result
        }
        "head" => {
            let path = path.unwrap_or_default();
            let (client, _) = ctx.client(op);
            let result = match client.stream(&path).head().await {
                Ok(head) => {
                    if let Some(ct) = &head.content_type {
                        ctx.content_types.insert(path, ct.clone());
                    }
                    json!({
                        "type": "head", "success": true, "status": 200, "offset": head.next_offset,
                        "contentType": head.content_type, "streamClosed": head.closed,
                    })
                }
                Err(e) => error_result("head", &e),
            };
            if let Some(name) = expect["storeAs"].as_str() {
                ctx.vars.insert(name.to_owned(), result.clone());
            }
            result
        }
        "delete" => {
            let path = path.unwrap_or_default();
            let (client, _) = ctx.client(op);
            match client.stream(&path).delete().await {
                Ok(()) => json!({"type": "delete", "success": true, "status": 200}),
                Err(e) => error_result("delete", &e),
            }
        }
        "close" => {
            let path = path.unwrap_or_default();
            let (client, _) = ctx.client(op);
            let stream = client.stream(&path);
            let content_type = op["contentType"]
                .as_str()
                .map_or_else(|| ctx.content_type(&path), str::to_owned);
            let closed = match ctx.str_field(op, "data")? {
                Some(data) => stream.close_with(&content_type, data).await,
                None => stream.close().await,
            };
            match closed {
                Ok(c) => json!({"type": "close", "success": true, "finalOffset": c.next_offset}),
                Err(e) => error_result("close", &e),
            }
        }
        "server-close" => {
            let path = path.unwrap_or_default();
            let mut headers = vec![("stream-closed".to_owned(), "true".to_owned())];
            let data = ctx.str_field(op, "data")?;
            if let (Some(_), Some(ct)) = (&data, op["contentType"].as_str()) {
                headers.push(("content-type".into(), ct.into()));
            }
            let response = ctx
                .raw(Method::POST, &path, &headers, data.unwrap_or_default())
                .await?;
            let offset = response
                .headers()
                .get("stream-next-offset")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            json!({"type": "close", "success": true, "finalOffset": offset})
        }
        "server-append" => {
            let path = path.unwrap_or_default();
            let data = ctx.str_field(op, "data")?.unwrap_or_default();
            let head = ctx.raw(Method::HEAD, &path, &[], String::new()).await?;
            let content_type = head
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            let mut headers = vec![("content-type".to_owned(), content_type)];
            if let Some(extra) = op.get("headers").and_then(Value::as_object) {
                for (name, value) in extra {
                    headers.push((name.clone(), value.as_str().unwrap_or_default().to_owned()));
                }
            }
            for (field, header) in [
                ("producerId", "producer-id"),
                ("producerEpoch", "producer-epoch"),
                ("producerSeq", "producer-seq"),
            ] {
                if let Some(v) = op.get(field) {
                    headers.push((
                        header.into(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    ));
                }
            }
            let response = ctx.raw(Method::POST, &path, &headers, data).await?;
            let h = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let n = |name: &str| h(name).and_then(|v| v.parse::<u64>().ok());
            let status = response.status().as_u16();
            if let (Some(name), Some(offset)) =
                (expect["storeOffsetAs"].as_str(), h("stream-next-offset"))
            {
                ctx.vars.insert(name.to_owned(), json!(offset));
            }
            json!({
                "type": "append", "success": true, "status": status, "offset": h("stream-next-offset"),
                "duplicate": status == 204, "producerEpoch": n("producer-epoch"), "producerSeq": n("producer-seq"),
                "producerExpectedSeq": n("producer-expected-seq"), "producerReceivedSeq": n("producer-received-seq"),
            })
        }
        "idempotent-append" | "idempotent-append-batch" | "idempotent-close" => {
            let path = path.unwrap_or_default();
            let id = op["producerId"].as_str().unwrap_or_default().to_owned();
            let epoch = op["epoch"].as_u64().unwrap_or(0);
            let key = (path.clone(), id.clone(), epoch);
            if !ctx.producers.contains_key(&key) {
                let (client, _) = ctx.client(op);
                let options = ProducerOptions::new()
                    .content_type(ctx.content_type(&path))
                    .auto_claim(op["autoClaim"].as_bool().unwrap_or(false));
                let producer = client.stream(&path).idempotent_producer(id, epoch, options);
                ctx.producers.insert(key.clone(), producer);
            }
            let outcome = match action {
                "idempotent-close" => {
                    let producer = ctx.producers.remove(&key).expect("inserted above");
                    let data = ctx.str_field(op, "data")?.map(Bytes::from);
                    producer.close(data).await.map(|c| Some(c.next_offset))
                }
                _ => {
                    let producer = &ctx.producers[&key];
                    let items: Vec<String> = if action == "idempotent-append" {
                        vec![ctx.str_field(op, "data")?.unwrap_or_default()]
                    } else {
                        op["items"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .iter()
                            .map(|i| {
                                i["data"]
                                    .as_str()
                                    .map(|s| ctx.resolve(s))
                                    .unwrap_or(Ok(String::new()))
                            })
                            .collect::<Result<_, _>>()?
                    };
                    let mut outcome: Result<(), client::Error> = Ok(());
                    for item in items {
                        if let Err(e) = producer.append(item).await {
                            outcome = Err(e);
                            break;
                        }
                    }
                    match outcome {
                        Ok(()) => producer.flush().await.map(|()| None),
                        Err(e) => Err(e),
                    }
                }
            };
            if action == "idempotent-append-batch" {
                ctx.producers.remove(&key);
            }
            match outcome {
                Ok(offset) => {
                    json!({"type": action, "success": true, "status": 200, "finalOffset": offset})
                }
                Err(e) => {
                    ctx.producers.remove(&key);
                    error_result(action, &e)
                }
            }
        }
        "idempotent-detach" => {
            // The Rust producer detaches by being dropped, after it has
            // sent what it holds; the stream stays open.
            let path = path.unwrap_or_default();
            let id = op["producerId"].as_str().unwrap_or_default().to_owned();
            let key = (path, id, op["epoch"].as_u64().unwrap_or(0));
            let flushed = match ctx.producers.remove(&key) {
                Some(producer) => producer.flush().await,
                None => Ok(()),
            };
            match flushed {
                Ok(()) => json!({"type": "idempotent-detach", "success": true, "status": 200}),
                Err(e) => error_result("idempotent-detach", &e),
            }
        }
        "wait" => {
            tokio::time::sleep(Duration::from_millis(op["ms"].as_u64().unwrap_or(0))).await;
            return Ok(None);
        }
        "set" => {
            let value = ctx.resolve(op["value"].as_str().unwrap_or_default())?;
            ctx.vars.insert(
                op["name"].as_str().unwrap_or_default().to_owned(),
                json!(value),
            );
            return Ok(None);
        }
        "assert" => {
            assert_op(op, ctx)?;
            return Ok(None);
        }
        "inject-error" => {
            let mut fault = op.clone();
            fault["path"] = json!(path.unwrap_or_default());
            let response = ctx
                .raw(Method::POST, "/_test/inject-error", &[], fault.to_string())
                .await?;
            if !response.status().is_success() {
                return Err("could not inject a fault".into());
            }
            return Ok(None);
        }
        "clear-errors" => {
            ctx.raw(Method::DELETE, "/_test/inject-error", &[], String::new())
                .await?;
            return Ok(None);
        }
        "set-dynamic-header" => {
            let name = op["name"].as_str().unwrap_or_default().to_owned();
            let kind = op["valueType"].as_str().unwrap_or_default();
            let (kind, start) = match kind {
                "counter" => (
                    "counter".to_owned(),
                    op["initialValue"]
                        .as_str()
                        .and_then(|v| v.parse::<u64>().ok())
                        .map_or(0, |v| v.saturating_sub(1)),
                ),
                "timestamp" => ("timestamp".to_owned(), 0),
                _ => (op["initialValue"].as_str().unwrap_or("token").to_owned(), 0),
            };
            ctx.dynamic.push((name, kind, start));
            json!({"type": "set-dynamic-header", "success": true})
        }
        "clear-dynamic" => {
            ctx.dynamic.clear();
            json!({"type": "clear-dynamic", "success": true})
        }
        other => return Err(format!("unknown action {other}")),
    };
    Ok(Some(result))
}

fn store_read(ctx: &mut Context, expect: &Value, result: &Value) {
    if result["success"] != true {
        return;
    }
    if let Some(name) = expect["storeOffsetAs"].as_str() {
        ctx.vars.insert(name.to_owned(), result["offset"].clone());
    }
    if let Some(name) = expect["storeDataAs"].as_str() {
        ctx.vars.insert(name.to_owned(), json!(joined(result)));
    }
}

fn assert_op(op: &Value, ctx: &Context) -> Result<(), String> {
    let message = op["message"].as_str();
    let pair = |v: &Value, a: &str, b: &str| -> Result<(String, String), String> {
        Ok((
            ctx.resolve(v[a].as_str().unwrap_or_default())?,
            ctx.resolve(v[b].as_str().unwrap_or_default())?,
        ))
    };
    let fail = |default: String| Err(message.map_or(default, str::to_owned));
    if let Some(v) = op.get("equals") {
        let (l, r) = pair(v, "left", "right")?;
        if l != r {
            return fail(format!("expected {l:?} to equal {r:?}"));
        }
    }
    if let Some(v) = op.get("notEquals") {
        let (l, r) = pair(v, "left", "right")?;
        if l == r {
            return fail(format!("expected {l:?} to differ from {r:?}"));
        }
    }
    if let Some(v) = op.get("contains") {
        let (value, part) = pair(v, "value", "substring")?;
        if !value.contains(&part) {
            return fail(format!("expected {value:?} to contain {part:?}"));
        }
    }
    if let Some(v) = op.get("matches") {
        let value = ctx.resolve(v["value"].as_str().unwrap_or_default())?;
        let pattern = v["pattern"].as_str().unwrap_or_default();
        let regex = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
        if !regex.is_match(&value) {
            return fail(format!("expected {value:?} to match /{pattern}/"));
        }
    }
    Ok(())
}

/// A read, as the upstream adapter performs it.
struct Read {
    live: Live,
    offset: Option<String>,
    timeout: Duration,
    max_chunks: usize,
    wait_for_up_to_date: bool,
    json: bool,
    sent: Value,
}

impl Read {
    async fn run(self, stream: client::DurableStream) -> Value {
        let start = self.offset.clone().unwrap_or_else(|| "-1".into());
        let mut reader = stream.read(ReadOptions::new().offset(start.clone()).live(self.live));
        let mut chunks: Vec<(String, String)> = Vec::new();
        let mut offset = start;
        let mut up_to_date = false;
        let mut closed = false;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, reader.next_chunk()).await {
                Err(_) => {
                    // Timed out: caught up with what there was.
                    up_to_date = true;
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return error_result("read", &e),
                Ok(Some(Ok(chunk))) => chunk,
            };
            if !next.is_empty() {
                chunks.push((self.data(&next), next.next_offset.clone()));
            }
            offset.clone_from(&next.next_offset);
            up_to_date = next.up_to_date;
            closed = next.closed;
            if self.live != Live::Off
                && ((self.wait_for_up_to_date && up_to_date) || chunks.len() >= self.max_chunks)
            {
                break;
            }
        }
        if self.live == Live::Off && chunks.len() > 1 {
            // The upstream adapter reads a catch-up as one body.
            let data = if self.json {
                let items: Vec<String> = chunks
                    .iter()
                    .map(|(d, _)| {
                        let d = d.trim();
                        let d = d.strip_prefix('[').unwrap_or(d);
                        d.strip_suffix(']').unwrap_or(d).to_owned()
                    })
                    .filter(|s| !s.is_empty())
                    .collect();
                format!("[{}]", items.join(","))
            } else {
                chunks.iter().map(|(d, _)| d.as_str()).collect()
            };
            chunks = vec![(data, offset.clone())];
        }
        json!({
            "type": "read", "success": true, "status": 200,
            "chunks": chunks.iter().map(|(data, offset)| json!({"data": data, "offset": offset})).collect::<Vec<_>>(),
            "offset": offset, "upToDate": up_to_date, "streamClosed": closed, "headersSent": self.sent,
        })
    }

    fn data(&self, chunk: &client::Chunk) -> String {
        if self.json {
            // As the upstream adapter's JSON.stringify: compact, in order.
            compact(&String::from_utf8_lossy(&chunk.data))
        } else {
            String::from_utf8_lossy(&chunk.data).into_owned()
        }
    }
}

/// JSON text without the white space outside strings.
fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

fn joined(result: &Value) -> String {
    result["chunks"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["data"].as_str()).collect())
        .unwrap_or_default()
}

/// The upstream runner's checks of one result.
fn validate(result: &Value, expect: &Value) -> Option<String> {
    let success = result["success"] == true;
    let kind = result["type"].as_str().unwrap_or_default();
    let is_read = success && kind == "read";
    if let Some(status) = expect.get("status") {
        if result.get("status").is_some_and(|s| !s.is_null()) && &result["status"] != status {
            return Some(format!(
                "expected status {status}, got {}",
                result["status"]
            ));
        }
        if !success && result["status"].is_null() && status.as_u64().is_some_and(|s| s < 300) {
            return Some(format!("expected status {status}, got an error"));
        }
    }
    if let Some(code) = expect.get("errorCode") {
        if success {
            return Some(format!("expected error {code}, but it succeeded"));
        }
        if &result["errorCode"] != code {
            return Some(format!(
                "expected error code {code}, got {}",
                result["errorCode"]
            ));
        }
    }
    if let Some(parts) = expect.get("messageContains").and_then(Value::as_array) {
        if success {
            return Some("expected an error message, but it succeeded".into());
        }
        let message = result["message"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        let missing: Vec<_> = parts
            .iter()
            .filter_map(Value::as_str)
            .filter(|p| !message.contains(&p.to_lowercase()))
            .collect();
        if !missing.is_empty() {
            return Some(format!("message lacks {missing:?}"));
        }
    }
    if is_read {
        let data = joined(result);
        if let Some(want) = expect["data"].as_str() {
            if data != want {
                return Some(format!("expected data {want:?}, got {data:?}"));
            }
        }
        if let Some(want) = expect["dataContains"].as_str() {
            if !data.contains(want) {
                return Some(format!("expected data to contain {want:?}"));
            }
        }
        if let Some(all) = expect["dataContainsAll"].as_array() {
            if let Some(missing) = all
                .iter()
                .filter_map(Value::as_str)
                .find(|s| !data.contains(*s))
            {
                return Some(format!("expected data to contain {missing:?}"));
            }
        }
        let chunks = result["chunks"].as_array().cloned().unwrap_or_default();
        if let Some(exact) = expect["dataExact"].as_array() {
            let got: Vec<&str> = chunks.iter().filter_map(|c| c["data"].as_str()).collect();
            let want: Vec<&str> = exact.iter().filter_map(Value::as_str).collect();
            if got != want {
                return Some(format!("expected messages {want:?}, got {got:?}"));
            }
        }
        if let Some(n) = expect["chunkCount"].as_u64() {
            if chunks.len() as u64 != n {
                return Some(format!("expected {n} chunks, got {}", chunks.len()));
            }
        }
        if let Some(n) = expect["minChunks"].as_u64() {
            if (chunks.len() as u64) < n {
                return Some(format!(
                    "expected at least {n} chunks, got {}",
                    chunks.len()
                ));
            }
        }
        if let Some(n) = expect["maxChunks"].as_u64() {
            if chunks.len() as u64 > n {
                return Some(format!("expected at most {n} chunks, got {}", chunks.len()));
            }
        }
        if let Some(want) = expect.get("upToDate") {
            if &result["upToDate"] != want {
                return Some(format!(
                    "expected upToDate={want}, got {}",
                    result["upToDate"]
                ));
            }
        }
    }
    if let Some(want) = expect.get("streamClosed") {
        if success && (kind == "read" || kind == "head") && &result["streamClosed"] != want {
            return Some(format!(
                "expected streamClosed={want}, got {}",
                result["streamClosed"]
            ));
        }
    }
    if let Some(want) = expect.get("finalOffset") {
        if success && kind == "close" && &result["finalOffset"] != want {
            return Some(format!(
                "expected finalOffset {want}, got {}",
                result["finalOffset"]
            ));
        }
    }
    if success && kind == "head" {
        if let Some(want) = expect.get("contentType") {
            if &result["contentType"] != want {
                return Some(format!(
                    "expected contentType {want}, got {}",
                    result["contentType"]
                ));
            }
        }
        if let Some(want) = expect["hasOffset"].as_bool() {
            let has = result["offset"].as_str().is_some_and(|o| !o.is_empty());
            if has != want {
                return Some(format!("expected hasOffset={want}"));
            }
        }
    }
    if let Some(want) = expect.get("headersSent").and_then(Value::as_object) {
        for (name, value) in want {
            if &result["headersSent"][name] != value {
                return Some(format!(
                    "expected header {name}={value} sent, got {}",
                    result["headersSent"][name]
                ));
            }
        }
    }
    if success && kind == "append" {
        for field in [
            "duplicate",
            "producerEpoch",
            "producerSeq",
            "producerExpectedSeq",
            "producerReceivedSeq",
        ] {
            if let Some(want) = expect.get(field) {
                if &result[field] != want {
                    return Some(format!("expected {field}={want}, got {}", result[field]));
                }
            }
        }
    }
    if let Some(want) = expect["allSucceed"].as_bool() {
        if want != success {
            return Some(format!("expected allSucceed={want}"));
        }
    }
    None
}

// ---------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_conformance_cases() {
    let dir = cases_dir();
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    let (mut passed, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let suite: Value = serde_json::to_value(yaml).unwrap();
        let suite_id = suite["id"].as_str().unwrap_or_default().to_owned();
        // DS_CASE=substring runs only the cases whose id contains it.
        let only = std::env::var("DS_CASE").unwrap_or_default();
        let cases: Vec<Value> = suite["tests"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                format!("{suite_id}/{}", c["id"].as_str().unwrap_or_default()).contains(&only)
            })
            .collect();
        // Cases run concurrently within a file, each on streams of its own.
        let runs = cases.iter().map(|case| {
            let case = case.clone();
            let suite_id = suite_id.clone();
            async move {
                let id = format!("{suite_id}/{}", case["id"].as_str().unwrap_or_default());
                (id, run_case(&case).await)
            }
        });
        for (id, outcome) in futures_util::future::join_all(runs).await {
            match outcome {
                Outcome::Pass => passed.push(id),
                Outcome::Fail(why) => failed.push(format!("{id}: {why}")),
                Outcome::Skip(why) => skipped.push(format!("{id}: {why}")),
            }
        }
    }
    for skip in &skipped {
        println!("skipped {skip}");
    }
    for failure in &failed {
        println!("FAILED {failure}");
    }
    println!(
        "client conformance: {} passed, {} failed, {} skipped, of {} cases in {} files",
        passed.len(),
        failed.len(),
        skipped.len(),
        passed.len() + failed.len() + skipped.len(),
        files.len()
    );
    assert!(
        failed.is_empty(),
        "{} client conformance cases failed",
        failed.len()
    );
    if std::env::var_os("DS_CASE").is_none() {
        assert!(passed.len() > 200, "too few cases ran: {}", passed.len());
    }
}
