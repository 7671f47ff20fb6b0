//! A session-era call the gateway gave up on (its client left, or the upstream did not answer
//! in time): the upstream is told to stop.
//!
//! Up to 2025-11-25 a closed connection is not a cancellation: the specification asks servers
//! not to read it as one, and a client's request runs on in its session. So each request of a
//! message whose client left is cancelled (`notifications/cancelled`) in the session it ran
//! in, as the client would have cancelled it, at once ([`on_leaving`]). Its concurrency slot
//! at the gateway is not given back then: the gateway reads the call's exchange on to its end
//! (its answer, or its stream's: `Obs::runs_on`), and gives the slot back only then. A server
//! that stops ends the exchange at once (the Python SDK's answers the cancelled request with
//! -32800), but one cannot always stop: the Python SDK runs a plain `def` tool in a worker
//! thread, which runs on, and answers only once it returned (a TypeScript tool that ignores its
//! abort signal likewise). Giving the slot back with the cancellation let a client start calls
//! and hang up, over and over, and run one more at the upstream each round, past every cap (an
//! attacker's review: 13 at once under a tenant cap of 4, 6 under a tool cap of 1).
//!
//! Not cancelled when an event with an id reached the client: it can resume that stream
//! (`Last-Event-ID`), and the call must go on for it; the gateway then reads the stream to its
//! end as if the client were there, so the slot is held until the call ends (`relay::drain`).
//! `initialize` is never cancelled (the specification forbids it), nor a request that asked for
//! a task. A call with no session to be cancelled in keeps its upstream exchange to its end the
//! same way when its client leaves (`Obs::runs_on`): in 2026-07-28 closing the stream is the
//! cancellation, but servers run on regardless (the Python SDK's, answering with JSON), unless
//! the upstream is said to stop (`closing_cancels`). A call the gateway gives up on itself (a
//! timeout) is cancelled once it gave up, and its slot given back then.

use std::{cell::Cell, future::Future, pin::Pin, task::Poll};

use bytes::Bytes;
use serde_json::{Value, json};

use super::{Id, Kind, Message, upstream::open, worker::WorkerCtx};
use crate::{config::Upstream, http};

/// The id of `m` if it is a request that can be cancelled (not `initialize`, and not one that
/// asks for a task: a task is cancelled with `tasks/cancel`, and its creator may still fetch
/// its result).
pub(super) fn cancellable(m: &Message) -> Option<&Id> {
    (m.kind == Kind::Request && m.method.as_deref() != Some("initialize") && m.asks_task.is_none())
        .then_some(m.id.as_ref())
        .flatten()
}

/// The body that cancels the requests `ids`: one notification, or a batch of them for a batch
/// (which only 2025-03-26, the one era that has batches, sends). None when nothing is to be
/// cancelled.
pub(super) fn cancellation<'m>(ids: impl Iterator<Item = &'m Id>) -> Option<Bytes> {
    let mut each: Vec<Value> = ids
        .map(|id| {
            json!({
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": id.to_json(), "reason": "abandoned at the gateway: the client left or the call timed out"},
            })
        })
        .collect();
    let body = match each.len() {
        0 => return None,
        1 => each.pop()?,
        _ => Value::Array(each),
    };
    Some(Bytes::from(super::json_bytes(&body)))
}

/// Sends the cancellation `request` (built as the abandoned one was, in its session) and reads
/// the head of the answer. Nobody waits for it but the slot, so a failure is only logged.
pub(super) async fn cancel(ctx: &WorkerCtx, up: &Upstream, tenant: u64, request: http::Outgoing) {
    match open(&ctx.pool, up, tenant, request, None).await {
        Ok((_, head)) if head.status < 300 => {
            tracing::debug!(upstream = %up.name, "an abandoned call was cancelled");
        }
        Ok((_, head)) => crate::throttled_warn!(
            "upstream `{}` answered HTTP {} to the cancellation of an abandoned call",
            up.name,
            head.status
        ),
        Err(f) => crate::throttled_warn!(
            "the cancellation of an abandoned call did not reach upstream `{}`: {}",
            up.name,
            super::held::describe(f)
        ),
    }
}

/// The cancellation of a session-era call, built when its client leaves: the request, and the
/// tenant key whose pooled connections carry it.
pub(super) type Cancellation = (http::Outgoing, u64);

/// Runs `call`, the exchange of a session-era call that runs on when its client leaves
/// (`Obs::runs_on`), and once `left` says its client left while the exchange is still out,
/// sends its cancellation (`cancellation`, built then; `None` when there is nothing to cancel)
/// beside it: at once, so that a server that stops does, while the exchange is read on to its
/// end, so that the call's slot is held until the server is done with it (see the module's
/// doc). Returns `call`'s output once both are over, and whether a cancellation was sent (the
/// caller then sends none of its own).
///
/// An exchange over before its client was seen leaving needs no cancellation: it was answered,
/// or given up on by the gateway (which cancels it as it did before).
///
/// `call` comes pinned by the caller: taken by value and pinned here, it was held twice in this
/// future (the argument, then the pinned copy), 4 KiB of every request's state on the direct
/// path.
pub(super) async fn on_leaving<T, F: Future<Output = T>>(
    ctx: &WorkerCtx,
    up: &Upstream,
    left: &Cell<bool>,
    mut call: Pin<&mut F>,
    cancellation: impl FnOnce() -> Option<Cancellation>,
) -> (T, bool) {
    let mut cancellation = Some(cancellation);
    // Boxed: most calls' clients stay, and every call's future would carry it.
    let mut sending: Option<Pin<Box<dyn Future<Output = ()> + '_>>> = None;
    let mut sent = false;
    let mut done = None;
    let out = std::future::poll_fn(|cx| {
        if done.is_none()
            && let Poll::Ready(o) = call.as_mut().poll(cx)
        {
            done = Some(o);
        }
        if done.is_none()
            && left.get()
            && let Some((request, tenant)) = cancellation.take().and_then(|build| build())
        {
            sent = true;
            sending = Some(Box::pin(cancel(ctx, up, tenant, request)));
        }
        if let Some(s) = &mut sending
            && s.as_mut().poll(cx).is_ready()
        {
            sending = None;
        }
        match (sending.is_none(), done.take()) {
            (true, Some(o)) => Poll::Ready(o),
            (_, o) => {
                done = o;
                Poll::Pending
            }
        }
    })
    .await;
    (out, sent)
}
