//! What a request is scoped to, in the words both the data plane and `auth` use: the domain
//! ([`DomainId`]) and the kind of endpoint ([`Endpoint`]).
//!
//! These live below both `proxy` and `auth` so that neither imports the other. A
//! `DomainId` is a cheap-to-clone shared string (cloning it for a snapshot, a claim or an
//! API key is a reference-count increment, not a copy); it borrows as `&str`, so maps keyed
//! by it are looked up with the id as it sits in the request's path, without allocating.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The id of a domain: `/proxy/{domain_id}/...`, a domain map's key, what a token or an
/// API key grants. Not a `String`, so a user id or a model name cannot be passed for one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(Arc<str>);

impl DomainId {
    pub fn new(id: &str) -> DomainId {
        DomainId(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for DomainId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for DomainId {
    fn from(id: &str) -> DomainId {
        DomainId::new(id)
    }
}

impl From<String> for DomainId {
    fn from(id: String) -> DomainId {
        DomainId(Arc::from(id))
    }
}

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quoted like a string (`"d1"`): error messages show domain ids this way.
impl fmt::Debug for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// What kind of endpoint a proxied path is, the way Cube AI distinguishes permissions
/// (chat, completions, embeddings, model read, admin): routing classifies it, metrics count
/// by it, authorization decides by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v1/models` (answered locally).
    ListModels,
    /// `GET /api/tags` (answered locally unless the domain passes everything through).
    ListTags,
    Chat,
    Completions,
    Embeddings,
    /// Model metadata (`/v1/models/{id}`, `/api/show`, `/api/version`, `/api/ps`).
    ModelRead,
    /// Pull, push, create, copy, delete, running-model lists: domain admins only.
    Admin,
    /// Any other `/v1/*` or `/api/*` path (LoRA loading, sign-in, …): forwarded to admins
    /// only, since an unknown endpoint may do anything to the host. Users get the endpoints
    /// named above.
    Other,
}

impl Endpoint {
    /// Its index in `metrics::ROUTES`.
    pub fn metric_index(self) -> usize {
        match self {
            Endpoint::ListModels => 0,
            Endpoint::ListTags => 1,
            Endpoint::Chat => 2,
            Endpoint::Completions => 3,
            Endpoint::Embeddings => 4,
            Endpoint::ModelRead => 5,
            Endpoint::Admin => 6,
            Endpoint::Other => 7,
        }
    }

    /// Needs the domain's (or the platform's) admin role.
    pub fn is_admin(self) -> bool {
        matches!(self, Endpoint::Admin | Endpoint::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn domain_ids_look_up_by_str_and_print_as_before() {
        let mut map = HashMap::new();
        map.insert(DomainId::from("d1"), 1);
        assert_eq!(map.get("d1"), Some(&1));
        assert_eq!(map.get("d2"), None);
        let id = DomainId::from("d1".to_string());
        assert_eq!(format!("{id:?}"), format!("{:?}", "d1"));
        assert_eq!(id.to_string(), "d1");
        assert_eq!(id.as_str(), "d1");
        assert_eq!(id, DomainId::new("d1"));
    }

    #[test]
    fn metric_indexes_match_the_route_labels() {
        let all = [
            Endpoint::ListModels,
            Endpoint::ListTags,
            Endpoint::Chat,
            Endpoint::Completions,
            Endpoint::Embeddings,
            Endpoint::ModelRead,
            Endpoint::Admin,
            Endpoint::Other,
        ];
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.metric_index(), i);
        }
        assert_eq!(all.len(), crate::metrics::ROUTES.len());
        assert!(Endpoint::Admin.is_admin() && Endpoint::Other.is_admin());
        assert!(!Endpoint::Chat.is_admin());
    }
}
