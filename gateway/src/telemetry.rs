//! Logging setup and the Prometheus text exposition of what the control thread knows.

use std::fmt::Write as _;

use gateway_common::Verdict;

use crate::{kernel::KernelMaps, runtime::Shared};

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
