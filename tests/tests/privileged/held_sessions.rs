//! A 2026-07-28 client (the default of the current SDKs) in front of an upstream that speaks
//! only the session era: the gateway opens and holds the upstream's session and translates.
//! The upstream is the reference server from npm (`@modelcontextprotocol/server-everything`,
//! session era only), the client the Python SDK's; passthrough and federation.

use integration_tests::{
    daemon::Daemon,
    peers::{PyServer, free_port, post, py_client_prefixed, py_script, raw, server_everything},
    unique,
};

/// Lists the tools and calls `echo` (server-everything's, under the given name); prints what
/// it saw, or the error.
const CLIENT: &str = r#"
import asyncio, json, sys
from mcp import Client

async def main(url, mode, echo):
    out = {}
    try:
        async with Client(url, mode=mode) as c:
            t = await c.list_tools()
            out["tools"] = sorted(x.name for x in t.tools)
            r = await c.call_tool(echo, {"message": "héllo"})
            out["echo"] = r.content[0].text
    except BaseException as e:  # noqa: BLE001 - reported for the test
        out["error"] = repr(e)
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"#;

fn client(url: &str, mode: &str, echo: &str) -> serde_json::Value {
    py_script(CLIENT, &[url, mode, echo])
}

fn config(instance: &str, port: u16, rest: &str) -> String {
    format!(
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
{rest}
"#,
        admin = free_port()
    )
}

fn tools_of(report: &serde_json::Value) -> Vec<String> {
    report["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools: {report}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_stateless_client_is_served_over_a_held_session_in_passthrough() {
    let up_port = free_port();
    let up = format!("http://127.0.0.1:{up_port}/mcp");
    let mut everything = server_everything(up_port);
    // Direct, the gap: the session-era server refuses a 2026-07-28 client.
    let direct = client(&up, "2026-07-28", "echo");
    assert!(
        direct["error"]
            .as_str()
            .is_some_and(|e| e.contains("not initialized")),
        "{direct}"
    );
    let legacy = client(&up, "legacy", "echo");
    let all = tools_of(&legacy);
    assert!(all.len() > 5, "{legacy}");

    let port = free_port();
    let instance = unique("gwheld");
    let c = config(
        &instance,
        port,
        &format!(
            "[[upstreams]]\nname = \"everything\"\nurl = \"{up}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"everything\"\n"
        ),
    );
    let mut d = Daemon::start_local(&instance, &c);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let through = client(&url, "2026-07-28", "echo");
    assert_eq!(tools_of(&through), all, "{through}");
    assert_eq!(through["echo"], "Echo: héllo", "{through}");
    // The session era still passes as it is.
    assert_eq!(client(&url, "legacy", "echo"), legacy);

    // server/discover is answered for the upstream, from the held session's initialize.
    let discover = r#"{"jsonrpc":"2.0","id":7,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let (resp, _) = raw(
        port,
        &post(
            "/mcp",
            discover,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: server/discover\r\n",
        ),
    );
    assert_eq!(resp.status, 200);
    let v = resp.json();
    assert_eq!(v["id"], 7, "{v}");
    let versions = v["result"]["supportedVersions"].to_string();
    assert!(versions.contains("2026-07-28"), "{v}");
    assert!(
        v["result"]["serverInfo"]["name"]
            .as_str()
            .is_some_and(|n| n.contains("everything")),
        "{v}"
    );
    assert!(v["result"]["capabilities"]["tools"].is_object(), "{v}");

    // The upstream restarts and forgets every session: the gateway opens a new one, and the
    // client never sees it.
    drop(everything);
    everything = server_everything(up_port);
    let again = client(&url, "2026-07-28", "echo");
    assert_eq!(again["echo"], "Echo: héllo", "{again}");
    drop(everything);
    d.stop();
}

/// Callers of one tenant share its held session, and each numbers its requests from 1. Over the
/// session each request goes under an id of the gateway's: a slow call's answer reaches its own
/// caller, not the one whose call with the same id came meanwhile (the TypeScript SDK's server
/// routes an answer by its id, so the second request took the first one's place and the slow
/// call was never answered).
#[test]
fn callers_sharing_a_held_session_get_their_own_answers_whatever_their_ids() {
    let up_port = free_port();
    let up = format!("http://127.0.0.1:{up_port}/mcp");
    let everything = server_everything(up_port);
    let port = free_port();
    let instance = unique("gwheldids");
    let c = config(
        &instance,
        port,
        &format!(
            "[[upstreams]]\nname = \"everything\"\nurl = \"{up}\"\nresponse_timeout_ms = 8000\n[[routes]]\npath = \"/mcp\"\nupstream = \"everything\"\n"
        ),
    );
    let mut d = Daemon::start_local(&instance, &c);
    let call = move |tool: &str, args: &str| {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{args},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
        );
        let headers = format!(
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {tool}\r\n"
        );
        let (r, _) = raw(port, &post("/mcp", &body, &headers));
        (r.status, r.json())
    };
    let text = |v: &serde_json::Value| {
        v["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned)
    };
    // The session is opened by the first call.
    let (status, first) = call("echo", r#"{"message":"first"}"#);
    assert_eq!(
        (status, text(&first).as_deref()),
        (200, Some("Echo: first")),
        "{first}"
    );
    let slow = std::thread::spawn(move || {
        call(
            "trigger-long-running-operation",
            r#"{"duration":1.5,"steps":1}"#,
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (status, second) = call("echo", r#"{"message":"second"}"#);
    assert_eq!(
        (status, text(&second).as_deref()),
        (200, Some("Echo: second")),
        "{second}"
    );
    assert_eq!(second["id"], 1, "{second}");
    let (status, long) = slow.join().unwrap();
    assert_eq!(status, 200, "{long}");
    assert_eq!(long["id"], 1, "{long}");
    assert!(
        text(&long).is_some_and(|t| t.starts_with("Long running operation completed")),
        "{long}"
    );
    // The gateway declared no client capabilities on the session, so the upstream asked no
    // client anything: a client's response could only answer what it asked another caller.
    // Accepted, and not sent.
    let answer = r#"{"jsonrpc":"2.0","id":5,"result":{}}"#;
    let (r, _) = raw(
        port,
        &post("/mcp", answer, "mcp-protocol-version: 2026-07-28\r\n"),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    // Nor may a caller initialize the shared session again, declaring capabilities for
    // every caller (a Python SDK server would take them): not a method of the era.
    let init = r#"{"jsonrpc":"2.0","id":6,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"elicitation":{}},"clientInfo":{"name":"x","version":"1"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let (r, _) = raw(
        port,
        &post(
            "/mcp",
            init,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: initialize\r\n",
        ),
    );
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["error"]["code"],
        -32601,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let (status, after) = call("echo", r#"{"message":"after"}"#);
    assert_eq!(
        (status, text(&after).as_deref()),
        (200, Some("Echo: after")),
        "{after}"
    );
    drop(everything);
    d.stop();
}

/// Tasks over a held session: the session is the tenant's, and server-everything binds a task
/// to the session it came on, so without the gateway every caller of the tenant would list,
/// read and cancel every other's tasks. The gateway binds each to the caller whose
/// task-augmented call created it, as on an upstream without sessions.
#[test]
fn tasks_on_a_tenants_held_session_are_their_creators_alone() {
    let up_port = free_port();
    let up = format!("http://127.0.0.1:{up_port}/mcp");
    let everything = server_everything(up_port);
    let keys = ["held-alpha-0123456789", "held-beta-0123456789"];
    let shas = integration_tests::peers::py_script(
        "import hashlib, json, sys; print(json.dumps([hashlib.sha256(k.encode()).hexdigest() for k in sys.argv[1:]]))",
        &keys,
    );
    let mut auth = String::new();
    for (i, agent) in ["a", "b"].iter().enumerate() {
        auth.push_str(&format!(
            "[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"t\"\nagent = \"{agent}\"\n",
            shas[i].as_str().expect("a digest")
        ));
    }
    let port = free_port();
    let instance = unique("gwheldtasks");
    let c = config(
        &instance,
        port,
        &format!(
            "default_tenant = \"t\"\n[[tenants]]\nname = \"t\"\nid = 1\n{auth}[[upstreams]]\nname = \"everything\"\nurl = \"{up}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"everything\"\nauth = [\"api_key\"]\n"
        ),
    )
    // One worker: the held session (one per worker) is the one every request reaches.
    .replace("workers = 2", "workers = 1");
    let mut d = Daemon::start_local(&instance, &c);
    let ask = |key: &str, method: &str, params: serde_json::Value| -> serde_json::Value {
        let mut params = params;
        params["_meta"] = serde_json::json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}
        });
        let body =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
                .to_string();
        let name = params["name"]
            .as_str()
            .map(|n| format!("mcp-name: {n}\r\n"))
            .unwrap_or_default();
        let extra = format!(
            "x-api-key: {key}\r\nmcp-protocol-version: 2026-07-28\r\nmcp-method: {method}\r\n{name}"
        );
        let (r, _) = raw(port, &post("/mcp", &body, &extra));
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 200, "{method}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method}: {e}: {body}"))
    };
    let [a, b] = keys;
    integration_tests::peers::everything_tasks_are_their_creators_alone(ask, a, b);
    drop(everything);
    d.stop();
}

/// The reported case: a federated route with a session-era member, a 2026-07-28 client. Every
/// tool of both members is listed and callable; the Python SDK's fixture (which speaks both
/// eras) is served as before.
#[test]
fn a_stateless_client_sees_and_calls_every_tool_of_a_session_era_member() {
    let up_port = free_port();
    let up = format!("http://127.0.0.1:{up_port}/mcp");
    let _everything = server_everything(up_port);
    let py = PyServer::start(false);
    let everything_tools = tools_of(&client(&up, "legacy", "echo"));

    let port = free_port();
    let instance = unique("gwheldfed");
    let c = config(
        &instance,
        port,
        &format!(
            "[[upstreams]]\nname = \"everything\"\nurl = \"{up}\"\n[[upstreams]]\nname = \"py\"\nurl = \"{}\"\n[[routes]]\npath = \"/fed\"\nfederate = [{{ upstream = \"everything\", prefix = \"e_\" }}, {{ upstream = \"py\", prefix = \"p_\" }}]\n",
            py.url()
        ),
    );
    let mut d = Daemon::start_local(&instance, &c);
    let url = format!("http://127.0.0.1:{port}/fed");
    for mode in ["2026-07-28", "legacy"] {
        let report = client(&url, mode, "e_echo");
        let tools = tools_of(&report);
        for t in &everything_tools {
            assert!(
                tools.contains(&format!("e_{t}")),
                "{mode}: e_{t} in {report}"
            );
        }
        for t in ["p_add", "p_echo", "p_fail"] {
            assert!(tools.contains(&t.to_owned()), "{mode}: {t} in {report}");
        }
        assert_eq!(report["echo"], "Echo: héllo", "{mode}: {report}");
    }
    // The other member, through the same route, in the stateless era: tools, progress,
    // resources and prompts as the fixture serves them.
    let py_report = py_client_prefixed(&url, "2026-07-28", "p_");
    assert_eq!(py_report["add"], "42", "{py_report}");
    assert_eq!(py_report["progress_result"], "counted 3", "{py_report}");
    assert_eq!(py_report["prompt"], "Please review:\nx = 1", "{py_report}");

    // server/discover of the route offers 2026-07-28: every member can now be served in it.
    let discover = r#"{"jsonrpc":"2.0","id":8,"method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let (resp, _) = raw(
        port,
        &post(
            "/fed",
            discover,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: server/discover\r\n",
        ),
    );
    assert_eq!(resp.status, 200);
    let v = resp.json();
    assert!(
        v["result"]["supportedVersions"]
            .to_string()
            .contains("2026-07-28"),
        "{v}"
    );
    // A federated route offers no `tasks/*`: a task a member made over the tenant's held
    // session would be nobody's to read, or every caller's. Asking for one is refused.
    let call = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"e_simulate-research-query","arguments":{"topic":"tides"},"task":{"ttl":60000},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let (resp, _) = raw(
        port,
        &post(
            "/fed",
            call,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: e_simulate-research-query\r\n",
        ),
    );
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    assert_eq!(resp.status, 400, "{text}");
    assert!(text.contains("federated route"), "{text}");
    d.stop();
}

/// The reverse in federation: a session-era client (the Python SDK's legacy mode) on a route
/// whose members are a fixture speaking both eras and one speaking only 2026-07-28 (era learnt
/// from its refusal of `initialize`). The client sees and calls the tools of both; the
/// stateless-only member's progress, resources and prompts reach it as from a session-era
/// server; the session goes on (its id seals the bridged member as such).
#[test]
fn a_session_era_client_sees_and_calls_every_tool_of_a_stateless_only_member() {
    let both = PyServer::start(false);
    let modern = PyServer::start_with(&["--stateless-only"]);
    let direct = integration_tests::peers::py_client(&modern.url(), "2026-07-28");

    let port = free_port();
    let instance = unique("gwbridgefed");
    let c = config(
        &instance,
        port,
        &format!(
            "[[upstreams]]\nname = \"both\"\nurl = \"{}\"\n[[upstreams]]\nname = \"modern\"\nurl = \"{}\"\n[[routes]]\npath = \"/fed\"\nfederate = [{{ upstream = \"both\", prefix = \"b_\" }}, {{ upstream = \"modern\", prefix = \"m_\" }}]\n[[routes]]\npath = \"/alone\"\nfederate = [{{ upstream = \"modern\", prefix = \"m_\" }}]\n",
            both.url(),
            modern.url()
        ),
    );
    let mut d = Daemon::start_local(&instance, &c);
    let url = format!("http://127.0.0.1:{port}/fed");
    let report = py_client_prefixed(&url, "legacy", "m_");
    let tools = tools_of(&report);
    for t in tools_of(&direct) {
        assert!(tools.contains(&format!("m_{t}")), "m_{t} in {report}");
        assert!(tools.contains(&format!("b_{t}")), "b_{t} in {report}");
    }
    for key in [
        "echo",
        "add",
        "fail_is_error",
        "progress_result",
        "progress",
        "resource",
        "prompt",
    ] {
        assert_eq!(report[key], direct[key], "{key}: {report} vs {direct}");
    }
    // The other member through the same session era route, as before.
    let b = py_client_prefixed(&url, "legacy", "b_");
    assert_eq!(b["add"], "42", "{b}");
    // A route of the stateless-only member alone: no member holds a session of its own, yet a
    // session its client ended is over (the gateway remembers the end).
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (r, _) = raw(port, &post("/alone", init, ""));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let session = r.header("mcp-session-id").expect("a session id").to_owned();
    let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let (r, _) = raw(port, &post("/alone", list, &headers));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // A call of the bridged member its client cancels ends at once.
    let running = {
        let headers = headers.clone();
        std::thread::spawn(move || {
            let call = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"m_count_with_progress","arguments":{"steps":1000}}}"#;
            let started = std::time::Instant::now();
            let (r, _) = raw(port, &post("/alone", call, &headers));
            (r.status, r.json(), started.elapsed())
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let note = r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":9}}"#;
    assert_eq!(raw(port, &post("/alone", note, &headers)).0.status, 202);
    let (status, v, took) = running.join().unwrap();
    assert_eq!(
        (status, &v["error"]["code"]),
        (200, &serde_json::json!(-32800)),
        "{v}"
    );
    assert!(
        took < std::time::Duration::from_secs(5),
        "cancelled after {took:?}"
    );
    let delete = format!("DELETE /alone HTTP/1.1\r\nhost: gw\r\n{headers}\r\n");
    assert_eq!(raw(port, delete.as_bytes()).0.status, 200);
    let (r, _) = raw(port, &post("/alone", list, &headers));
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    d.stop();
}

/// A session-era client bridged to a stateless-only upstream calls a tool that mirrors
/// arguments into `Mcp-Param-*` headers: the gateway, the 2026-07-28 client there, writes them
/// from the body it checked (a value that is not plain header text in the base64 form), after
/// listing the tools itself when the client called without listing (the upstream's -32020
/// asks for that). Before, every such call failed with the upstream's -32020 (a review).
#[test]
fn a_bridged_call_carries_the_headers_its_tool_declares() {
    let up = PyServer::start_with(&["--stateless-only", "--param-headers"]);
    let port = free_port();
    let instance = unique("gwbridgeparam");
    let c = config(
        &instance,
        port,
        &format!(
            "[[upstreams]]\nname = \"modern\"\nurl = \"http://127.0.0.1:{}/mcp\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"modern\"\n",
            up.port
        ),
    );
    let mut d = Daemon::start_local(&instance, &c);
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    // The era is learnt from the upstream's refusal of the first session-era request.
    let mut session = None;
    for _ in 0..3 {
        let (r, _) = raw(port, &post("/mcp", init, ""));
        if r.status == 200 {
            session = r.header("mcp-session-id").map(str::to_owned);
            break;
        }
    }
    let session = session.expect("a bridged session");
    let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
    for region in ["eu", "eu west \u{e9}"] {
        let call = serde_json::json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "deploy", "arguments": {"region": region, "dry_run": true}}})
        .to_string();
        let (r, _) = raw(port, &post("/mcp", &call, &headers));
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 200, "{text}");
        let j = r.json();
        assert!(j.get("error").is_none(), "{region}: {j}");
        assert_eq!(j["result"]["isError"], false, "{region}: {j}");
        assert!(text.contains("eu"), "{region}: {text}");
    }
    d.stop();
}

/// The reverse: a session-era client (the Python SDK's legacy mode) in front of an upstream
/// that speaks only 2026-07-28 (the Python SDK's server, refusing every other version with its
/// own -32022). Directly the client cannot even initialize; through the gateway (era learnt
/// from that refusal) it gets what a 2026-07-28 client gets directly: tools, calls, progress,
/// resources, prompts; `ping` and the session are the gateway's; the server's requests for
/// input cannot reach a session-era client and fail as errors, never hang.
#[test]
fn a_session_era_client_is_bridged_to_a_stateless_only_upstream() {
    let up = PyServer::start_with(&["--stateless-only"]);
    let direct_url = format!("http://127.0.0.1:{}/mcp", up.port);
    let direct_legacy = integration_tests::peers::py_client_result(&direct_url, "legacy");
    assert!(direct_legacy.is_err(), "{direct_legacy:?}");
    let modern = integration_tests::peers::py_client(&direct_url, "2026-07-28");
    assert!(
        modern["tools"].as_array().is_some_and(|t| t.len() > 3),
        "{modern}"
    );

    let port = free_port();
    let instance = unique("gwbridge");
    let c = config(
        &instance,
        port,
        &format!(
            "[[upstreams]]\nname = \"modern\"\nurl = \"{direct_url}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"modern\"\n"
        ),
    );
    let mut d = Daemon::start_local(&instance, &c);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let legacy = integration_tests::peers::py_client(&url, "legacy");
    for key in [
        "tools",
        "echo",
        "add",
        "fail_is_error",
        "progress_result",
        "progress",
        "resource",
        "prompt",
    ] {
        assert_eq!(legacy[key], modern[key], "{key}: {legacy} vs {modern}");
    }
    assert_eq!(legacy["ping"], true, "{legacy}");
    for tool in ["ask_model", "ask_user"] {
        assert!(
            legacy[tool]
                .as_str()
                .is_some_and(|t| t.starts_with("error")),
            "{tool}: {legacy}"
        );
    }
    // The 2026-07-28 client still passes as it is.
    let through_modern = integration_tests::peers::py_client(&url, "2026-07-28");
    assert_eq!(through_modern["tools"], modern["tools"], "{through_modern}");

    // The session is the gateway's, bound to its opener; GET has no stream to offer.
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (r, _) = raw(port, &post("/mcp", init, ""));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["protocolVersion"], "2025-06-18");
    let session = r.header("mcp-session-id").expect("a session id").to_owned();
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let (r, _) = raw(
        port,
        &post(
            "/mcp",
            list,
            &format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n"),
        ),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.json()["result"]["tools"].is_array(),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.json()["result"].get("resultType").is_none());
    let (r, _) = raw(
        port,
        &post(
            "/mcp",
            list,
            "mcp-session-id: 00000000000000000000000000000000\r\nmcp-protocol-version: 2025-06-18\r\n",
        ),
    );
    assert_eq!(r.status, 404, "a session the gateway never opened");
    // The upstream's JSON-RPC error reaches the client as a session-era server gives one (200):
    // the stateless era's 404 for an unknown method would tell it its session is gone.
    let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
    let unknown = r#"{"jsonrpc":"2.0","id":3,"method":"no/such/method","params":{}}"#;
    let (r, _) = raw(port, &post("/mcp", unknown, &headers));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["error"]["code"],
        -32601,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // Bridged, every session reaches the upstream with the gateway's one credential: a task it
    // made would be every caller's, so none is asked for or about.
    for (method, params) in [
        (
            "tools/call",
            r#"{"name":"echo","arguments":{"text":"x"},"task":{"ttl":60000}}"#,
        ),
        ("tasks/list", "{}"),
        ("tasks/get", r#"{"taskId":"t1"}"#),
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":4,"method":"{method}","params":{params}}}"#);
        let (r, _) = raw(port, &post("/mcp", &body, &headers));
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 400, "{method}: {text}");
        assert!(text.contains("bridged"), "{method}: {text}");
    }
    // The same session id with a 2026-07-28 marker is a stateless client's request, which the
    // gateway sends without the id: the upstream still cannot tell callers apart, so a task
    // is asked about only by its owner (the gateway answers, as for a task it does not know).
    let modern = "mcp-protocol-version: 2026-07-28\r\nmcp-method: tasks/get\r\n";
    let body = r#"{"jsonrpc":"2.0","id":5,"method":"tasks/get","params":{"taskId":"t1","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let (r, _) = raw(
        port,
        &post(
            "/mcp",
            body,
            &format!("mcp-session-id: {session}\r\n{modern}"),
        ),
    );
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.json()["error"]["code"], -32602, "{text}");
    assert!(text.contains("Task not found"), "{text}");
    // A call its client cancels ends at once (the upstream's exchange closed), answered with an
    // error; a cancellation from another session of the same id cancels nothing.
    let slow = |id: u32, steps: u32| {
        let headers = headers.clone();
        std::thread::spawn(move || {
            let call = format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"count_with_progress","arguments":{{"steps":{steps}}}}}}}"#
            );
            let started = std::time::Instant::now();
            let (r, _) = raw(port, &post("/mcp", &call, &headers));
            (r.status, r.json(), started.elapsed())
        })
    };
    let cancel = |id: u32, session: &str| {
        let note = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/cancelled","params":{{"requestId":{id},"reason":"test"}}}}"#
        );
        let h = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
        raw(port, &post("/mcp", &note, &h)).0.status
    };
    let running = slow(77, 1000);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(cancel(77, &session), 202);
    let (status, v, took) = running.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["error"]["code"], -32800, "{v}");
    assert!(
        took < std::time::Duration::from_secs(5),
        "cancelled after {took:?}"
    );
    let (r, _) = raw(port, &post("/mcp", init, ""));
    let other = r.header("mcp-session-id").expect("a session id").to_owned();
    let running = slow(78, 100);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(cancel(78, &other), 202);
    let (status, v, _) = running.join().unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(
        v["result"]["content"].is_array(),
        "another session cancelled it: {v}"
    );
    let (r, _) = raw(
        port,
        format!(
            "GET /mcp HTTP/1.1\r\nhost: gw\r\naccept: text/event-stream\r\nmcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 405);
    // A batch (2025-03-26) cannot be bridged: refused, never sent.
    let batch = r#"[{"jsonrpc":"2.0","id":5,"method":"tools/list"},{"jsonrpc":"2.0","id":6,"method":"tools/list"}]"#;
    let (r, _) = raw(port, &post("/mcp", batch, ""));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    // DELETE ends the gateway's session: it is unknown afterwards.
    let (r, _) = raw(
        port,
        format!(
            "DELETE /mcp HTTP/1.1\r\nhost: gw\r\nmcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    let (r, _) = raw(
        port,
        &post(
            "/mcp",
            list,
            &format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n"),
        ),
    );
    assert_eq!(r.status, 404, "a session its owner deleted");
    d.stop();
}

/// The gateway ends at the upstream (DELETE, with the session's id) every session it holds
/// when it lets it go: when a worker holds 4,096 and a new caller comes, the one unused
/// longest of the tenant that holds the most (another tenant's older one stays), and all of
/// them when it stops. Many servers (the SDKs' examples among them) keep a session until it is
/// DELETEd, so before, every evicted session, and every session held at a restart, stayed at
/// the upstream for good.
#[test]
fn held_sessions_are_ended_upstream_when_evicted_and_when_the_gateway_stops() {
    use integration_tests::peers::{FakeUpstream, Misbehave, post_call_2026, read_response};
    use std::io::Write as _;

    const HELD: usize = 4096;
    let callers = HELD + 1;
    let hashes = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib,sys\nfor i in range(int(sys.argv[1])): print(hashlib.sha256(f'held-key-{i}'.encode()).hexdigest())",
            &callers.to_string(),
        ])
        .output()
        .expect("python3");
    let hashes = String::from_utf8(hashes.stdout).unwrap();
    let keys: String = hashes
        .lines()
        .enumerate()
        .map(|(i, h)| {
            // The first key is another tenant's.
            let tenant = if i == 0 { "u" } else { "t" };
            format!(
                "[[auth.api_keys]]\nsha256 = \"{h}\"\ntenant = \"{tenant}\"\nagent = \"a{i}\"\n"
            )
        })
        .collect();
    assert_eq!(hashes.lines().count(), callers);

    let up = FakeUpstream::start(Misbehave::SessionEra);
    let port = free_port();
    let instance = unique("gwheldend");
    let c = config(
        &instance,
        port,
        &format!(
            "default_tenant = \"t\"\n[[tenants]]\nname = \"t\"\nid = 1\n[[tenants]]\nname = \"u\"\nid = 2\n{keys}[[upstreams]]\nname = \"fake\"\nurl = \"{}\"\nera = \"session\"\nheld_session = \"caller\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"fake\"\nauth = [\"api_key\"]\n",
            up.url()
        ),
    )
    // One worker: its table of held sessions is the one that fills.
    .replace("workers = 2", "workers = 1");
    let mut d = Daemon::start_local(&instance, &c);
    let deletes = || -> Vec<String> {
        up.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.starts_with("DELETE "))
            .cloned()
            .collect()
    };
    let session_of = |head: &str| -> Option<String> {
        head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("mcp-session-id: ")
                .map(|v| v.trim().to_owned())
        })
    };

    // Each caller's first call opens a session of its own, over one keep-alive connection.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    for i in 0..HELD {
        s.write_all(&post_call_2026(
            "/mcp",
            1,
            "add",
            &serde_json::json!({}),
            &format!("x-api-key: held-key-{i}\r\n"),
        ))
        .unwrap();
        let r = read_response(&mut s).expect("an answer");
        assert_eq!(
            r.status,
            200,
            "caller {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert!(deletes().is_empty(), "nothing ended while {HELD} are held");
    // The sessions in the order they were opened (named first by their
    // `notifications/initialized`): tenant u's, then tenant t's.
    let mut opened: Vec<String> = Vec::new();
    for id in up.seen.lock().unwrap().iter().filter_map(|h| session_of(h)) {
        if !opened.contains(&id) {
            opened.push(id);
        }
    }
    assert_eq!(opened.len(), HELD);
    let (u_first, t_first) = (opened[0].clone(), opened[1].clone());

    // One caller of t more: t holds the most, so its session unused longest is ended, not u's
    // older one.
    s.write_all(&post_call_2026(
        "/mcp",
        1,
        "add",
        &serde_json::json!({}),
        &format!("x-api-key: held-key-{HELD}\r\n"),
    ))
    .unwrap();
    assert_eq!(read_response(&mut s).expect("an answer").status, 200);
    // Sent by the worker's own task (no request waits for it): looked for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while deletes().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ended = deletes();
    assert_eq!(ended.len(), 1, "one is ended: {ended:?}");
    assert_eq!(
        session_of(&ended[0]),
        Some(t_first),
        "t's unused longest, not u's ({u_first}): {}",
        ended[0]
    );
    assert!(
        ended[0].starts_with("DELETE /mcp HTTP/1.1\r\n")
            && !ended[0].to_ascii_lowercase().contains("x-api-key"),
        "to the upstream's path, without the client's credential: {}",
        ended[0]
    );
    drop(s);

    // The gateway stops: every session it still holds is ended.
    d.stop();
    let ended = deletes();
    let mut ids: Vec<String> = ended.iter().filter_map(|h| session_of(h)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (ended.len(), ids.len()),
        (callers, callers),
        "each of the {callers} sessions ended once"
    );
}
