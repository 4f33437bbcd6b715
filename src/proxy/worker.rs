//! What one worker thread owns: its configuration share, token cache, upstream pools,
//! snapshot handle, buffer pool, counters and usage sums.
//!
//! Everything here is per thread (`Rc`, `Cell`, `RefCell`): nothing on the request path
//! takes a lock or writes memory another core reads. Counters are per-worker values that
//! the scrape sums; the snapshot handle looks at a shared generation number once per
//! request and only touches the shared `ArcSwap` when it moved.

use super::pool::Pools;
use super::request_id::RequestId;
use super::splice::SplicePipe;
use crate::auth::cache::TokenCache;
use crate::auth::jwks_fetch::RefreshHandle;
use crate::auth::{Authenticated, Authenticator, CheckFailure};
use crate::config::{Config, Limits, Timeouts};
use crate::metrics::{Registry, WorkerMetrics};
use crate::snapshot::{LocalSnapshot, Published};
use monoio::io::Canceller;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

/// How many workers run: `proxy.workers`, or one per CPU when 0.
pub fn workers_of(config: &Config) -> usize {
    match config.proxy.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Size of the pooled I/O buffers: one read from a backend or a client body.
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Size of the small pooled buffers: the read of an answer that has not begun or trickles
/// in (a token stream), which is what a stream waiting for its next token holds
/// (`read_answer::size_next_read`).
pub const SMALL_BUFFER_SIZE: usize = 2 * 1024;
/// Free buffers kept per worker (beyond that they are freed).
const POOL_MAX: usize = 1024;

/// A buffer from the worker's pool, returned to it when dropped.
pub struct PooledBuf<'w> {
    worker: &'w Worker,
    pub buf: Vec<u8>,
}

impl Drop for PooledBuf<'_> {
    fn drop(&mut self) {
        self.worker.recycle(std::mem::take(&mut self.buf));
    }
}

/// Everything one worker thread owns.
pub struct Worker {
    pub id: usize,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub auth: Authenticator,
    /// `[auth] claim_headers` header names (a client may not send them).
    pub claim_header_names: Vec<String>,
    /// This worker's verified-token cache.
    pub tokens: RefCell<TokenCache>,
    /// Tokens this worker is asking the check service about (`[auth] check_url`), each with
    /// the verdict-to-be that concurrent requests with the same token wait for.
    pub checks_in_flight: RefCell<std::collections::HashMap<Box<[u8]>, SharedCheck>>,
    /// This worker's counters (summed with the others' at scrape time).
    pub metrics: Arc<WorkerMetrics>,
    /// Asks the JWKS fetcher to refresh now (a token named an unknown key).
    pub jwks_refresh: RefreshHandle,
    /// The management listener, as a pass-through "domain" for `/users`, `/domains` and
    /// `/keys` requests that arrive on the public port.
    pub management: crate::snapshot::Domain,
    /// HTTPS on the public listener: the rustls configuration of every handshake.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    /// HTTPS to the management listener: trusts exactly its certificate.
    pub mgmt_tls: Option<Arc<rustls::ClientConfig>>,
    /// Move uninspected Content-Length bodies with splice(2).
    pub splice: bool,
    /// Write an access record per request.
    pub access_log: bool,
    /// This worker's usage sums since its last flush to the usage writer.
    pub usage: crate::usage::tally::WorkerUsage,
    /// The worker's reusable pipe for splice (taken while in use).
    pipe: RefCell<Option<SplicePipe>>,
    pub snapshot: RefCell<LocalSnapshot>,
    pub pools: RefCell<Pools>,
    /// Requests waiting for a host with room (fair across domains).
    pub queue: RefCell<crate::fleet::queue::FairQueue>,
    /// This worker's routing memory (which host served which prefix).
    pub routing: RefCell<crate::fleet::policy::RoutingState>,
    /// Limit counters this worker used, by scope key ([`crate::usage::limiter`]).
    pub limit_counters:
        RefCell<crate::hashing::PreHashedMap<std::sync::Arc<crate::usage::limiter::Counters>>>,
    /// Cancels every idle wait (keep-alive reads, accept) when draining starts.
    pub drain: RefCell<Canceller>,
    pub draining: Cell<bool>,
    /// Client connections open on this worker.
    pub connections: Cell<usize>,
    /// This worker's share of `limits.max_connections`.
    pub max_connections: usize,
    request_seq: Cell<u64>,
    run_id: u32,
    free_buffers: RefCell<Vec<Vec<u8>>>,
    free_small_buffers: RefCell<Vec<Vec<u8>>>,
}

/// One call to the check service that several requests may wait for: `None` until it
/// is settled.
pub type SharedCheck = Rc<RefCell<Option<Result<Authenticated, CheckFailure>>>>;

/// What every worker is built from: the process-wide pieces each one holds a handle to.
#[derive(Clone)]
pub struct WorkerParts {
    pub published: Arc<Published>,
    pub registry: Registry,
    pub jwks_refresh: RefreshHandle,
    pub mgmt_addr: std::net::SocketAddr,
    /// The hop to an HTTPS management listener (`None`: it speaks plain HTTP).
    pub mgmt_tls: Option<Arc<rustls::ClientConfig>>,
    pub run_id: u32,
    /// HTTPS on the public listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How `https://` backends are checked (`None`: no trusted CA could be loaded).
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    /// Where usage sums go (`None`: `[usage] enabled = false`).
    pub usage: Option<std::sync::mpsc::Sender<crate::usage::tally::Batch>>,
    /// The box's prefix-group balancer, which every worker's reviews go through.
    pub balance_hub: Arc<crate::fleet::balance::Hub>,
}

impl Worker {
    pub fn new(id: usize, config: &Config, parts: WorkerParts) -> Worker {
        let WorkerParts {
            published,
            registry,
            jwks_refresh,
            mgmt_addr,
            mgmt_tls,
            run_id,
            tls,
            backend_tls,
            usage,
            balance_hub,
        } = parts;
        Worker {
            id,
            limits: config.limits.clone(),
            timeouts: config.timeouts.clone(),
            auth: Authenticator::new(&config.auth),
            claim_header_names: config.auth.claim_headers.values().cloned().collect(),
            tokens: RefCell::new(TokenCache::new(
                config.auth.token_cache_entries,
                registry[id].clone(),
            )),
            checks_in_flight: RefCell::default(),
            metrics: registry[id].clone(),
            jwks_refresh,
            management: management_domain(mgmt_addr, mgmt_tls.is_some()),
            mgmt_tls,
            tls,
            backend_tls,
            splice: config.proxy.splice_bodies,
            access_log: config.proxy.access_log,
            usage: crate::usage::tally::WorkerUsage::new(usage),
            pipe: RefCell::new(None),
            snapshot: RefCell::new(LocalSnapshot::new(published)),
            pools: RefCell::new(
                Pools::new(config.proxy.upstream_idle_per_backend)
                    .with_metrics(registry[id].clone()),
            ),
            routing: RefCell::new(crate::fleet::policy::RoutingState::with_hub(balance_hub)),
            limit_counters: RefCell::default(),
            queue: RefCell::new(crate::fleet::queue::FairQueue::new(
                config.limits.max_queued.div_ceil(workers_of(config)),
            )),
            drain: RefCell::new(Canceller::new()),
            draining: Cell::new(false),
            connections: Cell::new(0),
            max_connections: config
                .limits
                .max_connections
                .div_ceil(workers_of(config))
                .max(1),
            request_seq: Cell::new(0),
            run_id,
            free_buffers: RefCell::new(Vec::new()),
            free_small_buffers: RefCell::new(Vec::new()),
        }
    }

    /// Starts draining: no new requests on kept-alive connections, idle waits end now.
    pub fn start_drain(&self) {
        if self.draining.replace(true) {
            return;
        }
        let old = std::mem::take(&mut *self.drain.borrow_mut());
        // `cancel` wakes every associated read/accept with ECANCELED (or its completed
        // result, which is then served before the connection closes).
        let _ = old.cancel();
    }

    /// An empty buffer of `BUFFER_SIZE` capacity: from the pool when one is free.
    pub fn buffer(&self) -> PooledBuf<'_> {
        PooledBuf {
            worker: self,
            buf: self.take_buffer(),
        }
    }

    /// Like [`Worker::buffer`], for a holder that gives it back with `recycle` itself.
    pub fn take_buffer(&self) -> Vec<u8> {
        take_from(&self.free_buffers, BUFFER_SIZE)
    }

    /// An empty buffer of `SMALL_BUFFER_SIZE` capacity, to give back with `recycle`.
    pub fn take_small_buffer(&self) -> Vec<u8> {
        take_from(&self.free_small_buffers, SMALL_BUFFER_SIZE)
    }

    /// Gives a buffer back to its pool (buffers that grew or shrank are let go).
    pub fn recycle(&self, mut buf: Vec<u8>) {
        let pool = match buf.capacity() {
            BUFFER_SIZE => &self.free_buffers,
            SMALL_BUFFER_SIZE => &self.free_small_buffers,
            _ => return,
        };
        let mut free = pool.borrow_mut();
        if free.len() < POOL_MAX {
            buf.clear();
            free.push(buf);
        }
    }

    /// The worker's splice pipe, created on first use. Give it back with `return_pipe`
    /// only after a transfer that completed (a failed one may leave bytes in it).
    pub fn take_pipe(&self) -> Option<SplicePipe> {
        let pipe = self.pipe.borrow_mut().take();
        pipe.or_else(|| SplicePipe::new().ok())
    }

    pub fn return_pipe(&self, pipe: SplicePipe) {
        *self.pipe.borrow_mut() = Some(pipe);
    }

    /// A request id unique across workers and restarts: run id, worker, sequence.
    pub fn next_request_id(&self) -> RequestId {
        let seq = self.request_seq.get().wrapping_add(1);
        self.request_seq.set(seq);
        RequestId::generate(self.run_id, self.id, seq)
    }
}

/// `https`: the management listener speaks HTTPS (the name is only a label: the hop's
/// check is the certificate pin of `crate::tls::pinned`).
fn management_domain(addr: std::net::SocketAddr, https: bool) -> crate::snapshot::Domain {
    let tls = https.then(|| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
    let scheme = if https { "https" } else { "http" };
    crate::snapshot::Domain {
        id: "management".into(),
        backends: vec![crate::snapshot::Backend {
            kind: crate::config::BackendKind::Vllm,
            addr,
            tls: tls.clone(),
            authority: addr.to_string(),
            base_path: String::new(),
            models: vec!["*".into()],
            any_model: true,
            discover: false,
            // Not a GPU host: never registered with the fleet, so never health-checked.
            host: Arc::new(crate::fleet::host::Host::new(
                format!("{scheme}://{addr}"),
                crate::config::BackendKind::Vllm,
                addr,
                tls,
                addr.to_string(),
                String::new(),
            )),
        }],
        passthrough: true,
        discovers: false,
        models_json: Vec::new(),
        tags_json: Vec::new(),
        from_api: false,
        metrics_slot: 0,
        routing: crate::config::Routing::RoundRobin,
        sticky: crate::config::Sticky::None,
    }
}

/// Counts an open connection (for the connection cap and for draining) from the moment
/// it is accepted; the count drops even if serving panicked.
pub struct OpenConnection(Rc<Worker>);

impl OpenConnection {
    pub fn new(worker: Rc<Worker>) -> Self {
        worker.connections.set(worker.connections.get() + 1);
        worker.metrics.connections.up();
        OpenConnection(worker)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.set(self.0.connections.get() - 1);
        self.0.metrics.connections.down();
    }
}

fn take_from(pool: &RefCell<Vec<Vec<u8>>>, size: usize) -> Vec<u8> {
    pool.borrow_mut()
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(size))
}
