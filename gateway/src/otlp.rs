//! OpenTelemetry spans over OTLP/HTTP (protobuf): one SERVER span per request, parented on the
//! client's W3C trace context, its id propagated to the upstream.
//!
//! Workers only fill a [`SpanRecord`] and push it into their own bounded lock-free queue (a full
//! queue drops the span and counts it); they never encode, batch, wait or touch the network.
//! The control thread ([`export`]) drains the queues, encodes batches with the
//! `opentelemetry-proto` messages and posts them, retrying with backoff; its own backlog is
//! bounded too. The SDK's `BatchSpanProcessor` is not used: it is one shared channel fed by
//! `Span::end` on any thread, which would put a shared queue and the SDK's span objects on every
//! worker's request path (see docs/architecture.md).

use std::{
    cell::Cell,
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crossbeam_queue::ArrayQueue;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prost::Message as _;

use crate::config::OtlpConfig;

/// The trace context of one request's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The client's span, from its `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// The head decision: kept whatever the outcome.
    pub sampled: bool,
}

impl SpanCtx {
    /// A new span under `parent` (a `traceparent` already validated whole), or the root of a new
    /// trace. The client's sampled flag is not obeyed: a client could otherwise have every one of
    /// its requests exported.
    pub fn start(parent: Option<&str>, ratio: f64) -> Self {
        let parsed = parent.and_then(parse_traceparent);
        let trace_id = match parsed {
            Some((t, _)) => t,
            None => {
                let mut t = [0; 16];
                t[..8].copy_from_slice(&nonzero_random().to_be_bytes());
                t[8..].copy_from_slice(&random().to_be_bytes());
                t
            }
        };
        Self {
            trace_id,
            span_id: nonzero_random().to_be_bytes(),
            parent: parsed.map(|(_, p)| p),
            sampled: sampled(&trace_id, ratio),
        }
    }

    /// The `traceparent` the upstream receives: this trace, this span as its parent.
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        s.push_str(&hex(&self.trace_id));
        s.push('-');
        s.push_str(&hex(&self.span_id));
        s.push_str(if self.sampled { "-01" } else { "-00" });
        s
    }

    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// Whether a trace is kept at `ratio`: on the trace id's last 56 bits (the random part W3C
/// level 2 names), so every service deciding on the same id decides alike.
fn sampled(trace_id: &[u8; 16], ratio: f64) -> bool {
    let mut low = [0; 8];
    low[1..].copy_from_slice(&trace_id[9..]);
    let r = u64::from_be_bytes(low);
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a threshold in 2^56 steps; 1.0 maps to 2^56, above every value"
    )]
    let threshold = (ratio * (1u64 << 56) as f64) as u64;
    r < threshold
}

/// The ids of a `traceparent` already validated whole (`00-<32 hex>-<16 hex>-<2 hex>`).
fn parse_traceparent(tp: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = tp.split('-');
    let _version = parts.next()?;
    let (trace, parent) = (parts.next()?, parts.next()?);
    let mut t = [0; 16];
    let mut p = [0; 8];
    unhex(trace, &mut t)?;
    unhex(parent, &mut p)?;
    Some((t, p))
}

fn unhex(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let v = std::str::from_utf8(pair).ok()?;
        *out.get_mut(i)? = u8::from_str_radix(v, 16).ok()?;
    }
    Some(())
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
    s
}

thread_local! {
    /// splitmix64 state, seeded from the OS once per thread: ids need to be unique and
    /// unguessable enough for tracing, not secret, and a syscall per request is not wanted.
    static RNG: Cell<u64> = Cell::new(getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15));
}

fn random() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

fn nonzero_random() -> u64 {
    random().max(1)
}

/// Whether a `tracestate` value (all its field lines joined by `,`) is valid per W3C Trace
/// Context: at most 32 list members of `key=value`, keys unique, no more than 512 characters.
/// An invalid one is dropped, never forwarded: nothing but a trace vendor's state may ride on it.
pub fn valid_tracestate(v: &str) -> bool {
    fn key_char(b: u8) -> bool {
        matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
    }
    fn key(k: &str) -> bool {
        let b = k.as_bytes();
        match k.split_once('@') {
            None => {
                b.first().is_some_and(u8::is_ascii_lowercase)
                    && b.len() <= 256
                    && b.iter().all(|c| key_char(*c))
            }
            Some((tenant, system)) => {
                let (t, s) = (tenant.as_bytes(), system.as_bytes());
                t.first()
                    .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && t.len() <= 241
                    && t.iter().all(|c| key_char(*c))
                    && s.first().is_some_and(u8::is_ascii_lowercase)
                    && s.len() <= 14
                    && s.iter().all(|c| key_char(*c))
            }
        }
    }
    fn value(v: &str) -> bool {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 256
            && b.last().is_some_and(|c| *c != b' ')
            && b.iter()
                .all(|c| matches!(c, 0x20..=0x2b | 0x2d..=0x3c | 0x3e..=0x7e))
    }
    if v.len() > 512 {
        return false;
    }
    let mut keys: Vec<&str> = Vec::new();
    for member in v.split(',') {
        let member = crate::http::ows(member);
        if member.is_empty() {
            continue;
        }
        let Some((k, val)) = member.split_once('=') else {
            return false;
        };
        if !key(k) || !value(val) || keys.contains(&k) {
            return false;
        }
        keys.push(k);
    }
    keys.len() <= 32
}

/// One finished request, as the worker saw it.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub ctx: SpanCtx,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// One of the methods HTTP defines, or `_OTHER` (OpenTelemetry's convention).
    pub http_method: &'static str,
    pub route: String,
    /// The JSON-RPC method's label (`tools/call`, `initialize`, `other`, …).
    pub method: &'static str,
    pub tool: Option<String>,
    pub tenant: String,
    pub agent: Option<String>,
    pub run: Option<String>,
    pub upstream: Option<String>,
    pub outcome: &'static str,
    pub rule: Option<String>,
    pub gateway_us: u64,
    pub upstream_us: Option<u64>,
    pub client: String,
}

/// Nanoseconds since the Unix epoch of `t`.
pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The workers' span queues and the export counters.
pub struct Spans {
    queues: Box<[ArrayQueue<SpanRecord>]>,
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Spans {
    /// One queue of `cap` spans per worker.
    pub fn new(workers: usize, cap: usize) -> Self {
        Self {
            queues: (0..workers).map(|_| ArrayQueue::new(cap.max(1))).collect(),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// Called by worker `worker` only: its own queue, never waiting. A full queue drops.
    pub fn push(&self, worker: usize, span: SpanRecord) {
        let pushed = self.queues.get(worker).map(|q| q.push(span).is_ok());
        if pushed != Some(true) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.exported.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let (exported, dropped, failed) = self.counts();
        let _ = writeln!(
            out,
            "# HELP mcp_gateway_otlp_spans_total Spans by what became of them: exported to the OTLP collector, dropped (a queue was full) or failed (the collector refused or did not answer, after retries).\n# TYPE mcp_gateway_otlp_spans_total counter\nmcp_gateway_otlp_spans_total{{result=\"exported\"}} {exported}\nmcp_gateway_otlp_spans_total{{result=\"dropped\"}} {dropped}\nmcp_gateway_otlp_spans_total{{result=\"failed\"}} {failed}"
        );
    }
}

/// How often the control thread drains the workers' queues.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Attempts per batch (the first and the retries), with backoff doubling from [`BACKOFF`].
const ATTEMPTS: u32 = 4;
const BACKOFF: Duration = Duration::from_millis(100);

/// The control thread's export loop; runs until aborted. Takes `[telemetry.otlp]` from
/// `config` (the current snapshot's) on every round, so a reload changes the endpoint, headers
/// and sampling.
pub async fn export(spans: Arc<Spans>, config: impl Fn() -> Option<OtlpConfig>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut pending: VecDeque<SpanRecord> = VecDeque::new();
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned_at: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(cfg) = config() else {
            // Turned off by a reload: what was queued is dropped.
            let mut n = pending.len() as u64;
            pending.clear();
            for q in &spans.queues {
                while q.pop().is_some() {
                    n += 1;
                }
            }
            spans.dropped.fetch_add(n, Ordering::Relaxed);
            continue;
        };
        for q in &spans.queues {
            while let Some(span) = q.pop() {
                if pending.len() >= cfg.queue_max {
                    spans.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    pending.push_back(span);
                }
            }
        }
        while !pending.is_empty() {
            let n = pending.len().min(cfg.batch_max);
            let body = encode(pending.range(..n), &cfg.service_name);
            let result = post_with_retries(&client, &cfg, body).await;
            pending.drain(..n);
            match result {
                Ok(()) => {
                    spans.exported.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    spans.failed.fetch_add(n as u64, Ordering::Relaxed);
                    if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(endpoint = %cfg.endpoint, "OTLP export failed: {e}");
                        warned_at = Some(tokio::time::Instant::now());
                    }
                    // The rest waits for the next round rather than hammering a collector
                    // that is down.
                    break;
                }
            }
        }
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// Why one export attempt failed, and whether trying again can help.
struct Failure {
    retry: bool,
    detail: String,
}

async fn post_with_retries(
    client: &HttpClient,
    cfg: &OtlpConfig,
    body: Vec<u8>,
) -> Result<(), String> {
    let body = Bytes::from(body);
    let mut wait = BACKOFF;
    let mut attempt = 1;
    loop {
        match post(client, cfg, body.clone()).await {
            Ok(()) => return Ok(()),
            Err(f) if f.retry && attempt < ATTEMPTS => {
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(f) => return Err(f.detail),
        }
    }
}

async fn post(client: &HttpClient, cfg: &OtlpConfig, body: Bytes) -> Result<(), Failure> {
    let fatal = |detail: String| Failure {
        retry: false,
        detail,
    };
    let mut req = hyper::Request::post(cfg.endpoint.as_str())
        .header("content-type", "application/x-protobuf")
        .header(
            "user-agent",
            concat!("mcp-gateway/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in &cfg.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| fatal(format!("building the request: {e}")))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| Failure {
            retry: true,
            detail: format!("sending: {e}"),
        })?;
        let status = resp.status();
        // The body is read so the connection can be used again.
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            // OTLP/HTTP: 429, 502, 503 and 504 are worth retrying; the rest are not.
            Err(Failure {
                retry: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                detail: format!("the collector answered {status}"),
            })
        }
    };
    tokio::time::timeout(cfg.timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(Failure {
                retry: true,
                detail: format!("no answer within {:?}", cfg.timeout),
            })
        })
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn string(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.to_owned()))
}

fn int(key: &str, v: u64) -> KeyValue {
    kv(
        key,
        any_value::Value::IntValue(i64::try_from(v).unwrap_or(i64::MAX)),
    )
}

/// One OTLP span of a record.
fn span(r: &SpanRecord) -> Span {
    let mut attributes = vec![
        string("http.request.method", r.http_method),
        string("http.route", &r.route),
        string("mcp.method.name", r.method),
        string("client.address", &r.client),
        string("mcp_gateway.tenant", &r.tenant),
        string("mcp_gateway.outcome", r.outcome),
        int("mcp_gateway.gateway_us", r.gateway_us),
    ];
    let optional = [
        ("gen_ai.tool.name", &r.tool),
        ("mcp_gateway.agent", &r.agent),
        ("mcp_gateway.run", &r.run),
        ("mcp_gateway.upstream", &r.upstream),
        ("mcp_gateway.refusal.rule", &r.rule),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            attributes.push(string(key, v));
        }
    }
    if let Some(us) = r.upstream_us {
        attributes.push(int("mcp_gateway.upstream_us", us));
    }
    let name = match &r.tool {
        Some(tool) => format!("{} {tool}", r.method),
        None => r.method.to_owned(),
    };
    let error = r.outcome != "ok";
    // SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE (0x100), and IS_REMOTE (0x200) when the parent is the
    // client's; the low byte is the W3C trace flags.
    let flags = u32::from(r.ctx.sampled) | 0x100 | if r.ctx.parent.is_some() { 0x200 } else { 0 };
    Span {
        trace_id: r.ctx.trace_id.to_vec(),
        span_id: r.ctx.span_id.to_vec(),
        parent_span_id: r.ctx.parent.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name,
        kind: SpanKind::Server as i32,
        start_time_unix_nano: r.start_unix_ns,
        end_time_unix_nano: r.end_unix_ns,
        attributes,
        status: Some(Status {
            code: if error {
                StatusCode::Error as i32
            } else {
                StatusCode::Unset as i32
            },
            message: if error {
                r.outcome.to_owned()
            } else {
                String::new()
            },
        }),
        ..Default::default()
    }
}

/// An `ExportTraceServiceRequest` of `spans`, protobuf-encoded.
pub fn encode<'a>(spans: impl Iterator<Item = &'a SpanRecord>, service: &str) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", service),
                    string("service.version", env!("CARGO_PKG_VERSION")),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "mcp-gateway".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans: spans.map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
}

#[cfg(test)]
#[path = "otlp_tests.rs"]
mod tests;
