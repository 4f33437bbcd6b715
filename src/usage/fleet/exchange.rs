//! One exchange of limit counts with the fleet's Redis: what this box used since the last
//! one goes in, the fleet's totals come back, and the others' part of each is stored where
//! admission reads it ([`Window::set_others`], `Counters::others_in_flight`).
//!
//! Every key of one exchange travels in one pipeline (one round trip, no MULTI: each
//! command stands alone). Per window a box has taken from — requests per minute, tokens
//! per minute, tokens per day, each of every scope still in the registry — the key
//! `cubegate:limit:{rpm|tpm|tpd}:{window number}:{scope}` gets `INCRBY` of this box's
//! change since the last exchange (negative when a token reservation settled lower) and an
//! `EXPIRE` a minute past the window's end; a window with no change is read with `GET`.
//! Its reply is the fleet's total, so the others' use is that minus what this box has
//! sent. Requests in flight are a count, not a window: each box writes its own in the hash
//! `cubegate:inflight:{scope}` (field = the box), which lives a few exchanges past the last
//! write, and the others' are the fields of boxes still alive. Boxes announce themselves
//! in the sorted set `cubegate:boxes` (score = when, in ms); those not heard of for
//! `stale_ms` are dropped, and the rest are the count a box divides its limits by when
//! Redis cannot be reached.

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
        format!("cubegate:limit:{}:{window}:{label}", self.tag())
    }
}

fn in_flight_key(label: &str) -> String {
    format!("cubegate:inflight:{label}")
}

/// What one reply of the pipeline answers.
enum Reply {
    /// A window's fleet total; this box will have sent `sent` to it in all.
    Window {
        counters: Arc<Counters>,
        kind: Kind,
        window: u32,
        sent: i64,
    },
    /// What a scope no longer held had sent to the current window, taken back.
    TakenBack { label: Arc<str>, kind: Kind },
    /// A scope's requests in flight, per box.
    InFlight { counters: Arc<Counters> },
}

/// What this box has added to one window's key so far.
#[derive(Debug, Clone, Copy)]
struct Sent {
    window: u32,
    total: i64,
}

/// The exchange's memory between rounds.
pub struct Exchange {
    box_id: String,
    /// Boxes not heard of for this long are gone (ms).
    stale_ms: u64,
    sent: HashMap<(Arc<str>, Kind), Sent>,
    /// (hash, field) of boxes found gone, deleted in the next round.
    gone: Vec<(String, String)>,
}

impl Exchange {
    pub fn new(box_id: String, stale_ms: u64) -> Exchange {
        Exchange {
            box_id,
            stale_ms,
            sent: HashMap::new(),
            gone: Vec::new(),
        }
    }

    pub fn box_id(&self) -> &str {
        &self.box_id
    }

    /// Redis lost what it had (it restarted, or it is another server): the next round
    /// sends this box's whole use of the current windows, not its change.
    pub fn forget_sent(&mut self) {
        self.sent.clear();
    }

    fn sent_to(&self, label: &Arc<str>, kind: Kind, window: u32) -> i64 {
        self.sent
            .get(&(label.clone(), kind))
            .filter(|s| s.window == window)
            .map_or(0, |s| s.total)
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
        for counters in every_scope() {
            for kind in KINDS {
                let (last, used) = kind.of(&counters).own();
                if last == 0 {
                    // This limit never applied to the scope on this box.
                    continue;
                }
                let (window, ttl) = kind.now(clock);
                let used = if last == window { i64::from(used) } else { 0 };
                let before = self.sent_to(&counters.label, kind, window);
                add_to_window(pipe, &kind.key(window, &counters.label), used - before, ttl);
                held.insert((counters.label.clone(), kind));
                replies.push(Reply::Window {
                    counters: counters.clone(),
                    kind,
                    window,
                    sent: used,
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
                replies.push(Reply::InFlight { counters });
            }
        }
        // A scope the workers let go of (idle, pruned) may still owe the fleet a settlement
        // that lowered its use after the last round: its remainder is taken back.
        for ((label, kind), sent) in &self.sent {
            let (window, ttl) = kind.now(clock);
            if sent.window == window && sent.total != 0 && !held.contains(&(label.clone(), *kind)) {
                add_to_window(pipe, &kind.key(window, label), -sent.total, ttl);
                replies.push(Reply::TakenBack {
                    label: label.clone(),
                    kind: *kind,
                });
            }
        }
        replies
    }

    fn apply(&mut self, reply: Reply, value: Value, live: &HashSet<String>) {
        match reply {
            Reply::Window {
                counters,
                kind,
                window,
                sent,
            } => {
                let total = from_redis_value::<Option<i64>>(value)
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                self.sent.insert(
                    (counters.label.clone(), kind),
                    Sent {
                        window,
                        total: sent,
                    },
                );
                let others = (total - sent).clamp(0, i64::from(u32::MAX)) as u32;
                kind.of(&counters).set_others(window, others);
            }
            Reply::TakenBack { label, kind } => {
                self.sent.remove(&(label, kind));
            }
            Reply::InFlight { counters } => {
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
        }
    }
}

/// `INCRBY` (with the key's expiry) when this box's use changed, else a plain read.
fn add_to_window(pipe: &mut Pipeline, key: &str, change: i64, ttl_s: u32) {
    if change == 0 {
        pipe.cmd("GET").arg(key);
    } else {
        pipe.cmd("INCRBY")
            .arg(key)
            .arg(change)
            .cmd("EXPIRE")
            .arg(key)
            .arg(ttl_s)
            .ignore();
    }
}
