//! The worker's deadlines: the idle timeouts of the connections waiting for their next request,
//! and the timeouts of every read and write of a request and its upstream exchange ([`within`]),
//! in one table per worker thread swept by one timer, instead of a timer each. monoio's `Sleep`
//! is 640 bytes aligned to 128: boxed in every idle connection's wait it was 0.75 KiB or more of
//! each one's memory, and inline in each read and write it made every future of a request's path
//! 128-aligned and KiBs large (a request's boxed state was 13 KiB, copied once a request), beside
//! a timer wheel entry made and removed for each. An entry here is a deadline and a waker (40
//! bytes), and a large table is freed once no connection waits.
//!
//! The sweep runs at the earliest deadline, at most every [`SWEEP_FLOOR`] (deadlines that close
//! together are served by one sweep): a timeout fires up to that late. Nothing runs while
//! nothing waits.

use std::{
    cell::RefCell,
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use monoio::time::Instant;

/// The shortest time between two sweeps.
const SWEEP_FLOOR: Duration = Duration::from_millis(50);

/// Slots kept once none is used (10 KiB): fewer are not freed and made again for every
/// request of a worker with one connection.
const KEEP_SLOTS: usize = 256;

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots in use (waiting or due).
    used: usize,
    /// Changes when the table is forgotten (a worker's runtime died): deadlines and sweepers of
    /// an older epoch are not this table's.
    epoch: u64,
    /// A sweeper task runs (it ends when no deadline waits).
    sweeping: bool,
    /// When the sweeper wakes next, while it sleeps.
    planned: Option<Instant>,
    /// Wakes the sleeping sweeper early (a deadline earlier than it planned for).
    kick: Option<Waker>,
    kicked: bool,
    /// The worker stops ([`stop_all`]).
    stopping: bool,
}

enum Slot {
    Free,
    Waiting {
        deadline: Instant,
        waker: Waker,
    },
    Due,
    /// A [`Stop`] waiting for the worker to stop.
    Stop(Waker),
}

impl Table {
    fn insert(&mut self, slot: Slot) -> usize {
        self.used += 1;
        if let Some(key) = self.free.pop() {
            self.slots[key] = slot;
            key
        } else {
            self.slots.push(slot);
            self.slots.len() - 1
        }
    }

    fn remove(&mut self, key: usize) {
        if let Some(slot) = self.slots.get_mut(key)
            && !matches!(slot, Slot::Free)
        {
            *slot = Slot::Free;
            self.used -= 1;
            if self.used == 0 {
                if self.slots.capacity() > KEEP_SLOTS {
                    // 10,000 connections gone: their slots go too.
                    self.slots = Vec::new();
                    self.free = Vec::new();
                } else {
                    // A few: kept for the next (each request registers again).
                    self.slots.clear();
                    self.free.clear();
                }
            } else {
                self.free.push(key);
            }
        }
    }

    /// Marks the deadlines past `now` due and takes their wakers; the earliest deadline left.
    fn sweep(&mut self, now: Instant, due: &mut Vec<Waker>) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for slot in &mut self.slots {
            if let Slot::Waiting { deadline, .. } = slot {
                if *deadline <= now {
                    if let Slot::Waiting { waker, .. } = std::mem::replace(slot, Slot::Due) {
                        due.push(waker);
                    }
                } else {
                    earliest = Some(earliest.map_or(*deadline, |e| e.min(*deadline)));
                }
            }
        }
        earliest
    }
}

/// Resolves at `deadline` (up to [`SWEEP_FLOOR`] later), on a worker thread's shared sweep.
/// 32 bytes; nothing is registered until it is first polled, and dropping it unregisters it.
pub struct Deadline {
    deadline: Instant,
    /// The slot and the table's epoch, once registered.
    key: Option<(usize, u64)>,
    /// Never sent to another thread: its slot is in this thread's table.
    _here: ThisThread,
}

/// Makes a type `!Send`: a registration names a slot of this thread's table only (another
/// thread's table has the same epochs).
type ThisThread = std::marker::PhantomData<*const ()>;

impl Deadline {
    pub fn new(deadline: Instant) -> Self {
        Self {
            deadline,
            key: None,
            _here: std::marker::PhantomData,
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        TABLE.with_borrow_mut(|t| match this.key {
            Some((key, epoch)) if epoch == t.epoch => match t.slots.get_mut(key) {
                Some(Slot::Waiting { waker, .. }) => {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                    Poll::Pending
                }
                _ => {
                    t.remove(key);
                    this.key = None;
                    Poll::Ready(())
                }
            },
            // Registered in a table since forgotten: this task outlived its runtime.
            Some(_) => Poll::Pending,
            // Registered without reading the clock (a read a request's every timed wait
            // made): one already past is served by the sweep it starts or kicks below.
            None => {
                let key = t.insert(Slot::Waiting {
                    deadline: this.deadline,
                    waker: cx.waker().clone(),
                });
                this.key = Some((key, t.epoch));
                if !t.sweeping {
                    t.sweeping = true;
                    t.planned = None;
                    monoio::spawn(sweeper(t.epoch));
                } else if t.planned.is_some_and(|p| this.deadline + SWEEP_FLOOR < p) {
                    // Only a deadline the planned sweep would serve late by more than the
                    // floor wakes the sweeper early: under load (a deadline a request,
                    // each a few ms ahead) the sweep already planned serves them all, instead
                    // of a sweep and a new timer for each.
                    t.kicked = true;
                    if let Some(k) = t.kick.take() {
                        k.wake();
                    }
                }
                Poll::Pending
            }
        })
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        unregister(self.key);
    }
}

/// Frees a [`Deadline`]'s or a [`Stop`]'s slot, if it took one in this table.
fn unregister(key: Option<(usize, u64)>) {
    if let Some((key, epoch)) = key {
        // The thread may be ending (its table gone): nothing to unregister then.
        let _ = TABLE.try_with(|t| {
            let mut t = t.borrow_mut();
            if t.epoch == epoch {
                t.remove(key);
            }
        });
    }
}

/// `fut`, or [`Elapsed`] if `deadline` passes first (up to [`SWEEP_FLOOR`] later). `fut` is
/// polled first: one that is ready at once never registers its deadline.
pub fn within<F: Future>(deadline: Instant, fut: F) -> Within<F> {
    Within {
        fut,
        deadline: Deadline::new(deadline),
    }
}

/// The deadline of [`within`] passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// The future of [`within`]: `fut` and a [`Deadline`] side by side, nothing else.
    pub struct Within<F> {
        #[pin]
        fut: F,
        deadline: Deadline,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        Pin::new(this.deadline).poll(cx).map(|()| Err(Elapsed))
    }
}

/// Resolves once this worker stops ([`stop_all`]); at once if it did already. 24 bytes where
/// the shutdown watch's `wait_for` was 144, in every idle connection's task.
#[derive(Default)]
pub struct Stop {
    key: Option<(usize, u64)>,
    _here: ThisThread,
}

impl Future for Stop {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        TABLE.with_borrow_mut(|t| {
            if t.stopping {
                return Poll::Ready(());
            }
            match this.key {
                Some((key, epoch)) if epoch == t.epoch => {
                    if let Some(Slot::Stop(waker)) = t.slots.get_mut(key)
                        && !waker.will_wake(cx.waker())
                    {
                        waker.clone_from(cx.waker());
                    }
                }
                Some(_) => {}
                None => {
                    let key = t.insert(Slot::Stop(cx.waker().clone()));
                    this.key = Some((key, t.epoch));
                }
            }
            Poll::Pending
        })
    }
}

impl Drop for Stop {
    fn drop(&mut self) {
        unregister(self.key);
    }
}

/// The worker stops: every [`Stop`] of this thread resolves, now and from now on.
pub fn stop_all() {
    let wakers: Vec<Waker> = TABLE.with_borrow_mut(|t| {
        t.stopping = true;
        t.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Stop(w) => Some(w.clone()),
                _ => None,
            })
            .collect()
    });
    for w in wakers {
        w.wake();
    }
}

/// Wakes the deadlines that came due, then sleeps until the earliest left (or a kick); ends
/// when none is left.
async fn sweeper(epoch: u64) {
    let mut due = Vec::new();
    loop {
        let next = TABLE.with_borrow_mut(|t| {
            if t.epoch != epoch {
                return None;
            }
            let now = Instant::now();
            let next = t.sweep(now, &mut due).map(|e| e.max(now + SWEEP_FLOOR));
            t.planned = next;
            t.kicked = false;
            if next.is_none() {
                t.sweeping = false;
                t.kick = None;
            }
            next
        });
        // Woken outside the table's borrow (a waker may run code that registers again).
        for waker in due.drain(..) {
            waker.wake();
        }
        let Some(at) = next else {
            return;
        };
        let kicked = std::future::poll_fn(|cx| {
            TABLE.with_borrow_mut(|t| {
                if t.kicked || t.epoch != epoch {
                    Poll::Ready(())
                } else {
                    t.kick = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        });
        monoio::select! {
            () = monoio::time::sleep_until(at) => {}
            () = kicked => {}
        }
    }
}

/// Drops this thread's table (every waker in it), when its worker ends: called inside the
/// worker's runtime, after its last connection was given up on, so that a task that only a
/// deadline here still held is dropped there. Left to the thread's end, such a task (a
/// resume's hand-over waiting out its stream's idle timeout) was dropped while the thread's
/// other locals were being destroyed, and its drop, which reads them, aborted the gateway.
pub fn drop_all() {
    let table = TABLE.with_borrow_mut(|t| {
        let epoch = t.epoch + 1;
        let table = std::mem::take(t);
        t.epoch = epoch;
        table
    });
    // Outside the borrow: a task dropped here unregisters its own deadlines.
    drop(table);
}

/// Forgets this thread's table, after its worker's runtime died with tasks that hold entries
/// (they are leaked with the runtime, and so are their wakers): the next runtime starts anew.
pub fn forget_all() {
    TABLE.with_borrow_mut(|t| {
        let epoch = t.epoch + 1;
        std::mem::forget(std::mem::take(t));
        t.epoch = epoch;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Deadlines fire in their order, not before their time and not much after, on one sweep
    /// for all of them; a dropped one never fires; the table is emptied and the sweeper ends.
    #[test]
    fn deadlines_fire_in_time_and_leave_nothing_behind() {
        run(async {
            let start = Instant::now();
            let order = std::rc::Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for ms in [300u64, 100, 200] {
                let order = std::rc::Rc::clone(&order);
                tasks.push(monoio::spawn(async move {
                    Deadline::new(start + Duration::from_millis(ms)).await;
                    let late = Instant::now() - start;
                    order.borrow_mut().push(ms);
                    late
                }));
            }
            // One that is dropped before its time.
            let dropped = monoio::time::timeout(
                Duration::from_millis(50),
                Deadline::new(start + Duration::from_millis(150)),
            )
            .await;
            assert!(dropped.is_err());
            let mut lates = Vec::new();
            for t in tasks {
                lates.push(t.await);
            }
            assert_eq!(*order.borrow(), vec![100, 200, 300]);
            for (late, ms) in lates.iter().zip([300u64, 100, 200]) {
                assert!(
                    *late >= Duration::from_millis(ms),
                    "{ms} ms fired at {late:?}"
                );
                assert!(
                    *late < Duration::from_millis(ms) + Duration::from_millis(500),
                    "{ms} ms fired at {late:?}"
                );
            }
            // The sweeper saw the table empty and ended; the slots are empty.
            monoio::time::sleep(SWEEP_FLOOR * 2).await;
            TABLE.with_borrow(|t| {
                assert_eq!(t.used, 0);
                assert!(!t.sweeping);
                assert!(t.slots.is_empty());
            });
        });
    }

    /// Many deadlines at once (10,000 idle connections) are served by one sweep, and once they
    /// are gone their slots are freed, not kept.
    #[test]
    fn a_crowd_of_deadlines_leaves_no_table_behind() {
        run(async {
            let at = Instant::now() + Duration::from_millis(100);
            let tasks: Vec<_> = (0..2000)
                .map(|_| monoio::spawn(Deadline::new(at)))
                .collect();
            monoio::time::sleep(Duration::from_millis(10)).await;
            TABLE.with_borrow(|t| assert_eq!(t.used, 2000));
            for t in tasks {
                t.await;
            }
            assert!(Instant::now() >= at);
            TABLE.with_borrow(|t| {
                assert_eq!(t.used, 0);
                assert_eq!(t.slots.capacity(), 0);
            });
        });
    }

    /// Every waiting `Stop` resolves when the worker stops, and a new one at once; the deadlines
    /// waiting beside them are not disturbed.
    #[test]
    fn stop_wakes_every_waiter_and_later_ones_at_once() {
        run(async {
            let woken = std::rc::Rc::new(std::cell::Cell::new(0));
            let mut tasks = Vec::new();
            for _ in 0..3 {
                let woken = std::rc::Rc::clone(&woken);
                tasks.push(monoio::spawn(async move {
                    Stop::default().await;
                    woken.set(woken.get() + 1);
                }));
            }
            let deadline = Instant::now() + Duration::from_millis(300);
            let timer = monoio::spawn(Deadline::new(deadline));
            monoio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(woken.get(), 0);
            stop_all();
            for t in tasks {
                t.await;
            }
            assert_eq!(woken.get(), 3);
            // A worker already stopping: a new wait for it is over on its first poll.
            let mut stop = std::pin::pin!(Stop::default());
            assert!(futures_util::poll!(stop.as_mut()).is_ready());
            timer.await;
            assert!(Instant::now() >= deadline);
            monoio::time::sleep(SWEEP_FLOOR * 2).await;
            TABLE.with_borrow(|t| assert_eq!(t.used, 0));
        });
    }

    /// `within` gives the future's output when it comes first, registering nothing if it is
    /// ready at once, and `Elapsed` (not early, not much late) when the deadline comes first.
    #[test]
    fn within_times_out_on_the_table() {
        run(async {
            let soon = Instant::now() + Duration::from_secs(2);
            assert_eq!(within(soon, std::future::ready(7)).await, Ok(7));
            TABLE.with_borrow(|t| assert_eq!(t.used, 0, "a ready future registers nothing"));
            let late = within(soon, monoio::time::sleep(Duration::from_millis(20))).await;
            assert_eq!(late, Ok(()));
            TABLE.with_borrow(|t| assert_eq!(t.used, 0, "its entry is gone with it"));
            let start = Instant::now();
            let never = within(
                start + Duration::from_millis(100),
                std::future::pending::<()>(),
            );
            assert_eq!(never.await, Err(Elapsed));
            let took = Instant::now() - start;
            assert!(took >= Duration::from_millis(100), "{took:?}");
            assert!(
                took < Duration::from_millis(100) + SWEEP_FLOOR * 4,
                "{took:?}"
            );
        });
    }

    /// Deadlines a few ms apart, registered one after the other as requests do, are served by
    /// the sweeps already planned: the sweeper is not woken for each.
    #[test]
    fn close_deadlines_do_not_wake_the_sweeper_each() {
        run(async {
            let far = monoio::spawn(Deadline::new(Instant::now() + Duration::from_secs(5)));
            monoio::time::sleep(Duration::from_millis(5)).await;
            let mut kicks = 0;
            let start = Instant::now();
            for i in 0..20u64 {
                let mut d = std::pin::pin!(Deadline::new(
                    Instant::now() + Duration::from_millis(20 + i)
                ));
                // Registered by a first poll, as a request's wait does.
                let _ = futures_util::poll!(d.as_mut());
                TABLE.with_borrow(|t| kicks += usize::from(t.kicked));
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(kicks <= 2, "{kicks} kicks for 20 deadlines");
            // And one that would be served too late by the planned sweep still is not kept.
            Deadline::new(Instant::now() + Duration::from_millis(30)).await;
            assert!(Instant::now() - start < Duration::from_secs(1));
            drop(far);
        });
    }

    /// A deadline already past when first polled (it is registered without a look at the
    /// clock) resolves by the sweep it starts, or by one it kicks when the sweeper sleeps
    /// towards a later one: not only at the sweep planned.
    #[test]
    fn a_deadline_already_past_resolves_at_once() {
        run(async {
            let past = Instant::now();
            monoio::time::sleep(Duration::from_millis(5)).await;
            let start = Instant::now();
            Deadline::new(past).await;
            // Not served, it would wait forever; served only by the far sweep below, 5 s.
            assert!(
                Instant::now() - start < Duration::from_secs(1),
                "no sweeper running"
            );
            let far = monoio::spawn(Deadline::new(start + Duration::from_secs(5)));
            monoio::time::sleep(SWEEP_FLOOR * 2).await;
            let start = Instant::now();
            assert_eq!(
                within(past, std::future::pending::<()>()).await,
                Err(Elapsed)
            );
            assert!(
                Instant::now() - start < Duration::from_secs(1),
                "the sweeper slept"
            );
            drop(far);
        });
    }

    /// A deadline earlier than the one the sweeper sleeps towards wakes it early.
    #[test]
    fn an_earlier_deadline_is_not_kept_waiting() {
        run(async {
            let start = Instant::now();
            let far = monoio::spawn(Deadline::new(start + Duration::from_secs(5)));
            monoio::time::sleep(Duration::from_millis(20)).await;
            Deadline::new(Instant::now() + Duration::from_millis(100)).await;
            assert!(Instant::now() - start < Duration::from_secs(1));
            drop(far);
        });
    }
}
