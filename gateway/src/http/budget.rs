//! A worker's budget for the bytes of answers read whole (lists the gateway filters, pins or
//! merges, held and bridged sessions' answers): up to 16 MiB each, and parsed they take up to
//! sixteen times that. Without a bound, a hostile upstream answering `tools/list` with 15.6 MB
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
//! A worker is single-threaded: a `Cell` and a queue, no lock.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
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
    waiting: RefCell<VecDeque<Rc<Wait>>>,
}

struct Wait {
    bytes: usize,
    granted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

/// A share of the budget, given back when dropped.
#[must_use]
pub struct Grant<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
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

    /// `bytes` of the budget, once there is room for them and every read that waited before
    /// has had its share. Dropped while it waits, it gives up its place (and a share granted
    /// meanwhile).
    pub async fn take(&self, bytes: usize) -> Grant<'_> {
        if self.waiting.borrow().is_empty() && self.fits(bytes) {
            self.used.set(self.used.get() + bytes);
            return Grant {
                budget: self,
                bytes,
            };
        }
        let wait = Rc::new(Wait {
            bytes,
            granted: Cell::new(false),
            waker: RefCell::new(None),
        });
        self.waiting.borrow_mut().push_back(Rc::clone(&wait));
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

    fn give_back(&self, bytes: usize) {
        self.used.set(self.used.get() - bytes);
        self.admit();
    }

    /// Grants the waiting reads that fit, in order.
    fn admit(&self) {
        loop {
            let next = {
                let mut waiting = self.waiting.borrow_mut();
                match waiting.front() {
                    Some(w) if self.fits(w.bytes) => waiting.pop_front(),
                    _ => None,
                }
            };
            let Some(w) = next else { return };
            self.used.set(self.used.get() + w.bytes);
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
        let bytes = self.wait.take().map_or(0, |w| w.bytes);
        Grant {
            budget: self.budget,
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
            self.budget.give_back(wait.bytes);
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
        let mut a = pin!(b.take(60));
        let Poll::Ready(ga) = poll(a.as_mut()) else {
            panic!("room for the first")
        };
        assert_eq!(b.used(), 60);
        // No room: waits; a smaller one behind it waits too (no overtaking).
        let mut big = pin!(b.take(50));
        assert!(poll(big.as_mut()).is_pending());
        let mut small = pin!(b.take(10));
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
        let mut huge = pin!(b.take(500));
        let Poll::Ready(g) = poll(huge.as_mut()) else {
            panic!("nothing held: it goes")
        };
        let mut next = pin!(b.take(1));
        assert!(poll(next.as_mut()).is_pending());
        drop(g);
        assert!(poll(next.as_mut()).is_ready());
    }

    #[test]
    fn a_read_given_up_gives_back_its_place_and_its_share() {
        let b = Budget::new(100);
        let mut first = Box::pin(b.take(90));
        let Poll::Ready(g) = poll(first.as_mut()) else {
            panic!("room")
        };
        // Gives up while it waits: the one behind it is not held back by it.
        let mut gone = Box::pin(b.take(50));
        assert!(poll(gone.as_mut()).is_pending());
        let mut behind = Box::pin(b.take(10));
        assert!(poll(behind.as_mut()).is_pending());
        drop(gone);
        let Poll::Ready(gb) = poll(behind.as_mut()) else {
            panic!("its turn")
        };
        assert_eq!((b.used(), b.waiting()), (100, 0));
        drop(gb);
        // Granted, then dropped before it saw it: the share comes back.
        let mut late = Box::pin(b.take(50));
        assert!(poll(late.as_mut()).is_pending());
        drop(g);
        assert_eq!(b.used(), 50);
        drop(late);
        assert_eq!((b.used(), b.waiting()), (0, 0));
    }
}
