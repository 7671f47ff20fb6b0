//! Real MCP peers for loopback tests: the Python SDK's server and client (installed by
//! `cargo xtask setup` into `.tools/venv`), a raw HTTP client for malformed input, and a
//! deliberately misbehaving upstream on raw sockets.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn python() -> PathBuf {
    let p = root().join(".tools/venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// A port free now, and never handed out before by this process: the kernel may give a port
/// just let go again at once, and two of a test's ports (a listener's and the admin's, say)
/// must differ.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..10_000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("no port free that this process has not handed out already");
}

/// Waits until something accepts on `port`.
pub fn wait_port(port: u16, timeout: Duration) {
    wait_addr(addr(port), timeout)
}

/// Waits until something accepts connections on `at`.
pub fn wait_addr(at: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(at).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {at} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (and reaped) on drop, also when a test fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The project's own MCP server (`mcp-upstream`, release build) on `port`.
pub fn demo_upstream(port: u16) -> KillOnDrop {
    demo_upstream_in(None, port)
}

/// As [`demo_upstream`], serving https with `tls`'s certificate and key.
pub fn demo_upstream_tls(port: u16, tls: &crate::pki::Issued) -> KillOnDrop {
    demo_upstream_args(
        None,
        port,
        &[
            "--tls-cert",
            tls.cert.to_str().expect("utf-8 path"),
            "--tls-key",
            tls.key.to_str().expect("utf-8 path"),
        ],
    )
}

/// As [`demo_upstream`], on 127.0.0.1 of network namespace `ns` (this one if `None`).
pub fn demo_upstream_in(ns: Option<&str>, port: u16) -> KillOnDrop {
    demo_upstream_args(ns, port, &[])
}

/// As [`demo_upstream`], with more of its arguments (`--name`, `--strict-sessions`).
pub fn demo_upstream_with(port: u16, extra: &[&str]) -> KillOnDrop {
    demo_upstream_args(None, port, extra)
}

fn demo_upstream_args(ns: Option<&str>, port: u16, extra: &[&str]) -> KillOnDrop {
    demo_upstream_at(ns, SocketAddr::from(([127, 0, 0, 1], port)), extra)
}

/// As [`demo_upstream`], listening on `listen` in namespace `ns` (this one if `None`).
///
/// Started again until it is the one listening: a killed predecessor's socket can outlive it
/// for a moment (io_uring releases it after the process is gone), `mcp-upstream` refuses a
/// port something is bound to, and a connect would then reach the dying socket, not a server.
/// So the new server's own word that it listens is waited for (its first line on stderr).
pub fn demo_upstream_at(ns: Option<&str>, listen: SocketAddr, extra: &[&str]) -> KillOnDrop {
    let bin = root().join("target/release/mcp-upstream");
    assert!(
        bin.exists(),
        "{} missing: run `cargo xtask test`",
        bin.display()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cmd = Command::new(&bin);
        if let Some(ns) = ns {
            crate::netns::enter_before_exec(&mut cmd, ns);
        }
        let mut child = KillOnDrop(
            cmd.args(["--listen", &listen.to_string(), "--workers", "1"])
                .args(extra)
                .stderr(Stdio::piped())
                .spawn()
                .expect("start mcp-upstream"),
        );
        let stderr = child.0.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr);
            let mut first = String::new();
            let _ = lines.read_line(&mut first);
            let _ = tx.send(first);
            // The rest is read and dropped, so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut lines, &mut std::io::sink());
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let first = rx.recv_timeout(left).unwrap_or_default();
        if first.contains("serving MCP") {
            match ns {
                Some(ns) => crate::netns::in_netns(ns, || wait_addr(listen, left)),
                None => wait_addr(listen, left),
            }
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "mcp-upstream does not listen on {listen} after 10 s: {first}"
        );
        drop(child);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `.tools/node/node_modules/.bin` first on PATH: Node 22 and the npm peers installed by setup.
/// The `env` line of a stdio upstream that runs node with the installed modules.
pub fn node_stdio_env() -> String {
    format!(
        "env = {{ NODE_PATH = \"{}\", PATH = \"{}\" }}",
        root().join(".tools/node/node_modules").display(),
        node_path()
    )
}

pub fn node_path() -> String {
    let bin = root().join(".tools/node/node_modules/.bin");
    assert!(
        bin.join("conformance").exists(),
        "{} missing: run `cargo xtask setup`",
        bin.display()
    );
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The task ids a `tasks/list` answer lists.
pub fn listed_tasks(answer: &serde_json::Value) -> Vec<String> {
    answer["result"]["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no tasks: {answer}"))
        .iter()
        .filter_map(|t| t["taskId"].as_str().map(str::to_owned))
        .collect()
}

/// With server-everything behind the gateway: a task `creator` makes is its own. `other`
/// neither lists it nor reads, polls or cancels it; its creator does all of that and gets its
/// result. `ask(caller, method, params)` is the answer to that request as `caller`.
pub fn everything_tasks_are_their_creators_alone(
    ask: impl Fn(&str, &str, serde_json::Value) -> serde_json::Value,
    creator: &str,
    other: &str,
) {
    use serde_json::json;
    let v = ask(
        creator,
        "tools/call",
        json!({"name": "simulate-research-query", "arguments": {"topic": "tides"},
            "task": {"ttl": 60000}}),
    );
    let task = v["result"]["task"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no task created: {v}"))
        .to_owned();
    let named = json!({"taskId": task});

    // The other caller: not listed, and not found however it asks.
    let v = ask(other, "tasks/list", json!({}));
    assert!(!listed_tasks(&v).contains(&task), "{v}");
    for method in ["tasks/get", "tasks/result", "tasks/cancel"] {
        let v = ask(other, method, named.clone());
        assert_eq!(v["error"]["code"], -32602, "{method}: {v}");
        assert!(v.get("result").is_none(), "{method}: {v}");
    }

    // Its creator: listed, polled, and its result once done (about 4 s of simulated work).
    let v = ask(creator, "tasks/list", json!({}));
    assert!(listed_tasks(&v).contains(&task), "{v}");
    let v = ask(creator, "tasks/get", named.clone());
    assert_eq!(v["result"]["taskId"], task.as_str(), "{v}");
    let v = ask(creator, "tasks/result", named);
    assert!(
        v["result"]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("Research Report: tides")),
        "{v}"
    );
}

/// The reference MCP server from npm (`@modelcontextprotocol/server-everything`) on `port`.
pub fn server_everything(port: u16) -> KillOnDrop {
    let child = Command::new("mcp-server-everything")
        .arg("streamableHttp")
        .env("PATH", node_path())
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start server-everything");
    wait_port(port, Duration::from_secs(30));
    KillOnDrop(child)
}

/// An MCP server built as the TypeScript SDK documents it (`createMcpExpressApp()`, Express
/// with `express.json()`, stateless), with the tools `search` and `delete_repo`, on `port`
/// (`tests/fixtures/express_server.cjs`).
pub fn express_server(port: u16) -> KillOnDrop {
    node_fixture("express_server.cjs", port, &[])
}

/// A stateless TypeScript SDK server whose tool `report` runs as a task, with one task store
/// for every request (`tests/fixtures/tasks_server.cjs`), on `port`.
pub fn tasks_server(port: u16) -> KillOnDrop {
    node_fixture("tasks_server.cjs", port, &[])
}

/// [`tasks_server`], where a client that initializes gets a session of its own (one task store
/// for every session and for requests without one).
pub fn tasks_server_with_sessions(port: u16) -> KillOnDrop {
    node_fixture("tasks_server.cjs", port, &["sessions"])
}

/// [`tasks_server`], whose tasks work for 3 s (a cancel leaves the work running, as the SDK's
/// own example tools do); `GET /stats` says how many worked at once at most (`maxRunning`).
pub fn tasks_server_working(port: u16) -> KillOnDrop {
    node_fixture("tasks_server.cjs", port, &["working"])
}

/// [`tasks_server_working`], whose answer naming a task comes only after 1.5 s.
pub fn tasks_server_slow(port: u16) -> KillOnDrop {
    node_fixture("tasks_server.cjs", port, &["slow"])
}

fn node_fixture(script: &str, port: u16, extra: &[&str]) -> KillOnDrop {
    let child = Command::new("node")
        .arg(root().join("tests/fixtures").join(script))
        .arg(port.to_string())
        .args(extra)
        .env("PATH", node_path())
        .env("NODE_PATH", root().join(".tools/node/node_modules"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    wait_port(port, Duration::from_secs(30));
    KillOnDrop(child)
}

/// Runs the MCP conformance suite's server scenarios against `url`; returns each scenario's
/// outcome (true: passed) as the suite's summary reports it.
pub fn conformance(url: &str) -> std::collections::BTreeMap<String, bool> {
    let out = Command::new("timeout")
        .args(["240", "conformance", "server", "--url", url])
        .env("PATH", node_path())
        .output()
        .expect("run the conformance suite");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .split("=== SUMMARY ===")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary in:\n{text}"));
    summary
        .lines()
        .filter_map(|l| {
            let (mark, rest) = l.trim().split_once(' ')?;
            let name = rest.split(':').next()?.to_owned();
            match mark {
                "✓" => Some((name, true)),
                "✗" => Some((name, false)),
                _ => None,
            }
        })
        .collect()
}

/// The Python SDK's MCP server (tests/fixtures/mcp_server.py), killed on drop.
pub struct PyServer {
    pub child: KillOnDrop,
    pub port: u16,
}

impl PyServer {
    pub fn start(json_response: bool) -> Self {
        Self::start_with(if json_response { &["--json"] } else { &[] })
    }

    /// With the fixture's flags (`--json`, `--resumable`, `--changed-echo`).
    pub fn start_with(flags: &[&str]) -> Self {
        Self::start_on(free_port(), flags)
    }

    /// On `port`, with the fixture's flags.
    pub fn start_on(port: u16, flags: &[&str]) -> Self {
        Self::spawn_in(None, port, flags)
    }

    /// As [`PyServer::start_on`], in network namespace `ns` (on its loopback).
    pub fn start_in(ns: &str, port: u16, flags: &[&str]) -> Self {
        Self::spawn_in(Some(ns), port, flags)
    }

    /// Another server of tests/fixtures (`script`), on `port`, with its arguments.
    pub fn script_on(script: &str, port: u16, args: &[&str]) -> Self {
        Self::spawn_script(script, None, port, args)
    }

    fn spawn_in(ns: Option<&str>, port: u16, flags: &[&str]) -> Self {
        Self::spawn_script("mcp_server.py", ns, port, flags)
    }

    fn spawn_script(script: &str, ns: Option<&str>, port: u16, flags: &[&str]) -> Self {
        let mut cmd = Command::new(python());
        if let Some(ns) = ns {
            crate::netns::enter_before_exec(&mut cmd, ns);
        }
        cmd.arg(root().join("tests/fixtures").join(script))
            .arg(port.to_string())
            .args(flags);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the Python MCP server");
        let child = KillOnDrop(child);
        match ns {
            Some(ns) => crate::netns::in_netns(ns, || wait_port(port, Duration::from_secs(30))),
            None => wait_port(port, Duration::from_secs(30)),
        }
        Self { child, port }
    }

    /// Over https (uvicorn's TLS) with `tls`'s certificate and key; with `client_ca`, a
    /// client certificate issued by that CA is required.
    pub fn start_tls(
        flags: &[&str],
        tls: &crate::pki::Issued,
        client_ca: Option<&std::path::Path>,
    ) -> Self {
        let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
        let mut args: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        args.extend([
            "--ssl-certfile".into(),
            path(&tls.cert),
            "--ssl-keyfile".into(),
            path(&tls.key),
        ]);
        if let Some(ca) = client_ca {
            args.extend([
                "--ssl-ca-certs".into(),
                path(ca),
                "--ssl-cert-reqs".into(),
                "2".into(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_on(free_port(), &args)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

/// Runs the Python SDK client (tests/fixtures/mcp_client.py) against `url`; returns its report.
pub fn py_client(url: &str, mode: &str) -> serde_json::Value {
    let client = root().join("tests/fixtures/mcp_client.py");
    run_python(&[client.to_str().expect("utf-8 path"), url, mode])
}

/// Like [`py_client`], for a client expected to fail: its report, or why it failed.
pub fn py_client_result(url: &str, mode: &str) -> Result<serde_json::Value, String> {
    let client = root().join("tests/fixtures/mcp_client.py");
    let out = Command::new("timeout")
        .arg("60")
        .arg(python())
        .args([client.to_str().expect("utf-8 path"), url, mode])
        .output()
        .expect("run python");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Like [`py_client`], with the fixture server's tools and prompts under `prefix` (federation).
pub fn py_client_prefixed(url: &str, mode: &str, prefix: &str) -> serde_json::Value {
    let client = root().join("tests/fixtures/mcp_client.py");
    run_python(&[client.to_str().expect("utf-8 path"), url, mode, prefix])
}

/// Interrupts an SSE answer from `url` and resumes it with `Last-Event-ID`
/// (tests/fixtures/resume_client.py); returns its report.
pub fn py_resume(url: &str, tool: &str, steps: u32, pause_ms: u32) -> serde_json::Value {
    let client = root().join("tests/fixtures/resume_client.py");
    run_python(&[
        client.to_str().expect("utf-8 path"),
        url,
        tool,
        &steps.to_string(),
        &pause_ms.to_string(),
    ])
}

/// The Python SDK client with `headers` (a credential) against `url`: lists tools, then makes
/// `calls` ([tool, arguments] pairs), reporting each answer or JSON-RPC error
/// (tests/fixtures/policy_client.py).
pub fn py_policy_client(
    url: &str,
    mode: &str,
    headers: &serde_json::Value,
    calls: &serde_json::Value,
) -> serde_json::Value {
    let client = root().join("tests/fixtures/policy_client.py");
    run_python(&[
        client.to_str().expect("utf-8 path"),
        url,
        mode,
        &headers.to_string(),
        &calls.to_string(),
    ])
}

/// Runs an inline Python script with the SDK's venv; returns the JSON it prints.
pub fn py_script(script: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run_python(&all)
}

/// [`py_client`] with extra environment variables (`SSL_CERT_FILE`: the CA an https URL's
/// certificate is checked against).
pub fn py_client_env(url: &str, mode: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let client = root().join("tests/fixtures/mcp_client.py");
    run_python_env(&[client.to_str().expect("utf-8 path"), url, mode], env)
}

/// [`py_script`] with extra environment variables.
pub fn py_script_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    run_python_env(&all, env)
}

/// Runs the venv's Python (at most 60 s) and parses the one JSON value it prints.
fn run_python(args: &[&str]) -> serde_json::Value {
    run_python_env(args, &[])
}

fn run_python_env(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let out = Command::new("timeout")
        .arg("60")
        .arg(python())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python {:?} failed: {}\n{}",
        args.last(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "python output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A response read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one HTTP/1.1 response (Content-Length, chunked or until close).
pub fn read_response(stream: &mut TcpStream) -> Option<RawResponse> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut status_line = String::new();
    if reader.read_line(&mut status_line).ok()? == 0 {
        return None;
    }
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':')?;
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = get("content-length") {
        body.resize(len.parse().ok()?, 0);
        reader.read_exact(&mut body).ok()?;
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut data = vec![0; n + 2];
            reader.read_exact(&mut data).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&data[..n]);
        }
    } else {
        reader.read_to_end(&mut body).ok()?;
    }
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

/// Sends raw bytes on a new connection and reads one response.
pub fn raw(port: u16, request: &[u8]) -> (RawResponse, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request).unwrap();
    let r = read_response(&mut s).expect("a response");
    (r, s)
}

/// One request on `conn`, opened with `open` when there is none, or again when the server
/// closed it between requests; kept open for the next unless the answer says `close`. A load
/// loop on new connections slows as they pile up in `TIME_WAIT`, and its measure with it.
pub fn keep_alive(
    conn: &mut Option<TcpStream>,
    open: impl Fn() -> TcpStream,
    request: &[u8],
) -> RawResponse {
    for _ in 0..2 {
        let fresh = conn.is_none();
        let s = conn.get_or_insert_with(&open);
        let answer = s.write_all(request).ok().and(read_response(s));
        match answer {
            Some(r) => {
                if r.header("connection")
                    .is_some_and(|c| c.eq_ignore_ascii_case("close"))
                {
                    *conn = None;
                }
                return r;
            }
            None if fresh => panic!("no answer on a new connection"),
            None => *conn = None,
        }
    }
    unreachable!("a new connection answers or panics")
}

/// A POST of `body` to `path` with the headers MCP clients send.
/// Waits (5 s at most) until the admin API's `/metrics` shows a circuit breaker whose name
/// starts with `prefix` open. A call's verdict is recorded after its answer is written, so a
/// client's next request can come before it.
pub fn wait_breaker_open(admin: u16, prefix: &str) {
    assert!(
        wait_breaker(admin, prefix, " 1"),
        "no breaker named {prefix}... opened"
    );
}

/// Waits (5 s at most) until `/metrics` shows the breaker whose name starts with `prefix`
/// closed again: a good probe's verdict, too, is recorded after its answer is written.
pub fn wait_breaker_closed(admin: u16, prefix: &str) {
    assert!(
        wait_breaker(admin, prefix, " 0"),
        "the breaker named {prefix}... did not close"
    );
}

fn wait_breaker(admin: u16, prefix: &str, state: &str) -> bool {
    let needle = format!("mcp_gateway_breaker_state{{breaker=\"{prefix}");
    (0..50).any(|_| {
        let (m, _) = raw(admin, b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
        let text = String::from_utf8_lossy(&m.body).into_owned();
        if text
            .lines()
            .any(|l| l.starts_with(&needle) && l.ends_with(state))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
        false
    })
}

pub fn post(path: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A stateless (2026-07-28) `tools/call` of `tool` to `path`, as a client sends it: the
/// envelope in `_meta`, the method and name mirrored in `Mcp-Method` and `Mcp-Name`, and
/// `extra` header lines.
pub fn post_call_2026(
    path: &str,
    id: u64,
    tool: &str,
    args: &serde_json::Value,
    extra: &str,
) -> Vec<u8> {
    let body = serde_json::json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}},
    })
    .to_string();
    let headers = format!(
        "{extra}mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {tool}\r\n"
    );
    post(path, &body, &headers)
}

/// How the fake upstream misbehaves.
#[derive(Clone, Copy, Debug)]
pub enum Misbehave {
    /// Answers every request with a fixed JSON-RPC result (and records what it received).
    Answer,
    /// Starts an SSE response, sends one progress event, then closes the connection.
    DieMidStream,
    /// Reads the request and never answers; records `closed` when the gateway hangs up.
    Hang,
    /// Starts an SSE response with one progress event (with an event id for a call of the tool
    /// `resumable`), then goes silent; records `closed` when the gateway hangs up.
    StallMidStream,
    /// Starts an SSE response with one progress event, then sends a keep-alive comment every
    /// 200 ms (for 20 s at most); records `closed` when the gateway hangs up.
    PingMidStream,
    /// Answers like `Answer`, but only after this long.
    Slow(Duration),
    /// Answers like `Answer` after the number of milliseconds in the body's `"delay_ms":N`.
    DelayFromBody,
    /// Answers every request with these bytes (a whole response, head and body).
    Raw(&'static str),
    /// A session-era server in miniature: `initialize` is answered with a new
    /// `Mcp-Session-Id` (`s1`, `s2`, ...), a notification or a client's response with 202, a
    /// DELETE with 200, a call of the tool `moved` with a bare 302 and of `gone` with a bare
    /// 404, any other request with its own id and an empty result.
    SessionEra,
}

/// An upstream on raw sockets that records request heads.
pub struct FakeUpstream {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl FakeUpstream {
    pub fn start(how: Misbehave) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut head = String::new();
                        let mut len = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                            head.push_str(&line);
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; len];
                        let _ = reader.read_exact(&mut body);
                        let deleted = head.starts_with("DELETE ");
                        log.lock().unwrap().push(head);
                        if let Misbehave::Slow(delay) = how {
                            std::thread::sleep(delay);
                        }
                        if let Misbehave::DelayFromBody = how {
                            let text = String::from_utf8_lossy(&body);
                            let ms: u64 = text
                                .split("\"delay_ms\":")
                                .nth(1)
                                .map(|r| {
                                    r.chars()
                                        .take_while(char::is_ascii_digit)
                                        .collect::<String>()
                                })
                                .and_then(|d| d.parse().ok())
                                .unwrap_or(0);
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                        match how {
                            Misbehave::Answer | Misbehave::Slow(_) | Misbehave::DelayFromBody => {
                                // The request's own id (the gateway refuses an answer to
                                // another request); a notification is accepted with no body.
                                let m: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                let Some(id) = m.get("id").cloned() else {
                                    let _ = conn.write_all(
                                        b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n",
                                    );
                                    continue;
                                };
                                let b =
                                    serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {}})
                                        .to_string();
                                let _ = write!(
                                    conn,
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                                    b.len()
                                );
                            }
                            Misbehave::Raw(bytes) => {
                                let _ = conn.write_all(bytes.as_bytes());
                            }
                            Misbehave::SessionEra => {
                                let _ = conn.write_all(&session_era_answer(deleted, &body));
                            }
                            Misbehave::DieMidStream => {
                                start_progress_stream(&mut conn, "");
                                return;
                            }
                            Misbehave::PingMidStream => {
                                start_progress_stream(&mut conn, "");
                                let ping = ": ping\n\n";
                                for _ in 0..100 {
                                    std::thread::sleep(Duration::from_millis(200));
                                    let chunk = format!("{:x}\r\n{ping}\r\n", ping.len());
                                    if conn.write_all(chunk.as_bytes()).is_err() {
                                        log.lock().unwrap().push("closed".into());
                                        return;
                                    }
                                }
                                return;
                            }
                            Misbehave::Hang | Misbehave::StallMidStream => {
                                if let Misbehave::StallMidStream = how {
                                    // With an event id for a call of `resumable`: a
                                    // stream its client could resume.
                                    let id = if String::from_utf8_lossy(&body)
                                        .contains("\"resumable\"")
                                    {
                                        "id: 1\n"
                                    } else {
                                        ""
                                    };
                                    start_progress_stream(&mut conn, id);
                                }
                                // Wait (at most 20 s) for the gateway to close its side.
                                let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                                let mut rest = Vec::new();
                                if reader.read_to_end(&mut rest).is_ok() {
                                    log.lock().unwrap().push("closed".into());
                                }
                                return;
                            }
                        }
                    }
                });
            }
        });
        Self { port, seen }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

/// Starts an SSE answer (chunked) with one progress event, its id line `id` ("" for none).
fn start_progress_stream(conn: &mut TcpStream, id: &str) {
    let ev = format!(
        "{id}event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progressToken\":1,\"progress\":1}}}}\n\n"
    );
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{ev}\r\n",
        ev.len()
    );
}

/// Bans `address` (an address or a prefix) for `seconds` through the admin API on `admin`;
/// the answer, which must be 200.
pub fn ban(admin: u16, address: &str, seconds: u64) -> RawResponse {
    let body = format!(r#"{{"address":"{address}","seconds":{seconds}}}"#);
    let req = format!(
        "POST /bans HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (r, _) = raw(admin, req.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    r
}

/// [`Misbehave::SessionEra`]'s answer to a request (a DELETE if `deleted`) with `body`.
fn session_era_answer(deleted: bool, body: &[u8]) -> Vec<u8> {
    static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let empty = |status: &str| format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
    if deleted {
        return empty("200 OK").into_bytes();
    }
    let m: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    // A notification, or a client's response: accepted, nothing to answer.
    let (Some(id), Some(_)) = (m.get("id"), m.get("method")) else {
        return empty("202 Accepted").into_bytes();
    };
    match m["params"]["name"].as_str() {
        Some("moved") => {
            return "HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n"
                .as_bytes()
                .to_vec();
        }
        Some("gone") => return empty("404 Not Found").into_bytes(),
        _ => {}
    }
    let (result, session) = if m["method"] == "initialize" {
        let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (
            serde_json::json!({"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                "serverInfo": {"name": "fake", "version": "1"}}),
            format!("mcp-session-id: s{n}\r\n"),
        )
    } else {
        (serde_json::json!({}), String::new())
    };
    let b = serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{session}content-length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The request that approves the definition of `tool` at `upstream` awaiting approval, named
/// by its digest as `pins` (a `GET /pins` answer) shows it. Panics if none is pending.
pub fn approve_request(pins: &serde_json::Value, upstream: &str, tool: &str) -> Vec<u8> {
    pin_request(pins, upstream, tool, "approve")
}

/// `POST /pins/<action>` (`approve` or `reject`) of the definition of `upstream`'s `tool` that
/// `pins` (`GET /pins`) shows awaiting approval.
pub fn pin_request(pins: &serde_json::Value, upstream: &str, tool: &str, action: &str) -> Vec<u8> {
    let pending = pins
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|p| p["upstream"] == upstream && p["tool"] == tool)
        })
        .map(|p| p["pending"]["sha256"].clone())
        .filter(serde_json::Value::is_string)
        .unwrap_or_else(|| panic!("no definition of {upstream}/{tool} awaits approval: {pins}"));
    let body =
        serde_json::json!({"upstream": upstream, "tool": tool, "sha256": pending}).to_string();
    format!(
        "POST /pins/{action} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `GET /pins` on the admin API at `admin`.
pub fn pins(admin: u16) -> serde_json::Value {
    let (r, _) = raw(admin, b"GET /pins HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// Approves what awaits approval for `tool` at `upstream` (the digest `GET /pins` shows); the
/// answer.
pub fn approve_pin(admin: u16, upstream: &str, tool: &str) -> RawResponse {
    raw(admin, &approve_request(&pins(admin), upstream, tool)).0
}
