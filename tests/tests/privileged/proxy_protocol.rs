//! PROXY protocol listeners end to end on loopback (the kernel program is off here): the real
//! gateway behind a "balancer" that is this test on 127.0.0.1, writing v1 and v2 headers by
//! hand on raw sockets. The client a header names is what `address` auth, the tenant's rules,
//! the audit log, the tenant's connection count and cap, bans and auto-ban see; every refusal
//! is a close without a byte, counted by reason in /metrics.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;

use integration_tests::{
    daemon::{Daemon, loopback_from},
    peers::{FakeUpstream, Misbehave, RawResponse, free_port, post, read_response},
    unique,
};

struct Setup {
    daemon: Daemon,
    port: u16,
    /// A listener without the PROXY protocol: its peer is the client.
    direct: u16,
    admin: u16,
    audit: std::path::PathBuf,
    /// The configuration file (rewritten for a reload).
    config: std::path::PathBuf,
    _fake: FakeUpstream,
    /// Behind `/stall`: answers a call with an event stream, one event, then silence.
    stall: FakeUpstream,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.daemon.stop();
        let _ = std::fs::remove_file(&self.audit);
    }
}

/// One PROXY protocol listener trusting 127.0.0.1 only (headers within 3 s). Tenants:
/// `public` (the default, where the balancer's own address falls),
/// `edge` (198.18.0.0/15, 2001:db8:5::/48 and 2001:db8:9:100::/56; may not call `add`), `far` (203.0.113.0/24; at
/// most one connection). `/mcp` takes callers by address only; three refusals ban a source.
/// A second listener, `direct`, takes clients straight: 127.0.1.0/24 and 127.0.2.0/23 are
/// `edge`'s, and 127.0.1.9 is denied. `/stall` (the same callers) goes to an upstream that
/// answers with an event stream it never ends.
fn setup() -> Setup {
    let fake = FakeUpstream::start(Misbehave::Answer);
    let stall = FakeUpstream::start(Misbehave::StallMidStream);
    let port = free_port();
    let direct = free_port();
    let admin = free_port();
    let instance = unique("gwpp");
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
header_timeout_ms = 3000
[[listeners]]
address = "127.0.0.1:{direct}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
cap_poll_ms = 10
default_tenant = "public"
deny = ["198.19.255.0/24", "127.0.1.9/32"]
[audit]
path = "{audit}"
[auto_ban]
max_refusals = 3
window_s = 60
ban_s = 60

[[tenants]]
name = "public"
id = 0
[[tenants]]
name = "edge"
id = 1
sources = ["198.18.0.0/15", "2001:db8:5::/48", "127.0.1.0/24", "127.0.2.0/23", "2001:db8:9:100::/56"]
[[tenants.policy.tools]]
match = "add"
action = "deny"
[[tenants]]
name = "far"
id = 2
sources = ["203.0.113.0/24"]
max_connections = 1

[[upstreams]]
name = "u0"
url = "{url}"
[[upstreams]]
name = "stall"
url = "{stall_url}"
[[routes]]
path = "/mcp"
upstream = "u0"
auth = ["address"]
[[routes]]
path = "/stall"
upstream = "stall"
auth = ["address"]
[[routes]]
path = "/keyed"
upstream = "u0"
auth = ["api_key"]
[[auth.api_keys]]
sha256 = "8254c329a92850f6d539dd376f4816ee2764517da5e0235514af433164480d7a"
tenant = "edge"
"#,
        audit = audit.display(),
        url = fake.url(),
        stall_url = stall.url(),
    );
    let daemon = Daemon::start_local(&instance, &config);
    Setup {
        daemon,
        port,
        direct,
        admin,
        audit,
        config: std::env::temp_dir().join(format!("{instance}.toml")),
        _fake: fake,
        stall,
    }
}

fn v1(client: &str, client_port: u16) -> Vec<u8> {
    let family = if client.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if client.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    format!("PROXY {family} {client} {dst} {client_port} 8080\r\n").into_bytes()
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn v2(ver_cmd: u8, fam_proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[ver_cmd, fam_proto]);
    h.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut t = vec![kind];
    t.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
    t.extend_from_slice(value);
    t
}

/// A v2 PROXY header for a TCP client over IPv4 (or IPv6), with TLVs as AWS and HAProxy send
/// them: the authority (SNI), a unique id, an AWS VPC endpoint id, and a NOOP.
fn v2_client(client: IpAddr, client_port: u16) -> Vec<u8> {
    let (fam, mut payload) = match client {
        IpAddr::V4(a) => (0x11, [a.octets().as_slice(), &[127, 0, 0, 1]].concat()),
        IpAddr::V6(a) => (
            0x21,
            [a.octets().as_slice(), &Ipv6Addr::LOCALHOST.octets()].concat(),
        ),
    };
    payload.extend_from_slice(&client_port.to_be_bytes());
    payload.extend_from_slice(&8080u16.to_be_bytes());
    payload.extend(tlv(0x02, b"mcp.example.com"));
    payload.extend(tlv(0x05, b"\x00\x01\x02\x03"));
    payload.extend(tlv(0xEA, b"\x01vpce-0123456789abcdef0"));
    payload.extend(tlv(0x04, b""));
    v2(0x21, fam, &payload)
}

fn call(tool: &str) -> Vec<u8> {
    post(
        "/mcp",
        &format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
        ),
        "",
    )
}

/// A call to `/keyed` showing a wrong API key: refused (401), and counted towards a ban (a
/// refusal for want of any credential is not: a web page's `<img>` earns those for its
/// visitors).
fn wrong_key() -> Vec<u8> {
    post(
        "/keyed",
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#,
        "x-api-key: wrong\r\n",
    )
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `bytes` on a new connection from the trusted balancer address and reads the answer.
fn via(port: u16, bytes: &[u8]) -> RawResponse {
    let mut s = connect(port);
    s.write_all(bytes).unwrap();
    read_response(&mut s).unwrap_or_else(|| panic!("no answer to {bytes:?}"))
}

/// Waits (at most 5 s) for the gateway to close `s`; panics if it sends a byte first. Returns
/// how long it took.
fn closed_without_a_byte(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "answered instead of closed: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within 8 s: {e}"),
    }
    start.elapsed()
}

/// Sends `bytes` (then keeps the connection open) and expects a close without an answer.
fn refused(port: u16, bytes: &[u8]) -> Duration {
    let mut s = connect(port);
    s.write_all(bytes).unwrap();
    closed_without_a_byte(&mut s)
}

fn metrics(admin: u16) -> String {
    let mut s = connect(admin);
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .unwrap();
    String::from_utf8(read_response(&mut s).unwrap().body).unwrap()
}

/// The value of the metric line that starts with `series` (name and labels).
fn metric(admin: u16, series: &str) -> u64 {
    let text = metrics(admin);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn refusals(admin: u16, reason: &str) -> u64 {
    metric(
        admin,
        &format!("mcp_gateway_proxy_protocol_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn admin_request(admin: u16, method: &str, path: &str, body: &str) -> RawResponse {
    let mut s = connect(admin);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    read_response(&mut s).unwrap()
}

/// Bans `address` (an address or a prefix) for 60 s through the admin API; the answer, which
/// must be 200.
fn ban(admin: u16, address: &str) -> RawResponse {
    integration_tests::peers::ban(admin, address, 60)
}

/// Waits (at most 3 s, polling every 20 ms) until `done`; panics with `what` if it never is.
fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn is_result(r: &RawResponse) -> bool {
    r.status == 200 && r.json().get("result").is_some()
}

#[test]
fn the_client_a_header_names_is_classified_policed_and_audited() {
    let s = setup();
    let p = s.port;

    // v1: 198.18.5.7 is tenant `edge` by address; without the header's client the socket's
    // 127.0.0.1 is the default tenant, which `address` auth refuses (401).
    let r = via(p, &[v1("198.18.5.7", 40001), call("echo")].concat());
    assert!(is_result(&r), "{} {:?}", r.status, r.json());
    // `edge`'s own rule refuses `add`; the same call for a client of no tenant is a 401.
    let r = via(p, &[v1("198.18.5.7", 40002), call("add")].concat());
    assert!(r.json().get("error").is_some(), "{:?}", r.json());
    let r = via(p, &[v1("192.0.2.10", 40003), call("echo")].concat());
    assert_eq!(r.status, 401);

    // Only the balancer's header counts: a second one (a client's own, relayed) is not HTTP.
    let r = via(
        p,
        &[
            v1("192.0.2.10", 40010),
            v1("198.18.5.9", 40011),
            call("echo"),
        ]
        .concat(),
    );
    assert_eq!(r.status, 400);

    // v2 with TLVs, over IPv4 and IPv6.
    let r = via(
        p,
        &[
            v2_client("198.18.9.9".parse().unwrap(), 40004),
            call("echo"),
        ]
        .concat(),
    );
    assert!(is_result(&r), "{} {:?}", r.status, r.json());
    let r = via(
        p,
        &[
            v2_client("2001:db8:5::7".parse().unwrap(), 40005),
            call("echo"),
        ]
        .concat(),
    );
    assert!(is_result(&r), "{} {:?}", r.status, r.json());
    let r = via(p, &[v1("2001:db8:5::8", 40006), call("echo")].concat());
    assert!(is_result(&r), "{} {:?}", r.status, r.json());

    // A header in pieces, with pauses (all of it within the 3 s header timeout), and the
    // request after it in pieces too.
    for header in [
        v1("198.18.5.7", 40007),
        v2_client("198.18.5.7".parse().unwrap(), 40008),
    ] {
        let mut c = connect(p);
        for piece in header.chunks(7) {
            c.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(25));
        }
        std::thread::sleep(Duration::from_millis(100));
        let request = call("echo");
        let (a, b) = request.split_at(20);
        c.write_all(a).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        c.write_all(b).unwrap();
        let r = read_response(&mut c).unwrap();
        assert!(is_result(&r), "{} {:?}", r.status, r.json());
    }

    // v2 LOCAL (the balancer's health check) is served as the balancer: 127.0.0.1 is tenant
    // `public`, which `address` auth refuses.
    let r = via(p, &[v2(0x20, 0x00, &[]), call("echo")].concat());
    assert_eq!(r.status, 401);

    // The connection counts follow the header's client, not the balancer's address (which
    // is tenant `public`).
    let mut held: Vec<TcpStream> = (0..2)
        .map(|i| {
            let mut c = connect(p);
            c.write_all(&v1("198.18.5.7", 41000 + i)).unwrap();
            c
        })
        .collect();
    // (The LOCAL check's connection above, the balancer's own, is closed by the client; the
    // gateway notices on its own time.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(s.admin, "mcp_gateway_connections{tenant=\"edge\"}") != 2
        || metric(s.admin, "mcp_gateway_connections{tenant=\"public\"}") != 0
    {
        assert!(Instant::now() < deadline, "{}", metrics(s.admin));
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &mut held {
        c.write_all(&call("echo")).unwrap();
        let r = read_response(c).unwrap();
        assert!(is_result(&r), "{} {:?}", r.status, r.json());
    }
    drop(held);

    assert_eq!(
        metric(
            s.admin,
            "mcp_gateway_proxy_protocol_accepted_total{command=\"proxy\"}"
        ),
        11
    );
    assert_eq!(
        metric(
            s.admin,
            "mcp_gateway_proxy_protocol_accepted_total{command=\"local\"}"
        ),
        1
    );

    // A body that does not parse is refused by the gateway before policy: audited as refused
    // (it was written "allowed").
    let r = via(
        p,
        &[v1("198.18.5.11", 1), post("/mcp", "{not json", "")].concat(),
    );
    assert_eq!(r.status, 400);

    // The audit log names the clients, each with its tenant.
    std::thread::sleep(Duration::from_millis(300));
    let lines = audit_lines(&s.audit);
    let malformed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["source"] == "198.18.5.11")
        .collect();
    assert!(
        !malformed.is_empty() && malformed.iter().all(|l| l["decision"] == "refused"),
        "{malformed:?}"
    );
    let seen: Vec<(&str, &str, &str)> = lines
        .iter()
        .filter(|l| l["method"] == "tools/call")
        .map(|l| {
            (
                l["source"].as_str().unwrap(),
                l["tenant"].as_str().unwrap_or("-"),
                l["decision"].as_str().unwrap(),
            )
        })
        .collect();
    for expected in [
        ("198.18.5.7", "edge", "allowed"),
        ("198.18.5.7", "edge", "refused"),
        ("198.18.9.9", "edge", "allowed"),
        ("2001:db8:5::7", "edge", "allowed"),
        ("2001:db8:5::8", "edge", "allowed"),
    ] {
        assert!(seen.contains(&expected), "{expected:?} in {seen:?}");
    }
    assert!(
        !lines.iter().any(|l| l["source"] == "198.18.5.9"),
        "{lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l["source"] == "127.0.0.1" && l["method"] == "tools/call"),
        "only the LOCAL connection is the balancer's, and it was refused before its body: {lines:?}"
    );
}

#[test]
fn refusals_close_the_connection_and_are_counted() {
    let s = setup();
    let p = s.port;
    let a = s.admin;

    // An untrusted source (127.0.0.2 is loopback too, but not 127.0.0.1/32) is closed at
    // once, even with a valid header.
    let mut c = loopback_from("127.0.0.2", p).unwrap();
    c.write_all(&[v1("198.18.5.7", 1), call("echo")].concat())
        .unwrap();
    // (At once: well before the 3 s header timeout, on a host however loaded.)
    let took = closed_without_a_byte(&mut c);
    assert!(took < Duration::from_millis(2000), "{took:?}");
    assert_eq!(refusals(a, "untrusted_source"), 1);

    // No header (a client straight to the port), a broken v1, a v2 with a TLV longer than
    // its header: refused as soon as that is known.
    for bad in [
        call("echo"),
        b"PROXY TCP4 198.18.5.7 127.0.0.1 99999 8080\r\n".to_vec(),
        {
            let mut payload = vec![198, 18, 5, 7, 127, 0, 0, 1, 0, 1, 0, 2];
            payload.extend_from_slice(&[0x02, 0x00, 0x20, b'x']);
            v2(0x21, 0x11, &payload)
        },
    ] {
        let took = refused(p, &bad);
        assert!(took < Duration::from_millis(2000), "{took:?}");
    }
    assert_eq!(refusals(a, "malformed"), 3);

    // Valid headers that name no TCP client: v1 UNKNOWN, v2 PROXY over UDP, v2 UNSPEC.
    for bad in [
        b"PROXY UNKNOWN\r\n".to_vec(),
        v2(0x21, 0x12, &[198, 18, 5, 7, 127, 0, 0, 1, 0, 1, 0, 2]),
        v2(0x21, 0x00, &[]),
    ] {
        refused(p, &bad);
    }
    assert_eq!(refusals(a, "unsupported"), 3);

    // Truncated: the balancer closes its side in the middle of a header.
    for header in [
        v1("198.18.5.7", 1),
        v2_client("198.18.5.7".parse().unwrap(), 1),
    ] {
        let mut c = connect(p);
        c.write_all(&header[..header.len() / 2]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        closed_without_a_byte(&mut c);
    }
    assert_eq!(refusals(a, "truncated"), 2);

    // A header that never completes, and a connection that never sends: closed after the
    // header timeout (3 s).
    let mut started = connect(p);
    started.write_all(b"PROXY TCP4 198.18.").unwrap();
    let mut silent = connect(p);
    let took = closed_without_a_byte(&mut started);
    assert!(
        took > Duration::from_millis(2800) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let took = closed_without_a_byte(&mut silent);
    assert!(took < Duration::from_millis(2000), "{took:?}");
    assert_eq!(refusals(a, "timeout"), 2);

    // A balancer's TCP health check: connect and close.
    drop(connect(p));
    let deadline = Instant::now() + Duration::from_secs(2);
    while refusals(a, "empty") != 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }

    // `kernel.deny` holds for clients named by headers (the kernel sees only the balancer).
    refused(p, &[v1("198.19.255.1", 1), call("echo")].concat());
    assert_eq!(refusals(a, "denied"), 1);

    // The tenant's connection cap counts the header's client: `far` may hold one.
    let mut first = connect(p);
    first.write_all(&v1("203.0.113.1", 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(a, "mcp_gateway_tenant_at_connection_cap{tenant=\"far\"}") != 1 {
        assert!(Instant::now() < deadline, "{}", metrics(a));
        std::thread::sleep(Duration::from_millis(20));
    }
    refused(p, &[v1("203.0.113.2", 1), call("echo")].concat());
    assert_eq!(refusals(a, "tenant_at_cap"), 1);
    // Other tenants are served meanwhile.
    assert_eq!(
        via(p, &[v1("192.0.2.10", 1), call("echo")].concat()).status,
        401
    );
    drop(first);

    // /metrics names every reason.
    let text = metrics(a);
    for reason in [
        "untrusted_source",
        "empty",
        "malformed",
        "truncated",
        "timeout",
        "unsupported",
        "banned",
        "denied",
        "tenant_at_cap",
        "source_at_cap",
    ] {
        assert!(
            text.contains(&format!(
                "mcp_gateway_proxy_protocol_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason}"
        );
    }
}

#[test]
fn banned_clients_named_by_headers_are_refused_in_user_space() {
    let s = setup();
    let p = s.port;
    let a = s.admin;
    let ok = |client: &str| via(p, &[v1(client, 1), call("echo")].concat());

    // A ban through the admin API (the kernel program is off: the bans live in user space).
    assert!(is_result(&ok("198.18.7.7")));
    ban(a, "198.18.7.7");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut c = connect(p);
        c.write_all(&[v1("198.18.7.7", 1), call("echo")].concat())
            .unwrap();
        match read_response(&mut c) {
            None => break,
            Some(r) => assert!(is_result(&r)),
        }
        assert!(Instant::now() < deadline, "the ban did not take");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(refusals(a, "banned"), 1);
    // Also as IPv4 in IPv6 form, and from a v2 header.
    refused(p, &v2_client("::ffff:198.18.7.7".parse().unwrap(), 1));
    assert_eq!(refusals(a, "banned"), 2);
    let bans = admin_request(a, "GET", "/bans", "").json();
    assert_eq!(bans[0]["address"], "198.18.7.7", "{bans}");
    // Others are served; lifting the ban serves the client again.
    assert!(is_result(&ok("198.18.7.8")));
    assert_eq!(
        admin_request(a, "DELETE", "/bans/198.18.7.7", "").status,
        200
    );
    assert!(is_result(&ok("198.18.7.7")));

    // A prefix: every client inside it is refused, the rest served.
    ban(a, "198.18.9.0/24");
    refused(p, &v1("198.18.9.200", 1));
    refused(p, &v2_client("::ffff:198.18.9.1".parse().unwrap(), 1));
    assert!(is_result(&ok("198.18.10.1")));
    assert_eq!(refusals(a, "banned"), 4);
    assert_eq!(
        admin_request(a, "DELETE", "/bans/198.18.9.0%2F24", "").status,
        200
    );
    assert!(is_result(&ok("198.18.9.200")));

    // Auto-ban: a client that keeps earning refusals (401s for a wrong key) is banned, and
    // refused from then on, though every connection comes from the balancer.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = connect(p);
        c.write_all(&[v1("192.0.2.66", 1), wrong_key()].concat())
            .unwrap();
        match read_response(&mut c) {
            None => break,
            Some(r) => assert_eq!(r.status, 401),
        }
        assert!(Instant::now() < deadline, "no auto-ban");
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(refusals(a, "banned"), 5);
    // The balancer itself is never banned: other clients are still served.
    assert!(is_result(&ok("198.18.5.7")));

    // A blocklist in one request: 998 /28s, a /25 and an address. Each takes at once.
    let mut list: Vec<String> = (0..998u32)
        .map(|i| {
            let (third, fourth) = (i >> 4, (i & 15) << 4);
            format!(r#"{{"address":"198.19.{third}.{fourth}/28","seconds":600}}"#)
        })
        .collect();
    list.push(r#"{"address":"198.18.11.0/25","seconds":600}"#.into());
    list.push(r#"{"address":"198.18.12.12","seconds":600}"#.into());
    let r = admin_request(a, "POST", "/bans", &format!("[{}]", list.join(",")));
    assert_eq!(
        (r.status, &r.json()["banned"]),
        (200, &serde_json::json!(1000))
    );
    for client in ["198.19.62.84", "198.18.11.5", "198.18.12.12"] {
        refused(p, &v1(client, 1));
    }
    assert!(is_result(&ok("198.19.62.100")), "past the 998th /28");
    assert!(is_result(&ok("198.18.11.200")), "past the /25");
    assert_eq!(refusals(a, "banned"), 8);
    let listed = admin_request(a, "GET", "/bans", "").json();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1001),
        "with the auto-ban"
    );
    // A list with a bad entry bans none of it, and says which.
    let r = admin_request(
        a,
        "POST",
        "/bans",
        r#"[{"address":"198.18.13.1","seconds":60},{"address":"lab","seconds":60}]"#,
    );
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("ban 1: ")),
        "{}",
        r.json()
    );
    assert!(is_result(&ok("198.18.13.1")));
}

/// Requests the gateway refuses before reading them whole (contradictory framing, a head too
/// large) and those it finds wrong itself (a body that is not JSON) count towards auto-ban as a
/// policy refusal does. Before, only refusals by policy counted: a client sent any number of
/// malformed requests and was never banned (an operator's review).
#[test]
fn malformed_requests_count_towards_auto_ban() {
    let s = setup();
    let (d, a) = (s.direct, s.admin);
    let big = format!(
        "POST /mcp HTTP/1.1\r\nhost: gw\r\nx-pad: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let bad: [&[u8]; 3] = [
        b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
        big.as_bytes(),
        b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: 3\r\n\r\n{{{",
    ];
    let source = "127.0.2.99";
    let mut statuses = Vec::new();
    for request in bad.iter().cycle().take(40) {
        let Some(mut c) = loopback_from(source, d) else {
            break;
        };
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if c.write_all(request).is_err() {
            break;
        }
        match read_response(&mut c) {
            Some(r) => statuses.push(r.status),
            None => break,
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    // max_refusals = 3: the fourth refusal bans (the ban takes within 100 ms, and a loaded
    // host may take a few hundred more).
    assert!(
        (4..40).contains(&statuses.len()) && statuses.iter().all(|s| [400, 431].contains(s)),
        "{statuses:?}"
    );
    until("the auto-ban did not take", || {
        direct_call(d, source).is_none()
    });
    let bans = admin_request(a, "GET", "/bans", "").json();
    assert!(
        bans.as_array()
            .is_some_and(|b| b.iter().any(|b| b["address"] == source)),
        "{bans}"
    );
    // Another client is served.
    assert!(direct_call(d, "127.0.2.98").is_some_and(|r| is_result(&r)));
    // Lifted, the source starts afresh: one more malformed request does not ban it again
    // (the count that led to the ban went with it; before, the next refusal banned again).
    assert_eq!(
        admin_request(a, "DELETE", &format!("/bans/{source}"), "").status,
        200
    );
    until("the lift did not take", || {
        direct_call(d, source).is_some_and(|r| is_result(&r))
    });
    let mut c = loopback_from(source, d).expect("connect");
    c.write_all(bad[0]).unwrap();
    assert_eq!(read_response(&mut c).map(|r| r.status), Some(400));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        direct_call(d, source).is_some_and(|r| is_result(&r)),
        "banned again"
    );
    // What a web page makes its visitors' browsers send does not count: paths no route
    // serves (`<img>` tags), requests from an origin not allowed, a URL longer than the head's
    // limit, a body that does not parse sent `no-cors` (a review banned visitors so).
    let visitor = "127.0.2.97";
    for i in 0..30 {
        let mut c = loopback_from(visitor, d).expect("connect");
        let request = match i % 6 {
            // An `<img>` of a URL with a token in it (a review banned a visitor with four).
            4 => "GET /mcp?access_token=1 HTTP/1.1\r\nhost: gw\r\naccept: image/avif,image/webp,*/*\r\n\r\n".to_owned(),
            0 => "GET /favicon.ico HTTP/1.1\r\nhost: gw\r\nsec-fetch-dest: image\r\n\r\n".to_owned(),
            1 => {
                let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
                format!(
                    "POST /mcp HTTP/1.1\r\nhost: gw\r\norigin: https://evil.example\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
            2 => format!(
                "GET /mcp?{} HTTP/1.1\r\nhost: gw\r\nsec-fetch-mode: no-cors\r\n\r\n",
                "a".repeat(70_000)
            ),
            // A browser's POST carries its page's origin.
            3 => "POST /mcp HTTP/1.1\r\nhost: gw\r\norigin: https://evil.example\r\nsec-fetch-mode: no-cors\r\ncontent-type: text/plain\r\naccept: application/json, text/event-stream\r\ncontent-length: 3\r\n\r\n{{{".to_owned(),
            // An `<img>` of a route that asks for a key, over plain HTTP: nothing says a
            // browser sent it (a review banned a visitor with four).
            _ => "GET /keyed HTTP/1.1\r\nhost: gw\r\naccept: image/avif,image/webp,*/*\r\n\r\n".to_owned(),
        };
        let _ = c.write_all(request.as_bytes());
        let status = read_response(&mut c).map(|r| r.status);
        assert!(
            matches!(status, Some(400 | 401 | 403 | 404 | 431)),
            "{i}: {status:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        direct_call(d, visitor).is_some_and(|r| is_result(&r)),
        "a visitor banned"
    );
    // A client that shows a credential is judged as a client, whatever it says it is: one
    // that added `Sec-Fetch-Mode` to its malformed requests was never banned (an attacker's
    // review); a page cannot make a browser send an `Authorization` or `X-Api-Key` (here a
    // valid key).
    let claims_browser = "127.0.2.96";
    // On a route of addresses too, where the client shows none (a review of the first
    // version, which spared a request with browser headers and no credential header).
    for (path, credential) in [
        ("/keyed", "authorization: Bearer k\r\n"),
        ("/keyed", "x-api-key: k\r\n"),
        ("/mcp", ""),
    ] {
        let mut refused = 0;
        for _ in 0..40 {
            let Some(mut c) = loopback_from(claims_browser, d) else {
                break;
            };
            let request = format!(
                "POST {path} HTTP/1.1\r\nhost: gw\r\nsec-fetch-mode: cors\r\nsec-fetch-site: cross-site\r\n{credential}content-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: 3\r\n\r\n{{{{{{"
            );
            if c.write_all(request.as_bytes()).is_err() {
                break;
            }
            match read_response(&mut c) {
                Some(r) => {
                    assert_eq!(r.status, 400, "{path} {credential}");
                    refused += 1;
                }
                None => break,
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        assert!(refused < 40, "{path} {credential}: never banned");
        until("the auto-ban did not take", || {
            direct_call(d, claims_browser).is_none()
        });
        assert_eq!(
            admin_request(a, "DELETE", &format!("/bans/{claims_browser}"), "").status,
            200
        );
        until("the lift did not take", || {
            direct_call(d, claims_browser).is_some_and(|r| is_result(&r))
        });
    }
}

/// A call on a new connection to the direct listener from `source` (a loopback address): its
/// answer, or `None` when the connection was closed (or reset) without a byte.
fn direct_call(port: u16, source: &str) -> Option<RawResponse> {
    let mut c = loopback_from(source, port)?;
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    // A reset can come before the request is written.
    c.write_all(&call("echo")).ok()?;
    read_response(&mut c)
}

fn refused_conns(admin: u16, reason: &str) -> u64 {
    metric(
        admin,
        &format!("mcp_gateway_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// Bans and `kernel.deny` hold for clients the kernel program did not judge: here it is off
/// (so are they on an interface it is not attached to, or in a packet it cannot read to the
/// TCP header). Before, a direct client was checked by the kernel program only, and a banned
/// one was served.
#[test]
fn banned_and_denied_clients_of_a_direct_listener_are_refused_by_the_worker() {
    let s = setup();
    let (d, a) = (s.direct, s.admin);
    let served = |source: &str| direct_call(d, source).is_some_and(|r| is_result(&r));

    assert!(served("127.0.1.7"));
    assert_eq!(
        direct_call(d, "127.0.1.9").map(|r| r.status),
        None,
        "a client in kernel.deny"
    );
    assert_eq!(refused_conns(a, "denied"), 1);

    ban(a, "127.0.1.7");
    until("the ban did not take", || !served("127.0.1.7"));
    assert_eq!(direct_call(d, "127.0.1.7").map(|r| r.status), None);
    assert!(refused_conns(a, "banned") >= 2);
    // A banned prefix holds every client inside it; others are served.
    ban(a, "127.0.2.0/24");
    until("the prefix ban did not take", || !served("127.0.2.200"));
    assert!(served("127.0.3.1"));
    // A prefix written IPv4-mapped is banned as the IPv4 prefix it is (before, the workers
    // compared IPv4 clients with it as an IPv6 prefix: a ban reported made and never held).
    let r = ban(a, "::ffff:127.0.3.0/120");
    assert_eq!(r.json()["banned"], "127.0.3.0/24");
    assert!(!served("127.0.3.1"));
    assert_eq!(
        admin_request(a, "DELETE", "/bans/::ffff:127.0.3.0%2F120", "").status,
        200
    );
    assert!(served("127.0.3.1"));
    // One that would hold every IPv4 address in the kernel's maps is refused.
    let r = admin_request(a, "POST", "/bans", r#"{"address":"::/64","seconds":60}"#);
    assert_eq!(r.status, 400, "{:?}", r.json());
    // Lifted, the client is served again; nothing of this was a PROXY protocol refusal.
    assert_eq!(
        admin_request(a, "DELETE", "/bans/127.0.1.7", "").status,
        200
    );
    until("the lifted ban still holds", || served("127.0.1.7"));
    assert_eq!(refusals(a, "banned"), 0);
    assert_eq!(refusals(a, "denied"), 0);
}

/// Calls on `c` (a keep-alive connection) until the gateway closes it, at most 5 s: the
/// statuses it answered before.
fn answered_until_closed(c: &mut TcpStream, request: &[u8]) -> Vec<u16> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut statuses = Vec::new();
    loop {
        if c.write_all(request).is_err() {
            return statuses;
        }
        match read_response(c) {
            Some(r) => statuses.push(r.status),
            None => return statuses,
        }
        assert!(
            Instant::now() < deadline,
            "still answered after {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// A client banned while it holds a connection is served nothing more on it. Before, a client
/// behind a balancer went on calling on its connection after auto-ban had banned it (401s that
/// a key-guesser could go on earning): the kernel program, which drops a direct client's packets
/// from its ban on, sees only the balancer.
#[test]
fn a_client_banned_on_an_open_connection_is_served_nothing_more_on_it() {
    let s = setup();
    let (p, d, a) = (s.port, s.direct, s.admin);

    // Behind the balancer: 192.0.2.77, showing a wrong API key, on a connection it holds and
    // on three more; its fourth refusal bans it (and ends the connection that earned it).
    let mut c = connect(p);
    c.write_all(&v1("192.0.2.77", 1)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    c.write_all(&wrong_key()).unwrap();
    assert_eq!(read_response(&mut c).map(|r| r.status), Some(401));
    for n in 0..3 {
        let r = via(p, &[v1("192.0.2.77", 2 + n), wrong_key()].concat());
        assert_eq!(r.status, 401);
    }
    until("the auto-ban did not take", || {
        let bans = admin_request(a, "GET", "/bans", "").json();
        bans.as_array()
            .is_some_and(|b| b.iter().any(|b| b["address"] == "192.0.2.77"))
    });
    let statuses = answered_until_closed(&mut c, &wrong_key());
    assert!(statuses.is_empty(), "{statuses:?}");
    assert_eq!(refused_conns(a, "banned"), 1);

    // A direct client, banned through the admin API between two calls.
    let mut c = loopback_from("127.0.1.7", d).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    c.write_all(&call("echo")).unwrap();
    assert!(is_result(&read_response(&mut c).unwrap()));
    ban(a, "127.0.1.7");
    let statuses = answered_until_closed(&mut c, &call("echo"));
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(refused_conns(a, "banned"), 2);
}

/// Starts a call on `/stall` on `c` and reads its answer's head and first event: the call is
/// then in progress, its stream open.
fn streaming(c: &mut TcpStream) {
    streaming_call(c, "slow");
}

/// A call of `tool` answered with an event stream that stalls after its first event.
fn streaming_call(c: &mut TcpStream, tool: &str) {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
    );
    c.write_all(&post("/stall", &body, "")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("notifications/progress") {
        let n = c.read(&mut buf).expect("the stream's first event");
        assert!(
            n > 0,
            "closed before the first event: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Waits (at most 3 s) for the gateway to close `c`, reading nothing more on it.
fn cut(c: &mut TcpStream, what: &str) {
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 256];
    match c.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("{what}: sent {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => panic!("{what}: still open after 3 s ({e})"),
    }
}

/// Whether `c` is still open (nothing to read for 300 ms).
fn still_open(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    matches!(c.read(&mut buf), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// A client banned, or denied by a reload, while its call is in progress or its connection
/// idle is cut at once: its event stream ends, the upstream's call is cancelled (its
/// connection closed), and an idle connection closes without waiting for a next request.
/// Before, the ban held from the client's next request on: an event stream (a GET stream, a
/// long call's progress) ran on for as long as its upstream kept it going.
#[test]
fn a_banned_or_denied_clients_streams_and_idle_connections_are_cut_at_once() {
    let s = setup();
    let (p, d, a) = (s.port, s.direct, s.admin);
    let direct_from = |source: &str| loopback_from(source, d).unwrap();
    // A direct client's stream, and a stream of a client behind the balancer (`edge`).
    let mut direct = direct_from("127.0.1.20");
    streaming(&mut direct);
    let mut behind = connect(p);
    behind.write_all(&v1("198.18.0.20", 1)).unwrap();
    streaming(&mut behind);
    // A stream its client could resume (its event has an id): it was read on for the event
    // store after a ban, holding the call at the upstream.
    let mut resumable = direct_from("127.0.1.23");
    streaming_call(&mut resumable, "resumable");
    // One that its client left: drained for the event store, until the ban.
    let mut left = direct_from("127.0.1.24");
    streaming_call(&mut left, "resumable");
    drop(left);
    std::thread::sleep(Duration::from_millis(300));
    // A direct client's connection, idle after a call.
    let mut idle = direct_from("127.0.1.21");
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle.write_all(&call("echo")).unwrap();
    assert!(is_result(&read_response(&mut idle).unwrap()));
    // Bystanders: another client's stream, and its balancer's other client.
    let mut other = direct_from("127.0.1.22");
    streaming(&mut other);
    let mut other_behind = connect(p);
    other_behind.write_all(&v1("198.18.0.21", 1)).unwrap();
    streaming(&mut other_behind);

    for client in [
        "127.0.1.20",
        "198.18.0.20",
        "127.0.1.21",
        "127.0.1.23",
        "127.0.1.24",
    ] {
        ban(a, client);
    }
    cut(&mut direct, "the banned direct client's stream");
    cut(
        &mut behind,
        "the banned client's stream behind the balancer",
    );
    cut(&mut resumable, "the banned client's resumable stream");
    cut(&mut idle, "the banned client's idle connection");
    // Counted as each worker cuts its own (the one that left is not watched here).
    until("five banned connections were not counted", || {
        refused_conns(a, "banned") >= 5
    });
    assert_eq!(refused_conns(a, "banned"), 5);
    // Their calls are cancelled at the upstream.
    until("the upstream's calls were not cancelled", || {
        s.stall
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == "closed")
            .count()
            == 4
    });
    assert!(still_open(&mut other), "a client not banned was cut");
    assert!(still_open(&mut other_behind), "a client not banned was cut");

    // A reload that puts a client in `kernel.deny` cuts its stream too.
    let config = std::fs::read_to_string(&s.config).unwrap();
    let denied = config.replace(
        r#"deny = ["198.19.255.0/24", "127.0.1.9/32"]"#,
        r#"deny = ["198.19.255.0/24", "127.0.1.9/32", "127.0.1.22/32"]"#,
    );
    assert_ne!(config, denied);
    std::fs::write(&s.config, denied).unwrap();
    s.daemon.hangup();
    cut(&mut other, "the denied client's stream");
    assert_eq!(refused_conns(a, "denied"), 1);
    assert!(still_open(&mut other_behind), "a client not denied was cut");
}

/// A client holds many /64s (a /48 holds 65,536; a tunnel broker gives one away), each banned
/// on its own: one client filled the kernel's prefix ban map, and past it nobody's auto-ban was
/// made. Auto-bans widen (`ipv6_widen_at`, 8 by default): the eighth in one /56 bans the /56 in
/// their place, the 32nd in one /48 the /48 (a /56 counted as one); a /64 of it never refused
/// is then refused, and the auto-bans inside are lifted. An operator's bans are neither counted
/// nor lifted; a tenant's whole `sources` prefix is never widened over; a DELETE of a ban a
/// wider one holds says which.
#[test]
fn an_ipv6_client_with_many_64s_is_banned_by_its_56_then_by_its_48() {
    let s = setup();
    let (p, a) = (s.port, s.admin);
    let bans = || -> Vec<String> {
        let bans = admin_request(a, "GET", "/bans", "").json();
        let mut bans: Vec<String> = bans
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["address"].as_str().unwrap().to_owned())
            .collect();
        bans.sort();
        bans
    };
    // Four wrong keys ban a source (max_refusals 3).
    let refuse_four = |client: &str| {
        for n in 0..4 {
            let r = via(p, &[v1(client, 1000 + n), wrong_key()].concat());
            assert_eq!(r.status, 401, "{client}");
        }
    };
    let held = |client: &str| {
        let mut c = connect(p);
        c.write_all(&[v1(client, 1), call("echo")].concat())
            .unwrap();
        closed_without_a_byte(&mut c);
    };
    // The operator's, in the /56 to come: not counted, never lifted.
    let operators = ["2001:db8:7:1aa::5", "2001:db8:7:1ab::/64"];
    for net in operators {
        assert_eq!(ban(a, net).status, 200);
    }
    // Seven /64s of 2001:db8:7:100::/56, each its own ban.
    for i in 0..7 {
        refuse_four(&format!("2001:db8:7:1{i:x}0::1"));
    }
    until(&format!("seven /64s: {:?}", bans()), || bans().len() == 9);
    // The eighth: the /56.
    refuse_four("2001:db8:7:1ff::9");
    let with = |nets: &[&str]| {
        let mut v: Vec<String> = nets.iter().map(|n| (*n).to_owned()).collect();
        v.extend([
            "2001:db8:7:1aa::5".to_owned(),
            "2001:db8:7:1ab::/64".to_owned(),
        ]);
        v.sort();
        v
    };
    until(&format!("the /56 was not banned: {:?}", bans()), || {
        bans() == with(&["2001:db8:7:100::/56"])
    });
    held("2001:db8:7:150::7");
    // Another /56 of the /48 is answered (401: no tenant takes its address), not banned.
    let r = via(p, &[v1("2001:db8:7:200::7", 1), call("echo")].concat());
    assert_eq!(r.status, 401, "another /56 of the /48: {r:?}");
    let r = admin_request(a, "DELETE", "/bans/2001:db8:7:110::/64", "");
    assert_eq!(r.status, 409, "{:?}", r.json());
    assert_eq!(
        r.json()["held_by"][0],
        "2001:db8:7:100::/56",
        "{:?}",
        r.json()
    );
    assert_eq!(
        admin_request(a, "DELETE", "/bans/2001:db8:6::/64", "").status,
        404
    );

    // 31 more /64s, each in a /56 of its own: with the /56, 32 in 2001:db8:7::/48.
    for i in 2..=32 {
        refuse_four(&format!("2001:db8:7:{i:x}00::1"));
    }
    until(&format!("the /48 was not banned: {:?}", bans()), || {
        bans() == with(&["2001:db8:7::/48"])
    });
    held("2001:db8:7:4444::4");

    // 2001:db8:9:100::/56 is a whole `sources` prefix of tenant `edge`: its eight /64s stay
    // eight.
    for i in 0..8 {
        refuse_four(&format!("2001:db8:9:1{i:x}0::1"));
    }
    until(&format!("edge's /64s: {:?}", bans()), || bans().len() == 11);
    assert!(
        !bans().contains(&"2001:db8:9:100::/56".to_owned()),
        "{:?}",
        bans()
    );
}

/// An IPv6 client's refusals are counted by its /64, and its auto-ban is the /64's: another
/// address of it is refused at once, another /64 of the tenant is served. Before, the one
/// address that went past the count was banned: each other address of its /64 had a guess and
/// a ban of its own (15,000 in a second, the control thread at 100 % rebuilding the workers'
/// set for each: an attacker's review). And the connection that earns the ban is closed after
/// that answer: before, the requests pipelined on it were answered until the control thread's
/// next turn (3,000 wrong keys).
#[test]
fn an_ipv6_clients_ban_holds_its_64_and_its_connection_ends_at_the_ban() {
    let s = setup();
    let (p, a) = (s.port, s.admin);
    // `edge` may not call `add`: four refusals of 2001:db8:5:1::100, each on a connection of
    // its own.
    for n in 0..4 {
        let r = via(
            p,
            &[v1("2001:db8:5:1::100", 1000 + n), call("add")].concat(),
        );
        assert_eq!(r.status, 403, "{:?}", r.json());
    }
    let banned = |net: &str| {
        let bans = admin_request(a, "GET", "/bans", "").json();
        bans.as_array()
            .is_some_and(|b| b.iter().any(|b| b["address"] == net))
    };
    until("the /64 was not banned", || banned("2001:db8:5:1::/64"));
    let mut c = connect(p);
    c.write_all(&[v1("2001:db8:5:1::101", 1), call("echo")].concat())
        .unwrap();
    closed_without_a_byte(&mut c);
    let r = via(p, &[v1("2001:db8:5:2::1", 1), call("echo")].concat());
    assert!(is_result(&r), "another /64: {r:?}");
    // Where a /64 is not one client's, the address alone: `::1` (whose /64 holds every IPv4
    // address to the kernel: banned as `::/64`, it dropped every IPv4 client) and link-local.
    for client in ["::1", "fe80::7"] {
        for n in 0..4 {
            let r = via(p, &[v1(client, 1000 + n), wrong_key()].concat());
            assert_eq!(r.status, 401, "{client}");
        }
        until("the address was not banned", || banned(client));
        assert!(!banned("::/64") && !banned("fe80::/64"), "{client}: a /64");
    }
    // Another link-local client is answered (401: no tenant takes its address), not banned.
    let r = via(p, &[v1("fe80::8", 1), call("echo")].concat());
    assert_eq!(r.status, 401, "another link-local client: {r:?}");

    // Twenty refused calls pipelined on one connection: answered up to the one past the
    // count (max_refusals = 3), then closed.
    let mut c = loopback_from("127.0.2.94", s.direct).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(&call("add").repeat(20)).unwrap();
    // Everything until the close (answers pipelined come in reads of several).
    let mut answered = Vec::new();
    let _ = c.read_to_end(&mut answered);
    let answered = String::from_utf8_lossy(&answered);
    assert_eq!(
        answered.matches("HTTP/1.1 ").count(),
        4,
        "answered on the connection: {answered}"
    );
    assert_eq!(answered.matches("HTTP/1.1 403 ").count(), 4, "{answered}");
}
