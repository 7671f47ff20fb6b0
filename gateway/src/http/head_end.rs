//! When a message head may be complete. A head is parsed once its end can be there, not again
//! after every read: re-parsing from the start after each read is quadratic for a head that
//! arrives a few bytes at a time.

/// Tracks where the search for a head's end stopped.
#[derive(Debug, Default)]
pub struct HeadEnd {
    /// Bytes already searched; `None` before the first look.
    searched: Option<usize>,
}

impl HeadEnd {
    /// Whether `head` (the bytes of a head so far, from its first byte; it only grows between
    /// calls) may now hold a complete head: on the first look (so that a malformed start is
    /// refused at once), then only once an empty line (`\n\n` or `\n\r\n`, the end of a head)
    /// has arrived. Only new bytes are searched, and the two before them.
    pub fn may_be_complete(&mut self, head: &[u8]) -> bool {
        let Some(searched) = self.searched.replace(head.len()) else {
            return true;
        };
        let Some(new) = head.get(searched.saturating_sub(2)..) else {
            // Not the same head (it shrank): look.
            return true;
        };
        new.iter().enumerate().any(|(i, b)| {
            *b == b'\n'
                && match new.get(i + 1) {
                    Some(b'\n') => true,
                    Some(b'\r') => new.get(i + 2) == Some(&b'\n'),
                    _ => false,
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trickled_head_is_looked_at_first_and_once_complete() {
        for head in [
            &b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\n\r\n"[..],
            b"GET / HTTP/1.1\nhost: gw\n\n",
            b"GET / HTTP/1.1\nhost: gw\n\r\n",
        ] {
            for piece in 1..=4 {
                let mut end = HeadEnd::default();
                let mut looks = Vec::new();
                let mut at = 0;
                while at < head.len() {
                    at = (at + piece).min(head.len());
                    if end.may_be_complete(&head[..at]) {
                        looks.push(at);
                    }
                }
                assert_eq!(
                    looks,
                    [piece.min(head.len()), head.len()],
                    "{:?} in pieces of {piece}",
                    String::from_utf8_lossy(head)
                );
            }
        }
    }

    #[test]
    fn the_search_is_linear() {
        // A 1 MiB head trickled 8 bytes at a time: the search looks at each byte a few times.
        let line = b"x-filler: 0123456789abcdef\r\n";
        let head: Vec<u8> = line.repeat((1 << 20) / line.len());
        let mut end = HeadEnd::default();
        let started = std::time::Instant::now();
        let mut at = 0;
        while at < head.len() {
            at = (at + 8).min(head.len());
            assert!(!end.may_be_complete(&head[..at]) || at == 8);
        }
        // Quadratic, it takes minutes; linear, well under a second even unoptimised.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
