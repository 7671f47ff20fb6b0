//! A worker's data-plane state, never shared with another worker: its parser, its idle
//! upstream connections, its telemetry and the upstream sessions it holds. The state only;
//! what is done with it is in the modules that use it ([`super::held`] for held sessions).

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    os::fd::RawFd,
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use futures_channel::oneshot;
use serde_json::Value;

use super::{Parser, upstream::Pool};
use crate::{
    policy::{mtls::PeerCert, rejudge::Admission},
    shared::{Shared, SourceRefusal},
    stats::Recorder,
};

/// A worker's data-plane state: its parser and its idle upstream connections. Never shared.
pub struct WorkerCtx {
    pub shared: Arc<Shared>,
    /// What every worker learns from answers, shared by them.
    pub(super) learned: Arc<super::Learned>,
    /// This worker's index (its row in the connection table).
    pub worker: usize,
    pub(super) parser: RefCell<Parser>,
    /// Idle upstream connections.
    pub(super) pool: Pool,
    /// This worker's telemetry, shipped to the control thread once a second.
    pub recorder: RefCell<Recorder>,
    /// Upstream sessions the gateway holds for stateless clients.
    pub(super) held: Held,
    /// This worker's open client connections.
    pub open: Rc<OpenConns>,
    /// Requests other than a GET being served (calls in flight): after a handover the worker
    /// drains past its grace only while there are some (see `Shared::drain_for`).
    pub calls: std::cell::Cell<usize>,
}

impl WorkerCtx {
    pub fn new(
        shared: Arc<Shared>,
        learned: Arc<super::Learned>,
        worker: usize,
        open: Rc<OpenConns>,
    ) -> Rc<Self> {
        let max_tools = shared.snapshot.load().config.telemetry.max_tools;
        let stats = Arc::clone(&shared.upstream_stats);
        let session_key = shared.session_key;
        Rc::new(Self {
            shared,
            learned,
            worker,
            parser: RefCell::default(),
            pool: Pool::new(stats, session_key),
            recorder: RefCell::new(Recorder::new(worker, max_tools)),
            held: Held::default(),
            open,
            calls: std::cell::Cell::new(0),
        })
    }

    /// Closes the idle upstream connections the pool no longer keeps: see `Pool::sweep`.
    pub fn sweep_pool(&self) {
        self.pool.sweep();
    }

    /// Gives back the concurrency slots of tasks held past their time: see `tasks`.
    pub fn release_expired_tasks(&self) {
        self.learned.tasks.release_expired();
    }
}

/// A worker's open client connections: each one's descriptor and its client's address (the
/// client a PROXY protocol header named, once read; the peer of a direct listener's), and what
/// it was admitted as ([`Judged`]). Their count is the worker's load; their clients are what a
/// new ban or deny is held against at once, and what they were admitted as what a reload is
/// ([`OpenConns::cut_refused`]). A descriptor is here from its accept until its connection's
/// task drops it, so it is never another connection's.
#[derive(Default)]
pub struct OpenConns {
    conns: RefCell<rustc_hash::FxHashMap<RawFd, Client>>,
    /// A request was admitted under a configuration a reload had replaced by then: its
    /// connection is judged again at the next look ([`OpenConns::take_stale`]).
    stale: Cell<bool>,
}

struct Client {
    /// `None` until a PROXY protocol header names the client.
    ip: Option<IpAddr>,
    /// Shut down for its client's ban or deny, or a reload's revoking (counted once).
    cut: bool,
    /// Counted in [`crate::shared::SourceConns`] (its tenant caps connections per source).
    source_counted: bool,
    /// What it was admitted as, once its handshake or a request told.
    judged: Option<Box<Judged>>,
}

/// What a connection was admitted as, judged again when the configuration changes: its client
/// certificate against its listener's `client_ca`, and its last request's caller and route
/// against the configuration ([`crate::policy::rejudge`]).
#[derive(Default)]
struct Judged {
    /// The client certificate its handshake verified: the listener (index), the serial of the
    /// listener's TLS configuration that last accepted it, and the certificate.
    cert: Option<(usize, u64, Box<PeerCert>)>,
    /// Its last request's admission, and the serial of the snapshot that admitted it.
    admission: Option<(u64, Admission)>,
}

impl Judged {
    /// Whether the connection would be admitted now; what is accepted now is remembered, so
    /// that it is not verified again until the next change.
    fn holds(&mut self, shared: &Shared, snapshot: &crate::shared::Snapshot, ip: IpAddr) -> bool {
        if let Some(cert) = &mut self.cert
            && !still_certified(cert, shared)
        {
            return false;
        }
        if let Some((serial, admission)) = &mut self.admission
            && *serial != snapshot.serial
        {
            let cert = self.cert.as_ref().map(|(_, _, c)| &**c);
            let address_tenant = snapshot.classifier.tenant_of(ip);
            if !admission.holds(&snapshot.config, &snapshot.policy, address_tenant, cert) {
                return false;
            }
            *serial = snapshot.serial;
        }
        true
    }
}

/// Whether a connection's client certificate ([`Judged::cert`]) is still accepted: not expired,
/// and verified again by its listener's configuration if that changed since (the serial it is
/// accepted under kept).
fn still_certified(cert: &mut (usize, u64, Box<PeerCert>), shared: &Shared) -> bool {
    let (listener, serial, cert) = cert;
    if cert.expired() {
        return false;
    }
    match shared.tls.still_vouches(*listener, *serial, &cert.chain) {
        Some(now) => {
            *serial = now;
            true
        }
        None => false,
    }
}

/// Capacity of the open-connection set kept however few connections are open.
const KEEP_OPEN_SLOTS: usize = 256;

impl OpenConns {
    /// A connection accepted from `peer`: its client, or `None` when a PROXY protocol header
    /// is to name it; `source_counted`: the client is counted in
    /// [`crate::shared::SourceConns`], to be given back as it closes.
    pub fn opened(&self, fd: RawFd, client: Option<IpAddr>, source_counted: bool) {
        self.conns.borrow_mut().insert(
            fd,
            Client {
                ip: client,
                cut: false,
                source_counted,
                judged: None,
            },
        );
    }

    /// The client certificate connection `fd`'s handshake on TLS listener `listener` verified,
    /// under the listener's configuration `serial`: judged again against the listener's
    /// `client_ca` when that changes.
    pub fn certified(&self, fd: RawFd, listener: usize, serial: u64, cert: PeerCert) {
        if let Some(c) = self.conns.borrow_mut().get_mut(&fd) {
            c.judged.get_or_insert_default().cert = Some((listener, serial, Box::new(cert)));
        }
    }

    /// What a request on connection `fd` was admitted as, under snapshot `serial`; `current`:
    /// the serial of the snapshot in force now. Admitted under one a reload replaced since, the
    /// connection is judged again at the next look.
    /// `admission` is given the one kept, and makes a new one only if it differs.
    pub fn admitted(
        &self,
        fd: RawFd,
        serial: u64,
        current: u64,
        admission: impl FnOnce(Option<&Admission>) -> Option<Admission>,
    ) {
        if let Some(c) = self.conns.borrow_mut().get_mut(&fd) {
            let judged = c.judged.get_or_insert_default();
            match (
                admission(judged.admission.as_ref().map(|(_, a)| a)),
                &mut judged.admission,
            ) {
                (Some(new), kept) => *kept = Some((serial, new)),
                (None, Some((kept, _))) => *kept = serial,
                (None, None) => {}
            }
        }
        if serial != current {
            self.stale.set(true);
        }
    }

    /// Whether a request was admitted under a replaced configuration since the last look.
    pub fn take_stale(&self) -> bool {
        self.stale.take()
    }

    /// Whether connection `fd`'s client certificate, if it presented one, is still accepted by
    /// its listener (verified again after a change of its `client_ca`). One no longer
    /// accepted is counted as revoked, once; the caller closes the connection.
    pub fn certificate_holds(&self, fd: RawFd, shared: &Shared) -> bool {
        let mut open = self.conns.borrow_mut();
        let Some(c) = open.get_mut(&fd) else {
            return true;
        };
        let Some(cert) = c.judged.as_mut().and_then(|j| j.cert.as_mut()) else {
            return true;
        };
        if still_certified(cert, shared) {
            return true;
        }
        if !c.cut {
            c.cut = true;
            shared.refused_conns.revoked();
        }
        false
    }

    /// The client a PROXY protocol header named (or the balancer, for a header of its own), as
    /// [`OpenConns::opened`].
    pub fn named(&self, fd: RawFd, client: IpAddr, source_counted: bool) {
        if let Some(c) = self.conns.borrow_mut().get_mut(&fd) {
            c.ip = Some(client);
            c.source_counted = source_counted;
        }
    }

    /// Takes a closed connection out, and gives its client's source back to `sources` if it
    /// was counted there. The set does not shrink by itself: once seven eighths of
    /// its capacity are free (most of a wave of connections closed), it is made to fit twice
    /// what is left. A rehash of what is left, and the next one waits until half of that
    /// closed too. An entry is 40 bytes (and what a connection was admitted as, a small
    /// allocation of its own once its first request came): 10,000 connections take a table of
    /// about 650 KiB, given back once they are gone.
    pub fn closed(&self, fd: RawFd, sources: &crate::shared::SourceConns) {
        let mut open = self.conns.borrow_mut();
        if let Some(Client {
            ip: Some(ip),
            source_counted: true,
            ..
        }) = open.remove(&fd)
        {
            sources.leave(ip);
        }
        let left = open.len();
        if open.capacity() > KEEP_OPEN_SLOTS && left * 8 <= open.capacity() {
            open.shrink_to((left * 2).max(KEEP_OPEN_SLOTS));
        }
    }

    pub fn len(&self) -> usize {
        self.conns.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.borrow().is_empty()
    }

    /// Whether the connection was shut down for its client's ban or deny, or as a reload
    /// revoked what it was admitted with.
    pub fn was_cut(&self, fd: RawFd) -> bool {
        self.conns.borrow().get(&fd).is_some_and(|c| c.cut)
    }

    /// Shuts every connection down (both ways): its task's next read ends and its next write
    /// fails, and the client sees its connection closed now. The descriptors stay open, owned
    /// by their tasks.
    pub fn shut_all(&self) {
        for fd in self.conns.borrow().keys() {
            shut(*fd);
        }
    }

    /// Shuts down the connections of clients now banned or in `kernel.deny`, and those whose
    /// caller the configuration in force would no longer admit ([`Judged::holds`]: a reload
    /// revoked its credential, its tenant or route, or the client CA that verified its
    /// certificate), each counted once as refused: an event stream or a call in progress ends
    /// now, and a connection idle between requests closes, instead of at its next request.
    /// Returns how many.
    pub fn cut_refused(&self, shared: &Shared) -> usize {
        let snapshot = shared.snapshot.load();
        let mut cut = 0;
        for (fd, c) in self.conns.borrow_mut().iter_mut() {
            let Some(ip) = c.ip else { continue };
            if c.cut {
                continue;
            }
            let refusal = shared.source_refusal(&snapshot, ip);
            if refusal.is_none()
                && c.judged
                    .as_mut()
                    .is_none_or(|j| j.holds(shared, &snapshot, ip))
            {
                continue;
            }
            // Reset when its task closes it: what was queued for the client before the ban
            // is thrown away, not delivered (a client that stopped reading had megabytes of
            // an answer waiting, a review found).
            crate::host::reset_on_close(*fd);
            shut(*fd);
            c.cut = true;
            match refusal {
                Some(why) => shared.refused_conns.source(why),
                None => shared.refused_conns.revoked(),
            }
            cut += 1;
        }
        cut
    }
}

impl OpenConns {
    /// Counts the refusal of connection `fd`'s client, found before its next request (the
    /// caller closes it), unless it was cut and counted already.
    pub fn refused(&self, fd: RawFd, why: SourceRefusal, shared: &Shared) {
        let mut open = self.conns.borrow_mut();
        match open.get_mut(&fd) {
            Some(c) if c.cut => {}
            Some(c) => {
                c.cut = true;
                shared.refused_conns.source(why);
            }
            None => shared.refused_conns.source(why),
        }
    }
}

fn shut(fd: RawFd) {
    // SAFETY: shutdown(2) only, on a descriptor a connection's task owns while it is in the
    // set.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// An upstream session the gateway opened and holds.
pub(super) struct HeldSession {
    /// The upstream's `Mcp-Session-Id`; `None` for a server that issues none.
    pub id: Option<String>,
    /// The version agreed at `initialize`.
    pub version: String,
    /// The `initialize` result.
    pub init: Value,
    /// When a request last took it.
    pub(super) used: Cell<Instant>,
    /// The address of the client whose request opened it (its DELETE is forwarded for it).
    pub(super) opener: SocketAddr,
    /// Its owner's tenant ([`super::held::Owner`]).
    pub(super) tenant: u64,
}

pub(super) enum Slot {
    Ready(Rc<HeldSession>),
    /// Being opened by one request; the others wait here (a dropped sender wakes them).
    Opening(Vec<oneshot::Sender<()>>),
}

/// This worker's held sessions ([`super::held`]) and what it knows of its upstreams' eras.
///
/// A session the gateway lets go is ended at its upstream with a DELETE: many servers keep a
/// session until it is DELETEd, so one only forgotten would stay there for good. An evicted
/// one waits in `ending` for the worker's [`Held::end_evicted`] task, so that no request waits
/// for another upstream's DELETE; when the worker stops, [`Held::end_all`] ends the rest.
#[derive(Default)]
pub(crate) struct Held {
    /// By upstream key: since when it is known to speak only the session era
    /// ([`super::era`]).
    pub(super) eras: RefCell<HashMap<u64, Instant>>,
    /// By upstream key: when the bridge last listed its tools to learn a tool's `Mcp-Param-*`
    /// headers ([`super::bridge`]): at most once a [`super::bridge::RELIST_AFTER`].
    pub(super) bridge_listed: RefCell<HashMap<u64, Instant>>,
    /// By (upstream key, owner).
    pub(super) sessions: RefCell<HashMap<(u64, u64), Slot>>,
    /// Evicted sessions to be ended (upstream key, session), oldest first.
    pub(super) ending: RefCell<VecDeque<(u64, Rc<HeldSession>)>>,
    /// Wakes [`Held::end_evicted`] when `ending` gets one.
    pub(super) wake: RefCell<Option<oneshot::Sender<()>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The open-connection set gives its table back as a wave of connections closes, and keeps
    /// a small one for the few that stay.
    #[test]
    fn the_open_set_shrinks_when_connections_close() {
        // What the table's entry is said to take (`OpenConns::closed`).
        assert!(std::mem::size_of::<(RawFd, Client)>() <= 40);
        let open = OpenConns::default();
        for fd in 0..10_000 {
            open.opened(fd, None, false);
        }
        let full = open.conns.borrow().capacity();
        assert!(full >= 10_000);
        for fd in 10..10_000 {
            open.closed(fd, &crate::shared::SourceConns::default());
        }
        assert_eq!(open.len(), 10);
        let kept = open.conns.borrow().capacity();
        assert!(
            kept <= 4 * KEEP_OPEN_SLOTS,
            "{kept} slots kept for 10 connections ({full} at 10,000)"
        );
        for fd in 0..10 {
            assert!(open.conns.borrow().contains_key(&fd));
        }
        // Below the floor, the set is left as it is (no rehash for every close).
        let few = OpenConns::default();
        for fd in 0..100 {
            few.opened(fd, None, false);
        }
        let cap = few.conns.borrow().capacity();
        for fd in 0..99 {
            few.closed(fd, &crate::shared::SourceConns::default());
        }
        assert_eq!(few.conns.borrow().capacity(), cap);
    }
}
