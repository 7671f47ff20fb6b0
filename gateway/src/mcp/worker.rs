//! A worker's data-plane state, never shared with another worker: its parser, its idle
//! upstream connections, its telemetry and the upstream sessions it holds. The state only;
//! what is done with it is in the modules that use it ([`super::held`] for held sessions).

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use futures_channel::oneshot;
use serde_json::Value;

use super::{Parser, upstream::Pool};
use crate::{shared::Shared, stats::Recorder};

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
}

impl WorkerCtx {
    pub fn new(shared: Arc<Shared>, learned: Arc<super::Learned>, worker: usize) -> Rc<Self> {
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
        })
    }

    /// Closes the idle upstream connections the pool no longer keeps: see `Pool::sweep`.
    pub fn sweep_pool(&self) {
        self.pool.sweep();
    }
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
    /// By (upstream key, owner).
    pub(super) sessions: RefCell<HashMap<(u64, u64), Slot>>,
    /// Evicted sessions to be ended (upstream key, session), oldest first.
    pub(super) ending: RefCell<VecDeque<(u64, Rc<HeldSession>)>>,
    /// Wakes [`Held::end_evicted`] when `ending` gets one.
    pub(super) wake: RefCell<Option<oneshot::Sender<()>>>,
}
