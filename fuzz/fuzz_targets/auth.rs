//! Authentication and rules on arbitrary headers, tool names and arguments: never a panic; an
//! identity by API key only when a configured key was presented; a JWT identity only for a token
//! signed with the configured key (the fuzzer cannot forge one, so never).
#![no_main]

use std::{net::IpAddr, sync::Arc};

use gateway::{
    config::Config,
    policy::{Ask, Policy, Via, limits::State, sha256_hex},
};
use libfuzzer_sys::fuzz_target;

const KEY_A: &str = "key-of-acme-0123456789";
const KEY_B: &str = "key-of-beta-0123456789";

struct Fixture {
    config: Config,
    policy: Policy,
    state: Arc<State>,
}

fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!("fuzz-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let jwks = dir.join("jwks.json");
    // HS256 key (base64url of "secret-of-the-fuzz-0123456789abcd").
    std::fs::write(
        &jwks,
        r#"{"keys":[{"kty":"oct","kid":"k1","alg":"HS256","k":"c2VjcmV0LW9mLXRoZS1mdXp6LTAxMjM0NTY3ODlhYmNk"}]}"#,
    )
    .expect("jwks");
    let text = format!(
        r#"
[gateway]
instance = "fuzz"
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
[[tenants.policy.tools]]
match = "del*"
action = "deny"
[[tenants.policy.tools]]
match = "read_file"
action = "allow"
requests_per_sec = 1000
max_arguments_bytes = 4096
[[tenants.policy.tools.arguments]]
pointer = "/path"
required = true
type = "string"
pattern = "^/srv/[a-z/]+$"
max_length = 64
[tenants.policy.budget]
window_s = 60
tenant = 1000000
[[tenants]]
name = "beta"
id = 2
[[auth.api_keys]]
sha256 = "{a}"
tenant = "acme"
agent = "acme-bot"
[[auth.api_keys]]
sha256 = "{b}"
tenant = "beta"
[auth.jwt]
jwks_file = "{jwks}"
issuer = "https://idp.test"
audience = "gw"
run_claim = "run"
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
auth = ["api_key", "jwt", "address"]
"#,
        a = sha256_hex(KEY_A),
        b = sha256_hex(KEY_B),
        jwks = jwks.display(),
    );
    let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("fixture config: {e}"));
    let policy = Policy::compile(&config).expect("fixture policy");
    Fixture {
        config,
        policy,
        state: Arc::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    let f = F.get_or_init(fixture);
    // Lines `name: value`, then a last part (after 0xff) of `tool\0arguments-JSON`.
    let (head, rest) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let headers: gateway::http::Fields = head
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let i = line.iter().position(|b| *b == b':')?;
            Some((
                String::from_utf8_lossy(&line[..i]).into_owned(),
                line[i + 1..].to_vec(),
            ))
        })
        .collect();
    let source_tenant = u32::from(data.first().copied().unwrap_or(0) % 3);
    let Ok(who) = f
        .policy
        .authenticate(&f.config.routes[0], &headers, source_tenant)
    else {
        return;
    };
    match who.via {
        Via::ApiKey => assert!(
            headers.iter().any(|(_, v)| {
                let v = String::from_utf8_lossy(v);
                v.contains(KEY_A) || v.contains(KEY_B)
            }),
            "an API-key identity without a configured key: {headers:?}"
        ),
        Via::Jwt => panic!("a JWT identity from a token the fuzzer cannot sign: {headers:?}"),
        Via::Address => {}
        Via::Mtls => panic!("an mTLS identity on a connection without a certificate: {headers:?}"),
    }
    let (tool, args) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let tool = String::from_utf8_lossy(tool);
    let arguments: Option<serde_json::Value> = serde_json::from_slice(args).ok();
    let ask = Ask {
        is_request: true,
        method: "tools/call",
        tool: Some(("up", &tool)),
        arguments: arguments.as_ref(),
        argument_keys: None,
        message_bytes: data.len(),
        source: IpAddr::from([198, 18, 1, 7]),
        held_values: &std::cell::Cell::new(gateway::values::MAX),
    };
    if let Ok(mut admission) = f.policy.admit(&f.state, &who, &ask) {
        admission.give_back(&f.state);
    }
});
