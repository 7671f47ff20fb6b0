//! How an answer's head is framed for the client.

use super::*;

fn request(minor: u8) -> Request {
    Request {
        method: "POST".into(),
        target: "/mcp".into(),
        minor,
        headers: [("host", "gw")].into_iter().collect(),
        body: bytes::Bytes::new(),
        keep_alive: true,
    }
}

/// A chunked event stream's body, relayed to a client that takes chunks (`classify`: it
/// answers a request).
fn chunked_events(classify: bool) -> Body<'static> {
    Body::new(
        BodyKind::Chunked,
        Framing::Chunked,
        true,
        None,
        classify,
        1 << 20,
    )
}

fn sse_head(len: usize) -> ResponseHead {
    ResponseHead {
        status: 200,
        headers: [
            ("content-type", "text/event-stream".to_owned()),
            ("content-length", len.to_string()),
        ]
        .into_iter()
        .collect(),
    }
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).to_ascii_lowercase()
}

/// An event stream is rewritten (its event ids signed, a federation's member's ids prefixed
/// too: its length changes), so it must not carry the upstream's length: chunked to an
/// HTTP/1.1 client, ended by a close for HTTP/1.0. Announced as it came, the client would
/// read the rewritten stream's tail as the next answer.
#[test]
fn an_event_stream_is_not_relayed_with_the_upstreams_length() {
    let obs = Obs::default();
    let up = crate::mcp::proxy::head_tests::upstream();
    let kind = Some(BodyKind::Length(120));
    let (out, framing) = client_head(&sse_head(120), kind, &request(1), &up, None, &obs)
        .ok()
        .unwrap();
    assert_eq!(framing, Framing::Chunked);
    assert!(!text(&out).contains("content-length"), "{}", text(&out));

    let (out, framing) = client_head(&sse_head(120), kind, &request(1), &up, Some("member"), &obs)
        .ok()
        .unwrap();
    assert_eq!(framing, Framing::Chunked);
    assert!(!text(&out).contains("content-length"), "{}", text(&out));
    assert!(
        text(&out).contains("transfer-encoding: chunked\r\n"),
        "{}",
        text(&out)
    );

    let (out, framing) = client_head(&sse_head(120), kind, &request(0), &up, Some("member"), &obs)
        .ok()
        .unwrap();
    assert_eq!(framing, Framing::UntilClose);
    assert!(!text(&out).contains("content-length"), "{}", text(&out));
    assert!(
        text(&out).contains("connection: close\r\n"),
        "{}",
        text(&out)
    );
}

/// A head field the upstream made unsafe (a control character) fails the answer, whole.
#[test]
fn an_unsafe_upstream_field_is_refused() {
    let obs = Obs::default();
    let up = crate::mcp::proxy::head_tests::upstream();
    let mut head = sse_head(1);
    head.headers.push("retry-after", b"a\r\ncontent-length: 0");
    let kind = Some(BodyKind::Length(1));
    assert!(client_head(&head, kind, &request(1), &up, None, &obs).is_err());
}

/// An event stream is known by its content type's start, in any case, whatever follows.
#[test]
fn event_streams_are_known_by_their_content_type() {
    let head = |ct: &str| ResponseHead {
        status: 200,
        headers: [("Content-Type", ct)].into_iter().collect(),
    };
    for ct in ["text/event-stream", " Text/Event-Stream; charset=utf-8"] {
        assert!(head(ct).is_sse(), "{ct}");
    }
    for ct in ["text/event", "application/json", "", "x text/event-stream"] {
        assert!(!head(ct).is_sse(), "{ct}");
    }
}

/// An event stream's outcome is its last event's, however the stream is cut into the pieces
/// the relay takes, whatever its line ends (CR, LF, CRLF), and however large the events
/// before it (a batch over 64 KiB used to leave an earlier batch's answer in place).
#[test]
fn an_event_streams_outcome_is_its_last_events_however_it_arrives() {
    let big = format!(
        "data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"data\":\"{}\"}}}}\r\r",
        "x".repeat(70 * 1024)
    );
    let cases = [
        (
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":-1,\"message\":\"m\"}}\r\r",
            Outcome::RpcError,
        ),
        (
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\r\ndata: \"result\":{\"isError\":true}}\n\r\n",
            Outcome::ToolError,
        ),
        (
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"isError\":false}}\r\n\r\n",
            Outcome::Ok,
        ),
    ];
    for (answer, want) in cases {
        let ok = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n";
        // A comment after the answer is not an answer.
        let stream = [ok, &big, answer, ": ping\n\n"].concat();
        for cut in [
            1,
            100,
            ok.len(),
            ok.len() + 1,
            ok.len() + big.len() - 1,
            ok.len() + big.len() + 3,
            stream.len() - 1,
            stream.len(),
        ] {
            let mut body = chunked_events(true);
            for piece in [&stream.as_bytes()[..cut], &stream.as_bytes()[cut..]] {
                body.events.push(piece);
                body.whole_events().unwrap();
            }
            assert_eq!(body.verdict(false).0, want, "{answer:?} cut at {cut}");
        }
    }
}

#[test]
fn only_a_session_era_call_the_client_can_resume_is_read_on_without_it() {
    // What holds a concurrency slot is a request's answer: a GET stream never ends, and a
    // 2026-07-28 stream is cancelled by its closing.
    let body = |classify: bool| {
        let mut b = chunked_events(classify);
        b.id_taken = true;
        b.delivered();
        b
    };
    let mut post = request(1);
    post.headers = [("host", "gw"), ("mcp-protocol-version", "2025-11-25")]
        .into_iter()
        .collect();
    let mut get = post.clone();
    get.method = "GET".into();
    let mut modern = post.clone();
    modern.headers = [("host", "gw"), ("mcp-protocol-version", "2026-07-28")]
        .into_iter()
        .collect();
    assert!(body(true).can_resume(&post));
    assert!(!body(false).can_resume(&post), "a notification's stream");
    assert!(!body(true).can_resume(&get), "a GET stream");
    assert!(!body(false).can_resume(&get), "a GET stream");
    assert!(!body(true).can_resume(&modern), "2026-07-28");
    // Nothing with an id reached the client: nothing to resume.
    assert!(!chunked_events(true).can_resume(&post));
}
