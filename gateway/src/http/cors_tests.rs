use super::*;

#[test]
fn an_allowed_origin_is_echoed_with_what_a_browser_client_must_read() {
    let cors = Cors::default();
    let lines = String::from_utf8(cors.response_lines("https://app.example").unwrap()).unwrap();
    assert!(lines.contains("access-control-allow-origin: https://app.example\r\n"));
    assert!(lines.contains("vary: origin\r\n"));
    assert!(lines.contains("mcp-session-id"));
    assert!(!lines.contains("allow-credentials"));
}

#[test]
fn a_preflight_lists_the_mcp_headers_and_the_configured_ones() {
    let cors = Cors {
        allow_headers: vec!["x-api-key".into()],
        allow_credentials: true,
        ..Cors::default()
    };
    let out = String::from_utf8(cors.preflight(Some("https://app.example"), true)).unwrap();
    assert!(out.starts_with("HTTP/1.1 204 "), "{out}");
    let head = out.split("\r\n\r\n").next().unwrap();
    for want in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-methods: GET, POST, DELETE",
        "mcp-protocol-version",
        "x-api-key",
        "access-control-max-age: 600",
        "access-control-allow-credentials: true",
    ] {
        assert!(head.contains(want), "{want} missing in {head}");
    }
    let bare = String::from_utf8(cors.preflight(None, true)).unwrap();
    assert!(!bare.contains("access-control-"), "{bare}");
}

#[test]
fn a_header_name_that_would_break_the_head_is_refused_not_written() {
    let cors = Cors {
        expose_headers: vec!["x-a\r\nset-cookie: s=1".into()],
        ..Cors::default()
    };
    assert!(cors.response_lines("https://app.example").is_err());
}

#[test]
fn lines_go_after_the_status_line() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec();
    let out = with_lines(head, b"vary: origin\r\n");
    assert_eq!(
        out,
        b"HTTP/1.1 200 OK\r\nvary: origin\r\ncontent-length: 2\r\n\r\n{}".to_vec()
    );
}
