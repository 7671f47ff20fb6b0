//! Circuit breakers shared by all workers, lock-free: one cell per upstream and per tool of an
//! upstream and tenant, created on first use.

use std::{
    sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use crate::config::RawBreaker;

pub const CLOSED: u8 = 0;
pub const OPEN: u8 = 1;
pub const HALF_OPEN: u8 = 2;

/// How a call got through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Closed,
    /// One of the half-open breaker's probes.
    Probe,
}

#[derive(Debug, Default)]
pub struct Breaker {
    state: AtomicU8,
    opened_at: AtomicU64,
    consecutive: AtomicU32,
    window: AtomicU64,
    total: AtomicU32,
    failures: AtomicU32,
    probes: AtomicU32,
}

impl Breaker {
    /// Lets a call through, or says how long the breaker stays open.
    pub fn allow(&self, now: u64, c: &RawBreaker) -> Result<Pass, Duration> {
        let open_ns = c.open_ms * 1_000_000;
        loop {
            match self.state.load(Ordering::Acquire) {
                CLOSED => return Ok(Pass::Closed),
                OPEN => {
                    let since = now.saturating_sub(self.opened_at.load(Ordering::Acquire));
                    if since < open_ns {
                        return Err(Duration::from_nanos(open_ns - since));
                    }
                    // Time is up: the first to notice turns it half-open.
                    if self
                        .state
                        .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.probes.store(0, Ordering::Release);
                    }
                }
                _ => {
                    let took = self
                        .probes
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                            (p < c.half_open_probes).then_some(p + 1)
                        })
                        .is_ok();
                    return if took {
                        Ok(Pass::Probe)
                    } else {
                        // Probes are out; their answers decide.
                        Err(Duration::from_millis(c.open_ms.min(1_000)))
                    };
                }
            }
        }
    }

    fn open(&self, now: u64) {
        self.opened_at.store(now, Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
        self.consecutive.store(0, Ordering::Release);
        self.total.store(0, Ordering::Release);
        self.failures.store(0, Ordering::Release);
    }

    /// Records how a call that was let through ended; returns the state it leaves.
    pub fn record(&self, now: u64, c: &RawBreaker, pass: Pass, ok: bool) -> u8 {
        if pass == Pass::Probe || self.state.load(Ordering::Acquire) == HALF_OPEN {
            if ok {
                self.consecutive.store(0, Ordering::Release);
                self.total.store(0, Ordering::Release);
                self.failures.store(0, Ordering::Release);
                self.state.store(CLOSED, Ordering::Release);
            } else {
                self.open(now);
            }
            return self.state.load(Ordering::Acquire);
        }
        let window = now / (c.window_s * 1_000_000_000);
        let seen = self.window.load(Ordering::Acquire);
        if seen != window
            && self
                .window
                .compare_exchange(seen, window, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.total.store(0, Ordering::Release);
            self.failures.store(0, Ordering::Release);
        }
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if ok {
            self.consecutive.store(0, Ordering::Release);
            return CLOSED;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let row = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        let by_row = c.consecutive_failures.is_some_and(|n| row >= n);
        let by_ratio = c.failure_ratio.is_some_and(|r| {
            total >= c.min_requests && f64::from(failures) >= r * f64::from(total)
        });
        if by_row || by_ratio {
            self.open(now);
            return OPEN;
        }
        CLOSED
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Gives a probe back unjudged (the call never reached the upstream).
    fn release(&self, pass: Pass) {
        if pass == Pass::Probe {
            let _ = self
                .probes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1));
        }
    }
}

/// Bounds of the breaker table: entries, and bytes of names (tool names are the client's).
const MAX_BREAKERS: usize = 10_000;
const MAX_BREAKER_BYTES: usize = 1 << 20;

/// The breakers a call of `tool` at `upstream` by `tenant` passes, each with whether it is the
/// tool's: the upstream's, shared (its failures are everyone's), and the tool's, one per tenant
/// (a tool's errors may be the caller's own arguments: one tenant's must not cut the tool off
/// for the others).
pub fn names(upstream: &str, tool: &str, tenant: &str) -> [(String, bool); 2] {
    [
        (upstream.to_owned(), false),
        (format!("{upstream}/{tool}@{tenant}"), true),
    ]
}

/// Every breaker, by name: `<upstream>` or `<upstream>/<tool>@<tenant>` ([`names`]).
#[derive(Debug, Default)]
pub struct Breakers {
    map: papaya::HashMap<String, Breaker>,
    /// Bytes of the names in `map`.
    bytes: AtomicUsize,
}

impl Breakers {
    pub fn allow(&self, name: &str, now: u64, c: &RawBreaker) -> Result<Pass, Duration> {
        if let Some(b) = self.map.pin().get(name) {
            return b.allow(now, c);
        }
        // An upstream's own breaker (its name has no `/`) is the configuration's: always made.
        // A tool's is named by clients: past the table's bounds, the closed ones give way
        // (they hold a count of failures at most; an open one holds a decision), and if
        // there is still no room, the call passes with no breaker.
        let tool_level = name.contains('/');
        if tool_level && !self.room_for(name) {
            self.forget_closed();
            if !self.room_for(name) {
                return Ok(Pass::Closed);
            }
        }
        self.map
            .pin()
            .get_or_insert_with(name.to_owned(), Breaker::default)
            .allow(now, c)
    }

    /// Takes room for `name` in the table's bounds, if there is.
    fn room_for(&self, name: &str) -> bool {
        self.map.len() < MAX_BREAKERS
            && self
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                    b.checked_add(name.len())
                        .filter(|n| *n <= MAX_BREAKER_BYTES)
                })
                .is_ok()
    }

    /// Forgets every closed tool breaker: one tenant's made-up tool names filled the table
    /// for good, and no tool of another tenant (nor one added later) got a breaker again.
    fn forget_closed(&self) {
        let map = self.map.pin();
        map.retain(|name, b| {
            let keep = !name.contains('/') || b.state() != CLOSED;
            if !keep {
                self.bytes.fetch_sub(name.len(), Ordering::AcqRel);
            }
            keep
        });
    }

    pub fn record(&self, name: &str, now: u64, c: &RawBreaker, pass: Pass, ok: bool) {
        if let Some(b) = self.map.pin().get(name) {
            let before = b.state();
            let after = b.record(now, c, pass, ok);
            if before != after {
                let word = ["closed", "open", "half-open"][usize::from(after.min(2))];
                tracing::warn!(breaker = name, "circuit breaker is now {word}");
            }
        }
    }

    pub fn release(&self, name: &str, pass: Pass) {
        if let Some(b) = self.map.pin().get(name) {
            b.release(pass);
        }
    }

    /// (name, state) of every breaker, sorted by name.
    pub fn states(&self) -> Vec<(String, u8)> {
        let mut all: Vec<(String, u8)> = self
            .map
            .pin()
            .iter()
            .map(|(k, b)| (k.clone(), b.state()))
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: &str) -> RawBreaker {
        toml::from_str(t).unwrap()
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn the_table_is_bounded_in_bytes() {
        let c = cfg("consecutive_failures = 3\nopen_ms = 100");
        let breakers = Breakers::default();
        // 2,000 names of 2 KiB would be 4 MiB: past 1 MiB, new names get no breaker.
        for i in 0..2_000 {
            let name = format!("up/{i:0>2048}");
            assert_eq!(breakers.allow(&name, MS, &c), Ok(Pass::Closed));
        }
        let states = breakers.states();
        let bytes: usize = states.iter().map(|(n, _)| n.len()).sum();
        assert!(bytes <= MAX_BREAKER_BYTES, "{bytes} bytes of names");
        assert!(states.len() < 600, "{} breakers", states.len());
    }

    #[test]
    fn made_up_tool_names_cannot_keep_another_tenants_tool_from_its_breaker() {
        let c = cfg("consecutive_failures = 1\nopen_ms = 60000");
        let breakers = Breakers::default();
        // The victim's tool opens.
        assert_eq!(breakers.allow("up/real@b", MS, &c), Ok(Pass::Closed));
        breakers.record("up/real@b", MS, &c, Pass::Closed, false);
        // One tenant fills the table with names of its own, each failing once (below its
        // threshold: they stay closed).
        let c3 = cfg("consecutive_failures = 3\nopen_ms = 60000");
        for i in 0..MAX_BREAKERS + 10 {
            let name = format!("up/made-up-{i}@a");
            let _ = breakers.allow(&name, MS, &c3);
            breakers.record(&name, MS, &c3, Pass::Closed, false);
        }
        // Another tenant's tool, and an upstream added later, still get their breakers.
        assert_eq!(breakers.allow("up/other@b", MS, &c), Ok(Pass::Closed));
        breakers.record("up/other@b", MS, &c, Pass::Closed, false);
        assert!(
            breakers.allow("up/other@b", 2 * MS, &c).is_err(),
            "it opened"
        );
        assert_eq!(breakers.allow("later", MS, &c), Ok(Pass::Closed));
        // What was open stays open.
        assert!(breakers.allow("up/real@b", 2 * MS, &c).is_err());
        assert!(breakers.states().len() <= MAX_BREAKERS + 1);
    }

    #[test]
    fn opens_after_consecutive_failures_probes_and_closes_on_success() {
        let c = cfg("consecutive_failures = 3\nopen_ms = 100");
        let b = Breaker::default();
        for _ in 0..2 {
            assert_eq!(b.allow(MS, &c), Ok(Pass::Closed));
            b.record(MS, &c, Pass::Closed, false);
        }
        b.record(MS, &c, Pass::Closed, true);
        for _ in 0..2 {
            b.record(MS, &c, Pass::Closed, false);
        }
        assert_eq!(b.state(), CLOSED, "a success broke the row");
        b.record(MS, &c, Pass::Closed, false);
        assert_eq!(b.state(), OPEN);
        let wait = b.allow(50 * MS, &c).unwrap_err();
        assert_eq!(wait, Duration::from_millis(51));
        // After open_ms: one probe, the others wait for it.
        assert_eq!(b.allow(101 * MS, &c), Ok(Pass::Probe));
        assert!(b.allow(101 * MS, &c).is_err());
        b.record(102 * MS, &c, Pass::Probe, false);
        assert_eq!(b.state(), OPEN, "a failed probe opens it again");
        assert!(b.allow(150 * MS, &c).is_err());
        assert_eq!(b.allow(203 * MS, &c), Ok(Pass::Probe));
        b.record(204 * MS, &c, Pass::Probe, true);
        assert_eq!(b.state(), CLOSED);
        assert_eq!(b.allow(205 * MS, &c), Ok(Pass::Closed));
    }

    #[test]
    fn opens_on_a_failure_ratio_once_enough_calls_were_seen() {
        let c = cfg("failure_ratio = 0.5\nmin_requests = 10\nwindow_s = 10");
        let b = Breaker::default();
        for i in 0..9 {
            b.record(MS, &c, Pass::Closed, i % 2 == 0);
        }
        assert_eq!(b.state(), CLOSED, "9 calls: too few to judge");
        b.record(MS, &c, Pass::Closed, false);
        assert_eq!(b.state(), OPEN, "5 of 10 failed");
        // A new window starts from nothing.
        let c2 = cfg("failure_ratio = 0.5\nmin_requests = 2\nwindow_s = 1");
        let b = Breaker::default();
        b.record(MS, &c2, Pass::Closed, false);
        b.record(2_000 * MS, &c2, Pass::Closed, true);
        assert_eq!(b.state(), CLOSED, "the failure was in the previous window");
    }
}
