//! Every measured row of a run in one place: its JSON form (`--json` prints them all) and the
//! run's verdict. A row whose share of failed requests (errors, and in open loop requests not
//! answered in time) exceeds the threshold fails the run: a loud line and a non-zero exit, so a
//! figure measured against a broken peer is never mistaken for a result.
//!
//! Rows where failures are the point (a flood with the kernel program detached, an upstream
//! restarted under load) are recorded unchecked: counted, never failing the run.

use serde_json::{Value, json};

use crate::load::LoadResult;

/// The exit code of a run with a row over the threshold.
pub const EXIT_ERRORS: i32 = 3;

#[derive(Debug)]
pub struct Ledger {
    /// The largest share of failed requests a checked row may have (0.01: 1 %).
    pub threshold: f64,
    /// `--json`: the document goes to stdout, the Markdown reports to stderr.
    pub json_stdout: bool,
    rows: Vec<Value>,
    /// Each scenario's whole report, as written to bench/results/.
    reports: Vec<Value>,
    /// Each scenario's wall-clock time, in the order they ran.
    pub times: Vec<(String, std::time::Duration)>,
}

/// Failed requests (errors, and open-loop requests not answered in time) over all requests.
pub fn failed_share(ok: u64, errors: u64, missed: u64) -> f64 {
    let all = ok + errors + missed;
    if all == 0 {
        // Nothing answered and nothing sent: as failed as it gets.
        return 1.0;
    }
    (errors + missed) as f64 / all as f64
}

impl Ledger {
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            json_stdout: false,
            rows: Vec::new(),
            reports: Vec::new(),
            times: Vec::new(),
        }
    }

    /// One line of each scenario's wall-clock time and their sum, as the run ends.
    pub fn times_line(&self) -> String {
        let total: std::time::Duration = self.times.iter().map(|(_, d)| *d).sum();
        let each: Vec<String> = self
            .times
            .iter()
            .map(|(s, d)| format!("{s} {:.0} s", d.as_secs_f64()))
            .collect();
        format!(
            "scenarios took {}:{:02} ({})",
            total.as_secs() / 60,
            total.as_secs() % 60,
            each.join(", ")
        )
    }

    /// A row measured by the load generator; `extra` (an object) is merged into its JSON.
    pub fn load_row(
        &mut self,
        scenario: &str,
        row: &str,
        r: &LoadResult,
        checked: bool,
        extra: Value,
    ) {
        let q = |h: Option<&hdrhistogram::Histogram<u64>>, q: f64| {
            h.filter(|h| !h.is_empty()).map(|h| h.value_at_quantile(q))
        };
        let (h, u) = (r.latency.as_ref(), r.service.as_ref());
        let mut v = json!({
            "achieved_rps": r.rps(),
            "error_kinds": r.error_kinds,
            "missed": r.missed,
            "p50_us": q(h, 0.5), "p90_us": q(h, 0.9), "p99_us": q(h, 0.99), "p999_us": q(h, 0.999),
            "max_us": h.filter(|h| !h.is_empty()).map(hdrhistogram::Histogram::max),
            "uncorrected_p50_us": q(u, 0.5), "uncorrected_p99_us": q(u, 0.99),
            "clock_ticks": r.ticks.map(|t| t.ticks),
            "clock_late_p50_us": r.ticks.map(|t| t.late_p50_us),
            "clock_late_p99_us": r.ticks.map(|t| t.late_p99_us),
        });
        merge(&mut v, extra);
        self.counts(scenario, row, r.ok, r.errors + r.missed, checked, v);
    }

    /// A row known only by its counts; `extra` (an object) is merged into its JSON.
    pub fn counts(
        &mut self,
        scenario: &str,
        row: &str,
        ok: u64,
        failed: u64,
        checked: bool,
        extra: Value,
    ) {
        let share = failed_share(ok, failed, 0);
        let mut v = json!({
            "scenario": scenario, "row": row, "ok": ok, "failed": failed,
            "failed_share": share, "checked": checked,
            "over_threshold": checked && share > self.threshold,
        });
        merge(&mut v, extra);
        self.rows.push(v);
    }

    /// A scenario's whole report.
    pub fn report(&mut self, report: Value) {
        self.reports.push(report);
    }

    /// The checked rows whose share of failed requests exceeds the threshold.
    pub fn over(&self) -> Vec<&Value> {
        self.rows
            .iter()
            .filter(|r| r["over_threshold"] == Value::Bool(true))
            .collect()
    }

    /// 0, or [`EXIT_ERRORS`] when a checked row is over the threshold.
    pub fn exit_code(&self) -> i32 {
        if self.over().is_empty() {
            0
        } else {
            EXIT_ERRORS
        }
    }

    /// The loud line(s) for a failed run, if it failed.
    pub fn alarm(&self) -> Option<String> {
        let over = self.over();
        if over.is_empty() {
            return None;
        }
        let mut s = format!(
            "BENCH FAILED: {} row(s) over the error threshold of {:.2} % — their figures are not results:",
            over.len(),
            self.threshold * 100.0
        );
        for r in over {
            s.push_str(&format!(
                "\n  {} / {}: {:.2} % failed ({} ok, {} failed{})",
                r["scenario"].as_str().unwrap_or("?"),
                r["row"].as_str().unwrap_or("?"),
                r["failed_share"].as_f64().unwrap_or(1.0) * 100.0,
                r["ok"],
                r["failed"],
                r.get("error_kinds")
                    .filter(|k| k.as_object().is_some_and(|o| !o.is_empty()))
                    .map_or(String::new(), |k| format!(": {k}")),
            ));
        }
        Some(s)
    }

    /// The `--json` document: every row, the threshold, the verdict and the scenarios' reports.
    pub fn json(&self) -> Value {
        json!({
            "error_threshold": self.threshold,
            "passed": self.exit_code() == 0,
            "rows": self.rows,
            "reports": self.reports,
            "seconds": self.times.iter().map(|(s, d)| json!({"scenario": s, "seconds": d.as_secs_f64()})).collect::<Vec<_>>(),
        })
    }
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

#[cfg(test)]
#[path = "verdict_tests.rs"]
mod tests;
