use super::*;
use crate::config::Config;

const KEY_A: &str = "key-of-acme-0123456789";
const KEY_B: &str = "key-of-beta-0123456789";

fn hex(key: &str) -> String {
    crate::config::sha256_hex(key)
}

/// A configuration with `keys` (key, tenant) and `/mcp` accepting `auth`.
fn config(keys: &[(&str, &str)], auth: &str) -> Config {
    let keys: String = keys
        .iter()
        .map(|(k, t)| {
            format!(
                "[[auth.api_keys]]\nsha256 = \"{}\"\ntenant = \"{t}\"\n",
                hex(k)
            )
        })
        .collect();
    Config::from_toml(&format!(
        r#"
[gateway]
instance = "rejudge-test"
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
{keys}
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
auth = {auth}
"#
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn admitted(c: &Config, key: &str, address_tenant: u32) -> Admission {
    let p = Policy::compile(c).unwrap();
    let headers: crate::http::Fields = [("x-api-key".to_owned(), key.as_bytes().to_vec())]
        .into_iter()
        .collect();
    let (who, proofs) = p
        .authenticate_proving(
            &c.routes[0],
            &headers,
            address_tenant,
            mtls::ClientCert::Plaintext,
            false,
        )
        .unwrap();
    assert_eq!(proofs.len(), 1);
    let a = Admission::new(&p, "/mcp", &who, &proofs);
    // What a connection keeps is made again only for another caller or route.
    assert!(a.is(&p, "/mcp", &who, &proofs));
    assert!(!a.is(&p, "/other", &who, &proofs) && !a.is(&p, "/mcp", &who, &[]));
    a
}

fn holds(a: &Admission, c: &Config, address_tenant: u32) -> bool {
    a.holds(c, &Policy::compile(c).unwrap(), address_tenant, None)
}

/// An API key's admission holds under a configuration that changes nothing about it, and not
/// once the key is gone, names another tenant, the route is gone or stops taking keys, or the
/// tenant is gone.
#[test]
fn an_api_key_admission_holds_until_a_reload_revokes_it() {
    let before = config(&[(KEY_A, "beta"), (KEY_B, "beta")], r#"["api_key"]"#);
    let a = admitted(&before, KEY_A, 0);
    assert!(holds(&a, &before, 0));
    // Another key removed; a method added to the route: nothing about this caller.
    let other_gone = config(&[(KEY_A, "beta")], r#"["api_key", "address"]"#);
    assert!(holds(&a, &other_gone, 0));
    let revoked = config(&[(KEY_B, "beta")], r#"["api_key"]"#);
    assert!(!holds(&a, &revoked, 0));
    let moved = config(&[(KEY_A, "acme"), (KEY_B, "beta")], r#"["api_key"]"#);
    assert!(!holds(&a, &moved, 0));
    let no_keys = config(&[(KEY_A, "beta")], r#"["address"]"#);
    assert!(!holds(&a, &no_keys, 0));
    let mut gone = config(&[(KEY_A, "beta")], r#"["api_key"]"#);
    gone.routes[0].path = "/elsewhere".into();
    assert!(!holds(&a, &gone, 0));
    // The address now classified as another tenant's: refused like a new request.
    assert!(!holds(&a, &before, 1));
}
