//! [`PriorityGate`]: one caller at a time, the waiting caller with the highest priority first.
//!
//! MXNet's engine runs queued operations in priority order; a store built on this gate lets
//! concurrent calls queue and enter by priority (ties in arrival order), so a high-priority
//! pull (an early layer's weights, needed first by the forward pass) overtakes queued
//! low-priority pushes. `local` holds the gate for a whole call; the dist stores hold it while
//! a call's messages are sent, so calls go out on the wire in priority order.
//!
//! ```
//! use kvstore_base::PriorityGate;
//!
//! let gate = PriorityGate::default();
//! let pass = gate.enter(0); // other callers wait until `pass` is dropped
//! drop(pass);
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

/// A lock whose waiters enter in priority order.
#[derive(Debug, Default)]
pub struct PriorityGate {
    state: Mutex<GateState>,
    turn: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    busy: bool,
    /// The thread inside, while one is.
    holder: Option<ThreadId>,
    next_ticket: u64,
    waiting: BinaryHeap<(i32, Reverse<u64>)>,
}

/// Holds the gate until dropped.
#[derive(Debug)]
pub struct GatePass<'a> {
    gate: &'a PriorityGate,
}

impl PriorityGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no caller is inside and no waiting caller has a higher priority (or the
    /// same priority and an earlier arrival), then enters.
    pub fn enter(&self, priority: i32) -> GatePass<'_> {
        let mut state = self.lock();
        if !state.busy && state.waiting.is_empty() {
            state.busy = true;
            state.holder = Some(std::thread::current().id());
            return GatePass { gate: self };
        }
        let ticket = (priority, Reverse(state.next_ticket));
        state.next_ticket += 1;
        state.waiting.push(ticket);
        while state.busy || state.waiting.peek() != Some(&ticket) {
            state = self
                .turn
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.waiting.pop();
        state.busy = true;
        state.holder = Some(std::thread::current().id());
        GatePass { gate: self }
    }

    /// Whether the calling thread is inside: its [`enter`](PriorityGate::enter) would wait for
    /// itself forever (a store called from a callback it runs while inside, such as its
    /// updater).
    pub fn held_by_current_thread(&self) -> bool {
        self.lock().holder == Some(std::thread::current().id())
    }

    /// Number of callers waiting to enter.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.busy = false;
        state.holder = None;
        drop(state);
        self.gate.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn waiters_enter_by_priority_then_arrival() {
        let gate = Arc::new(PriorityGate::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = gate.enter(0);
        let mut threads = Vec::new();
        for (i, priority) in [0, 5, -3, 5, 10].into_iter().enumerate() {
            let (waiter, order) = (Arc::clone(&gate), Arc::clone(&order));
            threads.push(std::thread::spawn(move || {
                let _pass = waiter.enter(priority);
                order.lock().unwrap().push(i);
            }));
            // Let each thread queue before the next, so arrival order is known.
            let deadline = Instant::now() + Duration::from_secs(10);
            while gate.waiting() < i + 1 {
                assert!(Instant::now() < deadline, "thread {i} never queued");
                std::thread::yield_now();
            }
        }
        drop(held);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![4, 1, 3, 0, 2]);
    }

    #[test]
    fn the_thread_inside_is_known() {
        let gate = Arc::new(PriorityGate::default());
        assert!(!gate.held_by_current_thread());
        let pass = gate.enter(0);
        assert!(gate.held_by_current_thread());
        let other = Arc::clone(&gate);
        assert!(!std::thread::spawn(move || other.held_by_current_thread())
            .join()
            .unwrap());
        drop(pass);
        assert!(!gate.held_by_current_thread());
    }
}
