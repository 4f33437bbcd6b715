//! cubegate: an authenticating, model-routing gateway in front of GPU inference hosts.
//!
//! See `README.md` for how to run it and `../shared/DESIGN.md` for the contracts. The data
//! plane lives in `proxy` (one worker per core, see `runtime`), its request's life a list
//! of phases in `proxy::serve`; framing in `http`; the GPU hosts and how a request chooses
//! among them in `fleet`; the shared routing state in `snapshot`; authentication and
//! authorization in `auth`, a leaf that knows nothing of the data plane (what both sides
//! name, a domain id and an endpoint kind, lives in `scope`); the management plane in
//! `mgmt`.
//!
//! Only what the binaries need is public. Every module is private, so code nothing uses
//! is a compiler warning; tests, benches and fuzz targets reach the internals they
//! exercise through [`internals`].

mod auth;
mod config;
mod fleet;
mod handover;
mod hashing;
mod http;
mod listeners;
mod metrics;
mod mgmt;
mod notify;
mod proxy;
mod runtime;
mod scope;
mod snapshot;
mod tls;
mod usage;

pub mod internals;

pub use config::{Config, ConfigError};
pub use mgmt::migrate::run as migrate_store;
pub use runtime::{check_config, serve, CheckSummary};
pub use tls::gen_cert::{gen_cert, GenCert};
