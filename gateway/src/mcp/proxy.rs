//! Passthrough forwarding on a worker: each request on a client connection is validated, routed
//! and relayed to its upstream over a per-worker keep-alive pool; responses stream back as they
//! arrive (SSE event by event), with backpressure: nothing more is read from the upstream until
//! the client has taken what was read. An upstream that fails answers exactly the affected
//! request with a JSON-RPC error.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use monoio::net::TcpStream;
use tokio::sync::watch;

use super::{Id, Kind, Parsed, Parser, RpcError, error, version};
use crate::{
    config::{Config, Target, Upstream},
    http::{self, BodyKind, ChunkedDecoder, HttpError, Io, Limits, Request},
    policy::{self, Ask, Refusal, TenantPolicy, audit},
    runtime::{Shared, Snapshot},
    stats::{self, Observation, Outcome, Recorder},
};

/// What the request path learns about one request, for telemetry.
#[derive(Default)]
pub(super) struct Obs<'a> {
    pub outcome: Cell<Option<Outcome>>,
    pub upstream: Cell<Option<&'a str>>,
    pub upstream_wait: Cell<Option<Duration>>,
    pub method: Cell<&'static str>,
    pub tool: RefCell<Option<String>>,
    pub decision: RefCell<Decision>,
    /// Breakers this request passed: (name, upstream index, tool level, how).
    pub breakers: RefCell<Vec<(String, usize, bool, policy::breaker::Pass)>>,
}

/// Who called and what policy decided, for telemetry and the audit log.
#[derive(Default)]
pub(super) struct Decision {
    pub tenant: Option<String>,
    pub agent: Option<String>,
    pub run: Option<String>,
    pub refused: bool,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub budget_left: Option<String>,
    pub trace_id: Option<String>,
}

impl Obs<'_> {
    /// The first outcome set stands.
    pub fn set(&self, o: Outcome) {
        if self.outcome.get().is_none() {
            self.outcome.set(Some(o));
        }
    }

    pub fn waited(&self, d: Duration) {
        self.upstream_wait
            .set(Some(self.upstream_wait.get().unwrap_or_default() + d));
    }
}

/// Largest answer kept to tell a result from an error and a tool's failure.
const CLASSIFY_MAX: usize = 64 * 1024;

/// What an upstream's JSON-RPC answer says: a result, a tool that failed, or an error.
pub fn classify(message: &[u8]) -> Outcome {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        result: Option<ToolResult>,
    }
    #[derive(serde::Deserialize)]
    struct ToolResult {
        #[serde(rename = "isError", default)]
        is_error: bool,
    }
    match serde_json::from_slice::<Answer>(message) {
        Ok(Answer { error: Some(_), .. }) => Outcome::RpcError,
        Ok(Answer {
            result: Some(ToolResult { is_error: true }),
            ..
        }) => Outcome::ToolError,
        _ => Outcome::Ok,
    }
}

/// The data of the last complete event in an SSE buffer.
fn last_event_data(buf: &[u8]) -> Vec<u8> {
    let trimmed = buf.trim_ascii_end();
    let start = trimmed
        .windows(2)
        .rposition(|w| w == b"\n\n")
        .map_or(0, |i| i + 2);
    let mut data = Vec::new();
    for line in trimmed[start..].split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    data
}

/// A worker's data-plane state: its parser and its idle upstream connections. Never shared.
pub struct WorkerCtx {
    pub shared: Arc<Shared>,
    /// This worker's index (its row in the connection table).
    pub worker: usize,
    pub(super) parser: RefCell<Parser>,
    /// Idle upstream connections by address, the most recently used on top.
    pool: RefCell<HashMap<SocketAddr, Vec<Io>>>,
    /// This worker's telemetry, shipped to the control thread once a second.
    pub recorder: RefCell<Recorder>,
}

impl WorkerCtx {
    pub fn new(shared: Arc<Shared>, worker: usize) -> Rc<Self> {
        let max_tools = shared.snapshot.load().config.telemetry.max_tools;
        Rc::new(Self {
            shared,
            worker,
            parser: RefCell::default(),
            pool: RefCell::default(),
            recorder: RefCell::new(Recorder::new(worker, max_tools)),
        })
    }

    /// An idle connection to `addr`, if one is still open and silent. Each is checked first (a
    /// non-blocking peek): one the upstream closed (servers close idle keep-alive connections
    /// on their own schedule: uvicorn after 5 s, Node after 5 s) or sent anything on since its
    /// last answer is dropped. Bytes sent after an answer belong to no request: read as the
    /// next answer they would reach another client.
    pub(super) fn checkout(&self, addr: SocketAddr) -> Option<Io> {
        let mut pool = self.pool.borrow_mut();
        let idle = pool.get_mut(&addr)?;
        while let Some(mut io) = idle.pop() {
            if io.idle_and_open() {
                return Some(io);
            }
        }
        None
    }

    /// Returns a connection whose exchange is complete to the pool; one with bytes read past
    /// its answer, or with an abandoned read or write, is closed instead.
    pub(super) fn checkin(&self, addr: SocketAddr, io: Io, max_idle: usize) {
        if !io.intact() {
            return;
        }
        let mut pool = self.pool.borrow_mut();
        let idle = pool.entry(addr).or_default();
        if idle.len() < max_idle {
            idle.push(io);
        }
    }
}

fn limits(c: &Config) -> Limits {
    Limits {
        max_head: c.http.max_header_bytes,
        max_body: c.http.max_body_bytes,
        request_timeout: c.http.request_timeout,
        idle_timeout: c.http.idle_timeout,
    }
}

/// Serves one client connection until it closes, fails, or the worker shuts down.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: usize,
    ctx: Rc<WorkerCtx>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut io = Io::new(stream, Duration::ZERO);
    // `listener` is the index of its entry in `Config::listeners`. Behind a load balancer the
    // PROXY protocol header names the client, which is the peer from here on.
    let Some((peer, _counted)) =
        http::proxy_protocol::admit(&mut io, peer, listener, &ctx.shared, ctx.worker).await
    else {
        return;
    };
    loop {
        let snapshot = ctx.shared.snapshot.load_full();
        let limits = limits(&snapshot.config);
        // A client must take each write of an answer within the request timeout.
        io.set_send_timeout(limits.request_timeout);
        // Idle between requests: a shutdown closes the connection here, never mid-request.
        if io.pending().is_empty() {
            let first = monoio::select! {
                r = io.fill(limits.idle_timeout) => r,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if !matches!(first, Ok(n) if n > 0) {
                return;
            }
        }
        // A panic while reading or answering a request is contained here, where the
        // connection outlives it: the client is answered 500 (best effort: the answer may have
        // begun) and the connection closed; the worker goes on.
        let exchange =
            std::panic::AssertUnwindSafe(serve_one(&mut io, &limits, peer, &snapshot, &ctx));
        match futures_util::FutureExt::catch_unwind(exchange).await {
            Ok(true) if !*shutdown.borrow() => {}
            Ok(_) => return,
            Err(_) => {
                ctx.shared
                    .panics
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(%peer, "a request panicked; answered 500 and closed the connection");
                let err = RpcError::new(error::INTERNAL_ERROR, "internal error", 500);
                let _ = io.write_all(json_response(500, &err, false)).await;
                return;
            }
        }
    }
}

/// Reads one request and answers it; returns whether the connection can carry another.
async fn serve_one(
    io: &mut Io,
    limits: &Limits,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
) -> bool {
    let req = match http::read_request(io, limits).await {
        Ok(req) => req,
        Err(HttpError::Closed) => return false,
        Err(e) => {
            let err = RpcError::invalid_request(e.to_string());
            let _ = io.write_all(json_response(e.status(), &err, false)).await;
            return false;
        }
    };
    handle(io, &req, peer, snapshot, ctx).await && req.keep_alive
}

pub(super) fn json_response(status: u16, err: &RpcError, keep_alive: bool) -> Vec<u8> {
    http::response(
        status,
        &[("content-type", "application/json")],
        &err.body(),
        keep_alive,
    )
}

/// Answers one request and records it; returns whether the client connection can carry
/// another.
async fn handle(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    snapshot: &Snapshot,
    ctx: &WorkerCtx,
) -> bool {
    crate::runtime::inject_fault(req);
    let config = &snapshot.config;
    let started = Instant::now();
    let obs = Obs::default();
    obs.method.set(stats::method_label(&req.method));
    let keep = handle_inner(io, req, peer, snapshot, ctx, &obs).await;
    let passed = std::mem::take(&mut *obs.breakers.borrow_mut());
    if !passed.is_empty() {
        let now = ctx.shared.limits.now();
        let outcome = obs.outcome.get().unwrap_or(Outcome::Refused);
        for (name, up, tool_level, pass) in passed {
            // A tool fails with an error or `isError`; an upstream only when it fails.
            let ok = match outcome {
                Outcome::Refused => {
                    ctx.shared.breakers.release(&name, pass);
                    continue;
                }
                Outcome::Ok => true,
                Outcome::ToolError | Outcome::RpcError => !tool_level,
                Outcome::UpstreamFailure => false,
            };
            if let Some(c) = &config.upstreams[up].breaker {
                ctx.shared.breakers.record(&name, now, c, pass, ok);
            }
        }
    }
    let audit = &ctx.shared.audit;
    if !config.telemetry.enabled && !audit.enabled() {
        return keep;
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
    let outcome = obs.outcome.get().unwrap_or(Outcome::Refused);
    if audit.enabled() && route != "unmatched" && (req.method == "POST" || decision.refused) {
        audit.send(audit::Record {
            ts: audit::now(),
            decision: if decision.refused {
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
            budget_left: decision.budget_left.clone(),
            latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            trace_id: decision.trace_id.clone(),
        });
    }
    if !config.telemetry.enabled {
        return keep;
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
    });
    keep
}

async fn handle_inner<'a, 'c>(
    io: &mut Io,
    req: &'a Request,
    peer: SocketAddr,
    snapshot: &'c Snapshot,
    ctx: &'a WorkerCtx,
    obs: &'a Obs<'c>,
) -> bool {
    let config = &snapshot.config;
    let policy = &snapshot.policy;
    let reply = |status: u16, err: RpcError| json_response(status, &err, req.keep_alive);
    if let Some(rest) = req
        .path()
        .strip_prefix("/.well-known/oauth-protected-resource")
    {
        return protected_resource_metadata(io, req, rest, config, policy).await;
    }
    let Some(route) = config.routes.iter().find(|r| r.path == req.path()) else {
        let paths: Vec<&str> = config.routes.iter().map(|r| r.path.as_str()).collect();
        let err = RpcError::new(
            error::METHOD_NOT_FOUND,
            format!("no MCP endpoint at {}", req.path()),
            404,
        )
        .with_data(serde_json::json!({ "endpoints": paths }));
        return io.write_all(reply(404, err)).await.is_ok();
    };
    if let Some(origin) = req.header_str("origin")
        && !config.http.allowed_origins.iter().any(|o| o == origin)
    {
        let err = RpcError::invalid_request(format!("origin `{origin}` is not allowed"));
        return io.write_all(reply(403, err)).await.is_ok();
    }
    let protocol = req.header_str("mcp-protocol-version");
    if let Some(v) = protocol
        && !version::is_supported(v)
    {
        let err = RpcError::new(
            error::UNSUPPORTED_VERSION,
            format!("unsupported MCP-Protocol-Version `{v}`"),
            400,
        )
        .with_data(serde_json::json!({ "supported": version::SUPPORTED }));
        return io.write_all(reply(400, err)).await.is_ok();
    }
    let header_trace = match req.header("traceparent") {
        None => None,
        Some(v) => match std::str::from_utf8(v).ok().and_then(trace_id) {
            Some(t) => Some(t.to_owned()),
            None => {
                let err = invalid_traceparent("the traceparent header");
                return io.write_all(reply(400, err)).await.is_ok();
            }
        },
    };
    let who = match policy.authenticate(
        route,
        &req.headers,
        snapshot.classifier.tenant_of(peer.ip()),
    ) {
        Ok(who) => who,
        Err(r) => return refuse(io, req, &r, None, obs, ctx, peer, config).await,
    };
    let tenant = &policy.tenants[who.tenant];
    {
        let mut d = obs.decision.borrow_mut();
        d.tenant = Some(tenant.name.clone());
        d.agent.clone_from(&who.agent);
        d.run.clone_from(&who.run);
        d.trace_id = header_trace;
    }
    let mut request_id = None;
    let mut message = None;
    let mut batch = Vec::new();
    match req.method.as_str() {
        "POST" => {
            let json = req.header_str("content-type").is_some_and(|ct| {
                ct.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
            if !json {
                let err = RpcError::invalid_request("Content-Type must be application/json");
                return io.write_all(reply(415, err)).await.is_ok();
            }
            let parsed = ctx.parser.borrow_mut().parse(&req.body);
            match parsed {
                Err(err) => return io.write_all(reply(err.http_status, err)).await.is_ok(),
                Ok(Parsed::Batch(_))
                    if !version::allows_batches(
                        protocol.unwrap_or(version::ASSUMED_WITHOUT_HEADER),
                    ) =>
                {
                    let err = RpcError::invalid_request(
                        "JSON-RPC batches are not allowed in this protocol version",
                    );
                    return io.write_all(reply(400, err)).await.is_ok();
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
                    if let Err(err) = super::headers::check(req, &m) {
                        return io.write_all(reply(err.http_status, err)).await.is_ok();
                    }
                    if m.kind == Kind::Request {
                        request_id = m.id.clone();
                    }
                    message = Some(m);
                }
                Ok(Parsed::Batch(_)) if matches!(route.target, Target::Federation(_)) => {
                    let err = RpcError::invalid_request(
                        "JSON-RPC batches are not supported on a federated route",
                    );
                    return io.write_all(reply(400, err)).await.is_ok();
                }
                Ok(Parsed::Batch(items)) => batch = items,
            }
        }
        // A GET opens a stream and a DELETE ends a session: neither carries a message. A body
        // on them would reach the upstream unchecked by policy, so it is refused.
        "GET" | "DELETE" if !req.body.is_empty() => {
            let err = RpcError::invalid_request(format!(
                "a {} carries no body: JSON-RPC messages are POSTed",
                req.method
            ));
            return io.write_all(reply(400, err)).await.is_ok();
        }
        "GET" | "DELETE" => {}
        _ => {
            let err =
                RpcError::invalid_request(format!("method {} is not allowed here", req.method));
            let body = err.body();
            let resp = http::response(
                405,
                &[
                    ("content-type", "application/json"),
                    ("allow", "GET, POST, DELETE"),
                ],
                &body,
                req.keep_alive,
            );
            return io.write_all(resp).await.is_ok();
        }
    }
    if let Some(m) = message.iter().chain(batch.iter()).find(|m| {
        m.meta_traceparent
            .as_deref()
            .is_some_and(|tp| trace_id(tp).is_none())
    }) {
        let id = if batch.is_empty() { m.id.clone() } else { None };
        let err = invalid_traceparent("params._meta.traceparent").with_id(id);
        return io.write_all(reply(400, err)).await.is_ok();
    }
    // Messages policy cannot decide are refused before anything is charged: a request sent
    // without an id (policy limits requests; the upstream would still run it), and a batched
    // `tools/list` for a tenant whose lists are filtered (only a lone one is).
    for m in message.iter().chain(batch.iter()) {
        let method = m.method.as_deref().unwrap_or_default();
        let why = if m.kind == Kind::Notification && !method.starts_with("notifications/") {
            format!("`{method}` is a request, not a notification: it needs an `id`")
        } else if !batch.is_empty()
            && m.kind == Kind::Request
            && method == "tools/list"
            && (tenant.filters() || policy.pinning)
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
        let id = if batch.is_empty() { m.id.clone() } else { None };
        return refuse(io, req, &r, id, obs, ctx, peer, config).await;
    }
    // A passthrough session is its opener's: one never seen opened, or another caller's, is
    // unknown (before anything is charged).
    if let Target::Passthrough(u) = &route.target
        && let Some(id) = req.header("mcp-session-id")
        && !ctx.shared.session_owners.may_use(
            session_key(ctx, &config.upstreams[*u], id),
            session_owner(ctx, obs),
            policy::limits::State::unix_s(),
        )
    {
        let err = RpcError::new(
            error::SESSION_NOT_FOUND,
            "unknown or expired session: initialize again",
            404,
        )
        .with_id(request_id);
        return io.write_all(reply(404, err)).await.is_ok();
    }
    // Policy: every message of the request is admitted, or the request is refused and what the
    // admitted ones charged is given back. The admissions hold their in-flight slots until the
    // answer has been relayed.
    let mut admissions: Vec<policy::Admission> = Vec::new();
    let give_back = |admissions: &mut Vec<policy::Admission>| {
        for a in admissions.iter_mut() {
            a.give_back(&ctx.shared.limits);
        }
    };
    for m in message.iter().chain(batch.iter()) {
        let tool = (m.method.as_deref() == Some("tools/call"))
            .then_some(m.name.as_deref())
            .flatten()
            .and_then(|name| match &route.target {
                Target::Passthrough(u) => Some((config.upstreams[*u].name.as_str(), name)),
                Target::Federation(members) => {
                    super::federation::owner(members, name).map(|(member, local)| {
                        (config.upstreams[member.upstream].name.as_str(), local)
                    })
                }
            });
        let ask = Ask {
            is_request: m.kind == Kind::Request,
            tool,
            arguments: m.arguments.as_ref(),
            message_bytes: req.body.len(),
            source: peer.ip(),
        };
        if policy.pinning
            && let Some((upstream, local)) = tool
            && !ctx.shared.pins.callable(upstream, local)
        {
            let r = Refusal::new(
                403,
                policy::code::PENDING_APPROVAL,
                format!("pins[{upstream}/{local}]"),
                format!(
                    "the definition of tool `{local}` at upstream `{upstream}` changed; an operator must approve it (POST /pins/approve)"
                ),
            );
            give_back(&mut admissions);
            return refuse(io, req, &r, m.id.clone(), obs, ctx, peer, config).await;
        }
        // Breakers first: a call refused for an open circuit charges no budget.
        if let Some((upstream, local)) = tool
            && let Some(up) = config.upstreams.iter().position(|u| u.name == upstream)
            && let Some(c) = &config.upstreams[up].breaker
        {
            let now = ctx.shared.limits.now();
            for (name, tool_level) in policy::breaker::names(upstream, local, &tenant.name) {
                match ctx.shared.breakers.allow(&name, now, c) {
                    Ok(pass) => obs.breakers.borrow_mut().push((name, up, tool_level, pass)),
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
                        give_back(&mut admissions);
                        return refuse(io, req, &r, m.id.clone(), obs, ctx, peer, config).await;
                    }
                }
            }
        }
        match policy.admit(&ctx.shared.limits, &who, &ask) {
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
                give_back(&mut admissions);
                let id = if batch.is_empty() { m.id.clone() } else { None };
                return refuse(io, req, &r, id, obs, ctx, peer, config).await;
            }
        }
    }
    let keep = match &route.target {
        Target::Passthrough(u) => {
            let up = &config.upstreams[*u];
            if (tenant.filters() || policy.pinning)
                && let Some(m) = &message
                && m.kind == Kind::Request
                && m.method.as_deref() == Some("tools/list")
            {
                return filtered_tools_list(
                    io,
                    req,
                    peer,
                    up,
                    ctx,
                    obs,
                    tenant,
                    policy,
                    m.id.clone(),
                )
                .await;
            }
            // W3C trace context sent only inside the message also reaches the upstream as the
            // header.
            let traceparent = message
                .as_ref()
                .and_then(|m| m.meta_traceparent.as_deref())
                .filter(|tp| req.header("traceparent").is_none() && trace_id(tp).is_some());
            let extra: Vec<(&str, Option<&str>)> = traceparent
                .map(|tp| ("traceparent", Some(tp)))
                .into_iter()
                .collect();
            match upstream_request(req, peer, up, &req.body, &extra) {
                Ok(bytes) => forward(io, req, bytes, up, request_id, ctx, None, obs).await,
                Err(e) => {
                    let err = RpcError::from(e).with_id(request_id);
                    io.write_all(reply(400, err)).await.is_ok()
                }
            }
        }
        Target::Federation(members) => {
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
            fed.handle(io, message).await
        }
    };
    drop(admissions);
    keep
}

/// Whether a listed tool is shown to the tenant: allowed by its rules and, with pinning, its
/// definition is the approved one.
pub(super) fn visible(
    ctx: &WorkerCtx,
    policy: &policy::Policy,
    tenant: &TenantPolicy,
    upstream: &str,
    tool: &serde_json::Value,
) -> bool {
    let Some(name) = tool.get("name").and_then(serde_json::Value::as_str) else {
        return true;
    };
    let pinned = !policy.pinning
        || ctx
            .shared
            .pins
            .observe(upstream, tool, policy.configured_pin(upstream, name));
    pinned && tenant.allows(upstream, name)
}

/// Who owns the passthrough sessions a request opens or uses: a keyed hash of its tenant and
/// agent.
fn session_owner(ctx: &WorkerCtx, obs: &Obs<'_>) -> u64 {
    let d = obs.decision.borrow();
    ctx.shared
        .limits
        .key(("session-owner", d.tenant.as_deref(), d.agent.as_deref()))
}

/// A keyed hash of an upstream's session id.
fn session_key(ctx: &WorkerCtx, up: &Upstream, id: &[u8]) -> u64 {
    ctx.shared.limits.key(("session", up.name.as_str(), id))
}

/// Remembers the caller as the owner of the session a passthrough upstream's answer opens.
fn bind_session(ctx: &WorkerCtx, up: &Upstream, head: &ResponseHead, obs: &Obs<'_>) {
    if let Some(id) = http::header(&head.headers, "mcp-session-id") {
        ctx.shared.session_owners.bind(
            session_key(ctx, up, id),
            session_owner(ctx, obs),
            policy::limits::State::unix_s(),
        );
    }
}

/// Gives back, unjudged, the breaker probes a request took before it was refused.
fn give_back_probes(obs: &Obs<'_>, ctx: &WorkerCtx) {
    for (name, _, _, pass) in std::mem::take(&mut *obs.breakers.borrow_mut()) {
        ctx.shared.breakers.release(&name, pass);
    }
}

/// The trace id of a W3C `traceparent`, if the whole value is exactly
/// `00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>` with neither id all zeros.
/// Nothing is trimmed and nothing may follow: the value is forwarded as it is, so what is
/// checked here is all there is.
fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (parts.next().is_none()
        && version == "00"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0'))
    .then_some(trace)
}

/// A request whose trace context is not valid: refused, so that the trace the gateway records
/// is the one the upstream receives.
fn invalid_traceparent(where_: &str) -> RpcError {
    RpcError::invalid_request(format!(
        "{where_} is not a valid W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>, lowercase)"
    ))
}

/// Answers a refusal: the rule's status and JSON-RPC error, with `Retry-After` and
/// `WWW-Authenticate` where they apply.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the answer"
)]
async fn refuse(
    io: &mut Io,
    req: &Request,
    r: &Refusal,
    id: Option<Id>,
    obs: &Obs<'_>,
    ctx: &WorkerCtx,
    peer: SocketAddr,
    config: &Config,
) -> bool {
    obs.set(Outcome::Refused);
    {
        let counts = ctx.shared.refusals.pin();
        match counts.get(r.rule.as_str()) {
            Some(n) => n.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            None => counts
                .get_or_insert_with(r.rule.clone(), std::sync::atomic::AtomicU64::default)
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
    }
    // Refusals the client earned (not an open breaker) count towards a kernel ban.
    if r.code != policy::code::CIRCUIT_OPEN
        && let Some(b) = &config.auto_ban
    {
        let limits = &ctx.shared.limits;
        let key = limits.key(("refusals", peer.ip()));
        if limits
            .charge(
                key,
                policy::limits::State::unix_s(),
                b.window_s,
                1,
                u64::from(b.max_refusals),
            )
            .is_err()
        {
            let _ = ctx
                .shared
                .ban_tx
                .send((peer.ip(), Duration::from_secs(b.ban_s)));
        }
    }
    {
        let mut d = obs.decision.borrow_mut();
        d.refused = true;
        d.rule = Some(r.rule.clone());
        d.reason = Some(r.message.clone());
        if let Some(b) = r.budget.as_ref().and_then(serde_json::Value::as_object) {
            let parts: Vec<String> = b.iter().map(|(k, v)| format!("{k}={v}")).collect();
            d.budget_left = Some(parts.join("; "));
        }
    }
    let err = RpcError::new(r.code, r.message.clone(), r.status)
        .with_data(r.data())
        .with_id(id);
    let retry = r.retry_after.map(|d| {
        (d.as_secs() + u64::from(d.subsec_nanos() > 0))
            .max(1)
            .to_string()
    });
    let mut headers = vec![("content-type", "application/json")];
    if let Some(retry) = &retry {
        headers.push(("retry-after", retry));
    }
    if let Some(w) = &r.www_authenticate {
        headers.push(("www-authenticate", w));
    }
    io.write_all(http::response(
        r.status,
        &headers,
        &err.body(),
        req.keep_alive,
    ))
    .await
    .is_ok()
}

/// `GET /.well-known/oauth-protected-resource[/route path]`: the RFC 9728 document.
async fn protected_resource_metadata(
    io: &mut Io,
    req: &Request,
    rest: &str,
    config: &Config,
    policy: &policy::Policy,
) -> bool {
    if req.method != "GET" {
        let err = RpcError::invalid_request(format!("method {} is not allowed here", req.method));
        let resp = http::response(
            405,
            &[("content-type", "application/json"), ("allow", "GET")],
            &err.body(),
            req.keep_alive,
        );
        return io.write_all(resp).await.is_ok();
    }
    if !rest.is_empty() && !config.routes.iter().any(|r| r.path == rest) {
        let err = RpcError::new(
            error::METHOD_NOT_FOUND,
            format!("no MCP endpoint at {rest}"),
            404,
        );
        return io
            .write_all(json_response(404, &err, req.keep_alive))
            .await
            .is_ok();
    }
    let doc = policy.metadata_document(req.header_str("host"), rest);
    let body = super::json_bytes(&doc);
    io.write_all(http::response(
        200,
        &[
            ("content-type", "application/json"),
            ("cache-control", "max-age=3600"),
        ],
        &body,
        req.keep_alive,
    ))
    .await
    .is_ok()
}

/// Passthrough `tools/list` for a tenant with hidden tools: the upstream's answer is read whole
/// and the tools the tenant may not call are left out.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
async fn filtered_tools_list<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    up: &'c Upstream,
    ctx: &WorkerCtx,
    obs: &Obs<'c>,
    tenant: &TenantPolicy,
    policy: &policy::Policy,
    id: Option<Id>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    let request = match upstream_request(req, peer, up, &req.body, &[]) {
        Ok(r) => r,
        Err(e) => {
            let err = RpcError::from(e).with_id(id);
            return io
                .write_all(json_response(400, &err, req.keep_alive))
                .await
                .is_ok();
        }
    };
    let sent = Instant::now();
    let answer = call(ctx, up, request, 16 * 1024 * 1024).await;
    obs.waited(sent.elapsed());
    let (head, body) = match answer {
        Ok(a) => a,
        Err(f) => {
            obs.set(Outcome::UpstreamFailure);
            return fail(io, req, up, id, f).await;
        }
    };
    bind_session(ctx, up, &head, obs);
    let mut message = match super::federation::response_message(&head, &body, id.as_ref()) {
        Ok(m) => m,
        Err(why) => {
            obs.set(Outcome::UpstreamFailure);
            return fail(io, req, up, id, UpstreamFailure::Bad(why)).await;
        }
    };
    if let Some(result) = message.get_mut("result") {
        // A result the gateway cannot filter is not passed on unfiltered: the upstream's
        // malformed answer becomes an error for the client.
        let Some(tools) = result
            .get_mut("tools")
            .and_then(serde_json::Value::as_array_mut)
        else {
            obs.set(Outcome::UpstreamFailure);
            let why = "the answer to tools/list has no `result.tools` array".to_owned();
            return fail(io, req, up, id, UpstreamFailure::Bad(why)).await;
        };
        tools.retain(|t| visible(ctx, policy, tenant, &up.name, t));
    }
    obs.set(if message.get("error").is_some() {
        Outcome::RpcError
    } else {
        Outcome::Ok
    });
    let session = http::header(&head.headers, "mcp-session-id")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned);
    // Relayed to the client: an upstream is not trusted to produce a clean head.
    if session
        .as_deref()
        .is_some_and(|s| !http::is_clean_value(s.as_bytes()))
    {
        obs.set(Outcome::UpstreamFailure);
        let f = UpstreamFailure::Bad("a control character in its Mcp-Session-Id".into());
        return fail(io, req, up, id, f).await;
    }
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = &session {
        headers.push(("mcp-session-id", s));
    }
    let body = super::json_bytes(&message);
    io.write_all(http::response(head.status, &headers, &body, req.keep_alive))
        .await
        .is_ok()
}

/// Hop-by-hop headers (also those named by any `Connection` line of `headers`) and those the
/// gateway sets itself are not forwarded.
fn is_hop_by_hop(name: &str, headers: &[(String, Vec<u8>)]) -> bool {
    const DROP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "expect",
        // Never pass the client's credentials upstream: the upstream gets its own.
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "cookie",
    ];
    DROP.iter().any(|d| name.eq_ignore_ascii_case(d)) || http::has_connection_option(headers, name)
}

/// The request for `up`: the client's method, query and end-to-end headers, with `body`, and the
/// headers named in `replace` dropped and, where a value is given, set to it. Values taken from
/// a message body (a trace context, a tool name) may hold anything: every field is written by
/// [`http::push_field`], which refuses a control character, and then nothing is sent.
pub(super) fn upstream_request(
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    body: &[u8],
    replace: &[(&str, Option<&str>)],
) -> Result<Vec<u8>, http::UnsafeField> {
    let query = req.target.find('?').map_or("", |i| &req.target[i..]);
    let mut out = Vec::with_capacity(512 + body.len());
    http::push_request_line(&mut out, &req.method, &format!("{}{query}", up.path))?;
    http::push_field(&mut out, "host", up.authority.as_bytes())?;
    for (name, value) in &req.headers {
        if !is_hop_by_hop(name, &req.headers)
            && !name.eq_ignore_ascii_case("x-forwarded-for")
            && !replace.iter().any(|(r, _)| name.eq_ignore_ascii_case(r))
        {
            http::push_field(&mut out, name, value)?;
        }
    }
    let forwarded_for = match req.header_str("x-forwarded-for") {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    http::push_field(&mut out, "x-forwarded-for", forwarded_for.as_bytes())?;
    for (name, value) in replace {
        if let Some(value) = value {
            http::push_field(&mut out, name, value.as_bytes())?;
        }
    }
    if let Some(auth) = &up.authorization {
        http::push_field(&mut out, "authorization", auth.as_bytes())?;
    }
    if req.method == "POST" || !body.is_empty() {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    Ok(out)
}

pub(super) struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ResponseHead {
    pub fn is_sse(&self) -> bool {
        http::header(&self.headers, "content-type").is_some_and(|ct| {
            ct.trim_ascii()
                .to_ascii_lowercase()
                .starts_with(b"text/event-stream")
        })
    }

    fn closes(&self) -> bool {
        http::has_connection_option(&self.headers, "close")
    }
}

pub(super) enum UpstreamFailure {
    Connect(String),
    Timeout,
    /// The request could not be written: certainly not processed, so on a reused connection
    /// worth one retry.
    Unsent(String),
    /// The request was written, then the connection failed before any response byte: the
    /// upstream may have executed it, so it is retried only if it is idempotent.
    NoResponse(String),
    Bad(String),
    /// The client left while waiting (not an upstream failure).
    ClientGone,
}

async fn connect(up: &Upstream) -> Result<Io, UpstreamFailure> {
    match monoio::time::timeout(up.connect_timeout, TcpStream::connect(up.addr)).await {
        Err(_) => Err(UpstreamFailure::Connect(format!(
            "connecting to {} timed out",
            up.name
        ))),
        Ok(Err(e)) => Err(UpstreamFailure::Connect(format!(
            "connecting to {}: {e}",
            up.name
        ))),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(Io::new(s, up.response_timeout))
        }
    }
}

/// Sends the request and reads the response head.
async fn exchange(
    conn: &mut Io,
    request: Vec<u8>,
    up: &Upstream,
) -> Result<ResponseHead, UpstreamFailure> {
    conn.write_all(request)
        .await
        .map_err(|e| UpstreamFailure::Unsent(e.to_string()))?;
    let deadline = monoio::time::Instant::now() + up.response_timeout;
    let mut end = http::HeadEnd::default();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let status = if end.may_be_complete(conn.pending()) {
            resp.parse(conn.pending())
        } else {
            Ok(httparse::Status::Partial)
        };
        match status {
            Ok(httparse::Status::Complete(n)) => {
                let head = ResponseHead {
                    status: resp.code.unwrap_or(502),
                    headers: resp
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), h.value.to_vec()))
                        .collect(),
                };
                conn.consume(n);
                if (100..200).contains(&head.status) {
                    // 100 Continue and other interim responses; the next head starts here.
                    end = http::HeadEnd::default();
                    continue;
                }
                return Ok(head);
            }
            Ok(httparse::Status::Partial) if conn.pending().len() > 64 * 1024 => {
                return Err(UpstreamFailure::Bad("response head too large".into()));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(UpstreamFailure::Bad(format!("malformed response: {e}"))),
        }
        let had_bytes = !conn.pending().is_empty();
        match conn.fill_until(deadline).await {
            Ok(0) if had_bytes => {
                return Err(UpstreamFailure::Bad(
                    "closed inside the response head".into(),
                ));
            }
            Ok(0) => {
                return Err(UpstreamFailure::NoResponse(
                    "closed without a response".into(),
                ));
            }
            Ok(_) => {}
            Err(HttpError::Timeout) => return Err(UpstreamFailure::Timeout),
            Err(e) => return Err(UpstreamFailure::NoResponse(e.to_string())),
        }
    }
}

/// Sends `request` to `up` over a pooled or new connection (one retry when a pooled connection
/// turns out to be closed) and reads the response head. With a `client` to watch, gives up
/// (closing the upstream connection) if that client leaves first.
pub(super) async fn open(
    ctx: &WorkerCtx,
    up: &Upstream,
    mut request: Vec<u8>,
    client: Option<&Io>,
) -> Result<(Io, ResponseHead), UpstreamFailure> {
    let idempotent = idempotent(&request);
    let mut attempt = 0;
    loop {
        attempt += 1;
        // The retry goes over a new connection: the pool's others went idle as long ago.
        let pooled = if attempt == 1 {
            ctx.checkout(up.addr)
        } else {
            None
        };
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(c) => c,
            None => connect(up).await?,
        };
        // Keep a copy only when a retry is possible (a pooled connection, first attempt).
        let bytes = if reused && attempt == 1 {
            request.clone()
        } else {
            std::mem::take(&mut request)
        };
        let exchanged = match client {
            Some(client) => unless_client_leaves(client, exchange(&mut conn, bytes, up)).await,
            None => Some(exchange(&mut conn, bytes, up).await),
        };
        let Some(exchanged) = exchanged else {
            // Dropping `conn` closes it, which cancels there.
            return Err(UpstreamFailure::ClientGone);
        };
        match exchanged {
            Ok(head) => return Ok((conn, head)),
            // The upstream closed an idle pooled connection as we reused it: try a fresh one,
            // but only where a second execution cannot happen (RFC 9110 section 9.2.2).
            Err(UpstreamFailure::Unsent(_)) if reused && attempt == 1 => continue,
            Err(UpstreamFailure::NoResponse(_)) if reused && attempt == 1 && idempotent => {
                continue;
            }
            Err(f) => return Err(f),
        }
    }
}

/// Whether the request in `request` (a whole HTTP request) may be sent twice: an idempotent
/// method (RFC 9110 section 9.2.2). A POST (every JSON-RPC request: a `tools/call` above all)
/// is not.
fn idempotent(request: &[u8]) -> bool {
    [&b"GET "[..], b"HEAD ", b"OPTIONS ", b"DELETE "]
        .iter()
        .any(|m| request.starts_with(m))
}

/// Sends `request` to `up` and reads the whole response (at most `max` bytes of body); the
/// connection goes back to the pool.
pub(super) async fn call(
    ctx: &WorkerCtx,
    up: &Upstream,
    request: Vec<u8>,
    max: usize,
) -> Result<(ResponseHead, Vec<u8>), UpstreamFailure> {
    let (mut conn, head) = open(ctx, up, request, None).await?;
    let kind = if head.status == 204 || head.status == 304 {
        BodyKind::Length(0)
    } else {
        match http::framing(&head.headers, max) {
            Ok(Some(k)) => k,
            Ok(None) => BodyKind::UntilClose,
            Err(e) => return Err(UpstreamFailure::Bad(format!("unframeable response: {e}"))),
        }
    };
    let deadline = monoio::time::Instant::now() + up.response_timeout;
    let body = match conn.read_body(kind, max, deadline).await {
        Ok(b) => b,
        Err(HttpError::Timeout) => return Err(UpstreamFailure::Timeout),
        Err(e) => return Err(UpstreamFailure::Bad(e.to_string())),
    };
    if kind != BodyKind::UntilClose && !head.closes() {
        ctx.checkin(up.addr, conn, up.max_idle);
    }
    Ok((head, body))
}

/// Forwards `request` (already built for `up`) and relays the answer to the client. `member`
/// names the upstream inside a federation, whose events are rewritten on the way.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn forward<'c>(
    client: &mut Io,
    req: &Request,
    request: Vec<u8>,
    up: &'c Upstream,
    request_id: Option<Id>,
    ctx: &WorkerCtx,
    member: Option<&str>,
    obs: &Obs<'c>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    let sent = Instant::now();
    let opened = open(ctx, up, request, Some(client)).await;
    obs.waited(sent.elapsed());
    match opened {
        Ok((conn, head)) => {
            if member.is_none() {
                bind_session(ctx, up, &head, obs);
            }
            relay(client, conn, req, head, up, request_id, ctx, member, obs).await
        }
        // The client gave up waiting; the upstream connection was closed, which cancels there.
        Err(UpstreamFailure::ClientGone) => {
            obs.set(Outcome::UpstreamFailure);
            false
        }
        Err(f) => {
            obs.set(Outcome::UpstreamFailure);
            fail(client, req, up, request_id, f).await
        }
    }
}

/// How long a wait on the upstream runs before the gateway also watches the client: quick
/// answers cost no extra system call.
const WATCH_CLIENT_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// Runs `fut`; `None` if the client closes its connection first.
async fn unless_client_leaves<F: std::future::Future>(client: &Io, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    monoio::select! {
        r = &mut fut => return Some(r),
        _ = monoio::time::sleep(WATCH_CLIENT_AFTER) => {}
    }
    tracing::debug!("watching the client");
    monoio::select! {
        r = &mut fut => Some(r),
        _ = client.peer_gone() => None,
    }
}

pub(super) async fn fail(
    client: &mut Io,
    req: &Request,
    up: &Upstream,
    id: Option<Id>,
    f: UpstreamFailure,
) -> bool {
    let (status, detail) = match f {
        UpstreamFailure::Timeout => (
            504,
            format!("upstream `{}` did not answer in time", up.name),
        ),
        UpstreamFailure::Connect(d)
        | UpstreamFailure::Unsent(d)
        | UpstreamFailure::NoResponse(d)
        | UpstreamFailure::Bad(d) => (502, format!("upstream `{}` failed: {d}", up.name)),
        UpstreamFailure::ClientGone => return false,
    };
    tracing::warn!(upstream = %up.name, status, "{detail}");
    let err = RpcError::upstream(detail, status).with_id(id);
    client
        .write_all(json_response(status, &err, req.keep_alive))
        .await
        .is_ok()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Streams the upstream's response to the client. Returns whether the client connection can
/// carry another request. Inside a federation (`member`), the upstream's session header is
/// dropped (the client holds the gateway's) and each SSE event is rewritten.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site each; a struct would only rename them"
)]
async fn relay(
    client: &mut Io,
    mut conn: Io,
    req: &Request,
    head: ResponseHead,
    up: &Upstream,
    request_id: Option<Id>,
    ctx: &WorkerCtx,
    member: Option<&str>,
    obs: &Obs<'_>,
) -> bool {
    // Enough of the answer to classify it: the body of a JSON answer, the last events of SSE.
    let mut answer: Vec<u8> = Vec::new();
    if head.status >= 500 {
        obs.set(Outcome::UpstreamFailure);
    } else if head.status >= 400 {
        obs.set(Outcome::RpcError);
    }
    let bodiless = req.method == "HEAD" || head.status == 204 || head.status == 304;
    let kind = if bodiless {
        None
    } else {
        match http::framing(&head.headers, usize::MAX) {
            Ok(Some(k)) => Some(k),
            Ok(None) => Some(BodyKind::UntilClose),
            Err(e) => {
                let f = UpstreamFailure::Bad(format!("unframeable response: {e}"));
                return fail(client, req, up, request_id, f).await;
            }
        }
    };
    let sse = head.is_sse();
    let upstream_close = head.closes();
    // A body of unknown length goes chunked to HTTP/1.1 clients; to HTTP/1.0 clients it goes as
    // it is and ends when the gateway closes the connection.
    let chunked = req.accepts_chunked();
    let until_close = !chunked && matches!(kind, Some(BodyKind::Chunked | BodyKind::UntilClose));
    let keep_alive = req.keep_alive && !until_close;

    let mut out =
        format!("HTTP/1.1 {} {}\r\n", head.status, http::reason(head.status)).into_bytes();
    let mut written = Ok(());
    for (name, value) in &head.headers {
        let keep = !is_hop_by_hop(name, &head.headers)
            // An upstream's credentials are not the client's business.
            && !name.eq_ignore_ascii_case("authorization")
            // Set below for every event stream.
            && !(sse
                && (name.eq_ignore_ascii_case("x-accel-buffering")
                    || name.eq_ignore_ascii_case("cache-control")));
        if keep && !(member.is_some() && name.eq_ignore_ascii_case("mcp-session-id")) {
            // Relayed from the upstream, which is not trusted to produce a clean head.
            written = written.and_then(|()| http::push_field(&mut out, name, value));
        }
    }
    if let Some(left) = &obs.decision.borrow().budget_left {
        written = written.and_then(|()| {
            http::push_field(&mut out, "mcp-gateway-budget-remaining", left.as_bytes())
        });
    }
    if let Err(e) = written {
        let f = UpstreamFailure::Bad(format!("unsafe response head: {e}"));
        return fail(client, req, up, request_id, f).await;
    }
    match kind {
        None => out.extend_from_slice(b"content-length: 0\r\n"),
        Some(BodyKind::Length(n)) => {
            out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes())
        }
        Some(_) if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Some(_) => {}
    }
    if sse {
        out.extend_from_slice(b"x-accel-buffering: no\r\ncache-control: no-cache\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // A fixed-length body that has already arrived goes out with the head in one write.
    let mut remaining = match kind {
        Some(BodyKind::Length(n)) => n,
        _ => usize::MAX,
    };
    let classify_answer = request_id.is_some();
    if let Some(BodyKind::Length(_)) = kind {
        let n = remaining.min(conn.pending().len());
        out.extend_from_slice(&conn.pending()[..n]);
        if classify_answer && n <= CLASSIFY_MAX {
            answer.extend_from_slice(&conn.pending()[..n]);
        }
        conn.consume(n);
        remaining -= n;
    }
    if client.write_all(out).await.is_err() {
        return false;
    }
    let Some(kind) = kind else {
        obs.set(Outcome::Ok);
        if !upstream_close {
            ctx.checkin(up.addr, conn, up.max_idle);
        }
        return keep_alive;
    };

    let mut decoder = ChunkedDecoder::default();
    // One event is held at most as large as a request body may be.
    let max_event = ctx.shared.snapshot.load().config.http.max_body_bytes;
    let mut sse_buf = super::sse::EventBuffer::new(max_event);
    let mut piece = Vec::new();
    let finished = loop {
        // Take what has arrived.
        piece.clear();
        let done = match kind {
            BodyKind::Length(_) => {
                let n = remaining.min(conn.pending().len());
                piece.extend_from_slice(&conn.pending()[..n]);
                conn.consume(n);
                remaining -= n;
                remaining == 0
            }
            BodyKind::Chunked => match decoder.decode(conn.pending(), &mut piece) {
                Ok((used, done)) => {
                    conn.consume(used);
                    done
                }
                Err(_) => break Err("malformed chunked body from upstream"),
            },
            BodyKind::UntilClose => {
                let n = conn.pending().len();
                piece.extend_from_slice(&conn.pending()[..n]);
                conn.consume(n);
                false
            }
        };
        // Forward it; SSE only at event boundaries, so that an error event can always be
        // appended cleanly.
        let data: Vec<u8> = if sse {
            sse_buf.push(&piece);
            match sse_buf.take_events() {
                Ok(Some(events)) => match member {
                    Some(name) => super::federation::rewrite_events(name, &events),
                    None => events,
                },
                Ok(None) => Vec::new(),
                Err(_) => break Err("upstream event larger than the body limit"),
            }
        } else {
            std::mem::take(&mut piece)
        };
        if !data.is_empty() && classify_answer {
            if sse {
                // The answer is the stream's last event.
                if data.len() <= CLASSIFY_MAX {
                    answer.clear();
                    answer.extend_from_slice(&data);
                }
            } else if answer.len() + data.len() <= CLASSIFY_MAX {
                answer.extend_from_slice(&data);
            }
        }
        if !data.is_empty() {
            let framed = if matches!(kind, BodyKind::Length(_)) || !chunked {
                data
            } else {
                chunk(&data)
            };
            if client.write_all(framed).await.is_err() {
                // The client went away: the upstream connection is abandoned mid-response.
                return false;
            }
        }
        if done {
            break Ok(());
        }
        let timeout = if sse {
            up.stream_idle_timeout
        } else {
            up.response_timeout
        };
        // The client closed the stream: in 2026-07-28 that is the request's cancellation.
        let Some(filled) = unless_client_leaves(client, conn.fill(timeout)).await else {
            // Dropping `conn` closes it, which cancels there.
            return false;
        };
        match filled {
            Ok(0) if kind == BodyKind::UntilClose => break Ok(()),
            Ok(0) => break Err("upstream closed the connection mid-response"),
            Ok(_) => {}
            Err(HttpError::Timeout) => break Err("upstream stalled mid-response"),
            Err(_) => break Err("upstream connection failed mid-response"),
        }
    };
    match finished {
        Ok(()) => {
            if classify_answer {
                if sse && !sse_buf.is_empty() {
                    answer = sse_buf.rest().to_vec();
                }
                let message = if sse {
                    last_event_data(&answer)
                } else {
                    std::mem::take(&mut answer)
                };
                obs.set(classify(&message));
            } else {
                obs.set(Outcome::Ok);
            }
            if !sse_buf.is_empty() {
                // A last event without its blank line.
                let rest = sse_buf.take_rest();
                let last = match member {
                    Some(name) => super::federation::rewrite_events(name, &rest),
                    None => rest,
                };
                let _ = client
                    .write_all(if chunked { chunk(&last) } else { last })
                    .await;
            }
            if !matches!(kind, BodyKind::Length(_))
                && chunked
                && client.write_all(b"0\r\n\r\n".to_vec()).await.is_err()
            {
                return false;
            }
            if kind != BodyKind::UntilClose && !upstream_close {
                ctx.checkin(up.addr, conn, up.max_idle);
            }
            keep_alive
        }
        Err(why) => {
            obs.set(Outcome::UpstreamFailure);
            tracing::warn!(upstream = %up.name, "{why}");
            if sse && matches!(kind, BodyKind::Chunked | BodyKind::UntilClose) {
                // The client gets a JSON-RPC error for exactly the request this stream answered.
                let err = RpcError::upstream(format!("upstream `{}`: {why}", up.name), 502)
                    .with_id(request_id);
                let mut event = b"event: message\ndata: ".to_vec();
                event.extend_from_slice(&err.body());
                event.extend_from_slice(b"\n\n");
                if !chunked {
                    let _ = client.write_all(event).await;
                    return false;
                }
                let ok = client.write_all(chunk(&event)).await.is_ok()
                    && client.write_all(b"0\r\n\r\n".to_vec()).await.is_ok();
                return ok && keep_alive;
            }
            // A fixed-length or non-SSE body cannot be completed: close the client connection.
            false
        }
    }
}

#[cfg(test)]
#[path = "proxy_head_tests.rs"]
mod head_tests;
