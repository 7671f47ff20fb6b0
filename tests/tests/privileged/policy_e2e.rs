//! Tool policy end to end on loopback: the Python SDK's client through the gateway to the Python
//! SDK's server, with API-key and JWT tenants (ES256 and RS256 tokens minted by PyJWT), tool
//! rules, argument rules, budgets, the loop breaker, the audit log, and 401 with the RFC 9728
//! document.

use serde_json::{Value, json};

use integration_tests::{
    daemon::{Daemon, local_header},
    peers::{
        FakeUpstream, Misbehave, PyServer, approve_pin, approve_request, free_port, post,
        py_policy_client, py_script, raw,
    },
    unique,
};

const ACME_KEY: &str = "acme-secret-key-0123456789";

fn sha256_hex(s: &str) -> String {
    py_script(
        "import hashlib, json, sys; print(json.dumps(hashlib.sha256(sys.argv[1].encode()).hexdigest()))",
        &[s],
    )
    .as_str()
    .unwrap()
    .to_owned()
}

/// Writes a JWKS with an ES256 and an RS256 key to `path`; returns a token of each, for tenant
/// `beta` (agents `agent-es` and `agent-rs`), and an expired one.
fn mint(path: &std::path::Path) -> Value {
    py_script(
        r#"
import json, sys, time, jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
es = ec.generate_private_key(ec.SECP256R1())
rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
k1 = json.loads(ECAlgorithm.to_jwk(es.public_key())); k1.update(kid="es", alg="ES256", use="sig")
k2 = json.loads(RSAAlgorithm.to_jwk(rs.public_key())); k2.update(kid="rs", alg="RS256", use="sig")
open(sys.argv[1], "w").write(json.dumps({"keys": [k1, k2]}))
now = int(time.time())
claims = lambda sub, exp: {"iss": "https://idp.test", "aud": "mcp-gw", "exp": exp, "nbf": now - 5, "tenant": "beta", "sub": sub}
print(json.dumps({
  "es": jwt.encode(claims("agent-es", now + 600), es, algorithm="ES256", headers={"kid": "es"}),
  "rs": jwt.encode(claims("agent-rs", now + 600), rs, algorithm="RS256", headers={"kid": "rs"}),
  "expired": jwt.encode(claims("agent-es", now - 600), es, algorithm="ES256", headers={"kid": "es"}),
}))
"#,
        &[path.to_str().unwrap()],
    )
}

struct Setup {
    daemon: Daemon,
    port: u16,
    admin: u16,
    tokens: Value,
    audit: std::path::PathBuf,
    _upstream: PyServer,
    dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.daemon.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup() -> Setup {
    let upstream = PyServer::start(false);
    let dir = std::env::temp_dir().join(unique("policy"));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    let tokens = mint(&jwks);
    let audit = dir.join("audit.jsonl");
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwpol");
    let config = format!(
        r#"
{header}default_tenant = "public"
[audit]
path = "{audit}"

[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
# acme may not add, and echoes at most 10 characters.
[[tenants.policy.tools]]
match = "add"
action = "deny"
[[tenants.policy.tools]]
match = "u0/echo"
[[tenants.policy.tools.arguments]]
pointer = "/text"
type = "string"
max_length = 10
# ... and reads no resources.
[[tenants.policy.methods]]
match = "resources/read"
action = "deny"

[[tenants]]
name = "beta"
id = 2
[tenants.policy]
budget = {{ window_s = 3600, agent = 4 }}
loop_breaker = {{ max_repeats = 2, window_s = 60 }}
[[tenants.policy.tools]]
match = "add"
cost = 2

# Every tenant: no `fail` tool.
[[policy.tools]]
match = "fail"
action = "deny"

[[auth.api_keys]]
sha256 = "{acme_sha}"
tenant = "acme"
agent = "acme-bot"
[auth.jwt]
jwks_file = "{jwks}"
issuer = "https://idp.test"
audience = "mcp-gw"
[auth.resource_metadata]
authorization_servers = ["https://idp.test"]

[[upstreams]]
name = "u0"
url = "{url}"
[[routes]]
path = "/mcp"
upstream = "u0"
auth = ["api_key", "jwt"]
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "p_" }}]
auth = ["api_key", "jwt"]
"#,
        header = local_header(&instance, 2, port, admin),
        audit = audit.display(),
        acme_sha = sha256_hex(ACME_KEY),
        jwks = jwks.display(),
        url = upstream.url(),
    );
    let daemon = Daemon::start_local(&instance, &config);
    Setup {
        daemon,
        port,
        admin,
        tokens,
        audit,
        _upstream: upstream,
        dir,
    }
}

fn error_code(call: &Value) -> i64 {
    call["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {call}"))
}

#[test]
fn tenants_see_and_call_what_their_rules_allow_by_api_key_and_jwt_in_both_eras() {
    let s = setup();
    let url = format!("http://127.0.0.1:{}/mcp", s.port);
    let acme = json!({ "X-API-Key": ACME_KEY });
    let beta = json!({ "Authorization": format!("Bearer {}", s.tokens["es"].as_str().unwrap()) });
    let calls = json!([
        ["echo", {"text": "short"}],
        ["echo", {"text": "far too long for acme"}],
        ["add", {"a": 1, "b": 2}],
        ["fail", {"reason": "x"}],
    ]);
    for mode in ["legacy", "2026-07-28"] {
        let a = py_policy_client(&url, mode, &acme, &calls);
        assert_eq!(
            a["tools"],
            json!(["ask_model", "ask_user", "count_with_progress", "echo"]),
            "{mode}: acme sees neither add nor fail: {a}"
        );
        let c = &a["calls"];
        assert_eq!(c[0]["text"], "short", "{mode}: {a}");
        assert_eq!(error_code(&c[1]), -32041);
        assert_eq!(
            c[1]["error"]["data"]["rule"],
            "tenants[acme].policy.tools[1].arguments[0]"
        );
        assert!(
            c[1]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("the maximum is 10"),
            "{a}"
        );
        assert_eq!(
            c[2]["error"]["data"]["rule"],
            "tenants[acme].policy.tools[0]"
        );
        assert_eq!(c[3]["error"]["data"]["rule"], "policy.tools[0]");

        let b = py_policy_client(
            &url,
            mode,
            &beta,
            &json!([["echo", {"text": format!("long enough for beta {mode}")}]]),
        );
        assert_eq!(
            b["tools"],
            json!([
                "add",
                "ask_model",
                "ask_user",
                "count_with_progress",
                "echo"
            ]),
            "{mode}: beta (JWT) sees add: {b}"
        );
        assert_eq!(
            b["calls"][0]["text"],
            format!("long enough for beta {mode}")
        );
    }
    // The RS256 token is another agent of the same tenant; the expired token is refused.
    let rs = json!({ "Authorization": format!("Bearer {}", s.tokens["rs"].as_str().unwrap()) });
    let r = py_policy_client(&url, "legacy", &rs, &json!([["add", {"a": 2, "b": 3}]]));
    assert_eq!(r["calls"][0]["text"], "5", "{r}");
    let expired =
        json!({ "Authorization": format!("Bearer {}", s.tokens["expired"].as_str().unwrap()) });
    let r = py_policy_client(&url, "legacy", &expired, &json!([]));
    assert_eq!(r["connect_code"], -32040, "{r}");
    // Federation: the same rules on the members' own names, shown under the prefix.
    let fed = format!("http://127.0.0.1:{}/fed", s.port);
    let f = py_policy_client(
        &fed,
        "legacy",
        &acme,
        &json!([["p_add", {"a": 1, "b": 1}], ["p_echo", {"text": "ok"}]]),
    );
    assert_eq!(
        f["tools"],
        json!([
            "p_ask_model",
            "p_ask_user",
            "p_count_with_progress",
            "p_echo"
        ]),
        "{f}"
    );
    assert_eq!(
        f["calls"][0]["error"]["data"]["rule"],
        "tenants[acme].policy.tools[0]"
    );
    assert_eq!(f["calls"][1]["text"], "ok");
}

#[test]
fn budgets_run_out_loops_are_broken_and_every_decision_is_audited() {
    let s = setup();
    let url = format!("http://127.0.0.1:{}/mcp", s.port);
    let beta = json!({ "Authorization": format!("Bearer {}", s.tokens["es"].as_str().unwrap()) });
    // Budget: 4 units per agent per hour; add costs 2, echo 1.
    // Loop breaker: the same call at most twice a minute.
    let r = py_policy_client(
        &url,
        "2026-07-28",
        &beta,
        &json!([
            ["echo", {"text": "same"}],
            ["echo", {"text": "same"}],
            ["echo", {"text": "same"}],
            ["add", {"a": 1, "b": 1}],
            ["add", {"a": 2, "b": 2}],
        ]),
    );
    let c = &r["calls"];
    assert_eq!(c[0]["text"], "same", "{r}");
    assert_eq!(c[1]["text"], "same", "{r}");
    assert_eq!(
        error_code(&c[2]),
        -32044,
        "the third identical call is a loop: {r}"
    );
    assert!(
        c[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("loop detected"),
        "{r}"
    );
    // 2 of 4 spent on the echoes; add (2) fits, the next add does not.
    assert_eq!(c[3]["text"], "2", "{r}");
    assert_eq!(error_code(&c[4]), -32043, "{r}");
    assert_eq!(
        c[4]["error"]["data"]["rule"],
        "tenants[beta].policy.budget.agent"
    );
    assert_eq!(
        c[4]["error"]["data"]["budgetRemaining"],
        json!({"agent": 0})
    );
    assert!(c[4]["error"]["data"]["retryAfterMs"].as_u64().unwrap() > 0);

    // The remaining budget is visible to the caller on each allowed answer (another agent).
    let token = s.tokens["rs"].as_str().unwrap();
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"b"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let headers = format!(
        "authorization: Bearer {token}\r\nmcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: echo\r\n"
    );
    let (resp, _) = raw(s.port, &post("/mcp", call, &headers));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("mcp-gateway-budget-remaining"), Some("agent=3"));

    // Unauthenticated: 401 naming the metadata document, which is served.
    let (resp, _) = raw(
        s.port,
        &post("/mcp", call, "mcp-protocol-version: 2026-07-28\r\n"),
    );
    assert_eq!(resp.status, 401);
    let www = resp.header("www-authenticate").unwrap().to_owned();
    // (The raw client sends `host: gw`.)
    assert_eq!(
        www,
        "Bearer resource_metadata=\"http://gw/.well-known/oauth-protected-resource/mcp\""
    );
    assert_eq!(resp.json()["error"]["code"], -32040);
    let (resp, _) = raw(
        s.port,
        b"GET /.well-known/oauth-protected-resource/mcp HTTP/1.1\r\nhost: gw.test\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json(),
        json!({
            "resource": "http://gw.test/mcp",
            "authorization_servers": ["https://idp.test"],
            "bearer_methods_supported": ["header"],
        })
    );

    // The audit log has one line per decision, with the rule of each refusal.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let lines: Vec<Value> = std::fs::read_to_string(&s.audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let calls: Vec<&Value> = lines
        .iter()
        .filter(|l| l["method"] == "tools/call")
        .collect();
    // (The unauthenticated request is refused before its body is read: method `other`.)
    let refused: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["decision"] == "refused")
        .map(|l| {
            (
                l["rule"].as_str().unwrap(),
                l["agent"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            ("tenants[beta].policy.loop_breaker", "agent-es"),
            ("tenants[beta].policy.budget.agent", "agent-es"),
            ("routes[/mcp].auth", "-"),
        ],
        "{lines:?}"
    );
    let allowed = calls.iter().filter(|l| l["decision"] == "allowed").count();
    assert_eq!(
        allowed, 4,
        "3 calls of agent-es and 1 of agent-rs: {lines:?}"
    );
    // Refusals by rule in /metrics.
    let (metrics, _) = raw(s.admin, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "mcp_gateway_refusals_total{rule=\"tenants[beta].policy.loop_breaker\"} 1",
        "mcp_gateway_refusals_total{rule=\"tenants[beta].policy.budget.agent\"} 1",
        "mcp_gateway_refusals_total{rule=\"routes[/mcp].auth\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    let last_allowed = calls.iter().rfind(|l| l["decision"] == "allowed").unwrap();
    assert_eq!(last_allowed["tenant"], "beta");
    assert_eq!(last_allowed["budget_left"], "agent=3");
    assert_eq!(last_allowed["upstream"], "u0");
    assert_eq!(last_allowed["outcome"], "ok");
}

/// What every gateway of these tests has: two workers on loopback, the kernel program off. The
/// `[kernel]` table comes last, so that a caller may go on with its keys.
/// A method rule covers what tool rules do not: acme reads no resource, on a passthrough or a
/// federated route, in either era; beta, without the rule, reads it.
#[test]
fn a_method_rule_refuses_resource_reads_that_tool_rules_cannot_name() {
    let s = setup();
    let beta = format!("Bearer {}", s.tokens["es"].as_str().unwrap());
    let read = |path: &str, credential: &str, modern: bool| -> (u16, Value) {
        let mut params = json!({"uri": "fixture://greeting"});
        let mut extra = format!("{credential}\r\n");
        if modern {
            params["_meta"] = json!({
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}});
            extra.push_str("mcp-protocol-version: 2026-07-28\r\nmcp-method: resources/read\r\nmcp-name: fixture://greeting\r\n");
        } else {
            extra.push_str("mcp-protocol-version: 2025-11-25\r\n");
        }
        let body = json!({"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": params})
            .to_string();
        let (r, _) = raw(s.port, &post(path, &body, &extra));
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    };
    for path in ["/mcp", "/fed"] {
        for modern in [false, true] {
            let (status, v) = read(path, &format!("x-api-key: {ACME_KEY}"), modern);
            assert_eq!(status, 403, "{path} {modern}: {v}");
            assert_eq!(error_code(&v), -32041, "{v}");
            assert_eq!(
                v["error"]["data"]["rule"],
                "tenants[acme].policy.methods[0]"
            );
            assert_eq!(v["id"], 3, "{v}");
        }
        let (status, v) = read(path, &format!("authorization: {beta}"), true);
        assert_eq!(status, 200, "{path}: {v}");
        assert!(
            v["result"]["contents"][0]["text"].as_str().is_some(),
            "{path}: beta reads it: {v}"
        );
    }
}

/// A stateless (2026-07-28) `tools/call` of `tool` on `path`, over a new connection.
fn call_2026(
    port: u16,
    path: &str,
    tool: &str,
    args: &Value,
) -> integration_tests::peers::RawResponse {
    raw(
        port,
        &integration_tests::peers::post_call_2026(path, 9, tool, args, ""),
    )
    .0
}

/// A configuration of `header` and upstreams (a name and the rest of its table), each with
/// `breaker` and a route at `/<name>`.
fn with_breakers(header: String, breaker: &str, upstreams: &[(&str, &str)]) -> String {
    let mut config = header;
    for (name, rest) in upstreams {
        config.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\n{rest}\n{breaker}\n[[routes]]\npath = \"/{name}\"\nupstream = \"{name}\"\n"
        ));
    }
    config
}

#[test]
fn breakers_open_on_failures_and_tool_errors_and_close_again_after_a_good_probe() {
    let py = PyServer::start(false);
    let demo_port = free_port();
    let mut demo = Some(integration_tests::peers::demo_upstream(demo_port));
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwbrk");
    let config = with_breakers(
        local_header(&instance, 2, port, admin),
        "breaker = { consecutive_failures = 3, open_ms = 700 }",
        &[
            (
                "demo",
                &format!("url = \"http://127.0.0.1:{demo_port}/mcp\"\nconnect_timeout_ms = 300"),
            ),
            ("py", &format!("url = \"{}\"", py.url())),
        ],
    );
    let mut d = Daemon::start_local(&instance, &config);
    let add = json!({"a": 1, "b": 2});
    assert_eq!(call_2026(port, "/demo", "add", &add).status, 200);

    // The upstream goes away: three failures, then the breaker answers without trying.
    drop(demo.take());
    for _ in 0..3 {
        assert_eq!(call_2026(port, "/demo", "add", &add).status, 502);
    }
    integration_tests::peers::wait_breaker_open(admin, "demo\"");
    let r = call_2026(port, "/demo", "add", &add);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"]["code"], -32045);
    assert_eq!(r.json()["error"]["data"]["rule"], "upstreams[demo].breaker");
    assert!(r.header("retry-after").is_some());
    // Back again: after open_ms a probe goes through, succeeds, and the breaker closes.
    demo = Some(integration_tests::peers::demo_upstream(demo_port));
    std::thread::sleep(std::time::Duration::from_millis(800));
    let r = call_2026(port, "/demo", "add", &add);
    assert_eq!(r.status, 200, "the probe: {r:?}");
    integration_tests::peers::wait_breaker_closed(admin, "demo\"");
    for _ in 0..5 {
        assert_eq!(call_2026(port, "/demo", "add", &add).status, 200);
    }

    // A tool whose results are `isError` opens its own breaker; the upstream's other tools
    // carry on.
    for _ in 0..3 {
        let r = call_2026(port, "/py", "fail", &json!({"reason": "x"}));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["result"]["isError"], true, "{r:?}");
    }
    integration_tests::peers::wait_breaker_open(admin, "py/fail@");
    let r = call_2026(port, "/py", "fail", &json!({"reason": "x"}));
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tool `fail` of upstream `py`"),
        "{r:?}"
    );
    let r = call_2026(port, "/py", "echo", &json!({"text": "still here"}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["result"]["content"][0]["text"], "still here");
    d.stop();
    drop(demo);
}

/// An argument rule holds for what the upstream runs: the Python SDK decodes a string that
/// holds a JSON array for a parameter not typed plain `str`. Found by an attacker's review:
/// the text `["\u002fetc\u002fpasswd"]` passed a pattern refusing `/`, and the tool read
/// `["/etc/passwd"]`.
#[test]
fn an_argument_sent_as_json_text_is_checked_as_what_the_server_runs() {
    let py = PyServer::start_with(&["--files"]);
    let port = free_port();
    let instance = unique("gwargtext");
    let config = format!(
        "{}[[policy.tools]]\nmatch = \"read_files\"\n[[policy.tools.arguments]]\npointer = \"/path\"\npattern = \"^[^/]+$\"\n\
         [[policy.tools]]\nmatch = \"echo\"\n[[policy.tools.arguments]]\npointer = \"/text\"\nrequired = true\n\
         [[upstreams]]\nname = \"py\"\nurl = \"{}\"\n[[routes]]\npath = \"/py\"\nupstream = \"py\"\n",
        local_header(&instance, 1, port, free_port()),
        py.url()
    );
    let mut d = Daemon::start_local(&instance, &config);
    let text = |r: &integration_tests::peers::RawResponse| {
        r.json()["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned)
    };
    let r = call_2026(port, "/py", "read_files", &json!({"path": "notes.txt"}));
    assert_eq!(text(&r).as_deref(), Some("\"notes.txt\""), "{r:?}");
    let r = call_2026(port, "/py", "read_files", &json!({"path": "/etc/passwd"}));
    assert_eq!(r.json()["error"]["code"], -32041, "{r:?}");
    // The same path in a list sent as JSON text: the server would read ["/etc/passwd"].
    let held = json!({"path": "[\"\\u002fetc\\u002fpasswd\"]"});
    let r = call_2026(port, "/py", "read_files", &held);
    assert_eq!(r.json()["error"]["code"], -32041, "read: {:?}", text(&r));
    // As a list sent as a list is (the pattern takes strings).
    let r = call_2026(port, "/py", "read_files", &json!({"path": ["notes.txt"]}));
    assert_eq!(r.json()["error"]["code"], -32041, "{r:?}");
    // JSON text is read within the values one message may hold (1,048,576): a 2 MB string of
    // `[0,0,...]` is one value to the message, and each rule that read it grew its worker by
    // about 60 times its size (an attacker's review). Past them the call is refused unread;
    // within them it runs.
    let r = call_2026(port, "/py", "echo", &json!({"text": "[0,0,0]"}));
    assert_eq!(text(&r).as_deref(), Some("[0,0,0]"), "{r:?}");
    let zeros = format!("[{}0]", "0,".repeat(1 << 20));
    let r = call_2026(port, "/py", "echo", &json!({ "text": zeros }));
    assert_eq!(
        r.json()["error"]["code"],
        -32041,
        "the tool ran: {}",
        r.status
    );
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("more values"), "{message}");
    d.stop();
}

/// What pydantic reads as the ruled value is held to the rule (an attacker's review got each
/// past it to the Python SDK's server): JSON text nested deeper than the gateway's reader goes
/// (140 levels; `json.loads` reads about 1,000), a key read as the same number as the ruled
/// one (`"01"` for `1` in a `dict[int, int]`), and a field's name where the rule names its alias
/// (`file_path` for `filePath`, with `populate_by_name`), a list where the rule names an
/// object's member (`opts: Options | list[Options]`). Before, each was admitted and the tool
/// ran `["/etc/passwd", ...]`, `{1: 100000}` and `/etc/shadow`.
#[test]
fn arguments_the_server_reads_under_another_key_or_nesting_are_held_to_the_rule() {
    let py = PyServer::start_with(&["--files"]);
    let port = free_port();
    let instance = unique("gwargkeys");
    let config = format!(
        "{}[[policy.tools]]\nmatch = \"read_files\"\n[[policy.tools.arguments]]\npointer = \"/path\"\npattern = \"^[^/]+$\"\n\
         [[policy.tools]]\nmatch = \"quota\"\n[[policy.tools.arguments]]\npointer = \"/limits/1\"\nmaximum = 100\n\
         [[policy.tools]]\nmatch = \"configure\"\n[[policy.tools.arguments]]\npointer = \"/opts/filePath\"\npattern = \"^/srv/\"\n\
         [[upstreams]]\nname = \"py\"\nurl = \"{}\"\n[[routes]]\npath = \"/py\"\nupstream = \"py\"\n",
        local_header(&instance, 1, port, free_port()),
        py.url()
    );
    let mut d = Daemon::start_local(&instance, &config);
    let text = |r: &integration_tests::peers::RawResponse| {
        r.json()["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned)
    };
    let refused = |tool: &str, args: serde_json::Value| {
        let r = call_2026(port, "/py", tool, &args);
        assert_eq!(
            r.json()["error"]["code"],
            -32041,
            "{tool} {args}: the tool ran {:?}",
            text(&r)
        );
    };
    let deep = format!(
        "[\"\\u002fetc\\u002fpasswd\", {}{}]",
        "[".repeat(140),
        "]".repeat(140)
    );
    refused("read_files", json!({ "path": deep }));
    let r = call_2026(port, "/py", "quota", &json!({"limits": {"1": 5}}));
    assert_eq!(text(&r).as_deref(), Some("{\"1\": 5}"), "{r:?}");
    refused("quota", json!({"limits": {"+1": 100_000}}));
    refused("quota", json!({"limits": {"1": 5, "01": 100_000}}));
    let r = call_2026(
        port,
        "/py",
        "configure",
        &json!({"opts": {"filePath": "/srv/a"}}),
    );
    assert_eq!(text(&r).as_deref(), Some("/srv/a"), "{r:?}");
    refused("configure", json!({"opts": {"file_path": "/etc/shadow"}}));
    // A list where the rule names an object's member, as itself or as JSON text: the tool
    // takes either, and runs each item (an attacker's review).
    refused("configure", json!({"opts": [{"filePath": "/etc/shadow"}]}));
    refused(
        "configure",
        json!({"opts": "[{\"filePath\": \"/etc/shadow\"}]"}),
    );
    d.stop();
}

/// A call the gateway answers itself, having passed the breakers, says nothing of the
/// upstream: judged as the upstream's success, one naming a task not the caller's closed a
/// half-open breaker shared by every tenant (any caller could keep a failing upstream's
/// breaker from ever holding).
#[test]
fn a_call_answered_by_the_gateway_itself_does_not_close_a_half_open_breaker() {
    let demo_port = free_port();
    let demo = integration_tests::peers::demo_upstream(demo_port);
    let port = free_port();
    let instance = unique("gwbrkhere");
    let config = with_breakers(
        local_header(&instance, 1, port, free_port()),
        "breaker = { consecutive_failures = 2, open_ms = 500 }",
        &[(
            "demo",
            &format!("url = \"http://127.0.0.1:{demo_port}/mcp\"\nconnect_timeout_ms = 300"),
        )],
    );
    let mut d = Daemon::start_local(&instance, &config);
    let add = json!({"a": 1, "b": 2});
    assert_eq!(call_2026(port, "/demo", "add", &add).status, 200);
    drop(demo);
    for _ in 0..2 {
        assert_eq!(call_2026(port, "/demo", "add", &add).status, 502);
    }
    assert_eq!(call_2026(port, "/demo", "add", &add).status, 503);
    std::thread::sleep(std::time::Duration::from_millis(600));
    // Half-open: a call of another tool, related to a task that is not the caller's, takes
    // the upstream's probe and is answered here.
    let body = json!({
        "jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "x"}, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/related-task": {"taskId": "not-yours"}}},
    })
    .to_string();
    let headers =
        "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: echo\r\n";
    let (r, _) = raw(port, &post("/demo", &body, headers));
    // As an SDK server answers a task it does not know (the upstream is down: not its answer).
    assert_eq!(r.status, 200, "answered here: {r:?}");
    assert_eq!(r.json()["error"]["code"], -32602, "{r:?}");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Task not found")),
        "{r:?}"
    );
    // The probe is still out there to take: a call of a third tool goes to the upstream, fails
    // and opens the breaker again, so the next is refused without trying. Closed by the answer
    // made here, the breaker let both through to fail.
    let r = call_2026(port, "/demo", "sub", &add);
    assert_eq!(r.status, 502, "the probe: {r:?}");
    let r = call_2026(port, "/demo", "mul", &add);
    assert_eq!(r.status, 503, "open again after the probe failed: {r:?}");
    assert_eq!(r.json()["error"]["data"]["rule"], "upstreams[demo].breaker");
    d.stop();
}

/// An answer larger than the gateway takes is the call's failure, not the upstream's: its
/// tool's breaker (the tenant's) counts it, the upstream's (every tenant's) does not. Before,
/// one tenant asking a tool for a large answer opened the upstream's breaker for all.
#[test]
fn an_answer_too_large_to_relay_opens_the_tools_breaker_not_the_upstreams() {
    // One SSE event of 4 KiB, over a body limit of 2 KiB.
    let data = format!(
        r#"{{"jsonrpc":"2.0","id":9,"result":{{"content":[{{"type":"text","text":"{}"}}]}}}}"#,
        "x".repeat(4096)
    );
    let body = format!("event: message\ndata: {data}\n\n");
    let answer: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    // The upstream's other tools are still reached (their answers are as large).
    an_upstream_answering_opens_the_tools_breaker_only(
        answer,
        "[http]\nmax_body_bytes = 2048\n",
        "big",
        "dump",
    );
}

/// With an upstream `up` that answers every request with `answer` (routed at `/<up>`, its
/// breaker opening at two consecutive failures; `extra` added to the configuration's head), two
/// calls of `tool` fail with 502; the third is refused by the tool's breaker (503), while
/// another tool of `up` still reaches it (502 again): the upstream's breaker is closed.
fn an_upstream_answering_opens_the_tools_breaker_only(
    answer: &'static str,
    extra: &str,
    up: &str,
    tool: &str,
) {
    let upstream = FakeUpstream::start(Misbehave::Raw(answer));
    let port = free_port();
    let instance = unique("gwbrkcall");
    let config = with_breakers(
        format!("{}{extra}", local_header(&instance, 1, port, free_port())),
        "breaker = { consecutive_failures = 2, open_ms = 60000 }",
        &[(
            up,
            &format!("url = \"http://127.0.0.1:{}/mcp\"", upstream.port),
        )],
    );
    let mut d = Daemon::start_local(&instance, &config);
    let path = format!("/{up}");
    for _ in 0..2 {
        let r = call_2026(port, &path, tool, &json!({}));
        assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = call_2026(port, &path, tool, &json!({}));
    assert_eq!(
        r.status,
        503,
        "the tool's breaker opened: {}",
        String::from_utf8_lossy(&r.body)
    );
    let named = format!("tool `{tool}` of upstream `{up}`");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&named)),
        "{r:?}"
    );
    let r = call_2026(port, &path, "other", &json!({}));
    assert_eq!(r.status, 502, "the upstream's breaker stayed closed: {r:?}");
    d.stop();
}

/// A call the upstream refuses with 401 or 403 (a scope, an origin, a forbidden resource) is
/// the call's failure, not the upstream's: its tool's breaker counts it, the upstream's does
/// not. Before, one tenant's calls of what the upstream forbids opened the upstream's breaker
/// for every tenant and tool.
#[test]
fn a_call_the_upstream_forbids_opens_the_tools_breaker_not_the_upstreams() {
    an_upstream_answering_opens_the_tools_breaker_only(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nforbidden",
        "",
        "strict",
        "secret",
    );
}

/// An answer the gateway cannot read to check that it answers the request (a number past
/// `f64`, nesting past serde_json's depth: what a tool's output can hold, shaped by its caller)
/// is refused as the call's failure: its tool's breaker counts it, the upstream's does not.
/// Before, two such answers opened the upstream's shared breaker for every tenant.
#[test]
fn an_answer_the_gateway_cannot_read_opens_the_tools_breaker_not_the_upstreams() {
    an_upstream_answering_opens_the_tools_breaker_only(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 45\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":9,\"result\":{\"n\":1e400}}",
        "",
        "shaped",
        "compute",
    );
}

/// A call that times out is its tool's failure, and its upstream's only if the upstream
/// answered no other call while it waited: a hung upstream answers none. Before, calls of a
/// tool slower than the timeout (one tenant's, on purpose or not) opened the upstream's shared
/// breaker for every caller and tool while it answered every other call.
#[test]
fn calls_that_time_out_open_the_upstream_only_if_it_answered_nothing_meanwhile() {
    let py = PyServer::start_with(&["--json", "--slow"]);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwbrkslow");
    let at = format!("url = \"{}\"\nresponse_timeout_ms = 1000", py.url());
    let config = with_breakers(
        local_header(&instance, 2, port, admin),
        "breaker = { consecutive_failures = 2, open_ms = 60000 }",
        &[("answering", &at), ("hung", &at)],
    );
    let mut d = Daemon::start_local(&instance, &config);
    // Two calls at once of a tool that runs past the timeout, and, while they wait, one
    // that is answered when `meanwhile`.
    let time_out_twice = |path: &'static str, meanwhile: bool| {
        let slow: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || call_2026(port, path, "sleep", &json!({"seconds": 3})))
            })
            .collect();
        if meanwhile {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let r = call_2026(port, path, "echo", &json!({"text": "meanwhile"}));
            assert_eq!(r.status, 200, "{r:?}");
        }
        for call in slow {
            let r = call.join().unwrap();
            assert_eq!(r.status, 504, "{r:?}");
        }
    };
    let echo = |path: &str| call_2026(port, path, "echo", &json!({"text": "after"}));
    let message = |r: &integration_tests::peers::RawResponse| {
        r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    time_out_twice("/answering", true);
    // Its tool's breaker counted both (judged after the upstream's).
    integration_tests::peers::wait_breaker_open(admin, "answering/sleep@");
    let r = echo("/answering");
    assert_eq!(r.status, 200, "the upstream's breaker stayed closed: {r:?}");
    let r = call_2026(port, "/answering", "sleep", &json!({"seconds": 0}));
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        message(&r).contains("tool `sleep` of upstream `answering`"),
        "{r:?}"
    );
    // Nothing answered meanwhile: the upstream's breaker opens, for every tool.
    time_out_twice("/hung", false);
    integration_tests::peers::wait_breaker_open(admin, "hung\"");
    let r = echo("/hung");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(message(&r).contains("upstream `hung`"), "{r:?}");
    d.stop();
}

/// The breaker counts a tool's failure as its client reads it: an upstream that spells
/// `isError` with an escape, or gives it twice, is read as the client's parser reads it.
#[test]
fn a_tool_failure_spelled_with_an_escape_opens_the_breaker_all_the_same() {
    let answer = |result: &str| -> &'static str {
        let body = format!(r#"{{"jsonrpc":"2.0","id":9,"result":{result}}}"#);
        Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        )
    };
    let escaped = FakeUpstream::start(Misbehave::Raw(answer(
        r#"{"content":[{"type":"text","text":"no"}],"is\u0045rror":true}"#,
    )));
    // Given twice, the last counts: `false`, a result.
    let twice = FakeUpstream::start(Misbehave::Raw(answer(
        r#"{"content":[],"isError":true,"isError":false}"#,
    )));
    let port = free_port();
    let instance = unique("gwbrkesc");
    let config = with_breakers(
        local_header(&instance, 1, port, free_port()),
        "breaker = { consecutive_failures = 2, open_ms = 60000 }",
        &[
            (
                "escaped",
                &format!("url = \"http://127.0.0.1:{}/mcp\"", escaped.port),
            ),
            (
                "twice",
                &format!("url = \"http://127.0.0.1:{}/mcp\"", twice.port),
            ),
        ],
    );
    let mut d = Daemon::start_local(&instance, &config);
    for _ in 0..2 {
        let r = call_2026(port, "/escaped", "fail", &json!({}));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.json()["result"]["isError"],
            true,
            "the client reads a failure"
        );
    }
    let r = call_2026(port, "/escaped", "fail", &json!({}));
    assert_eq!(r.status, 503, "two failures open the breaker: {r:?}");
    for _ in 0..4 {
        let r = call_2026(port, "/twice", "fail", &json!({}));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["result"]["isError"], false);
    }
    d.stop();
}

/// A stateless `tools/list` on `path`: the tool names, sorted.
fn list_2026(port: u16, path: &str) -> Vec<String> {
    let body = json!({
        "jsonrpc": "2.0", "id": 3, "method": "tools/list",
        "params": {"_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}},
    })
    .to_string();
    let headers = "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n";
    let r = raw(port, &post(path, &body, headers)).0;
    assert_eq!(r.status, 200, "{r:?}");
    let mut names: Vec<String> = r.json()["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// The Python SDK's client, in the session era: lists the tools, then calls each tool named
/// after the URL; prints the names listed and what each call answered (its text or error).
const LIST_AND_CALL_EACH: &str = r#"
import asyncio, json, sys
from mcp import Client

async def main():
    async with Client(sys.argv[1], mode="legacy") as client:
        listed = await client.list_tools()
        calls = {}
        for name in sys.argv[2:]:
            try:
                r = await client.call_tool(name, {"text": "hi"})
                calls[name] = [getattr(c, "text", None) for c in r.content]
            except Exception as e:
                calls[name] = str(e)
        print(json.dumps({"tools": sorted(t.name for t in listed.tools), "calls": calls}))

asyncio.run(main())
"#;

/// The tools [`LIST_AND_CALL_EACH`] listed.
fn listed(got: &Value) -> Vec<&str> {
    got["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect()
}

/// A tool whose name reads as a pinned tool's (a Cyrillic `е` in `echo`), or hides a
/// character (`echo` and a zero-width space), is not pinned by first sight: hidden from the
/// list and its calls refused, on passthrough and federation. An attacker's review: the
/// upstream listed `echo\u{200b}` beside a pinned `echo`, with its own description, and it
/// was shown and called.
#[test]
fn a_tool_named_to_read_as_a_pinned_one_is_hidden_and_refused() {
    let up_port = free_port();
    let upstream = PyServer::start_on(up_port, &[]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwlook");
    let config = pinning_config(&instance, 1, port, admin, up_port, "");
    let mut d = Daemon::start_local(&instance, &config);
    assert!(
        list_2026(port, "/mcp").contains(&"echo".to_owned()),
        "pinned"
    );
    drop(upstream);
    let _upstream = PyServer::start_on(up_port, &["--lookalike-echo"]);
    for (path, prefix) in [("/mcp", ""), ("/fed", "p_")] {
        let hidden = format!("{prefix}echo\u{200b}");
        let cyrillic = format!("{prefix}\u{435}cho");
        let echo = format!("{prefix}echo");
        let url = format!("http://127.0.0.1:{port}{path}");
        let got = py_script(LIST_AND_CALL_EACH, &[&url, &hidden, &cyrillic, &echo]);
        let tools = listed(&got);
        assert!(tools.contains(&echo.as_str()), "{path}: {got}");
        assert!(
            !tools.contains(&hidden.as_str()) && !tools.contains(&cyrillic.as_str()),
            "{path}: {got}"
        );
        let calls = &got["calls"];
        assert!(
            calls[&hidden]
                .as_str()
                .is_some_and(|e| e.contains("a character a reader does not see as itself")),
            "{path}: {got}"
        );
        assert!(
            calls[&cyrillic]
                .as_str()
                .is_some_and(|e| e.contains("reads as pinned tool `echo`")),
            "{path}: {got}"
        );
        assert_eq!(calls[&echo], json!(["hi"]), "{path}: {got}");
    }
    d.stop();
}

/// In a federation, the member without a prefix cannot name a tool to read as another
/// member's: `u\u{430}_echo` (a Cyrillic `а`) beside member `ua_`'s `ua_echo` is neither listed
/// nor called. Before, it was listed beside the real one, with a description asking for the
/// user's keys, and its calls went to the member without a prefix (a review). Pinning off: the
/// pins' own lookalike check is per upstream, and never saw it.
#[test]
fn a_federated_name_that_reads_as_another_members_is_neither_listed_nor_called() {
    let (a_port, b_port) = (free_port(), free_port());
    let _a = PyServer::start_on(a_port, &[]);
    let _b = PyServer::start_on(b_port, &["--lookalike-member"]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwfedlook");
    let config = format!(
        r#"{}
[[upstreams]]
name = "ua"
url = "http://127.0.0.1:{a_port}/mcp"
[[upstreams]]
name = "ub"
url = "http://127.0.0.1:{b_port}/mcp"
[[routes]]
path = "/fed"
federate = [{{ upstream = "ua", prefix = "ua_" }}, {{ upstream = "ub", prefix = "" }}]
"#,
        integration_tests::daemon::local_header(&instance, 1, port, admin)
    );
    let mut d = Daemon::start_local(&instance, &config);
    let lookalike = "u\u{430}_echo";
    let url = format!("http://127.0.0.1:{port}/fed");
    let got = py_script(LIST_AND_CALL_EACH, &[&url, lookalike, "ua_echo", "echo"]);
    let tools = listed(&got);
    assert!(
        tools.contains(&"ua_echo") && tools.contains(&"echo"),
        "{got}"
    );
    assert!(!tools.contains(&lookalike), "{got}");
    assert_eq!(got["calls"]["ua_echo"], json!(["hi"]), "{got}");
    assert_eq!(got["calls"]["echo"], json!(["hi"]), "{got}");
    assert!(
        got["calls"][lookalike]
            .as_str()
            .is_some_and(|e| e.contains("unknown tool")),
        "{got}"
    );
    d.stop();
}

/// A tool's name may hold `/` (outside the characters the specification asks for; the Python
/// SDK serves it): a rule's `*` matches it there. Before, `*` stopped at a `/`, so `admin/drop`
/// escaped a `deny` of `*drop*` and of `u0/*`: listed and run (a reviewer's note, confirmed on
/// the code before). And `**/drop` still covers it (the first split of the pattern at its `/`
/// matched `drop` alone: a review of the change).
#[test]
fn a_deny_rule_covers_a_tool_whose_name_holds_a_slash() {
    let up_port = free_port();
    let _upstream = PyServer::start_on(up_port, &["--slash-tool"]);
    for pattern in ["*drop*", "u0/*", "**/drop"] {
        let port = free_port();
        let admin = free_port();
        let instance = unique("gwslash");
        let allow_echo = if pattern == "u0/*" {
            "[[policy.tools]]\nmatch = \"u0/echo\"\naction = \"allow\"\n"
        } else {
            ""
        };
        let config = format!(
            r#"
{header}[policy]
default_action = "allow"
{allow_echo}[[policy.tools]]
match = "{pattern}"
action = "deny"
[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
"#,
            header = local_header(&instance, 1, port, admin),
        );
        let mut d = Daemon::start_local(&instance, &config);
        let url = format!("http://127.0.0.1:{port}/mcp");
        let got = py_script(LIST_AND_CALL_EACH, &[&url, "admin/drop", "echo"]);
        let tools = got["tools"].as_array().unwrap();
        assert!(!tools.contains(&json!("admin/drop")), "{pattern}: {got}");
        assert!(tools.contains(&json!("echo")), "{pattern}: {got}");
        assert!(
            got["calls"]["admin/drop"]
                .as_str()
                .is_some_and(|e| e.contains("is not allowed")),
            "{pattern}: {got}"
        );
        assert_eq!(got["calls"]["echo"], json!(["hi"]), "{pattern}: {got}");
        d.stop();
    }
}

/// A tenant's rule that sets only a cost allows nothing `[policy]` denies, and takes none of
/// `[policy]`'s limits away: action and cost come from the first covering rule that sets
/// them, and every covering rule's limits apply.
/// Before, the first matching rule decided everything and `action` meant `allow` when absent:
/// a cost on `u0/admin/drop` listed and ran the tool every tenant was denied, and a cost on
/// `echo` lifted the size cap `[policy]` put on every tool (an operator's review).
#[test]
fn a_tenant_rule_for_a_cost_allows_nothing_the_defaults_deny() {
    let up_port = free_port();
    let _upstream = PyServer::start_on(up_port, &["--slash-tool"]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwcostrule");
    let config = format!(
        r#"
{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants.policy.tools]]
match = "u0/admin/drop"
cost = 5
[[tenants.policy.tools]]
match = "echo"
cost = 2
requests_per_sec = 50
[policy]
default_action = "allow"
[[policy.tools]]
match = "*drop*"
action = "deny"
[[policy.tools]]
match = "*"
max_arguments_bytes = 200
[[policy.tools]]
match = "echo"
requests_per_sec = 1
[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
"#,
        header = local_header(&instance, 1, port, admin),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let got = py_script(LIST_AND_CALL_EACH, &[&url, "admin/drop", "echo"]);
    let tools = got["tools"].as_array().unwrap();
    assert!(!tools.contains(&json!("admin/drop")), "{got}");
    assert!(
        got["calls"]["admin/drop"]
            .as_str()
            .is_some_and(|e| e.contains("is not allowed")),
        "{got}"
    );
    assert_eq!(got["calls"]["echo"], json!(["hi"]), "{got}");
    let r = call_2026(port, "/mcp", "echo", &json!({"text": "x".repeat(300)}));
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.json()["error"]["data"]["rule"],
        "policy.tools[1].max_arguments_bytes",
        "{r:?}"
    );
    let r = call_2026(port, "/mcp", "admin/drop", &json!({"text": "hi"}));
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.json()["error"]["data"]["rule"],
        "policy.tools[0]",
        "{r:?}"
    );
    // The tenant's rate of 50/s does not lift `[policy]`'s 1/s: of two calls at once, the
    // second is over it.
    let _ = call_2026(port, "/mcp", "echo", &json!({"text": "hi"}));
    let r = call_2026(port, "/mcp", "echo", &json!({"text": "hi"}));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.json()["error"]["data"]["rule"],
        "policy.tools[2].requests_per_sec",
        "{r:?}"
    );
    d.stop();
}

/// The loop breaker counts a pinned tool's call by the arguments its schema declares: the
/// Python SDK's server ignores a key `add(a, b)` does not declare and runs the same call, so a
/// junk key added to each call (another each time) no longer escapes the breaker (an
/// attacker's review), once the tool is listed and pinned. Before its first listing the
/// gateway knows no definition, and every key counts, as without pinning.
#[test]
fn junk_keys_a_pinned_tool_does_not_declare_do_not_escape_the_loop_breaker() {
    let up_port = free_port();
    let _upstream = PyServer::start_on(up_port, &[]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwloopkeys");
    let tenants = r#"default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[tenants.policy]
loop_breaker = { max_repeats = 2, window_s = 60 }
"#;
    let config = pinning_config(&instance, 1, port, admin, up_port, tenants);
    let mut d = Daemon::start_local(&instance, &config);
    let sum = |r: &integration_tests::peers::RawResponse| {
        r.json()["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned)
    };
    // Not listed yet: no definition known, each junk key another call.
    for i in 0..4 {
        let r = call_2026(port, "/mcp", "add", &json!({"a": 1, "b": 1, "nonce": i}));
        assert_eq!(r.status, 200, "{i}: {r:?}");
        assert_eq!(sum(&r).as_deref(), Some("2"), "{i}: {r:?}");
    }
    // Listed: pinned, and its schema declares `a` and `b` only.
    assert!(list_2026(port, "/mcp").contains(&"add".to_owned()));
    for i in 0..2 {
        let junk = format!("nonce{i}");
        let r = call_2026(port, "/mcp", "add", &json!({"a": 9, "b": 1, junk: i}));
        assert_eq!(r.status, 200, "{i}: {r:?}");
        // The server ran `add(9, 1)`, the junk key ignored.
        assert_eq!(sum(&r).as_deref(), Some("10"), "{i}: {r:?}");
    }
    let r = call_2026(port, "/mcp", "add", &json!({"a": 9, "b": 1, "nonce2": 2}));
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(error_code(&r.json()), -32044, "{r:?}");
    assert_eq!(
        r.json()["error"]["data"]["rule"],
        "tenants[public].policy.loop_breaker"
    );
    // Without the junk key, the same call: refused too. Other values: another call.
    let r = call_2026(port, "/mcp", "add", &json!({"a": 9, "b": 1}));
    assert_eq!(r.status, 429, "{r:?}");
    let r = call_2026(port, "/mcp", "add", &json!({"a": 8, "b": 1, "nonce3": 3}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(sum(&r).as_deref(), Some("9"), "{r:?}");
    // Federated, the same pin: the same count.
    let r = call_2026(port, "/fed", "p_add", &json!({"a": 9, "b": 1, "nonce4": 4}));
    assert_eq!(r.status, 429, "{r:?}");
    d.stop();
}

/// A gateway with `workers` workers that pins tools: upstream `u0` at `up_port`, on `/mcp`
/// and federated with the prefix `p_` on `/fed`. `tenants` goes before the policy (tenants
/// and the `[kernel]` keys that name one).
fn pinning_config(
    instance: &str,
    workers: usize,
    port: u16,
    admin: u16,
    up_port: u16,
    tenants: &str,
) -> String {
    format!(
        r#"
{header}{tenants}[policy]
pin_tools = true
[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "p_" }}]
"#,
        header = local_header(instance, workers, port, admin),
    )
}

/// A gateway (one worker) with pinning and the denied `u0/secret_tool`, in front of the hostile
/// fixture `stray_answer_server.py` in `mode`, at `/mcp` and federated at `/fed` (prefix
/// `p_`): the fixture, the gateway, its port and its admin port.
fn stray_gateway(mode: &[&str]) -> (PyServer, Daemon, u16, u16) {
    let up_port = free_port();
    let upstream = PyServer::script_on("stray_answer_server.py", up_port, mode);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwstray");
    let tenant = r#"default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants.policy.tools]]
match = "u0/secret_tool"
action = "deny"
"#;
    let config = pinning_config(&instance, 1, port, admin, up_port, tenant);
    (
        upstream,
        Daemon::start_local(&instance, &config),
        port,
        admin,
    )
}

/// What a client listed was the list the gateway filtered and pinned: `echo` (so named on the
/// route) as first seen, and not the tenant's denied tool.
fn listed_as_filtered(got: &Value, echo: &str) {
    let tools = got["tools"].as_object().unwrap();
    assert_eq!(
        tools.keys().collect::<Vec<_>>(),
        [echo],
        "the denied tool stays hidden: {got}"
    );
    assert_eq!(tools[echo], "Returns its input.", "{got}");
}

/// The Python SDK's client, in the session era: lists the tools (after its GET stream had
/// time to open) and calls `tool`; prints what it was given.
const LIST_AND_CALL: &str = r#"
import asyncio, json, sys
from mcp import Client

async def main():
    async with Client(sys.argv[1], mode="legacy") as client:
        await asyncio.sleep(0.5)
        listed = await client.list_tools()
        called = await client.call_tool(sys.argv[2], {"text": "hi"})
        print(json.dumps({
            "tools": {t.name: t.description for t in listed.tools},
            "call": [getattr(c, "text", None) for c in called.content],
        }))

asyncio.run(main())
"#;

/// An upstream's answer in a charset but UTF-8 is not relayed: the client decodes it in that
/// charset, the gateway reads UTF-8. The review's GET stream said `charset=utf-7` and spelled
/// the stray's `id` as `+AGk-d`: no id to the gateway, the pending `tools/list`'s to the Python
/// SDK's client, which listed the changed `echo` and the tenant's denied tool. A later review
/// named the charset as RFC 2231 does (`charset*=''utf-7`, `charset*0=utf-;charset*1=7`),
/// which httpx decodes too (seen reaching the client on the code before).
#[test]
fn an_answer_in_another_charset_than_utf8_is_not_relayed() {
    for media in [
        "text/event-stream; charset=utf-7",
        "text/event-stream; charset*=''utf-7",
        "text/event-stream; charset*0=utf-;charset*1=7",
    ] {
        let (_upstream, mut d, port, _) = stray_gateway(&["utf7", media]);
        let got = py_script(
            LIST_AND_CALL,
            &[&format!("http://127.0.0.1:{port}/mcp"), "echo"],
        );
        listed_as_filtered(&got, "echo");
        d.wait_for_log("answered in charset `", std::time::Duration::from_secs(2));
        d.stop();
    }
}

/// A GET's answer that is not an event stream is not relayed: the TypeScript SDK's client reads
/// any 2xx body of its GET as one, and the gateway judged only what it took for one. The review
/// served the GET stream as `application/json` with a stray in it: the pending `tools/list`
/// was answered with the changed `echo` and the tenant's denied tool (seen reaching the client
/// on the code before). Nor is a notification's answer that is an array holding a response.
#[test]
fn a_get_answered_with_another_type_than_an_event_stream_is_not_relayed() {
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let second = std::time::Duration::from_secs(1);
    let (_upstream, mut d, port, _) = stray_gateway(&["getjson"]);
    let session = raw_session(port);
    let mut get = get_stream(port, &session);
    std::thread::sleep(second / 2);
    let (r, _) = raw(port, &post("/mcp", list, &session));
    assert_eq!(r.status, 200, "{r:?}");
    let stream = read_for(&mut get, second);
    assert!(stream.starts_with("HTTP/1.1 502"), "{stream}");
    assert!(!stream.contains("First read"), "{stream}");
    d.wait_for_log(
        "answered a GET with a body that is not an event stream",
        second,
    );
    d.stop();

    // A notification answered with an array that holds a response to the pending
    // `tools/list` (a later review: the array went out as it came, where the response alone
    // was refused).
    let (_upstream, mut d, port, _) = stray_gateway(&["notearray"]);
    let session = raw_session(port);
    let note = r#"{"jsonrpc":"2.0","method":"notifications/roots/list_changed"}"#;
    let (r, _) = raw(port, &post("/mcp", note, &session));
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains("First read"), "{body}");
    assert_eq!(r.status, 502, "{body}");
    d.stop();
}

/// The Python SDK's client, in the session era: asks for the tools and, while that is pending,
/// calls `tool`; prints the list it was given and what became of the call.
const LIST_BESIDE_A_CALL: &str = r#"
import asyncio, json, sys
from mcp import Client

async def main():
    async with Client(sys.argv[1], mode="legacy") as client:
        listing = asyncio.create_task(client.list_tools())
        await asyncio.sleep(0.2)
        try:
            called = await asyncio.wait_for(client.call_tool(sys.argv[2], {"text": "hi"}), 3)
            call = [getattr(c, "text", None) for c in called.content]
        except BaseException as e:
            call = type(e).__name__
        listed = await asyncio.wait_for(listing, 10)
        print(json.dumps({
            "tools": {t.name: t.description[:100] for t in listed.tools},
            "call": call,
        }))

asyncio.run(main())
"#;

/// A large JSON answer (relayed as it comes, not held whole) that answers another request than
/// the one sent: a `tools/call` answered with the id of the client's pending `tools/list` and
/// a changed list. It is cut before its end; the client's list is the one the gateway filtered
/// and pinned.
#[test]
fn a_large_answer_to_another_request_never_reaches_the_client_whole() {
    let (_upstream, mut d, port, _) = stray_gateway(&["json"]);
    let got = py_script(
        LIST_BESIDE_A_CALL,
        &[&format!("http://127.0.0.1:{port}/mcp"), "echo"],
    );
    listed_as_filtered(&got, "echo");
    assert!(!got["call"].is_array(), "the call got no answer: {got}");
    d.wait_for_log(
        "answered another request than the one sent to it",
        std::time::Duration::from_secs(2),
    );
    d.stop();
}

/// An upstream's response on the session's own GET stream never reaches the client: a client
/// matches answers by id on any stream, so a `tools/list` answer pushed there (the review's
/// "rug pull") was taken for the answer to the client's `tools/list`, which the gateway
/// filtered and pinned on its POST. The client was shown a changed definition nothing held for
/// approval, and a tool denied to its tenant, on passthrough and federation alike.
#[test]
fn a_response_on_the_sessions_own_stream_cannot_answer_a_filtered_and_pinned_list() {
    let (_upstream, mut d, port, admin) = stray_gateway(&[]);
    for (path, echo) in [("/mcp", "echo"), ("/fed", "p_echo")] {
        let url = format!("http://127.0.0.1:{port}{path}");
        let got = py_script(LIST_AND_CALL, &[&url, echo]);
        listed_as_filtered(&got, echo);
        assert_eq!(got["call"], json!(["ran echo"]), "{path}: {got}");
    }
    // Nothing changed as far as the pins know: the upstream's lists were the same each time.
    let pins = String::from_utf8_lossy(
        &raw(
            admin,
            b"GET /pins HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
        )
        .0
        .body,
    )
    .into_owned();
    assert!(!pins.contains("First read"), "{pins}");
    d.wait_for_log(
        "a response to no request this stream answers",
        std::time::Duration::from_secs(2),
    );
    d.stop();
}

/// The session's GET stream at `/mcp`, asked for (`session`: [`raw_session`]'s lines).
fn get_stream(port: u16, session: &str) -> std::net::TcpStream {
    use std::io::Write as _;
    let mut get = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    get.write_all(
        format!("GET /mcp HTTP/1.1\r\nhost: gw\r\naccept: text/event-stream\r\n{session}\r\n")
            .as_bytes(),
    )
    .unwrap();
    get
}

/// A session opened on `/mcp` through the gateway at `port` with raw requests: the header
/// lines of its later requests.
fn raw_session(port: u16) -> String {
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (r, _) = raw(port, &post("/mcp", init, ""));
    assert_eq!(r.status, 200, "{r:?}");
    let sid = r.header("mcp-session-id").expect("a session id").to_owned();
    let session = format!("mcp-session-id: {sid}\r\nmcp-protocol-version: 2025-06-18\r\n");
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let (r, _) = raw(port, &post("/mcp", note, &session));
    assert!(r.status < 300, "{r:?}");
    session
}

/// Everything `stream` gives within `within` (or until it closes), as text.
fn read_for(stream: &mut std::net::TcpStream, within: std::time::Duration) -> String {
    use std::io::Read as _;
    let end = std::time::Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        stream
            .set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Answers that some clients read otherwise than the gateway does never reach the client; in
/// each, the hostile fixture answers a pending `tools/list` with a changed `echo` and the
/// tenant's denied tool (an attacker's review, each seen reaching the client before):
/// - an array answering a `tools/call`, streamed, with a response to another request in it
///   (the TypeScript SDK's client takes each item as a message);
/// - a stray on the GET stream behind `event: message` and U+2028 (httpx-sse 0.4.0 ends a line
///   there, and reads a `data` line the gateway did not see);
/// - a `re\u{17f}ult` beside the `result` of a `tools/list` the gateway filtered and pinned
///   (Go's encoding/json reads it as `result`, and takes the last).
#[test]
fn answers_some_clients_read_otherwise_never_reach_the_client() {
    use std::io::Write as _;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let call = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}"#;
    let second = std::time::Duration::from_secs(1);

    let (_upstream, mut d, port, _) = stray_gateway(&["array"]);
    let session = raw_session(port);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(&post(
        "/mcp",
        call,
        &format!("{session}connection: close\r\n"),
    ))
    .unwrap();
    let got = read_for(&mut c, 3 * second);
    assert!(
        !got.contains("First read"),
        "the array reached the client: {got}"
    );
    d.wait_for_log(
        "answered another request than the one sent to it",
        2 * second,
    );
    d.stop();

    let (_upstream, mut d, port, _) = stray_gateway(&["separator"]);
    let session = raw_session(port);
    let mut get = get_stream(port, &session);
    std::thread::sleep(second / 2);
    let (r, _) = raw(port, &post("/mcp", list, &session));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!String::from_utf8_lossy(&r.body).contains("First read"));
    let stream = read_for(&mut get, second);
    assert!(
        stream.starts_with("HTTP/1.1 200"),
        "the GET stream opened: {stream}"
    );
    assert!(
        !stream.contains("First read"),
        "a stray behind U+2028 on the GET stream: {stream}"
    );
    d.stop();

    let (_upstream, mut d, port, _) = stray_gateway(&["folded"]);
    let session = raw_session(port);
    let (r, _) = raw(port, &post("/mcp", list, &session));
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains("First read"), "{body}");
    assert_eq!(r.status, 502, "{body}");
    d.stop();
}

#[test]
fn a_changed_tool_definition_is_hidden_and_refused_until_an_operator_approves_it() {
    let up_port = free_port();
    let upstream = PyServer::start_on(up_port, &[]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwpin");
    let config = pinning_config(&instance, 2, port, admin, up_port, "");
    let mut d = Daemon::start_local(&instance, &config);
    let all = [
        "add",
        "ask_model",
        "ask_user",
        "count_with_progress",
        "echo",
        "fail",
    ];
    assert_eq!(
        list_2026(port, "/mcp"),
        all,
        "first sight: pinned and shown"
    );
    let text = json!({"text": "hi"});
    assert_eq!(call_2026(port, "/mcp", "echo", &text).status, 200);

    // The upstream comes back with another description for `echo`.
    drop(upstream);
    let upstream = PyServer::start_on(up_port, &["--changed-echo"]);
    let without_echo = [
        "add",
        "ask_model",
        "ask_user",
        "count_with_progress",
        "fail",
    ];
    assert_eq!(list_2026(port, "/mcp"), without_echo, "changed: hidden");
    let fed: Vec<String> = list_2026(port, "/fed");
    assert!(
        !fed.contains(&"p_echo".to_owned()) && fed.contains(&"p_add".to_owned()),
        "{fed:?}"
    );
    let r = call_2026(port, "/mcp", "echo", &text);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"]["code"], -32046);
    assert_eq!(r.json()["error"]["data"]["rule"], "pins[u0]");
    assert_eq!(
        call_2026(port, "/mcp", "add", &json!({"a": 1, "b": 2})).status,
        200
    );
    d.wait_for_log("tool definition changed", std::time::Duration::from_secs(2));
    let log = d.log();
    assert!(
        log.contains("Returns its input.") && log.contains("forwards it to audit.example"),
        "both versions are logged"
    );

    // The operator sees the change and approves it.
    let (pins, _) = raw(admin, b"GET /pins HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    assert_eq!(pins.status, 200);
    let pins = pins.json();
    let echo = pins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tool"] == "echo")
        .unwrap();
    assert_eq!(
        echo["pending"]["definition"]["description"],
        "Returns its input. Also forwards it to audit.example."
    );
    assert_eq!(
        echo["approved_definition"]["description"],
        "Returns its input."
    );
    // An approval names the definition it approves: without its digest it is refused.
    let unnamed = r#"{"upstream":"u0","tool":"echo"}"#;
    let unnamed = format!(
        "POST /pins/approve HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{unnamed}",
        unnamed.len()
    );
    let (resp, _) = raw(admin, unnamed.as_bytes());
    assert_eq!(resp.status, 400, "{resp:?}");
    let approve = approve_request(&pins, "u0", "echo");
    let (resp, _) = raw(admin, &approve);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["approved"], echo["pending"]["sha256"]);
    assert_eq!(list_2026(port, "/mcp"), all, "approved: shown again");
    assert_eq!(call_2026(port, "/mcp", "echo", &text).status, 200);
    let (resp, _) = raw(admin, &approve);
    assert_eq!(resp.status, 404, "nothing left to approve");

    // Only its annotations change (now destructive, the description as approved): held too.
    drop(upstream);
    let upstream = PyServer::start_on(up_port, &["--changed-echo", "--destructive-echo"]);
    assert_eq!(
        list_2026(port, "/mcp"),
        without_echo,
        "annotations changed: hidden"
    );
    assert_eq!(call_2026(port, "/mcp", "echo", &text).status, 403);
    // An approval of another definition than the one pending (the one approved before, as an
    // operator who read `GET /pins` before it changed again would send) approves nothing.
    let (resp, _) = raw(admin, &approve_request(&pins, "u0", "echo"));
    assert_eq!(resp.status, 409, "{resp:?}");
    assert_eq!(call_2026(port, "/mcp", "echo", &text).status, 403);
    let resp = approve_pin(admin, "u0", "echo");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(list_2026(port, "/mcp"), all, "approved: shown again");
    d.stop();
    drop(upstream);
}

/// A change awaiting approval stays so until the operator approves or rejects it, whatever
/// lists the approved definition meanwhile. Two replicas of one upstream, one of which serves a
/// changed `echo` (a rolling upgrade, or a compromised replica): a listing that reached the
/// other cleared the change, the operator had nothing left to read, and calls that reached the
/// changed replica ran it (an attacker's review, with the Python SDK's servers; one tenant's
/// listing cleared it for every other). Now every call of `echo` is refused until the operator
/// decides; a rejection makes it callable again, until a listing shows the change again.
#[test]
fn a_change_awaiting_approval_is_not_taken_back_by_a_listing_of_the_approved_definition() {
    let (a, b) = (free_port(), free_port());
    let approved = PyServer::start_on(a, &[]);
    let changed = PyServer::start_on(b, &[]);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwpinreplicas");
    let config = format!(
        r#"
{header}[policy]
pin_tools = true
[[upstreams]]
name = "r"
endpoints = ["http://127.0.0.1:{a}/mcp", "http://127.0.0.1:{b}/mcp"]
[[routes]]
path = "/mcp"
upstream = "r"
"#,
        header = local_header(&instance, 1, port, admin),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let text = json!({"text": "hi"});
    assert!(list_2026(port, "/mcp").contains(&"echo".to_owned()));
    assert_eq!(call_2026(port, "/mcp", "echo", &text).status, 200);
    // One replica comes back with `echo` changed.
    drop(changed);
    let changed = PyServer::start_on(b, &["--changed-echo"]);
    // Listings reach both replicas: one that hides `echo` (the changed one's), then one that
    // shows it (the approved one's), which took the change back before.
    let mut hidden = false;
    let mut shown_after = false;
    for _ in 0..20 {
        let listed = list_2026(port, "/mcp").contains(&"echo".to_owned());
        hidden |= !listed;
        if hidden && listed {
            shown_after = true;
            break;
        }
    }
    assert!(hidden && shown_after, "the listings reached both replicas");
    let pins = integration_tests::peers::pins(admin);
    let echo = pins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tool"] == "echo")
        .unwrap()
        .clone();
    assert_eq!(
        echo["pending"]["definition"]["description"],
        "Returns its input. Also forwards it to audit.example.",
        "still awaiting the operator: {pins}"
    );
    // Every call is refused, whichever replica it would reach.
    for _ in 0..4 {
        let r = call_2026(port, "/mcp", "echo", &text);
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.json()["error"]["code"], -32046, "{r:?}");
    }
    // The operator rejects the change (by the digest read): `echo` is callable again.
    let reject = integration_tests::peers::pin_request(&pins, "r", "echo", "reject");
    let (resp, _) = raw(admin, &reject);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["rejected"], echo["pending"]["sha256"]);
    let (resp, _) = raw(admin, &reject);
    assert_eq!(resp.status, 404, "nothing left to reject: {resp:?}");
    assert_eq!(
        integration_tests::peers::pins(admin)[0]["pending"],
        Value::Null
    );
    // Until a listing reaches the changed replica again: held again.
    let mut held = false;
    for _ in 0..20 {
        if !list_2026(port, "/mcp").contains(&"echo".to_owned()) {
            held = true;
            break;
        }
    }
    assert!(held, "a listing reached the changed replica");
    assert_eq!(call_2026(port, "/mcp", "echo", &text).status, 403);
    d.stop();
    drop((approved, changed));
}

/// A tool the configuration pins (`[[policy.pins]]`) is callable only once a listing has shown
/// the definition the pin names. Before, a client that never listed tools called it whatever
/// its definition: the pin was checked only when a list passed. Here the operator pinned
/// another `echo` than the upstream serves: a call before any listing is refused (where it ran
/// before), and after the listing `echo` is hidden and refused as changed.
#[test]
fn a_configured_pin_holds_for_a_client_that_never_lists_tools() {
    let upstream = PyServer::start(false);
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwcfgpin");
    let config = format!(
        r#"
{header}[policy]
[[policy.pins]]
upstream = "u0"
tool = "echo"
sha256 = "{pinned}"
[[upstreams]]
name = "u0"
url = "{url}"
[[routes]]
path = "/mcp"
upstream = "u0"
"#,
        header = local_header(&instance, 2, port, admin),
        pinned = "ab".repeat(32),
        url = upstream.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let text = json!({"text": "hi"});
    let r = call_2026(port, "/mcp", "echo", &text);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"]["data"]["rule"], "pins[u0]", "{r:?}");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no listing has shown")),
        "{r:?}"
    );
    // Tools pinned by first sight only are callable before any listing.
    assert_eq!(
        call_2026(port, "/mcp", "add", &json!({"a": 1, "b": 2})).status,
        200
    );
    let listed = list_2026(port, "/mcp");
    assert!(!listed.contains(&"echo".to_owned()), "{listed:?}");
    let r = call_2026(port, "/mcp", "echo", &text);
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("changed")),
        "{r:?}"
    );
    d.stop();
}

const KEY_A: &str = "revoked-key-a-0123456789";
const KEY_B: &str = "kept-key-b-0123456789";

/// A gateway with `keys` (each tenant `acme`'s, agents of their own) in front of `url`.
fn keyed_config(instance: &str, port: u16, admin: u16, url: &str, keys: &[&str]) -> String {
    let keys: String = keys
        .iter()
        .map(|k| {
            format!(
                "[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\nagent = \"{}\"\n",
                sha256_hex(k),
                &k[..8],
            )
        })
        .collect();
    format!(
        r#"
{header}default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
{keys}
[[upstreams]]
name = "u0"
url = "{url}"
[[routes]]
path = "/mcp"
upstream = "u0"
auth = ["api_key"]
"#,
        header = local_header(instance, 2, port, admin),
    )
}

/// A session opened with `key`: the header lines of its later requests.
fn keyed_session(port: u16, key: &str) -> String {
    let with_key = format!("x-api-key: {key}\r\n");
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (r, _) = raw(port, &post("/mcp", init, &with_key));
    assert_eq!(r.status, 200, "{r:?}");
    let sid = r.header("mcp-session-id").expect("a session id").to_owned();
    let session =
        format!("{with_key}mcp-session-id: {sid}\r\nmcp-protocol-version: 2025-06-18\r\n");
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let (r, _) = raw(port, &post("/mcp", note, &session));
    assert!(r.status < 300, "{r:?}");
    session
}

/// Reads `stream` until `needle` came (5 s at most).
fn read_until(stream: &mut std::net::TcpStream, needle: &str) {
    use std::io::Read as _;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("no {needle} ({e}): {}", String::from_utf8_lossy(&seen)));
        assert!(
            n > 0,
            "closed before {needle}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Whether the gateway closes `stream` within `within` (whatever it sends meanwhile is read).
fn closed_within(stream: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read as _;
    let end = std::time::Instant::now() + within;
    let mut buf = [0u8; 8192];
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        stream
            .set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Rewrites the configuration of `instance` and reloads it (SIGHUP), waiting for the reload.
fn reload_with(d: &mut Daemon, instance: &str, config: &str) {
    let path = std::env::temp_dir().join(format!("{instance}.toml"));
    std::fs::write(
        path,
        integration_tests::daemon::with_state(instance, config),
    )
    .unwrap();
    let reloads = |d: &Daemon| d.log().matches("\"message\":\"reloaded /").count();
    let before = reloads(d);
    d.hangup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while reloads(d) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// An API key a reload removes ends the event streams open with it at once: its session's GET
/// stream and a long call's progress stream close within a second of the reload, as a banned
/// client's do, while another key's stream on the same upstream stays open; a reload that
/// changes nothing about a caller cuts nothing. Before, only a new request on the connection
/// was refused (401): the GET stream went on for as long as the upstream kept it going (its
/// pings), and the call's stream delivered every event (an attacker's review).
#[test]
fn a_revoked_api_keys_open_streams_end_at_the_reload() {
    let upstream = PyServer::start(false);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwrevoke");
    let url = upstream.url();
    let both = keyed_config(&instance, port, admin, &url, &[KEY_A, KEY_B]);
    let mut d = Daemon::start_local(&instance, &both);
    let a = keyed_session(port, KEY_A);
    let b = keyed_session(port, KEY_B);
    let mut a_get = get_stream(port, &a);
    read_until(&mut a_get, "HTTP/1.1 200");
    let mut b_get = get_stream(port, &b);
    read_until(&mut b_get, "HTTP/1.1 200");
    let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"count_with_progress","arguments":{"steps":300,"pause_ms":100},"_meta":{"progressToken":"p"}}}"#;
    let open_call = |session: &str| {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&post("/mcp", call, session)).unwrap();
        read_until(&mut s, "notifications/progress");
        s
    };
    let mut a_call = open_call(&a);
    let mut b_call = open_call(&b);

    // A reload that changes nothing about either caller (a tenant added): nothing is cut.
    let unrelated = both.replacen(
        "[[auth.api_keys]]",
        "[[tenants]]\nname = \"other\"\nid = 2\n[[auth.api_keys]]",
        1,
    );
    reload_with(&mut d, &instance, &unrelated);
    for (s, what) in [
        (&mut a_get, "A's GET stream"),
        (&mut b_get, "B's GET stream"),
        (&mut a_call, "A's call"),
        (&mut b_call, "B's call"),
    ] {
        assert!(
            !closed_within(s, std::time::Duration::from_millis(700)),
            "{what} was cut by a reload that changed nothing about it"
        );
    }

    // A request with key A begun on a new connection before the reload, and sent on to its end
    // after it: judged by the configuration in force once it is read (it was served under the
    // old one, up to the request timeout after the reload: a review).
    let note = r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#;
    let straddling = post("/mcp", note, &a);
    let mut half = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    {
        use std::io::Write as _;
        half.write_all(&straddling[..20]).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(100));

    // Key A revoked.
    reload_with(
        &mut d,
        &instance,
        &keyed_config(&instance, port, admin, &url, &[KEY_B]),
    );
    {
        use std::io::{Read as _, Write as _};
        half.write_all(&straddling[20..]).unwrap();
        half.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = half.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            !answer.starts_with("HTTP/1.1 200"),
            "a request begun before the reload was served with the revoked key: {answer}"
        );
    }
    let within = std::time::Duration::from_millis(1200);
    assert!(
        closed_within(&mut a_get, within),
        "the revoked key's GET stream went on"
    );
    assert!(
        closed_within(&mut a_call, within),
        "the revoked key's call stream went on"
    );
    assert!(
        !closed_within(&mut b_get, std::time::Duration::from_millis(700)),
        "the kept key's GET stream was cut"
    );
    assert!(
        !closed_within(&mut b_call, std::time::Duration::from_millis(300)),
        "the kept key's call was cut"
    );
    // A new request with the key is refused; with the other, served.
    assert_eq!(raw(port, &post("/mcp", note, &a)).0.status, 401);
    assert_eq!(raw(port, &post("/mcp", note, &b)).0.status, 200);
    let (m, _) = raw(admin, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    let metrics = String::from_utf8_lossy(&m.body).into_owned();
    let revoked: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mcp_gateway_connections_refused_total{reason=\"revoked\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no revoked count: {metrics}"));
    assert!(revoked >= 2, "{revoked} connections counted as revoked");
    d.stop();
}
