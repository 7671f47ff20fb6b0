//! Counters of the upstream side, by upstream: connections opened (and how their TLS began),
//! handshakes that failed by reason, background resolutions. Written by the workers and the
//! control thread without locks; kept across reloads.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

#[derive(Default)]
pub struct Stats {
    /// (upstream, what, label) -> count.
    counts: papaya::HashMap<(String, &'static str, &'static str), AtomicU64>,
    /// Upstream connects that failed for want of a file descriptor (exported with the
    /// accepts that did, as `mcp_gateway_out_of_descriptors_total`).
    pub out_of_descriptors: AtomicU64,
}

/// Metric name and label name of each `what`, with its help text.
const METRICS: &[(&str, &str, &str, &str)] = &[
    (
        "connect",
        "mcp_gateway_upstream_connections_total",
        "tls",
        "Upstream connections opened, by how TLS began (none, full handshake, resumed).",
    ),
    (
        "tls_failure",
        "mcp_gateway_upstream_tls_failures_total",
        "reason",
        "TLS handshakes with an upstream that failed (each answered 502), by reason.",
    ),
    (
        "resolve",
        "mcp_gateway_upstream_resolutions_total",
        "result",
        "Background re-resolutions of upstream host names; a failed one keeps the last good address.",
    ),
];

impl Stats {
    pub fn bump(&self, upstream: &str, what: &'static str, label: &'static str) {
        let counts = self.counts.pin();
        let key = (upstream.to_owned(), what, label);
        match counts.get(&key) {
            Some(n) => n.fetch_add(1, Ordering::Relaxed),
            None => counts
                .get_or_insert_with(key, AtomicU64::default)
                .fetch_add(1, Ordering::Relaxed),
        };
    }

    /// One count (0 when never bumped).
    pub fn get(&self, upstream: &str, what: &'static str, label: &'static str) -> u64 {
        self.counts
            .pin()
            .get(&(upstream.to_owned(), what, label))
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// The Prometheus text of every counter (families with no sample are left out).
    pub fn render(&self, out: &mut String, label: impl Fn(&str) -> String) {
        let mut all: Vec<((String, &str, &str), u64)> = self
            .counts
            .pin()
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect();
        all.sort();
        for (what, metric, label_name, help) in METRICS {
            let mut family = all.iter().filter(|((_, w, _), _)| w == what).peekable();
            if family.peek().is_none() {
                continue;
            }
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for ((upstream, _, value), n) in family {
                let _ = writeln!(
                    out,
                    "{metric}{{upstream=\"{}\",{label_name}=\"{value}\"}} {n}",
                    label(upstream)
                );
            }
        }
    }
}
