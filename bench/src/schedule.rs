//! The open-loop schedule and its clock: when each request of each connection is due, and a
//! ticker thread that wakes each connection at its due instants with microsecond precision.
//!
//! monoio's timer wheel ticks every millisecond, so a connection that slept on it sent up to
//! 1 ms late and a 30 µs call measured ~1 ms at p50. Here one std thread (its timer slack set to
//! 1 ns) sleeps on the kernel's high-resolution timer until the next due instant of the whole
//! load, and writes that request's sequence number to the connection's `SOCK_SEQPACKET` pair;
//! the connection's task awaits the record on its monoio runtime. The ticker never spins (it
//! would take a core from the gateway on this 2-core machine) and never waits on a connection
//! (a full socket drops the tick; the connection falls back to its own timer).

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// Request `k` of connection `i` is due at `start + (k · n + i) / rate`: the connections'
/// schedules interleave evenly into one schedule of the whole load at `rate`. Computed from the
/// index every time (never by adding intervals), so it does not drift however long it runs.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    /// Requests per second over all connections.
    pub rate: f64,
    pub connections: usize,
}

impl Schedule {
    /// When request `k` of connection `conn` is due.
    pub fn due(&self, conn: usize, k: u64) -> Instant {
        self.nth(k * self.connections as u64 + conn as u64)
    }

    /// The `j`-th due instant of the whole load (it belongs to connection `j mod n`).
    pub fn nth(&self, j: u64) -> Instant {
        // f64 holds j · 1e9 / rate exactly to the nanosecond up to 2^53 ns (104 days).
        self.start + Duration::from_nanos((j as f64 * 1e9 / self.rate).round() as u64)
    }

    /// The connection and its request number of the `j`-th due instant.
    pub fn owner(&self, j: u64) -> (usize, u64) {
        let n = self.connections as u64;
        ((j % n) as usize, j / n)
    }

    /// The interval between two requests of one connection.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.connections as f64 / self.rate)
    }
}

/// The receiving end of a connection's ticks.
pub struct TickRx(OwnedFd);

impl TickRx {
    /// On the connection's monoio runtime.
    pub fn into_stream(self) -> monoio::net::UnixStream {
        // A SOCK_SEQPACKET socket read with recv(): one record per read, never half of one.
        let std = std::os::unix::net::UnixStream::from(self.0);
        monoio::net::UnixStream::from_std(std).expect("register tick socket")
    }
}

/// Waits until request `k` (due at `due`) may be sent: its tick arrived, or (should the tick
/// have been dropped) `due` plus 5 ms passed on monoio's coarse timer. Ticks of earlier requests
/// (sent late, without waiting) are skipped.
pub async fn wait(
    rx: &mut monoio::net::UnixStream,
    buf: &mut Option<Vec<u8>>,
    k: u64,
    due: Instant,
) {
    use monoio::io::AsyncReadRent as _;
    let fallback = due + Duration::from_millis(5);
    loop {
        let left = fallback.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let b = buf.take().unwrap_or_else(|| Vec::with_capacity(8));
        let Ok((res, mut b)) = monoio::time::timeout(left, rx.read(b)).await else {
            return;
        };
        let got = match res {
            Ok(8) => b
                .get(..8)
                .and_then(|x| x.try_into().ok())
                .map(u64::from_le_bytes),
            _ => None,
        };
        b.clear();
        *buf = Some(b);
        match got {
            Some(seq) if seq >= k => return,
            Some(_) => {}
            // Closed or failed: the ticker is gone; the fallback timer is all there is.
            None => {
                let left = fallback.saturating_duration_since(Instant::now());
                monoio::time::sleep(left).await;
                return;
            }
        }
    }
}

/// The ticker thread; it stops at `until` or when dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<TickStats>>,
}

/// How late the ticker woke, over all ticks: what the schedule's precision is on this machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct TickStats {
    pub ticks: u64,
    /// Wake-ups later than the due instant, in µs: median and 99th percentile.
    pub late_p50_us: u64,
    pub late_p99_us: u64,
}

/// A `SOCK_SEQPACKET` pair: (sender, receiver).
fn pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, owned from here on.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert!(r == 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The sending ends of every connection's ticks, before the schedule is known.
pub struct Senders(Vec<OwnedFd>);

impl Ticker {
    /// A channel per connection, in connection order: the connections take their receivers
    /// first, and [`Senders::start`] ticks once the schedule's start is known.
    pub fn channels(connections: usize) -> (Senders, Vec<TickRx>) {
        let (tx, rx) = (0..connections)
            .map(|_| {
                let (t, r) = pair();
                (t, TickRx(r))
            })
            .unzip();
        (Senders(tx), rx)
    }

    /// Stops the ticker and says how late it woke.
    pub fn finish(mut self) -> TickStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Senders {
    /// Starts ticking `schedule` (its connections: those of [`Ticker::channels`]) for every due
    /// instant before `until`.
    pub fn start(self, schedule: Schedule, until: Instant) -> Ticker {
        let tx = self.0;
        assert_eq!(tx.len(), schedule.connections, "a channel per connection");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: prctl with PR_SET_TIMERSLACK takes a plain integer; 1 ns of slack (the
            // default is 50 µs) lets the kernel wake this thread at the instant asked for.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
            }
            let mut late = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            let mut j = 0u64;
            loop {
                let due = schedule.nth(j);
                if due >= until || flag.load(Ordering::Relaxed) {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let _ =
                    late.record(Instant::now().saturating_duration_since(due).as_micros() as u64);
                let (conn, k) = schedule.owner(j);
                let record = k.to_le_bytes();
                // SAFETY: a live descriptor and an 8-byte buffer; MSG_DONTWAIT: a connection
                // that does not read drops its ticks rather than stopping the others'.
                unsafe {
                    libc::send(
                        tx[conn].as_raw_fd(),
                        record.as_ptr().cast(),
                        record.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    );
                }
                j += 1;
            }
            TickStats {
                ticks: j,
                late_p50_us: late.value_at_quantile(0.5),
                late_p99_us: late.value_at_quantile(0.99),
            }
        });
        Ticker {
            stop,
            thread: Some(thread),
        }
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
