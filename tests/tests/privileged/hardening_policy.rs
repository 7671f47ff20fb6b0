//! Policy that cannot be stepped around, end to end on loopback: requests sent as
//! notifications, batched lists and refused batches, identity headers given twice, conflicting
//! credentials, sessions used by another tenant, per-tenant tool breakers, cross-site
//! requests to the admin API, tasks on a stateless upstream, calls whose client hung up, and
//! streams resumed from another caller's event id.

use serde_json::{Value, json};

use integration_tests::{
    daemon::Daemon,
    peers::{
        FakeUpstream, Misbehave, PyServer, free_port, listed_tasks, post, post_call_2026, raw,
    },
    unique,
};

const ACME_KEY: &str = "acme-hardening-key-0123456789";
const BETA_KEY: &str = "beta-hardening-key-0123456789";
/// Two more keys of acme's, that name no agent.
const ACME_KEYS_NO_AGENT: [&str; 2] = [
    "acme-hardening-key-two-0123456789",
    "acme-hardening-key-three-0123456789",
];
/// Two keys of beta's (a budget of 2 calls an hour per agent), that name no agent.
const BETA_KEYS_NO_AGENT: [&str; 2] = [
    "beta-hardening-key-two-0123456789",
    "beta-hardening-key-three-0123456789",
];

fn sha256_hex(s: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

struct Setup {
    daemon: Daemon,
    port: u16,
    admin: u16,
    fake: FakeUpstream,
    _py: PyServer,
    audit: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.daemon.stop();
        let _ = std::fs::remove_file(&self.audit);
    }
}

/// Tenants acme (whose lists are filtered: no `add`) and beta (a budget of 2 calls an hour,
/// 2 a run),
/// each with an API key; a Python SDK upstream (JSON answers, with a tool breaker) under
/// `/mcp` and `/fed`, and a raw upstream that records what reaches it under `/fake`.
fn setup() -> Setup {
    let py = PyServer::start_with(&["--json", "--slow"]);
    let fake = FakeUpstream::start(Misbehave::Answer);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwhard");
    let audit = std::env::temp_dir().join(format!("{instance}-audit.jsonl"));
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
default_tenant = "public"
[audit]
path = "{audit}"

[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
[[tenants.policy.tools]]
match = "add"
action = "deny"
[[tenants]]
name = "beta"
id = 2
[tenants.policy]
budget = {{ window_s = 3600, agent = 2, run = 2 }}

[[auth.api_keys]]
sha256 = "{acme}"
tenant = "acme"
agent = "acme-bot"
[[auth.api_keys]]
sha256 = "{beta}"
tenant = "beta"
agent = "beta-bot"
[[auth.api_keys]]
sha256 = "{acme2}"
tenant = "acme"
[[auth.api_keys]]
sha256 = "{acme3}"
tenant = "acme"
[[auth.api_keys]]
sha256 = "{beta2}"
tenant = "beta"
[[auth.api_keys]]
sha256 = "{beta3}"
tenant = "beta"

[[upstreams]]
name = "u0"
url = "{py}"
breaker = {{ consecutive_failures = 2, open_ms = 60000 }}
[[upstreams]]
name = "fake"
url = "{fake}"
[[routes]]
path = "/mcp"
upstream = "u0"
auth = ["api_key"]
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "p_" }}]
auth = ["api_key"]
[[routes]]
path = "/fake"
upstream = "fake"
auth = ["api_key"]
"#,
        acme = sha256_hex(ACME_KEY),
        beta = sha256_hex(BETA_KEY),
        acme2 = sha256_hex(ACME_KEYS_NO_AGENT[0]),
        acme3 = sha256_hex(ACME_KEYS_NO_AGENT[1]),
        beta2 = sha256_hex(BETA_KEYS_NO_AGENT[0]),
        beta3 = sha256_hex(BETA_KEYS_NO_AGENT[1]),
        py = py.url(),
        fake = fake.url(),
        audit = audit.display(),
    );
    let daemon = Daemon::start_local(&instance, &config);
    Setup {
        daemon,
        port,
        admin,
        fake,
        _py: py,
        audit,
    }
}

fn key(k: &str) -> String {
    format!("x-api-key: {k}\r\n")
}

fn code(r: &integration_tests::peers::RawResponse) -> Option<i64> {
    r.json()["error"]["code"].as_i64()
}

/// Requests that reached the raw upstream so far.
fn reached(s: &Setup) -> usize {
    s.fake.seen.lock().unwrap().len()
}

#[test]
fn a_request_sent_as_a_notification_is_refused_and_never_reaches_the_upstream() {
    let s = setup();
    let call = r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    let (r, _) = raw(s.port, &post("/fake", call, &key(ACME_KEY)));
    assert_eq!((r.status, code(&r)), (400, Some(-32600)), "{r:?}");
    // In a batch too, and nothing of the batch is forwarded.
    let batch = format!(r#"[{{"jsonrpc":"2.0","id":1,"method":"ping"}},{call}]"#);
    let headers = format!("{}mcp-protocol-version: 2025-03-26\r\n", key(BETA_KEY));
    let (r, _) = raw(s.port, &post("/fake", &batch, &headers));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(reached(&s), 0, "the upstream never ran it");
    // A real notification still goes through.
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let (r, _) = raw(s.port, &post("/fake", note, &key(ACME_KEY)));
    assert!(r.status < 300, "{r:?}");
    assert_eq!(reached(&s), 1);
}

#[test]
fn a_batched_tools_list_of_a_filtered_tenant_is_refused_and_a_refused_batch_charges_nothing() {
    let s = setup();
    let v = "mcp-protocol-version: 2025-03-26\r\n";
    // acme's lists hide `add`: a batched one would not be filtered.
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#;
    let (r, _) = raw(
        s.port,
        &post("/fake", batch, &format!("{}{v}", key(ACME_KEY))),
    );
    assert_eq!((r.status, code(&r)), (400, Some(-32600)), "{r:?}");
    assert_eq!(reached(&s), 0);
    // beta's budget is 2 calls: a batch of 3 is refused, and charges nothing.
    let call = |id: u32| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{id}"}}}}}}"#
        )
    };
    let beta = format!("{}{v}", key(BETA_KEY));
    let batch = format!("[{},{},{}]", call(1), call(2), call(3));
    let (r, _) = raw(s.port, &post("/fake", &batch, &beta));
    assert_eq!((r.status, code(&r)), (429, Some(-32043)), "{r:?}");
    assert_eq!(reached(&s), 0);
    // Both calls of the budget are still there.
    for id in [4, 5] {
        let (r, _) = raw(s.port, &post("/fake", &call(id), &beta));
        assert_eq!(r.status, 200, "call {id}: {r:?}");
    }
    let (r, _) = raw(s.port, &post("/fake", &call(6), &beta));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(reached(&s), 2);
}

/// A run named in `Mcp-Run-Id` is its caller's own: another caller naming it has a run of its
/// own (before, any agent of the tenant spent another's run budget by naming its run). A batch
/// refused for one member takes no place for its run: before, it gave back its budget and kept
/// the place, and one agent took all 1,024 of its tenant's for free, refusing every other
/// agent's new runs for the window (an attacker's review).
#[test]
fn a_run_is_its_callers_own_and_a_refused_batch_takes_no_place_for_one() {
    let s = setup();
    let call = |id: u32| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{id}"}}}}}}"#
        )
    };
    let send = |k: &str, run: &str, body: &str| {
        let headers = format!(
            "{}mcp-protocol-version: 2025-03-26\r\nmcp-run-id: {run}\r\n",
            key(k)
        );
        raw(s.port, &post("/fake", body, &headers)).0
    };
    let [other, batcher] = BETA_KEYS_NO_AGENT;
    // beta-bot spends its run r1 whole; another caller's r1 is its own.
    for id in [1, 2] {
        assert_eq!(send(BETA_KEY, "r1", &call(id)).status, 200);
    }
    let r = send(other, "r1", &call(3));
    assert_eq!(r.status, 200, "another caller's r1 is its own: {r:?}");
    // Batches of three calls in a new run each: the caller's budget is two calls, so each is
    // refused at its third, and gives back what it took (two charges of the run).
    for i in 0..1100 {
        let batch = format!("[{},{},{}]", call(10), call(11), call(12));
        let r = send(batcher, &format!("b{i}"), &batch);
        assert_eq!(
            (r.status, code(&r)),
            (429, Some(-32043)),
            "batch {i}: {r:?}"
        );
    }
    let r = send(other, "fresh", &call(4));
    assert_eq!(r.status, 200, "a place for another caller's new run: {r:?}");
    assert_eq!(reached(&s), 4);
}

/// A key that names no agent has one agent budget wherever it connects from, apart from
/// another such key at its address: before, each address was a caller of its own (a fresh
/// agent budget, rate and loop count per address: a key's holder with many addresses spent
/// its tenant's agent budget many times over), and two such keys behind one address shared
/// one.
#[test]
fn a_key_that_names_no_agent_has_one_agent_budget_from_every_address() {
    use std::io::Write as _;
    let s = setup();
    let [one, two] = BETA_KEYS_NO_AGENT;
    let call = |from: &str, k: &str, id: u32| {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{id}"}}}}}}"#
        );
        let extra = format!("{}mcp-protocol-version: 2025-03-26\r\n", key(k));
        let mut c = integration_tests::daemon::loopback_from(from, s.port).expect("connect");
        c.write_all(&post("/fake", &body, &extra)).unwrap();
        integration_tests::peers::read_response(&mut c).expect("an answer")
    };
    for (id, from) in [(1, "127.0.0.1"), (2, "127.0.0.2")] {
        let r = call(from, one, id);
        assert_eq!(r.status, 200, "from {from}: {r:?}");
    }
    let r = call("127.0.0.3", one, 3);
    assert_eq!(
        (r.status, code(&r)),
        (429, Some(-32043)),
        "a third address, the same key: {r:?}"
    );
    let message = r.json()["error"]["message"].to_string();
    assert!(message.contains("this credential"), "{message}");
    assert_eq!(reached(&s), 2);
    // The other key, at the first key's address, has a budget of its own.
    let r = call("127.0.0.1", two, 4);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(reached(&s), 3);
}

/// A batch's audit line says what each of its members asked for: it said `other` and no tool,
/// whatever tools the batch called (an attacker's review).
#[test]
fn a_batchs_audit_line_names_each_member() {
    let s = setup();
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"a"}}},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}},{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}]"#;
    let headers = format!("{}mcp-protocol-version: 2025-03-26\r\n", key(BETA_KEY));
    let (r, _) = raw(s.port, &post("/fake", batch, &headers));
    assert!(r.status < 300, "{r:?}");
    let line = (0..50)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::read_to_string(&s.audit)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|l| l["route"] == "/fake")
        })
        .expect("an audit line for the batch");
    assert_eq!(
        line["batch"],
        json!([
            {"method": "tools/call", "tool": "echo"},
            {"method": "tools/call", "tool": "add"},
            {"method": "notifications/progress"},
        ]),
        "{line}"
    );
}

#[test]
fn identity_headers_given_twice_and_conflicting_credentials_are_refused() {
    let s = setup();
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let twice = format!(
        "{}mcp-run-id: run-a\r\nMcp-Run-Id: run-b\r\n",
        key(BETA_KEY)
    );
    let (r, _) = raw(s.port, &post("/fake", ping, &twice));
    assert_eq!((r.status, code(&r)), (400, Some(-32600)), "{r:?}");
    let two_keys = format!("{}authorization: Bearer {BETA_KEY}\r\n", key(ACME_KEY));
    let (r, _) = raw(s.port, &post("/fake", ping, &two_keys));
    assert_eq!((r.status, code(&r)), (403, Some(-32041)), "{r:?}");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("different callers"),
        "{r:?}"
    );
    let bad_token = format!("{}authorization: Bearer a.b.c\r\n", key(ACME_KEY));
    let (r, _) = raw(s.port, &post("/fake", ping, &bad_token));
    assert_eq!((r.status, code(&r)), (401, Some(-32040)), "{r:?}");
    assert_eq!(reached(&s), 0);
    let (r, _) = raw(s.port, &post("/fake", ping, &key(ACME_KEY)));
    assert_eq!(r.status, 200, "{r:?}");
}

/// A session is its opener's: another tenant's caller, and another credential of the same
/// tenant when neither names an agent (two keys of acme's: before, every key that named no
/// agent was one caller and took the other's sessions; an attacker's review), get 404.
#[test]
fn sessions_are_refused_to_another_tenant_and_to_another_key_of_the_same() {
    let s = setup();
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let [two, three] = ACME_KEYS_NO_AGENT;
    let pairs = [
        (ACME_KEY, BETA_KEY, "another tenant"),
        (two, three, "another key of the tenant"),
        (three, ACME_KEY, "a named agent of the tenant"),
    ];
    for (owner, other, who) in pairs {
        for path in ["/mcp", "/fed"] {
            let (r, _) = raw(s.port, &post(path, init, &key(owner)));
            assert_eq!(r.status, 200, "{path}: {r:?}");
            let sid = r.header("mcp-session-id").expect("a session id").to_owned();
            let session = format!("mcp-session-id: {sid}\r\nmcp-protocol-version: 2025-06-18\r\n");
            let mine = format!("{}{session}", key(owner));
            let (r, _) = raw(s.port, &post(path, initialized, &mine));
            assert!(r.status < 300, "{path}: {r:?}");
            let (r, _) = raw(s.port, &post(path, list, &mine));
            assert_eq!(r.status, 200, "{path}: the owner: {r:?}");
            assert!(r.json()["result"]["tools"].is_array(), "{r:?}");
            let theirs = format!("{}{session}", key(other));
            let (r, _) = raw(s.port, &post(path, list, &theirs));
            assert_eq!(
                (r.status, code(&r)),
                (404, Some(-32001)),
                "{path}: {who}: {r:?}"
            );
        }
    }
    // A passthrough session id the gateway never saw opened.
    let made_up = format!(
        "{}mcp-session-id: 0123456789abcdef\r\nmcp-protocol-version: 2025-06-18\r\n",
        key(ACME_KEY)
    );
    let (r, _) = raw(s.port, &post("/mcp", list, &made_up));
    assert_eq!(r.status, 404, "{r:?}");
}

/// A stateless (2026-07-28) `tools/call` of `tool` with `key`.
fn call_2026(
    port: u16,
    k: &str,
    tool: &str,
    args: &Value,
) -> integration_tests::peers::RawResponse {
    raw(port, &post_call_2026("/mcp", 9, tool, args, &key(k))).0
}

#[test]
fn one_tenants_tool_errors_do_not_open_the_tool_for_another() {
    let s = setup();
    let args = json!({"reason": "bad arguments"});
    for _ in 0..2 {
        let r = call_2026(s.port, ACME_KEY, "fail", &args);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["result"]["isError"], true, "{r:?}");
    }
    integration_tests::peers::wait_breaker_open(s.admin, "u0/fail@");
    let r = call_2026(s.port, ACME_KEY, "fail", &args);
    assert_eq!(
        (r.status, code(&r)),
        (503, Some(-32045)),
        "acme's: open: {r:?}"
    );
    let r = call_2026(s.port, BETA_KEY, "fail", &args);
    assert_eq!(r.status, 200, "beta's: still closed: {r:?}");
    assert_eq!(r.json()["result"]["isError"], true, "{r:?}");
}

/// A client that hangs up before its answer is no failure of the upstream: three such calls
/// of one tenant opened the upstream's breaker for every tenant.
#[test]
fn a_client_that_leaves_does_not_open_the_upstream_for_others() {
    let s = setup();
    for id in 0..3 {
        let call = post_call_2026("/mcp", id, "sleep", &json!({"seconds": 2}), &key(ACME_KEY));
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        std::io::Write::write_all(&mut conn, &call).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(conn);
    }
    // The gateway sees each leave while the upstream still works.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let r = call_2026(s.port, BETA_KEY, "echo", &json!({"text": "still open"}));
    assert_eq!(r.status, 200, "beta's call after acme's hang-ups: {r:?}");
}

/// A call whose session its own client ends meanwhile is answered 500 by the Python SDK's
/// server ("Session terminated"): an error on that request, which the caller drew, so the
/// call's failure and not the upstream's. Before, two such calls of one client opened the
/// upstream's shared breaker for every caller, for a minute, as often as it liked.
#[test]
fn a_client_ending_its_own_session_mid_call_does_not_open_the_upstream_for_others() {
    let py = PyServer::start_with(&["--json", "--slow"]);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwendown");
    let config = format!(
        "{}default_tenant = \"public\"\n[[tenants]]\nname = \"public\"\nid = 0\n\
         [[upstreams]]\nname = \"u0\"\nurl = \"{}\"\n\
         breaker = {{ consecutive_failures = 2, open_ms = 60000 }}\n\
         [[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n",
        integration_tests::daemon::local_header(&instance, 2, port, admin),
        py.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    for id in 0..2 {
        let session = open_session(port, "/mcp", "2025-11-25");
        let call = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"sleep","arguments":{{"seconds":3}}}}}}"#
        );
        let waiting = {
            let session = session.clone();
            std::thread::spawn(move || raw(port, &post("/mcp", &call, &session)).0)
        };
        std::thread::sleep(std::time::Duration::from_millis(500));
        let delete =
            format!("DELETE /mcp HTTP/1.1\r\nhost: gw\r\n{session}content-length: 0\r\n\r\n");
        let (r, _) = raw(port, delete.as_bytes());
        assert!(r.status < 300, "{r:?}");
        let r = waiting.join().unwrap();
        assert_eq!(r.status, 500, "the server's answer: {r:?}");
    }
    // Both were judged: the tool's breaker counted them.
    integration_tests::peers::wait_breaker_open(admin, "u0/sleep@");
    let session = open_session(port, "/mcp", "2025-11-25");
    let echo = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo","arguments":{"text":"after"}}}"#;
    let (r, _) = raw(port, &post("/mcp", echo, &session));
    assert_eq!(r.status, 200, "the upstream's breaker stayed closed: {r:?}");
    d.stop();
}

/// A call that ended with no answer (its session ended by its own client: the Python SDK's
/// server then ends an event stream with nothing in it) is no sign that the upstream answers:
/// counted as a success, it kept every timeout of that wait from counting at the upstream's
/// breaker, so a client could keep a hung upstream's breaker shut at will.
#[test]
fn a_call_ended_with_no_answer_does_not_hide_a_hung_upstream() {
    let py = PyServer::start_with(&["--slow"]);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwnoanswer");
    let config = format!(
        "{}default_tenant = \"public\"\n[[tenants]]\nname = \"public\"\nid = 0\n\
         [[upstreams]]\nname = \"u0\"\nurl = \"{}\"\nresponse_timeout_ms = 1500\n\
         stream_idle_timeout_ms = 1500\n\
         breaker = {{ consecutive_failures = 2, open_ms = 60000 }}\n\
         [[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n",
        integration_tests::daemon::local_header(&instance, 2, port, admin),
        py.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let sleep = |id: u32| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"sleep","arguments":{{"seconds":5}}}}}}"#
        )
    };
    // Two calls that time out, each in its own session (their streams stay silent).
    let slow: Vec<_> = (0..2)
        .map(|id| {
            let session = open_session(port, "/mcp", "2025-11-25");
            let call = sleep(id);
            std::thread::spawn(move || raw(port, &post("/mcp", &call, &session)).0)
        })
        .collect();
    // Meanwhile, a third whose client ends its session: its stream ends with no answer.
    let session = open_session(port, "/mcp", "2025-11-25");
    let ended = {
        let (session, call) = (session.clone(), sleep(9));
        std::thread::spawn(move || raw(port, &post("/mcp", &call, &session)).0)
    };
    std::thread::sleep(std::time::Duration::from_millis(400));
    let delete = format!("DELETE /mcp HTTP/1.1\r\nhost: gw\r\n{session}content-length: 0\r\n\r\n");
    let (r, _) = raw(port, delete.as_bytes());
    assert!(r.status < 300, "{r:?}");
    let r = ended.join().unwrap();
    assert!(
        !String::from_utf8_lossy(&r.body).contains("\"result\""),
        "the ended call had no answer: {r:?}"
    );
    for call in slow {
        let r = call.join().unwrap();
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains("stalled") || r.status == 504, "{r:?}: {body}");
    }
    // Nothing was answered while they waited: the upstream's breaker opened.
    integration_tests::peers::wait_breaker_open(admin, "u0\"");
    let session = open_session_or_refused(port);
    assert_eq!(session, 503, "the upstream's breaker is open");
    d.stop();
}

/// The status of a `tools/call` in a new session (`initialize` is not behind the breakers).
fn open_session_or_refused(port: u16) -> u16 {
    let session = open_session(port, "/mcp", "2025-11-25");
    let echo = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo","arguments":{"text":"after"}}}"#;
    raw(port, &post("/mcp", echo, &session)).0.status
}

#[test]
fn the_admin_api_refuses_cross_site_requests_that_change_state() {
    let s = setup();
    let approve = |extra: &str, ct: &str| {
        let body = format!(
            r#"{{"upstream":"u0","tool":"echo","sha256":"{}"}}"#,
            "0".repeat(64)
        );
        format!(
            "POST /pins/approve HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}content-type: {ct}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let (r, _) = raw(
        s.admin,
        approve("origin: http://evil.example\r\n", "application/json").as_bytes(),
    );
    assert_eq!(r.status, 403, "{r:?}");
    let (r, _) = raw(s.admin, approve("", "text/plain").as_bytes());
    assert_eq!(r.status, 415, "a form's text body: {r:?}");
    let (r, _) = raw(
        s.admin,
        approve("sec-fetch-site: cross-site\r\n", "application/json").as_bytes(),
    );
    assert_eq!(r.status, 403, "{r:?}");
    // Nothing awaits approval: the request itself is served (404 from the handler).
    let (r, _) = raw(s.admin, approve("", "application/json").as_bytes());
    assert_eq!(r.status, 404, "{r:?}");
    let reload = |extra: &str| {
        format!("POST /reload HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}content-length: 0\r\n\r\n")
    };
    let (r, _) = raw(
        s.admin,
        reload("origin: http://evil.example\r\n").as_bytes(),
    );
    assert_eq!(r.status, 403, "{r:?}");
    let (r, _) = raw(s.admin, reload("").as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    // DNS rebinding: a page whose name now points here is same-origin to the browser, and could
    // read the token-less admin API. Only an address (or localhost) as Host is served.
    let get =
        |host: &str| format!("GET /stats HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    for host in [
        "attacker.example",
        "attacker.example:9090",
        "127.0.0.1.nip.io",
    ] {
        let (r, _) = raw(s.admin, get(host).as_bytes());
        assert_eq!(r.status, 403, "{host}: {r:?}");
    }
    for host in [
        format!("127.0.0.1:{}", s.admin),
        "localhost".into(),
        "[::1]:80".into(),
    ] {
        let (r, _) = raw(s.admin, get(&host).as_bytes());
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
}

/// A gateway with tenants acme and beta (an API key each, its own agent) in front of the task
/// fixture on `up_port`, and its port.
fn tasks_gateway(up_port: u16, prefix: &str) -> (Daemon, u16) {
    tasks_gateway_with(up_port, prefix, "", "")
}

/// [`tasks_gateway`], with `acme` (tables of tenant acme's policy) after acme's entry and
/// `rest` at the end (lines of the upstream's table first).
fn tasks_gateway_with(up_port: u16, prefix: &str, acme: &str, rest: &str) -> (Daemon, u16) {
    let upstream = format!("url = \"http://127.0.0.1:{up_port}/mcp\"\n{rest}");
    tasks_gateway_to(prefix, acme, &upstream)
}

/// The task gateway, whose upstream `tasks` has the table lines `upstream` (after its name).
fn tasks_gateway_to(prefix: &str, acme: &str, upstream: &str) -> (Daemon, u16) {
    let (port, admin) = (free_port(), free_port());
    let instance = unique(prefix);
    let config = format!(
        r#"{header}default_tenant = "acme"
[[tenants]]
name = "acme"
id = 1
{acme}
[[tenants]]
name = "beta"
id = 2
[[auth.api_keys]]
sha256 = "{acme_key}"
tenant = "acme"
agent = "acme-bot"
[[auth.api_keys]]
sha256 = "{beta}"
tenant = "beta"
agent = "beta-bot"
[[routes]]
path = "/mcp"
upstream = "tasks"
auth = ["api_key"]
[[upstreams]]
name = "tasks"
{upstream}
"#,
        header = integration_tests::daemon::local_header(&instance, 2, port, admin),
        acme_key = sha256_hex(ACME_KEY),
        beta = sha256_hex(BETA_KEY),
    );
    (Daemon::start_local(&instance, &config), port)
}

/// A request to the task gateway on `port` as `k`'s caller (on `session` if given).
fn ask_tasks(
    port: u16,
    k: &str,
    session: Option<&str>,
    method: &str,
    params: Value,
) -> integration_tests::peers::RawResponse {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let session = session
        .map(|s| format!("mcp-session-id: {s}\r\n"))
        .unwrap_or_default();
    let headers = format!("{}{session}mcp-protocol-version: 2025-11-25\r\n", key(k));
    raw(port, &post("/mcp", &body, &headers)).0
}

/// A stateless upstream binds a task to the credential it came with, and every tenant reaches
/// it with the gateway's: the TypeScript SDK's store gives a task created without a session to
/// every caller without one. So the gateway binds each task to the caller whose task-augmented
/// request created it: another tenant's `tasks/list` does not show it, and its `tasks/get`,
/// `tasks/result` and `tasks/cancel` are answered as for an unknown task without reaching the
/// upstream. Before, the second tenant listed the first's task and read its result.
#[test]
fn a_task_on_a_stateless_upstream_is_its_creators_alone() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server(up_port);
    let (mut d, port) = tasks_gateway(up_port, "gwtasks");
    let ask = |k: &str, method: &str, params: Value| ask_tasks(port, k, None, method, params);
    let listed = |r: &integration_tests::peers::RawResponse| listed_tasks(&r.json());
    let r = ask(
        ACME_KEY,
        "tools/call",
        json!({"name": "report", "arguments": {"topic": "tides"}, "task": {"ttl": 60000}}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let task = r.json()["result"]["task"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no task created: {r:?}"))
        .to_owned();

    // The other tenant: not listed, and not found however it asks.
    let r = ask(BETA_KEY, "tasks/list", json!({}));
    assert!(!listed(&r).contains(&task), "{r:?}");
    for method in ["tasks/get", "tasks/result", "tasks/cancel"] {
        let r = ask(BETA_KEY, method, json!({"taskId": task}));
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.json()["error"]["code"], -32602, "{method}: {text}");
        assert!(!text.contains("secret report"), "{method}: {text}");
    }

    // Nor may it relate a call of its own to the task (the SDK would queue the answer into the
    // task's queue, which its creator reads).
    let related = json!({"name": "report", "arguments": {"topic": "x"},
        "_meta": {"io.modelcontextprotocol/related-task": {"taskId": task}}});
    let r = ask(BETA_KEY, "tools/call", related);
    assert_eq!(r.json()["error"]["code"], -32602, "{r:?}");
    // A request other than `tools/call` cannot ask for a task: its answer would be read as one
    // (and a list, say, not trimmed as the tenant's).
    let r = ask(BETA_KEY, "tools/list", json!({"task": {}}));
    assert_eq!(r.json()["error"]["code"], -32602, "{r:?}");
    assert!(r.json().get("result").is_none(), "{r:?}");

    // Its creator: listed, and its result.
    let r = ask(ACME_KEY, "tasks/list", json!({}));
    assert!(listed(&r).contains(&task), "{r:?}");
    let r = ask(ACME_KEY, "tasks/result", json!({"taskId": task}));
    assert!(
        String::from_utf8_lossy(&r.body).contains("secret report on tides"),
        "{r:?}"
    );
    d.stop();
}

/// The TypeScript SDK's store pages every caller's tasks ten at a time and names the next page
/// by the last task on this one, and a caller may pick the page with a cursor of its own: beta
/// made acme's task the last of its page, and the `nextCursor` the gateway passed on was
/// acme's task id (an attacker's review then read acme's result through another gateway of
/// the fleet, which did not know the task). A listing now carries no cursor of the upstream's.
#[test]
fn a_task_listing_names_no_other_callers_task() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server(up_port);
    let (mut d, port) = tasks_gateway(up_port, "gwtaskcur");
    let ask = |k: &str, method: &str, params: Value| ask_tasks(port, k, None, method, params);
    let make = |k: &str| task_made(&call_report_task(port, k));
    let first = make(BETA_KEY);
    let mut betas = vec![first.clone()];
    for _ in 0..9 {
        betas.push(make(BETA_KEY));
    }
    let acmes = make(ACME_KEY);
    betas.push(make(BETA_KEY));
    for params in [json!({"cursor": first}), json!({})] {
        let r = ask(BETA_KEY, "tasks/list", params.clone());
        assert_eq!(r.status, 200, "{r:?}");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert!(!text.contains(&acmes), "{params}: {text}");
        assert!(r.json()["result"].get("nextCursor").is_none(), "{text}");
        let listed = listed_tasks(&r.json());
        assert!(!listed.is_empty(), "{text}");
        assert!(listed.iter().all(|t| betas.contains(t)), "{text}");
    }
    d.stop();
}

/// Acme's tool rule capping `report` at one call in flight.
const REPORT_CAPPED: &str = "[[tenants.policy.tools]]\nmatch = \"report\"\nmax_concurrent = 1\n";

/// A task-augmented call of `report` as `k`'s caller.
fn call_report_task(port: u16, k: &str) -> integration_tests::peers::RawResponse {
    let params = json!({"name": "report", "arguments": {"topic": "tides"}, "task": {"ttl": 60000}});
    ask_tasks(port, k, None, "tools/call", params)
}

/// The id of the task `r` says was made.
fn task_made(r: &integration_tests::peers::RawResponse) -> String {
    assert_eq!(r.status, 200, "{r:?}");
    let result = &r.json()["result"];
    result["task"]["taskId"]
        .as_str()
        .or_else(|| result["taskId"].as_str())
        .unwrap_or_else(|| panic!("no task made: {r:?}"))
        .to_owned()
}

/// `r` is a concurrency cap's refusal.
fn cap_refused(r: &integration_tests::peers::RawResponse, why: &str) {
    assert_eq!(r.status, 429, "{why}: {r:?}");
    assert_eq!(r.json()["error"]["code"], -32042, "{why}: {r:?}");
}

/// How many calls worked at once at most at the fixture on `port` (its `GET /stats`).
fn most_working(port: u16) -> u64 {
    let (r, _) = raw(
        port,
        b"GET /stats HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    );
    r.json()["maxRunning"]
        .as_u64()
        .unwrap_or_else(|| panic!("{r:?}"))
}

/// A stateless (2026-07-28) request of `k`'s caller to `path`: `params` with the protocol
/// version in `_meta` (and the tasks extension among the client's capabilities if
/// `offers_tasks`), its method and `name` mirrored in `Mcp-Method` and `Mcp-Name`.
fn post_2026(
    path: &str,
    k: &str,
    method: &str,
    mut params: Value,
    name: &str,
    offers_tasks: bool,
) -> Vec<u8> {
    let mut meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}});
    if offers_tasks {
        meta["io.modelcontextprotocol/clientCapabilities"] =
            json!({"extensions": {"io.modelcontextprotocol/tasks": {}}});
    }
    params["_meta"] = meta;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let headers = format!(
        "{}mcp-protocol-version: 2026-07-28\r\nmcp-method: {method}\r\nmcp-name: {name}\r\n",
        key(k)
    );
    post(path, &body.to_string(), &headers)
}

/// A task is its call's work going on: it holds the concurrency slot its call was admitted
/// with until the gateway sees it end (its `tasks/get` says completed, its `tasks/result` is
/// answered, a `tasks/list` says it ended). Before, the slot went back as soon as the upstream
/// named the task: five task-augmented calls of a tool capped at one ran at once at the
/// TypeScript SDK's server (an attacker's review).
#[test]
fn a_task_holds_its_calls_concurrency_slot_until_it_is_seen_ended() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server(up_port);
    let (mut d, port) = tasks_gateway_with(up_port, "gwtaskcap", REPORT_CAPPED, "");
    let ask = |k: &str, method: &str, params: Value| ask_tasks(port, k, None, method, params);
    let call = |k: &str| call_report_task(port, k);

    let first = task_made(&call(ACME_KEY));
    // The fixture's task has ended upstream already; the gateway has not seen it end.
    cap_refused(
        &call(ACME_KEY),
        "a second task while the first holds the cap",
    );
    cap_refused(&call(ACME_KEY), "and a third");
    // The cap is acme's rule: beta's calls are not held by acme's task.
    task_made(&call(BETA_KEY));
    // Seen ended by its `tasks/get`: the slot goes back.
    let r = ask(ACME_KEY, "tasks/get", json!({"taskId": first}));
    assert_eq!(r.json()["result"]["status"], "completed", "{r:?}");
    let second = task_made(&call(ACME_KEY));
    cap_refused(&call(ACME_KEY), "the second task holds the cap");
    // By its result.
    let r = ask(ACME_KEY, "tasks/result", json!({"taskId": second}));
    assert!(
        String::from_utf8_lossy(&r.body).contains("secret report on tides"),
        "{r:?}"
    );
    let third = task_made(&call(ACME_KEY));
    cap_refused(&call(ACME_KEY), "the third task holds the cap");
    // By a list that shows it ended.
    let r = ask(ACME_KEY, "tasks/list", json!({}));
    assert!(listed_tasks(&r.json()).contains(&third), "{r:?}");
    task_made(&call(ACME_KEY));
    d.stop();
}

/// The task gateway of [`tasks_gateway_with`] in front of the same TypeScript SDK server run as
/// a stdio upstream (`mode`: `working` or `slow`).
fn tasks_gateway_stdio(prefix: &str, acme: &str, mode: &str, rest: &str) -> (Daemon, u16) {
    let script = integration_tests::peers::root().join("tests/fixtures/tasks_server.cjs");
    let upstream = format!(
        "command = [\"node\", \"{}\", \"stdio\", \"{mode}\"]\n{rest}\n[upstreams.stdio]\nuid = 0\ngid = 0\n{}",
        script.display(),
        integration_tests::peers::node_stdio_env()
    );
    tasks_gateway_to(prefix, acme, &upstream)
}

/// What the stdio fixture's `stats` tool says: how many tasks worked at once at most.
fn most_working_stdio(port: u16) -> u64 {
    let params = json!({"name": "stats", "arguments": {}});
    let r = ask_tasks(port, BETA_KEY, None, "tools/call", params);
    let text = r.json()["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{r:?}"))
        .to_owned();
    serde_json::from_str::<Value>(&text).unwrap()["maxRunning"]
        .as_u64()
        .unwrap()
}

/// A stdio upstream's tasks hold their calls' slots as an HTTP upstream's do: until seen ended,
/// and a call given up on (504) as a task would. Before, five task calls of a tool capped at one
/// worked at once in the child (an attacker's review: the stdio path never bound the slots).
#[test]
fn a_stdio_upstreams_task_holds_its_calls_slot_until_it_is_seen_ended() {
    let (mut d, port) = tasks_gateway_stdio("gwtaskstdio", REPORT_CAPPED, "working", "");
    let ask = |k: &str, method: &str, params: Value| ask_tasks(port, k, None, method, params);
    let first = task_made(&call_report_task(port, ACME_KEY));
    for _ in 0..3 {
        cap_refused(
            &call_report_task(port, ACME_KEY),
            "another task while the first works",
        );
    }
    // Working still: the slot stays held.
    let r = ask(ACME_KEY, "tasks/get", json!({"taskId": first}));
    assert_eq!(r.json()["result"]["status"], "working", "{r:?}");
    cap_refused(&call_report_task(port, ACME_KEY), "while it shows working");
    assert_eq!(most_working_stdio(port), 1);
    // Seen ended: the slot goes back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = ask(ACME_KEY, "tasks/get", json!({"taskId": first}));
        if r.json()["result"]["status"] == "completed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r:?}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    task_made(&call_report_task(port, ACME_KEY));
    d.stop();

    // A task call the gateway gave up on keeps its slot: the child made the task.
    let rest = "response_timeout_ms = 500";
    let (mut d, port) = tasks_gateway_stdio("gwtaskstdioslow", REPORT_CAPPED, "slow", rest);
    let r = call_report_task(port, ACME_KEY);
    assert_eq!(r.status, 504, "{r:?}");
    cap_refused(
        &call_report_task(port, ACME_KEY),
        "after the call given up on",
    );
    assert_eq!(most_working_stdio(port), 1);
    d.stop();
}

/// A cancel is not a task's end: the TypeScript SDK's server marks the task cancelled and its
/// work goes on (a review of the change above: after four cancels, five tasks of a tool capped
/// at one worked at once). The slot stays held through the cancel and a `tasks/get` that says
/// `cancelled`, and the upstream never works on two at once.
#[test]
fn a_cancelled_task_keeps_its_slot_while_its_work_may_go_on() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server_working(up_port);
    let (mut d, port) = tasks_gateway_with(up_port, "gwtaskcancel", REPORT_CAPPED, "");
    let ask = |k: &str, method: &str, params: Value| ask_tasks(port, k, None, method, params);
    let task = task_made(&call_report_task(port, ACME_KEY));
    for _ in 0..3 {
        let r = ask(ACME_KEY, "tasks/cancel", json!({"taskId": task}));
        assert_eq!(r.status, 200, "{r:?}");
        cap_refused(&call_report_task(port, ACME_KEY), "after a cancel");
    }
    let r = ask(ACME_KEY, "tasks/get", json!({"taskId": task}));
    assert_eq!(r.json()["result"]["status"], "cancelled", "{r:?}");
    cap_refused(
        &call_report_task(port, ACME_KEY),
        "after it shows cancelled",
    );
    assert_eq!(most_working(up_port), 1);
    d.stop();
}

/// A call that may have made a task and whose answer never came in time (the gateway gave up
/// on it: 504) holds its slot as a task would: the upstream made the task, and works on it.
/// Before, the slot went back with the 504, and three such calls had three tasks working at
/// once under a cap of one (a review).
#[test]
fn a_task_call_given_up_on_keeps_its_slot() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server_slow(up_port);
    let rest = "response_timeout_ms = 500\n";
    let (mut d, port) = tasks_gateway_with(up_port, "gwtaskslow", REPORT_CAPPED, rest);
    let r = call_report_task(port, ACME_KEY);
    assert_eq!(r.status, 504, "{r:?}");
    cap_refused(
        &call_report_task(port, ACME_KEY),
        "after the call given up on",
    );
    assert_eq!(most_working(up_port), 1);
    d.stop();
}

/// The same through the session the gateway holds for stateless callers with a session-era
/// upstream: a task call that went out and timed out holds its slot (its work may go on).
#[test]
fn a_task_call_given_up_on_through_a_held_session_keeps_its_slot() {
    let py = PyServer::start_with(&["--slow"]);
    let capped = "[[tenants.policy.tools]]\nmatch = \"sleep\"\nmax_concurrent = 1\n";
    let rest = "era = \"session\"\nresponse_timeout_ms = 500\n";
    let (mut d, port) = tasks_gateway_with(py.port, "gwtaskheldto", capped, rest);
    let call = || {
        let params =
            json!({"name": "sleep", "arguments": {"seconds": 2.0}, "task": {"ttl": 60000}});
        raw(
            port,
            &post_2026("/mcp", ACME_KEY, "tools/call", params, "sleep", false),
        )
        .0
    };
    let r = call();
    assert_eq!(r.status, 504, "{r:?}");
    cap_refused(&call(), "after the call given up on");
    d.stop();
}

/// Only a call that went out can have made a task: one that failed while the gateway opened
/// the session it holds for stateless callers (an upstream that never answers `initialize`)
/// gives its slot back. (A fix above held it 10 minutes: an outage of one upstream locked a
/// cap for every upstream the cap covers, a review.)
#[test]
fn a_task_call_that_never_went_out_holds_no_slot() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server(up_port);
    let hang = FakeUpstream::start(Misbehave::Hang);
    let rest = format!(
        "[[upstreams]]\nname = \"hang\"\nurl = \"{}\"\nera = \"session\"\nresponse_timeout_ms = 500\n[[routes]]\npath = \"/hang\"\nupstream = \"hang\"\nauth = [\"api_key\"]\n",
        hang.url()
    );
    let (mut d, port) = tasks_gateway_with(up_port, "gwtasknone", REPORT_CAPPED, &rest);
    let params = json!({"name": "report", "arguments": {"topic": "x"}, "task": {"ttl": 60000}});
    let (r, _) = raw(
        port,
        &post_2026("/hang", ACME_KEY, "tools/call", params, "report", false),
    );
    assert_eq!(r.status, 504, "{r:?}");
    // The cap is free: a task call to the other upstream makes its task.
    task_made(&call_report_task(port, ACME_KEY));
    d.stop();
}

/// A session-era upstream makes no task of its own choosing: a 2026-07-28 call that only
/// offers the tasks extension, sent through the session the gateway holds for stateless
/// callers, is no task, and its slot goes back with the call even when its client leaves
/// first. (A fix above held the slot of such a call for 10 minutes: a client that declares the
/// extension on every request and drops its connection locked the cap, a review.)
#[test]
fn a_call_that_only_offers_tasks_to_a_session_era_upstream_holds_no_slot_after_it() {
    let py = PyServer::start_with(&["--slow"]);
    let capped = "[[tenants.policy.tools]]\nmatch = \"sleep\"\nmax_concurrent = 1\n";
    let (mut d, port) = tasks_gateway_with(py.port, "gwtaskheld", capped, "era = \"session\"\n");
    let call = |seconds: f64| {
        let params = json!({"name": "sleep", "arguments": {"seconds": seconds}});
        post_2026("/mcp", ACME_KEY, "tools/call", params, "sleep", true)
    };
    // The client leaves while the call works.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut s, &call(1.0)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(s);
    // Once the call is over upstream (cancelled, or done), the cap is free again.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (r, _) = raw(port, &call(0.1));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["result"]["content"][0]["text"], "slept", "{r:?}");
    d.stop();
}

/// A call with no session to cancel it in runs on at the Python SDK's server (answering with
/// JSON) when its client hangs up: 2026-07-28 says that closing a request's stream cancels
/// it, and that server does not stop (nor, bridged, does the session era read a closed
/// connection as a cancellation). Its concurrency slot is held until its answer comes, on
/// every way there: passthrough (the upstream's era said, and learnt), federated, bridged, and
/// an event stream (read on until it ends or goes idle). Before, the slot went back as the
/// client left: a caller capped at one `sleep` at a time ran three at once (a review). On an
/// upstream said to stop such calls (`closing_cancels`), the slot goes back at once.
#[test]
fn a_call_no_session_can_cancel_holds_its_slot_after_its_client_leaves() {
    let py = PyServer::start_with(&["--slow"]);
    let py_json = PyServer::start_with(&["--slow", "--json"]);
    let py_only = PyServer::start_with(&["--slow", "--stateless-only"]);
    let py_trusted = PyServer::start_with(&["--slow", "--json"]);
    let capped = "[[tenants.policy.tools]]\nmatch = \"sleep\"\nmax_concurrent = 1\n";
    let upstream = |name: &str, url: &str, more: &str| {
        format!(
            "[[upstreams]]\nname = \"{name}\"\nurl = \"{url}\"\nera = \"stateless\"\n{more}[[routes]]\npath = \"/{name}\"\nupstream = \"{name}\"\nauth = [\"api_key\"]\n"
        )
    };
    let py_auto = PyServer::start_with(&["--slow", "--json"]);
    let stall = FakeUpstream::start(Misbehave::StallMidStream);
    let ping = FakeUpstream::start(Misbehave::PingMidStream);
    let auto = format!(
        "[[upstreams]]\nname = \"auto\"\nurl = \"{}\"\n[[routes]]\npath = \"/auto\"\nupstream = \"auto\"\nauth = [\"api_key\"]\n",
        py_auto.url()
    );
    let rest = format!(
        "era = \"stateless\"\n{}{}{}{}{}{auto}[[routes]]\npath = \"/fed\"\nfederate = [{{ upstream = \"json\", prefix = \"p_\" }}]\nauth = [\"api_key\"]\n[[routes]]\npath = \"/bridged\"\nupstream = \"only\"\n",
        upstream("json", &py_json.url(), ""),
        upstream("only", &py_only.url(), ""),
        upstream("trusted", &py_trusted.url(), "closing_cancels = true\n"),
        upstream("stall", &stall.url(), "stream_idle_timeout_ms = 2000\n"),
        upstream("ping", &ping.url(), "stream_idle_timeout_ms = 2000\n"),
    );
    let (mut d, port) = tasks_gateway_with(py.port, "gwleftnosess", capped, &rest);
    // The bridged route takes a session-era client (the route's default tenant is acme).
    let bridged = open_session(port, "/bridged", "2025-06-18");
    let next_id = std::sync::atomic::AtomicU64::new(10);
    let request = |path: &str, tool: &str, arguments: Value| {
        let name = if path == "/fed" {
            format!("p_{tool}")
        } else {
            tool.to_owned()
        };
        let params = json!({"name": name, "arguments": arguments});
        if path == "/bridged" {
            // Ids are the session's own while in flight.
            let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let body =
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
            post(path, &body.to_string(), &bridged)
        } else {
            post_2026(path, ACME_KEY, "tools/call", params, &name, false)
        }
    };
    let running = |path: &str| {
        let (r, _) = raw(port, &request(path, "calls_running", json!({})));
        let m = message_of(&r);
        m["result"]["structuredContent"]["result"]
            .as_i64()
            .unwrap_or_else(|| panic!("{path}: {m}"))
    };
    let poll = |what: &dyn Fn() -> bool| {
        (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            what()
        })
    };
    // Starts a `sleep` of `seconds` at `path` and hangs up once it runs upstream.
    let start_and_leave = |path: &str, seconds: f64| {
        assert_eq!(running(path), 0, "{path}");
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let call = request(path, "sleep", json!({"seconds": seconds}));
        std::io::Write::write_all(&mut client, &call).unwrap();
        assert!(poll(&|| running(path) == 1), "{path}: never started");
        drop(client);
        // Past the gateway's look at a client that a wait on the upstream watches (200 ms).
        std::thread::sleep(std::time::Duration::from_millis(700));
    };
    let quick = |path: &str| raw(port, &request(path, "sleep", json!({"seconds": 0.1}))).0;
    for path in ["/mcp", "/json", "/auto", "/fed", "/bridged"] {
        start_and_leave(path, 3.0);
        // The call runs on upstream: so does its hold on the cap.
        let r = quick(path);
        assert_eq!(
            r.status, 429,
            "{path}: a second call while the first runs: {r:?}"
        );
        assert_eq!(message_of(&r)["error"]["code"], -32042, "{path}");
        // Once it ended there, the cap is free again.
        assert!(poll(&|| running(path) == 0), "{path}: never ended");
        let free = (0..20).any(|_| {
            let r = quick(path);
            if r.status == 200 {
                assert_eq!(
                    message_of(&r)["result"]["content"][0]["text"],
                    "slept",
                    "{path}"
                );
                return true;
            }
            cap_refused(&r, path);
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        });
        assert!(free, "{path}: the cap stayed taken after the call ended");
    }

    // Bridged, a call its client cancels (`notifications/cancelled`, no hang-up) is answered
    // at once, and runs on upstream holding the cap.
    assert_eq!(running("/bridged"), 0);
    let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "sleep", "arguments": {"seconds": 3.0}}});
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut client, &post("/bridged", &call.to_string(), &bridged)).unwrap();
    assert!(poll(&|| running("/bridged") == 1), "never started");
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": id}});
    let (r, _) = raw(port, &post("/bridged", &cancel.to_string(), &bridged));
    assert_eq!(r.status, 202, "{r:?}");
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let answered = integration_tests::peers::read_response(&mut client).expect("answered");
    assert_eq!(
        message_of(&answered)["error"]["code"],
        -32800,
        "{answered:?}"
    );
    cap_refused(&quick("/bridged"), "a cancelled bridged call that runs on");
    assert!(poll(&|| running("/bridged") == 0), "never ended");
    assert!(
        poll(&|| quick("/bridged").status == 200),
        "the cap stayed taken after the cancelled call ended"
    );

    // An event stream (the fixture's first event, then silence, or keep-alive comments): read
    // on without the client until it goes idle (`stream_idle_timeout_ms`, 2 s), and the slot
    // held until then; comments do not keep it for nobody past 2 s after the leaving (a
    // review: the Python SDK's server pings every 15 s, and the call held its slot as long
    // as the tool ran).
    for (path, up) in [("/stall", &stall), ("/ping", &ping)] {
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let call = request(path, "sleep", json!({"seconds": 3.0}));
        std::io::Write::write_all(&mut client, &call).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("notifications/progress") {
            let mut buf = [0u8; 4096];
            let n = std::io::Read::read(&mut client, &mut buf).unwrap();
            assert!(n > 0, "{path}: the stream ended early");
            got.extend_from_slice(&buf[..n]);
        }
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(700));
        assert!(
            !up.seen.lock().unwrap().iter().any(|x| x == "closed"),
            "{path}: the stream was closed as its client left"
        );
        cap_refused(&quick(path), "a stream read on without its client");
        let closed = (0..80).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            up.seen.lock().unwrap().iter().any(|x| x == "closed")
        });
        assert!(closed, "{path}: the stream was never given up");
        // The next call is admitted (one to another upstream: the cap is the tool's).
        assert_eq!(
            quick("/json").status,
            200,
            "{path}: the cap after the stream ended"
        );
    }

    // Said to stop a call whose connection closes: the slot goes back as the client leaves
    // (this server does not stop: both calls then run).
    start_and_leave("/trusted", 3.0);
    let r = quick("/trusted");
    assert_eq!(r.status, 200, "{r:?}");
    d.stop();
}

/// A call that runs on without its client whose client is cut for a ban is closed (a ban ends
/// what its client has under way), and its slot held for the upstream's response timeout, as
/// long as the call would have been waited for: the Python SDK's server answering with JSON
/// runs it on. Before, a caller that drew a ban on a fresh source freed its slot while its
/// call ran on (a review: three `sleep` calls under a cap of one).
#[test]
fn a_call_that_runs_on_whose_client_is_banned_holds_its_slot_a_while() {
    let py = PyServer::start_with(&["--slow", "--json"]);
    // An event stream with keep-alive comments.
    let ping = FakeUpstream::start(Misbehave::PingMidStream);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwcutheld");
    let config = format!(
        "{header}default_tenant = \"public\"\n[[tenants]]\nname = \"public\"\nid = 0\n[[tenants.policy.tools]]\nmatch = \"sleep\"\nmax_concurrent = 1\n[[upstreams]]\nname = \"u0\"\nurl = \"{url}\"\nera = \"stateless\"\nresponse_timeout_ms = 3000\nstream_idle_timeout_ms = 2000\n[[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n[[upstreams]]\nname = \"u1\"\nurl = \"{ping}\"\nera = \"stateless\"\nresponse_timeout_ms = 1000\nstream_idle_timeout_ms = 4000\n[[routes]]\npath = \"/ping\"\nupstream = \"u1\"\n",
        header = integration_tests::daemon::local_header(&instance, 2, port, admin),
        url = py.url(),
        ping = ping.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let call = |tool: &str, args: Value| raw(port, &post_call_2026("/mcp", 1, tool, &args, "")).0;
    let running = || {
        let r = call("calls_running", json!({}));
        message_of(&r)["result"]["structuredContent"]["result"]
            .as_i64()
            .unwrap_or_else(|| panic!("{r:?}"))
    };
    let mut banned = integration_tests::daemon::loopback_from("127.0.0.2", port).unwrap();
    let long = post_call_2026("/mcp", 1, "sleep", &json!({"seconds": 5.0}), "");
    std::io::Write::write_all(&mut banned, &long).unwrap();
    let started = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        running() == 1
    });
    assert!(started, "the call never started");
    let ban = |address: &str| integration_tests::peers::ban(admin, address, 60);
    // The cap is refused (`why`), then free once the hold is over (within 6 s).
    let held_then_freed = |why: &str| {
        cap_refused(&call("sleep", json!({"seconds": 0.1})), why);
        let free = (0..60).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            call("sleep", json!({"seconds": 0.1})).status == 200
        });
        assert!(free, "the cap stayed taken: {why}");
    };
    ban("127.0.0.2");
    // The banned client is cut.
    banned
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut banned, &mut rest);
    // Its call runs on upstream, and its slot is held; then given back (the longer timeout,
    // 3 s, and a sweep a second).
    held_then_freed("a call whose client was cut");

    // A streamed call is held as long as a stream read on without its client would be: its
    // idle timeout (4 s), not the response timeout (1 s), which freed it sooner than hanging
    // up did (a review).
    let mut banned = integration_tests::daemon::loopback_from("127.0.0.3", port).unwrap();
    let long = post_call_2026("/ping", 1, "sleep", &json!({"seconds": 30.0}), "");
    std::io::Write::write_all(&mut banned, &long).unwrap();
    banned
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let mut got = [0u8; 512];
    let n = std::io::Read::read(&mut banned, &mut got).unwrap();
    assert!(n > 0, "the stream never began");
    ban("127.0.0.3");
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut banned, &mut rest);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    held_then_freed("a streamed call whose client was cut, past the response timeout");
    d.stop();
}

/// A session-era call whose client hangs up is cancelled in its session at once, and keeps its
/// concurrency slot until its upstream exchange ends: a plain `def` tool of the Python SDK's
/// server runs in a worker thread, which the cancellation cannot stop (the server answers it,
/// -32800, once the tool returned). Before, the slot went back as the cancellation went out,
/// and a client that called and hung up, round after round, ran one more call at once each
/// round past its cap (an attacker's review: 6 at once under a tool cap of 1, 13 under a
/// tenant cap of 4). On every way there: the client's own session (an event stream, and JSON
/// whose head comes only with the answer), federated, through a held session, and bridged.
/// A second round is refused while the first call runs, the server never runs two at once,
/// and a call is admitted again once the first ended there.
#[test]
fn a_call_whose_client_leaves_holds_its_slot_while_a_sync_tool_runs_on() {
    let py = PyServer::start_with(&["--slow"]);
    let py_json = PyServer::start_with(&["--slow", "--json"]);
    let py_only = PyServer::start_with(&["--slow", "--stateless-only"]);
    let capped = "[[tenants.policy.tools]]\nmatch = \"block\"\nmax_concurrent = 1\n";
    // Routes without `auth`: their callers are the default tenant's (acme).
    let rest = format!(
        "[[upstreams]]\nname = \"json\"\nurl = \"{}\"\n\
         [[upstreams]]\nname = \"held\"\nurl = \"{}\"\nera = \"session\"\n\
         [[upstreams]]\nname = \"only\"\nurl = \"{}\"\nera = \"stateless\"\n\
         [[routes]]\npath = \"/sess\"\nupstream = \"tasks\"\n\
         [[routes]]\npath = \"/json\"\nupstream = \"json\"\n\
         [[routes]]\npath = \"/held\"\nupstream = \"held\"\n\
         [[routes]]\npath = \"/fed\"\nfederate = [{{ upstream = \"tasks\", prefix = \"p_\" }}]\n\
         [[routes]]\npath = \"/bridged\"\nupstream = \"only\"\n",
        py_json.url(),
        py.url(),
        py_only.url(),
    );
    let (mut d, port) = tasks_gateway_with(py.port, "gwsyncleft", capped, &rest);
    let sessions: std::collections::HashMap<&str, String> = ["/sess", "/json", "/fed", "/bridged"]
        .into_iter()
        .map(|path| (path, open_session(port, path, "2025-11-25")))
        .collect();
    let next_id = std::sync::atomic::AtomicU64::new(10);
    // A call of `tool` at `path`: a session-era client's in its session, a stateless one's on
    // the held route.
    let request = |path: &str, tool: &str, arguments: Value| {
        let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if path == "/held" {
            return post_call_2026(path, id, tool, &arguments, "");
        }
        let name = if path == "/fed" {
            format!("p_{tool}")
        } else {
            tool.to_owned()
        };
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}});
        post(path, &body.to_string(), &sessions[path])
    };
    // How many `block` calls the route's server runs now, and the most at once since last
    // asked: asked with a stateless call (not capped) on a route to that server.
    let blocking = |path: &str| {
        let via = match path {
            "/json" | "/bridged" => path,
            _ => "/held",
        };
        let (r, _) = raw(
            port,
            &post_call_2026(via, 1, "blocking_calls", &json!({}), ""),
        );
        let text = message_of(&r)["result"]["content"][0]["text"].clone();
        let counts: Value = serde_json::from_str(text.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{path}: {e}: {r:?}"));
        let count = |k: &str| {
            counts[k]
                .as_i64()
                .unwrap_or_else(|| panic!("{path}: {r:?}"))
        };
        (count("now"), count("most"))
    };
    let poll = |what: &dyn Fn() -> bool| {
        (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            what()
        })
    };
    for path in ["/sess", "/json", "/fed", "/held", "/bridged"] {
        assert_eq!(blocking(path).0, 0, "{path}");
        // Three rounds of: call a tool that blocks 6 s, read what comes within 0.5 s (an event
        // stream's head comes at once), hang up.
        for _ in 0..3 {
            let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let call = request(path, "block", json!({"seconds": 6.0}));
            std::io::Write::write_all(&mut client, &call).unwrap();
            client
                .set_read_timeout(Some(std::time::Duration::from_millis(500)))
                .unwrap();
            let _ = std::io::Read::read(&mut client, &mut [0u8; 4096]);
            drop(client);
            // Past the gateway's look at a client that a wait on the upstream watches (200 ms).
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let (now, most) = blocking(path);
        assert_eq!(
            most, 1,
            "{path}: more calls ran at once than the cap allows"
        );
        assert_eq!(now, 1, "{path}: the first call does not run on");
        cap_refused(
            &raw(port, &request(path, "block", json!({"seconds": 0.1}))).0,
            &format!("{path}: a call while the first runs on"),
        );
        // Once the first call ended there, the cap is free again.
        assert!(poll(&|| blocking(path).0 == 0), "{path}: never ended");
        let admitted = poll(&|| {
            let (r, _) = raw(port, &request(path, "block", json!({"seconds": 0.1})));
            if r.status != 200 {
                cap_refused(&r, path);
                return false;
            }
            assert_eq!(
                message_of(&r)["result"]["content"][0]["text"],
                "blocked",
                "{path}"
            );
            true
        });
        assert!(
            admitted,
            "{path}: the cap stayed taken after the call ended"
        );
    }
    d.stop();
}

/// A 2026-07-28 task is the server's choice (the tasks extension): a `tools/call` whose client
/// capabilities name the extension may be answered with one, with no `params.task`. Such a call
/// is read as one that asks for a task: its task is its creator's and holds the call's slot
/// until a `tasks/get` says it completed. Before, nothing was bound (its creator's own
/// `tasks/get` was refused as for another's task) and the slot went back at once: five tasks
/// of a tool capped at one worked at once (a review). A federated route, which offers no
/// tasks, sends the call on without the extension: the member answers it without a task.
#[test]
fn a_task_the_server_chooses_holds_its_calls_slot_too() {
    let up_port = free_port();
    let _server = PyServer::script_on("tasks_2026_server.py", up_port, &[]);
    let rest = "era = \"stateless\"\n[[routes]]\npath = \"/fed\"\nfederate = [{ upstream = \"tasks\", prefix = \"p_\" }]\nauth = [\"api_key\"]\n";
    let (mut d, port) = tasks_gateway_with(up_port, "gwtask2026", REPORT_CAPPED, rest);
    let ask = |k: &str, path: &str, method: &str, params: Value, name: &str| {
        raw(port, &post_2026(path, k, method, params, name, true)).0
    };
    let call = |path: &str, tool: &str| {
        ask(
            ACME_KEY,
            path,
            "tools/call",
            json!({"name": tool, "arguments": {}}),
            tool,
        )
    };
    let get = |k: &str, task: &str| ask(k, "/mcp", "tasks/get", json!({"taskId": task}), task);

    // Federated: answered with the result, not a task (and its slot back with the answer).
    let r = call("/fed", "p_report");
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "the report",
        "{r:?}"
    );

    let first = task_made(&call("/mcp", "report"));
    assert_eq!(
        get(BETA_KEY, &first).json()["error"]["code"],
        -32602,
        "another's task"
    );
    cap_refused(
        &call("/mcp", "report"),
        "a second task while the first works",
    );
    let r = get(ACME_KEY, &first);
    assert_eq!(
        r.json()["result"]["status"],
        "working",
        "its creator's: {r:?}"
    );
    cap_refused(&call("/mcp", "report"), "still working");
    // Its work takes 1 s.
    let ended = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        get(ACME_KEY, &first).json()["result"]["status"] == "completed"
    });
    assert!(ended, "the task never completed");
    task_made(&call("/mcp", "report"));
    assert_eq!(most_working(up_port), 1, "never two at once");
    d.stop();
}

/// An upstream that takes requests with and without a session, with one task store: the
/// TypeScript SDK's store shows a task made without a session on every session too. A caller
/// on its own session still cannot list, read, cancel or feed a task the gateway bound to
/// another caller; the tasks of its session are its own as before.
#[test]
fn a_task_made_without_a_session_is_not_shown_on_another_callers_session() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server_with_sessions(up_port);
    let (mut d, port) = tasks_gateway(up_port, "gwtasksess");
    let ask = |k: &str, session: Option<&str>, method: &str, params: Value| {
        ask_tasks(port, k, session, method, params)
    };
    let listed = |r: &integration_tests::peers::RawResponse| listed_tasks(&r.json());
    let made = |r: &integration_tests::peers::RawResponse| -> String {
        r.json()["result"]["task"]["taskId"]
            .as_str()
            .unwrap_or_else(|| panic!("no task created: {r:?}"))
            .to_owned()
    };
    let report = |topic: &str| json!({"name": "report", "arguments": {"topic": topic}, "task": {"ttl": 60000}});
    // acme, without a session: its task is bound to it.
    let task = made(&ask(ACME_KEY, None, "tools/call", report("tides")));

    // beta opens a session of its own at the upstream.
    let init = json!({"protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "beta", "version": "1"}});
    let r = ask(BETA_KEY, None, "initialize", init);
    assert_eq!(r.status, 200, "{r:?}");
    let session = r.header("mcp-session-id").expect("a session").to_owned();
    let on = Some(session.as_str());
    let r = ask(BETA_KEY, on, "tasks/list", json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!listed(&r).contains(&task), "{r:?}");
    for method in ["tasks/get", "tasks/result", "tasks/cancel"] {
        let r = ask(BETA_KEY, on, method, json!({"taskId": task}));
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.json()["error"]["code"], -32602, "{method}: {text}");
        assert!(!text.contains("secret report"), "{method}: {text}");
    }
    let related = json!({"name": "report", "arguments": {"topic": "x"},
        "_meta": {"io.modelcontextprotocol/related-task": {"taskId": task}}});
    let r = ask(BETA_KEY, on, "tools/call", related);
    assert_eq!(r.json()["error"]["code"], -32602, "{r:?}");

    // Its own session's task is its own.
    let own = made(&ask(BETA_KEY, on, "tools/call", report("reefs")));
    let r = ask(BETA_KEY, on, "tasks/list", json!({}));
    assert!(listed(&r).contains(&own), "{r:?}");
    let r = ask(BETA_KEY, on, "tasks/result", json!({"taskId": own}));
    assert!(
        String::from_utf8_lossy(&r.body).contains("secret report on reefs"),
        "{r:?}"
    );
    // And acme's is still acme's.
    let r = ask(ACME_KEY, None, "tasks/result", json!({"taskId": task}));
    assert!(
        String::from_utf8_lossy(&r.body).contains("secret report on tides"),
        "{r:?}"
    );
    d.stop();
}

/// The same, through two gateways of a fleet (or one before and after a restart): the second
/// never bound acme's task, so it cannot know it is another's. A client's own session lists
/// only what the gateway bound to that caller.
#[test]
fn a_task_made_without_a_session_is_not_listed_through_another_gateway() {
    let up_port = free_port();
    let _server = integration_tests::peers::tasks_server_with_sessions(up_port);
    let (mut first, first_port) = tasks_gateway(up_port, "gwtaskfleet1");
    let (mut second, second_port) = tasks_gateway(up_port, "gwtaskfleet2");
    let report = |topic: &str| json!({"name": "report", "arguments": {"topic": topic}, "task": {"ttl": 60000}});
    let made = |r: &integration_tests::peers::RawResponse| -> String {
        r.json()["result"]["task"]["taskId"]
            .as_str()
            .unwrap_or_else(|| panic!("no task created: {r:?}"))
            .to_owned()
    };
    let task = made(&ask_tasks(
        first_port,
        ACME_KEY,
        None,
        "tools/call",
        report("tides"),
    ));
    let init = json!({"protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "beta", "version": "1"}});
    let r = ask_tasks(second_port, BETA_KEY, None, "initialize", init);
    let session = r.header("mcp-session-id").expect("a session").to_owned();
    let on = Some(session.as_str());
    let own = made(&ask_tasks(
        second_port,
        BETA_KEY,
        on,
        "tools/call",
        report("reefs"),
    ));
    let r = ask_tasks(second_port, BETA_KEY, on, "tasks/list", json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    let listed = listed_tasks(&r.json());
    assert!(!listed.contains(&task), "acme's task listed to beta: {r:?}");
    assert!(listed.contains(&own), "beta's own: {r:?}");
    first.stop();
    second.stop();
}

/// The one JSON-RPC message of an answer given as JSON or as an event stream.
fn message_of(r: &integration_tests::peers::RawResponse) -> Value {
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or(Some(l)))
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("id").is_some())
        })
        .unwrap_or_else(|| panic!("no message: {r:?}"))
}

/// A gateway configuration with one tenant capped at two calls in flight, upstream `u0` at
/// `url` on route `/mcp`, and `rest` after them.
fn capped_at_two(header: String, url: &str, rest: &str) -> String {
    format!(
        r#"{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[tenants.policy]
max_concurrent = 2
[[upstreams]]
name = "u0"
url = "{url}"
[[routes]]
path = "/mcp"
upstream = "u0"
{rest}"#
    )
}

/// Opens a session of protocol `version` at `path` (`initialize`, `notifications/initialized`):
/// the headers a request in it carries.
fn open_session(port: u16, path: &str, version: &str) -> String {
    let init = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"{version}","capabilities":{{}},"clientInfo":{{"name":"t","version":"1"}}}}}}"#
    );
    let (r, _) = raw(port, &post(path, &init, ""));
    assert_eq!(r.status, 200, "{path}: {r:?}");
    let sid = r.header("mcp-session-id").expect("a session id").to_owned();
    let session = format!("mcp-session-id: {sid}\r\nmcp-protocol-version: {version}\r\n");
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let (r, _) = raw(port, &post(path, initialized, &session));
    assert!(r.status < 300, "{path}: {r:?}");
    session
}

#[test]
fn a_session_era_call_whose_client_leaves_is_cancelled_upstream() {
    // Up to 2025-11-25 a closed connection is no cancellation: the call runs on upstream
    // while the gateway's concurrency slot is free again, so a client that hangs up and calls
    // again holds the upstream past its cap. The gateway cancels it in the session instead.
    let py = PyServer::start_with(&["--slow"]);
    // Answering with JSON, its head comes only with the answer: the client leaves before it.
    let py_json = PyServer::start_with(&["--slow", "--json"]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwleft");
    let config = capped_at_two(
        integration_tests::daemon::local_header(&instance, 2, port, admin),
        &py.url(),
        &format!(
            r#"[[upstreams]]
name = "u1"
url = "{py_json}"
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "p_" }}]
[[routes]]
path = "/json"
upstream = "u1"
[[routes]]
path = "/mcp2"
upstream = "u0"
[[routes]]
path = "/fed2"
federate = [{{ upstream = "u0", prefix = "p_" }}]
"#,
            py_json = py_json.url(),
        ),
    );
    let mut d = Daemon::start_local(&instance, &config);
    for (path, prefix) in [("/mcp", ""), ("/fed", "p_"), ("/json", "")] {
        let session = open_session(port, path, "2025-06-18");
        let running = || {
            let call = format!(
                r#"{{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{{"name":"{prefix}calls_running","arguments":{{}}}}}}"#
            );
            let (r, _) = raw(port, &post(path, &call, &session));
            let m = message_of(&r);
            m["result"]["structuredContent"]["result"]
                .as_i64()
                .unwrap_or_else(|| panic!("{path}: {m}"))
        };
        assert_eq!(running(), 0, "{path}");
        let call = format!(
            r#"{{"jsonrpc":"2.0","id":"long-1","method":"tools/call","params":{{"name":"{prefix}sleep","arguments":{{"seconds":60}}}}}}"#
        );
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut client, &post(path, &call, &session)).unwrap();
        let started = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            running() == 1
        });
        assert!(started, "{path}: the call never started upstream");
        // The client hangs up without a word.
        drop(client);
        let stopped = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            running() == 0
        });
        assert!(
            stopped,
            "{path}: the call whose client left still runs upstream"
        );

        // A second request with the id of one in flight (as a client compares ids: `"77"` is
        // `77`) is refused: the server would run it under the first one's id, and the
        // first one's cancellation, when its client left, would reach it instead (the first
        // ran on past the cap, hidden behind a quick call with its id).
        let call = format!(
            r#"{{"jsonrpc":"2.0","id":77,"method":"tools/call","params":{{"name":"{prefix}sleep","arguments":{{"seconds":60}}}}}}"#
        );
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut client, &post(path, &call, &session)).unwrap();
        let started = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            running() == 1
        });
        assert!(started, "{path}: the second call never started upstream");
        for id in ["77", r#""77""#] {
            let again = format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{prefix}calls_running","arguments":{{}}}}}}"#
            );
            let (r, _) = raw(port, &post(path, &again, &session));
            assert_eq!(r.status, 409, "{path} {id}: {r:?}");
            assert_eq!(message_of(&r)["error"]["code"], -32600, "{path} {id}");
            // The session is taken on another route to the same upstream (a federated one on
            // another federated route): so is the claim.
            let other = match path {
                "/mcp" => Some("/mcp2"),
                "/fed" => Some("/fed2"),
                _ => None,
            };
            if let Some(other) = other {
                let (r, _) = raw(port, &post(other, &again, &session));
                assert_eq!(r.status, 409, "{other} {id}: {r:?}");
            }
        }
        drop(client);
        let stopped = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            running() == 0
        });
        assert!(stopped, "{path}: the first call with id 77 still runs");
        // Its id is free once it ended.
        let again = format!(
            r#"{{"jsonrpc":"2.0","id":77,"method":"tools/call","params":{{"name":"{prefix}calls_running","arguments":{{}}}}}}"#
        );
        let (r, _) = raw(port, &post(path, &again, &session));
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    // A call whose client left is recorded as such, not as the upstream's failure (the audit
    // log, the metrics and `mcp_gateway_upstream_failures_total` blamed the upstream).
    let metrics = || {
        let (r, _) = raw(admin, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
        String::from_utf8_lossy(&r.body).into_owned()
    };
    let seen = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(200));
        metrics().contains(r#"outcome="client_left""#)
    });
    let text = metrics();
    assert!(seen, "{text}");
    assert!(!text.contains(r#"outcome="upstream_failure""#), "{text}");
    d.stop();
}

#[test]
fn a_resumable_call_whose_client_leaves_holds_its_slot_until_it_ends() {
    // An upstream that gives its events ids (an event store: 2025-11-25 primes every stream
    // with one) lets a client that left resume the stream, so the call runs on and is not
    // cancelled; but its slot at the gateway must be held until it ends, or a client could
    // start slow calls, hang up after the first event, and hold the upstream past its cap.
    let py = PyServer::start_with(&["--slow", "--resumable"]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwresumeleft");
    let config = capped_at_two(
        integration_tests::daemon::local_header(&instance, 1, port, admin),
        &py.url(),
        &format!(
            r#"[[upstreams]]
name = "short"
url = "{py}"
stream_idle_timeout_ms = 1500
[[routes]]
path = "/short"
upstream = "short"
"#,
            py = py.url(),
        ),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let session = open_session(port, "/mcp", "2025-11-25");
    let running = || {
        let call = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"calls_running","arguments":{}}}"#;
        let (r, _) = raw(port, &post("/mcp", call, &session));
        (
            r.status,
            message_of(&r)["result"]["structuredContent"]["result"].as_i64(),
        )
    };
    // A `sleep` call, read up to its first event with an id: the connection, and that id.
    let start_sleep_on = |path: &str, session: &str, id: &str, seconds: u64| {
        let call = format!(
            r#"{{"jsonrpc":"2.0","id":"{id}","method":"tools/call","params":{{"name":"sleep","arguments":{{"seconds":{seconds}}}}}}}"#
        );
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        std::io::Write::write_all(&mut client, &post(path, &call, session)).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let event_id = loop {
            let text = String::from_utf8_lossy(&seen);
            if let Some(at) = text.find("\nid:")
                && let Some(end) = text[at + 4..].find('\n')
            {
                break text[at + 4..at + 4 + end].trim().to_owned();
            }
            let n = std::io::Read::read(&mut client, &mut buf).expect("the stream's first event");
            assert!(n > 0, "{id}: closed before an event with an id: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        };
        (client, event_id)
    };
    let start_sleep = |id: &str| start_sleep_on("/mcp", &session, id, 4).0;
    // What a call gets while a second one (`id`) stays: 429 when that fills the cap.
    let beside_a_second_call = |id: &str| {
        let stays = start_sleep(id);
        let status = running().0;
        drop(stays);
        status
    };
    let until_calls_end = || {
        let free = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            running() == (200, Some(0))
        });
        assert!(free, "the slots are given back when the calls end");
    };
    // The first caller hangs up after the priming event: it may resume, so the call runs on.
    drop(start_sleep("left"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        running(),
        (200, Some(1)),
        "the call was not to be cancelled"
    );
    // A second call that stays: with the first, the cap of 2 is full.
    let stays = start_sleep("stays");
    let (status, _) = running();
    assert_eq!(
        status, 429,
        "the call whose client left still holds its slot while it runs upstream"
    );
    // Once both have ended, the slots are free again.
    drop(stays);
    until_calls_end();
    // Not for ever: a call whose client left is read on for the upstream's stream idle
    // timeout at most (1.5 s here), then cancelled like any other it gives up on.
    let short = open_session(port, "/short", "2025-11-25");
    drop(start_sleep_on("/short", &short, "left-long", 30).0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        running(),
        (200, Some(1)),
        "the call was not to be cancelled yet"
    );
    let cancelled = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        running() == (200, Some(0))
    });
    assert!(cancelled, "a call whose client left is read on for ever");

    // A resume of `path`'s stream from `event_id`, accepting `accept`.
    let resume_from = |path: &str, session: &str, event_id: &str, accept: &str| {
        let mut resume = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        resume
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        std::io::Write::write_all(
            &mut resume,
            format!(
                "GET {path} HTTP/1.1\r\nhost: gw\r\naccept: {accept}\r\n{session}last-event-id: {event_id}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        resume
    };
    // A client that leaves, resumes the stream (which takes it over from the gateway's read)
    // and leaves the resumed stream at once: its call still runs upstream, and still holds
    // its slot (to the stream idle timeout, 1.5 s here, as it cannot be seen ending).
    let (left, event_id) = start_sleep_on("/short", &short, "resumed-left", 4);
    drop(left);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut resume = resume_from("/short", &short, &event_id, "text/event-stream");
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut resume, &mut head).expect("the resumed stream's head");
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(resume);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        beside_a_second_call("stays-2"),
        429,
        "a call resumed and left again still holds its slot while it runs upstream"
    );
    until_calls_end();

    // A resume that gets the call's answer gives the slot back then, though the SDK's server
    // keeps the resumed stream open after it (its client closes it): before, the slot was
    // held to the stream idle timeout (5 minutes on /mcp).
    let (left, event_id) = start_sleep_on("/mcp", &session, "resumed-ok", 1);
    drop(left);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut resume = resume_from("/mcp", &session, &event_id, "text/event-stream");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(r#""id":"resumed-ok","result""#) {
        let n = std::io::Read::read(&mut resume, &mut buf).expect("the resumed call's answer");
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(resume);
    let ended = (0..30).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        running() == (200, Some(0))
    });
    assert!(ended, "the resumed call ended upstream");
    assert_eq!(
        beside_a_second_call("stays-ok"),
        200,
        "the slot of a call answered on its resumed stream is given back"
    );
    until_calls_end();

    // A resume the upstream refuses (406: it must accept an event stream) takes the stream
    // over and ends at once: the call still runs, and holds its slot (before, the refusal
    // ended the drain's hold, and a client could go past its cap so).
    let (left, event_id) = start_sleep_on("/mcp", &session, "refused-resume", 4);
    drop(left);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut resume = resume_from("/mcp", &session, &event_id, "application/json");
    let mut head = [0u8; 12];
    std::io::Read::read_exact(&mut resume, &mut head).expect("the refusal's head");
    assert_eq!(&head, b"HTTP/1.1 406", "the upstream refuses it");
    // The refusal is written whole before this side closes.
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(resume);
    assert_eq!(
        beside_a_second_call("stays-3"),
        429,
        "a call whose resume was refused still holds its slot while it runs upstream"
    );
    d.stop();
}

/// A 2026-07-28 list request (`method`, id 3) to `path` on the gateway at `port`.
fn list_2026(port: u16, path: &str, method: &str) -> integration_tests::peers::RawResponse {
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": method, "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}}}})
    .to_string();
    let head = format!("mcp-protocol-version: 2026-07-28\r\nmcp-method: {method}\r\n");
    raw(port, &post(path, &body, &head)).0
}

/// A merged list holds what every member's pages hold, up to 16 MiB in all: a member past it
/// is left out as unavailable (each page was bounded, not their sum: 100 pages of 15 MiB grew
/// the gateway to 6.4 GB for one `tools/list`). And a member's listed name that another
/// member's prefix owns is left out: a member without a prefix listed `a_echo`, which a call
/// reaches at the member of prefix `a_` (an attacker's review); so is a listed prompt with no
/// string `name` (`{"Name": "a_summarize"}`, read by a Go client as member `a`'s prompt: a
/// later review).
#[test]
fn a_federated_list_is_bounded_in_all_and_holds_no_name_of_another_member() {
    let py = PyServer::start(true);
    let big = PyServer::script_on("list_member.py", free_port(), &["big"]);
    let squat = PyServer::script_on("list_member.py", free_port(), &["squat"]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwlists");
    let config = format!(
        r#"{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[upstreams]]
name = "py"
url = "{py}"
[[upstreams]]
name = "big"
url = "{big}"
era = "stateless"
[[upstreams]]
name = "squat"
url = "{squat}"
era = "stateless"
[[routes]]
path = "/big"
federate = [{{ upstream = "py", prefix = "p_" }}, {{ upstream = "big", prefix = "b_" }}]
[[routes]]
path = "/squat"
federate = [{{ upstream = "py", prefix = "a_" }}, {{ upstream = "squat", prefix = "" }}]
"#,
        header = integration_tests::daemon::local_header(&instance, 2, port, admin),
        py = py.url(),
        big = big.url(),
        squat = squat.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let list_of = |path: &str, method: &str| list_2026(port, path, method);
    let list = |path: &str| list_of(path, "tools/list");
    let r = list("/big");
    assert_eq!(
        r.status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(500)])
    );
    assert!(r.body.len() < 17 << 20, "{} bytes", r.body.len());
    let v = r.json();
    assert_eq!(
        v["result"]["_meta"]["io.mcp-gateway/unavailable"],
        json!(["big"])
    );
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(names.contains(&"p_echo"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("b_")), "{names:?}");
    let hwm_kb = integration_tests::daemon::status_kib(d.pid(), "VmHWM");
    assert!(hwm_kb < 400 * 1024, "peak RSS {hwm_kb} kB");

    let r = list("/squat");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let echoes: Vec<&Value> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "a_echo")
        .collect();
    assert_eq!(echoes.len(), 1, "{v}");
    assert!(!echoes[0].to_string().contains("HOSTILE"), "{v}");
    assert!(
        v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "own"),
        "{v}"
    );
    let r = list_of("/squat", "prompts/list");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let prompts = v["result"]["prompts"].as_array().unwrap();
    assert!(!v.to_string().contains("HOSTILE"), "{v}");
    assert!(prompts.iter().any(|p| p["name"] == "own_prompt"), "{v}");
    assert!(prompts.iter().all(|p| p["name"].is_string()), "{v}");
    d.stop();
}

/// An answer read whole is parsed whole, and a value parsed takes 32 bytes however few it was
/// written in: a `tools/list` answer of 7,000,000 zeros (14 MB) took the worker to about
/// 550 MB (an attacker's review). A message holding more than 1,048,576 values is refused
/// before it is parsed (502, and the federation leaves its member out); one of 900,000 values
/// in 2.7 MB, long enough to be counted, passes. A merged list keeps its items parsed across
/// pages: its pages hold at most as many values in all (a member paging 600,000 values a page
/// is left out after two pages, where the bound on bytes let fourteen in).
#[test]
fn an_answer_holding_more_values_than_the_gateway_parses_is_refused_unparsed() {
    let dense = PyServer::script_on("list_member.py", free_port(), &["dense"]);
    let dense_ok = PyServer::script_on("list_member.py", free_port(), &["dense_ok"]);
    let pages = PyServer::script_on("list_member.py", free_port(), &["densepages"]);
    let py = PyServer::start(true);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwdense");
    let config = format!(
        r#"{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants.policy.tools]]
match = "add"
action = "deny"
[[upstreams]]
name = "py"
url = "{py}"
[[upstreams]]
name = "dense"
url = "{dense}"
era = "stateless"
[[upstreams]]
name = "dense_ok"
url = "{dense_ok}"
era = "stateless"
[[routes]]
path = "/dense"
upstream = "dense"
[[routes]]
path = "/dense_ok"
upstream = "dense_ok"
[[upstreams]]
name = "pages"
url = "{pages}"
era = "stateless"
[[routes]]
path = "/fed"
federate = [{{ upstream = "py", prefix = "p_" }}, {{ upstream = "dense", prefix = "d_" }}]
[[routes]]
path = "/pages"
federate = [{{ upstream = "py", prefix = "p_" }}, {{ upstream = "pages", prefix = "d_" }}]
"#,
        header = integration_tests::daemon::local_header(&instance, 1, port, admin),
        py = py.url(),
        dense = dense.url(),
        dense_ok = dense_ok.url(),
        pages = pages.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let list = |path: &str| list_2026(port, path, "tools/list");
    for _ in 0..3 {
        let r = list("/dense");
        assert_eq!(r.status, 502, "{r:?}");
        let v = r.json();
        assert_eq!(v["id"], 3, "{v}");
        assert!(
            v.to_string().contains("more than 1048576 JSON values"),
            "{v}"
        );
    }
    let r = list("/fed");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(
        v["result"]["_meta"]["io.mcp-gateway/unavailable"],
        json!(["dense"]),
        "{}",
        &v.to_string()[..v.to_string().len().min(500)]
    );
    let r = list("/pages");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(
        v["result"]["_meta"]["io.mcp-gateway/unavailable"],
        json!(["pages"]),
        "{}",
        &v.to_string()[..v.to_string().len().min(500)]
    );
    assert!(
        v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "p_echo")
    );
    let r = list("/dense_ok");
    assert_eq!(
        r.status,
        200,
        "{}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
    );
    let v = r.json();
    assert_eq!(v["result"]["tools"][0]["name"], "dense");
    assert_eq!(
        v["result"]["tools"][0]["inputSchema"]["enum"]
            .as_array()
            .map(Vec::len),
        Some(900_000)
    );
    let hwm_kb = integration_tests::daemon::status_kib(d.pid(), "VmHWM");
    // Before: 550 MB for the dense list, 270 MB for the pages. Now the 14 MB answer read
    // whole, the 2.7 MB one parsed, and two pages' items.
    assert!(hwm_kb < 200 * 1024, "peak RSS {hwm_kb} kB");
    d.stop();
}

#[test]
fn a_federation_member_cannot_answer_a_request_sent_to_another() {
    // A member's event stream cannot answer another id (its events are rewritten); nor may its
    // JSON answer: a client matches answers by id, so a member that answers with the id of a
    // request the client sent to another member would answer that one.
    let py = PyServer::start(true);
    // Answers every request with id 1.
    let liar = FakeUpstream::start(Misbehave::Raw(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 36\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}",
    ));
    // Answers with id 1 and then id 9: read last-first it answers request 9, first-first 1.
    const TWICE: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 43\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{},\"id\":9}";
    let twice = FakeUpstream::start(Misbehave::Raw(TWICE));
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwliar");
    let config = format!(
        r#"{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[upstreams]]
name = "py"
url = "{py}"
[[upstreams]]
name = "liar"
url = "{liar}"
era = "stateless"
[[upstreams]]
name = "twice"
url = "{twice}"
era = "stateless"
[[routes]]
path = "/fed"
federate = [{{ upstream = "py", prefix = "p_" }}, {{ upstream = "liar", prefix = "l_" }}, {{ upstream = "twice", prefix = "t_" }}]
"#,
        header = integration_tests::daemon::local_header(&instance, 2, port, admin),
        py = py.url(),
        liar = liar.url(),
        twice = twice.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let call = |id: u64, tool: &str, args: Value| {
        raw(port, &post_call_2026("/fed", id, tool, &args, "")).0
    };
    // The honest member's JSON answer passes.
    let r = call(5, "p_add", json!({"a": 2, "b": 3}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["id"], 5, "{r:?}");
    assert_eq!(
        r.json()["result"]["structuredContent"]["result"],
        5,
        "{r:?}"
    );
    // The liar's answer to request 7 names request 1: refused whole, never relayed.
    let r = call(7, "l_anything", json!({}));
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.json()["id"], 7, "{r:?}");
    assert!(r.json()["error"]["message"].as_str().is_some(), "{r:?}");
    // Asked as request 1, its answer is that request's.
    let r = call(1, "l_anything", json!({}));
    assert_eq!((r.status, r.json()["id"].clone()), (200, json!(1)), "{r:?}");
    // An answer that names its id twice has no one meaning: refused, whichever copy is right.
    let r = call(9, "t_anything", json!({}));
    assert_eq!((r.status, r.json()["id"].clone()), (502, json!(9)), "{r:?}");
    d.stop();
}

/// A gateway in front of the fixture's `--slow` server as a session-era upstream whose
/// 2026-07-28 clients are served over a held session (`/held`), and of a stateless-only one
/// whose session-era clients are bridged (`/modern`): both paths on which the gateway reads
/// the answer whole for its client. Breakers open after `failures` failures.
fn held_and_bridged(
    held: &PyServer,
    modern: &PyServer,
    instance: &str,
    failures: u32,
) -> (Daemon, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "{}default_tenant = \"public\"\n[[tenants]]\nname = \"public\"\nid = 0\n\
         [[upstreams]]\nname = \"held\"\nurl = \"{}\"\nera = \"session\"\n\
         response_timeout_ms = 1500\n\
         breaker = {{ consecutive_failures = {failures}, open_ms = 60000 }}\n\
         [[upstreams]]\nname = \"modern\"\nurl = \"{}\"\n\
         breaker = {{ consecutive_failures = {failures}, open_ms = 60000 }}\n\
         [[routes]]\npath = \"/held\"\nupstream = \"held\"\n\
         [[routes]]\npath = \"/modern\"\nupstream = \"modern\"\n",
        integration_tests::daemon::local_header(instance, 1, port, admin),
        held.url(),
        modern.url(),
    );
    (Daemon::start_local(instance, &config), port, admin)
}

/// An `add` whose sum no JSON reader of the gateway takes: the fixture's server reads the
/// strings as integers and answers with a 401-digit number.
fn huge_add() -> Value {
    json!({"a": format!("1{}", "0".repeat(400)), "b": "1"})
}

/// An answer the gateway cannot read, on the paths where it reads answers whole, is the
/// call's own failure, as it is on passthrough: a tool's output can be shaped by its caller,
/// and two such calls opened the upstream's shared breaker for every tenant.
#[test]
fn an_answer_read_whole_that_the_gateway_cannot_read_opens_the_tools_breaker_only() {
    let held = PyServer::start_with(&["--slow"]);
    let modern = PyServer::start_with(&["--stateless-only"]);
    let instance = unique("gwheldread");
    let (mut d, port, admin) = held_and_bridged(&held, &modern, &instance, 2);
    for id in 0..2 {
        let r = raw(port, &post_call_2026("/held", id, "add", &huge_add(), "")).0;
        assert_eq!(r.status, 502, "held: {r:?}");
    }
    integration_tests::peers::wait_breaker_open(admin, "held/add@");
    let r = raw(
        port,
        &post_call_2026("/held", 7, "echo", &json!({"text": "hi"}), ""),
    )
    .0;
    assert_eq!(
        r.status, 200,
        "held: the upstream's breaker stayed closed: {r:?}"
    );
    let session = open_session(port, "/modern", "2025-11-25");
    let call = |id: u32, tool: &str, args: &Value| {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": tool, "arguments": args}})
        .to_string();
        raw(port, &post("/modern", &body, &session)).0
    };
    for id in 0..2 {
        let r = call(id, "add", &huge_add());
        assert_eq!(r.status, 502, "bridged: {r:?}");
    }
    integration_tests::peers::wait_breaker_open(admin, "modern/add@");
    let r = call(7, "echo", &json!({"text": "hi"}));
    assert_eq!(
        r.status, 200,
        "bridged: the upstream's breaker stayed closed: {r:?}"
    );
    d.stop();
}

/// A held session is opened once for all its tenant's callers, so it is opened with what the
/// gateway accepts, not with what its first caller does: the Python SDK's server answers an
/// `initialize` that accepts JSON alone with 406, and one caller's two calls with
/// `Accept: application/json` failed the session for all, and opened the upstream's breaker.
#[test]
fn a_held_session_is_opened_with_the_gateways_accept_whatever_its_caller_accepts() {
    let held = PyServer::start_with(&["--slow"]);
    let modern = PyServer::start_with(&["--stateless-only"]);
    let instance = unique("gwheldaccept");
    let (mut d, port, _) = held_and_bridged(&held, &modern, &instance, 2);
    for id in 0..2 {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "json only"}, "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}})
        .to_string();
        let request = format!(
            "POST /held HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
             accept: application/json\r\nmcp-protocol-version: 2026-07-28\r\n\
             mcp-method: tools/call\r\nmcp-name: echo\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let r = raw(port, request.as_bytes()).0;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.json()["result"]["content"][0]["text"],
            "json only",
            "{r:?}"
        );
    }
    d.stop();
}

/// A call on a held session that times out is cancelled there before its concurrency slot is
/// given back (docs/security.md §6): the session is the gateway's, not the caller's, so
/// nothing else ends the call, and a tenant capped at one call at a time kept one more
/// running at the upstream every `response_timeout_ms`.
#[test]
fn a_held_call_that_times_out_is_cancelled_in_its_session() {
    let held = PyServer::start_with(&["--slow"]);
    let modern = PyServer::start_with(&["--stateless-only"]);
    let instance = unique("gwheldcancel");
    // Breakers out of the way: three timeouts in a row.
    let (mut d, port, _) = held_and_bridged(&held, &modern, &instance, 10);
    for id in 0..3 {
        let r = raw(
            port,
            &post_call_2026("/held", id, "sleep", &json!({"seconds": 60}), ""),
        )
        .0;
        assert_eq!(r.status, 504, "{r:?}");
    }
    // The server ends a cancelled call as it reads the notification.
    until_held_calls_running(port, 0, "calls still running at the upstream");
    d.stop();
}

/// How many calls the fixture server behind `/held` runs now (its `calls_running` tool).
fn held_calls_running(port: u16) -> Value {
    let r = raw(
        port,
        &post_call_2026("/held", 9, "calls_running", &json!({}), ""),
    )
    .0;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["result"]["structuredContent"]["result"].clone()
}

/// Waits (at most 5 s) until the fixture server behind `/held` runs `n` calls; panics with
/// `what` if it never does.
fn until_held_calls_running(port: u16, n: i64, what: &str) {
    let seen = (0..50).any(|_| {
        if held_calls_running(port) == json!(n) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        false
    });
    assert!(seen, "{what}: {} running", held_calls_running(port));
}

/// A call on a held session whose client leaves (or is cut for a ban) is cancelled there at
/// once: the session is the gateway's, so the client's going ends nothing by itself. Before,
/// the call ran on at the upstream until it ended or the response timeout came (30 s here).
#[test]
fn a_held_call_whose_client_leaves_is_cancelled_in_its_session() {
    let held = PyServer::start_with(&["--slow"]);
    let instance = unique("gwheldleave");
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "{}default_tenant = \"public\"\n[[tenants]]\nname = \"public\"\nid = 0\n\
         [[upstreams]]\nname = \"held\"\nurl = \"{}\"\nera = \"session\"\n\
         response_timeout_ms = 30000\n\
         [[routes]]\npath = \"/held\"\nupstream = \"held\"\n",
        integration_tests::daemon::local_header(&instance, 1, port, admin),
        held.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let until = |n, what| until_held_calls_running(port, n, what);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(
        &mut client,
        &post_call_2026("/held", 1, "sleep", &json!({"seconds": 60}), ""),
    )
    .unwrap();
    until(1, "the call did not start");
    drop(client);
    until(0, "the call of a client that left runs on at the upstream");
    // A client that sends its next request before leaving: the bytes waiting hid the close.
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let call = post_call_2026("/held", 2, "sleep", &json!({"seconds": 60}), "");
    std::io::Write::write_all(&mut client, &call).unwrap();
    until(1, "the second call did not start");
    std::io::Write::write_all(&mut client, &call).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    drop(client);
    until(
        0,
        "the call of a client that pipelined its next request and left runs on at the upstream",
    );
    d.stop();
}

/// A gateway (one worker) whose route `/mcp` goes to `up`, a session-era upstream held for
/// stateless clients, with `upstream_extra` lines in its `[[upstreams]]` table: the daemon,
/// its port and its admin port.
fn session_era_gateway(
    up: &FakeUpstream,
    instance: &str,
    upstream_extra: &str,
) -> (Daemon, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let instance = unique(instance);
    let config = format!(
        "{}default_tenant = \"public\"\n[[tenants]]\nname = \"public\"\nid = 0\n\
         [[upstreams]]\nname = \"u0\"\nurl = \"{}\"\nera = \"session\"\n{upstream_extra}\
         [[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n",
        integration_tests::daemon::local_header(&instance, 1, port, admin),
        up.url(),
    );
    (Daemon::start_local(&instance, &config), port, admin)
}

/// A held call answered with a bare 404 (once more after a new session) or a 3xx is an
/// answer to that call, as on passthrough, and no sign of the upstream's health: two such
/// calls opened a held upstream's shared breaker for every tenant.
#[test]
fn a_held_call_answered_404_or_302_opens_the_tools_breaker_only() {
    let up = FakeUpstream::start(Misbehave::SessionEra);
    let (mut d, port, admin) = session_era_gateway(
        &up,
        "gwheldstatus",
        "breaker = { consecutive_failures = 2, open_ms = 60000 }\n",
    );
    for tool in ["moved", "gone"] {
        for id in 0..2 {
            let r = raw(port, &post_call_2026("/mcp", id, tool, &json!({}), "")).0;
            assert_eq!(r.status, 502, "{tool}: {r:?}");
        }
        integration_tests::peers::wait_breaker_open(admin, &format!("u0/{tool}@"));
        let r = raw(port, &post_call_2026("/mcp", 7, "other", &json!({}), "")).0;
        assert_eq!(
            r.status, 200,
            "after {tool}: the upstream's breaker stayed closed: {r:?}"
        );
    }
    d.stop();
}

/// A tenant's held session is shared by all its callers, so it is opened with none of the
/// first caller's headers or query (docs/security.md §4): the upstream could take what came
/// with `initialize` (a user, a flag, a trace) as the session's, for every caller after. Each
/// call still carries its own caller's.
#[test]
fn a_tenants_held_session_is_opened_with_none_of_its_first_callers_headers() {
    let up = FakeUpstream::start(Misbehave::SessionEra);
    let (mut d, port, _) = session_era_gateway(&up, "gwheldopener", "");
    for (id, who) in [(1, "alice"), (2, "bob")] {
        let extra = format!("x-user: {who}\r\nuser-agent: {who}-agent/1\r\n");
        let path = format!("/mcp?as={who}");
        let r = raw(port, &post_call_2026(&path, id, "echo", &json!({}), &extra)).0;
        assert_eq!(r.status, 200, "{who}: {r:?}");
    }
    let heads = up.seen.lock().unwrap().clone();
    // initialize, notifications/initialized, alice's call, bob's call: one session.
    assert_eq!(heads.len(), 4, "{heads:#?}");
    assert!(!heads[0].contains("mcp-session-id"), "{heads:#?}");
    for opening in &heads[..2] {
        assert!(
            !opening.contains("alice") && opening.starts_with("POST /mcp HTTP/1.1\r\n"),
            "the session was opened with its first caller's request: {opening}"
        );
    }
    for (head, who, other) in [(&heads[2], "alice", "bob"), (&heads[3], "bob", "alice")] {
        assert!(
            head.contains(&format!("x-user: {who}\r\n"))
                && head.contains(&format!("?as={who} "))
                && !head.contains(other),
            "{head}"
        );
    }
    d.stop();
}

/// What the resume scripts share: an event-stream reader and a session opener (`url` is the
/// script's own, read from its arguments before either runs).
macro_rules! resume_prelude {
    () => {
        r#"
import json, random, sys
import httpx2 as httpx

version = "2025-11-25"
accept = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

def events(response):
    event_id, data = None, []
    for line in response.iter_lines():
        if line == "":
            if "".join(data):
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())

def open_session(http, key):
    init = http.post(url, headers={**accept, "x-api-key": key}, json={
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {},
                   "clientInfo": {"name": "resume", "version": "1"}}})
    init.raise_for_status()
    h = {**accept, "x-api-key": key, "Mcp-Session-Id": init.headers["mcp-session-id"],
         "MCP-Protocol-Version": version}
    http.post(url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return h
"#
    };
}

/// Resumes `url`'s streams as two callers (API keys `argv[2]` and `argv[3]`): the first calls
/// `argv[4]` (`count_with_progress`), answered as an event stream, and reads it whole; then the second resumes from the
/// first's event id (as the first got it, and as the upstream's own, which the fixture's store
/// makes guessable: `<request id>_<n>`), and the first resumes from it too.
const RESUME_AS_ANOTHER: &str = concat!(
    resume_prelude!(),
    r#"
url, key_a, key_b, tool = sys.argv[1:5]

def resume(http, h, last):
    out = {"progress": [], "result": None}
    with http.stream("GET", url, headers={**h, "Accept": "text/event-stream", "Last-Event-ID": last},
                     timeout=3) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            r.read()
            out["body"] = r.text
            return out
        try:
            for _, data in events(r):
                msg = json.loads(data)
                if msg.get("method") == "notifications/progress":
                    out["progress"].append(msg["params"]["progress"])
                if "result" in msg:
                    out["result"] = msg["result"]
                    break
        except httpx.ReadTimeout:
            pass
    return out

with httpx.Client(timeout=20) as http:
    a = open_session(http, key_a)
    b = open_session(http, key_b)
    call_id = random.randrange(1 << 30)
    call = {"jsonrpc": "2.0", "id": call_id, "method": "tools/call",
            "params": {"name": tool, "arguments": {"steps": 4},
                       "_meta": {"progressToken": "p"}}}
    ids = []
    with http.stream("POST", url, headers=a, json=call) as r:
        for event_id, _ in events(r):
            ids.append(event_id)
    first = ids[0]
    print(json.dumps({
        "ids": ids,
        "another_with_its_id": resume(http, b, first),
        "another_with_the_upstreams_id": resume(http, b, first.rsplit(".", 1)[0]),
        "its_own": resume(http, a, first),
    }))
"#
);

#[test]
fn a_caller_resumes_only_from_the_event_ids_it_was_given() {
    // The Python SDK's session manager gives every session one event store, and a store that
    // finds an event by its id alone replays that event's stream on whatever session asks:
    // another caller's answers, on its own session, for the id.
    let py = PyServer::start_with(&["--resumable"]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwresumeid");
    let config = format!(
        r#"{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
[[tenants]]
name = "beta"
id = 2
[[auth.api_keys]]
sha256 = "{acme}"
tenant = "acme"
[[auth.api_keys]]
sha256 = "{beta}"
tenant = "beta"
[[upstreams]]
name = "u0"
url = "{py}"
[[routes]]
path = "/mcp"
upstream = "u0"
auth = ["api_key"]
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "p_" }}]
auth = ["api_key"]
"#,
        header = integration_tests::daemon::local_header(&instance, 2, port, admin),
        acme = sha256_hex(ACME_KEY),
        beta = sha256_hex(BETA_KEY),
        py = py.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    for (path, tool) in [
        ("/mcp", "count_with_progress"),
        ("/fed", "p_count_with_progress"),
    ] {
        let url = format!("http://127.0.0.1:{port}{path}");
        let r = integration_tests::peers::py_script(
            RESUME_AS_ANOTHER,
            &[&url, ACME_KEY, BETA_KEY, tool],
        );
        for tried in ["another_with_its_id", "another_with_the_upstreams_id"] {
            let got = &r[tried];
            assert_eq!(
                got["status"], 400,
                "{path}, {tried}: beta read acme's stream on its own session: {r}"
            );
            let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], -32600, "{path}: {r}");
        }
        // The caller the stream was sent to resumes it: what came after its first event.
        let own = &r["its_own"];
        assert_eq!(own["status"], 200, "{path}: {r}");
        assert_eq!(
            own["result"]["content"][0]["text"], "counted 4",
            "{path}: {r}"
        );
        assert!(
            !own["progress"].as_array().unwrap().contains(&json!(1)),
            "{path}: replayed from after the first event: {r}"
        );
    }
    d.stop();
}

/// One caller (API key `argv[2]`) calls `argv[3]` (`count_with_progress`) as request `n`,
/// answered as an event stream, then lists the tools with the same id `n` (answered filtered,
/// as JSON), then resumes the call's stream from its first event and reads all it replays.
const RESUME_AFTER_A_LIST: &str = concat!(
    resume_prelude!(),
    r#"
url, key, tool = sys.argv[1:4]

with httpx.Client(timeout=20) as http:
    h = open_session(http, key)
    n = random.randrange(2, 1 << 30)
    ids = []
    with http.stream("POST", url, headers=h, json={
            "jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": tool, "arguments": {"steps": 2},
                       "_meta": {"progressToken": "p"}}}) as r:
        for event_id, _ in events(r):
            ids.append(event_id)
    listed = http.post(url, headers=h, json={"jsonrpc": "2.0", "id": n, "method": "tools/list"})
    replayed = []
    with http.stream("GET", url, headers={**h, "Accept": "text/event-stream",
                                          "Last-Event-ID": ids[0]}, timeout=1.5) as r:
        status = r.status_code
        try:
            for _, data in events(r):
                replayed.append(json.loads(data))
        except httpx.ReadTimeout:
            pass
    print(json.dumps({"n": n, "listed": listed.json(), "status": status, "replayed": replayed}))
"#
);

#[test]
fn a_resume_replays_no_answer_the_gateway_read_whole_and_filtered() {
    // The Python SDK's event store files a request's stream by its id alone. A `tools/list` the
    // gateway filters went to the upstream under the client's id, so its unfiltered answer was
    // filed with the client's earlier call of the same id, and a resume of the call's stream
    // replayed it: the tenant's hidden tools, definitions and all (an attacker's review). Such
    // a request now goes under an id of the gateway's.
    let py = PyServer::start_with(&["--resumable"]);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwresumelist");
    let config = format!(
        r#"{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
[[tenants.policy.tools]]
match = "add"
action = "deny"
[[tenants.policy.tools]]
match = "p_add"
action = "deny"
[[auth.api_keys]]
sha256 = "{acme}"
tenant = "acme"
[[upstreams]]
name = "u0"
url = "{py}"
[[routes]]
path = "/mcp"
upstream = "u0"
auth = ["api_key"]
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "p_" }}]
auth = ["api_key"]
"#,
        header = integration_tests::daemon::local_header(&instance, 2, port, admin),
        acme = sha256_hex(ACME_KEY),
        py = py.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    for (path, tool, hidden) in [
        ("/mcp", "count_with_progress", "add"),
        ("/fed", "p_count_with_progress", "p_add"),
    ] {
        let url = format!("http://127.0.0.1:{port}{path}");
        let r = integration_tests::peers::py_script(RESUME_AFTER_A_LIST, &[&url, ACME_KEY, tool]);
        // The list reached the client filtered, with its own id.
        let listed = &r["listed"];
        assert_eq!(listed["id"], r["n"], "{path}: {r}");
        let names: Vec<&str> = listed["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: a list: {r}"))
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert!(
            names.contains(&tool) && !names.contains(&hidden),
            "{path}: {r}"
        );
        // The resume replays the call's answer, and nothing of the list.
        assert_eq!(r["status"], 200, "{path}: {r}");
        let replayed = r["replayed"].as_array().unwrap();
        assert!(
            replayed
                .iter()
                .any(|m| m["result"]["content"][0]["text"] == "counted 2"),
            "{path}: the call's answer replayed: {r}"
        );
        assert!(
            !replayed.iter().any(|m| m["result"].get("tools").is_some()),
            "{path}: a list replayed on the call's stream: {r}"
        );
    }
    d.stop();
}

#[test]
fn a_passthrough_event_stream_with_a_length_reaches_the_client_whole() {
    // Its event ids are signed on the way, so it is longer than the upstream said: relayed
    // with the upstream's length, the client lost the end of the answer (the result) and read
    // it as the start of the next response on the connection (from an attacker's review).
    let fake = FakeUpstream::start(Misbehave::Raw(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 94\r\n\r\n\
         id: e1\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"RESULT\"}]}}\n\n",
    ));
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwsselen");
    let config = format!(
        "{}[[upstreams]]\nname = \"up\"\nurl = \"{}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"up\"\n",
        integration_tests::daemon::local_header(&instance, 1, port, admin),
        fake.url()
    );
    let mut d = Daemon::start_local(&instance, &config);
    let call =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{}}}"#;
    let request = post("/mcp", call, "mcp-protocol-version: 2025-11-25\r\n");
    let (r, mut s) = raw(port, &request);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{body}");
    assert!(
        body.starts_with("id: e1.") && body.ends_with("\"RESULT\"}]}}\n\n"),
        "the whole stream, its id signed: {r:?}"
    );
    // The connection carries the next answer cleanly.
    std::io::Write::write_all(&mut s, &request).unwrap();
    let next = integration_tests::peers::read_response(&mut s).expect("a second answer");
    assert_eq!(next.status, 200, "{next:?}");
    assert!(
        String::from_utf8_lossy(&next.body).contains("RESULT"),
        "{next:?}"
    );
    d.stop();
}

/// A GET (the server's stream) and a DELETE (a session's end) carry no message, and are held to
/// the rate of what settles a session (ten times the tenant's, at least 100 a second): before,
/// none was counted, and a tenant of one request a second had every GET and DELETE forwarded
/// (100 GETs in 0.04 s, each to every member of a federation: an attacker's review).
#[test]
fn gets_and_deletes_are_held_to_a_rate() {
    let fake = FakeUpstream::start(Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwgets");
    let config = format!(
        r#"{head}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "slow"
id = 1
[tenants.policy]
requests_per_sec = 1
[[auth.api_keys]]
sha256 = "{slow}"
tenant = "slow"
[[upstreams]]
name = "fake"
url = "{fake}"
[[routes]]
path = "/fake"
upstream = "fake"
auth = ["api_key"]
"#,
        head = integration_tests::daemon::local_header(&instance, 2, port, admin),
        slow = sha256_hex(ACME_KEY),
        fake = fake.url(),
    );
    let _daemon = Daemon::start_local(&instance, &config);
    let start = std::time::Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..300 {
        let method = if i % 2 == 0 { "GET" } else { "DELETE" };
        let request = format!(
            "{method} /fake HTTP/1.1\r\nhost: gw\r\naccept: application/json, text/event-stream\r\n{}mcp-protocol-version: 2025-06-18\r\n\r\n",
            key(ACME_KEY)
        );
        let (r, _) = raw(port, request.as_bytes());
        *statuses.entry(r.status).or_insert(0) += 1;
    }
    let took = start.elapsed().as_secs_f64();
    let reached = fake.seen.lock().unwrap().len();
    // 100 at once, and 100 a second after them.
    let most = 100 + (100.0 * took).ceil() as usize + 1;
    assert!(
        reached <= most && statuses.get(&429).copied().unwrap_or(0) >= 300 - most,
        "{reached} reached the upstream in {took:.2} s (at most {most}): {statuses:?}"
    );
    assert!(reached >= 100, "{reached}: {statuses:?}");
}

/// A session-era request that carries the 2026-07-28 envelope's version claim is refused and
/// never forwarded: it has two meanings (the TypeScript SDK's server reads any claim as the
/// stateless era and refuses it as a stateless-only server would, from which the gateway
/// learnt that the upstream spoke that era only, and bridged every tenant's session-era
/// clients to it for five minutes: an attacker's review). In a batch too.
#[test]
fn a_session_era_request_with_the_stateless_envelopes_claim_is_refused() {
    let s = setup();
    let claim = |version: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":2,"method":"prompts/list","params":{{"_meta":{{"io.modelcontextprotocol/protocolVersion":{version},"io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
        )
    };
    for (headers, body) in [
        (
            "mcp-protocol-version: 2025-11-25\r\n",
            claim("\"2025-11-25\""),
        ),
        ("", claim("\"2025-06-18\"")),
        ("", claim("1")),
        (
            "mcp-protocol-version: 2025-03-26\r\n",
            format!("[{}]", claim("\"2025-03-26\"")),
        ),
    ] {
        let (r, _) = raw(
            s.port,
            &post("/fake", &body, &format!("{}{headers}", key(ACME_KEY))),
        );
        assert_eq!((r.status, code(&r)), (400, Some(-32600)), "{body}: {r:?}");
    }
    assert_eq!(reached(&s), 0, "the upstream saw none of them");
    // Without the claim, it goes.
    let (r, _) = raw(
        s.port,
        &post(
            "/fake",
            r#"{"jsonrpc":"2.0","id":2,"method":"prompts/list"}"#,
            &format!("{}mcp-protocol-version: 2025-11-25\r\n", key(ACME_KEY)),
        ),
    );
    assert_eq!(r.status, 200, "{r:?}");
}
