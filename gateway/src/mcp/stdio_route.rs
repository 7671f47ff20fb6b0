//! The forward stage for a stdio upstream: the request's message goes to the upstream's
//! supervisor over a channel (never to the child directly), and the answer comes back to the
//! client as Streamable HTTP: JSON, or an SSE stream when the child sends progress or requests
//! of its own before its answer and the client accepts one.
//!
//! The child speaks the session era and was initialized once by the gateway, so clients of
//! every era are served from that: a session-era client's `initialize` and a 2026-07-28
//! client's `server/discover` are answered by the gateway from the child's own answer. No
//! `Mcp-Session-Id` is issued (the child's state is shared by its clients); GET and DELETE are
//! answered 405.

use serde_json::{Value, json};

use super::{
    Id, Kind, Message, RpcError,
    messages::{discover_from_initialize, for_stateless},
    passthrough::TaskUse,
    proxy::{Obs, classify, json_response, visible, who_calls},
    sse::{accepts_sse, sse_event, sse_head},
    version,
    worker::WorkerCtx,
};
use crate::{
    config::Upstream,
    http::{self, Io, Request},
    policy::{Policy, TenantPolicy},
    stats::Outcome,
    stdio::{Handle, StdioError, Who},
};

/// Answers `message` (a POST's lone message) from the stdio upstream `up`; GET and DELETE are
/// refused. Returns whether the client connection can carry another request.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward(
    io: &mut Io,
    req: &Request,
    ctx: &WorkerCtx,
    up: &Upstream,
    message: Option<&Message>,
    obs: &Obs<'_>,
    policy: &Policy,
    tenant: &TenantPolicy,
) -> bool {
    obs.upstream.set(None);
    let Some(m) = message else {
        let err = RpcError::invalid_request(format!(
            "{} is not served by a stdio upstream: MCP messages are POSTed",
            req.method
        ));
        let resp = http::response(
            405,
            &[("content-type", "application/json"), ("allow", "POST")],
            &err.body(),
            req.keep_alive,
        );
        return io.write_all(resp).await.is_ok();
    };
    let Some(handle) = ctx.shared.stdio.get(&up.name) else {
        let err = RpcError::upstream(format!("stdio upstream {} is not running", up.name), 502)
            .with_id(m.id.clone());
        obs.set(Outcome::UpstreamFailure);
        return io
            .write_all(json_response(502, &err, req.keep_alive))
            .await
            .is_ok();
    };
    let who = who_calls(ctx, obs);
    let caller = who.caller;
    match m.kind {
        Kind::Notification => {
            if m.method.as_deref() != Some("notifications/initialized") {
                handle.notify(caller, req.body.to_vec());
            }
            obs.set(Outcome::Ok);
            accepted(io, req).await
        }
        Kind::Response => {
            handle.respond(caller, req.body.to_vec());
            obs.set(Outcome::Ok);
            accepted(io, req).await
        }
        Kind::Request => {
            // A filtered tenant's `tools/list` is filtered like any upstream's.
            let filter = (super::proxy::reads_tool_lists(req, policy, tenant)
                && m.method.as_deref() == Some("tools/list"))
            .then_some(ToolFilter {
                ctx,
                policy,
                tenant,
                upstream: &up.name,
            });
            // A task holds its call's concurrency slots until seen ended, and a caller's and
            // a tenant's tasks are bounded, as at any upstream (`passthrough::TaskUse`). The
            // child's tasks are told apart by the supervisor, which is the judge of whose a
            // task is; here, a task made for another caller is unknown too.
            let scope = task_scope(up, who);
            let task = match TaskUse::of(ctx, &scope, m, who, true, false) {
                Ok(task) => task,
                Err(err) => {
                    obs.set(Outcome::RpcError);
                    return io
                        .write_all(json_response(err.http_status, &err, req.keep_alive))
                        .await
                        .is_ok();
                }
            };
            let tasks = task.as_ref().map(|use_| Tasks {
                ctx,
                scope: &scope,
                who,
                use_,
            });
            let keep = request(
                io, req, &handle, who, m, obs, filter, &req.body, None, tasks,
            )
            .await;
            if let Some(task) = &task {
                task.after(ctx, obs);
            }
            keep
        }
    }
}

/// The name a stdio upstream's tasks are known by among the gateway's
/// ([`super::tasks::Owners`]): the upstream's, and with a child per caller the caller's too (each
/// child names its own tasks, and two may name two tasks alike).
fn task_scope(up: &Upstream, who: Who) -> std::borrow::Cow<'_, str> {
    match up.stdio.as_ref().and_then(|s| s.per_caller) {
        Some(_) => format!("{}\0{:x}", up.name, who.caller).into(),
        None => up.name.as_str().into(),
    }
}

/// A task-related request's answer, read for the task it makes or ends.
pub(super) struct Tasks<'a> {
    ctx: &'a WorkerCtx,
    scope: &'a str,
    who: Who,
    use_: &'a TaskUse<'a>,
}

impl Tasks<'_> {
    /// The answer as the client gets it (a list keeps the caller's tasks).
    fn read(&self, bytes: Vec<u8>, obs: &Obs<'_>) -> Vec<u8> {
        let Ok(mut answer) = serde_json::from_slice::<Value>(&bytes) else {
            return bytes;
        };
        self.use_
            .on_answer(self.ctx, self.scope, self.who, &mut answer, &obs.slots);
        match self.use_ {
            TaskUse::List => super::json_bytes(&answer),
            _ => bytes,
        }
    }
}

/// What a filtered `tools/list` answer passes through.
pub(super) struct ToolFilter<'a> {
    ctx: &'a WorkerCtx,
    policy: &'a Policy,
    tenant: &'a TenantPolicy,
    upstream: &'a str,
}

impl ToolFilter<'_> {
    /// The answer with the tools the tenant may not see removed; an answer that cannot be
    /// filtered is not passed on unfiltered.
    fn apply(&self, bytes: &[u8]) -> Result<Vec<u8>, StdioError> {
        let bad = || {
            StdioError::Malformed(
                self.upstream.to_owned(),
                "the answer to tools/list has no `result.tools` array".into(),
            )
        };
        let mut v: Value = serde_json::from_slice(bytes).map_err(|_| bad())?;
        // Written again: nothing in it a client reads otherwise (`re\u{17f}ult` beside the
        // filtered `result` reached a Go client; the third review).
        super::messages::one_meaning(&v)
            .map_err(|why| StdioError::Malformed(self.upstream.to_owned(), why))?;
        if v.get("error").is_some() {
            return Ok(bytes.to_vec());
        }
        v.get_mut("result")
            .and_then(|r| {
                super::messages::keep_tools(r, |t| {
                    visible(self.ctx, self.policy, self.tenant, self.upstream, t)
                })
            })
            .ok_or_else(bad)?;
        Ok(super::json_bytes(&v))
    }
}

async fn accepted(io: &mut Io, req: &Request) -> bool {
    io.write_all(http::response(202, &[], b"", req.keep_alive))
        .await
        .is_ok()
}

/// Answers request `m` (sent as `body`) from the child. Inside a federation (`member`), the
/// child's own requests reach the client with ids that name the member, so that the client's
/// answers find their way back.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn request(
    io: &mut Io,
    req: &Request,
    handle: &Handle,
    who: Who,
    m: &Message,
    obs: &Obs<'_>,
    filter: Option<ToolFilter<'_>>,
    body: &[u8],
    member: Option<&str>,
    tasks: Option<Tasks<'_>>,
) -> bool {
    let started = std::time::Instant::now();
    match m.method.as_deref() {
        Some("initialize") => {
            let asked = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["params"]["protocolVersion"].as_str().map(str::to_owned));
            return from_child_init(io, req, handle, who, m.id.clone(), obs, |mut r| {
                // The client gets the version it asked for when the gateway speaks it (the
                // gateway translates to the child's).
                if let Some(v) =
                    asked.filter(|v| version::is_supported(v) && !version::is_stateless_era(v))
                {
                    r["protocolVersion"] = json!(v);
                }
                r
            })
            .await;
        }
        Some("server/discover") => {
            return from_child_init(io, req, handle, who, m.id.clone(), obs, |r| {
                discover_from_initialize(&r)
            })
            .await;
        }
        _ => {}
    }
    let sse_ok = accepts_sse(req) && filter.is_none();
    let mut pending = handle.call(who, body.to_vec());
    let mut streaming = false;
    loop {
        let next = monoio::select! {
            done = &mut pending.done => Err(done),
            event = futures_util::StreamExt::next(&mut pending.events) => Ok(event),
            _ = io.peer_gone() => {
                // The client left: dropping `pending` tells the supervisor, which cancels the
                // call at the child.
                obs.set(Outcome::UpstreamFailure);
                obs.client_left.set(true);
                return false;
            }
        };
        match next {
            Ok(Some(event)) if sse_ok => {
                if !streaming {
                    streaming = true;
                    if io.write_all(sse_head(req)).await.is_err() {
                        return false;
                    }
                }
                let event = match member {
                    Some(name) => tagged(name, event),
                    None => event,
                };
                if io.write_all(sse_event(&event)).await.is_err() {
                    return false;
                }
            }
            // A client that takes JSON only cannot be sent the child's requests or progress.
            Ok(Some(_)) => {}
            // The events end only with the call.
            Ok(None) => {}
            Err(done) => {
                obs.waited(started.elapsed());
                let stateless = req
                    .header_str(crate::http::name::MCP_PROTOCOL_VERSION)
                    .is_some_and(version::is_stateless_era);
                let method = m.method.as_deref().unwrap_or_default();
                let answer = match done {
                    Ok(Ok(bytes)) => match &filter {
                        Some(f) => f.apply(&bytes),
                        None => Ok(bytes),
                    }
                    .map(|b| {
                        if stateless {
                            for_stateless(method, b)
                        } else {
                            b
                        }
                    }),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StdioError::Gone(handle.name().to_owned())),
                };
                let answer = match answer {
                    Ok(bytes) => Ok(match &tasks {
                        Some(t) => t.read(bytes, obs),
                        None => bytes,
                    }),
                    // Sent, and its answer never read: the child may have acted on it.
                    Err(
                        e @ (StdioError::Timeout(..)
                        | StdioError::Gone(..)
                        | StdioError::Exited(..)),
                    ) => {
                        obs.unanswered.set(true);
                        Err(e)
                    }
                    Err(e) => Err(e),
                };
                return finish(
                    io,
                    req,
                    m.id.clone(),
                    answer,
                    streaming,
                    handle.per_caller(),
                    obs,
                )
                .await;
            }
        }
    }
}

/// The child's own `initialize` result. The supervisor initialized the child when it
/// started; an `initialize` probe with no parameters asks it again for its capabilities.
pub(super) async fn child_init(handle: &Handle, who: Who) -> Result<Value, StdioError> {
    let probe = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}});
    match handle.call(who, super::json_bytes(&probe)).done.await {
        Ok(Ok(bytes)) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut v) if v.get("result").is_some() => Ok(v["result"].take()),
            _ => Err(StdioError::Refused(
                handle.name().to_owned(),
                "no initialize result".into(),
            )),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StdioError::Gone(handle.name().to_owned())),
    }
}

/// Answers from the child's `initialize` result, reshaped by `shape`.
async fn from_child_init(
    io: &mut Io,
    req: &Request,
    handle: &Handle,
    who: Who,
    id: Option<Id>,
    obs: &Obs<'_>,
    shape: impl FnOnce(Value) -> Value,
) -> bool {
    let answer = child_init(handle, who).await.map(|init| {
        let mut msg = json!({"jsonrpc": "2.0", "result": shape(init)});
        msg["id"] = id.as_ref().map_or(Value::Null, Id::to_json);
        super::json_bytes(&msg)
    });
    finish(io, req, id, answer, false, handle.per_caller(), obs).await
}

/// Writes the final answer: as the last SSE event when streaming, else as JSON; a failure as
/// a JSON-RPC error naming the upstream. `per_caller`: the answer is of the caller's own child.
async fn finish(
    io: &mut Io,
    req: &Request,
    id: Option<Id>,
    answer: Result<Vec<u8>, StdioError>,
    streaming: bool,
    per_caller: bool,
    obs: &Obs<'_>,
) -> bool {
    let bytes = match answer {
        Ok(bytes) => {
            obs.set(classify(&bytes));
            bytes
        }
        Err(e @ (StdioError::Unapproved(..) | StdioError::Unlisted(..))) if !streaming => {
            // As the check stage refuses it, had it known of the restart.
            let r = crate::policy::Refusal::new(
                403,
                crate::policy::code::PENDING_APPROVAL,
                format!("pins[{}]", e.upstream()),
                e.to_string(),
            );
            obs.set(Outcome::Refused);
            {
                let mut d = obs.decision.borrow_mut();
                d.refused = true;
                d.rule = Some(r.rule.clone());
                d.reason = Some(r.message.clone());
            }
            let err = RpcError::new(r.code, r.message.clone(), r.status)
                .with_data(r.data())
                .with_id(id);
            return io
                .write_all(json_response(403, &err, req.keep_alive))
                .await
                .is_ok();
        }
        Err(e) => {
            let status = match e {
                // A child of the caller's own: whatever it does (hang, exit, crash at every
                // start, answer nonsense) its caller can make it do, and it says nothing of
                // the other callers' children. The tool's breaker, the tenant's, counts it;
                // the upstream's, everyone's, does not (one tenant that killed its own child
                // twice opened it for every caller, a review).
                StdioError::Timeout(..) if per_caller => {
                    obs.failed_by(super::proxy::Blame::Call);
                    504
                }
                StdioError::Timeout(..) => {
                    obs.failed_by(super::proxy::Blame::Unclear);
                    504
                }
                // Every per-caller child is another caller's, or what waits for the child is
                // at its bound: the gateway's own limits, not failures of the upstream (a
                // flood would open its breaker for everyone).
                StdioError::Busy(..) | StdioError::Full(..) => {
                    obs.set(Outcome::Refused);
                    503
                }
                // The call's own failure (see `proxy::outcome_of`): its tool's breaker counts
                // it, the upstream's shared one does not.
                StdioError::TooLong(..) | StdioError::Unreadable(..) => {
                    obs.own_failure();
                    502
                }
                // Refused by the pins before the child saw it (an answer had begun: never, as
                // nothing reaches the client before the child answers).
                StdioError::Unapproved(..) | StdioError::Unlisted(..) => {
                    obs.set(Outcome::Refused);
                    403
                }
                // The client's message, refused before the child saw it: nothing of the
                // upstream's (two such calls opened a stdio upstream's breaker for everyone).
                StdioError::Refused(..) => {
                    obs.set(Outcome::Refused);
                    400
                }
                _ if per_caller => {
                    obs.failed_by(super::proxy::Blame::Call);
                    502
                }
                _ => {
                    obs.set(Outcome::UpstreamFailure);
                    502
                }
            };
            let err = RpcError::upstream(e.to_string(), status).with_id(id);
            if !streaming {
                return io
                    .write_all(json_response(status, &err, req.keep_alive))
                    .await
                    .is_ok();
            }
            err.body()
        }
    };
    if streaming {
        let mut last = sse_event(&bytes);
        last.extend_from_slice(b"0\r\n\r\n");
        return io.write_all(last).await.is_ok() && req.keep_alive;
    }
    io.write_all(http::response(
        200,
        &[("content-type", "application/json")],
        &bytes,
        req.keep_alive,
    ))
    .await
    .is_ok()
}

/// A request of the child's with its id tagged with the federation member's name; other
/// messages as they are.
fn tagged(member: &str, event: Vec<u8>) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(&event) else {
        return event;
    };
    if v.get("method").is_none() {
        return event;
    }
    match v.get("id").and_then(|id| super::messages::tag(member, id)) {
        Some(t) => {
            v["id"] = t;
            super::json_bytes(&v)
        }
        None => event,
    }
}
