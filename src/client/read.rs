//! Readers: catch-up, long-poll and SSE reads from any offset, resumed
//! after failures from the last offset delivered.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::sse::Parser;
use super::{header, Answer, Backoff, DurableStream, Error, LONG_POLL_TIMEOUT, REQUEST_TIMEOUT};

/// Query values keep only unreserved characters as they are.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// How long an SSE connection may go without a byte before it is dropped
/// and resumed.
const SSE_IDLE: Duration = Duration::from_secs(120);

/// How a [`Reader`] follows the stream once it has what exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Live {
    /// Catch up, then end.
    #[default]
    Off,
    /// Long-poll from the start.
    LongPoll,
    /// Server-Sent Events from the start.
    Sse,
    /// Catch up with plain reads, then follow with SSE; if the server does
    /// not offer SSE, long-poll.
    Auto,
}

/// Where and how to read; see [`DurableStream::read`].
#[derive(Debug, Clone)]
pub struct ReadOptions {
    offset: String,
    live: Live,
    backoff: Option<Backoff>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            offset: "-1".to_owned(),
            live: Live::Off,
            backoff: None,
        }
    }
}

impl ReadOptions {
    /// From the start, catching up only.
    pub fn new() -> Self {
        Self::default()
    }

    /// The offset to start at: one saved from a chunk's
    /// [`next_offset`](Chunk::next_offset), `-1` for the start or `now` for
    /// the tail. Default is `-1`.
    pub fn offset(mut self, offset: impl Into<String>) -> Self {
        self.offset = offset.into();
        self
    }

    /// How to follow the stream. Default is [`Live::Off`].
    pub fn live(mut self, live: Live) -> Self {
        self.live = live;
        self
    }

    /// How failed reads are retried. Default is the client's policy, with
    /// no limit on retries in live modes.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
}

/// What one read delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Chunk {
    /// The bytes read; for JSON streams a JSON array of the messages.
    pub data: Bytes,
    /// Where the next read starts: save it to resume later.
    pub next_offset: String,
    /// Whether the reader has everything that existed when this was read.
    pub up_to_date: bool,
    /// Whether the stream is closed and this is its end.
    pub closed: bool,
    /// The server's cursor, echoed on the next live read.
    pub cursor: Option<String>,
    json: bool,
}

impl Chunk {
    /// Whether the chunk carries no data (no bytes, or no JSON message).
    pub fn is_empty(&self) -> bool {
        if self.json {
            json_is_empty(&self.data)
        } else {
            self.data.is_empty()
        }
    }

    /// The messages of a JSON stream's chunk.
    ///
    /// # Errors
    ///
    /// When the data is not a JSON array of `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<Vec<T>, serde_json::Error> {
        if self.data.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_slice(&self.data)
    }
}

fn json_is_empty(data: &[u8]) -> bool {
    let trimmed = data.trim_ascii();
    trimmed.is_empty() || trimmed == b"[]"
}

/// A [`futures_core::Stream`] of the [`Chunk`]s of one stream, read in the
/// background. It ends after a chunk with [`closed`](Chunk::closed), after
/// catching up in [`Live::Off`], or after an error it could not retry
/// (that error is its last item). Dropping it stops the reading.
///
/// Chunks with data are delivered as they come; an empty chunk is delivered
/// when it carries news: the reader caught up, or the stream closed.
pub struct Reader {
    chunks: mpsc::Receiver<Result<Chunk, Error>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl futures_core::Stream for Reader {
    type Item = Result<Chunk, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().chunks.poll_recv(cx)
    }
}

impl Reader {
    /// The next chunk, without the `futures` traits: `None` once the
    /// reader has ended.
    pub async fn next_chunk(&mut self) -> Option<Result<Chunk, Error>> {
        self.chunks.recv().await
    }

    pub(crate) fn start(stream: DurableStream, options: ReadOptions) -> Self {
        let (tx, chunks) = mpsc::channel(16);
        let backoff = options.backoff.unwrap_or_else(|| {
            let backoff = stream.client.inner.backoff;
            if options.live == Live::Off {
                backoff
            } else {
                backoff.retries(None)
            }
        });
        let mut state = State {
            stream,
            offset: options.offset,
            cursor: None,
            up_to_date: false,
            live: options.live,
            backoff,
            tx,
        };
        let task = tokio::spawn(async move {
            if let Err(error) = state.run().await {
                let _ = state.tx.send(Err(error)).await;
            }
        });
        Self { chunks, task }
    }
}

/// Whether to go on reading.
enum Next {
    More,
    End,
}

struct State {
    stream: DurableStream,
    offset: String,
    cursor: Option<String>,
    up_to_date: bool,
    live: Live,
    backoff: Backoff,
    tx: mpsc::Sender<Result<Chunk, Error>>,
}

impl State {
    async fn run(&mut self) -> Result<(), Error> {
        let mut failures = 0;
        loop {
            let step = match self.live {
                Live::Off => self.get(false).await,
                Live::Auto if !self.up_to_date => self.get(false).await,
                Live::LongPoll => self.get(true).await,
                Live::Sse | Live::Auto => self.sse().await,
            };
            match step {
                Ok(Next::End) => return Ok(()),
                Ok(Next::More) => failures = 0,
                Err((error, headers)) => {
                    failures += 1;
                    if !error.is_retryable() || !self.backoff.allows(failures) {
                        return Err(error);
                    }
                    let delay = self.backoff.delay(failures, headers.as_ref());
                    tracing::debug!(url = %self.stream.url, %error, ?delay, "read failed; resuming");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn url(&self, live: Option<&str>) -> String {
        let mut url = format!("{}?", self.stream.url);
        if let (Some(cursor), Some(_)) = (&self.cursor, live) {
            url.push_str(&format!("cursor={}&", utf8_percent_encode(cursor, QUERY)));
        }
        if let Some(live) = live {
            url.push_str(&format!("live={live}&"));
        }
        url.push_str(&format!(
            "offset={}",
            utf8_percent_encode(&self.offset, QUERY)
        ));
        url
    }

    /// Takes in a response's position and delivers what is news.
    async fn deliver(&mut self, chunk: Chunk) -> Next {
        let news = !chunk.is_empty() || chunk.closed || (chunk.up_to_date && !self.up_to_date);
        self.offset.clone_from(&chunk.next_offset);
        if chunk.cursor.is_some() {
            self.cursor.clone_from(&chunk.cursor);
        }
        self.up_to_date = chunk.up_to_date;
        let closed = chunk.closed;
        if news && self.tx.send(Ok(chunk)).await.is_err() {
            return Next::End;
        }
        if closed || (self.live == Live::Off && self.up_to_date) {
            Next::End
        } else {
            Next::More
        }
    }

    /// One catch-up or long-poll read.
    async fn get(&mut self, long_poll: bool) -> Result<Next, (Error, Option<HeaderMap>)> {
        let url = self.url(long_poll.then_some("long-poll"));
        let timeout = if long_poll {
            LONG_POLL_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        let response = self
            .stream
            .client
            .exchange(
                &Method::GET,
                &url,
                &HeaderMap::new(),
                &Bytes::new(),
                timeout,
            )
            .await
            .map_err(|e| (e, None))?;
        let answer = Answer::read(&url, response).await?;
        match answer.status {
            StatusCode::OK | StatusCode::NO_CONTENT => {}
            status => {
                let error = Error::from_response(&url, status, &answer.headers, &answer.body);
                return Err((error, Some(answer.headers)));
            }
        }
        let next_offset = answer.next_offset(&url).map_err(|e| (e, None))?;
        self.stream.learn(answer.header("content-type"));
        let json = is_json(&answer.headers);
        let chunk = Chunk {
            data: answer.body.clone(),
            next_offset,
            up_to_date: answer.flag("stream-up-to-date") || answer.status == StatusCode::NO_CONTENT,
            closed: answer.flag("stream-closed"),
            cursor: answer.header("stream-cursor").map(str::to_owned),
            json,
        };
        if json && !chunk.data.is_empty() {
            serde_json::from_slice::<Vec<serde_json::Value>>(&chunk.data).map_err(|e| {
                (
                    Error::protocol(&url, format!("invalid JSON batch: {e}")),
                    None,
                )
            })?;
        }
        Ok(self.deliver(chunk).await)
    }

    /// One SSE connection, followed until it ends.
    async fn sse(&mut self) -> Result<Next, (Error, Option<HeaderMap>)> {
        let url = self.url(Some("sse"));
        // SSE responses do not carry the stream's content type.
        let json = self.stream_is_json().await;
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::ACCEPT,
            "text/event-stream".parse().expect("valid"),
        );
        let response = self
            .stream
            .client
            .exchange(&Method::GET, &url, &headers, &Bytes::new(), REQUEST_TIMEOUT)
            .await
            .map_err(|e| (e, None))?;
        let status = response.status();
        let event_stream = header(response.headers(), "content-type")
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        if !status.is_success() || !event_stream {
            let answer = Answer::read(&url, response).await?;
            let refused = matches!(status.as_u16(), 400 | 405 | 406 | 501) || status.is_success();
            if self.live == Live::Auto && refused {
                tracing::debug!(%url, %status, "no SSE here; long-polling instead");
                self.live = Live::LongPoll;
                return Ok(Next::More);
            }
            let error = if status.is_success() {
                Error::protocol(&url, "an SSE read answered without text/event-stream")
            } else {
                Error::from_response(&url, status, &answer.headers, &answer.body)
            };
            return Err((error, Some(answer.headers)));
        }
        let base64 = header(response.headers(), "stream-sse-data-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("base64"));
        let json = json && !base64;
        let mut body = response.into_body();
        let mut parser = Parser::default();
        let mut batch = Batch::new(json, base64);
        let mut progressed = false;
        loop {
            let frame = match tokio::time::timeout(SSE_IDLE, body.frame()).await {
                Err(_) => return Err((Error::transport(&url, "SSE connection went idle"), None)),
                Ok(None) => break,
                Ok(Some(Err(e))) if progressed => {
                    tracing::debug!(%url, error = %e, "SSE connection broke; resuming");
                    return Ok(Next::More);
                }
                Ok(Some(Err(e))) => return Err((Error::transport(&url, e), None)),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            parser.push(&data);
            while let Some(event) = parser.next() {
                match event.event.as_str() {
                    "data" => batch
                        .push(&event.data)
                        .map_err(|m| (Error::protocol(&url, m), None))?,
                    "control" => {
                        let chunk = batch
                            .finish(&event.data)
                            .map_err(|m| (Error::protocol(&url, m), None))?;
                        progressed = true;
                        if let Next::End = self.deliver(chunk).await {
                            return Ok(Next::End);
                        }
                    }
                    _ => {}
                }
            }
        }
        if progressed {
            // The server ends connections now and then; resume at once.
            Ok(Next::More)
        } else {
            Err((
                Error::transport(&url, "SSE connection ended before any event"),
                None,
            ))
        }
    }

    /// Whether the stream is JSON: SSE responses do not say, so the
    /// stream's content type is learned from a catch-up read or a `HEAD`.
    async fn stream_is_json(&self) -> bool {
        let content_type = match self.stream.content_type.get() {
            Some(known) => known.clone(),
            None => self.stream.content_type().await.unwrap_or_default(),
        };
        is_json_type(&content_type)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    header(headers, "content-type").is_some_and(is_json_type)
}

fn is_json_type(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The data events before one control event.
struct Batch {
    json: bool,
    base64: bool,
    bytes: Vec<u8>,
    messages: Vec<serde_json::Value>,
}

impl Batch {
    fn new(json: bool, base64: bool) -> Self {
        Self {
            json,
            base64,
            bytes: Vec::new(),
            messages: Vec::new(),
        }
    }

    fn push(&mut self, data: &str) -> Result<(), String> {
        if self.base64 {
            let text: String = data.chars().filter(|c| *c != '\n' && *c != '\r').collect();
            let bytes = B64
                .decode(text.as_bytes())
                .map_err(|e| format!("invalid base64 in a data event: {e}"))?;
            self.bytes.extend_from_slice(&bytes);
        } else if self.json {
            match serde_json::from_str(data) {
                Ok(serde_json::Value::Array(items)) => self.messages.extend(items),
                Ok(value) => self.messages.push(value),
                Err(e) => return Err(format!("invalid JSON in a data event: {e}")),
            }
        } else {
            self.bytes.extend_from_slice(data.as_bytes());
        }
        Ok(())
    }

    /// The chunk a control event ends.
    fn finish(&mut self, control: &str) -> Result<Chunk, String> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Control {
            stream_next_offset: String,
            stream_cursor: Option<String>,
            #[serde(default)]
            up_to_date: bool,
            #[serde(default)]
            stream_closed: bool,
        }
        let control: Control =
            serde_json::from_str(control).map_err(|e| format!("invalid control event: {e}"))?;
        let data = if self.json {
            if self.messages.is_empty() {
                Bytes::new()
            } else {
                let messages = std::mem::take(&mut self.messages);
                serde_json::to_vec(&messages)
                    .expect("JSON values serialize")
                    .into()
            }
        } else {
            std::mem::take(&mut self.bytes).into()
        };
        Ok(Chunk {
            data,
            next_offset: control.stream_next_offset,
            up_to_date: control.up_to_date || control.stream_closed,
            closed: control.stream_closed,
            cursor: control.stream_cursor,
            json: self.json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_batches_merge_json_and_keep_empty_batches_empty() {
        let mut batch = Batch::new(true, false);
        batch.push("[]").unwrap();
        let chunk = batch
            .finish(r#"{"streamNextOffset":"100","upToDate":false}"#)
            .unwrap();
        assert!(chunk.is_empty());
        batch.push("[{\"id\":1}]").unwrap();
        batch.push("[{\"id\":2}]").unwrap();
        let chunk = batch
            .finish(r#"{"streamNextOffset":"200","upToDate":true}"#)
            .unwrap();
        assert_eq!(chunk.json::<serde_json::Value>().unwrap().len(), 2);
        assert!(chunk.up_to_date);
    }

    #[test]
    fn closed_control_without_cursor_ends_the_stream() {
        let mut batch = Batch::new(false, false);
        let chunk = batch
            .finish(r#"{"streamNextOffset":"300","streamClosed":true}"#)
            .unwrap();
        assert!(chunk.closed && chunk.up_to_date && chunk.cursor.is_none());
    }

    #[test]
    fn base64_lines_are_joined_before_decoding() {
        let mut batch = Batch::new(false, true);
        batch.push("AQIDBAUG\nBwgJCg==").unwrap();
        let chunk = batch.finish(r#"{"streamNextOffset":"1"}"#).unwrap();
        assert_eq!(&chunk.data[..], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(batch.push("not base64!").is_err());
    }

    #[test]
    fn a_control_event_must_name_the_next_offset() {
        let mut batch = Batch::new(false, false);
        assert!(batch.finish(r#"{"upToDate":true}"#).is_err());
        assert!(batch.finish("not json").is_err());
    }
}
