//! Federation: one virtual MCP server over several upstreams.
//!
//! The gateway answers `initialize` itself after initializing every member, merges the lists
//! (`tools/list`, `prompts/list`, `resources/list`, `resources/templates/list`) with each
//! member's name prefix, routes each call to the member that owns the name, and keeps one
//! upstream session per client session per member, sealed into the client's session id
//! ([`crate::session`]), so that no state is shared between workers.
//!
//! Server-to-client messages are relayed as they arrive. Requests from a member (sampling,
//! elicitation, roots) get an id that names the member (`<upstream>.n.<id>` for a number,
//! `<upstream>.s.<id>` for a string); the client's answer is routed back with the original id.
//! SSE event ids are prefixed the same way, so that `Last-Event-ID` resumes at the right member.
//!
//! Here: the request's dispatch by method and era, and the replies. Beside it:
//! [`members`] (how one message reaches one member, whatever its transport), [`initialize`],
//! [`lists`] (answers merged from every member's), [`client_messages`] (notifications, the
//! client's answers to members, the session's end) and [`stream`] (the merged `GET` stream).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{
    Id, Kind, Message, RpcError, error,
    messages::set_in,
    proxy::{self, Obs, json_response},
    version,
    worker::WorkerCtx,
};
use crate::{
    config::{Config, Member, Upstream},
    http::{self, Io, Request},
    session::{self, FedSession, Owner},
};

mod client_messages;
mod initialize;
mod lists;
mod members;
mod stream;

/// Largest upstream answer the gateway reads whole (lists, initialize).
const MAX_COLLECTED: usize = 16 * 1024 * 1024;
/// Pages of one list the gateway follows per member.
const MAX_PAGES: usize = 100;
/// Keep-alive comment interval on merged streams; also how soon a gone client is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The member of `members` owning `name` (longest matching prefix; the member without a prefix
/// owns the rest) and the name as that member knows it. None for a name of the rest that reads
/// as another member's ([`reads_as_prefixed`]).
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
                .filter(|_| !reads_as_prefixed(members, name))
                .map(|m| (m, name))
        })
}

/// Whether `name`, of no member's prefix where members have prefixes, may read as a name of a
/// member's prefix: the same skeleton in any case (UTS #39: `uа_add` with a Cyrillic `а`, and
/// `UA_add`, read as `ua_add`), or a character a reader does not see as itself
/// ([`crate::policy::pins::hides_characters`]: small capitals `ᴜᴀ_add`, a modifier letter for
/// the `_`, a right-to-left override that shows `\u{202e}dda_au` as `ua_add`), which confusables
/// alone do not map. The member without a prefix listed such names beside member `ua_`'s,
/// with a description asking for the user's key, and its calls went to it (two reviews): they
/// are neither listed nor called.
fn reads_as_prefixed(members: &[Member], name: &str) -> bool {
    let mut prefixed = members.iter().filter(|m| !m.prefix.is_empty()).peekable();
    if prefixed.peek().is_none() {
        return false;
    }
    if crate::policy::pins::hides_characters(name) {
        return true;
    }
    // The skeleton of the name as it is and of its lower case, each in lower case: a capital
    // homoglyph (`Ʒ` and Cyrillic `З` read as `3`) has a lower case that does not (a review
    // of the lower case alone: `aws_sƷ_delete` beside `aws_s3_`'s).
    let looks = |s: &str| -> [String; 2] {
        [s.to_owned(), s.to_lowercase()].map(|s| {
            unicode_security::skeleton(&s)
                .collect::<String>()
                .to_lowercase()
        })
    };
    let names = looks(name);
    prefixed.any(|m| {
        let prefixes = looks(&m.prefix);
        names
            .iter()
            .any(|n| prefixes.iter().any(|p| n.starts_with(p.as_str())))
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
        let mut headers = vec![("content-type", "application/json")];
        if let Some(s) = session {
            headers.push(("mcp-session-id", s));
        }
        // Only the response is kept while it is written: not the result, nor its body alone.
        let response = {
            let body = super::json_bytes(&json!({
                "jsonrpc": "2.0",
                "id": id.map_or(Value::Null, Id::to_json),
                "result": result,
            }));
            http::response(200, &headers, &body, self.keep_alive())
        };
        io.write_all(response).await.is_ok()
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

    /// Sends `body` to HTTP member `m` over the client's session ([`Self::request_for`]) and
    /// relays its answer as it arrives; an answer to the request `id`, if it is one.
    async fn forward_to(
        &self,
        io: &mut Io,
        era: Era<'_>,
        m: &Member,
        body: &Bytes,
        extra: &[(&str, Option<&str>)],
        id: Option<Id>,
    ) -> bool {
        let request = match self.request_for(m, era, body, extra) {
            Ok(r) => r,
            Err(e) => return self.reply_error(io, RpcError::from(e).with_id(id)).await,
        };
        let up = self.upstream(m);
        crate::mcp::relay::forward(
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

    /// Serves one request on a federated route.
    pub async fn handle(&self, io: &mut Io, message: Option<Message>) -> bool {
        let stateless = self
            .req
            .header_str(crate::http::name::MCP_PROTOCOL_VERSION)
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
        let Some(id) = self.req.header_str(crate::http::name::MCP_SESSION_ID) else {
            return Err(RpcError::invalid_request(
                "Mcp-Session-Id is required after initialize",
            ));
        };
        // Another caller's session is as unknown as a forged one, and one its client ended
        // too.
        session::open(&self.ctx.shared.session_key, id)
            .filter(|s| s.owner == self.caller() && s.own == self.obs.decision.borrow().own)
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

    /// The caller, who owns the sessions it opens (with [`FedSession::own`]).
    fn caller(&self) -> Owner {
        Owner(
            self.tenant.name.clone(),
            self.obs.decision.borrow().agent.clone(),
        )
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
                let bytes = crate::mcp::rewritten(&self.req.body, |body| {
                    set_in(body, &["params", "name"], json!(local));
                    // No task of the member's choosing (2026-07-28 tasks extension): it would
                    // be nobody's to read here, and its work would hold no slot.
                    crate::mcp::tasks::without_tasks_extension(body);
                });
                self.routed(io, era, member, bytes, Some(local), m).await
            }
            "completion/complete" => {
                let prompt = {
                    let body: Value = serde_json::from_slice(&self.req.body).unwrap_or_default();
                    let r = &body["params"]["ref"];
                    (r["type"] == "ref/prompt")
                        .then(|| r["name"].as_str().map(str::to_owned))
                        .flatten()
                };
                if let Some(name) = prompt
                    && let Some((member, local)) = self.owner(&name)
                {
                    let bytes = crate::mcp::rewritten(&self.req.body, |body| {
                        set_in(body, &["params", "ref", "name"], json!(local));
                    });
                    return self.routed(io, era, member, bytes, None, m).await;
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::{merge, owner};
    use crate::config::Member;

    #[test]
    fn a_name_that_reads_as_another_members_is_nobodys() {
        let members = [
            Member {
                upstream: 0,
                prefix: "ua_".into(),
            },
            Member {
                upstream: 1,
                prefix: String::new(),
            },
        ];
        let of = |name: &'static str| owner(&members, name).map(|(m, local)| (m.upstream, local));
        assert_eq!(of("ua_add"), Some((0, "add")));
        assert_eq!(of("add"), Some((1, "add")));
        assert_eq!(of("ub_add"), Some((1, "ub_add")));
        // A Cyrillic `а`; fullwidth letters; another case; small capitals; a modifier
        // letter for `_`; a right-to-left override.
        for name in [
            "u\u{430}_add",
            "\u{ff55}\u{ff41}_add",
            "UA_add",
            "Ua_add",
            "\u{1d1c}\u{1d00}_add",
            "ua\u{2cd}add",
            "ua\u{2017}add",
            "\u{202e}dda_au",
        ] {
            assert_eq!(of(name), None, "{}", name.escape_default());
        }
        // Capital homoglyphs of `3` (their lower cases are not).
        let s3 = [
            Member {
                upstream: 0,
                prefix: "aws_s3_".into(),
            },
            Member {
                upstream: 1,
                prefix: String::new(),
            },
        ];
        for name in ["aws_s\u{1b7}_delete", "aws_s\u{417}_delete"] {
            assert!(owner(&s3, name).is_none(), "{}", name.escape_default());
        }
        assert_eq!(
            owner(&s3, "aws_s3_delete").map(|(m, n)| (m.upstream, n)),
            Some((0, "delete"))
        );
        // The whole prefix alone is the rest's.
        assert_eq!(of("ua"), Some((1, "ua")));
    }

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
