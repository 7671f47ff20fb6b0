//! Micro-benchmarks of the request path's pieces (`cargo xtask bench` runs them): JSON-RPC
//! parsing and extraction with simd-json (serde_json as the baseline, doing the same
//! extraction), classifying an upstream's answer, and recording a request's telemetry.

use std::time::Duration;

use divan::{Bencher, black_box};
use gateway::{
    mcp::{Parser, proxy::classify},
    stats::{Observation, Outcome, Recorder},
};

fn main() {
    divan::main();
}

/// A typical `tools/call`, as a 2026-07-28 client sends it.
const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":4711,"method":"tools/call","params":{"name":"search_issues","arguments":{"repo":"acme/gateway","query":"label:bug state:open sort:updated","limit":25,"fields":["title","url","labels","updated_at"]},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","progressToken":"p-4711","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}}"#;

const ANSWER: &[u8] = br#"{"jsonrpc":"2.0","id":4711,"result":{"content":[{"type":"text","text":"12 issues: #88 crash on reload, #91 slow list, ..."}],"isError":false}}"#;

mod parse {
    use super::*;

    #[divan::bench]
    fn simd_json(b: Bencher) {
        let mut parser = Parser::default();
        b.bench_local(|| black_box(parser.parse(black_box(CALL)).is_ok()));
    }

    /// The same extraction (kind, id, method, tool name, arguments, protocol version) with
    /// serde_json.
    #[divan::bench]
    fn serde_json_baseline(b: Bencher) {
        b.bench_local(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(CALL)).unwrap();
            let ok = v["jsonrpc"] == "2.0";
            let id = v["id"].as_i64();
            let method = v["method"].as_str().map(str::to_owned);
            let name = v["params"]["name"].as_str().map(str::to_owned);
            let args = v["params"]["arguments"].clone();
            let version = v["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"]
                .as_str()
                .map(str::to_owned);
            black_box((ok, id, method, name, args, version))
        });
    }
}

mod telemetry {
    use super::*;

    /// Everything telemetry costs a request on its worker: counts and three histograms in each
    /// of four series.
    #[divan::bench]
    fn record(b: Bencher) {
        let mut r = Recorder::new(0, 50);
        let mut n = 0u64;
        b.bench_local(|| {
            n += 1;
            r.record(black_box(&Observation {
                route: "/mcp",
                upstream: Some("github"),
                method: "tools/call",
                tool: Some("search_issues"),
                tenant: "acme",
                outcome: Outcome::Ok,
                total: Duration::from_micros(300 + n % 700),
                upstream_wait: Some(Duration::from_micros(250 + n % 600)),
                trace_id: None,
            }));
        });
    }

    /// Telling a result from an error or a failed tool, on the upstream's answer.
    #[divan::bench]
    fn classify_answer() -> Outcome {
        classify(black_box(ANSWER))
    }
}

/// What OTLP adds to a request that head sampling does not keep: the span's ids and the
/// `traceparent` the upstream receives.
mod otlp {
    use super::*;

    #[divan::bench]
    fn unsampled_span_context(b: Bencher) {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        b.bench_local(|| {
            let ctx = gateway::otlp::SpanCtx::start(black_box(Some(tp)), 0.01);
            black_box(ctx.traceparent())
        });
    }
}
