//! Tool matching and argument rules, compiled from the configuration.

use std::borrow::Cow;

use globset::{GlobBuilder, GlobMatcher};
use regex_automata::meta::Regex;
use serde_json::Value;

use crate::config::{Action, JsonType, RawArgRule, RawMethodRule, RawToolRule};
use crate::keys::fold;

/// A compiled tool rule: a tenant's own, or one of `[policy]`'s shared by every tenant (its
/// limits are kept per tenant and label, not in the rule).
#[derive(Debug)]
pub struct ToolRule {
    /// Where it came from, e.g. `tenants[acme].policy.tools[2]` or `policy.tools[0]`.
    pub label: String,
    pub pattern: String,
    /// The glob of the upstream's name, when the pattern names one (`<upstream>/<tool>`).
    upstream: Option<Glob>,
    /// The glob of the tool's name, in which `*` matches `/` too; or, for a pattern whose
    /// upstream part holds `**` (`whole`), of `<upstream>/<tool>`, where `**` spans `/`.
    glob: Glob,
    whole: bool,
    /// `None`: the rule does not decide whether the tool is offered (see [`RawToolRule`]).
    pub action: Option<Action>,
    pub cost: Option<u64>,
    pub rate: Option<(u64, u64)>,
    pub max_concurrent: Option<u32>,
    pub max_arguments_bytes: Option<usize>,
    pub arguments: Vec<ArgRule>,
    /// The name of its rate and concurrency counters ([`name_counters`]).
    pub counter: String,
}

/// Names the counters of `rules` (one scope's, in order: `[policy]`'s or a tenant's) by what
/// each covers: its pattern, and how many rules with counters (a rate or a concurrency cap)
/// before it in the scope have the same. Named by their place in the file
/// (`tenants[acme].policy.tools[5]`), a reload that added a rule before one gave it fresh
/// counters, and another rule's: calls in flight under the old name no longer counted, and a
/// rule capped at one call ran two at once (an attacker's review; a review of the fix added a
/// rule of the same pattern that only set a cost). A reload that changes a rule's limits keeps
/// its counters, under its new limits. Left: a rule with counters added before another of the
/// same pattern and scope moves that one's.
pub fn name_counters(rules: &mut [ToolRule], scope: &str) {
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for rule in rules
        .iter_mut()
        .filter(|r| r.rate.is_some() || r.max_concurrent.is_some())
    {
        let n = seen.entry(rule.pattern.clone()).or_default();
        rule.counter = format!("{scope}:{}#{n}", rule.pattern);
        *n += 1;
    }
}

impl ToolRule {
    pub fn compile(label: String, raw: &RawToolRule) -> Result<Self, (String, String)> {
        // Split at the first `/`: an upstream's name holds none, a tool's may (outside the
        // characters the specification asks for, but served): `*` stopped at a `/`, so a tool
        // named `x/drop` escaped a tenant's `deny` of `*` (an attacker's review).
        // A pattern whose upstream part holds `**` (`**/drop`: the tool at any depth) is
        // matched whole, as before, `**` spanning the `/`s: split, it matched `drop` alone, and
        // `admin/drop` escaped a `deny` of it (a review of the split).
        let (upstream, tool) = match raw.pattern.split_once('/') {
            Some((upstream, tool)) => (Some(upstream), tool),
            None => (None, raw.pattern.as_str()),
        };
        let whole = upstream.is_some_and(|u| u.contains("**"));
        let invalid = |e| (format!("{label}.match"), e);
        let (upstream, glob) = if whole {
            (None, Glob::new(&raw.pattern, true).map_err(invalid)?)
        } else {
            (
                upstream
                    .map(|u| Glob::new(u, true))
                    .transpose()
                    .map_err(invalid)?,
                Glob::new(tool, false).map_err(invalid)?,
            )
        };
        if raw.burst.is_some() && raw.requests_per_sec.is_none() {
            return Err((format!("{label}.burst"), "needs `requests_per_sec`".into()));
        }
        if raw.requests_per_sec == Some(0) {
            return Err((
                format!("{label}.requests_per_sec"),
                "0 would refuse every call: use action = \"deny\"".into(),
            ));
        }
        let arguments = raw
            .arguments
            .iter()
            .enumerate()
            .map(|(i, a)| ArgRule::compile(format!("{label}.arguments[{i}]"), a))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            pattern: raw.pattern.clone(),
            upstream,
            glob,
            whole,
            action: raw.action,
            cost: raw.cost,
            rate: raw
                .requests_per_sec
                .map(|r| (r, raw.burst.unwrap_or(r).max(1))),
            max_concurrent: raw.max_concurrent,
            max_arguments_bytes: raw.max_arguments_bytes,
            arguments,
            counter: label.clone(),
            label,
        })
    }

    /// Whether this rule covers `tool` of `upstream` (the upstream's own name for it).
    pub fn matches(&self, upstream: &str, tool: &str) -> bool {
        if self.whole {
            return self.glob.is_match(&format!("{upstream}/{tool}"));
        }
        self.upstream.as_ref().is_none_or(|u| u.is_match(upstream)) && self.glob.is_match(tool)
    }

    /// Whether the rule reads a call's arguments (an argument rule, a size cap).
    pub fn checks_arguments(&self) -> bool {
        !self.arguments.is_empty() || self.max_arguments_bytes.is_some()
    }

    /// Whether the rule limits a call: checks its arguments, or caps a rate or concurrency.
    pub fn limits(&self) -> bool {
        self.checks_arguments() || self.rate.is_some() || self.max_concurrent.is_some()
    }

    /// Checks `arguments` (absent means `{}`) against the size cap and each argument rule; the
    /// refusal names the rule and says what is wrong.
    pub fn check_arguments(
        &self,
        arguments: Option<&Value>,
        message_bytes: usize,
        budget: &mut usize,
    ) -> Result<(), (String, String)> {
        if let Some(max) = self.max_arguments_bytes
            && message_bytes > max
        {
            let size = arguments.map_or(2, |a| {
                let mut count = Count(0);
                serde_json::to_writer(&mut count, a).map_or(usize::MAX, |()| count.0)
            });
            if size > max {
                return Err((
                    format!("{}.max_arguments_bytes", self.label),
                    format!("arguments are {size} bytes; at most {max} are allowed"),
                ));
            }
        }
        for rule in &self.arguments {
            rule.check(arguments, budget)
                .map_err(|why| (rule.label.clone(), why))?;
        }
        Ok(())
    }
}

/// A compiled method rule.
#[derive(Debug)]
pub struct MethodRule {
    /// Where it came from, e.g. `tenants[acme].policy.methods[0]`.
    pub label: String,
    pub pattern: String,
    glob: Glob,
    pub action: Action,
}

impl MethodRule {
    pub fn compile(label: String, raw: &RawMethodRule) -> Result<Self, (String, String)> {
        Ok(Self {
            glob: Glob::new(&raw.pattern, true).map_err(|e| (format!("{label}.match"), e))?,
            pattern: raw.pattern.clone(),
            action: raw.action,
            label,
        })
    }

    pub fn matches(&self, method: &str) -> bool {
        self.glob.is_match(method)
    }
}

/// A compiled `match` glob (`*` does not match `/`). Globs of literals and single `*`s, nearly
/// every rule, are matched directly: a compiled regex per rule cost ~20 KiB and ~0.2 ms to
/// build (1,000 rules: 20 MiB and 200 ms per load). Any other glob goes to `globset`.
#[derive(Debug)]
enum Glob {
    /// The pattern split at `/`, each piece split at `*` (`*` does not match `/`).
    Simple(Vec<Vec<Box<str>>>),
    /// The pattern split at `*`, which matches any run of characters, `/` too.
    Text(Vec<Box<str>>),
    Compiled(GlobMatcher),
}

impl Glob {
    /// `separator`: whether `*` stops at `/` (a method's `tools/*` does not match
    /// `notifications/tools/list_changed`).
    fn new(pattern: &str, separator: bool) -> Result<Self, String> {
        if !pattern.contains("**") && !pattern.contains(['?', '[', ']', '{', '}', ',', '\\']) {
            if !separator {
                return Ok(Self::Text(pattern.split('*').map(Box::from).collect()));
            }
            return Ok(Self::Simple(
                pattern
                    .split('/')
                    .map(|piece| piece.split('*').map(Box::from).collect())
                    .collect(),
            ));
        }
        GlobBuilder::new(pattern)
            .literal_separator(separator)
            .build()
            .map(|g| Self::Compiled(g.compile_matcher()))
            .map_err(|e| e.to_string())
    }

    fn is_match(&self, name: &str) -> bool {
        match self {
            // `*` cannot match `/`: pieces match pieces, as many on both sides.
            Self::Simple(pieces) => {
                let mut parts = name.split('/');
                pieces
                    .iter()
                    .all(|p| parts.next().is_some_and(|part| piece_matches(p, part)))
                    && parts.next().is_none()
            }
            Self::Text(lits) => piece_matches(lits, name),
            Self::Compiled(g) => g.is_match(name),
        }
    }
}

/// Whether `text` matches the literals `lits` joined by `*` (any run of characters).
/// Each middle literal taken at its leftmost place leaves the most room for the rest.
fn piece_matches(lits: &[Box<str>], text: &str) -> bool {
    let (first, rest) = match lits {
        [only] => return **only == *text,
        [first, rest @ ..] => (first, rest),
        [] => return text.is_empty(),
    };
    let Some((last, middle)) = rest.split_last() else {
        return false;
    };
    let Some(mut text) = text.strip_prefix(&**first) else {
        return false;
    };
    for lit in middle {
        let Some(at) = text.find(&**lit) else {
            return false;
        };
        text = &text[at + lit.len()..];
    }
    text.ends_with(&**last)
}

/// Counts what is written (the size of JSON without building it).
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
pub struct ArgRule {
    pub label: String,
    pointer: String,
    /// The pointer's reference tokens, unescaped once at load.
    tokens: Vec<String>,
    required: bool,
    kind: Option<JsonType>,
    one_of: Option<Vec<Value>>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    pattern: Option<(Regex, Box<str>)>,
    min_length: Option<usize>,
    max_length: Option<usize>,
}

impl ArgRule {
    pub fn compile(label: String, raw: &RawArgRule) -> Result<Self, (String, String)> {
        if !raw.pointer.is_empty() && !raw.pointer.starts_with('/') {
            return Err((
                format!("{label}.pointer"),
                format!("`{}`: a JSON pointer starts with `/`", raw.pointer),
            ));
        }
        let pattern = raw
            .pattern
            .as_deref()
            .map(|p| compile_pattern(p).map(|re| (re, Box::from(p))))
            .transpose()
            .map_err(|e| (format!("{label}.pattern"), e))?;
        if let (Some(lo), Some(hi)) = (raw.minimum, raw.maximum)
            && lo > hi
        {
            return Err((format!("{label}.minimum"), "is above `maximum`".into()));
        }
        let tokens = raw
            .pointer
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        Ok(Self {
            pointer: raw.pointer.clone(),
            tokens,
            required: raw.required,
            kind: raw.kind,
            one_of: raw.one_of.clone(),
            minimum: raw.minimum,
            maximum: raw.maximum,
            pattern,
            min_length: raw.min_length,
            max_length: raw.max_length,
            label,
        })
    }

    /// Whether `arguments` meet the rule; JSON text read in their strings is taken from
    /// `budget` (the message's, see [`json_held`]).
    pub fn check(&self, arguments: Option<&Value>, budget: &mut usize) -> Result<(), String> {
        let empty = Value::Object(serde_json::Map::new());
        let root = arguments.unwrap_or(&empty);
        let p = &self.pointer;
        let found = self.find(root, budget)?;
        let Some(v) = found.as_deref() else {
            return if self.required {
                Err(format!("argument `{p}` is required"))
            } else {
                Ok(())
            };
        };
        // A string that holds a JSON object, array or `null` is what the Python SDK's servers
        // run for a parameter not typed plain `str` (`str | list[str]`, say): the rule holds
        // for both it and the string. Before, `"[\"/etc/passwd\"]"` passed a pattern that
        // refuses `/`, and the tool got `["/etc/passwd"]`.
        if let Value::String(s) = v
            && let Some(held) = held_at_end(s, budget)
        {
            // Text that does not parse here may still parse in Python (`NaN`, `1e400`, a lone
            // surrogate): read as Python would, near enough for the rule. Text that parses in
            // neither (`[urgent] invoice`) is only a string.
            let inner = match held {
                Ok(inner) => Some(inner),
                Err(Unheld::NotJson) => as_python_reads(s),
                Err(Unheld::TooMany) => return Err(self.too_many(p)),
            };
            match inner {
                Some(Value::Null) if self.required => {
                    return Err(format!(
                        "argument `{p}` is required: the string `null` is none to a server that reads it as JSON"
                    ));
                }
                // Deeper than serde_json reads (128 levels), which Python's `json.loads` reads
                // to about 1,000: the rule cannot hold it to what it holds (an attacker's
                // review: `"[\"\u002fetc\u002fpasswd\", [[[...140 levels...]]]]"` passed a
                // pattern refusing `/`, and the tool got the list).
                None if nesting(s) > MAX_HELD_NESTING => {
                    return Err(format!(
                        "argument `{p}` holds JSON text nested deeper than {MAX_HELD_NESTING} levels, which a server may read as what it holds and the gateway does not: send the value itself"
                    ));
                }
                // None to the tool: nothing more to hold it to.
                Some(Value::Null) | None => {}
                Some(inner) => self.check_value(&inner).map_err(|e| {
                    format!(
                        "{e} (the string is JSON text, which a server may read as what it holds: send the value itself)"
                    )
                })?,
            }
        }
        self.check_value(v)
    }

    /// The rule's tests of the value found (present).
    fn check_value(&self, v: &Value) -> Result<(), String> {
        let p = &self.pointer;
        if let Some(kind) = self.kind
            && !is_type(v, kind)
        {
            return Err(format!(
                "argument `{p}` must be of type {}, not {}",
                type_name(kind),
                describe(v)
            ));
        }
        if let Some(allowed) = &self.one_of
            && !allowed.iter().any(|a| same(a, v))
        {
            return Err(format!("argument `{p}` must be one of {}", list(allowed)));
        }
        if self.minimum.is_some() || self.maximum.is_some() {
            let Value::Number(n) = v else {
                return Err(format!(
                    "argument `{p}` must be a number, not {}",
                    describe(v)
                ));
            };
            if let Some(lo) = self.minimum
                && compare(n, lo).is_lt()
            {
                return Err(format!("argument `{p}` is {v}; the minimum is {lo}"));
            }
            if let Some(hi) = self.maximum
                && compare(n, hi).is_gt()
            {
                return Err(format!("argument `{p}` is {v}; the maximum is {hi}"));
            }
        }
        if self.min_length.is_some() || self.max_length.is_some() {
            let len = match v {
                Value::String(s) => s.chars().count(),
                Value::Array(a) => a.len(),
                other => {
                    return Err(format!(
                        "argument `{p}` must be a string or an array, not {}",
                        describe(other)
                    ));
                }
            };
            if let Some(lo) = self.min_length
                && len < lo
            {
                return Err(format!(
                    "argument `{p}` has length {len}; the minimum is {lo}"
                ));
            }
            if let Some(hi) = self.max_length
                && len > hi
            {
                return Err(format!(
                    "argument `{p}` has length {len}; the maximum is {hi}"
                ));
            }
        }
        if let Some((re, source)) = &self.pattern {
            let Some(s) = v.as_str() else {
                return Err(format!(
                    "argument `{p}` must be a string, not {}",
                    describe(v)
                ));
            };
            if !re.is_match(s) {
                return Err(format!(
                    "argument `{p}` does not match the pattern `{source}`"
                ));
            }
        }
        Ok(())
    }
}

/// An argument's `pattern`, as `regex::Regex::new` compiles it (same syntax, limits, matches and
/// error messages) but without the full DFA that the meta engine builds for a small pattern when
/// `regex-automata`'s `dfa-build` is on (tracing's filter turns it on): that DFA took ~27 ms and
/// ~5 KiB per pattern to build, and much more in pages freed after the build; the lazy DFA
/// answers as fast for an argument's few bytes.
fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    use regex_automata::{MatchKind, meta, util::syntax};
    let config = meta::Config::new()
        .nfa_size_limit(Some(10 * (1 << 20)))
        .hybrid_cache_capacity(2 * (1 << 20))
        .match_kind(MatchKind::LeftmostFirst)
        .utf8_empty(true)
        .dfa(false);
    Regex::builder()
        .configure(config)
        .syntax(syntax::Config::new().utf8(true))
        .build(pattern)
        .map_err(|e| {
            // What `regex::Error` says for the same failures.
            if let Some(limit) = e.size_limit() {
                format!("Compiled regex exceeds size limit of {limit} bytes.")
            } else if let Some(syntax) = e.syntax_error() {
                syntax.to_string()
            } else {
                e.to_string()
            }
        })
}

/// What a string holds when it holds a JSON object or array, as the Python SDK's servers read
/// such a string (into the object their tool takes): `None` when it does not look like one,
/// else what parsing it gives. The values it holds are taken from `budget`, one message's:
/// a message is bounded to [`crate::values::MAX`] values, and the text in one of its strings
/// is one value to that bound, so a 4 MB string of `[0,0,...]` grew a worker by 230 MB for
/// every rule or loop breaker that read it (an attacker's review). Text of more values than
/// are left is not parsed ([`Unheld::TooMany`]).
pub(super) fn json_held(s: &str, budget: &mut usize) -> Option<Result<Value, Unheld>> {
    if !s
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with(['{', '['])
    {
        return None;
    }
    let values = crate::values::count(s.as_bytes(), *budget);
    if values > *budget {
        *budget = 0;
        return Some(Err(Unheld::TooMany));
    }
    *budget -= values;
    Some(serde_json::from_str(s).map_err(|_| Unheld::NotJson))
}

/// Why [`json_held`] gives no value for text that looks like JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unheld {
    /// serde_json does not read it (Python may: `NaN`, `1e400`, a lone surrogate).
    NotJson,
    /// It holds more values than the message has left to read.
    TooMany,
}

/// What Python's `json.loads` reads from `s` where serde_json does not: `NaN` and `Infinity`
/// (read as 0 here), a lone surrogate escape (read as U+0000), a number beyond `f64` (an
/// exponent read as e300 or e-300, an integer part as 300 nines: huge or tiny all the same).
/// `None` when that does not parse either.
fn as_python_reads(s: &str) -> Option<Value> {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &s[i..];
        if rest.starts_with("NaN") {
            out.push('0');
            i += 3;
        } else if rest.starts_with("Infinity") {
            out.push('0');
            i += 8;
        } else if rest.len() >= 6
            && rest.starts_with("\\u")
            && (rest.as_bytes()[2] | 0x20) == b'd'
            && matches!(rest.as_bytes()[3] | 0x20, b'8'..=b'9' | b'a'..=b'f')
            && rest.as_bytes()[4..6].iter().all(u8::is_ascii_hexdigit)
        {
            out.push_str("\\u0000");
            i += 6;
        } else if let Some(escaped) = rest.strip_prefix('\\').and_then(|r| r.chars().next()) {
            // Any other escape is kept whole (`\\\\` is not the start of another), whatever
            // character follows the backslash (one of several bytes split here panicked: a
            // fuzzer's find).
            out.push('\\');
            out.push(escaped);
            i += 1 + escaped.len_utf8();
        } else if (b[i] | 0x20) == b'e' && i > 0 && b[i - 1].is_ascii_digit() {
            let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
            let digits = b[i + 1 + sign..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            let exponent = s[i + 1 + sign..i + 1 + sign + digits].trim_start_matches('0');
            // Beyond f64 either way (Python reads inf, or 0).
            let huge = exponent.len() > 3 || (exponent.len() == 3 && exponent > "308");
            if huge {
                out.push_str(if b.get(i + 1) == Some(&b'-') {
                    "e-300"
                } else {
                    "e300"
                });
            } else {
                out.push_str(&s[i..i + 1 + sign + digits]);
            }
            i += 1 + sign + digits;
        } else if b[i].is_ascii_digit() && (i == 0 || !matches!(b[i - 1], b'0'..=b'9' | b'.')) {
            // An integer part past f64 (Python reads it exactly): still huge.
            let run = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
            if run > 300 {
                out.push_str(&"9".repeat(300));
            } else {
                out.push_str(&s[i..i + run]);
            }
            i += run;
        } else {
            let c = rest.chars().next()?;
            out.push(c);
            i += c.len_utf8();
        }
    }
    serde_json::from_str(&out).ok()
}

/// How deep JSON text held in a string may nest and still be only a string where it does not
/// parse: the gateway's own limit for a message.
const MAX_HELD_NESTING: usize = 100;

/// The deepest nesting of `[` and `{` in `s` outside its strings.
fn nesting(s: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for b in s.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// [`json_held`] for the value a rule tests: also `null`, which the Python SDK's servers read
/// as `None` for a parameter not typed plain `str` (a number, a boolean or a string held is
/// left a string there).
fn held_at_end(s: &str, budget: &mut usize) -> Option<Result<Value, Unheld>> {
    if s.trim_matches([' ', '\t', '\n', '\r']) == "null" {
        return Some(Ok(Value::Null));
    }
    json_held(s, budget)
}

impl ArgRule {
    /// The value the pointer names (RFC 6901), read so that no server acts on a value the rule
    /// did not see:
    /// - a string on the way that holds a JSON object or array is read as that (the Python
    ///   SDK's servers decode such a string into the object their tool takes); one that looks
    ///   like one but does not parse here (`NaN`, `1e400`, a lone surrogate, which Python
    ///   reads) is refused;
    /// - an object on the way that holds another spelling of the key (`Path`, `ſql`: Go's
    ///   `encoding/json` matches fields ignoring case, Python and TypeScript do not) is
    ///   refused ([`key_in`]).
    ///
    /// Borrowed, unless it went through such a string.
    fn find<'v>(
        &self,
        root: &'v Value,
        budget: &mut usize,
    ) -> Result<Option<Cow<'v, Value>>, String> {
        let mut at: Cow<'v, Value> = Cow::Borrowed(root);
        for (i, t) in self.tokens.iter().enumerate() {
            if let Value::String(s) = &*at
                && let Some(parsed) = json_held(s, budget)
            {
                match parsed {
                    Ok(inner) => at = Cow::Owned(inner),
                    Err(Unheld::TooMany) => return Err(self.too_many(&self.prefix(i))),
                    Err(Unheld::NotJson) => {
                        return Err(format!(
                            "argument `{}`: `{}` holds text that looks like JSON but is not JSON the gateway can read as every server does",
                            self.pointer,
                            self.prefix(i)
                        ));
                    }
                }
            }
            // A list where the rule names a member of an object: a server whose tool takes
            // either there (`opts: Options | list[Options]`) runs every item, none of which
            // the rule would see (an attacker's review: `{"opts": [{"path": "/etc/shadow"}]}`
            // passed `/opts/path` held to `^/tmp/`).
            if at.is_array() && !is_index(t) {
                return Err(format!(
                    "argument `{}`: `{}` is a list where the rule names the member {t:?} of an object, and a server may run each of its items: send the object",
                    self.pointer,
                    self.prefix(i)
                ));
            }
            let next = match at {
                Cow::Borrowed(v) => step(v, t)
                    .map_err(|k| self.spelling(i, &k))?
                    .map(Cow::Borrowed),
                Cow::Owned(v) => step(&v, t)
                    .map_err(|k| self.spelling(i, &k))?
                    .map(|x| Cow::Owned(x.clone())),
            };
            let Some(next) = next else {
                return Ok(None);
            };
            at = next;
        }
        Ok(Some(at))
    }

    /// The refusal of a call whose JSON text at `at` (a pointer) holds more values than the
    /// message had left to read ([`json_held`]).
    fn too_many(&self, at: &str) -> String {
        format!(
            "argument `{}`: `{at}` holds JSON text of more values than one request may read ({} in all of its strings), which the gateway does not read: send the value itself",
            self.pointer,
            crate::values::MAX
        )
    }

    /// The pointer's first `depth` tokens, as a pointer.
    fn prefix(&self, depth: usize) -> String {
        self.tokens[..depth]
            .iter()
            .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
            .collect()
    }

    fn spelling(&self, depth: usize, key: &str) -> String {
        format!(
            "argument `{}`: the object at `{}` holds the key {key:?}, another spelling of {:?}, which some servers read as that key and others ignore",
            self.pointer,
            self.prefix(depth),
            self.tokens[depth]
        )
    }
}

/// Whether a pointer's token names an item of a list (RFC 6901: digits, no leading zero).
fn is_index(token: &str) -> bool {
    !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'))
}

/// One step of a pointer: the member `token` names in `v`, or `None`. Err: a key of an
/// object that some server could read as `token` ([`key_in`]).
fn step<'v>(v: &'v Value, token: &str) -> Result<Option<&'v Value>, String> {
    match v {
        Value::Object(o) => key_in(o, token),
        Value::Array(a) => Ok(is_index(token)
            .then(|| token.parse::<usize>().ok())
            .flatten()
            .and_then(|i| a.get(i))),
        _ => Ok(None),
    }
}

/// The value under the key `token` in `o`. Err: another key that some server reads as that
/// member, while others ignore it or read it apart, so that whichever the rule checked, some
/// server would act on another value, or on its default:
/// - equal to it under simple case folding (`Path`, `ſql` for `sql`), as Go's `encoding/json`
///   matches a field (the last one in the text winning);
/// - equal to it but for `_` as well (`file_path` for `filePath`), as pydantic reads a
///   field by its name and its alias (`alias_generator=to_camel, populate_by_name=True`, as
///   the MCP SDK's own types are);
/// - for a key that reads as a number, another that reads as the same one (`01`, ` 1`, `+1`,
///   `1.0` for `1`), as pydantic reads `dict[int, _]` and zod a record keyed by numbers (an
///   attacker's review: `{"1": 5, "01": 100000}` passed a `maximum = 100` on `/limits/1`,
///   and both SDKs' tools got 100000).
fn key_in<'v>(
    o: &'v serde_json::Map<String, Value>,
    token: &str,
) -> Result<Option<&'v Value>, String> {
    // Compared character by character as folded, without a copy of either (every key of
    // every object on a rule's path, for every call).
    let name = |k: &'v str| k.chars().filter(|c| *c != '_').map(fold);
    let token_number = as_number(token).filter(|n| !n.is_nan());
    let other = o.keys().find(|k| {
        k.as_str() != token
            && ((k.len() <= 8 * token.len().max(1)
                && token.len() <= 8 * k.len().max(1)
                && name(k).eq(token.chars().filter(|c| *c != '_').map(fold)))
                || token_number.is_some() && as_number(k) == token_number)
    });
    match other {
        Some(k) => Err(k.clone()),
        None => Ok(o.get(token)),
    }
}

/// The number a server may read a key as: Python's `int` and `float` (around spaces, a sign,
/// leading zeros, `_` between digits, a fraction or exponent) and JavaScript's `Number` (also
/// `0x`, `0o` and `0b`, and the empty key as 0).
fn as_number(key: &str) -> Option<f64> {
    let t = key.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if t.is_empty() {
        return Some(0.0);
    }
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(digits) = t
            .get(..2)
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .map(|_| &t[2..])
        {
            return u64::from_str_radix(digits, radix).ok().map(|v| v as f64);
        }
    }
    let b = t.as_bytes();
    let underscores_between_digits = b.iter().enumerate().all(|(i, c)| {
        *c != b'_'
            || (i > 0 && b[i - 1].is_ascii_digit() && b.get(i + 1).is_some_and(u8::is_ascii_digit))
    });
    if !underscores_between_digits {
        return None;
    }
    let plain = if t.contains('_') {
        std::borrow::Cow::Owned(t.replace('_', ""))
    } else {
        std::borrow::Cow::Borrowed(t)
    };
    // Words (`inf`, `nan`) are not numbers a key is read as here.
    if plain
        .bytes()
        .any(|c| c.is_ascii_alphabetic() && !matches!(c, b'e' | b'E'))
    {
        return None;
    }
    plain.parse::<f64>().ok()
}

/// `n` if it is an integer (JSON without a fraction or exponent), exactly.
fn exact_int(n: &serde_json::Number) -> Option<i128> {
    n.as_i64().map(i128::from).or(n.as_u64().map(i128::from))
}

/// How the number `n` compares with the bound `b`, exactly: an integer beyond 2^53 is not
/// rounded to the nearest float first (Python and Go read it exactly).
fn compare(n: &serde_json::Number, b: f64) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match exact_int(n) {
        // An integer against the integers around the bound: n < b ⟺ n < ⌈b⌉, n > b ⟺ n > ⌊b⌋.
        Some(i) if b.is_finite() && b.abs() < 1e38 => {
            if i < b.ceil() as i128 {
                Ordering::Less
            } else if i > b.floor() as i128 {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        }
        _ => n
            .as_f64()
            .and_then(|x| x.partial_cmp(&b))
            .unwrap_or(Ordering::Greater),
    }
}

fn is_type(v: &Value, kind: JsonType) -> bool {
    match kind {
        JsonType::String => v.is_string(),
        // JSON Schema: 1.0 is an integer too.
        JsonType::Integer => {
            v.is_i64()
                || v.is_u64()
                || v.as_f64()
                    .is_some_and(|f| f.is_finite() && f.fract() == 0.0)
        }
        JsonType::Number => v.is_number(),
        JsonType::Boolean => v.is_boolean(),
        JsonType::Object => v.is_object(),
        JsonType::Array => v.is_array(),
        JsonType::Null => v.is_null(),
    }
}

fn type_name(kind: JsonType) -> &'static str {
    match kind {
        JsonType::String => "string",
        JsonType::Integer => "integer",
        JsonType::Number => "number",
        JsonType::Boolean => "boolean",
        JsonType::Object => "object",
        JsonType::Array => "array",
        JsonType::Null => "null",
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Equality where numbers compare by value (`1` equals `1.0`), integers exactly (two
/// integers beyond 2^53 that round to one float are two values).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (exact_int(x), exact_int(y)) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

fn list(values: &[Value]) -> String {
    let items: Vec<String> = values.iter().map(Value::to_string).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A whole message's budget of values (see [`json_held`]).
    fn budget() -> usize {
        crate::values::MAX
    }

    fn rule(toml_text: &str) -> ArgRule {
        let raw: RawArgRule = toml::from_str(toml_text).expect("rule parses");
        ArgRule::compile("r".into(), &raw).expect("rule compiles")
    }

    fn tool(toml_text: &str) -> ToolRule {
        let raw: RawToolRule = toml::from_str(toml_text).expect("rule parses");
        ToolRule::compile("t".into(), &raw).expect("rule compiles")
    }

    /// JSON text in a message's strings is read within the values one message may hold, for
    /// all of a tool's rules together: a 4 MB string of `[0,0,...]` (one value to the message's
    /// count) grew a worker by 230 MB for each rule or breaker that read it (an attacker's
    /// review). Past them the call is refused, never read.
    #[test]
    fn json_text_in_strings_is_read_within_one_messages_values() {
        let zeros = |n: usize| format!("[{}0]", "0,".repeat(n - 1));
        let mut left = 10;
        assert_eq!(
            json_held(&zeros(4), &mut left),
            Some(Ok(json!([0, 0, 0, 0])))
        );
        assert_eq!(left, 5);
        assert_eq!(json_held(&zeros(6), &mut left), Some(Err(Unheld::TooMany)));
        assert_eq!(json_held("[1]", &mut left), Some(Err(Unheld::TooMany)));
        assert_eq!(json_held("plain", &mut left), None);

        let over = zeros(crate::values::MAX + 1);
        let at_end = rule("pointer = \"/list\"\ntype = \"array\"");
        let err = at_end
            .check(Some(&json!({ "list": over })), &mut budget())
            .unwrap_err();
        assert!(err.contains("more values"), "{err}");
        let on_the_way = rule("pointer = \"/opts/path\"\npattern = \"^/tmp/\"");
        let err = on_the_way
            .check(
                Some(&json!({ "opts": format!("{{\"path\": \"/tmp/a\", \"pad\": {over}}}") })),
                &mut budget(),
            )
            .unwrap_err();
        assert!(
            err.contains("`/opts` holds JSON text of more values"),
            "{err}"
        );
        // Two rules of one tool share the message's: each half passes alone, not both.
        let half = zeros(crate::values::MAX / 2 + 2);
        let both = tool(
            "match = \"t\"\narguments = [{ pointer = \"/a\", required = true }, { pointer = \"/b\", required = true }]",
        );
        let args = json!({ "a": half, "b": half });
        let (label, why) = both
            .check_arguments(Some(&args), 0, &mut budget())
            .unwrap_err();
        assert!(
            label.ends_with("arguments[1]") || label.contains('1'),
            "{label}: {why}"
        );
        assert!(why.contains("more values"), "{why}");
        assert!(
            both.check_arguments(Some(&json!({ "a": half, "b": "[]" })), 0, &mut budget())
                .is_ok()
        );
    }

    /// The value a rule tests, sent as a string holding JSON: the Python SDK's servers run what
    /// it holds for a parameter not typed plain `str` (found by an attacker's review), so the
    /// rule holds for that too.
    #[test]
    fn a_tested_value_sent_as_json_text_is_tested_as_what_it_holds() {
        let r =
            rule("pointer = \"/path\"\ntype = \"string\"\npattern = \"^[^/]+$\"\nrequired = true");
        assert!(
            r.check(Some(&json!({"path": "notes.txt"})), &mut budget())
                .is_ok()
        );
        assert!(
            r.check(Some(&json!({"path": "/etc/passwd"})), &mut budget())
                .is_err()
        );
        // What the review sent: the text passed the pattern, the tool got ["/etc/passwd"].
        let err = r
            .check(
                Some(&json!({"path": "[\"\\u002fetc\\u002fpasswd\"]"})),
                &mut budget(),
            )
            .unwrap_err();
        assert!(err.contains("must be of type string"), "{err}");
        let err = r
            .check(Some(&json!({"path": " null "})), &mut budget())
            .unwrap_err();
        assert!(err.contains("is required"), "{err}");
        // Python reads what serde_json does not: checked as Python reads it.
        for text in [
            "[NaN]",
            "[\"\\u002fetc\", NaN]",
            "[\"\\ud800\", \"\\u002fetc\"]",
            "[\"\\u002fetc\", 1e400]",
        ] {
            let err = r
                .check(Some(&json!({ "path": text })), &mut budget())
                .unwrap_err();
            assert!(err.contains("JSON text"), "{text}: {err}");
        }
        // Text that parses in neither is only a string; `null` is none to a rule not required.
        let short = rule("pointer = \"/path\"\nmax_length = 40");
        for text in ["[urgent] invoice", "{name}", "[dbo].[t]", "null"] {
            assert!(
                short
                    .check(Some(&json!({ "path": text })), &mut budget())
                    .is_ok(),
                "{text}"
            );
        }
        assert!(as_python_reads("[1e999, 2E+400, 1e-999]").is_some());
        // An integer past f64, which Python reads exactly.
        let big = format!("[\"\\u002fetc\", {}]", "1".repeat(400));
        let err = r
            .check(Some(&json!({ "path": big })), &mut budget())
            .unwrap_err();
        assert!(err.contains("JSON text"), "{err}");
        assert_eq!(as_python_reads("[\"a\\\\\"]"), Some(json!(["a\\"])));
        // A backslash before a character of several bytes, anywhere, as text at a rule's
        // pointer: read, never split (it panicked, a fuzzer's find; one request stopped a
        // worker).
        for text in [
            "[\\\u{ffff}",
            "[\"\\\u{ffff}\"]",
            "{\"a\\é\": 1",
            "[\\\u{10348}]",
            "[\\",
            "[1e\u{ffff}]",
            "[9\u{ffff}e",
            "[\"\\ud8\u{ffff}\"]",
            "[\"\\uda\u{e9}\"]",
        ] {
            let _ = as_python_reads(text);
            let _ = r.check(Some(&json!({ "path": text })), &mut budget());
        }
        // With no type, the array held meets the pattern, which takes strings only.
        let p = rule("pointer = \"/path\"\npattern = \"^[^/]+$\"");
        assert!(
            p.check(Some(&json!({"path": "[\"a\"]"})), &mut budget())
                .is_err()
        );
        // A number, a boolean or a string held stays a string there: tested as it is.
        for s in ["5", "true", "\"x\""] {
            assert!(
                p.check(Some(&json!({ "path": s })), &mut budget()).is_ok(),
                "{s}"
            );
        }
    }

    /// What an attacker's review got past argument rules to real SDK servers, each refused now:
    /// JSON text nested deeper than serde_json reads (Python's `json.loads` reads it), a key
    /// that pydantic and zod read as the same number as the ruled one, and a key pydantic
    /// reads by its field name for the ruled alias.
    #[test]
    fn what_servers_read_as_the_ruled_value_is_held_to_the_rule() {
        let r = rule("pointer = \"/paths\"\ntype = \"string\"\npattern = \"^[^/]+$\"");
        let deep = format!(
            "[\"\\u002fetc\\u002fpasswd\", {}{}]",
            "[".repeat(140),
            "]".repeat(140)
        );
        let err = r
            .check(Some(&json!({ "paths": deep })), &mut budget())
            .unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
        // Brackets in a string, or few of them, are still only a string.
        let brackets = format!("\"{}\"", "[".repeat(300));
        assert!(
            r.check(Some(&json!({ "paths": brackets })), &mut budget())
                .is_ok()
        );
        assert!(
            r.check(Some(&json!({"paths": "[urgent] invoice"})), &mut budget())
                .is_ok()
        );
        assert_eq!(nesting("[\"[[[\", {\"a\": [1]}]"), 3);

        let max = rule("pointer = \"/limits/1\"\nmaximum = 100");
        assert!(
            max.check(
                Some(&json!({"limits": {"1": 5, "2": 100_000}})),
                &mut budget()
            )
            .is_ok()
        );
        for other in ["01", " 1", "+1", "1.0", "1e0", "0x1", "0b1", "1_0"] {
            let limits = json!({"limits": {"1": 5, other: 100_000}});
            let read = max.check(Some(&limits), &mut budget());
            if other == "1_0" {
                assert!(read.is_ok(), "{other} is 10: {read:?}");
            } else {
                let err = read.unwrap_err();
                assert!(err.contains("another spelling"), "{other}: {err}");
            }
            // Alone, too: the rule would see nothing there.
            let alone = json!({"limits": {other: 100_000}});
            assert_eq!(
                max.check(Some(&alone), &mut budget()).is_err(),
                other != "1_0",
                "{other}"
            );
        }
        assert!(as_number("1_0") == Some(10.0) && as_number("1__0").is_none());
        assert!(as_number("inf").is_none() && as_number("").is_some());

        let alias = rule("pointer = \"/opts/filePath\"\npattern = \"^/srv/\"");
        assert!(
            alias
                .check(
                    Some(&json!({"opts": {"filePath": "/srv/a"}})),
                    &mut budget()
                )
                .is_ok()
        );
        for other in ["file_path", "FILE_PATH", "FilePath", "_filepath"] {
            let err = alias
                .check(
                    Some(&json!({"opts": { other: "/etc/shadow" }})),
                    &mut budget(),
                )
                .unwrap_err();
            assert!(err.contains("another spelling"), "{other}: {err}");
        }
        assert!(
            alias
                .check(Some(&json!({"opts": {"fileName": "x"}})), &mut budget())
                .is_ok()
        );
        // `-` is part of a name (and of a negative number).
        assert!(
            alias
                .check(Some(&json!({"opts": {"file-path": "x"}})), &mut budget())
                .is_ok()
        );
        assert!(
            max.check(Some(&json!({"limits": {"1": 5, "-1": 7}})), &mut budget())
                .is_ok()
        );
    }

    /// A server may read a nested argument through a string holding JSON (the Python SDK
    /// decodes it) or under another spelling of its key (Go): the rule reads it there too.
    #[test]
    fn nested_arguments_are_read_as_servers_read_them() {
        let r = rule("pointer = \"/opts/path\"\npattern = \"^/srv/\"");
        assert!(
            r.check(Some(&json!({"opts": {"path": "/srv/a"}})), &mut budget())
                .is_ok()
        );
        assert!(
            r.check(
                Some(&json!({"opts": {"path": "/etc/shadow"}})),
                &mut budget()
            )
            .is_err()
        );
        // The parent sent as JSON text.
        let text = json!({"opts": "{\"path\": \"/etc/shadow\"}"});
        assert!(
            r.check(Some(&text), &mut budget())
                .unwrap_err()
                .contains("does not match")
        );
        assert!(
            r.check(
                Some(&json!({"opts": "{\"path\": \"/srv/b\"}"})),
                &mut budget()
            )
            .is_ok()
        );
        // A string that is not a JSON object or array holds nothing.
        assert!(
            r.check(Some(&json!({"opts": "plain"})), &mut budget())
                .is_ok()
        );
        // A list where the rule names an object's member, itself or as JSON text: a server
        // taking either runs each item (an attacker's review).
        for opts in [
            json!([{"path": "/etc/shadow"}]),
            json!([{"path": "/srv/a"}]),
            json!("[{\"path\": \"/etc/shadow\"}]"),
            json!([]),
        ] {
            let err = r
                .check(Some(&json!({ "opts": opts })), &mut budget())
                .unwrap_err();
            assert!(err.contains("is a list"), "{opts}: {err}");
        }
        // An index into a list is read; one past its end is absent.
        let first = rule("pointer = \"/opts/0/path\"\npattern = \"^/srv/\"");
        assert!(
            first
                .check(Some(&json!({"opts": [{"path": "/srv/a"}]})), &mut budget())
                .is_ok()
        );
        assert!(
            first
                .check(Some(&json!({"opts": [{"path": "/etc"}]})), &mut budget())
                .is_err()
        );
        assert!(
            first
                .check(Some(&json!({"opts": []})), &mut budget())
                .is_ok()
        );
        assert!(
            first
                .check(Some(&json!({"opts": [[{"path": "/etc"}]]})), &mut budget())
                .is_err()
        );
        // One that looks like one but is not JSON here, while Python reads it: refused.
        for text in [
            "{\"path\": \"/etc/shadow\", \"x\": NaN}",
            "{\"path\": \"/etc/shadow\", \"x\": 1e400}",
            " \n[\"/etc/shadow\"",
        ] {
            let err = r
                .check(Some(&json!({"opts": text})), &mut budget())
                .unwrap_err();
            assert!(err.contains("looks like JSON"), "{text}: {err}");
        }
        let items = rule("pointer = \"/paths/0\"\npattern = \"^/srv/\"");
        assert!(
            items
                .check(Some(&json!({"paths": "[\"/etc/shadow\"]"})), &mut budget())
                .is_err()
        );
        // Another spelling of a key, alone or beside the exact one: refused, whatever its
        // value (Go reads it as the key, Python and TypeScript ignore it).
        for spelled in ["Path", "PATH", "pAth"] {
            for value in ["/etc/shadow", "/srv/a"] {
                let args = json!({"opts": {spelled: value}});
                let err = r.check(Some(&args), &mut budget()).unwrap_err();
                assert!(err.contains("another spelling"), "{spelled}: {err}");
            }
        }
        let sql = rule("pointer = \"/sql\"\nrequired = true\npattern = \"^SELECT \"");
        assert!(
            sql.check(Some(&json!({"sql": "SELECT 1"})), &mut budget())
                .is_ok()
        );
        assert!(
            sql.check(Some(&json!({"ſql": "SELECT 1"})), &mut budget())
                .is_err()
        );
        let err = sql
            .check(
                Some(&json!({"sql": "SELECT 1", "ſql": "DROP TABLE t"})),
                &mut budget(),
            )
            .unwrap_err();
        assert!(err.contains("another spelling"), "{err}");
        let flag = rule("pointer = \"/dry_run\"\nrequired = true\nenum = [true]");
        assert!(
            flag.check(Some(&json!({"Dry_run": true})), &mut budget())
                .is_err()
        );
        let k = rule("pointer = \"/key\"\nrequired = true\nmax_length = 3");
        assert!(
            k.check(Some(&json!({"\u{212a}ey": "ab"})), &mut budget())
                .is_err()
        );
        // Dotted and dotless i are `i` to Go (its simple lower case of dotted I is `i`).
        let id = rule("pointer = \"/id\"\nmax_length = 3");
        for spelled in ["\u{130}d", "\u{131}d", "\u{130}D"] {
            let err = id
                .check(Some(&json!({ spelled: "abcdef" })), &mut budget())
                .unwrap_err();
            assert!(err.contains("another spelling"), "{spelled}: {err}");
        }
        // Folding is one character to one: `ß` is not `ss`.
        let ss = rule("pointer = \"/strasse\"\nrequired = true");
        assert!(
            ss.check(Some(&json!({"straße": 1})), &mut budget())
                .is_err()
        );
    }

    /// Integers beyond 2^53 are compared exactly, in lists and against bounds.
    #[test]
    fn large_integers_are_compared_exactly() {
        let one_of = rule("pointer = \"/id\"\nenum = [1234567890123456789]");
        assert!(
            one_of
                .check(
                    Some(&json!({"id": 1_234_567_890_123_456_789_u64})),
                    &mut budget()
                )
                .is_ok()
        );
        assert!(
            one_of
                .check(
                    Some(&json!({"id": 1_234_567_890_123_456_790_u64})),
                    &mut budget()
                )
                .is_err()
        );
        let max = rule("pointer = \"/n\"\nmaximum = 9007199254740992");
        assert!(
            max.check(
                Some(&json!({"n": 9_007_199_254_740_992_u64})),
                &mut budget()
            )
            .is_ok()
        );
        assert!(
            max.check(
                Some(&json!({"n": 9_007_199_254_740_993_u64})),
                &mut budget()
            )
            .is_err()
        );
        let min = rule("pointer = \"/n\"\nminimum = 0.5\nmaximum = 2.5");
        assert!(min.check(Some(&json!({"n": 0})), &mut budget()).is_err());
        assert!(min.check(Some(&json!({"n": 1})), &mut budget()).is_ok());
        assert!(min.check(Some(&json!({"n": 2})), &mut budget()).is_ok());
        assert!(min.check(Some(&json!({"n": 3})), &mut budget()).is_err());
        assert!(min.check(Some(&json!({"n": 2.5})), &mut budget()).is_ok());
        assert!(min.check(Some(&json!({"n": 2.6})), &mut budget()).is_err());
    }

    #[test]
    fn absent_and_empty_arguments() {
        let r = rule("pointer = \"/path\"\ntype = \"string\"");
        assert_eq!(r.check(None, &mut budget()), Ok(()));
        assert_eq!(r.check(Some(&json!({})), &mut budget()), Ok(()));
        let req = rule("pointer = \"/path\"\nrequired = true");
        assert_eq!(
            req.check(None, &mut budget()).unwrap_err(),
            "argument `/path` is required"
        );
        assert!(req.check(Some(&json!({})), &mut budget()).is_err());
        assert!(
            req.check(Some(&json!({"path": null})), &mut budget())
                .is_ok(),
            "present, even if null"
        );
    }

    #[test]
    fn types_including_integers_written_as_floats() {
        let r = rule("pointer = \"/n\"\ntype = \"integer\"");
        assert!(r.check(Some(&json!({"n": 3})), &mut budget()).is_ok());
        assert!(r.check(Some(&json!({"n": -3})), &mut budget()).is_ok());
        assert!(r.check(Some(&json!({"n": 3.0})), &mut budget()).is_ok());
        assert!(
            r.check(Some(&json!({"n": u64::MAX})), &mut budget())
                .is_ok()
        );
        assert_eq!(
            r.check(Some(&json!({"n": 3.5})), &mut budget())
                .unwrap_err(),
            "argument `/n` must be of type integer, not number"
        );
        assert!(r.check(Some(&json!({"n": "3"})), &mut budget()).is_err());
        let s = rule("pointer = \"/s\"\ntype = \"string\"");
        assert!(s.check(Some(&json!({"s": 1})), &mut budget()).is_err());
        let o = rule("pointer = \"/o\"\ntype = \"object\"");
        assert!(o.check(Some(&json!({"o": {}})), &mut budget()).is_ok());
        assert!(o.check(Some(&json!({"o": []})), &mut budget()).is_err());
    }

    #[test]
    fn numeric_ranges_with_huge_numbers() {
        let r = rule("pointer = \"/n\"\nminimum = 0\nmaximum = 100");
        assert!(r.check(Some(&json!({"n": 0})), &mut budget()).is_ok());
        assert!(r.check(Some(&json!({"n": 100})), &mut budget()).is_ok());
        assert!(r.check(Some(&json!({"n": 100.5})), &mut budget()).is_err());
        assert!(r.check(Some(&json!({"n": -1})), &mut budget()).is_err());
        assert!(
            r.check(Some(&json!({"n": u64::MAX})), &mut budget())
                .is_err()
        );
        assert!(
            r.check(Some(&json!({"n": i64::MIN})), &mut budget())
                .is_err()
        );
        assert!(r.check(Some(&json!({"n": 1e300})), &mut budget()).is_err());
        let huge: Value = serde_json::from_str("{\"n\": 1e308}").unwrap();
        assert!(r.check(Some(&huge), &mut budget()).is_err());
        assert_eq!(
            r.check(Some(&json!({"n": "5"})), &mut budget())
                .unwrap_err(),
            "argument `/n` must be a number, not string"
        );
    }

    #[test]
    fn enums_compare_numbers_by_value() {
        let r = rule("pointer = \"/mode\"\nenum = [\"read\", \"list\", 1]");
        assert!(
            r.check(Some(&json!({"mode": "read"})), &mut budget())
                .is_ok()
        );
        assert!(r.check(Some(&json!({"mode": 1.0})), &mut budget()).is_ok());
        assert_eq!(
            r.check(Some(&json!({"mode": "write"})), &mut budget())
                .unwrap_err(),
            "argument `/mode` must be one of [\"read\", \"list\", 1]"
        );
    }

    #[test]
    fn patterns_and_lengths_count_characters_not_bytes() {
        let r = rule("pointer = \"/name\"\npattern = \"^[a-zé]+$\"\nmax_length = 4");
        assert!(
            r.check(Some(&json!({"name": "café"})), &mut budget())
                .is_ok(),
            "4 chars, 5 bytes"
        );
        assert!(
            r.check(Some(&json!({"name": "cafés"})), &mut budget())
                .is_err()
        );
        assert!(
            r.check(Some(&json!({"name": "CAFE"})), &mut budget())
                .is_err()
        );
        let emoji = rule("pointer = \"/t\"\nmin_length = 2\nmax_length = 2");
        assert!(
            emoji
                .check(Some(&json!({"t": "✓✓"})), &mut budget())
                .is_ok()
        );
        assert!(
            emoji
                .check(Some(&json!({"t": "👍"})), &mut budget())
                .is_err()
        );
        let items = rule("pointer = \"/list\"\nmax_length = 2");
        assert!(
            items
                .check(Some(&json!({"list": [1, 2]})), &mut budget())
                .is_ok()
        );
        assert!(
            items
                .check(Some(&json!({"list": [1, 2, 3]})), &mut budget())
                .is_err()
        );
        // An unanchored pattern finds a match anywhere, as in JSON Schema.
        let sub = rule("pointer = \"/p\"\npattern = \"\\\\.\\\\.\"");
        assert!(
            sub.check(Some(&json!({"p": "a/../b"})), &mut budget())
                .is_ok()
        );
    }

    #[test]
    fn deep_pointers_and_escapes() {
        let r = rule("pointer = \"/a/b~1c/0/d\"\ntype = \"boolean\"");
        let deep = json!({"a": {"b/c": [{"d": true}]}});
        assert!(r.check(Some(&deep), &mut budget()).is_ok());
        let wrong = json!({"a": {"b/c": [{"d": "yes"}]}});
        assert!(r.check(Some(&wrong), &mut budget()).is_err());
        // 64 levels of nesting: found and checked.
        let mut v = json!(7);
        let mut ptr = String::new();
        for _ in 0..64 {
            v = json!({ "x": v });
            ptr.push_str("/x");
        }
        let deep = rule(&format!("pointer = \"{ptr}\"\nmaximum = 5"));
        assert!(deep.check(Some(&v), &mut budget()).is_err());
    }

    #[test]
    fn tool_globs_per_upstream_and_size_caps() {
        let any = tool("match = \"delete_*\"\naction = \"deny\"");
        assert!(any.matches("github", "delete_repo"));
        assert!(!any.matches("github", "create_repo"));
        let qualified = tool("match = \"github/create_*\"");
        assert!(qualified.matches("github", "create_issue"));
        assert!(!qualified.matches("gitlab", "create_issue"));
        // A tool's name may hold `/`: `*` matches it there, as any other character (a tool
        // named `x/drop` escaped a `deny` of `*`), but not in the upstream's part.
        let every = tool("match = \"*\"");
        assert!(every.matches("u", "x/drop") && every.matches("u", "/"));
        let any_upstream = tool("match = \"*/*_drop\"");
        assert!(any_upstream.matches("u", "x/y_drop"));
        assert!(!any_upstream.matches("u", "x/y_keep"));
        let own = tool("match = \"github/*\"");
        assert!(own.matches("github", "a/b"));
        assert!(!own.matches("git", "hub/a"));
        let slash = tool("match = \"u/x/*\"");
        assert!(slash.matches("u", "x/y") && !slash.matches("u/x", "y"));
        // `**` in the upstream's part: the pattern whole, `**` spanning `/`s.
        let deep = tool("match = \"**/drop\"");
        assert!(deep.matches("u", "drop") && deep.matches("u", "admin/drop"));
        assert!(!deep.matches("u", "dropped"));
        let deep = tool("match = \"**/delete_*\"");
        assert!(deep.matches("u", "ns/delete_x") && !deep.matches("u", "keep"));
        let every = tool("match = \"*/delete_*\"");
        assert!(every.matches("fs", "delete_file"));
        assert!(!every.matches("fs", "read_file"));
        let capped = tool("match = \"*\"\nmax_arguments_bytes = 20");
        assert!(
            capped
                .check_arguments(None, usize::MAX, &mut budget())
                .is_ok()
        );
        assert!(
            capped
                .check_arguments(Some(&json!({"a": "short"})), usize::MAX, &mut budget())
                .is_ok()
        );
        let (label, why) = capped
            .check_arguments(
                Some(&json!({"a": "x".repeat(30)})),
                usize::MAX,
                &mut budget(),
            )
            .unwrap_err();
        assert_eq!(label, "t.max_arguments_bytes");
        assert!(why.contains("at most 20"), "{why}");
    }

    #[test]
    fn bad_rules_are_refused_at_load_naming_the_key() {
        let raw: RawArgRule = toml::from_str("pointer = \"/a\"\npattern = \"(\"").unwrap();
        assert_eq!(
            ArgRule::compile("r".into(), &raw).unwrap_err().0,
            "r.pattern"
        );
        let raw: RawArgRule = toml::from_str("pointer = \"a\"").unwrap();
        assert_eq!(
            ArgRule::compile("r".into(), &raw).unwrap_err().0,
            "r.pointer"
        );
        let raw: RawToolRule = toml::from_str("match = \"[\"").unwrap();
        assert_eq!(
            ToolRule::compile("t".into(), &raw).unwrap_err().0,
            "t.match"
        );
    }
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod compile_tests;
