//! An incremental Server-Sent Events parser, per the WHATWG rules: lines end
//! with CRLF, LF or CR; `field: value` loses exactly one space after the
//! colon; `data` lines of one event join with LF; an empty line dispatches.
//! Only line endings break lines: U+2028 and other separators are data.

use bytes::{Buf, BytesMut};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// The event type; `message` when none was named.
    pub(crate) event: String,
    pub(crate) data: String,
}

/// Feed bytes in with [`push`](Parser::push), take events out with
/// [`next`](Parser::next).
#[derive(Debug, Default)]
pub(crate) struct Parser {
    buffer: BytesMut,
    /// A CR ended the last line; a LF right after it belongs to it.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
}

impl Parser {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event, if the bytes so far hold one. Bytes that are
    /// not UTF-8 are replaced, as the spec's decoder does.
    pub(crate) fn next(&mut self) -> Option<Event> {
        while let Some(line) = self.line() {
            if let Some(event) = self.field(&line) {
                return Some(event);
            }
        }
        None
    }

    /// Takes one whole line off the buffer, without its ending.
    fn line(&mut self) -> Option<String> {
        if self.after_cr {
            match self.buffer.first() {
                // The LF of a CRLF split across reads may be on its way.
                None => return None,
                Some(b'\n') => self.buffer.advance(1),
                Some(_) => {}
            }
            self.after_cr = false;
        }
        let end = self.buffer.iter().position(|&b| b == b'\n' || b == b'\r')?;
        let line = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
        self.after_cr = self.buffer[end] == b'\r';
        self.buffer.advance(end + 1);
        Some(line)
    }

    fn field(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return data.map(|data| Event {
                event: event.unwrap_or_else(|| "message".to_owned()),
                data,
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8]) -> Vec<Event> {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        // Byte by byte, so every split point is exercised.
        for byte in input {
            parser.push(&[*byte]);
            while let Some(event) = parser.next() {
                out.push(event);
            }
        }
        out
    }

    fn event(name: &str, data: &str) -> Event {
        Event {
            event: name.into(),
            data: data.into(),
        }
    }

    #[test]
    fn consecutive_data_events_are_each_dispatched() {
        let input = b"event: data\ndata: [{\"id\":1}]\n\nevent: data\ndata: [{\"id\":2}]\n\n\
                      event: control\ndata: {\"streamNextOffset\":\"100\"}\n\n";
        assert_eq!(
            events(input),
            [
                event("data", "[{\"id\":1}]"),
                event("data", "[{\"id\":2}]"),
                event("control", "{\"streamNextOffset\":\"100\"}"),
            ]
        );
    }

    #[test]
    fn exactly_one_space_is_removed() {
        assert_eq!(
            events(b"event: data\ndata:  two\n\n"),
            [event("data", " two")]
        );
        assert_eq!(events(b"event:  data\ndata:x\n\n"), [event(" data", "x")]);
    }

    #[test]
    fn mixed_line_endings_parse_alike_and_u2028_is_data() {
        let expected = [event("data", "a\nb\u{2028}c")];
        for input in [
            "event: data\ndata: a\ndata: b\u{2028}c\n\n",
            "event: data\r\ndata: a\r\ndata: b\u{2028}c\r\n\r\n",
            "event: data\rdata: a\rdata: b\u{2028}c\r\r",
            "event: data\r\ndata: a\rdata: b\u{2028}c\n\r\n",
        ] {
            assert_eq!(events(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn comments_unknown_fields_and_events_without_data_are_skipped() {
        let input = b": keep-alive\nid: 3\nretry: 10\n\nevent: data\ndata\n\n";
        assert_eq!(events(input), [event("data", "")]);
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        assert!(events(b"event: data\ndata: partial\n").is_empty());
    }
}
