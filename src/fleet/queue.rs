//! The wait for a host with room: a worker's queue, fair across domains.
//!
//! A request whose hosts are all at their `max_in_flight` waits here (bounded in number
//! and in time) and takes the first host of its order that frees up — the choice is made
//! when a place is free, not before waiting (late binding). Waiters of one domain wait in
//! line; only the head of each domain's line tries for a place. Places freed on other
//! workers are seen by polling (a few ms), the queue being per worker like everything on
//! the request path.
//!
//! Domains take turns: when a place frees, the heads that could take it go in the order
//! of their domains' last service on this worker, the least recent (or never served)
//! first. The turn has to be kept here because the heads poll on the same timer ticks, in
//! the order they joined: left to the timer, the domain that queued first would take every
//! freed place until its line is empty, and one domain's burst would starve the others. A
//! head gives way only to heads that want a host with room now, so a domain waiting for
//! another, full host holds no one up.

use super::host::Host;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A place in the queue, for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    domain: u16,
    id: u64,
}

struct Waiter {
    id: u64,
    /// The hosts it may take a place on.
    hosts: Vec<Arc<Host>>,
}

/// One domain's waiters, in order.
struct Line {
    waiters: VecDeque<Waiter>,
    /// When the domain last took a place from this queue (`FairQueue::served`); 0 = not
    /// since its line formed.
    served_at: u64,
}

pub struct FairQueue {
    lines: HashMap<u16, Line>,
    next_id: u64,
    waiting: usize,
    max: usize,
    /// Places taken from the queue so far: the clock the turns are kept by.
    served: u64,
}

impl FairQueue {
    /// At most `max` requests waiting on this worker.
    pub fn new(max: usize) -> FairQueue {
        FairQueue {
            lines: HashMap::new(),
            next_id: 0,
            waiting: 0,
            max,
            served: 0,
        }
    }

    /// Joins the end of `domain`'s line, for a place on one of `hosts`; `None` when the
    /// queue is full.
    pub fn join(&mut self, domain: u16, hosts: Vec<Arc<Host>>) -> Option<Ticket> {
        if self.waiting >= self.max {
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.lines
            .entry(domain)
            .or_insert_with(|| Line {
                waiters: VecDeque::new(),
                served_at: 0,
            })
            .waiters
            .push_back(Waiter { id, hosts });
        self.waiting += 1;
        Some(Ticket { domain, id })
    }

    /// Whether it is the ticket's turn to try for a place: it heads its domain's line, and
    /// no head of a domain served less recently (or of the same age, queued earlier) wants
    /// one of the hosts that `has_room`.
    pub fn is_turn(&self, ticket: &Ticket, has_room: impl Fn(&Host) -> bool) -> bool {
        let Some(line) = self.lines.get(&ticket.domain) else {
            return false;
        };
        if line.waiters.front().map(|w| w.id) != Some(ticket.id) {
            return false;
        }
        let mine = (line.served_at, ticket.id);
        !self.lines.iter().any(|(domain, other)| {
            *domain != ticket.domain
                && other.waiters.front().is_some_and(|head| {
                    (other.served_at, head.id) < mine && head.hosts.iter().any(|h| has_room(h))
                })
        })
    }

    /// Leaves the queue; `served`: with a place (the domain's turn is then over).
    pub fn leave(&mut self, ticket: Ticket, served: bool) {
        let Some(line) = self.lines.get_mut(&ticket.domain) else {
            return;
        };
        if let Some(at) = line.waiters.iter().position(|w| w.id == ticket.id) {
            line.waiters.remove(at);
            self.waiting -= 1;
            if served {
                self.served += 1;
                line.served_at = self.served;
            }
        }
        if line.waiters.is_empty() {
            self.lines.remove(&ticket.domain);
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
    use crate::fleet::host::test_host as host;

    #[test]
    fn one_head_per_domain_and_a_bound() {
        let h = host(9000);
        let any = |_: &Host| true;
        let mut q = FairQueue::new(3);
        let a1 = q.join(1, vec![h.clone()]).unwrap();
        let a2 = q.join(1, vec![h.clone()]).unwrap();
        let b1 = q.join(2, vec![h.clone()]).unwrap();
        assert!(q.join(3, vec![h.clone()]).is_none(), "full");
        assert!(q.is_turn(&a1, any) && !q.is_turn(&a2, any));
        q.leave(a1, false);
        assert!(q.is_turn(&a2, any));
        q.leave(b1, false);
        q.leave(a2, false);
        assert!(q.is_empty());
        assert!(q.join(3, vec![h]).is_some());
    }

    #[test]
    fn domains_take_turns() {
        let h = host(9000);
        let any = |_: &Host| true;
        let mut q = FairQueue::new(16);
        let mut a: VecDeque<Ticket> = (0..5)
            .map(|_| q.join(1, vec![h.clone()]).unwrap())
            .collect();
        let b = q.join(2, vec![h.clone()]).unwrap();
        // Neither served yet: the earlier head goes first, B's head waits its turn.
        assert!(q.is_turn(&a[0], any) && !q.is_turn(&b, any));
        q.leave(a.pop_front().unwrap(), true);
        // A was just served: B's turn, though A's next head polls first.
        assert!(!q.is_turn(&a[0], any) && q.is_turn(&b, any));
        q.leave(b, true);
        assert!(q.is_turn(&a[0], any));
    }

    #[test]
    fn no_turn_is_kept_for_a_head_whose_hosts_are_full() {
        let (free, full) = (host(9000), host(9001));
        let room = |h: &Host| h.url == free.url;
        let mut q = FairQueue::new(16);
        let waits_for_full = q.join(1, vec![full.clone()]).unwrap();
        let a = q.join(2, vec![free.clone()]).unwrap();
        assert!(
            q.is_turn(&a, room),
            "held up by a head that cannot use the place"
        );
        assert!(
            q.is_turn(&waits_for_full, room),
            "its own turn (it finds no room)"
        );
        q.leave(waits_for_full, false);
        q.leave(a, true);
        assert!(q.is_empty());
    }
}
