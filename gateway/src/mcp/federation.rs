//! Federation: one virtual MCP server over several upstreams.
//!
//! The gateway answers `initialize` itself after initializing every member, merges the lists
//! (`tools/list`, `prompts/list`, `resources/list`, `resources/templates/list`) with each
//! member's name prefix, routes each call to the member that owns the name, and keeps one
//! upstream session per client session per member, sealed into the client's session id
//! ([`super::session`]), so that no state is shared between workers.
//!
//! Server-to-client messages are relayed as they arrive. Requests from a member (sampling,
//! elicitation, roots) get an id that names the member (`<upstream>.n.<id>` for a number,
//! `<upstream>.s.<id>` for a string); the client's answer is routed back with the original id.
//! SSE event ids are prefixed the same way, so that `Last-Event-ID` resumes at the right member.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::{SinkExt as _, StreamExt as _, future::join_all};
use serde_json::{Map, Value, json};

use super::{
    Id, Kind, Message, RpcError, error,
    held::{self, describe},
    messages::{self, response_message, response_result, rewrite_events, set_in, untag},
    proxy::{self, Obs, WorkerCtx, json_response},
    session::{self, FedSession, MemberSession, Owner},
    sse,
    upstream::{self, Conn, ResponseHead, UpstreamFailure},
    version,
};
use crate::{
    config::{Config, Member, Upstream},
    http::{self, BodyKind, ChunkedDecoder, Io, Request},
};

/// Largest upstream answer the gateway reads whole (lists, initialize).
const MAX_COLLECTED: usize = 16 * 1024 * 1024;
/// Pages of one list the gateway follows per member.
const MAX_PAGES: usize = 100;
/// Keep-alive comment interval on merged streams; also how soon a gone client is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The member of `members` owning `name` (longest matching prefix; the member without a prefix
/// owns the rest) and the name as that member knows it.
pub(super) fn owner<'c, 'n>(members: &'c [Member], name: &'n str) -> Option<(&'c Member, &'n str)> {
    members
        .iter()
        .filter(|m| !m.prefix.is_empty() && name.len() > m.prefix.len())
        .filter_map(|m| name.strip_prefix(m.prefix.as_str()).map(|n| (m, n)))
        .max_by_key(|(m, _)| m.prefix.len())
        .or_else(|| {
            members
                .iter()
                .find(|m| m.prefix.is_empty())
                .map(|m| (m, name))
        })
}

/// `'c`: the configuration snapshot's lifetime; `'a`: the request's.
pub(super) struct Federation<'a, 'c> {
    pub members: &'c [Member],
    pub config: &'c Config,
    pub ctx: &'a WorkerCtx,
    pub req: &'a Request,
    pub peer: SocketAddr,
    pub obs: &'a Obs<'c>,
    /// The caller's tenant policy: tools it may not call are left out of `tools/list`.
    pub tenant: &'c crate::policy::TenantPolicy,
    pub policy: &'c crate::policy::Policy,
}

/// How a request reaches members: in the session era with the member's session and version,
/// in the stateless era as the client sent it.
#[derive(Clone, Copy)]
enum Era<'s> {
    Session(&'s FedSession),
    Stateless,
}

impl<'c> Federation<'_, 'c> {
    fn upstream(&self, m: &Member) -> &'c Upstream {
        &self.config.upstreams[m.upstream]
    }

    fn member_named(&self, name: &str) -> Option<&'c Member> {
        self.members.iter().find(|m| self.upstream(m).name == name)
    }

    /// The member owning `name` (longest matching prefix; the member without a prefix owns the
    /// rest) and the name as that member knows it.
    fn owner<'n>(&self, name: &'n str) -> Option<(&'c Member, &'n str)> {
        owner(self.members, name)
    }

    fn keep_alive(&self) -> bool {
        self.req.keep_alive
    }

    async fn reply_error(&self, io: &mut Io, err: RpcError) -> bool {
        if err.code == error::UPSTREAM_ERROR {
            self.obs.set(crate::stats::Outcome::UpstreamFailure);
        }
        let status = err.http_status;
        io.write_all(json_response(status, &err, self.keep_alive()))
            .await
            .is_ok()
    }

    async fn reply_result(
        &self,
        io: &mut Io,
        id: Option<&Id>,
        result: Value,
        session: Option<&str>,
    ) -> bool {
        self.obs.set(crate::stats::Outcome::Ok);
        let body = super::json_bytes(&json!({
            "jsonrpc": "2.0",
            "id": id.map_or(Value::Null, Id::to_json),
            "result": result,
        }));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(s) = session {
            headers.push(("mcp-session-id", s));
        }
        io.write_all(http::response(200, &headers, &body, self.keep_alive()))
            .await
            .is_ok()
    }

    async fn accepted(&self, io: &mut Io) -> bool {
        self.obs.set(crate::stats::Outcome::Ok);
        io.write_all(http::response(202, &[], b"", self.keep_alive()))
            .await
            .is_ok()
    }

    /// The request for member `m`: the client's headers, `body`, and the member's session.
    /// Refused when a value would put a control character into the head (see
    /// [`proxy::upstream_request`]).
    fn request_for(
        &self,
        m: &Member,
        era: Era<'_>,
        body: &Bytes,
        extra: &[(&str, Option<&str>)],
    ) -> Result<http::Outgoing, http::UnsafeField> {
        let up = self.upstream(m);
        let mut replace: Vec<(&str, Option<&str>)> = extra.to_vec();
        match era {
            Era::Session(s) => {
                let ms = s.member(&up.name);
                replace.push(("mcp-session-id", ms.and_then(|m| m.1.as_deref())));
                replace.push(("mcp-protocol-version", ms.map(|m| m.2.as_str())));
            }
            // The client's own id (a stateless client has none) never reaches a member.
            Era::Stateless => replace.push(("mcp-session-id", None)),
        }
        if self.req.method != "GET" {
            replace.push(("last-event-id", None));
        }
        proxy::upstream_request(self.req, self.peer, up, body, &replace)
    }

    /// A stdio member's supervisor; `None` for an HTTP member.
    fn stdio_of(&self, member: &Member) -> Option<Result<crate::stdio::Handle, UpstreamFailure>> {
        let up = self.upstream(member);
        up.stdio.as_ref()?;
        Some(self.ctx.shared.stdio.get(&up.name).ok_or_else(|| {
            UpstreamFailure::Bad(format!("stdio upstream {} is not running", up.name))
        }))
    }

    /// The exchange of `body` with a stdio member, as an HTTP member's answer would come: a
    /// request's answer as JSON (reshaped for a stateless client; `server/discover` from the
    /// child's `initialize`), 202 for a notification or a response. `None` for an HTTP member.
    async fn stdio_exchange(
        &self,
        era: Era<'_>,
        member: &Member,
        body: &Bytes,
    ) -> Option<Result<(ResponseHead, Vec<u8>), UpstreamFailure>> {
        let handle = match self.stdio_of(member)? {
            Ok(h) => h,
            Err(f) => return Some(Err(f)),
        };
        let who = proxy::stdio_caller(self.ctx, self.obs);
        let caller = who.caller;
        let json = |bytes: Vec<u8>| (held::json_head(), bytes);
        let accepted = ResponseHead {
            status: 202,
            headers: http::Fields::default(),
        };
        // DELETE: the child's session is the gateway's, not the client's.
        let Ok(message) = serde_json::from_slice::<Value>(body) else {
            return Some(Ok((accepted, Vec::new())));
        };
        let method = message["method"].as_str().unwrap_or_default().to_owned();
        let has_id = message.get("id").is_some_and(|id| !id.is_null());
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
            e => UpstreamFailure::Bad(e.to_string()),
        };
        let started = std::time::Instant::now();
        if method == "server/discover" {
            let init = super::stdio_route::child_init(&handle, who).await;
            self.obs.waited(started.elapsed());
            return Some(init.map_err(failure).map(|init| {
                let v = json!({"jsonrpc": "2.0", "id": message["id"].clone(),
                    "result": messages::discover_from_initialize(&init)});
                json(super::json_bytes(&v))
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
        Some(held::call_learning(self.ctx, self.req, self.peer, up, owner, body, &extra).await)
    }

    /// Whether `member` speaks only the stateless era behind this session-era client: its
    /// requests are bridged ([`super::bridge`]), marked in the session by the version
    /// 2026-07-28.
    fn bridged(&self, era: Era<'_>, member: &Member) -> bool {
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
        let accepted = ResponseHead {
            status: 202,
            headers: http::Fields::default(),
        };
        let id = serde_json::from_slice::<Value>(body)
            .ok()
            .filter(|m| m["method"].is_string())
            .and_then(|m| Id::from_json(&m["id"]));
        let Some(id) = id else {
            return Ok((accepted, Vec::new()));
        };
        let up = self.upstream(member);
        super::bridge::call_with(self.ctx, self.req, self.peer, up, body, Some(&id))
            .await
            .map(|a| (a.head, a.body))
    }

    /// Serves one request on a federated route.
    pub async fn handle(&self, io: &mut Io, message: Option<Message>) -> bool {
        let stateless = self
            .req
            .header_str("mcp-protocol-version")
            .is_some_and(version::is_stateless_era)
            || message
                .as_ref()
                .and_then(|m| m.meta_protocol_version.as_deref())
                .is_some_and(version::is_stateless_era);
        if self.req.method == "POST"
            && let Some(m) = &message
            && m.method.as_deref() == Some("initialize")
            && m.kind == Kind::Request
        {
            return self.initialize(io, m).await;
        }
        let fed;
        let era = if stateless {
            Era::Stateless
        } else {
            match self.session() {
                Ok(s) => {
                    fed = s;
                    Era::Session(&fed)
                }
                Err(err) => {
                    return self
                        .reply_error(io, err.with_id(request_id(&message)))
                        .await;
                }
            }
        };
        match (self.req.method.as_str(), message) {
            ("GET", _) if stateless => {
                let err = RpcError::invalid_request("GET is not part of 2026-07-28");
                self.reply_error(
                    io,
                    RpcError {
                        http_status: 405,
                        ..err
                    },
                )
                .await
            }
            ("GET", _) => self.merged_stream(io, era).await,
            ("DELETE", _) => self.delete(io, era).await,
            ("POST", Some(m)) => match m.kind {
                Kind::Response => self.client_response(io, era, &m).await,
                Kind::Notification => self.notification(io, era, &m).await,
                Kind::Request => self.request(io, era, &m, stateless).await,
            },
            _ => {
                let err = RpcError::invalid_request("a JSON-RPC message is required");
                self.reply_error(io, err).await
            }
        }
    }

    fn session(&self) -> Result<FedSession, RpcError> {
        let Some(id) = self.req.header_str("mcp-session-id") else {
            return Err(RpcError::invalid_request(
                "Mcp-Session-Id is required after initialize",
            ));
        };
        // Another caller's session is as unknown as a forged one, and one its client ended
        // too.
        session::open(&self.ctx.shared.session_key, id)
            .filter(|s| s.owner == self.caller())
            .filter(|_| {
                !self.ctx.shared.ended_sessions.is_ended(
                    &self.ctx.shared.session_key,
                    session::Scope::Federated,
                    id.as_bytes(),
                )
            })
            .ok_or_else(|| {
                RpcError::new(
                    error::SESSION_NOT_FOUND,
                    "unknown or expired session: initialize again",
                    404,
                )
            })
    }

    /// The caller, who owns the sessions it opens.
    fn caller(&self) -> Owner {
        Owner(
            self.tenant.name.clone(),
            self.obs.decision.borrow().agent.clone(),
        )
    }

    /// Session era: initializes every member with the client's parameters, then answers the
    /// client with the merged capabilities and a session id that seals the members' sessions.
    async fn initialize(&self, io: &mut Io, m: &Message) -> bool {
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
        let upstream_body = Bytes::from(super::json_bytes(&upstream_body));
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
        if !super::bridge::known_stateless(self.ctx, up) {
            match held::initialize(self.ctx, self.req, self.peer, up, body, id).await {
                // Unless it was just learnt to speak only the stateless era.
                Err(why) if !super::bridge::known_stateless(self.ctx, up) => return Err(why),
                Err(_) => {}
                Ok((session, result)) => return Ok((session, result, false)),
            }
        }
        // Bridged: what a session-era server would have answered, from its `server/discover`.
        let params = serde_json::from_slice::<Value>(body)
            .map(|mut v| v["params"].take())
            .unwrap_or_default();
        let result = super::bridge::initialize_result(self.ctx, self.req, self.peer, up, &params)
            .await
            .map_err(describe)?;
        Ok((None, result, true))
    }

    async fn request(&self, io: &mut Io, era: Era<'_>, m: &Message, stateless: bool) -> bool {
        let id = m.id.clone();
        let method = m.method.as_deref().unwrap_or_default();
        match method {
            "ping" => self.reply_result(io, id.as_ref(), json!({}), None).await,
            "tools/list" => self.list(io, era, m, "tools", true).await,
            "prompts/list" => self.list(io, era, m, "prompts", true).await,
            "resources/list" => self.list(io, era, m, "resources", false).await,
            "resources/templates/list" => self.list(io, era, m, "resourceTemplates", false).await,
            "tools/call" | "prompts/get" => {
                let name = m.name.as_deref().unwrap_or_default();
                let Some((member, local)) = self.owner(name) else {
                    let what = if method == "tools/call" {
                        "tool"
                    } else {
                        "prompt"
                    };
                    let err = RpcError::invalid_params(format!("unknown {what} `{name}`"));
                    return self
                        .reply_error(
                            io,
                            RpcError {
                                http_status: 200,
                                ..err
                            }
                            .with_id(id),
                        )
                        .await;
                };
                let mut body: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
                set_in(&mut body, &["params", "name"], json!(local));
                self.routed(io, era, member, &body, Some(local), m).await
            }
            "completion/complete" => {
                let mut body: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
                let r = &body["params"]["ref"];
                if r["type"] == "ref/prompt"
                    && let Some(name) = r["name"].as_str()
                    && let Some((member, local)) = self.owner(name)
                {
                    let local = local.to_owned();
                    set_in(&mut body, &["params", "ref", "name"], json!(local));
                    return self.routed(io, era, member, &body, None, m).await;
                }
                self.first_success(io, era, m).await
            }
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                self.first_success(io, era, m).await
            }
            "logging/setLevel" => {
                self.broadcast(era, &self.req.body).await;
                self.reply_result(io, id.as_ref(), json!({}), None).await
            }
            "server/discover" => self.discover(io, era, m).await,
            _ => {
                let err = RpcError::new(
                    error::METHOD_NOT_FOUND,
                    format!("method `{method}` is not offered by this federated route"),
                    if stateless { 404 } else { 200 },
                );
                self.reply_error(io, err.with_id(id)).await
            }
        }
    }

    /// Forwards a request to the member that owns it; its answer is relayed as it arrives.
    async fn routed(
        &self,
        io: &mut Io,
        era: Era<'_>,
        member: &Member,
        body: &Value,
        mcp_name: Option<&str>,
        message: &Message,
    ) -> bool {
        let id = message.id.clone();
        let bytes = Bytes::from(super::json_bytes(body));
        let mut extra = vec![];
        if self.req.header("mcp-name").is_some() {
            extra.push(("mcp-name", mcp_name));
        }
        let up = self.upstream(member);
        if let Some(handle) = self.stdio_of(member) {
            let handle = match handle {
                Ok(h) => h,
                Err(f) => {
                    self.obs.set(crate::stats::Outcome::UpstreamFailure);
                    return proxy::fail(io, self.req, up, id, f).await;
                }
            };
            self.obs.upstream.set(Some(&up.name));
            let who = proxy::stdio_caller(self.ctx, self.obs);
            return super::stdio_route::request(
                io,
                self.req,
                &handle,
                who,
                message,
                self.obs,
                None,
                &bytes,
                Some(&up.name),
            )
            .await;
        }
        if self.bridged(era, member) {
            let sent = std::time::Instant::now();
            let call = super::bridge::call_with(
                self.ctx,
                self.req,
                self.peer,
                up,
                &bytes,
                message.id.as_ref(),
            );
            let key = self.cancel_key(message);
            let Some(answer) = super::bridge::cancellable(self.ctx, io, key, call).await else {
                self.obs.waited(sent.elapsed());
                self.obs.upstream.set(Some(&up.name));
                return super::bridge::cancelled(io, self.req, message.id.as_ref(), self.obs).await;
            };
            self.obs.waited(sent.elapsed());
            self.obs.upstream.set(Some(&up.name));
            return super::bridge::reply(io, self.req, up, message, answer, self.obs, None).await;
        }
        if matches!(era, Era::Stateless) {
            extra.push(("last-event-id", None));
            extra.push(("mcp-session-id", None));
            if held::known_session(self.ctx, up) == Some(true) {
                let sent = std::time::Instant::now();
                let owner = held::owner(self.ctx, up, self.obs);
                let answer =
                    held::call(self.ctx, self.req, self.peer, up, owner, &bytes, &extra).await;
                self.obs.waited(sent.elapsed());
                self.obs.upstream.set(Some(&up.name));
                return held::reply(io, self.req, up, message, answer, self.obs, None).await;
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
        let request = match self.request_for(member, era, &bytes, &extra) {
            Ok(r) => r,
            Err(e) => return self.reply_error(io, RpcError::from(e).with_id(id)).await,
        };
        let up = self.upstream(member);
        proxy::forward(
            io,
            self.req,
            request,
            up,
            id,
            self.ctx,
            Some(&up.name),
            self.obs,
        )
        .await
    }

    /// Sends `body` to every member and reads each whole answer, concurrently.
    async fn fan_out(
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

    /// Members taking part in `era`: in a session, those the session holds.
    fn active(&self, era: Era<'_>) -> Vec<usize> {
        (0..self.members.len())
            .filter(|i| match era {
                Era::Session(s) => s.member(&self.upstream(&self.members[*i]).name).is_some(),
                Era::Stateless => true,
            })
            .collect()
    }

    /// A merged list: every page of every member, names prefixed where `prefixed`. A member that
    /// fails is left out and named in `_meta`; if every member fails, the client gets the error.
    async fn list(
        &self,
        io: &mut Io,
        era: Era<'_>,
        m: &Message,
        key: &str,
        prefixed: bool,
    ) -> bool {
        let id = m.id.clone();
        let base: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
        let active = self.active(era);
        let mut items: Vec<Vec<Value>> = vec![Vec::new(); self.members.len()];
        let mut cursors: Vec<Option<Option<String>>> = vec![None; self.members.len()];
        let mut failed: Vec<(usize, String)> = Vec::new();
        let mut cache: Option<(u64, bool)> = None;
        let mut result_type: Option<Value> = None;
        let mut expired = None;
        for _ in 0..MAX_PAGES {
            let bodies: Vec<(usize, Bytes)> = active
                .iter()
                .filter(|i| !failed.iter().any(|(f, _)| f == *i))
                .filter(|i| !matches!(cursors[**i], Some(None)))
                .map(|i| {
                    let mut body = base.clone();
                    match &cursors[*i] {
                        Some(Some(c)) => set_in(&mut body, &["params", "cursor"], json!(c)),
                        _ => {
                            if let Some(p) = body.get_mut("params").and_then(Value::as_object_mut) {
                                p.remove("cursor");
                            }
                        }
                    }
                    (*i, super::json_bytes(&body).into())
                })
                .collect();
            if bodies.is_empty() {
                break;
            }
            for (i, r) in self.fan_out(era, bodies).await {
                let outcome = r.map_err(describe).and_then(|(head, bytes)| {
                    if head.status == 404
                        && matches!(era, Era::Session(_))
                        && !self.bridged(era, &self.members[i])
                    {
                        expired = Some(i);
                    }
                    response_result(&head, &bytes, id.as_ref())
                });
                match outcome {
                    Ok(result) => {
                        let prefix = &self.members[i].prefix;
                        let upstream = &self.upstream(&self.members[i]).name;
                        for mut item in result[key].as_array().cloned().unwrap_or_default() {
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
                                item["name"] = json!(format!("{prefix}{n}"));
                            }
                            items[i].push(item);
                        }
                        cursors[i] = Some(result["nextCursor"].as_str().map(str::to_owned));
                        if let Some(t) = result.get("resultType") {
                            result_type.get_or_insert_with(|| t.clone());
                        }
                        if let Some(ttl) = result["ttlMs"].as_u64() {
                            let private = result["cacheScope"] != "public";
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
    async fn first_success(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
        let id = m.id.clone();
        let mut last: Option<Value> = None;
        for i in self.active(era) {
            let r = self.fan_out(era, vec![(i, self.req.body.clone())]).await;
            let Some((_, Ok((head, bytes)))) = r.into_iter().next() else {
                continue;
            };
            match response_message(&head, &bytes, id.as_ref()) {
                Ok(msg) if msg.get("result").is_some() => {
                    return self
                        .reply_result(io, id.as_ref(), msg["result"].clone(), None)
                        .await;
                }
                Ok(msg) => last = Some(msg),
                Err(_) => {}
            }
        }
        match last {
            Some(msg) => {
                let body = super::json_bytes(&msg);
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
    async fn discover(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
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

    /// Sends `body` to every member, ignoring the answers (notifications, setLevel).
    async fn broadcast(&self, era: Era<'_>, body: &Bytes) {
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

    async fn notification(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
        match m.method.as_deref() {
            // Each member was sent its own at initialize.
            Some("notifications/initialized") => self.accepted(io).await,
            Some("notifications/cancelled") => {
                let mut body: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
                // Cancelling a member's request: only that member, with its own id.
                if let Some((member, original)) = body["params"]["requestId"]
                    .as_str()
                    .and_then(untag)
                    .and_then(|(name, id)| self.member_named(name).map(|m| (m, id)))
                {
                    set_in(&mut body, &["params", "requestId"], original);
                    let bytes = super::json_bytes(&body);
                    let i = self.members.iter().position(|x| std::ptr::eq(x, member));
                    if let Some(i) = i {
                        let _ = self.fan_out(era, vec![(i, bytes.into())]).await;
                    }
                } else {
                    // A client request's id: the members that do not know it ignore it, and
                    // the gateway ends a bridged call of it.
                    if let Era::Session(_) = era
                        && let Some(session) = self.req.header("mcp-session-id")
                    {
                        super::bridge::cancel(self.ctx, session, &self.req.body);
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
    async fn client_response(&self, io: &mut Io, era: Era<'_>, m: &Message) -> bool {
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
        let mut body: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
        set_in(&mut body, &["id"], original);
        let bytes = Bytes::from(super::json_bytes(&body));
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
        let request = match self.request_for(member, era, &bytes, &[]) {
            Ok(r) => r,
            Err(e) => return self.reply_error(io, RpcError::from(e)).await,
        };
        let up = self.upstream(member);
        proxy::forward(
            io,
            self.req,
            request,
            up,
            None,
            self.ctx,
            Some(&up.name),
            self.obs,
        )
        .await
    }

    /// What names the client's request `m` for its `notifications/cancelled`: its session
    /// and id.
    fn cancel_key(&self, m: &Message) -> Option<u64> {
        let session = self.req.header("mcp-session-id")?;
        Some(super::bridge::cancel_key(
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
    async fn delete(&self, io: &mut Io, era: Era<'_>) -> bool {
        self.broadcast(era, &Bytes::new()).await;
        // Only a session its caller was checked to own (the stateless era has none).
        if let Era::Session(_) = era
            && let Some(id) = self.req.header_str("mcp-session-id")
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

    /// Session era GET: every member's server-to-client stream, merged into one. A
    /// `Last-Event-ID` goes only to the member whose event it names.
    async fn merged_stream(&self, io: &mut Io, era: Era<'_>) -> bool {
        let last = self
            .req
            .header_str("last-event-id")
            .and_then(|v| v.split_once('.'))
            .map(|(name, id)| (name.to_owned(), id.to_owned()));
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
                .filter(|(name, _)| *name == up.name)
                .map(|(_, id)| id.as_str());
            let request =
                self.request_for(member, era, &Bytes::new(), &[("last-event-id", last_id)]);
            async move {
                let opened = match request {
                    Ok(request) => upstream::open(&self.ctx.pool, up, request, Some(client)).await,
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
                    monoio::spawn(pump(
                        up.name.clone(),
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
async fn pump(
    name: String,
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
                let rewritten = rewrite_events(&name, &complete);
                if !rewritten.is_empty() && tx.send(rewritten).await.is_err() {
                    return;
                }
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
            r = conn.fill(idle) => r,
            // Dropping `conn` closes it.
            _ = &mut stopped => return,
        };
        match filled {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

fn request_id(m: &Option<Message>) -> Option<Id> {
    m.as_ref()
        .filter(|m| m.kind == Kind::Request)
        .and_then(|m| m.id.clone())
}

/// Adds `b`'s capabilities to `a`: objects merge, flags are true if either is.
fn merge(a: &mut Map<String, Value>, b: &Map<String, Value>) {
    for (k, v) in b {
        match (a.get_mut(k), v) {
            (None, _) => {
                a.insert(k.clone(), v.clone());
            }
            (Some(Value::Object(x)), Value::Object(y)) => merge(x, y),
            (Some(Value::Bool(x)), Value::Bool(y)) => *x |= *y,
            _ => {}
        }
    }
}

/// The JSON-RPC message answering `id` in an upstream's response (a JSON body, or the matching
/// event of an SSE body).
#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::merge;

    #[test]
    fn capabilities_merge() {
        let mut a = json!({"tools": {"listChanged": false}, "logging": {}})
            .as_object()
            .cloned()
            .unwrap();
        let b = json!({"tools": {"listChanged": true}, "resources": {"subscribe": true}});
        merge(&mut a, b.as_object().unwrap());
        assert_eq!(
            Value::Object(a),
            json!({"tools": {"listChanged": true}, "logging": {}, "resources": {"subscribe": true}})
        );
    }
}
