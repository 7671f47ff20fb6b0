//! One child per caller, for a stdio server that keeps per-user state (a login, a browser, files
//! of its own): each caller (the tenant and agent the route identified) gets a child of its own,
//! started on its first request, up to a maximum. A caller beyond it is refused
//! ([`StdioError::Busy`], a 503) and never put on another caller's child. A child with nothing
//! in flight and no message for the idle time is stopped, and its place freed.
//!
//! A dispatcher task on the control thread stands where the shared mode's supervisor stands:
//! the workers' [`Handle`] is the same, so routes and federations do not know the difference.
//! Each child has its own supervisor ([`super::child::spawn`]): its own sandbox, restarts, crash-loop
//! limit, and pin checks after a restart.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt as _;

use super::{Caller, Handle, PinGate, StdioError, StdioSpec, ToChild};

/// One caller's child.
struct Child {
    handle: Handle,
    activity: Arc<Activity>,
}

/// What the dispatcher and the answers of a child's calls tell about its use (control thread
/// only).
struct Activity {
    /// Requests sent and not yet answered (or given up by their client).
    in_flight: AtomicUsize,
    /// The last message sent to it, or the last answer, whichever came later.
    last: std::sync::Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    /// Whether the child has had nothing to do for `idle`.
    fn idle(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && self.last.lock().is_ok_and(|last| last.elapsed() >= idle)
    }
}

/// Starts the dispatcher of `spec` (whose `per_caller` is `Some`) on the current tokio runtime
/// and returns the workers' handle.
pub fn spawn(spec: StdioSpec, gate: Option<Arc<dyn PinGate>>) -> Handle {
    let (tx, rx) = mpsc::unbounded();
    let name: Arc<str> = Arc::from(spec.name.as_str());
    tokio::spawn(dispatch(spec, gate, rx));
    Handle { tx, name }
}

async fn dispatch(
    spec: StdioSpec,
    gate: Option<Arc<dyn PinGate>>,
    mut rx: mpsc::UnboundedReceiver<ToChild>,
) {
    let max = spec.per_caller.unwrap_or(1).max(1);
    let idle = spec.idle_shutdown.unwrap_or(DEFAULT_IDLE);
    // The dispatcher decides when a child is idle; its supervisor keeps it running until then.
    let mut child_spec = spec.clone();
    child_spec.idle_shutdown = None;
    child_spec.per_caller = None;
    let mut children: HashMap<Caller, Child> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            msg = rx.next() => match msg {
                // The upstream was removed: dropping the children's handles stops them.
                None => return,
                Some(msg) => route(&child_spec, &gate, max, &mut children, msg),
            },
            _ = tick.tick() => retire_idle(&spec.name, idle, &mut children),
        }
    }
}

/// How long a caller's child lives without a call when `idle_shutdown_ms` is not set.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

fn retire_idle(name: &str, idle: Duration, children: &mut HashMap<Caller, Child>) {
    children.retain(|caller, c| {
        let keep = !c.activity.idle(idle);
        if !keep {
            tracing::info!(upstream = %name, caller = %format_args!("{caller:016x}"),
                "stdio child of one caller idle; stopped");
        }
        keep
    });
}

fn route(
    spec: &StdioSpec,
    gate: &Option<Arc<dyn PinGate>>,
    max: u32,
    children: &mut HashMap<Caller, Child>,
    msg: ToChild,
) {
    let (caller, message, events, done) = match msg {
        ToChild::Request {
            caller,
            message,
            events,
            done,
        } => (caller, message, events, done),
        ToChild::Notification { caller, .. } | ToChild::Response { caller, .. } => {
            // A notification or an answer for a child the caller does not have (stopped as
            // idle, say) has nobody to go to.
            if let Some(c) = children.get(&caller) {
                c.activity.touch();
                let _ = c.handle.tx.unbounded_send(msg);
            }
            return;
        }
    };
    if !children.contains_key(&caller) && children.len() >= max as usize {
        let _ = done.send(Err(StdioError::Busy(spec.name.clone(), max)));
        return;
    }
    let child = children.entry(caller).or_insert_with(|| {
        tracing::info!(upstream = %spec.name, caller = %format_args!("{caller:016x}"),
            "stdio child for a new caller");
        Child {
            handle: super::child::spawn(spec.clone(), gate.clone()),
            activity: Arc::new(Activity {
                in_flight: AtomicUsize::new(0),
                last: std::sync::Mutex::new(Instant::now()),
            }),
        }
    });
    child.activity.touch();
    child.activity.in_flight.fetch_add(1, Ordering::AcqRel);
    // The answer passes through here to count it; a client that gives up is passed on to the
    // supervisor (which cancels the call at the child) by dropping its end.
    let (inner_done, answer) = oneshot::channel();
    let activity = Arc::clone(&child.activity);
    let mut done = done;
    tokio::spawn(async move {
        tokio::select! {
            r = answer => if let Ok(r) = r {
                let _ = done.send(r);
            },
            () = done.cancellation() => {}
        }
        activity.touch();
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    });
    if let Err(e) = child.handle.tx.unbounded_send(ToChild::Request {
        caller,
        message,
        events,
        done: inner_done,
    }) && let ToChild::Request { done, .. } = e.into_inner()
    {
        let _ = done.send(Err(StdioError::Gone(spec.name.clone())));
    }
}
