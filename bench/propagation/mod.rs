//! `cubegate-bench propagation`: how soon a management change made on one box is in force
//! on the others, when several boxes share one PostgreSQL store.
//!
//! It starts its own throwaway PostgreSQL (`crate::services`), the vLLM simulator and
//! `--boxes` `cubegate serve` processes on one database (`boxes.rs`), makes a user who is a
//! member of the boxes' one domain and logs her in. Then `--changes` times, round robin over
//! the boxes, it removes or re-adds her membership through one box's API and times the
//! write; right after its answer one thread per other box polls that box's data plane with
//! her chat request (one kept-alive connection each, `client.rs`, as fast as it answers)
//! until the box answers in the new state (403 or 200), for at most `--timeout` s. The next
//! change waits for every box. `report.rs` sums the samples up.
//!
//! The polling is the load here: on a small machine it shares the CPUs with the boxes and
//! the database, so the figures include what a busy box adds.

mod boxes;
mod client;
mod report;

use crate::compare::{self, systems};
use crate::services::{Postgres, StartError};
use boxes::{GatewayBox, Setup};
use client::Client;
use report::{Report, Sample};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct PropagationArgs {
    /// Boxes sharing the one database.
    #[arg(long, default_value_t = 3)]
    pub boxes: usize,
    /// Membership changes (removal and re-adding in turn), each through the next box.
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
    /// Seconds a box may take to show a change before the sample is a timeout.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// The cubegate binary [default: next to this one, or target/release/cubegate].
    #[arg(long)]
    pub cubegate: Option<PathBuf>,
    /// Also write results.md and results.json into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Tells one observer's poller that a change was answered.
struct Go {
    /// The status the user's chat request gets once the change is in force.
    want: u16,
    since: Instant,
    until: Instant,
}

/// What one poller saw after one change.
#[derive(Default)]
struct Seen {
    took: Option<Duration>,
    polls: u64,
    unexpected: u64,
    errors: u64,
}

/// Polls `chat` on `c` until it answers `go.want` or `go.until` passes.
fn poll_until_in_force(c: &mut Client, chat: &[u8], go: &Go) -> Seen {
    let before = if go.want == 200 { 403 } else { 200 };
    let mut seen = Seen::default();
    loop {
        match c.send(chat) {
            Ok(a) => {
                seen.polls += 1;
                if a.status == go.want {
                    seen.took = Some(go.since.elapsed());
                    return seen;
                }
                if a.status != before {
                    seen.unexpected += 1;
                }
            }
            Err(_) => {
                seen.errors += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if Instant::now() >= go.until {
            return seen;
        }
    }
}

/// Waits (bounded) until box `b` answers `chat` with `status`.
fn wait_for(b: &GatewayBox, chat: &[u8], status: u16, limit: Duration) -> Result<(), String> {
    let mut c = Client::new(b.proxy);
    let go = Go {
        want: status,
        since: Instant::now(),
        until: Instant::now() + limit,
    };
    match poll_until_in_force(&mut c, chat, &go).took {
        Some(_) => Ok(()),
        None => Err(format!(
            "{} does not answer the member's chat with {status} after {limit:?}: {}",
            b.proc.name,
            b.proc.log_tail(3)
        )),
    }
}

/// The changes, with one poller thread per box; every sample.
fn measure_changes(
    boxes: &[GatewayBox],
    admin: &str,
    user: &str,
    chat: &[u8],
    a: &PropagationArgs,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Sample>, String> {
    let n = boxes.len();
    let limit = Duration::from_secs_f64(a.timeout);
    let mut writers: Vec<Client> = boxes.iter().map(|b| Client::new(b.proxy)).collect();
    let mut samples = Vec::with_capacity(a.changes * (n - 1));
    std::thread::scope(|scope| -> Result<(), String> {
        let (seen_tx, seen_rx) = mpsc::channel::<(usize, Seen)>();
        let mut pollers = Vec::with_capacity(n);
        for (i, b) in boxes.iter().enumerate() {
            let (go_tx, go_rx) = mpsc::channel::<Go>();
            pollers.push(go_tx);
            let seen_tx = seen_tx.clone();
            let addr: SocketAddr = b.proxy;
            // Ends when `pollers` is dropped (the changes are over, or one failed).
            scope.spawn(move || {
                let mut c = Client::new(addr);
                for go in go_rx {
                    if seen_tx
                        .send((i, poll_until_in_force(&mut c, chat, &go)))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        // Only the pollers hold senders now: a poller gone makes `recv` fail, not hang.
        drop(seen_tx);
        for change in 0..a.changes {
            let writer = change % n;
            // She starts as a member: even changes remove her, odd ones add her back.
            let member = change % 2 == 1;
            let write = boxes::membership_request(admin, user, member);
            let sent = Instant::now();
            let answer = writers[writer].send(&write);
            let answered = Instant::now();
            let answer = answer.map_err(|e| format!("change {change} on box {writer}: {e}"))?;
            boxes::membership_answered(&answer, member)
                .map_err(|e| format!("change {change} on box {writer}: {e}"))?;
            let want = if member { 200 } else { 403 };
            for (i, go) in pollers.iter().enumerate().filter(|(i, _)| *i != writer) {
                go.send(Go {
                    want,
                    since: answered,
                    until: answered + limit,
                })
                .map_err(|_| format!("the poller of box {i} ended"))?;
            }
            for _ in 1..n {
                let (observer, seen) = seen_rx
                    .recv()
                    .map_err(|_| "the pollers ended".to_string())?;
                samples.push(Sample {
                    change,
                    writer,
                    observer,
                    removal: !member,
                    write_ms: (answered - sent).as_secs_f64() * 1e3,
                    propagation_ms: seen.took.map(|d| d.as_secs_f64() * 1e3),
                    polls: seen.polls,
                    unexpected: seen.unexpected,
                    errors: seen.errors,
                });
            }
            if (change + 1) % 50 == 0 || change + 1 == a.changes {
                progress(&format!("{} of {} changes", change + 1, a.changes));
            }
        }
        drop(pollers);
        Ok(())
    })?;
    Ok(samples)
}

/// Runs the benchmark; `progress` gets a line per step.
pub fn run(a: &PropagationArgs, progress: &mut dyn FnMut(&str)) -> Result<Report, String> {
    if !(2..=16).contains(&a.boxes) {
        return Err(format!("--boxes must be 2..=16, not {}", a.boxes));
    }
    if a.changes == 0 || a.changes > 100_000 {
        return Err("--changes must be 1..=100000".into());
    }
    if !(a.timeout.is_finite() && a.timeout > 0.0 && a.timeout <= 600.0) {
        return Err(format!("--timeout must be 0 < S ≤ 600, not {}", a.timeout));
    }
    systems::install_signal_watcher();
    // Declared first, dropped last: everything below lives in it.
    let tmp = systems::TempDir::new().map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let sim_bin = systems::find_sibling("cubegate-bench")
        .ok_or("cannot find the cubegate-bench binary (run `cargo build --release`)")?;
    let bin = a
        .cubegate
        .clone()
        .or_else(|| systems::find_sibling("cubegate"))
        .ok_or("cannot find the cubegate binary (run `cargo build --release`)")?;
    let (_sim, sim) = compare::start_sim(&sim_bin, &tmp.0, "sim", 4, 0)?;
    let pg = Postgres::start_in(&tmp.0).map_err(|e| match e {
        StartError::NotInstalled => {
            "PostgreSQL is not installed (apt-get install postgresql)".into()
        }
        StartError::Failed(why) => format!("PostgreSQL: {why}"),
    })?;
    let url = pg.create_database("cubegate")?;
    let postgres_version = postgres::Client::connect(&url, postgres::NoTls)
        .and_then(|mut c| c.query_one("SHOW server_version", &[]))
        .map_or("unknown".into(), |row| row.get::<_, String>(0));
    let key_encryption_key = compare::random_hex(32)?;
    let setup = Setup {
        bin: &bin,
        dir: &tmp.0,
        sim,
        postgres_url: &url,
        key_encryption_key: &key_encryption_key,
    };
    let boxes = boxes::start(&setup, a.boxes).map_err(|e| {
        let log = pg.log();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        format!(
            "{e}\nPostgreSQL's log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    progress(&format!(
        "{} boxes on {url}, simulator on {sim}",
        boxes.len()
    ));

    // A member, logged in, served by every box before the first change.
    let mut c = Client::new(boxes[0].proxy);
    let admin = boxes::login(&mut c, boxes::ADMIN_EMAIL, systems::ADMIN_PASSWORD)?;
    let user = boxes::create_user(&mut c, &admin)?;
    boxes::membership_answered(
        &c.send(&boxes::membership_request(&admin, &user, true))?,
        true,
    )?;
    let bearer = boxes::login(&mut c, boxes::USER_EMAIL, boxes::USER_PASSWORD)?;
    let chat = boxes::chat_request(&bearer);
    for b in &boxes {
        wait_for(b, &chat, 200, Duration::from_secs(10))?;
    }

    let applied_before: Vec<Option<u64>> = boxes.iter().map(boxes::changes_applied).collect();
    let samples = measure_changes(&boxes, &admin, &user, &chat, a, progress)?;
    let applied: Vec<Option<u64>> = boxes
        .iter()
        .zip(&applied_before)
        .map(|(b, before)| Some(boxes::changes_applied(b)? - (*before)?))
        .collect();
    let machine = compare::machine(
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        &None,
        &[],
    );
    Ok(Report {
        date: compare::report::utc_date(compare::unix_now()),
        commit: compare::commit(),
        machine: format!(
            "{} CPUs ({}), Linux {}",
            machine.nproc, machine.cpu_model, machine.kernel
        ),
        cubegate: systems::version_of(&bin, &["--version"]),
        postgres: postgres_version,
        boxes: a.boxes,
        changes: a.changes,
        timeout_s: a.timeout,
        write: Vec::new(),
        propagation: Vec::new(),
        applied,
        samples,
    }
    .summarize())
}

/// `propagation` as a command: runs, prints the markdown, writes the files with `--out`.
pub fn command(a: &PropagationArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let report = match run(a, &mut |s| eprintln!("propagation: {s}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cubegate-bench propagation: {e}");
            return ExitCode::from(2);
        }
    };
    let md = report::markdown(&report);
    print!("{md}");
    if let Some(dir) = &a.out {
        if let Err(e) = compare::report::write_results(dir, &md, &report, &[]) {
            eprintln!(
                "cubegate-bench propagation: cannot write {}: {e}",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
        eprintln!(
            "propagation: wrote results.md and results.json into {}",
            dir.display()
        );
    }
    if report
        .propagation
        .first()
        .is_some_and(|all| all.timeouts > 0)
    {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
