//! Routing policies: in what order a request tries the hosts that may serve it.
//!
//! `auto` (the default) places a request by its prefix, bounded by load:
//! 1. a host that served a longer prefix of this request lately (the worker's
//!    [`AffinityIndex`]) keeps it — its session history is cached there — unless it is
//!    over its share;
//! 2. otherwise its prefix group goes to its home ([`Balancer`]: the group's consistent
//!    host, unless the balancer moved it to even the hosts' request rates), unless that
//!    host is over its share;
//! 3. otherwise the hosts are put in the prefix's consistent order (rendezvous hashing on
//!    the first prefix key: the same order on every box, nothing shared) and the first one
//!    not over its share takes it. A hot prefix so spills over the next few hosts of its
//!    order, not over all of them, and a new prefix never lands on a host that is already
//!    over its share. A spill does not move the group: its home stays.
//!
//! The index only counts what was served under the group's present home (its epoch), so
//! a moved group is not pulled back by the keys its requests left on the old host.
//!
//! "Over its share" is bounded-load consistent hashing (Mirrokni et al.): a host may take a
//! request while its load stays within `max(avg × (1 + ε), avg + slack)`, where `avg` is the
//! mean load over the hosts that could serve it, counting this request. Load is what this
//! box has in flight there plus what other boxes have there by the host's own figures.
//! `prefix` is the same without the bound, `least_loaded` ignores prefixes, and
//! `round_robin` rotates. A request with no prefix (no body, an embedding) goes to the
//! least loaded host under every policy but `round_robin`. Hosts out of rotation are left
//! out; the order after the first host is where retries and the queue look next.

use super::affinity::{AffinityIndex, Served};
use super::balance::{Balancer, Home, Pool};
use super::host::Host;
use super::prefix::PrefixKeys;
pub use crate::config::Routing as Policy;
use std::time::Instant;

/// A host may exceed the mean load by this factor …
const EPSILON: f32 = 0.25;
/// … or by this many requests, whichever allows more: a GPU batch absorbs a few (4 is a
/// small host's batch; on `cubegate-bench fleet` 2 spilled too early and cost 6 points
/// of prefix-cache hits, 4 lost no TTFT).
const SLACK: f32 = 4.0;

/// How the first host was picked (for the access record and the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// It served a longer prefix of this request lately.
    PrefixHit,
    /// The first host of the prefix's consistent order.
    Consistent,
    /// A later host of the consistent order: the ones before were over their share.
    Spill,
    LeastLoaded,
    RoundRobin,
    /// The prefix group's home, moved off its consistent host to even the hosts' shares
    /// of requests ([`super::balance`]).
    Rebalanced,
}

impl Placement {
    pub const ALL: [Placement; 6] = [
        Placement::PrefixHit,
        Placement::Consistent,
        Placement::Spill,
        Placement::LeastLoaded,
        Placement::RoundRobin,
        Placement::Rebalanced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Placement::PrefixHit => "prefix_hit",
            Placement::Consistent => "consistent",
            Placement::Spill => "spill",
            Placement::LeastLoaded => "least_loaded",
            Placement::RoundRobin => "round_robin",
            Placement::Rebalanced => "rebalanced",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A worker's routing memory.
#[derive(Default)]
pub struct RoutingState {
    pub affinity: AffinityIndex,
    balancer: Balancer,
    rotation: usize,
}

impl RoutingState {
    /// A worker's routing memory whose prefix groups are balanced by the box's `hub`.
    pub fn with_hub(hub: std::sync::Arc<super::balance::Hub>) -> RoutingState {
        RoutingState {
            balancer: Balancer::with_hub(hub),
            ..RoutingState::default()
        }
    }

    /// Prefix groups the balancer moved since the last call.
    pub fn take_moves(&mut self) -> u64 {
        self.balancer.take_moves()
    }
}

/// Orders `candidates` (backend index, host) for one request into `out` (backend indexes,
/// first choice first). `None`: no candidate is in rotation. `now` is when the request
/// arrived (it paces the balancer's once-a-second work).
pub fn rank(
    now: Instant,
    policy: Policy,
    candidates: &[(usize, &Host)],
    keys: &PrefixKeys,
    state: &mut RoutingState,
    out: &mut Vec<usize>,
) -> Option<Placement> {
    out.clear();
    state.rotation = state.rotation.wrapping_add(1);
    let up = || candidates.iter().filter(|(_, h)| h.is_up());
    let n = up().count();
    if n == 0 {
        return None;
    }
    let rotation = state.rotation;
    let rotated = |i: usize| (i + n - rotation % n) % n;
    let placement = match (policy, keys.placement()) {
        (Policy::RoundRobin, _) => {
            let mut hosts: Vec<(usize, usize)> = up()
                .enumerate()
                .map(|(i, (b, _))| (rotated(i), *b))
                .collect();
            hosts.sort_unstable();
            out.extend(hosts.into_iter().map(|(_, b)| b));
            Placement::RoundRobin
        }
        (Policy::LeastLoaded, _) | (_, None) => {
            let mut hosts: Vec<(u32, usize, usize)> = up()
                .enumerate()
                .map(|(i, (b, h))| (h.load(), rotated(i), *b))
                .collect();
            hosts.sort_unstable();
            out.extend(hosts.into_iter().map(|(_, _, b)| b));
            Placement::LeastLoaded
        }
        (Policy::Auto | Policy::Prefix, Some(key)) => {
            let bounded = policy == Policy::Auto;
            let total: u32 = up().map(|(_, h)| h.load()).sum();
            let cap = share_cap(total, n);
            // Taking this request keeps it within the cap.
            let fits = |h: &Host| !bounded || h.load() < cap;
            let mut hosts: Vec<(u64, usize, &Host)> = up()
                .map(|(b, h)| (rendezvous(key, h.seed), *b, *h))
                .collect();
            hosts.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
            let pool = Pool::of(candidates.iter().map(|(_, h)| h.seed));
            let home = match bounded {
                true => {
                    let order = hosts.iter().map(|(_, _, h)| h.seed);
                    state.balancer.note(now, key, pool, order)
                }
                false => Home::default(),
            };
            // With a home, the group's own key places nothing (the group goes home); only
            // what was served under its present home (its epoch) counts.
            let session_keys = match home.host {
                Some(_) => &keys.all()[1..],
                None => keys.all(),
            };
            let remembered = session_keys.iter().rev().find_map(|k| {
                let served = state.affinity.get(*k).filter(|s| s.epoch == home.epoch)?;
                hosts
                    .iter()
                    .position(|(_, _, h)| h.seed == served.host && fits(h))
            });
            let at_home = hosts
                .iter()
                .position(|(_, _, h)| Some(h.seed) == home.host && fits(h));
            let by_home = |at: usize| match at {
                0 => Placement::Consistent,
                _ => Placement::Rebalanced,
            };
            let (first, placement) = match (remembered, at_home) {
                // The group's own host, however it was found.
                (Some(at), Some(h)) if at == h => (at, by_home(at)),
                // A longer prefix (a session's history) served apart from its group.
                (Some(at), _) => (at, Placement::PrefixHit),
                (None, Some(h)) => (h, by_home(h)),
                (None, None) => match hosts.iter().position(|(_, _, h)| fits(h)) {
                    // Away from a home (over its share): a spill, wherever it lands.
                    Some(at) if home.host.is_some() => (at, Placement::Spill),
                    Some(0) => (0, Placement::Consistent),
                    Some(at) => (at, Placement::Spill),
                    None => (0, Placement::Consistent),
                },
            };
            let chosen_seed = hosts[first].2.seed;
            if bounded {
                state.balancer.served(key, pool, chosen_seed);
            }
            let served = Served {
                host: chosen_seed,
                epoch: home.epoch,
            };
            // A spill is not remembered: the prefix's next request tries its home again
            // rather than following this one (the group keeps one host for its cache).
            // The group's own key is written only by a request served at home.
            if placement != Placement::Spill || !bounded {
                let written = match home.host {
                    Some(h) if h != chosen_seed => &keys.all()[1..],
                    _ => keys.all(),
                };
                for k in written {
                    state.affinity.insert(*k, served);
                }
            }
            out.push(hosts[first].1);
            out.extend(
                hosts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != first)
                    .map(|(_, (_, b, _))| *b),
            );
            placement
        }
    };
    Some(placement)
}

/// The most load a host may carry and still take a request: see the module doc.
fn share_cap(total: u32, hosts: usize) -> u32 {
    let avg = (total as f32 + 1.0) / hosts as f32;
    (avg * (1.0 + EPSILON)).max(avg + SLACK).ceil() as u32
}

/// Rendezvous (highest random weight) score of a host for a key.
fn rendezvous(key: u64, seed: u64) -> u64 {
    // splitmix64's finalizer: every input bit moves every output bit.
    let mut z = key ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
