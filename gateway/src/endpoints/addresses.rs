//! An upstream's addresses: resolved when the configuration is loaded, then again every
//! `resolve_every_ms` by the control thread in the background
//! ([`crate::mcp::upstream::resolve`]); workers read the current ones without a lock for each
//! new connection. A resolution that fails, or finds nothing, keeps the last good addresses.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

/// The addresses of one upstream's host (one `url` or `endpoints` entry). Every address is an
/// endpoint of the upstream's [`super::Replicas`].
pub struct Addresses {
    host: String,
    literal: bool,
    port: u16,
    /// Zero: never again (an address literal, or `resolve_every_ms = 0`).
    every: Duration,
    current: ArcSwap<Vec<SocketAddr>>,
    /// Control thread only: a resolution is running, and when the next is due (ms after `born`).
    in_flight: AtomicBool,
    next_due_ms: AtomicU64,
    born: Instant,
}

impl std::fmt::Debug for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Addresses")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("every", &self.every)
            .field("current", &**self.current.load())
            .finish_non_exhaustive()
    }
}

/// Two loads of the same settings are the same configuration, whatever the names resolve to.
impl PartialEq for Addresses {
    fn eq(&self, other: &Self) -> bool {
        (&self.host, self.port, self.every) == (&other.host, other.port, other.every)
    }
}

/// The most addresses one name contributes (each is an endpoint with its pool and health): a
/// DNS answer with more is cut to the first this many, in the resolver's order, without
/// repeats.
pub const MAX_ADDRESSES: usize = 32;

fn bounded(found: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in found {
        if out.len() == MAX_ADDRESSES {
            break;
        }
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

impl Addresses {
    /// Resolves `host` now (blocking: at configuration load, on the control thread).
    pub fn resolve_now(host: &str, port: u16, every: Duration) -> std::io::Result<Self> {
        let found = bounded(std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?);
        if found.is_empty() {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok(Self::new(host, port, every, found))
    }

    /// A host name not resolved yet (`gateway check --offline`: no network); the background
    /// resolution fills it in where it runs.
    pub fn unresolved(host: &str, port: u16, every: Duration) -> Self {
        Self::new(host, port, every, Vec::new())
    }

    fn new(host: &str, port: u16, every: Duration, found: Vec<SocketAddr>) -> Self {
        let literal = host.parse::<std::net::IpAddr>().is_ok();
        let every = if literal { Duration::ZERO } else { every };
        let born = Instant::now();
        Self {
            host: host.to_owned(),
            literal,
            port,
            every,
            current: ArcSwap::from_pointee(found),
            in_flight: AtomicBool::new(false),
            next_due_ms: AtomicU64::new(ms(every)),
            born,
        }
    }

    /// The host name (or address literal) and the port.
    pub fn host(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// Whether the host is an address literal (never resolved).
    pub fn is_literal(&self) -> bool {
        self.literal
    }

    /// The first address found.
    pub fn first(&self) -> SocketAddr {
        self.current
            .load()
            .first()
            .copied()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Every address the last good resolution found.
    pub fn all(&self) -> Arc<Vec<SocketAddr>> {
        self.current.load_full()
    }

    /// Whether a background resolution should start now; if so, it is marked running.
    pub fn start_if_due(&self, now: Instant) -> bool {
        if self.every.is_zero()
            || ms(now.duration_since(self.born)) < self.next_due_ms.load(Ordering::Relaxed)
        {
            return false;
        }
        !self.in_flight.swap(true, Ordering::AcqRel)
    }

    /// Takes a resolution's result: new addresses are published; a failure, or nothing
    /// found, keeps the last good ones. Returns whether it succeeded.
    pub fn apply(&self, name: &str, found: std::io::Result<Vec<SocketAddr>>) -> bool {
        let now = ms(self.born.elapsed());
        self.next_due_ms
            .store(now.saturating_add(ms(self.every)), Ordering::Relaxed);
        self.in_flight.store(false, Ordering::Release);
        match found.map(bounded) {
            Ok(found) if !found.is_empty() => {
                if **self.current.load() != found {
                    tracing::info!(
                        upstream = name,
                        host = %self.host,
                        was = ?**self.current.load(),
                        now = ?found,
                        "upstream address changed"
                    );
                    self.current.store(Arc::new(found));
                }
                true
            }
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "no address".to_owned(),
                };
                tracing::warn!(
                    upstream = name,
                    host = %self.host,
                    kept = ?**self.current.load(),
                    "resolving the upstream's host failed ({why}); the last good address is kept"
                );
                false
            }
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[path = "addresses_tests.rs"]
mod tests;
