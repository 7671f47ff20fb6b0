//! The load generator: many keep-alive connections sending MCP `tools/call` (stateless
//! 2026-07-28 form, so no session setup is measured), on monoio, one thread per core.
//! Connections are plain or TLS ([`crate::conn`]), kept alive or made anew for every request
//! (to measure full TLS handshakes).
//!
//! Closed loop (`rate = None`): each connection sends its next request when the previous answer
//! arrives, to find the peak. Open loop (`rate = Some(r)`): requests are due at a fixed schedule
//! ([`crate::schedule`]: each thread's clock wakes each connection at its due instants with
//! microsecond precision) and latency is measured from each request's *intended* send time, so
//! a stall is charged to every request it delayed (no coordinated omission); the uncorrected
//! figure (from the actual send) is kept beside it.
//!
//! The load's time (warm-up, then the measured time) starts once every connection is connected
//! and has had one answer (or at most 6 s after they began: one later than that, say a slow
//! handshake and a session to open, starts late), so that no row measures connecting.
//! Latencies are those of answered requests; a request that waited through the measured time
//! and had no answer by 1 s after it is *missed*, and [`LoadResult::fairness`] says whether
//! every connection was served.

use std::{
    cell::RefCell,
    net::SocketAddr,
    rc::Rc,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

pub use crate::conn::Connect;
use crate::{
    conn::{Conn, connect},
    schedule::{Clock, Schedule, TickStats},
};

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub path: String,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Total requests per second over all connections (open loop), or `None` (closed loop).
    pub rate: Option<f64>,
    /// The tool called (its `add`, under whatever name the target gives it).
    pub tool: String,
    /// Extra header lines (each ending in CRLF), e.g. a credential.
    pub headers: String,
    /// Send the 2025-11-25 form (no 2026-07-28 envelope or routing headers) for a peer that
    /// does not speak 2026-07-28.
    pub legacy: bool,
    /// The mix; [`Mix::default`] is `tools/call` alone, stateless, one identity.
    pub mix: Mix,
    /// Plain or TLS, keep-alive or a connection per request.
    pub connect: Connect,
}

/// What the load is made of beyond a single stateless `tools/call`.
#[derive(Debug, Clone, Default)]
pub struct Mix {
    /// Header lines of each agent (e.g. its API key); connection `i` is agent `i % len`.
    pub agents: Vec<String>,
    /// Every n-th request of a connection is `tools/list` (0: none).
    pub list_every: u64,
    /// Every k-th connection works in the session era: `initialize` and
    /// `notifications/initialized` once, then 2025-11-25 requests with `Mcp-Session-Id` (0: none).
    pub sessions_every: usize,
    /// Instead of `add`: `echo` with a text of this many bytes (the answer carries it back).
    pub echo_bytes: usize,
}

#[derive(Debug, Default)]
pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    /// The errors by kind: `HTTP <status>`, `no answer` (closed, failed or timed out),
    /// `connect failed`, `handshake failed`, `session refused`.
    pub error_kinds: std::collections::BTreeMap<String, u64>,
    /// Requests not answered by 1 s after the measured time's end (they are not in the
    /// histograms). Open loop: those due within it (not sent in time, or answered too late).
    /// Closed loop: those sent before it began, which waited through all of it, so a
    /// connection left waiting shows here or in the latencies rather than vanishing from both.
    pub missed: u64,
    pub elapsed: Duration,
    /// Corrected latency (from intended send time), microseconds. Closed loop: of every
    /// request answered that waited during the measured time, also those sent in the warm-up
    /// or answered (by 1 s) after the end, which `ok` does not count.
    pub latency: Option<Histogram<u64>>,
    /// Uncorrected latency (from the actual send), microseconds.
    pub service: Option<Histogram<u64>>,
    /// Open loop: how late the schedule's clock woke connections (its precision on this
    /// machine).
    pub ticks: Option<TickStats>,
    /// A thread's lateness of its clock's wake-ups, µs (merged into `ticks`).
    pub late: Option<Histogram<u64>>,
    /// Requests answered (HTTP 200) per connection, in no order, as `ok` counts them (closed
    /// loop: within the measured time; open loop: those due in it, answered by 1 s after it):
    /// whether the target served every connection or left some waiting (latencies count only
    /// the answered, so a target that starves connections looks faster than one that serves
    /// them all). A connection that never connected counts 0.
    pub per_connection: Vec<u64>,
}

impl LoadResult {
    fn error(&mut self, kind: &str) {
        self.errors += 1;
        *self.error_kinds.entry(kind.to_owned()).or_default() += 1;
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// How evenly the connections were served: connections with no answer in the measured
    /// time, and the fewest, median and most answers of one connection.
    pub fn fairness(&self) -> Fairness {
        let mut n = self.per_connection.clone();
        n.sort_unstable();
        Fairness {
            connections: n.len(),
            unanswered: n.iter().take_while(|&&k| k == 0).count(),
            min: n.first().copied().unwrap_or(0),
            median: n.get(n.len() / 2).copied().unwrap_or(0),
            max: n.last().copied().unwrap_or(0),
        }
    }
}

/// See [`LoadResult::fairness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fairness {
    pub connections: usize,
    pub unanswered: usize,
    pub min: u64,
    pub median: u64,
    pub max: u64,
}

impl std::fmt::Display for Fairness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} unanswered; {} / {} / {}",
            self.unanswered, self.connections, self.min, self.median, self.max
        )
    }
}

/// Answered and failed requests so far, over every connection of the load running now (one at
/// a time): what a soak samples while it runs.
pub static LIVE_OK: AtomicU64 = AtomicU64::new(0);
pub static LIVE_FAILED: AtomicU64 = AtomicU64::new(0);
/// The slowest answer since a soak's last sample took these (swapped to 0), µs: from the
/// intended send time, from the actual send, and how late a request was sent against its
/// schedule.
pub static LIVE_MAX_US: AtomicU64 = AtomicU64::new(0);
pub static LIVE_MAX_UNCORRECTED_US: AtomicU64 = AtomicU64::new(0);
pub static LIVE_MAX_SEND_LAG_US: AtomicU64 = AtomicU64::new(0);

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// One request of a connection: `tools/list` or `tools/call`, stateless (2026-07-28) or in the
/// 2025-11-25 form (with the session's id, if any).
fn request(spec: &LoadSpec, n: u64, agent: &str, list: bool, session: Option<&str>) -> Vec<u8> {
    let echo = spec.mix.echo_bytes;
    let tool = if echo > 0 { "echo" } else { spec.tool.as_str() };
    let legacy = spec.legacy || session.is_some();
    let params = if list {
        String::new()
    } else if echo > 0 {
        format!(
            r#""name":"{tool}","arguments":{{"text":"{}"}}"#,
            "x".repeat(echo)
        )
    } else {
        format!(r#""name":"{tool}","arguments":{{"a":{n},"b":1}}"#)
    };
    let method = if list { "tools/list" } else { "tools/call" };
    let (body, routing) = if legacy {
        (
            format!(r#"{{"jsonrpc":"2.0","id":{n},"method":"{method}","params":{{{params}}}}}"#),
            match session {
                Some(id) => format!("mcp-protocol-version: 2025-11-25\r\nmcp-session-id: {id}\r\n"),
                None => "mcp-protocol-version: 2025-11-25\r\n".to_owned(),
            },
        )
    } else {
        let sep = if list { "" } else { "," };
        (
            format!(
                r#"{{"jsonrpc":"2.0","id":{n},"method":"{method}","params":{{{params}{sep}"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
            ),
            if list {
                "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n".to_owned()
            } else {
                format!(
                    "mcp-protocol-version: 2026-07-28\r\nmcp-method: tools/call\r\nmcp-name: {tool}\r\n"
                )
            },
        )
    };
    post(spec, agent, &routing, &body)
}

fn post(spec: &LoadSpec, agent: &str, routing: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\n\
         {routing}{}{agent}content-length: {}\r\n\r\n{body}",
        spec.path,
        spec.target,
        spec.headers,
        body.len()
    )
    .into_bytes()
}

/// `initialize` and `notifications/initialized` on `stream`; the session's id.
async fn open_session(
    spec: &LoadSpec,
    agent: &str,
    stream: &mut Conn,
    buf: &mut Vec<u8>,
) -> Option<String> {
    let init = post(
        spec,
        agent,
        "",
        r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}"#,
    );
    stream.write_all(init).await.ok()?;
    let answer = read_response(stream, buf).await?;
    let id = answer.session.filter(|_| answer.status == 200)?;
    let done = post(
        spec,
        agent,
        &format!("mcp-protocol-version: 2025-11-25\r\nmcp-session-id: {id}\r\n"),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    );
    stream.write_all(done).await.ok()?;
    let answer = read_response(stream, buf).await?;
    (answer.status == 202).then_some(id)
}

struct Answer {
    status: u16,
    /// The server closes the connection after it.
    close: bool,
    /// `Mcp-Session-Id`, if the answer carries one.
    session: Option<String>,
}

/// Where a chunked body that starts at `at` ends, if all of it is in `buf`.
fn chunked_end(buf: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let line = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(buf.get(at..at + line)?).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        let data = at + line + 2;
        if size == 0 {
            // No trailers: the blank line ends the body.
            return (buf.len() >= data + 2).then_some(data + 2);
        }
        if buf.len() < data + size + 2 {
            return None;
        }
        at = data + size + 2;
    }
}

/// Reads one response with a Content-Length or chunked body.
async fn read_response(stream: &mut Conn, buf: &mut Vec<u8>) -> Option<Answer> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(buf) {
            if std::env::var_os("BENCH_DEBUG").is_some()
                && (!matches!(resp.code, Some(200 | 202))
                    || !resp
                        .headers
                        .iter()
                        .any(|h| h.name.eq_ignore_ascii_case("content-length")))
            {
                eprintln!(
                    "load: {}",
                    String::from_utf8_lossy(&buf[..buf.len().min(600)])
                );
            }
            let header = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            };
            let chunked =
                header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
            let len: Option<usize> = header("content-length")
                .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok());
            let answer = Answer {
                status: resp.code?,
                close: header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close")),
                session: header("mcp-session-id").map(|v| String::from_utf8_lossy(v).into_owned()),
            };
            let end = match (len, chunked) {
                (_, true) => loop {
                    // An SSE answer (supergateway, SDK servers): chunks up to the last one.
                    if let Some(end) = chunked_end(buf, head) {
                        break end;
                    }
                    if !stream.read_more(buf).await {
                        return None;
                    }
                },
                (Some(len), false) => {
                    while buf.len() < head + len {
                        if !stream.read_more(buf).await {
                            return None;
                        }
                    }
                    head + len
                }
                (None, false) => return None,
            };
            buf.drain(..end);
            return Some(answer);
        }
        if !stream.read_more(buf).await {
            return None;
        }
    }
}

/// Runs the load and returns merged results.
pub fn run(spec: &LoadSpec) -> LoadResult {
    run_sampled(spec, &mut || ()).0
}

/// Runs the load like [`run`], and calls `sample` when the measured time starts and when it ends
/// (e.g. to read the CPU time processes used within it).
pub fn run_sampled<T>(spec: &LoadSpec, sample: &mut dyn FnMut() -> T) -> (LoadResult, [T; 2]) {
    let (r, mut s) = run_every(spec, spec.duration, &mut |_| sample());
    let last = s.pop().expect("two samples");
    let first = s.pop().expect("two samples");
    (r, [first, last])
}

/// Runs the load like [`run`], and calls `sample` with the time since the measured time began
/// at its start and every `every` after it, up to its end (a soak's RSS every 10 s).
pub fn run_every<T>(
    spec: &LoadSpec,
    every: Duration,
    sample: &mut dyn FnMut(Duration) -> T,
) -> (LoadResult, Vec<T>) {
    let per_thread = spec.connections.div_ceil(spec.threads);
    let gate = Arc::new(Gate::default());
    let handles: Vec<_> = (0..spec.threads)
        .map(|t| {
            let spec = spec.clone();
            let gate = gate.clone();
            std::thread::spawn(move || {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                    .expect("runtime");
                rt.block_on(thread_load(spec, t, per_thread, gate))
            })
        })
        .collect();
    // The load's time starts once every connection has had its first answer (or given up), so
    // that the warm-up and the measured time see connections at work, not connecting: 2,048
    // connects at once take a proxy a while to accept, and a connection's first request waits
    // for that.
    let cap = Instant::now() + FIRST_ANSWER_WITHIN + Duration::from_secs(1);
    while gate.arrived.load(Ordering::Acquire) < spec.connections && Instant::now() < cap {
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let schedule = spec.rate.map(|rate| Schedule {
        start,
        rate,
        connections: spec.connections,
    });
    let _ = gate.window.set(Window {
        start,
        measure_from,
        end,
        schedule,
    });
    let mut samples = Vec::new();
    let mut at = measure_from;
    loop {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        samples.push(sample(at - measure_from));
        if at >= end {
            break;
        }
        at = (at + every.max(Duration::from_millis(1))).min(end);
    }
    let mut total = LoadResult {
        elapsed: spec.duration,
        latency: Some(histogram()),
        service: Some(histogram()),
        ..Default::default()
    };
    let mut late: Option<Histogram<u64>> = None;
    for h in handles {
        let r = h.join().expect("load thread");
        total.ok += r.ok;
        total.errors += r.errors;
        for (k, n) in r.error_kinds {
            *total.error_kinds.entry(k).or_default() += n;
        }
        total.missed += r.missed;
        total.per_connection.extend(r.per_connection);
        if let (Some(a), Some(b)) = (total.latency.as_mut(), r.latency.as_ref()) {
            a.add(b).expect("same bounds");
        }
        if let (Some(a), Some(b)) = (total.service.as_mut(), r.service.as_ref()) {
            a.add(b).expect("same bounds");
        }
        if let Some(b) = r.late.as_ref() {
            late.get_or_insert_with(|| Histogram::new(3).expect("histogram"))
                .add(b)
                .expect("same bounds");
        }
    }
    total.ticks = late.as_ref().map(TickStats::of);
    (total, samples)
}

/// How long a connection may take to connect and have its first answer before the load's
/// time starts without it.
const FIRST_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Where the connections meet before the load's time starts: each arrives once connected and
/// answered once (or failed), and waits for the window the load then runs in.
#[derive(Default)]
struct Gate {
    arrived: AtomicUsize,
    window: OnceLock<Window>,
}

impl Gate {
    fn arrive(&self) {
        self.arrived.fetch_add(1, Ordering::Release);
    }

    async fn window(&self) -> Window {
        loop {
            if let Some(w) = self.window.get() {
                return *w;
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The load's time line.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Open loop only.
    schedule: Option<Schedule>,
}

async fn thread_load(
    spec: LoadSpec,
    thread: usize,
    connections: usize,
    gate: Arc<Gate>,
) -> LoadResult {
    // Open loop: the thread's clock wakes its connections at their due instants.
    let clock = spec.rate.map(|_| {
        let (clock, driver) = Clock::new();
        (clock, monoio::spawn(driver))
    });
    // The connections wait for the load's window here: one task polls the gate for the
    // thread, not each of 2,048 connections every millisecond.
    let window = Rc::new(LocalWindow::default());
    monoio::spawn({
        let (gate, window) = (gate.clone(), window.clone());
        async move { window.open(gate.window().await) }
    });
    // One pair of histograms for the thread's connections (a pair each would be 280 KiB per
    // connection, touched page by page while the load runs).
    let histograms = Rc::new(RefCell::new([histogram(), histogram()]));
    let tasks: Vec<_> = (0..connections)
        .filter(|c| thread * connections + c < spec.connections)
        .map(|c| {
            let spec = spec.clone();
            let index = thread * connections + c;
            let clock = clock.as_ref().map(|(c, _)| c.clone());
            monoio::spawn(connection(
                spec,
                index,
                (gate.clone(), window.clone()),
                clock,
                histograms.clone(),
            ))
        })
        .collect();
    let mut out = LoadResult::default();
    for t in tasks {
        let r = t.await;
        out.ok += r.ok;
        out.errors += r.errors;
        for (k, n) in r.error_kinds {
            *out.error_kinds.entry(k).or_default() += n;
        }
        out.missed += r.missed;
        out.per_connection.extend(r.per_connection);
    }
    let [latency, service] = histograms.replace([histogram(), histogram()]);
    out.latency = Some(latency);
    out.service = Some(service);
    if let Some((clock, driver)) = clock {
        clock.stop();
        driver.await;
        out.late = Some(clock.late());
    }
    out
}

/// The load's window, once known, for the connections of one thread.
#[derive(Default)]
struct LocalWindow {
    window: std::cell::Cell<Option<Window>>,
    waiting: RefCell<Vec<std::task::Waker>>,
}

impl LocalWindow {
    fn open(&self, w: Window) {
        self.window.set(Some(w));
        for waker in self.waiting.take() {
            waker.wake();
        }
    }

    async fn wait(&self) -> Window {
        std::future::poll_fn(|cx| match self.window.get() {
            Some(w) => std::task::Poll::Ready(w),
            None => {
                self.waiting.borrow_mut().push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// A connection that failed before the load's time: its error, no answers, and its arrival at
/// the gate (which would otherwise wait for it).
fn gave_up(mut out: LoadResult, kind: &str, gate: &Gate) -> LoadResult {
    out.error(kind);
    out.per_connection.push(0);
    gate.arrive();
    out
}

async fn connection(
    spec: LoadSpec,
    index: usize,
    (gate, window): (Arc<Gate>, Rc<LocalWindow>),
    clock: Option<Clock>,
    histograms: Rc<RefCell<[Histogram<u64>; 2]>>,
) -> LoadResult {
    let mut out = LoadResult::default();
    let mix = &spec.mix;
    let wants_session = mix.sessions_every > 0 && index.is_multiple_of(mix.sessions_every);
    // A connection per request connects in each request's exchange (timed with it).
    let mut stream = None;
    if !spec.connect.per_request || wants_session {
        match connect(spec.target, &spec.connect).await {
            Ok(s) => stream = Some(s),
            Err(kind) => return gave_up(out, kind, &gate),
        }
    }
    let mut buf = Vec::with_capacity(16 * 1024);
    let agent = if mix.agents.is_empty() {
        ""
    } else {
        mix.agents[index % mix.agents.len()].as_str()
    };
    // A session era connection opens its session before the load starts (not measured); the
    // session outlives reconnects.
    let session = if let (true, Some(s)) = (wants_session, stream.as_mut()) {
        let opened = monoio::time::timeout(
            Duration::from_secs(5),
            open_session(&spec, agent, s, &mut buf),
        )
        .await;
        let Ok(Some(id)) = opened else {
            return gave_up(out, "session refused", &gate);
        };
        Some(id)
    } else {
        None
    };
    let mut n = index as u64 * 1_000_000;
    // A kept-alive connection's first exchange, before the load's time starts (not measured).
    if !spec.connect.per_request
        && let Some(s) = stream.as_mut()
    {
        n += 1;
        let first = monoio::time::timeout(FIRST_ANSWER_WITHIN, async {
            s.write_all(request(&spec, n, agent, false, session.as_deref()))
                .await
                .ok()?;
            read_response(s, &mut buf).await
        })
        .await;
        if !matches!(first, Ok(Some(ref a)) if !a.close) {
            // Lost, closed or still waiting: start the load on a new connection.
            buf.clear();
            let again =
                monoio::time::timeout(Duration::from_secs(2), connect(spec.target, &spec.connect));
            match again.await {
                Ok(Ok(s)) => stream = Some(s),
                _ => return gave_up(out, "connect failed", &gate),
            }
        }
    }
    gate.arrive();
    let Window {
        start,
        measure_from,
        end,
        schedule,
    } = window.wait().await;
    monoio::time::sleep(start.saturating_duration_since(Instant::now())).await;
    // Open loop: this connection's requests are due at the schedule's instants for it.
    let interval = schedule.map(|s| s.interval());
    let mut k = 0u64;
    let mut due = schedule.map_or(start, |s| s.due(index, 0));
    let sleep_until = |t: Instant| monoio::time::sleep(t.saturating_duration_since(Instant::now()));
    // Open loop: everything due in the measured time is sent, however late (up to 2 s after
    // it); closed loop: until the end.
    let more = |due: Instant| match interval {
        Some(_) => due < end && Instant::now() < end + Duration::from_secs(2),
        None => Instant::now() < end,
    };
    while more(due) {
        if interval.is_some() {
            // Behind schedule: send at once. Otherwise at `due` on the thread's clock
            // (monoio's own timer ticks every millisecond: it would make a 30 µs call look 1 ms).
            match clock.as_ref() {
                Some(c) => c.until(due).await,
                None => sleep_until(due).await,
            }
        } else {
            due = Instant::now();
        }
        n += 1;
        let sent = Instant::now();
        // Bounded: a target that stops answering ends this connection at `end` + 2 s.
        let grace = end + Duration::from_secs(2);
        let exchange = async {
            let s = match &mut stream {
                Some(s) => s,
                None => stream.insert(connect(spec.target, &spec.connect).await?),
            };
            let list = mix.list_every > 0 && n.is_multiple_of(mix.list_every);
            s.write_all(request(&spec, n, agent, list, session.as_deref()))
                .await
                .map_err(|_| "no answer")?;
            read_response(s, &mut buf).await.ok_or("no answer")
        };
        let answer = monoio::time::timeout(grace.saturating_duration_since(sent), exchange)
            .await
            .unwrap_or(Err("no answer"));
        let status = answer.as_ref().map(|a| a.status);
        let reconnect = answer.as_ref().map_or(true, |a| a.close);
        let done = Instant::now();
        if spec.connect.per_request {
            // Done with it: closed as a client does (close_notify), outside the timed exchange.
            if let Some(s) = stream.take() {
                s.close().await;
            }
            buf.clear();
        }
        // What a request counts for. Open loop: those due in the measured time, answered by 1 s
        // after it, or missed. Closed loop: those that waited during it (sent before its end,
        // answered after its start) and were answered by 1 s after it, however early they were
        // sent: a connection left waiting since the warm-up shows in the latencies instead of
        // vanishing from them; one that waited through all of it unanswered is missed. (One sent
        // within it and still waiting is in flight at the end, as in any closed loop: a slow
        // server's last requests are not failures.)
        let counts = match interval {
            Some(_) => due >= measure_from && due < end,
            None => done >= measure_from && due < end,
        };
        let late = done > end + Duration::from_secs(1);
        let missed = match interval {
            Some(_) => counts && late,
            None => counts && late && due < measure_from,
        };
        if counts && !late {
            match status {
                Ok(200) => LIVE_OK.fetch_add(1, Ordering::Relaxed),
                _ => LIVE_FAILED.fetch_add(1, Ordering::Relaxed),
            };
            let us = |d: Duration| d.as_micros() as u64;
            LIVE_MAX_US.fetch_max(us(done.saturating_duration_since(due)), Ordering::Relaxed);
            LIVE_MAX_UNCORRECTED_US.fetch_max(us(done - sent), Ordering::Relaxed);
            LIVE_MAX_SEND_LAG_US
                .fetch_max(us(sent.saturating_duration_since(due)), Ordering::Relaxed);
            match status {
                Ok(200) => {
                    // Closed loop: the rate counts the answers within the measured time.
                    if interval.is_some() || done <= end {
                        out.ok += 1;
                    }
                    // Over the histograms' 60 s: counted at 60 s, not dropped.
                    let mut h = histograms.borrow_mut();
                    h[0].saturating_record((done - due).as_micros().max(1) as u64);
                    h[1].saturating_record((done - sent).as_micros().max(1) as u64);
                }
                Ok(status) => out.error(&format!("HTTP {status}")),
                Err(kind) => out.error(kind),
            }
        } else if missed {
            out.missed += 1;
        }
        if done >= grace {
            if let Some(s) = schedule {
                k += 1;
                due = s.due(index, k);
            }
            break;
        }
        if reconnect && !spec.connect.per_request {
            // Closed by the server (after `Connection: close`) or lost: reconnect and carry on.
            let again =
                monoio::time::timeout(Duration::from_secs(2), connect(spec.target, &spec.connect));
            if let Ok(Ok(s)) = again.await {
                stream = Some(s);
                buf.clear();
            } else {
                if let Some(s) = schedule {
                    k += 1;
                    due = s.due(index, k);
                }
                break;
            }
        }
        if let Some(s) = schedule {
            k += 1;
            due = s.due(index, k);
        }
    }
    // Open loop: what was due in the measured time but never sent.
    if let Some(s) = schedule {
        while due < end {
            if due >= measure_from {
                out.missed += 1;
            }
            k += 1;
            due = s.due(index, k);
        }
    }
    out.per_connection.push(out.ok);
    out
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
