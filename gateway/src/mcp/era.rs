//! What the gateway knows of each upstream's era: whether it speaks only the session era
//! (its stateless clients are served over a held session: [`super::held`]) or only the
//! stateless one (its session-era clients are bridged: [`super::bridge`]). Configured
//! (`era`), or learnt from a refusal that says so and kept for [`ERA_TTL`].

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{upstream::ResponseHead, version, worker::WorkerCtx};
use crate::config::{Upstream, UpstreamEra};

/// How long an upstream's era, once learnt, is taken as known; then one request tells again.
const ERA_TTL: Duration = Duration::from_secs(300);

/// Whether `up` is known to speak only the session era: configured so, or (`era = "auto"`)
/// learnt lately from its refusal of a stateless request. `None`: not known either way, so
/// the request goes as the client sent it and the answer tells ([`super::held::forward_learning`],
/// [`super::held::call_learning`]).
pub(super) fn known_session(ctx: &WorkerCtx, up: &Upstream) -> Option<bool> {
    match up.era {
        UpstreamEra::Session => Some(true),
        UpstreamEra::Stateless => Some(false),
        UpstreamEra::Auto => ctx
            .held
            .eras
            .borrow()
            .get(&up.key)
            .is_some_and(|at| at.elapsed() < ERA_TTL)
            .then_some(true),
    }
}

pub(super) fn learn_session(ctx: &WorkerCtx, up: &Upstream) {
    tracing::info!(upstream = %up.name, "speaks the session era only: stateless clients are served over a held session");
    ctx.held.eras.borrow_mut().insert(up.key, Instant::now());
}

/// Whether a 400 says the request needs a session, so it was not processed: the refusal the
/// SDKs' transports make before any handler runs ("Bad Request: Server not initialized",
/// "Bad Request: No valid session ID provided", "Bad Request: Missing session ID", …). Such a
/// refusal answers no request (its id is null), with -32000 or -32600, and says that alone.
/// Anything else is the request's own answer: a handler's error may echo what the client sent
/// (the Python SDK's `Unknown resource: <uri>`, a tool's own message), and read as this it let
/// any caller make the gateway take the upstream for a session-era one, for every tenant, and
/// send the request, which had run, a second time (an attacker's review).
pub(super) fn wants_session(head: &ResponseHead, body: &[u8]) -> bool {
    if head.status != 400 || body.len() > 4096 {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let error = &v["error"];
    let transport_refusal = v.get("id").is_none_or(Value::is_null)
        && (error["code"] == -32000 || error["code"] == -32600);
    transport_refusal
        && error["message"].as_str().is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            let m = m.strip_prefix("bad request:").unwrap_or(&m).trim();
            let m = m.strip_suffix('.').unwrap_or(m);
            matches!(
                m,
                "server not initialized"
                    | "no valid session id provided"
                    | "no valid session id"
                    | "mcp-session-id header is required"
                    | "missing session id"
            )
        })
}

/// Whether `up` is known to speak only the stateless era: configured so, or learnt lately.
pub(super) fn known_stateless(ctx: &WorkerCtx, up: &Upstream) -> bool {
    match up.era {
        UpstreamEra::Stateless => true,
        UpstreamEra::Session => false,
        UpstreamEra::Auto => ctx
            .shared
            .stateless_upstreams
            .pin()
            .get(&up.key)
            .is_some_and(|at| at.elapsed() < ERA_TTL),
    }
}

/// Learns that `up` speaks only the stateless era, and so forgets that it spoke only the
/// session era if that was learnt (an upstream upgraded in place).
pub(super) fn learn_stateless(ctx: &WorkerCtx, up: &Upstream) {
    tracing::info!(upstream = %up.name, "speaks the stateless era only: session-era clients are bridged");
    ctx.held.eras.borrow_mut().remove(&up.key);
    ctx.shared
        .stateless_upstreams
        .pin()
        .insert(up.key, Instant::now());
}

/// Whether a 400 refuses a session-era request because the upstream speaks only the stateless
/// era: JSON-RPC -32022 whose `supported` list names stateless-era versions only.
pub(super) fn refuses_session_era(head: &ResponseHead, body: &[u8]) -> bool {
    if head.status != 400 {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let error = &v["error"];
    error["code"] == -32022
        && error["data"]["supported"].as_array().is_some_and(|s| {
            !s.is_empty()
                && s.iter()
                    .all(|x| x.as_str().is_some_and(version::is_stateless_era))
        })
}

#[cfg(test)]
#[path = "era_tests.rs"]
mod tests;
