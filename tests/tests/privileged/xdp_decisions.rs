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
fn ban_drops_until_it_expires_then_is_swept() {
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
    // The program leaves an expired entry to user space (it could be a ban renewed since it
    // read it); the sweep removes it.
    assert_eq!(maps.bans().unwrap().len(), 2);
    assert_eq!(maps.sweep_bans().unwrap(), 1);
    let bans = maps.bans().unwrap();
    assert_eq!(bans.len(), 1, "{bans:?}");
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

/// An IPv6 frame's TCP header behind `n` destination-options headers.
fn behind_options(src: &str, n: usize) -> Vec<u8> {
    let mut frame = frames::tcp(ip(src), PORT, Flags::Syn);
    for _ in 0..n {
        frame = frames::with_ipv6_ext(frame, 60, 0);
    }
    frame
}

/// `frame` (IPv6) with an authentication header (IPsec AH, 12 bytes) before its payload.
fn with_ah(mut frame: Vec<u8>) -> Vec<u8> {
    let next = frame[14 + 6];
    frame.splice(54..54, [next, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
    frame[14 + 6] = 51;
    let plen = u16::from_be_bytes([frame[18], frame[19]]) + 12;
    frame[18..20].copy_from_slice(&plen.to_be_bytes());
    frame
}

/// The stack walks any number of extension headers to the TCP header. Before, a chain longer
/// than the program read (four) passed as "not TCP": past the deny list, bans and SYN limits.
#[test]
fn an_ipv6_chain_longer_than_the_program_reads_is_dropped_not_passed_unjudged() {
    let mut k = TestKernel::load(&state());
    // Six, the longest RFC 8200's order has, are read through.
    assert_eq!(k.run(&behind_options("2001:db8:dead::1", 6)), XDP_DROP);
    assert_eq!(packets(&k, DEFAULT, Verdict::Denied), 1);
    assert_eq!(k.run(&behind_options("2001:db8:a::1", 6)), XDP_PASS);
    assert_eq!(packets(&k, A, Verdict::Passed), 1);
    // Seven: the port cannot be read, so the packet is judged by its source and dropped.
    assert_eq!(k.run(&behind_options("2001:db8:dead::1", 7)), XDP_DROP);
    assert_eq!(packets(&k, DEFAULT, Verdict::Denied), 2);
    assert_eq!(k.run(&behind_options("2001:db8:a::1", 7)), XDP_DROP);
    assert_eq!(packets(&k, A, Verdict::Malformed), 1);
    assert_eq!(packets(&k, A, Verdict::Passed), 1);
    // An authentication header is read through too.
    let ah = with_ah(frames::tcp(ip("2001:db8:dead::1"), PORT, Flags::Syn));
    assert_eq!(k.run(&ah), XDP_DROP);
    assert_eq!(k.run(&frames::with_ipv6_ext(ah, 60, 0)), XDP_DROP);
    assert_eq!(packets(&k, DEFAULT, Verdict::Denied), 4);
    // A chain that ends in something else than TCP (here "no next header") is not ours.
    let mut none = behind_options("2001:db8:dead::1", 2);
    none[54 + 8] = 59;
    assert_eq!(k.run(&none), XDP_PASS);
    assert_eq!(global(&k, GlobalCounter::NotTcp), 1);
}

/// The stack strips VLAN tags with ID 0 in any number and order on a device with no VLAN of
/// its own. Found by an attacker's review: `0x8100, 0x88a8`, two `0x88a8` or three tags passed as
/// "not IP", and a banned source's connection was served.
#[test]
fn vlan_tags_in_any_order_are_seen_through_and_more_than_four_are_dropped() {
    let mut k = TestKernel::load(&state());
    // Outermost tag first.
    let tagged = |src: &str, tpids: &[u16]| {
        tpids
            .iter()
            .rev()
            .fold(frames::tcp(ip(src), PORT, Flags::Syn), |frame, tpid| {
                frames::with_vlan(frame, *tpid, 0)
            })
    };
    let orders: [&[u16]; 4] = [
        &[0x8100, 0x88a8],
        &[0x88a8, 0x88a8],
        &[0x8100, 0x8100, 0x8100],
        &[0x8100, 0x88a8, 0x8100, 0x88a8],
    ];
    for tpids in orders {
        assert_eq!(k.run(&tagged("198.18.9.1", tpids)), XDP_DROP, "{tpids:x?}");
        assert_eq!(
            k.run(&tagged("2001:db8:dead::1", tpids)),
            XDP_DROP,
            "{tpids:x?}"
        );
        assert_eq!(k.run(&tagged("198.18.1.1", tpids)), XDP_PASS, "{tpids:x?}");
    }
    assert_eq!(packets(&k, DEFAULT, Verdict::Denied), 8);
    assert_eq!(packets(&k, A, Verdict::Passed), 4);
    // Five: what is inside is not read, and the frame is dropped whoever sent it.
    assert_eq!(k.run(&tagged("198.18.1.1", &[0x8100; 5])), XDP_DROP);
    assert_eq!(global(&k, GlobalCounter::Invalid), 1);
    assert_eq!(packets(&k, A, Verdict::Passed), 4);
}

/// `frame` (IPv4, TCP from byte 34) cut to `tcp_bytes` of its TCP header, as the first
/// fragment of more, and padded with zeros to Ethernet's 60 bytes.
fn tiny_first_fragment_v4(frame: Vec<u8>, tcp_bytes: usize) -> Vec<u8> {
    let mut frame = frames::as_ipv4_fragment(frame, 0);
    frame.truncate(34 + tcp_bytes);
    let total = u16::try_from(20 + tcp_bytes).unwrap();
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    frame.resize(frame.len().max(60), 0);
    frame
}

/// A first fragment with less than a whole TCP header leaves the flags to a later fragment,
/// which passes unjudged, and the stack reassembles a SYN. Found by an attacker's review: with
/// Ethernet's padding after 8 bytes of TCP, the program read the flags from the padding (0:
/// not a SYN) and passed the fragment, past the SYN limits and the at-cap flag.
#[test]
fn a_first_fragment_without_a_whole_tcp_header_is_dropped_and_padding_is_never_read() {
    let mut st = state();
    st.limits = vec![(A, limits((0, 0), (1, 1)))];
    let mut k = TestKernel::load(&st);
    let syn = frames::tcp(ip("198.18.1.1"), PORT, Flags::Syn);
    for tcp_bytes in [8, 16] {
        assert_eq!(
            k.run(&tiny_first_fragment_v4(syn.clone(), tcp_bytes)),
            XDP_DROP,
            "{tcp_bytes} bytes of TCP"
        );
    }
    // The same in IPv6.
    let mut v6 = frames::with_ipv6_ext(frames::tcp(ip("2001:db8:a::1"), PORT, Flags::Syn), 44, 0);
    v6.truncate(14 + 40 + 8 + 8);
    v6[18..20].copy_from_slice(&16u16.to_be_bytes());
    assert_eq!(k.run(&v6), XDP_DROP);
    assert_eq!(packets(&k, A, Verdict::Malformed), 3);
    // An IPv4 packet (not a fragment) whose total length ends inside the TCP header: its flags
    // are not read from what follows it.
    let mut cut = syn.clone();
    cut.truncate(34 + 8);
    cut[16..18].copy_from_slice(&28u16.to_be_bytes());
    cut.resize(60, 0);
    assert_eq!(k.run(&cut), XDP_DROP);
    assert_eq!(packets(&k, A, Verdict::Malformed), 4);
    // A whole SYN with padding after it, and a first fragment holding the whole header, are
    // judged as SYNs: the first admitted, the second over the source's limit.
    let mut padded = syn.clone();
    padded.resize(syn.len() + 6, 0);
    assert_eq!(k.run(&padded), XDP_PASS);
    assert_eq!(k.run(&frames::as_ipv4_fragment(syn, 0)), XDP_DROP);
    assert_eq!(packets(&k, A, Verdict::SourceRate), 1);
}

/// A first fragment whose extension headers are cut before the TCP header: the rest of the
/// chain, and the SYN, come with the next fragment (which passes unjudged), and the stack
/// reassembles them. Found by a second review: the program passed it as "not IP", and 200 SYNs
/// of one source smuggled so got 200 SYN-ACKs where its limit let one through.
#[test]
fn a_first_fragment_whose_extension_headers_are_cut_is_dropped() {
    let mut k = TestKernel::load(&state());
    // Fragment header (offset 0, more to come), then destination options that say more
    // destination options follow, and the payload ends there.
    let cut = |src: &str, fragment: bool| {
        let syn = frames::tcp(ip(src), PORT, Flags::Syn);
        let mut f = frames::with_ipv6_ext(syn, 60, 0);
        let opts = if fragment {
            f = frames::with_ipv6_ext(f, 44, 0);
            62
        } else {
            54
        };
        f[opts] = 60;
        f.truncate(opts + 8);
        let payload = u16::try_from(opts + 8 - 54).unwrap();
        f[18..20].copy_from_slice(&payload.to_be_bytes());
        f
    };
    assert_eq!(k.run(&cut("2001:db8:a::1", true)), XDP_DROP);
    assert_eq!(packets(&k, A, Verdict::Malformed), 1);
    assert_eq!(k.run(&cut("2001:db8:dead::1", true)), XDP_DROP);
    assert_eq!(packets(&k, DEFAULT, Verdict::Denied), 1);
    // With padding after the payload, the chain is not read on into the padding.
    let mut padded = cut("2001:db8:a::1", true);
    padded.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(k.run(&padded), XDP_DROP);
    assert_eq!(packets(&k, A, Verdict::Malformed), 2);
    // Not a fragment: the stack cannot have the rest either, and it passes as before.
    assert_eq!(k.run(&cut("2001:db8:a::1", false)), XDP_PASS);
}

/// No host sends IPv6 from an IPv4-mapped address (the stack refuses TCP from one). Found by an
/// attacker's review: such a SYN was charged to the IPv4 address's bucket and tenant, so a
/// spoofer could spend an IPv4 client's new connections from IPv6.
#[test]
fn ipv6_from_an_ipv4_mapped_source_is_dropped_and_charged_to_no_one() {
    let mut st = state();
    st.limits = vec![(A, limits((0, 0), (1, 1)))];
    let mut k = TestKernel::load(&st);
    let mapped = frames::tcp(ip("::ffff:198.18.1.5"), PORT, Flags::Syn);
    assert_eq!(k.run(&mapped), XDP_DROP);
    assert_eq!(global(&k, GlobalCounter::Invalid), 1);
    assert!(
        k.maps().all_counters().unwrap().is_empty(),
        "no tenant counted"
    );
    // The IPv4 client's own SYN is still its first.
    assert_eq!(
        k.run(&frames::tcp(ip("198.18.1.5"), PORT, Flags::Syn)),
        XDP_PASS
    );
}

/// One host is given a /64 and may send from any address in it. Found by an attacker's review:
/// six addresses of one /64 each had their own bucket.
#[test]
fn an_ipv6_source_is_limited_by_its_64() {
    let mut st = state();
    st.limits = vec![(A, limits((0, 0), (1, 1)))];
    let mut k = TestKernel::load(&st);
    let syn = |src: &str| frames::tcp(ip(src), PORT, Flags::Syn);
    assert_eq!(k.run(&syn("2001:db8:a::1")), XDP_PASS);
    assert_eq!(k.run(&syn("2001:db8:a::2")), XDP_DROP);
    assert_eq!(k.run(&syn("2001:db8:a:0:ffff:ffff:ffff:ffff")), XDP_DROP);
    assert_eq!(k.run(&syn("2001:db8:a:1::1")), XDP_PASS, "another /64");
    assert_eq!(packets(&k, A, Verdict::SourceRate), 2);
    // IPv4 sources stay one address each.
    assert_eq!(k.run(&syn("198.18.1.1")), XDP_PASS);
    assert_eq!(k.run(&syn("198.18.1.2")), XDP_PASS);
}

/// Where a /64 is not one client's (`gateway_common::SHARED_V6`: NAT64, Teredo, link-local,
/// `::/64`) a source is its address, as the workers' per-source counts and auto-bans take it:
/// IPv4 clients behind a NAT64 translator, one /64, shared one bucket here.
#[test]
fn where_a_64_is_not_one_clients_a_source_is_its_address() {
    let mut st = state();
    // Unclassified: the default tenant's.
    st.limits = vec![(DEFAULT, limits((0, 0), (1, 1)))];
    let mut k = TestKernel::load(&st);
    let syn = |src: &str| frames::tcp(ip(src), PORT, Flags::Syn);
    for (a, b) in [
        ("64:ff9b::c612:101", "64:ff9b::c612:102"),
        ("64:ff9b:1::1", "64:ff9b:1::2"),
        ("2001:0:4136:e378::1", "2001:0:4136:e378::2"),
        ("fe80::1", "fe80::2"),
        ("::2", "::3"),
    ] {
        assert_eq!(k.run(&syn(a)), XDP_PASS, "{a}");
        assert_eq!(k.run(&syn(a)), XDP_DROP, "{a} again");
        assert_eq!(k.run(&syn(b)), XDP_PASS, "{b}: another client");
    }
    // Beside them, a /64 is one source.
    assert_eq!(k.run(&syn("64:ff9b:0:0:1::1")), XDP_PASS);
    assert_eq!(k.run(&syn("64:ff9b:0:0:1::2")), XDP_DROP);
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
