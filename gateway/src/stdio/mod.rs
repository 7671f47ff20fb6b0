//! stdio upstreams: MCP servers run as child processes of the gateway, speaking JSON-RPC one
//! message per line on stdin and stdout.
//!
//! A supervisor task on the control thread owns each upstream's child: it starts it (lazily,
//! on the first call), initializes it once, restarts it with backoff when it dies, stops a
//! crash loop, stops it when idle, and stops it gracefully (stdin closed, `SIGTERM`, then
//! `SIGKILL` to its process group). Workers never touch a child: they send a [`ToChild`] over a
//! channel through a [`Handle`] and await the answer on another, so a slow or dead child never
//! blocks a core, and no lock is taken on their side. Concurrent clients share one child
//! through [`mux`], which rewrites ids and tokens both ways.
//!
//! The child runs in a [`sandbox`]. What a child prints to stderr goes to the log, rate
//! limited; what it prints to stdout that is not JSON is logged and skipped; a line longer than
//! the limit is discarded without being held in memory. Each child has a [`cgroup`] of its
//! own where the gateway can make one: its process limit, and what its stop ends.

mod cgroup;
mod child;
pub mod mux;
mod per_caller;
pub mod sandbox;

use std::{path::PathBuf, sync::Arc, time::Duration};

use futures_channel::{mpsc, oneshot};

pub use cgroup::{cgroups_under, in_a_childs_cgroup};
pub use mux::Caller;
pub use sandbox::{FsAccess, SandboxSpec};

/// One stdio upstream, from configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct StdioSpec {
    /// The upstream's name (in errors, logs and metrics).
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The only variables of the child's environment, besides `PATH`, `HOME`, `TMPDIR`, `LANG`.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub sandbox: SandboxSpec,
    /// From start to the answer to `initialize`.
    pub start_timeout: Duration,
    /// From a request written to its answer.
    pub call_timeout: Duration,
    /// Stop the child after this long without a call (`None`: keep it).
    pub idle_shutdown: Option<Duration>,
    /// From stdin closed to `SIGTERM`, and from `SIGTERM` to `SIGKILL`.
    pub stop_grace: Duration,
    /// The longest line read from the child.
    pub max_line_bytes: usize,
    /// More starts than this within `restart_window` is a crash loop: the upstream stays down
    /// for the window.
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// `Some(max)`: one child per caller, at most `max` at once ([`per_caller`]); `None`: one
    /// child shared by every caller.
    pub per_caller: Option<u32>,
}

impl StdioSpec {
    /// A spec with the defaults for everything but the name and the command.
    pub fn new(name: &str, command: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            command,
            env: Vec::new(),
            cwd: None,
            sandbox: SandboxSpec::default(),
            start_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(60),
            idle_shutdown: None,
            stop_grace: Duration::from_secs(2),
            max_line_bytes: 16 << 20,
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            per_caller: None,
        }
    }
}

/// Why a call to a stdio upstream failed: each says so in a JSON-RPC error naming the upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StdioError {
    #[error("stdio upstream {0}: could not start: {1}")]
    Start(String, String),
    #[error("stdio upstream {0}: the process exited ({1}) before answering")]
    Exited(String, String),
    #[error("stdio upstream {0}: no answer within {1} ms")]
    Timeout(String, u128),
    #[error("stdio upstream {0}: restarted too often; down for {1} s")]
    CrashLoop(String, u64),
    #[error("stdio upstream {0}: {1}")]
    Refused(String, String),
    /// An answer the gateway reads whole (to filter it) and cannot pass on: the upstream's
    /// failure.
    #[error("stdio upstream {0}: {1}")]
    Malformed(String, String),
    /// The call's answer was a line over `max_line_bytes`: the call's own failure (a tool
    /// asked for a large file), not the upstream's.
    #[error("stdio upstream {0}: answer longer than {1} bytes")]
    TooLong(String, usize),
    /// The call's answer was a line the gateway cannot read (not JSON, or a number beyond
    /// what it reads): the call's own failure too (a tool's result can hold such a number).
    #[error(
        "stdio upstream {0}: an answer the gateway cannot read (not JSON, or a number beyond its range)"
    )]
    Unreadable(String),
    #[error("stdio upstream {0} is shut down")]
    Gone(String),
    /// Every one of the upstream's per-caller children is another caller's.
    #[error("stdio upstream {0}: all {1} children (one per caller) are in use; try again later")]
    Busy(String, u32),
    /// What waits to be written to the child is at its bound ([`MAX_QUEUED_BYTES`]): it reads
    /// slower than messages arrive.
    #[error(
        "stdio upstream {0}: its child reads slower than messages arrive ({1} bytes wait); try again later"
    )]
    Full(String, usize),
    /// The child restarted with another definition of the tool, which awaits approval.
    #[error(
        "the definition of tool `{1}` at upstream `{0}` changed; an operator must approve it (POST /pins/approve)"
    )]
    Unapproved(String, String),
    /// The caller's own child (`children = "caller"`) has not listed the tool since it started:
    /// its definition is unknown, so nothing says it is the approved one.
    #[error(
        "tool `{1}` at upstream `{0}` is not in what the caller's own child listed; list tools, then call it"
    )]
    Unlisted(String, String),
}

impl StdioError {
    /// The upstream it is of.
    pub fn upstream(&self) -> &str {
        match self {
            Self::Start(u, _)
            | Self::Exited(u, _)
            | Self::Timeout(u, _)
            | Self::CrashLoop(u, _)
            | Self::Refused(u, _)
            | Self::Malformed(u, _)
            | Self::TooLong(u, _)
            | Self::Unreadable(u)
            | Self::Gone(u)
            | Self::Busy(u, _)
            | Self::Full(u, _)
            | Self::Unapproved(u, _)
            | Self::Unlisted(u, _) => u,
        }
    }
}

/// Starts what serves `spec` on the current tokio runtime (the control thread's): the
/// supervisor of its one child, or the dispatcher of its per-caller children. The workers'
/// handle is the same for both; a child starts on the first call.
pub fn spawn(spec: StdioSpec, gate: Option<Arc<dyn PinGate>>) -> Handle {
    if spec.per_caller.is_some() {
        per_caller::spawn(spec, gate)
    } else {
        child::spawn(spec, gate)
    }
}

/// A message for the child, from a worker.
#[derive(Debug)]
pub enum ToChild {
    /// A request; what the child sends back for it (progress, its own requests) goes to
    /// `events`, its answer to `done`.
    Request {
        who: Who,
        message: Vec<u8>,
        events: mpsc::Sender<Vec<u8>>,
        done: oneshot::Sender<Result<Vec<u8>, StdioError>>,
        slot: Slot,
        /// When it was sent: a start of the child that failed after it failed it too (it
        /// waited for that start).
        sent: std::time::Instant,
    },
    /// A notification (a cancellation, say).
    Notification {
        caller: Caller,
        message: Vec<u8>,
        slot: Slot,
    },
    /// A client's answer to a request of the child's.
    Response {
        caller: Caller,
        message: Vec<u8>,
        slot: Slot,
    },
}

/// Notifications and answers on their way to one upstream's child (or children) at once:
/// they are answered 202 at once, so a client could send them faster than a child reads
/// them; past this many, a new one is dropped (JSON-RPC gives a notification no answer to
/// wait for), never queued without bound.
pub const MAX_QUEUED: usize = 256;

/// Bytes of calls on their way to one child at once, from the worker that took them until the
/// child's stdin took them: past it a call fails at once ([`StdioError::Full`]). A call larger
/// than this goes when no other waits. Without a bound a client's 4 MB cancellations of its
/// own slow call, each answered 202 at once, waited in the gateway for a child that reads
/// slower than the network brings them: 6.6 GB in 12 s (an attacker's review).
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

/// Bytes of notifications and answers on their way to one child at once, apart from the
/// calls': past it a new one is dropped. Apart, so that a flood of them (answered 202 at once,
/// and cancellations have a rate of their own) makes no other tenant's call fail (it did, with
/// one budget for both: 22 of 40 calls of 1 MB got 503, an attacker's review).
pub const MAX_QUEUED_LINE_BYTES: usize = 8 << 20;

/// What waits for one child: notifications and answers (in number and bytes), and calls (in
/// bytes).
#[derive(Debug, Default)]
pub struct Queued {
    lines: std::sync::atomic::AtomicUsize,
    line_bytes: std::sync::atomic::AtomicUsize,
    call_bytes: std::sync::atomic::AtomicUsize,
}

impl Queued {
    /// Bytes waiting now.
    pub fn bytes(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        self.line_bytes.load(Relaxed) + self.call_bytes.load(Relaxed)
    }

    /// The bytes waiting of `line`'s kind of message.
    fn counter(&self, line: bool) -> &std::sync::atomic::AtomicUsize {
        if line {
            &self.line_bytes
        } else {
            &self.call_bytes
        }
    }
}

/// A message's place in what waits for a child ([`Queued`]): it travels with the message and
/// is given back once the child's stdin took it, or the message was dropped.
#[derive(Debug)]
pub struct Slot {
    queued: Arc<Queued>,
    bytes: usize,
    /// Counted among the [`MAX_QUEUED`] notifications and answers.
    line: bool,
}

impl Slot {
    /// A place for a message of `bytes` (`line`: a notification or an answer) within
    /// `max_bytes`, if there is one.
    fn take(queued: &Arc<Queued>, bytes: usize, line: bool, max_bytes: usize) -> Option<Self> {
        use std::sync::atomic::Ordering::Relaxed;
        if line
            && queued
                .lines
                .fetch_update(Relaxed, Relaxed, |n| (n < MAX_QUEUED).then_some(n + 1))
                .is_err()
        {
            return None;
        }
        let fits = queued
            .counter(line)
            .fetch_update(Relaxed, Relaxed, |b| {
                (b == 0 || b.saturating_add(bytes) <= max_bytes).then_some(b + bytes)
            })
            .is_ok();
        if !fits {
            if line {
                queued.lines.fetch_sub(1, Relaxed);
            }
            return None;
        }
        Some(Self {
            queued: Arc::clone(queued),
            bytes,
            line,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.queued
            .counter(self.line)
            .fetch_sub(self.bytes, Relaxed);
        if self.line {
            self.queued.lines.fetch_sub(1, Relaxed);
        }
    }
}

/// Who sends a request: the caller (a keyed hash of its tenant and agent: whose ids the
/// shared child's answers go back to, whose child a per-caller upstream uses) and its tenant
/// alone (per-caller children are shared fairly between tenants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who {
    pub caller: Caller,
    pub tenant: u64,
}

/// A worker's end of a stdio upstream: cheap to clone, `Send`, never blocks.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::UnboundedSender<ToChild>,
    name: Arc<str>,
    /// What waits for the child (see [`Slot`]).
    queued: Arc<Queued>,
    /// Each caller has a child of its own (`children = "caller"`): a child's failure is its
    /// caller's, not the upstream's ([`Handle::per_caller`]).
    per_caller: bool,
}

/// The two ends a caller reads: the child's messages before its answer, and the answer.
pub struct Pending {
    pub events: mpsc::Receiver<Vec<u8>>,
    pub done: oneshot::Receiver<Result<Vec<u8>, StdioError>>,
}

/// How many messages before its answer one call may have waiting; more (a notification
/// flood) are dropped, never buffered without bound.
const EVENTS_PER_CALL: usize = 64;

impl Handle {
    fn new(tx: mpsc::UnboundedSender<ToChild>, name: Arc<str>) -> Self {
        Self {
            tx,
            name,
            queued: Arc::default(),
            per_caller: false,
        }
    }

    /// Whether each caller has a child of its own: then a child that exits, is in its crash
    /// loop or answers nonsense fails its own caller only, and says nothing of the others'.
    pub fn per_caller(&self) -> bool {
        self.per_caller
    }

    /// A place in the queue for a notification or an answer of `bytes`, or a (throttled) word
    /// that the message is dropped.
    fn slot(&self, bytes: usize) -> Option<Slot> {
        let slot = Slot::take(&self.queued, bytes, true, MAX_QUEUED_LINE_BYTES);
        if slot.is_none() {
            crate::throttled_warn!(upstream = %self.name, max = MAX_QUEUED, max_bytes = MAX_QUEUED_LINE_BYTES, "stdio upstream: notifications and answers arrive faster than its child reads them; dropped");
        }
        slot
    }

    /// What waits for the child now.
    pub fn queued(&self) -> &Queued {
        &self.queued
    }

    /// Sends a request (one JSON-RPC message); see [`Pending`].
    pub fn call(&self, who: Who, message: Vec<u8>) -> Pending {
        let (events_tx, events) = mpsc::channel(EVENTS_PER_CALL);
        let (done_tx, done) = oneshot::channel();
        self.forward(who, message, events_tx, done_tx, std::time::Instant::now());
        Pending { events, done }
    }

    /// Sends a request whose ends are made already (the per-caller dispatcher passes a call
    /// on to its caller's child); one that finds no room fails at once.
    fn forward(
        &self,
        who: Who,
        message: Vec<u8>,
        events: mpsc::Sender<Vec<u8>>,
        done: oneshot::Sender<Result<Vec<u8>, StdioError>>,
        sent: std::time::Instant,
    ) {
        let Some(slot) = Slot::take(&self.queued, message.len(), false, MAX_QUEUED_BYTES) else {
            crate::throttled_warn!(upstream = %self.name, max_bytes = MAX_QUEUED_BYTES, "stdio upstream: its child reads slower than calls arrive; a call failed at once");
            let _ = done.send(Err(StdioError::Full(
                self.name.to_string(),
                self.queued.bytes(),
            )));
            return;
        };
        if let Err(e) = self.tx.unbounded_send(ToChild::Request {
            who,
            message,
            events,
            done,
            slot,
            sent,
        }) && let ToChild::Request { done, .. } = e.into_inner()
        {
            let _ = done.send(Err(StdioError::Gone(self.name.to_string())));
        }
    }

    /// Sends a notification; nothing comes back.
    pub fn notify(&self, caller: Caller, message: Vec<u8>) {
        if let Some(slot) = self.slot(message.len()) {
            let _ = self.tx.unbounded_send(ToChild::Notification {
                caller,
                message,
                slot,
            });
        }
    }

    /// Sends a client's answer to a request of the child's.
    pub fn respond(&self, caller: Caller, message: Vec<u8>) {
        if let Some(slot) = self.slot(message.len()) {
            let _ = self.tx.unbounded_send(ToChild::Response {
                caller,
                message,
                slot,
            });
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The stdio upstreams' handles by upstream name, published to the workers without a lock;
/// the control thread starts a supervisor for each new or changed upstream and drops the
/// handles of removed ones (a supervisor stops its child when the last handle goes).
#[derive(Default)]
pub struct Registry {
    published: arc_swap::ArcSwap<std::collections::HashMap<String, Handle>>,
    /// The tool pins every supervisor consults; set once at start.
    gate: std::sync::OnceLock<Arc<dyn PinGate>>,
    /// Control thread only: the spec each handle was started with.
    running: std::sync::Mutex<std::collections::HashMap<String, (Arc<StdioSpec>, Handle)>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// What the supervisors ask of the gateway's tool pins. A child that starts (the first time or
/// after a crash, an idle stop or a reload) may come back with other tool definitions: its
/// tools are listed at once and observed, so a definition that changed is held for approval,
/// and a call of a tool that is not callable is refused before it reaches the child (the
/// worker's check ran before the restart and cannot have seen the change).
pub trait PinGate: Send + Sync {
    /// Whether pinning is on (else nothing is listed at start).
    fn enabled(&self) -> bool;
    fn observe(&self, upstream: &str, tools: &[serde_json::Value]);
    /// Whether a call of `tool` may reach the child: with `defined` (a per-caller child's own
    /// definition, as it last listed it), only if that is the approved one; without, not while
    /// a changed definition awaits approval.
    fn callable(
        &self,
        upstream: &str,
        tool: &str,
        defined: Option<&crate::policy::pins::Digests>,
    ) -> bool;
}

/// Supervisors running, each holding one [`Live`].
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a supervisor as running for as long as it is held.
struct Live;

impl Live {
    fn new() -> Self {
        LIVE.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Registry {
    /// Control thread, at exit (after the workers): stops every child the way a removed
    /// upstream's is stopped and waits for their supervisors to end, so that no child, and no
    /// home folder (nor the folder they are in), outlives the gateway. Bounded by the longest
    /// stop grace (twice: stdin closed, then `SIGTERM`) and a second.
    pub async fn stop_all(&self) {
        let grace = self.running.lock().map_or(Duration::ZERO, |r| {
            r.values()
                .map(|(spec, _)| spec.stop_grace)
                .max()
                .unwrap_or_default()
        });
        self.sync([]);
        let deadline = tokio::time::Instant::now() + grace * 2 + Duration::from_secs(1);
        while LIVE.load(std::sync::atomic::Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Each supervisor removed its child's home as it ended: the folder they were in goes
        // too (left, with a warning, if one did not end in time; the next gateway sweeps it).
        sandbox::remove_homes_folder();
    }

    /// Control thread, once, before the first [`Registry::sync`]: the pins the supervisors
    /// consult.
    pub fn set_gate(&self, gate: Arc<dyn PinGate>) {
        let _ = self.gate.set(gate);
    }

    /// A worker's handle to the stdio upstream `name`.
    pub fn get(&self, name: &str) -> Option<Handle> {
        self.published.load().get(name).cloned()
    }

    /// Control thread (inside its tokio runtime): brings the supervisors in line with `specs`,
    /// the stdio upstreams of a configuration. A child whose spec did not change keeps running
    /// across a reload.
    pub fn sync<'a>(&self, specs: impl IntoIterator<Item = &'a Arc<StdioSpec>>) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        let mut next = std::collections::HashMap::new();
        let mut specs = specs.into_iter().peekable();
        if specs.peek().is_some() {
            // Where children's cgroups go, found now: what a gateway that died left there is
            // ended at this start, not at the first call.
            cgroup::prepare();
        }
        for spec in specs {
            let kept = running
                .remove(&spec.name)
                .filter(|(old, _)| old == spec)
                .map(|(_, h)| h);
            let handle = kept.unwrap_or_else(|| spawn((**spec).clone(), self.gate.get().cloned()));
            next.insert(spec.name.clone(), (Arc::clone(spec), handle));
        }
        *running = next;
        self.published.store(Arc::new(
            running
                .iter()
                .map(|(name, (_, h))| (name.clone(), h.clone()))
                .collect(),
        ));
    }
}
