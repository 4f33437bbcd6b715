//! Which host served a prefix lately: a worker's own memory, for cache affinity beyond
//! consistent placement.
//!
//! Consistent placement sends a prefix to the same host on every box, but a request that
//! spilled (its host was over its share) leaves its longer prefix — a session's history —
//! cached on another host. The index remembers, per prefix key, the host that last served
//! it, so the next turn of that session finds its history. Per worker, no lock; bounded by
//! two generations of a hash map (a key not touched for a generation is forgotten): an
//! approximate LRU with O(1) work and no per-entry bookkeeping.

use crate::hashing::PreHashedMap;

/// Keys remembered per generation (two generations are kept).
const GENERATION: usize = 32 * 1024;

#[derive(Default)]
pub struct AffinityIndex {
    current: PreHashedMap<u64>,
    previous: PreHashedMap<u64>,
}

impl AffinityIndex {
    /// The host (its seed) that last served `key`.
    pub fn get(&mut self, key: u64) -> Option<u64> {
        if let Some(&host) = self.current.get(&key) {
            return Some(host);
        }
        let host = self.previous.remove(&key)?;
        self.insert(key, host);
        Some(host)
    }

    pub fn insert(&mut self, key: u64, host: u64) {
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
        idx.insert(1, 10);
        assert_eq!(idx.get(1), Some(10));
        for k in 100..100 + GENERATION as u64 {
            idx.insert(k, 7);
        }
        // Key 1 moved to the previous generation; a hit brings it back.
        assert_eq!(idx.get(1), Some(10));
        for k in 0..2 * GENERATION as u64 {
            idx.insert(1_000_000 + k, 7);
        }
        assert_eq!(idx.get(1), None);
        assert!(idx.len() <= 2 * GENERATION);
    }
}
