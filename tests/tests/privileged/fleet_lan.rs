//! A fleet as it is deployed: three gateways, each in its own network namespace with its own
//! XDP program on its own interface, on one LAN (a bridge) with their Redis and their upstream
//! on a fourth host, and clients on a fifth. What one gateway learns reaches the others over
//! the network: a ban made on one drops packets in the others' XDP programs, each kernel admits
//! its share of a tenant's new connections, and a session opened through one continues through
//! another.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use gateway::kernel::KernelMaps;
use gateway_common::{TenantLimits, Verdict};
use integration_tests::{
    daemon::{Daemon, connect_from},
    netns::{HUB_ADDR, Lan, enter_before_exec, in_netns},
    peers::{
        KillOnDrop, RawResponse, demo_upstream_at, free_port, post, raw, read_response, wait_addr,
    },
    unique,
};
use serde_json::json;

const PORT: u16 = 18080;
const ALPHA: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const BETA: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const GAMMA: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);

struct Host {
    daemon: Daemon,
    ns: String,
    addr: Ipv4Addr,
    admin: u16,
}

/// Dropped in order: gateways, then the upstream and Redis, then the namespaces.
struct LanFleet {
    hosts: Vec<Host>,
    _upstream: KillOnDrop,
    _redis: KillOnDrop,
    lan: Lan,
}

impl LanFleet {
    fn start() -> Self {
        let lan = Lan::new(&[ALPHA, BETA, GAMMA], 3);
        let redis_port = free_port();
        let mut cmd = Command::new("redis-server");
        enter_before_exec(&mut cmd, &lan.hub);
        let redis = KillOnDrop(
            cmd.args([
                "--port",
                &redis_port.to_string(),
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
            .expect("start redis-server"),
        );
        let redis_at = SocketAddr::new(IpAddr::V4(HUB_ADDR), redis_port);
        in_netns(&lan.hub, || wait_addr(redis_at, Duration::from_secs(10)));
        let up_at = SocketAddr::new(IpAddr::V4(HUB_ADDR), free_port());
        let upstream = demo_upstream_at(Some(&lan.hub), up_at, &[]);
        let fleet = unique("fll");
        let hosts = lan
            .hosts
            .iter()
            .map(|(ns, iface, addr)| {
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
[[tenants]]
name = "other"
id = 0
[[tenants]]
name = "alpha"
id = 1
sources = ["{ALPHA}/32"]
new_connections_per_sec = 3
new_connections_burst = 9
[[upstreams]]
name = "u0"
url = "http://{up_at}/mcp"
[[routes]]
path = "/fed"
federate = [{{ upstream = "u0", prefix = "" }}]
[state]
path = "{state}"
redis = "redis://{redis_at}/"
fleet = "{fleet}"
"#,
                    state = std::env::temp_dir()
                        .join(format!("{instance}.state"))
                        .display(),
                );
                Host {
                    daemon: Daemon::start(ns, &instance, &config),
                    ns: ns.clone(),
                    addr: *addr,
                    admin,
                }
            })
            .collect();
        let f = LanFleet {
            hosts,
            _upstream: upstream,
            _redis: redis,
            lan,
        };
        for h in &f.hosts {
            f.wait_for("three live gateways", Duration::from_secs(10), || {
                f.metric(h, "mcp_gateway_fleet_hosts_live") == 3.0
            });
        }
        f
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

    fn wait_for(&self, what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < within, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
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
        in_netns(&self.lan.client, || {
            let mut s = connect_from(IpAddr::V4(src), Self::dst(h), Duration::from_secs(2))
                .expect("connect over the LAN");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(request).expect("write");
            read_response(&mut s).expect("an answer")
        })
    }
}

#[test]
fn three_gateways_in_their_own_namespaces_share_bans_kernel_shares_and_sessions_over_the_lan() {
    let mut f = LanFleet::start();

    // Each kernel admits a third of alpha's 3/s with 9 at once: 1/s, 3 at once.
    const RATE: &str = "mcp_gateway_kernel_tenant_new_connections_per_sec{tenant=\"alpha\"}";
    for h in &f.hosts {
        f.wait_for("each host's share", Duration::from_secs(5), || {
            (f.metric(h, RATE) - 1.0).abs() < 0.01
        });
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
    let banning = &f.hosts[1];
    let (r, _) = in_netns(&banning.ns, || raw(banning.admin, req.as_bytes()));
    assert_eq!(r.status, 200, "{r:?}");
    for h in [&f.hosts[0], &f.hosts[2]] {
        let maps = KernelMaps::open(&h.daemon.pin_dir).expect("pinned maps");
        f.wait_for(
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
