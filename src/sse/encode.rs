//! The text of SSE events.

use base64::Engine;
use bytes::{BufMut, BytesMut};

/// Appends an `event: data` carrying `payload`.
///
/// As text, each CR, LF or CRLF in the payload ends a `data:` line, so the
/// payload can neither end the event nor start another; a reader rejoins
/// the lines with LF. As base64, the payload is one line.
pub(crate) fn data_event(out: &mut BytesMut, payload: &[u8], base64: bool) {
    out.put_slice(b"event: data\n");
    if base64 {
        out.put_slice(b"data:");
        let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
        out.put_slice(encoded.as_bytes());
        out.put_u8(b'\n');
    } else {
        for line in lines(payload) {
            // A reader drops one space after the colon; keep a leading one.
            let prefix: &[u8] = if line.first() == Some(&b' ') {
                b"data: "
            } else {
                b"data:"
            };
            out.put_slice(prefix);
            out.put_slice(line);
            out.put_u8(b'\n');
        }
    }
    out.put_u8(b'\n');
}

/// What a control event reports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Control<'a> {
    pub(crate) next_offset: &'a str,
    pub(crate) cursor: Option<u64>,
    pub(crate) up_to_date: bool,
    pub(crate) closed: bool,
}

/// Appends an `event: control`: one line of JSON with camelCase keys.
pub(crate) fn control_event(out: &mut BytesMut, control: &Control<'_>) {
    let offset = serde_json::Value::from(control.next_offset);
    out.put_slice(b"event: control\ndata:{\"streamNextOffset\":");
    out.put_slice(offset.to_string().as_bytes());
    if let Some(cursor) = control.cursor {
        out.put_slice(format!(",\"streamCursor\":\"{cursor}\"").as_bytes());
    }
    if control.up_to_date || control.closed {
        out.put_slice(b",\"upToDate\":true");
    }
    if control.closed {
        out.put_slice(b",\"streamClosed\":true");
    }
    out.put_slice(b"}\n\n");
}

/// Splits on CRLF, lone CR and lone LF, the line ends of the SSE grammar.
fn lines(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(payload);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.iter().position(|b| *b == b'\r' || *b == b'\n') {
            None => {
                rest = None;
                Some(text)
            }
            Some(i) => {
                let skip = if text[i] == b'\r' && text.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&text[i + skip..]);
                Some(&text[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(payload: &[u8]) -> String {
        let mut out = BytesMut::new();
        data_event(&mut out, payload, false);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn every_line_end_starts_a_data_line() {
        assert_eq!(
            data(b"a\r\nb\nc\rd"),
            "event: data\ndata:a\ndata:b\ndata:c\ndata:d\n\n"
        );
        assert_eq!(
            data(b"x\r\n\r\nevent: control"),
            "event: data\ndata:x\ndata:\ndata:event: control\n\n"
        );
        assert_eq!(data(b"\r\r"), "event: data\ndata:\ndata:\ndata:\n\n");
        assert_eq!(data(b""), "event: data\ndata:\n\n");
    }

    #[test]
    fn unicode_separators_are_not_line_ends() {
        let payload = "a\u{85}b\u{2028}c\u{2029}d";
        assert_eq!(
            data(payload.as_bytes()),
            format!("event: data\ndata:{payload}\n\n")
        );
    }

    #[test]
    fn leading_space_survives_the_parser() {
        // A reader strips exactly one space after "data:".
        assert_eq!(data(b" two"), "event: data\ndata:  two\n\n");
    }

    #[test]
    fn base64_is_one_line() {
        let mut out = BytesMut::new();
        data_event(&mut out, &[0, 1, 2, 0xff, b'\n'], true);
        assert_eq!(&out[..], b"event: data\ndata:AAEC/wo=\n\n");
    }

    #[test]
    fn control_is_one_json_line() {
        let mut out = BytesMut::new();
        control_event(
            &mut out,
            &Control {
                next_offset: "o",
                cursor: Some(7),
                up_to_date: true,
                closed: false,
            },
        );
        assert_eq!(
            &out[..],
            br#"event: control
data:{"streamNextOffset":"o","streamCursor":"7","upToDate":true}

"#
        );
    }
}
