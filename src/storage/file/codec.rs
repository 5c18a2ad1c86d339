//! Little-endian encoding helpers shared by log frames and snapshots.

use std::time::{Duration, UNIX_EPOCH};

use crate::offset::Offset;
use crate::stream::{Expiry, ForkPoint};

/// Why a frame could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Corrupt {
    /// The checksum does not match.
    Checksum,
    /// The body does not parse.
    Malformed,
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// `0`, or `1` and the string.
pub(crate) fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

/// `0`, or `1` and the fork point with its source's id.
pub(crate) fn put_fork(out: &mut Vec<u8>, fork: Option<&(ForkPoint, u64)>) {
    match fork {
        None => out.push(0),
        Some((point, source_id)) => {
            out.push(1);
            put_u64(out, *source_id);
            put_str(out, &point.source);
            put_offset(out, point.anchor);
            put_u64(out, point.sub_offset);
        }
    }
}

pub(crate) fn put_offset(out: &mut Vec<u8>, offset: Offset) {
    put_u64(out, offset.index());
    put_u64(out, offset.position());
}

pub(crate) fn put_expiry(out: &mut Vec<u8>, expiry: Expiry) {
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

pub(crate) struct Reader<'a> {
    pub(crate) body: &'a [u8],
    pub(crate) at: usize,
}

impl Reader<'_> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&[u8], Corrupt> {
        let end = self.at.checked_add(n).ok_or(Corrupt::Malformed)?;
        let bytes = self.body.get(self.at..end).ok_or(Corrupt::Malformed)?;
        self.at = end;
        Ok(bytes)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn flag(&mut self) -> Result<bool, Corrupt> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Corrupt::Malformed),
        }
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("four bytes"),
        ))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("eight bytes"),
        ))
    }

    pub(crate) fn string(&mut self) -> Result<String, Corrupt> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| Corrupt::Malformed)
    }

    pub(crate) fn offset(&mut self) -> Result<Offset, Corrupt> {
        let index = self.u64()?;
        let position = self.u64()?;
        Offset::new(index, position).ok_or(Corrupt::Malformed)
    }

    pub(crate) fn expiry(&mut self) -> Result<Expiry, Corrupt> {
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

    pub(crate) fn opt_string(&mut self) -> Result<Option<String>, Corrupt> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            _ => Err(Corrupt::Malformed),
        }
    }

    pub(crate) fn fork(&mut self) -> Result<Option<(ForkPoint, u64)>, Corrupt> {
        match self.u8()? {
            0 => Ok(None),
            1 => {
                let source_id = self.u64()?;
                let point = ForkPoint {
                    source: self.string()?,
                    anchor: self.offset()?,
                    sub_offset: self.u64()?,
                };
                Ok(Some((point, source_id)))
            }
            _ => Err(Corrupt::Malformed),
        }
    }
}
