//! JSON-RPC 2.0 as MCP uses it, parsed with simd-json into a per-worker reused buffer (the
//! client's bytes stay untouched, so they can be forwarded as they are). The parse extracts
//! once what routing and policy need: kind, id, method, tool name and arguments.
//!
//! Because the client's bytes are forwarded, they must have exactly one meaning: the one policy
//! decided on. JSON leaves duplicate keys open (simd-json's lookups find the first, every MCP
//! server keeps the last), so a message with two equal keys (compared after escape decoding) in
//! any object at any depth is refused with -32600. simd-json itself refuses the other known gaps
//! (lone surrogate escapes, trailing bytes after the value, a byte order mark, invalid UTF-8).
//! Names that key caches are capped here, before they reach any table (`MAX_NAME_CHARS`).

use std::collections::HashMap;

use simd_json::{Node, prelude::*, tape::Value};

use super::elide::Elision;
use super::error::RpcError;
use super::id::Id;
use crate::keys::{fold, folded, go_same_key};

/// The `_meta` key of the per-request protocol version (2026-07-28).
pub const PROTOCOL_VERSION_META_KEY: &str = "io.modelcontextprotocol/protocolVersion";
/// The `_meta` key that relates a message to a task (2025-11-25).
pub const RELATED_TASK_META_KEY: &str = crate::stdio::mux::RELATED_TASK;
/// Where a 2026-07-28 request carries its client's capabilities (`params._meta`), and the
/// key under their `extensions` of the tasks extension.
pub const CLIENT_CAPABILITIES_META_KEY: &str = "io.modelcontextprotocol/clientCapabilities";
pub const TASKS_EXTENSION: &str = "io.modelcontextprotocol/tasks";

/// Longest tool or prompt name accepted, in characters (the 2025-11-25 spec: 1–128).
pub const MAX_NAME_CHARS: usize = 128;
/// Longest resource URI accepted, in bytes.
pub const MAX_URI_BYTES: usize = 2048;
/// Objects with at most this many keys are checked for duplicates by linear comparison.
const LINEAR_KEYS: usize = 16;
/// Deepest nesting of objects and arrays accepted. simd-json reads 1,024 levels, serde_json
/// 127 (its recursion limit), and the gateway reads a message again with serde_json on some
/// paths (a stdio child's, a held session's, a federation's rewrite): a message between the
/// two was admitted, then failed there as the upstream's failure (two calls opened an
/// upstream's shared breaker for every tenant) or was rewritten into another message. With
/// room for the envelopes a message is put in.
pub const MAX_DEPTH: usize = 100;

/// The most messages a batch may hold. Each is read into a [`Message`] (a few hundred bytes)
/// held for the request's length, and admitted one by one: a 4 MB batch of 90,000 pings held
/// 44 MB while its upstream answered, forty of them 1.6 GB (a review). No client batches more
/// than a few.
pub const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Notification,
    Response,
}

impl Message {
    /// The id of a request, which its answer must carry (a client's response has an id too,
    /// and is answered with no JSON-RPC message at all).
    pub fn request_id(&self) -> Option<Id> {
        match self.kind {
            Kind::Request => self.id.clone(),
            Kind::Notification | Kind::Response => None,
        }
    }
}

/// What the gateway knows about one JSON-RPC message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub kind: Kind,
    pub id: Option<Id>,
    pub method: Option<String>,
    /// `params.name` of `tools/call` and `prompts/get`, `params.uri` of `resources/read`.
    pub name: Option<String>,
    /// `params.arguments` of `tools/call`, as JSON.
    pub arguments: Option<serde_json::Value>,
    /// `params._meta.progressToken` is present.
    pub has_progress_token: bool,
    /// `params._meta["io.modelcontextprotocol/protocolVersion"]`: 2026-07-28 carries the version
    /// in each request.
    pub meta_protocol_version: Option<String>,
    /// `params._meta.traceparent` (W3C trace context carried in the message).
    pub meta_traceparent: Option<String>,
    /// `params.taskId` (the task a `tasks/*` request names).
    pub task_id: Option<String>,
    /// `params.task` is present: the request asks for a task (2025-11-25 task augmentation),
    /// with `params.task.ttl` (ms) if it gives one.
    pub asks_task: Option<Option<u64>>,
    /// The request's client capabilities (`params._meta`, 2026-07-28) name the tasks extension
    /// (or they, or their extensions, are not an object, which a server may read as naming
    /// it): the server may answer it with a task of its own choosing (server-directed).
    pub tasks_extension: bool,
    /// `params._meta["io.modelcontextprotocol/related-task"]` is present: the message belongs to
    /// that task (`params._meta[...].taskId`, when it is a string). The TypeScript SDK's server
    /// queues the answer of such a request into the task's queue, which its owner reads.
    pub related_task: Option<Option<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Single(Message),
    Batch(Vec<Message>),
}

impl Message {
    /// Whether a string read into this message lost a run of its text in the parser's copy
    /// ([`super::elide`]): such a string decodes with a U+0000 in it.
    fn reads_elided(&self) -> bool {
        // Every field named, so that a new one is not forgotten here.
        let Message {
            kind: _,
            id,
            method,
            name,
            arguments: _,
            has_progress_token: _,
            meta_protocol_version,
            meta_traceparent,
            task_id,
            asks_task: _,
            tasks_extension: _,
            related_task,
        } = self;
        let marked = |s: &Option<String>| s.as_deref().is_some_and(|s| s.contains('\0'));
        matches!(id, Some(Id::Str(s)) if s.contains('\0'))
            || [
                method,
                name,
                meta_protocol_version,
                meta_traceparent,
                task_id,
                related_task.as_ref().unwrap_or(&None),
            ]
            .into_iter()
            .any(marked)
    }
}

impl Parsed {
    fn reads_elided(&self) -> bool {
        match self {
            Parsed::Single(m) => m.reads_elided(),
            Parsed::Batch(ms) => ms.iter().any(Message::reads_elided),
        }
    }
}

/// A worker's parser: the scratch copy, simd-json's buffers and its tape are reused across
/// requests.
pub struct Parser {
    /// The body and simd-json's padding after it: the parse reads this copy (unescaping
    /// strings in it) and no other, so the client's bytes stay as they came.
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
    /// Empty between parses; it keeps its allocation.
    tape: Option<simd_json::Tape<'static>>,
    /// Which bodies are copied with long runs of string text left out, when the arguments
    /// are not taken out.
    elision: Elision,
}

impl Default for Parser {
    fn default() -> Self {
        Self::with_elision(Elision::default())
    }
}

impl Parser {
    /// Parses and validates a POST body, with the arguments of `tools/call`.
    pub fn parse(&mut self, body: &[u8]) -> Result<Parsed, RpcError> {
        self.parse_for(body, true)
    }

    /// [`Parser::parse`], taking the arguments of `tools/call` out only when `arguments` (a
    /// copy of what may be most of the message: only policy reads them). They are validated
    /// either way. Without them, a large body is parsed from a copy with its long runs of
    /// string text left out ([`super::elide`]), and again from the body itself if the copy is
    /// refused or the message read from it holds a string that lost a run.
    pub fn parse_for(&mut self, body: &[u8], arguments: bool) -> Result<Parsed, RpcError> {
        // Parsed again into a tree by a federation or a held session: bounded for that.
        crate::values::within(body)
            .map_err(|why| RpcError::invalid_request(format!("the message: {why}")))?;
        if !arguments && self.elision.applies(body.len()) {
            let (parsed, elided) = self.parse_copy(body, false, true);
            match parsed {
                Ok(p) if !p.reads_elided() => return Ok(p),
                // Nothing was left out: the copy was the body.
                read if !elided => return read,
                // A refusal is the body's own too (its id and reason): read from the body.
                _ => {}
            }
        }
        self.parse_copy(body, arguments, false).0
    }

    /// A parser that leaves runs out as `elision` says (tests and fuzzing set low bounds).
    pub fn with_elision(elision: Elision) -> Self {
        Self {
            scratch: Vec::with_capacity(16 * 1024),
            buffers: simd_json::Buffers::new(16 * 1024),
            tape: None,
            elision,
        }
    }

    /// Parses a copy of `body`, with runs left out if `elide`; and whether any were (or the
    /// copy was refused for one: then it is not the body either).
    fn parse_copy(
        &mut self,
        body: &[u8],
        arguments: bool,
        elide: bool,
    ) -> (Result<Parsed, RpcError>, bool) {
        // Padded by us: simd-json then reads the copy in place instead of making its own.
        self.scratch.clear();
        if self.scratch.capacity() < body.len() + simd_json::INPUT_PADDING {
            // Larger than any before: new room, and simd-json's buffers made for it at once.
            // (Growing them would copy their old contents, used or not.)
            self.scratch = Vec::with_capacity(body.len() + simd_json::INPUT_PADDING);
            self.buffers = simd_json::Buffers::new(body.len());
        }
        let elided = if elide {
            match self.elision.copy(body, &mut self.scratch) {
                Ok(elided) => elided,
                Err(why) => return (Err(RpcError::parse(why)), true),
            }
        } else {
            self.scratch.extend_from_slice(body);
            false
        };
        let len = self.scratch.len();
        self.scratch.resize(len + simd_json::INPUT_PADDING, 0);
        let mut tape = self
            .tape
            .take()
            .map_or_else(simd_json::Tape::null, simd_json::Tape::reset);
        let parsed =
            simd_json::fill_tape_padded(&mut self.scratch, len, &mut self.buffers, &mut tape)
                .map_err(RpcError::parse)
                .and_then(|()| Self::read(&tape, body, arguments));
        self.tape = Some(tape.reset());
        (parsed, elided)
    }

    fn read(tape: &simd_json::Tape<'_>, body: &[u8], arguments: bool) -> Result<Parsed, RpcError> {
        if deeper_than(&tape.0, MAX_DEPTH) {
            return Err(RpcError::invalid_request(format!(
                "objects and arrays nested deeper than {MAX_DEPTH} levels"
            )));
        }
        if let Some((first, key)) = duplicate_key(&tape.0) {
            return Err(RpcError::invalid_request(if first == key {
                format!("duplicate key {key:?} in an object: a message must have one meaning")
            } else {
                format!(
                    "duplicate key {key:?} in an object (read as {first:?} by Go's encoding/json): a message must have one meaning"
                )
            }));
        }
        let value = tape.as_value();
        let parsed = if let Some(items) = value.as_array() {
            if items.is_empty() {
                return Err(RpcError::invalid_request("empty batch"));
            }
            if items.len() > MAX_BATCH {
                return Err(RpcError::invalid_request(format!(
                    "a batch of {} messages: at most {MAX_BATCH}",
                    items.len()
                )));
            }
            items
                .iter()
                .map(|v| message(&v, arguments))
                .collect::<Result<_, _>>()
                .map(Parsed::Batch)?
        } else {
            Parsed::Single(message(&value, arguments)?)
        };
        if negative_zero_id(body, &parsed) {
            return Err(RpcError::invalid_request(
                "`id` must be a string or an integer (-0 is read as 0 by some servers and as a float by others)",
            ));
        }
        Ok(parsed)
    }
}

/// Whether an id reads as 0 here but was written `-0`: simd-json reads that as the integer 0,
/// Python too, while serde_json and Go read a float (not an id). Only looked into (with a
/// second, exact parse) when an id is 0 and the body holds `-0` somewhere.
fn negative_zero_id(body: &[u8], parsed: &Parsed) -> bool {
    let zero = |m: &Message| m.id == Some(Id::Num(0));
    let any_zero = match parsed {
        Parsed::Single(m) => zero(m),
        Parsed::Batch(ms) => ms.iter().any(zero),
    };
    if !any_zero || memchr::memmem::find(body, b"-0").is_none() {
        return false;
    }
    let not_integer = |v: &serde_json::Value| {
        v.get("id")
            .is_some_and(|id| id.is_number() && id.as_i64().is_none())
    };
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Array(items)) => items.iter().any(not_integer),
        Ok(v) => not_integer(&v),
        Err(_) => true,
    }
}

/// Whether objects and arrays nest deeper than `max` in the tape.
fn deeper_than(nodes: &[Node<'_>], max: usize) -> bool {
    let containers = |n: &&Node<'_>| matches!(n, Node::Object { .. } | Node::Array { .. });
    if nodes.iter().filter(containers).count() <= max {
        return false;
    }
    // Where each open container ends (its nodes follow it: `count` of them).
    let mut ends: Vec<usize> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        while ends.last().is_some_and(|&end| end <= i) {
            ends.pop();
        }
        if let Node::Object { count, .. } | Node::Array { count, .. } = *node {
            ends.push(i + 1 + count);
            if ends.len() > max {
                return true;
            }
        }
    }
    false
}

/// The first two keys of one object of the tape, at any depth, that a server reads as one:
/// equal (tape strings are already unescaped, so `"n\u0061me"` and `"name"` compare equal), or
/// equal as Go's `encoding/json` matches keys to a struct's fields ([`go_same_key`]: `Name`,
/// `NAME` and `nam\u{17f}` are `name` to mcp-go and to Go SDKs before 1.3.1, the last of them
/// taken).
fn duplicate_key<'a>(nodes: &[Node<'a>]) -> Option<(&'a str, &'a str)> {
    // Each key of a small object with whether it is ASCII (two ASCII keys match only at one
    // length), on the stack: every object of every request is looked at.
    let mut keys: [(&'a str, bool); LINEAR_KEYS] = [("", true); LINEAR_KEYS];
    let mut large: HashMap<String, &'a str> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let Node::Object { len, .. } = *node else {
            continue;
        };
        let mut seen = 0;
        large.clear();
        let mut at = i + 1;
        for _ in 0..len {
            let Some(Node::String(key)) = nodes.get(at) else {
                // Not a tape simd-json makes; nothing to compare.
                break;
            };
            let key: &'a str = key;
            if len <= LINEAR_KEYS {
                let ascii = key.is_ascii();
                let same = |&(k, k_ascii): &(&str, bool)| {
                    if ascii && k_ascii {
                        k.len() == key.len() && k.eq_ignore_ascii_case(key)
                    } else {
                        go_same_key(k, key)
                    }
                };
                if let Some(&(first, _)) = keys[..seen].iter().find(|k| same(k)) {
                    return Some((first, key));
                }
                keys[seen] = (key, ascii);
                seen += 1;
            } else if let Some(first) = large.insert(folded(key), key) {
                return Some((first, key));
            }
            // Skip the key and its value (with everything nested in it).
            at += 1 + match nodes.get(at + 1) {
                Some(Node::Object { count, .. } | Node::Array { count, .. }) => count + 1,
                _ => 1,
            };
        }
    }
    None
}

/// The keys of a message's envelope that the gateway reads, by the object they are in: a key
/// spelled otherwise that Go reads as one of them ([`go_same_key`]) is refused, since the
/// gateway would decide on a message without it (or with another value) while mcp-go runs
/// the one with it (`"result": null` with `"Method": "tools/call"` was a response here and a
/// call there; an attacker's review).
pub const TOP_KEYS: &[Name] = &[
    Name::new("jsonrpc"),
    Name::new("id"),
    Name::new("method"),
    Name::new("params"),
    Name::new("result"),
    Name::new("error"),
];
const PARAMS_KEYS: &[Name] = &[
    Name::new("name"),
    Name::new("arguments"),
    Name::new("uri"),
    Name::new("_meta"),
    Name::new("task"),
    Name::new("taskId"),
    Name::new("cursor"),
    Name::new("requestId"),
    Name::new("progressToken"),
    Name::new("protocolVersion"),
];
const META_KEYS: &[Name] = &[
    Name::new("progressToken"),
    Name::new("traceparent"),
    Name::new(PROTOCOL_VERSION_META_KEY),
    Name::new(RELATED_TASK_META_KEY),
    Name::new(CLIENT_CAPABILITIES_META_KEY),
];
const CAPABILITIES_KEYS: &[Name] = &[Name::new("extensions")];

/// The longest [`Name`], as compared.
const NAME_MAX: usize = 48;

/// A key the gateway reads (ASCII), with the form every key a server reads as it has: lower
/// case, without `_` (Go matches keys in any case; pydantic reads a field by its name beside
/// its alias, `task_id` for `taskId`, `meta` for `_meta`). Made at compile time, so that a key
/// is compared with each name by one length and, rarely, a few bytes.
pub struct Name {
    pub name: &'static str,
    core: [u8; NAME_MAX],
    len: usize,
}

impl Name {
    pub const fn new(name: &'static str) -> Self {
        let bytes = name.as_bytes();
        let mut core = [0; NAME_MAX];
        let (mut i, mut len) = (0, 0);
        while i < bytes.len() {
            assert!(bytes[i].is_ascii(), "an envelope name is ASCII");
            if bytes[i] != b'_' {
                core[len] = bytes[i].to_ascii_lowercase();
                len += 1;
            }
            i += 1;
        }
        Self { name, core, len }
    }

    fn core(&self) -> &[u8] {
        &self.core[..self.len]
    }
}

/// A key of `keys` that is not one of `names` but is read as one by Go (in another case,
/// [`go_same_key`]) or by pydantic (the Python SDK's types read a field by its name as well as
/// its alias: `task_id` for `taskId`, `meta` for `_meta`, `progress_token` for
/// `progressToken`; an attacker's review): the key and the name.
pub fn spelled_otherwise<'k>(
    keys: impl IntoIterator<Item = &'k str>,
    names: &[Name],
) -> Option<(&'k str, &'static str)> {
    keys.into_iter().find_map(|k| {
        if k.is_ascii() {
            // The key's form as a name's (`Name`): one longer than every name is none.
            let mut core = [0u8; NAME_MAX];
            let mut len = 0;
            for b in k.bytes().filter(|b| *b != b'_') {
                *core.get_mut(len)? = b.to_ascii_lowercase();
                len += 1;
            }
            let core = &core[..len];
            names.iter().find(|n| n.core() == core && n.name != k)
        } else {
            // Folded as Go folds (`_` is itself), then without `_`: Go's reading and
            // pydantic's at once.
            let core = |s: &'k str| s.chars().filter(|c| *c != '_').map(fold);
            names.iter().find(|n| core(n.name).eq(core(k)))
        }
        .map(|n| (k, n.name))
    })
}

/// Two keys of `keys` that Go reads as one ([`go_same_key`]), the first and the second.
pub fn same_to_go<'k>(keys: impl ExactSizeIterator<Item = &'k str>) -> Option<(&'k str, &'k str)> {
    if keys.len() <= LINEAR_KEYS {
        let mut seen: Vec<&str> = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(first) = seen.iter().find(|s| go_same_key(s, k)) {
                return Some((first, k));
            }
            seen.push(k);
        }
        return None;
    }
    let mut seen: HashMap<String, &str> = HashMap::with_capacity(keys.len());
    keys.into_iter()
        .find_map(|k| seen.insert(folded(k), k).map(|first| (first, k)))
}

/// [`spelled_otherwise`] as a refusal of the message.
fn other_spelling<'k>(
    keys: impl IntoIterator<Item = &'k str>,
    names: &[Name],
    id: &Option<Id>,
) -> Result<(), RpcError> {
    match spelled_otherwise(keys, names) {
        None => Ok(()),
        Some((key, name)) => Err(RpcError::invalid_request(format!(
            "key {key:?} is read as {name:?} by some servers (Go's encoding/json, pydantic): a message must have one meaning"
        ))
        .with_id(id.clone())),
    }
}

fn message(v: &Value<'_, '_>, want_arguments: bool) -> Result<Message, RpcError> {
    let Some(obj) = v.as_object() else {
        return Err(RpcError::invalid_request(
            "a JSON-RPC message must be an object",
        ));
    };
    if obj.get("jsonrpc").is_none_or(|j| j.as_str() != Some("2.0")) {
        return Err(RpcError::invalid_request("`jsonrpc` must be \"2.0\""));
    }
    let id = match obj.get("id") {
        None => None,
        Some(raw) => Some(
            parse_id(&raw)
                .ok_or_else(|| RpcError::invalid_request("`id` must be a string or an integer"))?,
        ),
    };
    other_spelling(obj.iter().map(|(k, _)| k), TOP_KEYS, &id)?;
    let method = obj.get("method");
    if let Some(m) = method {
        let Some(method) = m.as_str() else {
            return Err(RpcError::invalid_request("`method` must be a string").with_id(id));
        };
        // No method holds a control character: an upstream that ends a string at a NUL
        // (`tools/call\u0000x`) would run what policy took for another method.
        if method.chars().any(char::is_control) {
            return Err(
                RpcError::invalid_request("`method` holds a control character").with_id(id),
            );
        }
        // A request or a notification, never also an answer: Python's `mcp` reads a message
        // with an `id` and an `error` (or `result`) as a response whatever else it holds, so
        // the gateway would decide on a call the upstream never runs (and count the answer it
        // never gives against the upstream, for every tenant).
        if obj.get("result").is_some() || obj.get("error").is_some() {
            return Err(RpcError::invalid_request(
                "a message with `method` is a request or a notification: it carries no `result` nor `error`",
            )
            .with_id(id));
        }
        let params = obj.get("params");
        if params.is_some_and(|p| p.as_object().is_none()) {
            return Err(RpcError::invalid_request("`params` must be an object").with_id(id));
        }
        let p = params.and_then(|p| p.as_object());
        let field = |name: &str| p.as_ref().and_then(|p| p.get(name));
        let meta = field("_meta").and_then(|m| m.as_object());
        if let Some(p) = &p {
            other_spelling(p.iter().map(|(k, _)| k), PARAMS_KEYS, &id)?;
        }
        if let Some(m) = &meta {
            other_spelling(m.iter().map(|(k, _)| k), META_KEYS, &id)?;
            // The capabilities a 2026-07-28 request carries: whether they name the tasks
            // extension decides whether its answer may be a task (the third review).
            if let Some(c) = m
                .get(CLIENT_CAPABILITIES_META_KEY)
                .and_then(|c| c.as_object())
            {
                other_spelling(c.iter().map(|(k, _)| k), CAPABILITIES_KEYS, &id)?;
            }
        }
        let name_key = match method {
            "tools/call" | "prompts/get" => Some("name"),
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some("uri"),
            _ => None,
        };
        let name = match name_key {
            Some(key) => match field(key).and_then(|n| n.as_str().map(str::to_owned)) {
                Some(n) if key == "name" && n.chars().count() > MAX_NAME_CHARS => {
                    return Err(RpcError::invalid_params(format!(
                        "`params.name` is longer than {MAX_NAME_CHARS} characters"
                    ))
                    .with_id(id));
                }
                // Nor does a name or a URI: `word_count\u0000` is not `word_count` to a rule, but
                // is to an upstream that ends a string at a NUL.
                Some(n) if n.chars().any(char::is_control) => {
                    return Err(RpcError::invalid_params(format!(
                        "`params.{key}` holds a control character"
                    ))
                    .with_id(id));
                }
                Some(n) if n.len() > MAX_URI_BYTES => {
                    return Err(RpcError::invalid_params(format!(
                        "`params.uri` is longer than {MAX_URI_BYTES} bytes"
                    ))
                    .with_id(id));
                }
                Some(n) => Some(n),
                None if id.is_some() => {
                    return Err(RpcError::invalid_params(format!(
                        "{method} needs a string `params.{key}`"
                    ))
                    .with_id(id));
                }
                None => None,
            },
            None => None,
        };
        let arguments = if method == "tools/call" {
            match field("arguments") {
                None => None,
                Some(a) if a.as_object().is_some() => want_arguments.then(|| to_serde(&a)),
                Some(_) => {
                    return Err(
                        RpcError::invalid_params("`params.arguments` must be an object")
                            .with_id(id),
                    );
                }
            }
        } else {
            None
        };
        let task_id = field("taskId").and_then(|t| t.as_str().map(str::to_owned));
        let related_task = meta
            .as_ref()
            .and_then(|m| m.get(RELATED_TASK_META_KEY))
            .map(|t| t.get("taskId").and_then(|x| x.as_str().map(str::to_owned)));
        // A task is the caller's or unknown to it by its id: `abc\u0000` is not `abc` here, but
        // is to an upstream that ends a string at a NUL.
        if task_id
            .iter()
            .chain(related_task.iter().flatten())
            .any(|t| t.chars().any(char::is_control))
        {
            return Err(
                RpcError::invalid_params("a task id holds a control character").with_id(id),
            );
        }
        return Ok(Message {
            kind: if id.is_some() {
                Kind::Request
            } else {
                Kind::Notification
            },
            id,
            method: Some(method.to_owned()),
            name,
            arguments,
            has_progress_token: meta
                .as_ref()
                .is_some_and(|m| m.get("progressToken").is_some()),
            // A claim that is not a string is a claim too: a server may read
            // the key's presence alone as the stateless era.
            meta_protocol_version: meta
                .as_ref()
                .and_then(|m| m.get(PROTOCOL_VERSION_META_KEY))
                .map(|v| {
                    v.as_str()
                        .map_or_else(|| "(not a string)".to_owned(), str::to_owned)
                }),
            meta_traceparent: meta
                .as_ref()
                .and_then(|m| m.get("traceparent"))
                .and_then(|v| v.as_str().map(str::to_owned)),

            task_id,
            asks_task: field("task").map(|t| t.get("ttl").and_then(|x| x.as_u64())),
            // Extensions other than an object (a list, a string) are the server's to read:
            // one that finds the key in them would make a task too.
            // So are capabilities other than an object.
            tasks_extension: meta
                .as_ref()
                .and_then(|m| m.get(CLIENT_CAPABILITIES_META_KEY))
                .is_some_and(|c| {
                    c.as_object().is_none()
                        || c.get("extensions").is_some_and(|e| {
                            e.as_object().is_none() || e.get(TASKS_EXTENSION).is_some()
                        })
                }),
            related_task,
        });
    }
    // A response (from the client: to a server request such as sampling or elicitation).
    let has_result = obj.get("result").is_some();
    let has_error = obj.get("error").is_some();
    if id.is_none() || has_result == has_error {
        return Err(RpcError::invalid_request(
            "not a request (no `method`) nor a response (an `id` and exactly one of `result`, `error`)",
        )
        .with_id(id));
    }
    Ok(Message {
        kind: Kind::Response,
        id,
        method: None,
        name: None,
        arguments: None,
        has_progress_token: false,
        meta_protocol_version: None,
        meta_traceparent: None,
        task_id: None,
        asks_task: None,
        tasks_extension: false,
        related_task: None,
    })
}

fn parse_id(v: &Value<'_, '_>) -> Option<Id> {
    if let Some(s) = v.as_str() {
        return Some(Id::Str(s.to_owned()));
    }
    v.as_i64().map(Id::Num)
}

fn to_serde(v: &Value<'_, '_>) -> serde_json::Value {
    use serde_json::Value as J;
    // A direct walk: no text round trip (and no depth limit below simd-json's own).
    if let Some(s) = v.as_str() {
        J::from(s)
    } else if let Some(items) = v.as_array() {
        J::Array(items.iter().map(|v| to_serde(&v)).collect())
    } else if let Some(fields) = v.as_object() {
        J::Object(
            fields
                .iter()
                .map(|(k, v)| (k.to_owned(), to_serde(&v)))
                .collect(),
        )
    } else if let Some(b) = v.as_bool() {
        J::Bool(b)
    } else if let Some(i) = v.as_i64() {
        J::from(i)
    } else if let Some(u) = v.as_u64() {
        J::from(u)
    } else if let Some(f) = v.as_f64() {
        serde_json::Number::from_f64(f).map_or(J::Null, J::Number)
    } else {
        J::Null
    }
}

#[cfg(test)]
#[path = "jsonrpc_tests.rs"]
mod tests;
