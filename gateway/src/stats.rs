//! Request telemetry. Each worker records into its own [`Recorder`] (no locks, no atomics: the
//! recorder is the worker's alone) and ships what it recorded to the control thread once a
//! second; the control thread's [`Aggregator`] merges the workers' intervals into cumulative
//! series (for `/metrics`), a ring of recent slots (for `/stats` over a window) and, if
//! configured, an HdrHistogram interval log.
//!
//! Latency is kept in three histograms per series: `total` (request read to response relayed),
//! `upstream` (request sent to response head, connecting included) and `gateway` (everything
//! before the request is sent: parsing, validation, policy, waiting for the worker). A slow
//! call with a small `gateway` share is the upstream's doing.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    rc::Rc,
    time::{Duration, SystemTime},
};

use hdrhistogram::Histogram;
// A fast hash: the maps are small and bounded (tool names past `max_tools` are not added), so
// colliding keys cannot make them slow.
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde_json::{Value, json};

/// Two significant digits: values are exact to 1%, and a histogram is about 20 KiB.
pub const SIGFIG: u8 = 2;
/// Largest latency recorded (60 s), in microseconds.
pub const MAX_US: u64 = 60_000_000;
/// Length of one slot of the recent-history ring, and how many are kept (5 minutes).
pub const SLOT: Duration = Duration::from_secs(10);
const SLOTS: usize = 30;
/// The label of everything past a bound on distinct names.
pub const OTHER: &str = "other";
/// Upper bounds (µs) of the latency histograms' Prometheus buckets: 1-2-5 per decade from 1 µs
/// to 60 s, so the gateway's own share (tens of µs) lands in buckets of its own.
pub const BUCKETS_US: [u64; 25] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
    200_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000, 50_000_000, MAX_US,
];
/// Bucket slots for exemplars: one per bound and `+Inf`.
const EXEMPLAR_SLOTS: usize = BUCKETS_US.len() + 1;

/// Index of the Prometheus bucket a value (µs) falls into.
pub fn bucket_of(us: u64) -> usize {
    BUCKETS_US.partition_point(|b| *b < us)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, SIGFIG).expect("valid histogram bounds")
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered with a result.
    Ok,
    /// A tool ran and failed (`isError: true` in its result).
    ToolError,
    /// Answered with a JSON-RPC error by the upstream.
    RpcError,
    /// Refused by the gateway: malformed, unroutable or not allowed.
    Refused,
    /// The upstream failed, timed out or closed mid-answer.
    UpstreamFailure,
    /// The upstream refused the call with 401 or 403: the gateway's credential, or what this
    /// call may touch. Held against the call's tool, not the upstream's health: a client can
    /// draw one on purpose.
    UpstreamDenied,
    /// The client left before its answer (the call was cancelled upstream, or drained): not
    /// the upstream's failure as far as anyone can tell (nginx's 499), but not a success
    /// either: an upstream that hangs shows as clients that give up, so it counts among the
    /// errors.
    ClientLeft,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ToolError => "tool_error",
            Outcome::RpcError => "rpc_error",
            Outcome::Refused => "refused",
            Outcome::UpstreamFailure => "upstream_failure",
            Outcome::UpstreamDenied => "upstream_denied",
            Outcome::ClientLeft => "client_left",
        }
    }

    pub fn is_error(self) -> bool {
        self != Outcome::Ok
    }
}

/// The dimension a latency series belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    Route,
    Upstream,
    Tool,
    Tenant,
}

impl Dim {
    pub fn label(self) -> &'static str {
        match self {
            Dim::Route => "route",
            Dim::Upstream => "upstream",
            Dim::Tool => "tool",
            Dim::Tenant => "tenant",
        }
    }
}

/// Methods get their own label; anything else is `other` (bounded cardinality).
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "server/discover",
        "subscriptions/listen",
        "notification",
        "response",
        "GET",
        "DELETE",
    ];
    KNOWN
        .iter()
        .find(|k| **k == method)
        .copied()
        .unwrap_or(OTHER)
}

/// One request, as the worker saw it.
pub struct Observation<'a> {
    pub route: &'a str,
    pub upstream: Option<&'a str>,
    pub method: &'static str,
    pub tool: Option<&'a str>,
    pub tenant: &'a str,
    pub outcome: Outcome,
    pub total: Duration,
    pub upstream_wait: Option<Duration>,
    /// The W3C trace id (32 lowercase hex digits) the request carried, for exemplars.
    pub trace_id: Option<&'a str>,
}

/// A traced request that landed in a bucket: shown next to it as an OpenMetrics exemplar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exemplar {
    pub value_us: u64,
    pub trace_id: [u8; 32],
    pub at: SystemTime,
}

impl Exemplar {
    pub fn trace_id(&self) -> &str {
        // Only ever filled from a validated traceparent (ASCII hex).
        std::str::from_utf8(&self.trace_id).unwrap_or("")
    }
}

/// The latest traced request per bucket of one histogram: fixed size, so recording one is a
/// copy, never an allocation.
pub type Exemplars = [Option<Exemplar>; EXEMPLAR_SLOTS];

/// A request count's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct CountKey {
    pub route: String,
    pub method: String,
    pub tool: String,
    pub tenant: String,
    pub outcome: Outcome,
}

/// Latency of one series.
#[derive(Clone)]
pub struct Latency {
    pub total: Histogram<u64>,
    pub gateway: Histogram<u64>,
    pub upstream: Histogram<u64>,
    pub errors: u64,
    /// Requests the upstream failed (no answer: connect error, timeout, closed mid-answer).
    pub failures: u64,
    /// Exemplars of `total`, `gateway` and `upstream`, in that order.
    pub exemplars: [Exemplars; 3],
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            total: hist(),
            gateway: hist(),
            upstream: hist(),
            errors: 0,
            failures: 0,
            exemplars: [[None; EXEMPLAR_SLOTS]; 3],
        }
    }
}

impl Latency {
    fn add(&mut self, other: &Latency) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.total.add(&other.total);
        let _ = self.gateway.add(&other.gateway);
        let _ = self.upstream.add(&other.upstream);
        self.errors += other.errors;
        self.failures += other.failures;
        for (mine, theirs) in self.exemplars.iter_mut().zip(&other.exemplars) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                if let Some(t) = t
                    && m.is_none_or(|m| m.at <= t.at)
                {
                    *m = Some(*t);
                }
            }
        }
    }

    fn note(&mut self, kind: usize, value_us: u64, trace: Option<([u8; 32], SystemTime)>) {
        if let Some((trace_id, at)) = trace {
            self.exemplars[kind][bucket_of(value_us)] = Some(Exemplar {
                value_us,
                trace_id,
                at,
            });
        }
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// What one worker recorded over one interval.
pub struct Interval {
    pub worker: usize,
    pub end: SystemTime,
    pub counts: HashMap<CountKey, u64>,
    pub series: HashMap<(Dim, String), Latency>,
}

type WorkerCountKey = (Rc<str>, &'static str, Rc<str>, Rc<str>, Outcome);

/// A worker's recorder: the worker's alone, so recording takes no lock and no atomic.
pub struct Recorder {
    worker: usize,
    max_tools: usize,
    names: FxHashMap<Box<str>, Rc<str>>,
    tools: usize,
    /// Each count, and where it is by its labels.
    counts: Vec<(WorkerCountKey, u64)>,
    count_at: FxHashMap<WorkerCountKey, usize>,
    /// Each series (never taken out: `take` empties their histograms), and where it is.
    series: Vec<((Dim, Rc<str>), Latency)>,
    series_at: FxHashMap<(Dim, Rc<str>), usize>,
    /// The last request's labels as given, and where its count and series are: the next
    /// request, most often one of the same route, tool, tenant and outcome, finds them by
    /// comparing its labels with these instead of hashing each again (eleven hashes of text a
    /// request).
    last: Last,
}

/// Where `key`'s entry is in `items` (indexed by `at`), made (with a default value) if new.
fn place<K: std::hash::Hash + Eq + Clone, V: Default>(
    items: &mut Vec<(K, V)>,
    at: &mut FxHashMap<K, usize>,
    key: K,
) -> usize {
    if let Some(&i) = at.get(&key) {
        return i;
    }
    items.push((key.clone(), V::default()));
    at.insert(key, items.len() - 1);
    items.len() - 1
}

/// See [`Recorder::last`]. Empty (`count` none) after [`Recorder::take`] empties the counts.
#[derive(Default)]
struct Last {
    route: String,
    tool: Option<String>,
    tenant: String,
    upstream: Option<String>,
    method: &'static str,
    outcome: Option<Outcome>,
    count: Option<usize>,
    /// Route, tenant, tool and upstream.
    series: [Option<usize>; 4],
}

impl Last {
    /// Where `o`'s count and series are, if its labels are the last request's.
    fn places(&self, o: &Observation<'_>) -> Option<(usize, [Option<usize>; 4])> {
        let same = self.outcome == Some(o.outcome)
            && self.method == o.method
            && self.route == o.route
            && self.tenant == o.tenant
            && self.tool.as_deref() == o.tool
            && self.upstream.as_deref() == o.upstream;
        same.then_some((self.count?, self.series))
    }

    /// Notes `o`'s labels, its storage kept.
    fn set(&mut self, o: &Observation<'_>, count: usize, series: [Option<usize>; 4]) {
        let text = |to: &mut String, from: &str| {
            to.clear();
            to.push_str(from);
        };
        let maybe = |to: &mut Option<String>, from: Option<&str>| match from {
            None => *to = None,
            Some(f) => text(to.get_or_insert_default(), f),
        };
        text(&mut self.route, o.route);
        text(&mut self.tenant, o.tenant);
        maybe(&mut self.tool, o.tool);
        maybe(&mut self.upstream, o.upstream);
        self.method = o.method;
        self.outcome = Some(o.outcome);
        self.count = Some(count);
        self.series = series;
    }
}

impl Recorder {
    pub fn new(worker: usize, max_tools: usize) -> Self {
        Self {
            worker,
            max_tools,
            names: FxHashMap::default(),
            tools: 0,
            counts: Vec::new(),
            count_at: FxHashMap::default(),
            series: Vec::new(),
            series_at: FxHashMap::default(),
            last: Last::default(),
        }
    }

    fn name(&mut self, s: &str) -> Rc<str> {
        if let Some(n) = self.names.get(s) {
            return Rc::clone(n);
        }
        let n: Rc<str> = Rc::from(s);
        self.names.insert(s.into(), Rc::clone(&n));
        n
    }

    /// Tool names are the client's to choose: past `max_tools` distinct ones, `other`. A
    /// name takes a place only once an upstream answered a call of it: one the gateway
    /// refused, or could not send, counts as `other` until then (an attacker's review: 60
    /// denied calls of made-up names took every place for good, and the other tenants' tools
    /// were counted as `other` until a restart).
    fn tool(&mut self, s: &str, outcome: Outcome) -> Rc<str> {
        if let Some(n) = self.names.get(s) {
            return Rc::clone(n);
        }
        let answered = matches!(
            outcome,
            Outcome::Ok | Outcome::ToolError | Outcome::RpcError
        );
        if !answered || self.tools >= self.max_tools {
            return self.name(OTHER);
        }
        self.tools += 1;
        self.name(s)
    }

    pub fn record(&mut self, o: &Observation<'_>) {
        let (count, series) = match self.last.places(o) {
            Some(places) => places,
            None => {
                let found = self.find(o);
                self.last.set(o, found.0, found.1);
                found
            }
        };
        self.counts[count].1 += 1;
        let total = micros(o.total);
        let upstream = o.upstream_wait.map(micros);
        let gateway = total.saturating_sub(upstream.unwrap_or(0)).max(1);
        // A trace id is 32 hex digits once validated; anything else is not an exemplar.
        let trace = o
            .trace_id
            .and_then(|t| <[u8; 32]>::try_from(t.as_bytes()).ok())
            .map(|t| (t, SystemTime::now()));
        for at in series.into_iter().flatten() {
            let l = &mut self.series[at].1;
            let _ = l.total.record(total);
            let _ = l.gateway.record(gateway);
            l.note(0, total, trace);
            l.note(1, gateway, trace);
            if let Some(u) = upstream {
                let _ = l.upstream.record(u);
                l.note(2, u, trace);
            }
            l.errors += u64::from(o.outcome.is_error());
            l.failures += u64::from(o.outcome == Outcome::UpstreamFailure);
        }
    }

    /// Where `o`'s count and series are (route, tenant, tool, upstream), each made if new.
    fn find(&mut self, o: &Observation<'_>) -> (usize, [Option<usize>; 4]) {
        let route = self.name(o.route);
        let tool = match o.tool {
            Some(t) => self.tool(t, o.outcome),
            None => self.name(""),
        };
        let tenant = self.name(o.tenant);
        let key = (
            Rc::clone(&route),
            o.method,
            Rc::clone(&tool),
            Rc::clone(&tenant),
            o.outcome,
        );
        let count = place(&mut self.counts, &mut self.count_at, key);
        let upstream = o.upstream.map(|u| self.name(u));
        let mut series = |dim: Dim, name: Rc<str>| {
            Some(place(&mut self.series, &mut self.series_at, (dim, name)))
        };
        let at = [
            series(Dim::Route, route),
            series(Dim::Tenant, tenant),
            if o.tool.is_some() {
                series(Dim::Tool, tool)
            } else {
                None
            },
            upstream.and_then(|u| series(Dim::Upstream, u)),
        ];
        (count, at)
    }

    /// What was recorded since the last call; the recorder starts over (keeping its memory).
    pub fn take(&mut self) -> Option<Interval> {
        if self.counts.is_empty() {
            return None;
        }
        self.count_at.clear();
        self.last.count = None;
        let counts = self
            .counts
            .drain(..)
            .map(|((route, method, tool, tenant, outcome), n)| {
                let key = CountKey {
                    route: route.to_string(),
                    method: method.to_owned(),
                    tool: tool.to_string(),
                    tenant: tenant.to_string(),
                    outcome,
                };
                (key, n)
            })
            .collect();
        let series = self
            .series
            .iter_mut()
            .filter(|(_, l)| !l.total.is_empty())
            .map(|((dim, name), l)| {
                let out = l.clone();
                l.total.reset();
                l.gateway.reset();
                l.upstream.reset();
                l.errors = 0;
                l.failures = 0;
                l.exemplars = [[None; EXEMPLAR_SLOTS]; 3];
                ((*dim, name.to_string()), out)
            })
            .collect();
        Some(Interval {
            worker: self.worker,
            end: SystemTime::now(),
            counts,
            series,
        })
    }
}

type SeriesMap = BTreeMap<(Dim, String), Latency>;

/// Recent history: what arrived in one slot of time.
struct Slot {
    start: SystemTime,
    counts: HashMap<CountKey, u64>,
    series: HashMap<(Dim, String), Latency>,
}

/// The control thread's merge of every worker's intervals.
pub struct Aggregator {
    max_tools: usize,
    pub counts: BTreeMap<CountKey, u64>,
    pub series: BTreeMap<(Dim, String), Latency>,
    slots: VecDeque<Slot>,
    started: SystemTime,
    log: Option<HistogramLog>,
}

impl Aggregator {
    pub fn new(max_tools: usize, log: Option<HistogramLog>) -> Self {
        Self {
            max_tools,
            counts: BTreeMap::new(),
            series: BTreeMap::new(),
            slots: VecDeque::new(),
            started: SystemTime::now(),
            log,
        }
    }

    /// Reopens the histogram log, if there is one (see [`HistogramLog::reopen`]).
    pub fn reopen_log(&mut self) -> std::io::Result<()> {
        self.log.as_mut().map_or(Ok(()), HistogramLog::reopen)
    }

    /// Folds tools past the bound into `other` (workers bound their own sets; the union may
    /// be larger).
    fn bounded(&self, dim: Dim, name: String) -> String {
        if dim != Dim::Tool || self.series.contains_key(&(dim, name.clone())) {
            return name;
        }
        let tools = self.series.keys().filter(|(d, _)| *d == Dim::Tool).count();
        if tools >= self.max_tools {
            OTHER.to_owned()
        } else {
            name
        }
    }

    pub fn add(&mut self, interval: Interval) {
        let now = interval.end;
        if self
            .slots
            .back()
            .is_none_or(|s| now.duration_since(s.start).unwrap_or_default() >= SLOT)
        {
            if self.slots.len() == SLOTS {
                self.slots.pop_front();
            }
            self.slots.push_back(Slot {
                start: now,
                counts: HashMap::new(),
                series: HashMap::new(),
            });
        }
        if let Some(log) = &mut self.log {
            log.write(&interval);
        }
        for (mut key, n) in interval.counts {
            if !key.tool.is_empty() && !self.series.contains_key(&(Dim::Tool, key.tool.clone())) {
                key.tool = self.bounded(Dim::Tool, key.tool);
            }
            *self.counts.entry(key.clone()).or_default() += n;
            let slot = self.slots.back_mut().expect("a slot was pushed");
            *slot.counts.entry(key).or_default() += n;
        }
        for ((dim, name), l) in interval.series {
            let name = self.bounded(dim, name);
            self.series.entry((dim, name.clone())).or_default().add(&l);
            let slot = self.slots.back_mut().expect("a slot was pushed");
            slot.series.entry((dim, name)).or_default().add(&l);
        }
    }

    /// Per upstream, (requests, failed) over about the last 10–20 s (the last two slots).
    pub fn recent_upstreams(&self) -> BTreeMap<String, (u64, u64)> {
        let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let (_, _, series) = self.window(Some(SLOT));
        for ((dim, name), l) in series {
            if dim == Dim::Upstream {
                let e = out.entry(name).or_default();
                e.0 += l.total.len();
                e.1 += l.failures;
            }
        }
        out
    }

    /// Counts and latency over the last `window` (rounded up to whole slots), or since start.
    fn window(&self, window: Option<Duration>) -> (f64, BTreeMap<CountKey, u64>, SeriesMap) {
        let Some(window) = window else {
            let secs = SystemTime::now()
                .duration_since(self.started)
                .unwrap_or_default()
                .as_secs_f64();
            return (secs, self.counts.clone(), self.series.clone());
        };
        let now = SystemTime::now();
        let mut counts = BTreeMap::new();
        let mut series: BTreeMap<(Dim, String), Latency> = BTreeMap::new();
        let mut oldest = now;
        for slot in self.slots.iter().rev() {
            let age = now.duration_since(slot.start).unwrap_or_default();
            if age > window + SLOT {
                break;
            }
            oldest = slot.start;
            for (k, n) in &slot.counts {
                *counts.entry(k.clone()).or_default() += n;
            }
            for (k, l) in &slot.series {
                series.entry(k.clone()).or_default().add(l);
            }
        }
        let secs = now
            .duration_since(oldest)
            .unwrap_or_default()
            .as_secs_f64()
            .max(1.0);
        (secs, counts, series)
    }

    /// `/stats`: per series, count, rate, errors and percentiles (µs) of each latency kind.
    pub fn stats(&self, window: Option<Duration>) -> Value {
        let (secs, counts, series) = self.window(window);
        let pct = |h: &Histogram<u64>| {
            if h.is_empty() {
                return Value::Null;
            }
            json!({
                "p50": h.value_at_quantile(0.5),
                "p90": h.value_at_quantile(0.9),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
                "max": h.max(),
                "mean": (h.mean() * 10.0).round() / 10.0,
            })
        };
        let series: Vec<Value> = series
            .iter()
            .map(|((dim, name), l)| {
                let n = l.total.len();
                json!({
                    "dim": dim,
                    "name": name,
                    "count": n,
                    "rps": (n as f64 / secs * 100.0).round() / 100.0,
                    "errors": l.errors,
                    "total_us": pct(&l.total),
                    "gateway_us": pct(&l.gateway),
                    "upstream_us": pct(&l.upstream),
                    "distribution": distribution(&l.total),
                })
            })
            .collect();
        let requests: Vec<Value> = counts
            .iter()
            .map(|(k, n)| {
                json!({
                    "route": k.route, "method": k.method, "tool": k.tool,
                    "tenant": k.tenant, "outcome": k.outcome, "count": n,
                })
            })
            .collect();
        json!({
            "window_seconds": (secs * 10.0).round() / 10.0,
            "series": series,
            "requests": requests,
        })
    }
}

/// A coarse view of a histogram for a terminal: counts in power-of-two microsecond buckets.
fn distribution(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut low = 0;
    let mut high = 16;
    while low <= h.max() {
        out.push((high, h.count_between(low + 1, high)));
        low = high;
        high *= 2;
    }
    out
}

/// Interval histograms in the standard HdrHistogram log format (V2, compressed), one line per
/// worker, series and interval, tagged `<dim>=<name>`; read by HistogramLogAnalyzer,
/// hdr-plot and the other tools of that format.
pub struct HistogramLog {
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    started: SystemTime,
    serializer: hdrhistogram::serialization::V2DeflateSerializer,
}

impl HistogramLog {
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        use std::io::Write as _;
        let mut file = std::io::BufWriter::new(crate::host::open_log_file(path, false)?);
        let started = SystemTime::now();
        let secs = started
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        writeln!(
            file,
            "#[Histogram log written by mcp-gateway; values in microseconds]"
        )?;
        writeln!(file, "#[StartTime: {secs:.3} (seconds since epoch)]")?;
        writeln!(file, "#[BaseTime: {secs:.3} (seconds since epoch)]")?;
        writeln!(
            file,
            "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
        )?;
        file.flush()?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            started,
            serializer: hdrhistogram::serialization::V2DeflateSerializer::new(),
        })
    }

    /// Starts a new file at the same path (after a rotation moved the old one): a log of its
    /// own, with its own header, so each file reads alone. On failure the old file is kept.
    pub fn reopen(&mut self) -> std::io::Result<()> {
        use std::io::Write as _;
        self.file.flush()?;
        *self = Self::create(&self.path)?;
        Ok(())
    }

    fn write(&mut self, interval: &Interval) {
        use base64::Engine as _;
        use hdrhistogram::serialization::Serializer as _;
        use std::io::Write as _;
        let end = interval
            .end
            .duration_since(self.started)
            .unwrap_or_default()
            .as_secs_f64();
        let start = (end - 1.0).max(0.0);
        for ((dim, name), l) in &interval.series {
            let mut buf = Vec::new();
            if self.serializer.serialize(&l.total, &mut buf).is_err() {
                continue;
            }
            let tag: String = format!("{}={name}", dim.label())
                .chars()
                .map(|c| {
                    if c == ',' || c.is_whitespace() {
                        '_'
                    } else {
                        c
                    }
                })
                .collect();
            let _ = writeln!(
                self.file,
                "Tag={tag},{start:.3},{:.3},{:.3},{}",
                end - start,
                l.total.max() as f64,
                base64::engine::general_purpose::STANDARD.encode(&buf)
            );
        }
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs<'a>(tool: &'a str, tenant: &'a str, ms: u64, outcome: Outcome) -> Observation<'a> {
        Observation {
            route: "/mcp",
            upstream: Some("u"),
            method: "tools/call",
            tool: Some(tool),
            tenant,
            outcome,
            total: Duration::from_millis(ms),
            upstream_wait: Some(Duration::from_millis(ms.saturating_sub(1))),
            trace_id: None,
        }
    }

    /// Calls the gateway refused, or could not send, take no place among the tools: made-up
    /// names refused by policy took every place for good before (an attacker's review).
    #[test]
    fn a_tool_takes_a_place_only_once_an_upstream_answered_it() {
        let mut r = Recorder::new(0, 2);
        for i in 0..60 {
            let junk = format!("junk_{i}");
            r.record(&obs(&junk, "two", 1, Outcome::Refused));
            r.record(&obs(&junk, "two", 1, Outcome::UpstreamFailure));
        }
        r.record(&obs("echo", "one", 1, Outcome::Ok));
        r.record(&obs("fails", "one", 1, Outcome::ToolError));
        r.record(&obs("late", "one", 1, Outcome::Ok));
        let mut agg = Aggregator::new(10, None);
        agg.add(r.take().unwrap());
        let tools: Vec<&str> = agg
            .series
            .keys()
            .filter(|(d, _)| *d == Dim::Tool)
            .map(|(_, n)| n.as_str())
            .collect();
        assert_eq!(tools, ["echo", "fails", OTHER]);
        assert_eq!(
            agg.series[&(Dim::Tool, OTHER.to_owned())].total.len(),
            121,
            "the 120 junk calls and the third tool"
        );
    }

    #[test]
    fn workers_record_alone_and_the_merge_adds_up() {
        let mut a = Recorder::new(0, 2);
        let mut b = Recorder::new(1, 2);
        for i in 0..100 {
            a.record(&obs("add", "acme", 10 + i % 10, Outcome::Ok));
        }
        b.record(&obs("add", "acme", 500, Outcome::ToolError));
        // Past two distinct tools, `other`.
        b.record(&obs("echo", "acme", 5, Outcome::Ok));
        b.record(&obs("rm", "acme", 5, Outcome::Ok));
        let mut agg = Aggregator::new(10, None);
        agg.add(a.take().unwrap());
        agg.add(b.take().unwrap());
        assert!(a.take().is_none(), "taken intervals start over");
        let key = |tool: &str, outcome| CountKey {
            route: "/mcp".into(),
            method: "tools/call".into(),
            tool: tool.into(),
            tenant: "acme".into(),
            outcome,
        };
        assert_eq!(agg.counts[&key("add", Outcome::Ok)], 100);
        assert_eq!(agg.counts[&key("add", Outcome::ToolError)], 1);
        assert_eq!(agg.counts[&key(OTHER, Outcome::Ok)], 1);
        let add = &agg.series[&(Dim::Tool, "add".to_owned())];
        assert_eq!(add.total.len(), 101);
        assert_eq!(add.errors, 1);
        let p50 = add.total.value_at_quantile(0.5);
        assert!((14_000..=15_200).contains(&p50), "{p50}");
        // Time in the gateway: total minus the upstream's 1 ms less.
        assert!((990..=1010).contains(&add.gateway.value_at_quantile(0.5)));
        let tenant = &agg.series[&(Dim::Tenant, "acme".to_owned())];
        assert_eq!(tenant.total.len(), 103);
        let stats = agg.stats(Some(Duration::from_secs(60)));
        let series = stats["series"].as_array().unwrap();
        let add = series
            .iter()
            .find(|s| s["dim"] == "tool" && s["name"] == "add")
            .unwrap();
        assert_eq!(add["count"], 101);
        assert!(add["total_us"]["max"].as_u64().unwrap() >= 500_000);
    }

    #[test]
    fn the_histogram_log_is_in_the_standard_format() {
        let dir = std::env::temp_dir().join(format!("hlog-{}", std::process::id()));
        let mut log = HistogramLog::create(&dir).unwrap();
        let mut r = Recorder::new(0, 10);
        r.record(&obs("add", "acme", 3, Outcome::Ok));
        log.write(&r.take().unwrap());
        drop(log);
        let text = std::fs::read_to_string(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        let data: Vec<&str> = text.lines().filter(|l| l.starts_with("Tag=")).collect();
        assert_eq!(data.len(), 4, "{text}");
        // Each line decodes back into the histogram it was written from.
        let line = data
            .iter()
            .find(|l| l.starts_with("Tag=tool=add,"))
            .unwrap();
        let b64 = line.rsplit(',').next().unwrap();
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .unwrap();
        assert_eq!(h.len(), 1);
        assert!((2_970..=3_030).contains(&h.max()), "{}", h.max());
    }
}
