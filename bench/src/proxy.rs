//! Scenario `proxy`: a small `tools/call` direct to the upstream (the floor) and through the
//! gateway (passthrough, kernel program off) and through nginx as a plain reverse proxy, measured
//! in the same run on the same machine.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::peers::{KillOnDrop, PyServer, demo_upstream, free_port, wait_port};

use crate::load::{self, LoadResult, LoadSpec, Mix};

pub(crate) fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask bench`",
        p.display()
    );
    p
}

/// CPU seconds process `pid` has used so far (user + system), from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// The user and the system CPU seconds of process `pid` so far (from /proc/PID/stat).
pub(crate) fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = clock_ticks_per_second();
    (ticks(11) / hz, ticks(12) / hz)
}

/// Clock ticks per second: the unit of /proc's CPU times (per process and per core).
pub(crate) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A process under measurement, killed on drop.
pub(crate) struct Proc(pub(crate) KillOnDrop);

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.0.0.id()
    }

    /// CPU seconds used so far (user + system), from /proc.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Peak resident memory in MiB (VmHWM).
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }
}

/// Where the load goes, and which processes' CPU it costs.
struct Target<'a> {
    scenario: &'static str,
    port: u16,
    path: String,
    tool: String,
    headers: String,
    legacy: bool,
    /// Longer warm-up for a peer that starts slowly.
    warmup: Duration,
    mix: Mix,
    /// Targets of one group share an upstream and an open-loop rate (half of the group's lowest
    /// peak): the fast upstream, the Python SDK upstream, ContextForge.
    group: Group,
    procs: Vec<(&'static str, &'a Proc)>,
}

pub struct Row {
    pub scenario: String,
    pub mode: String,
    pub offered_rps: Option<f64>,
    pub result: LoadResult,
    /// CPU seconds per 1,000 requests, per process.
    pub cpu_per_k: Vec<(String, f64)>,
    /// Across the rounds: the lowest and highest peak rps (closed loop) or p99 µs (open loop);
    /// the row itself is the median round.
    pub range: Option<(f64, f64)>,
    pub rounds: usize,
}

pub struct ProxyReport {
    pub rows: Vec<Row>,
    pub peak_rss_mib: Vec<(String, f64)>,
    pub connections: usize,
    pub seconds: f64,
    /// Why ContextForge was not measured, if it was not.
    pub contextforge_missing: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Fast,
    Sdk,
    ContextForge,
}

/// Every load request carries it (the upstream and nginx ignore it); the policy gateway knows its
/// SHA-256.
pub(crate) const BENCH_API_KEY: &str = "bench-api-key-0123456789";

/// A realistic policy for the `add` calls of the load: identity by API key, a dozen tool rules,
/// argument rules, tenant and agent rates and budgets (high enough never to refuse the load),
/// and the loop breaker.
pub(crate) const MIX_TENANTS: usize = 8;
pub(crate) const MIX_AGENTS_PER_TENANT: usize = 4;

fn mix_key(tenant: usize, agent: usize) -> String {
    format!("bench-key-t{tenant}-a{agent}")
}

/// `target` under the mixed load: 32 agents of 8 tenants (one per connection, each with its own
/// API key), one request in 10 a `tools/list`, every other connection in a session.
fn mixed<'a>(target: Target<'a>, scenario: &'static str) -> Target<'a> {
    Target {
        scenario,
        mix: mixed_load(),
        // Each agent sends its own key; a second `x-api-key` would be a duplicate header, which
        // the gateway and `mcp-upstream` refuse with 400.
        headers: String::new(),
        ..target
    }
}

fn mixed_load() -> Mix {
    Mix {
        agents: (0..MIX_TENANTS * MIX_AGENTS_PER_TENANT)
            .map(|i| {
                format!(
                    "x-api-key: {}\r\n",
                    mix_key(i % MIX_TENANTS, i / MIX_TENANTS)
                )
            })
            .collect(),
        list_every: 10,
        sessions_every: 2,
        ..Mix::default()
    }
}

/// [`realistic_policy`] as a configuration's `[kernel]` table (off) and the tables after it:
/// what `bench --print-policy` prints and the headline's policy gateway runs.
pub(crate) fn realistic_policy_config() -> String {
    format!("[kernel]\nenabled = false\n{}", realistic_policy())
}

fn realistic_policy() -> String {
    let sha = gateway::policy::sha256_hex(BENCH_API_KEY);
    let tenant_policy = "requests_per_sec = 1000000000\nagent_requests_per_sec = 1000000000\n\
         budget = { window_s = 3600, tenant = 1000000000000, agent = 1000000000000 }\n\
         loop_breaker = { max_repeats = 1000, window_s = 60 }\n";
    let mut tenants = String::new();
    for t in 0..MIX_TENANTS {
        tenants.push_str(&format!(
            "[[tenants]]\nname = \"mix{t}\"\nid = {}\n[tenants.policy]\n{tenant_policy}",
            t + 2
        ));
        for a in 0..MIX_AGENTS_PER_TENANT {
            tenants.push_str(&format!(
                "[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"mix{t}\"\nagent = \"agent{a}\"\n",
                gateway::policy::sha256_hex(mix_key(t, a))
            ));
        }
    }
    let mut rules = String::new();
    for i in 0..10 {
        rules.push_str(&format!(
            "[[policy.tools]]\nmatch = \"up/tool_{i}_*\"\naction = \"deny\"\n"
        ));
    }
    format!(
        "default_tenant = \"bench\"\n{rules}[[policy.tools]]\nmatch = \"up/add\"\ncost = 1\n\
         [[policy.tools.arguments]]\npointer = \"/a\"\ntype = \"integer\"\nminimum = 0\n\
         [[policy.tools.arguments]]\npointer = \"/b\"\ntype = \"integer\"\nmaximum = 1000\n\
         [[tenants]]\nname = \"bench\"\nid = 1\n[tenants.policy]\n{tenant_policy}\
         [[auth.api_keys]]\nsha256 = \"{sha}\"\ntenant = \"bench\"\nagent = \"load\"\n{tenants}"
    )
}

/// A gateway (passthrough to `up_port`, one unpinned worker, kernel program off) with `extra`
/// configuration and `route_extra` on its route; its port, process and configuration file.
pub(crate) fn start_gateway(
    up_port: u16,
    name: &str,
    extra: &str,
    route_extra: &str,
) -> (u16, Proc, PathBuf) {
    let gw_port = free_port();
    let config = std::env::temp_dir().join(format!("bench-gw-{name}-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[gateway]\ninstance = \"bench-{name}\"\nworkers = 1\npin_workers = {pin}\n[[listeners]]\naddress = \"127.0.0.1:{gw_port}\"\n\
             [admin]\naddress = \"127.0.0.1:{}\"\n[kernel]\nenabled = false\n{extra}\
             [[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:{up_port}/mcp\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"up\"\n{route_extra}",
            free_port(),
            // Unpinned, like nginx: on a 2-core box shared with the load generator and the
            // upstream, a pinned worker cannot move away from contention (its p99 at half load
            // was 534 µs over direct pinned vs 94 µs unpinned in one comparison).
            pin = false
        ),
    )
    .expect("write config");
    let gateway = Proc(KillOnDrop(
        Command::new(bin("gateway"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "error")
            .envs(
                std::env::var("BENCH_GATEWAY_LEGACY")
                    .ok()
                    .map(|v| ("MONOIO_FORCE_LEGACY_DRIVER", v)),
            )
            .stderr(Stdio::null())
            .spawn()
            .expect("start gateway"),
    ));
    wait_port(gw_port, Duration::from_secs(5));
    (gw_port, gateway, config)
}

pub fn run(quick: bool) -> ProxyReport {
    let up_port = free_port();
    let upstream = Proc(demo_upstream(up_port));
    // A second upstream: the plain gateway also serves `/fed`, one virtual server over both
    // (`add` belongs to the first, which has no prefix).
    let up2_port = free_port();
    let upstream2 = Proc(demo_upstream(up2_port));
    let federation = format!(
        "[[upstreams]]\nname = \"up2\"\nurl = \"http://127.0.0.1:{up2_port}/mcp\"\n\
         [[routes]]\npath = \"/fed\"\nfederate = [{{ upstream = \"up\", prefix = \"\" }}, {{ upstream = \"up2\", prefix = \"b_\" }}]\n"
    );
    // The second point: the Python SDK's server (PyPI `mcp`, JSON answers) as the upstream, at
    // `/sdk` of the plain gateway and of nginx.
    let sdk = PyServer::start(true);
    let sdk_port = sdk.port;
    let sdk_proc = Proc(sdk.child);
    let federation = format!(
        "{federation}[[upstreams]]\nname = \"sdk\"\nurl = \"http://127.0.0.1:{sdk_port}/mcp\"\n[[routes]]\npath = \"/sdk\"\nupstream = \"sdk\"\n"
    );
    let (gw_port, gateway, config) = start_gateway(up_port, "on", "", &federation);
    // The same gateway with per-request telemetry off: what recording costs.
    let (quiet_port, quiet_gateway, quiet_config) =
        start_gateway(up_port, "quiet", "[telemetry]\nenabled = false\n", "");
    // And with a realistic policy: what deciding costs.
    let (policy_port, policy_gateway, policy_config) = start_gateway(
        up_port,
        "policy",
        &realistic_policy(),
        "auth = [\"api_key\"]\n",
    );

    // nginx as a plain HTTP reverse proxy with upstream keep-alive: the bar for raw proxying.
    let ngx_port = free_port();
    let ngx_dir = std::env::temp_dir().join(format!("bench-nginx-{}", std::process::id()));
    std::fs::create_dir_all(ngx_dir.join("logs")).expect("nginx dir");
    std::fs::write(
        ngx_dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 10000000;\n  upstream mcp {{ server 127.0.0.1:{up_port}; keepalive 64; }}\n\
               upstream sdk {{ server 127.0.0.1:{sdk_port}; keepalive 64; }}\n\
               server {{\n    listen 127.0.0.1:{ngx_port};\n    location / {{\n      proxy_pass http://mcp;\n\
                  proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n\
                  location = /sdk {{\n      proxy_pass http://sdk/mcp;\n      proxy_set_header Host 127.0.0.1:{sdk_port};\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
            dir = ngx_dir.display()
        ),
    )
    .expect("nginx config");
    let nginx = Proc(KillOnDrop(
        Command::new("nginx")
            .arg("-p")
            .arg(&ngx_dir)
            .arg("-c")
            .arg(ngx_dir.join("nginx.conf"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (cargo xtask setup installs nginx-light)"),
    ));
    wait_port(ngx_port, Duration::from_secs(5));

    let connections = 32;
    let seconds = if quick { 0.5 } else { 2.0 };
    let warmup = Duration::from_millis(500);
    let spec = |t: &Target<'_>, rate: Option<f64>| LoadSpec {
        target: ([127, 0, 0, 1], t.port).into(),
        path: t.path.clone(),
        tool: t.tool.clone(),
        headers: t.headers.clone(),
        legacy: t.legacy,
        connections,
        threads: 1,
        duration: Duration::from_secs_f64(seconds),
        warmup: t.warmup,
        rate,
        mix: t.mix.clone(),
        connect: load::Connect::default(),
    };
    let t = |scenario, port, path: &str, procs| Target {
        scenario,
        port,
        path: path.into(),
        tool: "add".into(),
        headers: format!("x-api-key: {BENCH_API_KEY}\r\n"),
        legacy: false,
        warmup,
        mix: Mix::default(),
        group: Group::Fast,
        procs,
    };

    let mut targets = vec![
        t(
            "direct to upstream",
            up_port,
            "/mcp",
            vec![("mcp-upstream", &upstream)],
        ),
        t(
            "through gateway",
            gw_port,
            "/mcp",
            vec![("mcp-upstream", &upstream), ("gateway", &gateway)],
        ),
        t(
            "through gateway, telemetry off",
            quiet_port,
            "/mcp",
            vec![("mcp-upstream", &upstream), ("gateway", &quiet_gateway)],
        ),
        t(
            "through gateway, realistic policy",
            policy_port,
            "/mcp",
            vec![("mcp-upstream", &upstream), ("gateway", &policy_gateway)],
        ),
        t(
            "through gateway, federation of two upstreams",
            gw_port,
            "/fed",
            vec![
                ("mcp-upstream", &upstream),
                ("mcp-upstream 2", &upstream2),
                ("gateway", &gateway),
            ],
        ),
        t(
            "through nginx",
            ngx_port,
            "/mcp",
            vec![("mcp-upstream", &upstream), ("nginx", &nginx)],
        ),
        mixed(
            t("", up_port, "/mcp", vec![("mcp-upstream", &upstream)]),
            "mixed load: direct to upstream",
        ),
        mixed(
            t(
                "",
                policy_port,
                "/mcp",
                vec![("mcp-upstream", &upstream), ("gateway", &policy_gateway)],
            ),
            "mixed load: through gateway, realistic policy",
        ),
        mixed(
            t(
                "",
                ngx_port,
                "/mcp",
                vec![("mcp-upstream", &upstream), ("nginx", &nginx)],
            ),
            "mixed load: through nginx",
        ),
    ];
    for (scenario, port, path, procs) in [
        (
            "SDK upstream: direct",
            sdk_port,
            "/mcp",
            vec![("SDK server", &sdk_proc)],
        ),
        (
            "SDK upstream: through gateway",
            gw_port,
            "/sdk",
            vec![("SDK server", &sdk_proc), ("gateway", &gateway)],
        ),
        (
            "SDK upstream: through nginx",
            ngx_port,
            "/sdk",
            vec![("SDK server", &sdk_proc), ("nginx", &nginx)],
        ),
    ] {
        targets.push(Target {
            group: Group::Sdk,
            ..t(scenario, port, path, procs)
        });
    }
    // It takes tens of seconds to start and serves a handful of calls a second: not part of a
    // sanity check.
    let contextforge = if quick {
        Err(anyhow::anyhow!("skipped in a --quick run"))
    } else {
        crate::contextforge::start(up_port)
    };
    let contextforge_note = match &contextforge {
        Ok(cf) => {
            targets.push(Target {
                scenario: "through ContextForge",
                port: cf.port,
                path: cf.path.clone(),
                tool: cf.tool.clone(),
                headers: format!("authorization: Bearer {}\r\n", cf.token),
                legacy: true,
                warmup: Duration::from_secs(5),
                mix: Mix::default(),
                group: Group::ContextForge,
                procs: vec![("mcp-upstream", &upstream), ("contextforge", &cf.proc)],
            });
            None
        }
        Err(e) => Some(format!("{e:#}")),
    };
    let measure = |target: &Target<'_>, rate: Option<f64>| {
        let Target {
            scenario, procs, ..
        } = target;
        let before: Vec<f64> = procs.iter().map(|(_, p)| p.cpu_seconds()).collect();
        let result = load::run(&spec(target, rate));
        let k = (result.ok.max(1)) as f64 / 1000.0;
        let cpu_per_k = procs
            .iter()
            .zip(before)
            .map(|((name, p), b)| ((*name).to_owned(), (p.cpu_seconds() - b) / k))
            .collect();
        Row {
            scenario: (*scenario).into(),
            mode: if rate.is_some() {
                "open loop".into()
            } else {
                "closed loop (peak)".into()
            },
            offered_rps: rate,
            result,
            cpu_per_k,
            range: None,
            rounds: 1,
        }
    };
    // Every target once per round, interleaved, so that the drifts of this shared machine touch
    // every target alike; each target's median round is reported, with the range across rounds.
    // (ContextForge, slow to warm up and far slower, gets one round.)
    let rounds = if quick { 1 } else { 3 };
    let run_rounds = |rate_of: &dyn Fn(&Target<'_>) -> Option<Option<f64>>,
                      key: &dyn Fn(&Row) -> f64| {
        let mut runs: Vec<Vec<Row>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            for (i, t) in targets.iter().enumerate() {
                if round > 0 && t.scenario == "through ContextForge" {
                    continue;
                }
                if let Some(rate) = rate_of(t) {
                    runs[i].push(measure(t, rate));
                }
            }
        }
        runs.into_iter()
            .filter(|r| !r.is_empty())
            .map(|mut r| {
                r.sort_by(|a, b| key(a).total_cmp(&key(b)));
                let lo = key(&r[0]);
                let hi = key(&r[r.len() - 1]);
                let n = r.len();
                let mut median = r.swap_remove(n / 2);
                median.range = (n > 1).then_some((lo, hi));
                median.rounds = n;
                median
            })
            .collect::<Vec<Row>>()
    };
    let p99 = |r: &Row| {
        r.result
            .latency
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(0.99) as f64)
    };
    let mut rows: Vec<Row> = run_rounds(&|_| Some(None), &|r: &Row| r.result.rps());
    // Each group is offered half of its lowest peak (the gateway, nginx and direct share one
    // rate; the SDK upstream's targets another; ContextForge, far slower, its own), and is not
    // measured open loop if a target of it served nothing.
    let half_of_group = |g: Group| {
        let low = targets
            .iter()
            .zip(&rows)
            .filter(|(t, _)| t.group == g)
            .map(|(_, r)| r.result.rps())
            .fold(f64::INFINITY, f64::min);
        (low >= 2.0).then(|| (0.5 * low).round())
    };
    let open = run_rounds(&|t: &Target<'_>| half_of_group(t.group).map(Some), &p99);
    rows.extend(open);
    let procs = [
        ("mcp-upstream", &upstream),
        ("gateway", &gateway),
        ("gateway, telemetry off", &quiet_gateway),
        ("gateway, realistic policy", &policy_gateway),
        ("nginx", &nginx),
        ("SDK server", &sdk_proc),
    ]
    .into_iter()
    .chain(
        contextforge
            .as_ref()
            .ok()
            .map(|cf| ("contextforge", &cf.proc)),
    )
    .collect::<Vec<_>>();
    let peak_rss_mib = procs
        .iter()
        .map(|(n, p)| ((*n).to_owned(), p.peak_rss_mib()))
        .collect();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&quiet_config);
    let _ = std::fs::remove_file(&policy_config);
    drop(nginx);
    let _ = std::fs::remove_dir_all(&ngx_dir);
    ProxyReport {
        rows,
        peak_rss_mib,
        connections,
        seconds,
        contextforge_missing: contextforge_note,
    }
}
