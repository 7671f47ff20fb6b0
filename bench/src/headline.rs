//! Scenario `headline`: the figures to quote. The gateway with its kernel program attached
//! (native XDP on a veth, in a network namespace, as the flood scenario sets it up), nginx with
//! tuned proxy buffers, and the floor ([`crate::floor`]: a forwarder that copies bytes and
//! nothing else), measured in the same run on the same cores; every row says how far it is from
//! the floor.
//!
//! Cores (2 here): CPU 0 runs the load generator (and its clock) and `mcp-upstream`, CPU 1
//! the proxy under test (one at a time is loaded: the floor, the gateway or nginx). Their CPU
//! per request is read from /proc, and each core's busy share is reported so that a row limited
//! by CPU 0 (the generator and the upstream) is visible as such.
//!
//! Rows: peak (closed loop) and latency at half load (open loop) of a small `tools/call`, the
//! latter also sent straight to an `mcp-upstream` (what a proxy adds is measured from it);
//! message sizes; connection counts; memory of idle connections and after they close;
//! reload and upstream restart under load; a soak at half load (full run only).

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    netns::{GW_ADDR, Topology, in_netns},
    peers::{KillOnDrop, demo_upstream_at, demo_upstream_in},
    unique,
};

use crate::{
    load::{self, LoadResult, LoadSpec, Mix},
    proxy::Proc,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const UPSTREAM_PORT: u16 = 9000;
const GATEWAY_PORT: u16 = 8080;
const FLOOR_PORT: u16 = 8081;
const NGINX_PORT: u16 = 8082;
const POLICY_PORT: u16 = 8083;
/// A second `mcp-upstream`, on the proxies' address: the half-load row without a proxy.
const DIRECT_PORT: u16 = 8084;
/// The two gateways' admin APIs, in the gateway's namespace.
const GATEWAY_ADMIN: &str = "127.0.0.1:19090";
const POLICY_ADMIN: &str = "127.0.0.1:19091";
/// The generator's and the upstream's core; the proxy's.
const LOAD_CPU: usize = 0;
const PROXY_CPU: usize = 1;

pub const SIZES: [usize; 4] = [100, 10_000, 100_000, 1_000_000];
pub const CONNECTIONS: [usize; 3] = [32, 256, 2048];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// No proxy: the load sent to an `mcp-upstream` of its own on the proxies' address and
    /// the generator's core (half-load rows only).
    Direct,
    Floor,
    Gateway,
    /// A second gateway applying the `proxy` scenario's realistic policy (kernel program off:
    /// the veth has one XDP program, the first gateway's).
    Policy,
    Nginx,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Floor, Target::Gateway, Target::Nginx];
    /// The rows of small calls (peak, half load, connection counts): the gateway with the
    /// realistic policy too, whose CPU per request against nginx's is a goal of its own.
    pub const SMALL: [Target; 4] = [
        Target::Floor,
        Target::Gateway,
        Target::Policy,
        Target::Nginx,
    ];
    /// The half-load rows: those of [`Target::SMALL`] and the same load without a proxy.
    pub const HALF: [Target; 5] = [
        Target::Direct,
        Target::Floor,
        Target::Gateway,
        Target::Policy,
        Target::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct to mcp-upstream (no proxy)",
            Target::Floor => "floor (byte relay)",
            Target::Gateway => "gateway (XDP attached)",
            Target::Policy => "gateway, realistic policy (XDP off)",
            Target::Nginx => "nginx (tuned buffers)",
        }
    }

    /// The admin API of a gateway (in the gateway's namespace).
    fn admin(self) -> Option<&'static str> {
        match self {
            Target::Gateway => Some(GATEWAY_ADMIN),
            Target::Policy => Some(POLICY_ADMIN),
            Target::Direct | Target::Floor | Target::Nginx => None,
        }
    }

    fn port(self) -> u16 {
        match self {
            Target::Direct => DIRECT_PORT,
            Target::Floor => FLOOR_PORT,
            Target::Gateway => GATEWAY_PORT,
            Target::Policy => POLICY_PORT,
            Target::Nginx => NGINX_PORT,
        }
    }
}

/// One measured row.
pub struct Row {
    /// What was measured, e.g. `peak, 32 connections, add`.
    pub kind: String,
    pub target: Target,
    pub offered_rps: Option<f64>,
    pub connections: usize,
    pub result: LoadResult,
    /// The proxy's CPU (user + system) per answered request, µs.
    pub cpu_us: f64,
    /// Of which user time.
    pub user_us: f64,
    /// Busy share of CPU 0 (generator, upstream) and CPU 1 (the proxy) in the measured time.
    pub busy: [f64; 2],
    /// Share of each core's time spent in softirq (the network's receive work, charged to
    /// whichever process it interrupted, or to none).
    pub softirq: [f64; 2],
    /// Share of each core's time the hypervisor gave to another guest (steal): time in which
    /// nothing of this machine ran, counted as busy.
    pub steal: [f64; 2],
    /// A gateway's own time per request in the measured time, by its own histogram.
    pub own: Option<Own>,
}

/// A gateway's own part of its requests' latency in a row: its `kind="gateway"` histogram
/// (from a request's first byte read to its answer's last byte written, less the wait for the
/// upstream's answer head), the difference of `/metrics` at the row's start and end. The
/// generator's latencies also carry the other core's queueing (the generator, the upstream,
/// the network's softirq work share it); this is what the gateway adds, whatever that core
/// does, with the histogram's buckets (1, 2, 5, 10, 20, 50, 100, 200, 500 µs, ...) as its
/// resolution.
#[derive(Clone, Copy)]
pub struct Own {
    /// The bucket bounds (µs) that hold the median and the 99th percentile.
    pub p50_within_us: u64,
    pub p99_within_us: u64,
    /// Share of requests whose own time was 100 µs or less.
    pub within_100us: f64,
}

/// Cumulative counts of the gateway's `kind="gateway"` latency buckets, summed over its
/// routes: (bound in µs, count), by bound; `+Inf` as `u64::MAX`.
fn own_buckets(ns: &str, admin: &str) -> Vec<(u64, u64)> {
    let text = in_netns(ns, || {
        ureq::get(&format!("http://{admin}/metrics"))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()
    })
    .unwrap_or_default();
    let mut sum = std::collections::BTreeMap::<u64, u64>::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("mcp_gateway_route_latency_seconds_bucket{") else {
            continue;
        };
        if !rest.contains("kind=\"gateway\"") {
            continue;
        }
        let Some((labels, count)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .rsplit_once("le=\"")
            .map(|(_, v)| v.trim_end_matches('"'))
        else {
            continue;
        };
        let bound = if le == "+Inf" {
            u64::MAX
        } else {
            le.parse::<f64>()
                .map_or(u64::MAX, |s| (s * 1e6).round() as u64)
        };
        *sum.entry(bound).or_default() += count.trim().parse::<u64>().unwrap_or(0);
    }
    sum.into_iter().collect()
}

/// The row's [`Own`] from the buckets at its start and end.
fn own_between(before: &[(u64, u64)], after: &[(u64, u64)]) -> Option<Own> {
    let at =
        |b: &[(u64, u64)], bound: u64| b.iter().find(|(x, _)| *x == bound).map_or(0, |(_, n)| *n);
    let diff: Vec<(u64, u64)> = after
        .iter()
        .map(|(bound, n)| (*bound, n.saturating_sub(at(before, *bound))))
        .collect();
    let total = diff.last()?.1;
    if total == 0 {
        return None;
    }
    let within = |q: f64| {
        diff.iter()
            .find(|(_, n)| *n as f64 >= q * total as f64)
            .map_or(u64::MAX, |(bound, _)| *bound)
    };
    Some(Own {
        p50_within_us: within(0.5),
        p99_within_us: within(0.99),
        within_100us: at(&diff, 100) as f64 / total as f64,
    })
}

/// Share of a core the hypervisor may take from a row before the row is named as the host's.
pub const STOLEN_NOTICE: f64 = 0.05;

/// The rows the host took more than [`STOLEN_NOTICE`] of a core from, each as `kind, proxy
/// (CPU 0 % / CPU 1 %)`: their CPU, rates and latencies are the host's as much as the proxies'.
pub fn stolen_rows(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter(|row| row.steal.iter().any(|s| *s > STOLEN_NOTICE))
        .map(|row| {
            format!(
                "{}, {} ({:.0} % / {:.0} %)",
                row.kind,
                row.target.name(),
                row.steal[0] * 100.0,
                row.steal[1] * 100.0
            )
        })
        .collect()
}

/// Memory of held idle connections.
pub struct Idle {
    pub target: Target,
    pub held: usize,
    /// Connections that completed their call and were held.
    pub opened: usize,
    pub before_mib: f64,
    pub held_mib: f64,
    pub after_close_mib: f64,
}

/// Failed requests around an event under load.
pub struct Event {
    pub what: String,
    pub target: Target,
    pub events: usize,
    pub result: LoadResult,
    /// Failures are expected (an upstream restart): counted, not checked.
    pub checked: bool,
}

/// The soak: a sample every 10 s.
pub struct Soak {
    pub rate: f64,
    pub result: LoadResult,
    pub samples: Vec<SoakSample>,
}

/// Ten seconds of the soak, and what tells a stall of the gateway from one of the generator or
/// of the host when the answers dip.
pub struct SoakSample {
    /// Seconds since the soak's measured time began.
    pub at: f64,
    pub rss_mib: f64,
    pub answered: u64,
    pub failed: u64,
    /// The generator's slowest answer in these 10 s, µs: from its intended send time, and
    /// from its actual send.
    pub max_us: u64,
    pub max_uncorrected_us: u64,
    /// How late the generator sent its latest request against its schedule, µs: a stall on
    /// the generator's side (or of the whole machine) shows here, not in the gateway's times.
    pub max_send_lag_us: u64,
    /// The gateway's own slowest request in the last 10 s of its `/stats` (from its first
    /// byte read to its answer's last byte written), and its upstream's part of that, µs.
    pub gateway_max_us: Option<u64>,
    pub upstream_max_us: Option<u64>,
    /// Time stolen from each core by the hypervisor in these 10 s, ms.
    pub steal_ms: [f64; 2],
}

pub struct Report {
    pub rows: Vec<Row>,
    pub idle: Vec<Idle>,
    pub events: Vec<Event>,
    pub soak: Option<Soak>,
    pub half_rate: f64,
    pub seconds: f64,
    pub loadavg: [String; 2],
    /// Peak RSS of the processes.
    pub peak_rss_mib: Vec<(String, f64)>,
}

impl Report {
    /// The floor's row of the same kind as `row`.
    pub fn floor_of(&self, row: &Row) -> Option<&Row> {
        self.of(Target::Floor, row)
    }

    /// What `row`'s proxy adds to the p99 of the same load sent without one (half load only:
    /// none for other rows, the row without a proxy, and rows that answered nothing).
    pub fn p99_over_direct(&self, row: &Row) -> Option<i64> {
        let p99 = |r: &Row| {
            r.result
                .latency
                .as_ref()
                .map_or(0, |h| h.value_at_quantile(0.99)) as i64
        };
        let direct = self.of(Target::Direct, row)?;
        (row.target != Target::Direct && row.result.ok > 0).then(|| p99(row) - p99(direct))
    }

    fn of(&self, t: Target, row: &Row) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.target == t && r.kind == row.kind && r.result.ok > 0)
    }
}

fn gateway_config(instance: &str, iface: &str) -> String {
    format!(
        r#"
[gateway]
instance = "{instance}"
workers = 1
pin_workers = false
[[listeners]]
address = "{GW_ADDR}:{GATEWAY_PORT}"
[admin]
address = "{GATEWAY_ADMIN}"
[kernel]
enabled = true
interfaces = ["{iface}"]
mode = "native"
default_tenant = "load"
[[tenants]]
name = "load"
id = 0
[[upstreams]]
name = "up"
url = "http://127.0.0.1:{UPSTREAM_PORT}/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
"#
    )
}

/// The gateway of [`Target::Policy`]: the realistic policy of the `proxy` scenario (API key
/// identity, tool and argument rules, rates, budgets, the loop breaker), the route asking for a
/// key.
fn policy_config(instance: &str) -> String {
    format!(
        "[gateway]\ninstance = \"{instance}\"\nworkers = 1\npin_workers = false\n\
         [[listeners]]\naddress = \"{GW_ADDR}:{POLICY_PORT}\"\n[admin]\naddress = \"{POLICY_ADMIN}\"\n\
         {}\
         [[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:{UPSTREAM_PORT}/mcp\"\n\
         [[routes]]\npath = \"/mcp\"\nupstream = \"up\"\nauth = [\"api_key\"]\n",
        crate::proxy::realistic_policy_config()
    )
}

/// nginx as a reverse proxy tuned for these messages: request bodies up to 2 MiB kept in
/// memory (the default 16 KiB spills to a temporary file), answers buffered in memory up to
/// 2 MiB and never to disk, upstream keep-alive for as many connections as the load holds.
fn nginx_config(dir: &std::path::Path) -> String {
    format!(
        "worker_processes 1;\nworker_rlimit_nofile 20000;\nmaster_process off;\ndaemon off;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         events {{ worker_connections 16000; multi_accept on; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 600s;\n  tcp_nodelay on;\n\
           client_max_body_size 8m;\n  client_body_buffer_size 2m;\n\
           upstream mcp {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 2048; keepalive_requests 10000000; }}\n\
           server {{\n    listen {GW_ADDR}:{NGINX_PORT} backlog=4096;\n    location / {{\n      proxy_pass http://mcp;\n\
              proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
              proxy_buffering on;\n      proxy_buffer_size 64k;\n      proxy_buffers 32 64k;\n      proxy_busy_buffers_size 128k;\n\
              proxy_max_temp_file_size 0;\n    }}\n  }}\n}}\n",
        dir = dir.display()
    )
}

/// Pins every thread of `pid` (and those it makes later) to `cpu`.
fn pin_pid(pid: u32, cpu: usize) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

/// Jiffies of one core since boot, from /proc/stat.
#[derive(Clone, Copy, Default)]
pub(crate) struct Jiffies {
    /// Not idle (steal included).
    pub(crate) busy: u64,
    pub(crate) total: u64,
    pub(crate) softirq: u64,
    pub(crate) steal: u64,
}

impl Jiffies {
    /// From a `cpu` line of /proc/stat (`cpu` for the host, `cpuN` for one core).
    pub(crate) fn of_line(line: &str) -> Self {
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = f.iter().take(8).sum();
        let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
        Self {
            busy: total - idle,
            total,
            softirq: f.get(6).copied().unwrap_or(0),
            steal: f.get(7).copied().unwrap_or(0),
        }
    }
}

/// Jiffies of CPU 0 and CPU 1.
fn core_jiffies() -> [Jiffies; 2] {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut out = [Jiffies::default(); 2];
    for (i, slot) in out.iter_mut().enumerate() {
        if let Some(line) = stat.lines().find(|l| l.starts_with(&format!("cpu{i} "))) {
            *slot = Jiffies::of_line(line);
        }
    }
    out
}

/// Resident memory now (VmRSS), MiB.
pub(crate) fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Dropped in field order after `drop`: the processes, then the namespaces.
struct Bed {
    upstream: Option<KillOnDrop>,
    direct: Proc,
    gateway: Daemon,
    policy: Daemon,
    floor: Proc,
    nginx: Proc,
    nginx_dir: std::path::PathBuf,
    seconds: f64,
    warmup: Duration,
    topo: Topology,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.gateway.stop();
        self.policy.stop();
        let _ = std::fs::remove_dir_all(&self.nginx_dir);
    }
}

impl Bed {
    fn start(quick: bool) -> Self {
        integration_tests::require_root();
        let topo = Topology::new(&[CLIENT]);
        let upstream = demo_upstream_in(Some(&topo.gw), UPSTREAM_PORT);
        pin_pid(upstream.0.id(), LOAD_CPU);
        let direct = Proc(demo_upstream_at(
            Some(&topo.gw),
            SocketAddr::new(GW_ADDR.into(), DIRECT_PORT),
            &[],
        ));
        pin_pid(direct.pid(), LOAD_CPU);
        let instance = unique("gwhead");
        let gateway = Daemon::start(&topo.gw, &instance, &gateway_config(&instance, &topo.gw_if));
        pin_pid(gateway.pid(), PROXY_CPU);
        let instance = unique("gwpolicy");
        let policy = Daemon::start(&topo.gw, &instance, &policy_config(&instance));
        pin_pid(policy.pid(), PROXY_CPU);
        let in_ns = |ns: &str, program: &std::path::Path| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        };
        let exe = std::env::current_exe().expect("own path");
        let floor = Proc(KillOnDrop(
            in_ns(&topo.gw, &exe)
                .arg("--floor-listen")
                .arg(format!("{GW_ADDR}:{FLOOR_PORT}"))
                .arg("--floor-upstream")
                .arg(format!("127.0.0.1:{UPSTREAM_PORT}"))
                .stderr(Stdio::null())
                .spawn()
                .expect("start the floor"),
        ));
        pin_pid(floor.pid(), PROXY_CPU);
        let nginx_dir =
            std::env::temp_dir().join(format!("bench-head-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
        std::fs::write(nginx_dir.join("nginx.conf"), nginx_config(&nginx_dir))
            .expect("nginx config");
        let nginx = Proc(KillOnDrop(
            in_ns(&topo.gw, std::path::Path::new("nginx"))
                .arg("-p")
                .arg(&nginx_dir)
                .arg("-c")
                .arg(nginx_dir.join("nginx.conf"))
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx (cargo xtask setup installs nginx-light)"),
        ));
        pin_pid(nginx.pid(), PROXY_CPU);
        in_netns(&topo.client, || {
            for t in Target::HALF {
                let addr = SocketAddr::new(GW_ADDR.into(), t.port());
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .is_err()
                {
                    assert!(Instant::now() < deadline, "{} does not listen", t.name());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Bed {
            topo,
            upstream: Some(upstream),
            direct,
            gateway,
            policy,
            floor,
            nginx,
            nginx_dir,
            seconds: if quick { 0.3 } else { 3.0 },
            warmup: Duration::from_millis(if quick { 200 } else { 1000 }),
        }
    }

    fn pid(&self, t: Target) -> u32 {
        match t {
            Target::Direct => self.direct.pid(),
            Target::Floor => self.floor.pid(),
            Target::Gateway => self.gateway.pid(),
            Target::Policy => self.policy.pid(),
            Target::Nginx => self.nginx.pid(),
        }
    }

    fn spec(
        &self,
        t: Target,
        connections: usize,
        rate: Option<f64>,
        echo_bytes: usize,
    ) -> LoadSpec {
        LoadSpec {
            target: SocketAddr::new(GW_ADDR.into(), t.port()),
            path: "/mcp".into(),
            connections,
            threads: 1,
            duration: Duration::from_secs_f64(self.seconds),
            warmup: self.warmup,
            rate,
            tool: "add".into(),
            headers: if t == Target::Policy {
                format!("x-api-key: {}\r\n", crate::proxy::BENCH_API_KEY)
            } else {
                String::new()
            },
            legacy: false,
            mix: Mix {
                echo_bytes,
                ..Mix::default()
            },
            connect: load::Connect::default(),
        }
    }

    /// Runs `spec` from the client namespace on the generator's core, calling `sample` as
    /// [`load::run_every`] does.
    fn load<T: Send>(
        &self,
        spec: &LoadSpec,
        every: Duration,
        sample: &mut (dyn FnMut(Duration) -> T + Send),
    ) -> (LoadResult, Vec<T>) {
        in_netns(&self.topo.client, || {
            crate::pin_to_cpu(LOAD_CPU);
            load::run_every(spec, every, sample)
        })
    }

    fn measure(
        &self,
        kind: &str,
        t: Target,
        connections: usize,
        rate: Option<f64>,
        echo: usize,
    ) -> Row {
        let mut spec = self.spec(t, connections, rate, echo);
        if echo >= 1_000_000 || connections >= 2048 {
            // Hundreds of ms per request, or 2,048 connects before the first answer: a short
            // window would measure the warm-up's tail.
            spec.warmup = spec.warmup.max(Duration::from_millis(600));
            spec.duration = spec.duration.max(Duration::from_secs(1));
        }
        let pid = self.pid(t);
        let ns = self.topo.gw.clone();
        let (result, samples) = self.load(&spec, spec.duration, &mut |at| {
            // The gateway's histogram read outside its CPU time of the row: before it at the
            // start, after it at the end.
            let scrape = || t.admin().map(|a| own_buckets(&ns, a)).unwrap_or_default();
            let before = if at.is_zero() { scrape() } else { Vec::new() };
            let cpu = (crate::proxy::cpu_split(pid), core_jiffies());
            let after = if at.is_zero() { before } else { scrape() };
            (cpu, after)
        });
        let own = own_between(&samples[0].1, &samples[samples.len() - 1].1);
        let (((u0, s0), j0), ((u1, s1), j1)) = (samples[0].0, samples[samples.len() - 1].0);
        let total = |i: usize| (j1[i].total - j0[i].total).max(1) as f64;
        let busy = |i: usize| (j1[i].busy - j0[i].busy) as f64 / total(i);
        let softirq = |i: usize| (j1[i].softirq - j0[i].softirq) as f64 / total(i);
        let steal = |i: usize| (j1[i].steal - j0[i].steal) as f64 / total(i);
        let per_request = 1e6 / result.ok.max(1) as f64;
        Row {
            kind: kind.to_owned(),
            target: t,
            offered_rps: rate,
            connections,
            cpu_us: (u1 + s1 - u0 - s0) * per_request,
            user_us: (u1 - u0) * per_request,
            busy: [busy(0), busy(1)],
            softirq: [softirq(0), softirq(1)],
            steal: [steal(0), steal(1)],
            own,
            result,
        }
    }

    /// An open-loop run through the gateway at `rate` with a SIGHUP every `every`.
    fn reloads(&self, rate: f64, every: Duration) -> Event {
        let spec = self.spec(Target::Gateway, 32, Some(rate), 0);
        let mut n = 0;
        let gw = &self.gateway;
        let (result, _) = self.load(&spec, every, &mut |at: Duration| {
            if !at.is_zero() && at < spec.duration {
                gw.hangup();
                n += 1;
            }
        });
        Event {
            what: "configuration reload (SIGHUP)".into(),
            target: Target::Gateway,
            events: n,
            result,
            checked: true,
        }
    }

    /// Holds `n` connections to `t`, each after one `tools/call`, and reads the proxy's RSS
    /// before, while they are held (2 s after the last answer: the gateway drops an idle
    /// connection's buffers after 500 ms) and 2 s after they closed.
    fn idle(&self, t: Target, n: usize) -> Idle {
        let pid = self.pid(t);
        let before = rss_mib(pid);
        let addr = SocketAddr::new(GW_ADDR.into(), t.port());
        let (opened, held, after) = in_netns(&self.topo.client, || {
            crate::pin_to_cpu(LOAD_CPU);
            let mut conns: Vec<std::net::TcpStream> = (0..n)
                .filter_map(|_| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()
                })
                .collect();
            let request = idle_request(addr);
            // In waves: what is measured is memory held, not a burst of 10,000 requests at once
            // (which makes a proxy open as many upstream connections in a moment).
            let mut answered = Vec::with_capacity(conns.len());
            while !conns.is_empty() {
                let rest = conns.split_off(conns.len().min(IDLE_WAVE));
                let mut wave = std::mem::replace(&mut conns, rest);
                wave.retain_mut(|s| std::io::Write::write_all(s, &request).is_ok());
                wave.retain_mut(read_answer);
                answered.append(&mut wave);
            }
            let conns = answered;
            std::thread::sleep(Duration::from_secs(2));
            let held = rss_mib(pid);
            let opened = conns.len();
            drop(conns);
            std::thread::sleep(Duration::from_secs(2));
            (opened, held, rss_mib(pid))
        });
        Idle {
            target: t,
            held: n,
            opened,
            before_mib: before,
            held_mib: held,
            after_close_mib: after,
        }
    }
}

/// Connections that send their one request at once, before their answers are read.
const IDLE_WAVE: usize = 256;

fn idle_request(addr: SocketAddr) -> Vec<u8> {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    format!(
        "POST /mcp HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n\
         mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: add\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one answer with a Content-Length body; true if it is a 200.
fn read_answer(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read as _;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = s.read(&mut chunk) else {
            return false;
        };
        if n == 0 {
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(&buf) {
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= head + len {
                return resp.code == Some(200);
            }
        }
    }
}

/// The idle-memory rows alone (scenario `idle`): one warm-up row per proxy, so that "before"
/// is a process that has served load, then 1,000 and 10,000 connections held.
pub fn run_idle() -> Vec<Idle> {
    let bed = Bed::start(true);
    for t in [Target::Gateway, Target::Nginx] {
        bed.measure("warm-up", t, 32, None, 0);
    }
    let mut idle = Vec::new();
    for n in [1000, 10_000] {
        for t in [Target::Gateway, Target::Nginx] {
            idle.push(bed.idle(t, n));
        }
    }
    idle
}

/// Reloads under load alone (scenario `reload`): the same load without reloads first, then a
/// SIGHUP every second at 13,000 rps on a gateway fresh from its warm-up, after a 2,048-connection
/// peak row and after 10,000 idle connections came and went (what precedes the headline's reload
/// row). Each run is described by what came before it.
pub fn run_reload() -> Vec<(String, Event)> {
    const RATE: f64 = 13_000.0;
    // Full-length runs (3 s): two reloads in each.
    let bed = Bed::start(false);
    bed.measure("warm-up", Target::Gateway, 32, None, 0);
    let mut out = vec![
        (
            "no reloads (the same load, for comparison)".to_owned(),
            bed.reloads(RATE, Duration::from_secs(3600)),
        ),
        (
            "after a warm-up".to_owned(),
            bed.reloads(RATE, Duration::from_secs(1)),
        ),
    ];
    bed.measure("peak, 2048 connections", Target::Gateway, 2048, None, 0);
    out.push((
        "after 2,048 connections at peak".to_owned(),
        bed.reloads(RATE, Duration::from_secs(1)),
    ));
    let _ = bed.idle(Target::Gateway, 10_000);
    out.push((
        "after 10,000 idle connections closed".to_owned(),
        bed.reloads(RATE, Duration::from_secs(1)),
    ));
    out.push((
        "again".to_owned(),
        bed.reloads(RATE, Duration::from_secs(1)),
    ));
    out
}

pub fn run(quick: bool) -> Report {
    let load_before = loadavg();
    // Each phase's wall-clock time, on stderr: what a full run's length is made of.
    let mut clock = Instant::now();
    let mut lap = |what: &str| {
        eprintln!(
            "headline: {what} took {:.0} s",
            clock.elapsed().as_secs_f64()
        );
        clock = Instant::now();
    };
    let mut bed = Bed::start(quick);
    lap("starting the bed");
    let mut rows = Vec::new();
    let rounds = if quick { 1 } else { 3 };
    // Peak: every target once per round, interleaved; the median round by CPU per request.
    let mut peaks: Vec<Vec<Row>> = Target::SMALL.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, t) in Target::SMALL.iter().enumerate() {
            peaks[i].push(bed.measure("peak, 32 connections, add", *t, 32, None, 0));
        }
    }
    let median = |mut r: Vec<Row>, key: &dyn Fn(&Row) -> f64| {
        r.sort_by(|a, b| key(a).total_cmp(&key(b)));
        let n = r.len();
        r.swap_remove(n / 2)
    };
    for p in peaks {
        rows.push(median(p, &|r: &Row| r.cpu_us));
    }
    lap("the peak rows");
    // Half of the lowest peak (of the floor, the passthrough gateway and nginx), offered to
    // every target.
    let low = rows
        .iter()
        .filter(|r| r.target != Target::Policy)
        .map(|r| r.result.rps())
        .fold(f64::INFINITY, f64::min);
    let half_rate = (0.5 * low).round().max(10.0);
    let mut open: Vec<Vec<Row>> = Target::HALF.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, t) in Target::HALF.iter().enumerate() {
            open[i].push(bed.measure("half load, 32 connections, add", *t, 32, Some(half_rate), 0));
        }
    }
    for o in open {
        rows.push(median(o, &|r: &Row| {
            r.result
                .latency
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(0.99) as f64)
        }));
    }
    lap("the half-load rows");
    for size in SIZES {
        for t in Target::ALL {
            rows.push(bed.measure(
                &format!("peak, 32 connections, echo {}", bytes(size)),
                t,
                32,
                None,
                size,
            ));
        }
    }
    lap("the message-size rows");
    for n in CONNECTIONS.into_iter().skip(1) {
        for t in Target::SMALL {
            rows.push(bed.measure(&format!("peak, {n} connections, add"), t, n, None, 0));
        }
    }
    lap("the connection rows");
    // Memory of idle connections (the floor holds one upstream connection per client one:
    // its memory is the upstream's, so it is not a peer here).
    let mut idle = Vec::new();
    let helds: &[usize] = if quick { &[1000] } else { &[1000, 10_000] };
    for &n in helds {
        for t in [Target::Gateway, Target::Nginx] {
            idle.push(bed.idle(t, n));
        }
    }
    lap("the idle-memory rows");
    // Reloads under load: SIGHUP every second (every 0.2 s with --quick) at half load.
    let every = if quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let mut events = vec![bed.reloads(half_rate, every)];
    // The upstream restarted in the middle of a half-load run, through the gateway and nginx.
    for t in [Target::Gateway, Target::Nginx] {
        let mut spec = bed.spec(t, 32, Some(half_rate), 0);
        spec.duration = Duration::from_secs_f64(bed.seconds.max(1.2));
        let ns = bed.topo.gw.clone();
        let mut upstream = bed.upstream.take();
        let (result, _) = bed.load(&spec, spec.duration / 2, &mut |at: Duration| {
            if !at.is_zero() && at < spec.duration {
                drop(upstream.take());
                let up = demo_upstream_in(Some(&ns), UPSTREAM_PORT);
                pin_pid(up.0.id(), LOAD_CPU);
                upstream = Some(up);
            }
        });
        bed.upstream = upstream;
        events.push(Event {
            what: "upstream killed and started again".into(),
            target: t,
            events: 1,
            result,
            checked: false,
        });
    }
    lap("reloads and upstream restarts");
    // The soak: 10 minutes at half load through the gateway, RSS and failures every 10 s.
    let soak = (!quick).then(|| {
        let mut spec = bed.spec(Target::Gateway, 32, Some(half_rate), 0);
        spec.duration = Duration::from_secs(600);
        let pid = bed.gateway.pid();
        let gw_ns = bed.topo.gw.clone();
        let ticks = crate::proxy::clock_ticks_per_second();
        let mut last = ((0, 0), core_jiffies());
        let (result, samples) = bed.load(&spec, Duration::from_secs(10), &mut |at: Duration| {
            use std::sync::atomic::Ordering::Relaxed;
            let now = (
                (load::LIVE_OK.load(Relaxed), load::LIVE_FAILED.load(Relaxed)),
                core_jiffies(),
            );
            let stolen = |i: usize| (now.1[i].steal - last.1[i].steal) as f64 * 1e3 / ticks;
            // The gateway's own view of the same 10 s, from its admin API in its namespace.
            let stats = in_netns(&gw_ns, || {
                ureq::get(&format!("http://{GATEWAY_ADMIN}/stats?window=10s"))
                    .call()
                    .ok()?
                    .body_mut()
                    .read_json::<serde_json::Value>()
                    .ok()
            });
            let route = stats.as_ref().and_then(|v| {
                v["series"]
                    .as_array()?
                    .iter()
                    .find(|s| s["dim"] == "route")
                    .cloned()
            });
            let max_of = |kind: &str| route.as_ref().and_then(|r| r[kind]["max"].as_u64());
            let sample = SoakSample {
                at: at.as_secs_f64(),
                rss_mib: rss_mib(pid),
                answered: now.0.0 - last.0.0,
                failed: now.0.1 - last.0.1,
                max_us: load::LIVE_MAX_US.swap(0, Relaxed),
                max_uncorrected_us: load::LIVE_MAX_UNCORRECTED_US.swap(0, Relaxed),
                max_send_lag_us: load::LIVE_MAX_SEND_LAG_US.swap(0, Relaxed),
                gateway_max_us: max_of("total_us"),
                upstream_max_us: max_of("upstream_us"),
                steal_ms: [stolen(0), stolen(1)],
            };
            last = now;
            sample
        });
        Soak {
            rate: half_rate,
            result,
            // The first sample opens the measured time (its counts are the warm-up's).
            samples: samples.into_iter().skip(1).collect(),
        }
    });
    lap("the soak");
    let peak_rss_mib = vec![
        ("gateway".to_owned(), peak_rss(bed.gateway.pid())),
        (
            "gateway with the realistic policy".to_owned(),
            peak_rss(bed.policy.pid()),
        ),
        ("nginx".to_owned(), bed.nginx.peak_rss_mib()),
        ("floor".to_owned(), bed.floor.peak_rss_mib()),
    ];
    let seconds = bed.seconds;
    drop(bed);
    Report {
        rows,
        idle,
        events,
        soak,
        half_rate,
        seconds,
        loadavg: [load_before, loadavg()],
        peak_rss_mib,
    }
}

fn peak_rss(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn bytes(n: usize) -> String {
    match n {
        n if n >= 1_000_000 => format!("{} MB", n / 1_000_000),
        n if n >= 1000 => format!("{} KB", n / 1000),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(steal: [f64; 2]) -> Row {
        Row {
            kind: "peak, 32 connections, add".into(),
            target: Target::Nginx,
            offered_rps: None,
            connections: 32,
            result: LoadResult::default(),
            cpu_us: 0.0,
            user_us: 0.0,
            busy: [0.0; 2],
            softirq: [0.0; 2],
            steal,
            own: None,
        }
    }

    #[test]
    fn rows_the_host_took_from_are_named_and_no_others() {
        let rows = [row([0.0, 0.05]), row([0.29, 0.51]), row([0.001, 0.0])];
        let named = stolen_rows(&rows);
        assert_eq!(named.len(), 1, "{named:?}");
        assert!(named[0].contains("(29 % / 51 %)"), "{named:?}");
        assert!(
            named[0].starts_with("peak, 32 connections, add, nginx"),
            "{named:?}"
        );
        assert!(
            stolen_rows(&rows[..1]).is_empty(),
            "5 % exactly is not over"
        );
    }

    #[test]
    fn what_a_proxy_adds_is_its_p99_less_the_direct_rows_of_the_same_kind() {
        let at = |kind: &str, target, p99_us: u64| {
            let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            h.record_n(p99_us, 100).expect("record");
            Row {
                kind: kind.into(),
                target,
                result: LoadResult {
                    ok: 100,
                    latency: Some(h),
                    ..LoadResult::default()
                },
                ..row([0.0; 2])
            }
        };
        let half = "half load, 32 connections, add";
        let report = Report {
            rows: vec![
                at("peak, 32 connections, add", Target::Gateway, 900),
                at(half, Target::Direct, 120),
                at(half, Target::Gateway, 170),
                at(half, Target::Nginx, 100),
                Row {
                    result: LoadResult::default(),
                    ..at(half, Target::Floor, 0)
                },
            ],
            idle: Vec::new(),
            events: Vec::new(),
            soak: None,
            half_rate: 1.0,
            seconds: 1.0,
            loadavg: Default::default(),
            peak_rss_mib: Vec::new(),
        };
        let added: Vec<_> = report
            .rows
            .iter()
            .map(|r| report.p99_over_direct(r))
            .collect();
        assert_eq!(
            added,
            [None, None, Some(50), Some(-20), None],
            "peak rows have no direct row, the direct row adds nothing to itself, a row that answered nothing has no p99"
        );
    }

    #[test]
    fn a_proc_stat_line_is_read_as_busy_total_softirq_and_steal() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let j = Jiffies::of_line("cpu1 100 2 30 500 7 1 20 40 9 9");
        assert_eq!(
            j.total, 700,
            "the first eight fields; guest time is in user's"
        );
        assert_eq!(j.busy, 700 - 507, "idle and iowait are not busy");
        assert_eq!((j.softirq, j.steal), (20, 40));
        let empty = Jiffies::of_line("");
        assert_eq!((empty.busy, empty.total), (0, 0));
    }

    #[test]
    fn a_rows_own_latency_is_the_difference_of_the_buckets() {
        // Cumulative counts at the start and the end; 100 requests in between, 97 within
        // 100 us, 99 within 200 us.
        let before = [(50, 10), (100, 20), (200, 20), (u64::MAX, 20)];
        let after = [(50, 60), (100, 117), (200, 119), (u64::MAX, 120)];
        let own = own_between(&before, &after).expect("requests in the row");
        assert_eq!(own.p50_within_us, 50);
        assert_eq!(own.p99_within_us, 200);
        assert!((own.within_100us - 0.97).abs() < 1e-9);
        assert!(
            own_between(&after, &after).is_none(),
            "no request, no figure"
        );
    }
}
