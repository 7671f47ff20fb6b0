use std::path::PathBuf;

use super::*;
use crate::config::{Config, DEFAULT_CONFIG, Target};

const MINIMAL: &str = r#"
[gateway]
instance = "t"
[[listeners]]
address = "127.0.0.1:18080"
[admin]
address = "127.0.0.1:19090"
[kernel]
enabled = false
[[upstreams]]
name = "demo"
url = "http://127.0.0.1:9100/mcp"
[[routes]]
path = "/mcp"
upstream = "demo"
"#;

fn load(text: &str, opts: LoadOptions) -> Result<Config, String> {
    toml::from_str::<RawConfig>(text)
        .map_err(|e| e.to_string())?
        .validate_with(opts)
        .map_err(|e| e.to_string())
}

fn err(text: &str) -> String {
    load(text, LoadOptions::default()).expect_err("must be refused")
}

const OFF_HOST: LoadOptions = LoadOptions {
    no_env: true,
    offline: true,
    no_host: true,
};

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/ exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_is_valid() {
    let files = examples();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "single-host-tls",
        "federation",
        "multi-tenant-strict",
        "fleet",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "examples/{want}.toml missing"
        );
    }
    for f in &files {
        let c =
            Config::from_file_with(f, OFF_HOST).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!c.routes.is_empty(), "{}: routes nothing", f.display());
    }
}

#[test]
fn examples_use_what_they_say() {
    let load = |name: &str| {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{name}.toml"));
        Config::from_file_with(&path, OFF_HOST).unwrap()
    };
    let tls = load("single-host-tls");
    assert!(tls.listeners[0].tls.is_some());
    let fed = load("federation");
    assert!(matches!(&fed.routes[0].target, Target::Federation(m) if m.len() == 3));
    assert!(fed.upstreams.iter().any(|u| u.stdio.is_some()));
    let strict = load("multi-tenant-strict");
    assert_eq!(
        strict.policy.default_action,
        Some(crate::config::Action::Deny)
    );
    assert!(strict.tenants.len() >= 3);
    // Its allow-lists say `allow`: a rule without `action` offers nothing under a default deny.
    let policy = crate::policy::Policy::compile(&strict).unwrap();
    let acme = policy.tenants.iter().find(|t| t.name == "acme").unwrap();
    assert!(acme.allows("crm", "search_contacts") && acme.allows("crm", "update_contact"));
    assert!(!acme.allows("crm", "delete_contact"));
    let fleet = load("fleet");
    assert!(fleet.listeners[0].proxy_protocol.is_some());
}

#[test]
fn a_rule_naming_a_missing_upstream_is_refused() {
    let e = err(&format!(
        "{MINIMAL}[policy]\ntools = [{{ match = \"demoo/echo\", action = \"deny\" }}]\n"
    ));
    assert!(
        e.contains("policy.tools[0].match") && e.contains("demoo"),
        "{e}"
    );
    let e = err(&format!(
        "{MINIMAL}[[tenants]]\nname = \"a\"\nid = 0\n[tenants.policy]\ntools = [{{ match = \"git*/echo\" }}]\n"
    ));
    assert!(e.contains("tenants[a].policy.tools[0].match"), "{e}");
    let e = err(&format!(
        "{MINIMAL}[policy]\npins = [{{ upstream = \"nope\", tool = \"echo\", sha256 = \"{}\" }}]\n",
        "0".repeat(64)
    ));
    assert!(
        e.contains("policy.pins[0].upstream") && e.contains("nope"),
        "{e}"
    );
    // A literal name, a glob matching one, and a bare tool name are fine.
    for pattern in ["demo/echo", "d*/echo", "*/delete_*", "echo"] {
        load(
            &format!("{MINIMAL}[policy]\ntools = [{{ match = \"{pattern}\" }}]\n"),
            LoadOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{pattern}: {e}"));
    }
}

#[test]
fn an_api_key_route_without_keys_is_refused() {
    let text = MINIMAL.replace(
        "upstream = \"demo\"\n",
        "upstream = \"demo\"\nauth = [\"api_key\"]\n",
    );
    let e = err(&text);
    assert!(
        e.contains("routes[0].auth") && e.contains("api_keys"),
        "{e}"
    );
    let with_key = format!(
        "{}[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"a\"\n[[tenants]]\nname = \"a\"\nid = 0\n",
        text.replace("enabled = false", "enabled = false\ndefault_tenant = \"a\""),
        "a".repeat(64)
    );
    load(&with_key, LoadOptions::default()).unwrap();
}

#[test]
fn milliseconds_below_the_floor_suggest_seconds() {
    let e = err(&format!("{MINIMAL}[http]\nrequest_timeout_ms = 30\n"));
    assert!(
        e.contains("http.request_timeout_ms") && e.contains("did you mean 30 seconds (30000)"),
        "{e}"
    );
    let e = err(&MINIMAL.replace(
        "url = \"http://127.0.0.1:9100/mcp\"",
        "url = \"http://127.0.0.1:9100/mcp\"\nconnect_timeout_ms = 2",
    ));
    assert!(e.contains("upstreams[0].connect_timeout_ms"), "{e}");
    let e = err(&MINIMAL.replace(
        "url = \"http://127.0.0.1:9100/mcp\"",
        "url = \"http://127.0.0.1:9100/mcp\"\nbreaker = { consecutive_failures = 3, open_ms = 5 }",
    ));
    assert!(e.contains("upstreams[0].breaker.open_ms"), "{e}");
    // The floor itself, and 0 where a field gives it a meaning, pass.
    load(
        &format!("{MINIMAL}[http]\nrequest_timeout_ms = {MS_FLOOR}\n"),
        LoadOptions::default(),
    )
    .unwrap();
    load(
        &MINIMAL.replace(
            "url = \"http://127.0.0.1:9100/mcp\"",
            "url = \"http://127.0.0.1:9100/mcp\"\nresolve_every_ms = 0",
        ),
        LoadOptions::default(),
    )
    .unwrap();
}

#[test]
fn a_rate_without_a_burst_admits_one_seconds_worth() {
    let minimal = MINIMAL.replace("enabled = false", "enabled = false\ndefault_tenant = \"a\"");
    let c = load(
        &format!(
            "{minimal}[[tenants]]\nname = \"a\"\nid = 0\nnew_connections_per_sec = 100\nper_source_new_connections_per_sec = 7\n"
        ),
        LoadOptions::default(),
    )
    .unwrap();
    let t = &c.tenants[0];
    assert_eq!(t.new_connections_burst, 100);
    assert_eq!(t.per_source_new_connections_burst, 7);
    // What the kernel program gets: a tolerance of 100 intervals, not 1.
    let state = crate::kernel::KernelState::from_config(&c);
    let limits = state.limits[0].1;
    assert_eq!(limits.conn_tolerance_ns, 100 * limits.conn_interval_ns);
    // A burst given stays as given.
    let c = load(
        &format!(
            "{minimal}[[tenants]]\nname = \"a\"\nid = 0\nnew_connections_per_sec = 100\nnew_connections_burst = 3\n"
        ),
        LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(c.tenants[0].new_connections_burst, 3);
}

#[test]
fn no_env_checks_without_the_secrets() {
    let var = "MCP_GATEWAY_CFG_TEST_SURELY_UNSET";
    let text = MINIMAL
        .replace(
            "127.0.0.1:19090\"",
            &format!("10.0.0.2:19090\"\ntoken_env = \"{var}\""),
        )
        .replace(
            "url = \"http://127.0.0.1:9100/mcp\"",
            &format!("url = \"http://127.0.0.1:9100/mcp\"\nbearer_token_env = \"{var}\""),
        );
    let e = err(&text);
    assert!(e.contains(var), "{e}");
    let opts = LoadOptions {
        no_env: true,
        ..LoadOptions::default()
    };
    let c = load(&text, opts).unwrap();
    assert_eq!(c.admin_token.as_deref(), Some(ENV_PLACEHOLDER));
}

#[test]
fn offline_checks_without_dns() {
    let text = MINIMAL.replace("127.0.0.1:9100", "no-such-host.invalid:9100");
    let e = err(&text);
    assert!(e.contains("cannot resolve"), "{e}");
    let opts = LoadOptions {
        offline: true,
        ..LoadOptions::default()
    };
    let c = load(&text, opts).unwrap();
    assert_eq!(c.upstreams[0].authority, "no-such-host.invalid:9100");
}

#[test]
fn host_facts_are_found_by_check() {
    let text = MINIMAL.replace(
        "enabled = false",
        "enabled = true\ninterfaces = [\"lo\", \"nosuch0\"]",
    );
    let c = load(&text, LoadOptions::default()).unwrap();
    let e = c.check_host().expect_err("no such interface").to_string();
    assert!(
        e.contains("kernel.interfaces[1]") && e.contains("nosuch0"),
        "{e}"
    );
    let c = load(&text.replace(", \"nosuch0\"", ""), LoadOptions::default()).unwrap();
    c.check_host().unwrap();

    let audit = format!("{MINIMAL}[audit]\npath = \"/nonexistent-dir-cfg-test/audit.jsonl\"\n");
    let e = err(&audit);
    assert!(
        e.contains("audit.path") && e.contains("does not exist"),
        "{e}"
    );
    load(&audit, OFF_HOST).unwrap();
}

#[test]
fn the_default_shows_the_policy_on_a_second_route() {
    let c = Config::embedded_default();
    let governed = c
        .routes
        .iter()
        .find(|r| r.path == "/mcp/governed")
        .expect("a governed route");
    assert_eq!(governed.auth, vec![crate::config::AuthMethod::ApiKey]);
    let key = &c.auth.api_keys[0];
    assert_eq!(key.sha256, crate::config::sha256_hex(DEMO_API_KEY));
    let demo = c.tenants.iter().find(|t| t.name == key.tenant).unwrap();
    let p = demo.policy.as_ref().expect("the demo tenant's policy");
    assert!(
        p.tools
            .iter()
            .any(|r| r.action == Some(crate::config::Action::Deny))
    );
    assert!(p.budget.is_some());
    assert!(
        DEFAULT_CONFIG.contains(DEMO_API_KEY),
        "the file says the key"
    );
}
