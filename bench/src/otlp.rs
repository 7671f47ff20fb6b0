//! Scenario `otlp`: what span export costs. One upstream (`mcp-upstream`), three gateways in the
//! same run (no OTLP; OTLP at 1 %; at 100 %) exporting to a sink collector on loopback, each
//! offered the same open-loop rate (half the no-OTLP gateway's peak), in interleaved rounds
//! (each starting with another gateway):
//! the gateway process's CPU per request, the median round reported.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use integration_tests::peers::{demo_upstream, free_port};

use crate::{
    load::{self, LoadSpec, Mix},
    proxy::{BENCH_API_KEY, Proc, start_gateway},
};

pub struct Row {
    pub mode: &'static str,
    /// Gateway CPU µs per answered request: the median round, and the range.
    pub cpu_us: f64,
    pub cpu_range: (f64, f64),
    pub ok: u64,
    pub errors: u64,
    pub p99_us: f64,
}

pub struct Report {
    pub rate: f64,
    pub rounds: usize,
    pub seconds: f64,
    pub rows: Vec<Row>,
    /// Export requests the sink received, and their bytes.
    pub exports: u64,
    pub export_bytes: u64,
}

/// An OTLP/HTTP collector that reads every request and answers 200 without decoding.
fn sink() -> (u16, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
    let port = listener.local_addr().expect("sink address").port();
    let (posts, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (p, b) = (Arc::clone(&posts), Arc::clone(&bytes));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (p, b) = (Arc::clone(&p), Arc::clone(&b));
            std::thread::spawn(move || {
                let Ok(mut w) = conn.try_clone() else { return };
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    p.fetch_add(1, Ordering::Relaxed);
                    b.fetch_add(len as u64, Ordering::Relaxed);
                    if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, posts, bytes)
}

pub fn run(quick: bool) -> Report {
    let up_port = free_port();
    let _upstream = Proc(demo_upstream(up_port));
    let (sink_port, posts, bytes) = sink();
    let otlp = |ratio: f64| {
        format!(
            "[telemetry.otlp]\nendpoint = \"http://127.0.0.1:{sink_port}/v1/traces\"\nsample_ratio = {ratio}\n"
        )
    };
    let (off_port, off, off_cfg) = start_gateway(up_port, "otlp-off", "", "");
    let (one_port, one, one_cfg) = start_gateway(up_port, "otlp-1", &otlp(0.01), "");
    let (all_port, all, all_cfg) = start_gateway(up_port, "otlp-100", &otlp(1.0), "");
    let seconds = if quick { 1.0 } else { 3.0 };
    let rounds = if quick { 1 } else { 3 };
    let spec = |port: u16, rate: Option<f64>| LoadSpec {
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
    };
    // The rate: half the peak without OTLP, so every gateway has headroom and CPU per request
    // compares like with like.
    let peak = load::run(&spec(off_port, None)).rps();
    let rate = (0.5 * peak).round().max(100.0);
    let gateways: [(&'static str, u16, &Proc); 3] = [
        ("no OTLP", off_port, &off),
        ("OTLP, 1 % sampled", one_port, &one),
        ("OTLP, 100 % sampled", all_port, &all),
    ];
    let mut runs: Vec<Vec<(f64, u64, u64, f64)>> = vec![Vec::new(); gateways.len()];
    for round in 0..rounds {
        // Each round starts with another gateway, so a drift of this shared machine within a
        // round does not always favour the same one.
        for k in 0..gateways.len() {
            let i = (round + k) % gateways.len();
            let (_, port, proc_) = &gateways[i];
            let before = proc_.cpu_seconds();
            let r = load::run(&spec(*port, Some(rate)));
            let cpu = proc_.cpu_seconds() - before;
            let p99 = r
                .latency
                .as_ref()
                .map_or(0.0, |h| h.value_at_quantile(0.99) as f64);
            // The CPU of the warm-up is counted too; it is the same share for every gateway.
            runs[i].push((cpu * 1e6 / r.ok.max(1) as f64, r.ok, r.errors, p99));
        }
    }
    let rows = gateways
        .iter()
        .zip(runs)
        .map(|((mode, _, _), mut r)| {
            r.sort_by(|a, b| a.0.total_cmp(&b.0));
            let range = (r[0].0, r[r.len() - 1].0);
            let (cpu_us, ok, errors, p99_us) = r[r.len() / 2];
            Row {
                mode,
                cpu_us,
                cpu_range: range,
                ok,
                errors,
                p99_us,
            }
        })
        .collect();
    // One more export round for the last spans.
    std::thread::sleep(Duration::from_millis(700));
    for cfg in [off_cfg, one_cfg, all_cfg] {
        let _ = std::fs::remove_file(cfg);
    }
    Report {
        rate,
        rounds,
        seconds,
        rows,
        exports: posts.load(Ordering::Relaxed),
        export_bytes: bytes.load(Ordering::Relaxed),
    }
}
