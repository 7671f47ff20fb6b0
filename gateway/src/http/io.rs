//! A connection with its read buffer: bytes read but not yet consumed stay in `buf[pos..]`.

use std::{os::fd::AsRawFd as _, time::Duration};

use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};

use super::{BodyKind, ChunkedDecoder, HttpError};

const READ_CHUNK: usize = 16 * 1024;

/// What a peek at a socket found.
enum Peek {
    /// The peer closed its side, or the socket failed.
    Closed,
    /// Bytes are waiting.
    Data,
    /// Neither (it would block).
    Nothing,
}

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

    /// Resolves once the peer has closed its side (or the socket failed), without consuming
    /// anything: if the peer sends more instead (a pipelined request), it never resolves. Used
    /// to notice a client that gives up while the gateway waits on the upstream, which is how
    /// a client cancels in 2026-07-28.
    pub async fn peer_gone(&self) {
        loop {
            if self.stream.readable(false).await.is_err() {
                return;
            }
            match self.peek() {
                Peek::Closed => return,
                Peek::Data => return std::future::pending().await,
                Peek::Nothing => {}
            }
        }
    }

    /// For an idle connection: nothing pending, and the peer has neither closed it nor sent
    /// anything.
    pub fn idle_and_open(&self) -> bool {
        self.pending().is_empty() && matches!(self.peek(), Peek::Nothing)
    }

    /// A non-blocking one-byte peek at the socket: nothing is consumed.
    fn peek(&self) -> Peek {
        let mut b = [0u8; 1];
        // SAFETY: a one-byte peek into a local buffer on a socket this Io owns.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Peek::Closed,
            n if n > 0 => Peek::Data,
            _ => match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Peek::Nothing,
                // A failed socket is as good as closed.
                _ => Peek::Closed,
            },
        }
    }

    /// Shuts the socket down at once, in both directions. A read still in flight on it (one
    /// whose future was dropped; on io_uring it stays in the ring and keeps the socket open)
    /// completes, so the socket really closes and the peer sees it now.
    pub fn abort(&self) {
        // SAFETY: shutdown(2) on a socket this Io owns.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR) };
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
