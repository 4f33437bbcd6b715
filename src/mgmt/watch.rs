//! Changes other boxes make to a shared store, seen here within a second.
//!
//! Every write to a table the data plane depends on fires a trigger in PostgreSQL that moves
//! a change counter and sends `NOTIFY` ([`super::postgres`]). This thread holds a connection
//! of its own that `LISTEN`s; on a notification it reloads the signing keys and publishes a
//! new snapshot, exactly as a change made on this box does (the revocation epoch moves, so
//! cached tokens are checked again). Notifications are lost while the connection is down,
//! so the counter is also compared on every (re)connect and every [`VERSION_CHECK`]: a
//! missed change is picked up then, and so is one whose read failed (a change counts as
//! seen only once its keys and state were read and published).
//!
//! While the database cannot be reached the box serves the data plane from its last
//! snapshot, management writes answer 503 (`store_unavailable`), the log says so once,
//! `cubegate_store_up` is 0, and this thread reconnects by itself with a capped backoff. A
//! server that hangs rather than refuses is found by a bounded check before each counter
//! read.

use super::postgres::{connect_listener, CHANGES_CHANNEL};
use super::Management;
use postgres::fallible_iterator::FallibleIterator;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the change counter is read even without a notification.
const VERSION_CHECK: Duration = Duration::from_secs(2);
/// How long the server has to answer the check that precedes each counter read.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one wait for notifications lasts before the counter is due again.
const WAIT: Duration = Duration::from_millis(500);
/// Reconnection backoff.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Whether the shared store is reachable, for `/metrics`.
#[derive(Default)]
pub struct StoreHealth {
    /// Reachable, as this thread last saw it (starts true: the box started on it).
    down: AtomicBool,
    /// Changes from the store applied (notifications and counter checks).
    applied: AtomicU64,
    /// Whether a shared store is in use at all (SQLite: no series).
    shared: AtomicBool,
}

impl StoreHealth {
    /// Prometheus lines for `GET /metrics` (empty for a store of this box's own).
    pub fn render(&self) -> String {
        if !self.shared.load(Ordering::Relaxed) {
            return String::new();
        }
        format!(
            "# HELP cubegate_store_up Whether the shared management store (PostgreSQL) is reachable.\n\
             # TYPE cubegate_store_up gauge\ncubegate_store_up {}\n\
             # HELP cubegate_store_changes_applied_total Changes made through the shared store (by any box) applied here.\n\
             # TYPE cubegate_store_changes_applied_total counter\ncubegate_store_changes_applied_total {}\n",
            u8::from(!self.down.load(Ordering::Relaxed)),
            self.applied.load(Ordering::Relaxed)
        )
    }

    /// Records reachability; logs only when it changes.
    fn set_up(&self, up: bool, why: &dyn std::fmt::Display) {
        let was_down = self.down.swap(!up, Ordering::Relaxed);
        match (was_down, up) {
            (true, true) => tracing::info!("the shared store is reachable again"),
            (false, false) => tracing::error!(
                "the shared store (PostgreSQL) is unreachable: {why}; serving the proxy from the last state, management writes answer 503, reconnecting"
            ),
            _ => {}
        }
    }
}

/// Starts the thread that follows the shared store at `url`.
pub fn spawn(mgmt: Arc<Management>, url: String) -> std::io::Result<()> {
    mgmt.health.shared.store(true, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("cubegate-store-watch".into())
        .spawn(move || run(&mgmt, &url))
        .map(|_| ())
}

fn run(mgmt: &Management, url: &str) {
    let mut backoff = RETRY_MIN;
    // The counter as of the last publication here: None = unknown, so the first
    // connection's check publishes once (the start-up publication read the same state).
    let mut seen: Option<i64> = None;
    loop {
        match connect_listener(url) {
            Ok(mut client) => {
                let outcome = client
                    .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                    .and_then(|()| {
                        mgmt.health.set_up(true, &"");
                        backoff = RETRY_MIN;
                        follow(mgmt, &mut client, &mut seen)
                    });
                if let Err(why) = outcome {
                    mgmt.health.set_up(false, &why);
                }
                // Said first: closing a session waits for the server to acknowledge,
                // which a hung server does only once it answers again.
                drop(client);
            }
            Err(why) => mgmt.health.set_up(false, &why),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// Applies changes as they are notified, and whenever the counter moved unnoticed, until
/// the connection fails.
fn follow(
    mgmt: &Management,
    client: &mut postgres::Client,
    seen: &mut Option<i64>,
) -> Result<(), postgres::Error> {
    let mut checked: Option<Instant> = None;
    loop {
        if checked.is_none_or(|t| t.elapsed() >= VERSION_CHECK) {
            // Bounded: a server that hangs (frozen, its sockets still acknowledging) would
            // hold a plain query for ever and keep reading as up.
            client.is_valid(LIVENESS_TIMEOUT)?;
            let version: i64 = client
                .query_one("SELECT version FROM cubegate_state", &[])?
                .get(0);
            // A change is seen only once applied: one whose read failed is tried again at
            // the next check.
            if *seen != Some(version) && apply(mgmt) {
                *seen = Some(version);
            }
            checked = Some(Instant::now());
        }
        let first = client.notifications().timeout_iter(WAIT).next()?;
        let mut newest = first.map(|n| n.payload().parse::<i64>().ok());
        if newest.is_some() {
            // Whatever else is queued is taken without waiting: one publication for a
            // burst of changes.
            let mut pending = client.notifications();
            let mut queued = pending.iter();
            while let Some(n) = queued.next()? {
                newest = newest.max(Some(n.payload().parse::<i64>().ok()));
            }
        }
        if let Some(version) = newest {
            if apply(mgmt) {
                *seen = (*seen).max(version);
            } else {
                // Unknown until a publication succeeds: the next check applies it again.
                *seen = None;
            }
        }
    }
}

/// Reloads the signing keys (another box may have rotated them) and publishes the store's
/// state as a new snapshot; false when either could not be read.
fn apply(mgmt: &Management) -> bool {
    let keys = mgmt.reload_keys();
    if let Err(e) = &keys {
        tracing::error!("keeping the signing keys in use: {e}");
    }
    let published = mgmt.publish();
    if keys.is_ok() && published {
        mgmt.health.applied.fetch_add(1, Ordering::Relaxed);
    }
    keys.is_ok() && published
}
