//! The id of a JSON-RPC request, which its answer carries.

/// A JSON-RPC id: MCP allows a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    Num(i64),
    Str(String),
}

/// The integer a string id stands for to a client, if any ([`Id::compared`]).
pub fn integer_of(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().filter(|n| n.to_string() == s)
}

impl Id {
    /// The id a JSON value is, if it is one MCP allows.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Number(n) => n.as_i64().map(Id::Num),
            serde_json::Value::String(s) => Some(Id::Str(s.clone())),
            _ => None,
        }
    }

    /// The id as clients compare ids: a string that is an integer written in decimal as an
    /// integer is written (`"7"`, not `"07"` nor `"+7"`) is that integer (the Python SDK's
    /// client takes an answer with `"7"` for request 7).
    pub fn compared(&self) -> Result<i64, &str> {
        match self {
            Id::Num(n) => Ok(*n),
            Id::Str(s) => integer_of(s).ok_or(s),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Id::Num(n) => serde_json::Value::from(*n),
            Id::Str(s) => serde_json::Value::from(s.as_str()),
        }
    }
}

/// An id of the gateway's own, for a request whose answer it reads whole and answers itself
/// (a list it filters, a task it binds to its caller). Random, not counted: an upstream that
/// files a request's event stream by its id alone (the Python SDK's event store) would file
/// that answer under the client's id, and a resume of another stream of the client's with
/// that id replayed it unfiltered (an attacker's review); a counted id would meet another
/// gateway's of a fleet, or its own after a restart.
pub fn own() -> Id {
    Id::Str(format!("mcp-gateway.{:016x}", crate::session::nonce()))
}

/// `body`, one JSON-RPC message the gateway has read, with its top-level `id` replaced by
/// `id` and every other byte as it came (what the gateway judged is what the upstream reads;
/// nothing else is written again). `None` when it is not an object with an `id`.
pub fn with_request_id(body: &[u8], id: &Id) -> Option<Vec<u8>> {
    use std::{borrow::Cow, collections::HashMap};
    let top: HashMap<Cow<'_, str>, &serde_json::value::RawValue> =
        serde_json::from_slice(body).ok()?;
    let raw = top.get("id")?.get().as_bytes();
    // The value's own bytes within `body` (a raw value borrows from what it was read from).
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(raw.len()).filter(|e| *e <= body.len())?;
    let id = serde_json::to_vec(&id.to_json()).ok()?;
    let mut out = Vec::with_capacity(body.len() - raw.len() + id.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&id);
    out.extend_from_slice(&body[end..]);
    Some(out)
}

/// `body`, a request whose id is `id` (`None`: a notification), as it goes to the upstream when
/// the gateway reads the answer whole and answers itself: under an id of the gateway's
/// ([`own`], returned beside it) when it has one. `None` when its id cannot be replaced.
pub fn under_own(body: &bytes::Bytes, id: Option<&Id>) -> Option<(Option<Id>, bytes::Bytes)> {
    match id {
        None => Some((None, body.clone())),
        Some(_) => {
            let ours = own();
            let body = with_request_id(body, &ours)?;
            Some((Some(ours), body.into()))
        }
    }
}

/// `body`, a JSON message answering the id `ours` (an id of the gateway's, [`own`]), with the
/// id `theirs` instead; and wherever else `ours` is written in it (an error's `data` or
/// message, an array, an event stream: an upstream's refusal is relayed as it came, and carried
/// the gateway's id to the client, a review), `theirs` as the same JSON would write it.
pub fn answering(body: Vec<u8>, ours: &Id, theirs: &Id) -> Vec<u8> {
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut v) if v.get("id") == Some(&ours.to_json()) => {
            super::messages::set_in(&mut v, &["id"], theirs.to_json());
            super::json_bytes(&v)
        }
        _ => body,
    };
    let Id::Str(ours) = ours else {
        return body;
    };
    if memchr::memmem::find(&body, ours.as_bytes()).is_none() {
        return body;
    }
    // Quoted, the id as a JSON value; bare (within a string), its text as a string holds it.
    let value = serde_json::to_string(&theirs.to_json()).unwrap_or_default();
    let text = match theirs {
        Id::Num(n) => n.to_string(),
        Id::Str(_) => value[1..value.len() - 1].to_owned(),
    };
    let quoted = format!("\"{ours}\"");
    let mut out = Vec::with_capacity(body.len());
    let mut rest = &body[..];
    while let Some(at) = memchr::memmem::find(rest, ours.as_bytes()) {
        let is_quoted = at > 0 && rest[at - 1] == b'"' && rest.get(at + ours.len()) == Some(&b'"');
        if is_quoted {
            out.extend_from_slice(&rest[..at - 1]);
            out.extend_from_slice(value.as_bytes());
            rest = &rest[at - 1 + quoted.len()..];
        } else {
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(text.as_bytes());
            rest = &rest[at + ours.len()..];
        }
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requests_id_is_replaced_and_nothing_else_is_written_again() {
        let ours = Id::Str("mcp-gateway.00ff".into());
        let body = br#"{ "jsonrpc":"2.0", "id" :  7 , "method":"tools/list","params":{"n":1.50e3,"id":2}}"#;
        let out = with_request_id(body, &ours).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{ "jsonrpc":"2.0", "id" :  "mcp-gateway.00ff" , "method":"tools/list","params":{"n":1.50e3,"id":2}}"#
        );
        // A key written with an escape is the same key; a string id is replaced whole.
        let body = br#"{"\u0069d":"a\"b","method":"ping"}"#;
        let out = with_request_id(body, &Id::Num(5)).unwrap();
        assert_eq!(out, br#"{"\u0069d":5,"method":"ping"}"#);
        assert!(own() != own(), "random");
        for none in [&br#"{"method":"ping"}"#[..], b"[1]", b"{", b"7"] {
            assert!(with_request_id(none, &ours).is_none());
        }
    }

    #[test]
    fn an_answer_under_the_gateways_id_reaches_the_client_with_its_own_alone() {
        let ours = Id::Str("mcp-gateway.00ff".into());
        let refusal = br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"refused request mcp-gateway.00ff","data":{"requestId":"mcp-gateway.00ff"}}}"#;
        let out = answering(refusal.to_vec(), &ours, &Id::Str("a\"b".into()));
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"refused request a\"b","data":{"requestId":"a\"b"}}}"#
        );
        let out = answering(
            br#"[{"id":"mcp-gateway.00ff"}]"#.to_vec(),
            &ours,
            &Id::Num(42),
        );
        assert_eq!(out, br#"[{"id":42}]"#);
        let out = answering(
            br#"{"jsonrpc":"2.0","id":"mcp-gateway.00ff","result":{}}"#.to_vec(),
            &ours,
            &Id::Num(7),
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id"], 7);
        // Anything else as it came.
        let other = br#"{"id":1,"error":{"message":"mcp-gateway"}}"#.to_vec();
        assert_eq!(answering(other.clone(), &ours, &Id::Num(7)), other);
    }
}
