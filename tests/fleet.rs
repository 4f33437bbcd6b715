//! Fleet routing end to end: the real gateway in front of several simulated GPU hosts
//! (`cubegate-bench backend --control …`), on loopback, under both drivers.
//!
//! What lands where is read from the hosts themselves (the simulators' request counters),
//! from the gateway's access records (`backend`, `placement`), from `/metrics` and from
//! `GET /backends` — never from timings: loads are made by streams the test holds open,
//! and the bounded-load arithmetic of `fleet::policy` then says exactly which hosts may
//! take a request. The one time bound (a hung host's ejection) is generous and says why.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Streams held open by the tests run this long at most (a token every 100 ms).
const SLOW_TOKENS: &[&str] = &["--token-delay-us", "100000"];
const HELD_TOKENS: u32 = 1000;
/// `[health]` of the tests that turn the checks on (see `Fleet::checked`).
const HEALTH_INTERVAL_MS: u64 = 200;
const HEALTH_TIMEOUT_MS: u64 = 1000;

/// A simulated GPU host: the simulator and its control listener.
struct GpuHost {
    sim: Proc,
    control: SocketAddr,
    kind: &'static str,
    model: &'static str,
}

impl GpuHost {
    fn start(kind: &'static str, extra: &[&str]) -> GpuHost {
        let mut args = vec!["--control", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let sim = sim(kind, &args);
        let control = control_addr(&sim);
        let model = if kind == "ollama" {
            OLLAMA_MODEL
        } else {
            VLLM_MODEL
        };
        GpuHost {
            sim,
            control,
            kind,
            model,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.sim.addr)
    }

    fn addr(&self) -> String {
        self.sim.addr.to_string()
    }

    /// The simulator's counters, from its control listener (answered in every fault mode).
    fn stats(&self) -> Value {
        get(self.control, "/stats").json()
    }

    /// Requests the host received (health checks included: only meaningful without them).
    fn requests(&self) -> u64 {
        self.stats()["requests"].as_u64().expect("requests")
    }
}

fn vllm_hosts(n: usize, extra: &[&str]) -> Vec<GpuHost> {
    (0..n).map(|_| GpuHost::start("vllm", extra)).collect()
}

fn request_counts(hosts: &[GpuHost]) -> Vec<u64> {
    hosts.iter().map(GpuHost::requests).collect()
}

/// A gateway configuration: no auth, the domains over the hosts, and the fleet's knobs.
struct Fleet<'a> {
    /// (domain id, routing policy, its hosts)
    domains: Vec<(&'a str, &'a str, Vec<&'a GpuHost>)>,
    max_in_flight: u32,
    queue_s: u64,
    max_queued: usize,
    /// Active health checks (interval_ms, timeout_ms); `None`: off.
    health: Option<(u64, u64)>,
}

impl<'a> Fleet<'a> {
    fn new(domains: Vec<(&'a str, &'a str, Vec<&'a GpuHost>)>) -> Fleet<'a> {
        Fleet {
            domains,
            max_in_flight: 0,
            queue_s: 30,
            max_queued: 4096,
            health: None,
        }
    }

    fn text(&self) -> String {
        let mut s = format!(
            "[auth]\nmode = \"none\"\n\n[timeouts]\nfirst_byte_s = 10\nbetween_chunks_s = 10\nqueue_s = {}\n\n[limits]\nmax_queued = {}\n\n",
            self.queue_s, self.max_queued
        );
        if let Some((interval, timeout)) = self.health {
            s += &format!("[health]\ninterval_ms = {interval}\ntimeout_ms = {timeout}\n\n");
        }
        for (id, routing, hosts) in &self.domains {
            s += &format!("[[domains]]\nid = \"{id}\"\nrouting = \"{routing}\"\n");
            for h in hosts {
                s += &format!(
                    "[[domains.backends]]\nkind = \"{}\"\nurl = \"{}\"\nmodels = [\"{}\"]\nmax_in_flight = {}\n",
                    h.kind,
                    h.url(),
                    h.model,
                    self.max_in_flight
                );
            }
        }
        s
    }

    /// With active health checks every 200 ms, each within 1 s: a hung host is out within
    /// interval + 2 × timeout = 2.2 s by design. The timeout is not shorter so that a
    /// healthy host's check cannot miss it twice in a row on this loaded machine.
    fn checked(mut self) -> Fleet<'a> {
        self.health = Some((HEALTH_INTERVAL_MS, HEALTH_TIMEOUT_MS));
        self
    }

    /// The gateway with one place per host and one worker: the queue is per worker (its
    /// bound is `max_queued` split over the workers), so one worker makes its bound and
    /// its order exact.
    fn one_at_a_time(mut self, driver: &str, max_queued: usize, queue_s: u64) -> Gateway {
        self.max_in_flight = 1;
        self.max_queued = max_queued;
        self.queue_s = queue_s;
        self.start(driver, "workers = 1")
    }

    /// The gateway, with JSON logs (its access records are read back).
    fn start(&self, driver: &str, proxy_extra: &str) -> Gateway {
        gateway_with_env(
            driver,
            proxy_extra,
            &self.text(),
            &[("CUBEGATE_LOG_FORMAT", "json")],
        )
    }
}

/// A system prompt of ~900 bytes that starts with `tag`: requests sharing it share their
/// first 512 body bytes, the gateway's placement key.
fn system_prompt(tag: &str) -> String {
    format!(
        "{tag}: {}",
        "You are a careful assistant for the support team; answer briefly. ".repeat(14)
    )
}

/// A chat body in the OpenAI SDKs' key order (messages first), so requests with the same
/// system prompt agree on their leading bytes whatever follows.
fn chat_with(system: &str, question: &str, stream: bool, max_tokens: u32) -> String {
    format!(
        r#"{{"messages":[{{"role":"system","content":{}}},{{"role":"user","content":{}}}],"model":"{VLLM_MODEL}","stream":{stream},"max_tokens":{max_tokens}}}"#,
        json!(system),
        json!(question)
    )
}

fn chat_path(domain: &str) -> String {
    format!("/proxy/{domain}/v1/chat/completions")
}

/// A chat request with this request id (its access record is found by it).
fn chat(gw: SocketAddr, domain: &str, id: &str, body: &str) -> Response {
    post_with(gw, &chat_path(domain), &[("X-Request-Id", id)], body)
}

/// The same on a thread of its own, for requests that wait in the gateway's queue.
fn chat_in_background(
    gw: SocketAddr,
    domain: &str,
    id: &str,
    body: String,
) -> JoinHandle<Response> {
    let (domain, id) = (domain.to_string(), id.to_string());
    std::thread::spawn(move || chat(gw, &domain, &id, &body))
}

/// Sends a chat request on a new connection; read its answer from the returned reader.
fn start_chat(gw: SocketAddr, domain: &str, id: &str, body: &str) -> Reader {
    let mut r = Reader::new(connect(gw));
    send_chat_on(&mut r, domain, id, body);
    r
}

/// Sends a chat request on a connection already open (pipelined behind what it carries).
fn send_chat_on(r: &mut Reader, domain: &str, id: &str, body: &str) {
    let req = request_bytes(
        "POST",
        &chat_path(domain),
        &[("Content-Type", "application/json"), ("X-Request-Id", id)],
        body.as_bytes(),
    );
    send(&mut r.stream, &req);
}

/// The host a request (`id`, `body`) went to, and the other of two.
fn home_of<'h>(
    gw: &Gateway,
    hosts: &'h [GpuHost],
    id: &str,
    body: &str,
) -> (&'h GpuHost, &'h GpuHost) {
    assert_eq!(hosts.len(), 2);
    let r = chat(gw.addr, "fleet", id, body);
    assert_eq!(r.status, 200, "{}", r.text());
    let home = access_record(gw, id)["backend"].clone();
    let at = hosts.iter().position(|h| home == h.addr()).expect("a host");
    (&hosts[at], &hosts[1 - at])
}

/// Sends `body` as request `id` and expects a whole answer from `host`.
#[track_caller]
fn expect_answer_from(gw: &Gateway, id: &str, body: &str, host: &GpuHost) {
    let r = chat(gw.addr, "fleet", id, body);
    assert_eq!(r.status, 200, "{id}: {}", r.text());
    assert_eq!(r.json()["object"], "chat.completion");
    assert_eq!(access_record(gw, id)["backend"], host.addr(), "{id}");
}

/// Starts a long stream and returns once its head arrived, so the gateway holds a place
/// on its host until the returned reader is dropped (the client leaves, the gateway drops
/// the upstream connection).
fn hold(gw: SocketAddr, domain: &str, id: &str, body: &str) -> Reader {
    let mut r = start_chat(gw, domain, id, body);
    let (status, _) = r.head().expect("a response head");
    assert_eq!(status, 200, "held stream {id}");
    r
}

/// A stream of `tag`'s prefix that lasts until dropped.
fn hold_prefix(gw: SocketAddr, domain: &str, tag: &str, i: usize) -> Reader {
    let body = chat_with(
        &system_prompt(tag),
        &format!("question {i}"),
        true,
        HELD_TOKENS,
    );
    hold(gw, domain, &format!("held-{tag}-{i}"), &body)
}

/// `GET /backends` as the platform admin.
fn backends(gw: SocketAddr, token: &str) -> Vec<Value> {
    let r = api_call(gw, "GET", "/backends", Some(token), None);
    assert_eq!(r.status, 200, "GET /backends: {}", r.text());
    r.json()["backends"].as_array().expect("a list").clone()
}

fn backend_status(gw: SocketAddr, token: &str, host: &GpuHost) -> Value {
    backends(gw, token)
        .into_iter()
        .find(|b| b["url"] == host.url())
        .unwrap_or_else(|| panic!("{} not in GET /backends", host.url()))
}

/// A per-host series of `/metrics`.
fn host_metric(mgmt: SocketAddr, name: &str, host: &GpuHost) -> u64 {
    metric(mgmt, &format!("{name}{{backend=\"{}\"}}", host.url()))
}

fn placements(mgmt: SocketAddr, placement: &str) -> u64 {
    metric(
        mgmt,
        &format!("cubegate_routing_placements_total{{placement=\"{placement}\"}}"),
    )
}

#[track_caller]
fn expect_retry_after(r: &Response) {
    let secs: u32 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {} {}", r.status, r.text()))
        .parse()
        .expect("Retry-After in seconds");
    assert!(secs >= 1);
}

/// 1. Requests sharing a long system prompt all land on one host, whose prefix cache then
///    serves them; requests naming the same `X-Session-Id` land on one host whatever their
///    bodies; and different prefixes do spread (so the first check could fail).
fn same_prefix_same_host(driver: &str) {
    let hosts = vllm_hosts(4, &["--prefix-cache-tokens", "65536"]);
    let gw = Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]).start(driver, "");
    let system = system_prompt("support bot");
    for i in 0..8 {
        let body = chat_with(&system, &format!("question number {i}"), false, 4);
        let r = chat(gw.addr, "fleet", &format!("same-{i}"), &body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let counts = request_counts(&hosts);
    let home = counts.iter().position(|n| *n == 8);
    let home = home.unwrap_or_else(|| panic!("one prefix spread over hosts: {counts:?}"));
    assert_eq!(counts.iter().sum::<u64>(), 8, "{counts:?}");
    let hits = hosts[home].stats()["prefix_cache_hits"].as_u64().unwrap();
    assert!(hits > 0, "the shared prompt was never found cached");
    assert_eq!(placements(management_addr(&gw), "spill"), 0);

    // One session, bodies that share nothing: one host.
    let before = request_counts(&hosts);
    for i in 0..6 {
        let body = chat_with(&system_prompt(&format!("topic {i}")), "hi", false, 2);
        let r = post_with(
            gw.addr,
            &chat_path("fleet"),
            &[("X-Session-Id", "session-42")],
            &body,
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let delta: Vec<u64> = request_counts(&hosts)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    assert!(
        delta.contains(&6),
        "one session spread over hosts: {delta:?}"
    );

    // Different prefixes go to different hosts (16 prefixes all on one of 4 hosts by
    // chance: 4^-15).
    let before = request_counts(&hosts);
    for i in 0..16 {
        let body = chat_with(&system_prompt(&format!("tenant {i}")), "hi", false, 2);
        assert_eq!(chat(gw.addr, "fleet", &format!("t-{i}"), &body).status, 200);
    }
    let used = request_counts(&hosts)
        .iter()
        .zip(&before)
        .filter(|(a, b)| a > b)
        .count();
    assert!(used >= 2, "16 prefixes all on one host");
}

/// 2. A hot prefix whose host is busy spills to the next host of its order (placement
///    `spill`), and only a few hosts share it. Twelve streams of one prefix are held open,
///    one after another: a host takes a request while its load stays under
///    `max(avg × 1.25, avg + 4)`, so the prefix's own host takes the first six, the
///    seventh spills, and the last host of the order would only be reached once the three
///    before it were all over their share, which takes far more than twelve in flight.
fn hot_prefix_spills_to_a_few_hosts(driver: &str) {
    let hosts = vllm_hosts(4, SLOW_TOKENS);
    let gw = Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]).start(driver, "");
    let _held: Vec<Reader> = (0..12)
        .map(|i| hold_prefix(gw.addr, "fleet", "hot", i))
        .collect();
    let counts = request_counts(&hosts);
    assert_eq!(counts.iter().sum::<u64>(), 12, "{counts:?}");
    let used = counts.iter().filter(|n| **n > 0).count();
    assert!(
        (2..=3).contains(&used),
        "a hot prefix should spill over a few hosts, not stay on one or use all: {counts:?}"
    );
    assert!(
        counts.iter().any(|n| *n >= 3),
        "the prefix's own host should take the first three: {counts:?}"
    );
    assert!(placements(management_addr(&gw), "spill") >= 1);
}

/// 3. A new prefix whose consistent host is loaded goes to a light host (placement
///    `spill`), and a request without a prefix (an embedding) goes to the least loaded
///    host. Loads are held through domains that list one host each (a host is one value
///    however many domains name it): A carries 8 streams, B 2, C none.
fn miss_goes_to_a_light_host(driver: &str) {
    let hosts = vllm_hosts(3, SLOW_TOKENS);
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    let gw = Fleet::new(vec![
        ("fleet", "auto", vec![a, b, c]),
        ("pin-a", "auto", vec![a]),
        ("pin-b", "auto", vec![b]),
    ])
    .start(driver, "");
    let _on_a: Vec<Reader> = (0..8)
        .map(|i| hold_prefix(gw.addr, "pin-a", "load a", i))
        .collect();
    let _on_b: Vec<Reader> = (0..2)
        .map(|i| hold_prefix(gw.addr, "pin-b", "load b", i))
        .collect();

    for i in 0..5 {
        let id = format!("embed-{i}");
        let r = post_with(
            gw.addr,
            "/proxy/fleet/v1/embeddings",
            &[("X-Request-Id", &id)],
            &format!(r#"{{"model":"{VLLM_MODEL}","input":"text {i}"}}"#),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = access_record(&gw, &id);
        assert_eq!(rec["placement"], "least_loaded", "{rec}");
        assert_eq!(rec["backend"], c.addr(), "not the least loaded host: {rec}");
    }

    // Fresh prefixes until one whose consistent host is A (a third of them): it must go
    // elsewhere. None may go to A. (40 fresh prefixes none of them A's: (2/3)^40.)
    let mut spilled = None;
    for i in 0..40 {
        let id = format!("fresh-{i}");
        let body = chat_with(&system_prompt(&format!("fresh {i}")), "hi", false, 1);
        let r = chat(gw.addr, "fleet", &id, &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = access_record(&gw, &id);
        assert_ne!(
            rec["backend"],
            a.addr(),
            "a new prefix went to the loaded host"
        );
        match rec["placement"].as_str() {
            Some("consistent") => {}
            Some("spill") => {
                spilled = Some(rec);
                break;
            }
            other => panic!("a new prefix placed as {other:?}"),
        }
    }
    assert!(spilled.is_some(), "no fresh prefix had A as its host");
    assert_eq!(a.requests(), 8, "only the held streams reached A");
}

/// 3b. Two prefixes asked for often whose consistent host is the same: within a few
///     seconds the balancer (it reviews the groups' request rates once a second) moves
///     one of them to another host (placement `rebalanced`), where it then stays whole,
///     while the other keeps its consistent host.
fn rebalance_splits_prefixes_sharing_a_host(driver: &str) {
    let hosts = vllm_hosts(4, &[]);
    let gw = Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]).start(driver, "");
    rebalance_alike(&[&gw]);
}

/// 3c. The same traffic through two gateway processes (nothing shared): both move the
///     same prefix to the same host — the group to move is chosen by its key, not by
///     rates that differ between boxes by noise.
fn two_gateways_rebalance_alike(driver: &str) {
    let hosts = vllm_hosts(4, &[]);
    let fleet = Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]);
    let (one, two) = (fleet.start(driver, ""), fleet.start(driver, ""));
    rebalance_alike(&[&one, &two]);
}

/// Sends the same requests to every gateway of `gws`: fresh prefixes until two share a
/// host, then those two in turn until every gateway moved one; checks that each gateway
/// then sends each prefix to one host, the moved one to the same host everywhere.
fn rebalance_alike(gws: &[&Gateway]) {
    let ask = |system: &str, id: &str| {
        for gw in gws {
            let r = chat(gw.addr, "fleet", id, &chat_with(system, id, false, 1));
            assert_eq!(r.status, 200, "{}", r.text());
        }
    };
    let backend = |gw: &Gateway, id: &str| access_record(gw, id)["backend"].to_string();
    // Fresh prefixes until two share a host (five at most on four hosts).
    let mut first_of: HashMap<String, String> = HashMap::new();
    let mut pair = None;
    for i in 0..5 {
        let (system, id) = (system_prompt(&format!("popular {i}")), format!("find-{i}"));
        ask(&system, &id);
        let host = backend(gws[0], &id);
        for gw in &gws[1..] {
            assert_eq!(backend(gw, &id), host, "a new prefix placed apart");
        }
        if let Some(other) = first_of.insert(host.clone(), system.clone()) {
            pair = Some((other, system, host));
            break;
        }
    }
    let (a, b, shared) = pair.expect("two of five prefixes on one of four hosts");
    let started = Instant::now();
    let mut round = 0;
    while gws
        .iter()
        .any(|gw| placements(management_addr(gw), "rebalanced") == 0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(15) && round < 3000,
            "no rebalance after {round} rounds"
        );
        ask(&a, &format!("a-{round}"));
        ask(&b, &format!("b-{round}"));
        round += 1;
    }
    // Every worker reviews its own groups once a second: give the others time to agree.
    let moved_at = Instant::now();
    while moved_at.elapsed() < Duration::from_millis(2500) {
        ask(&a, &format!("a-{round}"));
        ask(&b, &format!("b-{round}"));
        round += 1;
    }
    for i in round..round + 5 {
        ask(&a, &format!("a-{i}"));
        ask(&b, &format!("b-{i}"));
    }
    let mut moved_to = HashSet::new();
    for gw in gws {
        let moves = metric(management_addr(gw), "cubegate_routing_group_moves_total");
        assert!(moves >= 1, "rebalanced placements but {moves} group moves");
        let (mut on_a, mut on_b) = (HashSet::new(), HashSet::new());
        for i in round..round + 5 {
            on_a.insert(backend(gw, &format!("a-{i}")));
            on_b.insert(backend(gw, &format!("b-{i}")));
        }
        assert_eq!((on_a.len(), on_b.len()), (1, 1), "{on_a:?} {on_b:?}");
        assert_ne!(on_a, on_b, "both prefixes still on one host");
        assert!(on_a.contains(&shared) || on_b.contains(&shared), "{shared}");
        let (moved, to) = match on_a.contains(&shared) {
            true => ("b", on_b),
            false => ("a", on_a),
        };
        let rec = access_record(gw, &format!("{moved}-{}", round + 4));
        assert_eq!(rec["placement"], "rebalanced", "{rec}");
        moved_to.insert((moved, to.into_iter().next().unwrap()));
    }
    assert_eq!(moved_to.len(), 1, "the gateways moved apart: {moved_to:?}");
}

/// 4 (and 9's recovery). Hosts put in `refuse`, `error` and `hang` through the control API
/// are taken out of rotation by the health checks (`GET /backends`: `ejected`, with the
/// reason; `cubegate_backend_up` 0), requests meanwhile go to the healthy one, and once the
/// faults are cleared they come back and take requests again.
fn ejection_and_return(driver: &str) {
    let hosts = vllm_hosts(4, &[]);
    let all: Vec<&GpuHost> = hosts.iter().collect();
    let gw = Fleet::new(vec![
        ("fleet", "auto", all.clone()),
        ("rr", "round_robin", all),
    ])
    .checked()
    .start(driver, "");
    let token = admin_token(gw.addr);
    let mgmt = management_addr(&gw);
    let (refusing, failing, hung, healthy) = (&hosts[0], &hosts[1], &hosts[2], &hosts[3]);
    assert!(backends(gw.addr, &token).iter().all(|b| b["state"] == "up"));

    set_fault(refusing.control, "refuse");
    set_fault(failing.control, "error");
    let hung_at = Instant::now();
    set_fault(hung.control, "hang");
    let faulty = [refusing, failing, hung];
    let mut hung_out = None;
    let all_out = eventually(Duration::from_secs(20), || {
        let list = backends(gw.addr, &token);
        let out = |h: &GpuHost| {
            list.iter()
                .any(|b| b["url"] == h.url() && b["state"] == "ejected")
        };
        if hung_out.is_none() && out(hung) {
            hung_out = Some(hung_at.elapsed());
        }
        faulty.iter().all(|h| out(h))
    });
    assert!(
        all_out,
        "not all faulty hosts ejected: {:?}",
        backends(gw.addr, &token)
    );
    let hung_out = hung_out.expect("the hung host was seen ejected");
    eprintln!("hung host out of rotation after {hung_out:?}");
    // interval + 2 × timeout = 2.2 s by design; the bound is 10 s because this machine's
    // two cores are shared with compilers (it catches "never" and "only by backoff").
    assert!(hung_out < Duration::from_secs(10), "{hung_out:?}");
    for h in faulty {
        let st = backend_status(gw.addr, &token, h);
        // No request was sent: only the health checker can have taken them out.
        assert_eq!(st["ejected_because"], "health_check_failed", "{st}");
        assert_eq!(host_metric(mgmt, "cubegate_backend_up", h), 0);
        assert!(host_metric(mgmt, "cubegate_backend_ejections_total", h) >= 1);
    }
    assert_eq!(backend_status(gw.addr, &token, healthy)["state"], "up");
    assert_eq!(host_metric(mgmt, "cubegate_backend_up", healthy), 1);
    for i in 0..4 {
        let id = format!("during-{i}");
        let body = chat_with(&system_prompt(&format!("during {i}")), "hi", false, 2);
        let r = chat(gw.addr, "fleet", &id, &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(access_record(&gw, &id)["backend"], healthy.addr());
    }

    for h in faulty {
        set_fault(h.control, "none");
    }
    // Back after the first ejection's 1 s backoff and a good check.
    let back = eventually(Duration::from_secs(30), || {
        backends(gw.addr, &token).iter().all(|b| b["state"] == "up")
    });
    assert!(
        back,
        "not back in rotation: {:?}",
        backends(gw.addr, &token)
    );
    for h in &hosts {
        assert_eq!(host_metric(mgmt, "cubegate_backend_up", h), 1);
    }
    // Round robin over the four: any four requests in a row on one worker visit them all,
    // and of eight requests one worker serves at least four.
    let mut served = HashSet::new();
    for i in 0..8 {
        let id = format!("after-{i}");
        let r = chat(gw.addr, "rr", &id, &chat_body(VLLM_MODEL, false, ""));
        assert_eq!(r.status, 200, "{}", r.text());
        served.insert(
            access_record(&gw, &id)["backend"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for h in faulty {
        assert!(
            served.contains(&h.addr()),
            "{} never served again",
            h.addr()
        );
    }
}

/// 5. A host that fails before the first byte — answering 503 (`error`) or refusing — is
///    retried on another host and the client gets a 200 (`cubegate_backend_retries_total`
///    counts it); a host that dies mid-stream (`die-mid-stream`) cuts the client's stream,
///    which is not retried once bytes were sent.
fn retry_before_first_byte_not_after(driver: &str) {
    let hosts = vllm_hosts(2, &[]);
    let gw = Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]).start(driver, "");
    let mgmt = management_addr(&gw);
    let system = system_prompt("retry");
    let whole = chat_with(&system, "question", false, 4);
    let (x, y) = home_of(&gw, &hosts, "find-home", &whole);

    set_fault(x.control, "error");
    expect_answer_from(&gw, "after-503", &whole, y);
    assert_eq!(x.stats()["by_status"]["503"], 1, "x was tried first");
    assert_eq!(y.requests(), 1);
    assert_eq!(host_metric(mgmt, "cubegate_backend_retries_total", x), 1);

    set_fault(x.control, "die-mid-stream");
    let streamed = chat_with(&system, "question", true, 16);
    let mut reader = start_chat(gw.addr, "fleet", "cut", &streamed);
    let cut = reader.response().expect("a response head");
    assert_eq!(cut.status, 200);
    assert!(
        !cut.chunks.is_empty(),
        "the first events reached the client"
    );
    assert!(!cut.complete, "a cut stream must not look complete");
    assert!(reader.closed());
    assert_eq!(x.stats()["streams_died"], 1);
    assert_eq!(y.requests(), 1, "retried after bytes were sent");
    assert_eq!(host_metric(mgmt, "cubegate_backend_retries_total", x), 1);

    set_fault(x.control, "refuse");
    expect_answer_from(&gw, "after-refusal", &whole, y);
    assert_eq!(y.requests(), 2);
    assert_eq!(host_metric(mgmt, "cubegate_backend_retries_total", x), 2);
}

/// 5 (hang). A request awaiting the first byte of a host that hangs moves to another
///    host once the health checks take the hung one out: nothing had reached the client.
fn hung_host_request_moves_on(driver: &str) {
    let hosts = vllm_hosts(2, &[]);
    let gw = Fleet::new(vec![("fleet", "auto", hosts.iter().collect())])
        .checked()
        .start(driver, "");
    let mgmt = management_addr(&gw);
    let body = chat_with(&system_prompt("hangs"), "question", false, 4);
    let (x, y) = home_of(&gw, &hosts, "find-home", &body);

    set_fault(x.control, "hang");
    // x stays in rotation until two checks in a row have timed out (1 s each), so this
    // request, sent at once, is placed there and waits.
    expect_answer_from(&gw, "stuck", &body, y);
    assert_eq!(host_metric(mgmt, "cubegate_backend_retries_total", x), 1);
    assert_eq!(host_metric(mgmt, "cubegate_backend_up", x), 0);
}

/// 6. `max_in_flight = 1` on the only host: extra requests wait in the queue and succeed
///    when the place frees; beyond `max_queued` → 429 `queue_full`; past `queue_s` → 503
///    `queue_timeout`; both with `Retry-After`.
fn queue_bound_and_timeout(driver: &str) {
    let hosts = vllm_hosts(1, SLOW_TOKENS);
    let gw =
        Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]).one_at_a_time(driver, 2, 60);
    let token = admin_token(gw.addr);
    let quick = || chat_with(&system_prompt("queued"), "hi", false, 1);

    let held = hold_prefix(gw.addr, "fleet", "busy", 0);
    let waiting: Vec<JoinHandle<Response>> = (0..2)
        .map(|i| chat_in_background(gw.addr, "fleet", &format!("wait-{i}"), quick()))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || backend_status(
            gw.addr, &token, &hosts[0]
        )["queued"]
            == 2),
        "two requests should be waiting"
    );
    let full = chat(gw.addr, "fleet", "one-too-many", &quick());
    assert_eq!(full.status, 429, "{}", full.text());
    assert_eq!(full.error_code(), "queue_full");
    expect_retry_after(&full);
    assert_eq!(
        hosts[0].requests(),
        1,
        "only the held stream reached the host"
    );
    drop(held);
    for w in waiting {
        let r = w.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(hosts[0].requests(), 3);
    let idle = eventually(Duration::from_secs(10), || {
        let st = backend_status(gw.addr, &token, &hosts[0]);
        st["queued"] == 0 && st["in_flight"] == 0
    });
    assert!(idle, "{}", backend_status(gw.addr, &token, &hosts[0]));
    drop(gw);

    // The same with a 1 s queue_s: a request that waits longer is refused.
    let gw =
        Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]).one_at_a_time(driver, 4096, 1);
    let _held = hold_prefix(gw.addr, "fleet", "busy", 1);
    let late = chat(gw.addr, "fleet", "too-late", &quick());
    assert_eq!(late.status, 503, "{}", late.text());
    assert_eq!(late.error_code(), "queue_timeout");
    expect_retry_after(&late);
}

/// 6 (leaving). A client that goes away while its request waits in the queue takes it out
///    at once: its place in the queue goes to the next request, and the host never sees
///    the request of a client that left.
fn leaving_client_leaves_the_queue(driver: &str) {
    let hosts = vllm_hosts(1, SLOW_TOKENS);
    let gw =
        Fleet::new(vec![("fleet", "auto", hosts.iter().collect())]).one_at_a_time(driver, 1, 60);
    let token = admin_token(gw.addr);
    let queued = || backend_status(gw.addr, &token, &hosts[0])["queued"].clone();
    let quick = || chat_with(&system_prompt("queued"), "hi", false, 1);

    let held = hold_prefix(gw.addr, "fleet", "busy", 0);
    let leaving = start_chat(gw.addr, "fleet", "leaving", &quick());
    assert!(eventually(Duration::from_secs(20), || queued() == 1));
    drop(leaving);
    assert!(
        eventually(Duration::from_secs(10), || queued() == 0),
        "a request whose client left still waits: {}",
        backend_status(gw.addr, &token, &hosts[0])
    );
    // Its place is free for the next one (max_queued = 1).
    let next = chat_in_background(gw.addr, "fleet", "next", quick());
    assert!(eventually(Duration::from_secs(20), || queued() == 1));
    drop(held);
    let r = next.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        hosts[0].requests(),
        2,
        "the held stream and the next request only"
    );

    // A client that sends its next request while the first waits is alive: both are
    // answered, in order (the watch keeps the bytes it read).
    let held = hold_prefix(gw.addr, "fleet", "busy", 1);
    let mut client = start_chat(gw.addr, "fleet", "first", &quick());
    assert!(eventually(Duration::from_secs(20), || queued() == 1));
    send_chat_on(&mut client, "fleet", "second", &quick());
    // Give the watch a chance to read the second request while the first waits.
    std::thread::sleep(Duration::from_millis(200));
    drop(held);
    for id in ["first", "second"] {
        let r = client.response().expect("an answer");
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.header("x-request-id"), Some(id));
    }
}

/// 7. Two domains share one host with `max_in_flight = 1`. Domain A fills the queue with
///    ten requests, then domain B sends one: B's is served before most of A's backlog.
///    Order of completion is the order of the access records (one worker writes them, one
///    request at a time on the host).
fn fair_across_domains(driver: &str) {
    let hosts = vllm_hosts(1, SLOW_TOKENS);
    let shared = vec![&hosts[0]];
    let gw = Fleet::new(vec![
        ("dom-a", "auto", shared.clone()),
        ("dom-b", "auto", shared),
    ])
    .one_at_a_time(driver, 4096, 60);
    let token = admin_token(gw.addr);
    let queued = || backend_status(gw.addr, &token, &hosts[0])["queued"].clone();
    let quick = |tag: &str| chat_with(&system_prompt(tag), "hi", false, 1);

    let held = hold_prefix(gw.addr, "dom-a", "first", 0);
    let mut clients: Vec<JoinHandle<Response>> = (0..10)
        .map(|i| chat_in_background(gw.addr, "dom-a", &format!("a-{i}"), quick("a")))
        .collect();
    assert!(eventually(Duration::from_secs(20), || queued() == 10));
    clients.push(chat_in_background(gw.addr, "dom-b", "b-0", quick("b")));
    assert!(eventually(Duration::from_secs(20), || queued() == 11));
    drop(held);
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for id in (0..10).map(|i| format!("a-{i}")).chain(["b-0".to_string()]) {
        access_record(&gw, &id);
    }
    let order: Vec<String> = gw
        .log()
        .lines()
        .filter(|l| l.contains("cubegate::access"))
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            let id = v["fields"]["request_id"].as_str()?.to_string();
            (id.starts_with("a-") || id.starts_with("b-")).then_some(id)
        })
        .collect();
    assert_eq!(order.len(), 11, "{order:?}");
    eprintln!("completion order: {order:?}");
    let b_at = order.iter().position(|id| id == "b-0").unwrap();
    assert!(
        b_at <= 2,
        "B waited behind {b_at} of A's 10 queued requests: {order:?}"
    );
}

/// 8. Two gateway processes (same configuration, separate stores, nothing shared) send
///    each prefix to the same host; and each sees what the other has in flight on a host
///    through the host's published figures (vLLM's `/metrics`, scraped by the health
///    checks), so a prefix whose host the other box keeps busy spills here too.
fn two_gateways_agree(driver: &str) {
    let hosts = vllm_hosts(4, SLOW_TOKENS);
    let pins: Vec<String> = (0..hosts.len()).map(|i| format!("pin-{i}")).collect();
    let mut domains = vec![("fleet", "auto", hosts.iter().collect())];
    domains.extend(
        pins.iter()
            .zip(&hosts)
            .map(|(p, h)| (p.as_str(), "auto", vec![h])),
    );
    let fleet = Fleet::new(domains).checked();
    let one = fleet.start(driver, "");
    let two = fleet.start(driver, "");
    let mut used = HashSet::new();
    for i in 0..10 {
        let body = chat_with(&system_prompt(&format!("agree {i}")), "hi", false, 2);
        let mut seen = Vec::new();
        for (gw, name) in [(&one, "one"), (&two, "two")] {
            let id = format!("{name}-{i}");
            assert_eq!(chat(gw.addr, "fleet", &id, &body).status, 200);
            seen.push(access_record(gw, &id)["backend"].clone());
        }
        assert_eq!(seen[0], seen[1], "prefix {i} placed apart");
        used.insert(seen[0].to_string());
    }
    // Ten prefixes all on one of four hosts by chance: 4^-9.
    assert!(used.len() >= 2, "every prefix on one host: {used:?}");

    let body = chat_with(&system_prompt("busy elsewhere"), "hi", false, 2);
    assert_eq!(chat(two.addr, "fleet", "home", &body).status, 200);
    let home = access_record(&two, "home")["backend"].clone();
    let h = hosts.iter().position(|h| home == h.addr()).expect("a host");
    // The first box keeps that host busy; the second has nothing in flight there.
    let _held: Vec<Reader> = (0..8)
        .map(|i| hold_prefix(one.addr, &pins[h], "elsewhere", i))
        .collect();
    let token = admin_token(two.addr);
    let seen = eventually(Duration::from_secs(20), || {
        backend_status(two.addr, &token, &hosts[h])["load"] == 8
    });
    assert!(seen, "{}", backend_status(two.addr, &token, &hosts[h]));
    let st = backend_status(two.addr, &token, &hosts[h]);
    assert_eq!(st["in_flight"], 0, "{st}");
    assert_eq!(st["published"]["running"], 8, "{st}");
    assert_eq!(chat(two.addr, "fleet", "moved", &body).status, 200);
    let rec = access_record(&two, "moved");
    assert_eq!(rec["placement"], "spill", "{rec}");
    assert_ne!(rec["backend"], home, "{rec}");
}

/// 9. No host in rotation → 503 `no_healthy_backend` with `Retry-After`; one host back →
///    served again.
fn no_healthy_host_is_503(driver: &str) {
    let hosts = vllm_hosts(2, &[]);
    let gw = Fleet::new(vec![("fleet", "auto", hosts.iter().collect())])
        .checked()
        .start(driver, "");
    let mgmt = management_addr(&gw);
    for h in &hosts {
        set_fault(h.control, "refuse");
    }
    assert!(eventually(Duration::from_secs(20), || hosts
        .iter()
        .all(|h| host_metric(mgmt, "cubegate_backend_up", h) == 0)));
    let body = chat_body(VLLM_MODEL, false, "");
    let r = chat(gw.addr, "fleet", "none-up", &body);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "no_healthy_backend");
    expect_retry_after(&r);
    set_fault(hosts[1].control, "none");
    assert!(
        eventually(Duration::from_secs(30), || chat(
            gw.addr, "fleet", "again", &body
        )
        .status
            == 200),
        "not served again once a host was back"
    );
}

/// 10. `GET /backends` (platform admin, on the public port and the management listener)
///     lists every host with its state, in flight, queued, load and models; other users
///     get 403 and callers without a token 401.
fn backends_listing(driver: &str) {
    let vllm = GpuHost::start("vllm", SLOW_TOKENS);
    let ollama = GpuHost::start("ollama", &[]);
    let mut fleet = Fleet::new(vec![("fleet", "auto", vec![&vllm, &ollama])]).checked();
    fleet.max_in_flight = 4;
    let gw = fleet.start(driver, "");
    let token = admin_token(gw.addr);
    let _held = hold_prefix(gw.addr, "fleet", "listed", 0);
    // vLLM publishes its load (scraped with the health checks); Ollama publishes none.
    let scraped = eventually(Duration::from_secs(20), || {
        backend_status(gw.addr, &token, &vllm)["published"]["running"] == 1
    });
    assert!(scraped, "{}", backend_status(gw.addr, &token, &vllm));
    assert!(backend_status(gw.addr, &token, &ollama)["published"].is_null());

    for at in [gw.addr, management_addr(&gw)] {
        let list = backends(at, &token);
        assert_eq!(list.len(), 2, "{list:?}");
        for (host, in_flight) in [(&vllm, 1), (&ollama, 0)] {
            let b = list
                .iter()
                .find(|b| b["url"] == host.url())
                .expect("listed");
            assert_eq!(b["kind"], host.kind, "{b}");
            assert_eq!(b["state"], "up", "{b}");
            assert_eq!(b["in_flight"], in_flight, "{b}");
            assert_eq!(b["max_in_flight"], 4, "{b}");
            assert_eq!(b["queued"], 0, "{b}");
            assert!(b["load"].as_u64().expect("load") >= in_flight, "{b}");
            assert_eq!(b["models"], json!([host.model]), "{b}");
        }
    }

    let created = api_call(
        gw.addr,
        "POST",
        "/users",
        Some(&token),
        Some(json!({"email": "dev@example.com", "password": "a long passphrase 42"})),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let user = login(gw.addr, "dev@example.com", "a long passphrase 42");
    let user = user.json()["access_token"].as_str().unwrap().to_string();
    let r = api_call(gw.addr, "GET", "/backends", Some(&user), None);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "forbidden");
    assert_eq!(
        api_call(gw.addr, "GET", "/backends", None, None).status,
        401
    );
}

for_each_driver!(
    same_prefix_same_host,
    hot_prefix_spills_to_a_few_hosts,
    miss_goes_to_a_light_host,
    rebalance_splits_prefixes_sharing_a_host,
    two_gateways_rebalance_alike,
    ejection_and_return,
    retry_before_first_byte_not_after,
    hung_host_request_moves_on,
    queue_bound_and_timeout,
    leaving_client_leaves_the_queue,
    fair_across_domains,
    two_gateways_agree,
    no_healthy_host_is_503,
    backends_listing,
);
