//! State shared between the control thread and the workers, built so that the request path takes
//! no locks: the configuration snapshot is swapped atomically (`ArcSwap`), each worker writes
//! only its own row of connection counters, and the control thread publishes per-tenant at-cap
//! flags that workers only read.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use gateway_common::MAX_TENANTS;
use ipnet::IpNet;

use crate::config::Config;

/// A validated configuration plus what the request path derives from it.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub classifier: Classifier,
    /// Shared with a snapshot that changes only what no rule reads (an upstream's TLS files).
    pub policy: std::sync::Arc<crate::policy::Policy>,
    /// This snapshot's number, unique in the process: a connection's caller admitted under
    /// another is judged again ([`crate::policy::rejudge`]).
    pub serial: u64,
}

impl Snapshot {
    pub fn new(config: Config) -> Self {
        let policy =
            crate::policy::Policy::compile(&config).expect("validation compiled this policy");
        Self::with_policy(config, policy)
    }

    /// The snapshot of `config` with `policy`, compiled from it when it was validated.
    pub fn with_policy(config: Config, policy: crate::policy::Policy) -> Self {
        Self::sharing_policy(config, std::sync::Arc::new(policy))
    }

    /// The snapshot of `config` with the policy of a snapshot whose rules it does not change.
    pub fn sharing_policy(config: Config, policy: std::sync::Arc<crate::policy::Policy>) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        let classifier = Classifier::new(&config);
        Self {
            config,
            classifier,
            policy,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// User-space twin of the kernel's tenant classification (same prefixes, longest match wins),
/// used to attribute accepted connections to tenants.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Longest prefix first.
    nets: Vec<(IpNet, u32)>,
    default_tenant: u32,
}

impl Classifier {
    pub fn new(c: &Config) -> Self {
        let mut nets: Vec<(IpNet, u32)> = c
            .tenants
            .iter()
            .flat_map(|t| t.sources.iter().map(move |n| (*n, t.id)))
            .collect();
        nets.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        Self {
            nets,
            default_tenant: c.default_tenant,
        }
    }

    pub fn tenant_of(&self, ip: IpAddr) -> u32 {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map_or(self.default_tenant, |(_, t)| *t)
    }
}

/// Open connections per worker and tenant. Each worker writes only its own row.
pub struct ConnTable {
    rows: Box<[Box<[AtomicU64]>]>,
}

impl ConnTable {
    pub fn new(workers: usize) -> Self {
        let row = || {
            (0..MAX_TENANTS)
                .map(|_| AtomicU64::new(0))
                .collect::<Box<[_]>>()
        };
        Self {
            rows: (0..workers).map(|_| row()).collect(),
        }
    }

    /// A connection of `tenant` on `worker`, counted already (by [`Shared::enter_conn`]), until
    /// the returned guard is dropped.
    pub fn counted(&self, worker: usize, tenant: u32) -> Counted<'_> {
        Counted {
            table: self,
            worker,
            tenant,
        }
    }

    /// Sequentially consistent with [`ConnTable::total`]: of two workers that each count a
    /// connection and then sum, at least one sees the other's.
    pub fn opened(&self, worker: usize, tenant: u32) {
        self.rows[worker][tenant as usize].fetch_add(1, Ordering::SeqCst);
    }

    pub fn closed(&self, worker: usize, tenant: u32) {
        self.rows[worker][tenant as usize].fetch_sub(1, Ordering::SeqCst);
    }

    /// Forgets a worker's connections: its runtime died and took them with it.
    pub fn reset(&self, worker: usize) {
        for c in &self.rows[worker] {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Open connections of `tenant` over all workers.
    pub fn total(&self, tenant: u32) -> u64 {
        self.rows
            .iter()
            .map(|r| r[tenant as usize].load(Ordering::SeqCst))
            .sum()
    }
}

/// One open connection in a [`ConnTable`]; dropping it uncounts the connection.
pub struct Counted<'a> {
    table: &'a ConnTable,
    worker: usize,
    tenant: u32,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.table.closed(self.worker, self.tenant);
    }
}

/// Open connections per source (an IPv4 address, an IPv6 /64) over all workers, for the
/// tenants' `max_connections_per_source`: only sources with a connection open have an entry,
/// so the table is as large as the open connections at most. Lock-free (a connection's accept
/// and close; never a request). Sources are counted as the new-connection limits count them
/// ([`source_key`]: an IPv6 address whole where a /64 is not one client's).
#[derive(Default)]
pub struct SourceConns(papaya::HashMap<[u8; 16], u64>);

impl SourceConns {
    /// Counts a connection of `client` unless `cap` of its source's are open.
    pub fn enter(&self, client: IpAddr, cap: u64) -> bool {
        use papaya::{Compute, Operation};
        let table = self.0.pin();
        let entered = table.compute(source_key(client), |entry| match entry {
            Some((_, n)) if *n >= cap => Operation::Abort(()),
            Some((_, n)) => Operation::Insert(n + 1),
            None => Operation::Insert(1),
        });
        !matches!(entered, Compute::Aborted(()))
    }

    /// Uncounts a connection of `client` counted by [`SourceConns::enter`].
    pub fn leave(&self, client: IpAddr) {
        use papaya::Operation;
        self.0
            .pin()
            .compute(source_key(client), |entry| match entry {
                Some((_, n)) if *n > 1 => Operation::Insert(n - 1),
                Some(_) => Operation::Remove,
                None => Operation::Abort(()),
            });
    }

    /// Sources with a connection open.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Request streams whose client left and may come back for the rest (`Last-Event-ID`), while
/// a worker reads them on for it (`relay::drain`), over all workers: a resume of one, on any
/// worker, takes it over. An SDK's server sends the rest of a call to the request's own stream
/// while that stream is open (the Python SDK then replays nothing to the resume and ends it;
/// the TypeScript one may answer 409), so the drain closes its stream before the resume goes
/// on, and holds the call's concurrency slot until the call's answer passes on the resumed
/// stream (or to its deadline). An entry lives as
/// long as its drain; drains are few (a client must leave a stream mid-call), and nothing on a
/// request's way looks here but a resume.
#[derive(Default)]
pub struct Drains {
    table: papaya::HashMap<u64, Arc<Drain>>,
    next: AtomicU64,
}

/// One stream read on for a client that left ([`Drains`]).
pub struct Drain {
    upstream: String,
    /// The `Mcp-Session-Id` its request came with, as the client sent it (signed for its
    /// owner: a resume with it is the same caller's).
    session: Vec<u8>,
    /// The last event ids the client was given on it, as the upstream (or federation) wrote
    /// them before they were signed: a resume names one of them.
    ids: Vec<Vec<u8>>,
    /// The id of the request whose answer the stream carries: once a resumed stream passed
    /// the response with it, the call is over.
    request: Option<serde_json::Value>,
    state: std::sync::atomic::AtomicU8,
}

/// How long a worker's loop may go without a turn before `/readyz` calls it stalled.
pub const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// [`Drain::state`]: read on for the client.
const DRAINING: u8 = 0;
/// A resume asks for the stream.
const RESUMED: u8 = 1;
/// The drain closed its stream for the resume, and holds the slot.
const HANDED: u8 = 2;
/// The call's answer passed on the resumed stream: the drain gives the slot back. Until then
/// (the resume's client may leave, the upstream refuse it) the call may still run, and the
/// drain holds the slot to its deadline: else a resume left at once freed the slot of a call
/// still running, and a client could hold the upstream past its limit so.
const ANSWERED: u8 = 3;
/// The drain ended before a resume took it over.
const ENDED: u8 = 4;
/// A resume that asked for the stream ended before the drain handed it over: the drain reads
/// on as if never asked.
const RESUME_LEFT: u8 = 5;

/// A drain's entry in [`Drains`], removed when dropped.
pub struct Draining<'a> {
    drains: &'a Drains,
    key: u64,
    pub drain: Arc<Drain>,
}

impl Drains {
    /// Enters a drain of `upstream`'s stream answering `request` in `session`, whose client
    /// was given the events `ids`.
    pub fn enter(
        &self,
        upstream: &str,
        session: &[u8],
        ids: Vec<Vec<u8>>,
        request: Option<serde_json::Value>,
    ) -> Draining<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let drain = Arc::new(Drain {
            upstream: upstream.to_owned(),
            session: session.to_owned(),
            ids,
            request,
            state: std::sync::atomic::AtomicU8::new(DRAINING),
        });
        self.table.pin().insert(key, Arc::clone(&drain));
        Draining {
            drains: self,
            key,
            drain,
        }
    }

    /// The drain of `upstream`'s stream for `session` that gave the client the event `id`, now
    /// asked to hand its stream over ([`Drain::handed`] says when it did). `None` when no
    /// drain gave that event (the stream ended, or never was drained).
    pub fn take_over(&self, upstream: &str, session: &[u8], id: &[u8]) -> Option<Arc<Drain>> {
        let table = self.table.pin();
        table
            .values()
            .find(|d| {
                d.upstream == upstream
                    && d.session == session
                    && d.ids.iter().any(|i| i == id)
                    && d.state
                        .compare_exchange(DRAINING, RESUMED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            })
            .cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl Drain {
    /// A resume asks for the stream.
    pub fn resumed(&self) -> bool {
        self.state.load(Ordering::Acquire) == RESUMED
    }

    /// The stream is closed for the resume: from here the drain only holds the slot.
    pub fn hand_over(&self) {
        let _ = self
            .state
            .compare_exchange(RESUMED, HANDED, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The drain is no longer reading the stream (handed over, or ended by itself).
    pub fn handed(&self) -> bool {
        self.state.load(Ordering::Acquire) != RESUMED
    }

    /// The id of the request whose answer the stream carries.
    pub fn request(&self) -> Option<&serde_json::Value> {
        self.request.as_ref()
    }

    /// The call's answer passed on the resumed stream.
    pub fn answered(&self) -> bool {
        self.state.load(Ordering::Acquire) == ANSWERED
    }
}

/// A resume that took a drain over. Once the call's answer went on it ([`Resumed::finished`]),
/// so does the drain's hold; dropped otherwise (its client left, the upstream refused it, the
/// stream failed), the drain holds on to its deadline.
pub struct Resumed(pub Arc<Drain>);

impl Resumed {
    /// The call's answer went on the resumed stream.
    pub fn finished(self) {
        self.0.state.store(ANSWERED, Ordering::Release);
    }
}

impl Drop for Resumed {
    fn drop(&mut self) {
        // Handed over, the drain holds the slot to its deadline as it is (see `ANSWERED`).
        let _ = self.0.state.compare_exchange(
            RESUMED,
            RESUME_LEFT,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        self.drains.table.pin().remove(&self.key);
        // A resume waiting for the stream goes on without it.
        let _ =
            self.drain
                .state
                .compare_exchange(RESUMED, ENDED, Ordering::AcqRel, Ordering::Acquire);
        let _ =
            self.drain
                .state
                .compare_exchange(DRAINING, ENDED, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// A new connection's source holds its tenant's `max_connections_per_source`.
#[derive(Debug)]
pub struct SourceAtCap;

/// The bans in force (addresses with their expiry on `CLOCK_MONOTONIC`, the kernel's clock), as
/// the control thread last published them: the kernel's ban map and the auto-bans and admin
/// API's bans. Workers read it for addresses the XDP program cannot see (those carried in
/// PROXY protocol headers).
#[derive(Debug, Default)]
pub struct BanSet {
    until: rustc_hash::FxHashMap<IpAddr, u64>,
    /// Banned prefixes wider than one address, grouped by family and length: a look-up takes
    /// one hash probe per length in use, however many prefixes are banned (an operator's
    /// blocklist of 10,000 /24s is one probe, where a list was 10,000 comparisons on each
    /// accept). Every length is asked, so a longer prefix whose ban ended does not hide a
    /// shorter one still in force.
    nets: Vec<NetsOfLength>,
}

/// Banned prefixes of one family and length, by their first address, each with its end.
#[derive(Debug)]
struct NetsOfLength {
    v4: bool,
    len: u8,
    until: rustc_hash::FxHashMap<IpAddr, u64>,
}

/// `ip`'s first `len` bits (the rest zero), in `ip`'s family (`len` at most its width).
fn prefix_of(ip: IpAddr, len: u8) -> IpAddr {
    IpNet::new(ip, len).map_or(ip, |net| net.network())
}

impl BanSet {
    /// The bans in force: a prefix of one address (`/32`, `/128`) bans that address.
    pub fn new(bans: impl IntoIterator<Item = (ipnet::IpNet, u64)>) -> Self {
        let mut until = rustc_hash::FxHashMap::default();
        let mut nets: Vec<NetsOfLength> = Vec::new();
        for (net, t) in bans {
            if net.prefix_len() == net.max_prefix_len() {
                until.insert(net.addr().to_canonical(), t);
                continue;
            }
            let (v4, len) = (net.addr().is_ipv4(), net.prefix_len());
            let group = match nets.iter().position(|g| g.v4 == v4 && g.len == len) {
                Some(i) => &mut nets[i],
                None => {
                    nets.push(NetsOfLength {
                        v4,
                        len,
                        until: rustc_hash::FxHashMap::default(),
                    });
                    nets.last_mut().expect("just pushed")
                }
            };
            group.until.insert(prefix_of(net.addr(), len), t);
        }
        Self { until, nets }
    }

    /// Whether `ip` is banned at `now_ns` (`CLOCK_MONOTONIC`), by its address or a prefix
    /// holding it.
    pub fn is_banned(&self, ip: IpAddr, now_ns: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        let ip = ip.to_canonical();
        let in_force = |until: Option<&u64>| until.is_some_and(|until| *until > now_ns);
        in_force(self.until.get(&ip))
            || self
                .nets
                .iter()
                .filter(|g| g.v4 == ip.is_ipv4())
                .any(|g| in_force(g.until.get(&prefix_of(ip, g.len))))
    }

    pub fn len(&self) -> usize {
        self.until.len() + self.nets.iter().map(|g| g.until.len()).sum::<usize>()
    }

    /// When the ban of exactly `net` (canonical, as [`BanSet::new`] was given it) ends.
    pub fn until_of(&self, net: &ipnet::IpNet) -> Option<u64> {
        if net.prefix_len() == net.max_prefix_len() {
            return self.until.get(&net.addr()).copied();
        }
        let (v4, len) = (net.addr().is_ipv4(), net.prefix_len());
        self.nets
            .iter()
            .find(|g| g.v4 == v4 && g.len == len)
            .and_then(|g| g.until.get(&prefix_of(net.addr(), len)).copied())
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty() && self.nets.is_empty()
    }
}

/// Why a client's connection is closed before a byte of it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceRefusal {
    /// In `kernel.deny`.
    Denied,
    /// Banned.
    Banned,
}

/// Why a new connection is over its rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateRefusal {
    /// Its source's (`per_source_new_connections_per_sec`).
    Source,
    /// Its tenant's (`new_connections_per_sec`).
    Tenant,
}

/// The new-connection rates, as the workers hold them when they accept a direct connection:
/// the kernel program's two GCRA buckets (per source, then per tenant), kept apart from its
/// own. The program counts SYNs, and some connections come of no SYN it counted: the ACK that
/// completes a SYN-cookie handshake makes one, and again each time it is sent (for about two
/// minutes), and there is no program at all when it is off or on another interface.
///
/// A client that keeps to the rates is not refused here for when its connections are
/// accepted: the kernel admits SYNs as they come, a worker accepts the connections after a busy
/// turn all at once, so each bucket allows [`ACCEPT_SLACK_NS`] more than the program's burst.
pub struct NewConns {
    tenants: Box<[AtomicU64]>,
    /// One bucket per tenant and source that made a connection lately (exact: a bucket is
    /// nobody else's); the control thread forgets the idle ones every second. Sources are
    /// addresses that finished a handshake, so they cannot be made up by the million; past
    /// [`MAX_NEW_CONN_SOURCES`] a new source is admitted untracked, as the kernel's full map
    /// would admit it.
    sources: papaya::HashMap<(u32, [u8; 16]), AtomicU64>,
}

impl Default for NewConns {
    fn default() -> Self {
        Self {
            tenants: (0..MAX_TENANTS).map(|_| AtomicU64::new(0)).collect(),
            sources: papaya::HashMap::new(),
        }
    }
}

/// Sources [`NewConns`] holds buckets for at once (the kernel program's map holds as many).
const MAX_NEW_CONN_SOURCES: usize = gateway_common::MAX_SOURCES as usize;

/// How much later than the kernel program a worker may take a connection without its rates
/// counting the wait against it: one second (or one interval, if longer).
const ACCEPT_SLACK_NS: u64 = 1_000_000_000;

impl NewConns {
    /// Takes a token of `client`'s bucket and then of its tenant's, at `now_ns`, by `limits`
    /// (an interval of 0 is no limit). A source over its own limit does not spend its tenant's.
    pub fn admit(
        &self,
        tenant: u32,
        client: IpAddr,
        limits: &gateway_common::TenantLimits,
        now_ns: u64,
    ) -> Result<(), RateRefusal> {
        let slack = |interval: u64| ACCEPT_SLACK_NS.max(interval);
        if limits.source_interval_ns != 0 {
            let sources = self.sources.pin();
            let key = (tenant, source_key(client));
            let bucket = match sources.get(&key) {
                Some(bucket) => Some(bucket),
                None if sources.len() < MAX_NEW_CONN_SOURCES => {
                    Some(sources.get_or_insert_with(key, || AtomicU64::new(0)))
                }
                None => None,
            };
            if let Some(bucket) = bucket
                && !take(
                    bucket,
                    now_ns,
                    limits.source_interval_ns,
                    limits.source_tolerance_ns + slack(limits.source_interval_ns),
                )
            {
                return Err(RateRefusal::Source);
            }
        }
        if limits.conn_interval_ns != 0
            && let Some(bucket) = self.tenants.get(tenant as usize)
            && !take(
                bucket,
                now_ns,
                limits.conn_interval_ns,
                limits.conn_tolerance_ns + slack(limits.conn_interval_ns),
            )
        {
            return Err(RateRefusal::Tenant);
        }
        Ok(())
    }

    /// Forgets the sources whose buckets are full again (idle since their last connection's
    /// interval and burst), as of `now_ns`: what they held is what a new bucket holds.
    pub fn forget_idle(&self, now_ns: u64) {
        self.sources
            .pin()
            .retain(|_, tat| tat.load(Ordering::Relaxed) >= now_ns);
    }

    /// Sources held now.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.sources.len()
    }
}

/// A source as the new-connection limits count it: an IPv4 address, an IPv6 /64 (one host is
/// given a /64), an IPv6 address whole where a /64 is not one client's
/// ([`gateway_common::SHARED_V6`]). As the kernel program counts it, and as
/// [`crate::policy::limits::source_net`] names it.
fn source_key(client: IpAddr) -> [u8; 16] {
    match crate::policy::limits::source_of(client) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// One GCRA decision on a bucket the workers share, as the kernel program takes one. A bucket
/// further ahead than `tolerance` (rates lowered by a reload or a fleet's new share since it
/// was charged) is taken as empty, not as owing what the old rates charged.
fn take(bucket: &AtomicU64, now: u64, interval: u64, tolerance: u64) -> bool {
    let mut tat = bucket.load(Ordering::Relaxed);
    if tat > now.saturating_add(tolerance) {
        tat = now.saturating_add(tolerance);
        bucket.store(tat, Ordering::Relaxed);
    }
    match gateway_common::gcra_take(tat, now, interval, tolerance) {
        gateway_common::Take::Reset(next) => bucket.store(next, Ordering::Relaxed),
        gateway_common::Take::Charge => {
            bucket.fetch_add(interval, Ordering::Relaxed);
        }
        gateway_common::Take::Refuse => return false,
    }
    true
}

/// Client connections closed for their source or tenant (relaxed atomics, over all workers):
/// as they were accepted (a direct listener's), or before a next request.
#[derive(Debug, Default)]
pub struct RefusedConns {
    denied: AtomicU64,
    banned: AtomicU64,
    source_rate: AtomicU64,
    tenant_rate: AtomicU64,
    tenant_at_cap: AtomicU64,
    source_at_cap: AtomicU64,
    revoked: AtomicU64,
}

impl RefusedConns {
    pub fn source(&self, why: SourceRefusal) {
        match why {
            SourceRefusal::Denied => &self.denied,
            SourceRefusal::Banned => &self.banned,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn rate(&self, why: RateRefusal) {
        match why {
            RateRefusal::Source => &self.source_rate,
            RateRefusal::Tenant => &self.tenant_rate,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn at_cap(&self) {
        self.tenant_at_cap.fetch_add(1, Ordering::Relaxed);
    }

    pub fn source_at_cap(&self) {
        self.source_at_cap.fetch_add(1, Ordering::Relaxed);
    }

    /// An open connection cut as a reload revoked what its caller was admitted with.
    pub fn revoked(&self) {
        self.revoked.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_connections_refused_total Client connections a worker closed, by reason: the client is in `kernel.deny` or banned (as a direct listener's connection was accepted, the kernel program having let it through, before a next request on a connection taken before, or an open connection cut as the ban or deny came), over its source's or tenant's new-connection rate (a direct listener's, as it was accepted: connections of no SYN the kernel program counted), or its tenant is at its connection cap or its source at the tenant's `max_connections_per_source` (a direct listener's, answered 503), or a reload revoked what its open connection was admitted with (its credential, route or tenant, or the client CA that verified its certificate).\n# TYPE mcp_gateway_connections_refused_total counter"
        );
        for (reason, n) in [
            ("denied", &self.denied),
            ("banned", &self.banned),
            ("source_rate", &self.source_rate),
            ("tenant_rate", &self.tenant_rate),
            ("tenant_at_cap", &self.tenant_at_cap),
            ("source_at_cap", &self.source_at_cap),
            ("revoked", &self.revoked),
        ] {
            let _ = writeln!(
                out,
                "mcp_gateway_connections_refused_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Bans in force, published by the control thread.
    pub bans: ArcSwap<BanSet>,
    /// PROXY protocol headers accepted and refused, by reason.
    pub proxy_protocol: crate::http::proxy_protocol::Counters,
    /// Client connections a worker closed for their source or tenant, by reason.
    pub refused_conns: RefusedConns,
    /// Changes (after the fact) whenever a ban is added or a configuration is published: the
    /// workers then cut the open connections of clients now refused
    /// ([`crate::mcp::worker::OpenConns::cut_refused`]).
    pub sources_changed: AtomicU64,
    /// The new-connection rates the workers hold direct connections to.
    pub new_conns: NewConns,
    pub conns: ConnTable,
    /// Open connections per source, for the tenants' `max_connections_per_source`.
    pub source_conns: SourceConns,
    /// Streams read on for clients that left them, for a resume to take over.
    pub drains: Drains,
    at_cap: Box<[AtomicBool]>,
    /// Seals federated sessions into their ids and signs passthrough ones (made at start; handed
    /// to the new process of an upgrade; a fleet's is shared by its gateways).
    pub session_key: [u8; 32],
    /// The gateway's own sessions their clients ended.
    pub ended_sessions: crate::session::Ended,
    /// Bridged calls in flight, for their clients' `notifications/cancelled`.
    pub cancels: crate::session::Cancels,
    /// Upstreams learnt to speak only the stateless era, and since when: one refusal teaches
    /// every worker (a session's requests reach any of them).
    pub stateless_upstreams: papaya::HashMap<u64, std::time::Instant>,
    /// Workers send their telemetry here, once a second; the control thread takes it.
    pub stats_tx: std::sync::mpsc::Sender<crate::stats::Interval>,
    pub stats_rx: std::sync::Mutex<std::sync::mpsc::Receiver<crate::stats::Interval>>,
    /// Rate, concurrency, budget and loop counts, shared by the workers, across reloads.
    pub limits: std::sync::Arc<crate::policy::limits::State>,
    pub breakers: crate::policy::breaker::Breakers,
    pub pins: crate::policy::pins::Pins,
    /// Refusals by the rule (configuration key) that decided them.
    pub refusals: papaya::HashMap<String, AtomicU64>,
    /// Source addresses to ban in the kernel, with how long (the auto-ban loop); the control
    /// thread applies them.
    pub ban_tx: std::sync::mpsc::Sender<(std::net::IpAddr, std::time::Duration)>,
    pub ban_rx:
        std::sync::Mutex<std::sync::mpsc::Receiver<(std::net::IpAddr, std::time::Duration)>>,
    /// The audit log (`[audit]`); replaced by a reload that changes it ([`open_audit`]).
    pub audit: arc_swap::ArcSwap<crate::policy::audit::AuditLog>,
    /// The access log (`[telemetry.access_log]`), one line per request; replaced as the audit
    /// log is.
    pub access: arc_swap::ArcSwap<crate::policy::audit::AccessLog>,
    /// Which workers are serving (a worker whose runtime panicked is down until it restarts);
    /// `/readyz` answers 503 while any is down.
    pub workers_up: Box<[AtomicBool]>,
    /// When each worker last took a turn of its once-a-second task, in ms since `beat_epoch`
    /// (0: not yet): a worker whose loop no longer turns (a task that never yields) is stalled,
    /// and `/readyz` says so, as for one down.
    pub worker_beats: Box<[AtomicU64]>,
    pub beat_epoch: std::time::Instant,
    /// Connection tasks that panicked (each answered 500 and was closed; the worker lived on).
    pub panics: AtomicU64,
    /// Worker runtimes that panicked and were started again.
    pub worker_restarts: AtomicU64,
    /// The open-file limit the process runs with (raised to the hard limit at start).
    pub open_files_limit: AtomicU64,
    /// Accepts and upstream connects that failed for want of a file descriptor.
    pub out_of_descriptors: AtomicU64,
    /// False while a binary upgrade hands the listening sockets over: the workers stop
    /// accepting but leave the sockets listening (the new process has them too); true again if
    /// the upgrade fails.
    pub accepting: AtomicBool,
    /// Set when this process drains after handing over to an upgraded one: connections idle
    /// between requests get a moment to send their next request (answered with
    /// `connection: close`) rather than a close that could race it.
    pub handing_over: AtomicBool,
    /// The stdio upstreams' supervisors (started by the control thread).
    pub stdio: crate::stdio::Registry,
    /// Upstream connections, TLS failures and re-resolutions, by upstream.
    pub upstream_stats: std::sync::Arc<crate::endpoints::Stats>,
    /// What the TLS listeners serve, and their counters.
    pub tls: std::sync::Arc<crate::tls::Edge>,
    /// Request spans waiting for the OTLP exporter (one queue per worker) and its counters.
    pub spans: std::sync::Arc<crate::otlp::Spans>,
    /// The state store's counters (the store itself is the control thread's).
    pub state: crate::state::Stats,
    /// The fleet agent's counters (`[state] redis`).
    pub fleet: FleetStats,
}

impl Shared {
    /// How long the workers drain at most: `grace`, or after a handover to an upgraded gateway
    /// (which serves new connections meanwhile) as long as any upstream's
    /// `response_timeout_ms` if that is longer, while calls are in flight (past the grace, a
    /// worker with none left closes what remains, idle event streams included), so that an
    /// upgrade cuts no call its timeouts allow. With the default grace of 5 s, every call
    /// longer than that was cut at each upgrade with no answer (an operator's review).
    pub fn drain_for(&self, grace: std::time::Duration) -> std::time::Duration {
        if !self.handing_over.load(std::sync::atomic::Ordering::Relaxed) {
            return grace;
        }
        self.snapshot
            .load()
            .config
            .upstreams
            .iter()
            .map(|u| u.response_timeout)
            .fold(grace, std::time::Duration::max)
    }
    pub fn new(config: Config) -> Self {
        let workers = config.workers;
        let (stats_tx, stats_rx) = std::sync::mpsc::channel();
        let (ban_tx, ban_rx) = std::sync::mpsc::channel();
        let audit = open_audit(&config).unwrap_or_else(|e| {
            tracing::error!("{e}; audit is off");
            crate::policy::audit::AuditLog::off()
        });
        let access = open_access(&config).unwrap_or_else(|e| {
            tracing::error!("{e}; it is off");
            crate::policy::audit::AccessLog::off()
        });
        let (audit, access) = (
            arc_swap::ArcSwap::from_pointee(audit),
            arc_swap::ArcSwap::from_pointee(access),
        );
        // The span queues are sized at start; without `[telemetry.otlp]` then, small ones.
        let span_queue = config.telemetry.otlp.as_ref().map_or(256, |o| o.queue_max);
        Self {
            spans: std::sync::Arc::new(crate::otlp::Spans::new(workers, span_queue)),
            tls: std::sync::Arc::new(crate::tls::Edge::new(config.listeners.len())),
            limits: std::sync::Arc::default(),
            breakers: crate::policy::breaker::Breakers::default(),
            pins: crate::policy::pins::Pins::default(),
            refusals: papaya::HashMap::new(),
            ban_tx,
            ban_rx: std::sync::Mutex::new(ban_rx),
            audit,
            access,
            stats_tx,
            stats_rx: std::sync::Mutex::new(stats_rx),
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
            bans: ArcSwap::from_pointee(BanSet::default()),
            proxy_protocol: crate::http::proxy_protocol::Counters::default(),
            refused_conns: RefusedConns::default(),
            sources_changed: AtomicU64::new(0),
            new_conns: NewConns::default(),
            conns: ConnTable::new(workers),
            source_conns: SourceConns::default(),
            drains: Drains::default(),
            workers_up: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            worker_beats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            beat_epoch: std::time::Instant::now(),
            panics: AtomicU64::new(0),
            worker_restarts: AtomicU64::new(0),
            open_files_limit: AtomicU64::new(0),
            out_of_descriptors: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            handing_over: AtomicBool::new(false),
            stdio: crate::stdio::Registry::default(),
            upstream_stats: std::sync::Arc::default(),
            at_cap: (0..MAX_TENANTS).map(|_| AtomicBool::new(false)).collect(),
            session_key: crate::session::new_key(),
            ended_sessions: crate::session::Ended::default(),
            cancels: crate::session::Cancels::default(),
            stateless_upstreams: papaya::HashMap::new(),
            state: crate::state::Stats::default(),
            fleet: FleetStats::default(),
        }
    }

    pub fn at_cap(&self, tenant: u32) -> bool {
        self.at_cap[tenant as usize].load(Ordering::Relaxed)
    }

    /// Holds a direct connection from `client`, of `tenant`, to the tenant's new-connection
    /// rates ([`NewConns`]), at this host's share of a fleet's.
    pub fn admit_new_conn(
        &self,
        snapshot: &Snapshot,
        tenant: u32,
        client: IpAddr,
    ) -> Result<(), RateRefusal> {
        let Some(t) = snapshot.config.tenant(tenant) else {
            return Ok(());
        };
        let limits = snapshot
            .config
            .connection_limits(t, self.fleet.hosts.load(Ordering::Relaxed));
        if limits.source_interval_ns == 0 && limits.conn_interval_ns == 0 {
            return Ok(());
        }
        self.new_conns
            .admit(tenant, client, &limits, crate::kernel::monotonic_ns())
    }

    /// Whether `client` is in `kernel.deny` or banned (`/bans`, auto-ban, the fleet, the
    /// kernel's ban maps): the kernel program's first two decisions, made again by the worker
    /// for every client it takes. The program drops these sources' packets before the stack,
    /// but not on an interface it is not attached to, not with the kernel program off, and not
    /// in a packet it cannot read to its TCP header; and behind a balancer it sees only the
    /// balancer.
    pub fn source_refusal(&self, snapshot: &Snapshot, client: IpAddr) -> Option<SourceRefusal> {
        let ip = client.to_canonical();
        if snapshot
            .config
            .kernel
            .deny
            .iter()
            .any(|net| net.contains(&ip))
        {
            return Some(SourceRefusal::Denied);
        }
        let bans = self.bans.load();
        (!bans.is_empty() && bans.is_banned(ip, crate::kernel::monotonic_ns()))
            .then_some(SourceRefusal::Banned)
    }

    pub fn set_at_cap(&self, tenant: u32, v: bool) {
        self.at_cap[tenant as usize].store(v, Ordering::Relaxed);
    }

    /// Counts a new connection of `tenant` (as `snapshot` classifies its client) on `worker` if
    /// the tenant's connection cap (`max_connections`) leaves room: false, nothing counted,
    /// when the control thread's flag is up or when, once counted, the workers' connections of
    /// the tenant are more than this host may hold
    /// ([`crate::policy::limits::State::conn_cap`]). The flag alone is polled (`cap_poll_ms`):
    /// a burst between two polls passed it whole. Counting before summing means two workers
    /// taking the last place at once may both give it up, never both take it.
    pub fn enter_conn(&self, snapshot: &Snapshot, worker: usize, tenant: u32) -> bool {
        let cap = snapshot
            .config
            .tenant(tenant)
            .and_then(|t| t.max_connections);
        self.enter_conn_capped(worker, tenant, cap)
    }

    /// Counts a connection of `client`, of `tenant`, against the tenant's
    /// `max_connections_per_source`: whether it was counted (not with no such cap), to
    /// [`SourceConns::leave`] once it closes.
    pub fn enter_source(
        &self,
        snapshot: &Snapshot,
        tenant: u32,
        client: IpAddr,
    ) -> Result<bool, SourceAtCap> {
        let cap = snapshot
            .config
            .tenant(tenant)
            .and_then(|t| t.max_connections_per_source);
        match cap {
            None => Ok(false),
            Some(cap) if self.source_conns.enter(client, cap) => Ok(true),
            Some(_) => Err(SourceAtCap),
        }
    }

    fn enter_conn_capped(&self, worker: usize, tenant: u32, cap: Option<u64>) -> bool {
        if self.at_cap(tenant) {
            return false;
        }
        self.conns.opened(worker, tenant);
        if let Some(cap) = cap
            && self.conns.total(tenant) > self.limits.conn_cap(tenant, cap)
        {
            self.conns.closed(worker, tenant);
            return false;
        }
        true
    }

    /// A worker's loop took a turn now ([`Shared::workers_stalled`]).
    pub fn worker_beat(&self, worker: usize) {
        let ms = u64::try_from(self.beat_epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(b) = self.worker_beats.get(worker) {
            b.store(ms.max(1), Ordering::Relaxed);
        }
    }

    /// The workers serving whose loop has not turned for `max` (each turns once a second at
    /// least when it is free to): a task that never yields stops every connection of its
    /// worker, and a worker stuck so is not ready, as one down is not.
    pub fn workers_stalled(&self, max: std::time::Duration) -> Vec<usize> {
        let now = u64::try_from(self.beat_epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        self.worker_beats
            .iter()
            .zip(self.workers_up.iter())
            .enumerate()
            .filter(|(_, (beat, up))| {
                let beat = beat.load(Ordering::Relaxed);
                up.load(Ordering::Relaxed) && beat > 0 && now.saturating_sub(beat) > max
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The workers that are not serving now.
    pub fn workers_down(&self) -> Vec<usize> {
        self.workers_up
            .iter()
            .enumerate()
            .filter(|(_, up)| !up.load(Ordering::Relaxed))
            .map(|(i, _)| i)
            .collect()
    }
}

/// The fleet agent's counters ([`crate::fleet`] writes them; `/metrics` and the control
/// thread, which divides rates by the hosts, read them).
#[derive(Debug, Default)]
pub struct FleetStats {
    pub enabled: AtomicBool,
    pub connected: AtomicBool,
    pub hosts: AtomicU64,
    pub rounds: AtomicU64,
    pub round_us_total: AtomicU64,
    pub failures: AtomicU64,
    /// In thousandths of a token.
    pub tokens_granted: AtomicU64,
    pub leases: AtomicU64,
    pub bans_received: AtomicU64,
    pub bans_sent: AtomicU64,
    pub approvals_received: AtomicU64,
    /// Values found in Redis that this host ignored: not sealed with the fleet's secret (or
    /// sealed when this host has none), not readable, older than one seen, or keys of the
    /// wrong type.
    pub unsealed_ignored: AtomicU64,
    /// Times Redis was found to have lost the fleet's state and was re-seeded from here.
    pub reseeds: AtomicU64,
    /// What this gateway agreed with the fleet for the session key (see
    /// [`crate::fleet::Start::agreed`]).
    pub session_agreed: std::sync::OnceLock<String>,
    /// Times Redis was found holding another session key (or salt) than this gateway's.
    pub session_conflicts: AtomicU64,
    /// The agent runs no round (a handover closed the state store: what this process counts
    /// from then on goes to the new process, whose agent publishes it; the old agent would
    /// publish it too, and merge the others' spend into the counts the new process is sent:
    /// a review).
    pub paused: AtomicBool,
    /// Sessions ended here sent to the fleet, and ended elsewhere taken here.
    pub sessions_ended_sent: AtomicU64,
    pub sessions_ended_received: AtomicU64,
    /// Concurrency caps shared with the fleet, and the requests in flight on the other
    /// gateways under them (summed over the caps).
    pub caps: AtomicU64,
    pub in_flight_others: AtomicU64,
}

/// The audit log `config`'s `[audit]` asks for, its writer thread started; an error names it.
pub fn open_audit(config: &Config) -> Result<crate::policy::audit::AuditLog, String> {
    let a = &config.audit;
    open_log(a.path.as_deref(), "audit", a.anonymous_refusals_per_second)
}

/// The access log `config`'s `[telemetry.access_log]` asks for, as [`open_audit`].
pub fn open_access(config: &Config) -> Result<crate::policy::audit::AccessLog, String> {
    let (path, anonymous) = access_log_opened(config).unzip();
    open_log(path, "access", anonymous.unwrap_or_default())
}

/// A log at `path` (off without one) written by a thread named `name`, bounding anonymous
/// refusals to `anonymous` lines a second.
fn open_log<T: serde::Serialize + Send + 'static>(
    path: Option<&str>,
    name: &str,
    anonymous: u32,
) -> Result<crate::policy::audit::AuditLog<T>, String> {
    match path {
        None => Ok(crate::policy::audit::AuditLog::off()),
        Some(p) => crate::policy::audit::AuditLog::start(std::path::Path::new(p), name, anonymous)
            .map_err(|e| format!("the {name} log `{p}` cannot be opened: {e}")),
    }
}

/// What of `[telemetry.access_log]` its writer is started with (the fields of a line are read
/// from the running configuration).
pub fn access_log_opened(config: &crate::config::Config) -> Option<(&str, u32)> {
    config
        .telemetry
        .access_log
        .as_ref()
        .map(|a| (a.path.as_str(), a.anonymous_refusals_per_second))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state of a gateway of `workers` workers and one tenant `d` (id 1) with `tenant`
    /// more of its settings.
    fn shared_of(workers: usize, tenant: &str) -> Shared {
        let text = format!(
            r#"[gateway]
instance = "t"
workers = {workers}
[[listeners]]
address = "127.0.0.1:1"
[admin]
address = "127.0.0.1:2"
[kernel]
enabled = false
default_tenant = "d"
[[tenants]]
name = "d"
id = 1
{tenant}
"#
        );
        Shared::new(Config::from_toml(&text).unwrap())
    }

    #[test]
    fn a_source_holds_its_cap_and_an_ipv6_source_is_its_64() {
        let t = SourceConns::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(t.enter(ip("192.0.2.1"), 2));
        assert!(t.enter(ip("::ffff:192.0.2.1"), 2), "the same source");
        assert!(!t.enter(ip("192.0.2.1"), 2), "a third over a cap of 2");
        assert!(t.enter(ip("192.0.2.2"), 2), "another source");
        t.leave(ip("192.0.2.1"));
        assert!(t.enter(ip("192.0.2.1"), 2), "a place given back");
        // One host's /64 is one source; another /64, and each link-local address, are not.
        assert!(t.enter(ip("2001:db8:1:2::1"), 1));
        assert!(!t.enter(ip("2001:db8:1:2:ffff::9"), 1));
        assert!(t.enter(ip("2001:db8:1:3::1"), 1));
        assert!(t.enter(ip("fe80::1"), 1));
        assert!(t.enter(ip("fe80::2"), 1));
        // Entries go with their last connection.
        let u = SourceConns::default();
        assert!(u.enter(ip("198.51.100.7"), 5) && u.enter(ip("198.51.100.7"), 5));
        u.leave(ip("198.51.100.7"));
        assert_eq!(u.len(), 1);
        u.leave(ip("198.51.100.7"));
        assert!(u.is_empty());
    }

    #[test]
    fn a_resume_takes_over_only_its_own_sessions_stream_that_gave_its_event() {
        let drains = Drains::default();
        let ids = vec![b"7_1".to_vec(), b"7_2".to_vec()];
        let entry = drains.enter("up", b"signed-session", ids, None);
        assert!(drains.take_over("up", b"other-session", b"7_2").is_none());
        assert!(
            drains
                .take_over("other", b"signed-session", b"7_2")
                .is_none()
        );
        assert!(
            drains.take_over("up", b"signed-session", b"7_3").is_none(),
            "not given"
        );
        assert!(!entry.drain.resumed());
        let drain = drains
            .take_over("up", b"signed-session", b"7_1")
            .expect("its stream");
        assert!(entry.drain.resumed() && !drain.handed());
        assert!(
            drains.take_over("up", b"signed-session", b"7_2").is_none(),
            "taken over once"
        );
        entry.drain.hand_over();
        assert!(drain.handed() && !entry.drain.answered());
        Resumed(drain).finished();
        assert!(entry.drain.answered());
        drop(entry);
        assert!(drains.is_empty());
        // A resume whose client left before its stream ended does not end the drain's hold.
        let entry = drains.enter("up", b"s", vec![b"2".to_vec()], None);
        let drain = drains.take_over("up", b"s", b"2").unwrap();
        entry.drain.hand_over();
        drop(Resumed(drain));
        assert!(!entry.drain.answered() && !entry.drain.resumed());
        drop(entry);
        // A drain that ends by itself lets a resume waiting on it go on.
        let entry = drains.enter("up", b"s", vec![b"1".to_vec()], None);
        let drain = drains.take_over("up", b"s", b"1").unwrap();
        assert!(!drain.handed());
        drop(entry);
        assert!(drain.handed() && drains.is_empty());
    }

    #[test]
    fn a_ban_holds_every_address_of_its_prefix_and_only_while_in_force() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        let mut bans: Vec<(ipnet::IpNet, u64)> = (0..10_000u32)
            .map(|i| (net(&format!("10.{}.{}.0/24", i >> 8, i & 255)), 100))
            .collect();
        bans.extend([
            (net("203.0.113.7/32"), 100),
            (net("198.51.100.0/25"), 100),
            // A longer prefix whose ban ended inside a shorter one in force.
            (net("192.0.2.0/28"), 10),
            (net("192.0.2.0/24"), 100),
            (net("2001:db8:5::/48"), 100),
            (net("0.0.0.0/0"), 20),
        ]);
        let set = BanSet::new(bans);
        assert_eq!(set.len(), 10_006);
        assert!(set.is_banned(ip("10.39.15.200"), 50), "one of 10,000 /24s");
        assert!(
            !set.is_banned(ip("10.39.16.1"), 50),
            "past the 10,000th /24"
        );
        assert!(
            set.is_banned(ip("::ffff:203.0.113.7"), 50),
            "a mapped address"
        );
        assert!(!set.is_banned(ip("203.0.113.8"), 50));
        assert!(set.is_banned(ip("198.51.100.127"), 50));
        assert!(!set.is_banned(ip("198.51.100.128"), 50), "past the /25");
        assert!(
            set.is_banned(ip("192.0.2.3"), 50),
            "the /24 holds after the /28 ended"
        );
        assert!(!set.is_banned(ip("192.0.2.3"), 100), "both ended");
        assert!(set.is_banned(ip("2001:db8:5:ffff::1"), 50));
        assert!(!set.is_banned(ip("2001:db8:6::1"), 50));
        assert!(
            set.is_banned(ip("8.8.8.8"), 15),
            "every IPv4 address, while in force"
        );
        assert!(!set.is_banned(ip("8.8.8.8"), 25));
        assert!(!set.is_banned(ip("2001:db8:6::1"), 15), "not IPv6 ones");
        assert_eq!(set.until_of(&net("192.0.2.0/28")), Some(10));
        assert_eq!(set.until_of(&net("10.0.7.0/24")), Some(100));
        assert_eq!(set.until_of(&net("10.0.7.0/23")), None);
        assert_eq!(set.until_of(&net("203.0.113.7/32")), Some(100));
    }

    #[test]
    fn classifier_prefers_longest_prefix_and_maps_v4_in_v6() {
        let text = r#"
[gateway]
instance = "t"
[[listeners]]
address = "127.0.0.1:1"
[admin]
address = "127.0.0.1:2"
[kernel]
enabled = false
default_tenant = "d"
[[tenants]]
name = "d"
id = 9
[[tenants]]
name = "wide"
id = 1
sources = ["10.0.0.0/8"]
[[tenants]]
name = "narrow"
id = 2
sources = ["10.1.0.0/16", "2001:db8::/32"]
"#;
        let c = Classifier::new(&Config::from_toml(text).unwrap());
        assert_eq!(c.tenant_of("10.1.2.3".parse().unwrap()), 2);
        assert_eq!(c.tenant_of("10.2.2.3".parse().unwrap()), 1);
        assert_eq!(c.tenant_of("::ffff:10.1.2.3".parse().unwrap()), 2);
        assert_eq!(c.tenant_of("2001:db8::1".parse().unwrap()), 2);
        assert_eq!(c.tenant_of("192.0.2.1".parse().unwrap()), 9);
    }

    #[test]
    fn conn_table_sums_workers() {
        let t = ConnTable::new(3);
        t.opened(0, 5);
        t.opened(2, 5);
        t.opened(2, 5);
        t.closed(2, 5);
        assert_eq!(t.total(5), 2);
        assert_eq!(t.total(4), 0);
    }

    /// Four workers take and give back the one place of a tenant capped at 1, all at once: never
    /// two hold it, and nothing stays counted.
    /// (With the polled flag alone, every one of a burst between two polls was taken.)
    #[test]
    fn the_connection_cap_holds_when_workers_race_for_the_last_place() {
        let shared = shared_of(4, "max_connections = 1");
        let (holding, most, admitted) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for worker in 0..4 {
                let (shared, holding, most, admitted) = (&shared, &holding, &most, &admitted);
                s.spawn(move || {
                    for _ in 0..20_000 {
                        if shared.enter_conn_capped(worker, 1, Some(1)) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::Relaxed);
                            for _ in 0..50 {
                                std::hint::spin_loop();
                            }
                            holding.fetch_sub(1, Ordering::SeqCst);
                            drop(shared.conns.counted(worker, 1));
                        }
                    }
                });
            }
        });
        assert_eq!(
            most.load(Ordering::Relaxed),
            1,
            "more than the cap held at once"
        );
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(shared.conns.total(1), 0);
        // The flag still refuses at once, and a tenant without a cap is never refused here.
        shared.set_at_cap(1, true);
        assert!(!shared.enter_conn_capped(0, 1, Some(1)));
        assert!(shared.enter_conn_capped(0, 2, None));
    }

    /// The workers' new-connection buckets count sources as the kernel program does and give
    /// one token of slack over it.
    #[test]
    fn new_connections_are_held_per_source_then_per_tenant() {
        let n = NewConns::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (si, st) = gateway_common::TenantLimits::gcra(1, 1);
        let source_only = gateway_common::TenantLimits {
            source_interval_ns: si,
            source_tolerance_ns: st,
            ..Default::default()
        };
        let t0 = 10_000_000_000;
        // Burst 1, and one more.
        assert!(n.admit(1, ip("198.18.0.1"), &source_only, t0).is_ok());
        assert!(n.admit(1, ip("198.18.0.1"), &source_only, t0).is_ok());
        assert_eq!(
            n.admit(1, ip("198.18.0.1"), &source_only, t0),
            Err(RateRefusal::Source)
        );
        assert!(
            n.admit(1, ip("::ffff:198.18.0.2"), &source_only, t0)
                .is_ok()
        );
        // A second later, one more.
        assert!(n.admit(1, ip("198.18.0.1"), &source_only, t0 + si).is_ok());
        // An IPv6 source is its /64; a link-local one is itself.
        for host in ["2001:db8::1", "2001:db8::2"] {
            assert!(n.admit(1, ip(host), &source_only, t0).is_ok(), "{host}");
        }
        assert!(n.admit(1, ip("2001:db8::ffff"), &source_only, t0).is_err());
        assert!(n.admit(1, ip("2001:db8:0:1::1"), &source_only, t0).is_ok());
        for _ in 0..2 {
            assert!(n.admit(1, ip("fe80::1"), &source_only, t0).is_ok());
        }
        assert!(n.admit(1, ip("fe80::2"), &source_only, t0).is_ok());
        // The same source in another tenant is another bucket.
        assert!(n.admit(2, ip("198.18.0.1"), &source_only, t0).is_ok());

        // Source and tenant: a source over its own limit spends none of its tenant's.
        let (ci, ct) = gateway_common::TenantLimits::gcra(1, 2);
        let both = gateway_common::TenantLimits {
            conn_interval_ns: ci,
            conn_tolerance_ns: ct,
            ..source_only
        };
        let n = NewConns::default();
        for _ in 0..2 {
            assert!(n.admit(3, ip("198.18.1.1"), &both, t0).is_ok());
        }
        for _ in 0..5 {
            assert_eq!(
                n.admit(3, ip("198.18.1.1"), &both, t0),
                Err(RateRefusal::Source)
            );
        }
        assert!(n.admit(3, ip("198.18.1.2"), &both, t0).is_ok());
        assert_eq!(
            n.admit(3, ip("198.18.1.3"), &both, t0),
            Err(RateRefusal::Tenant)
        );
    }

    /// Found by a review of the first version: a table of slots shared by every tenant's
    /// sources let one tenant's slow limits (a TAT far ahead) refuse another's sources, and
    /// rates raised by a reload left a source owing what the old ones had charged.
    #[test]
    fn new_connection_buckets_are_nobody_elses_and_follow_changed_rates() {
        let n = NewConns::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let limits = |rate, burst| {
            let (si, st) = gateway_common::TenantLimits::gcra(rate, burst);
            gateway_common::TenantLimits {
                source_interval_ns: si,
                source_tolerance_ns: st,
                ..Default::default()
            }
        };
        let t0 = 10_000_000_000;
        // Tenant 1 at 1/s: 100 sources spend everything they have.
        for i in 0..100 {
            let src = ip(&format!("198.18.2.{i}"));
            while n.admit(1, src, &limits(1, 1), t0).is_ok() {}
        }
        // Tenant 2's sources at 100/s are untouched by them.
        for i in 0..100 {
            let src = ip(&format!("198.18.3.{i}"));
            assert!(n.admit(2, src, &limits(100, 2), t0).is_ok(), "{src}");
        }
        // A source that spent 1/s with a burst of 50, under 100/s: empty (one interval from its
        // first look under the new rate), not 50 s in debt.
        let src = ip("198.18.4.1");
        while n.admit(1, src, &limits(1, 50), t0).is_ok() {}
        let now = t0 + 10_000_000;
        assert!(n.admit(1, src, &limits(100, 1), now).is_err());
        assert!(n.admit(1, src, &limits(100, 1), now + 10_000_000).is_ok());
        // Idle buckets are forgotten; busy ones kept.
        assert!(n.sources() >= 201);
        n.forget_idle(t0 + 60_000_000_000);
        assert_eq!(n.sources(), 0);
    }

    /// A serving worker whose loop has not turned for longer than the bound is stalled; one
    /// that turned lately, one down, and one not started yet are not.
    #[test]
    fn a_worker_whose_loop_stops_turning_is_stalled() {
        let shared = shared_of(3, "");
        for up in shared.workers_up.iter() {
            up.store(true, Ordering::Relaxed);
        }
        shared.worker_beat(0);
        shared.worker_beat(1);
        // Wide: the unit tests run beside each other on a loaded host.
        let bound = std::time::Duration::from_secs(1);
        assert!(shared.workers_stalled(bound).is_empty());
        std::thread::sleep(std::time::Duration::from_millis(1_200));
        shared.worker_beat(0);
        assert_eq!(shared.workers_stalled(bound), vec![1]);
        shared.workers_up[1].store(false, Ordering::Relaxed);
        assert!(
            shared.workers_stalled(bound).is_empty(),
            "down, not stalled"
        );
    }
}
