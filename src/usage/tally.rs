//! Per-worker sums of finished requests, per minute per (domain, user, API key, model),
//! handed to the usage writer in batches.
//!
//! Each worker adds to its own map (no lock, no shared write); about once a second, and at
//! drain, the map is swapped out and sent whole. The writer merges batches and writes them
//! to the store; a kill -9 loses at most what was not yet written.
//!
//! The request path allocates nothing for a sum that already exists: the map is keyed by
//! the owned [`UsageKey`] and looked up by a borrowed [`KeyRef`] (both hash as the same
//! `KeyRef`, and the map borrows its keys as a `dyn AsKeyRef`, std's way to look up a
//! compound key by borrowed parts). The minute is a worker-local cell the worker's
//! 100-ms tick refreshes, so no clock is read per request either.

use super::{Usage, UsageSource};
use std::borrow::Borrow;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::mpsc::Sender;

/// What a usage row is summed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageKey {
    /// Unix time / 60.
    pub minute: i64,
    pub domain: Box<str>,
    /// The user id ("" for a request with no user: `auth.mode = "none"` without a token).
    pub user: Box<str>,
    /// The API key's id, when the request came with one.
    pub key: Option<Box<str>>,
    /// The model the request named ("" when none).
    pub model: Box<str>,
}

/// A [`UsageKey`] borrowed from a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyRef<'a> {
    pub minute: i64,
    pub domain: &'a str,
    pub user: &'a str,
    pub key: Option<&'a str>,
    pub model: &'a str,
}

impl KeyRef<'_> {
    pub fn to_key(self) -> UsageKey {
        UsageKey {
            minute: self.minute,
            domain: self.domain.into(),
            user: self.user.into(),
            key: self.key.map(Into::into),
            model: self.model.into(),
        }
    }
}

/// Either form of a key, as the map looks it up.
pub trait AsKeyRef {
    fn key_ref(&self) -> KeyRef<'_>;
}

impl AsKeyRef for UsageKey {
    fn key_ref(&self) -> KeyRef<'_> {
        KeyRef {
            minute: self.minute,
            domain: &self.domain,
            user: &self.user,
            key: self.key.as_deref(),
            model: &self.model,
        }
    }
}

impl AsKeyRef for KeyRef<'_> {
    fn key_ref(&self) -> KeyRef<'_> {
        *self
    }
}

impl<'a> Borrow<dyn AsKeyRef + 'a> for UsageKey {
    fn borrow(&self) -> &(dyn AsKeyRef + 'a) {
        self
    }
}

impl Hash for dyn AsKeyRef + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key_ref().hash(h)
    }
}

impl PartialEq for dyn AsKeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key_ref() == other.key_ref()
    }
}

impl Eq for dyn AsKeyRef + '_ {}

// Hashes as its `KeyRef`, so a borrowed key finds it (`Borrow` requires the same hash).
impl Hash for UsageKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key_ref().hash(h)
    }
}

/// Sums for one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Answers with status ≥ 400 or cut short.
    pub errors: u64,
    /// Requests whose tokens the gateway counted because the host reported none.
    pub counted: u64,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.errors += other.errors;
        self.counted += other.counted;
    }

    /// One finished request: its answer's status (0 = no answer went out) and tokens.
    pub fn of_request(status: u16, usage: Option<Usage>) -> Tally {
        let tokens = usage.unwrap_or_default();
        Tally {
            requests: 1,
            prompt_tokens: tokens.prompt_tokens,
            completion_tokens: tokens.completion_tokens,
            errors: u64::from(status == 0 || status >= 400),
            counted: u64::from(usage.is_some_and(|u| u.source == UsageSource::Counted)),
        }
    }
}

/// One batch from a worker to the writer.
pub type Batch = Vec<(UsageKey, Tally)>;

/// Distinct model names a worker keeps for its access records; past it a name is
/// allocated per request (a pass-through domain lets clients name anything).
const MODEL_NAMES: usize = 1024;

/// One worker's usage sums since its last flush. Owned by the worker's thread only.
pub struct WorkerUsage {
    /// `None`: `[usage] enabled = false`, nothing is summed.
    to_writer: Option<Sender<Batch>>,
    /// aHash, seeded per process: the key is hashed once per request.
    sums: RefCell<HashMap<UsageKey, Tally, ahash::RandomState>>,
    /// The minute requests are summed under (refreshed by `tick`).
    minute: Cell<i64>,
    /// Model names seen, shared by the access records that name them.
    models: RefCell<HashSet<Rc<str>, ahash::RandomState>>,
}

impl WorkerUsage {
    pub fn new(to_writer: Option<Sender<Batch>>) -> WorkerUsage {
        WorkerUsage {
            to_writer,
            sums: RefCell::default(),
            minute: Cell::new(unix_minute()),
            models: RefCell::default(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.to_writer.is_some()
    }

    /// Adds one finished request to its minute's sum.
    pub fn record(&self, domain: &str, user: &str, key: Option<&str>, model: &str, t: &Tally) {
        if !self.is_on() {
            return;
        }
        let at = KeyRef {
            minute: self.minute.get(),
            domain,
            user,
            key,
            model,
        };
        let mut sums = self.sums.borrow_mut();
        match sums.get_mut(&at as &dyn AsKeyRef) {
            Some(sum) => sum.add(t),
            None => {
                sums.insert(at.to_key(), *t);
            }
        }
    }

    /// The worker's periodic tick: the minute moves on.
    pub fn tick(&self) {
        self.minute.set(unix_minute());
    }

    /// Sends what was summed since the last flush to the writer (the map keeps its room).
    pub fn flush(&self) {
        let Some(to_writer) = &self.to_writer else {
            return;
        };
        let batch: Batch = self.sums.borrow_mut().drain().collect();
        if batch.is_empty() {
            return;
        }
        if to_writer.send(batch).is_err() {
            tracing::error!(
                "usage: the writer is gone; this worker's last second of usage is lost"
            );
        }
    }

    /// A request's model name for its record, shared instead of allocated when seen before.
    pub fn model_name(&self, name: &str) -> Rc<str> {
        let mut models = self.models.borrow_mut();
        if let Some(known) = models.get(name) {
            return known.clone();
        }
        let fresh: Rc<str> = Rc::from(name);
        if models.len() < MODEL_NAMES {
            models.insert(fresh.clone());
        }
        fresh
    }
}

/// Unix time in minutes, the unit usage rows are kept in.
pub fn unix_minute() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| (d.as_secs() / 60) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_by_key_and_flushes_whole() {
        let (tx, rx) = std::sync::mpsc::channel();
        let w = WorkerUsage::new(Some(tx));
        let ok = Tally::of_request(
            200,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                source: UsageSource::Reported,
            }),
        );
        let cut = Tally::of_request(
            0,
            Some(Usage {
                prompt_tokens: 0,
                completion_tokens: 3,
                source: UsageSource::Counted,
            }),
        );
        let refused = Tally::of_request(404, None);
        w.record("d", "u", None, "m", &ok);
        w.record("d", "u", None, "m", &cut);
        w.record("d", "u", Some("k"), "m", &refused);
        w.record("d", "u", None, "other", &ok);
        w.flush();
        let mut batch = rx.try_recv().unwrap();
        batch.sort_by(|a, b| (&a.0.key, &a.0.model).cmp(&(&b.0.key, &b.0.model)));
        assert_eq!(batch.len(), 3);
        let (k, t) = &batch[0];
        assert_eq!((&*k.model, k.key.as_deref()), ("m", None));
        let want = Tally {
            requests: 2,
            prompt_tokens: 5,
            completion_tokens: 10,
            errors: 1,
            counted: 1,
        };
        assert_eq!(*t, want);
        assert_eq!(batch[2].1.errors, 1);
        assert_eq!(batch[2].0.key.as_deref(), Some("k"));
        // Nothing new: nothing sent.
        w.flush();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn off_sums_nothing_and_names_are_shared() {
        let w = WorkerUsage::new(None);
        w.record("d", "u", None, "m", &Tally::of_request(200, None));
        assert!(w.sums.borrow().is_empty());
        let a = w.model_name("llama");
        let b = w.model_name("llama");
        assert!(Rc::ptr_eq(&a, &b));
    }

    #[test]
    fn a_borrowed_key_hashes_as_its_owned_form() {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        let at = KeyRef {
            minute: 7,
            domain: "d",
            user: "u",
            key: Some("k"),
            model: "m",
        };
        let owned = at.to_key();
        assert_eq!(
            s.hash_one(&owned),
            s.hash_one(&at as &dyn AsKeyRef),
            "Borrow needs equal hashes"
        );
    }
}
