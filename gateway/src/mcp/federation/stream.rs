//! Session era `GET`: every member's server-to-client stream, merged into one, each event
//! rewritten with its member's tags.

use std::time::Duration;

use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::{SinkExt as _, StreamExt as _, future::join_all};

use super::{Era, Federation, KEEPALIVE};
use crate::{
    http::{self, BodyKind, ChunkedDecoder, Io},
    mcp::{
        RpcError, error,
        held::describe,
        messages::{Answers, rewrite_events, sign_event_ids},
        proxy::{event_signer, resumes_from},
        sse,
        upstream::{self, Conn, UpstreamFailure},
    },
    session::Signer,
};

impl<'c> Federation<'_, 'c> {
    /// The member (its upstream's name) and its own event id that a `Last-Event-ID` names, if
    /// the gateway gave it to this caller: `{member}.{id}`, signed ([`event_signer`]).
    fn resumed(&self, signed: &str) -> Option<(String, String, Answers)> {
        let (tagged, _) = signed.rsplit_once('.')?;
        let (name, _) = tagged.split_once('.')?;
        let up = self
            .members
            .iter()
            .map(|m| self.upstream(m))
            .find(|up| up.name == name)?;
        let (own, answers) = resumes_from(self.ctx, up, self.obs, signed.as_bytes(), true)?;
        let (name, id) = own.split_once('.')?;
        Some((name.to_owned(), id.to_owned(), answers))
    }

    /// Session era GET: every member's server-to-client stream, merged into one. A
    /// `Last-Event-ID` goes only to the member whose event it names.
    pub(super) async fn merged_stream(&self, io: &mut Io, era: Era<'_>) -> bool {
        let last = match self.req.header_str(crate::http::name::LAST_EVENT_ID) {
            None => None,
            Some(signed) => match self.resumed(signed) {
                Some(last) => Some(last),
                None => {
                    let err = RpcError::invalid_request(error::FOREIGN_EVENT_ID);
                    return self.reply_error(io, err).await;
                }
            },
        };
        // A resume of a member's stream the gateway reads on for this caller takes it over
        // (`relay::drain`), held until the call's answer passes on that member's stream.
        let mut taken_over = match (&last, self.req.header(crate::http::name::MCP_SESSION_ID)) {
            (Some((name, id, _)), Some(session)) => {
                let own = format!("{name}.{id}");
                Box::pin(super::super::relay::take_over(
                    self.ctx,
                    name,
                    session,
                    own.as_bytes(),
                ))
                .await
            }
            _ => None,
        };
        let client: &Io = io;
        // stdio and bridged members have no stream of their own.
        let http_members = self.active(era).into_iter().filter(|i| {
            let member = &self.members[*i];
            self.upstream(member).stdio.is_none() && !self.bridged(era, member)
        });
        let opened = join_all(http_members.map(|i| {
            let member = &self.members[i];
            let up = self.upstream(member);
            let last_id = last
                .as_ref()
                .filter(|(name, ..)| *name == up.name)
                .map(|(_, id, _)| id.as_str());
            let request =
                self.request_for(member, era, &Bytes::new(), &[("last-event-id", last_id)]);
            async move {
                let opened = match request {
                    Ok(request) => {
                        upstream::open(
                            &self.ctx.pool,
                            up,
                            self.obs.tenant_key(self.ctx),
                            request,
                            Some(upstream::Watch::leaves(client)),
                        )
                        .await
                    }
                    Err(e) => Err(UpstreamFailure::Bad(e.to_string())),
                };
                (up, opened)
            }
        }))
        .await;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        // Dropped when this stream ends: each pump then closes its upstream stream.
        let mut stops = Vec::new();
        let mut streams = 0;
        let mut refused = None;
        for (up, r) in opened {
            match r {
                Ok((conn, head)) if (200..300).contains(&head.status) && head.is_sse() => {
                    let kind = match http::framing(&head.headers, usize::MAX) {
                        Ok(Some(k)) => k,
                        Ok(None) => BodyKind::UntilClose,
                        Err(e) => {
                            // Dropping the connection closes it.
                            crate::throttled_warn!(upstream = %up.name, "GET stream: unframeable response: {e}");
                            continue;
                        }
                    };
                    streams += 1;
                    let (stop, stopped) = oneshot::channel::<()>();
                    stops.push(stop);
                    // The session's own stream answers nothing; a resumed request's stream,
                    // that request.
                    let resuming = last.as_ref().filter(|(name, ..)| *name == up.name);
                    let answers = resuming.map_or(Answers::Nothing, |(.., answers)| *answers);
                    let resumed = resuming.and_then(|_| taken_over.take());
                    monoio::spawn(pump(
                        resumed,
                        up.name.clone(),
                        answers,
                        event_signer(self.ctx, up, self.obs, true, answers),
                        conn,
                        kind,
                        up.stream_idle_timeout,
                        self.config.http.max_body_bytes,
                        tx.clone(),
                        stopped,
                    ));
                }
                Ok((_, head)) => {
                    refused.get_or_insert(head.status);
                }
                Err(f) => {
                    crate::throttled_warn!(upstream = %up.name, "GET stream: {}", describe(f))
                }
            }
        }
        drop(tx);
        if streams == 0 {
            let status = match refused {
                Some(404) => 404,
                Some(_) | None => 405,
            };
            let resp = http::response(status, &[("allow", "POST, DELETE")], b"", self.keep_alive());
            return io.write_all(resp).await.is_ok();
        }
        // HTTP/1.0 knows no chunked coding: the stream ends when the connection closes.
        let chunked = self.req.accepts_chunked();
        let keep_alive = self.keep_alive() && chunked;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
             x-accel-buffering: no\r\n{}{}\r\n",
            if chunked {
                "transfer-encoding: chunked\r\n"
            } else {
                ""
            },
            if keep_alive {
                ""
            } else {
                "connection: close\r\n"
            }
        );
        if io.write_all(head.into_bytes()).await.is_err() {
            return false;
        }
        loop {
            let next = monoio::select! {
                event = rx.next() => Some(event),
                _ = monoio::time::sleep(KEEPALIVE) => None,
                // The client went away: dropping the receiver ends the pumps.
                _ = io.peer_gone() => return false,
            };
            let data = match next {
                Some(Some(events)) => events,
                // Every member's stream ended.
                Some(None) => break,
                None => b": keep-alive\n\n".to_vec(),
            };
            let framed = if chunked { http::chunk(&data) } else { data };
            if io.write_all(framed).await.is_err() {
                // The client went away: dropping the receiver ends the pumps.
                return false;
            }
        }
        if chunked && io.write_all(b"0\r\n\r\n".to_vec()).await.is_err() {
            return false;
        }
        keep_alive
    }
}

/// Moves one member's stream into the merged one, event by event, rewritten. An event over
/// `max_event` bytes ends this member's stream (the merged one stays at an event boundary).
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the pump"
)]
async fn pump(
    // A resume's hold on the drain it took over (`relay::take_over`): given up once the
    // call's answer passed (not when the stream ends without it, nor when the merged
    // stream's client leaves: the drain holds on to its deadline then).
    mut resumed: Option<crate::shared::Resumed>,
    name: String,
    answers: Answers,
    ids: Signer,
    mut conn: Conn,
    kind: BodyKind,
    idle: Duration,
    max_event: usize,
    mut tx: mpsc::Sender<Vec<u8>>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut decoder = ChunkedDecoder::default();
    let mut events = sse::EventBuffer::new(max_event);
    let mut piece = Vec::new();
    // What is left of a body of known length: bytes after it are not the stream's.
    let mut left = match kind {
        BodyKind::Length(n) => Some(n),
        _ => None,
    };
    // Idle from the last whole event, not the last read (see `relay`): bytes that never
    // finish an event are silence.
    let mut last_event = monoio::time::Instant::now();
    loop {
        let done = match kind {
            BodyKind::Chunked => match decoder.decode(conn.pending(), &mut piece) {
                Ok((used, done)) => {
                    conn.consume(used);
                    done
                }
                Err(_) => return,
            },
            _ => {
                let pending = conn.pending();
                let n = left.map_or(pending.len(), |left| left.min(pending.len()));
                piece.extend_from_slice(&pending[..n]);
                conn.consume(n);
                left.as_mut().is_some_and(|left| {
                    *left -= n;
                    *left == 0
                })
            }
        };
        events.push(&piece);
        piece.clear();
        match events.take_events() {
            Ok(Some(complete)) => {
                // Responses only to the request whose stream this resumes, if any.
                let rewritten = rewrite_events(&name, &complete, answers);
                // A resumed request stream: once its answer is on the client's stream, the
                // drain it took over gives the call's slot back.
                let answered = super::super::relay::answers_resume(resumed.as_ref(), &rewritten);
                let rewritten = sign_event_ids(rewritten, |v| ids.sign(v));
                if !rewritten.is_empty() && tx.send(rewritten).await.is_err() {
                    return;
                }
                if answered && let Some(resumed) = resumed.take() {
                    resumed.finished();
                }
                // From when the client's stream took them.
                last_event = monoio::time::Instant::now();
                // An event over the limit after those: the stream ends now, not at the idle
                // timeout.
                if events.check().is_err() {
                    crate::throttled_warn!(upstream = %name, "event larger than the body limit: stream ended");
                    return;
                }
            }
            Ok(None) => {}
            Err(_) => {
                crate::throttled_warn!(upstream = %name, "event larger than the body limit: stream ended");
                return;
            }
        }
        if done {
            return;
        }
        let filled = monoio::select! {
            r = conn.fill_until(last_event + idle) => r,
            // Dropping `conn` closes it.
            _ = &mut stopped => return,
        };
        match filled {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}
