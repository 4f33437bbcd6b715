//! The main thread's loop: signals and the systemd watchdog.
//!
//! SIGHUP reloads (the config's domain map and limits that can change live, the trusted
//! keys, the TLS certificate); SIGTERM and SIGINT drain; SIGUSR2 hands the listening
//! sockets to a freshly started process and then drains (see `handover`). Everything here
//! runs off the request path: workers only ever see a new snapshot or the drain flag.

use super::DRAIN;
use crate::auth::keys::KeyStore;
use crate::config::Config;
use crate::notify::{Heartbeats, Notifier};
use crate::snapshot::{Published, Snapshot};
use crate::tls::Listener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the signals act on.
pub(super) struct Reloadable<'a> {
    pub config: &'a Config,
    pub path: &'a Path,
    pub published: &'a Published,
    pub mgmt: &'a std::sync::Arc<crate::mgmt::Management>,
    /// The public listener's certificate (HTTPS on `proxy.listen`).
    pub certs: Option<&'a crate::tls::CertStore>,
    /// The management listener's certificate (HTTPS on `management.listen`).
    pub mgmt_certs: Option<&'a crate::tls::CertStore>,
    /// This thread's copies of the public listening sockets, to pass on in a hand-over.
    /// Dropped when draining starts: once the workers close theirs too, a socket nobody
    /// else holds closes, and new connections are refused instead of queueing for no one.
    pub sockets: std::cell::RefCell<Vec<std::net::TcpListener>>,
}

/// The signals the main loop handles, and a flag SIGTERM and SIGINT also raise, which the
/// waits of startup (for the database) watch, since the loop does not run yet.
pub(super) fn install() -> std::io::Result<(signal_hook::iterator::Signals, Arc<AtomicBool>)> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM, SIGUSR2])?;
    Ok((signals, stop))
}

pub(super) fn handle_signals(
    mut signals: signal_hook::iterator::Signals,
    state: &Reloadable<'_>,
    remaining: &AtomicU64,
    watch: &Watchdog<'_>,
) -> i32 {
    use signal_hook::consts::{SIGHUP, SIGUSR2};
    let mut fed = Instant::now();
    // After a hand-over this process is no longer the service's main process: systemd
    // hears from the successor only.
    let mut handed_over = false;
    loop {
        if let Some(every) = watch.notifier.watchdog_every.filter(|_| !handed_over) {
            // Fed only while every worker's loop is turning (see `notify`).
            if fed.elapsed() >= every && watch.heartbeats.all_fresh(every) {
                watch.notifier.send("WATCHDOG=1");
                fed = Instant::now();
            }
        }
        if remaining.load(Ordering::Acquire) == 0 {
            // Every worker ended on its own (a fatal error): nothing left to serve.
            return if DRAIN.load(Ordering::Relaxed) { 0 } else { 1 };
        }
        for signal in signals.pending() {
            match signal {
                _ if handed_over => {
                    tracing::info!(
                        signal,
                        "signal ignored: this process has handed over and is draining"
                    );
                }
                SIGHUP => on_reload(state, watch.notifier),
                SIGUSR2 if DRAIN.load(Ordering::Relaxed) => {
                    tracing::warn!("hand-over refused: this process is already draining");
                }
                SIGUSR2 => handed_over = hand_over(state, watch),
                _ => {
                    state.sockets.borrow_mut().clear();
                    watch.notifier.send("STOPPING=1");
                    if !DRAIN.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            "shutting down: draining in-flight requests (up to {}s)",
                            state.config.timeouts.drain_s
                        );
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn on_reload(state: &Reloadable<'_>, notifier: &Notifier) {
    notifier.send("RELOADING=1");
    let reloaded = reload(state.config, state.path, state.published);
    notifier.send("READY=1");
    if let Some(reloaded) = reloaded {
        // The store's part waits on a database when it is shared: never on this thread,
        // which feeds the watchdog.
        state.mgmt.sync_in_background(reloaded.clone());
        reload_certificate(Listener::Public, state.certs, &reloaded);
        reload_certificate(Listener::Management, state.mgmt_certs, &reloaded);
    }
}

/// SIGUSR2. Returns whether the successor took over (this process then drains).
fn hand_over(state: &Reloadable<'_>, watch: &Watchdog<'_>) -> bool {
    let notifier = watch.notifier;
    // The waits below can outlast the watchdog interval: keep feeding it (on the same
    // condition as the main loop: every worker's loop still turns).
    let fed = std::cell::Cell::new(Instant::now());
    let tick = || {
        if let Some(every) = notifier.watchdog_every {
            if fed.get().elapsed() >= every && watch.heartbeats.all_fresh(every) {
                notifier.send("WATCHDOG=1");
                fed.set(Instant::now());
            }
        }
    };
    let Some(management) = state.mgmt.listener.get() else {
        tracing::error!("hand-over refused: the management listener is not up");
        return false;
    };
    tracing::info!("hand-over: starting a new process with the listening sockets");
    if !state.mgmt.gate.pause(HANDOVER_MGMT_QUIET, &tick) {
        state.mgmt.gate.resume();
        tracing::error!(
            "hand-over refused: management requests still running after {}s; still serving",
            HANDOVER_MGMT_QUIET.as_secs()
        );
        return false;
    }
    let spawned =
        crate::handover::spawn_successor(state.path, &state.sockets.borrow(), management, &tick);
    match spawned {
        Ok(child) => {
            state.sockets.borrow_mut().clear();
            notifier.send(&format!("MAINPID={}", child.id()));
            DRAIN.store(true, Ordering::Relaxed);
            tracing::info!(
                successor = child.id(),
                "hand-over complete: draining in-flight requests (up to {}s)",
                state.config.timeouts.drain_s
            );
            true
        }
        Err(e) => {
            state.mgmt.gate.resume();
            tracing::error!("hand-over failed, still serving: {e}");
            false
        }
    }
}

/// How long a hand-over waits for running management requests (argon2, SQLite) to end.
const HANDOVER_MGMT_QUIET: Duration = Duration::from_secs(10);

/// SIGHUP with HTTPS on: the certificate and key files are read again, so a renewed
/// certificate is served from the next handshake on. A bad pair keeps the running one.
fn reload_certificate(listener: Listener, certs: Option<&crate::tls::CertStore>, config: &Config) {
    let files = listener.files(config);
    let which = match listener {
        Listener::Public => "proxy",
        Listener::Management => "management",
    };
    match (certs, files) {
        (Some(store), Some((cert, key))) => match store.reload(&cert, &key) {
            Ok(()) => tracing::info!(
                cert = %cert.display(),
                "reloaded the TLS certificate of the {which} listener"
            ),
            Err(e) => tracing::error!(
                "reload kept the running TLS certificate of the {which} listener: {e}"
            ),
        },
        (None, None) => {}
        _ => tracing::warn!(
            "reload: turning HTTPS on or off ({which}.tls_cert/tls_key) takes effect at the next restart"
        ),
    }
}

/// What feeds systemd's watchdog: the notifier and the workers' heartbeats.
pub(super) struct Watchdog<'a> {
    pub notifier: &'a Notifier,
    pub heartbeats: &'a Heartbeats,
}

/// SIGHUP: re-read the file and publish its domain map. Listener, worker, limit and
/// timeout changes need a restart; a broken file keeps the running map.
fn reload(running: &Config, path: &Path, published: &Published) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload refused, keeping the running configuration: {e}");
            return None;
        }
    };
    if config.proxy.listen != running.proxy.listen || config.proxy.workers != running.proxy.workers
    {
        tracing::warn!(
            "reload: [proxy] listener and worker changes take effect at the next restart"
        );
    }
    let mut outcome = Ok(0);
    published.replace(|old, generation| {
        let built = KeyStore::from_config(&config, generation).and_then(|mut keys| {
            keys.carry_fetched_keys(&old.keys);
            Snapshot::from_config(&config, generation, keys)
        });
        match built {
            Ok(mut s) => {
                s.revocation_epoch = old.revocation_epoch;
                s.directory = old.directory.clone();
                // The file's limits are the new file's; the API's stay.
                s.limits.api = old.limits.api.clone();
                // Domains whose backends the management API set stay, unless the file
                // now defines the same id (the file wins).
                for (id, d) in old.domains.iter().filter(|(_, d)| d.from_api) {
                    s.domains.entry(id.clone()).or_insert_with(|| d.clone());
                }
                outcome = Ok(s.domains.len());
                s
            }
            Err(e) => {
                outcome = Err(e);
                // Republish the running snapshot unchanged (under a new generation).
                Snapshot {
                    generation,
                    domains: old.domains.clone(),
                    keys: old.keys.clone(),
                    revocation_epoch: old.revocation_epoch,
                    directory: old.directory.clone(),
                    limits: old.limits.clone(),
                }
            }
        }
    });
    match outcome {
        Ok(domains) => {
            tracing::info!(domains, "reloaded the domain map");
            crate::metrics::GLOBAL.reloads.inc();
            Some(config)
        }
        Err(e) => {
            tracing::error!("reload refused, keeping the running configuration: {e}");
            None
        }
    }
}
