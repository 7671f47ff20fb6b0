use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_failed_or_empty_resolution_keeps_the_last_good_address() {
    let a = Addresses::new(
        "up.example",
        443,
        Duration::from_secs(30),
        vec![addr("192.0.2.1:443")],
    );
    assert!(a.apply("u", Ok(vec![addr("192.0.2.2:443"), addr("192.0.2.3:443")])));
    assert_eq!(a.first(), addr("192.0.2.2:443"));
    assert_eq!(a.all().len(), 2, "every address is kept");
    assert!(!a.apply("u", Err(std::io::ErrorKind::NotFound.into())));
    assert!(!a.apply("u", Ok(Vec::new())));
    assert_eq!(a.first(), addr("192.0.2.2:443"));
}

#[test]
fn address_literals_and_zero_intervals_are_never_resolved_again() {
    let far = Instant::now() + Duration::from_secs(3600);
    let literal = Addresses::new(
        "127.0.0.1",
        80,
        Duration::from_millis(1),
        vec![addr("127.0.0.1:80")],
    );
    assert!(!literal.start_if_due(far));
    let once = Addresses::new("localhost", 80, Duration::ZERO, vec![addr("127.0.0.1:80")]);
    assert!(!once.start_if_due(far));
    let every = Addresses::new(
        "localhost",
        80,
        Duration::from_millis(1),
        vec![addr("127.0.0.1:80")],
    );
    assert!(every.start_if_due(far));
    assert!(!every.start_if_due(far), "one resolution at a time");
}

#[test]
fn a_huge_dns_answer_is_cut_and_repeats_are_dropped() {
    let a = Addresses::new("up.example", 443, Duration::from_secs(30), Vec::new());
    let mut answer: Vec<SocketAddr> = (0..5000u32)
        .map(|i| SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 443)))
        .collect();
    answer.insert(1, answer[0]);
    assert!(a.apply("u", Ok(answer.clone())));
    let mut expected = answer;
    expected.remove(1);
    expected.truncate(MAX_ADDRESSES);
    assert_eq!(*a.all(), expected);
}
