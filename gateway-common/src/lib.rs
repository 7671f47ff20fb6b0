//! Types and names shared by the kernel program (`gateway-ebpf`) and user space (`gateway`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel and user space must agree on every byte.
//! Addresses are always 16 bytes; IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one
//! map of each kind serves both families and an IPv4 prefix `/n` is the mapped prefix `/(96 + n)`.
#![no_std]

/// Highest number of tenants (tenant ids are `0..MAX_TENANTS`).
pub const MAX_TENANTS: u32 = 1024;
/// Entries in the tenant-classification and deny LPM tries.
pub const MAX_PREFIXES: u32 = 16 * 1024;
/// Entries in the dynamic ban map.
pub const MAX_BANS: u32 = 64 * 1024;
/// Entries in the per-source token-bucket LRU map. An LRU map: a spoofed flood evicts old sources
/// rather than exhausting memory or failing inserts.
pub const MAX_SOURCES: u32 = 256 * 1024;
/// The ports array covers every TCP port.
pub const PORT_SLOTS: u32 = 65536;

/// Map names. They are also the file names under the pin directory, so keep them stable:
/// renaming one loses that map's state across a restart. Kernel map names hold at most 15 bytes.
pub mod map_names {
    pub const PORTS: &str = "GW_PORTS";
    pub const TENANT_NETS: &str = "GW_TENANT_NETS";
    pub const DENY_NETS: &str = "GW_DENY_NETS";
    pub const BANS: &str = "GW_BANS";
    pub const BAN_NETS: &str = "GW_BAN_NETS";
    pub const SOURCE_BUCKETS: &str = "GW_SRC_BUCKETS";
    pub const TENANT_BUCKETS: &str = "GW_TEN_BUCKETS";
    pub const TENANT_LIMITS: &str = "GW_TEN_LIMITS";
    pub const TENANT_OVER_CAP: &str = "GW_TEN_OVERCAP";
    pub const SETTINGS: &str = "GW_SETTINGS";
    pub const COUNTERS: &str = "GW_COUNTERS";
    pub const GLOBAL: &str = "GW_GLOBAL";
}

/// Name of the XDP entry point in the object file.
pub const XDP_PROGRAM: &str = "gateway_xdp";

/// An address as the maps key it: 16 bytes, network order, IPv4 mapped into `::ffff:0:0/96`.
pub type Addr = [u8; 16];

/// What the program decided for one packet to a gateway port. Index into [`TenantCounters`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed = 0,
    /// Source is in the static deny list.
    Denied = 1,
    /// Source has an unexpired entry in the ban map.
    Banned = 2,
    /// A SYN over the tenant's new-connection rate.
    TenantRate = 3,
    /// A SYN over the per-source new-connection rate.
    SourceRate = 4,
    /// A SYN while user space reports the tenant at its concurrent-connection cap.
    OverCap = 5,
    /// To a gateway port, but its TCP flags lie past the end of its IP packet; or TCP that
    /// cannot be read to its port where the stack can: a first fragment holding less than a
    /// whole TCP header, IPv6 with more extension headers than the program walks.
    Malformed = 6,
}

pub const VERDICT_COUNT: usize = 7;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT] = [
        Verdict::Passed,
        Verdict::Denied,
        Verdict::Banned,
        Verdict::TenantRate,
        Verdict::SourceRate,
        Verdict::OverCap,
        Verdict::Malformed,
    ];

    /// Stable lower-case name, used in metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Denied => "denied",
            Verdict::Banned => "banned",
            Verdict::TenantRate => "tenant_rate",
            Verdict::SourceRate => "source_rate",
            Verdict::OverCap => "over_cap",
            Verdict::Malformed => "malformed",
        }
    }
}

/// Packets and bytes per verdict for one tenant, in a per-CPU array indexed by tenant id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantCounters {
    pub packets: [u64; VERDICT_COUNT],
    pub bytes: [u64; VERDICT_COUNT],
}

/// Counters for packets that are not the gateway's (they pass) or cannot be judged (they pass
/// but for [`GlobalCounter::Invalid`]), per CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalCounter {
    /// Every packet the program saw.
    Seen = 0,
    /// Not IPv4/IPv6 (after up to four VLAN tags), or shorter than its headers claim.
    NotIp = 1,
    /// IP but not TCP.
    NotTcp = 2,
    /// TCP to a port that is not the gateway's.
    ForeignPort = 3,
    /// A non-first fragment: no TCP header to judge; reassembly needs the first fragment, which is judged.
    Fragment = 4,
    /// TCP whose ports lie past the end of the frame or of its IP packet.
    Truncated = 5,
    /// Dropped before its source is known: more VLAN tags than the program walks (the stack
    /// strips any number of tags with VLAN ID 0), or IPv6 from an IPv4-mapped source (no host
    /// sends one; it would be charged to the IPv4 address).
    Invalid = 6,
}

pub const GLOBAL_COUNTER_COUNT: u32 = 7;

impl GlobalCounter {
    pub const ALL: [GlobalCounter; GLOBAL_COUNTER_COUNT as usize] = [
        GlobalCounter::Seen,
        GlobalCounter::NotIp,
        GlobalCounter::NotTcp,
        GlobalCounter::ForeignPort,
        GlobalCounter::Fragment,
        GlobalCounter::Truncated,
        GlobalCounter::Invalid,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            GlobalCounter::Seen => "seen",
            GlobalCounter::NotIp => "not_ip",
            GlobalCounter::NotTcp => "not_tcp",
            GlobalCounter::ForeignPort => "foreign_port",
            GlobalCounter::Fragment => "fragment",
            GlobalCounter::Truncated => "truncated",
            GlobalCounter::Invalid => "invalid",
        }
    }
}

/// New-connection limits of one tenant, as GCRA parameters (a token bucket expressed in time).
///
/// `*_interval_ns` is the time one token takes to refill (`1e9 / rate`); 0 means unlimited.
/// `*_tolerance_ns` is `burst * interval`: how far ahead of now the bucket's theoretical arrival
/// time may run before a SYN is refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantLimits {
    pub conn_interval_ns: u64,
    pub conn_tolerance_ns: u64,
    pub source_interval_ns: u64,
    pub source_tolerance_ns: u64,
}

impl TenantLimits {
    /// GCRA parameters for `rate` per second with `burst` admitted at once. A rate of 0 is unlimited.
    pub const fn gcra(rate_per_sec: u64, burst: u64) -> (u64, u64) {
        if rate_per_sec == 0 {
            return (0, 0);
        }
        let interval = 1_000_000_000 / rate_per_sec;
        let interval = if interval == 0 { 1 } else { interval };
        let burst = if burst == 0 { 1 } else { burst };
        (interval, interval.saturating_mul(burst))
    }

    /// One host's share of a limit a fleet of `hosts` gateways shares: `rate ÷ hosts` per second
    /// (the interval `hosts` times as long) with `burst ÷ hosts` (at least 1) admitted at once.
    pub const fn gcra_share(rate_per_sec: u64, burst: u64, hosts: u64) -> (u64, u64) {
        if rate_per_sec == 0 {
            return (0, 0);
        }
        let hosts = if hosts == 0 { 1 } else { hosts };
        let (interval, _) = Self::gcra(rate_per_sec, burst);
        let interval = interval.saturating_mul(hosts);
        let burst = burst / hosts;
        let burst = if burst == 0 { 1 } else { burst };
        (interval, interval.saturating_mul(burst))
    }
}

/// Program-wide settings, the only element of the settings array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Tenant of sources that no prefix matches.
    pub default_tenant: u32,
    pub _reserved: u32,
}

/// What to do with a GCRA bucket's stored theoretical arrival time (TAT) for one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// The bucket was idle (full): store this TAT (a plain store) and admit.
    Reset(u64),
    /// Admit and add one interval to the TAT with an atomic add, so concurrent admissions on
    /// other CPUs are all charged.
    Charge,
    /// Refuse; leave the bucket alone.
    Refuse,
}

/// One GCRA decision on a bucket shared by CPUs. `tolerance` is `burst * interval`.
#[inline(always)]
pub const fn gcra_take(tat: u64, now: u64, interval: u64, tolerance: u64) -> Take {
    if tat < now {
        Take::Reset(now + interval)
    } else if tat + interval - now > tolerance {
        Take::Refuse
    } else {
        Take::Charge
    }
}

/// IPv6 space where a /64 is not one client's, as (network, prefix length): `::/64` (loopback,
/// and `::ffff:0:0/96`, every IPv4 address as the kernel program keys it), link-local
/// `fe80::/10` (every host of a link), NAT64's `64:ff9b::/96` and `64:ff9b:1::/48` (IPv4
/// clients behind a translator) and Teredo's `2001::/32` (clients behind IPv4 NATs). A source
/// there is its address alone; elsewhere an IPv6 source is its /64 (one host is given a /64
/// and may send from any address in it). [`source_is_address`] is the same test.
pub const SHARED_V6: [(Addr, u8); 5] = [
    ([0; 16], 64),
    ([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 10),
    (
        [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        96,
    ),
    (
        [0, 0x64, 0xff, 0x9b, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        48,
    ),
    ([0x20, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 32),
];

/// Whether a source at `addr` (IPv6, or IPv4-mapped) is its address alone, not its /64: an
/// address in [`SHARED_V6`]. The kernel program's per-source buckets, the workers' per-source
/// counts and auto-bans all key a source so.
#[inline(always)]
pub const fn source_is_address(addr: &Addr) -> bool {
    let a = addr;
    let zero64 = a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] == 0;
    let link_local = a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    let nat64 = a[0] == 0
        && a[1] == 0x64
        && a[2] == 0xff
        && a[3] == 0x9b
        && (a[4] == 0 && a[5] == 1 || a[4] | a[5] | a[6] | a[7] | a[8] | a[9] | a[10] | a[11] == 0);
    let teredo = a[0] == 0x20 && a[1] == 0x01 && a[2] == 0 && a[3] == 0;
    zero64 || link_local || nat64 || teredo
}

/// IPv4-mapped form of an IPv4 address.
pub const fn v4_mapped(octets: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] structs of integers without padding.
    unsafe impl aya::Pod for super::TenantCounters {}
    unsafe impl aya::Pod for super::TenantLimits {}
    unsafe impl aya::Pod for super::Settings {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies decisions the way the kernel does (sequentially: one CPU).
    fn take(tat: &mut u64, now: u64, i: u64, t: u64) -> bool {
        match gcra_take(*tat, now, i, t) {
            Take::Reset(v) => {
                *tat = v;
                true
            }
            Take::Charge => {
                *tat += i;
                true
            }
            Take::Refuse => false,
        }
    }

    #[test]
    fn gcra_admits_burst_then_refills() {
        let (i, t) = TenantLimits::gcra(10, 3); // 100 ms per token, 3 at once
        assert_eq!(i, 100_000_000);
        let now = 1_000_000_000;
        let mut tat = 0;
        for _ in 0..3 {
            assert!(take(&mut tat, now, i, t), "within burst");
        }
        assert!(!take(&mut tat, now, i, t), "fourth at once is refused");
        assert!(
            take(&mut tat, now + i, i, t),
            "one token back after one interval"
        );
        assert!(!take(&mut tat, now + i, i, t), "and only one");
    }

    #[test]
    fn racing_admissions_are_charged_as_debt() {
        let (i, t) = TenantLimits::gcra(10, 2);
        let now = 1_000_000_000;
        let mut tat = 0;
        assert!(take(&mut tat, now, i, t));
        // Two CPUs both read the TAT with one token left and both admit; both add an interval.
        assert_eq!(gcra_take(tat, now, i, t), Take::Charge);
        tat += 2 * i;
        // The bucket is one interval in debt: after one interval there is still no token.
        assert_eq!(gcra_take(tat, now + i, i, t), Take::Refuse);
        assert_eq!(gcra_take(tat, now + 2 * i, i, t), Take::Charge);
    }

    #[test]
    fn a_hosts_share_is_the_rate_and_burst_divided_by_the_live_hosts() {
        assert_eq!(
            TenantLimits::gcra_share(10, 3, 1),
            TenantLimits::gcra(10, 3)
        );
        assert_eq!(
            TenantLimits::gcra_share(10, 3, 0),
            TenantLimits::gcra(10, 3)
        );
        // 2/s with 8 at once over two hosts: 1/s with 4 at once each.
        assert_eq!(
            TenantLimits::gcra_share(2, 8, 2),
            (1_000_000_000, 4_000_000_000)
        );
        // A burst smaller than the hosts: still one at once.
        let (i, t) = TenantLimits::gcra_share(3, 2, 3);
        assert_eq!((i, t), (999_999_999, 999_999_999));
        assert_eq!(TenantLimits::gcra_share(0, 5, 3), (0, 0));
        let (i, t) = TenantLimits::gcra_share(10, 6, 3);
        let now = 1_000_000_000;
        let mut tat = 0;
        let admitted = (0..6).filter(|_| take(&mut tat, now, i, t)).count();
        assert_eq!(admitted, 2, "a third of the burst at once");
    }

    #[test]
    fn zero_rate_is_unlimited_marker() {
        assert_eq!(TenantLimits::gcra(0, 5), (0, 0));
        assert_eq!(TenantLimits::gcra(2_000_000_000, 0), (1, 1));
    }

    /// `source_is_address` is the test of `SHARED_V6`: every range's first and last address is
    /// in, and the address before and after it is out (none of the ranges touch).
    #[test]
    fn source_is_address_is_shared_v6() {
        let inside = |a: u128| {
            SHARED_V6.iter().any(|(net, len)| {
                let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                a & mask == u128::from_be_bytes(*net)
            })
        };
        for (net, len) in SHARED_V6 {
            let first = u128::from_be_bytes(net);
            let last = first | (u128::MAX >> len);
            for a in [first, last, first + 1, last - 1] {
                assert!(source_is_address(&a.to_be_bytes()), "{a:x}");
            }
            for a in [first.wrapping_sub(1), last.wrapping_add(1)] {
                assert_eq!(source_is_address(&a.to_be_bytes()), inside(a), "{a:x}");
                assert!(!inside(a) || a == 0, "ranges touch at {a:x}");
            }
        }
        for a in [
            "2001:db8::1",
            "2001:1::1",
            "64:ff9b:0:0:1::1",
            "64:ff9b:2::1",
            "fec0::1",
            "2606:4700::1",
        ] {
            let a: u128 = a.parse::<core::net::Ipv6Addr>().unwrap().into();
            assert!(!source_is_address(&a.to_be_bytes()), "{a:x}");
            assert!(!inside(a));
        }
        assert!(source_is_address(&v4_mapped([192, 0, 2, 1])));
    }
}
