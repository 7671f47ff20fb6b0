//! Many clients on one child: the ids and tokens each client chose are rewritten on the way in
//! to ones the gateway chose, and back on the way out, so that concurrent clients never see
//! each other's answers however they number their requests.
//!
//! - A client's request gets a fresh numeric id; the answer gets the client's id back.
//! - A client's progress token (`params._meta.progressToken`) becomes the gateway's
//!   `"p<N>"`, so the child's progress notifications reach the client that asked for them.
//! - A client's `notifications/cancelled` names the gateway's id for its own request (a
//!   client can only cancel its own requests). Two requests in flight under one caller and
//!   one id (two anonymous clients both numbering from 1) cannot be told apart: a
//!   cancellation of that id reaches neither.
//! - A request from the child (sampling, elicitation; roots on a child of one caller) goes to
//!   the one client with a call in flight, under a fresh gateway id; the client's answer goes
//!   back under the child's id. With no call in flight, or several, the child is answered with
//!   an error: which client it meant cannot be known (run such servers one child per session).
//!   On a child shared by several callers the same holds while a call that ended at the
//!   gateway (timed out, or its client left) may still run in the child (for ten minutes
//!   after, at least the call timeout, or until the child answers it: a call told to cancel
//!   may work on, and ask later): its request would go to a bystander; and while
//!   another caller's task may still be working (no terminal status seen for it, for its time
//!   to live and [`WORKING_AT_MOST`] at most: a task's work goes on after its call was
//!   answered), unless the request names its task
//!   (`_meta["io.modelcontextprotocol/related-task"]`) and that task is the caller's. A shared
//!   child is offered no roots (a client's answer would set them for every caller: the
//!   filesystem server makes them its allowed folders), and of a client's notifications only
//!   its cancellations reach it. At most
//!   [`MAX_SERVER_REQUESTS`] wait for their answers, each with an id of at most
//!   [`MAX_SERVER_ID`] bytes: a child asks no more than that of the gateway's memory.
//! - A task (2025-11-25 `tasks/*`) is its creator's: the child binds tasks to its one session,
//!   which every client shares, so the gateway binds each task the child creates for a
//!   client's task-augmented request to that client's caller. `tasks/get`, `tasks/result`
//!   and `tasks/cancel` reach the child only for one of the caller's own tasks (any other is
//!   answered as not found, as the child answers an unknown one), and `tasks/list` answers
//!   list the caller's own tasks only. The last [`MAX_TASKS_PER_CALLER`] of each caller are
//!   kept, and [`MAX_TASKS`] in all (past which the caller holding the most loses its oldest);
//!   a task forgotten is nobody's, and so is every task of a child that stopped
//!   ([`Mux::child_started`]).
//!
//! Pure bookkeeping: no I/O, so each rule is tested alone.

use std::collections::{HashMap, VecDeque};

use serde_json::{Value, json};

/// Who a message is for or from: a key the caller chose per client.
pub type Caller = u64;

/// Requests from the child waiting for a client's answer, at most.
pub const MAX_SERVER_REQUESTS: usize = 64;
/// The longest id (as JSON) of a request from the child that the gateway keeps.
pub const MAX_SERVER_ID: usize = 256;
/// Tasks whose creator the gateway remembers, at most.
pub const MAX_TASKS: usize = 4096;
/// Of those, at most this many per caller: a caller's new task past it forgets the caller's own
/// oldest; past [`MAX_TASKS`], the caller holding the most loses its oldest, so no caller can
/// push out the tasks of one that holds fewer.
pub const MAX_TASKS_PER_CALLER: usize = 256;

/// What to do with a message read from the child.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// The final answer to a call (id restored).
    Done { call: u64, message: Value },
    /// Something for the client of a call in flight, before its answer (progress, a request
    /// from the child, a cancellation of one).
    Event { call: u64, message: Value },
    /// An answer to write back to the child (it asked something no client can answer).
    Reply(Value),
    /// A list the child serves changed (tools, resources, prompts): caches and pins must look
    /// again.
    ListChanged(String),
    /// Nothing to deliver (a log message, an answer nobody waits for any more).
    Drop(&'static str),
}

/// Why a client's message cannot be sent to the child.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a JSON-RPC object with a method, or a response without a known id.
    Malformed(&'static str),
    /// A `tasks/*` request naming a task that is not the caller's: answered with
    /// [`unknown_task`], as the child answers a task it does not know.
    UnknownTask,
}

/// The JSON-RPC error (-32602) the SDKs' servers give for a task they do not know: what a
/// client that names a task that is not its own is answered (here and in `mcp::tasks`).
pub const TASK_NOT_FOUND: &str = "Failed to retrieve task: Task not found";

/// What a client that names a task that is not its own is answered.
pub fn unknown_task(id: Value) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": -32602, "message": TASK_NOT_FOUND},
    })
}

/// Keeps, in a `tasks/list` answer, the tasks whose id `keep` says yes to (a task without a
/// string id goes), and no `nextCursor`: the TypeScript SDK's store pages over every caller's
/// tasks and names the next page by the last task on this one, so the cursor gave a caller
/// another's task id, which a caller may set itself to pick the page (an attacker's review read
/// another tenant's task result with it through another gateway of the fleet). A caller gets
/// its own tasks of the upstream's page, and no next page.
pub fn retain_listed_tasks(answer: &mut Value, mut keep: impl FnMut(&str) -> bool) {
    if let Some(result) = answer.get_mut("result").and_then(Value::as_object_mut) {
        result.remove("nextCursor");
        if let Some(list) = result.get_mut("tasks").and_then(Value::as_array_mut) {
            list.retain(|t| t["taskId"].as_str().is_some_and(&mut keep));
        }
    }
}

/// The id of the task an answer to a task-augmented request names: 2025-11-25's
/// `result.task.taskId`, or the 2026-07-28 tasks extension's `result.resultType: "task"` with
/// `result.taskId`.
pub fn created_task(answer: &Value) -> Option<&str> {
    let result = answer.get("result")?;
    result["task"]["taskId"]
        .as_str()
        .or_else(|| (result["resultType"] == "task").then(|| result["taskId"].as_str())?)
}

/// How long (ms) an answer to a task-augmented request says the task it names lives:
/// 2025-11-25's `result.task.ttl`, or `result.ttl`, or the 2026-07-28 tasks extension's
/// `result.ttlMs`.
pub fn task_ttl_ms(answer: &Value) -> Option<u64> {
    let result = answer.get("result")?;
    result["task"]["ttl"]
        .as_u64()
        .or_else(|| result["ttl"].as_u64())
        .or_else(|| result["ttlMs"].as_u64())
}

/// The task a message's `_meta` relates it to: `None` without the key, `Some(None)` with one
/// that names no task by a string id.
fn related_task(of: &Value) -> Option<Option<&str>> {
    of.get("_meta")
        .and_then(|m| m.get(RELATED_TASK))
        .map(|t| t.get("taskId").and_then(Value::as_str))
}

/// What a client's request asks that the answer must be read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asks {
    Plain,
    /// A task-augmented request: its answer names the task created for it.
    Task,
    /// `tasks/list`: its answer lists every client's tasks.
    TaskList,
}

/// The `_meta` key that relates a message to a task.
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// The `tasks/*` requests that name one task by `params.taskId`.
pub const TASK_METHODS: [&str; 4] = ["tasks/get", "tasks/result", "tasks/cancel", "tasks/update"];

struct Call {
    caller: Caller,
    /// The client's own id.
    id: Value,
    /// The client's own progress token and the gateway's, if it sent one.
    progress: Option<(Value, String)>,
    asks: Asks,
}

#[derive(Default)]
pub struct Mux {
    /// The child serves one caller (per-caller children): nothing it asks can reach another.
    one_caller: bool,
    /// Calls that ended at the gateway unanswered, until when the child may still run them.
    abandoned: HashMap<u64, std::time::Instant>,
    /// Counts ids only if the OS random source fails (see `fresh`).
    next: u64,
    /// Calls in flight by the gateway's id.
    calls: HashMap<u64, Call>,
    /// The gateway's ids for the calls in flight under the client's (caller, id): one,
    /// unless two clients the caller cannot tell apart chose the same id.
    by_client: HashMap<(Caller, String), Vec<u64>>,
    /// Progress tokens the gateway chose: the call each belongs to.
    tokens: HashMap<String, u64>,
    /// Requests from the child handed to a client: the gateway's id -> (child's id, caller,
    /// call).
    server_requests: HashMap<u64, (Value, Caller, u64)>,
    /// Tasks the child created for a client's request: whose each is, and the order they
    /// came in (the oldest is forgotten beyond [`MAX_TASKS`]).
    tasks: HashMap<String, Caller>,
    task_order: VecDeque<String>,
    /// How many of `tasks` each caller has.
    tasks_of: HashMap<Caller, usize>,
    /// Of `tasks`, those not known to have ended (no terminal status seen for them), until
    /// when they are taken to be working: their work may go on in the child, and ask a client
    /// something while another's call is the one in flight. For the task's time to live at
    /// most, and [`WORKING_AT_MOST`]: a caller that never asks about its task again cannot
    /// keep the child from asking every other caller for good.
    working: HashMap<String, std::time::Instant>,
}

/// A 2026-07-28 request carries its protocol version, client capabilities and client info in
/// `params._meta` under the reserved `io.modelcontextprotocol/` prefix; the child, initialized
/// once by the gateway in the session era, refuses such an envelope (the Python SDK does), and
/// what it says was said at `initialize`. Other `_meta` keys (a progress token, trace context)
/// stay.
pub fn strip_envelope(message: &mut serde_json::Map<String, Value>) {
    let Some(meta) = message
        .get_mut("params")
        .and_then(|p| p.get_mut("_meta"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    meta.retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
    if meta.is_empty()
        && let Some(params) = message.get_mut("params").and_then(Value::as_object_mut)
    {
        params.remove("_meta");
    }
}

fn key(v: &Value) -> String {
    v.to_string()
}

/// How long a task is taken to be working when no terminal status is seen for it.
pub const WORKING_AT_MOST: std::time::Duration = std::time::Duration::from_secs(600);

/// Calls remembered as abandoned, at most (each is a few bytes; more than this many at once
/// is a client leaving calls in a loop, and the child asks nobody anything meanwhile).
pub const MAX_ABANDONED: usize = 4096;

impl Mux {
    /// For a child shared by every caller.
    pub fn new() -> Self {
        Self::default()
    }

    /// For a child of one caller.
    pub fn for_one_caller() -> Self {
        Self {
            one_caller: true,
            ..Self::default()
        }
    }

    /// Forgets a call that ended at the gateway unanswered (timed out, or its client left):
    /// for `window` (or until the child answers it), the child's requests go to nobody.
    pub fn abandon(&mut self, call: u64, window: std::time::Duration) {
        if self.forget(call).is_none() || self.one_caller {
            return;
        }
        let now = std::time::Instant::now();
        self.abandoned.retain(|_, until| *until > now);
        if self.abandoned.len() < MAX_ABANDONED {
            self.abandoned.insert(call, now + window);
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// A fresh id for a call, its progress token, or a request from the child: random below
    /// 2^53 (a JavaScript server's numbers stay exact) and none in use. Counted up from 1,
    /// the next call's id was known to every caller, and a tool that printed a JSON-RPC answer
    /// carrying it to the child's stdout (its own output, or a subprocess's that inherits
    /// stdout) answered another tenant's call with its own text (an attacker's review).
    fn fresh(&mut self) -> u64 {
        loop {
            let id = getrandom::u64().unwrap_or_else(|_| {
                self.next += 1;
                self.next
            }) & ((1 << 53) - 1);
            if id != 0
                && !self.calls.contains_key(&id)
                && !self.server_requests.contains_key(&id)
                && !self.abandoned.contains_key(&id)
            {
                return id;
            }
        }
    }

    /// A client's request: returns the gateway's id for it (the call) and the message to write
    /// to the child.
    pub fn request(&mut self, caller: Caller, mut message: Value) -> Result<(u64, Value), Refused> {
        let Some(obj) = message.as_object_mut() else {
            return Err(Refused::Malformed("not a JSON-RPC object"));
        };
        let Some(id) = obj.get("id").cloned() else {
            return Err(Refused::Malformed("a request without an id"));
        };
        let Some(method) = obj.get("method").and_then(Value::as_str) else {
            return Err(Refused::Malformed("a request without a method"));
        };
        let params = obj.get("params");
        let asks = if method == "tasks/list" {
            Asks::TaskList
        } else if TASK_METHODS.contains(&method) {
            let task = params.and_then(|p| p.get("taskId")).and_then(Value::as_str);
            if task.and_then(|t| self.tasks.get(t)) != Some(&caller) {
                return Err(Refused::UnknownTask);
            }
            Asks::Plain
        } else if params.and_then(|p| p.get("task")).is_some() {
            Asks::Task
        } else {
            Asks::Plain
        };
        let call = self.fresh();
        obj.insert("id".into(), json!(call));
        strip_envelope(obj);
        let mut progress = None;
        if let Some(token) = obj
            .get_mut("params")
            .and_then(|p| p.get_mut("_meta"))
            .and_then(|m| m.get_mut("progressToken"))
        {
            let ours = format!("p{call}");
            progress = Some((std::mem::replace(token, json!(ours)), ours.clone()));
            self.tokens.insert(ours, call);
        }
        self.by_client
            .entry((caller, key(&id)))
            .or_default()
            .push(call);
        self.calls.insert(
            call,
            Call {
                caller,
                id,
                progress,
                asks,
            },
        );
        Ok((call, message))
    }

    /// A client's notification: the message to write to the child, if any.
    pub fn notification(&mut self, caller: Caller, mut message: Value) -> Option<Value> {
        let method = message.get("method")?.as_str()?.to_owned();
        match method.as_str() {
            // The gateway initialized the child itself, once.
            "notifications/initialized" => None,
            // A shared child has one session for every caller: a client's `roots/list_changed`
            // (say) would make it ask, and set, roots for all.
            m if !self.one_caller && m != "notifications/cancelled" => None,
            "notifications/cancelled" => {
                let params = message.get_mut("params")?;
                let theirs = params.get("requestId")?;
                // Two of this caller's requests under that id: which one is meant is unknown.
                let [call] = self.by_client.get(&(caller, key(theirs)))?[..] else {
                    return None;
                };
                params["requestId"] = json!(call);
                Some(message)
            }
            _ => Some(message),
        }
    }

    /// A client's answer to a request the child sent it: the message to write to the child.
    pub fn response(&mut self, caller: Caller, mut message: Value) -> Result<Value, Refused> {
        let ours = message
            .get("id")
            .and_then(Value::as_u64)
            .ok_or(Refused::Malformed("an answer to no request of the server"))?;
        match self.server_requests.get(&ours) {
            Some((_, owner, _)) if *owner == caller => {}
            _ => return Err(Refused::Malformed("an answer to no request of the server")),
        }
        let Some((theirs, _, _)) = self.server_requests.remove(&ours) else {
            return Err(Refused::Malformed("an answer to no request of the server"));
        };
        message["id"] = theirs;
        Ok(message)
    }

    /// Forgets a call (answered, timed out, or its client left); the requests the child sent
    /// to that client are forgotten too.
    pub fn forget(&mut self, call: u64) -> Option<Caller> {
        let c = self.calls.remove(&call)?;
        let k = (c.caller, key(&c.id));
        if let Some(calls) = self.by_client.get_mut(&k) {
            calls.retain(|x| *x != call);
            if calls.is_empty() {
                self.by_client.remove(&k);
            }
        }
        if let Some((_, ours)) = &c.progress {
            self.tokens.remove(ours);
        }
        self.server_requests.retain(|_, (_, _, of)| *of != call);
        Some(c.caller)
    }

    /// Every call in flight (to fail them all when the child dies).
    pub fn calls(&self) -> Vec<u64> {
        self.calls.keys().copied().collect()
    }

    /// A message the child wrote.
    pub fn inbound(&mut self, mut message: Value) -> Inbound {
        let method = message
            .get("method")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let has_id = message.get("id").is_some_and(|i| !i.is_null());
        match (method, has_id) {
            // An answer.
            (None, true) => {
                let Some(call) = message.get("id").and_then(Value::as_u64) else {
                    return Inbound::Drop("an answer with an id the gateway never sent");
                };
                let Some(c) = self.calls.get(&call) else {
                    if self.abandoned.remove(&call).is_some() {
                        return Inbound::Drop("an answer to a call that ended at the gateway");
                    }
                    return Inbound::Drop("an answer to no call in flight");
                };
                message["id"] = c.id.clone();
                let (caller, asks) = (c.caller, c.asks);
                self.forget(call);
                match asks {
                    Asks::Plain => {}
                    Asks::Task => self.created(caller, &message),
                    Asks::TaskList => self.only_own_tasks(caller, &mut message),
                }
                // After `created`: a task whose answer says it already ended is not working.
                self.note_ended(message.get("result"));
                Inbound::Done { call, message }
            }
            (None, false) => Inbound::Drop("neither a request, a notification nor an answer"),
            // A request of the child's own.
            (Some(method), true) => {
                let theirs = message["id"].clone();
                let refuse_with = |code: i64, why: &str| {
                    Inbound::Reply(json!({
                        "jsonrpc": "2.0",
                        "id": theirs,
                        "error": {"code": code, "message": why},
                    }))
                };
                let refuse = |why: &str| refuse_with(-32603, why);
                if !self.one_caller {
                    if method == "roots/list" {
                        return refuse_with(
                            -32601,
                            "roots are not offered to a stdio server that several callers share",
                        );
                    }
                    let now = std::time::Instant::now();
                    self.abandoned.retain(|_, until| *until > now);
                    if !self.abandoned.is_empty() {
                        return refuse(
                            "the gateway cannot tell which client this request is for (a call that ended at the gateway may still run here); run this server with one child per session",
                        );
                    }
                }
                if self.server_requests.len() >= MAX_SERVER_REQUESTS {
                    return refuse("too many requests to clients wait for an answer");
                }
                if key(&theirs).len() > MAX_SERVER_ID {
                    return refuse("a request id longer than the gateway keeps");
                }
                let mut flying = self.calls.iter();
                let (call, caller) = match (flying.next(), flying.next()) {
                    (Some((call, c)), None) => (*call, c.caller),
                    _ => {
                        return refuse(
                            "the gateway cannot tell which client this request is for (no call, or several, in flight); run this server with one child per session",
                        );
                    }
                };
                // A task's work goes on after its call was answered: on a shared child, a
                // request may be that work's, for the task's creator and not for the client
                // whose call happens to be in flight. One that names its task goes only to
                // that task's creator; one that does not, only while no other caller's task
                // may still be working.
                if !self.one_caller {
                    let related = message.get("params").and_then(related_task);
                    let now = std::time::Instant::now();
                    self.working.retain(|_, until| *until > now);
                    let for_caller = match related {
                        Some(task) => task.is_some_and(|t| self.tasks.get(t) == Some(&caller)),
                        None => !self
                            .working
                            .keys()
                            .any(|t| self.tasks.get(t).is_some_and(|owner| *owner != caller)),
                    };
                    if !for_caller {
                        return refuse(
                            "the gateway cannot tell which client this request is for (another caller's task may be working in this child); run this server with one child per session",
                        );
                    }
                }
                let ours = self.fresh();
                self.server_requests.insert(ours, (theirs, caller, call));
                message["id"] = json!(ours);
                Inbound::Event { call, message }
            }
            (Some(method), false) => self.inbound_notification(&method, message),
        }
    }

    /// The answer to `caller`'s task-augmented request: the task it names is the caller's.
    fn created(&mut self, caller: Caller, answer: &Value) {
        let Some(task) = created_task(answer) else {
            return;
        };
        if self.tasks.contains_key(task) {
            // A child that gives one id twice: the task is nobody's.
            if let Some(at) = self.task_order.iter().position(|t| t == task) {
                self.forget_task(at);
            }
            return;
        }
        if self.tasks_of.get(&caller).copied().unwrap_or(0) >= MAX_TASKS_PER_CALLER
            && let Some(at) = self
                .task_order
                .iter()
                .position(|t| self.tasks.get(t) == Some(&caller))
        {
            self.forget_task(at);
        }
        self.tasks.insert(task.to_owned(), caller);
        let ttl = task_ttl_ms(answer).map_or(WORKING_AT_MOST, std::time::Duration::from_millis);
        self.working.insert(
            task.to_owned(),
            std::time::Instant::now() + ttl.min(WORKING_AT_MOST),
        );
        self.task_order.push_back(task.to_owned());
        *self.tasks_of.entry(caller).or_default() += 1;
        // Past the cap, the caller holding the most loses its own oldest: a caller with few
        // tasks keeps them however many others make.
        while self.task_order.len() > MAX_TASKS {
            let Some((&heaviest, _)) = self.tasks_of.iter().max_by_key(|(_, n)| **n) else {
                break;
            };
            let Some(at) = self
                .task_order
                .iter()
                .position(|t| self.tasks.get(t) == Some(&heaviest))
            else {
                self.forget_task(0);
                continue;
            };
            self.forget_task(at);
        }
    }

    /// Forgets the task at `at` of `task_order`.
    fn forget_task(&mut self, at: usize) {
        let Some(task) = self.task_order.remove(at) else {
            return;
        };
        self.working.remove(&task);
        if let Some(owner) = self.tasks.remove(&task)
            && let Some(n) = self.tasks_of.get_mut(&owner)
        {
            *n -= 1;
            if *n == 0 {
                self.tasks_of.remove(&owner);
            }
        }
    }

    /// A new child process: the tasks of the one before are gone with it (a new one may give
    /// the same ids to other callers).
    pub fn child_started(&mut self) {
        self.abandoned.clear();
        self.tasks.clear();
        self.task_order.clear();
        self.tasks_of.clear();
        self.working.clear();
    }

    /// Tasks a child's answer or status notification (`of`: its `result` or `params`) shows
    /// ended: a task's status (`tasks/get`, `tasks/cancel`, the status notification), each
    /// listed in `tasks/list`, and the task a `tasks/result` answer is the result of.
    fn note_ended(&mut self, of: Option<&Value>) {
        let Some(of) = of else { return };
        let ended = |t: &Value| {
            matches!(
                t.get("status").and_then(Value::as_str),
                Some("completed" | "failed" | "cancelled")
            )
        };
        let mut done: Vec<&str> = Vec::new();
        // A task's own status, or (2025-11-25, creating it) `result.task`'s.
        for t in [Some(of), of.get("task")].into_iter().flatten() {
            if ended(t)
                && let Some(id) = t.get("taskId").and_then(Value::as_str)
            {
                done.push(id);
            }
        }
        if let Some(list) = of.get("tasks").and_then(Value::as_array) {
            done.extend(
                list.iter()
                    .filter(|t| ended(t))
                    .filter_map(|t| t.get("taskId").and_then(Value::as_str)),
            );
        }
        if let Some(Some(t)) = related_task(of) {
            done.push(t);
        }
        for t in done {
            self.working.remove(t);
        }
    }

    /// A `tasks/list` answer, with the tasks that are not `caller`'s taken out.
    fn only_own_tasks(&self, caller: Caller, answer: &mut Value) {
        retain_listed_tasks(answer, |id| self.tasks.get(id) == Some(&caller));
    }

    fn inbound_notification(&mut self, method: &str, mut message: Value) -> Inbound {
        match method {
            "notifications/progress" => {
                let Some(ours) = message
                    .get("params")
                    .and_then(|p| p.get("progressToken"))
                    .and_then(Value::as_str)
                else {
                    return Inbound::Drop("progress for a token the gateway never sent");
                };
                let Some(&call) = self.tokens.get(ours) else {
                    return Inbound::Drop("progress for no call in flight");
                };
                let Some((theirs, _)) = self.calls.get(&call).and_then(|c| c.progress.clone())
                else {
                    return Inbound::Drop("progress for no call in flight");
                };
                message["params"]["progressToken"] = theirs;
                Inbound::Event { call, message }
            }
            "notifications/cancelled" => {
                // The child withdraws a request it sent a client.
                let Some(ours) = message
                    .get("params")
                    .and_then(|p| p.get("requestId"))
                    .and_then(Value::as_u64)
                else {
                    return Inbound::Drop("a cancellation of no request");
                };
                let Some((_, _, call)) = self.server_requests.remove(&ours) else {
                    return Inbound::Drop("a cancellation of no request");
                };
                Inbound::Event { call, message }
            }
            "notifications/tasks/status" => {
                self.note_ended(message.get("params"));
                Inbound::Drop("a task's status, for no client in particular")
            }
            "notifications/tools/list_changed"
            | "notifications/resources/list_changed"
            | "notifications/prompts/list_changed" => Inbound::ListChanged(method.to_owned()),
            _ => Inbound::Drop("a notification for no client"),
        }
    }
}

#[cfg(test)]
#[path = "mux_tests.rs"]
mod tests;
