//! A coarse monotonic clock, for deadlines and timestamps that need not be exact.
//!
//! `Instant::now()` (CLOCK_MONOTONIC) costs about 30 ns here, and a small request read it 27
//! times; nginx reads the time once per turn of its loop. CLOCK_MONOTONIC_COARSE is the same
//! clock as of its last tick (1–10 ms ago, 4 ms on most kernels), for about a quarter of the
//! cost. [`coarse`] maps it onto `Instant`, so that it mixes with precise readings: it is never
//! ahead of `Instant::now()`, and about a tick (and [`MARGIN`]) behind at most (a tickless or
//! busy kernel may tick late now and then). A deadline ([`deadline`]) is made from it a tick
//! and the margin later, so that it does not come before its time (but for such a late tick's
//! lateness), and comes at most two ticks after; an age measured from a timestamp of it
//! against `Instant::now()` is at most a tick (and the margin) too long. What is measured
//! (latencies, waits on an upstream) stays on `Instant::now()`.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use nix::time::{ClockId, clock_gettime};

/// The coarse clock's reading (since boot, as CLOCK_MONOTONIC counts).
fn coarse_reading() -> Duration {
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(Duration::ZERO, Duration::from)
}

/// Where the coarse clock's zero falls on `Instant`'s line, and the clock's tick.
struct Mapping {
    zero: Instant,
    tick: Duration,
}

/// How much earlier than the pairs read put it the coarse clock's zero is taken: the kernel
/// updates the coarse clock a little earlier or later after each tick (tens of microseconds
/// here), and an update earlier than every one seen while the zero was taken put [`coarse`]
/// ahead of `Instant::now()` (3 µs, now and then, on a loaded host).
const MARGIN: Duration = Duration::from_micros(250);

/// A coarse reading is at most the precise one read after it: each pair read puts the coarse
/// clock's zero no earlier than it is, and the pair read nearest a tick nearest. Pairs are read
/// over three ticks (a thread preempted at one tick is not at all three); the earliest zero,
/// less [`MARGIN`], is kept, so that [`coarse`] is never ahead of `Instant::now()`.
fn mapping() -> &'static Mapping {
    static MAPPING: OnceLock<Mapping> = OnceLock::new();
    MAPPING.get_or_init(|| {
        let tick = nix::time::clock_getres(ClockId::CLOCK_MONOTONIC_COARSE)
            .map_or(Duration::from_millis(10), Duration::from);
        let zero_of = || {
            let reading = coarse_reading();
            let now = Instant::now();
            now.checked_sub(reading).unwrap_or(now)
        };
        let mut zero = zero_of();
        let until = Instant::now() + (tick * 3).min(Duration::from_millis(50));
        while Instant::now() < until {
            zero = zero.min(zero_of());
            std::hint::spin_loop();
        }
        let zero = zero.checked_sub(MARGIN).unwrap_or(zero);
        Mapping { zero, tick }
    })
}

/// Now, as of the coarse clock's last tick (see the module's doc).
pub fn coarse() -> Instant {
    let m = mapping();
    m.zero.checked_add(coarse_reading()).unwrap_or(m.zero)
}

/// The instant `after` from now, never sooner, at most a tick of the coarse clock (and
/// [`MARGIN`]) later; as monoio's timers take it.
pub fn deadline(after: Duration) -> monoio::time::Instant {
    let m = mapping();
    monoio::time::Instant::from_std(coarse()) + m.tick + MARGIN + after
}

/// Takes the mapping now (it reads the clocks for three ticks, 12 ms on most kernels), before
/// requests are served.
pub fn start() {
    let _ = mapping();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coarse clock is never ahead of the precise one, and nearly always at most a tick
    /// (and a little: a tickless kernel may tick late) behind, and it moves; a deadline is
    /// nearly always neither before its time nor more than two ticks after. "Nearly always": on
    /// a busy host a tick comes later now and then (the unit tests run beside other work saw a
    /// read behind by more), and a deadline made just then comes that much early.
    #[test]
    fn coarse_is_at_most_a_tick_behind_and_never_ahead() {
        start();
        let tick = mapping().tick;
        let late = MARGIN + Duration::from_micros(100);
        let begun = coarse();
        // Up to three rounds of about a millisecond: one tick that comes late (a virtual
        // machine's CPU taken away for a moment) holds back every read of its round.
        let reads_behind = || {
            let mut behind_more = 0;
            for _ in 0..10_000 {
                let before = Instant::now();
                let c = coarse();
                let after = Instant::now();
                assert!(c <= after, "ahead: {:?}", c - after);
                let behind = before.saturating_duration_since(c);
                // A tick may come very late on a loaded virtual machine (once, 100 ms, while
                // the whole suite ran beside it): counted below with the others, bounded only
                // loosely.
                assert!(behind < Duration::from_secs(2), "behind by {behind:?}");
                behind_more += usize::from(behind > tick + late);
            }
            behind_more
        };
        let rounds: Vec<usize> = (0..3).map(|_| reads_behind()).collect();
        assert!(
            rounds.iter().any(|&n| n <= 100),
            "reads of 10,000 behind by more than a tick, in three rounds: {rounds:?}"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(coarse() > begun);
        let after = Duration::from_millis(5);
        let (mut early, mut later) = (0, 0);
        for _ in 0..10_000 {
            let now = monoio::time::Instant::now();
            let d = deadline(after);
            // Early only by as much as a tick came late (as a read behind, above).
            assert!(
                d + Duration::from_secs(2) >= now + after,
                "early by {:?}",
                now + after - d
            );
            early += usize::from(d + Duration::from_micros(100) < now + after);
            later += usize::from(d > now + after + tick * 2);
        }
        assert!(early <= 100, "{early} of 10,000 deadlines early");
        assert!(
            later <= 100,
            "{later} of 10,000 deadlines over two ticks late"
        );
    }
}
