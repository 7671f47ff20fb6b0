//! stdio upstreams through the gateway: real MCP servers from the package registries run as
//! the gateway's sandboxed children, used by the Python SDK client in both protocol eras.

use integration_tests::{
    daemon::Daemon,
    peers::{PyServer, free_port, py_client, python},
    unique,
};

fn fixture(name: &str) -> String {
    format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A gateway whose `/mcp` route goes to a stdio upstream run as `command` (TOML array) with
/// the `[upstreams.stdio]` lines `stdio`.
fn gateway(command: &str, stdio: &str) -> (Daemon, u16) {
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwstdio");
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[[upstreams]]
name = "local"
command = {command}
response_timeout_ms = 10000
[upstreams.stdio]
{stdio}
[[routes]]
path = "/mcp"
upstream = "local"
"#
    );
    (Daemon::start_local(&instance, &config), port)
}

/// The Python SDK's own server, run over stdio by the gateway, answers the Python SDK client
/// exactly as the same server does over Streamable HTTP, in both eras: tools, progress,
/// resources, prompts, ping, and (session era) sampling and elicitation requests from the
/// server routed back to the client that caused them.
#[test]
fn python_sdk_stdio_server_through_the_gateway_matches_its_http_self_in_both_eras() {
    let direct_server = PyServer::start(false);
    // The venv's interpreter lives under /root, which the default unprivileged user cannot
    // read: this child runs as root, explicitly.
    let (mut d, port) = gateway(
        &format!(
            r#"["{}", "{}", "stdio"]"#,
            python().display(),
            fixture("mcp_server.py")
        ),
        "uid = 0\ngid = 0",
    );
    for mode in ["legacy", "2026-07-28"] {
        let direct = py_client(&direct_server.url(), mode);
        let through = py_client(&format!("http://127.0.0.1:{port}/mcp"), mode);
        assert_eq!(
            through, direct,
            "{mode}: stdio through the gateway = HTTP direct"
        );
    }
    d.stop();
}
