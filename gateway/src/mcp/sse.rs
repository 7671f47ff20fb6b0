//! Server-sent events (`text/event-stream`, how MCP answers stream): where events end, found in
//! one pass over each byte. An event ends with an empty line, and a line with CRLF, LF or a
//! lone CR, as every client's parser reads them (the WHATWG event stream format): a stream
//! the gateway cut elsewhere would carry events it never saw, unrewritten and unclassified.
//!
//! A stream arrives in pieces; [`EventBuffer`] keeps where its scan stopped (even between the
//! CR and LF of one line end), so each byte is scanned once however the stream is cut, and the
//! events found are the same; it bounds the one event it may hold incomplete: an upstream
//! cannot make a worker rescan or buffer without end.

/// Where a search for event ends stands between bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    /// The next byte to look at.
    at: usize,
    /// Where the event being read starts (after a LF that belongs to the last event's end).
    start: usize,
    /// The line being read has no byte yet: a line end here is an empty line, the event's end.
    line_empty: bool,
    /// The end of the event's content so far: where its last line's end began.
    content_end: usize,
    /// The last byte looked at was a CR, which ended a line: a LF right after it is part of
    /// that line end, not a line of its own.
    after_cr: bool,
}

/// An event found by [`Scan::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    start: usize,
    /// The end of its content (before the end of its last line).
    content_end: usize,
    /// Where a client dispatches it: after the line end that ends its empty line, or after
    /// the CR of a CRLF there (a client need not wait for the LF).
    dispatch: usize,
    /// Where what follows starts: after that LF too, when it was there to see.
    next: usize,
}

impl Scan {
    fn at(at: usize) -> Self {
        Self {
            at,
            start: at,
            line_empty: true,
            content_end: at,
            after_cr: false,
        }
    }

    /// The next event from where the scan stands; `None` when `buf` has no end of one yet: the
    /// scan then stands at its end, to go on when more bytes come. The events, their starts and
    /// dispatch points are the same however the bytes are cut; only a LF after a CR may come
    /// with the next event when it was not there yet.
    fn next(&mut self, buf: &[u8]) -> Option<Found> {
        while self.at < buf.len() {
            if std::mem::take(&mut self.after_cr) && buf[self.at] == b'\n' {
                if self.start == self.at {
                    // The LF of the CR that ended the last event.
                    self.start += 1;
                    self.content_end += 1;
                }
                self.at += 1;
                continue;
            }
            let Some(i) = memchr::memchr2(b'\r', b'\n', &buf[self.at..]) else {
                self.line_empty = false;
                self.at = buf.len();
                return None;
            };
            let i = self.at + i;
            if i > self.at {
                self.line_empty = false;
            }
            self.at = i + 1;
            let cr = buf[i] == b'\r';
            if !self.line_empty {
                self.content_end = i;
                self.line_empty = true;
                self.after_cr = cr;
                continue;
            }
            // An empty line: the event ends.
            let lf = cr && buf.get(i + 1) == Some(&b'\n');
            let found = Found {
                start: self.start,
                content_end: self.content_end,
                dispatch: i + 1,
                next: i + 1 + usize::from(lf),
            };
            *self = Self::at(found.next);
            self.after_cr = cr && !lf;
            return Some(found);
        }
        None
    }

    /// The same scan over a buffer whose first `n` bytes were taken out.
    fn rebase(&mut self, n: usize) {
        self.at -= n;
        self.start -= n;
        self.content_end -= n;
    }
}

/// The byte order mark a client skips at the start of a stream.
pub const BOM: &[u8] = "\u{feff}".as_bytes();

/// The events in `buf`, each without its empty line; empty ones skipped. The last may lack its
/// empty line (the end of a stream). One byte order mark at the start is skipped, as a client
/// skips it at the start of a stream: `buf` is a stream, or a piece of one that starts with an
/// event, where a client would read the mark as part of a field's name. A federation writes
/// only the fields it read and drops an event with a mark in a name, so a mark skipped there
/// means an event tagged, not one passed on untagged.
pub fn split(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let buf = buf.strip_prefix(BOM).unwrap_or(buf);
    let mut scan = Scan::at(0);
    let mut ended = false;
    std::iter::from_fn(move || {
        while !ended {
            let event = match scan.next(buf) {
                Some(found) => buf.get(found.start..found.content_end),
                None => {
                    ended = true;
                    buf.get(scan.start.min(buf.len())..)
                }
            }
            .unwrap_or_default();
            if !event.is_empty() {
                return Some(event);
            }
        }
        None
    })
}

/// An event larger than the limit was being buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTooLarge(pub usize);

/// An incomplete event this large has room made for the rest announced ([`EventBuffer::expect`]).
const LARGE_EVENT: usize = 64 * 1024;

/// The bytes of a stream not yet passed on: complete events are taken out as they arrive, an
/// incomplete one waits for its end, up to `max_event` bytes.
#[derive(Debug)]
pub struct EventBuffer {
    buf: Vec<u8>,
    /// How far `buf` was searched for event ends; it starts with an event.
    scan: Scan,
    max_event: usize,
    /// An event over the limit is whole in `buf`, after the events last taken out.
    too_large: bool,
}

impl EventBuffer {
    pub fn new(max_event: usize) -> Self {
        Self {
            buf: Vec::new(),
            scan: Scan::at(0),
            max_event,
            too_large: false,
        }
    }

    /// Adds bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Adds bytes of the stream to an empty buffer: they become it, uncopied.
    pub fn start_with(&mut self, bytes: Vec<u8>) {
        if self.buf.is_empty() {
            self.buf = bytes;
            self.scan = Scan::at(0);
        } else {
            self.buf.extend_from_slice(&bytes);
        }
    }

    /// Makes room at once for `more` bytes known to be coming (the rest of a body or a chunk)
    /// while an incomplete event is held, up to the largest event: a large event then grows
    /// its buffer once, not by doubling (each growth copies what it held).
    pub fn expect(&mut self, more: usize) {
        // Only for an event already large: one announced large and sent small holds little.
        if self.buf.len() >= LARGE_EVENT {
            let room = more.min(self.max_event.saturating_sub(self.buf.len()));
            self.buf.reserve(room);
        }
    }

    /// The buffer, to append bytes of the stream to (decoded chunks) without a copy between.
    pub fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Takes out every complete event buffered (with their empty lines, bytes unchanged), if
    /// any. An event may take `max_event` bytes with its empty line: one over that fails the
    /// stream whether it arrived whole or in pieces (an incomplete rest that long can only
    /// become longer). The events before it are taken out first; the next call fails.
    pub fn take_events(&mut self) -> Result<Option<Vec<u8>>, EventTooLarge> {
        self.check()?;
        let mut last = None;
        let mut scan = self.scan;
        while let Some(found) = scan.next(&self.buf) {
            if found.dispatch - found.start > self.max_event {
                self.too_large = true;
                break;
            }
            last = Some(found.next);
            self.scan = scan;
        }
        if !self.too_large {
            self.scan = scan;
        }
        let events = last.map(|end| {
            // The rest (at most one incomplete event, or the one too large) moves, not the
            // events.
            let rest = self.buf.split_off(end);
            self.scan.rebase(end);
            std::mem::replace(&mut self.buf, rest)
        });
        // An incomplete event that long can only become longer.
        let held = self.buf.len() - self.scan.start.min(self.buf.len());
        if held >= self.max_event {
            self.too_large = true;
        }
        if events.is_none() {
            self.check()?;
        }
        Ok(events)
    }

    /// Fails if an event over the limit is held: at the end of a body, after the events before
    /// it were passed on.
    pub fn check(&self) -> Result<(), EventTooLarge> {
        if self.too_large {
            Err(EventTooLarge(self.max_event))
        } else {
            Ok(())
        }
    }

    /// The bytes not taken out yet.
    pub fn rest(&self) -> &[u8] {
        &self.buf
    }

    /// What is left: a last event without its empty line, at the end of a stream.
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.scan = Scan::at(0);
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Whether the client takes an event stream the gateway writes as an answer.
pub fn accepts_sse(req: &crate::http::Request) -> bool {
    // The gateway writes its own streams chunked, which an HTTP/1.0 client cannot be sent
    // (RFC 9112 §6.1): such a client gets the answer alone, as JSON.
    req.minor >= 1
        && req
            .header_str(crate::http::name::ACCEPT)
            .is_some_and(|a| a.to_ascii_lowercase().contains("text/event-stream"))
}

/// The head of a chunked SSE answer.
pub fn sse_head(req: &crate::http::Request) -> Vec<u8> {
    let connection = if req.keep_alive {
        "keep-alive"
    } else {
        "close"
    };
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\nconnection: {connection}\r\n\r\n"
    )
    .into_bytes()
}

/// One SSE event carrying `data` (one JSON message, on one line), as an HTTP chunk.
pub fn sse_event(data: &[u8]) -> Vec<u8> {
    let mut event = Vec::with_capacity(data.len() + 16);
    event.extend_from_slice(b"event: message\ndata: ");
    event.extend_from_slice(data);
    event.extend_from_slice(b"\n\n");
    crate::http::chunk(&event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_empty_lines_of_every_kind() {
        let buf = b"data: a\n\ndata: b\r\n\r\n\n\ndata: c\r\rdata: d\n\r\ndata: e\r\n\ndata: f\r\r\ndata: g";
        let got: Vec<&[u8]> = split(buf).collect();
        assert_eq!(
            got,
            [
                &b"data: a"[..],
                b"data: b",
                b"data: c",
                b"data: d",
                b"data: e",
                b"data: f",
                b"data: g"
            ]
        );
        // Lines end with CR, LF or CRLF; only an empty line ends an event.
        let got: Vec<&[u8]> = split(b"id: 1\rdata: x\ndata: y\r\n\r\n").collect();
        assert_eq!(got, [&b"id: 1\rdata: x\ndata: y"[..]]);
        // One byte order mark at the start is not part of the first line.
        let got: Vec<&[u8]> = split("\u{feff}data: x\n\n".as_bytes()).collect();
        assert_eq!(got, [&b"data: x"[..]]);
        // An event ends at the CR of its empty line; a LF after it is not a line.
        let got: Vec<&[u8]> = split(b"data: x\r\r\ndata: y\r\r").collect();
        assert_eq!(got, [&b"data: x"[..], b"data: y"]);
    }

    /// Cut anywhere, byte by byte or in pieces, the events taken out are the stream's bytes
    /// cut at its event ends, the same as when it arrives at once.
    #[test]
    fn the_buffer_takes_out_the_same_events_however_the_stream_is_cut() {
        let stream = b"id: 1\ndata: {}\n\n: c\r\ndata: x\r\n\r\ndata: y\n\n\ndata: z\r\n\r\ndata: r\r\rdata: s\r\n\rdata: t\n\r\ndata: tail";
        let at_once = {
            let mut b = EventBuffer::new(1024);
            b.push(stream);
            let events = b.take_events().unwrap().unwrap();
            (events, b.take_rest())
        };
        assert_eq!(at_once.1, b"data: tail");
        for piece in 1..stream.len() {
            let mut b = EventBuffer::new(1024);
            let mut events = Vec::new();
            for p in stream.chunks(piece) {
                b.push(p);
                if let Some(e) = b.take_events().unwrap() {
                    events.extend_from_slice(&e);
                }
            }
            let rest = b.take_rest();
            let mut whole = events.clone();
            whole.extend_from_slice(&rest);
            assert_eq!(whole, stream, "piece {piece}");
            let split_events = |v: &[u8]| split(v).map(<[u8]>::to_vec).collect::<Vec<_>>();
            // A LF after a CR that ended an event comes with the next piece when it was not
            // there yet: the same events either way.
            assert_eq!(
                split_events(&rest),
                split_events(&at_once.1),
                "piece {piece}"
            );
            assert_eq!(
                split_events(&events),
                split_events(&at_once.0),
                "piece {piece}"
            );
        }
    }

    /// A large event trickled in small pieces costs time in proportion to its size (it used to
    /// be rescanned whole per piece), and 16,000 small events split in one pass.
    #[test]
    fn scanning_is_linear() {
        let mut b = EventBuffer::new(usize::MAX);
        let piece = vec![b'x'; 64];
        let started = std::time::Instant::now();
        b.push(b"data: ");
        for _ in 0..(4 << 20) / 64 {
            b.push(&piece);
            assert_eq!(b.take_events(), Ok(None));
        }
        b.push(b"\n\n");
        assert_eq!(
            b.take_events().unwrap().map(|e| e.len()),
            Some(6 + (4 << 20) + 2)
        );
        let events: Vec<u8> = b"data: {\"jsonrpc\":\"2.0\"}\n\n".repeat(64_000);
        assert_eq!(split(&events).count(), 64_000);
        // Quadratic, the above takes seconds to minutes even optimised.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn an_event_over_the_limit_fails_the_stream() {
        let mut b = EventBuffer::new(16);
        b.push(b"data: 1\n\ndata: 012345678");
        // The complete event is within the limit; the incomplete one, 15 bytes, may still
        // end within it.
        assert_eq!(b.take_events(), Ok(Some(b"data: 1\n\n".to_vec())));
        b.push(b"9");
        assert_eq!(b.take_events(), Err(EventTooLarge(16)));
        // Events before one over the limit in the same piece are passed on first; the stream
        // fails next, or at its end.
        let mut b = EventBuffer::new(16);
        b.push(b"data: 1\n\ndata: 2\n\ndata: 0123456789\n\n");
        assert_eq!(b.check(), Ok(()));
        assert_eq!(
            b.take_events(),
            Ok(Some(b"data: 1\n\ndata: 2\n\n".to_vec()))
        );
        assert_eq!(b.check(), Err(EventTooLarge(16)));
        assert_eq!(b.take_events(), Err(EventTooLarge(16)));
    }

    /// The limit holds however the bytes arrive: an event of 17 bytes (with its blank line)
    /// over a limit of 16 is refused whole, after a smaller one, as in pieces; one of 16 passes
    /// either way (a whole event used to pass at any size).
    #[test]
    fn the_event_limit_holds_however_the_event_arrives() {
        let small = b"data: 1\n\n";
        for (event, fits) in [
            (&b"data: 012345678\n\n"[..], false),
            (b"data: 01234567\n\n", true),
            // The event ends at the CR of its empty line: the LF after it is not counted.
            (b"data: 01234567\r\n\r\n", false),
            (b"data: 0123456\r\n\r\n", true),
            (b"data: 01234567\r\r", true),
            (b"data: 012345678\r\r", false),
            (b"data: 01234567\r\r\n", true),
            (b"data: 012345678\r\r\n", false),
        ] {
            // What follows the event tells where a lone CR's line end stops.
            let stream = [&small[..], event, b"data: 2\n\n"].concat();
            for cut in 1..=stream.len() {
                let mut b = EventBuffer::new(16);
                b.push(&stream[..cut]);
                let first = b.take_events();
                b.push(&stream[cut..]);
                let second = b.take_events();
                let refused = first.is_err() || second.is_err() || b.check().is_err();
                assert_eq!(
                    refused,
                    !fits,
                    "{:?} cut at {cut}: {first:?} {second:?}",
                    String::from_utf8_lossy(event)
                );
            }
        }
    }
}
