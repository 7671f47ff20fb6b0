use super::*;

fn head(status: u16) -> ResponseHead {
    ResponseHead {
        status,
        headers: crate::http::Fields::default(),
    }
}

#[test]
fn only_a_refusal_listing_stateless_versions_alone_teaches_the_era() {
    let refusal = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32022,"message":"Unsupported protocol version","data":{"supported":["2026-07-28"],"requested":"2025-11-25"}}}"#;
    assert!(refuses_session_era(&head(400), refusal));
    // Another status, another code, or a list with a session-era version: not this.
    assert!(!refuses_session_era(&head(200), refusal));
    let both = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32022,"message":"x","data":{"supported":["2025-11-25","2026-07-28"]}}}"#;
    assert!(!refuses_session_era(&head(400), both));
    let empty = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32022,"message":"x","data":{"supported":[]}}}"#;
    assert!(!refuses_session_era(&head(400), empty));
    let other = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32600,"message":"x","data":{"supported":["2026-07-28"]}}}"#;
    assert!(!refuses_session_era(&head(400), other));
    assert!(!refuses_session_era(&head(400), b"not json"));
}

/// Only the transports' own refusals (no id, -32000 or -32600, the phrase alone) say a request
/// needs a session; an answer to the request that echoes the phrase does not.
#[test]
fn only_a_transports_refusal_says_a_session_is_wanted() {
    for refusal in [
        // The TypeScript SDK's transport and its examples, the Python SDK's.
        &br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: Server not initialized"},"id":null}"#[..],
        br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: Mcp-Session-Id header is required"},"id":null}"#,
        br#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}"#,
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Bad Request: Missing session ID"}}"#,
        br#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"missing session id."}}"#,
    ] {
        assert!(wants_session(&head(400), refusal), "{}", String::from_utf8_lossy(refusal));
        assert!(!wants_session(&head(404), refusal));
    }
    for echo in [
        // A handler's error naming what the client sent: it ran.
        &br#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"Unknown resource: x://server not initialized"}}"#[..],
        br#"{"jsonrpc":"2.0","id":3,"error":{"code":-32600,"message":"Bad Request: Server not initialized"}}"#,
        br#"{"jsonrpc":"2.0","id":"7","error":{"code":-32000,"message":"Missing session ID"}}"#,
        // No id, but the phrase is not all it says, or the code is a handler's.
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"note rejected: server not initialized!"}}"#,
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"Server not initialized"}}"#,
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32000}}"#,
        b"Bad Request: Server not initialized",
    ] {
        assert!(!wants_session(&head(400), echo), "{}", String::from_utf8_lossy(echo));
    }
}
