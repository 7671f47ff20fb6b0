//! Replicas of one upstream: its endpoints (every address of every configured `url` or
//! `endpoints` entry), which of them are in rotation, and which endpoint holds each upstream
//! session. Workers pick an endpoint per request without a lock (atomics, an `ArcSwap` list and
//! a lock-free map); the control thread only rebuilds the list when a re-resolution changes the
//! addresses. Nothing here ever waits.
//!
//! Balancing: power of two choices on the worker's own count of requests in flight to each
//! endpoint. Ejection: `eject_after_failures` consecutive failures (connect refused or timed
//! out; a reset, a timeout or a 502–504 only where
//! `says_of_replica` (`mcp/upstream/requests.rs`)) take an endpoint out of
//! rotation for `eject_base_ms`,
//! doubled on each repeat up to `eject_max_ms`; once that time has passed, one real request
//! (across all workers) is let through as a half-open trial: a success puts the endpoint back,
//! a failure ejects it again for longer. The last endpoint in rotation is never ejected (a flood
//! of failures leaves one serving); should all be out at once (a race), the one that failed
//! least recently is used.
//!
//! Stickiness: an `Mcp-Session-Id` an endpoint's answer carries is handed on [`sign`]ed with a
//! keyed tag of that endpoint ([`Replicas::sign_session`]); every later request carrying it goes
//! there, with the endpoint's own id ([`Replicas::open_session`]). No table: any worker, the new
//! process after an upgrade and another gateway of the fleet (one key) read the endpoint from
//! the id, and replicas that count their sessions from 1 never have their ids confused. When
//! that endpoint is ejected or gone, or the id was not signed here, the request is not sent to
//! a replica that does not know the session: the caller answers 404 (the protocol's "initialize
//! again").
//!
//! [`sign`]: crate::session::sign

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

use super::Addresses;
use crate::session::{self, ENDPOINT_TAG};

/// Ejection settings of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// Consecutive failures that eject an endpoint; 0: never.
    pub after_failures: u32,
    pub base: Duration,
    pub max: Duration,
}

/// Milliseconds since the process's first use of this clock (one clock for every upstream, so
/// that states carried over a reload keep their meaning).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    ms(crate::clock::coarse().saturating_duration_since(epoch)).saturating_add(1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One endpoint (address) of an upstream and its health, shared by every worker.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Failures since the last success.
    failures: AtomicU32,
    /// 0: in rotation; else out of it until then (ms of [`now_ms`]).
    ejected_until: AtomicU64,
    /// A half-open trial was let through and has not reported yet.
    on_trial: AtomicBool,
    /// Ejections in a row (the next lasts `base * 2^streak`, at most `max`).
    streak: AtomicU32,
    last_failure: AtomicU64,
    /// When it last came back into rotation (ms), to forget an old streak.
    back_at: AtomicU64,
    /// Ejections so far (a counter in `/metrics`).
    pub ejections: AtomicU64,
    /// Its name in session ids ([`session::endpoint_tag`]), made on first use (the key is the
    /// process's for its whole life).
    tag: OnceLock<[u8; ENDPOINT_TAG]>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            on_trial: AtomicBool::new(false),
            streak: AtomicU32::new(0),
            last_failure: AtomicU64::new(0),
            back_at: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            tag: OnceLock::new(),
        }
    }

    fn tag(&self, key: &[u8; 32]) -> [u8; ENDPOINT_TAG] {
        *self
            .tag
            .get_or_init(|| session::endpoint_tag(key, self.addr))
    }

    /// Whether it is out of rotation (also while a trial runs).
    pub fn ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// Claims the half-open trial once the ejection has run out: exactly one caller wins it,
    /// and another trial can be claimed only after `window` (a trial that never reports).
    fn claim_trial(&self, now: u64, window: Duration) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 || now < until {
            return false;
        }
        let won = self
            .ejected_until
            .compare_exchange(
                until,
                now.saturating_add(ms(window)),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok();
        if won {
            self.on_trial.store(true, Ordering::Release);
        }
        won
    }

    /// An answer that is not a 5xx: a passed trial puts the endpoint back into rotation.
    pub fn succeeded(&self, now: u64) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.on_trial.swap(false, Ordering::AcqRel) {
            self.ejected_until.store(0, Ordering::Release);
            self.back_at.store(now, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// A failure; returns whether it ejected the endpoint (now or again after a failed trial).
    /// Without `others_serve` (no other endpoint in rotation) a failure is counted but does not
    /// eject: the last endpoint in rotation stays.
    pub fn failed(&self, now: u64, e: &Ejection, others_serve: bool) -> bool {
        self.last_failure.store(now, Ordering::Relaxed);
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if e.after_failures == 0 {
            return false;
        }
        if self.on_trial.swap(false, Ordering::AcqRel) {
            let streak = self.streak.fetch_add(1, Ordering::AcqRel).saturating_add(1);
            self.ejected_until
                .store(now.saturating_add(backoff(e, streak)), Ordering::Release);
            self.ejections.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if n < e.after_failures || !others_serve {
            return false;
        }
        // Back in rotation long enough: an old streak is forgotten.
        if now.saturating_sub(self.back_at.load(Ordering::Relaxed)) > ms(e.max) {
            self.streak.store(0, Ordering::Relaxed);
        }
        let streak = self.streak.load(Ordering::Acquire).saturating_add(1);
        let until = now.saturating_add(backoff(e, streak));
        if self
            .ejected_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.streak.store(streak, Ordering::Release);
            self.ejections.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// How long the `streak`-th ejection in a row lasts (ms).
fn backoff(e: &Ejection, streak: u32) -> u64 {
    let base = ms(e.base).max(1);
    let factor = 1u64 << streak.saturating_sub(1).min(20);
    base.saturating_mul(factor).min(ms(e.max).max(base))
}

/// The endpoints in the order of a list, and which to use for one request.
pub struct Choice<'a> {
    pub endpoints: &'a [Arc<Endpoint>],
    /// Endpoints this request already failed to connect to.
    pub avoid: &'a [SocketAddr],
}

impl Choice<'_> {
    /// The endpoint for a request: a due half-open trial first, else the less loaded of two
    /// random endpoints in rotation, else (all ejected) the one that failed least recently.
    /// `None` only when every endpoint is to be avoided.
    pub fn pick(
        &self,
        now: u64,
        e: &Ejection,
        random: &mut dyn FnMut() -> u64,
        in_flight: &dyn Fn(SocketAddr) -> usize,
    ) -> Option<Arc<Endpoint>> {
        let usable = |ep: &&Arc<Endpoint>| !self.avoid.contains(&ep.addr);
        if let [only] = self.endpoints {
            return usable(&only).then(|| Arc::clone(only));
        }
        if let Some(ep) = self
            .endpoints
            .iter()
            .filter(usable)
            .find(|ep| ep.claim_trial(now, e.base))
        {
            return Some(Arc::clone(ep));
        }
        // One look at the health (another worker may eject one meanwhile).
        let healthy: Vec<&Arc<Endpoint>> = self
            .endpoints
            .iter()
            .filter(usable)
            .filter(|ep| !ep.ejected())
            .collect();
        match healthy[..] {
            [] => self
                .endpoints
                .iter()
                .filter(usable)
                .min_by_key(|ep| ep.last_failure.load(Ordering::Relaxed))
                .map(Arc::clone),
            [one] => Some(Arc::clone(one)),
            _ => {
                let k64 = healthy.len() as u64;
                let i = (random() % k64) as usize;
                let mut j = (random() % (k64 - 1)) as usize;
                if j >= i {
                    j += 1;
                }
                let (a, b) = (healthy[i], healthy[j]);
                Some(Arc::clone(if in_flight(b.addr) < in_flight(a.addr) {
                    b
                } else {
                    a
                }))
            }
        }
    }
}

/// Where one request goes, as far as its session decides.
pub enum Sticky {
    /// No session, or one this upstream can only have on its single endpoint.
    Any,
    /// To this endpoint, with the endpoint's own session id.
    Pinned(Arc<Endpoint>, Vec<u8>),
    /// Its endpoint is ejected or gone, or the id was not signed here: 404.
    Lost,
}

/// The endpoints of one upstream. Part of the configuration; its state (health, sessions) is
/// carried over a reload by [`Replicas::carry_over`].
pub struct Replicas {
    /// One per `url` or `endpoints` entry, each resolved in the background.
    pub sources: Vec<Arc<Addresses>>,
    /// A single address literal: nothing to balance, no session to pin.
    fixed: bool,
    pub ejection: Ejection,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("sources", &self.sources)
            .field("ejection", &self.ejection)
            .finish_non_exhaustive()
    }
}

/// Two loads of the same settings are the same configuration, whatever the names resolve to.
impl PartialEq for Replicas {
    fn eq(&self, other: &Self) -> bool {
        self.sources == other.sources && self.ejection == other.ejection
    }
}

impl Replicas {
    pub fn new(sources: Vec<Addresses>, ejection: Ejection) -> Self {
        let sources: Vec<Arc<Addresses>> = sources.into_iter().map(Arc::new).collect();
        let fixed = matches!(&sources[..], [one] if one.is_literal());
        let r = Self {
            sources,
            fixed,
            ejection,
            endpoints: ArcSwap::from_pointee(Vec::new()),
        };
        r.refresh();
        r
    }

    /// Rebuilds the endpoint list from the sources' current addresses, keeping the state of
    /// endpoints that stay (control thread, after a resolution).
    pub fn refresh(&self) {
        let old = self.endpoints.load_full();
        let mut next: Vec<Arc<Endpoint>> = Vec::new();
        for s in &self.sources {
            for addr in s.all().iter() {
                if next.iter().any(|e| e.addr == *addr) {
                    continue;
                }
                next.push(match old.iter().find(|e| e.addr == *addr) {
                    Some(e) => Arc::clone(e),
                    None => Arc::new(Endpoint::new(*addr)),
                });
            }
        }
        if next.len() != old.len() || next.iter().zip(old.iter()).any(|(a, b)| a.addr != b.addr) {
            self.endpoints.store(Arc::new(next));
        }
    }

    /// Takes over the health of the same upstream in the configuration a reload replaces
    /// (before the new one is published).
    pub fn carry_over(&self, old: &Self) {
        let old = old.endpoints.load_full();
        let mine: Vec<Arc<Endpoint>> = self
            .endpoints
            .load()
            .iter()
            .map(|e| match old.iter().find(|o| o.addr == e.addr) {
                Some(o) => Arc::clone(o),
                None => Arc::clone(e),
            })
            .collect();
        self.endpoints.store(Arc::new(mine));
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// The first address (an upstream with one endpoint has only that).
    pub fn first(&self) -> SocketAddr {
        self.endpoints
            .load()
            .first()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |e| e.addr)
    }

    /// Whether `addr` is still one of the endpoints.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.endpoints.load().iter().any(|e| e.addr == addr)
    }

    /// Whether sessions are pinned to endpoints (all but a single address literal).
    pub fn pins_sessions(&self) -> bool {
        !self.fixed
    }

    /// What the gateway hands on for the session `id` minted by `endpoint` of upstream `name`.
    pub fn sign_session(
        &self,
        key: &[u8; 32],
        name: &str,
        endpoint: &Endpoint,
        id: &[u8],
    ) -> Vec<u8> {
        session::sign(key, &[b"replica", name.as_bytes()], &endpoint.tag(key), id)
    }

    /// Where a request carrying the session `id` (as [`Replicas::sign_session`] made it) goes.
    pub fn open_session(&self, key: &[u8; 32], name: &str, id: Option<&[u8]>) -> Sticky {
        let Some(id) = id.filter(|_| !self.fixed) else {
            return Sticky::Any;
        };
        let Some((own, tag)) =
            session::verify::<ENDPOINT_TAG>(key, &[b"replica", name.as_bytes()], id)
        else {
            return Sticky::Lost;
        };
        let endpoints = self.endpoints.load();
        match endpoints.iter().find(|e| e.tag(key) == tag) {
            Some(e) if !e.ejected() || endpoints.len() == 1 => {
                Sticky::Pinned(Arc::clone(e), own.to_vec())
            }
            _ => Sticky::Lost,
        }
    }
}

#[cfg(test)]
#[path = "replicas_tests.rs"]
mod tests;
