//! The faults run: the sweep's load at one rate while hosts fail one after another, each
//! fault lasting a quarter of the measurement and then repaired:
//!
//! | when (fraction of the measurement) | what |
//! |---|---|
//! | 0.10 → 0.35 | host 0 killed (SIGKILL: its streams reset, its port closed), then started again with an empty cache |
//! | 0.40 → 0.65 | host 1 hung (`PUT /fault/hang`: connections accepted, nothing answered, streams stall), then released |
//! | 0.70 → 0.95 | host 2 answering 503 (`PUT /fault/error`), then healthy |
//!
//! Clients give up after `--fault-timeout` seconds, so requests stuck on the hung host
//! count as failed. Failed requests are split into those that failed before their first
//! token (refused, 5xx, timed out waiting) and streams cut after it.

use super::hosts::Fleet;
use super::measure::{self, Context, Shape};
use super::report::FaultRun;
use super::systems::System;
use super::workload::Chat;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
enum Action {
    Kill,
    Restart,
    Fault(&'static str),
}

/// (fraction of the measurement, host, action).
const TIMELINE: [(f64, usize, Action); 6] = [
    (0.10, 0, Action::Kill),
    (0.35, 0, Action::Restart),
    (0.40, 1, Action::Fault("hang")),
    (0.65, 1, Action::Fault("none")),
    (0.70, 2, Action::Fault("error")),
    (0.95, 2, Action::Fault("none")),
];

fn describe(at_s: f64, host: usize, a: Action) -> String {
    let what = match a {
        Action::Kill => "killed (SIGKILL)",
        Action::Restart => "restarted (empty cache)",
        Action::Fault("hang") => "hung",
        Action::Fault("error") => "answering 503",
        Action::Fault(_) => "healthy again",
    };
    format!("at {at_s:.1} s host {host} {what}")
}

/// Runs the faults timeline against `sys` at `rate`.
pub fn run(ctx: &Context, sys: System, chats: &[Chat], rate: f64, shape: &Shape) -> FaultRun {
    let n = ctx.hosts.max(1);
    let log = Mutex::new(Vec::new());
    let chaos = |fleet: &Mutex<Fleet>, from: Instant| {
        for (frac, host, action) in TIMELINE {
            let host = host % n;
            let at = from + Duration::from_secs_f64(frac * shape.duration);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
            let res = match action {
                Action::Kill => {
                    f.kill(host);
                    Ok(())
                }
                Action::Restart => f.restart(host),
                Action::Fault(mode) => f.set_fault(host, mode),
            };
            let mut line = describe(frac * shape.duration, host, action);
            if let Err(e) = res {
                line.push_str(&format!(" — failed: {e}"));
            }
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    };
    let res = measure::point(ctx, sys, chats, rate, shape, Some(&chaos));
    let timeline = log.into_inner().unwrap_or_else(|e| e.into_inner());
    match res {
        Ok((p, _)) => FaultRun {
            system: sys.name(),
            status: p.status.clone(),
            point: Some(p),
            timeline,
        },
        Err(e) => FaultRun {
            system: sys.name(),
            status: format!("failed: {e}"),
            point: None,
            timeline,
        },
    }
}
