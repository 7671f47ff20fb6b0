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
//!
//! A connection may carry TLS (a listener's or an https upstream's): rustls does the protocol
//! and the crypto, this type only moves its records between the socket and rustls, so that
//! the socket stays in reach for the readiness waits, peeks and shutdowns above. Plaintext is
//! never sent on a connection whose handshake has not completed.
//!
//! An idle connection holds no buffer: [`Io::fill_idle`] lends the read buffer to the kernel
//! only for a short grace period, then takes it back (a cancelled read) and waits for
//! readiness alone; a buffer is taken again when bytes arrive. With 10,000 idle keep-alive
//! connections the 16 KiB each held in a pending read were most of the gateway's memory.

use std::{os::fd::AsRawFd as _, time::Duration};

use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent, AsyncWriteRent as _, AsyncWriteRentExt},
    net::TcpStream,
};

use std::io::{Read as _, Write as _};

use super::{
    BodyKind, ChunkedDecoder, HttpError, Outgoing,
    deadline::within,
    outgoing::{Chunk, Parts, Unsent},
};

const READ_CHUNK: usize = 16 * 1024;

/// Pieces at least this large are handed over rather than copied ([`Io::take`]).
const HAND_OVER: usize = 64 * 1024;

/// Most room made for a body before its bytes arrive ([`Io::expect`]).
const EXPECT_MAX: usize = 256 * 1024;

/// How long a connection waiting for its next request keeps a read (and its buffer) pending
/// before it gives the buffer back and waits for readiness alone. Busy keep-alive connections
/// stay on the one-operation path; idle ones hold no buffer.
const IDLE_GRACE: Duration = Duration::from_millis(500);

thread_local! {
    /// Connections of this thread that went idle and gave their read buffers back, since
    /// [`take_idle_releases`] last looked.
    static IDLE_RELEASES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many of this thread's connections gave their read buffers back (idle for
/// [`IDLE_GRACE`]) since the last call; the worker purges the allocator's free pages after many
/// (they are freed, not returned to the system, until the allocator is next busy).
pub fn take_idle_releases() -> usize {
    IDLE_RELEASES.replace(0)
}

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
    /// The TLS session, when the connection carries one.
    tls: Option<Box<rustls::Connection>>,
    /// Records read from the socket and not yet taken by rustls (TLS only).
    raw: Vec<u8>,
    raw_pos: usize,
    buf: Vec<u8>,
    pos: usize,
    /// How long one write may wait for the peer to take the bytes.
    send_timeout: Duration,
    /// A read was abandoned (timed out or cancelled) or the read side was shut down.
    read_lost: bool,
    /// A write was abandoned or failed.
    write_lost: bool,
    /// The status of the first response head written since [`Io::begin_response`] (0: none
    /// yet), for the access log.
    status: u16,
    /// Header lines the current answer's head carries besides its own (the CORS policy's).
    head_lines: Vec<u8>,
}

impl std::os::fd::AsRawFd for Io {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        self.close_notify();
        self.shutdown(libc::SHUT_RDWR);
    }
}

impl Io {
    /// A connection whose writes each time out after `send_timeout`.
    pub fn new(stream: TcpStream, send_timeout: Duration) -> Self {
        Self {
            stream,
            tls: None,
            raw: Vec::new(),
            raw_pos: 0,
            // Taken at the first read: a connection that never sends holds none.
            buf: Vec::new(),
            pos: 0,
            send_timeout,
            read_lost: false,
            status: 0,
            head_lines: Vec::new(),
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

    /// Takes up to `n` pending bytes. A large piece that is the whole buffer is handed over as
    /// it is (no copy; the next read takes a new buffer); a small one is copied, which costs
    /// less than a new read buffer.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.pending().len());
        if n >= HAND_OVER && self.pos == 0 && self.buf.len() == n {
            return std::mem::take(&mut self.buf);
        }
        let out = self.pending()[..n].to_vec();
        self.consume(n);
        out
    }

    /// Makes room for `n` more bytes in one allocation before they are read (a body of known
    /// length), instead of growing the buffer as they arrive (each growth copies what it held).
    /// Bounded by the caller (a body limit).
    pub fn expect(&mut self, n: usize) {
        if self.tls.is_some() || self.read_lost {
            return;
        }
        // The body starts the buffer (so that it can be handed over whole), and only what is
        // pending moves, once: into new room when there is too little. (Draining, then
        // growing, copied it twice; growing by `realloc` copies the old room whole, used or
        // not.)
        if self.buf.capacity() - (self.buf.len() - self.pos) >= n {
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            return;
        }
        let mut room = Vec::with_capacity(self.buf.len() - self.pos + n);
        room.extend_from_slice(self.pending());
        self.buf = room;
        self.pos = 0;
    }

    /// Gives the connection a buffer to read into next (one a write handed back), when it holds
    /// none of its own: a relay's buffers go back and forth instead of being made anew.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.buf.capacity() == 0 && self.tls.is_none() {
            buf.clear();
            self.buf = buf;
            self.pos = 0;
        }
    }

    /// Reads more bytes; 0 at end of stream. Times out with [`HttpError::Timeout`], after which
    /// nothing more is read from this connection (its read side is shut down; a response can
    /// still be written). Dropping the future midway has the same effect.
    pub async fn fill(&mut self, timeout: Duration) -> Result<usize, HttpError> {
        self.fill_by(crate::clock::deadline(timeout)).await
    }

    /// [`Io::fill`] within `deadline`.
    async fn fill_by(&mut self, deadline: monoio::time::Instant) -> Result<usize, HttpError> {
        if self.read_lost {
            return Err(HttpError::Closed);
        }
        if self.tls.is_some() {
            return self.fill_tls(deadline).await;
        }
        self.compact();
        // The buffer goes into the read; until it comes back the connection counts as lost
        // (and `pending()` is empty rather than out of bounds), in case this future is dropped.
        let buf = std::mem::take(&mut self.buf);
        let pos = std::mem::take(&mut self.pos);
        self.read_lost = true;
        let len = buf.len();
        let cap = buf.capacity();
        match within(deadline, self.stream.read(buf.slice_mut(len..cap))).await {
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

    /// [`Io::fill`] for a connection waiting for its peer's next message, which may be long
    /// in coming: after [`IDLE_GRACE`] the pending read is cancelled (bytes it took are kept),
    /// the buffers are given back, and the wait goes on for readiness alone, holding no buffer.
    /// The same answers as `fill` (a timeout shuts the read side down).
    pub async fn fill_idle(&mut self, timeout: Duration) -> Result<usize, HttpError> {
        if self.read_lost {
            return Err(HttpError::Closed);
        }
        let held = !self.pending().is_empty()
            || self.raw_pos < self.raw.len()
            || self
                .tls
                .as_deref()
                .is_some_and(|t| t.wants_write() || t.is_handshaking());
        // The rare and the later paths are boxed: this future is what an idle connection's
        // task holds while it waits, so only the readiness wait below is kept in it.
        if held || timeout <= IDLE_GRACE {
            return Box::pin(self.fill(timeout)).await;
        }
        // Plaintext rustls decrypted already (a second request that came with the first).
        if self.tls.is_some()
            && let Some(r) = self.take_plaintext()
        {
            return r;
        }
        let deadline = crate::clock::deadline(timeout);
        // Boxed: the pending read's state would otherwise stay in the task of every idle
        // connection. One allocation per request instead.
        match Box::pin(self.read_for(IDLE_GRACE)).await? {
            None => {}
            Some(n) if self.tls.is_none() => return Ok(n),
            // Records (or the end of the stream) arrived: rustls makes plaintext of them.
            Some(_) => return Box::pin(self.fill_tls(deadline)).await,
        }
        self.release_buffers();
        IDLE_RELEASES.set(IDLE_RELEASES.get() + 1);
        // The idle timeout is an entry in the worker's table of idle deadlines, not a timer of
        // its own (which, boxed or inline, was most of an idle connection's memory).
        let ready = monoio::select! {
            r = self.stream.readable(false) => Some(r),
            () = super::deadline::Deadline::new(deadline) => None,
        };
        match ready {
            None => {
                self.shutdown(libc::SHUT_RD);
                Err(HttpError::Timeout)
            }
            Some(Err(_)) => Err(HttpError::Closed),
            Some(Ok(())) => Box::pin(self.fill_until(deadline)).await,
        }
    }

    /// One read from the socket into the buffer it fills (records for TLS), cancelled after
    /// `grace`: `None` if nothing came by then. A cancelled read gives its buffer back (and
    /// what it took, if the bytes won the race), so the connection stays usable.
    async fn read_for(&mut self, grace: Duration) -> Result<Option<usize>, HttpError> {
        use monoio::io::CancelableAsyncReadRent as _;
        let tls = self.tls.is_some();
        // Nothing is pending in either buffer here: each read starts at its beginning.
        if self.pending().is_empty() {
            self.buf.clear();
            self.pos = 0;
        }
        if self.raw_pos == self.raw.len() {
            self.raw.clear();
            self.raw_pos = 0;
        }
        let target = if tls { &mut self.raw } else { &mut self.buf };
        if target.capacity() - target.len() < READ_CHUNK / 2 {
            target.reserve(READ_CHUNK);
        }
        let buf = std::mem::take(target);
        let (len, cap) = (buf.len(), buf.capacity());
        // Lost until the buffer comes back, in case this future is dropped.
        self.read_lost = true;
        let canceller = monoio::io::Canceller::new();
        let read = self
            .stream
            .cancelable_read(buf.slice_mut(len..cap), canceller.handle());
        let mut read = std::pin::pin!(read);
        let (result, slice) = monoio::select! {
            r = &mut read => r,
            () = super::deadline::Deadline::new(monoio::time::Instant::now() + grace) => {
                let _canceller = canceller.cancel();
                read.await
            }
        };
        let buf = slice.into_inner();
        if tls {
            self.raw = buf;
        } else {
            self.buf = buf;
        }
        match result {
            Ok(n) => {
                self.read_lost = false;
                Ok(Some(n))
            }
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                self.read_lost = false;
                Ok(None)
            }
            Err(_) => Err(HttpError::Closed),
        }
    }

    /// Gives the read buffers back to the allocator when they hold nothing pending (an idle
    /// connection, a pooled upstream connection); the next read takes a new one.
    pub fn release_buffers(&mut self) {
        if self.pending().is_empty() {
            self.buf = Vec::new();
            self.pos = 0;
        }
        if self.raw_pos == self.raw.len() {
            self.raw = Vec::new();
            self.raw_pos = 0;
        }
    }

    /// Drops consumed bytes once they are half the buffer, and keeps room for a read.
    fn compact(&mut self) {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
    }

    /// [`Io::fill`] against a deadline.
    pub async fn fill_until(
        &mut self,
        deadline: monoio::time::Instant,
    ) -> Result<usize, HttpError> {
        if monoio::time::Instant::now() >= deadline {
            return Err(HttpError::Timeout);
        }
        self.fill_by(deadline).await
    }

    /// Resolves once the peer has closed its side (or the socket failed), without consuming
    /// anything: bytes the peer sends meanwhile (a pipelined request) stay for the next read.
    /// Used to notice a client that gives up while the gateway waits on the upstream, which is
    /// how a client cancels in 2026-07-28.
    pub async fn peer_gone(&self) {
        loop {
            if self.stream.readable(false).await.is_err() {
                return;
            }
            // TLS records cannot be looked into without taking them, and a peek at plain
            // bytes waiting (a pipelined request) cannot see past them to a close: either
            // way a close shows as a hang-up. Readiness stays raised while bytes wait, so
            // look again later.
            if self.tls.is_none() {
                match self.peek() {
                    Peek::Closed => return,
                    Peek::Nothing => continue,
                    Peek::Data => {}
                }
            }
            if self.hung_up() {
                return;
            }
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// For an idle connection: nothing pending, nothing lost, and the peer has neither closed it
    /// nor sent anything. Only such a connection may carry another exchange: bytes an upstream
    /// sent after its answer would otherwise be read as the answer to the next request.
    pub fn idle_and_open(&mut self) -> bool {
        if !self.intact() {
            return false;
        }
        match self.peek() {
            Peek::Nothing => true,
            Peek::Data if self.tls.is_some() => self.absorb_idle_records(),
            _ => false,
        }
    }

    /// Nothing pending and no read or write abandoned (no system call).
    pub fn intact(&self) -> bool {
        !self.read_lost
            && !self.write_lost
            && self.pending().is_empty()
            && self.raw_pos == self.raw.len()
            && self.tls.as_deref().is_none_or(|t| !t.is_handshaking())
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
    /// A new request's answer begins: the next head written is its status.
    pub fn begin_response(&mut self) {
        self.status = 0;
        self.head_lines.clear();
    }

    /// Adds header lines (each `name: value\r\n`, already checked) to the head of the
    /// current answer, whoever writes it: a relayed upstream head, an event stream, a refusal.
    pub fn add_head_lines(&mut self, lines: &[u8]) {
        self.head_lines.extend_from_slice(lines);
    }

    /// The status of the answer's head, once written (0: none).
    pub fn response_status(&self) -> u16 {
        self.status
    }

    pub async fn write_all(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        // The first write of an answer is its head ("HTTP/1.1 200 ..."); later writes are body.
        if self.status == 0
            && let Some(code) = bytes
                .strip_prefix(b"HTTP/1.")
                .and_then(|rest| rest.get(2..5))
                .and_then(|c| std::str::from_utf8(c).ok())
                .and_then(|c| c.parse::<u16>().ok())
        {
            self.status = code;
            if !self.head_lines.is_empty() {
                let lines = std::mem::take(&mut self.head_lines);
                return self.write_out(super::cors::with_lines(bytes, &lines)).await;
            }
        }
        self.write_out(bytes).await
    }

    /// [`Io::write_all`] that gives the bytes back once written or refused (for a retry, or
    /// to read into next), unless the write was abandoned midway (then an empty buffer).
    pub async fn write_back(&mut self, bytes: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
        if self.tls.is_some() {
            let r = self.write_tls(&bytes).await;
            return (r, bytes);
        }
        self.write_raw_back(bytes).await
    }

    /// Sends a message built for a peer, head and body in one vectored write (the body is not
    /// copied), all of it within the send timeout (over TLS: each flush). Gives the message
    /// back once written or refused (for a retry), `None` when the write timed out: it may
    /// still have reached the peer whole, and must not be sent again.
    pub async fn send(&mut self, out: Outgoing) -> (std::io::Result<()>, Option<Outgoing>) {
        if self.tls.is_some() {
            let r = self.write_tls_parts(&[&out.head, &out.body]).await;
            let timed_out = r
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
            return (r, (!timed_out).then_some(out));
        }
        self.writev_all(out).await
    }

    /// Writes `data` as one chunk of a chunked body: its size line, the data and the line end
    /// in one vectored write (the data is not copied behind the size line). Gives the data
    /// back as [`Io::write_back`] does. `data` must not be empty (an empty chunk ends a body).
    pub async fn write_chunk_back(&mut self, data: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
        let chunk = Chunk::new(data);
        if self.tls.is_some() {
            let r = self.write_tls_parts(&chunk.parts()).await;
            return (r, chunk.data);
        }
        let (r, back) = self.writev_all(chunk).await;
        (r, back.map_or_else(Vec::new, |c| c.data))
    }

    /// Writes all of `out`'s parts by vectored writes, within the send timeout. Gives them back
    /// once written or refused, `None` when the write timed out (the operation that held them
    /// was abandoned).
    async fn writev_all<T: Parts>(&mut self, out: T) -> (std::io::Result<()>, Option<T>) {
        if self.write_lost {
            return (Err(std::io::ErrorKind::BrokenPipe.into()), Some(out));
        }
        // Lost until it completes, in case this future is dropped midway.
        self.write_lost = true;
        let deadline = crate::clock::deadline(self.send_timeout);
        let mut unsent = Unsent::new(out);
        loop {
            if unsent.done() {
                self.write_lost = false;
                return (Ok(()), Some(unsent.into_inner()));
            }
            match within(deadline, self.stream.writev(unsent)).await {
                Ok((Ok(n), back)) if n > 0 => {
                    unsent = back;
                    unsent.advance(n);
                }
                Ok((Err(e), back)) if e.kind() == std::io::ErrorKind::Interrupted => unsent = back,
                Ok((result, back)) => {
                    self.shutdown(libc::SHUT_RDWR);
                    let e = result
                        .err()
                        .unwrap_or_else(|| std::io::ErrorKind::WriteZero.into());
                    return (Err(e), Some(back.into_inner()));
                }
                Err(_) => {
                    self.shutdown(libc::SHUT_RDWR);
                    return (Err(std::io::ErrorKind::TimedOut.into()), None);
                }
            }
        }
    }

    async fn write_out(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        if self.tls.is_none() {
            return self.write_raw(bytes).await;
        }
        self.write_tls(&bytes).await
    }

    async fn write_tls(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_tls_parts(&[bytes]).await
    }

    /// Writes `parts`, one after the other, as TLS records: what rustls takes at a time (up to
    /// its buffer limit) is sent before the rest.
    async fn write_tls_parts(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        if self.write_lost || tls.is_handshaking() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let mut flushed = false;
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let Some(tls) = self.tls.as_deref_mut() else {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                };
                let n = tls.writer().write(rest)?;
                if n == 0 && flushed {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                rest = &rest[n..];
                flushed = false;
                if !rest.is_empty() {
                    // rustls's buffer is full: what it holds goes out first.
                    self.flush_tls().await?;
                    flushed = true;
                }
            }
        }
        self.flush_tls().await
    }

    /// Writes bytes to the socket as they are (records, when the connection carries TLS).
    async fn write_raw(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        self.write_raw_back(bytes).await.0
    }

    /// [`Io::write_raw`], giving the buffer back (empty when the write timed out: the
    /// operation that held it was abandoned).
    async fn write_raw_back(&mut self, bytes: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
        if self.write_lost {
            return (Err(std::io::ErrorKind::BrokenPipe.into()), bytes);
        }
        // Lost until it completes, in case this future is dropped midway.
        self.write_lost = true;
        let deadline = crate::clock::deadline(self.send_timeout);
        match within(deadline, self.stream.write_all(bytes)).await {
            Ok((Ok(_), back)) => {
                self.write_lost = false;
                (Ok(()), back)
            }
            Ok((Err(e), back)) => {
                self.shutdown(libc::SHUT_RDWR);
                (Err(e), back)
            }
            Err(_) => {
                self.shutdown(libc::SHUT_RDWR);
                (Err(std::io::ErrorKind::TimedOut.into()), Vec::new())
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
        self.read_body_within(kind, max, deadline, None).await
    }

    /// [`Self::read_body`], a body over [`super::budget::SMALL`] bytes read only with its
    /// share of `budget` (its length, or `max` when its length is not known), held until it
    /// is read. The time spent waiting for the share does not count against `deadline`.
    pub async fn read_body_within(
        &mut self,
        kind: BodyKind,
        max: usize,
        mut deadline: monoio::time::Instant,
        budget: Option<(&super::budget::Budget, &str)>,
    ) -> Result<Vec<u8>, HttpError> {
        let mut share = None;
        let over_small =
            async |share: &mut Option<_>, deadline: &mut monoio::time::Instant, bytes| {
                if let Some((budget, owner)) = budget
                    && share.is_none()
                {
                    let asked = monoio::time::Instant::now();
                    // Boxed: the wait is rare, and the future of every body read stays small.
                    *share = Some(Box::pin(budget.take(owner, bytes)).await);
                    *deadline += asked.elapsed();
                }
            };
        match kind {
            BodyKind::Length(n) => {
                if n > super::budget::SMALL {
                    over_small(&mut share, &mut deadline, n.min(max)).await;
                }
                // Room made at once for most bodies, instead of growing as they arrive. Capped:
                // a peer that announces a large body and sends nothing holds little.
                // The room is a little more than the body: a read's worth left free, so that
                // the last read does not make room by doubling the buffer.
                if self.pending().len() < n {
                    self.expect(
                        (n - self.pending().len()).min(max).min(EXPECT_MAX) + READ_CHUNK / 2,
                    );
                }
                while self.pending().len() < n {
                    // Full: room for the rest in one step (each growth copies what arrived),
                    // up to three times what arrived: a peer holds at most four times what
                    // it sent.
                    if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
                        let have = self.pending().len();
                        self.expect((n - have).min(3 * have.max(READ_CHUNK)) + READ_CHUNK / 2);
                    }
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
                    if out.len() > super::budget::SMALL {
                        over_small(&mut share, &mut deadline, max).await;
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
                if self.pending().len() > super::budget::SMALL {
                    over_small(&mut share, &mut deadline, max).await;
                }
                if self.fill_until(deadline).await? == 0 {
                    let n = self.pending().len();
                    return Ok(self.take(n));
                }
            },
        }
    }
}

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    /// The peer closed, or the socket failed, first.
    Closed,
    /// The deadline passed first.
    Timeout,
    /// The peer broke the protocol or failed verification (the alert was sent).
    Tls(rustls::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("the peer closed the connection during the TLS handshake"),
            Self::Timeout => f.write_str("the TLS handshake timed out"),
            Self::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

/// TLS: records move between the socket and rustls here; rustls does the rest.
impl Io {
    /// Runs the handshake of `conn` (a client or server session) on this connection, within
    /// `deadline`; from then on every read and write goes through it. Bytes already read and
    /// not consumed are taken as the peer's first records. The send timeout is left as it was.
    pub async fn handshake(
        &mut self,
        conn: rustls::Connection,
        deadline: monoio::time::Instant,
    ) -> Result<(), HandshakeError> {
        // Bytes already read (after a PROXY protocol header, say) are the first records.
        let early = self.take(self.pending().len());
        self.raw.extend_from_slice(&early);
        self.tls = Some(Box::new(conn));
        let send_timeout = self.send_timeout;
        let result = self.drive_handshake(deadline).await;
        self.send_timeout = send_timeout;
        result
    }

    async fn drive_handshake(
        &mut self,
        deadline: monoio::time::Instant,
    ) -> Result<(), HandshakeError> {
        loop {
            let Some(tls) = self.tls.as_deref_mut() else {
                return Err(HandshakeError::Closed);
            };
            let left = deadline.saturating_duration_since(monoio::time::Instant::now());
            if left.is_zero() {
                return Err(HandshakeError::Timeout);
            }
            if tls.wants_write() {
                self.send_timeout = left;
                self.flush_tls().await.map_err(|e| match e.kind() {
                    std::io::ErrorKind::TimedOut => HandshakeError::Timeout,
                    _ => HandshakeError::Closed,
                })?;
                continue;
            }
            if !tls.is_handshaking() {
                return Ok(());
            }
            if self.raw_pos == self.raw.len() {
                match self.read_raw(deadline).await {
                    Ok(0) => return Err(HandshakeError::Closed),
                    Ok(_) => {}
                    Err(HttpError::Timeout) => return Err(HandshakeError::Timeout),
                    Err(_) => return Err(HandshakeError::Closed),
                }
            }
            let before = (self.raw_pos, self.raw.len());
            if let Err(e) = self.feed_tls() {
                // The alert rustls queued tells the peer why.
                self.send_timeout = left;
                let _ = self.flush_tls().await;
                return Err(HandshakeError::Tls(e));
            }
            // Nothing taken, nothing to send, still handshaking: this loop would spin (never
            // reached: see `feed_tls`).
            if (self.raw_pos, self.raw.len()) == before
                && self
                    .tls
                    .as_deref()
                    .is_some_and(|t| t.is_handshaking() && !t.wants_write())
            {
                return Err(HandshakeError::Closed);
            }
        }
    }

    /// The TLS session, when the connection carries one (for its SNI, ALPN, peer certificates).
    pub fn tls(&self) -> Option<&rustls::Connection> {
        self.tls.as_deref()
    }

    /// [`Io::fill`] on a TLS connection: decrypted bytes already held come first, then records
    /// already read, then the socket.
    async fn fill_tls(&mut self, deadline: monoio::time::Instant) -> Result<usize, HttpError> {
        // Records fed that gave nothing to take, not even taking a byte: fed again they would
        // give nothing again (never reached: see `feed_tls`; a loop that never awaits would
        // stop the worker).
        let mut stalled = false;
        loop {
            if let Some(r) = self.take_plaintext() {
                return r;
            }
            if self.raw_pos < self.raw.len() {
                let before = (self.raw_pos, self.raw.len());
                if stalled || self.feed_tls().is_err() {
                    let _ = self.flush_tls().await;
                    self.shutdown(libc::SHUT_RDWR);
                    return Err(HttpError::Closed);
                }
                stalled = (self.raw_pos, self.raw.len()) == before;
                continue;
            }
            // A record that asked for an answer (a key update) is answered before waiting.
            if self.tls.as_deref().is_some_and(|t| t.wants_write())
                && self.flush_tls().await.is_err()
            {
                return Err(HttpError::Closed);
            }
            if self.read_raw(deadline).await? == 0 {
                // End of stream: rustls tells a clean close (close_notify) from a cut one.
                if let Some(tls) = self.tls.as_deref_mut() {
                    let _ = tls.read_tls(&mut &[][..]);
                }
                return match self.take_plaintext() {
                    Some(r) => r,
                    None => Err(HttpError::Closed),
                };
            }
        }
    }

    /// Moves decrypted bytes from rustls into the buffer: `None` when it holds none yet;
    /// `Some(Ok(0))` once the peer closed cleanly; an error when it closed without close_notify
    /// (a truncation: the bytes so far are not a whole message).
    fn take_plaintext(&mut self) -> Option<Result<usize, HttpError>> {
        self.compact();
        let tls = self.tls.as_deref_mut()?;
        let len = self.buf.len();
        // The window rustls copies into is zeroed first: only as much as it holds (one byte
        // when it holds none, to learn whether the peer closed), and one read's worth at most
        // (the buffer may have grown for a large body).
        let held = tls
            .process_new_packets()
            .map_or(READ_CHUNK, |s| s.plaintext_bytes_to_read());
        let room = (self.buf.capacity() - len).min(READ_CHUNK).min(held.max(1));
        self.buf.resize(len + room, 0);
        let read = tls.reader().read(&mut self.buf[len..]);
        match read {
            Ok(n) => {
                self.buf.truncate(len + n);
                Some(Ok(n))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.buf.truncate(len);
                None
            }
            Err(_) => {
                self.buf.truncate(len);
                Some(Err(HttpError::Closed))
            }
        }
    }

    /// Hands records read from the socket to rustls, as many as it takes. Returns having
    /// taken every byte, or with plaintext to take first (rustls's buffer of it is full), or
    /// with an error: its callers loop until the bytes are taken, and a return with neither
    /// kept a worker spinning for good (a handshake message of 64 KiB, more than rustls buffers,
    /// left bytes it would never take: an attacker's review, from one unauthenticated client
    /// or one answer of a hostile upstream).
    fn feed_tls(&mut self) -> Result<(), rustls::Error> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(());
        };
        while self.raw_pos < self.raw.len() {
            let mut rest = &self.raw[self.raw_pos..];
            match tls.read_tls(&mut rest) {
                // close_notify came: nothing after it is read.
                Ok(0) => {
                    self.raw_pos = self.raw.len();
                    break;
                }
                Ok(n) => self.raw_pos += n,
                Err(_) => {
                    let held = tls.process_new_packets()?.plaintext_bytes_to_read();
                    if held > 0 {
                        // Its plaintext buffer is full: that is taken first.
                        break;
                    }
                    // Its buffer of records is full with a message it cannot hold whole.
                    return Err(rustls::Error::InvalidMessage(
                        rustls::InvalidMessage::HandshakePayloadTooLarge,
                    ));
                }
            }
            tls.process_new_packets()?;
        }
        if self.raw_pos == self.raw.len() {
            self.raw.clear();
            self.raw_pos = 0;
        }
        Ok(())
    }

    /// Reads records from the socket into `raw`, within `deadline`.
    async fn read_raw(&mut self, deadline: monoio::time::Instant) -> Result<usize, HttpError> {
        if monoio::time::Instant::now() >= deadline {
            self.shutdown(libc::SHUT_RD);
            return Err(HttpError::Timeout);
        }
        if self.raw_pos == self.raw.len() {
            self.raw.clear();
            self.raw_pos = 0;
        }
        if self.raw.capacity() - self.raw.len() < READ_CHUNK / 2 {
            self.raw.reserve(READ_CHUNK);
        }
        let raw = std::mem::take(&mut self.raw);
        self.read_lost = true;
        let len = raw.len();
        let cap = raw.capacity();
        match within(deadline, self.stream.read(raw.slice_mut(len..cap))).await {
            Err(_) => {
                self.shutdown(libc::SHUT_RD);
                Err(HttpError::Timeout)
            }
            Ok((result, slice)) => {
                self.raw = slice.into_inner();
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

    /// Sends the records rustls has queued.
    async fn flush_tls(&mut self) -> std::io::Result<()> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut out)?;
        }
        if out.is_empty() {
            return Ok(());
        }
        self.write_raw(out).await
    }

    /// Takes, without waiting, records that arrived on an idle TLS connection (a TLS 1.3
    /// server sends session tickets after its first answer): whether the connection is still
    /// idle after them, that is, open and with nothing decrypted waiting. At most 16 KiB is
    /// taken (a server's tickets are a few hundred bytes): a peer that sends more is not idle.
    /// Unbounded, an upstream streaming tickets faster than they are decrypted kept the worker
    /// in this loop, serving nobody, for as long as it went on (an attacker's review: 7.8 s
    /// for an 8 s flood).
    fn absorb_idle_records(&mut self) -> bool {
        let Some(tls) = self.tls.as_deref_mut() else {
            return false;
        };
        let mut chunk = [0u8; 4096];
        for _ in 0..4 {
            // SAFETY: a non-blocking receive into a local buffer on a socket this Io owns.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                return false;
            }
            if n < 0 {
                return matches!(
                    std::io::Error::last_os_error().kind(),
                    std::io::ErrorKind::WouldBlock
                ) && matches!(tls.process_new_packets(), Ok(s) if s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed());
            }
            let mut rest = &chunk[..n.unsigned_abs()];
            while !rest.is_empty() {
                if !matches!(tls.read_tls(&mut rest), Ok(m) if m > 0) {
                    return false;
                }
                match tls.process_new_packets() {
                    Ok(s) if s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed() => {}
                    _ => return false,
                }
            }
        }
        false
    }

    /// Whether the peer has closed its side (or the socket failed), even with bytes still
    /// waiting to be read.
    fn hung_up(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor this Io owns, without waiting.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n < 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// On a TLS connection whose handshake completed, sends close_notify if the socket takes
    /// it at once (a clean end the peer can tell from a cut); never waits.
    fn close_notify(&mut self) {
        if self.write_lost {
            return;
        }
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        if tls.is_handshaking() {
            return;
        }
        tls.send_close_notify();
        let mut out = Vec::new();
        while tls.wants_write() {
            if tls.write_tls(&mut out).is_err() {
                return;
            }
        }
        // SAFETY: a non-blocking send of a local buffer on a socket this Io owns.
        unsafe {
            libc::send(
                self.stream.as_raw_fd(),
                out.as_ptr().cast(),
                out.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
}

#[cfg(test)]
#[path = "io_tests.rs"]
mod tests;
