//! Scenario `flood`: legitimate `tools/call` load while an abusive tenant floods the gateway with
//! spoofed SYNs and real connection attempts, with the kernel program attached and detached.
//!
//! Two network namespaces joined by veth (198.18.0.0/15). The gateway namespace runs
//! `mcp-upstream` and the gateway, listening on 198.18.0.1. The client namespace holds the
//! legitimate tenant (198.18.0.2, the load generator's keep-alive connections) and the abusive
//! tenant (198.19.0.0/16): spoofed SYNs from random addresses of it, sent as raw frames through
//! an `AF_PACKET` socket at a fixed rate, plus real connects from 198.19.0.1 that close at once.
//! The gateway namespace routes 198.19.0.0/16 back through the client, so answers to spoofed
//! sources go where they would on a real network (and die there).
//!
//! Everything stops by itself at the end of each run, and dropping the topology deletes both
//! namespaces with the veth pair and the program attached to it.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use gateway::kernel::{KernelMaps, TenantTotals};
use integration_tests::{
    daemon::{Daemon, connect_from},
    frames,
    netns::{GW_ADDR, Topology, in_netns},
    peers::demo_upstream_in,
    unique,
};

use crate::load::{self, LoadResult, LoadSpec};

const PORT: u16 = 8080;
const UPSTREAM_PORT: u16 = 9000;
const LEGIT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ABUSIVE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const ABUSIVE_TENANT: u32 = 1;
const LEGIT_TENANT: u32 = 0;
/// Spoofed SYNs per second, offered in both modes.
pub const FLOOD_PPS: u64 = 100_000;
/// Threads making real connections as the abusive tenant.
pub const CONNECTORS: usize = 2;
const CONNECTIONS: usize = 32;

fn config(instance: &str, iface: &str, kernel: bool) -> String {
    format!(
        r#"
[gateway]
instance = "{instance}"
workers = 1
pin_workers = false
[[listeners]]
address = "{GW_ADDR}:{PORT}"
[admin]
address = "127.0.0.1:19090"
[kernel]
enabled = {kernel}
interfaces = ["{iface}"]
mode = "native"
default_tenant = "legit"
[[tenants]]
name = "legit"
id = {LEGIT_TENANT}
[[tenants]]
name = "abusive"
id = {ABUSIVE_TENANT}
sources = ["198.19.0.0/16"]
new_connections_per_sec = 200
new_connections_burst = 200
per_source_new_connections_per_sec = 5
per_source_new_connections_burst = 5
[[upstreams]]
name = "up"
url = "http://127.0.0.1:{UPSTREAM_PORT}/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
"#
    )
}

/// One run of the legitimate load under one condition.
pub struct Run {
    pub kernel: bool,
    pub flood: bool,
    /// Open loop at the fixed rate, or closed loop (peak) when `None`.
    pub rate: Option<f64>,
    pub result: LoadResult,
    /// Spoofed SYNs sent per second (achieved).
    pub flood_pps: f64,
    /// Real connections of the abusive tenant: completed, and timed out or refused.
    pub abusive_connected: u64,
    pub abusive_failed: u64,
    /// The kernel program's counters of the abusive tenant during the run (attached only).
    pub abusive_counters: Option<TenantTotals>,
    pub legit_counters: Option<TenantTotals>,
    /// The gateway namespace's TCP counters during the run.
    pub tcp: Vec<(&'static str, u64)>,
    /// CPU seconds of the gateway per 1,000 legitimate requests.
    pub gateway_cpu_per_k: f64,
    /// Share of the host's CPU time that was busy, and spent in softirq, during the run.
    pub host_busy: f64,
    pub host_softirq: f64,
    /// Across rounds: lowest and highest peak rps (closed loop) or p99 µs (open loop).
    pub range: Option<(f64, f64)>,
    pub rounds: usize,
}

pub struct FloodReport {
    pub runs: Vec<Run>,
    pub seconds: f64,
    pub connections: usize,
    pub rate: f64,
}

/// The TCP counters worth reporting under a SYN flood, from `/proc/net/{netstat,snmp}` of `ns`.
const TCP_COUNTERS: [&str; 5] = [
    "PassiveOpens",
    "SyncookiesSent",
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
];

fn tcp_counters(ns: &str) -> Vec<(&'static str, u64)> {
    let text = in_netns(ns, || {
        ["netstat", "snmp"]
            .iter()
            .map(|f| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).unwrap_or_default()
            })
            .collect::<String>()
    });
    // Pairs of lines: "Prefix: names…" then "Prefix: values…".
    let lines: Vec<&str> = text.lines().collect();
    let mut all = std::collections::HashMap::new();
    for pair in lines.chunks(2) {
        if let [names, values] = pair {
            for (n, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if let Ok(v) = v.parse::<u64>() {
                    all.insert(n.to_owned(), v);
                }
            }
        }
    }
    TCP_COUNTERS
        .iter()
        .map(|n| (*n, all.get(*n).copied().unwrap_or(0)))
        .collect()
}

/// (busy, softirq, total) jiffies of the host, from /proc/stat.
fn host_cpu() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let j = crate::headline::Jiffies::of_line(stat.lines().next().unwrap_or(""));
    (j.busy, j.softirq, j.total.max(1))
}

/// Spoofed SYNs from 198.19.1.0–198.19.255.255 (random source addresses and ports) to the
/// gateway's port, as ready-made frames.
fn spoofed_frames(macs: ([u8; 6], [u8; 6]), n: usize) -> Vec<Vec<u8>> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).expect("random seed");
    let mut x = u64::from_le_bytes(seed) | 1;
    let mut next = move || {
        // xorshift64: random enough for addresses and ports.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let r = next();
            let host = (r as u16).max(256);
            let [a, b] = host.to_be_bytes();
            let src = Ipv4Addr::new(198, 19, a, b);
            let sport = 1024 + ((r >> 16) as u16 % 60_000);
            frames::syn_v4(macs, (src, sport), (GW_ADDR, PORT), (r >> 32) as u32)
        })
        .collect()
}

/// Sends `frames` round-robin on `ifname` (in the calling thread's namespace) at `pps` until
/// `deadline`; returns how many were sent.
fn send_flood(ifname: &str, frames: &[Vec<u8>], pps: u64, deadline: Instant) -> u64 {
    // SAFETY: plain socket calls on a descriptor this function owns; every pointer handed to the
    // kernel points into live locals or `frames` for the duration of the call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let name = std::ffi::CString::new(ifname).expect("name");
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert!(ifindex > 0, "no interface {ifname}");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        let r = libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        );
        assert!(
            r == 0,
            "bind AF_PACKET: {}",
            std::io::Error::last_os_error()
        );
        const BATCH: usize = 64;
        let mut iov: [libc::iovec; BATCH] = std::mem::zeroed();
        let mut msgs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        let start = Instant::now();
        let mut sent = 0u64;
        let mut i = 0usize;
        while Instant::now() < deadline {
            #[expect(clippy::cast_possible_truncation, reason = "seconds × pps fits")]
            let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let n = ((due - sent) as usize).min(BATCH);
            for k in 0..n {
                let f = &frames[(i + k) % frames.len()];
                iov[k] = libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                };
                msgs[k].msg_hdr.msg_iov = &raw mut iov[k];
                msgs[k].msg_hdr.msg_iovlen = 1;
            }
            let r = libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0);
            if r > 0 {
                sent += r as u64;
                i += r as usize;
            } else {
                std::thread::yield_now();
            }
        }
        sent
    }
}

/// Real connections from the abusive tenant until `deadline`, each closed at once with a reset
/// (so that no TIME_WAIT piles up); returns (completed, failed).
fn connect_flood(deadline: Instant, done: &AtomicU64, failed: &AtomicU64) {
    let dst = SocketAddr::new(IpAddr::V4(GW_ADDR), PORT);
    while Instant::now() < deadline {
        match connect_from(IpAddr::V4(ABUSIVE), dst, Duration::from_millis(10)) {
            Some(s) => {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket and a linger struct that outlives the call.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&raw const linger).cast(),
                        size_of::<libc::linger>() as u32,
                    );
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn diff(after: &TenantTotals, before: &TenantTotals) -> TenantTotals {
    let mut d = TenantTotals::default();
    for i in 0..d.packets.len() {
        d.packets[i] = after.packets[i] - before.packets[i];
        d.bytes[i] = after.bytes[i] - before.bytes[i];
    }
    d
}

struct Bed<'a> {
    topo: &'a Topology,
    frames: &'a [Vec<u8>],
    seconds: f64,
    warmup: Duration,
}

impl Bed<'_> {
    fn measure(
        &self,
        daemon: &Daemon,
        pid: u32,
        kernel: bool,
        flood: bool,
        rate: Option<f64>,
    ) -> Run {
        let spec = LoadSpec {
            target: SocketAddr::new(IpAddr::V4(GW_ADDR), PORT),
            path: "/mcp".into(),
            connections: CONNECTIONS,
            threads: 1,
            duration: Duration::from_secs_f64(self.seconds),
            warmup: self.warmup,
            rate,
            tool: "add".into(),
            headers: String::new(),
            legacy: false,
            mix: load::Mix::default(),
            connect: load::Connect::default(),
        };
        let maps = kernel.then(|| KernelMaps::open(&daemon.pin_dir).expect("pinned maps"));
        let counters = |t| {
            maps.as_ref()
                .map(|m| m.tenant_counters(t).expect("counters"))
        };
        let (ab0, le0) = (counters(ABUSIVE_TENANT), counters(LEGIT_TENANT));
        let tcp0 = tcp_counters(&self.topo.gw);
        let cpu0 = crate::proxy::cpu_seconds(pid);
        let host0 = host_cpu();
        // The flood covers the load's start, warm-up and measured time.
        let deadline = Instant::now() + spec.warmup + spec.duration + Duration::from_millis(400);
        let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
        let (result, sent, flood_secs) = std::thread::scope(|s| {
            let sender = flood.then(|| {
                let ns = &self.topo.client;
                let ifname = &self.topo.client_if;
                let frames = self.frames;
                s.spawn(move || {
                    let t = Instant::now();
                    let n = in_netns(ns, || send_flood(ifname, frames, FLOOD_PPS, deadline));
                    (n, t.elapsed().as_secs_f64())
                })
            });
            if flood {
                for _ in 0..CONNECTORS {
                    let (done, failed) = (&done, &failed);
                    let ns = &self.topo.client;
                    s.spawn(move || in_netns(ns, || connect_flood(deadline, done, failed)));
                }
            }
            let result = in_netns(&self.topo.client, || load::run(&spec));
            let (sent, secs) = sender.map_or((0, 1.0), |h| h.join().expect("flood thread"));
            (result, sent, secs)
        });
        let host1 = host_cpu();
        let total = (host1.2 - host0.2) as f64;
        let tcp1 = tcp_counters(&self.topo.gw);
        Run {
            kernel,
            flood,
            rate,
            flood_pps: sent as f64 / flood_secs,
            abusive_connected: done.into_inner(),
            abusive_failed: failed.into_inner(),
            abusive_counters: counters(ABUSIVE_TENANT).zip(ab0).map(|(a, b)| diff(&a, &b)),
            legit_counters: counters(LEGIT_TENANT).zip(le0).map(|(a, b)| diff(&a, &b)),
            tcp: tcp1
                .iter()
                .zip(&tcp0)
                .map(|((n, a), (_, b))| (*n, a - b))
                .collect(),
            gateway_cpu_per_k: (crate::proxy::cpu_seconds(pid) - cpu0)
                / (result.ok.max(1) as f64 / 1000.0),
            host_busy: (host1.0 - host0.0) as f64 / total,
            host_softirq: (host1.1 - host0.1) as f64 / total,
            range: None,
            rounds: 1,
            result,
        }
    }
}

pub fn run(quick: bool) -> FloodReport {
    integration_tests::require_root();
    let topo = Topology::new(&[LEGIT, ABUSIVE]);
    integration_tests::netns::ip(&[
        "-n",
        &topo.gw,
        "route",
        "add",
        "198.19.0.0/16",
        "via",
        &LEGIT.to_string(),
    ]);
    let macs = (
        Topology::mac(&topo.client, &topo.client_if),
        Topology::mac(&topo.gw, &topo.gw_if),
    );
    let frames = spoofed_frames(macs, 65_536);
    let _upstream = demo_upstream_in(Some(&topo.gw), UPSTREAM_PORT);
    let bed = Bed {
        topo: &topo,
        frames: &frames,
        seconds: if quick { 1.0 } else { 3.0 },
        warmup: Duration::from_millis(if quick { 500 } else { 1000 }),
    };
    // Rounds, each measuring every condition once, so that the drift of this shared machine
    // touches all alike; a condition's median round is reported with the range across rounds.
    let rounds = if quick { 1 } else { 3 };
    let mut slots: Vec<Vec<Run>> = (0..8).map(|_| Vec::new()).collect();
    let mut rate = 0.0;
    for _ in 0..rounds {
        let mut slot = slots.iter_mut();
        for kernel in [true, false] {
            let instance = unique("gwflood");
            let mut daemon =
                Daemon::start(&topo.gw, &instance, &config(&instance, &topo.gw_if, kernel));
            let pid = daemon.pid();
            for flood in [false, true] {
                let peak = bed.measure(&daemon, pid, kernel, flood, None);
                if kernel && !flood && rate == 0.0 {
                    // Half of the legitimate peak with the program attached and no flood (first
                    // round): every open-loop run is offered this rate.
                    rate = (peak.result.rps() * 0.5).round();
                }
                slot.next().expect("slot").push(peak);
                let open = bed.measure(&daemon, pid, kernel, flood, Some(rate));
                slot.next().expect("slot").push(open);
            }
            daemon.stop();
        }
    }
    let runs = slots
        .into_iter()
        .map(|mut r| {
            // Peak runs by rps, open-loop runs by p99.
            let key = |x: &Run| match x.rate {
                None => x.result.rps(),
                Some(_) => x
                    .result
                    .latency
                    .as_ref()
                    .map_or(0.0, |h| h.value_at_quantile(0.99) as f64),
            };
            r.sort_by(|a, b| key(a).total_cmp(&key(b)));
            let (lo, hi) = (key(&r[0]), key(&r[r.len() - 1]));
            let n = r.len();
            let mut median = r.swap_remove(n / 2);
            median.range = (n > 1).then_some((lo, hi));
            median.rounds = n;
            median
        })
        .collect();
    FloodReport {
        runs,
        seconds: bed.seconds,
        connections: CONNECTIONS,
        rate,
    }
}
