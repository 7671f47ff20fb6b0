//! Replicas of one upstream through the real daemon on loopback: three real `mcp-upstream`
//! processes (each answering its own name from a `whoami` tool, and 404 to a session it did not
//! mint) behind one `[[upstreams]]` with `endpoints`. Calls are spread over all three; a killed
//! one is ejected (in `/metrics`) with no more client errors than the configured failures;
//! restarted on its port, it is probed back and served again; a session stays on the replica
//! that minted it, gets 404 once that replica is gone, and a new `initialize` works; a reload
//! keeps sessions and health; the last replica in rotation is never ejected.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    peers::{KillOnDrop, demo_upstream_with, free_port, post, raw},
    unique,
};

const FAILURES: u32 = 2;

fn replica(port: u16, name: &str) -> KillOnDrop {
    demo_upstream_with(port, &["--name", name, "--strict-sessions"])
}

fn metrics(admin: u16) -> String {
    let req = "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    String::from_utf8_lossy(&raw(admin, req.as_bytes()).0.body).into_owned()
}

/// The value of the sample `series` (name and labels exactly) in `/metrics`, if present.
fn sample(admin: u16, series: &str) -> Option<u64> {
    metrics(admin)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn series(metric: &str, port: u16) -> String {
    format!("{metric}{{upstream=\"r\",endpoint=\"127.0.0.1:{port}\"}}")
}

/// A stateless (2026-07-28) `whoami`: the replica's name, or the status and body of a failure.
fn whoami(port: u16) -> Result<String, String> {
    let body = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"whoami","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let headers = "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: whoami\r\nconnection: close\r\n";
    let (r, _) = raw(port, &post("/mcp", body, headers));
    named(r.status, &r.body)
}

fn named(status: u16, body: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(body).into_owned();
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    v["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_owned)
        .ok_or(text)
}

/// A session-era `initialize`: the session id.
fn initialize(port: u16) -> String {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"replicas-test","version":"1"}}}"#;
    let (r, _) = raw(port, &post("/mcp", body, "connection: close\r\n"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.header("mcp-session-id").expect("a session id").to_owned();
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    let extra = format!(
        "mcp-session-id: {id}\r\nmcp-protocol-version: 2025-06-18\r\nconnection: close\r\n"
    );
    let (r, _) = raw(port, &post("/mcp", note, &extra));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    id
}

/// A session-era `whoami` in session `id`: status and body.
fn whoami_in(port: u16, id: &str) -> (u16, Vec<u8>) {
    // A fresh request id each time, as MCP asks of a session's requests: the gateway holds an
    // id as its session's while the request is in flight, and may still hold it for a moment
    // after the answer was written (a 409 to the next call that reused it, once in a run).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(4);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{n},"method":"tools/call","params":{{"name":"whoami","arguments":{{}}}}}}"#
    );
    let extra = format!(
        "mcp-session-id: {id}\r\nmcp-protocol-version: 2025-06-18\r\nconnection: close\r\n"
    );
    let (r, _) = raw(port, &post("/mcp", &body, &extra));
    (r.status, r.body)
}

/// Waits until nothing accepts on `port` (a killed process's sockets close a moment after it is
/// reaped: io_uring's teardown releases them).
fn refused(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "{port} still accepts");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn replicas_are_balanced_ejected_probed_back_and_keep_their_sessions() {
    let started = Instant::now();
    let ports = [free_port(), free_port(), free_port()];
    let names = ["u0", "u1", "u2"];
    let mut procs: Vec<Option<KillOnDrop>> = ports
        .iter()
        .zip(names)
        .map(|(p, n)| Some(replica(*p, n)))
        .collect();
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwrep");
    let endpoints = ports
        .iter()
        .map(|p| format!("\"http://127.0.0.1:{p}/mcp\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 2
shutdown_grace_ms = 1000
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[[upstreams]]
name = "r"
endpoints = [{endpoints}]
eject_after_failures = {FAILURES}
eject_base_ms = 300
eject_max_ms = 600
response_timeout_ms = 1000
[[routes]]
path = "/mcp"
upstream = "r"
"#
    );
    let mut d = Daemon::start_local(&instance, &config);

    // (1) Spread over every replica.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        let who = whoami(port).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        *seen.entry(who).or_default() += 1;
    }
    for n in names {
        assert!(seen.get(n).copied().unwrap_or(0) >= 5, "{seen:?}");
    }
    for p in ports {
        assert_eq!(
            sample(admin, &series("mcp_gateway_upstream_endpoint_up", p)),
            Some(1)
        );
    }

    // (1b) A slow tool is the tool's fault, not the replicas': calls that time out (the
    // client chose the tool) eject nobody, however many.
    let slow: Vec<_> = (0..3 * FAILURES)
        .map(|_| {
            std::thread::spawn(move || {
                let body = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"sleep","arguments":{"ms":1500}}}"#;
                raw(port, &post("/mcp", body, "connection: close\r\n")).0.status
            })
        })
        .collect();
    for t in slow {
        assert_eq!(t.join().expect("a slow call"), 504);
    }
    for p in ports {
        assert_eq!(
            sample(admin, &series("mcp_gateway_upstream_endpoint_up", p)),
            Some(1),
            "{}",
            metrics(admin)
        );
        assert_eq!(
            sample(
                admin,
                &series("mcp_gateway_upstream_endpoint_ejections_total", p)
            ),
            Some(0)
        );
    }

    // (2) One dies: at most the configured failures reach clients, then the others serve.
    procs[0] = None;
    let mut errors = Vec::new();
    let mut after = HashMap::<String, usize>::new();
    for _ in 0..40 {
        match whoami(port) {
            Ok(who) => *after.entry(who).or_default() += 1,
            Err(e) => errors.push(e),
        }
    }
    assert!(errors.len() <= FAILURES as usize, "{errors:?}");
    assert!(!after.contains_key("u0"), "{after:?}");
    assert!(
        after.contains_key("u1") && after.contains_key("u2"),
        "{after:?}"
    );
    let ejections = series("mcp_gateway_upstream_endpoint_ejections_total", ports[0]);
    assert!(
        sample(admin, &ejections).unwrap_or(0) >= 1,
        "{}",
        metrics(admin)
    );
    assert_eq!(
        sample(admin, &series("mcp_gateway_upstream_endpoint_up", ports[0])),
        Some(0)
    );
    // Its trials keep failing (nothing listens): still no client error.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let who = whoami(port).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        assert_ne!(who, "u0");
    }
    assert!(
        sample(admin, &ejections).unwrap_or(0) >= 2,
        "failed trials eject again"
    );

    // (3) Back on its port: probed back into rotation, served again.
    procs[0] = Some(replica(ports[0], "u0"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let who = whoami(port).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        if who == "u0" {
            break;
        }
        assert!(Instant::now() < deadline, "u0 never came back\n{}", d.log());
    }
    assert_eq!(
        sample(admin, &series("mcp_gateway_upstream_endpoint_up", ports[0])),
        Some(1)
    );

    // (4) A session stays where it was minted (the others would answer 404 to it).
    let session = initialize(port);
    let mut holder = None;
    for _ in 0..15 {
        let (status, body) = whoami_in(port, &session);
        let who = named(status, &body).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        assert!(holder.get_or_insert(who.clone()) == &who, "moved to {who}");
    }
    let holder = holder.expect("answered");
    let i = names.iter().position(|n| *n == holder).expect("a replica");
    // A made-up session id steers nowhere.
    let (status, _) = whoami_in(port, "0123456789abcdef0123456789abcdef");
    assert_eq!(status, 404);
    // The holder dies: the session is lost (404, initialize again), never sent elsewhere. (A
    // request sent in the moment it dies, on a connection it closes unanswered, gets 502: it
    // may have run, so it is not sent again; hence the wait until its port refuses.)
    procs[i] = None;
    refused(ports[i]);
    for _ in 0..3 {
        let (status, body) = whoami_in(port, &session);
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        // The gateway's answer, not a replica's "unknown session".
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("holding this session"), "{v}");
    }
    let again = initialize(port);
    assert_ne!(again, session);
    for _ in 0..5 {
        let (status, body) = whoami_in(port, &again);
        let who = named(status, &body).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        assert_ne!(who, holder);
    }
    // A reload keeps the sessions' replicas and the health: the session goes on, the dead
    // replica stays out.
    let dead = series("mcp_gateway_upstream_endpoint_ejections_total", ports[i]);
    let ejected = sample(admin, &dead).unwrap_or(0);
    assert!(ejected >= 1, "{}", metrics(admin));
    d.hangup();
    d.wait_for_log("reloaded", Duration::from_secs(5));
    let (status, body) = whoami_in(port, &again);
    let who = named(status, &body).unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert_ne!(who, holder);
    assert!(sample(admin, &dead).unwrap_or(0) >= ejected);
    assert_eq!(
        sample(admin, &series("mcp_gateway_upstream_endpoint_up", ports[i])),
        Some(0)
    );

    // The last replica in rotation is never ejected: with the others dead or out, its own
    // failures (it is down too) leave it in, and it serves the moment it is back.
    let [j, k] = [(i + 1) % 3, (i + 2) % 3];
    procs[j] = None;
    refused(ports[j]);
    let mut errors = 0;
    for _ in 0..20 {
        match whoami(port) {
            Ok(who) => assert_eq!(who, names[k]),
            Err(_) => errors += 1,
        }
    }
    assert!(errors <= FAILURES, "{errors} errors");
    let up = |x: usize| sample(admin, &series("mcp_gateway_upstream_endpoint_up", ports[x]));
    assert_eq!((up(i), up(j), up(k)), (Some(0), Some(0), Some(1)));
    procs[k] = None;
    refused(ports[k]);
    for _ in 0..10 {
        let e = whoami(port).expect_err("nothing serves");
        assert!(e.starts_with("502"), "{e}");
    }
    assert_eq!(up(k), Some(1), "the last one in rotation stays in");
    procs[k] = Some(replica(ports[k], names[k]));
    assert_eq!(whoami(port).as_deref(), Ok(names[k]), "served at once");
    d.stop();
    assert!(started.elapsed() < Duration::from_secs(60));
}
