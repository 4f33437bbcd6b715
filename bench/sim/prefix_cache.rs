//! The simulated GPU's KV-cache blocks and its automatic prefix cache, after vLLM's
//! (v1 `KVCacheManager` / `BlockPool`):
//!
//! - a prompt is cut into blocks of [`BLOCK_TOKENS`] tokens; a full block's hash chains
//!   its parent's hash and its own tokens (the chain starts from the model's name), so
//!   equal hashes mean equal prefixes. A partial last block is never cached;
//! - a request's cached prefix is the longest run of leading blocks present, capped so
//!   that at least the prompt's last token is computed (vLLM recomputes it: a fully cached
//!   prompt of 32 tokens hits 16);
//! - the pool has `capacity` blocks. A scheduled request pins the blocks it hits and takes
//!   one block for each other block of its prompt (a free one, or else the least recently
//!   used cached block that no running request holds is evicted). After its prefill its
//!   full blocks are registered as cached. When it ends they are unpinned, last block
//!   first, so a prompt's tail is evicted before its head (vLLM frees in reverse order);
//! - usage (`vllm:kv_cache_usage_perc`) is the share of the pool held by running requests,
//!   as vLLM counts it: cached blocks nobody holds are free (evictable), not used.
//!
//! Pure bookkeeping, no time and no locking: `host.rs` wraps it in a Mutex.

use super::text::{fnv1a, mix, FNV_OFFSET};
use std::collections::{BTreeMap, HashMap};

/// Tokens per KV-cache block (vLLM's default `--block-size`).
pub const BLOCK_TOKENS: usize = 16;

/// The chained hashes of the prompt's full blocks.
pub fn block_hashes(model: &str, tokens: &[u32]) -> Vec<u64> {
    let mut parent = mix(fnv1a(FNV_OFFSET, model.as_bytes()));
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|block| {
            let mut h = fnv1a(FNV_OFFSET, &parent.to_le_bytes());
            for t in block {
                h = fnv1a(h, &t.to_le_bytes());
            }
            parent = mix(h);
            parent
        })
        .collect()
}

/// A cached block: how many running requests hold it, and when it was last released.
#[derive(Debug)]
struct Block {
    holders: u32,
    last_use: u64,
}

/// The blocks of the pool and which of them hold a known prefix.
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    cached: HashMap<u64, Block>,
    /// Cached blocks no running request holds, by last use: the eviction order.
    evictable: BTreeMap<u64, u64>,
    /// Cached blocks some running request holds.
    pinned: usize,
    /// Blocks running requests hold that are not (or not yet) cached.
    private: usize,
    clock: u64,
}

/// What one scheduled request holds in the pool.
#[derive(Debug, Default)]
pub struct Residency {
    /// Cached blocks it holds, in prompt order.
    held: Vec<u64>,
    /// Its full blocks computed by its prefill, to be registered after it.
    computed: Vec<u64>,
    /// Blocks it holds outside the cache (computed ones not registered yet, the partial
    /// last block).
    private: usize,
    /// Prompt tokens found in the cache.
    pub hit_tokens: usize,
}

impl PrefixCache {
    pub fn new(capacity_blocks: usize) -> PrefixCache {
        PrefixCache {
            capacity: capacity_blocks,
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            pinned: 0,
            private: 0,
            clock: 0,
        }
    }

    /// Schedules a prompt of `prompt_tokens` tokens whose full blocks hash to `hashes`:
    /// pins its cached prefix and takes blocks for the rest.
    pub fn schedule(&mut self, hashes: &[u64], prompt_tokens: usize) -> Residency {
        let most = prompt_tokens.saturating_sub(1) / BLOCK_TOKENS;
        let mut r = Residency::default();
        for h in hashes.iter().take(most) {
            if !self.pin(*h) {
                break;
            }
            r.held.push(*h);
        }
        r.hit_tokens = r.held.len() * BLOCK_TOKENS;
        r.computed = hashes[r.held.len()..].to_vec();
        r.private = prompt_tokens.div_ceil(BLOCK_TOKENS) - r.held.len();
        for _ in 0..r.private {
            self.take_free_block();
        }
        r
    }

    /// The request's prefill is done: its computed full blocks become cached (a block
    /// another request registered meanwhile is shared instead).
    pub fn register(&mut self, r: &mut Residency) {
        for h in std::mem::take(&mut r.computed) {
            if !self.pin(h) {
                self.cached.insert(
                    h,
                    Block {
                        holders: 1,
                        last_use: 0,
                    },
                );
                self.pinned += 1;
            }
            r.held.push(h);
            r.private -= 1;
            self.private -= 1;
        }
    }

    /// The request ended: its blocks are released, the last one first.
    pub fn release(&mut self, r: Residency) {
        self.private -= r.private;
        for h in r.held.iter().rev() {
            let Some(b) = self.cached.get_mut(h) else {
                continue;
            };
            b.holders -= 1;
            if b.holders == 0 {
                self.clock += 1;
                b.last_use = self.clock;
                self.evictable.insert(self.clock, *h);
                self.pinned -= 1;
            }
        }
        // Blocks taken beyond the capacity (more running than the pool holds) are given
        // back by evicting until the pool fits again.
        while self.cached.len() + self.private > self.capacity && self.evict_one() {}
    }

    /// Blocks held by running requests.
    pub fn used_blocks(&self) -> usize {
        self.pinned + self.private
    }

    /// Blocks that hold a cached prefix (held or not).
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// `used_blocks / capacity`, 0..=1.
    pub fn usage(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        (self.used_blocks() as f64 / self.capacity as f64).min(1.0)
    }

    /// Pins cached block `h` for one more request; false when it is not cached.
    fn pin(&mut self, h: u64) -> bool {
        let Some(b) = self.cached.get_mut(&h) else {
            return false;
        };
        if b.holders == 0 {
            self.evictable.remove(&b.last_use);
            self.pinned += 1;
        }
        b.holders += 1;
        true
    }

    /// Takes one block for a request: a free one, else the least recently used evictable
    /// one. With neither, the request still runs (it is over capacity until it ends).
    fn take_free_block(&mut self) {
        if self.cached.len() + self.private >= self.capacity {
            self.evict_one();
        }
        self.private += 1;
    }

    fn evict_one(&mut self) -> bool {
        match self.evictable.pop_first() {
            Some((_, h)) => {
                self.cached.remove(&h);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prompt of `n` tokens, distinct per `tag`.
    fn prompt(tag: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| tag * 1000 + i).collect()
    }

    /// Runs one whole request: schedule, prefill, end. Returns its hit tokens.
    fn run(cache: &mut PrefixCache, tokens: &[u32]) -> usize {
        let hashes = block_hashes("m", tokens);
        let mut r = cache.schedule(&hashes, tokens.len());
        let hit = r.hit_tokens;
        cache.register(&mut r);
        cache.release(r);
        hit
    }

    #[test]
    fn hashes_chain_their_parents() {
        let a = block_hashes("m", &prompt(1, 40));
        assert_eq!(a.len(), 2, "the partial third block has no hash");
        let mut other = prompt(1, 40);
        other[0] = 7;
        let b = block_hashes("m", &other);
        assert_ne!(
            a[1], b[1],
            "a different first block changes every later hash"
        );
        assert_ne!(a, block_hashes("other-model", &prompt(1, 40)));
    }

    #[test]
    fn the_second_request_hits_the_first_ones_full_blocks() {
        let mut c = PrefixCache::new(100);
        assert_eq!(run(&mut c, &prompt(1, 40)), 0);
        assert_eq!(run(&mut c, &prompt(1, 40)), 32);
        // A longer prompt with the same start hits the same blocks.
        assert_eq!(run(&mut c, &prompt(1, 60)), 32);
        assert_eq!(run(&mut c, &prompt(1, 60)), 48);
    }

    #[test]
    fn less_than_a_block_is_never_cached_and_the_last_token_is_computed() {
        let mut c = PrefixCache::new(100);
        run(&mut c, &prompt(1, 15));
        assert_eq!(run(&mut c, &prompt(1, 15)), 0);
        assert_eq!(c.cached_blocks(), 0);
        run(&mut c, &prompt(2, 32));
        assert_eq!(
            run(&mut c, &prompt(2, 32)),
            16,
            "a fully cached prompt recomputes"
        );
        assert_eq!(run(&mut c, &prompt(2, 33)), 32);
    }

    #[test]
    fn least_recently_used_blocks_go_first_tail_before_head() {
        let mut c = PrefixCache::new(5);
        run(&mut c, &prompt(1, 33)); // A: 2 cached blocks (its partial block is freed)
        run(&mut c, &prompt(2, 33)); // B: 2 more
        assert_eq!(c.cached_blocks(), 4);
        assert_eq!(run(&mut c, &prompt(1, 33)), 32); // A again: now the most recent
                                                     // C takes 4 blocks: the free one, then B's two (tail first), then A's tail.
        run(&mut c, &prompt(3, 49));
        assert_eq!(
            run(&mut c, &prompt(1, 33)),
            16,
            "A lost its tail block only"
        );
        assert_eq!(run(&mut c, &prompt(2, 33)), 0, "B was evicted");
    }

    #[test]
    fn held_blocks_are_not_evicted_and_count_as_used() {
        let mut c = PrefixCache::new(4);
        let a = prompt(1, 33);
        let mut held = c.schedule(&block_hashes("m", &a), a.len());
        c.register(&mut held);
        assert_eq!(c.used_blocks(), 3);
        assert!((c.usage() - 0.75).abs() < 1e-9);
        // Another request needs 3 blocks: 1 free, then none evictable: over capacity.
        let b = prompt(2, 33);
        let other = c.schedule(&block_hashes("m", &b), b.len());
        assert_eq!(c.used_blocks(), 6);
        assert_eq!(c.usage(), 1.0);
        c.release(other);
        // A's blocks survived; once released they are cached, not used.
        c.release(held);
        assert_eq!(c.used_blocks(), 0);
        assert_eq!(c.cached_blocks(), 2);
        assert_eq!(run(&mut c, &a), 32);
    }

    #[test]
    fn concurrent_identical_prompts_share_their_blocks() {
        let mut c = PrefixCache::new(10);
        let a = prompt(1, 32);
        let h = block_hashes("m", &a);
        let mut r1 = c.schedule(&h, a.len());
        let mut r2 = c.schedule(&h, a.len());
        assert_eq!((r1.hit_tokens, r2.hit_tokens), (0, 0));
        assert_eq!(c.used_blocks(), 4);
        c.register(&mut r1);
        c.register(&mut r2);
        assert_eq!((c.cached_blocks(), c.used_blocks()), (2, 2));
        c.release(r1);
        c.release(r2);
        assert_eq!((c.cached_blocks(), c.used_blocks()), (2, 0));
    }

    #[test]
    fn a_request_dropped_before_its_prefill_ends_caches_nothing() {
        let mut c = PrefixCache::new(10);
        let a = prompt(1, 40);
        let r = c.schedule(&block_hashes("m", &a), a.len());
        c.release(r);
        assert_eq!((c.cached_blocks(), c.used_blocks()), (0, 0));
    }
}
