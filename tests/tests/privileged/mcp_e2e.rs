//! The MCP data plane on loopback (no privileges: the kernel program is off here), with real
//! peers from the package registries: the Python SDK's client through the gateway to the Python
//! SDK's server, in both protocol eras; malformed input of every kind; failing upstreams.

use std::{io::Write as _, time::Duration};

use integration_tests::{
    daemon::Daemon,
    peers::{FakeUpstream, Misbehave, PyServer, free_port, post, py_client, raw, read_response},
    unique,
};

fn config(instance: &str, port: u16, routes: &[(&str, String)], extra_upstream: &str) -> String {
    let mut c = format!(
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
max_body_bytes = 65536
max_header_bytes = 4096
request_timeout_ms = 700
allowed_origins = ["https://console.example"]
"#,
        admin = free_port()
    );
    for (i, (path, url)) in routes.iter().enumerate() {
        c.push_str(&format!(
            "[[upstreams]]\nname = \"u{i}\"\nurl = \"{url}\"\nresponse_timeout_ms = 1500\n{extra_upstream}\n[[routes]]\npath = \"{path}\"\nupstream = \"u{i}\"\n"
        ));
    }
    c
}

/// A gateway on loopback (kernel program off) serving `routes`; returns it and its port.
fn start_gateway(routes: &[(&str, String)], extra_upstream: &str) -> (Daemon, u16) {
    let port = free_port();
    let instance = unique("gwmcp");
    let daemon = Daemon::start_local(&instance, &config(&instance, port, routes, extra_upstream));
    (daemon, port)
}

fn expected(mode: &str) -> serde_json::Value {
    let mut v = serde_json::json!({
        "tools": ["add", "ask_model", "ask_user", "count_with_progress", "echo", "fail"],
        "echo": "héllo ✓",
        "add": "42",
        "fail_is_error": true,
        "progress_result": "counted 3",
        "progress": [1.0, 2.0, 3.0],
        "resource": "hello from the fixture",
        "prompt": "Please review:\nx = 1",
    });
    if mode == "legacy" {
        // Session era: the server's own requests (sampling, elicitation) reach the client and
        // the client's answers reach the server.
        v["ping"] = serde_json::json!(true);
        v["ask_model"] = serde_json::json!("model: 42");
        v["ask_user"] = serde_json::json!("user: accept True");
        v["server_requests"] =
            serde_json::json!([["sampling", "6 x 7?"], ["elicitation", "proceed?"]]);
    }
    v
}

/// A gateway whose route `/fed` federates `members` (name, url, prefix).
fn start_federation(members: &[(&str, String, &str)]) -> (Daemon, u16) {
    let port = free_port();
    let instance = unique("gwfed");
    let mut c = config(&instance, port, &[], "");
    let mut route = String::from("[[routes]]\npath = \"/fed\"\nfederate = [");
    for (name, url, prefix) in members {
        c.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\nurl = \"{url}\"\nresponse_timeout_ms = 1500\n"
        ));
        route.push_str(&format!(
            "{{ upstream = \"{name}\", prefix = \"{prefix}\" }},"
        ));
    }
    c.push_str(&route);
    c.push_str("]\n");
    (Daemon::start_local(&instance, &c), port)
}

#[test]
fn python_sdk_client_through_the_gateway_to_a_python_sdk_server_both_eras() {
    for json_upstream in [false, true] {
        let upstream = PyServer::start(json_upstream);
        let (mut d, port) = start_gateway(&[("/mcp", upstream.url())], "");
        for mode in ["legacy", "2026-07-28"] {
            let direct = py_client(&upstream.url(), mode);
            let through = py_client(&format!("http://127.0.0.1:{port}/mcp"), mode);
            assert_eq!(
                through, direct,
                "{mode}, JSON upstream: {json_upstream}: the gateway changes nothing"
            );
            if !json_upstream {
                // Streaming (SSE) answers carry the progress notifications too.
                assert_eq!(through, expected(mode), "{mode}");
            }
        }
        d.stop();
    }
}

#[test]
fn malformed_input_gets_the_right_status_and_error_and_others_keep_being_served() {
    let upstream = PyServer::start(false);
    let (mut d, port) = start_gateway(&[("/mcp", upstream.url())], "");
    let ok = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let cases: Vec<(&str, Vec<u8>, u16, Option<i64>)> = vec![
        ("not JSON", post("/mcp", "{nope", ""), 400, Some(-32700)),
        ("not JSON-RPC", post("/mcp", r#"{"id":1,"method":"x"}"#, ""), 400, Some(-32600)),
        ("tools/call without a name", post("/mcp", r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{}}"#, ""), 400, Some(-32602)),
        ("batch in 2025-06-18", post("/mcp", &format!("[{ok}]"), "mcp-protocol-version: 2025-06-18\r\n"), 400, Some(-32600)),
        ("unknown protocol version", post("/mcp", ok, "mcp-protocol-version: 1999-01-01\r\n"), 400, Some(-32022)),
        ("foreign origin", post("/mcp", ok, "origin: https://evil.example\r\n"), 403, Some(-32600)),
        (
            "wrong content type",
            format!("POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{ok}", ok.len()).into_bytes(),
            415,
            Some(-32600),
        ),
        ("unknown path", post("/other", ok, ""), 404, Some(-32601)),
        ("wrong method", b"PUT /mcp HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\r\n".to_vec(), 405, Some(-32600)),
        ("CL and TE together", b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, Some(-32600)),
        ("unknown transfer coding", b"POST /mcp HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: gzip\r\n\r\n".to_vec(), 501, Some(-32600)),
        ("body too large", format!("POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", 70_000).into_bytes(), 413, Some(-32600)),
        ("headers too large", format!("GET /mcp HTTP/1.1\r\nhost: gw\r\nx-big: {}\r\n\r\n", "a".repeat(5000)).into_bytes(), 431, Some(-32600)),
        ("garbage request line", b"\x01\x02 nonsense\r\n\r\n".to_vec(), 400, Some(-32600)),
    ];
    let modern_call = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let cases: Vec<_> = cases
        .into_iter()
        .chain([
            (
                "Mcp-Method disagrees with the body",
                post("/mcp", modern_call, "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\nmcp-name: echo\r\n"),
                400,
                Some(-32020),
            ),
            (
                "Mcp-Name disagrees with the body",
                post("/mcp", modern_call, "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: rm\r\n"),
                400,
                Some(-32020),
            ),
            (
                "version header disagrees with _meta",
                post("/mcp", modern_call, "mcp-protocol-version: 2025-11-25\r\nmcp-method: tools/call\r\nmcp-name: echo\r\n"),
                400,
                Some(-32020),
            ),
        ])
        .collect();
    for (what, request, status, code) in &cases {
        let (resp, _) = raw(port, request);
        assert_eq!(resp.status, *status, "{what}: {resp:?}");
        if let Some(code) = code {
            assert_eq!(
                resp.json()["error"]["code"],
                *code,
                "{what}: {}",
                String::from_utf8_lossy(&resp.body)
            );
            assert_eq!(resp.json()["jsonrpc"], "2.0", "{what}");
        }
    }
    // The id of a rejected request comes back with its error.
    let (resp, _) = raw(
        port,
        &post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":"abc","method":"tools/call","params":{"name":1}}"#,
            "",
        ),
    );
    assert_eq!(resp.json()["id"], "abc");

    // A slow client: half a request head, then silence, gets 408 and a closed connection.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"POST /mcp HTTP/1.1\r\nhost: gw\r\n")
        .unwrap();
    let resp = read_response(&mut slow).expect("an answer to the slow client");
    assert_eq!(resp.status, 408);
    assert!(read_response(&mut slow).is_none(), "closed after 408");

    // After all that, a real client is served, and a keep-alive connection carries two requests.
    assert_eq!(
        py_client(&format!("http://127.0.0.1:{port}/mcp"), "legacy"),
        expected("legacy")
    );
    let (first, mut conn) = raw(
        port,
        &post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n",
        ),
    );
    assert_ne!(first.status, 0);
    conn.write_all(&post("/mcp", "{nope", "")).unwrap();
    assert_eq!(
        read_response(&mut conn)
            .expect("second answer on the connection")
            .status,
        400
    );
    d.stop();
}

#[test]
fn failing_upstreams_answer_exactly_the_affected_request() {
    let dead_port = free_port(); // nothing listens here
    let mid = FakeUpstream::start(Misbehave::DieMidStream);
    let hang = FakeUpstream::start(Misbehave::Hang);
    let good = PyServer::start(false);
    let routes = [
        ("/dead", format!("http://127.0.0.1:{dead_port}/mcp")),
        ("/mid", mid.url()),
        ("/hang", hang.url()),
        ("/good", good.url()),
    ];
    let (mut d, port) = start_gateway(&routes, "");
    let call = r#"{"jsonrpc":"2.0","id":77,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}"#;

    let (resp, _) = raw(port, &post("/dead", call, ""));
    assert_eq!(resp.status, 502);
    assert_eq!(
        (
            resp.json()["id"].clone(),
            resp.json()["error"]["code"].clone()
        ),
        (77.into(), (-32003).into())
    );

    let started = std::time::Instant::now();
    let (resp, _) = raw(port, &post("/hang", call, ""));
    assert_eq!(resp.status, 504);
    assert_eq!(resp.json()["id"], 77);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the response timeout (1.5 s) applies"
    );

    // Mid-stream: the progress event arrives, then a JSON-RPC error for request 77 ends the stream.
    let (resp, _) = raw(port, &post("/mid", call, ""));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let text = String::from_utf8(resp.body.clone()).unwrap();
    let events: Vec<serde_json::Value> = text
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["method"], "notifications/progress");
    assert_eq!(
        (events[1]["id"].clone(), events[1]["error"]["code"].clone()),
        (77.into(), (-32003).into())
    );

    // Everything else carries on.
    assert_eq!(
        py_client(&format!("http://127.0.0.1:{port}/good"), "legacy"),
        expected("legacy")
    );
    d.stop();
}

#[test]
fn the_clients_token_never_reaches_the_upstream_which_gets_its_own() {
    let up = FakeUpstream::start(Misbehave::Answer);
    // SAFETY: tests run one at a time; the child inherits this variable.
    unsafe { std::env::set_var("GW_TEST_UPSTREAM_TOKEN", "upstream-secret") };
    let (mut d, port) = start_gateway(
        &[("/mcp", up.url())],
        "bearer_token_env = \"GW_TEST_UPSTREAM_TOKEN\"",
    );
    let (resp, _) = raw(
        port,
        &post(
            "/mcp?x=1",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            "authorization: Bearer client-secret\r\nx-api-key: k\r\ncookie: c=1\r\n\
             x-real-ip: 203.0.113.7\r\nforwarded: for=203.0.113.8\r\nx-forwarded-host: evil.example\r\n\
             cf-connecting-ip: 203.0.113.9\r\nfastly-client-ip: 203.0.113.10\r\n\
             x-forwarded: for=203.0.113.11\r\nx-original-url: /admin\r\n\
             x-http-method-override: DELETE\r\nproxy: http://evil.example:3128\r\n\
             x-forwarded-client-cert: By=spiffe://evil.example;URI=spiffe://evil.example/admin\r\n\
             client-cert: :MIIBevil.example:\r\nfly-client-ip: 203.0.113.12\r\n\
             x-forwarded-for: 198.51.100.1\r\nX-Forwarded-For: 198.51.100.2 \r\n",
        ),
    );
    assert_eq!(resp.status, 200);
    let seen = up.seen.lock().unwrap().join("");
    assert!(
        !seen.contains("client-secret")
            && !seen.to_lowercase().contains("x-api-key")
            && !seen.contains("c=1"),
        "{seen}"
    );
    // Where the request came from is the gateway's to say: what a client claims is not sent
    // on (but in `X-Forwarded-For`, which the gateway appends to).
    assert!(
        !seen.contains("203.0.113.")
            && !seen.contains("evil.example")
            && !seen.contains("/admin")
            && !seen.contains("DELETE"),
        "{seen}"
    );
    assert!(
        seen.contains("authorization: Bearer upstream-secret"),
        "{seen}"
    );
    assert!(seen.starts_with("POST /mcp?x=1 HTTP/1.1\r\n"), "{seen}");
    // Every line of X-Forwarded-For, in order, then the peer (a proxy in front that adds a
    // line of its own puts its word in the second).
    assert!(
        seen.contains("x-forwarded-for: 198.51.100.1, 198.51.100.2, 127.0.0.1\r\n"),
        "{seen}"
    );
    assert_eq!(seen.matches("x-forwarded-for").count(), 1, "{seen}");
    d.stop();
}

#[test]
fn the_demo_upstream_serves_the_python_sdk_client_through_the_gateway() {
    let up_port = free_port();
    let _upstream = integration_tests::peers::demo_upstream(up_port);
    let (mut d, port) = start_gateway(&[("/mcp", format!("http://127.0.0.1:{up_port}/mcp"))], "");
    for mode in ["legacy", "2026-07-28", "auto"] {
        let out = integration_tests::peers::py_script(
            r#"
import asyncio, json, sys
from mcp import Client
async def main(url, mode):
    async with Client(url, mode=mode) as c:
        t = await c.list_tools()
        r = await c.call_tool("add", {"a": 2, "b": 40})
        w = await c.call_tool("word_count", {"text": "three little words"})
        e = await c.call_tool("echo", {})
        print(json.dumps({"tools": [x.name for x in t.tools], "add": r.content[0].text, "wc": w.content[0].text, "echo_err": e.is_error}))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"#,
            &[&format!("http://127.0.0.1:{port}/mcp"), mode],
        );
        assert_eq!(
            out,
            serde_json::json!({"tools": ["echo", "add", "word_count", "utc_now"], "add": "42", "wc": "3 words, 18 characters", "echo_err": true}),
            "{mode}"
        );
    }
    d.stop();
}

#[test]
fn conformance_suite_scenarios_pass_through_the_gateway_exactly_as_they_do_direct() {
    let up_port = free_port();
    let _everything = integration_tests::peers::server_everything(up_port);
    let url = format!("http://127.0.0.1:{up_port}/mcp");
    let port = free_port();
    let instance = unique("gwconf");
    // Passthrough at /mcp; the same server federated alone, without a prefix, at /fed.
    let c = config(&instance, port, &[("/mcp", url.clone())], "")
        + "[[routes]]\npath = \"/fed\"\nfederate = [{ upstream = \"u0\", prefix = \"\" }]\n";
    let mut d = Daemon::start_local(&instance, &c);
    let direct = integration_tests::peers::conformance(&url);
    let through = integration_tests::peers::conformance(&format!("http://127.0.0.1:{port}/mcp"));
    let federated = integration_tests::peers::conformance(&format!("http://127.0.0.1:{port}/fed"));
    assert_eq!(
        federated, direct,
        "the same scenarios pass and fail through a federated route"
    );
    assert!(
        direct.len() >= 30,
        "the suite ran its server scenarios: {direct:?}"
    );
    assert_eq!(
        through, direct,
        "the same scenarios pass and fail through the gateway"
    );
    // server-everything lacks the suite's fixture tools, so not every scenario passes direct;
    // these exercise the transport itself and must pass.
    for core in [
        "server-initialize",
        "ping",
        "tools-list",
        "tools-call-simple-text",
        "tools-call-error",
        "server-sse-multiple-streams",
        "resources-subscribe",
        "prompts-list",
    ] {
        assert_eq!(
            through.get(core),
            Some(&true),
            "{core} through the gateway: {through:?}"
        );
    }
    d.stop();
}

#[test]
fn shutdown_finishes_requests_in_flight_and_accepts_no_new_ones() {
    let up = FakeUpstream::start(Misbehave::Slow(Duration::from_millis(1200)));
    let (mut d, port) = start_gateway(&[("/mcp", up.url())], "");
    let in_flight = std::thread::spawn(move || {
        raw(
            port,
            &post(
                "/mcp",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
                "",
            ),
        )
        .0
        .status
    });
    // In flight once the upstream has it (not after a fixed pause, which a loaded host can
    // outlast): it answers 1.2 s later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while up.seen.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the request reached the upstream"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d.terminate();
    d.wait_for_log("shutting down", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    // While the request is still in flight (its upstream answers after 1.2 s), the listeners are
    // already closed on every worker.
    for _ in 0..4 {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "no new connections once draining"
        );
    }
    assert!(
        !in_flight.is_finished(),
        "the checks above ran during the drain"
    );
    assert_eq!(
        in_flight.join().unwrap(),
        200,
        "the request in flight was answered"
    );
    d.stop();
}

/// The gateway runs without transparent huge pages (memory it gives back after connections
/// close was refilled into 2 MiB pages by the kernel), unless `MIMALLOC_ALLOW_THP` says
/// otherwise.
#[test]
fn transparent_huge_pages_are_off_unless_the_environment_allows_them() {
    let thp = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("the gateway's status")
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(|v| v.trim().to_owned())
    };
    let up = FakeUpstream::start(Misbehave::Answer);
    let (mut d, _) = start_gateway(&[("/mcp", up.url())], "");
    assert_eq!(thp(d.pid()).as_deref(), Some("0"), "by default");
    d.stop();
    let (port, instance) = (free_port(), unique("gwmcp"));
    let mut d = Daemon::start_local_with_env(
        &instance,
        &config(&instance, port, &[("/mcp", up.url())], ""),
        &[("MIMALLOC_ALLOW_THP", "1")],
    );
    assert_eq!(thp(d.pid()).as_deref(), Some("1"), "MIMALLOC_ALLOW_THP=1");
    d.stop();
}

/// A SIGTERM while the gateway starts (here while it waits, up to 3 s, on a fleet's Redis that
/// takes the connection and never answers) is kept until the start is done and ends the run
/// cleanly; it does not kill the process by the signal's default action, as it did when the
/// handlers were installed after the data plane started.
#[test]
fn sigterm_during_the_start_ends_the_run_cleanly() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = FakeUpstream::start(Misbehave::Answer);
    let (port, instance) = (free_port(), unique("gwmcp"));
    let c = config(&instance, port, &[("/mcp", up.url())], "")
        + &format!(
            "[state]\npath = \"{}\"\nredis = \"redis://{}\"\nfleet = \"early\"\n",
            integration_tests::daemon::state_dir(&instance).display(),
            silent.local_addr().unwrap()
        );
    let mut d = Daemon::start_local_until(&instance, &c, "no `[state] fleet_secret_env`");
    assert!(
        !d.log().contains("data plane running"),
        "still starting:\n{}",
        d.log()
    );
    d.terminate();
    let status = d
        .wait_exit(Duration::from_secs(15))
        .expect("the gateway exits once started");
    assert!(status.success(), "exited with {status}; log:\n{}", d.log());
    assert!(d.log().contains("data plane running"), "{}", d.log());
}

/// A keep-alive connection idle past its grace read (it waits on the worker's table of idle
/// connections, holding no timer and no read) is closed as soon as a shutdown begins, not
/// at the end of the grace period nor at its idle timeout, and the gateway exits without
/// waiting for it.
#[test]
fn shutdown_closes_idle_keep_alive_connections_at_once() {
    use std::io::Read as _;
    let up = FakeUpstream::start(Misbehave::Answer);
    // A grace period of 10 s, so that a loaded host's slowness is not mistaken for it.
    let (port, instance) = (free_port(), unique("gwmcp"));
    let c = config(&instance, port, &[("/mcp", up.url())], "")
        .replace("shutdown_grace_ms = 2000", "shutdown_grace_ms = 10000");
    let mut d = Daemon::start_local(&instance, &c);
    let (r, mut s) = raw(
        port,
        &post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            "",
        ),
    );
    assert_eq!(r.status, 200);
    // Past the 500 ms grace read: the connection waits on readiness alone.
    std::thread::sleep(Duration::from_millis(900));
    let started = std::time::Instant::now();
    d.terminate();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    let n = s.read(&mut b).map_err(|e| e.kind());
    let took = started.elapsed();
    assert_eq!(n, Ok(0), "the idle connection is closed, nothing sent");
    // The grace period is 10 s, the idle timeout 60 s.
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    d.stop();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited after {:?}",
        started.elapsed()
    );
}

/// A client drops an answer's event stream after two events and resumes it 0.5 s later with
/// `Last-Event-ID`: once after the call ended (10 ms between events), and once while it still
/// runs (1 s between events). The gateway reads the stream on for the client that left
/// (`relay::drain`); the resume takes it over, so that the SDK's server sends the rest there:
/// before, the server replayed nothing to the resume and ended it (its request's own stream
/// was still open, held by the gateway), and the result went nowhere.
#[test]
fn an_interrupted_answer_resumes_with_last_event_id_in_passthrough_and_federation() {
    let upstream = PyServer::start_with(&["--resumable"]);
    let port = free_port();
    let instance = unique("gwresume");
    let c = config(&instance, port, &[("/mcp", upstream.url())], "")
        + "[[routes]]\npath = \"/fed\"\nfederate = [{ upstream = \"u0\", prefix = \"p_\" }]\n";
    let mut d = Daemon::start_local(&instance, &c);
    for (path, tool, steps, pause_ms) in [
        ("/mcp", "count_with_progress", 8, 10),
        ("/fed", "p_count_with_progress", 8, 10),
        ("/mcp", "count_with_progress", 4, 1000),
        ("/fed", "p_count_with_progress", 4, 1000),
    ] {
        let r = integration_tests::peers::py_resume(
            &format!("http://127.0.0.1:{port}{path}"),
            tool,
            steps,
            pause_ms,
        );
        assert_eq!(r["resume_status"], 200, "{path}: {r}");
        // Nothing lost, nothing twice: the resumed stream starts after the last event seen.
        let before: Vec<u64> = serde_json::from_value(r["before"].clone()).unwrap();
        let after: Vec<u64> = serde_json::from_value(r["after"].clone()).unwrap();
        let progress: Vec<u64> = (1..=u64::from(steps)).collect();
        assert_eq!(
            [before, after].concat(),
            progress,
            "{path}, {pause_ms} ms: {r}"
        );
        assert_eq!(
            r["result"]["content"][0]["text"],
            format!("counted {steps}"),
            "{path}, {pause_ms} ms: {r}"
        );
        if path == "/fed" {
            // Event ids name the member, so that the resumption reaches it.
            let last = r["last"].as_str().unwrap();
            assert!(last.starts_with("u0."), "{r}");
        }
    }
    d.stop();
}

#[test]
fn session_era_get_stream_and_delete_pass_through_to_the_upstream() {
    let upstream = PyServer::start(false);
    let (mut d, port) = start_gateway(&[("/mcp", upstream.url())], "");
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let (resp, _) = raw(port, &post("/mcp", init, ""));
    assert_eq!(resp.status, 200, "{resp:?}");
    let session = resp
        .header("mcp-session-id")
        .expect("the upstream's session id is relayed")
        .to_owned();
    let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-11-25\r\n");
    let (resp, _) = raw(
        port,
        &post(
            "/mcp",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            &headers,
        ),
    );
    assert_eq!(resp.status, 202);

    // The GET stream: the answer's head arrives and the stream stays open.
    let mut get = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    get.write_all(
        format!("GET /mcp HTTP/1.1\r\nhost: gw\r\naccept: text/event-stream\r\n{headers}\r\n")
            .as_bytes(),
    )
    .unwrap();
    get.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(&mut get, &mut byte).expect("the GET stream's head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && head.contains("content-type: text/event-stream"),
        "{head}"
    );
    assert!(head.contains("x-accel-buffering: no"), "{head}");
    drop(get);

    // DELETE ends the session upstream: the next request with it is unknown there (404).
    let (resp, _) = raw(
        port,
        format!("DELETE /mcp HTTP/1.1\r\nhost: gw\r\n{headers}\r\n").as_bytes(),
    );
    assert!(resp.status == 200 || resp.status == 204, "{resp:?}");
    let (resp, _) = raw(
        port,
        &post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
            &headers,
        ),
    );
    assert_eq!(resp.status, 404, "session gone upstream: {resp:?}");
    d.stop();
}

#[test]
fn federation_merges_real_servers_routes_calls_and_relays_server_requests_in_both_eras() {
    let py = PyServer::start(false);
    let demo_port = free_port();
    let _demo = integration_tests::peers::demo_upstream(demo_port);
    let (mut d, port) = start_federation(&[
        ("py", py.url(), "py_"),
        ("demo", format!("http://127.0.0.1:{demo_port}/mcp"), "demo_"),
    ]);
    let url = format!("http://127.0.0.1:{port}/fed");
    for mode in ["legacy", "2026-07-28"] {
        // The fixture server's own test, through the federation under its prefix.
        let mut want = expected(mode);
        let mut tools: Vec<String> = want["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("py_{}", t.as_str().unwrap()))
            .chain(["demo_add", "demo_echo", "demo_utc_now", "demo_word_count"].map(String::from))
            .collect();
        tools.sort();
        want["tools"] = serde_json::json!(tools);
        let got = integration_tests::peers::py_client_prefixed(&url, mode, "py_");
        assert_eq!(got, want, "{mode}");
        // Calls reach the other member too; an unknown name is refused as the spec says.
        let out = integration_tests::peers::py_script(
            r#"
import asyncio, json, sys
from mcp import Client
async def main(url, mode):
    async with Client(url, mode=mode) as c:
        r = await c.call_tool("demo_add", {"a": 20, "b": 22})
        w = await c.call_tool("demo_word_count", {"text": "three little words"})
        try:
            await c.call_tool("nobody_echo", {"text": "x"})
            unknown = "answered"
        except Exception as e:
            unknown = str(e)
        prompts = await c.list_prompts()
        resources = await c.list_resources()
        print(json.dumps({"add": r.content[0].text, "wc": w.content[0].text, "unknown": unknown,
                          "prompts": [p.name for p in prompts.prompts],
                          "resources": [str(x.uri) for x in resources.resources]}))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"#,
            &[&url, mode],
        );
        assert_eq!(out["add"], "42", "{mode}");
        assert_eq!(out["wc"], "3 words, 18 characters", "{mode}");
        assert!(
            out["unknown"]
                .as_str()
                .unwrap()
                .contains("unknown tool `nobody_echo`"),
            "{out}"
        );
        assert_eq!(out["prompts"], serde_json::json!(["py_review"]), "{mode}");
        assert_eq!(
            out["resources"],
            serde_json::json!(["fixture://greeting"]),
            "{mode}"
        );
    }
    d.stop();
}

/// A member whose session id is too long to seal is left out of the federated session: the
/// other members serve on. Before (an attacker's review), it made the client's session id 16 KB
/// and every later request 431. A member whose session has ended (404 to a list) makes the
/// merged list 404, so that the client initializes again (a member that restarted comes back
/// so; leaving it out kept its tools from every open session, the fourth review), while a call
/// to another member is still answered.
#[test]
fn a_member_with_a_long_session_id_is_left_out_and_an_ended_one_asks_for_a_new_session() {
    let py = PyServer::start(true);
    let long = PyServer::script_on("list_member.py", free_port(), &["longsid"]);
    let ended = PyServer::script_on("list_member.py", free_port(), &["ended"]);
    let (mut d, port) = start_federation(&[
        ("py", py.url(), "py_"),
        ("long", long.url(), "l_"),
        ("ended", ended.url(), "e_"),
    ]);
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (r, _) = raw(port, &post("/fed", init, ""));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(
        v["result"]["_meta"]["io.mcp-gateway/unavailable"],
        serde_json::json!(["long"]),
        "{v}"
    );
    let sid = r.header("mcp-session-id").expect("a session id").to_owned();
    assert!(sid.len() < 1024, "{} bytes", sid.len());
    let session = format!("mcp-session-id: {sid}\r\nmcp-protocol-version: 2025-06-18\r\n");
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let (r, _) = raw(port, &post("/fed", list, &session));
    assert_eq!(r.status, 404, "{:?}", r.json());
    let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"py_echo","arguments":{"text":"hi"}}}"#;
    let (r, _) = raw(port, &post("/fed", call, &session));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "hi",
        "{:?}",
        r.json()
    );
    d.stop();
}

#[test]
fn federated_sessions_are_sealed_and_a_failing_member_affects_only_its_own_calls() {
    let py = PyServer::start(true);
    let dead = format!("http://127.0.0.1:{}/mcp", free_port());
    let (mut d, port) = start_federation(&[("py", py.url(), "py_"), ("down", dead, "down_")]);
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (r, _) = raw(port, &post("/fed", init, ""));
    assert_eq!(r.status, 200);
    let result = &r.json()["result"];
    assert_eq!(result["protocolVersion"], "2025-06-18");
    assert_eq!(result["serverInfo"]["name"], "mcp-gateway");
    assert!(result["capabilities"]["tools"].is_object(), "{result}");
    let sid = r.header("mcp-session-id").expect("a session id").to_owned();
    assert!(sid.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    let session = format!("mcp-session-id: {sid}\r\nmcp-protocol-version: 2025-06-18\r\n");

    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    // Without a session: 400; an altered one: 404 (the client initializes again).
    let (r, _) = raw(port, &post("/fed", list, ""));
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_i64()),
        (400, Some(-32600))
    );
    let forged = format!("mcp-session-id: {}x\r\n", &sid[..sid.len() - 1]);
    let (r, _) = raw(port, &post("/fed", list, &forged));
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_i64()),
        (404, Some(-32001))
    );
    // The dead member failed to initialize: the session holds only `py`.
    let (r, _) = raw(port, &post("/fed", list, &session));
    assert_eq!(r.status, 200);
    let listed = r.json();
    let names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"py_echo") && names.iter().all(|n| n.starts_with("py_")),
        "{names:?}"
    );
    let call = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"py_add","arguments":{"a":1,"b":2}}}"#;
    let (r, _) = raw(port, &post("/fed", call, &session));
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "3",
        "{:?}",
        r.json()
    );
    for (body, code) in [
        (
            r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"zzz","arguments":{}}}"#,
            -32602,
        ),
        (r#"{"jsonrpc":"2.0","id":5,"method":"no/such"}"#, -32601),
        (r#"[{"jsonrpc":"2.0","id":6,"method":"ping"}]"#, -32600),
    ] {
        let (r, _) = raw(port, &post("/fed", body, &session));
        assert_eq!(
            r.json()["error"]["code"].as_i64(),
            Some(code),
            "{body}: {:?}",
            r.json()
        );
    }

    // 2026-07-28 (no sessions): every member is asked each time. The dead one is named in the
    // list's `_meta`, and a call it owns gets a JSON-RPC error with the call's id.
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;
    let modern = "mcp-protocol-version: 2026-07-28\r\n";
    let list = format!(r#"{{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{{{meta}}}}}"#);
    let (r, _) = raw(
        port,
        &post(
            "/fed",
            &list,
            &format!("{modern}mcp-method: tools/list\r\n"),
        ),
    );
    let v = r.json();
    assert_eq!(
        v["result"]["_meta"]["io.mcp-gateway/unavailable"],
        serde_json::json!(["down"]),
        "{v}"
    );
    assert!(v["result"]["tools"].as_array().unwrap().len() >= 4, "{v}");
    let call = |name: &str, id: u32| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{name}","arguments":{{"text":"hi"}},{meta}}}}}"#
        )
    };
    let headers = |name: &str| format!("{modern}mcp-method: tools/call\r\nmcp-name: {name}\r\n");
    let (r, _) = raw(
        port,
        &post("/fed", &call("down_echo", 8), &headers("down_echo")),
    );
    assert_eq!(r.status, 502);
    assert_eq!(
        (r.json()["id"].as_i64(), r.json()["error"]["code"].as_i64()),
        (Some(8), Some(-32003))
    );
    // The rewritten tool name travels in Mcp-Name too, so the upstream's own check passes.
    let (r, _) = raw(
        port,
        &post("/fed", &call("py_echo", 9), &headers("py_echo")),
    );
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "hi",
        "{:?}",
        r.json()
    );
    let (r, _) = raw(port, b"GET /fed HTTP/1.1\r\nhost: gw\r\nmcp-protocol-version: 2026-07-28\r\naccept: text/event-stream\r\n\r\n");
    assert_eq!(r.status, 405);
    d.stop();
}

/// On an upstream said to stop a call whose connection closes (`closing_cancels`; without it a
/// call with no session to cancel it in runs on, its slot held: see
/// `hardening_policy::a_call_no_session_can_cancel_holds_its_slot_after_its_client_leaves`).
#[test]
fn a_client_that_closes_its_connection_cancels_the_upstream_request_at_once() {
    let hang = FakeUpstream::start(Misbehave::Hang);
    let stall = FakeUpstream::start(Misbehave::StallMidStream);
    let port = free_port();
    let instance = unique("gwcancel");
    // Long upstream timeouts: only the client's leaving can end these requests early.
    let c = config(
        &instance,
        port,
        &[("/hang", hang.url()), ("/stall", stall.url())],
        "closing_cancels = true",
    )
    .replace("response_timeout_ms = 1500", "response_timeout_ms = 60000");
    let mut d = Daemon::start_local(&instance, &c);
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let headers =
        "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: echo\r\n";
    let wait_for = |up: &FakeUpstream, what: &str| {
        for _ in 0..200 {
            if up
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|s| s == what || (what == "request" && s.starts_with("POST")))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    for (path, up) in [("/hang", &hang), ("/stall", &stall)] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&post(path, call, headers)).unwrap();
        assert!(wait_for(up, "request"), "{path}: the upstream got the call");
        if path == "/stall" {
            // The stream has started: its first event reaches the client.
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            while !String::from_utf8_lossy(&got).contains("notifications/progress") {
                let n = std::io::Read::read(&mut s, &mut buf).unwrap();
                assert!(n > 0, "the stream ended early");
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert!(
            !up.seen.lock().unwrap().iter().any(|x| x == "closed"),
            "{path}: still open"
        );
        drop(s);
        // Within the 10 s bound (the upstream timeout is 60 s): the gateway hung up upstream.
        assert!(
            wait_for(up, "closed"),
            "{path}: the gateway closed the upstream request"
        );
    }
    d.stop();
}

/// Bursts of overlapping calls to the Python SDK's server (uvicorn, which closes keep-alive
/// connections idle for 5 s) with a quiet spell between them longer than that: the pool's
/// connections are all dead when the second burst arrives, and it must not see a single 502.
#[test]
fn a_burst_after_the_upstream_closed_the_pools_idle_connections_is_served_in_full() {
    let sdk = PyServer::start(true);
    let (mut d, port) = start_gateway(&[("/mcp", sdk.url())], "");
    let burst = || {
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            let calls: Vec<_> = (0..8)
                .map(|i| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        // `count_with_progress` sleeps 10 ms a step: the eight calls overlap, so
                        // each worker's pool ends up holding several connections.
                        let body = format!(
                            r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"count_with_progress","arguments":{{"steps":3}},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
                        );
                        let req = post(
                            "/mcp",
                            &body,
                            "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: count_with_progress\r\n",
                        );
                        barrier.wait();
                        let (r, _) = raw(port, &req);
                        (r.status, r.json())
                    })
                })
                .collect();
            calls
                .into_iter()
                .map(|c| c.join().expect("call thread"))
                .collect::<Vec<_>>()
        })
    };
    for (status, body) in burst() {
        assert_eq!(status, 200, "first burst: {body}");
    }
    // uvicorn's default keep-alive timeout is 5 s.
    std::thread::sleep(Duration::from_millis(6000));
    for (status, body) in burst() {
        assert_eq!(status, 200, "after the quiet spell: {body}");
        assert_eq!(body["result"]["content"][0]["text"], "counted 3", "{body}");
    }
    d.stop();
}

/// What an upstream says of itself stays with it: server-everything (Express) answers with
/// `X-Powered-By` and CORS headers that allow every origin; relayed, they would tell an attacker
/// what runs behind the gateway and let any web page's script read the gateway's answers. Its
/// MCP headers still pass.
#[test]
fn the_upstreams_own_headers_are_not_relayed() {
    let up_port = free_port();
    let _everything = integration_tests::peers::server_everything(up_port);
    let (mut d, port) = start_gateway(&[("/mcp", format!("http://127.0.0.1:{up_port}/mcp"))], "");
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let req = post("/mcp", init, "mcp-protocol-version: 2025-11-25\r\n");
    let (direct, _) = raw(up_port, &req);
    let private = |r: &integration_tests::peers::RawResponse| -> Vec<String> {
        r.headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .filter(|n| n == "x-powered-by" || n.starts_with("access-control-"))
            .collect()
    };
    assert!(
        !private(&direct).is_empty(),
        "the upstream sends headers of its own: {:?}",
        direct.headers
    );
    let (through, _) = raw(port, &req);
    assert_eq!(through.status, 200, "{:?}", through.headers);
    assert_eq!(
        private(&through),
        Vec::<String>::new(),
        "{:?}",
        through.headers
    );
    assert!(
        through.header("mcp-session-id").is_some(),
        "MCP headers pass: {:?}",
        through.headers
    );
    d.stop();
}
