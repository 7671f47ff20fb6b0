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
fn a_batch_holds_at_most_max_batch_messages() {
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let batch = |n: usize| format!("[{}]", vec![ping; n].join(","));
    match parse(&batch(MAX_BATCH)).unwrap() {
        Parsed::Batch(ms) => assert_eq!(ms.len(), MAX_BATCH),
        Parsed::Single(_) => panic!("a batch"),
    }
    let e = parse(&batch(MAX_BATCH + 1)).unwrap_err();
    assert_eq!(e.code, INVALID_REQUEST);
    assert!(e.message.contains("at most 1024"), "{}", e.message);
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

fn refused(body: &str) -> RpcError {
    match parse(body) {
        Err(e) => e,
        Ok(p) => panic!("accepted {body}: {p:?}"),
    }
}

#[test]
fn duplicate_keys_are_refused_at_every_depth() {
    let cases = [
        // Top level: method, id, params, jsonrpc.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"},"params":{"name":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","jsonrpc":"1.0","id":1,"method":"ping"}"#,
        // In params: the tool name, the arguments.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"name":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"p":"/srv/ok"},"arguments":{"p":"/etc/shadow"}}}"#,
        // In the arguments and deep inside them.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"p":"/srv/ok","p":"/etc/shadow"}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":[1,{"b":{"c":[{"d":1,"d":2}]}}]}}}"#,
        // In _meta, in a response's result.
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":{"traceparent":"a","traceparent":"b"}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"result":{"x":1,"x":2}}"#,
        // Escaped spellings of the same key.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","n\u0061me":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","\u006e\u0061\u006d\u0065":"delete_file"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","\u0070arams":{"name":"x"},"params":{"name":"echo"}}"#,
        // Inside batch items.
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","name":"delete_file"}}]"#,
        // A duplicate params whose last value is not an object (panicked federation).
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{},"params":5}"#,
    ];
    for body in cases {
        let e = refused(body);
        assert_eq!(e.code, INVALID_REQUEST, "{body}: {e:?}");
        assert_eq!(e.http_status, 400, "{body}");
        assert!(e.message.contains("duplicate key"), "{body}: {}", e.message);
    }
}

/// Go's `encoding/json` (mcp-go's server and client, Go SDKs before 1.3.1) reads a key into a
/// struct's field whatever its case, and `\u{17f}`, the Kelvin sign and dotless i as `s`, `k`
/// and `i`: each of these ran at a Go server what the gateway did not decide on (an attacker's
/// review: `delete_repo` past a deny, `/etc/shadow` past an argument rule, `tasks/result` of
/// another tenant's task past a method rule).
#[test]
fn keys_go_reads_as_one_are_refused() {
    let call = |params: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{params}}}"#)
    };
    let cases = [
        // Two keys Go reads as one, at every depth.
        call(r#"{"name":"search","arguments":{},"Name":"delete_repo"}"#),
        call(r#"{"name":"search","NAME":"delete_repo"}"#),
        call(r#"{"name":"read_file","arguments":{"path":"/srv/ok"},"Arguments":{"path":"/etc/shadow"}}"#),
        call(r#"{"name":"read_file","arguments":{"path":"/srv/ok","Path":"/etc/shadow"}}"#),
        call(r#"{"name":"read_file","arguments":{"path":"/srv/ok","pat\u0048":"/etc/shadow"}}"#),
        call(r#"{"name":"t","arguments":{"a":[{"mask":1,"MASK":2}]}}"#),
        r#"{"jsonrpc":"2.0","id":5,"method":"ping","Method":"tools/call","params":{"name":"delete_repo"}}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"read_file"},"paramſ":{"name":"read_file","arguments":{"path":"/etc/passwd"}}}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":5,"ıd":6,"method":"ping"}"#.to_owned(),
    ];
    for body in &cases {
        let e = refused(body);
        assert_eq!(
            (e.code, e.http_status),
            (INVALID_REQUEST, 400),
            "{body}: {e:?}"
        );
        assert!(e.message.contains("duplicate key"), "{body}: {}", e.message);
    }
    // One key Go reads as another the gateway reads, with no key spelled as the gateway
    // reads it: the gateway would decide on a message without it.
    let alone = [
        // A response here (`result` present), a call to Go.
        r#"{"jsonrpc":"2.0","id":6,"result":null,"Method":"tools/call","params":{"name":"delete_repo"}}"#.to_owned(),
        call(r#"{"name":"read_file","Arguments":{"path":"/etc/shadow"}}"#),
        call(r#"{"name":"read_file","argumentſ":{"path":"/etc/shadow"}}"#),
        r#"{"jsonrpc":"2.0","id":6,"method":"tasks/result","params":{"TaskId":"abc"}}"#.to_owned(),
        call(r#"{"name":"x","_meta":{"ProgressToken":1}}"#),
        call(
            r#"{"name":"x","_meta":{"io.modelcontextprotocol/clientCapabilities":{"Extensions":{"io.modelcontextprotocol/tasks":{}}}}}"#,
        ),
        r#"{"jsonrpc":"2.0","ID":6,"method":"tools/list"}"#.to_owned(),
        // The field's name where the gateway reads its alias: pydantic reads both (the
        // Python SDK's types), so these are `_meta`, `taskId` and `progressToken` there.
        call(r#"{"name":"x","meta":{"io.modelcontextprotocol/related-task":{"taskId":"t"}}}"#),
        r#"{"jsonrpc":"2.0","id":6,"method":"tasks/result","params":{"task_id":"abc"}}"#.to_owned(),
        call(r#"{"name":"x","_meta":{"progress_token":1}}"#),
        call(r#"{"name":"x","_Meta":{}}"#),
    ];
    for body in &alone {
        let e = refused(body);
        assert_eq!(
            (e.code, e.http_status),
            (INVALID_REQUEST, 400),
            "{body}: {e:?}"
        );
        assert!(e.message.contains("is read as"), "{body}: {}", e.message);
    }
    // The id of a request refused so is in its error.
    assert_eq!(refused(&alone[1]).id, Some(Id::Num(7)));
    // Keys that only look alike, and an argument no rule reads spelled as its tool likes.
    for body in [
        call(r#"{"name":"t","arguments":{"path":"a","paths":"b","päth":"c"}}"#),
        call(r#"{"name":"t","arguments":{"Path":"/srv"}}"#),
        call(r#"{"name":"t","arguments":{},"_meta":{"progressToken":1,"other":2}}"#),
        call(r#"{"name":"t","arguments":{"task_id":"a","meta":1},"_meta":{"progress":1}}"#),
    ] {
        assert!(parse(&body).is_ok(), "{body}");
    }
}

#[test]
fn duplicate_keys_in_large_objects_are_refused() {
    // More keys than the linear comparison handles: the hash-set path.
    let mut fields: Vec<String> = (0..100).map(|i| format!("\"k{i}\":{i}")).collect();
    let clean = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{{}}}}}}}"#,
        fields.join(",")
    );
    assert!(parse(&clean).is_ok());
    fields.push("\"k\\u0037\":7".to_owned());
    let dup = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{{}}}}}}}"#,
        fields.join(",")
    );
    assert_eq!(refused(&dup).code, INVALID_REQUEST);
    // As Go reads keys, too.
    fields.pop();
    fields.push("\"\\u212a7\":7".to_owned());
    let folded = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{{}}}}}}}"#,
        fields.join(",")
    );
    assert!(refused(&folded).message.contains("duplicate key"));
}

#[test]
fn equal_keys_in_different_objects_are_fine() {
    let m = single(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"name":"a","x":{"name":"b","x":[{"name":"c"},{"name":"d"}]}}}}"#,
    );
    assert_eq!(m.name.as_deref(), Some("t"));
}

#[test]
fn parser_gaps_are_refused() {
    let cases = [
        // Lone surrogates (Python keeps them, serde_json refuses them).
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\ud800"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\udc00b"}}"#,
        // Trailing bytes after the value.
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"} {"jsonrpc":"2.0","id":2,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}x"#,
        // A byte order mark.
        "\u{feff}{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}",
    ];
    for body in cases {
        let e = refused(body);
        assert!(
            e.code == PARSE_ERROR || e.code == INVALID_REQUEST,
            "{body}: {e:?}"
        );
        assert_eq!(e.http_status, 400);
    }
    // Ids beyond i64 or not integers have no single meaning across parsers.
    for id in [
        "18446744073709551616",
        "1e400",
        "1.0",
        "9223372036854775808",
    ] {
        let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#);
        let e = refused(&body);
        assert!(
            e.code == PARSE_ERROR || e.code == INVALID_REQUEST,
            "{id}: {e:?}"
        );
    }
}

#[test]
fn names_are_capped() {
    let call = |name: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}"}}}}"#)
    };
    let ok = "a".repeat(MAX_NAME_CHARS);
    assert_eq!(single(&call(&ok)).name.as_deref(), Some(ok.as_str()));
    let e = refused(&call(&"a".repeat(MAX_NAME_CHARS + 1)));
    assert_eq!(
        (e.code, e.http_status, e.id),
        (INVALID_PARAMS, 400, Some(Id::Num(1)))
    );
    // Characters, not bytes: 128 two-byte characters pass.
    assert!(parse(&call(&"é".repeat(MAX_NAME_CHARS))).is_ok());
    let prompt = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{{"name":"{}"}}}}"#,
        "p".repeat(MAX_NAME_CHARS + 1)
    );
    assert_eq!(refused(&prompt).code, INVALID_PARAMS);
    let read = |len: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{{"uri":"file:///{}"}}}}"#,
            "u".repeat(len)
        )
    };
    assert!(parse(&read(MAX_URI_BYTES - 8)).is_ok());
    assert_eq!(refused(&read(MAX_URI_BYTES)).code, INVALID_PARAMS);
}

#[test]
fn a_negative_zero_id_is_refused_and_zero_is_fine() {
    let mut p = Parser::default();
    for body in [
        r#"{"jsonrpc":"2.0","id":-0,"method":"tools/list"}"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":-0,"method":"ping"}]"#,
    ] {
        let e = p.parse(body.as_bytes()).unwrap_err();
        assert_eq!(e.code, INVALID_REQUEST, "{body}");
    }
    let ok = r#"{"jsonrpc":"2.0","id":0,"method":"tools/call","params":{"name":"t","arguments":{"x":-0.5,"y":-0}}}"#;
    assert!(p.parse(ok.as_bytes()).is_ok());
}

/// A control character in a method, a tool's name or a URI (found by an attacker's review):
/// `word_count\u0000` is not `word_count` to a rule, but is to an upstream that ends a string
/// at a NUL.
#[test]
fn control_characters_in_methods_and_names_are_refused() {
    for (body, code) in [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"word_count\u0000x"}}"#,
            INVALID_PARAMS,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a\nb"}}"#,
            INVALID_PARAMS,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///x\u0000.txt"}}"#,
            INVALID_PARAMS,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call\u0000x","params":{"name":"t"}}"#,
            INVALID_REQUEST,
        ),
        (
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled\u007f"}"#,
            INVALID_REQUEST,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"abc\u0000"}}"#,
            INVALID_PARAMS,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","_meta":{"io.modelcontextprotocol/related-task":{"taskId":"abc\u0000"}}}}"#,
            INVALID_PARAMS,
        ),
    ] {
        assert_eq!(refused(body).code, code, "{body}");
    }
    assert_eq!(
        single(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"wörd.count-2"}}"#
        )
        .name
        .as_deref(),
        Some("wörd.count-2")
    );
}

#[test]
fn nesting_deeper_than_every_later_reader_takes_is_refused() {
    use super::MAX_DEPTH;
    // `levels` containers in all: the message, params, arguments, then arrays and objects.
    let call = |levels: usize| {
        let inner = levels - 3;
        let (mut open, mut close) = (String::new(), String::new());
        for i in 0..inner {
            if i % 2 == 0 {
                open.push('[');
                close.insert(0, ']');
            } else {
                open.push_str("{\"k\":");
                close.insert(0, '}');
            }
        }
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{"z":{open}1{close}}}}}}}"#
        )
    };
    let deepest = call(MAX_DEPTH);
    assert!(parse(&deepest).is_ok());
    // What the gateway admits, every later reader of it reads (serde_json: 127 levels), also
    // inside the envelope of a batch.
    assert!(serde_json::from_str::<serde_json::Value>(&format!("[{deepest}]")).is_ok());
    let e = refused(&call(MAX_DEPTH + 1));
    assert_eq!((e.code, e.http_status), (INVALID_REQUEST, 400), "{e:?}");
    assert!(e.message.contains("nested deeper"), "{}", e.message);
    let e = refused(&format!("[{}]", call(MAX_DEPTH)));
    assert!(
        e.message.contains("nested deeper"),
        "in a batch: {}",
        e.message
    );
    // Many containers side by side are no depth.
    let wide: Vec<String> = (0..3 * MAX_DEPTH)
        .map(|i| format!("\"k{i}\":[{{}}]"))
        .collect();
    let wide = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{{}}}}}}}"#,
        wide.join(",")
    );
    assert!(parse(&wide).is_ok());
}

/// A 2026-07-28 request that names the tasks extension among its client capabilities may be
/// answered with a task of the server's choosing: read so, whatever its key's spelling as JSON
/// and whatever the shape of the extensions that hold it.
#[test]
fn a_request_that_offers_the_tasks_extension_is_read_so() {
    let with = |extensions: &str| {
        single(&format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","_meta":{{"io.modelcontextprotocol/clientCapabilities":{{"extensions":{extensions}}}}}}}}}"#
        ))
        .tasks_extension
    };
    assert!(with(r#"{"io.modelcontextprotocol/tasks":{}}"#));
    assert!(with(r#"{"io.modelcontextprotocol\/tasks":{}}"#));
    assert!(with(r#"{"io.modelcontextprotocol/tasks":null}"#));
    assert!(!with(r#"{"io.modelcontextprotocol/ui":{}}"#));
    // Not an object: a server may find the key in a list or a string (the review's fixture
    // did).
    assert!(with(r#"["io.modelcontextprotocol/tasks"]"#));
    assert!(with(r#""io.modelcontextprotocol/tasks""#));
    assert!(
        !single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}"#)
            .tasks_extension
    );
    // Capabilities that are not an object, likewise; an object without extensions offers none.
    let caps = |c: &str| {
        single(&format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","_meta":{{"io.modelcontextprotocol/clientCapabilities":{c}}}}}}}"#
        ))
        .tasks_extension
    };
    assert!(caps(r#"["io.modelcontextprotocol/tasks"]"#));
    assert!(caps(r#""io.modelcontextprotocol/tasks""#));
    assert!(!caps(r#"{"roots":{}}"#));
}

/// A request re-read into a tree (by a federation, a held session) is bounded as answers are:
/// more than `values::MAX` values are refused before any parse, in either of the parser's ways.
#[test]
fn a_request_holding_more_values_than_the_gateway_parses_is_refused() {
    let n = crate::values::MAX;
    let mut body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":[0"#.to_vec();
    for _ in 0..n {
        body.extend_from_slice(b",0");
    }
    body.extend_from_slice(b"]}}}");
    for arguments in [true, false] {
        let err = match Parser::default().parse_for(&body, arguments) {
            Err(e) => e,
            Ok(_) => panic!("parsed"),
        };
        assert_eq!(err.code, -32600);
        assert!(
            err.message.contains("more than 1048576 JSON values"),
            "{}",
            err.message
        );
    }
    // One value fewer than the bound: parsed.
    let cut = body.len() - 4 - 2 * 20;
    let mut fewer = body[..cut].to_vec();
    fewer.extend_from_slice(b"]}}}");
    assert!(Parser::default().parse_for(&fewer, true).is_ok());
}

/// A number policy read is the number the upstream runs where the gateway writes the body
/// again (federation, held sessions, the bridge, stdio: serde_json reads and writes it). Before,
/// serde_json read long decimals up to 2 ULP off simd-json's correct rounding: `seconds`
/// 1.1000000000000001206048 was 1.1 to a rule's `maximum = 1.1` and went out as
/// 1.1000000000000003 (a review).
#[test]
fn a_number_written_again_is_the_number_policy_read() {
    for n in [
        "1.1000000000000001206048",
        "0.100000000000000010632",
        "99.900000000000010545",
        "9.912481181709010102311941174e-231",
    ] {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"n":{n}}}}}}}"#
        );
        let read = Parser::default().parse_for(body.as_bytes(), true).unwrap();
        let Parsed::Single(m) = read else { panic!() };
        let checked = m.arguments.unwrap()["n"].as_f64().unwrap();
        let again: serde_json::Value = serde_json::from_str(&body).unwrap();
        let sent = serde_json::to_string(&again).unwrap();
        let upstream: serde_json::Value = serde_json::from_str(&sent).unwrap();
        let ran = upstream["params"]["arguments"]["n"].as_f64().unwrap();
        assert_eq!(
            checked.to_bits(),
            ran.to_bits(),
            "{n}: {checked} checked, {ran} sent"
        );
        assert_eq!(
            checked.to_bits(),
            n.parse::<f64>().unwrap().to_bits(),
            "{n}"
        );
    }
}
