//! Which host served a prefix lately: a worker's own memory, for cache affinity beyond
//! consistent placement.
//!
//! Consistent placement sends a prefix to the same host on every box, but a request that
//! spilled (its host was over its share) leaves its longer prefix — a session's history —
//! cached on another host. The index remembers, per prefix key, the host that last served
//! it, so the next turn of that session finds its history. Per worker, no lock; bounded by
//! two generations of a hash map (a key not touched for a generation is forgotten): an
//! approximate LRU with O(1) work and no per-entry bookkeeping.
//!
//! Each entry carries the epoch of its prefix group's home ([`super::balance`]) when it
//! was written: once the balancer moves a group, what its requests left on the old host
//! no longer pulls the group back there.

use crate::hashing::PreHashedMap;

/// Keys remembered per generation (two generations are kept).
const GENERATION: usize = 32 * 1024;

#[derive(Default)]
pub struct AffinityIndex {
    current: PreHashedMap<Served>,
    previous: PreHashedMap<Served>,
}

/// Where a prefix was served: the host's seed and its group's home epoch then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub host: u64,
    pub epoch: u32,
}

impl AffinityIndex {
    /// Where `key` was last served.
    pub fn get(&mut self, key: u64) -> Option<Served> {
        if let Some(&host) = self.current.get(&key) {
            return Some(host);
        }
        let host = self.previous.remove(&key)?;
        self.insert(key, host);
        Some(host)
    }

    pub fn insert(&mut self, key: u64, host: Served) {
        if self.current.len() >= GENERATION && !self.current.contains_key(&key) {
            self.previous = std::mem::take(&mut self.current);
            self.current.reserve(GENERATION);
        }
        self.current.insert(key, host);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets_after_two_generations() {
        let mut idx = AffinityIndex::default();
        let (ten, seven) = (Served { host: 10, epoch: 1 }, Served { host: 7, epoch: 0 });
        idx.insert(1, ten);
        assert_eq!(idx.get(1), Some(ten));
        for k in 100..100 + GENERATION as u64 {
            idx.insert(k, seven);
        }
        // Key 1 moved to the previous generation; a hit brings it back.
        assert_eq!(idx.get(1), Some(ten));
        for k in 0..2 * GENERATION as u64 {
            idx.insert(1_000_000 + k, seven);
        }
        assert_eq!(idx.get(1), None);
        assert!(idx.len() <= 2 * GENERATION);
    }
}
