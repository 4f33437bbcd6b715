//! Prefix groups' homes, evened out by how often each group is asked for.
//!
//! Consistent placement puts a prefix group (the requests sharing a body's first key: a
//! system prompt) on a host by hash, blind to how popular it is. Prompt popularity is
//! steep (a few prompts carry most requests), so the hash is lumpy: on `cubegate-bench
//! fleet` (32 prompts of Zipf popularity on 4 hosts) the median draw gives one host 43 % of
//! the requests and another 11 % (a Monte Carlo of uniform placement), and the in-flight
//! bound then spills requests of the hot host's groups, which splits groups over hosts
//! and costs cache hits, while the light host's cache holds little.
//!
//! The balancer measures each group's request rate (per worker, a count per second
//! decayed with a 2-s half-life), and how much of it was served away from the group's
//! home (spills over the in-flight bound): a host's load is what it was sent, so a host
//! filling up with a hot group's spills sheds its own groups. A group gets its consistent
//! host as its home at its first review; once a second after that, if a host has carried
//! more than 1.25 × its pool's mean rate at two reviews in a row (the pool: every host
//! that may serve the group, up or not; loads are counted per pool), one group moves off
//! it, to the first other host of its own consistent order that stays within 1.1 × the
//! mean with it. Moving a group costs one cold prefill on its new host, so moves are few:
//! one a second, only off a clearly overloaded host, a group worth it where there is one
//! (at least a quarter of the host's excess, else the largest) and never one so large
//! that the host drops below the mean. A group hotter than any host's room may still move
//! to a host under the mean that ends up lighter than the one it left.
//!
//! When no overloaded host gives a group, the review evens out how many groups the hosts
//! home instead: a host homing more than the mean by a tenth (and at least one) gives
//! one of its rarer groups (at most the mean rate per group) to the first host of that
//! group's order homing fewer than the mean, if the move keeps it within 1.1 × the mean
//! rate. Each group's prompt takes cache room whatever its rate, and an LRU cache
//! evicts the rarer prompts of a host homing many between their visits: on `cubegate-bench
//! fleet` this cut the requests paying a cold system prompt from 4.7 to 3.3 % at 110/s.
//!
//! The workers of a box share one review ([`Hub`], `balance_hub.rs`): each counts its own
//! requests and, once a second, hands its counts to the box's balancer and takes back its
//! homes, so every worker of a box sends a group to one host. Boxes each run their own,
//! from their own traffic. A new group has no home and goes by its consistent order: on
//! every box alike. Which group moves is chosen by its key among those that qualify, not
//! by its rate, so that balancers whose rates differ by noise pick the same one; they
//! still disagree while one has reviewed and another not yet (up to a second), or when a
//! group sits at a threshold — a group they disagree on is cached on two hosts.

use crate::hashing::PreHashedMap;
use std::time::{Duration, Instant};

/// A host over its pool's mean rate by this factor has a group moved off it …
const EPSILON_KEEP: f32 = 0.25;
/// … to a host that stays within this factor of the mean with it.
const EPSILON: f32 = 0.1;
/// How often homes are reviewed: at most one group moves per period.
const PERIOD: Duration = Duration::from_secs(1);
/// Rates are counts per second decayed with this half-life.
const HALF_LIFE: Duration = Duration::from_secs(2);
/// Groups tracked per worker; beyond that, new groups are placed by hash alone.
const MAX_GROUPS: usize = 4096;
/// A group whose decayed rate fell below this (requests per second) is forgotten.
const FORGET_BELOW: f32 = 0.05;
/// Hosts of a group's consistent order remembered (where its home may move to).
const ORDER: usize = 8;

#[derive(Clone, Copy)]
struct Group {
    /// Requests since the last recompute.
    count: u32,
    /// Decayed requests per second.
    rate: f32,
    /// Of those, the requests served away from its home (spills over the in-flight
    /// bound, sessions kept elsewhere): counted since the last recompute, decayed like
    /// `rate`, and the host the last of them went to. They load that host, not the home.
    away_count: u32,
    away: f32,
    away_to: u64,
    /// The host (its seed) the group is sent to; `None` until its first review.
    home: Option<u64>,
    /// Bumped whenever `home` is set or moved (see [`Home::epoch`]).
    epoch: u32,
    /// Its consistent order (host seeds), first choice first.
    order: [u64; ORDER],
    hosts: u8,
    /// Its [`Pool`]: the hosts that may serve it, all of them, not just `order`'s.
    pool: u64,
    pool_size: u16,
}

/// A group's home as a request finds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Home {
    /// The host (its seed) to send the group to; `None` before the group's first review.
    pub host: Option<u64>,
    /// Changes whenever `host` is set or moved: the affinity index ignores entries written
    /// under another epoch, so a moved group is not pulled back by what it left behind.
    pub epoch: u32,
}

/// The hosts a group may be served by: every candidate of its domain and model, up or
/// not (so a host's short outage does not split a pool), as an order-independent id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pool {
    pub id: u64,
    pub size: u16,
}

impl Pool {
    pub fn of(seeds: impl Iterator<Item = u64>) -> Pool {
        seeds.fold(Pool::default(), |p, seed| Pool {
            // A sum of mixed seeds: the same whatever the hosts' order.
            id: p.id.wrapping_add(mix(seed)),
            size: p.size.saturating_add(1),
        })
    }
}

fn mix(seed: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// A group's entry: its key mixed with its pool.
fn group_id(key: u64, pool: Pool) -> u64 {
    key ^ pool.id.rotate_left(17)
}

/// A host's load entry within a pool.
fn slot(pool: u64, host: u64) -> u64 {
    pool ^ mix(host)
}

/// A home that is not up (or no longer a candidate) is given up: the group goes by its
/// order until the next review gives it a home again.
fn give_up_gone_home(g: &mut Group, epochs: &mut u32) {
    if let Some(h) = g.home {
        if !g.order[..usize::from(g.hosts)].contains(&h) {
            g.home = None;
            g.epoch = next_epoch(epochs);
        }
    }
}

/// A fresh epoch from the balancer's one counter.
fn next_epoch(epochs: &mut u32) -> u32 {
    *epochs = epochs.wrapping_add(1);
    *epochs
}

/// A worker's view of its groups' rates and homes.
#[derive(Default)]
pub struct Balancer {
    /// Keyed by the group's key mixed with its pool: two domains (or models) with the
    /// same system prompt on different hosts are two groups.
    groups: PreHashedMap<Group>,
    last: Option<Instant>,
    /// Epochs come from one counter, so a group forgotten and seen again never reuses one.
    epochs: u32,
    /// Groups moved since [`Balancer::take_moves`] last read it.
    moves: u64,
    /// The host over its bound at the last review: a host is relieved only when it is
    /// over at two reviews in a row (a second of noise at low rates moves nothing).
    over: Vec<(u64, u64)>,
    /// Scratch, kept to avoid allocating once a second: load and groups homed per
    /// (pool, host), per pool its total rate, size and groups, and the (pool, host)s
    /// over the bound.
    loads: PreHashedMap<f32>,
    counts: PreHashedMap<u32>,
    pools: PreHashedMap<(f32, u16, u32)>,
    worst: Vec<(f32, u64, u64)>,
    /// The box's balancer, when this one is a worker's: see [`Hub`].
    hub: Option<std::sync::Arc<Hub>>,
}

impl Balancer {
    /// Counts a request of group `key` in `pool`, whose consistent order over the hosts
    /// up is `order` (host seeds), and returns the group's home.
    pub fn note(
        &mut self,
        now: Instant,
        key: u64,
        pool: Pool,
        order: impl Iterator<Item = u64>,
    ) -> Home {
        let last = *self.last.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last);
        if elapsed >= PERIOD {
            // Taken out and put back, not cloned: an Arc's clone writes its shared count.
            match self.hub.take() {
                Some(hub) => {
                    // A worker that finds the box's balancer busy tries again next request.
                    if self.exchange(&hub, now) {
                        self.last = Some(now);
                    }
                    self.hub = Some(hub);
                }
                None => {
                    self.recompute(elapsed);
                    self.last = Some(now);
                }
            }
        }
        let id = group_id(key, pool);
        let tracked = self.groups.len() < MAX_GROUPS;
        let g = match self.groups.get_mut(&id) {
            Some(g) => g,
            None if tracked => self.groups.entry(id).or_insert(Group {
                count: 0,
                rate: 0.0,
                away_count: 0,
                away: 0.0,
                away_to: 0,
                home: None,
                epoch: 0,
                order: [0; ORDER],
                hosts: 0,
                pool: pool.id,
                pool_size: pool.size,
            }),
            None => return Home::default(),
        };
        g.count = g.count.saturating_add(1);
        g.hosts = 0;
        for seed in order.take(ORDER) {
            g.order[usize::from(g.hosts)] = seed;
            g.hosts += 1;
        }
        give_up_gone_home(g, &mut self.epochs);
        Home {
            host: g.home,
            epoch: g.epoch,
        }
    }

    /// Counts where a request of group `key` in `pool` was sent: away from its home (or,
    /// before its first review, from the host it will get) it loads another host.
    pub fn served(&mut self, key: u64, pool: Pool, host: u64) {
        let Some(g) = self.groups.get_mut(&group_id(key, pool)) else {
            return;
        };
        let home = g.home.unwrap_or(g.order[0]);
        if host != home {
            g.away_count = g.away_count.saturating_add(1);
            g.away_to = host;
        }
    }

    /// Decays the rates by the time since the last recompute, gives new groups their
    /// consistent host as home, and moves at most one group off an overloaded host (see
    /// the module doc).
    fn recompute(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f32().max(PERIOD.as_secs_f32());
        let keep = 0.5f32.powf(secs / HALF_LIFE.as_secs_f32());
        let epochs = &mut self.epochs;
        self.groups.retain(|_, g| {
            g.rate = g.rate * keep + (1.0 - keep) * g.count as f32 / secs;
            g.away = g.away * keep + (1.0 - keep) * g.away_count as f32 / secs;
            g.away = g.away.min(g.rate);
            g.count = 0;
            g.away_count = 0;
            if g.home.is_none() && g.hosts > 0 {
                g.home = Some(g.order[0]);
                g.epoch = next_epoch(epochs);
            }
            g.rate >= FORGET_BELOW
        });
        self.pools.clear();
        self.loads.clear();
        self.counts.clear();
        for g in self.groups.values() {
            let Some(home) = g.home else { continue };
            let p = self.pools.entry(g.pool).or_insert((0.0, g.pool_size, 0));
            p.0 += g.rate;
            p.2 += 1;
            *self.counts.entry(slot(g.pool, home)).or_insert(0) += 1;
            // Each host carries what it was sent: a group's spills load the host they went
            // to (a host full of another group's spills sheds its own groups).
            *self.loads.entry(slot(g.pool, home)).or_insert(0.0) += g.rate - g.away;
            if g.away > 0.0 {
                *self.loads.entry(slot(g.pool, g.away_to)).or_insert(0.0) += g.away;
            }
        }
        // Every (pool, host) over the bound, worst first.
        self.worst.clear();
        for g in self.groups.values() {
            let Some(home) = g.home else { continue };
            let ratio = self.load(g.pool, home) / self.mean(g.pool).max(f32::EPSILON);
            if ratio > 1.0 + EPSILON_KEEP
                && !self.worst.iter().any(|w| w.1 == home && w.2 == g.pool)
            {
                self.worst.push((ratio, home, g.pool));
            }
        }
        self.worst.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let over_before = std::mem::take(&mut self.over);
        self.over = self.worst.iter().map(|w| (w.1, w.2)).collect();
        // The worst host that was over at the last review too and has a group to give.
        for &(_, from, pool) in &self.worst {
            if !over_before.contains(&(from, pool)) {
                continue;
            }
            if let Some((key, to)) = self.move_from(from, pool) {
                return self.move_group(key, to);
            }
        }
        // No host over its rate bound gave a group: even out how many prompts the hosts
        // hold, so that one homing many does not evict its rarer ones between their
        // visits while another's cache has room.
        if let Some((key, to)) = self.uncrowd() {
            self.move_group(key, to);
        }
    }

    fn move_group(&mut self, key: u64, to: u64) {
        if let Some(g) = self.groups.get_mut(&key) {
            g.home = Some(to);
            g.epoch = next_epoch(&mut self.epochs);
            self.moves += 1;
        }
    }

    /// A rarer group off a host homing more of its pool's groups than the mean by a tenth
    /// and at least one, to the first host of its own order that homes fewer than
    /// the mean and stays within the rate bound with it. The rarer groups (at most the
    /// pool's mean rate per group) are the ones an LRU cache evicts; among them the
    /// lowest key moves, as for rate moves, so that balancers agree. A host over its rate
    /// bound gives none this way.
    fn uncrowd(&self) -> Option<(u64, u64)> {
        // One pass over the groups (the review runs once a second, with up to MAX_GROUPS).
        let mut best: Option<(u64, u64)> = None; // (group, to)
        for (key, g) in &self.groups {
            let Some(from) = g.home else { continue };
            if best.is_some_and(|(k, _)| k <= *key) {
                continue;
            }
            let (total, size, groups) = self.pools[&g.pool];
            let groups = groups as f32;
            let mean_n = groups / f32::from(size.max(1));
            let crowded =
                self.homed(g.pool, from) as f32 > (mean_n * (1.0 + EPSILON)).max(mean_n + 1.0);
            // A host over its rate bound is the rate moves' to relieve (by its hot groups).
            let over = self.worst.iter().any(|w| w.1 == from && w.2 == g.pool);
            if !crowded || over || g.rate > total / groups {
                continue;
            }
            let cap = self.mean(g.pool) * (1.0 + EPSILON);
            let to = g.order[..usize::from(g.hosts)].iter().copied().find(|s| {
                *s != from
                    && (self.homed(g.pool, *s) as f32) < mean_n
                    && self.load(g.pool, *s) + g.rate <= cap
            });
            if let Some(to) = to {
                best = Some((*key, to));
            }
        }
        best
    }

    /// Which group of `pool` leaves host `from`, and where to.
    ///
    /// One that leaves `from` no lighter than the mean (rate ≤ the excess) and is worth a
    /// move (rate ≥ a quarter of the excess), the one with the lowest key among those —
    /// not the largest: workers and boxes see rates that differ by noise, and a choice by
    /// key is the same for all of them (failing those, the largest). It goes to the first
    /// other host of its own order that stays under the bound with it — or, for a group
    /// hotter than the bound allows anywhere, to one under the mean that ends up lighter
    /// than `from` was (it cannot move back: from there its rate is over that host's
    /// excess).
    fn move_from(&self, from: u64, pool: u64) -> Option<(u64, u64)> {
        let mean = self.mean(pool);
        let load = |host: u64| self.load(pool, host);
        let from_load = load(from);
        let excess = from_load - mean;
        let cap = mean * (1.0 + EPSILON);
        let mut best: Option<(bool, f32, u64, u64)> = None; // (worth it, rate, group, to)
        for (key, g) in &self.groups {
            if g.home != Some(from) || g.pool != pool || g.rate > excess {
                continue;
            }
            let worth = g.rate * 4.0 >= excess;
            let better = match best {
                None => true,
                Some((w, rate, k, _)) => match (worth, w) {
                    (true, true) => *key < k,
                    (false, false) => g.rate > rate,
                    (now, _) => now,
                },
            };
            if !better {
                continue;
            }
            let to = g.order[..usize::from(g.hosts)].iter().copied().find(|s| {
                let there = load(*s);
                *s != from
                    && (there + g.rate <= cap || (there < mean && there + g.rate < from_load))
            });
            if let Some(to) = to {
                best = Some((worth, g.rate, *key, to));
            }
        }
        best.map(|(_, _, key, to)| (key, to))
    }

    /// Groups moved to another home since the last call (for the metrics).
    pub fn take_moves(&mut self) -> u64 {
        std::mem::take(&mut self.moves)
    }

    /// A pool's mean rate per host, as of the review under way.
    fn mean(&self, pool: u64) -> f32 {
        let (total, size, _) = self.pools[&pool];
        total / f32::from(size.max(1))
    }

    /// The rate a host of `pool` was sent, as of the review under way.
    fn load(&self, pool: u64, host: u64) -> f32 {
        self.loads.get(&slot(pool, host)).copied().unwrap_or(0.0)
    }

    /// The groups of `pool` a host homes, as of the review under way.
    fn homed(&self, pool: u64, host: u64) -> u32 {
        self.counts.get(&slot(pool, host)).copied().unwrap_or(0)
    }
}

#[path = "balance_hub.rs"]
mod hub;
pub use hub::Hub;

#[cfg(test)]
impl Balancer {
    pub fn set_home(&mut self, key: u64, pool: Pool, home: u64) {
        if let Some(g) = self.groups.get_mut(&group_id(key, pool)) {
            g.home = Some(home);
            g.epoch = next_epoch(&mut self.epochs);
        }
    }

    fn home_in(&self, key: u64, pool: Pool) -> Option<u64> {
        self.groups.get(&group_id(key, pool))?.home
    }

    fn home(&self, key: u64) -> Option<u64> {
        self.home_in(key, four())
    }
}

#[cfg(test)]
fn four() -> Pool {
    Pool::of(1..=4)
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
