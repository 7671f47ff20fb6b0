//! Ethernet frames for the program's decisions, built with etherparse and then bent into the odd
//! shapes the program must survive (VLAN tags, IP options, fragments, extension headers, cuts).

use std::net::IpAddr;

use etherparse::PacketBuilder;

#[derive(Clone, Copy, Debug)]
pub enum Flags {
    Syn,
    SynAck,
    Ack,
}

const SRC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// A TCP segment from `src` (port 40000) to `dst_port`, to an address of the same family.
pub fn tcp(src: IpAddr, dst_port: u16, flags: Flags) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
    let ip = match src {
        IpAddr::V4(s) => eth.ipv4(s.octets(), [198, 18, 0, 1], 64),
        IpAddr::V6(s) => eth.ipv6(
            s.octets(),
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            64,
        ),
    };
    let t = ip.tcp(40000, dst_port, 1, 65535);
    let t = match flags {
        Flags::Syn => t.syn(),
        Flags::SynAck => t.syn().ack(1),
        Flags::Ack => t.ack(1),
    };
    let mut out = Vec::with_capacity(t.size(0));
    t.write(&mut out, &[]).expect("write frame");
    out
}

/// A SYN between the given MAC and IPv4 addresses and ports, with sequence number `seq`: what a
/// spoofing flood sends (the flood in `cargo xtask bench` builds its frames with it).
pub fn syn_v4(
    macs: ([u8; 6], [u8; 6]),
    src: (std::net::Ipv4Addr, u16),
    dst: (std::net::Ipv4Addr, u16),
    seq: u32,
) -> Vec<u8> {
    let t = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, seq, 64240)
        .syn();
    let mut out = Vec::with_capacity(t.size(0));
    t.write(&mut out, &[]).expect("write frame");
    out
}

/// A UDP datagram to `dst_port`.
pub fn udp(src: std::net::Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .ipv4(src.octets(), [198, 18, 0, 1], 64)
        .udp(40000, dst_port);
    let mut out = Vec::new();
    b.write(&mut out, b"hello").expect("write");
    out
}

/// Inserts a VLAN tag with the given TPID (0x8100 or 0x88a8) after the MAC addresses.
pub fn with_vlan(mut frame: Vec<u8>, tpid: u16, vid: u16) -> Vec<u8> {
    let mut tag = tpid.to_be_bytes().to_vec();
    tag.extend_from_slice(&vid.to_be_bytes());
    frame.splice(12..12, tag);
    frame
}

/// Adds four bytes of NOP options to an IPv4 header (IHL 6).
pub fn with_ipv4_options(mut frame: Vec<u8>) -> Vec<u8> {
    frame.splice(34..34, [1u8, 1, 1, 0]);
    frame[14] = 0x46;
    let total = u16::from_be_bytes([frame[16], frame[17]]) + 4;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    frame
}

/// Marks an IPv4 packet as a fragment at `offset_units` (8-byte units), more fragments following.
pub fn as_ipv4_fragment(mut frame: Vec<u8>, offset_units: u16) -> Vec<u8> {
    let v = 0x2000 | offset_units;
    frame[20..22].copy_from_slice(&v.to_be_bytes());
    frame
}

/// Puts an 8-byte IPv6 extension header (`kind`: 0 hop-by-hop, 60 destination options, 44
/// fragment) between the IPv6 header and TCP. For a fragment, `frag_offset` is in 8-byte units.
pub fn with_ipv6_ext(mut frame: Vec<u8>, kind: u8, frag_offset: u16) -> Vec<u8> {
    let next = frame[14 + 6];
    let ext = if kind == 44 {
        let fo = (frag_offset << 3) | 1;
        let [a, b] = fo.to_be_bytes();
        [next, 0, a, b, 0, 0, 0, 7]
    } else {
        [next, 0, 1, 4, 0, 0, 0, 0]
    };
    frame.splice(54..54, ext);
    frame[14 + 6] = kind;
    let plen = u16::from_be_bytes([frame[18], frame[19]]) + 8;
    frame[18..20].copy_from_slice(&plen.to_be_bytes());
    frame
}
