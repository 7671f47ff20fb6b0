//! A connection with its read buffer: bytes read but not yet consumed stay in `buf[pos..]`.

use std::time::Duration;

use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};

use super::{BodyKind, ChunkedDecoder, HttpError};

const READ_CHUNK: usize = 16 * 1024;

pub struct Io {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Io {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
        }
    }

    /// Bytes read and not yet consumed.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Takes up to `n` pending bytes.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.pending().len());
        let out = self.pending()[..n].to_vec();
        self.consume(n);
        out
    }

    /// Reads more bytes; 0 at end of stream. Times out with [`HttpError::Timeout`].
    pub async fn fill(&mut self, timeout: Duration) -> Result<usize, HttpError> {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let cap = buf.capacity();
        match monoio::time::timeout(timeout, self.stream.read(buf.slice_mut(len..cap))).await {
            Err(_) => Err(HttpError::Timeout),
            Ok((result, slice)) => {
                self.buf = slice.into_inner();
                result.map_err(|_| HttpError::Closed)
            }
        }
    }

    /// [`Io::fill`] against a deadline.
    pub async fn fill_until(
        &mut self,
        deadline: monoio::time::Instant,
    ) -> Result<usize, HttpError> {
        let left = deadline.saturating_duration_since(monoio::time::Instant::now());
        if left.is_zero() {
            return Err(HttpError::Timeout);
        }
        self.fill(left).await
    }

    pub async fn write_all(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        self.stream.write_all(bytes).await.0.map(|_| ())
    }

    /// Reads a whole body framed as `kind`, at most `max` bytes.
    pub async fn read_body(
        &mut self,
        kind: BodyKind,
        max: usize,
        deadline: monoio::time::Instant,
    ) -> Result<Vec<u8>, HttpError> {
        match kind {
            BodyKind::Length(n) => {
                while self.pending().len() < n {
                    if self.fill_until(deadline).await? == 0 {
                        return Err(HttpError::BadRequest("body shorter than Content-Length"));
                    }
                }
                Ok(self.take(n))
            }
            BodyKind::Chunked => {
                let mut decoder = ChunkedDecoder::default();
                let mut out = Vec::new();
                loop {
                    let (used, done) = decoder.decode(self.pending(), &mut out)?;
                    self.consume(used);
                    if out.len() > max {
                        return Err(HttpError::BodyTooLarge(max));
                    }
                    if done {
                        return Ok(out);
                    }
                    if self.fill_until(deadline).await? == 0 {
                        return Err(HttpError::BadRequest(
                            "connection closed inside a chunked body",
                        ));
                    }
                }
            }
            BodyKind::UntilClose => loop {
                if self.pending().len() > max {
                    return Err(HttpError::BodyTooLarge(max));
                }
                if self.fill_until(deadline).await? == 0 {
                    let n = self.pending().len();
                    return Ok(self.take(n));
                }
            },
        }
    }
}
