//! Scenario `fleet`: what sharing state through Redis costs, and how well a fleet-wide rate
//! holds. A `redis-server` of its own on loopback and one upstream (`mcp-upstream`):
//! - cost: two gateways in the same run with the same tenant rate (high enough never to refuse
//!   the load), one alone and one in a fleet (`[state] redis`, its rate drawn from leases);
//!   peak rps (closed loop), then gateway CPU per request and p99 at half the lone gateway's
//!   peak (open loop), in interleaved rounds, the median round reported;
//! - accuracy: three gateways of one fleet limited to `R`/s, each loaded well above `R` at
//!   once; what the fleet admitted against `R`.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::peers::{KillOnDrop, demo_upstream, free_port, wait_port};

use crate::{
    env::Environment,
    load::{self, LoadSpec, Mix},
    proxy::{BENCH_API_KEY, Proc, start_gateway},
};

/// The fleet-wide rate of the accuracy part.
const FLEET_RATE: u64 = 2_000;

struct Row {
    mode: &'static str,
    peak_rps: f64,
    cpu_us: f64,
    cpu_range: (f64, f64),
    p99_us: f64,
}

struct Accuracy {
    admitted: u64,
    seconds: f64,
    refused: u64,
}

fn redis_server(port: u16) -> KillOnDrop {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
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
        .expect("start redis-server (installed by `cargo xtask setup`)");
    let child = KillOnDrop(child);
    wait_port(port, Duration::from_secs(10));
    child
}

fn tenant(rate: u64, redis: Option<(u16, &str)>) -> String {
    let state = redis.map_or_else(String::new, |(port, fleet)| {
        format!("[state]\nredis = \"redis://127.0.0.1:{port}/\"\nfleet = \"{fleet}\"\n")
    });
    format!(
        "default_tenant = \"bench\"\n[[tenants]]\nname = \"bench\"\nid = 0\n[policy]\nrequests_per_sec = {rate}\nburst = {burst}\n{state}",
        burst = (rate / 10).max(1)
    )
}

fn spec(port: u16, rate: Option<f64>, seconds: f64) -> LoadSpec {
    LoadSpec {
        target: ([127, 0, 0, 1], port).into(),
        path: "/mcp".into(),
        tool: "add".into(),
        headers: format!("x-api-key: {BENCH_API_KEY}\r\n"),
        legacy: false,
        connections: 32,
        threads: 1,
        duration: Duration::from_secs_f64(seconds),
        warmup: Duration::from_millis(500),
        rate,
        mix: Mix::default(),
        connect: load::Connect::default(),
    }
}

fn run(quick: bool) -> (Vec<Row>, f64, usize, f64, Accuracy) {
    let up_port = free_port();
    let _upstream = Proc(demo_upstream(up_port));
    let redis_port = free_port();
    let _redis = redis_server(redis_port);
    let pid = std::process::id();
    let seconds = if quick { 1.0 } else { 3.0 };
    let rounds = if quick { 1 } else { 3 };

    // The `[kernel]` table of start_gateway ends with `enabled = false`: the tenant's lines
    // continue it (`default_tenant`).
    let (off_port, off, off_cfg) =
        start_gateway(up_port, "fleet-off", &tenant(1_000_000_000, None), "");
    let name = format!("bench{pid}");
    let (on_port, on, on_cfg) = start_gateway(
        up_port,
        "fleet-on",
        &tenant(1_000_000_000, Some((redis_port, &name))),
        "",
    );
    std::thread::sleep(Duration::from_millis(500));
    let gateways: [(&'static str, u16, &Proc); 2] =
        [("alone", off_port, &off), ("fleet (Redis)", on_port, &on)];
    let mut peaks: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (round + k) % 2;
            peaks[i].push(load::run(&spec(gateways[i].1, None, seconds)).rps());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let peak_off = median(&mut peaks[0].clone());
    let rate = (0.5 * peak_off).round().max(100.0);
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (round + k) % 2;
            let (_, port, proc_) = &gateways[i];
            let before = proc_.cpu_seconds();
            let r = load::run(&spec(*port, Some(rate), seconds));
            let cpu = proc_.cpu_seconds() - before;
            let p99 = r
                .latency
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(0.99) as f64);
            runs[i].push((cpu * 1e6 / r.ok.max(1) as f64, p99));
        }
    }
    let rows = gateways
        .iter()
        .zip(runs)
        .zip(peaks)
        .map(|(((mode, _, _), mut r), mut p)| {
            r.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (cpu_us, p99_us) = r[r.len() / 2];
            Row {
                mode,
                peak_rps: median(&mut p),
                cpu_us,
                cpu_range: (r[0].0, r[r.len() - 1].0),
                p99_us,
            }
        })
        .collect();
    drop((off, on));

    // Accuracy: three gateways of another fleet, limited to FLEET_RATE/s together.
    let name = format!("bench{pid}acc");
    let members: Vec<(u16, Proc, std::path::PathBuf)> = (0..3)
        .map(|i| {
            start_gateway(
                up_port,
                &format!("fleet-acc{i}"),
                &tenant(FLEET_RATE, Some((redis_port, &name))),
                "",
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let acc_seconds = if quick { 2.0 } else { 5.0 };
    let results: Vec<load::LoadResult> = std::thread::scope(|s| {
        let handles: Vec<_> = members
            .iter()
            .map(|(port, ..)| s.spawn(move || load::run(&spec(*port, None, acc_seconds))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread"))
            .collect()
    });
    let admitted: u64 = results.iter().map(|r| r.ok).sum();
    let refused: u64 = results.iter().map(|r| r.errors).sum();
    let elapsed = results
        .iter()
        .map(|r| r.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    for (_, _, cfg) in &members {
        let _ = std::fs::remove_file(cfg);
    }
    for cfg in [off_cfg, on_cfg] {
        let _ = std::fs::remove_file(cfg);
    }
    (
        rows,
        rate,
        rounds,
        seconds,
        Accuracy {
            admitted,
            seconds: elapsed,
            refused,
        },
    )
}

/// Runs the scenario and writes its report.
pub fn report(
    ledger: &mut crate::verdict::Ledger,
    quick: bool,
    env: &Environment,
    dir: &std::path::Path,
    suffix: &str,
) -> anyhow::Result<()> {
    let (rows, rate, rounds, seconds, acc) = run(quick);
    let base = rows
        .first()
        .map_or(1.0, |r| r.cpu_us.max(f64::MIN_POSITIVE));
    let mut md = format!(
        "# A fleet sharing state through Redis: cost and accuracy ({date})\n\n{env}\n\n\
         `tools/call add` through a gateway (1 worker, passthrough, kernel program off) to `mcp-upstream`, \
         a tenant rate that never refuses the load, 32 keep-alive connections; the same gateway alone and in a \
         fleet (`[state] redis`, redis-server on loopback, the rate drawn from leases). {rounds} interleaved \
         rounds of {seconds:.0} s: peak rps (closed loop), then CPU (user + system, /proc) per answered request \
         and p99 at {rate:.0} rps (half the lone gateway's peak), median round (range).\n\n\
         | gateway | peak rps | CPU µs / request | vs alone | p99 µs |\n|---|---|---|---|---|\n",
        date = env.date,
        env = env.markdown(),
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.0} | {:.1} ({:.1}–{:.1}) | {:+.1} % | {:.0} |\n",
            r.mode,
            r.peak_rps,
            r.cpu_us,
            r.cpu_range.0,
            r.cpu_range.1,
            (r.cpu_us / base - 1.0) * 100.0,
            r.p99_us
        ));
    }
    let expected = FLEET_RATE as f64 * acc.seconds;
    md.push_str(&format!(
        "\nAccuracy: three gateways of one fleet limited to {FLEET_RATE}/s together, each loaded closed-loop \
         (32 connections) at once for {:.1} s: {} admitted against {:.0} expected ({:+.1} %), {} refused.\n",
        acc.seconds,
        acc.admitted,
        expected,
        (acc.admitted as f64 / expected - 1.0) * 100.0,
        acc.refused,
    ));
    let json = serde_json::json!({
        "scenario": "fleet", "environment": env.json(), "rate": rate, "rounds": rounds, "seconds": seconds,
        "rows": rows.iter().map(|r| serde_json::json!({
            "mode": r.mode, "peak_rps": r.peak_rps, "cpu_us_per_request": r.cpu_us,
            "cpu_range": [r.cpu_range.0, r.cpu_range.1], "p99_us": r.p99_us,
        })).collect::<Vec<_>>(),
        "accuracy": {"fleet_rate": FLEET_RATE, "seconds": acc.seconds, "admitted": acc.admitted,
                     "expected": expected, "refused": acc.refused},
    });
    crate::write_report(
        ledger,
        dir,
        &format!("{}-fleet{suffix}", env.date),
        &md,
        &json,
    )
}
