//! The balancer's unit tests: homes, moves, pools, epochs.

use super::*;

/// Hosts 1..=4; each group's consistent order starts at its `first` host.
fn order(first: u64) -> impl Iterator<Item = u64> {
    (0..4).map(move |i| (first - 1 + i) % 4 + 1)
}

/// Feeds `periods` seconds of traffic: group `key` (placed first on `first`) asked
/// `rate` times a second, for each `(key, first, rate)`; returns the homes after each
/// second's review.
fn run(b: &mut Balancer, t0: Instant, from: u32, periods: u32, groups: &[(u64, u64, u32)]) {
    for s in from..from + periods {
        let at = t0 + Duration::from_millis(u64::from(s) * 1000 + 10);
        for &(key, first, rate) in groups {
            for _ in 0..rate {
                b.note(at, key, four(), order(first));
            }
        }
    }
}

fn loads(b: &Balancer, groups: &[(u64, u64, u32)]) -> [u32; 4] {
    let mut l = [0; 4];
    for &(key, _, rate) in groups {
        l[b.home(key).expect("a home") as usize - 1] += rate;
    }
    l
}

#[test]
fn a_new_group_goes_by_hash_until_reviewed() {
    let mut b = Balancer::default();
    let t0 = Instant::now();
    assert_eq!(b.note(t0, 7, four(), order(3)).host, None);
    assert_eq!(
        b.note(t0 + Duration::from_millis(500), 7, four(), order(3))
            .host,
        None
    );
    let home = b.note(t0 + Duration::from_millis(1100), 7, four(), order(3));
    assert_eq!(home.host, Some(3));
    assert_ne!(home.epoch, 0);
}

#[test]
fn an_overloaded_host_sheds_one_group_a_period() {
    // Host 1 draws three groups (40 of 60 requests a second), host 4 none.
    let groups = [(1, 1, 20), (2, 1, 12), (3, 1, 8), (4, 2, 10), (5, 3, 10)];
    let mut b = Balancer::default();
    let t0 = Instant::now();
    run(&mut b, t0, 0, 2, &groups);
    // The first review gives each group its consistent host and moves one at most.
    let off = groups.iter().filter(|g| b.home(g.0) != Some(g.1)).count();
    assert!(off <= 1, "{:?}", loads(&b, &groups));
    assert_eq!(b.take_moves(), off as u64);
    let mut moves = off;
    let mut before = loads(&b, &groups);
    for s in 2..12 {
        run(&mut b, t0, s, 1, &groups);
        let now = loads(&b, &groups);
        let changed = before.iter().zip(&now).filter(|(a, b)| a != b).count();
        assert!(changed == 0 || changed == 2, "{before:?} → {now:?}");
        moves += usize::from(changed > 0);
        assert_eq!(b.take_moves(), u64::from(changed > 0));
        before = now;
    }
    let end = loads(&b, &groups);
    // Mean 15: no host over 1.25 × 15 that could shed a group; each group kept whole.
    assert!(end.iter().all(|l| *l <= 20), "{end:?}");
    assert!((1..=3).contains(&moves), "{moves} moves: {end:?}");
    // Settled: nothing moves any more.
    run(&mut b, t0, 12, 5, &groups);
    assert_eq!(loads(&b, &groups), end);
}

#[test]
fn even_hosts_move_nothing() {
    let groups: Vec<(u64, u64, u32)> = (0..8).map(|k| (k, k % 4 + 1, 10)).collect();
    let mut b = Balancer::default();
    let t0 = Instant::now();
    run(&mut b, t0, 0, 2, &groups);
    let start = loads(&b, &groups);
    run(&mut b, t0, 2, 8, &groups);
    assert_eq!(loads(&b, &groups), start);
    assert_eq!(start, [20; 4]);
}

#[test]
fn a_group_hotter_than_a_fair_share_stays_and_the_rest_leave_its_host() {
    // Group 1 is 60 % of the traffic: it cannot be spread, only left alone on host 1.
    let groups = [(1, 1, 30), (2, 1, 5), (3, 2, 5), (4, 3, 5), (5, 4, 5)];
    let mut b = Balancer::default();
    let t0 = Instant::now();
    run(&mut b, t0, 0, 12, &groups);
    assert_eq!(b.home(1), Some(1));
    assert_ne!(
        b.home(2),
        Some(1),
        "the small group should leave the hot host"
    );
}

#[test]
fn a_group_moves_off_to_an_idle_host_even_when_hotter_than_the_mean() {
    // Two groups on one of four hosts: each alone is 2 × the mean.
    let groups = [(1, 2, 20), (2, 2, 20)];
    let mut b = Balancer::default();
    let t0 = Instant::now();
    run(&mut b, t0, 0, 6, &groups);
    assert_ne!(b.home(1), b.home(2));
}

#[test]
fn pools_count_every_host_not_just_the_order_kept() {
    // Twelve hosts (more than ORDER): three hot groups share host 1.
    let order12 = |first: u64| (0..12).map(move |i| (first - 1 + i) % 12 + 1);
    let mut b = Balancer::default();
    let t0 = Instant::now();
    let groups: Vec<(u64, u64, u32)> = [(1, 1, 20), (2, 1, 20), (3, 1, 20)]
        .into_iter()
        .chain((4..12).map(|k| (k, k - 2, 5)))
        .collect();
    for s in 0..10u64 {
        let at = t0 + Duration::from_millis(s * 1000 + 10);
        for &(key, first, rate) in &groups {
            for _ in 0..rate {
                b.note(at, key, Pool::of(1..=12), order12(first));
            }
        }
    }
    let on_one = groups
        .iter()
        .filter(|g| b.home_in(g.0, Pool::of(1..=12)) == Some(1))
        .count();
    assert_eq!(on_one, 1, "host 1 should keep one of its three hot groups");
}

#[test]
fn a_host_with_nothing_to_give_does_not_stop_the_next() {
    // Host 1's one group is hotter than its excess: it stays, and host 2, also over
    // the bound, sheds instead.
    let groups = [
        (1, 1, 30),
        (2, 2, 10),
        (3, 2, 8),
        (4, 2, 7),
        (5, 3, 3),
        (6, 4, 2),
    ];
    let mut b = Balancer::default();
    run(&mut b, Instant::now(), 0, 8, &groups);
    assert_eq!(b.home(1), Some(1));
    let on_two = [2, 3, 4].iter().filter(|k| b.home(**k) == Some(2)).count();
    assert!(on_two < 3, "host 2 shed nothing: {:?}", loads(&b, &groups));
}

#[test]
fn pools_are_balanced_apart_on_a_shared_host() {
    // A small pool ({1, 2}) on host 1 does not hide the big pool's overload there.
    let mut b = Balancer::default();
    let t0 = Instant::now();
    let small = Pool::of(1..=2);
    for s in 0..8u64 {
        let at = t0 + Duration::from_millis(s * 1000 + 10);
        b.note(at, 99, small, [1, 2].into_iter());
        for &(key, first, rate) in &[(1, 1, 20), (2, 1, 12), (3, 2, 5), (4, 3, 5)] {
            for _ in 0..rate {
                b.note(at, key, four(), order(first));
            }
        }
    }
    assert!(
        b.home(1) != Some(1) || b.home(2) != Some(1),
        "host 1 kept both big groups"
    );
    assert_eq!(b.home_in(99, small), Some(1));
}

#[test]
fn a_home_that_is_down_is_given_up() {
    let mut b = Balancer::default();
    let t0 = Instant::now();
    b.note(t0, 7, four(), order(3));
    let home = b.note(t0 + Duration::from_millis(1100), 7, four(), order(3));
    assert_eq!(home.host, Some(3));
    // Host 3 out of rotation: the order lacks it.
    let without = b.note(
        t0 + Duration::from_millis(1200),
        7,
        four(),
        [4, 1, 2].into_iter(),
    );
    assert_eq!(without.host, None);
    assert_ne!(without.epoch, home.epoch);
    let again = b.note(
        t0 + Duration::from_millis(2300),
        7,
        four(),
        [4, 1, 2].into_iter(),
    );
    assert_eq!(again.host, Some(4));
}

#[test]
fn groups_are_bounded_and_idle_ones_forgotten() {
    let mut b = Balancer::default();
    let t0 = Instant::now();
    for k in 0..MAX_GROUPS as u64 + 10 {
        b.note(t0, k, four(), order(1));
    }
    assert_eq!(b.groups.len(), MAX_GROUPS);
    assert_eq!(b.note(t0, u64::MAX, four(), order(1)), Home::default());
    b.note(t0 + Duration::from_secs(1), 1, four(), order(1));
    assert!(b.home(2).is_some());
    // Twenty seconds without a request: every group but the one asked for is gone.
    for s in 2..22 {
        b.note(t0 + Duration::from_secs(s), 1, four(), order(1));
    }
    assert_eq!(b.groups.len(), 1);
}

#[test]
fn a_host_loaded_by_another_groups_spills_sheds_its_own() {
    // Group 1 (40/s, home 1) spills 15/s onto host 2, whose own groups add 20/s: host 2
    // is sent 35 of 70 (twice the mean), hosts 3 and 4 are sent 5 each. By homes alone
    // host 2 would look within its share and host 1, which cannot give its one group,
    // the only one over.
    let groups = [(1, 1, 40), (2, 2, 10), (3, 2, 10), (4, 3, 5), (5, 4, 5)];
    let mut b = Balancer::default();
    let t0 = Instant::now();
    for s in 0..6u64 {
        let at = t0 + Duration::from_millis(s * 1000 + 10);
        for &(key, first, rate) in &groups {
            for i in 0..rate {
                let home = b.note(at, key, four(), order(first)).host;
                let to = match key == 1 && i < 15 {
                    true => 2,
                    false => home.unwrap_or(first),
                };
                b.served(key, four(), to);
            }
        }
    }
    assert_eq!(b.home(1), Some(1), "the hot group stays");
    let on_two = [2, 3].iter().filter(|k| b.home(**k) == Some(2)).count();
    assert_eq!(
        on_two,
        1,
        "host 2 keeps one group: {:?}",
        loads(&b, &groups)
    );
}

#[test]
fn a_host_homing_many_prompts_gives_a_rare_one_to_one_homing_few() {
    // Host 1 homes six rare groups (1/s each), hosts 2–4 one group each: no host is over
    // its rate bound (mean 7/s), but host 1's cache holds six prompts. One rare group
    // moves to host 4, the only host with room under the rate bound for it.
    let mut groups: Vec<(u64, u64, u32)> = (1..=6).map(|k| (k, 1, 1)).collect();
    groups.extend([(7, 2, 8), (8, 3, 8), (9, 4, 6)]);
    let mut b = Balancer::default();
    run(&mut b, Instant::now(), 0, 6, &groups);
    let on = |host: u64| groups.iter().filter(|g| b.home(g.0) == Some(host)).count();
    assert_eq!((on(1), on(2), on(3), on(4)), (5, 1, 1, 2));
    assert_eq!(b.take_moves(), 1);
}

#[test]
fn the_workers_of_a_box_give_each_group_one_home() {
    // Host 1 draws 40 of 60 requests a second; each group's requests reach two of the
    // four workers (as connections happen to land), so each worker sees another part of
    // the traffic.
    let groups = [(1, 1, 20), (2, 1, 12), (3, 1, 8), (4, 2, 10), (5, 3, 10)];
    let hub = std::sync::Arc::new(Hub::default());
    let mut workers: Vec<Balancer> = (0..4).map(|_| Balancer::with_hub(hub.clone())).collect();
    let t0 = Instant::now();
    let mut moves = 0;
    for s in 0..12u64 {
        let at = t0 + Duration::from_millis(s * 1000 + 10);
        for &(key, first, rate) in &groups {
            for i in 0..rate as usize {
                workers[(key as usize + i % 2) % 4].note(at, key, four(), order(first));
            }
        }
        moves += workers.iter_mut().map(|w| w.take_moves()).sum::<u64>();
    }
    for &(key, ..) in &groups {
        let seen_by = [key as usize % 4, (key as usize + 1) % 4];
        let homes: Vec<_> = seen_by.iter().map(|w| workers[*w].home(key)).collect();
        assert!(
            homes.iter().all(|h| h.is_some() && *h == homes[0]),
            "group {key}: {homes:?}"
        );
    }
    // The box's review is one balancer's: it relieves host 1 as in
    // an_overloaded_host_sheds_one_group_a_period, each move counted once.
    let home = |key: u64| workers[key as usize % 4].home(key).expect("a home");
    let mut end = [0; 4];
    for &(key, _, rate) in &groups {
        end[home(key) as usize - 1] += rate;
    }
    assert!(end.iter().all(|l| *l <= 20), "{end:?}");
    assert!((1..=3).contains(&moves), "{moves} moves: {end:?}");
}
