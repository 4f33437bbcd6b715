//! Workers, driver choice, CPU pinning, listeners, signals and shutdown.
//!
//! One OS thread per worker, each running its own monoio runtime (io_uring, or epoll when
//! io_uring is unavailable or `driver = "legacy"`) and its own `SO_REUSEPORT` listener, so
//! the kernel spreads connections and no two workers ever touch the same socket or state.
//! The main thread only handles signals: SIGHUP builds and publishes a new snapshot, SIGTERM
//! and SIGINT start a drain (stop accepting, finish what is in flight up to
//! `timeouts.drain_s`, exit 0).

use crate::auth::keys::KeyStore;
use crate::config::{AuthMode, Config, Driver};
use crate::notify::{Heartbeats, Notifier};
use crate::proxy::conn::{serve_connection, OpenConnection};
use crate::proxy::{Worker, WorkerParts};
use crate::snapshot::{Published, Snapshot};
use monoio::net::TcpListener;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set once by the signal thread; workers poll it (cheaply, off the request path).
static DRAIN: AtomicBool = AtomicBool::new(false);

/// The driver that will actually run, and why.
pub fn choose_driver(wanted: Driver) -> Result<(Driver, &'static str), String> {
    let uring_ok = monoio::utils::detect_uring();
    match (wanted, uring_ok) {
        (Driver::Uring, true) => Ok((Driver::Uring, "driver = \"uring\"")),
        (Driver::Uring, false) => Err(
            "proxy.driver = \"uring\" but io_uring is not available on this kernel \
             (disabled by kernel.io_uring_disabled, seccomp, or too old); use \"auto\" or \"legacy\""
                .into(),
        ),
        (Driver::Legacy, _) => Ok((Driver::Legacy, "driver = \"legacy\"")),
        (Driver::Auto, true) => Ok((Driver::Uring, "auto: io_uring is available")),
        (Driver::Auto, false) => Ok((
            Driver::Legacy,
            "auto: io_uring is not available on this kernel, falling back to epoll",
        )),
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// `cubegate serve`. Returns the process exit code.
pub fn serve(config: Config, config_path: PathBuf) -> i32 {
    // Signal handlers go in before anything listens: a SIGHUP or SIGTERM that arrives
    // during startup must reload or drain, not kill the process.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = match signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    let (driver, why) = match choose_driver(config.proxy.driver) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e}");
            return 2;
        }
    };
    let workers = crate::proxy::workers_of(&config);
    // HTTPS: the certificate is loaded (and checked against its key) before anything listens.
    let certs = match crate::tls::listener_files(&config) {
        None => None,
        Some((cert, key)) => match crate::tls::CertStore::load(&cert, &key) {
            Ok(store) => Some(Arc::new(store)),
            Err(e) => {
                tracing::error!("{e}");
                return 2;
            }
        },
    };
    let tls = certs.clone().map(crate::tls::server_config);
    // https:// backends: a CA file that was named must load; without one, the system
    // store is used, and its absence only matters once an https backend is configured.
    let backend_tls = match crate::tls::backend_config(config.proxy.backend_ca_file.as_deref()) {
        Ok(c) => Some(c),
        Err(e) if config.proxy.backend_ca_file.is_some() || has_https_backends(&config) => {
            tracing::error!("{e}");
            return 2;
        }
        Err(_) => None,
    };
    if config.auth.mode == AuthMode::None {
        tracing::warn!(
            "!!! auth.mode = \"none\": NO TOKEN IS CHECKED. Anyone who can reach {} can use every \
             domain and model, with admin rights. For development only. !!!",
            config.proxy.listen
        );
    }
    let snapshot = match Snapshot::from_config(&config, 1) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return 2;
        }
    };
    let published = Arc::new(Published::new(snapshot));
    // The management plane publishes its keys and memberships before any worker serves.
    let registry: crate::metrics::Registry =
        Arc::new((0..workers).map(|_| Arc::default()).collect());
    let (mgmt, mgmt_addr) = match crate::mgmt::start(&config, published.clone(), registry.clone()) {
        Ok(started) => started,
        Err(e) => {
            tracing::error!("{e}");
            return 2;
        }
    };
    let (refresh, wakeups) = crate::auth::jwks_fetch::channel();
    {
        let published = published.clone();
        let started = std::thread::Builder::new()
            .name("cubegate-jwks".into())
            .spawn(move || crate::auth::jwks_fetch::run(published, wakeups));
        if let Err(e) = started {
            tracing::error!("cannot start the JWKS fetcher: {e}");
            return 1;
        }
    }
    // Bind every listener before starting anything, so a taken port fails at once.
    let mut addr = match config.listen_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            return 2;
        }
    };
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers {
        match bind_listener(addr) {
            Ok(l) => {
                // With port 0 the first bind picks the port; the others share it.
                addr = l.local_addr().unwrap_or(addr);
                listeners.push(l);
            }
            Err(e) => {
                tracing::error!("cannot listen on {addr} (proxy.listen): {e}");
                return 1;
            }
        }
    }
    let run_id = run_id();
    let cores = if config.proxy.pin_workers {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let remaining = Arc::new(AtomicU64::new(workers as u64));
    let heartbeats = Arc::new(Heartbeats::new(workers));
    let notifier = Notifier::from_env();
    let mut threads = Vec::with_capacity(workers);
    let parts = WorkerParts {
        published: published.clone(),
        registry: registry.clone(),
        jwks_refresh: refresh.clone(),
        mgmt_addr,
        run_id,
        tls,
        backend_tls,
    };
    for (i, listener) in listeners.into_iter().enumerate() {
        let config = config.clone();
        let parts = parts.clone();
        let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let remaining = remaining.clone();
        let heartbeats = heartbeats.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("cubegate-w{i}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                let worker = Worker::new(i, &config, parts);
                if let Err(e) = run_worker(driver, worker, listener, heartbeats) {
                    tracing::error!(worker = i, "worker failed: {e}");
                }
                remaining.fetch_sub(1, Ordering::Release);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                tracing::error!("cannot start worker thread: {e}");
                return 1;
            }
        }
    }
    if !heartbeats.wait_all_listening(Duration::from_secs(30)) {
        tracing::error!("workers did not start listening");
        DRAIN.store(true, Ordering::Relaxed);
    }
    tracing::info!(
        workers,
        driver = ?driver,
        why,
        pinned = !cores.is_empty(),
        "cubegate listening on {addr}"
    );
    notifier.send("READY=1");
    let watch = Watchdog {
        notifier: &notifier,
        heartbeats: &heartbeats,
    };
    let state = Reloadable {
        config: &config,
        path: &config_path,
        published: &published,
        mgmt: &mgmt,
        certs: certs.as_deref(),
    };
    let code = handle_signals(signals, &state, &remaining, &watch);
    for t in threads {
        let _ = t.join();
    }
    code
}

fn run_worker(
    driver: Driver,
    worker: Worker,
    listener: std::net::TcpListener,
    heartbeats: Arc<Heartbeats>,
) -> std::io::Result<()> {
    match driver {
        Driver::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .enable_timer()
            .build()?
            .block_on(worker_main(worker, listener, heartbeats)),
        _ => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(worker_main(worker, listener, heartbeats)),
    }
}

async fn worker_main(
    worker: Worker,
    listener: std::net::TcpListener,
    heartbeats: Arc<Heartbeats>,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let worker = Rc::new(worker);
    let drain_timeout = worker.timeouts.drain();
    heartbeats.beat(worker.id);
    heartbeats.listening();
    // The drain flag is set by another thread; look at it a few times a second. The same
    // task stamps this worker's heartbeat: it runs only while the event loop does.
    monoio::spawn({
        let worker = worker.clone();
        async move {
            while !DRAIN.load(Ordering::Relaxed) {
                heartbeats.beat(worker.id);
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
            worker.start_drain();
        }
    });
    loop {
        if worker.draining.get() {
            break;
        }
        if worker.connections.get() >= worker.max_connections {
            // Full: stop accepting until a connection closes; new ones wait in the
            // kernel's backlog instead of costing memory here.
            monoio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let handle = worker.drain.borrow().handle();
        match listener.cancelable_accept(handle).await {
            Ok((stream, peer)) => {
                // A bug that panics while serving one connection must not take the worker
                // (and every connection its listener would accept) down with it.
                let served = std::panic::AssertUnwindSafe(serve_connection(
                    worker.clone(),
                    stream,
                    peer,
                    OpenConnection::new(worker.clone()),
                ));
                monoio::spawn(async move {
                    if futures_util::FutureExt::catch_unwind(served).await.is_err() {
                        tracing::error!(%peer, "connection handler panicked; connection closed");
                    }
                });
            }
            Err(e) if worker.draining.get() => {
                let _ = e;
                break;
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(worker = worker.id, "accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    let deadline = Instant::now() + drain_timeout;
    while worker.connections.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if worker.connections.get() > 0 {
        tracing::warn!(
            worker = worker.id,
            open = worker.connections.get(),
            "drain deadline reached; closing the remaining connections"
        );
    }
    Ok(())
}

/// What SIGHUP reloads.
struct Reloadable<'a> {
    config: &'a Config,
    path: &'a Path,
    published: &'a Published,
    mgmt: &'a crate::mgmt::Management,
    certs: Option<&'a crate::tls::CertStore>,
}

fn handle_signals(
    mut signals: signal_hook::iterator::Signals,
    state: &Reloadable<'_>,
    remaining: &AtomicU64,
    watch: &Watchdog<'_>,
) -> i32 {
    let Reloadable {
        config,
        path,
        published,
        mgmt,
        certs,
    } = *state;
    use signal_hook::consts::SIGHUP;
    let mut fed = Instant::now();
    loop {
        if let Some(every) = watch.notifier.watchdog_every {
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
                SIGHUP => {
                    watch.notifier.send("RELOADING=1");
                    let reloaded = reload(config, path, published);
                    watch.notifier.send("READY=1");
                    if let Some(reloaded) = reloaded {
                        // Domains the file now declares exist in the store too, so members
                        // can be added to them without a restart.
                        if let Err(e) = mgmt.sync_config_domains(&reloaded) {
                            tracing::error!("reload: {e}");
                        }
                        mgmt.publish();
                        reload_certificate(certs, &reloaded);
                    }
                }
                _ => {
                    watch.notifier.send("STOPPING=1");
                    if !DRAIN.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            "shutting down: draining in-flight requests (up to {}s)",
                            config.timeouts.drain_s
                        );
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn has_https_backends(config: &Config) -> bool {
    config
        .domains
        .iter()
        .flat_map(|d| d.backends.iter())
        .any(|b| b.url.starts_with("https://"))
}

/// SIGHUP with HTTPS on: the certificate and key files are read again, so a renewed
/// certificate is served from the next handshake on. A bad pair keeps the running one.
fn reload_certificate(certs: Option<&crate::tls::CertStore>, config: &Config) {
    let files = crate::tls::listener_files(config);
    match (certs, files) {
        (Some(store), Some((cert, key))) => match store.reload(&cert, &key) {
            Ok(()) => tracing::info!(cert = %cert.display(), "reloaded the TLS certificate"),
            Err(e) => tracing::error!("reload kept the running TLS certificate: {e}"),
        },
        (None, None) => {}
        _ => tracing::warn!(
            "reload: turning HTTPS on or off (proxy.tls_cert/tls_key) takes effect at the next restart"
        ),
    }
}

/// What feeds systemd's watchdog: the notifier and the workers' heartbeats.
struct Watchdog<'a> {
    notifier: &'a Notifier,
    heartbeats: &'a Heartbeats,
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
    published.replace(
        |old, generation| match Snapshot::from_config(&config, generation) {
            Ok(mut s) => {
                let mut keys = KeyStore::rebuilt(&s.keys);
                keys.carry_fetched_keys(&old.keys);
                s.keys = Arc::new(keys);
                s.revocation_epoch = old.revocation_epoch;
                s.members = old.members.clone();
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
                    members: old.members.clone(),
                }
            }
        },
    );
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

/// 32 random bits per process start, so request ids do not repeat across restarts.
fn run_id() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}
