use super::*;

const ANY: ProxyVersion = ProxyVersion::Any;

fn client(s: &str) -> Header {
    Header::Client(s.parse().unwrap())
}

/// A v2 header written byte by byte: version/command, family/protocol, then the payload.
fn v2(ver_cmd: u8, fam_proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(ver_cmd);
    h.push(fam_proto);
    h.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn v4_addresses(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut p = src.to_vec();
    p.extend_from_slice(&[10, 0, 0, 1]);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&443u16.to_be_bytes());
    p
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut t = vec![kind];
    t.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
    t.extend_from_slice(value);
    t
}

/// Every proper prefix of `header` is incomplete, and the whole (with anything after it) gives
/// `expected`: the decision does not depend on how the bytes arrive.
fn decided_once_whole(header: &[u8], expected: Parsed) {
    for n in 0..header.len() {
        assert_eq!(
            parse(&header[..n], ANY),
            Parsed::Incomplete,
            "prefix of {n} bytes"
        );
    }
    assert_eq!(parse(header, ANY), expected);
    let mut more = header.to_vec();
    more.extend_from_slice(b"POST /mcp HTTP/1.1\r\n");
    assert_eq!(parse(&more, ANY), expected);
}

#[test]
fn v1_tcp4_and_tcp6() {
    let h = b"PROXY TCP4 198.18.5.7 10.0.0.1 51234 8080\r\n";
    decided_once_whole(
        h,
        Parsed::Header {
            len: h.len(),
            header: client("198.18.5.7:51234"),
        },
    );
    let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
    decided_once_whole(
        h,
        Parsed::Header {
            len: h.len(),
            header: client("[2001:db8::7]:4000"),
        },
    );
}

#[test]
fn v1_that_names_no_client_is_unsupported() {
    let h = b"PROXY UNKNOWN\r\n";
    assert_eq!(parse(h, ANY), Parsed::Refused(Reason::Unsupported));
    let h = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
    assert_eq!(parse(h, ANY), Parsed::Refused(Reason::Unsupported));
}

#[test]
fn v1_malformed() {
    for bad in [
        &b"PROXY TCP4 198.18.5.7\r\n"[..],
        b"PROXY TCP4 198.18.5.7 10.0.0.1 51234 8080\r\r",
        b"PROXY TCP4 198.18.5.7 10.0.0.1 51234 8080 extra\r\n",
        b"PROXY TCP4 300.18.5.7 10.0.0.1 51234 8080\r\n",
        b"PROXY TCP4 2001:db8::7 10.0.0.1 51234 8080\r\n",
        b"PROXY TCP4 198.18.5.7 10.0.0.1 070000 8080\r\n",
        b"PROXY TCP4 198.18.5.7 10.0.0.1 0123 8080\r\n",
        b"PROXY TCP5 198.18.5.7 10.0.0.1 1 2\r\n",
        b"PROXY  TCP4 198.18.5.7 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 198.18.5.7 10.0.0.1 1 2\n\r\n",
        b"PROXY tcp4 198.18.5.7 10.0.0.1 1 2\r\n",
    ] {
        assert_eq!(
            parse(bad, ANY),
            Parsed::Refused(Reason::Malformed),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    // No CR within the longest header's length.
    let long = [b"PROXY TCP6 ".as_slice(), &[b'1'; 120]].concat();
    assert_eq!(parse(&long, ANY), Parsed::Refused(Reason::Malformed));
    assert_eq!(parse(&long[..100], ANY), Parsed::Incomplete);
}

#[test]
fn no_header_is_refused_at_its_first_byte() {
    for bad in [
        &b"GET /mcp HTTP/1.1\r\n"[..],
        b"POST",
        b"\x16\x03\x01\x02\x00", // a TLS ClientHello
        b"proxy TCP4",
        b"PROXYTCP4",
        b"\r\n\r\n\0\r\nQUIX\n",
    ] {
        assert_eq!(
            parse(bad, ANY),
            Parsed::Refused(Reason::Malformed),
            "{bad:?}"
        );
    }
    assert_eq!(parse(b"G", ANY), Parsed::Refused(Reason::Malformed));
    assert_eq!(parse(b"", ANY), Parsed::Incomplete);
}

#[test]
fn v2_tcp4_with_tlvs() {
    let mut payload = v4_addresses([198, 18, 5, 7], 51234);
    payload.extend(tlv(0x02, b"mcp.example.com")); // PP2_TYPE_AUTHORITY
    payload.extend(tlv(0x05, b"\x01\x02\x03")); // PP2_TYPE_UNIQUE_ID
    payload.extend(tlv(0xEA, b"vpce-0123456789abcdef0")); // AWS: the VPC endpoint
    payload.extend(tlv(0x04, b"")); // PP2_TYPE_NOOP
    let h = v2(0x21, 0x11, &payload);
    decided_once_whole(
        &h,
        Parsed::Header {
            len: h.len(),
            header: client("198.18.5.7:51234"),
        },
    );
}

#[test]
fn v2_tcp6_and_mapped_v4() {
    let mut payload = "2001:db8::7"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets()
        .to_vec();
    payload.extend_from_slice(&[0; 16]);
    payload.extend_from_slice(&[0x0f, 0xa0, 0x01, 0xbb]);
    let h = v2(0x21, 0x21, &payload);
    decided_once_whole(
        &h,
        Parsed::Header {
            len: h.len(),
            header: client("[2001:db8::7]:4000"),
        },
    );
    // An IPv4 client in IPv6 form is the IPv4 address (the classifier and the bans key on it).
    payload[..16].copy_from_slice(
        &"::ffff:198.18.5.7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    let h = v2(0x21, 0x21, &payload);
    assert_eq!(
        parse(&h, ANY),
        Parsed::Header {
            len: h.len(),
            header: client("198.18.5.7:4000"),
        }
    );
}

#[test]
fn v2_local_is_the_balancers_own_connection() {
    let h = v2(0x20, 0x00, &[]);
    decided_once_whole(
        &h,
        Parsed::Header {
            len: 16,
            header: Header::Local,
        },
    );
    // Whatever LOCAL carries is ignored.
    let h = v2(0x20, 0x11, &v4_addresses([198, 18, 5, 7], 1));
    assert_eq!(
        parse(&h, ANY),
        Parsed::Header {
            len: 28,
            header: Header::Local,
        }
    );
}

#[test]
fn v2_that_names_no_tcp_client_is_unsupported() {
    // PROXY with UNSPEC, UDP over IPv4, a UNIX stream, a stream of unspecified family.
    for (fam, payload) in [
        (0x00, vec![]),
        (0x12, v4_addresses([198, 18, 5, 7], 1)),
        (0x31, vec![0; 216]),
        (0x10, v4_addresses([198, 18, 5, 7], 1)),
    ] {
        let h = v2(0x21, fam, &payload);
        assert_eq!(
            parse(&h, ANY),
            Parsed::Refused(Reason::Unsupported),
            "{fam:#x}"
        );
    }
    // More than this gateway takes.
    let mut payload = v4_addresses([198, 18, 5, 7], 1);
    payload.extend(tlv(0xE0, &[0; MAX_V2_PAYLOAD]));
    let h = v2(0x21, 0x11, &payload);
    assert_eq!(parse(&h[..16], ANY), Parsed::Refused(Reason::Unsupported));
}

#[test]
fn v2_malformed() {
    let addresses = v4_addresses([198, 18, 5, 7], 1);
    // A TLV longer than what is left; bytes that are not a whole TLV.
    let mut bad_tlv = addresses.clone();
    bad_tlv.extend_from_slice(&[0x02, 0x00, 0x09, b'x']);
    let mut leftover = addresses.clone();
    leftover.extend_from_slice(&[0x02, 0x00]);
    for (ver_cmd, fam, payload) in [
        (0x21, 0x11, bad_tlv),
        (0x21, 0x11, leftover),
        (0x21, 0x11, addresses[..8].to_vec()), // shorter than IPv4 addresses
        (0x11, 0x11, addresses.clone()),       // version 1 in the binary form
        (0x22, 0x11, addresses.clone()),       // command 2
        (0x21, 0x41, addresses.clone()),       // family 4
        (0x21, 0x13, addresses.clone()),       // protocol 3
    ] {
        let h = v2(ver_cmd, fam, &payload);
        assert_eq!(
            parse(&h, ANY),
            Parsed::Refused(Reason::Malformed),
            "{ver_cmd:#x} {fam:#x}"
        );
    }
    // A wrong version is refused as soon as its byte is here.
    let h = v2(0x11, 0x11, &addresses);
    assert_eq!(parse(&h[..16], ANY), Parsed::Refused(Reason::Malformed));
}

#[test]
fn the_listeners_version_is_enforced() {
    let one = b"PROXY TCP4 198.18.5.7 10.0.0.1 51234 8080\r\n";
    let two = v2(0x21, 0x11, &v4_addresses([198, 18, 5, 7], 51234));
    assert_eq!(
        parse(one, ProxyVersion::V2),
        Parsed::Refused(Reason::Unsupported)
    );
    assert_eq!(
        parse(&two, ProxyVersion::V1),
        Parsed::Refused(Reason::Unsupported)
    );
    assert!(matches!(
        parse(one, ProxyVersion::V1),
        Parsed::Header { .. }
    ));
    assert!(matches!(
        parse(&two, ProxyVersion::V2),
        Parsed::Header { .. }
    ));
}

#[test]
fn metrics_name_every_reason() {
    let c = Counters::default();
    c.refuse(Reason::Banned);
    c.refuse(Reason::Banned);
    let mut out = String::new();
    c.render(&mut out);
    assert!(out.contains("mcp_gateway_proxy_protocol_refused_total{reason=\"banned\"} 2\n"));
    for r in Reason::ALL {
        assert!(out.contains(&format!("{{reason=\"{}\"}}", r.name())));
    }
    assert!(out.contains("mcp_gateway_proxy_protocol_accepted_total{command=\"proxy\"} 0\n"));
}

#[test]
fn the_other_version_is_refused_only_once_its_signature_is_whole() {
    // Found by the fuzz target: "PROX" then "OXY" was `unsupported` in pieces on a v2 listener
    // but `malformed` at once.
    assert_eq!(parse(b"PROX", ProxyVersion::V2), Parsed::Incomplete);
    assert_eq!(
        parse(b"PROXOXY", ProxyVersion::V2),
        Parsed::Refused(Reason::Malformed)
    );
    assert_eq!(
        parse(b"PROXY ", ProxyVersion::V2),
        Parsed::Refused(Reason::Unsupported)
    );
    assert_eq!(parse(b"\r\n\r\n", ProxyVersion::V1), Parsed::Incomplete);
    assert_eq!(
        parse(b"\r\n\r\nGET", ProxyVersion::V1),
        Parsed::Refused(Reason::Malformed)
    );
    assert_eq!(
        parse(V2_SIGNATURE, ProxyVersion::V1),
        Parsed::Refused(Reason::Unsupported)
    );
}
