//! Answers made of every member's: the merged lists, `server/discover`, and requests whose
//! owner only the members know.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{Era, Federation, MAX_PAGES, merge};
use crate::{
    http::{self, Io},
    mcp::{
        Message, RpcError, error,
        held::describe,
        messages::{listable, response_message, response_result, set_in},
        proxy,
    },
};

impl<'c> Federation<'_, 'c> {
    /// Members taking part in `era`: in a session, those the session holds.
    pub(super) fn active(&self, era: Era<'_>) -> Vec<usize> {
        (0..self.members.len())
            .filter(|i| match era {
                Era::Session(s) => s.member(&self.upstream(&self.members[*i]).name).is_some(),
                Era::Stateless => true,
            })
            .collect()
    }

    /// A merged list: every page of every member, names prefixed where `prefixed`. A member that
    /// fails is left out and named in `_meta`; if every member fails, the client gets the error.
    /// The pages read for one list are bounded in all ([`crate::values::Pages`]): a member past
    /// the bound is left out as failed. A listed
    /// name that its prefix gives to another member is left out: a member without a prefix
    /// listed `a_echo`, which a call reaches at the member of prefix `a_` (the client was shown
    /// a definition of another tool than the one it calls).
    pub(super) async fn list(
        &self,
        io: &mut Io,
        era: Era<'_>,
        m: &Message,
        key: &str,
        prefixed: bool,
    ) -> bool {
        let id = m.id.clone();
        // Read whole and answered here: under an id of the gateway's to each member, so that no
        // stream of the client's is filed with a member's list (`id::own`). Kept as bytes
        // while the members answer, each page's request parsed from them.
        let ours = id.as_ref().map(|_| crate::mcp::id::own());
        let base = crate::mcp::rewritten(&self.req.body, |base| {
            if let Some(ours) = &ours {
                set_in(base, &["id"], ours.to_json());
            }
        });
        let active = self.active(era);
        let mut items: Vec<Vec<Value>> = vec![Vec::new(); self.members.len()];
        let mut cursors: Vec<Option<Option<String>>> = vec![None; self.members.len()];
        let mut failed: Vec<(usize, String)> = Vec::new();
        let mut cache: Option<(u64, bool)> = None;
        let mut result_type: Option<Value> = None;
        let mut expired = None;
        let mut pages = crate::values::Pages::default();
        for _ in 0..MAX_PAGES {
            let bodies: Vec<(usize, Bytes)> = active
                .iter()
                .filter(|i| !failed.iter().any(|(f, _)| f == *i))
                .filter(|i| !matches!(cursors[**i], Some(None)))
                .map(|i| {
                    let mut body: Value = serde_json::from_slice(&base).unwrap_or_default();
                    match &cursors[*i] {
                        Some(Some(c)) => set_in(&mut body, &["params", "cursor"], json!(c)),
                        _ => {
                            if let Some(p) = body.get_mut("params").and_then(Value::as_object_mut) {
                                p.remove("cursor");
                            }
                        }
                    }
                    (*i, crate::mcp::json_bytes(&body).into())
                })
                .collect();
            if bodies.is_empty() {
                break;
            }
            for (i, r) in self.fan_out(era, bodies).await {
                let outcome = r.map_err(describe).and_then(|(head, bytes)| {
                    if let Err(why) = pages.add(&bytes) {
                        items[i].clear();
                        return Err(why);
                    }
                    if head.status == 404
                        && matches!(era, Era::Session(_))
                        && !self.bridged(era, &self.members[i])
                    {
                        expired = Some(i);
                    }
                    response_result(&head, &bytes, ours.as_ref())
                });
                match outcome {
                    Ok(mut result) => {
                        let prefix = &self.members[i].prefix;
                        let upstream = &self.upstream(&self.members[i]).name;
                        // Taken, not copied: what is left of the result is dropped before the
                        // next await.
                        let listed = match result.get_mut(key).map(Value::take) {
                            Some(Value::Array(listed)) => listed,
                            _ => Vec::new(),
                        };
                        for mut item in listed {
                            // An item of a prefixed list (tools, prompts) is named by a
                            // string `name`, with no key Go reads as another: an unnamed one
                            // went out as it came, `{"Name": "a_summarize"}` from member `b`
                            // read by a Go client as member `a`'s prompt (a review).
                            if prefixed && !listable(&item) {
                                continue;
                            }
                            if key == "tools"
                                && !proxy::visible(
                                    self.ctx,
                                    self.policy,
                                    self.tenant,
                                    upstream,
                                    &item,
                                )
                            {
                                continue;
                            }
                            if prefixed && let Some(n) = item["name"].as_str() {
                                let name = format!("{prefix}{n}");
                                if !self
                                    .owner(&name)
                                    .is_some_and(|(owner, _)| std::ptr::eq(owner, &self.members[i]))
                                {
                                    crate::throttled_warn!(upstream = %upstream, name = %name.escape_default(), "federated list: a name another member's prefix owns; left out");
                                    continue;
                                }
                                item["name"] = json!(name);
                            }
                            items[i].push(item);
                        }
                        cursors[i] = Some(result["nextCursor"].as_str().map(str::to_owned));
                        if let Some(t) = result.get("resultType") {
                            result_type.get_or_insert_with(|| t.clone());
                        }
                        if let Some(ttl) = result["ttlMs"].as_u64() {
                            // A tools list filtered for the tenant is the tenant's alone.
                            let private = result["cacheScope"] != "public"
                                || key == "tools" && (self.tenant.filters() || self.policy.pinning);
                            cache = Some(
                                cache.map_or((ttl, private), |(t, p)| (t.min(ttl), p || private)),
                            );
                        }
                    }
                    Err(why) => failed.push((i, why)),
                }
            }
        }
        if let Some(i) = expired {
            let name = &self.upstream(&self.members[i]).name;
            let err = RpcError::new(
                error::SESSION_NOT_FOUND,
                format!("the session at upstream `{name}` has ended: initialize again"),
                404,
            );
            return self.reply_error(io, err.with_id(id)).await;
        }
        if !active.is_empty() && failed.len() == active.len() {
            let why: Vec<String> = failed
                .iter()
                .map(|(i, w)| format!("{}: {w}", self.upstream(&self.members[*i]).name))
                .collect();
            let err = RpcError::upstream(format!("every upstream failed: {}", why.join("; ")), 502);
            return self.reply_error(io, err.with_id(id)).await;
        }
        let mut result = json!({ key: items.into_iter().flatten().collect::<Vec<_>>() });
        if let Some(t) = result_type {
            result["resultType"] = t;
        }
        if let Some((ttl, private)) = cache {
            result["ttlMs"] = json!(ttl);
            result["cacheScope"] = json!(if private { "private" } else { "public" });
        }
        if !failed.is_empty() {
            for (i, why) in &failed {
                crate::throttled_warn!(upstream = %self.upstream(&self.members[*i]).name, "federated list: {why}");
            }
            let names: Vec<&str> = failed
                .iter()
                .map(|(i, _)| self.upstream(&self.members[*i]).name.as_str())
                .collect();
            result["_meta"] = json!({ "io.mcp-gateway/unavailable": names });
        }
        self.reply_result(io, id.as_ref(), result, None).await
    }

    /// Tries the members in order; the first that answers without an error wins. For requests
    /// whose owner only the members know (resources by URI).
    pub(super) async fn first_success(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
        let id = m.id.clone();
        // Read whole and answered here: under an id of the gateway's (see `list`).
        let Some((ours, body)) = crate::mcp::id::under_own(&self.req.body, id.as_ref()) else {
            let err = RpcError::invalid_request("the request's id could not be read");
            return self.reply_error(io, err.with_id(id)).await;
        };
        // Written out: no parsed answer is kept across an await.
        let mut last: Option<Vec<u8>> = None;
        for i in self.active(era) {
            let r = self.fan_out(era, vec![(i, body.clone())]).await;
            let Some((_, Ok((head, bytes)))) = r.into_iter().next() else {
                continue;
            };
            let answered = response_message(&head, &bytes, ours.as_ref());
            drop(bytes);
            match answered {
                Ok(mut msg) if msg.get("result").is_some() => {
                    let result = msg["result"].take();
                    drop(msg);
                    return self.reply_result(io, id.as_ref(), result, None).await;
                }
                Ok(mut msg) => {
                    if let Some(id) = &id {
                        set_in(&mut msg, &["id"], id.to_json());
                    }
                    last = Some(crate::mcp::json_bytes(&msg));
                }
                Err(_) => {}
            }
        }
        match last {
            Some(body) => {
                let resp = http::response(
                    200,
                    &[("content-type", "application/json")],
                    &body,
                    self.keep_alive(),
                );
                io.write_all(resp).await.is_ok()
            }
            None => {
                let err = RpcError::upstream("no upstream of this route answered", 502);
                self.reply_error(io, err.with_id(id)).await
            }
        }
    }

    /// 2026-07-28 `server/discover`: the members' answers merged.
    pub(super) async fn discover(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
        let id = m.id.clone();
        let bodies = self
            .active(era)
            .into_iter()
            .map(|i| (i, self.req.body.clone()))
            .collect();
        let mut merged: Option<Value> = None;
        let mut capabilities = Map::new();
        let mut instructions = Vec::new();
        for (i, r) in self.fan_out(era, bodies).await {
            let Ok(result) = r
                .map_err(describe)
                .and_then(|(head, bytes)| response_result(&head, &bytes, id.as_ref()))
            else {
                continue;
            };
            if let Some(c) = result["capabilities"].as_object() {
                merge(&mut capabilities, c);
            }
            if let Some(text) = result["instructions"].as_str() {
                let name = &self.upstream(&self.members[i]).name;
                instructions.push(format!("[{name}] {text}"));
            }
            let m = merged.get_or_insert_with(|| result.clone());
            if let (Some(ours), Some(theirs)) = (
                m["supportedVersions"].as_array(),
                result["supportedVersions"].as_array(),
            ) {
                let both: Vec<Value> = ours
                    .iter()
                    .filter(|v| theirs.contains(v))
                    .cloned()
                    .collect();
                m["supportedVersions"] = json!(both);
            }
            if let (Some(a), Some(b)) = (m["ttlMs"].as_u64(), result["ttlMs"].as_u64()) {
                m["ttlMs"] = json!(a.min(b));
            }
            if result["cacheScope"] == "private" {
                m["cacheScope"] = json!("private");
            }
        }
        let Some(mut result) = merged else {
            let err = RpcError::upstream("no upstream of this route answered", 502);
            return self.reply_error(io, err.with_id(id)).await;
        };
        result["capabilities"] = Value::Object(capabilities);
        if !instructions.is_empty() {
            result["instructions"] = json!(instructions.join("\n\n"));
        }
        self.reply_result(io, id.as_ref(), result, None).await
    }
}
