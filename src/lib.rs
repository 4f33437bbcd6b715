//! cubegate: an authenticating, model-routing gateway in front of GPU inference hosts.
//!
//! See `README.md` for how to run it and `../shared/DESIGN.md` for the contracts. The data
//! plane lives in [`proxy`] (one worker per core, see [`runtime`]), framing in [`http`],
//! the shared routing state in [`snapshot`], and authentication and authorization in
//! [`auth`], a leaf that knows nothing of the data plane: what both sides name (a domain
//! id, an endpoint kind) lives in [`scope`].

pub mod auth;
pub mod config;
pub mod fleet;
pub mod handover;
pub mod http;
pub mod listeners;
pub mod metrics;
pub mod mgmt;
pub mod notify;
pub mod proxy;
pub mod runtime;
pub mod scope;
pub mod snapshot;
pub mod tls;
