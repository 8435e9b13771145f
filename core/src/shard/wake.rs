//! The ready list: one driver task per shard runs only the connections that have work (their
//! socket is ready, or another part of the shard queued output for them). Their slab indexes
//! go on this thread-local list and the driver task is woken; a shard is one thread, so the
//! list needs no lock.

use std::cell::RefCell;
use std::task::Waker;

thread_local! {
    static READY: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    static DRIVER: RefCell<Option<Waker>> = const { RefCell::new(None) };
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
