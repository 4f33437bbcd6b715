//! The per-worker verified-token cache.
//!
//! A signature is checked once per token per worker; later requests with the same token
//! cost a keyed hash of the token, one table probe and a byte comparison. The cache is
//! owned by one worker (no lock, no atomic), bounded, and evicts with CLOCK (a hit only sets
//! a flag, so hits write nothing shared and stay O(1)). Keys are the whole token: the hash
//! (keyed per process, so an attacker cannot aim collisions) finds the slot and a full
//! comparison confirms it, so a collision can never authenticate. Expiry is re-checked on
//! every hit. Failed tokens are remembered briefly (negative entries) so a flood of the same
//! forged token costs one signature check per worker per `NEGATIVE_TTL_S`. The check
//! service's grants (`[auth] check_url`) are kept for the age its answer names, and its
//! refusals like failed tokens: one call per token per worker while they last.
//!
//! The whole cache is emptied when the key store's generation or the revocation epoch
//! changes (`sync_epoch`).

use super::claims::VerifiedClaims;
use super::TokenError;
use crate::hashing::PreHashedMap;
use crate::metrics::WorkerMetrics;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// How long a failed token is answered from the cache.
pub const NEGATIVE_TTL_S: f64 = 10.0;

#[derive(Debug, Clone)]
pub enum Verdict {
    Valid(Rc<VerifiedClaims>),
    /// The check service's grant (`[auth] check_url`): good until `until`, then asked again.
    Vouched {
        claims: Rc<VerifiedClaims>,
        until: f64,
    },
    Invalid {
        error: TokenError,
        until: f64,
    },
}

struct Slot {
    hash: u64,
    token: Box<[u8]>,
    verdict: Verdict,
    referenced: bool,
}

pub struct TokenCache {
    index: PreHashedMap<u32>,
    slots: Vec<Slot>,
    hand: usize,
    capacity: usize,
    hasher: ahash::RandomState,
    /// (key generation, revocation epoch) the entries were verified under.
    epoch: (u64, u64),
    /// Hits, negative hits and misses are counted into the worker's metrics.
    pub metrics: Arc<WorkerMetrics>,
}

impl TokenCache {
    pub fn new(capacity: usize, metrics: Arc<WorkerMetrics>) -> TokenCache {
        TokenCache {
            index: HashMap::with_capacity_and_hasher(capacity.min(1 << 16), Default::default()),
            slots: Vec::new(),
            hand: 0,
            capacity: capacity.max(1),
            hasher: ahash::RandomState::new(),
            epoch: (0, 0),
            metrics,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Empties the cache when keys or revocations moved since the entries were made.
    pub fn sync_epoch(&mut self, epoch: (u64, u64)) {
        if self.epoch != epoch {
            self.epoch = epoch;
            self.index.clear();
            self.slots.clear();
            self.hand = 0;
        }
    }

    fn hash(&self, token: &[u8]) -> u64 {
        self.hasher.hash_one(token)
    }

    /// The cached verdict for `token`, if any and still current. Counts hits and misses.
    pub fn get(&mut self, token: &[u8], now: f64) -> Option<&Verdict> {
        let h = self.hash(token);
        let Some(&i) = self.index.get(&h) else {
            self.metrics.token_cache_misses.inc();
            return None;
        };
        let slot = &mut self.slots[i as usize];
        if *slot.token != *token {
            self.metrics.token_cache_misses.inc();
            return None;
        }
        match slot.verdict {
            Verdict::Invalid { until, .. } | Verdict::Vouched { until, .. } if until < now => {
                self.metrics.token_cache_misses.inc();
                return None;
            }
            Verdict::Invalid { .. } => self.metrics.token_cache_negative_hits.inc(),
            Verdict::Valid(_) | Verdict::Vouched { .. } => self.metrics.token_cache_hits.inc(),
        }
        slot.referenced = true;
        Some(&slot.verdict)
    }

    pub fn insert(&mut self, token: &[u8], verdict: Verdict) {
        let h = self.hash(token);
        let slot = Slot {
            hash: h,
            token: token.into(),
            verdict,
            referenced: false,
        };
        if let Some(&i) = self.index.get(&h) {
            // Same hash: the same token re-verified, or a collision; the newer one wins.
            self.slots[i as usize] = slot;
            return;
        }
        if self.slots.len() < self.capacity {
            self.index.insert(h, self.slots.len() as u32);
            self.slots.push(slot);
            return;
        }
        // CLOCK: skip (and clear) recently used slots, evict the first one not used.
        loop {
            let s = &mut self.slots[self.hand];
            if s.referenced {
                s.referenced = false;
                self.hand = (self.hand + 1) % self.capacity;
                continue;
            }
            let old = s.hash;
            self.index.remove(&old);
            self.index.insert(h, self.hand as u32);
            self.slots[self.hand] = slot;
            self.hand = (self.hand + 1) % self.capacity;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::claims::Role;

    fn claims(sub: &str) -> Verdict {
        let key = crate::auth::directory::ApiKey {
            id: "k".into(),
            domain: "d".into(),
            user: sub.into(),
            expires_at: None,
        };
        Verdict::Valid(Rc::new(VerifiedClaims::of_api_key(&key, 0)))
    }

    #[test]
    fn hits_misses_and_bounds() {
        let mut c = TokenCache::new(3, Default::default());
        assert!(c.get(b"t1", 0.0).is_none());
        c.insert(b"t1", claims("a"));
        assert!(matches!(c.get(b"t1", 0.0), Some(Verdict::Valid(v)) if v.sub() == "a"));
        for i in 0..10 {
            c.insert(format!("x{i}").as_bytes(), claims("x"));
            assert!(c.len() <= 3);
        }
        assert_eq!(c.metrics.token_cache_hits.get(), 1);
        c.insert(
            b"bad",
            Verdict::Invalid {
                error: TokenError::BadSignature,
                until: 5.0,
            },
        );
        assert!(c.get(b"bad", 4.0).is_some());
        assert!(c.get(b"bad", 6.0).is_none(), "negative entries expire");
        let vouched = |until| Verdict::Vouched {
            claims: Rc::new(VerifiedClaims::of_check(
                "v".into(),
                Vec::new(),
                Role::User,
                Vec::new(),
            )),
            until,
        };
        c.insert(b"checked", vouched(5.0));
        assert!(matches!(
            c.get(b"checked", 4.0),
            Some(Verdict::Vouched { .. })
        ));
        assert!(
            c.get(b"checked", 6.0).is_none(),
            "the check service's grants expire"
        );
        c.sync_epoch((1, 0));
        assert!(c.is_empty());
    }

    #[test]
    fn recently_used_entries_survive_eviction() {
        let mut c = TokenCache::new(2, Default::default());
        c.insert(b"hot", claims("h"));
        c.insert(b"cold", claims("c"));
        for i in 0..5 {
            assert!(c.get(b"hot", 0.0).is_some(), "round {i}");
            c.insert(format!("new{i}").as_bytes(), claims("n"));
        }
    }

    /// A colliding hash must not authenticate: the full comparison decides.
    #[test]
    fn collisions_never_authenticate() {
        let mut c = TokenCache::new(4, Default::default());
        c.insert(b"genuine", claims("victim"));
        // Forge an index entry for another token pointing at the genuine slot.
        let forged = c.hash(b"forged");
        let slot = c.index[&c.hash(b"genuine")];
        c.index.insert(forged, slot);
        assert!(c.get(b"forged", 0.0).is_none());
    }
}
