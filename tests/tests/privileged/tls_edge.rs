//! TLS on the listeners, with real peers and a test PKI made per test: the Python SDK client
//! over https in both protocol eras, curl, and `openssl s_client` for the protocol's edges
//! (SNI, versions, ALPN, resumption, plaintext and stalled handshakes), client certificates
//! mapped to tenants, certificate reload under load, and the admin listener over TLS.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    peers::{PyServer, free_port, py_client, py_client_env, py_script_env},
    pki::{Issued, KeyKind, Pki},
    unique,
};

/// A gateway config: `listeners` are (port, tls section body or "" for plaintext).
fn config(
    instance: &str,
    listeners: &[(u16, String)],
    admin: u16,
    admin_tls: &str,
    upstream: &str,
    extra: &str,
) -> String {
    let mut c = format!(
        "[gateway]\ninstance = \"{instance}\"\nworkers = 2\nshutdown_grace_ms = 1000\n[kernel]\nenabled = false\n[http]\nrequest_timeout_ms = 3000\n"
    );
    for (port, tls) in listeners {
        c.push_str(&format!("[[listeners]]\naddress = \"127.0.0.1:{port}\"\n"));
        if !tls.is_empty() {
            c.push_str(&format!("[listeners.tls]\n{tls}\n"));
        }
    }
    c.push_str(&format!("[admin]\naddress = \"127.0.0.1:{admin}\"\n"));
    if !admin_tls.is_empty() {
        c.push_str(&format!("[admin.tls]\n{admin_tls}\n"));
    }
    c.push_str(&format!(
        "[[upstreams]]\nname = \"u\"\nurl = \"{upstream}\"\n[[routes]]\npath = \"/mcp\"\nupstream = \"u\"\n{extra}\n"
    ));
    c
}

fn certs(list: &[&Issued]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|i| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                i.cert.display(),
                i.key.display()
            )
        })
        .collect();
    format!("certificates = [{}]", items.join(", "))
}

/// Runs a command, feeding `stdin`, at most 20 s; returns stdout and stderr together.
fn run(cmd: &str, args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new("timeout")
        .arg("20")
        .arg(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let _ = child.stdin.take().expect("stdin").write_all(stdin);
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// SHA-256 fingerprint of a PEM certificate file (openssl's form).
fn fingerprint_of(cert: &Path) -> String {
    let (ok, out) = run(
        "openssl",
        &[
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
            cert.to_str().unwrap(),
        ],
        b"",
    );
    assert!(ok, "{out}");
    out.trim().to_owned()
}

/// `openssl s_client` to `port` with `args`; the HTTP request `send` is written after the
/// handshake (the gateway closes after answering it, so s_client ends).
fn s_client(port: u16, args: &[&str], send: &[u8]) -> String {
    let connect = format!("127.0.0.1:{port}");
    let mut all = vec!["s_client", "-connect", &connect, "-ign_eof"];
    all.extend_from_slice(args);
    run("openssl", &all, send).1
}

const CLOSE: &[u8] = b"GET /nothere HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n";

/// The fingerprint of the certificate the gateway serves for `args` (SNI options), if any.
fn served(port: u16, args: &[&str]) -> Option<String> {
    let out = s_client(port, args, CLOSE);
    let start = out.find("-----BEGIN CERTIFICATE-----")?;
    let end = out.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    let (ok, fp) = run(
        "openssl",
        &["x509", "-noout", "-fingerprint", "-sha256"],
        &out.as_bytes()[start..end],
    );
    ok.then(|| fp.trim().to_owned())
}

fn metrics(admin: u16, tls_ca: Option<&Path>) -> String {
    let (ok, out) = match tls_ca {
        None => run(
            "curl",
            &["-s", &format!("http://127.0.0.1:{admin}/metrics")],
            b"",
        ),
        Some(ca) => run(
            "curl",
            &[
                "-s",
                "--cacert",
                ca.to_str().unwrap(),
                &format!("https://127.0.0.1:{admin}/metrics"),
            ],
            b"",
        ),
    };
    assert!(ok, "metrics: {out}");
    out
}

/// The value of one series (`name{labels}`) in `/metrics`.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn failures(admin: u16, reason: &str) -> u64 {
    metric(
        &metrics(admin, None),
        &format!("mcp_gateway_tls_handshake_failures_total{{reason=\"{reason}\"}}"),
    )
}

/// Waits (at most 2 s: the worker counts after sending its alert) until the failures for
/// `reason` reach `n`, and checks they do not pass it.
fn failures_reach(admin: u16, reason: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = failures(admin, reason);
        if now >= n {
            assert_eq!(now, n, "{reason} failures");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{reason} failures: {now}, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}"#;

/// curl POSTs an `initialize` to `url`; returns (exit ok, HTTP status, body).
fn curl_post(url: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec![
        "-s",
        "-w",
        "\n%{http_code}",
        "-H",
        "content-type: application/json",
        "-H",
        "accept: application/json, text/event-stream",
        "--data",
        INIT,
    ];
    all.extend_from_slice(args);
    all.push(url);
    run("curl", &all, b"")
}

#[test]
fn sdk_client_and_curl_over_https_in_both_eras() {
    let pki = Pki::new("sdk");
    let server = pki.server("server", &["localhost", "127.0.0.1"], KeyKind::EcdsaP256);
    let upstream = PyServer::start(false);
    let demo_port = free_port();
    let _demo = integration_tests::peers::demo_upstream(demo_port);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwtls");
    let demo_route = format!(
        "[[upstreams]]\nname = \"demo\"\nurl = \"http://127.0.0.1:{demo_port}/mcp\"\n[[routes]]\npath = \"/demo\"\nupstream = \"demo\"\n"
    );
    let mut d = Daemon::start_local(
        &instance,
        &config(
            &instance,
            &[(port, certs(&[&server]))],
            admin,
            &certs(&[&server]),
            &upstream.url(),
            &demo_route,
        ),
    );
    let ca = pki.ca.to_str().unwrap();
    for mode in ["legacy", "2026-07-28"] {
        let direct = py_client(&upstream.url(), mode);
        let through = py_client_env(
            &format!("https://localhost:{port}/mcp"),
            mode,
            &[("SSL_CERT_FILE", ca)],
        );
        assert_eq!(
            through, direct,
            "{mode}: over https the gateway changes nothing"
        );
        // The project's demo upstream behind the same TLS listener.
        let demo = py_script_env(
            r#"
import asyncio, json, sys
from mcp import Client
async def main(url, mode):
    async with Client(url, mode=mode) as c:
        t = await c.list_tools()
        r = await c.call_tool("add", {"a": 2, "b": 40})
        print(json.dumps({"tools": [x.name for x in t.tools], "add": r.content[0].text}))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"#,
            &[&format!("https://localhost:{port}/demo"), mode],
            &[("SSL_CERT_FILE", ca)],
        );
        assert_eq!(
            demo,
            serde_json::json!({"tools": ["echo", "add", "word_count", "utc_now"], "add": "42"}),
            "{mode}"
        );
    }
    // Without the test CA, the SDK client refuses the certificate: it really was TLS.
    let refused = py_script_env(
        "import sys, json, httpx2\ntry:\n    httpx2.get(sys.argv[1]); print(json.dumps('connected'))\nexcept Exception as e:\n    print(json.dumps(type(e).__name__))",
        &[&format!("https://localhost:{port}/mcp")],
        &[],
    );
    assert_eq!(refused, serde_json::json!("ConnectError"));

    let (ok, out) = curl_post(&format!("https://127.0.0.1:{port}/mcp"), &["--cacert", ca]);
    assert!(ok && out.ends_with("\n200"), "curl over https: {out}");
    assert!(out.contains("\"protocolVersion\""), "{out}");

    // The admin listener over TLS.
    let (ok, out) = run(
        "curl",
        &[
            "-s",
            "--cacert",
            ca,
            &format!("https://127.0.0.1:{admin}/healthz"),
        ],
        b"",
    );
    assert!(ok && out.trim() == "ok", "admin over TLS: {out}");
    let (ok, _) = run(
        "curl",
        &["-s", &format!("http://127.0.0.1:{admin}/healthz")],
        b"",
    );
    assert!(
        !ok,
        "the admin listener does not speak plaintext when TLS is on"
    );
    let m = metrics(admin, Some(&pki.ca));
    assert!(metric(&m, "mcp_gateway_tls_handshakes_total") >= 4, "{m}");
    // Connections that never begin their handshake, from eight addresses, as many as the
    // admin API holds: the one waiting longest makes room for a health check (before, every
    // place was held until the handshake timeout, and taken again as it was given back).
    let idle: Vec<TcpStream> = (0..128u8)
        .filter_map(|i| {
            integration_tests::daemon::connect_from(
                std::net::Ipv4Addr::new(127, 0, 0, 2 + i / 16).into(),
                std::net::SocketAddr::from(([127, 0, 0, 1], admin)),
                Duration::from_secs(1),
            )
        })
        .collect();
    assert_eq!(idle.len(), 128);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = run(
        "curl",
        &[
            "-s",
            "--max-time",
            "5",
            "--cacert",
            ca,
            &format!("https://127.0.0.1:{admin}/healthz"),
        ],
        b"",
    );
    assert!(
        ok && out.trim() == "ok",
        "a health check while idle connections hold every handshake place: {out}"
    );
    drop(idle);
    d.stop();
}

#[test]
fn openssl_sni_versions_alpn_resumption_and_bad_handshakes() {
    let pki = Pki::new("edges");
    let ecdsa = pki.server("a", &["a.test"], KeyKind::EcdsaP256);
    let rsa = pki.server("b", &["b.test", "*.wild.test"], KeyKind::Rsa2048);
    let upstream = PyServer::start(false);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwtlse");
    let tls = format!("{}\nhandshake_timeout_ms = 3000", certs(&[&ecdsa, &rsa]));
    let mut d = Daemon::start_local(
        &instance,
        &config(&instance, &[(port, tls)], admin, "", &upstream.url(), ""),
    );
    let (fa, fb) = (fingerprint_of(&ecdsa.cert), fingerprint_of(&rsa.cert));

    // SNI picks the certificate; no SNI gets the first; an unknown name is refused.
    assert_eq!(served(port, &["-servername", "a.test"]), Some(fa.clone()));
    assert_eq!(served(port, &["-servername", "b.test"]), Some(fb.clone()));
    assert_eq!(
        served(port, &["-servername", "x.wild.test"]),
        Some(fb.clone())
    );
    assert_eq!(served(port, &["-noservername"]), Some(fa.clone()));
    let before = failures(admin, "unknown_sni");
    assert_eq!(served(port, &["-servername", "c.test"]), None);
    failures_reach(admin, "unknown_sni", before + 1);

    // Both versions, ALPN http/1.1, and an answer over each.
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = s_client(
            port,
            &["-servername", "a.test", flag, "-alpn", "http/1.1"],
            CLOSE,
        );
        assert!(
            out.contains(&format!("Protocol  : {name}")) || out.contains(&format!("New, {name}")),
            "{name}: {out}"
        );
        assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
        assert!(out.contains("HTTP/1.1 404"), "an answer over {name}: {out}");
    }
    // A client that offers only h2 has nothing in common with the gateway.
    let before = failures(admin, "incompatible");
    let out = s_client(port, &["-servername", "a.test", "-alpn", "h2"], CLOSE);
    assert!(!out.contains("HTTP/1.1 404"), "{out}");
    failures_reach(admin, "incompatible", before + 1);

    // Resumption, TLS 1.3 (ticket) and 1.2, across the two workers.
    let dir = std::env::temp_dir().join(unique("sess"));
    std::fs::create_dir_all(&dir).unwrap();
    for flag in ["-tls1_3", "-tls1_2"] {
        let sess = dir.join(format!("s{flag}"));
        let sess = sess.to_str().unwrap();
        let first = s_client(
            port,
            &["-servername", "a.test", flag, "-sess_out", sess],
            CLOSE,
        );
        assert!(first.contains("HTTP/1.1 404"), "{first}");
        for _ in 0..3 {
            let again = s_client(
                port,
                &["-servername", "a.test", flag, "-sess_in", sess],
                CLOSE,
            );
            assert!(again.contains("Reused,"), "{flag} resumed: {again}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(metric(&metrics(admin, None), "mcp_gateway_tls_resumed_total") >= 6);

    // Plaintext HTTP to the TLS port: closed at once (after rustls' alert), never answered.
    let before = failures(admin, "not_tls");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = Instant::now();
    s.write_all(b"GET /mcp HTTP/1.1\r\nhost: gw\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    // At once: well before the handshake timeout (3 s; a loaded host can take a moment).
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "closed at once: {:?}",
        t.elapsed()
    );
    assert!(
        !got.windows(4).any(|w| w == b"HTTP"),
        "no HTTP answer: {got:?}"
    );
    assert_eq!(got.first(), Some(&0x15), "a TLS alert record: {got:?}");
    failures_reach(admin, "not_tls", before + 1);

    // A handshake that never completes: nothing sent, or half a ClientHello.
    let before = failures(admin, "timeout");
    for send in [
        &b""[..],
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc][..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        s.write_all(send).unwrap();
        let t = Instant::now();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
            "closed by the handshake timeout (3 s): {took:?}"
        );
    }
    failures_reach(admin, "timeout", before + 2);
    d.stop();
}

#[test]
fn client_certificates_map_to_tenants_and_bad_ones_are_refused() {
    let pki = Pki::new("mtls");
    let other = Pki::new("other");
    let server = pki.server("server", &["localhost", "127.0.0.1"], KeyKind::EcdsaP256);
    let agent_a = pki.client("agent-a", "agent a", Some("spiffe://example.org/agent/a"));
    let by_cn = pki.client("by-cn", "robot-b", None);
    let unmapped = pki.client("unmapped", "nobody", Some("spiffe://example.org/agent/z"));
    let expired = pki.expired_client("expired", "agent a", Some("spiffe://example.org/agent/a"));
    let foreign = other.client("foreign", "agent a", Some("spiffe://example.org/agent/a"));
    let upstream = PyServer::start(false);
    let (required, optional, plain, admin) = (free_port(), free_port(), free_port(), free_port());
    let ca = pki.ca.display().to_string();
    let instance = unique("gwmtls");
    let audit = std::env::temp_dir().join(format!("{instance}-audit.jsonl"));
    let extra = format!(
        r#"auth = ["mtls", "api_key"]
[kernel]
default_tenant = "public"
[audit]
path = "{audit}"
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "x"
id = 1
[[tenants]]
name = "y"
id = 2
[[auth.mtls]]
uri = "spiffe://example.org/agent/a"
tenant = "x"
agent = "agent-a"
[[auth.mtls]]
cn = "robot-b"
tenant = "y"
[[auth.api_keys]]
sha256 = "{key_y}"
tenant = "y"
"#,
        audit = audit.display(),
        // sha256("key-of-y")
        key_y = sha256_hex("key-of-y"),
    );
    // `[kernel]` appears once: the generated one is replaced.
    let c = config(
        &instance,
        &[
            (
                required,
                format!("{}\nclient_ca = \"{ca}\"", certs(&[&server])),
            ),
            (
                optional,
                format!(
                    "{}\nclient_ca = \"{ca}\"\nclient_auth = \"optional\"",
                    certs(&[&server])
                ),
            ),
            (plain, String::new()),
        ],
        admin,
        "",
        &upstream.url(),
        &extra,
    )
    .replacen("[kernel]\nenabled = false\n", "", 1)
    .replace(
        "[kernel]\ndefault_tenant",
        "[kernel]\nenabled = false\ndefault_tenant",
    );
    let mut d = Daemon::start_local(&instance, &c);
    let url = |port: u16| format!("https://127.0.0.1:{port}/mcp");
    let with = |i: &Issued| {
        vec![
            "--cacert".to_owned(),
            ca.clone(),
            "--cert".to_owned(),
            i.cert.display().to_string(),
            "--key".to_owned(),
            i.key.display().to_string(),
        ]
    };
    let post = |port: u16, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl_post(&url(port), &args)
    };

    // The SPIFFE id maps to tenant x, agent agent-a; the CN to tenant y.
    for (port, cert, tenant, agent) in [
        (required, &agent_a, "x", Some("agent-a")),
        (optional, &agent_a, "x", Some("agent-a")),
        (required, &by_cn, "y", None),
    ] {
        let seen = audit_lines(&audit);
        let (ok, out) = post(port, &with(cert));
        assert!(ok && out.ends_with("\n200"), "{out}");
        let record = wait_audit(&audit, seen);
        assert_eq!(record["tenant"], tenant, "{record}");
        assert_eq!(record["agent"].as_str(), agent, "{record}");
        assert_eq!(record["decision"], "allowed", "{record}");
    }
    // A certificate beside an API key of another tenant: two callers, refused.
    let mut args = with(&agent_a);
    args.extend(["-H".to_owned(), "x-api-key: key-of-y".to_owned()]);
    let (_, out) = post(required, &args);
    assert!(
        out.ends_with("\n403") && out.contains("different callers"),
        "{out}"
    );
    // A verified certificate that no [[auth.mtls]] entry names.
    let (_, out) = post(required, &with(&unmapped));
    assert!(
        out.ends_with("\n403") && out.contains("mapped to no caller"),
        "{out}"
    );

    // Without a certificate: the handshake fails on `required`; 401 on `optional`; on the
    // plaintext listener the 401 says why.
    let before = failures(admin, "no_client_certificate");
    let (ok, out) = post(required, &["--cacert".to_owned(), ca.clone()]);
    assert!(!ok || out.ends_with("\n000"), "{out}");
    failures_reach(admin, "no_client_certificate", before + 1);
    let (_, out) = post(optional, &["--cacert".to_owned(), ca.clone()]);
    assert!(
        out.ends_with("\n401") && out.contains("no client certificate"),
        "{out}"
    );
    let (_, out) = curl_post(&format!("http://127.0.0.1:{plain}/mcp"), &[]);
    assert!(
        out.ends_with("\n401") && out.contains("TLS listener"),
        "{out}"
    );
    // The API key still works beside mtls on the same route.
    let (_, out) = curl_post(
        &format!("http://127.0.0.1:{plain}/mcp"),
        &["-H", "x-api-key: key-of-y"],
    );
    assert!(out.ends_with("\n200"), "{out}");

    // Expired, and from another CA: refused in the handshake, on both listeners.
    let before = failures(admin, "bad_certificate");
    for port in [required, optional] {
        for cert in [&expired, &foreign] {
            let (ok, out) = post(port, &with(cert));
            assert!(!ok || out.ends_with("\n000"), "{out}");
        }
    }
    failures_reach(admin, "bad_certificate", before + 4);
    d.stop();
    let _ = std::fs::remove_file(&audit);
}

/// A TLS session resumes only where a full handshake with its client certificate would be
/// accepted now: not on a listener that requires a certificate when it was made without one,
/// not on a listener whose CA did not issue its certificate, not after a reload took that CA
/// out, and not once the certificate expired. Where it would be accepted, it resumes. (rustls
/// resumes whatever its session store gives back, with the certificate the session was made
/// with: one store for every listener resumed each of these, and the request was served.)
#[test]
fn a_session_resumes_only_where_its_client_certificate_would_be_accepted() {
    let pki = Pki::new("resume");
    let other = Pki::new("resume-other");
    let server = pki.server("server", &["localhost"], KeyKind::EcdsaP256);
    let alice = pki.client("alice", "alice", None);
    let foreign = other.client("foreign", "alice", None);
    // The CA file the `required` listener trusts; replaced by the other CA later.
    let trusted = pki.dir().join("clients.pem");
    std::fs::copy(&pki.ca, &trusted).unwrap();
    let upstream = PyServer::start(false);
    let (open, required, required_other, admin) =
        (free_port(), free_port(), free_port(), free_port());
    let instance = unique("gwresume");
    let tls = certs(&[&server]);
    let c = config(
        &instance,
        &[
            (open, tls.clone()),
            (
                required,
                format!("{tls}\nclient_ca = \"{}\"", trusted.display()),
            ),
            (
                required_other,
                format!("{tls}\nclient_ca = \"{}\"", other.ca.display()),
            ),
        ],
        admin,
        "",
        &upstream.url(),
        "",
    );
    let mut d = Daemon::start_local(&instance, &c);
    let dir = pki.dir().to_path_buf();
    // A session made on `port` with `cert` (if any), saved; the handshake's output.
    let made = |port: u16, cert: Option<&Issued>, flag: &str, name: &str| {
        let sess = dir.join(name).display().to_string();
        let mut args = vec!["-servername", "localhost", flag, "-sess_out", &sess];
        let paths;
        if let Some(c) = cert {
            paths = (c.cert.display().to_string(), c.key.display().to_string());
            args.extend(["-cert", &paths.0, "-key", &paths.1]);
        }
        let out = s_client(port, &args, CLOSE);
        assert!(out.contains("HTTP/1.1 404"), "{name}: made: {out}");
        sess
    };
    let resumed = |port: u16, sess: &str, flag: &str| {
        s_client(
            port,
            &["-servername", "localhost", flag, "-sess_in", sess],
            CLOSE,
        )
    };
    for flag in ["-tls1_3", "-tls1_2"] {
        // Where it was made, with a certificate of the listener's CA: resumed and served.
        let own = made(required, Some(&alice), flag, &format!("own{flag}"));
        let again = resumed(required, &own, flag);
        assert!(
            again.contains("Reused,") && again.contains("HTTP/1.1 404"),
            "{flag}: resumed where it was made: {again}"
        );
        // Made without a certificate, or with another CA's, elsewhere: not resumed here.
        for (from, cert, what) in [
            (open, None, "made without a certificate"),
            (
                required_other,
                Some(&foreign),
                "made with another CA's certificate",
            ),
        ] {
            let sess = made(from, cert, flag, &format!("{from}{flag}"));
            let out = resumed(required, &sess, flag);
            assert!(
                !out.contains("Reused,") && !out.contains("HTTP/1.1 404"),
                "{flag}: {what}: {out}"
            );
        }
    }

    // A certificate that expires: its session is refused once it has, like a new handshake.
    // (Issued here, not at the start: on a slow host what comes before took longer than its
    // life.)
    let brief = pki.client_expiring("brief", "alice", 4);
    let expires = Instant::now() + Duration::from_secs(4);
    let sess = made(required, Some(&brief), "-tls1_3", "brief");
    std::thread::sleep(
        (expires + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    let before = failures(admin, "bad_certificate");
    let out = resumed(required, &sess, "-tls1_3");
    assert!(
        !out.contains("HTTP/1.1 404"),
        "a session of an expired certificate: {out}"
    );
    failures_reach(admin, "bad_certificate", before + 1);

    // The CA taken out by a reload: alice's session, made before, no longer resumes.
    let own = made(required, Some(&alice), "-tls1_3", "before-reload");
    std::fs::copy(&other.ca, &trusted).unwrap();
    d.hangup();
    d.wait_for_log("\"message\":\"reloaded /", Duration::from_secs(5));
    let out = resumed(required, &own, "-tls1_3");
    assert!(
        !out.contains("Reused,") && !out.contains("HTTP/1.1 404"),
        "a session of a CA the reload took out: {out}"
    );
    d.stop();
}

/// A TLS connection to `port` presenting `cert`, the server's certificate verified against
/// `ca` for `localhost`.
fn tls_presenting(port: u16, ca: &Path, cert: &Issued) -> Tls {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// An `initialize` POSTed on the kept-alive connection `tls`: the answer's status, or `None`
/// when the connection was closed or failed instead.
fn status_on(tls: &mut Tls) -> Option<u16> {
    tls.write_all(&integration_tests::peers::post("/mcp", INIT, ""))
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let whole = match head.lines().find_map(|l| l.strip_prefix("content-length:")) {
                Some(len) => got.len() >= end + 4 + len.trim().parse::<usize>().ok()?,
                None => text.ends_with("0\r\n\r\n"),
            };
            if whole {
                return text.split_whitespace().nth(1)?.parse().ok();
            }
        }
        let n = tls.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// A client CA taken out of a listener's `client_ca` by a reload cuts the connections its
/// certificates made: a keep-alive connection is closed (its next request gets no answer),
/// while a client of the CA kept goes on, on its own open connection. Before, the certificate
/// verified at the handshake was taken for the connection's life: the removed CA's client was
/// served on every request of its open connection (an attacker's review).
#[test]
fn a_client_ca_removed_by_a_reload_cuts_its_open_connections() {
    let own = Pki::new("kept-ca");
    let partner = Pki::new("removed-ca");
    let server = own.server("server", &["localhost"], KeyKind::EcdsaP256);
    let ours = own.client("ours", "own-bot", None);
    let theirs = partner.client("theirs", "partner-bot", None);
    // The listener trusts both CAs, from one bundle.
    let bundle = own.dir().join("client-cas.pem");
    let both =
        std::fs::read_to_string(&own.ca).unwrap() + &std::fs::read_to_string(&partner.ca).unwrap();
    std::fs::write(&bundle, both).unwrap();
    let upstream = PyServer::start(true);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwcaout");
    let extra = r#"auth = ["mtls"]
[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "x"
id = 1
[[auth.mtls]]
cn = "own-bot"
tenant = "x"
[[auth.mtls]]
cn = "partner-bot"
tenant = "x"
"#;
    let c = config(
        &instance,
        &[(
            port,
            format!(
                "{}\nclient_ca = \"{}\"",
                certs(&[&server]),
                bundle.display()
            ),
        )],
        admin,
        "",
        &upstream.url(),
        extra,
    )
    .replace(
        "[kernel]\nenabled = false\n",
        "[kernel]\nenabled = false\ndefault_tenant = \"public\"\n",
    );
    let mut d = Daemon::start_local(&instance, &c);
    let mut kept = tls_presenting(port, &own.ca, &ours);
    let mut removed = tls_presenting(port, &own.ca, &theirs);
    for (tls, who) in [(&mut kept, "own-bot"), (&mut removed, "partner-bot")] {
        assert_eq!(status_on(tls), Some(200), "{who} before the reload");
    }

    // The same CAs, the configuration read again: nobody is cut.
    d.hangup();
    d.wait_for_log("\"message\":\"reloaded /", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(600));
    for (tls, who) in [(&mut kept, "own-bot"), (&mut removed, "partner-bot")] {
        assert_eq!(
            status_on(tls),
            Some(200),
            "{who} after a reload that changed nothing"
        );
    }

    // The partner's CA taken out.
    std::fs::copy(&own.ca, &bundle).unwrap();
    let reloads = |d: &Daemon| d.log().matches("\"message\":\"reloaded /").count();
    let before = reloads(&d);
    d.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads(&d) == before {
        assert!(Instant::now() < deadline, "no reload: {}", d.log());
        std::thread::sleep(Duration::from_millis(25));
    }
    std::thread::sleep(Duration::from_millis(600));
    let next = status_on(&mut removed);
    assert_eq!(
        next, None,
        "the removed CA's client was answered on its open connection"
    );
    assert_eq!(status_on(&mut kept), Some(200), "the kept CA's client");
    // A new connection of the removed CA is refused in the handshake, as before.
    let mut again = tls_presenting(port, &own.ca, &theirs);
    assert_eq!(status_on(&mut again), None);
    assert_eq!(
        metric(
            &metrics(admin, None),
            "mcp_gateway_connections_refused_total{reason=\"revoked\"}"
        ),
        1
    );
    // A certificate that expires while its connection is open: served no request after it,
    // as a new handshake would be refused (it was served on for as long as the client kept
    // the connection: a review).
    let short = own.client_expiring("short", "own-bot", 3);
    let mut expiring = tls_presenting(port, &own.ca, &short);
    assert_eq!(status_on(&mut expiring), Some(200), "before it expires");
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(status_on(&mut expiring), None, "served after it expired");
    assert_eq!(status_on(&mut kept), Some(200), "the kept CA's client");
    d.stop();
}

fn sha256_hex(s: &str) -> String {
    let (ok, out) = run("sha256sum", &[], s.as_bytes());
    assert!(ok);
    out.split_whitespace().next().unwrap().to_owned()
}

fn audit_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// The one audit record written after the first `seen` (the writer is asynchronous).
fn wait_audit(path: &Path, seen: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.lines().count() == seen + 1
            && let Some(line) = text.lines().last()
            && let Ok(v) = serde_json::from_str(line)
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A certificate and its key in one PEM file, put in place by a rename (atomic).
fn install(combined: &Path, cert: &Issued) {
    let text =
        std::fs::read_to_string(&cert.cert).unwrap() + &std::fs::read_to_string(&cert.key).unwrap();
    let tmp = combined.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, combined).unwrap();
}

/// Waits until new connections are served `fingerprint`.
fn wait_served(port: u16, fingerprint: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if served(port, &["-servername", "localhost"]).as_deref() == Some(fingerprint) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "new connections never got {fingerprint}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Requests without pause for `seconds`, half on one keep-alive connection, half on a new
/// connection each; prints the count of each and every failure.
const LOAD: &str = r#"
import sys, json, time, ssl, httpx2
url, seconds = sys.argv[1], float(sys.argv[2])
ctx = ssl.create_default_context(cafile=sys.argv[3])
keep = httpx2.Client(verify=ctx)
done = {"keepalive": 0, "new": 0, "failures": []}
end = time.time() + seconds
while time.time() < end:
    for kind in ("keepalive", "new"):
        try:
            if kind == "keepalive":
                r = keep.get(url)
            else:
                with httpx2.Client(verify=ctx) as c:
                    r = c.get(url)
            if r.status_code != 404:
                done["failures"].append(f"{kind}: {r.status_code}")
            done[kind] += 1
        except Exception as e:
            done["failures"].append(f"{kind}: {e!r}")
print(json.dumps(done))
"#;

#[test]
fn certificates_reload_under_load_without_a_failed_request() {
    let pki = Pki::new("reload");
    let v1 = pki.server("v1", &["localhost"], KeyKind::EcdsaP256);
    let v2 = pki.server("v2", &["localhost"], KeyKind::EcdsaP256);
    let v3 = pki.server("v3", &["localhost"], KeyKind::Rsa2048);
    let v4 = pki.server("v4", &["localhost"], KeyKind::EcdsaP256);
    let combined: PathBuf = pki.dir().join("live.pem");
    install(&combined, &v1);
    let upstream = PyServer::start(false);
    let (port, admin) = (free_port(), free_port());
    let instance = unique("gwrel");
    let path = combined.display();
    let mut d = Daemon::start_local(
        &instance,
        &config(
            &instance,
            &[(
                port,
                format!("certificates = [{{ cert = \"{path}\", key = \"{path}\" }}]"),
            )],
            admin,
            "",
            &upstream.url(),
            "",
        ),
    );
    wait_served(port, &fingerprint_of(&v1.cert), Duration::from_secs(1));

    let url = format!("https://localhost:{port}/nothere");
    let ca = pki.ca.display().to_string();
    let load = std::thread::spawn(move || py_script_env(LOAD, &[&url, "12", &ca], &[]));
    std::thread::sleep(Duration::from_millis(1500));

    // A TLS 1.3 session from before the reloads, resumed after them (one ticketer for good).
    let sess = pki.dir().join("session");
    let sess = sess.to_str().unwrap();
    let first = s_client(
        port,
        &["-servername", "localhost", "-tls1_3", "-sess_out", sess],
        CLOSE,
    );
    assert!(first.contains("HTTP/1.1 404"), "{first}");

    // SIGHUP: the new certificate (5 s: a loaded host; the log line below says the signal,
    // not the watcher, read it).
    install(&combined, &v2);
    d.hangup();
    wait_served(port, &fingerprint_of(&v2.cert), Duration::from_secs(5));
    // By the signal (the configuration was read again), not only by the file watcher.
    d.wait_for_log("\"message\":\"reloaded /", Duration::from_secs(2));
    // The file changes (no signal): picked up by the watcher within its 2 s poll.
    install(&combined, &v3);
    wait_served(port, &fingerprint_of(&v3.cert), Duration::from_secs(5));
    let again = s_client(
        port,
        &["-servername", "localhost", "-tls1_3", "-sess_in", sess],
        CLOSE,
    );
    assert!(
        again.contains("Reused, TLSv1.3"),
        "resumed across two reloads: {again}"
    );
    // A broken file: a certificate with another's key, then garbage. Refused and counted; the
    // running certificate stays.
    let reload_failures = |_: &Daemon| {
        metric(
            &metrics(admin, None),
            "mcp_gateway_tls_reload_failures_total",
        )
    };
    let before = reload_failures(&d);
    let mismatched =
        std::fs::read_to_string(&v4.cert).unwrap() + &std::fs::read_to_string(&v1.key).unwrap();
    std::fs::write(combined.with_extension("tmp"), mismatched).unwrap();
    std::fs::rename(combined.with_extension("tmp"), &combined).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reload_failures(&d) == before {
        assert!(
            Instant::now() < deadline,
            "the broken file was never judged"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reload_failures(&d) == before + 1 {
        assert!(Instant::now() < deadline, "SIGHUP never judged it");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reload_failures(&d),
        before + 2,
        "the watcher and SIGHUP both refused it"
    );
    assert_eq!(
        served(port, &["-servername", "localhost"]),
        Some(fingerprint_of(&v3.cert))
    );
    std::fs::write(&combined, "not PEM at all").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reload_failures(&d) == before + 2 {
        assert!(
            Instant::now() < deadline,
            "the garbage file was never judged"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        served(port, &["-servername", "localhost"]),
        Some(fingerprint_of(&v3.cert))
    );
    // An expired certificate with its own key.
    let failed = reload_failures(&d);
    install(&combined, &pki.expired_server("old", &["localhost"]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while reload_failures(&d) == failed {
        assert!(
            Instant::now() < deadline,
            "the expired certificate was never judged"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        served(port, &["-servername", "localhost"]),
        Some(fingerprint_of(&v3.cert))
    );
    let log = d.log();
    for reason in ["is not the key of", "not valid now"] {
        assert!(
            log.contains(reason),
            "the reason `{reason}` is logged: {log}"
        );
    }

    // POST /reload: a good certificate again.
    install(&combined, &v4);
    let (ok, out) = run(
        "curl",
        &[
            "-s",
            "-X",
            "POST",
            &format!("http://127.0.0.1:{admin}/reload"),
        ],
        b"",
    );
    assert!(ok && out.contains("\"result\""), "{out}");
    assert_eq!(
        served(port, &["-servername", "localhost"]),
        Some(fingerprint_of(&v4.cert))
    );

    let report = load.join().expect("the load thread");
    eprintln!("requests during the reloads: {report}");
    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    assert!(report["keepalive"].as_u64().unwrap() > 20, "{report}");
    assert!(report["new"].as_u64().unwrap() > 20, "{report}");
    d.stop();
}
