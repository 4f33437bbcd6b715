//! One exchange of limit counts with the fleet's Redis: what this box has used goes in, the
//! fleet's use comes back, and the others' part of each is stored where admission reads it
//! ([`Window::set_others`], `Counters::others_in_flight`).
//!
//! Every key of one exchange travels in one pipeline (one round trip, no MULTI: each
//! command stands alone). Per window a box has taken from — requests per minute, tokens
//! per minute, tokens per day, each of every scope still in the registry — the hash
//! `cubegate:use:{rpm|tpm|tpd}:{window number}:{scope}` holds each box's whole use of the
//! window under the box's own field: a box `HSET`s its use when it changed since it last
//! wrote it (lower, after a token reservation settled lower), with an `EXPIRE` a minute
//! past the window's end, and reads the hash back; the others' use is the sum of the
//! other fields. Each box writes what it has used, never a change to add, so writing again
//! cannot count anything twice: a round whose reply was lost, or a Redis restarted with or
//! without its data (which is why a new `run_id` makes a box write everything again); and a
//! box that reads its own field back missing or different (keys evicted, flushed) writes
//! it again in the next round.
//! Requests in flight are a count, not a window: each box writes its own in the hash
//! `cubegate:inflight:{scope}` (field = the box), which lives a few exchanges past the last
//! write, and the others' are the fields of boxes still alive. A scope the workers let go
//! of (idle, pruned) has its fields deleted, so no use or request in flight of it is left
//! behind. Boxes announce themselves in the sorted set `cubegate:boxes` (score = when, in
//! ms); those not heard of for `stale_ms` are dropped, and the rest are the count a box
//! divides its limits by when Redis cannot be reached.

use crate::usage::limiter::{every_scope, Clock, Counters, Window};
use redis::{from_redis_value, Connection, Pipeline, RedisResult, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const BOXES_KEY: &str = "cubegate:boxes";
/// How long a window's key outlives the window: boxes' clocks may differ a little.
const KEY_SLACK_S: u32 = 60;

/// The windows a scope has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
}

const KINDS: [Kind; 3] = [
    Kind::RequestsPerMinute,
    Kind::TokensPerMinute,
    Kind::TokensPerDay,
];

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::RequestsPerMinute => "rpm",
            Kind::TokensPerMinute => "tpm",
            Kind::TokensPerDay => "tpd",
        }
    }

    fn of(self, c: &Counters) -> &Window {
        match self {
            Kind::RequestsPerMinute => &c.requests_per_minute,
            Kind::TokensPerMinute => &c.tokens_per_minute,
            Kind::TokensPerDay => &c.tokens_per_day,
        }
    }

    /// The current window's number, and the seconds its key lives.
    fn now(self, clock: Clock) -> (u32, u32) {
        match self {
            Kind::TokensPerDay => (clock.day, clock.day_left_s + KEY_SLACK_S),
            _ => (clock.minute, clock.minute_left_s + KEY_SLACK_S),
        }
    }

    fn key(self, window: u32, label: &str) -> String {
        format!("cubegate:use:{}:{window}:{label}", self.tag())
    }
}

fn in_flight_key(label: &str) -> String {
    format!("cubegate:inflight:{label}")
}

/// What one reply of the pipeline answers.
enum Reply {
    /// A window's use per box; `wrote` = the use this box wrote to it in this round.
    Window {
        counters: Arc<Counters>,
        kind: Kind,
        window: u32,
        wrote: Option<u32>,
    },
    /// This box's field of a window the scope no longer held here was deleted.
    TakenBack { label: Arc<str>, kind: Kind },
    /// A scope's requests in flight, per box.
    InFlight { counters: Arc<Counters> },
    /// This box's in-flight field of a scope no longer held here was deleted.
    InFlightLeft { label: Arc<str> },
}

/// What this box last wrote to one window's hash.
#[derive(Debug, Clone, Copy)]
struct Sent {
    window: u32,
    used: u32,
}

/// The exchange's memory between rounds.
pub struct Exchange {
    box_id: String,
    /// Boxes not heard of for this long are gone (ms).
    stale_ms: u64,
    sent: HashMap<(Arc<str>, Kind), Sent>,
    /// Scopes whose in-flight hash holds a field of this box.
    in_flight_sent: HashSet<Arc<str>>,
    /// (hash, field) of boxes found gone, deleted in the next round.
    gone: Vec<(String, String)>,
}

impl Exchange {
    pub fn new(box_id: String, stale_ms: u64) -> Exchange {
        Exchange {
            box_id,
            stale_ms,
            sent: HashMap::new(),
            in_flight_sent: HashSet::new(),
            gone: Vec::new(),
        }
    }

    pub fn box_id(&self) -> &str {
        &self.box_id
    }

    /// Redis may have lost what it had (it restarted, or it is another server): the next
    /// round writes this box's use of every current window again, changed or not.
    pub fn forget_sent(&mut self) {
        self.sent.clear();
    }

    fn sent_to(&self, label: &Arc<str>, kind: Kind, window: u32) -> Option<u32> {
        self.sent
            .get(&(label.clone(), kind))
            .filter(|s| s.window == window)
            .map(|s| s.used)
    }

    /// One round trip at `now_ms` (the wall clock); the number of boxes alive.
    pub fn round(&mut self, conn: &mut Connection, now_ms: u64) -> RedisResult<u32> {
        let clock = Clock::at(now_ms / 1000);
        let mut pipe = redis::pipe();
        // The heartbeat first: its reply is the boxes alive, this one included.
        pipe.cmd("ZADD")
            .arg(BOXES_KEY)
            .arg(now_ms)
            .arg(&self.box_id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(BOXES_KEY)
            .arg("-inf")
            .arg(now_ms.saturating_sub(self.stale_ms))
            .ignore()
            .cmd("ZRANGE")
            .arg(BOXES_KEY)
            .arg(0)
            .arg(-1);
        for (key, field) in self.gone.drain(..) {
            pipe.cmd("HDEL").arg(key).arg(field).ignore();
        }
        let replies = self.plan(&mut pipe, clock);
        let mut values = pipe.query::<Vec<Value>>(conn)?.into_iter();
        let live: HashSet<String> = from_redis_value(values.next().unwrap_or(Value::Nil))?;
        self.sent
            .retain(|(_, kind), s| s.window == kind.now(clock).0);
        for (reply, value) in replies.into_iter().zip(values) {
            self.apply(reply, value, &live);
        }
        Ok(live.len().max(1).min(u32::MAX as usize) as u32)
    }

    /// Adds every scope's windows and in-flight count to `pipe`; what each reply answers.
    fn plan(&self, pipe: &mut Pipeline, clock: Clock) -> Vec<Reply> {
        let mut replies = Vec::new();
        let mut held = HashSet::new();
        let mut held_in_flight = HashSet::new();
        for counters in every_scope() {
            for kind in KINDS {
                let (last, used) = kind.of(&counters).own();
                if last == 0 {
                    // This limit never applied to the scope on this box.
                    continue;
                }
                let (window, ttl) = kind.now(clock);
                let used = if last == window { used } else { 0 };
                let key = kind.key(window, &counters.label);
                let before = self.sent_to(&counters.label, kind, window);
                // Nothing to write when the field says so already (or would say 0).
                let wrote = (before != Some(used) && (used != 0 || before.is_some())).then(|| {
                    pipe.cmd("HSET")
                        .arg(&key)
                        .arg(&self.box_id)
                        .arg(used)
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(ttl)
                        .ignore();
                    used
                });
                pipe.cmd("HGETALL").arg(&key);
                held.insert((counters.label.clone(), kind));
                replies.push(Reply::Window {
                    counters: counters.clone(),
                    kind,
                    window,
                    wrote,
                });
            }
            if counters.concurrency_limited() {
                let key = in_flight_key(&counters.label);
                pipe.cmd("HSET")
                    .arg(&key)
                    .arg(&self.box_id)
                    .arg(counters.in_flight.load(Ordering::Relaxed))
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(self.stale_ms)
                    .ignore()
                    .cmd("HGETALL")
                    .arg(&key);
                held_in_flight.insert(counters.label.clone());
                replies.push(Reply::InFlight { counters });
            }
        }
        // A scope the workers let go of (idle, pruned) has nothing of its own left in use
        // or in flight here: its fields go, whatever they said last.
        for ((label, kind), sent) in &self.sent {
            if sent.window == kind.now(clock).0 && !held.contains(&(label.clone(), *kind)) {
                pipe.cmd("HDEL")
                    .arg(kind.key(sent.window, label))
                    .arg(&self.box_id);
                replies.push(Reply::TakenBack {
                    label: label.clone(),
                    kind: *kind,
                });
            }
        }
        for label in self.in_flight_sent.difference(&held_in_flight) {
            pipe.cmd("HDEL").arg(in_flight_key(label)).arg(&self.box_id);
            replies.push(Reply::InFlightLeft {
                label: label.clone(),
            });
        }
        replies
    }

    fn apply(&mut self, reply: Reply, value: Value, live: &HashSet<String>) {
        match reply {
            Reply::Window {
                counters,
                kind,
                window,
                wrote,
            } => {
                let at = (counters.label.clone(), kind);
                if let Some(used) = wrote {
                    self.sent.insert(at.clone(), Sent { window, used });
                }
                let per_box: HashMap<String, i64> = from_redis_value(value).unwrap_or_default();
                // Redis lost this box's field (keys evicted, flushed): written again next
                // round, changed or not.
                let own = per_box.get(&self.box_id).copied();
                if self
                    .sent
                    .get(&at)
                    .is_some_and(|s| own != Some(i64::from(s.used)))
                {
                    self.sent.remove(&at);
                }
                let others: i64 = per_box
                    .iter()
                    .filter(|(id, _)| **id != self.box_id)
                    .map(|(_, n)| (*n).max(0))
                    .sum();
                let others = others.clamp(0, i64::from(u32::MAX)) as u32;
                kind.of(&counters).set_others(window, others);
            }
            Reply::TakenBack { label, kind } => {
                self.sent.remove(&(label, kind));
            }
            Reply::InFlight { counters } => {
                self.in_flight_sent.insert(counters.label.clone());
                let per_box: HashMap<String, u32> = from_redis_value(value).unwrap_or_default();
                let mut others = 0u32;
                for (id, n) in per_box {
                    if id == self.box_id {
                        continue;
                    }
                    if live.contains(&id) {
                        others = others.saturating_add(n);
                    } else {
                        self.gone.push((in_flight_key(&counters.label), id));
                    }
                }
                counters.others_in_flight.store(others, Ordering::Relaxed);
            }
            Reply::InFlightLeft { label } => {
                self.in_flight_sent.remove(&label);
            }
        }
    }
}
