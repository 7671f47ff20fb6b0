use super::*;
use crate::mcp::jsonrpc::{Parsed, Parser};

const SMALL: Elision = Elision {
    from: 0,
    long_run: 8,
};

fn copy(body: &str) -> (String, bool) {
    let mut out = Vec::new();
    let elided = SMALL.copy(body.as_bytes(), &mut out).expect("string text");
    (String::from_utf8(out).expect("UTF-8"), elided)
}

#[test]
fn a_long_run_of_a_value_is_marked_and_every_key_escape_and_short_run_kept() {
    let (out, elided) = copy(
        r#"{"id":1,"longlonglongkey":"0123456789","v":["short","abcdefghij\nklmnopqrstuvwxyz\u00e9!"]}"#,
    );
    assert!(elided);
    assert_eq!(
        out,
        r#"{"id":1,"longlonglongkey":"\u0000","v":["short","\u0000\n\u0000\u00e9!"]}"#
    );
}

#[test]
fn a_body_without_a_long_value_run_is_copied_as_it_is() {
    let body = r#"{"key with a long run":"short","a":"x\"y\\z"}"#;
    assert_eq!(copy(body), (body.to_owned(), false));
}

#[test]
fn a_run_left_out_must_be_string_text() {
    let mut out = Vec::new();
    assert!(SMALL.copy(b"{\"a\":\"0123456789\x01\"}", &mut out).is_err());
    out.clear();
    assert!(SMALL.copy(b"{\"a\":\"0123456789\xff\"}", &mut out).is_err());
    // A control character in a key or a short run is left for the parser to refuse.
    out.clear();
    assert_eq!(SMALL.copy(b"{\"a\x01\":\"x\"}", &mut out), Ok(false));
}

#[test]
fn an_unclosed_string_or_a_cut_escape_is_copied_for_the_parser_to_refuse() {
    for body in [
        r#"{"a":"0123456789"#,
        r#"{"a":"0123456789\u12"#,
        r#"{"a":"x\"#,
    ] {
        let mut out = Vec::new();
        let _ = SMALL.copy(body.as_bytes(), &mut out);
        let mut parser = Parser::with_elision(SMALL);
        assert!(parser.parse_for(body.as_bytes(), false).is_err(), "{body}");
    }
}

/// The message read, or the refusal (its code, id and reason), is the body's own.
fn agrees(body: impl AsRef<[u8]>) {
    let body = body.as_ref();
    let whole = Parser::with_elision(Elision {
        from: usize::MAX,
        long_run: usize::MAX,
    })
    .parse_for(body, false);
    let copied = Parser::with_elision(SMALL).parse_for(body, false);
    assert_eq!(
        whole,
        copied,
        "{}: whole, then from the copy",
        String::from_utf8_lossy(body)
    );
}

#[test]
fn text_outside_ascii_is_left_out_when_valid_and_refused_as_the_body_is_when_not() {
    let (out, elided) = copy(r#"{"a":"ééééééé and a long run","b":"日本語のテキスト"}"#);
    assert!(elided);
    assert_eq!(out, r#"{"a":"\u0000","b":"\u0000"}"#);
    let call = |text: &[u8]| {
        [
            &br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"t":""#[..],
            text,
            br#""}}}"#,
        ]
        .concat()
    };
    for text in [
        // Invalid UTF-8 or a control character in a short run of a string with a long run,
        // or in the long run itself, or in a later string.
        &b"0123456789\n\xff"[..],
        b"0123456789\n\x01",
        b"\xe9\x80 and a long run",
        b"0123456789\x1f and more",
        b"0123456789\",\"u\":\"\x00",
        b"0123456789\",\"u\":\"\xc3",
        // Valid: a run of text outside ASCII, cut by an escape.
        "0123456789é\\nü and a long run".as_bytes(),
    ] {
        agrees(call(text));
    }
}

#[test]
fn a_message_read_from_the_copy_is_the_bodys_own() {
    let call = |params: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{params}}}"#)
    };
    for body in [
        call(r#"{"name":"echo","arguments":{"text":"a long argument, left out"}}"#),
        // Strings policy reads, with long runs: read again from the body.
        call(r#"{"name":"a-tool-name-with-a-long-run","arguments":{}}"#),
        call(r#"{"name":"echo","_meta":{"traceparent":"00-0123456789abcdef-01"}}"#),
        r#"{"jsonrpc":"2.0","id":"an id with a long run","method":"ping"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":1,"method":"a method with a long run"}"#.to_owned(),
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"long long long"}},{"jsonrpc":"2.0","id":2,"method":"tasks/get","params":{"taskId":"a long task id"}}]"#.to_owned(),
        // A run between a high surrogate and its low half: not a pair, in the body or the copy.
        call(r#"{"name":"echo","arguments":{"t":"\ud83dthe long run\ude00"}}"#),
        call(r#"{"name":"echo","arguments":{"t":"\ud83d\ude00 and a long run"}}"#),
        call(r#"{"name":"echo","arguments":{"t":"an escape cut: \uZZ and a long run"}}"#),
        // Duplicate keys, with long runs in their values.
        call(r#"{"name":"echo","arguments":{"t":"0123456789","t":"0123456789"}}"#),
        // Not JSON after a long run.
        call(r#"{"name":"echo","arguments":{"t":"0123456789" "u":1}}"#),
        call(r#"{"name":"echo","arguments":{"t":"0123456789"}"#),
        // Refused, with an id that lost a run in the copy (the refusal names the body's id).
        r#"{"jsonrpc":"2.0","id":"an id with a long run","method":"tools/call","params":[]}"#
            .to_owned(),
        // Refused for the name's length, not for what the copy would refuse first.
        call(r#"{"name":"a-tool-name-with-a-long-run-of-more-than-128-characters-a-tool-name-with-a-long-run-of-more-than-128-characters-a-tool-name-with-a-long-run","arguments":5}"#),
        // A string that holds U+0000 of its own.
        r#"{"jsonrpc":"2.0","id":"\u0000 and a long run","method":"ping"}"#.to_owned(),
    ] {
        agrees(&body);
    }
    let Ok(Parsed::Single(m)) = Parser::with_elision(SMALL).parse_for(
        call(r#"{"name":"a-tool-name-with-a-long-run","arguments":{}}"#).as_bytes(),
        false,
    ) else {
        panic!("a valid call");
    };
    assert_eq!(m.name.as_deref(), Some("a-tool-name-with-a-long-run"));
}

#[test]
fn a_default_parser_leaves_out_only_from_a_large_body() {
    let d = Elision::default();
    assert!(!d.applies(8 * 1024 - 1) && d.applies(8 * 1024));
    let text = "a".repeat(1 << 20);
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{"text":"{text}"}}}}}}"#
    );
    let mut out = Vec::new();
    assert_eq!(d.copy(body.as_bytes(), &mut out), Ok(true));
    assert!(out.len() < 200, "{} bytes", out.len());
    agrees(&body);
}

#[test]
fn a_body_of_many_escapes_or_strings_is_copied_as_it_is_once_the_searches_run_out() {
    // 40,000 escapes in one value with a long run at its end: more searches than allowed.
    let escapes = format!(r#"{{"a":"{}{}"}}"#, r"\n".repeat(40_000), "x".repeat(300));
    let mut out = Vec::new();
    assert_eq!(
        Elision::default().copy(escapes.as_bytes(), &mut out),
        Ok(false)
    );
    assert_eq!(out, escapes.as_bytes());
    // The same after a long run that was left out: that one stays left out.
    let body = format!(
        r#"{{"x":"{}","a":"{}{}"}}"#,
        "y".repeat(300),
        r"\n".repeat(40_000),
        "x".repeat(300)
    );
    out.clear();
    assert_eq!(Elision::default().copy(body.as_bytes(), &mut out), Ok(true));
    assert!(out.starts_with(br#"{"x":"\u0000","a":"\n\n"#));
    assert_eq!(out.len(), body.len() - 300 + MARK.len());
    agrees(&body);
}

/// `run_end` against a byte-by-byte reading, for a stop (or none) and an odd byte at every
/// place around the block edges of texts of many lengths.
/// Both compilations of `run_end` (the one this CPU gets and the baseline's) against a byte by
/// byte reading.
#[test]
fn run_end_finds_the_stop_and_reads_every_byte_before_it() {
    fn naive(text: &[u8]) -> (Option<usize>, bool) {
        let stop = text.iter().position(|&b| b == b'"' || b == b'\\');
        let plain = text[..stop.unwrap_or(text.len())]
            .iter()
            .all(|b| (0x20..0x80).contains(b));
        (stop, plain)
    }
    let run_end = |text: &[u8]| {
        let found = run_end(text);
        assert_eq!(found, run_end_in_blocks(text), "the baseline's");
        found
    };
    for len in [
        0usize, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 255, 256, 257, 1_000,
    ] {
        let base: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(run_end(&base), naive(&base), "{len}");
        for at in (0..len).step_by(7).chain(len.checked_sub(1)) {
            for odd in [b'"', b'\\', 0x00, 0x1f, 0x7f, 0x80, 0xc3, 0xff] {
                let mut text = base.clone();
                text[at] = odd;
                assert_eq!(run_end(&text), naive(&text), "{len} {at} {odd:#x}");
                // The odd byte after a stop is not read.
                if at > 0 {
                    text[at - 1] = b'"';
                    assert_eq!(run_end(&text), naive(&text), "{len} {at} {odd:#x} stopped");
                }
            }
        }
    }
}

#[test]
fn a_long_run_with_text_that_is_not_ascii_is_still_checked() {
    let mut out = Vec::new();
    // Valid UTF-8 beyond ASCII is left out like any text; a control character or a broken
    // sequence past the first block is refused.
    let text = format!("{}é{}", "a".repeat(100), "b".repeat(100));
    let body = format!(r#"{{"a":"{text}"}}"#);
    assert!(SMALL.copy(body.as_bytes(), &mut out).expect("text"));
    for odd in [b'\x01', b'\xff'] {
        let mut body = format!(r#"{{"a":"{}"}}"#, "a".repeat(300)).into_bytes();
        body[200] = odd;
        out.clear();
        assert!(SMALL.copy(&body, &mut out).is_err(), "{odd:#x}");
    }
}
