//! The open-loop schedule and its clock: when each request of each connection is due, and a
//! clock that wakes each connection at its due instants with microsecond precision.
//!
//! monoio's timer wheel ticks every millisecond, so a connection that slept on it sent up to
//! 1 ms late and a 30 µs call measured ~1 ms at p50. Each generator thread has a [`Clock`]
//! instead: one `timerfd`, armed for the earliest instant a connection of the thread waits for
//! and read on the thread's own runtime, which wakes the connections whose instants passed.
//! (A ticker thread that wrote each due instant to its connection's socket did the same at the
//! cost of two more context switches and a send per request on the generator's core: at half
//! load it kept that core busy and its queueing in every latency.)

use std::{
    cell::RefCell,
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    future::Future,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    rc::Rc,
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

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

    /// The interval between two requests of one connection.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.connections as f64 / self.rate)
    }
}

/// How late the clock woke connections, over all wake-ups: what the schedule's precision is on
/// this machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct TickStats {
    pub ticks: u64,
    /// Wake-ups later than the due instant, in µs: median and 99th percentile.
    pub late_p50_us: u64,
    pub late_p99_us: u64,
}

impl TickStats {
    pub fn of(late: &Histogram<u64>) -> Self {
        Self {
            ticks: late.len(),
            late_p50_us: late.value_at_quantile(0.5),
            late_p99_us: late.value_at_quantile(0.99),
        }
    }
}

/// One generator thread's clock (see the module's documentation). Clones share it.
#[derive(Clone)]
pub struct Clock(Rc<Inner>);

struct Inner {
    timer: OwnedFd,
    /// An instant and the same moment on `CLOCK_MONOTONIC` (what `Instant` reads on Linux):
    /// instants become the timer's absolute expirations.
    base: (Instant, Duration),
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    /// Due instants waited for, earliest first, each with its waiter's key.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Wakers of waiters not yet woken (a dropped waiter's key is gone from here).
    waiting: HashMap<u64, Waker>,
    next_key: u64,
    /// The expiration the timer is armed for.
    armed: Option<Instant>,
    /// How late each wake-up was, µs.
    late: Option<Histogram<u64>>,
    /// The load is over: the driver returns at its next read.
    stopped: bool,
}

fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Clock {
    /// The clock, and the task that drives it (spawn it on the thread's runtime).
    pub fn new() -> (Self, impl Future<Output = ()>) {
        // SAFETY: timerfd_create takes plain integers and returns a new descriptor or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        assert!(fd >= 0, "timerfd: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor, owned from here on.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        // The pair read closest together of three (a preemption between the two reads would
        // make every wake-up late by it).
        let base = (0..3)
            .map(|_| {
                let i = Instant::now();
                let m = monotonic_now();
                (i.elapsed(), (i, m))
            })
            .min_by_key(|(gap, _)| *gap)
            .map(|(_, pair)| pair)
            .expect("three pairs");
        let clock = Clock(Rc::new(Inner {
            timer,
            base,
            state: RefCell::new(State {
                late: Some(Histogram::new(3).expect("histogram")),
                ..State::default()
            }),
        }));
        let driver = clock.clone().drive();
        (clock, driver)
    }

    /// Resolves at `due` (a few µs after it; later when the thread is busy).
    pub async fn until(&self, due: Instant) {
        if Instant::now() >= due {
            return;
        }
        let key = {
            let mut st = self.0.state.borrow_mut();
            let key = st.next_key;
            st.next_key += 1;
            st.due.push(Reverse((due, key)));
            if st.armed.is_none_or(|a| due < a) {
                self.arm(due);
                st.armed = Some(due);
            }
            key
        };
        let wait = Waiting {
            clock: self,
            key,
            registered: false,
        };
        wait.await;
    }

    /// Ends the driver (at once: the timer fires now); await the driver's task after it.
    pub fn stop(&self) {
        self.0.state.borrow_mut().stopped = true;
        self.arm(Instant::now());
    }

    /// How late the wake-ups were.
    pub fn late(&self) -> Histogram<u64> {
        self.0
            .state
            .borrow_mut()
            .late
            .take()
            .unwrap_or_else(|| Histogram::new(3).expect("histogram"))
    }

    /// Arms the timer for `at` (absolute; at once if past).
    fn arm(&self, at: Instant) {
        let (i0, m0) = self.0.base;
        let t = m0 + at.saturating_duration_since(i0);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: t.as_secs() as libc::time_t,
                // Never all zero (that would disarm it): monotonic time is past boot.
                tv_nsec: t.subsec_nanos().max(1) as libc::c_long,
            },
        };
        // SAFETY: a live timerfd and a valid itimerspec; the old value is not asked for.
        unsafe {
            libc::timerfd_settime(
                self.0.timer.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            );
        }
    }

    /// Reads the timer's expirations and wakes every waiter whose instant passed, then arms the
    /// timer for the earliest one left (or leaves it disarmed until a waiter arms it).
    async fn drive(self) {
        use monoio::io::AsyncReadRent as _;
        // A timerfd is read like any descriptor: readv (IORING_OP_READV, or readv(2) on the
        // epoll driver) does not need a socket, where monoio's read (recv) would.
        let dup = self.0.timer.try_clone().expect("dup timerfd");
        let std = std::os::unix::net::UnixStream::from(dup);
        let mut timer = monoio::net::UnixStream::from_std(std).expect("register timerfd");
        let mut woken = Vec::new();
        loop {
            let buf: monoio::buf::VecBuf = vec![vec![0u8; 8]].into();
            let (r, _) = timer.readv(buf).await;
            match r {
                Ok(_) => {}
                // A kernel whose timerfd cannot wait inside io_uring answers at once (the
                // descriptor is non-blocking, for the epoll driver): wait for it to be readable.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Err(e) = timer.readable(false).await {
                        panic!("the open loop's clock (a timerfd) cannot be waited on: {e}");
                    }
                    continue;
                }
                // Waiters would wait forever: fail loudly instead.
                Err(e) => panic!("the open loop's clock (a timerfd) cannot be read: {e}"),
            }
            if self.0.state.borrow().stopped {
                return;
            }
            let now = Instant::now();
            {
                let mut st = self.0.state.borrow_mut();
                while let Some(&Reverse((due, key))) = st.due.peek() {
                    if due > now {
                        break;
                    }
                    st.due.pop();
                    if let Some(w) = st.waiting.remove(&key) {
                        if let Some(late) = st.late.as_mut() {
                            let _ =
                                late.record(now.saturating_duration_since(due).as_micros() as u64);
                        }
                        woken.push(w);
                    }
                }
                st.armed = st.due.peek().map(|&Reverse((due, _))| due);
                if let Some(at) = st.armed {
                    self.arm(at);
                }
            }
            for w in woken.drain(..) {
                w.wake();
            }
        }
    }
}

/// A waiter of [`Clock::until`]: ready once the driver has taken its key out of `waiting`.
struct Waiting<'a> {
    clock: &'a Clock,
    key: u64,
    registered: bool,
}

impl Future for Waiting<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut st = self.clock.0.state.borrow_mut();
        if self.registered && !st.waiting.contains_key(&self.key) {
            return Poll::Ready(());
        }
        st.waiting.insert(self.key, cx.waker().clone());
        drop(st);
        self.registered = true;
        Poll::Pending
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Its heap entry stays; the driver skips a key nobody waits on.
        self.clock.0.state.borrow_mut().waiting.remove(&self.key);
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;
