//! admit: one request's checks against its tenant's policy, in order: the method, the tool
//! and its arguments, rates (tenant, agent, tool), requests in flight (tenant, tool), the loop
//! breaker, and budgets (tenant, agent, run). The first that refuses decides, and what the
//! checks before it counted is given back: a refused request charges nothing.

use std::{borrow::Cow, cell::OnceCell, net::IpAddr, sync::Arc, time::Duration};

use serde_json::{Value, json};

use super::{
    Applied, Identity, MAX_RUNS, Policy, Refusal, TenantPolicy, code,
    declared::{ArgumentKeys, Read},
    limits::{self, Charge, Counted, InFlight, State},
    rules,
};
use crate::config::{Action, RawBudget};

/// What a request asks for, as policy sees it.
pub struct Ask<'a> {
    /// A JSON-RPC request (notifications and responses are not limited).
    pub is_request: bool,
    /// The request's method.
    pub method: &'a str,
    /// `tools/call`: the upstream and its own name for the tool, and the arguments.
    pub tool: Option<(&'a str, &'a str)>,
    pub arguments: Option<&'a Value>,
    /// `tools/call` of a pinned tool whose approved definition is known: the argument keys its
    /// input schema declares ([`super::pins::Pin::argument_keys`]), the only ones the loop
    /// breaker counts. `None`: every key counts.
    pub argument_keys: Option<&'a ArgumentKeys>,
    /// Size of the whole message: arguments cannot be larger, so a cap above it needs no count.
    pub message_bytes: usize,
    pub source: IpAddr,
    /// The values left to read of JSON text held in strings, for the whole request (every
    /// member of a batch, every covering rule and the loop breaker): see
    /// [`super::rules::json_held`]. Starts at [`crate::values::MAX`].
    pub held_values: &'a std::cell::Cell<usize>,
}

/// An admitted request: in-flight slots it holds until it ends, and what is left of budgets.
#[derive(Default, Debug)]
pub struct Admission {
    pub guards: Vec<InFlight>,
    /// e.g. `tenant=95; agent=9; run=4`.
    pub budget_left: Option<String>,
    /// The tool rule that applied.
    pub rule: Option<String>,
    /// What it counted against rates, the loop breaker and budgets.
    pub charges: Vec<Charge>,
}

impl Admission {
    /// Undoes what this admission counted: the request it admitted is refused after all (a
    /// later member of its batch was).
    pub fn give_back(&mut self, state: &State) {
        for c in self.charges.drain(..) {
            state.give_back(c);
        }
    }
}

impl Policy {
    /// Decides a request: method rules, tool rules and arguments, then rates, concurrency, the
    /// loop breaker, and budgets. A refused request charges nothing: what was counted before the refusal is
    /// given back.
    pub fn admit(
        &self,
        state: &Arc<State>,
        who: &Identity,
        ask: &Ask<'_>,
    ) -> Result<Admission, Box<Refusal>> {
        let mut admission = Admission::default();
        match self.decide(state, who, ask, &mut admission) {
            Ok(()) => Ok(admission),
            Err(r) => {
                admission.give_back(state);
                Err(r)
            }
        }
    }

    /// What every session needs settled and carries no call: a cancellation, its handshake's
    /// end, an answer to the server, and the HTTP requests that carry no message (a GET that
    /// opens the server's stream, a DELETE that ends a session). Ruled by no method rule and
    /// counted by none of the tenant's limits (a client at its rate could not cancel), but not
    /// unmetered: each is an exchange with the upstream (with each member of a federation, for
    /// a GET or DELETE), and a tenant of one request a second sent 600 notifications in
    /// 0.65 s, and 100 GETs in 0.04 s (attackers' reviews). A rate of their own, ten times the
    /// tenant's (at least 100 a second), on this host.
    pub fn admit_settling(&self, state: &Arc<State>, who: &Identity) -> Result<(), Box<Refusal>> {
        let t = self.tenant(who);
        let Some((rate, burst)) = t.rate else {
            return Ok(());
        };
        let (rate, burst) = (
            rate.saturating_mul(10).max(100),
            burst.saturating_mul(10).max(100),
        );
        state
            .admit(state.key(("settling", &t.name)), state.now(), rate, burst)
            .map_err(|wait| {
                over_rate(
                    format!("tenants[{}].requests_per_sec", t.name),
                    format!(
                        "tenant `{}` sends cancellations, handshake ends, answers, stream opens and session ends at over {rate}/s, ten times its rate",
                        t.name
                    ),
                    wait,
                )
            })
    }

    /// [`Self::admit`], recording in `admission` what it charges as it goes: the checks in
    /// order, the first refusal ending it.
    fn decide(
        &self,
        state: &Arc<State>,
        who: &Identity,
        ask: &Ask<'_>,
        admission: &mut Admission,
    ) -> Result<(), Box<Refusal>> {
        // What every session needs settled (its handshake's end, a cancellation, an answer to
        // the server) is ruled by no method rule and counted by none of the tenant's limits: a
        // client at its rate could not cancel, and an allow list of methods would end every
        // handshake. Not unmetered, though: each is an exchange with the upstream, and a tenant
        // of one request a second sent 600 of them in 0.65 s (an attacker's review). They have
        // a rate of their own, ten times the tenant's (at least 100 a second), on this host.
        if !ask.is_request
            && matches!(
                ask.method,
                "" | "notifications/cancelled" | "notifications/initialized"
            )
        {
            return self.admit_settling(state, who);
        }
        let d = Deciding::new(self.tenant(who), state, who, ask);
        d.method()?;
        let applied = d.tool(admission)?;
        d.rates(applied.as_ref(), admission)?;
        // Any other notification is ruled above and counted against the tenant's and the
        // agent's rates; it holds nothing in flight.
        if !ask.is_request {
            return Ok(());
        }
        d.in_flight(applied.as_ref(), admission)?;
        let Some((upstream, tool)) = ask.tool else {
            return Ok(());
        };
        d.loop_breaker(upstream, tool, admission)?;
        d.budgets(applied.as_ref(), tool, admission)
    }
}

/// One request being decided: its tenant's policy, who asks, what, and when.
struct Deciding<'a> {
    t: &'a TenantPolicy,
    state: &'a Arc<State>,
    who: &'a Identity,
    ask: &'a Ask<'a>,
    /// [`State::now`]: the clock rates count by.
    now: u64,
    /// [`State::unix_s`]: the clock of the loop breaker's and the budgets' windows.
    unix_s: u64,
    /// The caller's address as its agent ([`Deciding::agent`]): written out only once a check
    /// asks for it (most calls need no copy of it).
    by_address: OnceCell<String>,
}

/// Over a rate: 429 with the wait until the next request fits.
fn over_rate(rule: String, message: String, wait: Duration) -> Box<Refusal> {
    Refusal::new(429, code::RATE_LIMITED, rule, message).retry(wait)
}

impl<'a> Deciding<'a> {
    fn new(
        t: &'a TenantPolicy,
        state: &'a Arc<State>,
        who: &'a Identity,
        ask: &'a Ask<'a>,
    ) -> Self {
        Self {
            t,
            state,
            who,
            ask,
            now: state.now(),
            unix_s: State::unix_s(),
            by_address: OnceCell::new(),
        }
    }

    /// Who the caller is to a rule that counts by agent: its agent; else, for a credential
    /// that names no agent, the credential ([`Identity::own`]: each API key, certificate
    /// mapping and token subject its own, wherever it connects from); else its address, an
    /// IPv6 one its /64: any address of it is the client's to take, and each would be another
    /// caller (a fresh agent budget, rate and loop count per address, and one more of the
    /// bounded callers known by address).
    fn agent(&self) -> &str {
        self.who
            .agent
            .as_deref()
            .or(self.who.own.as_deref())
            .unwrap_or_else(|| {
                self.by_address
                    .get_or_init(|| limits::source_of(self.ask.source).to_string())
            })
    }

    /// The scope a caller's counts are kept under, each apart from the others: a named
    /// agent's, a credential's that names none (`own`), an address's (one named like an
    /// address, a token's `sub` of `198.18.0.5`, would otherwise share them).
    fn agent_scope(&self) -> &'static str {
        if self.who.agent.is_some() {
            "agent"
        } else if self.who.own.is_some() {
            "own"
        } else {
            "address"
        }
    }

    /// The caller as an error message names it: a credential's mark is not shown (a
    /// certificate's holds its mapped names; a key's, half its digest).
    fn caller(&self) -> String {
        match self.agent_scope() {
            "own" => "this credential (it names no agent)".to_owned(),
            _ => format!("agent `{}`", self.agent()),
        }
    }

    /// The tenant's method rules.
    fn method(&self) -> Result<(), Box<Refusal>> {
        let t = self.t;
        if let Some(r) = t.method_rule(self.ask.method)
            && r.action == Action::Deny
        {
            return Err(Refusal::new(
                403,
                code::FORBIDDEN,
                r.label.clone(),
                format!(
                    "method `{}` is not allowed for tenant `{}`",
                    self.ask.method, t.name
                ),
            ));
        }
        Ok(())
    }

    /// A tool call: whether its tool is offered (by a rule, or the tenant's default action)
    /// and the call's arguments against every covering rule's checks. What the rules decide.
    fn tool(&self, admission: &mut Admission) -> Result<Option<Applied<'a>>, Box<Refusal>> {
        let t = self.t;
        let Some((upstream, tool)) = self.ask.tool else {
            return Ok(None);
        };
        let applied = t.applied(upstream, tool);
        if applied.action == Action::Deny {
            let label = applied.action_rule.map_or_else(
                || format!("tenants[{}].policy.default_action", t.name),
                |r| r.label.clone(),
            );
            return Err(Refusal::new(
                403,
                code::FORBIDDEN,
                label,
                format!("tool `{tool}` is not allowed for tenant `{}`", t.name),
            ));
        }
        for r in applied.limiting().filter(|r| r.checks_arguments()) {
            let mut left = self.ask.held_values.get();
            let checked = r.check_arguments(self.ask.arguments, self.ask.message_bytes, &mut left);
            self.ask.held_values.set(left);
            checked.map_err(|(label, why)| {
                Refusal::new(403, code::FORBIDDEN, label, format!("tool `{tool}`: {why}"))
            })?;
        }
        admission.rule = applied.first.map(|r| r.label.clone());
        Ok(Some(applied))
    }

    /// Requests per second: the tenant's, the agent's, the tool rule's.
    fn rates(
        &self,
        applied: Option<&Applied>,
        admission: &mut Admission,
    ) -> Result<(), Box<Refusal>> {
        let (t, state, now) = (self.t, self.state, self.now);
        if let Some((rate, burst)) = t.rate {
            let key = state.key(("tenant", &t.name));
            let name = || format!("tenant/{}", t.name);
            let charge = state
                .admit_rate(key, name, now, rate, burst)
                .map_err(|wait| {
                    over_rate(
                        format!("tenants[{}].requests_per_sec", t.name),
                        format!("tenant `{}` is over its rate of {rate}/s", t.name),
                        wait,
                    )
                })?;
            admission.charges.push(charge);
        }
        if let Some((rate, burst)) = t.agent_rate {
            let key = state.key((self.agent_scope(), &t.name, self.agent()));
            let name = || format!("{}/{}/{}", self.agent_scope(), t.name, self.agent());
            // A caller known only by its address counts on this host alone: an address is
            // the client's to choose (an IPv6 client has billions), and the fleet's shared
            // state must not grow with them.
            let admitted = if self.agent_scope() != "address" {
                state.admit_rate(key, name, now, rate, burst)
            } else {
                state
                    .admit(key, now, rate, burst)
                    .map(|()| limits::Charge::Rate { key, rate })
            };
            let charge = admitted.map_err(|wait| {
                over_rate(
                    format!("tenants[{}].agent_requests_per_sec", t.name),
                    format!("{} is over its rate of {rate}/s", self.caller()),
                    wait,
                )
            })?;
            admission.charges.push(charge);
        }
        for r in applied.iter().flat_map(|a| a.limiting()) {
            let Some((rate, burst)) = r.rate else {
                continue;
            };
            let key = state.key(("tool", &t.name, &r.counter));
            let name = || format!("tool/{}/{}", t.name, r.counter);
            let charge = state
                .admit_rate(key, name, now, rate, burst)
                .map_err(|wait| {
                    over_rate(
                        format!("{}.requests_per_sec", r.label),
                        format!(
                            "tools matching `{}` are over their rate of {rate}/s",
                            r.pattern
                        ),
                        wait,
                    )
                })?;
            admission.charges.push(charge);
        }
        Ok(())
    }

    /// Requests in flight at once: the tenant's, the tool rule's. Held until the request ends.
    fn in_flight(
        &self,
        applied: Option<&Applied>,
        admission: &mut Admission,
    ) -> Result<(), Box<Refusal>> {
        let (t, state) = (self.t, self.state);
        if let Some(max) = t.max_concurrent {
            let guard = state
                .enter(state.key(("in-flight", &t.name)), max)
                .ok_or_else(|| {
                    Refusal::new(
                        429,
                        code::RATE_LIMITED,
                        format!("tenants[{}].max_concurrent", t.name),
                        format!("tenant `{}` has {max} requests in flight already", t.name),
                    )
                })?;
            admission.guards.push(guard);
        }
        for r in applied.iter().flat_map(|a| a.limiting()) {
            let Some(max) = r.max_concurrent else {
                continue;
            };
            let guard = state
                .enter(state.key(("in-flight", &t.name, &r.counter)), max)
                .ok_or_else(|| {
                    Refusal::new(
                        429,
                        code::RATE_LIMITED,
                        format!("{}.max_concurrent", r.label),
                        format!(
                            "tools matching `{}` have {max} calls in flight already",
                            r.pattern
                        ),
                    )
                })?;
            admission.guards.push(guard);
        }
        Ok(())
    }

    /// The same call (tool and arguments, however spelled: [`Canonical`]) by the same agent,
    /// counted within the breaker's window. Of a tool whose pinned definition is known, only
    /// the argument keys its schema declares are part of the call ([`Ask::argument_keys`]):
    /// the servers ignore the others.
    fn loop_breaker(
        &self,
        upstream: &str,
        tool: &str,
        admission: &mut Admission,
    ) -> Result<(), Box<Refusal>> {
        let (t, state) = (self.t, self.state);
        let Some(lb) = &t.loop_breaker else {
            return Ok(());
        };
        let digest = state.key((
            upstream,
            tool,
            Canonical(
                self.ask.arguments,
                self.ask.argument_keys,
                self.ask.held_values,
            ),
        ));
        let key = state.key(("loop", &t.name, self.agent_scope(), self.agent(), digest));
        let Some(charge) = state.repeat(key, self.unix_s, lb.window_s, u64::from(lb.max_repeats))
        else {
            return Err(Refusal::new(
                429,
                code::LOOP_DETECTED,
                format!("tenants[{}].policy.loop_breaker", t.name),
                format!(
                    "loop detected: `{tool}` was called with the same arguments more than {} times within {} s by {}",
                    lb.max_repeats,
                    lb.window_s,
                    self.caller()
                ),
            )
            .retry(State::window_left(lb.window_s)));
        };
        admission.charges.push(charge);
        Ok(())
    }

    /// The tenant's budgets: the call's cost (its rule's, else 1) charged to the tenant, the
    /// agent and the run, each in its window; what is left of each goes into the answer.
    fn budgets(
        &self,
        applied: Option<&Applied>,
        tool: &str,
        admission: &mut Admission,
    ) -> Result<(), Box<Refusal>> {
        let t = self.t;
        let Some(b) = &t.budget else {
            return Ok(());
        };
        if self.state.budgets_closed() {
            return Err(Refusal::new(
                503,
                code::STATE_UNAVAILABLE,
                format!("tenants[{}].policy.budget", t.name),
                format!(
                    "the budget of tenant `{}` cannot be checked: the fleet's shared state (Redis) is unreachable or not read yet, and budgets fail closed (`[state] fleet_fail_open`)",
                    t.name
                ),
            )
            .retry(Duration::from_secs(1)));
        }
        let cost = applied.map_or(1, |a| a.cost);
        // A call that costs nothing charges no budget: counted at 0, a run never counted as
        // one, and each of its calls took another of the tenant's places for runs (a review:
        // 1,100 free calls of one run refused every other agent's new runs).
        if cost == 0 {
            return Ok(());
        }
        // A run named in the header is the caller's own: counted under the caller and the
        // run (the header is the client's to write). A signed token's is shared by every
        // token that names it. Made only where a run budget counts it.
        let run = self
            .who
            .run
            .as_deref()
            .filter(|_| b.run.is_some())
            .map(|run| {
                if self.who.run_signed {
                    Cow::Borrowed(run)
                } else {
                    let (scope, agent) = (self.agent_scope(), self.agent());
                    Cow::Owned(format!("{scope}:{}:{agent}:{run}", agent.len()))
                }
            });
        let scopes = [
            ("tenant", b.tenant, Some(t.name.as_str())),
            ("agent", b.agent, Some(self.agent())),
            ("run", b.run, run.as_deref()),
        ];
        // Room for three scopes' figures at once: grown a piece at a time, it was four
        // reallocations a call.
        let mut left = String::with_capacity(64);
        for (scope, limit, subject) in scopes {
            let (Some(limit), Some(subject)) = (limit, subject) else {
                continue;
            };
            let l = self.charge_budget(b, scope, subject, limit, cost, tool, admission)?;
            // Written into every answer's head: without the formatting machinery.
            if !left.is_empty() {
                left.push_str("; ");
            }
            left.push_str(scope);
            left.push('=');
            left.push_str(itoa::Buffer::new().format(l));
        }
        if !left.is_empty() {
            admission.budget_left = Some(left);
        }
        Ok(())
    }

    /// Charges `cost` to the budget of `scope` (`subject`'s), of `limit` a window. What is
    /// left of it.
    #[expect(
        clippy::too_many_arguments,
        reason = "each is a separate input of the charge"
    )]
    fn charge_budget(
        &self,
        b: &RawBudget,
        scope: &str,
        subject: &str,
        limit: u64,
        cost: u64,
        tool: &str,
        admission: &mut Admission,
    ) -> Result<u64, Box<Refusal>> {
        let (t, state, unix_s) = (self.t, self.state, self.unix_s);
        // The scope the spend is counted under: a caller with no agent's is its own; a run
        // the header names, the caller's (see [`Deciding::budgets`]).
        let counted = match scope {
            "agent" => self.agent_scope(),
            "run" if !self.who.run_signed => "caller-run",
            _ => scope,
        };
        let key = state.budget_key(counted, &t.name, subject, b.window_s);
        // A run not counted yet in this window takes one of the tenant's places for runs (and,
        // named by its caller, one within the caller's share). (A run counted in the window
        // before, its cell not yet pruned, took none: after each rollover, the runs carried
        // over came on top of the new places.)
        let placed = scope == "run" && !state.counts_in(key, unix_s, b.window_s);
        let caller = (counted == "caller-run")
            .then(|| limits::run_caller(subject))
            .flatten();
        if placed {
            let taken = match caller {
                Some(caller) => {
                    state.take_caller_run(&t.name, caller, b.window_s, unix_s, MAX_RUNS)
                }
                None if state.take_run(&t.name, b.window_s, unix_s, MAX_RUNS) => Ok(()),
                None => Err(limits::RunsFull::Tenant),
            };
            if let Err(full) = taken {
                let why = match full {
                    limits::RunsFull::Tenant => format!(
                        "tenant `{}` has {MAX_RUNS} runs counted in this window: a new run waits for the next",
                        t.name
                    ),
                    limits::RunsFull::Caller(held) => format!(
                        "{} has {held} of tenant `{}`'s runs counted in this window, half of what its other callers leave: a new run waits for the next",
                        self.caller(),
                        t.name
                    ),
                };
                return Err(Refusal::new(
                    429,
                    code::BUDGET_EXHAUSTED,
                    format!("tenants[{}].policy.budget.run", t.name),
                    why,
                )
                .retry(State::window_left(b.window_s)));
            }
        }
        let what = || Counted::Budget {
            scope: counted.to_owned(),
            tenant: t.name.clone(),
            subject: subject.to_owned(),
        };
        // A caller known only by its address: one of a bounded number (its address is the
        // client's to choose, and each is a window here, in the state store and in the
        // fleet's).
        let charged = if counted == "address" {
            state
                .charge_source(key, what, unix_s, b.window_s, cost, limit)
                .ok_or_else(|| {
                    Refusal::new(
                        429,
                        code::RATE_LIMITED,
                        format!("tenants[{}].policy.budget.agent", t.name),
                        format!(
                            "budgets are counted for at most {} callers known only by their address at once: authenticate, or retry later",
                            limits::MAX_SOURCES
                        ),
                    )
                    .retry(Duration::from_secs(10))
                })?
        } else {
            state.charge_kept(key, what, unix_s, b.window_s, cost, limit)
        };
        match charged {
            Ok((window, l)) => {
                admission.charges.push(if scope == "run" {
                    Charge::RunBudget {
                        key,
                        window,
                        amount: cost,
                        places: state.places_key(&t.name, b.window_s),
                        caller_places: caller.map(|c| state.caller_places(&t.name, c, b.window_s)),
                    }
                } else {
                    Charge::Budget {
                        key,
                        window,
                        amount: cost,
                    }
                });
                Ok(l)
            }
            Err(l) => {
                // A run whose first charge is refused counts nothing: its place goes back
                // (else each retry took another, and one run id's retries took every place of
                // the window).
                if placed {
                    state.give_back_run(&t.name, caller, b.window_s, unix_s);
                }
                // Nor does it hold memory: its count of nothing goes.
                if scope == "run" {
                    state.drop_if_empty(key, unix_s / b.window_s.max(1));
                }
                // A credential's mark is not shown (see [`Deciding::caller`]); a run is
                // named as the caller named it.
                let whose = match (counted, &self.who.run) {
                    ("own", _) => "this credential (it names no agent)".to_owned(),
                    ("caller-run", Some(run)) => format!("`{run}`"),
                    _ => format!("`{subject}`"),
                };
                let mut r = Refusal::new(
                    429,
                    code::BUDGET_EXHAUSTED,
                    format!("tenants[{}].policy.budget.{scope}", t.name),
                    format!(
                        "the {scope} budget of {whose} is exhausted: `{tool}` costs {cost}, {l} of {limit} left in this {} s window",
                        b.window_s
                    ),
                )
                .retry(State::window_left(b.window_s));
                r.budget = Some(json!({ scope: l }));
                Err(r)
            }
        }
    }
}

/// Hashes JSON as a server reads it, so that the same arguments give the same digest however
/// they are spelled: object keys in sorted order, numbers by value (`1.0` is `1`: pydantic and
/// zod read an integer from either), a string that holds a JSON object or array as that value
/// (the Python SDK decodes such a string into the object a tool takes, as argument rules read
/// it), so that respacing it does not make another call, and a string that reads as a number
/// or a truth value, and a truth value, as that number (pydantic's lax mode reads `"1"`, `" 01"`,
/// `"+1"`, `"1_0"`, `"1.0"` and `true` as an integer: each made another call of `add(7, 1)`, an
/// attacker's review). More spellings are one call than a server may take as one: for a loop
/// breaker, the safe side.
///
/// With the argument keys the tool's schema declares ([`ArgumentKeys`]), a key of the arguments
/// that no server reads as one of them is left out (pydantic and zod ignore it: a junk key
/// added to each call made each another call, an attacker's review), and one a server reads as
/// a declared name (`A` for `a`, as Go's `encoding/json` does; `file_path` for `filePath`, as
/// pydantic does) counts as that name. Without them, every key counts as spelled. Arguments
/// whose keys are all declared names give the same digest either way.
struct Canonical<'a>(
    Option<&'a Value>,
    Option<&'a ArgumentKeys>,
    &'a std::cell::Cell<usize>,
);

/// A number as [`Canonical`] hashes it: a whole one as the integer (below 2^127, which every
/// whole float there fits), another by its bits.
#[derive(Hash)]
enum Num {
    Int(i128),
    Float(u64),
}

impl Num {
    fn of_f64(f: f64) -> Self {
        if f.is_nan() {
            // Every NaN is one value to a server's equality of arguments, whatever its bits.
            Num::Float(f64::NAN.to_bits())
        } else if f.fract() == 0.0 && f.abs() < 1.7e38 {
            #[expect(clippy::cast_possible_truncation, reason = "whole and below 2^127")]
            Num::Int(f as i128)
        } else {
            Num::Float(f.to_bits())
        }
    }

    fn of_number(n: &serde_json::Number) -> Option<Self> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i128::from(i)))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Int(i128::from(u)))
        } else {
            n.as_f64().map(Num::of_f64)
        }
    }

    /// The number a string reads as, as Python's `int()` and `float()` and pydantic's lax
    /// booleans read it: spaces around, a sign, `_` between digits, a fraction or exponent,
    /// `true`/`yes`/`on`/`t`/`y` and `false`/`no`/`off`/`f`/`n` in any case.
    fn of_str(s: &str) -> Option<Self> {
        let t = s.trim();
        if t.is_empty() {
            return None;
        }
        // pydantic's lax booleans, in any case.
        const TRUE: [&str; 5] = ["true", "yes", "on", "t", "y"];
        const FALSE: [&str; 5] = ["false", "no", "off", "f", "n"];
        if TRUE.iter().any(|w| t.eq_ignore_ascii_case(w)) {
            return Some(Num::Int(1));
        }
        if FALSE.iter().any(|w| t.eq_ignore_ascii_case(w)) {
            return Some(Num::Int(0));
        }
        let (sign, rest) = match t.as_bytes()[0] {
            b'+' | b'-' => t.split_at(1),
            _ => ("", t),
        };
        // Python's `float()` and pydantic's lax floats read these words, in any case.
        if ["inf", "infinity", "nan"]
            .iter()
            .any(|w| rest.eq_ignore_ascii_case(w))
        {
            let f: f64 = format!("{sign}{rest}").to_ascii_lowercase().parse().ok()?;
            return Some(Num::of_f64(f));
        }
        if !t.bytes().any(|b| b.is_ascii_digit()) {
            return None;
        }
        // Zeros before the first other digit say nothing (`"000…01"` is 1 to pydantic, at any
        // length: a review padded a number with ever more zeros, each call another here), nor
        // do zeros after a fraction's last other digit, nor zeros before an exponent's first
        // other digit (`"1e-000…03"`: a later review).
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        let mut mantissa = mantissa.trim_start_matches(['0', '_']);
        if mantissa.contains('.') {
            mantissa = mantissa.trim_end_matches(['0', '_']);
        }
        let exponent = exponent.map(|e| {
            let (sign, digits) = match e.as_bytes().first() {
                Some(b'+' | b'-') => e.split_at(1),
                _ => ("", e),
            };
            let digits = digits.trim_start_matches(['0', '_']);
            format!("e{sign}0{digits}")
        });
        let t = format!("{sign}0{mantissa}{}", exponent.unwrap_or_default()).replace('_', "");
        // Past i128 or with a fraction, read as the float a server's float reads (a long text
        // too: every spelling of one float is one call; distinct integers past 2^53 may be
        // one call here, the breaker's safe side).
        t.parse::<i128>()
            .map(Num::Int)
            .ok()
            .or_else(|| t.parse::<f64>().ok().map(Num::of_f64))
    }
}

/// An object's key as [`walk`] hashes it: one that reads as a number (not as one of
/// pydantic's lax booleans, which no `int` key reads) as the number, marked so that no key
/// spelled so is the same.
fn numeric_key(k: &str) -> std::borrow::Cow<'_, str> {
    let t = k.trim();
    let digit = |b: Option<&u8>| b.is_some_and(u8::is_ascii_digit);
    let numeric = digit(t.as_bytes().first())
        || matches!(t.as_bytes().first(), Some(b'+' | b'-' | b'.')) && digit(t.as_bytes().get(1))
        || t.starts_with("-.") && digit(t.as_bytes().get(2));
    match Num::of_str(t).filter(|_| numeric) {
        Some(Num::Int(i)) => std::borrow::Cow::Owned(format!("\0{i}")),
        Some(Num::Float(bits)) => std::borrow::Cow::Owned(format!("\0f{bits}")),
        None => std::borrow::Cow::Borrowed(k),
    }
}

/// The UUID a string reads as, as Python's `uuid.UUID` reads it (pydantic's `UUID` arguments):
/// `urn:` and `uuid:` dropped, braces at its ends, every `-`, then 32 hex digits in either
/// case; lower-cased. A review called a tool of a `UUID` argument in seven spellings of one
/// (cases, no hyphens, braces, `urn:uuid:`), each another call here. A string that is not a
/// UUID to its server (a digest, say) is counted as one in any case: the breaker's safe side.
fn uuid_of(s: &str) -> Option<[u8; 32]> {
    // Any number of hyphens is read past: a long one is looked at too (one pass).
    if s.len() < 32 || s.len() > 4096 {
        return None;
    }
    let t = if s.contains(':') {
        std::borrow::Cow::Owned(s.replace("urn:", "").replace("uuid:", ""))
    } else {
        std::borrow::Cow::Borrowed(s)
    };
    let t = t.trim_matches(['{', '}']);
    let mut out = [0u8; 32];
    let mut n = 0;
    for b in t.bytes().filter(|b| *b != b'-') {
        if !b.is_ascii_hexdigit() || n == 32 {
            return None;
        }
        out[n] = b.to_ascii_lowercase();
        n += 1;
    }
    (n == 32).then_some(out)
}

/// JSON text without the spacing outside its strings.
fn unspaced(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in text.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        } else if b == b'"' {
            in_string = true;
        }
        out.push(b);
    }
    out
}

/// Whether a server reads `v` as none: `null`, or a string that is `null` as JSON text (the
/// Python SDK's servers decode it for a parameter not typed plain `str`, spaces around it
/// too). A member that is none is as absent to [`Canonical`]: an optional parameter's default
/// is most often none, and a review sent `" null"`, `"  null"`... for one, each call another
/// here and the same call there. Where it is not none, two calls are counted as one: the
/// breaker's safe side.
fn reads_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.trim_matches([' ', '\t', '\n', '\r']) == "null",
        _ => false,
    }
}

impl std::hash::Hash for Canonical<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // JSON text in the arguments' strings is read within what the request has left of
        // one message's values (text past them is hashed without its spacing: see `walk`).
        let mut budget = self.2.get();
        match self.0 {
            None => walk(
                &Value::Object(serde_json::Map::new()),
                self.1,
                h,
                &mut budget,
            ),
            Some(v) => walk(v, self.1, h, &mut budget),
        }
        self.2.set(budget);
    }
}

/// [`Canonical`]'s hash of `v`, whose keys, if it is an object (or each item's, if a list),
/// are those `keys` declares when known.
fn walk<H: std::hash::Hasher>(
    v: &Value,
    keys: Option<&ArgumentKeys>,
    h: &mut H,
    budget: &mut usize,
) {
    use std::hash::Hash as _;
    match v {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => (2u8, Num::Int(i128::from(*b))).hash(h),
        Value::Number(n) => match Num::of_number(n) {
            Some(n) => (2u8, n).hash(h),
            None => (3u8, n.to_string()).hash(h),
        },
        Value::String(_) if reads_null(v) => 0u8.hash(h),
        Value::String(s) => match rules::json_held(s, budget) {
            Some(Ok(v)) => walk(&v, keys, h, budget),
            // Past the values the request may read: the text without its spacing, which a
            // server reads the same however it is spaced (hashed as written, `[0,0,...]`
            // respaced each time was another call: a review).
            Some(Err(rules::Unheld::TooMany)) => (6u8, unspaced(s)).hash(h),
            _ => match Num::of_str(s) {
                Some(n) => (2u8, n).hash(h),
                None => match uuid_of(s) {
                    Some(u) => (7u8, u).hash(h),
                    None => (3u8, s).hash(h),
                },
            },
        },
        Value::Array(a) => {
            (4u8, a.len()).hash(h);
            a.iter().for_each(|x| walk(x, keys, h, budget));
        }
        // A member that is `null` is as absent (see `reads_null`).
        Value::Object(o) => match keys {
            None => {
                // A key that reads as a number is the number (pydantic reads `"01"`, `" 1"`,
                // `"1_0"` as the keys of a `dict[int, ...]` alike: a review's `{"01": 5}`,
                // `{"001": 5}`... each another call here, the same call there).
                let mut members: Vec<(std::borrow::Cow<'_, str>, &Value)> = o
                    .iter()
                    .filter(|(_, v)| !reads_null(v))
                    .map(|(k, v)| (numeric_key(k), v))
                    .collect();
                members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                (5u8, members.len()).hash(h);
                for (k, v) in members {
                    k.hash(h);
                    walk(v, None, h, budget);
                }
            }
            Some(keys) => {
                // Each key read as a declared name: the name, how it is spelled, its value, and
                // whether it is another case of the name, read only without the name itself
                // ([`Read::Alias`]).
                let mut kept: Vec<(&str, &str, &Value, bool)> = Vec::with_capacity(o.len());
                for (k, v) in o.iter().filter(|(_, v)| !reads_null(v)) {
                    match keys.reads(k) {
                        Some(Read::Name(name)) => kept.push((name, k, v, false)),
                        Some(Read::Spelled) => kept.push((k, k, v, false)),
                        Some(Read::Alias(name)) => kept.push((name, k, v, true)),
                        None => {}
                    }
                }
                if kept.iter().any(|e| e.3) {
                    let named: std::collections::HashSet<&str> =
                        kept.iter().filter(|e| !e.3).map(|e| e.0).collect();
                    kept.retain(|e| !e.3 || !named.contains(e.0));
                }
                kept.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
                (5u8, kept.len()).hash(h);
                for (name, _, v, _) in kept {
                    name.hash(h);
                    walk(v, keys.nested(name), h, budget);
                }
            }
        },
    }
}
