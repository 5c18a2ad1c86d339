//! Noticing a client that hangs up on a live read.
//!
//! The server runs hyper's HTTP/1 with `half_close(true)`: a client may send
//! its request, close its side of the connection (`printf ... | nc -N`,
//! `shutdown(SHUT_WR)`) and still get its answer. The price is that hyper
//! stops reading while a response is under way, so it would not notice an
//! SSE or long-poll client that went away until the next event fails to
//! write, or the timeout passes; until then the connection holds its
//! buffers and its subscription.
//!
//! A live read has no answer to finish for a client that has closed its
//! side, so [`Hangup`] watches the socket while one is under way. Once the
//! client's end-of-file arrives, the read fails with [`HungUp`], hyper
//! closes the connection, and everything the read held is dropped.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection's socket, shared between hyper, which reads and writes
/// it, and the [`Hangup`] watch of a live read on it.
///
/// Both use it from the connection's task, so the lock is never contended;
/// it lends hyper the stream's own reads and writes, which skip the system
/// call a short read shows would find nothing.
#[derive(Clone)]
pub(crate) struct Socket(Arc<Mutex<TcpStream>>);

impl Socket {
    pub(crate) fn new(stream: TcpStream) -> Self {
        Self(Arc::new(Mutex::new(stream)))
    }

    fn lock(&self) -> MutexGuard<'_, TcpStream> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.lock().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// The error a live read ends with when its client has hung up.
#[derive(Debug)]
pub(crate) struct HungUp;

impl fmt::Display for HungUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client closed the connection during a live read")
    }
}

impl std::error::Error for HungUp {}

/// How often a watch that found bytes waiting looks for the client's
/// shutdown behind them.
const RECHECK: Duration = Duration::from_secs(1);

/// Watches a socket for its client's end-of-file.
pub(crate) struct Hangup {
    socket: Socket,
    /// Set once the client has sent more bytes (junk, or a request pipelined
    /// behind this one). A peek then finds those rather than the
    /// end-of-file, and only hyper may read them, so the socket is looked
    /// at now and then for the shutdown the kernel records behind them.
    recheck: Option<Pin<Box<Sleep>>>,
}

impl Hangup {
    pub(crate) fn new(socket: Socket) -> Self {
        Self {
            socket,
            recheck: None,
        }
    }

    /// Ready with [`HungUp`] once the client has closed its side or the
    /// connection has failed; pending otherwise.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<HungUp> {
        loop {
            let Some(recheck) = &mut self.recheck else {
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                match ready!(self.socket.lock().poll_peek(cx, &mut buf)) {
                    Ok(0) | Err(_) => return Poll::Ready(HungUp),
                    Ok(_) => self.recheck = Some(Box::pin(tokio::time::sleep(RECHECK))),
                }
                continue;
            };
            ready!(recheck.as_mut().poll(cx));
            let stream = self.socket.lock();
            let readiness = std::pin::pin!(stream.ready(Interest::READABLE));
            match readiness.poll(cx) {
                Poll::Ready(Ok(ready)) if ready.is_read_closed() => return Poll::Ready(HungUp),
                Poll::Ready(Err(_)) => return Poll::Ready(HungUp),
                _ => recheck.as_mut().reset(Instant::now() + RECHECK),
            }
        }
    }
}

/// Polls the watch of a live read, if it has one: ready once its client has
/// hung up, pending otherwise (and for ever without a watch).
pub(crate) fn poll_hangup(hangup: &mut Option<Hangup>, cx: &mut Context<'_>) -> Poll<HungUp> {
    hangup
        .as_mut()
        .map_or(Poll::Pending, |hangup| hangup.poll(cx))
}

pin_project_lite::pin_project! {
    /// A response body that fails with [`HungUp`] when the client of the
    /// live read it answers hangs up.
    pub(crate) struct Live<B> {
        #[pin]
        inner: B,
        hangup: Option<Hangup>,
    }
}

impl<B> Live<B> {
    /// Watches `hangup`, if there is one, while `inner` is sent.
    pub(crate) fn new(inner: B, hangup: Option<Hangup>) -> Self {
        Self { inner, hangup }
    }
}

impl<B> Body for Live<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        poll_hangup(this.hangup, cx).map(|hung_up| Some(Err(hung_up.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
