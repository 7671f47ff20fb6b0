//! The control thread: a single-threaded tokio runtime that owns the configuration, the kernel
//! program and its maps, the admin API, and the closed loop that turns user space's connection
//! counts into the kernel's per-tenant at-cap flags. Nothing here runs on the request path.

use std::{
    net::TcpListener,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use std::sync::atomic::Ordering::{Relaxed, Release};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use tokio::{signal::unix::SignalKind, sync::watch};

mod start;
use start::{
    KernelStart, Serving, Signals, announce, bind_admin, bind_listeners, finish_takeover,
    prepare_serving, restore_state, share, start_kernel,
};

use crate::{
    config::Config,
    kernel::{self, Kernel, KernelMaps, KernelState},
    runtime,
    shared::{BanSet, Shared, Snapshot},
    stats::{Aggregator, HistogramLog},
    telemetry, upgrade,
};

/// What the admin API and the control loop share (on the control thread only).
struct Control {
    shared: Arc<Shared>,
    maps: Option<KernelMaps>,
    config_path: Option<PathBuf>,
    stats: Aggregator,
    /// Serving: workers running (and the kernel program attached, when enabled); false again
    /// once draining starts.
    ready: bool,
    /// The TLS files as they were when last loaded (the reload watcher compares).
    tls_stamps: Vec<crate::tls::Stamp>,
    /// The same of the https upstreams' files.
    upstream_tls_stamps: Vec<crate::tls::Stamp>,
    /// Bans in force: address (a one-address prefix) or prefix → expiry (`CLOCK_MONOTONIC`
    /// ns, the kernel's clock). With the kernel program on, a copy of its two ban maps (which
    /// the `gateway kernel ban` command and earlier runs also write); without it, the only
    /// record. Published to the workers as `Shared::bans`, for the clients named by PROXY
    /// protocol headers.
    bans: std::collections::BTreeMap<IpNet, u64>,
    /// Which of `bans` are IPv6 auto-bans (a client's /64, or a prefix one was widened to),
    /// with the end each was made with: only they count towards widening, and only they are
    /// lifted by a wider one. An operator's ban is never: one made again by the admin API, or
    /// by `gateway kernel ban` (seen as its end moving in the kernel's map), is the operator's
    /// from then on. Kept across a restart and an upgrade by the state store.
    auto_bans: std::collections::BTreeMap<IpNet, u64>,
    /// The state store (none when `[state] disabled`), and whether its last flush failed.
    store: Option<crate::state::Store>,
    store_failing: bool,
    /// After a handover: the new process, told at the end of the drain what was counted here
    /// since the store was closed (`counts_at_close`), which no store or fleet would see.
    successor: Option<upgrade::Predecessor>,
    counts_at_close: std::collections::HashMap<u64, crate::policy::limits::WindowCount>,
    /// XDP attachments in place, as last checked: (interface, mode), for `/metrics`.
    xdp: Vec<(String, &'static str)>,
    /// Interfaces of `kernel.interfaces` without the program now, and why: `/readyz` says not
    /// ready while there are any.
    xdp_missing: Vec<(String, String)>,
    /// Attachments made again since start (an interface made again, a pin removed).
    xdp_reattached: u64,
    /// Configuration changes applied and refused, by source.
    reloads: Reloads,
    /// The live hosts of the fleet the kernel's tenant rates were last divided by (1 without
    /// a fleet).
    kernel_hosts: u64,
    /// Every tenant's at-cap flag has been written since start: the kernel's copy is pinned
    /// and may still say "at cap" from a process that stopped there, where no count would ever
    /// change it again.
    caps_written: bool,
    /// The tenant that last held each id in a configuration in force (a removed tenant's
    /// kept): its connections may still be open, counted under the id.
    id_holders: std::collections::HashMap<u32, String>,
}

impl Control {
    /// Merges what the workers have sent since the last call.
    fn drain_stats(&mut self) {
        let rx = self
            .shared
            .stats_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Ok(interval) = rx.try_recv() {
            self.stats.add(interval);
        }
    }

    /// Bans the sources the workers found abusive (the auto-ban loop): an IPv4 address, or an
    /// IPv6 address's /64, as refusals are counted (any address in it is the client's to
    /// take). All of a turn's at once, the workers handed the new set once, and none a ban in
    /// force covers already. Before, the one address of a /64 that went past the count was
    /// banned: each other address of it had one guess and a ban of its own, 15,000 in a second
    /// from one /64, and the control thread rebuilt the workers' set for each (at 100 % of a
    /// core for minutes, `/healthz` unanswered: an attacker's review).
    fn apply_auto_bans(&mut self) {
        let rx = self
            .shared
            .ban_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut wanted: std::collections::BTreeMap<IpNet, (std::net::IpAddr, Duration)> =
            std::collections::BTreeMap::new();
        while let Ok((ip, ttl)) = rx.try_recv() {
            wanted.insert(auto_ban_net(ip), (ip.to_canonical(), ttl));
        }
        drop(rx);
        if wanted.is_empty() {
            return;
        }
        let snapshot = self.shared.snapshot.load_full();
        let in_force = self.shared.bans.load_full();
        let now = kernel::monotonic_ns();
        let mut bans = Vec::with_capacity(wanted.len());
        let trusted = |within: &IpNet| {
            snapshot.config.listeners.iter().any(|l| {
                l.proxy_protocol.as_ref().is_some_and(|p| {
                    p.trusted
                        .iter()
                        .any(|n| n.contains(&within.addr()) || within.contains(n))
                })
            })
        };
        // Not widened over: a balancer's address, nor a tenant's whole `sources` prefix (the
        // operator named those clients; a wider ban would take them all, or several tenants').
        let protected = |wide: &IpNet| {
            trusted(wide)
                || snapshot
                    .config
                    .tenants
                    .iter()
                    .any(|t| t.sources.iter().any(|n| wide.contains(n)))
        };
        for (mut net, (ip, ttl)) in wanted {
            if in_force.is_banned(ip, now) {
                continue;
            }
            // A load balancer's own address earns refusals only through its own connections
            // (v2 LOCAL: health checks); banning it would cut off every client behind it. A /64
            // that holds one: the client's address alone.
            if trusted(&net) {
                net = IpNet::from(ip);
                if trusted(&net) {
                    tracing::warn!(
                        source = %ip,
                        "auto-ban wanted for a trusted load balancer's address; not banned"
                    );
                    continue;
                }
            }
            bans.push((net, ttl));
        }
        let widen_at = snapshot
            .config
            .auto_ban
            .as_ref()
            .map_or(0, |b| b.ipv6_widen_at);
        let (bans, widened) = self.widened(bans, widen_at, now, protected);
        let mut failed = self.ban_all(&bans);
        // A widened ban the kernel's map had no room for: the auto-bans inside it are lifted
        // first (they free more entries than it takes) and it is made again. Else a full map
        // stayed full: the auto-bans inside held their entries, and the prefix was not banned.
        let mut lifted = 0;
        let mut remade = false;
        failed.retain(|(net, _)| {
            let IpNet::V6(wide) = net else { return true };
            let Some((_, ttl)) = bans.iter().find(|(n, _)| n == net) else {
                return true;
            };
            if wide.prefix_len() >= 64 {
                return true;
            }
            let until = kernel::monotonic_after(kernel::monotonic_ns(), *ttl);
            let freed = self.lift_inside(*wide, until);
            lifted += freed;
            if freed == 0 || self.hold_ban(*net, *ttl).is_err() {
                return true;
            }
            remade = true;
            false
        });
        if remade {
            self.publish_bans();
        }
        let how = if self.maps.is_some() {
            "the kernel drops this source now"
        } else {
            "the kernel program is off, so the workers refuse this source (its packets reach the stack)"
        };
        let not_made: std::collections::HashSet<IpNet> = failed.iter().map(|(n, _)| *n).collect();
        for (net, _) in &bans {
            if let IpNet::V6(v6) = net
                && !not_made.contains(net)
            {
                let Some(&until) = self.bans.get(net) else {
                    continue;
                };
                self.auto_bans.insert(*net, until);
                if v6.prefix_len() < 64 {
                    lifted += self.lift_inside(*v6, until);
                }
            }
        }
        if lifted > 0 {
            self.publish_bans();
        }
        for (wide, inside) in widened
            .iter()
            .filter(|(w, _)| !not_made.contains(&IpNet::V6(*w)))
        {
            tracing::warn!(
                prefix = %wide,
                bans_inside = inside,
                lifted_this_turn = lifted,
                "auto-ban widened: the prefix held {inside} auto-bans; banned whole, the bans inside lifted"
            );
        }
        let mut made = bans.iter().filter(|(net, _)| !not_made.contains(net));
        for (net, ttl) in made.by_ref().take(16) {
            tracing::warn!(
                source = %ban_text(*net),
                ban_s = ttl.as_secs(),
                "auto-ban: repeated refusals; {how}"
            );
        }
        let more = made.count();
        if more > 0 {
            tracing::warn!(more, "auto-ban: repeated refusals; {how}");
        }
        for (net, e) in failed.iter().take(16) {
            tracing::error!(source = %ban_text(*net), "auto-ban failed: {e}");
        }
        if failed.len() > 16 {
            tracing::error!(more = failed.len() - 16, "auto-ban failed");
        }
    }

    /// A turn's auto-bans (`bans`), each IPv6 /64 widened where auto-bans lie together: to its
    /// /56 when that holds `at` of them in force or of this turn (this one counted), and to its
    /// /48 when that holds 4 × `at` (a widened /56 counted as one; whether or not the /56 was
    /// widened); a widened ban takes the place of this turn's bans inside it, and a ban a wider
    /// one of this turn holds is not made. A client holds many /64s (a /48 holds 65,536, and a
    /// tunnel broker gives one away): banned one /64 at a time, one client filled the kernel's
    /// prefix ban map (16,384), and past it no auto-ban of anyone was made. Never to a prefix
    /// `protected` says holds others (a trusted balancer, a tenant's `sources`), nor one that
    /// meets space where a /64 is not one client's (`::/56` holds every IPv4 address to the
    /// kernel). Only auto-bans count, never an operator's. `at` 0: none widened. Returns the
    /// bans and, of each widened one, how many auto-bans it held.
    fn widened(
        &mut self,
        bans: Vec<(IpNet, Duration)>,
        at: u32,
        now: u64,
        protected: impl Fn(&IpNet) -> bool,
    ) -> (Vec<(IpNet, Duration)>, Vec<Widened>) {
        let bans_in_force = &self.bans;
        self.auto_bans
            .retain(|net, _| bans_in_force.get(net).is_some_and(|until| *until > now));
        if at == 0 {
            return (bans, Vec::new());
        }
        let at = at as usize;
        let slash48 = |v6: &ipnet::Ipv6Net| u128::from(v6.addr()) >> 80;
        self.made_again_since(
            bans.iter()
                .filter_map(|(net, _)| match net {
                    IpNet::V6(v6) => ipnet::Ipv6Net::new(v6.addr(), 48).ok().map(|n| n.trunc()),
                    IpNet::V4(_) => None,
                })
                .collect(),
        );
        // The auto-bans in force and of this turn, by /48: a new ban looks at its own /48's.
        let mut held: std::collections::HashMap<u128, Vec<ipnet::Ipv6Net>> =
            std::collections::HashMap::new();
        for net in self.auto_bans.keys() {
            if let IpNet::V6(v6) = net {
                held.entry(slash48(v6)).or_default().push(*v6);
            }
        }
        let mut out: Vec<(IpNet, Duration)> = Vec::with_capacity(bans.len());
        let mut widened = Vec::new();
        for (net, ttl) in bans {
            let IpNet::V6(mut v6) = net else {
                out.push((net, ttl));
                continue;
            };
            let near = held.entry(slash48(&v6)).or_default();
            if near
                .iter()
                .any(|h| h.prefix_len() < v6.prefix_len() && h.contains(&v6))
            {
                // A wider ban of this turn holds it already.
                continue;
            }
            let mut held_inside = 0;
            if v6.prefix_len() == 64 {
                for (len, needed) in [(56, at), (48, at.saturating_mul(4))] {
                    let Ok(wide) = ipnet::Ipv6Net::new(v6.addr(), len).map(|n| n.trunc()) else {
                        break;
                    };
                    if crate::policy::limits::meets_shared_space(wide)
                        || protected(&IpNet::V6(wide))
                    {
                        break;
                    }
                    // Bans inside this one (the /64, or the /56 it widened to) are it.
                    let inside = near
                        .iter()
                        .filter(|h| h.prefix_len() > len && wide.contains(*h) && !v6.contains(*h))
                        .count()
                        + 1;
                    if inside < needed {
                        // The /48 may hold enough without this /56.
                        continue;
                    }
                    held_inside = inside;
                    v6 = wide;
                }
            }
            if v6.prefix_len() < 64 {
                out.retain(|(n, _)| !matches!(n, IpNet::V6(o) if v6.contains(o)));
                near.retain(|h| !v6.contains(h));
                widened.retain(|(w, _): &Widened| !v6.contains(w));
                widened.push((v6, held_inside));
            }
            near.push(v6);
            out.push((IpNet::V6(v6), ttl));
        }
        (out, widened)
    }

    /// Takes the auto-bans in the /48s `near` that were made again since
    /// (`gateway kernel ban` writes the kernel's map alone: seen as their end moved) as the
    /// operator's, before a widening counts them: the control thread's copy of the map is read
    /// again only every few seconds. One lookup each, of the few a /48 holds.
    fn made_again_since(&mut self, near: std::collections::BTreeSet<ipnet::Ipv6Net>) {
        let Some(maps) = &self.maps else {
            return;
        };
        let mut again = Vec::new();
        for n48 in near {
            for (net, made) in self.auto_bans.range(within(n48)) {
                match maps.ban_end(*net) {
                    Ok(Some(end)) if end.abs_diff(*made) <= 1_000_000_000 => {}
                    Ok(Some(end)) => again.push((*net, Some(end))),
                    Ok(None) => again.push((*net, None)),
                    Err(e) => tracing::warn!(prefix = %ban_text(*net), "reading a ban: {e}"),
                }
            }
        }
        for (net, end) in again {
            self.auto_bans.remove(&net);
            // Lifted (`gateway kernel unban`). An end that moved may be a wider ban's (the
            // lookup is the kernel's, longest prefix first): left to the next reading of the
            // maps, which are the record.
            if end.is_none() {
                self.bans.remove(&net);
            }
        }
    }

    /// Lifts the auto-bans strictly inside `wide` (a ban made, or to be made, until `until`)
    /// that end no later than it (give or take the second the kernel's ban map rounds to): it
    /// holds them, and their entries in the kernel's ban map are freed. Never an operator's
    /// ban. Returns how many. The workers are not handed the new set here.
    fn lift_inside(&mut self, wide: ipnet::Ipv6Net, until: u64) -> usize {
        let until = until.saturating_add(1_000_000_000);
        let inner: Vec<IpNet> = self
            .auto_bans
            .range(within(wide))
            .map(|(net, _)| *net)
            .filter(|net| {
                *net != IpNet::V6(wide)
                    && IpNet::V6(wide).contains(net)
                    && self.bans.get(net).is_some_and(|ends| *ends <= until)
            })
            .collect();
        let mut lifted = 0;
        for net in inner {
            if let Some(maps) = &mut self.maps
                && let Err(e) = maps.unban_net(net)
            {
                tracing::warn!(prefix = %ban_text(net), "lifting a ban a wider one holds: {e}");
                continue;
            }
            self.bans.remove(&net);
            self.auto_bans.remove(&net);
            lifted += 1;
        }
        lifted
    }

    /// Bans `ip` for `ttl`: in the kernel's ban map (when the program is on) and for the
    /// workers.
    fn ban(&mut self, ip: std::net::IpAddr, ttl: Duration) -> Result<(), kernel::KernelError> {
        self.ban_net(IpNet::from(ip.to_canonical()), ttl)
    }

    /// Bans every address of `net` for `ttl` (one address when it is a `/32` or `/128`).
    fn ban_net(&mut self, net: IpNet, ttl: Duration) -> Result<(), kernel::KernelError> {
        self.ban_nets(&[(net, ttl)]).1.map_or(Ok(()), Err)
    }

    /// Bans each of `bans` in turn, and hands the workers the new set once (an operator's
    /// blocklist of thousands in one request). On a failure (a kernel map full, say) the bans
    /// before it stand, and are published. Returns how many were banned, and the failure.
    fn ban_nets(&mut self, bans: &[(IpNet, Duration)]) -> (usize, Option<kernel::KernelError>) {
        let mut done = 0;
        let mut failed = None;
        for (net, ttl) in bans {
            let net = canonical_net(*net);
            if let Err(e) = self.hold_ban(net, *ttl) {
                failed = Some(e);
                break;
            }
            // Made again here, it is no longer an auto-ban (a wider one never lifts it).
            self.auto_bans.remove(&net);
            done += 1;
        }
        if done > 0 {
            self.publish_bans();
        }
        (done, failed)
    }

    /// Bans `net` (canonical) for `ttl` in the kernel's maps (when the program is on) and in
    /// the record the workers are handed ([`Control::publish_bans`], left to the caller).
    fn hold_ban(&mut self, net: IpNet, ttl: Duration) -> Result<(), kernel::KernelError> {
        if let Some(maps) = &mut self.maps {
            maps.ban_net(net, ttl)?;
        }
        let until = kernel::monotonic_after(kernel::monotonic_ns(), ttl);
        self.bans.insert(net, until);
        Ok(())
    }

    /// Bans each of `bans`, past failures (the workers handed the new set once); returns those
    /// that failed. Never a prefix that holds every IPv4 address to the kernel
    /// (`::ffff:0:0/96`): the admin API and the CLI refuse one, and it fails here whatever path
    /// it comes by (bans read back from the state store included).
    fn ban_all(&mut self, bans: &[(IpNet, Duration)]) -> Vec<(IpNet, String)> {
        let mut failed = Vec::new();
        let mut done = 0;
        for (net, ttl) in bans {
            let canonical = canonical_net(*net);
            if crate::config::covers_ipv4(&canonical).is_some() {
                failed.push((*net, "it holds every IPv4 address to the kernel".to_owned()));
                continue;
            }
            match self.hold_ban(canonical, *ttl) {
                Ok(()) => done += 1,
                Err(e) => failed.push((*net, e.to_string())),
            }
        }
        if done > 0 {
            self.publish_bans();
        }
        failed
    }

    /// Lifts a ban; returns whether there was one.
    fn unban(&mut self, ip: std::net::IpAddr) -> Result<bool, kernel::KernelError> {
        self.unban_net(IpNet::from(ip.to_canonical()))
    }

    /// Lifts the ban of exactly `net` (not of a prefix inside or around it); returns whether
    /// there was one.
    fn unban_net(&mut self, net: IpNet) -> Result<bool, kernel::KernelError> {
        let net = canonical_net(net);
        let in_kernel = match &mut self.maps {
            Some(maps) => maps.unban_net(net)?,
            None => false,
        };
        let here = self.bans.remove(&net).is_some();
        self.auto_bans.remove(&net);
        self.publish_bans();
        if in_kernel || here {
            // The refusals that led to an auto-ban go with it (a lifted address was banned
            // again at its next refusal for the rest of the window: a review).
            self.shared.limits.forget_refusals(&net);
        }
        Ok(in_kernel || here)
    }

    /// Takes the kernel's ban map as the record (bans written by the CLI or an earlier run
    /// included), sweeps expired entries, and publishes the bans in force to the workers.
    fn refresh_bans(&mut self) {
        let now = kernel::monotonic_ns();
        if let Some(maps) = &mut self.maps {
            if let Err(e) = maps.sweep_bans() {
                tracing::warn!(error = %e, "sweeping expired bans failed");
            }
            let until = |left: Duration| kernel::monotonic_after(now, left);
            match (maps.bans(), maps.net_bans()) {
                (Ok(addrs), Ok(nets)) => {
                    self.bans = addrs
                        .into_iter()
                        .map(|b| (IpNet::from(b.addr.to_canonical()), until(b.remaining)))
                        .chain(
                            nets.into_iter()
                                .map(|b| (canonical_net(b.net), until(b.remaining))),
                        )
                        .collect();
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "reading the ban maps failed");
                }
            }
        }
        self.bans.retain(|_, until| *until > now);
        // An auto-ban whose end moved was made again by someone else (`gateway kernel ban`
        // writes the kernel's map alone): the operator's now. Its end read back is exact to
        // the time the reading took; a second's slack.
        let bans = &self.bans;
        self.auto_bans.retain(|net, made| {
            bans.get(net)
                .is_some_and(|until| until.abs_diff(*made) <= 1_000_000_000)
        });
        self.publish_bans();
    }

    /// Takes the auto-bans the state store kept (with the time each was made to last) as
    /// auto-bans again, where the same ban is in force now: before, every ban read back after
    /// a restart or an upgrade was the operator's, so a client's /64s banned before it neither
    /// counted towards a widening nor were lifted by one.
    fn adopt_auto_bans(&mut self, kept: Vec<(IpNet, Duration)>) {
        let now = kernel::monotonic_ns();
        for (net, left) in kept {
            let net = canonical_net(net);
            let made = kernel::monotonic_after(now, left);
            // The store keeps ends to the millisecond, rewritten when they moved by a second.
            if let Some(&until) = self.bans.get(&net)
                && until.abs_diff(made) <= 2_000_000_000
            {
                self.auto_bans.insert(net, until);
            }
        }
    }

    fn publish_bans(&self) {
        let current = self.shared.bans.load();
        if current.is_empty() && self.bans.is_empty() {
            return;
        }
        // A ban in force the workers do not hold now (new, or made again after it ended):
        // they cut its clients' open connections. Not a ban read again from the kernel's
        // maps, whose end moves by the reading's rounding every second.
        let now = kernel::monotonic_ns();
        let added = self.bans.iter().any(|(net, until)| {
            *until > now && current.until_of(net).is_none_or(|ends| ends <= now)
        });
        self.shared.bans.store(Arc::new(BanSet::new(
            self.bans.iter().map(|(ip, until)| (*ip, *until)),
        )));
        if added {
            self.shared.sources_changed.fetch_add(1, Release);
        }
    }

    /// The bans in force (addresses as one-address prefixes), with the time each has left.
    fn list_bans(&mut self) -> Vec<(IpNet, Duration)> {
        self.refresh_bans();
        let now = kernel::monotonic_ns();
        self.bans
            .iter()
            .map(|(net, until)| (*net, Duration::from_nanos(until.saturating_sub(now))))
            .collect()
    }

    /// Writes what changed to the state store (every flush interval, and at shutdown after
    /// the workers stopped). A failure is logged once, counted, and tried again next time.
    fn flush_state(&mut self) {
        let Some(store) = &mut self.store else {
            return;
        };
        let now = kernel::monotonic_ns();
        let auto = &self.auto_bans;
        let bans = self.bans.iter().map(|(net, until)| {
            (
                *net,
                Duration::from_nanos(until.saturating_sub(now)),
                auto.contains_key(net),
            )
        });
        let shared = &self.shared;
        match store.flush_counted(&shared.state, &shared.pins, &shared.limits, bans) {
            Ok(f) => {
                if self.store_failing {
                    tracing::info!(file = %store.path().display(), "state store written again");
                }
                self.store_failing = false;
                if f.written + f.deleted > 0 {
                    tracing::debug!(written = f.written, deleted = f.deleted, "state flushed");
                }
            }
            Err(e) => {
                if !self.store_failing {
                    tracing::error!(
                        "{e}; kept in memory and tried again every flush interval (the file opened again)"
                    );
                }
                self.store_failing = true;
            }
        }
    }

    /// The last flush, at a stop: a failure is said whatever came before it, with what is lost.
    pub(super) fn flush_last(&mut self) {
        self.flush_state();
        if self.store_failing {
            let since = self.shared.state.last_good_unix_s.load(Relaxed);
            tracing::error!(
                last_good_write_unix_s = since,
                "the state store's last write at this stop failed: spend, pins, approvals and bans changed since its last good write are lost"
            );
        }
    }

    /// Writes what changed and closes the state store (a binary upgrade: the new process opens
    /// it next; redb allows one process at a time).
    fn close_store(&mut self) {
        self.flush_state();
        self.store = None;
        self.shared.fleet.paused.store(true, Relaxed);
        self.counts_at_close = self
            .shared
            .limits
            .kept_counts()
            .into_iter()
            .map(|(key, _, count)| (key, count))
            .collect();
    }

    /// After a handover, at the end of the drain: sends the new process what was counted here
    /// since the store was closed. Before, the calls served while draining (one per
    /// connection, each answered `connection: close`) were charged nowhere: every upgrade gave
    /// each open connection a free call (an operator's review).
    pub(super) fn send_late(&mut self) {
        let Some(successor) = self.successor.take() else {
            return;
        };
        let late: Vec<_> = self
            .shared
            .limits
            .kept_counts()
            .into_iter()
            .filter_map(|(key, what, mut count)| {
                let before = self
                    .counts_at_close
                    .get(&key)
                    .filter(|b| b.window == count.window)
                    .map_or(0, |b| b.used);
                count.used = count.used.checked_sub(before).filter(|n| *n > 0)?;
                Some((what, count))
            })
            .collect();
        if late.is_empty() {
            return;
        }
        let n = late.len();
        match successor.send_late(late) {
            Ok(()) => tracing::info!(
                counts = n,
                "what was counted while draining went to the new process"
            ),
            Err(e) => tracing::error!(
                counts = n,
                "what was counted while draining could not reach the new process ({e}): that spend is lost"
            ),
        }
    }

    /// Opens the state store again after an upgrade that failed (what is in memory is the
    /// record; the next flush writes it).
    fn reopen_store(&mut self, dir: &std::path::Path) {
        match crate::state::Store::open(dir) {
            Ok(store) => self.store = Some(store),
            Err(e) => tracing::error!("{e}; state is kept in memory only until a restart"),
        }
    }

    /// Bans again what the store's mirror holds, when the kernel's map has none (a fresh map
    /// after a reboot) or the kernel program is off; a map that has bans is the record.
    fn restore_bans(&mut self, kept: Vec<(IpNet, Duration)>) {
        if kept.is_empty() || (self.maps.is_some() && !self.bans.is_empty()) {
            return;
        }
        let n = kept.len();
        for (net, e) in self.ban_all(&kept) {
            tracing::error!(source = %net, "restoring a kept ban failed: {e}");
        }
        tracing::info!(bans = n, "bans restored from the state store");
    }

    /// Kernel packet counts per tenant and verdict, for `/stats`.
    fn kernel_json(&self) -> serde_json::Value {
        let Some(maps) = &self.maps else {
            return serde_json::Value::Null;
        };
        let config = &self.shared.snapshot.load().config;
        let mut out = serde_json::Map::new();
        for t in &config.tenants {
            if let Ok(c) = maps.tenant_counters(t.id) {
                let verdicts: serde_json::Map<String, serde_json::Value> =
                    gateway_common::Verdict::ALL
                        .iter()
                        .map(|v| {
                            (
                                v.name().to_owned(),
                                serde_json::json!(c.packets[*v as usize]),
                            )
                        })
                        .collect();
                out.insert(t.name.clone(), serde_json::Value::Object(verdicts));
            }
        }
        serde_json::Value::Object(out)
    }

    /// Re-reads the configuration file, validates it and applies it. On any error the running
    /// configuration stays as it was.
    /// [`Control::reload_file`], logged with its source and counted.
    fn reload(&mut self, source: &'static str) -> anyhow::Result<String> {
        let result = self.reload_file();
        // What parsing, validating and the old snapshot (its last guard dropped as
        // `reload_file` returned, unless a worker still holds it) freed goes back to the system
        // now: this thread is otherwise idle, and mimalloc purges freed pages only on later
        // allocations. Not forced: a forced collect also purges the arenas the workers allocate
        // from, and a worker sharing the core waited for it (reload under load, p99 40-357 ms).
        // SAFETY: mi_collect has no preconditions; it only walks this thread's heap.
        unsafe { libmimalloc_sys::mi_collect(false) };
        match &result {
            Ok(msg) => tracing::info!(source, "{msg}"),
            Err(e) => tracing::error!(source, "reload refused: {e:#}"),
        }
        self.reloads.record(source, result.is_ok());
        if result.is_ok() {
            self.note_id_holders();
        }
        result
    }

    /// Takes the tenants of the configuration in force as their ids' holders.
    fn note_id_holders(&mut self) {
        for t in &self.shared.snapshot.load().config.tenants {
            self.id_holders.insert(t.id, t.name.clone());
        }
    }

    fn reload_file(&mut self) -> anyhow::Result<String> {
        let Some(path) = &self.config_path else {
            bail!("running on the embedded default configuration: there is no file to reload");
        };
        let (new, policy) = Config::from_file_compiled(path)
            .with_context(|| format!("{} refused", path.display()))?;
        let old = &self.shared.snapshot.load().config;
        let tls_on = |c: &Config| -> Vec<bool> {
            c.listeners
                .iter()
                .map(|l| l.tls.is_some())
                .chain([c.admin_tls.is_some()])
                .collect()
        };
        for (what, changed) in [
            ("gateway.instance", new.instance != old.instance),
            ("gateway.workers", new.workers != old.workers),
            ("gateway.pin_workers", new.pin_workers != old.pin_workers),
            (
                "listeners",
                !new.listeners
                    .iter()
                    .map(|l| l.address)
                    .eq(old.listeners.iter().map(|l| l.address)),
            ),
            ("admin.address", new.admin != old.admin),
            ("TLS on or off on a listener", tls_on(&new) != tls_on(old)),
            ("kernel.enabled", new.kernel.enabled != old.kernel.enabled),
            (
                "kernel.interfaces",
                new.kernel.interfaces != old.kernel.interfaces,
            ),
            ("kernel.mode", new.kernel.mode != old.kernel.mode),
            ("state", new.state != old.state),
        ] {
            if changed {
                bail!("`{what}` changed: that needs a restart; the running configuration is kept");
            }
        }
        // Open connections are counted under the tenant id they were taken with, and given back
        // under it: a reload that swapped two tenants' ids charged one's connections to the
        // other (locked out at its cap while it held none: an operator's review).
        for t in &new.tenants {
            if let Some(o) = old.tenants.iter().find(|o| o.name == t.name)
                && o.id != t.id
            {
                bail!(
                    "tenant `{}` changed its id from {} to {}: open connections are counted under the id they were taken with; that needs a restart; the running configuration is kept",
                    t.name,
                    o.id,
                    t.id
                );
            }
            // An id under which another tenant's connections are still open: one an earlier
            // reload removed (not closed yet), or every client's before tenants were named (id
            // 0, which the new default tenant may take).
            let open = self.shared.conns.total(t.id);
            let another = match self.id_holders.get(&t.id) {
                Some(holder) => *holder != t.name,
                None => t.id != new.default_tenant,
            };
            if open > 0 && another {
                bail!(
                    "tenant `{}` takes id {} under which {open} connections of another tenant are still open: reload once they are closed, or restart; the running configuration is kept",
                    t.name,
                    t.id
                );
            }
            if let Some(o) = old.tenants.iter().find(|o| o.id == t.id)
                && o.name != t.name
            {
                bail!(
                    "tenant id {} was `{}`'s and is `{}`'s now: open connections are counted under the id they were taken with; that needs a restart; the running configuration is kept",
                    t.id,
                    o.name,
                    t.name
                );
            }
        }
        // Certificates are read again on every reload, even when their paths did not change.
        let stamps = crate::tls::stamps(&new);
        let upstream_stamps = crate::tls::upstream_stamps(&new);
        let tls = self.shared.tls.prepare(&new).map_err(|e| {
            self.shared.tls.stats.reload_failures.fetch_add(1, Relaxed);
            anyhow::anyhow!("{e}; the running certificates and configuration are kept")
        })?;
        // A log the new configuration moves, starts, stops or bounds otherwise is opened once the
        // certificates are read (one that cannot be opened refuses the configuration), and takes
        // over with it.
        let audit = (new.audit != old.audit)
            .then(|| crate::shared::open_audit(&new))
            .transpose();
        let access = (crate::shared::access_log_opened(&new)
            != crate::shared::access_log_opened(old))
        .then(|| crate::shared::open_access(&new))
        .transpose();
        let (audit, access) = match (audit, access) {
            (Ok(audit), Ok(access)) => (audit, access),
            (Err(e), _) | (_, Err(e)) => {
                bail!("{e}; the running configuration is kept")
            }
        };
        let hosts = self.fleet_hosts();
        if let Some(maps) = &mut self.maps {
            if let Err(e) = maps.sync(&KernelState::shared_by(&new, hosts)) {
                // Part of the new configuration may be in the kernel by now (limits, tenant
                // prefixes): the running one is written back, so that the kernel and the
                // workers keep judging by the same one.
                let back = match maps.sync(&KernelState::shared_by(old, self.kernel_hosts)) {
                    Ok(_) => "the running configuration's maps were written back".to_owned(),
                    Err(b) => {
                        let b = anyhow::Error::new(b);
                        tracing::error!(
                            "writing the running configuration back into the kernel maps failed: {b:#}; \
                             the kernel may judge by parts of both until the next reload or restart"
                        );
                        format!("writing the running configuration's maps back failed too: {b:#}")
                    }
                };
                // The sync lowers the at-cap flag of a tenant the new configuration leaves
                // uncapped, and no sync raises one: every flag is written again next pass.
                self.caps_written = false;
                return Err(
                    anyhow::Error::new(e).context(format!("syncing the kernel maps ({back})"))
                );
            }
            self.kernel_hosts = hosts;
        }
        let diff = crate::config::diff::ConfigDiff::new(old, &new);
        self.shared
            .stdio
            .sync(new.upstreams.iter().filter_map(|u| u.stdio.as_ref()));
        // Replicas keep their health and their sessions' endpoints across a reload.
        for up in &new.upstreams {
            if let Some(o) = old.upstreams.iter().find(|o| o.name == up.name) {
                up.replicas.carry_over(&o.replicas);
            }
        }
        self.shared
            .snapshot
            .store(Arc::new(Snapshot::with_policy(new, policy)));
        if let Some(audit) = audit {
            let running = self.shared.audit.load();
            self.shared
                .audit
                .store(Arc::new(audit.counting_on(&running)));
        }
        if let Some(access) = access {
            let running = self.shared.access.load();
            self.shared
                .access
                .store(Arc::new(access.counting_on(&running)));
        }
        self.shared.tls.publish(tls);
        // Certificate sets: none without a TLS listener (every reload counted one before).
        if self
            .shared
            .snapshot
            .load()
            .config
            .listeners
            .iter()
            .any(|l| l.tls.is_some())
        {
            self.shared.tls.stats.reloads.fetch_add(1, Relaxed);
        }
        // `kernel.deny` may hold open connections' clients now, and the configuration and
        // client CAs may no longer admit open connections' callers: the workers judge them
        // again, once both are published.
        self.shared.sources_changed.fetch_add(1, Release);
        self.tls_stamps = stamps;
        self.upstream_tls_stamps = upstream_stamps;
        Ok(format!("reloaded {}: {diff}", path.display()))
    }

    /// Reloads the certificates when one of their files changed since they were loaded (the
    /// configuration itself is not read again). A set that does not load is refused and
    /// counted, the running one kept; it is tried again when its files change again.
    fn watch_tls_files(&mut self) {
        self.watch_upstream_tls_files();
        let config = &self.shared.snapshot.load().config;
        let stamps = crate::tls::stamps(config);
        if stamps == self.tls_stamps {
            return;
        }
        self.tls_stamps = stamps;
        match self.shared.tls.prepare(config) {
            Ok(tls) => {
                self.shared.tls.publish(tls);
                self.shared.tls.stats.reloads.fetch_add(1, Relaxed);
                // A `client_ca` file changed may no longer vouch for open connections'
                // certificates: the workers verify them again.
                self.shared.sources_changed.fetch_add(1, Release);
                self.reloads.record("file_change", true);
                tracing::info!(
                    source = "file_change",
                    "TLS files changed: certificates reloaded"
                );
            }
            Err(e) => {
                self.shared.tls.stats.reload_failures.fetch_add(1, Relaxed);
                self.reloads.record("file_change", false);
                tracing::error!(
                    source = "file_change",
                    "TLS files changed but do not load: {e}; the running certificates are kept"
                );
            }
        }
    }

    /// Builds an https upstream's TLS again when one of its files (`ca_file`, `client_cert`,
    /// `client_key`) changed since it was loaded (the configuration itself is not read
    /// again): a rotated client certificate is presented, and a replaced CA trusted, from the
    /// next connection on, and none made under the old files is reused (the upstream's pool
    /// key changes with them). Before, they were read only at a reload, so a client
    /// certificate rotated in place (cert-manager, SPIFFE) went on being presented until it
    /// expired. Files that do not load are refused and counted, the running TLS kept; they
    /// are tried again when they change again.
    fn watch_upstream_tls_files(&mut self) {
        let snapshot = self.shared.snapshot.load_full();
        let stamps = crate::tls::upstream_stamps(&snapshot.config);
        if stamps == self.upstream_tls_stamps {
            return;
        }
        self.upstream_tls_stamps = stamps;
        let mut config = snapshot.config.clone();
        let mut changed = Vec::new();
        for up in &mut config.upstreams {
            let Some(tls) = &up.tls else {
                continue;
            };
            match tls.reloaded() {
                Ok(new) if new.fingerprint == tls.fingerprint => {}
                Ok(new) => {
                    up.key = crate::config::pool_key(&up.name, &up.url, &up.authority, Some(&new));
                    up.tls = Some(Arc::new(new));
                    changed.push(up.name.clone());
                }
                Err((field, why)) => {
                    self.reloads.record("file_change", false);
                    tracing::error!(
                        source = "file_change",
                        upstream = %up.name,
                        "upstream TLS files changed but do not load ({field}: {why}); the running TLS is kept"
                    );
                    // The others' go on: one upstream's unreadable file kept every upstream
                    // after it on files taken out of service (a CA no longer trusted was
                    // still trusted: an attacker's review).
                    continue;
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        self.shared
            .snapshot
            .store(Arc::new(Snapshot::sharing_policy(
                config,
                Arc::clone(&snapshot.policy),
            )));
        self.reloads.record("file_change", true);
        tracing::info!(
            source = "file_change",
            upstreams = ?changed,
            "upstream TLS files changed: reloaded"
        );
    }

    /// Reopens the audit and histogram logs at their paths (SIGHUP, SIGUSR1: after logrotate
    /// moved them). The audit thread reopens between two records; nothing is lost.
    fn reopen_logs(&mut self) {
        self.shared.audit.load().reopen();
        self.shared.access.load().reopen();
        match self.stats.reopen_log() {
            Ok(()) => tracing::info!("log files reopened"),
            Err(e) => tracing::error!(
                "the histogram log cannot be reopened: {e}; writing on to the old file"
            ),
        }
    }

    /// The live hosts of the fleet, as the fleet agent last counted them (1 without a fleet).
    fn fleet_hosts(&self) -> u64 {
        self.shared.fleet.hosts.load(Relaxed).max(1)
    }

    /// Writes this host's share of each tenant's new-connection rate into the kernel's maps
    /// when the fleet's live hosts changed (a host joined, or was not heard from for
    /// `HOST_TTL`).
    fn follow_fleet_hosts(&mut self) {
        let hosts = self.fleet_hosts();
        if hosts == self.kernel_hosts {
            return;
        }
        let Some(maps) = &mut self.maps else {
            return;
        };
        let snap = self.shared.snapshot.load();
        if snap.config.state.fleet.is_none() {
            return;
        }
        match maps.sync(&KernelState::shared_by(&snap.config, hosts)) {
            Ok(_) => {
                tracing::info!(
                    hosts,
                    was = self.kernel_hosts,
                    "fleet: the kernel's tenant new-connection rates are this host's share (rate ÷ {hosts} live hosts)"
                );
                self.kernel_hosts = hosts;
            }
            Err(e) => tracing::error!(
                "fleet: writing the kernel's share of the tenant rates failed: {e}; tried again"
            ),
        }
    }

    /// Raises or lowers each tenant's at-cap flag, in the kernel and for the workers, from the
    /// workers' connection counts (in a fleet, with the other gateways' as the fleet agent last
    /// read them). A tenant without a cap (no longer, after a reload) is never at it; the first
    /// pass writes every flag, whatever the pinned map said.
    fn update_caps(&mut self) {
        let snap = self.shared.snapshot.load();
        let force = !self.caps_written;
        let mut failed = false;
        for t in &snap.config.tenants {
            let at_cap = t.max_connections.is_some_and(|cap| {
                self.shared.conns.total(t.id) >= self.shared.limits.conn_cap(t.id, cap)
            });
            if at_cap == self.shared.at_cap(t.id) && !force {
                continue;
            }
            if let Some(maps) = &mut self.maps
                && let Err(e) = maps.set_over_cap(t.id, at_cap)
            {
                tracing::error!(tenant = %t.name, error = %e, "cannot write the at-cap flag");
                failed = true;
                continue;
            }
            if at_cap != self.shared.at_cap(t.id) {
                tracing::info!(tenant = %t.name, cap = ?t.max_connections, at_cap, "tenant connection cap");
            }
            self.shared.set_at_cap(t.id, at_cap);
        }
        // A tenant id the configuration no longer has (moved by a reload) is not at a cap.
        for id in 0..gateway_common::MAX_TENANTS {
            if self.shared.at_cap(id) && snap.config.tenant(id).is_none() {
                self.shared.set_at_cap(id, false);
            }
        }
        self.caps_written = !failed;
    }
}

/// Runs the gateway until SIGINT or SIGTERM, or until it handed over to an upgraded process.
/// `handover`: this process was started by a running gateway to take over from it (see
/// [`crate::upgrade`]).
pub fn run(
    config: Config,
    config_path: Option<PathBuf>,
    handover: Option<&upgrade::Successor>,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("control")
        .build()
        .context("starting the control runtime")?
        .block_on(run_async(config, config_path, handover))
}

async fn run_async(
    config: Config,
    config_path: Option<PathBuf>,
    handover: Option<&upgrade::Successor>,
) -> anyhow::Result<()> {
    // First: a SIGTERM during the start (a service manager's stop, a test's) waits in its
    // stream for the loop below and ends the run cleanly, instead of killing the process by
    // the signal's default action before the handlers exist.
    let Signals {
        mut hup,
        mut usr1,
        mut usr2,
        mut term,
        mut int,
    } = Signals::install()?;
    let origin = upgrade::Origin::record()
        .inspect_err(|e| tracing::warn!("the binary's path is unknown ({e}): no upgrades"))
        .ok();
    let mut handed = match handover {
        Some(s) => {
            let h = s.receive().context("receiving the handover")?;
            tracing::info!(from = h.offer.pid, "taking over from the running gateway");
            Some(h)
        }
        None => None,
    };
    // A fleet seals session ids with one key, so that any of its gateways continues a session;
    // its live hosts set this host's share of the tenants' new-connection rates from the
    // first sync of the kernel's maps on (during an upgrade, the maps the running gateway's
    // program reads).
    let fleet_start = match &config.state.fleet {
        Some(f) => Some(
            crate::fleet::start(
                f,
                handed
                    .as_ref()
                    .and_then(|h| h.offer.fleet_agreed.as_deref()),
            )
            .await,
        ),
        None => None,
    };
    let kernel_hosts = fleet_start.as_ref().map_or(1, |s| s.hosts);
    let KernelStart {
        mut kernel,
        maps,
        taken_over,
    } = start_kernel(&config, &mut handed, kernel_hosts)?;
    let workers = config.workers;
    let per_worker = bind_listeners(&config, &mut handed)?;
    let (admin_listener, admin_keep) = bind_admin(&config, &mut handed).await?;
    let mut ended_sessions = Vec::new();
    if let Some(s) = handover {
        // Everything that can fail on the configuration is checked before the running gateway
        // stops accepting: certificates too.
        crate::tls::Edge::new(config.listeners.len())
            .prepare(&config)
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        ended_sessions = s
            .prepared()
            .context("waiting for the running gateway to release")?;
    }

    let grace = config.shutdown_grace;
    let pin = config.pin_workers;
    let cap_poll = config.kernel.cap_poll;
    let listeners = config.listeners.clone();
    let instance = config.instance.clone();
    let admin_addr = config.admin;
    let tls_stamps = crate::tls::stamps(&config);
    let state = config.state.clone();
    let shared = share(
        config,
        handed.as_ref(),
        ended_sessions,
        fleet_start.as_ref(),
    );
    // The kept state is in place before any worker serves.
    let kept = restore_state(&shared, &state)?;
    prepare_serving(&shared, &mut kernel, &taken_over)?;
    // Duplicates of the workers' listening sockets: at shutdown the control thread stops them
    // listening itself, at once, whatever the workers are doing.
    let listening: Vec<TcpListener> = per_worker
        .iter()
        .flatten()
        .map(TcpListener::try_clone)
        .collect::<Result<_, _>>()
        .context("duplicating the listening sockets")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let threads = runtime::spawn_workers(Arc::clone(&shared), per_worker, stop_rx, grace, pin)
        .context("starting workers")?;

    let control = Control::start(
        &shared,
        maps,
        config_path,
        tls_stamps,
        kept,
        kernel.as_ref(),
        kernel_hosts,
    )?;
    let admin_tls = shared.snapshot.load().config.admin_tls.is_some();
    let mut admin = AdminServer::start(admin_listener, admin_keep, admin_tls, Arc::clone(&control));
    let spans = tokio::spawn(crate::otlp::export(Arc::clone(&shared.spans), {
        let shared = Arc::clone(&shared);
        move || shared.snapshot.load().config.telemetry.otlp.clone()
    }));
    let resolver = tokio::spawn(crate::mcp::upstream::resolve::run(
        Arc::clone(&shared),
        crate::mcp::upstream::resolve::System,
    ));
    let fleet = state.fleet.clone().map(|f| {
        tokio::spawn(crate::fleet::run(
            Arc::clone(&shared),
            f,
            instance.clone(),
            FleetBans(Arc::clone(&control)),
        ))
    });

    announce(workers, &listeners, admin_tls, admin_addr);
    let watchdog = crate::service::watchdog_period();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let upgrade_socket = match upgrade::listen(&upgrade::socket_path(&instance), handover.is_some())
    {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                "no upgrade socket: {e}; `gateway upgrade` cannot reach this gateway (SIGUSR2 still upgrades it)"
            );
            None
        }
    };
    let upgrade_ctx = UpgradeCtx {
        origin: origin.as_ref(),
        listening: &listening,
        addrs: listeners.iter().map(|l| l.address).collect(),
        workers,
        admin_addr,
        state_dir: state.dir.clone(),
    };
    let mut handed_to = None;

    // The signal handlers are in place (first thing): systemd may send SIGHUP to this process
    // from here on.
    if let (Some(s), Some(h)) = (handover, &handed) {
        finish_takeover(s, h, kernel.as_ref(), &shared);
    }
    let mut caps = tokio::time::interval(cap_poll);
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut merge = tokio::time::interval(Duration::from_secs(1));
    let mut bans = tokio::time::interval(Duration::from_millis(100));
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    let mut tls_files = tokio::time::interval(Duration::from_secs(2));
    let mut hosts = tokio::time::interval(Duration::from_millis(250));
    let mut attachments = tokio::time::interval(ATTACHMENTS_EVERY);
    let mut flush = tokio::time::interval(state.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = flush.tick() => lock(&control).flush_state(),
            _ = tls_files.tick() => lock(&control).watch_tls_files(),
            _ = caps.tick() => lock(&control).update_caps(),
            _ = merge.tick() => lock(&control).drain_stats(),
            _ = bans.tick() => lock(&control).apply_auto_bans(),
            _ = hosts.tick(), if state.fleet.is_some() => lock(&control).follow_fleet_hosts(),
            _ = prune.tick() => lock(&control).shared.limits.prune(),
            _ = attachments.tick(), if kernel.is_some() => {
                if let Some(k) = kernel.as_mut() {
                    let checked = k.check_attachments();
                    lock(&control).attachments_checked(checked);
                }
            }
            _ = sweep.tick() => {
                let mut c = lock(&control);
                c.shared.new_conns.forget_idle(crate::kernel::monotonic_ns());
                c.refresh_bans();
            }
            _ = hup.recv() => {
                let mut c = lock(&control);
                c.reopen_logs();
                // Logged and counted by `reload`.
                let _ = c.reload("signal");
            }
            _ = usr1.recv() => lock(&control).reopen_logs(),
            _ = watchdog_tick.tick(), if watchdog.is_some() => feed_watchdog(&control),
            _ = usr2.recv() => {
                if let Ok(pid) = upgrade_logged(&upgrade_ctx, "signal", &control, &mut kernel, &mut admin).await {
                    handed_to = Some(pid);
                    break;
                }
            }
            stream = upgrade_request(upgrade_socket.as_ref()) => {
                if let Some(pid) = answer_upgrade(stream, &upgrade_ctx, &control, &mut kernel, &mut admin).await {
                    handed_to = Some(pid);
                    break;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(upgrade_ctx);
    // A gateway that stops takes its upgrade socket with it (handed over, the socket is the new
    // process's, bound again at the same path). Left behind, every stopped instance's stayed
    // in the runtime directory.
    if handed_to.is_none() && upgrade_socket.is_some() {
        let _ = std::fs::remove_file(upgrade::socket_path(&instance));
    }

    let serving = Serving {
        stop_tx,
        threads,
        listening,
        resolver,
        spans,
        fleet,
    };
    serving
        .stop(admin, handed_to, grace, &control, &shared, kernel)
        .await
}

/// How often the XDP attachments are checked ([`crate::kernel::Kernel::check_attachments`]).
const ATTACHMENTS_EVERY: Duration = Duration::from_secs(1);

impl Control {
    /// Takes what a check of the XDP attachments found: `/metrics` and `/readyz` say what is
    /// in place; a change is logged once.
    fn attachments_checked(&mut self, checked: Vec<(String, crate::kernel::Checked)>) {
        use crate::kernel::Checked;
        let mut xdp = Vec::with_capacity(checked.len());
        let mut missing = Vec::new();
        for (interface, state) in checked {
            match state {
                Checked::Attached(mode) => xdp.push((interface, mode.as_str())),
                Checked::Reattached(mode) => {
                    tracing::warn!(
                        interface,
                        mode = mode.as_str(),
                        "the XDP program was no longer on its interface (made again, or its link unpinned); attached again"
                    );
                    self.xdp_reattached += 1;
                    xdp.push((interface, mode.as_str()));
                }
                Checked::Missing(why) => {
                    if !self
                        .xdp_missing
                        .iter()
                        .any(|(i, w)| *i == interface && *w == why)
                    {
                        tracing::error!(interface, reason = %why, "the XDP program is not attached to its interface; not ready until it is");
                    }
                    missing.push((interface, why));
                }
            }
        }
        self.xdp = xdp;
        self.xdp_missing = missing;
    }
}

/// The control thread's ban path, as the fleet agent uses it.
struct FleetBans(Arc<Mutex<Control>>);

impl crate::fleet::Bans for FleetBans {
    /// Address bans only: prefix bans stay on the host they were made on, and so do bans of
    /// addresses that name another machine on every host (loopback, link-local: a local
    /// proxy's `::1` banned here would be another host's own proxy there).
    fn local(&self) -> Vec<(std::net::IpAddr, Duration)> {
        lock(&self.0)
            .list_bans()
            .into_iter()
            .filter(|(net, _)| net.prefix_len() == net.max_prefix_len() && !host_local(net.addr()))
            .map(|(net, left)| (net.addr(), left))
            .collect()
    }

    fn ban(&self, ip: std::net::IpAddr, ttl: Duration) -> bool {
        match lock(&self.0).ban(ip, ttl) {
            Ok(_) => true,
            Err(e) => {
                crate::throttled_warn!(source = %ip, error = %e, "fleet: banning here failed; the fleet's ban stays, tried again next round");
                false
            }
        }
    }

    fn unban(&self, ip: std::net::IpAddr) {
        if let Err(e) = lock(&self.0).unban(ip) {
            tracing::error!(source = %ip, "fleet: lifting a ban failed: {e}");
        }
    }
}

/// The admin API's server task. An upgrade stops it gracefully (requests in flight are
/// answered; the socket goes on in the new process) and, if the upgrade fails, starts it again
/// on the same socket.
struct AdminServer {
    socket: TcpListener,
    tls: bool,
    control: Arc<Mutex<Control>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    fn start(
        listener: tokio::net::TcpListener,
        socket: TcpListener,
        tls: bool,
        control: Arc<Mutex<Control>>,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve_admin(listener, tls, Arc::clone(&control), stopped));
        Self {
            socket,
            tls,
            control,
            stop,
            task,
        }
    }

    fn stop(&self) {
        let _ = self.stop.send(true);
    }

    fn restart(&mut self) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::from_std(self.socket.try_clone()?)?;
        let (stop, stopped) = watch::channel(false);
        self.task.abort();
        self.task = tokio::spawn(serve_admin(
            listener,
            self.tls,
            Arc::clone(&self.control),
            stopped,
        ));
        self.stop = stop;
        Ok(())
    }

    fn abort(&self) {
        self.task.abort();
    }
}

/// What an upgrade hands over, from `run_async`.
struct UpgradeCtx<'a> {
    origin: Option<&'a upgrade::Origin>,
    /// The workers' listening sockets (duplicates), worker by worker, each worker's in the
    /// order of `addrs`.
    listening: &'a [TcpListener],
    addrs: Vec<std::net::SocketAddr>,
    workers: usize,
    admin_addr: std::net::SocketAddr,
    state_dir: Option<PathBuf>,
}

/// Waits for the next connection to the upgrade socket (forever without one).
async fn upgrade_request(socket: Option<&tokio::net::UnixListener>) -> tokio::net::UnixStream {
    let Some(socket) = socket else {
        return std::future::pending().await;
    };
    loop {
        match socket.accept().await {
            Ok((stream, _)) => return stream,
            Err(e) => {
                tracing::warn!("upgrade socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one request on the upgrade socket: `upgrade\n` from this user or root, answered
/// with the outcome. Returns the new process's pid when it took over.
async fn answer_upgrade(
    mut stream: tokio::net::UnixStream,
    ctx: &UpgradeCtx<'_>,
    control: &Arc<Mutex<Control>>,
    kernel: &mut Option<Kernel>,
    admin: &mut AdminServer,
) -> Option<u32> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    if let Err(why) = upgrade::peer_allowed(&stream, &child_users(control)) {
        tracing::warn!(why, "upgrade request refused");
        let answer = upgrade::Outcome {
            pid: None,
            error: Some(format!("refused: {why}")),
        };
        // Its request is read before the answer (a socket closed before the client wrote
        // gave it a broken pipe, not the refusal), in a task of its own, eight at most: a
        // refused peer holds neither the control thread nor more than eight descriptors for
        // the read's second (past them, the answer goes at once).
        static REFUSING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let reads = REFUSING.fetch_add(1, Relaxed) < 8;
        tokio::spawn(async move {
            if reads {
                let mut line = String::new();
                let mut request = tokio::io::BufReader::new((&mut stream).take(64));
                let read = request.read_line(&mut line);
                let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
            }
            if let Ok(mut line) = serde_json::to_vec(&answer) {
                line.push(b'\n');
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line)).await;
            }
            REFUSING.fetch_sub(1, Relaxed);
        });
        return None;
    }
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::BufReader::new((&mut stream).take(64)).read_line(&mut line),
    )
    .await;
    let outcome = if !matches!(read, Ok(Ok(_))) || line.trim() != "upgrade" {
        Err("expected `upgrade`".to_owned())
    } else {
        upgrade_logged(ctx, "upgrade_socket", control, kernel, admin).await
    };
    let answer = match &outcome {
        Ok(pid) => upgrade::Outcome {
            pid: Some(*pid),
            error: None,
        },
        Err(e) => upgrade::Outcome {
            pid: None,
            error: Some(e.clone()),
        },
    };
    let mut text = serde_json::to_string(&answer).unwrap_or_default();
    text.push('\n');
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(text.as_bytes())).await;
    outcome.ok()
}

/// [`upgrade`], logged with what asked for it.
async fn upgrade_logged(
    ctx: &UpgradeCtx<'_>,
    source: &'static str,
    control: &Arc<Mutex<Control>>,
    kernel: &mut Option<Kernel>,
    admin: &mut AdminServer,
) -> Result<u32, String> {
    tracing::info!(source, "binary upgrade: starting the new process");
    // The control loop waits here (up to a minute a step for the new process): the service
    // manager's watchdog is fed meanwhile, as in the loop, or a slow new process would get
    // this one, which serves on, killed.
    let work = upgrade(ctx, control, kernel, admin);
    let mut work = std::pin::pin!(work);
    let watchdog = crate::service::watchdog_period();
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let r = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick(), if watchdog.is_some() => feed_watchdog(control),
        }
    };
    match &r {
        Ok(pid) => tracing::info!(
            source,
            new_pid = pid,
            "binary upgrade: the new process serves"
        ),
        Err(e) => tracing::error!(source, "binary upgrade failed: {e}; this gateway serves on"),
    }
    r
}

/// Hands the listening sockets, the admin socket, the instance lock and the session key to a
/// new process of the binary at this one's path; see [`crate::upgrade`]. Until the new process
/// says it is ready, a failure leaves this one serving as before.
async fn upgrade(
    ctx: &UpgradeCtx<'_>,
    control: &Arc<Mutex<Control>>,
    kernel: &mut Option<Kernel>,
    admin: &mut AdminServer,
) -> Result<u32, String> {
    use std::os::fd::AsFd;
    let origin = ctx.origin.ok_or("the path of this binary is unknown")?;
    let shared = Arc::clone(&lock(control).shared);
    let offer = upgrade::Offer {
        pid: std::process::id(),
        listeners: ctx.addrs.iter().map(|a| (*a, ctx.workers)).collect(),
        admin: ctx.admin_addr,
        lock: kernel.is_some(),
        session_key: shared.session_key,
        fleet_agreed: shared.fleet.session_agreed.get().cloned(),
        hash_seed: shared.limits.hash_seed(),
        attachments: kernel
            .as_ref()
            .map(|k| {
                k.attachments()
                    .iter()
                    .map(|a| (a.interface.clone(), a.mode.as_str().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    // Listener by listener, each with its sockets in worker order.
    let n = ctx.addrs.len();
    let mut fds: Vec<std::os::fd::BorrowedFd<'_>> = (0..n)
        .flat_map(|l| (0..ctx.workers).map(move |w| w * n + l))
        .filter_map(|i| ctx.listening.get(i).map(AsFd::as_fd))
        .collect();
    fds.push(admin.socket.as_fd());
    if let Some(k) = kernel.as_ref() {
        fds.push(k.lock_file().as_fd());
    }
    let new = upgrade::Predecessor::start(origin, offer, &fds)
        .map_err(|e| format!("starting the new process: {e}"))?;
    let pid = new.pid();
    tracing::info!(
        new_pid = pid,
        "binary upgrade: new process started; waiting until it has loaded"
    );
    let (new, prepared) = tokio::task::spawn_blocking(move || {
        let r = new.wait_prepared();
        (new, r)
    })
    .await
    .map_err(|e| e.to_string())?;
    if let Err(e) = prepared {
        tokio::task::spawn_blocking(move || new.abandon());
        return Err(e);
    }
    // Stop accepting (the workers look every 50 ms and take back the accepts in flight), stop
    // the admin server, and write and close the state store: the new process opens it next.
    shared.accepting.store(false, Relaxed);
    admin.stop();
    tokio::time::sleep(Duration::from_millis(150)).await;
    lock(control).close_store();
    let ended = shared.ended_sessions.entries();
    let (new, released) = tokio::task::spawn_blocking(move || {
        let r = new.release(ended);
        (new, r)
    })
    .await
    .map_err(|e| e.to_string())?;
    match released {
        Ok(ready_pid) => {
            // Not killed when dropped; it outlives this process. Kept until the drain ends,
            // to send it what is counted meanwhile.
            lock(control).successor = Some(new);
            Ok(ready_pid)
        }
        Err(e) => {
            if let Some(k) = kernel.as_mut()
                && let Err(e) = k.reclaim()
            {
                tracing::error!("putting this process's XDP program back failed: {e}");
            }
            shared.accepting.store(true, Relaxed);
            if let Err(e) = admin.restart() {
                tracing::error!("the admin API cannot serve again: {e}");
            }
            // The new process may have opened the store: it closes it when it exits.
            let _ = tokio::task::spawn_blocking(move || new.abandon()).await;
            {
                let mut c = lock(control);
                c.shared.fleet.paused.store(false, Relaxed);
                c.counts_at_close.clear();
            }
            if let Some(dir) = &ctx.state_dir {
                lock(control).reopen_store(dir);
            }
            Err(e)
        }
    }
}

/// One watchdog ping, while no worker is down or stalled: a dead or stuck worker stops the
/// pings, and systemd restarts the gateway.
fn feed_watchdog(control: &Mutex<Control>) {
    let c = lock(control);
    if c.shared.workers_down().is_empty()
        && c.shared
            .workers_stalled(crate::shared::STALLED_AFTER)
            .is_empty()
    {
        crate::service::watchdog();
    }
}

fn config_kernel_enabled(shared: &Shared) -> bool {
    shared.snapshot.load().config.kernel.enabled
}

fn lock(c: &Mutex<Control>) -> std::sync::MutexGuard<'_, Control> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    tls: bool,
    control: Arc<Mutex<Control>>,
    stop: watch::Receiver<bool>,
) {
    let (edge, shared) = {
        let c = lock(&control);
        (Arc::clone(&c.shared.tls), Arc::clone(&c.shared))
    };
    let per_address: crate::admin_server::PerAddress =
        Arc::new(move || shared.snapshot.load().config.admin_per_address);
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let control = Arc::clone(&control);
        async move { admin(req, &control).await }
    });
    if !tls {
        crate::admin_server::serve(listener, app, stop, per_address).await;
        return;
    }
    match crate::tls::admin::listen(listener, edge, Arc::clone(&per_address)) {
        Ok(l) => crate::admin_server::serve(l, app, stop, per_address).await,
        Err(e) => tracing::error!(error = %e, "admin listener failed"),
    }
}

type AdminResponse = (axum::http::StatusCode, [(&'static str, String); 1], String);

fn respond(status: u16, content_type: &str, body: String) -> AdminResponse {
    (
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::OK),
        [("content-type", content_type.to_owned())],
        body,
    )
}

fn json_reply(status: u16, v: &serde_json::Value) -> AdminResponse {
    respond(status, "application/json", v.to_string() + "\n")
}

/// Constant-time comparison of the presented token with the configured one.
fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len()
        && presented
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Why a state-changing request must be refused as one a browser may have sent from another
/// site (the admin API has no token on loopback by default, and any page can POST there):
/// `Origin` (browsers send it with every cross-origin POST, `null` included), `Sec-Fetch-Site`
/// other than `none`/`same-origin`, or a body that is not JSON (a form can send text without a
/// CORS preflight; JSON cannot).
/// Whether the admin request's `Host` names an address, not a DNS name: a page whose name an
/// attacker re-points at this host (DNS rebinding) is same-origin to the browser, and could read
/// (or, without a browser's `Origin`, drive) a token-less admin API. An IP literal or
/// `localhost`, with an optional port, cannot be rebound.
fn host_is_address(headers: &axum::http::HeaderMap) -> bool {
    let mut hosts = headers.get_all("host").iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return false;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split_once(']').is_some_and(|(ip, port)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (port.is_empty()
                    || port
                        .strip_prefix(':')
                        .is_some_and(|p| p.parse::<u16>().is_ok()))
        });
    }
    let name = match host.split_once(':') {
        Some((name, port)) if port.parse::<u16>().is_ok() => name,
        Some(_) => return false,
        None => host,
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn cross_site(
    method: &axum::http::Method,
    headers: &axum::http::HeaderMap,
) -> Option<(u16, &'static str)> {
    if matches!(
        *method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    ) {
        return None;
    }
    if headers.contains_key("origin") {
        return Some((
            403,
            "state-changing admin requests from a browser page (with `Origin`) are refused",
        ));
    }
    if headers
        .get_all("sec-fetch-site")
        .iter()
        .any(|v| !matches!(v.as_bytes(), b"none" | b"same-origin"))
    {
        return Some((403, "cross-site admin requests are refused"));
    }
    let has_body = headers
        .get("content-length")
        .is_some_and(|v| v.as_bytes() != b"0")
        || headers.contains_key("transfer-encoding");
    let json = headers.get_all("content-type").iter().count() == 1
        && headers.get("content-type").is_some_and(|ct| {
            crate::http::media_type(ct.as_bytes()).eq_ignore_ascii_case(b"application/json")
        });
    if (has_body || headers.contains_key("content-type")) && !json {
        return Some((
            415,
            "admin request bodies must be `Content-Type: application/json`",
        ));
    }
    None
}

fn parse_window(query: &str) -> Result<Option<Duration>, String> {
    let w = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("window="))
        .unwrap_or("1m");
    match w {
        "all" => Ok(None),
        "10s" => Ok(Some(Duration::from_secs(10))),
        "1m" => Ok(Some(Duration::from_secs(60))),
        "5m" => Ok(Some(Duration::from_secs(300))),
        other => Err(format!("unknown window `{other}`: 10s, 1m, 5m or all")),
    }
}

/// The users stdio servers run as, root aside (a child running as root is trusted with the
/// host already).
fn child_users(control: &Mutex<Control>) -> Vec<u32> {
    lock(control)
        .shared
        .snapshot
        .load()
        .config
        .upstreams
        .iter()
        .filter_map(|u| u.stdio.as_ref())
        .map(|s| s.sandbox.child_uid())
        .filter(|uid| *uid != 0)
        .collect()
}

/// The user owning the client's end of this loopback connection, if it is a user that stdio
/// servers run as (root aside: a child running as root needs no admin API), or if that cannot
/// be told. Without a token the admin API trusts whoever reaches it on loopback, and a stdio
/// server is a program the gateway runs: as the gateway's own user (the packaged service), it
/// could otherwise approve its own changed tool definition or ban every client. The owner is
/// asked of the kernel ([`socket_owner`]), once per connection.
fn peer_runs_as_a_child(
    peer: Option<crate::admin_server::Peer>,
    control: &Mutex<Control>,
) -> Option<u32> {
    let children = child_users(control);
    let refused = children.first().copied();
    if children.is_empty() {
        return None;
    }
    let Some(crate::admin_server::Peer {
        client,
        local: Some(local),
        owner,
    }) = peer
    else {
        return refused;
    };
    let found = *owner.get_or_init(|| socket_owner(client, local));
    match found {
        Some(uid) if !children.contains(&uid) => None,
        Some(uid) => Some(uid),
        // Closed already, or not found: not told apart, so refused as a child's.
        None => refused,
    }
}

/// The owner (uid) of the established TCP socket whose ends are `client` (its own) and `local`
/// (the admin listener's side), in this network namespace (which children share): one exact
/// `sock_diag` query (the kernel looks the 4-tuple up in its hash; nothing is listed). Before,
/// every TCP socket of the host was read from `/proc/net/tcp{,6}` for each new connection, two
/// reads at once: a child that opened connections as fast as it could held the admin API's
/// lookups (refused with 503) at the cost of a table read each. `None` when it cannot be told
/// (no such socket, or not established: a socket closing reports no owner).
fn socket_owner(client: std::net::SocketAddr, local: std::net::SocketAddr) -> Option<u32> {
    use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::{
        SockDiagMessage,
        constants::{AF_INET, AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    };
    const TCP_ESTABLISHED: u8 = 1;
    let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG).ok()?;
    socket.bind_auto().ok()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0)).ok()?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: if client.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::ESTABLISHED,
            socket_id: SocketId {
                source_port: client.port(),
                destination_port: local.port(),
                source_address: client.ip(),
                destination_address: local.ip(),
                interface_id: 0,
                // All ones: any socket of these ends.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).ok()?;
    // The kernel answers within the send: nothing there then is no answer.
    socket.set_non_blocking(true).ok()?;
    let mut answer = vec![0; 4096];
    let n = socket.recv(&mut &mut answer[..], 0).ok()?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(answer.get(..n)?).ok()?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
            if r.header.state == TCP_ESTABLISHED =>
        {
            Some(r.header.uid)
        }
        _ => None,
    }
}

/// The admin API. `/healthz` and `/readyz` are open; everything else needs the admin token
/// when one is configured.
async fn admin(req: axum::extract::Request, control: &Mutex<Control>) -> AdminResponse {
    use axum::http::Method;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => return respond(200, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            let c = lock(control);
            let down = c.shared.workers_down();
            let stalled = c.shared.workers_stalled(crate::shared::STALLED_AFTER);
            return if !c.ready {
                respond(503, "text/plain", "not ready\n".into())
            } else if !down.is_empty() {
                respond(
                    503,
                    "text/plain",
                    format!("not ready: workers down {down:?}\n"),
                )
            } else if !stalled.is_empty() {
                respond(
                    503,
                    "text/plain",
                    format!(
                        "not ready: workers stalled {stalled:?} (their loop has not turned for {} s)\n",
                        crate::shared::STALLED_AFTER.as_secs()
                    ),
                )
            } else if c.shared.limits.fleet_unread() {
                respond(
                    503,
                    "text/plain",
                    "not ready: the fleet's shared state is not read yet\n".into(),
                )
            } else if !c.xdp_missing.is_empty() {
                let missing: Vec<String> = c
                    .xdp_missing
                    .iter()
                    .map(|(interface, why)| format!("{interface} ({why})"))
                    .collect();
                respond(
                    503,
                    "text/plain",
                    format!(
                        "not ready: the kernel program is not attached to {}\n",
                        missing.join(", ")
                    ),
                )
            } else {
                respond(200, "text/plain", "ready\n".into())
            };
        }
        _ => {}
    }
    let token = lock(control)
        .shared
        .snapshot
        .load()
        .config
        .admin_token
        .clone();
    if let Some(token) = token {
        let presented = req
            .headers()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if !token_matches(presented, token.as_bytes()) {
            let mut r = json_reply(
                401,
                &serde_json::json!({"error": "a valid admin token is required"}),
            );
            r.1 = [(
                "www-authenticate",
                "Bearer realm=\"mcp-gateway admin\"".into(),
            )];
            return r;
        }
    } else if !host_is_address(req.headers()) {
        return json_reply(
            403,
            &serde_json::json!({"error": "without an admin token, the admin API is reached by address (Host an IP literal or localhost)"}),
        );
    } else if let Some(uid) = peer_runs_as_a_child(
        req.extensions()
            .get::<axum::extract::ConnectInfo<crate::admin_server::Peer>>()
            .map(|c| c.0.clone()),
        control,
    ) {
        return json_reply(
            403,
            &serde_json::json!({"error": format!(
                "this connection is uid {uid}'s, the user stdio servers run as: without an admin token the admin API serves other users only (set `admin.token`)"
            )}),
        );
    }
    if let Some((status, why)) = cross_site(&method, req.headers()) {
        return json_reply(status, &serde_json::json!({ "error": why }));
    }
    let openmetrics =
        telemetry::wants_openmetrics(req.headers().get("accept").and_then(|v| v.to_str().ok()));
    let body = match tokio::time::timeout(
        crate::admin_server::BODY_TIMEOUT,
        axum::body::to_bytes(req.into_body(), 64 * 1024),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return json_reply(413, &serde_json::json!({"error": e.to_string()})),
        Err(_) => {
            return json_reply(
                408,
                &serde_json::json!({"error": format!(
                    "the request body did not arrive within {} s",
                    crate::admin_server::BODY_TIMEOUT.as_secs()
                )}),
            );
        }
    };
    let mut c = lock(control);
    c.drain_stats();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            let mut text = telemetry::render_metrics(&c.shared, c.maps.as_ref());
            crate::standard_metrics::render_process(&mut text);
            crate::standard_metrics::render_build_info(&mut text);
            if c.maps.is_some() {
                crate::standard_metrics::render_xdp(&mut text, &c.xdp, c.xdp_reattached);
            }
            crate::standard_metrics::render_certificates(
                &mut text,
                &c.shared.snapshot.load().config,
            );
            telemetry::render_upstream_health(&c.stats, &c.shared.snapshot.load().config, &mut text);
            c.reloads.render(&mut text);
            if openmetrics {
                telemetry::render_requests(&c.stats, &mut text, true);
                respond(
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    telemetry::to_openmetrics(&text),
                )
            } else {
                telemetry::render_requests(&c.stats, &mut text, false);
                respond(200, "text/plain; version=0.0.4; charset=utf-8", text)
            }
        }
        (&Method::GET, "/stats") => match parse_window(&query) {
            Ok(window) => {
                let mut v = c.stats.stats(window);
                v["kernel"] = c.kernel_json();
                json_reply(200, &v)
            }
            Err(e) => json_reply(400, &serde_json::json!({ "error": e })),
        },
        (&Method::POST, "/reload") => match c.reload("admin_api") {
            Ok(msg) => json_reply(200, &serde_json::json!({ "result": msg })),
            Err(e) => json_reply(422, &serde_json::json!({ "error": format!("{e:#}") })),
        },
        (&Method::GET, "/pins") => json_reply(200, &c.shared.pins.list()),
        (&Method::POST, path @ ("/pins/approve" | "/pins/reject")) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Named {
                upstream: String,
                tool: String,
                /// The pending definition's digest, as `GET /pins` showed it: what the operator
                /// read is what is approved (or rejected).
                sha256: String,
            }
            use crate::policy::pins::NotApproved;
            let approve = path == "/pins/approve";
            match serde_json::from_slice::<Named>(&body) {
                Err(e) => json_reply(
                    400,
                    &serde_json::json!({"error": format!("expected {{\"upstream\": …, \"tool\": …, \"sha256\": the pending definition's digest from GET /pins}}: {e}")}),
                ),
                Ok(a) => {
                    let pins = &c.shared.pins;
                    let done = if approve {
                        pins.approve(&a.upstream, &a.tool, &a.sha256)
                    } else {
                        pins.reject(&a.upstream, &a.tool, &a.sha256)
                    };
                    match done {
                        Ok(digest) if approve => {
                            json_reply(200, &serde_json::json!({"approved": digest}))
                        }
                        Ok(digest) => json_reply(200, &serde_json::json!({"rejected": digest})),
                        Err(NotApproved::NothingPending) => json_reply(
                            404,
                            &serde_json::json!({"error": format!("no changed definition of `{}` at `{}` awaits approval", a.tool, a.upstream)}),
                        ),
                        Err(NotApproved::Other(pending)) => json_reply(
                            409,
                            &serde_json::json!({"error": format!("the definition of `{}` at `{}` awaiting approval is {pending}, not {}: it changed since; read it in GET /pins", a.tool, a.upstream, a.sha256), "pending": pending}),
                        ),
                    }
                }
            }
        }
        (&Method::GET, "/bans") => json_reply(
            200,
            &serde_json::json!(c
                .list_bans()
                .iter()
                .map(|(net, left)| serde_json::json!({"address": ban_text(*net), "remaining_seconds": left.as_secs()}))
                .collect::<Vec<_>>()),
        ),
        (&Method::POST, "/bans") => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct BanRequest {
                address: String,
                seconds: u64,
            }
            let expected = "expected {\"address\": an IP address or a CIDR prefix, \"seconds\": N}, or a list of them";
            // One ban, or a list of them (checked whole before any is made).
            let many = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            let parsed = if many {
                serde_json::from_slice::<Vec<BanRequest>>(&body)
            } else {
                serde_json::from_slice::<BanRequest>(&body).map(|b| vec![b])
            };
            let requests = match parsed {
                Ok(b) => b,
                Err(e) => {
                    return json_reply(400, &serde_json::json!({"error": format!("{expected}: {e}")}));
                }
            };
            let mut bans = Vec::with_capacity(requests.len());
            for (i, ban) in requests.iter().enumerate() {
                // Said only with an error.
                let which = || if many { format!("ban {i}: ") } else { String::new() };
                let Some(net) = parse_ban(&ban.address) else {
                    return json_reply(400, &serde_json::json!({"error": format!("{}{expected}: `{}` is neither", which(), ban.address)}));
                };
                if let Some(problem) = crate::config::covers_ipv4(&net) {
                    return json_reply(400, &serde_json::json!({"error": format!("{}`{}` {problem}", which(), ban.address)}));
                }
                if ban.seconds == 0 {
                    return json_reply(400, &serde_json::json!({"error": format!("{}seconds must be at least 1 (DELETE /bans/<address> lifts a ban)", which())}));
                }
                bans.push((net, Duration::from_secs(ban.seconds)));
            }
            let (done, failed) = c.ban_nets(&bans);
            for (net, ttl) in &bans[..done.min(16)] {
                let address = ban_text(canonical_net(*net));
                tracing::info!(address, seconds = ttl.as_secs(), "banned via the admin API");
            }
            if done > 16 {
                tracing::info!(more = done - 16, "banned via the admin API");
            }
            match failed {
                None if !many => {
                    let (net, ttl) = bans[0];
                    json_reply(200, &serde_json::json!({"banned": ban_text(canonical_net(net)), "seconds": ttl.as_secs()}))
                }
                None => json_reply(200, &serde_json::json!({"banned": done})),
                Some(e) => json_reply(500, &serde_json::json!({"error": e.to_string(), "banned": done, "of": bans.len()})),
            }
        }
        (&Method::DELETE, p) if p.starts_with("/bans/") => {
            let target = &p["/bans/".len()..];
            // `/bans/198.18.0.0/24`, or with the slash escaped.
            let Some(net) = parse_ban(&target.replace("%2F", "/").replace("%2f", "/")) else {
                return json_reply(400, &serde_json::json!({"error": "not an IP address or a CIDR prefix"}));
            };
            match c.unban_net(net) {
                Ok(true) => json_reply(200, &serde_json::json!({"unbanned": ban_text(canonical_net(net))})),
                Ok(false) => {
                    // Not banned by itself, but a wider ban may hold it (an auto-ban widened
                    // to its /56, an operator's prefix): that is what to lift.
                    let net = canonical_net(net);
                    let held_by: Vec<String> = c
                        .list_bans()
                        .iter()
                        .filter(|(ban, _)| ban.contains(&net))
                        .map(|(ban, _)| ban_text(*ban))
                        .collect();
                    if held_by.is_empty() {
                        json_reply(404, &serde_json::json!({"error": "not banned"}))
                    } else {
                        json_reply(409, &serde_json::json!({"error": format!("`{}` has no ban of its own: {} holds it (DELETE /bans/<that prefix> lifts it)", ban_text(net), held_by.join(", ")), "held_by": held_by}))
                    }
                }
                Err(e) => json_reply(500, &serde_json::json!({"error": e.to_string()})),
            }
        }
        (
            _,
            "/metrics" | "/stats" | "/reload" | "/bans" | "/pins" | "/pins/approve"
            | "/pins/reject",
        ) => {
            json_reply(405, &serde_json::json!({"error": format!("{method} is not allowed on {path}")}))
        }
        _ => json_reply(
            404,
            &serde_json::json!({"error": "not found", "endpoints": ["/healthz", "/readyz", "/metrics", "/stats?window=10s|1m|5m|all", "/reload", "/bans", "/pins", "/pins/approve", "/pins/reject"]}),
        ),
    }
}

/// The tool pins, as the stdio supervisors consult them (weakly: the registry lives in
/// `Shared`).
struct StdioPins(std::sync::Weak<Shared>);

impl crate::stdio::PinGate for StdioPins {
    fn enabled(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|s| s.snapshot.load().policy.pinning)
    }

    fn observe(&self, upstream: &str, tools: &[serde_json::Value]) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let snapshot = shared.snapshot.load();
        for tool in tools {
            let name = tool.get("name").and_then(serde_json::Value::as_str);
            let configured = name.and_then(|n| snapshot.policy.configured_pin(upstream, n));
            shared.pins.observe(upstream, tool, configured);
        }
    }

    fn callable(
        &self,
        upstream: &str,
        tool: &str,
        defined: Option<&crate::policy::pins::Digests>,
    ) -> bool {
        use crate::policy::pins::Reaches;
        self.0.upgrade().is_none_or(|s| {
            let snapshot = s.snapshot.load();
            s.pins
                .callable(
                    upstream,
                    tool,
                    snapshot.policy.configured_pin(upstream, tool),
                    defined.map_or(Reaches::Upstream, Reaches::Definition),
                )
                .is_ok()
        })
    }
}

/// Configuration changes by source (`signal`, `admin_api`, `file_change`) and result, and when
/// the last of each result happened; exported on `/metrics`.
#[derive(Default)]
struct Reloads {
    counts: std::collections::BTreeMap<(&'static str, &'static str), u64>,
    /// Seconds since the epoch of the last applied and the last refused change.
    last: std::collections::BTreeMap<&'static str, f64>,
}

impl Reloads {
    fn record(&mut self, source: &'static str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        *self.counts.entry((source, result)).or_default() += 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.last.insert(result, now);
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_config_reloads_total Configuration changes applied (success) and refused (failure), by source: signal, admin_api, file_change.\n# TYPE mcp_gateway_config_reloads_total counter"
        );
        for ((source, result), n) in &self.counts {
            let _ = writeln!(
                out,
                "mcp_gateway_config_reloads_total{{source=\"{source}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_config_last_reload_timestamp_seconds When the last configuration change was applied (success) or refused (failure).\n# TYPE mcp_gateway_config_last_reload_timestamp_seconds gauge"
        );
        for (result, at) in &self.last {
            let _ = writeln!(
                out,
                "mcp_gateway_config_last_reload_timestamp_seconds{{result=\"{result}\"}} {at:.3}"
            );
        }
    }
}

/// A ban's target from the admin API: an address, or a prefix in CIDR notation.
fn parse_ban(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// A prefix with its host bits cleared, and an IPv4-mapped IPv6 address or prefix (of /96 or
/// longer) as the IPv4 one it is (the form the kernel maps key and the workers compare).
/// [`Control::ban_net`] and [`Control::unban_net`] take every ban through it.
/// Whether `ip` names a machine only on the host that sees it: loopback, link-local or
/// unspecified.
fn host_local(ip: std::net::IpAddr) -> bool {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || v6.segments()[0] & 0xffc0 == 0xfe80
        }
    }
}

/// What an auto-ban of a client at `ip` bans: its source as refusals are counted
/// ([`crate::policy::limits::source_net`]), an IPv4 address or an IPv6 /64 (the address
/// alone where a /64 holds others).
/// An auto-ban widened ([`Control::widened`]): its prefix, and how many auto-bans it held.
type Widened = (ipnet::Ipv6Net, usize);

/// The keys of a set of nets ordered as `IpNet`s that `net` holds, itself included: from `net`
/// to its last address.
fn within(net: ipnet::Ipv6Net) -> std::ops::RangeInclusive<IpNet> {
    let last = ipnet::Ipv6Net::new(net.broadcast(), 128).unwrap_or(net);
    IpNet::V6(net.trunc())..=IpNet::V6(last)
}

fn auto_ban_net(ip: std::net::IpAddr) -> IpNet {
    crate::policy::limits::source_net(ip)
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => {
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, |n| IpNet::V4(n.trunc()))
            }
            None => net.trunc(),
        },
        other => other.trunc(),
    }
}

/// How the admin API shows a ban: the address alone for one address, else the prefix.
fn ban_text(net: IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    /// The owner of a loopback connection's client end is told by one exact query, for IPv4
    /// and IPv6; a connection whose client end closed has none to tell.
    #[test]
    fn a_connections_owner_is_asked_of_the_kernel() {
        // SAFETY: getuid(2) cannot fail.
        let me = unsafe { libc::getuid() };
        for at in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(at).unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, peer) = listener.accept().unwrap();
            let local = server.local_addr().unwrap();
            assert_eq!(super::socket_owner(peer, local), Some(me), "{at}");
            // Another port of the same host is no socket.
            let other = std::net::SocketAddr::new(peer.ip(), peer.port().wrapping_add(1));
            assert_eq!(super::socket_owner(other, local), None, "{at}");
            drop(client);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while super::socket_owner(peer, local).is_some() {
                assert!(std::time::Instant::now() < deadline, "{at}: still told");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
