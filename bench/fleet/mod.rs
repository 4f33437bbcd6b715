//! `cubegate-bench fleet`: routing in front of a fleet of simulated GPU hosts — cubegate's
//! policies next to sglang-router, vllm-router, nginx `least_conn` and HAProxy
//! `leastconn` — on a shared-prefix workload, open loop, from light load to past the point
//! where round robin saturates, plus a faults run.
//!
//! For every system and offered rate (`measure.rs`): `--hosts` simulators are started
//! fresh (`hosts.rs`: empty caches, zeroed counters), then the system in front of them
//! (`systems.rs`), probed with one request; the rate's trace (`workload.rs`, the same for
//! every system) is sent open loop by the load generator (`crate::load`: latency from the
//! intended send time, HDR histograms, every SSE event timed) for a warm-up and the
//! measurement; the hosts' counters read at the measurement's start and end give the
//! prefix-cache hit rate and each host's share. Then the faults run (`faults.rs`) at the
//! heaviest rate cubegate `auto` carried without saturating. `report.rs` holds the
//! figures, the acceptance check, `results.json` and the TTFT chart; `markdown.rs` writes
//! the tables.

pub mod faults;
pub mod hosts;
pub mod markdown;
pub mod measure;
pub mod report;
pub mod systems;
pub mod workload;

#[cfg(test)]
mod tests;

use crate::compare::{self, systems::TempDir};
use hosts::HostSpec;
use report::{Ideal, Report, Settings, SystemRuns, Workload};
use std::path::PathBuf;
use std::time::Instant;
use systems::System;

#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// Simulated GPU hosts.
    #[arg(long, default_value_t = 4)]
    pub hosts: usize,
    /// Seconds measured per system and rate (after --warmup).
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Directory for results.md, results.json and ttft_p99.svg
    /// [default: bench/results/fleet-<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Offered rates, requests/s, comma-separated, lightest first.
    #[arg(long, value_delimiter = ',', default_values_t = [40.0, 70.0, 90.0, 110.0, 130.0])]
    pub rates: Vec<f64>,
    /// Systems, comma-separated, in this order [default: all]: cubegate-auto,
    /// cubegate-prefix, cubegate-least-loaded, cubegate-round-robin, sglang-router,
    /// vllm-router, nginx, haproxy.
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Seconds of warm-up (same load, not measured) before each measurement
    /// [default: duration / 2, 1..4].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Batch slots per host.
    #[arg(long, default_value_t = 4)]
    pub slots: usize,
    /// Prefix-cache size per host, tokens (with the defaults: room for about 12 system
    /// prompts, while each host's share under ideal placement is 8 and its conversations).
    #[arg(long, default_value_t = 24_576)]
    pub cache_tokens: usize,
    /// Prefill time per uncached prompt token, µs.
    #[arg(long, default_value_t = 60)]
    pub prefill_us: u64,
    /// Time per output token, µs.
    #[arg(long, default_value_t = 3000)]
    pub token_delay_us: u64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Distinct system prompts.
    #[arg(long, default_value_t = 32)]
    pub groups: usize,
    /// Tokens (words) per system prompt.
    #[arg(long, default_value_t = 2000)]
    pub system_tokens: usize,
    /// Zipf exponent of the system prompts' popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Most turns of a conversation (each has 1..=N).
    #[arg(long, default_value_t = 4)]
    pub max_turns: usize,
    /// Output tokens per answer.
    #[arg(long, default_value_t = 16)]
    pub output_tokens: usize,
    /// Client connections available to the open loop.
    #[arg(long, default_value_t = 1024)]
    pub connections: usize,
    /// cubegate's workers.
    #[arg(long, default_value_t = 1)]
    pub gateway_workers: usize,
    /// The cubegate binary [default: next to this one, or target/release/cubegate].
    #[arg(long)]
    pub cubegate: Option<PathBuf>,
    /// Seconds a request may take before the client gives up (sweep).
    #[arg(long, default_value_t = 60.0)]
    pub request_timeout: f64,
    /// Skip the faults run.
    #[arg(long)]
    pub no_faults: bool,
    /// Rate of the faults run [default: the heaviest rate cubegate-auto carried without
    /// saturating].
    #[arg(long)]
    pub fault_rate: Option<f64>,
    /// Seconds measured in the faults run [default: max(3 × duration, 20)].
    #[arg(long)]
    pub fault_duration: Option<f64>,
    /// Seconds a request may take before the client gives up, in the faults run.
    #[arg(long, default_value_t = 5.0)]
    pub fault_timeout: f64,
    /// Systems of the faults run [default: cubegate-auto and every peer that ran].
    #[arg(long, value_delimiter = ',')]
    pub fault_systems: Vec<String>,
}

impl FleetArgs {
    /// The defaults, as on the command line without options.
    #[cfg(test)]
    pub fn defaults() -> FleetArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            a: FleetArgs,
        }
        P::parse_from(["fleet"]).a
    }

    pub fn warmup_s(&self) -> f64 {
        self.warmup
            .unwrap_or((self.duration / 2.0).clamp(1.0, 4.0))
            .clamp(0.0, 600.0)
    }

    pub fn workload(&self) -> workload::Spec {
        workload::Spec {
            seed: self.seed,
            groups: self.groups.max(1),
            zipf_s: self.zipf,
            system_words: self.system_tokens.max(1),
            user_words: (40, 160),
            output_tokens: self.output_tokens.max(1),
            max_turns: self.max_turns.max(1),
            think_s: (1.0, 3.0),
            model: systems::MODEL.to_string(),
        }
    }

    pub fn host_spec(&self) -> HostSpec {
        HostSpec {
            slots: self.slots.max(1),
            cache_tokens: self.cache_tokens,
            prefill_us_per_token: self.prefill_us,
            token_delay_us: self.token_delay_us,
            output_tokens: self.output_tokens.max(1),
        }
    }

    fn check(&self) -> Result<(), String> {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 3600.0 {
                Ok(())
            } else {
                Err(format!("--{name} must be 0 < S ≤ 3600, not {v}"))
            }
        };
        secs("duration", self.duration)?;
        secs("request-timeout", self.request_timeout)?;
        secs("fault-timeout", self.fault_timeout)?;
        if let Some(d) = self.fault_duration {
            secs("fault-duration", d)?;
        }
        if self.hosts == 0 || self.hosts > 64 {
            return Err("--hosts must be 1..=64".into());
        }
        if self.rates.is_empty() || self.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            return Err("--rates must be positive numbers".into());
        }
        if self.connections == 0 || self.connections > 20_000 {
            return Err("--connections must be 1..=20000".into());
        }
        Ok(())
    }
}

/// Which systems to run, in order.
pub fn selected(names: &[String]) -> Result<Vec<System>, String> {
    if names.iter().all(|s| s.trim().is_empty()) {
        return Ok(System::ALL.to_vec());
    }
    let mut out = Vec::new();
    for s in names.iter().filter(|s| !s.trim().is_empty()) {
        let x = System::parse(s).ok_or_else(|| {
            format!(
                "unknown system {s:?} (known: {})",
                System::ALL.map(System::name).join(", ")
            )
        })?;
        if !out.contains(&x) {
            out.push(x);
        }
    }
    Ok(out)
}

/// Requests of the trace for `seconds` at `rate` (and a few more: the load generator may
/// take one or two past the end).
fn trace_len(rate: f64, seconds: f64) -> usize {
    (rate * seconds).ceil() as usize + 16
}

/// Runs the benchmark; `progress` gets a line per step.
pub fn run(a: &FleetArgs, progress: &mut dyn FnMut(&str)) -> Result<Report, String> {
    a.check()?;
    let kinds = selected(&a.systems)?;
    let fault_kinds = selected(&a.fault_systems)?;
    let mut rates = a.rates.clone();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let warmup = a.warmup_s();
    compare::systems::install_signal_watcher();
    let sim_bin = compare::systems::find_sibling("cubegate-bench")
        .ok_or("cannot find the cubegate-bench binary (run `cargo build --release`)")?;
    let tmp = TempDir::new().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let env = systems::Env {
        dir: tmp.0.clone(),
        cubegate_bin: a.cubegate.clone().or_else(systems::cubegate_binary),
        workers: a.gateway_workers.clamp(1, 64),
    };
    let spec = a.workload();
    let host_spec = a.host_spec();

    // The traces and their ideal hit rates, once per rate.
    let mut traces = Vec::new();
    let mut ideal = Vec::new();
    for &rate in &rates {
        let chats = workload::trace(&spec, rate, trace_len(rate, warmup + a.duration));
        let first = (warmup * rate).round() as usize;
        let last = ((warmup + a.duration) * rate).round() as usize;
        let (queries, hits) =
            workload::ideal_hits(&chats, &spec.model, first..last.min(chats.len()));
        ideal.push(Ideal {
            rate,
            hit_rate: hits as f64 / queries.max(1) as f64,
            prompt_tokens: queries,
        });
        traces.push(chats);
    }
    let (conversations, follow_up_share, hottest_share) =
        workload::shape(traces.last().map_or(&[][..], Vec::as_slice));
    progress(&format!(
        "{} requests/s; ideal hit rates {}",
        rates
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        ideal
            .iter()
            .map(|i| format!("{:.1} %", i.hit_rate * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let shape = measure::Shape {
        duration: a.duration,
        warmup,
        connections: a.connections,
        request_timeout: a.request_timeout,
        output_tokens: spec.output_tokens,
    };
    let mut results = Vec::new();
    for &sys in &kinds {
        let mut runs = SystemRuns {
            name: sys.name(),
            label: sys.label(),
            status: "ok".into(),
            ..SystemRuns::default()
        };
        if let Some(why) = systems::missing(sys, &env) {
            runs.status = format!("failed: {why}");
            progress(&format!("{}: {}", runs.name, runs.status));
            results.push(runs);
            continue;
        }
        for (i, &rate) in rates.iter().enumerate() {
            let started = Instant::now();
            let ctx = measure::Context {
                sim_bin: &sim_bin,
                env: &env,
                hosts: a.hosts,
                host_spec: &host_spec,
            };
            match measure::point(&ctx, sys, &traces[i], rate, &shape, None) {
                Ok((point, version)) => {
                    progress(&format!(
                        "{} @ {rate}/s: {} — TTFT p50 {:.0} ms p99 {:.0} ms, hits {}, {} ok, {} failed ({:.1} s)",
                        runs.name,
                        point.status,
                        point.ttft_p50_ms,
                        point.ttft_p99_ms,
                        point
                            .hit_rate
                            .map_or("—".into(), |h| format!("{:.1} %", h * 100.0)),
                        point.ok,
                        point.failed,
                        started.elapsed().as_secs_f64()
                    ));
                    runs.version = Some(version);
                    runs.points.push(point);
                }
                Err(e) => {
                    runs.status = format!("failed: {e}");
                    progress(&format!("{} @ {rate}/s: {}", runs.name, runs.status));
                    break;
                }
            }
        }
        if runs.status == "ok" && !runs.points.iter().any(report::Point::measured) {
            runs.status = "failed: no request succeeded at any rate".into();
        }
        results.push(runs);
    }

    let acceptance = report::acceptance(&results, &ideal);
    let fault_rate = a.fault_rate.or_else(|| {
        results
            .iter()
            .find(|s| s.name == "cubegate-auto")
            .and_then(|s| report::heaviest_unsaturated(&s.points))
            .or(rates.get(rates.len() / 2).copied())
    });
    let mut faults_out = Vec::new();
    if let (false, Some(rate)) = (a.no_faults, fault_rate) {
        let chosen: Vec<System> = if a.fault_systems.is_empty() {
            kinds
                .iter()
                .copied()
                .filter(|k| {
                    (*k == System::Cubegate("auto") || k.is_peer())
                        && results
                            .iter()
                            .any(|r| r.name == k.name() && r.status == "ok")
                })
                .collect()
        } else {
            fault_kinds
        };
        let duration = a.fault_duration.unwrap_or((3.0 * a.duration).max(20.0));
        let chats = workload::trace(&spec, rate, trace_len(rate, warmup + duration));
        for sys in chosen {
            let ctx = measure::Context {
                sim_bin: &sim_bin,
                env: &env,
                hosts: a.hosts,
                host_spec: &host_spec,
            };
            let shape = measure::Shape {
                duration,
                request_timeout: a.fault_timeout,
                ..shape.clone()
            };
            let f = faults::run(&ctx, sys, &chats, rate, &shape);
            progress(&format!("faults, {}: {}", f.system, f.status));
            faults_out.push(f);
        }
    }

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Report {
        date: compare::report::utc_date(compare::unix_now()),
        commit: compare::commit(),
        machine: compare::machine(cpus, &None, &[]),
        settings: Settings {
            hosts: a.hosts,
            slots: host_spec.slots,
            cache_tokens: host_spec.cache_tokens,
            prefill_us_per_token: host_spec.prefill_us_per_token,
            token_delay_us: host_spec.token_delay_us,
            duration_s: a.duration,
            warmup_s: warmup,
            rates,
            connections: a.connections,
            gateway_workers: env.workers,
            request_timeout_s: a.request_timeout,
        },
        workload: Workload {
            spec,
            conversations,
            follow_up_share,
            hottest_share,
        },
        ideal,
        systems: results,
        acceptance,
        fault_rate: fault_rate.filter(|_| !a.no_faults),
        fault_request_timeout_s: a.fault_timeout,
        faults: faults_out,
    })
}

/// `bench/results/fleet-YYYYMMDD-HHMM` (UTC).
fn default_out() -> PathBuf {
    let date = compare::report::utc_date(compare::unix_now());
    let stamp: String = date
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == ' ')
        .collect::<String>()
        .trim()
        .replacen(' ', "-", 1)
        .replace(' ', "");
    PathBuf::from(format!("bench/results/fleet-{stamp}"))
}

/// `fleet` as a command: runs, prints the report, writes the files.
pub fn command(a: &FleetArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let report = match run(a, &mut |s| eprintln!("fleet: {s}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cubegate-bench fleet: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", markdown::markdown(&report));
    let out = a.out.clone().unwrap_or_else(default_out);
    if let Err(e) = report::write_all(&report, &out) {
        eprintln!("cubegate-bench fleet: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "fleet: wrote results.md, results.json and ttft_p99.svg into {}",
        out.display()
    );
    let failed = report.systems.iter().any(|s| s.status != "ok")
        || report.faults.iter().any(|f| f.status != "ok");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
