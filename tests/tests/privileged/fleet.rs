//! A fleet of three gateways sharing their state through a real `redis-server` (started by the
//! test on loopback, on a free port, and stopped after): a tenant's rate holds across the
//! fleet, a budget spent on one gateway is refused on another, an approval made on one unhides
//! the tool on another, a ban made on one reaches the others, a federated session opened
//! through one continues through another, a session the gateway holds ended on one is ended on
//! all; Redis killed and started again mid-run: rates fall
//! back to each gateway's share and budgets fail closed, then all recovers by itself. Over
//! `rediss://` only with the right CA, never in plaintext; a Redis flushed mid-run is re-seeded
//! (the highest count, not the sum); with a fleet secret, approvals, bans and ended sessions
//! written into Redis without it are ignored.

use std::{
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use integration_tests::{
    daemon::Daemon,
    peers::{KillOnDrop, PyServer, RawResponse, free_port, keep_alive, post, raw, wait_port},
    pki::{Issued, KeyKind, Pki},
    unique,
};

/// A `redis-server` of the test's own on loopback (no persistence: a restart forgets all, the
/// hardest case for the fleet), killed on drop; with TLS, it listens on its TLS port only (no
/// plaintext port at all).
struct Redis {
    port: u16,
    /// `--tls-*` arguments of the server, and `redis-cli`'s to reach it.
    tls: Option<(Vec<String>, Vec<String>)>,
    /// The password it asks for (`--requirepass`), if any.
    password: Option<String>,
    child: Option<KillOnDrop>,
}

impl Redis {
    fn start() -> Self {
        let mut r = Self {
            port: free_port(),
            tls: None,
            password: None,
            child: None,
        };
        r.up();
        r
    }

    /// Plaintext, asking every client for `password`.
    fn start_with_password(password: &str) -> Self {
        let mut r = Self {
            port: free_port(),
            tls: None,
            password: Some(password.to_owned()),
            child: None,
        };
        r.up();
        r
    }

    /// Over TLS only, with `server`'s certificate, asking clients for a certificate of `pki`'s
    /// CA (`cli`: the client certificate `redis-cli` uses).
    fn start_tls(pki: &Pki, server: &Issued, cli: &Issued) -> Self {
        let p = |f: &std::path::Path| f.display().to_string();
        let mut r = Self {
            port: free_port(),
            tls: Some((
                vec![
                    "--tls-cert-file".into(),
                    p(&server.cert),
                    "--tls-key-file".into(),
                    p(&server.key),
                    "--tls-ca-cert-file".into(),
                    p(&pki.ca),
                    "--tls-auth-clients".into(),
                    "yes".into(),
                ],
                vec![
                    "--tls".into(),
                    "--cacert".into(),
                    p(&pki.ca),
                    "--cert".into(),
                    p(&cli.cert),
                    "--key".into(),
                    p(&cli.key),
                ],
            )),
            password: None,
            child: None,
        };
        r.up();
        r
    }

    fn up(&mut self) {
        let port = self.port.to_string();
        let mut args: Vec<String> = match &self.tls {
            None => vec!["--port".into(), port],
            Some((server, _)) => {
                let mut a = vec!["--port".into(), "0".into(), "--tls-port".into(), port];
                a.extend(server.iter().cloned());
                a
            }
        };
        if let Some(password) = &self.password {
            args.extend(["--requirepass".into(), password.clone()]);
        }
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                // `DEBUG SLEEP`: a Redis that stops answering for a while.
                "--enable-debug-command",
                "yes",
            ]
            .map(String::from),
        );
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (installed by `cargo xtask setup`)");
        self.child = Some(KillOnDrop(child));
        wait_port(self.port, Duration::from_secs(10));
    }

    fn kill(&mut self) {
        self.child = None;
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// `redis-cli` against this server (at most 10 s): its output.
    fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("timeout");
        cmd.args([
            "10",
            "redis-cli",
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
        ]);
        if let Some((_, cli)) = &self.tls {
            cmd.args(cli);
        }
        if let Some(password) = &self.password {
            cmd.args(["--no-auth-warning", "-a", password]);
        }
        let out = cmd.args(args).output().expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

struct Fleet {
    redis: Redis,
    gateways: Vec<Gw>,
    upstream: Option<PyServer>,
    up_port: u16,
    name: String,
    settings: Settings,
}

/// What every gateway of a fleet is started with.
#[derive(Clone)]
struct Settings {
    rate: u64,
    burst: u64,
    budget: bool,
    /// More of `[state]` (TLS files, the fleet secret's variable).
    state_extra: String,
    /// More upstreams and routes.
    routes_extra: String,
    /// More of the tenants' `[policy]`, and of tenant `public`.
    policy_extra: String,
    tenant_extra: String,
    env: Vec<(String, String)>,
}

impl Settings {
    fn new(rate: u64, burst: u64, budget: bool) -> Self {
        Self {
            rate,
            burst,
            budget,
            state_extra: String::new(),
            routes_extra: String::new(),
            policy_extra: String::new(),
            tenant_extra: String::new(),
            env: Vec::new(),
        }
    }
}

struct Gw {
    daemon: Daemon,
    port: u16,
    admin: u16,
    instance: String,
}

/// A gateway of the fleet: tenant `public` limited to `rate`/s (burst `burst`) across the
/// fleet, perhaps a budget of 5 calls, pinned tools, a passthrough route and a federated one.
#[expect(
    clippy::too_many_arguments,
    reason = "one test's settings, named at the call"
)]
fn config(
    instance: &str,
    port: u16,
    admin: u16,
    up_port: u16,
    redis: &str,
    fleet: &str,
    rate: u64,
    burst: u64,
    budget: bool,
    state_extra: &str,
    routes_extra: &str,
    policy_extra: &str,
    tenant_extra: &str,
) -> String {
    let budget = if budget {
        "budget = { window_s = 1000000000, tenant = 5 }"
    } else {
        ""
    };
    format!(
        r#"[gateway]
instance = "{instance}"
workers = 2
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
{tenant_extra}
[policy]
pin_tools = true
requests_per_sec = {rate}
burst = {burst}
{budget}
{policy_extra}
[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "" }}]
[[upstreams]]
name = "u0r"
endpoints = ["http://127.0.0.1:{up_port}/mcp", "http://localhost:{up_port}/mcp"]
[[routes]]
path = "/rep"
upstream = "u0r"
{routes_extra}
[state]
path = "{state}"
redis = "{redis}"
fleet = "{fleet}"
{state_extra}
"#,
        state = std::env::temp_dir()
            .join(format!("{instance}.state"))
            .display(),
    )
}

impl Fleet {
    fn start(rate: u64, burst: u64, budget: bool) -> Self {
        Self::start_with(Redis::start(), 3, Settings::new(rate, burst, budget))
    }

    /// `n` gateways sharing `redis`.
    fn start_with(redis: Redis, n: usize, settings: Settings) -> Self {
        let up_port = free_port();
        let upstream = PyServer::start_on(up_port, &[]);
        let mut f = Self {
            redis,
            gateways: Vec::new(),
            upstream: Some(upstream),
            up_port,
            name: unique("fl"),
            settings,
        };
        for _ in 0..n {
            let g = f.gateway(&f.settings.clone());
            f.gateways.push(g);
        }
        f.wait_metric_all("mcp_gateway_fleet_hosts_live", n as f64);
        f
    }

    /// A gateway of this fleet started with `settings` (not added to the fleet's list).
    fn gateway(&self, settings: &Settings) -> Gw {
        self.gateway_at(settings, &self.redis.url())
    }

    /// A gateway of this fleet's name that reaches Redis at `url`.
    fn gateway_at(&self, settings: &Settings, url: &str) -> Gw {
        let (port, admin) = (free_port(), free_port());
        let instance = unique("gwfleet");
        let env: Vec<(&str, &str)> = settings
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let daemon = Daemon::start_local_with_env(
            &instance,
            &config(
                &instance,
                port,
                admin,
                self.up_port,
                url,
                &self.name,
                settings.rate,
                settings.burst,
                settings.budget,
                &settings.state_extra,
                &settings.routes_extra,
                &settings.policy_extra,
                &settings.tenant_extra,
            ),
            &env,
        );
        Gw {
            daemon,
            port,
            admin,
            instance,
        }
    }

    fn wait_metric_all(&self, name: &str, value: f64) {
        for g in &self.gateways {
            wait_metric(g.admin, name, value);
        }
    }

    /// A Redis key of this fleet.
    fn key(&self, what: &str) -> String {
        format!("mcp-gateway:{}:{what}", self.name)
    }
}

fn metric(admin: u16, name: &str) -> f64 {
    let (r, _) = raw(admin, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits (up to 10 s) until `name` reads `value`.
fn wait_metric(admin: u16, name: &str, value: f64) {
    for _ in 0..200 {
        if metric(admin, name) == value {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{name} is {} on :{admin}, not {value}, after 10 s",
        metric(admin, name)
    );
}

pub(super) fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}
    })
}

/// A stateless `tools/call`: its status and JSON-RPC error code.
fn call(port: u16, tool: &str, args: Value) -> (u16, Option<i64>) {
    let r = call_raw(port, tool, args);
    (r.status, r.json()["error"]["code"].as_i64())
}

/// A stateless `tools/call` of `tool`: the whole response.
fn call_raw(port: u16, tool: &str, args: Value) -> RawResponse {
    raw(port, &call_request(tool, args)).0
}

/// A 2026-07-28 `tools/call` of `tool` on `/mcp`.
pub(super) fn call_request(tool: &str, args: Value) -> Vec<u8> {
    let body = json!({
        "jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": meta()},
    })
    .to_string();
    let headers = format!(
        "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {tool}\r\n"
    );
    post("/mcp", &body, &headers)
}

/// A stateless `tools/list`: whether `echo` is shown.
fn echo_listed(port: u16) -> bool {
    let body =
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": meta()}})
            .to_string();
    let r = raw(
        port,
        &post(
            "/mcp",
            &body,
            "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n",
        ),
    )
    .0;
    assert_eq!(r.status, 200, "{r:?}");
    let names: Vec<String> = r.json()["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    assert!(names.iter().any(|n| n == "add"), "{names:?}");
    names.iter().any(|n| n == "echo")
}

/// Loads every gateway of the fleet at once for `span`, one client each on a keep-alive
/// connection, well above the fleet's rate: what each admitted.
fn load(fleet: &Fleet, span: Duration) -> Vec<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = fleet
        .gateways
        .iter()
        .map(|g| {
            let (port, stop) = (g.port, Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut admitted = 0;
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    let r = keep_alive(
                        &mut conn,
                        || TcpStream::connect(("127.0.0.1", port)).expect("connect"),
                        &call_request("add", json!({"a": 1, "b": 2})),
                    );
                    match (r.status, r.json()["error"]["code"].as_i64()) {
                        (200, None) => admitted += 1,
                        (429, Some(RATE_LIMITED)) => {}
                        other => panic!("unexpected answer {other:?}"),
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                admitted
            })
        })
        .collect();
    std::thread::sleep(span);
    stop.store(true, Ordering::Relaxed);
    threads
        .into_iter()
        .map(|t| t.join().expect("load thread"))
        .collect()
}

pub(super) const RATE_LIMITED: i64 = -32042;
pub(super) const BUDGET_EXHAUSTED: i64 = -32043;
pub(super) const STATE_UNAVAILABLE: i64 = -32047;
const PENDING_APPROVAL: i64 = -32046;

/// Admitted over `span` at `rate`/s: within `tolerance` (a fraction) of `rate × span`.
pub(super) fn assert_rate(what: &str, admitted: u64, rate: u64, span: Duration, tolerance: f64) {
    let expected = rate as f64 * span.as_secs_f64();
    let off = (admitted as f64 - expected) / expected;
    eprintln!(
        "{what}: {admitted} admitted in {span:?}, expected {expected:.0} ({:+.1} %)",
        off * 100.0
    );
    assert!(
        off.abs() <= tolerance,
        "{what}: {admitted} admitted in {span:?}, expected {expected:.0} ± {:.0} %",
        tolerance * 100.0
    );
}

#[test]
fn a_tenant_rate_holds_across_the_fleet_and_falls_back_to_each_share_without_redis() {
    const RATE: u64 = 120;
    let mut fleet = Fleet::start(RATE, 6, false);
    // Drains the burst and warms the leases.
    load(&fleet, Duration::from_secs(1));

    let span = Duration::from_secs(5);
    let each = load(&fleet, span);
    let n = each.iter().sum();
    assert_rate("fleet-wide", n, RATE, span, 0.05);
    eprintln!("admitted by each gateway: {each:?}");
    // Shared fairly: no gateway is starved because its rounds fall just after another's.
    for (g, a) in each.iter().enumerate() {
        assert!(*a * 5 >= n, "gateway {g} admitted {a} of {n}: {each:?}");
    }
    for g in &fleet.gateways {
        assert!(metric(g.admin, "mcp_gateway_fleet_tokens_granted_total") > 0.0);
        assert_eq!(metric(g.admin, "mcp_gateway_fleet_fallback_active"), 0.0);
    }

    // Redis gone: each gateway admits its share (rate ÷ 3 live hosts), so the fleet still
    // admits about its rate.
    fleet.redis.kill();
    fleet.wait_metric_all("mcp_gateway_fleet_fallback_active", 1.0);
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 0.0);
    load(&fleet, Duration::from_millis(500));
    let span = Duration::from_secs(3);
    let n = load(&fleet, span).iter().sum();
    assert_rate("each gateway's share, Redis down", n, RATE, span, 0.10);
    for g in &fleet.gateways {
        assert!(
            g.daemon.log().contains("Redis unreachable"),
            "the loss is logged"
        );
    }

    // Redis back (empty): the fleet reconnects by itself and shares again.
    fleet.redis.up();
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 1.0);
    fleet.wait_metric_all("mcp_gateway_fleet_fallback_active", 0.0);
    load(&fleet, Duration::from_secs(1));
    let span = Duration::from_secs(4);
    let n = load(&fleet, span).iter().sum();
    assert_rate("fleet-wide after Redis came back", n, RATE, span, 0.05);
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

#[test]
fn a_budget_spent_on_one_gateway_is_refused_on_another_and_fails_closed_without_redis() {
    let mut fleet = Fleet::start(1000, 1000, true);
    let (a, b, c) = (
        fleet.gateways[0].port,
        fleet.gateways[1].port,
        fleet.gateways[2].port,
    );
    for _ in 0..3 {
        assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    // Redis forgets the agents' scripts (as after a restart or a failover): their next round
    // is refused (NOSCRIPT), loads them again and is sent again.
    let loads = || {
        fleet
            .redis
            .cli(&["INFO", "commandstats"])
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_script|load:calls="))
            .and_then(|v| v.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let loaded = loads();
    assert_eq!(fleet.redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    // A few rounds: B and C know of A's spend.
    std::thread::sleep(Duration::from_millis(500));
    assert!(loads() > loaded, "the scripts were not loaded again");
    for _ in 0..2 {
        assert_eq!(call(b, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    std::thread::sleep(Duration::from_millis(500));
    for port in [a, b, c] {
        assert_eq!(
            call(port, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "5 of 5 spent across the fleet: refused on :{port}"
        );
    }

    // Redis gone: budgets cannot be checked, and fail closed with a clear error.
    fleet.redis.kill();
    fleet.wait_metric_all("mcp_gateway_fleet_fallback_active", 1.0);
    assert_state_unavailable(c);

    // Redis back, empty: the gateways offer what they know, and the spend is not forgotten
    // (nor counted three times: a new gateway of the fleet learns 5 of 5).
    fleet.redis.up();
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 1.0);
    std::thread::sleep(Duration::from_millis(300));
    for port in [a, b, c] {
        assert_eq!(
            call(port, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "still spent after Redis came back: :{port}"
        );
    }
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

#[test]
fn a_redis_slow_for_a_moment_keeps_the_fleets_state_and_a_longer_outage_falls_back() {
    let mut fleet = Fleet::start_with(Redis::start(), 2, Settings::new(1000, 1000, true));
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    let budgets = fleet.key("spend");
    for _ in 0..3 {
        assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    wait_for("3 spent, in Redis", Duration::from_secs(2), || {
        hgetall(&fleet.redis, &budgets).len() == 1 && spent_in(&fleet.redis, &budgets) == 3
    });
    let sleep = |seconds: &'static str| {
        let port = fleet.redis.port;
        std::thread::spawn(move || {
            let out = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["DEBUG", "SLEEP", seconds])
                .output()
                .expect("run redis-cli");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("OK"),
                "{out:?}"
            );
        })
    };

    // Redis answers nothing for 0.4 s: the rounds meanwhile time out (after 200 ms), and the
    // gateways keep the fleet's state: a budgeted call is admitted on it, not refused with 503.
    let failed = metric_sum(&fleet, "mcp_gateway_fleet_round_failures_total");
    let stall = sleep("0.4");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(call(b, "add", json!({"a": 1, "b": 2})), (200, None));
    stall.join().expect("DEBUG SLEEP");
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 1.0);
    assert!(
        metric_sum(&fleet, "mcp_gateway_fleet_round_failures_total") > failed,
        "the stall failed no round: it tested nothing"
    );
    for g in &fleet.gateways {
        let log = g.daemon.log();
        assert!(
            log.contains("the fleet's state is kept") && !log.contains("Redis unreachable"),
            "kept, never fell back: {log}"
        );
        assert_eq!(metric(g.admin, "mcp_gateway_fleet_fallback_active"), 0.0);
    }
    // Within a second of that, Redis stalls again, for less than the grace: the grace is not
    // given again so soon (whoever can slow Redis could otherwise keep the gateways on old
    // counts for good, letting a round through now and then), and the gateways fall back.
    sleep("0.8").join().expect("DEBUG SLEEP");
    for g in &fleet.gateways {
        let log = g.daemon.log();
        assert!(log.contains("Redis unreachable"), "fell back: {log}");
    }
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 1.0);
    fleet.wait_metric_all("mcp_gateway_fleet_fallback_active", 0.0);
    wait_for("4 spent, in Redis", Duration::from_secs(2), || {
        spent_in(&fleet.redis, &budgets) == 4
    });

    // For 3 s: after 1 s of failed rounds the gateways fall back, and budgets fail closed.
    let outage = sleep("3");
    fleet.wait_metric_all("mcp_gateway_fleet_fallback_active", 1.0);
    assert_state_unavailable(a);
    outage.join().expect("DEBUG SLEEP");
    fleet.wait_metric_all("mcp_gateway_fleet_fallback_active", 0.0);
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 1.0);
    assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    std::thread::sleep(Duration::from_millis(500));
    for port in [a, b] {
        assert_eq!(
            call(port, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "5 of 5 spent across the stall and the outage: refused on :{port}"
        );
    }
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

/// A call held in flight for `steps` × 10 ms (`count_with_progress`) through `port`, in a
/// thread: its status and JSON-RPC error code.
fn slow_call(port: u16, steps: u64) -> std::thread::JoinHandle<(u16, Option<i64>)> {
    std::thread::spawn(move || call(port, "count_with_progress", json!({"steps": steps})))
}

fn admitted(calls: Vec<std::thread::JoinHandle<(u16, Option<i64>)>>) -> usize {
    calls
        .into_iter()
        .map(|h| h.join().expect("call thread"))
        .filter(|r| match r {
            (200, None) => true,
            (429, Some(RATE_LIMITED)) => false,
            other => panic!("unexpected answer {other:?}"),
        })
        .count()
}

#[test]
fn a_concurrency_cap_holds_across_the_fleet_and_falls_back_to_each_share_without_redis() {
    const CAP: usize = 4;
    let mut settings = Settings::new(1000, 1000, false);
    settings.policy_extra = format!("max_concurrent = {CAP}");
    let mut fleet = Fleet::start_with(Redis::start(), 3, settings);
    let ports: Vec<u16> = fleet.gateways.iter().map(|g| g.port).collect();
    let (a, b, c) = (ports[0], ports[1], ports[2]);
    let (admin_b, admin_c) = (fleet.gateways[1].admin, fleet.gateways[2].admin);
    fleet.wait_metric_all("mcp_gateway_fleet_caps_shared", 1.0);
    let add = |port| call(port, "add", json!({"a": 1, "b": 2}));

    // Four calls held on A fill the fleet's cap: B and C refuse, with the local cap's error.
    let held: Vec<_> = (0..CAP).map(|_| slow_call(a, 400)).collect();
    wait_metric(admin_b, "mcp_gateway_fleet_in_flight_others", CAP as f64);
    wait_metric(admin_c, "mcp_gateway_fleet_in_flight_others", CAP as f64);
    for port in [a, b, c] {
        assert_eq!(add(port), (429, Some(RATE_LIMITED)), "cap full: :{port}");
    }
    // Each host's count is a field of its own, sealed or not, in one hash per cap.
    let fields = hgetall(&fleet.redis, &fleet.key("cap:in-flight/tenant/public"));
    assert_eq!(fields.len(), 3, "{fields:?}");
    assert!(fields.iter().any(|(_, v)| v == "4"), "{fields:?}");
    // A's calls end: B admits again within a round or two.
    assert_eq!(admitted(held), CAP);
    let ended = Instant::now();
    wait_for("B admits again", Duration::from_secs(2), || {
        add(b) == (200, None)
    });
    eprintln!("B admits {:?} after A's calls ended", ended.elapsed());

    // Calls arriving one at a time on A, B, C in turn, a few rounds apart: the fleet admits
    // exactly its cap.
    let mut calls = Vec::new();
    for i in 0..9 {
        calls.push(slow_call(ports[i % 3], 400));
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(admitted(calls), CAP, "spaced calls across the fleet");

    // The bound: calls reaching the three gateways within one round may each be admitted
    // before the others know (at most CAP on each).
    wait_metric(admin_b, "mcp_gateway_fleet_in_flight_others", 0.0);
    let burst: Vec<_> = (0..3 * CAP).map(|i| slow_call(ports[i % 3], 200)).collect();
    let n = admitted(burst);
    eprintln!(
        "a burst of {} calls on the three gateways at once: {n} admitted (cap {CAP})",
        3 * CAP
    );
    assert!((CAP..=3 * CAP).contains(&n), "{n}");

    // Redis gone: each gateway admits its share, 4 ÷ 3 live hosts = 1.
    fleet.redis.kill();
    fleet.wait_metric_all("mcp_gateway_fleet_fallback_active", 1.0);
    let one = slow_call(a, 300);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(add(a), (429, Some(RATE_LIMITED)), "A holds its share");
    assert_eq!(add(b), (200, None), "B's share is its own");
    let more: Vec<_> = (0..3).map(|_| slow_call(a, 100)).collect();
    assert_eq!(admitted(more), 0, "A holds its share already");
    assert_eq!(admitted(vec![one]), 1);
    assert_eq!(add(a), (200, None), "A's share is free again");
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

#[test]
fn with_a_fleet_secret_a_concurrency_cap_holds_whatever_is_written_in_redis() {
    const CAP: usize = 2;
    let mut settings = Settings::new(1000, 1000, false);
    settings.policy_extra = format!("max_concurrent = {CAP}");
    settings.state_extra = format!("fleet_secret_env = \"{SECRET_VAR}\"\n");
    settings.env = vec![(
        SECRET_VAR.to_owned(),
        unique("a-fleet-secret-of-at-least-32-characters"),
    )];
    let mut fleet = Fleet::start_with(Redis::start(), 3, settings);
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    let admin_b = fleet.gateways[1].admin;
    fleet.wait_metric_all("mcp_gateway_fleet_caps_shared", 1.0);
    let key = fleet.key("cap:in-flight/tenant/public");
    let add = |port| call(port, "add", json!({"a": 1, "b": 2}));
    let held: Vec<_> = (0..CAP).map(|_| slow_call(a, 600)).collect();
    wait_metric(admin_b, "mcp_gateway_fleet_in_flight_others", CAP as f64);
    let fields = hgetall(&fleet.redis, &key);
    assert_eq!(fields.len(), 3, "{fields:?}");
    assert!(
        fields.iter().all(|(_, v)| v.starts_with("sealed1:")),
        "{fields:?}"
    );

    // Every host's count lowered to 0, bare or under a wrong seal: ignored (and counted), the
    // hosts' last counts stand and B still refuses.
    let bogus_mac = "A".repeat(43);
    for forged in ["0".to_owned(), format!("sealed1:{bogus_mac}:0")] {
        let before = metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total");
        for (host, _) in &fields {
            fleet.redis.cli(&["HSET", &key, host, &forged]);
        }
        wait_for("the forgery is counted", Duration::from_secs(3), || {
            metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total") > before
        });
        assert_eq!(add(b), (429, Some(RATE_LIMITED)), "forged {forged}");
        assert_eq!(
            metric(admin_b, "mcp_gateway_fleet_in_flight_others"),
            CAP as f64
        );
    }
    // A flood of fields is cut back to the live hosts; a key of another type is replaced. The
    // cap holds again within a heartbeat.
    let mut flood = vec!["HSET".to_owned(), key.clone()];
    for i in 0..5000 {
        flood.push(format!("junk{i}"));
        flood.push("1".into());
    }
    let flood: Vec<&str> = flood.iter().map(String::as_str).collect();
    fleet.redis.cli(&flood);
    wait_for("the hash is cut back", Duration::from_secs(3), || {
        hgetall(&fleet.redis, &key).len() <= 3 + 16
    });
    fleet.redis.cli(&["SET", &key, "junk"]);
    wait_for(
        "the cap's hash is a hash again",
        Duration::from_secs(3),
        || fleet.redis.cli(&["TYPE", &key]).trim() == "hash",
    );
    wait_metric(admin_b, "mcp_gateway_fleet_in_flight_others", CAP as f64);
    assert_eq!(add(b), (429, Some(RATE_LIMITED)));
    assert_eq!(admitted(held), CAP);
    wait_for("B admits again", Duration::from_secs(2), || {
        add(b) == (200, None)
    });
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

#[test]
fn a_tenant_connection_cap_holds_across_the_fleet() {
    let mut settings = Settings::new(1000, 1000, false);
    settings.tenant_extra = "max_connections = 3".into();
    let mut fleet = Fleet::start_with(Redis::start(), 3, settings);
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    let admin_b = fleet.gateways[1].admin;
    fleet.wait_metric_all("mcp_gateway_fleet_caps_shared", 1.0);
    let add = |port| call(port, "add", json!({"a": 1, "b": 2}));
    assert_eq!(add(b), (200, None));
    // That connection gone from B's count, and from what A last read of it (B writes its count
    // when it changes, A reads every round: 25 ms): otherwise A's third below would be one too
    // many for the fleet, as it was once in a full run.
    wait_metric(admin_b, "mcp_gateway_connections{tenant=\"public\"}", 0.0);
    std::thread::sleep(Duration::from_millis(500));
    // Three connections kept open on A (keep-alive after a call): the tenant's cap of the
    // fleet is full, and B refuses new connections of the tenant.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let body = json!({
                "jsonrpc": "2.0", "id": 9, "method": "tools/call",
                "params": {"name": "add", "arguments": {"a": 1, "b": 2}, "_meta": meta()},
            })
            .to_string();
            let headers =
                "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: add\r\n";
            let (r, stream) = raw(a, &post("/mcp", &body, headers));
            assert_eq!(r.status, 200, "{r:?}");
            stream
        })
        .collect();
    wait_metric(
        admin_b,
        "mcp_gateway_tenant_at_connection_cap{tenant=\"public\"}",
        1.0,
    );
    let r = call_raw(b, "add", json!({"a": 1, "b": 2}));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"]["code"], -32000, "{r:?}");
    // A's connections closed: B accepts again.
    drop(held);
    wait_metric(
        admin_b,
        "mcp_gateway_tenant_at_connection_cap{tenant=\"public\"}",
        0.0,
    );
    assert_eq!(add(b), (200, None));
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

fn approve(admin: u16) {
    let r = integration_tests::peers::approve_pin(admin, "u0", "echo");
    assert_eq!(r.status, 200, "{r:?}");
}

fn bans(admin: u16) -> Value {
    let (r, _) = raw(admin, b"GET /bans HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

#[test]
fn an_approval_and_a_ban_on_one_gateway_reach_the_others() {
    let mut fleet = Fleet::start(1000, 1000, false);
    let ports: Vec<u16> = fleet.gateways.iter().map(|g| g.port).collect();
    for p in &ports {
        assert!(echo_listed(*p), "first sight: shown");
    }
    // The upstream changes `echo`: held everywhere until an operator approves it.
    fleet.upstream = None;
    fleet.upstream = Some(PyServer::start_on(fleet.up_port, &["--changed-echo"]));
    for p in &ports {
        assert!(!echo_listed(*p), "changed: hidden on :{p}");
    }
    approve(fleet.gateways[0].admin);
    assert!(echo_listed(ports[0]), "approved here");
    let start = Instant::now();
    while !(echo_listed(ports[1]) && echo_listed(ports[2])) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the approval on one gateway did not unhide the tool on the others in 5 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(call(ports[2], "echo", json!({"text": "hi"})).0, 200);

    // A ban on one gateway reaches the others within a second.
    let body = r#"{"address":"198.18.7.7","seconds":600}"#;
    let req = format!(
        "POST /bans HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (r, _) = raw(fleet.gateways[1].admin, req.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    let start = Instant::now();
    for g in &fleet.gateways {
        while !bans(g.admin).to_string().contains("198.18.7.7") {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "the ban did not reach :{} within a second",
                g.admin
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Lifted on another gateway: lifted everywhere.
    let (r, _) = raw(
        fleet.gateways[2].admin,
        b"DELETE /bans/198.18.7.7 HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{r:?}");
    let start = Instant::now();
    for g in &fleet.gateways {
        while bans(g.admin).to_string().contains("198.18.7.7") {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "the lifted ban stayed on :{}",
                g.admin
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

/// A changed tool one gateway holds for approval is held on the others, on one that never
/// listed it too: a client that calls without listing cannot call it there. Before, a gateway
/// took only approvals of tools it had listed itself, and called the changed tool (an
/// attacker's review). The approval then reaches it as well.
#[test]
fn a_change_held_on_one_gateway_is_held_on_one_that_never_listed_the_tool() {
    let mut fleet = Fleet::start_with(Redis::start(), 2, Settings::new(1000, 1000, false));
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    assert!(echo_listed(a), "first sight: pinned through a");
    fleet.upstream = None;
    fleet.upstream = Some(PyServer::start_on(fleet.up_port, &["--changed-echo"]));
    assert!(!echo_listed(a), "changed: held on a");
    wait_for("the change held on b", Duration::from_secs(5), || {
        call(b, "echo", json!({"text": "hi"})) == (403, Some(-32046))
    });
    approve(fleet.gateways[0].admin);
    wait_for("the approval reaches b", Duration::from_secs(5), || {
        call(b, "echo", json!({"text": "hi"})).0 == 200
    });
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

/// A gateway takes the fleet's pins of tools it never listed, but not one whose name reads as
/// another's: a record written into Redis (no fleet secret) for `еcho` (a Cyrillic `е`) made a
/// lookalike of `echo`, with its own description, visible on such a gateway (a review of the
/// first version). Its own listing judges such a name.
#[test]
fn a_gateway_takes_no_fleet_pin_of_a_name_that_reads_as_another() {
    let fleet = Fleet::start_with(Redis::start(), 2, Settings::new(1000, 1000, false));
    let (a, b_admin) = (fleet.gateways[0].port, fleet.gateways[1].admin);
    assert!(echo_listed(a), "pinned through a");
    let pins_key = fleet.key("pins");
    let echo = wait_for_value(&fleet.redis, &pins_key, "u0/echo");
    let pins_of = |admin: u16| {
        let (r, _) = raw(admin, b"GET /pins HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
        String::from_utf8_lossy(&r.body).into_owned()
    };
    // b holds the original first. (Had b's round read both records at once, it would take
    // neither, both names reading as one: the test once wrote the lookalike before b's
    // round and so waited in vain for `echo` on a slow CI host.)
    wait_for("b takes the fleet's pins", Duration::from_secs(5), || {
        pins_of(b_admin).contains("echo")
    });
    fleet
        .redis
        .cli(&["HSET", &pins_key, "u0/\u{435}cho", &echo]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !pins_of(b_admin).contains("\u{435}cho"),
        "{}",
        pins_of(b_admin)
    );
}

/// The value of `field` in hash `key`, once there (5 s at most).
fn wait_for_value(redis: &Redis, key: &str, field: &str) -> String {
    let mut value = String::new();
    wait_for(field, Duration::from_secs(5), || {
        value = redis.cli(&["HGET", key, field]).trim_end().to_owned();
        !value.is_empty()
    });
    value
}

/// Federated, passthrough and replicated passthrough sessions alike: the id carries what the
/// gateway needs (sealed or signed with the fleet's key), so another gateway continues it.
#[test]
fn a_session_opened_through_one_gateway_continues_through_another() {
    let mut fleet = Fleet::start(1000, 1000, false);
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "fleet-test", "version": "1"}},
    })
    .to_string();
    let call_body = json!({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 2, "b": 3}},
    })
    .to_string();
    for path in ["/fed", "/mcp", "/rep"] {
        let r = raw(a, &post(path, &init, "")).0;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        let session = r
            .header("mcp-session-id")
            .unwrap_or_else(|| panic!("{path}: a session id"))
            .to_owned();
        let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
        let r = raw(b, &post(path, &call_body, &headers)).0;
        assert_eq!(
            r.status, 200,
            "{path}: the session continues through another gateway: {r:?}"
        );
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert!(
            text.contains("\"result\"") && text.contains('5'),
            "{path}: {text}"
        );
        // A session id this fleet did not seal or sign is still unknown.
        let last = if session.ends_with('A') { 'B' } else { 'A' };
        let forged = format!("{}{last}", &session[..session.len() - 1]);
        let headers = format!("mcp-session-id: {forged}\r\nmcp-protocol-version: 2025-06-18\r\n");
        assert_eq!(
            raw(b, &post(path, &call_body, &headers)).0.status,
            404,
            "{path}"
        );
    }
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

const XDP_PORT: u16 = 18080;
const ALPHA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 2);
const BETA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 3);
const GAMMA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 4);

/// Two gateways of a fleet in one network namespace with their Redis: one (`edge`) with the
/// XDP program on the namespace's veth end, the other (`peer`) without. Clients ALPHA (tenant
/// `alpha`: 2 new connections a second for the fleet, 8 at once), BETA and GAMMA (the default
/// tenant) in the client namespace. Dropped in reverse order: gateways, Redis, namespaces.
struct XdpPair {
    edge: Daemon,
    edge_admin: u16,
    peer: Daemon,
    peer_admin: u16,
    _redis: KillOnDrop,
    topo: integration_tests::netns::Topology,
}

impl XdpPair {
    fn start() -> Self {
        use integration_tests::netns::{GW_ADDR, Topology, enter_before_exec, in_netns};

        let topo = Topology::new(&[ALPHA, BETA, GAMMA]);
        let redis_port = free_port();
        let mut cmd = Command::new("redis-server");
        enter_before_exec(&mut cmd, &topo.gw);
        let redis = KillOnDrop(
            cmd.args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server"),
        );
        in_netns(&topo.gw, || wait_port(redis_port, Duration::from_secs(10)));
        let fleet = unique("flx");
        let state = |instance: &str| {
            format!(
                "[state]\npath = \"{}\"\nredis = \"redis://127.0.0.1:{redis_port}/\"\nfleet = \"{fleet}\"\n",
                std::env::temp_dir()
                    .join(format!("{instance}.state"))
                    .display()
            )
        };
        let edge_instance = unique("gwflxe");
        let edge_admin = free_port();
        let edge = Daemon::start(
            &topo.gw,
            &edge_instance,
            &format!(
                r#"[gateway]
instance = "{edge_instance}"
workers = 2
[[listeners]]
address = "{GW_ADDR}:{XDP_PORT}"
[admin]
address = "127.0.0.1:{edge_admin}"
[kernel]
interfaces = ["{iface}"]
mode = "native"
default_tenant = "other"
[[tenants]]
name = "other"
id = 0
[[tenants]]
name = "alpha"
id = 1
sources = ["{ALPHA}/32"]
new_connections_per_sec = 2
new_connections_burst = 8
{state}"#,
                iface = topo.gw_if,
                state = state(&edge_instance),
            ),
        );
        let peer_instance = unique("gwflxp");
        let (peer_port, peer_admin) = (free_port(), free_port());
        let peer = Daemon::start(
            &topo.gw,
            &peer_instance,
            &format!(
                r#"[gateway]
instance = "{peer_instance}"
workers = 1
[[listeners]]
address = "127.0.0.1:{peer_port}"
[admin]
address = "127.0.0.1:{peer_admin}"
[kernel]
enabled = false
{state}"#,
                state = state(&peer_instance),
            ),
        );
        in_netns(&topo.gw, || {
            wait_metric(edge_admin, "mcp_gateway_fleet_hosts_live", 2.0)
        });
        XdpPair {
            edge,
            edge_admin,
            peer,
            peer_admin,
            _redis: redis,
            topo,
        }
    }

    /// `n` connections to the edge opened from `src` one after another (each given 250 ms):
    /// how many were accepted.
    fn connects(&self, src: std::net::Ipv4Addr, n: usize) -> usize {
        use integration_tests::{
            daemon::connect_from,
            netns::{GW_ADDR, in_netns},
        };
        use std::net::{IpAddr, SocketAddr};
        let dst = SocketAddr::new(IpAddr::V4(GW_ADDR), XDP_PORT);
        in_netns(&self.topo.client, || {
            let open: Vec<_> = (0..n)
                .filter_map(|_| connect_from(IpAddr::V4(src), dst, Duration::from_millis(250)))
                .collect();
            open.len()
        })
    }

    fn edge_metric(&self, name: &str) -> f64 {
        integration_tests::netns::in_netns(&self.topo.gw, || metric(self.edge_admin, name))
    }
}

/// A ban made through the peer's admin API reaches the edge's kernel ban map, and the edge's
/// XDP program drops the banned source's packets.
#[test]
fn a_ban_on_one_gateway_drops_packets_in_another_gateways_xdp_program() {
    use std::net::IpAddr;

    use gateway::kernel::KernelMaps;
    use gateway_common::Verdict;
    use integration_tests::netns::in_netns;

    let mut pair = XdpPair::start();
    assert_eq!(pair.connects(BETA, 1), 1, "not banned yet");

    let body = format!(r#"{{"address":"{BETA}","seconds":600}}"#);
    let req = format!(
        "POST /bans HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (r, _) = in_netns(&pair.topo.gw, || raw(pair.peer_admin, req.as_bytes()));
    assert_eq!(r.status, 200, "{r:?}");
    let maps = KernelMaps::open(&pair.edge.pin_dir).expect("the edge's pinned maps");
    let start = Instant::now();
    while !maps
        .bans()
        .expect("ban map")
        .iter()
        .any(|b| b.addr == IpAddr::V4(BETA))
    {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the ban made on the peer did not reach the edge's kernel ban map within a second"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let banned_before = maps.tenant_counters(0).unwrap().packets(Verdict::Banned);
    assert_eq!(
        pair.connects(BETA, 1),
        0,
        "dropped by the edge's XDP program"
    );
    assert!(
        maps.tenant_counters(0).unwrap().packets(Verdict::Banned) > banned_before,
        "counted as banned by the kernel"
    );
    assert_eq!(pair.connects(GAMMA, 1), 1, "others unaffected");
    pair.peer.stop();
    pair.edge.stop();
}

/// The kernel side of a fleet-wide tenant rate: with two live gateways, the edge's XDP program
/// admits its share of the tenant's new connections (2/s with 8 at once for the fleet: 1/s
/// with 4 at once here); once the peer is gone (not heard from for 3 s), the whole rate again.
#[test]
fn each_gateways_xdp_program_admits_its_share_of_a_tenants_new_connection_rate() {
    use gateway::kernel::KernelMaps;
    use gateway_common::TenantLimits;

    const RATE: &str = "mcp_gateway_kernel_tenant_new_connections_per_sec{tenant=\"alpha\"}";
    let mut pair = XdpPair::start();
    let maps = KernelMaps::open(&pair.edge.pin_dir).expect("the edge's pinned maps");
    wait_for(
        "the edge's share of alpha's rate",
        Duration::from_secs(5),
        || pair.edge_metric(RATE) == 1.0,
    );
    let share = TenantLimits::gcra_share(2, 8, 2);
    let l = maps.tenant_limits(1).expect("alpha's limits");
    assert_eq!(
        (l.conn_interval_ns, l.conn_tolerance_ns),
        share,
        "the share in the kernel's map: {l:?}"
    );
    // 8 at once would all pass the whole rate; the share admits 4 at once and one a second
    // after (the 4 refused take 250 ms each).
    let admitted = pair.connects(ALPHA, 8);
    assert!(
        (4..=6).contains(&admitted),
        "{admitted} of 8 new connections admitted at the share of 4 at once"
    );
    assert_eq!(pair.connects(BETA, 3), 3, "other tenants unaffected");

    pair.peer.stop();
    wait_for(
        "the edge's whole rate once the peer is gone",
        Duration::from_secs(10),
        || pair.edge_metric(RATE) == 2.0,
    );
    let whole = TenantLimits::gcra(2, 8);
    let l = maps.tenant_limits(1).expect("alpha's limits");
    assert_eq!((l.conn_interval_ns, l.conn_tolerance_ns), whole, "{l:?}");
    // The bucket refilled (8 at 2/s): all 8 at once.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(pair.connects(ALPHA, 8), 8, "the whole burst of 8 again");
    pair.edge.stop();
}

/// `[state]` lines for a fleet over TLS: the CA that checks Redis's certificate and this
/// gateway's client certificate.
fn tls_state(ca: &std::path::Path, client: &Issued) -> String {
    format!(
        "redis_ca_file = \"{}\"\nredis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"\n",
        ca.display(),
        client.cert.display(),
        client.key.display()
    )
}

/// A budgeted `tools/call` refused because the fleet's state cannot be reached: 503 with the
/// JSON-RPC error that says so.
fn assert_state_unavailable(port: u16) {
    let r = call_raw(port, "add", json!({"a": 1, "b": 2}));
    assert_eq!(r.status, 503, "{r:?}");
    let j = r.json();
    assert_eq!(j["error"]["code"].as_i64(), Some(STATE_UNAVAILABLE), "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Redis") && m.contains("unreachable or not read yet")),
        "{j}"
    );
}

/// A gateway whose Redis does not answer yet (a slow or hung Redis at its start) has not read
/// the fleet's spend: its budgets are closed from its first request, not judged on its own
/// counts, and it is not ready meanwhile. Before, a new host admitted a whole budget the fleet
/// had spent, and that spend was never published (an attacker's review: ten calls under a
/// budget of five, with 20 ms added to each Redis answer; five at once with Redis hung).
#[test]
fn a_gateway_that_has_not_read_the_fleets_spend_admits_no_budgeted_call() {
    let fleet = Fleet::start_with(Redis::start(), 1, Settings::new(1000, 1000, true));
    // Accepts connections and never answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("redis://{}/", hung.local_addr().expect("addr"));
    hung.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accept = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match hung.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let mut g = fleet.gateway_at(&Settings::new(1000, 1000, true), &url);
    // From its first request on: refused, whether the first round is still waiting for Redis
    // or has given up on it.
    for _ in 0..6 {
        assert_state_unavailable(g.port);
    }
    g.daemon.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    accept.join().expect("join");
}

/// A new gateway reads the whole of the fleet's spend before it admits a budgeted call: a hash
/// padded with 15,000 fields (hosts, agents and runs of a busy fleet; run ids are the clients')
/// takes several rounds to scan, and a host that opened its budgets after the first step
/// admitted a budget the fleet had spent (a review: five new hosts each admitted five calls
/// under a spent budget of five).
#[test]
fn a_new_gateway_reads_the_whole_of_the_fleets_spend_before_admitting_a_budgeted_call() {
    let fleet = Fleet::start_with(Redis::start(), 1, Settings::new(1000, 1000, true));
    let a = fleet.gateways[0].port;
    let budgets = fleet.key("spend");
    // Its budgets are closed (503) until its first round has read the fleet's spend; /readyz
    // says so. (Called at once, the first call raced that round and once lost it.)
    wait_for("the first gateway ready", Duration::from_secs(10), || {
        raw(
            fleet.gateways[0].admin,
            b"GET /readyz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
        )
        .0
        .status
            == 200
    });
    for _ in 0..5 {
        assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    wait_for("5 spent, in Redis", Duration::from_secs(2), || {
        spent_in(&fleet.redis, &budgets) == 5
    });
    let fields = hgetall(&fleet.redis, &budgets);
    let (window, _) = fields[0].0.rsplit_once('|').expect("a window field");
    fleet.redis.cli(&[
        "EVAL",
        "for i = 1, 15000 do redis.call('HSET', KEYS[1], ARGV[1] .. '|pad/' .. i, '0|1') end",
        "1",
        &budgets,
        window,
    ]);
    let mut c = fleet.gateway(&fleet.settings.clone());
    let statuses: Vec<u16> = (0..8)
        .map(|_| call(c.port, "add", json!({"a": 1, "b": 2})).0)
        .collect();
    assert!(!statuses.contains(&200), "{statuses:?}");
    // Once read, it refuses for the spent budget (429), not for want of the fleet's state.
    wait_for("the budget read", Duration::from_secs(10), || {
        call(c.port, "add", json!({"a": 1, "b": 2})).0 == 429
    });
    c.daemon.stop();
}

/// A Redis that asks for a password gets it from the environment variable
/// `redis_password_env` names (before, it could only be written into the address, and a
/// configuration error quoting that line printed it); a wrong one never connects.
#[test]
fn a_redis_password_comes_from_the_environment() {
    const PASSWORD: &str = "redis-password-0123456789";
    let redis = Redis::start_with_password(PASSWORD);
    let mut settings = Settings::new(1000, 1000, true);
    settings.state_extra = "redis_password_env = \"GW_REDIS_PASSWORD\"\n".into();
    settings.env = vec![("GW_REDIS_PASSWORD".into(), PASSWORD.into())];
    let mut fleet = Fleet::start_with(redis, 1, settings.clone());
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 1.0);
    assert_eq!(
        fleet.redis.cli(&["ZCARD", &fleet.key("hosts")]).trim(),
        "1",
        "the gateway beats in the Redis that asks for a password"
    );
    let mut wrong = settings.clone();
    wrong.env = vec![("GW_REDIS_PASSWORD".into(), "not-the-password".into())];
    let mut bad = fleet.gateway(&wrong);
    wait_for("5 failed rounds", Duration::from_secs(5), || {
        metric(bad.admin, "mcp_gateway_fleet_round_failures_total") >= 5.0
    });
    assert_eq!(metric(bad.admin, "mcp_gateway_fleet_connected"), 0.0);
    assert!(
        !bad.daemon.log().contains("not-the-password"),
        "the password is never logged"
    );
    bad.daemon.stop();
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

#[test]
fn a_fleet_over_rediss_shares_a_budget_and_never_connects_with_a_wrong_ca_nor_in_plaintext() {
    let pki = Pki::new("fleet-redis");
    let server = pki.server("redis", &["127.0.0.1"], KeyKind::EcdsaP256);
    let client = pki.client("gateway", "gateway", None);
    // Redis on a TLS port only, asking every client for a certificate of the test's CA.
    let redis = Redis::start_tls(&pki, &server, &client);
    let mut settings = Settings::new(1000, 1000, true);
    settings.state_extra = tls_state(&pki.ca, &client);
    let mut fleet = Fleet::start_with(redis, 2, settings.clone());
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    fleet.wait_metric_all("mcp_gateway_fleet_connected", 1.0);
    assert_eq!(
        fleet.redis.cli(&["ZCARD", &fleet.key("hosts")]).trim(),
        "2",
        "both gateways beat in the TLS-only Redis"
    );
    for _ in 0..5 {
        // In a quick row: each host keeps its share of the rate's burst at hand.
        assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    std::thread::sleep(Duration::from_millis(500));
    for port in [b, a] {
        assert_eq!(
            call(port, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "5 of 5 spent on A over TLS: refused on :{port}"
        );
    }

    // A gateway that trusts another CA: Redis's certificate is refused, and it never connects.
    let other = Pki::new("fleet-other");
    let mut wrong = settings.clone();
    wrong.state_extra = tls_state(&other.ca, &client);
    let mut bad = fleet.gateway(&wrong);
    wait_metric(bad.admin, "mcp_gateway_fleet_fallback_active", 1.0);
    wait_for("5 failed rounds", Duration::from_secs(5), || {
        metric(bad.admin, "mcp_gateway_fleet_round_failures_total") >= 5.0
    });
    assert_eq!(metric(bad.admin, "mcp_gateway_fleet_connected"), 0.0);
    let log = bad.daemon.log();
    assert!(
        log.contains("Redis unreachable") && log.to_lowercase().contains("certificate"),
        "the log says why: {log}"
    );
    assert_state_unavailable(bad.port);
    assert_eq!(
        fleet.redis.cli(&["ZCARD", &fleet.key("hosts")]).trim(),
        "2",
        "the gateway with the wrong CA never beat"
    );

    // `rediss://` to a Redis that speaks plaintext only: no fallback to plaintext, nothing is
    // written there.
    let plain = Redis::start();
    let mut to_plain = fleet.gateway_at(&settings, &format!("rediss://127.0.0.1:{}/", plain.port));
    wait_metric(to_plain.admin, "mcp_gateway_fleet_fallback_active", 1.0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(metric(to_plain.admin, "mcp_gateway_fleet_connected"), 0.0);
    assert_state_unavailable(to_plain.port);
    assert_eq!(
        plain.cli(&["DBSIZE"]).trim(),
        "0",
        "nothing reached the plaintext Redis"
    );
    bad.daemon.stop();
    to_plain.daemon.stop();
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

/// `HGETALL` of `key` as (field, value) pairs.
fn hgetall(redis: &Redis, key: &str) -> Vec<(String, String)> {
    let out = redis.cli(&["HGETALL", key]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter(|p| p.len() == 2)
        .map(|p| (p[0].to_owned(), p[1].to_owned()))
        .collect()
}

/// A host's spend as published in the budgets' hash (`spend`) (`<amount>|<seq>`, perhaps sealed).
fn spend(value: &str) -> Option<i64> {
    let bare = match value.strip_prefix("sealed1:") {
        Some(rest) => rest.split_once(':')?.1,
        None => value,
    };
    bare.split_once('|')?.0.parse().ok()
}

/// The spend of every host in the budgets' hash `key`, summed.
fn spent_in(redis: &Redis, key: &str) -> i64 {
    hgetall(redis, key)
        .iter()
        .map(|(_, v)| spend(v).unwrap_or_else(|| panic!("not a spend: {v}")))
        .sum()
}

fn ban(admin: u16, ip: &str) {
    integration_tests::peers::ban(admin, ip, 600);
}

fn lift(admin: u16, ip: &str) {
    let req = format!("DELETE /bans/{ip} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n");
    let (r, _) = raw(admin, req.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
}

/// The same when Redis lost its data meanwhile (a restart without persistence, a flush): the
/// lift is published again by the gateway that knows it, and the gateway that comes back with
/// the ban kept takes it. Before, the lift was only in Redis: the ban came back on every
/// gateway (an operator's review).
#[test]
fn a_ban_lifted_while_a_gateway_was_down_stays_lifted_after_redis_lost_its_data() {
    let mut fleet = Fleet::start_with(Redis::start(), 2, Settings::new(1000, 1000, false));
    let (a, b) = (fleet.gateways[0].admin, fleet.gateways[1].admin);
    let has = |admin: u16, ip: &str| bans(admin).to_string().contains(ip);
    ban(a, "198.18.5.7");
    wait_for("the ban reaches b", Duration::from_secs(5), || {
        has(b, "198.18.5.7")
    });
    // b's state store keeps it (flushed every second), then b stops; the ban is lifted, and
    // Redis loses everything.
    std::thread::sleep(Duration::from_millis(2500));
    fleet.gateways[1].daemon.stop();
    lift(a, "198.18.5.7");
    std::thread::sleep(Duration::from_millis(1000));
    fleet.redis.cli(&["FLUSHALL"]);
    // a's next rounds find the fleet's state gone and publish what it knows again.
    let bans_key = fleet.key("bans");
    wait_for("a publishes the lift again", Duration::from_secs(5), || {
        fleet
            .redis
            .cli(&["HGET", &bans_key, "198.18.5.7"])
            .starts_with("lifted:")
    });
    let instance = fleet.gateways[1].instance.clone();
    fleet.gateways[1].daemon =
        Daemon::restart_local_with_env(&instance, &mut fleet.gateways[1].daemon, &[]);
    wait_for("b takes the lift", Duration::from_secs(5), || {
        !has(b, "198.18.5.7")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!has(a, "198.18.5.7"), "the lifted ban came back on a");
    assert!(!has(b, "198.18.5.7"), "the lifted ban came back on b");
    // A new ban of the address is the fleet's, and ends the lift.
    ban(b, "198.18.5.7");
    wait_for("a new ban reaches a", Duration::from_secs(5), || {
        has(a, "198.18.5.7")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(has(a, "198.18.5.7") && has(b, "198.18.5.7"));
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

/// A ban lifted while a gateway of the fleet was down stays lifted when that gateway comes back
/// with the ban in its state store, with a fleet secret and without: it is not published again
/// as a new ban (an attacker's review: a rolling restart brought back, on every gateway, a ban
/// an operator had lifted meanwhile). A ban made on it after the lift is still published.
#[test]
fn a_ban_lifted_while_a_gateway_was_down_stays_lifted_when_it_comes_back() {
    for secret in [false, true] {
        let mut settings = Settings::new(1000, 1000, false);
        if secret {
            settings.state_extra = format!("fleet_secret_env = \"{SECRET_VAR}\"\n");
            settings.env = vec![(
                SECRET_VAR.to_owned(),
                unique("a-fleet-secret-of-at-least-32-characters"),
            )];
        }
        let env: Vec<(String, String)> = settings.env.clone();
        let mut fleet = Fleet::start_with(Redis::start(), 2, settings);
        let (a, b) = (fleet.gateways[0].admin, fleet.gateways[1].admin);
        let has = |admin: u16, ip: &str| bans(admin).to_string().contains(ip);
        ban(a, "198.18.5.5");
        wait_for("the ban reaches b", Duration::from_secs(5), || {
            has(b, "198.18.5.5")
        });
        // b's state store keeps it (flushed every second), then b stops; the ban is lifted
        // meanwhile.
        std::thread::sleep(Duration::from_millis(2500));
        fleet.gateways[1].daemon.stop();
        lift(a, "198.18.5.5");
        assert!(!has(a, "198.18.5.5"));
        // a's next rounds take the lift to Redis (b, back before that, would find the ban
        // there still, and take the lift from a later round).
        std::thread::sleep(Duration::from_millis(1000));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let instance = fleet.gateways[1].instance.clone();
        fleet.gateways[1].daemon =
            Daemon::restart_local_with_env(&instance, &mut fleet.gateways[1].daemon, &env);
        // b comes back with the ban kept, and takes the lift: at once from its first round.
        wait_for("b takes the lift", Duration::from_secs(5), || {
            !has(b, "198.18.5.5")
        });
        // A few rounds (250 ms each) later, still lifted everywhere.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            !has(a, "198.18.5.5"),
            "secret {secret}: the lifted ban came back on a"
        );
        assert!(
            !has(b, "198.18.5.5"),
            "secret {secret}: the lifted ban came back on b"
        );
        // A new ban of the same address on b is the fleet's.
        ban(b, "198.18.5.5");
        wait_for("a new ban reaches a", Duration::from_secs(5), || {
            has(a, "198.18.5.5")
        });
        // A ban lifted and made again within a second (an operator undoing a mistaken lift)
        // is kept: it is not a ban kept over a restart.
        ban(a, "198.18.5.6");
        wait_for("the ban reaches b", Duration::from_secs(5), || {
            has(b, "198.18.5.6")
        });
        lift(a, "198.18.5.6");
        std::thread::sleep(Duration::from_millis(800));
        ban(a, "198.18.5.6");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            has(a, "198.18.5.6"),
            "secret {secret}: the ban made again was dropped"
        );
        wait_for(
            "the ban made again reaches b",
            Duration::from_secs(5),
            || has(b, "198.18.5.6"),
        );
        for g in &mut fleet.gateways {
            g.daemon.stop();
        }
    }
}

/// Waits up to `within` for `f`.
pub(super) fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_redis_that_lost_its_data_is_reseeded_with_the_highest_counts_and_the_bans_again() {
    let mut fleet = Fleet::start(1000, 1000, true);
    let ports: Vec<u16> = fleet.gateways.iter().map(|g| g.port).collect();
    for _ in 0..3 {
        assert_eq!(call(ports[0], "add", json!({"a": 1, "b": 2})), (200, None));
    }
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        assert_eq!(call(ports[1], "add", json!({"a": 1, "b": 2})), (200, None));
    }
    std::thread::sleep(Duration::from_millis(500));
    for p in &ports {
        assert_eq!(
            call(*p, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED))
        );
    }
    ban(fleet.gateways[1].admin, "198.18.7.8");
    let bans_key = fleet.key("bans");
    wait_for("the ban in Redis", Duration::from_secs(2), || {
        hgetall(&fleet.redis, &bans_key)
            .iter()
            .any(|(ip, _)| ip == "198.18.7.8")
    });
    let budgets_key = fleet.key("spend");
    let spent = |redis: &Redis| spent_in(redis, &budgets_key);
    assert_eq!(spent(&fleet.redis), 5, "one budget, 5 spent (3 and 2)");
    for g in &fleet.gateways {
        assert_eq!(metric(g.admin, "mcp_gateway_fleet_reseeds_total"), 0.0);
    }
    // A session opened before the loss.
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "fleet-test", "version": "1"}},
    })
    .to_string();
    let r = raw(ports[0], &post("/fed", &init, "")).0;
    assert_eq!(r.status, 200, "{r:?}");
    let session = r.header("mcp-session-id").expect("a session id").to_owned();
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string();
    let continues = |port: u16| {
        let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
        raw(port, &post("/fed", &list, &headers)).0.status
    };
    assert_eq!(continues(ports[1]), 200);

    // Redis loses everything while the fleet runs.
    assert_eq!(fleet.redis.cli(&["FLUSHALL"]).trim(), "OK");
    for g in &fleet.gateways {
        wait_for(
            "every gateway notices the loss",
            Duration::from_secs(5),
            || metric(g.admin, "mcp_gateway_fleet_reseeds_total") >= 1.0,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    // Each gateway offered its whole count (5): the highest is kept, not the sum (15).
    assert_eq!(
        spent(&fleet.redis),
        5,
        "each host's spend published again, not once per gateway"
    );
    assert_eq!(
        fleet.redis.cli(&["EXISTS", &fleet.key("epoch")]).trim(),
        "1"
    );
    for p in &ports {
        assert_eq!(
            call(*p, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "still spent after the flush on :{p}"
        );
    }
    wait_for("the ban published again", Duration::from_secs(2), || {
        hgetall(&fleet.redis, &bans_key)
            .iter()
            .any(|(ip, _)| ip == "198.18.7.8")
    });

    // A gateway that starts after the flush learns both.
    let mut late = fleet.gateway(&fleet.settings.clone());
    wait_for(
        "the ban reaches the late gateway",
        Duration::from_secs(3),
        || bans(late.admin).to_string().contains("198.18.7.8"),
    );
    assert_eq!(
        call(late.port, "add", json!({"a": 1, "b": 2})),
        (429, Some(BUDGET_EXHAUSTED)),
        "5 of 5 learned by a gateway that started after the flush"
    );
    assert_eq!(spent(&fleet.redis), 5);
    // The session key was published again: the late gateway agreed the fleet's, and the
    // session opened before the loss goes on through it (before, it agreed a new key and
    // every session of the fleet was unknown to it: an operator's review).
    assert_eq!(
        continues(late.port),
        200,
        "a session opened before the loss"
    );
    for g in &fleet.gateways {
        assert_eq!(
            metric(g.admin, "mcp_gateway_fleet_session_key_conflicts_total"),
            0.0
        );
    }
    late.daemon.stop();
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

const SECRET_VAR: &str = "MCP_GATEWAY_TEST_FLEET_SECRET";

/// The sum of `name` over the fleet's gateways.
fn metric_sum(fleet: &Fleet, name: &str) -> f64 {
    fleet.gateways.iter().map(|g| metric(g.admin, name)).sum()
}

#[test]
fn with_a_fleet_secret_approvals_and_bans_forged_in_redis_are_ignored_and_real_ones_spread() {
    let mut settings = Settings::new(1000, 1000, false);
    settings.state_extra = format!("fleet_secret_env = \"{SECRET_VAR}\"\n");
    settings.env = vec![(
        SECRET_VAR.to_owned(),
        unique("a-fleet-secret-of-at-least-32-characters"),
    )];
    let mut fleet = Fleet::start_with(Redis::start(), 3, settings);
    let ports: Vec<u16> = fleet.gateways.iter().map(|g| g.port).collect();
    for p in &ports {
        assert!(echo_listed(*p), "first sight: shown");
    }
    let pins_key = fleet.key("pins");
    wait_for("the pins sealed in Redis", Duration::from_secs(3), || {
        let pins = hgetall(&fleet.redis, &pins_key);
        pins.iter().any(|(k, _)| k == "u0/echo")
            && pins.iter().all(|(_, v)| v.starts_with("sealed1:"))
    });
    assert_eq!(
        fleet
            .redis
            .cli(&["EXISTS", &fleet.key("session-key")])
            .trim(),
        "0",
        "with a secret, Redis holds only a salt, never the session key"
    );
    assert_eq!(
        fleet
            .redis
            .cli(&["EXISTS", &fleet.key("session-salt")])
            .trim(),
        "1"
    );

    // The upstream changes `echo`: held everywhere until an operator approves it.
    fleet.upstream = None;
    fleet.upstream = Some(PyServer::start_on(fleet.up_port, &["--changed-echo"]));
    for p in &ports {
        assert!(!echo_listed(*p), "changed: hidden on :{p}");
    }
    let (r, _) = raw(
        fleet.gateways[0].admin,
        b"GET /pins HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
    );
    let pins = r.json();
    let echo = pins
        .as_array()
        .expect("pins")
        .iter()
        .find(|p| p["tool"] == "echo")
        .expect("echo's pin")
        .clone();
    let pending = &echo["pending"];
    assert!(pending["sha256"].is_string(), "{echo}");
    // What an approval of the changed definition looks like, written into Redis by someone
    // without the secret: bare, then with a made-up seal.
    let approval = json!({
        "configured": null,
        "approved": pending["sha256"],
        "approved_definition": pending["definition"],
        "pending": null,
    })
    .to_string();
    let bogus_mac = "A".repeat(43);
    for forged in [approval.clone(), format!("sealed1:{bogus_mac}:{approval}")] {
        let before = metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total");
        fleet.redis.cli(&["HSET", &pins_key, "u0/echo", &forged]);
        wait_for("the forgery is counted", Duration::from_secs(3), || {
            metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total") > before
        });
        std::thread::sleep(Duration::from_millis(1200));
        for p in &ports {
            assert!(!echo_listed(*p), "a forged approval unhid echo on :{p}");
            assert_eq!(
                call(*p, "echo", json!({"text": "hi"})),
                (403, Some(PENDING_APPROVAL)),
                "a forged approval made echo callable on :{p}"
            );
        }
        let now = hgetall(&fleet.redis, &pins_key);
        let (_, v) = now
            .iter()
            .find(|(k, _)| k == "u0/echo")
            .expect("echo's pin");
        assert!(
            v.starts_with("sealed1:") && *v != forged,
            "replaced by a sealed pin: {v}"
        );
    }
    assert_eq!(
        metric_sum(&fleet, "mcp_gateway_fleet_approvals_received_total"),
        0.0
    );

    // A ban written into Redis without the secret bans nobody.
    let bans_key = fleet.key("bans");
    let until = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 600_000)
        .to_string();
    let before = metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total");
    fleet.redis.cli(&["HSET", &bans_key, "198.18.9.9", &until]);
    wait_for("the forged ban is counted", Duration::from_secs(3), || {
        metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total") > before
    });
    std::thread::sleep(Duration::from_millis(600));
    for g in &fleet.gateways {
        assert!(
            !bans(g.admin).to_string().contains("198.18.9.9"),
            "a forged ban applied on :{}",
            g.admin
        );
    }
    assert!(
        !hgetall(&fleet.redis, &bans_key)
            .iter()
            .any(|(ip, _)| ip == "198.18.9.9"),
        "the forged ban is removed from Redis"
    );
    // A real ban, sealed, still reaches every gateway; a forgery over it does not lift it.
    ban(fleet.gateways[1].admin, "198.18.7.9");
    for g in &fleet.gateways {
        wait_for(
            "the real ban reaches every gateway",
            Duration::from_secs(2),
            || bans(g.admin).to_string().contains("198.18.7.9"),
        );
    }
    fleet.redis.cli(&["HSET", &bans_key, "198.18.7.9", "1"]);
    std::thread::sleep(Duration::from_millis(800));
    for g in &fleet.gateways {
        assert!(
            bans(g.admin).to_string().contains("198.18.7.9"),
            "a forged value lifted the ban on :{}",
            g.admin
        );
    }
    let sealed_in_redis = || {
        hgetall(&fleet.redis, &bans_key)
            .iter()
            .any(|(ip, v)| ip == "198.18.7.9" && v.starts_with("sealed1:"))
    };
    wait_for(
        "the ban sealed again in Redis",
        Duration::from_secs(2),
        sealed_in_redis,
    );

    // Deleted from Redis by someone without the secret: not lifted, published again.
    fleet.redis.cli(&["HDEL", &bans_key, "198.18.7.9"]);
    wait_for(
        "the deleted ban published again",
        Duration::from_secs(2),
        sealed_in_redis,
    );
    for g in &fleet.gateways {
        assert!(
            bans(g.admin).to_string().contains("198.18.7.9"),
            "a deletion in Redis lifted the ban on :{}",
            g.admin
        );
    }
    // Lifted by an operator on one gateway: the sealed lift reaches every gateway.
    let (r, _) = raw(
        fleet.gateways[2].admin,
        b"DELETE /bans/198.18.7.9 HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{r:?}");
    for g in &fleet.gateways {
        wait_for(
            "the lift reaches every gateway",
            Duration::from_secs(2),
            || !bans(g.admin).to_string().contains("198.18.7.9"),
        );
    }

    // A real approval on one gateway still reaches the others.
    approve(fleet.gateways[0].admin);
    assert!(echo_listed(ports[0]), "approved here");
    wait_for(
        "the approval on one gateway unhides the tool on the others",
        Duration::from_secs(5),
        || echo_listed(ports[1]) && echo_listed(ports[2]),
    );
    assert_eq!(call(ports[2], "echo", json!({"text": "hi"})).0, 200);
    assert!(metric_sum(&fleet, "mcp_gateway_fleet_approvals_received_total") >= 2.0);
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

#[test]
fn garbage_wrong_types_and_a_flood_in_redis_never_stop_a_round_and_a_budget_still_holds() {
    let mut fleet = Fleet::start_with(Redis::start(), 2, Settings::new(1000, 1000, true));
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    for _ in 0..3 {
        assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    let budgets = fleet.key("spend");
    wait_for("A's spend in Redis", Duration::from_secs(2), || {
        hgetall(&fleet.redis, &budgets).len() == 1
    });
    let (field, _) = hgetall(&fleet.redis, &budgets).remove(0);
    let (window, _) = field.rsplit_once('|').expect("<window>|<host>");
    let rate = fleet
        .redis
        .cli(&["KEYS", &format!("{}rate:*", fleet.key(""))]);
    let rate = rate
        .lines()
        .find(|k| !k.is_empty())
        .expect("a rate's key")
        .to_owned();
    let ignored = metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total");

    // What anyone who can write to Redis may leave there: values that are not numbers (under
    // A's own field, and under a made-up host's), a field that names no window, 20,000 such
    // fields (written 1,000 at a time: one script of 20,000 holds Redis up for 30-90 ms on
    // these machines, which tests Redis's speed, not the rounds), and every key of the fleet
    // replaced by another type, all at once (one after another, a round could put a key back
    // in between).
    fleet.redis.cli(&["HSET", &budgets, &field, "abc"]);
    fleet
        .redis
        .cli(&["HSET", &budgets, &format!("{window}|intruder"), "abc"]);
    fleet.redis.cli(&["HSET", &budgets, "junk", "1"]);
    for from in (0..20_000).step_by(1000) {
        fleet.redis.cli(&[
            "EVAL",
            "local f = tonumber(ARGV[2]) for i = f, f + 999 do redis.call('HSET', KEYS[1], ARGV[1] .. i, 'abc') end",
            "1",
            &budgets,
            &format!("{window}|flood-"),
            &from.to_string(),
        ]);
    }
    let (hosts, bans, pins, ended, epoch) = (
        fleet.key("hosts"),
        fleet.key("bans"),
        fleet.key("pins"),
        fleet.key("ended"),
        fleet.key("epoch"),
    );
    let replaced = fleet.redis.cli(&[
        "EVAL",
        "for i = 1, 5 do redis.call('SET', KEYS[i], 'x') end \
         redis.call('DEL', KEYS[6]) redis.call('HSET', KEYS[6], 'a', 'b') \
         return {redis.call('TYPE', KEYS[1]).ok, redis.call('TYPE', KEYS[6]).ok}",
        "6",
        &rate,
        &hosts,
        &bans,
        &pins,
        &ended,
        &epoch,
    ]);
    assert_eq!(
        replaced.split_whitespace().collect::<Vec<_>>(),
        ["string", "hash"]
    );

    wait_for("the garbage is counted", Duration::from_secs(3), || {
        metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total") >= ignored + 7.0
    });
    wait_for("the flood is gone", Duration::from_secs(5), || {
        fleet.redis.cli(&["HLEN", &budgets]).trim() == "1"
    });
    for g in &fleet.gateways {
        assert_eq!(
            metric(g.admin, "mcp_gateway_fleet_round_failures_total"),
            0.0,
            "a round failed on :{}",
            g.admin
        );
        assert_eq!(metric(g.admin, "mcp_gateway_fleet_connected"), 1.0);
        // Each host counts the other again at its next heartbeat after the registry's repair.
        wait_metric(g.admin, "mcp_gateway_fleet_hosts_live", 2.0);
    }
    for (key, kind) in [("hosts", "zset"), ("epoch", "string"), ("spend", "hash")] {
        assert_eq!(fleet.redis.cli(&["TYPE", &fleet.key(key)]).trim(), kind);
    }
    // A's spend survived (published again), and the budget holds across the fleet.
    assert_eq!(spent_in(&fleet.redis, &budgets), 3);
    for _ in 0..2 {
        assert_eq!(call(b, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    std::thread::sleep(Duration::from_millis(500));
    for port in [a, b] {
        assert_eq!(
            call(port, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "5 of 5 spent across the fleet: refused on :{port}"
        );
    }
    assert_eq!(spent_in(&fleet.redis, &budgets), 5);
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

#[test]
fn with_a_fleet_secret_a_spent_budget_stays_spent_whatever_is_written_in_redis() {
    let mut settings = Settings::new(1000, 1000, true);
    settings.state_extra = format!("fleet_secret_env = \"{SECRET_VAR}\"\n");
    settings.env = vec![(
        SECRET_VAR.to_owned(),
        unique("a-fleet-secret-of-at-least-32-characters"),
    )];
    let mut fleet = Fleet::start_with(Redis::start(), 2, settings.clone());
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    let budgets = fleet.key("spend");
    let published = |amount: i64| {
        let all = hgetall(&fleet.redis, &budgets);
        all.len() == 1 && all[0].1.starts_with("sealed1:") && spend(&all[0].1) == Some(amount)
    };
    for _ in 0..3 {
        assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    wait_for("3 spent, sealed in Redis", Duration::from_secs(2), || {
        published(3)
    });
    let (field, three) = hgetall(&fleet.redis, &budgets).remove(0);
    for _ in 0..2 {
        assert_eq!(call(a, "add", json!({"a": 1, "b": 2})), (200, None));
    }
    wait_for("5 spent, sealed in Redis", Duration::from_secs(2), || {
        published(5)
    });
    std::thread::sleep(Duration::from_millis(300));
    for port in [a, b] {
        assert_eq!(
            call(port, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "5 of 5 spent on A: refused on :{port}"
        );
    }

    // Someone without the secret lowers the spend (bare, or with a made-up seal), writes back
    // the value A sealed at 3, deletes A's field, deletes the whole hash.
    let bogus = format!("sealed1:{}:0|99999999999999", "A".repeat(43));
    let attacks: [(&str, Vec<&str>); 5] = [
        (
            "lowered",
            vec!["HSET", &budgets, &field, "0|99999999999999"],
        ),
        ("forged", vec!["HSET", &budgets, &field, &bogus]),
        ("replayed", vec!["HSET", &budgets, &field, &three]),
        ("deleted", vec!["HDEL", &budgets, &field]),
        ("the hash deleted", vec!["DEL", &budgets]),
    ];
    for (what, cmd) in attacks {
        let before = metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total");
        fleet.redis.cli(&cmd);
        std::thread::sleep(Duration::from_millis(300));
        for port in [b, a] {
            assert_eq!(
                call(port, "add", json!({"a": 1, "b": 2})),
                (429, Some(BUDGET_EXHAUSTED)),
                "{what} in Redis: the spent budget reopened on :{port}"
            );
        }
        if !what.contains("deleted") {
            assert!(
                metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total") > before,
                "{what}: not counted"
            );
        }
        wait_for(
            &format!("{what}: A's spend published again"),
            Duration::from_secs(2),
            || published(5),
        );
    }
    // A gateway started now learns 5 of 5 from what the others published again.
    let mut late = fleet.gateway(&settings);
    wait_metric(late.admin, "mcp_gateway_fleet_connected", 1.0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        call(late.port, "add", json!({"a": 1, "b": 2})),
        (429, Some(BUDGET_EXHAUSTED)),
        "5 of 5 learned by a gateway started after the tampering"
    );
    late.daemon.stop();
    for g in &mut fleet.gateways {
        g.daemon.stop();
    }
}

/// Routes whose sessions the gateway itself holds, `stateless` being an upstream that speaks
/// only 2026-07-28: `/bridge` (passthrough, bridged) and `/alone` (federated, that upstream its
/// only member).
fn stateless_routes(stateless: &str) -> String {
    format!(
        r#"[[upstreams]]
name = "modern"
url = "{stateless}"
[[routes]]
path = "/bridge"
upstream = "modern"
[[routes]]
path = "/alone"
federate = [{{ upstream = "modern", prefix = "m_" }}]
"#
    )
}

/// The distinct keys of ended sessions in the fleet's stream (no fleet secret: bare hex).
fn ended_keys(fleet: &Fleet) -> std::collections::BTreeSet<String> {
    fleet
        .redis
        .cli(&["XRANGE", &fleet.key("ended"), "-", "+"])
        .lines()
        .filter(|l| l.len() == 16 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

/// A session-era client's session opened on `port`'s `path`: its id.
fn open_session(port: u16, path: &str) -> String {
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"fleet-test","version":"1"}}}"#;
    let r = raw(port, &post(path, init, "")).0;
    assert_eq!(r.status, 200, "{path}: {r:?}");
    r.header("mcp-session-id")
        .unwrap_or_else(|| panic!("{path}: a session id"))
        .to_owned()
}

/// `tools/list` in `session` on `port`'s `path`: the status, and the JSON-RPC error's code.
fn session_list(port: u16, path: &str, session: &str) -> (u16, Option<i64>) {
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
    let r = raw(port, &post(path, list, &headers)).0;
    // A 200 may come as an event stream; a refusal is JSON.
    let error = serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_i64());
    (r.status, error)
}

/// The client ends `session` with `DELETE`.
fn end_session(port: u16, path: &str, session: &str) {
    let delete = format!(
        "DELETE {path} HTTP/1.1\r\nhost: gw\r\nmcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n\r\n"
    );
    assert_eq!(raw(port, delete.as_bytes()).0.status, 200, "{path}");
}

const SESSION_NOT_FOUND: i64 = -32001;

/// Waits (at most `within`) until `session` is refused on `port` as an unknown one.
fn wait_refused(port: u16, path: &str, session: &str, within: Duration) {
    wait_for(
        &format!("{path}: the ended session refused on :{port}"),
        within,
        || match session_list(port, path, session) {
            (404, Some(SESSION_NOT_FOUND)) => true,
            (200, None) => false,
            other => panic!("{path} on :{port}: {other:?}"),
        },
    );
}

const ENDED_SENT: &str = "mcp_gateway_fleet_sessions_ended_total{direction=\"sent\"}";
const ENDED_RECEIVED: &str = "mcp_gateway_fleet_sessions_ended_total{direction=\"received\"}";

/// The sessions the gateway holds itself (bridged in front of a stateless-only upstream,
/// federated of a stateless-only member alone: the upstream holds none to end) are ended on
/// every gateway of the fleet when their client ends them on one: within a bounded wait, on a
/// gateway started afterwards, and after Redis lost everything; a session not ended goes on.
#[test]
fn a_session_the_gateway_holds_ended_on_one_gateway_is_ended_on_every_gateway_of_the_fleet() {
    let modern = PyServer::start_with(&["--stateless-only"]);
    let mut settings = Settings::new(1000, 1000, false);
    settings.routes_extra = stateless_routes(&modern.url());
    let mut fleet = Fleet::start_with(Redis::start(), 3, settings);
    let ports: Vec<u16> = fleet.gateways.iter().map(|g| g.port).collect();
    let (a, b, c) = (ports[0], ports[1], ports[2]);
    let mut live = Vec::new();
    for path in ["/bridge", "/alone"] {
        let ended = open_session(a, path);
        // The same client's next session is another: ending one ends only it.
        let other = open_session(a, path);
        assert_ne!(ended, other, "{path}");
        for port in [b, c] {
            assert_eq!(
                session_list(port, path, &ended),
                (200, None),
                "{path}: continues on :{port}"
            );
        }
        end_session(a, path, &ended);
        assert_eq!(
            session_list(a, path, &ended),
            (404, Some(SESSION_NOT_FOUND)),
            "{path}: ended where it was ended"
        );
        let at = Instant::now();
        for port in [b, c] {
            wait_refused(port, path, &ended, Duration::from_secs(3));
        }
        eprintln!(
            "{path}: refused on the two other gateways after {:?}",
            at.elapsed()
        );
        // The other session of the same client goes on everywhere.
        for port in [a, b, c] {
            assert_eq!(session_list(port, path, &other), (200, None), "{path}");
        }
        live.push((path, ended, other));
    }
    assert!(metric(fleet.gateways[0].admin, ENDED_SENT) >= 2.0);
    for g in &fleet.gateways[1..] {
        assert!(metric(g.admin, ENDED_RECEIVED) >= 2.0);
    }
    // Redis holds the ends' keys, never a session id.
    let stream = fleet.redis.cli(&["XRANGE", &fleet.key("ended"), "-", "+"]);
    for (_, ended, _) in &live {
        assert!(!stream.contains(ended.as_str()), "{stream}");
    }
    let keys = ended_keys(&fleet);
    assert_eq!(keys.len(), 2, "{stream}");

    // A gateway started afterwards refuses them (and serves the others).
    let mut late = fleet.gateway(&fleet.settings.clone());
    for (path, ended, other) in &live {
        wait_refused(late.port, path, ended, Duration::from_secs(3));
        assert_eq!(session_list(late.port, path, other), (200, None), "{path}");
    }
    late.daemon.stop();

    // Redis loses everything: the gateways publish the ends again.
    assert_eq!(fleet.redis.cli(&["FLUSHALL"]).trim(), "OK");
    for g in &fleet.gateways {
        wait_for("the loss noticed", Duration::from_secs(5), || {
            metric(g.admin, "mcp_gateway_fleet_reseeds_total") >= 1.0
        });
    }
    wait_for("the ends published again", Duration::from_secs(3), || {
        ended_keys(&fleet) == keys
    });
    for g in &mut fleet.gateways {
        assert_eq!(
            metric(g.admin, "mcp_gateway_fleet_round_failures_total"),
            0.0
        );
        g.daemon.stop();
    }
    drop(modern);
}

/// With a fleet secret, an end in Redis is sealed; what a Redis writer without the secret adds
/// to the stream (a session's key bare, a sealed value altered, an entry of its own shape) is
/// ignored and counted, and the rounds go on; the stream deleted and replaced by such entries,
/// the gateways publish the real ends again, and a gateway started afterwards refuses them.
#[test]
fn with_a_fleet_secret_ends_written_into_redis_without_it_are_ignored() {
    let modern = PyServer::start_with(&["--stateless-only"]);
    let mut settings = Settings::new(1000, 1000, false);
    settings.routes_extra = stateless_routes(&modern.url());
    settings.state_extra = format!("fleet_secret_env = \"{SECRET_VAR}\"\n");
    settings.env = vec![(
        SECRET_VAR.to_owned(),
        unique("a-fleet-secret-of-at-least-32-characters"),
    )];
    let mut fleet = Fleet::start_with(Redis::start(), 2, settings);
    let (a, b) = (fleet.gateways[0].port, fleet.gateways[1].port);
    let ended = open_session(a, "/bridge");
    let other = open_session(a, "/bridge");
    end_session(a, "/bridge", &ended);
    wait_refused(b, "/bridge", &ended, Duration::from_secs(3));
    let key = fleet.key("ended");
    let stream = fleet.redis.cli(&["XRANGE", &key, "-", "+"]);
    let sealed: Vec<&str> = stream
        .lines()
        .filter(|l| l.starts_with("sealed1:"))
        .collect();
    assert_eq!(sealed.len(), 1, "one end, sealed: {stream}");
    let (mac, hex) = sealed[0].rsplit_once(':').expect("sealed1:<mac>:<key>");
    assert_eq!(hex.len(), 16, "{stream}");
    let ignored = metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total");

    // The stream replaced: the real end's key bare, its seal over another key, an entry of
    // another shape.
    let flipped = if hex.starts_with('0') { '1' } else { '0' };
    let altered = format!("{mac}:{flipped}{}", &hex[1..]);
    fleet.redis.cli(&["DEL", &key]);
    fleet.redis.cli(&["XADD", &key, "*", "k", hex]);
    fleet.redis.cli(&["XADD", &key, "*", "k", &altered]);
    fleet.redis.cli(&["XADD", &key, "*", "intruder", "x"]);
    wait_for("the forged entries counted", Duration::from_secs(3), || {
        metric_sum(&fleet, "mcp_gateway_fleet_unsealed_ignored_total") >= ignored + 6.0
    });
    wait_for(
        "the real end published again",
        Duration::from_secs(3),
        || {
            fleet
                .redis
                .cli(&["XRANGE", &key, "-", "+"])
                .lines()
                .any(|l| l == sealed[0])
        },
    );
    let mut late = fleet.gateway(&fleet.settings.clone());
    wait_refused(late.port, "/bridge", &ended, Duration::from_secs(3));
    assert_eq!(session_list(late.port, "/bridge", &other), (200, None));
    assert!(metric(late.admin, "mcp_gateway_fleet_unsealed_ignored_total") >= 3.0);
    late.daemon.stop();
    for g in &mut fleet.gateways {
        assert_eq!(
            metric(g.admin, "mcp_gateway_fleet_round_failures_total"),
            0.0
        );
        assert_eq!(metric(g.admin, "mcp_gateway_fleet_connected"), 1.0);
        g.daemon.stop();
    }
    drop(modern);
}
