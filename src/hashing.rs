//! Hash maps keyed by values that are already hashes (a token's keyed hash, a prefix's
//! XXH3): hashing them again, as std's SipHash would, only costs time on the request path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by an already-random `u64`.
pub type PreHashedMap<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// The hasher of [`PreHashedMap`]: a `u64` key is its own hash.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are meant; anything else is still folded in, not dropped.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
