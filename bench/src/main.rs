//! `cargo xtask bench`: measures and writes a Markdown report and a JSON file to bench/results/.
//!
//! Scenario `xdp`: the kernel program's cost per packet on each of its paths, measured by the
//! kernel itself (`BPF_PROG_TEST_RUN` with a repeat count) against a realistic configuration
//! (1,000 tenant prefixes, 200 deny prefixes, limits on). The peer in the same run is the same
//! program's early exit (a packet to a port that is not the gateway's): the ratio says what the
//! gateway's decisions add over merely looking at a packet.

mod config_scale;
mod conn;
mod contextforge;
mod env;
mod fleet;
mod flood;
mod floor;
mod headline;
mod load;
mod otlp;
mod plot;
mod policy;
mod proxy;
mod schedule;
mod stdio;
mod tls;
mod verdict;

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use gateway::kernel::KernelState;
use gateway_common::TenantLimits;
use integration_tests::{
    TestKernel,
    frames::{self, Flags},
};

#[derive(Parser)]
struct Args {
    /// Fewer repetitions, for a sanity check.
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (xdp, headline, proxy, policy, flood, tls, otlp, stdio, fleet,
    /// config); all when omitted. `idle` (only when named): the headline's idle-memory rows alone.
    /// `reload` (only when named): reloads under load, alone.
    scenarios: Vec<String>,
    /// Print every row (and every scenario's report) as one JSON document on stdout; the
    /// Markdown goes to stderr.
    #[arg(long)]
    json: bool,
    /// Fail the run (exit code 3, a loud line) when a row's failed requests exceed this share,
    /// in percent.
    #[arg(long, default_value_t = 1.0)]
    max_error_percent: f64,
    /// Internal: run the floor's forwarder on this address (for the `headline` scenario).
    #[arg(long, hide = true, requires = "floor_upstream")]
    floor_listen: Option<std::net::SocketAddr>,
    /// Internal: the floor's upstream.
    #[arg(long, hide = true)]
    floor_upstream: Option<std::net::SocketAddr>,
    /// Instead of the scenarios: load this address (`host:port`) with `tools/call add` and print
    /// the latency percentiles (e.g. to load a running gateway while profiling it).
    #[arg(long)]
    target: Option<std::net::SocketAddr>,
    /// With `--target`: the MCP endpoint's path.
    #[arg(long, default_value = "/mcp")]
    path: String,
    /// With `--target`: seconds of measured load (after 1 s of warm-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// With `--target`: requests per second (open loop); closed loop when omitted.
    #[arg(long)]
    rate: Option<f64>,
    /// With `--target`: keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// With `--target`: an extra request header, `name: value` (repeatable).
    #[arg(long)]
    header: Vec<String>,
    /// With `--target`: TLS, asking for this server name (the load generator's TLS client of the
    /// `tls` scenario: TLS 1.3, X25519, no resumption, the chain not checked).
    #[arg(long)]
    tls: Option<String>,
    /// With `--target`: a new connection for every request (with `--tls`, a full handshake).
    #[arg(long)]
    per_request: bool,
    /// With `--target`: `echo` with a text of this many bytes instead of `add`.
    #[arg(long, default_value_t = 0)]
    echo_bytes: usize,
    /// Print the realistic policy of the `proxy` scenario (tenants, API keys, tool and argument
    /// rules, rates, budgets, the loop breaker; the load's key is `bench-api-key-0123456789`) as
    /// a gateway configuration's `[kernel]` table (off) and the tables after it, and exit. A
    /// route serves it with `auth = ["api_key"]` (bench/profile/echo.sh with POLICY=1).
    #[arg(long)]
    print_policy: bool,
}

/// `--target`: one load run against a running server.
fn load_target(args: &Args, ledger: &mut verdict::Ledger, target: std::net::SocketAddr) {
    let r = load::run(&load::LoadSpec {
        target,
        path: args.path.clone(),
        connections: args.connections,
        threads: 1,
        duration: Duration::from_secs_f64(args.seconds),
        warmup: Duration::from_secs(1),
        rate: args.rate,
        tool: "add".into(),
        headers: args.header.iter().map(|h| format!("{h}\r\n")).collect(),
        legacy: false,
        mix: load::Mix {
            echo_bytes: args.echo_bytes,
            ..load::Mix::default()
        },
        connect: load::Connect {
            tls: args.tls.as_deref().map(tls::load_client),
            per_request: args.per_request,
        },
    });
    let h = r.latency.as_ref().expect("histogram");
    let u = r.service.as_ref().expect("histogram");
    ledger.load_row(
        "target",
        &target.to_string(),
        &r,
        true,
        serde_json::json!({"offered_rps": args.rate, "connections": args.connections}),
    );
    let line = format!(
        "{:.0} rps, errors {}; µs: p50 {} p90 {} p99 {} p99.9 {} max {}; uncorrected p50 {} p99 {}; answers per connection (fewest / median / most): {}",
        r.rps(),
        errors_cell(&r),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        u.value_at_quantile(0.5),
        u.value_at_quantile(0.99),
        r.fairness(),
    );
    if args.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

const PORT: u16 = 8080;

fn state() -> KernelState {
    let mut s = KernelState {
        ports: [PORT].into(),
        default_tenant: 0,
        ..Default::default()
    };
    for i in 0..1000u32 {
        let net = format!("10.{}.{}.0/24", i / 256, i % 256)
            .parse()
            .expect("prefix");
        s.tenant_nets.push((net, 1 + i % 100));
    }
    for i in 0..200u32 {
        s.deny.push(
            format!("172.{}.{}.0/24", 16 + i / 256, i % 256)
                .parse()
                .expect("prefix"),
        );
    }
    let (ci, ct) = TenantLimits::gcra(1_000_000_000, 1_000_000);
    let (si, st) = TenantLimits::gcra(1_000_000_000, 1_000_000);
    for t in 0..=100 {
        s.limits.push((
            t,
            TenantLimits {
                conn_interval_ns: ci,
                conn_tolerance_ns: ct,
                source_interval_ns: si,
                source_tolerance_ns: st,
            },
        ));
    }
    s
}

const ACCURACY_RATE: u64 = 100_000;
// 50 ms of tokens: longer than the gaps between BPF_PROG_TEST_RUN batches, so the harness's
// own pauses do not waste tokens and the figure isolates what CPUs racing on the bucket do.
const ACCURACY_BURST: u64 = 5_000;

struct Accuracy {
    cpus: usize,
    offered: u64,
    admitted: u64,
    allowed: f64,
    seconds: f64,
}

/// Offers SYNs of one limited tenant from `cpus` CPUs at once and compares what the kernel
/// admitted with what the limit allows over the same time.
fn bucket_accuracy(seconds: f64) -> Vec<Accuracy> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut out = Vec::new();
    for cpus in [1, cores] {
        let mut st = KernelState {
            ports: [PORT].into(),
            ..Default::default()
        };
        let (ci, ct) = TenantLimits::gcra(ACCURACY_RATE, ACCURACY_BURST);
        st.limits.push((
            0,
            TenantLimits {
                conn_interval_ns: ci,
                conn_tolerance_ns: ct,
                ..Default::default()
            },
        ));
        let mut k = TestKernel::load(&st);
        let frame = frames::tcp("10.9.9.9".parse().expect("address"), PORT, Flags::Syn);
        let maps = k.maps();
        let program = k.kernel.program().expect("program");
        let program = &*program;
        let start = std::time::Instant::now();
        let deadline = start + Duration::from_secs_f64(seconds);
        std::thread::scope(|s| {
            for cpu in 0..cpus {
                let frame = &frame;
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    // Large batches: each BPF_PROG_TEST_RUN call has milliseconds of fixed cost
                    // outside the program, which small batches would turn into idle time.
                    while std::time::Instant::now() < deadline {
                        integration_tests::test_run(program, frame, 100_000);
                    }
                });
            }
        });
        let elapsed = start.elapsed().as_secs_f64();
        let c = maps.tenant_counters(0).expect("counters");
        let admitted = c.packets(gateway_common::Verdict::Passed);
        let offered = admitted + c.packets(gateway_common::Verdict::TenantRate);
        out.push(Accuracy {
            cpus,
            offered,
            admitted,
            allowed: ACCURACY_BURST as f64 + ACCURACY_RATE as f64 * elapsed,
            seconds: elapsed,
        });
    }
    out
}

pub(crate) fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_policy {
        print!("{}", proxy::realistic_policy_config());
        return Ok(());
    }
    if let (Some(listen), Some(upstream)) = (args.floor_listen, args.floor_upstream) {
        return floor::serve(listen, upstream);
    }
    raise_open_files();
    let mut ledger = verdict::Ledger::new(args.max_error_percent / 100.0);
    ledger.json_stdout = args.json;
    if let Some(target) = args.target {
        load_target(&args, &mut ledger, target);
    } else {
        scenarios(&args, &mut ledger)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&ledger.json())?);
    }
    if let Some(alarm) = ledger.alarm() {
        eprintln!("\n{alarm}");
        std::process::exit(ledger.exit_code());
    }
    Ok(())
}

/// The open-files limit raised to its hard limit: 2,048 load connections and 10,000 held ones
/// (the gateway and nginx, started from here, inherit it).
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn scenarios(args: &Args, ledger: &mut verdict::Ledger) -> anyhow::Result<()> {
    let wants = |s: &str| args.scenarios.is_empty() || args.scenarios.iter().any(|x| x == s);
    // `idle` and `reload` run only when named.
    let named = |s: &str| args.scenarios.iter().any(|x| x == s);
    let env = env::Environment::read();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    let suffix = if args.quick { "-quick" } else { "" };
    type Scenario = fn(
        &Args,
        &mut verdict::Ledger,
        &env::Environment,
        &std::path::Path,
        &str,
    ) -> anyhow::Result<()>;
    let all: [(&str, bool, Scenario); 12] = [
        ("xdp", wants("xdp"), xdp),
        ("headline", wants("headline"), headline_report),
        ("idle", named("idle"), |_, l, e, d, _| idle_report(l, e, d)),
        ("reload", named("reload"), |_, l, e, d, _| {
            reload_report(l, e, d)
        }),
        ("proxy", wants("proxy"), proxy_report),
        ("policy", wants("policy"), policy_report),
        ("flood", wants("flood"), flood_report),
        ("tls", wants("tls"), tls_report),
        ("otlp", wants("otlp"), otlp_report),
        ("stdio", wants("stdio"), stdio_report),
        ("fleet", wants("fleet"), |a, l, e, d, s| {
            fleet::report(l, a.quick, e, d, s)
        }),
        ("config", wants("config"), |a, l, e, d, s| {
            config_scale::report(l, a.quick, e, d, s)
        }),
    ];
    for (name, wanted, run) in all {
        if !wanted {
            continue;
        }
        let started = std::time::Instant::now();
        run(args, ledger, &env, &dir, suffix)?;
        ledger.times.push((name.to_owned(), started.elapsed()));
        eprintln!("{}", ledger.times_line());
    }
    Ok(())
}

/// Scenario `stdio`: the gateway against supergateway in front of the same stdio server.
fn stdio_report(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let r = stdio::run(args.quick);
    let base = r.rows.first().map_or(1.0, |row| row.rps);
    let mut md = format!(
        "# stdio servers over Streamable HTTP: the gateway and supergateway ({date})\n\n{env}\n\n\
         `tools/call get-sum` to server-everything's stdio mode (npm), closed loop, {conns} keep-alive \
         connections, {rounds} interleaved rounds of {seconds:.0} s; median round (range of rps). The gateway \
         (1 worker) shares one child among its clients; supergateway runs a child per session (`--stateful`, \
         each connection initializes once, not measured) or per request (stateless).\n\n\
         | bridge | rps | gateway's rps ÷ this | p99 µs | answered | errors |\n|---|---|---|---|---|---|\n",
        date = env.date,
        env = env.markdown(),
        conns = r.connections,
        rounds = r.rounds,
        seconds = r.seconds,
    );
    for row in &r.rows {
        // The peers' own failures (supergateway under load) are counted, not checked.
        ledger.counts(
            "stdio",
            row.peer,
            row.ok,
            row.errors,
            row.peer.starts_with("mcp-gateway"),
            serde_json::json!({"achieved_rps": row.rps, "p99_us": row.p99_us}),
        );
        md.push_str(&format!(
            "| {} | {:.0} ({:.0}–{:.0}) | {:.1}× | {:.0} | {} | {} |\n",
            row.peer,
            row.rps,
            row.rps_range.0,
            row.rps_range.1,
            base / row.rps.max(f64::MIN_POSITIVE),
            row.p99_us,
            row.ok,
            row.errors
        ));
    }
    let json = serde_json::json!({
        "scenario": "stdio", "environment": env.json(), "connections": r.connections,
        "rounds": r.rounds, "seconds": r.seconds,
        "rows": r.rows.iter().map(|row| serde_json::json!({
            "peer": row.peer, "rps": row.rps, "rps_range": [row.rps_range.0, row.rps_range.1],
            "p99_us": row.p99_us, "ok": row.ok, "errors": row.errors,
        })).collect::<Vec<_>>(),
    });
    write_report(
        ledger,
        dir,
        &format!("{}-stdio{suffix}", env.date),
        &md,
        &json,
    )
}

/// Scenario `otlp`: the gateway's CPU per request without span export and with it at 1 % and
/// 100 % sampling, same run, same offered rate.
fn otlp_report(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let r = otlp::run(args.quick);
    let base = r
        .rows
        .first()
        .map_or(1.0, |row| row.cpu_us.max(f64::MIN_POSITIVE));
    let mut md = format!(
        "# OTLP span export: cost ({date})\n\n{env}\n\n\
         `tools/call add` through a gateway (1 worker, passthrough, kernel program off) to `mcp-upstream`, \
         32 keep-alive connections, open loop at {rate:.0} rps (half the no-OTLP peak), {rounds} interleaved \
         rounds of {seconds:.0} s; OTLP/HTTP export to a sink on loopback that reads and answers 200. \
         Gateway CPU (user + system, /proc) per answered request, median round (range).\n\n\
         | gateway | CPU µs / request | vs no OTLP | answered | errors | p99 µs |\n|---|---|---|---|---|---|\n",
        date = env.date,
        env = env.markdown(),
        rate = r.rate,
        rounds = r.rounds,
        seconds = r.seconds,
    );
    for row in &r.rows {
        ledger.counts(
            "otlp",
            row.mode,
            row.ok,
            row.errors,
            true,
            serde_json::json!({"cpu_us_per_request": row.cpu_us, "p99_us": row.p99_us}),
        );
        md.push_str(&format!(
            "| {} | {:.1} ({:.1}–{:.1}) | {:+.1} % | {} | {} | {:.0} |\n",
            row.mode,
            row.cpu_us,
            row.cpu_range.0,
            row.cpu_range.1,
            (row.cpu_us / base - 1.0) * 100.0,
            row.ok,
            row.errors,
            row.p99_us
        ));
    }
    md.push_str(&format!(
        "\nThe sink received {} export requests ({} bytes).\n",
        r.exports, r.export_bytes
    ));
    let json = serde_json::json!({
        "scenario": "otlp", "environment": env.json(), "rate": r.rate, "rounds": r.rounds,
        "seconds": r.seconds, "exports": r.exports, "export_bytes": r.export_bytes,
        "rows": r.rows.iter().map(|row| serde_json::json!({
            "mode": row.mode, "cpu_us_per_request": row.cpu_us, "cpu_range": [row.cpu_range.0, row.cpu_range.1],
            "ok": row.ok, "errors": row.errors, "p99_us": row.p99_us,
        })).collect::<Vec<_>>(),
    });
    write_report(
        ledger,
        dir,
        &format!("{}-otlp{suffix}", env.date),
        &md,
        &json,
    )
}

fn policy_report(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let n = if args.quick { 50_000 } else { 500_000 };
    let d = policy::decision_cost(n);
    let r = policy::rate_accuracy(if args.quick { 3.0 } else { 10.0 });
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let ratio = r.admitted as f64 / r.allowed;
    let lines = [
        "# Policy: cost of a decision, and rate accuracy across workers".to_owned(),
        String::new(),
        env.markdown(),
        String::new(),
        "## Cost of one decision".to_owned(),
        String::new(),
        format!(
            "A typical `tools/call` (`search_issues` with four arguments), already parsed: identity from an API key \
             (SHA-256 of the key, table lookup), the first of 12 tool rules that matches (globs per upstream), three \
             argument rules (type, pattern, range, length), the tenant's and the agent's rates, the tenant's and the \
             agent's budgets, and the loop breaker (a digest of the arguments). 1,024 versions of the call, differing in the \
             query, taken in turn (so that the loop breaker follows as many distinct calls). Timed one decision at a time over {} \
             decisions after as many for warm-up; the times include one clock read, measured alone beside them.",
            d.decisions
        ),
        String::new(),
        "| | p50 ns | p90 ns | p99 ns | p99.9 ns | max ns |".to_owned(),
        "|---|---:|---:|---:|---:|---:|".to_owned(),
        format!(
            "| whole decision (with clock read) | {} | {} | {} | {} | {} |",
            d.p50, d.p90, d.p99, d.p999, d.max
        ),
        format!(
            "| of which identity (API key) | {} | | {} | | |",
            d.identity_p50, d.identity_p99
        ),
        format!(
            "| clock read alone | {} | | {} | | |",
            d.clock_p50, d.clock_p99
        ),
        String::new(),
        "## Tenant rate across workers".to_owned(),
        String::new(),
        format!(
            "A gateway with {} workers; a tenant limited to {}/s (burst {}); {} keep-alive connections (spread over the \
             workers by SO_REUSEPORT) call `tools/call` as fast as they can for {:.1} s.",
            r.workers, r.rate, r.burst, r.connections, r.seconds
        ),
        String::new(),
        "| admitted | refused (429) | allowed (burst + rate × time) | admitted / allowed |"
            .to_owned(),
        "|---:|---:|---:|---:|".to_owned(),
        format!(
            "| {} | {} | {:.0} | {:.3} |",
            r.admitted, r.refused, r.allowed, ratio
        ),
    ];
    let md = lines.join("\n") + "\n";
    let json = serde_json::json!({
        "environment": env.json(),
        "decision_ns": {"decisions": d.decisions, "p50": d.p50, "p90": d.p90, "p99": d.p99, "p999": d.p999, "max": d.max,
                        "clock_p50": d.clock_p50, "clock_p99": d.clock_p99,
                        "identity_p50": d.identity_p50, "identity_p99": d.identity_p99},
        "rate_accuracy": {"workers": r.workers, "connections": r.connections, "rate": r.rate, "burst": r.burst,
                          "seconds": r.seconds, "admitted": r.admitted, "refused": r.refused, "allowed": r.allowed, "ratio": ratio},
    });
    write_report(
        ledger,
        dir,
        &format!("{}-policy{suffix}", env.date),
        &md,
        &json,
    )
}

fn flood_report(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let r = flood::run(args.quick);
    let mut md = format!(
        "# Under a SYN flood: legitimate load with the kernel program attached and detached\n\n{}\n\n\
         Two network namespaces joined by veth. The gateway's namespace runs `mcp-upstream` (1 worker) and the gateway \
         (1 worker, listening on 198.18.0.1) with the XDP program attached in native mode, or not at all. The client's \
         namespace holds the legitimate tenant, whose {} keep-alive connections call `tools/call` (2026-07-28 form) for \
         {:.0} s after a warm-up (1 s; 0.5 s with `--quick`), and the abusive tenant (198.19.0.0/16, limited to 200 new connections/s and 5 per \
         source): {} spoofed SYNs/s from random addresses of its prefix, sent as raw frames (`AF_PACKET`), plus {} threads \
         connecting from 198.19.0.1 and resetting at once. Open-loop runs are offered {:.0} rps, half of the legitimate \
         peak with the program attached and no flood (first round); latency is measured from each request's intended send time. \
         Everything shares this machine's 2 cores, the flood's sender included: a real attacker's own work (building \
         and sending the frames) would not land on the gateway host, and here it does (compare the host's busy share \
         with and without the flood). Every condition is measured once per round, \
         rounds interleaved; a row is the condition's median round (by peak rps in closed loop, by p99 in open loop) and \
         the last column gives the range across rounds.\n\n\
         | XDP program | flood | mode | offered rps | achieved rps | errors (missed) | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | SYNs sent/s | abusive connects ok / failed | gateway CPU s / 1k req | host busy | of which softirq | rounds: range |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        env.markdown(),
        r.connections,
        r.seconds,
        flood::FLOOD_PPS,
        flood::CONNECTORS,
        r.rate,
    );
    let onoff = |b: bool| if b { "attached" } else { "detached" };
    let mut rows_json = Vec::new();
    for run in &r.runs {
        // Detached under the flood, failures are the finding: counted, not checked.
        ledger.load_row(
            "flood",
            &format!(
                "XDP {}, {}, {}",
                onoff(run.kernel),
                if run.flood { "flood" } else { "no flood" },
                if run.rate.is_some() { "open loop" } else { "closed loop" }
            ),
            &run.result,
            run.kernel || !run.flood,
            serde_json::json!({"offered_rps": run.rate, "gateway_cpu_seconds_per_1k": run.gateway_cpu_per_k}),
        );
        let h = run.result.latency.as_ref().expect("histogram");
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% | {:.0}% | {} |\n",
            onoff(run.kernel),
            if run.flood { "yes" } else { "no" },
            if run.rate.is_some() { "open loop" } else { "closed loop (peak)" },
            run.rate.map_or("-".into(), |o| format!("{o:.0}")),
            run.result.rps(),
            errors_cell(&run.result),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            if run.flood { format!("{:.0}", run.flood_pps) } else { "-".into() },
            if run.flood { format!("{} / {}", run.abusive_connected, run.abusive_failed) } else { "-".into() },
            if run.result.ok > 0 {
                format!("{:.3}", run.gateway_cpu_per_k)
            } else {
                "-".to_owned()
            },
            run.host_busy * 100.0,
            run.host_softirq * 100.0,
            match run.range {
                None => format!("{}", run.rounds),
                Some((lo, hi)) if run.rate.is_some() => format!("{}: p99 {lo:.0}–{hi:.0} µs", run.rounds),
                Some((lo, hi)) => format!("{}: {lo:.0}–{hi:.0} rps", run.rounds),
            },
        ));
        rows_json.push(serde_json::json!({
            "kernel_program": run.kernel, "flood": run.flood, "offered_rps": run.rate, "achieved_rps": run.result.rps(),
            "ok": run.result.ok, "errors": run.result.errors, "error_kinds": run.result.error_kinds, "missed": run.result.missed,
            "p50_us": h.value_at_quantile(0.5), "p90_us": h.value_at_quantile(0.9), "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999), "max_us": h.max(),
            "flood_syn_per_s": run.flood_pps, "abusive_connected": run.abusive_connected, "abusive_failed": run.abusive_failed,
            "abusive_tenant_packets": run.abusive_counters.map(|c| gateway_common::Verdict::ALL.iter().map(|v| (v.name(), c.packets(*v))).collect::<std::collections::BTreeMap<_, _>>()),
            "legit_tenant_packets": run.legit_counters.map(|c| gateway_common::Verdict::ALL.iter().map(|v| (v.name(), c.packets(*v))).collect::<std::collections::BTreeMap<_, _>>()),
            "tcp": run.tcp.iter().map(|(n, v)| (*n, *v)).collect::<std::collections::BTreeMap<_, _>>(),
            "gateway_cpu_seconds_per_1k": run.gateway_cpu_per_k, "host_busy": run.host_busy, "host_softirq": run.host_softirq,
            "rounds": run.rounds, "range": run.range.map(|(lo, hi)| [lo, hi]),
        }));
    }
    md.push_str("\n## What the kernel did with the flood\n\nPackets per verdict during each flooded run, from the program's counters (attached only), and the gateway namespace's TCP counters.\n\n\
                 | XDP program | mode | abusive: passed | abusive: dropped (tenant rate) | abusive: dropped (source rate) | legitimate: passed | legitimate: dropped |");
    for (n, _) in &r.runs[0].tcp {
        md.push_str(&format!(" {n} |"));
    }
    md.push_str("\n|---|---|---:|---:|---:|---:|---:|");
    md.push_str(&"---:|".repeat(r.runs[0].tcp.len()));
    md.push('\n');
    for run in r.runs.iter().filter(|x| x.flood) {
        let v = |c: Option<gateway::kernel::TenantTotals>,
                 f: &dyn Fn(&gateway::kernel::TenantTotals) -> u64| {
            c.map_or("-".to_owned(), |c| f(&c).to_string())
        };
        use gateway_common::Verdict as V;
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            onoff(run.kernel),
            if run.rate.is_some() {
                "open loop"
            } else {
                "closed loop"
            },
            v(run.abusive_counters, &|c| c.packets(V::Passed)),
            v(run.abusive_counters, &|c| c.packets(V::TenantRate)),
            v(run.abusive_counters, &|c| c.packets(V::SourceRate)),
            v(run.legit_counters, &|c| c.packets(V::Passed)),
            v(run.legit_counters, &|c| V::ALL
                .iter()
                .skip(1)
                .map(|x| c.packets(*x))
                .sum()),
        ));
        for (_, n) in &run.tcp {
            md.push_str(&format!(" {n} |"));
        }
        md.push('\n');
    }
    let find = |kernel: bool, flood: bool, open: bool| {
        r.runs
            .iter()
            .find(|x| x.kernel == kernel && x.flood == flood && x.rate.is_some() == open)
    };
    let p99 = |x: Option<&flood::Run>| {
        x.filter(|x| x.result.ok > 0)
            .and_then(|x| x.result.latency.as_ref())
            .map(|h| h.value_at_quantile(0.99) as f64)
    };
    let p99_ratio =
        |flooded: Option<&flood::Run>, calm: Option<&flood::Run>| match (p99(flooded), p99(calm)) {
            (Some(a), Some(b)) => format!("{:.2}×", a / b.max(1.0)),
            (None, _) => {
                "unbounded (no request answered within 1 s of the measured time)".to_owned()
            }
            (_, None) => "not measured".to_owned(),
        };
    let peak = |x: Option<&flood::Run>| x.map_or(0.0, |x| x.result.rps());
    md.push_str(&format!(
        "\nLegitimate p99 under the flood / without it, at {:.0} rps: **{} with the program attached**, {} detached \
         (goal: within 2× attached). Legitimate peak under the flood / without it: {:.2} attached, {:.2} detached.\n",
        r.rate,
        p99_ratio(find(true, true, true), find(true, false, true)),
        p99_ratio(find(false, true, true), find(false, false, true)),
        peak(find(true, true, false)) / peak(find(true, false, false)).max(1.0),
        peak(find(false, true, false)) / peak(find(false, false, false)).max(1.0),
    ));
    // Open-loop latency by percentile; the detached run under the flood is seconds, off this scale.
    let label = |x: &flood::Run| {
        format!(
            "XDP {}, {}",
            onoff(x.kernel),
            if x.flood { "flood" } else { "no flood" }
        )
    };
    let open: Vec<(String, &hdrhistogram::Histogram<u64>)> = r
        .runs
        .iter()
        .filter(|x| x.rate.is_some() && (x.kernel || !x.flood))
        .filter_map(|x| x.result.latency.as_ref().map(|h| (label(x), h)))
        .collect();
    let svg = format!("{}-flood{suffix}.svg", env.date);
    let series: Vec<(&str, &hdrhistogram::Histogram<u64>)> =
        open.iter().map(|(n, h)| (n.as_str(), *h)).collect();
    match plot::percentiles(
        &dir.join(&svg),
        &format!(
            "legitimate tools/call at {:.0} rps under a SYN flood (detached + flood: seconds, not shown), {}",
            r.rate, env.date
        ),
        &series,
    ) {
        Ok(()) => md.push_str(&format!("\n![latency by percentile]({svg})\n")),
        Err(e) => eprintln!("plot failed: {e}"),
    }
    let json = serde_json::json!({
        "scenario": "flood", "environment": env.json(), "connections": r.connections, "seconds": r.seconds,
        "offered_rps": r.rate, "flood_syn_per_s_target": flood::FLOOD_PPS, "runs": rows_json,
    });
    write_report(
        ledger,
        dir,
        &format!("{}-flood{suffix}", env.date),
        &md,
        &json,
    )
}

/// A histogram bucket's bound for a table, `+Inf` as `∞`.
fn bound(us: u64) -> String {
    if us == u64::MAX {
        "∞".to_owned()
    } else {
        us.to_string()
    }
}

/// The errors column: errors, and in open loop the requests due in the measured time that were
/// not answered by 1 s after it.
fn errors_cell(r: &load::LoadResult) -> String {
    let mut parts: Vec<String> = r
        .error_kinds
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    if r.missed > 0 {
        parts.push(format!("{} missed", r.missed));
    }
    if parts.is_empty() {
        r.errors.to_string()
    } else {
        format!("{} ({})", r.errors, parts.join(", "))
    }
}

/// The served column: connections with an answer in the measured time (bold when some had
/// none), and the fewest and median answers of one connection.
fn served_cell(r: &load::LoadResult) -> String {
    let f = r.fairness();
    let served = f.connections - f.unanswered;
    let count = if f.unanswered > 0 {
        format!("**{served} of {}**", f.connections)
    } else {
        format!("{served} of {}", f.connections)
    };
    format!("{count} ({} / {})", f.min, f.median)
}

/// Writes `<stem>.md` and `<stem>.json` under bench/results/, keeps the JSON for `--json` and
/// prints the Markdown (to stderr with `--json`, whose document alone goes to stdout).
fn write_report(
    ledger: &mut verdict::Ledger,
    dir: &std::path::Path,
    stem: &str,
    md: &str,
    json: &serde_json::Value,
) -> anyhow::Result<()> {
    std::fs::write(dir.join(format!("{stem}.md")), md)?;
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(json)?,
    )?;
    ledger.report(json.clone());
    if ledger.json_stdout {
        eprint!("{md}");
        eprintln!("\nwritten: bench/results/{stem}.md and .json");
    } else {
        print!("{md}");
        println!("\nwritten: bench/results/{stem}.md and .json");
    }
    Ok(())
}

fn proxy_report(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let r = proxy::run(args.quick);
    let mut md = format!(
        "# MCP tools/call: direct vs through the gateway\n\n{}\n\nA small `tools/call` (`add`, stateless 2026-07-28 form) over {} keep-alive \
         connections from one load thread, {:.0} s per run after a warm-up (1 s; 0.5 s with `--quick`). Upstream: `mcp-upstream` (1 worker); gateway: \
         passthrough, 1 worker (unpinned), kernel program off (a second gateway process has per-request telemetry off; a third \
         applies a realistic policy: API key identity, 12 tool rules, 2 argument rules, tenant and agent rates and budgets, the loop breaker; \
         the first gateway also federates two upstreams at `/fed`, where `add` is routed to its owner, and serves the SDK upstream at `/sdk`); \
         nginx: plain reverse proxy, 1 worker, upstream keep-alive. Rows `mixed load` use a mix (below); rows `SDK upstream` \
         have the Python SDK's server as the upstream instead of `mcp-upstream`, as a second point. The processes share \
         this machine's cores. Open-loop sends are woken by each generator thread's clock (a timerfd) with µs precision \
         (its lateness, charged to the latency, is in the JSON: `clock_late_p50_us`). Open-loop latency is measured \
         from each request's intended send time (corrected for coordinated omission); the uncorrected p99 is beside it. \
         Each target is measured in rounds, interleaved with the others (every target once per round), so that the \
         drift of this shared machine touches all alike; a row is the target's median round (by peak rps in closed loop, \
         by p99 in open loop) and the last column gives the range across rounds.\n\n\
         | scenario | mode | offered rps | achieved rps | errors (missed) | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | uncorrected p99 µs | CPU s / 1k req | rounds: range |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
        env.markdown(),
        r.connections,
        r.seconds
    );
    let mut rows_json = Vec::new();
    for row in &r.rows {
        ledger.load_row(
            "proxy",
            &format!("{}, {}", row.scenario, row.mode),
            &row.result,
            true,
            serde_json::json!({"offered_rps": row.offered_rps,
                "cpu_seconds_per_1k": row.cpu_per_k.iter().map(|(n, c)| (n.clone(), *c)).collect::<std::collections::BTreeMap<_, _>>()}),
        );
        let h = row.result.latency.as_ref().expect("histogram");
        let u = row.result.service.as_ref().expect("histogram");
        let cpu: Vec<String> = row
            .cpu_per_k
            .iter()
            .map(|(n, c)| format!("{n} {c:.3}"))
            .collect();
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.scenario,
            row.mode,
            row.offered_rps.map_or("-".into(), |o| format!("{o:.0}")),
            row.result.rps(),
            errors_cell(&row.result),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            u.value_at_quantile(0.99),
            cpu.join(", "),
            match row.range {
                None => format!("{}", row.rounds),
                Some((lo, hi)) if row.offered_rps.is_some() => {
                    format!("{}: p99 {lo:.0}–{hi:.0} µs", row.rounds)
                }
                Some((lo, hi)) => format!("{}: {lo:.0}–{hi:.0} rps", row.rounds),
            },
        ));
        rows_json.push(serde_json::json!({
            "scenario": row.scenario, "mode": row.mode, "offered_rps": row.offered_rps, "achieved_rps": row.result.rps(),
            "ok": row.result.ok, "errors": row.result.errors, "error_kinds": row.result.error_kinds, "missed": row.result.missed,
            "p50_us": h.value_at_quantile(0.5), "p90_us": h.value_at_quantile(0.9), "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999), "max_us": h.max(), "uncorrected_p99_us": u.value_at_quantile(0.99),
            "rounds": row.rounds, "range": row.range.map(|(lo, hi)| [lo, hi]),
            "cpu_seconds_per_1k": row.cpu_per_k.iter().map(|(n, c)| (n.clone(), *c)).collect::<std::collections::BTreeMap<_, _>>(),
        }));
    }
    let peak = |s: &str| {
        r.rows
            .iter()
            .find(|x| x.scenario == s && x.offered_rps.is_none())
            .map_or(0.0, |x| x.result.rps())
    };
    let p99 = |s: &str| {
        r.rows
            .iter()
            .find(|x| x.scenario == s && x.offered_rps.is_some())
            .map_or(0, |x| {
                x.result
                    .latency
                    .as_ref()
                    .expect("h")
                    .value_at_quantile(0.99)
            })
    };
    md.push_str(&format!(
        "\nPeak through the gateway / through nginx: {:.2}; with a realistic policy / through nginx: {:.2}; federated / through nginx: {:.2}; / direct: {:.2}; telemetry on / off: {:.2}. \
         Added p99 over direct at half of the lowest peak: gateway {} µs, with the realistic policy {} µs, nginx {} µs.\n\nPeak memory: {}.\n",
        peak("through gateway") / peak("through nginx").max(1.0),
        peak("through gateway, realistic policy") / peak("through nginx").max(1.0),
        peak("through gateway, federation of two upstreams") / peak("through nginx").max(1.0),
        peak("through gateway") / peak("direct to upstream").max(1.0),
        peak("through gateway") / peak("through gateway, telemetry off").max(1.0),
        p99("through gateway") as i64 - p99("direct to upstream") as i64,
        p99("through gateway, realistic policy") as i64 - p99("direct to upstream") as i64,
        p99("through nginx") as i64 - p99("direct to upstream") as i64,
        r.peak_rss_mib.iter().map(|(n, m)| format!("{n} {m:.1} MiB")).collect::<Vec<_>>().join(", "),
    ));
    md.push_str(&format!(
        "\nMixed load (32 agents of 8 tenants, each with its own API key; 1 request in 10 a `tools/list`, which the policy \
         gateway filters; every other connection in a session of the 2025-11-25 era): peak through the gateway with the \
         realistic policy / through nginx: {:.2}; added p99 at half load: gateway {} µs, nginx {} µs.\n",
        peak("mixed load: through gateway, realistic policy") / peak("mixed load: through nginx").max(1.0),
        p99("mixed load: through gateway, realistic policy") as i64 - p99("mixed load: direct to upstream") as i64,
        p99("mixed load: through nginx") as i64 - p99("mixed load: direct to upstream") as i64,
    ));
    md.push_str(&format!(
        "\nThe Python SDK's server (PyPI `mcp`, JSON answers, one process) as the upstream: peak direct {:.0} rps, through the \
         gateway {:.0} ({:.2}× direct), through nginx {:.0} ({:.2}× direct); added p99 at half of that group's lowest peak: \
         gateway {} µs, nginx {} µs.\n",
        peak("SDK upstream: direct"),
        peak("SDK upstream: through gateway"),
        peak("SDK upstream: through gateway") / peak("SDK upstream: direct").max(1.0),
        peak("SDK upstream: through nginx"),
        peak("SDK upstream: through nginx") / peak("SDK upstream: direct").max(1.0),
        p99("SDK upstream: through gateway") as i64 - p99("SDK upstream: direct") as i64,
        p99("SDK upstream: through nginx") as i64 - p99("SDK upstream: direct") as i64,
    ));
    match &r.contextforge_missing {
        Some(why) => md.push_str(&format!("\nContextForge (the MCP-aware peer) was not measured: {why}\n")),
        None => md.push_str(&format!(
            "\nContextForge (`mcp-contextforge-gateway` 1.0.7 from PyPI, 1 worker, SQLite, a virtual server over the same upstream) \
             does not accept 2026-07-28 requests, so its load uses the 2025-11-25 form of the same call (no session; it needs none). \
             Peak through the gateway / through ContextForge: {:.1}.\n",
            peak("through gateway") / peak("through ContextForge").max(1.0)
        )),
    }
    // The open-loop runs (same offered rate for every scenario), as a percentile plot.
    let offered = r
        .rows
        .iter()
        .find_map(|x| x.offered_rps)
        .unwrap_or_default();
    let open: Vec<(&str, &hdrhistogram::Histogram<u64>)> = r
        .rows
        .iter()
        // ContextForge runs at its own, far lower rate: another plot's scale.
        .filter(|x| x.offered_rps == Some(offered))
        .filter_map(|x| x.result.latency.as_ref().map(|h| (x.scenario.as_str(), h)))
        .collect();
    let svg = format!("{}-proxy{suffix}.svg", env.date);
    let offered = r
        .rows
        .iter()
        .find_map(|x| x.offered_rps)
        .unwrap_or_default();
    match plot::percentiles(
        &dir.join(&svg),
        &format!(
            "tools/call latency at {offered:.0} rps (open loop), {}",
            env.date
        ),
        &open,
    ) {
        Ok(()) => md.push_str(&format!("\n![latency by percentile]({svg})\n")),
        Err(e) => eprintln!("plot failed: {e}"),
    }
    let json = serde_json::json!({
        "scenario": "proxy", "environment": env.json(), "connections": r.connections, "seconds": r.seconds,
        "rows": rows_json, "peak_rss_mib": r.peak_rss_mib.iter().map(|(n, m)| (n.clone(), *m)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    write_report(
        ledger,
        dir,
        &format!("{}-proxy{suffix}", env.date),
        &md,
        &json,
    )
}

fn xdp(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let (runs, repeat) = if args.quick {
        (3, 50_000)
    } else {
        (9, 500_000)
    };
    let mut k = TestKernel::load(&state());
    let info = k
        .kernel
        .program()
        .context("program")?
        .info()
        .context("program info")?;
    let verified = info.verified_instruction_count().unwrap_or(0);
    let xlated = info.size_translated().unwrap_or(0) / 8;
    k.maps()
        .ban("10.0.9.9".parse()?, Duration::from_secs(600))?;

    let ip = |s: &str| -> IpAddr { s.parse().expect("address") };
    let paths: Vec<(&str, Vec<u8>)> = vec![
        (
            "early exit: foreign port (peer)",
            frames::tcp(ip("10.0.1.1"), 22, Flags::Syn),
        ),
        (
            "established: ACK, IPv4",
            frames::tcp(ip("10.0.1.1"), PORT, Flags::Ack),
        ),
        (
            "new connection: SYN, IPv4, both buckets",
            frames::tcp(ip("10.0.1.1"), PORT, Flags::Syn),
        ),
        (
            "new connection: SYN, IPv6, default tenant",
            frames::tcp(ip("2001:db8::7"), PORT, Flags::Syn),
        ),
        (
            "dropped: denied prefix",
            frames::tcp(ip("172.16.3.3"), PORT, Flags::Syn),
        ),
        (
            "dropped: banned address",
            frames::tcp(ip("10.0.9.9"), PORT, Flags::Syn),
        ),
    ];
    let mut rows = Vec::new();
    for (name, frame) in &paths {
        let mut samples: Vec<u128> = (0..runs).map(|_| k.cost_ns(frame, repeat)).collect();
        samples.sort_unstable();
        rows.push((
            *name,
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1],
        ));
    }
    let peer = rows[0].1.max(1) as f64;
    drop(k);
    let accuracy = bucket_accuracy(if args.quick { 1.0 } else { 3.0 });

    let mut md = format!(
        "# XDP program cost per packet\n\n{}\n\nMeasured with `BPF_PROG_TEST_RUN`, {runs} runs of {repeat} repetitions each \
         (the kernel reports the mean per repetition; the table gives the median run and the range). \
         54-byte (IPv4) and 74-byte (IPv6) TCP frames; 1,000 tenant prefixes, 200 deny prefixes, per-tenant and per-source buckets on.\n\n\
         Verifier: {verified} instructions processed; program size {xlated} instructions.\n\n\
         | path | ns/packet (median) | min | max | × peer |\n|---|---:|---:|---:|---:|\n",
        env.markdown()
    );
    for (name, med, min, max) in &rows {
        md.push_str(&format!(
            "| {name} | {med} | {min} | {max} | {:.2} |\n",
            *med as f64 / peer
        ));
    }
    md.push_str(&format!(
        "\n## Tenant bucket accuracy under contention\n\nOne tenant limited to {} new connections/s (burst {}); SYNs offered from every \
         CPU at once through `BPF_PROG_TEST_RUN` for {:.1} s, far above the limit. The bucket is one u64 shared by all \
         CPUs, charged with an atomic add (see docs/architecture.md).\n\n\
         | CPUs offering | SYNs offered | admitted | allowed (burst + rate × time) | admitted / allowed |\n|---:|---:|---:|---:|---:|\n",
        ACCURACY_RATE, ACCURACY_BURST, accuracy[0].seconds
    ));
    for a in &accuracy {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.4} |\n",
            a.cpus,
            a.offered,
            a.admitted,
            a.allowed,
            a.admitted as f64 / a.allowed
        ));
    }
    let json = serde_json::json!({
        "bucket_accuracy": accuracy.iter().map(|a| serde_json::json!({
            "cpus": a.cpus, "offered": a.offered, "admitted": a.admitted, "allowed": a.allowed, "seconds": a.seconds,
        })).collect::<Vec<_>>(),
        "scenario": "xdp",
        "environment": env.json(),
        "runs": runs,
        "repeat": repeat,
        "verifier_processed_insns": verified,
        "program_insns": xlated,
        "paths": rows.iter().map(|(n, med, min, max)| serde_json::json!({
            "path": n, "median_ns": med, "min_ns": min, "max_ns": max, "ratio_to_peer": *med as f64 / peer,
        })).collect::<Vec<_>>(),
    });
    write_report(
        ledger,
        dir,
        &format!("{}-xdp{suffix}", env.date),
        &md,
        &json,
    )
}

fn tls_report(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let r = tls::run(args.quick);
    let mut md = format!(
        "# TLS: the gateway's against nginx's, same certificate, same run\n\n{}\n\n\
         One certificate (ECDSA P-256, issued by a CA made for the run with rcgen) served by both. The gateway: 1 worker, \
         unpinned, kernel program off; nginx: `worker_processes 1`, `ssl_protocols TLSv1.2 TLSv1.3`, session tickets and \
         cache left at nginx's defaults. Both proxy to `mcp-upstream` (1 worker, plain HTTP, upstream keep-alive). \
         The load: {} connections, closed loop (peak), {:.0} s measured after a warm-up, `tools/call` (2026-07-28 form); \
         its TLS client is rustls offering TLS 1.3 only, X25519 only (what nginx's OpenSSL 3.0 would pick; a rustls \
         server would otherwise take the post-quantum hybrid rustls offers first), ALPN `http/1.1`, SNI `localhost`, \
         resumption off (every new connection is a full handshake). It checks the server's handshake signature but not \
         the chain (as `h2load` and `wrk` check nothing); each TLS listener is first checked once with full verification \
         against the CA. Rounds:\n\n\
         1. {}: connect, handshake, one `tools/call`, close_notify and close; rate = handshakes/s.\n\
         2. {}.\n\
         3. {}: nginx terminating TLS (same certificate, its own process) in front of `mcp-upstream` is the https upstream \
         of both proxies, which verify it against the CA (nginx: `proxy_ssl_verify on`, TLS 1.2–1.3, upstream keep-alive \
         and session reuse).\n\n\
         CPU is user + system time of each process within the measured time only, divided by the requests (round 1: \
         handshakes) answered in it. Every target is measured once per round, rounds interleaved; a row is the median \
         round by rate, the last column the range across rounds. All processes, the load generator included, share \
         this machine's cores.\n\n\
         The column `server on / waiting for a CPU` gives the server's threads' time running and runnable-but-waiting \
         (from /proc/<pid>/task/*/schedstat) as shares of the measured time: a server that waits much for a CPU is \
         held back by the other work on the machine, and its rate says more about the scheduler than about itself.\n\n\
         | round | server | achieved /s | errors | p50 µs | p90 µs | p99 µs | server CPU µs / req | server on / waiting for a CPU | others' CPU µs / req | rounds: range |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
        env.markdown(),
        r.connections,
        r.seconds,
        tls::Round::Handshakes.title(),
        tls::Round::KeepAlive.title(),
        tls::Round::HttpsUpstream.title(),
    );
    let mut rows_json = Vec::new();
    for row in &r.rows {
        ledger.load_row(
            "tls",
            &format!("{}, {}", row.round.title(), row.server),
            &row.result,
            true,
            serde_json::json!({"server_cpu_us_per_request": row.server_cpu_us}),
        );
        let h = row.result.latency.as_ref().expect("histogram");
        let others: Vec<String> = row
            .other_cpu_us
            .iter()
            .map(|(n, c)| format!("{n} {c:.1}"))
            .collect();
        md.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | **{:.1}** | {:.0}% / {:.0}% | {} | {} |\n",
            row.round.title(),
            row.server,
            row.result.rps(),
            errors_cell(&row.result),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            row.server_cpu_us,
            row.server_running * 100.0,
            row.server_waiting * 100.0,
            others.join(", "),
            match row.range {
                None => format!("{}", row.rounds),
                Some((lo, hi)) => format!("{}: {lo:.0}–{hi:.0}/s", row.rounds),
            },
        ));
        rows_json.push(serde_json::json!({
            "round": row.round.key(), "server": row.server, "achieved_per_s": row.result.rps(),
            "ok": row.result.ok, "errors": row.result.errors, "error_kinds": row.result.error_kinds,
            "p50_us": h.value_at_quantile(0.5), "p90_us": h.value_at_quantile(0.9), "p99_us": h.value_at_quantile(0.99),
            "p999_us": h.value_at_quantile(0.999), "max_us": h.max(),
            "server_cpu_us_per_request": row.server_cpu_us,
            "server_running_share": row.server_running, "server_waiting_for_cpu_share": row.server_waiting,
            "other_cpu_us_per_request": row.other_cpu_us.iter().map(|(n, c)| (n.clone(), *c)).collect::<std::collections::BTreeMap<_, _>>(),
            "rounds": row.rounds, "range": row.range.map(|(lo, hi)| [lo, hi]),
        }));
    }
    let find = |round: tls::Round, server: &str| {
        r.rows
            .iter()
            .find(|x| x.round == round && x.server == server && x.result.ok > 0)
    };
    let mut goals = Vec::new();
    for (round, what) in [
        (tls::Round::Handshakes, "handshakes/s"),
        (tls::Round::KeepAlive, "keep-alive TLS"),
        (tls::Round::HttpsUpstream, "https upstream"),
    ] {
        if let (Some(g), Some(n)) = (find(round, "gateway"), find(round, "nginx")) {
            goals.push((
                round,
                g.result.rps() / n.result.rps(),
                g.server_cpu_us / n.server_cpu_us.max(1e-9),
                what,
            ));
        }
    }
    md.push('\n');
    for (round, rate, cpu, what) in &goals {
        md.push_str(&format!(
            "- {what}: gateway / nginx rate {rate:.2}×, CPU per {} {cpu:.2}×{}\n",
            if *round == tls::Round::Handshakes {
                "handshake"
            } else {
                "request"
            },
            match round {
                tls::Round::Handshakes => format!(
                    " (goal: handshakes/s ≥ nginx's: {})",
                    if *rate >= 1.0 { "met" } else { "not met" }
                ),
                tls::Round::KeepAlive => format!(
                    " (goal: CPU per request ≤ 0.8× nginx's: {})",
                    if *cpu <= 0.8 { "met" } else { "not met" }
                ),
                tls::Round::HttpsUpstream => String::new(),
            }
        ));
    }
    for why in &r.gateway_missing {
        md.push_str(&format!("- Not measured on the gateway's side: {why}\n"));
    }
    md.push_str("\nNegotiated (the checking handshake): ");
    md.push_str(
        &r.negotiated
            .iter()
            .map(|(s, w)| format!("{s}: {w}"))
            .collect::<Vec<_>>()
            .join("; "),
    );
    md.push_str(&format!(
        ".\n\nThe machine's load average (1, 5, 15 min): {} before, {} after.\n\nPeak memory: {}.\n",
        r.loadavg[0],
        r.loadavg[1],
        r.peak_rss_mib
            .iter()
            .map(|(n, m)| format!("{n} {m:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let json = serde_json::json!({
        "scenario": "tls", "environment": env.json(), "connections": r.connections, "seconds": r.seconds,
        "rows": rows_json, "gateway_missing": r.gateway_missing, "loadavg_before": r.loadavg[0], "loadavg_after": r.loadavg[1],
        "negotiated": r.negotiated.iter().map(|(s, w)| (s.clone(), w.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        "goals": goals.iter().map(|(round, rate, cpu, _)| serde_json::json!({"round": round.key(), "rate_ratio": rate, "cpu_ratio": cpu})).collect::<Vec<_>>(),
        "peak_rss_mib": r.peak_rss_mib.iter().map(|(n, m)| (n.clone(), *m)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    write_report(
        ledger,
        dir,
        &format!("{}-tls{suffix}", env.date),
        &md,
        &json,
    )
}

/// Scenario `idle` (only when named): the headline bed, one warm-up row per proxy, then
/// 1,000 and 10,000 idle connections held on the gateway and on nginx.
fn idle_report(
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let idle = headline::run_idle();
    let (table, idle_json) = idle_table(ledger, &idle);
    let md = format!(
        "# Idle connections: the gateway and nginx ({date})\n\n{env}\n\nThe headline's bed; \
         one 32-connection warm-up row per proxy first.\n{table}",
        date = env.date,
        env = env.markdown(),
    );
    let json =
        serde_json::json!({"scenario": "idle", "environment": env.json(), "idle": idle_json});
    write_report(ledger, dir, &format!("{}-idle", env.date), &md, &json)
}

/// Scenario `reload` (only when named): the headline bed, reloads under load through the
/// gateway (see [`headline::run_reload`]).
fn reload_report(
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let runs = headline::run_reload();
    let mut md = format!(
        "# Reloads under load ({date})\n\n{env}\n\nThe headline's bed; a SIGHUP every second \
         during an open-loop run at 13,000 rps (32 connections) through the gateway.\n\n\
         | run | reloads | answered | failed (missed) | p50 µs | p99 µs | max µs |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        date = env.date,
        env = env.markdown(),
    );
    let mut rows = Vec::new();
    for (what, e) in &runs {
        let h = e.result.latency.as_ref();
        let max = max_of(h);
        md.push_str(&format!(
            "| {what} | {} | {} | {} | {} | {} | {max} |\n",
            e.events,
            e.result.ok,
            errors_cell(&e.result),
            q(h, 0.5),
            q(h, 0.99),
        ));
        let row = serde_json::json!({"run": what, "reloads": e.events, "ok": e.result.ok,
            "p50_us": q(h, 0.5), "p99_us": q(h, 0.99), "max_us": max});
        ledger.load_row("reload", what, &e.result, e.checked, row.clone());
        rows.push(row);
    }
    let json = serde_json::json!({"scenario": "reload", "environment": env.json(), "runs": rows});
    write_report(ledger, dir, &format!("{}-reload", env.date), &md, &json)
}

/// The value at quantile `q` of a latency histogram (µs); 0 when nothing was recorded.
fn q(h: Option<&hdrhistogram::Histogram<u64>>, q: f64) -> u64 {
    h.filter(|h| !h.is_empty())
        .map_or(0, |h| h.value_at_quantile(q))
}

/// The largest value of a latency histogram (µs); 0 when nothing was recorded.
fn max_of(h: Option<&hdrhistogram::Histogram<u64>>) -> u64 {
    h.filter(|h| !h.is_empty())
        .map_or(0, hdrhistogram::Histogram::max)
}

/// The idle-connection table (Markdown) and its JSON rows; each row also goes to the ledger.
fn idle_table(
    ledger: &mut verdict::Ledger,
    idle: &[headline::Idle],
) -> (String, Vec<serde_json::Value>) {
    let mut md = String::new();
    md.push_str(
        "\n## Idle connections\n\nEach connection makes one `tools/call` and is then held idle; resident memory (VmRSS) of \
         the proxy before, 2 s after the last answer, and 2 s after all closed.\n\n\
         | proxy | held | RSS before MiB | held MiB | KiB per connection | after close MiB | after close vs before |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut idle_json = Vec::new();
    for i in idle {
        let per = (i.held_mib - i.before_mib) * 1024.0 / i.opened.max(1) as f64;
        let after = (i.after_close_mib / i.before_mib.max(1e-9) - 1.0) * 100.0;
        md.push_str(&format!(
            "| {} | {}{} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.0} % |\n",
            i.target.name(),
            i.opened,
            if i.opened < i.held {
                format!(" of {}", i.held)
            } else {
                String::new()
            },
            i.before_mib,
            i.held_mib,
            per,
            i.after_close_mib,
            after
        ));
        ledger.counts(
            "headline",
            &format!("idle {} connections, {}", i.held, i.target.name()),
            i.opened as u64,
            (i.held - i.opened) as u64,
            true,
            serde_json::json!({"rss_before_mib": i.before_mib, "rss_held_mib": i.held_mib,
                "kib_per_connection": per, "rss_after_close_mib": i.after_close_mib}),
        );
        idle_json.push(
            serde_json::json!({"proxy": i.target.name(), "held": i.held, "opened": i.opened,
            "rss_before_mib": i.before_mib, "rss_held_mib": i.held_mib, "kib_per_connection": per,
            "rss_after_close_mib": i.after_close_mib}),
        );
    }
    (md, idle_json)
}

/// Scenario `headline`: the gateway with XDP attached, nginx tuned, and the floor; CPU per
/// request first, then the rate, and every row's distance from the floor.
fn headline_report(
    args: &Args,
    ledger: &mut verdict::Ledger,
    env: &env::Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let r = headline::run(args.quick);
    let mut md = format!(
        "# Headline: the gateway, nginx and the floor ({date})\n\n{env}\n\n\
         Two network namespaces joined by veth; the proxies listen on 198.18.0.1 with the gateway's XDP program attached \
         to the veth in native mode (packets to nginx's and the floor's ports take its early exit). `mcp-upstream` \
         (1 worker) on loopback behind them. Cores: **CPU 0 runs the load generator and `mcp-upstream`, CPU 1 the proxy \
         under test** (one loaded at a time; all pinned with `taskset`/`sched_setaffinity`). The half-load rows also send \
         their load straight to a second `mcp-upstream` (1 worker, on the proxies' address, pinned to CPU 0, no proxy): \
         what a proxy adds to the latency is measured from it. The floor is a byte relay \
         (a connection upstream per client connection, no parsing, one monoio thread): what any proxy costs at least. \
         The gateway: 1 worker, passthrough, telemetry on. The gateway with the realistic policy (rows of small \
         calls only): a second gateway, 1 worker, the kernel program off (the veth holds one XDP program), with the \
         `proxy` scenario's policy (API key identity, 12 tool rules, 2 argument rules, tenant and agent rates and \
         budgets, the loop breaker; the load sends its key). nginx: 1 worker, upstream keep-alive, request bodies and \
         answers buffered in memory (up to 2 MiB, never to disk). Closed-loop rows give the peak; open-loop rows are \
         offered {half:.0} rps (half of the lowest peak of the first row) on a schedule kept by a timerfd clock with µs \
         precision; latency is measured from each request's intended send time (corrected for coordinated omission), \
         the uncorrected figure (from the actual send) beside it. {seconds:.1} s measured per row after a warm-up{rounds}. \
         CPU is the proxy's user + system time per answered request (its share of kernel networking done in softirq \
         context is not all charged to it), user its user time; busy is each core's busy share during the row, softirq \
         the share of it in softirq context (charged to whichever process it interrupted, or to none), stolen the share the hypervisor gave to another guest. A gateway's own p50 and p99 are read from its own latency histogram (`kind=\"gateway\"`: from a request's first byte read to its answer's last byte written, less the wait for the upstream's answer head; the difference of `/metrics` at the row's start and end; workers hand their histograms over once a second, so that is the row's time give or take a second of the same load, and a row shorter than that, as in `--quick`, may have none), so they are bucket bounds (1, 2, 5, 10, 20, 50, 100, 200, 500 µs, ...); in brackets the share of requests whose own time was at most 100 µs: what the gateway adds, apart from the queueing on the generator's core that the other latencies carry. Latencies are those of \
         answered requests, so a proxy that leaves some connections waiting would look faster than one that serves \
         them all: *served* says how many connections had an answer in the measured time, and the fewest and the \
         median answers of one connection; a request that waited through the measured time, still unanswered 1 s after it, is *missed*.\n\n\
         | row | proxy | CPU µs / req | user µs | × floor CPU | rps | × floor rps | errors (missed) | served: connections (fewest / median answers) | p50 µs | p99 µs | p99 − floor's µs | uncorrected p50 / p99 µs | gateway's own p50 / p99 µs (share ≤ 100 µs) | CPU 0 / CPU 1 busy (softirq) | stolen CPU 0 / CPU 1 |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        date = env.date,
        env = env.markdown(),
        half = r.half_rate,
        seconds = r.seconds,
        rounds = if args.quick {
            ""
        } else {
            "; the first two rows: median of 3 interleaved rounds"
        },
    );
    for row in &r.rows {
        // Ratios only between rows that answered something.
        let floor = r.floor_of(row).filter(|_| row.result.ok > 0);
        let (h, u) = (row.result.latency.as_ref(), row.result.service.as_ref());
        // The row without a proxy has no proxy's CPU to show (its process is the upstream).
        let proxied = row.target != headline::Target::Direct;
        let cpu_ratio = floor
            .filter(|_| proxied)
            .map(|f| row.cpu_us / f.cpu_us.max(1e-9));
        let p99_over_direct = r.p99_over_direct(row);
        let rps_ratio = floor.map(|f| row.result.rps() / f.result.rps().max(1e-9));
        let p99_delta =
            floor.map(|f| q(h, 0.99) as i64 - q(f.result.latency.as_ref(), 0.99) as i64);
        let fair = row.result.fairness();
        md.push_str(&format!(
            "| {} | {} | **{}** | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {:.0}% ({:.0}%) / {:.0}% ({:.0}%) | {:.1}% / {:.1}% |\n",
            row.kind,
            row.target.name(),
            if row.result.ok > 0 && proxied { format!("{:.1}", row.cpu_us) } else { "-".into() },
            if row.result.ok > 0 && proxied { format!("{:.1}", row.user_us) } else { "-".into() },
            cpu_ratio.map_or("-".into(), |x| format!("{x:.2}×")),
            row.result.rps(),
            rps_ratio.map_or("-".into(), |x| format!("{x:.2}×")),
            errors_cell(&row.result),
            served_cell(&row.result),
            q(h, 0.5),
            q(h, 0.99),
            p99_delta.map_or("-".into(), |d| format!("{d:+}")),
            q(u, 0.5),
            q(u, 0.99),
            row.own.map_or("-".to_owned(), |o| format!(
                "≤ {} / ≤ {} ({:.1}%)",
                bound(o.p50_within_us),
                bound(o.p99_within_us),
                o.within_100us * 100.0
            )),
            row.busy[0] * 100.0,
            row.softirq[0] * 100.0,
            row.busy[1] * 100.0,
            row.softirq[1] * 100.0,
            row.steal[0] * 100.0,
            row.steal[1] * 100.0,
        ));
        ledger.load_row(
            "headline",
            &format!("{}, {}", row.kind, row.target.name()),
            &row.result,
            true,
            serde_json::json!({
                "kind": row.kind, "proxy": row.target.name(), "connections": row.connections,
                "offered_rps": row.offered_rps, "cpu_us_per_request": row.cpu_us,
                "user_us_per_request": row.user_us, "cpu0_softirq": row.softirq[0], "cpu1_softirq": row.softirq[1],
                "cpu0_steal": row.steal[0], "cpu1_steal": row.steal[1],
                "own_p50_within_us": row.own.map(|o| o.p50_within_us),
                "own_p99_within_us": row.own.map(|o| o.p99_within_us),
                "own_within_100us": row.own.map(|o| o.within_100us),
                "floor_cpu_ratio": cpu_ratio, "floor_rps_ratio": rps_ratio, "p99_minus_floor_us": p99_delta,
                "p99_minus_direct_us": p99_over_direct,
                "cpu0_busy": row.busy[0], "cpu1_busy": row.busy[1],
                "connections_served": fair.connections - fair.unanswered,
                "answers_per_connection_fewest": fair.min, "answers_per_connection_median": fair.median,
                "answers_per_connection_most": fair.max,
            }),
        );
    }
    // What each proxy adds to the p99 at half load: issue 18's latency goal (at most 100 µs).
    let added: Vec<String> = r
        .rows
        .iter()
        .filter_map(|row| {
            Some(format!(
                "{} {:+} µs",
                row.target.name(),
                r.p99_over_direct(row)?
            ))
        })
        .collect();
    if let Some(d) = r.rows.iter().find(|x| x.target == headline::Target::Direct) {
        md.push_str(&format!(
            "\nAdded to the p99 at half load, against the same load sent to an `mcp-upstream` of its own on the proxies' address (no proxy; the generator's core, p99 {} µs): {}.\n",
            q(d.result.latency.as_ref(), 0.99),
            if added.is_empty() { "-".to_owned() } else { added.join(", ") }
        ));
    }
    let stolen = headline::stolen_rows(&r.rows);
    if !stolen.is_empty() {
        let line = format!(
            "the hypervisor took more than {:.0} % of a core from {} row(s), whose CPU, rates and latencies are the host's as much as the proxies': {}",
            headline::STOLEN_NOTICE * 100.0,
            stolen.len(),
            stolen.join("; ")
        );
        md.push_str(&format!("\n**Note: {line}.**\n"));
        eprintln!("BENCH NOTE: {line}");
    }
    if let Some(t) = r.rows.iter().find_map(|x| x.result.ticks) {
        md.push_str(&format!(
            "\nThe schedule's clock woke connections {} µs late at p50, {} µs at p99 (first open-loop row).\n",
            t.late_p50_us, t.late_p99_us
        ));
    }
    let (idle_md, idle_json) = idle_table(ledger, &r.idle);
    md.push_str(&idle_md);
    md.push_str(&format!(
        "\n## Under load: reloads and an upstream restart\n\nOpen loop at {:.0} rps, 32 connections.\n\n\
         | event | proxy | events | answered | failed (missed) | p99 µs | max µs |\n|---|---|---:|---:|---:|---:|---:|\n",
        r.half_rate
    ));
    let mut events_json = Vec::new();
    for e in &r.events {
        let h = e.result.latency.as_ref();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            e.what,
            e.target.name(),
            e.events,
            e.result.ok,
            errors_cell(&e.result),
            q(h, 0.99),
            max_of(h),
        ));
        ledger.load_row(
            "headline",
            &format!("{}, {}", e.what, e.target.name()),
            &e.result,
            e.checked,
            serde_json::json!({"events": e.events}),
        );
        events_json.push(serde_json::json!({"event": e.what, "proxy": e.target.name(), "events": e.events,
            "ok": e.result.ok, "errors": e.result.errors, "missed": e.result.missed, "error_kinds": e.result.error_kinds}));
    }
    let mut soak_json = serde_json::Value::Null;
    if let Some(s) = &r.soak {
        md.push_str(&format!(
            "\n## Soak: 10 minutes at {:.0} rps through the gateway\n\nAnswered {}, failed {}; p99 {} µs, max {} µs. \
             Per 10 s: the slowest answer the generator saw (from its intended send time, and from the actual send), \
             how late it sent a request against its schedule (a stall of the generator or of the whole machine), \
             the gateway's own slowest request and its upstream's part (its `/stats?window=10s`: its last one or two \
             10-s slots, so a stall can show in two samples), and the time the hypervisor stole from each core.\n\n\
             | s | gateway RSS MiB | answered in 10 s | failed in 10 s | slowest answer µs (uncorrected) | latest send µs | gateway's slowest µs (upstream) | stolen ms CPU 0 / CPU 1 |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|\n",
            s.rate,
            s.result.ok,
            errors_cell(&s.result),
            q(s.result.latency.as_ref(), 0.99),
            s.result.latency.as_ref().map_or(0, hdrhistogram::Histogram::max),
        ));
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        for x in &s.samples {
            md.push_str(&format!(
                "| {:.0} | {:.1} | {} | {} | {} ({}) | {} | {} ({}) | {:.0} / {:.0} |\n",
                x.at,
                x.rss_mib,
                x.answered,
                x.failed,
                x.max_us,
                x.max_uncorrected_us,
                x.max_send_lag_us,
                opt(x.gateway_max_us),
                opt(x.upstream_max_us),
                x.steal_ms[0],
                x.steal_ms[1],
            ));
        }
        ledger.load_row(
            "headline",
            "soak, gateway",
            &s.result,
            true,
            serde_json::json!({"offered_rps": s.rate}),
        );
        soak_json = serde_json::json!({"offered_rps": s.rate, "ok": s.result.ok, "errors": s.result.errors,
            "missed": s.result.missed,
            "samples": s.samples.iter().map(|x| serde_json::json!({"s": x.at, "rss_mib": x.rss_mib, "ok": x.answered, "failed": x.failed,
                "max_us": x.max_us, "max_uncorrected_us": x.max_uncorrected_us, "max_send_lag_us": x.max_send_lag_us,
                "gateway_max_us": x.gateway_max_us, "upstream_max_us": x.upstream_max_us,
                "cpu0_steal_ms": x.steal_ms[0], "cpu1_steal_ms": x.steal_ms[1]})).collect::<Vec<_>>()});
    }
    md.push_str(&format!(
        "\nLoad average (1, 5, 15 min): {} before, {} after. Peak memory: {}.\n",
        r.loadavg[0],
        r.loadavg[1],
        r.peak_rss_mib
            .iter()
            .map(|(n, m)| format!("{n} {m:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let json = serde_json::json!({
        "scenario": "headline", "environment": env.json(), "seconds": r.seconds, "half_rate": r.half_rate,
        "cores": {"load_generator_and_upstream": 0, "proxy": 1},
        "rows": r.rows.iter().map(|row| serde_json::json!({
            "kind": row.kind, "proxy": row.target.name(), "connections": row.connections, "offered_rps": row.offered_rps,
            "cpu_us_per_request": row.cpu_us, "user_us_per_request": row.user_us, "achieved_rps": row.result.rps(), "ok": row.result.ok,
            "errors": row.result.errors, "missed": row.result.missed, "error_kinds": row.result.error_kinds,
            "p50_us": q(row.result.latency.as_ref(), 0.5), "p99_us": q(row.result.latency.as_ref(), 0.99),
            "p99_minus_direct_us": r.p99_over_direct(row),
            "uncorrected_p50_us": q(row.result.service.as_ref(), 0.5), "uncorrected_p99_us": q(row.result.service.as_ref(), 0.99),
            "cpu0_busy": row.busy[0], "cpu1_busy": row.busy[1],
            "cpu0_softirq": row.softirq[0], "cpu1_softirq": row.softirq[1],
            "cpu0_steal": row.steal[0], "cpu1_steal": row.steal[1],
            "own_p50_within_us": row.own.map(|o| o.p50_within_us),
            "own_p99_within_us": row.own.map(|o| o.p99_within_us),
            "own_within_100us": row.own.map(|o| o.within_100us),
        })).collect::<Vec<_>>(),
        "idle": idle_json, "events": events_json, "soak": soak_json,
        "loadavg_before": r.loadavg[0], "loadavg_after": r.loadavg[1],
        "peak_rss_mib": r.peak_rss_mib.iter().map(|(n, m)| (n.clone(), *m)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    write_report(
        ledger,
        dir,
        &format!("{}-headline{suffix}", env.date),
        &md,
        &json,
    )
}
