use std::time::Duration;

use tower_layer::Layer;

use super::Sse;

/// The default time after which an SSE connection is ended: 60 seconds.
pub(crate) const DEFAULT_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Adds Server-Sent Events reads to a catch-up read service. See the
/// [module docs](crate::sse).
#[derive(Debug, Clone, Copy)]
pub struct SseLayer {
    connection_lifetime: Duration,
}

impl SseLayer {
    /// A layer that ends connections after the default 60 seconds.
    pub fn new() -> Self {
        Self {
            connection_lifetime: DEFAULT_CONNECTION_LIFETIME,
        }
    }

    /// How long an SSE connection lasts before the server ends it, after a
    /// control event, so the client reconnects from its last offset. Default
    /// is 60 seconds.
    pub fn connection_lifetime(mut self, lifetime: Duration) -> Self {
        self.connection_lifetime = lifetime;
        self
    }
}

impl Default for SseLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for SseLayer {
    type Service = Sse<S>;

    fn layer(&self, inner: S) -> Sse<S> {
        Sse::new(inner, self.connection_lifetime)
    }
}
