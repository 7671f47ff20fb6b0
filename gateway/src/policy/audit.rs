//! The audit log: one JSON line per decision, written by its own thread so that the request
//! path only hands a record over (a bounded channel; when it is full the record is counted as
//! dropped rather than the request waiting). The file is reopened at its path on request
//! (SIGHUP, SIGUSR1: logrotate's `create` mode) by that thread, between two records, so a
//! rotation loses none: what was buffered goes to the moved file first.
//!
//! The access log (`[telemetry.access_log]`, one line per request with the fields configured)
//! is the same writer with other records.

use std::{
    io::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

/// One decision.
#[derive(Debug, Serialize)]
pub struct Record {
    pub ts: String,
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub source: String,
    pub route: String,
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    pub outcome: &'static str,
    /// A JSON-RPC batch's members (2025-03-26): what each asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub batch: Vec<Member>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_left: Option<String>,
    pub latency_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// One member of an audited batch: its method (`response` for a client's answer) and, for a
/// `tools/call`, its tool. A batch's line said `other` and no tool, whatever tools it called (an
/// attacker's review).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Member {
    pub method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

pub fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// One access-log line: the configured fields, in their configured order.
#[derive(Debug, Default)]
pub struct AccessLine(pub Vec<(&'static str, serde_json::Value)>);

impl Serialize for AccessLine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The access log's records.
pub type AccessLog = AuditLog<AccessLine>;

/// The sending side, one per process; cheap to call from any worker.
pub struct AuditLog<T = Record> {
    tx: Option<SyncSender<T>>,
    pub dropped: AtomicU64,
    pub written: std::sync::Arc<AtomicU64>,
    /// Set by [`AuditLog::reopen`]; the writer thread clears it once it has reopened.
    reopen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The bound on lines sent by [`AuditLog::send_anonymous_refusal`].
    throttle: Option<Throttle>,
    /// Lines the logs this one replaced (a reload) did not send for their bound.
    suppressed_before: AtomicU64,
}

/// At most `per_second` lines a second (counted over every worker, in whole seconds since
/// start); the rest are counted as suppressed. The window's turn is not exact: two workers
/// that see a new second at once may each admit a line or two more.
struct Throttle {
    per_second: u64,
    start: Instant,
    second: AtomicU64,
    used: AtomicU64,
    suppressed: std::sync::Arc<AtomicU64>,
}

impl Throttle {
    fn admit(&self) -> bool {
        let now = self.start.elapsed().as_secs();
        if self.second.load(Ordering::Relaxed) != now
            && self.second.swap(now, Ordering::Relaxed) != now
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.per_second {
            return true;
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        false
    }
}

impl<T: Serialize + Send + 'static> AuditLog<T> {
    pub fn off() -> Self {
        Self {
            tx: None,
            dropped: AtomicU64::new(0),
            written: std::sync::Arc::default(),
            reopen: std::sync::Arc::default(),
            throttle: None,
            suppressed_before: AtomicU64::new(0),
        }
    }

    /// Appends to `path` from a thread of its own (named `thread`).
    /// [`AuditLog::send_anonymous_refusal`] sends at most `anonymous` lines a second, and the
    /// writer adds a line a second saying how many it was not given.
    pub fn start(path: &std::path::Path, thread: &str, anonymous: u32) -> std::io::Result<Self> {
        let file = crate::host::open_log_file(path, true)?;
        let (tx, rx) = sync_channel(65_536);
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let count = std::sync::Arc::clone(&written);
        let reopen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let suppressed = std::sync::Arc::new(AtomicU64::new(0));
        let writer = Writer {
            path: path.to_path_buf(),
            reopen: std::sync::Arc::clone(&reopen),
            written: count,
            suppressed: std::sync::Arc::clone(&suppressed),
            reason: format!(
                "{thread} lines of errors the gateway answered itself to callers no credential named, over {anonymous} a second"
            ),
        };
        let throttle = Some(Throttle {
            per_second: u64::from(anonymous),
            start: Instant::now(),
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed,
        });
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || writer.run(&rx, file))?;
        Ok(Self {
            tx: Some(tx),
            dropped: AtomicU64::new(0),
            written,
            reopen,
            throttle,
            suppressed_before: AtomicU64::new(0),
        })
    }

    /// Lines not sent by [`AuditLog::send_anonymous_refusal`] for its bound.
    pub fn suppressed(&self) -> u64 {
        self.suppressed_before.load(Ordering::Relaxed)
            + self
                .throttle
                .as_ref()
                .map_or(0, |t| t.suppressed.load(Ordering::Relaxed))
    }

    /// Takes on the counts of `old`, the log this one replaces (a reload changed it), so that
    /// its metrics count on.
    pub fn counting_on(self, old: &Self) -> Self {
        self.dropped
            .fetch_add(old.dropped.load(Ordering::Relaxed), Ordering::Relaxed);
        self.written
            .fetch_add(old.written.load(Ordering::Relaxed), Ordering::Relaxed);
        self.suppressed_before
            .fetch_add(old.suppressed(), Ordering::Relaxed);
        self
    }

    /// Asks the writer thread to reopen the file at its path (after a rotation moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Sends a line about an error the gateway answered itself (no upstream answered) to a
    /// caller no credential named (a 401, an unknown route or method, a body that does not
    /// parse; the default tenant's callers included), within the log's bound: anyone can send
    /// those as fast as the network takes them, and each was a line on disk (an attacker's
    /// review: 306 MB in 1.7 s with 15 KB methods; about 250 bytes a line at tens of thousands
    /// a second since). The rest are counted, and the writer says how many.
    pub fn send_anonymous_refusal(&self, record: T) {
        if self.tx.is_some() && self.throttle.as_ref().is_none_or(Throttle::admit) {
            self.send(record);
        }
    }

    pub fn send(&self, record: T) {
        if let Some(tx) = &self.tx {
            match tx.try_send(record) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

struct Writer {
    path: std::path::PathBuf,
    reopen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<AtomicU64>,
    /// The throttle's count of lines it did not send, and why, as its line says.
    suppressed: std::sync::Arc<AtomicU64>,
    reason: String,
}

/// The line a writer adds, once a second at most, for lines its throttle did not send.
#[derive(Serialize)]
struct Suppressed<'a> {
    ts: String,
    suppressed: u64,
    reason: &'a str,
}

impl Writer {
    fn run<T: Serialize>(&self, rx: &Receiver<T>, file: std::fs::File) {
        let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
        let mut told = (0, Instant::now());
        loop {
            if told.1.elapsed() >= Duration::from_secs(1) {
                let total = self.suppressed.load(Ordering::Relaxed);
                if total > told.0 {
                    let line = Suppressed {
                        ts: now(),
                        suppressed: total - told.0,
                        reason: &self.reason,
                    };
                    if serde_json::to_writer(&mut out, &line).is_ok() {
                        let _ = out.write_all(b"\n");
                    }
                }
                told = (total, Instant::now());
            }
            // Flush when idle: a line is on disk within ~50 ms of its decision.
            let record = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = out.flush();
                    None
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if self.reopen.swap(false, Ordering::Relaxed) {
                // Everything buffered belongs to the file as it was (moved or not).
                let _ = out.flush();
                match crate::host::open_log_file(&self.path, true) {
                    Ok(file) => out = std::io::BufWriter::with_capacity(64 * 1024, file),
                    Err(e) => tracing::error!(
                        path = %self.path.display(),
                        "log cannot be reopened: {e}; writing on to the old file"
                    ),
                }
            }
            let Some(record) = record else { continue };
            if serde_json::to_writer(&mut out, &record).is_ok() && out.write_all(b"\n").is_ok() {
                self.written.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = out.flush();
    }
}
