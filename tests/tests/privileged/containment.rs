//! Panics are contained: a connection task that panics answers 500 and is closed while the
//! worker serves on; a worker whose runtime panics is started again, and `/readyz` says so in
//! between. The panics are injected (`MCP_GATEWAY_FAULT_INJECTION=1`, a test-only switch) so
//! that the containment itself is tested, whatever panics the request path still has.

use std::time::{Duration, Instant};

use integration_tests::{
    daemon::Daemon,
    peers::{demo_upstream, free_port, post, raw, read_response},
    unique,
};

/// One worker, so that "the worker lives on" is observable on the next connection.
fn start(up_port: u16) -> (Daemon, u16, u16) {
    let port = free_port();
    let admin = free_port();
    let instance = unique("gwpanic");
    let config = format!(
        r#"
[gateway]
instance = "{instance}"
workers = 1
shutdown_grace_ms = 1000
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[[upstreams]]
name = "demo"
url = "http://127.0.0.1:{up_port}/mcp"
[[routes]]
path = "/mcp"
upstream = "demo"
"#
    );
    let d =
        Daemon::start_local_with_env(&instance, &config, &[("MCP_GATEWAY_FAULT_INJECTION", "1")]);
    (d, port, admin)
}

fn get(port: u16, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    let (r, _) = raw(port, req.as_bytes());
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

fn metric(admin: u16, name: &str) -> u64 {
    let (_, text) = get(admin, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":2,"b":40}}}"#;

fn call_ok(port: u16) {
    let (r, _) = raw(port, &post("/mcp", CALL, ""));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("42"));
}

#[test]
fn a_panicking_connection_answers_500_closes_and_the_worker_serves_on() {
    let up_port = free_port();
    let _up = demo_upstream(up_port);
    let (mut d, port, admin) = start(up_port);
    call_ok(port);
    for round in 0..3 {
        let (r, mut s) = raw(
            port,
            &post("/mcp", CALL, "x-fault-inject: panic-connection\r\n"),
        );
        assert_eq!(r.status, 500, "round {round}");
        assert_eq!(r.json()["error"]["code"], -32603);
        // Closed: nothing more comes on that connection.
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(read_response(&mut s).is_none(), "the connection is closed");
        // The same (only) worker serves the next client.
        call_ok(port);
    }
    assert_eq!(metric(admin, "mcp_gateway_panics_total"), 3);
    assert_eq!(get(admin, "/readyz").0, 200);
    assert_eq!(metric(admin, "mcp_gateway_worker_restarts_total"), 0);
    d.stop();
}

#[test]
fn a_panicking_worker_is_restarted_and_readyz_tells() {
    let up_port = free_port();
    let _up = demo_upstream(up_port);
    let (mut d, port, admin) = start(up_port);
    call_ok(port);
    assert_eq!(get(admin, "/readyz").0, 200);
    // The request that kills the runtime gets no answer (its connection dies with it).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(
        &mut s,
        &post("/mcp", CALL, "x-fault-inject: panic-worker\r\n"),
    )
    .unwrap();
    // While it is down (the supervisor pauses 1 s under fault injection), /readyz says so.
    let deadline = Instant::now() + Duration::from_secs(3);
    let down = loop {
        let (status, body) = get(admin, "/readyz");
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the dead worker"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(down.contains("workers down [0]"), "{down}");
    // Its connection is closed, not left hanging.
    let started = Instant::now();
    assert!(
        read_response(&mut s).is_none(),
        "no answer from a dead worker"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed, not timed out"
    );
    // Served again: the listening socket outlived the dead runtime, the restarted one accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A connection queued on the dead incarnation's socket may be reset; a new one is served.
        let status = std::net::TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut c| {
                std::io::Write::write_all(&mut c, &post("/mcp", CALL, ""))?;
                Ok(read_response(&mut c).map(|r| r.status))
            })
            .map_err(|e| e.to_string());
        if status == Ok(Some(200)) {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {status:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(admin, "mcp_gateway_worker_restarts_total"), 1);
    assert_eq!(metric(admin, "mcp_gateway_workers_up"), 1);
    assert_eq!(get(admin, "/readyz").0, 200);
    d.wait_for_log(
        "worker panicked; closing its connections and starting it again",
        Duration::from_secs(2),
    );
    d.stop();
}
