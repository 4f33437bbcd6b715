//! Limits over a fleet of boxes (`[fleet]`, issue 14): several cubegate processes on one
//! real Redis (loopback, `common::services`) enforce a domain's limit together — N a
//! minute over three boxes, not 3N; with Redis stopped each box keeps answering and lets
//! through its share (the limit over the boxes last seen), says so once in its log and in
//! `cubegate_fleet_redis_up`, and shares again when Redis is back (each box writes its use
//! again: nothing forgotten when Redis lost its data, nothing counted twice when it kept
//! it); a concurrency limit is counted over the boxes, token reservations settle over
//! them; failed logins spread over two boxes lock the account on both.

mod common;

use common::services::Redis;
use common::*;
use std::time::{Duration, Instant};

const D: &str = "3f8a1c2e-0000-4000-8000-0000000000f1";

/// `n` gateways on one Redis, each with domain `D` on `host` and `limits`.
fn fleet(driver: &str, redis: &Redis, n: usize, host: &Proc, limits: &str) -> Vec<Gateway> {
    let domains = domains_config(&[(D, &[("vllm", host.addr, &[VLLM_MODEL])])]);
    let body = format!(
        "{domains}{limits}\n[fleet]\nredis_url_env = \"CUBEGATE_REDIS_URL\"\nsync_ms = 100\n"
    );
    let url = redis.url();
    let gateways: Vec<Gateway> = (0..n)
        .map(|_| gateway_env(driver, &body, &[("CUBEGATE_REDIS_URL", &url)]))
        .collect();
    for gw in &gateways {
        let mgmt = management_addr(gw);
        assert!(
            eventually(Duration::from_secs(15), || metric(
                mgmt,
                "cubegate_fleet_boxes"
            ) == n as u64),
            "a box did not see the {n} boxes:\n{}",
            gw.log()
        );
    }
    gateways
}

fn chat(addr: std::net::SocketAddr) -> Response {
    post_with(
        addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[("Content-Type", "application/json")],
        &chat_body(VLLM_MODEL, false, ""),
    )
}

fn unix_minute() -> u64 {
    unix_in(0) / 60
}

/// Waits (bounded) until every box's `cubegate_fleet_redis_up` reads `up`.
fn expect_redis_up(gws: &[Gateway], up: u64) {
    for gw in gws {
        let mgmt = management_addr(gw);
        assert!(
            eventually(Duration::from_secs(10), || metric(
                mgmt,
                "cubegate_fleet_redis_up"
            ) == up),
            "cubegate_fleet_redis_up is not {up}:\n{}",
            gw.log()
        );
    }
}

const PER_MINUTE: &str = "[domains.limits]\nrequests_per_minute = 60\n";

/// Sends `n` chats round-robin over `gws`, each `pace` after the one before began; how
/// many each box let through. Anything but 200, or a 429 naming the limit, fails.
fn round_robin(gws: &[Gateway], n: usize, pace: Duration) -> Vec<u32> {
    let start = Instant::now();
    let mut admitted = vec![0; gws.len()];
    for i in 0..n {
        let b = i % gws.len();
        let r = chat(gws[b].addr);
        match r.status {
            200 => admitted[b] += 1,
            429 => assert!(r.text().contains("60 requests per minute"), "{}", r.text()),
            other => panic!("request {i} to box {b}: {other} {}", r.text()),
        }
        let next = start + pace * (i as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    admitted
}

/// 60 requests a minute over three boxes: 90 requests, round-robin at a steady pace
/// (~80 ms apart, in one minute), let through 60 ± 5 %, where boxes on their own would
/// let all 90 through (30 each).
fn a_domain_limit_holds_over_three_boxes(driver: &str) {
    let Some(redis) = Redis::start() else { return };
    let host = sim("vllm", &["--tokens", "2"]);
    let gws = fleet(driver, &redis, 3, &host, PER_MINUTE);
    same_minute(12);
    let minute = unix_minute();
    let admitted = round_robin(&gws, 90, Duration::from_millis(80));
    assert_eq!(unix_minute(), minute, "the run crossed a minute");
    let total: u32 = admitted.iter().sum();
    eprintln!("{driver}: 60 requests/min over 3 boxes admitted {total} of 90 {admitted:?}");
    assert!(
        (57..=63).contains(&total),
        "admitted {total} {admitted:?}, not 60 ± 5 %"
    );
    let refused: u64 = gws
        .iter()
        .map(|gw| {
            metric(
                management_addr(gw),
                &format!("cubegate_limit_rejections_total{{domain=\"{D}\",scope=\"domain\",limit=\"requests_per_minute\"}}"),
            )
        })
        .sum();
    assert_eq!(refused, 90 - u64::from(total));
}

/// Redis stopped mid-run: every request is still answered (200 or 429, never a 5xx), each
/// box letting through its share of the minute (60 / 3 boxes = 20, the 5 it had let
/// through before included); the gauge reads 0 and the log says so once. Redis back
/// (empty): the gauge reads 1, and the boxes, having written their use again, know that
/// the minute's 60 are spent.
fn redis_down_each_box_takes_its_share(driver: &str) {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let host = sim("vllm", &["--tokens", "2"]);
    let gws = fleet(driver, &redis, 3, &host, PER_MINUTE);
    same_minute(30);
    let minute = unix_minute();
    assert_eq!(round_robin(&gws, 15, Duration::ZERO), [5, 5, 5]);
    redis.stop();
    expect_redis_up(&gws, 0);
    for gw in &gws {
        expect_log(gw, "fleet: Redis unreachable", Duration::from_secs(5));
    }
    assert_eq!(
        round_robin(&gws, 75, Duration::ZERO),
        [15, 15, 15],
        "each box's share is 20 a minute"
    );
    redis.run();
    expect_redis_up(&gws, 1);
    for gw in &gws {
        expect_log(gw, "fleet: Redis is back", Duration::from_secs(5));
        let log = gw.log();
        assert_eq!(
            log.matches("fleet: Redis unreachable").count(),
            1,
            "said once:\n{log}"
        );
    }
    // A few rounds for every box to resend its use and learn the others'.
    std::thread::sleep(Duration::from_secs(1));
    for gw in &gws {
        let r = chat(gw.addr);
        assert_eq!(r.status, 429, "the fleet's 60 are spent: {}", r.text());
    }
    assert_eq!(unix_minute(), minute, "the run crossed a minute");
}

/// Redis restarted cleanly with its data (Debian's default: an RDB snapshot written on
/// SIGTERM and read back): its `run_id` changes but the minute's use is still there, so the
/// boxes must not add their whole use to it again. 30 of 60 spent before, 30 more pass
/// after, and then the 60 are spent.
fn a_redis_restarted_with_its_data_counts_nothing_twice(driver: &str) {
    let Some(mut redis) = Redis::start_persistent() else {
        return;
    };
    let host = sim("vllm", &["--tokens", "2"]);
    let gws = fleet(driver, &redis, 3, &host, PER_MINUTE);
    same_minute(30);
    let minute = unix_minute();
    assert_eq!(round_robin(&gws, 30, Duration::ZERO), [10, 10, 10]);
    // A few rounds, so every box's use is in Redis before it stops.
    std::thread::sleep(Duration::from_millis(500));
    redis.restart_cleanly();
    expect_redis_up(&gws, 1);
    std::thread::sleep(Duration::from_secs(1));
    let after = round_robin(&gws, 30, Duration::from_millis(20));
    assert_eq!(
        after.iter().sum::<u32>(),
        30,
        "30 of the minute's 60 are left after the restart, not fewer: {after:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    for gw in &gws {
        assert_eq!(chat(gw.addr).status, 429, "the fleet's 60 are spent");
    }
    assert_eq!(unix_minute(), minute, "the run crossed a minute");
}

/// Redis losing the counts without restarting (keys evicted under memory pressure, a
/// FLUSHALL): each box finds its own field missing from what it reads back and writes its
/// use again, so the minute's use is not forgotten. One box spends 30 of 60 and goes
/// quiet; after the loss the other two let through the 30 left (within one round's
/// delay), not 60.
fn counts_lost_in_a_running_redis_are_written_again(driver: &str) {
    let Some(redis) = Redis::start() else { return };
    let host = sim("vllm", &["--tokens", "2"]);
    let gws = fleet(driver, &redis, 3, &host, PER_MINUTE);
    same_minute(30);
    let minute = unix_minute();
    assert_eq!(round_robin(&gws[..1], 30, Duration::ZERO), [30]);
    std::thread::sleep(Duration::from_millis(500));
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("FLUSHALL").exec(&mut conn).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = round_robin(&gws[1..], 60, Duration::from_millis(50));
    let total = after.iter().sum::<u32>();
    // 60 ± 5 % in all: what one round's delay lets through beyond the 30 left.
    assert!(
        (30..=33).contains(&total),
        "the 30 left of the minute's 60 pass, not {total}: {after:?}"
    );
    assert_eq!(unix_minute(), minute, "the run crossed a minute");
}

/// A concurrency limit of 1 over two boxes: while a stream holds the slot on one box, the
/// other refuses once it has heard of it (a round later), and admits again when it ends.
/// (A box hears of a scope's use elsewhere only once it has served the scope itself: the
/// second box serves one request first.)
fn concurrency_is_counted_over_the_fleet(driver: &str) {
    let Some(redis) = Redis::start() else { return };
    let host = sim("vllm", &["--tokens", "30", "--token-delay-us", "50000"]);
    let gws = fleet(
        driver,
        &redis,
        2,
        &host,
        "[domains.limits]\nconcurrent = 1\n",
    );
    let first = post_with(
        gws[1].addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[("Content-Type", "application/json")],
        &chat_body(VLLM_MODEL, false, ",\"max_tokens\":1"),
    );
    assert_eq!(first.status, 200, "{}", first.text());
    let mut stream = send_chat(
        gws[0].addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        VLLM_MODEL,
        true,
    );
    assert_eq!(stream.head().unwrap().0, 200);
    std::thread::sleep(Duration::from_millis(500));
    let refused = chat(gws[1].addr);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.text().contains("concurrent"), "{}", refused.text());
    while let Some(Some(_)) = stream.chunk() {}
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || chat(gws[1].addr).status == 200),
        "the other box never heard the slot was free"
    );
}

/// Tokens per minute over two boxes: each request reserves ~1,030 tokens and settles to
/// the 18 its answer used, and the settlement reaches the other box (the box's use written
/// lower), so about 200 / 18 answers pass in all — as on one box — where reservations left
/// standing in Redis would stop the second.
fn token_settlements_reach_the_other_boxes(driver: &str) {
    let Some(redis) = Redis::start() else { return };
    // Answers of 300 ms, so the reservations reach Redis before they are settled.
    let host = sim("vllm", &["--tokens", "10", "--token-delay-us", "30000"]);
    let gws = fleet(
        driver,
        &redis,
        2,
        &host,
        "[domains.limits]\ntokens_per_minute = 200\n",
    );
    same_minute(15);
    let mut ok = 0;
    for i in 0..30 {
        let r = chat(gws[i % 2].addr);
        if r.status != 200 {
            assert_eq!(r.status, 429, "{}", r.text());
            assert!(r.text().contains("200 tokens per minute"), "{}", r.text());
            break;
        }
        ok += 1;
        // A few rounds, so the other box has heard of the settlement.
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!((10..=12).contains(&ok), "{ok} answers of 18 tokens in 200");
}

/// Five failed logins, three on one box and two on the other (neither reaches five on its
/// own), lock the account on both, the right password included.
fn failed_logins_lock_the_account_on_every_box(driver: &str) {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    let body = "[fleet]\nsync_ms = 100\n";
    let gws: Vec<Gateway> = (0..2)
        .map(|_| gateway_env(driver, body, &[("CUBEGATE_REDIS_URL", &url)]))
        .collect();
    expect_redis_up(&gws, 1);
    let mgmt: Vec<_> = gws.iter().map(management_addr).collect();
    for i in 0..4 {
        let r = login(mgmt[i % 2], TEST_ADMIN_EMAIL, "not the password");
        assert_eq!(r.status, 401, "failure {}: {}", i + 1, r.text());
    }
    let fifth = login(mgmt[0], TEST_ADMIN_EMAIL, "not the password");
    assert_eq!(fifth.status, 429, "{}", fifth.text());
    for m in &mgmt {
        let r = login(*m, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.error_code(), "too_many_attempts");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
    }
}

/// A scope's counters let go of (idle, pruned once a minute by each worker) between two
/// exchanges: the request that ended just before is still written in Redis as in flight
/// on this box. Its field must go with the counters, or every other box keeps counting
/// that request (its concurrency limit refusing) for as long as any box uses the scope.
#[test]
fn a_scope_let_go_of_leaves_no_request_in_flight_behind() {
    use cubegate::internals::usage::fleet::{Exchange, Fleet};
    use cubegate::internals::usage::limiter::{counters, prune, Scope};
    let Some(redis) = Redis::start() else { return };
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let now_ms = || unix_in(0) * 1000;
    let mut exchange = Exchange::new("box-a".into(), 5_000);
    let scope = Scope::Domain("let-go-of");
    let key = "cubegate:inflight:d:let-go-of";
    let in_flight = |conn: &mut redis::Connection| -> Option<u32> {
        redis::cmd("HGET")
            .arg(key)
            .arg("box-a")
            .query(conn)
            .unwrap()
    };
    let slot = counters(&scope);
    assert!(slot.enter(1, Fleet::Shared));
    exchange.round(&mut conn, now_ms()).unwrap();
    assert_eq!(in_flight(&mut conn), Some(1));
    // The request ends and the counters go before the next exchange.
    slot.leave();
    drop(slot);
    prune(&mut Default::default());
    exchange.round(&mut conn, now_ms()).unwrap();
    assert_eq!(
        in_flight(&mut conn).unwrap_or(0),
        0,
        "the ended request is still in flight on box-a for the other boxes"
    );
}

for_each_driver!(
    a_domain_limit_holds_over_three_boxes,
    redis_down_each_box_takes_its_share,
    a_redis_restarted_with_its_data_counts_nothing_twice,
    counts_lost_in_a_running_redis_are_written_again,
    concurrency_is_counted_over_the_fleet,
    token_settlements_reach_the_other_boxes,
    failed_logins_lock_the_account_on_every_box,
);
