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

/// What of an [`Outgoing`] is not written yet, as the vectors of one `writev`. The vectors
/// are boxed: their address is what the ring is given, and it must not move with this value.
pub(super) struct Unsent {
    out: Outgoing,
    written: usize,
    iov: Box<[libc::iovec; 2]>,
    count: usize,
}

impl Unsent {
    pub(super) fn new(out: Outgoing) -> Self {
        let mut u = Self {
            out,
            written: 0,
            iov: Box::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2],
            ),
            count: 0,
        };
        u.aim();
        u
    }

    /// Marks `n` more bytes written.
    pub(super) fn advance(&mut self, n: usize) {
        self.written = (self.written + n).min(self.out.len());
        self.aim();
    }

    pub(super) fn done(&self) -> bool {
        self.written == self.out.len()
    }

    pub(super) fn into_inner(self) -> Outgoing {
        self.out
    }

    /// Points the vectors at what is left.
    fn aim(&mut self) {
        let head = &self.out.head[self.written.min(self.out.head.len())..];
        let body = &self.out.body[self.written.saturating_sub(self.out.head.len())..];
        self.count = 0;
        for part in [head, body] {
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

// SAFETY: the vectors point into `out`'s head (a `Vec` not touched while this value lives)
// and body (`Bytes`, immutable), whose heap buffers do not move when this value moves; the
// array of vectors is boxed, so its address does not move either. `count` of them are set.
unsafe impl monoio::buf::IoVecBuf for Unsent {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.count
    }
}
