//! Limits: how much a domain, each of its members, and each API key may use.
//!
//! A limit set ([`Limits`]) has four figures, 0 meaning none: requests per minute, tokens
//! per minute, tokens per day and concurrent requests. A domain has its own set and a
//! default for each member (`[domains.limits]`, `[domains.member_limits]` in the config
//! file, or through the management API, which overrides the file); members and API keys
//! may have their own sets, set through the API. The [`LimitBook`] holds all of them for
//! the data plane, published inside the snapshot.

use crate::scope::DomainId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// One limit set; 0 (or absent) = no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub tokens_per_day: u32,
    pub concurrent: u32,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }
}

/// A domain's own limits and its members' default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DomainLimits {
    /// The whole domain.
    pub domain: Limits,
    /// Each member, unless they have their own set.
    pub per_member: Limits,
}

/// Limits set through the management API.
#[derive(Debug, Clone, Default)]
pub struct ApiLimits {
    /// Override the config file's for these domains.
    pub domains: HashMap<DomainId, DomainLimits>,
    /// domain id → user id → that member's own set.
    pub members: HashMap<DomainId, HashMap<String, Limits>>,
    /// API key id → its set.
    pub keys: HashMap<String, Limits>,
}

/// Every limit in force, as the data plane reads it: the config file's (replaced on
/// reload) and the management API's (replaced on every management change), kept apart so
/// each side republishes only its own.
#[derive(Debug, Clone, Default)]
pub struct LimitBook {
    pub file: Arc<HashMap<DomainId, DomainLimits>>,
    pub api: Arc<ApiLimits>,
}

impl LimitBook {
    /// The domain's limits: the API's when it set them, else the file's.
    pub fn domain(&self, domain: &str) -> DomainLimits {
        self.api
            .domains
            .get(domain)
            .or_else(|| self.file.get(domain))
            .copied()
            .unwrap_or_default()
    }

    /// The limits of `user` in `domain`: their own set, else the domain's per-member one.
    pub fn member(&self, domain: &str, user: &str) -> Limits {
        self.own_member(domain, user)
            .unwrap_or_else(|| self.domain(domain).per_member)
    }

    /// The set `user` has of their own in `domain`, if any.
    pub fn own_member(&self, domain: &str, user: &str) -> Option<Limits> {
        self.api.members.get(domain)?.get(user).copied()
    }

    /// An API key's own limits.
    pub fn key(&self, id: &str) -> Limits {
        self.api.keys.get(id).copied().unwrap_or_default()
    }
}
