//! The HTTP layer under attack, on loopback (no privileges: the kernel program is off here): a
//! real gateway in front of an upstream on raw sockets that records every request head it
//! receives, so that a smuggled second request would be seen. Values from a message body with
//! CR/LF (a trace context, a federated tool name) must be refused before anything is sent;
//! heads that could mean one thing to the gateway and another to the upstream are refused;
//! HTTP/1.0 clients get HTTP/1.0 framing.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    daemon::Daemon,
    peers::{RawResponse, free_port, post, raw, read_response},
    unique,
};

/// How the recording upstream answers.
#[derive(Clone, Copy)]
enum Reply {
    /// A JSON-RPC result for the request's id, Content-Length framed.
    Json,
    /// The same result as one SSE event, chunked.
    ChunkedSse,
    /// These bytes, as they are, then close.
    Raw(&'static [u8]),
    /// [`Reply::Json`] as an HTTP/1.0 server answers (no `Connection: keep-alive`: the
    /// connection ends with the answer), though it still reads what comes after.
    Json10,
    /// A POST gets [`Reply::Json`]; a GET gets these pieces as they are, 150 ms apart, and the
    /// connection is held open for a second, then closed.
    GetStream(&'static [&'static [u8]]),
}

/// An upstream on raw sockets: records each request head it reads (a smuggled request shows up
/// as a head of its own) and answers every request. Stops listening on drop.
struct Recorder {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    /// Connections accepted.
    conns: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn start(reply: Reply) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, counted, stopped) = (Arc::clone(&heads), Arc::clone(&conns), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { return };
                counted.fetch_add(1, Ordering::Relaxed);
                let log = Arc::clone(&log);
                std::thread::spawn(move || serve(conn, reply, &log));
            }
        });
        Self {
            port,
            heads,
            conns,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag and closes the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, reply: Reply, log: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
    let mut out = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut head = String::new();
        let mut len = 0;
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            head.push_str(&line);
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let get = head.starts_with("GET ");
        log.lock().unwrap().push(head);
        let id = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("id").cloned())
            .unwrap_or(serde_json::Value::Null);
        let result =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {"ok": true}}).to_string();
        let written = match reply {
            Reply::GetStream(pieces) if get => {
                for piece in pieces {
                    let _ = out.write_all(piece);
                    std::thread::sleep(Duration::from_millis(150));
                }
                std::thread::sleep(Duration::from_secs(1));
                return;
            }
            Reply::Json | Reply::GetStream(_) => write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{result}",
                result.len()
            ),
            Reply::Json10 => write!(
                out,
                "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{result}",
                result.len()
            ),
            Reply::ChunkedSse => {
                let event = format!("event: message\ndata: {result}\n\n");
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n0\r\n\r\n",
                    event.len()
                )
            }
            Reply::Raw(bytes) => {
                let _ = out.write_all(bytes);
                return;
            }
        };
        if written.is_err() {
            return;
        }
    }
}

fn config(instance: &str, port: u16, upstream: &str, federated: bool) -> String {
    let route = if federated {
        "[[routes]]\npath = \"/fed\"\nfederate = [{ upstream = \"u0\", prefix = \"\" }]\n"
    } else {
        "[[routes]]\npath = \"/mcp\"\nupstream = \"u0\"\n"
    };
    format!(
        r#"
[gateway]
instance = "{instance}"
workers = 1
shutdown_grace_ms = 2000
[[listeners]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:{admin}"
[kernel]
enabled = false
[http]
max_body_bytes = 65536
max_header_bytes = 4096
request_timeout_ms = 2000
[[upstreams]]
name = "u0"
url = "{upstream}"
response_timeout_ms = 1500
{route}"#,
        admin = free_port()
    )
}

/// A gateway with route `/mcp` to `upstream`, or `/fed` federating it alone (no prefix).
fn start(upstream: &str, federated: bool) -> (Daemon, u16) {
    let port = free_port();
    let instance = unique("gwhttp");
    let d = Daemon::start_local(&instance, &config(&instance, port, upstream, federated));
    (d, port)
}

/// Opens a federated session on `/fed` (a 2025-06-18 initialize); its id.
fn fed_session(port: u16) -> String {
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let (resp, _) = raw(port, &post("/fed", init, ""));
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.header("mcp-session-id").expect("a session").to_owned()
}

/// Asks for `session`'s merged event stream (GET `/fed`); the connection, its answer unread.
fn merged_stream(port: u16, session: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /fed HTTP/1.1\r\nhost: gw\r\naccept: text/event-stream\r\nmcp-session-id: {session}\r\nmcp-protocol-version: 2025-06-18\r\n\r\n"
    )
    .unwrap();
    s
}

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A second request, to follow an injected `content-length: 0` and blank line.
const SMUGGLED: &str = "POST /mcp HTTP/1.1\r\nhost: u\r\ncontent-type: application/json\r\ncontent-length: 59\r\n\r\n{\"jsonrpc\":\"2.0\",\"id\":66,\"method\":\"tools/call\",\"params\":{}}";

fn assert_refused(resp: &RawResponse, what: &str) {
    assert_eq!(
        resp.status,
        400,
        "{what}: {resp:?} {}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.json()["error"]["code"], -32600, "{what}");
}

/// Reads until the gateway closes the connection, `enough` holds for what was read, or 3 s
/// pass without a byte; returns what was read and whether the connection was closed.
fn read_until(s: &mut TcpStream, enough: impl Fn(&[u8]) -> bool) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (all, true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(_) => return (all, false),
        }
        if enough(&all) {
            return (all, false);
        }
    }
}

/// Whether the gateway closes the connection (within 3 s) without sending anything more.
fn closed_silently(s: &mut TcpStream) -> bool {
    read_until(s, |_| false) == (Vec::new(), true)
}

#[test]
fn crlf_in_a_trace_context_is_refused_and_smuggles_no_request_upstream() {
    let up = Recorder::start(Reply::Json);
    let (mut d, port) = start(&up.url(), false);
    // `_meta.traceparent`: a valid trace context, then a fifth field carrying the injection.
    let tp =
        serde_json::to_string(&format!("{TP}-\r\ncontent-length: 0\r\n\r\n{SMUGGLED}")).unwrap();
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{}},"_meta":{{"traceparent":{tp}}}}}}}"#
    );
    let (resp, _) = raw(port, &post("/mcp", &body, ""));
    assert_refused(&resp, "CR/LF in _meta.traceparent");
    assert_eq!(resp.json()["id"], 1);
    // Nor a value with anything around it, nor in the header.
    for tp in [format!(" {TP}"), format!("{TP}-01"), TP.to_uppercase()] {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{{"_meta":{{"traceparent":"{tp}"}}}}}}"#
        );
        let (resp, _) = raw(port, &post("/mcp", &body, ""));
        assert_refused(&resp, &tp);
    }
    let list = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#;
    let (resp, _) = raw(
        port,
        &post("/mcp", list, &format!("traceparent: {TP}-01\r\n")),
    );
    assert_refused(&resp, "traceparent header with a fifth field");
    assert_eq!(
        up.heads(),
        Vec::<String>::new(),
        "nothing reached the upstream"
    );

    // A valid trace context reaches the upstream as it is, as the only extra line.
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":4,"method":"tools/list","params":{{"_meta":{{"traceparent":"{TP}"}}}}}}"#
    );
    let (resp, _) = raw(port, &post("/mcp", &body, ""));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["id"], 4);
    let heads = up.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].contains(&format!("\r\ntraceparent: {TP}\r\n")),
        "{heads:?}"
    );
    d.stop();
}

#[test]
fn crlf_in_a_federated_tool_name_is_refused_and_smuggles_no_request_upstream() {
    let up = Recorder::start(Reply::Json);
    let (mut d, port) = start(&up.url(), true);
    let session = fed_session(port);
    let before = up.heads().len();
    assert_eq!(before, 2, "initialize and notifications/initialized");

    // The member's name for the tool is written into `Mcp-Name` for the upstream. Short
    // enough to pass the 128-character cap on names; refused as the message is read (no name
    // holds a control character), before the head writer, which refuses one too, sees it.
    let name = serde_json::to_string(
        "x\r\ncontent-length: 0\r\n\r\nDELETE /mcp HTTP/1.1\r\nhost: u\r\n\r\n",
    )
    .unwrap();
    let call = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":{name},"arguments":{{}}}}}}"#
    );
    let extra = format!("mcp-session-id: {session}\r\nmcp-name: x\r\n");
    let (resp, _) = raw(port, &post("/fed", &call, &extra));
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(
        resp.json()["error"]["code"],
        -32602,
        "CR/LF in a federated tool name"
    );
    assert_eq!(resp.json()["id"], 7);
    assert_eq!(up.heads().len(), before, "{:?}", up.heads());

    // A clean name is routed, and the upstream sees exactly one more request.
    let call =
        r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let (resp, _) = raw(
        port,
        &post(
            "/fed",
            call,
            &format!("mcp-session-id: {session}\r\nmcp-name: echo\r\n"),
        ),
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["id"], 8);
    let heads = up.heads();
    assert_eq!(heads.len(), before + 1, "{heads:?}");
    assert!(
        heads[before].contains("\r\nmcp-name: echo\r\n"),
        "{heads:?}"
    );
    d.stop();
}

#[test]
fn heads_that_could_mean_two_things_are_refused_before_the_upstream() {
    let up = Recorder::start(Reply::Json);
    let (mut d, port) = start(&up.url(), false);
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let head = |extra: &str| {
        format!(
            "POST /mcp HTTP/1.1\r\n{extra}content-type: application/json\r\ncontent-length: {}\r\n\r\n{list}",
            list.len()
        )
        .into_bytes()
    };
    // A chunked body whose size line for `list` is `size_line`, then `end` (the last chunk
    // and trailers): lines a proxy in front may end elsewhere than the gateway does.
    let chunked = |size_line: &str, end: &str| {
        format!(
            "POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{size_line}\r\n{list}\r\n{end}"
        )
        .into_bytes()
    };
    let n = format!("{:x}", list.len());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "bare LF in a chunk extension",
            chunked(&format!("{n};x\nGET /x HTTP/1.1"), "0\r\n\r\n"),
        ),
        ("an empty chunk size line", chunked(&n, "\r\n\r\n")),
        (
            "bare LF in a trailer",
            chunked(&n, &format!("0\r\nx: 1\n{SMUGGLED}\r\n\r\n")),
        ),
        ("two Host", head("host: gw\r\nhost: other\r\n")),
        ("invalid Host", head("host: gw/evil\r\n")),
        ("Host with a quote", head("host: gw\"x\r\n")),
        (
            "two Mcp-Name",
            post("/mcp", list, "mcp-name: echo\r\nmcp-name: delete_file\r\n"),
        ),
        (
            "two Mcp-Session-Id",
            post("/mcp", list, "mcp-session-id: a\r\nmcp-session-id: b\r\n"),
        ),
        (
            "two Mcp-Protocol-Version",
            post(
                "/mcp",
                list,
                "mcp-protocol-version: 2025-06-18\r\nmcp-protocol-version: 2025-03-26\r\n",
            ),
        ),
        (
            "two Mcp-Method",
            post(
                "/mcp",
                list,
                "mcp-method: tools/list\r\nmcp-method: tools/call\r\n",
            ),
        ),
        (
            "two Mcp-Run-Id",
            post("/mcp", list, "mcp-run-id: a\r\nmcp-run-id: b\r\n"),
        ),
        (
            "access_token in the query",
            post("/mcp?access_token=secret", list, ""),
        ),
        (
            "access_token percent-encoded",
            post("/mcp?x=1&access%5Ftoken=secret", list, ""),
        ),
        (
            "access_token as PHP and qs read it",
            post("/mcp?access_token[]=secret", list, ""),
        ),
        (
            "access.token, which PHP reads as access_token",
            post("/mcp?access.token=secret", list, ""),
        ),
        (
            "Transfer_Encoding, which a CGI server reads as Transfer-Encoding",
            post("/mcp", list, "transfer_encoding: chunked\r\n"),
        ),
        (
            "X_Real_IP, which a CGI server reads as X-Real-IP",
            post("/mcp", list, "x_real_ip: 203.0.113.7\r\n"),
        ),
        (
            "Connection naming an MCP field",
            post(
                "/mcp",
                list,
                "connection: keep-alive\r\nconnection: mcp-protocol-version\r\nmcp-protocol-version: 2025-06-18\r\n",
            ),
        ),
        (
            "Content-Length and Transfer-Encoding",
            head("host: gw\r\ntransfer-encoding: chunked\r\n"),
        ),
        (
            "two different Content-Lengths",
            post("/mcp", list, "content-length: 3\r\n"),
        ),
        ("obs-fold", post("/mcp", list, "x-folded: a\r\n b\r\n")),
        (
            "a field line ended by a bare LF",
            head("host: gw\r\nx-note: a\nx-other: b\r\n"),
        ),
        (
            "a request line ended by a bare LF",
            format!(
                "POST /mcp HTTP/1.1\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{list}",
                list.len()
            )
            .into_bytes(),
        ),
        (
            "whitespace before the colon",
            post("/mcp", list, "x-space : a\r\n"),
        ),
    ];
    for (what, request) in &cases {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(request).unwrap();
        let resp = read_response(&mut s).unwrap_or_else(|| panic!("{what}: no answer"));
        assert_refused(&resp, what);
        assert!(
            closed_silently(&mut s),
            "{what}: the connection is closed after the refusal"
        );
    }
    assert_eq!(
        up.heads(),
        Vec::<String>::new(),
        "nothing reached the upstream"
    );

    // The RFC 9728 document only names a Host that is valid.
    let (resp, _) = raw(
        port,
        b"GET /.well-known/oauth-protected-resource/mcp HTTP/1.1\r\nhost: evil.example/phish?\r\n\r\n",
    );
    assert_eq!(resp.status, 400, "{resp:?}");
    let (resp, _) = raw(
        port,
        b"GET /.well-known/oauth-protected-resource/mcp HTTP/1.1\r\nhost: gw.test:8080\r\n\r\n",
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["resource"], "http://gw.test:8080/mcp");
    d.stop();
}

#[test]
fn every_connection_line_is_honoured() {
    let up = Recorder::start(Reply::Json);
    let (mut d, port) = start(&up.url(), false);
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    // A field named in the second Connection line is hop-by-hop: the upstream never sees it.
    let (resp, _) = raw(
        port,
        &post(
            "/mcp",
            list,
            "connection: keep-alive\r\nconnection: x-hop\r\nx-hop: secret\r\nx-end: kept\r\n",
        ),
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    let heads = up.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        !heads[0].to_ascii_lowercase().contains("x-hop"),
        "{heads:?}"
    );
    assert!(heads[0].contains("x-end: kept"), "{heads:?}");
    // `keep-alive` then `close`: the gateway says it closes, and reads no further request.
    let (resp, mut s) = raw(
        port,
        &post(
            "/mcp",
            list,
            "connection: keep-alive\r\nconnection: close\r\n",
        ),
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("connection"), Some("close"));
    let _ = s.write_all(&post("/mcp", list, ""));
    let (more, _) = read_until(&mut s, |_| false);
    assert_eq!(
        String::from_utf8_lossy(&more),
        "",
        "no answer after `Connection: close`"
    );
    assert_eq!(up.heads().len(), 2, "{:?}", up.heads());
    d.stop();
}

#[test]
fn http_1_0_clients_get_no_chunked_coding_and_no_100_continue() {
    let up = Recorder::start(Reply::ChunkedSse);
    let (mut d, port) = start(&up.url(), false);
    let list = r#"{"jsonrpc":"2.0","id":5,"method":"tools/list"}"#;
    let request = |version: &str, extra: &str| {
        format!(
            "POST /mcp HTTP/{version}\r\nhost: gw\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n{extra}content-length: {}\r\n\r\n{list}",
            list.len()
        )
    };
    // The upstream answers chunked; an HTTP/1.0 client gets the body as it is, ended by close.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request("1.0", "connection: keep-alive\r\nexpect: 100-continue\r\n").as_bytes())
        .unwrap();
    let (all, _) = read_until(&mut s, |b| {
        String::from_utf8_lossy(b).contains(r#""id":5,"result":{"ok":true}}"#)
    });
    let text = String::from_utf8_lossy(&all).into_owned();
    assert!(!text.contains("100 Continue"), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{text}");
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("transfer-encoding"), "{text}");
    assert!(lower.contains("connection: close"), "{text}");
    assert!(
        body.starts_with("event: message\ndata: "),
        "no chunk framing: {text}"
    );
    assert!(body.contains(r#""id":5"#), "{text}");

    // HTTP/1.1 still gets it chunked, and the connection stays open.
    let (resp, mut s) = raw(port, request("1.1", "").as_bytes());
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    s.write_all(request("1.1", "").as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).expect("a second answer").status, 200);

    // HTTP/1.0 with Transfer-Encoding has faulty framing: refused, and the connection closed.
    let chunked = format!(
        "POST /mcp HTTP/1.0\r\nhost: gw\r\nconnection: keep-alive\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{list}\r\n0\r\n\r\n",
        list.len()
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(chunked.as_bytes()).unwrap();
    s.write_all(request("1.0", "connection: keep-alive\r\n").as_bytes())
        .unwrap();
    let resp = read_response(&mut s).expect("an answer");
    assert_refused(&resp, "HTTP/1.0 with Transfer-Encoding");
    assert!(closed_silently(&mut s), "nothing more on that connection");
    d.stop();
}

#[test]
fn an_upstream_head_with_a_control_character_never_reaches_the_client() {
    let up = Recorder::start(Reply::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nmcp-session-id: a\x0bb\r\ncontent-length: 2\r\n\r\n{}",
    ));
    let (mut d, port) = start(&up.url(), false);
    let (resp, _) = raw(
        port,
        &post(
            "/mcp",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            "",
        ),
    );
    assert_eq!(resp.status, 502, "{resp:?}");
    assert!(resp.header("mcp-session-id").is_none(), "{resp:?}");
    d.stop();
}

/// An HTTP/1.0 answer without `Connection: keep-alive` ends its connection: the next request
/// goes on a new one (it was kept in the pool and used again as the server closed it). And a
/// `101 Switching Protocols` to a request that asked for no upgrade is no interim answer to
/// skip: what follows it is not HTTP (it was read as the next head).
#[test]
fn an_http_1_0_answer_ends_its_connection_and_a_101_is_refused() {
    let up = Recorder::start(Reply::Json10);
    let (mut d, port) = start(&up.url(), false);
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    for _ in 0..3 {
        let (resp, _) = raw(port, &post("/mcp", list, ""));
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    assert_eq!(up.heads().len(), 3);
    assert_eq!(up.conns.load(Ordering::Relaxed), 3, "one connection each");
    d.stop();

    let up = Recorder::start(Reply::Raw(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    ));
    let (mut d, port) = start(&up.url(), false);
    let (resp, _) = raw(port, &post("/mcp", list, ""));
    assert_eq!(resp.status, 502, "{resp:?}");
    d.stop();
}

/// A request target with a fragment is refused: a server may read its path or query to the
/// end or to the `#`.
#[test]
fn a_request_target_with_a_fragment_is_refused() {
    let up = Recorder::start(Reply::Json);
    let (mut d, port) = start(&up.url(), false);
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    for target in ["/mcp#x", "/mcp?x=1#frag"] {
        let (resp, _) = raw(port, &post(target, list, ""));
        assert_refused(&resp, target);
    }
    assert_eq!(
        up.heads(),
        Vec::<String>::new(),
        "nothing reached the upstream"
    );
    d.stop();
}

#[test]
fn a_get_or_delete_with_a_body_is_refused_and_never_forwarded() {
    let up = Recorder::start(Reply::Json);
    let (mut d, port) = start(&up.url(), false);
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":2}}}"#;
    for method in ["GET", "DELETE"] {
        // The message would be decided by no policy at all on these methods.
        let req = format!(
            "{method} /mcp HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\naccept: text/event-stream\r\ncontent-length: {}\r\n\r\n{call}",
            call.len()
        );
        let (resp, _) = raw(port, req.as_bytes());
        assert_refused(&resp, method);
        let chunked = format!(
            "{method} /mcp HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{call}\r\n0\r\n\r\n",
            call.len()
        );
        let (resp, _) = raw(port, chunked.as_bytes());
        assert_refused(&resp, &format!("{method}, chunked"));
    }
    assert_eq!(
        up.heads(),
        Vec::<String>::new(),
        "nothing reached the upstream"
    );
    d.stop();
}

/// A member's event stream of known length ends where its length says; bytes after it are not
/// relayed as events. A member whose stream head is unframeable (two lengths) is left out, not
/// read until it closes.
#[test]
fn a_members_event_stream_ends_where_its_framing_says() {
    const EVENT: &str = "id: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/first\"}\n\n";
    const AFTER: &str =
        "id: 2\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/smuggled\"}\n\n";
    fn stream(lengths: &str) -> &'static [&'static [u8]] {
        let bytes: &'static [u8] = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n{lengths}\r\n{EVENT}{AFTER}"
        )
        .into_bytes()
        .leak();
        vec![bytes].leak()
    }
    let len = format!("content-length: {}\r\n", EVENT.len());
    let two = format!("{len}content-length: {}\r\n", EVENT.len() + AFTER.len());
    for (lengths, relayed) in [(len, true), (two, false)] {
        let up = Recorder::start(Reply::GetStream(stream(&lengths)));
        let (mut d, port) = start(&up.url(), true);
        let session = fed_session(port);
        let mut s = merged_stream(port, &session);
        let (got, _) = read_until(&mut s, |all| {
            String::from_utf8_lossy(all).contains("smuggled") || all.ends_with(b"0\r\n\r\n")
        });
        let got = String::from_utf8_lossy(&got);
        assert!(!got.contains("smuggled"), "{lengths:?}: {got}");
        if relayed {
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
            assert!(got.contains("notifications/first"), "{got}");
        } else {
            assert!(!got.starts_with("HTTP/1.1 200"), "{got}");
        }
        d.stop();
    }
}

/// A member's merged stream goes on past events the gateway drops (data that is not a JSON
/// object, a blank line: an empty piece once ended the client's stream with a last chunk),
/// and a member's request ended by a lone CR is tagged as a client reads it.
#[test]
fn a_members_stream_goes_on_past_dropped_events_and_is_tagged_however_its_lines_end() {
    const PIECES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n",
        b"\n",
        b": ping\n\n",
        b"data: {\"jsonrpc\":\"2.0\",\"id\":\"o.n.9\",\"method\":\"elicitation/create\",\"params\":{}}\r\r",
    ];
    let up = Recorder::start(Reply::GetStream(PIECES));
    let (mut d, port) = start(&up.url(), true);
    let session = fed_session(port);
    let mut s = merged_stream(port, &session);
    let (got, _) = read_until(&mut s, |all| {
        String::from_utf8_lossy(all).contains("o.n.9") || all.ends_with(b"\r\n0\r\n\r\n")
    });
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains(r#""id":"u0.s.o.n.9""#), "{got}");
    d.stop();
}
