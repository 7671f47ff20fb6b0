//! How one message reaches one member, whatever carries it: a stdio child, a bridged
//! stateless-era server, a session the gateway holds, or the client's own session over HTTP.

use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::{Value, json};

use super::{Era, Federation, MAX_COLLECTED};
use crate::{
    config::Member,
    http::Io,
    mcp::{
        Id, Message, held, messages, proxy,
        upstream::{self, ResponseHead, UpstreamFailure},
        version,
    },
};

impl<'c> Federation<'_, 'c> {
    /// A stdio member's supervisor; `None` for an HTTP member.
    pub(super) fn stdio_of(
        &self,
        member: &Member,
    ) -> Option<Result<crate::stdio::Handle, UpstreamFailure>> {
        let up = self.upstream(member);
        up.stdio.as_ref()?;
        Some(self.ctx.shared.stdio.get(&up.name).ok_or_else(|| {
            UpstreamFailure::Bad(format!("stdio upstream {} is not running", up.name))
        }))
    }

    /// The exchange of `body` with a stdio member, as an HTTP member's answer would come: a
    /// request's answer as JSON (reshaped for a stateless client; `server/discover` from the
    /// child's `initialize`), 202 for a notification or a response. `None` for an HTTP member.
    pub(super) async fn stdio_exchange(
        &self,
        era: Era<'_>,
        member: &Member,
        body: &Bytes,
    ) -> Option<Result<(ResponseHead, Vec<u8>), UpstreamFailure>> {
        let handle = match self.stdio_of(member)? {
            Ok(h) => h,
            Err(f) => return Some(Err(f)),
        };
        let who = proxy::who_calls(self.ctx, self.obs);
        let caller = who.caller;
        let json = |bytes: Vec<u8>| (held::json_head(), bytes);
        let accepted = held::accepted_head();
        // DELETE: the child's session is the gateway's, not the client's.
        // What is read of it, not the whole parsed message, is held while the child answers
        // (12 of 2 MB held 551 MiB: a review).
        let Some((method, has_id, id)) =
            serde_json::from_slice::<Value>(body)
                .ok()
                .map(|mut message| {
                    (
                        message["method"].as_str().unwrap_or_default().to_owned(),
                        message.get("id").is_some_and(|id| !id.is_null()),
                        message["id"].take(),
                    )
                })
        else {
            return Some(Ok((accepted, Vec::new())));
        };
        if method.is_empty() {
            handle.respond(caller, body.to_vec());
            return Some(Ok((accepted, Vec::new())));
        }
        if !has_id {
            if method != "notifications/initialized" {
                handle.notify(caller, body.to_vec());
            }
            return Some(Ok((accepted, Vec::new())));
        }
        let failure = |e: crate::stdio::StdioError| match e {
            crate::stdio::StdioError::Timeout(..) => UpstreamFailure::Timeout,
            e @ (crate::stdio::StdioError::TooLong(..)
            | crate::stdio::StdioError::Unreadable(..)) => {
                UpstreamFailure::Unrelayable(e.to_string())
            }
            e => UpstreamFailure::Bad(e.to_string()),
        };
        let started = std::time::Instant::now();
        if method == "server/discover" {
            let init = crate::mcp::stdio_route::child_init(&handle, who).await;
            self.obs.waited(started.elapsed());
            return Some(init.map_err(failure).map(|init| {
                let v = json!({"jsonrpc": "2.0", "id": id,
                    "result": messages::discover_from_initialize(&init)});
                json(crate::mcp::json_bytes(&v))
            }));
        }
        let done = handle.call(who, body.to_vec()).done.await;
        self.obs.waited(started.elapsed());
        Some(match done {
            Ok(Ok(bytes)) if matches!(era, Era::Stateless) => {
                Ok(json(messages::for_stateless(&method, bytes)))
            }
            Ok(Ok(bytes)) => Ok(json(bytes)),
            Ok(Err(e)) => Err(failure(e)),
            Err(_) => Err(UpstreamFailure::Bad(format!(
                "stdio upstream {} went away",
                handle.name()
            ))),
        })
    }

    /// For a stateless client: the exchange with a member, over a gateway-held session if the
    /// member needs one ([`held::call_learning`]). `None` in the session era.
    async fn held_call(
        &self,
        era: Era<'_>,
        member: &Member,
        body: &Bytes,
        extra: &[(&str, Option<&str>)],
    ) -> Option<Result<held::Answer, UpstreamFailure>> {
        if !matches!(era, Era::Stateless) {
            return None;
        }
        let up = self.upstream(member);
        if up.stdio.is_some() {
            return None;
        }
        let owner = held::owner(self.ctx, up, self.obs);
        let mut extra = extra.to_vec();
        extra.push(("last-event-id", None));
        extra.push(("mcp-session-id", None));
        let mut gave_up = held::GaveUp::default();
        let answer = held::call_learning(
            self.ctx,
            self.req,
            self.peer,
            up,
            owner,
            body,
            &extra,
            &mut gave_up,
            None,
        )
        .await;
        gave_up.cancel(self.ctx, up).await;
        Some(answer)
    }

    /// Whether `member` speaks only the stateless era behind this session-era client: its
    /// requests are bridged ([`crate::mcp::bridge`]), marked in the session by the version
    /// 2026-07-28.
    pub(super) fn bridged(&self, era: Era<'_>, member: &Member) -> bool {
        match era {
            Era::Session(s) => s
                .member(&self.upstream(member).name)
                .is_some_and(|m| version::is_stateless_era(&m.2)),
            Era::Stateless => false,
        }
    }

    /// A session-era message to a bridged member, its answer read whole: a request is sent
    /// with the 2026 envelope; a notification or a response (the stateless era takes none from
    /// a client) and a `DELETE` (no session there) are answered here.
    async fn bridged_exchange(
        &self,
        member: &Member,
        body: &Bytes,
    ) -> Result<(ResponseHead, Vec<u8>), UpstreamFailure> {
        let accepted = held::accepted_head();
        let id = serde_json::from_slice::<Value>(body)
            .ok()
            .filter(|m| m["method"].is_string())
            .and_then(|m| Id::from_json(&m["id"]));
        let Some(id) = id else {
            return Ok((accepted, Vec::new()));
        };
        let up = self.upstream(member);
        crate::mcp::bridge::call_with(
            self.ctx,
            self.req,
            self.peer,
            up,
            self.obs.tenant_key(self.ctx),
            body,
            Some(&id),
        )
        .await
        .map(|a| (a.head, a.body))
    }

    /// Forwards a request to the member that owns it; its answer is relayed as it arrives.
    pub(super) async fn routed(
        &self,
        io: &mut Io,
        era: Era<'_>,
        member: &Member,
        bytes: Bytes,
        mcp_name: Option<&str>,
        message: &Message,
    ) -> bool {
        let id = message.id.clone();
        let mut extra = vec![];
        if self.req.header(crate::http::name::MCP_NAME).is_some() {
            extra.push(("mcp-name", mcp_name));
        }
        let up = self.upstream(member);
        // A call whose client leaves runs on upstream, its answer read to its end and its
        // slots held until then: in its member session, where it is cancelled as its client
        // leaves (see below), which the member may not be able to carry out; with none to
        // cancel it in, unless the member is said to stop it when its connection closes.
        let in_session = matches!(era, Era::Session(s) if s.member(&up.name)
            .is_some_and(|ms| ms.1.is_some() && !version::is_stateless_era(&ms.2)));
        self.obs.runs_on.set(
            (in_session || !up.closing_cancels)
                && crate::mcp::abandoned::cancellable(message).is_some(),
        );
        if let Some(handle) = self.stdio_of(member) {
            let handle = match handle {
                Ok(h) => h,
                Err(f) => {
                    self.obs.set(crate::stats::Outcome::UpstreamFailure);
                    return proxy::fail(io, self.req, up, id, f).await;
                }
            };
            self.obs.upstream.set(Some(&up.name));
            let who = proxy::who_calls(self.ctx, self.obs);
            return crate::mcp::stdio_route::request(
                io,
                self.req,
                &handle,
                who,
                message,
                self.obs,
                None,
                &bytes,
                Some(&up.name),
                // Tasks are refused on a federated route.
                None,
            )
            .await;
        }
        if self.bridged(era, member) {
            let sent = std::time::Instant::now();
            let call = crate::mcp::bridge::call_with(
                self.ctx,
                self.req,
                self.peer,
                up,
                self.obs.tenant_key(self.ctx),
                &bytes,
                message.id.as_ref(),
            );
            let key = self.cancel_key(message);
            let id = message.id.as_ref();
            let answer =
                crate::mcp::bridge::cancellable(self.ctx, io, self.req, id, self.obs, key, call)
                    .await;
            let answer = match answer {
                Ok(answer) => answer,
                Err(keep) => {
                    self.obs.waited(sent.elapsed());
                    self.obs.upstream.set(Some(&up.name));
                    return keep;
                }
            };
            self.obs.waited(sent.elapsed());
            self.obs.upstream.set(Some(&up.name));
            return crate::mcp::bridge::reply(io, self.req, up, message, answer, self.obs, None)
                .await;
        }
        if matches!(era, Era::Stateless) {
            extra.push(("last-event-id", None));
            extra.push(("mcp-session-id", None));
            if crate::mcp::era::known_session(self.ctx, up) == Some(true) {
                let sent = std::time::Instant::now();
                let owner = held::owner(self.ctx, up, self.obs);
                let mut gave_up = held::GaveUp::default();
                let answer = held::call(
                    self.ctx,
                    self.req,
                    self.peer,
                    up,
                    owner,
                    &bytes,
                    &extra,
                    &mut gave_up,
                    None,
                )
                .await;
                self.obs.waited(sent.elapsed());
                self.obs.upstream.set(Some(&up.name));
                let keep = held::reply(io, self.req, up, message, answer, self.obs, None).await;
                gave_up.cancel(self.ctx, up).await;
                return keep;
            }
            return held::forward_learning(
                io,
                self.req,
                self.peer,
                self.ctx,
                up,
                message,
                &bytes,
                &extra,
                Some(&up.name),
                self.obs,
            )
            .await;
        }
        // A session-era call whose client leaves is cancelled in the member's session at once,
        // and its answer read on to its end (`abandoned::on_leaving`).
        let cancellation = || {
            let body = crate::mcp::abandoned::cancellation(
                crate::mcp::abandoned::cancellable(message).into_iter(),
            )?;
            let request = self.request_for(member, era, &body, &extra).ok()?;
            Some((request, self.obs.tenant_key(self.ctx)))
        };
        // The exchange is over (and dropped) before a cancellation below is sent.
        let (keep, cancelled) = {
            let exchange = std::pin::pin!(self.forward_to(io, era, member, &bytes, &extra, id));
            crate::mcp::abandoned::on_leaving(self.ctx, up, &self.obs.client_left, exchange, || {
                in_session.then(cancellation).flatten()
            })
            .await
        };
        // A session-era call the gateway gave up on (it timed out, or its client was cut for a
        // ban or deny) runs on in the member unless cancelled (`abandoned`).
        if self.obs.abandoned.get()
            && in_session
            && !cancelled
            && let Some((request, tenant)) = cancellation()
        {
            crate::mcp::abandoned::cancel(self.ctx, up, tenant, request).await;
        }
        keep
    }

    /// Sends `body` to every member and reads each whole answer, concurrently.
    pub(super) async fn fan_out(
        &self,
        era: Era<'_>,
        bodies: Vec<(usize, Bytes)>,
    ) -> Vec<(usize, Result<(ResponseHead, Vec<u8>), UpstreamFailure>)> {
        let sent = std::time::Instant::now();
        let answers = join_all(bodies.into_iter().map(|(i, body)| async move {
            let member = &self.members[i];
            if let Some(answer) = self.stdio_exchange(era, member, &body).await {
                return (i, answer);
            }
            if self.bridged(era, member) {
                return (i, self.bridged_exchange(member, &body).await);
            }
            if let Some(held) = self.held_call(era, member, &body, &[]).await {
                return (i, held.map(|a| (a.head, a.body)));
            }
            let answer = match self.request_for(member, era, &body, &[]) {
                Ok(request) => {
                    upstream::call(
                        &self.ctx.pool,
                        self.upstream(member),
                        self.obs.tenant_key(self.ctx),
                        request,
                        MAX_COLLECTED,
                    )
                    .await
                }
                // Nothing was sent.
                Err(e) => Err(UpstreamFailure::Bad(e.to_string())),
            };
            (i, answer)
        }))
        .await;
        self.obs.waited(sent.elapsed());
        answers
    }
}
