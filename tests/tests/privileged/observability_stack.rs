//! The observability stack as an operator wires it: a real Prometheus (Debian package) scrapes
//! a gateway under known traffic and its `histogram_quantile` of the gateway's share agrees with
//! the gateway's `/stats` within one bucket; `promtool check metrics` on the live `/metrics`;
//! `promtool test rules` on the shipped alert rules; every query of the shipped Grafana
//! dashboard accepted by that Prometheus; `gateway top --once` and its error cases with and
//! without a terminal.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    peers::{FakeUpstream, KillOnDrop, Misbehave, free_port, post, raw},
    unique,
};

const TOKEN: &str = "stack-admin-token-0123456789";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Gateway {
    daemon: Daemon,
    port: u16,
    admin: u16,
}

fn start(upstream: &FakeUpstream) -> Gateway {
    start_with(upstream, "")
}

/// As [`start`], with `telemetry` (TOML lines) in a `[telemetry]` table.
fn start_with(upstream: &FakeUpstream, telemetry: &str) -> Gateway {
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwstack");
    let config = format!(
        "[gateway]\ninstance = \"{instance}\"\nworkers = 1\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
         [admin]\naddress = \"127.0.0.1:{admin}\"\ntoken_env = \"GW_STACK_TOKEN\"\n[kernel]\nenabled = false\n\
         [telemetry]\n{telemetry}\n[[upstreams]]\nname = \"u0\"\nurl = \"{}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n",
        upstream.url()
    );
    let daemon = Daemon::start_local_with_env(&instance, &config, &[("GW_STACK_TOKEN", TOKEN)]);
    Gateway {
        daemon,
        port,
        admin,
    }
}

fn admin_get(admin: u16, path: &str, accept: &str) -> integration_tests::peers::RawResponse {
    raw(
        admin,
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {TOKEN}\r\naccept: {accept}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .0
}

const CALL: &str =
    r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;

/// `n` calls, one in ten with a W3C trace context (for exemplars).
fn traffic(port: u16, n: u32) {
    for i in 0..n {
        let extra = if i % 10 == 0 {
            format!(
                "traceparent: 00-{:032x}-00f067aa0ba902b7-01\r\n",
                0xabc0 + i
            )
        } else {
            String::new()
        };
        assert_eq!(raw(port, &post("/mcp", CALL, &extra)).0.status, 200);
    }
}

#[test]
fn the_histogram_log_is_read_by_hdrhistograms_own_python_reader() {
    let upstream = FakeUpstream::start(Misbehave::Answer);
    let hlog = std::env::temp_dir().join(format!("{}.hlog", unique("gwstack")));
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(hlog.clone());
    let mut g = start_with(
        &upstream,
        &format!("histogram_log = \"{}\"", hlog.display()),
    );
    traffic(g.port, 50);
    // Workers ship once a second; the log is written as intervals arrive.
    let read = || {
        integration_tests::peers::py_script(
            r#"
import json, sys
from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader
reader = HistogramLogReader(sys.argv[1], HdrHistogram(1, 60000000, 2))
count, tags = 0, set()
while True:
    h = reader.get_next_interval_histogram()
    if h is None:
        break
    tags.add(h.get_tag())
    if h.get_tag() == "route=/mcp":
        count += h.get_total_count()
print(json.dumps({"count": count, "tags": sorted(t or "" for t in tags)}))
"#,
            &[&hlog.display().to_string()],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = read();
        if got["count"] == 50 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(got["count"], 50, "{got}");
    assert!(
        got["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "tool=echo"),
        "{got}"
    );
    g.daemon.stop();
}

struct Prometheus {
    _child: KillOnDrop,
    port: u16,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Prometheus scraping the gateway's admin API every second, with the token.
fn prometheus(admin: u16) -> Prometheus {
    let dir = std::env::temp_dir().join(unique("prom"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    \
             authorization:\n      credentials: {TOKEN}\n    static_configs:\n      - targets: ['127.0.0.1:{admin}']\n"
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--enable-feature=exemplar-storage")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (cargo xtask setup installs the Debian package)");
    Prometheus {
        _child: KillOnDrop(child),
        port,
        dir,
    }
}

fn form(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// `/api/v1/query`: the whole answer (status, data or error).
    fn query(&self, expr: &str) -> serde_json::Value {
        let body = format!("query={}", form(expr));
        let req = format!(
            "POST /api/v1/query HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return serde_json::json!({"status": "unreachable"});
        };
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        integration_tests::peers::read_response(&mut s)
            .map_or(serde_json::json!({"status": "no answer"}), |r| r.json())
    }

    /// The single value of an instant query, polled until `ok` holds (at most 60 s).
    fn value_when(&self, expr: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.query(expr);
            let v = r["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            if let Some(v) = v
                && ok(v)
            {
                return v;
            }
            assert!(Instant::now() < deadline, "{expr}: {r}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The 1-2-5 bucket bounds (µs) around `us`: (previous bound, bound).
fn bucket(us: f64) -> (f64, f64) {
    let mut lo = 0.0;
    for d in 0..8 {
        for m in [1.0, 2.0, 5.0] {
            let b = m * 10f64.powi(d);
            if us <= b {
                return (lo, b);
            }
            lo = b;
        }
    }
    (lo, 60e6)
}

#[test]
fn prometheus_scrapes_the_gateway_and_its_quantiles_agree_with_stats() {
    let upstream = FakeUpstream::start(Misbehave::Answer);
    let mut g = start(&upstream);
    let prom = prometheus(g.admin);
    prom.value_when("up{job=\"gateway\"}", |v| v == 1.0);
    traffic(g.port, 400);
    // Every request recorded, and scraped.
    let count = r#"sum(mcp_gateway_route_latency_seconds_count{route="/mcp",kind="gateway"})"#;
    prom.value_when(count, |v| v == 400.0);
    let stats = admin_get(g.admin, "/stats?window=all", "application/json").json();
    let route = stats["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["dim"] == "route" && s["name"] == "/mcp")
        .unwrap_or_else(|| panic!("{stats}"))
        .clone();
    assert_eq!(route["count"], 400, "{route}");
    for (q, key) in [(0.5, "p50"), (0.99, "p99")] {
        let expr = format!(
            r#"histogram_quantile({q}, sum by (le) (mcp_gateway_route_latency_seconds_bucket{{route="/mcp",kind="gateway"}}))"#
        );
        let prom_us = prom.value_when(&expr, |v| v.is_finite()) * 1e6;
        let own = route["gateway_us"][key].as_f64().unwrap();
        // Prometheus interpolates inside the bucket the gateway's own figure falls in (1 %
        // slack: the gateway's histograms keep two significant digits).
        let (lo, hi) = bucket(own);
        assert!(
            prom_us >= lo * 0.99 && prom_us <= hi * 1.01,
            "{key}: Prometheus {prom_us:.1} µs, /stats {own} µs, bucket ({lo}, {hi}]"
        );
    }
    // Prometheus asked for OpenMetrics (its default) and parsed it: exemplars are there.
    let om = admin_get(
        g.admin,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(
        om.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        om.headers
    );
    let om = String::from_utf8_lossy(&om.body).into_owned();
    assert!(om.ends_with("# EOF\n"));
    assert!(
        om.contains(" # {trace_id=\"0000000000000000000000000000abc"),
        "{om}"
    );
    let r = prom.query(
        r#"mcp_gateway_build_info{job="gateway"} and on() process_open_fds > 0 and on() mcp_gateway_upstream_up{upstream="u0"} == 1"#,
    );
    assert_eq!(r["data"]["result"].as_array().map(Vec::len), Some(1), "{r}");

    // The classic text format, as promtool reads it.
    let classic = admin_get(g.admin, "/metrics", "text/plain");
    let text = String::from_utf8_lossy(&classic.body).into_owned();
    assert!(!text.contains("# EOF") && !text.contains(" # {"), "{text}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every query of the shipped dashboard is accepted, with Grafana's variables substituted.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docs/grafana/mcp-gateway.json")).unwrap(),
    )
    .unwrap();
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 15, "{exprs:?}");
    for e in &exprs {
        let e = e
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        let r = prom.query(&e);
        assert_eq!(r["status"], "success", "{e}: {r}");
    }
    g.daemon.stop();
}

/// The documented structural check of the dashboard: Grafana's top-level fields, the two
/// template variables, unique panel ids, every panel placed on the 24-column grid and fed by
/// Prometheus queries through the `datasource` variable. Returns every query.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    for key in [
        "title",
        "uid",
        "schemaVersion",
        "panels",
        "templating",
        "time",
    ] {
        assert!(!dash[key].is_null(), "dashboard without `{key}`");
    }
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance"]);
    let mut ids = std::collections::HashSet::new();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        assert!(
            ["timeseries", "stat"].contains(&p["type"].as_str().unwrap()),
            "{p}"
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24
                && g["h"].as_u64().unwrap() > 0,
            "{p}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{p}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{p}");
            let e = t["expr"].as_str().unwrap();
            assert!(e.contains("$instance"), "{e}: not filtered by instance");
            exprs.push(e.to_owned());
        }
    }
    exprs
}

#[test]
fn the_shipped_alert_rules_pass_their_promtool_unit_tests() {
    let dir = repo().join("docs/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn top(args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut c = Command::new(integration_tests::daemon::gateway_bin());
    c.arg("top").args(args).stdin(Stdio::null());
    if let Some(t) = token {
        c.env("GW_STACK_TOKEN", t)
            .args(["--token-env", "GW_STACK_TOKEN"]);
    }
    c.output().unwrap()
}

#[test]
fn gateway_top_once_prints_figures_and_says_what_is_wrong_without_a_terminal() {
    let upstream = FakeUpstream::start(Misbehave::Answer);
    let mut g = start(&upstream);
    traffic(g.port, 20);
    let admin = format!("127.0.0.1:{}", g.admin);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let out = top(
            &["--admin", &admin, "--once", "--window", "all"],
            Some(TOKEN),
        );
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        if text.contains("20 requests") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        text.contains("total ") && text.contains("20 requests"),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("echo ")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("/mcp ")), "{text}");
    assert!(!text.contains('\u{1b}'), "no escape codes: {text:?}");
    // Without a terminal and without --once: the same plain text, no panic.
    let out = top(&["--admin", &admin, "--window", "all"], Some(TOKEN));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("requests"));
    // A missing token and a wrong one: 401 said plainly, exit status 1.
    for token in [None, Some("wrong-token")] {
        let out = top(&["--admin", &admin, "--once"], token);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(err.contains("refused the token (401)"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Nothing listening.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = top(&["--admin", &nowhere, "--once"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains(&format!("cannot reach the admin API at {nowhere}")),
        "{err}"
    );
    g.daemon.stop();
}

struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

/// Runs `command` in a detached tmux session and returns the screen once it shows `needle`.
fn tmux_screen(command: &str, needle: &str) -> (Tmux, String) {
    let session = Tmux(unique("gwtop"));
    let started = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-s",
            &session.0,
            "-x",
            "140",
            "-y",
            "40",
        ])
        .args(["-e", &format!("GW_STACK_TOKEN={TOKEN}")])
        // The pane stays after the command exits, so a message printed at exit can be read.
        .arg(format!("{command}; sleep 30"))
        .output()
        .expect("tmux (cargo xtask setup installs it)");
    assert!(started.status.success(), "{started:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &session.0])
            .output()
            .unwrap();
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        if screen.contains(needle) || Instant::now() > deadline {
            return (session, screen);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn gateway_top_in_a_terminal_shows_errors_and_totals() {
    let upstream = FakeUpstream::start(Misbehave::Answer);
    let mut g = start(&upstream);
    traffic(g.port, 10);
    let bin = integration_tests::daemon::gateway_bin();
    let bin = bin.display();
    let admin = format!("127.0.0.1:{}", g.admin);
    // The live view without a token: the 401 on the screen, not a blank one.
    let (_s, screen) = tmux_screen(
        &format!("{bin} top --admin {admin} --interval-ms 300"),
        "ERROR",
    );
    assert!(screen.contains("ERROR: the admin API at"), "{screen}");
    assert!(screen.contains("(401)"), "{screen}");
    // Nothing listening.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (_s, screen) = tmux_screen(
        &format!("{bin} top --admin {nowhere} --interval-ms 300"),
        "ERROR",
    );
    assert!(
        screen.contains("ERROR: cannot reach the admin API"),
        "{screen}"
    );
    // The live view with the token: the totals line.
    let (_s, screen) = tmux_screen(
        &format!(
            "{bin} top --admin {admin} --token-env GW_STACK_TOKEN --window all --interval-ms 300"
        ),
        "10 requests",
    );
    assert!(
        screen.contains("total ") && screen.contains("10 requests"),
        "{screen}"
    );
    // --once in a terminal: plain text, then the shell's sleep.
    let (_s, screen) = tmux_screen(
        &format!("{bin} top --admin {admin} --token-env GW_STACK_TOKEN --window all --once"),
        "ROUTE",
    );
    assert!(
        screen.contains("10 requests") && screen.contains("ROUTE"),
        "{screen}"
    );
    g.daemon.stop();
}
