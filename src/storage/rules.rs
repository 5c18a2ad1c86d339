//! Protocol rules that run inside a backend's critical section.
//!
//! Every backend calls these, so producer fencing, `Stream-Seq`, closure,
//! content-type matching, fork resolution and idempotent re-creation behave
//! the same whatever stores the bytes. A backend locks a stream (or opens a
//! transaction), calls [`plan_append`], writes the planned records and the
//! new [`WriterState`] together, and only then answers.

use std::collections::HashMap;

use bytes::Bytes;

use super::{Append, BadBody, StreamError, StreamErrorKind};
use crate::json::{self, JsonError};
use crate::offset::Offset;
use crate::producer::{ProducerCheck, ProducerState};
use crate::stream::{ContentType, Expiry, ForkPoint, ForkRequest, StreamConfig};

/// The state a stream's writers change, kept by the backend with the data and
/// committed atomically with each append.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterState {
    /// Whether the stream is closed.
    pub closed: bool,
    /// The last `Stream-Seq` accepted. Its scope is the whole stream.
    pub stream_seq: Option<String>,
    /// Each idempotent producer's epoch and last sequence.
    pub producers: HashMap<String, ProducerState>,
}

/// What an append will do, decided before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendPlan {
    /// Append `records` (possibly none, for a close-only request), then apply
    /// the state changes.
    Write {
        /// The records to append.
        records: Vec<Bytes>,
        /// The producer's new state.
        producer: Option<(String, ProducerState)>,
        /// The new `Stream-Seq`.
        stream_seq: Option<String>,
        /// Whether the stream closes.
        close: bool,
    },
    /// A producer's retry; nothing changes.
    Duplicate(ProducerState),
    /// Close-only on a closed stream; nothing changes.
    AlreadyClosed,
}

/// Decides an append against a stream's content type, tail and writer state.
///
/// The checks run in the order PROTOCOL.md section 5.2 gives: closure, then
/// content type, then producer and sequence. Nothing is changed here; apply
/// the plan with [`WriterState::apply`] in the same critical section.
///
/// # Errors
///
/// Returns the protocol outcome that refuses the append.
pub fn plan_append(
    content_type: &ContentType,
    tail: Offset,
    writer: &WriterState,
    append: Append,
) -> Result<AppendPlan, StreamError> {
    let producer_check = append.producer.as_ref().map(|claim| {
        let state = writer.producers.get(&claim.id).copied();
        (claim.id.clone(), claim.check(state))
    });
    let has_body = !matches!(&append.records, Ok(records) if records.is_empty());

    if writer.closed {
        // A producer's retry of the write that closed the stream is a
        // duplicate; anything else a producer sends, a close included, is
        // refused (PROTOCOL.md 5.2.1). A plain close-only is idempotent.
        match producer_check {
            Some((_, ProducerCheck::Duplicate(state))) => return Ok(AppendPlan::Duplicate(state)),
            None if append.close && !has_body => return Ok(AppendPlan::AlreadyClosed),
            _ => {}
        }
        return Err(StreamError::new(
            StreamErrorKind::Closed { tail },
            "stream is closed",
        ));
    }

    if has_body {
        match &append.content_type {
            Some(ct) if ct.matches(content_type) => {}
            Some(_) => {
                return Err(StreamError::new(
                    StreamErrorKind::ContentTypeMismatch,
                    "content type does not match the stream's",
                ))
            }
            None => return Err(StreamError::invalid("missing Content-Type")),
        }
    }
    let records = append.records.map_err(|bad| StreamError::invalid(bad.0))?;
    if records.is_empty() && !append.close {
        return Err(StreamError::invalid("empty body"));
    }

    let producer = match producer_check {
        None => None,
        Some((id, check)) => match check {
            ProducerCheck::Accept(state) => Some((id, state)),
            ProducerCheck::Duplicate(state) => return Ok(AppendPlan::Duplicate(state)),
            ProducerCheck::StaleEpoch { current } => {
                return Err(StreamError::new(
                    StreamErrorKind::StaleEpoch { current },
                    "stale producer epoch",
                ))
            }
            ProducerCheck::EpochNotAtZero => {
                return Err(StreamError::invalid(
                    "a new producer epoch must start at seq 0",
                ))
            }
            ProducerCheck::Gap { expected, received } => {
                return Err(StreamError::new(
                    StreamErrorKind::SequenceGap { expected, received },
                    "producer sequence gap",
                ))
            }
        },
    };

    if let Some(seq) = &append.stream_seq {
        if writer.stream_seq.as_ref().is_some_and(|last| last >= seq) {
            return Err(StreamError::new(
                StreamErrorKind::SeqRegression,
                "Stream-Seq must increase",
            ));
        }
    }

    // The new tail itself is the backend's to compute as it stores the
    // records; here it only must not outgrow what an offset can name.
    records
        .iter()
        .try_fold(tail, |at, record| at.after_record(record.len()))
        .ok_or_else(|| StreamError::new(StreamErrorKind::Full, "stream is full"))?;

    Ok(AppendPlan::Write {
        records,
        producer,
        stream_seq: append.stream_seq,
        close: append.close,
    })
}

impl WriterState {
    /// Applies the state changes of a [`AppendPlan::Write`]; other plans
    /// change nothing.
    pub fn apply(&mut self, plan: &AppendPlan) {
        if let AppendPlan::Write {
            producer,
            stream_seq,
            close,
            ..
        } = plan
        {
            self.record(producer.clone(), stream_seq.clone(), *close);
        }
    }

    /// Records what an append changed: the producer's new state, the new
    /// `Stream-Seq`, and closure.
    pub fn record(
        &mut self,
        producer: Option<(String, ProducerState)>,
        stream_seq: Option<String>,
        close: bool,
    ) {
        if let Some((id, state)) = producer {
            self.producers.insert(id, state);
        }
        if let Some(seq) = stream_seq {
            self.stream_seq = Some(seq);
        }
        self.closed |= close;
    }
}

/// Splits a body into the records it stores: for JSON streams its messages,
/// one level of arrays flattened; for others the body as one record. An empty
/// body is no record.
///
/// `[]` is accepted only when `create` is set.
///
/// # Errors
///
/// Returns why a JSON body is refused.
pub fn records(
    content_type: &ContentType,
    body: Bytes,
    create: bool,
) -> Result<Vec<Bytes>, BadBody> {
    if content_type.is_json() {
        if body.is_empty() {
            return Ok(Vec::new());
        }
        return json::messages(&body, create).map_err(|e| match e {
            JsonError::Invalid(why) => BadBody(format!("invalid JSON: {why}")),
            JsonError::EmptyArray => BadBody("empty JSON array".into()),
            JsonError::TooDeep => BadBody(format!(
                "JSON nested deeper than {} levels",
                json::MAX_DEPTH
            )),
            JsonError::TooMany => BadBody(format!(
                "more than {} JSON messages in one request",
                json::MAX_MESSAGES
            )),
        });
    }
    Ok(if body.is_empty() {
        Vec::new()
    } else {
        vec![body]
    })
}

/// What a backend knows of an existing stream when a `PUT` names it again.
#[derive(Debug, Clone)]
pub struct Existing<'a> {
    /// Its content type.
    pub content_type: &'a ContentType,
    /// Its expiry.
    pub expiry: Expiry,
    /// Whether it is closed.
    pub closed: bool,
    /// Its fork point, when it is a fork.
    pub fork: Option<&'a ForkPoint>,
}

/// Whether a `PUT` with `config` re-confirms `existing` (`200 OK`) rather than
/// conflicting with it (`409 Conflict`).
pub fn same_config(existing: &Existing<'_>, config: &StreamConfig) -> bool {
    let content_type = match (&config.content_type, existing.fork) {
        (Some(ct), _) => ct.matches(existing.content_type),
        (None, Some(_)) => true,
        (None, None) => ContentType::default().matches(existing.content_type),
    };
    let expiry = match (config.expiry, existing.fork) {
        (Expiry::Never, Some(_)) => true,
        (requested, _) => requested == existing.expiry,
    };
    let fork = match (&config.fork, existing.fork) {
        (None, None) => true,
        (Some(asked), Some(have)) => {
            asked.source == have.source
                && asked.offset.is_none_or(|o| o == have.anchor)
                && asked.sub_offset == have.sub_offset
        }
        _ => false,
    };
    content_type && expiry && fork && config.closed == existing.closed
}

/// The expiry a fork gets: its own when it asks for one, else its source's
/// (PROTOCOL.md section 4.2, the fork TTL table).
pub fn fork_expiry(source: Expiry, requested: Expiry) -> Expiry {
    match requested {
        Expiry::Never => source,
        own => own,
    }
}

/// A read-only view of a fork source, as its readers see it (its own fork
/// chain included).
pub trait SourceView {
    /// The offset after the last record.
    fn tail(&self) -> Offset;
    /// The length of the record that starts at `at`, if one does.
    fn record_len(&self, at: Offset) -> Option<usize>;
    /// The record that starts at `at`, if one does.
    fn record_at(&self, at: Offset) -> Option<Bytes>;
    /// Whether `at` is the start of a record or the tail.
    fn is_boundary(&self, at: Offset) -> bool;
}

/// Where a new fork diverges, resolved against its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedFork {
    /// The fork point as stored: the source and the anchor asked for.
    pub point: ForkPoint,
    /// The fork inherits the source's data before this offset.
    pub base: Offset,
    /// When a byte sub-offset ends inside a record, the part of that record
    /// the fork inherits; it becomes the fork's first own record.
    pub prefix: Option<Bytes>,
}

/// Resolves `Stream-Fork-Offset` and `Stream-Fork-Sub-Offset` against the
/// source.
///
/// # Errors
///
/// An invalid-request error when the offset is past the source's tail or not
/// a record boundary, or when the sub-offset reaches past the next boundary
/// (for bytes, the end of the record at the anchor; for JSON, the tail).
pub fn resolve_fork(
    source: &impl SourceView,
    json: bool,
    request: &ForkRequest,
) -> Result<ResolvedFork, StreamError> {
    let tail = source.tail();
    let anchor = request.offset.unwrap_or(tail);
    if anchor > tail {
        return Err(StreamError::invalid(
            "fork offset is beyond the source's tail",
        ));
    }
    if !source.is_boundary(anchor) {
        return Err(StreamError::invalid(
            "fork offset is not a position in the source",
        ));
    }
    let point = ForkPoint {
        source: request.source.clone(),
        anchor,
        sub_offset: request.sub_offset,
    };
    let overshoot = || StreamError::invalid("fork sub-offset is past the next data boundary");
    let mut base = anchor;
    let mut prefix = None;
    if json {
        if request.sub_offset > tail.index() - anchor.index() {
            return Err(overshoot());
        }
        for _ in 0..request.sub_offset {
            let len = source.record_len(base).ok_or_else(overshoot)?;
            base = base.after_record(len).ok_or_else(overshoot)?;
        }
    } else if request.sub_offset > 0 {
        let len = source.record_len(anchor).ok_or_else(overshoot)?;
        let sub = usize::try_from(request.sub_offset).map_err(|_| overshoot())?;
        if sub > len {
            return Err(overshoot());
        }
        if sub == len {
            base = anchor.after_record(sub).ok_or_else(overshoot)?;
        } else {
            let record = source.record_at(anchor).ok_or_else(|| {
                StreamError::new(
                    StreamErrorKind::Unavailable,
                    "could not read the fork source",
                )
            })?;
            prefix = Some(record.slice(..sub));
        }
    }
    Ok(ResolvedFork {
        point,
        base,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::producer::ProducerClaim;

    fn text() -> ContentType {
        ContentType::parse("text/plain").unwrap()
    }

    fn append(body: &str) -> Append {
        Append {
            path: "s".into(),
            content_type: Some(text()),
            records: Ok(if body.is_empty() {
                vec![]
            } else {
                vec![Bytes::copy_from_slice(body.as_bytes())]
            }),
            close: false,
            stream_seq: None,
            producer: None,
            now: SystemTime::now(),
        }
    }

    fn with_producer(mut a: Append, epoch: u64, seq: u64) -> Append {
        a.producer = Some(ProducerClaim {
            id: "p".into(),
            epoch,
            seq,
        });
        a
    }

    #[test]
    fn closed_is_checked_before_content_type_and_seq() {
        let writer = WriterState {
            closed: true,
            ..Default::default()
        };
        let mut a = append("x");
        a.content_type = ContentType::parse("application/json");
        a.stream_seq = Some("0".into());
        let err = plan_append(&text(), Offset::ZERO, &writer, a).unwrap_err();
        assert!(err.is_closed());
    }

    #[test]
    fn close_only_on_closed_stream_is_idempotent() {
        let writer = WriterState {
            closed: true,
            ..Default::default()
        };
        let mut a = append("");
        a.close = true;
        a.content_type = None;
        assert_eq!(
            plan_append(&text(), Offset::ZERO, &writer, a).unwrap(),
            AppendPlan::AlreadyClosed
        );
    }

    #[test]
    fn rejected_append_leaves_producer_state_alone() {
        let mut writer = WriterState::default();
        let first = plan_append(
            &text(),
            Offset::ZERO,
            &writer,
            with_producer(append("a"), 0, 0),
        )
        .unwrap();
        writer.apply(&first);
        let mut bad = with_producer(append("b"), 0, 1);
        bad.records = Err(super::super::BadBody("invalid JSON".into()));
        assert!(plan_append(&text(), Offset::ZERO, &writer, bad).is_err());
        let mut wrong_type = with_producer(append("b"), 0, 1);
        wrong_type.content_type = ContentType::parse("application/json");
        assert!(plan_append(&text(), Offset::ZERO, &writer, wrong_type).is_err());
        let retry = plan_append(
            &text(),
            Offset::ZERO,
            &writer,
            with_producer(append("b"), 0, 1),
        )
        .unwrap();
        assert!(matches!(retry, AppendPlan::Write { .. }));
    }

    #[test]
    fn stream_seq_compares_bytewise() {
        let writer = WriterState {
            stream_seq: Some("2".into()),
            ..Default::default()
        };
        let mut ten = append("x");
        ten.stream_seq = Some("10".into());
        assert_eq!(
            plan_append(&text(), Offset::ZERO, &writer, ten)
                .unwrap_err()
                .kind(),
            &StreamErrorKind::SeqRegression
        );
        let mut three = append("x");
        three.stream_seq = Some("3".into());
        assert!(plan_append(&text(), Offset::ZERO, &writer, three).is_ok());
    }

    #[test]
    fn producer_duplicate_wins_over_stream_seq() {
        let mut writer = WriterState::default();
        let mut a = with_producer(append("a"), 0, 0);
        a.stream_seq = Some("1".into());
        let plan = plan_append(&text(), Offset::ZERO, &writer, a.clone()).unwrap();
        writer.apply(&plan);
        assert!(matches!(
            plan_append(&text(), Offset::ZERO, &writer, a).unwrap(),
            AppendPlan::Duplicate(_)
        ));
    }
}
