//! A fleet as it is deployed: three gateways, each in its own network namespace with its own
//! XDP program on its own interface and its own MCP server (the Python SDK's, on the host's
//! loopback), on one LAN (a bridge) with their Redis and a shared upstream on a hub host, and
//! clients on another. Everything the gateways share goes over the network: a tenant's rate
//! loaded through all three holds fleet-wide, a budget spent through one is refused through
//! another, an approval made on one unhides the tool on the others, a ban made on one drops
//! packets in the others' XDP programs, each kernel admits its share of a tenant's new
//! connections, a session opened through one continues through another, and Redis killed and
//! started again mid-run: rates fall back to each host's share and budgets fail closed, then
//! everything recovers by itself.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use gateway::kernel::KernelMaps;
use gateway_common::{TenantLimits, Verdict};
use integration_tests::{
    daemon::{Daemon, connect_from},
    netns::{HUB_ADDR, Lan, enter_before_exec, in_netns},
    peers::{
        KillOnDrop, PyServer, RawResponse, demo_upstream_at, free_port, keep_alive, post, raw,
        read_response, wait_addr,
    },
    unique,
};
use serde_json::{Value, json};

use super::fleet::{
    BUDGET_EXHAUSTED, RATE_LIMITED, STATE_UNAVAILABLE, assert_rate, call_request, meta, wait_for,
};

const PORT: u16 = 18080;
/// Tenant `alpha`: 3 new connections a second for the fleet, 9 at once.
const ALPHA: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The default tenant, `other`: 120 requests a second for the fleet.
const BETA: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// Tenant `gamma`: a budget of 5 calls for the fleet.
const GAMMA: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const RATE: u64 = 120;

struct Host {
    daemon: Daemon,
    ns: String,
    addr: Ipv4Addr,
    admin: u16,
    /// The host's own MCP server (upstream `u0`), on its loopback at `py_port`.
    py: Option<PyServer>,
}

/// Dropped in order: gateways (and their MCP servers), the shared upstream, Redis, then the
/// namespaces.
struct LanFleet {
    hosts: Vec<Host>,
    py_port: u16,
    _upstream: KillOnDrop,
    redis: Option<KillOnDrop>,
    redis_at: SocketAddr,
    lan: Lan,
}

impl LanFleet {
    fn start() -> Self {
        let lan = Lan::new(&[ALPHA, BETA, GAMMA], 3);
        let redis_at = SocketAddr::new(IpAddr::V4(HUB_ADDR), free_port());
        let up_at = SocketAddr::new(IpAddr::V4(HUB_ADDR), free_port());
        let upstream = demo_upstream_at(Some(&lan.hub), up_at, &[]);
        let py_port = free_port();
        let fleet = unique("fll");
        let mut f = LanFleet {
            hosts: Vec::new(),
            py_port,
            _upstream: upstream,
            redis: None,
            redis_at,
            lan,
        };
        f.redis_up();
        for (ns, iface, addr) in f.lan.hosts.clone() {
            let instance = unique("gwfll");
            let admin = free_port();
            let config = format!(
                r#"[gateway]
instance = "{instance}"
workers = 1
[[listeners]]
address = "{addr}:{PORT}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
interfaces = ["{iface}"]
mode = "native"
default_tenant = "other"
[policy]
pin_tools = true
requests_per_sec = {RATE}
burst = 6
[[tenants]]
name = "other"
id = 0
[[tenants]]
name = "alpha"
id = 1
sources = ["{ALPHA}/32"]
new_connections_per_sec = 3
new_connections_burst = 9
[[tenants]]
name = "gamma"
id = 2
sources = ["{GAMMA}/32"]
[tenants.policy]
budget = {{ window_s = 1000000000, tenant = 5 }}
[[upstreams]]
name = "u0"
url = "http://127.0.0.1:{py_port}/mcp"
[[upstreams]]
name = "d0"
url = "http://{up_at}/mcp"
[[routes]]
path = "/mcp"
upstream = "u0"
[[routes]]
path = "/fed"
federate = [{{ upstream = "d0", prefix = "" }}]
[state]
path = "{state}"
redis = "redis://{redis_at}/"
fleet = "{fleet}"
"#,
                state = std::env::temp_dir()
                    .join(format!("{instance}.state"))
                    .display(),
            );
            let py = PyServer::start_in(&ns, py_port, &[]);
            f.hosts.push(Host {
                daemon: Daemon::start(&ns, &instance, &config),
                ns,
                addr,
                admin,
                py: Some(py),
            });
        }
        f.wait_all("three live gateways", "mcp_gateway_fleet_hosts_live", 3.0);
        f
    }

    /// Starts Redis on the hub (again: empty, as after a restart without persistence).
    fn redis_up(&mut self) {
        let mut cmd = Command::new("redis-server");
        enter_before_exec(&mut cmd, &self.lan.hub);
        let child = cmd
            .args([
                "--port",
                &self.redis_at.port().to_string(),
                "--bind",
                &HUB_ADDR.to_string(),
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.redis = Some(KillOnDrop(child));
        let at = self.redis_at;
        in_netns(&self.lan.hub, || wait_addr(at, Duration::from_secs(10)));
    }

    fn metric(&self, h: &Host, name: &str) -> f64 {
        let text = in_netns(&h.ns, || {
            let (r, _) = raw(h.admin, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
            assert_eq!(r.status, 200);
            String::from_utf8_lossy(&r.body).into_owned()
        });
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    fn wait_all(&self, what: &str, name: &str, value: f64) {
        for h in &self.hosts {
            wait_for(what, Duration::from_secs(10), || {
                (self.metric(h, name) - value).abs() < 0.01
            });
        }
    }

    fn admin(&self, h: &Host, request: &[u8]) -> RawResponse {
        in_netns(&h.ns, || raw(h.admin, request).0)
    }

    fn dst(h: &Host) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(h.addr), PORT)
    }

    /// `n` connections to `h` opened from `src` one after another (each given 250 ms): how
    /// many were accepted.
    fn connects(&self, src: Ipv4Addr, h: &Host, n: usize) -> usize {
        in_netns(&self.lan.client, || {
            let open: Vec<_> = (0..n)
                .filter_map(|_| {
                    connect_from(IpAddr::V4(src), Self::dst(h), Duration::from_millis(250))
                })
                .collect();
            open.len()
        })
    }

    /// One HTTP request from `src` (client namespace) to `h`'s listener over the LAN.
    fn http(&self, src: Ipv4Addr, h: &Host, request: &[u8]) -> RawResponse {
        in_netns(&self.lan.client, || http_from(src, Self::dst(h), request))
    }

    fn call(&self, src: Ipv4Addr, h: &Host, tool: &str, args: Value) -> (u16, Option<i64>) {
        let r = self.http(src, h, &call_request(tool, args));
        (r.status, r.json()["error"]["code"].as_i64())
    }

    fn echo_listed(&self, h: &Host) -> bool {
        let body =
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": meta()}})
                .to_string();
        let r = self.http(
            BETA,
            h,
            &post(
                "/mcp",
                &body,
                "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n",
            ),
        );
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

    /// Loads every gateway for `warm`, then for `span`: the calls admitted across the fleet
    /// are within `tolerance` of the fleet's rate (each gateway's are printed).
    fn assert_load_rate(&self, what: &str, warm: Duration, span: Duration, tolerance: f64) {
        self.load(warm);
        let each = self.load(span);
        eprintln!("{what}: admitted by each gateway {each:?}");
        assert_rate(what, each.iter().sum(), RATE, span, tolerance);
    }

    /// Calls `add` from BETA through every gateway at once for `span` (a thread each, in the
    /// client namespace, on a keep-alive connection as agents do): what each admitted.
    fn load(&self, span: Duration) -> Vec<u64> {
        let stop = AtomicBool::new(false);
        let dsts: Vec<SocketAddr> = self.hosts.iter().map(Self::dst).collect();
        in_netns(&self.lan.client, || {
            std::thread::scope(|s| {
                // Threads made here are in the client namespace too.
                let threads: Vec<_> = dsts
                    .iter()
                    .map(|dst| {
                        let stop = &stop;
                        s.spawn(move || {
                            let mut admitted = 0;
                            let mut conn = None;
                            while !stop.load(Ordering::Relaxed) {
                                let r = keep_alive(
                                    &mut conn,
                                    || open_from(BETA, *dst),
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
            })
        })
    }
}

fn http_from(src: Ipv4Addr, dst: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = open_from(src, dst);
    s.write_all(request).expect("write");
    read_response(&mut s).expect("an answer")
}

fn open_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    let s = connect_from(IpAddr::V4(src), dst, Duration::from_secs(2))
        .unwrap_or_else(|| panic!("connect from {src} to {dst} over the LAN"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn three_gateways_in_their_own_namespaces_share_state_over_the_lan() {
    let mut f = LanFleet::start();

    // Each kernel admits a third of alpha's 3/s with 9 at once: 1/s, 3 at once.
    const CONN_RATE: &str = "mcp_gateway_kernel_tenant_new_connections_per_sec{tenant=\"alpha\"}";
    f.wait_all("each host's share", CONN_RATE, 1.0);
    for h in &f.hosts {
        let maps = KernelMaps::open(&h.daemon.pin_dir).expect("pinned maps");
        let l = maps.tenant_limits(1).expect("alpha's limits");
        assert_eq!(
            (l.conn_interval_ns, l.conn_tolerance_ns),
            TenantLimits::gcra_share(3, 9, 3),
            "{}: {l:?}",
            h.ns
        );
    }
    let admitted = f.connects(ALPHA, &f.hosts[0], 6);
    assert!(
        (3..=4).contains(&admitted),
        "{admitted} of 6 at once through one gateway, whose share is 3 at once"
    );

    // The default tenant's 120/s, loaded through all three over the LAN, holds fleet-wide.
    f.assert_load_rate(
        "fleet-wide over the LAN",
        Duration::from_secs(1),
        Duration::from_secs(5),
        0.05,
    );

    // A budget spent through one gateway is spent for all. (Spaced: a rate this gateway has
    // no lease of yet admits its share of the burst, 2 at once, until the next round.)
    for _ in 0..5 {
        assert_eq!(
            f.call(GAMMA, &f.hosts[0], "add", json!({"a": 1, "b": 2})),
            (200, None)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    for h in &f.hosts {
        assert_eq!(
            f.call(GAMMA, h, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "5 of 5 spent across the fleet: refused through {}",
            h.ns
        );
    }

    // An approval on one gateway unhides a changed tool on the others.
    for h in &f.hosts {
        assert!(f.echo_listed(h), "{}: first sight, shown", h.ns);
    }
    let py_port = f.py_port;
    for h in &mut f.hosts {
        h.py = None;
        h.py = Some(PyServer::start_in(&h.ns, py_port, &["--changed-echo"]));
    }
    for h in &f.hosts {
        assert!(!f.echo_listed(h), "{}: changed, hidden", h.ns);
    }
    let pins = f
        .admin(
            &f.hosts[0],
            b"GET /pins HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
        )
        .json();
    let req = integration_tests::peers::approve_request(&pins, "u0", "echo");
    assert_eq!(f.admin(&f.hosts[0], &req).status, 200);
    for h in &f.hosts {
        wait_for(
            "the approval on another gateway",
            Duration::from_secs(5),
            || f.echo_listed(h),
        );
    }

    // A session opened through one gateway continues through another.
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "lan-test", "version": "1"}},
    })
    .to_string();
    let r = f.http(BETA, &f.hosts[0], &post("/fed", &init, ""));
    assert_eq!(r.status, 200, "{r:?}");
    let session = r.header("mcp-session-id").expect("a session id").to_owned();
    let call = json!({
        "jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 2, "b": 3}},
    })
    .to_string();
    let headers = format!("mcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n");
    let r = f.http(BETA, &f.hosts[1], &post("/fed", &call, &headers));
    assert_eq!(r.status, 200, "{r:?}");
    let text = String::from_utf8_lossy(&r.body).into_owned();
    assert!(text.contains("\"result\"") && text.contains('5'), "{text}");

    // Redis killed: each gateway admits its share of the rate, budgets fail closed; Redis
    // started again (empty): all recovers by itself, and the spent budget stays spent.
    f.redis = None;
    f.wait_all("fallback", "mcp_gateway_fleet_fallback_active", 1.0);
    assert_eq!(
        f.call(GAMMA, &f.hosts[2], "add", json!({"a": 1, "b": 2})),
        (503, Some(STATE_UNAVAILABLE))
    );
    f.assert_load_rate(
        "each gateway's share, Redis down",
        Duration::from_millis(500),
        Duration::from_secs(3),
        0.10,
    );
    f.redis_up();
    f.wait_all("reconnected", "mcp_gateway_fleet_connected", 1.0);
    f.wait_all("no fallback", "mcp_gateway_fleet_fallback_active", 0.0);
    std::thread::sleep(Duration::from_millis(300));
    for h in &f.hosts {
        assert_eq!(
            f.call(GAMMA, h, "add", json!({"a": 1, "b": 2})),
            (429, Some(BUDGET_EXHAUSTED)),
            "still spent after Redis came back: {}",
            h.ns
        );
    }
    f.assert_load_rate(
        "fleet-wide after Redis came back",
        Duration::from_secs(1),
        Duration::from_secs(4),
        0.05,
    );

    // A ban made on the second gateway drops BETA's packets in the first's and the third's
    // XDP programs within a second; GAMMA still connects.
    for h in &f.hosts {
        assert_eq!(f.connects(BETA, h, 1), 1, "{}: not banned yet", h.ns);
    }
    let body = format!(r#"{{"address":"{BETA}","seconds":600}}"#);
    let req = format!(
        "POST /bans HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = f.admin(&f.hosts[1], req.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    for h in [&f.hosts[0], &f.hosts[2]] {
        let maps = KernelMaps::open(&h.daemon.pin_dir).expect("pinned maps");
        wait_for(
            "the ban in another host's kernel ban map",
            Duration::from_secs(1),
            || {
                maps.bans()
                    .expect("ban map")
                    .iter()
                    .any(|b| b.addr == IpAddr::V4(BETA))
            },
        );
        let before = maps.tenant_counters(0).unwrap().packets(Verdict::Banned);
        assert_eq!(
            f.connects(BETA, h, 1),
            0,
            "{}: dropped by its XDP program",
            h.ns
        );
        assert!(
            maps.tenant_counters(0).unwrap().packets(Verdict::Banned) > before,
            "{}: counted as banned by its kernel",
            h.ns
        );
        assert_eq!(f.connects(GAMMA, h, 1), 1, "{}: others unaffected", h.ns);
    }

    for h in &mut f.hosts {
        h.daemon.stop();
    }
}
