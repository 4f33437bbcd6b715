//! Publication: what the data plane needs from the management plane, as a new snapshot.
//!
//! The memberships, disabled users and live API keys go out as auth's `Directory`, this
//! box's public keys as its own issuer's in the key store, and domains whose backends the
//! API set into the domain map.
//!
//! The store is read inside `Published::replace`, under the writer lock, so two changes
//! publishing at once cannot overwrite the newer state with the older one. A failed read
//! publishes nothing new (the running snapshot stays): an empty list of disabled users or
//! memberships must never go out because a read failed. Every publication moves the
//! revocation epoch, so workers empty their token caches.

use super::store::{StoreError, User};
use super::tokens::SigningKey;
use super::{unix_now, Management};
use crate::auth::claims::Role;
use crate::auth::directory::{ApiKey, Directory};
use crate::config::BackendConfig;
use crate::scope::DomainId;
use crate::snapshot::{Domain, Snapshot};
use crate::usage::limits::{ApiLimits, LimitBook};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

impl Management {
    /// Publishes the store's state; false when the store could not be read (the running
    /// snapshot stays, and a caller following another box's changes must try again).
    pub fn publish(&self) -> bool {
        let read = std::cell::Cell::new(true);
        self.published.replace(|old, generation| {
            let (directory, api_domains, api_limits) = match self.read_state() {
                Ok(state) => state,
                Err(e) => {
                    read.set(false);
                    tracing::error!("not publishing management changes, the store failed: {e}");
                    return Snapshot {
                        generation,
                        domains: old.domains.clone(),
                        keys: old.keys.clone(),
                        revocation_epoch: old.revocation_epoch,
                        directory: old.directory.clone(),
                        limits: old.limits.clone(),
                    };
                }
            };
            let mut keys = old.keys.rebuilt();
            keys.generation = generation;
            if let Some(own) = keys.issuers.iter_mut().find(|i| i.own) {
                own.keys = self.keys().iter().map(SigningKey::verifying_key).collect();
            }
            // Config domains as they are; API domains as the store has them now.
            let mut domains: HashMap<DomainId, Arc<Domain>> = old
                .domains
                .iter()
                .filter(|(_, d)| !d.from_api)
                .map(|(id, d)| (id.clone(), d.clone()))
                .collect();
            for d in api_domains {
                domains.entry(d.id.clone()).or_insert(d);
            }
            Snapshot {
                generation,
                domains,
                keys: Arc::new(keys),
                revocation_epoch: old.revocation_epoch + 1,
                directory: Arc::new(directory),
                // A limit set through the API is in force from the next request.
                limits: LimitBook {
                    file: old.limits.file.clone(),
                    api: Arc::new(api_limits),
                },
            }
        });
        read.get()
    }

    fn read_state(&self) -> Result<(Directory, Vec<Arc<Domain>>, ApiLimits), StoreError> {
        let store = self.store();
        let memberships = store.memberships()?;
        let users: Vec<User> = store.users()?;
        let keys = store.live_api_keys(unix_now())?;
        let backends = store.api_backends()?;
        let api_limits = store.api_limits()?;
        drop(store);

        let mut directory = Directory::default();
        for (domain, user, role) in memberships {
            directory.add_member(DomainId::from(domain), user, role);
        }
        for u in users.iter().filter(|u| u.disabled) {
            directory.disable(u.id.clone());
        }
        let admins: HashSet<&str> = users
            .iter()
            .filter(|u| u.role == Role::Admin)
            .map(|u| u.id.as_str())
            .collect();
        for k in keys {
            // A key acts for its creator: once the creator may no longer use the domain,
            // neither may the key.
            let creator_may = admins.contains(k.created_by.as_str())
                || directory.role(&k.domain_id, &k.created_by).is_some();
            if !creator_may {
                continue;
            }
            let key = ApiKey {
                id: k.id,
                domain: DomainId::from(k.domain_id),
                user: k.created_by,
                expires_at: k.expires_at,
            };
            directory.add_api_key(k.digest, key);
        }
        let mut api_domains = Vec::new();
        for (id, _name, json) in backends {
            let built = serde_json::from_str::<Vec<BackendConfig>>(&json)
                .map_err(|e| e.to_string())
                .and_then(|b| Domain::build("backends", &id, &b, true).map_err(|e| e.to_string()));
            match built {
                Ok(d) => api_domains.push(Arc::new(d)),
                Err(e) => tracing::error!(domain = %id, "stored backends unusable: {e}"),
            }
        }
        Ok((directory, api_domains, api_limits))
    }
}
