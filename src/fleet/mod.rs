//! The GPU fleet: every host this box sends requests to, and how it chooses among them.
//!
//! - [`host`]: one host's shared state — in flight (counted over all workers), in or out
//!   of rotation and why, the load it last published.
//! - [`prefix`]: a request's prefix keys (hashes of its leading body bytes).
//! - [`policy`]: the routing policies (`auto`, `prefix`, `least_loaded`, `round_robin`).
//! - [`affinity`]: a worker's memory of which host served which prefix.
//! - [`balance`]: a worker's prefix groups' homes, evened out by their request rates.
//! - [`queue`]: a worker's wait for a host with room, fair across domains.
//! - [`health`]: active checks and load scrapes, on a thread of their own.
//! - [`metrics`]: the hosts' and the placements' Prometheus series.
//!
//! Hosts are registered by URL when a snapshot is built, so a host keeps its state across
//! reloads and is one value however many domains list it. The registry's lock is taken
//! only while building snapshots and by the health checker, never per request: requests
//! reach their hosts through the `Arc`s in the snapshot.

pub mod affinity;
pub mod balance;
pub mod health;
pub mod host;
pub mod metrics;
pub mod policy;
pub mod prefix;
pub mod queue;

use crate::config::BackendKind;
use host::Host;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

fn registry() -> &'static Mutex<HashMap<String, Arc<Host>>> {
    static HOSTS: OnceLock<Mutex<HashMap<String, Arc<Host>>>> = OnceLock::new();
    HOSTS.get_or_init(Mutex::default)
}

/// Where a host is, as a snapshot's backend names it.
pub struct HostAddress<'a> {
    pub url: &'a str,
    pub kind: BackendKind,
    pub addr: SocketAddr,
    pub tls: Option<rustls::pki_types::ServerName<'static>>,
    pub authority: &'a str,
    pub base_path: &'a str,
}

/// The host at `at`, registered on first sight. Its `max_in_flight` follows the latest
/// configuration that names it.
pub fn host(at: HostAddress<'_>, max_in_flight: u32) -> Arc<Host> {
    let mut hosts = registry().lock().unwrap_or_else(|e| e.into_inner());
    // Kind and address are part of the identity: the same URL re-declared as another kind
    // (or resolving elsewhere) is another host.
    let id = format!("{:?} {} {}", at.kind, at.addr, at.url);
    let host = hosts
        .entry(id)
        .or_insert_with(|| {
            Arc::new(Host::new(
                at.url.to_string(),
                at.kind,
                at.addr,
                at.tls,
                at.authority.to_string(),
                at.base_path.to_string(),
            ))
        })
        .clone();
    host.set_max_in_flight(max_in_flight);
    host
}

/// Every registered host that a snapshot still uses (hosts no longer named anywhere are
/// forgotten here once nothing else holds them).
pub fn hosts() -> Vec<Arc<Host>> {
    let mut hosts = registry().lock().unwrap_or_else(|e| e.into_inner());
    hosts.retain(|_, h| Arc::strong_count(h) > 1);
    let mut list: Vec<Arc<Host>> = hosts.values().cloned().collect();
    list.sort_by(|a, b| a.url.cmp(&b.url));
    list
}

/// `GET /backends`: every host with its state, load and the models the domains list for it.
pub fn status_json(models_of: impl Fn(&Host) -> Vec<String>) -> serde_json::Value {
    let hosts: Vec<serde_json::Value> = hosts()
        .iter()
        .map(|h| {
            let mut v = h.status_json();
            v["models"] = serde_json::json!(models_of(h));
            v
        })
        .collect();
    serde_json::json!({ "backends": hosts })
}
