//! Publication: what the data plane needs from the management plane, as a new snapshot.
//!
//! The memberships, disabled users and live API keys go out as auth's `Directory`, this
//! box's public keys as its own issuer's in the key store, and domains whose backends the
//! API set into the domain map.
//!
//! Management publications take turns (`Management::publishing`), each reading the store
//! and then replacing the snapshot, so two changes publishing at once cannot overwrite the
//! newer state with the older one. The store is read before `Published::replace`, not
//! under its writer lock: a shared database that is slow or hung must not hold up the
//! other publishers (a SIGHUP's file, the trusted issuers' keys), which change no part the
//! management plane owns. A failed read publishes nothing new (the running snapshot
//! stays): an empty list of disabled users or memberships must never go out because a read
//! failed. Every publication moves the revocation epoch, so workers empty their token
//! caches. After a SIGHUP the store's part of a reload runs on a thread of its own
//! ([`Management::sync_in_background`]): the signals thread feeds systemd's watchdog and
//! must never wait on a database.

use super::store::{StoreError, User};
use super::tokens::SigningKey;
use super::{unix_now, Management};
use crate::auth::claims::Role;
use crate::auth::directory::{ApiKey, Directory};
use crate::config::{BackendConfig, Config};
use crate::scope::DomainId;
use crate::snapshot::{Domain, Snapshot};
use crate::usage::limits::{ApiLimits, LimitBook};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

impl Management {
    /// Publishes the store's state; false when the store could not be read (the running
    /// snapshot stays, and a caller following another box's changes must try again).
    pub fn publish(&self) -> bool {
        let _turn = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let (directory, api_domains, api_limits) = match self.read_state() {
            Ok(state) => state,
            Err(e) => {
                tracing::error!("not publishing management changes, the store failed: {e}");
                return false;
            }
        };
        self.published.replace(|old, generation| {
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
        true
    }

    /// Records the domains of a reloaded file in the store and publishes, on a thread of
    /// its own. Reloads that come while one is at it are taken up by the same thread when it
    /// is done, the newest file only, so a hung database holds one thread, not one a SIGHUP.
    pub fn sync_in_background(self: &Arc<Self>, config: Config) {
        let mut pending = self.pending_sync.lock().unwrap_or_else(|p| p.into_inner());
        pending.config = Some(config);
        if pending.running {
            return;
        }
        pending.running = true;
        drop(pending);
        let mgmt = self.clone();
        let spawned = std::thread::Builder::new()
            .name("cubegate-mgmt-reload".into())
            .spawn(move || loop {
                let next = {
                    let mut pending = mgmt.pending_sync.lock().unwrap_or_else(|p| p.into_inner());
                    match pending.config.take() {
                        Some(config) => config,
                        None => {
                            pending.running = false;
                            return;
                        }
                    }
                };
                // Domains the file now declares exist in the store too, so members can be
                // added to them without a restart.
                if let Err(e) = mgmt.sync_config_domains(&next) {
                    tracing::error!("reload: {e}");
                }
                mgmt.publish();
            });
        if let Err(e) = spawned {
            tracing::error!("reload: cannot start the management reload: {e}");
            let mut pending = self.pending_sync.lock().unwrap_or_else(|p| p.into_inner());
            *pending = PendingSync::default();
        }
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

/// A reload the management plane has yet to apply, and whether a thread is at it.
#[derive(Default)]
pub struct PendingSync {
    config: Option<Config>,
    running: bool,
}
