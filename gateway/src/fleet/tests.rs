use super::*;

fn budget() -> Counted {
    Counted::Budget {
        scope: "tenant".into(),
        tenant: "a|b".into(),
        subject: "x".into(),
    }
}

#[test]
fn runs_fill_at_most_half_of_the_other_hosts_windows() {
    let run = Counted::Budget {
        scope: "run".into(),
        tenant: "a".into(),
        subject: "scope\":\"tenant".into(),
    };
    let is_run = |what: &Counted| {
        let field = window_field(what, 60, 1000).expect("field");
        parse_window_field(&field).expect("read back").what.is_run()
    };
    assert!(is_run(&run) && !is_run(&budget()));
    let half = BUDGET_SEEN / 2;
    assert!(room_for(half - 1, half - 1, true));
    assert!(!room_for(half, half, true), "runs hold their half");
    assert!(
        room_for(half, half, false),
        "a tenant's window still finds room"
    );
    assert!(!room_for(BUDGET_SEEN, 0, false));
}

#[test]
fn a_window_field_reads_back_and_a_malformed_one_does_not() {
    let wf = window_field(&budget(), 60, 1000).expect("field");
    assert_eq!(
        parse_window_field(&wf),
        Some(WindowField {
            end: 60_060,
            len_s: 60,
            window: 1000,
            what: budget()
        })
    );
    // The host comes after the last `|`, whatever the JSON holds.
    let field = format!("{wf}|host/gw/1/2");
    assert_eq!(split_host(&field), Some((wf.as_str(), "host/gw/1/2")));
    for bad in [
        "abc".to_owned(),
        "1|2|3".to_owned(),
        // An end that is not the window's.
        wf.replacen("60060", "99999999999", 1),
        "60060|0|1000|{}".to_owned(),
        format!(
            "60060|60|1000|{}",
            r#"{"kind":"refusals","source":"1.2.3.4"}"#
        ),
    ] {
        assert_eq!(parse_window_field(&bad), None, "{bad}");
    }
    assert_eq!(split_host("abc|"), None);
    assert_eq!(split_host("|h"), None);
}

#[test]
fn a_spend_reads_only_as_amount_and_sequence() {
    assert_eq!(parse_spend("5|17"), Some((5, 17)));
    for bad in ["abc", "5", "-1|3", "5|x", "5|3|1", "1e3|2", ""] {
        assert_eq!(parse_spend(bad), None, "{bad}");
    }
}

#[test]
fn a_sealed_spend_opens_only_under_its_field_and_the_secret() {
    let secret = FleetSecret([7; 32]);
    let field = "60060|60|1000|{}|h1";
    let raw = seal(Some(&secret), "f", "budgets", field, "5|17");
    assert_eq!(
        open(Some(&secret), "f", "budgets", field, &raw),
        Some("5|17")
    );
    // Moved to another host's field, another fleet, or changed: refused.
    assert_eq!(
        open(Some(&secret), "f", "budgets", "60060|60|1000|{}|h2", &raw),
        None
    );
    assert_eq!(open(Some(&secret), "g", "budgets", field, &raw), None);
    let lowered = raw.replace(":5|17", ":0|18");
    assert_eq!(open(Some(&secret), "f", "budgets", field, &lowered), None);
    // Bare, or under another secret: refused; without a secret, a bare value is taken.
    assert_eq!(open(Some(&secret), "f", "budgets", field, "5|17"), None);
    assert_eq!(
        open(Some(&FleetSecret([8; 32])), "f", "budgets", field, &raw),
        None
    );
    assert_eq!(open(None, "f", "budgets", field, "5|17"), Some("5|17"));
    // A host's member of the registry.
    let member = seal(Some(&secret), "f", "hosts", "", "h1");
    assert_eq!(open(Some(&secret), "f", "hosts", "", &member), Some("h1"));
    assert_eq!(open(Some(&secret), "f", "hosts", "", "h1"), None);
}

#[test]
fn an_ended_session_opens_only_sealed_for_this_fleet_and_cursors_read_as_stream_ids() {
    let secret = FleetSecret([7; 32]);
    let hex = format!("{:016x}", 0x0123_4567_89ab_cdefu64);
    let sealed = seal(Some(&secret), "f", "ended", "", &hex);
    assert_eq!(
        open(Some(&secret), "f", "ended", "", &sealed),
        Some(hex.as_str())
    );
    // Bare, of another fleet, or as another kind of value: refused.
    assert_eq!(open(Some(&secret), "f", "ended", "", &hex), None);
    assert_eq!(open(Some(&secret), "g", "ended", "", &sealed), None);
    let ban = seal(Some(&secret), "f", "bans", "", &hex);
    assert_eq!(open(Some(&secret), "f", "ended", "", &ban), None);
    for ok in ["0-0", "1732800000000-0", "1-17"] {
        assert!(is_stream_id(ok), "{ok}");
    }
    for bad in ["", "-", "1-", "-1", "1", "1-2-3", "a-1", "1-+2", "+1-2"] {
        assert!(!is_stream_id(bad), "{bad}");
    }
}

#[test]
fn a_cap_count_opens_only_under_its_cap_and_host_and_reads_only_as_digits() {
    let secret = FleetSecret([7; 32]);
    let field = cap_field("in-flight/tenant/a", "h1");
    let raw = seal(Some(&secret), "f", "caps", &field, "4");
    let read = |s: Option<&FleetSecret>, field: &str, raw: &str| {
        open(s, "f", "caps", field, raw).and_then(parse_count)
    };
    assert_eq!(read(Some(&secret), &field, &raw), Some(4));
    // Moved to another host or cap, lowered, bare, or of another kind: refused.
    assert_eq!(
        read(Some(&secret), &cap_field("in-flight/tenant/a", "h2"), &raw),
        None
    );
    assert_eq!(
        read(Some(&secret), &cap_field("connections/a", "h1"), &raw),
        None
    );
    assert_eq!(read(Some(&secret), &field, &raw.replace(":4", ":0")), None);
    assert_eq!(read(Some(&secret), &field, "0"), None);
    let spend = seal(Some(&secret), "f", "budgets", &field, "4");
    assert_eq!(read(Some(&secret), &field, &spend), None);
    // Without a secret: digits, at most a million.
    assert_eq!(read(None, &field, "17"), Some(17));
    for bad in [
        "",
        "-1",
        "+1",
        "1.5",
        "1e3",
        " 1",
        "x",
        "99999999999999999999",
        "1000001",
    ] {
        assert_eq!(read(None, &field, bad), None, "{bad}");
    }
    assert_eq!(read(None, &field, "1000000"), Some(1_000_000));
}

#[test]
fn replies_are_read_as_bytes_never_failing_on_what_is_not_utf8() {
    let v = redis::Value::BulkString(vec![0xff, b'a']);
    assert_eq!(bytes(&v), Some(&[0xff, b'a'][..]));
    assert_eq!(text(&v), None);
    assert_eq!(int(&redis::Value::Int(3)), Some(3));
    assert_eq!(int(&redis::Value::BulkString(b"12".to_vec())), Some(12));
    assert_eq!(int(&redis::Value::Nil), None);
}
