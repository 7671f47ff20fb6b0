//! `mcp-upstream`: a small, fast MCP server over Streamable HTTP, thread-per-core on monoio.
//! It is the demo upstream behind `cargo xtask run` and the benchmark upstream (so that a
//! benchmark measures the gateway, not the server). It answers every POST with JSON, speaks the
//! session era (`initialize`, `Mcp-Session-Id`) and 2026-07-28 (`server/discover`, stateless),
//! and offers a few real tools.
//!
//! Usage: mcp-upstream [--listen 127.0.0.1:9100] [--workers N] [--tls-cert PEM --tls-key PEM]
//! [--name NAME] [--strict-sessions]
//! (with a certificate and key it serves https: TLS 1.3 and 1.2, ALPN http/1.1, rustls; with a
//! name it offers a `whoami` tool that answers it, to tell replicas apart, and a `sleep` tool
//! (`ms`) that answers late; with strict sessions
//! a request naming a session this process did not mint gets 404, as from a real replica).

use std::{net::SocketAddr, time::Duration};

use clap::Parser as _;
use gateway::{
    http::{self, Io, Limits},
    mcp::{Id, Kind, Parsed, Parser, RpcError, error, version},
};
use serde_json::{Value, json};

#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Serve https with this certificate chain (PEM)...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Offer a `whoami` tool that answers this name.
    #[arg(long)]
    name: Option<String>,
    /// Answer 404 to a request whose `Mcp-Session-Id` this process did not mint.
    #[arg(long)]
    strict_sessions: bool,
}

/// `--name`, when given.
static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// The sessions minted, with `--strict-sessions`.
static SESSIONS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    std::sync::OnceLock::new();
thread_local! {
    /// Set by the `sleep` tool: how long to wait before answering the request in hand.
    static SLEEP_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The TLS server configuration, when a certificate is given.
fn tls_config(args: &Args) -> anyhow::Result<Option<std::sync::Arc<rustls::ServerConfig>>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(std::sync::Arc::new(config)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workers = if args.workers == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        args.workers
    };
    let tls = tls_config(&args)?;
    if let Some(name) = &args.name {
        let _ = NAME.set(name.clone());
    }
    if args.strict_sessions {
        let _ = SESSIONS.set(std::sync::Mutex::default());
    }
    let sockets = gateway::runtime::bind_reuseport(args.listen, workers)?;
    eprintln!(
        "mcp-upstream: serving MCP at {}://{}/mcp with {workers} workers",
        if tls.is_some() { "https" } else { "http" },
        args.listen
    );
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            let tls = tls.clone();
            std::thread::spawn(move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = monoio::net::TcpListener::from_std(socket).expect("listener");
                    while let Ok((stream, _)) = listener.accept().await {
                        let _ = stream.set_nodelay(true);
                        let io = Io::new(stream, Duration::from_secs(10));
                        monoio::spawn(handshake_then_serve(io, tls.clone()));
                    }
                });
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Runs the TLS handshake first, when the upstream serves https.
async fn handshake_then_serve(mut io: Io, tls: Option<std::sync::Arc<rustls::ServerConfig>>) {
    if let Some(config) = tls {
        let Ok(session) = rustls::ServerConnection::new(config) else {
            return;
        };
        let deadline = monoio::time::Instant::now() + Duration::from_secs(10);
        if io
            .handshake(rustls::Connection::Server(session), deadline)
            .await
            .is_err()
        {
            return;
        }
    }
    serve(io).await;
}

async fn serve(mut io: Io) {
    let limits = Limits {
        idle_timeout: Duration::from_secs(300),
        ..Limits::default()
    };
    let mut parser = Parser::default();
    loop {
        let req = match http::read_request(&mut io, &limits).await {
            Ok(r) => r,
            Err(http::Unread {
                error: http::HttpError::Closed,
                ..
            }) => return,
            Err(http::Unread { error: e, .. }) => {
                let body = RpcError::invalid_request(e.to_string()).body();
                let _ = io
                    .write_all(http::response(
                        e.status(),
                        &[("content-type", "application/json")],
                        &body,
                        false,
                    ))
                    .await;
                return;
            }
        };
        let (status, session, body) = answer(&req, &mut parser);
        // The replicas' `sleep` tool: a slow call, answered after `ms`.
        let slept = SLEEP_MS.replace(0);
        if slept > 0 {
            monoio::time::sleep(Duration::from_millis(slept)).await;
        }
        let mut headers = vec![("content-type", "application/json")];
        if let Some(s) = &session {
            headers.push(("mcp-session-id", s.as_str()));
        }
        if io
            .write_all(http::response(status, &headers, &body, req.keep_alive))
            .await
            .is_err()
            || !req.keep_alive
        {
            return;
        }
    }
}

fn new_session_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Status, a new session id (on `initialize`), and the body.
fn answer(req: &http::Request, parser: &mut Parser) -> (u16, Option<String>, Vec<u8>) {
    match req.method.as_str() {
        "POST" => {}
        "DELETE" => return (200, None, Vec::new()),
        _ => {
            return (
                405,
                None,
                RpcError::invalid_request("only POST (and DELETE) here").body(),
            );
        }
    }
    let msg = match parser.parse(&req.body) {
        Ok(Parsed::Single(m)) => m,
        Ok(Parsed::Batch(_)) => {
            return (
                400,
                None,
                RpcError::invalid_request("batches are not supported").body(),
            );
        }
        Err(e) => return (e.http_status, None, e.body()),
    };
    if let (Some(known), Some(id)) = (SESSIONS.get(), req.header_str("mcp-session-id"))
        && !known.lock().expect("not poisoned").contains(id)
    {
        return (
            404,
            None,
            RpcError::new(error::SESSION_NOT_FOUND, "unknown session", 404)
                .with_id(msg.id.clone())
                .body(),
        );
    }
    if msg.kind != Kind::Request {
        return (202, None, Vec::new());
    }
    let modern = req.header_str("mcp-protocol-version") == Some(version::STATELESS)
        || msg.meta_protocol_version.as_deref() == Some(version::STATELESS);
    let id = msg.id.clone();
    let method = msg.method.as_deref().unwrap_or_default();
    let mut session = None;
    let result = match method {
        "initialize" => {
            // Only initialize needs a params field the parser does not extract.
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let asked = body["params"]["protocolVersion"]
                .as_str()
                .unwrap_or("2025-06-18");
            let version = if version::is_supported(asked) && asked != version::STATELESS {
                asked
            } else {
                "2025-11-25"
            };
            let id = new_session_id();
            if let Some(known) = SESSIONS.get() {
                known.lock().expect("not poisoned").insert(id.clone());
            }
            session = Some(id);
            Ok(json!({
                "protocolVersion": version,
                "capabilities": { "tools": { "listChanged": false } },
                "serverInfo": { "name": "mcp-gateway-demo", "version": env!("CARGO_PKG_VERSION") },
            }))
        }
        "server/discover" => Ok(json!({
            "supportedVersions": version::SUPPORTED,
            "capabilities": { "tools": { "listChanged": false } },
            "serverInfo": { "name": "mcp-gateway-demo", "version": env!("CARGO_PKG_VERSION") },
            "cacheScope": "public",
            "ttlMs": 60000,
        })),
        "ping" => Ok(json!({})),
        "tools/list" => {
            let mut r = json!({ "tools": tools() });
            if modern {
                r["cacheScope"] = json!("public");
                r["ttlMs"] = json!(60000);
            }
            Ok(r)
        }
        "tools/call" => Ok(call(
            msg.name.as_deref().unwrap_or_default(),
            msg.arguments.as_ref().unwrap_or(&Value::Null),
        )),
        other => Err(RpcError::new(
            error::METHOD_NOT_FOUND,
            format!("method `{other}` not found"),
            if modern { 404 } else { 200 },
        )),
    };
    match result {
        Ok(mut r) => {
            if modern {
                r["resultType"] = json!("complete");
            }
            let body = json!({ "jsonrpc": "2.0", "id": id.as_ref().map_or(Value::Null, Id::to_json), "result": r });
            (200, session, serde_json::to_vec(&body).expect("serializes"))
        }
        Err(e) => {
            let status = e.http_status;
            (status, None, e.with_id(id).body())
        }
    }
}

fn tools() -> Value {
    let text = |d: &str| json!({ "type": "string", "description": d });
    json!([
        { "name": "echo", "description": "Returns the text it is given.",
          "inputSchema": { "type": "object", "properties": { "text": text("what to echo") }, "required": ["text"] } },
        { "name": "add", "description": "Adds two integers.",
          "inputSchema": { "type": "object", "properties": { "a": { "type": "integer" }, "b": { "type": "integer" } }, "required": ["a", "b"] } },
        { "name": "word_count", "description": "Counts the words and characters of a text.",
          "inputSchema": { "type": "object", "properties": { "text": text("the text") }, "required": ["text"] } },
        { "name": "utc_now", "description": "The current time in UTC (RFC 3339).",
          "inputSchema": { "type": "object", "properties": {} } },
    ])
    .as_array()
    .cloned()
    .map(|mut list| {
        if NAME.get().is_some() {
            list.push(json!({ "name": "whoami", "description": "The name of this replica.",
                "inputSchema": { "type": "object", "properties": {} } }));
            list.push(json!({ "name": "sleep", "description": "Answers after `ms` milliseconds.",
                "inputSchema": { "type": "object", "properties": { "ms": { "type": "integer" } } } }));
        }
        Value::Array(list)
    })
    .expect("a list")
}

fn call(name: &str, args: &Value) -> Value {
    let ok =
        |text: String| json!({ "content": [{ "type": "text", "text": text }], "isError": false });
    let err =
        |text: String| json!({ "content": [{ "type": "text", "text": text }], "isError": true });
    let s = |k: &str| args.get(k).and_then(Value::as_str);
    let i = |k: &str| args.get(k).and_then(Value::as_i64);
    match name {
        "echo" => s("text").map_or_else(
            || err("`text` (a string) is required".into()),
            |t| ok(t.to_owned()),
        ),
        "add" => match (i("a"), i("b")) {
            (Some(a), Some(b)) => a
                .checked_add(b)
                .map_or_else(|| err("overflow".into()), |v| ok(v.to_string())),
            _ => err("`a` and `b` (integers) are required".into()),
        },
        "word_count" => s("text").map_or_else(
            || err("`text` (a string) is required".into()),
            |t| {
                ok(format!(
                    "{} words, {} characters",
                    t.split_whitespace().count(),
                    t.chars().count()
                ))
            },
        ),
        "utc_now" => {
            ok(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string())
        }
        "whoami" if NAME.get().is_some() => ok(NAME.get().cloned().unwrap_or_default()),
        "sleep" if NAME.get().is_some() => {
            let ms = i("ms").and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0);
            SLEEP_MS.set(ms.min(60_000));
            ok(format!("slept {ms} ms"))
        }
        other => err(format!("unknown tool `{other}`")),
    }
}
