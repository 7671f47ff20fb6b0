//! The policy part of the configuration file: identity (`[auth]`, `auth` on routes), rules and
//! limits (`[policy]` for every tenant, `[tenants.policy]` for one) and the audit log (`[audit]`).
//! These raw types are also the validated form; `crate::policy::Policy::compile` turns them into
//! what the request path evaluates and reports what cannot be compiled, naming the key.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// API keys, each belonging to a tenant (and optionally an agent). Only digests are stored.
    #[serde(default)]
    pub api_keys: Vec<RawApiKey>,
    #[serde(default)]
    pub jwt: Option<RawJwt>,
    /// Client certificates (verified by a listener's `client_ca`) and the callers they name.
    #[serde(default)]
    pub mtls: Vec<super::RawMtlsIdentity>,
    /// The RFC 9728 protected resource metadata served at
    /// `/.well-known/oauth-protected-resource[/route path]` and named in `WWW-Authenticate`.
    #[serde(default)]
    pub resource_metadata: RawResourceMetadata,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    /// Lowercase hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    pub tenant: String,
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// A JWKS document (RFC 7517): `oct` keys for HS256, `RSA` for RS256, `EC` P-256 for ES256.
    /// A token's `kid` selects the key; without one, the only key of a one-key set.
    pub jwks_file: String,
    /// Required `iss`, when given.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required among `aud`, when given.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// The claim naming the tenant (a configured tenant's name).
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// The claim naming the agent, if any.
    #[serde(default = "default_agent_claim")]
    pub agent_claim: Option<String>,
    /// The claim naming the run, if any (the `run_header` still wins when sent).
    #[serde(default)]
    pub run_claim: Option<String>,
}

const fn default_leeway_s() -> u64 {
    30
}
fn default_tenant_claim() -> String {
    "tenant".into()
}
#[expect(
    clippy::unnecessary_wraps,
    reason = "serde's default for an optional claim"
)]
fn default_agent_claim() -> Option<String> {
    Some("sub".into())
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawResourceMetadata {
    /// The gateway's public base URL (e.g. `https://mcp.example.com`); by default taken from
    /// the request's `Host`.
    #[serde(default)]
    pub public_url: Option<String>,
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    #[serde(default)]
    pub scopes_supported: Vec<String>,
}

/// How a route's callers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    ApiKey,
    /// `Authorization: Bearer <JWT>`.
    Jwt,
    /// A source address that the tenant prefixes classify to a tenant other than the default.
    Address,
    /// A client certificate verified on a TLS listener with `client_ca`, mapped to a caller by
    /// `[[auth.mtls]]`.
    Mtls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Rules and limits. `[policy]` applies to every tenant; a tenant's `[tenants.policy]` is
/// evaluated first: its tool rules come before the defaults' (the first match wins), and each
/// limit it sets replaces the default's.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// For a tool no rule matches (`allow` unless set).
    #[serde(default)]
    pub default_action: Option<Action>,
    #[serde(default)]
    pub tools: Vec<RawToolRule>,
    /// Rules on JSON-RPC methods, for what tool rules do not cover (`resources/*`, `prompts/*`,
    /// `tasks/*`, `completion/complete`): the tenant's own, then `[policy]`'s; the first that
    /// matches a request's method decides, and a method none matches is allowed.
    #[serde(default)]
    pub methods: Vec<RawMethodRule>,
    /// JSON-RPC requests per second for the whole tenant, over all workers.
    #[serde(default)]
    pub requests_per_sec: Option<u64>,
    /// Requests admitted at once; default: `requests_per_sec` (one second's worth).
    #[serde(default)]
    pub burst: Option<u64>,
    /// Requests per second for each agent of the tenant.
    #[serde(default)]
    pub agent_requests_per_sec: Option<u64>,
    /// Default: `agent_requests_per_sec`.
    #[serde(default)]
    pub agent_burst: Option<u64>,
    /// Requests of the tenant in flight at once (a task holds its call's place until the gateway
    /// sees it end, 10 minutes at most).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    #[serde(default)]
    pub budget: Option<RawBudget>,
    #[serde(default)]
    pub loop_breaker: Option<RawLoopBreaker>,
    /// The request header naming a run (default `mcp-run-id`).
    #[serde(default)]
    pub run_header: Option<String>,
    /// Pin every upstream tool's definition on first sight (top level only); a later change is
    /// hidden and refused until approved (`POST /pins/approve` on the admin API).
    #[serde(default)]
    pub pin_tools: Option<bool>,
    /// Definitions pinned in advance (top level only; implies `pin_tools`).
    #[serde(default)]
    pub pins: Vec<RawPin>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPin {
    pub upstream: String,
    pub tool: String,
    /// As `GET /pins` reports it: SHA-256 of the tool's whole definition (every field, object keys
    /// sorted). An older digest of the name, description and input schema alone is still
    /// honoured: the definition it first matches is then pinned whole.
    pub sha256: String,
}

/// A rule on the method of a JSON-RPC request.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMethodRule {
    /// Glob over the method's name, in which `*` does not match `/` and `**` matches anything:
    /// `resources/*`, `tasks/*`, `completion/complete`, `**`.
    #[serde(rename = "match")]
    pub pattern: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawToolRule {
    /// Glob over `<upstream>/<tool>` (the upstream's own tool name), or over `<tool>` for any
    /// upstream: `github/create_*`, `*/delete_*`, `echo`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Whether the matching tools are offered. Absent, the rule leaves that to the next
    /// matching rule that says (the tenant's own come first, then `[policy]`'s), else to
    /// `default_action`: a rule written for a cost or an argument check allows nothing a
    /// later rule denies.
    #[serde(default)]
    pub action: Option<Action>,
    /// Charged to the budgets per call (default 1), taken from the first matching rule that
    /// sets it. The limits of every matching rule apply (argument checks, size cap, rate,
    /// concurrency).
    #[serde(default)]
    pub cost: Option<u64>,
    /// Calls per second of the matching tools, per tenant.
    #[serde(default)]
    pub requests_per_sec: Option<u64>,
    /// Default: `requests_per_sec` (one second's worth).
    #[serde(default)]
    pub burst: Option<u64>,
    /// Calls of the matching tools in flight at once, per tenant (a task holds its call's place
    /// until the gateway sees it end, 10 minutes at most).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Cap on the size of `arguments` as JSON.
    #[serde(default)]
    pub max_arguments_bytes: Option<usize>,
    #[serde(default)]
    pub arguments: Vec<RawArgRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JsonType {
    String,
    Integer,
    Number,
    Boolean,
    Object,
    Array,
    Null,
}

/// A rule on one argument, found by JSON pointer (RFC 6901) into `arguments`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawArgRule {
    /// e.g. `/path` or `/options/depth`.
    pub pointer: String,
    /// Refuse the call when the argument is absent.
    #[serde(default)]
    pub required: bool,
    #[serde(default, rename = "type")]
    pub kind: Option<JsonType>,
    #[serde(default, rename = "enum")]
    pub one_of: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub minimum: Option<f64>,
    #[serde(default)]
    pub maximum: Option<f64>,
    /// A regular expression the string must contain a match of (anchor it with `^…$`).
    #[serde(default)]
    pub pattern: Option<String>,
    /// Length in characters for strings, in items for arrays.
    #[serde(default)]
    pub min_length: Option<usize>,
    #[serde(default)]
    pub max_length: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// Budgets renew at the start of each window (aligned to the Unix epoch).
    pub window_s: u64,
    /// Cost units per window for the whole tenant.
    #[serde(default)]
    pub tenant: Option<u64>,
    /// For each agent.
    #[serde(default)]
    pub agent: Option<u64>,
    /// For each run.
    #[serde(default)]
    pub run: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLoopBreaker {
    /// Identical calls (same tool, same arguments) allowed per agent within the window.
    pub max_repeats: u32,
    pub window_s: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Append one JSON line per decision to this file; off when not given. A reload that
    /// changes `[audit]` opens the new file first (one that cannot be opened refuses the reload).
    #[serde(default)]
    pub path: Option<String>,
    /// Records a second, over all workers, of refusals the gateway made itself (no upstream
    /// answered) of callers no credential named (a 401, a body that does not parse, from
    /// anyone, the default tenant's callers included): anyone can send those as fast as the
    /// network takes them. The rest are counted, in a line a second (`{"ts", "suppressed",
    /// "reason"}`) and in `mcp_gateway_audit_dropped_total{reason="anonymous_refusal"}`.
    #[serde(default = "default_anonymous_refusals_per_second")]
    pub anonymous_refusals_per_second: u32,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            path: None,
            anonymous_refusals_per_second: default_anonymous_refusals_per_second(),
        }
    }
}

const fn default_anonymous_refusals_per_second() -> u32 {
    100
}

/// A circuit breaker: opens on `consecutive_failures` in a row, or when at least `min_requests`
/// in the current `window_s` fail at `failure_ratio` or more; stays open `open_ms`, then lets
/// `half_open_probes` calls through; one success closes it, one failure opens it again. For a
/// tool, a result with `isError: true` is a failure too. A call that times out or is answered
/// with a 5xx other than 500 is its tool's failure, and its upstream's only if the upstream
/// answered no other call while it waited; one answered 500 or 4xx, or with nothing, is its
/// tool's only.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    #[serde(default)]
    pub consecutive_failures: Option<u32>,
    #[serde(default)]
    pub failure_ratio: Option<f64>,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_breaker_window_s")]
    pub window_s: u64,
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
    #[serde(default = "default_probes")]
    pub half_open_probes: u32,
}

const fn default_min_requests() -> u32 {
    20
}
const fn default_breaker_window_s() -> u64 {
    10
}
const fn default_open_ms() -> u64 {
    5_000
}
const fn default_probes() -> u32 {
    1
}

/// The closed loop to the kernel: a source address refused this often (bad credentials, policy
/// refusals, rate limits) within the window is banned in the kernel's ban map for `ban_s`, so
/// its next packets are dropped before the network stack.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAutoBan {
    pub max_refusals: u32,
    pub window_s: u64,
    pub ban_s: u64,
    /// An IPv6 client is banned by its /64, and may hold many (a /48 holds 65,536): once this
    /// many auto-bans in force lie in one /56 (the new one counted), the /56 is banned whole in
    /// their place, and a /48 once it holds four times as many (a widened /56 counted as one);
    /// the auto-bans inside are lifted (their entries in the kernel's ban map freed; an
    /// operator's ban is neither counted nor lifted). Never a prefix holding a trusted
    /// balancer's address or a tenant's whole `sources` prefix, nor one that meets space where a
    /// /64 is not one client's. 0: never widened; else at least 2.
    #[serde(default = "default_ipv6_widen_at")]
    pub ipv6_widen_at: u32,
}

const fn default_ipv6_widen_at() -> u32 {
    8
}
