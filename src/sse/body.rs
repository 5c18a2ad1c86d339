use std::fmt;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{BoxError, BoxFuture};

/// One step of an event stream: the events it produced and the step after.
pub(crate) type Step = BoxFuture<Option<(Bytes, Option<Next>)>>;

/// The step after, boxed so that [`SseBody`] names no service type.
pub(crate) struct Next(pub(crate) Step);

/// The `text/event-stream` body of a live SSE read.
///
/// Each frame holds whole events. Dropping the body (the client went away)
/// drops the pending read or wait with it.
pub struct SseBody {
    // The mutex only makes the body `Sync`; polling has `&mut` access and
    // never locks it.
    step: Mutex<Option<Step>>,
}

impl SseBody {
    pub(crate) fn new(step: Step) -> Self {
        Self {
            step: Mutex::new(Some(step)),
        }
    }

    fn step(&mut self) -> &mut Option<Step> {
        self.step.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for SseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseBody")
            .field("ended", &self.is_end_stream())
            .finish()
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let slot = self.step();
        let Some(step) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = ready!(step.as_mut().poll(cx));
        match polled {
            None => {
                *slot = None;
                Poll::Ready(None)
            }
            Some((events, next)) => {
                *slot = next.map(|n| n.0);
                Poll::Ready(Some(Ok(Frame::data(events))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.step.lock().is_ok_and(|step| step.is_none())
    }
}

pin_project! {
    /// The response body of [`Sse`](super::Sse): an event stream, or the
    /// inner service's body for every other response.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Events { #[pin] body: SseBody },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn events(body: SseBody) -> Self {
        Self {
            kind: Kind::Events { body },
        }
    }
}

/// The inner service's body, passed through.
impl<B> From<B> for ResponseBody<B> {
    fn from(body: B) -> Self {
        Self::inner(body)
    }
}

/// The inner body's default, so that middleware that answers on its own
/// (tower-http's `TimeoutLayer`) can wrap the stack.
impl<B: Default> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::inner(B::default())
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            Kind::Events { body } => f.debug_tuple("ResponseBody::Events").field(body).finish(),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Events { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Events { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Events { body } => body.size_hint(),
        }
    }
}
