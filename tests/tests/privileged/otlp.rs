//! OpenTelemetry spans through the real daemon on loopback, received by a real OTLP/HTTP
//! receiver (tests/fixtures/otlp_receiver.py, the `opentelemetry-proto` messages): names,
//! attributes, the client's trace and parent, the context the upstream received, a sample ratio
//! of 0 that still keeps refusals and errors, and a collector that never answers.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use integration_tests::{
    daemon::Daemon,
    peers::{FakeUpstream, KillOnDrop, Misbehave, free_port, post, python, raw, wait_port},
    unique,
};

const KEY: &str = "otlp-test-key-0123456789";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// The receiver fixture on a free port, writing spans to a file removed on drop.
struct Receiver {
    _child: KillOnDrop,
    port: u16,
    out: PathBuf,
}

impl Receiver {
    fn start() -> Self {
        let port = free_port();
        let out = std::env::temp_dir().join(format!("{}.jsonl", unique("otlp-spans")));
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let child = Command::new(python())
            .arg(root.join("tests/fixtures/otlp_receiver.py"))
            .arg(port.to_string())
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the OTLP receiver");
        let child = KillOnDrop(child);
        wait_port(port, Duration::from_secs(30));
        Self {
            _child: child,
            port,
            out,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/v1/traces", self.port)
    }

    fn spans(&self) -> Vec<Value> {
        read_spans(&self.out)
    }

    /// Waits (at most 15 s) until a span satisfies `f`.
    fn wait_for(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| f(s)) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no span {what} received; got {:#?}",
                self.spans()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.out);
    }
}

fn read_spans(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn sha256_hex(s: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

struct Gateway {
    daemon: Daemon,
    port: u16,
    admin: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.daemon.stop();
    }
}

/// A gateway with route `/mcp` to `fake` and `/dead` to a port nothing listens on, an API key
/// for tenant `acme` (agent `acme-bot`) that may not call `forbidden`, and `otlp` as its
/// `[telemetry.otlp]` body.
fn gateway(fake: &FakeUpstream, otlp: &str) -> Gateway {
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwotlp");
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
[telemetry.otlp]
{otlp}
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
[[tenants.policy.tools]]
match = "forbidden"
action = "deny"
[[auth.api_keys]]
sha256 = "{key}"
tenant = "acme"
agent = "acme-bot"
[[upstreams]]
name = "fake"
url = "{fake}"
[[upstreams]]
name = "dead"
url = "http://127.0.0.1:{dead}/mcp"
[[routes]]
path = "/mcp"
upstream = "fake"
auth = ["api_key"]
[[routes]]
path = "/dead"
upstream = "dead"
auth = ["api_key"]
"#,
        key = sha256_hex(KEY),
        fake = fake.url(),
        dead = free_port(),
    );
    let daemon = Daemon::start_local(&instance, &config);
    Gateway {
        daemon,
        port,
        admin,
    }
}

fn call(tool: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
    )
}

fn headers(extra: &str) -> String {
    format!("x-api-key: {KEY}\r\nmcp-protocol-version: 2025-06-18\r\nmcp-run-id: run-42\r\n{extra}")
}

fn metric(g: &Gateway, line: &str) -> Option<u64> {
    let req = "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    let (r, _) = raw(g.admin, req.as_bytes());
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The request heads the fake upstream received that carry `needle`.
fn seen_with(fake: &FakeUpstream, needle: &str) -> Vec<String> {
    fake.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.contains(needle))
        .cloned()
        .collect()
}

fn field<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

#[test]
fn spans_carry_the_request_and_continue_the_clients_trace_upstream() {
    let receiver = Receiver::start();
    let fake = FakeUpstream::start(Misbehave::Answer);
    let g = gateway(
        &fake,
        &format!(
            "endpoint = \"{}\"\nsample_ratio = 1.0\nservice_name = \"gw-under-test\"\nheaders = {{ x-test = \"sent\" }}",
            receiver.endpoint()
        ),
    );

    // Allowed, under the client's trace, with a valid tracestate.
    let tp = format!(
        "traceparent: 00-{TRACE}-{PARENT}-01\r\ntracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7\r\n"
    );
    let (r, _) = raw(g.port, &post("/mcp", &call("echo"), &headers(&tp)));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Refused by a rule, under another client trace.
    let refused_trace = "0af7651916cd43dd8448eb211c80319c";
    let tp2 = format!("traceparent: 00-{refused_trace}-b7ad6b7169203331-00\r\n");
    let (r, _) = raw(g.port, &post("/mcp", &call("forbidden"), &headers(&tp2)));
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));

    // A tracestate that is not valid W3C never reaches the upstream.
    let tp3 = "traceparent: 00-11111111111111111111111111111111-2222222222222222-01\r\ntracestate: Evil=1;x\r\n";
    let (r, _) = raw(g.port, &post("/mcp", &call("smuggle"), &headers(tp3)));
    assert_eq!(r.status, 200);

    let ok = receiver.wait_for("for the allowed call", |s| {
        s["trace_id"] == TRACE && s["name"] == "tools/call echo"
    });
    assert_eq!(ok["parent_span_id"], PARENT, "{ok:#}");
    assert_eq!(ok["kind"], 2, "SERVER: {ok:#}");
    assert_eq!(ok["resource"]["service.name"], "gw-under-test");
    assert_eq!(ok["content_type"], "application/x-protobuf");
    assert_eq!(ok["x_test"], "sent", "configured headers are sent");
    assert_eq!(attr(&ok, "http.route"), "/mcp");
    assert_eq!(attr(&ok, "http.request.method"), "POST");
    assert_eq!(attr(&ok, "mcp.method.name"), "tools/call");
    assert_eq!(attr(&ok, "gen_ai.tool.name"), "echo");
    assert_eq!(attr(&ok, "mcp_gateway.tenant"), "acme");
    assert_eq!(attr(&ok, "mcp_gateway.agent"), "acme-bot");
    assert_eq!(attr(&ok, "mcp_gateway.run"), "run-42");
    assert_eq!(attr(&ok, "mcp_gateway.upstream"), "fake");
    assert_eq!(attr(&ok, "mcp_gateway.outcome"), "ok");
    assert!(
        attr(&ok, "mcp_gateway.gateway_us").as_i64().is_some(),
        "{ok:#}"
    );
    assert!(
        attr(&ok, "mcp_gateway.upstream_us").as_i64().is_some(),
        "{ok:#}"
    );
    assert!(attr(&ok, "mcp_gateway.refusal.rule").is_null(), "{ok:#}");
    assert!(ok["end"].as_u64() >= ok["start"].as_u64());
    let span_id = ok["span_id"].as_str().unwrap();
    assert_ne!(span_id, PARENT);

    // The upstream got one traceparent: the same trace, the gateway's span as its parent; the
    // client's tracestate went with it.
    let heads = seen_with(&fake, "\"echo\"");
    let heads = if heads.is_empty() {
        fake.seen.lock().unwrap().clone()
    } else {
        heads
    };
    let head = heads
        .iter()
        .find(|h| h.contains(TRACE))
        .unwrap_or_else(|| panic!("no upstream request in trace {TRACE}: {heads:#?}"));
    assert_eq!(
        field(head, "traceparent"),
        [format!("00-{TRACE}-{span_id}-01").as_str()],
        "{head}"
    );
    assert_eq!(
        field(head, "tracestate"),
        ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]
    );

    let refused = receiver.wait_for("for the refusal", |s| s["trace_id"] == refused_trace);
    assert_eq!(refused["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(refused["name"], "tools/call forbidden");
    assert_eq!(attr(&refused, "mcp_gateway.outcome"), "refused");
    assert_eq!(refused["status"], 2, "ERROR: {refused:#}");
    assert!(
        attr(&refused, "mcp_gateway.refusal.rule")
            .as_str()
            .is_some_and(|r| r.contains("tools")),
        "{refused:#}"
    );

    let head = fake
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|h| h.contains("11111111111111111111111111111111"))
        .cloned()
        .expect("the third call reached the upstream");
    assert!(field(&head, "tracestate").is_empty(), "{head}");
    assert_eq!(field(&head, "traceparent").len(), 1, "{head}");
    assert!(
        !head.contains("2222222222222222"),
        "the client's span id is replaced: {head}"
    );
    assert!(
        fake.seen
            .lock()
            .unwrap()
            .iter()
            .all(|h| !h.contains(refused_trace))
    );
}

#[test]
fn at_sample_ratio_zero_only_refusals_and_errors_are_exported() {
    let receiver = Receiver::start();
    let fake = FakeUpstream::start(Misbehave::Answer);
    let g = gateway(
        &fake,
        &format!(
            "endpoint = \"{}\"\nsample_ratio = 0.0\nalways_sample_errors = true",
            receiver.endpoint()
        ),
    );
    // Allowed, and flagged sampled by the client: still not exported.
    let ok_trace = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let tp = format!("traceparent: 00-{ok_trace}-{PARENT}-01\r\n");
    for _ in 0..5 {
        let (r, _) = raw(g.port, &post("/mcp", &call("echo"), &headers(&tp)));
        assert_eq!(r.status, 200);
    }
    // The upstream still gets the context, marked not sampled.
    let heads = fake.seen.lock().unwrap().clone();
    assert!(
        heads.iter().all(|h| field(h, "traceparent")
            .first()
            .is_some_and(|tp| tp.starts_with(&format!("00-{ok_trace}-")) && tp.ends_with("-00"))),
        "{heads:#?}"
    );
    let (r, _) = raw(g.port, &post("/mcp", &call("forbidden"), &headers("")));
    assert_eq!(r.status, 403);
    let (r, _) = raw(g.port, &post("/dead", &call("echo"), &headers("")));
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));

    let refused = receiver.wait_for("for the refusal", |s| {
        s["attributes"]["mcp_gateway.outcome"] == "refused"
    });
    assert_eq!(refused["parent_span_id"], "", "a new trace: {refused:#}");
    let failed = receiver.wait_for("for the upstream failure", |s| {
        s["attributes"]["mcp_gateway.outcome"] == "upstream_failure"
    });
    assert_eq!(attr(&failed, "http.route"), "/dead");
    assert_eq!(attr(&failed, "mcp_gateway.upstream"), "dead");
    // Two more export rounds: nothing else arrives.
    std::thread::sleep(Duration::from_millis(1500));
    let spans = receiver.spans();
    assert_eq!(
        spans.len(),
        2,
        "only the refusal and the failure: {spans:#?}"
    );
    assert!(spans.iter().all(|s| s["trace_id"] != ok_trace));
    assert_eq!(
        metric(&g, "mcp_gateway_otlp_spans_total{result=\"exported\"}"),
        Some(2)
    );
}

#[test]
fn a_collector_that_never_answers_does_not_hold_up_requests() {
    // Accepts connections and never answers.
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let cport = collector.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = std::sync::Arc::clone(&held);
    std::thread::spawn(move || {
        for c in collector.incoming().flatten() {
            keep.lock().unwrap().push(c);
        }
    });
    let fake = FakeUpstream::start(Misbehave::Answer);
    let g = gateway(
        &fake,
        &format!(
            "endpoint = \"http://127.0.0.1:{cport}/v1/traces\"\nsample_ratio = 1.0\ntimeout_ms = 100\nbatch_max = 4\nqueue_max = 16"
        ),
    );
    for i in 0..200 {
        let (r, _) = raw(g.port, &post("/mcp", &call("echo"), &headers("")));
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.json()["result"].is_object(), "request {i}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let failed = metric(&g, "mcp_gateway_otlp_spans_total{result=\"failed\"}").unwrap_or(0);
        let dropped = metric(&g, "mcp_gateway_otlp_spans_total{result=\"dropped\"}").unwrap_or(0);
        if failed > 0 && dropped > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed and dropped spans counted (failed {failed}, dropped {dropped})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric(&g, "mcp_gateway_otlp_spans_total{result=\"exported\"}"),
        Some(0)
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "the gateway tried the collector"
    );
}
