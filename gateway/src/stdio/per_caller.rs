//! One child per caller, for a stdio server that keeps per-user state (a login, a browser, files
//! of its own): each caller (the tenant and agent the route identified) gets a child of its own,
//! started on its first request, up to a maximum, and never put on another caller's child. A
//! child with nothing in flight and no message for the idle time is stopped, and its place
//! freed. When all places are taken, a new caller takes the place of the least recently used
//! child with nothing in flight of the tenant holding the most places (of its own tenant if
//! that holds as many): so one tenant (many agents, or callers who left) cannot keep another
//! out, while its own callers come and go. With nothing to take, the caller is refused
//! ([`StdioError::Busy`], a 503).
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
    tenant: u64,
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
        self.idle_since()
            .is_some_and(|since| since.elapsed() >= idle)
    }

    /// Since when it has had nothing to do; `None` while a call is in flight.
    fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        self.last.lock().ok().map(|last| *last)
    }
}

/// Starts the dispatcher of `spec` (whose `per_caller` is `Some`) on the current tokio runtime
/// and returns the workers' handle.
pub fn spawn(spec: StdioSpec, gate: Option<Arc<dyn PinGate>>) -> Handle {
    let (tx, rx) = mpsc::unbounded();
    let name: Arc<str> = Arc::from(spec.name.as_str());
    tokio::spawn(dispatch(spec, gate, rx));
    Handle {
        per_caller: true,
        ..Handle::new(tx, name)
    }
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
    // Kept `Some`: the child serves one caller (its supervisor offers it roots, and asks no
    // other caller what it asks).
    child_spec.per_caller = Some(1);
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
    let (who, message, events, done, sent) = match msg {
        // A caller that left already starts no child and takes no place in one's queue.
        ToChild::Request { done, .. } if done.is_canceled() => return,
        // Its place in the upstream's queue is given back here: it takes one in its child's.
        ToChild::Request {
            who,
            message,
            events,
            done,
            sent,
            ..
        } => (who, message, events, done, sent),
        // A notification or an answer for a child the caller does not have (stopped as idle,
        // say) has nobody to go to. One that goes waits in that child's own queue (its place in
        // the upstream's is given back): a caller whose child does not read fills only its own.
        ToChild::Notification {
            caller, message, ..
        } => {
            if let Some(c) = children.get(&caller) {
                c.activity.touch();
                c.handle.notify(caller, message);
            }
            return;
        }
        ToChild::Response {
            caller, message, ..
        } => {
            if let Some(c) = children.get(&caller) {
                c.activity.touch();
                c.handle.respond(caller, message);
            }
            return;
        }
    };
    let caller = who.caller;
    if !children.contains_key(&caller) && children.len() >= max as usize {
        match make_room(children, who.tenant) {
            Some(gone) => tracing::info!(upstream = %spec.name,
                caller = %format_args!("{gone:016x}"),
                "stdio child of one caller stopped to make room for a new caller"),
            None => {
                let _ = done.send(Err(StdioError::Busy(spec.name.clone(), max)));
                return;
            }
        }
    }
    let child = children.entry(caller).or_insert_with(|| {
        tracing::info!(upstream = %spec.name, caller = %format_args!("{caller:016x}"),
            "stdio child for a new caller");
        Child {
            handle: super::child::spawn(spec.clone(), gate.clone()),
            tenant: who.tenant,
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
    child.handle.forward(who, message, events, inner_done, sent);
}

/// Frees a place for a new caller of `tenant` (all places taken): stops the least recently
/// used child with nothing in flight of the tenant holding the most children, or of `tenant`
/// itself when it holds as many (or nobody else would give up one fairly). Returns whose child
/// it was; `None`: nothing may be taken.
fn make_room(children: &mut HashMap<Caller, Child>, tenant: u64) -> Option<Caller> {
    let mut held: HashMap<u64, usize> = HashMap::new();
    for c in children.values() {
        *held.entry(c.tenant).or_default() += 1;
    }
    let most = held.values().copied().max()?;
    let own = held.get(&tenant).copied().unwrap_or(0);
    let from = |t: u64| {
        children
            .iter()
            .filter(|(_, c)| c.tenant == t)
            .filter_map(|(caller, c)| Some((*caller, c.activity.idle_since()?)))
            .min_by_key(|(_, since)| *since)
            .map(|(caller, _)| caller)
    };
    let victim = if own >= most {
        from(tenant)
    } else {
        // The largest tenants, most first; the first with a child at rest gives it up.
        let mut largest: Vec<(u64, usize)> =
            held.into_iter().filter(|(_, n)| *n > own + 1).collect();
        largest.sort_unstable_by_key(|(_, n)| std::cmp::Reverse(*n));
        // (Taking from a tenant with one more than this one's would only swap them.)
        largest
            .into_iter()
            .find_map(|(t, _)| from(t))
            .or_else(|| from(tenant))
    }?;
    children.remove(&victim);
    Some(victim)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn children(held: &[(Caller, u64, bool, u64)]) -> HashMap<Caller, Child> {
        let (tx, _rx) = mpsc::unbounded();
        let now = Instant::now();
        held.iter()
            .map(|&(caller, tenant, busy, ago_ms)| {
                let child = Child {
                    handle: Handle::new(tx.clone(), Arc::from("s")),
                    tenant,
                    activity: Arc::new(Activity {
                        in_flight: AtomicUsize::new(usize::from(busy)),
                        last: std::sync::Mutex::new(now - Duration::from_millis(ago_ms)),
                    }),
                };
                (caller, child)
            })
            .collect()
    }

    #[test]
    fn a_full_pool_gives_a_place_fairly_between_tenants() {
        // Tenant 1 holds three places (caller 12 the least recently used at rest, 13 busy),
        // tenant 2 one.
        let held = [
            (11, 1, false, 10),
            (12, 1, false, 50),
            (13, 1, true, 90),
            (21, 2, false, 99),
        ];
        // A new tenant takes the largest tenant's least recently used child at rest.
        let mut c = children(&held);
        assert_eq!(make_room(&mut c, 3), Some(12));
        assert!(!c.contains_key(&12));
        // A caller of the largest tenant takes one of its own, never another tenant's.
        let mut c = children(&held);
        assert_eq!(make_room(&mut c, 1), Some(12));
        // Tenant 2 (one place against three) takes from tenant 1.
        let mut c = children(&held);
        assert_eq!(make_room(&mut c, 2), Some(12));
        // Nothing at rest in the tenant that should give: refused, nobody stopped.
        let mut c = children(&[(11, 1, true, 10), (12, 1, true, 50), (21, 2, true, 99)]);
        assert_eq!(make_room(&mut c, 3), None);
        assert_eq!(c.len(), 3);
        // Even shares: a new tenant is refused rather than make another poorer than itself
        // and then in turn take back.
        let mut c = children(&[(11, 1, false, 10), (21, 2, false, 10)]);
        assert_eq!(make_room(&mut c, 3), None);
        // One more than the caller's tenant: no swap, its own place at rest goes instead.
        let mut c = children(&[(11, 1, false, 10), (12, 1, false, 20), (21, 2, false, 30)]);
        assert_eq!(make_room(&mut c, 2), Some(21));
    }
}
