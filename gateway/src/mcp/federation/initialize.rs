//! Session era `initialize`: every member initialized with the client's parameters, their
//! capabilities merged, their sessions sealed into the one the client gets.

use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::{Map, Value, json};

use super::{Era, Federation, merge};
use crate::{
    config::Member,
    http::Io,
    mcp::{
        Id, Message, RpcError,
        held::{self, describe},
        messages::set_in,
        version,
    },
    session::{self, FedSession, MemberSession},
};

impl<'c> Federation<'_, 'c> {
    /// Session era: initializes every member with the client's parameters, then answers the
    /// client with the merged capabilities and a session id that seals the members' sessions.
    pub(super) async fn initialize(&self, io: &mut Io, m: &Message) -> bool {
        let id = m.id.clone();
        let body: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
        let requested = body["params"]["protocolVersion"]
            .as_str()
            .unwrap_or(version::ASSUMED_WITHOUT_HEADER)
            .to_owned();
        let agreed = if version::is_supported(&requested) && !version::is_stateless_era(&requested)
        {
            requested
        } else {
            version::LATEST_SESSION_ERA.to_owned()
        };
        let mut upstream_body = body.clone();
        set_in(
            &mut upstream_body,
            &["params", "protocolVersion"],
            json!(agreed),
        );
        let upstream_body = Bytes::from(crate::mcp::json_bytes(&upstream_body));
        let results = join_all(
            self.members
                .iter()
                .map(|member| self.initialize_member(member, &upstream_body, id.as_ref())),
        )
        .await;
        let mut members = Vec::new();
        let mut capabilities = Map::new();
        let mut instructions = Vec::new();
        let mut failures = Vec::new();
        for (member, r) in self.members.iter().zip(results) {
            let name = &self.upstream(member).name;
            match r {
                Ok((session, result, bridged)) => {
                    // The stateless era's version marks a bridged member, and only that: a
                    // member's own answer is kept only if it is a session-era version.
                    let v = if bridged {
                        version::STATELESS
                    } else {
                        result["protocolVersion"]
                            .as_str()
                            .filter(|v| version::is_supported(v) && !version::is_stateless_era(v))
                            .unwrap_or(&agreed)
                    };
                    members.push(MemberSession(name.clone(), session, v.to_owned()));
                    if let Some(c) = result["capabilities"].as_object() {
                        merge(&mut capabilities, c);
                    }
                    if let Some(text) = result["instructions"].as_str() {
                        instructions.push(format!("[{name}] {text}"));
                    }
                }
                Err(why) => {
                    crate::throttled_warn!(upstream = %name, "federated initialize: {why}");
                    failures.push(format!("{name}: {why}"));
                }
            }
        }
        if members.is_empty() {
            let err = RpcError::upstream(
                format!("no upstream of this route could be initialized: {failures:?}"),
                502,
            );
            return self.reply_error(io, err.with_id(id)).await;
        }
        let fed = FedSession {
            version: agreed.clone(),
            members,
            owner: self.caller(),
            own: self.obs.decision.borrow().own.clone(),
            nonce: session::nonce(),
        };
        let token = session::seal(&self.ctx.shared.session_key, &fed);
        let mut result = json!({
            "protocolVersion": agreed,
            "capabilities": capabilities,
            "serverInfo": { "name": "mcp-gateway", "version": env!("CARGO_PKG_VERSION") },
        });
        if !instructions.is_empty() {
            result["instructions"] = json!(instructions.join("\n\n"));
        }
        self.reply_result(io, id.as_ref(), result, Some(&token))
            .await
    }

    async fn initialize_member(
        &self,
        member: &Member,
        body: &Bytes,
        id: Option<&Id>,
    ) -> Result<(Option<String>, Value, bool), String> {
        if self.upstream(member).stdio.is_some() {
            // The child was initialized by the gateway; its answer is that one.
            let probe = Bytes::from_static(
                br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#,
            );
            let (_, bytes) = match self.stdio_exchange(Era::Stateless, member, &probe).await {
                Some(Ok(answer)) => answer,
                Some(Err(f)) => return Err(describe(f)),
                None => return Err("not a stdio upstream".into()),
            };
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            return match v.get("result") {
                Some(r) if r.is_object() => Ok((None, r.clone(), false)),
                _ => Err("no initialize result".into()),
            };
        }
        let up = self.upstream(member);
        if !crate::mcp::era::known_stateless(self.ctx, up) {
            match held::initialize(
                self.ctx,
                self.req,
                self.peer,
                up,
                self.obs.tenant_key(self.ctx),
                body,
                id,
            )
            .await
            {
                // Unless it was just learnt to speak only the stateless era.
                Err(f) if !crate::mcp::era::known_stateless(self.ctx, up) => {
                    return Err(describe(f));
                }
                Err(_) => {}
                Ok((session, result)) => return Ok((session, result, false)),
            }
        }
        // Bridged: what a session-era server would have answered, from its `server/discover`.
        let params = serde_json::from_slice::<Value>(body)
            .map(|mut v| v["params"].take())
            .unwrap_or_default();
        let result = crate::mcp::bridge::initialize_result(
            self.ctx,
            self.req,
            self.peer,
            up,
            self.obs.tenant_key(self.ctx),
            &params,
        )
        .await
        .map_err(describe)?;
        Ok((None, result, true))
    }
}
