//! Passthrough forwarding on a worker: each request on a client connection is validated, routed
//! and relayed to its upstream over a per-worker keep-alive pool; responses stream back as they
//! arrive (SSE event by event), with backpressure: nothing more is read from the upstream until
//! the client has taken what was read. An upstream that fails answers exactly the affected
//! request with a JSON-RPC error.

use std::{
    cell::{Cell, RefCell},
    io::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    Id, RpcError, error,
    upstream::{ResponseHead, UpstreamFailure, call},
    worker::WorkerCtx,
};
use crate::{
    config::{Config, Upstream},
    http::{self, Io, Request},
    policy::{self, Refusal, TenantPolicy},
    session,
    shared::Shared,
    stats::Outcome,
};

/// What the request path learns about one request, for telemetry.
#[derive(Default)]
pub(super) struct Obs<'a> {
    pub outcome: Cell<Option<Outcome>>,
    pub upstream: Cell<Option<&'a str>>,
    pub upstream_wait: Cell<Option<Duration>>,
    pub method: Cell<&'static str>,
    pub tool: RefCell<Option<String>>,
    /// A batch's members, as audited (`method` and `tool` say nothing of them).
    pub batch: RefCell<Vec<policy::audit::Member>>,
    pub decision: RefCell<Decision>,
    /// Breakers this request passed.
    pub breakers: RefCell<Passed>,
    /// The request's span, once its trace context is known (with `[telemetry.otlp]`).
    pub span: Cell<Option<crate::otlp::SpanCtx>>,
    /// The call was given up before its answer was relayed whole (its client went away, or
    /// the upstream did not answer in time), with no way back to it (no event id reached the
    /// client to resume the stream from): see `abandoned`.
    pub abandoned: Cell<bool>,
    /// The client left before its answer: nothing the upstream did, so no breaker counts it.
    /// Set as it leaves a call that runs on (`runs_on`), for its cancellation
    /// (`abandoned::on_leaving`); for a stream drained for the client to resume, only once
    /// the drain is over (`relay::drain`).
    pub client_left: Cell<bool>,
    /// Its client leaving does not end the call upstream, or not surely: no session to cancel
    /// it in, and an upstream that does not say a closed connection stops its calls
    /// (`closing_cancels`); or a session it is cancelled in as its client leaves, which the
    /// server may not be able to carry out (`abandoned::on_leaving`). Its exchange is then
    /// kept (its head awaited, an event stream read on: `relay::pump`, `Pumped::RanOn`) before
    /// its concurrency slots are given back. A client cut for a ban or deny has its call
    /// closed, and the slots held a while (`tasks::Owners::hold_cut`).
    pub runs_on: Cell<bool>,
    /// Whose an upstream failure is, for the upstream's shared breaker (see `record`).
    pub blame: Cell<Blame>,
    /// A resume's hold on the drain it took over (`relay::take_over`): given up as the
    /// call's answer passes on this request's stream (`relay::pump`).
    pub resumed: RefCell<Option<crate::shared::Resumed>>,
    /// The responses a GET's stream may carry: those of the stream its `Last-Event-ID`
    /// resumes (`resumes_from`); `None` for any other request.
    pub resumes: Cell<Option<super::messages::Answers>>,
    /// The in-flight slots the request was admitted with, held until it ends; a task its call
    /// creates takes them over (`tasks::Owners::bind`).
    pub slots: RefCell<Vec<policy::limits::InFlight>>,
    /// The call was sent and its answer not read (it timed out, the connection failed, the
    /// answer could not be read): the upstream may have acted on it. Set where a call is
    /// read whole (`read_whole`, `held::forward`).
    pub unanswered: Cell<bool>,
}

/// Whose an upstream failure is, as far as the upstream's shared breaker goes (its tool's
/// breaker counts each alike).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Blame {
    /// The upstream's: it could not be reached, reset the connection, answered nonsense.
    #[default]
    Upstream,
    /// Either's: the call was not answered in time (a slow tool, or a hung upstream), or was
    /// answered with a 5xx other than 500 (502–504: a proxy in front of a dead server, or of
    /// a slow tool). The upstream's only if it answered no other call meanwhile.
    Unclear,
    /// The call's: answered 500, an error on this request (a server's bug a client can
    /// repeat at will, a session its client ended meanwhile), as endpoints' ejection already
    /// reads it; or failed on its own account (see [`Obs::own_failure`]). Says nothing of the
    /// upstream's health either way.
    Call,
}

impl Blame {
    /// Whose a failed call is: a timeout is either's, an answer the gateway cannot pass on and
    /// a 401/403 the call drew are the call's.
    pub fn of_failure(f: &UpstreamFailure) -> Self {
        match f {
            UpstreamFailure::Timeout | UpstreamFailure::Unavailable(_) => Blame::Unclear,
            UpstreamFailure::Unrelayable(_) | UpstreamFailure::Denied(_) => Blame::Call,
            _ => Blame::Upstream,
        }
    }

    /// Whose a 5xx answer is.
    pub fn of_status(status: u16) -> Self {
        if status == 500 {
            Blame::Call
        } else {
            Blame::Unclear
        }
    }
}

/// The breakers a request passed: (name, upstream index, tool level, how). Those neither
/// judged nor given back when the request ends otherwise (its task panicked, or its worker
/// died) are given back when it is dropped: a probe lost so kept a half-open breaker refusing
/// every call for good (with one probe, an upstream's for every tenant).
#[derive(Default)]
pub(super) struct Passed {
    list: Vec<(String, usize, bool, policy::breaker::Pass)>,
    shared: Option<Arc<Shared>>,
}

impl Passed {
    pub fn push(
        &mut self,
        shared: &Arc<Shared>,
        passed: (String, usize, bool, policy::breaker::Pass),
    ) {
        if self.shared.is_none() {
            self.shared = Some(Arc::clone(shared));
        }
        self.list.push(passed);
    }

    /// The passes, to judge or give back: taken, they are the taker's.
    pub fn take(&mut self) -> Vec<(String, usize, bool, policy::breaker::Pass)> {
        std::mem::take(&mut self.list)
    }
}

impl Drop for Passed {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            for (name, _, _, pass) in self.list.drain(..) {
                shared.breakers.release(&name, pass);
            }
        }
    }
}

/// Who called and what policy decided, for telemetry and the audit log.
#[derive(Default)]
pub(super) struct Decision {
    pub tenant: Option<String>,
    /// A credential (a key, a token, a client certificate) named the caller; an address, or
    /// the default tenant, does not.
    pub vouched: bool,
    pub agent: Option<String>,
    /// What keeps a caller no agent names apart ([`crate::policy::Identity::own`]).
    pub own: Option<String>,
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

    /// The outcome recorded and audited: a failure because the client left is
    /// [`Outcome::ClientLeft`] (audited as `upstream_failure` before, blaming the upstream for
    /// every call a client hung up on); nothing set is a refusal.
    pub fn recorded_outcome(&self) -> Outcome {
        match self.outcome.get() {
            Some(Outcome::UpstreamFailure) if self.client_left.get() => Outcome::ClientLeft,
            o => o.unwrap_or(Outcome::Refused),
        }
    }

    /// The call failed with `f` (its outcome: see [`outcome_of`]; whose it is: see
    /// [`Blame::of_failure`]).
    pub fn failed(&self, f: &UpstreamFailure) {
        self.set_blamed(outcome_of(f), Blame::of_failure(f));
    }

    /// The call failed on its own account (an answer too large or unreadable, a 4xx, no answer
    /// at all): its tool's breaker counts it, and the upstream's neither way (as a success, it
    /// closed a half-open breaker, and kept other calls' timeouts from counting).
    pub fn own_failure(&self) {
        self.set_blamed(Outcome::RpcError, Blame::Call);
    }

    /// The upstream failed the call, and `blame` says whose the failure is (see [`Blame`]).
    pub fn failed_by(&self, blame: Blame) {
        self.set_blamed(Outcome::UpstreamFailure, blame);
    }

    /// The first outcome set stands, with whose it is.
    fn set_blamed(&self, o: Outcome, blame: Blame) {
        if self.outcome.get().is_none() {
            self.blame.set(blame);
            self.outcome.set(Some(o));
        }
    }

    /// The request's tenant, as the upstream pool keeps connections apart: a connection
    /// carries one tenant's requests only (see `upstream::pool`).
    pub fn tenant_key(&self, ctx: &WorkerCtx) -> u64 {
        ctx.shared
            .limits
            .key(("pool", self.decision.borrow().tenant.as_deref()))
    }

    /// The request went to its upstream and waited `d` for it (an answer or a failure): only
    /// such a request is judged by the breakers it passed (see `record`).
    pub fn waited(&self, d: Duration) {
        self.upstream_wait
            .set(Some(self.upstream_wait.get().unwrap_or_default() + d));
    }
}

pub use super::answer::classify;

pub(super) fn json_response(status: u16, err: &RpcError, keep_alive: bool) -> Vec<u8> {
    http::response(
        status,
        &[("content-type", "application/json")],
        &err.body(),
        keep_alive,
    )
}

/// Whether a `tools/list` answer is read on its way (not relayed as bytes): to keep what the
/// tenant may see, to pin its tools, or, for a 2026-07-28 client, to learn which arguments its
/// tools mirror into `Mcp-Param-*` headers (see `param_headers`).
pub(super) fn reads_tool_lists(
    req: &Request,
    policy: &policy::Policy,
    tenant: &TenantPolicy,
) -> bool {
    tenant.filters() || policy.pinning || super::headers::says_modern(req)
}

/// Whether a listed tool is shown to the tenant: allowed by its rules and, with pinning, its
/// definition is the approved one. Its `x-mcp-header` declarations are noted on the way.
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
    ctx.learned.param_headers.observe(upstream, tool);
    let pinned = !policy.pinning
        || ctx
            .shared
            .pins
            .observe(upstream, tool, policy.configured_pin(upstream, name));
    pinned && tenant.allows(upstream, name)
}

/// Who owns the passthrough sessions a request opens or uses: a keyed hash of its tenant and
/// agent.
pub(super) fn session_owner(ctx: &WorkerCtx, obs: &Obs<'_>) -> u64 {
    let d = obs.decision.borrow();
    ctx.shared.limits.key((
        "session-owner",
        d.tenant.as_deref(),
        d.agent.as_deref(),
        d.own.as_deref(),
    ))
}

/// Who calls: the session owner, and its tenant alone (what keeps callers apart at a stdio
/// upstream, and in the tasks an upstream makes).
pub(super) fn who_calls(ctx: &WorkerCtx, obs: &Obs<'_>) -> crate::stdio::Who {
    let tenant = ctx
        .shared
        .limits
        .key(("stdio-tenant", obs.decision.borrow().tenant.as_deref()));
    crate::stdio::Who {
        caller: session_owner(ctx, obs),
        tenant,
    }
}

/// What a passthrough session id is signed over: the upstream, and the caller that opened it.
fn owner_context<'a>(up: &'a Upstream, d: &'a Decision) -> [&'a [u8]; 5] {
    signed_for(b"owner", up, d)
}

/// What `what` (a session id, an event id) of `up` is signed over: the upstream, the caller
/// (its tenant, and its agent or else the credential that named it, each marked apart: an
/// agent named like a credential's mark is still another caller).
fn signed_for<'a>(what: &'static [u8], up: &'a Upstream, d: &'a Decision) -> [&'a [u8]; 5] {
    const PRESENT: [&[u8]; 6] = [b"--", b"-a", b"-k", b"t-", b"ta", b"tk"];
    let (kind, caller) = match (&d.agent, &d.own) {
        (Some(agent), _) => (1, agent.as_str()),
        (None, Some(own)) => (2, own.as_str()),
        (None, None) => (0, ""),
    };
    let tenant = d.tenant.as_deref();
    [
        what,
        up.name.as_bytes(),
        PRESENT[usize::from(tenant.is_some()) * 3 + kind],
        tenant.unwrap_or_default().as_bytes(),
        caller.as_bytes(),
    ]
}

/// The session id a passthrough client is given for its upstream's `id`: signed for its owner
/// (tenant and agent), so that it is this caller's alone on every worker, after an upgrade and
/// on any gateway of a fleet, with nothing remembered.
pub(super) fn client_session(ctx: &WorkerCtx, up: &Upstream, obs: &Obs<'_>, id: &[u8]) -> Vec<u8> {
    let d = obs.decision.borrow();
    let context = owner_context(up, &d);
    session::sign(&ctx.shared.session_key, &context, &[], id)
}

/// Signs the event ids of an answer's stream for its caller (tenant and agent), as its session
/// id is: a client resumes only from an event the gateway gave it. An upstream may keep every
/// session's events in one store (the Python SDK's manager gives each session the same one)
/// and replay whichever stream an id names: without this, a caller that knew or guessed
/// another's event id read that caller's answers on its own session. A federation's member's
/// ids (`member` true, already tagged with its name) are signed apart from the same
/// upstream's on a passthrough route. Each id also carries, signed, which responses its stream
/// may carry (`answers`: its request's), so that a resume from it carries those and no other
/// ([`messages::Answers`]).
pub(super) fn event_signer(
    ctx: &WorkerCtx,
    up: &Upstream,
    obs: &Obs<'_>,
    member: bool,
    answers: super::messages::Answers,
) -> session::Signer {
    let d = obs.decision.borrow();
    let context = signed_for(event_kind(member), up, &d);
    session::Signer::new(&ctx.shared.session_key, &context, &answers.mark())
}

/// The event id behind a `Last-Event-ID` the gateway gave this caller ([`event_signer`]), and
/// the responses the stream it resumes may carry; `None` for any other id. An id signed before
/// ids carried that (a gateway upgraded under its client) resumes unchecked.
pub(super) fn resumes_from<'a>(
    ctx: &WorkerCtx,
    up: &Upstream,
    obs: &Obs<'_>,
    signed: &'a [u8],
    member: bool,
) -> Option<(&'a str, super::messages::Answers)> {
    let d = obs.decision.borrow();
    let context = signed_for(event_kind(member), up, &d);
    let key = &ctx.shared.session_key;
    let (own, answers) = match session::verify::<8>(key, &context, signed) {
        Some((own, mark)) => (own, super::messages::Answers::of_mark(mark)),
        None => (
            session::verify::<0>(key, &context, signed)?.0,
            super::messages::Answers::Any,
        ),
    };
    Some((std::str::from_utf8(own).ok()?, answers))
}

fn event_kind(member: bool) -> &'static [u8] {
    if member { b"member-event" } else { b"event" }
}

/// What marks a session id as the bridge's own ([`bridge_session`]): one signed byte, so that
/// no id an upstream mints can pass for one.
const BRIDGED: [u8; 1] = [b'b'];

/// The session id a session-era client of a stateless-only upstream is given for the
/// gateway's own `id` ([`super::bridge`]): signed for its owner like [`client_session`], and
/// marked, so that its requests are bridged whatever the gateway knows of the upstream's era
/// at the time (that knowledge expires; the session does not).
pub(super) fn bridge_session(ctx: &WorkerCtx, up: &Upstream, obs: &Obs<'_>, id: &[u8]) -> Vec<u8> {
    let d = obs.decision.borrow();
    let context = owner_context(up, &d);
    session::sign(&ctx.shared.session_key, &context, &BRIDGED, id)
}

/// What a passthrough client's session id stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Session<'a> {
    /// The upstream's own session, with its id.
    Upstream(&'a str),
    /// The gateway's own session in front of a stateless-only upstream ([`bridge_session`]).
    Bridged,
}

impl<'a> Session<'a> {
    /// The id the upstream knows the session by (a bridged one it does not know).
    pub(super) fn upstream_id(self) -> Option<&'a str> {
        match self {
            Session::Upstream(own) => Some(own),
            Session::Bridged => None,
        }
    }
}

/// A client's session id as [`verify_session`] found it, owning nothing: `check` verifies the
/// id once and the forward reads it from the same header (`propagate`, in between, rewrites
/// only the trace context's headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verified {
    /// The upstream's own session: the id's first `own` bytes.
    Upstream {
        own: usize,
    },
    Bridged,
}

impl Verified {
    /// The session `id` stands for: `id` is the header this was verified from.
    pub(super) fn session(self, id: &[u8]) -> Option<Session<'_>> {
        match self {
            Verified::Upstream { own } => {
                Some(Session::Upstream(std::str::from_utf8(id.get(..own)?).ok()?))
            }
            Verified::Bridged => Some(Session::Bridged),
        }
    }
}

/// What a passthrough client's session `id` stands for, if the gateway gave it to this caller;
/// `None` for a session never opened here, another caller's, an altered id, or one its client
/// ended.
pub(super) fn upstream_session<'a>(
    ctx: &WorkerCtx,
    up: &Upstream,
    obs: &Obs<'_>,
    id: &'a [u8],
) -> Option<Session<'a>> {
    verify_session(ctx, up, obs, id)?.session(id)
}

/// As [`upstream_session`], in a form that does not borrow `id`.
pub(super) fn verify_session(
    ctx: &WorkerCtx,
    up: &Upstream,
    obs: &Obs<'_>,
    id: &[u8],
) -> Option<Verified> {
    let d = obs.decision.borrow();
    let context = owner_context(up, &d);
    let key = &ctx.shared.session_key;
    let verified = match session::verify::<0>(key, &context, id) {
        Some((own, [])) => {
            std::str::from_utf8(own).ok()?;
            Verified::Upstream { own: own.len() }
        }
        None => match session::verify::<1>(key, &context, id)? {
            (_, BRIDGED) => Verified::Bridged,
            _ => return None,
        },
    };
    if ctx
        .shared
        .ended_sessions
        .is_ended(key, session::Scope::Upstream(&up.name), id)
    {
        return None;
    }
    Some(verified)
}

/// The key a client's session id is remembered by once ended ([`session::Ended`]): the same
/// on every gateway of a fleet.
pub(super) fn ended_key(ctx: &WorkerCtx, up: &Upstream, id: &[u8]) -> u64 {
    session::ended_key(
        &ctx.shared.session_key,
        session::Scope::Upstream(&up.name),
        id,
    )
}

/// The upstream session of a passthrough request, as the upstream knows it: what the request's
/// header goes to the upstream as (dropped when it has none; [`check`] refused one not the
/// caller's).
///
/// [`check`]: super::stages
pub(super) fn session_header<'a>(
    req: &'a Request,
    ctx: &WorkerCtx,
    up: &Upstream,
    obs: &Obs<'_>,
) -> (&'static str, Option<&'a str>) {
    let own = req
        .header(crate::http::name::MCP_SESSION_ID)
        .and_then(|id| upstream_session(ctx, up, obs, id)?.upstream_id());
    ("mcp-session-id", own)
}

/// Signs for the caller the session ids a passthrough answer carries (the upstream's).
pub(super) fn sign_session(ctx: &WorkerCtx, up: &Upstream, head: &mut ResponseHead, obs: &Obs<'_>) {
    head.headers
        .replace_values("mcp-session-id", |id| client_session(ctx, up, obs, id));
}

/// Rules counted by name in the refusals' metric; the rest as `other`.
const MAX_REFUSAL_RULES: usize = 4_096;

/// Gives back, unjudged, the breaker probes a request took before it was refused.
pub(super) fn give_back_probes(obs: &Obs<'_>, ctx: &WorkerCtx) {
    for (name, _, _, pass) in obs.breakers.borrow_mut().take() {
        ctx.shared.breakers.release(&name, pass);
    }
}

/// The trace id of a W3C `traceparent`, if the whole value is exactly
/// `00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>` with neither id all zeros.
/// Nothing is trimmed and nothing may follow: the value is forwarded as it is, so what is
/// checked here is all there is.
pub(super) fn trace_id(traceparent: &str) -> Option<&str> {
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
pub(super) fn invalid_traceparent(where_: &str) -> RpcError {
    RpcError::invalid_request(format!(
        "{where_} is not a valid W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>, lowercase)"
    ))
}

/// Counts a refusal the client earned against its source (by IPv6 /64) under `[auto_ban]`;
/// past `max_refusals` in the window the control thread bans it. Returns whether it is past
/// them: its connection is closed after this answer (the ban takes at the control thread's
/// next turn, and 3,000 wrong keys pipelined on one connection were answered meanwhile: an
/// attacker's review).
pub(super) fn count_toward_ban(ctx: &WorkerCtx, config: &Config, peer: SocketAddr) -> bool {
    let Some(b) = &config.auto_ban else {
        return false;
    };
    let limits = &ctx.shared.limits;
    // Counted by IPv6 /64: any address in it is the client's to take.
    let what = policy::limits::Counted::Refusals {
        source: policy::limits::source_of(peer.ip()),
    };
    let key = what.key(limits, b.window_s);
    let counted = limits.charge_source(
        key,
        || what.clone(),
        policy::limits::State::unix_s(),
        b.window_s,
        1,
        u64::from(b.max_refusals),
    );
    if counted.is_none() {
        crate::throttled_warn!(
            max = policy::limits::MAX_SOURCES,
            "refusals of new source addresses are not counted towards a ban: as many sources are counted already"
        );
    }
    let past = counted.is_some_and(|r| r.is_err());
    if past {
        let _ = ctx
            .shared
            .ban_tx
            .send((peer.ip(), Duration::from_secs(b.ban_s)));
    }
    past
}

/// Answers a refusal: the rule's status and JSON-RPC error, with `Retry-After` and
/// `WWW-Authenticate` where they apply.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the answer"
)]
pub(super) async fn refuse(
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
            // Rules are the configuration's, but bounded all the same (each is a series of
            // `mcp_gateway_refusals_total`): past the bound, `other`.
            None => {
                let rule = if counts.len() < MAX_REFUSAL_RULES {
                    r.rule.clone()
                } else {
                    "other".to_owned()
                };
                counts
                    .get_or_insert_with(rule, std::sync::atomic::AtomicU64::default)
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            }
        };
    }
    // Refusals the client earned count towards a kernel ban: not an open breaker, nor a
    // request that shows no credential where one is needed. A web page's `<img>` makes its
    // visitors' browsers send those, over plain HTTP with nothing to tell them from a
    // client's (a review banned a visitor with four); and they guess nothing. A wrong
    // credential counts, whatever the request's headers say it is.
    let banned =
        r.code != policy::code::CIRCUIT_OPEN && !r.anonymous && count_toward_ban(ctx, config, peer);
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
        req.keep_alive && !banned,
    ))
    .await
    .is_ok()
        && !banned
}

/// `GET /.well-known/oauth-protected-resource[/route path]`: the RFC 9728 document.
pub(super) async fn protected_resource_metadata(
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
    let doc = policy.metadata_document(
        req.header_str(crate::http::name::HOST),
        io.tls().is_some(),
        rest,
    );
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
pub(super) async fn filtered_tools_list<'c>(
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
    read_whole(io, req, peer, up, ctx, obs, id, |message| {
        // A result the gateway cannot filter is not passed on unfiltered: the upstream's
        // malformed answer becomes an error for the client.
        match message.get_mut("result") {
            Some(result) => {
                super::messages::keep_tools(result, |t| visible(ctx, policy, tenant, &up.name, t))
                    .ok_or_else(|| {
                        "the answer to tools/list has no `result.tools` array".to_owned()
                    })
            }
            None => Ok(()),
        }
    })
    .await
}

/// A passthrough request whose answer is read whole (JSON or an event stream) and `inspect`ed
/// (filtered, or noted) before the client gets it, as one JSON message. An answer `inspect`
/// refuses is an upstream failure (502).
#[expect(
    clippy::too_many_arguments,
    reason = "each is a separate input of the forwarding"
)]
pub(super) async fn read_whole<'c>(
    io: &mut Io,
    req: &Request,
    peer: SocketAddr,
    up: &'c Upstream,
    ctx: &WorkerCtx,
    obs: &Obs<'c>,
    id: Option<Id>,
    inspect: impl FnOnce(&mut serde_json::Value) -> Result<(), String>,
) -> bool {
    obs.upstream.set(Some(&up.name));
    // An answer read whole is no stream to resume: it goes under an id of the gateway's
    // (`id::own`), so that no stream of the client's is filed with it upstream.
    let Some((ours, body)) = super::id::under_own(&req.body, id.as_ref()) else {
        let err = RpcError::invalid_request("the request's id could not be read").with_id(id);
        return io
            .write_all(json_response(400, &err, req.keep_alive))
            .await
            .is_ok();
    };
    let request = upstream_request(
        req,
        peer,
        up,
        &body,
        &[session_header(req, ctx, up, obs), ("last-event-id", None)],
    );
    let request = match request {
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
    let answer = call(
        &ctx.pool,
        up,
        obs.tenant_key(ctx),
        request,
        16 * 1024 * 1024,
    )
    .await;
    obs.waited(sent.elapsed());
    let (mut head, body) = match answer {
        Ok(a) => a,
        Err(f) => {
            // Sent (an answer it could not read is `Bad`): the upstream may have acted on it.
            obs.unanswered
                .set(f.sent_unanswered() || matches!(f, UpstreamFailure::Bad(_)));
            obs.failed(&f);
            return fail(io, req, up, id, f).await;
        }
    };
    sign_session(ctx, up, &mut head, obs);
    if !(200..300).contains(&head.status) {
        // Not an answer to read: a refusal (a 2026-07-28 server's -32022 with its versions, a
        // 429 with its `Retry-After`) goes to the client as the upstream gave it.
        let body = match (&ours, &id) {
            (Some(ours), Some(theirs)) => super::id::answering(body, ours, theirs),
            _ => body,
        };
        return relay_refusal(io, req, up, id, &head, &body, obs).await;
    }
    // Parsed, the answer takes up to 32 bytes for each two it had (`0,`): nothing of it, nor
    // the bytes it was read from, is kept past this point (no await until the client's answer
    // is written out; see `http::budget`).
    let parsed = super::messages::response_message(&head, &body, ours.as_ref());
    drop(body);
    let mut message = match parsed {
        Ok(m) => m,
        Err(why) => {
            obs.unanswered.set(true);
            obs.set(Outcome::UpstreamFailure);
            return fail(io, req, up, id, UpstreamFailure::Bad(why)).await;
        }
    };
    if let Err(why) = inspect(&mut message) {
        drop(message);
        obs.set(Outcome::UpstreamFailure);
        return fail(io, req, up, id, UpstreamFailure::Bad(why)).await;
    }
    if let Some(theirs) = &id {
        super::messages::set_in(&mut message, &["id"], theirs.to_json());
    }
    obs.set(if message.get("error").is_some() {
        Outcome::RpcError
    } else {
        Outcome::Ok
    });
    let session = head
        .headers
        .get(crate::http::name::MCP_SESSION_ID)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned);
    // Relayed to the client: an upstream is not trusted to produce a clean head.
    if session
        .as_deref()
        .is_some_and(|s| !http::is_clean_value(s.as_bytes()))
    {
        drop(message);
        obs.set(Outcome::UpstreamFailure);
        let f = UpstreamFailure::Bad("a control character in its Mcp-Session-Id".into());
        return fail(io, req, up, id, f).await;
    }
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = &session {
        headers.push(("mcp-session-id", s));
    }
    let response = {
        let body = super::json_bytes(&message);
        drop(message);
        http::response(head.status, &headers, &body, req.keep_alive)
    };
    io.write_all(response).await.is_ok()
}

/// An upstream's answer other than 2xx, read whole: passed on with its status, its
/// `Content-Type` and `Retry-After` (when clean) and its body.
pub(super) async fn relay_refusal(
    io: &mut Io,
    req: &Request,
    up: &Upstream,
    id: Option<Id>,
    head: &super::upstream::ResponseHead,
    body: &[u8],
    obs: &Obs<'_>,
) -> bool {
    let mut headers = Vec::new();
    for name in ["content-type", "retry-after"] {
        match head.headers.get(name).map(std::str::from_utf8) {
            Some(Ok(v)) if http::is_clean_value(v.as_bytes()) => headers.push((name, v)),
            None => {}
            Some(_) => {
                obs.set(Outcome::UpstreamFailure);
                let f = UpstreamFailure::Bad(format!("an unsafe {name} in its answer"));
                return fail(io, req, up, id, f).await;
            }
        }
    }
    if head.status >= 500 {
        obs.failed_by(Blame::of_status(head.status));
    } else {
        obs.own_failure();
    }
    io.write_all(http::response(head.status, &headers, body, req.keep_alive))
        .await
        .is_ok()
}

/// A 2026-07-28 header that repeats part of the body for routers.
fn is_mirror(name: &str) -> bool {
    name.eq_ignore_ascii_case("mcp-method")
        || name.eq_ignore_ascii_case("mcp-name")
        || super::param_headers::name_part(name).is_some()
}

/// Hop-by-hop headers (also those named by any `Connection` line of `headers`) and those the
/// gateway sets itself are not forwarded ([`http::NOT_FORWARDED`]).
pub(super) fn is_hop_by_hop(name: &str, connection: &http::ConnectionOptions<'_>) -> bool {
    http::NOT_FORWARDED.contains(name) || connection.names(name)
}

/// The request for `up`: the client's method, query and end-to-end headers, with `body`, and the
/// headers named in `replace` dropped and, where a value is given, set to it. Values taken from
/// a message body (a trace context, a tool name) may hold anything: every field is written by
/// [`http::push_field`], which refuses a control character, and then nothing is sent.
pub(super) fn upstream_request(
    req: &Request,
    peer: SocketAddr,
    up: &Upstream,
    body: &bytes::Bytes,
    replace: &[(&str, Option<&str>)],
) -> Result<http::Outgoing, http::UnsafeField> {
    let query = req.target.find('?').map_or("", |i| &req.target[i..]);
    let mut out = Vec::with_capacity(512);
    let target = if query.is_empty() {
        std::borrow::Cow::Borrowed(up.path.as_str())
    } else {
        std::borrow::Cow::Owned(format!("{}{query}", up.path))
    };
    http::push_request_line(&mut out, &req.method, &target)?;
    http::push_field(&mut out, "host", up.authority.as_bytes())?;
    let connection = http::ConnectionOptions::of(&req.headers);
    // The headers that mirror the body (`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`) are checked
    // against it only in a 2026-07-28 POST (see `headers`, `param_headers`): on an older
    // request, or a GET or DELETE, nothing vouches for them, and a router that reads them would
    // act on what no rule saw.
    let mirrors_checked = req.method == "POST" && super::headers::says_modern(req);
    for (name, value) in &req.headers {
        if !is_hop_by_hop(name, &connection)
            && (mirrors_checked || !is_mirror(name))
            && !name.eq_ignore_ascii_case("x-forwarded-for")
            && !name.eq_ignore_ascii_case("accept-encoding")
            && !replace.iter().any(|(r, _)| name.eq_ignore_ascii_case(r))
        {
            // The body was read as JSON in UTF-8 (parse stage): the upstream is told no other
            // charset, whatever parameter the client wrote.
            let value: &[u8] = if name.eq_ignore_ascii_case("content-type") {
                b"application/json"
            } else {
                value
            };
            http::push_field(&mut out, name, value)?;
        }
    }
    let mut text = [0u8; 64];
    let ip = ip_text(peer.ip(), &mut text);
    // Every line the client sent, in order, then the peer: lines of one field are one list
    // (RFC 9110 §5.3). A proxy in front that adds a line of its own instead of joining
    // (HAProxy's `option forwardfor`) puts the address it saw in the second one, which an
    // upstream that trusts that proxy reads; keeping only the first dropped it.
    let mut previous = req
        .headers
        .all(crate::http::name::X_FORWARDED_FOR)
        .map(<[u8]>::trim_ascii);
    match previous.next() {
        Some(first) => {
            let mut joined = first.to_vec();
            for line in previous {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(line);
            }
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip);
            http::push_field(&mut out, "x-forwarded-for", &joined)?;
        }
        None => http::push_field(&mut out, "x-forwarded-for", ip)?,
    }
    for (name, value) in replace {
        if let Some(value) = value {
            http::push_field(&mut out, name, value.as_bytes())?;
        }
    }
    if let Some(auth) = &up.authorization {
        http::push_field(&mut out, "authorization", auth.as_bytes())?;
    }
    // Answers are relayed as they come and read on the way (outcome, events, lists): one the
    // upstream compressed would be read as noise.
    out.extend_from_slice(b"accept-encoding: identity\r\n");
    if req.method == "POST" || !body.is_empty() {
        http::push_content_length(&mut out, body.len());
    }
    out.extend_from_slice(b"\r\n");
    Ok(http::Outgoing {
        head: out,
        body: body.clone(),
    })
}

/// `ip` written out in `text` (at most 45 bytes: an IPv6 address with an IPv4 tail), as
/// `Display` writes it; an IPv4 address, the usual peer, without the formatting machinery (it
/// is written into every request).
fn ip_text(ip: std::net::IpAddr, text: &mut [u8; 64]) -> &[u8] {
    let len = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                let mut digits = itoa::Buffer::new();
                let d = digits.format(octet).as_bytes();
                text[len..len + d.len()].copy_from_slice(d);
                len += d.len();
            }
            len
        }
        std::net::IpAddr::V6(_) => {
            let mut w: &mut [u8] = text;
            let _ = write!(w, "{ip}");
            64 - w.len()
        }
    };
    &text[..len]
}

/// Answers a request whose upstream failed. Boxed: every stage of the forward awaits this on
/// some path, and a future is as large as the largest it awaits inline; this one (~1 KiB) made
/// every request's future that much larger, which each stage moves as it starts the next.
pub(super) fn fail<'a>(
    client: &'a mut Io,
    req: &'a Request,
    up: &'a Upstream,
    id: Option<Id>,
    f: UpstreamFailure,
) -> std::pin::Pin<Box<impl Future<Output = bool> + 'a>> {
    Box::pin(answer_failure(client, req, up, id, f))
}

/// What a failure says of the upstream, for telemetry and its breakers: the gateway's own
/// shortage nothing (refused here); a call's answer it cannot pass on, the call's own failure
/// (its tool's breaker counts it, the upstream's shared one does not: one tenant asking for a
/// large file opened it for every tenant); a 401/403 the call drew, the call's own too, and
/// nothing of the upstream's health (one tenant calling what the upstream forbids it opened it
/// for every tenant, and a probe drawing one would close it).
pub(super) fn outcome_of(f: &UpstreamFailure) -> Outcome {
    match f {
        UpstreamFailure::OutOfDescriptors | UpstreamFailure::SessionLost => Outcome::Refused,
        UpstreamFailure::Unrelayable(_) => Outcome::RpcError,
        UpstreamFailure::Denied(_) => Outcome::UpstreamDenied,
        _ => Outcome::UpstreamFailure,
    }
}

async fn answer_failure(
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
        | UpstreamFailure::Denied(d)
        | UpstreamFailure::Unrelayable(d)
        | UpstreamFailure::Unavailable(d)
        | UpstreamFailure::Bad(d) => (502, format!("upstream `{}` failed: {d}", up.name)),
        UpstreamFailure::OutOfDescriptors => {
            crate::throttled_warn!(
                upstream = %up.name,
                "out of file descriptors connecting to the upstream: answered 503 (raise LimitNOFILE)"
            );
            // The gateway's own error (not UPSTREAM_ERROR): the alert goes to whoever runs it.
            let err = RpcError::new(
                crate::mcp::error::INTERNAL_ERROR,
                "the gateway is out of file descriptors; retry later",
                503,
            )
            .with_data(serde_json::json!({ "reason": "out_of_descriptors" }))
            .with_id(id);
            return client
                .write_all(json_response(503, &err, req.keep_alive))
                .await
                .is_ok();
        }
        UpstreamFailure::Tls { reason, detail } => {
            crate::throttled_warn!(upstream = %up.name, reason, "{detail}");
            // The detail is the log's: it names the names and addresses the upstream's
            // certificate holds, and the gateway's view of them, which are no client's to read.
            let err = RpcError::upstream(
                format!(
                    "upstream `{}` failed: its TLS handshake failed ({reason})",
                    up.name
                ),
                502,
            )
            .with_data(serde_json::json!({ "upstream": up.name, "reason": reason }))
            .with_id(id);
            return client
                .write_all(json_response(502, &err, req.keep_alive))
                .await
                .is_ok();
        }
        UpstreamFailure::ClientGone => return false,
        // The replica that holds the client's session is ejected or gone: the protocol's
        // answer for a lost session, so that the client initializes again elsewhere.
        UpstreamFailure::SessionLost => {
            let err = RpcError::new(
                error::SESSION_NOT_FOUND,
                format!(
                    "the replica of upstream `{}` holding this session is unavailable: initialize again",
                    up.name
                ),
                404,
            )
            .with_id(id);
            return client
                .write_all(json_response(404, &err, req.keep_alive))
                .await
                .is_ok();
        }
    };
    crate::throttled_warn!(upstream = %up.name, status, "{detail}");
    let err = RpcError::upstream(detail, status).with_id(id);
    client
        .write_all(json_response(status, &err, req.keep_alive))
        .await
        .is_ok()
}

#[cfg(test)]
#[path = "proxy_head_tests.rs"]
pub(super) mod head_tests;

#[cfg(test)]
mod passed_tests {
    use super::*;
    use crate::{config::Config, policy::breaker::Pass};

    /// A request that ends without its breakers judged (its task panicked) gives its probe
    /// back: with one probe, the half-open breaker refused every call after it for good.
    #[test]
    fn a_probe_is_given_back_when_its_request_is_dropped_unjudged() {
        const LEASE: std::time::Duration = std::time::Duration::from_secs(60);
        let config = Config::from_toml(
            "[gateway]\ninstance = \"t\"\n[[listeners]]\naddress = \"127.0.0.1:1\"\n[admin]\naddress = \"127.0.0.1:2\"\n[kernel]\nenabled = false\n",
        )
        .unwrap();
        let shared = Arc::new(Shared::new(config));
        let c: crate::config::RawBreaker =
            toml::from_str("consecutive_failures = 1\nopen_ms = 1\nhalf_open_probes = 1").unwrap();
        const MS: u64 = 1_000_000;
        let pass = shared.breakers.allow("up", MS, &c, LEASE).unwrap();
        shared.breakers.record("up", MS, &c, pass, false);
        let probe = shared.breakers.allow("up", 10 * MS, &c, LEASE).unwrap();
        assert!(matches!(probe, Pass::Probe(_)));
        assert!(
            shared.breakers.allow("up", 10 * MS, &c, LEASE).is_err(),
            "the probe is out"
        );
        {
            let obs = Obs::default();
            obs.breakers
                .borrow_mut()
                .push(&shared, ("up".to_owned(), 0, false, probe));
            // Dropped as a panicking task's future is, never judged.
        }
        assert_eq!(
            shared.breakers.allow("up", 11 * MS, &c, LEASE),
            Ok(probe),
            "the probe came back"
        );
        // Taken to be judged, it is the taker's: dropping the rest gives nothing back twice.
        let obs = Obs::default();
        obs.breakers
            .borrow_mut()
            .push(&shared, ("up".to_owned(), 0, false, probe));
        let taken = obs.breakers.borrow_mut().take();
        drop(obs);
        assert!(shared.breakers.allow("up", 12 * MS, &c, LEASE).is_err());
        shared.breakers.record("up", 12 * MS, &c, taken[0].3, true);
        assert_eq!(
            shared.breakers.allow("up", 13 * MS, &c, LEASE),
            Ok(Pass::Closed(2))
        );
    }

    /// Whose each failure is at the upstream's shared breaker: a 502–504 to an exchange the
    /// gateway made for the call (a held session's `initialize`) is either's, as a 502–504
    /// answer to the call is, not the upstream's outright.
    #[test]
    fn each_failure_has_its_blame() {
        let blame = |f: UpstreamFailure| {
            let obs = Obs::default();
            obs.failed(&f);
            obs.blame.get()
        };
        assert_eq!(
            blame(UpstreamFailure::Unavailable("502".into())),
            Blame::Unclear
        );
        assert_eq!(blame(UpstreamFailure::Timeout), Blame::Unclear);
        assert_eq!(blame(UpstreamFailure::Unrelayable("x".into())), Blame::Call);
        assert_eq!(blame(UpstreamFailure::Denied("401".into())), Blame::Call);
        assert_eq!(blame(UpstreamFailure::Bad("x".into())), Blame::Upstream);
        assert_eq!(blame(UpstreamFailure::Connect("x".into())), Blame::Upstream);
    }
}
