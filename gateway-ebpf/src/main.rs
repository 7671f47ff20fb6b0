//! The gateway's XDP program. For TCP to the gateway's ports it classifies the source to a tenant,
//! drops denied and banned sources, limits new connections (SYN without ACK) per tenant and per
//! source, honours the per-tenant connection-cap flag that user space raises, and counts every
//! decision. Everything else passes untouched. It never logs on the per-packet path.
#![no_std]
#![no_main]
// `core` offers no atomic read-modify-write on the BPF target; the intrinsic lowers to BPF XADD.
#![allow(
    internal_features,
    reason = "atomic_xadd is the only way to emit BPF XADD from Rust"
)]
#![feature(core_intrinsics)]

mod maps;
mod packet;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_ns,
    macros::xdp,
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use gateway_common::{Addr, GlobalCounter, MAX_TENANTS, Take, Verdict, gcra_take, v4_mapped};

use crate::{
    maps::{
        BAN_NETS, BANS, COUNTERS, DENY_NETS, GLOBAL, PORTS, SETTINGS, SOURCE_BUCKETS,
        TENANT_BUCKETS, TENANT_LIMITS, TENANT_NETS, TENANT_OVER_CAP,
    },
    packet::{
        ETH_HDR_LEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP, TCP_ACK,
        TCP_SYN, be16_at, read,
    },
};

/// IPv6 extension headers walked to find TCP: the most RFC 8200's order allows before an upper
/// layer (hop-by-hop, destination options, routing, fragment, authentication, destination
/// options). The stack walks a longer chain, so one is dropped, not passed unjudged.
const MAX_EXT_HDRS: usize = 6;

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    match try_gateway_xdp(&ctx) {
        Ok(action) => action,
        // Not the gateway's traffic, or not judgeable: counted by reason; it passes unless it
        // is of the kind no one sends but to get past the program.
        Err(reason) => {
            count_global(reason);
            if reason == GlobalCounter::Invalid {
                XDP_DROP
            } else {
                XDP_PASS
            }
        }
    }
}

#[inline(always)]
fn try_gateway_xdp(ctx: &XdpContext) -> Result<u32, GlobalCounter> {
    count_global(GlobalCounter::Seen);
    let tcp = match locate_tcp(ctx)? {
        Located::Tcp(tcp) => tcp,
        // Its port cannot be known, so it might be ours: judged by its source alone, dropped.
        Located::Unreadable(src) => {
            let verdict = match source_verdict(&src) {
                Verdict::Passed => Verdict::Malformed,
                denied_or_banned => denied_or_banned,
            };
            count(classify(&src), verdict, ctx.data_end() - ctx.data());
            return Ok(XDP_DROP);
        }
    };
    // Every read of the TCP header stays inside the IP packet: bytes after it (an Ethernet
    // frame's padding) are no part of what the stack reassembles or reads.
    if tcp.l4 + 4 > tcp.end {
        return Err(GlobalCounter::Truncated);
    }
    let dst_port = be16_at(ctx, tcp.l4 + 2).ok_or(GlobalCounter::Truncated)?;
    match PORTS.get(u32::from(dst_port)) {
        Some(flag) if *flag != 0 => {}
        _ => return Err(GlobalCounter::ForeignPort),
    }
    let tenant = classify(&tcp.src);
    let verdict = decide(ctx, &tcp, tenant);
    count(tenant, verdict, ctx.data_end() - ctx.data());
    Ok(if verdict == Verdict::Passed {
        XDP_PASS
    } else {
        XDP_DROP
    })
}

/// A TCP header found in a packet.
struct Tcp {
    src: Addr,
    /// Offset of the TCP header in the frame.
    l4: usize,
    /// Offset of the end of the IP packet (its total or payload length), whatever follows it in
    /// the frame.
    end: usize,
}

/// Where a packet's TCP header is.
enum Located {
    Tcp(Tcp),
    /// TCP the stack can read to its header and this program cannot, so it cannot tell whose
    /// port it is for: a first fragment with less than a whole TCP header (the flags of a SYN
    /// would come with a later fragment, which passes unjudged), or IPv6 whose extension
    /// headers go on past [`MAX_EXT_HDRS`].
    Unreadable(Addr),
}

/// The VLAN tags walked: the stack strips any number of them (tags with VLAN ID 0 are taken
/// off on any device), in any order of 802.1ad and 802.1Q.
const MAX_VLAN_TAGS: usize = 4;

/// Bytes of a TCP header without options.
const TCP_HDR_LEN: usize = 20;

/// Finds the source address and the TCP header, through up to [`MAX_VLAN_TAGS`] VLAN tags, IPv4
/// options and IPv6 extension headers.
#[inline(always)]
fn locate_tcp(ctx: &XdpContext) -> Result<Located, GlobalCounter> {
    let mut proto = be16_at(ctx, 12).ok_or(GlobalCounter::NotIp)?;
    let mut off = ETH_HDR_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021AD && proto != ETH_P_8021Q {
            break;
        }
        proto = be16_at(ctx, off + 2).ok_or(GlobalCounter::NotIp)?;
        off += 4;
    }
    match proto {
        ETH_P_IPV4 => locate_tcp_v4(ctx, off),
        ETH_P_IPV6 => locate_tcp_v6(ctx, off),
        // More tags than walked: what is inside cannot be judged, and the stack would take it.
        ETH_P_8021AD | ETH_P_8021Q => Err(GlobalCounter::Invalid),
        _ => Err(GlobalCounter::NotIp),
    }
}

#[inline(always)]
fn locate_tcp_v4(ctx: &XdpContext, off: usize) -> Result<Located, GlobalCounter> {
    let h = read::<[u8; 20]>(ctx, off).ok_or(GlobalCounter::NotIp)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl {
        return Err(GlobalCounter::NotIp);
    }
    if h[9] != IPPROTO_TCP {
        return Err(GlobalCounter::NotTcp);
    }
    let fragment = u16::from_be_bytes([h[6], h[7]]);
    // A non-first fragment carries no TCP header. Without its first fragment (which is judged
    // here like any packet) it cannot be reassembled, so passing it admits nothing.
    if fragment & 0x1fff != 0 {
        return Err(GlobalCounter::Fragment);
    }
    let src = v4_mapped([h[12], h[13], h[14], h[15]]);
    // A first fragment (more to come) must hold a whole TCP header (RFC 1858, RFC 3128).
    if fragment & 0x2000 != 0 && total < ihl + TCP_HDR_LEN {
        return Ok(Located::Unreadable(src));
    }
    Ok(Located::Tcp(Tcp {
        src,
        l4: off + ihl,
        end: off + total,
    }))
}

#[inline(always)]
fn locate_tcp_v6(ctx: &XdpContext, off: usize) -> Result<Located, GlobalCounter> {
    let h = read::<[u8; 40]>(ctx, off).ok_or(GlobalCounter::NotIp)?;
    if h[0] >> 4 != 6 {
        return Err(GlobalCounter::NotIp);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    // An IPv4-mapped source is never on the wire (the stack refuses TCP from one); counted as
    // one it would be charged to the IPv4 address and its tenant.
    if is_v4_mapped(&src) {
        return Err(GlobalCounter::Invalid);
    }
    let end = off + 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
    let mut next = h[6];
    let mut l4 = off + 40;
    let mut first_fragment = false;
    // A chain that cannot be read on (cut by the frame or the packet's payload length): in a
    // first fragment the rest of it comes with the next fragment, which passes unjudged, and the
    // stack reassembles it (it does not refuse a first fragment whose chain it cannot walk), so
    // it is dropped. Elsewhere the stack refuses it too, and it passes.
    let cut = |first_fragment: bool| {
        if first_fragment {
            Ok(Located::Unreadable(src))
        } else {
            Err(GlobalCounter::NotIp)
        }
    };
    for _ in 0..MAX_EXT_HDRS {
        match next {
            IPPROTO_TCP => break,
            // Hop-by-hop, routing, destination options: length in 8-octet units, first 8 excluded.
            0 | 43 | 60 => {
                let Some([nh, len]) = in_packet::<[u8; 2]>(ctx, l4, end) else {
                    return cut(first_fragment);
                };
                next = nh;
                l4 += (usize::from(len) + 1) * 8;
            }
            // Authentication header (IPsec AH): length in 4-octet units, first 8 excluded.
            51 => {
                let Some([nh, len]) = in_packet::<[u8; 2]>(ctx, l4, end) else {
                    return cut(first_fragment);
                };
                next = nh;
                l4 += (usize::from(len) + 2) * 4;
            }
            // Fragment header: only the first fragment (offset 0) holds the TCP header.
            44 => {
                let Some([nh, _, hi, lo]) = in_packet::<[u8; 4]>(ctx, l4, end) else {
                    return cut(first_fragment);
                };
                let fragment = u16::from_be_bytes([hi, lo]);
                if fragment & 0xfff8 != 0 {
                    return Err(GlobalCounter::Fragment);
                }
                first_fragment = fragment & 1 != 0;
                next = nh;
                l4 += 8;
            }
            _ => return Err(GlobalCounter::NotTcp),
        }
    }
    match next {
        IPPROTO_TCP if first_fragment && l4 + TCP_HDR_LEN > end => Ok(Located::Unreadable(src)),
        IPPROTO_TCP => Ok(Located::Tcp(Tcp { src, l4, end })),
        0 | 43 | 44 | 51 | 60 => Ok(Located::Unreadable(src)),
        _ => Err(GlobalCounter::NotTcp),
    }
}

/// Whether `addr` is an IPv4 address in the form every map keys it ([`v4_mapped`]).
#[inline(always)]
fn is_v4_mapped(addr: &Addr) -> bool {
    addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// [`read`], of bytes inside the IP packet (before `end`) only.
#[inline(always)]
fn in_packet<T: Copy>(ctx: &XdpContext, offset: usize, end: usize) -> Option<T> {
    if offset + size_of::<T>() > end {
        return None;
    }
    read::<T>(ctx, offset)
}

/// Longest-prefix match of the source to a tenant; unmatched sources get the default tenant.
#[inline(always)]
fn classify(src: &Addr) -> u32 {
    let tenant = match TENANT_NETS.get(Key::new(128, *src)) {
        Some(tenant) => *tenant,
        None => SETTINGS.get(0).map_or(0, |s| s.default_tenant),
    };
    if tenant < MAX_TENANTS { tenant } else { 0 }
}

#[inline(always)]
fn decide(ctx: &XdpContext, tcp: &Tcp, tenant: u32) -> Verdict {
    let verdict = source_verdict(&tcp.src);
    if verdict != Verdict::Passed {
        return verdict;
    }
    // Ports were readable but the flags are not: a cut header. The stack would not accept it
    // either, and it is addressed to us, so it is dropped and counted.
    if tcp.l4 + TCP_HDR_LEN > tcp.end {
        return Verdict::Malformed;
    }
    let Some(header) = read::<[u8; 14]>(ctx, tcp.l4) else {
        return Verdict::Malformed;
    };
    let flags = header[13];
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        // Established traffic is never cut by the connection limits. (Nor is the ACK that
        // completes a SYN-cookie handshake, which makes a connection of a SYN admitted before,
        // and again each time it is sent: the workers hold new connections to the same rates
        // as they accept them. docs/architecture.md says why not here.)
        return Verdict::Passed;
    }
    admit_new_connection(&tcp.src, tenant)
}

/// The decisions made on the source alone: the deny list, then bans.
#[inline(always)]
fn source_verdict(src: &Addr) -> Verdict {
    if DENY_NETS.get(Key::new(128, *src)).is_some() {
        Verdict::Denied
    } else if is_banned(src) {
        Verdict::Banned
    } else {
        Verdict::Passed
    }
}

#[inline(always)]
fn is_banned(src: &Addr) -> bool {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // An expired ban is left to user space's sweep: removed here, it could be one that user
    // space renewed since it was read.
    if let Some(expiry) = BANS.get_ptr(src) {
        // SAFETY: a pointer returned by a map lookup is valid for the value's size.
        if unsafe { *expiry } > now {
            return true;
        }
    }
    // A banned prefix: the longest one holding the source decides (an expired one stays until
    // user space sweeps it, hiding a shorter one below it for that long).
    BAN_NETS
        .get(Key::new(128, *src))
        .is_some_and(|expiry| *expiry > now)
}

#[inline(always)]
fn admit_new_connection(src: &Addr, tenant: u32) -> Verdict {
    if TENANT_OVER_CAP.get(tenant).is_some_and(|flag| *flag != 0) {
        return Verdict::OverCap;
    }
    let Some(limits) = TENANT_LIMITS.get(tenant) else {
        return Verdict::Passed;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // The source is checked first, so a source over its own limit does not drain its tenant's bucket.
    if limits.source_interval_ns != 0
        && !take_token(
            src,
            now,
            limits.source_interval_ns,
            limits.source_tolerance_ns,
        )
    {
        return Verdict::SourceRate;
    }
    if limits.conn_interval_ns != 0
        && let Some(bucket) = TENANT_BUCKETS.get_ptr_mut(tenant)
        && !take_shared(
            bucket,
            now,
            limits.conn_interval_ns,
            limits.conn_tolerance_ns,
        )
    {
        return Verdict::TenantRate;
    }
    Verdict::Passed
}

/// Takes one token from a GCRA bucket that every CPU may use at once. The state is one aligned
/// u64, the theoretical arrival time (TAT). A busy bucket is charged with an atomic add, so
/// every admission is paid for even when CPUs race: two CPUs that both see the last token both
/// admit, and the bucket goes one interval into debt that later refusals pay back. Only an idle
/// bucket (TAT in the past, so full) is reset with a plain store, where a racing CPU can cost
/// at most one uncharged admission. docs/architecture.md gives the measured accuracy.
#[inline(always)]
fn take_shared(bucket: *mut u64, now: u64, interval: u64, tolerance: u64) -> bool {
    // SAFETY (all three blocks): map values are 8-byte aligned and valid for the map's lifetime;
    // an aligned u64 load or store is never torn.
    let tat = unsafe { core::ptr::read_volatile(bucket) };
    match gcra_take(tat, now, interval, tolerance) {
        Take::Reset(next) => unsafe { core::ptr::write_volatile(bucket, next) },
        Take::Charge => unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bucket, interval);
        },
        Take::Refuse => return false,
    }
    true
}

/// The per-source bucket: charged in place when the source is known, inserted for a new one.
/// An IPv6 source is its /64 (one host is given a /64 and may send from any address in it), but
/// where a /64 is not one client's (`gateway_common::SHARED_V6`: IPv4-mapped, loopback,
/// link-local, NAT64, Teredo) its address.
#[inline(always)]
fn take_token(src: &Addr, now: u64, interval: u64, tolerance: u64) -> bool {
    let mut key = *src;
    if !gateway_common::source_is_address(&key) {
        key[8..].copy_from_slice(&[0; 8]);
    }
    let src = &key;
    match SOURCE_BUCKETS.get_ptr_mut(src) {
        Some(bucket) => take_shared(bucket, now, interval, tolerance),
        None => {
            // An insert can only fail under memory pressure; the source is then admitted untracked.
            let _untracked = SOURCE_BUCKETS.insert(src, now + interval, 0);
            true
        }
    }
}

#[inline(always)]
fn count(tenant: u32, verdict: Verdict, len: usize) {
    if let Some(counters) = COUNTERS.get_ptr_mut(tenant) {
        let v = verdict as usize;
        // SAFETY: per-CPU value, valid for its size; nothing else on this CPU runs meanwhile.
        unsafe {
            (*counters).packets[v] += 1;
            (*counters).bytes[v] += len as u64;
        }
    }
}

#[inline(always)]
fn count_global(counter: GlobalCounter) {
    if let Some(value) = GLOBAL.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU value, valid for its size.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
