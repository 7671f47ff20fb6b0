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
    Trailers,
    Done,
}

/// Longest chunk size line (with its extensions and CRLF), in bytes.
const MAX_SIZE_LINE: usize = 1024;
/// Longest trailer line (with its CRLF), in bytes.
const MAX_TRAILER_LINE: usize = 8 * 1024;

/// Decodes chunked framing incrementally: feed it whatever bytes have arrived. It decides the
/// same however the bytes are split: a line over its limit is refused whole as it is in part.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: State,
}

impl ChunkedDecoder {
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
                        used += n;
                        let size = usize::try_from(size)
                            .map_err(|_| HttpError::BadRequest("chunk too large"))?;
                        self.state = if size == 0 {
                            State::Trailers
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
                State::Trailers => {
                    // Trailer fields are read and dropped; an empty line ends the body.
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() >= MAX_TRAILER_LINE {
                            return Err(HttpError::BadRequest("trailers too long"));
                        }
                        return Ok((used, false));
                    };
                    if eol + 2 > MAX_TRAILER_LINE {
                        return Err(HttpError::BadRequest("trailers too long"));
                    }
                    used += eol + 2;
                    if eol == 0 {
                        self.state = State::Done;
                    }
                }
            }
        }
    }
}
