//! Index wakers: one driver task per shard polls only the connections whose sockets became
//! ready. A connection's waker pushes its slab index onto the shard's ready list and wakes the
//! driver. glommio completes I/O on the thread that started it, so the ready list is
//! thread-local and needs no lock.

use std::cell::RefCell;
use std::sync::Arc;
use std::task::{Wake, Waker};

thread_local! {
    static READY: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    static DRIVER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

struct SlotWaker(usize);

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        notify(self.0);
    }
}

/// A waker that marks slab slot `idx` ready.
pub(crate) fn slot_waker(idx: usize) -> Waker {
    Waker::from(Arc::new(SlotWaker(idx)))
}

/// Marks `idx` ready and wakes the driver.
pub(crate) fn notify(idx: usize) {
    READY.with(|r| r.borrow_mut().push(idx));
    wake_driver();
}

/// Wakes the driver (new work queued elsewhere).
pub(crate) fn wake_driver() {
    DRIVER.with(|d| {
        if let Some(w) = d.borrow().as_ref() {
            w.wake_by_ref();
        }
    });
}

/// Registers the driver's waker.
pub(crate) fn set_driver(w: &Waker) {
    DRIVER.with(|d| {
        let mut d = d.borrow_mut();
        if !d.as_ref().is_some_and(|old| old.will_wake(w)) {
            *d = Some(w.clone());
        }
    });
}

/// Takes the ready list, leaving `into` (cleared) in its place to reuse its capacity.
pub(crate) fn take_ready(into: &mut Vec<usize>) {
    into.clear();
    READY.with(|r| std::mem::swap(&mut *r.borrow_mut(), into));
}
