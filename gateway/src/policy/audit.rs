//! The audit log: one JSON line per decision, written by its own thread so that the request
//! path only hands a record over (a bounded channel; when it is full the record is counted as
//! dropped rather than the request waiting).

use std::{
    io::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, SystemTime},
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_left: Option<String>,
    pub latency_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

pub fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// The sending side, one per process; cheap to call from any worker.
pub struct AuditLog {
    tx: Option<SyncSender<Record>>,
    pub dropped: AtomicU64,
    pub written: std::sync::Arc<AtomicU64>,
}

impl AuditLog {
    pub fn off() -> Self {
        Self {
            tx: None,
            dropped: AtomicU64::new(0),
            written: std::sync::Arc::default(),
        }
    }

    /// Appends to `path` from a thread of its own.
    pub fn start(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, rx) = sync_channel(65_536);
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let count = std::sync::Arc::clone(&written);
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || write_loop(&rx, file, &count))?;
        Ok(Self {
            tx: Some(tx),
            dropped: AtomicU64::new(0),
            written,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn send(&self, record: Record) {
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

fn write_loop(rx: &Receiver<Record>, file: std::fs::File, written: &AtomicU64) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, file);
    loop {
        // Flush when idle: a line is on disk within ~50 ms of its decision.
        let record = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if serde_json::to_writer(&mut out, &record).is_ok() && out.write_all(b"\n").is_ok() {
            written.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = out.flush();
}
