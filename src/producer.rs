//! Idempotent producers (PROTOCOL.md section 5.2.1): who may append, and
//! whether an append is new, a duplicate, or refused.

/// The producer headers of one append: `Producer-Id`, `Producer-Epoch` and
/// `Producer-Seq`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProducerClaim {
    /// The producer's stable identity.
    pub id: String,
    /// The producer's epoch, bumped at each restart.
    pub epoch: u64,
    /// The batch sequence within the epoch.
    pub seq: u64,
}

/// What the server remembers of one producer on one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProducerState {
    /// The producer's current epoch.
    pub epoch: u64,
    /// The highest sequence accepted in that epoch.
    pub last_seq: u64,
}

/// The verdict on a claim against the producer's current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProducerCheck {
    /// New data: append it, then store this state.
    Accept(ProducerState),
    /// Already appended; answer with success and change nothing.
    Duplicate(ProducerState),
    /// The epoch is older than the current one (zombie fencing).
    StaleEpoch {
        /// The epoch the server holds.
        current: u64,
    },
    /// A new epoch must start at sequence 0.
    EpochNotAtZero,
    /// A sequence was skipped.
    Gap {
        /// The sequence the server expected.
        expected: u64,
        /// The sequence it received.
        received: u64,
    },
}

impl ProducerClaim {
    /// Checks this claim against `state`, the producer's state on the stream
    /// (`None` for a producer the stream has not seen).
    pub fn check(&self, state: Option<ProducerState>) -> ProducerCheck {
        let accept = ProducerCheck::Accept(ProducerState {
            epoch: self.epoch,
            last_seq: self.seq,
        });
        let Some(state) = state else {
            return match self.seq {
                0 => accept,
                received => ProducerCheck::Gap {
                    expected: 0,
                    received,
                },
            };
        };
        if self.epoch < state.epoch {
            return ProducerCheck::StaleEpoch {
                current: state.epoch,
            };
        }
        if self.epoch > state.epoch {
            return if self.seq == 0 {
                accept
            } else {
                ProducerCheck::EpochNotAtZero
            };
        }
        match self.seq {
            seq if seq <= state.last_seq => ProducerCheck::Duplicate(state),
            seq if seq == state.last_seq + 1 => accept,
            received => ProducerCheck::Gap {
                expected: state.last_seq + 1,
                received,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(epoch: u64, seq: u64) -> ProducerClaim {
        ProducerClaim {
            id: "p".into(),
            epoch,
            seq,
        }
    }

    fn state(epoch: u64, last_seq: u64) -> Option<ProducerState> {
        Some(ProducerState { epoch, last_seq })
    }

    #[test]
    fn first_claim_must_start_at_zero() {
        assert_eq!(
            claim(3, 0).check(None),
            ProducerCheck::Accept(state(3, 0).unwrap())
        );
        assert_eq!(
            claim(0, 2).check(None),
            ProducerCheck::Gap {
                expected: 0,
                received: 2
            }
        );
    }

    #[test]
    fn same_epoch_sequences() {
        let s = state(1, 4);
        assert_eq!(claim(1, 4).check(s), ProducerCheck::Duplicate(s.unwrap()));
        assert_eq!(claim(1, 0).check(s), ProducerCheck::Duplicate(s.unwrap()));
        assert_eq!(
            claim(1, 5).check(s),
            ProducerCheck::Accept(state(1, 5).unwrap())
        );
        assert_eq!(
            claim(1, 7).check(s),
            ProducerCheck::Gap {
                expected: 5,
                received: 7
            }
        );
    }

    #[test]
    fn epochs_fence_and_restart() {
        let s = state(2, 9);
        assert_eq!(
            claim(1, 10).check(s),
            ProducerCheck::StaleEpoch { current: 2 }
        );
        assert_eq!(claim(3, 1).check(s), ProducerCheck::EpochNotAtZero);
        assert_eq!(
            claim(3, 0).check(s),
            ProducerCheck::Accept(state(3, 0).unwrap())
        );
    }
}
