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
        // Written again at once: what it was parsed into is not held while members answer.
        let upstream_body = {
            let mut upstream_body = body;
            set_in(
                &mut upstream_body,
                &["params", "protocolVersion"],
                json!(agreed),
            );
            Bytes::from(crate::mcp::json_bytes(&upstream_body))
        };
        let results_of = join_all(
            self.members
                .iter()
                .map(|member| self.initialize_member(member, &upstream_body, id.as_ref())),
        )
        .await;
        let mut members = Vec::new();
        let mut results = Vec::new();
        let mut failures = Vec::new();
        let mut unavailable = Vec::new();
        for (member, r) in self.members.iter().zip(results_of) {
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
                    results.push((name, result));
                }
                Err(why) => {
                    crate::throttled_warn!(upstream = %name, "federated initialize: {why}");
                    failures.push(format!("{name}: {why}"));
                    unavailable.push(name.clone());
                }
            }
        }
        let mut fed = FedSession {
            version: agreed.clone(),
            members,
            owner: self.caller(),
            own: self.obs.decision.borrow().own.clone(),
            nonce: session::nonce(),
        };
        let key = &self.ctx.shared.session_key;
        for name in fit(key, &mut fed, self.config.http.max_header_bytes / 2) {
            let why = "its session id would make the session's too long";
            crate::throttled_warn!(upstream = %name, "federated initialize: {why}");
            failures.push(format!("{name}: {why}"));
            unavailable.push(name);
        }
        if fed.members.is_empty() {
            let err = RpcError::upstream(
                format!("no upstream of this route could be initialized: {failures:?}"),
                502,
            );
            return self.reply_error(io, err.with_id(id)).await;
        }
        let mut capabilities = Map::new();
        let mut instructions = Vec::new();
        // Of the members kept only.
        for (name, result) in results.iter().filter(|(n, _)| fed.member(n).is_some()) {
            if let Some(c) = result["capabilities"].as_object() {
                merge(&mut capabilities, c);
            }
            if let Some(text) = result["instructions"].as_str() {
                instructions.push(format!("[{name}] {text}"));
            }
        }
        let token = session::seal(key, &fed);
        let mut result = json!({
            "protocolVersion": agreed,
            "capabilities": capabilities,
            "serverInfo": { "name": "mcp-gateway", "version": env!("CARGO_PKG_VERSION") },
        });
        if !instructions.is_empty() {
            result["instructions"] = json!(instructions.join("\n\n"));
        }
        if !unavailable.is_empty() {
            result["_meta"] = json!({ "io.mcp-gateway/unavailable": unavailable });
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
        let params = crate::mcp::bridge::initialize_params(body);
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

/// Leaves members out of `fed` until its sealed id is at most `max` bytes, the longest
/// session id first (a member without one is never left out here); their names, in the order
/// left out. A member's id is at most [`held::MAX_SESSION_ID`], but members add up: the sealed
/// id goes in every request's head, and one over the head limit (`max_header_bytes`) made
/// every request of the session 431, to every member.
fn fit(key: &[u8; 32], fed: &mut FedSession, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    while session::seal(key, fed).len() > max {
        let longest = fed
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i, m.1.as_ref()?.len())))
            .max_by_key(|(_, len)| *len);
        let Some((i, _)) = longest else { break };
        out.push(fed.members.remove(i).0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Owner;

    fn fed(ids: &[(&str, Option<usize>)]) -> FedSession {
        FedSession {
            version: "2025-11-25".into(),
            members: ids
                .iter()
                .map(|(n, len)| {
                    let id = len.map(|l| "s".repeat(l));
                    MemberSession((*n).into(), id, "2025-11-25".into())
                })
                .collect(),
            owner: Owner("tenant".into(), None),
            own: None,
            nonce: 7,
        }
    }

    /// The members whose session ids would make the sealed id longer than the limit are left
    /// out, longest first, and named; the others keep theirs. Members without an id stay.
    #[test]
    fn a_members_long_session_id_leaves_that_member_out_not_the_session() {
        let key = [3u8; 32];
        let max = 16_384 / 2;
        // Many members at the per-member limit: as many as fit are kept.
        let mut many = fed(&[
            ("a", Some(36)),
            ("b", Some(held::MAX_SESSION_ID)),
            ("c", None),
            ("d", Some(held::MAX_SESSION_ID)),
            ("e", Some(held::MAX_SESSION_ID)),
            ("f", Some(held::MAX_SESSION_ID)),
            ("g", Some(held::MAX_SESSION_ID)),
            ("h", Some(held::MAX_SESSION_ID)),
            ("i", Some(held::MAX_SESSION_ID)),
            ("j", Some(64)),
        ]);
        let out = fit(&key, &mut many, max);
        assert!(!out.is_empty());
        assert!(session::seal(&key, &many).len() <= max);
        for kept in ["a", "c", "j"] {
            assert!(many.member(kept).is_some(), "{kept}");
        }
        for gone in &out {
            assert!(many.member(gone).is_none());
        }
        // The review's 12,000-byte member (were it past the per-member limit): left out alone.
        let mut one = fed(&[("good", Some(36)), ("evil", Some(12_000)), ("stdio", None)]);
        assert_eq!(fit(&key, &mut one, max), vec!["evil".to_owned()]);
        assert_eq!(one.members.len(), 2);
        // Within the limit: nothing changes.
        let mut fine = fed(&[("good", Some(36)), ("other", Some(64))]);
        let before = fine.clone();
        assert!(fit(&key, &mut fine, max).is_empty());
        assert_eq!(fine, before);
        // Only members without an id, over a tiny limit: kept (nothing of an upstream's).
        let mut bare = fed(&[("x", None), ("y", None)]);
        assert!(fit(&key, &mut bare, 10).is_empty());
        assert_eq!(bare.members.len(), 2);
    }
}
