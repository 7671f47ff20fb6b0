//! Scenario `policy`: what a policy decision costs on the worker (identity by API key, tool
//! rule, argument rules, tenant and agent rates, budgets, loop breaker), timed one decision at
//! a time; and how closely a tenant's rate limit holds when its connections are spread over
//! every worker of a real gateway.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use gateway::{
    config::Config,
    mcp::{Parsed, Parser},
    policy::{Ask, Policy, limits::State},
};
use hdrhistogram::Histogram;
use integration_tests::peers::{KillOnDrop, demo_upstream, free_port, wait_port};

use crate::proxy::bin;

const KEY: &str = "bench-key-of-acme-0123456789";

/// A realistic policy: three tenants, an API key, a dozen tool rules with argument rules, rates,
/// budgets and the loop breaker (limits high enough that the measured calls are admitted).
fn config() -> Config {
    let mut rules = String::new();
    for i in 0..10 {
        rules.push_str(&format!(
            "[[policy.tools]]\nmatch = \"github/tool_{i}_*\"\ncost = 2\n"
        ));
    }
    let text = format!(
        r#"
[gateway]
instance = "bench-policy"
workers = 1
[[listeners]]
address = "127.0.0.1:1"
[admin]
address = "127.0.0.1:2"
[kernel]
enabled = false
default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
[tenants.policy]
requests_per_sec = 1000000000
agent_requests_per_sec = 1000000000
budget = {{ window_s = 3600, tenant = 1000000000000, agent = 1000000000000 }}
loop_breaker = {{ max_repeats = 100000, window_s = 60 }}
[[tenants.policy.tools]]
match = "github/delete_*"
action = "deny"
[[tenants]]
name = "beta"
id = 2
[[auth.api_keys]]
sha256 = "{sha}"
tenant = "acme"
agent = "acme-bot"
{rules}
[[policy.tools]]
match = "github/search_issues"
cost = 1
max_arguments_bytes = 4096
[[policy.tools.arguments]]
pointer = "/repo"
type = "string"
pattern = "^[a-z0-9-]+/[a-z0-9-]+$"
[[policy.tools.arguments]]
pointer = "/limit"
type = "integer"
minimum = 1
maximum = 100
[[policy.tools.arguments]]
pointer = "/query"
max_length = 256
[[upstreams]]
name = "github"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "github"
auth = ["api_key"]
"#,
        sha = gateway::policy::sha256_hex(KEY)
    );
    Config::from_toml(&text).expect("bench policy config")
}

/// The typical call, in [`VARIANTS`] versions that differ in the query's page (so that the loop
/// breaker follows as many distinct calls, as it would in real traffic).
fn call(page: usize) -> Vec<u8> {
    format!(
        r#"{{"jsonrpc":"2.0","id":4711,"method":"tools/call","params":{{"name":"search_issues","arguments":{{"repo":"acme/gateway","query":"label:bug state:open sort:updated page:{page}","limit":25,"fields":["title","url","labels","updated_at"]}},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}}}}"#
    )
    .into_bytes()
}

const VARIANTS: usize = 1024;

pub struct DecisionCost {
    pub decisions: u64,
    /// Per decision, ns, including the clock read.
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// The clock read alone, measured the same way.
    pub clock_p50: u64,
    pub clock_p99: u64,
    /// The identity part alone (within the same decisions).
    pub identity_p50: u64,
    pub identity_p99: u64,
}

/// Times `n` decisions one at a time: identity from the API key, then admission of the parsed
/// `tools/call`.
pub fn decision_cost(n: u64) -> DecisionCost {
    let c = config();
    let policy = Policy::compile(&c).expect("compiles");
    let state = Arc::new(State::default());
    let route = &c.routes[0];
    let calls: Vec<(usize, _)> = (0..VARIANTS)
        .map(|i| {
            let bytes = call(i + 1);
            let Ok(Parsed::Single(m)) = Parser::default().parse(&bytes) else {
                panic!("the call parses");
            };
            (bytes.len(), m)
        })
        .collect();
    let source = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let headers: gateway::http::Fields = [("x-api-key", KEY), ("host", "gw")].into_iter().collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("histogram");
    let mut ident = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("histogram");
    let mut clock = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("histogram");
    // Warm up, then measure.
    for pass in 0..2 {
        for i in 0..n {
            let (len, m) = &calls[i as usize % VARIANTS];
            let t = Instant::now();
            let who = policy.authenticate(route, &headers, 0).expect("identified");
            let identified = t.elapsed();
            let ask = Ask {
                is_request: true,
                method: "tools/call",
                tool: Some(("github", m.name.as_deref().unwrap_or_default())),
                arguments: m.arguments.as_ref(),
                argument_keys: None,
                message_bytes: *len,
                source,
                held_values: &std::cell::Cell::new(gateway::values::MAX),
            };
            let admitted = policy.admit(&state, &who, &ask).expect("admitted");
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            std::hint::black_box(admitted);
            if pass == 1 {
                let _ = hist.record(ns.max(1));
                let _ = ident.record(
                    u64::try_from(identified.as_nanos())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
            }
        }
    }
    for _ in 0..n {
        let t = Instant::now();
        let ns = u64::try_from(std::hint::black_box(t).elapsed().as_nanos()).unwrap_or(0);
        let _ = clock.record(ns.max(1));
    }
    DecisionCost {
        decisions: n,
        p50: hist.value_at_quantile(0.5),
        p90: hist.value_at_quantile(0.9),
        p99: hist.value_at_quantile(0.99),
        p999: hist.value_at_quantile(0.999),
        max: hist.max(),
        clock_p50: clock.value_at_quantile(0.5),
        clock_p99: clock.value_at_quantile(0.99),
        identity_p50: ident.value_at_quantile(0.5),
        identity_p99: ident.value_at_quantile(0.99),
    }
}

pub struct RateAccuracy {
    pub workers: usize,
    pub connections: usize,
    pub rate: u64,
    pub burst: u64,
    pub seconds: f64,
    pub admitted: u64,
    pub refused: u64,
    pub allowed: f64,
}

/// A gateway with `workers` workers and a tenant limited to `rate`/s; `connections` keep-alive
/// connections (spread over the workers by SO_REUSEPORT) call as fast as they can for
/// `seconds`. Admitted / (burst + rate × elapsed) says how well the limit holds.
pub fn rate_accuracy(seconds: f64) -> RateAccuracy {
    let (rate, burst, workers, connections) = (2_000u64, 100u64, 2usize, 16usize);
    let up_port = free_port();
    let _upstream = demo_upstream(up_port);
    let port = free_port();
    let path = std::env::temp_dir().join(format!("bench-rate-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "[gateway]\ninstance = \"bench-rate\"\nworkers = {workers}\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\
             [admin]\naddress = \"127.0.0.1:{}\"\n[kernel]\nenabled = false\ndefault_tenant = \"local\"\n\
             [[tenants]]\nname = \"local\"\nid = 0\n[tenants.policy]\nrequests_per_sec = {rate}\nburst = {burst}\n\
             [[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:{up_port}/mcp\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"up\"\n",
            free_port()
        ),
    )
    .expect("config");
    let _gateway = KillOnDrop(
        Command::new(bin("gateway"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "error")
            .stderr(Stdio::null())
            .spawn()
            .expect("start gateway"),
    );
    wait_port(port, Duration::from_secs(5));
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let request = format!(
        "POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n\
         mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: add\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (stop, admitted, refused, request) = (
                Arc::clone(&stop),
                Arc::clone(&admitted),
                Arc::clone(&refused),
                request.clone(),
            );
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(request.as_bytes()).is_err() {
                        return;
                    }
                    // One answer: head, then its Content-Length.
                    let mut have = 0;
                    let (status, end) = loop {
                        let Ok(n) = s.read(&mut buf[have..]) else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have += n;
                        let mut headers = [httparse::EMPTY_HEADER; 32];
                        let mut resp = httparse::Response::new(&mut headers);
                        if let Ok(httparse::Status::Complete(h)) = resp.parse(&buf[..have]) {
                            let len: usize = resp
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .and_then(|h| {
                                    std::str::from_utf8(h.value).ok()?.trim().parse().ok()
                                })
                                .unwrap_or(0);
                            break (resp.code.unwrap_or(0), h + len);
                        }
                    };
                    while have < end {
                        let Ok(n) = s.read(&mut buf[have..]) else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        have += n;
                    }
                    match status {
                        200 => admitted.fetch_add(1, Ordering::Relaxed),
                        _ => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&path);
    RateAccuracy {
        workers,
        connections,
        rate,
        burst,
        seconds: elapsed,
        admitted: admitted.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        #[expect(clippy::cast_precision_loss, reason = "small counts")]
        allowed: burst as f64 + rate as f64 * elapsed,
    }
}
