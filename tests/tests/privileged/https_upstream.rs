//! https upstreams through the real daemon on loopback: the Python SDK's server under uvicorn
//! with a certificate from a test CA (passthrough and federation, both protocol eras, with a
//! client certificate where the upstream requires one), the project's demo upstream over TLS,
//! certificates that do not verify (expired, wrong name, unknown issuer: 502 naming the
//! upstream and the reason, counted), the `server_name` override, pooled and resumed TLS
//! connections counted where the upstream sees them, and the background re-resolution loop.

use std::{
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    peers::{
        PyServer, demo_upstream, demo_upstream_tls, free_port, post, py_client, py_client_prefixed,
        raw,
    },
    pki::{KeyKind, Pki},
    unique,
};

/// A gateway with `upstreams` (TOML of `[[upstreams]]` tables) and `routes`; returns it, its
/// port and its admin port.
fn start(upstreams: &str, routes: &str) -> (Daemon, u16, u16) {
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwtls");
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
shutdown_grace_ms = 2000
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
{upstreams}
{routes}
"#
    );
    (Daemon::start_local(&instance, &config), port, admin)
}

fn upstream(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"{name}\"\nurl = \"{url}\"\nresponse_timeout_ms = 5000\n{extra}\n"
    )
}

fn route(path: &str, upstream: &str) -> String {
    format!("[[routes]]\npath = \"{path}\"\nupstream = \"{upstream}\"\n")
}

fn ca(pki: &Pki) -> String {
    format!("ca_file = \"{}\"", pki.ca.display())
}

fn metrics(admin: u16) -> String {
    let req = "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    String::from_utf8_lossy(&raw(admin, req.as_bytes()).0.body).into_owned()
}

/// The value of the sample `series` (name and labels exactly) in `/metrics`, 0 when absent.
fn sample(admin: u16, series: &str) -> u64 {
    metrics(admin)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

const CALL: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":40}}}"#;

/// A stateless (2026-07-28) `tools/call`, which needs no session.
const CALL_2026: &str = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":40},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
const HEADERS_2026: &str =
    "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: add\r\n";

/// The fixture server's answers that do not depend on the era's extras.
fn assert_core(out: &serde_json::Value, what: &str) {
    assert_eq!(out["echo"], "héllo ✓", "{what}: {out}");
    assert_eq!(out["add"], "42", "{what}: {out}");
    assert_eq!(out["fail_is_error"], true, "{what}: {out}");
    assert_eq!(
        out["progress"],
        serde_json::json!([1.0, 2.0, 3.0]),
        "{what}: {out}"
    );
    assert_eq!(out["resource"], "hello from the fixture", "{what}: {out}");
}

#[test]
fn python_sdk_server_over_https_in_passthrough_and_federation_both_eras() {
    let pki = Pki::new("pyup");
    let cert = pki.server("up", &["127.0.0.1", "localhost"], KeyKind::EcdsaP256);
    let server = PyServer::start_tls(&[], &cert, None);
    let url = format!("https://127.0.0.1:{}/mcp", server.port);
    let (mut d, port, admin) = start(
        &upstream("py", &url, &ca(&pki)),
        &format!(
            "{}[[routes]]\npath = \"/fed\"\nfederate = [{{ upstream = \"py\", prefix = \"py_\" }}]\n",
            route("/mcp", "py")
        ),
    );
    for mode in ["legacy", "2026-07-28"] {
        let through = py_client(&format!("http://127.0.0.1:{port}/mcp"), mode);
        assert_core(&through, &format!("passthrough, {mode}"));
        if mode == "legacy" {
            // The server's own requests travel back over the same TLS upstream streams.
            assert_eq!(through["ask_model"], "model: 42", "{through}");
        }
        let fed = py_client_prefixed(&format!("http://127.0.0.1:{port}/fed"), mode, "py_");
        assert_core(&fed, &format!("federation, {mode}"));
        assert!(
            fed["tools"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "py_echo"),
            "{fed}"
        );
    }
    assert!(
        sample(
            admin,
            r#"mcp_gateway_upstream_connections_total{upstream="py",tls="full"}"#
        ) >= 1,
        "the connections were TLS:\n{}",
        metrics(admin)
    );
    d.stop();
}

#[test]
fn demo_upstream_over_https_in_passthrough() {
    let pki = Pki::new("demo");
    let cert = pki.server("demo", &["127.0.0.1"], KeyKind::Rsa2048);
    let up_port = free_port();
    let _up = demo_upstream_tls(up_port, &cert);
    let (mut d, port, _) = start(
        &upstream(
            "demo",
            &format!("https://127.0.0.1:{up_port}/mcp"),
            &ca(&pki),
        ),
        &route("/mcp", "demo"),
    );
    let (r, _) = raw(port, &post("/mcp", CALL, ""));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["content"][0]["text"], "42");
    d.stop();
}

/// A large message reaches the upstream as the client sent it, over a plain and an https
/// upstream, on a new and on a pooled connection: the head the gateway writes and the client's
/// body leave in one vectored write (plain) or as records across rustls's buffer limit (TLS),
/// and the answer comes back whole. The echo tool answers the text it was sent.
#[test]
fn large_messages_reach_plain_and_https_upstreams_byte_for_byte() {
    let pki = Pki::new("large");
    let cert = pki.server("demo", &["127.0.0.1"], KeyKind::EcdsaP256);
    let (plain_port, tls_port) = (free_port(), free_port());
    let _plain = demo_upstream(plain_port);
    let _tls = demo_upstream_tls(tls_port, &cert);
    let (mut d, port, _) = start(
        &[
            upstream("plain", &format!("http://127.0.0.1:{plain_port}/mcp"), ""),
            upstream(
                "tls",
                &format!("https://127.0.0.1:{tls_port}/mcp"),
                &ca(&pki),
            ),
        ]
        .concat(),
        &[route("/plain", "plain"), route("/tls", "tls")].concat(),
    );
    // Escapes, quotes and multi-byte characters, as a file's contents have them.
    let line = "a \"quoted\" line, a tab\t, a backslash \\ and \u{2713} \u{fc}n\u{ef}code\n";
    for path in ["/plain", "/tls"] {
        for (i, lines) in [1, 1_200, 20_000, 55_000, 55_000].into_iter().enumerate() {
            let text = format!("{i}:{}", line.repeat(lines));
            let body = serde_json::json!({
                "jsonrpc": "2.0", "id": i, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": text}},
            })
            .to_string();
            assert!(body.len() < 4 * 1024 * 1024, "{} bytes", body.len());
            let (r, _) = raw(port, &post(path, &body, ""));
            let answer = r.json();
            assert_eq!(r.status, 200, "{path}, {} bytes: {answer}", body.len());
            assert_eq!(
                answer["result"]["content"][0]["text"].as_str(),
                Some(text.as_str()),
                "{path}, {} bytes: the text came back changed",
                body.len()
            );
        }
    }
    d.stop();
}

#[test]
fn certificates_that_do_not_verify_get_502_naming_the_upstream_and_the_reason_counted() {
    let pki = Pki::new("bad");
    let expired = pki.expired_server("expired", &["127.0.0.1"]);
    let wrong = pki.server("wrong", &["other.example"], KeyKind::EcdsaP256);
    let good = pki.server("good", &["127.0.0.1"], KeyKind::EcdsaP256);
    let ports = [free_port(), free_port(), free_port()];
    let _ups = [
        demo_upstream_tls(ports[0], &expired),
        demo_upstream_tls(ports[1], &wrong),
        demo_upstream_tls(ports[2], &good),
    ];
    let url = |i: usize| format!("https://127.0.0.1:{}/mcp", ports[i]);
    let (mut d, port, admin) = start(
        &[
            // A failed handshake counts against the breaker like a failed connect.
            upstream(
                "expired",
                &url(0),
                &format!("{}\nbreaker = {{ consecutive_failures = 2 }}", ca(&pki)),
            ),
            upstream("wrongname", &url(1), &ca(&pki)),
            // No `ca_file`: the system trust store, where the test CA is not.
            upstream("untrusted", &url(2), ""),
        ]
        .concat(),
        &[
            route("/expired", "expired"),
            route("/wrongname", "wrongname"),
            route("/untrusted", "untrusted"),
        ]
        .concat(),
    );
    for (path, name, reason) in [
        ("/expired", "expired", "expired"),
        ("/wrongname", "wrongname", "wrong_name"),
        ("/untrusted", "untrusted", "unknown_issuer"),
    ] {
        for _ in 0..2 {
            let (r, _) = raw(port, &post(path, CALL, ""));
            assert_eq!(
                r.status,
                502,
                "{path}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let body = r.json();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("`{name}`")), "{message}");
            assert!(message.contains(reason), "{message}");
            // The handshake's detail (the names the certificate holds) is the log's.
            assert!(
                !message.contains("other.example") && !message.contains("valid for"),
                "{message}"
            );
            assert_eq!(body["error"]["data"]["upstream"], name);
            assert_eq!(body["error"]["data"]["reason"], reason);
            assert_eq!(body["id"], 7, "the error answers the request");
        }
        assert_eq!(
            sample(
                admin,
                &format!(
                    "mcp_gateway_upstream_tls_failures_total{{upstream=\"{name}\",reason=\"{reason}\"}}"
                )
            ),
            2,
            "{}",
            metrics(admin)
        );
    }
    let (r, _) = raw(port, &post("/expired", CALL, ""));
    assert_eq!(
        r.status,
        503,
        "the breaker opened: {}",
        String::from_utf8_lossy(&r.body)
    );
    d.stop();
}

#[test]
fn server_name_sets_sni_verification_and_host() {
    let pki = Pki::new("sni");
    // Valid for `localhost` only, reached by address.
    let cert = pki.server("local", &["localhost"], KeyKind::EcdsaP256);
    let server = PyServer::start_tls(&[], &cert, None);
    let url = format!("https://127.0.0.1:{}/mcp", server.port);
    let (mut d, port, _) = start(
        &[
            upstream("byaddr", &url, &ca(&pki)),
            upstream(
                "named",
                &url,
                &format!("{}\nserver_name = \"localhost\"", ca(&pki)),
            ),
        ]
        .concat(),
        &[route("/byaddr", "byaddr"), route("/named", "named")].concat(),
    );
    let (r, _) = raw(port, &post("/byaddr", CALL, ""));
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["data"]["reason"], "wrong_name");
    // The SDK's DNS-rebinding protection accepts `Host: localhost:<port>` only if the gateway
    // sends the server name as Host too.
    let out = py_client(&format!("http://127.0.0.1:{port}/named"), "2026-07-28");
    assert_core(&out, "server_name");
    d.stop();
}

#[test]
fn a_client_certificate_reaches_an_upstream_that_requires_one() {
    let pki = Pki::new("mtls");
    let cert = pki.server("up", &["127.0.0.1"], KeyKind::EcdsaP256);
    let client = pki.client("gateway", "gateway", None);
    let server = PyServer::start_tls(&[], &cert, Some(&pki.ca));
    let url = format!("https://127.0.0.1:{}/mcp", server.port);
    let (mut d, port, _) = start(
        &[
            upstream(
                "withcert",
                &url,
                &format!(
                    "{}\nclient_cert = \"{}\"\nclient_key = \"{}\"",
                    ca(&pki),
                    client.cert.display(),
                    client.key.display()
                ),
            ),
            upstream("without", &url, &ca(&pki)),
        ]
        .concat(),
        &[route("/mcp", "withcert"), route("/without", "without")].concat(),
    );
    for mode in ["legacy", "2026-07-28"] {
        let out = py_client(&format!("http://127.0.0.1:{port}/mcp"), mode);
        assert_core(&out, mode);
    }
    // Without one the upstream refuses the connection (after the TLS 1.3 handshake, with an
    // alert): the client still gets a 502 naming the upstream, never a plaintext retry.
    let (r, _) = raw(port, &post("/without", CALL, ""));
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`without`")
    );
    d.stop();
}

/// An upstream's client certificate replaced in place (as cert-manager or a SPIFFE agent
/// rotates one: a new file renamed over the old) is presented from the next connection on,
/// with no reload; files that do not load leave the running TLS in use. Before, the files were
/// read only at a start or reload: the gateway went on presenting the old certificate (here,
/// one the upstream does not trust) until someone reloaded it.
#[test]
fn a_client_certificate_rotated_in_place_is_presented_without_a_reload() {
    let pki = Pki::new("rotate");
    let other = Pki::new("rotate-other");
    let cert = pki.server("up", &["127.0.0.1"], KeyKind::EcdsaP256);
    let trusted = pki.client("gateway", "gateway", None);
    let untrusted = other.client("gateway", "gateway", None);
    let server = PyServer::start_tls(&[], &cert, Some(&pki.ca));
    let dir = pki.dir().join("rotating");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("client.pem"), dir.join("client.key"));
    let install = |from: &std::path::Path, to: &std::path::Path| {
        let next = to.with_extension("next");
        std::fs::copy(from, &next).unwrap();
        std::fs::rename(&next, to).unwrap();
    };
    install(&untrusted.cert, &cert_file);
    install(&untrusted.key, &key_file);
    // Another upstream before it, whose CA file stops loading as the certificate rotates: the
    // rotation still takes (before, the first file that did not load stopped every upstream
    // after it from taking its new files: an attacker's review).
    let other_ca = dir.join("other-ca.pem");
    install(&pki.ca, &other_ca);
    let url = format!("https://127.0.0.1:{}/mcp", server.port);
    let (mut d, port, _) = start(
        &format!(
            "{}{}",
            upstream(
                "first",
                &url,
                &format!("ca_file = \"{}\"", other_ca.display())
            ),
            upstream(
                "py",
                &url,
                &format!(
                    "{}\nclient_cert = \"{}\"\nclient_key = \"{}\"",
                    ca(&pki),
                    cert_file.display(),
                    key_file.display()
                ),
            )
        ),
        &route("/mcp", "py"),
    );
    let initialize = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let status = || raw(port, &post("/mcp", initialize, "")).0.status;
    assert_eq!(status(), 502, "another CA's certificate is refused");
    std::fs::write(other_ca.with_extension("next"), "not a certificate").unwrap();
    std::fs::rename(other_ca.with_extension("next"), &other_ca).unwrap();
    install(&trusted.cert, &cert_file);
    install(&trusted.key, &key_file);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not presented within 10 s:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        d.log().contains("upstream TLS files changed: reloaded"),
        "{}",
        d.log()
    );
    // A key that does not load is refused; the certificate in use stays.
    std::fs::write(key_file.with_extension("next"), "not a key").unwrap();
    std::fs::rename(key_file.with_extension("next"), &key_file).unwrap();
    d.wait_for_log(
        "upstream TLS files changed but do not load",
        Duration::from_secs(10),
    );
    assert_eq!(status(), 200, "the running TLS is kept");
    d.stop();
}

/// A TCP relay in front of an upstream that counts the connections it accepts (what the
/// upstream sees); TLS passes through it untouched.
struct CountingRelay {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CountingRelay {
    fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (Arc::clone(&accepted), Arc::clone(&stop));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                n.fetch_add(1, Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Self {
            port,
            accepted,
            stop,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[test]
fn pooled_tls_connections_are_reused_and_new_ones_resumed() {
    let pki = Pki::new("pool");
    let cert = pki.server("up", &["127.0.0.1"], KeyKind::EcdsaP256);
    // OpenSSL under uvicorn (TLS 1.3 session tickets after the handshake) and rustls.
    let py = PyServer::start_tls(&["--json"], &cert, None);
    let demo_port = free_port();
    let _demo = demo_upstream_tls(demo_port, &cert);
    for (what, target) in [("python", py.port), ("demo", demo_port)] {
        let relay = CountingRelay::start(target);
        let nopool = CountingRelay::start(target);
        let (mut d, port, admin) = start(
            &[
                upstream(
                    "pooled",
                    &format!("https://127.0.0.1:{}/mcp", relay.port),
                    &ca(&pki),
                ),
                upstream(
                    "nopool",
                    &format!("https://127.0.0.1:{}/mcp", nopool.port),
                    &format!("{}\nmax_idle_connections_per_worker = 0", ca(&pki)),
                ),
            ]
            .concat(),
            &[route("/mcp", "pooled"), route("/nopool", "nopool")].concat(),
        );
        let requests = 40;
        for (path, relay) in [("/mcp", &relay), ("/nopool", &nopool)] {
            for i in 0..requests {
                // A new client connection each time: the pool is per worker, not per client.
                let (r, _) = raw(port, &post(path, CALL_2026, HEADERS_2026));
                assert_eq!(
                    r.status,
                    200,
                    "{what} {path} #{i}: {}",
                    String::from_utf8_lossy(&r.body)
                );
                // Let a TLS 1.3 server's late records (session tickets) arrive while idle.
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            assert!(relay.accepted() > 0, "{what} {path}: through the relay");
        }
        assert!(
            relay.accepted() <= 4,
            "{what}: {requests} requests took {} upstream connections",
            relay.accepted()
        );
        assert_eq!(
            nopool.accepted(),
            requests,
            "{what}: without a pool, one each"
        );
        let resumed = sample(
            admin,
            r#"mcp_gateway_upstream_connections_total{upstream="nopool",tls="resumed"}"#,
        );
        assert!(
            resumed >= requests as u64 - 4,
            "{what}: new connections resume the TLS session ({resumed} of {requests}):\n{}",
            metrics(admin)
        );
        d.stop();
    }
}

#[test]
fn upstream_host_names_are_resolved_again_in_the_background() {
    let pki = Pki::new("dns");
    let cert = pki.server("up", &["localhost"], KeyKind::EcdsaP256);
    let up_port = free_port();
    let _up = demo_upstream_tls(up_port, &cert);
    let (mut d, port, admin) = start(
        &upstream(
            "byname",
            &format!("https://localhost:{up_port}/mcp"),
            &format!("{}\nresolve_every_ms = 100", ca(&pki)),
        ),
        &route("/mcp", "byname"),
    );
    let series = r#"mcp_gateway_upstream_resolutions_total{upstream="byname",result="ok"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(admin, series) < 5 {
        assert!(
            Instant::now() < deadline,
            "no re-resolution:\n{}",
            metrics(admin)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (r, _) = raw(port, &post("/mcp", CALL, ""));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    d.stop();
}
