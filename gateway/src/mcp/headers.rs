//! 2026-07-28 routing headers: anything that reads the body must check that `MCP-Protocol-Version`,
//! `Mcp-Method` and `Mcp-Name` agree with it (the headers give intermediaries an early route; the
//! parsed body is the truth). A disagreement is refused with -32020 (HeaderMismatch), HTTP 400.

use base64::Engine as _;

use super::{Message, RpcError, error, version};
use crate::http::Request;

/// Decodes a header value that may use the `=?base64?...?=` form for text that is not safe in
/// a header. A malformed form decodes to `None`, so it never matches a body value by accident.
pub fn decode_header_value(value: &str) -> Option<String> {
    let Some(payload) = value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    else {
        return Some(value.to_owned());
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let bytes = engine.decode(payload).ok()?;
    // Only the canonical encoding counts (the encoder never emits anything else).
    if engine.encode(&bytes) != payload {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// Whether the request's `MCP-Protocol-Version` header names the 2026-07-28 protocol.
pub fn says_modern(req: &Request) -> bool {
    req.header_str(crate::http::name::MCP_PROTOCOL_VERSION)
        .is_some_and(version::is_stateless_era)
}

/// Whether the request uses the 2026-07-28 protocol (by header or by its message's
/// `params._meta.protocolVersion`).
pub fn is_modern(req: &Request, msg: Option<&Message>) -> bool {
    says_modern(req)
        || msg
            .and_then(|m| m.meta_protocol_version.as_deref())
            .is_some_and(version::is_stateless_era)
}

/// Refuses a session-era message that carries the 2026-07-28 envelope's version claim
/// (`params._meta["io.modelcontextprotocol/protocolVersion"]` naming an older version): it has
/// two meanings. The gateway reads it as the session era its header (or none) says; the
/// TypeScript SDK's server takes any claim for the stateless era, and refuses it (-32022) as a
/// server that speaks only that era would, from which the gateway learnt that the upstream
/// spoke only that era and bridged every tenant's session-era clients to it for five minutes
/// (a review: one request of any caller broke the upstream's sessions, tasks and streams).
pub fn no_envelope(msg: &Message) -> Result<(), RpcError> {
    match &msg.meta_protocol_version {
        None => Ok(()),
        Some(claimed) => Err(RpcError::invalid_request(format!(
            "params._meta[\"io.modelcontextprotocol/protocolVersion\"] is 2026-07-28's, in each of its requests; a request of an earlier version ({}) carries none",
            claimed.escape_default()
        ))
        .with_id(msg.id.clone())),
    }
}

/// Checks a request or notification that uses the 2026-07-28 protocol (by header or by
/// `params._meta.protocolVersion`). Older versions have no routing headers to check.
pub fn check(req: &Request, msg: &Message) -> Result<(), RpcError> {
    let header_version = req.header_str(crate::http::name::MCP_PROTOCOL_VERSION);
    let modern = is_modern(req, Some(msg));
    let Some(method) = msg.method.as_deref() else {
        return Ok(());
    };
    if !modern {
        return no_envelope(msg);
    }
    let mismatch = |what: &str| {
        RpcError::new(
            error::HEADER_MISMATCH,
            format!("{what} does not match the request body"),
            400,
        )
        .with_id(msg.id.clone())
    };
    let Some(body_version) = msg.meta_protocol_version.as_deref() else {
        return Err(RpcError::invalid_params(
            "params._meta[\"io.modelcontextprotocol/protocolVersion\"] is required in 2026-07-28",
        )
        .with_id(msg.id.clone()));
    };
    if header_version != Some(body_version) {
        return Err(mismatch("MCP-Protocol-Version header"));
    }
    if req.header_str(crate::http::name::MCP_METHOD) != Some(method) {
        return Err(mismatch("Mcp-Method header"));
    }
    let header = req.header_str(crate::http::name::MCP_NAME);
    // What `Mcp-Name` mirrors: the name, required where the message has one; or the task a
    // `tasks/*` request is about (the tasks extension mirrors `taskId` there), if sent.
    let (mirrored, required) = match (&msg.name, &msg.task_id) {
        (Some(name), _) => (Some(name), true),
        (None, task) => (
            task.as_ref()
                .filter(|_| super::tasks::NAMING.contains(&method)),
            false,
        ),
    };
    match (header, mirrored) {
        (None, _) if !required => Ok(()),
        (header, Some(m)) if header.and_then(decode_header_value).as_ref() == Some(m) => Ok(()),
        (Some(_), None) => Err(RpcError::new(
            error::HEADER_MISMATCH,
            format!("an Mcp-Name header does not belong with `{method}`, which names nothing"),
            400,
        )
        .with_id(msg.id.clone())),
        _ => Err(mismatch("Mcp-Name header")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::Parser;

    fn request(headers: &[(&str, &str)], body: &str) -> (Request, Message) {
        let req = Request {
            method: "POST".into(),
            target: "/mcp".into(),
            minor: 1,
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            keep_alive: true,
        };
        let msg = match Parser::default().parse(body.as_bytes()).unwrap() {
            crate::mcp::Parsed::Single(m) => m,
            other => panic!("{other:?}"),
        };
        (req, msg)
    }

    const CALL: &str = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"héllo","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;

    #[test]
    fn base64_form() {
        assert_eq!(decode_header_value("plain").as_deref(), Some("plain"));
        assert_eq!(
            decode_header_value("=?base64?aMOpbGxv?=").as_deref(),
            Some("héllo")
        );
        assert_eq!(decode_header_value("=?base64?not base64?="), None);
        assert_eq!(
            decode_header_value("=?base64?YR==?="),
            None,
            "non-canonical (trailing bits set)"
        );
        assert_eq!(decode_header_value("=?base64?/w==?="), None, "not UTF-8");
    }

    #[test]
    fn agreeing_headers_pass_and_each_disagreement_is_named() {
        let good = [
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?aMOpbGxv?="),
        ];
        let (req, msg) = request(&good, CALL);
        assert_eq!(check(&req, &msg), Ok(()));
        for (i, needle) in [
            (0, "MCP-Protocol-Version"),
            (1, "Mcp-Method"),
            (2, "Mcp-Name"),
        ] {
            let mut h = good.to_vec();
            h.remove(i);
            let (req, msg) = request(&h, CALL);
            let e = check(&req, &msg).unwrap_err();
            assert_eq!(
                (e.code, e.http_status, e.id.clone()),
                (error::HEADER_MISMATCH, 400, msg.id.clone())
            );
            assert!(e.message.contains(needle), "{}", e.message);
        }
        let mut h = good.to_vec();
        h[2] = ("mcp-name", "other");
        let (req, msg) = request(&h, CALL);
        assert!(check(&req, &msg).is_err());
        // Only spaces and tabs around a value are not part of it: a no-break space is, to the
        // upstream too, so the header names another method than the body.
        let mut h = good.to_vec();
        h[1] = ("mcp-method", " tools/call\t");
        let (req, msg) = request(&h, CALL);
        assert_eq!(check(&req, &msg), Ok(()));
        for odd in [
            "tools/call\u{a0}",
            "\u{2003}tools/call",
            "tools/call\u{3000}",
        ] {
            h[1] = ("mcp-method", odd);
            let (req, msg) = request(&h, CALL);
            assert!(check(&req, &msg).is_err(), "{odd:?}");
        }
    }

    #[test]
    fn older_versions_are_not_checked_and_a_modern_header_needs_the_envelope() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        let (req, msg) = request(&[("mcp-protocol-version", "2025-06-18")], body);
        assert_eq!(check(&req, &msg), Ok(()));
        let (req, msg) = request(
            &[
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/list"),
            ],
            body,
        );
        assert_eq!(check(&req, &msg).unwrap_err().code, error::INVALID_PARAMS);
    }

    #[test]
    fn a_session_era_request_with_the_envelopes_claim_is_refused() {
        let body = r#"{"jsonrpc":"2.0","id":2,"method":"prompts/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2025-11-25"}}}"#;
        let other = body.replace(r#""2025-11-25""#, "20251125");
        for (headers, body) in [
            (&[("mcp-protocol-version", "2025-11-25")][..], body),
            (&[], body),
            (&[], other.as_str()),
        ] {
            let (req, msg) = request(headers, body);
            let e = check(&req, &msg).unwrap_err();
            assert_eq!((e.code, e.http_status), (error::INVALID_REQUEST, 400));
            assert_eq!(e.id, Some(crate::mcp::Id::Num(2)));
        }
    }
}
