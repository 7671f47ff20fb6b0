//! What the gateway writes into the heads it sends upstream and to clients.

use super::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn traceparent_is_validated_whole_and_never_trimmed() {
    assert_eq!(trace_id(TP), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    let smuggle = format!(
        "{TP}-\r\ncontent-length: 0\r\n\r\nPOST /mcp HTTP/1.1\r\nhost: u\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    for bad in [
        smuggle.as_str(),
        &format!("{TP}-"),
        &format!("{TP}-01"),
        &format!(" {TP}"),
        &format!("{TP} "),
        &format!("{TP}\r\n"),
        &format!("{TP}\t"),
        &TP.to_uppercase(),
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "",
    ] {
        assert_eq!(trace_id(bad), None, "{bad:?}");
    }
}

pub(crate) fn upstream() -> Upstream {
    Upstream {
        name: "u".into(),
        url: "http://127.0.0.1:9/mcp".into(),
        replicas: std::sync::Arc::new(crate::endpoints::Replicas::new(
            vec![crate::endpoints::Addresses::resolve_now("127.0.0.1", 9, Duration::ZERO).unwrap()],
            crate::endpoints::Ejection {
                after_failures: 5,
                base: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
        )),
        authority: "127.0.0.1:9".into(),
        tls: None,
        key: 0,
        path: "/mcp".into(),
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(1),
        stream_idle_timeout: Duration::from_secs(1),
        authorization: Some("Bearer up".into()),
        max_idle: 1,
        idle_reuse: Duration::from_secs(4),
        breaker: None,
        stdio: None,
        era: crate::config::UpstreamEra::Auto,
        held_session: crate::config::HeldScope::Tenant,
        closing_cancels: false,
        relay_headers: crate::http::relayed::Relayed::default(),
    }
}

fn client_request(headers: &[(&str, &str)]) -> Request {
    Request {
        method: "POST".into(),
        target: "/mcp?x=1".into(),
        minor: 1,
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body: bytes::Bytes::from_static(b"{}"),
        keep_alive: true,
    }
}

#[test]
fn a_value_from_a_message_never_adds_a_line_to_the_upstream_head() {
    let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let req = client_request(&[("host", "gw"), ("content-type", "application/json")]);
    let up = upstream();
    let ok = upstream_request(&req, peer, &up, &req.body, &[("traceparent", Some(TP))]).unwrap();
    let text = String::from_utf8(ok.to_vec()).unwrap();
    assert!(
        text.starts_with("POST /mcp?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("\r\ntraceparent: {TP}\r\n")),
        "{text}"
    );
    assert!(text.ends_with("content-length: 2\r\n\r\n{}"), "{text}");
    for (name, value) in [
        (
            "traceparent",
            "x\r\ncontent-length: 0\r\n\r\nPOST /mcp HTTP/1.1",
        ),
        ("mcp-name", "echo\r\nx: y"),
        ("mcp-name", "echo\nx: y"),
        ("mcp-name", "echo\rx"),
        ("mcp-name", "echo\0"),
        ("mcp-session-id", "s\x0b"),
    ] {
        let Err(e) = upstream_request(&req, peer, &up, &req.body, &[(name, Some(value))]) else {
            panic!("{name}: {value:?} was written into the head");
        };
        assert_eq!(e.name, name);
        let rpc = RpcError::from(e);
        assert_eq!((rpc.code, rpc.http_status), (error::INVALID_REQUEST, 400));
    }
}

#[test]
fn every_connection_line_names_hop_by_hop_fields() {
    let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let req = client_request(&[
        ("host", "gw"),
        ("connection", "keep-alive"),
        ("connection", "x-second"),
        ("x-second", "dropped"),
        ("x-kept", "kept"),
    ]);
    let text = String::from_utf8(
        upstream_request(&req, peer, &upstream(), &req.body, &[])
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(!text.contains("x-second"), "{text}");
    assert!(text.contains("x-kept: kept\r\n"), "{text}");
}

/// `Mcp-Method`, `Mcp-Name` and `Mcp-Param-*` repeat the body for routers, and are checked
/// against it only in 2026-07-28: on an older request they are not sent on (a router behind
/// the gateway would act on a `Mcp-Name: delete_repo` no rule saw, beside a body calling
/// `search`).
#[test]
fn mirror_headers_reach_the_upstream_only_where_they_were_checked() {
    let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let head = |version: &str| {
        let req = client_request(&[
            ("host", "gw"),
            ("mcp-protocol-version", version),
            ("mcp-method", "tools/call"),
            ("Mcp-Name", "delete_repo"),
            ("mcp-param-region", "us-east"),
            ("mcp-session-id", "s1"),
        ]);
        String::from_utf8(
            upstream_request(&req, peer, &upstream(), &req.body, &[])
                .unwrap()
                .to_vec(),
        )
        .unwrap()
        .to_ascii_lowercase()
    };
    let old = head("2025-11-25");
    for gone in ["mcp-method:", "mcp-name:", "mcp-param-region:"] {
        assert!(!old.contains(gone), "{gone} {old}");
    }
    assert!(old.contains("mcp-session-id: s1\r\n"), "{old}");
    let modern = head("2026-07-28");
    for kept in [
        "mcp-method: tools/call",
        "mcp-name: delete_repo",
        "mcp-param-region: us-east",
    ] {
        assert!(modern.contains(kept), "{kept} {modern}");
    }
}

#[test]
fn a_peer_address_is_written_as_display_writes_it() {
    let mut addrs: Vec<std::net::IpAddr> = [
        "0.0.0.0",
        "255.255.255.255",
        "198.18.0.1",
        "10.0.200.9",
        "::1",
        "2001:db8::ffff:1",
        "::ffff:198.51.100.7",
        "fe80::1:2:3:4",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    // Every octet value, in every place.
    addrs.extend(
        (0..=255u8).map(|o| std::net::IpAddr::from([o, 255 - o, o / 3, o.wrapping_mul(7)])),
    );
    for ip in addrs {
        let mut text = [0u8; 64];
        assert_eq!(ip_text(ip, &mut text), ip.to_string().as_bytes(), "{ip}");
    }
}
