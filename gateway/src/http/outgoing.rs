//! A message on its way to a peer: a head the gateway built and a body it received, sent
//! together by one vectored write ([`super::Io::send`]) so that a large body is never copied
//! behind the head. The body is shared ([`Bytes`]): the request that carried it keeps it.

use bytes::Bytes;

/// Not `Debug`: its head carries the upstream's credentials.
pub struct Outgoing {
    pub head: Vec<u8>,
    pub body: Bytes,
}

impl Outgoing {
    /// All of it, head and body, as one buffer.
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.head.len() + self.body.len());
        all.extend_from_slice(&self.head);
        all.extend_from_slice(&self.body);
        all
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A chunk of a chunked body on its way: its size line, its data and the line end after it,
/// sent by one vectored write ([`super::Io::write_chunk_back`]), so that a large piece (a 1 MB
/// event) is not copied behind its size line.
pub(super) struct Chunk {
    /// The size line (hex digits and CRLF). On the heap: the vectors point at it, and this
    /// value moves into the write.
    line: Vec<u8>,
    pub(super) data: Vec<u8>,
}

impl Chunk {
    /// `data` must not be empty (a chunk of size 0 ends the body).
    pub(super) fn new(data: Vec<u8>) -> Self {
        Self {
            line: chunk_line(data.len()),
            data,
        }
    }
}

/// The size line of a chunk of `len` bytes.
fn chunk_line(len: usize) -> Vec<u8> {
    let mut line = Vec::with_capacity(20);
    push_chunk_line(&mut line, len);
    line
}

/// Adds the size line of a chunk of `len` bytes (hex digits, CRLF) to `out`.
pub(super) fn push_chunk_line(out: &mut Vec<u8>, len: usize) {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(len >> (4 * i)) & 0xf]);
    }
    out.extend_from_slice(CHUNK_END);
}

/// The end of a chunk's data.
pub(super) const CHUNK_END: &[u8] = b"\r\n";

/// Bytes to write, as up to three parts one after the other.
pub(super) trait Parts: Unpin + 'static {
    fn parts(&self) -> [&[u8]; 3];
}

impl Parts for Outgoing {
    fn parts(&self) -> [&[u8]; 3] {
        [&self.head, &self.body, &[]]
    }
}

impl Parts for Chunk {
    fn parts(&self) -> [&[u8]; 3] {
        [&self.line, &self.data, CHUNK_END]
    }
}

/// What of an [`Outgoing`] (or a [`Chunk`]) is not written yet, as the vectors of one
/// `writev`. The vectors are boxed: their address is what the ring is given, and it must not
/// move with this value.
pub(super) struct Unsent<T: Parts = Outgoing> {
    out: T,
    len: usize,
    written: usize,
    iov: Box<[libc::iovec; 3]>,
    count: usize,
}

impl<T: Parts> Unsent<T> {
    pub(super) fn new(out: T) -> Self {
        let len = out.parts().iter().map(|p| p.len()).sum();
        let mut u = Self {
            out,
            len,
            written: 0,
            iov: Box::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 3],
            ),
            count: 0,
        };
        u.aim();
        u
    }

    /// Marks `n` more bytes written.
    pub(super) fn advance(&mut self, n: usize) {
        self.written = (self.written + n).min(self.len);
        self.aim();
    }

    pub(super) fn done(&self) -> bool {
        self.written == self.len
    }

    pub(super) fn into_inner(self) -> T {
        self.out
    }

    /// Points the vectors at what is left.
    fn aim(&mut self) {
        self.count = 0;
        let mut skip = self.written;
        for part in self.out.parts() {
            let whole = part.len();
            let part = &part[skip.min(whole)..];
            skip = skip.saturating_sub(whole);
            if !part.is_empty() {
                self.iov[self.count] = libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                };
                self.count += 1;
            }
        }
    }
}

// SAFETY: the vectors point into `out`'s parts: a `Vec` not touched while this value lives,
// `Bytes` (immutable) or a static, whose buffers do not move when this value moves; the array
// of vectors is boxed, so its address does not move either. `count` of them are set.
unsafe impl<T: Parts> monoio::buf::IoVecBuf for Unsent<T> {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.count
    }
}
