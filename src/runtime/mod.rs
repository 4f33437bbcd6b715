//! `cubegate serve`: startup, the workers' event loops, and the hand-off to the signal loop.
//!
//! `serve` reads as the startup's steps, in an order that matters: inherited sockets are
//! taken before any descriptor is opened, signal handlers go in before anything listens,
//! certificates, the snapshot and the management store are loaded before the public port
//! is bound, and readiness is announced only once every worker listens. A step that fails
//! gives a `StartupError`, which logs its line where it happens and carries the exit code
//! (2: the configuration or what it names; 1: the system refused a thread or a socket).
//!
//! One OS thread per worker, each running its own monoio runtime (io_uring, or epoll when
//! io_uring is unavailable or `driver = "legacy"`) and its own `SO_REUSEPORT` listener, so
//! the kernel spreads connections and no two workers ever touch the same socket or state.
//! The main thread then only handles signals (`signals.rs`): SIGHUP builds and publishes a
//! new snapshot, SIGTERM and SIGINT start a drain (stop accepting, finish what is in flight
//! up to `timeouts.drain_s`, exit 0).

use crate::auth::jwks_fetch::RefreshHandle;
use crate::auth::keys::KeyStore;
use crate::config::{AuthMode, Config, Driver};
use crate::listeners::Inherited;
use crate::notify::{Heartbeats, Notifier};
use crate::proxy::worker::{Worker, WorkerParts};
use crate::snapshot::{Published, Snapshot};
use crate::tls::Listener;
use crate::usage::writer::UsageWriter;
use monoio::net::TcpListener;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

mod accept;
mod check;
pub use check::{check_config, CheckSummary};
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

/// Why startup stopped. The line is logged when the value is made, where the failure
/// happens: before anything already started is torn down (a hand-over's predecessor learns
/// of the failure from its ready pipe closing, after this line). The exit code travels back
/// to `serve`.
struct StartupError {
    exit_code: i32,
}

impl StartupError {
    /// The configuration, or something it names, is wrong: exit 2 (as `check-config`).
    fn config(message: impl std::fmt::Display) -> StartupError {
        tracing::error!("{message}");
        StartupError { exit_code: 2 }
    }

    /// Opening the store failed: a setting (exit 2), or a SIGTERM that ended the wait for
    /// the database (exit 0, as any requested stop).
    fn store(message: String) -> StartupError {
        if message == crate::mgmt::STOPPED_WAITING {
            tracing::info!("{message}: exiting");
            return StartupError { exit_code: 0 };
        }
        StartupError::config(message)
    }

    /// The system refused a resource (a thread, signal handlers, a socket): exit 1.
    fn system(message: impl std::fmt::Display) -> StartupError {
        tracing::error!("{message}");
        StartupError { exit_code: 1 }
    }
}

/// `cubegate serve`. Returns the process exit code.
pub fn serve(config: Config, config_path: PathBuf) -> i32 {
    match start_and_serve(&config, &config_path) {
        Ok(code) => code,
        Err(failed) => failed.exit_code,
    }
}

/// Startup, step by step, then the signal loop until the process should exit.
fn start_and_serve(config: &Config, config_path: &Path) -> Result<i32, StartupError> {
    // Sockets passed by systemd or by the previous process: taken first, before this
    // process opens any descriptor of its own.
    let inherited = crate::listeners::take_inherited()
        .map_err(|e| StartupError::config(format!("inherited sockets: {e}")))?;
    let ready_pipe = open_ready_pipe(inherited.as_ref())?;
    // Signal handlers go in before anything listens: a SIGHUP or SIGTERM that arrives
    // during startup must reload or drain, not kill the process.
    let (signals, stop) = signals::install()
        .map_err(|e| StartupError::system(format!("cannot install signal handlers: {e}")))?;
    let (inherited_proxy, inherited_management) = split_inherited(inherited);
    let (driver, why) = choose_driver(config.proxy.driver).map_err(StartupError::config)?;
    let workers = crate::proxy::worker::workers_of(config);
    let certs = load_listener_certificate(config, Listener::Public)?;
    let tls = certs.clone().map(crate::tls::server_config);
    let mgmt_certs = load_listener_certificate(config, Listener::Management)?;
    let backend_tls = load_backend_trust(config)?;
    warn_if_unauthenticated(config);
    let published = publish_first_snapshot(config)?;
    // The management plane publishes its keys and memberships before any worker serves.
    let registry: crate::metrics::Registry =
        Arc::new((0..workers).map(|_| Arc::default()).collect());
    let (mgmt, mgmt_addr) = crate::mgmt::start(
        config,
        published.clone(),
        registry.clone(),
        inherited_management,
        mgmt_certs.clone(),
        &stop,
    )
    .map_err(StartupError::store)?;
    let usage = start_usage_writer(config, &published, &stop)?;
    start_fleet_exchange(config)?;
    let jwks_refresh = start_jwks_fetcher(&published)?;
    crate::fleet::health::start(crate::fleet::health::HealthSettings {
        interval: config.health.interval(),
        timeout: config.health.timeout(),
        tls: backend_tls.clone(),
    })
    .map_err(|e| StartupError::system(format!("cannot start the health checker: {e}")))?;
    let (sockets, addr) = bind_public_listeners(config, inherited_proxy, workers)?;
    let listeners = crate::listeners::per_worker(&sockets, workers).map_err(|e| {
        StartupError::system(format!(
            "cannot share the listening sockets among workers: {e}"
        ))
    })?;
    let notifier = Notifier::from_env();
    let parts = WorkerParts {
        published: published.clone(),
        registry,
        jwks_refresh,
        mgmt_addr,
        // The public port's hop to an HTTPS management listener is HTTPS too.
        mgmt_tls: mgmt_certs.clone().map(crate::tls::pinned::client_config),
        run_id: run_id(),
        tls,
        backend_tls,
        usage: usage.as_ref().map(UsageWriter::sender),
        balance_hub: Default::default(),
    };
    let running = start_workers(config, driver, &parts, listeners)?;
    wait_until_workers_listen(&running.heartbeats);
    tracing::info!(
        workers,
        driver = ?driver,
        why,
        pinned = running.pinned,
        "cubegate listening on {addr}"
    );
    announce_ready(ready_pipe, &notifier);
    let watch = Watchdog {
        notifier: &notifier,
        heartbeats: &running.heartbeats,
    };
    let state = Reloadable {
        config,
        path: config_path,
        published: &published,
        mgmt: &mgmt,
        certs: certs.as_deref(),
        mgmt_certs: mgmt_certs.as_deref(),
        sockets: std::cell::RefCell::new(sockets),
    };
    let code = handle_signals(signals, &state, &running.remaining, &watch);
    running.join();
    // Every worker has sent its last usage batch: the writer stores them before the exit.
    if let Some(writer) = usage {
        writer.finish();
    }
    Ok(code)
}

/// In a hand-over, the pipe on which this process tells its predecessor that it listens.
fn open_ready_pipe(inherited: Option<&Inherited>) -> Result<Option<File>, StartupError> {
    let passed = inherited.map_or(0, Inherited::count);
    crate::handover::ready_pipe(passed).map_err(|e| StartupError::config(format!("hand-over: {e}")))
}

/// The inherited public sockets and management socket, each if any (said in the log).
fn split_inherited(
    inherited: Option<Inherited>,
) -> (
    Option<Vec<std::net::TcpListener>>,
    Option<std::net::TcpListener>,
) {
    let Some(i) = inherited else {
        return (None, None);
    };
    tracing::info!(
        sockets = i.count(),
        "listening sockets inherited from {}",
        i.from
    );
    (Some(i.proxy), i.management)
}

/// HTTPS: the certificate is loaded (and checked against its key) before anything listens.
fn load_listener_certificate(
    config: &Config,
    listener: Listener,
) -> Result<Option<Arc<crate::tls::CertStore>>, StartupError> {
    let Some((cert, key)) = listener.files(config) else {
        return Ok(None);
    };
    crate::tls::CertStore::load(listener, &cert, &key)
        .map(|store| Some(Arc::new(store)))
        .map_err(StartupError::config)
}

/// https:// backends: a CA file that was named must load; without one, the system store is
/// used, and its absence only matters once an https backend is configured.
fn load_backend_trust(config: &Config) -> Result<Option<Arc<rustls::ClientConfig>>, StartupError> {
    match crate::tls::backend_config(config.proxy.backend_ca_file.as_deref()) {
        Ok(c) => Ok(Some(c)),
        Err(e) if config.proxy.backend_ca_file.is_some() || has_https_backends(config) => {
            Err(StartupError::config(e))
        }
        Err(_) => Ok(None),
    }
}

/// The domain map of the configuration file, as generation 1.
fn publish_first_snapshot(config: &Config) -> Result<Arc<Published>, StartupError> {
    let snapshot = KeyStore::from_config(config, 1)
        .and_then(|keys| Snapshot::from_config(config, 1, keys))
        .map_err(StartupError::config)?;
    Ok(Arc::new(Published::new(snapshot)))
}

fn warn_if_unauthenticated(config: &Config) {
    if config.auth.mode == AuthMode::None {
        tracing::warn!(
            "!!! auth.mode = \"none\": NO TOKEN IS CHECKED. Anyone who can reach {} can use every \
             domain and model, with admin rights. For development only. !!!",
            config.proxy.listen
        );
    }
}

/// The usage writer (`[usage] enabled`), on a store handle of its own.
fn start_usage_writer(
    config: &Config,
    published: &Arc<Published>,
    stop: &AtomicBool,
) -> Result<Option<UsageWriter>, StartupError> {
    if !config.usage.enabled {
        return Ok(None);
    }
    let store = crate::mgmt::open_store(config, stop).map_err(StartupError::store)?;
    crate::usage::writer::start(store, &config.usage, published.clone())
        .map(Some)
        .map_err(|e| StartupError::system(format!("cannot start the usage writer: {e}")))
}

/// `[fleet]`: the thread that shares this box's limit counts with the other boxes.
fn start_fleet_exchange(config: &Config) -> Result<(), StartupError> {
    let Some(settings) =
        crate::usage::fleet::settings(&config.fleet).map_err(StartupError::config)?
    else {
        return Ok(());
    };
    crate::usage::fleet::start(settings)
        .map_err(|e| StartupError::system(format!("cannot start the fleet exchange: {e}")))
}

/// The thread that fetches trusted issuers' JWKS; the handle asks it for an early refresh.
fn start_jwks_fetcher(published: &Arc<Published>) -> Result<RefreshHandle, StartupError> {
    let (refresh, wakeups) = crate::auth::jwks_fetch::channel();
    let published = published.clone();
    std::thread::Builder::new()
        .name("cubegate-jwks".into())
        .spawn(move || crate::auth::jwks_fetch::run(&*published, wakeups))
        .map_err(|e| StartupError::system(format!("cannot start the JWKS fetcher: {e}")))?;
    Ok(refresh)
}

/// The public listening sockets (inherited, or bound now so a taken port fails before
/// anything starts) and the address they serve on.
fn bind_public_listeners(
    config: &Config,
    inherited: Option<Vec<std::net::TcpListener>>,
    workers: usize,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), StartupError> {
    let configured = config.listen_addr().map_err(StartupError::config)?;
    let sockets = match inherited {
        Some(sockets) => sockets,
        None => crate::listeners::bind_proxy(configured, workers).map_err(StartupError::system)?,
    };
    let addr = sockets[0].local_addr().unwrap_or(configured);
    if addr != configured && configured.port() != 0 {
        tracing::warn!(
            "the inherited public socket listens on {addr}, not on proxy.listen = {configured}; \
             serving on {addr}"
        );
    }
    Ok((sockets, addr))
}

/// The worker threads, started: what the signal loop and the exit wait on.
struct RunningWorkers {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Workers whose event loop has not ended yet.
    remaining: Arc<AtomicU64>,
    heartbeats: Arc<Heartbeats>,
    /// Each worker is pinned to a CPU.
    pinned: bool,
}

/// One thread per worker, each with its own runtime and its share of `listeners`.
fn start_workers(
    config: &Config,
    driver: Driver,
    parts: &WorkerParts,
    listeners: Vec<Vec<std::net::TcpListener>>,
) -> Result<RunningWorkers, StartupError> {
    let workers = listeners.len();
    let cores = if config.proxy.pin_workers {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let remaining = Arc::new(AtomicU64::new(workers as u64));
    let heartbeats = Arc::new(Heartbeats::new(workers));
    let mut threads = Vec::with_capacity(workers);
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
        let thread = spawned
            .map_err(|e| StartupError::system(format!("cannot start worker thread: {e}")))?;
        threads.push(thread);
    }
    Ok(RunningWorkers {
        threads,
        remaining,
        heartbeats,
        pinned: !cores.is_empty(),
    })
}

impl RunningWorkers {
    /// Waits for every worker thread to end.
    fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// When some worker does not listen within the limit, the process drains and ends rather
/// than serve with fewer workers than configured.
fn wait_until_workers_listen(heartbeats: &Heartbeats) {
    if !heartbeats.wait_all_listening(Duration::from_secs(30)) {
        tracing::error!("workers did not start listening");
        DRAIN.store(true, Ordering::Relaxed);
    }
}

/// Tells whoever started this process that it serves: in a hand-over the previous process
/// (which names this one the main process once it has stopped accepting), else systemd.
fn announce_ready(ready_pipe: Option<File>, notifier: &Notifier) {
    match ready_pipe {
        Some(pipe) => crate::handover::say_ready(pipe),
        None => notifier.send("READY=1"),
    }
}

fn run_worker(
    driver: Driver,
    worker: Worker,
    listener: Vec<std::net::TcpListener>,
    heartbeats: Arc<Heartbeats>,
) -> std::io::Result<()> {
    match driver {
        Driver::Uring => {
            let runtime = |ring: io_uring::Builder| {
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(4096)
                    .uring_builder(ring)
                    .enable_timer()
                    .build()
            };
            // The ring is this thread's alone (SINGLE_ISSUER), and a completion's kernel
            // work waits for the worker's next entry into the kernel instead of
            // interrupting it (COOP_TASKRUN): 10 % less CPU per proxied request
            // (notes in bench/README.md, "Per-request cost"). DEFER_TASKRUN measured no
            // better. Kernels before 6.0 refuse the flags: then the plain ring.
            let mut ring = io_uring::IoUring::builder();
            ring.setup_single_issuer().setup_coop_taskrun();
            runtime(ring)
                .or_else(|_| runtime(io_uring::IoUring::builder()))?
                .block_on(worker_main(worker, listener, heartbeats))
        }
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
    // task stamps this worker's heartbeat (it runs only while the event loop does) and,
    // draining or not, moves the usage minute on and sends the usage sums once a second.
    monoio::spawn({
        let worker = worker.clone();
        async move {
            for tick in 1u64.. {
                if DRAIN.load(Ordering::Relaxed) {
                    worker.start_drain();
                } else {
                    heartbeats.beat(worker.id);
                }
                worker.usage.tick();
                if tick % 10 == 0 {
                    worker.usage.flush();
                }
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // Limit counters of scopes no longer in use are let go once a minute.
    monoio::spawn({
        let worker = worker.clone();
        async move {
            while !worker.draining.get() {
                monoio::time::sleep(Duration::from_secs(60)).await;
                crate::usage::limiter::prune(&mut worker.limit_counters.borrow_mut());
            }
        }
    });
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|l| monoio::spawn(accept::accept_loop(worker.clone(), l)))
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
    // The last usage batch: the writer stores it before the process exits.
    worker.usage.flush();
    Ok(())
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
