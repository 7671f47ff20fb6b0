use super::*;

/// What a client's parse says: last of two equal keys wins, escapes decoded (serde_json, as
/// Python's and JavaScript's parsers).
fn parsed(message: &[u8]) -> Outcome {
    let Ok(serde_json::Value::Object(answer)) = serde_json::from_slice(message) else {
        return Outcome::Ok;
    };
    if answer.get("error").is_some_and(|e| !e.is_null()) {
        Outcome::RpcError
    } else if answer
        .get("result")
        .and_then(|r| r.get("isError"))
        .is_some_and(|e| *e == serde_json::Value::Bool(true))
    {
        Outcome::ToolError
    } else {
        Outcome::Ok
    }
}

/// Fed whole and in every split into two pieces, and byte by byte.
fn scanned_every_way(message: &[u8]) -> Outcome {
    let whole = classify(message);
    for at in 0..=message.len() {
        let mut s = AnswerScan::default();
        s.feed(&message[..at]);
        s.feed(&message[at..]);
        assert_eq!(
            s.outcome(),
            whole,
            "split at {at}: {}",
            String::from_utf8_lossy(message)
        );
    }
    let mut s = AnswerScan::default();
    for b in message {
        s.feed(std::slice::from_ref(b));
    }
    assert_eq!(s.outcome(), whole);
    whole
}

const CASES: &[&str] = &[
    r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"5"}]}}"#,
    r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#,
    r#"{"jsonrpc":"2.0","id":1,"result":{"isError":false,"content":[]}}"#,
    r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#,
    r#"{"jsonrpc":"2.0","id":1,"error":null,"result":{"isError":true}}"#,
    r#"{"jsonrpc":"2.0","id":1,"error":"x"}"#,
    r#"{"jsonrpc":"2.0","id":1,"error":0}"#,
    r#" { "result" : { "content" : [ ] , "isError" : true } } "#,
    r#"{"result":{"content":[{"text":"\"isError\":true"}]}}"#,
    r#"{"result":{"nested":{"isError":true}}}"#,
    r#"{"other":{"isError":true},"result":{}}"#,
    r#"{"result":{"content":[{"type":"text","text":"a\\"}],"isError":true}}"#,
    r#"{"result":{"text":"}]}{[","isError":true}}"#,
    r#"{"result":[{"isError":true}]}"#,
    r#"{"result":{"isError":1}}"#,
    r#"{"result":{"isError":truex}}"#,
    r#"{"result":{"isError":true}"#,
    r#""error""#,
    r#"{"error":{}}{"#,
    r#"{"error":{}} "#,
    r#"{"error":{}}"#,
    r#"{"result":{"isError":true,"more":{"a":[1,2,{"b":null}]}}}"#,
    r#"{"id":"x\\","result":{"isError":true}}"#,
    // Keys as a client reads them: escapes decoded, the last of two equal keys.
    r#"{"result":{"is\u0045rror":true}}"#,
    r#"{"result":{"isErro\u0072":true}}"#,
    r#"{"\u0065rror":{"code":1}}"#,
    r#"{"e\u0072ror":null,"result":{}}"#,
    r#"{"result":{"is\u0045rror\u0000":true}}"#,
    r#"{"result":{"\u0069s\u0045\u0072\u0072\u006F\u0072":true}}"#,
    r#"{"result":{"is\/Error":true}}"#,
    r#"{"result":{"is\uZZ":true}}"#,
    r#"{"\ud83d\ude00":1,"error":1}"#,
    r#"{"result":{"isError":true,"isError":false}}"#,
    r#"{"result":{"isError":false,"isError":true}}"#,
    r#"{"result":{"isError":true,"isError":"yes"}}"#,
    r#"{"error":{"code":1},"error":null,"result":{}}"#,
    r#"{"error":null,"error":{"code":1}}"#,
    r#"{"result":{"isError":true},"result":{}}"#,
    r#"{"result":{},"result":{"isError":true}}"#,
    r#"{"result":{"isError":true},"result":[]}"#,
    "",
    "   ",
];

#[test]
fn the_scan_says_what_a_full_parse_says() {
    for case in CASES {
        assert_eq!(
            scanned_every_way(case.as_bytes()),
            parsed(case.as_bytes()),
            "{case}"
        );
    }
}

/// A batch's answers (an array) are no one answer: a result. (serde reads a struct from an
/// array by position, so the full parse called `[{"jsonrpc":"2.0","result":{}}]` an error.)
#[test]
fn a_batch_answer_is_not_read_as_an_error() {
    assert_eq!(classify(br#"[{"error":{}}]"#), Outcome::Ok);
    assert_eq!(
        classify(br#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#),
        Outcome::Ok
    );
}

/// An escaped key is read as a client reads it: a tool that hides its failure behind
/// `is\u0045rror` is counted as failed.
#[test]
fn an_escaped_key_is_read_as_a_client_reads_it() {
    assert_eq!(
        classify(br#"{"result":{"is\u0045rror":true}}"#),
        Outcome::ToolError
    );
}

#[test]
fn a_large_answer_is_read_whole_and_a_failure_after_a_megabyte_is_seen() {
    let text = "x\\\"y".repeat(300_000);
    let message = format!(
        r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"type":"text","text":"{text}"}}],"isError":true}}}}"#
    );
    assert_eq!(parsed(message.as_bytes()), Outcome::ToolError);
    let mut s = AnswerScan::default();
    for piece in message.as_bytes().chunks(16 * 1024 + 3) {
        s.feed(piece);
    }
    assert_eq!(s.outcome(), Outcome::ToolError);
}

/// Deep nesting (beyond the 64 levels whose kind is tracked) neither panics nor confuses the
/// levels that matter.
#[test]
fn deep_nesting_is_read_without_harm() {
    let deep = format!(
        r#"{{"result":{{"a":{}1{},"isError":true}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    assert_eq!(classify(deep.as_bytes()), parsed(deep.as_bytes()));
    let closes = "}".repeat(10);
    assert_eq!(classify(closes.as_bytes()), Outcome::Ok);
}

#[test]
fn an_answer_without_an_error_key_in_its_bytes_is_a_result() {
    // The relay classifies a small answer held whole only if `rror"` or `\u` occurs in it
    // (every key the scan looks at ends so, or spells a letter with a `\u` escape): without
    // either, the scan must say Ok, whatever else the bytes hold.
    let answers = [
        r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#,
        r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"x"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"result":{"isErr\u006fr":true}}"#,
        r#"{"jsonrpc":"2.0","id":1,"e\u0072ror":{"code":1}}"#,
        r#"{"jsonrpc":"2.0","id":1,"result":{"t":"no error\" here","isError":false}}"#,
        r#"[{"error":1}]"#,
        r#"{"error":null,"result":{"isError":true}}"#,
    ];
    for answer in answers {
        // Every answer with one byte of it changed or dropped.
        for i in 0..answer.len() {
            for variant in [
                [&answer.as_bytes()[..i], b"x", &answer.as_bytes()[i + 1..]].concat(),
                [&answer.as_bytes()[..i], &answer.as_bytes()[i + 1..]].concat(),
                [&answer.as_bytes()[..i], b"\\", &answer.as_bytes()[i..]].concat(),
            ] {
                if memchr::memmem::find(&variant, b"rror\"").is_none()
                    && memchr::memmem::find(&variant, b"\\u").is_none()
                {
                    assert_eq!(
                        classify(&variant),
                        Outcome::Ok,
                        "{}",
                        String::from_utf8_lossy(&variant)
                    );
                }
            }
        }
    }
}

#[test]
fn an_answer_is_an_object_with_a_result_or_an_error() {
    use super::scan;
    for yes in [
        r#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
        r#"{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"x"}}"#,
        r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"r\u0065sult":{}}"#,
    ] {
        assert!(scan(yes.as_bytes()).is_answer(), "{yes}");
    }
    for no in [
        "",
        r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{}}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
        r#"{"jsonrpc":"2.0","id":1,"error":null}"#,
        r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#,
        r#"{"jsonrpc":"2.0","id":1,"result":{}"#,
    ] {
        assert!(!scan(no.as_bytes()).is_answer(), "{no}");
    }
}

/// A large answer is relayed as it comes, read before each piece goes out: one whose top level
/// names another id than its request's (or one twice, or one a client's parser reads as `id`)
/// never reaches the client whole, at whatever byte its pieces are cut.
#[test]
fn an_answer_to_another_request_is_seen_before_it_ends() {
    use serde_json::json;
    let seven = Answers::to(Some(&json!(7)));
    let named = Answers::to(Some(&json!("a\"b")));
    let long = "x".repeat(20_000);
    let cases: &[(&str, Answers, bool)] = &[
        (
            r#"{"jsonrpc":"2.0","id":7,"result":{"id":8}}"#,
            seven,
            false,
        ),
        (r#"{"jsonrpc":"2.0","result":{},"id":7}"#, seven, false),
        (r#"{ "id" : 7 , "result" : {} }"#, seven, false),
        (
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":1}}"#,
            seven,
            false,
        ),
        (r#"{"jsonrpc":"2.0","result":{}}"#, seven, false),
        (r#"{"jsonrpc":"2.0","id":"a\"b","result":{}}"#, named, false),
        (
            r#"{"jsonrpc":"2.0","id":8,"result":{"tools":[]}}"#,
            seven,
            true,
        ),
        // A server that echoes the id as a string: the same request to a client.
        (r#"{"jsonrpc":"2.0","id":"7","result":{}}"#, seven, false),
        (r#"{"jsonrpc":"2.0","id":"07","result":{}}"#, seven, true),
        (r#"{"jsonrpc":"2.0","id":7.0,"result":{}}"#, seven, true),
        (
            r#"{"jsonrpc":"2.0","id":7,"result":{},"id":8}"#,
            seven,
            true,
        ),
        (
            r#"{"jsonrpc":"2.0","id":7,"result":{},"ID":7}"#,
            seven,
            true,
        ),
        (r#"{"jsonrpc":"2.0","Id":8,"result":{}}"#, seven, true),
        // Dotless and dotted i, and the long s, as Go reads them.
        (
            r#"{"jsonrpc":"2.0","id":7,"result":{},"ıd":8}"#,
            seven,
            true,
        ),
        (
            r#"{"jsonrpc":"2.0","id":7,"result":{},"\u0130D":8}"#,
            seven,
            true,
        ),
        (r#"{"jsonrpc":"2.0","ıd":8,"reſult":{}}"#, seven, true),
        (r#"{"jsonrpc":"2.0","i\u0064":8,"result":{}}"#, seven, true),
        (r#"{"jsonrpc":"2.0","id":{"n":7},"result":{}}"#, seven, true),
        (
            r#"{"jsonrpc":"2.0","id":7,"result":{}}"#,
            Answers::Nothing,
            true,
        ),
        // An array: answers to many requests, a batch's alone (it named a pending
        // `tools/list`, and the TypeScript SDK's client took it; an attacker's review).
        (
            r#"[{"jsonrpc":"2.0","id":8,"result":{"tools":[]}},{"jsonrpc":"2.0","id":7,"result":{}}]"#,
            seven,
            true,
        ),
        (r#"[{"jsonrpc":"2.0","id":7,"result":{}}]"#, seven, true),
        (
            r#"[{"jsonrpc":"2.0","id":7,"result":{}}]"#,
            Answers::Any,
            false,
        ),
        (r#" "not an answer" "#, seven, true),
    ];
    let long_id = format!(r#"{{"id":"{long}","result":{{}}}}"#);
    // A long id a client chose is read whole (300 characters were refused at 256 bytes).
    let fair = "y".repeat(300);
    let fair_id = format!(r#"{{"id":"{fair}","result":{{}}}}"#);
    let cases = cases
        .iter()
        .map(|(m, a, another)| ((*m).to_owned(), *a, *another))
        .chain([
            (long_id, Answers::to(Some(&json!(long))), true),
            (fair_id, Answers::to(Some(&json!(fair))), false),
        ]);
    for (message, answers, another) in cases {
        let bytes = message.as_bytes();
        for at in 0..=bytes.len() {
            let mut s = AnswerScan::default();
            s.feed(&bytes[..at]);
            let early = s.answers_another(answers);
            // A verdict kept for one rule is not given for another.
            let _ = s.answers_another(Answers::Nothing);
            s.feed(&bytes[at..]);
            let _ = s.answers_another(Answers::Nothing);
            assert_eq!(
                s.answers_another(answers),
                another,
                "{message} split at {at}"
            );
            assert!(!early || another, "{message}: judged another at {at}");
        }
    }
}
