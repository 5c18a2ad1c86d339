//! The `durable-streams` binary and clients that close their side of the
//! connection: an ordinary request sent before the client half-closed is
//! still answered, while a live read (SSE, long-poll) whose client closed
//! ends at once instead of holding its connection until its timeout.

#![cfg(feature = "server")]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Long enough that a live read ending by its timeout fails the test.
const LIVE_TIMEOUT: &str = "60s";
/// How long a test waits for the server to end a connection.
const PATIENCE: Duration = Duration::from_secs(10);

struct Running(Child, SocketAddr);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data: &Path) -> Running {
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let child = Command::new(env!("CARGO_BIN_EXE_durable-streams"))
        .args(["serve", "--storage", "file", "--addr", &addr.to_string()])
        .args([
            "--long-poll-timeout",
            LIVE_TIMEOUT,
            "--sse-lifetime",
            LIVE_TIMEOUT,
        ])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server binary");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Running(child, addr)
}

/// Sends `request`, closes the sending side, and returns what arrives
/// before the server closes the connection.
fn send_and_half_close(addr: SocketAddr, request: &str) -> String {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    read_until_closed(conn)
}

/// Reads until the server closes the connection, by end-of-file or, when it
/// closes with bytes of ours unread, by a reset; panics if it has not
/// within [`PATIENCE`].
fn read_until_closed(mut conn: TcpStream) -> String {
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the server kept the connection open for {:?} ({e}); received so far:\n{}",
                started.elapsed(),
                String::from_utf8_lossy(&received)
            ),
        }
    }
    String::from_utf8(received).unwrap()
}

fn post(name: &str, body: &str) -> String {
    format!(
        "POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn create(addr: SocketAddr, name: &str) {
    let put = format!(
        "PUT /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let reply = send_and_half_close(addr, &put);
    assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
}

#[test]
fn requests_sent_before_a_half_close_are_answered() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path());
    create(server.1, "answered");

    // An append waits for its fsync after the client has closed its side.
    let reply = send_and_half_close(server.1, &post("answered", "a"));
    assert_eq!(reply.matches("HTTP/1.1 204").count(), 1, "{reply}");

    // Pipelined requests are all answered, in order.
    let two = post("answered", "b") + &post("answered", "c");
    let reply = send_and_half_close(server.1, &two);
    assert_eq!(reply.matches("HTTP/1.1 204").count(), 2, "{reply}");

    let get = "GET /v1/stream/answered?offset=-1 HTTP/1.1\r\nHost: t\r\n\r\n";
    let reply = send_and_half_close(server.1, get);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nabc"), "{reply}");
}

#[test]
fn a_long_poll_ends_when_its_client_hangs_up() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path());
    create(server.1, "polled");

    let poll = "GET /v1/stream/polled?offset=now&live=long-poll HTTP/1.1\r\nHost: t\r\n\r\n";
    // No answer is owed to a client that has gone: the connection just ends.
    let reply = send_and_half_close(server.1, poll);
    assert_eq!(reply, "");

    // The server is none the worse for it.
    let reply = send_and_half_close(server.1, &post("polled", "x"));
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
}

#[test]
fn an_event_stream_ends_when_its_client_hangs_up() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path());
    create(server.1, "watched");
    let reply = send_and_half_close(server.1, &post("watched", "first"));
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");

    let sse = "GET /v1/stream/watched?offset=-1&live=sse HTTP/1.1\r\nHost: t\r\n\r\n";
    let reply = send_and_half_close(server.1, sse);
    // What was there may have been sent before the hang-up was noticed;
    // then the stream ends, long before its lifetime.
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
}

#[test]
fn a_live_read_ends_when_its_client_hangs_up_after_sending_more() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path());
    create(server.1, "chatty");

    for query in ["offset=now&live=long-poll", "offset=-1&live=sse"] {
        let mut conn = TcpStream::connect(server.1).unwrap();
        let get = format!("GET /v1/stream/chatty?{query} HTTP/1.1\r\nHost: t\r\n\r\n");
        conn.write_all(get.as_bytes()).unwrap();
        // Bytes the server may not read while the live read is under way,
        // sent once it is waiting, then the end-of-file behind them.
        std::thread::sleep(Duration::from_millis(200));
        conn.write_all(b"junk").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        read_until_closed(conn);
    }
}
