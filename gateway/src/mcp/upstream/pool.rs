//! A worker's idle upstream connections, kept for reuse. Never shared between workers.
//!
//! Connections are pooled per upstream endpoint (its [`Upstream::key`]: name, URL and TLS
//! settings, and the endpoint's address) and per tenant: two upstreams on one address with
//! different names or certificates never share a connection, and neither do two tenants. An
//! upstream that writes past an answer (a stray the gateway cannot tell from the next answer:
//! one after an event stream or a chunked answer, or carrying the next request's id) misleads
//! the next exchange on that connection only, which is then the same tenant's. Connections to
//! an address the upstream no longer has (a re-resolution) are not kept. The count of
//! connections in use per endpoint (every tenant's) is also the balancer's measure of load on
//! this worker.
//!
//! The pool is sized to the concurrency it serves: it keeps as many idle connections to an
//! endpoint as were in use at once lately (the peak over the last [`PEAK_WINDOW`] or two), or
//! `max_idle_connections_per_worker` if that is more (0 still turns pooling off), every
//! tenant's together (kept per tenant, 40 tenants' calls kept ten times as many, a review
//! found): past that, the tenant holding the most gives up its least recently used first
//! ([`Idle::trim`]). A fixed cap below the concurrency closes
//! connections that are wanted again a moment later: at 256 client connections and a cap of 32,
//! ~10,600 new upstream connections a second, which doubled the CPU per request. Past its
//! peak, a pool gives back the least recently used first; once a second it closes what an
//! upstream closed ([`Pool::sweep`]).

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use super::Conn;
use crate::endpoints::Stats;
use crate::{config::Upstream, http::Io};

/// Idle entries of an upstream unused this long are dropped when another upstream's entry is
/// made (left behind by a reload that changed the upstream's settings).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// How long a peak of connections in use is remembered (between one and two windows).
const PEAK_WINDOW: Duration = Duration::from_secs(10);

struct Idle {
    /// The most recently used on top, each with the tenant whose requests it carries and when
    /// it was put back.
    conns: Vec<(u64, Instant, Io)>,
    used: Instant,
    /// The upstream's `max_idle`, as of the last check-in.
    max_idle: usize,
    /// The upstream's `idle_reuse`, as of the last check-in.
    idle_reuse: Duration,
}

impl Idle {
    /// Keeps `keep` connections at most: the least recently used of the tenant that holds the
    /// most go first (so that one tenant's burst does not take the one connection another
    /// calls on in turn: a review saw each of its calls make a new one).
    fn trim(&mut self, keep: usize) {
        let excess = self.conns.len().saturating_sub(keep);
        if excess == 0 {
            return;
        }
        let mut held: HashMap<u64, usize> = HashMap::default();
        for (tenant, _, _) in &self.conns {
            *held.entry(*tenant).or_default() += 1;
        }
        if held.len() == 1 {
            self.conns.drain(..excess);
            return;
        }
        for _ in 0..excess {
            let Some((&most, _)) = held.iter().max_by_key(|(_, n)| **n) else {
                return;
            };
            if let Some(i) = self.conns.iter().position(|(t, _, _)| *t == most) {
                self.conns.remove(i);
            }
            if let Some(n) = held.get_mut(&most) {
                *n -= 1;
            }
        }
    }
}

/// How many connections to one upstream are in use (leased to a request) now, and the most
/// that were at once in this window and the one before.
#[derive(Default)]
struct InUse {
    now: Cell<usize>,
    peak: Cell<usize>,
    previous_peak: Cell<usize>,
    window_start: Cell<Option<Instant>>,
}

impl InUse {
    /// The most in use at once in this window and the one before, as of `now`: windows that
    /// passed with no lease count as empty (the sweep reads this on a pool no request uses, and
    /// a peak kept its connections until the next request came).
    fn recent_peak(&self, now: Instant) -> usize {
        let Some(start) = self.window_start.get() else {
            return self.now.get();
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < PEAK_WINDOW {
            self.peak.get().max(self.previous_peak.get())
        } else if elapsed < 2 * PEAK_WINDOW {
            self.peak.get().max(self.now.get())
        } else {
            self.now.get()
        }
    }
}

/// A connection's place in its upstream's count of connections in use; given back on drop.
pub(crate) struct Lease(Rc<InUse>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.now.set(self.0.now.get().saturating_sub(1));
    }
}

/// An upstream's endpoint: its pool key and the address.
type Key = (u64, SocketAddr);

/// Hashed with Fx, not SipHash: the keys are the gateway's own (upstream ids and addresses from
/// its configuration), looked up three times a request.
type HashMap<K, V> = rustc_hash::FxHashMap<K, V>;

pub struct Pool {
    idle: RefCell<HashMap<Key, Idle>>,
    in_use: RefCell<HashMap<Key, Rc<InUse>>>,
    /// The balancer's random choices (xorshift; not for secrets).
    random: Cell<u64>,
    /// Counters shared with the other workers and the control thread.
    pub(super) stats: Arc<Stats>,
    /// The key that signs the session ids replicas mint with their endpoint.
    pub(super) session_key: [u8; 32],
    /// The worker's budget for the answers it reads whole ([`super::call`]).
    pub(super) whole: crate::http::budget::Budget,
}

impl Pool {
    pub fn new(stats: Arc<Stats>, session_key: [u8; 32]) -> Self {
        Self {
            idle: RefCell::default(),
            in_use: RefCell::default(),
            random: Cell::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
                    | 1,
            ),
            stats,
            session_key,
            whole: crate::http::budget::Budget::default(),
        }
    }

    /// A pseudo-random number for the balancer.
    pub(super) fn random(&self) -> u64 {
        let mut x = self.random.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.set(x);
        x
    }

    /// Requests of this worker in flight to `up` at `addr`.
    pub(super) fn in_flight(&self, up: &Upstream, addr: SocketAddr) -> usize {
        self.in_use
            .borrow()
            .get(&(up.key, addr))
            .map_or(0, |c| c.now.get())
    }

    /// Counts one more connection to `up` at `addr` in use until the lease is dropped.
    pub(crate) fn lease(&self, up: &Upstream, addr: SocketAddr) -> Lease {
        let counter = Rc::clone(self.in_use.borrow_mut().entry((up.key, addr)).or_default());
        let now = crate::clock::coarse();
        let c = &counter;
        match c.window_start.get() {
            Some(start) if now.duration_since(start) < PEAK_WINDOW => {}
            _ => {
                c.previous_peak.set(c.peak.get());
                c.peak.set(0);
                c.window_start.set(Some(now));
            }
        }
        c.now.set(c.now.get() + 1);
        c.peak.set(c.peak.get().max(c.now.get()));
        Lease(counter)
    }

    /// How many idle connections to `up` are kept: the recent peak in use, at least its
    /// configured `max_idle`; none when that is 0 (pooling turned off for this upstream).
    fn keep(&self, key: &Key, max_idle: usize, now: Instant) -> usize {
        if max_idle == 0 {
            return 0;
        }
        let peak = self
            .in_use
            .borrow()
            .get(key)
            .map_or(0, |c| c.recent_peak(now));
        max_idle.max(peak)
    }

    /// Closes the idle connections an upstream closed or wrote to since (a peer that closed
    /// leaves its socket open here until it is looked at), and those past what is kept now
    /// (the least recently used first: the peak they were kept for has passed). Called once a
    /// second by the worker: without it, a pool that grew at a peak kept its surplus for as
    /// long as traffic went on, each socket closed by the upstream still held here.
    pub fn sweep(&self) {
        let now = Instant::now();
        let coarse = crate::clock::coarse();
        let mut pool = self.idle.borrow_mut();
        for (key, idle) in pool.iter_mut() {
            let reuse = idle.idle_reuse;
            idle.conns.retain_mut(|(_, since, io)| {
                coarse.saturating_duration_since(*since) < reuse && io.idle_and_open()
            });
            idle.trim(self.keep(key, idle.max_idle, now));
        }
    }

    /// An idle connection to `up` at `addr`, if one is still open and silent. Each is checked
    /// first (a non-blocking peek): one the upstream closed (servers close idle keep-alive
    /// connections on their own schedule: uvicorn after 5 s, Node after 5 s) or sent anything
    /// on since its last answer is dropped. Bytes sent after an answer belong to no request:
    /// read as the next answer they would reach another client. (Over TLS, records that carry
    /// no data, such as a TLS 1.3 server's session tickets, are taken and do not count.)
    /// Nor is one idle for the upstream's `idle_reuse` or longer: a server closes an idle
    /// connection when it chooses, and a request written in the moment between the peek and
    /// that close is lost (a call is never sent twice, so its client gets a 502: 3 of 200 calls
    /// made 0.49–0.52 s apart to uvicorn closing after 0.5 s, an operator's review).
    pub(super) fn checkout(&self, up: &Upstream, addr: SocketAddr, tenant: u64) -> Option<Io> {
        let mut pool = self.idle.borrow_mut();
        let idle = pool.get_mut(&(up.key, addr))?;
        let now = crate::clock::coarse();
        // The tenant's most recently used (the top one, with one tenant).
        while let Some(i) = idle.conns.iter().rposition(|(t, _, _)| *t == tenant) {
            let (_, since, mut io) = idle.conns.remove(i);
            // The clock is coarse: a connection is taken as idle a tick longer than it was.
            if now.saturating_duration_since(since) < up.idle_reuse && io.idle_and_open() {
                return Some(io);
            }
        }
        None
    }

    /// Returns a connection whose exchange is complete to the pool; one with bytes read past
    /// its answer, with an abandoned read or write, or to an address the upstream no longer
    /// has, is closed instead.
    pub(crate) fn checkin(&self, up: &Upstream, conn: Conn) {
        let Conn {
            mut io,
            addr,
            tenant,
            ..
        } = conn;
        if !io.intact() || !up.replicas.contains(addr) {
            return;
        }
        let key = (up.key, addr);
        let now = crate::clock::coarse();
        let keep = self.keep(&key, up.max_idle, now);
        let mut pool = self.idle.borrow_mut();
        if !pool.contains_key(&key) {
            pool.retain(|_, idle| now.duration_since(idle.used) < FORGET_AFTER);
            let idle = &*pool;
            self.in_use
                .borrow_mut()
                .retain(|key, c| c.now.get() > 0 || idle.contains_key(key));
        }
        let idle = pool.entry(key).or_insert_with(|| Idle {
            conns: Vec::new(),
            used: now,
            max_idle: up.max_idle,
            idle_reuse: up.idle_reuse,
        });
        idle.used = now;
        idle.max_idle = up.max_idle;
        idle.idle_reuse = up.idle_reuse;
        // An idle connection holds no read buffer; the next exchange takes one.
        io.release_buffers();
        idle.conns.push((tenant, now, io));
        // Past the peak, the least recently used go (another tenant's, it may be: one tenant's
        // connections do not keep another's from being pooled).
        idle.trim(keep);
    }
}
