//! The request's path on a worker, as named stages:
//!
//! origin (and CORS) → route → version → trace → identity → parse → check → claim → admit →
//! forward, then record.
//!
//! Each stage either hands the next what it learned or stops the request with a [`Stop`],
//! which one place ([`answer`]) turns into the client's answer. Nothing reaches an upstream
//! before every stage up to `admit` has passed for every message of the request; what `admit`
//! charged is given back when a later message of the same request is refused.

use std::{
    net::SocketAddr,
    time::{Instant, SystemTime},
};

use super::{
    Id, Kind, Message, Parsed, RpcError, error,
    proxy::{
        Blame, Obs, Verified, give_back_probes, invalid_traceparent, json_response,
        protected_resource_metadata, refuse, trace_id, verify_session,
    },
    version,
    worker::WorkerCtx,
};
use crate::{
    config::{Config, Route, Target},
    http::{self, Io, Request},
    policy::{self, Admission, Ask, Identity, Policy, Refusal, TenantPolicy, audit},
    shared::Snapshot,
    stats::{self, Observation, Outcome},
};

/// Why a request goes no further, and how it is answered.
pub(super) enum Stop {
    /// A JSON-RPC error with this HTTP status.
    Reply(u16, RpcError),
    /// A policy refusal: counted by rule, audited, and towards an auto-ban.
    Refuse(Box<Refusal>, Option<Id>),
    /// A complete answer of its own (a 405 with `Allow`).
    Raw(Vec<u8>),
}

impl Stop {
    fn reply(err: RpcError) -> Self {
        Self::Reply(err.http_status, err)
    }
}

/// The messages of one request.
#[derive(Default)]
pub(super) struct Messages {
    /// A lone message.
    pub(super) single: Option<Message>,
    /// The members of a batch.
    pub(super) batch: Vec<Message>,
    /// The id of a lone request.
    pub(super) request_id: Option<Id>,
}

impl Messages {
    pub(super) fn all(&self) -> impl Iterator<Item = &Message> {
        self.single.iter().chain(self.batch.iter())
    }

    /// Drops the calls' arguments read for policy once it has ruled: nothing after admission
    /// reads them, and held for the call's length (the upstream's answer) they cost 16 to 32
    /// bytes a value: twenty slow calls of 2 MB of arguments each held 786 MB (a review).
    fn forget_arguments(&mut self) {
        for m in self.single.iter_mut().chain(self.batch.iter_mut()) {
            m.arguments = None;
        }
    }

    /// The id an answer about `m` carries: none inside a batch (the answer is about the batch).
    fn id_for(&self, m: &Message) -> Option<Id> {
        if self.batch.is_empty() {
            m.id.clone()
        } else {
            None
        }
    }
}

/// Answers one request and records it; returns whether the client connection can carry
/// another.
pub(super) async fn handle(
    io: &mut Io,
    req: &mut Request,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
) -> bool {
    let started = Instant::now();
    let wall = snapshot
        .config
        .telemetry
        .otlp
        .is_some()
        .then(SystemTime::now);
    let obs = Obs::default();
    obs.method.set(stats::method_label(&req.method));
    io.begin_response();
    let _call = (req.method != "GET").then(|| InCall::new(&ctx.calls));
    let keep = match run(io, req, peer, snapshot, ctx, &obs).await {
        Ok(keep) => keep,
        Err(stop) => answer(io, req, stop, &obs, ctx, peer, &snapshot.config).await,
    };
    let status = io.response_status();
    record(req, peer, snapshot, ctx, &obs, started, status);
    if ctx.shared.access.load().enabled() {
        record_access(req, peer, snapshot, ctx, &obs, started, status);
    }
    if let Some(wall) = wall {
        record_span(req, peer, snapshot, ctx, &obs, started, wall);
    }
    keep
}

/// A call in flight on this worker, counted in `WorkerCtx::calls` while it lasts.
struct InCall<'a>(&'a std::cell::Cell<usize>);

impl<'a> InCall<'a> {
    fn new(calls: &'a std::cell::Cell<usize>) -> Self {
        calls.set(calls.get() + 1);
        Self(calls)
    }
}

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// A request that was not read whole (a head too large or malformed, a body too large, cut
/// short or too slow): refused, and recorded as every refusal is (metrics, `gateway top`, the
/// access log; the audit log when its head named a route). Before, such refusals were answered
/// and counted nowhere: a flood of them, or a client whose every call was too large, showed in
/// no error ratio (an operator's review).
pub(super) async fn unread(
    io: &mut Io,
    unread: http::Unread,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
) {
    let started = Instant::now();
    let req = unread.head.map_or_else(
        || Request {
            method: String::new(),
            target: String::new(),
            minor: 1,
            headers: http::Fields::default(),
            body: bytes::Bytes::new(),
            keep_alive: false,
        },
        |head| *head,
    );
    let obs = Obs::default();
    obs.method.set(stats::method_label(&req.method));
    // Malformed requests refused before they were read whole (contradictory framing, a body
    // that never comes) count towards a ban as every refusal the client earned does: a flood
    // of them did not (an operator's review). Not a head or body over the limits: a web page
    // makes its visitors' browsers send those (a 20 KB URL in an `<img>`, a 5 MB `fetch()`:
    // a review of the change), nor a token in the URL (an `<img>` of `?access_token=1`
    // banned a visitor: a review of the next change). A browser sends no other: whatever
    // headers say a browser sent it, it counts (an attacker's review added `Sec-Fetch-Mode`
    // and was never banned).
    if !matches!(
        unread.error,
        http::HttpError::HeadTooLarge(_)
            | http::HttpError::BodyTooLarge(_)
            | http::HttpError::TokenInQuery
    ) {
        super::proxy::count_toward_ban(ctx, &snapshot.config, peer);
    }
    // Clipped as a path is: the error may name what the client sent (a field name up to half
    // the head's limit, written twice), and each audit line carried it whole, 8 KB a line
    // (a review of the change).
    let why = unread.error.to_string();
    obs.decision.borrow_mut().reason = Some(clip(&why, MAX_REASON).to_owned());
    io.begin_response();
    let err = RpcError::invalid_request(why);
    let _ = io
        .write_all(json_response(unread.error.status(), &err, false))
        .await;
    let status = io.response_status();
    record(&req, peer, snapshot, ctx, &obs, started, status);
    if ctx.shared.access.load().enabled() {
        record_access(&req, peer, snapshot, ctx, &obs, started, status);
    }
}

/// The stages in order.
async fn run<'c>(
    io: &mut Io,
    req: &mut Request,
    peer: SocketAddr,
    snapshot: &'c Snapshot,
    ctx: &WorkerCtx,
    obs: &Obs<'c>,
) -> Result<bool, Stop> {
    let config = &snapshot.config;
    let policy = &snapshot.policy;
    let page = origin(config, req)?;
    if req.method == "OPTIONS" {
        return Ok(preflight(io, req, config, page).await);
    }
    if let Some(page) = page {
        cors(io, config, page);
    } else if !config.http.allowed_origins.is_empty() {
        // Answers differ by Origin: a cache must not give this one to a page.
        io.add_head_lines(b"vary: origin\r\n");
    }
    if let Some(rest) = req
        .path()
        .strip_prefix("/.well-known/oauth-protected-resource")
    {
        return Ok(protected_resource_metadata(io, req, rest, config, policy).await);
    }
    let route = route(config, req)?;
    let protocol = version(req)?;
    let header_trace = trace(req)?;
    let (who, tenant) = identity(io, req, peer, snapshot, route, ctx, obs, header_trace)?;
    let mut messages = parse(req, ctx, route, tenant, protocol, obs)?;
    let session = check(req, ctx, snapshot, route, tenant, &messages, obs)?;
    propagate(req, &messages, config, obs);
    let req = &*req;
    let claims = claim(req, ctx, config, route, tenant, &messages, session)?;
    let mut admissions = admit(
        req, peer, ctx, config, policy, route, &who, tenant, &messages, obs,
    )?;
    messages.forget_arguments();
    // The admissions' in-flight slots, for a task the call creates to take over.
    obs.slots
        .borrow_mut()
        .extend(admissions.iter_mut().flat_map(|a| a.guards.drain(..)));
    let keep = forward_stage(
        io, req, peer, ctx, snapshot, route, tenant, messages, session, obs,
    )
    .await;
    // A call that runs on without its client (`Obs::runs_on`), closed as its client was cut
    // for a ban or deny: its slots are held as long as a client that left would have had the
    // call waited for (`tasks::Owners::hold_cut`): a JSON answer's head, or an event stream
    // (a review: the response timeout alone freed a streamed call's slot 10 times sooner
    // than hanging up did).
    if obs.runs_on.get()
        && obs.abandoned.get()
        && ctx.open.was_cut(std::os::fd::AsRawFd::as_raw_fd(&*io))
    {
        let up = obs.upstream.get();
        let for_s = config
            .upstreams
            .iter()
            .find(|u| Some(u.name.as_str()) == up)
            .map_or(1, |u| {
                u.response_timeout
                    .max(u.stream_idle_timeout)
                    .as_secs()
                    .max(1)
            });
        ctx.learned.tasks.hold_cut(obs.slots.take(), for_s);
    }
    // The in-flight slots, and the claims their ids, are held until the answer has been
    // relayed (or the call abandoned and cancelled).
    drop(obs.slots.take());
    drop(admissions);
    drop(claims);
    Ok(keep)
}

/// The one place a stopped request is answered.
async fn answer(
    io: &mut Io,
    req: &Request,
    stop: Stop,
    obs: &Obs<'_>,
    ctx: &WorkerCtx,
    peer: SocketAddr,
    config: &Config,
) -> bool {
    match stop {
        Stop::Reply(status, err) => {
            // A request the gateway itself found malformed (a body that does not parse, a
            // message JSON-RPC does not allow) is a refusal the client earned. Not a route or
            // a session it does not serve, nor an origin it does not allow: a web page makes
            // its visitors' browsers send those (51 `<img>` tags, `fetch()` from another
            // origin), and every client meets a session gone after a restart (a review). Nor
            // a GET or HEAD: an `<img>` or a link makes a browser send one, with no `Origin`
            // (and over plain HTTP no `Sec-Fetch-*`) to tell it from a client's, and a page's
            // other requests carry its `Origin`, refused (403) before any 400 unless the page
            // is one the operator allows. Which headers a request carries decides nothing: an
            // attacker adds a browser's (a review of the first version, which spared them).
            let banned = status == 400
                && !matches!(req.method.as_str(), "GET" | "HEAD")
                && super::proxy::count_toward_ban(ctx, config, peer);
            io.write_all(json_response(status, &err, req.keep_alive && !banned))
                .await
                .is_ok()
                && !banned
        }
        Stop::Refuse(r, id) => refuse(io, req, &r, id, obs, ctx, peer, config).await,
        Stop::Raw(bytes) => io.write_all(bytes).await.is_ok(),
    }
}

/// route: the endpoint the path names (refused with a query where its upstream has one).
fn route<'c>(config: &'c Config, req: &Request) -> Result<&'c Route, Stop> {
    let route = config
        .routes
        .iter()
        .find(|r| r.path == req.path())
        .ok_or_else(|| {
            let paths: Vec<&str> = config.routes.iter().map(|r| r.path.as_str()).collect();
            Stop::reply(
                RpcError::new(
                    error::METHOD_NOT_FOUND,
                    format!("no MCP endpoint at {}", req.path()),
                    404,
                )
                .with_data(serde_json::json!({ "endpoints": paths })),
            )
        })?;
    if route.upstream_query && req.target.contains('?') {
        // Appended to the upstream's own, a client's parameters would stand for the
        // operator's where a server reads the last of two.
        return Err(Stop::reply(RpcError::invalid_request(
            "this endpoint's upstream has a query of its own: a request to it takes none",
        )));
    }
    Ok(route)
}

/// origin: a browser's request from a page not allowed is refused (DNS rebinding). The
/// allowed page, if a browser's, is returned for the CORS answer.
fn origin<'r>(config: &Config, req: &'r Request) -> Result<Option<&'r str>, Stop> {
    match req.header_str(crate::http::name::ORIGIN) {
        Some(origin) if !config.http.allowed_origins.iter().any(|o| o == origin) => {
            Err(Stop::Reply(
                403,
                RpcError::invalid_request(format!("origin `{origin}` is not allowed")),
            ))
        }
        page => Ok(page),
    }
}

/// The CORS lines for an allowed page go on whatever answer this request gets.
fn cors(io: &mut Io, config: &Config, page: &str) {
    match config.http.cors.response_lines(page) {
        Ok(lines) => io.add_head_lines(&lines),
        Err(e) => crate::throttled_warn!("CORS headers not written: {e}"),
    }
}

/// A CORS preflight (`OPTIONS`) on an MCP endpoint or the protected-resource metadata: the
/// gateway's own policy, answered before identity (a preflight carries no credentials).
async fn preflight(io: &mut Io, req: &Request, config: &Config, page: Option<&str>) -> bool {
    let known = config.routes.iter().any(|r| r.path == req.path())
        || req
            .path()
            .starts_with("/.well-known/oauth-protected-resource");
    let out = if known {
        config.http.cors.preflight(page, req.keep_alive)
    } else {
        crate::http::response(404, &[], b"", req.keep_alive)
    };
    io.write_all(out).await.is_ok() && req.keep_alive
}

/// version: the `MCP-Protocol-Version` header, if any, names a version the gateway speaks.
fn version(req: &Request) -> Result<Option<&str>, Stop> {
    let Some(raw) = req.header(crate::http::name::MCP_PROTOCOL_VERSION) else {
        return Ok(None);
    };
    // One that is not UTF-8 is refused, not taken for none: it is forwarded, and an upstream
    // that reads it as Latin-1 (and trims a no-break space) would find a version the gateway
    // never checked (a reviewer's finding).
    let protocol = std::str::from_utf8(raw).ok().map(crate::http::ows);
    if protocol.is_none_or(|v| !version::is_supported(v)) {
        return Err(Stop::reply(
            RpcError::new(
                error::UNSUPPORTED_VERSION,
                format!(
                    "unsupported MCP-Protocol-Version `{}`",
                    String::from_utf8_lossy(raw).trim()
                ),
                400,
            )
            .with_data(serde_json::json!({ "supported": version::SUPPORTED })),
        ));
    }
    Ok(protocol)
}

/// trace: a `traceparent` header is valid whole, or refused (it is forwarded).
fn trace(req: &Request) -> Result<Option<String>, Stop> {
    match req.header(crate::http::name::TRACEPARENT) {
        None => Ok(None),
        Some(v) => match std::str::from_utf8(v).ok().and_then(trace_id) {
            Some(t) => Ok(Some(t.to_owned())),
            None => Err(Stop::reply(invalid_traceparent("the traceparent header"))),
        },
    }
}

/// propagate: the trace context the upstream receives. With `[telemetry.otlp]` the request's
/// span starts here, under the client's `traceparent` (the header's, else the message's
/// `_meta`, both validated whole by now), and every `traceparent` line is replaced by one naming
/// the gateway's span. A `tracestate` is forwarded only when valid per W3C and only alongside
/// the client's own `traceparent` header; otherwise it is dropped.
fn propagate(req: &mut Request, messages: &Messages, config: &Config, obs: &Obs<'_>) {
    let header_parent = req
        .header_str(crate::http::name::TRACEPARENT)
        .filter(|tp| trace_id(tp).is_some())
        .map(str::to_owned);
    let states: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("tracestate"))
        .map(|(_, v)| v)
        .collect();
    let state = (!states.is_empty())
        .then(|| {
            let joined = states.join(&b","[..]);
            String::from_utf8(joined)
                .ok()
                .filter(|s| crate::otlp::valid_tracestate(s))
        })
        .flatten();
    let Some(otlp) = &config.telemetry.otlp else {
        if !states.is_empty() && state.is_none() {
            req.headers
                .retain(|n, _| !n.eq_ignore_ascii_case("tracestate"));
        }
        return;
    };
    let parent = header_parent.clone().or_else(|| {
        messages
            .all()
            .find_map(|m| m.meta_traceparent.clone())
            .filter(|tp| trace_id(tp).is_some())
    });
    let span = crate::otlp::SpanCtx::start(parent.as_deref(), otlp.sample_ratio);
    obs.span.set(Some(span));
    req.headers.retain(|n, _| {
        !n.eq_ignore_ascii_case("traceparent") && !n.eq_ignore_ascii_case("tracestate")
    });
    req.headers
        .push("traceparent", span.traceparent().as_bytes());
    if let Some(state) = state.filter(|_| header_parent.is_some()) {
        req.headers.push("tracestate", state.as_bytes());
    }
}

/// identity: who calls, from every credential the request carries (a verified client
/// certificate among them, on a route that accepts `mtls`).
#[expect(
    clippy::too_many_arguments,
    reason = "the stage's inputs, named as the other stages name them"
)]
fn identity<'c>(
    io: &Io,
    req: &Request,
    peer: SocketAddr,
    snapshot: &'c Snapshot,
    route: &Route,
    ctx: &WorkerCtx,
    obs: &Obs<'_>,
    header_trace: Option<String>,
) -> Result<(Identity, &'c TenantPolicy), Stop> {
    let policy = &snapshot.policy;
    let peer_cert = route
        .auth
        .contains(&crate::config::AuthMethod::Mtls)
        .then(|| io.tls().map(policy::mtls::PeerCert::of));
    let cert = match &peer_cert {
        None | Some(None) => policy::mtls::ClientCert::Plaintext,
        Some(Some(None)) => policy::mtls::ClientCert::Absent,
        Some(Some(Some(c))) => policy::mtls::ClientCert::Present(c),
    };
    let (who, proofs) = policy
        .authenticate_proving(
            route,
            &req.headers,
            snapshot.classifier.tenant_of(peer.ip()),
            cert,
            io.tls().is_some(),
        )
        .map_err(|r| Stop::Refuse(r, None))?;
    // What the connection was admitted as, judged again when a reload changes the
    // configuration (`OpenConns::cut_refused`).
    ctx.open.admitted(
        std::os::fd::AsRawFd::as_raw_fd(io),
        snapshot.serial,
        ctx.shared.snapshot.load().serial,
        |kept: Option<&policy::rejudge::Admission>| {
            // Most requests on a connection are its last one's caller again: nothing is made.
            match kept {
                Some(k) if k.is(policy, &route.path, &who, &proofs) => None,
                _ => Some(policy::rejudge::Admission::new(
                    policy,
                    &route.path,
                    &who,
                    &proofs,
                )),
            }
        },
    );
    let tenant = &policy.tenants[who.tenant];
    let mut d = obs.decision.borrow_mut();
    d.tenant = Some(tenant.name.clone());
    d.vouched = who.via != policy::Via::Address;
    d.agent.clone_from(&who.agent);
    d.own.clone_from(&who.own);
    d.run.clone_from(&who.run);
    d.trace_id = header_trace;
    Ok((who, tenant))
}

/// parse: the body of a POST as JSON-RPC (one parser, duplicate keys refused); GET and DELETE
/// carry none; other methods are refused.
fn parse(
    req: &Request,
    ctx: &WorkerCtx,
    route: &Route,
    tenant: &TenantPolicy,
    protocol: Option<&str>,
    obs: &Obs<'_>,
) -> Result<Messages, Stop> {
    let mut out = Messages::default();
    match req.method.as_str() {
        "POST" => {}
        // A GET opens a stream and a DELETE ends a session: neither carries a message. A body
        // on them would reach the upstream unchecked by policy, so it is refused.
        "GET" | "DELETE" if !req.body.is_empty() => {
            return Err(Stop::reply(RpcError::invalid_request(format!(
                "a {} carries no body: JSON-RPC messages are POSTed",
                req.method
            ))));
        }
        "GET" | "DELETE" => return Ok(out),
        _ => {
            let err = RpcError::invalid_request(format!(
                "method {} is not allowed here",
                clip(&req.method, 32)
            ));
            return Err(Stop::Raw(http::response(
                405,
                &[
                    ("content-type", "application/json"),
                    ("allow", "GET, POST, DELETE"),
                ],
                &err.body(),
                req.keep_alive,
            )));
        }
    }
    if let Err(why) = json_body_type(req) {
        return Err(Stop::Reply(415, RpcError::invalid_request(why)));
    }
    let parsed = ctx
        .parser
        .borrow_mut()
        .parse_for(&req.body, tenant.needs_arguments);
    match parsed {
        Err(err) => Err(Stop::reply(err)),
        Ok(Parsed::Batch(_))
            if !version::allows_batches(protocol.unwrap_or(version::ASSUMED_WITHOUT_HEADER)) =>
        {
            Err(Stop::reply(RpcError::invalid_request(
                "JSON-RPC batches are not allowed in this protocol version",
            )))
        }
        Ok(Parsed::Single(m)) => {
            obs.method.set(match m.kind {
                Kind::Request => stats::method_label(m.method.as_deref().unwrap_or("")),
                Kind::Notification => "notification",
                Kind::Response => "response",
            });
            if m.method.as_deref() == Some("tools/call") {
                *obs.tool.borrow_mut() = m.name.clone();
            }
            super::headers::check(req, &m).map_err(Stop::reply)?;
            if m.kind == Kind::Request {
                out.request_id = m.id.clone();
            }
            out.single = Some(m);
            Ok(out)
        }
        Ok(Parsed::Batch(_)) if matches!(route.target, Target::Federation(_)) => Err(Stop::reply(
            RpcError::invalid_request("JSON-RPC batches are not supported on a federated route"),
        )),
        Ok(Parsed::Batch(items)) => {
            // Batches are of the session era alone.
            for m in &items {
                super::headers::no_envelope(m).map_err(Stop::reply)?;
            }
            *obs.batch.borrow_mut() = items
                .iter()
                .map(|m| audit::Member {
                    method: m.method.clone().unwrap_or_else(|| "response".to_owned()),
                    tool: m
                        .name
                        .clone()
                        .filter(|_| m.method.as_deref() == Some("tools/call")),
                })
                .collect();
            out.batch = items;
            Ok(out)
        }
    }
}

/// Whether the body is JSON in UTF-8, as the gateway parses it, and as every server will read
/// it. `Content-Type` must be `application/json`, with no charset but UTF-8: a server reads the
/// body in the charset named (Express's `json()` decodes `utf-7`, in which `+ACI-` is a quote),
/// so another one makes it read a message the gateway never saw. No content coding either
/// (servers inflate a gzip body). What is forwarded says `application/json` and no more.
fn json_body_type(req: &Request) -> Result<(), &'static str> {
    const WANT: &str = "Content-Type must be application/json (in UTF-8)";
    let ct = req
        .header_str(crate::http::name::CONTENT_TYPE)
        .ok_or(WANT)?;
    if !http::media_type(ct.as_bytes()).eq_ignore_ascii_case(b"application/json") {
        return Err(WANT);
    }
    for (name, value) in http::media_params(ct) {
        if !name.eq_ignore_ascii_case("charset") || !http::is_utf8(value) {
            return Err(
                "Content-Type must be application/json, with no parameter but charset=utf-8",
            );
        }
    }
    match req.header_str(crate::http::name::CONTENT_ENCODING) {
        Some(c) if !http::ows(c).eq_ignore_ascii_case("identity") => {
            Err("a request body must not be compressed (Content-Encoding)")
        }
        _ => Ok(()),
    }
}

/// check: what policy cannot decide is refused before anything is charged: a trace context
/// inside a message that is not valid; a request sent without an id (policy limits requests;
/// the upstream would still run it); a batched `tools/list` for a tenant whose lists are
/// filtered (only a lone one is); a passthrough session that is not the caller's. The session
/// a passthrough request continues, verified here, is what the forward sends on.
fn check(
    req: &Request,
    ctx: &WorkerCtx,
    snapshot: &Snapshot,
    route: &Route,
    tenant: &TenantPolicy,
    messages: &Messages,
    obs: &Obs<'_>,
) -> Result<Option<Verified>, Stop> {
    let (config, policy) = (&snapshot.config, &snapshot.policy);
    if let Some(m) = messages.all().find(|m| {
        m.meta_traceparent
            .as_deref()
            .is_some_and(|tp| trace_id(tp).is_none())
    }) {
        let err = invalid_traceparent("params._meta.traceparent").with_id(messages.id_for(m));
        return Err(Stop::reply(err));
    }
    for m in messages.all() {
        let method = m.method.as_deref().unwrap_or_default();
        let why = if m.kind == Kind::Notification && !method.starts_with("notifications/") {
            format!("`{method}` is a request, not a notification: it needs an `id`")
        } else if !messages.batch.is_empty()
            && m.kind == Kind::Request
            && method == "tools/list"
            && super::proxy::reads_tool_lists(req, policy, tenant)
        {
            "`tools/list` is answered per tenant here: send it alone, not in a batch".to_owned()
        } else {
            continue;
        };
        let r = Refusal::new(
            400,
            policy::code::INVALID_REQUEST,
            format!("routes[{}]", route.path),
            why,
        );
        return Err(Stop::Refuse(r, messages.id_for(m)));
    }
    if let Some(m) = &messages.single {
        param_headers_agree(req, ctx, config, route, m)?;
    }
    // A stateless client has no handshake. Sent on, an `initialize` would open an upstream
    // session nobody uses, or (on a session the gateway holds for a tenant's callers) declare
    // capabilities for every caller.
    if let Some(m) = messages.single.as_ref().filter(|m| {
        m.method.as_deref() == Some("initialize") && super::headers::is_modern(req, Some(m))
    }) {
        let err = RpcError::new(
            super::error::METHOD_NOT_FOUND,
            "`initialize` is not a method of the stateless era (2026-07-28)",
            404,
        );
        return Err(Stop::reply(err.with_id(messages.id_for(m))));
    }
    if !messages.batch.is_empty()
        && let Target::Passthrough(u) = &route.target
        && config
            .upstreams
            .get(*u)
            .is_some_and(|up| up.stdio.is_some())
    {
        return Err(Stop::reply(RpcError::invalid_request(
            "JSON-RPC batches are not supported on a route to a stdio upstream",
        )));
    }
    // A passthrough session is its opener's: one never opened here (or on the fleet), another
    // caller's or an altered id is unknown.
    if let Target::Passthrough(u) = &route.target
        && let Some(up) = config.upstreams.get(*u)
        && let Some(id) = req.header(crate::http::name::MCP_SESSION_ID)
    {
        return match verify_session(ctx, up, obs, id) {
            Some(v) => Ok(Some(v)),
            None => Err(Stop::reply(
                RpcError::new(
                    error::SESSION_NOT_FOUND,
                    "unknown or expired session: initialize again",
                    404,
                )
                .with_id(messages.request_id.clone()),
            )),
        };
    }
    Ok(None)
}

/// claim: a request's id is its session's alone while the request is in flight, on every
/// worker (MCP: a requestor never uses an id twice in a session). Servers keep the calls
/// they run by id, and the Python SDK's overwrites a call with a second of the same id: when
/// the first call's client left, its cancellation (`abandoned`) reached the second, or
/// nothing, and the first ran on after its concurrency slot was given back (an attacker's
/// review: seven `sleep` calls of a tool capped at one, each hidden behind a quick call with
/// its id). Ids are compared as clients compare them (`"7"` is `7`); a request without a
/// session has its own exchange and claims nothing. A second request with an id in flight
/// is refused (409, -32600) before it is admitted or charged. A passthrough session is its
/// upstream's, whatever route it comes by (a session opened on one route is taken on
/// another to the same upstream: keyed by route, the second route got around the claim), and
/// a federated session is taken on every federated route (keyed by route, the same). Claims
/// are this host's: a fleet's other hosts do not see them.
fn claim(
    req: &Request,
    ctx: &WorkerCtx,
    config: &Config,
    route: &Route,
    tenant: &TenantPolicy,
    messages: &Messages,
    session: Option<Verified>,
) -> Result<Vec<policy::limits::IdClaim>, Stop> {
    let Some(header) = req.header(crate::http::name::MCP_SESSION_ID) else {
        return Ok(Vec::new());
    };
    // The session the upstream sees: the signed id's own part for a passthrough session.
    let session = match session {
        Some(Verified::Upstream { own }) => header.get(..own).unwrap_or(header),
        _ => header,
    };
    let scope = match &route.target {
        Target::Passthrough(u) => ("upstream", config.upstreams[*u].name.as_str()),
        // Sealed with a nonce of its own: one id for one session on every route.
        Target::Federation(_) => ("federation", ""),
    };
    let state = &ctx.shared.limits;
    let mut claims = Vec::new();
    for m in messages.all().filter(|m| m.kind == Kind::Request) {
        let Some(id) = &m.id else { continue };
        let key = state.key(("rpc-id", scope, &tenant.name, session, id.compared()));
        match state.claim_id(key) {
            Some(c) => claims.push(c),
            None => {
                let r = Refusal::new(
                    409,
                    policy::code::INVALID_REQUEST,
                    format!("routes[{}]", route.path),
                    "a request with this id is in flight in this session: a request's id \
                     is never used twice in a session"
                        .to_owned(),
                );
                return Err(Stop::Refuse(r, messages.id_for(m)));
            }
        }
    }
    Ok(claims)
}

/// The upstream and the tool (as that upstream names it) a `tools/call` calls.
fn called_tool<'c, 'm>(
    config: &'c Config,
    route: &Route,
    m: &'m Message,
) -> Option<(&'c str, &'m str)> {
    let name = m
        .name
        .as_deref()
        .filter(|_| m.method.as_deref() == Some("tools/call"))?;
    match &route.target {
        Target::Passthrough(u) => Some((config.upstreams[*u].name.as_str(), name)),
        Target::Federation(members) => super::federation::owner(members, name)
            .map(|(member, local)| (config.upstreams[member.upstream].name.as_str(), local)),
    }
}

/// A 2026-07-28 `tools/call`'s `Mcp-Param-*` headers agree with its arguments (see
/// `param_headers`): a router or server behind the gateway that acts on them sees what policy
/// decided on. A disagreement is -32020 (HeaderMismatch), 400.
fn param_headers_agree(
    req: &Request,
    ctx: &WorkerCtx,
    config: &Config,
    route: &Route,
    m: &Message,
) -> Result<(), Stop> {
    if !super::headers::is_modern(req, Some(m)) {
        return Ok(());
    }
    // What the headers may mirror: `Mcp-Param-*` a `tools/call`'s arguments, `Mcp-Method` and
    // `Mcp-Name` a message with a method (checked in `headers`). Anything else would reach a
    // router unchecked.
    let refuse = |why: String| {
        let err = RpcError::new(error::HEADER_MISMATCH, why, 400).with_id(m.id.clone());
        Err(Stop::reply(err))
    };
    let calls = m.method.as_deref() == Some("tools/call");
    let mut headers: Vec<(&str, &str)> = Vec::new();
    for (name, value) in req.headers.iter() {
        let part = super::param_headers::name_part(name);
        let mirrors_a_method =
            name.eq_ignore_ascii_case("mcp-method") || name.eq_ignore_ascii_case("mcp-name");
        if (part.is_some() && !calls) || (mirrors_a_method && m.method.is_none()) {
            return refuse(format!(
                "{name} does not belong on this message: it mirrors nothing in its body"
            ));
        }
        let Some(part) = part else {
            continue;
        };
        let Ok(value) = std::str::from_utf8(value) else {
            return refuse(format!(
                "Mcp-Param-{part} is not UTF-8 (use the =?base64?...?= form)"
            ));
        };
        headers.push((part, http::ows(value)));
    }
    let Some((upstream, tool)) = called_tool(config, route, m) else {
        return Ok(());
    };
    let declared = ctx.learned.param_headers.get(upstream, tool);
    let needs_arguments = !headers.is_empty()
        || declared
            .as_deref()
            .is_some_and(|d| d.as_ref().is_ok_and(|d| !d.is_empty()));
    if !needs_arguments {
        return Ok(());
    }
    // Parsed without them when no rule of the tenant reads arguments: parsed again, with.
    let reparsed;
    let arguments = match &m.arguments {
        Some(a) => Some(a),
        None => {
            reparsed = match ctx.parser.borrow_mut().parse_for(&req.body, true) {
                Ok(Parsed::Single(m)) => m.arguments,
                _ => None,
            };
            reparsed.as_ref()
        }
    };
    match super::param_headers::check(tool, &headers, declared.as_deref(), arguments) {
        Ok(()) => Ok(()),
        Err(why) => refuse(why),
    }
}

/// admit: every message of the request is admitted (pins, breakers, rules, rates, budgets,
/// loops), or the request is refused and what the admitted ones charged is given back.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the decision"
)]
fn admit(
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    config: &Config,
    policy: &Policy,
    route: &Route,
    who: &Identity,
    tenant: &TenantPolicy,
    messages: &Messages,
    obs: &Obs<'_>,
) -> Result<Vec<Admission>, Stop> {
    let mut admissions: Vec<Admission> = Vec::new();
    // JSON text held in the request's strings is read within one message's values, for every
    // member, rule and breaker together (each rule and the breaker read within their own:
    // eight rules over one 2 MB string took 89 times a plain request's CPU, a review).
    let held_values = std::cell::Cell::new(crate::values::MAX);
    let refuse_all = |admissions: &mut Vec<Admission>, r: Box<Refusal>, id: Option<Id>| {
        for a in admissions.iter_mut() {
            a.give_back(&ctx.shared.limits);
        }
        Stop::Refuse(r, id)
    };
    if messages.single.is_none() && messages.batch.is_empty() {
        // A GET or a DELETE: at the rate of what settles a session. Before, none was
        // counted: a tenant of one request a second had 100 GETs forwarded in 0.04 s (to
        // every member of a federation), and DELETEs without end (an attacker's review).
        policy
            .admit_settling(&ctx.shared.limits, who)
            .map_err(|r| Stop::Refuse(r, None))?;
    }
    for m in messages.all() {
        let tool = called_tool(config, route, m);
        // The called tool's upstream (for its pins' reach and its breakers), looked up once.
        let called =
            tool.and_then(|(upstream, _)| config.upstreams.iter().position(|u| u.name == upstream));
        // The argument keys of the pinned tool's approved definition, for the loop breaker.
        let mut argument_keys = None;
        if policy.pinning
            && let Some((upstream, local)) = tool
        {
            // A per-caller child's supervisor checks the definition its own child listed: a
            // change another caller's child listed holds nothing of this caller's.
            let reaches = if called
                .and_then(|up| config.upstreams[up].stdio.as_ref())
                .is_some_and(|s| s.per_caller.is_some())
            {
                policy::pins::Reaches::OwnChild
            } else {
                policy::pins::Reaches::Upstream
            };
            match ctx.shared.pins.call(
                upstream,
                local,
                policy.configured_pin(upstream, local),
                reaches,
            ) {
                Ok(keys) => argument_keys = keys,
                Err(why) => {
                    let what = match why {
                        policy::pins::Unpinned::Changed => format!(
                            "the definition of tool `{local}` at upstream `{upstream}` changed; an operator must approve it (POST /pins/approve)"
                        ),
                        policy::pins::Unpinned::NotSeen => format!(
                            "tool `{local}` at upstream `{upstream}` is pinned by the configuration and no listing has shown that definition yet: list tools, then call it"
                        ),
                        policy::pins::Unpinned::NoRoom => format!(
                            "tool `{local}` at upstream `{upstream}` is not pinned: the upstream's share of the pin table is full"
                        ),
                        why @ (policy::pins::Unpinned::LooksLike(_)
                        | policy::pins::Unpinned::HiddenCharacter) => format!(
                            "tool `{}` at upstream `{upstream}` is not pinned: {}",
                            local.escape_default(),
                            policy::pins::not_plain_reason(&why).unwrap_or_default()
                        ),
                    };
                    let r = Refusal::new(
                        403,
                        policy::code::PENDING_APPROVAL,
                        // The upstream's pins, not the tool's: a rule is a label of the refusals'
                        // metric, and the tool's name is the client's (one new series per made-up name).
                        format!("pins[{upstream}]"),
                        what,
                    );
                    return Err(refuse_all(&mut admissions, r, m.id.clone()));
                }
            }
        }
        let ask = Ask {
            is_request: m.kind == Kind::Request,
            method: m.method.as_deref().unwrap_or_default(),
            tool,
            arguments: m.arguments.as_ref(),
            argument_keys: argument_keys.as_deref(),
            message_bytes: req.body.len(),
            source: peer.ip(),
            held_values: &held_values,
        };
        // Breakers first: a call refused for an open circuit charges no budget.
        if let Some((upstream, local)) = tool
            && let Some(up) = called
            && let Some(c) = &config.upstreams[up].breaker
        {
            let now = ctx.shared.limits.now();
            // The longest a call to it may be out, as a probe.
            let lease =
                config.upstreams[up].connect_timeout + config.upstreams[up].response_timeout;
            for (name, tool_level) in policy::breaker::names(upstream, local, &tenant.name) {
                match ctx.shared.breakers.allow(&name, now, c, lease) {
                    Ok(pass) => obs
                        .breakers
                        .borrow_mut()
                        .push(&ctx.shared, (name, up, tool_level, pass)),
                    Err(wait) => {
                        // Probes already taken are given back unjudged.
                        give_back_probes(obs, ctx);
                        let what = if tool_level {
                            format!("tool `{local}` of upstream `{upstream}`")
                        } else {
                            format!("upstream `{upstream}`")
                        };
                        let r = Refusal::new(
                            503,
                            policy::code::CIRCUIT_OPEN,
                            format!("upstreams[{upstream}].breaker"),
                            format!(
                                "the circuit breaker for {what} is open after repeated failures"
                            ),
                        )
                        .retry(wait);
                        return Err(refuse_all(&mut admissions, r, m.id.clone()));
                    }
                }
            }
        }
        match policy.admit(&ctx.shared.limits, who, &ask) {
            Ok(a) => {
                let mut d = obs.decision.borrow_mut();
                if a.budget_left.is_some() {
                    d.budget_left.clone_from(&a.budget_left);
                }
                if a.rule.is_some() {
                    d.rule.clone_from(&a.rule);
                }
                if d.trace_id.is_none() {
                    d.trace_id = m
                        .meta_traceparent
                        .as_deref()
                        .and_then(trace_id)
                        .map(str::to_owned);
                }
                admissions.push(a);
            }
            Err(r) => {
                give_back_probes(obs, ctx);
                return Err(refuse_all(&mut admissions, r, messages.id_for(m)));
            }
        }
    }
    Ok(admissions)
}

/// forward: to the route's upstream ([`super::passthrough`]), or across the federation's
/// members.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
async fn forward_stage<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    snapshot: &'c Snapshot,
    route: &'c Route,
    tenant: &'c TenantPolicy,
    messages: Messages,
    verified: Option<Verified>,
    obs: &Obs<'c>,
) -> bool {
    let config = &snapshot.config;
    let policy = &snapshot.policy;
    match &route.target {
        Target::Passthrough(u) => {
            let up = &config.upstreams[*u];
            super::passthrough::forward(
                io, req, peer, ctx, policy, up, tenant, &messages, verified, obs,
            )
            .await
        }
        Target::Federation(members) => {
            // A federated route offers no `tasks/*`: a task a member made would be nobody's
            // to read (and, over a held session, the tenant's).
            if let Some(m) = &messages.single
                && m.kind == Kind::Request
                && (m.asks_task.is_some() || m.related_task.is_some())
            {
                let err = RpcError::invalid_request(
                    "tasks are not offered on a federated route: call without `params.task`",
                )
                .with_id(m.id.clone());
                obs.set(crate::stats::Outcome::RpcError);
                return io
                    .write_all(json_response(400, &err, req.keep_alive))
                    .await
                    .is_ok();
            }
            let fed = super::federation::Federation {
                members,
                config,
                ctx,
                req,
                peer,
                obs,
                tenant,
                policy,
            };
            // Boxed: a federation's future (~34 KiB) is not carried by every request's.
            Box::pin(fed.handle(io, messages.single)).await
        }
    }
}

/// The access log's line for this request: the configured fields, in their order.
fn record_access(
    req: &Request,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
    obs: &Obs<'_>,
    started: Instant,
    status: u16,
) {
    use crate::config::AccessField as F;
    use serde_json::Value;
    let config = &snapshot.config;
    let Some(access) = &config.telemetry.access_log else {
        return;
    };
    let decision = obs.decision.borrow();
    let text = |v: Option<&str>| v.map_or(Value::Null, |s| Value::String(s.to_owned()));
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let mut line = audit::AccessLine(Vec::with_capacity(access.fields.len()));
    for field in &access.fields {
        let (name, value) = match field {
            F::Ts => ("ts", Value::String(audit::now())),
            F::Source => ("source", Value::String(peer.ip().to_string())),
            F::Method => (
                "method",
                Value::String(http::method_label(&req.method).to_owned()),
            ),
            // The client's too, on an unmatched route: clipped as the User-Agent is.
            F::Path => ("path", Value::String(clip(req.path(), MAX_PATH).to_owned())),
            F::Status => ("status", Value::from(status)),
            F::RpcMethod => ("rpc_method", Value::String(obs.method.get().to_owned())),
            F::Tool => ("tool", text(obs.tool.borrow().as_deref())),
            F::Tenant => ("tenant", text(decision.tenant.as_deref())),
            F::Agent => ("agent", text(decision.agent.as_deref())),
            F::Run => ("run", text(decision.run.as_deref())),
            F::Upstream => ("upstream", text(obs.upstream.get())),
            F::Outcome => (
                "outcome",
                Value::String(
                    obs.outcome
                        .get()
                        .unwrap_or(Outcome::Refused)
                        .label()
                        .to_owned(),
                ),
            ),
            F::Rule => ("rule", text(decision.rule.as_deref())),
            F::LatencyUs => ("latency_us", Value::from(micros(started.elapsed()))),
            F::UpstreamUs => (
                "upstream_us",
                obs.upstream_wait
                    .get()
                    .map_or(Value::Null, |d| Value::from(micros(d))),
            ),
            F::TraceId => ("trace_id", text(decision.trace_id.as_deref())),
            // Up to 16 KiB of the client's: clipped, so that a line of the log (and of the
            // writer's queue of 65,536) stays small whatever the client sends.
            F::UserAgent => (
                "user_agent",
                text(
                    req.header_str(crate::http::name::USER_AGENT)
                        .map(|ua| clip(ua, MAX_USER_AGENT)),
                ),
            ),
        };
        line.0.push((name, value));
    }
    if anyones(&decision, obs, status) {
        ctx.shared.access.load().send_anonymous_refusal(line);
    } else {
        ctx.shared.access.load().send(line);
    }
}

/// Whether a request is anyone's to send as fast as the network takes it, so that its lines in
/// the access and audit logs are bounded: an error the gateway answered itself (no upstream
/// answered) to a caller no credential named (the default tenant's included: an attacker's
/// review flooded 405s and 400s as `public`, each a line).
fn anyones(decision: &super::proxy::Decision, obs: &Obs<'_>, status: u16) -> bool {
    !decision.vouched && obs.upstream_wait.get().is_none() && (status == 0 || status >= 400)
}

/// Bytes of a client's `User-Agent` and path written to the access log.
const MAX_USER_AGENT: usize = 256;
/// The most of a refusal's reason an audit line carries when it may hold what a client sent.
const MAX_REASON: usize = 256;
const MAX_PATH: usize = 1024;

/// `s` cut to at most `max` bytes, at a character's boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// record: breakers judged by the outcome, the audit record, the telemetry observation.
fn record(
    req: &Request,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
    obs: &Obs<'_>,
    started: Instant,
    status: u16,
) {
    let config = &snapshot.config;
    let passed = obs.breakers.borrow_mut().take();
    if !passed.is_empty() {
        let now = ctx.shared.limits.now();
        // When the call came, on the breakers' clock.
        let since =
            now.saturating_sub(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        // Only what went to the upstream is judged: a call answered here (a batch refused for
        // holding a task, a task not the caller's, a request that cannot be sent) says nothing
        // of the upstream, nor does one whose client left before its answer. Judged, the first
        // closed a half-open breaker shared by every tenant, or kept a failing one closed.
        // Every way to an upstream notes its wait (`Obs::waited`), failures included.
        let outcome = if obs.client_left.get() || obs.upstream_wait.get().is_none() {
            Outcome::Refused
        } else {
            obs.outcome.get().unwrap_or(Outcome::Refused)
        };
        for (name, up, tool_level, pass) in passed {
            // A tool fails with an error or `isError`; an upstream only when it fails.
            let ok = match outcome {
                Outcome::Refused | Outcome::ClientLeft => {
                    ctx.shared.breakers.release(&name, pass);
                    continue;
                }
                // The call's own failure (a 401/403 it drew included: a probe drawing one
                // closed a half-open breaker): nothing of the upstream's health either way.
                _ if !tool_level && obs.blame.get() == Blame::Call => {
                    ctx.shared.breakers.release(&name, pass);
                    continue;
                }
                Outcome::Ok => true,
                Outcome::ToolError | Outcome::RpcError => !tool_level,
                // A failure a request can draw is the call's, at the upstream's shared breaker
                // (see `Blame`): one tenant's calls of a tool slow enough to time out, or of
                // its own session ended meanwhile (a 500), opened it for every tenant however
                // well the upstream answered them. A timeout is the upstream's only if it
                // answered no other call while this one waited (a hung upstream answers none).
                Outcome::UpstreamFailure
                    if !tool_level
                        && obs.blame.get() == Blame::Unclear
                        && ctx.shared.breakers.answered_since(&name, since) =>
                {
                    ctx.shared.breakers.release(&name, pass);
                    continue;
                }
                Outcome::UpstreamFailure | Outcome::UpstreamDenied => false,
            };
            if let Some(c) = &config.upstreams[up].breaker {
                ctx.shared.breakers.record(&name, now, c, pass, ok);
            }
        }
    }
    let audit = ctx.shared.audit.load();
    if !config.telemetry.enabled && !audit.enabled() {
        return;
    }
    let decision = obs.decision.borrow();
    let tenant = decision.tenant.as_deref().unwrap_or_else(|| {
        let tenant_id = snapshot.classifier.tenant_of(peer.ip());
        config
            .tenants
            .iter()
            .find(|t| t.id == tenant_id)
            .map_or("default", |t| t.name.as_str())
    });
    let route = config
        .routes
        .iter()
        .find(|r| r.path == req.path())
        .map_or("unmatched", |r| r.path.as_str());
    let tool = obs.tool.borrow();
    let outcome = obs.recorded_outcome();
    if audit.enabled() && route != "unmatched" && (req.method == "POST" || decision.refused) {
        let send = if anyones(&decision, obs, status) {
            audit::AuditLog::send_anonymous_refusal
        } else {
            audit::AuditLog::send
        };
        send(
            &audit,
            audit::Record {
                ts: audit::now(),
                // Refused by policy, or by the gateway before policy had its say (a body that
                // does not parse, an unknown protocol version, a bad `traceparent`): those were
                // written "allowed" (a review).
                decision: if decision.refused || outcome == Outcome::Refused {
                    "refused"
                } else {
                    "allowed"
                },
                rule: decision.rule.clone(),
                reason: decision.reason.clone(),
                tenant: tenant.to_owned(),
                agent: decision.agent.clone(),
                run: decision.run.clone(),
                source: peer.ip().to_string(),
                route: route.to_owned(),
                method: obs.method.get().to_owned(),
                tool: tool.clone(),
                upstream: obs.upstream.get().map(str::to_owned),
                outcome: outcome.label(),
                batch: obs.batch.take(),
                budget_left: decision.budget_left.clone(),
                latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                trace_id: decision.trace_id.clone(),
            },
        );
    }
    if !config.telemetry.enabled {
        return;
    }
    ctx.recorder.borrow_mut().record(&Observation {
        route,
        upstream: obs.upstream.get(),
        method: obs.method.get(),
        tool: tool.as_deref(),
        tenant,
        // Nothing else set it: the gateway answered with an error of its own.
        outcome,
        total: started.elapsed(),
        upstream_wait: obs.upstream_wait.get(),
        trace_id: decision.trace_id.as_deref(),
    });
}

/// The request's span, kept when the head decision sampled it or, with
/// `always_sample_errors`, when it was refused or failed (decided here, at its end). Pushed to
/// this worker's own queue; the control thread exports it.
fn record_span(
    req: &Request,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
    obs: &Obs<'_>,
    started: Instant,
    wall: SystemTime,
) {
    let config = &snapshot.config;
    let Some(otlp) = &config.telemetry.otlp else {
        return;
    };
    let outcome = obs.recorded_outcome();
    // A request stopped before `propagate` still has a span, under a valid header parent.
    let span = obs.span.get().unwrap_or_else(|| {
        let parent = req
            .header_str(crate::http::name::TRACEPARENT)
            .filter(|tp| trace_id(tp).is_some());
        crate::otlp::SpanCtx::start(parent, otlp.sample_ratio)
    });
    let keep = span.sampled || (otlp.always_sample_errors && outcome != Outcome::Ok);
    if !keep {
        return;
    }
    let total = started.elapsed();
    let upstream = obs.upstream_wait.get();
    let decision = obs.decision.borrow();
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let start_unix_ns = crate::otlp::unix_ns(wall);
    let route = config
        .routes
        .iter()
        .find(|r| r.path == req.path())
        .map_or("unmatched", |r| r.path.as_str());
    let tenant = decision.tenant.clone().unwrap_or_else(|| {
        let tenant_id = snapshot.classifier.tenant_of(peer.ip());
        config
            .tenants
            .iter()
            .find(|t| t.id == tenant_id)
            .map_or_else(|| "default".to_owned(), |t| t.name.clone())
    });
    ctx.shared.spans.push(
        ctx.worker,
        crate::otlp::SpanRecord {
            ctx: span,
            start_unix_ns,
            end_unix_ns: start_unix_ns.saturating_add(micros(total).saturating_mul(1000)),
            http_method: http::method_label(&req.method),
            route: route.to_owned(),
            method: obs.method.get(),
            tool: obs.tool.borrow().clone(),
            tenant,
            agent: decision.agent.clone(),
            run: decision.run.clone(),
            upstream: obs.upstream.get().map(str::to_owned),
            outcome: outcome.label(),
            rule: decision.rule.clone().filter(|_| decision.refused),
            gateway_us: micros(total.saturating_sub(upstream.unwrap_or_default())),
            upstream_us: upstream.map(micros),
            client: peer.ip().to_string(),
        },
    );
}
