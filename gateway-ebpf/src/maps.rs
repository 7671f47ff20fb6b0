//! Every map of the program. All are pinned by name, so a restart of the daemon keeps bans,
//! buckets and counters. User space (the control thread) writes the configuration maps and the
//! ban map; this program writes only the buckets, the counters and expired-ban removals.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use gateway_common::{
    Addr, GLOBAL_COUNTER_COUNT, MAX_BANS, MAX_PREFIXES, MAX_SOURCES, MAX_TENANTS, PORT_SLOTS,
    Settings, TenantCounters, TenantLimits,
};

/// Non-zero at index `port` for the gateway's listening ports.
#[map(name = "GW_PORTS")]
pub static PORTS: Array<u8> = Array::pinned(PORT_SLOTS, 0);

/// Source prefix -> tenant id.
#[map(name = "GW_TENANT_NETS")]
pub static TENANT_NETS: LpmTrie<Addr, u32> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// Static deny list: any matching prefix drops.
#[map(name = "GW_DENY_NETS")]
pub static DENY_NETS: LpmTrie<Addr, u8> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// Source address -> ban expiry (CLOCK_MONOTONIC ns, the clock of `bpf_ktime_get_ns`).
#[map(name = "GW_BANS")]
pub static BANS: HashMap<Addr, u64> = HashMap::pinned(MAX_BANS, 0);

/// Banned prefixes (`gateway kernel ban 198.51.100.0/24`) -> ban expiry, on the clock of
/// [`BANS`]. Expired entries are ignored here and swept by user space (a lookup does not say
/// which prefix matched, so the program cannot remove one).
#[map(name = "GW_BAN_NETS")]
pub static BAN_NETS: LpmTrie<Addr, u64> = LpmTrie::pinned(MAX_PREFIXES, 0);

/// Per-source GCRA state (theoretical arrival time, ns). LRU: a spoofed flood evicts, never fills.
#[map(name = "GW_SRC_BUCKETS")]
pub static SOURCE_BUCKETS: LruHashMap<Addr, u64> = LruHashMap::pinned(MAX_SOURCES, 0);

/// Per-tenant GCRA state, shared by all CPUs (see docs/architecture.md for the accuracy).
#[map(name = "GW_TEN_BUCKETS")]
pub static TENANT_BUCKETS: Array<u64> = Array::pinned(MAX_TENANTS, 0);

#[map(name = "GW_TEN_LIMITS")]
pub static TENANT_LIMITS: Array<TenantLimits> = Array::pinned(MAX_TENANTS, 0);

/// Non-zero while user space counts the tenant at its concurrent-connection cap.
#[map(name = "GW_TEN_OVERCAP")]
pub static TENANT_OVER_CAP: Array<u32> = Array::pinned(MAX_TENANTS, 0);

#[map(name = "GW_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map(name = "GW_COUNTERS")]
pub static COUNTERS: PerCpuArray<TenantCounters> = PerCpuArray::pinned(MAX_TENANTS, 0);

#[map(name = "GW_GLOBAL")]
pub static GLOBAL: PerCpuArray<u64> = PerCpuArray::pinned(GLOBAL_COUNTER_COUNT, 0);
