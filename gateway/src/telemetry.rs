//! Logging setup and the Prometheus text exposition of what the control thread knows.

use std::fmt::Write as _;

use gateway_common::Verdict;

use crate::{
    kernel::KernelMaps,
    shared::Shared,
    stats::{Aggregator, BUCKETS_US, Dim, Exemplar},
};

/// Colour codes only for a person at a terminal: never into a file, a pipe or journald, and
/// never when `NO_COLOR` is set to anything (<https://no-color.org>).
pub fn colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

/// `RUST_LOG`-style filter (default `info`), optionally as JSON lines.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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
    crate::state::render_metrics(&shared.state, &mut out);
    crate::fleet::render_metrics(&shared.fleet, &shared.limits, &mut out);
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_workers_up Data-plane workers serving now (one per core).\n# TYPE mcp_gateway_workers_up gauge\nmcp_gateway_workers_up {}",
        shared.workers_up.len() - shared.workers_down().len()
    );
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_workers_stalled Data-plane workers serving whose loop has not turned for 5 s (a task that never yields: every connection of the worker waits; `/readyz` says not ready).\n# TYPE mcp_gateway_workers_stalled gauge\nmcp_gateway_workers_stalled {}",
        shared.workers_stalled(crate::shared::STALLED_AFTER).len()
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
    shared.refused_conns.render(&mut out);
    shared.spans.render(&mut out);
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
    render_endpoints(&shared.snapshot.load().config.upstreams, &mut out, label);
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
                .budget_key("tenant", &t.name, &t.name, b.window_s);
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
    log_drops(
        &mut out,
        "mcp_gateway_audit_dropped_total",
        "Audit records dropped: the writer fell behind (queue_full), or over the bound for refusals of callers no credential named (anonymous_refusal).",
        &shared.audit.load(),
    );
    if shared.access.load().enabled() {
        log_drops(
            &mut out,
            "mcp_gateway_access_log_dropped_total",
            "Access-log lines not written: the writer fell behind (queue_full), or over the bound for errors the gateway answered to callers no credential named (anonymous_refusal).",
            &shared.access.load(),
        );
    }
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
            "# HELP mcp_gateway_kernel_other_packets_total Packets the XDP program saw and judged by no tenant: passed as not the gateway's, or (`invalid`) dropped before their source is read."
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
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_kernel_tenant_new_connections_per_sec New connections per second the XDP program admits for the tenant (in a fleet, this host's share; 0: no limit)."
    );
    let _ = writeln!(
        out,
        "# TYPE mcp_gateway_kernel_tenant_new_connections_per_sec gauge"
    );
    for (id, name) in &tenants {
        let Ok(l) = maps.tenant_limits(*id) else {
            continue;
        };
        let rate = match l.conn_interval_ns {
            0 => 0.0,
            ns => 1e9 / ns as f64,
        };
        let _ = writeln!(
            out,
            "mcp_gateway_kernel_tenant_new_connections_per_sec{{tenant=\"{name}\"}} {rate}"
        );
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

/// A log's drops as counter `name`, by reason: its writer's queue full, or over its bound on
/// anonymous refusals.
fn log_drops<T: serde::Serialize + Send + 'static>(
    out: &mut String,
    name: &str,
    help: &str,
    log: &crate::policy::audit::AuditLog<T>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let queue_full = log.dropped.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(out, "{name}{{reason=\"queue_full\"}} {queue_full}");
    let anonymous = log.suppressed();
    let _ = writeln!(out, "{name}{{reason=\"anonymous_refusal\"}} {anonymous}");
}

/// `mcp_gateway_upstream_up{upstream}`: 0 when every request sent to the upstream over about
/// the last 10–20 s failed (no answer), 1 otherwise (an idle upstream counts as up: no news);
/// `mcp_gateway_upstream_failures_total{upstream}` counts the failed requests.
pub fn render_upstream_health(agg: &Aggregator, config: &crate::config::Config, out: &mut String) {
    let recent = agg.recent_upstreams();
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_upstream_up 0 while every recent request (last 10-20 s) to the upstream failed without an answer, else 1.\n# TYPE mcp_gateway_upstream_up gauge"
    );
    for u in &config.upstreams {
        let (n, failed) = recent.get(&u.name).copied().unwrap_or_default();
        let _ = writeln!(
            out,
            "mcp_gateway_upstream_up{{upstream=\"{}\"}} {}",
            label(&u.name),
            u8::from(n == 0 || failed < n)
        );
    }
    let _ = writeln!(
        out,
        "# HELP mcp_gateway_upstream_failures_total Requests the upstream failed: connect error, timeout or closed mid-answer.\n# TYPE mcp_gateway_upstream_failures_total counter"
    );
    for u in &config.upstreams {
        let failed = agg
            .series
            .get(&(Dim::Upstream, u.name.clone()))
            .map_or(0, |l| l.failures);
        let _ = writeln!(
            out,
            "mcp_gateway_upstream_failures_total{{upstream=\"{}\"}} {failed}",
            label(&u.name)
        );
    }
}

/// A bucket bound in seconds, as Prometheus writes it (`0.000001`, `60`).
fn seconds(us: u64) -> String {
    let s = format!("{:.6}", us as f64 / 1e6);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// ` # {trace_id="…"} value timestamp`: an OpenMetrics exemplar, or nothing.
fn exemplar(e: Option<&Exemplar>) -> String {
    let Some(e) = e else { return String::new() };
    let ts =
        e.at.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
    format!(
        " # {{trace_id=\"{}\"}} {} {ts:.3}",
        e.trace_id(),
        e.value_us as f64 / 1e6
    )
}

/// Whether the scraper asked for OpenMetrics (Prometheus does by default): exemplars are only
/// part of that format; everyone else gets the classic text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            params
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                && !params.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f64>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
    })
}

/// The classic text rewritten as OpenMetrics 1.0: a counter's family is named without its
/// `_total` suffix (its samples keep it), and the exposition ends with `# EOF`.
pub fn to_openmetrics(text: &str) -> String {
    let counters: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        let family = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
            .and_then(|rest| rest.split(' ').next());
        match family {
            Some(f) if counters.contains(f) && f.ends_with("_total") => {
                out.push_str(&line.replacen(f, &f[..f.len() - "_total".len()], 1));
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// Request counts and latency histograms, in the Prometheus text format; with `exemplars`, the
/// latest traced request of each bucket follows the bucket (OpenMetrics only).
pub fn render_requests(agg: &Aggregator, out: &mut String, exemplars: bool) {
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
    let bounds: Vec<String> = BUCKETS_US.iter().map(|b| seconds(*b)).collect();
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
            for (i, (kind, h)) in [
                ("total", &l.total),
                ("gateway", &l.gateway),
                ("upstream", &l.upstream),
            ]
            .into_iter()
            .enumerate()
            {
                let labels = format!("{}=\"{}\",kind=\"{kind}\"", dim.label(), label(series));
                let ex = |b: usize| {
                    if exemplars {
                        exemplar(l.exemplars[i][b].as_ref())
                    } else {
                        String::new()
                    }
                };
                for (b, (upper, le)) in BUCKETS_US.iter().zip(&bounds).enumerate() {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels},le=\"{le}\"}} {}{}",
                        h.count_between(0, *upper),
                        ex(b)
                    );
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{labels},le=\"+Inf\"}} {}{}",
                    h.len(),
                    ex(BUCKETS_US.len())
                );
                let sum = h.mean() * h.len() as f64 / 1e6;
                let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.len());
            }
        }
    }
}

/// `/metrics`: each endpoint of the HTTP upstreams that have replicas (or a host name), up
/// (1) or ejected (0), and its ejections so far.
fn render_endpoints(
    upstreams: &[crate::config::Upstream],
    out: &mut String,
    label: impl Fn(&str) -> String,
) {
    use std::fmt::Write as _;
    use std::sync::Arc;
    let rows: Vec<(&str, Arc<Vec<Arc<crate::endpoints::Endpoint>>>)> = upstreams
        .iter()
        .filter(|u| u.stdio.is_none() && u.replicas.pins_sessions())
        .map(|u| (u.name.as_str(), u.replicas.endpoints()))
        .collect();
    if rows.is_empty() {
        return;
    }
    for (metric, kind, help) in [
        (
            "mcp_gateway_upstream_endpoint_up",
            "gauge",
            "Endpoints (replicas) of an upstream: 1 in rotation, 0 ejected after failures.",
        ),
        (
            "mcp_gateway_upstream_endpoint_ejections_total",
            "counter",
            "Ejections of an upstream endpoint after consecutive failures.",
        ),
    ] {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (name, endpoints) in &rows {
            for e in endpoints.iter() {
                let v = if kind == "gauge" {
                    u64::from(!e.ejected())
                } else {
                    e.ejections.load(std::sync::atomic::Ordering::Relaxed)
                };
                let _ = writeln!(
                    out,
                    "{metric}{{upstream=\"{}\",endpoint=\"{}\"}} {v}",
                    label(name),
                    e.addr
                );
            }
        }
    }
}

#[cfg(test)]
#[path = "telemetry_tests.rs"]
mod tests;
