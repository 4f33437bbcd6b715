//! The simulated GPU's running batch: at most `slots` requests generate at once, the
//! others wait in a FIFO queue (vLLM's `--max-num-seqs` and its waiting queue; Ollama's
//! `OLLAMA_NUM_PARALLEL`).
//!
//! The batch is per process and shared by every simulator thread, so it sits behind a
//! Mutex (a simulator, not a hot path). Waiting is an async [`Admission`] future woken by
//! whichever thread frees a slot (monoio's `sync` feature carries wakers across threads),
//! so a queued request never blocks its monoio thread. A waiter that goes away (its
//! client left) leaves the queue; a slot granted to a waiter that went away is passed on.
//! With unlimited slots nothing queues and only the running gauge is kept.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The bounded batch and its queue.
#[derive(Debug)]
pub struct Batch {
    /// `None` = unlimited.
    slots: Option<usize>,
    queue: Mutex<Queue>,
    /// Gauges for `/metrics`, read without the lock.
    running: AtomicUsize,
    waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct Queue {
    running: usize,
    waiting: VecDeque<Arc<Waiter>>,
}

#[derive(Debug, Default)]
struct Waiter {
    state: Mutex<WaiterState>,
}

#[derive(Debug, Default)]
struct WaiterState {
    granted: bool,
    waker: Option<Waker>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent counts: keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Batch {
    pub fn new(slots: Option<usize>) -> Batch {
        Batch {
            slots: slots.map(|n| n.max(1)),
            queue: Mutex::default(),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Requests generating now.
    pub fn running(&self) -> usize {
        self.running.load(Relaxed)
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Relaxed)
    }

    /// Waits (FIFO) for a slot; the slot is freed when the returned [`Slot`] drops.
    pub fn admit(&self) -> Admission<'_> {
        Admission {
            batch: self,
            waiter: None,
        }
    }

    /// A slot at once, if one is free and nobody waits for it (no allocation, no waker:
    /// the path every request takes on a host that is not saturated).
    pub fn try_admit(&self) -> Option<Slot<'_>> {
        // Lazily: a Slot made and dropped would free a slot.
        self.take_or_queue(None).then(|| Slot { batch: self })
    }

    /// Takes a slot if one is free and nobody waits; otherwise queues `waiter`, if any.
    fn take_or_queue(&self, waiter: Option<&Arc<Waiter>>) -> bool {
        let Some(slots) = self.slots else {
            self.running.fetch_add(1, Relaxed);
            return true;
        };
        let mut q = lock(&self.queue);
        if q.running < slots && q.waiting.is_empty() {
            q.running += 1;
            self.running.store(q.running, Relaxed);
            return true;
        }
        if let Some(w) = waiter {
            q.waiting.push_back(w.clone());
            self.waiting.store(q.waiting.len(), Relaxed);
        }
        false
    }

    /// Frees one slot and hands free slots to the longest waiters.
    fn release(&self) {
        if self.slots.is_none() {
            self.running.fetch_sub(1, Relaxed);
            return;
        }
        let mut wake = Vec::new();
        {
            let mut q = lock(&self.queue);
            q.running -= 1;
            self.grant(&mut q, &mut wake);
        }
        wake.into_iter().for_each(Waker::wake);
    }

    fn grant(&self, q: &mut Queue, wake: &mut Vec<Waker>) {
        let slots = self.slots.unwrap_or(usize::MAX);
        while q.running < slots {
            let Some(w) = q.waiting.pop_front() else {
                break;
            };
            let mut st = lock(&w.state);
            st.granted = true;
            wake.extend(st.waker.take());
            q.running += 1;
        }
        self.running.store(q.running, Relaxed);
        self.waiting.store(q.waiting.len(), Relaxed);
    }

    /// A waiter went away: out of the queue, or, if it had been granted a slot meanwhile,
    /// that slot goes to the next one.
    fn abandon(&self, waiter: &Arc<Waiter>) {
        let mut wake = Vec::new();
        {
            let mut q = lock(&self.queue);
            if lock(&waiter.state).granted {
                q.running -= 1;
            } else {
                q.waiting.retain(|w| !Arc::ptr_eq(w, waiter));
            }
            self.grant(&mut q, &mut wake);
        }
        wake.into_iter().for_each(Waker::wake);
    }
}

/// A running request's place in the batch; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a> {
    batch: &'a Batch,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.batch.release();
    }
}

/// The wait for a slot (see [`Batch::admit`]).
#[derive(Debug)]
pub struct Admission<'a> {
    batch: &'a Batch,
    /// Set once queued; taken when the slot is handed out.
    waiter: Option<Arc<Waiter>>,
}

impl<'a> Future for Admission<'a> {
    type Output = Slot<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Slot<'a>> {
        let batch = self.batch;
        let Some(waiter) = &self.waiter else {
            let waiter = Arc::new(Waiter::default());
            lock(&waiter.state).waker = Some(cx.waker().clone());
            if batch.take_or_queue(Some(&waiter)) {
                return Poll::Ready(Slot { batch });
            }
            self.waiter = Some(waiter);
            return Poll::Pending;
        };
        let mut st = lock(&waiter.state);
        if st.granted {
            drop(st);
            self.waiter = None;
            return Poll::Ready(Slot { batch });
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.waiter.take() {
            self.batch.abandon(&w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll<'a>(a: &mut Pin<Box<Admission<'a>>>) -> Option<Slot<'a>> {
        match a.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(s) => Some(s),
            Poll::Pending => None,
        }
    }

    #[test]
    fn unlimited_slots_never_queue() {
        let b = Batch::new(None);
        let slots: Vec<_> = (0..5)
            .map(|_| poll(&mut Box::pin(b.admit())).expect("admitted"))
            .collect();
        assert_eq!((b.running(), b.waiting()), (5, 0));
        drop(slots);
        assert_eq!(b.running(), 0);
    }

    #[test]
    fn slots_bound_the_batch_and_waiters_go_in_order() {
        let b = Batch::new(Some(2));
        let mut admissions: Vec<_> = (0..5).map(|_| Box::pin(b.admit())).collect();
        let mut running: Vec<(usize, Slot)> = Vec::new();
        for (i, a) in admissions.iter_mut().enumerate() {
            if let Some(s) = poll(a) {
                running.push((i, s));
            }
        }
        assert_eq!(running.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1]);
        assert_eq!((b.running(), b.waiting()), (2, 3));
        // Each freed slot goes to the longest waiter.
        let mut order = Vec::new();
        while !running.is_empty() {
            running.remove(0);
            for (i, a) in admissions.iter_mut().enumerate() {
                if order.contains(&i) || i < 2 {
                    continue;
                }
                if let Some(s) = poll(a) {
                    order.push(i);
                    running.push((i, s));
                }
            }
        }
        assert_eq!(order, [2, 3, 4]);
        assert_eq!((b.running(), b.waiting()), (0, 0));
    }

    #[test]
    fn try_admit_takes_only_a_free_slot_nobody_waits_for() {
        let b = Batch::new(Some(1));
        let first = b.try_admit().expect("free");
        assert!(b.try_admit().is_none());
        let mut queued = Box::pin(b.admit());
        assert!(poll(&mut queued).is_none());
        drop(first);
        assert!(b.try_admit().is_none(), "the freed slot went to the waiter");
        assert!(poll(&mut queued).is_some());
    }

    #[test]
    fn a_waiter_that_leaves_gives_its_place_up() {
        let b = Batch::new(Some(1));
        let mut first = Box::pin(b.admit());
        let slot = poll(&mut first).expect("free slot");
        let mut second = Box::pin(b.admit());
        let mut third = Box::pin(b.admit());
        assert!(poll(&mut second).is_none() && poll(&mut third).is_none());
        assert_eq!(b.waiting(), 2);
        drop(second);
        assert_eq!(b.waiting(), 1);
        drop(slot);
        assert_eq!((b.running(), b.waiting()), (1, 0));
        // Granted but gone before it noticed: the slot is freed again.
        drop(third);
        assert_eq!(b.running(), 0);
        assert!(poll(&mut Box::pin(b.admit())).is_some());
    }
}
