//! 2026-07-28 `Mcp-Param-{Name}` headers: a tool's input schema may mark an argument with
//! `x-mcp-header: "Name"`, and a client then mirrors that argument's value into the header so
//! that intermediaries can route on it without reading the body. Anything that reads the body
//! must check that the two agree: the gateway decides on the body, and a router or server
//! behind it that acts on the header must see the same value.
//!
//! The gateway learns each tool's declarations from the `tools/list` answers it passes on
//! ([`Declarations::observe`], per upstream and tool) and checks every 2026-07-28 `tools/call`
//! that carries such a header, or calls a tool that declares one ([`check`]): each declared
//! argument and its header are present together and equal (after the `=?base64?...?=` form is
//! decoded; numbers compare by value), or absent together (`null` counts as absent). A header
//! the tool does not declare, one on a call of a tool whose declarations are invalid (a
//! conforming client drops such a tool), and one on a call of a tool the gateway has not seen
//! listed since it started are refused too: it cannot be checked, and the spec's answer to
//! -32020 is to list tools again and retry once. The rules of validity follow the
//! specification (and the Python SDK's reading of it): an annotation counts only on a property
//! reached from the root through `properties` alone, names an RFC 9110 token, is on a string,
//! integer, boolean (or number, as the TypeScript SDK allows) property, and no two annotations
//! of one schema name the same header, ignoring case.

use std::sync::Arc;

use super::jsonrpc::MAX_NAME_CHARS;
use serde_json::Value;

/// One `x-mcp-header` annotation: the header's name part and the argument's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// As written (`Region`), for messages; compared ignoring case.
    pub name: String,
    /// The keys from `arguments` down to the value.
    pub path: Vec<String>,
}

/// A tool's declarations, or why they are invalid.
pub type Declared = Result<Vec<Declaration>, String>;

/// Keywords whose value is one subschema: an annotation under one is off the `properties`
/// chain (and so invalid).
const SUBSCHEMA_ONE: &[&str] = &[
    "items",
    "contains",
    "unevaluatedItems",
    "additionalProperties",
    "propertyNames",
    "unevaluatedProperties",
    "not",
    "if",
    "then",
    "else",
    "contentSchema",
];
const SUBSCHEMA_LIST: &[&str] = &["allOf", "anyOf", "oneOf", "prefixItems"];
const SUBSCHEMA_MAP: &[&str] = &[
    "patternProperties",
    "dependentSchemas",
    "$defs",
    "definitions",
];

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The declarations of a tool's `inputSchema`.
pub fn declarations(input_schema: &Value) -> Declared {
    let mut found: Vec<Declaration> = Vec::new();
    // (path through `properties` alone, or None once another keyword was crossed; schema)
    let mut stack: Vec<(Option<Vec<String>>, &Value)> = vec![(Some(Vec::new()), input_schema)];
    while let Some((path, node)) = stack.pop() {
        let Some(schema) = node.as_object() else {
            continue;
        };
        if let Some(header) = schema.get("x-mcp-header") {
            let Some(path) = path.clone().filter(|p| !p.is_empty()) else {
                return Err(
                    "an x-mcp-header is not on a property reached through `properties` alone"
                        .into(),
                );
            };
            let at = path.join(".");
            let Some(name) = header.as_str().filter(|h| is_token(h)) else {
                return Err(format!(
                    "property `{at}`: its x-mcp-header is not an HTTP token"
                ));
            };
            let ty = schema.get("type").and_then(Value::as_str);
            if !matches!(ty, Some("string" | "integer" | "boolean" | "number")) {
                return Err(format!(
                    "property `{at}`: x-mcp-header is only allowed on a string, integer or boolean property"
                ));
            }
            if found.iter().any(|d| d.name.eq_ignore_ascii_case(name)) {
                return Err(format!("x-mcp-header `{name}` is declared twice"));
            }
            found.push(Declaration {
                name: name.to_owned(),
                path,
            });
        }
        for (keyword, value) in schema {
            let keyword = keyword.as_str();
            if keyword == "properties" {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    let path = path.as_ref().map(|p| {
                        let mut p = p.clone();
                        p.push(name.clone());
                        p
                    });
                    stack.push((path, sub));
                }
            } else if SUBSCHEMA_ONE.contains(&keyword) {
                stack.push((None, value));
            } else if SUBSCHEMA_LIST.contains(&keyword) {
                stack.extend(value.as_array().into_iter().flatten().map(|v| (None, v)));
            } else if SUBSCHEMA_MAP.contains(&keyword) {
                stack.extend(
                    value
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(_, v)| (None, v)),
                );
            }
        }
    }
    Ok(found)
}

/// The declarations of every tool listed through the gateway, by `<upstream>/<tool>`; shared by
/// the workers (a list may pass one worker and the call another).
#[derive(Debug, Default)]
pub struct Declarations {
    map: papaya::HashMap<String, Arc<Declared>>,
    /// Tools and their bytes remembered per upstream.
    per_upstream: papaya::HashMap<String, (usize, usize)>,
}

/// Tools remembered; past that, a new tool stays unknown (its calls with headers are refused).
const MAX_TOOLS: usize = 100_000;
/// Of those, per upstream: an upstream whose tools come and go without end fills its own
/// share, not another's.
const MAX_PER_UPSTREAM: usize = 10_000;
/// Bytes of names and declarations remembered per upstream: an upstream listing a new tool
/// with a 15 MB name at each listing grew the gateway by as much each time, for good (an
/// attacker's review; a name is now also at most [`MAX_NAME_CHARS`] characters, as a call's).
const MAX_BYTES_PER_UPSTREAM: usize = 4 << 20;

/// Roughly what a tool's entry holds, in bytes.
fn weight(key: &str, declared: &Declared) -> usize {
    let declared = match declared {
        Ok(list) => list
            .iter()
            .map(|d| d.name.len() + d.path.iter().map(|p| p.len() + 24).sum::<usize>() + 48)
            .sum(),
        Err(why) => why.len(),
    };
    key.len() + declared + 64
}

impl Declarations {
    /// Sees a listed tool definition.
    pub fn observe(&self, upstream: &str, tool: &Value) {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return;
        };
        // Never called through the gateway (a call naming it is refused): nothing to learn.
        if name.chars().count() > MAX_NAME_CHARS {
            return;
        }
        let declared = declarations(tool.get("inputSchema").unwrap_or(&Value::Null));
        let key = format!("{upstream}/{name}");
        let map = self.map.pin();
        let old = match map.get(&key) {
            Some(d) if **d == declared => return,
            Some(d) => Some(weight(&key, d)),
            None => None,
        };
        let new = weight(&key, &declared);
        let counts = self.per_upstream.pin();
        let (held, bytes) = counts.get(upstream).copied().unwrap_or((0, 0));
        let bytes_then = (bytes + new).saturating_sub(old.unwrap_or(0));
        let fits = bytes_then <= MAX_BYTES_PER_UPSTREAM
            && (old.is_some() || (map.len() < MAX_TOOLS && held < MAX_PER_UPSTREAM));
        if !fits {
            return;
        }
        map.insert(key, Arc::new(declared));
        let added = usize::from(old.is_none());
        counts.update_or_insert(
            upstream.to_owned(),
            |(n, b)| (n + added, (b + new).saturating_sub(old.unwrap_or(0))),
            (added, new),
        );
    }

    /// Tools and bytes remembered of `upstream` (for the bounds' tests).
    #[cfg(test)]
    fn held(&self, upstream: &str) -> (usize, usize) {
        self.per_upstream
            .pin()
            .get(upstream)
            .copied()
            .unwrap_or_default()
    }

    /// What is known of `tool` of `upstream`; `None`: never listed here.
    pub fn get(&self, upstream: &str, tool: &str) -> Option<Arc<Declared>> {
        self.map.pin().get(&format!("{upstream}/{tool}")).cloned()
    }
}

/// The name part of a `Mcp-Param-{Name}` field (`Region`), or `None` for another field.
pub fn name_part(field: &str) -> Option<&str> {
    field
        .get(..10)
        .filter(|p| p.eq_ignore_ascii_case("mcp-param-"))
        .map(|_| &field[10..])
}

/// The argument at `path`, `None` when absent or `null`.
fn at<'v>(arguments: Option<&'v Value>, path: &[String]) -> Option<&'v Value> {
    let mut v = arguments?;
    for key in path {
        v = v.as_object()?.get(key)?;
    }
    (!v.is_null()).then_some(v)
}

/// Whether a header's decoded value says what the body's argument does.
fn agrees(value: &Value, header: &str) -> bool {
    match value {
        Value::String(s) => s == header,
        Value::Bool(b) => header == if *b { "true" } else { "false" },
        // Numbers by value, written as plain decimals only (`42`, `42.0`; not `4.2e1`).
        Value::Number(n) => plain_decimal(header) && same_number(n, header),
        _ => false,
    }
}

/// `-?digits(.digits)?`
fn plain_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    all_digits(whole) && all_digits(fraction)
}

fn same_number(n: &serde_json::Number, header: &str) -> bool {
    if let Some(i) = n
        .as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
    {
        let (whole, fraction) = header.split_once('.').unwrap_or((header, ""));
        return fraction.bytes().all(|b| b == b'0') && whole.parse::<i128>().ok() == Some(i);
    }
    header.parse::<f64>().ok() == n.as_f64()
}

/// Checks the `Mcp-Param-*` headers of a 2026-07-28 `tools/call` of `tool` against its
/// `arguments`. `headers`: every `Mcp-Param-*` field, its name part (after the prefix) and its
/// value; `declared`: what the gateway knows of the tool. `Err`: why they disagree.
pub fn check(
    tool: &str,
    headers: &[(&str, &str)],
    declared: Option<&Declared>,
    arguments: Option<&Value>,
) -> Result<(), String> {
    let declarations = match declared {
        None if headers.is_empty() => return Ok(()),
        None => {
            return Err(format!(
                "Mcp-Param-{} cannot be checked: tool `{tool}` has not been listed through this gateway (list tools, then call again)",
                headers[0].0
            ));
        }
        Some(Err(_)) if headers.is_empty() => return Ok(()),
        Some(Err(why)) => {
            return Err(format!(
                "Mcp-Param-{} names no argument: tool `{tool}`'s x-mcp-header annotations are invalid ({why})",
                headers[0].0
            ));
        }
        Some(Ok(d)) => d,
    };
    if let Some((name, _)) = headers.iter().find(|(name, _)| {
        !declarations
            .iter()
            .any(|d| d.name.eq_ignore_ascii_case(name))
    }) {
        return Err(format!(
            "Mcp-Param-{name} is not declared by tool `{tool}` (list tools, then call again)"
        ));
    }
    for d in declarations {
        let header = headers
            .iter()
            .find(|(name, _)| d.name.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v);
        let argument = d.path.join(".");
        match (at(arguments, &d.path), header) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(format!(
                    "Mcp-Param-{} is present but argument `{argument}` is not",
                    d.name
                ));
            }
            (Some(_), None) => {
                return Err(format!(
                    "Mcp-Param-{} is missing but argument `{argument}` is present",
                    d.name
                ));
            }
            (Some(value), Some(header)) => {
                let decoded = super::headers::decode_header_value(header);
                if !decoded.is_some_and(|h| agrees(value, &h)) {
                    return Err(format!(
                        "Mcp-Param-{} does not match argument `{argument}`",
                        d.name
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The `Mcp-Param-*` fields a 2026-07-28 `tools/call` with `arguments` carries for the tool's
/// `declared` annotations, as a client writes them (the bridge is that client for a
/// session-era one): each declared argument present, a string as it is when it is safe header
/// text and in the `=?base64?...?=` form otherwise, a truth value and a number as written.
pub fn fields(declared: &[Declaration], arguments: Option<&Value>) -> Vec<(String, String)> {
    declared
        .iter()
        .filter_map(|d| {
            let value = match at(arguments, &d.path)? {
                Value::String(s) => header_text(s),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((format!("mcp-param-{}", d.name), value))
        })
        .collect()
}

/// A value for a routing header (`Mcp-Name`, `Mcp-Param-*`): as it is when it is safe header
/// text, else in the specification's `=?base64?...?=` form.
pub fn header_text(s: &str) -> String {
    use base64::Engine as _;
    let plain = s.bytes().all(|b| (0x21..0x7f).contains(&b)) && !s.starts_with("=?");
    if plain {
        s.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    }
}

#[cfg(test)]
#[path = "param_headers_tests.rs"]
mod tests;
