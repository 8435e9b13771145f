//! A hashed timing wheel: one per shard, holding millions of keepalive/idle deadlines with O(1)
//! insert and cancel and no allocation per timer once the slab has grown.
//!
//! Time is passed in; the wheel never reads a clock. Deadlines are rounded **up** to the tick
//! (100 ms by default), so a timer never fires early and at most one tick late. A deadline
//! farther than one rotation stays in its slot and is skipped until its round comes (the
//! absolute tick is stored), so any deadline works; a rotation is `slots × tick` (4096 × 100 ms
//! ≈ 6.8 min by default), longer than the usual keepalive, so most timers are never skipped.

use std::time::{Duration, Instant};

use slab::Slab;

const NIL: u32 = u32::MAX;

/// A pending timer's handle. Stale handles (the timer fired or was cancelled) are detected,
/// even after the slot was reused, by a generation number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

struct Node<K> {
    key: K,
    tick: u64,
    generation: u32,
    prev: u32,
    next: u32,
}

/// The timing wheel; `K` is what a timer hands back when it fires (e.g. a connection slot).
pub struct TimerWheel<K: Copy> {
    start: Instant,
    tick: Duration,
    mask: u64,
    /// Every timer whose tick is below this has fired.
    next_tick: u64,
    /// Head and tail of each slot's doubly linked list of nodes (insertion order).
    slots: Vec<(u32, u32)>,
    /// One bit per slot: non-empty. Finds the next busy slot in a few word scans.
    occupied: Vec<u64>,
    nodes: Slab<Node<K>>,
    generation: u32,
}

impl<K: Copy> std::fmt::Debug for TimerWheel<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerWheel")
            .field("tick", &self.tick)
            .field("slots", &self.slots.len())
            .field("pending", &self.nodes.len())
            .finish()
    }
}

impl<K: Copy> TimerWheel<K> {
    /// Default tick.
    pub const DEFAULT_TICK: Duration = Duration::from_millis(100);
    /// Default number of slots.
    pub const DEFAULT_SLOTS: usize = 4096;

    /// A wheel with the default tick and slots, whose time starts at `now`.
    pub fn new(now: Instant) -> Self {
        Self::with_config(now, Self::DEFAULT_TICK, Self::DEFAULT_SLOTS)
    }

    /// A wheel with `slots` (rounded up to a power of two, at least 64) of `tick` each
    /// (at least 1 ms).
    pub fn with_config(now: Instant, tick: Duration, slots: usize) -> Self {
        let slots = slots.max(64).next_power_of_two();
        TimerWheel {
            start: now,
            tick: tick.max(Duration::from_millis(1)),
            mask: slots as u64 - 1,
            next_tick: 0,
            slots: vec![(NIL, NIL); slots],
            occupied: vec![0; slots / 64],
            nodes: Slab::new(),
            generation: 0,
        }
    }

    /// Pre-allocates room for `n` more timers, so the steady state allocates nothing.
    pub fn reserve(&mut self, n: usize) {
        self.nodes.reserve(n);
    }

    /// Pending timers.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The tick of a deadline, rounded up, and never before the next unprocessed tick.
    fn tick_of_deadline(&self, deadline: Instant) -> u64 {
        let since = deadline.saturating_duration_since(self.start);
        let tick = self.tick.as_nanos();
        let t = since.as_nanos().div_ceil(tick);
        u64::try_from(t).unwrap_or(u64::MAX).max(self.next_tick)
    }

    fn tick_of_now(&self, now: Instant) -> u64 {
        let t = now.saturating_duration_since(self.start).as_nanos() / self.tick.as_nanos();
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Schedules `key` to fire at `deadline`.
    ///
    /// # Panics
    /// If more than `u32::MAX - 1` timers are pending at once.
    pub fn insert(&mut self, deadline: Instant, key: K) -> TimerId {
        let tick = self.tick_of_deadline(deadline);
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let index = self.nodes.insert(Node {
            key,
            tick,
            generation,
            prev: NIL,
            next: NIL,
        });
        let index = u32::try_from(index)
            .ok()
            .filter(|&i| i != NIL)
            .expect("fewer than u32::MAX pending timers");
        self.link(index);
        TimerId { index, generation }
    }

    /// Cancels a timer; returns its key if it was still pending.
    pub fn cancel(&mut self, id: TimerId) -> Option<K> {
        self.node(id)?;
        self.unlink(id.index);
        Some(self.nodes.remove(id.index as usize).key)
    }

    /// Moves a pending timer to `new_deadline`, keeping its id. Returns `None` (and schedules
    /// nothing) if the timer already fired or was cancelled: the caller still has the key and
    /// may [`insert`](Self::insert) again.
    pub fn reset(&mut self, id: TimerId, new_deadline: Instant) -> Option<TimerId> {
        self.node(id)?;
        let tick = self.tick_of_deadline(new_deadline);
        self.unlink(id.index);
        self.nodes[id.index as usize].tick = tick;
        self.link(id.index);
        Some(id)
    }

    /// The deadline of a pending timer (rounded up to its tick).
    pub fn deadline(&self, id: TimerId) -> Option<Instant> {
        self.node(id).map(|n| self.instant_of(n.tick))
    }

    fn node(&self, id: TimerId) -> Option<&Node<K>> {
        self.nodes
            .get(id.index as usize)
            .filter(|n| n.generation == id.generation)
    }

    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u128::from(tick) * self.tick.as_nanos();
        let d = Duration::new(
            u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
            (nanos % 1_000_000_000) as u32,
        );
        // Past the clock's range: as far as it goes (such a timer never fires).
        self.start
            .checked_add(d)
            .unwrap_or_else(|| self.start + Duration::from_secs(u64::from(u32::MAX)))
    }

    /// When the wheel next needs [`expire`](Self::expire): the start of the next non-empty tick.
    /// Coarse: that slot may hold only timers of a later round, then `expire` finds nothing
    /// and the caller asks again.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.nodes.is_empty() {
            return None;
        }
        let n = self.slots.len() as u64;
        let from = self.next_tick & self.mask;
        // Scan the bitmap from `from` to the end, then wrap around.
        let slot = self
            .next_occupied(from, n)
            .or_else(|| self.next_occupied(0, from))?;
        let distance = (slot.wrapping_sub(from)) & self.mask;
        Some(self.instant_of(self.next_tick + distance))
    }

    fn next_occupied(&self, from: u64, to: u64) -> Option<u64> {
        let mut i = from;
        while i < to {
            let word = self.occupied[(i / 64) as usize] >> (i % 64);
            if word != 0 {
                let s = i + u64::from(word.trailing_zeros());
                return (s < to).then_some(s);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Fires every timer whose deadline is at or before `now`, appending their keys to `out`
    /// in deadline order (tick by tick; insertion order within a tick). After a pause longer
    /// than one rotation, everything due still fires, but in slot order.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<K>) {
        let now_tick = self.tick_of_now(now);
        if now_tick < self.next_tick {
            return;
        }
        // After a long pause one rotation visits every slot; deadlines are checked, so a
        // timer of a later round is left alone.
        let steps = (now_tick - self.next_tick + 1).min(self.slots.len() as u64);
        for step in 0..steps {
            let tick = self.next_tick + step;
            let slot = (tick & self.mask) as usize;
            if self.occupied[slot / 64] & (1 << (slot % 64)) == 0 {
                continue;
            }
            let mut cur = self.slots[slot].0;
            while cur != NIL {
                let node = &self.nodes[cur as usize];
                let next = node.next;
                if node.tick <= now_tick {
                    self.unlink(cur);
                    out.push(self.nodes.remove(cur as usize).key);
                }
                cur = next;
            }
        }
        self.next_tick = now_tick + 1;
    }

    fn link(&mut self, index: u32) {
        let slot = (self.nodes[index as usize].tick & self.mask) as usize;
        let tail = self.slots[slot].1;
        {
            let n = &mut self.nodes[index as usize];
            n.prev = tail;
            n.next = NIL;
        }
        if tail == NIL {
            self.slots[slot] = (index, index);
            self.occupied[slot / 64] |= 1 << (slot % 64);
        } else {
            self.nodes[tail as usize].next = index;
            self.slots[slot].1 = index;
        }
    }

    fn unlink(&mut self, index: u32) {
        let (slot, prev, next) = {
            let n = &self.nodes[index as usize];
            ((n.tick & self.mask) as usize, n.prev, n.next)
        };
        if prev == NIL {
            self.slots[slot].0 = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.slots[slot].1 = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        if self.slots[slot].0 == NIL {
            self.occupied[slot / 64] &= !(1 << (slot % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fire(w: &mut TimerWheel<u32>, at: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        w.expire(at, &mut out);
        out
    }

    #[test]
    fn fires_in_deadline_order_never_early() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        w.insert(t0 + ms(350), 3);
        w.insert(t0 + ms(120), 1);
        w.insert(t0 + ms(250), 2);
        w.insert(t0 + ms(251), 22);
        assert_eq!(fire(&mut w, t0 + ms(100)), Vec::<u32>::new());
        assert_eq!(fire(&mut w, t0 + ms(199)), Vec::<u32>::new());
        assert_eq!(fire(&mut w, t0 + ms(200)), vec![1]);
        assert_eq!(fire(&mut w, t0 + ms(1000)), vec![2, 22, 3]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn cancel_and_stale_ids() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let a = w.insert(t0 + ms(100), 1);
        let b = w.insert(t0 + ms(100), 2);
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(a), None);
        // `a`'s slab slot is reused by `c`; the stale id must not touch it.
        let c = w.insert(t0 + ms(100), 3);
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.reset(a, t0), None);
        assert_eq!(fire(&mut w, t0 + ms(100)), vec![2, 3]);
        assert_eq!(w.cancel(b), None);
        assert_eq!(w.cancel(c), None);
    }

    #[test]
    fn reset_moves_a_timer_both_ways() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let a = w.insert(t0 + ms(500), 1);
        let b = w.insert(t0 + ms(200), 2);
        assert_eq!(w.reset(a, t0 + ms(100)), Some(a));
        assert_eq!(w.reset(b, t0 + ms(900)), Some(b));
        assert_eq!(w.deadline(b), Some(t0 + ms(900)));
        assert_eq!(fire(&mut w, t0 + ms(500)), vec![1]);
        assert_eq!(fire(&mut w, t0 + ms(900)), vec![2]);
    }

    #[test]
    fn deadlines_beyond_one_rotation() {
        let t0 = Instant::now();
        // 64 slots of 10 ms: one rotation is 640 ms.
        let mut w = TimerWheel::with_config(t0, ms(10), 64);
        w.insert(t0 + ms(5_000), 1);
        w.insert(t0 + ms(650), 2);
        w.insert(t0 + ms(10), 3);
        let mut fired = Vec::new();
        let mut t = t0;
        while t < t0 + ms(4_990) {
            t += ms(10);
            w.expire(t, &mut fired);
        }
        assert_eq!(fired, vec![3, 2]);
        assert_eq!(fire(&mut w, t0 + ms(5_000)), vec![1]);
    }

    #[test]
    fn a_long_pause_fires_everything_due_and_nothing_more() {
        let t0 = Instant::now();
        let mut w = TimerWheel::with_config(t0, ms(10), 64);
        for i in 0..200u32 {
            w.insert(t0 + ms(u64::from(i) * 50), i);
        }
        let got = fire(&mut w, t0 + ms(5_000));
        assert_eq!(got.len(), 101, "0..=5000 ms in steps of 50");
        assert_eq!(w.len(), 99);
        assert!(got.iter().all(|&i| i <= 100));
    }

    #[test]
    fn past_deadlines_fire_on_the_next_tick() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        assert!(fire(&mut w, t0 + ms(1_000)).is_empty());
        w.insert(t0, 7);
        assert_eq!(w.next_deadline(), Some(t0 + ms(1_100)));
        assert_eq!(fire(&mut w, t0 + ms(1_100)), vec![7]);
    }

    #[test]
    fn next_deadline_finds_the_next_busy_slot_across_the_wrap() {
        let t0 = Instant::now();
        let mut w = TimerWheel::with_config(t0, ms(10), 128);
        assert!(fire(&mut w, t0 + ms(1_000)).is_empty()); // next tick is 101 (slot 101)
        w.insert(t0 + ms(1_300), 1); // tick 130 -> slot 2, after the wrap
        assert_eq!(w.next_deadline(), Some(t0 + ms(1_300)));
        w.insert(t0 + ms(1_050), 2);
        assert_eq!(w.next_deadline(), Some(t0 + ms(1_050)));
    }

    #[test]
    fn per_timer_memory_stays_small() {
        // A slab entry per pending timer; watch it grow (STYLE: memory per connection).
        assert!(std::mem::size_of::<Node<u32>>() <= 32);
        assert_eq!(std::mem::size_of::<TimerId>(), 8);
    }

    #[test]
    fn many_timers() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        w.reserve(100_000);
        let ids: Vec<_> = (0..100_000u32)
            .map(|i| w.insert(t0 + ms(u64::from(i % 600) * 100 + 1), i))
            .collect();
        for id in ids.iter().step_by(2) {
            w.cancel(*id);
        }
        assert_eq!(w.len(), 50_000);
        let mut out = Vec::with_capacity(50_000);
        let mut t = t0;
        for _ in 0..10_000 {
            let Some(next) = w.next_deadline() else { break };
            t = next;
            w.expire(t, &mut out);
        }
        assert_eq!(out.len(), 50_000);
        assert!(out.iter().all(|i| i % 2 == 1));
        assert!(t <= t0 + ms(60_100));
    }
}
