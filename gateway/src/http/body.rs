//! Body framings and an incremental chunked decoder (RFC 9112 section 7.1).

use super::HttpError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Length(usize),
    Chunked,
    /// A response body that ends when the server closes the connection.
    UntilClose,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    /// In the trailer section: the bytes of its current line already searched for its end.
    Trailers(usize),
    Done,
}

/// Longest chunk size line (with its extensions and CRLF), in bytes.
const MAX_SIZE_LINE: usize = 1024;
/// Longest trailer line (with its CRLF), in bytes.
const MAX_TRAILER_LINE: usize = 8 * 1024;
/// Most bytes of chunk extensions and trailer lines in one body: they are read and dropped,
/// and a body of one-byte chunks would otherwise carry a KiB of them per byte.
const MAX_OVERHEAD: usize = 16 * 1024;

/// Decodes chunked framing incrementally: feed it whatever bytes have arrived. It decides the
/// same however the bytes are split: a line over its limit is refused whole as it is in part.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes of chunk extensions and trailer lines so far.
    overhead: usize,
}

impl ChunkedDecoder {
    /// Bytes of the current chunk's data still to come (0 between chunks).
    pub fn data_left(&self) -> usize {
        match self.state {
            State::Data(left) => left,
            _ => 0,
        }
    }

    /// Decodes from `input`, appending data to `out`. Returns the bytes used and whether the
    /// body is complete. Unused bytes must be presented again with more data.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), HttpError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Done => return Ok((used, true)),
                State::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, _))) if n > MAX_SIZE_LINE => {
                        return Err(HttpError::BadRequest("chunk size line too long"));
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        strict_size_line(&rest[..n])?;
                        let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                        self.add_overhead(n - 2 - digits)?;
                        used += n;
                        let size = usize::try_from(size)
                            .map_err(|_| HttpError::BadRequest("chunk too large"))?;
                        self.state = if size == 0 {
                            State::Trailers(0)
                        } else {
                            State::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        // A line still incomplete at the limit is longer than it.
                        if rest.len() >= MAX_SIZE_LINE {
                            return Err(HttpError::BadRequest("chunk size line too long"));
                        }
                        return Ok((used, false));
                    }
                    Err(_) => return Err(HttpError::BadRequest("invalid chunk size")),
                },
                State::Data(left) => {
                    if rest.is_empty() {
                        return Ok((used, false));
                    }
                    let n = left.min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    used += n;
                    self.state = if n == left {
                        State::DataEnd
                    } else {
                        State::Data(left - n)
                    };
                }
                State::DataEnd => {
                    if rest.len() < 2 {
                        return Ok((used, false));
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(HttpError::BadRequest("chunk not followed by CRLF"));
                    }
                    used += 2;
                    self.state = State::Size;
                }
                State::Trailers(searched) => {
                    // Trailer fields are read and dropped; an empty line ends the body. The
                    // search for a line's end goes on where it stopped (a CR last may be
                    // followed by its LF).
                    let from = searched.min(rest.len());
                    let Some(eol) = memchr::memmem::find(&rest[from..], b"\r\n").map(|i| from + i)
                    else {
                        if rest.len() >= MAX_TRAILER_LINE {
                            return Err(HttpError::BadRequest("trailers too long"));
                        }
                        self.state = State::Trailers(rest.len().saturating_sub(1));
                        return Ok((used, false));
                    };
                    if eol + 2 > MAX_TRAILER_LINE {
                        return Err(HttpError::BadRequest("trailers too long"));
                    }
                    if eol > 0 {
                        strict_trailer_line(&rest[..eol])?;
                    }
                    self.add_overhead(eol + 2)?;
                    used += eol + 2;
                    self.state = if eol == 0 {
                        State::Done
                    } else {
                        State::Trailers(0)
                    };
                }
            }
        }
    }
}

impl ChunkedDecoder {
    fn add_overhead(&mut self, n: usize) -> Result<(), HttpError> {
        self.overhead += n;
        if self.overhead > MAX_OVERHEAD {
            return Err(HttpError::BadRequest(
                "chunk extensions and trailers over 16 KiB",
            ));
        }
        Ok(())
    }
}

/// What httparse's `parse_chunk_size` lets through and RFC 9112 does not: a line without a
/// size (httparse reads an empty line as the last chunk) and control bytes in an extension
/// (httparse skips any byte there, a bare LF too). Either could end the body or a line at
/// another place for a proxy in front of the gateway than for the gateway: refused.
/// `line` is the whole size line, with its CRLF.
fn strict_size_line(line: &[u8]) -> Result<(), HttpError> {
    let body = line.strip_suffix(b"\r\n").unwrap_or(line);
    if !body.first().is_some_and(u8::is_ascii_hexdigit) {
        return Err(HttpError::BadRequest("chunk size line without a size"));
    }
    if body.iter().any(|&b| is_ctl(b)) {
        return Err(HttpError::BadRequest("control byte in a chunk size line"));
    }
    Ok(())
}

/// A trailer line (without its CRLF) must be a field line: a token, a colon, and a value
/// without control bytes. A bare CR or LF would end the line (and so the body) at another
/// place for a proxy in front that takes it as a line end. Trailers are dropped, not forwarded.
fn strict_trailer_line(line: &[u8]) -> Result<(), HttpError> {
    let colon = line.iter().position(|&b| b == b':');
    let valid = colon.is_some_and(|c| {
        c > 0 && line[..c].iter().all(|&b| is_tchar(b)) && !line[c..].iter().any(|&b| is_ctl(b))
    });
    if valid {
        Ok(())
    } else {
        Err(HttpError::BadRequest("invalid trailer line"))
    }
}

/// A control byte other than horizontal tab.
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// A byte of an RFC 9110 token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
