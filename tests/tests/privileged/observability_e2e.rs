//! Telemetry through the real daemon on loopback: exact request counts in `/metrics` after known
//! traffic, read by Prometheus's own parser; `/stats` percentiles against the client's own
//! measurement; the admin token; `gateway top` in a real terminal (tmux).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    peers::{FakeUpstream, Misbehave, demo_upstream, free_port, post, raw},
    unique,
};

const TOKEN: &str = "test-admin-token-0123456789";

/// An API key of tenant `acme` in the access log's test, and its SHA-256.
const KEY: &str = "access-test-key-0123456789";
const KEY_SHA256: &str = "32cee02085b25c71240157399235c9aed755f74587c4f4790a9c7e02358b53f8";

struct Gateway {
    daemon: Daemon,
    port: u16,
    admin: u16,
}

/// A gateway with routes `/demo` (the demo upstream), `/slow` (an upstream that waits as long as
/// each request asks) and `/dead` (nothing listens), an admin token, and a histogram log.
fn start(demo_port: u16, slow: &FakeUpstream, hlog: &std::path::Path) -> Gateway {
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwobs");
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
token_env = "GW_TEST_ADMIN_TOKEN"
[kernel]
enabled = false
default_tenant = "others"
[telemetry]
histogram_log = "{hlog}"
[[tenants]]
name = "others"
id = 0
[[tenants]]
name = "loopback"
id = 3
sources = ["127.0.0.0/8"]
new_connections_per_sec = 100000
new_connections_burst = 100000
[[upstreams]]
name = "demo"
url = "http://127.0.0.1:{demo_port}/mcp"
[[upstreams]]
name = "slow"
url = "{slow}"
[[upstreams]]
name = "dead"
url = "http://127.0.0.1:{dead}/mcp"
[[routes]]
path = "/demo"
upstream = "demo"
[[routes]]
path = "/slow"
upstream = "slow"
[[routes]]
path = "/dead"
upstream = "dead"
"#,
        hlog = hlog.display(),
        slow = slow.url(),
        dead = free_port(),
    );
    let daemon =
        Daemon::start_local_with_env(&instance, &config, &[("GW_TEST_ADMIN_TOKEN", TOKEN)]);
    Gateway {
        daemon,
        port,
        admin,
    }
}

fn call(tool: &str, args: &str, id: u32) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{args},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}}}}"#
    )
}

fn headers(tool: &str) -> String {
    format!("mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {tool}\r\n")
}

/// GET on the admin API with (or without) the token.
fn admin_get(admin: u16, path: &str, token: bool) -> integration_tests::peers::RawResponse {
    let auth = if token {
        format!("authorization: Bearer {TOKEN}\r\n")
    } else {
        String::new()
    };
    raw(
        admin,
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}connection: close\r\n\r\n")
            .as_bytes(),
    )
    .0
}

/// Polls `/metrics` until `needle` appears (workers ship once a second), at most 10 s.
fn metrics_with(admin: u16, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&admin_get(admin, "/metrics", true).body).into_owned();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_count_known_traffic_exactly_and_prometheus_parses_them() {
    let demo_port = free_port();
    let _demo = demo_upstream(demo_port);
    let slow = FakeUpstream::start(Misbehave::DelayFromBody);
    let hlog = std::env::temp_dir().join(format!("{}.hlog", unique("gwobs")));
    let mut g = start(demo_port, &slow, &hlog);
    for i in 0..37 {
        let (r, _) = raw(
            g.port,
            &post(
                "/demo",
                &call("add", r#"{"a":1,"b":2}"#, i),
                &headers("add"),
            ),
        );
        assert_eq!(r.status, 200);
    }
    // A tool that runs and fails: `echo` without its argument answers isError: true.
    for i in 0..5 {
        raw(
            g.port,
            &post("/demo", &call("echo", "{}", i), &headers("echo")),
        );
    }
    for _ in 0..3 {
        let (r, _) = raw(g.port, &post("/demo", "{not json", ""));
        assert_eq!(r.status, 400);
    }
    for i in 0..2 {
        let (r, _) = raw(
            g.port,
            &post("/dead", &call("add", "{}", i), &headers("add")),
        );
        assert_eq!(r.status, 502);
    }
    let want = [
        (
            r#"route="/demo",method="tools/call",tool="add",tenant="loopback",outcome="ok""#,
            37,
        ),
        (
            r#"route="/demo",method="tools/call",tool="echo",tenant="loopback",outcome="tool_error""#,
            5,
        ),
        (
            r#"route="/demo",method="other",tool="",tenant="loopback",outcome="refused""#,
            3,
        ),
        (
            r#"route="/dead",method="tools/call",tool="add",tenant="loopback",outcome="upstream_failure""#,
            2,
        ),
    ];
    let text = metrics_with(g.admin, r#"outcome="upstream_failure"} 2"#);
    for (labels, n) in want {
        let line = format!("mcp_gateway_requests_total{{{labels}}} {n}");
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    assert!(
        text.contains(r#"mcp_gateway_tool_latency_seconds_count{tool="add",kind="total"} 39"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"mcp_gateway_upstream_latency_seconds_count{upstream="demo",kind="upstream"} 42"#
        ),
        "{text}"
    );

    // Prometheus's own text-format parser reads every family and sample.
    let parsed = integration_tests::peers::py_script(
        r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
fams = list(text_string_to_metric_families(sys.stdin.read() if len(sys.argv) < 2 else open(sys.argv[1]).read()))
out = {f.name: {"type": f.type, "samples": len(f.samples)} for f in fams}
add = [s for f in fams for s in f.samples if s.name == "mcp_gateway_requests_total" and s.labels.get("tool") == "add" and s.labels.get("outcome") == "ok"]
out["add_ok"] = add[0].value if add else None
inf = [s.value for f in fams for s in f.samples if s.name == "mcp_gateway_tool_latency_seconds_bucket" and s.labels.get("tool") == "add" and s.labels.get("kind") == "total" and s.labels.get("le") == "+Inf"]
out["add_inf"] = inf[0] if inf else None
print(json.dumps(out))
"#,
        &[&{
            let path = std::env::temp_dir().join(format!("{}.prom", unique("metrics")));
            std::fs::write(&path, &text).unwrap();
            path.display().to_string()
        }],
    );
    assert_eq!(
        parsed["mcp_gateway_requests"]["type"], "counter",
        "{parsed}"
    );
    assert_eq!(
        parsed["mcp_gateway_tool_latency_seconds"]["type"], "histogram",
        "{parsed}"
    );
    assert_eq!(
        parsed["mcp_gateway_connections"]["type"], "gauge",
        "{parsed}"
    );
    assert_eq!(parsed["add_ok"], 37.0);
    assert_eq!(parsed["add_inf"], 39.0);

    // The admin API wants its token; health checks do not.
    assert_eq!(admin_get(g.admin, "/metrics", false).status, 401);
    assert_eq!(admin_get(g.admin, "/stats", false).status, 401);
    assert_eq!(admin_get(g.admin, "/healthz", false).status, 200);
    assert_eq!(admin_get(g.admin, "/readyz", false).status, 200);
    assert_eq!(admin_get(g.admin, "/stats?window=2h", true).status, 400);

    // The histogram log has interval lines in the standard format.
    let log = std::fs::read_to_string(&hlog).unwrap();
    assert!(log.contains(
        "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
    ));
    assert!(log.lines().any(|l| l.starts_with("Tag=tool=add,")), "{log}");
    let _ = std::fs::remove_file(&hlog);
    g.daemon.stop();
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[test]
fn stats_percentiles_agree_with_the_clients_own_measurement() {
    let demo_port = free_port();
    let _demo = demo_upstream(demo_port);
    let slow = FakeUpstream::start(Misbehave::DelayFromBody);
    let hlog = std::env::temp_dir().join(format!("{}.hlog", unique("gwobs")));
    let mut g = start(demo_port, &slow, &hlog);
    // 200 calls whose upstream takes 1..=100 ms, measured by the client around each call.
    let mut seen = Vec::new();
    let (_, mut conn) = raw(
        g.port,
        &post(
            "/slow",
            &call("wait", r#"{"delay_ms":1}"#, 0),
            &headers("wait"),
        ),
    );
    for i in 0..200u32 {
        let delay = 1 + (i * 37) % 100;
        let req = post(
            "/slow",
            &call("wait", &format!(r#"{{"delay_ms":{delay}}}"#), i),
            &headers("wait"),
        );
        let started = Instant::now();
        std::io::Write::write_all(&mut conn, &req).unwrap();
        let r = integration_tests::peers::read_response(&mut conn).expect("an answer");
        seen.push(started.elapsed().as_micros() as u64);
        assert_eq!(r.status, 200);
    }
    seen.sort_unstable();
    let stats = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = admin_get(g.admin, "/stats?window=1m", true).json();
            let n = s["series"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["dim"] == "tool" && x["name"] == "wait")
                .map(|x| x["count"].as_u64().unwrap());
            if n == Some(201) || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let wait = stats["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["dim"] == "tool" && x["name"] == "wait")
        .expect("a series for the tool")
        .clone();
    assert_eq!(wait["count"], 201, "{wait}");
    // The gateway's figure leaves out the client's side of loopback, and the histogram keeps two
    // significant digits: it is never above the client's by more than 1% plus 1.5 ms. Below it,
    // by what the client's own threads wait for a core on a busy machine: 3% plus 3 ms (a run
    // beside a build measured 92.7 ms against the client's 95.9).
    for (q, key) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
        let client = percentile(&seen, q);
        let gateway = wait["total_us"][key].as_u64().unwrap();
        let slack = client / 100 + 1_500;
        assert!(
            gateway <= client + slack && gateway + client * 3 / 100 + 3_000 >= client,
            "{key}: gateway {gateway} µs, client {client} µs"
        );
        // And nearly all of it was the upstream's.
        let upstream = wait["upstream_us"][key].as_u64().unwrap();
        assert!(
            upstream + slack >= gateway,
            "{key}: upstream {upstream} of {gateway} µs"
        );
    }
    let _ = std::fs::remove_file(&hlog);
    g.daemon.stop();
}

#[test]
fn gateway_top_shows_live_figures_in_a_terminal() {
    let demo_port = free_port();
    let _demo = demo_upstream(demo_port);
    let slow = FakeUpstream::start(Misbehave::DelayFromBody);
    let hlog = std::env::temp_dir().join(format!("{}.hlog", unique("gwobs")));
    let mut g = start(demo_port, &slow, &hlog);
    let port = g.port;
    // Steady traffic for the view to show, for a bounded time.
    let traffic = std::thread::spawn(move || {
        let (_, mut conn) = raw(
            port,
            &post(
                "/demo",
                &call("word_count", r#"{"text":"a b"}"#, 0),
                &headers("word_count"),
            ),
        );
        let until = Instant::now() + Duration::from_secs(6);
        let mut i = 1;
        while Instant::now() < until {
            let req = post(
                "/demo",
                &call("word_count", r#"{"text":"a b"}"#, i),
                &headers("word_count"),
            );
            std::io::Write::write_all(&mut conn, &req).unwrap();
            integration_tests::peers::read_response(&mut conn).expect("an answer");
            i += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let session = unique("gwtop");
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(args)
            .output()
            .expect("tmux (cargo xtask setup installs it)")
    };
    let gateway_bin = std::env::var("GATEWAY_BIN").expect("GATEWAY_BIN");
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "140",
        "-y",
        "45",
        "-e",
        &format!("GW_TEST_ADMIN_TOKEN={TOKEN}"),
        &format!(
            "{gateway_bin} top --admin 127.0.0.1:{} --token-env GW_TEST_ADMIN_TOKEN --window 10s --interval-ms 500",
            g.admin
        ),
    ]);
    assert!(started.status.success(), "{started:?}");
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let screen = loop {
        let out = tmux(&["capture-pane", "-p", "-t", &session]);
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        let row = screen.lines().find(|l| l.contains("│word_count"));
        let rate = row
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok());
        if rate.is_some_and(|r| r > 0.0) || Instant::now() > deadline {
            break screen;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(screen.contains("mcp-gateway top"), "{screen}");
    let row = screen
        .lines()
        .find(|l| l.contains("│word_count"))
        .unwrap_or_else(|| panic!("no tool row:\n{screen}"));
    let cells: Vec<&str> = row.trim_matches('│').split_whitespace().collect();
    assert!(cells[1].parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!(cells[2], "0.0%", "{row}");
    assert!(
        cells[3].ends_with("µs") || cells[3].ends_with("ms"),
        "{row}"
    );
    assert!(screen.contains("│loopback"), "the tenant row:\n{screen}");
    assert!(screen.contains("latency of tool `word_count`"), "{screen}");
    // q quits.
    tmux(&["send-keys", "-t", &session, "q"]);
    let gone = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !tmux(&["has-session", "-t", &session]).status.success()
    });
    assert!(gone, "top did not quit on q");
    traffic.join().unwrap();
    let _ = std::fs::remove_file(&hlog);
    g.daemon.stop();
}

#[test]
fn w3c_trace_context_reaches_the_upstream_and_the_audit_log() {
    let up = FakeUpstream::start(Misbehave::Answer);
    let port = integration_tests::peers::free_port();
    let instance = integration_tests::unique("gwtrace");
    let audit = std::env::temp_dir().join(format!("{instance}-audit.jsonl"));
    let config = format!(
        "[gateway]\ninstance = \"{instance}\"\nworkers = 1\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
         [admin]\naddress = \"127.0.0.1:{}\"\n[kernel]\nenabled = false\n[audit]\npath = \"{}\"\n\
         [[upstreams]]\nname = \"u0\"\nurl = \"{}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n",
        integration_tests::peers::free_port(),
        audit.display(),
        up.url()
    );
    let mut d = integration_tests::daemon::Daemon::start_local(&instance, &config);
    // In `_meta` only: the gateway adds the header for the upstream.
    let in_meta = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{}},"_meta":{{"traceparent":"{in_meta}"}}}}}}"#
    );
    assert_eq!(raw(port, &post("/mcp", &body, "")).0.status, 200);
    // In the header: passed as it is.
    let in_header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let body =
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let headers = format!("traceparent: {in_header}\r\n");
    assert_eq!(raw(port, &post("/mcp", body, &headers)).0.status, 200);
    let seen = up.seen.lock().unwrap().join("").to_lowercase();
    assert!(seen.contains(&format!("traceparent: {in_meta}")), "{seen}");
    assert!(
        seen.contains(&format!("traceparent: {in_header}")),
        "{seen}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let traces: Vec<String> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["trace_id"]
                .as_str()
                .unwrap_or("-")
                .to_owned()
        })
        .collect();
    assert_eq!(
        traces,
        [
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "0af7651916cd43dd8448eb211c80319c"
        ]
    );
    d.stop();
    let _ = std::fs::remove_file(&audit);
}

/// The access log: one JSON line per request with exactly the configured fields, in their
/// order, the answered status included, whatever answered (the upstream, a refusal, an unknown
/// route); separate from the audit log (which is off here).
#[test]
fn the_access_log_has_a_line_per_request_with_the_configured_fields() {
    let demo_port = free_port();
    let _demo = demo_upstream(demo_port);
    let temp = integration_tests::TempDir::new("gwaccess");
    let dir = &temp.0;
    let log = dir.join("access.log");
    let audit = dir.join("audit.log");
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwaccess");
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
[telemetry.access_log]
path = "{log}"
fields = ["method", "path", "status", "rpc_method", "tool", "outcome", "latency_us", "user_agent"]
anonymous_refusals_per_second = 5
[audit]
path = "{audit}"
anonymous_refusals_per_second = 5
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
[[auth.api_keys]]
sha256 = "{KEY_SHA256}"
tenant = "acme"
[[upstreams]]
name = "demo"
url = "http://127.0.0.1:{demo_port}/mcp"
[[routes]]
path = "/demo"
upstream = "demo"
[[routes]]
path = "/keyed"
upstream = "demo"
auth = ["api_key"]
"#,
        log = log.display(),
        audit = audit.display(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let (r, _) = raw(
        port,
        &post(
            "/demo",
            &call("add", r#"{"a":2,"b":40}"#, 1),
            &headers("add"),
        ),
    );
    assert_eq!(r.status, 200);
    let (r, _) = raw(
        port,
        &post("/nowhere", &call("add", "{}", 2), &headers("add")),
    );
    assert_eq!(r.status, 404);
    // A User-Agent of 4,000 bytes is logged as its first 256.
    let long_agent = format!("{}user-agent: {}\r\n", headers("add"), "u".repeat(4000));
    let (r, _) = raw(port, &post("/demo", "{not json", &long_agent));
    assert_eq!(r.status, 400);
    // A method HTTP does not define is logged as `_OTHER`: a client's 4,000-byte method went
    // into the line as sent.
    let long_method = "X".repeat(4000);
    let (r, _) = raw(
        port,
        format!("{long_method} /demo HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\r\n").as_bytes(),
    );
    assert_eq!(r.status, 405);
    assert!(
        r.body.len() < 400,
        "the method was echoed whole: {} bytes",
        r.body.len()
    );
    // Written within ~50 ms by the log's own thread.
    let mut lines = log_lines_until(&log, |lines| lines.len() >= 4);
    assert_eq!(lines.len(), 4, "{lines:?}");
    // A line is handed to the log's thread once its answer is written: the client's next
    // request, served by the other worker, may be logged first (a run of 2026-11-30 logged the
    // 400 before the 404).
    lines.sort_by_key(|l| l["status"].as_u64());
    // The order as written (serde_json's own map would sort the keys).
    let written = std::fs::read_to_string(&log).unwrap();
    let first = written.lines().next().unwrap();
    let fields = [
        "method",
        "path",
        "status",
        "rpc_method",
        "tool",
        "outcome",
        "latency_us",
        "user_agent",
    ];
    let at: Vec<usize> = fields
        .iter()
        .map(|f| {
            first
                .find(&format!("\"{f}\":"))
                .unwrap_or_else(|| panic!("{f} in {first}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "in order: {first}");
    assert_eq!(
        lines[0].as_object().unwrap().len(),
        fields.len(),
        "exactly the configured fields: {first}"
    );
    assert_eq!(lines[0]["path"], "/demo");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["rpc_method"], "tools/call");
    assert_eq!(lines[0]["tool"], "add");
    assert_eq!(lines[0]["outcome"], "ok");
    assert!(lines[0]["latency_us"].as_u64().is_some_and(|us| us > 0));
    assert_eq!(lines[1]["path"], "/demo");
    assert_eq!(lines[1]["status"], 400);
    assert_ne!(lines[1]["outcome"], "ok");
    assert_eq!(lines[1]["user_agent"], "u".repeat(256));
    assert_eq!(lines[2]["path"], "/nowhere");
    assert_eq!(lines[2]["status"], 404);
    assert_eq!(lines[0]["method"], "POST");
    assert_eq!(lines[3]["status"], 405);
    assert_eq!(lines[3]["method"], "_OTHER");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o640
    );

    // Errors the gateway answers itself to callers no credential names are anyone's to send
    // as fast as the network takes them, the default tenant's callers' included: at most
    // `anonymous_refusals_per_second` (5) of their lines a second, and a line a second says how
    // many more there were. A caller a key names gets every line. Before the bound, each of
    // these was a line (and, bounded only for callers without a tenant, every 400 of the
    // default tenant's: a review's 300 in 0.05 s).
    let keyed = format!("{}x-api-key: {KEY}\r\n", headers("add"));
    let flood = Instant::now();
    for i in 0..60 {
        let (r, _) = raw(
            port,
            &post("/flood", &call("add", "{}", 100 + i), &headers("add")),
        );
        assert_eq!(r.status, 404);
        let (r, _) = raw(port, &post("/demo", "{not json", &headers("add")));
        assert_eq!(r.status, 400, "the default tenant's");
        let (r, _) = raw(port, &post("/keyed", "{not json", &keyed));
        assert_eq!(r.status, 400, "acme's, by its key");
    }
    let seconds = flood.elapsed().as_secs();
    let count = |lines: &[serde_json::Value]| {
        // The 400 to /demo before the flood is among them.
        let flooded = lines
            .iter()
            .filter(|l| l["path"] == "/flood" || l["path"] == "/demo" && l["status"] == 400)
            .count();
        let suppressed: u64 = lines.iter().filter_map(|l| l["suppressed"].as_u64()).sum();
        let identified = lines.iter().filter(|l| l["path"] == "/keyed").count();
        (flooded, suppressed, identified)
    };
    let lines = log_lines_until(&log, |lines| {
        let (flooded, suppressed, identified) = count(lines);
        flooded as u64 + suppressed >= 121 && identified == 60
    });
    let (flooded, suppressed, identified) = count(&lines);
    assert_eq!(identified, 60, "every line of a caller a key names");
    assert_eq!(
        flooded as u64 + suppressed,
        121,
        "each anonymous refusal written or counted: {flooded} and {suppressed}"
    );
    assert!(
        flooded as u64 <= 5 * (seconds + 2) + 1,
        "{flooded} lines in {seconds} s of the flood"
    );
    let note = lines
        .iter()
        .find(|l| l.get("suppressed").is_some())
        .unwrap();
    assert!(
        note["reason"].as_str().unwrap().contains("over 5 a second"),
        "{note}"
    );
    assert!(note["ts"].is_string(), "{note}");
    let metrics = String::from_utf8_lossy(&admin_get(admin, "/metrics", false).body).into_owned();
    assert!(
        metrics.contains(&format!(
            "mcp_gateway_access_log_dropped_total{{reason=\"anonymous_refusal\"}} {suppressed}\n"
        )),
        "{metrics}"
    );
    // The audit log, likewise: the 61 anonymous refusals on `/demo` are written or counted,
    // at most 5 a second; acme's 60 are all written.
    let tally = |records: &[serde_json::Value]| {
        let refused = records
            .iter()
            .filter(|r| r["route"] == "/demo" && r["decision"] == "refused")
            .count();
        let counted = records
            .iter()
            .filter_map(|r| r["suppressed"].as_u64())
            .sum::<u64>();
        let keyed = records.iter().filter(|r| r["route"] == "/keyed").count();
        (refused, counted, keyed)
    };
    let (refused, counted, keyed) = tally(&log_lines_until(&audit, |records| {
        let (refused, counted, keyed) = tally(records);
        refused as u64 + counted >= 61 && keyed == 60
    }));
    assert_eq!(keyed, 60, "every record of a caller a key names");
    assert_eq!(
        refused as u64 + counted,
        61,
        "{refused} written, {counted} counted"
    );
    assert!(
        refused as u64 <= 5 * (seconds + 2) + 1,
        "{refused} in {seconds} s"
    );
    let metrics = String::from_utf8_lossy(&admin_get(admin, "/metrics", false).body).into_owned();
    assert!(
        metrics.contains(&format!(
            "mcp_gateway_audit_dropped_total{{reason=\"anonymous_refusal\"}} {counted}\n"
        )),
        "{metrics}"
    );
    d.stop();
}

/// A request the gateway refuses before it is read whole (a head too large, a body too large,
/// framing that contradicts itself, a body that never comes) is counted and logged as every
/// refusal is: in `/metrics` (its route when its head named one), the access log, and the
/// audit log when it names a route. Before, they were answered and recorded nowhere: 200 such
/// refusals beside 10 good calls showed in `gateway top` as "10 requests, errors 0.00%" (an
/// operator's review).
#[test]
fn requests_refused_before_they_are_read_whole_are_counted_and_logged() {
    let demo_port = free_port();
    let _demo = demo_upstream(demo_port);
    let temp = integration_tests::TempDir::new("gwunread");
    let dir = &temp.0;
    let log = dir.join("access.log");
    let audit = dir.join("audit.log");
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwunread");
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
[http]
max_body_bytes = 4096
max_header_bytes = 4096
request_timeout_ms = 1000
[telemetry.access_log]
path = "{log}"
fields = ["method", "path", "status", "outcome"]
[audit]
path = "{audit}"
[[tenants]]
name = "public"
id = 0
[[upstreams]]
name = "demo"
url = "http://127.0.0.1:{demo_port}/mcp"
[[routes]]
path = "/demo"
upstream = "demo"
"#,
        log = log.display(),
        audit = audit.display(),
    );
    let mut d = Daemon::start_local(&instance, &config);
    let big = "x".repeat(8000);
    let sent: [(&str, Vec<u8>, u16); 5] = [
        (
            "head too large",
            format!("POST /demo HTTP/1.1\r\nhost: gw\r\nx-big: {big}\r\ncontent-length: 0\r\n\r\n")
                .into_bytes(),
            431,
        ),
        (
            "body too large",
            format!("POST /demo HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 8000\r\n\r\n{big}")
                .into_bytes(),
            413,
        ),
        (
            "both framings",
            b"POST /demo HTTP/1.1\r\nhost: gw\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a field name of 1,900 bytes twice",
            format!(
                "POST /demo HTTP/1.1\r\nhost: gw\r\nmcp-param-{long}: 1\r\nmcp-param-{long}: 2\r\ncontent-length: 0\r\n\r\n",
                long = "a".repeat(1900)
            )
            .into_bytes(),
            400,
        ),
        (
            "a body that never comes",
            b"POST /demo HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{".to_vec(),
            408,
        ),
    ];
    for (what, bytes, status) in &sent {
        let (r, _) = raw(port, bytes);
        assert_eq!(r.status, *status, "{what}: {r:?}");
    }
    let mut lines = log_lines_until(&log, |lines| lines.len() >= sent.len());
    lines.sort_by_key(|l| l["status"].as_u64());
    let statuses: Vec<u64> = lines.iter().filter_map(|l| l["status"].as_u64()).collect();
    assert_eq!(statuses, [400, 400, 408, 413, 431], "{lines:?}");
    for line in &lines {
        assert_eq!(line["outcome"], "refused", "{line}");
    }
    // Those whose head was read name its path (not the head too large).
    for line in &lines[..4] {
        assert_eq!(line["path"], "/demo", "{lines:?}");
        assert_eq!(line["method"], "POST", "{lines:?}");
    }
    assert_eq!(lines[4]["path"], "", "{lines:?}");
    let refused = |text: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("mcp_gateway_requests_total{") && l.contains(r#"outcome="refused""#)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (m, _) = raw(
            admin,
            b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
        );
        let text = String::from_utf8_lossy(&m.body).into_owned();
        if refused(&text) >= 5 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(refused(&text), 5, "{text}");
    assert!(
        text.contains(r#"mcp_gateway_requests_total{route="/demo""#),
        "{text}"
    );
    // The audit log has those that named a route (the head too large named none).
    let audited = log_lines_until(&audit, |lines| lines.len() >= 4);
    assert_eq!(audited.len(), 4, "{audited:?}");
    for line in &audited {
        assert_eq!(line["decision"], "refused", "{line}");
        assert_eq!(line["route"], "/demo", "{line}");
        // What the client wrote into the reason is clipped.
        let reason = line["reason"].as_str().unwrap_or_default();
        assert!(reason.len() <= 256, "{} bytes: {reason}", reason.len());
    }
    d.stop();
}

/// The JSON lines of a log the gateway writes, read again every 50 ms until `done` says they
/// are all there (5 s at most). Whole lines only: the writer's buffer may have gone to the
/// file in the middle of one.
fn log_lines_until(
    path: &std::path::Path,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        lines = whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if done(&lines) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    lines
}
