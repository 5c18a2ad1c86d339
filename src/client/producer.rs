//! Producers: appends batched in the background and sent in order, one
//! batch in flight; idempotent producers add producer id, epoch and
//! sequence numbers so that retries are deduplicated by the server.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{insert, Answer, Appended, Backoff, DurableStream, Error, ErrorKind};

/// How a producer batches; see [`DurableStream::producer`].
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    linger: Duration,
    max_batch_bytes: usize,
    queue: usize,
    content_type: Option<String>,
    auto_claim: bool,
    backoff: Option<Backoff>,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(5),
            max_batch_bytes: 1024 * 1024,
            queue: 1024,
            content_type: None,
            auto_claim: false,
            backoff: None,
        }
    }
}

impl ProducerOptions {
    /// 5 ms linger, 1 MiB batches, 1,024 queued appends.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long the first append of a batch waits for others to join it.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// The largest batch body; a larger single append goes alone.
    pub fn max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = bytes.max(1);
        self
    }

    /// How many appends may wait to be sent before
    /// [`append`](Producer::append) waits too (back-pressure).
    pub fn queue(mut self, appends: usize) -> Self {
        self.queue = appends.max(1);
        self
    }

    /// The stream's content type; found with `HEAD` when not given.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// For an idempotent producer: when the server answers that a newer
    /// epoch owns the producer id (`403`), take the next epoch and resend,
    /// instead of failing. Use with care: it fences the other producer.
    /// Default is off.
    pub fn auto_claim(mut self, auto_claim: bool) -> Self {
        self.auto_claim = auto_claim;
        self
    }

    /// How failed sends are retried. Default is the client's policy.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
}

/// Resolves when the batch that holds one append is acknowledged.
#[derive(Debug)]
pub struct Ack(oneshot::Receiver<Result<Appended, Error>>);

impl Future for Ack {
    type Output = Result<Appended, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|result| {
            result.unwrap_or_else(|_| Err(Error::new(ErrorKind::Transport, "", "producer stopped")))
        })
    }
}

enum Command {
    Append(Bytes, oneshot::Sender<Result<Appended, Error>>),
    Flush(oneshot::Sender<Result<(), Error>>),
    Close(Option<Bytes>, oneshot::Sender<Result<Appended, Error>>),
}

/// Sends appends in batches, in order; see [`DurableStream::producer`].
///
/// Appends are queued by [`append`](Self::append), which waits only when
/// the queue is full, and sent by a background task: the first append of a
/// batch waits the linger time for others, then the batch goes as one
/// `POST` (for JSON streams, a JSON array of the messages, one message per
/// append). One batch is in flight at a time, so order is kept. A plain
/// append is not idempotent, so a batch that got no answer is not resent
/// (one the server answered with `5xx` or `429` is); after a failure every
/// later append fails with it.
pub struct Producer {
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
}

/// A [`Producer`] whose batches carry `Producer-Id`, `Producer-Epoch` and
/// `Producer-Seq`, so a batch that got no answer is resent with the same
/// numbers and the server keeps it exactly once; see
/// [`DurableStream::idempotent_producer`].
///
/// A process that restarts must not reuse an epoch it already wrote with:
/// its sequence numbers restart at 0, which the server would take for
/// duplicates. Persist the epoch and start one higher, or start at 0 with
/// [`ProducerOptions::auto_claim`].
pub struct IdempotentProducer(Producer);

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

impl fmt::Debug for IdempotentProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentProducer").finish_non_exhaustive()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // What is queued is still sent; only an idle task is stopped.
        if self.commands.is_closed() {
            self.task.abort();
        }
    }
}

impl Producer {
    pub(crate) fn start(stream: DurableStream, options: ProducerOptions) -> Self {
        Self::spawn(stream, options, None)
    }

    fn spawn(stream: DurableStream, options: ProducerOptions, identity: Option<Identity>) -> Self {
        let (commands, rx) = mpsc::channel(options.queue);
        let backoff = options.backoff.unwrap_or(stream.client.inner.backoff);
        let worker = Worker {
            stream,
            options,
            backoff,
            identity,
            content_type: None,
            failed: None,
            held: None,
        };
        let task = tokio::spawn(worker.run(rx));
        Self { commands, task }
    }

    /// Queues `data` (one message, for a JSON stream) and returns what
    /// resolves when it is acknowledged; dropping that is fine.
    ///
    /// # Errors
    ///
    /// When an earlier batch failed, with that failure.
    pub async fn append(&self, data: impl Into<Bytes>) -> Result<Ack, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Append(data.into(), tx))
            .await
            .map_err(|_| stopped())?;
        Ok(Ack(rx))
    }

    /// Queues one JSON message.
    ///
    /// # Errors
    ///
    /// When `message` does not serialize, or as [`append`](Self::append).
    pub async fn append_json<T: serde::Serialize>(&self, message: &T) -> Result<Ack, Error> {
        let data = serde_json::to_vec(message)
            .map_err(|e| Error::new(ErrorKind::InvalidInput, "", e.to_string()))?;
        self.append(data).await
    }

    /// Waits until everything queued before it is acknowledged.
    ///
    /// # Errors
    ///
    /// The first failure of a batch, if any.
    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Sends what is queued, then closes the stream, with `last` as its
    /// final append when given.
    ///
    /// # Errors
    ///
    /// The first failure of a batch, or of the close.
    pub async fn close(self, last: Option<Bytes>) -> Result<Appended, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Close(last, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

impl IdempotentProducer {
    pub(crate) fn start(
        stream: DurableStream,
        id: String,
        epoch: u64,
        options: ProducerOptions,
    ) -> Self {
        let identity = Identity { id, epoch, seq: 0 };
        Self(Producer::spawn(stream, options, Some(identity)))
    }

    /// As [`Producer::append`].
    ///
    /// # Errors
    ///
    /// As [`Producer::append`].
    pub async fn append(&self, data: impl Into<Bytes>) -> Result<Ack, Error> {
        self.0.append(data).await
    }

    /// As [`Producer::append_json`].
    ///
    /// # Errors
    ///
    /// As [`Producer::append_json`].
    pub async fn append_json<T: serde::Serialize>(&self, message: &T) -> Result<Ack, Error> {
        self.0.append_json(message).await
    }

    /// As [`Producer::flush`].
    ///
    /// # Errors
    ///
    /// As [`Producer::flush`].
    pub async fn flush(&self) -> Result<(), Error> {
        self.0.flush().await
    }

    /// As [`Producer::close`]; the close carries the producer's numbers, so
    /// a retried close is a duplicate, not a conflict.
    ///
    /// # Errors
    ///
    /// As [`Producer::close`].
    pub async fn close(self, last: Option<Bytes>) -> Result<Appended, Error> {
        self.0.close(last).await
    }
}

fn stopped() -> Error {
    Error::new(ErrorKind::Transport, "", "the producer has stopped")
}

/// An idempotent producer's numbers.
#[derive(Debug, Clone)]
struct Identity {
    id: String,
    epoch: u64,
    /// The sequence number of the next batch.
    seq: u64,
}

struct Worker {
    stream: DurableStream,
    options: ProducerOptions,
    backoff: Backoff,
    identity: Option<Identity>,
    content_type: Option<String>,
    /// The failure every later append gets.
    failed: Option<Error>,
    /// A command that ended a batch early, handled next.
    held: Option<Command>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let command = match self.held.take() {
                Some(command) => command,
                None => match rx.recv().await {
                    Some(command) => command,
                    None => return,
                },
            };
            match command {
                Command::Append(data, ack) => {
                    let batch = self.gather(data, ack, &mut rx).await;
                    self.send(batch).await;
                }
                Command::Flush(done) => {
                    let _ = done.send(self.failed.as_ref().map_or(Ok(()), |e| Err(copy(e))));
                }
                Command::Close(last, done) => {
                    let result = match &self.failed {
                        Some(e) => Err(copy(e)),
                        None => self.close(last).await,
                    };
                    let _ = done.send(result);
                    return;
                }
            }
        }
    }

    /// Appends that arrive within the linger time, up to the batch size.
    async fn gather(
        &mut self,
        data: Bytes,
        ack: oneshot::Sender<Result<Appended, Error>>,
        rx: &mut mpsc::Receiver<Command>,
    ) -> Vec<(Bytes, oneshot::Sender<Result<Appended, Error>>)> {
        let mut size = data.len();
        let mut batch = vec![(data, ack)];
        let deadline = Instant::now() + self.options.linger;
        while size < self.options.max_batch_bytes {
            let next = tokio::select! {
                next = rx.recv() => next,
                () = tokio::time::sleep_until(deadline) => break,
            };
            match next {
                Some(Command::Append(data, ack))
                    if size + data.len() <= self.options.max_batch_bytes =>
                {
                    size += data.len();
                    batch.push((data, ack));
                }
                Some(other) => {
                    self.held = Some(other);
                    break;
                }
                None => break,
            }
        }
        batch
    }

    async fn send(&mut self, batch: Vec<(Bytes, oneshot::Sender<Result<Appended, Error>>)>) {
        if let Some(e) = &self.failed {
            for (_, ack) in batch {
                let _ = ack.send(Err(copy(e)));
            }
            return;
        }
        let (bodies, acks): (Vec<Bytes>, Vec<_>) = batch.into_iter().unzip();
        let result = match self.body(&bodies).await {
            Ok(body) => self.post(body, false).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.failed = Some(copy(e));
        }
        for ack in acks {
            let _ = ack.send(result.as_ref().map(Clone::clone).map_err(copy));
        }
    }

    async fn close(&mut self, last: Option<Bytes>) -> Result<Appended, Error> {
        let body = match last {
            Some(last) => self.body(&[last]).await?,
            None => Bytes::new(),
        };
        if body.is_empty() && self.identity.is_none() {
            return self.stream.close().await;
        }
        self.post(body, true).await
    }

    /// One request body for `bodies`: a JSON array for JSON streams, the
    /// bytes one after another otherwise.
    async fn body(&mut self, bodies: &[Bytes]) -> Result<Bytes, Error> {
        let content_type = match &self.content_type {
            Some(known) => known.clone(),
            None => {
                let found = match &self.options.content_type {
                    Some(given) => given.clone(),
                    None => self.stream.content_type().await?,
                };
                self.content_type = Some(found.clone());
                found
            }
        };
        let json = content_type
            .split(';')
            .next()
            .is_some_and(|e| e.trim().eq_ignore_ascii_case("application/json"));
        let mut out = BytesMut::with_capacity(
            bodies.iter().map(Bytes::len).sum::<usize>() + bodies.len() + 2,
        );
        if json {
            out.put_u8(b'[');
            for (i, body) in bodies.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                out.extend_from_slice(body);
            }
            out.put_u8(b']');
        } else {
            for body in bodies {
                out.extend_from_slice(body);
            }
        }
        Ok(out.freeze())
    }

    /// Sends one batch (or the close), retrying as far as is safe.
    async fn post(&mut self, body: Bytes, close: bool) -> Result<Appended, Error> {
        let url = self.stream.url.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut headers = HeaderMap::new();
            if !body.is_empty() {
                let content_type = self.content_type.clone().unwrap_or_default();
                insert(&mut headers, &url, "content-type", &content_type)?;
            }
            if close {
                insert(&mut headers, &url, "stream-closed", "true")?;
            }
            if let Some(identity) = &self.identity {
                insert(&mut headers, &url, "producer-id", &identity.id)?;
                insert(
                    &mut headers,
                    &url,
                    "producer-epoch",
                    &identity.epoch.to_string(),
                )?;
                insert(
                    &mut headers,
                    &url,
                    "producer-seq",
                    &identity.seq.to_string(),
                )?;
            }
            let outcome = match self
                .stream
                .client
                .exchange(&Method::POST, &url, &headers, &body, super::REQUEST_TIMEOUT)
                .await
            {
                Ok(response) => Answer::read(&url, response).await,
                Err(e) => Err((e, None)),
            };
            let (error, retry_headers) = match outcome {
                Ok(answer) if answer.status.is_success() => {
                    if let Some(identity) = &mut self.identity {
                        identity.seq += 1;
                    }
                    return Ok(Appended {
                        next_offset: answer.next_offset(&url)?,
                        closed: answer.flag("stream-closed") || close,
                    });
                }
                Ok(answer) => {
                    let error =
                        Error::from_response(&url, answer.status, &answer.headers, &answer.body);
                    (error, Some(answer.headers))
                }
                Err(failed) => failed,
            };
            if let (ErrorKind::StaleEpoch { current }, Some(identity)) =
                (error.kind(), &mut self.identity)
            {
                if self.options.auto_claim && attempt <= 3 {
                    tracing::debug!(%url, producer = %identity.id, epoch = current + 1, "claiming the producer id");
                    identity.epoch = current + 1;
                    identity.seq = 0;
                    continue;
                }
            }
            // Without producer numbers, only an answer that says nothing
            // was stored makes a resend safe.
            let safe = if self.identity.is_some() {
                error.is_retryable()
            } else {
                matches!(error.kind(), ErrorKind::RateLimited | ErrorKind::Server)
            };
            if !safe || !self.backoff.allows(attempt) {
                return Err(error);
            }
            tokio::time::sleep(self.backoff.delay(attempt, retry_headers.as_ref())).await;
        }
    }
}

/// An error for each waiter of a failed batch.
fn copy(error: &Error) -> Error {
    error.copy()
}
