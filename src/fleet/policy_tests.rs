//! Routing policies' unit tests: placement, the load bounds, the balancer's homes, and
//! what the affinity index remembers.

use super::*;
use crate::fleet::host::test_host;
use std::sync::Arc;

fn hosts(n: usize) -> Vec<Arc<Host>> {
    (0..n).map(|i| test_host(9000 + i as u16)).collect()
}

fn candidates(h: &[Arc<Host>]) -> Vec<(usize, &Host)> {
    h.iter().enumerate().map(|(i, h)| (i, &**h)).collect()
}

fn first(
    policy: Policy,
    h: &[Arc<Host>],
    keys: &PrefixKeys,
    st: &mut RoutingState,
) -> (usize, Placement) {
    let mut out = Vec::new();
    let p = rank(Instant::now(), policy, &candidates(h), keys, st, &mut out).unwrap();
    assert_eq!(out.len(), h.iter().filter(|h| h.is_up()).count());
    (out[0], p)
}

fn key(text: &str) -> PrefixKeys {
    PrefixKeys::of(text.repeat(200).as_bytes(), true)
}

#[test]
fn same_prefix_same_host_on_any_box() {
    let h = hosts(4);
    let k = key("system prompt A ");
    let (a, p) = first(Policy::Auto, &h, &k, &mut RoutingState::default());
    assert_eq!(p, Placement::Consistent);
    // Another box: fresh state, same hosts (built anew from the same URLs).
    let h2 = hosts(4);
    let (b, _) = first(Policy::Auto, &h2, &k, &mut RoutingState::default());
    assert_eq!(a, b);
}

#[test]
fn prefixes_spread_over_hosts() {
    let h = hosts(4);
    let mut st = RoutingState::default();
    let mut used = std::collections::HashSet::new();
    for i in 0..64 {
        used.insert(first(Policy::Auto, &h, &key(&format!("prompt {i} ")), &mut st).0);
    }
    assert_eq!(used.len(), 4);
}

#[test]
fn a_host_over_its_share_spills_to_the_next_in_order() {
    let h = hosts(4);
    let k = key("hot prompt ");
    let mut st = RoutingState::default();
    let (home, _) = first(Policy::Auto, &h, &k, &mut st);
    let _held: Vec<_> = (0..8).map(|_| h[home].try_acquire().unwrap()).collect();
    let (next, p) = first(Policy::Auto, &h, &k, &mut RoutingState::default());
    assert_ne!(next, home);
    assert_eq!(p, Placement::Spill);
    // Unbounded prefix policy stays home.
    let (stay, _) = first(Policy::Prefix, &h, &k, &mut RoutingState::default());
    assert_eq!(stay, home);
}

#[test]
fn a_remembered_longer_prefix_wins_over_placement() {
    let h = hosts(4);
    let mut st = RoutingState::default();
    let system = "shared system prompt ".repeat(40);
    let turn1 = PrefixKeys::of(
        format!("{system}{}", "turn one ".repeat(200)).as_bytes(),
        true,
    );
    let (home, _) = first(Policy::Auto, &h, &turn1, &mut st);
    // Teach the index that this session's longer prefix lives elsewhere.
    let other = (home + 1) % 4;
    for k in &turn1.all()[1..] {
        let served = Served {
            host: h[other].seed,
            epoch: 0,
        };
        st.affinity.insert(*k, served);
    }
    let turn2 = PrefixKeys::of(
        format!(
            "{system}{}{}",
            "turn one ".repeat(200),
            "turn two ".repeat(100)
        )
        .as_bytes(),
        true,
    );
    let (chosen, p) = first(Policy::Auto, &h, &turn2, &mut st);
    assert_eq!((chosen, p), (other, Placement::PrefixHit));
}

#[test]
fn a_group_goes_to_its_home_and_a_session_apart_from_it_stays_apart() {
    let h = hosts(4);
    let mut st = RoutingState::default();
    let system = "a popular system prompt ".repeat(40);
    let body = |turns: &str| PrefixKeys::of(format!("{system}{turns}").as_bytes(), true);
    let turn1 = body(&"session one, turn one ".repeat(200));
    let (consistent, _) = first(Policy::Auto, &h, &turn1, &mut st);
    // The balancer moved the group elsewhere; the index still remembers the old host
    // for every key of turn one.
    let home = (consistent + 2) % 4;
    let group = turn1.placement().unwrap();
    st.balancer
        .set_home(group, Pool::of(h.iter().map(|h| h.seed)), h[home].seed);
    let other = body(&"another conversation ".repeat(200));
    assert_eq!(
        first(Policy::Auto, &h, &other, &mut st),
        (home, Placement::Rebalanced)
    );
    // What the group's requests left under its old home no longer counts …
    let (again, _) = first(Policy::Auto, &h, &turn1, &mut st);
    assert_eq!(again, home);
    // … but a session whose history was served apart from its group, under its present
    // home, follows its history.
    let apart = (home + 1) % 4;
    let epoch = st.affinity.get(group).unwrap().epoch;
    for k in &turn1.all()[3..] {
        let served = Served {
            host: h[apart].seed,
            epoch,
        };
        st.affinity.insert(*k, served);
    }
    let turn2 = body(&format!(
        "{}{}",
        "session one, turn one ".repeat(200),
        "turn two ".repeat(100)
    ));
    assert_eq!(
        first(Policy::Auto, &h, &turn2, &mut st),
        (apart, Placement::PrefixHit)
    );
    // The unbounded prefix policy has no balancer: it stays where the index says.
    let mut plain = RoutingState::default();
    let (a, _) = first(Policy::Prefix, &h, &other, &mut plain);
    assert_eq!(a, consistent);
}

#[test]
fn a_spill_away_from_home_does_not_take_the_group_along() {
    let h = hosts(4);
    let mut st = RoutingState::default();
    let system = "a busy system prompt ".repeat(40);
    let conv = |i: usize| {
        PrefixKeys::of(
            format!("{system}{}", format!("conversation {i} ").repeat(200)).as_bytes(),
            true,
        )
    };
    let (consistent, _) = first(Policy::Auto, &h, &conv(0), &mut st);
    let home = (consistent + 1) % 4;
    let group = conv(0).placement().unwrap();
    st.balancer
        .set_home(group, Pool::of(h.iter().map(|h| h.seed)), h[home].seed);
    assert_eq!(
        first(Policy::Auto, &h, &conv(1), &mut st),
        (home, Placement::Rebalanced)
    );
    // The home is over its share: this one spills (to the consistent host, first in
    // order) …
    let held: Vec<_> = (0..8).map(|_| h[home].try_acquire().unwrap()).collect();
    let (away, p) = first(Policy::Auto, &h, &conv(2), &mut st);
    assert_ne!(away, home);
    assert_eq!(p, Placement::Spill);
    drop(held);
    // … and the group's next conversation goes home again.
    assert_eq!(
        first(Policy::Auto, &h, &conv(3), &mut st),
        (home, Placement::Rebalanced)
    );
}

#[test]
fn no_prefix_goes_to_the_least_loaded() {
    let h = hosts(3);
    let _a: Vec<_> = (0..3).map(|_| h[0].try_acquire().unwrap()).collect();
    let _b: Vec<_> = (0..2).map(|_| h[2].try_acquire().unwrap()).collect();
    let (chosen, p) = first(
        Policy::Auto,
        &h,
        &PrefixKeys::default(),
        &mut RoutingState::default(),
    );
    assert_eq!((chosen, p), (1, Placement::LeastLoaded));
}

#[test]
fn ejected_hosts_are_left_out_and_none_means_none() {
    let h = hosts(2);
    h[0].record_failure(super::super::host::Failure::Refused);
    let mut st = RoutingState::default();
    for _ in 0..4 {
        assert_eq!(
            first(Policy::RoundRobin, &h, &PrefixKeys::default(), &mut st).0,
            1
        );
    }
    h[1].record_failure(super::super::host::Failure::Refused);
    let mut out = Vec::new();
    assert!(rank(
        Instant::now(),
        Policy::Auto,
        &candidates(&h),
        &key("x"),
        &mut st,
        &mut out
    )
    .is_none());
}

#[test]
fn round_robin_rotates() {
    let h = hosts(3);
    let mut st = RoutingState::default();
    let seen: std::collections::HashSet<_> = (0..3)
        .map(|_| first(Policy::RoundRobin, &h, &PrefixKeys::default(), &mut st).0)
        .collect();
    assert_eq!(seen.len(), 3);
}

#[test]
fn share_cap_allows_slack_at_low_load() {
    assert_eq!(share_cap(0, 4), 5);
    assert_eq!(share_cap(39, 4), 14);
}
