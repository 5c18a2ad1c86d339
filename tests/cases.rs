//! The cases of shared/cases/README.md, each turned into tests of its kind of
//! fault, over real HTTP against the full stack (see `support`).

mod support;

use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;
use support::{chunked, parse_events, stream, Event, Options, Server};
use tower_durable_streams::Offset;

const TEXT: (&str, &str) = ("content-type", "text/plain");
const JSON: (&str, &str) = ("content-type", "application/json");
const CLOSE: (&str, &str) = ("stream-closed", "true");

/// A generous bound for "at once": far below the 5 s long-poll timeout.
const PROMPT: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn forked_from(name: &str) -> (&'static str, String) {
    ("stream-forked-from", stream(name))
}

/// Whether a control event's fields are only the protocol's four.
fn only_control_fields(control: &serde_json::Map<String, serde_json::Value>) -> bool {
    control.keys().all(|k| {
        [
            "streamNextOffset",
            "streamCursor",
            "upToDate",
            "streamClosed",
        ]
        .contains(&k.as_str())
    })
}

fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

fn controls(events: &[Event]) -> usize {
    events.iter().filter(|e| e.kind == "control").count()
}

fn data_events(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e.kind == "data")
        .map(|e| e.data.as_str())
        .collect()
}

// ---------------------------------------------------------------------------
// Forks: rejected forks take no reference on their source.

#[tokio::test]
async fn fork_with_mismatched_content_type_is_409_and_leaves_source_deletable() {
    // C03
    let s = Server::start().await;
    assert_eq!(s.put("src", &[TEXT], "data").await.status, 201);
    let from = forked_from("src");
    let fork = s.put("fork", &[JSON, (from.0, &from.1)], "").await;
    assert_eq!(fork.status, 409, "{fork:?}");
    assert_eq!(s.delete("src").await.status, 204);
    assert_eq!(
        s.head("src").await.status,
        404,
        "a leaked reference shows as 410"
    );
    assert_eq!(s.head("fork").await.status, 404);
}

/// Asserts that a fork `PUT` is refused with `status` and creates nothing.
async fn fork_refused(s: &Server, status: u16, why: &str, headers: &[(&str, &str)]) {
    let name = format!("fork-{}", why.replace(' ', "-"));
    let reply = s.put(&name, headers, "").await;
    assert_eq!(reply.status, status, "{why}: {reply:?}");
    assert_eq!(
        s.head(&name).await.status,
        404,
        "{why}: the fork was created"
    );
}

#[tokio::test]
async fn every_rejected_fork_leaves_its_source_deletable() {
    // C03
    let s = Server::start().await;
    assert_eq!(s.put("src", &[TEXT], "data").await.status, 201);
    assert_eq!(s.put("jsrc", &[JSON], r#"[{"a":1}]"#).await.status, 201);
    let zero = Offset::ZERO.to_string();
    let mid = Offset::new(0, 2).unwrap().to_string();
    let beyond = Offset::new(2, 8).unwrap().to_string();
    let src = stream("src");
    let jsrc = stream("jsrc");
    let from = "stream-forked-from";
    let at = "stream-fork-offset";
    let sub = "stream-fork-sub-offset";
    fork_refused(&s, 409, "content type", &[JSON, (from, &src)]).await;
    fork_refused(&s, 404, "missing source", &[(from, "/v1/stream/none")]).await;
    fork_refused(&s, 400, "beyond tail", &[(from, &src), (at, &beyond)]).await;
    fork_refused(&s, 400, "malformed offset", &[(from, &src), (at, "abc")]).await;
    fork_refused(&s, 400, "inside a record", &[(from, &src), (at, &mid)]).await;
    fork_refused(
        &s,
        400,
        "sub-offset overshoot",
        &[(from, &src), (at, &zero), (sub, "5")],
    )
    .await;
    fork_refused(&s, 400, "signed sub-offset", &[(from, &src), (sub, "+1")]).await;
    fork_refused(&s, 400, "negative sub-offset", &[(from, &src), (sub, "-1")]).await;
    fork_refused(
        &s,
        400,
        "json overshoot",
        &[(from, &jsrc), (at, &zero), (sub, "2")],
    )
    .await;
    fork_refused(&s, 400, "bad ttl", &[(from, &src), ("stream-ttl", "01")]).await;
    let bad_body = s.put("fork-bad-body", &[(from, &jsrc)], "{bad").await;
    assert_eq!(bad_body.status, 400, "{bad_body:?}");
    assert_eq!(s.head("fork-bad-body").await.status, 404);
    for source in ["src", "jsrc"] {
        assert_eq!(s.delete(source).await.status, 204);
        assert_eq!(
            s.head(source).await.status,
            404,
            "{source} kept a reference"
        );
    }
}

#[tokio::test]
async fn accepted_fork_holds_one_reference_until_it_is_deleted() {
    // C03: the detector works (a real reference shows as 410), re-creating a
    // fork takes no second reference, and a fork of a soft-deleted source
    // (409) takes none either.
    let s = Server::start().await;
    let from = forked_from("src");
    let fork_headers = [(from.0, from.1.as_str())];
    assert_eq!(s.put("src", &[TEXT], "data").await.status, 201);
    assert_eq!(s.put("fork", &fork_headers, "").await.status, 201);
    assert_eq!(s.put("fork", &fork_headers, "").await.status, 200);
    assert_eq!(s.delete("src").await.status, 204);
    assert_eq!(s.head("src").await.status, 410);
    assert_eq!(s.put("late", &fork_headers, "").await.status, 409);
    assert_eq!(s.get("fork?offset=-1").await.text(), "data");
    assert_eq!(s.delete("fork").await.status, 204);
    assert_eq!(s.head("src").await.status, 404);
    assert_eq!(s.head("late").await.status, 404);
}

// ---------------------------------------------------------------------------
// Close wakes long-poll and SSE waiters, after delivering the final data.

#[tokio::test]
async fn long_poll_waiter_gets_the_final_chunk_of_append_and_close() {
    // C05
    let s = Server::start().await;
    // The close lands before, around and well after the waiter registers.
    for delay in [0, 1, 10, 100] {
        let name = format!("s{delay}");
        let o1 = s.put(&name, &[TEXT], "initial").await.next_offset();
        let poll = s.spawn_get(format!("{name}?offset={o1}&live=long-poll"));
        tokio::time::sleep(ms(delay)).await;
        let close = s.post(&name, &[TEXT, CLOSE], "final").await;
        assert_eq!(close.status, 204, "{close:?}");
        assert!(close.is_true("stream-closed"));
        let of = close.next_offset();

        let (reply, _) = poll.await.unwrap();
        assert_eq!(reply.status, 200, "delay {delay} ms: {reply:?}");
        assert_eq!(reply.text(), "final");
        assert_eq!(reply.header("stream-next-offset"), Some(of.as_str()));
        assert!(reply.is_true("stream-up-to-date"), "{reply:?}");
        assert!(reply.is_true("stream-closed"), "{reply:?}");

        let started = Instant::now();
        let eof = s.get(&format!("{name}?offset={of}&live=long-poll")).await;
        assert!(started.elapsed() < PROMPT, "waited on a closed stream");
        assert_eq!(eof.status, 204, "{eof:?}");
        assert!(eof.is_true("stream-closed"));
        assert!(eof.is_true("stream-up-to-date"));
        assert_eq!(eof.header("stream-next-offset"), Some(of.as_str()));
    }
}

/// A long-poll woken by an append answers exactly as one that found the
/// data already there: same status, body and headers (but the date, the
/// time-based cursor, and caching for `offset=now`), for text and JSON, with
/// and without closure, from an offset and from `now`.
#[tokio::test]
async fn a_woken_long_poll_answers_like_one_that_found_the_data() {
    let s = Server::start().await;
    let cases: [(&str, (&str, &str), &str, bool); 4] = [
        ("text", TEXT, "more text", false),
        ("json", JSON, r#"[{"n":1},{"n":2}]"#, false),
        ("text-closed", TEXT, "last words", true),
        ("json-closed", JSON, r#"{"n":3}"#, true),
    ];
    for (name, content_type, body, close) in cases {
        for from_now in [false, true] {
            let name = format!("{name}-{from_now}");
            let initial = if content_type == JSON {
                r#"{"n":0}"#
            } else {
                "first"
            };
            let tail = s.put(&name, &[content_type], initial).await.next_offset();
            let at = if from_now { "now" } else { tail.as_str() };
            let poll = s.spawn_get(format!("{name}?offset={at}&live=long-poll"));
            tokio::time::sleep(ms(100)).await;
            assert!(!poll.is_finished(), "{name}: long-poll did not wait");
            let headers: &[(&str, &str)] = if close {
                &[content_type, CLOSE]
            } else {
                &[content_type]
            };
            let appended = s.post(&name, headers, body).await;
            assert!(appended.status.is_success(), "{name}: {appended:?}");
            let (woken, _) = poll.await.unwrap();
            let found = s.get(&format!("{name}?offset={tail}&live=long-poll")).await;

            assert_eq!(woken.status, 200, "{name}: {woken:?}");
            assert_eq!(woken.status, found.status, "{name}");
            assert_eq!(woken.body, found.body, "{name}");
            // `offset=now` is never cacheable; the read it compares with is.
            let skipped: &[&str] = if from_now {
                &["date", "stream-cursor", "cache-control"]
            } else {
                &["date", "stream-cursor"]
            };
            let comparable = |reply: &support::Reply| {
                let mut headers: Vec<(String, String)> = reply
                    .headers
                    .iter()
                    .filter(|(n, _)| !skipped.contains(&n.as_str()))
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                    .collect();
                headers.sort();
                headers
            };
            assert_eq!(comparable(&woken), comparable(&found), "{name}");
            assert!(woken.header("etag").is_some(), "{name}: {woken:?}");
            assert_eq!(woken.is_true("stream-closed"), close, "{name}");
            assert_eq!(
                woken.header("stream-cursor").is_some(),
                !close,
                "{name}: a cursor only while the stream is open"
            );
        }
    }
}

#[tokio::test]
async fn close_only_wakes_long_poll_waiters_at_once() {
    // C05
    let s = Server::start().await;
    let form = ("content-type", "application/x-www-form-urlencoded");
    let closes: [(&str, &[(&str, &str)]); 2] = [("plain", &[CLOSE]), ("form", &[CLOSE, form])];
    for (name, headers) in closes {
        let o1 = s.put(name, &[TEXT], "data").await.next_offset();
        let poll = s.spawn_get(format!("{name}?offset={o1}&live=long-poll"));
        tokio::time::sleep(ms(100)).await;
        assert!(!poll.is_finished(), "{name}: long-poll did not wait");
        let close = s.post(name, headers, "").await;
        let closed_at = Instant::now();
        assert_eq!(close.status, 204, "{name}: {close:?}");
        assert!(close.is_true("stream-closed"));
        assert_eq!(close.header("stream-next-offset"), Some(o1.as_str()));

        let (reply, _) = poll.await.unwrap();
        assert!(
            closed_at.elapsed() < PROMPT,
            "{name}: waited for the timeout"
        );
        assert_eq!(reply.status, 204, "{name}: {reply:?}");
        assert!(reply.is_true("stream-closed"));
        assert!(reply.is_true("stream-up-to-date"));
        assert_eq!(reply.header("stream-next-offset"), Some(o1.as_str()));
    }
}

#[tokio::test]
async fn bodiless_close_wakes_long_poll_waiters_at_once() {
    // C05: `curl -X POST` sends neither Content-Length nor a body.
    let s = Server::start().await;
    let o1 = s.put("s", &[TEXT], "data").await.next_offset();
    let poll = s.spawn_get(format!("s?offset={o1}&live=long-poll"));
    tokio::time::sleep(ms(100)).await;
    let close = s
        .raw(
            "POST /v1/stream/s HTTP/1.1\r\nHost: t\r\nStream-Closed: true\r\n\
             Connection: close\r\n\r\n",
        )
        .await;
    let closed_at = Instant::now();
    assert_eq!(close.status, 204, "{close:?}");
    assert_eq!(close.header("stream-closed"), Some("true"));
    let (reply, _) = poll.await.unwrap();
    assert!(closed_at.elapsed() < PROMPT, "waited for the timeout");
    assert_eq!(reply.status, 204);
    assert!(reply.is_true("stream-closed"));
    assert_eq!(reply.header("stream-next-offset"), Some(o1.as_str()));
}

#[tokio::test]
async fn sse_reader_gets_the_final_chunk_then_closure_and_eof() {
    // C05
    let s = Server::start().await;
    let o1 = s.put("s", &[TEXT], "initial").await.next_offset();
    let mut sse = s.sse(&format!("s?offset={o1}&live=sse")).await;
    sse.read_until(PROMPT, |e| controls(e) == 1).await;
    let of = s.post("s", &[TEXT, CLOSE], "final").await.next_offset();
    let events = sse.read_to_end(PROMPT).await;
    assert!(
        sse.ended,
        "the connection stays open after closure: {events:?}"
    );
    assert_eq!(kinds(&events), ["control", "data", "control"]);
    assert_eq!(events[1].data, "final");
    let last = events[2].control();
    assert_eq!(last["streamClosed"], json!(true), "{last:?}");
    assert_eq!(last["streamNextOffset"], json!(of));
}

#[tokio::test]
async fn close_only_ends_sse_readers_at_once() {
    // C05
    let s = Server::start().await;
    let o1 = s.put("s", &[TEXT], "data").await.next_offset();
    let mut sse = s.sse(&format!("s?offset={o1}&live=sse")).await;
    sse.read_until(PROMPT, |e| controls(e) == 1).await;
    assert_eq!(s.post("s", &[CLOSE], "").await.status, 204);
    let events = sse.read_to_end(PROMPT).await;
    assert!(
        sse.ended,
        "the connection stays open after closure: {events:?}"
    );
    assert_eq!(kinds(&events), ["control", "control"]);
    let last = events[1].control();
    assert_eq!(last["streamClosed"], json!(true));
    assert_eq!(last["streamNextOffset"], json!(o1));
}

#[tokio::test]
async fn live_readers_keep_a_stream_with_a_ttl_alive() {
    // PROTOCOL.md 5.1: a live read renews the TTL when it starts, and a
    // stream with active live readers does not expire. Once they are gone,
    // the TTL runs from their last renewal.
    let s = Server::with(Options {
        long_poll_timeout: Duration::from_secs(3),
        ..Options::default()
    })
    .await;
    let tail = s
        .put("t", &[TEXT, ("stream-ttl", "2")], "data")
        .await
        .next_offset();
    let waiting = s.spawn_get(format!("t?offset={tail}&live=long-poll"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let head = s.head("t").await;
    assert_eq!(head.status, 200, "expired under a waiting reader: {head:?}");
    let (reply, _) = waiting.await.unwrap();
    assert_eq!(reply.status, 204, "{reply:?}");
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(s.head("t").await.status, 404, "outlived its TTL");
}

#[tokio::test]
async fn a_waiting_reader_learns_its_stream_reached_expires_at() {
    // Stream-Expires-At is absolute: readers do not extend it, and one
    // waiting at the tail is answered as HEAD would be, not with a 204.
    let s = Server::start().await;
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let at = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let tail = s
        .put("x", &[TEXT, ("stream-expires-at", at.as_str())], "data")
        .await
        .next_offset();
    let started = Instant::now();
    let reply = s.get(&format!("x?offset={tail}&live=long-poll")).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_sse_read_with_a_matching_etag_is_still_an_event_stream() {
    // PROTOCOL.md 5.8 answers SSE with 200, 400, 404 or 429: never 304.
    let s = Server::start().await;
    let tail = s.put("e", &[TEXT], "data").await.next_offset();
    let etag = s.get(&format!("e?offset={tail}")).await;
    let etag = etag.header("etag").expect("an ETag").to_owned();
    let mut conn = s.connect().await;
    conn.send(format!(
        "GET /v1/stream/e?offset={tail}&live=sse HTTP/1.1\r\nHost: t\r\n\
         If-None-Match: {etag}\r\n\r\n"
    ))
    .await;
    let head = conn.read_head().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
}

#[tokio::test]
async fn deleting_a_stream_ends_its_sse_readers() {
    let s = Server::start().await;
    let o1 = s.put("s", &[TEXT], "data").await.next_offset();
    let mut sse = s.sse(&format!("s?offset={o1}&live=sse")).await;
    sse.read_until(PROMPT, |e| controls(e) == 1).await;
    assert_eq!(s.delete("s").await.status, 204);
    let events = sse.read_to_end(PROMPT).await;
    assert!(sse.ended, "the reader outlived its stream: {events:?}");
    assert_eq!(kinds(&events), ["control"]);
}

#[tokio::test]
async fn sse_readers_get_every_append_in_order_binary_as_base64() {
    use base64::Engine;
    let s = Server::start().await;
    let binary = ("content-type", "application/octet-stream");
    let o1 = s.put("b", &[binary], vec![0u8, 1]).await.next_offset();
    let mut sse = s.sse(&format!("b?offset={o1}&live=sse")).await;
    sse.read_until(PROMPT, |e| controls(e) == 1).await;
    let mut tail = o1;
    for byte in 2u8..6 {
        tail = s
            .post("b", &[binary], vec![byte, b'\n'])
            .await
            .next_offset();
    }
    let events = sse
        .read_until(PROMPT, |e| {
            e.last().is_some_and(|e| {
                e.kind == "control" && e.control()["streamNextOffset"] == json!(tail)
            })
        })
        .await;
    let mut bytes = Vec::new();
    for event in events.iter().filter(|e| e.kind == "data") {
        bytes.extend(
            base64::engine::general_purpose::STANDARD
                .decode(&event.data)
                .unwrap(),
        );
    }
    assert_eq!(bytes, [2, b'\n', 3, b'\n', 4, b'\n', 5, b'\n']);
}

// ---------------------------------------------------------------------------
// Strict integers in Stream-TTL and producer headers.

#[tokio::test]
async fn stream_ttl_accepts_only_plain_decimal_integers() {
    // C10
    let s = Server::start().await;
    for (i, ttl) in ["+3600", "03600", "3600.0", "3.6e3", "-1", "0x10", "", "1 0"]
        .into_iter()
        .enumerate()
    {
        let name = format!("bad-{i}");
        let reply = s.put(&name, &[TEXT, ("stream-ttl", ttl)], "").await;
        assert_eq!(reply.status, 400, "Stream-TTL: {ttl:?}");
        assert_eq!(
            s.head(&name).await.status,
            404,
            "Stream-TTL: {ttl:?} created"
        );
    }
    assert_eq!(
        s.put("ok", &[TEXT, ("stream-ttl", "3600")], "")
            .await
            .status,
        201
    );
    let head = s.head("ok").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("stream-ttl"), Some("3600"));
}

#[tokio::test]
async fn stream_ttl_beyond_u64_is_accepted_or_refused_never_an_error() {
    // C10
    let s = Server::start().await;
    let huge = ("stream-ttl", "18446744073709551616");
    let reply = s.put("huge", &[TEXT, huge], "x").await;
    assert!([201, 400].contains(&reply.status.as_u16()), "{reply:?}");
    if reply.status == 201 {
        assert_eq!(s.head("huge").await.status, 200);
        assert_eq!(s.get("huge?offset=-1").await.text(), "x");
        assert_eq!(s.post("huge", &[TEXT], "y").await.status, 204);
    }
}

#[tokio::test]
async fn stream_expiry_headers_are_validated_before_creating() {
    // C10
    let s = Server::start().await;
    let ttl = ("stream-ttl", "60");
    let at = ("stream-expires-at", "2099-01-01T00:00:00Z");
    let bad_at = ("stream-expires-at", "not-a-timestamp");
    assert_eq!(s.put("both", &[TEXT, ttl, at], "").await.status, 400);
    assert_eq!(s.head("both").await.status, 404);
    assert_eq!(s.put("bad-at", &[TEXT, bad_at], "").await.status, 400);
    assert_eq!(s.head("bad-at").await.status, 404);
    assert_eq!(s.put("at", &[TEXT, at], "").await.status, 201);
    assert!(s.head("at").await.header("stream-expires-at").is_some());
}

#[tokio::test]
async fn producer_headers_accept_only_integers_up_to_2_pow_53_minus_1() {
    // C10
    let s = Server::start().await;
    let tail = s.put("s", &[TEXT], "base").await.next_offset();
    let id = ("producer-id", "p");
    for bad in [
        "+1",
        "1abc",
        "1e3",
        "-1",
        "9007199254740992",
        "",
        "0x1",
        "1.0",
    ] {
        let epoch = [TEXT, id, ("producer-epoch", bad), ("producer-seq", "0")];
        let reply = s.post("s", &epoch, "x").await;
        assert_eq!(reply.status, 400, "Producer-Epoch: {bad:?}");
        let seq = [TEXT, id, ("producer-epoch", "0"), ("producer-seq", bad)];
        let reply = s.post("s", &seq, "x").await;
        assert_eq!(reply.status, 400, "Producer-Seq: {bad:?}");
    }
    let empty_id = [
        TEXT,
        ("producer-id", ""),
        ("producer-epoch", "0"),
        ("producer-seq", "0"),
    ];
    assert_eq!(s.post("s", &empty_id, "x").await.status, 400);
    let partial = [TEXT, id, ("producer-epoch", "0")];
    assert_eq!(s.post("s", &partial, "x").await.status, 400);

    assert_eq!(
        s.head("s").await.next_offset(),
        tail,
        "a refused append wrote"
    );
    assert_eq!(s.get("s?offset=-1").await.text(), "base");

    let max = [
        TEXT,
        id,
        ("producer-epoch", "9007199254740991"),
        ("producer-seq", "0"),
    ];
    let reply = s.post("s", &max, "x").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("producer-epoch"), Some("9007199254740991"));
}

// ---------------------------------------------------------------------------
// SSE framing: payload line breaks never end or inject events.

const CRLF_ATTACK: &str =
    "safe content\r\n\r\nevent: control\r\ndata: {\"injected\":true}\r\n\r\nmore safe content";
const LF_ATTACK: &str = "start\n\nevent: data\ndata: fake-event\n\nend";
const CR_ATTACK: &str = "start\r\revent: control\rdata: {\"cr_injected\":true}\r\rend";

/// What a conforming parser reassembles: every CR, LF or CRLF becomes LF.
fn reassembled(payload: &str) -> String {
    payload.replace("\r\n", "\n").replace('\r', "\n")
}

fn assert_one_data_then_control(events: &[Event], payload: &str, why: &str) {
    assert_eq!(kinds(events), ["data", "control"], "{why}: {events:?}");
    assert_eq!(events[0].data, reassembled(payload), "{why}");
    let control = events[1].control();
    assert!(only_control_fields(&control), "{why}: {control:?}");
}

#[tokio::test]
async fn sse_line_breaks_in_stored_text_cannot_inject_events() {
    // C13: read to EOF from closed streams, so every event is counted.
    let s = Server::start().await;
    for (name, payload) in [("crlf", CRLF_ATTACK), ("lf", LF_ATTACK), ("cr", CR_ATTACK)] {
        assert_eq!(s.put(name, &[TEXT, CLOSE], payload).await.status, 201);
        let mut sse = s.sse(&format!("{name}?offset=-1&live=sse")).await;
        let events = sse.read_to_end(PROMPT).await;
        assert!(sse.ended, "{name}: closed stream's SSE did not end");
        assert_one_data_then_control(&events, payload, name);
        // SSE cannot tell CR from LF; catch-up reads keep the exact bytes.
        let read = s.get(&format!("{name}?offset=-1")).await;
        assert_eq!(read.text(), payload);
    }
}

#[tokio::test]
async fn sse_line_breaks_in_live_appends_cannot_inject_events() {
    // C13: the same payloads, delivered to a reader waiting at the tail.
    let s = Server::start().await;
    for (name, payload) in [("crlf", CRLF_ATTACK), ("lf", LF_ATTACK), ("cr", CR_ATTACK)] {
        let tail = s.put(name, &[TEXT], "").await.next_offset();
        let mut sse = s.sse(&format!("{name}?offset={tail}&live=sse")).await;
        sse.read_until(PROMPT, |e| controls(e) == 1).await;
        assert_eq!(s.post(name, &[TEXT], payload).await.status, 204);
        let events = sse.read_until(PROMPT, |e| controls(e) == 2).await;
        assert_eq!(kinds(&events[..1]), ["control"], "{name}: {events:?}");
        assert_one_data_then_control(&events[1..], payload, name);
    }
}

#[tokio::test]
async fn sse_unicode_separators_stay_inside_one_data_line() {
    // C13
    let s = Server::start().await;
    let payload = "a\u{85}b\u{2028}c\u{2029}d";
    assert_eq!(s.put("u", &[TEXT, CLOSE], payload).await.status, 201);
    let mut sse = s.sse("u?offset=-1&live=sse").await;
    let events = sse.read_to_end(PROMPT).await;
    assert_eq!(kinds(&events), ["data", "control"]);
    assert_eq!(events[0].data, payload);
    let line = format!("\ndata:{payload}\n");
    let raw = String::from_utf8(sse.raw.clone()).unwrap();
    assert!(raw.contains(&line), "{raw:?}");
}

#[tokio::test]
async fn sse_json_with_raw_line_breaks_is_one_parseable_event() {
    // C13: JSON whitespace may hold CR and LF; a blank line must not split
    // the data event.
    let s = Server::start().await;
    s.put("j", &[JSON], "").await;
    let body = "{\"a\":\r\n\r\n1,\r\r\"b\":\n\n\"event: control\"}";
    let tail = s.post("j", &[JSON], body).await.next_offset();
    let mut sse = s.sse("j?offset=-1&live=sse").await;
    let events = sse.read_until(PROMPT, |e| controls(e) == 1).await;
    assert_eq!(kinds(&events), ["data", "control"], "{events:?}");
    let data: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data, json!([{"a": 1, "b": "event: control"}]));
    let control = events[1].control();
    assert!(only_control_fields(&control), "{control:?}");
    assert_eq!(control["streamNextOffset"], json!(tail));
}

// ---------------------------------------------------------------------------
// SSE headers and control events.

#[tokio::test]
async fn sse_response_has_event_stream_headers() {
    // C15
    let s = Server::start().await;
    s.put("s", &[TEXT], "test data").await;
    let sse = s.sse("s?offset=-1&live=sse").await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("content-length"), None);
    let cache = sse.header("cache-control").unwrap_or_default();
    assert!(cache.contains("no-cache"), "Cache-Control: {cache:?}");
    assert_eq!(sse.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn sse_control_is_one_line_of_camel_case_json() {
    // C15
    let s = Server::start().await;
    let tail = s.put("s", &[TEXT], "test data").await.next_offset();
    let mut sse = s.sse("s?offset=-1&live=sse").await;
    let events = sse.read_until(PROMPT, |e| controls(e) == 1).await;
    assert_eq!(kinds(&events), ["data", "control"]);
    assert_eq!(events[0].data, "test data");
    assert!(!events[1].data.contains('\n'), "control spans lines");
    let control = events[1].control();
    assert_eq!(control.len(), 3, "{control:?}");
    assert_eq!(control["streamNextOffset"], json!(tail));
    assert_eq!(control["upToDate"], json!(true));
    let cursor = control["streamCursor"].as_str().expect("a string cursor");
    assert!(!cursor.is_empty() && cursor.bytes().all(|b| b.is_ascii_digit()));
}

#[tokio::test]
async fn sse_control_reports_closure_and_the_connection_ends() {
    // C15
    let s = Server::start().await;
    let tail = s.put("s", &[TEXT, CLOSE], "done").await.next_offset();
    for (from, data) in [("-1", vec!["done"]), (tail.as_str(), vec![])] {
        let mut sse = s.sse(&format!("s?offset={from}&live=sse")).await;
        let events = sse.read_to_end(PROMPT).await;
        assert!(sse.ended, "from {from}: SSE stays open on a closed stream");
        assert_eq!(data_events(&events), data, "from {from}");
        let last = events.last().expect("a control event").control();
        assert!(only_control_fields(&last), "{last:?}");
        assert_eq!(last["streamNextOffset"], json!(tail));
        assert_eq!(last["streamClosed"], json!(true));
        assert_eq!(last["upToDate"], json!(true), "from {from}: {last:?}");
    }
}

#[tokio::test]
async fn live_reads_of_open_streams_carry_a_numeric_cursor() {
    // C15
    let s = Server::with(Options {
        long_poll_timeout: ms(200),
        ..Options::default()
    })
    .await;
    let tail = s.put("s", &[TEXT], "x").await.next_offset();
    let is_cursor = |c: Option<&str>| c.is_some_and(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let data = s.get("s?offset=-1&live=long-poll").await;
    assert_eq!(data.status, 200);
    assert!(is_cursor(data.header("stream-cursor")), "{data:?}");
    let timeout = s.get(&format!("s?offset={tail}&live=long-poll")).await;
    assert_eq!(timeout.status, 204);
    assert!(timeout.is_true("stream-up-to-date"));
    assert_eq!(timeout.header("stream-next-offset"), Some(tail.as_str()));
    assert!(is_cursor(timeout.header("stream-cursor")), "{timeout:?}");
}

// ---------------------------------------------------------------------------
// JSON mode: one level of flattening; invalid bodies are 400 and write nothing.

#[tokio::test]
async fn json_appends_flatten_exactly_one_level() {
    // C17
    let s = Server::start().await;
    s.put("j", &[JSON], "").await;
    let bodies = [
        r#"{"event":"created"}"#,
        r#"[{"event":"a"},{"event":"b"}]"#,
        "[[1,2],[3,4]]",
        "[[[1,2,3]]]",
        r#""just a string""#,
        "42",
        "null",
    ];
    let mut after_second = String::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let reply = s.post("j", &[JSON], body).await;
        assert_eq!(reply.status, 204, "{body}: {reply:?}");
        if i == 1 {
            after_second = reply.next_offset();
        }
    }
    let all = s.get("j?offset=-1").await;
    assert_eq!(all.header("content-type"), Some("application/json"));
    let expected = json!([
        {"event": "created"},
        {"event": "a"},
        {"event": "b"},
        [1, 2],
        [3, 4],
        [[1, 2, 3]],
        "just a string",
        42,
        null
    ]);
    assert_eq!(all.json(), expected);
    let rest = s.get(&format!("j?offset={after_second}")).await;
    assert_eq!(
        rest.json(),
        json!([[1, 2], [3, 4], [[1, 2, 3]], "just a string", 42, null])
    );
}

#[tokio::test]
async fn invalid_json_appends_are_400_and_write_nothing() {
    // C17
    let s = Server::start().await;
    let tail = s.put("j", &[JSON], r#"{"n":0}"#).await.next_offset();
    for bad in [
        r#"{"a":1}{"b":2}"#,
        "{ invalid json }",
        "",
        "[]",
        "[1,",
        r#"{"a":1}]"#,
    ] {
        let reply = s.post("j", &[JSON], bad).await;
        assert_eq!(reply.status, 400, "{bad:?}: {reply:?}");
        // With an empty body, close would be a valid close-only request.
        if !bad.is_empty() {
            let closing = s.post("j", &[JSON, CLOSE], bad).await;
            assert_eq!(closing.status, 400, "{bad:?} with close: {closing:?}");
        }
        let head = s.head("j").await;
        assert_eq!(head.next_offset(), tail, "{bad:?} appended");
        assert_eq!(
            head.header("stream-closed"),
            None,
            "{bad:?} closed the stream"
        );
    }
    assert_eq!(s.get("j?offset=-1").await.json(), json!([{"n":0}]));
}

#[tokio::test]
async fn invalid_json_create_is_400_and_creates_nothing() {
    // C17
    let s = Server::start().await;
    for (i, bad) in ["{ invalid", r#"{"a":1}{"b":2}"#, "[1,"]
        .into_iter()
        .enumerate()
    {
        let name = format!("j{i}");
        assert_eq!(s.put(&name, &[JSON], bad).await.status, 400, "{bad:?}");
        assert_eq!(s.head(&name).await.status, 404, "{bad:?} created a stream");
    }
    assert_eq!(s.put("empty", &[JSON], "[]").await.status, 201);
    assert_eq!(s.get("empty?offset=-1").await.json(), json!([]));
}

// ---------------------------------------------------------------------------
// Stream-Seq: byte-wise lexicographic, strictly increasing, closed first.

/// Appends `body` with `Stream-Seq: seq` and returns the status.
async fn append_with_seq(s: &Server, name: &str, seq: &str, body: &str) -> u16 {
    let reply = s
        .post(name, &[TEXT, ("stream-seq", seq)], body.to_owned())
        .await;
    reply.status.as_u16()
}

#[tokio::test]
async fn stream_seq_is_compared_bytewise_not_numerically() {
    // C19
    let s = Server::start().await;
    s.put("s", &[TEXT], "").await;
    let steps = [
        ("2", "a", 204),
        ("10", "b", 409),
        ("2", "c", 409),
        ("3", "d", 204),
    ];
    for (seq, body, status) in steps {
        assert_eq!(
            append_with_seq(&s, "s", seq, body).await,
            status,
            "seq {seq}"
        );
    }
    assert_eq!(s.get("s?offset=-1").await.text(), "ad");

    s.put("padded", &[TEXT], "").await;
    assert_eq!(append_with_seq(&s, "padded", "09", "x").await, 204);
    assert_eq!(append_with_seq(&s, "padded", "10", "y").await, 204);

    s.put("case", &[TEXT], "").await;
    assert_eq!(append_with_seq(&s, "case", "a", "x").await, 204);
    assert_eq!(
        append_with_seq(&s, "case", "B", "y").await,
        409,
        "0x42 < 0x61"
    );
    assert_eq!(append_with_seq(&s, "case", "a", "y").await, 409, "equal");
    assert_eq!(append_with_seq(&s, "case", "a0", "y").await, 204, "longer");
    assert_eq!(s.get("case?offset=-1").await.text(), "xy");
}

#[tokio::test]
async fn stream_seq_on_a_closed_stream_is_409_with_stream_closed() {
    // C19
    let s = Server::start().await;
    s.put("s", &[TEXT], "").await;
    assert_eq!(append_with_seq(&s, "s", "b", "x").await, 204);
    let tail = s.post("s", &[CLOSE], "").await.next_offset();
    for seq in ["zzz", "a"] {
        let reply = s.post("s", &[TEXT, ("stream-seq", seq)], "late").await;
        assert_eq!(reply.status, 409, "seq {seq}");
        assert!(reply.is_true("stream-closed"), "seq {seq}: {reply:?}");
        assert_eq!(reply.header("stream-next-offset"), Some(tail.as_str()));
    }
}

#[tokio::test]
async fn refused_append_does_not_record_its_stream_seq() {
    // C19
    let s = Server::start().await;
    s.put("s", &[TEXT], "").await;
    let wrong_type = s.post("s", &[JSON, ("stream-seq", "5")], "{}").await;
    assert_eq!(wrong_type.status, 409);
    let empty = s.post("s", &[TEXT, ("stream-seq", "5")], "").await;
    assert_eq!(empty.status, 400);
    assert_eq!(append_with_seq(&s, "s", "5", "x").await, 204);
    assert_eq!(append_with_seq(&s, "s", "5", "y").await, 409);
    assert_eq!(s.get("s?offset=-1").await.text(), "x");
}

// ---------------------------------------------------------------------------
// Producer state advances only with a successful append.

/// Appends `body` to stream `s` as producer `p1`, epoch 0, sequence `seq`.
async fn produce(s: &Server, seq: &str, extra: &[(&str, &str)], body: &str) -> support::Reply {
    let mut headers = vec![
        ("producer-id", "p1"),
        ("producer-epoch", "0"),
        ("producer-seq", seq),
    ];
    headers.extend_from_slice(extra);
    s.post("s", &headers, body.to_owned()).await
}

#[tokio::test]
async fn refused_producer_append_does_not_advance_producer_state() {
    // C20
    let s = Server::start().await;
    s.put("s", &[JSON], "").await;
    assert_eq!(produce(&s, "0", &[JSON], r#"{"n":0}"#).await.status, 200);
    assert_eq!(produce(&s, "1", &[JSON], "{ bad").await.status, 400);
    let retry = produce(&s, "1", &[JSON], r#"{"n":1}"#).await;
    assert_eq!(retry.status, 200, "retry taken as a duplicate: {retry:?}");
    assert_eq!(retry.header("producer-epoch"), Some("0"));
    assert_eq!(retry.header("producer-seq"), Some("1"));
    assert_eq!(produce(&s, "2", &[TEXT], "x").await.status, 409);
    assert_eq!(produce(&s, "2", &[JSON], "[]").await.status, 400);
    assert_eq!(produce(&s, "2", &[JSON], "").await.status, 400);
    let next = produce(&s, "2", &[JSON], r#"{"n":2}"#).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.header("producer-seq"), Some("2"));
    assert_eq!(
        s.get("s?offset=-1").await.json(),
        json!([{"n":0},{"n":1},{"n":2}])
    );
}

#[tokio::test]
async fn producer_append_refused_for_its_stream_seq_can_be_retried() {
    // C20
    let s = Server::start().await;
    s.put("s", &[JSON], "").await;
    let first = produce(&s, "0", &[JSON, ("stream-seq", "b")], "1").await;
    assert_eq!(first.status, 200);
    let regressed = produce(&s, "1", &[JSON, ("stream-seq", "a")], "2").await;
    assert_eq!(regressed.status, 409);
    let retry = produce(&s, "1", &[JSON, ("stream-seq", "c")], "2").await;
    assert_eq!(retry.status, 200, "retry taken as a duplicate: {retry:?}");
    assert_eq!(retry.header("producer-seq"), Some("1"));
    assert_eq!(s.get("s?offset=-1").await.json(), json!([1, 2]));
}

// ---------------------------------------------------------------------------
// HEAD is metadata only: no TTL renewal, no waiting, no body.

#[tokio::test]
async fn head_does_not_renew_the_sliding_ttl() {
    // C24
    let s = Server::start().await;
    let ttl = ("stream-ttl", "2");
    for name in ["headed", "headed-like-a-read", "read"] {
        assert_eq!(s.put(name, &[TEXT, ttl], "x").await.status, 201);
    }
    tokio::time::sleep(ms(1500)).await;
    let head = s.head("headed").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/plain"));
    assert!(head.header("stream-next-offset").is_some());
    assert_eq!(head.header("stream-ttl"), Some("2"));
    assert_eq!(head.header("cache-control"), Some("no-store"));
    assert_eq!(head.header("stream-closed"), None);
    assert!(head.body.is_empty());
    let tail = head.next_offset();
    let read_query = format!("headed-like-a-read?offset={tail}&live=long-poll");
    assert_eq!(s.head(&read_query).await.status, 200);
    assert_eq!(s.get("read?offset=-1").await.text(), "x");

    tokio::time::sleep(ms(1200)).await;
    assert_eq!(s.head("headed").await.status, 404, "HEAD renewed the TTL");
    assert_eq!(
        s.head("headed-like-a-read").await.status,
        404,
        "HEAD renewed the TTL"
    );
    assert_eq!(
        s.head("read").await.status,
        200,
        "GET did not renew the TTL"
    );
}

#[tokio::test]
async fn head_with_live_parameters_answers_at_once() {
    // C24
    let s = Server::start().await;
    let tail = s.put("s", &[TEXT], "x").await.next_offset();
    for live in ["long-poll", "sse"] {
        let started = Instant::now();
        let head = s.head(&format!("s?offset={tail}&live={live}")).await;
        assert!(started.elapsed() < PROMPT, "HEAD with live={live} waited");
        assert_eq!(head.status, 200, "live={live}");
        assert_eq!(head.header("content-type"), Some("text/plain"));
        assert_eq!(head.next_offset(), tail);
        assert!(head.body.is_empty());
    }
}

#[tokio::test]
async fn head_sends_no_body_on_the_wire() {
    // C24
    let s = Server::start().await;
    s.put("open", &[TEXT], "some data").await;
    s.put("closed", &[TEXT, CLOSE], "done").await;
    let head = |name: &str| {
        format!("HEAD /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    };
    for name in ["open", "closed", "does-not-exist"] {
        let reply = s.raw(head(name)).await;
        assert!(
            reply.after_head.is_empty(),
            "{name}: body {:?}",
            reply.after_head
        );
        let closed = reply.header("stream-closed");
        match name {
            "open" => assert_eq!((reply.status, closed), (200, None)),
            "closed" => assert_eq!((reply.status, closed), (200, Some("true"))),
            _ => assert_eq!(reply.status, 404),
        }
    }
}

// ---------------------------------------------------------------------------
// Wake-ups are never lost, however an append races a waiter.

/// Half the long-poll timeout: a missed wake-up shows as a slow `204`.
const RACE_BOUND: Duration = Duration::from_millis(2500);

/// How many task yields, at most, separate a racing read from its append.
const RACE_SPREAD: usize = 12;

/// One reader and one append racing on one stream: both connections are
/// open before either request is written, and the append is written 0 to
/// `RACE_SPREAD - 1` task yields after the read, so it lands before, while
/// and after the server registers the reader.
struct Race {
    reader: support::RawConn,
    appender: support::RawConn,
    name: String,
}

impl Race {
    async fn start(s: &Server, i: usize, live: &str) -> Self {
        let name = format!("race-{live}-{i}");
        let tail = s.put(&name, &[TEXT], "").await.next_offset();
        let mut reader = s.connect().await;
        let mut appender = s.connect().await;
        reader
            .send(format!(
                "GET /v1/stream/{name}?offset={tail}&live={live} HTTP/1.1\r\nHost: t\r\n\
                 Connection: close\r\n\r\n"
            ))
            .await;
        for _ in 0..i % RACE_SPREAD {
            tokio::task::yield_now().await;
        }
        appender
            .send(format!(
                "POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
                 Content-Length: 1\r\nConnection: close\r\n\r\nx"
            ))
            .await;
        Self {
            reader,
            appender,
            name,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appends_wake_every_long_poll() {
    // C25
    let s = Server::start().await;
    let started = Instant::now();
    let mut polls = Vec::new();
    for i in 0..100 {
        let race = Race::start(&s, i, "long-poll").await;
        assert_eq!(race.appender.finish().await.status, 204, "{}", race.name);
        let reader = race.reader;
        polls.push((race.name, tokio::spawn(reader.finish())));
    }
    for (name, poll) in polls {
        let reply = poll.await.unwrap();
        assert_eq!(reply.status, 200, "{name} missed its wake-up: {reply:?}");
        assert_eq!(reply.body(), b"x", "{name}");
    }
    let took = started.elapsed();
    assert!(took < RACE_BOUND, "100 races took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appends_reach_every_sse_reader() {
    // C25
    let s = Server::start().await;
    let started = Instant::now();
    let mut readers = Vec::new();
    for i in 0..50 {
        let race = Race::start(&s, i, "sse").await;
        assert_eq!(race.appender.finish().await.status, 204, "{}", race.name);
        let mut reader = race.reader;
        readers.push((
            race.name,
            tokio::spawn(async move {
                reader
                    .read_until_contains(b"event: data\ndata:x\n", RACE_BOUND)
                    .await
            }),
        ));
    }
    for (name, reader) in readers {
        assert!(reader.await.unwrap(), "{name} missed its wake-up");
    }
    let took = started.elapsed();
    assert!(took < RACE_BOUND, "50 races took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_append_wakes_every_long_poll_on_the_stream() {
    // C25
    let s = Server::start().await;
    let tail = s.put("s", &[TEXT], "").await.next_offset();
    let polls: Vec<_> = (0..50)
        .map(|_| s.spawn_get(format!("s?offset={tail}&live=long-poll")))
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(s.post("s", &[TEXT], "x").await.status, 204);
    for poll in polls {
        let (reply, took) = poll.await.unwrap();
        assert_eq!((reply.status.as_u16(), reply.text()), (200, "x"));
        assert!(took < RACE_BOUND, "took {took:?}");
    }
}

// ---------------------------------------------------------------------------
// Forks: inherited data at once; only the fork's own appends wake its readers.

#[tokio::test]
async fn fork_long_poll_in_the_inherited_range_returns_at_once() {
    // C27
    let s = Server::start().await;
    let source_tail = s.put("src", &[TEXT], "source").await.next_offset();
    let from = forked_from("src");
    let fork = s.put("fork", &[(from.0, &from.1)], "").await;
    assert_eq!(fork.status, 201);
    assert_eq!(fork.next_offset(), source_tail, "inherited offsets differ");
    let started = Instant::now();
    let reply = s.get("fork?offset=-1&live=long-poll").await;
    assert!(started.elapsed() < PROMPT, "waited on inherited data");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "source");
    assert!(reply.is_true("stream-up-to-date"));
    assert_eq!(reply.next_offset(), source_tail);
}

#[tokio::test]
async fn source_appends_never_wake_fork_long_polls() {
    // C27
    let s = Server::start().await;
    let forked_at = s.put("src", &[TEXT], "source").await.next_offset();
    let from = forked_from("src");
    s.put("fork", &[(from.0, &from.1)], "").await;
    let poll = s.spawn_get(format!("fork?offset={forked_at}&live=long-poll"));
    tokio::time::sleep(ms(100)).await;
    assert_eq!(s.post("src", &[TEXT], " source extra").await.status, 204);
    tokio::time::sleep(ms(300)).await;
    assert!(
        !poll.is_finished(),
        "a source append released a fork waiter"
    );
    assert_eq!(s.post("fork", &[TEXT], " fork new").await.status, 204);
    let (reply, _) = poll.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), " fork new");
    assert_eq!(s.get("fork?offset=-1").await.text(), "source fork new");
    let tail_read = format!("fork?offset={forked_at}");
    assert_eq!(s.get(&tail_read).await.text(), " fork new");
    let source_read = format!("src?offset={forked_at}");
    assert_eq!(s.get(&source_read).await.text(), " source extra");
}

#[tokio::test]
async fn fork_at_an_earlier_offset_waits_on_its_own_tail() {
    // C27
    let s = Server::start().await;
    s.put("src", &[TEXT], "").await;
    let after_a = s.post("src", &[TEXT], "a").await.next_offset();
    s.post("src", &[TEXT], "b").await;
    let from = forked_from("src");
    let fork = s
        .put(
            "fork",
            &[(from.0, &from.1), ("stream-fork-offset", &after_a)],
            "",
        )
        .await;
    assert_eq!(fork.status, 201);
    assert_eq!(fork.next_offset(), after_a);
    let inherited = s.get("fork?offset=-1&live=long-poll").await;
    assert_eq!((inherited.status.as_u16(), inherited.text()), (200, "a"));
    let poll = s.spawn_get(format!("fork?offset={after_a}&live=long-poll"));
    tokio::time::sleep(ms(100)).await;
    s.post("src", &[TEXT], "c").await;
    tokio::time::sleep(ms(300)).await;
    assert!(
        !poll.is_finished(),
        "a source append released a fork waiter"
    );
    s.post("fork", &[TEXT], "F").await;
    let (reply, _) = poll.await.unwrap();
    assert_eq!((reply.status.as_u16(), reply.text()), (200, "F"));
    assert_eq!(s.get("fork?offset=-1").await.text(), "aF");
}

#[tokio::test]
async fn fork_sse_delivers_inherited_then_own_data_never_source_appends() {
    // C27
    let s = Server::start().await;
    s.put("src", &[TEXT], "source").await;
    let from = forked_from("src");
    s.put("fork", &[(from.0, &from.1)], "").await;
    let mut sse = s.sse("fork?offset=-1&live=sse").await;
    sse.read_until(PROMPT, |e| controls(e) == 1).await;
    s.post("src", &[TEXT], " source extra").await;
    s.post("fork", &[TEXT], " fork new").await;
    let events = sse.read_until(PROMPT, |e| controls(e) == 2).await;
    assert_eq!(data_events(&events), ["source", " fork new"], "{events:?}");
}

// ---------------------------------------------------------------------------
// Chunked and 100-continue request bodies; oversized bodies write nothing.

fn post_chunked(name: &str, extra_headers: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
         Transfer-Encoding: chunked\r\n{extra_headers}Connection: close\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(&chunked(parts));
    request
}

#[tokio::test]
async fn chunked_appends_store_their_whole_body() {
    // C28
    let s = Server::start().await;
    let o0 = s.put("s", &[TEXT], "").await.next_offset();
    let first = s.raw(post_chunked("s", "", &[b"chunk-", b"one "])).await;
    assert_eq!(first.status, 204, "{first:?}");
    let o1 = first.header("stream-next-offset").unwrap().to_owned();
    assert!(o1 > o0, "offset did not advance");
    let last = s
        .raw(post_chunked("s", "Stream-Closed: true\r\n", &[b"last"]))
        .await;
    assert_eq!(last.status, 204, "{last:?}");
    assert_eq!(last.header("stream-closed"), Some("true"));
    assert!(last.header("stream-next-offset").unwrap() > o1.as_str());
    let read = s.get("s?offset=-1").await;
    assert_eq!(read.text(), "chunk-one last");
    assert!(read.is_true("stream-closed"));
}

#[tokio::test]
async fn empty_chunked_append_is_400_unless_it_closes() {
    // C28
    let s = Server::start().await;
    let tail = s.put("s", &[TEXT], "x").await.next_offset();
    let empty = s.raw(post_chunked("s", "", &[])).await;
    assert_eq!(empty.status, 400, "{empty:?}");
    let head = s.head("s").await;
    assert_eq!(head.next_offset(), tail);
    assert_eq!(head.header("stream-closed"), None);
    let close = s
        .raw(post_chunked("s", "Stream-Closed: true\r\n", &[]))
        .await;
    assert_eq!(close.status, 204);
    assert_eq!(close.header("stream-closed"), Some("true"));
    assert_eq!(close.header("stream-next-offset"), Some(tail.as_str()));
}

#[tokio::test]
async fn chunked_put_with_expect_100_continue_creates_with_its_body() {
    // C28
    let s = Server::start().await;
    let mut conn = s.connect().await;
    conn.send(
        "PUT /v1/stream/s HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
         Transfer-Encoding: chunked\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await;
    let interim = conn.read_head().await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim:?}");
    conn.send(chunked(&[b"in", b"it"])).await;
    let reply = conn.finish().await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(s.get("s?offset=-1").await.text(), "init");
}

#[tokio::test]
async fn oversized_bodies_are_413_and_write_nothing() {
    // C28
    let s = Server::with(Options {
        max_body_size: 1024,
        ..Options::default()
    })
    .await;
    let tail = s.put("s", &[TEXT], "base").await.next_offset();
    let part = [b'x'; 600];
    let three = [&part[..], &part[..], &part[..]];
    let producer = "Producer-Id: p\r\nProducer-Epoch: 0\r\nProducer-Seq: 0\r\n";
    let close = "Stream-Closed: true\r\n";
    for extra in ["", producer, close] {
        let reply = s.raw(post_chunked("s", extra, &three)).await;
        assert_eq!(reply.status, 413, "{extra:?}: {reply:?}");
    }
    let declared = s
        .raw(
            "POST /v1/stream/s HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
             Content-Length: 4096\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(declared.status, 413, "{declared:?}");

    let head = s.head("s").await;
    assert_eq!(head.next_offset(), tail, "a refused body was appended");
    assert_eq!(head.header("stream-closed"), None, "a refused close closed");
    assert_eq!(s.get("s?offset=-1").await.text(), "base");
    let producer = [
        TEXT,
        ("producer-id", "p"),
        ("producer-epoch", "0"),
        ("producer-seq", "0"),
    ];
    let first = s.post("s", &producer, vec![b'y'; 1000]).await;
    assert_eq!(first.status, 200, "producer state advanced: {first:?}");

    let put = format!(
        "PUT /v1/stream/new HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{}",
        String::from_utf8(chunked(&three)).unwrap()
    );
    assert_eq!(s.raw(put).await.status, 413);
    assert_eq!(s.head("new").await.status, 404);
}

#[tokio::test]
async fn a_client_still_sending_an_oversized_body_gets_the_413() {
    // C28: refusing on Content-Length alone and closing at once resets the
    // connection under a client that is still writing, so it never reads
    // the answer.
    let s = Server::with(Options {
        max_body_size: 1024,
        ..Options::default()
    })
    .await;
    let tail = s.put("s", &[TEXT], "base").await.next_offset();
    let body = vec![b'x'; 8 * 1024 * 1024];
    for _ in 0..3 {
        let mut conn = s.connect().await;
        conn.send(format!(
            "POST /v1/stream/s HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ))
        .await;
        // All of it, as a client that does not watch for an early answer.
        conn.send(&body).await;
        assert_eq!(conn.finish().await.status, 413);
    }
    assert_eq!(s.head("s").await.next_offset(), tail);
}

// ---------------------------------------------------------------------------
// Clients that go away: no leaked waiters, no partial appends.

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_live_readers_are_released_and_leave_appends_prompt() {
    // C32
    let s = Server::with(Options {
        long_poll_timeout: Duration::from_secs(30),
        ..Options::default()
    })
    .await;
    let tail = s.put("s", &[TEXT], "").await.next_offset();
    let mut readers = Vec::new();
    for i in 0..300 {
        let live = if i % 3 == 0 { "sse" } else { "long-poll" };
        let mut conn = s.connect().await;
        let request =
            format!("GET /v1/stream/s?offset={tail}&live={live} HTTP/1.1\r\nHost: t\r\n\r\n");
        conn.send(request).await;
        readers.push((live, conn));
    }
    for (live, conn) in &mut readers {
        if *live == "sse" {
            let head = conn.read_head().await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
        }
    }
    tokio::time::sleep(ms(200)).await;
    drop(readers);

    let deadline = Instant::now() + Duration::from_secs(3);
    while s.abandoned_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(ms(20)).await;
    }
    assert_eq!(
        s.abandoned_connections(),
        0,
        "the server holds readers that left"
    );

    let started = Instant::now();
    let append = s.post("s", &[TEXT], "x").await;
    assert_eq!(append.status, 204);
    assert!(
        started.elapsed() < PROMPT,
        "append took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let read = s.get(&format!("s?offset={tail}&live=long-poll")).await;
    assert_eq!((read.status.as_u16(), read.text()), (200, "x"));
    assert!(started.elapsed() < PROMPT);

    let poll = s.spawn_get(format!("s?offset={}&live=long-poll", append.next_offset()));
    tokio::time::sleep(ms(50)).await;
    s.post("s", &[TEXT], "y").await;
    let (reply, took) = poll.await.unwrap();
    assert_eq!((reply.status.as_u16(), reply.text()), (200, "y"));
    assert!(
        took < PROMPT,
        "long-poll after aborted readers took {took:?}"
    );
}

#[tokio::test]
async fn aborted_upload_stores_nothing_and_its_retry_is_not_a_duplicate() {
    // C32
    let s = Server::start().await;
    let binary = ("content-type", "application/octet-stream");
    let empty_tail = s.put("b", &[binary], "").await.next_offset();
    const SIZE: usize = 10_000_000;
    let head = "POST /v1/stream/b HTTP/1.1\r\nHost: t\r\n\
        Content-Type: application/octet-stream\r\n\
        Producer-Id: up\r\nProducer-Epoch: 0\r\nProducer-Seq: 0\r\n";
    let megabyte = vec![0u8; 1 << 20];
    let framings = [
        format!("{head}Content-Length: {SIZE}\r\n\r\n").into_bytes(),
        format!("{head}Transfer-Encoding: chunked\r\n\r\n").into_bytes(),
    ];
    for (i, request_head) in framings.into_iter().enumerate() {
        let mut conn = s.connect().await;
        conn.send(request_head).await;
        if i == 0 {
            conn.send(&megabyte).await;
        } else {
            let chunk = chunked(&[&megabyte]);
            conn.send(&chunk[..chunk.len() - 5]).await; // no last chunk
        }
        tokio::time::sleep(ms(100)).await;
        drop(conn);
        // Give a server that would store the partial body time to do so.
        tokio::time::sleep(ms(200)).await;
        let head = s.head("b").await;
        assert_eq!(
            head.next_offset(),
            empty_tail,
            "framing {i}: partial append"
        );
        assert!(s.get("b?offset=-1").await.body.is_empty(), "framing {i}");
    }

    let producer = [
        binary,
        ("producer-id", "up"),
        ("producer-epoch", "0"),
        ("producer-seq", "0"),
    ];
    let retry = s.post("b", &producer, vec![0u8; SIZE]).await;
    assert_eq!(
        retry.status, 200,
        "the aborted attempt was committed: {retry:?}"
    );
    assert_eq!(retry.header("producer-seq"), Some("0"));
    let again = s.post("b", &producer, vec![0u8; SIZE]).await;
    assert_eq!(
        again.status, 204,
        "a retry after success must be a duplicate"
    );
    let tail: Offset = s.head("b").await.next_offset().parse().unwrap();
    let stored = s.get("b?offset=-1").await.body.len();
    assert_eq!(stored, SIZE, "never two copies, never a part");
    assert_eq!(tail.position(), SIZE as u64, "HEAD tail disagrees with GET");
}

// ---------------------------------------------------------------------------
// Stream paths: nesting, encoded slashes, traversal, non-UTF-8.

#[tokio::test]
async fn nested_stream_paths_are_independent_streams() {
    // C33
    let s = Server::start().await;
    assert_eq!(s.put("acct-1", &[TEXT], "parent").await.status, 201);
    assert_eq!(s.put("acct-1/chat/room-1", &[JSON], "").await.status, 201);
    assert_eq!(s.get("acct-1?offset=-1").await.text(), "parent");
    assert_eq!(
        s.get("acct-1/chat/room-1?offset=-1").await.json(),
        json!([])
    );
    assert_eq!(s.delete("acct-1").await.status, 204);
    assert_eq!(s.head("acct-1").await.status, 404);
    assert_eq!(s.head("acct-1/chat/room-1").await.status, 200);
}

#[tokio::test]
async fn encoded_slash_never_aliases_a_real_slash() {
    // C33
    let s = Server::start().await;
    let encoded = s.put("a%2Fb", &[TEXT], "encoded").await;
    assert!([201, 400].contains(&encoded.status.as_u16()), "{encoded:?}");
    let nested = s.put("a/b", &[JSON], "").await;
    assert_eq!(nested.status, 201, "a%2Fb aliased a/b: {nested:?}");
    if encoded.status == 201 {
        let read = s.get("a%2Fb?offset=-1").await;
        assert_eq!(read.header("content-type"), Some("text/plain"));
        assert_eq!(read.text(), "encoded");
        assert_eq!(s.get("a/b?offset=-1").await.json(), json!([]));
        let from = forked_from("a%2Fb");
        let fork = s.put("fork", &[(from.0, &from.1)], "").await;
        assert_eq!(fork.header("content-type"), Some("text/plain"));
        assert_eq!(s.get("fork?offset=-1").await.text(), "encoded");
    }
}

#[tokio::test]
async fn equivalent_percent_encodings_name_one_stream() {
    // C33: RFC 3986 section 6.2.2.2, `%61` is `a`.
    let s = Server::start().await;
    assert_eq!(s.put("abc", &[TEXT], "x").await.status, 201);
    assert_eq!(s.put("%61bc", &[TEXT], "").await.status, 200);
    assert_eq!(s.post("%61%62c", &[TEXT], "y").await.status, 204);
    assert_eq!(s.get("abc?offset=-1").await.text(), "xy");
}

#[tokio::test]
async fn dot_segments_never_reach_another_stream() {
    // C33
    let s = Server::start().await;
    s.put("secret", &[TEXT], "secret").await;
    for path in [
        "/v1/stream/c33/../../../../tmp/evil",
        "/v1/stream/c33/%2e%2e/%2E%2E/tmp/evil",
        "/v1/stream/x/../secret",
        "/v1/stream/x/%2e%2e/secret",
        "/v1/stream/./secret",
        "/v1/stream/..",
    ] {
        let put = s.request(Method::PUT, path, &[TEXT], "evil").await;
        assert!(
            [400, 404].contains(&put.status.as_u16()),
            "PUT {path}: {put:?}"
        );
        let get = s.request(Method::GET, path, &[], "").await;
        assert!(
            [400, 404].contains(&get.status.as_u16()),
            "GET {path}: {get:?}"
        );
    }
    assert_eq!(s.head("tmp/evil").await.status, 404);
    assert_eq!(s.get("secret?offset=-1").await.text(), "secret");

    let literal = s.put("..%2F..%2F..%2Ftmp%2Fevil2", &[TEXT], "").await;
    assert!([201, 400].contains(&literal.status.as_u16()), "{literal:?}");
    assert_eq!(s.head("tmp/evil2").await.status, 404);

    let escape = ("stream-forked-from", "/v1/stream/../../etc/passwd");
    let fork = s.put("fork", &[escape], "").await;
    assert!([400, 404].contains(&fork.status.as_u16()), "{fork:?}");
    let sibling = ("stream-forked-from", "/v1/stream/x/../secret");
    let fork = s.put("fork", &[sibling], "").await;
    assert!([400, 404].contains(&fork.status.as_u16()), "{fork:?}");
    assert_eq!(s.head("fork").await.status, 404);
    assert_eq!(s.delete("secret").await.status, 204);
    assert_eq!(
        s.head("secret").await.status,
        404,
        "a refused fork took a reference"
    );
}

#[tokio::test]
async fn non_utf8_stream_names_are_refused_or_kept_literal() {
    // C33
    let s = Server::start().await;
    let encoded = s.put("c33/%FF%FE", &[TEXT], "x").await;
    assert!([201, 400].contains(&encoded.status.as_u16()), "{encoded:?}");
    if encoded.status == 201 {
        assert_eq!(s.get("c33/%FF%FE?offset=-1").await.text(), "x");
        assert_eq!(s.head("c33/%FF").await.status, 404);
    }
    let mut raw = b"PUT /v1/stream/c33/".to_vec();
    raw.extend_from_slice(b"\xFF\xFE HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n");
    raw.extend_from_slice(b"Content-Length: 0\r\nConnection: close\r\n\r\n");
    let reply = s.raw(raw).await;
    assert!([201, 400].contains(&reply.status), "{reply:?}");
    assert_eq!(
        s.head("c33/none").await.status,
        404,
        "the server stopped answering"
    );
}

#[test]
fn the_sse_parser_used_here_follows_the_whatwg_rules() {
    // C13: the oracle itself: CR, LF and CRLF end lines; one space is removed.
    let events = parse_events(b"event: data\rdata:a\r\ndata:  b\n\nevent:control\ndata:{}\n\n");
    assert_eq!(
        events,
        [
            Event {
                kind: "data".into(),
                data: "a\n b".into()
            },
            Event {
                kind: "control".into(),
                data: "{}".into()
            },
        ]
    );
}
