//! One subscription's durable state and the rules that move it: linking
//! streams, pending work, wakes, generation fencing, leases and the webhook
//! retry schedule. Nothing here does I/O; the manager persists the state
//! and carries out the [`Action`]s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::{Kind, Pattern, Spec};
use super::signing::random_id;
use super::Failure;
use crate::offset::Offset;

/// First webhook retry delay, in milliseconds.
const RETRY_BASE_MS: u64 = 1_000;
/// Longest webhook retry delay, in milliseconds.
const RETRY_MAX_MS: u64 = 60_000;

/// A subscription as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) spec: Spec,
    pub(crate) hash: String,
    pub(crate) created_at: String,
    /// The public URL of the stream root, for `callback_url` and
    /// `jwks_url`.
    pub(crate) root: String,
    pub(crate) links: BTreeMap<String, Link>,
    pub(crate) generation: u64,
    pub(crate) wake: Option<Wake>,
    pub(crate) retry: Option<Retry>,
}

/// One linked stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Link {
    pub(crate) explicit: bool,
    pub(crate) glob: bool,
    /// Last processed offset, inclusive.
    pub(crate) acked: Offset,
    /// The stream's tail as last seen.
    pub(crate) tail: Offset,
}

impl Link {
    pub(crate) fn at(tail: Offset, explicit: bool) -> Self {
        Self {
            explicit,
            glob: !explicit,
            acked: tail,
            tail,
        }
    }

    pub(crate) fn pending(&self) -> bool {
        self.tail > self.acked
    }

    pub(crate) fn link_type(&self) -> &'static str {
        if self.explicit {
            "explicit"
        } else {
            "glob"
        }
    }
}

/// The wake in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Wake {
    pub(crate) id: String,
    /// The worker holding the lease (pull-wake), once claimed.
    pub(crate) holder: Option<String>,
    /// When the lease ends, in Unix milliseconds; `None` while a pull wake
    /// waits to be claimed.
    pub(crate) lease_until: Option<u64>,
    /// Each linked stream's tail when the wake was issued (webhooks) or
    /// claimed (pull-wake): what `{"done": true}` acks.
    pub(crate) tails: BTreeMap<String, Offset>,
}

/// The webhook retry schedule after a failed delivery.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Retry {
    pub(crate) attempt: u32,
    pub(crate) next_attempt_at: u64,
}

/// What the manager must do after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send the webhook for this wake.
    Deliver { generation: u64, wake_id: String },
    /// Write a wake event for this generation to the wake stream; `stream`
    /// is one stream with pending work.
    WakeEvent { generation: u64, stream: String },
}

/// An acknowledgement from a worker.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Ack {
    #[serde(alias = "path")]
    pub(crate) stream: String,
    pub(crate) offset: String,
}

impl Record {
    pub(crate) fn pending(&self) -> bool {
        self.links.values().any(Link::pending)
    }

    pub(crate) fn failed(&self) -> bool {
        self.retry.is_some()
    }

    /// A stream's tail moved to `tail` (or the stream was created with it).
    /// Returns whether the stored state changed.
    pub(crate) fn observe(&mut self, pattern: Option<&Pattern>, path: &str, tail: Offset) -> bool {
        if let Some(link) = self.links.get_mut(path) {
            link.tail = link.tail.max(tail);
            return false;
        }
        if !pattern.is_some_and(|p| p.matches(path)) {
            return false;
        }
        // Linked before the write that revealed it, so that write is pending.
        let mut link = Link::at(Offset::ZERO, false);
        link.tail = tail;
        self.links.insert(path.to_owned(), link);
        true
    }

    /// A stream was deleted: glob links go, explicit links restart at zero
    /// for a stream that may be created again.
    pub(crate) fn forget(&mut self, path: &str) -> bool {
        match self.links.get_mut(path) {
            None => false,
            Some(link) if link.explicit => {
                *link = Link::at(Offset::ZERO, true);
                true
            }
            Some(_) => {
                self.links.remove(path);
                true
            }
        }
    }

    /// Advances time to `now`: ends an expired lease and, when work is
    /// pending and nothing is in flight, issues a new wake.
    pub(crate) fn step(&mut self, now: u64) -> Option<Action> {
        if let Some(wake) = &self.wake {
            if wake.lease_until.is_some_and(|until| until <= now) {
                self.wake = None;
            }
        }
        if self.wake.is_some() || !self.pending() {
            return None;
        }
        if self.retry.is_some_and(|r| r.next_attempt_at > now) {
            return None;
        }
        self.generation += 1;
        let id = random_id("w_");
        let (lease_until, action) = match self.spec.kind {
            Kind::Webhook => (
                Some(now + self.spec.lease_ttl_ms),
                Action::Deliver {
                    generation: self.generation,
                    wake_id: id.clone(),
                },
            ),
            Kind::PullWake => {
                let stream = self
                    .links
                    .iter()
                    .find(|(_, link)| link.pending())
                    .map(|(path, _)| path.clone())
                    .unwrap_or_default();
                (
                    None,
                    Action::WakeEvent {
                        generation: self.generation,
                        stream,
                    },
                )
            }
        };
        self.wake = Some(Wake {
            id,
            holder: None,
            lease_until,
            tails: self.tails(),
        });
        Some(action)
    }

    /// When [`step`](Self::step) next has something to do on its own.
    pub(crate) fn deadline(&self) -> Option<u64> {
        match &self.wake {
            Some(wake) => wake.lease_until,
            None if self.pending() => self.retry.map(|r| r.next_attempt_at),
            None => None,
        }
    }

    fn tails(&self) -> BTreeMap<String, Offset> {
        self.links
            .iter()
            .map(|(path, link)| (path.clone(), link.tail))
            .collect()
    }

    /// A pull-wake worker claims the subscription.
    pub(crate) fn claim(&mut self, worker: &str, now: u64) -> Result<&Wake, Failure> {
        if self.spec.kind != Kind::PullWake {
            return Err(Failure::invalid("only pull-wake subscriptions are claimed"));
        }
        let _ = self.step(now);
        let ttl = self.spec.lease_ttl_ms;
        let tails = self.tails();
        let Some(wake) = self.wake.as_mut() else {
            return Err(Failure::new(
                http::StatusCode::CONFLICT,
                "NO_PENDING_WORK",
                "no pending work",
            ));
        };
        if let Some(holder) = &wake.holder {
            return Err(Failure::already_claimed(holder, self.generation));
        }
        wake.holder = Some(worker.to_owned());
        wake.lease_until = Some(now + ttl);
        wake.tails = tails;
        Ok(wake)
    }

    /// Checks that a callback, ack or release is for the current wake.
    pub(crate) fn fence(&self, generation: u64, wake_id: &str) -> Result<(), Failure> {
        match &self.wake {
            Some(wake) if generation == self.generation && wake.id == wake_id => Ok(()),
            _ => Err(Failure::fenced()),
        }
    }

    /// Applies a worker's acks (after [`fence`](Self::fence)); with `done`,
    /// ends the wake. Returns whether work is still pending.
    pub(crate) fn ack(
        &mut self,
        acks: &[(String, Offset)],
        done: bool,
        now: u64,
    ) -> Result<bool, Failure> {
        for (path, offset) in acks {
            let link = self.links.get(path).ok_or_else(|| {
                Failure::invalid(format!("{path} is not linked to this subscription"))
            })?;
            if *offset > link.tail {
                return Err(Failure::new(
                    http::StatusCode::CONFLICT,
                    "INVALID_OFFSET",
                    format!("offset is beyond the tail of {path}"),
                ));
            }
        }
        for (path, offset) in acks {
            if let Some(link) = self.links.get_mut(path) {
                link.acked = link.acked.max(*offset);
            }
        }
        if done {
            self.wake = None;
        } else if let Some(wake) = self.wake.as_mut() {
            wake.lease_until = Some(now + self.spec.lease_ttl_ms);
        }
        Ok(self.pending())
    }

    /// A webhook answered `{"done": true}`: ack the wake's snapshot.
    pub(crate) fn done(&mut self) {
        if let Some(wake) = self.wake.take() {
            for (path, tail) in wake.tails {
                if let Some(link) = self.links.get_mut(&path) {
                    link.acked = link.acked.max(tail.min(link.tail));
                }
            }
        }
        self.retry = None;
    }

    /// A webhook delivery failed: end the wake and retry later, with
    /// exponential backoff and `jitter` (0.0 to 1.0) spreading it by 20%.
    pub(crate) fn delivery_failed(&mut self, now: u64, jitter: f64) {
        self.wake = None;
        let attempt = self.retry.map_or(1, |r| r.attempt.saturating_add(1));
        let exp = RETRY_BASE_MS.saturating_mul(1 << (attempt - 1).min(16));
        let delay = exp.min(RETRY_MAX_MS) as f64 * (0.8 + 0.4 * jitter.clamp(0.0, 1.0));
        self.retry = Some(Retry {
            attempt,
            next_attempt_at: now + delay as u64,
        });
    }

    /// After a restart: a pull wake nobody claimed may never have reached
    /// its wake stream, so it is issued again.
    pub(crate) fn recover(&mut self) {
        if self
            .wake
            .as_ref()
            .is_some_and(|w| w.holder.is_none() && w.lease_until.is_none())
        {
            self.wake = None;
        }
    }
}

impl Serialize for Offset {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Offset {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: Kind) -> Record {
        let spec = match kind {
            Kind::Webhook => Spec::parse(br#"{"type":"webhook","pattern":"e/*","webhook":{"url":"https://h.example/x"},"lease_ttl_ms":1000}"#),
            Kind::PullWake => Spec::parse(br#"{"type":"pull-wake","pattern":"e/*","wake_stream":"w","lease_ttl_ms":1000}"#),
        }
        .unwrap();
        Record {
            id: "s".into(),
            hash: spec.hash(),
            spec,
            created_at: String::new(),
            root: String::new(),
            links: BTreeMap::new(),
            generation: 0,
            wake: None,
            retry: None,
        }
    }

    fn off(n: u64) -> Offset {
        Offset::new(n, n * 10).unwrap()
    }

    #[test]
    fn a_matching_write_links_the_stream_before_it_and_wakes() {
        let mut r = record(Kind::Webhook);
        let pattern = r.spec.matcher();
        assert!(r.observe(pattern.as_ref(), "e/a", off(1)));
        assert!(!r.observe(pattern.as_ref(), "other/a", off(1)));
        assert_eq!(r.links["e/a"].acked, Offset::ZERO);
        let action = r.step(0).unwrap();
        assert!(matches!(action, Action::Deliver { generation: 1, .. }));
        // A wake in flight holds back the next one.
        r.observe(pattern.as_ref(), "e/a", off(2));
        assert_eq!(r.step(10), None);
    }

    #[test]
    fn done_acks_the_snapshot_and_later_writes_wake_again() {
        let mut r = record(Kind::Webhook);
        let pattern = r.spec.matcher();
        r.observe(pattern.as_ref(), "e/a", off(1));
        r.step(0).unwrap();
        r.observe(pattern.as_ref(), "e/a", off(2));
        r.done();
        assert_eq!(r.links["e/a"].acked, off(1));
        assert!(matches!(
            r.step(1),
            Some(Action::Deliver { generation: 2, .. })
        ));
    }

    #[test]
    fn stale_generations_and_wake_ids_are_fenced() {
        let mut r = record(Kind::Webhook);
        r.observe(r.spec.matcher().as_ref(), "e/a", off(1));
        r.step(0).unwrap();
        let wake = r.wake.clone().unwrap();
        assert!(r.fence(1, &wake.id).is_ok());
        assert_eq!(r.fence(0, &wake.id).unwrap_err().code, "FENCED");
        assert_eq!(r.fence(1, "w_other").unwrap_err().code, "FENCED");
        assert_eq!(r.ack(&[("e/a".into(), off(1))], true, 5), Ok(false));
        assert_eq!(r.fence(1, &wake.id).unwrap_err().code, "FENCED");
    }

    #[test]
    fn acks_past_the_tail_or_for_unlinked_streams_change_nothing() {
        let mut r = record(Kind::Webhook);
        r.observe(r.spec.matcher().as_ref(), "e/a", off(1));
        r.step(0).unwrap();
        let beyond = r.ack(&[("e/a".into(), off(1)), ("e/a".into(), off(2))], true, 5);
        assert_eq!(beyond.unwrap_err().code, "INVALID_OFFSET");
        let unlinked = r.ack(&[("e/b".into(), off(1))], true, 5);
        assert_eq!(unlinked.unwrap_err().status, http::StatusCode::BAD_REQUEST);
        assert_eq!(r.links["e/a"].acked, Offset::ZERO);
        assert!(r.wake.is_some());
    }

    #[test]
    fn an_expired_lease_rewakes_pending_work() {
        let mut r = record(Kind::Webhook);
        r.observe(r.spec.matcher().as_ref(), "e/a", off(1));
        r.step(0).unwrap();
        assert_eq!(r.deadline(), Some(1_000));
        assert_eq!(r.step(999), None);
        assert!(matches!(
            r.step(1_000),
            Some(Action::Deliver { generation: 2, .. })
        ));
    }

    #[test]
    fn retries_back_off_exponentially_to_a_minute_with_jitter() {
        let mut r = record(Kind::Webhook);
        r.observe(r.spec.matcher().as_ref(), "e/a", off(1));
        let mut delays = Vec::new();
        for _ in 0..9 {
            r.step(0).unwrap();
            r.delivery_failed(0, 0.5);
            let next = r.retry.unwrap().next_attempt_at;
            assert_eq!(r.step(next - 1), None, "no wake before the retry time");
            delays.push(next);
            r.retry = Some(Retry {
                next_attempt_at: 0,
                ..r.retry.unwrap()
            });
        }
        assert_eq!(
            delays,
            [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        r.step(0).unwrap();
        r.retry = None;
        r.delivery_failed(0, 0.0);
        assert_eq!(r.retry.unwrap().next_attempt_at, 800);
        r.delivery_failed(0, 1.0);
        assert_eq!(r.retry.unwrap().next_attempt_at, 2_400);
    }

    #[test]
    fn pull_wake_claims_are_exclusive_until_released_or_expired() {
        let mut r = record(Kind::PullWake);
        assert_eq!(r.claim("w1", 0).unwrap_err().code, "NO_PENDING_WORK");
        r.observe(r.spec.matcher().as_ref(), "e/a", off(1));
        assert!(
            matches!(r.step(0), Some(Action::WakeEvent { generation: 1, ref stream }) if stream == "e/a")
        );
        let wake = r.claim("w1", 0).unwrap().clone();
        assert_eq!(wake.holder.as_deref(), Some("w1"));
        let busy = r.claim("w2", 10).unwrap_err();
        assert_eq!(busy.code, "ALREADY_CLAIMED");
        // A heartbeat extends the lease.
        assert_eq!(r.ack(&[], false, 900), Ok(true));
        assert!(r.claim("w2", 1_500).is_err());
        // Past the lease the claim is free again, under a new generation.
        let next = r.claim("w2", 1_900).unwrap();
        assert_eq!(next.holder.as_deref(), Some("w2"));
        assert_eq!(r.generation, 2);
    }

    #[test]
    fn deleting_a_stream_drops_glob_links_and_resets_explicit_ones() {
        let mut r = record(Kind::Webhook);
        r.observe(r.spec.matcher().as_ref(), "e/a", off(1));
        r.links.insert(
            "x".into(),
            Link {
                acked: off(1),
                tail: off(2),
                ..Link::at(off(1), true)
            },
        );
        assert!(r.forget("e/a"));
        assert!(!r.links.contains_key("e/a"));
        assert!(r.forget("x"));
        assert_eq!(r.links["x"], Link::at(Offset::ZERO, true));
        assert!(!r.pending());
    }
}
