//! Enforcing limits exactly across every worker of a box, without a lock on the way.
//!
//! Each scope (a domain, a member in a domain, an API key) has one [`Counters`], shared by
//! all workers: per-minute and per-day windows packed with their use into one `AtomicU64`
//! each (the window's number in the high half, its use in the low half), changed by
//! compare-and-swap, and a concurrency count. A request is admitted while the use of each
//! window is under its limit: requests per minute count one each, so N a minute pass,
//! never N + 1, however the workers interleave; token windows are charged a reservation at
//! admission (the prompt's estimate plus the completion's `max_tokens`) and settled to the
//! real count when the answer ends, so they hold within one request's reservation.
//! Windows are fixed (the wall clock's minute and UTC day), as the `x-ratelimit-reset-*`
//! headers report them.
//!
//! With `[fleet]`, each window also holds the other boxes' use of it (a second atomic,
//! packed the same way) and each scope the other boxes' requests in flight, both written
//! by the exchange thread (`super::fleet`); the request path only reads them, and what it
//! counts against a limit depends on [`Fleet`]: this box's use, plus the others' while
//! Redis answers, or against this box's share of the limit while it does not.
//!
//! Counters are found through a registry keyed by a seeded hash of the scope; a worker
//! keeps the ones it used (`Worker::limit_counters`), so the registry's mutex is taken
//! once per scope per worker, not per request.

use super::fleet::view::Fleet;
use crate::hashing::PreHashedMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Use of one fixed window: this box's, and the other boxes' as last exchanged.
#[derive(Default)]
pub struct Window {
    own: AtomicU64,
    others: AtomicU64,
}

fn pack(window: u32, used: u32) -> u64 {
    (u64::from(window) << 32) | u64::from(used)
}

fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

/// The use packed in `v` if it is of `window`, else 0 (a passed window counts nothing).
fn of_window(v: u64, window: u32) -> u32 {
    let (w, used) = unpack(v);
    if w == window {
        used
    } else {
        0
    }
}

impl Window {
    /// Takes `amount` if the window's use, as `fleet` counts it, is under `limit`; returns
    /// that use after.
    pub fn take(&self, window: u32, amount: u32, limit: u32, fleet: Fleet) -> Result<u32, ()> {
        let limit = fleet.limit(limit);
        let others = fleet.others(|| self.others(window));
        let mut cur = self.own.load(Ordering::Relaxed);
        loop {
            let used = of_window(cur, window);
            if used.saturating_add(others) >= limit {
                return Err(());
            }
            let after = used.saturating_add(amount);
            match self.own.compare_exchange_weak(
                cur,
                pack(window, after),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(after.saturating_add(others)),
                Err(now) => cur = now,
            }
        }
    }

    /// Moves this box's use of `window` by `delta` (a settlement or a rollback); nothing
    /// when that window has passed.
    pub fn adjust(&self, window: u32, delta: i64) {
        let _ = self
            .own
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |cur| {
                let (w, used) = unpack(cur);
                if w != window {
                    return None;
                }
                let after = (i64::from(used) + delta).clamp(0, i64::from(u32::MAX)) as u32;
                Some(pack(w, after))
            });
    }

    /// This box's use of `window` now.
    pub fn used(&self, window: u32) -> u32 {
        of_window(self.own.load(Ordering::Relaxed), window)
    }

    /// The use of `window` as `fleet` counts it.
    pub fn counted(&self, window: u32, fleet: Fleet) -> u32 {
        self.used(window)
            .saturating_add(fleet.others(|| self.others(window)))
    }

    /// The window this box last took from (0: never) and its use of it, for the exchange.
    pub fn own(&self) -> (u32, u32) {
        unpack(self.own.load(Ordering::Relaxed))
    }

    /// The other boxes' use of `window`, as last exchanged.
    pub fn others(&self, window: u32) -> u32 {
        of_window(self.others.load(Ordering::Relaxed), window)
    }

    /// The exchange learnt the other boxes' use of `window`.
    pub fn set_others(&self, window: u32, used: u32) {
        self.others.store(pack(window, used), Ordering::Relaxed);
    }
}

/// One scope's counters.
#[derive(Default)]
pub struct Counters {
    /// The scope as every box names it (in Redis' keys).
    pub label: Arc<str>,
    pub requests_per_minute: Window,
    pub tokens_per_minute: Window,
    pub tokens_per_day: Window,
    pub in_flight: AtomicU32,
    /// The other boxes' requests in flight, as last exchanged.
    pub others_in_flight: AtomicU32,
    /// A concurrency limit was checked here (so the exchange shares the in-flight count).
    concurrency_limited: AtomicBool,
}

impl Counters {
    /// Counts one more request in flight if fewer than `limit` are, as `fleet` counts them.
    pub fn enter(&self, limit: u32, fleet: Fleet) -> bool {
        if !self.concurrency_limited.load(Ordering::Relaxed) {
            self.concurrency_limited.store(true, Ordering::Relaxed);
        }
        let limit = fleet.limit(limit);
        let others = fleet.others(|| self.others_in_flight.load(Ordering::Relaxed));
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n.saturating_add(others) < limit).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn concurrency_limited(&self) -> bool {
        self.concurrency_limited.load(Ordering::Relaxed)
    }

    /// Nothing in flight and no use in the current windows, here or (as last exchanged) on
    /// other boxes: the same as fresh counters, so they may be dropped and made anew when
    /// next needed.
    pub fn idle(&self, clock: Clock) -> bool {
        let quiet = |w: &Window, window| w.used(window) == 0 && w.others(window) == 0;
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.others_in_flight.load(Ordering::Relaxed) == 0
            && quiet(&self.requests_per_minute, clock.minute)
            && quiet(&self.tokens_per_minute, clock.minute)
            && quiet(&self.tokens_per_day, clock.day)
    }

    pub fn leave(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// What a scope is (for the registry's key).
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Domain(&'a str),
    Member { domain: &'a str, user: &'a str },
    Key(&'a str),
}

impl Scope<'_> {
    /// A seeded hash of the scope: the same within this process, not guessable outside it
    /// (so no one can pick ids that share another's counters).
    pub fn key(&self) -> u64 {
        let seed = *SEED.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.finish()
        });
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(seed);
        match self {
            Scope::Domain(d) => {
                h.update(b"d\0");
                h.update(d.as_bytes());
            }
            Scope::Member { domain, user } => {
                h.update(b"m\0");
                h.update(domain.as_bytes());
                h.update(b"\0");
                h.update(user.as_bytes());
            }
            Scope::Key(k) => {
                h.update(b"k\0");
                h.update(k.as_bytes());
            }
        }
        h.digest()
    }

    /// The scope as every box names it: its ids, spelled so no two scopes share a label
    /// (the domain's length is given, so a user id may hold any character).
    pub fn label(&self) -> String {
        match self {
            Scope::Domain(d) => format!("d:{d}"),
            Scope::Member { domain, user } => format!("m:{}:{domain}:{user}", domain.len()),
            Scope::Key(k) => format!("k:{k}"),
        }
    }
}

static SEED: OnceLock<u64> = OnceLock::new();
static REGISTRY: OnceLock<Mutex<PreHashedMap<Arc<Counters>>>> = OnceLock::new();

/// The counters of `scope` (created on first use), shared by all workers.
pub fn counters(scope: &Scope<'_>) -> Arc<Counters> {
    let registry = REGISTRY.get_or_init(Mutex::default);
    let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(scope.key())
        .or_insert_with(|| {
            Arc::new(Counters {
                label: scope.label().into(),
                ..Counters::default()
            })
        })
        .clone()
}

/// Every scope's counters now (for the exchange with the other boxes).
pub fn every_scope() -> Vec<Arc<Counters>> {
    let Some(registry) = REGISTRY.get() else {
        return Vec::new();
    };
    let map = registry.lock().unwrap_or_else(|p| p.into_inner());
    map.values().cloned().collect()
}

/// Forgets idle counters, so scopes seen once (users of an outside identity provider, say)
/// do not stay in memory: a worker drops the idle ones it holds, then the registry drops
/// idle ones no worker holds. A scope used again gets fresh counters, which is what idle
/// ones are. Call now and then from each worker.
pub fn prune(held: &mut PreHashedMap<Arc<Counters>>) {
    let clock = Clock::now();
    held.retain(|_, c| !c.idle(clock));
    let Some(registry) = REGISTRY.get() else {
        return;
    };
    let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
    // Under the registry's lock no worker can take a new hold, so a count of one (the
    // registry's own) stays one.
    map.retain(|_, c| Arc::strong_count(c) > 1 || !c.idle(clock));
}

/// Windows of the wall clock: (minute number, UTC day number, seconds to the minute's
/// end, seconds to the day's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub minute: u32,
    pub day: u32,
    pub minute_left_s: u32,
    pub day_left_s: u32,
}

impl Clock {
    pub fn now() -> Clock {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Clock::at(secs)
    }

    pub fn at(unix_s: u64) -> Clock {
        Clock {
            minute: (unix_s / 60) as u32,
            day: (unix_s / 86_400) as u32,
            minute_left_s: 60 - (unix_s % 60) as u32,
            day_left_s: 86_400 - (unix_s % 86_400) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const ALONE: Fleet = Fleet::Alone;

    #[test]
    fn a_window_lets_exactly_its_limit_through_from_many_threads() {
        let c = Arc::new(Counters::default());
        let admitted = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if c.requests_per_minute.take(7, 1, 2500, ALONE).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 2500);
        // The next window starts empty.
        assert_eq!(c.requests_per_minute.take(8, 1, 2500, ALONE), Ok(1));
        assert_eq!(c.requests_per_minute.used(7), 0);
    }

    #[test]
    fn token_windows_are_settled_and_passed_windows_left_alone() {
        let w = Window::default();
        assert_eq!(w.take(1, 500, 1000, ALONE), Ok(500));
        assert_eq!(
            w.take(1, 800, 1000, ALONE),
            Ok(1300),
            "admitted while under the limit"
        );
        assert!(w.take(1, 1, 1000, ALONE).is_err());
        w.adjust(1, -700);
        assert_eq!(w.used(1), 600);
        w.adjust(0, -600);
        assert_eq!(w.used(1), 600, "a settlement for a passed window");
        w.adjust(1, -10_000);
        assert_eq!(w.used(1), 0);
    }

    #[test]
    fn concurrency_and_scopes() {
        let c = Counters::default();
        assert!(c.enter(2, ALONE) && c.enter(2, ALONE));
        assert!(!c.enter(2, ALONE));
        c.leave();
        assert!(c.enter(2, ALONE));
        let a = Scope::Member {
            domain: "d",
            user: "u",
        };
        let b = Scope::Member {
            domain: "du",
            user: "",
        };
        assert_ne!(a.key(), b.key());
        assert_ne!(Scope::Domain("x").key(), Scope::Key("x").key());
        assert!(Arc::ptr_eq(&counters(&a), &counters(&a)));
        assert_ne!(a.label(), b.label());
        assert_eq!(&*counters(&b).label, "m:2:du:");
        let clock = Clock::at(86_400 * 3 + 61);
        assert_eq!((clock.day, clock.minute_left_s), (3, 59));
    }

    #[test]
    fn pruning_keeps_what_is_in_use() {
        let (busy_scope, quiet_scope) = (Scope::Key("busy-key"), Scope::Key("quiet-key"));
        let (busy, quiet) = (busy_scope.key(), quiet_scope.key());
        let mut held = PreHashedMap::default();
        held.insert(busy, counters(&busy_scope));
        held.insert(quiet, counters(&quiet_scope));
        assert!(held[&busy].enter(5, ALONE));
        prune(&mut held);
        assert!(held.contains_key(&busy) && !held.contains_key(&quiet));
        // The busy scope's counters are still the shared ones.
        assert!(Arc::ptr_eq(&held[&busy], &counters(&busy_scope)));
        assert_eq!(counters(&busy_scope).in_flight.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn other_boxes_use_counts_while_shared_and_the_share_while_cut_off() {
        let w = Window::default();
        w.set_others(5, 8);
        assert_eq!(w.take(5, 1, 10, Fleet::Shared), Ok(9));
        assert_eq!(w.take(5, 1, 10, Fleet::Shared), Ok(10));
        assert!(
            w.take(5, 1, 10, Fleet::Shared).is_err(),
            "2 here + 8 elsewhere"
        );
        assert_eq!(w.counted(5, Fleet::Shared), 10);
        assert_eq!(w.counted(5, Fleet::Alone), 2);
        // The others' use is of window 5 only.
        assert_eq!(w.take(6, 1, 10, Fleet::Shared), Ok(1));
        // Cut off: 3 boxes last seen, a third of 10 (rounded up) here, the others unknown.
        let cut = Fleet::Cut { boxes: 3 };
        let v = Window::default();
        v.set_others(5, 8);
        assert_eq!((0..10).filter(|_| v.take(5, 1, 10, cut).is_ok()).count(), 4);
        let c = Counters::default();
        c.others_in_flight.store(1, Ordering::Relaxed);
        assert!(c.enter(2, Fleet::Shared) && !c.enter(2, Fleet::Shared));
        assert!(c.concurrency_limited());
        assert!(!c.idle(Clock::at(0)));
    }
}
