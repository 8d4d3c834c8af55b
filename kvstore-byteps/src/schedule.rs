//! BytePS's priority queue with credit-based flow control (`scheduled_queue.cc`).
//!
//! Every partition a call pushes is a task `(priority, partition key, bytes)`. A
//! [`CreditScheduler`] keeps the waiting tasks of every call of a store ordered by priority
//! (higher first) then partition key (lower first), and hands out a [`Grant`] to the first one
//! only while the bytes granted and not yet released stay within the credit
//! (`BYTEPS_SCHEDULING_CREDIT` × partition bytes); a task bigger than the credit goes out alone.
//! Releasing a grant (dropping it, once the server acknowledged the push) lets the next task go.
//!
//! Tasks are queued a call at a time ([`CreditScheduler::enqueue`]), so that a call of higher
//! priority arriving while a lower one is under way overtakes the rest of it at the next free
//! credit.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A waiting task: ordered by priority (higher first), partition key, then arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Ticket {
    priority: Reverse<i32>,
    key: u64,
    seq: u64,
    bytes: usize,
    tag: usize,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    waiting: BTreeSet<Ticket>,
    next_seq: u64,
    log: Option<Vec<(i32, u64)>>,
}

/// The priority queue and credit of one store (see the [module docs](self)).
#[derive(Debug)]
pub struct CreditScheduler {
    credit: usize,
    state: Mutex<State>,
    changed: Condvar,
}

/// A granted task: its bytes count against the credit until it is dropped.
#[derive(Debug)]
pub struct Grant<'a> {
    scheduler: &'a CreditScheduler,
    bytes: usize,
    /// The task's index in the call that queued it.
    pub tag: usize,
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        let mut st = self.scheduler.lock();
        st.in_flight -= self.bytes;
        drop(st);
        self.scheduler.changed.notify_all();
    }
}

/// Why a call's task got no grant: the time waited, the task, and what held the credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoCredit {
    /// How long the task waited.
    pub waited: Duration,
    /// The task's index in the call that queued it.
    pub tag: usize,
    /// Bytes granted (to this call or others) and not yet released when the wait ended.
    pub in_flight: usize,
    /// Tasks of every call still waiting then, this one included.
    pub waiting: usize,
}

/// The tasks of one call, waiting in the scheduler; those not granted yet leave the queue when
/// it is dropped (a call that fails half-way does not block the others).
#[derive(Debug)]
pub struct Queued<'a> {
    scheduler: &'a CreditScheduler,
    tickets: std::vec::IntoIter<Ticket>,
}

impl CreditScheduler {
    /// A scheduler letting at most `credit` bytes be in flight (a task bigger than that goes out
    /// alone).
    pub fn new(credit: usize) -> CreditScheduler {
        CreditScheduler {
            credit,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    /// The credit in bytes.
    pub fn credit(&self) -> usize {
        self.credit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the tasks of one call, `(priority, partition key, bytes)`; each task's index in
    /// `tasks` comes back as its grant's [`tag`](Grant::tag).
    pub fn enqueue(&self, priority: i32, tasks: &[(u64, usize)]) -> Queued<'_> {
        let mut st = self.lock();
        let mut tickets: Vec<Ticket> = tasks
            .iter()
            .enumerate()
            .map(|(tag, &(key, bytes))| {
                st.next_seq += 1;
                Ticket {
                    priority: Reverse(priority),
                    key,
                    seq: st.next_seq,
                    bytes,
                    tag,
                }
            })
            .collect();
        tickets.sort();
        st.waiting.extend(tickets.iter().copied());
        drop(st);
        self.changed.notify_all();
        Queued {
            scheduler: self,
            tickets: tickets.into_iter(),
        }
    }

    /// Tasks waiting for credit, across every call.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Bytes granted and not yet released.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Starts (or stops) recording the `(priority, partition key)` of every grant, in order.
    pub fn record(&self, on: bool) {
        self.lock().log = on.then(Vec::new);
    }

    /// The grants recorded so far (and clears them).
    pub fn take_log(&self) -> Vec<(i32, u64)> {
        self.lock()
            .log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

impl<'a> Queued<'a> {
    /// Waits until the call's next task (in priority then key order) is the first of the whole
    /// queue and fits in the credit; `None` once every task has been granted.
    ///
    /// # Errors
    /// [`NoCredit`] (the task, what held the credit) when `timeout` passes first; the task
    /// leaves the queue.
    pub fn next_grant(&mut self, timeout: Duration) -> Result<Option<Grant<'a>>, NoCredit> {
        let Some(ticket) = self.tickets.next() else {
            return Ok(None);
        };
        let s = self.scheduler;
        let deadline = Instant::now() + timeout;
        let mut st = s.lock();
        loop {
            if s.may_grant(&st, &ticket) {
                return Ok(Some(s.grant(st, &ticket)));
            }
            let now = Instant::now();
            if now >= deadline {
                st.waiting.remove(&ticket);
                return Err(NoCredit {
                    waited: timeout,
                    tag: ticket.tag,
                    in_flight: st.in_flight,
                    waiting: st.waiting.len() + 1,
                });
            }
            st = s
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl<'a> Queued<'a> {
    /// The call's next grant when it can be given at once (its task is the first of the whole
    /// queue and fits in the credit); else `None`, and the task keeps its place.
    pub fn try_next_grant(&mut self) -> Option<Grant<'a>> {
        let ticket = *self.tickets.as_slice().first()?;
        let s = self.scheduler;
        let st = s.lock();
        if !s.may_grant(&st, &ticket) {
            return None;
        }
        self.tickets.next();
        Some(s.grant(st, &ticket))
    }
}

impl CreditScheduler {
    /// Whether `ticket` is the first of the queue and fits in the credit.
    fn may_grant(&self, st: &State, ticket: &Ticket) -> bool {
        st.waiting.first() == Some(ticket)
            && (st.in_flight == 0 || st.in_flight + ticket.bytes <= self.credit)
    }

    /// Grants `ticket` (which [`may_grant`](Self::may_grant)).
    fn grant<'a>(&'a self, mut st: MutexGuard<'_, State>, ticket: &Ticket) -> Grant<'a> {
        st.waiting.remove(ticket);
        st.in_flight += ticket.bytes;
        if let Some(log) = st.log.as_mut() {
            log.push((ticket.priority.0, ticket.key));
        }
        drop(st);
        // The next ticket may fit too.
        self.changed.notify_all();
        Grant {
            scheduler: self,
            bytes: ticket.bytes,
            tag: ticket.tag,
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut st = self.scheduler.lock();
        for t in self.tickets.by_ref() {
            st.waiting.remove(&t);
        }
        drop(st);
        self.scheduler.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn credit_bounds_the_bytes_in_flight() {
        let s = CreditScheduler::new(100);
        let mut q = s.enqueue(0, &[(1, 60), (2, 60), (3, 500)]);
        let a = q.next_grant(T).unwrap().unwrap();
        assert_eq!(s.in_flight(), 60);
        // 60 + 60 > 100: the second waits for the first.
        let t = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let b = q.next_grant(T).unwrap().unwrap();
                let in_flight = s.in_flight();
                drop(b);
                // Bigger than the credit: goes out alone.
                let c = q.next_grant(T).unwrap().unwrap();
                (in_flight, s.in_flight(), c.tag)
            });
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(s.in_flight(), 60);
            drop(a);
            h.join().unwrap()
        });
        assert_eq!(t, (60, 500, 2));
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn try_next_grant_grants_only_what_fits_now_and_keeps_the_place_of_the_rest() {
        let s = CreditScheduler::new(10);
        let mut other = s.enqueue(5, &[(9, 1)]);
        let mut q = s.enqueue(0, &[(1, 4), (2, 4), (3, 4)]);
        // The other call's task is first in the queue: nothing of this call goes yet.
        assert!(q.try_next_grant().is_none());
        let o = other.next_grant(T).unwrap().unwrap();
        let a = q.try_next_grant().expect("1 + 4 fits in 10");
        let b = q.try_next_grant().expect("1 + 8 fits in 10");
        assert!(q.try_next_grant().is_none(), "1 + 12 does not fit");
        assert_eq!((s.in_flight(), s.waiting()), (9, 1));
        drop((o, a));
        let c = q.try_next_grant().expect("the third keeps its place");
        assert_eq!((b.tag, c.tag), (1, 2));
        assert!(q.next_grant(T).unwrap().is_none());
    }

    #[test]
    fn higher_priority_calls_overtake_at_the_next_free_credit() {
        let s = Arc::new(CreditScheduler::new(10));
        s.record(true);
        // Hold the credit while three calls queue.
        let mut hold = s.enqueue(i32::MAX, &[(0, 10)]);
        let held = hold.next_grant(T).unwrap().unwrap();
        let calls: Vec<_> = [(-3, 100u64), (0, 200), (-1, 300)]
            .into_iter()
            .map(|(priority, base)| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    let tasks: Vec<(u64, usize)> = (0..3).map(|i| (base + 2 - i, 10)).collect();
                    let mut q = s.enqueue(priority, &tasks);
                    while let Some(g) = q.next_grant(T).unwrap() {
                        drop(g);
                    }
                })
            })
            .collect();
        while s.waiting() < 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        for c in calls {
            c.join().unwrap();
        }
        let log = s.take_log();
        let expected: Vec<(i32, u64)> = [(0, 200), (-1, 300), (-3, 100)]
            .into_iter()
            .flat_map(|(p, b)| (0..3).map(move |i| (p, b + i)))
            .collect();
        assert_eq!(log[0], (i32::MAX, 0));
        assert_eq!(log[1..], expected[..]);
    }

    #[test]
    fn a_task_without_credit_in_time_says_which_and_what_held_the_credit() {
        let s = CreditScheduler::new(10);
        let mut hold = s.enqueue(0, &[(1, 8)]);
        let held = hold.next_grant(T).unwrap().unwrap();
        let mut q = s.enqueue(0, &[(2, 4), (3, 4)]);
        let e = q.next_grant(Duration::from_millis(20)).unwrap_err();
        assert_eq!(
            e,
            NoCredit {
                waited: Duration::from_millis(20),
                tag: 0,
                in_flight: 8,
                waiting: 2,
            }
        );
        assert_eq!(s.waiting(), 1, "the task that gave up left the queue");
        drop((held, q));
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_dropped_call_leaves_the_queue() {
        let s = CreditScheduler::new(10);
        let mut q = s.enqueue(5, &[(1, 10), (2, 10)]);
        let g = q.next_grant(T).unwrap().unwrap();
        drop(q);
        assert_eq!(s.waiting(), 0);
        drop(g);
        let mut q = s.enqueue(0, &[(9, 10)]);
        assert!(q.next_grant(T).unwrap().is_some());
        assert_eq!(q.next_grant(T).unwrap().map(|g| g.tag), None);
    }
}
