//! Gateway-held upstream sessions: a 2026-07-28 (stateless) client in front of a session-era
//! upstream.
//!
//! A stateless client sends no `initialize` and carries no `Mcp-Session-Id`; a session-era
//! server refuses every request without one ("Server not initialized"). So the gateway opens
//! the upstream's session itself (`initialize`, then `notifications/initialized`), keeps it per
//! worker for the tenant (or the caller, `held_session = "caller"`, for an upstream that keeps
//! per-user state), and sends each stateless request on it: the 2026-07-28 envelope in
//! `params._meta` is taken out (what it says was said at `initialize`), and the answer is
//! reshaped for the client ([`for_stateless`]). `server/discover` is answered from the held
//! session's `initialize` result. An upstream that lost the session (404) gets a new one and
//! the request once more: a 404 says the request was not processed.
//!
//! Which upstreams need this is configured (`era`), or learnt (`era = "auto"`, the default):
//! a stateless request goes as the client sent it, and an upstream that refuses it for want of
//! a session (a 400 "Server not initialized" or "No valid session ID") is remembered for five
//! minutes per worker while the request goes again over a held session. Such a refusal means
//! the request was not processed, so nothing runs twice; nothing is sent to learn it.
//!
//! The gateway declares no client capabilities on a held session: a stateless client cannot
//! be sent the server's own requests (sampling, elicitation), so the server must not count on
//! them. Progress and log notifications the server sends before its answer reach a client
//! that takes an event stream, after the answer is complete.
//!
//! What it must never do: let two tenants share a session (the key is the upstream and the
//! tenant, or the caller), let a client name the session (it has no say in it), or let the
//! caller that happens to open a tenant's session shape it (it is opened with none of that
//! caller's headers).

use std::{
    collections::HashMap,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_channel::oneshot;
use serde_json::{Value, json};

use super::{
    Id, Kind, Message, era,
    messages::{discover_from_initialize, for_stateless, response_result},
    proxy::{Blame, Obs, classify, fail, session_owner, upstream_request},
    sse, upstream,
    upstream::{ResponseHead, UpstreamFailure},
    version,
    worker::{Held, HeldSession, Slot, WorkerCtx},
};
use crate::{
    config::{HeldScope, Upstream, UpstreamEra},
    http::{self, Io, Request},
    stats::Outcome,
};

/// Largest upstream answer read whole on a held session.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// Held sessions per worker; beyond, the one unused longest (and not in use) is ended with a
/// DELETE to make room.
const MAX_SESSIONS: usize = 4096;
/// Largest answer read to a held session's DELETE.
const MAX_END_ANSWER: usize = 64 * 1024;
/// How long one DELETE may take.
const END_WITHIN: Duration = Duration::from_secs(5);
/// DELETEs sent at once by a worker.
const ENDING_AT_ONCE: usize = 32;
/// Evicted sessions waiting for their DELETE; beyond, one is forgotten (its upstream's expiry
/// ends it), so that an upstream that does not answer DELETEs cannot grow the queue.
const MAX_ENDING: usize = 1024;
/// How long a worker that stops waits for its held sessions' DELETEs, at most.
const END_ALL_WITHIN: Duration = Duration::from_secs(2);
/// The id of the gateway's own requests on a held session.
const OWN_ID: &str = "mcp-gateway";
/// Longest `Mcp-Session-Id` the gateway takes from an upstream for a session it opens itself
/// (held, or a federation's member, sealed into its client's id). The SDKs mint UUIDs or 32-64
/// hex digits; a member's 12,000 bytes made its client's id 16,231 bytes, and every later
/// request of the session was refused (431) at the default `max_header_bytes`.
pub(super) const MAX_SESSION_ID: usize = 1024;
/// What the gateway asks for when it reads an answer whole itself (on a held session, or one
/// it relays to nobody): both kinds, whatever the client accepts. A held session is opened
/// once for all a tenant's callers, so a caller's `Accept: application/json` (to which the
/// Python SDK's server answers `initialize` with 406) failed it for every one of them, and
/// counted at the upstream's shared breaker.
pub(super) const READ_WHOLE: [(&str, Option<&str>); 2] = [
    ("accept", Some("application/json, text/event-stream")),
    ("content-type", Some("application/json")),
];

/// The headers of a message the gateway sends in a held session (`id` and `version`: the
/// session's, none while it is opened), after `extra`: the caller's routing headers and any
/// `Last-Event-ID` left out, and what the gateway reads whole ([`READ_WHOLE`]).
fn in_session<'a>(
    extra: &[(&'a str, Option<&'a str>)],
    id: Option<&'a str>,
    version: Option<&'a str>,
) -> Vec<(&'a str, Option<&'a str>)> {
    let mut replace = extra.to_vec();
    replace.extend([
        ("mcp-session-id", id),
        ("mcp-protocol-version", version),
        ("mcp-method", None),
        ("mcp-name", None),
        ("last-event-id", None),
    ]);
    replace.extend(READ_WHOLE);
    replace
}

/// Whose a held session is: the key it is held by, and its tenant's (whose sessions are
/// evicted first when the tenant holds the most).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Owner {
    key: u64,
    tenant: u64,
}

/// The owner of the caller's held session at `up`.
pub(super) fn owner(ctx: &WorkerCtx, up: &Upstream, obs: &Obs<'_>) -> Owner {
    let tenant = obs.tenant_key(ctx);
    let key = match up.held_session {
        HeldScope::Caller => session_owner(ctx, obs),
        HeldScope::Tenant => tenant,
    };
    Owner { key, tenant }
}

/// Takes the `Opening` slot back out (waking its waiters) if the opening request is dropped
/// before it finished, so that the next request opens the session instead of waiting forever.
struct Opening<'a> {
    held: &'a Held,
    key: (u64, u64),
    done: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.held.sessions.borrow_mut().remove(&self.key);
        }
    }
}

/// The held session of `owner` at `up`, opened if there is none.
async fn session(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    owner: Owner,
) -> Result<Rc<HeldSession>, UpstreamFailure> {
    let key = (up.key, owner.key);
    loop {
        let wait = {
            let mut sessions = ctx.held.sessions.borrow_mut();
            match sessions.get_mut(&key) {
                Some(Slot::Ready(s)) => {
                    s.used.set(Instant::now());
                    return Ok(Rc::clone(s));
                }
                Some(Slot::Opening(waiters)) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    // Back under the cap once the sessions in use that held it above are free.
                    while sessions.len() >= MAX_SESSIONS
                        && let Some(evicted) = evict_idlest(&mut sessions)
                    {
                        ctx.held.to_end(evicted);
                    }
                    sessions.insert(key, Slot::Opening(Vec::new()));
                    None
                }
            }
        };
        if let Some(rx) = wait {
            // Woken when the opening request is done, or dropped; then looked up again.
            let _ = rx.await;
            continue;
        }
        let mut guard = Opening {
            held: &ctx.held,
            key,
            done: false,
        };
        // A tenant's session is shared by its callers: opened with none of the first one's
        // headers or query, which the upstream could take as the session's (a user, a trace,
        // a flag) for every caller after. A caller's own session is opened with its request.
        let own;
        let opener = match up.held_session {
            HeldScope::Caller => req,
            HeldScope::Tenant => {
                own = gateways_own("POST");
                &own
            }
        };
        let opened = open(ctx, opener, peer, up, owner.tenant).await;
        guard.done = true;
        let mut sessions = ctx.held.sessions.borrow_mut();
        // Dropping the waiters' senders wakes them.
        return match opened {
            Ok(s) => {
                let s = Rc::new(s);
                sessions.insert(key, Slot::Ready(Rc::clone(&s)));
                Ok(s)
            }
            Err(f) => {
                sessions.remove(&key);
                drop(sessions);
                // What was learnt may be wrong (an upstream that cannot be initialized):
                // the next request goes as the client sent it again. Not for a failure of
                // the call's own (a 4xx or an error, which a caller's own session can draw
                // for what it sent): that says nothing of the upstream's era, and would cost
                // every other caller a refused round trip.
                if up.era == UpstreamEra::Auto && Blame::of_failure(&f) != Blame::Call {
                    ctx.held.eras.borrow_mut().remove(&up.key);
                }
                Err(f)
            }
        };
    }
}

/// Takes out a ready session that no request holds (one in use is never ended under its
/// requests), to be ended: of the tenant that holds the most of them, so that a tenant that
/// opens sessions fast (many agents) pushes out its own first, the one unused longest. Its
/// upstream's key and the session; none if every one is in use (the table then holds more,
/// bounded by the requests in flight, until the next opening finds them free). Only when the
/// table is full: a scan of it is the cost.
fn evict_idlest(sessions: &mut HashMap<(u64, u64), Slot>) -> Option<(u64, Rc<HeldSession>)> {
    let free = || {
        sessions.iter().filter_map(|(k, slot)| match slot {
            Slot::Ready(s) if Rc::strong_count(s) == 1 => Some((*k, s)),
            _ => None,
        })
    };
    let mut held: HashMap<u64, usize> = HashMap::new();
    for (_, s) in free() {
        *held.entry(s.tenant).or_default() += 1;
    }
    let most = held.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t)?;
    let idlest = free()
        .filter(|(_, s)| s.tenant == most)
        .min_by_key(|(_, s)| s.used.get())
        .map(|(k, _)| k)?;
    match sessions.remove(&idlest) {
        Some(Slot::Ready(s)) => Some((idlest.0, s)),
        _ => None,
    }
}

/// A request of the gateway's own for a held session, with no client's header, query or body:
/// what the upstream gets is only what the gateway writes (see [`upstream_request`]).
fn gateways_own(method: &str) -> Request {
    Request {
        method: method.to_owned(),
        // No query of its own: the upstream's path (with any query its URL has) is the target.
        target: "/".to_owned(),
        minor: 1,
        headers: http::Fields::default(),
        body: Bytes::new(),
        keep_alive: true,
    }
}

/// Ends a session the gateway let go at its upstream (the one of that key in the running
/// configuration, whose credentials it takes; none if a reload removed it), with a DELETE
/// built now: its id and version, forwarded for the client that opened it. Best effort,
/// within [`END_WITHIN`]: a failure is logged, and the upstream's expiry is left to end it.
async fn end(ctx: &WorkerCtx, up_key: u64, s: &HeldSession) {
    let Some(id) = s.id.as_deref() else {
        return;
    };
    let snapshot = ctx.shared.snapshot.load_full();
    let Some(up) = snapshot.config.upstreams.iter().find(|u| u.key == up_key) else {
        return;
    };
    let delete = gateways_own("DELETE");
    let replace = [
        ("mcp-session-id", Some(id)),
        ("mcp-protocol-version", Some(s.version.as_str())),
    ];
    // The id and version went into a head when the session opened.
    let Ok(request) = upstream_request(&delete, s.opener, up, &Bytes::new(), &replace) else {
        return;
    };
    let sent = monoio::time::timeout(
        END_WITHIN,
        upstream::call(&ctx.pool, up, s.tenant, request, MAX_END_ANSWER),
    )
    .await;
    match sent {
        Ok(Ok((head, _))) if (200..300).contains(&head.status) => {
            tracing::debug!(upstream = %up.name, "held session ended");
        }
        // 404: gone already; 405: a server that lets its clients end nothing (the
        // specification allows it).
        Ok(Ok((head, _))) => tracing::debug!(
            upstream = %up.name,
            status = head.status,
            "held session: the upstream did not end it"
        ),
        Ok(Err(f)) => tracing::info!(
            upstream = %up.name,
            "held session: its DELETE failed ({}); the upstream's expiry will end it",
            describe(f)
        ),
        Err(_) => tracing::info!(
            upstream = %up.name,
            "held session: its DELETE got no answer in {END_WITHIN:?}; the upstream's expiry will end it"
        ),
    }
}

impl Held {
    /// Queues an evicted session for [`Held::end_evicted`].
    fn to_end(&self, evicted: (u64, Rc<HeldSession>)) {
        if evicted.1.id.is_none() {
            return;
        }
        let mut ending = self.ending.borrow_mut();
        if ending.len() >= MAX_ENDING {
            ending.pop_front();
            tracing::info!("held sessions: too many waiting for their DELETE; one is forgotten");
        }
        ending.push_back(evicted);
        if let Some(wake) = self.wake.borrow_mut().take() {
            let _ = wake.send(());
        }
    }

    /// The worker's task that ends evicted sessions at their upstreams, a few at once, for as
    /// long as the worker runs.
    pub(super) async fn end_evicted(ctx: Rc<WorkerCtx>) {
        loop {
            let batch: Vec<(u64, Rc<HeldSession>)> = {
                let mut ending = ctx.held.ending.borrow_mut();
                let n = ending.len().min(ENDING_AT_ONCE);
                ending.drain(..n).collect()
            };
            if batch.is_empty() {
                let (tx, rx) = oneshot::channel();
                *ctx.held.wake.borrow_mut() = Some(tx);
                let _ = rx.await;
                continue;
            }
            futures_util::future::join_all(batch.iter().map(|(up, s)| end(&ctx, *up, s))).await;
        }
    }

    /// Ends every held session of this worker at its upstream, the evicted ones still waiting
    /// included (the worker is stopping), at most [`END_ALL_WITHIN`]; what is not ended by then
    /// is left to the upstream's expiry.
    pub(super) async fn end_all(ctx: &WorkerCtx) {
        let mut all: Vec<(u64, Rc<HeldSession>)> = ctx.held.ending.borrow_mut().drain(..).collect();
        all.extend(ctx.held.sessions.borrow_mut().drain().filter_map(
            |((up, _), slot)| match slot {
                Slot::Ready(s) => Some((up, s)),
                Slot::Opening(_) => None,
            },
        ));
        all.retain(|(_, s)| s.id.is_some());
        if all.is_empty() {
            return;
        }
        let n = all.len();
        let ending = async {
            // A few at once: each takes an upstream connection.
            for chunk in all.chunks(ENDING_AT_ONCE) {
                futures_util::future::join_all(chunk.iter().map(|(up, s)| end(ctx, *up, s))).await;
            }
        };
        if monoio::time::timeout(END_ALL_WITHIN, ending).await.is_err() {
            tracing::info!(
                worker = ctx.worker,
                "stopping: not every one of {n} held sessions was ended in time; their upstreams' expiry will end them"
            );
        }
    }
}

/// Forgets `stale` (the upstream said it no longer knows it), unless it was replaced already.
fn forget(ctx: &WorkerCtx, key: (u64, u64), stale: &Rc<HeldSession>) {
    let mut sessions = ctx.held.sessions.borrow_mut();
    if let Some(Slot::Ready(s)) = sessions.get(&key)
        && Rc::ptr_eq(s, stale)
    {
        sessions.remove(&key);
    }
}

/// Opens a session at `up` as a session-era client of the newest session-era version.
async fn open(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
) -> Result<HeldSession, UpstreamFailure> {
    let body = json!({
        "jsonrpc": "2.0",
        "id": OWN_ID,
        "method": "initialize",
        "params": {
            "protocolVersion": version::LATEST_SESSION_ERA,
            "capabilities": {},
            "clientInfo": { "name": "mcp-gateway", "version": env!("CARGO_PKG_VERSION") },
        },
    });
    let own = Id::Str(OWN_ID.to_owned());
    let (id, init) = initialize(
        ctx,
        req,
        peer,
        up,
        tenant,
        &super::json_bytes(&body).into(),
        Some(&own),
    )
    .await?;
    let version = init["protocolVersion"]
        .as_str()
        .filter(|v| version::is_supported(v))
        .unwrap_or(version::LATEST_SESSION_ERA)
        .to_owned();
    tracing::debug!(upstream = %up.name, "held session opened");
    Ok(HeldSession {
        id,
        version,
        init,
        used: std::cell::Cell::new(Instant::now()),
        opener: peer,
        tenant,
    })
}

/// Initializes `up` with `body` (an `initialize` request with id `id`) and completes the
/// handshake (`notifications/initialized`): the upstream's session id and the `initialize`
/// result. The session id and version are written into a head first, so an upstream whose
/// values would not fit in a head fails here and never reaches a held or sealed session.
///
/// Whose a failure is, for the upstream's shared breaker: one to reach the upstream or a
/// session id it cannot give is the upstream's; an answer that is not an `initialize` result
/// is as [`UpstreamFailure::of_exchange`] says.
pub(super) async fn initialize(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
    body: &Bytes,
    id: Option<&Id>,
) -> Result<(Option<String>, Value), UpstreamFailure> {
    let own = |e: String| UpstreamFailure::Unrelayable(format!("its session: {e}"));
    let unsent = in_session(&[], None, None);
    let request = upstream_request(req, peer, up, body, &unsent).map_err(|e| own(e.to_string()))?;
    let (head, bytes) = upstream::call(&ctx.pool, up, tenant, request, MAX_ANSWER).await?;
    // An upstream that speaks only the stateless era: learnt, for the callers to bridge.
    if up.era == crate::config::UpstreamEra::Auto && super::era::refuses_session_era(&head, &bytes)
    {
        super::era::learn_stateless(ctx, up);
        return Err(own("it speaks only the stateless era (2026-07-28)".into()));
    }
    let session = session_id(&head).map_err(UpstreamFailure::Bad)?;
    let result = response_result(&head, &bytes, id)
        .map_err(|e| UpstreamFailure::of_exchange(head.status, format!("its session: {e}")))?;
    let version = result["protocolVersion"].as_str().unwrap_or_default();
    let initialized = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let replace = in_session(&[], session.as_deref(), Some(version));
    let request = upstream_request(req, peer, up, &Bytes::from_static(initialized), &replace)
        .map_err(|e| UpstreamFailure::Bad(format!("its answer to initialize: {e}")))?;
    let (head, _) = upstream::call(&ctx.pool, up, tenant, request, MAX_ANSWER).await?;
    if !(200..300).contains(&head.status) {
        return Err(UpstreamFailure::Bad(format!(
            "notifications/initialized got HTTP {}",
            head.status
        )));
    }
    Ok((session, result))
}

/// The session id an upstream's answer to `initialize` gives, if any; one longer than
/// [`MAX_SESSION_ID`] is the upstream's failure (that upstream is left out).
fn session_id(head: &ResponseHead) -> Result<Option<String>, String> {
    let Some(id) = head.headers.get(crate::http::name::MCP_SESSION_ID) else {
        return Ok(None);
    };
    if id.len() > MAX_SESSION_ID {
        return Err(format!(
            "its session id is {} bytes, over the {MAX_SESSION_ID} the gateway takes",
            id.len()
        ));
    }
    Ok(std::str::from_utf8(id).ok().map(str::to_owned))
}

/// A held session's answer, as the stateless client gets it.
pub(super) struct Answer {
    /// The upstream's head, or for a request answered in full a plain JSON one.
    pub head: ResponseHead,
    /// The answer to the request (one JSON-RPC message), or for anything else the upstream's
    /// body as it came.
    pub body: Vec<u8>,
    /// Notifications the upstream sent before its answer (progress, logs), each one JSON
    /// message.
    pub notes: Vec<Vec<u8>>,
}

/// Sends a stateless client's message `body` (a request with `id`, or a notification or
/// response without) to `up` over the held session of `owner`. A request's answer comes back
/// as one JSON message reshaped for the stateless era; `server/discover` is answered from the
/// session's `initialize` result.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the call"
)]
pub(super) async fn call(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    owner: Owner,
    body: &[u8],
    extra: &[(&str, Option<&str>)],
    gave_up: &mut GaveUp,
    client: Option<&Io>,
) -> Result<Answer, UpstreamFailure> {
    let mut message: Value = serde_json::from_slice(body)
        // The call's own failure, not the upstream's: nothing was sent (see `proxy::outcome_of`).
        .map_err(|e| UpstreamFailure::Unrelayable(format!("the request is not JSON: {e}")))?;
    let method = message["method"].as_str().unwrap_or_default().to_owned();
    let id = id_of(&message);
    if method == "server/discover" {
        // Only its id is held while the session opens (12 of 2 MB held 474 MiB: a review).
        let asked = message["id"].take();
        drop(message);
        let s = session(ctx, req, peer, up, owner).await?;
        let answer = json!({
            "jsonrpc": "2.0",
            "id": asked,
            "result": discover_from_initialize(&s.init),
        });
        return Ok(Answer {
            head: json_head(),
            body: super::json_bytes(&answer),
            notes: Vec::new(),
        });
    }
    // The session is shared (by a tenant's callers, by default): two callers' requests with
    // one id would meet there, and the upstream would give one's answer to the other. Each
    // goes under an id of the gateway's, and its answer gets the caller's back. A caller's
    // cancellation names its own id, which no request on the session carries: not sent.
    //
    // The gateway declared no client capabilities on the session, so the upstream asks its
    // clients nothing: a client's response would only answer a request the upstream made of
    // another caller. Accepted, not sent.
    if method == "notifications/cancelled" || (method.is_empty() && id.is_some()) {
        return Ok(Answer {
            head: accepted_head(),
            body: Vec::new(),
            notes: Vec::new(),
        });
    }
    // A request only: a client's response answers the upstream's own id.
    // Random, not counted: an upstream that files streams by request id alone (the Python
    // SDK's event store) would otherwise see one id from each gateway of a fleet, and again
    // after a restart.
    let sent = id
        .as_ref()
        .filter(|_| !method.is_empty())
        .map(|_| Id::Str(format!("mcp-gateway.{:016x}", crate::session::nonce())));
    if let Some(ours) = &sent {
        super::messages::set_in(&mut message, &["id"], ours.to_json());
    }
    if let Some(m) = message.as_object_mut() {
        crate::stdio::mux::strip_envelope(m);
    }
    let body = Bytes::from(super::json_bytes(&message));
    // Not held while the upstream answers (16 to 32 bytes a value: a review).
    drop(message);
    let key = (up.key, owner.key);
    let mut attempt = 0;
    let (head, bytes) = loop {
        attempt += 1;
        let s = session(ctx, req, peer, up, owner).await?;
        let replace = in_session(extra, s.id.as_deref(), Some(s.version.as_str()));
        let request = upstream_request(req, peer, up, &body, &replace)
            .map_err(|e| UpstreamFailure::Unrelayable(e.to_string()))?;
        // Armed while the call is out: a caller that stops waiting (its client left, and the
        // call's future was dropped) leaves it armed, and the call is cancelled.
        if let Some(ours) = &sent {
            *gave_up = GaveUp::cancellation(req, peer, up, owner, &replace, ours);
        }
        // Only the call is watched for its `client` leaving: a session being opened is
        // finished whoever waits for it (given up, it was left open at the upstream for good).
        let called = upstream::call(&ctx.pool, up, owner.tenant, request, MAX_ANSWER);
        let answered = match client {
            Some(client) => Box::pin(run_on(ctx, up, client, gave_up, called)).await,
            None => Some(called.await),
        };
        // Its client left: the call was cancelled, and read on to its end; or its client was
        // cut for a ban or deny (`None`): closed, its cancellation still armed for the caller.
        let answered = match answered {
            Some(answered) if !gave_up.left => answered,
            _ => {
                gave_up.sent = true;
                return Err(UpstreamFailure::ClientGone);
            }
        };
        let (head, bytes) = match answered {
            Ok(answer) => answer,
            Err(f) => {
                if f.sent_unanswered() {
                    gave_up.sent = true;
                } else {
                    gave_up.cancel = None;
                }
                return Err(f);
            }
        };
        gave_up.cancel = None;
        gave_up.sent = true;
        if attempt == 1 && session_lost(&head, &bytes) {
            // The upstream lost the session (restarted, expired): the request was not
            // processed, so it goes once more on a new one.
            tracing::info!(upstream = %up.name, "held session lost (404): opening a new one");
            forget(ctx, key, &s);
            continue;
        }
        break (head, bytes);
    };
    let mut answer = normalized(head, bytes, sent.as_ref(), &method)?;
    if let (Some(ours), Some(theirs)) = (&sent, &id) {
        answer.body = super::id::answering(answer.body, ours, theirs);
    }
    Ok(answer)
}

/// A held call given up on (it timed out, its connection failed after it was sent, or its
/// client was cut for a ban, while it was out): its
/// cancellation in the held session, sent once its client has its answer and before the
/// call's concurrency slot is given back ([`GaveUp::cancel`]). The session is not the
/// caller's, so nothing else ends the request there, and a tenant whose calls time out could
/// otherwise keep running at the upstream as many as it liked, whatever its cap (one more
/// every `response_timeout_ms`). A call whose client leaves is cancelled at once instead, and
/// read on to its end ([`run_on`]).
///
/// It also says whether the call itself went out (`sent`): written, and answered or not (a
/// failure while the session was being opened sends nothing); and whether its client left
/// while it was out (`left`).
#[derive(Default)]
pub(super) struct GaveUp {
    cancel: Option<super::abandoned::Cancellation>,
    pub sent: bool,
    pub left: bool,
}

impl GaveUp {
    /// The cancellation of the request `ours` in the session whose headers are `replace`.
    fn cancellation(
        req: &Request,
        peer: SocketAddr,
        up: &Upstream,
        owner: Owner,
        replace: &[(&str, Option<&str>)],
        ours: &Id,
    ) -> Self {
        let body = super::abandoned::cancellation(std::iter::once(ours));
        Self {
            cancel: body
                .and_then(|body| upstream_request(req, peer, up, &body, replace).ok())
                .map(|request| (request, owner.tenant)),
            sent: false,
            left: false,
        }
    }

    /// Sends the cancellation, if the call was given up on.
    pub(super) async fn cancel(self, ctx: &WorkerCtx, up: &Upstream) {
        if let Some((request, tenant)) = self.cancel {
            super::abandoned::cancel(ctx, up, tenant, request).await;
        }
    }
}

/// Waits for a held call (`called`) whose `client` may leave. Once it left, the call is
/// cancelled in the session at once (`gave_up`'s cancellation, sent) and read on to its end,
/// within the upstream's response timeout, and `gave_up` says it left: the call's concurrency
/// slot is held until the upstream is done with it (`abandoned::on_leaving`; an attacker's
/// review: the Python SDK's server runs a plain `def` tool on in a worker thread whatever the
/// cancellation, and a caller ran one more at once past its cap each time it called and hung
/// up). `None` when the client is cut for a ban or deny first: the call is closed, and its
/// cancellation left armed for the caller.
async fn run_on<T>(
    ctx: &WorkerCtx,
    up: &Upstream,
    client: &Io,
    gave_up: &mut GaveUp,
    called: impl std::future::Future<Output = T>,
) -> Option<T> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(client);
    let cut = || ctx.open.was_cut(fd);
    let left = std::cell::Cell::new(false);
    let watch = upstream::Watch {
        client,
        runs_on: Some(upstream::RunsOn {
            left: &left,
            cut: &cut,
        }),
    };
    let armed = &mut gave_up.cancel;
    let watched = std::pin::pin!(upstream::unless_client_leaves(watch, called));
    let (answered, _) =
        super::abandoned::on_leaving(ctx, up, &left, watched, || armed.take()).await;
    gave_up.left = left.get();
    answered
}

/// Like [`call`] for an upstream whose era is not known: the message goes as the client sent
/// it first, and over a held session only if the upstream refuses it for want of one. Either
/// way the answer comes back as [`call`] gives it.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the call"
)]
pub(super) async fn call_learning(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    owner: Owner,
    body: &Bytes,
    extra: &[(&str, Option<&str>)],
    gave_up: &mut GaveUp,
    client: Option<&Io>,
) -> Result<Answer, UpstreamFailure> {
    if era::known_session(ctx, up) == Some(true) {
        return call(ctx, req, peer, up, owner, body, extra, gave_up, client).await;
    }
    let mut replace = extra.to_vec();
    replace.extend(READ_WHOLE);
    let request = upstream_request(req, peer, up, body, &replace)
        .map_err(|e| UpstreamFailure::Unrelayable(e.to_string()))?;
    let called = upstream::call(&ctx.pool, up, owner.tenant, request, MAX_ANSWER).await;
    gave_up.sent = match &called {
        Ok(_) => true,
        Err(f) => f.sent_unanswered(),
    };
    let (head, bytes) = called?;
    if up.era == UpstreamEra::Auto && era::wants_session(&head, &bytes) {
        era::learn_session(ctx, up);
        return call(ctx, req, peer, up, owner, body, extra, gave_up, client).await;
    }
    let message: Value = serde_json::from_slice(body).unwrap_or_default();
    let id = id_of(&message);
    normalized(
        head,
        bytes,
        id.as_ref(),
        message["method"].as_str().unwrap_or_default(),
    )
}

/// A request's answer as one JSON message reshaped for the stateless era, with the
/// notifications before it; anything else as it came.
fn normalized(
    head: ResponseHead,
    bytes: Vec<u8>,
    id: Option<&Id>,
    method: &str,
) -> Result<Answer, UpstreamFailure> {
    if id.is_none() || !(200..300).contains(&head.status) {
        return Ok(Answer {
            head,
            body: bytes,
            notes: Vec::new(),
        });
    }
    let (answer, notes) = answer_and_notes(&head, &bytes, id)?;
    Ok(Answer {
        head: json_head(),
        body: for_stateless(method, answer),
        notes,
    })
}

/// Passthrough or a federation's routed call to an upstream whose era is not known: sent as
/// the client sent it and relayed as it arrives, unless the upstream refuses it for want of a
/// session (a small 400, read before anything is relayed): then the era is learnt and the
/// message goes over a held session.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward_learning<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    up: &'c Upstream,
    m: &Message,
    body: &Bytes,
    extra: &[(&str, Option<&str>)],
    member: Option<&str>,
    obs: &Obs<'c>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    let refused = (up.era == UpstreamEra::Auto).then_some(era::wants_session as Judge);
    match open_judging(io, req, peer, ctx, up, m, body, extra, obs, refused).await {
        Opened::Answered(keep) => keep,
        // Once per upstream and era change: boxed, not to widen every request's future.
        Opened::Refused => {
            era::learn_session(ctx, up);
            let owner = owner(ctx, up, obs);
            let sent = Instant::now();
            let mut gave_up = GaveUp::default();
            let answer = Box::pin(call(
                ctx,
                req,
                peer,
                up,
                owner,
                body,
                extra,
                &mut gave_up,
                Some(&*io),
            ))
            .await;
            obs.waited(sent.elapsed());
            let keep = Box::pin(reply(io, req, up, m, answer, obs, None)).await;
            gave_up.cancel(ctx, up).await;
            keep
        }
        Opened::Relay(conn, head) => {
            let id = m.request_id();
            super::relay::relay(io, conn, req, head, up, id, ctx, member, obs).await
        }
    }
}

/// Judges a small 400 answer: whether it refuses the request for an era reason (so it was not
/// processed).
pub(super) type Judge = fn(&ResponseHead, &[u8]) -> bool;

/// What [`open_judging`] found.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once and taken apart at once; a box would cost an allocation per request"
)]
pub(super) enum Opened {
    /// The client has its answer (a failure), or is gone: whether to keep the connection.
    Answered(bool),
    /// The upstream refused the message as the judge says; the connection is dropped.
    Refused,
    /// Anything else: to be relayed.
    Relay(upstream::Conn, ResponseHead),
}

/// Sends `body` to `up` as the client sent it (with `extra`) and reads the head. A 400 of at
/// most 4 KiB is read into the connection's buffer (consuming nothing, so that it can still be
/// relayed) and given to `refused`. Failures are answered to the client here.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn open_judging(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    up: &Upstream,
    m: &Message,
    body: &Bytes,
    extra: &[(&str, Option<&str>)],
    obs: &Obs<'_>,
    refused: Option<Judge>,
) -> Opened {
    let request = match upstream_request(req, peer, up, body, extra) {
        Ok(r) => r,
        Err(e) => {
            let err = super::RpcError::from(e).with_id(m.id.clone());
            let kept = io
                .write_all(super::proxy::json_response(400, &err, req.keep_alive))
                .await
                .is_ok();
            return Opened::Answered(kept);
        }
    };
    let sent = Instant::now();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*io);
    let cut = || ctx.open.was_cut(fd);
    let watch = super::relay::watch(io, obs, &cut);
    let opened = upstream::open(&ctx.pool, up, obs.tenant_key(ctx), request, Some(watch)).await;
    obs.waited(sent.elapsed());
    let (mut conn, head) = match opened {
        Ok(o) => o,
        Err(UpstreamFailure::ClientGone) => {
            obs.set(Outcome::UpstreamFailure);
            obs.abandoned.set(true);
            obs.client_left.set(true);
            return Opened::Answered(false);
        }
        Err(f) => {
            obs.failed(&f);
            return Opened::Answered(fail(io, req, up, m.id.clone(), f).await);
        }
    };
    if let Some(judge) = refused
        && head.status == 400
        && small_body(&mut conn, &head, up, judge).await
    {
        return Opened::Refused;
    }
    Opened::Relay(conn, head)
}

/// Reads a small (at most 4 KiB) fixed-length body into the connection's buffer, consuming
/// nothing so that it can still be relayed, and gives it to `judge`. A body that is larger,
/// chunked or does not arrive in time is not judged (false).
async fn small_body(
    conn: &mut upstream::Conn,
    head: &ResponseHead,
    up: &Upstream,
    judge: impl FnOnce(&ResponseHead, &[u8]) -> bool,
) -> bool {
    let Ok(Some(http::BodyKind::Length(n))) = http::framing(&head.headers, 4096) else {
        return false;
    };
    let deadline = monoio::time::Instant::now() + up.response_timeout;
    while conn.pending().len() < n {
        match conn.fill_until(deadline).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    conn.pending().get(..n).is_some_and(|b| judge(head, b))
}

/// Whether the upstream no longer knows the session: 404, as the specification says, or the
/// 400 some servers answer instead. Other 400s are not retried (a client could otherwise make
/// every bad request cost the upstream a new session).
fn session_lost(head: &ResponseHead, body: &[u8]) -> bool {
    head.status == 404 || era::wants_session(head, body)
}

/// The answer to `id` in a JSON or SSE body, and the notifications before it. The server's
/// own requests are dropped: a stateless client cannot answer them.
fn answer_and_notes(
    head: &ResponseHead,
    body: &[u8],
    id: Option<&Id>,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), UpstreamFailure> {
    let (answer, notes) =
        super::messages::answer_and_notes(head, body, id).map_err(UpstreamFailure::Unrelayable)?;
    Ok((
        super::json_bytes(&answer),
        notes.iter().map(super::json_bytes).collect(),
    ))
}

/// The id of a request message, as the answer must carry it.
fn id_of(message: &Value) -> Option<Id> {
    match &message["id"] {
        Value::String(s) => Some(Id::Str(s.clone())),
        Value::Number(n) => n.as_i64().map(Id::Num),
        _ => None,
    }
}

/// The head of a message accepted without an answer (a notification, a response).
pub(super) fn accepted_head() -> ResponseHead {
    ResponseHead {
        status: 202,
        headers: http::Fields::default(),
    }
}

/// The head of an answer the gateway reshaped into one JSON message.
pub(super) fn json_head() -> ResponseHead {
    ResponseHead {
        status: 200,
        headers: [("content-type", "application/json")].into_iter().collect(),
    }
}

/// What the caller of [`forward`] or [`reply`] does to the answer's message before the client
/// has it (keeps a tenant's tools, keeps a caller's tasks, takes note of a task made); an
/// error is the answer's fault, and the client is told so instead.
pub(super) type Edit<'a> = Option<&'a dyn Fn(&mut Value) -> Result<(), String>>;

/// Passthrough: answers a stateless client's POSTed message `m` from `up`, over a held session
/// if `up` needs one ([`call_learning`]), read whole, and given to `edit`.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    up: &'c Upstream,
    m: &Message,
    obs: &Obs<'c>,
    edit: Edit<'_>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    let owner = owner(ctx, up, obs);
    let sent = Instant::now();
    // A stateless client has no session: an id it sends is not passed on.
    let unsent = [("mcp-session-id", None)];
    let mut gave_up = GaveUp::default();
    let answer = call_learning(
        ctx,
        req,
        peer,
        up,
        owner,
        &req.body,
        &unsent,
        &mut gave_up,
        Some(io),
    )
    .await;
    obs.waited(sent.elapsed());
    // Sent, and not answered as the caller reads it: the upstream may have acted on it.
    obs.unanswered.set(gave_up.sent && answer.is_err());
    let keep = match answer {
        // The client left: the call was cancelled in the held session, which nothing else
        // would end, and read on to its end (`run_on`); or, cut for a ban, it is cancelled
        // now.
        Err(UpstreamFailure::ClientGone) => {
            obs.set(Outcome::UpstreamFailure);
            obs.client_left.set(true);
            false
        }
        answer => reply(io, req, up, m, answer, obs, edit).await,
    };
    gave_up.cancel(ctx, up).await;
    keep
}

/// Writes a held session's `answer` to message `m` for the stateless client: 202 for a
/// notification or a response, the answer as JSON (or, with notifications before it and a
/// client that takes a stream, as SSE), a failure as a JSON-RPC error naming the upstream.
pub(super) async fn reply(
    io: &mut Io,
    req: &Request,
    up: &Upstream,
    m: &Message,
    answer: Result<Answer, UpstreamFailure>,
    obs: &Obs<'_>,
    edit: Edit<'_>,
) -> bool {
    let id = m.id.clone();
    let answer = match answer {
        Ok(a) => a,
        Err(f) => {
            obs.failed(&f);
            return fail(io, req, up, id, f).await;
        }
    };
    let status = answer.head.status;
    if (400..500).contains(&status) && status != 404 {
        // A refusal of the request (a 429 with its `Retry-After`, a 400 with the JSON-RPC
        // error): the client's to read, as the upstream gave it.
        return super::proxy::relay_refusal(io, req, up, id, &answer.head, &answer.body, obs).await;
    }
    if !(200..300).contains(&status) {
        if status >= 500 {
            obs.failed_by(super::proxy::Blame::of_status(status));
        } else {
            // A 404 once more after a new session (a redirect fails as it opens): an answer to this request,
            // as on passthrough, not a sign of the upstream's health either way (it opened the
            // upstream's shared breaker for every tenant).
            obs.own_failure();
        }
        let f = UpstreamFailure::Bad(format!("answered HTTP {status}"));
        return fail(io, req, up, id, f).await;
    }
    if m.kind != Kind::Request {
        obs.set(Outcome::Ok);
        return io
            .write_all(http::response(202, &[], b"", req.keep_alive))
            .await
            .is_ok();
    }
    let mut body = answer.body;
    if let Some(edit) = edit {
        match edited(&body, edit) {
            Ok(b) => body = b,
            Err(why) => {
                obs.set(Outcome::UpstreamFailure);
                return fail(io, req, up, id, UpstreamFailure::Bad(why)).await;
            }
        }
    }
    obs.set(classify(&body));
    if !answer.notes.is_empty() && sse::accepts_sse(req) {
        let mut out = sse::sse_head(req);
        for note in &answer.notes {
            out.extend_from_slice(&sse::sse_event(note));
        }
        out.extend_from_slice(&sse::sse_event(&body));
        out.extend_from_slice(b"0\r\n\r\n");
        return io.write_all(out).await.is_ok() && req.keep_alive;
    }
    io.write_all(http::response(
        200,
        &[("content-type", "application/json")],
        &body,
        req.keep_alive,
    ))
    .await
    .is_ok()
}

/// The answer `body` as `edit` leaves it.
fn edited(body: &[u8], edit: &dyn Fn(&mut Value) -> Result<(), String>) -> Result<Vec<u8>, String> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    edit(&mut v)?;
    Ok(super::json_bytes(&v))
}

/// A `tools/list` answer with only the tools `keep` keeps; an answer that cannot be filtered
/// is not passed on unfiltered.
pub(super) fn keep_listed(v: &mut Value, keep: &dyn Fn(&Value) -> bool) -> Result<(), String> {
    if v.get("error").is_some() {
        return Ok(());
    }
    v.get_mut("result")
        .and_then(|r| super::messages::keep_tools(r, keep))
        .ok_or_else(|| "the answer to tools/list has no `result.tools` array".to_owned())
}

/// A failure as a line for the log and the client.
pub(super) fn describe(f: UpstreamFailure) -> String {
    match f {
        UpstreamFailure::Timeout => "did not answer in time".into(),
        UpstreamFailure::Connect(d)
        | UpstreamFailure::Unsent(d)
        | UpstreamFailure::NoResponse(d)
        | UpstreamFailure::Denied(d)
        | UpstreamFailure::Unrelayable(d)
        | UpstreamFailure::Unavailable(d)
        | UpstreamFailure::Bad(d) => d,
        UpstreamFailure::Tls { detail, .. } => detail,
        UpstreamFailure::ClientGone => "the client left".into(),
        UpstreamFailure::OutOfDescriptors => "the gateway is out of file descriptors".into(),
        UpstreamFailure::SessionLost => "the replica holding the session is gone".into(),
    }
}

/// What a worker does with the sessions it holds when it evicts them or stops.
impl WorkerCtx {
    /// The worker's task that ends the upstream sessions it evicts: see `held`.
    pub async fn end_evicted_sessions(self: Rc<Self>) {
        super::held::Held::end_evicted(self).await;
    }

    /// Ends the upstream sessions this worker holds (it is stopping): see `held`.
    pub async fn end_held_sessions(&self) {
        super::held::Held::end_all(self).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_with(id: &str) -> ResponseHead {
        let mut headers = http::Fields::default();
        headers.push("mcp-session-id", id.as_bytes());
        ResponseHead {
            status: 200,
            headers,
        }
    }

    /// An upstream's session id past [`MAX_SESSION_ID`] fails its `initialize` (a held session
    /// or a federation's member is not opened with it); the SDKs' ids pass as they came.
    #[test]
    fn an_upstream_session_id_past_the_limit_fails_its_initialize() {
        let uuid = "6f1c2a4e-8b7d-4c1e-9a3f-2d5e7b9c0a1f";
        assert_eq!(session_id(&head_with(uuid)), Ok(Some(uuid.to_owned())));
        let hex = "a".repeat(64);
        assert_eq!(session_id(&head_with(&hex)), Ok(Some(hex.clone())));
        let at = "b".repeat(MAX_SESSION_ID);
        assert_eq!(session_id(&head_with(&at)), Ok(Some(at.clone())));
        for long in [MAX_SESSION_ID + 1, 12_000] {
            let why = session_id(&head_with(&"c".repeat(long))).unwrap_err();
            assert!(why.contains(&format!("{long} bytes")), "{why}");
        }
        let none = ResponseHead {
            status: 200,
            headers: http::Fields::default(),
        };
        assert_eq!(session_id(&none), Ok(None));
    }
}
