//! Stream offsets: opaque, lexicographically ordered positions in a stream.
//!
//! An [`Offset`] names the boundary between two records of a stream. Its text
//! form is two fixed-width decimal numbers, `0000000000000003_0000000000000042`:
//! the number of records before the boundary and the number of bytes before it.
//! Both only grow, so the text forms of a stream's offsets sort in stream order.
//! Clients treat the text as opaque; the structure is ours.
//!
//! The sentinels `-1` (the start of the stream) and `now` (the tail at the time
//! of the request) are accepted in requests as [`ReadFrom`] and never emitted.

use std::fmt;
use std::str::FromStr;

/// The largest value either part of an offset may hold: sixteen decimal digits.
const PART_MAX: u64 = 9_999_999_999_999_999;
const PART_WIDTH: usize = 16;
const TEXT_LEN: usize = PART_WIDTH * 2 + 1;

/// A position between records of a stream.
///
/// Offsets order first by record index, then by byte position; for offsets of
/// one stream both orders agree, and so does the order of their text forms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    index: u64,
    position: u64,
}

impl Offset {
    /// The start of every stream.
    pub const ZERO: Offset = Offset {
        index: 0,
        position: 0,
    };

    /// An offset `index` records and `position` bytes into a stream.
    ///
    /// Returns `None` when either part has more than sixteen digits.
    pub fn new(index: u64, position: u64) -> Option<Self> {
        (index <= PART_MAX && position <= PART_MAX).then_some(Self { index, position })
    }

    /// How many records lie before this offset.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// How many bytes of stored data lie before this offset.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The offset after one more record of `len` bytes, or `None` when the
    /// stream would outgrow what an offset can name.
    pub fn after_record(self, len: usize) -> Option<Self> {
        let position = self.position.checked_add(u64::try_from(len).ok()?)?;
        Self::new(self.index + 1, position)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Offsets are formatted for every response and SSE event; filling a
        // fixed buffer is several times faster than `write!` with padding.
        let mut text = [b'0'; TEXT_LEN];
        text[PART_WIDTH] = b'_';
        for (part, mut value) in [(0, self.index), (PART_WIDTH + 1, self.position)] {
            for digit in text[part..part + PART_WIDTH].iter_mut().rev() {
                *digit = b'0' + (value % 10) as u8;
                value /= 10;
            }
        }
        f.write_str(std::str::from_utf8(&text).expect("digits and an underscore are ASCII"))
    }
}

/// The error returned when a string is not an offset this crate minted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseOffsetError(());

impl fmt::Display for ParseOffsetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed offset")
    }
}

impl std::error::Error for ParseOffsetError {}

impl FromStr for Offset {
    type Err = ParseOffsetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != TEXT_LEN || bytes[PART_WIDTH] != b'_' {
            return Err(ParseOffsetError(()));
        }
        let part = |digits: &[u8]| -> Result<u64, ParseOffsetError> {
            digits.iter().try_fold(0u64, |acc, b| match b {
                b'0'..=b'9' => Ok(acc * 10 + u64::from(b - b'0')),
                _ => Err(ParseOffsetError(())),
            })
        };
        Ok(Self {
            index: part(&bytes[..PART_WIDTH])?,
            position: part(&bytes[PART_WIDTH + 1..])?,
        })
    }
}

/// Where a read starts, as a client may ask for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    /// The beginning of the stream: `offset=-1`, or no offset at all.
    Start,
    /// The tail at the time the request is handled: `offset=now`.
    Now,
    /// An offset the server returned earlier.
    At(Offset),
}

impl FromStr for ReadFrom {
    type Err = ParseOffsetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "-1" => Ok(Self::Start),
            "now" => Ok(Self::Now),
            other => other.parse().map(Self::At),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_sorts() {
        let a = Offset::new(3, 42).unwrap();
        let b = Offset::new(10, 7).unwrap();
        assert_eq!(a.to_string(), "0000000000000003_0000000000000042");
        assert_eq!(a.to_string().parse::<Offset>().unwrap(), a);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn formats_every_digit_position() {
        for (index, position) in [
            (0, 0),
            (1, 9),
            (10, 99),
            (1_234_567_890_123_456, 42),
            (PART_MAX, PART_MAX),
        ] {
            let offset = Offset::new(index, position).unwrap();
            assert_eq!(offset.to_string(), format!("{index:016}_{position:016}"));
        }
    }

    #[test]
    fn after_record_advances_both_parts() {
        let next = Offset::ZERO.after_record(5).unwrap();
        assert_eq!((next.index(), next.position()), (1, 5));
        assert!(next > Offset::ZERO);
    }

    #[test]
    fn rejects_anything_not_minted_here() {
        for bad in [
            "",
            "0",
            "0000000000000000-0000000000000000",
            "000000000000000_00000000000000000",
            "0000000000000000_000000000000000a",
            "+000000000000000_0000000000000000",
            "0000000000000000_0000000000000000 ",
            "0000000000000000,0000000000000000",
            "-2",
            "NOW",
        ] {
            assert!(bad.parse::<ReadFrom>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn sentinels_parse_but_are_not_offsets() {
        assert_eq!("-1".parse::<ReadFrom>().unwrap(), ReadFrom::Start);
        assert_eq!("now".parse::<ReadFrom>().unwrap(), ReadFrom::Now);
        assert!("-1".parse::<Offset>().is_err());
        assert!("now".parse::<Offset>().is_err());
    }

    #[test]
    fn offsets_near_the_limit_refuse_to_overflow() {
        let last = Offset::new(PART_MAX, PART_MAX).unwrap();
        assert!(last.after_record(1).is_none());
        assert!(Offset::new(PART_MAX + 1, 0).is_none());
    }
}
