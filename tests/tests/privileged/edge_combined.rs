//! The whole network edge at once: a balancer that writes a PROXY v2 header in the clear and
//! then relays the client's TLS (as AWS NLB and HAProxy in TCP mode do). The client the header
//! names is classified, policed and audited; the TLS that follows is the client's own.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::Arc,
    time::Duration,
};

use integration_tests::{
    daemon::Daemon,
    peers::{FakeUpstream, Misbehave, free_port, post},
    pki::{KeyKind, Pki},
    unique,
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};

/// A v2 PROXY header (PROXY command, TCP over IPv4) naming `client`.
fn v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&40_000u16.to_be_bytes());
    h.extend_from_slice(&8443u16.to_be_bytes());
    h
}

/// Writes `header` (if any), then speaks TLS to `port` trusting `ca` for `name`, POSTs a
/// `tools/call` of `echo` and returns the answer's status line and body, or the error.
fn call_over(port: u16, header: Option<&[u8]>, ca: &std::path::Path) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA") {
        roots.add(c.expect("CA cert")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if let Some(h) = header {
        tcp.write_all(h).map_err(|e| e.to_string())?;
    }
    let conn = rustls::ClientConnection::new(Arc::new(config), "mcp.test".try_into().unwrap())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let req = String::from_utf8(post("/mcp", body, "connection: close\r\n")).unwrap();
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(e) if !out.is_empty() => Ok(format!("{}(then {e})", String::from_utf8_lossy(&out))),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn a_proxy_header_then_the_clients_tls_is_classified_policed_and_audited() {
    let pki = Pki::new("edge");
    let cert = pki.server("gw", &["mcp.test"], KeyKind::EcdsaP256);
    let fake = FakeUpstream::start(Misbehave::Answer);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwedge");
    let audit = std::env::temp_dir().join(format!("{instance}-audit.jsonl"));
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
[[listeners]]
address = "127.0.0.1:{port}"
[listeners.proxy_protocol]
trusted = ["127.0.0.1/32"]
[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
default_tenant = "public"
[audit]
path = "{audit}"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "edge"
id = 1
sources = ["198.18.0.0/15"]
[[upstreams]]
name = "u0"
url = "{url}"
[[routes]]
path = "/mcp"
upstream = "u0"
auth = ["address"]
"#,
        cert = cert.cert.display(),
        key = cert.key.display(),
        audit = audit.display(),
        url = fake.url(),
    );
    let mut d = Daemon::start_local(&instance, &config);

    // The client the header names (198.18.5.7, tenant `edge`) is served over its own TLS.
    let answer = call_over(port, Some(&v2([198, 18, 5, 7])), &pki.ca).expect("served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A client of no tenant, named the same way, is refused by `address` auth (401): the
    // header, not the socket, decided.
    let answer = call_over(port, Some(&v2([192, 0, 2, 10])), &pki.ca).expect("answered");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // TLS straight from the trusted balancer's address, without the header, is refused.
    assert!(
        call_over(port, None, &pki.ca).is_err(),
        "TLS without the PROXY header must not be served"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        if text.lines().count() >= 2 || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let served: serde_json::Value = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["decision"] == "allowed")
        .unwrap_or_else(|| panic!("no allowed record in the audit log:\n{lines}"));
    assert_eq!(served["source"], "198.18.5.7", "{served}");
    assert_eq!(served["tenant"], "edge", "{served}");
    d.stop();
    let _ = std::fs::remove_file(&audit);
}
