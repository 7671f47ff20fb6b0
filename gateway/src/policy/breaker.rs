//! Circuit breakers shared by all workers, lock-free: one cell per upstream and per tool of an
//! upstream and tenant, created on first use.

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use crate::config::RawBreaker;

pub const CLOSED: u8 = 0;
pub const OPEN: u8 = 1;
pub const HALF_OPEN: u8 = 2;

/// How a call got through, and in which turn of its breaker (a turn ends each time the
/// breaker opens or closes): only a verdict of the current turn is counted. (Before, a call let
/// through while the breaker was closed that ended while it was half-open decided the state
/// for the probes, and a probe of an earlier turn for a later one.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Closed(u32),
    /// One of the half-open breaker's probes.
    Probe(u32),
}

/// Probes out at once, at most (they are counted in 24 bits).
const MAX_PROBES: u32 = (1 << 24) - 1;

#[derive(Debug, Default)]
pub struct Breaker {
    /// The turn (32 bits), the state (8) and the probes out (24), in one word: turning
    /// half-open and taking the first probe are one step, as are closing or opening and
    /// ending the turn.
    word: AtomicU64,
    opened_at: AtomicU64,
    /// When the newest probe was let through: probes all out for longer than their lease
    /// are taken to be lost (see `allow`).
    probed_at: AtomicU64,
    /// A closed turn's failures in a row (low 32 bits), with that turn (high 32).
    consecutive: AtomicU64,
    /// A closed turn (32 bits), its window (32), its calls in it (32) and failures (32), in one
    /// word: a call counted as another thread starts a new window is not wiped out. Counts of
    /// an earlier turn read as none, so no step resets them: a reset run by a thread that lost
    /// the race to close wiped the new turn's first failures.
    counts: portable_atomic::AtomicU128,
    /// When a call through it last succeeded: a call that timed out while others were
    /// answered is no sign of a hung upstream (see [`Breakers::answered_since`]).
    answered_at: AtomicU64,
}

fn split(v: u64) -> (u32, u8, u32) {
    ((v >> 32) as u32, (v >> 24) as u8, (v as u32) & MAX_PROBES)
}

fn join(turn: u32, state: u8, probes: u32) -> u64 {
    (u64::from(turn) << 32) | (u64::from(state) << 24) | u64::from(probes & MAX_PROBES)
}

impl Breaker {
    /// Lets a call through, or says how long the breaker stays open. `lease` is the longest a
    /// call may be out (its upstream's timeouts): probes all out for longer are lost.
    pub fn allow(&self, now: u64, c: &RawBreaker, lease: Duration) -> Result<Pass, Duration> {
        let open_ns = c.open_ms.saturating_mul(1_000_000);
        let lease_ns = u64::try_from(lease.as_nanos()).unwrap_or(u64::MAX);
        let most = c.half_open_probes.clamp(1, MAX_PROBES);
        let mut v = self.word.load(Ordering::Acquire);
        loop {
            let (turn, state, probes) = split(v);
            let next = match state {
                CLOSED => return Ok(Pass::Closed(turn)),
                OPEN => {
                    let since = now.saturating_sub(self.opened_at.load(Ordering::Acquire));
                    if since < open_ns {
                        return Err(Duration::from_nanos(open_ns - since));
                    }
                    // Time is up: the first to notice turns it half-open with its probe.
                    join(turn, HALF_OPEN, 1)
                }
                // Probes are out; their answers decide.
                _ if probes >= most => {
                    let since = now.saturating_sub(self.probed_at.load(Ordering::Acquire));
                    if since < lease_ns {
                        return Err(Duration::from_millis(c.open_ms.min(1_000)));
                    }
                    // Out for longer than a call waits for its answer, they may be lost (their
                    // worker died with them, and no drop gave them back): without this, the
                    // breaker refused every call until a restart. One more probe goes, in the
                    // same turn: a slow one that does come back (a long stream) still decides.
                    join(turn, HALF_OPEN, 1)
                }
                _ => join(turn, HALF_OPEN, probes + 1),
            };
            // Noted before the probe is out, so that no thread finds it out and unnoted.
            self.probed_at.fetch_max(now, Ordering::AcqRel);
            match self
                .word
                .compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(Pass::Probe(turn)),
                Err(actual) => v = actual,
            }
        }
    }

    /// Ends turn `turn` in `state` (`true`), unless it has ended already.
    fn end_turn(&self, turn: u32, from: u8, state: u8, now: u64) -> bool {
        let mut v = self.word.load(Ordering::Acquire);
        loop {
            let (t, s, _) = split(v);
            if t != turn || s != from {
                return false;
            }
            if state == OPEN {
                // Never back: a thread stalled here must not shorten a later opening.
                self.opened_at.fetch_max(now, Ordering::AcqRel);
            }
            match self.word.compare_exchange_weak(
                v,
                join(turn.wrapping_add(1), state, 0),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => v = actual,
            }
        }
    }

    /// Records how a call that was let through ended; returns the state it leaves.
    pub fn record(&self, now: u64, c: &RawBreaker, pass: Pass, ok: bool) -> u8 {
        if ok {
            self.answered_at.fetch_max(now, Ordering::AcqRel);
        }
        let turn = match pass {
            Pass::Probe(turn) => {
                // One success closes it, one failure opens it again; a verdict of an ended
                // turn is nobody's.
                let to = if ok { CLOSED } else { OPEN };
                self.end_turn(turn, HALF_OPEN, to, now);
                return self.state();
            }
            Pass::Closed(turn) => turn,
        };
        // Counted only while its turn lasts (checked again with each try to count): let
        // through before the breaker opened, its verdict is made. A count of an ended turn
        // reads as none to the next; no turn's end resets the counts, so that none is wiped
        // by a thread that lost the race to end it.
        let current = || {
            let (t, state, _) = split(self.word.load(Ordering::Acquire));
            t == turn && state == CLOSED
        };
        if !current() {
            return self.state();
        }
        // Windows in 32 bits: 136 years of 1 s windows of the monotonic clock.
        let window = (now / c.window_s.max(1).saturating_mul(1_000_000_000)) as u32;
        let mut seen = (0, 0);
        let counted = self
            .counts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (t, w) = ((v >> 96) as u32, (v >> 64) as u32);
                let (total, failures) = ((v >> 32) as u32, v as u32);
                if !current() {
                    return None;
                }
                // A window only moves forward; a call of an ended one counts in the current.
                let (w, total, failures) = if t != turn || w < window {
                    (window, 0, 0)
                } else {
                    (w, total, failures)
                };
                seen = (
                    total.saturating_add(1),
                    failures.saturating_add(u32::from(!ok)),
                );
                Some(
                    (u128::from(turn) << 96)
                        | (u128::from(w) << 64)
                        | (u128::from(seen.0) << 32)
                        | u128::from(seen.1),
                )
            });
        if counted.is_err() {
            return self.state();
        }
        let mut row = 0;
        let _ = self
            .consecutive
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (t, n) = ((v >> 32) as u32, v as u32);
                if !current() {
                    return None;
                }
                row = if ok {
                    0
                } else if t == turn {
                    n.saturating_add(1)
                } else {
                    1
                };
                Some((u64::from(turn) << 32) | u64::from(row))
            });
        if ok {
            return CLOSED;
        }
        let (total, failures) = seen;
        let by_row = c.consecutive_failures.is_some_and(|n| row >= n);
        let by_ratio = c.failure_ratio.is_some_and(|r| {
            total >= c.min_requests && f64::from(failures) >= r * f64::from(total)
        });
        if by_row || by_ratio {
            self.end_turn(turn, CLOSED, OPEN, now);
        }
        self.state()
    }

    pub fn state(&self) -> u8 {
        split(self.word.load(Ordering::Acquire)).1
    }

    /// Gives a probe back unjudged (the call never reached the upstream), to its own turn.
    fn release(&self, pass: Pass) {
        let Pass::Probe(turn) = pass else {
            return;
        };
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let (t, s, probes) = split(v);
                (t == turn && s == HALF_OPEN && probes > 0).then(|| join(t, s, probes - 1))
            });
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

/// A tenant's share of the table's tool breakers.
const MAX_TOOL_BREAKERS_PER_TENANT: usize = MAX_BREAKERS / 16;

/// Every breaker, by name: `<upstream>` or `<upstream>/<tool>@<tenant>` ([`names`]).
#[derive(Debug, Default)]
pub struct Breakers {
    map: papaya::HashMap<String, Breaker>,
    /// Bytes of the names of the tool breakers in `map`.
    bytes: AtomicUsize,
    /// Tool breakers in `map` of each tenant (by name).
    per_tenant: papaya::HashMap<String, Share>,
}

/// A tenant's share of the tool breakers.
#[derive(Debug, Default)]
struct Share {
    /// Its tool breakers in the table.
    held: AtomicUsize,
    /// When (monotonic ns) its closed breakers were last forgotten: at most once a second, so
    /// that a share full of open breakers does not make each new name scan the table.
    forgot_at: AtomicU64,
}

/// The tenant of a tool breaker's name (tenant names hold no `@`; upstream names no `/`).
fn tenant_of(name: &str) -> Option<&str> {
    name.contains('/')
        .then(|| name.rsplit_once('@').map_or("", |(_, tenant)| tenant))
}

impl Breakers {
    pub fn allow(
        &self,
        name: &str,
        now: u64,
        c: &RawBreaker,
        lease: Duration,
    ) -> Result<Pass, Duration> {
        let map = self.map.pin();
        if let Some(b) = map.get(name) {
            return b.allow(now, c, lease);
        }
        // An upstream's own breaker is the configuration's: always made. A tool's is named by
        // clients: each tenant has a share of the table, past which its own closed tool
        // breakers give way (they hold a count of failures at most; an open one holds a
        // decision); with still no room, the call passes with no breaker.
        let Some(tenant) = tenant_of(name) else {
            return map
                .get_or_insert_with(name.to_owned(), Breaker::default)
                .allow(now, c, lease);
        };
        if !self.take(tenant, name) {
            let due = self.per_tenant.pin().get(tenant).is_some_and(|share| {
                let last = share.forgot_at.load(Ordering::Acquire);
                (last == 0 || now.saturating_sub(last) >= 1_000_000_000)
                    && share
                        .forgot_at
                        .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            });
            if !due {
                return Ok(Pass::Closed(0));
            }
            self.forget_closed_of(tenant);
            if !self.take(tenant, name) {
                return Ok(Pass::Closed(0));
            }
        }
        match map.try_insert_with(name.to_owned(), Breaker::default) {
            Ok(b) => b.allow(now, c, lease),
            // Made by another worker meanwhile: the room taken goes back.
            Err(b) => {
                self.give_back(tenant, name);
                b.allow(now, c, lease)
            }
        }
    }

    /// Takes room for the tool breaker `name` of `tenant`: in its share, in the table's
    /// entries and in its bytes.
    fn take(&self, tenant: &str, name: &str) -> bool {
        let shares = self.per_tenant.pin();
        let share = &shares
            .get_or_insert_with(tenant.to_owned(), Share::default)
            .held;
        if share
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_TOOL_BREAKERS_PER_TENANT).then_some(n + 1)
            })
            .is_err()
        {
            return false;
        }
        let room = self.map.len() < MAX_BREAKERS
            && self
                .bytes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                    b.checked_add(name.len())
                        .filter(|n| *n <= MAX_BREAKER_BYTES)
                })
                .is_ok();
        if !room {
            share.fetch_sub(1, Ordering::AcqRel);
        }
        room
    }

    /// Gives back what [`Breakers::take`] took.
    fn give_back(&self, tenant: &str, name: &str) {
        if let Some(share) = self.per_tenant.pin().get(tenant) {
            share.held.fetch_sub(1, Ordering::AcqRel);
        }
        self.bytes.fetch_sub(name.len(), Ordering::AcqRel);
    }

    /// Forgets the closed tool breakers of `tenant`: one tenant's made-up tool names filled
    /// the table for good before, and no tool of another tenant (nor an upstream added later)
    /// got a breaker again. Only what is removed here is given back (two workers may forget
    /// at once).
    fn forget_closed_of(&self, tenant: &str) {
        let map = self.map.pin();
        let closed: Vec<String> = map
            .iter()
            .filter(|(name, b)| tenant_of(name) == Some(tenant) && b.state() == CLOSED)
            .map(|(name, _)| name.clone())
            .collect();
        for name in closed {
            if map.remove(&name).is_some() {
                self.give_back(tenant, &name);
            }
        }
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

    /// Whether a call through breaker `name` succeeded after `since` (monotonic ns). A call
    /// that timed out meanwhile says that call was slow, not that its upstream hung: a tenant
    /// whose tool runs past the timeout opened an upstream's shared breaker for every tenant.
    pub fn answered_since(&self, name: &str, since: u64) -> bool {
        self.map
            .pin()
            .get(name)
            .is_some_and(|b| b.answered_at.load(Ordering::Acquire) > since)
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
    /// A call's longest time out, for the tests that are not about it.
    const LEASE: Duration = Duration::from_secs(60);

    #[test]
    fn the_table_is_bounded_in_bytes() {
        let c = cfg("consecutive_failures = 3\nopen_ms = 100");
        let breakers = Breakers::default();
        // 2,000 names of 2 KiB would be 4 MiB: past 1 MiB, new names get no breaker.
        for i in 0..2_000 {
            let name = format!("up/{i:0>2048}");
            assert_eq!(breakers.allow(&name, MS, &c, LEASE), Ok(Pass::Closed(0)));
        }
        let states = breakers.states();
        let bytes: usize = states.iter().map(|(n, _)| n.len()).sum();
        assert!(bytes <= MAX_BREAKER_BYTES, "{bytes} bytes of names");
        assert!(states.len() < 600, "{} breakers", states.len());
    }

    #[test]
    fn a_success_is_noted_for_the_calls_that_time_out_meanwhile() {
        let c = cfg("consecutive_failures = 2\nopen_ms = 60000");
        let breakers = Breakers::default();
        assert!(!breakers.answered_since("up", 0), "no breaker yet");
        let pass = breakers.allow("up", MS, &c, LEASE).unwrap();
        assert!(!breakers.answered_since("up", 0), "nothing answered yet");
        // A failure is no answer.
        breakers.record("up", 2 * MS, &c, pass, false);
        assert!(!breakers.answered_since("up", 0));
        breakers.record("up", 5 * MS, &c, pass, true);
        assert!(breakers.answered_since("up", 4 * MS));
        assert!(!breakers.answered_since("up", 5 * MS), "only after `since`");
        // An answer of an ended turn (the breaker opened meanwhile) is an answer all the same.
        breakers.record("up", 6 * MS, &c, pass, false);
        breakers.record("up", 6 * MS, &c, pass, false);
        assert_eq!(breakers.states(), vec![("up".to_owned(), OPEN)]);
        breakers.record("up", 9 * MS, &c, pass, true);
        assert!(breakers.answered_since("up", 8 * MS));
        assert!(!breakers.answered_since("other", 0));
    }

    #[test]
    fn made_up_tool_names_cannot_keep_another_tenants_tool_from_its_breaker() {
        let c = cfg("consecutive_failures = 2\nopen_ms = 60000");
        let breakers = Breakers::default();
        // The victim's tool has failed once, and another opened.
        assert_eq!(
            breakers.allow("up/slow@b", MS, &c, LEASE),
            Ok(Pass::Closed(0))
        );
        breakers.record("up/slow@b", MS, &c, Pass::Closed(0), false);
        for _ in 0..2 {
            assert_eq!(
                breakers.allow("up/real@b", MS, &c, LEASE),
                Ok(Pass::Closed(0))
            );
            breakers.record("up/real@b", MS, &c, Pass::Closed(0), false);
        }
        // One tenant calls ever new tool names, each failing once (closed: below threshold),
        // more than the table holds.
        for i in 0..MAX_BREAKERS + 10 {
            let name = format!("up/made-up-{i}@a");
            let _ = breakers.allow(&name, MS, &c, LEASE);
            breakers.record(&name, MS, &c, Pass::Closed(0), false);
        }
        // It held its share at most; the other tenant's counts are as they were.
        let states = breakers.states();
        let of_a = states.iter().filter(|(n, _)| n.ends_with("@a")).count();
        assert!(of_a <= MAX_TOOL_BREAKERS_PER_TENANT, "{of_a}");
        assert!(
            breakers.allow("up/real@b", 2 * MS, &c, LEASE).is_err(),
            "still open"
        );
        assert_eq!(
            breakers.allow("up/slow@b", 2 * MS, &c, LEASE),
            Ok(Pass::Closed(0))
        );
        breakers.record("up/slow@b", 2 * MS, &c, Pass::Closed(0), false);
        assert!(
            breakers.allow("up/slow@b", 3 * MS, &c, LEASE).is_err(),
            "its first failure was kept: the second opened it"
        );
        // Another tenant's new tool, and an upstream added later, get their breakers.
        assert_eq!(
            breakers.allow("up/other@c", MS, &c, LEASE),
            Ok(Pass::Closed(0))
        );
        assert_eq!(breakers.allow("later", MS, &c, LEASE), Ok(Pass::Closed(0)));
        assert!(states.len() < MAX_BREAKERS);
        // The counts match what is in the table.
        let bytes: usize = breakers
            .states()
            .iter()
            .filter(|(n, _)| n.contains('/'))
            .map(|(n, _)| n.len())
            .sum();
        assert_eq!(breakers.bytes.load(Ordering::Acquire), bytes);
    }

    #[test]
    fn opens_after_consecutive_failures_probes_and_closes_on_success() {
        let c = cfg("consecutive_failures = 3\nopen_ms = 100");
        let b = Breaker::default();
        for _ in 0..2 {
            assert_eq!(b.allow(MS, &c, LEASE), Ok(Pass::Closed(0)));
            b.record(MS, &c, Pass::Closed(0), false);
        }
        b.record(MS, &c, Pass::Closed(0), true);
        for _ in 0..2 {
            b.record(MS, &c, Pass::Closed(0), false);
        }
        assert_eq!(b.state(), CLOSED, "a success broke the row");
        b.record(MS, &c, Pass::Closed(0), false);
        assert_eq!(b.state(), OPEN);
        let wait = b.allow(50 * MS, &c, LEASE).unwrap_err();
        assert_eq!(wait, Duration::from_millis(51));
        // After open_ms: one probe, the others wait for it.
        assert_eq!(b.allow(101 * MS, &c, LEASE), Ok(Pass::Probe(1)));
        assert!(b.allow(101 * MS, &c, LEASE).is_err());
        b.record(102 * MS, &c, Pass::Probe(1), false);
        assert_eq!(b.state(), OPEN, "a failed probe opens it again");
        assert!(b.allow(150 * MS, &c, LEASE).is_err());
        assert_eq!(b.allow(203 * MS, &c, LEASE), Ok(Pass::Probe(2)));
        b.record(204 * MS, &c, Pass::Probe(2), true);
        assert_eq!(b.state(), CLOSED);
        assert_eq!(b.allow(205 * MS, &c, LEASE), Ok(Pass::Closed(3)));
    }

    /// Only the probes decide a half-open breaker, and only those of its current turn.
    #[test]
    fn a_verdict_of_an_ended_turn_decides_nothing() {
        let c = cfg("consecutive_failures = 1\nopen_ms = 100\nhalf_open_probes = 2");
        let b = Breaker::default();
        // A slow call let through while closed, then a failure opens the breaker.
        let slow = b.allow(MS, &c, LEASE).unwrap();
        b.record(MS, &c, Pass::Closed(0), false);
        assert_eq!(b.state(), OPEN);
        let (p1, p2) = (
            b.allow(101 * MS, &c, LEASE).unwrap(),
            b.allow(101 * MS, &c, LEASE).unwrap(),
        );
        assert_eq!((p1, p2), (Pass::Probe(1), Pass::Probe(1)));
        // The slow call succeeds now: it says nothing of the upstream since it opened.
        b.record(102 * MS, &c, slow, true);
        assert_eq!(
            b.state(),
            HALF_OPEN,
            "a call from before the opening closed it"
        );
        // A probe fails (open again); the other probe's success is of the turn that ended.
        b.record(103 * MS, &c, p1, false);
        assert_eq!(b.state(), OPEN);
        b.record(104 * MS, &c, p2, true);
        assert_eq!(b.state(), OPEN, "a probe of the ended turn closed it");
        // Nor does it give its probe back to the next turn.
        let p3 = b.allow(204 * MS, &c, LEASE).unwrap();
        let p4 = b.allow(204 * MS, &c, LEASE).unwrap();
        assert_eq!((p3, p4), (Pass::Probe(2), Pass::Probe(2)));
        b.release(p2);
        assert!(
            b.allow(204 * MS, &c, LEASE).is_err(),
            "two probes of turn 2 are out"
        );
        b.release(p4);
        assert_eq!(
            b.allow(204 * MS, &c, LEASE),
            Ok(Pass::Probe(2)),
            "its own came back"
        );
    }

    /// A probe whose worker died with it is never judged nor given back: with all probes so
    /// lost, the half-open breaker refused every call until a restart. Past their lease
    /// another goes.
    #[test]
    fn probes_out_longer_than_their_lease_are_lost() {
        let c = cfg("consecutive_failures = 1\nopen_ms = 100");
        let lease = Duration::from_secs(1);
        let b = Breaker::default();
        assert_eq!(b.allow(MS, &c, lease), Ok(Pass::Closed(0)));
        b.record(MS, &c, Pass::Closed(0), false);
        let lost = b.allow(101 * MS, &c, lease).unwrap();
        assert_eq!(lost, Pass::Probe(1));
        assert!(b.allow(1_100 * MS, &c, lease).is_err(), "within its lease");
        let probe = b.allow(1_102 * MS, &c, lease).unwrap();
        assert_eq!(probe, Pass::Probe(1), "past it, another");
        assert!(
            b.allow(1_103 * MS, &c, lease).is_err(),
            "one probe at a time"
        );
        // One taken for lost that comes back after all (a long stream) still decides.
        b.record(1_104 * MS, &c, lost, false);
        assert_eq!(b.state(), OPEN);
        b.record(1_105 * MS, &c, probe, true);
        assert_eq!(b.state(), OPEN, "the other's verdict is of an ended turn");
        assert_eq!(b.allow(1_206 * MS, &c, lease), Ok(Pass::Probe(2)));
    }

    /// A breaker whose probes failed for 2^31 turns counts again once it closes (a review
    /// found that counts tagged with a turn that far behind read as a later turn's).
    #[test]
    fn counts_start_again_however_many_turns_went_by() {
        let c = cfg("consecutive_failures = 2\nopen_ms = 100");
        let b = Breaker::default();
        b.record(MS, &c, Pass::Closed(0), false);
        let far = (1 << 31) + 5;
        b.word.store(join(far, HALF_OPEN, 1), Ordering::Release);
        b.record(2 * MS, &c, Pass::Probe(far), true);
        assert_eq!(b.state(), CLOSED);
        for _ in 0..2 {
            b.record(3 * MS, &c, Pass::Closed(far + 1), false);
        }
        assert_eq!(b.state(), OPEN);
    }

    /// A closed turn counts from nothing: no failure of an earlier turn, in a row or in the
    /// window, is held against it (its counts are tagged with their turn, not reset).
    #[test]
    fn a_closed_turn_counts_only_its_own_calls() {
        let c =
            cfg("consecutive_failures = 3\nfailure_ratio = 0.5\nmin_requests = 6\nopen_ms = 100");
        let b = Breaker::default();
        for ok in [true, true, false, false, false] {
            b.record(MS, &c, Pass::Closed(0), ok);
        }
        assert_eq!(b.state(), OPEN, "3 in a row");
        let probe = b.allow(102 * MS, &c, LEASE).unwrap();
        b.record(103 * MS, &c, probe, true);
        assert_eq!(b.allow(104 * MS, &c, LEASE), Ok(Pass::Closed(2)));
        // With the first turn's 3 of 5 counted, two more failures would open it by the ratio
        // (5 of 8), the first by the row (4).
        for ok in [false, false, true] {
            b.record(104 * MS, &c, Pass::Closed(2), ok);
        }
        assert_eq!(b.state(), CLOSED);
        // A late call of the first turn counts in no turn.
        b.record(105 * MS, &c, Pass::Closed(0), false);
        for _ in 0..2 {
            b.record(105 * MS, &c, Pass::Closed(2), false);
        }
        assert_eq!(b.state(), CLOSED, "2 in a row, 4 of 5");
        b.record(105 * MS, &c, Pass::Closed(2), false);
        assert_eq!(b.state(), OPEN, "3 in a row");
    }

    #[test]
    fn opens_on_a_failure_ratio_once_enough_calls_were_seen() {
        let c = cfg("failure_ratio = 0.5\nmin_requests = 10\nwindow_s = 10");
        let b = Breaker::default();
        for i in 0..9 {
            b.record(MS, &c, Pass::Closed(0), i % 2 == 0);
        }
        assert_eq!(b.state(), CLOSED, "9 calls: too few to judge");
        b.record(MS, &c, Pass::Closed(0), false);
        assert_eq!(b.state(), OPEN, "5 of 10 failed");
        // A new window starts from nothing.
        let c2 = cfg("failure_ratio = 0.5\nmin_requests = 2\nwindow_s = 1");
        let b = Breaker::default();
        b.record(MS, &c2, Pass::Closed(0), false);
        b.record(2_000 * MS, &c2, Pass::Closed(0), true);
        assert_eq!(b.state(), CLOSED, "the failure was in the previous window");
    }
}
