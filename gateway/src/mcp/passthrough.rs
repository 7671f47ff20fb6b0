//! forward, on a passthrough route: the path a request takes to the route's one upstream,
//! chosen by the upstream's transport and by the protocol eras the client and the upstream
//! speak ([`Path`]). Each path but stdio's (a call into `stdio_route`) is a method of [`Pass`]
//! here; what each does with the upstream lives in its own module (`bridge`, `held`,
//! `relay`).
//!
//! Where the upstream cannot tell the gateway's callers apart (see `tasks`), a message about
//! tasks is decided here before it is sent ([`TaskUse`]).

use std::net::SocketAddr;

use super::{
    Kind, Message, RpcError,
    proxy::{
        Obs, Session, Verified, filtered_tools_list, json_response, reads_tool_lists, resumes_from,
        trace_id, upstream_request, visible, who_calls,
    },
    relay,
    stages::Messages,
    worker::WorkerCtx,
};
use crate::{
    config::{Upstream, UpstreamEra},
    http::{Io, Request},
    policy::{self, Policy, TenantPolicy},
    stats::Outcome,
};

/// The way to the upstream, in the order it is decided.
enum Path<'m> {
    /// A child process, through its mux.
    Stdio,
    /// A session-era client and an upstream that speaks only the stateless era (known now, or
    /// when the client's session was opened: a bridged session stays bridged).
    Bridged,
    /// A lone message POSTed by a stateless client, and an upstream that may speak only the
    /// session era: whether it is known to (`Some(true)`) or not yet known either way
    /// (`None`).
    Held(&'m Message, Option<bool>),
    /// The client's own era, as it came.
    Direct,
}

/// What every path reads of the request.
struct Pass<'c, 'a> {
    req: &'a Request,
    peer: SocketAddr,
    ctx: &'a WorkerCtx,
    policy: &'c Policy,
    up: &'c Upstream,
    tenant: &'c TenantPolicy,
    messages: &'a Messages,
    obs: &'a Obs<'c>,
    /// The client's session, as `check` verified it (it refused one not the caller's).
    session: Option<Session<'a>>,
    /// Whether the client speaks the stateless era (2026-07-28).
    stateless: bool,
}

/// forward, on a passthrough route. Every path but the direct one is boxed: a request's future
/// is as large as its largest path (and a federation's, in `stages`), and it is allocated and
/// moved whole for every request. The direct path stays inline, the others cost one
/// allocation.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    policy: &'c Policy,
    up: &'c Upstream,
    tenant: &'c TenantPolicy,
    messages: &Messages,
    verified: Option<Verified>,
    obs: &Obs<'c>,
) -> bool {
    let pass = Pass {
        req,
        peer,
        ctx,
        policy,
        up,
        tenant,
        messages,
        obs,
        session: verified.and_then(|v| v.session(req.header(crate::http::name::MCP_SESSION_ID)?)),
        stateless: super::headers::is_modern(req, messages.single.as_ref()),
    };
    obs.runs_on.set(pass.runs_on());
    match pass.path() {
        Path::Stdio => {
            Box::pin(super::stdio_route::forward(
                io,
                req,
                ctx,
                up,
                messages.single.as_ref(),
                obs,
                policy,
                tenant,
            ))
            .await
        }
        Path::Bridged => Box::pin(pass.bridged(io)).await,
        Path::Held(m, known) => Box::pin(pass.held(io, m, known)).await,
        Path::Direct => pass.direct(io).await,
    }
}

/// Answers with the gateway's own error (the outcome is the caller's to set).
async fn write_error(io: &mut Io, req: &Request, err: &RpcError) -> bool {
    io.write_all(json_response(err.http_status, err, req.keep_alive))
        .await
        .is_ok()
}

impl<'c, 'a> Pass<'c, 'a> {
    fn path(&self) -> Path<'a> {
        let (req, ctx, up) = (self.req, self.ctx, self.up);
        if up.stdio.is_some() {
            Path::Stdio
        } else if !self.stateless
            && (super::era::known_stateless(ctx, up) || self.session == Some(Session::Bridged))
        {
            Path::Bridged
        } else if req.method == "POST"
            && self.stateless
            && let Some(m) = &self.messages.single
            && let known @ (Some(true) | None) = super::era::known_session(ctx, up)
        {
            Path::Held(m, known)
        } else {
            Path::Direct
        }
    }

    /// Whether `m` is a `tools/list` whose answer is read on its way (`reads_tool_lists`).
    fn filters(&self, m: &Message) -> bool {
        m.kind == Kind::Request
            && m.method.as_deref() == Some("tools/list")
            && reads_tool_lists(self.req, self.policy, self.tenant)
    }

    /// Whether the tenant may see tool `t` of this upstream.
    fn visible(&self, t: &serde_json::Value) -> bool {
        visible(self.ctx, self.policy, self.tenant, &self.up.name, t)
    }

    /// Bridged: the gateway holds the client's session, the upstream none. Every caller
    /// reaches the upstream with the gateway's one credential, and its answers are not read
    /// here: a task it made would be every caller's (see `tasks`), so none is offered.
    async fn bridged(&self, io: &mut Io) -> bool {
        let (req, up) = (self.req, self.up);
        if req.method != "POST" {
            return super::bridge::other_method(io, req, self.ctx, up).await;
        }
        let Some(m) = &self.messages.single else {
            let err = RpcError::invalid_request(format!(
                "JSON-RPC batches cannot be sent to `{}`, which speaks only 2026-07-28",
                up.name
            ));
            return write_error(io, req, &err).await;
        };
        // The bridge's envelope declares no client capabilities: the upstream makes no task
        // of its own choosing.
        if m.kind == Kind::Request && asks_about_tasks(m) {
            let err = RpcError::invalid_request(format!(
                "tasks are not offered on a session bridged to `{}`, which speaks only 2026-07-28: call without `params.task`",
                up.name
            ))
            .with_id(m.id.clone());
            return write_error(io, req, &err).await;
        }
        let keep = |t: &serde_json::Value| self.visible(t);
        let filter = self
            .filters(m)
            .then_some(&keep as &dyn Fn(&serde_json::Value) -> bool);
        super::bridge::forward(io, req, self.peer, self.ctx, up, m, self.obs, filter).await
    }

    /// Held: the gateway opens the upstream's session (the tenant's, or the caller's), which
    /// its callers share: their tasks are bound to them here, as on an upstream without
    /// sessions. Not yet known to need one (`known` is `None`), a message the gateway need
    /// not read is sent as it came, and the answer says.
    async fn held(&self, io: &mut Io, m: &Message, known: Option<bool>) -> bool {
        let (req, ctx, up) = (self.req, self.ctx, self.up);
        let filtering = self.filters(m);
        let who = who_calls(ctx, self.obs);
        // A session-era upstream makes no task of its own choosing (the 2026-07-28 tasks
        // extension): a call that only offers it is none, and gives its slots back with its
        // answer. One whose era is not known yet may.
        let server_directed = known != Some(true);
        let task = match TaskUse::of(ctx, &up.name, m, who, false, server_directed) {
            Ok(t) => t,
            Err(err) => {
                self.obs.set(Outcome::RpcError);
                return write_error(io, req, &err).await;
            }
        };
        if known.is_none() && !filtering && task.is_none() {
            // A stateless client has no session: an id it sends is not passed on, nor an
            // event to resume from (see `direct`).
            return super::held::forward_learning(
                io,
                req,
                self.peer,
                ctx,
                up,
                m,
                &req.body,
                &[("mcp-session-id", None), ("last-event-id", None)],
                None,
                self.obs,
            )
            .await;
        }
        let keep = |t: &serde_json::Value| self.visible(t);
        let edit = |answer: &mut serde_json::Value| {
            if let Some(task) = &task {
                task.on_answer(ctx, &up.name, who, answer, &self.obs.slots);
            }
            if filtering {
                super::held::keep_listed(answer, &keep)
            } else {
                Ok(())
            }
        };
        let edit = (filtering || task.is_some())
            .then_some(&edit as &dyn Fn(&mut serde_json::Value) -> Result<(), String>);
        let keep = super::held::forward(io, req, self.peer, ctx, up, m, self.obs, edit).await;
        if let Some(task) = &task {
            task.after(ctx, self.obs);
        }
        keep
    }

    /// Direct: tasks bound to their callers where the upstream cannot tell them apart, a
    /// filtered tenant's lone `tools/list` answered from the filtered list, and anything else
    /// relayed.
    async fn direct(&self, io: &mut Io) -> bool {
        // An event id to resume from is one the gateway gave this caller, sent on as the
        // upstream's own (`proxy::event_signer`); any other is refused before anything is
        // sent.
        let resume = match self.req.header(crate::http::name::LAST_EVENT_ID) {
            None => None,
            Some(signed) => match resumes_from(self.ctx, self.up, self.obs, signed, false) {
                Some((own, answers)) => {
                    self.obs.resumes.set(Some(answers));
                    Some(own)
                }
                None => {
                    let err = RpcError::invalid_request(super::error::FOREIGN_EVENT_ID);
                    return write_error(io, self.req, &err).await;
                }
            },
        };
        // A resume of a call's stream the gateway reads on for this caller, who left it, takes
        // that stream over (`relay::drain`): held until the call's answer passes on this one.
        let taken_over = match (resume, self.req.header(crate::http::name::MCP_SESSION_ID)) {
            (Some(own), Some(session)) if self.req.method == "GET" => {
                // Boxed: a resume's (its waits are monoio timers, aligned to 128 bytes, which
                // widened every request's state).
                Box::pin(super::relay::take_over(
                    self.ctx,
                    &self.up.name,
                    session,
                    own.as_bytes(),
                ))
                .await
            }
            _ => None,
        };
        // Without the client's own upstream session (none, or one bridged: the upstream is
        // reached with the gateway's credential either way), the upstream cannot tell the
        // gateway's callers apart; with one, it may still show a task made without one.
        let own_session = self.session.and_then(Session::upstream_id).is_some();
        if self.messages.all().any(is_task)
            && let Some(answered) = Box::pin(bound_tasks(
                io,
                self.req,
                self.peer,
                self.ctx,
                self.up,
                self.messages,
                self.obs,
                own_session,
            ))
            .await
        {
            return answered;
        }
        if let Some(m) = &self.messages.single
            && self.filters(m)
        {
            return Box::pin(filtered_tools_list(
                io,
                self.req,
                self.peer,
                self.up,
                self.ctx,
                self.obs,
                self.tenant,
                self.policy,
                m.id.clone(),
            ))
            .await;
        }
        *self.obs.resumed.borrow_mut() = taken_over;
        let kept = self.relay(io, resume).await;
        // The call's answer did not pass (its client left, the upstream refused the resume):
        // the drain holds the slot on.
        drop(self.obs.resumed.take());
        kept
    }

    /// The request as it came, to the upstream (resuming from its event `resume`), and its
    /// answer back as it comes.
    async fn relay(&self, io: &mut Io, resume: Option<&str>) -> bool {
        let (req, peer, ctx, up, messages) =
            (self.req, self.peer, self.ctx, self.up, self.messages);
        // W3C trace context sent only inside the message also reaches the upstream as the
        // header.
        let traceparent = messages
            .single
            .as_ref()
            .and_then(|m| m.meta_traceparent.as_deref())
            .filter(|tp| {
                req.header(crate::http::name::TRACEPARENT).is_none() && trace_id(tp).is_some()
            });
        let extra: Vec<(&str, Option<&str>)> = traceparent
            .map(|tp| ("traceparent", Some(tp)))
            .into_iter()
            .chain([(
                "mcp-session-id",
                self.session.and_then(Session::upstream_id),
            )])
            .chain(resume.map(|id| ("last-event-id", Some(id))))
            .collect();
        let in_session = self.cancels_in_session();
        // A session-era call whose client leaves is cancelled in its session at once, and its
        // exchange read on to its end, its slots held until then (`abandoned::on_leaving`).
        let cancellation = || {
            let body = super::abandoned::cancellation(
                messages.all().filter_map(super::abandoned::cancellable),
            )?;
            let request = upstream_request(req, peer, up, &body, &extra).ok()?;
            Some((request, self.obs.tenant_key(ctx)))
        };
        // In a block of its own: the exchange is over before a cancellation below is sent, and
        // the two are not held at once.
        let (keep, cancelled) = {
            let exchange = std::pin::pin!(self.exchange(io, &extra));
            super::abandoned::on_leaving(ctx, up, &self.obs.client_left, exchange, || {
                in_session.then(cancellation).flatten()
            })
            .await
        };
        // A session-era call the gateway gave up on (it timed out, or its client was cut for a
        // ban or deny) runs on upstream unless cancelled.
        if self.obs.abandoned.get()
            && in_session
            && !cancelled
            && let Some((request, tenant)) = cancellation()
        {
            super::abandoned::cancel(ctx, up, tenant, request).await;
        }
        keep
    }

    /// The exchange of [`Pass::relay`], with `extra` header lines.
    async fn exchange(&self, io: &mut Io, extra: &[(&str, Option<&str>)]) -> bool {
        let (req, peer, ctx, up, messages) =
            (self.req, self.peer, self.ctx, self.up, self.messages);
        // A session-era message to an upstream that may speak only the stateless era.
        if up.era == UpstreamEra::Auto
            && req.method == "POST"
            && !self.stateless
            && let Some(m) = &messages.single
        {
            return Box::pin(super::bridge::forward_learning(
                io, req, peer, ctx, up, m, extra, self.obs,
            ))
            .await;
        }
        match upstream_request(req, peer, up, &req.body, extra) {
            Ok(bytes) => {
                let id = messages.request_id.clone();
                relay::forward(io, req, bytes, up, id, ctx, None, self.obs).await
            }
            Err(e) => {
                let err = RpcError::from(e).with_id(messages.request_id.clone());
                write_error(io, req, &err).await
            }
        }
    }

    /// Whether a call whose client leaves runs on upstream, its exchange kept to its end and its
    /// slots held until then (`Obs::runs_on`): a request that can be cancelled, in the client's
    /// own upstream session (cancelled there as its client leaves, which a server may not be
    /// able to carry out: `abandoned`), or with no session to cancel it in, to an upstream not
    /// said to stop a call whose connection closes. A bridged session is the gateway's, and the
    /// upstream has none; a session the gateway holds cancels its calls itself (`held`).
    fn runs_on(&self) -> bool {
        (self.cancels_in_session() || !self.up.closing_cancels)
            && self
                .messages
                .all()
                .any(|m| super::abandoned::cancellable(m).is_some())
    }

    /// Whether a call given up on can be cancelled in its upstream session: a session-era
    /// request in the client's own session (`abandoned`).
    fn cancels_in_session(&self) -> bool {
        !super::headers::says_modern(self.req)
            && self.session.and_then(Session::upstream_id).is_some()
            && !super::era::known_stateless(self.ctx, self.up)
    }
}

/// Whether a message asks for a task or about tasks, or may be answered with one.
fn is_task(m: &Message) -> bool {
    may_become_task(m) || asks_about_tasks(m)
}

/// Whether a message asks for a task (`params.task`) or about tasks.
fn asks_about_tasks(m: &Message) -> bool {
    m.asks_task.is_some()
        || m.related_task.is_some()
        || m.method
            .as_deref()
            .is_some_and(|x| x == "tasks/list" || super::tasks::NAMING.contains(&x))
}

/// A `tools/call` whose client capabilities name the 2026-07-28 tasks extension: the server
/// decides whether it answers with a task (server-directed), so it is read as one that asks.
fn may_become_task(m: &Message) -> bool {
    m.tasks_extension && m.kind == Kind::Request && m.method.as_deref() == Some("tools/call")
}

/// What a task-related message may do where the upstream cannot tell the gateway's callers
/// apart (see `tasks`): decided before it is sent.
pub(super) enum TaskUse<'a> {
    /// It names a task of the caller's: sent as it is. With the task and its method when the
    /// task holds its call's concurrency slots: the answer is read for the task's end.
    Own(Option<(String, &'a str)>),
    /// `tasks/list`: the answer keeps the caller's tasks only (on the client's own session
    /// too: see `TaskUse::of`).
    List,
    /// Task-augmented: the task the answer names becomes the caller's (for this long, in ms,
    /// when the answer does not say), in the room held for it.
    Create(Option<u64>, super::tasks::Room<'a>),
}

impl<'a> TaskUse<'a> {
    /// For message `m` of `caller` to `up`: a task not the caller's is unknown to it (a
    /// notification naming one included), and a new one past its share is refused. `Ok(None)`
    /// for a message that is not about tasks, or needs nothing of them.
    /// On the client's own upstream session (`own_session`) a task named by id is the
    /// session's unless it was made here for another caller; a list keeps the caller's own.
    pub(super) fn of(
        ctx: &'a WorkerCtx,
        up: &str,
        m: &Message,
        who: crate::stdio::Who,
        own_session: bool,
        server_directed: bool,
    ) -> Result<Option<Self>, RpcError> {
        let caller = who.caller;
        if m.kind == Kind::Response || !is_task(m) {
            return Ok(None);
        }
        let owners = &ctx.learned.tasks;
        let may = |t: &str| {
            if own_session {
                !owners.foreign(up, t, caller)
            } else {
                owners.owns(up, t, caller)
            }
        };
        // A message related to a task (its answer goes to that task's queue) only by the task's
        // owner.
        if let Some(related) = &m.related_task
            && !related.as_deref().is_some_and(may)
        {
            return Err(super::tasks::unknown(m.id.clone()));
        }
        let method = m.method.as_deref().unwrap_or_default();
        if let Some(&naming) = super::tasks::NAMING.iter().find(|&&n| n == method) {
            return match m.task_id.as_deref() {
                Some(task) if may(task) => Ok(Some(Self::Own(
                    (m.kind == Kind::Request && owners.holds(up, task))
                        .then(|| (task.to_owned(), naming)),
                ))),
                _ => Err(super::tasks::unknown(m.id.clone())),
            };
        }
        // A notification answers nothing: only a task it names is checked.
        if m.kind != Kind::Request {
            return Ok(None);
        }
        // On the client's own session too: an upstream that also takes requests without one
        // may list there the tasks made without one (the TypeScript SDK's store does), and a
        // task made through another gateway of the fleet, or before a restart, is not known
        // here to be another's. What is listed is what this gateway bound to the caller.
        if method == "tasks/list" {
            return Ok(Some(Self::List));
        }
        if m.asks_task.is_none() && !(server_directed && may_become_task(m)) {
            return Ok(None);
        }
        // A client asks for a task only on `tools/call` (2025-11-25): another request asking
        // for one would have its answer (a list the tenant's filter trims, say) read as a task.
        if method != "tools/call" {
            return Err(RpcError::invalid_params(format!(
                "`{method}` cannot ask for a task: only `tools/call` can"
            ))
            .with_id(m.id.clone()));
        }
        // On the client's own session as without one: bound to the caller, for its lists.
        let Some(room) = owners.reserve(who) else {
            return Err(RpcError::new(
                policy::code::RATE_LIMITED,
                format!(
                    "no room for another task at upstream `{up}`: a caller may have {}, a tenant {}",
                    super::tasks::MAX_PER_CALLER,
                    super::tasks::MAX_PER_TENANT,
                ),
                429,
            )
            .with_id(m.id.clone()));
        };
        Ok(Some(Self::Create(m.asks_task.flatten(), room)))
    }

    /// Once the exchange is over: a call that may have made a task, given up after it was sent
    /// and before its answer was read (its client left, it timed out, the answer could not be
    /// read), holds its slots as a task would. (A task bound took them already.)
    pub(super) fn after(&self, ctx: &WorkerCtx, obs: &Obs<'_>) {
        let unread = obs.client_left.get() || obs.abandoned.get() || obs.unanswered.get();
        if matches!(self, Self::Create(..)) && unread {
            ctx.learned.tasks.hold_unread(obs.slots.take());
        }
    }

    /// Reads (and for a list, trims) the answer. A task made takes over the call's concurrency
    /// slots (`slots`, from the request's admission); a task seen ended gives its back.
    pub(super) fn on_answer(
        &self,
        ctx: &WorkerCtx,
        up: &str,
        who: crate::stdio::Who,
        answer: &mut serde_json::Value,
        slots: &std::cell::RefCell<Vec<crate::policy::limits::InFlight>>,
    ) {
        let owners = &ctx.learned.tasks;
        match self {
            Self::Own(None) => {}
            // A result only once the task ended. Not an error: a client can draw one (invalid
            // params) while its task works on.
            Self::Own(Some((task, "tasks/result"))) if answer.get("result").is_some() => {
                owners.release(up, task);
            }
            Self::Own(Some((task, _))) => owners.release_if_final(up, task, &answer["result"]),
            Self::List => owners.keep_own(up, who.caller, answer),
            Self::Create(ttl, room) => {
                if let Some(task) = super::tasks::created(answer) {
                    let ttl = super::tasks::ttl_ms(answer).or(*ttl);
                    owners.bind(up, task, room, ttl, slots.take());
                }
            }
        }
    }
}

/// Tasks on an upstream that cannot tell the gateway's callers apart (a request without a
/// session; see `tasks`): a task is its creator's. On the client's own session
/// (`own_session`), a task made here for another caller is unknown to it. `Some(keep-alive)`
/// when the request was answered here; `None` when it goes on as any other.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
async fn bound_tasks<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    up: &'c crate::config::Upstream,
    messages: &Messages,
    obs: &Obs<'c>,
    own_session: bool,
) -> Option<bool> {
    let reply = async |io: &mut Io, err: RpcError| {
        obs.set(Outcome::RpcError);
        write_error(io, req, &err).await
    };
    if messages.batch.iter().any(is_task) {
        let err = RpcError::invalid_request(
            "tasks are not supported in a JSON-RPC batch here: send each alone",
        );
        return Some(reply(io, err).await);
    }
    let m = messages.single.as_ref()?;
    let who = super::proxy::who_calls(ctx, obs);
    let task = match TaskUse::of(ctx, &up.name, m, who, own_session, true) {
        Ok(Some(TaskUse::Own(None)) | None) => return None,
        Ok(Some(task)) => task,
        Err(err) => return Some(reply(io, err).await),
    };
    let keep = super::proxy::read_whole(io, req, peer, up, ctx, obs, m.id.clone(), |answer| {
        task.on_answer(ctx, &up.name, who, answer, &obs.slots);
        Ok(())
    })
    .await;
    task.after(ctx, obs);
    Some(keep)
}
