//! The simulated GPU host: one per process, shared by every simulator thread.
//!
//! It holds the running batch and its queue (`batch.rs`), the prefix cache
//! (`prefix_cache.rs`, behind a Mutex: cheap next to a simulated prefill), the prefix-cache
//! counters, the fault switch (`fault.rs`), the request counters ([`Stats`]) and, for
//! Ollama's `/api/ps`, which models are loaded. A generation request goes through it as:
//! wait for a slot ([`Batch::admit`]), [`Host::start`] (cache lookup, counters, the
//! prefill time of the uncached tokens), [`Running::prefilled`] (its blocks become
//! cached), decode, and the end of [`Running`] (blocks and slot released).

use super::batch::{Batch, Slot};
use super::fault::{Fault, FaultSwitch};
use super::prefix_cache::{block_hashes, PrefixCache, Residency, BLOCK_TOKENS};
use super::{Config, Flavor};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How long Ollama keeps a model loaded after its last request (its default keep_alive).
pub const OLLAMA_KEEP_ALIVE: Duration = Duration::from_secs(300);

/// A generation that waited this long for a slot, or whose prefill took this long, is
/// counted as slow (`queue_waits_over_100ms`, `prefills_over_100ms`): what sets a fleet's
/// TTFT tail — a queue, or a prompt computed from scratch (a cold system prompt).
pub const SLOW: Duration = Duration::from_millis(100);

/// Process-wide request counters (atomics: the default path takes no lock).
#[derive(Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub streams_completed: AtomicU64,
    pub streams_aborted: AtomicU64,
    pub streams_died: AtomicU64,
    pub active_streams: AtomicU64,
    /// Whole answers cut mid-body (`die-mid-stream`).
    pub answers_cut: AtomicU64,
    /// Generations that waited at least [`SLOW`] for a slot, and those whose prefill (of
    /// their uncached tokens, before any `slow` fault's factor) took at least [`SLOW`].
    pub slow_queue_waits: AtomicU64,
    pub slow_prefills: AtomicU64,
    /// Answers sent, by status code (index = status).
    by_status: Vec<AtomicU64>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            requests: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            streams_aborted: AtomicU64::new(0),
            streams_died: AtomicU64::new(0),
            active_streams: AtomicU64::new(0),
            answers_cut: AtomicU64::new(0),
            slow_queue_waits: AtomicU64::new(0),
            slow_prefills: AtomicU64::new(0),
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Stats {
    /// Counts a generation's wait for a slot and its prefill, if either was slow.
    pub fn gpu_time(&self, queued: Duration, prefill: Duration) {
        if queued >= SLOW {
            self.slow_queue_waits.fetch_add(1, Relaxed);
        }
        if prefill >= SLOW {
            self.slow_prefills.fetch_add(1, Relaxed);
        }
    }

    /// Counts one answer sent with `status`.
    pub fn answered(&self, status: u16) {
        if let Some(n) = self.by_status.get(usize::from(status)) {
            n.fetch_add(1, Relaxed);
        }
    }

    /// (status, answers) for every status sent at least once, in order.
    pub fn by_status(&self) -> Vec<(u16, u64)> {
        (0..self.by_status.len())
            .filter_map(|s| {
                let n = self.by_status[s].load(Relaxed);
                (n > 0).then_some((s as u16, n))
            })
            .collect()
    }
}

/// The GPU host's state.
#[derive(Debug)]
pub struct Host {
    pub flavor: Flavor,
    /// The model name the metrics are labelled with: vLLM labels its metrics with its
    /// first served model name, and the state here is per host, not per model.
    pub model_label: String,
    pub batch: Batch,
    pub fault: FaultSwitch,
    pub stats: Stats,
    cache: Option<Mutex<PrefixCache>>,
    prefill_per_token: Duration,
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    /// Ollama: model → when it was last used.
    loaded: Mutex<Vec<(String, SystemTime)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A request's place on the GPU from its admission to its end.
pub struct Running<'a> {
    host: &'a Host,
    residency: Option<Residency>,
    /// Dropped after `residency` is released (see `Drop`), so the next request admitted
    /// sees this one's blocks freed.
    _slot: Slot<'a>,
}

impl Host {
    pub fn new(cfg: &Config) -> Host {
        let gpu = &cfg.gpu;
        let blocks = gpu.prefix_cache_tokens / BLOCK_TOKENS;
        Host {
            flavor: cfg.flavor,
            model_label: cfg.models.first().cloned().unwrap_or_default(),
            batch: Batch::new(gpu.slots),
            fault: FaultSwitch::new(gpu.fault, gpu.slow_factor, cfg.threads.max(1)),
            stats: Stats::default(),
            cache: (blocks > 0).then(|| Mutex::new(PrefixCache::new(blocks))),
            prefill_per_token: gpu.prefill_per_token,
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            loaded: Mutex::default(),
        }
    }

    pub fn fault(&self) -> Fault {
        self.fault.get()
    }

    /// A request that got its slot starts: its cached prefix is looked up (and counted,
    /// in tokens, like vLLM v1), its blocks taken. Returns it with the time its prefill
    /// takes: the uncached prompt tokens times `--prefill-us-per-token`.
    pub fn start<'a>(
        &'a self,
        slot: Slot<'a>,
        model: &str,
        prompt: &[u32],
    ) -> (Running<'a>, Duration) {
        if self.flavor == Flavor::Ollama {
            self.note_loaded(model);
        }
        let residency = self.cache.as_ref().map(|cache| {
            let hashes = block_hashes(model, prompt);
            let r = lock(cache).schedule(&hashes, prompt.len());
            self.prefix_queries.fetch_add(prompt.len() as u64, Relaxed);
            self.prefix_hits.fetch_add(r.hit_tokens as u64, Relaxed);
            r
        });
        let uncached = prompt.len() - residency.as_ref().map_or(0, |r| r.hit_tokens);
        let prefill = self.prefill_per_token * u32::try_from(uncached).unwrap_or(u32::MAX);
        let running = Running {
            host: self,
            residency,
            _slot: slot,
        };
        (running, prefill)
    }

    /// `vllm:prefix_cache_queries_total`: prompt tokens looked up.
    pub fn prefix_queries(&self) -> u64 {
        self.prefix_queries.load(Relaxed)
    }

    /// `vllm:prefix_cache_hits_total`: prompt tokens found cached.
    pub fn prefix_hits(&self) -> u64 {
        self.prefix_hits.load(Relaxed)
    }

    /// (`vllm:kv_cache_usage_perc`, blocks holding a cached prefix); zeros without a cache.
    pub fn kv_cache(&self) -> (f64, usize) {
        match &self.cache {
            Some(c) => {
                let c = lock(c);
                (c.usage(), c.cached_blocks())
            }
            None => (0.0, 0),
        }
    }

    /// Ollama's loaded models (used within the keep-alive) with when each expires.
    pub fn loaded_models(&self) -> Vec<(String, SystemTime)> {
        let now = SystemTime::now();
        lock(&self.loaded)
            .iter()
            .map(|(m, used)| (m.clone(), *used + OLLAMA_KEEP_ALIVE))
            .filter(|(_, expires)| *expires > now)
            .collect()
    }

    fn note_loaded(&self, model: &str) {
        let now = SystemTime::now();
        let mut loaded = lock(&self.loaded);
        match loaded.iter_mut().find(|(m, _)| m == model) {
            Some((_, used)) => *used = now,
            None => loaded.push((model.to_string(), now)),
        }
    }
}

impl Host {
    /// The counters as JSON: `GET /sim/stats` on the main port, `GET /stats` on the
    /// control listener.
    pub fn stats_json(&self) -> Vec<u8> {
        use std::fmt::Write;
        let st = &self.stats;
        let mut by_status = String::new();
        for (i, (status, n)) in st.by_status().into_iter().enumerate() {
            let comma = if i > 0 { "," } else { "" };
            let _ = write!(by_status, "{comma}\"{status}\":{n}");
        }
        let (usage, cached_blocks) = self.kv_cache();
        format!(
            "{{\"requests\":{},\"streams_completed\":{},\"streams_aborted\":{},\"active_streams\":{},\"streams_died\":{},\"answers_cut\":{},\"by_status\":{{{by_status}}},\"fault\":\"{}\",\"running\":{},\"waiting\":{},\"prefix_cache_queries\":{},\"prefix_cache_hits\":{},\"kv_cache_usage\":{usage:?},\"cached_blocks\":{cached_blocks},\"queue_waits_over_100ms\":{},\"prefills_over_100ms\":{}}}",
            st.requests.load(Relaxed),
            st.streams_completed.load(Relaxed),
            st.streams_aborted.load(Relaxed),
            st.active_streams.load(Relaxed),
            st.streams_died.load(Relaxed),
            st.answers_cut.load(Relaxed),
            self.fault().name(),
            self.batch.running(),
            self.batch.waiting(),
            self.prefix_queries(),
            self.prefix_hits(),
            st.slow_queue_waits.load(Relaxed),
            st.slow_prefills.load(Relaxed),
        )
        .into_bytes()
    }
}

impl Running<'_> {
    /// The prefill is done: the prompt's full blocks become cached.
    pub fn prefilled(&mut self) {
        if let (Some(cache), Some(r)) = (&self.host.cache, self.residency.as_mut()) {
            lock(cache).register(r);
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let (Some(cache), Some(r)) = (&self.host.cache, self.residency.take()) {
            lock(cache).release(r);
        }
    }
}
