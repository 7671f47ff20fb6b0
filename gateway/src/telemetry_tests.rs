use std::time::Duration;

use super::*;
use crate::stats::{Observation, Outcome, Recorder};

#[test]
fn colour_only_on_a_terminal_without_no_color() {
    use std::ffi::OsStr;
    assert!(colour(true, None));
    assert!(colour(true, Some(OsStr::new(""))));
    assert!(!colour(true, Some(OsStr::new("1"))));
    assert!(!colour(false, None));
}

#[test]
fn openmetrics_only_when_the_scraper_asks() {
    // Prometheus's own default Accept header.
    assert!(wants_openmetrics(Some(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )));
    assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
    assert!(!wants_openmetrics(Some(
        "application/openmetrics-text; q=0, text/plain"
    )));
    assert!(!wants_openmetrics(None));
}

#[test]
fn counters_lose_total_in_the_openmetrics_family_name() {
    let text =
        "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n";
    assert_eq!(
        to_openmetrics(text),
        "# HELP a A.\n# TYPE a counter\na_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n"
    );
}

fn observe(r: &mut Recorder, total_us: u64, upstream_us: u64, trace: Option<&str>) {
    r.record(&Observation {
        route: "/mcp",
        upstream: Some("u"),
        method: "tools/call",
        tool: Some("t"),
        tenant: "acme",
        outcome: Outcome::Ok,
        total: Duration::from_micros(total_us),
        upstream_wait: Some(Duration::from_micros(upstream_us)),
        trace_id: trace,
    });
}

#[test]
fn buckets_resolve_the_gateways_microseconds_and_carry_exemplars() {
    let mut r = Recorder::new(0, 10);
    // Gateway shares of 15 µs and 35 µs; one traced call of 2 s whose gateway share is 30 µs.
    for _ in 0..10 {
        observe(&mut r, 1_015, 1_000, None);
    }
    observe(&mut r, 1_035, 1_000, None);
    let slow = "4bf92f3577b34da6a3ce929d0e0e4736";
    observe(&mut r, 2_000_030, 2_000_000, Some(slow));
    // Not a trace id: no exemplar.
    observe(&mut r, 5_000_000, 4_999_000, Some("nope"));
    let mut agg = Aggregator::new(10, None);
    agg.add(r.take().unwrap());
    let mut classic = String::new();
    render_requests(&agg, &mut classic, false);
    let line = |text: &str, le: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "mcp_gateway_tool_latency_seconds_bucket{{tool=\"t\",kind=\"gateway\",le=\"{le}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no bucket {le} in\n{text}"))
            .to_owned()
    };
    assert!(line(&classic, "0.00001").ends_with("} 0"), "{classic}");
    assert!(line(&classic, "0.00002").ends_with("} 10"), "{classic}");
    assert!(line(&classic, "0.00005").ends_with("} 12"), "{classic}");
    assert!(line(&classic, "60").ends_with("} 13"), "{classic}");
    assert!(
        !classic.contains(" # {"),
        "no exemplars in the classic format"
    );
    let mut om = String::new();
    render_requests(&agg, &mut om, true);
    let b = line(&om, "0.00005");
    assert!(
        b.contains(&format!("}} 12 # {{trace_id=\"{slow}\"}} 0.00003 ")),
        "{b}"
    );
    let total = om
        .lines()
        .find(|l| l.contains("tool=\"t\",kind=\"total\",le=\"5\""))
        .unwrap();
    assert!(total.contains(slow), "{total}");
    assert!(!om.contains("nope"));
}
