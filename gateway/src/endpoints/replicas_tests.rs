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
fn sessions_stick_to_the_endpoint_signed_into_their_id_and_a_lost_one_is_not_sent_elsewhere() {
    let key = crate::session::new_key();
    let source = |ip: &str| Addresses::resolve_now(ip, 80, Duration::ZERO).unwrap();
    let r = Replicas::new(vec![source("10.0.0.1"), source("10.0.0.2")], ejection());
    assert!(r.pins_sessions());
    let eps = r.endpoints();
    let [a, b] = [eps[0].addr, eps[1].addr];
    // Replicas counting their sessions from 1 both mint "1": each caller keeps its own.
    let of_a = r.sign_session(&key, "up", &eps[0], b"1");
    let of_b = r.sign_session(&key, "up", &eps[1], b"1");
    assert_ne!(of_a, of_b);
    let pinned = |id: &[u8]| match r.open_session(&key, "up", Some(id)) {
        Sticky::Pinned(e, own) => Some((e.addr, own)),
        _ => None,
    };
    assert!(matches!(r.open_session(&key, "up", None), Sticky::Any));
    assert_eq!(pinned(&of_a), Some((a, b"1".to_vec())));
    assert_eq!(pinned(&of_b), Some((b, b"1".to_vec())));
    // The endpoint is not shown: the id is the upstream's and a tag.
    let shown = String::from_utf8(of_a.clone()).unwrap();
    assert!(
        !shown.contains("10.0.0.1") && shown.starts_with("1."),
        "{shown}"
    );
    // Unsigned, altered, another upstream's or another key's: no guess.
    assert!(matches!(
        r.open_session(&key, "up", Some(b"1")),
        Sticky::Lost
    ));
    let mut altered = of_a.clone();
    *altered.last_mut().unwrap() ^= 1;
    assert!(matches!(
        r.open_session(&key, "up", Some(&altered)),
        Sticky::Lost
    ));
    assert!(matches!(
        r.open_session(&key, "other", Some(&of_a)),
        Sticky::Lost
    ));
    let other_key = crate::session::new_key();
    assert!(matches!(
        r.open_session(&other_key, "up", Some(&of_a)),
        Sticky::Lost
    ));
    for t in 0..3 {
        eps[1].failed(t, &ejection(), true);
    }
    assert!(
        matches!(r.open_session(&key, "up", Some(&of_b)), Sticky::Lost),
        "ejected"
    );
    // Another configuration (a reload, a new process, another gateway with the key) reads the
    // same ids; an endpoint no longer listed loses its sessions.
    let again = Replicas::new(vec![source("10.0.0.2"), source("10.0.0.1")], ejection());
    assert!(
        matches!(again.open_session(&key, "up", Some(&of_a)), Sticky::Pinned(e, _) if e.addr == a)
    );
    let gone = Replicas::new(vec![source("10.0.0.2"), source("10.0.0.3")], ejection());
    assert!(matches!(
        gone.open_session(&key, "up", Some(&of_a)),
        Sticky::Lost
    ));
    // A single address literal signs nothing and pins nothing.
    let fixed = Replicas::new(vec![source("10.0.0.1")], ejection());
    assert!(!fixed.pins_sessions());
    assert!(matches!(
        fixed.open_session(&key, "up", Some(b"1")),
        Sticky::Any
    ));
}

#[test]
fn the_last_endpoint_in_rotation_is_never_ejected() {
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
}
