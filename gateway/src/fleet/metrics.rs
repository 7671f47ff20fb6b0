//! The fleet agent's counters on `/metrics`.

use super::*;

/// `/metrics` lines of the fleet agent.
pub fn render_metrics(stats: &FleetStats, limits: &crate::policy::limits::State, out: &mut String) {
    use std::fmt::Write as _;
    if !stats.enabled.load(Relaxed) {
        return;
    }
    let fallback = limits.fleet_mode() == FLEET_FALLBACK;
    let lines: [(&str, &str, &str, String); 15] = [
        (
            "mcp_gateway_fleet_connected",
            "gauge",
            "1 while the fleet agent reaches Redis.",
            u64::from(stats.connected.load(Relaxed)).to_string(),
        ),
        (
            "mcp_gateway_fleet_fallback_active",
            "gauge",
            "1 while Redis is unreachable: rates at this host's share, budgets fail closed unless fleet_fail_open.",
            u64::from(fallback).to_string(),
        ),
        (
            "mcp_gateway_fleet_hosts_live",
            "gauge",
            "Gateways of the fleet alive at the last heartbeat (this one included).",
            stats.hosts.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_rounds_total",
            "counter",
            "Exchanges with Redis (lease round trips).",
            stats.rounds.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_round_seconds_total",
            "counter",
            "Time spent in exchanges with Redis.",
            format!("{:.6}", stats.round_us_total.load(Relaxed) as f64 / 1e6),
        ),
        (
            "mcp_gateway_fleet_round_failures_total",
            "counter",
            "Exchanges with Redis that failed.",
            stats.failures.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_tokens_granted_total",
            "counter",
            "Tokens of fleet-wide rates leased to this host.",
            format!(
                "{:.3}",
                stats.tokens_granted.load(Relaxed) as f64 / MILLI as f64
            ),
        ),
        (
            "mcp_gateway_fleet_leases",
            "gauge",
            "Fleet-wide rates this host holds a lease of.",
            stats.leases.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_bans_received_total",
            "counter",
            "Bans made by another gateway of the fleet, applied here.",
            stats.bans_received.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_approvals_received_total",
            "counter",
            "Tool approvals made by another gateway of the fleet, taken here.",
            stats.approvals_received.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_unsealed_ignored_total",
            "counter",
            "Values in Redis ignored here: not sealed with the fleet's secret, unreadable, older than one seen, or keys of the wrong type.",
            stats.unsealed_ignored.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_caps_shared",
            "gauge",
            "Concurrency caps (max_concurrent, max_connections) shared with the fleet.",
            stats.caps.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_in_flight_others",
            "gauge",
            "Requests in flight on the other gateways of the fleet under the caps shared (summed), as last read.",
            stats.in_flight_others.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_reseeds_total",
            "counter",
            "Times Redis had lost the fleet's state and was published again from here.",
            stats.reseeds.load(Relaxed).to_string(),
        ),
        (
            "mcp_gateway_fleet_session_key_conflicts_total",
            "counter",
            "Times Redis held another session key (or salt) than this gateway's: sessions opened here do not go on at the gateways that use it, nor theirs here.",
            stats.session_conflicts.load(Relaxed).to_string(),
        ),
    ];
    for (name, kind, help, value) in lines {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let name = "mcp_gateway_fleet_sessions_ended_total";
    let _ = writeln!(
        out,
        "# HELP {name} The gateway's own sessions ended by their client: sent to the fleet from here, or ended on another gateway and taken here.\n# TYPE {name} counter\n{name}{{direction=\"sent\"}} {}\n{name}{{direction=\"received\"}} {}",
        stats.sessions_ended_sent.load(Relaxed),
        stats.sessions_ended_received.load(Relaxed),
    );
}
