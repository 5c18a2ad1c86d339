//! Waking readers at a stream's tail, on this node and on others.
//!
//! A node wakes its own readers directly when it changes a stream. Other
//! nodes learn of the change through a [`WakeChannel`]: the PostgreSQL one
//! batches stream ids and sends them with `pg_notify`, outside any append's
//! transaction, and a dedicated connection `LISTEN`s, reconnecting after a
//! database restart. Hints may be lost (a restart, a full queue); every wait
//! therefore also ends after a bounded re-check interval, so a reader never
//! sleeps past its long-poll timeout on a lost hint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::live::TailWait;

/// Carries "these streams changed" hints to the other nodes.
///
/// Hints are best effort: a lost one only delays a reader until its next
/// re-check.
pub(crate) trait WakeChannel: Send + Sync + 'static {
    /// Tells the other nodes that stream `id` changed. Must not block.
    fn publish(&self, id: u64);
}

/// This node's readers waiting at a stream's tail, by stream id.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    streams: Mutex<HashMap<u64, watch::Sender<()>>>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, watch::Sender<()>>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver that changes at the next wake of stream `id`.
    pub(crate) fn subscribe(&self, id: u64) -> watch::Receiver<()> {
        let mut streams = self.lock();
        if streams.len() > 1024 && streams.len().is_power_of_two() {
            streams.retain(|_, tx| tx.receiver_count() > 0);
        }
        streams
            .entry(id)
            .or_insert_with(|| watch::Sender::new(()))
            .subscribe()
    }

    /// Wakes stream `id`'s readers.
    pub(crate) fn wake(&self, id: u64) {
        let mut streams = self.lock();
        if let Some(tx) = streams.get(&id) {
            tx.send_replace(());
            if tx.receiver_count() == 0 {
                streams.remove(&id);
            }
        }
    }

    /// Wakes every reader: hints may have been lost.
    pub(crate) fn wake_all(&self) {
        let mut streams = self.lock();
        for tx in streams.values() {
            tx.send_replace(());
        }
        streams.retain(|_, tx| tx.receiver_count() > 0);
    }
}

/// A wait that ends at the next wake of the stream or after `recheck`.
pub(crate) fn tail_wait(mut rx: watch::Receiver<()>, recheck: Duration) -> TailWait {
    TailWait::new(async move {
        tokio::select! {
            // An error means the sender is gone: wake up and find out.
            _ = rx.changed() => {}
            () = tokio::time::sleep(recheck) => {}
        }
    })
}

/// The PostgreSQL channel: `pg_notify` to send, `LISTEN` to receive.
#[derive(Debug)]
pub(crate) struct PgWake {
    queue: mpsc::UnboundedSender<u64>,
}

impl WakeChannel for PgWake {
    fn publish(&self, id: u64) {
        // The sender task ends only with the storage.
        let _ = self.queue.send(id);
    }
}

/// The largest payload sent in one notification; PostgreSQL allows 8000
/// bytes.
const PAYLOAD_LIMIT: usize = 7_000;

impl PgWake {
    /// Starts the sender and listener tasks for `channel`. `node` names this
    /// node in payloads, so it skips its own hints. The receiver turns
    /// `true` once the listener listens.
    pub(crate) fn start(
        pool: deadpool_postgres::Pool,
        config: tokio_postgres::Config,
        channel: String,
        node: u64,
        waiters: Arc<Waiters>,
    ) -> (Self, [JoinHandle<()>; 2], watch::Receiver<bool>) {
        let (queue, rx) = mpsc::unbounded_channel();
        let (ready, listening) = watch::channel(false);
        let sender = tokio::spawn(send(pool, channel.clone(), node, rx));
        let listener = tokio::spawn(listen(config, channel, node, waiters, ready));
        (Self { queue }, [sender, listener], listening)
    }
}

/// Sends queued hints, every id queued meanwhile in one notification.
async fn send(
    pool: deadpool_postgres::Pool,
    channel: String,
    node: u64,
    mut rx: mpsc::UnboundedReceiver<u64>,
) {
    let mut ids = Vec::new();
    while rx.recv_many(&mut ids, 4096).await > 0 {
        ids.sort_unstable();
        ids.dedup();
        let mut payloads = Vec::new();
        let mut payload = format!("{node}:");
        for id in ids.drain(..) {
            if payload.len() > PAYLOAD_LIMIT {
                payloads.push(std::mem::replace(&mut payload, format!("{node}:")));
            }
            if !payload.ends_with(':') {
                payload.push(',');
            }
            payload.push_str(&id.to_string());
        }
        payloads.push(payload);
        let client = match pool.get().await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "wake hints dropped: no database connection");
                continue;
            }
        };
        for payload in payloads {
            if let Err(e) = client
                .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
                .await
            {
                tracing::debug!(error = %e, "wake hint not sent");
            }
        }
    }
}

/// Listens on a dedicated connection, forever, reconnecting with backoff.
async fn listen(
    config: tokio_postgres::Config,
    channel: String,
    node: u64,
    waiters: Arc<Waiters>,
    ready: watch::Sender<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match listen_once(&config, &channel, node, &waiters, &ready).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => tracing::warn!(error = %e, "wake listener disconnected"),
        }
        // Whatever was sent while no one listened is lost: every reader
        // checks again.
        waiters.wake_all();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    node: u64,
    waiters: &Waiters,
    ready: &watch::Sender<bool>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut notifications) = mpsc::unbounded_channel();
    let driver = async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message? {
                let _ = tx.send(n);
            }
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    let listening = async {
        let quoted = channel.replace('"', "\"\"");
        client
            .batch_execute(&format!("LISTEN \"{quoted}\""))
            .await?;
        tracing::debug!(channel, "listening for wake hints");
        // Hints sent before LISTEN took effect are lost.
        waiters.wake_all();
        ready.send_replace(true);
        while let Some(n) = notifications.recv().await {
            dispatch(n.payload(), node, waiters);
        }
        Ok::<(), tokio_postgres::Error>(())
    };
    tokio::select! {
        result = driver => result,
        result = listening => result,
    }
}

/// Wakes the streams a payload names, unless this node sent it.
fn dispatch(payload: &str, node: u64, waiters: &Waiters) {
    let Some((from, ids)) = payload.split_once(':') else {
        return;
    };
    if from.parse() == Ok(node) {
        return;
    }
    for id in ids.split(',').filter_map(|id| id.parse().ok()) {
        waiters.wake(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_from_other_nodes_wake_their_streams() {
        let waiters = Waiters::default();
        let mut one = waiters.subscribe(1);
        let two = waiters.subscribe(2);
        dispatch("7:1,3", 9, &waiters);
        assert!(one.has_changed().unwrap());
        assert!(!two.has_changed().unwrap());
        one.mark_unchanged();
        dispatch("9:1,2", 9, &waiters);
        assert!(!one.has_changed().unwrap());
        assert!(!two.has_changed().unwrap());
        dispatch("garbage", 9, &waiters);
        dispatch("7:x,2", 9, &waiters);
        assert!(two.has_changed().unwrap());
    }
}
