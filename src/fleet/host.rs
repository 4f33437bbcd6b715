//! One GPU host as every worker of this box sees it: what is in flight on it, whether it
//! is in rotation, and the load it last published.
//!
//! A host is shared by all workers (and by every domain that lists its URL), so its state
//! is atomics, not a lock. Per request a worker does one increment and one decrement of
//! `in_flight` (on a cache line of its own, so the read-mostly fields next to it are not
//! invalidated) and reads the rest; everything else is written off the request path (the
//! health checker) or on failures only.

use crate::config::BackendKind;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Consecutive failed requests (resets, 5xx, first-byte timeouts) that take a host out.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// Consecutive failed health checks that take a host out.
pub const EJECT_AFTER_CHECKS: u32 = 2;
/// The first ejection lasts this long; each one right after the last doubles it.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX_DOUBLINGS: u32 = 5;

/// Why a host is out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ejection {
    /// In rotation.
    None = 0,
    /// It refused a connection: nothing listens there.
    Refused = 1,
    /// Requests failed one after another (resets, 5xx answers, no first byte in time).
    Failing = 2,
    /// Its health endpoint failed or did not answer in time.
    HealthCheck = 3,
}

impl Ejection {
    fn from_u8(v: u8) -> Ejection {
        match v {
            1 => Ejection::Refused,
            2 => Ejection::Failing,
            3 => Ejection::HealthCheck,
            _ => Ejection::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ejection::None => "up",
            Ejection::Refused => "refused_connection",
            Ejection::Failing => "failing_requests",
            Ejection::HealthCheck => "health_check_failed",
        }
    }
}

/// A failed request, as the passive health check counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connection refused: the host is down, out at once.
    Refused,
    /// Reset, bad or 5xx answer, first byte not in time: out after a few in a row.
    Failed,
}

impl Host {
    /// What `GET /backends` shows of the host.
    pub fn status_json(&self) -> serde_json::Value {
        let published = self.published();
        let ejection = self.ejection();
        let ejected_for_ms = self.ejected_until_ms().saturating_sub(now_ms());
        serde_json::json!({
            "url": self.url,
            "kind": match self.kind {
                BackendKind::Vllm => "vllm",
                BackendKind::Ollama => "ollama",
            },
            "state": if ejection == Ejection::None { "up" } else { "ejected" },
            "ejected_because": (ejection != Ejection::None).then_some(ejection.as_str()),
            "ejected_for_ms": (ejection != Ejection::None).then_some(ejected_for_ms),
            "in_flight": self.in_flight(),
            "max_in_flight": self.max_in_flight(),
            "queued": self.queued.load(Relaxed),
            "load": self.load(),
            "published": published.age_ms.map(|age| serde_json::json!({
                "running": published.running,
                "waiting": published.waiting,
                "kv_cache_usage": published.kv_cache_usage,
                "age_ms": age,
            })),
            "ejections": self.ejections.load(Relaxed),
            "retries": self.retries.load(Relaxed),
        })
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("url", &self.url)
            .field("in_flight", &self.in_flight())
            .field("ejection", &self.ejection())
            .finish()
    }
}

/// An `AtomicU32` alone on its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Padded(AtomicU32);

pub struct Host {
    /// The URL the configuration names it by (scheme, authority, base path).
    pub url: String,
    pub kind: BackendKind,
    pub addr: SocketAddr,
    /// `https://` hosts: the name its certificate must carry.
    pub tls: Option<rustls::pki_types::ServerName<'static>>,
    pub authority: String,
    pub base_path: String,
    /// Its position in every consistent order (from the URL: the same on every box).
    pub seed: u64,
    in_flight: Padded,
    /// 0 = no limit.
    max_in_flight: AtomicU32,
    ejection: AtomicU8,
    /// Milliseconds since `epoch()` until which an ejection lasts.
    ejected_until_ms: AtomicU64,
    request_failures: AtomicU32,
    check_failures: AtomicU32,
    /// Ejections right after one another (for the backoff); reset by a good stretch.
    ejections_in_a_row: AtomicU32,
    pub ejections: AtomicU64,
    pub retries: AtomicU64,
    /// Requests waiting in cubegate's queues with this host as their first choice.
    pub queued: AtomicU32,
    /// The host's own figures from its `/metrics` (vLLM), and what this box had in flight
    /// on it when they were read.
    scraped_running: AtomicU32,
    scraped_waiting: AtomicU32,
    scraped_kv_permille: AtomicU32,
    scraped_local: AtomicU32,
    scraped_at_ms: AtomicU64,
    /// A domain lists it with `models = []`: the health checker asks it what it serves.
    discovers: AtomicBool,
    /// What it said it serves, at the last ask.
    discovered: ArcSwap<Vec<String>>,
}

/// Milliseconds on the process's monotonic clock.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What the host published at its last scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Published {
    pub running: u32,
    pub waiting: u32,
    /// KV-cache use, 0..=1.
    pub kv_cache_usage: f32,
    /// How long ago, in ms (`None`: never scraped).
    pub age_ms: Option<u64>,
}

impl Host {
    pub fn new(
        url: String,
        kind: BackendKind,
        addr: SocketAddr,
        tls: Option<rustls::pki_types::ServerName<'static>>,
        authority: String,
        base_path: String,
    ) -> Host {
        Host {
            seed: xxhash_rust::xxh3::xxh3_64(url.as_bytes()),
            url,
            kind,
            addr,
            tls,
            authority,
            base_path,
            in_flight: Padded::default(),
            max_in_flight: AtomicU32::new(0),
            ejection: AtomicU8::new(Ejection::None as u8),
            ejected_until_ms: AtomicU64::new(0),
            request_failures: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            queued: AtomicU32::new(0),
            scraped_running: AtomicU32::new(0),
            scraped_waiting: AtomicU32::new(0),
            scraped_kv_permille: AtomicU32::new(0),
            scraped_local: AtomicU32::new(0),
            scraped_at_ms: AtomicU64::new(0),
            discovers: AtomicBool::new(false),
            discovered: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// From now on the health checker asks the host for its models.
    pub fn discover_models(&self) {
        self.discovers.store(true, Relaxed);
    }

    pub fn discovers(&self) -> bool {
        self.discovers.load(Relaxed)
    }

    /// The models the host said it serves (empty until it was asked).
    pub fn discovered(&self) -> Arc<Vec<String>> {
        self.discovered.load_full()
    }

    /// Whether the host said it serves `model`.
    pub fn has_discovered(&self, model: &str) -> bool {
        self.discovered.load().iter().any(|m| m == model)
    }

    /// Records what the host serves; returns whether it changed.
    pub fn record_models(&self, mut models: Vec<String>) -> bool {
        models.sort_unstable();
        models.dedup();
        if **self.discovered.load() == models {
            return false;
        }
        tracing::info!(host = %self.url, models = ?models, "GPU host's models changed");
        self.discovered.store(Arc::new(models));
        true
    }

    pub fn set_max_in_flight(&self, n: u32) {
        self.max_in_flight.store(n, Relaxed);
    }

    pub fn max_in_flight(&self) -> u32 {
        self.max_in_flight.load(Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.0.load(Relaxed)
    }

    /// Whether `try_acquire` would find a place now (another worker may take it first).
    pub fn has_room(&self) -> bool {
        let max = self.max_in_flight();
        max == 0 || self.in_flight() < max
    }

    /// Takes a place on the host, unless it is at its `max_in_flight`. The place is given
    /// back when the returned guard drops.
    pub fn try_acquire(self: &Arc<Self>) -> Option<InFlight> {
        let max = self.max_in_flight();
        let counter = &self.in_flight.0;
        if max == 0 {
            counter.fetch_add(1, Relaxed);
        } else {
            let mut now = counter.load(Relaxed);
            loop {
                if now >= max {
                    return None;
                }
                match counter.compare_exchange_weak(now, now + 1, Relaxed, Relaxed) {
                    Ok(_) => break,
                    Err(seen) => now = seen,
                }
            }
        }
        Some(InFlight(self.clone()))
    }

    /// The host's load as routing weighs it: what this box has in flight on it, plus
    /// what other boxes have there as far as its last published figures tell.
    pub fn load(&self) -> u32 {
        let mine = self.in_flight();
        if self.scraped_at_ms.load(Relaxed) == 0 {
            return mine;
        }
        let total = self.scraped_running.load(Relaxed) + self.scraped_waiting.load(Relaxed);
        let others = total.saturating_sub(self.scraped_local.load(Relaxed));
        mine + others
    }

    pub fn published(&self) -> Published {
        let at = self.scraped_at_ms.load(Relaxed);
        Published {
            running: self.scraped_running.load(Relaxed),
            waiting: self.scraped_waiting.load(Relaxed),
            kv_cache_usage: self.scraped_kv_permille.load(Relaxed) as f32 / 1000.0,
            age_ms: (at != 0).then(|| now_ms().saturating_sub(at)),
        }
    }

    /// Records the host's published load.
    pub fn record_scrape(&self, running: u32, waiting: u32, kv_cache_usage: f32) {
        self.scraped_running.store(running, Relaxed);
        self.scraped_waiting.store(waiting, Relaxed);
        let permille = (kv_cache_usage.clamp(0.0, 1.0) * 1000.0) as u32;
        self.scraped_kv_permille.store(permille, Relaxed);
        self.scraped_local.store(self.in_flight(), Relaxed);
        self.scraped_at_ms.store(now_ms().max(1), Relaxed);
    }

    /// Why the host is out of rotation (`Ejection::None`: it is in).
    pub fn ejection(&self) -> Ejection {
        Ejection::from_u8(self.ejection.load(Relaxed))
    }

    pub fn is_up(&self) -> bool {
        self.ejection.load(Relaxed) == Ejection::None as u8
    }

    /// When an ejection ends (ms on `now_ms`'s clock; 0 = not ejected).
    pub fn ejected_until_ms(&self) -> u64 {
        self.ejected_until_ms.load(Relaxed)
    }

    /// A request on this host got an answer: the failure streak ends. Reads first, so a
    /// healthy host costs no shared write per request.
    pub fn record_success(&self) {
        if self.request_failures.load(Relaxed) != 0 {
            self.request_failures.store(0, Relaxed);
        }
    }

    /// A request on this host failed before its answer began.
    pub fn record_failure(&self, failure: Failure) {
        match failure {
            Failure::Refused => self.eject(Ejection::Refused),
            Failure::Failed => {
                let streak = self.request_failures.fetch_add(1, Relaxed) + 1;
                if streak >= EJECT_AFTER_FAILURES {
                    self.eject(Ejection::Failing);
                }
            }
        }
    }

    /// The outcome of an active health check. A good check re-admits an ejected host once
    /// its backoff is over; failed ones in a row eject it.
    pub fn record_check(&self, ok: bool) {
        if ok {
            self.check_failures.store(0, Relaxed);
            self.readmit_if_backoff_over();
            return;
        }
        let streak = self.check_failures.fetch_add(1, Relaxed) + 1;
        if streak >= EJECT_AFTER_CHECKS {
            self.eject(Ejection::HealthCheck);
        }
    }

    /// An ejection ends once its backoff is over and a check (or, without active checks,
    /// the backoff alone) says so.
    pub fn readmit_if_backoff_over(&self) {
        if !self.is_up() && now_ms() >= self.ejected_until_ms() {
            self.readmit();
        }
    }

    fn eject(&self, why: Ejection) {
        let was = self.ejection.swap(why as u8, Relaxed);
        if was != Ejection::None as u8 {
            return; // already out; its backoff runs
        }
        let row = self.ejections_in_a_row.fetch_add(1, Relaxed);
        let backoff = BACKOFF_BASE * (1 << row.min(BACKOFF_MAX_DOUBLINGS));
        self.ejected_until_ms
            .store(now_ms() + backoff.as_millis() as u64, Relaxed);
        self.ejections.fetch_add(1, Relaxed);
        self.request_failures.store(0, Relaxed);
        tracing::warn!(host = %self.url, reason = why.as_str(), backoff_ms = backoff.as_millis() as u64, "GPU host taken out of rotation");
    }

    fn readmit(&self) {
        // Back in a while after its last ejection: a later one starts the backoff anew.
        let out_since = self.ejected_until_ms();
        if now_ms() > out_since + 30_000 {
            self.ejections_in_a_row.store(0, Relaxed);
        }
        self.request_failures.store(0, Relaxed);
        self.ejection.store(Ejection::None as u8, Relaxed);
        tracing::info!(host = %self.url, "GPU host back in rotation");
    }
}

/// A place taken on a host (see `Host::try_acquire`); given back on drop.
pub struct InFlight(Arc<Host>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.0.fetch_sub(1, Relaxed);
    }
}

/// A plain vLLM host on a loopback port, for the fleet's unit tests.
#[cfg(test)]
pub fn test_host(port: u16) -> std::sync::Arc<Host> {
    let addr = format!("127.0.0.1:{port}");
    std::sync::Arc::new(Host::new(
        format!("http://{addr}"),
        BackendKind::Vllm,
        addr.parse().unwrap(),
        None,
        addr,
        String::new(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Arc<Host> {
        test_host(9)
    }

    #[test]
    fn places_are_bounded_and_given_back() {
        let h = host();
        h.set_max_in_flight(2);
        let a = h.try_acquire().unwrap();
        let _b = h.try_acquire().unwrap();
        assert!(h.try_acquire().is_none());
        drop(a);
        assert_eq!(h.in_flight(), 1);
        assert!(h.try_acquire().is_some());
    }

    #[test]
    fn refusal_ejects_at_once_failures_after_a_streak() {
        let h = host();
        h.record_failure(Failure::Refused);
        assert_eq!(h.ejection(), Ejection::Refused);
        let h = host();
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            h.record_failure(Failure::Failed);
        }
        assert!(h.is_up());
        h.record_success();
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            h.record_failure(Failure::Failed);
        }
        assert!(h.is_up(), "a success ends the streak");
        h.record_failure(Failure::Failed);
        assert_eq!(h.ejection(), Ejection::Failing);
        assert_eq!(h.ejections.load(Relaxed), 1);
    }

    #[test]
    fn checks_eject_and_readmit_after_backoff() {
        let h = host();
        for _ in 0..EJECT_AFTER_CHECKS {
            h.record_check(false);
        }
        assert_eq!(h.ejection(), Ejection::HealthCheck);
        // Still inside the backoff: a good check does not re-admit yet.
        h.record_check(true);
        assert!(!h.is_up());
        h.ejected_until_ms.store(0, Relaxed);
        h.record_check(true);
        assert!(h.is_up());
    }

    #[test]
    fn load_counts_other_boxes_from_published_figures() {
        let h = host();
        let _mine = h.try_acquire().unwrap();
        assert_eq!(h.load(), 1);
        // The host reports 5 (1 of them ours): 4 are other boxes'.
        h.record_scrape(3, 2, 0.5);
        assert_eq!(h.load(), 5);
        assert_eq!(h.published().kv_cache_usage, 0.5);
    }
}
