//! Tasks (2025-11-25 task augmentation, and the 2026-07-28 tasks extension) on an HTTP upstream
//! that cannot tell the gateway's callers apart: a request without a session reaches it with
//! the gateway's one credential, and a server binds a task to the session or credential it
//! came with (the TypeScript SDK's store gives a task created without a session to every
//! caller without one). So the gateway binds each task the upstream creates for a caller's
//! task-augmented request to that caller, as the stdio mux does for a shared child: another
//! caller's `tasks/get`, `tasks/result`, `tasks/cancel` or `tasks/update` is answered as an
//! unknown task and never reaches the upstream, and `tasks/list` answers keep the caller's own
//! tasks only. So does a session the gateway holds for stateless clients (`held`), which the
//! tenant's callers share. On a client's own passthrough session the upstream scopes tasks to
//! the session, but one that also takes requests without a session may list those tasks on
//! every session (the TypeScript SDK's store does): there a task bound to another caller is
//! unknown, and `tasks/list` keeps only what this gateway bound to the caller (a task made
//! through another gateway of a fleet, or before a restart, is not known here to be anyone's,
//! so it is not listed; it can still be asked about by its id).
//!
//! A task is remembered for its time to live (the answer's, or `params.task.ttl`; an hour when
//! neither says; at least a minute and at most a day; counted again from each question its
//! owner asks about it); at most [`MAX_PER_CALLER`] per caller,
//! [`MAX_PER_TENANT`] per tenant (one tenant's many callers cannot fill the table for the
//! others) and [`MAX_TASKS`] in all, past which a caller's new task-augmented request is
//! refused (429) rather than another's forgotten.
//!
//! A task is its call's work going on: it holds the concurrency slots its call was admitted
//! with (a tool's, a tenant's, an agent's cap) until the gateway sees it end, as a call holds
//! them until its answer. Without this a task-augmented call gave its slots back as soon as the
//! upstream named the task, at once, and calls of a tool capped at one ran five at once at the
//! TypeScript SDK's server. The gateway sees a task end in its owner's `tasks/result` answered
//! with a result, or a `tasks/get` answer or `tasks/list` entry that says `completed` or
//! `failed`; else its slots go back [`MAX_HOLD_S`] after it was made, whatever its time to
//! live, so that a caller that never asks again does not hold a cap for good. `cancelled` is
//! not an end here: the TypeScript SDK's server marks a task cancelled and leaves its work
//! running (a review: a cap of one had five tasks working after four cancels). A call that may
//! have made a task whose answer the gateway never read (its client left first) holds its
//! slots as long.

use serde_json::Value;

use crate::policy::limits::{InFlight, Kept};
use crate::stdio::Who;

use crate::stdio::mux::retain_listed_tasks;
/// The `tasks/*` requests that name one task by `params.taskId`, and the task an answer to a
/// task-augmented request names: as the stdio mux reads them.
pub use crate::stdio::mux::{
    TASK_METHODS as NAMING, created_task as created, task_ttl_ms as ttl_ms,
};

pub const MAX_TASKS: usize = 131_072;
pub const MAX_PER_CALLER: usize = 1_024;
pub const MAX_PER_TENANT: usize = MAX_TASKS / 16;
const MIN_TTL_S: u64 = 60;
const MAX_TTL_S: u64 = 86_400;
const DEFAULT_TTL_S: u64 = 3_600;
/// Longest a task holds its call's concurrency slots (as a shared stdio child's task keeps
/// its caller's messages: `stdio::mux`).
pub const MAX_HOLD_S: u64 = 600;
/// The statuses after which a task does no more work (2025-11-25 `Task.status`): not
/// `cancelled`, which a server may say of a task whose work goes on.
const FINAL: [&str; 2] = ["completed", "failed"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    caller: u64,
    tenant: u64,
    /// Unix seconds after which the task is forgotten: its time to live after it was made, or
    /// after its owner last asked about it (the SDK's store counts a task's time to live again
    /// from when it finished).
    until: u64,
    ttl: u64,
}

/// Who created each task, by `<upstream>\0<task id>`; shared by the workers.
#[derive(Debug, Default)]
pub struct Owners {
    map: papaya::HashMap<String, Owner>,
    /// Tasks bound to each caller and tenant, and the room held for their calls under way.
    per_caller: papaya::HashMap<u64, usize>,
    per_tenant: papaya::HashMap<u64, usize>,
    /// Room held for calls under way, in all.
    held: std::sync::atomic::AtomicUsize,
    /// The concurrency slots each task holds (its call's), by the key of `map`; and those of
    /// calls whose answer was never read, by a key of their own.
    slots: papaya::HashMap<String, Hold>,
    /// Numbers the keys of holds of unread answers.
    unread: std::sync::atomic::AtomicU64,
}

/// A task's concurrency slots, until the gateway sees it end or `until` (Unix seconds).
#[derive(Debug)]
struct Hold {
    slots: Vec<Kept>,
    until: u64,
}

impl Hold {
    /// Its slots go back (by whoever took the hold out of the map: once).
    fn give_back(&self) {
        self.slots.iter().for_each(Kept::give_back);
    }
}

/// Room for one task, held from a task-augmented call until its answer binds the task it
/// names (or names none: then the room goes back when this is dropped). It counts against the
/// caller's and the tenant's share from the moment the call is let through, so calls made at
/// once cannot pass a share by their number.
#[derive(Debug)]
pub struct Room<'a> {
    owners: &'a Owners,
    who: Who,
    /// Taken by a task bound in it.
    taken: std::cell::Cell<bool>,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        self.owners
            .held
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if !self.taken.get() {
            self.owners.uncount(self.who);
        }
    }
}

impl Owner {
    fn who(&self) -> Who {
        Who {
            caller: self.caller,
            tenant: self.tenant,
        }
    }
}

fn key(upstream: &str, task: &str) -> String {
    format!("{upstream}\0{task}")
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Owners {
    /// Room for another task of `who`'s, if its caller has fewer than [`MAX_PER_CALLER`] tasks
    /// and calls under way, its tenant fewer than [`MAX_PER_TENANT`], and there is room in
    /// all; forgets tasks past their time first when it has to. Counted first and checked
    /// after, so that workers asking at once cannot all pass on the same last place.
    pub fn reserve(&self, who: Who) -> Option<Room<'_>> {
        use std::sync::atomic::Ordering::Relaxed;
        let take = || {
            let held = self.held.fetch_add(1, Relaxed) + 1;
            let caller = *self
                .per_caller
                .pin()
                .update_or_insert(who.caller, |n| n + 1, 1);
            let tenant = *self
                .per_tenant
                .pin()
                .update_or_insert(who.tenant, |n| n + 1, 1);
            let room = Room {
                owners: self,
                who,
                taken: std::cell::Cell::new(false),
            };
            let fits = self.map.len() + held <= MAX_TASKS
                && caller <= MAX_PER_CALLER
                && tenant <= MAX_PER_TENANT;
            fits.then_some(room)
        };
        take().or_else(|| {
            self.forget_expired();
            take()
        })
    }

    /// The task `task` of `upstream` is the room's caller's, for `ttl_ms` (the answer's, or the
    /// request's; an hour when neither says), and holds `slots` (its call's concurrency slots)
    /// until it is seen ended, [`MAX_HOLD_S`] at most (a time to live, the client's to choose,
    /// does not shorten it).
    pub fn bind(
        &self,
        upstream: &str,
        task: &str,
        room: &Room<'_>,
        ttl_ms: Option<u64>,
        slots: Vec<InFlight>,
    ) {
        let Who { caller, tenant } = room.who;
        let ttl = ttl_ms
            .map_or(DEFAULT_TTL_S, |ms| ms.div_ceil(1000))
            .clamp(MIN_TTL_S, MAX_TTL_S);
        let now = now_s();
        let owner = Owner {
            caller,
            tenant,
            until: now + ttl,
            ttl,
        };
        let map = self.map.pin();
        match map.get(&key(upstream, task)) {
            // An id the upstream gives twice: the task is nobody's (and the room goes back).
            // The first call's slots stay held (an upstream that gives a running job again to
            // whoever asks for it alike would free them for the second caller); the second's
            // go back with it.
            Some(o) if o.caller != caller => {
                self.uncount(o.who());
                map.insert(
                    key(upstream, task),
                    Owner {
                        caller: 0,
                        tenant: 0,
                        ..owner
                    },
                );
            }
            // Counted already (an answer read twice, or an id given again to its caller).
            Some(_) => {
                map.insert(key(upstream, task), owner);
            }
            None if room.taken.get() => {}
            None => {
                map.insert(key(upstream, task), owner);
                room.taken.set(true);
                // A hold left under this key (a task forgotten, then named again) stays.
                self.hold(key(upstream, task), slots, now, MAX_HOLD_S);
            }
        }
    }

    /// `slots` held under `key` until `for_s` from `now` or their release; nothing when there
    /// are none (no cap counted the call). When a hold is under `key` already, `slots` go back.
    fn hold(&self, key: String, slots: Vec<InFlight>, now: u64, for_s: u64) {
        if slots.is_empty() {
            return;
        }
        let hold = Hold {
            slots: slots.into_iter().filter_map(InFlight::keep).collect(),
            until: now + for_s,
        };
        if let Err(taken) = self.slots.pin().try_insert(key, hold) {
            taken.not_inserted.give_back();
        }
    }

    /// The slots of a call that may have made a task whose answer the gateway never read (its
    /// client left first): held [`MAX_HOLD_S`], as a task's would be.
    pub fn hold_unread(&self, slots: Vec<InFlight>) {
        let n = self
            .unread
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hold(format!("\0unread\0{n}"), slots, now_s(), MAX_HOLD_S);
    }

    /// The slots of a call that may run on upstream after its client was cut for a ban or deny:
    /// its exchange is closed, which the upstream is not said to read as a cancellation
    /// (`Obs::runs_on`). Held `for_s` (the longer of the upstream's response and stream idle
    /// timeouts: as long as the call would have been waited for), so that a caller cannot free
    /// its slot by drawing a ban.
    pub fn hold_cut(&self, slots: Vec<InFlight>, for_s: u64) {
        let n = self
            .unread
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.hold(format!("\0cut\0{n}"), slots, now_s(), for_s);
    }

    /// Whether task `task` of `upstream` holds concurrency slots (then what is asked of it is
    /// read, for its end).
    pub fn holds(&self, upstream: &str, task: &str) -> bool {
        self.slots.pin().contains_key(&key(upstream, task))
    }

    /// The task ended (or is no more): its slots go back, once.
    pub fn release(&self, upstream: &str, task: &str) {
        self.release_key(&key(upstream, task));
    }

    fn release_key(&self, key: &str) {
        if let Some(hold) = self.slots.pin().remove(key) {
            hold.give_back();
        }
    }

    /// What an answer about task `task` says of its end: a task it shows (a `tasks/get` or
    /// `tasks/cancel` answer, a `tasks/list` entry) with a final status ended.
    pub fn release_if_final(&self, upstream: &str, task: &str, shown: &Value) {
        let status = shown["status"]
            .as_str()
            .or_else(|| shown["task"]["status"].as_str());
        if status.is_some_and(|s| FINAL.contains(&s)) {
            self.release(upstream, task);
        }
    }

    /// Gives back the slots of tasks held past their time. Swept by every worker once a second
    /// (a few entries: a task holds slots only under a concurrency cap).
    pub fn release_expired(&self) {
        self.release_expired_at(now_s());
    }

    fn release_expired_at(&self, now: u64) {
        let expired: Vec<String> = self
            .slots
            .pin()
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.release_key(&k);
        }
    }

    /// Whether `caller` created `task` of `upstream` (and it has not been forgotten); if so, it
    /// is kept for its time to live from now.
    pub fn owns(&self, upstream: &str, task: &str, caller: u64) -> bool {
        let now = now_s();
        let map = self.map.pin();
        let k = key(upstream, task);
        let owned = map
            .get(&k)
            .is_some_and(|o| o.caller == caller && caller != 0 && o.until > now);
        if owned {
            map.update(k, |o| Owner {
                until: now + o.ttl,
                ..*o
            });
        }
        owned
    }

    /// Whether `task` of `upstream` was made for another caller than `caller` (or is nobody's):
    /// asked about on a client's own session, where an upstream may show tasks made without
    /// one (the TypeScript SDK's store gives those to every session).
    pub fn foreign(&self, upstream: &str, task: &str, caller: u64) -> bool {
        self.map
            .pin()
            .get(&key(upstream, task))
            .is_some_and(|o| o.caller != caller || caller == 0)
    }

    /// A `tasks/list` answer with only `caller`'s tasks of `upstream`; those of them it shows
    /// ended give their slots back.
    pub fn keep_own(&self, upstream: &str, caller: u64, answer: &mut Value) {
        retain_listed_tasks(answer, |id| self.owns(upstream, id, caller));
        if let Some(tasks) = answer["result"]["tasks"].as_array() {
            for t in tasks {
                if let Some(id) = t["taskId"].as_str() {
                    self.release_if_final(upstream, id, t);
                }
            }
        }
    }

    /// A task of `who`'s (or a room it held) no longer counts against it.
    fn uncount(&self, who: Who) {
        self.per_caller
            .pin()
            .update(who.caller, |n| n.saturating_sub(1));
        self.per_tenant
            .pin()
            .update(who.tenant, |n| n.saturating_sub(1));
    }

    fn forget_expired(&self) {
        let now = now_s();
        let map = self.map.pin();
        let expired: Vec<(String, Owner)> = map
            .iter()
            .filter(|(_, o)| o.until <= now)
            .map(|(k, o)| (k.clone(), *o))
            .collect();
        for (k, o) in expired {
            // Its slots, if it holds any, stay held until their own time.
            if map.remove(&k).is_some() {
                self.uncount(o.who());
            }
        }
    }
}

/// `message` without the tasks extension among its client capabilities (2026-07-28, in
/// `params._meta`): its server then answers it without a task. Capabilities or extensions
/// that are not an object (which a server may still read the key in) go whole.
pub fn without_tasks_extension(message: &mut Value) {
    use super::jsonrpc::{CLIENT_CAPABILITIES_META_KEY, TASKS_EXTENSION};
    let Some(meta) = message
        .pointer_mut("/params/_meta")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let Some(capabilities) = meta.get_mut(CLIENT_CAPABILITIES_META_KEY) else {
        return;
    };
    let Some(capabilities) = capabilities.as_object_mut() else {
        meta.remove(CLIENT_CAPABILITIES_META_KEY);
        return;
    };
    match capabilities
        .get_mut("extensions")
        .map(|e| e.as_object_mut())
    {
        Some(Some(extensions)) => {
            extensions.remove(TASKS_EXTENSION);
        }
        Some(None) => {
            capabilities.remove("extensions");
        }
        None => {}
    }
}

/// What a caller that names a task not its own is answered: what the SDKs' servers answer for
/// a task they do not know.
pub fn unknown(id: Option<super::Id>) -> super::RpcError {
    super::RpcError::new(-32602, crate::stdio::mux::TASK_NOT_FOUND, 200).with_id(id)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Caller `caller` of tenant 1.
    fn who(caller: u64) -> Who {
        Who { caller, tenant: 1 }
    }

    /// A call of `who`'s let through, whose answer names `task`.
    fn made(o: &Owners, task: &str, who: Who, ttl_ms: Option<u64>) {
        let room = o.reserve(who).expect("room");
        o.bind("u", task, &room, ttl_ms, Vec::new());
    }

    #[test]
    fn a_task_is_its_creators_for_its_time_to_live() {
        let o = Owners::default();
        assert_eq!(
            created(&json!({"result": {"task": {"taskId": "t1"}}})),
            Some("t1")
        );
        assert_eq!(
            created(&json!({"result": {"resultType": "task", "taskId": "t2"}})),
            Some("t2")
        );
        assert_eq!(created(&json!({"result": {"content": []}})), None);
        made(&o, "t1", who(7), Some(60_000));
        assert!(o.owns("u", "t1", 7));
        assert!(!o.owns("u", "t1", 8), "another caller");
        assert!(!o.owns("v", "t1", 7), "another upstream");
        assert!(!o.owns("u", "t2", 7), "never bound");
        // The upstream gives the same id to another caller's task: nobody's.
        made(&o, "t1", who(8), None);
        assert!(!o.owns("u", "t1", 7) && !o.owns("u", "t1", 8));
        let mut list =
            json!({"result": {"tasks": [{"taskId": "a"}, {"taskId": "b"}, {"taskId": "c"}]}});
        made(&o, "a", who(7), None);
        made(&o, "c", who(8), None);
        o.keep_own("u", 7, &mut list);
        assert_eq!(list["result"]["tasks"], json!([{"taskId": "a"}]));
        assert!(o.foreign("u", "t1", 7), "nobody's is foreign to all");
        assert!(!o.foreign("u", "never-bound", 7));
    }

    #[test]
    fn a_caller_has_room_for_its_own_tasks_only() {
        let o = Owners::default();
        for i in 0..MAX_PER_CALLER {
            made(&o, &format!("t{i}"), who(1), Some(60_000));
        }
        assert!(o.reserve(who(1)).is_none(), "full for its creator");
        assert!(o.reserve(who(2)).is_some(), "others are not pushed out");
        // An id the upstream gives again to another caller is nobody's, and no longer counts
        // against its first creator.
        made(&o, "t0", who(2), None);
        assert!(!o.owns("u", "t0", 1) && !o.owns("u", "t0", 2));
        assert!(o.reserve(who(1)).is_some());
        assert_eq!(
            ttl_ms(&json!({"result": {"task": {"taskId": "x", "ttl": 5000}}})),
            Some(5000)
        );
    }

    #[test]
    fn one_tenants_callers_cannot_fill_the_table_for_the_others() {
        let o = Owners::default();
        let mut made = 0;
        'callers: for caller in 1.. {
            for i in 0..MAX_PER_CALLER {
                let w = who(caller);
                let Some(room) = o.reserve(w) else {
                    break 'callers;
                };
                o.bind(
                    "u",
                    &format!("{caller}-{i}"),
                    &room,
                    Some(60_000),
                    Vec::new(),
                );
                made += 1;
            }
        }
        assert_eq!(made, MAX_PER_TENANT, "the tenant's share, over its callers");
        let other = Who {
            caller: 99_999,
            tenant: 2,
        };
        assert!(o.reserve(other).is_some(), "another tenant still has room");
    }

    /// A task of a tool capped at one holds the cap until it is seen ended: a `tasks/get` that
    /// says `completed`, a `tasks/list` entry that says `failed`, or ten minutes passed; not a
    /// status that works on, not `cancelled` (a server may say it of work that goes on), not a
    /// short time to live, nor another caller given the same task id.
    #[test]
    fn a_task_holds_its_calls_slots_until_it_is_seen_ended() {
        use crate::policy::limits::State;
        let state = std::sync::Arc::new(State::default());
        let o = Owners::default();
        let cap = 11;
        let task = |name: &str, caller: u64, cap: u64| {
            let slot = state.enter(cap, 1).expect("the cap is free");
            let room = o.reserve(who(caller)).expect("room");
            o.bind("u", name, &room, Some(1), vec![slot]);
        };
        task("t1", 1, cap);
        assert!(o.holds("u", "t1"));
        assert!(state.enter(cap, 1).is_none(), "the task holds the cap");
        for status in ["working", "input_required", "cancelled"] {
            o.release_if_final("u", "t1", &json!({"taskId": "t1", "status": status}));
            assert_eq!(state.in_flight_here(cap), 1, "{status}: still held");
        }
        o.release_if_final("u", "t1", &json!({"taskId": "t1", "status": "completed"}));
        assert!(!o.holds("u", "t1"));
        o.release_if_final("u", "t1", &json!({"taskId": "t1", "status": "completed"}));
        assert_eq!(state.in_flight_here(cap), 0, "given back once");
        // Listed ended.
        task("t2", 1, cap);
        let mut list = json!({"result": {"tasks": [{"taskId": "t2", "status": "failed"}]}});
        o.keep_own("u", 1, &mut list);
        assert_eq!(state.in_flight_here(cap), 0);
        // Held ten minutes, whatever the time to live (1 ms asked).
        task("t3", 1, cap);
        o.release_expired_at(now_s() + MIN_TTL_S + 1);
        assert_eq!(state.in_flight_here(cap), 1, "a short time to live");
        o.release_expired_at(now_s() + MAX_HOLD_S);
        assert_eq!(state.in_flight_here(cap), 0);
        // The upstream names the same task for another caller: nobody's. The first call's
        // slot stays held; the second's goes back.
        task("t4", 1, cap);
        task("t4", 2, 12);
        assert_eq!(state.in_flight_here(cap), 1);
        assert_eq!(state.in_flight_here(12), 0);
        o.release_expired_at(now_s() + MAX_HOLD_S);
        assert_eq!(state.in_flight_here(cap), 0);
        // A call whose answer was never read holds its slot as long; one whose answer named no
        // task gives it back with its request.
        o.hold_unread(vec![state.enter(cap, 1).expect("free")]);
        assert!(state.enter(cap, 1).is_none());
        o.release_expired_at(now_s() + MAX_HOLD_S);
        drop(state.enter(cap, 1).expect("free"));
        assert_eq!(state.in_flight_here(cap), 0);
        // A call closed as its client was cut holds its slot as long as it was given.
        o.hold_cut(vec![state.enter(cap, 1).expect("free")], 30);
        o.release_expired_at(now_s() + 29);
        assert!(state.enter(cap, 1).is_none());
        o.release_expired_at(now_s() + 30);
        drop(state.enter(cap, 1).expect("free"));
        assert_eq!(state.in_flight_here(cap), 0);
        // Without the tasks extension: a member makes no task of its own choosing.
        let mut m = json!({"params": {"_meta": {"io.modelcontextprotocol/clientCapabilities":
            {"extensions": {"io.modelcontextprotocol/tasks": {}, "x/y": {}}}}}});
        without_tasks_extension(&mut m);
        assert_eq!(
            m["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"]["extensions"],
            json!({"x/y": {}})
        );
        let mut m = json!({"params": {"_meta": {"io.modelcontextprotocol/clientCapabilities":
            ["io.modelcontextprotocol/tasks"], "k": 1}}});
        without_tasks_extension(&mut m);
        assert_eq!(m["params"]["_meta"], json!({"k": 1}));
        for extensions in [json!(["io.modelcontextprotocol/tasks"]), json!("x")] {
            let mut m = json!({"params": {"_meta": {"io.modelcontextprotocol/clientCapabilities":
                {"extensions": extensions, "roots": {}}}}});
            without_tasks_extension(&mut m);
            assert_eq!(
                m["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"],
                json!({"roots": {}})
            );
        }
    }

    #[test]
    fn calls_under_way_hold_their_room_until_answered() {
        let o = Owners::default();
        // As many calls at once as the caller may have tasks: each holds a place.
        let rooms: Vec<Room<'_>> = (0..MAX_PER_CALLER)
            .map(|_| o.reserve(who(1)).expect("room"))
            .collect();
        assert!(
            o.reserve(who(1)).is_none(),
            "the calls under way fill the share"
        );
        assert!(o.reserve(who(2)).is_some(), "not another caller's");
        // One answer names no task: its place goes back. Another names one: it stays taken.
        let mut rooms = rooms.into_iter();
        drop(rooms.next());
        let room = o.reserve(who(1)).expect("a place given back");
        o.bind("u", "t", &room, None, Vec::new());
        drop(room);
        assert!(o.owns("u", "t", 1));
        assert!(
            o.reserve(who(1)).is_none(),
            "the bound task keeps its place"
        );
        drop(rooms);
        assert!(o.reserve(who(1)).is_some());
        assert_eq!(o.held.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
