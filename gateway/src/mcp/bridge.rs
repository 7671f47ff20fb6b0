//! Session-era clients in front of an upstream that speaks only the 2026-07-28 (stateless)
//! era: the reverse of [`super::held`]. Passthrough here; federation members through
//! [`initialize_result`] and [`call_with`].
//!
//! A session-era client opens with `initialize`, carries `Mcp-Session-Id` and the negotiated
//! `MCP-Protocol-Version`, and may `ping`; a stateless-only server knows none of that and
//! wants the 2026 envelope (`params._meta` with the protocol version and the client's
//! capabilities) and the routing headers (`Mcp-Method`, `Mcp-Name`) on every request. So for
//! such an upstream the gateway:
//! - answers `initialize` itself from the upstream's `server/discover` (the client's own
//!   session-era version if the gateway speaks it, else the newest session era), with a session
//!   id of its own, bound to the caller like any passthrough session;
//! - sends every other request with the envelope and headers added and the session id taken
//!   out, reads the answer whole and gives the client the response (as JSON, or as an event
//!   stream with the notifications that came before it) without the 2026-only fields;
//! - answers `ping`, notifications (`notifications/initialized`, `cancelled`: the 2026 era has
//!   none from clients) and `DELETE` itself; a GET stream is not offered (405, as the session
//!   era allows).
//!
//! The envelope declares no client capabilities, as a held session does: the upstream must not
//! count on asking this client anything (a `resultType: "input_required"` answer could not be
//! relayed to it, and is an error naming the upstream).
//!
//! Which upstreams need this is configured (`era = "stateless"`) or learnt (`era = "auto"`):
//! a session-era message goes as the client sent it, and an upstream that refuses it with
//! -32022 (unsupported protocol version) listing only stateless-era versions is remembered for
//! five minutes by every worker (the client's next request may reach another) while the
//! message is bridged. Such a refusal means the request was not processed; nothing is sent to
//! learn it.
//!
//! What it must never do: send the client's session id or the header values it did not check;
//! every value in the head it writes comes from the body the parse stage checked.

use std::{net::SocketAddr, time::Instant};

use serde_json::{Map, Value, json};

use super::{
    Id, Kind, Message, era,
    held::{self, Answer},
    messages::answer_and_notes,
    proxy::{Obs, bridge_session, ended_key, upstream_request},
    upstream,
    upstream::{ResponseHead, UpstreamFailure},
    version,
    worker::WorkerCtx,
};
use crate::{
    config::Upstream,
    http::{self, Io, Request},
    stats::Outcome,
};

/// Largest upstream answer read whole.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// The envelope's keys (2026-07-28, "Per-request protocol fields").
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
const META_CLIENT: &str = "io.modelcontextprotocol/clientInfo";
const META_SERVER: &str = "io.modelcontextprotocol/serverInfo";

/// Passthrough: a session-era message to an upstream whose era is not known goes as the client
/// sent it and is relayed as it arrives, unless the upstream refuses it as
/// [`super::era::refuses_session_era`] says (a small 400, read before anything is relayed): then the era
/// is learnt, for every worker, and the message is bridged.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward_learning<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    up: &'c Upstream,
    m: &Message,
    extra: &[(&str, Option<&str>)],
    obs: &Obs<'c>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    let refused = Some(era::refuses_session_era as held::Judge);
    match held::open_judging(io, req, peer, ctx, up, m, &req.body, extra, obs, refused).await {
        held::Opened::Answered(keep) => keep,
        held::Opened::Refused => {
            era::learn_stateless(ctx, up);
            forward(io, req, peer, ctx, up, m, obs, None).await
        }
        held::Opened::Relay(conn, head) => {
            super::relay::relay(io, conn, req, head, up, m.request_id(), ctx, None, obs).await
        }
    }
}

/// Passthrough: answers a session-era client's request `m` from a stateless-only `up`. With
/// `filter`, a `tools/list` answer keeps only what it keeps.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    up: &'c Upstream,
    m: &Message,
    obs: &Obs<'c>,
    filter: Option<&dyn Fn(&Value) -> bool>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    let local = |body: Value| {
        Ok(Answer {
            head: held::json_head(),
            body: super::json_bytes(&body),
            notes: Vec::new(),
        })
    };
    let method = m.method.as_deref().unwrap_or_default();
    let answer = if m.kind != Kind::Request {
        // Notifications and responses: the stateless era takes none from a client. A
        // cancellation is the gateway's to carry out: it closes the call's upstream exchange.
        if method == "notifications/cancelled"
            && let Some(session) = req.header(crate::http::name::MCP_SESSION_ID)
        {
            cancel(ctx, session, &req.body);
        }
        obs.set(Outcome::Ok);
        return io
            .write_all(http::response(202, &[], b"", req.keep_alive))
            .await
            .is_ok();
    } else if method == "ping" {
        local(json!({"jsonrpc": "2.0", "id": id_json(m.id.as_ref()), "result": {}}))
    } else {
        let sent = Instant::now();
        let answer = if method == "initialize" {
            // Never cancelled (the protocol says so).
            initialize(ctx, req, peer, up, obs.tenant_key(ctx), m).await
        } else {
            let key = req
                .header(crate::http::name::MCP_SESSION_ID)
                .zip(m.id.as_ref())
                .map(|(session, id)| cancel_key(ctx, session, &id.to_json()));
            let called = call(ctx, req, peer, up, obs.tenant_key(ctx), m);
            match cancellable(ctx, io, req, m.id.as_ref(), obs, key, called).await {
                Ok(answer) => answer,
                Err(keep) => {
                    obs.waited(sent.elapsed());
                    return keep;
                }
            }
        };
        obs.waited(sent.elapsed());
        answer
    };
    if method == "initialize"
        && let Ok(mut a) = answer
    {
        // The gateway's own session id, signed for the caller like an upstream's and marked
        // as bridged.
        a.head
            .headers
            .replace_values("mcp-session-id", |id| bridge_session(ctx, up, obs, id));
        return reply_with_session(io, req, a.head, a.body, obs).await;
    }
    reply(io, req, up, m, answer, obs, filter).await
}

/// A keyed hash naming the request `id` of a client's `session`, for [`crate::session::Cancels`].
pub(super) fn cancel_key(ctx: &WorkerCtx, session: &[u8], id: &Value) -> u64 {
    ctx.shared
        .limits
        .key(("cancel", session, id.to_string().as_str()))
}

/// Carries out a client's `notifications/cancelled` (`body`) in its `session`: the bridged call
/// it names, if one is in flight, ends.
pub(super) fn cancel(ctx: &WorkerCtx, session: &[u8], body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let id = &v["params"]["requestId"];
    if id.is_string() || id.is_number() {
        ctx.shared.cancels.cancel(cancel_key(ctx, session, id));
    }
}

/// Runs a bridged call `fut` until it is answered. `Err` when its client cancels it first
/// (`key`, see [`cancel`]) or leaves: the client is answered here (-32800), and the `Err` says
/// whether its connection can carry another request. Either way the call's upstream exchange
/// is dropped, its connection closed: the stateless era's cancellation. Not for a call that
/// runs on without its client (`Obs::runs_on`: the upstream is not said to stop a call whose
/// connection closes): its client leaving is no cancellation (nor in the session era), and
/// its cancellation is answered at once, its connection closed (nothing waits behind it), while
/// the call is awaited to its end, its slots held until then.
pub(super) async fn cancellable<F: std::future::Future>(
    ctx: &WorkerCtx,
    io: &mut Io,
    req: &Request,
    id: Option<&Id>,
    obs: &Obs<'_>,
    key: Option<u64>,
    fut: F,
) -> Result<F::Output, bool> {
    let mut fut = std::pin::pin!(fut);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&*io);
    let cut = || ctx.open.was_cut(fd);
    let registered = key.map(|k| ctx.shared.cancels.register(k));
    let cancelled_by_client = async {
        match &registered {
            Some(r) => r.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let outcome = {
        let client: &Io = io;
        monoio::select! {
            r = upstream::unless_client_leaves(super::relay::watch(client, obs, &cut), fut.as_mut()) => r,
            () = cancelled_by_client => None,
        }
    };
    match outcome {
        // The client left a call that ran on without it: nobody to answer.
        Some(_) if obs.client_left.get() => {
            obs.set(Outcome::UpstreamFailure);
            Err(false)
        }
        Some(out) => Ok(out),
        None if obs.runs_on.get() && !cut() => {
            let _ = answer_cancelled(io, id, obs, false).await;
            let _ = fut.await;
            Err(false)
        }
        None => {
            // Cut for a ban or deny: closed (see `tasks::Owners::hold_cut`).
            obs.abandoned.set(cut());
            Err(answer_cancelled(io, id, obs, req.keep_alive).await)
        }
    }
}

/// The answer to a request its client cancelled (or left): a JSON-RPC error, as SDK servers
/// answer one (the client no longer waits for it; the HTTP exchange still needs an end).
async fn answer_cancelled(io: &mut Io, id: Option<&Id>, obs: &Obs<'_>, keep_alive: bool) -> bool {
    obs.set(Outcome::RpcError);
    // Nothing the upstream did: no breaker counts it (a probe taken is given back).
    obs.client_left.set(true);
    let body = json!({"jsonrpc": "2.0", "id": id_json(id),
        "error": {"code": REQUEST_CANCELLED, "message": "request cancelled by the client"}});
    io.write_all(http::response(
        200,
        &[("content-type", "application/json")],
        &super::json_bytes(&body),
        keep_alive,
    ))
    .await
    .is_ok()
}

/// The JSON-RPC error code of a cancelled request (as in LSP: MCP defines none).
const REQUEST_CANCELLED: i64 = -32800;

/// The client's answer from a bridged exchange: as [`held::reply`] gives it, but the upstream's
/// own refusal of the request (a JSON-RPC error with a 4xx) is the client's answer, as in
/// passthrough: the request's fault, not the upstream's, so no breaker counts it. It goes with
/// 200, as a session-era server answers a JSON-RPC error: the stateless era's statuses mean
/// something else to a session-era client (404: its session is gone, initialize again).
pub(super) async fn reply(
    io: &mut Io,
    req: &Request,
    up: &Upstream,
    m: &Message,
    answer: Result<Answer, UpstreamFailure>,
    obs: &Obs<'_>,
    filter: Option<&dyn Fn(&Value) -> bool>,
) -> bool {
    if let Ok(a) = &answer
        && (400..500).contains(&a.head.status)
        && serde_json::from_slice::<Value>(&a.body).is_ok_and(|v| v.get("error").is_some())
    {
        obs.own_failure();
        return io
            .write_all(http::response(
                200,
                &[("content-type", "application/json")],
                &a.body,
                req.keep_alive,
            ))
            .await
            .is_ok();
    }
    let tools = filter.map(|keep| move |v: &mut Value| held::keep_listed(v, keep));
    let edit = tools
        .as_ref()
        .map(|e| e as &dyn Fn(&mut Value) -> Result<(), String>);
    held::reply(io, req, up, m, answer, obs, edit).await
}

/// The answer to `initialize`, made from the upstream's `server/discover`, with a session id of
/// the gateway's own.
async fn initialize(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
    m: &Message,
) -> Result<Answer, UpstreamFailure> {
    let params = initialize_params(&req.body);
    let result = initialize_result(ctx, req, peer, up, tenant, &params).await?;
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| UpstreamFailure::Bad(e.to_string()))?;
    let session: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Answer {
        head: ResponseHead {
            status: 200,
            headers: [
                ("content-type", b"application/json".as_slice()),
                ("mcp-session-id", session.as_bytes()),
            ]
            .into_iter()
            .collect(),
        },
        body: super::json_bytes(
            &json!({"jsonrpc": "2.0", "id": id_json(m.id.as_ref()), "result": result}),
        ),
        notes: Vec::new(),
    })
}

/// Of a session-era `initialize` `body`, what [`initialize_result`] reads, held while the
/// upstream answers: the version asked for, and `clientInfo` (passed on in the envelope) if it
/// is at most 8 KiB as JSON, else its `name`, `title` and `version` strings of up to 256
/// bytes. Before, the client's whole parameters were held, then its whole `clientInfo`: twelve
/// of 2 MB held 420 to 434 MiB (reviews).
pub(super) fn initialize_params(body: &[u8]) -> Value {
    const MAX_INFO: usize = 8 * 1024;
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return Value::Null;
    };
    let p = &mut v["params"];
    let mut info = p["clientInfo"].take();
    if super::json_bytes(&info).len() > MAX_INFO {
        let mut kept = Map::new();
        for key in ["name", "title", "version"] {
            if let Some(s) = info[key].as_str().filter(|s| s.len() <= 256) {
                kept.insert(key.into(), json!(s));
            }
        }
        info = Value::Object(kept);
    }
    json!({"clientInfo": info, "protocolVersion": p["protocolVersion"].take()})
}

/// The result of `initialize` with `params` (a session-era client's), made from the upstream's
/// `server/discover`: what a session-era server would have answered.
pub(super) async fn initialize_result(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
    params: &Value,
) -> Result<Value, UpstreamFailure> {
    let mut meta = Map::new();
    if params["clientInfo"].is_object() {
        meta.insert(META_CLIENT.into(), params["clientInfo"].clone());
    }
    let discover = json!({"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {}});
    let (head, body) = exchange(ctx, req, peer, up, tenant, discover, meta).await?;
    // Whose a failure is, as for a held session's `initialize`.
    if !(200..300).contains(&head.status) {
        let why = format!("server/discover answered HTTP {}", head.status);
        return Err(UpstreamFailure::of_exchange(head.status, why));
    }
    let (discovered, _) =
        answer_and_notes(&head, &body, Some(&Id::Num(0))).map_err(UpstreamFailure::Unrelayable)?;
    let Some(found) = discovered.get("result") else {
        return Err(UpstreamFailure::Unrelayable(format!(
            "server/discover failed: {}",
            discovered["error"]
        )));
    };
    let version = params["protocolVersion"]
        .as_str()
        .filter(|v| version::is_supported(v) && !version::is_stateless_era(v))
        .unwrap_or(version::LATEST_SESSION_ERA);
    let mut result = json!({
        "protocolVersion": version,
        "capabilities": found.get("capabilities").cloned().unwrap_or_else(|| json!({})),
        "serverInfo": found
            .get("serverInfo")
            .or_else(|| found["_meta"].get(META_SERVER))
            .cloned()
            .unwrap_or_else(|| json!({"name": up.name, "version": ""})),
    });
    if let Some(text) = found.get("instructions") {
        result["instructions"] = text.clone();
    }
    Ok(result)
}

/// Any other request: sent with the 2026 envelope, its answer read whole and given back
/// without the stateless era's own fields.
async fn call(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
    m: &Message,
) -> Result<Answer, UpstreamFailure> {
    call_with(ctx, req, peer, up, tenant, &req.body, m.id.as_ref()).await
}

/// A session-era request `body` (id `id`) to a stateless-only `up`, as [`call`] sends it.
pub(super) async fn call_with(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
    body: &[u8],
    id: Option<&Id>,
) -> Result<Answer, UpstreamFailure> {
    let message: Value = serde_json::from_slice(body)
        .map_err(|e| UpstreamFailure::Unrelayable(format!("the request is not JSON: {e}")))?;
    let method = message["method"].as_str().unwrap_or_default().to_owned();
    // A call of a tool not listed through the gateway yet: its headers are not known. Refused
    // for want of them, the tools are listed (as the specification asks a client to) and the
    // call is sent once more.
    // (The tool's name, and the message read again from `body` to be sent once more: not a
    // copy of it held while the upstream answers, 16 to 32 bytes a value: a review.)
    let unlisted = (method == "tools/call")
        .then(|| message["params"]["name"].as_str().map(str::to_owned))
        .flatten()
        .filter(|tool| ctx.learned.param_headers.get(&up.name, tool).is_none());
    let (mut head, mut reply) = exchange(ctx, req, peer, up, tenant, message, Map::new()).await?;
    if let Some(tool) = unlisted
        && head.status == 400
        && refused_for_headers(&reply)
        && list_tools(ctx, req, peer, up, tenant).await
        && ctx.learned.param_headers.get(&up.name, &tool).is_some()
        && let Ok(message) = serde_json::from_slice::<Value>(body)
    {
        (head, reply) = exchange(ctx, req, peer, up, tenant, message, Map::new()).await?;
    }
    if !(200..300).contains(&head.status) {
        return Ok(Answer {
            head,
            body: reply,
            notes: Vec::new(),
        });
    }
    // An answer the gateway cannot read is the call's own failure, as on passthrough: a tool's
    // output can be shaped by its caller (a number past `f64`).
    let (mut answer, notes) =
        answer_and_notes(&head, &reply, id).map_err(UpstreamFailure::Unrelayable)?;
    if method == "tools/list" {
        learn_headers(ctx, up, &answer);
    }
    if let Some(result) = answer.get_mut("result").and_then(Value::as_object_mut) {
        if result.get("resultType").and_then(Value::as_str) == Some("input_required") {
            return Err(UpstreamFailure::Unrelayable(
                "it asks the client for input (2026-07-28 input_required), which a session-era client cannot be asked through the gateway".into(),
            ));
        }
        for field in ["resultType", "ttlMs", "cacheScope"] {
            result.remove(field);
        }
    }
    Ok(Answer {
        head: held::json_head(),
        body: super::json_bytes(&answer),
        notes: notes.iter().map(super::json_bytes).collect(),
    })
}

/// Sends `message` to `up` as a 2026-07-28 request: the envelope in `params._meta` (with
/// `meta` besides), the routing headers from the message itself, no session.
async fn exchange(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
    mut message: Value,
    meta: Map<String, Value>,
) -> Result<(ResponseHead, Vec<u8>), UpstreamFailure> {
    let method = message["method"].as_str().unwrap_or_default().to_owned();
    let name = match method.as_str() {
        "tools/call" | "prompts/get" => message["params"]["name"].as_str(),
        "resources/read" => message["params"]["uri"].as_str(),
        _ => None,
    }
    .map(super::param_headers::header_text);
    // The arguments the tool mirrors into headers (learnt from its listing), as a 2026-07-28
    // client sends them: a server that checks them refuses the call without (-32020).
    let mirrored: Vec<(String, String)> = match method.as_str() {
        "tools/call" => message["params"]["name"]
            .as_str()
            .and_then(|tool| ctx.learned.param_headers.get(&up.name, tool))
            .and_then(|d| {
                d.as_ref()
                    .as_ref()
                    .ok()
                    .map(|d| super::param_headers::fields(d, message["params"].get("arguments")))
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if !message["params"].is_object() {
        message["params"] = json!({});
    }
    let params = &mut message["params"];
    if !params["_meta"].is_object() {
        params["_meta"] = json!({});
    }
    if let Some(m) = params["_meta"].as_object_mut() {
        m.extend(meta);
        m.insert(META_VERSION.into(), json!(version::STATELESS));
        m.insert(META_CAPABILITIES.into(), json!({}));
    }
    let body = bytes::Bytes::from(super::json_bytes(&message));
    // Not held while the upstream answers (16 to 32 bytes a value: a review).
    drop(message);
    let mut replace = vec![
        ("mcp-session-id", None),
        ("mcp-protocol-version", Some(version::STATELESS)),
        ("mcp-method", Some(method.as_str())),
        ("mcp-name", name.as_deref()),
        ("last-event-id", None),
        held::READ_WHOLE[0],
        held::READ_WHOLE[1],
    ];
    replace.extend(mirrored.iter().map(|(n, v)| (n.as_str(), Some(v.as_str()))));
    let request = upstream_request(req, peer, up, &body, &replace)
        .map_err(|e| UpstreamFailure::Unrelayable(e.to_string()))?;
    upstream::call(&ctx.pool, up, tenant, request, MAX_ANSWER).await
}

/// Whether a 400 refuses a request for its headers (-32020 HeaderMismatch).
fn refused_for_headers(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .is_ok_and(|v| v["error"]["code"] == super::error::HEADER_MISMATCH)
}

/// Notes the `x-mcp-header` declarations of the tools a `tools/list` answer lists.
fn learn_headers(ctx: &WorkerCtx, up: &Upstream, answer: &Value) {
    for tool in answer["result"]["tools"].as_array().into_iter().flatten() {
        ctx.learned.param_headers.observe(&up.name, tool);
    }
}

/// Lists `up`'s tools (at most [`LIST_PAGES`] pages) to learn their declarations; false
/// (nothing sent) when this worker did so less than [`RELIST_AFTER`] ago: a call of a tool its
/// listing does not show (or past its pages) made 12 upstream requests each time (a review).
async fn list_tools(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    tenant: u64,
) -> bool {
    {
        let mut listed = ctx.held.bridge_listed.borrow_mut();
        if listed
            .get(&up.key)
            .is_some_and(|at| at.elapsed() < RELIST_AFTER)
        {
            return false;
        }
        listed.retain(|_, at| at.elapsed() < RELIST_AFTER);
        listed.insert(up.key, Instant::now());
    }
    let mut cursor: Option<String> = None;
    for page in 0..LIST_PAGES {
        let mut params = Map::new();
        if let Some(c) = cursor.take() {
            params.insert("cursor".into(), Value::String(c));
        }
        let id = format!("mcp-gateway.list.{page}");
        let message = json!({"jsonrpc": "2.0", "id": id, "method": "tools/list", "params": params});
        let Ok((head, body)) = exchange(ctx, req, peer, up, tenant, message, Map::new()).await
        else {
            return true;
        };
        let id = Id::Str(id);
        let Ok((answer, _)) = answer_and_notes(&head, &body, Some(&id)) else {
            return true;
        };
        learn_headers(ctx, up, &answer);
        match answer["result"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return true,
        }
    }
    true
}

/// Pages of `tools/list` the bridge reads to learn a tool's headers.
const LIST_PAGES: usize = 10;

/// How long a worker's listing of an upstream's tools stands before the bridge lists again.
pub(super) const RELIST_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

fn id_json(id: Option<&Id>) -> Value {
    id.map_or(Value::Null, Id::to_json)
}

/// `initialize`'s answer with the session id the gateway made.
async fn reply_with_session(
    io: &mut Io,
    req: &Request,
    head: ResponseHead,
    body: Vec<u8>,
    obs: &Obs<'_>,
) -> bool {
    obs.set(Outcome::Ok);
    let session = head
        .headers
        .get(crate::http::name::MCP_SESSION_ID)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default();
    io.write_all(http::response(
        200,
        &[
            ("content-type", "application/json"),
            ("mcp-session-id", session),
        ],
        &body,
        req.keep_alive,
    ))
    .await
    .is_ok()
}

/// A session-era client's GET (a stream the stateless era does not have) or DELETE (the
/// gateway's own session ends with it: the upstream holds none).
pub(super) async fn other_method(
    io: &mut Io,
    req: &Request,
    ctx: &WorkerCtx,
    up: &Upstream,
) -> bool {
    let out = if req.method == "DELETE" {
        if let Some(id) = req.header(crate::http::name::MCP_SESSION_ID) {
            ctx.shared.ended_sessions.end(
                ended_key(ctx, up, id),
                crate::policy::limits::State::unix_s(),
            );
        }
        http::response(200, &[], b"", req.keep_alive)
    } else {
        http::response(405, &[("allow", "POST, DELETE")], b"", req.keep_alive)
    };
    io.write_all(out).await.is_ok() && req.keep_alive
}
