//! The parser's copy of a large body, with long runs of plain text inside string values left
//! out: policy reads a message's envelope (id, method, tool name, `_meta`), not a 1 MB argument,
//! and simd-json's passes over every byte are most of a large request's cost.
//!
//! A run is the text between a string's quotes and escapes: bytes that are neither `"` nor `\`.
//! A run of [`Elision::long_run`] bytes or more in a string value (not a key) is checked here
//! for what the parser would check in it, a control character or invalid UTF-8, and replaced in
//! the copy by [`MARK`], the escape `\u0000`. Everything else is copied as it is: every key,
//! every escape, every byte outside strings. So the copy is valid JSON exactly when the body
//! is, and has the same structure and keys (duplicate keys are found in the copy as in the
//! body). Escapes are kept: a surrogate escape cut off from its pair by a run in the body is
//! cut off from it by the mark in the copy too.
//!
//! What the copy changes is the text of the strings that lost a run, and each of them decodes
//! with a U+0000 in it. The parser reads the message from the copy and, if any string it read
//! holds a U+0000, reads it again from the body itself ([`super::jsonrpc::Parser`]): a string
//! the gateway decides on is always the body's own.
//!
//! Where the body is not JSON, the copy need not fail the same way, only fail (every byte this
//! module does not read as string text it copies unchanged for simd-json to refuse): a refused
//! copy is read again from the body too, so that the refusal is the body's own.

use memchr::{memchr, memchr2};

/// What a left-out run becomes in the copy: an escape simd-json decodes to U+0000.
pub const MARK: &[u8] = br"\u0000";

/// When runs are left out: bodies from `from` bytes, runs from `long_run`.
#[derive(Debug, Clone, Copy)]
pub struct Elision {
    pub from: usize,
    pub long_run: usize,
}

impl Default for Elision {
    /// A small call is parsed as it came; a large body loses its runs of 256 bytes or more.
    fn default() -> Self {
        Self {
            from: 8 * 1024,
            long_run: 256,
        }
    }
}

impl Elision {
    /// Whether a body of `len` bytes is copied with runs left out.
    pub fn applies(&self, len: usize) -> bool {
        len >= self.from
    }

    /// Copies `body` to the end of `out`, each long run of a string value replaced by
    /// [`MARK`]. Returns whether a run was left out, or why the body is not JSON when a run
    /// left out is not string text. The copy is never longer than the body
    /// (`long_run >= MARK.len()`). The work is linear in the body's length, whatever it holds.
    pub fn copy(&self, body: &[u8], out: &mut Vec<u8>) -> Result<bool, &'static str> {
        let long_run = self.long_run.max(MARK.len());
        let mut copied = 0;
        let mut at = 0;
        let mut elided = false;
        // Searches left: a body of many short strings or escapes, where there is little to
        // leave out, is copied as it is from where they run out, at about twice the cost of a
        // plain copy in all.
        let mut steps = body.len() / 16 + 64;
        // Outside strings, a quote can only open one.
        while let Some(open) = memchr(b'"', &body[at..]).map(|i| at + i) {
            let Some(End {
                close,
                longest,
                plain,
            }) = string_end(body, open + 1, &mut steps)
            else {
                // Not closed (left for the parser to refuse), or no searches left.
                break;
            };
            at = close + 1;
            if longest < long_run || is_key(&body[at..]) {
                continue;
            }
            out.extend_from_slice(&body[copied..=open]);
            copied = close;
            // Without an escape, the string is one run: not searched again.
            let escapes = longest < close - open - 1;
            let mut p = open + 1;
            loop {
                let end = if escapes {
                    memchr2(b'"', b'\\', &body[p..close]).map_or(close, |i| p + i)
                } else {
                    close
                };
                let run = &body[p..end];
                if run.len() >= long_run {
                    if !plain {
                        check_text(run)?;
                    }
                    out.extend_from_slice(MARK);
                    elided = true;
                } else {
                    out.extend_from_slice(run);
                }
                if end == close {
                    break;
                }
                let escape = escape_len(body, end);
                out.extend_from_slice(&body[end..end + escape]);
                p = end + escape;
            }
        }
        out.extend_from_slice(&body[copied..]);
        Ok(elided)
    }
}

/// Where a string ends, as [`string_end`] finds it.
struct End {
    /// The closing quote.
    close: usize,
    /// The longest run.
    longest: usize,
    /// Every run is printable ASCII: no control character, no byte of a multi-byte character,
    /// so what [`check_text`] checks holds without reading the runs again.
    plain: bool,
}

/// The closing quote of the string whose text starts at `from`, its longest run and whether
/// its runs are plain. Escapes are stepped over by their length (`\uXXXX` six bytes, others
/// two); whether they are valid is the parser's to say, as they stay in the copy. `None` if it
/// is not closed, or when it would take more than `steps` searches (each taken off).
fn string_end(body: &[u8], from: usize, steps: &mut usize) -> Option<End> {
    let mut p = from;
    let mut longest = 0;
    let mut plain = true;
    loop {
        *steps = steps.checked_sub(1)?;
        let (found, run_plain) = run_end(body.get(p..)?);
        let at = p + found?;
        plain &= run_plain;
        longest = longest.max(at - p);
        if body[at] == b'"' {
            return Some(End {
                close: at,
                longest,
                plain,
            });
        }
        p = at + escape_len(body, at);
    }
}

/// The first `"` or `\` in `text`, and whether every byte before it is printable ASCII. One
/// read of the text, where a search and then the two checks of a long run read it three times
/// (a 1 MB run is out of the core's own cache by then: each read went to memory). Compiled
/// twice: for AVX2, chosen when the CPU has it (as `memchr` chooses), 32 bytes to a vector
/// where the baseline (SSE2) has 16: half the instructions per byte of a large body.
fn run_end(text: &[u8]) -> (Option<usize>, bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above), all that `run_end_avx2` requires.
        return unsafe { run_end_avx2(text) };
    }
    run_end_in_blocks(text)
}

/// [`run_end`] with AVX2, 32 bytes to a vector and 128 to a step: the four vectors are searched
/// for a stop with one mask, and the least byte is kept as a signed one (0x20 to 0x7f are the
/// bytes at or above 0x20 read signed: a control character is below, a byte of a multi-byte
/// character negative), one minimum a vector where an unsigned least byte and an OR of every
/// byte took two. The block that stops is read by its mask (the stop's place, and the least of
/// the bytes before it), not byte by byte: a string of text with an escape every line stops
/// every few dozen bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_end_avx2(text: &[u8]) -> (Option<usize>, bool) {
    use std::arch::x86_64::{
        __m256i, _mm256_blendv_epi8, _mm256_cmpeq_epi8, _mm256_cmpgt_epi8, _mm256_loadu_si256,
        _mm256_min_epi8, _mm256_movemask_epi8, _mm256_or_si256, _mm256_set1_epi8,
    };
    /// Lanes before the stop: 32 of 0xff, then 32 of 0; read from `32 - i`, the first `i`.
    static BEFORE: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut i = 0;
        while i < 32 {
            t[i] = 0xff;
            i += 1;
        }
        t
    };
    const V: usize = 32;
    let len = text.len();
    // SAFETY (every load below): it reads the 32 bytes at `at`, with `at + 32 <= len` checked
    // before it; `BEFORE` is read at `32 - i` for `i < 32`.
    let load = |at: usize| unsafe { _mm256_loadu_si256(text.as_ptr().add(at).cast::<__m256i>()) };
    let quote = _mm256_set1_epi8(b'"' as i8);
    let escape = _mm256_set1_epi8(b'\\' as i8);
    let stops =
        |v: __m256i| _mm256_or_si256(_mm256_cmpeq_epi8(v, quote), _mm256_cmpeq_epi8(v, escape));
    let top = _mm256_set1_epi8(i8::MAX);
    let mut least = top;
    let plain = |least: __m256i| {
        _mm256_movemask_epi8(_mm256_cmpgt_epi8(_mm256_set1_epi8(0x20), least)) == 0
    };
    let mut at = 0;
    while at + 4 * V <= len {
        let (a, b, c, d) = (load(at), load(at + V), load(at + 2 * V), load(at + 3 * V));
        let any = _mm256_or_si256(
            _mm256_or_si256(stops(a), stops(b)),
            _mm256_or_si256(stops(c), stops(d)),
        );
        if _mm256_movemask_epi8(any) != 0 {
            break;
        }
        least = _mm256_min_epi8(
            least,
            _mm256_min_epi8(_mm256_min_epi8(a, b), _mm256_min_epi8(c, d)),
        );
        at += 4 * V;
    }
    if len < V {
        // Too short for a vector: byte by byte.
        return run_end_in_blocks(text);
    }
    while at < len {
        // The last vector ends at the text's end; the bytes it reads again were read
        // already (a minimum is the same for a byte read twice), and a stop among them
        // would have ended the search there.
        let from = at.min(len - V);
        let v = load(from);
        let mask = (_mm256_movemask_epi8(stops(v)) as u32) & (u32::MAX << (at - from));
        if mask != 0 {
            let i = mask.trailing_zeros() as usize;
            // SAFETY: see above (`i < 32`).
            let before =
                unsafe { _mm256_loadu_si256(BEFORE.as_ptr().add(V - i).cast::<__m256i>()) };
            least = _mm256_min_epi8(least, _mm256_blendv_epi8(top, v, before));
            return (Some(from + i), plain(least));
        }
        least = _mm256_min_epi8(least, v);
        at = from + V;
    }
    (None, plain(least))
}

/// [`run_end`], for whichever instructions its caller was compiled for (inlined into each).
/// Blocks of `LANES` bytes, each compared in one go; the least and the largest byte kept per
/// lane across blocks.
#[inline(always)]
fn run_end_in_blocks(text: &[u8]) -> (Option<usize>, bool) {
    const LANES: usize = 64;
    let mut least = [u8::MAX; LANES];
    let mut any = [0u8; LANES];
    let mut at = 0;
    for block in text.as_chunks::<LANES>().0 {
        let stop = block.iter().fold(0u8, |stop, &b| {
            stop | u8::from(b == b'"') | u8::from(b == b'\\')
        });
        if stop != 0 {
            break;
        }
        for ((l, a), &b) in least.iter_mut().zip(&mut any).zip(block) {
            *l = (*l).min(b);
            *a |= b;
        }
        at += LANES;
    }
    // Before any block, the least byte is 0xff and the largest 0: plain.
    let mut plain = least.iter().fold(u8::MAX, |m, &l| m.min(l)) >= 0x20
        && any.iter().fold(0, |m, &a| m | a) < 0x80;
    // The block that stops, or the last bytes.
    for (i, &b) in text[at..].iter().enumerate() {
        if b == b'"' || b == b'\\' {
            return (Some(at + i), plain);
        }
        plain &= (0x20..0x80).contains(&b);
    }
    (None, plain)
}

/// The length of the escape that starts with the backslash at `at`. The loops above stop at
/// the closing quote first, which `string_end` has found past every escape, so a `\uXXXX`
/// cut short is never indexed past the body.
fn escape_len(body: &[u8], at: usize) -> usize {
    if body.get(at + 1) == Some(&b'u') {
        6
    } else {
        2
    }
}

/// Whether the string just closed is a key: a colon follows it (after JSON whitespace).
fn is_key(after: &[u8]) -> bool {
    after
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        == Some(&b':')
}

/// What simd-json checks in plain string text: no control character (U+0000 to U+001F must be
/// escaped) and UTF-8. A run starts and ends at ASCII bytes, so runs valid one by one make
/// valid text together.
fn check_text(run: &[u8]) -> Result<(), &'static str> {
    // A fold the compiler vectorises (a byte-wise minimum), without an early exit.
    if run.iter().fold(u8::MAX, |least, &b| least.min(b)) < 0x20 {
        return Err("a control character in a string must be escaped");
    }
    simdutf8::basic::from_utf8(run).map_err(|_| "a string is not valid UTF-8")?;
    Ok(())
}

#[cfg(test)]
#[path = "elide_tests.rs"]
mod tests;
