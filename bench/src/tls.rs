//! Scenario `tls`: the gateway's TLS against nginx's on the same certificate (ECDSA P-256, made
//! here by a test CA), in the same run, rounds interleaved:
//! 1. full TLS 1.3 handshakes: a new connection per `tools/call`, no resumption;
//! 2. `tools/call` over keep-alive TLS connections;
//! 3. a plain client to a proxy whose upstream is https (nginx terminating TLS in front of
//!    `mcp-upstream`, the same upstream for both proxies).
//!
//! The CPU figures are the server process's own (user + system) within the measured time,
//! divided by what it served in that time.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{
    peers::{KillOnDrop, demo_upstream, free_port},
    pki::{Issued, KeyKind, Pki},
};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

use crate::{
    conn::{Connect, TlsClient},
    load::{self, LoadResult, LoadSpec, Mix},
    proxy::{Proc, bin, cpu_seconds},
};

/// What a round measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Round {
    Handshakes,
    KeepAlive,
    HttpsUpstream,
}

impl Round {
    pub fn title(self) -> &'static str {
        match self {
            Round::Handshakes => "full TLS 1.3 handshakes (a new connection per request)",
            Round::KeepAlive => "tools/call over keep-alive TLS",
            Round::HttpsUpstream => "tools/call to an https upstream (plain client side)",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Round::Handshakes => "handshakes",
            Round::KeepAlive => "keep_alive_tls",
            Round::HttpsUpstream => "https_upstream",
        }
    }
}

pub struct Row {
    pub round: Round,
    /// `gateway` or `nginx`.
    pub server: &'static str,
    pub result: LoadResult,
    /// The server's CPU µs per request (per handshake in round 1) within the measured time.
    pub server_cpu_us: f64,
    /// The same for the other processes on the path (upstream, TLS front), and the load
    /// generator.
    pub other_cpu_us: Vec<(String, f64)>,
    /// The server's threads' time on a CPU, and runnable but waiting for one, as shares of the
    /// measured time (summed over its threads): on a machine shared with other work, a server
    /// that waits for a CPU is slowed by the scheduler, not by its own cost.
    pub server_running: f64,
    pub server_waiting: f64,
    /// Across the rounds: the lowest and highest rps; the row is the median round.
    pub range: Option<(f64, f64)>,
    pub rounds: usize,
}

pub struct TlsReport {
    pub rows: Vec<Row>,
    /// Why the gateway's side (or a part of it) was not measured.
    pub gateway_missing: Vec<String>,
    /// What the checking handshake negotiated, per target.
    pub negotiated: Vec<(String, String)>,
    pub connections: usize,
    pub seconds: f64,
    pub peak_rss_mib: Vec<(String, f64)>,
    /// The machine's load average (1, 5, 15 min) before and after the scenario.
    pub loadavg: [String; 2],
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A provider with X25519 as the only key exchange, so that both servers do the same work (a
/// rustls server would otherwise pick the post-quantum hybrid rustls offers first, which
/// nginx's OpenSSL 3.0 does not know).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    Arc::new(p)
}

/// The load's certificate check: the server's handshake signature is verified (it is part of
/// what the server must do), the chain is not (checked once per target before the load, by
/// [`check`]): the load generator shares the 2 cores with the servers, and like `h2load` or
/// `wrk` it should spend them on load, not on checking the same chain thousands of times.
#[derive(Debug)]
struct SignatureOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The load's client: TLS 1.3 only, X25519, ALPN `http/1.1`, no resumption (every new
/// connection is a full handshake), asking for `name` (SNI).
pub fn load_client(name: &str) -> TlsClient {
    let provider = provider();
    let verifier = Arc::new(SignatureOnly(provider.signature_verification_algorithms));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with aws-lc-rs")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    TlsClient {
        config: Arc::new(config),
        server_name: ServerName::try_from(name.to_owned()).expect("a server name"),
    }
}

/// One fully verified handshake (chain against the test CA, name `localhost`) and one
/// `tools/call` to `port`; what was negotiated.
fn check(port: u16, ca: &Path) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let session =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost")?)?;
    let mut tls = rustls::StreamOwned::new(session, tcp);
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    write!(
        tls,
        "POST /mcp HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n\
         mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: add\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    // The server closes after `connection: close`; some do so without close_notify.
    let _ = tls.read_to_end(&mut answer);
    let status = String::from_utf8_lossy(&answer);
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 200"),
        "answered {:?}",
        status.lines().next().unwrap_or("nothing")
    );
    let c = &tls.conn;
    Ok(format!(
        "{:?}, {:?}, {:?}, ALPN {}",
        c.protocol_version()
            .map_or("?".into(), |v| format!("{v:?}")),
        c.negotiated_cipher_suite()
            .map_or("?".into(), |s| format!("{:?}", s.suite())),
        c.negotiated_key_exchange_group()
            .map_or("?".into(), |g| format!("{:?}", g.name())),
        c.alpn_protocol()
            .map_or("none".into(), |a| String::from_utf8_lossy(a).into_owned()),
    )
    .replace('"', ""))
}

/// An nginx with `worker_processes 1` (as in the proxy scenario), `conf` inside `http {}`.
fn nginx(dir: &Path, name: &str, http: &str, ports: &[u16]) -> Proc {
    let dir = dir.join(name);
    std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 10000000;\n{http}}}\n",
            d = dir.display()
        ),
    )
    .expect("nginx config");
    let p = Proc(KillOnDrop(
        Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (cargo xtask setup installs nginx-light)"),
    ));
    for port in ports {
        integration_tests::peers::wait_port(*port, Duration::from_secs(5));
    }
    p
}

/// The TLS server block lines for `cert`, as nginx has them by default otherwise (session
/// tickets on, no shared session cache).
fn nginx_tls(port: u16, cert: &Issued) -> String {
    format!(
        "    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n",
        cert.cert.display(),
        cert.key.display()
    )
}

const PROXY_LOCATION: &str = "proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n";

/// A gateway (one unpinned worker, kernel program off, as in the proxy scenario) with
/// `listeners` and `upstream` (`[[upstreams]]` entries named `up`, routed at `/mcp`); its
/// process, or why it did not start (e.g. the build does not know the configuration).
fn gateway(
    dir: &Path,
    name: &str,
    listeners: &str,
    upstream: &str,
    ports: &[u16],
) -> Result<Proc, String> {
    let config = dir.join(format!("gateway-{name}.toml"));
    let log = dir.join(format!("gateway-{name}.log"));
    std::fs::write(
        &config,
        format!(
            "[gateway]\ninstance = \"bench-{name}\"\nworkers = 1\npin_workers = false\n{listeners}\
             [admin]\naddress = \"127.0.0.1:{}\"\n[kernel]\nenabled = false\n{upstream}\
             [[routes]]\npath = \"/mcp\"\nupstream = \"up\"\n",
            free_port()
        ),
    )
    .expect("write config");
    let child = Command::new(bin("gateway"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "error")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("gateway log"))
        .spawn()
        .expect("start gateway");
    let mut p = Proc(KillOnDrop(child));
    let deadline = Instant::now() + Duration::from_secs(5);
    for port in ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            let exited = p.0.0.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                // The error's first paragraph: its first line and the last (a configuration
                // error's reason comes after the quoted TOML).
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                let first: Vec<&str> = log
                    .lines()
                    .skip_while(|l| !l.starts_with("Error"))
                    .take_while(|l| !l.trim().is_empty())
                    .collect();
                let why = match first.as_slice() {
                    [] => "no error printed".to_owned(),
                    [one] => (*one).to_owned(),
                    [head, .., last] => format!("{head}: {}", last.trim()),
                };
                return Err(format!(
                    "the gateway did not start ({}): {why}",
                    exited.map_or("not listening after 5 s".into(), |s| s.to_string()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(p)
}

/// Nanoseconds the threads of `pid` have run and waited to run (runnable, not on a CPU), from
/// /proc/<pid>/task/*/schedstat.
fn schedstat(pid: u32) -> (f64, f64) {
    let mut total = (0.0, 0.0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let mut f = stat
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or(0.0));
        total.0 += f.next().unwrap_or(0.0);
        total.1 += f.next().unwrap_or(0.0);
    }
    total
}

struct Target<'a> {
    round: Round,
    server: &'static str,
    port: u16,
    path: &'static str,
    connect: Connect,
    /// The server under test, then the others on the path.
    procs: Vec<(&'static str, &'a Proc)>,
}

pub fn run(quick: bool) -> TlsReport {
    let load_before = loadavg();
    let dir = std::env::temp_dir().join(integration_tests::unique("bench-tls"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let pki = Pki::new("bench-tls");
    let cert = pki.server("server", &["localhost", "127.0.0.1"], KeyKind::EcdsaP256);

    let up_port = free_port();
    let upstream = Proc(demo_upstream(up_port));
    // The https upstream: nginx terminating TLS (same certificate) in front of `mcp-upstream`.
    let ups_port = free_port();
    let front = nginx(
        &dir,
        "front",
        &format!(
            "  upstream mcp {{ server 127.0.0.1:{up_port}; keepalive 64; keepalive_requests 10000000; }}\n\
             server {{\n{}    location / {{\n      proxy_pass http://mcp;\n      {PROXY_LOCATION}    }}\n  }}\n",
            nginx_tls(ups_port, &cert)
        ),
        &[ups_port],
    );
    // The peer: nginx terminating TLS in front of the same upstream (rounds 1 and 2), and
    // proxying plain HTTP to the https upstream, verifying it as the gateway does (round 3).
    let (ngx_tls, ngx_plain) = (free_port(), free_port());
    let peer = nginx(
        &dir,
        "peer",
        &format!(
            "  upstream mcp {{ server 127.0.0.1:{up_port}; keepalive 64; keepalive_requests 10000000; }}\n\
             upstream ups {{ server 127.0.0.1:{ups_port}; keepalive 64; keepalive_requests 10000000; }}\n\
             server {{\n{}    location / {{\n      proxy_pass http://mcp;\n      {PROXY_LOCATION}    }}\n  }}\n\
             server {{\n    listen 127.0.0.1:{ngx_plain};\n    location / {{\n      proxy_pass https://ups;\n      {PROXY_LOCATION}\
                   proxy_ssl_protocols TLSv1.2 TLSv1.3;\n      proxy_ssl_verify on;\n      proxy_ssl_trusted_certificate {};\n\
                   proxy_ssl_name localhost;\n      proxy_ssl_server_name on;\n      proxy_ssl_session_reuse on;\n    }}\n  }}\n",
            nginx_tls(ngx_tls, &cert),
            pki.ca.display()
        ),
        &[ngx_tls, ngx_plain],
    );
    // The gateway's side: one process with a TLS listener (rounds 1 and 2), another whose
    // upstream is https (round 3), so that one feature missing leaves the other measurable.
    let mut gateway_missing = Vec::new();
    let gw_tls_port = free_port();
    let gw_tls = gateway(
        &dir,
        "tls",
        &format!(
            "[[listeners]]\naddress = \"127.0.0.1:{gw_tls_port}\"\n[listeners.tls]\n\
             certificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            cert.cert.display(),
            cert.key.display()
        ),
        &format!("[[upstreams]]\nname = \"up\"\nurl = \"http://127.0.0.1:{up_port}/mcp\"\n"),
        &[gw_tls_port],
    )
    .map_err(|e| gateway_missing.push(format!("TLS listener: {e}")))
    .ok();
    let gw_ups_port = free_port();
    let gw_ups = gateway(
        &dir,
        "ups",
        &format!("[[listeners]]\naddress = \"127.0.0.1:{gw_ups_port}\"\n"),
        &format!(
            "[[upstreams]]\nname = \"up\"\nurl = \"https://127.0.0.1:{ups_port}/mcp\"\nca_file = \"{}\"\nserver_name = \"localhost\"\n",
            pki.ca.display()
        ),
        &[gw_ups_port],
    )
    .map_err(|e| gateway_missing.push(format!("https upstream: {e}")))
    .ok();

    let tls = load_client("localhost");
    let handshakes = Connect {
        tls: Some(tls.clone()),
        per_request: true,
    };
    let keep_alive = Connect {
        tls: Some(tls),
        per_request: false,
    };
    let mut targets = vec![Target {
        round: Round::Handshakes,
        server: "nginx",
        port: ngx_tls,
        path: "/mcp",
        connect: handshakes.clone(),
        procs: vec![("nginx", &peer), ("mcp-upstream", &upstream)],
    }];
    if let Some(gw) = &gw_tls {
        targets.push(Target {
            round: Round::Handshakes,
            server: "gateway",
            port: gw_tls_port,
            path: "/mcp",
            connect: handshakes,
            procs: vec![("gateway", gw), ("mcp-upstream", &upstream)],
        });
    }
    targets.push(Target {
        round: Round::KeepAlive,
        server: "nginx",
        port: ngx_tls,
        path: "/mcp",
        connect: keep_alive.clone(),
        procs: vec![("nginx", &peer), ("mcp-upstream", &upstream)],
    });
    if let Some(gw) = &gw_tls {
        targets.push(Target {
            round: Round::KeepAlive,
            server: "gateway",
            port: gw_tls_port,
            path: "/mcp",
            connect: keep_alive,
            procs: vec![("gateway", gw), ("mcp-upstream", &upstream)],
        });
    }
    targets.push(Target {
        round: Round::HttpsUpstream,
        server: "nginx",
        port: ngx_plain,
        path: "/mcp",
        connect: Connect::default(),
        procs: vec![
            ("nginx", &peer),
            ("TLS front (nginx)", &front),
            ("mcp-upstream", &upstream),
        ],
    });
    if let Some(gw) = &gw_ups {
        targets.push(Target {
            round: Round::HttpsUpstream,
            server: "gateway",
            port: gw_ups_port,
            path: "/mcp",
            connect: Connect::default(),
            procs: vec![
                ("gateway", gw),
                ("TLS front (nginx)", &front),
                ("mcp-upstream", &upstream),
            ],
        });
    }

    // Every TLS listener is checked once, fully (chain and name), before it is loaded.
    let mut negotiated = Vec::new();
    let mut checked = |server: &str, port: u16| match check(port, &pki.ca) {
        Ok(what) => {
            negotiated.push((server.to_owned(), what));
            true
        }
        Err(e) => {
            negotiated.push((server.to_owned(), format!("check failed: {e:#}")));
            false
        }
    };
    let nginx_ok = checked("nginx", ngx_tls);
    let gateway_ok = gw_tls.is_none() || checked("gateway", gw_tls_port);
    if !gateway_ok {
        gateway_missing.push("TLS listener: the checking handshake failed (see negotiated)".into());
    }
    targets.retain(|t| {
        t.round == Round::HttpsUpstream
            || match t.server {
                "nginx" => nginx_ok,
                _ => gateway_ok,
            }
    });

    let connections = 32;
    let seconds = if quick { 1.0 } else { 3.0 };
    let warmup = Duration::from_millis(if quick { 500 } else { 1000 });
    let me = std::process::id();
    let measure = |t: &Target<'_>| {
        let spec = LoadSpec {
            target: ([127, 0, 0, 1], t.port).into(),
            path: t.path.into(),
            connections,
            threads: 1,
            duration: Duration::from_secs_f64(seconds),
            warmup,
            rate: None,
            tool: "add".into(),
            headers: String::new(),
            legacy: false,
            mix: Mix::default(),
            connect: t.connect.clone(),
        };
        let cpu = || {
            let cpu = t
                .procs
                .iter()
                .map(|(_, p)| p.cpu_seconds())
                .chain([cpu_seconds(me)])
                .collect::<Vec<f64>>();
            (cpu, schedstat(t.procs[0].1.pid()), Instant::now())
        };
        let (result, [(before, s0, t0), (after, s1, t1)]) = load::run_sampled(&spec, &mut { cpu });
        let per = |i: usize| (after[i] - before[i]) * 1e6 / result.ok.max(1) as f64;
        let window = (t1 - t0).as_secs_f64() * 1e9;
        let mut other_cpu_us: Vec<(String, f64)> = t.procs[1..]
            .iter()
            .enumerate()
            .map(|(i, (n, _))| ((*n).to_owned(), per(i + 1)))
            .collect();
        other_cpu_us.push(("load generator".into(), per(t.procs.len())));
        Row {
            round: t.round,
            server: t.server,
            server_cpu_us: per(0),
            other_cpu_us,
            server_running: (s1.0 - s0.0) / window,
            server_waiting: (s1.1 - s0.1) / window,
            result,
            range: None,
            rounds: 1,
        }
    };
    // Every target once per round, interleaved, as in the proxy scenario; the median round by
    // rps, with the range across rounds.
    let rounds = if quick { 1 } else { 3 };
    let mut runs: Vec<Vec<Row>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, t) in targets.iter().enumerate() {
            runs[i].push(measure(t));
        }
    }
    let rows = runs
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a.result.rps().total_cmp(&b.result.rps()));
            let (lo, hi) = (r[0].result.rps(), r[r.len() - 1].result.rps());
            let n = r.len();
            let mut median = r.swap_remove(n / 2);
            median.range = (n > 1).then_some((lo, hi));
            median.rounds = n;
            median
        })
        .collect();
    let mut peak_rss_mib = vec![("nginx".to_owned(), peer.peak_rss_mib())];
    if let Some(gw) = &gw_tls {
        peak_rss_mib.push(("gateway (TLS listener)".into(), gw.peak_rss_mib()));
    }
    if let Some(gw) = &gw_ups {
        peak_rss_mib.push(("gateway (https upstream)".into(), gw.peak_rss_mib()));
    }
    drop((gw_tls, gw_ups, peer, front, upstream));
    let _ = std::fs::remove_dir_all(&dir);
    TlsReport {
        rows,
        gateway_missing,
        negotiated,
        connections,
        seconds,
        peak_rss_mib,
        loadavg: [load_before, loadavg()],
    }
}
