//! One meaning per message, no panic from input, bounded memory per name: duplicate keys are
//! refused before the upstream sees them, a federated request with a duplicate `params` and an
//! upstream answering `"result": 5` leave the (single) worker answering, a large body is decided
//! on what the upstream reads, and 10,000 calls with distinct 128-character tool names do not
//! grow the gateway's memory.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
};

use serde_json::Value;

use integration_tests::{
    daemon::{Daemon, local_header},
    peers::{FakeUpstream, Misbehave, free_port, post, raw, read_response},
    unique,
};

/// An upstream on raw sockets that records every body and answers `tools/list` with the
/// malformed `"result": 5` and anything else with an empty object result.
struct Recorder {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&bodies);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = conn.set_nodelay(true);
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut len = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let text = String::from_utf8_lossy(&body).into_owned();
                        let v: Value = serde_json::from_str(&text).unwrap_or_default();
                        let id = v.get("id").cloned().unwrap_or(Value::Null);
                        let method = v["method"].as_str().unwrap_or_default().to_owned();
                        log.lock().unwrap().push(text);
                        let answer = match method.as_str() {
                            "tools/list" | "server/discover" => {
                                serde_json::json!({"jsonrpc":"2.0","id":id,"result":5})
                            }
                            "initialize" => serde_json::json!({"jsonrpc":"2.0","id":id,"result":{
                                "protocolVersion":"2025-06-18","capabilities":{"tools":{}},
                                "serverInfo":{"name":"rec","version":"1"}}}),
                            _ => {
                                serde_json::json!({"jsonrpc":"2.0","id":id,"result":{"content":[]}})
                            }
                        };
                        if method.starts_with("notifications/") {
                            let _ =
                                write!(conn, "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n");
                            continue;
                        }
                        let b = answer.to_string();
                        // One write: no Nagle wait between head and body.
                        let _ = conn.write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                                b.len()
                            )
                            .as_bytes(),
                        );
                    }
                });
            }
        });
        Self { port, bodies }
    }

    fn saw(&self, needle: &str) -> bool {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.contains(needle))
    }
}

struct Setup {
    daemon: Daemon,
    port: u16,
    upstream: Recorder,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.daemon.stop();
    }
}

/// A gateway with one worker (a panic would take every later request with it), a passthrough
/// route and a federated route to the recording upstream, and `delete_file` denied.
fn setup() -> Setup {
    let upstream = Recorder::start();
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwparse");
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 1
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
default_tenant = "public"

[[tenants]]
name = "public"
id = 0
[[tenants.policy.tools]]
match = "delete_file"
action = "deny"

[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{up}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "p_" }}]
"#,
        up = upstream.port,
    );
    let daemon = Daemon::start_local(&instance, &config);
    Setup {
        daemon,
        port,
        upstream,
    }
}

const V2026: &str = "mcp-protocol-version: 2026-07-28\r\n";

/// A gateway (one worker) whose one route, `/mcp`, goes to `fake`: it and its port.
fn gateway_to(fake: &FakeUpstream, name: &str) -> (Daemon, u16) {
    gateway_to_with(fake, name, "")
}

/// [`gateway_to`] with more lines of the upstream's table.
fn gateway_to_with(fake: &FakeUpstream, name: &str, upstream: &str) -> (Daemon, u16) {
    let (port, admin) = (free_port(), free_port());
    let instance = unique(name);
    let config = format!(
        "{}[[upstreams]]\nname = \"up\"\nurl = \"{}\"\n{upstream}[[routes]]\npath = \"/mcp\"\nupstream = \"up\"\n",
        local_header(&instance, 1, port, admin),
        fake.url()
    );
    (Daemon::start_local(&instance, &config), port)
}

/// A session-era (2025-11-25) `tools/call` of `echo` with no arguments, posted to `target`.
fn echo_call(target: &str) -> Vec<u8> {
    post(
        target,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#,
        "mcp-protocol-version: 2025-11-25\r\n",
    )
}

fn ping_ok(port: u16, path: &str) {
    let body = r#"{"jsonrpc":"2.0","id":77,"method":"ping","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let (r, _) = raw(
        port,
        &post(path, body, &format!("{V2026}mcp-method: ping\r\n")),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["id"], 77);
}

/// Each of `bodies` posted to `/mcp` is refused: 400, JSON-RPC -32600.
fn refused_as_invalid(port: u16, bodies: &[&str]) {
    for body in bodies {
        let (r, _) = raw(port, &post("/mcp", body, ""));
        assert_eq!(
            r.status,
            400,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["code"], -32600, "{body}");
    }
}

#[test]
fn duplicate_keys_never_reach_the_upstream() {
    let s = setup();
    let bodies = [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"name":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"n\u0061me":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"},"params":{"name":"delete_file"}}"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_file"}}]"#,
        // Keys Go's encoding/json (mcp-go, Go SDKs before 1.3.1) reads as `name`, `method`,
        // `arguments`: a Go server ran `delete_file` (an attacker's review).
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"Name":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"NAMe":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call","params":{"name":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"},"paramſ":{"name":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"result":null,"Method":"tools/call","params":{"name":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","argumentſ":{"p":"delete_file"}}}"#,
    ];
    refused_as_invalid(s.port, &bodies);
    // The same request without the duplicate: denied by policy, never forwarded either.
    let (r, _) = raw(
        s.port,
        &post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_file","arguments":{}}}"#,
            "",
        ),
    );
    assert_ne!(r.status, 200);
    assert!(
        !s.upstream.saw("delete_file"),
        "the upstream saw the denied tool"
    );
}

/// A message with `method` and also `result` or `error` is what Python's `mcp` reads as a
/// response: the gateway would decide on a call the upstream never runs (and read the empty
/// answer as the upstream failing, for every tenant's circuit breaker).
#[test]
fn a_request_that_also_carries_an_answer_never_reaches_the_upstream() {
    let s = setup();
    let bodies = [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"t":"carries-an-error"}},"error":{"code":1,"message":"m"}}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{"t":"carries-a-result"}},"result":{}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"carries-null","progress":1},"error":null}"#,
        r#"[{"jsonrpc":"2.0","id":3,"method":"ping","result":{"carries-in-a-batch":1}}]"#,
    ];
    refused_as_invalid(s.port, &bodies);
    assert!(!s.upstream.saw("carries-"), "the upstream saw one of them");
    ping_ok(s.port, "/mcp");
}

/// A message nested deeper than the gateway's later readers take (serde_json: 127 levels) is
/// refused where it is parsed. Before, one between that and simd-json's 1,024 was admitted and
/// charged, then failed on a stdio upstream or a held session as the upstream's failure (two
/// calls opened its shared breaker for every tenant), and a federation sent its member a
/// message rebuilt from nothing.
#[test]
fn a_message_nested_deeper_than_every_reader_takes_never_reaches_the_upstream() {
    let s = setup();
    // `levels` objects and arrays in all, the message's own three included.
    let call = |name: &str, marker: &str, levels: usize| {
        let inner = levels - 3;
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{{"t":"{marker}","z":{}1{}}}}}}}"#,
            "[".repeat(inner),
            "]".repeat(inner)
        )
    };
    let too_deep = call("echo", "too-deep", 101);
    refused_as_invalid(s.port, &[&too_deep]);
    let (r, _) = raw(s.port, &post("/fed", &call("p_echo", "too-deep", 101), ""));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], -32600);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nested deeper than 100")),
        "{r:?}"
    );
    assert!(!s.upstream.saw("too-deep"), "the upstream saw one of them");
    // As deep as allowed: forwarded as sent.
    let (r, _) = raw(s.port, &post("/mcp", &call("echo", "deep-enough", 100), ""));
    assert_ne!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(s.upstream.saw("deep-enough"));
    ping_ok(s.port, "/mcp");
}

/// A large body is parsed from a copy with its long runs of string text left out
/// (`mcp::elide`): what policy decides on must still be what the upstream reads, and what the
/// parser would refuse in a run left out is refused all the same.
#[test]
fn a_large_body_is_decided_on_what_the_upstream_reads() {
    let s = setup();
    let text = "a".repeat(300_000);
    let call = |id: &str, params: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{params}}}"#)
    };
    let refused = |body: &[u8], code: i64| {
        // `post` frames a text body; some of these bytes are not UTF-8.
        let mut request = format!(
            "POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        let (r, _) = raw(s.port, &request);
        let shown = String::from_utf8_lossy(&body[body.len().saturating_sub(80)..]).into_owned();
        assert_eq!(
            r.status,
            400,
            "…{shown}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["code"], code, "…{shown}");
    };
    // The tool named twice around a long argument, once escaped.
    for second in ["name", r"n\u0061me"] {
        let body = call(
            "1",
            &format!(
                r#"{{"name":"echo","arguments":{{"text":"{text}"}},"{second}":"delete_file"}}"#
            ),
        );
        refused(body.as_bytes(), -32600);
    }
    // A long run that is not string text: a raw control character, bytes that are not UTF-8,
    // a surrogate escape cut from its pair by the run.
    let mut control = call(
        "2",
        &format!(r#"{{"name":"echo","arguments":{{"text":"{text}"}}}}"#),
    )
    .into_bytes();
    let at = control.len() - 100;
    control[at] = 0x01;
    refused(&control, -32700);
    let mut latin1 = control.clone();
    latin1[at] = 0xe9;
    refused(&latin1, -32700);
    let split = call(
        "3",
        &format!(r#"{{"name":"echo","arguments":{{"text":"\ud83d{text}\ude00"}}}}"#),
    );
    refused(split.as_bytes(), -32700);
    // A tool name too long to be one, with a long run: read from the body itself.
    let long_name = call(
        "4",
        &format!(
            r#"{{"name":"{}","arguments":{{"text":"{text}"}}}}"#,
            "d".repeat(300)
        ),
    );
    refused(long_name.as_bytes(), -32602);
    assert!(!s.upstream.saw("delete_file") && !s.upstream.saw("ddd"));
    // The denied tool with a long argument: denied, never forwarded.
    let (r, _) = raw(
        s.port,
        &post(
            "/mcp",
            &call(
                "5",
                &format!(r#"{{"name":"delete_file","arguments":{{"text":"{text}"}}}}"#),
            ),
            "",
        ),
    );
    assert_ne!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!s.upstream.saw("delete_file"));
    // An allowed call with a long argument and a long string id: forwarded byte for byte, and
    // answered to that id.
    let id = format!("\"{}\"", "i".repeat(400));
    let body = call(
        &id,
        &format!(r#"{{"name":"echo","arguments":{{"text":"{text}\n{text}"}}}}"#),
    );
    let (r, _) = raw(s.port, &post("/mcp", &body, ""));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["id"], "i".repeat(400));
    assert!(s.upstream.bodies.lock().unwrap().contains(&body));
    ping_ok(s.port, "/mcp");
}

#[test]
fn malformed_input_and_answers_leave_the_worker_alive() {
    let s = setup();
    // A federated initialize and a tools/call with a duplicate `params` whose last value is not
    // an object: panicked the worker (serde_json IndexMut) before the duplicate check.
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"c","version":"1"}},"params":5}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"p_echo"},"params":"x"}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{},"params":[1]}"#,
    ] {
        let (r, _) = raw(s.port, &post("/fed", body, ""));
        assert_eq!(
            r.status,
            400,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["code"], -32600);
    }
    ping_ok(s.port, "/mcp");
    // The upstream answers `"result": 5` to tools/list: on the filtered passthrough and the
    // federated route, a clean upstream error, and the worker keeps answering.
    let list = r#"{"jsonrpc":"2.0","id":5,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let discover = r#"{"jsonrpc":"2.0","id":5,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    for (path, body, method) in [
        ("/mcp", list, "tools/list"),
        ("/fed", list, "tools/list"),
        ("/fed", discover, "server/discover"),
    ] {
        let (r, _) = raw(
            s.port,
            &post(path, body, &format!("{V2026}mcp-method: {method}\r\n")),
        );
        assert!(
            r.status >= 400,
            "{path} {method}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        assert_eq!(v["id"], 5, "{path} {method}: {v}");
        assert!(v["error"]["code"].is_i64(), "{path} {method}: {v}");
        ping_ok(s.port, "/mcp");
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    integration_tests::daemon::status_kib(pid, "VmRSS")
}

#[test]
fn distinct_long_names_do_not_grow_memory() {
    let s = setup();
    let pid = s.daemon.pid();
    // Over the cap: refused at parse time.
    let long = "a".repeat(129);
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{long}","arguments":{{}}}}}}"#
    );
    let (r, _) = raw(s.port, &post("/mcp", &body, ""));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32602);
    assert!(!s.upstream.saw(&long));

    let mut conn = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut call = |i: u32| {
        let name = format!("{i:0>128}");
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"{name}","arguments":{{}}}}}}"#
        );
        conn.write_all(&post("/mcp", &body, "")).unwrap();
        let r = read_response(&mut conn).expect("an answer");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    };
    // Warm-up: allocator arenas and pools settle.
    for i in 0..1_000 {
        call(i);
    }
    let before = vm_rss_kib(pid);
    for i in 1_000..11_000 {
        call(i);
    }
    let after = vm_rss_kib(pid);
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 10,000 distinct names"
    );
}

/// A body in a charset the gateway does not read is refused, never passed on: Express's
/// `json()` (the TypeScript SDK's `createMcpExpressApp()`) decodes `charset=utf-7`, in which
/// `+ACIAfQ...-` inside a string is a quote that ends it, so the upstream would run
/// `delete_repo` where the gateway checked `search`. Checked against the real server first;
/// then a UTF-8 charset passes, and a compressed body is refused.
#[test]
fn a_body_in_another_charset_or_compressed_never_reaches_the_upstream() {
    let up_port = free_port();
    let _express = integration_tests::peers::express_server(up_port);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwcharset");
    let config = format!(
        r#"{}
[[policy.tools]]
match = "delete_repo"
action = "deny"
[[upstreams]]
name = "repo"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "repo"
"#,
        local_header(&instance, 1, port, admin)
    );
    let mut d = Daemon::start_local(&instance, &config);
    // `"},"name":"delete_repo","arguments":{"q":"` in UTF-7.
    let smuggled = "+ACIAfQAsACIAbgBhAG0AZQAiADoAIgBkAGUAbABlAHQAZQBfAHIAZQBwAG8AIgAsACIAYQByAGcAdQBtAGUAbgB0AHMAIgA6AHsAIgBxACIAOgAi-";
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search","arguments":{{"q":"x{smuggled}"}}}}}}"#
    );
    let send = |to: u16, extra: &str| {
        let request = format!(
            "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2025-11-25\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let (r, _) = raw(to, request.as_bytes());
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    // The server itself reads the smuggled message.
    let (status, text) = send(up_port, "content-type: application/json; charset=utf-7\r\n");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("delete_repo ran"), "the premise: {text}");

    for ct in [
        "application/json; charset=utf-7",
        "application/json; charset=\"UTF-7\"",
        "application/json;charset=utf-16",
        "application/json; charset=utf-8; x=1",
    ] {
        let (status, text) = send(port, &format!("content-type: {ct}\r\n"));
        assert_eq!(status, 415, "{ct}: {text}");
        assert!(!text.contains("ran with"), "{ct}: {text}");
    }
    let (status, text) = send(
        port,
        "content-type: application/json\r\ncontent-encoding: gzip\r\n",
    );
    assert_eq!(status, 415, "gzip: {text}");
    // UTF-8, however written, is what the gateway read: `search` runs with the text as sent.
    for ct in [
        "application/json; charset=UTF-8",
        "application/json;charset=\"utf-8\"",
    ] {
        let (status, text) = send(port, &format!("content-type: {ct}\r\n"));
        assert_eq!(status, 200, "{ct}: {text}");
        assert!(text.contains("search ran with"), "{ct}: {text}");
        assert!(!text.contains("delete_repo ran"), "{ct}: {text}");
    }
    d.stop();
}

/// What an upstream answers that the client could read otherwise than the gateway does is a
/// 502, never relayed: a 401 (its `WWW-Authenticate` would send the client to authorize where
/// the upstream says), two `Content-Type` lines, or one that names `text/event-stream` without
/// being it (the TypeScript SDK reads a stream wherever the string appears; the gateway would
/// relay it unread as JSON), a status outside 100-599 (relayed as `HTTP/1.1 99`, a client
/// finds its status elsewhere, and the gateway's own reading of what it wrote spliced its CORS
/// lines into the body), a `Content-Encoding` it did not ask for, or a redirect (relayed, a
/// `Location` on this gateway sent the client's call, which the Python SDK's client follows,
/// to another route than the one it was checked for; one elsewhere, with its body and headers,
/// to a server of the upstream's choosing). And what reaches the
/// upstream says `application/json` and asks for no compression, whatever the client wrote.
#[test]
fn upstream_heads_a_client_could_read_otherwise_are_not_relayed() {
    let body = r#"{"jsonrpc":"2.0","id":1,"result":{}}"#;
    let heads: [(&str, &'static str); 10] = [
        (
            "status 99",
            "HTTP/1.1 099 X\r\ncontent-type: application/json\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ),
        (
            "status 0",
            "HTTP/1.1 000 X\r\ncontent-type: application/json\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ),
        (
            "status 999",
            "HTTP/1.1 999 X\r\ncontent-type: application/json\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ),
        (
            "gzip",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ),
        (
            "401",
            "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer resource_metadata=\"https://evil.example/prm\"\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "307 to another route",
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: /good\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "302 elsewhere",
            "HTTP/1.1 302 Found\r\nlocation: http://evil.example/steal\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "two types",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-type: text/event-stream\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ),
        (
            "two sessions",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nmcp-session-id: aaa\r\nMCP-Session-Id: bbb\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ),
        (
            "named",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json; x=\"text/event-stream\"\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
        ),
    ];
    assert_eq!(body.len(), 36);
    for (what, head) in heads {
        let fake = FakeUpstream::start(Misbehave::Raw(head));
        let (mut d, port) = gateway_to(&fake, "gwheads");
        let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
        // `charset=UTF-8` is accepted, and not passed on.
        let request = format!(
            "POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json; charset=UTF-8\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: 2025-11-25\r\naccept-encoding: gzip, br\r\ncontent-length: {}\r\n\r\n{call}",
            call.len()
        );
        let (r, _) = raw(port, request.as_bytes());
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 502, "{what}: {text}");
        assert!(r.header("www-authenticate").is_none(), "{what}");
        assert!(r.header("location").is_none(), "{what}");
        assert!(!text.contains("evil.example"), "{what}: {text}");
        let seen = fake.seen.lock().unwrap().join("");
        assert!(
            seen.contains("content-type: application/json\r\n"),
            "{seen}"
        );
        assert!(!seen.to_ascii_lowercase().contains("charset"), "{seen}");
        assert!(seen.contains("accept-encoding: identity\r\n"), "{seen}");
        assert!(!seen.contains("gzip"), "{seen}");
        d.stop();
    }
}

/// What a proxy in front of the gateway acts on never leaves it from an upstream, in a JSON
/// answer or an event stream: nginx served an internal location (a file, the gateway's admin
/// API) in place of the answer given `X-Accel-Redirect`, and re-sent the client's request with
/// its API key to wherever the upstream named (an attacker's review, live through nginx). Nor
/// does what is the upstream's own business (`Set-Cookie`, `Server`), not even when the
/// operator relays every header (`relay_response_headers = ["*"]`). Without that, only what an
/// MCP client reads passes: what acts in a browser or a cache in front (`Cache-Control:
/// public` kept one caller's answer for the next; `Content-Security-Policy`,
/// `Service-Worker-Allowed`, `Content-Disposition`) was relayed by the list of names to drop
/// (an attacker's review). A name the operator gives passes. The answer itself is relayed.
#[test]
fn only_what_a_client_reads_or_the_operator_names_comes_from_an_upstream() {
    let private = "x-accel-redirect: /internal/flag.txt\r\nX-Accel-Limit-Rate: 1\r\nx-sendfile: /etc/passwd\r\nx-lighttpd-send-file: /etc/passwd\r\nx-reproxy-url: http://evil.example/\r\nx-litespeed-location: /internal/\r\nx-envoy-immediate-health-check-fail: true\r\nx-sendfile-temporary: /etc/passwd\r\nx-sendfile2: /etc/passwd 0-\r\nx-reproxy-file: /etc/passwd\r\nnel: {\"report_to\":\"evil\"}\r\nreport-to: {\"group\":\"evil\"}\r\nsurrogate-control: max-age=3600\r\nset-cookie: a=b\r\nserver: evil\r\nservice-worker-allowed: /\r\n";
    let unnamed = "cache-control: public, max-age=3600\r\ncontent-security-policy: sandbox\r\ncontent-disposition: attachment; filename=a.html\r\nspeculation-rules: \"/evil.json\"\r\nx-kept: yes\r\n";
    let directives =
        format!("{private}{unnamed}retry-after: 7\r\nmcp-protocol-version: 2025-11-25\r\n");
    let json: &'static str = Box::leak(
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{directives}content-length: 36\r\n\r\n{{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{{}}}}")
            .into_boxed_str(),
    );
    let event = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
    let sse: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n{directives}x-accel-buffering: yes\r\ncontent-length: {}\r\n\r\n{event}",
            event.len()
        )
        .into_boxed_str(),
    );
    let configs = [
        ("none named", ""),
        ("x-kept named", "relay_response_headers = [\"X-Kept\"]\n"),
        ("every one named", "relay_response_headers = [\"*\"]\n"),
    ];
    for (named, config) in configs {
        for (what, head) in [("json", json), ("event stream", sse)] {
            let fake = FakeUpstream::start(Misbehave::Raw(head));
            let (mut d, port) = gateway_to_with(&fake, "gwaccel", config);
            let (r, _) = raw(port, &echo_call("/mcp"));
            let text = String::from_utf8_lossy(&r.body).into_owned();
            let head: String = r
                .headers
                .iter()
                .map(|(n, v)| format!("{n}: {v}\n"))
                .collect();
            let what = format!("{what}, {named}");
            assert_eq!(r.status, 200, "{what}: {head} {text}");
            assert!(text.contains(r#""result":{}"#), "{what}: {text}");
            let lower = head.to_ascii_lowercase();
            for name in [
                "x-accel-redirect",
                "x-accel-limit-rate",
                "x-sendfile",
                "x-lighttpd",
                "x-reproxy-url",
                "x-litespeed",
                "x-envoy",
                "x-sendfile-temporary",
                "x-sendfile2",
                "x-reproxy-file",
                "nel:",
                "report-to",
                "surrogate-control",
                "set-cookie",
                "server: evil",
                "service-worker-allowed",
                "x-accel-buffering: yes",
            ] {
                assert!(!lower.contains(name), "{what}: {name} relayed: {head}");
            }
            for name in ["retry-after: 7", "mcp-protocol-version: 2025-11-25"] {
                assert!(lower.contains(name), "{what}: {name} not relayed: {head}");
            }
            let every = named == "every one named";
            for name in [
                "content-security-policy",
                "content-disposition",
                "speculation-rules",
            ] {
                assert_eq!(lower.contains(name), every, "{what}: {name}: {head}");
            }
            // An event stream's caching is the gateway's to say (`no-cache`).
            assert_eq!(
                lower.contains("cache-control: public"),
                every && what.starts_with("json"),
                "{what}: {head}"
            );
            assert_eq!(
                lower.contains("x-kept: yes"),
                named != "none named",
                "{what}: {head}"
            );
            d.stop();
        }
    }
}

/// An upstream's answer that is neither JSON nor an event stream (an error page) is relayed to
/// be shown, never run: a 404 of `text/html` with a `<script>` reached a browser that opened
/// the gateway's URL as the gateway's own page (a review). JSON answers carry no such lines.
#[test]
fn an_upstreams_page_is_relayed_to_be_shown_never_run() {
    let page = "<script>alert(document.domain)</script>";
    let head: &'static str = Box::leak(
        format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{page}",
            page.len()
        )
        .into_boxed_str(),
    );
    let fake = FakeUpstream::start(Misbehave::Raw(head));
    let (mut d, port) = gateway_to(&fake, "gwpage");
    let request = echo_call("/mcp");
    let (r, _) = raw(port, &request);
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("content-security-policy"),
        Some("sandbox"),
        "{:?}",
        r.headers
    );
    d.stop();
    let fake = FakeUpstream::start(Misbehave::Raw(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
    ));
    let (mut d, port) = gateway_to(&fake, "gwpage");
    let (r, _) = raw(port, &request);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-security-policy"), None, "{:?}", r.headers);
    d.stop();
}

/// An `MCP-Protocol-Version` that is not UTF-8 is refused (400), never taken for none: it
/// would be forwarded as sent, and an upstream that reads it as Latin-1 and trims the no-break
/// space finds `2025-06-18`, a version the gateway never checked the request for.
#[test]
fn a_protocol_version_that_is_not_utf8_never_reaches_the_upstream() {
    let fake = FakeUpstream::start(Misbehave::Raw(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
    ));
    let (mut d, port) = gateway_to(&fake, "gwversion");
    let call =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let send = |version: &[u8]| {
        let mut request = b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\nmcp-protocol-version: ".to_vec();
        request.extend_from_slice(version);
        request.extend_from_slice(
            format!("\r\ncontent-length: {}\r\n\r\n{call}", call.len()).as_bytes(),
        );
        let (r, _) = raw(port, &request);
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    for version in [&b"2025-06-18\xa0"[..], b"\xa02025-06-18", b"2025-06-18\xff"] {
        let (status, text) = send(version);
        assert_eq!(status, 400, "{version:?}: {text}");
        assert!(text.contains("MCP-Protocol-Version"), "{text}");
    }
    assert!(
        fake.seen.lock().unwrap().is_empty(),
        "nothing reached the upstream"
    );
    let (status, text) = send(b"2025-06-18");
    assert_eq!(status, 200, "{text}");
    d.stop();
}

/// An upstream's reconnection time below a second reaches the client as a second: an
/// upstream that wrote `retry: 0` on a stream it ended at once had the Python SDK's client
/// reconnect through the gateway 1,900 times a second (an attacker's review).
#[test]
fn a_reconnection_time_below_a_second_reaches_the_client_as_one() {
    // And a value the Python SDK reads as 0 (`int("+0")`), and a last line without the empty
    // line that would end its event (a client takes `retry` as it reads the line): a review
    // found both passed as they came.
    let body = "retry: 0\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\nretry:250\n\nretry: +0\n\nretry: 0\n";
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let fake = FakeUpstream::start(Misbehave::Raw(answer));
    let (mut d, port) = gateway_to(&fake, "gwretry");
    let request = echo_call("/mcp");
    let (r, _) = raw(port, &request);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{text}");
    assert!(text.contains("\"result\":{}"), "{text}");
    assert_eq!(text.matches("retry: 1000\n").count(), 4, "{text}");
    assert!(
        !text.contains("retry: 0") && !text.contains("retry:250") && !text.contains("+0"),
        "{text}"
    );
    d.stop();
}

/// An upstream whose URL has a query of its own (an operator's key, a tenant) gets that query
/// and no client's: a request with a query to its route is refused (400), on a passthrough
/// route as on a federated one. Before, the client's query was written after the operator's
/// (`/mcp?tenant=alpha&key=s3cr3t?&tenant=beta&key=`), and a server that reads the last of
/// two parameters (Starlette) took the client's `tenant` and `key` for the operator's.
#[test]
fn a_client_query_never_joins_the_query_of_the_upstreams_url() {
    let fake = FakeUpstream::start(Misbehave::Answer);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwquery");
    let config = format!(
        "{}[[upstreams]]\nname = \"up\"\nurl = \"{}?tenant=alpha&key=s3cr3t\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"up\"\n[[routes]]\npath = \"/fed\"\nfederate = [{{ upstream = \"up\" }}]\n",
        local_header(&instance, 1, port, admin),
        fake.url()
    );
    let mut d = Daemon::start_local(&instance, &config);
    for target in ["/mcp?&tenant=beta&key=", "/mcp?", "/fed?tenant=beta"] {
        let (r, _) = raw(port, &echo_call(target));
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 400, "{target}: {text}");
        assert!(text.contains("query of its own"), "{target}: {text}");
    }
    let (r, _) = raw(port, &echo_call("/mcp"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = fake.seen.lock().unwrap().join("");
    assert!(
        seen.contains("POST /mcp?tenant=alpha&key=s3cr3t HTTP/1.1\r\n"),
        "{seen}"
    );
    assert!(!seen.contains("beta"), "{seen}");
    assert!(!seen.contains("s3cr3t?"), "{seen}");
    d.stop();
}

/// 2026-07-28 `Mcp-Param-*` headers agree with the body the gateway decided on. A tool may
/// mirror an argument into a header (`x-mcp-header`) so that a router can act on it without
/// reading the body; the gateway reads the body, so it checks the two agree (the spec's MUST
/// for anything that reads it). Shown twice:
/// - with the Python SDK's server and client: the real client's mirrored headers pass (after
///   its `tools/list`, which the gateway learns the declarations from), and a disagreeing
///   header, a missing one and one for a tool never listed here are refused by the gateway
///   itself (its words, not the server's);
/// - with an upstream that does not check (a stand-in for a router behind the gateway): the
///   disagreeing header never reaches it; the agreeing one does. Before, every `Mcp-Param-*`
///   header was passed on unchecked.
#[test]
fn mcp_param_headers_that_disagree_with_the_body_never_reach_the_upstream() {
    let server = integration_tests::peers::PyServer::start_with(&["--param-headers"]);
    let fake = FakeUpstream::start(Misbehave::Raw(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 161\r\n\r\n\
         {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"deploy\",\"inputSchema\":{\"type\":\"object\",\"properties\":{\"region\":{\"type\":\"string\",\"x-mcp-header\":\"Region\"}}}}]}}",
    ));
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwparam");
    let config = format!(
        r#"{}
[[upstreams]]
name = "py"
url = "{}"
[[upstreams]]
name = "router"
url = "http://127.0.0.1:{}/mcp"
[[routes]]
path = "/mcp"
upstream = "py"
[[routes]]
path = "/routed"
upstream = "router"
"#,
        local_header(&instance, 2, port, admin),
        server.url(),
        fake.port
    );
    let mut d = Daemon::start_local(&instance, &config);
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;
    let send = |path: &str, method: &str, params: &str, extra: &str| {
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{{{params}}}}}"#);
        let name = if method == "tools/call" {
            "mcp-name: deploy\r\n"
        } else {
            ""
        };
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n\
             mcp-protocol-version: 2026-07-28\r\nmcp-method: {method}\r\n{name}{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let (r, _) = raw(port, request.as_bytes());
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    let call = |path: &str, extra: &str| {
        send(
            path,
            "tools/call",
            &format!(r#""name":"deploy","arguments":{{"region":"eu-west"}},{meta}"#),
            extra,
        )
    };
    let gateways = "does not match argument `region`";

    // Never listed through this gateway: a header cannot be checked, and is refused.
    let (status, text) = call("/mcp", "mcp-param-region: eu-west\r\n");
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("-32020") && text.contains("has not been listed"),
        "{text}"
    );

    // The real client lists tools, then mirrors `region` and `dry_run` into headers.
    let report =
        integration_tests::peers::py_client(&format!("http://127.0.0.1:{port}/mcp"), "2026-07-28");
    assert_eq!(
        report["deploy"], "deployed to eu-west 1 ✓ (dry run)",
        "{report}"
    );

    let (status, text) = call("/mcp", "mcp-param-region: eu-west\r\n");
    assert_eq!(status, 200, "an agreeing header passes: {text}");
    assert!(text.contains("deployed to eu-west"), "{text}");
    for (extra, needle) in [
        ("mcp-param-region: us-east\r\n", gateways),
        ("mcp-param-region: =?base64?dXMtZWFzdA==?=\r\n", gateways),
        ("", "is missing but argument `region` is present"),
        (
            "mcp-param-region: eu-west\r\nmcp-param-dry-run: true\r\n",
            "is present but argument `dry_run` is not",
        ),
        (
            "mcp-param-region: eu-west\r\nmcp-param-other: x\r\n",
            "is not declared by tool `deploy`",
        ),
    ] {
        let (status, text) = call("/mcp", extra);
        assert_eq!(status, 400, "{extra:?}: {text}");
        assert!(
            text.contains("-32020") && text.contains(needle),
            "{extra:?}: {text}"
        );
    }

    // A header that mirrors nothing in its message's body: `Mcp-Param-*` beside another
    // method than `tools/call`.
    let (status, text) = send("/mcp", "tools/list", meta, "mcp-param-region: eu-west\r\n");
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("-32020") && text.contains("does not belong"),
        "{text}"
    );

    let seen = || {
        fake.seen
            .lock()
            .unwrap()
            .join("\n---\n")
            .to_ascii_lowercase()
    };
    // `Mcp-Name` beside a method that names nothing, or naming another task than the body.
    for (method, params) in [
        ("tools/list", meta.to_owned()),
        ("tasks/get", format!(r#""taskId":"task-a",{meta}"#)),
        // A task id beside a method that is not about one names nothing either.
        ("tools/list", format!(r#""taskId":"task-b",{meta}"#)),
    ] {
        let (status, text) = send("/routed", method, &params, "mcp-name: task-b\r\n");
        assert_eq!(status, 400, "{method}: {text}");
        assert!(text.contains("-32020"), "{method}: {text}");
    }
    assert!(!seen().contains("task-b"), "{}", seen());

    // An upstream that acts on headers without reading the body.
    let (status, text) = send("/routed", "tools/list", meta, "");
    assert_eq!(status, 200, "{text}");
    let (status, text) = call("/routed", "mcp-param-region: us-east\r\n");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains(gateways), "{text}");
    assert!(!seen().contains("mcp-param-region: us-east"), "{}", seen());
    let (_, text) = call("/routed", "mcp-param-region: eu-west\r\n");
    assert!(
        seen().contains("mcp-param-region: eu-west"),
        "the agreeing call went on: {text}\n{}",
        seen()
    );
    d.stop();
}

/// A 2026-07-28 client's `tools/list` answer is read whole (to learn its tools'
/// `x-mcp-header` annotations); an upstream's refusal of it is not an answer to read, and
/// reaches the client as the upstream gave it (status, `Retry-After`, body), not as a 502.
#[test]
fn an_upstreams_refusal_of_a_read_list_reaches_the_client_as_given() {
    let fake = FakeUpstream::start(Misbehave::Raw(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 7\r\ncontent-length: 65\r\n\r\n\
         {\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":-32000,\"message\":\"slow\"}}",
    ));
    let (mut d, port) = gateway_to(&fake, "gwlist429");
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let request = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n\
         mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (r, _) = raw(port, request.as_bytes());
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 429, "{text}");
    assert_eq!(r.header("retry-after"), Some("7"), "{r:?}");
    assert!(text.contains("\"slow\""), "{text}");
    d.stop();
}

/// A JSON list of a million zeros (2 MB; a million values to a parser).
fn zeros_2mb() -> String {
    vec!["0"; 1_000_000].join(",")
}

/// Each of `requests` sent on a connection of its own to the gateway at `port`, its answer
/// read on a thread of its own (they wait at a slow upstream).
fn waiting(
    port: u16,
    requests: Vec<Vec<u8>>,
) -> Vec<std::thread::JoinHandle<Option<integration_tests::peers::RawResponse>>> {
    requests
        .into_iter()
        .map(|request| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.write_all(&request).unwrap();
                read_response(&mut c)
            })
        })
        .collect()
}

/// What policy read of a request is not held while its upstream answers: a call's arguments
/// (read into values of 16 to 32 bytes each for the loop breaker and argument rules) are
/// dropped once it is admitted, and a batch holds at most 1,024 messages. Before, twenty slow
/// calls of 2 MB of arguments held 786 MB, and forty 4 MB batches of 90,000 pings 1.6 GB, with
/// no credential (a review).
#[test]
fn a_slow_calls_parsed_arguments_are_not_held_while_it_waits() {
    let fake = FakeUpstream::start(Misbehave::Slow(std::time::Duration::from_secs(4)));
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwheld");
    let config = format!(
        r#"{}
[policy]
loop_breaker = {{ window_s = 60, max_repeats = 1000 }}
[[upstreams]]
name = "slow"
url = "{}"
[[routes]]
path = "/mcp"
upstream = "slow"
"#,
        local_header(&instance, 1, port, admin),
        fake.url()
    );
    let d = Daemon::start_local(&instance, &config);
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let batch = format!("[{}]", vec![ping; 1025].join(","));
    let (r, _) = raw(port, &post("/mcp", &batch, ""));
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_i64()),
        (400, Some(-32600))
    );
    assert!(fake.seen.lock().unwrap().is_empty());

    let body = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"sleep","arguments":{{"pad":[{}]}}}}}}"#,
        zeros_2mb()
    );
    let request = post("/mcp", &body, "");
    let before = vm_rss_kib(d.pid());
    let calls = 24;
    let clients = waiting(port, vec![request; calls]);
    // Every call is at the upstream, which answers after 4 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while fake.seen.lock().unwrap().len() < calls {
        assert!(std::time::Instant::now() < deadline, "not all forwarded");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let held = vm_rss_kib(d.pid());
    for c in clients {
        assert_eq!(c.join().unwrap().map(|r| r.status), Some(200));
    }
    // The bodies themselves (2 MB each) are held until they are answered, and the worker keeps
    // what it parsed the last one into for the next (~130 MiB); their values (16 to 32 bytes
    // each of a 2-byte value, 32 MB a call) are not held per call: 167 MiB more here, 859 MiB
    // on the binary before.
    assert!(
        held < before + calls as u64 * 10 * 1024,
        "RSS {before} KiB before, {held} KiB with {calls} calls of 2 MB waiting"
    );
}

/// On every path that writes a call's body again (a federation renaming its tool, the bridge
/// to a stateless-only upstream, a held session for a 2026-07-28 client), what it parsed the
/// body into is dropped before the upstream is waited for. Before, each kept it (16 to 32 bytes
/// a value) while the upstream answered: 24 calls of 2 MB held 950 MiB on a federation,
/// 1,697 MiB bridged and 1,001 MiB in a held session (a review of the fix for passthrough).
/// Here 12 calls: 174 to 182 MiB more on each path (the worker keeps ~130 MiB of its last
/// parse for the next), 885 MiB on the federation on the binary before.
#[test]
fn a_slow_calls_body_is_not_held_parsed_on_a_path_that_writes_it_again() {
    let (session_port, stateless_port) = (free_port(), free_port());
    let _a = integration_tests::peers::PyServer::start_on(session_port, &["--slow", "--json"]);
    let _b = integration_tests::peers::PyServer::start_on(
        stateless_port,
        &["--slow", "--json", "--stateless-only"],
    );
    let pad = zeros_2mb();
    for (path, tool, modern) in [("/f", "a_", false), ("/b", "", false), ("/h", "", true)] {
        let port = free_port();
        let admin = free_port();
        let instance = unique("gwheldpaths");
        let config = format!(
            r#"{}
[policy]
loop_breaker = {{ window_s = 60, max_repeats = 1000 }}
[[upstreams]]
name = "a"
url = "http://127.0.0.1:{session_port}/mcp"
era = "session"
response_timeout_ms = 30000
[[upstreams]]
name = "b"
url = "http://127.0.0.1:{stateless_port}/mcp"
era = "stateless"
response_timeout_ms = 30000
[[routes]]
path = "/f"
federate = [{{ upstream = "a", prefix = "a_" }}]
[[routes]]
path = "/b"
upstream = "b"
[[routes]]
path = "/h"
upstream = "a"
"#,
            local_header(&instance, 1, port, admin),
        );
        let d = Daemon::start_local(&instance, &config);
        let headers = if modern {
            String::new()
        } else {
            let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
            let v = "mcp-protocol-version: 2025-06-18\r\n";
            let (r, _) = raw(port, &post(path, init, v));
            assert_eq!(r.status, 200, "{path}: {r:?}");
            let sid = r.header("mcp-session-id").expect("a session").to_owned();
            let headers = format!("{v}mcp-session-id: {sid}\r\n");
            let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
            let (r, _) = raw(port, &post(path, note, &headers));
            assert!(r.status < 300, "{path}: {r:?}");
            headers
        };
        let request = |id: u64, name: &str, args: &str| {
            let name = format!("{tool}{name}");
            if modern {
                let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;
                let body = format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{name}",{meta},"arguments":{args}}}}}"#
                );
                let h = format!(
                    "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {name}\r\n"
                );
                post(path, &body, &h)
            } else {
                let body = format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{name}","arguments":{args}}}}}"#
                );
                post(path, &body, &headers)
            }
        };
        let running = || -> i64 {
            let (r, _) = raw(port, &request(1, "calls_running", "{}"));
            let v = r.json();
            v["result"]["structuredContent"]["result"]
                .as_i64()
                .or_else(|| v["result"]["content"][0]["text"].as_str()?.parse().ok())
                .unwrap_or_else(|| panic!("{path}: {v}"))
        };
        assert_eq!(running(), 0, "{path}");
        let args = format!(r#"{{"seconds":6,"pad":[{pad}]}}"#);
        let before = vm_rss_kib(d.pid());
        let calls = 12;
        // Each its own id: one session holds them all.
        let clients = waiting(
            port,
            (0..calls)
                .map(|i| request(100 + i as u64, "sleep", &args))
                .collect(),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while running() < calls {
            assert!(
                std::time::Instant::now() < deadline,
                "{path}: not all running"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let held = vm_rss_kib(d.pid());
        for c in clients {
            let r = c.join().unwrap().expect("an answer");
            let body = String::from_utf8_lossy(&r.body);
            assert!(
                r.status == 200 && body.contains("slept"),
                "{path}: {} {body}",
                r.status
            );
        }
        assert!(
            held < before + 256 * 1024,
            "{path}: RSS {before} KiB before, {held} KiB with {calls} calls of 2 MB waiting"
        );
    }
}
