//! A worker's budget for the bytes of answers read whole (lists the gateway filters, pins or
//! merges, held and bridged sessions' answers): up to 16 MiB each, parsed one at a time (no
//! await while one is parsed) and bounded parsed too ([`crate::values`]). Without a bound, a hostile upstream answering `tools/list` with 15.6 MB
//! grew one worker to 2.9 GB for 16 concurrent lists (the hostile-upstream review).
//!
//! An answer of up to [`SMALL`] bytes is read outside the budget (nothing is counted, nothing
//! waits: the small answer's path does no more work). A larger one takes its share first (its
//! `Content-Length`, or for one whose length is not known, the most it may be, once it has
//! passed [`SMALL`]), and waits, in order, while the worker's other reads hold too much. A
//! share is given back once the answer is read; nothing that holds one waits for another, so
//! a wait always ends: reads finish or time out on their own. One read larger than the whole
//! budget still goes, alone.
//!
//! Each upstream may hold at most half of it at once (a review of the budget: one that
//! trickled four answers past 1 MiB held all of it, and another tenant's large list waited
//! 27 s behind them); a read its upstream's half keeps waiting does not hold back the reads
//! of other upstreams behind it.
//!
//! A worker is single-threaded: a `Cell` and a queue, no lock.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, VecDeque},
    future::poll_fn,
    rc::Rc,
    task::{Poll, Waker},
};

/// Answers up to this size are read outside the budget.
pub const SMALL: usize = 1024 * 1024;
/// What a worker reads whole at once, above [`SMALL`] each: four answers at the 16 MiB cap.
pub const WORKER: usize = 64 * 1024 * 1024;

/// The bytes a worker is reading whole, and the reads waiting for room.
pub struct Budget {
    cap: usize,
    used: Cell<usize>,
    /// What each upstream holds (none held: not there).
    held: RefCell<HashMap<Rc<str>, usize>>,
    waiting: RefCell<VecDeque<Rc<Wait>>>,
}

struct Wait {
    owner: Rc<str>,
    bytes: usize,
    granted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

/// A share of the budget, given back when dropped.
#[must_use]
pub struct Grant<'a> {
    budget: &'a Budget,
    owner: Rc<str>,
    bytes: usize,
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.budget.give_back(&self.owner, self.bytes);
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(WORKER)
    }
}

impl Budget {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            used: Cell::new(0),
            held: RefCell::default(),
            waiting: RefCell::default(),
        }
    }

    /// The bytes held now.
    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// Reads waiting for room.
    pub fn waiting(&self) -> usize {
        self.waiting.borrow().len()
    }

    fn fits(&self, bytes: usize) -> bool {
        let used = self.used.get();
        used == 0 || used.saturating_add(bytes) <= self.cap
    }

    /// Whether `owner` may hold `bytes` more: at most half of the budget, unless it holds none.
    fn owner_fits(&self, owner: &str, bytes: usize) -> bool {
        self.held
            .borrow()
            .get(owner)
            .is_none_or(|held| held.saturating_add(bytes) <= self.cap / 2)
    }

    fn hold(&self, owner: &Rc<str>, bytes: usize) {
        self.used.set(self.used.get() + bytes);
        *self.held.borrow_mut().entry(Rc::clone(owner)).or_default() += bytes;
    }

    /// `bytes` of the budget for a read from `owner` (an upstream), once there is room for
    /// them, within the owner's half, and every read that waited before has had its share (but
    /// those its own owner's half holds back). Dropped while it waits, it gives up its place
    /// (and a share granted meanwhile).
    pub async fn take(&self, owner: &str, bytes: usize) -> Grant<'_> {
        let owner: Rc<str> = Rc::from(owner);
        if self.waiting.borrow().is_empty() && self.fits(bytes) && self.owner_fits(&owner, bytes) {
            self.hold(&owner, bytes);
            return Grant {
                budget: self,
                owner,
                bytes,
            };
        }
        let wait = Rc::new(Wait {
            owner: Rc::clone(&owner),
            bytes,
            granted: Cell::new(false),
            waker: RefCell::new(None),
        });
        self.waiting.borrow_mut().push_back(Rc::clone(&wait));
        // The reads before it may all be held back by their owners' halves.
        self.admit();
        let queued = Queued {
            budget: self,
            wait: Some(Rc::clone(&wait)),
        };
        poll_fn(|cx| {
            if wait.granted.get() {
                Poll::Ready(())
            } else {
                *wait.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        queued.granted()
    }

    fn give_back(&self, owner: &str, bytes: usize) {
        self.used.set(self.used.get() - bytes);
        {
            let mut held = self.held.borrow_mut();
            if let Some(h) = held.get_mut(owner) {
                *h -= bytes;
                if *h == 0 {
                    held.remove(owner);
                }
            }
        }
        self.admit();
    }

    /// Grants the waiting reads that fit, in order: one that does not fit the budget holds
    /// back those behind it (a large read is not overtaken for ever), one its owner's half
    /// holds back does not.
    fn admit(&self) {
        loop {
            let next = {
                let mut waiting = self.waiting.borrow_mut();
                let mut found = None;
                for (i, w) in waiting.iter().enumerate() {
                    if !self.owner_fits(&w.owner, w.bytes) {
                        continue;
                    }
                    if self.fits(w.bytes) {
                        found = Some(i);
                    }
                    break;
                }
                found.and_then(|i| waiting.remove(i))
            };
            let Some(w) = next else { return };
            self.hold(&w.owner, w.bytes);
            w.granted.set(true);
            if let Some(waker) = w.waker.borrow_mut().take() {
                waker.wake();
            }
        }
    }
}

/// A read's place in the queue: given up if its future is dropped.
struct Queued<'a> {
    budget: &'a Budget,
    wait: Option<Rc<Wait>>,
}

impl<'a> Queued<'a> {
    fn granted(mut self) -> Grant<'a> {
        let (owner, bytes) = self
            .wait
            .take()
            .map_or_else(|| (Rc::from(""), 0), |w| (Rc::clone(&w.owner), w.bytes));
        Grant {
            budget: self.budget,
            owner,
            bytes,
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let Some(wait) = self.wait.take() else {
            return;
        };
        if wait.granted.get() {
            self.budget.give_back(&wait.owner, wait.bytes);
        } else {
            self.budget
                .waiting
                .borrow_mut()
                .retain(|w| !Rc::ptr_eq(w, &wait));
            // It may have been what held the others back.
            self.budget.admit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;
    use std::{
        future::Future,
        pin::pin,
        task::{Context, Poll, Waker},
    };

    fn poll<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn reads_wait_for_room_in_order_and_every_wait_ends() {
        let b = Budget::new(100);
        let mut a = pin!(b.take("r1", 60));
        let Poll::Ready(ga) = poll(a.as_mut()) else {
            panic!("room for the first")
        };
        assert_eq!(b.used(), 60);
        // No room: waits; a smaller one behind it waits too (no overtaking).
        let mut big = pin!(b.take("r2", 50));
        assert!(poll(big.as_mut()).is_pending());
        let mut small = pin!(b.take("r3", 10));
        assert!(poll(small.as_mut()).is_pending());
        assert_eq!(b.waiting(), 2);
        drop(ga);
        // Both fit now, granted in order.
        assert_eq!(b.used(), 60);
        let Poll::Ready(gb) = poll(big.as_mut()) else {
            panic!("granted")
        };
        let Poll::Ready(gs) = poll(small.as_mut()) else {
            panic!("granted")
        };
        drop((gb, gs));
        assert_eq!((b.used(), b.waiting()), (0, 0));
    }

    #[test]
    fn a_read_larger_than_the_budget_goes_alone() {
        let b = Budget::new(100);
        let mut huge = pin!(b.take("r4", 500));
        let Poll::Ready(g) = poll(huge.as_mut()) else {
            panic!("nothing held: it goes")
        };
        let mut next = pin!(b.take("r5", 1));
        assert!(poll(next.as_mut()).is_pending());
        drop(g);
        assert!(poll(next.as_mut()).is_ready());
    }

    #[test]
    fn a_read_given_up_gives_back_its_place_and_its_share() {
        let b = Budget::new(100);
        let mut first = Box::pin(b.take("r6", 90));
        let Poll::Ready(g) = poll(first.as_mut()) else {
            panic!("room")
        };
        // Gives up while it waits: the one behind it is not held back by it.
        let mut gone = Box::pin(b.take("r7", 50));
        assert!(poll(gone.as_mut()).is_pending());
        let mut behind = Box::pin(b.take("r8", 10));
        assert!(poll(behind.as_mut()).is_pending());
        drop(gone);
        let Poll::Ready(gb) = poll(behind.as_mut()) else {
            panic!("its turn")
        };
        assert_eq!((b.used(), b.waiting()), (100, 0));
        drop(gb);
        // Granted, then dropped before it saw it: the share comes back.
        let mut late = Box::pin(b.take("r9", 50));
        assert!(poll(late.as_mut()).is_pending());
        drop(g);
        assert_eq!(b.used(), 50);
        drop(late);
        assert_eq!((b.used(), b.waiting()), (0, 0));
    }

    /// One upstream holds at most half: a read past its half waits, and does not hold back
    /// another upstream's behind it (a review: four trickling answers held the whole budget,
    /// and another tenant's list waited 27 s).
    #[test]
    fn an_upstream_holds_at_most_half_and_does_not_hold_back_the_others() {
        let b = Budget::new(100);
        let mut h1 = pin!(b.take("hog", 40));
        let Poll::Ready(g1) = poll(h1.as_mut()) else {
            panic!("room")
        };
        let mut h2 = pin!(b.take("hog", 40));
        assert!(poll(h2.as_mut()).is_pending(), "past its half");
        let mut other = pin!(b.take("b", 40));
        let Poll::Ready(go) = poll(other.as_mut()) else {
            panic!("not held back by the hog's second read")
        };
        assert_eq!(b.used(), 80);
        drop(g1);
        // The hog's second read: its half has room again, and the budget too.
        let Poll::Ready(g2) = poll(h2.as_mut()) else {
            panic!("its turn")
        };
        drop((g2, go));
        assert_eq!((b.used(), b.waiting()), (0, 0));
        // Alone, a read larger than the half still goes.
        let mut huge = pin!(b.take("hog", 90));
        assert!(poll(huge.as_mut()).is_ready());
    }
}
