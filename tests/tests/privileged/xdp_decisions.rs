//! Every decision of the program, on crafted frames through `BPF_PROG_TEST_RUN`.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use gateway::kernel::KernelState;
use gateway_common::{GlobalCounter, TenantLimits, Verdict};
use integration_tests::{
    TestKernel, XDP_DROP, XDP_PASS,
    frames::{self, Flags},
};

const PORT: u16 = 8080;
const A: u32 = 1; // tenant of 198.18.1.0/24 and 2001:db8:a::/48
const B: u32 = 2; // tenant of 198.18.2.0/24
const DEFAULT: u32 = 7;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn limits(conn: (u64, u64), source: (u64, u64)) -> TenantLimits {
    let (ci, ct) = TenantLimits::gcra(conn.0, conn.1);
    let (si, st) = TenantLimits::gcra(source.0, source.1);
    TenantLimits {
        conn_interval_ns: ci,
        conn_tolerance_ns: ct,
        source_interval_ns: si,
        source_tolerance_ns: st,
    }
}

fn state() -> KernelState {
    KernelState {
        ports: [PORT].into(),
        tenant_nets: vec![
            ("198.18.1.0/24".parse().unwrap(), A),
            ("2001:db8:a::/48".parse().unwrap(), A),
            ("198.18.2.0/24".parse().unwrap(), B),
            // A longer prefix inside A's range belongs to B.
            ("198.18.1.128/25".parse().unwrap(), B),
        ],
        deny: vec![
            "198.18.9.0/24".parse().unwrap(),
            "2001:db8:dead::/48".parse().unwrap(),
        ],
        limits: vec![],
        capped: Default::default(),
        default_tenant: DEFAULT,
    }
}

fn packets(k: &TestKernel, tenant: u32, v: Verdict) -> u64 {
    k.maps().tenant_counters(tenant).unwrap().packets(v)
}

fn global(k: &TestKernel, c: GlobalCounter) -> u64 {
    k.maps()
        .global_counters()
        .unwrap()
        .into_iter()
        .find(|(g, _)| *g == c)
        .unwrap()
        .1
}

#[test]
fn classifies_v4_and_v6_by_longest_prefix_with_default() {
    let mut k = TestKernel::load(&state());
    for (src, tenant) in [
        ("198.18.1.5", A),
        ("198.18.1.200", B),
        ("198.18.2.1", B),
        ("2001:db8:a::5", A),
        ("198.18.7.7", DEFAULT),
        ("2001:db8:ffff::1", DEFAULT),
    ] {
        let before = packets(&k, tenant, Verdict::Passed);
        assert_eq!(
            k.run(&frames::tcp(ip(src), PORT, Flags::Syn)),
            XDP_PASS,
            "{src}"
        );
        assert_eq!(
            packets(&k, tenant, Verdict::Passed),
            before + 1,
            "{src} counted under tenant {tenant}"
        );
    }
}

#[test]
fn foreign_ports_and_other_protocols_pass_uncounted() {
    let mut k = TestKernel::load(&state());
    // Even a denied source passes on a port that is not the gateway's.
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.9.1"), 22, Flags::Syn)),
        XDP_PASS
    );
    assert_eq!(
        k.run(&frames::udp(Ipv4Addr::new(198, 18, 9, 1), PORT)),
        XDP_PASS
    );
    assert_eq!(global(&k, GlobalCounter::ForeignPort), 1);
    assert_eq!(global(&k, GlobalCounter::NotTcp), 1);
    assert_eq!(global(&k, GlobalCounter::Seen), 2);
    assert!(
        k.maps().all_counters().unwrap().is_empty(),
        "no tenant counter moved"
    );
}

#[test]
fn deny_list_drops_v4_and_v6_every_packet() {
    let mut k = TestKernel::load(&state());
    for src in ["198.18.9.1", "2001:db8:dead::9"] {
        for flags in [Flags::Syn, Flags::Ack] {
            assert_eq!(
                k.run(&frames::tcp(ip(src), PORT, flags)),
                XDP_DROP,
                "{src} {flags:?}"
            );
        }
    }
    assert_eq!(packets(&k, DEFAULT, Verdict::Denied), 4);
}

#[test]
fn ban_drops_until_it_expires_then_is_forgotten() {
    let mut k = TestKernel::load(&state());
    let mut maps = k.maps();
    maps.ban(ip("198.18.1.5"), Duration::from_secs(60)).unwrap();
    maps.ban(ip("2001:db8:a::5"), Duration::from_millis(150))
        .unwrap();
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.5"), PORT, Flags::Ack)),
        XDP_DROP
    );
    assert_eq!(
        k.run(&frames::tcp(ip("2001:db8:a::5"), PORT, Flags::Syn)),
        XDP_DROP
    );
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.6"), PORT, Flags::Syn)),
        XDP_PASS,
        "neighbour not banned"
    );
    assert_eq!(packets(&k, A, Verdict::Banned), 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        k.run(&frames::tcp(ip("2001:db8:a::5"), PORT, Flags::Syn)),
        XDP_PASS,
        "expired ban lifts"
    );
    let bans = maps.bans().unwrap();
    assert_eq!(
        bans.len(),
        1,
        "the kernel removed the expired entry: {bans:?}"
    );
    assert!(maps.unban(ip("198.18.1.5")).unwrap());
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.5"), PORT, Flags::Ack)),
        XDP_PASS
    );
}

#[test]
fn tenant_rate_limits_syns_only_and_refills() {
    let mut st = state();
    // 10 per second (100 ms a token), 3 at once.
    st.limits = vec![(A, limits((10, 3), (0, 0)))];
    let mut k = TestKernel::load(&st);
    let syn = |n: u8| frames::tcp(ip(&format!("198.18.1.{n}")), PORT, Flags::Syn);
    for n in 1..=3 {
        assert_eq!(k.run(&syn(n)), XDP_PASS, "within burst");
    }
    assert_eq!(k.run(&syn(4)), XDP_DROP, "over the tenant's rate");
    assert_eq!(packets(&k, A, Verdict::TenantRate), 1);
    // Established traffic and SYN-ACKs are never cut by connection limits.
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.4"), PORT, Flags::Ack)),
        XDP_PASS
    );
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.4"), PORT, Flags::SynAck)),
        XDP_PASS
    );
    // Another tenant is unaffected.
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.2.1"), PORT, Flags::Syn)),
        XDP_PASS
    );
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(
        k.run(&syn(5)),
        XDP_PASS,
        "one token back after one interval"
    );
    assert_eq!(k.run(&syn(6)), XDP_DROP, "and only one");
}

#[test]
fn source_rate_limits_each_source_separately() {
    let mut st = state();
    st.limits = vec![(A, limits((0, 0), (5, 2)))];
    let mut k = TestKernel::load(&st);
    let a1 = frames::tcp(ip("198.18.1.1"), PORT, Flags::Syn);
    assert_eq!(k.run(&a1), XDP_PASS);
    assert_eq!(k.run(&a1), XDP_PASS);
    assert_eq!(k.run(&a1), XDP_DROP, "third SYN of one source");
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.2"), PORT, Flags::Syn)),
        XDP_PASS,
        "another source of the tenant"
    );
    assert_eq!(
        k.run(&frames::tcp(ip("2001:db8:a::1"), PORT, Flags::Syn)),
        XDP_PASS,
        "an IPv6 source"
    );
    assert_eq!(packets(&k, A, Verdict::SourceRate), 1);
}

#[test]
fn source_over_its_limit_does_not_drain_the_tenant_bucket() {
    let mut st = state();
    st.limits = vec![(A, limits((1, 2), (1, 1)))];
    let mut k = TestKernel::load(&st);
    let a1 = frames::tcp(ip("198.18.1.1"), PORT, Flags::Syn);
    assert_eq!(k.run(&a1), XDP_PASS);
    for _ in 0..5 {
        assert_eq!(k.run(&a1), XDP_DROP);
    }
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.2"), PORT, Flags::Syn)),
        XDP_PASS,
        "tenant still has its second token"
    );
    assert_eq!(packets(&k, A, Verdict::SourceRate), 5);
    assert_eq!(packets(&k, A, Verdict::TenantRate), 0);
}

#[test]
fn over_cap_flag_refuses_new_connections_only() {
    let mut k = TestKernel::load(&state());
    let mut maps = k.maps();
    maps.set_over_cap(B, true).unwrap();
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.2.1"), PORT, Flags::Syn)),
        XDP_DROP
    );
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.2.1"), PORT, Flags::Ack)),
        XDP_PASS
    );
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.1"), PORT, Flags::Syn)),
        XDP_PASS,
        "tenant A not capped"
    );
    assert_eq!(packets(&k, B, Verdict::OverCap), 1);
    maps.set_over_cap(B, false).unwrap();
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.2.1"), PORT, Flags::Syn)),
        XDP_PASS
    );
}

#[test]
fn vlan_tags_ip_options_and_ipv6_extension_headers_are_seen_through() {
    let mut k = TestKernel::load(&state());
    let denied = frames::tcp(ip("198.18.9.1"), PORT, Flags::Syn);
    let cases = [
        ("802.1Q", frames::with_vlan(denied.clone(), 0x8100, 5)),
        (
            "QinQ",
            frames::with_vlan(frames::with_vlan(denied.clone(), 0x8100, 5), 0x88a8, 9),
        ),
        ("IPv4 options", frames::with_ipv4_options(denied.clone())),
        (
            "IPv4 first fragment",
            frames::as_ipv4_fragment(denied.clone(), 0),
        ),
        (
            "IPv6 hop-by-hop",
            frames::with_ipv6_ext(frames::tcp(ip("2001:db8:dead::1"), PORT, Flags::Syn), 0, 0),
        ),
        (
            "IPv6 dest options",
            frames::with_ipv6_ext(frames::tcp(ip("2001:db8:dead::1"), PORT, Flags::Syn), 60, 0),
        ),
        (
            "IPv6 first fragment",
            frames::with_ipv6_ext(frames::tcp(ip("2001:db8:dead::1"), PORT, Flags::Syn), 44, 0),
        ),
    ];
    for (what, frame) in &cases {
        assert_eq!(
            k.run(frame),
            XDP_DROP,
            "{what}: the denied source must be found"
        );
    }
    assert_eq!(packets(&k, DEFAULT, Verdict::Denied), cases.len() as u64);
}

#[test]
fn later_fragments_pass_and_are_counted() {
    let mut k = TestKernel::load(&state());
    let v4 = frames::as_ipv4_fragment(frames::tcp(ip("198.18.9.1"), PORT, Flags::Syn), 3);
    let v6 = frames::with_ipv6_ext(frames::tcp(ip("2001:db8:dead::1"), PORT, Flags::Syn), 44, 3);
    assert_eq!(k.run(&v4), XDP_PASS);
    assert_eq!(k.run(&v6), XDP_PASS);
    assert_eq!(global(&k, GlobalCounter::Fragment), 2);
}

#[test]
fn truncated_frames_never_crash_and_only_ours_are_dropped() {
    let mut k = TestKernel::load(&state());
    let syn = frames::tcp(ip("198.18.1.1"), PORT, Flags::Syn);
    let syn6 = frames::tcp(ip("2001:db8:a::1"), PORT, Flags::Syn);
    // Every cut of the v4 and v6 frames, from a bare Ethernet header to one byte short.
    for frame in [&syn, &syn6] {
        let l4 = if frame == &syn { 34 } else { 54 };
        for len in 14..frame.len() {
            let verdict = k.run(&frame[..len]);
            // Ports readable but flags cut: addressed to us, malformed, dropped. Anything
            // shorter cannot be judged and passes; with the flags present it is a normal SYN.
            let expect = if (l4 + 4..l4 + 14).contains(&len) {
                XDP_DROP
            } else {
                XDP_PASS
            };
            assert_eq!(verdict, expect, "cut at {len} of {}", frame.len());
        }
    }
    assert_eq!(packets(&k, A, Verdict::Malformed), 2 * 10);
    assert!(global(&k, GlobalCounter::Truncated) > 0);
    assert!(global(&k, GlobalCounter::NotIp) > 0);
    // An IPv4 header claiming IHL < 5 is not parsed further.
    let mut bad = syn.clone();
    bad[14] = 0x44;
    assert_eq!(k.run(&bad), XDP_PASS);
}

#[test]
fn reload_replaces_prefixes_without_losing_classification() {
    let mut k = TestKernel::load(&state());
    let mut st = state();
    st.tenant_nets.retain(|(_, t)| *t != B);
    st.tenant_nets.push(("198.18.2.0/23".parse().unwrap(), A));
    st.ports = [PORT, 9090].into();
    k.maps().sync(&st).unwrap();
    let before = packets(&k, A, Verdict::Passed);
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.3.1"), 9090, Flags::Syn)),
        XDP_PASS
    );
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.200"), PORT, Flags::Syn)),
        XDP_PASS
    );
    assert_eq!(
        packets(&k, A, Verdict::Passed),
        before + 2,
        "new prefix and new port, old /25 of B gone"
    );
    assert_eq!(
        k.maps().ports().unwrap().into_iter().collect::<Vec<_>>(),
        vec![PORT, 9090]
    );
}

/// The control thread keeps one handle and syncs it on every reload; that handle reads the
/// configuration arrays once and mirrors its own writes after that. Each sync must still
/// leave the maps (as another handle reads them) exactly as wanted: ports switched off and on
/// again, limits set and cleared, an over-cap flag raised through the same handle lowered
/// when its tenant loses its cap.
#[test]
fn repeated_syncs_through_one_handle_follow_each_change() {
    let mut k = TestKernel::load(&state());
    let mut maps = k.maps();
    let strict = limits((1, 1), (1, 1));
    let mut wider = state();
    wider.ports = [PORT, 9090].into();
    wider.limits = vec![(A, strict)];
    wider.capped = [B].into();

    maps.sync(&wider).unwrap();
    assert_eq!(ports(&k), vec![PORT, 9090]);
    assert_eq!(k.maps().tenant_limits(A).unwrap(), strict);
    maps.set_over_cap(B, true).unwrap();
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.2.1"), PORT, Flags::Syn)),
        XDP_DROP,
        "B is over its cap"
    );

    maps.sync(&state()).unwrap();
    assert_eq!(ports(&k), vec![PORT], "9090 switched off");
    assert_eq!(
        k.maps().tenant_limits(A).unwrap(),
        TenantLimits::default(),
        "A's limit cleared"
    );
    assert!(
        !k.maps().over_cap(B).unwrap(),
        "B has no cap any more: its flag is lowered"
    );
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.2.1"), PORT, Flags::Syn)),
        XDP_PASS
    );

    maps.sync(&wider).unwrap();
    assert_eq!(ports(&k), vec![PORT, 9090], "9090 switched on again");
    assert_eq!(k.maps().tenant_limits(A).unwrap(), strict);
}

fn ports(k: &TestKernel) -> Vec<u16> {
    k.maps().ports().unwrap().into_iter().collect()
}
