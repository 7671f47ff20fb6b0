//! How many JSON values one message may hold when the gateway reads it into a tree
//! (`serde_json::Value`): a request, an answer read whole, a stdio server's line.
//!
//! Parsed, a value takes 32 bytes however few it was written in, so `[0,0,0,...]` grows
//! sixteen times: one 16 MiB list answer took about 550 MB of its worker for a moment (an
//! attacker's review), and a 4 MiB request re-read by a federation or a held session 128 MB.
//! A message holding more than [`MAX`] values is refused before it is parsed; a message of at
//! most twice as many bytes cannot hold more, so only larger ones are counted, one pass each.

/// The most values of one message: 32 MiB parsed, at least thirty times what an MCP server's
/// `tools/list` of a hundred tools holds.
pub const MAX: usize = 1 << 20;

/// What the pages of one list hold in all, for a list whose items are kept parsed across its
/// pages (a federation's merged list, a stdio child's tools read for pinning): at most
/// [`Pages::MAX_BYTES`] bytes and [`MAX`] values, as one message. Each page was bounded and
/// their sum was not: a member that answered 100 pages of 15 MiB grew the gateway to 6.4 GB for
/// one `tools/list`, and a stdio child's 16 MiB pages of zeros to 9 GB at its start (attackers'
/// reviews).
#[derive(Debug, Default)]
pub struct Pages {
    bytes: usize,
    values: usize,
}

impl Pages {
    /// The bytes of one list's pages in all.
    pub const MAX_BYTES: usize = 16 * 1024 * 1024;

    /// Counts `page` in; Err (why) once the pages are past either bound.
    pub fn add(&mut self, page: &[u8]) -> Result<(), String> {
        self.bytes = self.bytes.saturating_add(page.len());
        if self.bytes > Self::MAX_BYTES {
            return Err(format!(
                "the list's pages are over {} bytes in all",
                Self::MAX_BYTES
            ));
        }
        self.values += count(page, MAX.saturating_sub(self.values));
        if self.values > MAX {
            return Err(format!("the list's pages hold more than {MAX} JSON values"));
        }
        Ok(())
    }
}

/// What a byte is to [`within`]'s count.
const OTHER: u8 = 0;
/// Opens a value inside it, or follows one: `[`, `{`, `,`, `:`.
const OPENS: u8 = 1;
const QUOTE: u8 = 2;
const ESCAPE: u8 = 3;
/// A line's end, which no JSON string holds as it is.
const LINE: u8 = 4;

const CLASS: [u8; 256] = {
    let mut t = [OTHER; 256];
    t[b'[' as usize] = OPENS;
    t[b'{' as usize] = OPENS;
    t[b',' as usize] = OPENS;
    t[b':' as usize] = OPENS;
    t[b'"' as usize] = QUOTE;
    t[b'\\' as usize] = ESCAPE;
    t[b'\n' as usize] = LINE;
    t[b'\r' as usize] = LINE;
    t
};

/// Err (why) when `bytes` (JSON text, or an event stream of it) may hold more than [`MAX`]
/// values.
pub fn within(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() <= 2 * MAX || count(bytes, MAX) <= MAX {
        Ok(())
    } else {
        Err(format!("it holds more than {MAX} JSON values"))
    }
}

/// How many values `bytes` (JSON text, or an event stream of it) may hold, counted up to one
/// more than `most` (a count past it stops there). Counted are the bytes outside strings that
/// open or follow a value, and the first value: never fewer than there are, so no message of
/// more values passes. A string ends at its closing quote or at a line's end (an event
/// stream's field line, or text that is not JSON, cannot hide what follows as a string).
pub fn count(bytes: &[u8], most: usize) -> usize {
    let mut n = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        let class = CLASS[b as usize];
        if in_string {
            if escaped {
                escaped = false;
                if class != LINE {
                    continue;
                }
            }
            match class {
                QUOTE | LINE => in_string = false,
                ESCAPE => escaped = true,
                _ => {}
            }
        } else {
            match class {
                OPENS => {
                    n += 1;
                    if n > most {
                        return n;
                    }
                }
                QUOTE => in_string = true,
                _ => {}
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An array of `n - 1` zeros: `n` values, written in about 3 n bytes.
    fn values(n: usize) -> Vec<u8> {
        let mut v = b"[0".to_vec();
        for _ in 2..n {
            v.extend_from_slice(b", 0");
        }
        v.push(b']');
        v
    }

    #[test]
    fn a_message_of_up_to_max_values_passes_and_one_more_is_refused() {
        // Counted: both are over 2 MAX bytes.
        assert!(values(MAX).len() > 2 * MAX);
        assert!(within(&values(MAX)).is_ok());
        let e = within(&values(MAX + 1)).unwrap_err();
        assert!(e.contains("1048576"), "{e}");
        // The parse agrees on how many there are.
        let v: serde_json::Value = serde_json::from_slice(&values(MAX)).unwrap();
        assert_eq!(v.as_array().unwrap().len() + 1, MAX);
        assert_eq!(count(&values(MAX), usize::MAX), MAX);
        // Five values and two keys, a key counted as one (it is parsed into a string).
        assert_eq!(count(b"{\"a\": [1, {\"b\": \",[:{\"}]}", usize::MAX), 7);
        // Stops one past the most asked.
        assert_eq!(count(&values(MAX), 10), 11);
    }

    #[test]
    fn a_message_too_short_to_hold_more_is_not_counted() {
        // The densest writing: one byte a value and one between.
        let mut v = b"[0".to_vec();
        for _ in 2..MAX {
            v.extend_from_slice(b",0");
        }
        v.push(b']');
        assert!(v.len() <= 2 * MAX);
        assert!(within(&v).is_ok());
    }

    #[test]
    fn structure_inside_strings_is_not_counted_and_cannot_hide_structure_after_them() {
        // A long string full of commas is one value.
        let mut s = b"{\"a\":\"".to_vec();
        s.extend(std::iter::repeat_n(b',', 3 * MAX));
        s.extend_from_slice(b"\\\"\\\\\"}");
        assert!(within(&s).is_ok());
        serde_json::from_slice::<serde_json::Value>(&s).unwrap();
        // An event stream whose field line opens a quote it never closes: the data line
        // after it is counted all the same.
        let mut sse = b"event: \"\ndata: ".to_vec();
        sse.extend(values(MAX + 1));
        assert!(within(&sse).is_err());
        // Lines ended by CR alone too, and an escape just before the line's end.
        let mut sse = b"event: \"\\\rdata: ".to_vec();
        sse.extend(values(MAX + 1));
        assert!(within(&sse).is_err());
    }

    #[test]
    fn pages_are_bounded_in_all() {
        let mut pages = Pages::default();
        // Two pages of 600,000 values, each uncounted alone.
        let page = values(600_000);
        assert!(within(&page).is_ok());
        pages.add(&page).unwrap();
        let e = pages.add(&page).unwrap_err();
        assert!(e.contains("more than 1048576 JSON values"), "{e}");
        // And in bytes: text of few values.
        let mut pages = Pages::default();
        let text = format!("[\"{}\"]", "x".repeat(6 << 20));
        pages.add(text.as_bytes()).unwrap();
        pages.add(text.as_bytes()).unwrap();
        let e = pages.add(text.as_bytes()).unwrap_err();
        assert!(e.contains("bytes in all"), "{e}");
    }

    #[test]
    fn nesting_counts_every_level() {
        let n = MAX + 1;
        let mut v = vec![b'['; n];
        v.extend(std::iter::repeat_n(b']', n));
        assert!(within(&v).is_err());
        let mut o = Vec::new();
        for _ in 0..n {
            o.extend_from_slice(b"{\"a\":");
        }
        assert!(within(&o).is_err());
    }
}
