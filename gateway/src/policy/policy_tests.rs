use std::net::{IpAddr, Ipv4Addr};

use serde_json::json;

use super::{limits::State, *};

const KEY_A: &str = "key-of-acme-0123456789";
const KEY_B: &str = "key-of-beta-0123456789";

fn config(extra: &str) -> Config {
    let text = format!(
        r#"
[gateway]
instance = "policy-test"
workers = 1
[[listeners]]
address = "127.0.0.1:2"
[admin]
address = "127.0.0.1:1"
[kernel]
enabled = false
default_tenant = "public"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "acme"
id = 1
sources = ["198.18.1.0/24"]
[[tenants]]
name = "beta"
id = 2
sources = ["198.18.2.0/24"]
[[auth.api_keys]]
sha256 = "{a}"
tenant = "acme"
agent = "acme-bot"
[[auth.api_keys]]
sha256 = "{b}"
tenant = "beta"
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
auth = ["api_key", "address"]
[[routes]]
path = "/open"
upstream = "up"
{extra}
"#,
        a = sha256_hex(KEY_A),
        b = sha256_hex(KEY_B)
    );
    Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}"))
}

/// Request headers as the HTTP layer gives them.
fn headers(pairs: &[(&str, &str)]) -> crate::http::Fields {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
        .collect()
}

fn src(last: u8, net: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, net, last))
}

#[test]
fn api_keys_in_either_header_identify_tenant_and_agent() {
    let c = config("");
    let p = Policy::compile(&c).unwrap();
    let route = &c.routes[0];
    let bearer = format!("Bearer {KEY_A}");
    let who = p
        .authenticate(route, &headers(&[("authorization", &bearer)]), 0)
        .unwrap();
    assert_eq!(p.tenant(&who).name, "acme");
    assert_eq!(who.agent.as_deref(), Some("acme-bot"));
    assert_eq!(who.via, Via::ApiKey);
    let who = p
        .authenticate(route, &headers(&[("x-api-key", KEY_B)]), 0)
        .unwrap();
    assert_eq!(p.tenant(&who).name, "beta");
}

/// Callers no agent names are told apart for what keeps callers apart (sessions, per-caller
/// children) by the credential that named them: before, every key of a tenant that named no
/// agent was one caller, and opened another key's session (an attacker's review).
#[test]
fn callers_no_agent_names_are_told_apart_by_their_credential() {
    const KEY_C: &str = "another-key-of-beta-0123456789";
    let c = config(&format!(
        "[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"beta\"\n",
        sha256_hex(KEY_C)
    ));
    let p = Policy::compile(&c).unwrap();
    let route = &c.routes[0];
    let who = |k: &str| {
        p.authenticate(route, &headers(&[("x-api-key", k)]), 0)
            .unwrap()
    };
    let (b, c2) = (who(KEY_B), who(KEY_C));
    assert_eq!((b.tenant, b.agent.as_deref()), (c2.tenant, None));
    assert!(
        b.own.as_deref().is_some_and(|o| o.starts_with("key:")),
        "{b:?}"
    );
    assert_ne!(b.own, c2.own, "two keys, two callers");
    assert_eq!(who(KEY_B).own, b.own, "one key, one caller");
    // An agent names the caller; an address, the tenant's one anonymous caller.
    assert_eq!(who(KEY_A).own, None);
    let anonymous = p.authenticate(route, &headers(&[]), 1).unwrap();
    assert_eq!((anonymous.agent, anonymous.own), (None, None));
}

#[test]
fn missing_or_wrong_credentials_get_401_naming_the_metadata() {
    let c = config("");
    let p = Policy::compile(&c).unwrap();
    let route = &c.routes[0];
    let r = p
        .authenticate(route, &headers(&[("host", "gw.example:8080")]), 0)
        .unwrap_err();
    assert_eq!(r.status, 401);
    assert_eq!(
        r.www_authenticate.as_deref(),
        Some(
            "Bearer resource_metadata=\"http://gw.example:8080/.well-known/oauth-protected-resource/mcp\""
        )
    );
    // Over TLS the metadata is https (a client of https checks an https resource).
    let r = p
        .authenticate_with(
            route,
            &headers(&[("host", "gw.example")]),
            0,
            super::mtls::ClientCert::Plaintext,
            true,
        )
        .unwrap_err();
    assert_eq!(
        r.www_authenticate.as_deref(),
        Some(
            "Bearer resource_metadata=\"https://gw.example/.well-known/oauth-protected-resource/mcp\""
        )
    );
    assert_eq!(
        p.metadata_document(Some("gw.example"), true, "/mcp")["resource"],
        "https://gw.example/mcp"
    );
    let r = p
        .authenticate(route, &headers(&[("x-api-key", "wrong")]), 0)
        .unwrap_err();
    assert_eq!(r.status, 401);
    assert!(
        r.www_authenticate
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
}

#[test]
fn an_address_identifies_where_allowed_and_must_agree_with_a_key() {
    let c = config("");
    let p = Policy::compile(&c).unwrap();
    let route = &c.routes[0];
    // The address alone (tenant acme = id 1) is accepted on this route.
    let who = p.authenticate(route, &headers(&[]), 1).unwrap();
    assert_eq!(p.tenant(&who).name, "acme");
    // The unclassified (default) address alone is not.
    assert_eq!(
        p.authenticate(route, &headers(&[]), 0).unwrap_err().status,
        401
    );
    // Beta's key from acme's address: refused.
    let r = p
        .authenticate(route, &headers(&[("x-api-key", KEY_B)]), 1)
        .unwrap_err();
    assert_eq!(r.status, 403);
    assert!(
        r.message.contains("`beta`") && r.message.contains("`acme`"),
        "{}",
        r.message
    );
    // An open route takes the address's tenant and ignores credentials.
    let who = p.authenticate(&c.routes[1], &headers(&[]), 2).unwrap();
    assert_eq!(p.tenant(&who).name, "beta");
}

fn admit(
    p: &Policy,
    state: &Arc<State>,
    who: &Identity,
    tool: &str,
    args: Value,
) -> Result<Admission, Box<Refusal>> {
    admit_from(p, state, who, tool, args, src(9, 1))
}

/// As [`admit`], the call coming from `source`.
fn admit_from(
    p: &Policy,
    state: &Arc<State>,
    who: &Identity,
    tool: &str,
    args: Value,
    source: std::net::IpAddr,
) -> Result<Admission, Box<Refusal>> {
    p.admit(
        state,
        who,
        &Ask {
            is_request: true,
            method: "tools/call",
            tool: Some(("up", tool)),
            arguments: Some(&args),
            argument_keys: None,
            message_bytes: usize::MAX,
            source,
            held_values: &std::cell::Cell::new(crate::values::MAX),
        },
    )
}

/// A policy compiled from `config(extra)`, fresh limit state, and acme's bot as the caller.
fn acme_policy(extra: &str) -> (Policy, Arc<State>, Identity) {
    let p = Policy::compile(&config(extra)).unwrap();
    let who = acme(&p);
    (p, Arc::new(State::default()), who)
}

fn acme(p: &Policy) -> Identity {
    Identity {
        tenant: p.by_name["acme"],
        agent: Some("bot".into()),
        run: Some("run-1".into()),
        run_signed: false,
        via: Via::ApiKey,
        own: None,
    }
}

#[test]
fn tenant_rules_come_before_defaults_and_deny_hides_tools() {
    let text = r#"
[gateway]
instance = "t"
workers = 1
[[listeners]]
address = "127.0.0.1:2"
[admin]
address = "127.0.0.1:1"
[kernel]
enabled = false
default_tenant = "beta"
[[tenants]]
name = "acme"
id = 1
[[tenants.policy.tools]]
match = "add"
action = "deny"
[[tenants]]
name = "beta"
id = 2
[policy]
default_action = "deny"
[[policy.tools]]
match = "echo"
action = "allow"
[[policy.tools]]
match = "up/add"
action = "allow"
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
"#;
    let c = Config::from_toml(text).unwrap_or_else(|e| panic!("{e}"));
    let p = Policy::compile(&c).unwrap();
    let state = Arc::new(State::default());
    let acme = Identity {
        tenant: p.by_name["acme"],
        agent: None,
        run: None,
        run_signed: false,
        via: Via::Address,
        own: None,
    };
    let beta = Identity {
        tenant: p.by_name["beta"],
        ..acme.clone()
    };
    assert!(admit(&p, &state, &acme, "echo", json!({})).is_ok());
    let r = admit(&p, &state, &acme, "add", json!({})).unwrap_err();
    assert_eq!((r.status, r.code), (403, code::FORBIDDEN));
    assert_eq!(r.rule, "tenants[acme].policy.tools[0]");
    assert!(admit(&p, &state, &beta, "add", json!({})).is_ok());
    let r = admit(&p, &state, &beta, "rm", json!({})).unwrap_err();
    assert_eq!(r.rule, "tenants[beta].policy.default_action");
    assert!(!p.tenant(&acme).allows("up", "add"));
    assert!(p.tenant(&beta).allows("up", "add"));
    assert!(
        !p.tenant(&beta).allows("other", "add"),
        "up/add names one upstream"
    );
    // `[policy]`'s rules are compiled once: every tenant holds the same ones.
    let (a, b) = (p.tenant(&acme), p.tenant(&beta));
    assert!(Arc::ptr_eq(&a.global, &b.global));
    assert_eq!(a.global.len(), 2);
    let labels: Vec<&str> = a.rules().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "tenants[acme].policy.tools[0]",
            "policy.tools[0]",
            "policy.tools[1]"
        ]
    );
}

#[test]
fn a_rule_sets_only_what_it_names() {
    // A tenant's rule written for a cost (or a check) had allowed what `[policy]` denied and
    // taken away `[policy]`'s argument checks and rate: the action and the cost now come from
    // the first covering rule that sets them, and every covering rule's limits apply.
    let text = r#"
[gateway]
instance = "policy-test"
workers = 1
[[listeners]]
address = "127.0.0.1:2"
[admin]
address = "127.0.0.1:1"
[kernel]
enabled = false
default_tenant = "beta"
[[tenants]]
name = "acme"
id = 1
[[tenants.policy.tools]]
match = "up/exec"
cost = 5
[[tenants.policy.tools]]
match = "echo"
cost = 3
[[tenants.policy.tools]]
match = "up/open*"
action = "allow"
requests_per_sec = 50
[[tenants]]
name = "beta"
id = 2
[tenants.policy]
default_action = "deny"
[[tenants.policy.tools]]
match = "echo"
action = "allow"
[policy]
default_action = "allow"
[[policy.tools]]
match = "*/exec"
action = "deny"
[[policy.tools]]
match = "open*"
action = "deny"
requests_per_sec = 1
[[policy.tools]]
match = "*"
max_arguments_bytes = 20
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
"#;
    let p = Policy::compile(&Config::from_toml(text).unwrap_or_else(|e| panic!("{e}"))).unwrap();
    let state = Arc::new(State::default());
    let who = |tenant: &str| Identity {
        tenant: p.by_name[tenant],
        agent: None,
        run: None,
        run_signed: false,
        via: Via::Address,
        own: None,
    };
    let (acme, beta) = (who("acme"), who("beta"));
    let t = p.tenant(&acme);

    // The cost rule does not allow what `[policy]` denies.
    let r = admit(&p, &state, &acme, "exec", json!({})).unwrap_err();
    assert_eq!((r.status, &*r.rule), (403, "policy.tools[0]"));
    assert!(!t.allows("up", "exec"));
    // Its cost is the tenant's; `[policy]`'s size cap still applies.
    let echo = t.applied("up", "echo");
    assert_eq!(echo.cost, 3);
    assert_eq!(
        echo.first.map(|r| &*r.label),
        Some("tenants[acme].policy.tools[1]")
    );
    assert!(admit(&p, &state, &acme, "echo", json!({"m": "hi"})).is_ok());
    let r = admit(&p, &state, &acme, "echo", json!({"m": "x".repeat(40)})).unwrap_err();
    assert_eq!(r.rule, "policy.tools[2].max_arguments_bytes");
    // A tenant's explicit `allow` is an exception to `[policy]`'s deny; the tenant's higher
    // rate does not lift `[policy]`'s: a second call within the second is over it.
    assert!(t.allows("up", "open_file"));
    admit(&p, &state, &acme, "open_file", json!({})).unwrap();
    let r = admit(&p, &state, &acme, "open_file", json!({})).unwrap_err();
    assert_eq!(
        (r.status, &*r.rule),
        (429, "policy.tools[1].requests_per_sec")
    );
    // A rule with no `action` (the size cap over `*`) offers nothing a tenant's default
    // denies.
    assert!(admit(&p, &state, &beta, "echo", json!({})).is_ok());
    let r = admit(&p, &state, &beta, "rm", json!({})).unwrap_err();
    assert_eq!(r.rule, "tenants[beta].policy.default_action");
    assert!(!p.tenant(&beta).allows("up", "rm"));
    assert!(p.tenant(&beta).filters());
}

#[test]
fn argument_violations_name_the_rule() {
    let (p, state, who) = acme_policy(
        r#"
[[policy.tools]]
match = "read_file"
[[policy.tools.arguments]]
pointer = "/path"
required = true
pattern = "^/srv/"
"#,
    );
    assert!(admit(&p, &state, &who, "read_file", json!({"path": "/srv/a"})).is_ok());
    let r = admit(
        &p,
        &state,
        &who,
        "read_file",
        json!({"path": "/etc/passwd"}),
    )
    .unwrap_err();
    assert_eq!(r.rule, "policy.tools[0].arguments[0]");
    assert!(r.message.contains("does not match"), "{}", r.message);
    let r = admit(&p, &state, &who, "read_file", json!({})).unwrap_err();
    assert!(r.message.contains("is required"), "{}", r.message);
}

#[test]
fn budgets_run_out_per_scope_refund_and_say_what_is_left() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, tenant = 100, agent = 10, run = 5 }
[[policy.tools]]
match = "search"
cost = 2
"#,
    );
    let a = admit(&p, &state, &who, "search", json!({"q": 1})).unwrap();
    assert_eq!(a.budget_left.as_deref(), Some("tenant=98; agent=8; run=3"));
    admit(&p, &state, &who, "search", json!({"q": 2})).unwrap();
    let r = admit(&p, &state, &who, "search", json!({"q": 3})).unwrap_err();
    assert_eq!((r.status, r.code), (429, code::BUDGET_EXHAUSTED));
    assert_eq!(r.rule, "tenants[acme].policy.budget.run");
    assert_eq!(r.data()["budgetRemaining"], json!({"run": 1}));
    // The refused call charged nothing: another run of the same agent still has 6 of 10.
    let other_run = Identity {
        run: Some("run-2".into()),
        ..who.clone()
    };
    let a = admit(&p, &state, &other_run, "search", json!({"q": 4})).unwrap();
    assert_eq!(a.budget_left.as_deref(), Some("tenant=94; agent=4; run=3"));
}

/// A run named in the header is the caller's own: another agent naming it has a run of its
/// own. A signed token's run is shared by every token naming it, and a header naming it is
/// another run. Before, any agent of the tenant spent another's run budget, a signed one's
/// too, by naming it in the header (an attacker's review).
#[test]
fn a_run_is_its_callers_own_unless_a_token_signed_it() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, run = 2 }
"#,
    );
    let other = Identity {
        agent: Some("other".into()),
        ..who.clone()
    };
    for _ in 0..2 {
        admit(&p, &state, &who, "search", json!({})).unwrap();
    }
    let r = admit(&p, &state, &who, "search", json!({})).unwrap_err();
    assert_eq!(r.rule, "tenants[acme].policy.budget.run");
    assert!(r.message.contains("`run-1`"), "{}", r.message);
    let a = admit(&p, &state, &other, "search", json!({})).unwrap();
    assert_eq!(a.budget_left.as_deref(), Some("run=1"), "its own run-1");
    let signed = |agent: &Identity| Identity {
        run: Some("deploy".into()),
        run_signed: true,
        ..agent.clone()
    };
    let header = Identity {
        run: Some("deploy".into()),
        ..other.clone()
    };
    for _ in 0..2 {
        admit(&p, &state, &header, "search", json!({})).unwrap();
    }
    admit(&p, &state, &signed(&who), "search", json!({})).unwrap();
    let a = admit(&p, &state, &signed(&other), "search", json!({})).unwrap();
    assert_eq!(
        a.budget_left.as_deref(),
        Some("run=0"),
        "shared by its tokens"
    );
    assert!(admit(&p, &state, &signed(&who), "search", json!({})).is_err());
}

/// A run whose first charge is given back (its batch was refused for another member) gives
/// back its place too: a batch of an allowed and a denied call, each with a new run id, took a
/// place for nothing, and one agent took all 1,024 of its tenant's, refusing every other
/// agent's new runs for the window (an attacker's review).
#[test]
fn a_run_whose_first_charge_is_given_back_gives_back_its_place() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, run = 5 }
"#,
    );
    // An agent per run: one agent takes at most half of what the others leave (see
    // `each_caller_takes_at_most_half_of_the_places_the_others_leave`).
    let run = |i: usize| Identity {
        run: Some(format!("run-{i}")),
        agent: Some(format!("bot{i}")),
        ..who.clone()
    };
    for i in 0..MAX_RUNS + 100 {
        let mut a = admit(&p, &state, &run(i), "search", json!({})).expect("a place");
        a.give_back(&state);
    }
    // Three calls of one run in a batch, given back in the batch's order: the first's give
    // back leaves the others' counts; the last's takes the run and its place (a review of the
    // first fix, which returned the place with the first charge alone, found it kept).
    for i in 0..MAX_RUNS + 100 {
        let mut batch: Vec<_> = (0..3)
            .map(|n| admit(&p, &state, &run(5_000 + i), "search", json!({"n": n})).unwrap())
            .collect();
        for a in &mut batch {
            a.give_back(&state);
        }
    }
    state.prune();
    // Every place is still free: as many new runs as there are places.
    for i in 0..MAX_RUNS {
        admit(&p, &state, &run(10_000 + i), "search", json!({})).expect("a place");
    }
    assert!(admit(&p, &state, &run(20_000), "search", json!({})).is_err());
}

/// Each caller takes at most half of the places for runs its tenant's other callers leave:
/// one agent that started a run for each call (a loop, or paying for each) took all of them,
/// and every other agent's new run was refused for the window (the note of stop 72); a first
/// fix that spared a quarter past three quarters was filled by two callers (a review). Now a
/// caller alone takes half, the next half of the rest, and so on: one more caller always
/// finds a place while many are left. Callers known only by their address share one share.
/// Given back, a run gives back its share too; a prune counts them again.
#[test]
fn each_caller_takes_at_most_half_of_the_places_the_others_leave() {
    let budget = "[policy]\nbudget = { window_s = 3600, run = 5 }\n";
    let (p, state, who) = acme_policy(budget);
    let of = |agent: &str, i: usize| Identity {
        run: Some(format!("run-{i}")),
        agent: Some(agent.into()),
        ..who.clone()
    };
    let fill = |agent: &str| {
        (0..)
            .take_while(|&i| admit(&p, &state, &of(agent, i), "search", json!({})).is_ok())
            .count()
    };
    assert_eq!(fill("greedy"), MAX_RUNS / 2, "alone, half");
    let Err(r) = admit(&p, &state, &of("greedy", MAX_RUNS), "search", json!({})) else {
        panic!("a place past the greedy agent's share");
    };
    assert_eq!((r.status, r.code), (429, code::BUDGET_EXHAUSTED));
    assert!(
        r.message
            .contains(&format!("agent `greedy` has {}", MAX_RUNS / 2)),
        "{}",
        r.message
    );
    // Its runs already counted go on.
    admit(&p, &state, &of("greedy", 3), "search", json!({"again": 1})).expect("counted");
    assert_eq!(fill("second"), MAX_RUNS / 4, "half of the rest");
    assert_eq!(fill("third"), MAX_RUNS / 8);
    state.prune();
    assert!(
        admit(&p, &state, &of("honest", 0), "search", json!({})).is_ok(),
        "a new caller still finds a place"
    );
    // Callers known only by their address share one share.
    let (p, state, who) = acme_policy(budget);
    let from = |i: usize| Identity {
        run: Some(format!("run-{i}")),
        agent: None,
        own: None,
        ..who.clone()
    };
    let mut taken = 0;
    for i in 0..MAX_RUNS {
        let source = std::net::IpAddr::from([198, 18, (i / 256) as u8, (i % 256) as u8]);
        if admit_from(&p, &state, &from(i), "search", json!({}), source).is_ok() {
            taken += 1;
        }
    }
    assert_eq!(taken, MAX_RUNS / 2, "every address's run in one share");
    // A run given back gives back its share's place too.
    let (p, state, _) = acme_policy(budget);
    let mut kept = Vec::new();
    for i in 0..MAX_RUNS / 2 {
        kept.push(admit(&p, &state, &of("greedy", i), "search", json!({})).unwrap());
    }
    kept.pop().unwrap().give_back(&state);
    admit(&p, &state, &of("greedy", MAX_RUNS), "search", json!({})).expect("its place back");
    state.prune();
    assert!(admit(&p, &state, &of("greedy", MAX_RUNS + 1), "search", json!({})).is_err());
    assert!(admit(&p, &state, &of("other", 0), "search", json!({})).is_ok());
}

/// A call that costs nothing charges no budget, and takes no place for its run: counted at 0,
/// a run never counted as one, and each of its calls took another place (a review: 1,100
/// free calls of one run refused every other agent's new runs until the next prune).
#[test]
fn a_call_that_costs_nothing_takes_no_place_for_its_run() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, run = 100 }
[[policy.tools]]
match = "free"
cost = 0
"#,
    );
    for i in 0..MAX_RUNS + 100 {
        admit(&p, &state, &who, "free", json!({"i": i})).expect("free");
    }
    let other = Identity {
        agent: Some("other".into()),
        run: Some("new".into()),
        ..who.clone()
    };
    let a = admit(&p, &state, &other, "search", json!({})).expect("a place");
    assert_eq!(a.budget_left.as_deref(), Some("run=99"));
}

/// A run's first call given back while another call of it counts keeps the run's count.
#[test]
fn a_run_counted_by_another_call_stays_when_its_first_is_given_back() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, run = 5 }
"#,
    );
    let mut first = admit(&p, &state, &who, "search", json!({})).unwrap();
    let second = admit(&p, &state, &who, "search", json!({})).unwrap();
    assert_eq!(second.budget_left.as_deref(), Some("run=3"));
    first.give_back(&state);
    let third = admit(&p, &state, &who, "search", json!({})).unwrap();
    assert_eq!(
        third.budget_left.as_deref(),
        Some("run=3"),
        "the second's spend stays"
    );
}

/// A caller with no agent is its address; an IPv6 caller its /64, whose every address is its
/// own to take: one agent budget for them all, not a fresh one per address.
#[test]
fn a_caller_known_by_its_ipv6_address_is_its_64() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, agent = 3 }
"#,
    );
    let anonymous = Identity {
        agent: None,
        run: None,
        ..who
    };
    let call = |source: &str| {
        admit_from(
            &p,
            &state,
            &anonymous,
            "search",
            json!({}),
            source.parse().unwrap(),
        )
    };
    for i in 1..=3 {
        let a = call(&format!("2001:db8:7:7::{i}")).unwrap();
        assert_eq!(a.budget_left, Some(format!("agent={}", 3 - i)));
    }
    let r = call("2001:db8:7:7:ffff::1").unwrap_err();
    assert_eq!(r.code, code::BUDGET_EXHAUSTED, "{}", r.message);
    assert!(r.message.contains("`2001:db8:7:7::`"), "{}", r.message);
    // Another /64 is another caller.
    assert!(call("2001:db8:7:8::1").is_ok());
}

/// A named agent whose name reads as an address (a token's `sub` of `198.51.100.9`) is not the
/// callers with no agent at that address: before, they shared one agent budget, rate and loop
/// count, so either could spend the other's.
#[test]
fn an_agent_named_like_an_address_is_not_the_callers_at_that_address() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, agent = 2 }
"#,
    );
    let named = Identity {
        agent: Some("198.51.100.9".into()),
        run: None,
        ..who.clone()
    };
    let anonymous = Identity {
        agent: None,
        run: None,
        ..who
    };
    let call = |who: &Identity| {
        let source = "198.51.100.9".parse().unwrap();
        admit_from(&p, &state, who, "search", json!({}), source)
    };
    for _ in 0..2 {
        call(&anonymous).expect("the address's own budget");
    }
    assert_eq!(call(&anonymous).unwrap_err().code, code::BUDGET_EXHAUSTED);
    let a = call(&named).expect("the named agent's budget is its own");
    assert_eq!(a.budget_left.as_deref(), Some("agent=1"));
}

/// A credential that names no agent is counted as itself for agent rates, agent budgets and
/// the loop breaker, wherever it connects from: before, each address it used was another
/// caller (a fresh agent budget, rate and loop count per address), and two such keys behind
/// one address shared one.
#[test]
fn a_credential_that_names_no_agent_is_counted_as_itself_not_by_address() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, agent = 2 }
"#,
    );
    let key = |mark: &str| Identity {
        agent: None,
        run: None,
        own: Some(format!("key:{mark}")),
        ..who.clone()
    };
    let (one, two) = (key("01"), key("02"));
    let call = |who: &Identity, source: &str, n: u64| {
        admit_from(
            &p,
            &state,
            who,
            "search",
            json!({ "n": n }),
            source.parse().unwrap(),
        )
    };
    call(&one, "198.51.100.1", 1).expect("the key's first call");
    call(&one, "2001:db8:1::1", 2).expect("the key's second call, from elsewhere");
    let r = call(&one, "198.51.100.77", 3).unwrap_err();
    assert_eq!(r.code, code::BUDGET_EXHAUSTED, "{}", r.message);
    assert!(r.message.contains("this credential"), "{}", r.message);
    assert!(
        !r.message.contains("key:"),
        "its mark is not shown: {}",
        r.message
    );
    // Another key at the same address is another caller.
    let a = call(&two, "198.51.100.1", 1).expect("the other key's own budget");
    assert_eq!(a.budget_left.as_deref(), Some("agent=1"));
    // The loop breaker counts the key too, not its address (a fresh budget for it first).
    let (p, state, _) = acme_policy(
        r#"
[policy]
loop_breaker = { window_s = 60, max_repeats = 2 }
"#,
    );
    let same = |source: &str| {
        admit_from(
            &p,
            &state,
            &one,
            "search",
            json!({ "n": 1 }),
            source.parse().unwrap(),
        )
    };
    same("198.51.100.1").expect("first");
    same("198.51.100.2").expect("second");
    let r = same("198.51.100.3").unwrap_err();
    assert_eq!(r.code, code::LOOP_DETECTED, "{}", r.message);
    assert!(r.message.contains("by this credential"), "{}", r.message);
}

#[test]
fn run_ids_are_bounded_in_length_and_in_number_per_tenant() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, run = 1000 }
"#,
    );
    let c = config("");
    let long = "r".repeat(MAX_RUN_ID_BYTES + 1);
    let r = p
        .authenticate(
            &c.routes[0],
            &headers(&[("x-api-key", KEY_A), ("mcp-run-id", &long)]),
            1,
        )
        .expect_err("refused");
    assert_eq!((r.status, r.code), (400, code::INVALID_REQUEST));
    assert!(r.message.contains("longer than 128"), "{}", r.message);
    // An agent per run: one agent takes at most half of what the others leave (see
    // `each_caller_takes_at_most_half_of_the_places_the_others_leave`).
    let run = |i: usize| Identity {
        run: Some(format!("run-{i}")),
        agent: Some(format!("bot{i}")),
        ..who.clone()
    };
    for i in 0..MAX_RUNS {
        admit(&p, &state, &run(i), "search", json!({"i": i})).expect("a place for the run");
    }
    let r = admit(&p, &state, &run(MAX_RUNS), "search", json!({})).unwrap_err();
    assert_eq!((r.status, r.code), (429, code::BUDGET_EXHAUSTED), "{r:?}");
    assert!(r.message.contains("runs counted"), "{}", r.message);
    // A run already counted goes on; the places are counted again at a prune, not freed.
    admit(&p, &state, &run(7), "search", json!({"again": 1})).expect("a counted run");
    state.prune();
    assert!(admit(&p, &state, &run(MAX_RUNS + 1), "search", json!({})).is_err());
}

/// Places for runs start again with each budget window, and a run carried over from the window
/// before takes one like a new run. Before, a run whose last window's cell was not yet pruned
/// took none: after each rollover, up to 1,024 new runs came on top of those carried over.
#[test]
fn runs_carried_over_into_a_new_window_take_places_like_new_ones() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 1, run = 1000 }
"#,
    );
    // An agent per run: one agent takes at most half of what the others leave (see
    // `each_caller_takes_at_most_half_of_the_places_the_others_leave`).
    let run = |i: usize| Identity {
        run: Some(format!("run-{i}")),
        agent: Some(format!("bot{i}")),
        ..who.clone()
    };
    // Each phase must fall within one second: tried again (at most 5 times) if one did not.
    let start_of_next_second = || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_nanos(
            1_000_000_000 - u64::from(now.subsec_nanos()) + 1_000_000,
        ));
        State::unix_s()
    };
    for attempt in 0..5 {
        let first = start_of_next_second();
        for i in 0..MAX_RUNS {
            admit(&p, &state, &run(i), "search", json!({"i": i})).expect("a place");
        }
        let second = start_of_next_second();
        // The same runs again, in the next window: each takes a place again.
        let carried = (0..MAX_RUNS)
            .filter(|&i| admit(&p, &state, &run(i), "search", json!({"again": i})).is_ok())
            .count();
        let new_run = admit(&p, &state, &run(MAX_RUNS + attempt), "search", json!({}));
        if State::unix_s() != second || second != first + 1 {
            continue;
        }
        assert_eq!(carried, MAX_RUNS);
        let r = new_run.expect_err("the places of the window are taken");
        assert!(r.message.contains("runs counted"), "{}", r.message);
        return;
    }
    panic!("no two phases fell in consecutive seconds in 5 tries");
}

/// A run whose first call costs more than the run's whole budget is refused and counts nothing:
/// its retries do not take the tenant's places for runs (each took one, and 1,024 retries of
/// one run id kept every new run of the tenant out for the window).
#[test]
fn a_run_refused_at_its_first_charge_takes_no_place() {
    let (p, state, who) = acme_policy(
        r#"
[policy]
budget = { window_s = 3600, run = 0 }
"#,
    );
    let stuck = Identity {
        run: Some("stuck".into()),
        ..who.clone()
    };
    for _ in 0..MAX_RUNS + 10 {
        let r = admit(&p, &state, &stuck, "search", json!({})).unwrap_err();
        assert_eq!(r.code, code::BUDGET_EXHAUSTED);
        assert!(!r.message.contains("runs counted"), "{}", r.message);
    }
}

#[test]
fn the_same_call_repeated_is_a_loop_whatever_the_key_order() {
    let (p, state, who) =
        acme_policy("[policy]\nloop_breaker = { max_repeats = 3, window_s = 60 }\n");
    for args in [
        json!({"a": 1, "b": [1, 2]}),
        json!({"b": [1, 2], "a": 1}),
        json!({"a": 1, "b": [1, 2]}),
    ] {
        admit(&p, &state, &who, "search", args).unwrap();
    }
    let r = admit(&p, &state, &who, "search", json!({"b": [1, 2], "a": 1})).unwrap_err();
    assert_eq!(r.code, code::LOOP_DETECTED);
    assert!(r.message.contains("more than 3 times"), "{}", r.message);
    // Other arguments, another tool, another agent: not the loop.
    assert!(admit(&p, &state, &who, "search", json!({"a": 2, "b": [1, 2]})).is_ok());
    assert!(admit(&p, &state, &who, "fetch", json!({"a": 1, "b": [1, 2]})).is_ok());
    let other = Identity {
        agent: Some("other".into()),
        ..who
    };
    assert!(admit(&p, &state, &other, "search", json!({"a": 1, "b": [1, 2]})).is_ok());
}

/// Another spelling of the same call is the same call: a number written as a float, an object
/// sent as a string holding it (respaced), as the servers read them.
#[test]
fn the_same_call_respelled_is_still_the_loop() {
    let (p, state, who) =
        acme_policy("[policy]\nloop_breaker = { max_repeats = 3, window_s = 60 }\n");
    for args in [
        json!({"n": 1, "opts": {"a": 1}}),
        json!({"n": 1.0, "opts": "{\"a\":1}"}),
        json!({"n": 1, "opts": "{ \"a\": 1 }"}),
    ] {
        admit(&p, &state, &who, "search", args).unwrap();
    }
    let r = admit(
        &p,
        &state,
        &who,
        "search",
        json!({"n": 1.0, "opts": "  {\"a\":  1}"}),
    )
    .unwrap_err();
    assert_eq!(r.code, code::LOOP_DETECTED);
    // Past 2^53 too: 1e16 written as a float is the integer 10000000000000000.
    for n in [json!(10_000_000_000_000_000u64), json!(1e16), json!(1e16)] {
        admit(&p, &state, &who, "big", json!({ "n": n })).unwrap();
    }
    assert_eq!(
        admit(
            &p,
            &state,
            &who,
            "big",
            json!({"n": 10_000_000_000_000_000u64})
        )
        .unwrap_err()
        .code,
        code::LOOP_DETECTED
    );
    // A number or truth value written as a string, padded, signed, with leading zeros or `_`:
    // pydantic reads each as the integer 1 (an attacker's review).
    for b in [
        json!(1),
        json!("1"),
        json!(" 1"),
        json!("01"),
        json!("+1"),
        json!("1.0"),
        json!("1_"),
        json!(true),
        json!("True"),
        json!("yes"),
        json!("On"),
        json!("Y"),
        json!("t"),
        // Padded past any length (a later review: 70 zeros and more, each call another).
        json!(format!("{}1", "0".repeat(70))),
        json!(format!("-{}1", "0".repeat(200)).replacen('-', "+", 1)),
        json!(format!("1.{}", "0".repeat(100))),
        // An exponent padded, or the value written with one (a later review: the breaker let
        // `"1e-000…03"` run nine times where three were allowed).
        json!(format!("1e{}", "0".repeat(100))),
        json!(format!("10e-{}1", "0".repeat(100))),
        json!(format!("0.{}1e+{}100", "0".repeat(99), "0".repeat(80))),
        json!("1E0"),
        json!("1.000e+000"),
    ] {
        let state = Arc::new(crate::policy::limits::State::default());
        admit(&p, &state, &who, "add", json!({"a": 7, "b": 1})).unwrap();
        admit(&p, &state, &who, "add", json!({"a": 7, "b": 1})).unwrap();
        admit(&p, &state, &who, "add", json!({"a": 7, "b": 1})).unwrap();
        let r = admit(&p, &state, &who, "add", json!({"a": 7, "b": b})).unwrap_err();
        assert_eq!(r.code, code::LOOP_DETECTED, "{b}");
    }
    // A float's other spellings, the words Python's `float()` reads among them: one call.
    for (first, then) in [
        (json!(0.001), json!(format!("1e-{}3", "0".repeat(70)))),
        (json!("1e-3"), json!(format!("0.{}1", "0".repeat(2)))),
        (json!("inf"), json!(" INFINITY")),
        (json!("-inf"), json!("-Infinity")),
        (json!("nan"), json!("+NaN")),
        (json!(1.5), json!(format!("1.5{}", "0".repeat(200)))),
    ] {
        let state = Arc::new(crate::policy::limits::State::default());
        for _ in 0..3 {
            admit(&p, &state, &who, "note", json!({"text": "f", "x": first})).unwrap();
        }
        let r = admit(&p, &state, &who, "note", json!({"text": "f", "x": then})).unwrap_err();
        assert_eq!(r.code, code::LOOP_DETECTED, "{first} then {then}");
        // Another value is another call.
        admit(&p, &state, &who, "note", json!({"text": "f", "x": "2e-3"})).unwrap();
    }
    // A member that is none (`null`, or the JSON text `null`, spaced) is as absent: the
    // Python SDK's servers give an optional parameter none either way (a later review).
    for tag in [
        json!(null),
        json!("null"),
        json!(" null"),
        json!("\n null "),
    ] {
        let state = Arc::new(crate::policy::limits::State::default());
        for _ in 0..3 {
            admit(&p, &state, &who, "note", json!({"text": "u"})).unwrap();
        }
        let r = admit(&p, &state, &who, "note", json!({"text": "u", "tag": tag})).unwrap_err();
        assert_eq!(r.code, code::LOOP_DETECTED, "{tag}");
    }
    // Zeros inside a number are not padding.
    let state = Arc::new(crate::policy::limits::State::default());
    for _ in 0..3 {
        admit(&p, &state, &who, "add", json!({"a": 7, "b": 1})).unwrap();
    }
    for b in ["10", "100", "1.01", "0.1"] {
        admit(&p, &state, &who, "add", json!({"a": 7, "b": b})).unwrap();
    }
    // Other values are other calls: 1.5, a string that is not JSON, another object.
    assert!(
        admit(
            &p,
            &state,
            &who,
            "search",
            json!({"n": 1.5, "opts": {"a": 1}})
        )
        .is_ok()
    );
    assert!(admit(&p, &state, &who, "search", json!({"n": 1, "opts": "{a:1}"})).is_ok());
    assert!(
        admit(
            &p,
            &state,
            &who,
            "search",
            json!({"n": 1, "opts": {"a": 2}})
        )
        .is_ok()
    );
}

/// The argument keys of `schema` as a pinned tool's approved definition gives them: the tool
/// `add` of upstream `up` listed with that input schema and pinned (`None`: never listed).
fn pinned_keys(schema: Option<Value>) -> Option<Arc<declared::ArgumentKeys>> {
    let pins = pins::Pins::default();
    if let Some(schema) = schema {
        let tool =
            json!({"name": "add", "description": "Adds two integers.", "inputSchema": schema});
        assert!(pins.observe("up", &tool, None));
    }
    pins.call("up", "add", None, crate::policy::pins::Reaches::Upstream)
        .unwrap()
}

/// As [`admit`], with the argument keys of the tool's pinned definition.
fn admit_keyed(
    p: &Policy,
    state: &Arc<State>,
    who: &Identity,
    keys: Option<&declared::ArgumentKeys>,
    args: Value,
) -> Result<Admission, Box<Refusal>> {
    p.admit(
        state,
        who,
        &Ask {
            is_request: true,
            method: "tools/call",
            tool: Some(("up", "add")),
            arguments: Some(&args),
            argument_keys: keys,
            message_bytes: usize::MAX,
            source: src(9, 1),
            held_values: &std::cell::Cell::new(crate::values::MAX),
        },
    )
}

/// The Python SDK's `add(a: int, b: int)`, as pydantic writes its input schema.
fn add_schema() -> Value {
    json!({
        "type": "object",
        "title": "addArguments",
        "properties": {
            "a": {"title": "A", "type": "integer"},
            "b": {"title": "B", "type": "integer"},
        },
        "required": ["a", "b"],
    })
}

/// A junk key nested in an argument whose schema declares its keys (a pydantic model, by
/// `$ref`, optional, or a list of them) does not make another call either: pydantic ignores it
/// there too (a later review: `{"opts": {"path": "/x", "n0": 0}}`, then `n1`...).
#[test]
fn junk_keys_nested_in_a_declared_model_do_not_make_another_call() {
    let (p, _, who) = acme_policy("[policy]\nloop_breaker = { max_repeats = 3, window_s = 60 }\n");
    let opts =
        json!({"properties": {"path": {"type": "string"}}, "required": ["path"], "type": "object"});
    for shape in [
        json!({"$ref": "#/$defs/Opts"}),
        json!({"anyOf": [{"$ref": "#/$defs/Opts"}, {"type": "null"}], "default": null}),
        json!({"type": "array", "items": {"$ref": "#/$defs/Opts"}}),
    ] {
        let schema = json!({"$defs": {"Opts": opts}, "properties": {"opts": shape}, "required": ["opts"], "type": "object"});
        let keys = pinned_keys(Some(schema));
        let keys = keys.as_deref();
        let array = shape["type"] == "array";
        let arg = |junk: Value| {
            let mut o = json!({"path": "/x"});
            if !junk.is_null() {
                o["n"] = junk;
            }
            if array {
                json!({ "opts": [o] })
            } else {
                json!({ "opts": o })
            }
        };
        let state = Arc::new(State::default());
        for i in 0..3 {
            admit_keyed(&p, &state, &who, keys, arg(json!(i))).unwrap();
        }
        let r = admit_keyed(&p, &state, &who, keys, arg(json!("z"))).unwrap_err();
        assert_eq!(r.code, code::LOOP_DETECTED, "{shape}");
        // The declared key's value is still another call.
        let other = if array {
            json!({"opts": [{"path": "/y"}]})
        } else {
            json!({"opts": {"path": "/y"}})
        };
        admit_keyed(&p, &state, &who, keys, other).unwrap();
    }
    // A nested schema that lets other keys in counts them.
    let open = json!({"properties": {"opts": {"type": "object", "properties": {"path": {}}, "additionalProperties": true}}});
    let keys = pinned_keys(Some(open));
    let state = Arc::new(State::default());
    for i in 0..6 {
        admit_keyed(
            &p,
            &state,
            &who,
            keys.as_deref(),
            json!({"opts": {"path": "/x", "n": i}}),
        )
        .unwrap();
    }
    // A schema that names itself is followed only so far.
    let cycle = json!({"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}, "properties": {"n": {"$ref": "#/$defs/N"}}});
    assert!(pinned_keys(Some(cycle)).is_some());
}

/// A junk key the tool does not declare, another in each call, does not make another call:
/// pydantic and zod ignore it, and the tool runs the same call (an attacker's review: the
/// breaker never tripped). Its key as a server reads a declared one still counts.
#[test]
fn keys_the_pinned_schema_does_not_declare_do_not_make_another_call() {
    let (p, state, who) =
        acme_policy("[policy]\nloop_breaker = { max_repeats = 3, window_s = 60 }\n");
    let keys = pinned_keys(Some(add_schema()));
    let keys = keys.as_deref();
    assert!(keys.is_some(), "pydantic's schema declares its keys");
    for args in [
        json!({"a": 9, "b": 1, "nonce1": 1}),
        json!({"a": 9, "b": 1, "nonce2": {"x": [1]}}),
        json!({"a": 9, "b": 1}),
    ] {
        admit_keyed(&p, &state, &who, keys, args).unwrap();
    }
    let r = admit_keyed(
        &p,
        &state,
        &who,
        keys,
        json!({"b": 1, "a": 9, "nonce3": "z"}),
    )
    .unwrap_err();
    assert_eq!(r.code, code::LOOP_DETECTED);
    assert!(r.message.contains("more than 3 times"), "{}", r.message);
    // The declared keys' values still make other calls.
    admit_keyed(&p, &state, &who, keys, json!({"a": 8, "b": 1, "nonce4": 1})).unwrap();
    admit_keyed(&p, &state, &who, keys, json!({"a": 9, "b": 2, "nonce5": 1})).unwrap();
    admit_keyed(&p, &state, &who, keys, json!({"a": 9, "nonce6": 1})).unwrap();
    // zod's schema (`additionalProperties: false`) declares them too.
    let mut zod = add_schema();
    zod["additionalProperties"] = json!(false);
    let keys = pinned_keys(Some(zod));
    let state = Arc::new(State::default());
    for i in 0..3 {
        admit_keyed(
            &p,
            &state,
            &who,
            keys.as_deref(),
            json!({"a": 1, "b": 1, "n": i}),
        )
        .unwrap();
    }
    assert_eq!(
        admit_keyed(
            &p,
            &state,
            &who,
            keys.as_deref(),
            json!({"a": 1, "b": 1, "n": 3})
        )
        .unwrap_err()
        .code,
        code::LOOP_DETECTED
    );
}

/// Keys that read as one number (pydantic's `dict[int, ...]` keys) and strings that read as one
/// UUID (pydantic's `UUID` arguments) are one call however spelled: a review ran one call ten
/// times under `{"1": 5}`, `{"01": 5}`, `{" 1": 5}`..., and seven under spellings of one UUID.
#[test]
fn number_keys_and_uuids_are_one_call_however_spelled() {
    let (p, state, who) =
        acme_policy("[policy]\nloop_breaker = { max_repeats = 3, window_s = 60 }\n");
    for key in ["1", "01", " 1"] {
        admit_keyed(&p, &state, &who, None, json!({"q": {key: 5, "x": 1}})).unwrap();
    }
    for key in ["0_1", "+1", "1.0"] {
        let r = admit_keyed(&p, &state, &who, None, json!({"q": {"x": 1, key: 5}})).unwrap_err();
        assert_eq!(r.code, code::LOOP_DETECTED, "{key}");
    }
    // Keys that are not numbers stay themselves: `t` is no `int` key.
    admit_keyed(&p, &state, &who, None, json!({"q": {"t": 5, "x": 1}})).unwrap();
    let id = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
    let spellings = [
        id.to_owned(),
        id.to_ascii_uppercase(),
        id.replace('-', ""),
        format!("{{{id}}}"),
        format!("urn:uuid:{id}"),
        id.replace('-', "--").replace('a', "-a-"),
    ];
    for (i, s) in spellings.iter().enumerate() {
        let r = admit_keyed(&p, &state, &who, None, json!({"id": s}));
        if i < 3 {
            r.unwrap();
        } else {
            assert_eq!(r.unwrap_err().code, code::LOOP_DETECTED, "{s}");
        }
    }
    // Another UUID, and a string of 31 hex digits, are other calls.
    admit_keyed(
        &p,
        &state,
        &who,
        None,
        json!({"id": id.replace("c8", "c9")}),
    )
    .unwrap();
    admit_keyed(
        &p,
        &state,
        &who,
        None,
        json!({"id": &id.replace('-', "")[1..]}),
    )
    .unwrap();
}

/// A key a server reads as a declared one (`A` for `a`: Go's `encoding/json` does; `file_path`
/// for `filePath`: pydantic does, by name beside the alias) is not dropped: its value makes
/// another call, and it counts as the name it is read as.
#[test]
fn a_declared_key_spelled_otherwise_is_still_part_of_the_call() {
    let (p, state, who) =
        acme_policy("[policy]\nloop_breaker = { max_repeats = 3, window_s = 60 }\n");
    let keys = pinned_keys(Some(add_schema()));
    let keys = keys.as_deref();
    for i in 0..3 {
        admit_keyed(&p, &state, &who, keys, json!({"A": 9, "b": 1, "junk": i})).unwrap();
    }
    // `A` is not dropped: another value of it is another call...
    admit_keyed(&p, &state, &who, keys, json!({"A": 5, "b": 1})).unwrap();
    admit_keyed(&p, &state, &who, keys, json!({"b": 1})).unwrap();
    // ... and the same value is the same call, however `a` is spelled.
    let r = admit_keyed(&p, &state, &who, keys, json!({"a": 9, "b": 1})).unwrap_err();
    assert_eq!(r.code, code::LOOP_DETECTED);

    let state = Arc::new(State::default());
    let keys = pinned_keys(Some(json!({
        "type": "object",
        "properties": {"filePath": {"type": "string"}},
    })));
    let keys = keys.as_deref();
    for path in ["/a", "/b", "/c"] {
        // Each path its own call, as pydantic reads `file_path`.
        admit_keyed(&p, &state, &who, keys, json!({ "file_path": path })).unwrap();
    }
    for i in 0..2 {
        // `filePath` present, pydantic reads it (the alias wins) and no server `file_path`.
        admit_keyed(
            &p,
            &state,
            &who,
            keys,
            json!({"filePath": "/a", "file_path": i}),
        )
        .unwrap();
    }
    assert_eq!(
        admit_keyed(
            &p,
            &state,
            &who,
            keys,
            json!({"filePath": "/a", "fi_le_path": 7})
        )
        .unwrap_err()
        .code,
        code::LOOP_DETECTED
    );
    // A declared snake-case name (the Python SDK's): its camel-case form beside it is junk.
    let state = Arc::new(State::default());
    let keys = pinned_keys(Some(json!({
        "type": "object",
        "properties": {"max_depth": {"type": "integer"}},
    })));
    let keys = keys.as_deref();
    admit_keyed(&p, &state, &who, keys, json!({"maxDepth": 1})).unwrap();
    admit_keyed(&p, &state, &who, keys, json!({"maxDepth": 2})).unwrap();
    for i in 0..2 {
        admit_keyed(
            &p,
            &state,
            &who,
            keys,
            json!({"max_depth": 1, "maxDepth": i}),
        )
        .unwrap();
    }
    assert_eq!(
        admit_keyed(
            &p,
            &state,
            &who,
            keys,
            json!({"max_depth": 1, "maxDepth": 9})
        )
        .unwrap_err()
        .code,
        code::LOOP_DETECTED
    );
}

/// A schema that lets other keys in (`additionalProperties`, or no `properties`), and a tool
/// whose definition the gateway does not know (never listed, or pinning off): every key is
/// part of the call, as before.
#[test]
fn extra_keys_count_where_the_schema_allows_them_or_is_unknown() {
    let (p, _, who) = acme_policy("[policy]\nloop_breaker = { max_repeats = 3, window_s = 60 }\n");
    let mut open = add_schema();
    open["additionalProperties"] = json!(true);
    for schema in [
        Some(open),
        Some(json!({"type": "object"})),
        Some(json!({"type": "object", "additionalProperties": {"type": "integer"}})),
        None,
    ] {
        let keys = pinned_keys(schema.clone());
        assert!(keys.is_none(), "{schema:?}");
        let state = Arc::new(State::default());
        for i in 0..10 {
            assert!(
                admit_keyed(
                    &p,
                    &state,
                    &who,
                    keys.as_deref(),
                    json!({"a": 9, "b": 1, "nonce": i})
                )
                .is_ok(),
                "{schema:?}: {i}"
            );
        }
        for _ in 0..3 {
            admit_keyed(&p, &state, &who, keys.as_deref(), json!({"a": 9, "b": 1})).unwrap();
        }
        assert_eq!(
            admit_keyed(&p, &state, &who, keys.as_deref(), json!({"a": 9, "b": 1}))
                .unwrap_err()
                .code,
            code::LOOP_DETECTED
        );
    }
    // Arguments of declared keys only are counted as one call whether the definition is known
    // or not: pinning a tool does not start its calls' counts afresh.
    let state = Arc::new(State::default());
    let keys = pinned_keys(Some(add_schema()));
    for keys in [None, keys.as_deref(), None] {
        admit_keyed(&p, &state, &who, keys, json!({"a": 9, "b": 1})).unwrap();
    }
    assert_eq!(
        admit_keyed(&p, &state, &who, keys.as_deref(), json!({"b": 1, "a": 9}))
            .unwrap_err()
            .code,
        code::LOOP_DETECTED
    );
}

#[test]
fn rates_per_tenant_and_per_agent() {
    let (p, state, who) = acme_policy(
        "[policy]\nrequests_per_sec = 1\nburst = 5\nagent_requests_per_sec = 1\nagent_burst = 2\n",
    );
    assert!(admit(&p, &state, &who, "t", json!({})).is_ok());
    assert!(admit(&p, &state, &who, "t", json!({})).is_ok());
    let r = admit(&p, &state, &who, "t", json!({})).unwrap_err();
    assert_eq!(
        (r.status, r.rule.as_str()),
        (429, "tenants[acme].agent_requests_per_sec")
    );
    assert!(r.retry_after.is_some());
    // Other agents share the tenant's burst of 5: 3 left (the refused call's tenant token was
    // given back).
    let ok = (0..10)
        .filter(|i| {
            let w = Identity {
                agent: Some(format!("a{i}")),
                ..who.clone()
            };
            admit(&p, &state, &w, "t", json!({})).is_ok()
        })
        .count();
    assert_eq!(ok, 3);
}

/// A notification counts against the rates like a request (a flood of them reached the
/// upstream, or a shared stdio child's queue, unlimited), but a cancellation, the end of a
/// handshake and a client's answer never wait for the tenant's rate: they have one of their own.
#[test]
fn notifications_count_against_rates_but_cancellations_do_not() {
    let (p, state, who) = acme_policy("[policy]\nrequests_per_sec = 1\nburst = 2\n");
    let note = |method: &str| {
        p.admit(
            &state,
            &who,
            &Ask {
                is_request: false,
                method,
                tool: None,
                arguments: None,
                argument_keys: None,
                message_bytes: 2,
                source: src(9, 1),
                held_values: &std::cell::Cell::new(crate::values::MAX),
            },
        )
        .map(|_| ())
        .map_err(|r| (r.status, r.rule))
    };
    assert_eq!(note("notifications/roots/list_changed"), Ok(()));
    assert_eq!(note("notifications/x"), Ok(()));
    assert_eq!(
        note("notifications/x"),
        Err((429, "tenants[acme].requests_per_sec".to_owned()))
    );
    for settles in ["notifications/cancelled", "notifications/initialized", ""] {
        for _ in 0..5 {
            assert_eq!(note(settles), Ok(()), "{settles:?}");
        }
    }
    assert!(
        admit(&p, &state, &who, "t", json!({})).is_err(),
        "the burst is spent"
    );
    // Not unmetered: they have a rate of their own, ten times the tenant's and at least 100 a
    // second (a burst of 100 here, 15 of it taken above).
    let settled = (0..200)
        .filter(|_| note("notifications/cancelled").is_ok())
        .count();
    assert!((80..120).contains(&settled), "{settled} of 200 passed");
    assert_eq!(
        note(""),
        Err((429, "tenants[acme].requests_per_sec".to_owned()))
    );
}

#[test]
fn jwts_are_checked_for_signature_expiry_issuer_and_audience() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let dir = std::env::temp_dir().join(format!("jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    // HS256 key "secret-of-the-test-0123456789abcd" as a JWK (base64url).
    let secret = b"secret-of-the-test-0123456789abcd";
    let k = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, secret);
    std::fs::write(
        &jwks,
        json!({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": k}]}).to_string(),
    )
    .unwrap();
    let c = config(&format!(
        "[auth.jwt]\njwks_file = \"{}\"\nissuer = \"https://idp.test\"\naudience = \"gw\"\nrun_claim = \"run\"\n",
        jwks.display()
    ));
    let mut c = c;
    c.routes[0].auth = vec![AuthMethod::Jwt];
    let p = Policy::compile(&c).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let token = |claims: Value, kid: &str| {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.into());
        encode(&h, &claims, &EncodingKey::from_secret(secret)).unwrap()
    };
    let good = json!({"iss": "https://idp.test", "aud": "gw", "exp": now + 60, "tenant": "beta", "sub": "agent-7", "run": "r9"});
    let auth = |t: &str| {
        let v = format!("Bearer {t}");
        p.authenticate(&c.routes[0], &headers(&[("authorization", v.as_str())]), 0)
    };
    let who = auth(&token(good.clone(), "k1")).unwrap();
    assert_eq!(p.tenant(&who).name, "beta");
    assert_eq!(who.agent.as_deref(), Some("agent-7"));
    assert_eq!(who.run.as_deref(), Some("r9"));
    assert_eq!(who.via, Via::Jwt);
    let mut long_run = good.clone();
    long_run["run"] = json!("r".repeat(MAX_RUN_ID_BYTES + 1));
    assert_eq!(auth(&token(long_run, "k1")).unwrap_err().status, 401);
    let mut expired = good.clone();
    expired["exp"] = json!(now - 120);
    assert_eq!(auth(&token(expired, "k1")).unwrap_err().status, 401);
    let mut within_leeway = good.clone();
    within_leeway["exp"] = json!(now - 10);
    assert!(auth(&token(within_leeway, "k1")).is_ok(), "30 s of leeway");
    let mut early = good.clone();
    early["nbf"] = json!(now + 120);
    assert!(auth(&token(early, "k1")).is_err());
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("other");
    assert!(auth(&token(wrong_aud, "k1")).is_err());
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.test");
    assert!(auth(&token(wrong_iss, "k1")).is_err());
    let mut unknown_tenant = good.clone();
    unknown_tenant["tenant"] = json!("nobody");
    assert!(auth(&token(unknown_tenant, "k1")).is_err());
    assert!(auth(&token(good.clone(), "k2")).is_err(), "unknown kid");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(b"another-secret-0123456789abcdefg"),
    )
    .unwrap();
    assert!(auth(&forged).is_err(), "wrong signature");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn concurrency_caps_per_tenant_and_tool_free_their_slot_when_the_request_ends() {
    let (p, state, who) = acme_policy(
        "[policy]\nmax_concurrent = 3\n[[policy.tools]]\nmatch = \"slow\"\nmax_concurrent = 1\n",
    );
    let first = admit(&p, &state, &who, "slow", json!({"n": 1})).unwrap();
    let r = admit(&p, &state, &who, "slow", json!({"n": 2})).unwrap_err();
    assert_eq!(
        (r.status, r.rule.as_str()),
        (429, "policy.tools[0].max_concurrent")
    );
    let second = admit(&p, &state, &who, "fast", json!({})).unwrap();
    let third = admit(&p, &state, &who, "fast", json!({})).unwrap();
    let r = admit(&p, &state, &who, "fast", json!({})).unwrap_err();
    assert_eq!(r.rule, "tenants[acme].max_concurrent");
    drop((first, second));
    assert!(admit(&p, &state, &who, "slow", json!({"n": 3})).is_ok());
    drop(third);
}

/// JSON text held in strings is read within one message's values for the whole request: the
/// covering rules and the loop breaker share them (each read within its own, and eight rules
/// over one 2 MB string took 89 times a plain request's CPU: a review). Past them the breaker
/// hashes the text without its spacing: respaced, it was another call each time.
#[test]
fn json_text_is_read_once_within_the_requests_values_and_past_them_by_its_text() {
    let zeros = |n: usize, sep: &str| format!("[{}0]", format!("0{sep}").repeat(n - 1));
    let two_rules = "[[policy.tools]]\nmatch = \"*\"\narguments = [{ pointer = \"/a\", required = true }]\n\
         [[policy.tools]]\nmatch = \"search\"\narguments = [{ pointer = \"/a\", required = true }]\n";
    let (p, state, who) = acme_policy(two_rules);
    let most = crate::values::MAX;
    // Read by one rule, 0.6 of the values pass; by two, they are over.
    let r = admit(
        &p,
        &state,
        &who,
        "other",
        json!({ "a": zeros(most * 6 / 10, ",") }),
    );
    assert!(r.is_ok(), "one rule reads it");
    let Err(r) = admit(
        &p,
        &state,
        &who,
        "search",
        json!({ "a": zeros(most * 6 / 10, ",") }),
    ) else {
        panic!("two rules read it within one budget each");
    };
    assert!(r.message.contains("more values"), "{}", r.message);
    // The breaker: text past the values, respaced, is one call.
    let (p, state, who) =
        acme_policy("[policy]\nloop_breaker = { max_repeats = 2, window_s = 60 }\n");
    let over = most + 10;
    admit(&p, &state, &who, "search", json!({ "a": zeros(over, ",") })).unwrap();
    admit(
        &p,
        &state,
        &who,
        "search",
        json!({ "a": zeros(over, ", ") }),
    )
    .unwrap();
    let Err(r) = admit(
        &p,
        &state,
        &who,
        "search",
        json!({ "a": zeros(over, " ,\n") }),
    ) else {
        panic!("respaced, another call");
    };
    assert_eq!(r.code, code::LOOP_DETECTED);
    // Other text is another call.
    admit(
        &p,
        &state,
        &who,
        "search",
        json!({ "a": zeros(over, ",").replace("0]", "1]") }),
    )
    .unwrap();
}

/// A reload that moves a rule keeps its counters: they are named by what the rule covers, not
/// its place. Named by place, a rule added before `slow` gave it fresh counters (the call in
/// flight no longer counted: two ran at once under a cap of one) and another rule its old
/// ones (an attacker's review).
#[test]
fn a_reload_that_moves_a_rule_keeps_its_counters() {
    let slow =
        "[[policy.tools]]\nmatch = \"slow\"\nmax_concurrent = 1\nrequests_per_sec = 1\nburst = 2\n";
    let (p, state, who) = acme_policy(slow);
    let first = admit(&p, &state, &who, "slow", json!({"n": 1})).unwrap();
    // Rules added before it: another pattern's with a cap, the same pattern's with a cost.
    let moved = Policy::compile(&config(&format!(
        "[[policy.tools]]\nmatch = \"nothing\"\naction = \"deny\"\nmax_concurrent = 5\n\
         [[policy.tools]]\nmatch = \"slow\"\ncost = 1\n{slow}"
    )))
    .unwrap();
    let who = acme(&moved);
    let Err(r) = admit(&moved, &state, &who, "slow", json!({"n": 2})) else {
        panic!("admitted");
    };
    assert_eq!(
        (r.status, r.rule.as_str()),
        (429, "policy.tools[2].max_concurrent")
    );
    drop(first);
    // The rate's bucket too: its burst of two was spent by one call and is spent by a second.
    admit(&moved, &state, &who, "slow", json!({"n": 3})).unwrap();
    let Err(r) = admit(&moved, &state, &who, "slow", json!({"n": 4})) else {
        panic!("admitted");
    };
    assert_eq!(r.rule, "policy.tools[2].requests_per_sec");
    // Two rules of one pattern in one scope count apart.
    let (twice, state, who) = acme_policy(&format!("{slow}{slow}"));
    let held = admit(&twice, &state, &who, "slow", json!({})).unwrap();
    let Err(r) = admit(&twice, &state, &who, "slow", json!({})) else {
        panic!("admitted");
    };
    assert_eq!(r.rule, "policy.tools[0].max_concurrent");
    drop(held);
}

/// A JWKS with one HS256 key (`kid` k1) in a temporary directory, and a policy whose first route
/// takes JWTs and API keys, with issuer `https://idp.test`, audience `gw` and run claim `run`.
struct JwtSetup {
    dir: std::path::PathBuf,
    c: Config,
    p: Policy,
}

const SECRET: &[u8] = b"secret-of-the-test-0123456789abcd";

impl JwtSetup {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("jwks-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks = dir.join("jwks.json");
        let k = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, SECRET);
        std::fs::write(
            &jwks,
            json!({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": k}]}).to_string(),
        )
        .unwrap();
        let mut c = config(&format!(
            "[auth.jwt]\njwks_file = \"{}\"\nissuer = \"https://idp.test\"\naudience = \"gw\"\nrun_claim = \"run\"\n",
            jwks.display()
        ));
        c.routes[0].auth = vec![AuthMethod::Jwt, AuthMethod::ApiKey];
        let p = Policy::compile(&c).unwrap();
        Self { dir, c, p }
    }

    fn token_with(header: jsonwebtoken::Header, claims: &Value) -> String {
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn token(claims: &Value) -> String {
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        Self::token_with(h, claims)
    }

    /// Claims of a valid token for beta's agent-7, run r9.
    fn good() -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({"iss": "https://idp.test", "aud": "gw", "exp": now + 60, "tenant": "beta", "sub": "agent-7", "run": "r9"})
    }

    fn auth(&self, pairs: &[(&str, &str)]) -> Result<Identity, Box<Refusal>> {
        self.p.authenticate(&self.c.routes[0], &headers(pairs), 0)
    }

    fn bearer(&self, token: &str) -> Result<Identity, Box<Refusal>> {
        self.auth(&[("authorization", &format!("Bearer {token}"))])
    }
}

impl Drop for JwtSetup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn jwts_must_carry_the_configured_issuer_and_audience_a_string_issuer_and_no_crit() {
    let s = JwtSetup::new("claims");
    assert!(s.bearer(&JwtSetup::token(&JwtSetup::good())).is_ok());
    for claim in ["iss", "aud"] {
        let mut without = JwtSetup::good();
        without.as_object_mut().unwrap().remove(claim);
        let r = s.bearer(&JwtSetup::token(&without)).unwrap_err();
        assert_eq!(r.status, 401, "without `{claim}`");
        assert!(r.message.contains(claim), "{}", r.message);
    }
    // An array holding the issuer is not an issuer.
    let mut array = JwtSetup::good();
    array["iss"] = json!(["https://idp.test", "https://evil.test"]);
    let r = s.bearer(&JwtSetup::token(&array)).unwrap_err();
    assert_eq!(r.status, 401);
    assert!(r.message.contains("`iss` is not a string"), "{}", r.message);
    // A critical extension the gateway does not understand.
    let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    h.crit = Some(vec!["exp-policy".into()]);
    let r = s
        .bearer(&JwtSetup::token_with(h, &JwtSetup::good()))
        .unwrap_err();
    assert_eq!(r.status, 401);
    assert!(r.message.contains("crit"), "{}", r.message);
}

#[test]
fn the_signed_run_wins_over_a_run_header_that_contradicts_it() {
    let s = JwtSetup::new("run");
    let bearer = format!("Bearer {}", JwtSetup::token(&JwtSetup::good()));
    let who = s.auth(&[("authorization", &bearer)]).unwrap();
    assert_eq!(who.run.as_deref(), Some("r9"));
    let who = s
        .auth(&[("authorization", &bearer), ("mcp-run-id", "r9")])
        .unwrap();
    assert_eq!(who.run.as_deref(), Some("r9"), "the same run: fine");
    let r = s
        .auth(&[("authorization", &bearer), ("Mcp-Run-Id", "someone-elses")])
        .unwrap_err();
    assert_eq!((r.status, r.code), (403, code::FORBIDDEN));
    assert!(r.message.contains("mcp-run-id"), "{}", r.message);
    // Without a run claim, the header names the run.
    let mut no_run = JwtSetup::good();
    no_run.as_object_mut().unwrap().remove("run");
    let bearer = format!("Bearer {}", JwtSetup::token(&no_run));
    let who = s
        .auth(&[("authorization", &bearer), ("mcp-run-id", "mine")])
        .unwrap();
    assert_eq!(who.run.as_deref(), Some("mine"));
}

#[test]
fn conflicting_credentials_are_refused_not_resolved() {
    let s = JwtSetup::new("conflict");
    let jwt = format!("Bearer {}", JwtSetup::token(&JwtSetup::good()));
    let bearer_a = format!("Bearer {KEY_A}");
    // Two tenants' keys.
    let r = s
        .auth(&[("authorization", &bearer_a), ("x-api-key", KEY_B)])
        .unwrap_err();
    assert_eq!((r.status, r.code), (403, code::FORBIDDEN));
    assert!(r.message.contains("different callers"), "{}", r.message);
    // A key of acme and a token of beta.
    let r = s.auth(&[("authorization", &jwt), ("x-api-key", KEY_A)]);
    assert_eq!(r.unwrap_err().status, 403);
    // A valid key with an invalid token, and an invalid key with a valid token.
    let mut forged = JwtSetup::token(&JwtSetup::good());
    forged.push('x');
    let r = s.auth(&[
        ("authorization", &format!("Bearer {forged}")),
        ("x-api-key", KEY_A),
    ]);
    assert_eq!(r.unwrap_err().status, 401);
    let r = s.auth(&[("authorization", &jwt), ("x-api-key", "wrong")]);
    assert_eq!(r.unwrap_err().status, 401);
    // An Authorization header the gateway cannot read is not ignored next to a valid key.
    let r = s.auth(&[("authorization", "Basic YTpi"), ("x-api-key", KEY_A)]);
    assert_eq!(r.unwrap_err().status, 401);
    // The same key twice names one caller.
    let who = s
        .auth(&[("authorization", &bearer_a), ("x-api-key", KEY_A)])
        .unwrap();
    assert_eq!(s.p.tenant(&who).name, "acme");
    // A key where the route takes only tokens is refused, not ignored.
    let mut c = config("");
    c.routes[0].auth = vec![AuthMethod::Address];
    let p = Policy::compile(&c).unwrap();
    let r = p.authenticate(&c.routes[0], &headers(&[("x-api-key", KEY_B)]), 1);
    assert_eq!(r.unwrap_err().status, 401);
}

#[test]
fn identity_headers_given_twice_are_refused_even_on_an_open_route() {
    let c = config("");
    let p = Policy::compile(&c).unwrap();
    let bearer = format!("Bearer {KEY_A}");
    for pairs in [
        vec![("x-api-key", KEY_A), ("X-Api-Key", KEY_B)],
        vec![
            ("authorization", bearer.as_str()),
            ("authorization", "Bearer x"),
        ],
        vec![
            ("x-api-key", KEY_A),
            ("mcp-run-id", "a"),
            ("Mcp-Run-Id", "b"),
        ],
        vec![
            ("x-api-key", KEY_A),
            ("mcp-session-id", "s1"),
            ("mcp-session-id", "s2"),
        ],
    ] {
        for route in &c.routes {
            let r = p
                .authenticate(route, &headers(&pairs), 1)
                .expect_err("refused");
            assert_eq!(
                (r.status, r.code),
                (400, code::INVALID_REQUEST),
                "{pairs:?}"
            );
            assert!(r.message.contains("more than once"), "{}", r.message);
        }
    }
    let mut not_utf8 = headers(&[("x-api-key", KEY_A)]);
    not_utf8.push("mcp-run-id", &[0xff, 0xfe]);
    assert_eq!(
        p.authenticate(&c.routes[0], &not_utf8, 0)
            .unwrap_err()
            .status,
        400
    );
}

#[test]
fn an_admission_given_back_leaves_budgets_rates_and_loop_counts_as_they_were() {
    let (p, state, who) = acme_policy(
        "[policy]\nrequests_per_sec = 1\nburst = 3\nbudget = { window_s = 3600, agent = 2 }\nloop_breaker = { max_repeats = 1, window_s = 60 }\n",
    );
    // A batch of two: the first is admitted, the second refused (the loop breaker); the
    // first's charges go back.
    let mut first = admit(&p, &state, &who, "t", json!({"n": 1})).unwrap();
    assert_eq!(first.budget_left.as_deref(), Some("agent=1"));
    let r = admit(&p, &state, &who, "t", json!({"n": 1})).unwrap_err();
    assert_eq!(r.code, code::LOOP_DETECTED);
    first.give_back(&state);
    // All of the budget, the burst and the loop count are there again.
    let a = admit(&p, &state, &who, "t", json!({"n": 1})).unwrap();
    assert_eq!(a.budget_left.as_deref(), Some("agent=1"));
    let b = admit(&p, &state, &who, "t", json!({"n": 2})).unwrap();
    assert_eq!(b.budget_left.as_deref(), Some("agent=0"));
    // A request refused by its budget gives back its rate token (a burst of 3, two taken): the
    // next is refused by the budget again, not by the rate.
    for n in [3, 4] {
        let r = admit(&p, &state, &who, "t", json!({ "n": n })).unwrap_err();
        assert_eq!(r.code, code::BUDGET_EXHAUSTED);
    }
    let mut b = b;
    b.give_back(&state);
    assert!(admit(&p, &state, &who, "t", json!({"n": 5})).is_ok());
}

#[test]
fn a_tenants_tool_errors_open_its_own_breaker_not_the_others() {
    use breaker::{Breakers, names};
    let c: crate::config::RawBreaker =
        toml::from_str("consecutive_failures = 2\nopen_ms = 60000").unwrap();
    const LEASE: std::time::Duration = std::time::Duration::from_secs(60);
    let breakers = Breakers::default();
    let now = 1_000_000;
    let acme = names("up", "search", "acme");
    let beta = names("up", "search", "beta");
    assert_eq!(acme[0], beta[0], "the upstream's breaker is shared");
    assert_ne!(acme[1], beta[1], "the tool's is per tenant");
    for _ in 0..2 {
        for (name, tool_level) in &acme {
            let pass = breakers.allow(name, now, &c, LEASE).unwrap();
            // acme's calls end in `isError`: a failure of the tool, not of the upstream.
            breakers.record(name, now, &c, pass, !tool_level);
        }
    }
    assert!(
        breakers.allow(&acme[1].0, now, &c, LEASE).is_err(),
        "acme's tool: open"
    );
    assert!(
        breakers.allow(&beta[1].0, now, &c, LEASE).is_ok(),
        "beta's tool: closed"
    );
    assert!(
        breakers.allow(&beta[0].0, now, &c, LEASE).is_ok(),
        "the upstream: closed"
    );
}

#[test]
fn the_rule_cache_is_bounded_in_bytes() {
    let (p, _, who) = acme_policy("[[policy.tools]]\nmatch = \"fail\"\naction = \"deny\"\n");
    let t = p.tenant(&who);
    // 2 KiB keys (resource URIs are allowed that long): 2,000 of them would be 4 MiB.
    for i in 0..2_000 {
        let name = format!("{i:0>2048}");
        assert!(t.allows("up", &name));
    }
    let (entries, bytes) = t.matched_size();
    assert!(bytes <= MAX_MATCHED_BYTES, "{bytes} bytes cached");
    assert!(entries < 600, "{entries} entries of 2 KiB cached");
    // Past the bound, rules still apply (they are matched, only not cached).
    assert!(!t.allows("up", "fail"));
}

#[test]
fn method_rules_refuse_what_tool_rules_do_not_cover() {
    let text = r#"
[gateway]
instance = "t"
workers = 1
[[listeners]]
address = "127.0.0.1:2"
[admin]
address = "127.0.0.1:1"
[kernel]
enabled = false
default_tenant = "beta"
[[tenants]]
name = "acme"
id = 1
[[tenants.policy.methods]]
match = "resources/read"
action = "deny"
[[tenants.policy.methods]]
match = "completion/complete"
action = "allow"
[[tenants.policy.methods]]
match = "tasks/*"
action = "deny"
[[tenants]]
name = "beta"
id = 2
[[tenants]]
name = "gamma"
id = 3
[[tenants.policy.methods]]
match = "initialize"
action = "allow"
[[tenants.policy.methods]]
match = "**"
action = "deny"
[policy]
[[policy.methods]]
match = "completion/complete"
action = "deny"
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
"#;
    let c = Config::from_toml(text).unwrap_or_else(|e| panic!("{e}"));
    let p = Policy::compile(&c).unwrap();
    let state = Arc::new(State::default());
    let who = |name: &str| Identity {
        tenant: p.by_name[name],
        agent: None,
        run: None,
        run_signed: false,
        via: Via::Address,
        own: None,
    };
    let ask = |tenant: &str, method: &str, is_request: bool| {
        let tool = (method == "tools/call").then_some(("up", "echo"));
        p.admit(
            &state,
            &who(tenant),
            &Ask {
                is_request,
                method,
                tool,
                arguments: None,
                argument_keys: None,
                message_bytes: 2,
                source: src(9, 1),
                held_values: &std::cell::Cell::new(crate::values::MAX),
            },
        )
        .map(|_| ())
        .map_err(|r| (r.status, r.code, r.rule))
    };
    let denied = |rule: &str| Err((403, code::FORBIDDEN, rule.to_owned()));
    // acme: its own rules first, then `[policy]`'s.
    assert_eq!(
        ask("acme", "resources/read", true),
        denied("tenants[acme].policy.methods[0]")
    );
    assert_eq!(ask("acme", "resources/list", true), Ok(()));
    assert_eq!(ask("acme", "completion/complete", true), Ok(()));
    for m in ["tasks/get", "tasks/result", "tasks/list", "tasks/cancel"] {
        assert_eq!(
            ask("acme", m, true),
            denied("tenants[acme].policy.methods[2]")
        );
    }
    // `*` stops at `/`: a method of another depth is not covered.
    assert_eq!(ask("acme", "tasks/a/b", true), Ok(()));
    assert_eq!(ask("acme", "tools/call", true), Ok(()));
    // beta: `[policy]`'s alone.
    assert_eq!(
        ask("beta", "completion/complete", true),
        denied("policy.methods[0]")
    );
    assert_eq!(ask("beta", "resources/read", true), Ok(()));
    // gamma: an allow list; `**` covers every method, a tool call included.
    assert_eq!(ask("gamma", "initialize", true), Ok(()));
    for m in ["tools/call", "tools/list", "ping", "a/b/c"] {
        assert_eq!(
            ask("gamma", m, true),
            denied("tenants[gamma].policy.methods[1]")
        );
    }
    // Notifications are ruled too (a request without an id is refused before policy), but
    // for what every session needs settled: its handshake's end, a cancellation, an answer.
    assert_eq!(
        ask("gamma", "notifications/roots/list_changed", false),
        denied("tenants[gamma].policy.methods[1]")
    );
    assert_eq!(ask("gamma", "notifications/cancelled", false), Ok(()));
    assert_eq!(ask("gamma", "notifications/initialized", false), Ok(()));
    assert_eq!(ask("gamma", "", false), Ok(()), "a client's answer");
    assert_eq!(ask("acme", "notifications/message", false), Ok(()));
    // A bad glob is refused at load, naming its key.
    let bad = text.replace("match = \"tasks/*\"", "match = \"tasks/[\"");
    let e = Config::from_toml(&bad).unwrap_err().to_string();
    assert!(e.contains("tenants[acme].policy.methods[2].match"), "{e}");
}
