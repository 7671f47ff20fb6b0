//! A worker's idle upstream connections, kept for reuse. Never shared between workers.
//!
//! Connections are pooled per upstream (its [`Upstream::key`]: name, URL and TLS settings), not
//! per address: two upstreams on one address with different names or certificates never share
//! a connection. When an upstream's address changes (a re-resolution), its idle connections to
//! the old one are retired.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Conn, Stats};
use crate::{config::Upstream, http::Io};

/// Idle entries of an upstream unused this long are dropped when another upstream's entry is
/// made (left behind by a reload that changed the upstream's settings).
const FORGET_AFTER: Duration = Duration::from_secs(60);

struct Idle {
    /// The address these connections go to.
    addr: SocketAddr,
    /// The most recently used on top.
    conns: Vec<Io>,
    used: Instant,
}

pub struct Pool {
    idle: RefCell<HashMap<u64, Idle>>,
    /// Counters shared with the other workers and the control thread.
    pub(super) stats: Arc<Stats>,
}

impl Pool {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            idle: RefCell::default(),
            stats,
        }
    }

    /// An idle connection to `up` at `addr`, if one is still open and silent. Each is checked
    /// first (a non-blocking peek): one the upstream closed (servers close idle keep-alive
    /// connections on their own schedule: uvicorn after 5 s, Node after 5 s) or sent anything
    /// on since its last answer is dropped. Bytes sent after an answer belong to no request:
    /// read as the next answer they would reach another client. (Over TLS, records that carry
    /// no data, such as a TLS 1.3 server's session tickets, are taken and do not count.)
    pub(super) fn checkout(&self, up: &Upstream, addr: SocketAddr) -> Option<Io> {
        let mut pool = self.idle.borrow_mut();
        let idle = pool.get_mut(&up.key)?;
        if idle.addr != addr {
            // The upstream moved: connections to its old address are retired.
            idle.conns.clear();
            idle.addr = addr;
            return None;
        }
        while let Some(mut io) = idle.conns.pop() {
            if io.idle_and_open() {
                return Some(io);
            }
        }
        None
    }

    /// Returns a connection whose exchange is complete to the pool; one with bytes read past
    /// its answer, with an abandoned read or write, or to an address the upstream no longer
    /// has, is closed instead.
    pub(crate) fn checkin(&self, up: &Upstream, conn: Conn) {
        let Conn { io, addr } = conn;
        if !io.intact() || addr != up.addrs.first() {
            return;
        }
        let mut pool = self.idle.borrow_mut();
        let now = Instant::now();
        if !pool.contains_key(&up.key) {
            pool.retain(|_, idle| now.duration_since(idle.used) < FORGET_AFTER);
        }
        let idle = pool.entry(up.key).or_insert_with(|| Idle {
            addr,
            conns: Vec::new(),
            used: now,
        });
        idle.used = now;
        if idle.addr != addr {
            idle.conns.clear();
            idle.addr = addr;
        }
        if idle.conns.len() < up.max_idle {
            idle.conns.push(io);
        }
    }
}
