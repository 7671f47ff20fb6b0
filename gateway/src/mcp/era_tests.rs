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
