//! JSON-RPC parsing, differentially: whatever the gateway's parser accepts must mean the same
//! to a last-key-wins parser (serde_json, like the Python, Node and Go MCP servers): the same
//! kind, id, method, tool name and arguments, message by message. Anything else is a message
//! whose meaning the upstream could read differently from what policy decided on.
#![no_main]

use gateway::mcp::{Id, Kind, Message, Parsed, Parser};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn id_of(v: &Value) -> Option<Id> {
    match v.get("id")? {
        Value::String(s) => Some(Id::Str(s.clone())),
        n => n.as_i64().map(Id::Num),
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
        assert_eq!(
            m.arguments.as_ref(),
            params.and_then(|p| p.get("arguments")),
            "arguments"
        );
    }
}

fuzz_target!(|data: &[u8]| {
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
