use super::*;

#[test]
fn the_session_id_is_read_and_set_in_the_request_head_only() {
    let req = b"POST /mcp HTTP/1.1\r\nhost: x\r\nMcp-Session-Id:  abc \r\ncontent-length: 5\r\n\r\nmcp-session-id: body";
    assert_eq!(session_of(req), Some(&b"abc"[..]));
    let mut set = req.to_vec();
    set_session(&mut set, b"own-id");
    assert_eq!(
        set,
        b"POST /mcp HTTP/1.1\r\nhost: x\r\nMcp-Session-Id:  own-id \r\ncontent-length: 5\r\n\r\nmcp-session-id: body"
    );
    let req = b"POST /mcp HTTP/1.1\r\nhost: x\r\n\r\nmcp-session-id: body";
    assert_eq!(session_of(req), None);
    let mut unset = req.to_vec();
    set_session(&mut unset, b"own-id");
    assert_eq!(unset, req);
}

#[test]
fn only_failures_a_client_cannot_cause_count_against_a_replica() {
    let post = |body: &str| crate::http::Outgoing {
        head: format!(
            "POST /mcp HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes(),
        body: body.to_owned().into(),
    };
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    ] {
        assert!(says_of_replica(&post(body)), "{body}");
    }
    assert!(says_of_replica(&crate::http::Outgoing {
        head: b"GET /mcp HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        body: bytes::Bytes::new(),
    }));
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"params":{{"pad":"{}"}},"method":"ping"}}"#,
        "x".repeat(20_000)
    );
    for body in [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"x"}}"#,
        // What the gateway judged is what counts: a second key, a batch, an escape.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"p\u0069ng"}"#,
        big.as_str(),
    ] {
        assert!(!says_of_replica(&post(body)), "{body}");
    }
}
