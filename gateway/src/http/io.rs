//! A connection with its read buffer: bytes read but not yet consumed stay in `buf[pos..]`.
//!
//! Every way a connection ends goes through one place, [`Io`]'s `Drop`: the socket is shut down
//! in both directions before it is released. On io_uring, a read or poll still queued in the
//! ring (one whose future was dropped: a timeout, a `select!` that went the other way) holds
//! the descriptor open until it completes, which for an idle peer is never; the shutdown
//! completes it, so the descriptor is really released and the peer sees the close at once.
//! (Dropped operations are also cancelled in the ring: monoio's `async-cancel` feature.)
//!
//! A read or write that was abandoned midway leaves the connection in an unknown state (bytes
//! may have been taken from the socket into a buffer that is gone, or half a request written),
//! so the `Io` remembers it and is never used for another exchange: reads answer
//! [`HttpError::Closed`], and [`Io::idle_and_open`] (the pool's test) is false.

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
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// How long one write may wait for the peer to take the bytes.
    send_timeout: Duration,
    /// A read was abandoned (timed out or cancelled) or the read side was shut down.
    read_lost: bool,
    /// A write was abandoned or failed.
    write_lost: bool,
}

impl Drop for Io {
    fn drop(&mut self) {
        self.shutdown(libc::SHUT_RDWR);
    }
}

impl Io {
    /// A connection whose writes each time out after `send_timeout`.
    pub fn new(stream: TcpStream, send_timeout: Duration) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            send_timeout,
            read_lost: false,
            write_lost: false,
        }
    }

    pub fn set_send_timeout(&mut self, timeout: Duration) {
        self.send_timeout = timeout;
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

    /// Reads more bytes; 0 at end of stream. Times out with [`HttpError::Timeout`], after which
    /// nothing more is read from this connection (its read side is shut down; a response can
    /// still be written). Dropping the future midway has the same effect.
    pub async fn fill(&mut self, timeout: Duration) -> Result<usize, HttpError> {
        if self.read_lost {
            return Err(HttpError::Closed);
        }
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        // The buffer goes into the read; until it comes back the connection counts as lost
        // (and `pending()` is empty rather than out of bounds), in case this future is dropped.
        let buf = std::mem::take(&mut self.buf);
        let pos = std::mem::take(&mut self.pos);
        self.read_lost = true;
        let len = buf.len();
        let cap = buf.capacity();
        match monoio::time::timeout(timeout, self.stream.read(buf.slice_mut(len..cap))).await {
            Err(_) => {
                self.shutdown(libc::SHUT_RD);
                Err(HttpError::Timeout)
            }
            Ok((result, slice)) => {
                self.buf = slice.into_inner();
                self.pos = pos;
                match result {
                    Ok(n) => {
                        self.read_lost = false;
                        Ok(n)
                    }
                    Err(_) => Err(HttpError::Closed),
                }
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

    /// For an idle connection: nothing pending, nothing lost, and the peer has neither closed it
    /// nor sent anything. Only such a connection may carry another exchange: bytes an upstream
    /// sent after its answer would otherwise be read as the answer to the next request.
    pub fn idle_and_open(&self) -> bool {
        self.intact() && matches!(self.peek(), Peek::Nothing)
    }

    /// Nothing pending and no read or write abandoned (no system call).
    pub fn intact(&self) -> bool {
        !self.read_lost && !self.write_lost && self.pending().is_empty()
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

    /// Shuts the socket down (`how` as in shutdown(2)). An operation still in flight on it
    /// completes, so the descriptor is released once the `Io` is dropped and the peer sees it.
    fn shutdown(&mut self, how: libc::c_int) {
        if how != libc::SHUT_WR {
            self.read_lost = true;
        }
        if how != libc::SHUT_RD {
            self.write_lost = true;
        }
        // SAFETY: shutdown(2) on a socket this Io owns; on one already shut down or reset it
        // fails harmlessly.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), how) };
    }

    /// Writes all of `bytes`, each write waiting at most the send timeout for the peer: a peer
    /// that stops reading cannot hold the connection (and what feeds it) forever. A write that
    /// times out or fails shuts the connection down.
    pub async fn write_all(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        if self.write_lost {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        // Lost until it completes, in case this future is dropped midway.
        self.write_lost = true;
        match monoio::time::timeout(self.send_timeout, self.stream.write_all(bytes)).await {
            Ok((Ok(_), _)) => {
                self.write_lost = false;
                Ok(())
            }
            Ok((Err(e), _)) => {
                self.shutdown(libc::SHUT_RDWR);
                Err(e)
            }
            Err(_) => {
                self.shutdown(libc::SHUT_RDWR);
                Err(std::io::ErrorKind::TimedOut.into())
            }
        }
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
