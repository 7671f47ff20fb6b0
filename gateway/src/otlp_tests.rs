use super::*;

const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[test]
fn a_span_continues_the_clients_trace_and_names_itself_upstream() {
    let ctx = SpanCtx::start(Some(TP), 1.0);
    assert_eq!(ctx.trace_hex(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(
        ctx.parent,
        Some([0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31])
    );
    let up = ctx.traceparent();
    assert!(
        up.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{up}"
    );
    assert!(up.ends_with("-01"), "{up}");
    assert!(
        !up.contains("b7ad6b7169203331"),
        "the upstream's parent is the gateway's span"
    );
    let root = SpanCtx::start(None, 0.0);
    assert_eq!(root.parent, None);
    assert!(!root.sampled);
    assert!(root.trace_id.iter().any(|b| *b != 0) && root.span_id.iter().any(|b| *b != 0));
    assert!(root.traceparent().ends_with("-00"));
}

#[test]
fn head_sampling_follows_the_ratio_not_the_clients_flag() {
    assert!(
        !SpanCtx::start(Some(TP), 0.0).sampled,
        "flag 01 does not force a sample"
    );
    assert!(SpanCtx::start(None, 1.0).sampled);
    let kept = (0..10_000)
        .filter(|_| SpanCtx::start(None, 0.1).sampled)
        .count();
    assert!((700..1300).contains(&kept), "{kept} of 10000 at 0.1");
}

#[test]
fn tracestate_is_valid_per_w3c_or_dropped() {
    for ok in [
        "rojo=00f067aa0ba902b7",
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "a@b=1, c=2 ,,d=x y",
        "tenant1@sys=v",
    ] {
        assert!(valid_tracestate(ok), "{ok}");
    }
    for bad in [
        "Rojo=1",
        "rojo",
        "rojo=1,rojo=2",
        "a=b=c",
        "a=\u{7f}",
        "a=1\r\nx-evil: 1",
        "a=",
        "a@B=1",
        &"a=b,".repeat(33),
        &format!("a={}", "x".repeat(600)),
    ] {
        assert!(!valid_tracestate(bad), "{bad:?}");
    }
}

#[test]
fn a_batch_encodes_as_an_export_request() {
    let ctx = SpanCtx::start(Some(TP), 1.0);
    let rec = SpanRecord {
        ctx,
        start_unix_ns: 1,
        end_unix_ns: 2,
        http_method: "POST",
        route: "/mcp".into(),
        method: "tools/call",
        tool: Some("echo".into()),
        tenant: "default".into(),
        agent: None,
        run: None,
        upstream: Some("u".into()),
        outcome: "refused",
        rule: Some("tools.deny".into()),
        gateway_us: 12,
        upstream_us: None,
        client: "127.0.0.1".into(),
    };
    let bytes = encode([&rec].into_iter(), "svc");
    let req = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
    let span = &req.resource_spans[0].scope_spans[0].spans[0];
    assert_eq!(span.name, "tools/call echo");
    assert_eq!(span.trace_id, ctx.trace_id);
    assert_eq!(span.parent_span_id, ctx.parent.unwrap());
    assert_eq!(span.status.as_ref().unwrap().code, StatusCode::Error as i32);
    assert!(
        span.attributes
            .iter()
            .any(|kv| kv.key == "mcp_gateway.refusal.rule")
    );
}

#[test]
fn a_full_queue_drops_and_counts() {
    let spans = Spans::new(1, 1);
    let rec = |outcome| SpanRecord {
        ctx: SpanCtx::start(None, 1.0),
        start_unix_ns: 0,
        end_unix_ns: 0,
        http_method: "POST",
        route: "/mcp".into(),
        method: "ping",
        tool: None,
        tenant: "t".into(),
        agent: None,
        run: None,
        upstream: None,
        outcome,
        rule: None,
        gateway_us: 0,
        upstream_us: None,
        client: String::new(),
    };
    spans.push(0, rec("ok"));
    spans.push(0, rec("ok"));
    spans.push(7, rec("ok"));
    assert_eq!(spans.counts(), (0, 2, 0));
}
