//! One balancer per box: its workers' counts merged, one review a period for all.
//!
//! Each worker counts its own requests (no shared write per request), and alone its
//! balancer sees 1/N of the box's traffic: with 8 workers on `cubegate-bench fleet` at
//! 110/s, rates that noisy moved 47–55 groups in 12 s where one worker moved 5, the
//! workers disagreed on homes, and prefix-cache hits fell from 88–89 % to 79–82 %. So
//! once a period each worker hands its counts to the box's [`Hub`] and takes back the
//! homes the hub's review decided: every worker of a box sends a group to one host.
//! The hub is behind a mutex taken at most once a period per worker, with `try_lock`:
//! a worker that finds it taken keeps its counts and tries again at its next request, so
//! no request ever waits for it.

use super::{give_up_gone_home, Balancer, MAX_GROUPS, PERIOD};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Instant;

/// The box's balancer, shared by its workers' balancers ([`Balancer::with_hub`]).
#[derive(Default)]
pub struct Hub(Mutex<Balancer>);

/// Local epochs (a worker giving up a home that went down) are drawn above this, the
/// hub's below: a worker's bump never collides with an epoch the hub hands out.
const LOCAL_EPOCHS: u32 = 1 << 31;

impl Balancer {
    /// A worker's balancer that reviews through the box's `hub`.
    pub fn with_hub(hub: Arc<Hub>) -> Balancer {
        Balancer {
            hub: Some(hub),
            epochs: LOCAL_EPOCHS,
            ..Balancer::default()
        }
    }

    /// Merges this worker's counts into the hub, runs the hub's review if its period is
    /// over, and adopts the hub's homes. False (nothing done) if another worker holds it.
    pub(super) fn exchange(&mut self, hub: &Hub, now: Instant) -> bool {
        let mut shared = match hub.0.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => return false,
            // A worker panicked while merging: counts are plain numbers, still usable.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        };
        let box_ = &mut *shared;
        for (id, g) in self.groups.iter_mut() {
            let tracked = box_.groups.len() < MAX_GROUPS;
            match box_.groups.get_mut(id) {
                Some(s) => {
                    s.count = s.count.saturating_add(g.count);
                    s.away_count = s.away_count.saturating_add(g.away_count);
                    if g.away_count > 0 {
                        s.away_to = g.away_to;
                    }
                    (s.order, s.hosts) = (g.order, g.hosts);
                    give_up_gone_home(s, &mut box_.epochs);
                }
                None if tracked => {
                    let mut s = *g;
                    (s.home, s.epoch, s.rate, s.away) = (None, 0, 0.0, 0.0);
                    box_.groups.insert(*id, s);
                }
                None => {}
            }
            g.count = 0;
            g.away_count = 0;
        }
        let last = *box_.last.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last);
        if elapsed >= PERIOD {
            box_.recompute(elapsed);
            box_.last = Some(now);
            // Counted once for the box, by the worker whose exchange ran the review.
            self.moves += box_.take_moves();
        }
        // The box's homes; what the box forgot (or could not track) this worker forgets.
        self.groups.retain(|id, g| match box_.groups.get(id) {
            Some(s) => {
                (g.home, g.epoch) = (s.home, s.epoch);
                true
            }
            None => false,
        });
        true
    }
}
