//! What an upstream's JSON-RPC answer says (a result, a tool that failed, an error), read as
//! its bytes stream by to the client: nothing is kept or copied, and an answer of any size is
//! read whole (a 1 MB result is classified as exactly as a 100-byte one).
//!
//! The scan follows the JSON's structure (strings, with their escapes, and nesting) and looks
//! at three places only: the top-level `error` (present and not `null`: an error), the
//! top-level `result` and, inside it, `isError` (`true`: the tool failed). Keys are compared
//! as a client reads them: escapes decoded (`"is\u0045rror"` is `isError`), and of two equal
//! keys the last one counts (as in Python, JavaScript and serde_json). Anything that is not a
//! JSON object, or does not end, reads as a result, as a parser that gave up would. It labels
//! metrics and breakers; what reaches the client is the upstream's bytes.

use super::messages::Answers;
use crate::stats::Outcome;

/// The value the scan waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    None,
    /// The value of the top-level `error`.
    Error,
    /// The value of the top-level `result`.
    Result,
    /// The value of `result.isError`.
    IsError,
    /// The value of the top-level `id` (any case of it).
    Id,
    /// The value of the top-level `method`.
    Method,
}

/// Longest key compared (`isError`); longer keys are none of the three.
const KEY: usize = 8;

/// Longest id read, as written (escapes and all); a longer one is taken for another request's.
/// Ids are the client's: a 300-character one was refused when this was 256 (a review).
const ID: usize = 16 * 1024;

/// A streaming classifier: [`AnswerScan::feed`] each piece, then [`AnswerScan::outcome`].
#[derive(Debug)]
pub struct AnswerScan {
    /// Containers open around the current byte.
    depth: u32,
    /// Bit `d`: the container at depth `d + 1` is an object (tracked for the first 64).
    objects: u64,
    in_string: bool,
    escaped: bool,
    /// The current string is a key.
    in_key: bool,
    /// The next string of the current object is a key.
    expect_key: bool,
    key: [u8; KEY],
    key_len: usize,
    /// The key held something that is compared as none of the three (too long, an escape of
    /// no ASCII character).
    key_odd: bool,
    /// Hex digits still to come of a key's `\uXXXX` escape, and the value so far.
    hex_left: u8,
    hex: u32,
    target: Target,
    /// The literal of the awaited value, as far as it came (`null`, `true`).
    lit: [u8; 5],
    lit_len: usize,
    in_lit: bool,
    /// Inside the top-level `result` object, at its own level.
    in_result: bool,
    /// The answer is not a JSON object.
    not_object: bool,
    started: bool,
    error: bool,
    /// The top level holds a `result`.
    result: bool,
    tool_error: bool,
    /// Top-level keys that read as `id` in some client (in any case: Go's `encoding/json`
    /// ignores it), and the last one's value as written, while and once it is read.
    ids: u8,
    id: Vec<u8>,
    in_id: bool,
    /// The id was not one [`AnswerScan::answers_another`] can compare: too long, or an object
    /// or array.
    id_odd: bool,
    /// Top-level `method` keys, and how many of their values are strings.
    methods: u8,
    method_strings: u8,
    /// A top-level key that reads as `result` or `error` in some client (any case).
    answer_key: bool,
    /// A byte JSON has only inside strings (past ASCII, or a control character other than
    /// whitespace) came outside one, or bytes after the top-level object: not one JSON value.
    odd: bool,
    /// [`AnswerScan::answers_another`]'s verdict on the one complete id, for the rule it was
    /// asked of: asked before every piece of a large answer, it reads the id once.
    id_verdict: std::cell::Cell<Option<(Answers, bool)>>,
}

impl Default for AnswerScan {
    fn default() -> Self {
        Self {
            depth: 0,
            objects: 0,
            in_string: false,
            escaped: false,
            in_key: false,
            expect_key: false,
            key: [0; KEY],
            key_len: 0,
            key_odd: false,
            hex_left: 0,
            hex: 0,
            target: Target::None,
            lit: [0; 5],
            lit_len: 0,
            in_lit: false,
            in_result: false,
            not_object: false,
            started: false,
            error: false,
            result: false,
            tool_error: false,
            ids: 0,
            id: Vec::new(),
            in_id: false,
            id_odd: false,
            methods: 0,
            method_strings: 0,
            answer_key: false,
            odd: false,
            id_verdict: std::cell::Cell::new(None),
        }
    }
}

/// The outcome of a whole answer.
pub fn classify(message: &[u8]) -> Outcome {
    scan(message).outcome()
}

/// A whole message, scanned.
pub fn scan(message: &[u8]) -> AnswerScan {
    let mut scan = AnswerScan::default();
    scan.feed(message);
    scan
}

impl AnswerScan {
    /// What the answer said: only once it ended (its top-level object closed).
    pub fn outcome(&self) -> Outcome {
        if self.not_object || !self.started || self.depth != 0 || self.in_string {
            Outcome::Ok
        } else if self.error {
            Outcome::RpcError
        } else if self.tool_error {
            Outcome::ToolError
        } else {
            Outcome::Ok
        }
    }

    /// Whether the whole of it was an answer: an object with a `result` or an `error` (not
    /// a notification, a request, nor nothing at all).
    pub fn is_answer(&self) -> bool {
        !self.not_object
            && self.started
            && self.depth == 0
            && !self.in_string
            && (self.result || self.error)
    }

    /// Whether, as far as it came, the answer answers a request `answers` does not allow: its top level
    /// names another id, or names one twice (parsers take the first or the last), or one it
    /// cannot compare. Read before each piece goes out, so that such an answer never reaches
    /// the client whole: a client matches an answer to its request by id, and one to another
    /// pending request (a `tools/list` the gateway filtered) would be taken for its answer. No
    /// id at all, and `null` (an error naming no request), answer no other request.
    pub fn answers_another(&self, answers: Answers) -> bool {
        // Not an object: a batch of answers (the TypeScript SDK's client takes each item of
        // an array as a message, matched by its id), lawful only on a batch's stream. An
        // array holding an answer to a pending `tools/list` the gateway had filtered showed
        // that client the hidden tools and an unpinned definition (an attacker's review).
        if self.not_object {
            return answers != Answers::Any;
        }
        if self.ids > 1 || self.id_odd {
            return true;
        }
        if self.ids == 0 || self.in_id {
            return false;
        }
        // One id, whole: its bytes change no more (a second id is caught above).
        if let Some((asked, verdict)) = self.id_verdict.get()
            && asked == answers
        {
            return verdict;
        }
        let verdict = match serde_json::from_slice::<serde_json::Value>(&self.id) {
            Ok(serde_json::Value::Null) => false,
            Ok(given) => !answers.allows_id(&given),
            Err(_) => true,
        };
        self.id_verdict.set(Some((answers, verdict)));
        verdict
    }

    /// Whether a client may read the message as a response (to the request its id names): it
    /// has a key that reads as `result` or `error`, or no one method that is a string (the
    /// Python SDK's client reads a message whose method is `null`, or a number, as a
    /// response; an attacker's review).
    pub fn response_like(&self) -> bool {
        self.answer_key || self.methods != 1 || self.method_strings != 1
    }

    /// Whether the message is not one JSON value as far as it came: bytes after its top-level
    /// object, or a byte outside its strings that JSON has only inside them (a character some
    /// clients end a line at, U+2028 say: [`super::messages`]).
    pub fn odd_outside_strings(&self) -> bool {
        self.odd || (self.not_object && self.started)
    }

    /// Whether a whole message on a stream is a response `answers` does not allow: what an
    /// event stream drops ([`super::messages::Answers`]). Read as [`AnswerScan::feed`] reads,
    /// one search per string: a 1 MB event is read at the speed of `memchr`.
    pub fn strays(&self, answers: Answers) -> bool {
        answers != Answers::Any && self.response_like() && self.answers_another(answers)
    }

    /// Bytes of the id's value as written.
    fn id_bytes(&mut self, bytes: &[u8]) {
        if !self.in_id || self.id_odd {
            return;
        }
        if self.id.len() + bytes.len() > ID {
            self.id_odd = true;
            return;
        }
        self.id.extend_from_slice(bytes);
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && self.depth <= 64 && self.objects & (1 << (self.depth - 1)) != 0
    }

    /// A value begins with `b` (not a literal's later bytes). A key given again replaces what
    /// its first value said.
    fn value_starts(&mut self, b: u8) {
        match self.target {
            Target::Error => self.error = b != b'n',
            Target::Result => {
                self.result = true;
                self.tool_error = false;
                self.in_result = b == b'{' && self.depth == 1;
            }
            Target::IsError => self.tool_error = false,
            Target::Id => {
                self.id_odd |= matches!(b, b'{' | b'[');
                self.id_bytes(&[b]);
            }
            Target::Method => {
                if b == b'"' {
                    self.method_strings = self.method_strings.saturating_add(1);
                }
            }
            Target::None => {}
        }
        if matches!(b, b'{' | b'[' | b'"') {
            self.target = Target::None;
        } else if self.target != Target::None {
            // A literal: `null` and `true` are told apart at its end.
            self.in_lit = true;
            self.lit_len = 0;
        }
    }

    fn end_literal(&mut self) {
        if self.target == Target::Id {
            self.in_id = false;
        }
        if self.in_lit {
            let lit = &self.lit[..self.lit_len];
            match self.target {
                Target::Error => self.error = lit != b"null",
                Target::IsError => self.tool_error = lit == b"true",
                _ => {}
            }
            self.in_lit = false;
        }
        self.target = Target::None;
    }

    fn end_key(&mut self) {
        let key = &self.key[..self.key_len];
        // As Go's `encoding/json` reads a key: in any case, and `ſ`, the Kelvin sign, dotless
        // and dotted i as `s`, `k`, `i` (`"\u{131}d": 8` answered request 8 to mcp-go's client).
        let go = |name: &str| {
            key.eq_ignore_ascii_case(name.as_bytes())
                || (!key.is_ascii()
                    && std::str::from_utf8(key).is_ok_and(|k| crate::keys::go_same_key(k, name)))
        };
        if self.depth == 1 && !self.key_odd && (go("result") || go("error")) {
            self.answer_key = true;
        }
        self.target = match (self.depth, self.key_odd) {
            (_, true) => Target::None,
            (1, false) if key == b"error" => Target::Error,
            (1, false) if key == b"result" => Target::Result,
            (1, false) if go("id") => {
                // Read until its value ends.
                self.ids = self.ids.saturating_add(1);
                self.id.clear();
                self.id_verdict.set(None);
                self.in_id = true;
                Target::Id
            }
            (1, false) if key == b"method" => {
                self.methods = self.methods.saturating_add(1);
                Target::Method
            }
            (2, false) if self.in_result && key == b"isError" => Target::IsError,
            _ => Target::None,
        };
    }

    /// Reads the next piece of the answer.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.in_string {
                if self.hex_left > 0 {
                    // A key's `\uXXXX`: its digits one by one (a byte that is none ends the
                    // escape and is read as usual: the JSON is not valid there).
                    let Some(digit) = (bytes[0] as char).to_digit(16) else {
                        self.hex_left = 0;
                        self.key_odd = true;
                        continue;
                    };
                    self.hex = self.hex * 16 + digit;
                    self.hex_left -= 1;
                    bytes = &bytes[1..];
                    if self.hex_left == 0 {
                        // A character as UTF-8 (`\u0131d` is `ıd`, which Go reads as `id`);
                        // a surrogate's half is no key compared (none folds to one).
                        match char::from_u32(self.hex) {
                            Some(c) => self.key_bytes(c.encode_utf8(&mut [0; 4]).as_bytes()),
                            None => self.key_odd = true,
                        }
                    }
                    continue;
                }
                if self.escaped {
                    self.escaped = false;
                    self.id_bytes(&[b'\\', bytes[0]]);
                    if self.in_key && !self.key_odd {
                        match bytes[0] {
                            b'u' => {
                                self.hex_left = 4;
                                self.hex = 0;
                            }
                            c @ (b'"' | b'\\' | b'/') => self.key_bytes(&[c]),
                            // A control character or not an escape: none of the three.
                            _ => self.key_odd = true,
                        }
                    }
                    bytes = &bytes[1..];
                    continue;
                }
                // Most of an answer is string contents: skipped in one search.
                let Some(at) = memchr::memchr2(b'"', b'\\', bytes) else {
                    self.key_bytes(bytes);
                    self.id_bytes(bytes);
                    return;
                };
                self.key_bytes(&bytes[..at]);
                self.id_bytes(&bytes[..at]);
                if bytes[at] == b'\\' {
                    self.escaped = true;
                } else {
                    self.in_string = false;
                    if self.in_key {
                        self.in_key = false;
                        self.end_key();
                    } else if self.in_id {
                        self.id_bytes(b"\"");
                        self.in_id = false;
                    }
                }
                bytes = &bytes[at + 1..];
                continue;
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            if self.not_object {
                return;
            }
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {
                    if self.in_lit {
                        self.end_literal();
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 0 {
                        if self.started || b != b'{' {
                            self.not_object = true;
                            return;
                        }
                        self.started = true;
                    } else {
                        self.value_starts(b);
                    }
                    if self.depth < 64 {
                        if b == b'{' {
                            self.objects |= 1 << self.depth;
                        } else {
                            self.objects &= !(1 << self.depth);
                        }
                    }
                    self.depth = self.depth.saturating_add(1);
                    self.expect_key = b == b'{';
                }
                b'}' | b']' => {
                    self.end_literal();
                    if self.depth == 0 {
                        self.not_object = true;
                        return;
                    }
                    if self.depth == 2 {
                        self.in_result = false;
                    }
                    self.depth -= 1;
                    self.expect_key = false;
                }
                b',' => {
                    self.end_literal();
                    self.expect_key = self.in_object();
                }
                b':' => {}
                b'"' => {
                    if self.depth == 0 {
                        self.not_object = true;
                        return;
                    }
                    self.in_string = true;
                    if self.expect_key && self.in_object() {
                        self.expect_key = false;
                        self.in_key = true;
                        self.key_len = 0;
                        self.key_odd = false;
                    } else {
                        self.value_starts(b);
                    }
                }
                _ => {
                    if self.depth == 0 {
                        self.not_object = true;
                        return;
                    }
                    if !(0x20..0x80).contains(&b) {
                        self.odd = true;
                    }
                    if !self.in_lit {
                        self.value_starts(b);
                    }
                    if self.in_lit {
                        if self.lit_len > 0 {
                            self.id_bytes(&[b]);
                        }
                        if self.lit_len < self.lit.len() {
                            self.lit[self.lit_len] = b;
                        }
                        // One past the buffer: `truex` is not `true`.
                        self.lit_len = (self.lit_len + 1).min(self.lit.len());
                    }
                }
            }
        }
    }

    /// Bytes of a string's contents: kept while they may be a key compared.
    fn key_bytes(&mut self, bytes: &[u8]) {
        if !self.in_key || self.key_odd || bytes.is_empty() {
            return;
        }
        if self.key_len + bytes.len() > KEY || self.depth > 2 {
            self.key_odd = true;
            return;
        }
        self.key[self.key_len..self.key_len + bytes.len()].copy_from_slice(bytes);
        self.key_len += bytes.len();
    }
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
