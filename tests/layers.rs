//! `LongPollLayer`, `SseLayer` and `CacheControlLayer` against a scripted
//! inner service: each test plays the service's part one response at a time
//! (`tower_test::mock`) and polls the layer by hand, so every wake-up, wait
//! and re-read is checked step by step. Time is paused wherever a timeout
//! matters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tokio::sync::oneshot;
use tokio_test::task::{self, Spawn};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower_durable_streams::live::{AtTail, LiveRequestBody, Subscribe, TailWait};
use tower_durable_streams::{BoxError, CacheControlLayer, LongPollLayer, SseLayer};
use tower_test::mock;

type InnerRequest = Request<LiveRequestBody<String>>;
type InnerResponse = Response<Full<Bytes>>;
type Handle = mock::Handle<InnerRequest, InnerResponse>;

const T0: &str = "0000000000000000_0000000000000000";
const T1: &str = "0000000000000001_0000000000000005";
const T2: &str = "0000000000000002_0000000000000009";

// ---------------------------------------------------------------------------
// Scripted responses and waits
// ---------------------------------------------------------------------------

/// A `200` with data that ends at `next`, as a catch-up read answers.
fn data(next: &str, body: impl Into<Bytes>) -> InnerResponse {
    Response::builder()
        .header(CONTENT_TYPE, "text/plain")
        .header("stream-next-offset", next)
        .header(ETAG, "\"1:a:b\"")
        .body(Full::new(body.into()))
        .unwrap()
}

/// A `200` with no data at the tail `next`, marked [`AtTail`].
fn at_tail(next: &str) -> InnerResponse {
    let mut response = data(next, "");
    response
        .headers_mut()
        .insert("stream-up-to-date", HeaderValue::from_static("true"));
    response.extensions_mut().insert(AtTail);
    response
}

/// [`at_tail`] of an open stream, with a [`TailWait`].
fn waiting(next: &str, wait: TailWait) -> InnerResponse {
    let mut response = at_tail(next);
    response.extensions_mut().insert(wait);
    response
}

fn closed(mut response: InnerResponse) -> InnerResponse {
    response
        .headers_mut()
        .insert("stream-closed", HeaderValue::from_static("true"));
    response
        .headers_mut()
        .insert("stream-up-to-date", HeaderValue::from_static("true"));
    response
}

/// A wait that resolves when the sender fires (or is dropped).
fn triggered_wait() -> (TailWait, oneshot::Sender<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let wait = TailWait::new(async move {
        let _ = rx.await;
    });
    (wait, tx)
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A wait that never resolves and reports, through the flag, when it is
/// dropped: a subscription that was released.
fn guarded_wait() -> (TailWait, Arc<AtomicBool>) {
    let dropped = Arc::new(AtomicBool::new(false));
    let guard = SetOnDrop(dropped.clone());
    let wait = TailWait::new(async move {
        let _guard = guard;
        std::future::pending::<()>().await
    });
    (wait, dropped)
}

// ---------------------------------------------------------------------------
// Inspecting requests and responses
// ---------------------------------------------------------------------------

fn get(uri: &str) -> Request<String> {
    Request::get(uri).body(String::new()).unwrap()
}

/// The next request the layer sent to the inner service, and its responder.
fn next_request(handle: &mut Handle) -> (InnerRequest, mock::SendResponse<InnerResponse>) {
    assert_ready!(handle.poll_request()).expect("the layer dropped the inner service")
}

fn assert_no_request(handle: &mut Handle) {
    assert_pending!(handle.poll_request(), "the layer read again too early");
}

/// The value of query parameter `name`.
fn param(request: &InnerRequest, name: &str) -> Option<String> {
    request.uri().query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.to_owned())
    })
}

fn header<'a, B>(response: &'a Response<B>, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("visible ASCII header"))
}

fn current_interval() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_secs(1_728_432_000))
        .unwrap();
    since.as_secs() / 20
}

fn cursor_of<B>(response: &Response<B>) -> u64 {
    header(response, "stream-cursor")
        .expect("Stream-Cursor present")
        .parse()
        .expect("Stream-Cursor is a decimal interval number")
}

async fn text_of<B>(body: B) -> String
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let bytes = body.collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

// ===========================================================================
// LongPoll
// ===========================================================================

mod long_poll {
    use super::*;
    use tower_durable_streams::long_poll::ResponseFuture;

    type Service =
        tower_durable_streams::long_poll::LongPoll<mock::Mock<InnerRequest, InnerResponse>>;

    fn layered(timeout: Duration) -> (mock::Spawn<Service>, Handle) {
        mock::spawn_layer(LongPollLayer::new().timeout(timeout))
    }

    /// Sends `request` and returns the layer's future, already polled once
    /// so that its first read has reached the inner service.
    fn start(
        service: &mut mock::Spawn<Service>,
        request: Request<String>,
    ) -> Spawn<ResponseFuture<mock::future::ResponseFuture<InnerResponse>, Full<Bytes>, BoxError>>
    {
        assert_ready_ok!(service.poll_ready());
        let mut future = task::spawn(service.call(request));
        assert_pending!(future.poll());
        future
    }

    #[tokio::test]
    async fn other_requests_pass_through_untouched() {
        for (method, uri) in [
            (Method::GET, format!("/s?offset={T0}")),
            (Method::GET, format!("/s?offset={T0}&live=sse")),
            (Method::GET, format!("/s?offset={T0}&live=long-pollx")),
            (Method::POST, format!("/s?offset={T0}&live=long-poll")),
            (Method::PUT, "/s".to_owned()),
        ] {
            let (mut service, mut handle) = layered(Duration::from_secs(30));
            let request = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("x-client", "1")
                .body(String::from("payload"))
                .unwrap();
            assert_ready_ok!(service.poll_ready());
            let mut future = task::spawn(service.call(request));

            let (seen, respond) = next_request(&mut handle);
            assert_eq!(seen.method(), method);
            assert_eq!(seen.uri(), uri.as_str());
            assert_eq!(seen.headers()["x-client"], "1");
            assert!(seen.extensions().get::<Subscribe>().is_none(), "{uri}");
            assert_eq!(text_of(seen.into_body()).await, "payload");

            respond.send_response(data(T1, "hello"));
            let response = assert_ready_ok!(future.poll());
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(header(&response, "stream-next-offset"), Some(T1));
            assert_eq!(header(&response, "etag"), Some("\"1:a:b\""));
            assert!(
                header(&response, "stream-cursor").is_none(),
                "{method} {uri}"
            );
            assert_eq!(text_of(response.into_body()).await, "hello");
        }
    }

    #[tokio::test]
    async fn long_poll_reads_are_marked_subscribe() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let uri = format!("/s?offset={T0}&live=long-poll");
        let request = Request::get(&uri)
            .header("authorization", "Bearer x")
            .body(String::from("ignored"))
            .unwrap();
        let _future = start(&mut service, request);

        let (seen, _respond) = next_request(&mut handle);
        assert_eq!(seen.method(), Method::GET);
        assert_eq!(seen.uri(), uri.as_str());
        assert_eq!(seen.headers()["authorization"], "Bearer x");
        assert!(seen.extensions().get::<Subscribe>().is_some());
    }

    #[tokio::test]
    async fn data_is_returned_with_a_cursor() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T0}&live=long-poll")));

        let (_, respond) = next_request(&mut handle);
        respond.send_response(data(T1, "hello"));
        let response = assert_ready_ok!(future.poll());

        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "stream-next-offset"), Some(T1));
        assert_eq!(header(&response, "content-type"), Some("text/plain"));
        let cursor = cursor_of(&response);
        assert!(cursor >= current_interval().saturating_sub(1), "{cursor}");
        assert!(cursor <= current_interval(), "{cursor}");
        assert_eq!(text_of(response.into_body()).await, "hello");
        assert_no_request(&mut handle);
    }

    #[tokio::test]
    async fn waits_at_the_tail_then_reads_from_the_next_offset() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(
            &mut service,
            get(&format!("/s?offset={T0}&live=long-poll&cursor=7")),
        );

        let (_, respond) = next_request(&mut handle);
        let (wait, wake) = triggered_wait();
        respond.send_response(waiting(T1, wait));
        assert_pending!(future.poll());
        assert_no_request(&mut handle);
        assert!(!future.is_woken());

        wake.send(()).unwrap();
        assert!(future.is_woken());
        assert_pending!(future.poll());
        let (again, respond) = next_request(&mut handle);
        assert_eq!(param(&again, "offset").as_deref(), Some(T1));
        assert_eq!(param(&again, "live").as_deref(), Some("long-poll"));
        assert_eq!(param(&again, "cursor").as_deref(), Some("7"));
        assert_eq!(again.uri().path(), "/s");
        assert!(again.extensions().get::<Subscribe>().is_some());
        assert!(again.body().is_end_stream(), "a re-read sends no body");

        respond.send_response(data(T2, "new"));
        let response = assert_ready_ok!(future.poll());
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "stream-next-offset"), Some(T2));
        cursor_of(&response);
        assert_eq!(text_of(response.into_body()).await, "new");
    }

    #[tokio::test]
    async fn a_spurious_wake_up_waits_again() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T1}&live=long-poll")));

        let (_, respond) = next_request(&mut handle);
        let (wait, wake) = triggered_wait();
        respond.send_response(waiting(T1, wait));
        assert_pending!(future.poll());
        wake.send(()).unwrap();
        assert_pending!(future.poll());

        // Nothing new after all: the layer waits on the new TailWait.
        let (_, respond) = next_request(&mut handle);
        let (wait, wake) = triggered_wait();
        respond.send_response(waiting(T1, wait));
        assert_pending!(future.poll());
        assert_no_request(&mut handle);

        wake.send(()).unwrap();
        assert_pending!(future.poll());
        let (third, respond) = next_request(&mut handle);
        assert_eq!(param(&third, "offset").as_deref(), Some(T1));
        respond.send_response(data(T2, "x"));
        assert_eq!(assert_ready_ok!(future.poll()).status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_answers_204_with_the_tail_and_a_cursor() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T0}&live=long-poll")));

        let (_, respond) = next_request(&mut handle);
        let (wait, dropped) = guarded_wait();
        let mut tail = waiting(T1, wait);
        tail.headers_mut()
            .insert("access-control-allow-origin", HeaderValue::from_static("*"));
        respond.send_response(tail);
        assert_pending!(future.poll());

        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert_pending!(future.poll());
        assert!(!dropped.load(Ordering::SeqCst));

        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(future.is_woken());
        let response = assert_ready_ok!(future.poll());
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&response, "stream-next-offset"), Some(T1));
        assert_eq!(header(&response, "stream-up-to-date"), Some("true"));
        assert!(header(&response, "stream-closed").is_none());
        cursor_of(&response);
        // Response-wide headers stay; those describing the empty body go.
        assert_eq!(header(&response, "access-control-allow-origin"), Some("*"));
        assert!(header(&response, "content-type").is_none());
        assert!(header(&response, "etag").is_none());
        assert!(dropped.load(Ordering::SeqCst), "the wait outlived the poll");
        assert_no_request(&mut handle);
        assert_eq!(text_of(response.into_body()).await, "");
    }

    #[tokio::test(start_paused = true)]
    async fn closed_at_the_tail_answers_at_once_without_a_cursor() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T1}&live=long-poll")));

        let (_, respond) = next_request(&mut handle);
        respond.send_response(closed(at_tail(T1)));
        let response = assert_ready_ok!(future.poll());

        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&response, "stream-closed"), Some("true"));
        assert_eq!(header(&response, "stream-up-to-date"), Some("true"));
        assert_eq!(header(&response, "stream-next-offset"), Some(T1));
        assert!(header(&response, "stream-cursor").is_none());
        assert_no_request(&mut handle);
    }

    #[tokio::test(start_paused = true)]
    async fn closure_while_waiting_ends_the_poll() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T1}&live=long-poll")));

        let (_, respond) = next_request(&mut handle);
        let (wait, wake) = triggered_wait();
        respond.send_response(waiting(T1, wait));
        assert_pending!(future.poll());
        wake.send(()).unwrap();
        assert_pending!(future.poll());

        let (_, respond) = next_request(&mut handle);
        respond.send_response(closed(at_tail(T1)));
        let response = assert_ready_ok!(future.poll());
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&response, "stream-closed"), Some("true"));
        assert!(header(&response, "stream-cursor").is_none());
    }

    #[tokio::test]
    async fn closed_with_final_data_is_returned_without_a_cursor() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T0}&live=long-poll")));

        let (_, respond) = next_request(&mut handle);
        respond.send_response(closed(data(T1, "last")));
        let response = assert_ready_ok!(future.poll());
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "stream-closed"), Some("true"));
        assert!(header(&response, "stream-cursor").is_none());
        assert_eq!(text_of(response.into_body()).await, "last");
    }

    #[tokio::test(start_paused = true)]
    async fn an_echoed_cursor_is_always_passed() {
        let current = current_interval();
        for echoed in [current, current + 1, current + 1_000_000] {
            // With data.
            let (mut service, mut handle) = layered(Duration::from_secs(30));
            let uri = format!("/s?offset={T0}&live=long-poll&cursor={echoed}");
            let mut future = start(&mut service, get(&uri));
            let (_, respond) = next_request(&mut handle);
            respond.send_response(data(T1, "x"));
            let response = assert_ready_ok!(future.poll());
            let cursor = cursor_of(&response);
            assert!(cursor > echoed, "echoed {echoed}, got {cursor}");
            // Jitter is at most an hour: 180 intervals.
            assert!(cursor <= echoed + 180, "echoed {echoed}, got {cursor}");

            // After a timeout.
            let (mut service, mut handle) = layered(Duration::from_secs(1));
            let mut future = start(&mut service, get(&uri));
            let (_, respond) = next_request(&mut handle);
            let (wait, _wake) = triggered_wait();
            respond.send_response(waiting(T1, wait));
            assert_pending!(future.poll());
            tokio::time::advance(Duration::from_secs(1)).await;
            let response = assert_ready_ok!(future.poll());
            assert_eq!(response.status(), StatusCode::NO_CONTENT);
            assert!(cursor_of(&response) > echoed);
        }
    }

    #[tokio::test]
    async fn an_old_cursor_gets_the_current_interval() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let before = current_interval();
        let mut future = start(
            &mut service,
            get(&format!("/s?offset={T0}&live=long-poll&cursor=3")),
        );
        let (_, respond) = next_request(&mut handle);
        respond.send_response(data(T1, "x"));
        let response = assert_ready_ok!(future.poll());
        let cursor = cursor_of(&response);
        assert!((before..=current_interval()).contains(&cursor), "{cursor}");
    }

    #[tokio::test]
    async fn dropping_the_response_future_drops_the_wait() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T1}&live=long-poll")));

        let (_, respond) = next_request(&mut handle);
        let (wait, dropped) = guarded_wait();
        respond.send_response(waiting(T1, wait));
        assert_pending!(future.poll());
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the layer let go of the wait"
        );

        drop(future);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the wait outlived the client"
        );
    }

    #[tokio::test]
    async fn errors_are_returned_as_they_are() {
        let (mut service, mut handle) = layered(Duration::from_secs(30));
        let mut future = start(&mut service, get(&format!("/s?offset={T0}&live=long-poll")));
        let (_, respond) = next_request(&mut handle);
        let not_found = Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from("stream not found")))
            .unwrap();
        respond.send_response(not_found);
        let response = assert_ready_ok!(future.poll());
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(header(&response, "stream-cursor").is_none());
        assert_eq!(text_of(response.into_body()).await, "stream not found");

        let mut future = start(&mut service, get(&format!("/s?offset={T0}&live=long-poll")));
        let (_, respond) = next_request(&mut handle);
        respond.send_error("storage is down");
        let error = tokio_test::assert_ready_err!(future.poll());
        assert_eq!(error.to_string(), "storage is down");
    }
}

// ===========================================================================
// Sse
// ===========================================================================

/// One dispatched SSE event, as a WHATWG `EventSource` parser sees it.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    kind: String,
    data: String,
}

/// Parses an event stream by the HTML standard's rules: lines end at CRLF,
/// CR or LF; a blank line dispatches; `data` lines join with LF; one space
/// after the colon is dropped. Every event must be complete.
fn parse_events(text: &str) -> Vec<Event> {
    let mut events = Vec::new();
    let (mut kind, mut data, mut has_data) = (String::new(), String::new(), false);
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['\r', '\n']).expect("an unterminated line");
        let line = &rest[..end];
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            if has_data {
                data.pop();
                events.push(Event {
                    kind: std::mem::take(&mut kind),
                    data: std::mem::take(&mut data),
                });
            }
            kind.clear();
            has_data = false;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => kind = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
                has_data = true;
            }
            _ => {}
        }
    }
    assert!(!has_data && kind.is_empty(), "an event was left open");
    events
}

fn control(event: &Event) -> serde_json::Map<String, serde_json::Value> {
    assert_eq!(event.kind, "control");
    match serde_json::from_str(&event.data).expect("control data is JSON") {
        serde_json::Value::Object(map) => map,
        other => panic!("control is not an object: {other}"),
    }
}

mod sse {
    use super::*;
    use tower_durable_streams::sse::ResponseBody;

    type Service = tower_durable_streams::sse::Sse<mock::Mock<InnerRequest, InnerResponse>>;
    type Events = Spawn<ResponseBody<Full<Bytes>>>;

    fn layered(lifetime: Duration) -> (mock::Spawn<Service>, Handle) {
        mock::spawn_layer(SseLayer::new().connection_lifetime(lifetime))
    }

    /// Opens an SSE read whose first inner read is answered with `first`,
    /// and returns the response head and its body.
    fn open(
        service: &mut mock::Spawn<Service>,
        handle: &mut Handle,
        uri: &str,
        first: InnerResponse,
    ) -> (http::response::Parts, Events) {
        assert_ready_ok!(service.poll_ready());
        let mut future = task::spawn(service.call(get(uri)));
        assert_pending!(future.poll());
        let (request, respond) = next_request(handle);
        assert!(request.extensions().get::<Subscribe>().is_some());
        respond.send_response(first);
        let (parts, body) = assert_ready_ok!(future.poll()).into_parts();
        (parts, task::spawn(body))
    }

    fn poll_events(body: &mut Events) -> Poll<Option<Vec<Event>>> {
        body.enter(|cx, body| body.poll_frame(cx)).map(|frame| {
            frame.map(|frame| {
                let frame = frame.expect("SSE body failed");
                let bytes = frame.into_data().expect("a data frame");
                parse_events(std::str::from_utf8(&bytes).expect("UTF-8 events"))
            })
        })
    }

    fn next_events(body: &mut Events) -> Vec<Event> {
        assert_ready!(poll_events(body)).expect("the event stream ended")
    }

    fn assert_ended(body: &mut Events) {
        assert!(assert_ready!(poll_events(body)).is_none(), "more events");
    }

    fn uri() -> String {
        format!("/s?offset={T0}&live=sse")
    }

    #[tokio::test]
    async fn other_requests_pass_through_untouched() {
        for (method, uri) in [
            (Method::GET, format!("/s?offset={T0}")),
            (Method::GET, format!("/s?offset={T0}&live=long-poll")),
            (Method::HEAD, format!("/s?offset={T0}&live=sse")),
            (Method::POST, "/s".to_owned()),
        ] {
            let (mut service, mut handle) = layered(Duration::from_secs(60));
            let request = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .body(String::from("payload"))
                .unwrap();
            assert_ready_ok!(service.poll_ready());
            let mut future = task::spawn(service.call(request));
            let (seen, respond) = next_request(&mut handle);
            assert_eq!(seen.method(), method);
            assert_eq!(seen.uri(), uri.as_str());
            assert!(seen.extensions().get::<Subscribe>().is_none(), "{uri}");
            assert_eq!(text_of(seen.into_body()).await, "payload");

            respond.send_response(data(T1, "line\n"));
            let response = assert_ready_ok!(future.poll());
            assert_eq!(header(&response, "content-type"), Some("text/plain"));
            assert_eq!(header(&response, "stream-next-offset"), Some(T1));
            assert_eq!(text_of(response.into_body()).await, "line\n");
        }
    }

    #[tokio::test]
    async fn a_failed_first_read_is_returned_as_it_is() {
        for status in [
            StatusCode::NOT_FOUND,
            StatusCode::BAD_REQUEST,
            StatusCode::GONE,
        ] {
            let (mut service, mut handle) = layered(Duration::from_secs(60));
            assert_ready_ok!(service.poll_ready());
            let mut future = task::spawn(service.call(get(&uri())));
            assert_pending!(future.poll());
            let (_, respond) = next_request(&mut handle);
            let refused = Response::builder()
                .status(status)
                .header(CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Full::new(Bytes::from("no")))
                .unwrap();
            respond.send_response(refused);
            let response = assert_ready_ok!(future.poll());
            assert_eq!(response.status(), status);
            assert_eq!(
                header(&response, "content-type"),
                Some("text/plain; charset=utf-8")
            );
            assert_eq!(text_of(response.into_body()).await, "no");
            assert_no_request(&mut handle);
        }
    }

    #[tokio::test]
    async fn data_then_control() {
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let mut first = data(T1, "hello");
        first
            .headers_mut()
            .insert("stream-up-to-date", HeaderValue::from_static("true"));
        first
            .headers_mut()
            .insert("access-control-allow-origin", HeaderValue::from_static("*"));
        let (head, mut body) = open(&mut service, &mut handle, &uri(), first);

        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers[CONTENT_TYPE], "text/event-stream");
        assert_eq!(head.headers[CACHE_CONTROL], "no-cache");
        assert_eq!(head.headers["access-control-allow-origin"], "*");
        assert!(!head.headers.contains_key("stream-sse-data-encoding"));
        assert!(!head.headers.contains_key("stream-next-offset"));
        assert!(!head.headers.contains_key(ETAG));

        let events = next_events(&mut body);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].kind, "data");
        assert_eq!(events[0].data, "hello");
        let control = control(&events[1]);
        assert_eq!(control["streamNextOffset"], T1);
        assert_eq!(control["upToDate"], true);
        assert!(control.get("streamClosed").is_none());
        let cursor: u64 = control["streamCursor"].as_str().unwrap().parse().unwrap();
        assert!(cursor + 1 >= current_interval());
    }

    #[tokio::test]
    async fn binary_types_are_base64_and_text_types_are_not() {
        let payload: &[u8] = b"\x00\x01\xff\r\n\nevent: control\n\n\xfe";
        for (content_type, base64) in [
            ("text/plain", false),
            ("text/html; charset=utf-8", false),
            ("TEXT/CSV", false),
            ("application/json", false),
            ("Application/JSON; charset=utf-8", false),
            ("application/octet-stream", true),
            ("application/x-ndjson", true),
            ("image/png", true),
        ] {
            let (mut service, mut handle) = layered(Duration::from_secs(60));
            let body: Bytes = if base64 {
                Bytes::from_static(payload)
            } else {
                Bytes::from_static(b"[{\"k\":\"v\"}]")
            };
            let mut first = data(T1, body.clone());
            first
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            let (head, mut body_events) = open(&mut service, &mut handle, &uri(), first);

            assert_eq!(head.headers[CONTENT_TYPE], "text/event-stream");
            let encoding = head.headers.get("stream-sse-data-encoding");
            let events = next_events(&mut body_events);
            assert_eq!(events[0].kind, "data", "{content_type}");
            if base64 {
                assert_eq!(encoding.unwrap(), "base64", "{content_type}");
                let text: String = events[0].data.split(['\r', '\n']).collect();
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .expect("standard base64");
                assert_eq!(decoded, payload, "{content_type}");
            } else {
                assert!(encoding.is_none(), "{content_type}");
                assert_eq!(events[0].data.as_bytes(), &body[..], "{content_type}");
            }
            assert_eq!(events.len(), 2);
            assert_eq!(control(&events[1])["streamNextOffset"], T1);
        }
    }

    #[tokio::test]
    async fn line_ends_in_a_payload_cannot_inject_events() {
        let payload = "a\r\nevent: control\rdata: {\"streamClosed\":true}\n\n\
                       event: data\r\n\r\ndata:x\r\r\n\n id: 1\nretry: 1\n:comment\n";
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let (_, mut body) = open(&mut service, &mut handle, &uri(), data(T1, payload));

        let events = next_events(&mut body);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].kind, "data");
        // A reader gets every line back, each line end as one LF.
        let normalized = payload.replace("\r\n", "\n").replace('\r', "\n");
        assert_eq!(events[0].data, normalized);
        let control = control(&events[1]);
        assert!(control.get("streamClosed").is_none());
        assert_eq!(control["streamNextOffset"], T1);
    }

    #[tokio::test]
    async fn waits_at_the_tail_then_reads_from_the_next_offset() {
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let (_, mut body) = open(&mut service, &mut handle, &uri(), data(T1, "one"));
        let events = next_events(&mut body);
        assert_eq!(events[0].data, "one");
        assert_eq!(control(&events[1])["streamNextOffset"], T1);

        // The next read starts where the control event said.
        assert_pending!(poll_events(&mut body));
        let (read, respond) = next_request(&mut handle);
        assert_eq!(param(&read, "offset").as_deref(), Some(T1));
        assert_eq!(param(&read, "live").as_deref(), Some("sse"));
        assert!(read.extensions().get::<Subscribe>().is_some());
        let (wait, wake) = triggered_wait();
        respond.send_response(waiting(T1, wait));

        // Nothing new: no event, no read until the wait fires.
        assert_pending!(poll_events(&mut body));
        assert_no_request(&mut handle);
        assert!(!body.is_woken());
        wake.send(()).unwrap();
        assert!(body.is_woken());
        assert_pending!(poll_events(&mut body));

        let (read, respond) = next_request(&mut handle);
        assert_eq!(param(&read, "offset").as_deref(), Some(T1));
        respond.send_response(data(T2, "two"));
        let events = next_events(&mut body);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].data, "two");
        assert_eq!(control(&events[1])["streamNextOffset"], T2);

        assert_pending!(poll_events(&mut body));
        let (read, _) = next_request(&mut handle);
        assert_eq!(param(&read, "offset").as_deref(), Some(T2));
    }

    #[tokio::test]
    async fn a_first_read_at_the_tail_sends_one_control_event() {
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let (wait, _wake) = triggered_wait();
        let uri = format!("/s?offset={T1}&live=sse");
        let (_, mut body) = open(&mut service, &mut handle, &uri, waiting(T1, wait));

        let events = next_events(&mut body);
        assert_eq!(events.len(), 1, "{events:?}");
        let control = control(&events[0]);
        assert_eq!(control["streamNextOffset"], T1);
        assert_eq!(control["upToDate"], true);
        assert!(control.contains_key("streamCursor"));
        assert_pending!(poll_events(&mut body));
        assert_no_request(&mut handle);
    }

    #[tokio::test]
    async fn closure_ends_the_stream_after_its_control_event() {
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let (_, mut body) = open(&mut service, &mut handle, &uri(), closed(data(T1, "last")));

        let events = next_events(&mut body);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].data, "last");
        let control = control(&events[1]);
        assert_eq!(control["streamNextOffset"], T1);
        assert_eq!(control["streamClosed"], true);
        assert_eq!(control["upToDate"], true);
        assert!(control.get("streamCursor").is_none());
        assert_ended(&mut body);
        assert_no_request(&mut handle);
    }

    #[tokio::test]
    async fn closed_at_the_tail_sends_the_final_control_event_at_once() {
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let uri = format!("/s?offset={T1}&live=sse");
        let (_, mut body) = open(&mut service, &mut handle, &uri, closed(at_tail(T1)));

        let events = next_events(&mut body);
        assert_eq!(events.len(), 1, "{events:?}");
        let control = control(&events[0]);
        assert_eq!(control["streamClosed"], true);
        assert_eq!(control["upToDate"], true);
        assert!(control.get("streamCursor").is_none());
        assert_ended(&mut body);
    }

    #[tokio::test]
    async fn closure_while_waiting_ends_the_stream() {
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let (wait, wake) = triggered_wait();
        let uri = format!("/s?offset={T1}&live=sse");
        let (_, mut body) = open(&mut service, &mut handle, &uri, waiting(T1, wait));
        next_events(&mut body);
        assert_pending!(poll_events(&mut body));

        wake.send(()).unwrap();
        assert_pending!(poll_events(&mut body));
        let (_, respond) = next_request(&mut handle);
        respond.send_response(closed(at_tail(T1)));
        let events = next_events(&mut body);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(control(&events[0])["streamClosed"], true);
        assert_ended(&mut body);
    }

    #[tokio::test(start_paused = true)]
    async fn the_connection_ends_after_its_lifetime() {
        let (mut service, mut handle) = layered(Duration::from_secs(10));
        let (_, mut body) = open(&mut service, &mut handle, &uri(), data(T1, "one"));
        next_events(&mut body);
        assert_pending!(poll_events(&mut body));
        let (_, respond) = next_request(&mut handle);
        let (wait, dropped) = guarded_wait();
        respond.send_response(waiting(T1, wait));
        assert_pending!(poll_events(&mut body));

        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_pending!(poll_events(&mut body));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(body.is_woken());
        assert_ended(&mut body);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the wait outlived the stream"
        );
        assert_no_request(&mut handle);
    }

    #[tokio::test(start_paused = true)]
    async fn the_connection_ends_on_time_while_data_keeps_coming() {
        let (mut service, mut handle) = layered(Duration::from_secs(10));
        let (_, mut body) = open(&mut service, &mut handle, &uri(), data(T1, "one"));
        tokio::time::advance(Duration::from_secs(10)).await;
        // The events already read are delivered, then the stream ends
        // instead of reading more.
        assert_eq!(next_events(&mut body)[0].data, "one");
        assert_ended(&mut body);
        assert_no_request(&mut handle);
    }

    #[tokio::test]
    async fn dropping_the_body_drops_the_wait() {
        let (mut service, mut handle) = layered(Duration::from_secs(60));
        let (wait, dropped) = guarded_wait();
        let uri = format!("/s?offset={T1}&live=sse");
        let (_, mut body) = open(&mut service, &mut handle, &uri, waiting(T1, wait));
        next_events(&mut body);
        assert_pending!(poll_events(&mut body));
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the layer let go of the wait"
        );

        drop(body);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the wait outlived the client"
        );
    }
}

// ===========================================================================
// CacheControl
// ===========================================================================

mod cache_control {
    use super::*;

    const PUBLIC: &str = "public, max-age=60, stale-while-revalidate=300";
    const PRIVATE: &str = "private, max-age=60, stale-while-revalidate=300";

    /// The `Cache-Control` the layer gives a response of `status` (with the
    /// inner service's own `Cache-Control`, if any) to `method uri`.
    async fn cache_control(
        layer: CacheControlLayer,
        method: Method,
        uri: &str,
        status: StatusCode,
        inner: Option<&'static str>,
    ) -> String {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<String>, Response<String>, _>(layer);
        assert_ready_ok!(service.poll_ready());
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(String::new())
            .unwrap();
        let mut future = task::spawn(service.call(request));
        let (_, respond) = assert_ready!(handle.poll_request()).unwrap();
        let mut response = Response::builder().status(status);
        if let Some(value) = inner {
            response = response.header(CACHE_CONTROL, value);
        }
        respond.send_response(response.body(String::from("body")).unwrap());
        let response = assert_ready_ok!(future.poll());
        assert_eq!(response.status(), status);
        let values: Vec<String> = response
            .headers()
            .get_all(CACHE_CONTROL)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(values.len(), 1, "{values:?}");
        assert_eq!(response.into_body(), "body");
        values.into_iter().next().unwrap()
    }

    #[tokio::test]
    async fn follows_the_table() {
        use StatusCode as S;
        let read = format!("/s?offset={T1}");
        let long_poll = format!("/s?offset={T1}&live=long-poll&cursor=5");
        let cases: &[(Method, &str, StatusCode, &str)] = &[
            // Catch-up and long-poll reads with data.
            (Method::GET, &read, S::OK, PUBLIC),
            (Method::GET, "/s", S::OK, PUBLIC),
            (Method::GET, "/s?offset=-1", S::OK, PUBLIC),
            (Method::GET, &read, S::NOT_MODIFIED, PUBLIC),
            (Method::GET, &long_poll, S::OK, PUBLIC),
            // The tail moves.
            (Method::GET, "/s?offset=now", S::OK, "no-store"),
            (Method::GET, "/s?offset=%6Eow", S::OK, "no-store"),
            (
                Method::GET,
                "/s?offset=now&live=long-poll",
                S::OK,
                "no-store",
            ),
            // SSE.
            (Method::GET, "/s?offset=-1&live=sse", S::OK, "no-cache"),
            (Method::GET, "/s?offset=now&live=sse", S::OK, "no-cache"),
            // HEAD.
            (Method::HEAD, "/s", S::OK, "no-store"),
            (Method::HEAD, &read, S::OK, "no-store"),
            // Long-poll timeouts and errors.
            (Method::GET, &long_poll, S::NO_CONTENT, "no-store"),
            (Method::GET, &read, S::NOT_FOUND, "no-store"),
            (Method::GET, &read, S::BAD_REQUEST, "no-store"),
            (Method::GET, &read, S::GONE, "no-store"),
            (Method::GET, &read, S::INTERNAL_SERVER_ERROR, "no-store"),
            // Writes.
            (Method::PUT, "/s", S::CREATED, "no-store"),
            (Method::PUT, "/s", S::OK, "no-store"),
            (Method::POST, "/s", S::OK, "no-store"),
            (Method::POST, "/s", S::NO_CONTENT, "no-store"),
            (Method::DELETE, "/s", S::NO_CONTENT, "no-store"),
            (Method::OPTIONS, "/s", S::NO_CONTENT, "no-store"),
        ];
        for (method, uri, status, want) in cases {
            let got =
                cache_control(CacheControlLayer::new(), method.clone(), uri, *status, None).await;
            assert_eq!(got, *want, "{method} {uri} -> {status}");
        }
    }

    #[tokio::test]
    async fn private_and_custom_read_policies_apply_to_cacheable_reads_only() {
        let read = format!("/s?offset={T1}");
        let private = || CacheControlLayer::new().private();
        let got = cache_control(private(), Method::GET, &read, StatusCode::OK, None).await;
        assert_eq!(got, PRIVATE);
        let got = cache_control(private(), Method::HEAD, "/s", StatusCode::OK, None).await;
        assert_eq!(got, "no-store");
        let got = cache_control(private(), Method::POST, "/s", StatusCode::OK, None).await;
        assert_eq!(got, "no-store");

        let custom = || CacheControlLayer::new().reads(HeaderValue::from_static("max-age=5"));
        let got = cache_control(custom(), Method::GET, &read, StatusCode::OK, None).await;
        assert_eq!(got, "max-age=5");
        let got = cache_control(custom(), Method::GET, "/s?offset=now", StatusCode::OK, None).await;
        assert_eq!(got, "no-store");
    }

    #[tokio::test]
    async fn an_inner_cache_control_is_kept() {
        let read = format!("/s?offset={T1}");
        for (method, uri, status) in [
            (Method::GET, read.as_str(), StatusCode::OK),
            (Method::GET, "/s?offset=now", StatusCode::OK),
            (Method::GET, "/s?offset=-1&live=sse", StatusCode::OK),
            (Method::HEAD, "/s", StatusCode::OK),
            (Method::POST, "/s", StatusCode::NO_CONTENT),
            (Method::GET, read.as_str(), StatusCode::NOT_FOUND),
        ] {
            let got = cache_control(
                CacheControlLayer::new(),
                method.clone(),
                uri,
                status,
                Some("private, no-transform"),
            )
            .await;
            assert_eq!(got, "private, no-transform", "{method} {uri}");
        }
    }
}
