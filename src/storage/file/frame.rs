//! The log's frame format.
//!
//! Every operation that changes a stream is one frame:
//!
//! ```text
//! frame  := len:u32 crc:u32 body[len]          crc is CRC-32C of body
//! body   := 1 create | 2 append | 3 delete | 4 meta   (integers little-endian)
//! create := id:u64 path:str content_type:str expiry closed:u8 fork base:offset records
//! append := id:u64 producer seq closed:u8 records
//! delete := id:u64
//! meta   := key:str (0 | 1 len:u32 value[len])
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

use super::codec::{
    put_expiry, put_fork, put_offset, put_opt_str, put_str, put_u32, put_u64, Corrupt, Reader,
};
use crate::producer::ProducerState;
use crate::storage::index::{NewStream, Op};
use crate::stream::ContentType;
use std::ops::Range;

/// Bytes before a frame's body: its length and checksum.
pub(crate) const HEADER_LEN: usize = 8;

/// The largest body accepted when reading; anything larger is corruption.
pub(crate) const MAX_BODY_LEN: usize = 1 << 30;

const CREATE: u8 = 1;
const APPEND: u8 = 2;
const DELETE: u8 = 3;
const META: u8 = 4;

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
            put_fork(out, new.fork.as_ref());
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
            put_opt_str(out, stream_seq.as_deref());
            out.push(u8::from(*close));
        }
        Op::Delete { id } => {
            out.push(DELETE);
            put_u64(out, *id);
        }
        Op::Meta { key, value } => {
            out.push(META);
            put_str(out, key);
            match value {
                None => out.push(0),
                Some(value) => {
                    out.push(1);
                    put_u32(out, value.len() as u32);
                    out.extend_from_slice(value);
                }
            }
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
            let fork = r.fork()?;
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
            let stream_seq = r.opt_string()?;
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
        META => {
            let key = r.string()?;
            let value = match r.u8()? {
                0 => None,
                1 => {
                    let len = r.u32()? as usize;
                    Some(bytes::Bytes::copy_from_slice(r.take(len)?))
                }
                _ => return Err(Corrupt::Malformed),
            };
            Op::Meta { key, value }
        }
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;

    use super::*;
    use crate::offset::Offset;
    use crate::stream::{Expiry, ForkPoint};

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
    fn meta_round_trips() {
        for value in [None, Some(Bytes::from_static(b"{\"a\":1}"))] {
            let op = Op::Meta {
                key: "subscriptions/s1".into(),
                value: value.clone(),
            };
            let (decoded, _, ranges) = round_trip(&op);
            assert!(ranges.is_empty());
            let Op::Meta { key, value: got } = decoded else {
                panic!("decoded {decoded:?}")
            };
            assert_eq!(key, "subscriptions/s1");
            assert_eq!(got, value);
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
