//! Bad input found by attacking the server: each is refused with a 4xx and a
//! specific message, and changes nothing.

mod support;

use std::time::Duration;

use support::{Options, Server, PREFIX};

const TEXT: (&str, &str) = ("content-type", "text/plain");
const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn streams_that_would_expire_as_they_are_created_are_refused() {
    let s = Server::start().await;
    let past = ("stream-expires-at", "2020-01-01T00:00:00Z");
    for (name, header) in [("ttl0", ("stream-ttl", "0")), ("past", past)] {
        let reply = s.put(name, &[TEXT, header], "data").await;
        assert_eq!(reply.status, 400, "{header:?}");
        assert!(reply.text().contains(header.0), "{}", reply.text());
        assert_eq!(s.head(name).await.status, 404);
    }
    s.put("src", &[TEXT], "x").await;
    let fork = s
        .put(
            "fork",
            &[("stream-forked-from", "/v1/stream/src"), past],
            "",
        )
        .await;
    assert_eq!(fork.status, 400);
    assert_eq!(s.head("fork").await.status, 404);
}

#[tokio::test]
async fn compressed_bodies_are_refused_not_stored_encoded() {
    let s = Server::start().await;
    s.put("z", &[TEXT], "").await;
    let reply = s
        .post(
            "z",
            &[TEXT, ("content-encoding", "gzip")],
            &b"\x1f\x8b\x08\x00"[..],
        )
        .await;
    assert_eq!(reply.status, 415);
    let put = s
        .put("z2", &[TEXT, ("content-encoding", "br")], "data")
        .await;
    assert_eq!(put.status, 415);
    assert_eq!(s.head("z2").await.status, 404);
    assert_eq!(s.get("z?offset=-1").await.text(), "");
    let identity = s
        .post("z", &[TEXT, ("content-encoding", "identity")], "ok")
        .await;
    assert_eq!(identity.status, 204);
}

#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused_not_stored_coded() {
    let s = Server::start().await;
    s.put("t", &[TEXT], "").await;
    let body = support::chunked(&[&b"\x1f\x8b\x08\x00coded"[..]]);
    for coding in ["gzip, chunked", "deflate,chunked"] {
        let mut request = format!(
            "POST /v1/stream/t HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
             Transfer-Encoding: {coding}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(&body);
        assert_eq!(s.raw(request).await.status, 501, "{coding}");
    }
    assert_eq!(s.get("t?offset=-1").await.text(), "");
    let mut plain = b"POST /v1/stream/t HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .to_vec();
    plain.extend_from_slice(&support::chunked(&[&b"plain"[..]]));
    assert_eq!(s.raw(plain).await.status, 204);
    assert_eq!(s.get("t?offset=-1").await.text(), "plain");
}

#[tokio::test]
async fn json_too_deep_or_too_many_messages_is_refused() {
    let s = Server::start().await;
    s.put("j", &[JSON], "").await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let reply = s.post("j", &[JSON], deep).await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("nested"), "{}", reply.text());
    let many = format!("[{}0]", "0,".repeat(100_000));
    let reply = s.post("j", &[JSON], many).await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("messages"), "{}", reply.text());
    assert_eq!(s.get("j?offset=-1").await.text(), "[]");
    let fine = format!("[{}0]", "0,".repeat(999));
    assert_eq!(s.post("j", &[JSON], fine).await.status, 204);
}

#[tokio::test]
async fn writer_identities_have_a_length_limit() {
    let s = Server::start().await;
    s.put("w", &[TEXT], "").await;
    let long = "p".repeat(2000);
    let producer = [
        TEXT,
        ("producer-id", long.as_str()),
        ("producer-epoch", "0"),
        ("producer-seq", "0"),
    ];
    assert_eq!(s.post("w", &producer, "x").await.status, 400);
    let seq = [TEXT, ("stream-seq", long.as_str())];
    assert_eq!(s.post("w", &seq, "x").await.status, 400);
    let long_type = format!("text/{}", "x".repeat(300));
    let ct = [("content-type", long_type.as_str())];
    assert_eq!(s.put("w2", &ct, "").await.status, 400);
    assert_eq!(s.get("w?offset=-1").await.text(), "");
}

#[tokio::test]
async fn an_empty_fork_source_is_a_bad_request() {
    let s = Server::start().await;
    let reply = s.put("f", &[("stream-forked-from", "")], "").await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn raw_and_percent_encoded_non_ascii_paths_name_one_stream() {
    let s = Server::start().await;
    let raw = format!(
        "PUT {PREFIX}/caf\u{e9} HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi"
    );
    let reply = s.raw(raw).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(s.get("caf%C3%A9?offset=-1").await.text(), "hi");
    assert_eq!(s.put("caf%c3%a9", &[TEXT], "").await.status, 200);
}

#[tokio::test]
async fn a_malformed_host_does_not_shape_the_location() {
    let s = Server::start().await;
    let raw = format!(
        "PUT {PREFIX}/loc HTTP/1.1\r\nhost: evil.example/phish?\r\nx-forwarded-proto: https\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let reply = s.raw(raw).await;
    assert_eq!(reply.status, 201);
    let location = reply.header("location").unwrap_or_default();
    assert!(!location.contains("evil"), "{location}");
    assert_eq!(location, format!("{PREFIX}/loc"));
}

#[tokio::test]
async fn a_cursor_too_large_to_pass_is_treated_as_junk() {
    let s = Server::start().await;
    s.put("c", &[TEXT], "data").await;
    let reply = s
        .get("c?offset=-1&live=long-poll&cursor=18446744073709551615")
        .await;
    assert_eq!(reply.status, 200);
    let cursor: u64 = reply.header("stream-cursor").unwrap().parse().unwrap();
    assert!(cursor < u64::MAX / 2, "{cursor}");
}

#[tokio::test]
async fn a_trickled_upload_times_out_and_stores_nothing() {
    // Each byte arrives inside the per-part timeout, forever.
    let s = Server::with(Options {
        body_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    s.put("trickle", &[TEXT], "").await;
    let mut conn = s.connect().await;
    conn.send(format!(
        "POST {PREFIX}/trickle HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n"
    ))
    .await;
    let mut answered = false;
    for _ in 0..20 {
        conn.send("x").await;
        // The answer comes as the next byte arrives, inside this wait.
        if conn
            .read_until_contains(b"HTTP/1.1 408", Duration::from_millis(100))
            .await
        {
            answered = true;
            break;
        }
    }
    assert!(answered, "a trickled body was waited for 2 s");
    assert_eq!(s.get("trickle?offset=-1").await.text(), "");
}

#[tokio::test]
async fn a_stalled_upload_times_out_and_stores_nothing() {
    let s = Server::with(Options {
        body_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    s.put("slow", &[TEXT], "").await;
    let mut conn = s.connect().await;
    conn.send(format!(
        "POST {PREFIX}/slow HTTP/1.1\r\nhost: x\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\npartial"
    ))
    .await;
    let head = conn.read_head().await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert_eq!(s.get("slow?offset=-1").await.text(), "");
}
