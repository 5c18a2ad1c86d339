use std::time::Duration;

use tower_layer::Layer;

use super::LongPoll;

/// The default time a long-poll waits for data: 30 seconds.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Adds long-poll reads to a catch-up read service. See the
/// [module docs](crate::long_poll).
#[derive(Debug, Clone, Copy)]
pub struct LongPollLayer {
    timeout: Duration,
}

impl LongPollLayer {
    /// A layer with the default timeout of 30 seconds.
    pub fn new() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long a long-poll waits for data before answering `204`. Default is
    /// 30 seconds.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Default for LongPollLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for LongPollLayer {
    type Service = LongPoll<S>;

    fn layer(&self, inner: S) -> LongPoll<S> {
        LongPoll::new(inner, self.timeout)
    }
}
