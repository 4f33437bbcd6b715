//! The immutable state every worker routes by, and how a new one reaches the workers.
//!
//! A [`Snapshot`] holds the domain map (domains → backends → models), with the answers that
//! depend only on it (the `/v1/models` and `/api/tags` bodies) rendered once at build time,
//! and what authentication needs: the trusted issuers' keys (`auth::keys::KeyStore`, built
//! by `auth` and handed in) and the management plane's memberships, disabled users and API
//! keys (`auth::directory::Directory`). It is never mutated: a reload builds a new one and [`Published::publish`] swaps it in.
//! Workers hold a [`LocalSnapshot`]; per request they do one relaxed load of the generation
//! counter and only touch the shared `ArcSwap` when it moved, so the hot path writes nothing
//! shared. A request in flight keeps the `Arc` it started with, so reload never disturbs it.

use crate::auth::directory::Directory;
use crate::auth::jwks_fetch::KeyCell;
use crate::auth::keys::KeyStore;
use crate::config::{parse_backend_url, BackendConfig, BackendKind, Config, ConfigError};
use crate::scope::DomainId;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Backend {
    pub kind: BackendKind,
    pub addr: SocketAddr,
    /// `https://` backends: the name its certificate must carry.
    pub tls: Option<rustls::pki_types::ServerName<'static>>,
    /// What goes into the upstream `Host` header.
    pub authority: String,
    /// Prefix put before the forwarded path ("" or "/something").
    pub base_path: String,
    pub models: Vec<String>,
    /// `models = ["*"]`: serves whatever it is asked for.
    pub any_model: bool,
    /// `models = []`: serves what the host says it serves (asked by the health checker).
    pub discover: bool,
    /// The GPU host's shared state (in flight, rotation, load), one per URL however many
    /// domains list it.
    pub host: Arc<crate::fleet::host::Host>,
}

impl Backend {
    pub fn serves(&self, model: &str) -> bool {
        if self.discover {
            return self.host.has_discovered(model);
        }
        self.any_model || self.models.iter().any(|m| m == model)
    }

    /// The models it serves by name: configured, or discovered.
    fn named_models(&self) -> Vec<String> {
        if self.discover {
            return self.host.discovered().to_vec();
        }
        self.models.iter().filter(|m| *m != "*").cloned().collect()
    }
}

#[derive(Debug)]
pub struct Domain {
    pub id: DomainId,
    pub backends: Vec<Backend>,
    /// One backend serving any model: bodies need no inspection at all.
    pub passthrough: bool,
    /// A backend asks its host for its models: the model lists are rendered when asked
    /// for, not once here.
    pub discovers: bool,
    /// `GET /v1/models` answer, OpenAI list format.
    pub models_json: Vec<u8>,
    /// `GET /api/tags` answer, Ollama format (models of Ollama backends).
    pub tags_json: Vec<u8>,
    /// Backends set through the management API (not the config file).
    pub from_api: bool,
    /// Where this domain's request counts go (`metrics::domain_slot`).
    pub metrics_slot: u16,
    /// How requests choose among the hosts (`[[domains]] routing`).
    pub routing: crate::config::Routing,
    /// What pins a conversation to its host (`[[domains]] sticky`).
    pub sticky: crate::config::Sticky,
}

impl Domain {
    /// Indexes of the backends that may serve `model` on this route, in configuration
    /// order. `ollama_only` for Ollama's native API.
    pub fn candidates<'a>(
        &'a self,
        model: Option<&'a str>,
        ollama_only: bool,
    ) -> impl Iterator<Item = usize> + 'a {
        self.backends
            .iter()
            .enumerate()
            .filter(move |(_, b)| !ollama_only || b.kind == BackendKind::Ollama)
            .filter(move |(_, b)| model.is_none_or(|m| b.serves(m)))
            .map(|(i, _)| i)
    }

    pub fn has_ollama(&self) -> bool {
        self.backends.iter().any(|b| b.kind == BackendKind::Ollama)
    }
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub domains: HashMap<DomainId, Arc<Domain>>,
    /// Every trusted issuer's verification keys.
    pub keys: Arc<KeyStore>,
    /// Moves when a revocation must reach cached tokens (management plane).
    pub revocation_epoch: u64,
    /// Domain memberships, disabled users and API keys, from the management plane.
    pub directory: Arc<Directory>,
    /// Every limit in force: the config file's, overridden by the management API's.
    pub limits: crate::usage::limits::LimitBook,
}

impl Domain {
    /// Builds a domain from backend declarations (the config file's or the management
    /// API's); `key` names where they came from in errors.
    pub fn build(
        key: &str,
        id: &str,
        declared: &[BackendConfig],
        from_api: bool,
    ) -> Result<Domain, ConfigError> {
        let mut backends = Vec::new();
        for (j, b) in declared.iter().enumerate() {
            let url = parse_backend_url(&format!("{key}.backends[{j}].url"), &b.url)?;
            let host = crate::fleet::host(
                crate::fleet::HostAddress {
                    url: &b.url,
                    kind: b.kind,
                    addr: url.addr,
                    tls: url.tls_name.clone(),
                    authority: &url.authority,
                    base_path: &url.base_path,
                },
                b.max_in_flight,
            );
            if b.models.is_empty() {
                host.discover_models();
            }
            backends.push(Backend {
                kind: b.kind,
                addr: url.addr,
                tls: url.tls_name,
                authority: url.authority,
                base_path: url.base_path,
                any_model: b.models.iter().any(|m| m == "*"),
                discover: b.models.is_empty(),
                models: b.models.clone(),
                host,
            });
        }
        let passthrough = backends.len() == 1 && backends[0].any_model;
        let discovers = backends.iter().any(|b| b.discover);
        let models_json = render_models(&backends);
        let tags_json = render_tags(&backends);
        Ok(Domain {
            id: DomainId::new(id),
            backends,
            passthrough,
            discovers,
            models_json,
            tags_json,
            from_api,
            metrics_slot: crate::metrics::domain_slot(id),
            routing: crate::config::Routing::default(),
            sticky: crate::config::Sticky::default(),
        })
    }
}

impl Snapshot {
    /// The config file's domain map, with `keys` (`KeyStore::from_config` of the same file)
    /// and no management-plane state yet.
    pub fn from_config(
        config: &Config,
        generation: u64,
        keys: KeyStore,
    ) -> Result<Snapshot, ConfigError> {
        let mut domains = HashMap::new();
        let mut limits = HashMap::new();
        for (i, d) in config.domains.iter().enumerate() {
            let mut domain = Domain::build(&format!("domains[{i}]"), &d.id, &d.backends, false)?;
            domain.routing = d.routing;
            domain.sticky = d.sticky;
            let own = crate::usage::limits::DomainLimits {
                domain: d.limits,
                per_member: d.member_limits,
            };
            limits.insert(domain.id.clone(), own);
            domains.insert(domain.id.clone(), Arc::new(domain));
        }
        Ok(Snapshot {
            generation,
            domains,
            keys: Arc::new(keys),
            revocation_epoch: 0,
            directory: Arc::default(),
            limits: crate::usage::limits::LimitBook {
                file: Arc::new(limits),
                api: Arc::default(),
            },
        })
    }
}

impl Domain {
    /// `GET /v1/models`: rendered at build time, or now when hosts report their models.
    pub fn models_body(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.discovers {
            render_models(&self.backends).into()
        } else {
            (&self.models_json[..]).into()
        }
    }

    /// `GET /api/tags`, likewise.
    pub fn tags_body(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.discovers {
            render_tags(&self.backends).into()
        } else {
            (&self.tags_json[..]).into()
        }
    }
}

fn listed_models(backends: &[Backend], kind: Option<BackendKind>) -> Vec<String> {
    let mut models: Vec<String> = backends
        .iter()
        .filter(|b| kind.is_none_or(|k| b.kind == k))
        .flat_map(|b| b.named_models())
        .collect();
    models.sort_unstable();
    models.dedup();
    models
}

fn render_models(backends: &[Backend]) -> Vec<u8> {
    let data: Vec<_> = listed_models(backends, None)
        .into_iter()
        .map(|m| {
            let owner = backends
                .iter()
                .find(|b| b.serves(&m))
                .map_or("cubegate", |b| match b.kind {
                    BackendKind::Vllm => "vllm",
                    BackendKind::Ollama => "ollama",
                });
            serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": owner})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).unwrap_or_default()
}

fn render_tags(backends: &[Backend]) -> Vec<u8> {
    let models: Vec<_> = listed_models(backends, Some(BackendKind::Ollama))
        .into_iter()
        .map(|m| serde_json::json!({"name": m, "model": m}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"models": models})).unwrap_or_default()
}

/// The one shared cell: written by the reloader and the JWKS fetcher (one at a time,
/// under `writer`), read by workers without a lock.
pub struct Published {
    generation: AtomicU64,
    current: ArcSwap<Snapshot>,
    writer: std::sync::Mutex<()>,
    last_generation: AtomicU64,
}

impl Published {
    pub fn new(snapshot: Snapshot) -> Published {
        Published {
            generation: AtomicU64::new(snapshot.generation),
            last_generation: AtomicU64::new(snapshot.generation),
            current: ArcSwap::from_pointee(snapshot),
            writer: std::sync::Mutex::new(()),
        }
    }

    /// Replaces the snapshot with one built from the current one. `build` gets the next
    /// generation number.
    pub fn replace(&self, build: impl FnOnce(&Snapshot, u64) -> Snapshot) {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.last_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let old = self.load();
        self.publish(build(&old, generation));
    }

    /// Publishes the keys `build` makes of the current ones, keeping everything else.
    pub fn update_keys(&self, build: impl FnOnce(&KeyStore) -> KeyStore) {
        self.replace(|old, generation| {
            let mut keys = build(&old.keys);
            keys.generation = generation;
            Snapshot {
                generation,
                domains: old.domains.clone(),
                keys: Arc::new(keys),
                revocation_epoch: old.revocation_epoch,
                directory: old.directory.clone(),
                limits: old.limits.clone(),
            }
        });
    }

    fn publish(&self, snapshot: Snapshot) {
        let generation = snapshot.generation;
        self.current.store(Arc::new(snapshot));
        // Release pairs with the worker's Acquire re-load through ArcSwap; the relaxed
        // probe only has to notice "something changed" eventually.
        self.generation.store(generation, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}

/// The JWKS fetcher reads and publishes keys through the snapshot.
impl KeyCell for Published {
    fn current_keys(&self) -> Arc<KeyStore> {
        self.load().keys.clone()
    }

    fn publish_keys(&self, next: &dyn Fn(&KeyStore) -> KeyStore) {
        self.update_keys(next);
    }
}

/// A worker's handle on the current snapshot. Requests hold it through an `Rc`, so taking
/// it per request is a worker-local increment, not an atomic write to a shared counter.
pub struct LocalSnapshot {
    shared: Arc<Published>,
    current: SnapshotRef,
}

/// The extra `Rc` layer is the point: cloning it per request is a plain local increment,
/// where cloning the `Arc` would be an atomic write to a counter all workers share.
#[allow(clippy::redundant_allocation)]
pub type SnapshotRef = Rc<Arc<Snapshot>>;

impl LocalSnapshot {
    pub fn new(shared: Arc<Published>) -> LocalSnapshot {
        let current = Rc::new(shared.load());
        LocalSnapshot { shared, current }
    }

    /// The snapshot to serve the next request with.
    pub fn current(&mut self) -> SnapshotRef {
        if self.shared.generation() != self.current.generation {
            self.current = Rc::new(self.shared.load());
        }
        self.current.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
[[domains]]
id = "d1"
[[domains.backends]]
kind = "vllm"
url = "http://127.0.0.1:9001"
models = ["b", "a"]
[[domains.backends]]
kind = "ollama"
url = "http://127.0.0.1:9002"
models = ["c", "a"]
[[domains]]
id = "d2"
[[domains.backends]]
kind = "ollama"
url = "http://127.0.0.1:9003"
models = ["*"]
"#;

    fn from_config(c: &Config, generation: u64) -> Snapshot {
        Snapshot::from_config(c, generation, KeyStore::default()).unwrap()
    }

    #[test]
    fn builds_domains_and_lists() {
        let c = Config::parse(TWO).unwrap();
        let s = from_config(&c, 1);
        let d1 = &s.domains["d1"];
        assert!(!d1.passthrough);
        assert!(s.domains["d2"].passthrough);
        let v: serde_json::Value = serde_json::from_slice(&d1.models_json).unwrap();
        let ids: Vec<_> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(d1.candidates(Some("a"), false).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(d1.candidates(Some("a"), true).collect::<Vec<_>>(), [1]);
        assert_eq!(d1.candidates(Some("zzz"), false).count(), 0);
    }

    #[test]
    fn workers_see_a_new_generation() {
        let c = Config::parse(TWO).unwrap();
        let shared = Arc::new(Published::new(from_config(&c, 1)));
        let mut local = LocalSnapshot::new(shared.clone());
        assert_eq!(local.current().generation, 1);
        shared.replace(|_, g| from_config(&Config::parse("").unwrap(), g));
        assert_eq!(local.current().generation, 2);
        assert!(local.current().domains.is_empty());
    }
}
