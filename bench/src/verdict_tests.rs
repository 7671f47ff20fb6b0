use super::*;

fn result(ok: u64, errors: u64, missed: u64) -> LoadResult {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("h");
    for v in [30, 40, 50, 1000] {
        h.record(v).expect("record");
    }
    let mut r = LoadResult {
        ok,
        missed,
        elapsed: std::time::Duration::from_secs(1),
        latency: Some(h.clone()),
        service: Some(h),
        ..Default::default()
    };
    for _ in 0..errors {
        r.errors += 1;
        *r.error_kinds.entry("HTTP 502".into()).or_default() += 1;
    }
    r
}

#[test]
fn a_row_over_the_threshold_fails_the_run_loudly() {
    let mut l = Ledger::new(0.01);
    l.load_row("proxy", "clean", &result(1000, 5, 0), true, json!({}));
    assert_eq!(l.exit_code(), 0, "0.5 % is under 1 %");
    assert!(l.alarm().is_none());
    // 15 of 1,015 = 1.48 %: errors and missed count alike.
    l.load_row("proxy", "broken", &result(1000, 10, 5), true, json!({}));
    assert_eq!(l.exit_code(), EXIT_ERRORS);
    let alarm = l.alarm().expect("alarm");
    assert!(alarm.starts_with("BENCH FAILED"), "{alarm}");
    assert!(alarm.contains("proxy / broken: 1.48 % failed"), "{alarm}");
    assert!(!alarm.contains("clean"), "{alarm}");
}

#[test]
fn unchecked_rows_and_the_threshold_flag() {
    let mut l = Ledger::new(0.01);
    l.load_row("flood", "detached", &result(10, 90, 0), false, json!({}));
    assert_eq!(l.exit_code(), 0, "an unchecked row never fails the run");
    // A row that answered nothing at all has failed entirely.
    l.counts("stdio", "dead peer", 0, 0, true, json!({}));
    assert_eq!(l.exit_code(), EXIT_ERRORS);
    // A looser threshold lets 1.48 % pass.
    let mut l = Ledger::new(0.05);
    l.load_row("proxy", "x", &result(1000, 10, 5), true, json!({}));
    assert_eq!(l.exit_code(), 0);
}

#[test]
fn every_row_has_the_same_json_shape() {
    let mut l = Ledger::new(0.01);
    l.load_row(
        "headline",
        "through gateway",
        &result(1000, 1, 0),
        true,
        json!({"cpu_us_per_request": 12.5, "floor_cpu_ratio": 1.4}),
    );
    l.counts(
        "otlp",
        "no OTLP",
        500,
        0,
        true,
        json!({"cpu_us_per_request": 9.0}),
    );
    l.report(json!({"scenario": "headline"}));
    let v = l.json();
    assert_eq!(v["error_threshold"], json!(0.01));
    assert_eq!(v["passed"], json!(true));
    assert_eq!(v["reports"][0]["scenario"], json!("headline"));
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for r in rows {
        for key in [
            "scenario",
            "row",
            "ok",
            "failed",
            "failed_share",
            "checked",
            "over_threshold",
        ] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
    }
    let load = &rows[0];
    assert_eq!(load["p50_us"], json!(40));
    assert_eq!(load["uncorrected_p99_us"], json!(1000));
    assert_eq!(load["cpu_us_per_request"], json!(12.5));
    assert_eq!(load["error_kinds"]["HTTP 502"], json!(1));
    // The document round-trips through text (what `--json` prints).
    let text = serde_json::to_string(&v).expect("text");
    assert_eq!(serde_json::from_str::<Value>(&text).expect("parse"), v);
}
