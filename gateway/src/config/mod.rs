//! Configuration: a raw serde layer that mirrors the TOML file exactly (unknown keys rejected,
//! units in field names), then [`RawConfig::validate`] into the [`Config`] the rest of the
//! gateway uses. Validation errors name the key and the problem.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

pub use crate::http::proxy_protocol::ProxyVersion;

mod policy;
pub use policy::*;
pub mod diff;
mod tls;
pub use tls::*;
mod state;
pub use state::*;
mod checks;
mod validate;
pub use checks::{DEMO_API_KEY, ENV_PLACEHOLDER, LoadOptions, MS_FLOOR, warn_demo_key};

/// The configuration that `gateway run` serves when no file is given.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key; the message names the key and the line
    /// (quoted, with any password of a URL on it masked: the message goes to the log and to
    /// the answer of `POST /reload`).
    /// Kept as text, not as the parser's error: as the `source` of this one, the unmasked text
    /// was printed by every `{:#}` of the chain.
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

/// `text` with the password of every URL in it (`scheme://user:password@host`) masked, and
/// the whole user part where there is no `:` (`redis://password@host` is read as a user name,
/// but is a secret all the same). The user part runs to the last `@` before a space, a quote
/// or a backtick: a password may hold `,`, `'`, `/` and more.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '`'))
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                let user = &tail[..at];
                match user.split_once(':') {
                    Some((name, _)) if !name.contains(['/', '?', '#']) => {
                        out.push_str(name);
                        out.push_str(":***");
                    }
                    _ => out.push_str("***"),
                }
                rest = &tail[at..];
            }
            None => {
                out.push_str(&tail[..end]);
                rest = &tail[end..];
            }
        }
    }
    out.push_str(rest);
    out
}

impl From<toml::de::Error> for ConfigError {
    fn from(e: toml::de::Error) -> Self {
        Self::Parse(redact_userinfo(&e.to_string()))
    }
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway: RawGateway,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    pub admin: RawAdmin,
    #[serde(default)]
    pub kernel: RawKernel,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub auto_ban: Option<RawAutoBan>,
    /// The store of policy state kept across restarts.
    #[serde(default)]
    pub state: RawState,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Browser origins allowed to call the gateway. A request with any other `Origin` gets 403
    /// (DNS-rebinding protection); requests without `Origin` (agents, SDKs) are not affected.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// The CORS answers given to the `allowed_origins` (browser clients such as the MCP
    /// Inspector). Upstreams' own CORS headers are never relayed.
    #[serde(default)]
    pub cors: RawCors,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// Request headers a page may send besides the MCP ones (`authorization`, `content-type`,
    /// `mcp-session-id`, `mcp-protocol-version`, `last-event-id`, trace context ...).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers a page may read besides `mcp-session-id`, `mcp-protocol-version`,
    /// `www-authenticate` and `retry-after`.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// How long a browser may cache a preflight's answer. Default 600.
    pub max_age_s: Option<u64>,
    /// Allow credentials (cookies, TLS client certificates) on cross-origin requests.
    #[serde(default)]
    pub allow_credentials: bool,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// Record per-request telemetry (counts and latency). Off only to measure its cost.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Distinct tool names given their own series; the rest are counted as `other`.
    #[serde(default = "default_max_tools")]
    pub max_tools: usize,
    /// Write interval latency histograms (one line per worker, series and second) to this file
    /// in the HdrHistogram log format.
    #[serde(default)]
    pub histogram_log: Option<String>,
    /// Export a span per request to an OpenTelemetry collector over OTLP/HTTP (protobuf).
    #[serde(default)]
    pub otlp: Option<RawOtlp>,
    /// An access log: one JSON line per request, separate from the audit log (which records
    /// decisions). Reopened on SIGHUP and SIGUSR1 like the audit log; a reload that changes its
    /// path or bound opens the new file first (one that cannot be opened refuses the reload).
    #[serde(default)]
    pub access_log: Option<RawAccessLog>,
}

/// `[telemetry.access_log]`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    /// The file lines are appended to (created with mode 0640).
    pub path: String,
    /// The fields of each line, in this order; all of them when not given.
    #[serde(default = "AccessField::all")]
    pub fields: Vec<AccessField>,
    /// Lines a second, over all workers, for errors the gateway answered itself (no upstream
    /// answered) to callers no credential named: a 401, an unknown route or method, a body that
    /// does not parse, from anyone, the default tenant's callers included. Anyone can send those
    /// as fast as the network takes them. The rest are counted, in a line a second
    /// (`{"ts", "suppressed", "reason"}`) and in
    /// `mcp_gateway_access_log_dropped_total{reason="anonymous_refusal"}`. Callers a key, a
    /// token or a certificate names get every line.
    #[serde(default = "default_anonymous_refusals_per_second")]
    pub anonymous_refusals_per_second: u32,
}

const fn default_anonymous_refusals_per_second() -> u32 {
    100
}

/// A field of the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessField {
    /// RFC 3339 time the request ended, in microseconds.
    Ts,
    /// The client's address (from the PROXY header behind a balancer).
    Source,
    /// The HTTP method.
    Method,
    /// The request target's path.
    Path,
    /// The HTTP status answered (0: the connection ended before an answer).
    Status,
    /// The JSON-RPC method, or `other`.
    RpcMethod,
    Tool,
    Tenant,
    Agent,
    Run,
    Upstream,
    /// ok, refused, tool_error, rpc_error, upstream_failure, upstream_denied, client_left.
    Outcome,
    /// The rule that refused the request.
    Rule,
    /// The whole request, and the upstream's share, in microseconds.
    LatencyUs,
    UpstreamUs,
    TraceId,
    UserAgent,
}

impl AccessField {
    pub fn all() -> Vec<AccessField> {
        use AccessField::*;
        vec![
            Ts, Source, Method, Path, Status, RpcMethod, Tool, Tenant, Agent, Run, Upstream,
            Outcome, Rule, LatencyUs, UpstreamUs, TraceId, UserAgent,
        ]
    }
}

/// `[telemetry.otlp]`: where spans go and which are kept.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOtlp {
    /// The collector's OTLP/HTTP traces endpoint (`http://`), e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    /// The share of traces kept at the start of a request (0.0 to 1.0), decided on the trace id.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Keep the span of every refused or failed request, whatever `sample_ratio` decided.
    #[serde(default = "yes")]
    pub always_sample_errors: bool,
    /// Extra HTTP headers sent with every export (e.g. a collector's API key).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// How long one export may take before it counts as failed (and is retried).
    #[serde(default = "default_otlp_timeout_ms")]
    pub timeout_ms: u64,
    /// Spans in one export request.
    #[serde(default = "default_otlp_batch_max")]
    pub batch_max: usize,
    /// Spans waiting per worker and in the exporter; more are dropped and counted. Read at start.
    #[serde(default = "default_otlp_queue_max")]
    pub queue_max: usize,
    /// The `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

const fn default_sample_ratio() -> f64 {
    0.01
}
const fn default_otlp_timeout_ms() -> u64 {
    2_000
}
const fn default_otlp_batch_max() -> usize {
    512
}
const fn default_otlp_queue_max() -> usize {
    4_096
}
fn default_service_name() -> String {
    "mcp-gateway".to_owned()
}

impl RawOtlp {
    fn validate(self) -> Result<OtlpConfig, ConfigError> {
        let uri: hyper::Uri = self
            .endpoint
            .parse()
            .map_err(|e| invalid("telemetry.otlp.endpoint", format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(invalid(
                "telemetry.otlp.endpoint",
                "must be an http:// URL with a host (an OTLP/HTTP collector)",
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(
                "telemetry.otlp.sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        for (key, value, zero) in [
            ("timeout_ms", self.timeout_ms, 0),
            ("batch_max", self.batch_max as u64, 0),
            ("queue_max", self.queue_max as u64, 0),
        ] {
            if value == zero {
                return Err(invalid(format!("telemetry.otlp.{key}"), "must be above 0"));
            }
        }
        let mut headers = Vec::new();
        for (name, value) in self.headers {
            let ok = hyper::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && hyper::header::HeaderValue::from_str(&value).is_ok();
            if !ok {
                return Err(invalid(
                    format!("telemetry.otlp.headers.{name}"),
                    "not a valid HTTP header name and value",
                ));
            }
            headers.push((name, value));
        }
        Ok(OtlpConfig {
            endpoint: self.endpoint,
            sample_ratio: self.sample_ratio,
            always_sample_errors: self.always_sample_errors,
            headers,
            timeout: Duration::from_millis(self.timeout_ms),
            batch_max: self.batch_max,
            queue_max: self.queue_max,
            service_name: self.service_name,
        })
    }
}

const fn default_max_tools() -> usize {
    50
}

impl Default for RawTelemetry {
    fn default() -> Self {
        toml::from_str("").expect("all fields have defaults")
    }
}

impl Default for RawHttp {
    fn default() -> Self {
        toml::from_str("").expect("all fields have defaults")
    }
}

const fn default_max_header_bytes() -> usize {
    16 * 1024
}
const fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
const fn default_request_timeout_ms() -> u64 {
    10_000
}
const fn default_idle_timeout_ms() -> u64 {
    60_000
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: String,
    /// `http://host:port/path` or `https://host:port/path` of the MCP server's Streamable HTTP
    /// endpoint. An https upstream is always spoken to over verified TLS, never in plaintext.
    /// Exactly one of `url`, `endpoints` and `command` is given. A host name that resolves to
    /// several addresses gives one endpoint (replica) per address.
    #[serde(default)]
    pub url: Option<String>,
    /// Replicas of one MCP server: several URLs of one scheme and one path, balanced, with
    /// failing ones ejected and sessions kept on the replica that opened them. `Host` and SNI
    /// are the first one's (or `server_name`).
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    /// Consecutive failures (connect refused or timed out, a reset, a 5xx answer) that take
    /// one endpoint out of rotation; 0: never. Default 5. Only where there can be several
    /// endpoints (`endpoints`, or a `url` with a host name): refused on a `command` upstream or
    /// a `url` with an address literal, which have nothing to eject.
    #[serde(default)]
    pub eject_after_failures: Option<u32>,
    /// How long the first ejection of an endpoint lasts; each repeat doubles it, up to
    /// `eject_max_ms`. Then one request is let through as a trial. Default 10000.
    #[serde(default)]
    pub eject_base_ms: Option<u64>,
    /// The longest an ejection lasts (ms). Default 300000.
    #[serde(default)]
    pub eject_max_ms: Option<u64>,
    /// A stdio MCP server: the program and its arguments, run by the gateway as a sandboxed
    /// child process (see [`RawStdio`] for the rest).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// stdio only: how the child runs.
    #[serde(default)]
    pub stdio: Option<RawStdio>,
    /// https only: the CA certificates (PEM) the upstream's certificate must chain to. Without
    /// it, the system trust store (the Mozilla roots built in when that store is empty).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// https only: the name sent as SNI, verified against the certificate and sent as `Host`,
    /// instead of the URL's host (an upstream reached by address, say).
    #[serde(default)]
    pub server_name: Option<String>,
    /// https only: a client certificate chain (PEM) presented to an upstream that asks for one
    /// (mTLS); with `client_key`.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// https only: the private key (PEM) of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
    /// How often the URL's host name is resolved again in the background; 0: only at load. A
    /// failed resolution keeps the last good address.
    #[serde(default = "default_resolve_every_ms")]
    pub resolve_every_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Until the response head arrives.
    #[serde(default = "default_upstream_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Longest time inside a streamed (SSE) response without a whole event (comments count)
    /// before the gateway gives up on it: bytes that never finish an event are silence.
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// The gateway's own credential for this upstream (the client's token is never forwarded),
    /// read from this environment variable at load.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Idle connections each worker keeps at least, for each tenant (it keeps as many as were
    /// in use at once lately, if more); 0: none kept.
    #[serde(default = "default_max_idle")]
    pub max_idle_connections_per_worker: usize,
    /// How long an idle pooled connection may wait for its next request; one idle longer is
    /// closed instead. Below the upstream server's own keep-alive timeout (uvicorn and Node
    /// close idle connections after 5 s), so that a request is never written to a connection
    /// the server is closing at that moment (the call would fail with 502). 0: none reused.
    #[serde(default = "default_idle_reuse_ms")]
    pub idle_reuse_ms: u64,
    /// Circuit breakers for this upstream as a whole and for each of its tools; none when not
    /// given.
    #[serde(default)]
    pub breaker: Option<RawBreaker>,
    /// Which protocol era the upstream speaks. `auto`: a request goes as the client sent it; an
    /// upstream that refuses a 2026-07-28 request for want of a session is remembered (five
    /// minutes, per worker) as of the session era, and one that refuses a session-era request
    /// with -32022 listing only 2026 versions (five minutes, every worker) as stateless;
    /// `session` and `stateless` say so. A 2026-07-28 client in front of a session-era upstream
    /// is served over a session the gateway opens and holds itself; a session-era client in
    /// front of a stateless upstream is bridged (`initialize` answered from `server/discover`,
    /// the session the gateway's own).
    #[serde(default)]
    pub era: UpstreamEra,
    /// Whose state a gateway-held session of a session-era upstream carries: one session per
    /// `tenant`, or per `caller` (tenant and agent) for an upstream that keeps per-user state.
    #[serde(default)]
    pub held_session: HeldScope,
    /// The upstream stops a call whose connection closes (2026-07-28 says that closing a
    /// request's stream is its cancellation; the Python SDK's server answering with JSON does
    /// not stop). Unset, a call that has no session to be cancelled in (a 2026-07-28 call, a
    /// bridged one, or one to a server without sessions) whose client leaves keeps its upstream
    /// exchange to its end, within `response_timeout_ms` and `stream_idle_timeout_ms`, and
    /// holds its concurrency slots until then: a client could otherwise start calls and hang
    /// up, over and over, and hold the upstream past its cap. Set, such a call is closed when
    /// its client leaves (or cancels it), and its slots go back at once.
    #[serde(default)]
    pub closing_cancels: bool,
    /// Response headers of this upstream relayed to clients besides the ones every MCP client
    /// reads (`Content-Type`, `Mcp-Session-Id`, `Mcp-Protocol-Version`, `Retry-After`), which
    /// are always relayed: each a name (`x-request-id`) or the start of names and `*`
    /// (`x-ratelimit-*`); `*` alone relays every header. Whatever is named, the upstream's own
    /// (`Set-Cookie`, `Server`, `Access-Control-*`, `Location`, `WWW-Authenticate`, ...), what a
    /// proxy in front acts on (`X-Accel-*`, ...) and the gateway's names (`Mcp-Gateway-*`) are
    /// never relayed; naming one of them is refused. Not for `command` upstreams, whose
    /// answers have no head.
    #[serde(default)]
    pub relay_response_headers: Vec<String>,
}

/// The protocol era of an HTTP upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamEra {
    /// Learnt from the upstream's answers.
    #[default]
    Auto,
    /// `initialize` and `Mcp-Session-Id` (2025-11-25 and before).
    Session,
    /// 2026-07-28: no sessions.
    Stateless,
}

/// The owner of a gateway-held upstream session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HeldScope {
    #[default]
    Tenant,
    Caller,
}

/// How a stdio upstream's child runs. Its environment holds only `env` (plus `PATH`, `HOME`,
/// `TMPDIR` and `LANG`); the gateway's own secrets never reach it.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStdio {
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Numeric user and group to run as; under root the default is `nobody` (65534).
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default = "default_stdio_start_timeout_ms")]
    pub start_timeout_ms: u64,
    /// Stop the child after this long without a call; 0 (the default): a shared child keeps
    /// running, per-caller children stop after 300000 (5 minutes), so that callers who left
    /// do not hold `max_children` forever.
    #[serde(default)]
    pub idle_shutdown_ms: u64,
    /// The memory a child may write, in MiB (`RLIMIT_DATA`: its heap and private writable
    /// mappings, not address space it only reserves, as Node's WebAssembly and Go's heap do;
    /// and, where its cgroup has the memory controller, its cgroup's memory limit, which counts
    /// shared memory and the files it writes to a tmpfs too); 0: unbounded.
    #[serde(default = "default_stdio_max_memory_mb")]
    pub max_memory_mb: u64,
    #[serde(default = "default_stdio_max_open_files")]
    pub max_open_files: u64,
    /// Processes and threads one child may have: its cgroup's `pids.max` (each child has a
    /// cgroup of its own where the gateway can make one: root, or a delegated cgroup), else
    /// `RLIMIT_NPROC`, which counts every process of the child's user.
    #[serde(default = "default_stdio_max_processes")]
    pub max_processes: u64,
    /// Landlock: when either list is given, the child may read only the system folders and
    /// `read_paths`, and write only `write_paths` and its own home folder. Without them it may
    /// read everything and write only its home folder.
    #[serde(default)]
    pub read_paths: Option<Vec<String>>,
    #[serde(default)]
    pub write_paths: Option<Vec<String>>,
    /// The most the child's home folder (its `HOME` and `TMPDIR`, where it may always write)
    /// may hold, in MiB of disk, and at most 100,000 files and folders; read once a second
    /// while the child runs. Past it the child is stopped (its calls fail) and its home
    /// removed: its next start gets a new, empty one. 0: unbounded.
    #[serde(default = "default_stdio_max_home_mb")]
    pub max_home_mb: u64,
    /// The longest line (one JSON-RPC message) read from the child.
    #[serde(default = "default_stdio_max_line_bytes")]
    pub max_line_bytes: usize,
    /// `shared`: one child serves every caller (ids rewritten between them). `caller`: each
    /// caller (tenant and agent) gets a child of its own, for a server that keeps per-user
    /// state; stopped after `idle_shutdown_ms` without a call (0 or unset: 300000).
    #[serde(default)]
    pub children: StdioChildren,
    /// With `children = "caller"`: at most this many children at once; a further caller gets
    /// a 503.
    #[serde(default = "default_stdio_max_children")]
    pub max_children: u32,
}

/// Who a stdio upstream's child serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StdioChildren {
    /// One child for every caller.
    #[default]
    Shared,
    /// One child per caller (tenant and agent).
    Caller,
}

const fn default_stdio_max_children() -> u32 {
    16
}

const fn default_stdio_start_timeout_ms() -> u64 {
    30_000
}
const fn default_stdio_max_memory_mb() -> u64 {
    4096
}
const fn default_stdio_max_home_mb() -> u64 {
    1024
}
const fn default_stdio_max_open_files() -> u64 {
    1024
}
const fn default_stdio_max_processes() -> u64 {
    256
}
const fn default_stdio_max_line_bytes() -> usize {
    16 << 20
}

const fn default_eject_after_failures() -> u32 {
    5
}
const fn default_eject_base_ms() -> u64 {
    10_000
}
const fn default_eject_max_ms() -> u64 {
    300_000
}
const fn default_resolve_every_ms() -> u64 {
    30_000
}
const fn default_connect_timeout_ms() -> u64 {
    2_000
}
const fn default_upstream_timeout_ms() -> u64 {
    30_000
}
const fn default_stream_idle_timeout_ms() -> u64 {
    300_000
}
const fn default_max_idle() -> usize {
    32
}
const fn default_idle_reuse_ms() -> u64 {
    4_000
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Exact request path, e.g. `/mcp` or `/mcp/github`.
    pub path: String,
    /// Passthrough: every message goes to this upstream, sessions relayed. Give either this or
    /// `federate`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Federation: the gateway is one virtual MCP server over these upstreams. It answers
    /// `initialize`, merges the lists, routes each call to its owner by name prefix and keeps one
    /// upstream session per client session per upstream.
    #[serde(default)]
    pub federate: Option<Vec<RawMember>>,
    /// Credentials accepted on this route (any one suffices); none: anyone, with the tenant of
    /// the source address.
    #[serde(default)]
    pub auth: Vec<AuthMethod>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMember {
    pub upstream: String,
    /// Put before this upstream's tool and prompt names (default `<upstream>_`). At most one
    /// member of a route may have an empty prefix: it owns every name no other prefix matches.
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub instance: String,
    #[serde(default)]
    pub workers: usize,
    #[serde(default = "default_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Pin worker i to core i. Right on a dedicated gateway host; on a host shared with other
    /// busy processes, unpinned workers can move away from contention.
    #[serde(default = "yes")]
    pub pin_workers: bool,
}

const fn default_grace_ms() -> u64 {
    5000
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: String,
    /// TLS on this listener; plaintext HTTP without it.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Expect a PROXY protocol header (from a load balancer) before anything else on each
    /// connection: its client address then stands for the connection everywhere.
    #[serde(default)]
    pub proxy_protocol: Option<RawProxyProtocol>,
}

/// `[listeners.proxy_protocol]`: the listener sits behind load balancers that announce each
/// client with a PROXY protocol header.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    /// Source prefixes (CIDR or address) of the balancers. A connection from anywhere else is
    /// closed at once; one from here must start with a valid header.
    pub trusted: Vec<String>,
    /// Which header versions are accepted.
    #[serde(default)]
    pub version: ProxyVersion,
    /// How long a connection may take to send its whole header.
    #[serde(default = "default_proxy_header_timeout_ms")]
    pub header_timeout_ms: u64,
}

const fn default_proxy_header_timeout_ms() -> u64 {
    3000
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: String,
    /// Environment variable holding the admin API's bearer token. Required when the admin
    /// listener is not on loopback; `/healthz` and `/readyz` never need it.
    #[serde(default)]
    pub token_env: Option<String>,
    /// TLS on the admin listener (the same shape as a listener's).
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Admin connections open at once from one address (an IPv6 /64 counts as one), beside
    /// the 128 in all, so that one client cannot keep the others' scrapes and health checks
    /// out. 0: no such cap, for an admin port every client reaches through one address (a
    /// sidecar, a NAT).
    #[serde(default = "default_admin_per_address")]
    pub max_connections_per_address: usize,
}

const fn default_admin_per_address() -> usize {
    crate::admin_server::MAX_PER_ADDRESS
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawKernel {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub mode: AttachMode,
    #[serde(default)]
    pub default_tenant: Option<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    /// Where pins go; the instance name is appended.
    #[serde(default = "default_bpffs")]
    pub bpffs: String,
    /// How often user space re-evaluates the per-tenant connection caps.
    #[serde(default = "default_cap_poll_ms")]
    pub cap_poll_ms: u64,
}

impl Default for RawKernel {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: Vec::new(),
            mode: AttachMode::Auto,
            default_tenant: None,
            deny: Vec::new(),
            bpffs: default_bpffs(),
            cap_poll_ms: default_cap_poll_ms(),
        }
    }
}

const fn yes() -> bool {
    true
}
fn default_bpffs() -> String {
    "/sys/fs/bpf".into()
}
const fn default_cap_poll_ms() -> u64 {
    20
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub name: String,
    /// Stable numeric id: the kernel's counters and buckets are indexed by it, so it survives
    /// renames and reordering.
    pub id: u32,
    #[serde(default)]
    pub sources: Vec<String>,
    /// New connections per second for the whole tenant, enforced by the kernel program; 0: no limit.
    #[serde(default)]
    pub new_connections_per_sec: u64,
    /// New connections admitted at once; default: the rate (one second's worth).
    #[serde(default)]
    pub new_connections_burst: u64,
    /// New connections per second from each source (an IPv4 address, an IPv6 /64); 0: no limit.
    #[serde(default)]
    pub per_source_new_connections_per_sec: u64,
    /// Default: the rate (one second's worth).
    #[serde(default)]
    pub per_source_new_connections_burst: u64,
    #[serde(default)]
    pub max_connections: Option<u64>,
    /// Connections open at once from one source (an IPv4 address, an IPv6 /64; behind a
    /// balancer, the client its PROXY header names): a new one past it is answered 503, so that
    /// one source cannot take the tenant's `max_connections` from the others. Default: no cap.
    #[serde(default)]
    pub max_connections_per_source: Option<u64>,
    /// This tenant's rules and limits, before the `[policy]` defaults.
    #[serde(default)]
    pub policy: Option<RawPolicy>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub instance: String,
    pub workers: usize,
    pub pin_workers: bool,
    pub shutdown_grace: Duration,
    pub listeners: Vec<Listener>,
    pub admin: SocketAddr,
    pub admin_tls: Option<Tls>,
    /// Bearer token of the admin API, if any.
    pub admin_token: Option<String>,
    /// Admin connections at once from one address (`usize::MAX`: no such cap).
    pub admin_per_address: usize,
    pub telemetry: TelemetryConfig,
    pub kernel: KernelConfig,
    /// Sorted by id.
    pub tenants: Vec<Tenant>,
    pub default_tenant: u32,
    pub http: HttpConfig,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub auth: RawAuth,
    /// The JWKS document named by `auth.jwt.jwks_file`, read at load.
    pub jwks: Option<String>,
    pub policy: RawPolicy,
    pub audit: RawAudit,
    pub auto_ban: Option<RawAutoBan>,
    pub state: StateConfig,
}

/// One client-facing listener. Workers know it by its index in [`Config::listeners`].
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: Option<Tls>,
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// A listener's PROXY protocol settings (see [`RawProxyProtocol`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyProtocol {
    pub trusted: Vec<IpNet>,
    pub version: ProxyVersion,
    pub header_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    pub enabled: bool,
    pub max_tools: usize,
    pub histogram_log: Option<std::path::PathBuf>,
    pub otlp: Option<OtlpConfig>,
    pub access_log: Option<RawAccessLog>,
}

/// Validated `[telemetry.otlp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    pub endpoint: String,
    pub sample_ratio: f64,
    pub always_sample_errors: bool,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub batch_max: usize,
    pub queue_max: usize,
    pub service_name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub allowed_origins: Vec<String>,
    pub cors: crate::http::cors::Cors,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub url: String,
    /// Where to connect: every address of every configured URL (resolved at load, then again
    /// in the background), balanced, with their health and sessions.
    pub replicas: std::sync::Arc<crate::endpoints::Replicas>,
    /// `Host` header value: the URL's authority, or `server_name` (with the URL's port).
    pub authority: String,
    /// TLS for an https upstream; `None` for http.
    pub tls: Option<std::sync::Arc<crate::endpoints::UpstreamTls>>,
    /// Identity for the connection pool: a digest of the name, URL and TLS settings.
    pub key: u64,
    /// Request target on the upstream.
    pub path: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub stream_idle_timeout: Duration,
    /// `Authorization` value sent upstream, if any.
    pub authorization: Option<String>,
    pub max_idle: usize,
    /// See [`RawUpstream::idle_reuse_ms`].
    pub idle_reuse: Duration,
    pub breaker: Option<RawBreaker>,
    /// A stdio upstream (run as a child process); `None` for http and https. The HTTP fields
    /// above are then unused.
    pub stdio: Option<std::sync::Arc<crate::stdio::StdioSpec>>,
    pub era: UpstreamEra,
    pub held_session: HeldScope,
    /// See [`RawUpstream::closing_cancels`].
    pub closing_cancels: bool,
    /// See [`RawUpstream::relay_response_headers`].
    pub relay_headers: crate::http::relayed::Relayed,
}

/// An upstream's identity for the connection pool ([`Upstream::key`]): its name, URL, `Host`
/// and TLS (the digest of its settings and files).
pub fn pool_key(
    name: &str,
    url: &str,
    authority: &str,
    tls: Option<&crate::endpoints::UpstreamTls>,
) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    (name, url, authority).hash(&mut h);
    tls.map(|t| t.fingerprint).hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub path: String,
    pub target: Target,
    pub auth: Vec<AuthMethod>,
    /// An upstream's URL has a query of its own (a key, a tenant): a request to the route
    /// takes none, since a client's parameters after the operator's would override them for
    /// the servers that read the last of two (Starlette's).
    pub upstream_query: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Index into [`Config::upstreams`].
    Passthrough(usize),
    Federation(Vec<Member>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KernelConfig {
    pub enabled: bool,
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub deny: Vec<IpNet>,
    pub pin_dir: std::path::PathBuf,
    pub cap_poll: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    pub id: u32,
    pub sources: Vec<IpNet>,
    pub new_connections_per_sec: u64,
    pub new_connections_burst: u64,
    pub per_source_new_connections_per_sec: u64,
    pub per_source_new_connections_burst: u64,
    pub max_connections: Option<u64>,
    pub max_connections_per_source: Option<u64>,
    pub policy: Option<RawPolicy>,
}

/// The burst of a rate: as configured, else the rate itself (one second's worth), at least 1.
fn default_burst(rate: u64, burst: u64) -> u64 {
    if burst == 0 { rate.max(1) } else { burst }
}

/// Whether the gateway could append to the log file `path` (an existing file it may write, or
/// a new one in a directory it may write), found out without creating or changing anything.
fn writable_log_path(path: &Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    if path.exists() {
        return access(path, AccessFlags::W_OK).map_err(|e| e.desc().to_owned());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!("the directory {} does not exist", dir.display()));
    }
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| format!("the directory {}: {}", dir.display(), e.desc()))
}

/// Lowercase hex SHA-256 of `bytes`: how `[[auth.api_keys]] sha256` names a key, and how tool
/// pins are written.
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The JSON schema of the configuration file (kept in docs/config.schema.json, checked for drift
/// by a test).
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(RawConfig);
    serde_json::to_string_pretty(&schema).expect("a schema serializes") + "\n"
}

impl Config {
    pub fn tenant(&self, id: u32) -> Option<&Tenant> {
        self.tenants
            .binary_search_by_key(&id, |t| t.id)
            .ok()
            .map(|i| &self.tenants[i])
    }

    /// `t`'s new-connection limits as GCRA parameters, for one of `live_hosts` gateways of a
    /// fleet (`[state] redis`; alone, the whole): the tenant's rate and burst are this host's
    /// share, `÷ hosts`, so that the fleet as a whole admits about the configured rate.
    /// Per-source rates stay whole: a source's connections usually reach one host (a
    /// balancer's affinity, one DNS answer), and a share would refuse it at a rate it never
    /// spreads across. The kernel program's buckets and the workers' are set from these.
    pub fn connection_limits(&self, t: &Tenant, live_hosts: u64) -> gateway_common::TenantLimits {
        let hosts = if self.state.fleet.is_some() {
            live_hosts.max(1)
        } else {
            1
        };
        let (ci, ct) = gateway_common::TenantLimits::gcra_share(
            t.new_connections_per_sec,
            t.new_connections_burst,
            hosts,
        );
        let (si, st) = gateway_common::TenantLimits::gcra(
            t.per_source_new_connections_per_sec,
            t.per_source_new_connections_burst,
        );
        gateway_common::TenantLimits {
            conn_interval_ns: ci,
            conn_tolerance_ns: ct,
            source_interval_ns: si,
            source_tolerance_ns: st,
        }
    }

    /// The gateway's listening ports, which the kernel program guards.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.listeners.iter().map(|l| l.address.port()).collect()
    }
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|e| invalid(key, format!("`{text}` is not an address:port ({e})")))
}

/// An upstream URL taken apart.
struct Url {
    https: bool,
    /// As written in the URL (the `Host` header).
    authority: String,
    /// Without brackets around an IPv6 address.
    host: String,
    port: u16,
    explicit_port: bool,
    path: String,
}

/// A stdio upstream's spec from its configuration; errors name the field.
fn stdio_spec(
    name: &str,
    command: &[String],
    raw: Option<RawStdio>,
    call_timeout_ms: u64,
) -> Result<crate::stdio::StdioSpec, (&'static str, String)> {
    if command.first().is_none_or(String::is_empty) {
        return Err(("command", "names no program".into()));
    }
    let raw = raw.unwrap_or(RawStdio {
        env: Default::default(),
        cwd: None,
        uid: None,
        gid: None,
        start_timeout_ms: default_stdio_start_timeout_ms(),
        idle_shutdown_ms: 0,
        max_memory_mb: default_stdio_max_memory_mb(),
        max_open_files: default_stdio_max_open_files(),
        max_processes: default_stdio_max_processes(),
        read_paths: None,
        write_paths: None,
        max_home_mb: default_stdio_max_home_mb(),
        max_line_bytes: default_stdio_max_line_bytes(),
        children: StdioChildren::Shared,
        max_children: default_stdio_max_children(),
    });
    if raw.uid.is_some() != raw.gid.is_some() {
        return Err(("stdio.uid", "give `uid` and `gid` together".into()));
    }
    if raw.start_timeout_ms == 0 {
        return Err(("stdio.start_timeout_ms", "must be above 0".into()));
    }
    if raw.max_line_bytes < 1024 {
        return Err(("stdio.max_line_bytes", "must be at least 1024".into()));
    }
    if raw.children == StdioChildren::Caller && !(1..=1024).contains(&raw.max_children) {
        return Err(("stdio.max_children", "must be from 1 to 1024".into()));
    }
    if let Some(path) = raw
        .write_paths
        .iter()
        .flatten()
        .find_map(|p| crate::stdio::cgroups_under(std::path::Path::new(p)).map(|m| (p, m)))
    {
        return Err((
            "stdio.write_paths",
            format!(
                "{} would let a child write the cgroups at {} (leave its own, raise its limit, \
                 end the gateway)",
                path.0,
                path.1.display()
            ),
        ));
    }
    let mut spec = crate::stdio::StdioSpec::new(name, command.to_vec());
    spec.per_caller = (raw.children == StdioChildren::Caller).then_some(raw.max_children);
    spec.env = raw.env.into_iter().collect();
    spec.cwd = raw.cwd.map(std::path::PathBuf::from);
    spec.start_timeout = Duration::from_millis(raw.start_timeout_ms);
    spec.call_timeout = Duration::from_millis(call_timeout_ms);
    spec.idle_shutdown =
        (raw.idle_shutdown_ms > 0).then(|| Duration::from_millis(raw.idle_shutdown_ms));
    spec.max_line_bytes = raw.max_line_bytes;
    spec.sandbox = crate::stdio::SandboxSpec {
        user: raw.uid.zip(raw.gid),
        max_memory_bytes: raw.max_memory_mb << 20,
        max_open_files: raw.max_open_files,
        max_processes: raw.max_processes,
        max_home_bytes: raw.max_home_mb.saturating_mul(1 << 20),
        landlock: (raw.read_paths.is_some() || raw.write_paths.is_some()).then(|| {
            crate::stdio::FsAccess {
                read: raw
                    .read_paths
                    .unwrap_or_default()
                    .into_iter()
                    .map(Into::into)
                    .collect(),
                write: raw
                    .write_paths
                    .unwrap_or_default()
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            }
        }),
    };
    Ok(spec)
}

fn parse_url(url: &str) -> Result<Url, String> {
    let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!(
            "`{url}`: only http:// and https:// URLs are supported"
        ));
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return Err(format!("`{url}`: a host (and port) must follow the scheme"));
    }
    // It goes into every request line as it is written here.
    if path.contains('#') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!(
            "`{url}`: a path and query without spaces, control characters or a fragment (`#`)"
        ));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port_number = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{url}`: `{p}` is not a port"))?,
        None if https => 443,
        None => 80,
    };
    Ok(Url {
        https,
        authority: authority.to_owned(),
        host: host.to_owned(),
        port: port_number,
        explicit_port: port.is_some(),
        path,
    })
}

fn parse_net(key: &str, text: &str) -> Result<IpNet, ConfigError> {
    let net: IpNet = text
        .parse()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|e| invalid(key, format!("`{text}` is not a CIDR or address ({e})")))?;
    if net.trunc() != net {
        return Err(invalid(
            key,
            format!(
                "`{text}` has host bits set; did you mean `{}`?",
                net.trunc()
            ),
        ));
    }
    // The kernel's maps and the workers key an IPv4 client by its IPv4 address: a prefix
    // written IPv4-mapped (`::ffff:a.b.c.d/n`) would never match one.
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        return Err(invalid(
            key,
            format!(
                "`{text}` is an IPv4-mapped IPv6 prefix, which no client address matches; write `{v4}/{}`",
                v6.prefix_len() - 96
            ),
        ));
    }
    Ok(net)
}

/// [`parse_net`] for a prefix the kernel's maps take (tenant sources, the deny list).
fn parse_kernel_net(key: &str, text: &str) -> Result<IpNet, ConfigError> {
    let net = parse_net(key, text)?;
    match covers_ipv4(&net) {
        Some(problem) => Err(invalid(key, format!("`{text}` {problem}"))),
        None => Ok(net),
    }
}

/// Why an IPv6 prefix cannot be given where the kernel's maps take it (tenant sources, the deny
/// list, a ban), or `None`. One shorter than /96 that holds `::ffff:0:0/96` holds every IPv4
/// address in the kernel's maps, which key IPv4 in its IPv4-mapped form, while the workers
/// compare an IPv4 client with IPv4 prefixes only: the two would disagree on every IPv4 client.
pub fn covers_ipv4(net: &IpNet) -> Option<String> {
    const MAPPED: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0);
    match net {
        IpNet::V6(v6) if v6.prefix_len() < 96 && v6.contains(&MAPPED) => Some(format!(
            "also holds ::ffff:0:0/96, so the kernel would read it as every IPv4 address too; \
             name the IPv6 prefixes meant (`2000::/3` is every global unicast address) and IPv4 \
             ones apart (`0.0.0.0/0`), or split `{}` around ::ffff:0:0/96",
            net.trunc()
        )),
        _ => None,
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
