//! Snapshots of the index, so that recovery need not replay the whole log
//! and old segments can be deleted.
//!
//! ```text
//! file    := "DSSNAP03" body crc:u32        crc is CRC-32C of body
//! body    := segment:u64 pos:u64 next_id:u64 count:u32 stream* metas
//! stream  := id:u64 path:str content_type:str expiry writer fork base:offset
//!            deleted:u8 chunks
//! writer  := closed:u8 seq producers
//! producers := count:u32 (id:str epoch:u64 last_seq:u64)*
//! chunks  := count:u64 (segment:u64 pos:u64 len:u32 crc:u32)*
//! metas   := count:u32 (key:str len:u32 value[len])*
//! ```
//!
//! A `DSSNAP02` file, from before metadata was kept, is the same without
//! `metas`.
//!
//! `segment` and `pos` say where replay continues: every frame before that
//! point is reflected in the snapshot. A snapshot is written to a temporary
//! file, synced, and renamed into place, so a crash leaves either the old
//! snapshot or the new one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use bytes::Bytes;

use super::codec::{
    put_expiry, put_fork, put_offset, put_opt_str, put_str, put_u32, put_u64, Corrupt, Reader,
};
use super::log::sync_dir;
use crate::producer::ProducerState;
use crate::storage::index::{Location, Saved};
use crate::storage::rules::WriterState;
use crate::stream::ContentType;

const MAGIC: &[u8; 8] = b"DSSNAP03";
/// The format before metadata entries.
const MAGIC_02: &[u8; 8] = b"DSSNAP02";
const FILE: &str = "snapshot.bin";
const TEMP: &str = "snapshot.tmp";

/// The index at a point in the log.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// Replay continues in this segment, at this position.
    pub(crate) segment: u64,
    pub(crate) pos: u64,
    pub(crate) next_id: u64,
    pub(crate) streams: Vec<Saved>,
    /// Metadata entries, `(key, value)`.
    pub(crate) meta: Vec<(String, Bytes)>,
}

pub(crate) fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(MAGIC);
    put_u64(&mut out, snapshot.segment);
    put_u64(&mut out, snapshot.pos);
    put_u64(&mut out, snapshot.next_id);
    put_u32(&mut out, snapshot.streams.len() as u32);
    for stream in &snapshot.streams {
        put_u64(&mut out, stream.id);
        put_str(&mut out, &stream.path);
        put_str(&mut out, stream.content_type.as_str());
        put_expiry(&mut out, stream.expiry);
        out.push(u8::from(stream.writer.closed));
        put_opt_str(&mut out, stream.writer.stream_seq.as_deref());
        put_u32(&mut out, stream.writer.producers.len() as u32);
        for (id, state) in &stream.writer.producers {
            put_str(&mut out, id);
            put_u64(&mut out, state.epoch);
            put_u64(&mut out, state.last_seq);
        }
        put_fork(&mut out, stream.fork.as_ref());
        put_offset(&mut out, stream.base);
        out.push(u8::from(stream.deleted));
        put_u64(&mut out, stream.chunks.len() as u64);
        for chunk in &stream.chunks {
            put_u64(&mut out, chunk.segment);
            put_u64(&mut out, chunk.pos);
            put_u32(&mut out, chunk.len);
            put_u32(&mut out, chunk.crc);
        }
    }
    put_u32(&mut out, snapshot.meta.len() as u32);
    for (key, value) in &snapshot.meta {
        put_str(&mut out, key);
        put_u32(&mut out, value.len() as u32);
        out.extend_from_slice(value);
    }
    let crc = crc32c::crc32c(&out[MAGIC.len()..]);
    put_u32(&mut out, crc);
    out
}

pub(crate) fn decode(data: &[u8]) -> Result<Snapshot, Corrupt> {
    let (has_meta, rest) = match data.strip_prefix(MAGIC.as_slice()) {
        Some(rest) => (true, Some(rest)),
        None => (false, data.strip_prefix(MAGIC_02.as_slice())),
    };
    let body = rest
        .and_then(|rest| rest.len().checked_sub(4).map(|n| rest.split_at(n)))
        .ok_or(Corrupt::Malformed)?;
    let (body, crc) = body;
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("four bytes")) {
        return Err(Corrupt::Checksum);
    }
    let mut r = Reader { body, at: 0 };
    let segment = r.u64()?;
    let pos = r.u64()?;
    let next_id = r.u64()?;
    let count = r.u32()?;
    let mut streams = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let id = r.u64()?;
        let path = r.string()?;
        let content_type = ContentType::parse(&r.string()?).ok_or(Corrupt::Malformed)?;
        let expiry = r.expiry()?;
        let mut writer = WriterState {
            closed: r.flag()?,
            ..WriterState::default()
        };
        writer.stream_seq = r.opt_string()?;
        for _ in 0..r.u32()? {
            let producer = r.string()?;
            let epoch = r.u64()?;
            let last_seq = r.u64()?;
            writer
                .producers
                .insert(producer, ProducerState { epoch, last_seq });
        }
        let fork = r.fork()?;
        let base = r.offset()?;
        let deleted = r.flag()?;
        let chunk_count = r.u64()?;
        let mut chunks = Vec::with_capacity(chunk_count.min(1 << 16) as usize);
        for _ in 0..chunk_count {
            chunks.push(Location {
                segment: r.u64()?,
                pos: r.u64()?,
                len: r.u32()?,
                crc: r.u32()?,
            });
        }
        streams.push(Saved {
            id,
            path,
            content_type,
            expiry,
            writer,
            fork,
            base,
            chunks,
            deleted,
        });
    }
    let mut meta = Vec::new();
    if has_meta {
        for _ in 0..r.u32()? {
            let key = r.string()?;
            let len = r.u32()? as usize;
            meta.push((key, Bytes::copy_from_slice(r.take(len)?)));
        }
    }
    if r.at != body.len() {
        return Err(Corrupt::Malformed);
    }
    Ok(Snapshot {
        segment,
        pos,
        next_id,
        streams,
        meta,
    })
}

/// Writes `bytes` as the directory's snapshot, atomically.
pub(crate) fn write(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = dir.join(TEMP);
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, dir.join(FILE))?;
    sync_dir(dir)
}

/// Reads the directory's snapshot, if it has one.
///
/// # Errors
///
/// When it cannot be read, or is corrupt: segments it made unnecessary may
/// be gone, so the log alone cannot stand in for it.
pub(crate) fn read(dir: &Path) -> io::Result<Option<Snapshot>> {
    let bytes = match fs::read(dir.join(FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    decode(&bytes).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{FILE} is corrupt ({e:?}); restore it from a backup"),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::offset::Offset;
    use crate::stream::{Expiry, ForkPoint};

    #[test]
    fn round_trips_and_detects_damage() {
        let snapshot = Snapshot {
            segment: 3,
            pos: 99,
            next_id: 12,
            streams: vec![Saved {
                id: 12,
                path: "a/b".into(),
                content_type: ContentType::parse("text/plain").unwrap(),
                expiry: Expiry::Ttl(60),
                writer: WriterState {
                    closed: true,
                    stream_seq: Some("7".into()),
                    producers: HashMap::from([(
                        "p".into(),
                        ProducerState {
                            epoch: 1,
                            last_seq: 4,
                        },
                    )]),
                },
                fork: Some((
                    ForkPoint {
                        source: "src".into(),
                        anchor: Offset::new(1, 2).unwrap(),
                        sub_offset: 1,
                    },
                    2,
                )),
                base: Offset::new(1, 2).unwrap(),
                chunks: vec![Location {
                    segment: 1,
                    pos: 40,
                    len: 5,
                    crc: 7,
                }],
                deleted: false,
            }],
            meta: vec![("subscriptions/s".into(), Bytes::from_static(b"{}"))],
        };
        let bytes = encode(&snapshot);
        let back = decode(&bytes).unwrap();
        assert_eq!((back.segment, back.pos, back.next_id), (3, 99, 12));
        assert_eq!(back.meta, snapshot.meta);
        let stream = &back.streams[0];
        assert_eq!(stream.writer, snapshot.streams[0].writer);
        assert_eq!(stream.chunks, snapshot.streams[0].chunks);
        assert_eq!(stream.expiry, Expiry::Ttl(60));
        for i in MAGIC.len()..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err());
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
