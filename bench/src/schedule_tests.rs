use std::time::{Duration, Instant};

use super::*;

#[test]
fn due_instants_are_computed_not_accumulated() {
    // 32 connections at 3,000 rps: one connection's interval is 10,666,666.67 ns, which a
    // `Duration` cannot hold; adding it up drifts by 1 ns every 3 requests.
    let s = Schedule {
        start: Instant::now(),
        rate: 3000.0,
        connections: 32,
    };
    let k = 1_000_000u64;
    let exact_ns = ((k * 32 + 5) as f64 * 1e9 / 3000.0).round() as u64;
    assert_eq!(s.due(5, k) - s.start, Duration::from_nanos(exact_ns));
    let mut summed = s.due(5, 0);
    for _ in 0..k {
        summed += s.interval();
    }
    let exact = s.due(5, k);
    let drift = exact.max(summed) - exact.min(summed);
    assert!(
        drift > Duration::from_micros(100),
        "the sum of intervals drifts (this is why due() does not add them up)"
    );
    // Consecutive requests of one connection are the interval apart, to the nanosecond.
    for k in [0, 1, 999, 1_000_000] {
        let gap = (s.due(7, k + 1) - s.due(7, k)).as_nanos();
        assert!((10_666_666..=10_666_667).contains(&gap), "gap {gap} ns");
    }
}

#[test]
fn connections_interleave_evenly_into_one_schedule() {
    let s = Schedule {
        start: Instant::now(),
        rate: 1000.0,
        connections: 4,
    };
    let mut last = s.start;
    for j in 0..1000 {
        let (conn, k) = ((j % 4) as usize, j / 4);
        assert_eq!(s.due(conn, k), s.nth(j));
        assert!(s.nth(j) >= last);
        // 1 ms apart over the whole load, whichever connection sends.
        assert_eq!(s.nth(j) - s.start, Duration::from_millis(j));
        last = s.nth(j);
    }
}

/// The clock wakes connections within a fraction of a millisecond of their due instants; the
/// monoio timer it replaced woke them at the next 1 ms tick (median lateness ~500 µs or more).
/// A bound on precision, not speed: 300 µs at the median, kept loose for a shared machine.
#[test]
fn the_clock_wakes_connections_within_a_fraction_of_a_millisecond() {
    let schedule = Schedule {
        start: Instant::now() + Duration::from_millis(50),
        rate: 2000.0,
        connections: 4,
    };
    let until = schedule.start + Duration::from_millis(400);
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime");
    let (late, clock_late) = rt.block_on(async move {
        let (clock, driver) = Clock::new();
        monoio::spawn(driver);
        let tasks: Vec<_> = (0..schedule.connections)
            .map(|conn| {
                let clock = clock.clone();
                monoio::spawn(async move {
                    let mut late = Vec::new();
                    let mut k = 0;
                    loop {
                        let due = schedule.due(conn, k);
                        if due >= until {
                            break late;
                        }
                        clock.until(due).await;
                        late.push(Instant::now().saturating_duration_since(due).as_micros() as u64);
                        k += 1;
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await);
        }
        (all, TickStats::of(&clock.late()))
    });
    let mut late = late;
    late.sort_unstable();
    let median = late[late.len() / 2];
    assert!(late.len() >= 700, "{} wake-ups", late.len());
    assert!(
        median < 300,
        "median lateness {median} µs (the clock's own: p50 {} µs, p99 {} µs)",
        clock_late.late_p50_us,
        clock_late.late_p99_us
    );
    // Every wake-up but those due before the first poll went through the clock.
    assert!(clock_late.ticks >= 700, "{clock_late:?}");
}
