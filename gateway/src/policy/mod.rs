//! Fine-grained policy, decided on the worker that holds the request, without locks: who is
//! calling (API key, JWT or source address), which tools they may see and call with which
//! arguments, and the limits shared by all workers (rates, concurrency, budgets, the loop
//! breaker). Every decision goes to the audit log.
// The request path: input from clients and upstreams must never panic here (a panic that
// still happens is contained per request in `conn::serve`, but it is a defect).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

mod admit;
pub mod audit;
pub mod breaker;
pub mod declared;
pub mod limits;
pub mod mtls;
pub mod pins;
pub mod rejudge;
pub mod rules;

use std::{collections::HashMap, sync::Arc, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::config::{
    Action, AuthMethod, Config, ConfigError, RawBudget, RawLoopBreaker, RawPolicy, Route,
};
pub use admit::{Admission, Ask};
use rules::{MethodRule, ToolRule};

/// Gateway-defined JSON-RPC codes for refusals (server error range).
pub mod code {
    pub const UNAUTHENTICATED: i64 = -32040;
    pub const FORBIDDEN: i64 = -32041;
    pub const RATE_LIMITED: i64 = -32042;
    pub const BUDGET_EXHAUSTED: i64 = -32043;
    pub const LOOP_DETECTED: i64 = -32044;
    pub const CIRCUIT_OPEN: i64 = -32045;
    pub const PENDING_APPROVAL: i64 = -32046;
    /// The fleet's shared state (Redis) cannot be reached, and budgets fail closed.
    pub const STATE_UNAVAILABLE: i64 = -32047;
    /// JSON-RPC's own: the request is malformed (here: an identity header given twice).
    pub const INVALID_REQUEST: i64 = -32600;
}

/// A refusal: what the client is told, and which rule decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub code: i64,
    /// The configuration key of the rule, e.g. `tenants[acme].policy.tools[1].arguments[0]`.
    pub rule: String,
    pub message: String,
    pub retry_after: Option<Duration>,
    pub www_authenticate: Option<String>,
    pub budget: Option<Value>,
    /// No credential was presented (a 401 asking for one): not counted towards a ban when a
    /// browser says it sent it, since a web page's `<img>` makes its visitors' browsers send
    /// such requests (a review).
    pub anonymous: bool,
}

impl Refusal {
    pub fn new(
        status: u16,
        code: i64,
        rule: impl Into<String>,
        message: impl Into<String>,
    ) -> Box<Self> {
        Box::new(Self {
            status,
            code,
            rule: rule.into(),
            message: message.into(),
            retry_after: None,
            www_authenticate: None,
            budget: None,
            anonymous: false,
        })
    }

    pub fn retry(mut self: Box<Self>, after: Duration) -> Box<Self> {
        self.retry_after = Some(after);
        self
    }

    /// The JSON-RPC `error.data` of this refusal.
    pub fn data(&self) -> Value {
        let mut d = json!({ "rule": self.rule });
        if let Some(r) = self.retry_after {
            d["retryAfterMs"] = json!(u64::try_from(r.as_millis()).unwrap_or(u64::MAX).max(1));
        }
        if let Some(b) = &self.budget {
            d["budgetRemaining"] = b.clone();
        }
        d
    }
}

/// How a caller was identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    ApiKey,
    Jwt,
    Address,
    /// A client certificate (`[[auth.mtls]]`).
    Mtls,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Index into [`Policy::tenants`].
    pub tenant: usize,
    pub agent: Option<String>,
    pub run: Option<String>,
    /// Whether `run` is a signed token's (a run every token naming it shares); else it is
    /// the header's, the caller's own: another caller naming it has a run of its own (an
    /// attacker's review: any agent of a tenant spent another's run budget, a signed run's
    /// too, by naming it in the header).
    pub run_signed: bool,
    pub via: Via,
    /// What keeps a caller no agent names apart from its tenant's other callers (their
    /// sessions, event ids, per-caller children and held sessions, tasks): the credential
    /// itself (an API key's digest, a certificate's mapped names, a token's subject), marked
    /// with its kind. `None` with an agent, and for callers known by their address alone (a
    /// tenant's one anonymous caller).
    pub own: Option<String>,
}

/// One credential of a request, and whom it names.
struct Credential {
    tenant: usize,
    agent: Option<String>,
    /// The run a signed token names.
    run: Option<String>,
    via: Via,
    /// [`Identity::own`], for a credential that names no agent.
    own: Option<String>,
    /// What it was, to be judged again by a later configuration (`None`: the address).
    proof: Option<rejudge::Proof>,
}

/// Whom a configured API key names ([`Identity`]'s parts), made once when the policy is
/// compiled.
struct KeyCaller {
    tenant: usize,
    agent: Option<String>,
    own: Option<String>,
}

/// What a valid token names.
struct JwtCaller {
    tenant: usize,
    agent: Option<String>,
    run: Option<String>,
    /// [`Identity::own`]: its subject, when it names no agent.
    own: Option<String>,
    /// The print of the key that signed it ([`JwtKey::print`]).
    key: [u8; 32],
}

/// Headers that say who is calling or whose state a request uses, besides each tenant's run
/// header: each may appear at most once.
const IDENTITY_HEADERS: [&str; 3] = ["authorization", "x-api-key", "mcp-session-id"];

/// The first value of header `name` (case-insensitive), trimmed; `None` when absent or not UTF-8.
fn header_value<'h, 'n>(
    headers: &'h crate::http::Fields,
    name: impl crate::http::FieldName<'n>,
) -> Option<&'h str> {
    headers.get_str(name).map(str::trim)
}

/// A run id is the client's to choose: at most this long, and at most [`MAX_RUNS`] of them
/// counted per tenant at a time (each is a budget window, kept and shared with the fleet).
pub const MAX_RUN_ID_BYTES: usize = 128;
pub const MAX_RUNS: usize = 2_048;
/// The rule cache's bounds: entries, and bytes of keys (names are capped at parse time, URIs
/// are longer), so that client-chosen names cannot grow it past about 1 MiB per tenant.
const MAX_MATCHED: usize = 10_000;
const MAX_MATCHED_BYTES: usize = 1 << 20;

pub use crate::config::sha256_hex;

/// One tenant's compiled rules and limits: its own rules, then the defaults'.
#[derive(Debug)]
pub struct TenantPolicy {
    pub name: String,
    /// The tenant's own rules, matched first.
    own: Vec<ToolRule>,
    /// The rules of `[policy]`, compiled once per configuration and shared by every tenant
    /// (a rule's rate and concurrency are keyed by tenant and label, so sharing the compiled
    /// matcher shares no limit).
    global: Arc<[ToolRule]>,
    /// Method rules: the tenant's own, then `[policy]`'s (compiled once, shared).
    own_methods: Vec<MethodRule>,
    global_methods: Arc<[MethodRule]>,
    pub default_action: Action,
    /// (requests per second, burst) for the tenant, and for each of its agents.
    pub rate: Option<(u64, u64)>,
    pub agent_rate: Option<(u64, u64)>,
    pub max_concurrent: Option<u32>,
    pub budget: Option<RawBudget>,
    pub loop_breaker: Option<RawLoopBreaker>,
    pub run_header: String,
    /// Whether any decision of this tenant's reads a call's arguments (an argument rule, a
    /// size cap, the loop breaker): if none does, they are not taken out of the message.
    pub needs_arguments: bool,
    /// `<upstream>/<tool>` → what the rules covering it decide: globs run once per tool name.
    matched: papaya::HashMap<String, Resolved, foldhash::fast::RandomState>,
    /// Bytes of the keys in `matched`.
    matched_bytes: std::sync::atomic::AtomicUsize,
}

impl TenantPolicy {
    /// The rules of `[policy]`, compiled once for every tenant.
    fn compile_global(defaults: &RawPolicy) -> Result<GlobalRules, (String, String)> {
        let mut tools: Vec<ToolRule> = defaults
            .tools
            .iter()
            .enumerate()
            .map(|(i, r)| ToolRule::compile(format!("policy.tools[{i}]"), r))
            .collect::<Result<_, _>>()?;
        rules::name_counters(&mut tools, "policy");
        Ok(GlobalRules {
            tools: tools.into(),
            methods: defaults
                .methods
                .iter()
                .enumerate()
                .map(|(i, r)| MethodRule::compile(format!("policy.methods[{i}]"), r))
                .collect::<Result<_, _>>()?,
        })
    }

    fn compile(
        name: &str,
        own: Option<&RawPolicy>,
        defaults: &RawPolicy,
        shared: &GlobalRules,
    ) -> Result<Self, (String, String)> {
        let global = &shared.tools;
        let own_methods = own
            .map(|o| &o.methods[..])
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, r)| MethodRule::compile(format!("tenants[{name}].policy.methods[{i}]"), r))
            .collect::<Result<_, _>>()?;
        let mut rules = Vec::new();
        if let Some(own) = own {
            for (i, r) in own.tools.iter().enumerate() {
                rules.push(ToolRule::compile(
                    format!("tenants[{name}].policy.tools[{i}]"),
                    r,
                )?);
            }
            rules::name_counters(&mut rules, "tenant");
        }
        let pick = |f: fn(&RawPolicy) -> Option<u64>| own.and_then(f).or_else(|| f(defaults));
        let rate = |r: Option<u64>, b: Option<u64>, key: &str| match (r, b) {
            (Some(0), _) => Err((key.to_owned(), "0 would refuse everything".to_owned())),
            (Some(r), b) => Ok(Some((r, b.unwrap_or(r).max(1)))),
            (None, Some(_)) => Err((key.to_owned(), "a burst needs a rate".to_owned())),
            (None, None) => Ok(None),
        };
        let scope = if own.is_some() {
            format!("tenants[{name}].policy")
        } else {
            "policy".into()
        };
        let budget = own
            .and_then(|o| o.budget.clone())
            .or_else(|| defaults.budget.clone());
        if let Some(b) = &budget
            && b.window_s == 0
        {
            return Err((format!("{scope}.budget.window_s"), "must be above 0".into()));
        }
        let loop_breaker = own
            .and_then(|o| o.loop_breaker.clone())
            .or_else(|| defaults.loop_breaker.clone());
        if let Some(l) = &loop_breaker
            && (l.window_s == 0
                || l.max_repeats == 0
                || u64::from(l.max_repeats) >= limits::LOOP_COUNT_MAX)
        {
            return Err((
                format!("{scope}.loop_breaker"),
                format!(
                    "`window_s` and `max_repeats` must be above 0, `max_repeats` below {}",
                    limits::LOOP_COUNT_MAX
                ),
            ));
        }
        let needs_arguments = loop_breaker.is_some()
            || rules.iter().any(ToolRule::checks_arguments)
            || global.iter().any(ToolRule::checks_arguments);
        Ok(Self {
            name: name.to_owned(),
            own: rules,
            global: Arc::clone(global),
            own_methods,
            global_methods: Arc::clone(&shared.methods),
            needs_arguments,
            default_action: own
                .and_then(|o| o.default_action)
                .or(defaults.default_action)
                .unwrap_or_default(),
            rate: rate(
                pick(|p| p.requests_per_sec),
                pick(|p| p.burst),
                &format!("{scope}.requests_per_sec"),
            )?,
            agent_rate: rate(
                pick(|p| p.agent_requests_per_sec),
                pick(|p| p.agent_burst),
                &format!("{scope}.agent_requests_per_sec"),
            )?,
            max_concurrent: own
                .and_then(|o| o.max_concurrent)
                .or(defaults.max_concurrent),
            budget,
            loop_breaker,
            run_header: own
                .and_then(|o| o.run_header.clone())
                .or_else(|| defaults.run_header.clone())
                .unwrap_or_else(|| "mcp-run-id".into())
                .to_ascii_lowercase(),
            matched: papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()),
            matched_bytes: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Every rule in the order they are matched: the tenant's own, then `[policy]`'s.
    pub fn rules(&self) -> impl Iterator<Item = &ToolRule> {
        self.own.iter().chain(self.global.iter())
    }

    /// The rule at `i` of [`TenantPolicy::rules`].
    fn rule(&self, i: u32) -> Option<&ToolRule> {
        let i = i as usize;
        self.own
            .get(i)
            .or_else(|| self.global.get(i.checked_sub(self.own.len())?))
    }

    /// What the rules covering the tool decide: each setting from the first of them that
    /// has it, the argument checks of all.
    pub fn applied(&self, upstream: &str, tool: &str) -> Applied<'_> {
        if self.own.is_empty() && self.global.is_empty() {
            return self.apply(Resolved::default());
        }
        let mut key = String::with_capacity(upstream.len() + tool.len() + 1);
        key.push_str(upstream);
        key.push('/');
        key.push_str(tool);
        let map = self.matched.pin();
        let resolved = match map.get(&key) {
            Some(r) => r.clone(),
            None => {
                let r = self.resolve(upstream, tool);
                // Tool names come from clients: the cache stops growing at a bound.
                if map.len() < MAX_MATCHED && self.charge_matched(key.len()) {
                    map.insert(key, r.clone());
                }
                r
            }
        };
        self.apply(resolved)
    }

    /// Runs every rule's globs over the tool.
    fn resolve(&self, upstream: &str, tool: &str) -> Resolved {
        let mut r = Resolved::default();
        for (i, rule) in (0u32..).zip(self.rules()) {
            if !rule.matches(upstream, tool) {
                continue;
            }
            r.first.get_or_insert(i);
            if rule.action.is_some() {
                r.action.get_or_insert(i);
            }
            if rule.cost.is_some() {
                r.cost.get_or_insert(i);
            }
            if rule.limits() {
                r.limiting.push(i);
            }
        }
        r
    }

    fn apply(&self, r: Resolved) -> Applied<'_> {
        let rule = |i: Option<u32>| i.and_then(|i| self.rule(i));
        let action_rule = rule(r.action);
        Applied {
            first: rule(r.first),
            action: action_rule
                .and_then(|a| a.action)
                .unwrap_or(self.default_action),
            action_rule,
            cost: rule(r.cost).and_then(|c| c.cost).unwrap_or(1),
            limiting: r.limiting,
            policy: self,
        }
    }

    /// Takes `bytes` from the rule cache's byte bound; false when they do not fit.
    fn charge_matched(&self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.matched_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(bytes).filter(|n| *n <= MAX_MATCHED_BYTES)
            })
            .is_ok()
    }

    /// Entries and key bytes of the rule cache (for the bounds' tests).
    #[cfg(test)]
    pub fn matched_size(&self) -> (usize, usize) {
        (
            self.matched.pin().len(),
            self.matched_bytes
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// Whether the tool is offered to this tenant at all.
    pub fn allows(&self, upstream: &str, tool: &str) -> bool {
        self.applied(upstream, tool).action == Action::Allow
    }

    /// The first method rule covering `method`, if any.
    pub fn method_rule(&self, method: &str) -> Option<&MethodRule> {
        self.own_methods
            .iter()
            .chain(self.global_methods.iter())
            .find(|r| r.matches(method))
    }

    /// Says, at each load, which of the rules of a tenant that denies by default set no
    /// `action`: they offer nothing by themselves (before, such a rule allowed its tools).
    fn warn_undecided(&self) {
        if self.default_action != Action::Deny {
            return;
        }
        let undecided: Vec<&str> = self
            .rules()
            .filter(|r| r.action.is_none())
            .map(|r| r.label.as_str())
            .collect();
        if let Some(first) = undecided.first() {
            tracing::warn!(
                tenant = %self.name,
                rules = undecided.len(),
                first,
                "tool rules without `action` under `default_action = \"deny\"` offer no tool by themselves: a tool only they cover stays denied; add `action = \"allow\"` to offer it"
            );
        }
    }

    /// Whether any rule or the default hides a tool (lists then need filtering).
    pub fn filters(&self) -> bool {
        self.default_action == Action::Deny || self.rules().any(|r| r.action == Some(Action::Deny))
    }
}

/// What the rules covering one tool decide, as indices into [`TenantPolicy::rules`].
#[derive(Debug, Clone, Default)]
struct Resolved {
    first: Option<u32>,
    action: Option<u32>,
    cost: Option<u32>,
    /// Every covering rule that limits a call (inline: a copy per call, no allocation).
    limiting: smallvec::SmallVec<[u32; 4]>,
}

/// What the rules covering one tool decide for a tenant. Whether the tool is offered and its
/// cost are each taken from the first covering rule that sets them (the tenant's own first),
/// else the tenant's `default_action` and 1; every covering rule's limits apply (argument
/// checks, size cap, rate, concurrency): a rule written for a cost or a check allows nothing a
/// later rule denies, and takes no later rule's limit away (an operator's review: a tenant's
/// `cost` on a tool had allowed what `[policy]` denied; an attacker's: a tenant's rate over
/// `u0/*` had lifted `[policy]`'s lower one on a tool).
pub struct Applied<'a> {
    /// The first covering rule: named in the audit log as the rule that applied.
    pub first: Option<&'a ToolRule>,
    pub action: Action,
    /// The rule that decided `action`; `None`: the tenant's `default_action` did.
    pub action_rule: Option<&'a ToolRule>,
    pub cost: u64,
    limiting: smallvec::SmallVec<[u32; 4]>,
    policy: &'a TenantPolicy,
}

impl<'a> Applied<'a> {
    /// The covering rules that limit a call, in order.
    pub fn limiting(&self) -> impl Iterator<Item = &'a ToolRule> + '_ {
        let policy = self.policy;
        self.limiting.iter().filter_map(move |&i| policy.rule(i))
    }
}

/// The rules of `[policy]`, compiled once per configuration and shared by every tenant.
struct GlobalRules {
    tools: Arc<[ToolRule]>,
    methods: Arc<[MethodRule]>,
}

struct JwtKey {
    kid: Option<String>,
    /// SHA-256 of the JWK as configured: what a connection's token is judged by again after a
    /// reload ([`rejudge`]), the token itself not kept.
    print: [u8; 32],
    key: DecodingKey,
    /// The key's own algorithm, when the JWK names one.
    alg: Option<Algorithm>,
}

struct Jwt {
    keys: Vec<JwtKey>,
    validation: Validation,
    tenant_claim: String,
    agent_claim: Option<String>,
    run_claim: Option<String>,
}

/// The compiled policy of one configuration snapshot.
pub struct Policy {
    /// The configured tenants in configuration order, then the default tenant if it is not one
    /// of them.
    pub tenants: Vec<TenantPolicy>,
    by_id: HashMap<u32, usize>,
    by_name: HashMap<String, usize>,
    default_tenant: usize,
    /// SHA-256 of each key → (tenant, agent).
    api_keys: HashMap<[u8; 32], KeyCaller>,
    jwt: Option<Jwt>,
    /// Client certificate names → (tenant, agent).
    mtls: mtls::Mapping,
    /// [`IDENTITY_HEADERS`] and every tenant's run header, lowercase.
    identity_headers: Vec<String>,
    pub metadata: crate::config::RawResourceMetadata,
    /// Tool pinning on, and the pins given in the configuration (`<upstream>/<tool>` → digest).
    pub pinning: bool,
    configured_pins: HashMap<String, String>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("tenants", &self.tenants)
            .field("api_keys", &self.api_keys.len())
            .field("jwt", &self.jwt.is_some())
            .finish_non_exhaustive()
    }
}

fn err((key, problem): (String, String)) -> ConfigError {
    ConfigError::Invalid { key, problem }
}

impl Policy {
    /// Compiles the policy parts of a configuration; what cannot be compiled is reported with
    /// its key.
    pub fn compile(c: &Config) -> Result<Self, ConfigError> {
        let mut tenants = Vec::new();
        let mut by_id = HashMap::new();
        let mut by_name = HashMap::new();
        let global = TenantPolicy::compile_global(&c.policy).map_err(err)?;
        for t in &c.tenants {
            by_id.insert(t.id, tenants.len());
            by_name.insert(t.name.clone(), tenants.len());
            tenants.push(
                TenantPolicy::compile(&t.name, t.policy.as_ref(), &c.policy, &global)
                    .map_err(err)?,
            );
        }
        let default_tenant = match by_id.get(&c.default_tenant) {
            Some(i) => *i,
            None => {
                by_name.insert("default".into(), tenants.len());
                tenants
                    .push(TenantPolicy::compile("default", None, &c.policy, &global).map_err(err)?);
                tenants.len() - 1
            }
        };
        for t in &tenants {
            t.warn_undecided();
        }
        let mut api_keys = HashMap::new();
        for (i, k) in c.auth.api_keys.iter().enumerate() {
            let key = |f: &str| format!("auth.api_keys[{i}].{f}");
            let mut digest = [0u8; 32];
            let hex = k.sha256.as_bytes();
            if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(err((
                    key("sha256"),
                    "64 hex digits (printf %s \"$KEY\" | sha256sum)".into(),
                )));
            }
            for (d, pair) in digest.iter_mut().zip(hex.chunks(2)) {
                // Checked above: ASCII hex digits.
                *d = std::str::from_utf8(pair)
                    .ok()
                    .and_then(|s| u8::from_str_radix(s, 16).ok())
                    .unwrap_or_default();
            }
            let Some(tenant) = by_name.get(&k.tenant) else {
                return Err(err((
                    key("tenant"),
                    format!("no tenant is named `{}`", k.tenant),
                )));
            };
            let caller = KeyCaller {
                tenant: *tenant,
                agent: k.agent.clone(),
                // Half the digest: as unique among a configuration's keys as the whole.
                own: k.agent.is_none().then(|| {
                    let mut half = [0u8; 16];
                    half.copy_from_slice(&digest[..16]);
                    format!("key:{:032x}", u128::from_be_bytes(half))
                }),
            };
            if api_keys.insert(digest, caller).is_some() {
                return Err(err((key("sha256"), "the same key is listed twice".into())));
            }
        }
        let jwt = match (&c.auth.jwt, &c.jwks) {
            (Some(j), Some(text)) => {
                let set: JwkSet = serde_json::from_str(text).map_err(|e| {
                    err((
                        "auth.jwt.jwks_file".into(),
                        format!("not a JWKS document: {e}"),
                    ))
                })?;
                if set.keys.is_empty() {
                    return Err(err(("auth.jwt.jwks_file".into(), "holds no key".into())));
                }
                let mut keys = Vec::new();
                for (i, jwk) in set.keys.iter().enumerate() {
                    let key = DecodingKey::from_jwk(jwk)
                        .map_err(|e| err(("auth.jwt.jwks_file".into(), format!("key {i}: {e}"))))?;
                    let alg = jwk
                        .common
                        .key_algorithm
                        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                    let print = serde_json::to_vec(jwk)
                        .map(|json| <[u8; 32]>::from(Sha256::digest(json)))
                        .unwrap_or_default();
                    keys.push(JwtKey {
                        kid: jwk.common.key_id.clone(),
                        print,
                        key,
                        alg,
                    });
                }
                let mut validation = Validation::new(Algorithm::RS256);
                validation.algorithms = vec![Algorithm::HS256, Algorithm::RS256, Algorithm::ES256];
                validation.leeway = j.leeway_s;
                validation.validate_nbf = true;
                // A configured issuer or audience is required: jsonwebtoken checks them only
                // when the token has them.
                let mut required = vec!["exp"];
                match &j.issuer {
                    Some(iss) => {
                        validation.set_issuer(&[iss]);
                        required.push("iss");
                    }
                    None => validation.iss = None,
                }
                match &j.audience {
                    Some(aud) => {
                        validation.set_audience(&[aud]);
                        required.push("aud");
                    }
                    None => validation.validate_aud = false,
                }
                validation.set_required_spec_claims(&required);
                Some(Jwt {
                    keys,
                    validation,
                    tenant_claim: j.tenant_claim.clone(),
                    agent_claim: j.agent_claim.clone(),
                    run_claim: j.run_claim.clone(),
                })
            }
            _ => None,
        };
        let mut configured_pins = HashMap::new();
        for (i, pin) in c.policy.pins.iter().enumerate() {
            if !c.upstreams.iter().any(|u| u.name == pin.upstream) {
                return Err(err((
                    format!("policy.pins[{i}].upstream"),
                    format!("no upstream is named `{}`", pin.upstream),
                )));
            }
            if pin.sha256.len() != 64 || !pin.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err((
                    format!("policy.pins[{i}].sha256"),
                    "64 hex digits".into(),
                )));
            }
            configured_pins.insert(
                format!("{}/{}", pin.upstream, pin.tool),
                pin.sha256.to_ascii_lowercase(),
            );
        }
        for (t, raw) in c
            .tenants
            .iter()
            .filter_map(|t| t.policy.as_ref().map(|p| (t, p)))
        {
            if raw.pin_tools.is_some() || !raw.pins.is_empty() {
                return Err(err((
                    format!("tenants[{}].policy.pin_tools", t.name),
                    "pinning is set for the whole gateway, in [policy]".into(),
                )));
            }
        }
        let mut identity_headers: Vec<String> = IDENTITY_HEADERS.map(str::to_owned).into();
        identity_headers.extend(tenants.iter().map(|t| t.run_header.clone()));
        identity_headers.sort();
        identity_headers.dedup();
        let mtls = mtls::Mapping::compile(c, &by_name)?;
        Ok(Self {
            mtls,
            identity_headers,
            tenants,
            by_id,
            by_name,
            default_tenant,
            api_keys,
            jwt,
            metadata: c.auth.resource_metadata.clone(),
            pinning: c.policy.pin_tools.unwrap_or(false) || !configured_pins.is_empty(),
            configured_pins,
        })
    }

    /// The digest the configuration pins `tool` of `upstream` to, if any.
    pub fn configured_pin(&self, upstream: &str, tool: &str) -> Option<&str> {
        if self.configured_pins.is_empty() {
            return None;
        }
        self.configured_pins
            .get(&format!("{upstream}/{tool}"))
            .map(String::as_str)
    }

    pub fn tenant_index(&self, id: u32) -> usize {
        self.by_id.get(&id).copied().unwrap_or(self.default_tenant)
    }

    pub fn tenant(&self, identity: &Identity) -> &TenantPolicy {
        &self.tenants[identity.tenant]
    }

    /// The protected resource metadata URL for `route_path`, as `WWW-Authenticate` names it.
    pub fn metadata_url(&self, host: Option<&str>, tls: bool, route_path: &str) -> String {
        format!(
            "{}/.well-known/oauth-protected-resource{route_path}",
            self.public_base(host, tls)
        )
    }

    /// Where clients reach the gateway: `auth.metadata.public_url`, else the request's scheme
    /// (`https` over TLS: an `http` resource is not what a client of `https` checks) and its
    /// `Host` (validated, but the client's to choose: set `public_url` where a cache in front
    /// could keep one client's answer for others); without a trailing slash.
    fn public_base(&self, host: Option<&str>, tls: bool) -> String {
        let base = self.metadata.public_url.clone().unwrap_or_else(|| {
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{}", host.unwrap_or("localhost"))
        });
        base.trim_end_matches('/').to_owned()
    }

    /// The RFC 9728 document for `route_path`.
    pub fn metadata_document(&self, host: Option<&str>, tls: bool, route_path: &str) -> Value {
        let mut doc = json!({
            "resource": format!("{}{route_path}", self.public_base(host, tls)),
            "bearer_methods_supported": ["header"],
        });
        if !self.metadata.authorization_servers.is_empty() {
            doc["authorization_servers"] = json!(self.metadata.authorization_servers);
        }
        if !self.metadata.scopes_supported.is_empty() {
            doc["scopes_supported"] = json!(self.metadata.scopes_supported);
        }
        doc
    }

    /// Identifies the caller of a request on `route` from its `headers` (as received, in order);
    /// `address_tenant` is the source address's tenant id.
    ///
    /// Every credential the request carries is checked and all must name the same caller: two
    /// credentials are never silently resolved to one of them. A header that carries identity
    /// may appear once: the gateway would decide on one value while the upstream reads another.
    pub fn authenticate(
        &self,
        route: &Route,
        headers: &crate::http::Fields,
        address_tenant: u32,
    ) -> Result<Identity, Box<Refusal>> {
        self.authenticate_with(
            route,
            headers,
            address_tenant,
            mtls::ClientCert::Plaintext,
            false,
        )
    }

    /// [`Policy::authenticate`] on a connection that may carry a client certificate. On a route
    /// that accepts `mtls`, a certificate is a credential like the others (checked, and it must
    /// name the same caller as any other); elsewhere it is not looked at. `tls`: the request
    /// came over TLS (the metadata URL a refusal names is `https` then).
    pub fn authenticate_with(
        &self,
        route: &Route,
        headers: &crate::http::Fields,
        address_tenant: u32,
        cert: mtls::ClientCert<'_>,
        tls: bool,
    ) -> Result<Identity, Box<Refusal>> {
        self.authenticate_proving(route, headers, address_tenant, cert, tls)
            .map(|(who, _)| who)
    }

    /// [`Policy::authenticate_with`], and every credential the request carried, as a later
    /// configuration judges it again ([`rejudge`]): none for a caller known by its address.
    pub fn authenticate_proving(
        &self,
        route: &Route,
        headers: &crate::http::Fields,
        address_tenant: u32,
        cert: mtls::ClientCert<'_>,
        tls: bool,
    ) -> Result<(Identity, Vec<rejudge::Proof>), Box<Refusal>> {
        let a = Authenticating {
            policy: self,
            route,
            headers,
            tls,
        };
        a.identity_headers_once()?;
        let by_address = self.tenant_index(address_tenant);
        let address_classified = by_address != self.default_tenant;
        if route.auth.is_empty() {
            let who = Identity {
                tenant: by_address,
                agent: None,
                run: a.run_header(by_address),
                run_signed: false,
                via: Via::Address,
                own: None,
            };
            return Ok((who, Vec::new()));
        }
        let mut credentials: Vec<Credential> = Vec::with_capacity(2);
        credentials.extend(a.certificate(cert)?);
        credentials.extend(a.api_key_header()?);
        credentials.extend(a.authorization()?);
        let proofs: Vec<rejudge::Proof> = credentials.iter().filter_map(|c| c.proof).collect();
        let Credential {
            tenant,
            agent,
            run: signed_run,
            via,
            own,
            proof: _,
        } = match a.one_caller(credentials)? {
            Some(c) => c,
            None if a.accepts(AuthMethod::Address) && address_classified => Credential {
                tenant: by_address,
                agent: None,
                run: None,
                via: Via::Address,
                own: None,
                proof: None,
            },
            None if a.accepts(AuthMethod::Mtls) && matches!(cert, mtls::ClientCert::Plaintext) => {
                return Err(a.unauthenticated(
                    "credentials are required; this route accepts client certificates (mtls), which need a TLS listener with `client_ca`",
                    false,
                ));
            }
            None if a.accepts(AuthMethod::Mtls) => {
                return Err(a.unauthenticated(
                    "credentials are required: no client certificate was presented",
                    false,
                ));
            }
            None => return Err(a.unauthenticated("credentials are required", false)),
        };
        if via != Via::Address && address_classified && tenant != by_address {
            return Err(Refusal::new(
                403,
                code::FORBIDDEN,
                a.rule(),
                format!(
                    "the credential belongs to tenant `{}` but the address is tenant `{}`'s",
                    self.tenants[tenant].name, self.tenants[by_address].name
                ),
            ));
        }
        let run = match (signed_run, a.run_header(tenant)) {
            (Some(signed), Some(sent)) if signed != sent => {
                return Err(Refusal::new(
                    403,
                    code::FORBIDDEN,
                    a.rule(),
                    format!(
                        "header `{}` contradicts the run the token was signed for",
                        self.tenants[tenant].run_header
                    ),
                ));
            }
            (Some(signed), _) => (Some(signed), true),
            (None, sent) => (sent, false),
        };
        let (run, run_signed) = run;
        let who = Identity {
            tenant,
            agent,
            run,
            run_signed,
            via,
            own,
        };
        Ok((who, proofs))
    }

    fn verify_jwt(&self, token: &str) -> Result<JwtCaller, String> {
        let jwt = self.jwt.as_ref().ok_or("JWTs are not configured")?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        if !jwt.validation.algorithms.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        // RFC 7515 §4.1.11: a token naming extensions its recipient must understand is refused
        // by a recipient that understands none.
        if header.crit.is_some() {
            return Err("the token has critical header parameters (`crit`)".into());
        }
        let candidates: Vec<&JwtKey> = match &header.kid {
            Some(kid) => jwt
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None if jwt.keys.len() == 1 => jwt.keys.iter().collect(),
            None => return Err("the token names no key (`kid`) and several are configured".into()),
        };
        let Some(key) = candidates.first() else {
            return Err("unknown key id".into());
        };
        if key.alg.is_some_and(|a| a != header.alg) {
            return Err("the algorithm does not match the key".into());
        }
        let mut validation = jwt.validation.clone();
        validation.algorithms = vec![header.alg];
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(|e| e.to_string())?;
        let claims = data.claims;
        // RFC 7519 §4.1.1: a string. (jsonwebtoken accepts an array that contains the issuer.)
        if claims.get("iss").is_some_and(|iss| !iss.is_string()) {
            return Err("`iss` is not a string".into());
        }
        let text = |name: &Option<String>| {
            name.as_ref()
                .and_then(|n| claims.get(n))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let tenant_name = claims
            .get(&jwt.tenant_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("no `{}` claim", jwt.tenant_claim))?;
        let tenant = *self
            .by_name
            .get(tenant_name)
            .ok_or_else(|| format!("unknown tenant `{tenant_name}`"))?;
        let agent = text(&jwt.agent_claim);
        // A token that names no agent is its subject's (a token with neither is the tenant's
        // one anonymous caller).
        let own = agent
            .is_none()
            .then(|| claims.get("sub").and_then(Value::as_str))
            .flatten()
            .map(|sub| format!("jwt:{sub}"));
        let run = text(&jwt.run_claim);
        if run.as_ref().is_some_and(|r| r.len() > MAX_RUN_ID_BYTES) {
            return Err(format!(
                "the `{}` claim is longer than {MAX_RUN_ID_BYTES} bytes",
                jwt.run_claim.as_deref().unwrap_or_default()
            ));
        }
        Ok(JwtCaller {
            tenant,
            agent,
            run,
            own,
            key: key.print,
        })
    }
}

/// One request being authenticated on a route: each kind of credential read by a method of its
/// own, every one the request carries checked ([`Policy::authenticate_with`]).
struct Authenticating<'a> {
    policy: &'a Policy,
    route: &'a Route,
    headers: &'a crate::http::Fields,
    tls: bool,
}

impl Authenticating<'_> {
    fn rule(&self) -> String {
        format!("routes[{}].auth", self.route.path)
    }

    fn accepts(&self, m: AuthMethod) -> bool {
        self.route.auth.contains(&m)
    }

    fn header<'n>(&self, name: impl crate::http::FieldName<'n>) -> Option<&str> {
        header_value(self.headers, name)
    }

    /// The run the tenant's run header names.
    fn run_header(&self, tenant: usize) -> Option<String> {
        self.header(self.policy.tenants[tenant].run_header.as_str())
            .map(str::to_owned)
    }

    /// 401, with where to learn how to authenticate (RFC 9728); `invalid`: a credential was
    /// presented and is not valid.
    fn unauthenticated(&self, message: &str, invalid: bool) -> Box<Refusal> {
        let mut r = Refusal::new(401, code::UNAUTHENTICATED, self.rule(), message);
        let url = self.policy.metadata_url(
            self.header(crate::http::name::HOST),
            self.tls,
            &self.route.path,
        );
        r.www_authenticate = Some(if invalid {
            format!("Bearer resource_metadata=\"{url}\", error=\"invalid_token\"")
        } else {
            format!("Bearer resource_metadata=\"{url}\"")
        });
        r.anonymous = !invalid;
        r
    }

    /// Every header that says who calls at most once, in UTF-8 (a run header not too long).
    fn identity_headers_once(&self) -> Result<(), Box<Refusal>> {
        for name in &self.policy.identity_headers {
            let mut values = self.headers.all(name.as_str());
            let first = values.next();
            let problem = if values.next().is_some() {
                "is given more than once"
            } else if first.is_some_and(|v| std::str::from_utf8(v).is_err()) {
                "is not UTF-8"
            } else if first.is_some_and(|v| v.len() > MAX_RUN_ID_BYTES)
                && self.policy.tenants.iter().any(|t| t.run_header == *name)
            {
                "is longer than 128 bytes"
            } else {
                continue;
            };
            return Err(Refusal::new(
                400,
                code::INVALID_REQUEST,
                self.rule(),
                format!("header `{name}` {problem}"),
            ));
        }
        Ok(())
    }

    /// The caller an API key names.
    fn api_key(&self, key: &str) -> Result<Credential, Box<Refusal>> {
        let digest = <[u8; 32]>::from(Sha256::digest(key));
        self.policy
            .api_keys
            .get(&digest)
            .map(|k| Credential {
                tenant: k.tenant,
                agent: k.agent.clone(),
                run: None,
                via: Via::ApiKey,
                own: k.own.clone(),
                proof: Some(rejudge::Proof::ApiKey(digest)),
            })
            .ok_or_else(|| self.unauthenticated("the API key is not valid", true))
    }

    /// The caller a client certificate names, where the route accepts them.
    fn certificate(&self, cert: mtls::ClientCert<'_>) -> Result<Option<Credential>, Box<Refusal>> {
        let mtls::ClientCert::Present(c) = cert else {
            return Ok(None);
        };
        if !self.accepts(AuthMethod::Mtls) {
            return Ok(None);
        }
        let problem = match self.policy.mtls.caller(c) {
            mtls::Mapped::Caller(tenant, agent, names) => {
                return Ok(Some(Credential {
                    tenant,
                    own: agent.is_none().then(|| format!("cert:{names}")),
                    agent,
                    run: None,
                    via: Via::Mtls,
                    proof: Some(rejudge::Proof::Certificate),
                }));
            }
            mtls::Mapped::Nobody => "is mapped to no caller by",
            mtls::Mapped::Ambiguous => "names different callers in",
        };
        Err(Refusal::new(
            403,
            code::FORBIDDEN,
            self.rule(),
            format!(
                "the client certificate ({}) {problem} [[auth.mtls]]",
                c.describe()
            ),
        ))
    }

    /// The caller `X-API-Key` names.
    fn api_key_header(&self) -> Result<Option<Credential>, Box<Refusal>> {
        let Some(key) = self.header(crate::http::name::X_API_KEY) else {
            return Ok(None);
        };
        if !self.accepts(AuthMethod::ApiKey) {
            return Err(self.unauthenticated("API keys are not accepted here", true));
        }
        self.api_key(key).map(Some)
    }

    /// The caller `Authorization: Bearer` names: a JWT where the route takes them, else an API
    /// key.
    fn authorization(&self) -> Result<Option<Credential>, Box<Refusal>> {
        let Some(authorization) = self.header(crate::http::name::AUTHORIZATION) else {
            return Ok(None);
        };
        let Some(token) = authorization
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| crate::http::ows(token))
        else {
            return Err(self.unauthenticated(
                "the Authorization header must be `Bearer <credential>`",
                true,
            ));
        };
        let looks_like_jwt = token.bytes().filter(|b| *b == b'.').count() == 2;
        if looks_like_jwt && self.accepts(AuthMethod::Jwt) && self.policy.jwt.is_some() {
            let JwtCaller {
                tenant,
                agent,
                run,
                own,
                key,
            } = self.policy.verify_jwt(token).map_err(|why| {
                self.unauthenticated(&format!("the token is not valid: {why}"), true)
            })?;
            Ok(Some(Credential {
                tenant,
                agent,
                run,
                via: Via::Jwt,
                own,
                proof: Some(rejudge::Proof::Jwt(key)),
            }))
        } else if self.accepts(AuthMethod::ApiKey) {
            self.api_key(token).map(Some)
        } else {
            Err(self.unauthenticated("this kind of credential is not accepted here", true))
        }
    }

    /// The one caller every credential presented names (the signed token's run, when there
    /// is one); credentials of different callers are refused.
    fn one_caller(
        &self,
        mut credentials: Vec<Credential>,
    ) -> Result<Option<Credential>, Box<Refusal>> {
        if let Some((a, rest)) = credentials.split_first()
            && rest
                .iter()
                .any(|b| a.tenant != b.tenant || a.agent != b.agent)
        {
            return Err(Refusal::new(
                403,
                code::FORBIDDEN,
                self.rule(),
                "the request carries credentials of different callers (Authorization, X-API-Key, client certificate)",
            ));
        }
        // Credentials that name no agent name the caller by the last presented (Authorization,
        // then X-API-Key, then the certificate): each one authenticates its holder alone.
        Ok(credentials.pop().map(|c| Credential {
            run: c
                .run
                .or_else(|| credentials.iter_mut().find_map(|o| o.run.take())),
            own: c
                .own
                .or_else(|| credentials.iter_mut().rev().find_map(|o| o.own.take())),
            ..c
        }))
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
