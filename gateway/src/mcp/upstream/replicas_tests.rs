use super::*;

fn ejection() -> Ejection {
    Ejection {
        after_failures: 3,
        base: Duration::from_millis(100),
        max: Duration::from_millis(350),
    }
}

fn endpoints(n: u8) -> Vec<Arc<Endpoint>> {
    (1..=n)
        .map(|i| Arc::new(Endpoint::new(SocketAddr::from(([10, 0, 0, i], 80)))))
        .collect()
}

fn counter() -> impl FnMut() -> u64 {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn pick(eps: &[Arc<Endpoint>], now: u64, random: &mut dyn FnMut() -> u64) -> SocketAddr {
    Choice {
        endpoints: eps,
        avoid: &[],
    }
    .pick(now, &ejection(), random, &|_| 0)
    .unwrap()
    .addr
}

#[test]
fn the_balancer_spreads_over_every_healthy_endpoint_and_prefers_the_less_loaded() {
    let eps = endpoints(3);
    let mut random = counter();
    let mut seen = std::collections::HashMap::new();
    for _ in 0..300 {
        *seen.entry(pick(&eps, 1, &mut random)).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3);
    assert!(seen.values().all(|n| *n > 50), "{seen:?}");
    // Of two, the one with fewer requests in flight: the loaded one is never chosen.
    let loaded = eps[0].addr;
    for _ in 0..100 {
        let got = Choice {
            endpoints: &eps,
            avoid: &[],
        }
        .pick(1, &ejection(), &mut random, &|a| {
            usize::from(a == loaded) * 10
        })
        .unwrap();
        assert_ne!(got.addr, loaded);
    }
    // Endpoints already tried are avoided; none left: nothing.
    let all: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
    let c = Choice {
        endpoints: &eps,
        avoid: &all[..2],
    };
    assert_eq!(
        c.pick(1, &ejection(), &mut random, &|_| 0).unwrap().addr,
        all[2]
    );
    let c = Choice {
        endpoints: &eps,
        avoid: &all,
    };
    assert!(c.pick(1, &ejection(), &mut random, &|_| 0).is_none());
}

#[test]
fn consecutive_failures_eject_then_one_trial_brings_it_back_or_ejects_it_longer() {
    let e = ejection();
    let eps = endpoints(2);
    let bad = &eps[0];
    let mut random = counter();
    assert!(!bad.failed(10, &e, true) && !bad.failed(11, &e, true));
    bad.succeeded(12);
    assert!(
        !bad.failed(13, &e, true) && !bad.failed(14, &e, true),
        "a success resets the count"
    );
    assert!(bad.failed(15, &e, true), "the third in a row ejects");
    assert!(bad.ejected());
    assert_eq!(bad.ejections.load(Ordering::Relaxed), 1);
    for _ in 0..50 {
        assert_eq!(pick(&eps, 50, &mut random), eps[1].addr, "out of rotation");
    }
    // After the base time: exactly one trial, the others still avoid it.
    assert_eq!(pick(&eps, 116, &mut random), bad.addr, "the trial");
    for _ in 0..20 {
        assert_eq!(pick(&eps, 117, &mut random), eps[1].addr);
    }
    // The trial fails: ejected again, for twice as long.
    assert!(bad.failed(120, &e, true));
    assert_eq!(bad.ejections.load(Ordering::Relaxed), 2);
    assert_eq!(pick(&eps, 310, &mut random), eps[1].addr, "200 ms now");
    assert_eq!(pick(&eps, 321, &mut random), bad.addr, "the second trial");
    assert!(bad.failed(322, &e, true));
    assert_eq!(pick(&eps, 671, &mut random), eps[1].addr, "capped at max");
    assert_eq!(pick(&eps, 673, &mut random), bad.addr, "the third trial");
    assert!(bad.succeeded(680), "a passed trial puts it back");
    assert!(!bad.ejected());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        seen.insert(pick(&eps, 700, &mut random));
    }
    assert_eq!(seen.len(), 2, "back in rotation");
}

#[test]
fn a_trial_that_never_reports_is_given_again_later_and_failures_of_older_requests_do_not_extend() {
    let e = ejection();
    let eps = endpoints(2);
    let bad = &eps[0];
    for t in 0..3 {
        bad.failed(t, &e, true);
    }
    let until = bad.ejected_until.load(Ordering::Relaxed);
    // Late failures of requests sent before the ejection.
    assert!(!bad.failed(5, &e, true));
    assert_eq!(bad.ejected_until.load(Ordering::Relaxed), until);
    assert!(bad.claim_trial(until, e.base));
    assert!(!bad.claim_trial(until + 1, e.base), "one trial at a time");
    assert!(bad.claim_trial(until + 100, e.base), "unreported: another");
}

#[test]
fn with_every_endpoint_ejected_the_least_recently_failed_is_tried() {
    let e = ejection();
    let eps = endpoints(3);
    let mut random = counter();
    for (i, ep) in eps.iter().enumerate() {
        for t in 0..3 {
            ep.failed(1000 + (i as u64) * 10 + t, &e, true);
        }
    }
    assert!(eps.iter().all(|ep| ep.ejected()));
    assert_eq!(pick(&eps, 1050, &mut random), eps[0].addr);
    // A single endpoint is used whatever its state.
    let one = endpoints(1);
    for t in 0..3 {
        one[0].failed(t, &e, true);
    }
    assert_eq!(pick(&one, 10, &mut random), one[0].addr);
}

#[test]
fn sessions_stick_to_their_endpoint_and_a_lost_one_is_not_sent_elsewhere() {
    let source = |ip: &str| Addresses::resolve_now(ip, 80, Duration::ZERO).unwrap();
    let r = Replicas::new(vec![source("10.0.0.1"), source("10.0.0.2")], ejection());
    assert!(r.pins_sessions());
    let [a, b] = [r.endpoints()[0].addr, r.endpoints()[1].addr];
    r.bind(b"s-a", a);
    r.bind(b"s-b", b);
    assert!(matches!(r.sticky(None), Sticky::Any));
    assert!(matches!(r.sticky(Some(b"s-a")), Sticky::Pinned(e) if e.addr == a));
    assert!(matches!(r.sticky(Some(b"s-b")), Sticky::Pinned(e) if e.addr == b));
    assert!(matches!(r.sticky(Some(b"never")), Sticky::Lost), "no guess");
    for t in 0..3 {
        r.endpoints()[1].failed(t, &ejection(), true);
    }
    assert!(matches!(r.sticky(Some(b"s-b")), Sticky::Lost), "ejected");
    // A reload carries health and sessions over.
    let again = Replicas::new(vec![source("10.0.0.1"), source("10.0.0.2")], ejection());
    again.carry_over(&r);
    assert!(again.endpoints()[1].ejected());
    assert!(matches!(again.sticky(Some(b"s-a")), Sticky::Pinned(e) if e.addr == a));
    // A single address literal pins nothing.
    let fixed = Replicas::new(vec![source("10.0.0.1")], ejection());
    assert!(!fixed.pins_sessions());
    assert!(matches!(fixed.sticky(Some(b"s-a")), Sticky::Any));
}

#[test]
fn the_session_id_is_read_from_the_request_head_only() {
    let req = b"POST /mcp HTTP/1.1\r\nhost: x\r\nMcp-Session-Id:  abc \r\ncontent-length: 5\r\n\r\nmcp-session-id: body";
    assert_eq!(session_of(req), Some(&b"abc"[..]));
    let req = b"POST /mcp HTTP/1.1\r\nhost: x\r\n\r\nmcp-session-id: body";
    assert_eq!(session_of(req), None);
}

#[test]
fn the_last_endpoint_in_rotation_is_never_ejected_and_an_ended_session_is_forgotten() {
    let e = ejection();
    let eps = endpoints(2);
    for t in 0..3 {
        eps[0].failed(t, &e, true);
    }
    assert!(eps[0].ejected());
    // The other is the last one serving: however many failures, it stays.
    for t in 0..100 {
        assert!(!eps[1].failed(10 + t, &e, false));
    }
    assert!(!eps[1].ejected());
    assert_eq!(eps[1].ejections.load(Ordering::Relaxed), 0);
    let source = |ip: &str| Addresses::resolve_now(ip, 80, Duration::ZERO).unwrap();
    let r = Replicas::new(vec![source("10.0.0.1"), source("10.0.0.2")], e);
    let a = r.endpoints()[0].addr;
    r.bind(b"s", a);
    assert!(matches!(r.sticky(Some(b"s")), Sticky::Pinned(_)));
    r.forget(b"s");
    assert!(matches!(r.sticky(Some(b"s")), Sticky::Lost));
}

#[test]
fn an_id_two_endpoints_minted_goes_to_neither() {
    let source = |ip: &str| Addresses::resolve_now(ip, 80, Duration::ZERO).unwrap();
    let r = Replicas::new(vec![source("10.0.0.1"), source("10.0.0.2")], ejection());
    let [a, b] = [r.endpoints()[0].addr, r.endpoints()[1].addr];
    // Replicas counting their sessions from 1 both mint "1": the caller of A's "1" must not
    // be sent to B's (another caller's) session.
    r.bind(b"1", a);
    r.bind(b"1", a);
    assert!(matches!(r.sticky(Some(b"1")), Sticky::Pinned(e) if e.addr == a));
    r.bind(b"1", b);
    assert!(matches!(r.sticky(Some(b"1")), Sticky::Lost));
    // Nor does it become anybody's again: a later mint keeps it nobody's, a forget keeps it.
    r.bind(b"1", a);
    r.forget(b"1");
    assert!(matches!(r.sticky(Some(b"1")), Sticky::Lost));
    // Ids of any length cost the same.
    let long = vec![b'x'; 60_000];
    r.bind(&long, b);
    assert!(matches!(r.sticky(Some(&long)), Sticky::Pinned(e) if e.addr == b));
}

#[test]
fn only_failures_a_client_cannot_cause_count_against_a_replica() {
    let post = |body: &str| {
        format!(
            "POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    ] {
        assert!(says_of_replica(&post(body)), "{body}");
    }
    assert!(says_of_replica(b"GET /mcp HTTP/1.1\r\nhost: x\r\n\r\n"));
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"params":{{"pad":"{}"}},"method":"ping"}}"#,
        "x".repeat(20_000)
    );
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"x"}}"#,
        // What the gateway judged is what counts: a second key, a batch, an escape.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"p\u0069ng"}"#,
        big.as_str(),
    ] {
        assert!(!says_of_replica(&post(body)), "{body}");
    }
}
