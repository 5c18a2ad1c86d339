//! The full stack over `MemoryStorage`, inside the tower-http middleware an
//! application already runs: `TraceLayer`, `CorsLayer`, a request
//! `TimeoutLayer`, `RequestBodyLimitLayer` and `CompressionLayer`. Each test
//! checks that one of them and the protocol get along, or shows the
//! configuration under which they do (README, "Mounting").

use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_durable_streams::{
    CacheControlLayer, DurableStreamsService, LongPollLayer, MemoryStorage, SseLayer,
};
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::{CompressionLayer, DefaultPredicate};
use tower_http::cors::{Any, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::Level;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// How long any exchange may take before a test gives up on it.
const LIMIT: Duration = Duration::from_secs(10);

/// The stack under test, its body boxed so that every test names one type.
type Stack = BoxCloneSyncService<Request<Full<Bytes>>, Response<Body>, Infallible>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The knobs of [`stack`].
#[derive(Clone)]
struct Config {
    request_timeout: Duration,
    long_poll_timeout: Duration,
    sse_lifetime: Duration,
    body_limit: usize,
    /// The service's own CORS, beside `CorsLayer`.
    builtin_cors: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            long_poll_timeout: Duration::from_secs(20),
            sse_lifetime: Duration::from_secs(60),
            body_limit: 64 * 1024,
            builtin_cors: false,
        }
    }
}

/// The stack as the README's "Mounting" section lays it out, with gzip
/// compressing what `predicate` allows.
fn stack_with<P>(config: Config, predicate: P) -> Stack
where
    P: Predicate + Send + Sync + 'static,
{
    let service = ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(boxed))
        .layer(TraceLayer::new_for_http())
        .layer(cors())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(RequestBodyLimitLayer::new(config.body_limit))
        .layer(CompressionLayer::new().compress_when(predicate))
        .layer(CacheControlLayer::new())
        .layer(SseLayer::new().connection_lifetime(config.sse_lifetime))
        .layer(LongPollLayer::new().timeout(config.long_poll_timeout))
        .service(
            DurableStreamsService::new(MemoryStorage::new())
                .prefix("/streams")
                .cors(config.builtin_cors),
        );
    BoxCloneSyncService::new(service)
}

/// The stack with tower-http's default compression predicate, which leaves
/// `text/event-stream` alone.
fn stack(config: Config) -> Stack {
    stack_with(config, DefaultPredicate::new())
}

fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// CORS for browsers on any origin, with the protocol's headers exposed.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
        ])
        .allow_headers(Any)
        .expose_headers(Any)
}

/// Sends a request and returns the response with its body still open.
async fn send(
    stack: &Stack,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(body.into()))
        .expect("a valid request");
    let Ok(response) = tokio::time::timeout(LIMIT, stack.clone().oneshot(request))
        .await
        .expect("the stack answers in time");
    response
}

/// A whole response.
#[derive(Debug)]
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

async fn request(
    stack: &Stack,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let (parts, body) = send(stack, method, uri, headers, body).await.into_parts();
    let body = tokio::time::timeout(LIMIT, body.collect())
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

const TEXT: [(&str, &str); 1] = [("content-type", "text/plain")];

async fn create(stack: &Stack, uri: &str, body: impl Into<Bytes>) -> Reply {
    let created = request(stack, Method::PUT, uri, &TEXT, body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    created
}

async fn append(stack: &Stack, uri: &str, body: impl Into<Bytes>) -> Reply {
    request(stack, Method::POST, uri, &TEXT, body).await
}

async fn get(stack: &Stack, uri: &str) -> Reply {
    request(stack, Method::GET, uri, &[], Bytes::new()).await
}

/// The bytes of an open response body as they arrive.
struct Incoming {
    body: Body,
    raw: Vec<u8>,
    ended: bool,
}

impl Incoming {
    fn new(response: Response<Body>) -> Self {
        Self {
            body: response.into_body(),
            raw: Vec::new(),
            ended: false,
        }
    }

    /// Reads until `done` holds for the bytes so far, the body ends, or
    /// `within` passes; returns whether `done` holds.
    async fn read_until(&mut self, within: Duration, done: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.ended && !done(&self.raw) {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => break,
                Ok(None) => self.ended = true,
                Ok(Some(frame)) => {
                    let frame = frame.expect("the body is readable");
                    if let Ok(data) = frame.into_data() {
                        self.raw.extend_from_slice(&data);
                    }
                }
            }
        }
        done(&self.raw)
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn gunzip(compressed: &[u8]) -> Vec<u8> {
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    decoder.write_all(compressed).expect("valid gzip");
    decoder.finish().expect("a whole gzip stream")
}

// ---------------------------------------------------------------------------
// TraceLayer
// ---------------------------------------------------------------------------

/// What a capturing subscriber saw.
#[derive(Default)]
struct Seen {
    /// Level, name and field names of each span.
    spans: Vec<(Level, String, Vec<String>)>,
    /// Level and target of each event.
    events: Vec<(Level, String)>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Seen>>);

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: Context<'_, S>,
    ) {
        let meta = attrs.metadata();
        let fields = meta.fields().iter().map(|f| f.name().to_owned()).collect();
        let mut seen = self.0.lock().expect("not poisoned");
        seen.spans
            .push((*meta.level(), meta.name().to_owned(), fields));
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut seen = self.0.lock().expect("not poisoned");
        seen.events.push((*meta.level(), meta.target().to_owned()));
    }
}

#[tokio::test]
async fn trace_spans_are_debug_and_protocol_refusals_log_nothing_louder() {
    let capture = Capture::default();
    // The test runs on one thread, which every task of the stack shares.
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let stack = stack(Config {
        long_poll_timeout: Duration::from_millis(50),
        ..Config::default()
    });

    let created = create(&stack, "/streams/s", "a").await;
    // The ordinary refusals of the protocol: 404, 409, 400, and a
    // long-poll's 204.
    assert_eq!(
        get(&stack, "/streams/missing?offset=-1").await.status,
        StatusCode::NOT_FOUND
    );
    let json = [("content-type", "application/json")];
    let conflict = request(&stack, Method::PUT, "/streams/s", &json, "[]").await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    let wrong_type = request(&stack, Method::POST, "/streams/s", &json, "[1]").await;
    assert_eq!(wrong_type.status, StatusCode::CONFLICT);
    assert_eq!(
        get(&stack, "/streams/s?offset=junk").await.status,
        StatusCode::BAD_REQUEST
    );
    let tail = created.header("stream-next-offset").expect("an offset");
    let poll = get(&stack, &format!("/streams/s?offset={tail}&live=long-poll")).await;
    assert_eq!(poll.status, StatusCode::NO_CONTENT);

    let seen = capture.0.lock().expect("not poisoned");
    // One `request` span per request, at DEBUG, with the method and URI.
    let requests: Vec<_> = seen
        .spans
        .iter()
        .filter(|(_, name, _)| name == "request")
        .collect();
    assert_eq!(requests.len(), 6, "{:?}", seen.spans);
    for (level, _, fields) in requests {
        assert_eq!(*level, Level::DEBUG);
        assert!(fields.iter().any(|f| f == "method"), "{fields:?}");
        assert!(fields.iter().any(|f| f == "uri"), "{fields:?}");
    }
    // The trace layer reported each response, and nothing anywhere was
    // louder than DEBUG.
    let responses = seen
        .events
        .iter()
        .filter(|(_, target)| target.starts_with("tower_http::trace"))
        .count();
    assert!(responses >= 6, "{:?}", seen.events);
    let loud: Vec<_> = seen
        .events
        .iter()
        .filter(|(level, _)| *level < Level::DEBUG)
        .collect();
    assert!(loud.is_empty(), "logged above DEBUG: {loud:?}");
}

// ---------------------------------------------------------------------------
// CompressionLayer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn compressed_catch_up_decompresses_to_the_exact_bytes_and_offsets() {
    let stack = stack(Config::default());
    let first = "the quick brown fox jumps over the lazy dog\n".repeat(200);
    let second = "pack my box with five dozen liquor jugs\n".repeat(200);
    create(&stack, "/streams/log", first.clone()).await;
    let appended = append(&stack, "/streams/log", second.clone()).await;
    assert_eq!(appended.status, StatusCode::NO_CONTENT);

    let plain = get(&stack, "/streams/log?offset=-1").await;
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.body, format!("{first}{second}"));

    let gzip = [("accept-encoding", "gzip")];
    let compressed = request(&stack, Method::GET, "/streams/log?offset=-1", &gzip, "").await;
    assert_eq!(compressed.status, StatusCode::OK);
    assert_eq!(compressed.header("content-encoding"), Some("gzip"));
    assert_eq!(compressed.header("vary"), Some("accept-encoding"));
    assert!(compressed.body.len() < plain.body.len() / 10);
    assert_eq!(gunzip(&compressed.body), plain.body);
    for name in [
        "stream-next-offset",
        "stream-up-to-date",
        "etag",
        "cache-control",
    ] {
        assert_eq!(compressed.header(name), plain.header(name), "{name}");
    }
    assert_eq!(
        compressed.header("stream-next-offset"),
        appended.header("stream-next-offset")
    );
}

/// tower-http's `DefaultPredicate` leaves `text/event-stream` alone; a
/// predicate of one's own should too (`NotForContentType::SSE`), so that no
/// encoder sits between an event and its reader.
#[tokio::test]
async fn sse_is_not_compressed_and_events_arrive_at_once() {
    let own = SizeAbove::new(0).and(NotForContentType::SSE);
    for stack in [stack(Config::default()), stack_with(Config::default(), own)] {
        create(&stack, "/streams/feed", "").await;
        let gzip = [("accept-encoding", "gzip")];
        let uri = "/streams/feed?offset=now&live=sse";
        let sse = send(&stack, Method::GET, uri, &gzip, "").await;
        assert_eq!(sse.status(), StatusCode::OK);
        assert_eq!(sse.headers()["content-type"], "text/event-stream");
        assert!(!sse.headers().contains_key("content-encoding"));
        let mut events = Incoming::new(sse);
        assert!(
            events
                .read_until(LIMIT, |raw| contains(raw, "event: control"))
                .await
        );

        for message in ["first", "second"] {
            let appended_at = Instant::now();
            append(&stack, "/streams/feed", message).await;
            let data = format!("event: data\ndata:{message}\n\n");
            assert!(
                events.read_until(LIMIT, |raw| contains(raw, &data)).await,
                "{message} never arrived"
            );
            assert!(appended_at.elapsed() < Duration::from_millis(500));
        }
    }
}

// ---------------------------------------------------------------------------
// TimeoutLayer
// ---------------------------------------------------------------------------

/// The working configuration: the long-poll timeout below the request
/// timeout, so an idle long-poll ends with the protocol's `204`.
#[tokio::test]
async fn long_polls_end_with_204_before_a_longer_request_timeout() {
    let stack = stack(Config {
        request_timeout: Duration::from_secs(2),
        long_poll_timeout: Duration::from_millis(300),
        ..Config::default()
    });
    let created = create(&stack, "/streams/jobs", "").await;
    let tail = created.header("stream-next-offset").expect("an offset");
    let uri = format!("/streams/jobs?offset={tail}&live=long-poll");

    let started = Instant::now();
    let idle = get(&stack, &uri).await;
    assert_eq!(idle.status, StatusCode::NO_CONTENT, "{idle:?}");
    assert_eq!(idle.header("stream-next-offset"), Some(tail));
    assert!(started.elapsed() < Duration::from_secs(2));

    // And an append within the long-poll timeout still wakes it.
    let poll = tokio::spawn({
        let stack = stack.clone();
        async move { get(&stack, &uri).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    append(&stack, "/streams/jobs", "done").await;
    let woken = poll.await.expect("the long-poll task");
    assert_eq!(woken.status, StatusCode::OK);
    assert_eq!(woken.body, "done");
}

/// The misconfiguration: a request timeout below the long-poll timeout
/// cuts every idle long-poll with the timeout's status instead of `204`.
#[tokio::test]
async fn a_shorter_request_timeout_cuts_long_polls() {
    let stack = stack(Config {
        request_timeout: Duration::from_millis(300),
        long_poll_timeout: Duration::from_secs(5),
        ..Config::default()
    });
    let created = create(&stack, "/streams/jobs", "").await;
    let tail = created.header("stream-next-offset").expect("an offset");
    let started = Instant::now();
    let cut = get(
        &stack,
        &format!("/streams/jobs?offset={tail}&live=long-poll"),
    )
    .await;
    assert_eq!(cut.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(cut.header("stream-next-offset"), None);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A request timeout bounds the wait for the response head only: an SSE
/// response has its head at once, streams past the timeout, and ends at the
/// connection lifetime the SSE layer sets.
#[tokio::test]
async fn sse_streams_past_the_request_timeout_until_its_lifetime() {
    let stack = stack(Config {
        request_timeout: Duration::from_millis(200),
        sse_lifetime: Duration::from_millis(1200),
        ..Config::default()
    });
    create(&stack, "/streams/feed", "").await;
    let started = Instant::now();
    let sse = send(
        &stack,
        Method::GET,
        "/streams/feed?offset=now&live=sse",
        &[],
        "",
    )
    .await;
    assert_eq!(sse.status(), StatusCode::OK);
    let mut events = Incoming::new(sse);

    tokio::time::sleep(Duration::from_millis(500)).await;
    append(&stack, "/streams/feed", "late").await;
    assert!(
        events
            .read_until(LIMIT, |raw| contains(raw, "data:late"))
            .await
    );

    // The SSE layer ends the response at its lifetime, after a control
    // event, so the client reconnects from the offset it reports.
    events.read_until(LIMIT, |_| false).await;
    assert!(events.ended);
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1100), "{elapsed:?}");
    let text = String::from_utf8_lossy(&events.raw);
    let last = text.trim_end().rsplit("\n\n").next().expect("an event");
    assert!(last.starts_with("event: control"), "{text}");
}

// ---------------------------------------------------------------------------
// RequestBodyLimitLayer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn oversized_appends_are_413_and_store_nothing() {
    let stack = stack(Config {
        body_limit: 1024,
        ..Config::default()
    });
    create(&stack, "/streams/s", "a").await;
    let big = "x".repeat(2048);
    let len = big.len().to_string();

    // Declared too large: the layer answers before the service runs.
    let declared = [
        ("content-type", "text/plain"),
        ("content-length", len.as_str()),
    ];
    let refused = request(&stack, Method::POST, "/streams/s", &declared, big.clone()).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Undeclared (chunked): the limit ends the body, and the service reports
    // that as 413 too, not as a broken body.
    let refused = append(&stack, "/streams/s", big.clone()).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE, "{refused:?}");

    // Nor can a stream be created with one.
    let refused = request(&stack, Method::PUT, "/streams/t", &TEXT, big).await;
    assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        get(&stack, "/streams/t?offset=-1").await.status,
        StatusCode::NOT_FOUND
    );

    // Nothing was stored; appends within the limit still work.
    assert_eq!(get(&stack, "/streams/s?offset=-1").await.body, "a");
    let small = append(&stack, "/streams/s", "b".repeat(1000)).await;
    assert_eq!(small.status, StatusCode::NO_CONTENT);
    assert_eq!(get(&stack, "/streams/s?offset=-1").await.body.len(), 1001);
}

// ---------------------------------------------------------------------------
// CorsLayer
// ---------------------------------------------------------------------------

/// With the built-in CORS off, `CorsLayer` alone answers preflights and
/// sets each `Access-Control-*` header once.
#[tokio::test]
async fn cors_layer_with_builtin_cors_off_sends_each_header_once() {
    let stack = stack(Config::default());
    let origin = [("origin", "https://app.example")];
    create(&stack, "/streams/s", "a").await;

    let read = request(&stack, Method::GET, "/streams/s?offset=-1", &origin, "").await;
    assert_eq!(read.status, StatusCode::OK);
    for name in [
        "access-control-allow-origin",
        "access-control-expose-headers",
    ] {
        let values: Vec<_> = read.headers.get_all(name).iter().collect();
        assert_eq!(values.len(), 1, "{name}: {values:?}");
    }
    assert_eq!(read.header("access-control-allow-origin"), Some("*"));
    assert_eq!(read.header("access-control-expose-headers"), Some("*"));

    let preflight = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "content-type, producer-id",
        ),
    ];
    let answer = request(&stack, Method::OPTIONS, "/streams/s", &preflight, "").await;
    assert_eq!(answer.status, StatusCode::OK);
    let values: Vec<_> = answer
        .headers
        .get_all("access-control-allow-origin")
        .iter()
        .collect();
    assert_eq!(values, ["*"]);
    assert_eq!(
        answer.header("access-control-allow-methods"),
        Some("GET,HEAD,POST,PUT,DELETE")
    );
    // The preflight never reached the service: no protocol headers.
    assert_eq!(answer.header("x-content-type-options"), None);
}
