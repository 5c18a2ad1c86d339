//! The log's frame format.
//!
//! Every operation that changes a stream is one frame:
//!
//! ```text
//! frame  := len:u32 crc:u32 body[len]          crc is CRC-32C of body
//! body   := 1 create | 2 append | 3 delete      (all integers little-endian)
//! create := id:u64 path:str content_type:str expiry closed:u8 fork base:offset records
//! append := id:u64 producer seq closed:u8 records
//! delete := id:u64
//! expiry := 0 | 1 secs:u64 | 2 unix_secs:i64 nanos:u32
//! fork   := 0 | 1 source_id:u64 source:str anchor:offset sub_offset:u64
//! producer := 0 | 1 id:str epoch:u64 last_seq:u64
//! seq    := 0 | 1 str
//! offset := index:u64 position:u64
//! records := count:u32 (len:u32 bytes[len])*
//! str    := len:u32 utf8[len]
//! ```
//!
//! Records come last, so their bytes can be read in place later. A frame
//! holds a decision (what an append did once the rules ran), so replaying it
//! runs no rules. A frame that is cut short or fails its checksum ends the
//! log.

use std::ops::Range;
use std::time::{Duration, UNIX_EPOCH};

use crate::offset::Offset;
use crate::producer::ProducerState;
use crate::storage::index::{NewStream, Op};
use crate::stream::{ContentType, Expiry, ForkPoint};

/// Bytes before a frame's body: its length and checksum.
pub(crate) const HEADER_LEN: usize = 8;

/// The largest body accepted when reading; anything larger is corruption.
pub(crate) const MAX_BODY_LEN: usize = 1 << 30;

const CREATE: u8 = 1;
const APPEND: u8 = 2;
const DELETE: u8 = 3;

/// Appends the frame for `op` to `out`, returning the range of each record's
/// bytes relative to the frame's start.
pub(crate) fn encode(op: &Op, out: &mut Vec<u8>) -> Vec<Range<usize>> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    match op {
        Op::Create(new) => {
            out.push(CREATE);
            put_u64(out, new.id);
            put_str(out, &new.path);
            put_str(out, new.content_type.as_str());
            put_expiry(out, new.expiry);
            out.push(u8::from(new.closed));
            match &new.fork {
                None => out.push(0),
                Some((point, source_id)) => {
                    out.push(1);
                    put_u64(out, *source_id);
                    put_str(out, &point.source);
                    put_offset(out, point.anchor);
                    put_u64(out, point.sub_offset);
                }
            }
            put_offset(out, new.base);
        }
        Op::Append {
            id,
            producer,
            stream_seq,
            close,
            ..
        } => {
            out.push(APPEND);
            put_u64(out, *id);
            match producer {
                None => out.push(0),
                Some((producer, state)) => {
                    out.push(1);
                    put_str(out, producer);
                    put_u64(out, state.epoch);
                    put_u64(out, state.last_seq);
                }
            }
            match stream_seq {
                None => out.push(0),
                Some(seq) => {
                    out.push(1);
                    put_str(out, seq);
                }
            }
            out.push(u8::from(*close));
        }
        Op::Delete { id } => {
            out.push(DELETE);
            put_u64(out, *id);
        }
    }
    let records = op.records();
    put_u32(out, records.len() as u32);
    let mut ranges = Vec::with_capacity(records.len());
    for record in records {
        put_u32(out, record.len() as u32);
        let at = out.len() - start;
        out.extend_from_slice(record);
        ranges.push(at..at + record.len());
    }
    let body = &out[start + HEADER_LEN..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    ranges
}

/// Why a frame could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Corrupt {
    /// The checksum does not match.
    Checksum,
    /// The body does not parse.
    Malformed,
}

/// Checks a header: the body length it declares, if plausible.
pub(crate) fn body_len(header: [u8; HEADER_LEN]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("four bytes"));
    (len > 0 && len <= MAX_BODY_LEN).then_some((len, crc))
}

/// Decodes a frame body whose checksum is `crc`. The returned operation
/// carries no record bytes; the ranges say where they are, relative to the
/// frame's start.
pub(crate) fn decode(body: &[u8], crc: u32) -> Result<(Op, Vec<Range<usize>>), Corrupt> {
    if crc32c::crc32c(body) != crc {
        return Err(Corrupt::Checksum);
    }
    let mut r = Reader { body, at: 0 };
    let op = match r.u8()? {
        CREATE => {
            let id = r.u64()?;
            let path = r.string()?;
            let content_type = ContentType::parse(&r.string()?).ok_or(Corrupt::Malformed)?;
            let expiry = r.expiry()?;
            let closed = r.flag()?;
            let fork = match r.u8()? {
                0 => None,
                1 => {
                    let source_id = r.u64()?;
                    let source = r.string()?;
                    let anchor = r.offset()?;
                    let sub_offset = r.u64()?;
                    Some((
                        ForkPoint {
                            source,
                            anchor,
                            sub_offset,
                        },
                        source_id,
                    ))
                }
                _ => return Err(Corrupt::Malformed),
            };
            let base = r.offset()?;
            Op::Create(NewStream {
                id,
                path,
                content_type,
                expiry,
                closed,
                fork,
                base,
                records: Vec::new(),
            })
        }
        APPEND => {
            let id = r.u64()?;
            let producer = match r.u8()? {
                0 => None,
                1 => {
                    let name = r.string()?;
                    let epoch = r.u64()?;
                    let last_seq = r.u64()?;
                    Some((name, ProducerState { epoch, last_seq }))
                }
                _ => return Err(Corrupt::Malformed),
            };
            let stream_seq = match r.u8()? {
                0 => None,
                1 => Some(r.string()?),
                _ => return Err(Corrupt::Malformed),
            };
            let close = r.flag()?;
            Op::Append {
                id,
                records: Vec::new(),
                producer,
                stream_seq,
                close,
            }
        }
        DELETE => Op::Delete { id: r.u64()? },
        _ => return Err(Corrupt::Malformed),
    };
    let count = r.u32()? as usize;
    let mut ranges = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let len = r.u32()? as usize;
        let start = r.at;
        r.take(len)?;
        ranges.push(HEADER_LEN + start..HEADER_LEN + start + len);
    }
    if r.at != body.len() {
        return Err(Corrupt::Malformed);
    }
    Ok((op, ranges))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

fn put_offset(out: &mut Vec<u8>, offset: Offset) {
    put_u64(out, offset.index());
    put_u64(out, offset.position());
}

fn put_expiry(out: &mut Vec<u8>, expiry: Expiry) {
    match expiry {
        Expiry::Never => out.push(0),
        Expiry::Ttl(secs) => {
            out.push(1);
            put_u64(out, secs);
        }
        Expiry::At(at) => {
            out.push(2);
            let (secs, nanos) = match at.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                Err(e) => {
                    let d = e.duration();
                    // Before the epoch: whole seconds down, nanoseconds up.
                    let secs = -(d.as_secs() as i64) - i64::from(d.subsec_nanos() > 0);
                    let nanos = (1_000_000_000 - d.subsec_nanos()) % 1_000_000_000;
                    (secs, nanos)
                }
            };
            out.extend_from_slice(&secs.to_le_bytes());
            put_u32(out, nanos);
        }
    }
}

struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Corrupt> {
        let end = self.at.checked_add(n).ok_or(Corrupt::Malformed)?;
        let bytes = self.body.get(self.at..end).ok_or(Corrupt::Malformed)?;
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, Corrupt> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Corrupt::Malformed),
        }
    }

    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("four bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("eight bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, Corrupt> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| Corrupt::Malformed)
    }

    fn offset(&mut self) -> Result<Offset, Corrupt> {
        let index = self.u64()?;
        let position = self.u64()?;
        Offset::new(index, position).ok_or(Corrupt::Malformed)
    }

    fn expiry(&mut self) -> Result<Expiry, Corrupt> {
        Ok(match self.u8()? {
            0 => Expiry::Never,
            1 => Expiry::Ttl(self.u64()?),
            2 => {
                let secs = i64::from_le_bytes(self.take(8)?.try_into().expect("eight bytes"));
                let nanos = self.u32()?;
                if nanos >= 1_000_000_000 {
                    return Err(Corrupt::Malformed);
                }
                let at = if secs >= 0 {
                    UNIX_EPOCH.checked_add(Duration::new(secs as u64, nanos))
                } else {
                    UNIX_EPOCH
                        .checked_sub(Duration::from_secs(secs.unsigned_abs()))
                        .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos))))
                };
                Expiry::At(at.ok_or(Corrupt::Malformed)?)
            }
            _ => return Err(Corrupt::Malformed),
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn round_trip(op: &Op) -> (Op, Vec<u8>, Vec<Range<usize>>) {
        let mut out = Vec::new();
        let ranges = encode(op, &mut out);
        let (len, crc) = body_len(out[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, out.len() - HEADER_LEN);
        let (decoded, decoded_ranges) = decode(&out[HEADER_LEN..], crc).unwrap();
        assert_eq!(ranges, decoded_ranges);
        (decoded, out, ranges)
    }

    #[test]
    fn append_round_trips_with_record_ranges() {
        let op = Op::Append {
            id: 7,
            records: vec![Bytes::from_static(b"hello"), Bytes::from_static(b"")],
            producer: Some((
                "p".into(),
                ProducerState {
                    epoch: 2,
                    last_seq: 9,
                },
            )),
            stream_seq: Some("0009".into()),
            close: true,
        };
        let (decoded, frame, ranges) = round_trip(&op);
        assert_eq!(&frame[ranges[0].clone()], b"hello");
        match decoded {
            Op::Append {
                id,
                producer,
                stream_seq,
                close,
                ..
            } => {
                assert_eq!(id, 7);
                assert_eq!(
                    producer,
                    Some((
                        "p".into(),
                        ProducerState {
                            epoch: 2,
                            last_seq: 9
                        }
                    ))
                );
                assert_eq!(stream_seq.as_deref(), Some("0009"));
                assert!(close);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_round_trips_expiry_and_fork() {
        for expiry in [
            Expiry::Never,
            Expiry::Ttl(u64::MAX),
            Expiry::At(UNIX_EPOCH + Duration::new(4_000_000_000, 123)),
            Expiry::At(UNIX_EPOCH - Duration::new(5, 1)),
        ] {
            let op = Op::Create(NewStream {
                id: 1,
                path: "a/b".into(),
                content_type: ContentType::parse("application/json").unwrap(),
                expiry,
                closed: false,
                fork: Some((
                    ForkPoint {
                        source: "src".into(),
                        anchor: Offset::new(1, 5).unwrap(),
                        sub_offset: 3,
                    },
                    4,
                )),
                base: Offset::new(1, 5).unwrap(),
                records: vec![Bytes::from_static(b"[1]")],
            });
            let (decoded, _, _) = round_trip(&op);
            let Op::Create(new) = decoded else { panic!() };
            assert_eq!(new.expiry, expiry);
            assert_eq!(new.fork.unwrap().0.sub_offset, 3);
            assert_eq!(new.path, "a/b");
        }
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let mut out = Vec::new();
        encode(&Op::Delete { id: 3 }, &mut out);
        let crc = u32::from_le_bytes(out[4..8].try_into().unwrap());
        for i in HEADER_LEN..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert_eq!(
                decode(&bad[HEADER_LEN..], crc).unwrap_err(),
                Corrupt::Checksum
            );
        }
        assert!(body_len([0; HEADER_LEN]).is_none());
    }
}
