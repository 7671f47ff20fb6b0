//! A worker's idle upstream connections, kept for reuse. Never shared between workers.

use std::{cell::RefCell, collections::HashMap, net::SocketAddr};

use crate::http::Io;

/// Idle upstream connections by address, the most recently used on top.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<Io>>>,
}

impl Pool {
    /// An idle connection to `addr`, if one is still open and silent. Each is checked first (a
    /// non-blocking peek): one the upstream closed (servers close idle keep-alive connections
    /// on their own schedule: uvicorn after 5 s, Node after 5 s) or sent anything on since its
    /// last answer is dropped. Bytes sent after an answer belong to no request: read as the
    /// next answer they would reach another client.
    pub(super) fn checkout(&self, addr: SocketAddr) -> Option<Io> {
        let mut pool = self.idle.borrow_mut();
        let idle = pool.get_mut(&addr)?;
        while let Some(mut io) = idle.pop() {
            if io.idle_and_open() {
                return Some(io);
            }
        }
        None
    }

    /// Returns a connection whose exchange is complete to the pool; one with bytes read past
    /// its answer, or with an abandoned read or write, is closed instead.
    pub(crate) fn checkin(&self, addr: SocketAddr, io: Io, max_idle: usize) {
        if !io.intact() {
            return;
        }
        let mut pool = self.idle.borrow_mut();
        let idle = pool.entry(addr).or_default();
        if idle.len() < max_idle {
            idle.push(io);
        }
    }
}
