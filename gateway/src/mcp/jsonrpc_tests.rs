use super::*;
use crate::mcp::error::{INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR};

fn parse(body: &str) -> Result<Parsed, RpcError> {
    Parser::default().parse(body.as_bytes())
}

fn single(body: &str) -> Message {
    match parse(body).unwrap() {
        Parsed::Single(m) => m,
        other => panic!("{other:?}"),
    }
}

#[test]
fn extracts_tool_call() {
    let m = single(
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"héllo","n":[1,2]},"_meta":{"progressToken":"p1"}}}"#,
    );
    assert_eq!(m.kind, Kind::Request);
    assert_eq!(m.id, Some(Id::Num(7)));
    assert_eq!(m.method.as_deref(), Some("tools/call"));
    assert_eq!(m.name.as_deref(), Some("echo"));
    assert_eq!(
        m.arguments,
        Some(serde_json::json!({"text":"héllo","n":[1,2]}))
    );
    assert!(m.has_progress_token);
    let m = single(
        r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"t","arguments":{"i":-3,"u":18446744073709551615,"f":1.5,"b":false,"n":null,"o":{"deep":[{}]}}}}"#,
    );
    assert_eq!(
        m.arguments,
        Some(
            serde_json::json!({"i":-3,"u":18446744073709551615u64,"f":1.5,"b":false,"n":null,"o":{"deep":[{}]}})
        )
    );
}

#[test]
fn kinds_and_ids() {
    let n = single(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    assert_eq!((n.kind, n.id), (Kind::Notification, None));
    let r = single(r#"{"jsonrpc":"2.0","id":"s-1","result":{}}"#);
    assert_eq!(
        (r.kind, r.id),
        (Kind::Response, Some(Id::Str("s-1".into())))
    );
    let e = single(r#"{"jsonrpc":"2.0","id":3,"error":{"code":1,"message":"x"}}"#);
    assert_eq!(e.kind, Kind::Response);
    let v = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
    );
    assert_eq!(v.meta_protocol_version.as_deref(), Some("2026-07-28"));
}

#[test]
fn malformed_json_is_a_parse_error_with_null_id() {
    for body in [
        "",
        "{",
        r#"{"jsonrpc":"2.0","id":1,"method":"x""#,
        "nul",
        "\u{feff}{}",
    ] {
        let e = parse(body).unwrap_err();
        assert_eq!(
            (e.code, e.http_status, e.id.clone()),
            (PARSE_ERROR, 400, None),
            "{body:?}"
        );
    }
}

#[test]
fn invalid_requests_say_why_and_keep_the_id() {
    let cases = [
        (r#"[]"#, "empty batch", None),
        (r#"42"#, "must be an object", None),
        (r#"{"id":1,"method":"x"}"#, "`jsonrpc`", None),
        (
            r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
            "`jsonrpc`",
            None,
        ),
        (r#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#, "`id`", None),
        (r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#, "`id`", None),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":5}"#,
            "`method`",
            Some(Id::Num(1)),
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#,
            "`params`",
            Some(Id::Num(1)),
        ),
        (
            r#"{"jsonrpc":"2.0","id":1}"#,
            "not a request",
            Some(Id::Num(1)),
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#,
            "not a request",
            Some(Id::Num(1)),
        ),
    ];
    for (body, needle, id) in cases {
        let e = parse(body).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST, "{body}");
        assert!(e.message.contains(needle), "{body}: {}", e.message);
        assert_eq!(e.id, id, "{body}");
    }
}

#[test]
fn tool_call_params_are_checked() {
    for body in [
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{}}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":3}}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"a","arguments":[1]}}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{}}"#,
    ] {
        let e = parse(body).unwrap_err();
        assert_eq!(
            (e.code, e.id.clone()),
            (INVALID_PARAMS, Some(Id::Num(2))),
            "{body}"
        );
    }
}

#[test]
fn batches_and_deep_or_odd_input() {
    match parse(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"n"}]"#)
        .unwrap()
    {
        Parsed::Batch(v) => assert_eq!(v.len(), 2),
        other => panic!("{other:?}"),
    }
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    assert!(
        parse(&deep).is_err(),
        "deep nesting is refused, not a crash"
    );
    let huge = r#"{"jsonrpc":"2.0","id":99999999999999999999999,"method":"x"}"#;
    // simd-json does not represent integers beyond 64 bits: such a body is refused at parse time.
    let e = parse(huge).unwrap_err();
    assert_eq!((e.code, e.id), (PARSE_ERROR, None), "{}", e.message);
    let mut p = Parser::default();
    for _ in 0..3 {
        // Reused buffers: a large message then a small one.
        assert!(
            p.parse(
                format!(
                    r#"{{"jsonrpc":"2.0","id":1,"method":"{}"}}"#,
                    "m".repeat(100_000)
                )
                .as_bytes()
            )
            .is_ok()
        );
        assert!(
            p.parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
                .is_ok()
        );
    }
}

#[test]
fn error_body_is_json_rpc() {
    let e = RpcError::invalid_params("bad").with_id(Some(Id::Str("x".into())));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&e.body()).unwrap(),
        serde_json::json!({"jsonrpc":"2.0","id":"x","error":{"code":-32602,"message":"bad"}})
    );
}
