//! Browser clients (the MCP Inspector, web agents) get the gateway's own CORS policy: an
//! allowed page is echoed, a preflight is answered by the gateway before identity, and the
//! upstream's CORS and framework headers never reach the page. The upstream is the npm
//! reference server, whose express app answers every origin with `*` on its own.

use integration_tests::{
    daemon::Daemon,
    peers::{free_port, post, raw, server_everything},
    unique,
};

const PAGE: &str = "https://inspector.example";
const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

fn count(r: &integration_tests::peers::RawResponse, name: &str) -> usize {
    r.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
}

#[test]
fn browsers_get_the_gateways_cors_policy_never_the_upstreams() {
    let up_port = free_port();
    let _everything = server_everything(up_port);
    // Direct: the upstream's own policy and a map of what it runs on.
    let (direct, _) = raw(up_port, &post("/mcp", INIT, &format!("origin: {PAGE}\r\n")));
    assert_eq!(direct.status, 200);
    assert!(
        direct.header("x-powered-by").is_some()
            || direct.header("access-control-allow-origin").is_some(),
        "the upstream was expected to send its own CORS or X-Powered-By: {:?}",
        direct.headers
    );

    let port = free_port();
    let instance = unique("gwcors");
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
shutdown_grace_ms = 2000
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[http]
allowed_origins = ["{PAGE}"]
[http.cors]
allow_headers = ["x-team"]
max_age_s = 120
[[upstreams]]
name = "everything"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "everything"
"#,
        admin = free_port()
    );
    let _d = Daemon::start_local(&instance, &config);

    // The preflight: answered by the gateway, with no credentials.
    let (pre, _) = raw(
        port,
        format!(
            "OPTIONS /mcp HTTP/1.1\r\nhost: gw\r\norigin: {PAGE}\r\naccess-control-request-method: POST\r\n\
             access-control-request-headers: content-type, mcp-session-id, x-team\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(pre.status, 204, "{:?}", pre.headers);
    assert_eq!(pre.header("access-control-allow-origin"), Some(PAGE));
    assert_eq!(pre.header("access-control-max-age"), Some("120"));
    let allowed = pre
        .header("access-control-allow-headers")
        .unwrap_or_default();
    for h in [
        "content-type",
        "mcp-session-id",
        "mcp-protocol-version",
        "x-team",
    ] {
        assert!(allowed.contains(h), "{h} not in {allowed}");
    }
    assert!(
        pre.header("access-control-allow-methods")
            .is_some_and(|m| m.contains("POST") && m.contains("DELETE"))
    );

    // The request itself: one allow-origin, the gateway's, and the session id readable.
    let (r, _) = raw(port, &post("/mcp", INIT, &format!("origin: {PAGE}\r\n")));
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert_eq!(
        count(&r, "access-control-allow-origin"),
        1,
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("access-control-allow-origin"), Some(PAGE));
    assert_eq!(r.header("vary"), Some("origin"));
    assert!(
        r.header("access-control-expose-headers")
            .is_some_and(|e| e.contains("mcp-session-id")),
        "{:?}",
        r.headers
    );
    assert!(r.header("x-powered-by").is_none(), "{:?}", r.headers);
    assert!(r.header("mcp-session-id").is_some(), "{:?}", r.headers);

    // A refusal is readable by the page too (the gateway's own answer carries the policy).
    let (bad, _) = raw(
        port,
        &post("/mcp", "{not json", &format!("origin: {PAGE}\r\n")),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.header("access-control-allow-origin"), Some(PAGE));

    // Another page: refused, and told nothing.
    let (other, _) = raw(
        port,
        &post("/mcp", INIT, "origin: https://evil.example\r\n"),
    );
    assert_eq!(other.status, 403);
    assert_eq!(count(&other, "access-control-allow-origin"), 0);
    let (other_pre, _) = raw(
        port,
        b"OPTIONS /mcp HTTP/1.1\r\nhost: gw\r\norigin: https://evil.example\r\naccess-control-request-method: POST\r\n\r\n",
    );
    assert_eq!(other_pre.status, 403);
    assert_eq!(count(&other_pre, "access-control-allow-origin"), 0);

    // An agent (no Origin): no CORS at all, and still none of the upstream's.
    let (agent, _) = raw(port, &post("/mcp", INIT, ""));
    assert_eq!(agent.status, 200);
    assert_eq!(
        count(&agent, "access-control-allow-origin"),
        0,
        "{:?}",
        agent.headers
    );
    assert!(agent.header("x-powered-by").is_none());
    // Answers differ by Origin, so a cache is told so even when there was none.
    assert_eq!(agent.header("vary"), Some("origin"), "{:?}", agent.headers);
}
