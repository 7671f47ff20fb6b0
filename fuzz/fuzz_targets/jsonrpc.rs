//! JSON-RPC parsing, differentially: whatever the gateway's parser accepts must mean the same
//! to a last-key-wins parser (serde_json, like the Python, Node and Go MCP servers): the same
//! kind, id, method, tool name and arguments, message by message. Anything else is a message
//! whose meaning the upstream could read differently from what policy decided on.
//!
//! And a message read from the copy with long runs of string text left out (`mcp::elide`, here
//! from runs of 6 bytes in any body) must be the message read from the body itself, and a
//! refusal the body's own (code, id and reason).
#![no_main]

use gateway::mcp::elide::Elision;
use gateway::mcp::{Id, Kind, Message, Parsed, Parser};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn id_of(v: &Value) -> Option<Id> {
    match v.get("id")? {
        Value::String(s) => Some(Id::Str(s.clone())),
        n => n.as_i64().map(Id::Num),
    }
}

/// The same JSON value, numbers compared by value (`-0` and `0`, `1.0` and `1` are one number
/// to every rule the gateway applies; ids are compared exactly above).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // A decimal with more significant digits than an f64 holds may be rounded one ULP apart
        // by simd-json and serde_json (serde_json without `float_roundtrip` is not correctly
        // rounded either): found by this target, e.g. `166111…31E-00015` with 17+ digits. The
        // gateway forwards the client's bytes, so the upstream parses the original text; a
        // policy bound is never that close. Anything more than a few ULPs apart still fails.
        (Value::Number(x), Value::Number(y)) => {
            x == y
                || match (x.as_f64(), y.as_f64()) {
                    (Some(a), Some(b)) => {
                        a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(b.abs())
                    }
                    _ => false,
                }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| same_value(a, b)))
        }
        _ => a == b,
    }
}

fn same(m: &Message, v: &Value) {
    let method = v.get("method").and_then(Value::as_str);
    assert_eq!(m.method.as_deref(), method, "method");
    assert_eq!(m.id, id_of(v), "id");
    let kind = match (method, v.get("id")) {
        (Some(_), Some(_)) => Kind::Request,
        (Some(_), None) => Kind::Notification,
        (None, _) => Kind::Response,
    };
    assert_eq!(m.kind, kind, "kind");
    let params = v.get("params");
    if let Some(name) = &m.name {
        let key = if method.is_some_and(|m| m.starts_with("resources/")) {
            "uri"
        } else {
            "name"
        };
        assert_eq!(
            params.and_then(|p| p.get(key)).and_then(Value::as_str),
            Some(name.as_str()),
            "name"
        );
    }
    if method == Some("tools/call") {
        let theirs = params.and_then(|p| p.get("arguments"));
        let agree = match (m.arguments.as_ref(), theirs) {
            (Some(a), Some(b)) => same_value(a, b),
            (a, b) => a == b,
        };
        assert!(agree, "arguments: {:?} vs {theirs:?}", m.arguments);
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = Parser::with_elision(Elision {
        from: usize::MAX,
        long_run: usize::MAX,
    })
    .parse_for(data, false);
    let copied = Parser::with_elision(Elision {
        from: 0,
        long_run: 6,
    })
    .parse_for(data, false);
    assert_eq!(whole, copied, "from the body, then from the copy");
    let mut parser = Parser::default();
    let Ok(parsed) = parser.parse(data) else {
        return;
    };
    let value: Value = serde_json::from_slice(data)
        .unwrap_or_else(|e| panic!("the gateway accepted what serde_json refuses: {e}"));
    match (parsed, &value) {
        (Parsed::Single(m), v) => same(&m, v),
        (Parsed::Batch(ms), Value::Array(vs)) => {
            assert_eq!(ms.len(), vs.len(), "batch length");
            for (m, v) in ms.iter().zip(vs) {
                same(m, v);
            }
        }
        (Parsed::Batch(_), v) => panic!("a batch to the gateway, {v} to serde_json"),
    }
});
