//! A request forwarded ([`forward`]) and the answer's way back to the client: the upstream's response head made safe to relay
//! ([`client_head`]), its body streamed as it arrives ([`Body`]: taken from the upstream
//! connection a piece at a time, classified as it passes, SSE events held until whole and
//! rewritten for a federation, framed for the client), then the upstream connection pooled
//! again or dropped. Nothing more is read from the upstream until the client has taken what
//! was read (backpressure).

use std::time::Instant;

use super::{
    Id, RpcError,
    answer::{AnswerScan, scan},
    messages::Answers,
    proxy::{Blame, Obs, fail, is_hop_by_hop, sign_session},
    sse::EventBuffer,
    upstream::{Conn, ResponseHead, RunsOn, UpstreamFailure, Watch, open, unless_client_leaves},
    worker::WorkerCtx,
};
use crate::{
    config::Upstream,
    http::{self, BodyKind, ChunkedDecoder, HttpError, Io, Request},
    shared::Draining,
    stats::Outcome,
};

/// Forwards `request` (already built for `up`) and relays the answer to the client. `member`
/// names the upstream inside a federation, whose events are rewritten on the way.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward<'c>(
    client: &mut Io,
    req: &Request,
    request: http::Outgoing,
    up: &'c Upstream,
    request_id: Option<Id>,
    ctx: &WorkerCtx,
    member: Option<&str>,
    obs: &Obs<'c>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    let sent = Instant::now();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*client);
    let cut = || ctx.open.was_cut(fd);
    let opened = open(
        &ctx.pool,
        up,
        obs.tenant_key(ctx),
        request,
        Some(watch(client, obs, &cut)),
    )
    .await;
    obs.waited(sent.elapsed());
    match opened {
        Ok((conn, head)) => relay(client, conn, req, head, up, request_id, ctx, member, obs).await,
        // The client gave up waiting; the upstream connection was closed, which cancels there.
        Err(UpstreamFailure::ClientGone) => {
            obs.set(Outcome::UpstreamFailure);
            obs.abandoned.set(true);
            obs.client_left.set(true);
            false
        }
        // The gateway gave up waiting: the call may still run there.
        Err(f @ UpstreamFailure::Timeout) => {
            obs.failed_by(Blame::Unclear);
            obs.abandoned.set(true);
            fail(client, req, up, request_id, f).await
        }
        Err(f) => {
            obs.failed(&f);
            fail(client, req, up, request_id, f).await
        }
    }
}

/// How a wait on the upstream for `client`'s call watches it: given up when the client leaves,
/// unless the call runs on without it (`Obs::runs_on`): then `obs.client_left` says it left,
/// and only its being `cut` ends the wait.
pub(super) fn watch<'a>(client: &'a Io, obs: &'a Obs<'_>, cut: &'a dyn Fn() -> bool) -> Watch<'a> {
    Watch {
        client,
        runs_on: obs.runs_on.get().then_some(RunsOn {
            left: &obs.client_left,
            cut,
        }),
    }
}

/// Largest event kept to tell a result from an error and a tool's failure (an event stream's
/// answer is its last event; other answers are scanned as they pass, whatever their size).
const CLASSIFY_MAX: usize = 64 * 1024;

const EVENT_TOO_LARGE: &str = "upstream event larger than the body limit";
const ANSWER_TOO_LARGE: &str = "member's answer larger than the body limit";
const STALLED: &str = "upstream stalled mid-response";
const UNREADABLE: &str = "answer is not JSON the gateway reads as a client does";

/// Notes what a relay that failed for `why` says of the upstream: an answer over the gateway's
/// limit, or one it cannot read to check, is the call's own failure (see `proxy::outcome_of`:
/// a tool's output can be shaped by its caller, nested too deep, say), a stall a timeout,
/// anything else the upstream's failure.
fn failed(obs: &Obs<'_>, why: &str) {
    if why == EVENT_TOO_LARGE || why == ANSWER_TOO_LARGE || why == UNREADABLE {
        obs.own_failure();
    } else if why == STALLED {
        obs.failed_by(super::proxy::Blame::Unclear);
    } else {
        obs.set(Outcome::UpstreamFailure);
    }
}

/// Why an answer that answers another request than the one sent to it fails.
const ANOTHER_REQUEST: &str = "answered another request than the one sent to it";

/// The room a large answer's body is read into, a piece at a time.
const RELAY_READ: usize = 128 * 1024;

/// A JSON answer at most this large is written to the client with its head in one write.
const HOLD_SMALL: usize = 16 * 1024;

/// Bytes a second: a wait for an answer's body that brings at least this much is progress,
/// however long it was (see the body's deadline in `relay`).
const MIN_RATE: usize = 8 * 1024;

/// Streams the answer of an exchange already opened (what [`forward`] does once the head is
/// in) to the client. Returns whether the client connection can carry another request.
/// Outside a federation the upstream's session id is signed for the client; inside one
/// (`member`), the upstream's session header is dropped (the client holds the gateway's) and
/// each SSE event is rewritten.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the relay; a struct would only rename them"
)]
pub(super) async fn relay(
    client: &mut Io,
    mut conn: Conn,
    req: &Request,
    mut head: ResponseHead,
    up: &Upstream,
    request_id: Option<Id>,
    ctx: &WorkerCtx,
    member: Option<&str>,
    obs: &Obs<'_>,
) -> bool {
    // The client left a call that runs on without it while its answer's head was awaited
    // (`Obs::runs_on`): an answer other than an event stream comes once the call is over, and
    // nothing is left to wait for (an event stream is read on: see `pump`).
    if obs.runs_on.get() && obs.client_left.get() && !head.is_sse() {
        obs.set(Outcome::UpstreamFailure);
        return false;
    }
    if member.is_none() {
        sign_session(ctx, up, &mut head, obs);
    }
    if head.status >= 500 {
        obs.failed_by(super::proxy::Blame::of_status(head.status));
    } else if head.status >= 400 {
        obs.own_failure();
    }
    let kind = match body_kind(req, &head) {
        Ok(k) => k,
        Err(f) => {
            obs.set(Outcome::UpstreamFailure);
            return fail(client, req, up, request_id, f).await;
        }
    };
    if let Some(f) = unasked_body(req, &head, kind, request_id.is_some()) {
        obs.set(Outcome::UpstreamFailure);
        return fail(client, req, up, request_id, f).await;
    }
    let upstream_close = head.closes();
    let Some(kind) = kind else {
        return head_only(client, conn, req, &head, up, request_id, ctx, member, obs).await;
    };
    let (mut out, framing) = match client_head(&head, Some(kind), req, up, member, obs) {
        Ok(o) => o,
        Err(f) => {
            obs.set(Outcome::UpstreamFailure);
            return fail(client, req, up, request_id, f).await;
        }
    };
    // One event is held at most as large as a request body may be.
    let max_event = ctx.shared.snapshot.load().config.http.max_body_bytes;
    let mut body = Body::new(
        kind,
        framing,
        head.is_sse(),
        member,
        request_id.is_some(),
        max_event,
    );
    // A batch has no one id: its answer is an array, of any length (see `stream_answers`).
    let asked = request_id.is_some() || is_batch(req);
    let holding = Holding::of(
        &mut body,
        kind,
        head.status,
        member.is_some(),
        request_id.is_some(),
        asked,
        max_event,
    );
    // What an answer held whole may answer is judged by `Holding`, by its id: the digest is
    // for what is read as it passes (and signed into event ids).
    if body.sse || body.whole.is_none() {
        body.answers = stream_answers(req, request_id.as_ref(), obs);
    }
    if body.sse {
        let ids = super::proxy::event_signer(ctx, up, obs, member.is_some(), body.answers);
        body.ids = Some(Box::new(ids));
    }
    let hold_max = holding.max;
    let head_len = out.len();
    if let Err(why) = body.first_piece(&mut conn, &mut out, hold_max) {
        failed(obs, why);
        return unwritten_failure(client, req, up, request_id, why).await;
    }
    // A large body is read in large pieces, each handed to the client without a copy.
    if let BodyKind::Length(_) = kind
        && body.remaining > RELAY_READ / 2
    {
        conn.expect(body.remaining.min(RELAY_READ));
    }
    // The head waits with a held answer, and with a JSON answer to a request whose body has
    // not begun: it goes out with the body's first piece, once that was read for the id it
    // answers (`Body::observe`). One that answers another request is then refused whole, a
    // JSON-RPC error the client reads, rather than cut after its head (the Python SDK's client
    // ends its whole session on a body cut short).
    let head_waits = body.classify && !body.sse && out.len() == head_len;
    let mut unwritten = Some(out);
    if body.whole.is_none()
        && !head_waits
        && let Some(out) = unwritten.take()
        && client.write_all(out).await.is_err()
    {
        // On an event stream, a call that runs on without its client is read to its end (see
        // `pump`).
        if obs.runs_on.get() && body.sse {
            obs.client_left.set(true);
        } else {
            obs.abandoned.set(true);
            return false;
        }
    }
    body.delivered();
    let pumped = pump(
        client,
        &mut conn,
        req,
        up,
        &mut body,
        kind,
        hold_max,
        &mut unwritten,
        obs,
        ctx,
        request_id.as_ref(),
    );
    let finished = match pumped.await {
        Pumped::Finished(finished) => finished,
        Pumped::ClientLeft {
            drain: Some(entry), ..
        } => {
            let reusable = kind != BodyKind::UntilClose && !upstream_close;
            obs.set(Outcome::UpstreamFailure);
            // Boxed, as the failure below and `proxy::fail`: paths taken rarely do not make
            // every request's future larger (see `proxy::fail`).
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*client);
            Box::pin(drain(conn, &mut body, entry, up, ctx, reusable, obs, fd)).await;
            // Only now: a call its client left while it runs on is cancelled in its session
            // (`abandoned::on_leaving`), and this one is drained for the client to resume.
            obs.client_left.set(true);
            return false;
        }
        Pumped::ClientLeft {
            taken_over: Some(entry),
            ..
        } => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*client);
            Box::pin(hand_over(conn, entry, up, ctx, obs, fd)).await;
            return false;
        }
        Pumped::ClientLeft { .. } => {
            // Dropping `conn` closes it, which cancels there (in 2026-07-28; before, see
            // `abandoned`).
            obs.abandoned.set(true);
            return false;
        }
        Pumped::RanOn(finished) => {
            obs.set(Outcome::UpstreamFailure);
            obs.client_left.set(true);
            if finished.is_ok() && kind != BodyKind::UntilClose && !upstream_close {
                ctx.pool.checkin(up, conn);
            }
            return false;
        }
    };
    let finished =
        finished.and_then(|()| holding.judge(body.whole.as_deref(), request_id.as_ref()));
    if let Err(why) = finished {
        failed(obs, why);
        if unwritten.is_some() {
            return unwritten_failure(client, req, up, request_id, why).await;
        }
        return Box::pin(body.failed(client, up, request_id, why)).await && req.keep_alive;
    }
    if let Some(mut out) = unwritten {
        if let Some(whole) = body.whole.take() {
            body.observe_whole(&whole);
            body.push_framed(&mut out, &whole);
        }
        if client.write_all(out).await.is_err() {
            return false;
        }
    }
    // No answer to a request: the call's failure, and nothing of the upstream's health (a
    // client that ended its own session mid-call drew an empty stream, taken for a success
    // that kept other calls' timeouts from counting).
    let (outcome, unanswered) = body.verdict(holding.checked);
    if unanswered {
        obs.own_failure();
    }
    obs.set(outcome);
    if let Some(last) = body.rest() {
        // A last event without its blank line.
        let _ = client.write_all(body.framed(last)).await;
    }
    if body.framing == Framing::Chunked && client.write_all(b"0\r\n\r\n".to_vec()).await.is_err() {
        return false;
    }
    if kind != BodyKind::UntilClose && !upstream_close {
        ctx.pool.checkin(up, conn);
    }
    body.framing != Framing::UntilClose && req.keep_alive
}

/// The responses an answer's event stream may carry ([`Answers`]): the request's; on a GET,
/// those of the stream it resumes (none on the session's own stream); a batch's are not
/// checked; a message that is not a request is answered by none.
fn stream_answers(req: &Request, request_id: Option<&Id>, obs: &Obs<'_>) -> Answers {
    if let Some(id) = request_id {
        return Answers::to(Some(&id.to_json()));
    }
    if req.method == "GET" {
        return obs.resumes.get().unwrap_or(Answers::Nothing);
    }
    if is_batch(req) {
        return Answers::Any;
    }
    Answers::Nothing
}

/// Whether the request is a batch (a JSON array).
fn is_batch(req: &Request) -> bool {
    req.body.trim_ascii_start().first() == Some(&b'[')
}

/// How the pieces after the head went.
enum Pumped<'s> {
    /// The body was relayed whole, or failed (why).
    Finished(Result<(), &'static str>),
    /// The client went away. `drain`: the stream is one it can resume, so the call runs on
    /// for it (not for a client cut for its ban or deny, which does not come back for it),
    /// with its entry for a resume (`None` without a session to resume in). `taken_over`: a
    /// resume asked for the stream before the drain began.
    ClientLeft {
        drain: Option<Option<Draining<'s>>>,
        taken_over: Option<Draining<'s>>,
    },
    /// The client left a call that runs on without it (`Obs::runs_on`): its stream was read on
    /// to its end (or failed, why), as if the client were there.
    RanOn(Result<(), &'static str>),
}

impl<'s> Pumped<'s> {
    /// The client left, and the call ends with it.
    const GONE: Self = Pumped::ClientLeft {
        drain: None,
        taken_over: None,
    };
}

/// Relays the pieces of `body` after the first, each as it arrives (or holds them, for an
/// answer judged whole before it goes out).
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the relay"
)]
async fn pump<'s>(
    client: &mut Io,
    conn: &mut Conn,
    req: &Request,
    up: &Upstream,
    body: &mut Body<'_>,
    kind: BodyKind,
    hold_max: usize,
    // The head, when it waits for the body's first piece (see `relay`).
    head: &mut Option<Vec<u8>>,
    obs: &Obs<'_>,
    ctx: &'s WorkerCtx,
    request_id: Option<&Id>,
) -> Pumped<'s> {
    let open = &ctx.open;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*client);
    let resumes = |body: &Body<'_>| body.can_resume(req) && !open.was_cut(fd);
    // The client left a stream it can resume: read on without watching it, a resume of it
    // looking for it here (`entry`: see `drain`).
    let mut client_left = false;
    let mut entry = None;
    let enter = |body: &Body<'_>| {
        req.header(crate::http::name::MCP_SESSION_ID)
            .map(|session| {
                let request = request_id.map(Id::to_json);
                ctx.shared
                    .drains
                    .enter(&up.name, session, body.seen_ids.clone(), request)
            })
    };
    // A call that runs on upstream without its client (`Obs::runs_on`), on an event stream:
    // once its client left (unless it was cut for a ban or deny), the stream is read on
    // as if the client were there, each event within `stream_idle_timeout` of the last, and
    // its events go nowhere; nobody resumes it. All of it within `stream_idle_timeout` of the
    // leaving (`left_at`): keep-alive comments (the Python SDK's server sends one every 15 s)
    // would otherwise hold the call, its slots and the client's connection for as long as the
    // tool ran, for nobody (a review). `left_at` is set once the client left such a call. Any
    // other answer came once the call was over
    // (a JSON answer's head comes with its result): nothing runs on, and the rest of it is not
    // waited for (a client that stopped reading a large answer would otherwise have the
    // gateway read all of it).
    let runs_on = obs.runs_on.get() && body.sse;
    let mut left_at = (runs_on && obs.client_left.get()).then(monoio::time::Instant::now);
    // The client left such a call: said at once, for a session-era call's cancellation
    // (`abandoned::on_leaving`).
    let ran_on = |left_at: &mut Option<monoio::time::Instant>| {
        obs.client_left.set(true);
        left_at.get_or_insert_with(monoio::time::Instant::now);
    };
    // The client went away (a write failed): its stream is drained for a resume, or read on
    // without it (`None`), or the call ends.
    let gone = |body: &Body<'_>, entry: Option<Draining<'s>>| {
        if resumes(body) {
            Some(Pumped::ClientLeft {
                drain: Some(entry.or_else(|| enter(body))),
                taken_over: None,
            })
        } else if runs_on && !open.was_cut(fd) {
            None
        } else {
            Some(Pumped::GONE)
        }
    };
    // Neither kind of body is timed per read: an upstream that sends a byte now and then would
    // hold the call (its concurrency slot, the client's connection) for as long as it liked.
    // An event stream may go on for as long as whole events keep coming, each within
    // `stream_idle_timeout` of the last taken from the upstream (bytes that never finish an
    // event are silence). Any other body is whole within `response_timeout` of slow waits on
    // the upstream, all of them together. Only waits that bring less than `MIN_RATE` count: a
    // large answer to a slow client waits on the upstream too (TCP's flow control, each window
    // update a delayed ACK away), at its pace, and is not the upstream stalling. Time spent
    // writing to the client never counts (its writes have their own timeout).
    let mut upstream_wait = std::time::Duration::ZERO;
    let mut last_event = monoio::time::Instant::now();
    let finished = loop {
        if body.done() {
            break Ok(());
        }
        let left = up.response_timeout.saturating_sub(upstream_wait);
        let idle = last_event + up.stream_idle_timeout;
        let until = left_at.map_or(idle, |t| idle.min(t + up.stream_idle_timeout));
        let read = async {
            if body.sse {
                conn.fill_until(until).await
            } else if left.is_zero() {
                Err(HttpError::Timeout)
            } else {
                conn.fill(left).await
            }
        };
        let waiting = monoio::time::Instant::now();
        // The client closed the stream: in 2026-07-28 that is the request's cancellation. A
        // stream the client can resume is read on without it: its next write fails, and the
        // rest is drained (see `drain`); the read under way is not lost. Until a ban or deny
        // cuts the client: it is not coming back, and the call is cancelled.
        let filled = {
            let mut read = std::pin::pin!(read);
            let watched = if client_left || left_at.is_some() {
                None
            } else {
                unless_client_leaves(Watch::leaves(client), read.as_mut()).await
            };
            match watched {
                Some(filled) => filled,
                None if left_at.is_some() || (runs_on && !resumes(body)) => {
                    ran_on(&mut left_at);
                    // A cut client's call is closed (see `tasks::Owners::hold_cut`).
                    match unless_cut(open, fd, read, &|| false).await {
                        Ok(filled) => filled,
                        Err(_) => return Pumped::GONE,
                    }
                }
                None if !client_left && !resumes(body) => return Pumped::GONE,
                None => {
                    if !client_left {
                        client_left = true;
                        entry = enter(body);
                    }
                    let asked = || {
                        entry
                            .as_ref()
                            .is_some_and(|e: &Draining<'_>| e.drain.resumed())
                    };
                    let watched = unless_cut(open, fd, read, &asked).await;
                    match watched {
                        Ok(filled) => filled,
                        Err(Interrupted::Cut) => return Pumped::GONE,
                        Err(Interrupted::Asked) => {
                            return Pumped::ClientLeft {
                                drain: None,
                                taken_over: entry,
                            };
                        }
                    }
                }
            }
        };
        let waited = waiting.elapsed();
        let slow = match filled {
            Ok(n) => (n as u128) * 1000 < waited.as_millis() * MIN_RATE as u128,
            Err(_) => true,
        };
        if slow {
            upstream_wait += waited;
        }
        match filled {
            Ok(0) if kind == BodyKind::UntilClose => break Ok(()),
            Ok(0) => break Err("upstream closed the connection mid-response"),
            Ok(_) => {}
            Err(HttpError::Timeout) => {
                // Given up here, and its slot given back: the call is cancelled there, even one
                // the client could resume (a stream silent this long is not waited for).
                obs.abandoned.set(true);
                break Err(STALLED);
            }
            Err(_) => break Err("upstream connection failed mid-response"),
        }
        let events_before = body.events_taken;
        let data = match body.take(conn) {
            Ok(data) => data,
            Err(why) => break Err(why),
        };
        // An event over the limit after those passed on: the stream fails once they are
        // written, not when more comes.
        let held = body.check();
        if body.whole.is_some() {
            if let Err(why) = body.hold(&data, hold_max) {
                break Err(why);
            }
            conn.recycle(data);
        } else if left_at.is_some() {
            if let Err(why) = body.observe(&data) {
                break Err(why);
            }
            conn.recycle(data);
        } else if !data.is_empty() {
            if let Err(why) = body.observe(&data) {
                break Err(why);
            }
            let head_written = match head.take() {
                Some(head) => client.write_all(head).await.is_ok(),
                None => true,
            };
            // A chunk goes out by a vectored write: a large piece is not copied behind its
            // size line.
            let (written, back) = if !head_written {
                (false, data)
            } else if body.framing == Framing::Chunked {
                let (w, back) = client.write_chunk_back(data).await;
                (w.is_ok(), back)
            } else {
                let (w, back) = client.write_back(data).await;
                (w.is_ok(), back)
            };
            if written {
                body.delivered();
                // A resume that took a drain over: once the call's answer went, the drain
                // gives the slot back.
                if body.sse {
                    let answered = answers_resume(obs.resumed.borrow().as_ref(), &back);
                    if answered && let Some(resumed) = obs.resumed.take() {
                        resumed.finished();
                    }
                }
            } else {
                // The client went away: the call runs on for it (or without it), or is
                // abandoned mid-response.
                match gone(body, entry.take()) {
                    Some(ended) => return ended,
                    None => ran_on(&mut left_at),
                }
            }
            // The buffer read into next, when the piece was the connection's own.
            conn.recycle(back);
        }
        // Whole events came (a federation member's may all have been left out of what the
        // client gets: its comments are): the stream is not idle. From when they were written,
        // so that a slow client's write does not count as the upstream's silence.
        if body.events_taken != events_before {
            last_event = monoio::time::Instant::now();
        }
        if let Err(why) = held {
            break Err(why);
        }
    };
    if left_at.is_some() {
        return Pumped::RanOn(finished);
    }
    Pumped::Finished(finished)
}

/// How the answer's body is framed; `None` for one with no body (to `HEAD`, a 204 or a 304).
fn body_kind(req: &Request, head: &ResponseHead) -> Result<Option<BodyKind>, UpstreamFailure> {
    if req.method == "HEAD" || head.status == 204 || head.status == 304 {
        return Ok(None);
    }
    match http::framing(&head.headers, usize::MAX) {
        Ok(Some(k)) => Ok(Some(k)),
        Ok(None) => Ok(Some(BodyKind::UntilClose)),
        Err(e) => Err(UpstreamFailure::Bad(format!("unframeable response: {e}"))),
    }
}

/// An answer with no body (to `HEAD`, a 204 or a 304): its head, and the upstream connection
/// back to the pool unless its head says it closes.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the relay"
)]
async fn head_only(
    client: &mut Io,
    conn: Conn,
    req: &Request,
    head: &ResponseHead,
    up: &Upstream,
    request_id: Option<Id>,
    ctx: &WorkerCtx,
    member: Option<&str>,
    obs: &Obs<'_>,
) -> bool {
    let out = match client_head(head, None, req, up, member, obs) {
        Ok((out, _)) => out,
        Err(f) => {
            obs.set(Outcome::UpstreamFailure);
            return fail(client, req, up, request_id, f).await;
        }
    };
    if client.write_all(out).await.is_err() {
        return false;
    }
    // A 204 to a request answers nothing (see `Body::verdict`).
    if request_id.is_some() && req.method == "POST" {
        obs.own_failure();
    }
    obs.set(Outcome::Ok);
    if !head.closes() {
        ctx.pool.checkin(up, conn);
    }
    req.keep_alive
}

/// Why a successful answer to an exchange that sent no request (a GET, a DELETE, a client's
/// notification or response) may not be relayed: its body would be read by no rule. A GET's
/// must be an event stream, which is judged event by event (the TypeScript SDK's client reads
/// any 2xx body of its GET as one, whatever its type: `data:` lines in `application/json`
/// answered its pending `tools/list` with the hidden tools; an attacker's review); another's,
/// if it is not one, is held whole and judged ([`Holding`]), and may not outgrow 16 KiB.
fn unasked_body(
    req: &Request,
    head: &ResponseHead,
    kind: Option<BodyKind>,
    request: bool,
) -> Option<UpstreamFailure> {
    let judged = request
        || req.method != "GET"
        || !(200..300).contains(&head.status)
        || head.is_sse()
        || matches!(kind, None | Some(BodyKind::Length(0)));
    (!judged).then(|| {
        UpstreamFailure::Bad("answered a GET with a body that is not an event stream".into())
    })
}

/// What an answer held whole before the client gets a byte of it is judged for once whole
/// ([`Holding::judge`]). [`Holding::of`] decides whether it is held (and makes `body` hold it):
/// a small one is held only to go out with its head in one write.
struct Holding {
    /// It must answer the request sent and no other.
    checked: bool,
    /// The exchange sent no request (a notification, a GET, a DELETE) and the answer is small
    /// JSON: it must answer none.
    unasked: bool,
    /// The most held.
    max: usize,
}

impl Holding {
    /// For an answer of `status` framed as `kind` (`body` holds it whole, or not), to a
    /// request (`request`) or not, to an exchange that sent a request or a batch (`asked`)
    /// or not, from a federation's `member` or not.
    fn of(
        body: &mut Body<'_>,
        kind: BodyKind,
        status: u16,
        member: bool,
        request: bool,
        asked: bool,
        max_event: usize,
    ) -> Self {
        // A federation member's JSON answer to a request is read whole and checked before the
        // client gets a byte of it: it must answer that request and no other (a client matches
        // answers by id, so a member could otherwise answer what was sent to another member,
        // as its event streams cannot: see `messages::rewrite_events`).
        let json_ok = !body.sse && (200..300).contains(&status);
        let member_checked = member && request && json_ok;
        // A small answer that came apart from its head (servers write them separately) is
        // waited for whole too, so that the client gets head and body in one write: one send
        // and one wake-up less for both, as nginx does. Nothing is read into it.
        let small = !body.sse && matches!(kind, BodyKind::Length(n) if n <= HOLD_SMALL);
        // A small answer is checked too: a stray answer an upstream wrote on a kept connection
        // after the last one (a bug; with Nagle's algorithm it arrives only once the next
        // request is written, past the pool's look before reuse) was read as this request's,
        // and every later answer on the connection went to the client after the one it
        // answered, of any tenant. Not to this request: the call fails and the connection is
        // dropped. An empty body answers nothing (a 202 to a client's response or
        // notification): a stray comes with one.
        let small_json = small && json_ok && kind != BodyKind::Length(0);
        // An exchange with no request is never answered by a JSON-RPC response: one is a
        // stray, another client's. Its body is held whatever its framing (a Node server's
        // empty 202 comes chunked), up to the small bound (`max`): a larger one fails the
        // exchange.
        let unasked = json_ok && !asked && !member && kind != BodyKind::Length(0);
        if member_checked || small || unasked {
            body.whole = Some(Vec::new());
        }
        Self {
            checked: member_checked || (small_json && request),
            unasked,
            // A member's answer is bounded as a request body is; a small one by its length.
            max: if member_checked {
                max_event
            } else {
                HOLD_SMALL
            },
        }
    }

    /// The answer held `whole` (if it was), judged: why it may not reach the client.
    fn judge(&self, whole: Option<&[u8]>, request_id: Option<&Id>) -> Result<(), &'static str> {
        match whole {
            Some(whole) if self.checked && !super::messages::answers_only(whole, request_id) => {
                Err(if super::messages::readable(whole) {
                    ANOTHER_REQUEST
                } else {
                    UNREADABLE
                })
            }
            Some(whole) if self.unasked && super::messages::is_a_response(whole) => {
                Err("answered a request that was not sent to it")
            }
            _ => Ok(()),
        }
    }
}

/// The client left a stream it can resume (see [`Body::can_resume`]): the call runs on upstream
/// for it, and so does the call's hold on its concurrency slot. The stream is read to its end
/// as if the client were there (the upstream keeps its events to replay), so that the slot is
/// given back when the call ends, not when the client left: a client could otherwise start
/// slow calls and hang up, over and over, and hold the upstream past its limit.
///
/// Bounded: the whole drain ends within `stream_idle_timeout` (an upstream that keeps the
/// stream alive with comments cannot hold it longer); a call not ended by then is given up
/// like any other (`obs.abandoned`: cancelled upstream). So is one whose client (`client_fd`,
/// still open on this side) is banned or denied meanwhile: it is not coming back for it. Only
/// the framing is read: the events are the upstream's to replay, and nobody reads them here.
///
/// A resume of the stream (its client, back with `Last-Event-ID` on any worker: see
/// [`take_over`]) takes it over: the stream is closed, so that the upstream sends the rest of
/// the call to the resume (the SDKs' servers send it to the request's own stream while that is
/// open), and the slot is held until the resumed stream ends (within `stream_idle_timeout`).
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the drain"
)]
async fn drain(
    mut conn: Conn,
    body: &mut Body<'_>,
    entry: Option<Draining<'_>>,
    up: &Upstream,
    ctx: &WorkerCtx,
    reusable: bool,
    obs: &Obs<'_>,
    client_fd: std::os::fd::RawFd,
) {
    let deadline = monoio::time::Instant::now() + up.stream_idle_timeout;
    // The body's framing only (its length, its chunks), not its events.
    body.sse = false;
    let asked = || entry.as_ref().is_some_and(|e| e.drain.resumed());
    let taken_over = loop {
        if body.done() {
            break false;
        }
        let filled = {
            let read = std::pin::pin!(conn.fill_until(deadline));
            unless_cut(&ctx.open, client_fd, read, &asked).await
        };
        match filled {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Err(HttpError::Timeout)) | Err(Interrupted::Cut) => {
                obs.abandoned.set(true);
                return;
            }
            Err(Interrupted::Asked) => break true,
            Ok(_) => return,
        }
        match body.take(&mut conn) {
            Ok(data) => conn.recycle(data),
            Err(_) => return,
        }
    };
    match entry.filter(|_| taken_over) {
        Some(entry) => hand_over(conn, entry, up, ctx, obs, client_fd).await,
        None if reusable => ctx.pool.checkin(up, conn),
        None => {}
    }
}

/// A resume takes over the stream of a call whose client left ([`drain`]): the stream is
/// closed, not cancelled (the call goes on, its events now for the resume), and the call's
/// slot held until its answer passes on the resumed stream, within `stream_idle_timeout`, or
/// the client is cut for a ban or deny (then the call is cancelled).
async fn hand_over(
    conn: Conn,
    entry: Draining<'_>,
    up: &Upstream,
    ctx: &WorkerCtx,
    obs: &Obs<'_>,
    client_fd: std::os::fd::RawFd,
) {
    drop(conn);
    entry.drain.hand_over();
    let deadline = std::pin::pin!(crate::http::deadline::Deadline::new(
        crate::clock::deadline(up.stream_idle_timeout)
    ));
    let answered = || entry.drain.answered();
    if let Err(Interrupted::Cut) = unless_cut(&ctx.open, client_fd, deadline, &answered).await {
        obs.abandoned.set(true);
    }
}

/// A resume (`Last-Event-ID` naming event `id` of `upstream`, with the client's `session`)
/// takes over the drain of the stream that gave that event, if one runs ([`drain`]), once the
/// drain has closed that stream (at most [`HAND_OVER`] later). The drain holds the call's
/// slot until the answer passes on the resumed stream ([`answers_resume`]).
pub(super) async fn take_over(
    ctx: &WorkerCtx,
    upstream: &str,
    session: &[u8],
    id: &[u8],
) -> Option<crate::shared::Resumed> {
    let drain = ctx.shared.drains.take_over(upstream, session, id)?;
    let until = monoio::time::Instant::now() + HAND_OVER;
    while !drain.handed() && monoio::time::Instant::now() < until {
        monoio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The upstream learns that the stream is gone only once it has read the close: a resume
    // it takes before then finds the request's stream live and replays nothing (the Python
    // SDK's server answers 200 and ends the stream at once, and the call's answer goes
    // nowhere). A client waits so itself before it resumes; here the close was only now.
    monoio::time::sleep(AFTER_HAND_OVER).await;
    Some(crate::shared::Resumed(drain))
}

/// How long a resume waits after the drain closed the stream it takes over, before it asks
/// the upstream for it.
const AFTER_HAND_OVER: std::time::Duration = std::time::Duration::from_millis(250);

/// Whether `events` (whole events, on their way to a resume's client) hold the answer of the
/// call whose drain the resume took over: then its slot is given back.
pub(super) fn answers_resume(resumed: Option<&crate::shared::Resumed>, events: &[u8]) -> bool {
    resumed.is_some_and(|r| {
        r.0.request()
            .is_some_and(|id| super::messages::events_answer(events, id))
    })
}

/// How long a resume waits for a drain to close the stream it takes over.
const HAND_OVER: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a call whose client left looks whether that client was cut meanwhile (workers
/// cut every 250 ms), or, draining, whether a resume asks for its stream.
const LOOK: std::time::Duration = std::time::Duration::from_millis(50);

/// Why [`unless_cut`] stopped waiting.
enum Interrupted {
    /// The client was cut for a ban or deny.
    Cut,
    /// `asked` said so.
    Asked,
}

/// Runs `fut` for a client that left (its descriptor still open on this side), unless the
/// client is cut for a ban or deny first, or `asked` turns true.
///
/// `fut` comes pinned (taken by value it was held twice, rust-lang/rust#62958), and the looks
/// are on the worker's table of deadlines: a monoio timer is 640 bytes aligned to 128, which
/// widened every request's state on the direct path by its padding.
async fn unless_cut<F: std::future::Future>(
    open: &super::worker::OpenConns,
    client_fd: std::os::fd::RawFd,
    mut fut: std::pin::Pin<&mut F>,
    asked: &dyn Fn() -> bool,
) -> Result<F::Output, Interrupted> {
    loop {
        monoio::select! {
            out = fut.as_mut() => return Ok(out),
            () = crate::http::deadline::Deadline::new(monoio::time::Instant::now() + LOOK) => {
                if open.was_cut(client_fd) {
                    return Err(Interrupted::Cut);
                }
                if asked() {
                    return Err(Interrupted::Asked);
                }
            }
        }
    }
}

/// The answer failed before a byte of it was written: the client gets a whole error.
async fn unwritten_failure(
    client: &mut Io,
    req: &Request,
    up: &Upstream,
    request_id: Option<Id>,
    why: &str,
) -> bool {
    crate::throttled_warn!(upstream = %up.name, "{why}");
    fail(
        client,
        req,
        up,
        request_id,
        UpstreamFailure::Bad(why.into()),
    )
    .await
}

/// How the body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// With the upstream's Content-Length: the bytes as they came.
    Length,
    /// In chunks (HTTP/1.1 clients), ended by the last chunk.
    Chunked,
    /// As it comes, ended by closing the connection (HTTP/1.0 clients).
    UntilClose,
}

/// The head of the answer as the client gets it, and how its body is framed: the upstream's
/// end-to-end fields (nothing hop-by-hop, nothing the upstream keeps to itself, no session id
/// of a federation's member), each checked again (the upstream is not trusted to produce a
/// clean head). A body whose length the client cannot be told goes chunked to an HTTP/1.1
/// client, as it is to an HTTP/1.0 one (ended by a close); so does every event stream, whose
/// event ids are signed (and a federation member's events rewritten): their length changes.
fn client_head(
    head: &ResponseHead,
    kind: Option<BodyKind>,
    req: &Request,
    up: &Upstream,
    member: Option<&str>,
    obs: &Obs<'_>,
) -> Result<(Vec<u8>, Framing), UpstreamFailure> {
    let sse = head.is_sse();
    let framing = match kind {
        Some(BodyKind::Length(_)) if !sse => Framing::Length,
        None => Framing::Length,
        Some(_) if req.accepts_chunked() => Framing::Chunked,
        Some(_) => Framing::UntilClose,
    };
    let unsafe_head =
        |e: http::UnsafeField| UpstreamFailure::Bad(format!("unsafe response head: {e}"));
    let mut out = Vec::with_capacity(256);
    http::push_status_line(&mut out, head.status);
    let connection = http::ConnectionOptions::of(&head.headers);
    for (name, value) in &head.headers {
        let keep = !is_hop_by_hop(name, &connection)
            && http::relayed::relayed(name, &up.relay_headers)
            // Set below for every event stream (`X-Accel-Buffering` too, which is never
            // relayed): its type too, without the upstream's parameters (httpx decodes a
            // stream in the charset they name, RFC 2231 forms such as `charset*=''utf-7`
            // included; an attacker's review).
            && !(sse
                && (name.eq_ignore_ascii_case("cache-control")
                    || name.eq_ignore_ascii_case("content-type")));
        if keep && !(member.is_some() && name.eq_ignore_ascii_case("mcp-session-id")) {
            http::push_field(&mut out, name, value).map_err(unsafe_head)?;
        }
    }
    // An answer that is neither JSON nor an event stream (an error page, say) is the
    // upstream's text on the gateway's origin: a browser that opened it (a link, a frame)
    // would run its script there (a review: a 404 of `text/html` with a `<script>`). It is
    // relayed as it came, to be shown but never run nor sniffed into something else.
    let json = head
        .headers
        .get("content-type")
        .and_then(|v| std::str::from_utf8(v).ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !sse && !json && kind.is_some() {
        out.extend_from_slice(
            b"x-content-type-options: nosniff\r\ncontent-security-policy: sandbox\r\n",
        );
    }
    if let Some(left) = &obs.decision.borrow().budget_left {
        http::push_field(&mut out, "mcp-gateway-budget-remaining", left.as_bytes())
            .map_err(unsafe_head)?;
    }
    match (kind, framing) {
        (None, _) => out.extend_from_slice(b"content-length: 0\r\n"),
        (Some(BodyKind::Length(n)), Framing::Length) => http::push_content_length(&mut out, n),
        (_, Framing::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if sse {
        out.extend_from_slice(
            b"content-type: text/event-stream\r\nx-accel-buffering: no\r\ncache-control: no-cache\r\n",
        );
    }
    if framing == Framing::UntilClose || !req.keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok((out, framing))
}

/// An answer's body on its way: taken from the upstream connection as it arrives, framed for
/// the client, and watched for the answer's outcome.
struct Body<'m> {
    kind: BodyKind,
    framing: Framing,
    /// Bytes of a fixed-length body still to come.
    remaining: usize,
    decoder: ChunkedDecoder,
    /// The body has ended (its length reached, its last chunk read).
    complete: bool,
    sse: bool,
    /// An event stream's bytes, held until each event is whole: an error event can always be
    /// appended cleanly, and a federation rewrites each.
    events: EventBuffer,
    /// Inside a federation: the member.
    member: Option<&'m str>,
    /// The responses an event stream may carry: events with any other are dropped (a member
    /// must not answer what was sent to another; no upstream may answer what the client sent
    /// on another stream, see [`Answers`]).
    answers: Answers,
    /// Whether the answer is classified (the answer to a request).
    classify: bool,
    scan: AnswerScan,
    /// An event stream's last event: its answer.
    answer: Vec<u8>,
    /// The last event was over [`CLASSIFY_MAX`], and not kept: what it said is not known.
    answer_unknown: bool,
    /// An event with an id went to the client: it can resume the stream (`Last-Event-ID`),
    /// so its leaving is not the end of the call.
    resumable: bool,
    /// An event with an id was taken out, not yet known to be written to the client.
    id_taken: bool,
    /// How many times whole events were taken out (an event stream's sign of life, whether
    /// or not the client gets them).
    events_taken: u64,
    /// A federation member's JSON answer, held whole until it is known to answer the request
    /// sent (see [`relay`]).
    whole: Option<Vec<u8>>,
    /// An event stream's ids are signed for the caller with this
    /// ([`super::proxy::event_signer`]). Boxed: most answers are not event streams, and every
    /// request's future would carry it.
    ids: Option<Box<crate::session::Signer>>,
    /// The last [`SEEN_IDS`] event ids of an answer's stream, as they were before they were
    /// signed: the ones a client that leaves can resume from (see [`drain`]).
    seen_ids: Vec<Vec<u8>>,
}

/// Event ids of a request's stream kept for a resume to name.
const SEEN_IDS: usize = 8;

impl<'m> Body<'m> {
    fn new(
        kind: BodyKind,
        framing: Framing,
        sse: bool,
        member: Option<&'m str>,
        classify: bool,
        max_event: usize,
    ) -> Self {
        Self {
            kind,
            framing,
            remaining: match kind {
                BodyKind::Length(n) => n,
                _ => usize::MAX,
            },
            decoder: ChunkedDecoder::default(),
            complete: false,
            sse,
            events: EventBuffer::new(max_event),
            member,
            answers: Answers::Any,
            classify,
            scan: AnswerScan::default(),
            answer: Vec::new(),
            answer_unknown: false,
            resumable: false,
            id_taken: false,
            events_taken: 0,
            whole: None,
            ids: None,
            seen_ids: Vec::new(),
        }
    }

    /// What has already arrived with the head: added to `out`, to go out with the head in
    /// one write, or held.
    fn first_piece(
        &mut self,
        conn: &mut Conn,
        out: &mut Vec<u8>,
        hold_max: usize,
    ) -> Result<(), &'static str> {
        // A piece of a fixed-length or unframed body goes from the connection's buffer to the
        // client's write as it is read: taken first, it was copied twice (the head was read
        // into the same buffer, so the piece is never handed over whole).
        if !self.sse
            && self.whole.is_none()
            && matches!(self.kind, BodyKind::Length(_) | BodyKind::UntilClose)
        {
            let n = match self.kind {
                BodyKind::Length(_) => self.length_piece(conn),
                _ => conn.pending().len(),
            };
            let piece = &conn.pending()[..n];
            self.observe(piece)?;
            self.push_framed(out, piece);
            conn.consume(n);
            return Ok(());
        }
        let first = self.take(conn)?;
        self.check()?;
        if self.whole.is_some() {
            self.hold(&first, hold_max)
        } else {
            self.observe(&first)?;
            self.push_framed(out, &first);
            Ok(())
        }
    }

    fn done(&self) -> bool {
        self.complete
    }

    /// What `conn` holds of the body, as it goes to the client (unframed): a large piece is
    /// taken without a copy; an event stream's only up to its last whole event.
    fn take(&mut self, conn: &mut Conn) -> Result<Vec<u8>, &'static str> {
        if self.sse {
            return self.take_events(conn);
        }
        Ok(match self.kind {
            BodyKind::Length(_) => {
                let n = self.length_piece(conn);
                conn.take(n)
            }
            BodyKind::Chunked => {
                let mut piece = Vec::new();
                let (used, done) = self
                    .decoder
                    .decode(conn.pending(), &mut piece)
                    .map_err(|_| "malformed chunked body from upstream")?;
                conn.consume(used);
                self.complete = done;
                piece
            }
            BodyKind::UntilClose => {
                let n = conn.pending().len();
                conn.take(n)
            }
        })
    }

    /// How much of a fixed-length body `conn` holds, counted as taken.
    fn length_piece(&mut self, conn: &Conn) -> usize {
        let n = self.remaining.min(conn.pending().len());
        self.remaining -= n;
        self.complete = self.remaining == 0;
        n
    }

    /// Adds `data` to the answer held whole, which may not outgrow `max` (the body limit).
    fn hold(&mut self, data: &[u8], max: usize) -> Result<(), &'static str> {
        let whole = self.whole.get_or_insert_default();
        if whole.len() + data.len() > max {
            return Err(ANSWER_TOO_LARGE);
        }
        whole.extend_from_slice(data);
        Ok(())
    }

    /// [`Body::take`] of an event stream: what arrived joins the events held (copied once at
    /// most: a piece handed over whole starts the buffer, chunks are decoded into it), and the
    /// whole events go out, read once for what the client will make of them.
    fn take_events(&mut self, conn: &mut Conn) -> Result<Vec<u8>, &'static str> {
        let n = match self.kind {
            BodyKind::Length(_) => self.length_piece(conn),
            BodyKind::Chunked => {
                let (used, done) = self
                    .decoder
                    .decode(conn.pending(), self.events.tail())
                    .map_err(|_| "malformed chunked body from upstream")?;
                conn.consume(used);
                self.complete = done;
                // A large chunk is read in large pieces too.
                if self.decoder.data_left() > RELAY_READ / 2 {
                    conn.expect(self.decoder.data_left().min(RELAY_READ));
                }
                0
            }
            BodyKind::UntilClose => conn.pending().len(),
        };
        if n > 0 {
            if self.events.is_empty() {
                self.events.start_with(conn.take(n));
            } else {
                self.events.push(&conn.pending()[..n]);
                conn.consume(n);
            }
        }
        let out = self.whole_events()?;
        let coming = match self.kind {
            BodyKind::Length(_) => self.remaining,
            BodyKind::Chunked => self.decoder.data_left(),
            BodyKind::UntilClose => 0,
        };
        self.events.expect(coming);
        Ok(out)
    }

    /// The whole events held, as the client gets them, noted for the answer's outcome and
    /// whether the client could resume after them.
    fn whole_events(&mut self) -> Result<Vec<u8>, &'static str> {
        let events = match self.events.take_events() {
            Ok(Some(events)) => {
                self.events_taken += 1;
                events
            }
            Ok(None) => Vec::new(),
            Err(_) => return Err(EVENT_TOO_LARGE),
        };
        let (out, read) = self.rewritten_and_read(events);
        self.id_taken |= read.id;
        if self.classify
            && let Some(last) = read.last_with_data
        {
            self.answer.clear();
            self.answer_unknown = last.len() > CLASSIFY_MAX;
            if !self.answer_unknown {
                self.answer.extend_from_slice(&out[last]);
            }
        }
        Ok(out)
    }

    /// [`Body::rewritten`], and what the client makes of the events. Outside a federation they
    /// are read first: an id is signed only where one is set, which is what the read says
    /// (`id`: the lines signing looks for), so events that set none go as they came, read
    /// once instead of searched for ids and then read.
    fn rewritten_and_read(&mut self, events: Vec<u8>) -> (Vec<u8>, super::messages::EventsRead) {
        // A member's strays are dropped as its events are rewritten.
        let mut events = match self.member {
            None => super::messages::without_strays(events, self.answers),
            Some(_) => events,
        };
        if self.member.is_none() {
            let mut read = super::messages::read_events(&events);
            if read.low_retry {
                events = super::messages::raise_retry(&events);
                read = super::messages::read_events(&events);
            }
            if !read.id || self.ids.is_none() {
                return (events, read);
            }
        }
        let out = self.rewritten(events);
        let read = super::messages::read_events(&out);
        (out, read)
    }

    /// Events as the client gets them: a federation's member's rewritten, and their ids
    /// signed (an answer's last ones kept as they were, for a resume to name).
    fn rewritten(&mut self, events: Vec<u8>) -> Vec<u8> {
        let events = match self.member {
            Some(name) => super::messages::rewrite_events(name, &events, self.answers),
            None => events,
        };
        let Some(ids) = &self.ids else {
            return events;
        };
        let seen = std::cell::RefCell::new(std::mem::take(&mut self.seen_ids));
        let out = super::messages::sign_event_ids(events, |v| {
            if self.classify {
                let mut seen = seen.borrow_mut();
                if seen.len() == SEEN_IDS {
                    seen.remove(0);
                }
                seen.push(v.to_vec());
            }
            ids.sign(v)
        });
        self.seen_ids = seen.into_inner();
        out
    }

    /// Notes what passes, for the answer's outcome: a body is scanned as it passes (an event
    /// stream's answer is its last event with data, noted as events are taken out; one over
    /// [`CLASSIFY_MAX`] is not kept: the answer is then not known to be an error).
    ///
    /// An answer whose top level, as far as it came, answers another request than the one
    /// sent ([`AnswerScan::answers_another`]) fails before `data` goes out: a client matches
    /// answers by id, and would take it for the answer to another of its requests (one the
    /// gateway answers itself, a filtered `tools/list`). A small answer is held whole and
    /// judged so too (`Holding`); this is the large one's, relayed as it comes.
    fn observe(&mut self, data: &[u8]) -> Result<(), &'static str> {
        if self.classify && !self.sse && !data.is_empty() {
            self.scan.feed(data);
            if self.scan.answers_another(self.answers) {
                return Err(ANOTHER_REQUEST);
            }
        }
        Ok(())
    }

    /// [`Body::observe`] of an answer held whole, after a search for what each key the scan
    /// looks at ends with (`"error"`, `"isError"`), or a `\u` escape (the only one that can
    /// spell a letter of them): an answer with neither is a result, not scanned.
    fn observe_whole(&mut self, whole: &[u8]) {
        // Built once: `memmem::find` builds its searcher on every call, which costs more than
        // the search of a small answer.
        static KEY_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"rror\""));
        if KEY_END.find(whole).is_some()
            || memchr::memchr_iter(b'\\', whole).any(|i| whole.get(i + 1) == Some(&b'u'))
        {
            // Judged whole by `Holding::judge`.
            let _ = self.observe(whole);
        }
    }

    /// Whether the client can come back for the rest of this call's stream: an event with an
    /// id reached it, and its era resumes (`Last-Event-ID`; in 2026-07-28 closing a stream
    /// cancels it, and nothing resumes). Only the answer to a request (a POST with an id: what
    /// holds a concurrency slot); a GET stream, which never ends, is dropped as before.
    fn can_resume(&self, req: &Request) -> bool {
        self.resumable && self.classify && req.method == "POST" && !super::headers::says_modern(req)
    }

    /// What was taken out reached the client: an id among it can be resumed from.
    fn delivered(&mut self) {
        self.resumable |= self.id_taken;
    }

    /// Fails when an event over the limit is held after the events taken out: it is not
    /// passed on, and the answer fails once those are.
    fn check(&self) -> Result<(), &'static str> {
        match self.events.check() {
            Ok(()) => Ok(()),
            Err(_) => Err(EVENT_TOO_LARGE),
        }
    }

    /// Adds `data` to `out` as it goes on the client's connection (no copy of it made first).
    fn push_framed(&self, out: &mut Vec<u8>, data: &[u8]) {
        if self.framing == Framing::Chunked {
            http::push_chunk(out, data);
        } else {
            out.extend_from_slice(data);
        }
    }

    /// Bytes for the client's connection.
    fn framed(&self, data: Vec<u8>) -> Vec<u8> {
        if self.framing == Framing::Chunked && !data.is_empty() {
            http::chunk(&data)
        } else {
            data
        }
    }

    /// The answer's outcome once the body has ended, and whether a request's answer held no
    /// answer at all: nothing, a stream that ended without one (its session ended by its own
    /// client meanwhile), or something else (a 202). `held_and_checked`: an answer held whole
    /// was found to answer the request ([`super::messages::answers_only`]).
    fn verdict(&self, held_and_checked: bool) -> (Outcome, bool) {
        if !self.classify {
            return (Outcome::Ok, false);
        }
        let unanswered = |scan: &AnswerScan| !held_and_checked && !scan.is_answer();
        if !self.sse {
            return (self.scan.outcome(), unanswered(&self.scan));
        }
        // The data of the stream's last event with data: its answer.
        let rest = self.events.rest();
        let answer = super::sse::split(rest)
            .filter(|e| super::messages::has_data(e))
            .last()
            .unwrap_or(&self.answer);
        let data = super::messages::event_data(answer).unwrap_or_default();
        let last = scan(&data);
        // A last event too large to keep is not known to be no answer.
        let unknown = data.is_empty() && self.answer_unknown;
        (last.outcome(), !unknown && unanswered(&last))
    }

    /// A last event the stream ended without its blank line.
    fn rest(&mut self) -> Option<Vec<u8>> {
        if self.events.is_empty() {
            return None;
        }
        let mut rest = self.events.take_rest();
        // A client takes a reconnection time as it reads the line, dispatched or not.
        if super::messages::read_events(&rest).low_retry {
            rest = super::messages::raise_retry(&rest);
        }
        Some(self.rewritten(rest))
    }

    /// The upstream failed mid-answer: an event stream the client can still be told in gets a
    /// JSON-RPC error event for exactly the request it answered and ends cleanly; any other
    /// answer cannot be completed, so the client's connection is closed.
    async fn failed(
        &self,
        client: &mut Io,
        up: &Upstream,
        request_id: Option<Id>,
        why: &str,
    ) -> bool {
        crate::throttled_warn!(upstream = %up.name, "{why}");
        if !self.sse || self.framing == Framing::Length {
            return false;
        }
        let err =
            RpcError::upstream(format!("upstream `{}`: {why}", up.name), 502).with_id(request_id);
        let mut event = b"event: message\ndata: ".to_vec();
        event.extend_from_slice(&err.body());
        event.extend_from_slice(b"\n\n");
        if self.framing == Framing::UntilClose {
            let _ = client.write_all(event).await;
            return false;
        }
        client.write_all(http::chunk(&event)).await.is_ok()
            && client.write_all(b"0\r\n\r\n".to_vec()).await.is_ok()
    }
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
