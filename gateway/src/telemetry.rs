//! Logging setup and the Prometheus text exposition of what the control thread knows.

use std::fmt::Write as _;

use gateway_common::Verdict;

use crate::{
    kernel::KernelMaps,
    runtime::Shared,
    stats::{Aggregator, Dim},
};

/// `RUST_LOG`-style filter (default `info`), optionally as JSON lines.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Metrics in the Prometheus text format (version 0.0.4).
pub fn render_metrics(shared: &Shared, maps: Option<&KernelMaps>) -> String {
    let snap = shared.snapshot.load();
    let tenants: Vec<(u32, String)> = snap
        .config
        .tenants
        .iter()
        .map(|t| (t.id, label(&t.name)))
        .chain(
            snap.config
                .tenants
                .is_empty()
                .then(|| (snap.config.default_tenant, "default".to_owned())),
        )
        .collect();
    let mut out = String::new();
    crate::tls::render_metrics(&shared.tls, &mut out);
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_workers_up Data-plane workers serving now (one per core).\n# TYPE mcp_gateway_workers_up gauge\nmcp_gateway_workers_up {}",
        shared.workers_up.len() - shared.workers_down().len()
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_panics_total Connection tasks that panicked (answered 500 and closed; the worker lived on).\n# TYPE mcp_gateway_panics_total counter\nmcp_gateway_panics_total {}",
        shared.panics.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_worker_restarts_total Worker runtimes that panicked and were started again.\n# TYPE mcp_gateway_worker_restarts_total counter\nmcp_gateway_worker_restarts_total {}",
        shared
            .worker_restarts
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_open_files_limit The open-file limit the gateway runs with (raised to the hard limit at start).\n# TYPE mcp_gateway_open_files_limit gauge\nmcp_gateway_open_files_limit {}",
        shared
            .open_files_limit
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_out_of_descriptors_total Accepts and upstream connects that failed for want of a file descriptor.\n# TYPE mcp_gateway_out_of_descriptors_total counter\nmcp_gateway_out_of_descriptors_total {}",
        shared
            .out_of_descriptors
            .load(std::sync::atomic::Ordering::Relaxed)
            + shared
                .upstream_stats
                .out_of_descriptors
                .load(std::sync::atomic::Ordering::Relaxed)
    );
    shared.proxy_protocol.render(&mut out);
    let breakers = shared.breakers.states();
    if !breakers.is_empty() {
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_breaker_state Circuit breakers: 0 closed, 1 open, 2 half-open."
        );
        let _ = writeln!(out, "# TYPE mcp_gateway_breaker_state gauge");
        for (name, state) in breakers {
            let _ = writeln!(
                out,
                "mcp_gateway_breaker_state{{breaker=\"{}\"}} {state}",
                label(&name)
            );
        }
    }
    shared.upstream_stats.render(&mut out, label);
    let mut refusals: Vec<(String, u64)> = shared
        .refusals
        .pin()
        .iter()
        .map(|(k, v)| (k.clone(), v.load(std::sync::atomic::Ordering::Relaxed)))
        .collect();
    refusals.sort();
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_refusals_total Requests refused by policy, by the rule (configuration key) that decided."
    );
    let _ = writeln!(out, "# TYPE mcp_gateway_refusals_total counter");
    for (rule, n) in refusals {
        let _ = writeln!(
            out,
            "mcp_gateway_refusals_total{{rule=\"{}\"}} {n}",
            label(&rule)
        );
    }
    let budgets: Vec<(String, u64, u64)> = snap
        .policy
        .tenants
        .iter()
        .filter_map(|t| {
            let b = t.budget.as_ref()?;
            let limit = b.tenant?;
            let key = shared
                .limits
                .key(("budget", "tenant", t.name.as_str(), t.name.as_str()));
            Some((
                label(&t.name),
                shared.limits.left(key, b.window_s, limit),
                limit,
            ))
        })
        .collect();
    if !budgets.is_empty() {
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_tenant_budget_remaining Cost units left in the tenant's current budget window."
        );
        let _ = writeln!(out, "# TYPE mcp_gateway_tenant_budget_remaining gauge");
        for (tenant, left, _) in &budgets {
            let _ = writeln!(
                out,
                "mcp_gateway_tenant_budget_remaining{{tenant=\"{tenant}\"}} {left}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_audit_dropped_total Audit records dropped because the writer fell behind."
    );
    let _ = writeln!(out, "# TYPE mcp_gateway_audit_dropped_total counter");
    let _ = writeln!(
        out,
        "mcp_gateway_audit_dropped_total {}",
        shared
            .audit
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_connections Open client connections."
    );
    let _ = writeln!(out, "# TYPE mcp_gateway_connections gauge");
    for (id, name) in &tenants {
        let _ = writeln!(
            out,
            "mcp_gateway_connections{{tenant=\"{name}\"}} {}",
            shared.conns.total(*id)
        );
    }
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_tenant_at_connection_cap 1 while the tenant's new connections are refused for its cap."
    );
    let _ = writeln!(out, "# TYPE mcp_gateway_tenant_at_connection_cap gauge");
    for (id, name) in &tenants {
        let _ = writeln!(
            out,
            "mcp_gateway_tenant_at_connection_cap{{tenant=\"{name}\"}} {}",
            u8::from(shared.at_cap(*id))
        );
    }
    let Some(maps) = maps else { return out };
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_kernel_packets_total Packets to the gateway's ports judged by the XDP program."
    );
    let _ = writeln!(out, "# TYPE mcp_gateway_kernel_packets_total counter");
    let mut bytes = String::new();
    for (id, name) in &tenants {
        let Ok(c) = maps.tenant_counters(*id) else {
            continue;
        };
        for v in Verdict::ALL {
            let _ = writeln!(
                out,
                "mcp_gateway_kernel_packets_total{{tenant=\"{name}\",verdict=\"{}\"}} {}",
                v.name(),
                c.packets[v as usize]
            );
            let _ = writeln!(
                bytes,
                "mcp_gateway_kernel_bytes_total{{tenant=\"{name}\",verdict=\"{}\"}} {}",
                v.name(),
                c.bytes[v as usize]
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_kernel_bytes_total Bytes to the gateway's ports judged by the XDP program."
    );
    let _ = writeln!(out, "# TYPE mcp_gateway_kernel_bytes_total counter");
    out.push_str(&bytes);
    if let Ok(global) = maps.global_counters() {
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_kernel_other_packets_total Packets the XDP program saw and passed as not the gateway's."
        );
        let _ = writeln!(out, "# TYPE mcp_gateway_kernel_other_packets_total counter");
        for (c, v) in global {
            let _ = writeln!(
                out,
                "mcp_gateway_kernel_other_packets_total{{reason=\"{}\"}} {v}",
                c.name()
            );
        }
    }
    if let Ok(bans) = maps.bans() {
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_kernel_bans Addresses in the kernel's ban map."
        );
        let _ = writeln!(out, "# TYPE mcp_gateway_kernel_bans gauge");
        let _ = writeln!(
            out,
            "mcp_gateway_kernel_bans {}",
            bans.iter().filter(|b| !b.remaining.is_zero()).count()
        );
    }
    out
}

/// Upper bounds (seconds) of the latency histograms' Prometheus buckets.
const BUCKETS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Request counts and latency histograms, in the Prometheus text format.
pub fn render_requests(agg: &Aggregator, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_requests_total MCP requests by route, method, tool, tenant and outcome."
    );
    let _ = writeln!(out, "# TYPE mcp_gateway_requests_total counter");
    for (k, n) in &agg.counts {
        let _ = writeln!(
            out,
            "mcp_gateway_requests_total{{route=\"{}\",method=\"{}\",tool=\"{}\",tenant=\"{}\",outcome=\"{}\"}} {n}",
            label(&k.route),
            label(&k.method),
            label(&k.tool),
            label(&k.tenant),
            k.outcome.label()
        );
    }
    for dim in [Dim::Route, Dim::Upstream, Dim::Tool, Dim::Tenant] {
        let name = format!("mcp_gateway_{}_latency_seconds", dim.label());
        let _ = writeln!(
            out,
            "# HELP {name} Request latency per {d}: kind=\"total\" from request read to answer relayed, \"upstream\" from request sent to answer head, \"gateway\" the rest.",
            d = dim.label()
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ((d, series), l) in &agg.series {
            if *d != dim {
                continue;
            }
            for (kind, h) in [
                ("total", &l.total),
                ("gateway", &l.gateway),
                ("upstream", &l.upstream),
            ] {
                let labels = format!("{}=\"{}\",kind=\"{kind}\"", dim.label(), label(series));
                for le in BUCKETS_S {
                    let upper = (le * 1e6) as u64;
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels},le=\"{le}\"}} {}",
                        h.count_between(0, upper)
                    );
                }
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.len());
                let sum = h.mean() * h.len() as f64 / 1e6;
                let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.len());
            }
        }
    }
}

/// Opens one of the gateway's own log files (audit, histogram), creating it with mode 0640: the
/// owner is the user the gateway runs as (the service user), its group may read, others not.
/// `append` keeps what is there; otherwise the file starts empty.
pub fn open_log_file(path: &std::path::Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).mode(0o640);
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    options.open(path)
}
