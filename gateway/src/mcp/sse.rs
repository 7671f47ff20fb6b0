//! Server-sent events (`text/event-stream`, how MCP answers stream): where events end, found in
//! one pass over each byte. An event ends with an empty line; `\n\n` and `\r\n\r\n` are
//! recognised (what the gateway's upstreams write).
//!
//! A stream arrives in pieces; [`EventBuffer`] remembers where its last search stopped, so each
//! byte is scanned a bounded number of times however the stream is cut, and it bounds the one
//! event it may hold incomplete: an upstream cannot make a worker rescan or buffer without end.

/// The first event end in `buf` found from `from` on: (end of the event's content, start of
/// what follows its blank line). A `\r\n\r\n` starting just before `from` is found too (the
/// search looks one byte back).
pub fn next_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < buf.len() {
        let nl = i + buf.get(i..)?.iter().position(|b| *b == b'\n')?;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some((nl, nl + 2)),
            Some(b'\r')
                if nl > 0 && buf.get(nl - 1) == Some(&b'\r') && buf.get(nl + 2) == Some(&b'\n') =>
            {
                return Some((nl - 1, nl + 3));
            }
            _ => {}
        }
        i = nl + 1;
    }
    None
}

/// The events in `buf`, each without its blank line; empty ones skipped. The last may lack its
/// blank line (the end of a stream).
pub fn split(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < buf.len() {
            let (end, next) = next_end(buf, at).unwrap_or((buf.len(), buf.len()));
            let event = buf.get(at..end).unwrap_or_default();
            at = next;
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

/// The bytes of a stream not yet passed on: complete events are taken out as they arrive, an
/// incomplete one waits for its end, up to `max_event` bytes.
#[derive(Debug)]
pub struct EventBuffer {
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no event end (but for its last bytes, which a later byte may
    /// complete: the search resumes 3 bytes back).
    scanned: usize,
    max_event: usize,
}

impl EventBuffer {
    pub fn new(max_event: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            max_event,
        }
    }

    /// Adds bytes of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes out every complete event buffered (with their blank lines, bytes unchanged), if
    /// any. An event may take `max_event` bytes with its blank line: one over that fails the
    /// stream whether it arrived whole or in pieces (an incomplete rest that long can only
    /// become longer).
    pub fn take_events(&mut self) -> Result<Option<Vec<u8>>, EventTooLarge> {
        let mut from = self.scanned.saturating_sub(3);
        let mut last = None;
        while let Some((_, next)) = next_end(&self.buf, from) {
            // Each event starts where the one before it ended; the buffer starts with one.
            if next - last.unwrap_or(0) > self.max_event {
                return Err(EventTooLarge(self.max_event));
            }
            last = Some(next);
            from = next;
        }
        let events = last.map(|end| {
            // The rest (at most one incomplete event) moves, not the events.
            let rest = self.buf.split_off(end);
            std::mem::replace(&mut self.buf, rest)
        });
        self.scanned = self.buf.len();
        if self.buf.len() >= self.max_event {
            return Err(EventTooLarge(self.max_event));
        }
        Ok(events)
    }

    /// The bytes not taken out yet.
    pub fn rest(&self) -> &[u8] {
        &self.buf
    }

    /// What is left: a last event without its blank line, at the end of a stream.
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.scanned = 0;
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Whether the client takes an event stream as an answer.
pub fn accepts_sse(req: &crate::http::Request) -> bool {
    req.header_str("accept")
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
    fn events_end_at_blank_lines_of_either_kind() {
        let buf = b"data: a\n\ndata: b\r\n\r\n\n\ndata: c";
        let got: Vec<&[u8]> = split(buf).collect();
        assert_eq!(got, [&b"data: a"[..], b"data: b", b"data: c"]);
        assert_eq!(next_end(b"x\r\n\r\n", 0), Some((1, 5)));
        assert_eq!(next_end(b"x\r\n\r", 0), None);
        assert_eq!(next_end(b"x\n", 0), None);
    }

    /// Cut anywhere, byte by byte or in pieces, the events taken out are the stream's bytes
    /// cut at its event ends, the same as when it arrives at once.
    #[test]
    fn the_buffer_takes_out_the_same_events_however_the_stream_is_cut() {
        let stream =
            b"id: 1\ndata: {}\n\n: c\r\ndata: x\r\n\r\ndata: y\n\n\ndata: z\r\n\r\ndata: tail";
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
            assert_eq!(rest, at_once.1, "piece {piece}");
            let split_events = |v: &[u8]| split(v).map(<[u8]>::to_vec).collect::<Vec<_>>();
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
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
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
            (b"data: 0123456\r\n\r\n", false),
            (b"data: 012345\r\n\r\n", true),
        ] {
            let stream = [&small[..], event].concat();
            for cut in 1..=stream.len() {
                let mut b = EventBuffer::new(16);
                b.push(&stream[..cut]);
                let first = b.take_events();
                b.push(&stream[cut..]);
                let second = b.take_events();
                let refused = first.is_err() || second.is_err();
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
