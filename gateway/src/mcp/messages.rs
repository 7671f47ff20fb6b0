//! JSON-RPC messages inside upstream answers: the answer to a request found in a JSON or an SSE
//! body, an SSE event's data, a value set at a path, and the member tags a federation puts on
//! ids (`<upstream>.n.<id>`, `<upstream>.s.<id>`) and SSE event ids. Used by passthrough and
//! federation alike; nothing here does I/O.

use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};

use super::{Id, sse, upstream::ResponseHead};

pub fn response_message(
    head: &ResponseHead,
    body: &[u8],
    id: Option<&Id>,
) -> Result<Value, String> {
    if !(200..300).contains(&head.status) {
        return Err(format!("HTTP {}", head.status));
    }
    answer_and_notes(head, body, id).map(|(answer, _)| answer)
}

/// The response to request `id` in an upstream's answer body (plain JSON or an event
/// stream), with the notifications the stream carried before it, in order. The HTTP status
/// is the caller's business.
pub fn answer_and_notes(
    head: &ResponseHead,
    body: &[u8],
    id: Option<&Id>,
) -> Result<(Value, Vec<Value>), String> {
    let want = id.map_or(Value::Null, Id::to_json);
    let is_answer =
        |v: &Value| v["id"] == want && (v.get("result").is_some() || v.get("error").is_some());
    if !head.is_sse() {
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
        return if is_answer(&v) {
            one_meaning(&v)?;
            Ok((v, Vec::new()))
        } else {
            Err("the answer is not a JSON-RPC response to the request".into())
        };
    }
    let mut notes = Vec::new();
    for event in sse::split(body) {
        let Some(v) = event_data(event).and_then(|d| serde_json::from_slice::<Value>(&d).ok())
        else {
            continue;
        };
        if is_answer(&v) {
            one_meaning(&v)?;
            return Ok((v, notes));
        }
        if v.get("method").is_some() && v.get("id").is_none() {
            notes.push(v);
        }
    }
    Err("the event stream ended without the response".into())
}

/// An answer read whole is relayed as the gateway wrote it again, after it filtered or read
/// it: it must hold nothing a client reads otherwise. Go's `encoding/json` (mcp-go's client)
/// reads `re\u{17f}ult` as `result` and `Tools` as `tools`, so an answer holding one beside the
/// key the gateway filtered (or in its place) showed a Go client the tools the gateway hid and
/// the definition it had not pinned (an attacker's review). Refused: a key of the message that
/// Go reads as one of its envelope's, and two keys of its `result` Go reads as one.
pub(super) fn one_meaning(v: &Value) -> Result<(), String> {
    use super::jsonrpc::{TOP_KEYS, same_to_go, spelled_otherwise};
    let Some(o) = v.as_object() else {
        return Ok(());
    };
    if let Some((key, name)) = spelled_otherwise(o.keys().map(String::as_str), TOP_KEYS) {
        return Err(format!(
            "the answer holds the key {key:?}, which some clients (Go's encoding/json) read as {name:?}"
        ));
    }
    if let Some(r) = o.get("result").and_then(Value::as_object)
        && let Some((first, key)) = same_to_go(r.keys().map(String::as_str))
    {
        return Err(format!(
            "the answer's result holds the keys {first:?} and {key:?}, which some clients (Go's encoding/json) read as one"
        ));
    }
    Ok(())
}

/// Sets `v[path[0]][path[1]]... = new`, creating missing objects (and an absent body, `Null`).
/// A non-object on the way is left as it is: unlike `IndexMut`, this never panics, whatever
/// a client or an upstream sent.
pub fn set_in(v: &mut Value, path: &[&str], new: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for key in parents {
        if cur.is_null() {
            *cur = Value::Object(Map::new());
        }
        let Some(obj) = cur.as_object_mut() else {
            return;
        };
        cur = obj.entry(*key).or_insert(Value::Null);
    }
    if cur.is_null() {
        *cur = Value::Object(Map::new());
    }
    if let Some(obj) = cur.as_object_mut() {
        obj.insert((*last).to_owned(), new);
    }
}

/// The `result` of the answer to `id`; a JSON-RPC error becomes `Err`.
pub fn response_result(head: &ResponseHead, body: &[u8], id: Option<&Id>) -> Result<Value, String> {
    let mut v = response_message(head, body, id)?;
    // Taken out, not copied: a copy doubled the memory an upstream's answer holds (up to
    // 16 MiB of JSON, each `0,` of which is 32 bytes parsed).
    match v.get_mut("result").map(Value::take) {
        // Every result the gateway merges or rewrites is an object; anything else is a
        // malformed answer (and indexing into it would not be total).
        Some(r) if r.is_object() => Ok(r),
        Some(_) => Err("the answer's `result` is not an object".into()),
        None => Err(format!(
            "JSON-RPC error {}: {}",
            v["error"]["code"], v["error"]["message"]
        )),
    }
}

/// An event's lines, each without its line end (CRLF, LF or a lone CR).
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(event);
    std::iter::from_fn(move || {
        let buf = rest?;
        let Some(i) = memchr::memchr2(b'\r', b'\n', buf) else {
            rest = None;
            return Some(buf);
        };
        let end = if buf[i] == b'\r' && buf.get(i + 1) == Some(&b'\n') {
            i + 2
        } else {
            i + 1
        };
        rest = Some(&buf[end..]);
        Some(&buf[..i])
    })
}

/// A field line's value: `name` alone, or `name:` and the value (one space after the colon
/// is not part of it).
fn field<'l>(line: &'l [u8], name: &[u8]) -> Option<&'l [u8]> {
    let rest = line.strip_prefix(name)?;
    if rest.is_empty() {
        return Some(rest);
    }
    let rest = rest.strip_prefix(b":")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// Whether an event carries data (a client dispatches only those).
pub fn has_data(event: &[u8]) -> bool {
    lines(event).any(|l| field(l, b"data").is_some())
}

/// Whether an event sets the stream's last event id (an `id` field, not empty, without NUL,
/// which a client ignores): what a client resumes from.
pub fn has_id(event: &[u8]) -> bool {
    lines(event).any(sets_id)
}

/// Events as they came but for the value of each `id` field that sets the last event id
/// ([`has_id`]), which becomes `sign(value)`: what a passthrough client resumes from is then
/// bound to it (see `proxy::event_signer`). An id a client reads where this reads none (a line
/// split at a character only some clients end lines at) stays unsigned, and a resumption from
/// it is refused.
pub fn sign_event_ids(events: Vec<u8>, sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let body = events.strip_prefix(sse::BOM).unwrap_or(&events);
    if !lines(body).any(sets_id) {
        return events;
    }
    sign_set_ids(events, sign)
}

/// A line that sets the last event id ([`has_id`]).
fn sets_id(line: &[u8]) -> bool {
    field(line, b"id").is_some_and(|v| !v.is_empty() && !v.contains(&0))
}

/// [`sign_event_ids`] of events already known to set an id ([`EventsRead::id`]): the same
/// bytes, without the search that tells events that set none (which it would give back as
/// they are).
fn sign_set_ids(events: Vec<u8>, sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let body = events.strip_prefix(sse::BOM).unwrap_or(&events);
    let mut out = Vec::with_capacity(events.len() + 32);
    out.extend_from_slice(&events[..events.len() - body.len()]);
    let mut rest = body;
    while !rest.is_empty() {
        let (line, end) = match memchr::memchr2(b'\r', b'\n', rest) {
            Some(i) if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') => (i, i + 2),
            Some(i) => (i, i + 1),
            None => (rest.len(), rest.len()),
        };
        match field(&rest[..line], b"id") {
            Some(v) if sets_id(&rest[..line]) => {
                out.extend_from_slice(b"id: ");
                out.extend_from_slice(&sign(v));
            }
            _ => out.extend_from_slice(&rest[..line]),
        }
        out.extend_from_slice(&rest[line..end]);
        rest = &rest[end..];
    }
    out
}

/// What a client makes of whole events (as [`sse::split`] gives them), read in one pass over
/// their lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventsRead {
    /// Where the last event with data is (without its empty line).
    pub last_with_data: Option<std::ops::Range<usize>>,
    /// Whether an event sets the last event id ([`has_id`]).
    pub id: bool,
    /// Whether an event sets a reconnection time below [`MIN_RETRY_MS`] ([`raise_retry`]).
    pub low_retry: bool,
}

/// The least reconnection time (`retry:`) a client is given, in ms: an upstream's `retry: 0`
/// on a stream it ends at once had an SDK client reconnect through the gateway 1,900 times a
/// second (an attacker's review).
pub const MIN_RETRY_MS: u64 = 1000;
const MIN_RETRY: &[u8] = b"1000";

/// Whether `line` sets a reconnection time that is not plainly [`MIN_RETRY_MS`] or more (ASCII
/// digits alone, no leading zero). The specification has clients ignore any other value, but
/// the Python SDK reads it with `int()`, which takes `+0`, ` 0`, `0_0` and other digits (a
/// review found `retry: +0` passed as it came, and its client reconnecting at once).
fn low_retry(line: &[u8]) -> bool {
    field(line, b"retry").is_some_and(|v| {
        let plain = v.first().is_some_and(|d| (b'1'..=b'9').contains(d))
            && v.iter().all(u8::is_ascii_digit);
        !(plain
            && std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .is_none_or(|ms| ms >= MIN_RETRY_MS))
    })
}

/// `events` with each reconnection time below [`MIN_RETRY_MS`] raised to it.
pub fn raise_retry(events: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() + 8);
    let mut from = 0;
    for line in lines(events.strip_prefix(sse::BOM).unwrap_or(events)) {
        if low_retry(line) {
            let at = line.as_ptr() as usize - events.as_ptr() as usize;
            out.extend_from_slice(&events[from..at]);
            out.extend_from_slice(b"retry: ");
            out.extend_from_slice(MIN_RETRY);
            from = at + line.len();
        }
    }
    out.extend_from_slice(&events[from..]);
    out
}

/// Reads `events` as [`sse::split`], [`has_data`] and [`has_id`] would, in one pass.
pub fn read_events(events: &[u8]) -> EventsRead {
    let body = events.strip_prefix(sse::BOM).unwrap_or(events);
    let base = events.len() - body.len();
    let mut read = EventsRead::default();
    // The event being read: where it starts, where its last line ends, whether it has data.
    let mut start: Option<usize> = None;
    let mut end = 0;
    let mut data = false;
    for line in lines(body) {
        let at = line.as_ptr() as usize - body.as_ptr() as usize;
        if line.is_empty() {
            if let Some(from) = start.take()
                && data
            {
                read.last_with_data = Some(base + from..base + end);
            }
            data = false;
            continue;
        }
        start.get_or_insert(at);
        end = at + line.len();
        data |= field(line, b"data").is_some();
        read.id |= sets_id(line);
        read.low_retry |= low_retry(line);
    }
    if let Some(from) = start
        && data
    {
        read.last_with_data = Some(base + from..base + end);
    }
    read
}

/// An event's data: its data lines' values joined by LF, as a client reads it; `None` when it
/// has no data line. Borrowed when the event has one data line (a large answer's, as servers
/// write them).
pub fn event_data(event: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut data: Option<std::borrow::Cow<'_, [u8]>> = None;
    for line in lines(event) {
        if let Some(d) = field(line, b"data") {
            match &mut data {
                None => data = Some(d.into()),
                Some(joined) => {
                    let joined = joined.to_mut();
                    joined.push(b'\n');
                    joined.extend_from_slice(d);
                }
            }
        }
    }
    data
}

/// Whether a federation member's JSON answer answers request `id` and nothing else: one
/// response whose id is `id` (or null, for an error: it names no other request), with none of
/// JSON-RPC's keys (`jsonrpc`, `id`, `method`, `result`, `error`) given twice. The body is relayed as it came, and parsers read a repeated
/// key differently (serde_json, `JSON.parse` and Python take the last, others the first): a
/// member that wrote `"id"` twice could answer another member's request to some clients.
pub fn answers_only(body: &[u8], id: Option<&Id>) -> bool {
    let Some(id) = id else {
        return true;
    };
    let Ok(top) = serde_json::from_slice::<Top>(body) else {
        return false;
    };
    if top.repeated || top.method {
        return false;
    }
    match top.id {
        Some(Value::Null) => top.error,
        Some(given) => same_id(&given, &id.to_json()),
        None => false,
    }
}

/// Whether `events` (whole SSE events) hold the response to request `id` (its result or its
/// error; a message with a method is a request or notification, not it).
pub fn events_answer(events: &[u8], id: &Value) -> bool {
    sse::split(events)
        .filter_map(event_data)
        .filter_map(|data| serde_json::from_slice::<Top>(&data).ok())
        .any(|top| {
            top.response_like() && !top.repeated && top.id.as_ref().is_some_and(|t| same_id(t, id))
        })
}

/// Which JSON-RPC responses an event stream may carry to the client. Clients match a response
/// to their request by id, on whatever stream it comes (the SDKs' clients open the session's GET
/// stream themselves and read it beside every POST), so a response on a stream that does not
/// answer that request would be taken as the answer to another one: a `tools/list` the
/// gateway filtered and pinned, answered unfiltered and unpinned on the GET stream (an
/// attacker's review: a changed tool definition reached the client, and called, with nothing
/// held for approval; a tool denied to the tenant was listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// The response to one request, by its id's [`digest`].
    Only([u8; 8]),
    /// None: the session's own GET stream (MCP: a response goes on it only to resume a
    /// request's stream), and the stream of a message that is not a request.
    Nothing,
    /// Not checked: a batch's stream (it answers many ids), and a resume from an event id
    /// signed before event ids said which request their stream answers.
    Any,
}

impl Answers {
    /// For the stream of a request with id `id` (`None`: not a request).
    pub fn to(id: Option<&Value>) -> Self {
        id.map_or(Self::Nothing, |id| Self::Only(digest(id)))
    }

    /// What an event id carries of it, signed ([`super::proxy::event_signer`]).
    pub fn mark(self) -> [u8; 8] {
        match self {
            Self::Only(d) => d,
            Self::Nothing => NOTHING,
            Self::Any => ANY,
        }
    }

    /// The rule a signed event id's mark ([`Answers::mark`]) stands for.
    pub fn of_mark(mark: [u8; 8]) -> Self {
        match mark {
            NOTHING => Self::Nothing,
            ANY => Self::Any,
            d => Self::Only(d),
        }
    }

    /// Whether a response with id `id` (not `null`) may reach the client.
    pub fn allows_id(self, id: &Value) -> bool {
        match self {
            Self::Any => true,
            Self::Nothing => false,
            Self::Only(d) => digest(id) == d,
        }
    }

    /// Whether a message a client reads as `top` may reach it on this stream.
    fn allows(self, top: &Top) -> bool {
        let response = top.response_like() && top.id.as_ref().is_some_and(|id| !id.is_null());
        match (self, &top.id) {
            (Self::Any, _) => true,
            _ if top.repeated => false,
            (_, Some(id)) if response => self.allows_id(id),
            _ => true,
        }
    }
}

/// The marks of [`Answers::Nothing`] and [`Answers::Any`], which no digest is.
const NOTHING: [u8; 8] = [0; 8];
const ANY: [u8; 8] = [0xff; 8];

/// An id as clients compare ids: a string that is an integer in decimal, as an integer would be
/// written (`"7"`), is that integer (the Python SDK's client takes an answer with `"7"` for
/// request 7; a server that echoes ids as strings worked before streams were judged).
fn canonical_id(id: &Value) -> std::borrow::Cow<'_, Value> {
    if let Value::String(s) = id
        && let Some(n) = super::id::integer_of(s)
    {
        return std::borrow::Cow::Owned(Value::from(n));
    }
    std::borrow::Cow::Borrowed(id)
}

/// Whether two ids name the same request to a client ([`canonical_id`]).
pub fn same_id(a: &Value, b: &Value) -> bool {
    canonical_id(a) == canonical_id(b)
}

/// The first 8 bytes of the SHA-256 of an id as JSON, as [`canonical_id`] writes it (`1` and
/// `1.0` differ, as they do to a client).
fn digest(id: &Value) -> [u8; 8] {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(serde_json::to_vec(&canonical_id(id)).unwrap_or_default());
    let mut d = [0; 8];
    d.copy_from_slice(&hash[..8]);
    if d == NOTHING || d == ANY {
        d[0] ^= 1;
    }
    d
}

/// Whether an event's data may reach the client under `answers`: data that is not JSON a
/// client could read as a message passes (nothing is answered by it). An object is read by
/// [`super::answer::AnswerScan`], which follows its strings and nesting at the speed of
/// `memchr` (a 1 MB answer in one event is read once more, not parsed: parsing it tripled the
/// relay's instructions for it); its top-level keys are compared as clients compare them
/// (escapes decoded, `id`, `result` and `error` in any case, an `id` given twice). A batch is
/// read as [`Top`] reads each message, and one it cannot read is held to be a stray (a
/// client's parser may read it).
fn event_allowed(event: &[u8], answers: Answers) -> bool {
    event_judged(event, answers, false)
}

/// [`event_allowed`]; `escaping`: the caller writes the event's data again with U+0085, U+2028
/// and U+2029 escaped (a federation's rewrite), so that no client reads a line in it.
fn event_judged(event: &[u8], answers: Answers, escaping: bool) -> bool {
    if answers == Answers::Any {
        return true;
    }
    // An event that starts with a byte order mark (a field named `\u{feff}data`, which a client
    // ignores, unless the mark starts its stream: then it reads `data`) goes. Kept unread, it
    // became the first event a client saw once the strays before it were dropped, and its
    // data, a response to another request, reached the client (the fuzz target `federation`).
    if event.starts_with(sse::BOM) {
        return false;
    }
    // Some clients end a line at U+0085, U+2028, U+2029 and a few control characters too
    // (httpx-sse 0.4.0's `str.splitlines`, under the Python SDK before 1.10): where a line
    // the gateway reads as one field (`event: message\u{2028}data: {...}`) holds one, they
    // read a data line the gateway never saw (an attacker's review: a response to a pending
    // `tools/list`, on the GET stream, with the hidden tools). A field other than `data`
    // holding one goes; so does data that holds one where JSON cannot (outside a string:
    // `{...}\u{2028}\u{2028}data: {...}` is one notification here and two events there).
    let mut data: Option<std::borrow::Cow<'_, [u8]>> = None;
    for line in lines(event) {
        match field(line, b"data") {
            Some(d) => match &mut data {
                None => data = Some(d.into()),
                Some(joined) => {
                    let joined = joined.to_mut();
                    joined.push(b'\n');
                    joined.extend_from_slice(d);
                }
            },
            None if has_separator(line) => return false,
            None => {}
        }
    }
    let Some(data) = data else {
        return true;
    };
    // Data holding such a character goes unless it is one JSON value (then each is inside a
    // string, which holds no line end and no unescaped quote: what such a client reads after
    // it is no message). The scan below follows strings without reading JSON whole, so a
    // stray's own quotes could make a notification's "string" of it: `{...,"data":"` LS LS
    // `data: {stray}` (the third review), or LS LS at the end of one data line and the stray
    // on the next (the fourth), was one notification here and a response there.
    if !escaping && may_split(&data) && serde_json::from_slice::<IgnoredAny>(&data).is_err() {
        return false;
    }
    let json = data.trim_ascii_start();
    match json.first() {
        Some(b'{') => {
            let scan = super::answer::scan(json);
            !scan.odd_outside_strings() && !scan.strays(answers)
        }
        Some(b'[') => serde_json::from_slice::<Vec<Top>>(json)
            .is_ok_and(|all| all.iter().all(|top| answers.allows(top))),
        _ => !has_separator(json),
    }
}

/// Whether `bytes` holds a character some clients end a line at (U+0085, U+2028, U+2029 and
/// some controls: httpx-sse before 0.4.1 splits lines as Python's `str.splitlines` does). Every
/// event's data on passthrough is looked at, so it is one read of the bytes: blocks compared in
/// vectors for any byte that may start one, and only a block with such a byte looked at closely
/// (three `memchr` searches read a 1 MB event three times: 0.77 million instructions, a fifth
/// of relaying it). Compiled for AVX2 too, chosen when the CPU has it.
fn may_split(bytes: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above), all that `may_split_avx2` requires.
        return unsafe { may_split_avx2(bytes) };
    }
    may_split_in_blocks(bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn may_split_avx2(bytes: &[u8]) -> bool {
    may_split_in_blocks(bytes)
}

/// [`may_split`], for whichever instructions its caller was compiled for (inlined into each).
#[inline(always)]
fn may_split_in_blocks(bytes: &[u8]) -> bool {
    const LANES: usize = 256;
    // A byte that may start a separator: 0x0b to 0x1e (a few of them are), or the first byte
    // of U+0085 (0xc2) or of U+2028 and U+2029 (0xe2). Without an early exit, so that the
    // comparisons are made on whole vectors.
    let starts = |block: &[u8]| {
        block.iter().fold(false, |hit, &b| {
            hit | (b.wrapping_sub(0x0b) <= 0x1e - 0x0b) | (b == 0xc2) | (b == 0xe2)
        })
    };
    let splits_at = |at: usize| match bytes[at] {
        0x0b | 0x0c | 0x1c..=0x1e => true,
        0xc2 | 0xe2 => LINE_ENDS.iter().any(|s| bytes[at..].starts_with(s)),
        _ => false,
    };
    let (blocks, rest) = bytes.as_chunks::<LANES>();
    for (i, block) in blocks.iter().enumerate() {
        if starts(block) && (i * LANES..(i + 1) * LANES).any(splits_at) {
            return true;
        }
    }
    (bytes.len() - rest.len()..bytes.len()).any(splits_at)
}

/// [`may_split`], or a byte order mark (which one client strips at the start of a stream, so
/// that a field named after it is another field there).
fn has_separator(bytes: &[u8]) -> bool {
    may_split(bytes) || memchr::memmem::find(bytes, sse::BOM).is_some()
}

/// `events` (whole SSE events) without those whose data answers what `answers` does not allow
/// ([`Answers`]), each dropped one logged; as they came when none is.
pub fn without_strays(events: Vec<u8>, answers: Answers) -> Vec<u8> {
    if answers == Answers::Any || sse::split(&events).all(|e| event_allowed(e, answers)) {
        return events;
    }
    let mut out = Vec::with_capacity(events.len());
    for event in sse::split(&events) {
        if event_allowed(event, answers) {
            out.extend_from_slice(event);
            out.extend_from_slice(b"\n\n");
        } else {
            crate::throttled_warn!("event dropped: a response to no request this stream answers");
        }
    }
    out
}

/// Whether [`answers_only`] can read a body at all: a JSON object, within serde_json's depth,
/// whose strings and numbers a client's parser takes.
pub fn readable(body: &[u8]) -> bool {
    serde_json::from_slice::<Top>(body).is_ok()
}

/// Whether a body is or holds a JSON-RPC response to a request (an object with an id, not
/// `null`, and no method; or an array with one, which the TypeScript SDK's client reads item
/// by item: a review answered a notification with one): what an exchange that sent neither a
/// request nor a batch cannot be answered with. An error with a `null` id names no request.
pub fn is_a_response(body: &[u8]) -> bool {
    let response =
        |top: &Top| top.id.as_ref().is_some_and(|id| !id.is_null()) && top.response_like();
    if body.trim_ascii_start().first() == Some(&b'[') {
        // One it cannot read is held to be one (a client's parser may read it).
        return !serde_json::from_slice::<Vec<Top>>(body)
            .is_ok_and(|all| !all.iter().any(response));
    }
    serde_json::from_slice::<Top>(body).is_ok_and(|top| response(&top))
}

/// The top level of a JSON-RPC message as [`answers_only`] needs it: its id, whether it has
/// a method or an error, and whether a key JSON-RPC gives meaning to came twice (keys compared
/// as decoded, so an escaped `"i\u0064"` is `"id"`). Read on every small answer, so cheaply:
/// a key is borrowed unless it holds an escape, and the other values are read as a parser
/// reads them (UTF-8, escapes, numbers in range: see [`Checked`]) but not built.
struct Top {
    id: Option<Value>,
    method: bool,
    /// The method is a string: only then is the message a request or notification to a
    /// client (the Python SDK's reads one whose method is `null`, or a number, as a response).
    method_string: bool,
    error: bool,
    result: bool,
    repeated: bool,
}

impl Top {
    /// Whether a client may read it as a response: it has a `result` or an `error`, or no
    /// method it reads as one (an attacker's review: `"method": null` beside a `result` passed
    /// for a request here, and answered the client's pending `tools/list` there).
    fn response_like(&self) -> bool {
        self.result || self.error || !self.method_string
    }
}

/// Whether `key` is not one of JSON-RPC's keys but a client reads it as one: Go's
/// `encoding/json` (mcp-go's client) matches names ignoring case, with `ſ` as `s` and the
/// Kelvin sign as `k`, the last one given winning. `{"id":5,"result":{},"ID":7}` answered
/// request 5 here and request 7 there.
fn another_spelling(key: &str) -> bool {
    use super::jsonrpc::Name;
    const KEYS: [Name; 5] = [
        Name::new("jsonrpc"),
        Name::new("id"),
        Name::new("method"),
        Name::new("result"),
        Name::new("error"),
    ];
    if key.len() > 16 || key.is_ascii() && !key.bytes().any(|b| b.is_ascii_uppercase()) {
        return false;
    }
    super::jsonrpc::spelled_otherwise([key], &KEYS).is_some()
}

/// A key of the top level, decoded, borrowed from the body when it holds no escape.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(v.to_owned().into()))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// A value read whole as a JSON parser reads it, and nothing kept: serde_json decodes each
/// string (UTF-8, escapes, no lone surrogate) and each number (in range), which skipping a
/// value does not. The answer is held to the JSON a client's parser takes throughout.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Key<'de>>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

impl<'de> serde::Deserialize<'de> for Top {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Top;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON-RPC message (an object)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
                let mut top = Top {
                    id: None,
                    method: false,
                    method_string: false,
                    error: false,
                    result: false,
                    repeated: false,
                };
                // Which of JSON-RPC's keys came, one bit each: parsers read one given twice
                // differently (the first or the last), so it has two meanings. Another key
                // given twice means nothing to the answer's delivery.
                let mut seen = 0u8;
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    let bit = match key.as_ref() {
                        "id" => {
                            top.id = Some(map.next_value()?);
                            1
                        }
                        "method" => {
                            top.method = true;
                            top.method_string = map.next_value::<Value>()?.is_string();
                            2
                        }
                        other => {
                            map.next_value::<Checked>()?;
                            match other {
                                "error" => {
                                    top.error = true;
                                    4
                                }
                                "result" => {
                                    top.result = true;
                                    8
                                }
                                "jsonrpc" => 16,
                                other => {
                                    top.repeated |= another_spelling(other);
                                    0
                                }
                            }
                        }
                    };
                    top.repeated |= seen & bit != 0;
                    seen |= bit;
                }
                Ok(top)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A member's id as the client sees it.
pub fn tag(member: &str, id: &Value) -> Option<Value> {
    match id {
        Value::Number(n) => Some(json!(format!("{member}.n.{n}"))),
        Value::String(s) => Some(json!(format!("{member}.s.{s}"))),
        _ => None,
    }
}

/// The member and original id behind a tagged id. A number is read back as [`tag`] wrote it,
/// so that every number a member may use as an id (`1.5`, `1e3`, beyond `i64`) comes back.
pub fn untag(tagged: &str) -> Option<(&str, Value)> {
    let (member, rest) = tagged.split_once('.')?;
    let (kind, id) = rest.split_once('.')?;
    let id = match kind {
        "n" => Value::Number(id.parse::<serde_json::Number>().ok()?),
        "s" => json!(id),
        _ => return None,
    };
    Some((member, id))
}

/// Rewrites a member's SSE events for the client: its requests' ids and its event ids get the
/// member's tag. Only the fields a client reads (`data`, `id`, `event`, `retry`) are written,
/// with LF line ends; comments and other fields are dropped. An event is dropped whole when
/// the gateway could not tag what a client may read in it: data that is not one JSON object
/// (a lone surrogate serde refuses and `JSON.parse` reads, a batch), or a field holding a byte
/// order mark or a character some clients end lines at (Python's `splitlines`: VT, FF,
/// U+001C–U+001E, U+0085, U+2028, U+2029). Those three in data, valid JSON in a string, are
/// written escaped. A response `answers` does not allow is dropped too ([`Answers`]): clients
/// match answers by id across streams, so a member could otherwise answer a request the client
/// sent to another member, or one the gateway answers itself (a merged `tools/list`). Progress
/// on a stream that answers no request (the merged GET stream) is dropped: it could name the
/// token of a call sent to another member.
pub fn rewrite_events(member: &str, events: &[u8], answers: Answers) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() + 32);
    for event in sse::split(events) {
        if let Err(why) = rewrite_event(member, event, answers, &mut out) {
            crate::throttled_warn!(upstream = %member, "event dropped: {why}");
        }
    }
    out
}

/// The characters beyond ASCII that some clients end a line at, as UTF-8.
const LINE_ENDS: [&[u8]; 3] = [b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9"];

/// JSON with U+0085, U+2028 and U+2029 escaped (they can only be in its strings; the other
/// characters [`may_split`] finds cannot be in JSON unescaped).
fn escape_separators(json: Vec<u8>) -> Vec<u8> {
    if !may_split(&json) {
        return json;
    }
    let text = String::from_utf8_lossy(&json);
    text.replace('\u{85}', "\\u0085")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes()
}

/// Appends one rewritten event to `out`, or nothing when it has no field a client reads.
fn rewrite_event(
    member: &str,
    event: &[u8],
    answers: Answers,
    out: &mut Vec<u8>,
) -> Result<(), &'static str> {
    // Read as a client reads it (a key given twice, spelled another way): the check below
    // reads it as serde_json does, which takes the last of a key given twice.
    if !event_judged(event, answers, true) {
        return Err("a response to no request this stream answers");
    }
    let mut fields: Vec<(&[u8], &[u8])> = Vec::new();
    for line in lines(event) {
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if matches!(name, b"data" | b"id" | b"event" | b"retry") {
            if name != b"data" && has_separator(line) {
                return Err("a field holds a character some clients end a line at");
            }
            let value = if low_retry(line) { MIN_RETRY } else { value };
            fields.push((name, value));
        } else if has_separator(name) {
            return Err("a field name holds a character some clients end a line at");
        }
    }
    if fields.is_empty() {
        return Ok(());
    }
    // The data as a client reads it: the data fields' values joined by LF.
    let raw_data = fields
        .iter()
        .filter(|(name, _)| *name == b"data")
        .map(|(_, value)| *value)
        .collect::<Vec<_>>()
        .join(&b'\n');
    let raw_data = Some(raw_data).filter(|d| !d.is_empty());
    let mut data = match &raw_data {
        Some(d) if crate::values::within(d).is_err() => {
            return Err("its data holds more JSON values than the gateway parses");
        }
        Some(d) => match serde_json::from_slice::<Value>(d) {
            Ok(v @ Value::Object(_)) => Some(v),
            _ => return Err("its data is not a JSON object"),
        },
        None => None,
    };
    // Progress is about a request and goes on that request's stream: on the session's merged
    // stream a member's progress named the token of a call the client sent to another member,
    // and the client took it for that call's (an attacker's review).
    if answers == Answers::Nothing
        && data
            .as_ref()
            .is_some_and(|v| v["method"] == "notifications/progress")
    {
        return Err("progress on a stream that answers no request");
    }
    let mut changed = false;
    if let Some(v) = data.as_mut().filter(|v| v.get("method").is_some()) {
        if let Some(t) = v.get("id").and_then(|id| tag(member, id)) {
            set_in(v, &["id"], t);
            changed = true;
        }
        if v["method"] == "notifications/cancelled"
            && let Some(t) = tag(member, &v["params"]["requestId"])
        {
            set_in(v, &["params", "requestId"], t);
            changed = true;
        }
    }
    // Data as it came, unless it changed or holds a separator: then written once, escaped.
    let rewritten = match (&data, &raw_data) {
        (Some(v), Some(raw)) if changed || has_separator(raw) => {
            Some(escape_separators(super::json_bytes(v)))
        }
        _ => None,
    };
    let mut data_written = false;
    for (name, value) in fields {
        match (name, &rewritten) {
            (b"id", _) => {
                out.extend_from_slice(format!("id: {member}.").as_bytes());
                out.extend_from_slice(value);
            }
            (b"data", Some(json)) => {
                if data_written {
                    continue;
                }
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(json);
                data_written = true;
            }
            _ => {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                out.extend_from_slice(value);
            }
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    Ok(())
}

/// A session-era child's answer, as a 2026-07-28 client must get it: results of the methods
/// that have them carry `resultType`, and the cacheable ones `ttlMs` and `cacheScope` (0 and
/// private: the gateway cannot know for how long the child's answer holds).
pub fn for_stateless(method: &str, bytes: Vec<u8>) -> Vec<u8> {
    const CACHEABLE: &[&str] = &[
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
    ];
    const TYPED: &[&str] = &["tools/call", "prompts/get", "completion/complete"];
    let cacheable = CACHEABLE.contains(&method);
    if !cacheable && !TYPED.contains(&method) {
        return bytes;
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return bytes;
    };
    let Some(result) = v.get_mut("result").and_then(Value::as_object_mut) else {
        return bytes;
    };
    result.entry("resultType").or_insert(json!("complete"));
    if cacheable {
        result.entry("ttlMs").or_insert(json!(0));
        result.entry("cacheScope").or_insert(json!("private"));
    }
    super::json_bytes(&v)
}

/// The 2026-07-28 `server/discover` result of a session-era server, from its `initialize`
/// result: the gateway translates every version it speaks onto that session.
pub fn discover_from_initialize(init: &Value) -> Value {
    let mut out = json!({
        "supportedVersions": super::version::SUPPORTED,
        "capabilities": init.get("capabilities").cloned().unwrap_or(json!({})),
        "serverInfo": init.get("serverInfo").cloned().unwrap_or(json!({})),
    });
    if let Some(i) = init.get("instructions") {
        out["instructions"] = i.clone();
    }
    out["resultType"] = json!("complete");
    out["ttlMs"] = json!(0);
    out["cacheScope"] = json!("private");
    out
}

/// A `tools/list` result as one tenant sees it: only the tools `keep` keeps, and never
/// `cacheScope: "public"` (the list is that tenant's, and a shared cache must not give it to
/// another). `None`: the result has no `tools` array to filter.
/// Whether a listed item (a tool, a prompt) is one the gateway can judge: an object with a
/// string `name` a call may name (at most [`super::jsonrpc::MAX_NAME_CHARS`] characters: a
/// longer one is refused in a call, and was kept in the gateway's tables, 15 MB a name: an
/// attacker's review) and no two keys a client reads as one ([`one_meaning`]: `Name` beside
/// `name`). Go reads `{"Name": "secret_tool"}` as a tool named so, which the filter, the pins
/// and a federation's prefixes took for one with no name (the fourth review).
pub(super) fn listable(item: &Value) -> bool {
    item.as_object().is_some_and(|o| {
        o.get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| n.chars().count() <= super::jsonrpc::MAX_NAME_CHARS)
            && super::jsonrpc::same_to_go(o.keys().map(String::as_str)).is_none()
    })
}

pub(super) fn keep_tools(
    result: &mut serde_json::Value,
    keep: impl FnMut(&serde_json::Value) -> bool,
) -> Option<()> {
    let mut keep = keep;
    result
        .get_mut("tools")?
        .as_array_mut()?
        .retain(|t| listable(t) && keep(t));
    if let Some(r) = result.as_object_mut()
        && (r.contains_key("cacheScope") || r.contains_key("ttlMs"))
    {
        r.insert("cacheScope".into(), serde_json::json!("private"));
    }
    Some(())
}

#[cfg(test)]
mod tests {
    /// An upstream's reconnection time below a second is raised to a second (a client
    /// reconnected 1,900 times a second on `retry: 0`); others go as they came.
    #[test]
    fn a_reconnection_time_below_a_second_is_raised_to_one() {
        use super::{Answers, raise_retry, read_events, rewrite_events};
        for (events, want) in [
            (
                &b"retry: 0\ndata: {}\n\n"[..],
                &b"retry: 1000\ndata: {}\n\n"[..],
            ),
            (b"id: 1\r\nretry:5\r\n\r\n", b"id: 1\r\nretry: 1000\r\n\r\n"),
            (
                b"\xef\xbb\xbfretry: 999\n\n",
                b"\xef\xbb\xbfretry: 1000\n\n",
            ),
            (
                b"data: 1\n\nretry: 10\rdata: 2\r\r",
                b"data: 1\n\nretry: 1000\rdata: 2\r\r",
            ),
        ] {
            assert!(read_events(events).low_retry, "{events:?}");
            assert_eq!(raise_retry(events), want);
            assert!(!read_events(want).low_retry);
        }
        // Values a client should ignore, but the Python SDK reads with `int()`.
        for value in [
            "+0", "-1", " 0", "0 ", "0_0", "\u{661}", "5x", "", "01000", "0",
        ] {
            let events = format!("retry: {value}\n\n");
            assert!(read_events(events.as_bytes()).low_retry, "{value:?}");
            assert_eq!(
                raise_retry(events.as_bytes()),
                b"retry: 1000\n\n",
                "{value:?}"
            );
        }
        for events in [
            &b"retry: 1000\n\n"[..],
            b"retry: 30000\n\n",
            b"retry: 99999999999999999999999\n\n",
            b"data: retry: 0\n\n",
        ] {
            assert!(!read_events(events).low_retry, "{events:?}");
            assert_eq!(raise_retry(events), events);
        }
        let out = rewrite_events("m", b"retry: 0\ndata: {}\n\n", Answers::Any);
        assert_eq!(out, b"retry: 1000\ndata: {}\n\n");
    }

    /// The vector search finds what a plain one does: each separator at every place around
    /// the blocks' edges, alone and after other bytes that may start one, and none in text
    /// without one (a lone 0xc2 or 0xe2 starts other characters).
    #[test]
    fn the_search_for_separators_finds_each_at_every_place() {
        use super::may_split;
        let plain = |bytes: &[u8]| {
            String::from_utf8_lossy(bytes).chars().any(|c| {
                matches!(
                    c,
                    '\u{b}' | '\u{c}' | '\u{1c}'..='\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}'
                )
            })
        };
        let fillers: [&[u8]; 4] = [b"a", "\u{e9}".as_bytes(), "\u{2027}".as_bytes(), b"\r"];
        let marks: [&[u8]; 9] = [
            b"\x0b",
            b"\x0c",
            b"\x1c",
            b"\x1d",
            b"\x1e",
            "\u{85}".as_bytes(),
            "\u{2028}".as_bytes(),
            "\u{2029}".as_bytes(),
            b"\x1f",
        ];
        for filler in fillers {
            for len in [0, 1, 31, 62, 63, 64, 65, 127, 128, 130, 200] {
                let text: Vec<u8> = filler
                    .iter()
                    .copied()
                    .cycle()
                    .take(len * filler.len())
                    .collect();
                assert_eq!(may_split(&text), plain(&text), "{filler:?} {len}");
                for mark in marks {
                    for at in
                        (0..=text.len()).filter(|at| filler.len() == 1 || at % filler.len() == 0)
                    {
                        let with = [&text[..at], mark, &text[at..]].concat();
                        assert_eq!(
                            may_split(&with),
                            plain(&with),
                            "{filler:?} {len} {mark:?} {at}"
                        );
                    }
                }
            }
        }
        // Half a separator at the end.
        assert!(!may_split(
            &[b"x".repeat(63).as_slice(), b"\xe2\x80"].concat()
        ));
    }

    #[test]
    fn a_response_is_an_answer_to_a_request() {
        use super::is_a_response;
        assert!(is_a_response(br#"{"jsonrpc":"2.0","id":3,"result":{}}"#));
        assert!(is_a_response(br#"{"jsonrpc":"2.0","id":"a","error":{}}"#));
        // An escaped key is the key.
        assert!(is_a_response(
            br#"{"jsonrpc":"2.0","i\u0064":3,"result":{}}"#
        ));
        assert!(!is_a_response(
            br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#
        ));
        assert!(!is_a_response(
            br#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#
        ));
        assert!(is_a_response(br#"[{"jsonrpc":"2.0","id":3,"result":{}}]"#));
        assert!(is_a_response(
            br#" [{"jsonrpc":"2.0","method":"x"},{"jsonrpc":"2.0","id":3,"error":{}}]"#
        ));
        assert!(!is_a_response(br#"[{"jsonrpc":"2.0","method":"x"}]"#));
        assert!(!is_a_response(b"[]"));
        assert!(is_a_response(
            br#"[{"jsonrpc":"2.0","id":3,"result":{}}, 5]"#
        ));
        assert!(!is_a_response(br#"{"ok":true}"#));
        assert!(!is_a_response(b""));
    }

    #[test]
    fn a_member_answer_answers_its_request_once() {
        use super::{super::Id, answers_only};
        let seven = Some(Id::Num(7));
        let yes = |b: &str| answers_only(b.as_bytes(), seven.as_ref());
        assert!(yes(r#"{"jsonrpc":"2.0","id":7,"result":{}}"#));
        assert!(yes(
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-1,"message":"x"}}"#
        ));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":null,"result":{}}"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"method":"x"}"#));
        assert!(!yes(r#"[{"jsonrpc":"2.0","id":7,"result":{}}]"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","result":{}}"#));
        // A repeated key, however written, whichever copy is the right id.
        assert!(!yes(r#"{"jsonrpc":"2.0","id":1,"result":{},"id":7}"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"result":{},"id":1}"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":1,"result":{},"i\u0064":7}"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"result":{},"result":{}}"#));
        // Held to the JSON any parser takes, throughout.
        assert!(!answers_only(
            b"{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"t\":\"\xff\"}}",
            seven.as_ref()
        ));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"result":{"n":1e400}}"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"result":{"t":"\ud800"}}"#));
        // Another spelling of one of JSON-RPC's keys, which Go's decoder reads as it.
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"result":{},"ID":1}"#));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"result":{},"Id":1}"#));
        assert!(!yes(
            r#"{"jsonrpc":"2.0","id":7,"result":{},"Re\u017fult":{}}"#
        ));
        assert!(!yes(r#"{"jsonrpc":"2.0","id":7,"result":{},"METHOD":"x"}"#));
        assert!(yes(r#"{"jsonrpc":"2.0","id":7,"result":{},"Idea":1}"#));
        // Repeats inside the result are the member's own business.
        assert!(yes(r#"{"jsonrpc":"2.0","id":7,"result":{"a":1,"a":2}}"#));
        // Without an id (a notification was sent), anything goes through unread.
        assert!(answers_only(b"{}", None));
    }

    #[test]
    fn events_read_in_one_pass_are_read_as_split_reads_them() {
        use super::{has_data, has_id, read_events, sse};
        // Every stream of up to four lines from these pieces, with every line end.
        let pieces: [&[u8]; 7] = [
            b"data: {}",
            b"id: 4",
            b"id:",
            b"",
            b": c",
            b"event: x",
            b"\xef\xbb\xbfdata: 1",
        ];
        let ends: [&[u8]; 3] = [b"\n", b"\r\n", b"\r"];
        let mut streams: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for s in &streams {
                for p in pieces {
                    for e in ends {
                        next.push([s.as_slice(), p, e].concat());
                    }
                }
            }
            streams.extend(next);
            streams.dedup();
            if streams.len() > 20_000 {
                break;
            }
        }
        for stream in &streams {
            let read = read_events(stream);
            let last = sse::split(stream).filter(|e| has_data(e)).last();
            // The same event (split keeps the line end of a last event without its empty
            // line): the same data.
            let got = read.last_with_data.clone().map(|r| &stream[r]);
            assert_eq!(
                got.map(super::event_data),
                last.map(super::event_data),
                "{:?}",
                String::from_utf8_lossy(stream)
            );
            assert_eq!(
                read.id,
                sse::split(stream).any(has_id),
                "{:?}",
                String::from_utf8_lossy(stream)
            );
            // The relay signs ids only where the read found one set: signing changes
            // nothing where it found none.
            let signed = super::sign_event_ids(stream.to_vec(), |v: &[u8]| [v, b".t"].concat());
            assert_eq!(
                read.id,
                signed != *stream,
                "{:?}",
                String::from_utf8_lossy(stream)
            );
        }
    }

    #[test]
    fn event_ids_are_signed_and_nothing_else_changes() {
        let sign = |v: &[u8]| [v, b".t"].concat();
        // Every line end kept, every field but a non-empty id as it came.
        let events = b"id: 1_0\r\ndata: {\"id\": 1}\n\nid:2\rretry: 5\n\nid\nid: \ndata: x\n\n: id: 3\ndata: id: 4\n\nid: a\0b\n\n";
        let out = super::sign_event_ids(events.to_vec(), sign);
        assert_eq!(
            out,
            b"id: 1_0.t\r\ndata: {\"id\": 1}\n\nid: 2.t\rretry: 5\n\nid\nid: \ndata: x\n\n: id: 3\ndata: id: 4\n\nid: a\0b\n\n"
        );
        // Every id a client reads is signed.
        for event in super::sse::split(&out) {
            for line in super::lines(event) {
                if let Some(v) = super::field(line, b"id")
                    && super::has_id(line)
                {
                    assert!(v.ends_with(b".t"), "{:?}", String::from_utf8_lossy(line));
                }
            }
        }
        // A stream's byte order mark stays first; without an id the events are not copied.
        let bom = [super::sse::BOM, b"id: 7\n\n"].concat();
        assert_eq!(
            super::sign_event_ids(bom, sign),
            [super::sse::BOM, b"id: 7.t\n\n"].concat()
        );
        let none = b"data: {}\n\n".to_vec();
        let at = none.as_ptr();
        let same = super::sign_event_ids(none, sign);
        assert_eq!(same.as_ptr(), at);
    }

    #[test]
    fn an_event_id_is_what_a_client_resumes_from() {
        use super::has_id;
        assert!(has_id(b"id: 7\ndata: {}"));
        assert!(has_id(b"event: message\r\nid:abc"));
        // Empty (it resets the last id), with NUL (ignored), or not a field.
        assert!(!has_id(b"id:\ndata: {}"));
        assert!(!has_id(b"id: a\0b\ndata: {}"));
        assert!(!has_id(b"data: id: 7"));
        assert!(!has_id(b": id: 7"));
    }

    #[test]
    fn a_members_stream_carries_no_answer_to_another_request() {
        let events = concat!(
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":8,\"result\":{\"tools\":[]}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":\"07\",\"result\":{}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":8,\"method\":\"sampling/createMessage\"}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\n\n",
        );
        let seven = Answers::to(Some(&json!(7)));
        let out = String::from_utf8(rewrite_events("m", events.as_bytes(), seven)).unwrap();
        // The progress, the member's own request (tagged) and the answer to 7 pass; the
        // answers to 8 and to "07" do not.
        assert_eq!(out.matches("data: ").count(), 3, "{out}");
        assert!(out.contains("notifications/progress"), "{out}");
        assert!(out.contains("sampling/createMessage"), "{out}");
        assert!(out.contains(r#""result":{"ok":true}"#), "{out}");
        assert!(
            !out.contains(r#""tools""#) && !out.contains(r#""id":"07""#),
            "{out}"
        );
        // Without a request (the session's own stream), no answer passes, nor progress (it
        // could name the token of a call sent to another member).
        let out =
            String::from_utf8(rewrite_events("m", events.as_bytes(), Answers::Nothing)).unwrap();
        assert_eq!(out.matches("data: ").count(), 1, "{out}");
        assert!(!out.contains("result"), "{out}");
        assert!(!out.contains("notifications/progress"), "{out}");
        assert!(out.contains("sampling/createMessage"), "{out}");
        // Unchecked (a batch's stream), all do.
        let out = String::from_utf8(rewrite_events("m", events.as_bytes(), Answers::Any)).unwrap();
        assert_eq!(out.matches("data: ").count(), 5, "{out}");
    }

    /// A passthrough stream carries only the responses it answers: a client matches answers
    /// by id on any stream, so one on the session's GET stream (or another request's) would
    /// answer a `tools/list` the gateway filtered and pinned (an attacker's review).
    /// Clients that also end lines at U+2028, U+2029, U+0085 and some control characters
    /// (httpx-sse 0.4.0) read other fields, and other events, in an event that holds one: a
    /// stray response the gateway read as no data (after `event: message`) or as a
    /// notification reached a Python SDK 1.x client (an attacker's review).
    #[test]
    fn an_event_some_clients_read_as_other_lines_goes() {
        let stray = r#"{"jsonrpc":"2.0","id":8,"result":{"tools":[]}}"#;
        let note = r#"{"jsonrpc":"2.0","method":"notifications/message","params":{}}"#;
        let seven = Answers::to(Some(&json!(7)));
        for event in [
            format!("event: message\u{2028}data: {stray}"),
            format!("event: message\u{2029}data: {stray}"),
            format!("event: message\u{85}data: {stray}"),
            format!("event: message\u{b}data: {stray}"),
            format!(": keep-alive\u{1e}data: {stray}"),
            format!("id: 4\u{c}data: {stray}"),
            format!("data: {note}\u{2028}\u{2028}data: {stray}"),
            format!("data: \u{2028}data: {stray}"),
            format!("data: 5\u{85}data: {stray}"),
            // Inside what the scan takes for a string (the stray's own quotes pair up): the
            // third review.
            format!(
                "data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"level\":\"info\",\"data\":\"\u{2028}\u{2028}data: {stray}\u{2028}\u{2028}\"}}}}"
            ),
            format!(
                "data: {{\"jsonrpc\":\"2.0\",\"method\":\"n\",\"params\":{{\"t\":\"\u{1e}data: {stray}\"}}}}"
            ),
            // The separators at the end of one data line, the stray on the next (the fourth
            // review).
            format!(
                "data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"level\":\"info\",\"data\":\"\u{2028}\u{2028}\ndata: {stray}"
            ),
            format!(
                "data: {{\"jsonrpc\":\"2.0\",\"method\":\"n\",\"params\":{{\"t\":\"\u{1e}\u{1e}\ndata: {stray}\n"
            ),
        ] {
            for answers in [seven, Answers::Nothing] {
                assert!(!event_allowed(event.as_bytes(), answers), "{event:?}");
            }
            assert!(event_allowed(event.as_bytes(), Answers::Any), "{event:?}");
        }
        // Inside a JSON string such a character is text: it goes.
        for event in [
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"n\",\"params\":{\"t\":\"a\u{2028}b\u{85}\"}}"
                .to_owned(),
            format!("event: message\ndata: {note}"),
            // `data` as a key, after a quote, and as text after a space.
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"n\",\"params\":{\"data\":\"the \u{2028} data\"}}".to_owned(),
            "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"t\":\"\u{2029} data: x\"}}"
                .to_owned(),
        ] {
            assert!(event_allowed(event.as_bytes(), seven), "{event:?}");
        }
    }

    #[test]
    fn a_stream_carries_no_response_to_a_request_it_does_not_answer() {
        let events = concat!(
            "id: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":8,\"result\":{\"tools\":[]}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{},\"id\":8}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"i\\u0064\":8,\n",
            "data: \"result\":{}}\n\n",
            "data: [{\"jsonrpc\":\"2.0\",\"id\":8,\"result\":{}}]\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":8,\"ID\":7,\"result\":{}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"sampling/createMessage\"}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":1}}\n\n",
            "data: not json\n\n",
            ": comment\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\n\n",
        );
        let kept = |answers| {
            String::from_utf8(without_strays(events.as_bytes().to_vec(), answers)).unwrap()
        };
        // The stream of request 7: its answer passes, and none to 8 (nor one whose id a
        // client may read as 8: given twice, escaped, in another case, in a batch).
        let seven = kept(Answers::to(Some(&json!(7))));
        assert_eq!(seven.matches("data: ").count(), 5, "{seven}");
        for passes in [
            "notifications/progress",
            "sampling/createMessage",
            r#""id":null"#,
            "not json",
            r#""ok":true"#,
        ] {
            assert!(seven.contains(passes), "{passes}: {seven}");
        }
        assert!(
            !seven.contains(r#""id":8"#) && !seven.contains("u0064"),
            "{seven}"
        );
        // The session's own stream: no response at all.
        let own = kept(Answers::Nothing);
        assert!(!own.contains(r#""ok":true"#), "{own}");
        assert_eq!(own.matches("data: ").count(), 4, "{own}");
        // Unchecked (a batch's stream): as it came, not copied.
        let events = events.as_bytes().to_vec();
        let at = events.as_ptr();
        let out = without_strays(events, Answers::Any);
        assert_eq!(out.as_ptr(), at);
        // A stream with nothing to drop goes as it came.
        let clean = b"data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}\r\n\r\n".to_vec();
        let at = clean.as_ptr();
        let out = without_strays(clean, Answers::to(Some(&json!(7))));
        assert_eq!(out.as_ptr(), at);
        // A client reads a message with a `result` or an `error`, or without one method that
        // is a string, as a response (the review's `"method": null` answered a pending list).
        for stray in [
            r#"{"jsonrpc":"2.0","id":8,"method":null,"result":{"tools":[]}}"#,
            r#"{"jsonrpc":"2.0","id":8,"method":5,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":8,"method":"x","params":5,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":8,"method":"x","Error":{"code":1}}"#,
            r#"{"jsonrpc":"2.0","id":8,"method":"x","method":"y","result":{}}"#,
            r#"{"jsonrpc":"2.0","id":8,"Method":"x"}"#,
            r#"[{"jsonrpc":"2.0","id":8,"method":null,"result":{}}]"#,
        ] {
            let event = format!("data: {stray}\n\n").into_bytes();
            assert!(
                without_strays(event, Answers::to(Some(&json!(7)))).is_empty(),
                "{stray}"
            );
        }
        for passes in [
            r#"{"jsonrpc":"2.0","id":8,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/message","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":"7","result":{}}"#,
        ] {
            let event = format!("data: {passes}\n\n").into_bytes();
            assert_eq!(
                without_strays(event.clone(), Answers::to(Some(&json!(7)))),
                event
            );
        }
        // A stray dropped before an event that starts with a byte order mark would make that
        // event the first a client reads, and the mark the one a client skips: such an event
        // goes too (found by the fuzz target `federation`).
        let marked = "data: {\"jsonrpc\":\"2.0\",\"id\":8,\"result\":{}}\n\n\u{feff}data: {\"jsonrpc\":\"2.0\",\"id\":8,\"result\":{\"stray\":1}}\n\n";
        let out = without_strays(marked.as_bytes().to_vec(), Answers::to(Some(&json!(7))));
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        // A resume carries its stream's rule in its event id: 7's mark reads back as 7's.
        let mark = Answers::to(Some(&json!(7))).mark();
        assert_eq!(Answers::of_mark(mark), Answers::to(Some(&json!(7))));
        assert_ne!(Answers::of_mark(mark), Answers::to(Some(&json!("07"))));
        // A server that echoes an id as a string answers the same request to a client.
        assert_eq!(Answers::of_mark(mark), Answers::to(Some(&json!("7"))));
        assert_eq!(Answers::of_mark(Answers::Nothing.mark()), Answers::Nothing);
        assert_eq!(Answers::of_mark(Answers::Any.mark()), Answers::Any);
    }

    #[test]
    fn a_filtered_tools_list_is_never_public() {
        let mut r = serde_json::json!({"tools": [{"name": "a"}, {"name": "b"}], "ttlMs": 60000,
            "cacheScope": "public"});
        super::keep_tools(&mut r, |t| t["name"] == "a").unwrap();
        assert_eq!(
            r,
            serde_json::json!({"tools": [{"name": "a"}], "ttlMs": 60000, "cacheScope": "private"})
        );
        // Nothing to filter: told so, and nothing added.
        let mut none = serde_json::json!({"ttlMs": 1});
        assert!(super::keep_tools(&mut none, |_| true).is_none());
        let mut bare = serde_json::json!({"tools": []});
        super::keep_tools(&mut bare, |_| true).unwrap();
        assert_eq!(bare, serde_json::json!({"tools": []}));
        // A lifetime without a scope gets one.
        let mut ttl = serde_json::json!({"tools": [], "ttlMs": 5});
        super::keep_tools(&mut ttl, |_| true).unwrap();
        assert_eq!(ttl["cacheScope"], "private");
    }

    use super::*;

    #[test]
    fn set_in_is_total() {
        // Where serde_json's IndexMut panicked: a non-object on the way is left as it is.
        for mut v in [
            json!(5),
            json!({"params": 5}),
            json!({"params": [1]}),
            json!("x"),
        ] {
            let before = v.clone();
            set_in(&mut v, &["params", "name"], json!("n"));
            assert_eq!(v, before);
        }
        let mut v = Value::Null;
        set_in(&mut v, &["params", "name"], json!("n"));
        assert_eq!(v, json!({"params": {"name": "n"}}));
        let mut v = json!({"id": 1, "params": {"a": 1}});
        set_in(&mut v, &["params", "name"], json!("n"));
        set_in(&mut v, &["id"], json!("t"));
        assert_eq!(v, json!({"id": "t", "params": {"a": 1, "name": "n"}}));
    }

    #[test]
    fn a_result_that_is_not_an_object_is_an_error() {
        let head = ResponseHead {
            status: 200,
            headers: crate::http::Fields::default(),
        };
        let r = response_result(
            &head,
            br#"{"jsonrpc":"2.0","id":1,"result":5}"#,
            Some(&Id::Num(1)),
        );
        assert!(r.is_err(), "{r:?}");
        let r = response_result(
            &head,
            br#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
            Some(&Id::Num(1)),
        );
        assert_eq!(r, Ok(json!({})));
    }

    /// A member's event is parsed into a tree to be tagged: one holding more values than the
    /// gateway parses (`crate::values`) is dropped unparsed, the next one kept.
    #[test]
    fn a_member_event_holding_too_many_values_is_dropped_unparsed() {
        let mut events = b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{\"data\":[0".to_vec();
        for _ in 0..crate::values::MAX {
            events.extend_from_slice(b",0");
        }
        events.extend_from_slice(b"]}}\n\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\n\n");
        let out = String::from_utf8(rewrite_events("m", &events, Answers::Nothing)).unwrap();
        assert_eq!(
            out,
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\n\n"
        );
    }

    #[test]
    fn member_requests_and_event_ids_are_tagged_and_untag_back() {
        let events = b"id: 7\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"sampling/createMessage\",\"params\":{}}\n\n\
id: 8\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}\r\n\r\n\
data: {\"jsonrpc\":\"2.0\",\"id\":\"x.y\",\"method\":\"elicitation/create\"}\n\n\
data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\",\"params\":{\"requestId\":3}}\n\n\
: comment\nretry: 10\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        let out = String::from_utf8(rewrite_events("py", events, Answers::Any)).unwrap();
        let got: Vec<&str> = out.split("\n\n").collect();
        assert_eq!(
            got[0],
            "id: py.7\nevent: message\ndata: {\"id\":\"py.n.3\",\"jsonrpc\":\"2.0\",\"method\":\"sampling/createMessage\",\"params\":{}}"
        );
        // Untouched data keeps its bytes; CRLF lines come out as LF.
        assert_eq!(
            got[1],
            "id: py.8\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progress\":1}}"
        );
        assert!(got[2].contains("\"id\":\"py.s.x.y\""), "{}", got[2]);
        assert!(got[3].contains("\"requestId\":\"py.n.3\""), "{}", got[3]);
        assert_eq!(
            got[4], "retry: 1000\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
            "a comment is dropped; a reconnection time below a second is one"
        );
        assert_eq!(untag("py.n.3"), Some(("py", json!(3))));
        assert_eq!(untag("py.s.x.y"), Some(("py", json!("x.y"))));
        assert_eq!(untag("py.n.x"), None);
        // Every number a member may send as an id comes back as the same number.
        for raw in [
            "-7",
            "1.0",
            "1e3",
            "2.5e-3",
            "18446744073709551615",
            "-9223372036854775808",
        ] {
            let id: Value = serde_json::from_str(raw).unwrap();
            let Some(Value::String(t)) = tag("py", &id) else {
                panic!("{raw} is not tagged")
            };
            assert_eq!(untag(&t), Some(("py", id)), "{raw} as {t}");
        }
        assert_eq!(untag("py.q.3"), None);
        assert_eq!(untag("plain"), None);
    }

    /// A member's request ends a line or an event with a lone CR or LF-CR-LF, as every client
    /// reads it: the gateway sees the same events and tags their ids. What it cannot read as
    /// one JSON object never reaches the client untagged.
    #[test]
    fn a_members_event_is_tagged_however_its_lines_end() {
        let req = |id: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":"{id}","method":"elicitation/create","params":{{}}}}"#
            )
        };
        let events = format!(
            "data: {a}\n\r\ndata: {b}\r\rx\rdata: {c}\n\nid: 5\rdata: {d}\n\n\
             data: {{\"jsonrpc\":\"2.0\",\"id\":\"o.n.1\",\"method\":\"m\",\"x\":\"\\ud800\"}}\n\n\
             data: [{e}]\n\ndata: {{\"jsonrpc\":\n\
             data: \"2.0\",\"id\":\"o.n.3\",\"method\":\"m\"}}\n\n: keep\n\n\
             \u{feff}data: {f}\n\n\
             id: 6\u{2028}\u{2028}data: {g}\n\n\
             x: \u{2028}\u{2028}data: {g}\n\n\
             data: {h}\n\n",
            a = req("a"),
            b = req("o.n.1"),
            c = req("c"),
            d = req("d"),
            e = req("o.n.2"),
            f = req("o.n.4"),
            g = req("o.n.5"),
            h = "{\"jsonrpc\":\"2.0\",\"id\":\"h\",\"method\":\"m\",\"params\":{\"s\":\"\u{2028}data: x\u{2029}\u{85}\"}}",
        );
        let out =
            String::from_utf8(rewrite_events("m", events.as_bytes(), Answers::Nothing)).unwrap();
        let got: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(got.len(), 6, "{out}");
        for (event, id) in got
            .iter()
            .zip(["m.s.a", "m.s.o.n.1", "m.s.c", "m.s.d", "m.s.o.n.3"])
        {
            assert!(event.contains(&format!("\"id\":\"{id}\"")), "{id}: {out}");
        }
        assert!(got[3].starts_with("id: m.5\n"), "{out}");
        assert!(!out.contains("keep"), "a comment is dropped: {out}");
        for dropped in ["o.n.2", "ud800", "o.n.4", "o.n.5", "\u{feff}"] {
            assert!(!out.contains(dropped), "{dropped}: {out}");
        }
        // Line separators in a JSON string are written escaped.
        assert!(out.contains(r#""s":"\u2028data: x\u2029\u0085""#), "{out}");
        assert!(!out.contains('\r'), "{out:?}");
        // A stream's first event after a byte order mark is read (and tagged) as a client reads
        // it; after two, the second is part of a field's name for a client too: dropped.
        let first = format!("\u{feff}data: {}\n\n", req("q"));
        let out =
            String::from_utf8(rewrite_events("m", first.as_bytes(), Answers::Nothing)).unwrap();
        assert!(
            out.contains(r#""id":"m.s.q""#) && !out.contains('\u{feff}'),
            "{out}"
        );
        let two = format!("\u{feff}{first}");
        assert_eq!(rewrite_events("m", two.as_bytes(), Answers::Nothing), b"");
    }

    #[test]
    fn the_answer_is_found_in_json_and_in_sse() {
        let head = |ct: &str| ResponseHead {
            status: 200,
            headers: [("content-type", ct)].into_iter().collect(),
        };
        let id = Id::Num(4);
        let sse = b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":4,\"result\":{\"ok\":1}}\n\n";
        assert_eq!(
            response_result(&head("text/event-stream"), sse, Some(&id)),
            Ok(json!({"ok": 1}))
        );
        let err = br#"{"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"no"}}"#;
        assert!(
            response_result(&head("application/json"), err, Some(&id))
                .unwrap_err()
                .contains("-32601")
        );
        assert!(response_result(&head("application/json"), b"{", Some(&id)).is_err());
        assert!(response_result(&head("text/event-stream"), b"data: {}\n\n", Some(&id)).is_err());
    }

    /// An answer read whole and written again must hold nothing Go's `encoding/json` reads
    /// otherwise: a `re\u{17f}ult` beside the `result` the gateway filtered showed a Go client
    /// the hidden tools and an unpinned definition (an attacker's review).
    #[test]
    fn an_answer_read_whole_holds_no_key_a_client_reads_otherwise() {
        let head = |ct: &str| ResponseHead {
            status: 200,
            headers: [("content-type", ct)].into_iter().collect(),
        };
        let id = Id::Num(2);
        let tools = r#"{"tools":[{"name":"echo"}]}"#;
        for body in [
            format!(r#"{{"jsonrpc":"2.0","id":2,"result":{tools},"reſult":{tools}}}"#),
            format!(r#"{{"jsonrpc":"2.0","id":2,"result":{tools},"Result":{tools}}}"#),
            r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[],"Tools":[{"name":"x"}]}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[],"toolſ":[]}}"#.to_owned(),
        ] {
            let why = answer_and_notes(&head("application/json"), body.as_bytes(), Some(&id))
                .unwrap_err();
            assert!(why.contains("Go's encoding/json"), "{body}: {why}");
            let sse = format!("data: {body}\n\n");
            assert!(
                answer_and_notes(&head("text/event-stream"), sse.as_bytes(), Some(&id)).is_err(),
                "{sse}"
            );
        }
        let fine = format!(r#"{{"jsonrpc":"2.0","id":2,"result":{tools},"extra":1}}"#);
        assert!(answer_and_notes(&head("application/json"), fine.as_bytes(), Some(&id)).is_ok());
        // A tool whose own keys Go reads as one is left out of a filtered list.
        let mut result = json!({"tools": [
            {"name": "echo", "Name": "delete_repo"},
            {"Name": "secret_tool"},
            {"NAME": "echo", "description": "poisoned"},
            {"name": 5},
            "echo",
            {"name": "search", "description": "d"},
        ]});
        keep_tools(&mut result, |_| true).unwrap();
        assert_eq!(
            result,
            json!({"tools": [{"name": "search", "description": "d"}]})
        );
    }
}
