//! Typed access to the kernel program's pinned maps. Opening by pin path means the daemon's
//! control thread, the `gateway` CLI and tests all use the same accessors on the same maps.
//! Only the control thread of a running gateway writes configuration maps; bans may be written
//! by any holder (the kernel only reads them and removes expired entries).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key};
use gateway_common::{
    Addr, GlobalCounter, MAX_TENANTS, PORT_SLOTS, Settings, TenantCounters, TenantLimits,
    VERDICT_COUNT, map_names as names, v4_mapped,
};
use ipnet::IpNet;

use super::KernelError;

/// The key form of an address: 16 bytes, IPv4 mapped.
pub fn addr_key(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a key stands for (IPv4-mapped keys come back as IPv4).
pub fn key_addr(key: &Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(*key);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// The LPM key of a prefix: IPv4 `/n` is the mapped `/(96 + n)`.
pub fn net_key(net: &IpNet) -> Key<Addr> {
    match net {
        IpNet::V4(n) => Key::new(
            96 + u32::from(n.prefix_len()),
            v4_mapped(n.network().octets()),
        ),
        IpNet::V6(n) => Key::new(u32::from(n.prefix_len()), n.network().octets()),
    }
}

fn key_net(key: &Key<Addr>) -> Option<IpNet> {
    let len = key.prefix_len();
    let data = key.data();
    let v6 = Ipv6Addr::from(data);
    match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => ipnet::Ipv4Net::new(v4, (len - 96) as u8)
            .ok()
            .map(IpNet::V4),
        _ => ipnet::Ipv6Net::new(v6, len as u8).ok().map(IpNet::V6),
    }
}

/// Now on the clock the kernel program compares ban expiries with (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `d` after `from` on [`monotonic_ns`]'s clock (an expiry), saturating.
pub fn monotonic_after(from: u64, d: Duration) -> u64 {
    from.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Counters of one tenant, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantTotals {
    pub packets: [u64; VERDICT_COUNT],
    pub bytes: [u64; VERDICT_COUNT],
}

impl TenantTotals {
    pub fn packets(&self, v: gateway_common::Verdict) -> u64 {
        self.packets[v as usize]
    }
    pub fn is_zero(&self) -> bool {
        self.packets.iter().all(|p| *p == 0)
    }
}

/// A ban as stored: the address and how long it still holds (zero when expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub addr: IpAddr,
    pub remaining: Duration,
}

/// A banned prefix as stored: the prefix and how long it still holds (zero when expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetBan {
    pub net: IpNet,
    pub remaining: Duration,
}

/// Handles on every map of one gateway instance.
pub struct KernelMaps {
    pin_dir: PathBuf,
    ports: Array<MapData, u8>,
    tenant_nets: LpmTrie<MapData, Addr, u32>,
    deny_nets: LpmTrie<MapData, Addr, u8>,
    bans: HashMap<MapData, Addr, u64>,
    /// `None` for maps pinned by a gateway from before prefix bans (until it restarts).
    ban_nets: Option<LpmTrie<MapData, Addr, u64>>,
    tenant_limits: Array<MapData, TenantLimits>,
    tenant_over_cap: Array<MapData, u32>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, TenantCounters>,
    global: PerCpuArray<MapData, u64>,
    /// The configuration arrays as this handle last read or wrote them; `None` until the first
    /// [`KernelMaps::sync`].
    mirror: Option<Mirror>,
}

/// The arrays a sync compares with what it wants (the ports, the tenants' limits and
/// over-cap flags): read whole once, at the first sync (a map pinned by an earlier process
/// may hold anything), then kept in step with every write through this handle, the only
/// writer. Read whole on every reload they were 67,584 lookups, a system call each: 68 ms on
/// the control thread here, ~350 ms where system calls cost more, and a worker sharing its
/// core waited (p99 357 ms under reloads, `bench headline`).
struct Mirror {
    ports: BTreeSet<u16>,
    limits: Vec<TenantLimits>,
    over_cap: Vec<bool>,
}

fn open(dir: &Path, name: &'static str) -> Result<Map, KernelError> {
    let data = MapData::from_pin(dir.join(name))
        .map_err(|source| KernelError::Map { map: name, source })?;
    Map::from_map_data(data).map_err(|source| KernelError::Map { map: name, source })
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open($dir, $name)?
            .try_into()
            .map_err(|source| KernelError::Map { map: $name, source })?
    };
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError::Map { map, source }
}

/// As [`map_err`] for an insert into a prefix map, which fails with ENOSPC when it is full.
fn insert_err(map: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| match &source {
        MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOSPC) => {
            KernelError::Full {
                map,
                max: gateway_common::MAX_PREFIXES,
            }
        }
        _ => KernelError::Map { map, source },
    }
}

impl KernelMaps {
    /// Opens the maps pinned under `pin_dir` (e.g. `/sys/fs/bpf/mcp-gateway`).
    pub fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            ports: typed!(pin_dir, names::PORTS),
            tenant_nets: typed!(pin_dir, names::TENANT_NETS),
            deny_nets: typed!(pin_dir, names::DENY_NETS),
            bans: typed!(pin_dir, names::BANS),
            ban_nets: if pin_dir.join(names::BAN_NETS).exists() {
                Some(typed!(pin_dir, names::BAN_NETS))
            } else {
                None
            },
            tenant_limits: typed!(pin_dir, names::TENANT_LIMITS),
            tenant_over_cap: typed!(pin_dir, names::TENANT_OVER_CAP),
            settings: typed!(pin_dir, names::SETTINGS),
            counters: typed!(pin_dir, names::COUNTERS),
            global: typed!(pin_dir, names::GLOBAL),
            mirror: None,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Bans `ip` for `ttl`; a later ban of the same address replaces the earlier one.
    pub fn ban(&mut self, ip: IpAddr, ttl: Duration) -> Result<(), KernelError> {
        let expiry = monotonic_after(monotonic_ns(), ttl);
        self.bans
            .insert(addr_key(ip), expiry, 0)
            .map_err(map_err(names::BANS))
    }

    /// Lifts a ban. Returns whether there was one.
    pub fn unban(&mut self, ip: IpAddr) -> Result<bool, KernelError> {
        match self.bans.remove(&addr_key(ip)) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) if is_enoent(&e) => Ok(false),
            Err(e) => Err(map_err(names::BANS)(e)),
        }
    }

    /// Current bans, expired ones included until they are swept.
    pub fn bans(&self) -> Result<Vec<Ban>, KernelError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for item in self.bans.iter() {
            let (key, expiry) = item.map_err(map_err(names::BANS))?;
            out.push(Ban {
                addr: key_addr(&key),
                remaining: Duration::from_nanos(expiry.saturating_sub(now)),
            });
        }
        Ok(out)
    }

    /// Bans every address of `net` for `ttl`. A single address (`/32`, `/128`) goes to the
    /// address ban map, as [`KernelMaps::ban`]; a wider prefix to the prefix ban map.
    pub fn ban_net(&mut self, net: IpNet, ttl: Duration) -> Result<(), KernelError> {
        if net.prefix_len() == net.max_prefix_len() {
            return self.ban(net.addr(), ttl);
        }
        let expiry = monotonic_after(monotonic_ns(), ttl);
        self.ban_nets_mut()?
            .insert(&net_key(&net.trunc()), expiry, 0)
            .map_err(map_err(names::BAN_NETS))
    }

    /// Lifts the ban of exactly `net` (not of a prefix inside or around it). Returns whether
    /// there was one.
    pub fn unban_net(&mut self, net: IpNet) -> Result<bool, KernelError> {
        if net.prefix_len() == net.max_prefix_len() {
            return self.unban(net.addr());
        }
        match self.ban_nets_mut()?.remove(&net_key(&net.trunc())) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) if is_enoent(&e) => Ok(false),
            Err(e) => Err(map_err(names::BAN_NETS)(e)),
        }
    }

    /// When the ban of `net` ends (`CLOCK_MONOTONIC` ns), or none. A prefix is looked up as
    /// the kernel does: the longest banned prefix holding it, `net` itself where banned.
    pub fn ban_end(&self, net: IpNet) -> Result<Option<u64>, KernelError> {
        let got = if net.prefix_len() == net.max_prefix_len() {
            self.bans
                .get(&addr_key(net.addr()), 0)
                .map_err(map_err(names::BANS))
        } else {
            let Some(map) = &self.ban_nets else {
                return Ok(None);
            };
            map.get(&net_key(&net.trunc()), 0)
                .map_err(map_err(names::BAN_NETS))
        };
        match got {
            Ok(end) => Ok(Some(end)),
            Err(KernelError::Map {
                source: MapError::KeyNotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Banned prefixes, expired ones included until they are swept.
    pub fn net_bans(&self) -> Result<Vec<NetBan>, KernelError> {
        let Some(map) = &self.ban_nets else {
            return Ok(Vec::new());
        };
        let now = monotonic_ns();
        let mut out = Vec::new();
        for item in map.iter() {
            let (key, expiry) = item.map_err(map_err(names::BAN_NETS))?;
            if let Some(net) = key_net(&key) {
                out.push(NetBan {
                    net,
                    remaining: Duration::from_nanos(expiry.saturating_sub(now)),
                });
            }
        }
        Ok(out)
    }

    fn ban_nets_mut(&mut self) -> Result<&mut LpmTrie<MapData, Addr, u64>, KernelError> {
        let path = self.pin_dir.join(names::BAN_NETS);
        self.ban_nets.as_mut().ok_or_else(|| KernelError::Bpffs {
            path: path.display().to_string(),
            problem: "no prefix ban map: the running gateway predates prefix bans (restart it with this version)".into(),
        })
    }

    /// Removes expired bans (addresses and prefixes); returns how many.
    pub fn sweep_bans(&mut self) -> Result<usize, KernelError> {
        let now = monotonic_ns();
        let mut swept = 0;
        if let Some(map) = &mut self.ban_nets {
            let expired: Vec<Key<Addr>> = map
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, expiry)| *expiry <= now)
                .map(|(k, _)| k)
                .collect();
            for key in &expired {
                let _gone_already = map.remove(key);
            }
            swept += expired.len();
        }
        let expired: Vec<Addr> = self
            .bans
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, expiry)| *expiry <= now)
            .map(|(k, _)| k)
            .collect();
        for key in &expired {
            // Gone already is fine (`gateway kernel unban` from another process).
            let _gone_already = self.bans.remove(key);
        }
        Ok(swept + expired.len())
    }

    /// Counters of one tenant, summed over CPUs.
    pub fn tenant_counters(&self, tenant: u32) -> Result<TenantTotals, KernelError> {
        let per_cpu = self
            .counters
            .get(&tenant, 0)
            .map_err(map_err(names::COUNTERS))?;
        let mut total = TenantTotals::default();
        for c in per_cpu.iter() {
            for v in 0..VERDICT_COUNT {
                total.packets[v] += c.packets[v];
                total.bytes[v] += c.bytes[v];
            }
        }
        Ok(total)
    }

    /// Every tenant with a non-zero counter.
    pub fn all_counters(&self) -> Result<Vec<(u32, TenantTotals)>, KernelError> {
        let mut out = Vec::new();
        for tenant in 0..MAX_TENANTS {
            let t = self.tenant_counters(tenant)?;
            if !t.is_zero() {
                out.push((tenant, t));
            }
        }
        Ok(out)
    }

    /// Counters of packets that were not the gateway's, summed over CPUs.
    pub fn global_counters(&self) -> Result<Vec<(GlobalCounter, u64)>, KernelError> {
        // A counter past the end of the map (one an earlier version's pin lacks) is 0.
        GlobalCounter::ALL
            .iter()
            .map(|c| match self.global.get(&(*c as u32), 0) {
                Ok(v) => Ok((*c, v.iter().sum())),
                Err(aya::maps::MapError::OutOfBounds { .. }) => Ok((*c, 0)),
                Err(e) => Err(map_err(names::GLOBAL)(e)),
            })
            .collect()
    }

    /// Raises or lowers the tenant's at-cap flag, which makes the kernel drop its SYNs.
    pub fn set_over_cap(&mut self, tenant: u32, over: bool) -> Result<(), KernelError> {
        self.tenant_over_cap
            .set(tenant, u32::from(over), 0)
            .map_err(map_err(names::TENANT_OVER_CAP))?;
        if let Some(flag) = self
            .mirror
            .as_mut()
            .and_then(|m| m.over_cap.get_mut(tenant as usize))
        {
            *flag = over;
        }
        Ok(())
    }

    pub fn over_cap(&self, tenant: u32) -> Result<bool, KernelError> {
        Ok(self
            .tenant_over_cap
            .get(&tenant, 0)
            .map_err(map_err(names::TENANT_OVER_CAP))?
            != 0)
    }

    /// Writes the configuration into the maps. Order matters so that traffic is never judged
    /// against half a configuration: limits and the default tenant first, then new prefixes are
    /// inserted (an insert replaces an equal prefix atomically) before stale ones are removed,
    /// and new ports are switched on last, when everything they need is in place.
    pub fn sync(&mut self, desired: &KernelState) -> Result<SyncReport, KernelError> {
        let mut report = SyncReport::default();
        let mut mirror = match self.mirror.take() {
            Some(m) => m,
            None => self.read_mirror()?,
        };
        // Kept whatever happens below: each write is mirrored as soon as it succeeded.
        let result = self.sync_with(desired, &mut mirror, &mut report);
        self.mirror = Some(mirror);
        result.map(|()| report)
    }

    fn read_mirror(&self) -> Result<Mirror, KernelError> {
        let mut limits = Vec::with_capacity(MAX_TENANTS as usize);
        let mut over_cap = Vec::with_capacity(MAX_TENANTS as usize);
        for tenant in 0..MAX_TENANTS {
            limits.push(self.tenant_limits(tenant)?);
            over_cap.push(self.over_cap(tenant)?);
        }
        Ok(Mirror {
            ports: self.ports()?,
            limits,
            over_cap,
        })
    }

    fn sync_with(
        &mut self,
        desired: &KernelState,
        mirror: &mut Mirror,
        report: &mut SyncReport,
    ) -> Result<(), KernelError> {
        let current_ports = mirror.ports.clone();
        for port in current_ports.difference(&desired.ports) {
            self.ports
                .set(u32::from(*port), 0, 0)
                .map_err(map_err(names::PORTS))?;
            mirror.ports.remove(port);
            report.ports_removed += 1;
        }
        for tenant in 0..MAX_TENANTS {
            let want = desired
                .limits
                .iter()
                .find(|(id, _)| *id == tenant)
                .map(|(_, l)| *l)
                .unwrap_or_default();
            let t = tenant as usize;
            if mirror.limits[t] != want {
                self.tenant_limits
                    .set(tenant, want, 0)
                    .map_err(map_err(names::TENANT_LIMITS))?;
                mirror.limits[t] = want;
            }
            if !desired.capped.contains(&tenant) && mirror.over_cap[t] {
                // The mirror is out of `self` while this runs: kept here.
                self.set_over_cap(tenant, false)?;
                mirror.over_cap[t] = false;
            }
        }
        self.settings
            .set(
                0,
                Settings {
                    default_tenant: desired.default_tenant,
                    _reserved: 0,
                },
                0,
            )
            .map_err(map_err(names::SETTINGS))?;

        // A prefix already there with its value is not written again: a full map refuses even
        // the rewrite of a key it holds on kernels before 6.14, which would refuse a sync (and
        // its rollback) that changes nothing there.
        let have: Vec<(Key<Addr>, u32)> = self
            .tenant_nets
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::TENANT_NETS))?;
        let present: std::collections::HashMap<IpNet, u32> = have
            .iter()
            .filter_map(|(k, t)| key_net(k).map(|n| (n, *t)))
            .collect();
        for (net, tenant) in &desired.tenant_nets {
            let key = net_key(net);
            if key_net(&key).and_then(|n| present.get(&n)) == Some(tenant) {
                continue;
            }
            self.tenant_nets
                .insert(&key, tenant, 0)
                .map_err(insert_err(names::TENANT_NETS))?;
        }
        for (key, _) in have {
            if key_net(&key).is_none_or(|n| !desired.tenant_nets.iter().any(|(d, _)| *d == n)) {
                self.tenant_nets
                    .remove(&key)
                    .map_err(map_err(names::TENANT_NETS))?;
                report.prefixes_removed += 1;
            }
        }

        let have: Vec<Key<Addr>> = self
            .deny_nets
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::DENY_NETS))?;
        let present: std::collections::HashSet<IpNet> = have.iter().filter_map(key_net).collect();
        for net in &desired.deny {
            let key = net_key(net);
            if key_net(&key).is_some_and(|n| present.contains(&n)) {
                continue;
            }
            self.deny_nets
                .insert(&key, 1, 0)
                .map_err(insert_err(names::DENY_NETS))?;
        }
        for key in have {
            if key_net(&key).is_none_or(|n| !desired.deny.contains(&n)) {
                self.deny_nets
                    .remove(&key)
                    .map_err(map_err(names::DENY_NETS))?;
                report.prefixes_removed += 1;
            }
        }

        for port in desired.ports.difference(&current_ports) {
            self.ports
                .set(u32::from(*port), 1, 0)
                .map_err(map_err(names::PORTS))?;
            mirror.ports.insert(*port);
            report.ports_added += 1;
        }
        Ok(())
    }

    /// A tenant's new-connection limits as the program reads them.
    pub fn tenant_limits(&self, tenant: u32) -> Result<TenantLimits, KernelError> {
        self.tenant_limits
            .get(&tenant, 0)
            .map_err(map_err(names::TENANT_LIMITS))
    }

    /// The ports the program currently guards.
    pub fn ports(&self) -> Result<BTreeSet<u16>, KernelError> {
        let mut out = BTreeSet::new();
        for port in 0..PORT_SLOTS {
            if self.ports.get(&port, 0).map_err(map_err(names::PORTS))? != 0 {
                out.insert(port as u16);
            }
        }
        Ok(out)
    }
}

fn is_enoent(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// What the maps should hold, derived from a [`crate::config::Config`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub ports: BTreeSet<u16>,
    pub tenant_nets: Vec<(IpNet, u32)>,
    pub deny: Vec<IpNet>,
    pub limits: Vec<(u32, TenantLimits)>,
    /// Tenants that have a connection cap (the flag of any other is kept lowered).
    pub capped: BTreeSet<u32>,
    pub default_tenant: u32,
}

impl KernelState {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self::shared_by(c, 1)
    }

    /// As [`Self::from_config`], for one of `hosts` live gateways of a fleet (`[state] redis`):
    /// the limits are [`crate::config::Config::connection_limits`].
    pub fn shared_by(c: &crate::config::Config, hosts: u64) -> Self {
        let mut s = KernelState {
            ports: c.ports(),
            deny: c.kernel.deny.clone(),
            default_tenant: c.default_tenant,
            ..Default::default()
        };
        for t in &c.tenants {
            s.tenant_nets.extend(t.sources.iter().map(|n| (*n, t.id)));
            s.limits.push((t.id, c.connection_limits(t, hosts)));
            if t.max_connections.is_some() {
                s.capped.insert(t.id);
            }
        }
        s
    }
}

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub ports_added: usize,
    pub ports_removed: usize,
    pub prefixes_removed: usize,
}
