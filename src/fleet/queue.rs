//! The wait for a host with room: a worker's queue, fair across domains.
//!
//! A request whose hosts are all at their `max_in_flight` waits here (bounded in number
//! and in time) and takes the first host of its order that frees up — the choice is made
//! when a place is free, not before waiting (late binding). Waiters of one domain wait in
//! line; only the head of each domain's line tries for a place, so when places free up
//! each domain with waiters gets its turn in rotation and one domain's burst cannot starve
//! another's requests. Places freed on other workers are seen by polling (a few ms), the
//! queue being per worker like everything on the request path.

use std::collections::{HashMap, VecDeque};

/// A place in the queue, for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    domain: u16,
    id: u64,
}

pub struct FairQueue {
    lines: HashMap<u16, VecDeque<u64>>,
    next_id: u64,
    waiting: usize,
    max: usize,
}

impl FairQueue {
    /// At most `max` requests waiting on this worker.
    pub fn new(max: usize) -> FairQueue {
        FairQueue {
            lines: HashMap::new(),
            next_id: 0,
            waiting: 0,
            max,
        }
    }

    /// Joins the end of `domain`'s line; `None` when the queue is full.
    pub fn join(&mut self, domain: u16) -> Option<Ticket> {
        if self.waiting >= self.max {
            return None;
        }
        self.next_id += 1;
        self.lines
            .entry(domain)
            .or_default()
            .push_back(self.next_id);
        self.waiting += 1;
        Some(Ticket {
            domain,
            id: self.next_id,
        })
    }

    /// Whether the ticket is at the head of its domain's line (its turn to try).
    pub fn is_head(&self, ticket: &Ticket) -> bool {
        self.lines
            .get(&ticket.domain)
            .and_then(|l| l.front())
            .is_some_and(|id| *id == ticket.id)
    }

    /// Leaves the queue (with a place or without).
    pub fn leave(&mut self, ticket: Ticket) {
        if let Some(line) = self.lines.get_mut(&ticket.domain) {
            if let Some(at) = line.iter().position(|id| *id == ticket.id) {
                line.remove(at);
                self.waiting -= 1;
            }
            if line.is_empty() {
                self.lines.remove(&ticket.domain);
            }
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_head_per_domain_and_a_bound() {
        let mut q = FairQueue::new(3);
        let a1 = q.join(1).unwrap();
        let a2 = q.join(1).unwrap();
        let b1 = q.join(2).unwrap();
        assert!(q.join(3).is_none(), "full");
        assert!(q.is_head(&a1) && q.is_head(&b1) && !q.is_head(&a2));
        q.leave(a1);
        assert!(q.is_head(&a2));
        q.leave(b1);
        q.leave(a2);
        assert!(q.is_empty());
        assert!(q.join(3).is_some());
    }
}
