//! Phase `authorize`: may this identity use this endpoint of this domain?
//!
//! A platform admin may do anything; otherwise the user must be a member of the domain
//! (the management plane's [`Directory`], for this box's own tokens and API keys) or the
//! token's domains claim must list it, and admin endpoints need the domain's admin role. A
//! disabled user of this box is refused whatever their token says. The answer is a
//! [`Denied`], which the data plane maps to its 401 or 403.

use super::directory::{Directory, DomainRole};
use super::keys::KeyStore;
use super::Identity;
use crate::scope::{DomainId, Endpoint};
use std::fmt;

/// Why an authenticated caller may not do what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The user of this box behind the credential is disabled (answered as a bad token:
    /// the credential itself is no good any more).
    Disabled,
    /// Neither a member of the domain nor listed in the token's domains claim.
    NotInDomain(DomainId),
    /// An admin endpoint, without the domain's admin role.
    AdminOnly,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Disabled => write!(f, "{}", super::TokenError::Disabled),
            Denied::NotInDomain(domain) => {
                write!(f, "this token may not use domain {domain:?}")
            }
            Denied::AdminOnly => f.write_str(
                "only domain admins may pull, push, create, copy or delete models, or use endpoints cubegate does not know",
            ),
        }
    }
}

/// Phase `authorize`: may `who` use `endpoint` of `domain`? `keys` is the store `who` was
/// verified with (it says which issuer is this box's own).
pub fn authorize(
    who: &Identity,
    domain: &DomainId,
    endpoint: Endpoint,
    keys: &KeyStore,
    directory: &Directory,
) -> Result<(), Denied> {
    let Identity::Token(claims) = who else {
        return Ok(());
    };
    // Memberships and disabled users belong to this box's users: only its own tokens and
    // API keys use them (an outside issuer's `sub` is another namespace of ids).
    let own = keys.issuers.get(claims.issuer).is_some_and(|i| i.own);
    if own && directory.is_disabled(&claims.sub) {
        return Err(Denied::Disabled);
    }
    if who.platform_admin() {
        return Ok(());
    }
    let membership = own
        .then(|| directory.role(domain.as_str(), &claims.sub))
        .flatten();
    let listed = claims
        .domains
        .as_ref()
        .is_some_and(|d| d.iter().any(|id| id == domain.as_str()));
    if membership.is_none() && !listed {
        return Err(Denied::NotInDomain(domain.clone()));
    }
    if endpoint.is_admin() && membership != Some(DomainRole::Admin) {
        return Err(Denied::AdminOnly);
    }
    Ok(())
}
