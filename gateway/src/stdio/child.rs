//! The supervisor of one stdio upstream: a tokio task on the control thread that owns the
//! child process and everything written to or read from it.

use std::{
    collections::{HashMap, VecDeque},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::policy::pins::Digests;
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    process::Child,
};

use super::{
    Handle, PinGate, Queued, Slot, StdioError, StdioSpec, ToChild,
    cgroup::Cgroup,
    mux::{Inbound, Mux, Refused, unknown_task},
    sandbox,
};

/// The protocol version the gateway asks a child for (the newest of the session era).
const PROTOCOL_VERSION: &str = "2025-11-25";

/// Starts the supervisor of `spec` on the current tokio runtime (the control thread's) and
/// returns the workers' handle. The child itself starts on the first call.
pub fn spawn(spec: StdioSpec, gate: Option<Arc<dyn PinGate>>) -> Handle {
    let (tx, rx) = mpsc::unbounded();
    let name: Arc<str> = Arc::from(spec.name.as_str());
    tokio::spawn(supervise(spec, gate, rx));
    Handle::new(tx, name)
}

/// A line from the child, bounded.
enum Line {
    Text(Vec<u8>),
    /// Longer than the limit: it was skipped, and only the id its first or last bytes give
    /// (a JSON-RPC answer's, where SDKs write it) kept.
    TooLong(Option<u64>),
    Eof,
}

/// What is kept of each end of a line over the limit, to find its id.
const ENDS_KEPT: usize = 4096;

/// Reads lines of at most `max` bytes. Cancel-safe: its state lives here, not in the future,
/// so it can sit in a `select!`.
struct Lines<R> {
    inner: R,
    line: Vec<u8>,
    /// A line is being skipped, since it passed the limit then.
    skipping: Option<Instant>,
    /// Of a line being skipped: its first bytes are `line`'s, its last `tail`'s.
    tail: VecDeque<u8>,
    max: usize,
    /// A line still skipped this long after it passed the limit answers no call that still
    /// waits (the call timeout): the child writes without ever ending a line, and it kept the
    /// control thread reading for as long as it wrote (an attacker's review). It is stopped.
    endless: Duration,
}

impl<R: AsyncBufRead + Unpin> Lines<R> {
    fn new(inner: R, max: usize, endless: Duration) -> Self {
        Self {
            inner,
            line: Vec::new(),
            skipping: None,
            tail: VecDeque::new(),
            max,
            endless,
        }
    }

    async fn next(&mut self) -> std::io::Result<Line> {
        loop {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                return Ok(Line::Eof);
            }
            let (part, used, end) = match memchr(buf) {
                Some(i) => (&buf[..i], i + 1, true),
                None => (buf, buf.len(), false),
            };
            if self.skipping.is_none() && self.line.len() + part.len() > self.max {
                self.skipping = Some(Instant::now());
                self.tail.clear();
                self.tail
                    .extend(&self.line[self.line.len().saturating_sub(ENDS_KEPT)..]);
                self.line.truncate(ENDS_KEPT);
                self.line.shrink_to(ENDS_KEPT);
            }
            if let Some(since) = self.skipping {
                if since.elapsed() > self.endless {
                    return Err(std::io::Error::other(format!(
                        "it wrote a line over the limit without an end for {} ms",
                        self.endless.as_millis()
                    )));
                }
                let room = ENDS_KEPT.saturating_sub(self.line.len());
                self.line.extend_from_slice(&part[..room.min(part.len())]);
                let last = &part[part.len().saturating_sub(ENDS_KEPT)..];
                self.tail.extend(last);
                let over = self.tail.len().saturating_sub(ENDS_KEPT);
                self.tail.drain(..over);
            } else {
                self.line.extend_from_slice(part);
            }
            self.inner.consume(used);
            if end {
                if self.skipping.take().is_some() {
                    let head = std::mem::take(&mut self.line);
                    let tail: Vec<u8> = std::mem::take(&mut self.tail).into();
                    return Ok(Line::TooLong(first_id(&head).or_else(|| last_id(&tail))));
                }
                return Ok(Line::Text(std::mem::take(&mut self.line)));
            }
        }
    }
}

/// The child's stdin, written by a task of its own, so that its stdout is read meanwhile.
/// Written by the supervisor itself, a large request to a child that writes its answer before
/// it reads the next line (one request at a time) waited on the child, and the child on the
/// supervisor, until the call timed out, and every call in flight failed with it (an
/// attacker's review: a 300 KB request behind a 2 MB answer).
struct Input {
    /// Each line with its place in what waits for the child ([`Slot`]), given back once
    /// written.
    lines: mpsc::UnboundedSender<(Vec<u8>, Slot)>,
    /// The places of the supervisor's own lines (its `initialize`, cancellations, answers to
    /// the child's own requests), apart from the clients' messages, which hold places in the
    /// upstream's queue: a child that asks and never reads the answers fills no more than
    /// [`OWN_BYTES`].
    own: Arc<Queued>,
    /// Resolves when a line was not taken within the call timeout, or the pipe broke.
    blocked: oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Messages a supervisor takes (from its child and its workers) before it lets the other
/// tasks of its thread run.
const LINES_IN_A_ROW: u32 = 64;

/// Bytes of the supervisor's own lines that may wait for the child.
const OWN_BYTES: usize = 1 << 20;

impl Input {
    fn new(stdin: OwnedWriteHalf, within: Duration) -> Self {
        let (lines, rx) = mpsc::unbounded();
        let (tell, blocked) = oneshot::channel();
        let task = tokio::spawn(write_lines(stdin, rx, within, tell));
        Self {
            lines,
            own: Arc::default(),
            blocked,
            task,
        }
    }

    /// Queues one of the supervisor's own lines (a message and its newline), within
    /// [`OWN_BYTES`]. Queued lines wait at most the call timeout each for the child to take
    /// them (then the child is stopped).
    fn send(&self, line: Vec<u8>) -> Result<(), String> {
        let slot = Slot::take(&self.own, line.len(), false, OWN_BYTES)
            .ok_or_else(|| "its input is full".to_owned())?;
        self.send_in(line, slot)
    }

    /// Queues a client's line in the place it holds.
    fn send_in(&self, line: Vec<u8>, slot: Slot) -> Result<(), String> {
        self.lines
            .unbounded_send((line, slot))
            .map_err(|_| "its input is closed".to_owned())
    }
}

async fn write_lines(
    mut stdin: OwnedWriteHalf,
    mut lines: mpsc::UnboundedReceiver<(Vec<u8>, Slot)>,
    within: Duration,
    blocked: oneshot::Sender<()>,
) {
    // Each place is given back as its line is written.
    while let Some((line, _slot)) = lines.next().await {
        if !matches!(
            tokio::time::timeout(within, stdin.write_all(&line)).await,
            Ok(Ok(()))
        ) {
            let _ = blocked.send(());
            return;
        }
    }
}

/// What the child did next: wrote a line, or did not take its input.
enum FromChild {
    Line(std::io::Result<Line>),
    Blocked,
}

async fn from_child(running: &mut Option<Running>) -> FromChild {
    match running {
        Some(r) => tokio::select! {
            line = r.stdout.next() => FromChild::Line(line),
            _ = &mut r.stdin.blocked => FromChild::Blocked,
        },
        None => std::future::pending().await,
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|b| *b == b'\n')
}

/// The numeric id among the top-level members at the start of a JSON object (where the Python
/// SDK writes it: `{"jsonrpc":"2.0","id":7,"result":...`), if the bytes seen give it.
fn first_id(head: &[u8]) -> Option<u64> {
    let mut depth = 0usize;
    let mut i = 0;
    // Whether the string that starts at depth 1 after `{` or `,` is a key.
    let mut key_next = false;
    while i < head.len() {
        match head[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < head.len() && head[i] != b'"' {
                    i += if head[i] == b'\\' { 2 } else { 1 };
                }
                let text = head.get(start..i)?;
                if depth == 1 && key_next && text == b"id" {
                    return number_after_colon(head.get(i + 1..)?);
                }
                key_next = false;
            }
            b'{' | b'[' => {
                depth += 1;
                key_next = head[i] == b'{';
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' => key_next = depth == 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// `: 123` (spaces allowed) at the start of `rest`, up to a `,` or `}`.
fn number_after_colon(rest: &[u8]) -> Option<u64> {
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let after = rest[digits..].trim_ascii_start();
    if digits == 0 || !matches!(after.first(), Some(b',' | b'}')) {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The numeric id that ends a JSON object (where the TypeScript SDK writes it:
/// `...,"jsonrpc":"2.0","id":7}`): the member before the last `}` is a top-level one.
fn last_id(tail: &[u8]) -> Option<u64> {
    let t = tail.trim_ascii_end().strip_suffix(b"}")?.trim_ascii_end();
    let digits = t.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (before, number) = t.split_at(t.len() - digits);
    let before = before.trim_ascii_end().strip_suffix(b":")?.trim_ascii_end();
    if digits == 0 || !before.ends_with(b"\"id\"") || before.ends_with(b"\\\"id\"") {
        return None;
    }
    std::str::from_utf8(number).ok()?.parse().ok()
}

/// A running child.
struct Running {
    child: Child,
    stdin: Input,
    stdout: Lines<BufReader<OwnedReadHalf>>,
    pgid: i32,
    /// Its cgroup, where the gateway can make one: ended with it.
    cgroup: Option<Cgroup>,
    /// The child's answer to `initialize` (what clients are told).
    init: Value,
}

/// A call in flight.
struct Waiter {
    events: mpsc::Sender<Vec<u8>>,
    done: oneshot::Sender<Result<Vec<u8>, StdioError>>,
    deadline: tokio::time::Instant,
    /// A `tools/list` of a per-caller child: its answer tells [`Supervisor::defined`].
    lists_tools: bool,
}

struct Supervisor {
    spec: StdioSpec,
    mux: Mux,
    waiters: HashMap<u64, Waiter>,
    starts: VecDeque<Instant>,
    down_until: Option<Instant>,
    /// The last start that failed, when, and why: a call sent before it waited for that start
    /// and fails with it, instead of starting the child once more (a client that sent calls
    /// and left made the child start once for each, one after another, before the next
    /// caller's call: 115 s for a child that never answered `initialize`).
    failed_start: Option<(Instant, StdioError)>,
    last_call: Instant,
    gate: Option<Arc<dyn PinGate>>,
    /// The child's home folder, made at its first start and kept across restarts; removed when
    /// the supervisor ends (after the child: `running` is dropped first).
    home: Option<sandbox::Home>,
    /// A per-caller child's tools as it last listed them (at its start, and in each answer to
    /// a client's `tools/list`), by name: its caller's calls are judged by them, not by what
    /// another caller's child listed ([`PinGate::callable`]). `None` for a shared child.
    defined: Option<HashMap<String, Digests>>,
    /// The child's tools read again, after it said they changed ([`Supervisor::tools_changed`]).
    relisting: Option<Relisting>,
    /// Re-readings asked so far: each page's id is new.
    relists: u64,
}

/// A re-reading of a child's tools under way, page by page, as its start's ([`list_tools`]) is.
struct Relisting {
    /// The id the page asked for was sent under (`mcp-gateway-relist-<n>`).
    id: Value,
    page: u32,
    pages: crate::values::Pages,
    tools: Vec<Value>,
    asked_at: Instant,
    /// The child said its tools changed again meanwhile: read once more when this is done.
    again: bool,
}

/// A reading of what a child's home holds, under way off the control thread, and the pid of the
/// child it is of.
type HomeReading = (tokio::task::JoinHandle<Result<u64, String>>, Option<u32>);

/// Ticks (of 200 ms) between readings of what a running child's home holds.
const HOME_READ_TICKS: u32 = 5;

/// Tools a per-caller child's [`Supervisor::defined`] keeps at most (as its upstream's share
/// of the pin table: past it, a tool is refused as unlisted, [`StdioError::Unlisted`]).
const MAX_DEFINED: usize = crate::policy::pins::MAX_PINS_PER_UPSTREAM;

async fn supervise(
    spec: StdioSpec,
    gate: Option<Arc<dyn PinGate>>,
    mut rx: mpsc::UnboundedReceiver<ToChild>,
) {
    let _live = super::Live::new();
    // A per-caller dispatcher's child (`per_caller` kept as `Some`) serves one caller.
    let one_caller = spec.per_caller.is_some();
    let mux = if one_caller {
        Mux::for_one_caller()
    } else {
        Mux::new()
    };
    let mut s = Supervisor {
        spec,
        gate,
        mux,
        waiters: HashMap::new(),
        starts: VecDeque::new(),
        down_until: None,
        failed_start: None,
        last_call: Instant::now(),
        home: None,
        defined: one_caller.then(HashMap::new),
        relisting: None,
        relists: 0,
    };
    let mut running: Option<Running> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks = 0u32;
    // A reading of the home's use under way (off this thread), and the child it is of.
    let mut home_read: Option<HomeReading> = None;
    // Lines taken since this supervisor last let the thread's other tasks run: lines already
    // read into the buffer come without a wait, and a child writing without end (16 million
    // lines in 10 s) kept the control thread, the admin API and every other child's
    // supervisor waiting (a review).
    let mut in_a_row = 0u32;
    loop {
        in_a_row += 1;
        if in_a_row >= LINES_IN_A_ROW {
            in_a_row = 0;
            tokio::task::yield_now().await;
        }
        tokio::select! {
            msg = rx.next() => match msg {
                None => {
                    if let Some(r) = running.take() {
                        stop(r, s.spec.stop_grace).await;
                    }
                    s.fail_all(&StdioError::Gone(s.spec.name.clone()));
                    return;
                }
                Some(msg) => s.take_from_worker(msg, &mut running).await,
            },
            from = from_child(&mut running) => match from {
                FromChild::Blocked => {
                    tracing::warn!(upstream = %s.spec.name, "stdio upstream does not take its input; stopping it");
                    s.stop_broken(&mut running, "stdin blocked".into()).await;
                }
                FromChild::Line(Ok(Line::Text(bytes))) => s.take_from_child(&bytes, &mut running),
                FromChild::Line(Ok(Line::TooLong(id))) => s.too_long(id),
                FromChild::Line(Err(e)) => {
                    tracing::warn!(upstream = %s.spec.name, error = %e, "stdio upstream's output cannot be read; stopping it");
                    s.stop_broken(&mut running, e.to_string()).await;
                }
                FromChild::Line(Ok(Line::Eof)) => {
                    if let Some(r) = running.take() {
                        let status = exit_status(r).await;
                        tracing::warn!(upstream = %s.spec.name, %status, "stdio upstream exited");
                        s.fail_all(&StdioError::Exited(s.spec.name.clone(), status));
                    }
                }
            },
            read = async { (&mut home_read.as_mut().expect("a reading").0).await }, if home_read.is_some() => {
                let of = home_read.take().and_then(|(_, of)| of);
                // Of the child running now (a reading of one stopped since stops no other).
                if let Ok(Err(why)) = read
                    && running.as_ref().is_some_and(|r| r.child.id() == of)
                {
                    s.home_over(&mut running, why).await;
                }
            }
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                // Once a second, while the child runs: what its home holds.
                let max = s.spec.sandbox.max_home_bytes;
                if ticks.is_multiple_of(HOME_READ_TICKS)
                    && max > 0
                    && running.is_some()
                    && home_read.is_none()
                    && let Some(home) = &s.home
                    && let Some(r) = &running
                {
                    let home = home.path().to_owned();
                    // Its processes, for the files they hold open after removing them.
                    let pids = match &r.cgroup {
                        Some(cgroup) => cgroup.pids(),
                        None => r.child.id().and_then(|p| i32::try_from(p).ok()).into_iter().collect(),
                    };
                    home_read = Some((
                        tokio::task::spawn_blocking(move || sandbox::home_usage(&home, max, &pids)),
                        r.child.id(),
                    ));
                }
                s.expire(&mut running);
                if let (Some(idle), true) = (s.spec.idle_shutdown, running.is_some())
                    && s.mux.in_flight() == 0
                    && s.last_call.elapsed() >= idle
                    && let Some(r) = running.take()
                {
                    tracing::info!(upstream = %s.spec.name, "stdio upstream idle; stopped");
                    stop(r, s.spec.stop_grace).await;
                }
            }
        }
    }
}

impl Supervisor {
    fn name(&self) -> String {
        self.spec.name.clone()
    }

    async fn take_from_worker(&mut self, msg: ToChild, running: &mut Option<Running>) {
        self.last_call = Instant::now();
        match msg {
            ToChild::Request {
                who: super::Who { caller, .. },
                message,
                events,
                done,
                slot,
                sent,
            } => {
                // A caller that left already: nothing is started or written for it.
                if done.is_canceled() {
                    return;
                }
                if let Some((at, e)) = &self.failed_start
                    && sent <= *at
                {
                    let _ = done.send(Err(e.clone()));
                    return;
                }
                let parsed: Value = match serde_json::from_slice(&message) {
                    Ok(v) => v,
                    Err(_) => {
                        let _ = done.send(Err(StdioError::Refused(self.name(), "not JSON".into())));
                        return;
                    }
                };
                if let Err(e) = self.ensure_started(running).await {
                    self.failed_start = Some((Instant::now(), e.clone()));
                    let _ = done.send(Err(e));
                    return;
                }
                let Some(r) = running.as_mut() else {
                    return;
                };
                if let Some(refusal) = self.refused_by_pins(&parsed) {
                    let _ = done.send(Err(refusal));
                    return;
                }
                // The child was initialized once, by the gateway: a client's initialize is
                // answered from that.
                if parsed.get("method").and_then(Value::as_str) == Some("initialize") {
                    let answer = json!({"jsonrpc": "2.0", "id": parsed.get("id").cloned().unwrap_or(Value::Null), "result": r.init});
                    let _ = done.send(Ok(answer.to_string().into_bytes()));
                    return;
                }
                let id = parsed.get("id").cloned().unwrap_or(Value::Null);
                let lists_tools = self.defined.is_some()
                    && parsed.get("method").and_then(Value::as_str) == Some("tools/list");
                let (call, out) = match self.mux.request(caller, parsed) {
                    Ok(x) => x,
                    Err(Refused::UnknownTask) => {
                        let answer = unknown_task(id);
                        let _ = done.send(Ok(answer.to_string().into_bytes()));
                        return;
                    }
                    Err(e) => {
                        let _ = done.send(Err(StdioError::Refused(self.name(), format!("{e:?}"))));
                        return;
                    }
                };
                self.waiters.insert(
                    call,
                    Waiter {
                        events,
                        done,
                        deadline: tokio::time::Instant::now() + self.spec.call_timeout,
                        lists_tools,
                    },
                );
                self.write(running, &out, Some(slot));
            }
            ToChild::Notification {
                caller,
                message,
                slot,
            } => {
                let Ok(parsed) = serde_json::from_slice::<Value>(&message) else {
                    return;
                };
                if let Some(out) = self.mux.notification(caller, parsed)
                    && running.is_some()
                {
                    self.write(running, &out, Some(slot));
                }
            }
            ToChild::Response {
                caller,
                message,
                slot,
            } => {
                let Ok(parsed) = serde_json::from_slice::<Value>(&message) else {
                    return;
                };
                if let Ok(out) = self.mux.response(caller, parsed)
                    && running.is_some()
                {
                    self.write(running, &out, Some(slot));
                }
            }
        }
    }

    fn take_from_child(&mut self, bytes: &[u8], running: &mut Option<Running>) {
        let parsed = crate::values::within(bytes)
            .ok()
            .and_then(|()| serde_json::from_slice::<Value>(bytes).ok());
        let Some(message) = parsed else {
            // Throttled, as its stderr is: a child writing noise in a loop must not fill the log.
            crate::throttled_warn!(upstream = %self.spec.name, bytes = bytes.len(), "stdio upstream wrote a line that is not JSON, or holds too many values; skipped");
            // The answer of the call its id names fails at once: left to time out, a result
            // the gateway cannot read (a sum past 1e308) counted against the upstream's shared
            // breaker, and two such calls of one tenant opened it for every tenant (an
            // attacker's review).
            let id = first_id(bytes).or_else(|| last_id(bytes));
            self.fail_named(id, StdioError::Unreadable(self.name()));
            return;
        };
        if let Some(r) = &self.relisting
            && message.get("method").is_none()
            && message.get("id") == Some(&r.id)
        {
            self.relisted(bytes, &message, running);
            return;
        }
        match self.mux.inbound(message) {
            Inbound::Done { call, message } => {
                if let Some(w) = self.waiters.remove(&call) {
                    if w.lists_tools
                        && let Some(tools) = message["result"]["tools"].as_array()
                    {
                        self.note_defined(tools);
                    }
                    let _ = w.done.send(Ok(message.to_string().into_bytes()));
                }
            }
            Inbound::Event { call, message } => {
                if let Some(w) = self.waiters.get_mut(&call) {
                    // A full queue drops the event: a flood is never buffered without bound.
                    let _ = w.events.try_send(message.to_string().into_bytes());
                }
            }
            Inbound::Reply(answer) => self.write(running, &answer, None),
            Inbound::ListChanged(what) => {
                // At debug: a child can send these in a loop (200,000 wrote 28 MB of log, a
                // review); a re-reading of its tools is logged once as it starts.
                tracing::debug!(upstream = %self.spec.name, %what, "stdio upstream's list changed");
                if what == "notifications/tools/list_changed" {
                    self.tools_changed(running);
                }
            }
            Inbound::Drop(why) => {
                tracing::debug!(upstream = %self.spec.name, why, "stdio message dropped");
            }
        }
    }

    /// A line over the limit was skipped: the answer of the call its id names, if one in
    /// flight. Before, it was taken for the answer of the one call in flight, whatever its id:
    /// a tenant whose call the gateway had given up on (its client left) failed another
    /// tenant's call with its own over-long answer (an attacker's review). One whose id cannot
    /// be read leaves its call to time out.
    fn too_long(&mut self, id: Option<u64>) {
        crate::throttled_warn!(upstream = %self.spec.name, max = self.spec.max_line_bytes, "stdio upstream wrote a line over the limit; skipped");
        self.fail_named(
            id,
            StdioError::TooLong(self.name(), self.spec.max_line_bytes),
        );
    }

    /// Fails the call in flight that `id` names (a skipped line's), if any, with `why`.
    fn fail_named(&mut self, id: Option<u64>, why: StdioError) {
        if let Some(call) = id.filter(|c| self.waiters.contains_key(c)) {
            self.mux.forget(call);
            if let Some(w) = self.waiters.remove(&call) {
                let _ = w.done.send(Err(why));
            }
        }
    }

    /// Queues `message` for the child, in `slot` (a client's message) or among the
    /// supervisor's own lines; one it does not take in time stops it (see `Input`). One of the
    /// supervisor's own past [`OWN_BYTES`] is dropped.
    fn write(&mut self, running: &mut Option<Running>, message: &Value, slot: Option<Slot>) {
        let Some(r) = running.as_mut() else {
            return;
        };
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        // A closed input is told by `blocked` as well.
        let sent = match slot {
            Some(slot) => r.stdin.send_in(line, slot),
            None => r.stdin.send(line),
        };
        if let Err(why) = sent {
            crate::throttled_warn!(upstream = %self.spec.name, why, "stdio upstream: a message was not written to its child");
        }
    }

    /// The child said its tools changed: they are read again (with pins on), so that a changed
    /// definition is held for approval before any listing by a client. Before, the change went
    /// unseen until a client listed, and its calls ran meanwhile (the definitions a per-caller
    /// child's calls are judged by were its last listing's, a review).
    fn tools_changed(&mut self, running: &mut Option<Running>) {
        if !self.gate.as_ref().is_some_and(|g| g.enabled()) {
            return;
        }
        match &mut self.relisting {
            Some(r) => r.again = true,
            None => {
                // Once a second at most: a child can say so again as soon as it is read.
                std::thread_local! {
                    static SAID: std::cell::RefCell<crate::runtime::Throttle> =
                        std::cell::RefCell::new(crate::runtime::Throttle::default());
                }
                if let Some(suppressed) = SAID.with(|t| t.borrow_mut().allow()) {
                    tracing::info!(upstream = %self.spec.name, suppressed, "stdio upstream's tools changed; reading them again");
                }
                self.relisting = Some(Relisting {
                    id: Value::Null,
                    page: 0,
                    pages: crate::values::Pages::default(),
                    tools: Vec::new(),
                    asked_at: Instant::now(),
                    again: false,
                });
                self.ask_page(running, None);
            }
        }
    }

    /// Asks the child for the next page of its tools, under a new id with a random part: a
    /// tool that prints to the child's stdout (its own output, or a subprocess's) would
    /// otherwise answer for the child with a listing of its own, and clear a change that awaits
    /// approval for every caller (a review did, with ids counted up from 1).
    fn ask_page(&mut self, running: &mut Option<Running>, cursor: Option<String>) {
        self.relists += 1;
        let nonce = getrandom::u64().unwrap_or_default();
        let id = json!(format!("mcp-gateway-relist-{}-{nonce:016x}", self.relists));
        let request = tools_list(&id, cursor.as_deref());
        if let Some(r) = &mut self.relisting {
            r.id = id;
        }
        self.write(running, &request, None);
    }

    /// A page of the re-reading came: the next is asked, or the tools are observed (and a
    /// per-caller child's calls judged by them from now on).
    fn relisted(&mut self, bytes: &[u8], message: &Value, running: &mut Option<Running>) {
        let Some(mut r) = self.relisting.take() else {
            return;
        };
        let result = match r.pages.add(bytes) {
            Ok(()) => message.get("result"),
            Err(why) => {
                crate::throttled_warn!(upstream = %self.spec.name, why, "stdio upstream's tools, read again after it said they changed, are past the bounds");
                None
            }
        };
        let Some(result) = result else {
            self.relist_failed(r.again, running);
            return;
        };
        if let Some(Value::Array(listed)) = result.get("tools") {
            r.tools
                .extend(listed.iter().filter(|t| t["name"].is_string()).cloned());
        }
        if let Some(cursor) = result["nextCursor"].as_str()
            && r.page < 99
        {
            r.page += 1;
            let cursor = cursor.to_owned();
            self.relisting = Some(r);
            self.ask_page(running, Some(cursor));
            return;
        }
        if let Some(gate) = self.gate.as_ref().filter(|g| g.enabled()) {
            gate.observe(&self.spec.name, &r.tools);
        }
        self.defined_anew(&r.tools);
        if r.again {
            self.tools_changed(running);
        }
    }

    /// The re-reading failed (refused, past its bounds, or not answered in time): a per-caller
    /// child's calls are refused until its caller lists its tools ([`StdioError::Unlisted`]),
    /// rather than judged by definitions it said are gone.
    /// `again`: the child said its tools changed once more meanwhile, and they are asked again.
    fn relist_failed(&mut self, again: bool, running: &mut Option<Running>) {
        self.relisting = None;
        self.defined_anew(&[]);
        if again {
            self.tools_changed(running);
        }
    }

    /// Calls past their deadline fail; the child is told to cancel them.
    fn expire(&mut self, running: &mut Option<Running>) {
        if let Some(r) = &self.relisting
            && r.asked_at.elapsed() > self.spec.start_timeout
        {
            crate::throttled_warn!(upstream = %self.spec.name, "stdio upstream did not answer the gateway's tools/list after it said its tools changed");
            let again = r.again;
            self.relist_failed(again, running);
        }
        let now = tokio::time::Instant::now();
        let late: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(c, _)| *c)
            .collect();
        // A call told to cancel may run on (a TypeScript SDK tool that does not read its abort
        // signal) and ask a client something long after: as long as a task's work is taken to
        // go on. Within its call's timeout, a child's request went to whichever caller then had
        // the one call in flight, another tenant's with the abandoned call's data (an attacker's
        // review).
        let window = self.spec.call_timeout.max(super::mux::WORKING_AT_MOST);
        for call in late {
            self.mux.abandon(call, window);
            if let Some(w) = self.waiters.remove(&call) {
                let _ = w.done.send(Err(StdioError::Timeout(
                    self.name(),
                    self.spec.call_timeout.as_millis(),
                )));
            }
            let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": call, "reason": "timed out at the gateway"}});
            self.write(running, &cancel, None);
        }
        // A caller that went away: its call is forgotten (the child may still answer; dropped).
        let gone: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.done.is_canceled())
            .map(|(c, _)| *c)
            .collect();
        for call in gone {
            self.mux.abandon(call, window);
            self.waiters.remove(&call);
            let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": call, "reason": "the client left"}});
            self.write(running, &cancel, None);
        }
    }

    /// Stops a child that cannot be talked to (`why`) and fails every call in flight with it.
    /// The child's home holds more than it may (`why`): the child is stopped, its calls fail,
    /// and its home is removed (off this thread: it may hold much), so that its next start
    /// gets a new, empty one.
    async fn home_over(&mut self, running: &mut Option<Running>, why: String) {
        tracing::warn!(upstream = %self.spec.name, "stdio upstream's home folder {why}; stopping it and removing its home");
        self.stop_broken(running, format!("its home folder {why}"))
            .await;
        if let Some(home) = self.home.take() {
            tokio::task::spawn_blocking(move || drop(home));
        }
    }

    async fn stop_broken(&mut self, running: &mut Option<Running>, why: String) {
        if let Some(r) = running.take() {
            stop(r, self.spec.stop_grace).await;
        }
        self.fail_all(&StdioError::Exited(self.spec.name.clone(), why));
    }

    fn fail_all(&mut self, err: &StdioError) {
        for call in self.mux.calls() {
            self.mux.forget(call);
        }
        for (_, w) in self.waiters.drain() {
            let _ = w.done.send(Err(err.clone()));
        }
    }

    /// Starts and initializes the child unless it runs; refuses during a crash loop.
    async fn ensure_started(&mut self, running: &mut Option<Running>) -> Result<(), StdioError> {
        if running.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if let Some(until) = self.down_until {
            if now < until {
                return Err(StdioError::CrashLoop(
                    self.name(),
                    self.spec.restart_window.as_secs(),
                ));
            }
            self.down_until = None;
            self.starts.clear();
        }
        while self
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.spec.restart_window)
        {
            self.starts.pop_front();
        }
        if self.starts.len() as u32 >= self.spec.max_restarts {
            tracing::error!(upstream = %self.spec.name, starts = self.starts.len(), "stdio upstream in a crash loop; down for the restart window");
            self.down_until = Some(now + self.spec.restart_window);
            return Err(StdioError::CrashLoop(
                self.name(),
                self.spec.restart_window.as_secs(),
            ));
        }
        // Backoff: 0, 100 ms, 200 ms, 400 ms ... after each recent start.
        if let Some(n) = self.starts.len().checked_sub(1) {
            let wait = Duration::from_millis(100u64 << n.min(6));
            tokio::time::sleep(wait).await;
        }
        self.starts.push_back(Instant::now());
        let home = match &self.home {
            Some(h) => h.path().to_owned(),
            None => {
                let h = sandbox::Home::make(&self.spec.name)
                    .map_err(|e| StdioError::Start(self.name(), format!("home folder: {e}")))?;
                self.home.insert(h).path().to_owned()
            }
        };
        let mut r = start(&self.spec, &home).await?;
        self.mux.child_started();
        // Its start's listing is a whole one.
        self.relisting = None;
        if let Some(gate) = self.gate.as_ref().filter(|g| g.enabled())
            && r.init["capabilities"].get("tools").is_some()
        {
            // Every start: the tools as this child defines them, observed before any call.
            match tokio::time::timeout(self.spec.start_timeout, list_tools(&mut r)).await {
                Ok(Ok(tools)) => {
                    gate.observe(&self.spec.name, &tools);
                    // What an earlier child listed is not this one's.
                    self.defined_anew(&tools);
                }
                Ok(Err(why)) => {
                    stop(r, self.spec.stop_grace).await;
                    return Err(StdioError::Start(self.name(), why));
                }
                Err(_) => {
                    stop(r, self.spec.stop_grace).await;
                    return Err(StdioError::Start(
                        self.name(),
                        "no answer to tools/list at start".into(),
                    ));
                }
            }
        }
        *running = Some(r);
        Ok(())
    }

    /// A `tools/call` of a tool whose pin does not allow it.
    fn refused_by_pins(&self, message: &Value) -> Option<StdioError> {
        let gate = self.gate.as_ref().filter(|g| g.enabled())?;
        if message.get("method").and_then(Value::as_str) != Some("tools/call") {
            return None;
        }
        let tool = message["params"]["name"].as_str().unwrap_or_default();
        let defined = match &self.defined {
            // A per-caller child: judged by its own definition alone. One it has not listed
            // since it started (a tool it hides, or one past what is kept) is not judged as the
            // upstream's: another caller's listing of the approved definition cleared the
            // upstream's pending change, and this child's changed one ran (a review).
            Some(defined) => match defined.get(tool) {
                Some(d) => Some(d),
                None => return Some(StdioError::Unlisted(self.name(), tool.to_owned())),
            },
            None => None,
        };
        (!gate.callable(&self.spec.name, tool, defined))
            .then(|| StdioError::Unapproved(self.name(), tool.to_owned()))
    }

    /// A per-caller child's whole listing: `tools` are what it defines now, and nothing else.
    fn defined_anew(&mut self, tools: &[Value]) {
        if let Some(defined) = &mut self.defined {
            defined.clear();
        }
        self.note_defined(tools);
    }

    /// A per-caller child listed `tools`: each named one is now defined so for its caller.
    fn note_defined(&mut self, tools: &[Value]) {
        let Some(defined) = &mut self.defined else {
            return;
        };
        for tool in tools {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                continue;
            };
            if defined.len() >= MAX_DEFINED && !defined.contains_key(name) {
                continue;
            }
            defined.insert(name.to_owned(), Digests::of(tool));
        }
    }
}

/// The gateway's own `tools/list` of a child, under `id`, from `cursor`.
fn tools_list(id: &Value, cursor: Option<&str>) -> Value {
    let mut request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/list", "params": {}});
    if let Some(c) = cursor {
        request["params"]["cursor"] = json!(c);
    }
    request
}

/// The child's tools, every page, asked by the gateway itself before clients reach the child:
/// the items that can be pinned (objects named by a string), the pages bounded in all
/// ([`crate::values::Pages`]: one child's pages of zeros grew the gateway to 9 GB at its start,
/// an attacker's review).
async fn list_tools(r: &mut Running) -> Result<Vec<Value>, String> {
    let mut tools = Vec::new();
    let mut pages = crate::values::Pages::default();
    let mut cursor: Option<String> = None;
    for page in 0..100 {
        // With a random part, as a re-reading's ([`Supervisor::ask_page`]).
        let id = json!(format!(
            "mcp-gateway-pins-{page}-{:016x}",
            getrandom::u64().unwrap_or_default()
        ));
        let mut line = tools_list(&id, cursor.as_deref()).to_string().into_bytes();
        line.push(b'\n');
        r.stdin
            .send(line)
            .map_err(|e| format!("writing tools/list: {e}"))?;
        let result = loop {
            match r.stdout.next().await {
                Ok(Line::Text(bytes)) => {
                    pages
                        .add(&bytes)
                        .map_err(|why| format!("tools/list: {why}"))?;
                    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
                        continue;
                    };
                    if v.get("id") != Some(&id) {
                        continue;
                    }
                    match v.get_mut("result").map(Value::take) {
                        Some(result) => break result,
                        None => {
                            return Err(format!(
                                "tools/list refused: {}",
                                v.get("error").cloned().unwrap_or(Value::Null)
                            ));
                        }
                    }
                }
                Ok(Line::TooLong(_)) => continue,
                Ok(Line::Eof) | Err(_) => return Err("exited during tools/list".into()),
            }
        };
        cursor = result["nextCursor"].as_str().map(str::to_owned);
        if let Value::Object(mut result) = result
            && let Some(Value::Array(listed)) = result.remove("tools")
        {
            tools.extend(listed.into_iter().filter(|t| t["name"].is_string()));
        }
        if cursor.is_none() {
            break;
        }
    }
    Ok(tools)
}

/// Spawns the child in its sandbox and initializes it.
async fn start(spec: &StdioSpec, home: &std::path::Path) -> Result<Running, StdioError> {
    let fail = |why: String| StdioError::Start(spec.name.clone(), why);
    let Some((program, args)) = spec.command.split_first() else {
        return Err(fail("empty command".into()));
    };
    // The child's stdin and stdout are one end of a socket pair, not pipes: a pipe of the
    // gateway's user could be opened again through `/proc/<child>/fd/0` by any process of that
    // user (the packaged service's children share it), and a tool that ran code in a shared
    // child read other tenants' requests and wrote answers to them under their ids (an
    // attacker's review); a socket cannot be opened by its path (ENXIO). What the child itself
    // runs with its descriptors still reads them: a server whose tools run callers' code
    // wants `children = "caller"`.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .and_then(|(ours, theirs)| {
            ours.set_nonblocking(true)?;
            let out = theirs.try_clone()?;
            Ok((ours, (theirs, out)))
        })
        .map_err(|e| fail(format!("socket pair: {e}")))?;
    let (stdio_in, stdio_out) = theirs;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(stdio_in)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(stdio_out)))
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let mut cgroup = Cgroup::make(
        &spec.name,
        spec.sandbox.max_processes,
        spec.sandbox.max_memory_bytes,
    );
    sandbox::apply(&mut cmd, &spec.sandbox, home, cgroup.as_ref())
        .map_err(|e| fail(e.to_string()))?;
    let spawned = cmd.spawn();
    // The child's ends go with the command: held here, the child's leaving would never read
    // as the end of its output.
    drop(cmd);
    let mut child = spawned.map_err(|e| fail(format!("{program}: {e}")))?;
    if let Some(c) = cgroup.as_mut() {
        c.joined();
    }
    let pgid = child.id().map_or(0, |p| p as i32);
    let Some(stderr) = child.stderr.take() else {
        return Err(fail("no pipe for its stderr".into()));
    };
    let (stdout, stdin) = tokio::net::UnixStream::from_std(ours)
        .map_err(|e| fail(format!("socket pair: {e}")))?
        .into_split();
    tokio::spawn(log_stderr(spec.name.clone(), stderr));
    let mut r = Running {
        child,
        stdin: Input::new(stdin, spec.call_timeout),
        stdout: Lines::new(
            BufReader::new(stdout),
            spec.max_line_bytes,
            spec.call_timeout,
        ),
        pgid,
        cgroup,
        init: Value::Null,
    };
    match tokio::time::timeout(
        spec.start_timeout,
        initialize(&mut r, spec.per_caller.is_some()),
    )
    .await
    {
        Ok(Ok(init)) => {
            r.init = init;
            tracing::info!(upstream = %spec.name, pid = pgid, "stdio upstream started");
            Ok(r)
        }
        Ok(Err(why)) => {
            stop(r, spec.stop_grace).await;
            Err(fail(why))
        }
        Err(_) => {
            stop(r, spec.stop_grace).await;
            Err(fail(format!(
                "no answer to initialize within {} ms",
                spec.start_timeout.as_millis()
            )))
        }
    }
}

/// The gateway's own `initialize`: the answer's result is kept for clients. Roots are offered
/// only to a child of one caller (see `mux`).
async fn initialize(r: &mut Running, one_caller: bool) -> Result<Value, String> {
    let capabilities = if one_caller {
        json!({"sampling": {}, "elicitation": {}, "roots": {"listChanged": false}})
    } else {
        json!({"sampling": {}, "elicitation": {}})
    };
    let init = json!({
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": capabilities,
            "clientInfo": {"name": "mcp-gateway", "version": env!("CARGO_PKG_VERSION")},
        },
    });
    let mut line = init.to_string().into_bytes();
    line.push(b'\n');
    r.stdin
        .send(line)
        .map_err(|e| format!("writing initialize: {e}"))?;
    loop {
        match r.stdout.next().await {
            Ok(Line::Text(bytes)) => {
                let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
                    continue;
                };
                if v.get("id") != Some(&json!(0)) {
                    continue;
                }
                if let Some(result) = v.get("result") {
                    let mut note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
                        .to_string()
                        .into_bytes();
                    note.push(b'\n');
                    r.stdin
                        .send(note)
                        .map_err(|e| format!("writing initialized: {e}"))?;
                    return Ok(result.clone());
                }
                return Err(format!(
                    "initialize refused: {}",
                    v.get("error").cloned().unwrap_or(Value::Null)
                ));
            }
            Ok(Line::TooLong(_)) => continue,
            Ok(Line::Eof) | Err(_) => return Err("exited during initialize".into()),
        }
    }
}

/// Stops a child: stdin closed, then `SIGTERM`, then `SIGKILL`, to its whole process group;
/// then whatever is left in its cgroup.
async fn stop(r: Running, grace: Duration) {
    let Running {
        mut child,
        stdin,
        pgid,
        cgroup,
        ..
    } = r;
    // Its writer stops at once (a write waiting on the child too): the child reads the end of
    // its input.
    stdin.task.abort();
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, libc::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            signal_group(pgid, libc::SIGKILL);
            let _ = child.wait().await;
        }
    }
    // Whatever the child left in its group, or anywhere else in its cgroup, goes with it.
    signal_group(pgid, libc::SIGKILL);
    end_cgroup(cgroup).await;
}

/// Ends what is left in a child's cgroup (a process that left its group with `setsid` too)
/// and removes it.
async fn end_cgroup(cgroup: Option<Cgroup>) {
    if let Some(c) = cgroup {
        c.end(Duration::from_secs(2)).await;
    }
}

fn signal_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) on the child's own process group (it called setsid).
        unsafe { libc::kill(-pgid, sig) };
    }
}

async fn exit_status(r: Running) -> String {
    let Running {
        mut child,
        pgid,
        cgroup,
        ..
    } = r;
    let status = match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
        Ok(Ok(s)) => s.to_string(),
        _ => {
            signal_group(pgid, libc::SIGKILL);
            let _ = child.wait().await;
            "closed its output; killed".into()
        }
    };
    signal_group(pgid, libc::SIGKILL);
    end_cgroup(cgroup).await;
    status
}

/// How many stderr lines per second an upstream may put in the log; the rest are counted.
const STDERR_LINES_PER_SEC: u32 = 20;

async fn log_stderr(name: String, stderr: tokio::process::ChildStderr) {
    // Read for as long as the child writes, however long a line: a progress bar redrawn with
    // `\r` is one line without end, and a pipe closed on it fails the child's next write
    // (Python raises, a C program dies of SIGPIPE): every call of every tenant then failed
    // (an attacker's review).
    let mut lines = Lines::new(BufReader::new(stderr), 8 << 10, Duration::MAX);
    let mut window = Instant::now();
    let mut logged = 0u32;
    let mut dropped = 0u64;
    loop {
        let line = match lines.next().await {
            Ok(Line::Text(l)) => l,
            Ok(Line::TooLong(_)) => b"(a line over 8 KiB)".to_vec(),
            Ok(Line::Eof) => break,
            Err(e) => {
                tracing::warn!(upstream = %name, error = %e, "stdio upstream's stderr is read no more");
                break;
            }
        };
        if window.elapsed() >= Duration::from_secs(1) {
            if dropped > 0 {
                tracing::warn!(upstream = %name, dropped, "stdio upstream stderr lines not logged (rate limit)");
            }
            window = Instant::now();
            logged = 0;
            dropped = 0;
        }
        if logged < STDERR_LINES_PER_SEC {
            logged += 1;
            tracing::info!(upstream = %name, "stderr: {}", shown(&line));
        } else {
            dropped += 1;
        }
    }
}

/// A line of a child's stderr as the log shows it: a control character escaped (`\r`,
/// `\u{1b}`), so that the child writes nothing into the log's own lines (a CR hid the line's
/// start in a terminal and made it read as a record of the gateway's, a review); one CR that
/// ends the line is left out.
fn shown(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut out = String::with_capacity(line.len());
    for c in String::from_utf8_lossy(line).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
#[path = "child_tests.rs"]
mod tests;
