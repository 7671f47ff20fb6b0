//! stdio upstreams through the gateway: real MCP servers from the package registries run as
//! the gateway's sandboxed children, used by the Python SDK client in both protocol eras.

use integration_tests::{
    daemon::{Daemon, alive, local_header},
    peers::{PyServer, free_port, post, py_client, py_script, python, raw},
    unique,
};

/// server-everything over stdio, shared by two tenants (`one`, `two`), each with an API key
/// (returned in that order).
fn everything_for_two_tenants() -> (Daemon, u16, [&'static str; 2]) {
    let bin = format!(
        "{}/../.tools/node/node_modules/.bin/mcp-server-everything",
        env!("CARGO_MANIFEST_DIR")
    );
    let keys = ["alpha-key-0123456789", "beta-key-0123456789"];
    let route = api_key_route(&[(keys[0], "one", Some("a")), (keys[1], "two", Some("b"))]);
    let (d, port) = gateway_with(
        &format!(r#"["{bin}", "stdio"]"#),
        "",
        &route,
        "default_tenant = \"one\"\n[[tenants]]\nname = \"one\"\nid = 1\n[[tenants]]\nname = \"two\"\nid = 2",
    );
    (d, port, keys)
}

/// The route lines that take API keys, with one `[[auth.api_keys]]` table for each
/// `(key, tenant, agent)`.
fn api_key_route(keys: &[(&str, &str, Option<&str>)]) -> String {
    let plain: Vec<&str> = keys.iter().map(|k| k.0).collect();
    let shas = py_script(
        "import hashlib, json, sys; print(json.dumps([hashlib.sha256(k.encode()).hexdigest() for k in sys.argv[1:]]))",
        &plain,
    );
    let mut route = String::from("auth = [\"api_key\"]\n");
    for (i, (_, tenant, agent)) in keys.iter().enumerate() {
        route.push_str(&format!(
            "[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"{tenant}\"\n",
            shas[i].as_str().expect("a digest")
        ));
        if let Some(agent) = agent {
            route.push_str(&format!("agent = \"{agent}\"\n"));
        }
    }
    route
}

fn fixture(name: &str) -> String {
    format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A gateway whose `/mcp` route goes to a stdio upstream run as `command` (TOML array) with
/// the `[upstreams.stdio]` lines `stdio`.
fn gateway(command: &str, stdio: &str) -> (Daemon, u16) {
    gateway_with(command, stdio, "", "")
}

/// [`gateway`], with `route` appended to the route's table (its own keys first, then any
/// further tables) and `kernel` to the `[kernel]` table (then tenants, say).
fn gateway_with(command: &str, stdio: &str, route: &str, kernel: &str) -> (Daemon, u16) {
    gateway_named(&unique("gwstdio"), command, stdio, route, kernel)
}

/// [`gateway_with`], as the instance `instance`.
fn gateway_named(
    instance: &str,
    command: &str,
    stdio: &str,
    route: &str,
    kernel: &str,
) -> (Daemon, u16) {
    gateway_timed(instance, command, stdio, route, kernel, 10_000)
}

/// [`gateway_named`], whose calls time out after `timeout_ms`.
fn gateway_timed(
    instance: &str,
    command: &str,
    stdio: &str,
    route: &str,
    kernel: &str,
    timeout_ms: u64,
) -> (Daemon, u16) {
    let port = free_port();
    let admin = free_port();
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
{kernel}
[[upstreams]]
name = "local"
command = {command}
response_timeout_ms = {timeout_ms}
[upstreams.stdio]
{stdio}
[[routes]]
path = "/mcp"
upstream = "local"
{route}
"#
    );
    (Daemon::start_local(instance, &config), port)
}

/// The command (TOML array) of the Python SDK's server over stdio with its tools that start
/// processes and look at what the process holds (`--processes`).
fn processes_server() -> String {
    format!(
        r#"["{}", "{}", "stdio", "--processes"]"#,
        python().display(),
        fixture("mcp_server.py")
    )
}

/// A gateway whose `/mcp` route runs the Python SDK's server (the test fixture) over stdio.
/// The venv's interpreter lives under /root, which the default unprivileged user cannot read:
/// the child runs as root, explicitly.
fn python_sdk_over_stdio() -> (Daemon, u16) {
    gateway(
        &format!(
            r#"["{}", "{}", "stdio"]"#,
            python().display(),
            fixture("mcp_server.py")
        ),
        "uid = 0\ngid = 0",
    )
}

/// The Python SDK's own server, run over stdio by the gateway, answers the Python SDK client
/// exactly as the same server does over Streamable HTTP, in both eras: tools, progress,
/// resources, prompts, ping, and (session era) sampling and elicitation requests from the
/// server routed back to the client that caused them.
#[test]
fn python_sdk_stdio_server_through_the_gateway_matches_its_http_self_in_both_eras() {
    let direct_server = PyServer::start(false);
    let (mut d, port) = python_sdk_over_stdio();
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

/// RFC 9112 §6.1: no chunked coding to an HTTP/1.0 client. A stdio call that streams progress
/// reaches such a client as its answer alone, in JSON (it was sent chunked, which it reads as
/// the body itself and whose end it cannot find).
#[test]
fn an_http_1_0_client_of_a_stdio_upstream_gets_no_chunked_coding() {
    let (mut d, port) = python_sdk_over_stdio();
    let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"count_with_progress","arguments":{"steps":3},"_meta":{"progressToken":"p1"}}}"#;
    let request = format!(
        "POST /mcp HTTP/1.0\r\nhost: gw\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n\
         mcp-protocol-version: 2025-06-18\r\nconnection: keep-alive\r\ncontent-length: {}\r\n\r\n{call}",
        call.len()
    );
    let (resp, _) = raw(port, request.as_bytes());
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("transfer-encoding"), None, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.json()["result"]["structuredContent"]["result"],
        "counted 3",
        "{resp:?}"
    );
    d.stop();
}

/// An answer the gateway cannot read (a sum past 1e308, which the Python SDK writes as an
/// integer) fails its call at once, as the call's own failure (502), and the next call is
/// served. Before, the line was skipped and the call waited for its timeout (504), counted
/// against the upstream's shared breaker: two such calls of one tenant opened it for every
/// tenant (an attacker's review).
#[test]
fn a_stdio_answer_the_gateway_cannot_read_fails_its_call_at_once() {
    let (mut d, port) = python_sdk_over_stdio();
    let huge = format!("1{}", "0".repeat(308));
    let add = |a: &str, b: &str| {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": a, "b": b}}})
        .to_string();
        raw(
            port,
            &post("/mcp", &body, "mcp-protocol-version: 2025-06-18\r\n"),
        )
        .0
    };
    for _ in 0..3 {
        let r = add(&huge, &huge);
        assert_eq!(r.status, 502, "{r:?}");
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("cannot read"), "{r:?}");
    }
    let r = add("2", "3");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["result"]["structuredContent"]["result"],
        5,
        "{r:?}"
    );
    d.stop();
}

/// A stdio child's `tools/list` answer, filtered and written again for the tenant, holds no
/// key a client reads otherwise: `re\u{17f}ult` beside the filtered `result` (Go's
/// encoding/json reads it as `result`, and takes the last) showed mcp-go's client a changed
/// definition and a tool denied to the tenant (the third review of this stop; the HTTP path
/// had been fixed, the stdio one not).
#[test]
fn a_stdio_list_answer_holds_no_key_a_client_reads_otherwise() {
    let command = format!(
        r#"["{}", "{}"]"#,
        python().display(),
        fixture("folded_list_stdio.py")
    );
    let tenant = "default_tenant = \"public\"\n[[tenants]]\nname = \"public\"\nid = 0\n[[tenants.policy.tools]]\nmatch = \"local/secret_tool\"\naction = \"deny\"\n";
    let (mut d, port) = gateway_with(&command, "uid = 0\ngid = 0", "", tenant);
    let list = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
    let (r, _) = raw(
        port,
        &post("/mcp", list, "mcp-protocol-version: 2025-06-18\r\n"),
    );
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains("First read"), "{body}");
    assert_eq!(r.status, 502, "{body}");
    d.stop();
}

/// The reference server from npm, `@modelcontextprotocol/server-everything`, in its stdio mode,
/// run with the default sandbox (under root: the user `nobody`, a cleared environment), served
/// to a session-era client and to a 2026-07-28 client through the gateway.
#[test]
fn server_everything_over_stdio_serves_both_eras_through_the_gateway() {
    let bin = format!(
        "{}/../.tools/node/node_modules/.bin/mcp-server-everything",
        env!("CARGO_MANIFEST_DIR")
    );
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} missing: run `cargo xtask setup`"
    );
    let (mut d, port) = gateway(&format!(r#"["{bin}", "stdio"]"#), "");
    let call = |body: &str, extra: &str| {
        let (r, _) = integration_tests::peers::raw(
            port,
            &integration_tests::peers::post("/mcp", body, extra),
        );
        r
    };
    let session = "mcp-protocol-version: 2025-11-25\r\n";
    let r = call(
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
        session,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["result"]["protocolVersion"], "2025-11-25", "{v}");
    assert!(
        v["result"]["serverInfo"]["name"]
            .as_str()
            .is_some_and(|n| n.contains("everything")),
        "{v}"
    );
    let r = call(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#, session);
    let tools: Vec<String> = r.json()["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&r.body)))
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    assert!(tools.iter().any(|t| t == "echo"), "{tools:?}");
    let r = call(
        r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}"#,
        session,
    );
    let v = r.json();
    assert_eq!(v["id"], "x", "{v}");
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("hi")),
        "{v}"
    );

    // A 2026-07-28 client: no initialize; discovery answered from the child's own.
    let stateless = "mcp-protocol-version: 2026-07-28\r\nmcp-method: server/discover\r\n";
    let r = call(
        r#"{"jsonrpc":"2.0","id":3,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        stateless,
    );
    let v = r.json();
    assert!(v["result"]["capabilities"]["tools"].is_object(), "{v}");
    let r = call(
        r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"echo","arguments":{"message":"again"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: echo\r\n",
    );
    let v = r.json();
    assert_eq!(v["result"]["resultType"], "complete", "{v}");
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("again")),
        "{v}"
    );
    // GET (a session-era stream) is not offered.
    let (r, _) = integration_tests::peers::raw(
        port,
        b"GET /mcp HTTP/1.1\r\nhost: gw\r\naccept: text/event-stream\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    d.stop();
}

/// A stdio upstream as a federation member, beside the same server over HTTP: through one
/// federated route, the stdio member (prefix `s_`) answers the Python SDK client exactly as its
/// HTTP twin (prefix `h_`) does, in both eras, including (session era) sampling and
/// elicitation requests from the child, whose ids the federation tags and routes back.
#[test]
fn a_stdio_upstream_is_a_federation_member_like_its_http_twin() {
    let http = PyServer::start(false);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwstdiofed");
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
command = ["{python}", "{fixture}", "stdio"]
response_timeout_ms = 10000
[upstreams.stdio]
uid = 0
gid = 0
[[upstreams]]
name = "remote"
url = "{url}"
response_timeout_ms = 10000
[[routes]]
path = "/fed"
federate = [{{ upstream = "local", prefix = "s_" }}, {{ upstream = "remote", prefix = "h_" }}]
"#,
        python = python().display(),
        fixture = fixture("mcp_server.py"),
        url = http.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let url = format!("http://127.0.0.1:{port}/fed");
    for mode in ["legacy", "2026-07-28"] {
        let mut stdio = integration_tests::peers::py_client_prefixed(&url, mode, "s_");
        let mut twin = integration_tests::peers::py_client_prefixed(&url, mode, "h_");
        // Both members' tools are listed, each under its own prefix.
        let tools = stdio["tools"].to_string();
        for t in ["s_echo", "s_ask_model", "h_echo", "h_ask_model"] {
            assert!(tools.contains(t), "{mode}: {t} in {tools}");
        }
        stdio["tools"] = serde_json::Value::Null;
        twin["tools"] = serde_json::Value::Null;
        assert_eq!(stdio, twin, "{mode}: the stdio member = its HTTP twin");
        if mode == "legacy" {
            assert_eq!(stdio["ask_model"], "model: 42", "{stdio}");
            assert_eq!(stdio["ask_user"], "user: accept True", "{stdio}");
        }
        assert_eq!(
            stdio["progress"],
            serde_json::json!([1.0, 2.0, 3.0]),
            "{stdio}"
        );
    }
    let pid = d.pid();
    assert_eq!(homes(pid).len(), 1, "the child's home folder");
    // In a folder of the gateway's own that no other user may write (so none can take the
    // names of homes first).
    let folders = home_folders(pid);
    assert_eq!(folders.len(), 1, "{folders:?}");
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        // SAFETY: geteuid(2) cannot fail.
        let euid = unsafe { libc::geteuid() };
        let meta = std::fs::symlink_metadata(&folders[0]).unwrap();
        assert!(meta.is_dir() && meta.uid() == euid);
        assert_eq!(meta.permissions().mode() & 0o022, 0, "{:?}", folders[0]);
    }
    d.stop();
    // A stopped gateway leaves no child's folder behind, nor the folder they were in.
    assert_eq!(homes(pid), Vec::<std::path::PathBuf>::new());
    assert_eq!(home_folders(pid), Vec::<std::path::PathBuf>::new());
}

/// A rug pull through a restart: the stdio child comes back with another definition of a
/// pinned tool. The gateway lists the tools of every start before any call reaches the child,
/// so the very first call after the restart (made without listing) is refused, the tool is
/// hidden, and an operator's approval lets it through again.
#[test]
fn tool_pins_are_checked_again_after_the_child_restarts() {
    let temp = integration_tests::TempDir::new("gwstdiopins");
    let dir = &temp.0;
    let marker = dir.join("changed");
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwstdiopin");
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
[policy]
pin_tools = true
[[upstreams]]
name = "local"
command = ["{python}", "{fixture}", "stdio", "--changed-echo-if={marker}"]
response_timeout_ms = 10000
[upstreams.stdio]
uid = 0
gid = 0
[[routes]]
path = "/mcp"
upstream = "local"
"#,
        python = python().display(),
        fixture = fixture("mcp_server.py"),
        marker = marker.display(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}"#;
    let list = || {
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{{meta}}}}}"#);
        let (r, _) = integration_tests::peers::raw(
            port,
            &integration_tests::peers::post(
                "/mcp",
                &body,
                "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n",
            ),
        );
        r.json()["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let call = || {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"hi"}},{meta}}}}}"#
        );
        integration_tests::peers::raw(
            port,
            &integration_tests::peers::post(
                "/mcp",
                &body,
                "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: echo\r\n",
            ),
        )
        .0
    };
    assert!(list().contains(&"echo".to_owned()));
    assert_eq!(call().status, 200);

    // The child dies and its next start defines `echo` otherwise.
    std::fs::write(&marker, b"").unwrap();
    let killed = std::process::Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("changed-echo-if={}", marker.display()),
        ])
        .status()
        .unwrap();
    assert!(killed.success(), "the child was found and killed");
    std::thread::sleep(std::time::Duration::from_millis(300));

    // The first call after the restart, without a listing first: refused.
    let r = call();
    assert_eq!(r.status, 403, "{:?}", r.json());
    assert_eq!(r.json()["error"]["code"], -32046, "{:?}", r.json());
    assert_eq!(r.json()["error"]["data"]["rule"], "pins[local]");
    assert!(
        !list().contains(&"echo".to_owned()),
        "hidden until approved"
    );

    // An operator approves the new definition.
    let r = integration_tests::peers::approve_pin(admin, "local", "echo");
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(call().status, 200);
    assert!(list().contains(&"echo".to_owned()));
    d.stop();
}

/// The MCP conformance suite's server scenarios against server-everything's own Streamable
/// HTTP mode, directly, and against its stdio mode exposed by the gateway: the same
/// scenarios pass (the gateway holds the child's one session and serves every client from it).
#[test]
fn conformance_scenarios_pass_over_stdio_as_they_do_over_the_servers_own_http() {
    let bin = format!(
        "{}/../.tools/node/node_modules/.bin/mcp-server-everything",
        env!("CARGO_MANIFEST_DIR")
    );
    let up_port = free_port();
    let _everything = integration_tests::peers::server_everything(up_port);
    let direct = integration_tests::peers::conformance(&format!("http://127.0.0.1:{up_port}/mcp"));
    let (mut d, port) = gateway(&format!(r#"["{bin}", "stdio"]"#), "");
    let through = integration_tests::peers::conformance(&format!("http://127.0.0.1:{port}/mcp"));
    assert!(direct.len() >= 30, "the suite ran: {direct:?}");
    let differ: Vec<_> = direct
        .iter()
        .filter(|(name, passed)| through.get(*name) != Some(passed))
        .map(|(name, passed)| format!("{name}: direct {passed}, stdio {:?}", through.get(name)))
        .collect();
    assert!(differ.is_empty(), "{differ:#?}");
    d.stop();
}

/// `@modelcontextprotocol/server-filesystem` (npm) confined by Landlock. The server keeps its
/// own list of allowed folders, but that list is the server's to keep (a client's MCP roots
/// replace it at run time); the kernel's confinement is what holds whatever the server is told.
/// Here the server is told a parent folder, and Landlock gives it only one child of that
/// folder: a read inside works, a read of the sibling fails, and the same server unconfined
/// reads the sibling (so the refusal is Landlock's, not the server's).
#[test]
fn server_filesystem_confined_by_landlock_cannot_read_outside_its_folder() {
    use std::os::unix::fs::PermissionsExt;
    let bin = format!(
        "{}/../.tools/node/node_modules/.bin/mcp-server-filesystem",
        env!("CARGO_MANIFEST_DIR")
    );
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} missing: run `cargo xtask setup`"
    );
    let modules = format!("{}/../.tools/node", env!("CARGO_MANIFEST_DIR"));
    let temp = integration_tests::TempDir::new("gwland");
    let root = &temp.0;
    let (inside, outside) = (root.join("inside"), root.join("outside"));
    for dir in [root, &inside, &outside] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for (path, text) in [
        (inside.join("note.txt"), "inside text"),
        (outside.join("secret.txt"), "outside secret"),
    ] {
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let read = |port: u16, path: &std::path::Path| -> serde_json::Value {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"read_text_file","arguments":{{"path":"{}"}}}}}}"#,
            path.display()
        );
        let (r, _) = integration_tests::peers::raw(
            port,
            &integration_tests::peers::post("/mcp", &body, "mcp-protocol-version: 2025-11-25\r\n"),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        // The answer may come as an event stream: the server asks for the client's roots
        // on the way.
        let body = String::from_utf8_lossy(&r.body).into_owned();
        body.lines()
            .filter_map(|l| l.strip_prefix("data: ").or(Some(l)))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|m| m["id"] == 1 && m.get("method").is_none())
            .unwrap_or_else(|| panic!("no answer in {body}"))
    };
    let text = |v: &serde_json::Value| {
        v["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned)
    };
    let command = format!(r#"["{bin}", "{}"]"#, root.display());

    // Unconfined: the server's own rule allows the whole parent folder.
    let (mut open, port) = gateway(&command, "");
    let v = read(port, &outside.join("secret.txt"));
    assert_eq!(text(&v).as_deref(), Some("outside secret"), "{v}");
    open.stop();

    // Confined to `inside` (and the node modules it runs from).
    let (mut confined, port) = gateway(
        &command,
        &format!(r#"read_paths = ["{}", "{modules}"]"#, inside.display()),
    );
    let v = read(port, &inside.join("note.txt"));
    assert_eq!(text(&v).as_deref(), Some("inside text"), "{v}");
    let v = read(port, &outside.join("secret.txt"));
    assert_eq!(v["result"]["isError"], true, "{v}");
    let said = text(&v).unwrap_or_default();
    assert!(!said.contains("outside secret"), "{v}");
    assert!(
        said.contains("EACCES") || said.to_lowercase().contains("permission denied"),
        "the refusal should be the kernel's: {v}"
    );
    confined.stop();
}

/// A stateless (2026-07-28) request of `method` with `params` (its `_meta` added), as the
/// agent whose API key is `key`; `name` is its `Mcp-Name`: the status and the answer.
fn stateless_as(
    port: u16,
    key: &str,
    method: &str,
    name: Option<&str>,
    mut params: serde_json::Value,
) -> (u16, serde_json::Value) {
    params["_meta"] = serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}});
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})
        .to_string();
    let name = name.map_or(String::new(), |n| format!("mcp-name: {n}\r\n"));
    let extra = format!(
        "x-api-key: {key}\r\nmcp-protocol-version: 2026-07-28\r\nmcp-method: {method}\r\n{name}connection: close\r\n"
    );
    let (r, _) = raw(port, &post("/mcp", &body, &extra));
    let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

/// A stateless `tools/call` of `tool` with `args`, as the agent whose API key is `key`:
/// the status and the answer.
fn call_as(port: u16, key: &str, tool: &str, args: serde_json::Value) -> (u16, serde_json::Value) {
    stateless_as(
        port,
        key,
        "tools/call",
        Some(tool),
        serde_json::json!({"name": tool, "arguments": args}),
    )
}

/// What `recall` answered: the text remembered and the pid of the child that remembered it.
fn recalled(v: &serde_json::Value) -> (String, u32) {
    let text = v["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text: {v}"));
    let (memory, pid) = text.rsplit_once('|').expect("text|pid");
    (memory.to_owned(), pid.parse().expect("a pid"))
}

/// The folders the gateway whose pid is `pid` makes its stdio children's homes in
/// (`mcp-gateway-stdio-<pid>-<random>`): in its runtime directory when that is its own, else in
/// the temporary folder.
fn home_folders(pid: u32) -> Vec<std::path::PathBuf> {
    let prefix = format!("mcp-gateway-stdio-{pid}-");
    let runtime = std::env::var_os("RUNTIME_DIRECTORY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/run/mcp-gateway".into());
    [runtime, std::env::temp_dir()]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// The home folders of the stdio children of the gateway whose pid is `pid`.
fn homes(pid: u32) -> Vec<std::path::PathBuf> {
    home_folders(pid)
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Waits up to 10 s for the gateway whose pid is `pid` to have `n` home folders of children.
fn wait_homes(pid: u32, n: usize, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while homes(pid).len() != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {:?}",
            homes(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Waits up to 10 s for every process of `pids` to end.
fn wait_gone(pids: &[u32], what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `children = "caller"`: a server that keeps per-user state (here: a text in its memory) gets
/// a process per caller, so one agent never reads what another stored; with `max_children`
/// taken, a caller of another tenant takes the place of the largest tenant's child at rest
/// (never its process), and with every child busy it is refused with a 503 (never put on
/// another's child); a child idle for `idle_shutdown_ms` is stopped (its process gone).
#[test]
fn per_caller_children_keep_callers_apart_are_bounded_and_retire_when_idle() {
    let keys = [
        "alpha-key-0123456789",
        "beta-key-0123456789",
        "gamma-key-0123456789",
    ];
    // a and b are agents of one tenant, c of another.
    let route = api_key_route(&[
        (keys[0], "one", Some("a")),
        (keys[1], "one", Some("b")),
        (keys[2], "two", Some("c")),
    ]);
    let (mut d, port) = gateway_with(
        &format!(
            r#"["{}", "{}"]"#,
            python().display(),
            fixture("stateful_server.py")
        ),
        "uid = 0\ngid = 0\nchildren = \"caller\"\nmax_children = 2\nidle_shutdown_ms = 3000",
        &route,
        "default_tenant = \"one\"\n[[tenants]]\nname = \"one\"\nid = 1\n[[tenants]]\nname = \"two\"\nid = 2",
    );
    let [a, b, c] = keys;

    for (key, text) in [(a, "alpha"), (b, "beta")] {
        let (status, v) = call_as(port, key, "remember", serde_json::json!({"text": text}));
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = call_as(port, a, "recall", serde_json::json!({}));
    assert_eq!(status, 200, "{v}");
    let (memory_a, pid_a) = recalled(&v);
    let (status, v) = call_as(port, b, "recall", serde_json::json!({}));
    assert_eq!(status, 200, "{v}");
    let (memory_b, pid_b) = recalled(&v);
    assert_eq!((memory_a.as_str(), memory_b.as_str()), ("alpha", "beta"));
    assert_ne!(pid_a, pid_b, "one process per caller");
    assert!(alive(pid_a) && alive(pid_b));

    // Both places are tenant one's: c, of tenant two, takes the one used least recently (a's,
    // at rest), a child of its own, never a's or b's process.
    let (status, v) = call_as(port, c, "remember", serde_json::json!({"text": "gamma"}));
    assert_eq!(status, 200, "{v}");
    let (_, v) = call_as(port, c, "recall", serde_json::json!({}));
    let (memory_c, pid_c) = recalled(&v);
    assert_eq!(memory_c, "gamma");
    assert!(pid_c != pid_a && pid_c != pid_b);
    wait_gone(&[pid_a], "the child that gave up its place still runs");
    let (_, v) = call_as(port, b, "recall", serde_json::json!({}));
    assert_eq!(recalled(&v), ("beta".to_owned(), pid_b), "b kept its child");
    // Each child has a home folder of its own; a's went with it.
    wait_homes(d.pid(), 2, "one home folder per running child");

    // Both places busy (a call in flight on each): a third caller is refused, and its call
    // reaches neither child.
    let busy: Vec<_> = [b, c]
        .into_iter()
        .map(|key| {
            std::thread::spawn(move || {
                call_as(port, key, "wait", serde_json::json!({"seconds": 2}))
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let (status, v) = call_as(port, a, "remember", serde_json::json!({"text": "again"}));
    assert_eq!(status, 503, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("local") && message.contains("in use"),
        "{v}"
    );
    for t in busy {
        let (status, v) = t.join().expect("a waiting call");
        assert_eq!(status, 200, "{v}");
    }
    for (key, memory) in [(b, "beta"), (c, "gamma")] {
        let (_, v) = call_as(port, key, "recall", serde_json::json!({}));
        assert_eq!(recalled(&v).0, memory, "the refused call reached a child");
    }

    // Idle children stop by themselves: their processes are gone, not left behind, nor their
    // folders.
    wait_gone(&[pid_b, pid_c], "an idle caller's child still runs");
    wait_homes(d.pid(), 0, "an idle caller's child's folder is left behind");
    d.stop();
}

/// Keys that name no agent are callers of their own: each gets a child of its own. Before,
/// every such key of a tenant was one caller, and a second key read what the first had stored
/// in its child (an attacker's review).
#[test]
fn keys_that_name_no_agent_get_children_of_their_own() {
    let keys = ["one-key-no-agent-0123456789", "two-key-no-agent-0123456789"];
    let route = api_key_route(&[(keys[0], "one", None), (keys[1], "one", None)]);
    let (mut d, port) = gateway_with(
        &format!(
            r#"["{}", "{}"]"#,
            python().display(),
            fixture("stateful_server.py")
        ),
        "uid = 0\ngid = 0\nchildren = \"caller\"\nmax_children = 4",
        &route,
        "default_tenant = \"one\"\n[[tenants]]\nname = \"one\"\nid = 1",
    );
    let [one, two] = keys;
    let (status, v) = call_as(
        port,
        one,
        "remember",
        serde_json::json!({"text": "one's secret"}),
    );
    assert_eq!(status, 200, "{v}");
    let (_, v) = call_as(port, one, "recall", serde_json::json!({}));
    let (memory_one, pid_one) = recalled(&v);
    assert_eq!(memory_one, "one's secret");
    let (status, v) = call_as(port, two, "recall", serde_json::json!({}));
    assert_eq!(status, 200, "{v}");
    let (memory_two, pid_two) = recalled(&v);
    assert_eq!(memory_two, "", "the second key read the first's child");
    assert_ne!(pid_one, pid_two, "one process per key");
    d.stop();
}

/// A stateless `tools/list` as the agent whose API key is `key`: the names listed.
fn tools_as(port: u16, key: &str) -> Vec<String> {
    let (status, v) = stateless_as(port, key, "tools/list", None, serde_json::json!({}));
    v["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools ({status}): {v}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// With `children = "caller"`, what one caller's child does is held against that caller
/// alone. A child that lists a changed definition of a tool (its own state made it so) holds
/// the tool for its caller, not for the others, and another caller's listing of the approved
/// definition does not make the changed one callable; a caller that makes its own child exit
/// does not open the upstream's breaker for the others. Before, a tool's pin was the
/// upstream's: the first caller hid and refused `recall` for every caller, and the second
/// caller's listing then let the first call its unapproved definition; and two exits of one
/// caller's child opened the breaker for everyone (a review of per-caller children).
#[test]
fn one_callers_child_holds_no_other_caller_to_its_pins_or_its_breaker() {
    let keys = ["alpha-key-0123456789", "beta-key-0123456789"];
    let route = api_key_route(&[(keys[0], "one", Some("a")), (keys[1], "two", Some("b"))]);
    let (mut d, port) = gateway_with(
        &format!(
            r#"["{}", "{}"]"#,
            python().display(),
            fixture("stateful_server.py")
        ),
        "uid = 0\ngid = 0\nchildren = \"caller\"\nmax_children = 4\n\
         [upstreams.breaker]\nconsecutive_failures = 2\nopen_ms = 60000",
        &route,
        "default_tenant = \"one\"\n[[tenants]]\nname = \"one\"\nid = 1\n\
         [[tenants]]\nname = \"two\"\nid = 2\n[policy]\npin_tools = true",
    );
    let [a, b] = keys;
    let refused_for_its_pin = |(status, v): (u16, serde_json::Value)| {
        assert_eq!(status, 403, "{v}");
        assert_eq!(v["error"]["code"], -32046, "{v}");
    };
    for key in keys {
        assert!(tools_as(port, key).contains(&"recall".to_owned()));
    }
    // a's child defines `recall` otherwise: a's listing hides it, a's call is refused.
    let (status, v) = call_as(
        port,
        a,
        "redescribe",
        serde_json::json!({"text": "Also mails what it recalls to evil.example."}),
    );
    assert_eq!(status, 200, "{v}");
    assert!(!tools_as(port, a).contains(&"recall".to_owned()));
    refused_for_its_pin(call_as(port, a, "recall", serde_json::json!({})));
    // b's child still defines the approved one: b calls it.
    let (status, v) = call_as(port, b, "recall", serde_json::json!({}));
    assert_eq!(status, 200, "b was refused for a's child's definition: {v}");
    // b's listing shows the approved one again; a's changed one stays refused.
    assert!(tools_as(port, b).contains(&"recall".to_owned()));
    refused_for_its_pin(call_as(port, a, "recall", serde_json::json!({})));

    // a makes its own child exit, twice: the upstream's breaker stays closed for b.
    for _ in 0..2 {
        let (status, v) = call_as(port, a, "crash", serde_json::json!({}));
        assert_eq!(status, 502, "{v}");
    }
    let (status, v) = call_as(port, b, "recall", serde_json::json!({}));
    assert_eq!(
        status, 200,
        "a's child's exits opened the breaker for b: {v}"
    );
    // a's own breaker of `crash` is open (the tenant's); a's child, started again, defines
    // `recall` as approved, and a calls it.
    let (status, v) = call_as(port, a, "crash", serde_json::json!({}));
    assert_eq!(status, 503, "{v}");
    let (status, v) = call_as(port, a, "recall", serde_json::json!({}));
    assert_eq!(status, 200, "{v}");
    d.stop();
}

/// A call the gateway gave up on may run on in a shared child (a TypeScript SDK tool does not
/// read its abort signal) and ask a client something later: that request goes to nobody, not to
/// another tenant whose call is the one in flight then. Before, the child's requests went to
/// nobody only for the call's timeout after it was given up on: another tenant's call was sent
/// the first's question with its data, and its answer taken (an attacker's review).
#[test]
fn a_given_up_calls_later_question_reaches_no_other_tenant() {
    let keys = ["alpha-key-0123456789", "beta-key-0123456789"];
    let route = api_key_route(&[
        (keys[0], "one", Some("one-bot")),
        (keys[1], "two", Some("two-bot")),
    ]);
    let (mut d, port) = gateway_timed(
        &unique("gwstdioelicit"),
        &format!(r#"["node", "{}"]"#, fixture("elicit_server.cjs")),
        &format!(
            "uid = 0\ngid = 0\n{}",
            integration_tests::peers::node_stdio_env()
        ),
        &route,
        "default_tenant = \"one\"\n[[tenants]]\nname = \"one\"\nid = 1\n[[tenants]]\nname = \"two\"\nid = 2",
        4000,
    );
    let [one, two] = keys;
    let call = |key: &str, tool: &str, args: serde_json::Value| {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": args}})
        .to_string();
        let extra = format!(
            "x-api-key: {key}\r\nmcp-protocol-version: 2025-11-25\r\naccept: application/json, text/event-stream\r\n"
        );
        raw(port, &post("/mcp", &body, &extra)).0
    };
    // Tenant one's tool works 10 s, past its 4 s timeout, then asks.
    let r = call(
        one,
        "long_confirm",
        serde_json::json!({"seconds": 10, "secret": "ONE-ACCOUNT-4711"}),
    );
    assert_eq!(r.status, 504, "{r:?}");
    // Tenant two's call is the one in flight when it asks: from 8.5 s to 11 s. (The code
    // before sent the child's requests to nobody until 8 s.)
    std::thread::sleep(std::time::Duration::from_millis(4500));
    let r = call(two, "sleep", serde_json::json!({"seconds": 2.5}));
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{body}");
    assert!(body.contains("slept 2.5"), "{body}");
    assert!(
        !body.contains("elicitation/create") && !body.contains("ONE-ACCOUNT-4711"),
        "tenant two was asked tenant one's question: {body}"
    );
    d.stop();
}

/// Tasks (2025-11-25) on a child every caller shares: server-everything binds each task to
/// its one session, which is the gateway's, so the gateway binds it to the caller that created
/// it. Another tenant's caller neither lists it nor reads, polls or cancels it; its creator
/// does all of that and gets its result.
#[test]
fn tasks_on_a_shared_stdio_child_are_their_creators_alone() {
    let (mut d, port, keys) = everything_for_two_tenants();
    // The answer to the request whose id is 1, as `key`'s caller (it may come as an event
    // stream).
    let ask = |key: &str, method: &str, params: serde_json::Value| -> serde_json::Value {
        let body =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
                .to_string();
        let extra = format!("x-api-key: {key}\r\nmcp-protocol-version: 2025-11-25\r\n");
        let (r, _) = raw(port, &post("/mcp", &body, &extra));
        assert_eq!(
            r.status,
            200,
            "{method}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let body = String::from_utf8_lossy(&r.body).into_owned();
        body.lines()
            .filter_map(|l| l.strip_prefix("data: ").or(Some(l)))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|m| m["id"] == 1 && m.get("method").is_none())
            .unwrap_or_else(|| panic!("{method}: no answer in {body}"))
    };
    let [a, b] = keys;
    integration_tests::peers::everything_tasks_are_their_creators_alone(ask, a, b);
    d.stop();
}

/// Without an admin token the admin API serves whoever reaches it on loopback, but not the
/// user stdio servers run as: a child (here server-everything as `nobody`, the default under
/// root) could otherwise approve its own changed tool definition or ban every client. A
/// process of that user is refused, on reads and changes; root is served.
#[test]
fn stdio_servers_users_cannot_use_the_token_less_admin_api() {
    let bin = format!(
        "{}/../.tools/node/node_modules/.bin/mcp-server-everything",
        env!("CARGO_MANIFEST_DIR")
    );
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwstdioadm");
    let config = format!(
        r#"{}
[policy]
pin_tools = true
[[upstreams]]
name = "local"
command = ["{bin}", "stdio"]
[[routes]]
path = "/mcp"
upstream = "local"
"#,
        local_header(&instance, 1, port, admin)
    );
    let mut d = Daemon::start_local(&instance, &config);
    // curl as `user` (a numeric uid, or none for root): the status and the body.
    let curl = |user: Option<u32>, args: &[&str]| -> (u16, String) {
        let mut cmd = match user {
            Some(uid) => {
                let mut c = std::process::Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                    "curl".into(),
                ]);
                c
            }
            None => std::process::Command::new("curl"),
        };
        let out = cmd
            .args(["-s", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    };
    let url = |path: &str| format!("http://127.0.0.1:{admin}{path}");
    let approve = [
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"upstream":"local","tool":"echo"}"#,
    ];
    for (what, args) in [
        ("GET /pins", vec![url("/pins")]),
        ("GET /metrics", vec![url("/metrics")]),
        (
            "POST /pins/approve",
            approve
                .iter()
                .map(|s| s.to_string())
                .chain([url("/pins/approve")])
                .collect(),
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, body) = curl(Some(65534), &args);
        assert_eq!(status, 403, "{what} as nobody: {body}");
        assert!(body.contains("uid 65534"), "{what}: {body}");
    }
    // Health stays open to everyone; root is served.
    assert_eq!(curl(Some(65534), &[&url("/healthz")]).0, 200);
    let (status, body) = curl(None, &[&url("/pins")]);
    assert_eq!(status, 200, "{body}");
    // One keep-alive connection asking again and again is looked up once and refused each
    // time (a review's child held every place of the admin API with lookups: health checks
    // were refused at accept).
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl"])
        .args(["-s", "-w", "%{http_code} %{num_connects}\n"])
        .args((0..30).flat_map(|_| ["-o".to_owned(), "/dev/null".to_owned(), url("/pins")]))
        .output()
        .expect("run curl");
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    let answers: Vec<&str> = lines.lines().collect();
    assert_eq!(answers.len(), 30, "{lines}");
    assert!(answers.iter().all(|l| l.starts_with("403 ")), "{lines}");
    assert!(
        answers.iter().skip(1).all(|l| l.ends_with(" 0")),
        "one connection for them all: {lines}"
    );
    assert_eq!(curl(None, &[&url("/healthz")]).0, 200);
    d.stop();
}

/// A stdio server shared by several tenants has one session for all of them: the roots a
/// client gives it are every caller's. Before, the gateway offered the shared child roots and
/// passed a client's `notifications/roots/list_changed` on, and the child's `roots/list` went to
/// the one client with a call in flight: a tenant holding a slow call got the question and
/// answered it, and server-everything then showed that tenant's roots to the other (for the
/// filesystem server, the answer replaces its allowed folders). Now a shared child is offered
/// no roots and hears only cancellations: no `roots/list` reaches the first tenant, and the
/// second sees none of its roots.
#[test]
fn one_tenant_cannot_set_the_roots_of_a_stdio_server_it_shares() {
    use std::io::{BufRead as _, Write as _};
    let (mut d, port, keys) = everything_for_two_tenants();
    let [attacker, victim] = keys;
    let headers = |key: &str| format!("x-api-key: {key}\r\nmcp-protocol-version: 2025-11-25\r\n");
    let send = |key: &str, body: &serde_json::Value| {
        raw(port, &post("/mcp", &body.to_string(), &headers(key))).0
    };

    // The attacker's slow call, read as it streams.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "trigger-long-running-operation", "arguments": {"duration": 3, "steps": 3},
            "_meta": {"progressToken": "t1"}}});
    stream
        .write_all(&post("/mcp", &call.to_string(), &headers(attacker)))
        .expect("send");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .ok();
    let mut lines = std::io::BufReader::new(stream.try_clone().expect("clone")).lines();
    let mut told = false;
    let mut asked = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(15) {
        let Some(Ok(line)) = lines.next() else { break };
        if !told && line.starts_with("data: ") {
            // The stream is open: the call is in flight. Tell the child the roots changed.
            let note =
                serde_json::json!({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"});
            assert_eq!(send(attacker, &note).status, 202);
            told = true;
        }
        let Some(m) =
            serde_json::from_str::<serde_json::Value>(line.strip_prefix("data: ").unwrap_or(&line))
                .ok()
        else {
            continue;
        };
        if m["method"] == "roots/list" {
            asked.push(m.clone());
            let answer = serde_json::json!({"jsonrpc": "2.0", "id": m["id"],
                "result": {"roots": [{"uri": "file:///home/attacker-root", "name": "attacker-root"}]}});
            send(attacker, &answer);
        }
        if m["id"] == 1 && m.get("method").is_none() {
            break;
        }
    }
    assert!(told, "the slow call streamed (its progress)");
    assert!(
        asked.is_empty(),
        "the shared child asked a tenant for roots: {asked:?}"
    );

    // The other tenant asks the server for the roots it knows.
    let r = send(
        victim,
        &serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "get-roots-list", "arguments": {}}}),
    );
    let text = String::from_utf8_lossy(&r.body);
    assert!(!text.contains("attacker-root"), "{text}");
    d.stop();
}

/// A tool that starts processes (the Python SDK's server over stdio, run as root): what a
/// child starts counts against its own `max_processes` (its cgroup's `pids.max`: before, a
/// child of root had no limit at all, and one of `nobody` shared one count with every other
/// child of that user), and a process it starts in a session of its own ends with it: at the
/// gateway's stop, or, after the gateway crashed, at the next gateway's start.
#[test]
fn a_stdio_childs_processes_are_held_to_its_own_limit_and_end_with_it() {
    let command = processes_server();
    let stdio = "uid = 0\ngid = 0\nmax_processes = 12";
    let text = |v: &serde_json::Value| -> serde_json::Value {
        let t = v["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("no text: {v}"));
        serde_json::from_str(t).unwrap_or_else(|_| t.into())
    };
    let detach = |port: u16| -> u32 {
        let (status, v) = call_as(port, "k", "detach", serde_json::json!({}));
        assert_eq!(status, 200, "{v}");
        let pid = text(&v).as_u64().unwrap_or_else(|| panic!("a pid: {v}")) as u32;
        assert!(alive(pid));
        pid
    };
    let (mut d, port) = gateway(&command, stdio);
    let (status, v) = call_as(port, "k", "fork", serde_json::json!({"n": 40}));
    assert_eq!(status, 200, "{v}");
    let forked = text(&v);
    assert!(
        forked["started"].as_u64().is_some_and(|n| n < 12) && forked["error"] == libc::EAGAIN,
        "the child, its threads and what it started stay within max_processes: {forked}"
    );
    let pid = detach(port);
    d.stop();
    wait_gone(
        &[pid],
        "a process the child started in a session of its own outlived the gateway's stop",
    );

    let (mut crashed, port) = gateway(&command, stdio);
    let pid = detach(port);
    crashed.crash();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        alive(pid),
        "nothing but a gateway ends it once its own is gone"
    );
    let (mut next, _) = gateway(&command, stdio);
    wait_gone(
        &[pid],
        "the next gateway's start ended what the crashed one's child left",
    );
    next.stop();
}

/// A child's home is the one place it may always write: a tool that wrote without end filled
/// the gateway host's disk (on a tmpfs, its memory), and the home was kept across the child's
/// restarts. Within `max_home_mb` the home is kept; past it the child is stopped, its home
/// removed, and its next start gets an empty one.
#[test]
fn a_stdio_childs_home_is_held_to_its_bound_and_emptied_past_it() {
    let command = processes_server();
    let (mut d, port) = gateway(&command, "uid = 0\ngid = 0\nmax_home_mb = 8");
    let home = || -> Option<(String, u64)> {
        let (status, v) = call_as(port, "k", "home", serde_json::json!({}));
        let text = v["result"]["content"][0]["text"].as_str()?;
        let h: serde_json::Value = serde_json::from_str(text).ok()?;
        (status == 200).then(|| {
            (
                h["path"].as_str().unwrap().to_owned(),
                h["bytes"].as_u64().unwrap(),
            )
        })
    };
    let (first, bytes) = home().expect("the child's home");
    assert!(bytes < 1 << 20, "{bytes}");
    let (status, v) = call_as(
        port,
        "k",
        "fill_home",
        serde_json::json!({"mb": 4, "files": 4}),
    );
    assert_eq!(status, 200, "{v}");
    // Two readings later, within the bound: the same home, as written.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (same, bytes) = home().expect("the child's home");
    assert_eq!(same, first, "a home within its bound was replaced");
    assert!(bytes >= 4 << 20, "{bytes}");
    let (status, v) = call_as(port, "k", "fill_home", serde_json::json!({"mb": 6}));
    assert_eq!(status, 200, "{v}");
    // Within 10 s, a new, empty home (the one before removed).
    let replaced = |before: &str, what: &str| -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let now = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: a home past its bound was kept: {:?}",
                home()
            );
            if let Some((now, bytes)) = home()
                && now != before
            {
                assert!(bytes < 1 << 20, "{what}: the new home holds {bytes}");
                break now;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::path::Path::new(before).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{before} was not removed"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        now
    };
    let second = replaced(&first, "10 MiB of files");
    // A file removed and held open keeps its blocks: it counts (a review wrote 200 MB so past
    // a bound of 64, unseen).
    let (status, v) = call_as(port, "k", "hold_removed", serde_json::json!({"mb": 10}));
    assert_eq!(status, 200, "{v}");
    replaced(&second, "10 MiB removed and held open");
    assert!(
        d.log().contains("home folder holds more than 8 MiB"),
        "not logged"
    );
    d.stop();
}

/// A stdio child holds no connection of the gateway's clients. io_uring's accept made them
/// without close-on-exec, so a child started (here: by another tenant's first call) while a
/// client's connection was open held it: an attacker's review had such a child read another
/// tenant's requests, API key included, and answer them.
#[test]
fn a_stdio_child_holds_no_clients_connection() {
    let command = processes_server();
    let (mut d, port) = gateway(&command, "uid = 0\ngid = 0");
    // Another client's connection, open (and answered once) before the child starts.
    let mut open = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    std::io::Write::write_all(
        &mut open,
        &post(
            "/mcp",
            body,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: ping\r\n",
        ),
    )
    .unwrap();
    let mut first = [0u8; 12];
    std::io::Read::read_exact(&mut open, &mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200", "the open connection was served");
    let (status, v) = call_as(port, "k", "descriptors", serde_json::json!({}));
    assert_eq!(status, 200, "{v}");
    let held: Vec<[u16; 2]> =
        serde_json::from_value(v["result"]["structuredContent"]["result"].clone())
            .unwrap_or_else(|e| panic!("{e}: {v}"));
    let clients: Vec<_> = held.iter().filter(|[local, _]| *local == port).collect();
    assert!(
        clients.is_empty(),
        "the child holds client connections to the gateway's port {port}: {clients:?}"
    );
    drop(open);
    d.stop();
}

/// A stdio server cannot ask the gateway for a binary upgrade (a restart at will). The upgrade
/// socket serves the gateway's user and root, which a server may run as (here root; the
/// packaged service's children run as its own user); Landlock's scopes keep a child from
/// signalling the gateway, but a socket in a folder is not in them. The Python SDK's server,
/// run as root, connects to it and asks: before, the gateway upgraded; now it answers that a
/// stdio server's process is refused, and serves on.
#[test]
fn a_stdio_server_cannot_ask_for_an_upgrade() {
    let command = processes_server();
    let instance = unique("gwstdioupg");
    let (mut d, port) = gateway_named(&instance, &command, "uid = 0\ngid = 0", "", "");
    let pid = d.pid();
    let socket = std::env::var_os("RUNTIME_DIRECTORY")
        .map_or_else(|| "/run/mcp-gateway".into(), std::path::PathBuf::from)
        .join(format!("{instance}.upgrade.sock"));
    assert!(socket.exists(), "{}", socket.display());
    let (status, v) = call_as(
        port,
        "k",
        "unix_request",
        serde_json::json!({"path": socket, "line": "upgrade"}),
    );
    assert_eq!(status, 200, "{v}");
    let answer = v["result"]["structuredContent"]["result"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(
        alive(pid) && !d.log().contains("binary upgrade"),
        "the gateway upgraded on a stdio server's request: {answer}"
    );
    assert!(answer.contains("refused"), "{answer}");
    let (status, _) = call_as(port, "k", "add", serde_json::json!({"a": 1, "b": 2}));
    assert_eq!(status, 200, "serves on");
    d.stop();
    // A gateway that stops takes its socket with it (before, every stopped instance's stayed).
    assert!(!socket.exists(), "{} left behind", socket.display());
}
