use super::*;
use crate::{
    http::Fields,
    policy::{Policy, Via},
};

const KEY: &str = "key-of-beta-0123456789";

fn config(extra: &str, tls: bool) -> Result<Config, ConfigError> {
    use sha2::Digest as _;
    let digest: String = sha2::Sha256::digest(KEY)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tls = if tls {
        "[listeners.tls]\ncertificates = [{ cert = \"c.pem\", key = \"k.pem\" }]\nclient_ca = \"ca.pem\"\n"
    } else {
        ""
    };
    Config::from_toml(&format!(
        r#"
[gateway]
instance = "mtls-test"
workers = 1
[[listeners]]
address = "127.0.0.1:2"
{tls}
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
[[tenants]]
name = "beta"
id = 2
[[auth.api_keys]]
sha256 = "{digest}"
tenant = "beta"
[[upstreams]]
name = "up"
url = "http://127.0.0.1:9/mcp"
[[routes]]
path = "/mcp"
upstream = "up"
auth = ["mtls", "api_key"]
{extra}
"#
    ))
}

const MAP: &str = r#"
[[auth.mtls]]
uri = "spiffe://example.org/agent/a"
tenant = "acme"
agent = "agent-a"
[[auth.mtls]]
dns = "Robot.Example.org"
tenant = "beta"
[[auth.mtls]]
cn = "both"
tenant = "beta"
"#;

fn cert(uris: &[&str], dns: &[&str], cn: Option<&str>) -> PeerCert {
    PeerCert {
        uris: uris.iter().map(|s| (*s).to_owned()).collect(),
        dns: dns.iter().map(|s| (*s).to_owned()).collect(),
        cns: cn.into_iter().map(str::to_owned).collect(),
        chain: Vec::new(),
        expires: None,
    }
}

#[test]
fn a_certificate_names_its_mapped_caller_and_conflicts_are_refused() {
    let c = config(MAP, true).unwrap();
    let p = Policy::compile(&c).unwrap();
    let route = &c.routes[0];
    let a = cert(&["spiffe://example.org/agent/a"], &[], Some("x"));
    let who = p
        .authenticate_with(route, &Fields::default(), 0, ClientCert::Present(&a), true)
        .unwrap();
    assert_eq!(
        (who.tenant, who.agent.as_deref(), who.via),
        (1, Some("agent-a"), Via::Mtls)
    );
    // DNS names compare without case.
    let b = cert(&[], &["robot.example.org"], None);
    let who = p
        .authenticate_with(route, &Fields::default(), 0, ClientCert::Present(&b), true)
        .unwrap();
    assert_eq!(who.tenant, 2);
    // Two names of one certificate naming different callers: refused, not resolved.
    let two = cert(&["spiffe://example.org/agent/a"], &[], Some("both"));
    let r = p
        .authenticate_with(
            route,
            &Fields::default(),
            0,
            ClientCert::Present(&two),
            true,
        )
        .unwrap_err();
    assert_eq!(r.status, 403);
    assert!(r.message.contains("different callers"), "{}", r.message);
    // Unmapped: 403.
    let none = cert(&["spiffe://example.org/agent/z"], &[], Some("z"));
    let r = p
        .authenticate_with(
            route,
            &Fields::default(),
            0,
            ClientCert::Present(&none),
            true,
        )
        .unwrap_err();
    assert_eq!(r.status, 403);
    // Beside an API key of another tenant: 403; of the same caller: the key's identity.
    let key: Fields = [("x-api-key", KEY)].into_iter().collect();
    let r = p
        .authenticate_with(route, &key, 0, ClientCert::Present(&a), true)
        .unwrap_err();
    assert_eq!(r.status, 403);
    assert!(
        p.authenticate_with(route, &key, 0, ClientCert::Present(&b), true)
            .is_ok()
    );
    // No certificate, or a plaintext connection: 401, saying which.
    for (cert, says) in [
        (ClientCert::Absent, "no client certificate"),
        (ClientCert::Plaintext, "TLS listener"),
    ] {
        let r = p
            .authenticate_with(route, &Fields::default(), 0, cert, true)
            .unwrap_err();
        assert_eq!(r.status, 401);
        assert!(r.message.contains(says), "{}", r.message);
    }
}

#[test]
fn the_mapping_and_mtls_routes_are_checked_at_load() {
    let e = config(MAP, false).unwrap_err().to_string();
    assert!(
        e.contains("routes[0].auth") && e.contains("client_ca"),
        "{e}"
    );
    let e = config(
        "[[auth.mtls]]\nuri = \"u\"\ncn = \"c\"\ntenant = \"acme\"\n",
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("exactly one"), "{e}");
    let e = config("[[auth.mtls]]\ncn = \"c\"\ntenant = \"nope\"\n", true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("auth.mtls[0].tenant"), "{e}");
    let e = config(
        "[[auth.mtls]]\ncn = \"c\"\ntenant = \"acme\"\n[[auth.mtls]]\ncn = \"c\"\ntenant = \"beta\"\n",
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mapped twice"), "{e}");
}

/// A subject may carry several common names: each is a name of the certificate, and two that
/// map to different callers are refused (reading the first only, the gateway named one caller
/// where software that reads the last names another).
#[test]
fn every_common_name_of_a_certificate_counts() {
    let c = config(
        &format!("{MAP}[[auth.mtls]]\ncn = \"acme-cn\"\ntenant = \"acme\"\n"),
        true,
    )
    .unwrap();
    let p = Policy::compile(&c).unwrap();
    let route = &c.routes[0];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    // rcgen keeps one value per attribute type: the second CN under its OID written out.
    params
        .distinguished_name
        .push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]), "acme-cn");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "both");
    let der = params.self_signed(&key).expect("certificate");
    let two = PeerCert::from_der(der.der());
    assert_eq!(two.cns.len(), 2, "{:?}", two.cns);
    let r = p
        .authenticate_with(
            route,
            &Fields::default(),
            0,
            ClientCert::Present(&two),
            true,
        )
        .unwrap_err();
    assert_eq!(r.status, 403);
    assert!(r.message.contains("different callers"), "{}", r.message);
}

/// A CA's parameters, named `name`, and its key.
fn ca_params(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    (params, key)
}

/// An entry that names its CA maps only certificates that CA issued: a partner CA trusted on
/// another listener that issues `CN=alice` is not alice.
#[test]
fn an_entry_that_names_its_ca_maps_only_what_that_ca_issued() {
    let dir = std::env::temp_dir().join(format!("gw-mtls-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A CA, and a leaf it issues with `cn`.
    let ca = |name: &str| {
        let (params, key) = ca_params(name);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (rcgen::Issuer::new(params, key), path)
    };
    let leaf = |issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, cn: &str| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, issuer).unwrap();
        let der = cert.der().clone();
        let mut peer = PeerCert::from_der(&der);
        peer.chain = vec![der];
        peer
    };
    let (ours, ours_path) = ca("ours");
    let (partner, _) = ca("partner");
    let c = config(
        &format!(
            "[[auth.mtls]]\ncn = \"alice\"\ntenant = \"acme\"\nca = \"{}\"\n[[auth.mtls]]\ncn = \"bob\"\ntenant = \"beta\"\n",
            ours_path.display()
        ),
        true,
    )
    .unwrap();
    let p = Policy::compile(&c).unwrap();
    let m = &p.mtls;
    assert_eq!(
        m.caller(&leaf(&ours, "alice")),
        Mapped::Caller(1, None, "cn:alice".into())
    );
    assert_eq!(m.caller(&leaf(&partner, "alice")), Mapped::Nobody);
    // An entry without `ca` takes any CA the listener trusts.
    assert_eq!(
        m.caller(&leaf(&partner, "bob")),
        Mapped::Caller(2, None, "cn:bob".into())
    );
    // A `ca` that is no CA file is refused at load.
    let e = config(
        "[[auth.mtls]]\ncn = \"alice\"\ntenant = \"acme\"\nca = \"/nonexistent/ca.pem\"\n",
        true,
    )
    .and_then(|c| Policy::compile(&c).map(|_| ()))
    .unwrap_err()
    .to_string();
    assert!(e.contains("auth.mtls[0].ca"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CAs trusted are counted by certificate: one bundle of two CAs is two (the warning that
/// entries without `ca` map certificates of either was missed), one CA named twice is one.
#[test]
fn trusted_client_cas_are_counted_by_certificate() {
    let dir = std::env::temp_dir().join(format!("mtls-cas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = |name: &str| {
        let (params, key) = ca_params(name);
        params.self_signed(&key).unwrap().pem()
    };
    let (one, two) = (ca("one"), ca("two"));
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{one}{two}")).unwrap();
    let single = dir.join("single.pem");
    std::fs::write(&single, &one).unwrap();
    let with_ca = |path: &std::path::Path| {
        let mut c = config("", true).unwrap();
        for l in &mut c.listeners {
            if let Some(t) = l.tls.as_mut() {
                t.client_ca = Some(path.to_path_buf());
            }
        }
        c
    };
    assert_eq!(trusted_client_cas(&with_ca(&bundle)), 2);
    assert_eq!(trusted_client_cas(&with_ca(&single)), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
