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
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod signals;
use signals::{handle_signals, Reloadable, Watchdog};
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

/// `cubegate serve`. Returns the process exit code.
pub fn serve(config: Config, config_path: PathBuf) -> i32 {
    // Sockets passed by systemd or by the previous process: taken first, before this
    // function opens any descriptor of its own.
    let inherited = match crate::listeners::take_inherited() {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("inherited sockets: {e}");
            return 2;
        }
    };
    let passed = inherited
        .as_ref()
        .map_or(0, |i| i.proxy.len() + usize::from(i.management.is_some()));
    let ready_pipe = match crate::handover::ready_pipe(passed) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("hand-over: {e}");
            return 2;
        }
    };
    // Signal handlers go in before anything listens: a SIGHUP or SIGTERM that arrives
    // during startup must reload or drain, not kill the process.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
    let signals = match signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM, SIGUSR2]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    let (inherited_proxy, inherited_management) = match inherited {
        Some(i) => {
            tracing::info!(
                sockets = i.proxy.len() + usize::from(i.management.is_some()),
                "listening sockets inherited from {}",
                i.from
            );
            (Some(i.proxy), i.management)
        }
        None => (None, None),
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
    let built =
        KeyStore::from_config(&config, 1).and_then(|keys| Snapshot::from_config(&config, 1, keys));
    let snapshot = match built {
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
    let (mgmt, mgmt_addr) = match crate::mgmt::start(
        &config,
        published.clone(),
        registry.clone(),
        inherited_management,
    ) {
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
            .spawn(move || crate::auth::jwks_fetch::run(&*published, wakeups));
        if let Err(e) = started {
            tracing::error!("cannot start the JWKS fetcher: {e}");
            return 1;
        }
    }
    // Bind every listener before starting anything, so a taken port fails at once.
    let configured = match config.listen_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            return 2;
        }
    };
    let sockets = match inherited_proxy {
        Some(sockets) => sockets,
        None => match crate::listeners::bind_proxy(configured, workers) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                return 1;
            }
        },
    };
    let addr = sockets[0].local_addr().unwrap_or(configured);
    if addr != configured && configured.port() != 0 {
        tracing::warn!(
            "the inherited public socket listens on {addr}, not on proxy.listen = {configured}; \
             serving on {addr}"
        );
    }
    let listeners = match crate::listeners::per_worker(&sockets, workers) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot share the listening sockets among workers: {e}");
            return 1;
        }
    };
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
    match ready_pipe {
        // A hand-over: the previous process names this one the main process once it has
        // stopped accepting.
        Some(pipe) => crate::handover::say_ready(pipe),
        None => notifier.send("READY=1"),
    }
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
        sockets: std::cell::RefCell::new(sockets),
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
    listener: Vec<std::net::TcpListener>,
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
    listeners: Vec<std::net::TcpListener>,
    heartbeats: Arc<Heartbeats>,
) -> std::io::Result<()> {
    let listeners = listeners
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<std::io::Result<Vec<_>>>()?;
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
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|l| monoio::spawn(accept_loop(worker.clone(), l)))
        .collect();
    for accepting in loops {
        accepting.await;
    }
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

/// Accepts on one listening socket until draining starts; the socket is then closed here
/// (another process may still hold it: a hand-over's successor keeps accepting on it).
async fn accept_loop(worker: Rc<Worker>, listener: TcpListener) {
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
            Err(_) if worker.draining.get() => break,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(worker = worker.id, "accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn has_https_backends(config: &Config) -> bool {
    config
        .domains
        .iter()
        .flat_map(|d| d.backends.iter())
        .any(|b| b.url.starts_with("https://"))
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
