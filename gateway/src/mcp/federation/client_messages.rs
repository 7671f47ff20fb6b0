//! What the client sends that is not a request: notifications, its answers to members'
//! requests, and the end of its session.

use bytes::Bytes;
use serde_json::Value;

use super::{Era, Federation};
use crate::{
    http::{self, Io},
    mcp::{
        Id, Message, RpcError,
        held::describe,
        messages::{set_in, untag},
        proxy,
    },
    session,
};

impl<'c> Federation<'_, 'c> {
    /// Sends `body` to every member, ignoring the answers (notifications, setLevel).
    pub(super) async fn broadcast(&self, era: Era<'_>, body: &Bytes) {
        let bodies = self
            .active(era)
            .into_iter()
            .map(|i| (i, body.clone()))
            .collect();
        for (i, r) in self.fan_out(era, bodies).await {
            if let Err(f) = r {
                let name = &self.upstream(&self.members[i]).name;
                tracing::debug!(upstream = %name, "broadcast: {}", describe(f));
            }
        }
    }

    pub(super) async fn notification(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
        match m.method.as_deref() {
            // Each member was sent its own at initialize.
            Some("notifications/initialized") => self.accepted(io).await,
            Some("notifications/cancelled") => {
                let target = {
                    let body: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
                    body["params"]["requestId"]
                        .as_str()
                        .and_then(untag)
                        .and_then(|(name, id)| self.member_named(name).map(|m| (m, id)))
                };
                // Cancelling a member's request: only that member, with its own id.
                if let Some((member, original)) = target {
                    let bytes = crate::mcp::rewritten(&self.req.body, |body| {
                        set_in(body, &["params", "requestId"], original);
                    });
                    let i = self.members.iter().position(|x| std::ptr::eq(x, member));
                    if let Some(i) = i {
                        let _ = self.fan_out(era, vec![(i, bytes)]).await;
                    }
                } else {
                    // A client request's id: the members that do not know it ignore it, and
                    // the gateway ends a bridged call of it.
                    if let Era::Session(_) = era
                        && let Some(session) = self.req.header(crate::http::name::MCP_SESSION_ID)
                    {
                        crate::mcp::bridge::cancel(self.ctx, session, &self.req.body);
                    }
                    self.broadcast(era, &self.req.body).await;
                }
                self.accepted(io).await
            }
            _ => {
                self.broadcast(era, &self.req.body).await;
                self.accepted(io).await
            }
        }
    }

    /// The client's answer to a member's request: back to that member with its own id.
    pub(super) async fn client_response(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
        let target = match &m.id {
            Some(Id::Str(s)) => {
                untag(s).and_then(|(name, id)| self.member_named(name).map(|m| (m, id)))
            }
            _ => None,
        };
        let Some((member, original)) = target else {
            let err = RpcError::invalid_request("this response answers no request of this route");
            return self.reply_error(io, err).await;
        };
        let bytes = crate::mcp::rewritten(&self.req.body, |body| set_in(body, &["id"], original));
        if let Some(handle) = self.stdio_of(member) {
            if let Ok(handle) = handle {
                handle.respond(proxy::session_owner(self.ctx, self.obs), bytes.to_vec());
            }
            return self.accepted(io).await;
        }
        if self.bridged(era, member) {
            // A bridged member asks the client nothing: there is nothing to answer.
            return self.accepted(io).await;
        }
        self.forward_to(io, era, member, &bytes, &[], None).await
    }

    /// What names the client's request `m` for its `notifications/cancelled`: its session
    /// and id.
    pub(super) fn cancel_key(&self, m: &Message) -> Option<u64> {
        let session = self.req.header(crate::http::name::MCP_SESSION_ID)?;
        Some(crate::mcp::bridge::cancel_key(
            self.ctx,
            session,
            &m.id.as_ref()?.to_json(),
        ))
    }

    /// The key a federated session id is remembered by once ended ([`session::Ended`]): the
    /// same on every gateway of a fleet.
    fn ended_key(&self, id: &str) -> u64 {
        session::ended_key(
            &self.ctx.shared.session_key,
            session::Scope::Federated,
            id.as_bytes(),
        )
    }

    /// Ends the session: at every member that holds one of its own, and here (members without
    /// one, stdio or bridged, hold nothing to end; the sealed id would still open).
    pub(super) async fn delete(&self, io: &mut Io, era: Era<'_>) -> bool {
        self.broadcast(era, &Bytes::new()).await;
        // Only a session its caller was checked to own (the stateless era has none).
        if let Era::Session(_) = era
            && let Some(id) = self.req.header_str(crate::http::name::MCP_SESSION_ID)
        {
            self.ctx
                .shared
                .ended_sessions
                .end(self.ended_key(id), crate::policy::limits::State::unix_s());
        }
        io.write_all(http::response(200, &[], b"", self.keep_alive()))
            .await
            .is_ok()
    }
}
