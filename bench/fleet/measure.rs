//! One measurement: a fresh fleet, one system in front of it, one rate's trace sent open
//! loop (warm-up and measurement as one continuous schedule), the hosts' counters read
//! when the measurement starts and when it ends. An optional `chaos` closure runs on its
//! own thread meanwhile (the faults run switches hosts' faults with it).

use super::hosts::{self, Fleet, HostSpec, HostStats};
use super::report::Point;
use super::systems::{self, Env, Running, System, MODEL};
use super::workload::Chat;
use crate::compare::systems::Endpoint;
use crate::load::{self, Kind, LoadArgs};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What every measurement shares.
pub struct Context<'a> {
    pub sim_bin: &'a Path,
    pub env: &'a Env,
    pub hosts: usize,
    pub host_spec: &'a HostSpec,
}

/// How long, how many connections.
#[derive(Debug, Clone)]
pub struct Shape {
    pub duration: f64,
    pub warmup: f64,
    pub connections: usize,
    pub request_timeout: f64,
    pub output_tokens: usize,
}

/// Run on its own thread during the load with the fleet and the instant the measurement
/// starts (after the warm-up).
pub type Chaos<'a> = &'a (dyn Fn(&Mutex<Fleet>, Instant) + Sync);

/// Waits until `r` answers a real request, or fails with why not.
fn wait_ready(sys: System, r: &mut Running) -> Result<(), String> {
    let limit = systems::start_limit(sys);
    let deadline = Instant::now() + limit;
    let ep = Endpoint {
        url: r.url.clone(),
        model: MODEL.into(),
        cacert: None,
    };
    loop {
        if let Some(st) = r.proc.exited() {
            return Err(format!(
                "exited ({st}) while starting: {}",
                r.proc.log_tail(5).replace('\n', " | ")
            ));
        }
        let last = match crate::compare::probe(&ep, None) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "not ready after {} s ({last}) {}",
                limit.as_secs(),
                r.proc.log_tail(5).replace('\n', " | ")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// cubegate's routing counters from its `/metrics`: placements
/// (`cubegate_routing_placements_total`) and group moves
/// (`cubegate_routing_group_moves_total`).
fn routing(metrics: Option<std::net::SocketAddr>) -> (BTreeMap<String, u64>, u64) {
    let Some(Ok((200, text))) = metrics.map(|m| hosts::control(m, "GET", "/metrics")) else {
        return (BTreeMap::new(), 0);
    };
    let placements = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cubegate_routing_placements_total{placement=\"")?;
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect();
    let moves = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("cubegate_routing_group_moves_total ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    (placements, moves)
}

/// Counters of one host over the measurement; `before_kill` = what it counted before it
/// was killed (and restarted from zero).
fn delta(start: Option<HostStats>, end: Option<HostStats>, before_kill: HostStats) -> HostStats {
    let end = end.unwrap_or_default().plus(before_kill);
    start.unwrap_or_default().delta(end)
}

/// Measures `sys` at `rate` on `chats`. Err = the system could not be started (it is then
/// reported failed with this reason); a run where every request failed is an Ok point
/// whose status says so. Also returns the system's version.
pub fn point(
    ctx: &Context,
    sys: System,
    chats: &[Chat],
    rate: f64,
    shape: &Shape,
    chaos: Option<Chaos>,
) -> Result<(Point, String), String> {
    let fleet = Fleet::start(ctx.sim_bin, &ctx.env.dir, ctx.hosts, ctx.host_spec)?;
    let mut running = systems::start(sys, ctx.env, &fleet.addrs())?;
    wait_ready(sys, &mut running)?;
    let controls = fleet.controls();
    let metrics = running.metrics;
    let fleet = Mutex::new(fleet);

    let mut l = LoadArgs::new(&running.url, Kind::ChatStream);
    l.model = Some(MODEL.into());
    l.bodies = Some(Arc::new(chats.iter().map(|c| c.body.clone()).collect()));
    l.rate = Some(rate);
    l.duration = Some(shape.duration);
    l.warmup = shape.warmup;
    l.open_warmup = true;
    l.connections = shape.connections;
    l.threads = 1;
    l.timeout = shape.request_timeout;
    l.request_timeout = shape.request_timeout;

    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(shape.warmup);
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let (summary, start, end) = std::thread::scope(|scope| {
        let snap = scope.spawn(|| {
            std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
            (hosts::snapshot(&controls), routing(metrics))
        });
        if let Some(chaos) = chaos {
            let fleet = &fleet;
            scope.spawn(move || {
                chaos(fleet, measure_from);
                // A host the chaos restarted dies with the thread that started it
                // (PR_SET_PDEATHSIG): this thread lives until the counters are read.
                let _ = finished.recv();
            });
        }
        let summary = load::run(&l);
        let end = (hosts::snapshot(&controls), routing(metrics));
        let _ = done.send(());
        (summary, snap.join().unwrap_or_default(), end)
    });
    let ((start, (placed_before, moved_before)), (end, (placed_after, moved_after))) = (start, end);
    let fleet = fleet.into_inner().unwrap_or_else(|e| e.into_inner());
    let summary = summary.map_err(|e| format!("load: {e}"))?;
    let deltas: Vec<HostStats> = (0..controls.len())
        .map(|i| {
            let before_kill = fleet.hosts[i].counted_before_kill;
            delta(start.get(i).copied().flatten(), end[i], before_kill)
        })
        .collect();
    let mut p = Point::of(rate, &summary, shape.output_tokens, &deltas);
    p.placements = placed_after
        .into_iter()
        .map(|(k, n)| {
            let before = placed_before.get(&k).copied().unwrap_or(0);
            (k, n.saturating_sub(before))
        })
        .collect();
    p.group_moves = moved_after.saturating_sub(moved_before);
    if let Some(st) = running.proc.exited() {
        p.status = format!(
            "failed: exited during the run ({st}): {}",
            running.proc.log_tail(3).replace('\n', " | ")
        );
    }
    let version = running.version.clone();
    drop(running);
    drop(fleet);
    Ok((p, version))
}
