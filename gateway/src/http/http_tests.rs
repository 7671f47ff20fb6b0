use super::*;

fn h(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn framing_rejects_smuggling_shapes() {
    let max = 1000;
    assert_eq!(
        framing(&h(&[("Content-Length", "5")]), max),
        Ok(Some(BodyKind::Length(5)))
    );
    assert_eq!(
        framing(&h(&[("transfer-encoding", "chunked")]), max),
        Ok(Some(BodyKind::Chunked))
    );
    assert_eq!(framing(&h(&[]), max), Ok(None));
    assert_eq!(
        framing(&h(&[("Content-Length", " 07\t")]), max),
        Ok(Some(BodyKind::Length(7)))
    );
    for bad in [
        h(&[("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
        h(&[("Content-Length", "5"), ("Content-Length", "6")]),
        h(&[("Content-Length", "-1")]),
        h(&[("Content-Length", "+5")]),
        h(&[("Content-Length", "5, 5")]),
        h(&[("Content-Length", "")]),
        h(&[("Content-Length", "5\u{a0}")]),
        h(&[("Content-Length", "\u{2003}5")]),
        h(&[("Content-Length", "99999999999999999999999")]),
    ] {
        assert!(
            matches!(framing(&bad, max), Err(HttpError::BadRequest(_))),
            "{bad:?}"
        );
    }
    assert_eq!(
        framing(&h(&[("Content-Length", "5"), ("content-length", "5")]), max),
        Ok(Some(BodyKind::Length(5)))
    );
    for coding in ["gzip", "gzip, chunked", "chunked, gzip", "identity"] {
        assert_eq!(
            framing(&h(&[("Transfer-Encoding", coding)]), max),
            Err(HttpError::UnsupportedCoding),
            "{coding}"
        );
    }
    assert_eq!(
        framing(
            &h(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ]),
            max
        ),
        Err(HttpError::UnsupportedCoding)
    );
    assert_eq!(
        framing(&h(&[("Content-Length", "1001")]), max),
        Err(HttpError::BodyTooLarge(1000))
    );
    // The fields are read in their order: of two faults, the first one's error.
    assert_eq!(
        framing(
            &h(&[("Transfer-Encoding", "gzip"), ("Content-Length", "x")]),
            max
        ),
        Err(HttpError::UnsupportedCoding)
    );
    assert_eq!(
        framing(
            &h(&[("Content-Length", "x"), ("Transfer-Encoding", "gzip")]),
            max
        ),
        Err(HttpError::BadRequest("invalid Content-Length"))
    );
    // Names of the same length, first and last letters (the same key) are other fields.
    assert_eq!(
        framing(
            &h(&[
                ("content_length", "x"),
                ("Content-Lxngth", "9"),
                ("transfer_encoding", "gzip"),
                ("content-length", "3")
            ]),
            max
        ),
        Ok(Some(BodyKind::Length(3)))
    );
}

/// Every entry of the sets of names the gateway decides on is found in any case, and a name of
/// the same key (a length past 65,535 wraps in it) is not.
#[test]
fn the_sets_of_names_find_every_spelling_and_nothing_else() {
    for name in SINGLE_NAMES {
        for spelled in [name.to_owned(), name.to_uppercase(), title_case(name)] {
            assert!(is_single(&spelled), "{spelled}");
        }
    }
    assert!(is_single("Mcp-Anything"));
    for name in NOT_FORWARDED_NAMES {
        for spelled in [name.to_owned(), name.to_uppercase(), title_case(name)] {
            assert!(NOT_FORWARDED.contains(&spelled), "{spelled}");
        }
    }
    let long_te = format!("t{}e", "x".repeat(65_536));
    let long_empty = format!("\0{}\0", "x".repeat(65_534));
    for other in [
        long_te.as_str(),
        long_empty.as_str(),
        "hosT ",
        "h0st",
        "x-real-iq",
        "\u{17f}et-cookie",
        "conneKtion",
        "connection\u{0}",
    ] {
        assert!(
            !NOT_FORWARDED.contains(other) && !is_single(other),
            "{other:?}"
        );
    }
}

fn title_case(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[test]
fn chunked_decoder_handles_any_split() {
    let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
    for split in 0..wire.len() {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let (used1, done1) = d.decode(&wire[..split], &mut out).unwrap();
        assert!(!done1 || split >= wire.len() - 4);
        let mut rest = wire[used1..].to_vec();
        let (used2, done2) = if done1 {
            (0, true)
        } else {
            d.decode(&rest, &mut out).unwrap()
        };
        assert!(done2, "split at {split}");
        rest.drain(..used2);
        assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "split at {split}");
        assert_eq!(
            rest, b"NEXT",
            "split at {split}: the next request is left alone"
        );
    }
}

/// Feeds `pieces` to a chunked decoder as a connection does (unused bytes presented again with
/// the next piece): what it decoded, and whether the body ended.
fn decode_in_pieces<'a>(
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(Vec<u8>, bool), crate::http::HttpError> {
    let mut d = ChunkedDecoder::default();
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for p in pieces {
        pending.extend_from_slice(p);
        let (used, done) = d.decode(&pending, &mut out)?;
        pending.drain(..used);
        if done {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}

#[test]
fn chunked_decoder_rejects_garbage() {
    for wire in [&b"zz\r\n"[..], b"4\r\nWikiXX", b"fffffffffffffffffffff\r\n"] {
        let mut d = ChunkedDecoder::default();
        assert!(
            d.decode(wire, &mut Vec::new()).is_err(),
            "{:?}",
            String::from_utf8_lossy(wire)
        );
    }
}

/// Lines httparse accepts but a proxy in front may end or read otherwise are refused, whole or
/// in pieces: no size, a bare LF or CR in an extension or a trailer, a trailer that is not a
/// field line. Lines RFC 9112 allows are still accepted.
#[test]
fn chunked_decoder_refuses_ambiguous_lines() {
    let decode = |wire: &[u8], cut: usize| {
        decode_in_pieces([&wire[..cut], &wire[cut..]]).map(|(out, _)| out)
    };
    let refused: [&[u8]; 9] = [
        b"\r\n",
        b" \r\n\r\n",
        b";x\r\n\r\n",
        b"4;a\nb\r\nWiki\r\n0\r\n\r\n",
        b"4;a\rb\r\nWiki\r\n0\r\n\r\n",
        b"4;a\x00\r\nWiki\r\n0\r\n\r\n",
        b"4\r\nWiki\r\n0\r\nx: 1\nGET / HTTP/1.1\r\n\r\n",
        b"4\r\nWiki\r\n0\r\nnot a field\r\n\r\n",
        b"4\r\nWiki\r\n0\r\n: empty name\r\n\r\n",
    ];
    for wire in refused {
        for cut in 0..=wire.len() {
            assert!(
                decode(wire, cut).is_err(),
                "{:?} cut at {cut}",
                String::from_utf8_lossy(wire)
            );
        }
    }
    let accepted: [&[u8]; 4] = [
        b"4\r\nWiki\r\n0\r\n\r\n",
        b"4 ;ext=\"q v\"\r\nWiki\r\n0\r\n\r\n",
        b"4;a\tb\r\nWiki\r\n0;last\r\nx-t: v\tw\r\nx-u:\r\n\r\n",
        b"0004\r\nWiki\r\n000\r\n\r\n",
    ];
    for wire in accepted {
        for cut in 0..=wire.len() {
            assert_eq!(
                decode(wire, cut).map_err(|e| e.to_string()).as_deref(),
                Ok(&b"Wiki"[..]),
                "{:?} cut at {cut}",
                String::from_utf8_lossy(wire)
            );
        }
    }
}

/// Chunk extensions and trailers are read and dropped: 16 KiB of them per body, whole or in
/// pieces; a body of one-byte chunks cannot carry a KiB of them per byte.
#[test]
fn chunked_decoder_bounds_extensions_and_trailers() {
    let decode = |wire: &[u8], piece: usize| decode_in_pieces(wire.chunks(piece));
    let extensions = |n: usize| {
        let mut w = format!("1;{}\r\nx\r\n", "e".repeat(98)).repeat(n);
        w.push_str("0\r\n\r\n");
        w.into_bytes()
    };
    let trailers = |n: usize| {
        format!(
            "1\r\nx\r\n0\r\n{}\r\n",
            format!("x-t: {}\r\n", "v".repeat(95)).repeat(n)
        )
        .into_bytes()
    };
    for piece in [1, 7, 4096, usize::MAX] {
        assert_eq!(
            decode(&extensions(160), piece).unwrap(),
            (vec![b'x'; 160], true)
        );
        assert!(decode(&extensions(170), piece).is_err(), "piece {piece}");
        assert_eq!(
            decode(&trailers(160), piece).unwrap(),
            (b"x".to_vec(), true)
        );
        assert!(decode(&trailers(170), piece).is_err(), "piece {piece}");
    }
}

/// A size line or trailer line over its limit is refused whether it arrives whole or in
/// pieces, and one at its limit is accepted either way (the fuzz target `chunked` found a long
/// extension refused in pieces but accepted whole).
#[test]
fn chunked_decoder_limits_lines_however_they_arrive() {
    let decode = |wire: &[u8], cut: usize| {
        decode_in_pieces([&wire[..cut], &wire[cut..]]).map(|(out, done)| {
            assert!(done, "the whole body is there");
            out
        })
    };
    // "4;" + extension + CRLF: the line is `len` bytes.
    let size_line = |len: usize| {
        let mut w = b"4;".to_vec();
        w.resize(len - 2, b'x');
        w.extend_from_slice(b"\r\nWiki\r\n0\r\n\r\n");
        w
    };
    // A trailer line of `len` bytes.
    let trailer = |len: usize| {
        let mut w = b"4\r\nWiki\r\n0\r\nx-t: ".to_vec();
        w.resize(w.len() + len - 7, b'y');
        w.extend_from_slice(b"\r\n\r\n");
        w
    };
    for (wire, limit) in [
        (size_line(1024), true),
        (size_line(1025), false),
        (trailer(8 * 1024), true),
        (trailer(8 * 1024 + 1), false),
    ] {
        for cut in [
            wire.len(),
            1,
            3,
            600,
            1023,
            1024,
            1025,
            8000,
            8191,
            8192,
            8193,
        ] {
            let cut = cut.min(wire.len());
            let got = decode(&wire, cut);
            assert_eq!(
                got.is_ok(),
                limit,
                "{} bytes cut at {cut}: {got:?}",
                wire.len()
            );
            if let Ok(out) = got {
                assert_eq!(out, b"Wiki");
            }
        }
    }
}

#[test]
fn response_frames_its_body() {
    let r = response(404, &[("content-type", "application/json")], b"{}", false);
    assert_eq!(
        String::from_utf8(r).unwrap(),
        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    );
}

fn request(minor: u8, target: &str, pairs: &[(&str, &str)]) -> Request {
    Request {
        method: "POST".into(),
        target: target.into(),
        minor,
        headers: h(pairs),
        body: bytes::Bytes::new(),
        keep_alive: true,
    }
}

fn checked(minor: u8, target: &str, pairs: &[(&str, &str)]) -> Result<bool, HttpError> {
    let mut req = request(minor, target, pairs);
    check_head(&mut req).map(|()| req.keep_alive)
}

#[test]
fn every_connection_line_counts() {
    let host = ("host", "gw");
    assert_eq!(checked(1, "/mcp", &[host]), Ok(true));
    assert_eq!(
        checked(
            1,
            "/mcp",
            &[host, ("connection", "keep-alive"), ("connection", "close")]
        ),
        Ok(false),
        "keep-alive then close: closed"
    );
    assert_eq!(
        checked(1, "/mcp", &[host, ("Connection", "x, Close")]),
        Ok(false)
    );
    assert_eq!(
        checked(0, "/mcp", &[]),
        Ok(false),
        "HTTP/1.0 closes by default"
    );
    assert_eq!(
        checked(0, "/mcp", &[("connection", "keep-alive")]),
        Ok(false),
        "HTTP/1.0 closes even when asked to keep the connection"
    );
    assert_eq!(
        checked(
            0,
            "/mcp",
            &[("connection", "keep-alive"), ("connection", "close")]
        ),
        Ok(false)
    );
    let headers = h(&[("connection", "keep-alive"), ("connection", "x-secret")]);
    assert!(has_connection_option(&headers, "X-Secret"));
    assert!(!has_connection_option(&headers, "x-other"));
    // A connection option naming a field the gateway decides on would drop it after the check.
    for named in [
        "mcp-protocol-version",
        "Mcp-Name",
        "content-type",
        "traceparent",
    ] {
        assert!(
            matches!(
                checked(
                    1,
                    "/mcp",
                    &[host, ("connection", "close"), ("connection", named)]
                ),
                Err(HttpError::BadRequest(_))
            ),
            "{named}"
        );
    }
}

#[test]
fn host_must_be_one_valid_value() {
    assert!(matches!(
        checked(1, "/mcp", &[]),
        Err(HttpError::BadRequest(_))
    ));
    assert_eq!(checked(0, "/mcp", &[]), Ok(false), "HTTP/1.0 may omit Host");
    assert_eq!(
        checked(1, "/mcp", &[("host", "a"), ("Host", "a")]),
        Err(HttpError::DuplicateField("host".into()))
    );
    for good in [
        "gw",
        "gw:8080",
        "127.0.0.1:1",
        "[::1]",
        "[2001:db8::1]:443",
        "mcp.example.com",
        "a_b-c~d",
    ] {
        assert!(is_valid_host(good.as_bytes()), "{good}");
        assert_eq!(checked(1, "/mcp", &[("host", good)]), Ok(true), "{good}");
    }
    for bad in [
        "",
        "gw:",
        "gw:99999",
        "gw:80:80",
        "gw:+80",
        "a\"b",
        "evil.example/x",
        "a b",
        "user@gw",
        "[::1",
        "[zz]",
        "[::1]x",
        "gw\", error=\"x",
        "%41",
        "ü.example",
    ] {
        assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        assert_eq!(
            checked(1, "/mcp", &[("host", bad)]),
            Err(HttpError::BadRequest("invalid Host header")),
            "{bad}"
        );
    }
}

#[test]
fn mcp_and_other_deciding_fields_may_not_repeat() {
    let host = ("host", "gw");
    for name in [
        "Mcp-Name",
        "mcp-session-id",
        "MCP-Protocol-Version",
        "mcp-method",
        "mcp-run-id",
        "content-type",
        "authorization",
        "x-api-key",
        "traceparent",
        "origin",
    ] {
        assert_eq!(
            checked(1, "/mcp", &[host, (name, "a"), ("x", "y"), (name, "b")]),
            Err(HttpError::DuplicateField(name.to_ascii_lowercase())),
            "{name}"
        );
    }
    // List fields may be split over lines.
    assert_eq!(
        checked(1, "/mcp", &[host, ("accept", "a/b"), ("accept", "c/d")]),
        Ok(true)
    );
}

#[test]
fn http_1_0_with_transfer_encoding_is_refused() {
    assert!(matches!(
        checked(
            0,
            "/mcp",
            &[
                ("transfer-encoding", "chunked"),
                ("connection", "keep-alive")
            ]
        ),
        Err(HttpError::BadRequest(_))
    ));
    assert_eq!(
        checked(
            1,
            "/mcp",
            &[("host", "gw"), ("transfer-encoding", "chunked")]
        ),
        Ok(true)
    );
}

#[test]
fn access_token_in_the_query_is_refused() {
    let host = [("host", "gw")];
    for target in [
        "/mcp?access_token=abc",
        "/mcp?x=1&access_token=abc",
        "/mcp?x=1;access_token",
        "/mcp?ACCESS_TOKEN=abc",
        "/mcp?access%5Ftoken=abc",
        "/mcp?%61ccess_token=abc",
        "/mcp?access_token[]=abc",
        "/mcp?access_token%5B0%5D=abc",
        "/mcp?access.token=abc",
        "/mcp?access+token=abc",
        "/mcp?%20access_token=abc",
        "/mcp?+access_token=abc",
        "/mcp?access[token=abc",
        "/mcp?access_token%00x=abc",
    ] {
        assert!(
            matches!(checked(1, target, &host), Err(HttpError::TokenInQuery)),
            "{target}"
        );
    }
    for target in [
        "/mcp",
        "/mcp?x=access_token",
        "/mcp?access_tokens=1",
        "/mcp?access_tokens[]=1",
        "/mcp?accessXtoken=1",
        "/mcp?a=%",
    ] {
        assert_eq!(checked(1, target, &host), Ok(true), "{target}");
    }
}

#[test]
fn control_characters_in_a_received_field_are_refused() {
    for value in ["a\rb", "a\nb", "a\0b", "a\x7fb", "a\x0bb"] {
        assert_eq!(
            checked(1, "/mcp", &[("host", "gw"), ("x-thing", value)]),
            Err(HttpError::BadRequest("invalid header field")),
            "{value:?}"
        );
    }
    assert_eq!(
        checked(1, "/mcp", &[("host", "gw"), ("x-thing", "a\tb ü")]),
        Ok(true)
    );
}

#[test]
fn no_field_with_a_control_character_is_ever_written() {
    let mut out = b"kept".to_vec();
    for value in ["a\r\nb", "a\nb", "a\rb", "\0", "\x1b[31m", "\x7f"] {
        assert_eq!(
            push_field(&mut out, "x-thing", value.as_bytes()),
            Err(UnsafeField {
                name: "x-thing".into()
            }),
            "{value:?}"
        );
    }
    for name in ["", "a b", "a:b", "a\r\nb"] {
        assert!(push_field(&mut out, name, b"v").is_err(), "{name:?}");
    }
    assert_eq!(out, b"kept", "nothing of a refused field is written");
    push_field(&mut out, "x-thing", b"a\tb \xc3\xbc").unwrap();
    assert_eq!(out, b"keptx-thing: a\tb \xc3\xbc\r\n");
    let mut line = Vec::new();
    assert!(push_request_line(&mut line, "POST", "/mcp?a=1\r\nx: y").is_err());
    assert!(push_request_line(&mut line, "POST", "/mcp x").is_err());
    assert!(push_request_line(&mut line, "PO ST", "/mcp").is_err());
    push_request_line(&mut line, "POST", "/mcp?a=1").unwrap();
    assert_eq!(line, b"POST /mcp?a=1 HTTP/1.1\r\n");
}

#[test]
fn a_response_with_an_unsafe_header_becomes_a_500_that_closes() {
    let r = response(
        401,
        &[("www-authenticate", "Bearer x\r\nset-cookie: a=b")],
        b"{}",
        true,
    );
    let text = String::from_utf8(r).unwrap();
    assert!(text.starts_with("HTTP/1.1 500 "), "{text}");
    assert!(!text.contains("set-cookie"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
}

/// CGI-style servers (WSGI, PHP) read `_` and `-` in a field name as one: `Mcp_Method` or
/// `X_Api_Key` would stand for a field the gateway decides on, unchecked. Another name with `_`
/// passes.
#[test]
fn an_underscore_spelling_of_a_deciding_field_is_refused() {
    for name in [
        "mcp_method",
        "Mcp_Name",
        "mcp_param_region",
        "x_api_key",
        "content_type",
        "Mcp_Session-Id",
    ] {
        assert!(
            checked(1, "/mcp", &[("host", "gw"), (name, "x")]).is_err(),
            "{name}"
        );
    }
    assert_eq!(
        checked(1, "/mcp", &[("host", "gw"), ("x_custom_thing", "x")]),
        Ok(true)
    );
}

#[test]
fn only_whole_empty_lines_before_a_request_line_are_taken_off() {
    assert_eq!(leading_empty_lines(b"\r\n\n\r\nPOST / HTTP/1.1\r\n"), 5);
    assert_eq!(leading_empty_lines(b"POST / HTTP/1.1\r\n"), 0);
    // A CR whose LF has not come yet waits; a CR without one is left for the parser.
    assert_eq!(leading_empty_lines(b"\n\r"), 1);
    assert_eq!(leading_empty_lines(b"\rPOST"), 0);
    assert_eq!(leading_empty_lines(b""), 0);
}

/// A line ended by LF alone is refused wherever it is in the head; CRLF heads parse.
#[test]
fn a_head_line_ended_by_a_bare_lf_is_refused() {
    let limits = Limits::default();
    let parse =
        |head: &[u8]| parse_head(head, &mut HeadEnd::default(), &limits).map(|r| r.is_some());
    assert_eq!(
        parse(b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\r\n"),
        Ok(true)
    );
    for head in [
        &b"POST /mcp HTTP/1.1\nhost: gw\r\ncontent-length: 0\r\n\r\n"[..],
        b"POST /mcp HTTP/1.1\r\nhost: gw\nx: y\r\ncontent-length: 0\r\n\r\n",
        b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\n",
        b"POST /mcp HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\n\r\n",
        b"GET / HTTP/1.1\nhost: gw\n\n",
    ] {
        assert_eq!(
            parse(head),
            Err(HttpError::BadRequest(
                "a line of the head ends in LF without CR"
            )),
            "{:?}",
            String::from_utf8_lossy(head)
        );
    }
}

/// An upstream's status keeps its registered reason phrase, or none: a 409 was relayed as
/// `409 Unknown`.
#[test]
fn a_status_line_has_the_registered_reason_or_none() {
    for (status, line) in [
        (200, "HTTP/1.1 200 OK\r\n"),
        (409, "HTTP/1.1 409 Conflict\r\n"),
        (503, "HTTP/1.1 503 Service Unavailable\r\n"),
        (299, "HTTP/1.1 299 \r\n"),
    ] {
        let mut out = Vec::new();
        push_status_line(&mut out, status);
        assert_eq!(String::from_utf8_lossy(&out), line);
    }
}

/// A chunk's size line is its length in lowercase hex, as `{:x}` writes it.
#[test]
fn chunk_size_line_is_hex() {
    for len in [
        1usize,
        9,
        10,
        15,
        16,
        255,
        256,
        4095,
        65_536,
        1_000_075,
        usize::MAX >> 4,
    ] {
        let mut out = Vec::new();
        outgoing::push_chunk_line(&mut out, len);
        assert_eq!(out, format!("{len:x}\r\n").into_bytes(), "{len}");
    }
    assert_eq!(chunk(b"abc"), b"3\r\nabc\r\n");
    assert!(chunk(b"").is_empty());
}

/// Optional white space is spaces and tabs only, at either end; a path ends at the first `?`.
#[test]
fn ows_and_path_cut_at_ascii_only() {
    assert_eq!(ows(" \t a b \t "), "a b");
    assert_eq!(ows("\u{a0}x\u{a0}"), "\u{a0}x\u{a0}");
    assert_eq!(ows(" \t "), "");
    assert_eq!(ows(""), "");
    assert_eq!(ows("é "), "é");
    let req = |target: &str| Request {
        method: "POST".into(),
        target: target.into(),
        minor: 1,
        headers: Fields::default(),
        body: bytes::Bytes::new(),
        keep_alive: true,
    };
    assert_eq!(req("/mcp?a=b?c").path(), "/mcp");
    assert_eq!(req("/mcp").path(), "/mcp");
    assert_eq!(req("?x").path(), "");
    assert_eq!(req("/é?").path(), "/é");
}

/// Every name of [`SINGLE`] is noted (its repeats are found by the index, not a scan), and the
/// noted single names are the single ones among the noted.
#[test]
fn single_fields_are_noted() {
    use super::FieldName;
    for n in super::fields::Noted::all() {
        assert_eq!(
            super::SINGLE_NOTED.contains(&n),
            super::SINGLE.contains(n.text()),
            "{}",
            n.text()
        );
    }
    assert_eq!(super::SINGLE_NOTED.len(), super::SINGLE_NAMES.len());
}
