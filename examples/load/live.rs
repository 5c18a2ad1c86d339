//! `long-poll` and `sse`: W readers follow one stream while a writer appends
//! once per interval; each append's latency runs from just before the writer
//! sends it to when each reader has it.
//!
//! Every append is `@<id>;` padded to `--body-size`, so a reader knows which
//! appends a response carries, however the server batches them. Append 0
//! warms the path up and is not measured.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::task::JoinSet;

use crate::client::{collect, connect_many, header_str, next_offset, read_uri, Conn, Target};
use crate::report::{Latencies, Report};
use crate::Error;

/// How long readers get to connect and subscribe.
const SETUP_LIMIT: Duration = Duration::from_secs(60);
/// How long readers may lag behind the last append before they are stopped.
const GRACE: Duration = Duration::from_secs(10);
/// Failed requests after which a reader gives up.
const MAX_READER_ERRORS: u64 = 10;

/// Options both live scenarios share.
#[derive(clap::Args, Debug, Clone)]
pub struct Plan {
    /// Measured appends (after one warm-up append).
    #[arg(long, default_value_t = 50)]
    appends: u32,
    /// Time between appends.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Bytes in each append (at least enough for its id).
    #[arg(long, default_value_t = 32)]
    body_size: usize,
    /// Pause between the last reader subscribing and the first append.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// The server's process id: its resident memory is read from
    /// /proc/<pid>/status while the readers are connected.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Create the stream and append through this URL instead of `--url`:
    /// another node sharing the readers' storage, to measure wake-ups
    /// across nodes.
    #[arg(long)]
    writer_url: Option<String>,
}

/// Options of the `long-poll` scenario.
#[derive(clap::Args, Debug)]
pub struct LongPollOptions {
    /// Long-poll waiters, one connection each.
    #[arg(long, default_value_t = 1000)]
    waiters: usize,
    #[command(flatten)]
    plan: Plan,
}

/// Options of the `sse` scenario.
#[derive(clap::Args, Debug)]
pub struct SseOptions {
    /// SSE subscribers, one connection each.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[command(flatten)]
    plan: Plan,
}

/// Runs the `long-poll` scenario.
pub async fn long_poll(target: &Target, options: LongPollOptions) -> Result<Report, Error> {
    fan_out(target, options.plan, options.waiters, Mode::LongPoll).await
}

/// Runs the `sse` scenario.
pub async fn sse(target: &Target, options: SseOptions) -> Result<Report, Error> {
    fan_out(target, options.plan, options.subscribers, Mode::Sse).await
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    LongPoll,
    Sse,
}

/// When each append was sent.
#[derive(Debug)]
struct Clock {
    sent: Vec<OnceLock<Instant>>,
}

impl Clock {
    fn last(&self) -> u64 {
        self.sent.len() as u64 - 1
    }
}

/// What one reader shares with the others.
#[derive(Debug, Clone)]
struct Shared {
    path: Arc<str>,
    clock: Arc<Clock>,
    subscribed: Arc<AtomicUsize>,
    deadline: Instant,
}

/// What one reader heard.
#[derive(Debug, Default)]
struct Heard {
    latencies: Latencies,
    newest: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Heard {
    /// Records every append id in `data`, received at `at`.
    fn hear(&mut self, data: &[u8], at: Instant, clock: &Clock) {
        for id in ids(data) {
            if id > self.newest && id <= clock.last() {
                self.newest = id;
                let sent = clock.sent[id as usize].get();
                if let Some(sent) = sent.filter(|_| id > 0) {
                    self.latencies.record(at.saturating_duration_since(*sent));
                }
            }
        }
    }

    fn done(&self, clock: &Clock) -> bool {
        self.newest == clock.last() || self.errors >= MAX_READER_ERRORS
    }

    fn fail(&mut self, e: impl ToString) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }
}

/// The ids of `@<id>;` marks in `data`.
fn ids(data: &[u8]) -> impl Iterator<Item = u64> + '_ {
    data.split(|&b| b == b'@').skip(1).filter_map(|part| {
        let end = part.iter().position(|&b| b == b';')?;
        std::str::from_utf8(&part[..end]).ok()?.parse().ok()
    })
}

async fn fan_out(target: &Target, plan: Plan, readers: usize, mode: Mode) -> Result<Report, Error> {
    let content_type = HeaderValue::from_static("text/plain");
    let path = target.stream_path("live");
    let writer_target = match &plan.writer_url {
        Some(url) => target.on(url)?,
        None => target.clone(),
    };
    let mut writer = writer_target.connect().await?;
    let offset = writer.create(&path, &content_type).await?;
    let rss_idle = plan.server_pid.and_then(rss_mb);

    let run_time = plan.interval * (plan.appends + 1) + plan.settle;
    let shared = Shared {
        path: path.clone().into(),
        clock: Arc::new(Clock {
            sent: (0..=plan.appends).map(|_| OnceLock::new()).collect(),
        }),
        subscribed: Arc::new(AtomicUsize::new(0)),
        deadline: Instant::now() + SETUP_LIMIT + run_time + GRACE,
    };
    let mut tasks = JoinSet::new();
    for conn in connect_many(target, readers).await? {
        let (target, shared, offset) = (target.clone(), shared.clone(), offset.clone());
        tasks.spawn(async move {
            match mode {
                Mode::LongPoll => long_poll_reader(&target, conn, &shared, offset).await,
                Mode::Sse => sse_reader(&target, conn, &shared, offset).await,
            }
        });
    }
    let setup_end = Instant::now() + SETUP_LIMIT;
    while shared.subscribed.load(Ordering::Relaxed) < readers && Instant::now() < setup_end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let subscribed = shared.subscribed.load(Ordering::Relaxed);
    tokio::time::sleep(plan.settle).await;

    let uri: http::Uri = path.parse()?;
    let mut rss_max = plan.server_pid.and_then(rss_mb);
    let mut append_errors = 0u64;
    let mut ticks = tokio::time::interval(plan.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for id in 0..=plan.appends {
        ticks.tick().await;
        let mut body = format!("@{id};").into_bytes();
        body.resize(plan.body_size.max(body.len()), b'.');
        let _ = shared.clock.sent[id as usize].set(Instant::now());
        if writer
            .append(uri.clone(), &content_type, body.into())
            .await
            .is_err()
        {
            append_errors += 1;
            writer = writer_target.connect().await?;
        }
        if let Some(rss) = plan.server_pid.and_then(rss_mb) {
            rss_max = Some(rss_max.map_or(rss, |max: f64| max.max(rss)));
        }
    }

    let mut latencies = Latencies::default();
    let (mut errors, mut first_error) = (0, None);
    let stop = Instant::now() + GRACE;
    while let Ok(Some(joined)) = tokio::time::timeout_at(stop.into(), tasks.join_next()).await {
        let heard = joined?;
        latencies.merge(heard.latencies);
        errors += heard.errors;
        first_error = first_error.or(heard.first_error);
    }
    tasks.abort_all();
    let expected = readers as u64 * u64::from(plan.appends);
    let samples = latencies.len() as u64;
    let (scenario, readers_name) = match mode {
        Mode::LongPoll => ("long-poll", "waiters"),
        Mode::Sse => ("sse", "subscribers"),
    };
    let mut report = Report::new(scenario)
        .param(readers_name, readers)
        .param("appends", plan.appends)
        .param("interval_ms", plan.interval.as_secs_f64() * 1000.0)
        .metric("subscribed", subscribed)
        .metric("deliveries", samples)
        .metric("missed", expected.saturating_sub(samples))
        .metric("errors", errors + append_errors);
    if let (Some(idle), Some(max)) = (rss_idle, rss_max) {
        report = report.metric("rss_idle_mb", idle).metric("rss_mb", max);
    }
    Ok(report.first_error(first_error).latencies(latencies))
}

async fn long_poll_reader(
    target: &Target,
    mut conn: Conn,
    shared: &Shared,
    offset: String,
) -> Heard {
    let mut heard = Heard::default();
    let (mut offset, mut cursor) = (offset, None::<String>);
    shared.subscribed.fetch_add(1, Ordering::Relaxed);
    while !heard.done(&shared.clock) {
        let Some(left) = shared.deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let extra = match &cursor {
            Some(c) => format!(
                "&live=long-poll&cursor={}",
                utf8_percent_encode(c, NON_ALPHANUMERIC)
            ),
            None => "&live=long-poll".to_owned(),
        };
        let result = async {
            let uri = read_uri(&shared.path, &offset, &extra)?;
            let response = conn
                .send_within(Method::GET, uri, &[], Bytes::new(), left)
                .await?;
            let status = response.status();
            let next = next_offset(response.headers());
            let next_cursor = header_str(response.headers(), "stream-cursor").map(str::to_owned);
            let body = collect(response.into_body(), left).await?;
            if status != StatusCode::OK && status != StatusCode::NO_CONTENT {
                return Err(format!("long-poll: {status}").into());
            }
            Ok::<_, Error>((Instant::now(), body, next, next_cursor))
        };
        match result.await {
            Ok((at, body, next, next_cursor)) => {
                heard.hear(&body, at, &shared.clock);
                offset = next.unwrap_or(offset);
                cursor = next_cursor.or(cursor);
            }
            Err(e) => {
                heard.fail(e);
                match target.connect().await {
                    Ok(fresh) => conn = fresh,
                    Err(_) => break,
                }
            }
        }
    }
    heard
}

async fn sse_reader(target: &Target, mut conn: Conn, shared: &Shared, mut offset: String) -> Heard {
    let mut heard = Heard::default();
    let mut subscribed = false;
    while !heard.done(&shared.clock) {
        let Some(left) = shared.deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let response = async {
            let uri = read_uri(&shared.path, &offset, "&live=sse")?;
            let response = conn
                .send_within(Method::GET, uri, &[], Bytes::new(), left)
                .await?;
            if response.status() != StatusCode::OK {
                return Err(format!("sse: {}", response.status()).into());
            }
            Ok::<_, Error>(response)
        };
        let mut body = match response.await {
            Ok(response) => response.into_body(),
            Err(e) => {
                heard.fail(e);
                match target.connect().await {
                    Ok(fresh) => conn = fresh,
                    Err(_) => break,
                }
                continue;
            }
        };
        if !subscribed {
            subscribed = true;
            shared.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        let mut events = Events::default();
        // Read events until the server ends this response (its connection
        // lifetime), then reconnect from the last control event's offset.
        while !heard.done(&shared.clock) {
            let frame = match tokio::time::timeout_at(shared.deadline.into(), body.frame()).await {
                Err(_) => return heard,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    heard.fail(e);
                    break;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let at = Instant::now();
            let Some(data) = frame.data_ref() else {
                continue;
            };
            events.push(data);
            while let Some((kind, data)) = events.next() {
                match kind.as_slice() {
                    b"data" => heard.hear(&data, at, &shared.clock),
                    b"control" => {
                        if let Some(next) = control_offset(&data) {
                            offset = next;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    heard
}

/// The `streamNextOffset` of a control event.
fn control_offset(data: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(data).ok()?;
    Some(value.get("streamNextOffset")?.as_str()?.to_owned())
}

/// A buffer that splits an SSE body into events.
#[derive(Debug, Default)]
struct Events {
    buf: Vec<u8>,
}

impl Events {
    fn push(&mut self, chunk: &[u8]) {
        self.buf.extend(chunk.iter().filter(|&&b| b != b'\r'));
    }

    /// The next whole event: its type and its data lines joined by `\n`.
    fn next(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let end = self.buf.windows(2).position(|w| w == b"\n\n")?;
        let (mut kind, mut data) = (b"message".to_vec(), Vec::new());
        for line in self.buf[..end].split(|&b| b == b'\n') {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => (
                    &line[..i],
                    line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..]),
                ),
                None => (line, &b""[..]),
            };
            match field {
                b"event" => kind = value.to_vec(),
                b"data" => {
                    if !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(value);
                }
                _ => {}
            }
        }
        self.buf.drain(..end + 2);
        Some((kind, data))
    }
}

/// The server's resident memory in MB, from /proc/<pid>/status.
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ids() {
        assert_eq!(ids(b"@1;...@22;..").collect::<Vec<_>>(), [1, 22]);
        assert_eq!(ids(b"[\"@3;\"]").collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn splits_events() {
        let mut events = Events::default();
        events.push(b"event: data\r\ndata: a\ndata: b\n\nevent: control\ndata: {}");
        assert_eq!(events.next(), Some((b"data".to_vec(), b"a\nb".to_vec())));
        assert_eq!(events.next(), None);
        events.push(b"\n\n");
        assert_eq!(events.next(), Some((b"control".to_vec(), b"{}".to_vec())));
    }
}
