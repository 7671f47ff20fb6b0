//! A session-era call the gateway gave up on (its client left, or the upstream did not answer
//! in time): the upstream is told to stop.
//!
//! Up to 2025-11-25 a closed connection is not a cancellation: the specification asks servers
//! not to read it as one, and a client's request runs on in its session. Its concurrency slot at
//! the gateway is given back when the call ends here, so a client could start calls and hang
//! up, over and over, and hold the upstream far past its limit. Before the slot is given back,
//! each request of the abandoned message is cancelled (`notifications/cancelled`) in the
//! session it ran in, as the client would have cancelled it. Not when an event with an id
//! reached the client: it can resume that stream (`Last-Event-ID`), and the call must go on for
//! it; the gateway then reads the stream to its end as if the client were there, so the slot
//! is held until the call ends (`relay::drain`). `initialize` is never cancelled (the specification forbids it), nor a request that asked
//! for a task. A call with no session to be cancelled in keeps its upstream exchange to its
//! end when its client leaves, its slot held until then (`Obs::runs_on`): in 2026-07-28
//! closing the stream is the cancellation, but servers run on regardless (the Python SDK's,
//! answering with JSON), unless the upstream is said to stop (`closing_cancels`).

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
