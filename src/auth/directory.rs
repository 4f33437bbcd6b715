//! The management plane's word on who may do what: memberships, disabled users, API keys.
//!
//! A [`Directory`] is built by the management plane on every change and published inside
//! the snapshot; the data plane only reads it (`authenticate` looks API keys up in it,
//! `authorize` memberships and disabled users). It is immutable once published, and every
//! lookup is a hash probe keyed by what the request already holds (`&str` ids, a digest),
//! so the hot path allocates nothing.

use crate::scope::DomainId;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// A user's role in one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainRole {
    /// May use the domain's admin endpoints and manage its members.
    Admin,
    Member,
}

impl DomainRole {
    /// The name the management API and the store use.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainRole::Admin => "admin",
            DomainRole::Member => "member",
        }
    }

    pub fn parse(name: &str) -> Option<DomainRole> {
        match name {
            "admin" => Some(DomainRole::Admin),
            "member" => Some(DomainRole::Member),
            _ => None,
        }
    }
}

impl fmt::Display for DomainRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API key: scoped to one domain, acting for the user who made it.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub domain: DomainId,
    pub user: String,
    pub expires_at: Option<i64>,
}

/// Who belongs to which domain, as the management plane last published it.
#[derive(Debug, Default)]
pub struct Directory {
    /// domain id → user id → role in that domain.
    by_domain: HashMap<DomainId, HashMap<String, DomainRole>>,
    disabled: HashSet<String>,
    /// SHA-256 of each live API key → what it grants.
    api_keys: HashMap<Vec<u8>, ApiKey>,
}

impl Directory {
    /// `user`'s role in `domain`, when a member.
    pub fn role(&self, domain: &str, user: &str) -> Option<DomainRole> {
        self.by_domain.get(domain)?.get(user).copied()
    }

    pub fn is_disabled(&self, user: &str) -> bool {
        self.disabled.contains(user)
    }

    /// The live API key with this SHA-256 digest.
    pub fn api_key(&self, digest: &[u8]) -> Option<&ApiKey> {
        self.api_keys.get(digest)
    }

    /// Building (management plane, before publishing): `user` gets `role` in `domain`.
    pub fn add_member(&mut self, domain: DomainId, user: String, role: DomainRole) {
        self.by_domain.entry(domain).or_default().insert(user, role);
    }

    /// Building: `user` may not use anything.
    pub fn disable(&mut self, user: String) {
        self.disabled.insert(user);
    }

    /// Building: the key whose SHA-256 is `digest` works as `key` says.
    pub fn add_api_key(&mut self, digest: Vec<u8>, key: ApiKey) {
        self.api_keys.insert(digest, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        let mut d = Directory::default();
        d.add_member("d1".into(), "u1".into(), DomainRole::Member);
        d.add_member("d1".into(), "u2".into(), DomainRole::Admin);
        d.disable("u3".into());
        assert_eq!(d.role("d1", "u1"), Some(DomainRole::Member));
        assert_eq!(d.role("d1", "u2"), Some(DomainRole::Admin));
        assert_eq!(d.role("d2", "u1"), None);
        assert!(d.is_disabled("u3") && !d.is_disabled("u1"));
        for role in [DomainRole::Admin, DomainRole::Member] {
            assert_eq!(DomainRole::parse(role.as_str()), Some(role));
        }
        assert_eq!(DomainRole::parse("owner"), None);
    }
}
