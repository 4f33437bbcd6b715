//! Limits over a fleet of cubegate boxes (`[fleet]`): several boxes behind one balancer
//! enforce each domain's, member's and API key's limits together, through Redis, instead
//! of each letting the whole limit through (three boxes, three times the limit).
//!
//! The request path does no IO for it: a thread per box ([`exchange`], every
//! `[fleet] sync_ms`) sends what this box used since the last round and learns what the
//! other boxes used, which admission then counts with its own (both atomics, read
//! lock-free). A limit of N therefore lets through N plus what the boxes admit in one
//! round's delay. When Redis cannot be reached ([`link`]'s short timeouts bound each try),
//! each box enforces its share of every limit — the limit divided by the boxes last seen,
//! rounded up — and says so once in the log and in `cubegate_fleet_redis_up` ([`view`]);
//! it keeps trying and shares again as soon as Redis answers. Each box writes its whole use
//! of a window, not a change to add, so a Redis restarted (its `run_id` changed: each box
//! writes all its windows again) counts nothing twice whether or not it kept its data.
//!
//! Not to be confused with `crate::fleet`, the GPU hosts a request is routed to.

pub mod exchange;
pub mod link;
pub mod view;

use crate::config::{ConfigError, FleetConfig};
use exchange::Exchange;
use redis::{Connection, RedisResult};
use std::time::{Duration, Instant};

/// Boxes not heard of for this many rounds (and at least `MIN_STALE`) are gone.
const STALE_ROUNDS: u64 = 20;
const MIN_STALE: Duration = Duration::from_secs(5);

/// What the exchange thread needs, checked at startup.
pub struct Settings {
    client: redis::Client,
    every: Duration,
}

/// `[fleet]` read: None = no Redis URL (this box alone, as without `[fleet]`); an error
/// names the key when the URL is not one.
pub fn settings(config: &FleetConfig) -> Result<Option<Settings>, ConfigError> {
    let Some(url) = config.redis_url() else {
        return Ok(None);
    };
    // The URL is not repeated: it may hold a password.
    let client = redis::Client::open(url.as_str()).map_err(|e| ConfigError {
        key: "fleet.redis_url_env".into(),
        problem: format!("{} does not hold a redis:// URL: {e}", config.redis_url_env),
    })?;
    Ok(Some(Settings {
        client,
        every: config.sync(),
    }))
}

/// Starts the exchange thread; until its first round succeeds this box is on its own.
pub fn start(settings: Settings) -> std::io::Result<()> {
    view::configured();
    link::install(settings.client);
    let stale = (settings.every * STALE_ROUNDS as u32).max(MIN_STALE);
    let sync = Sync {
        exchange: Exchange::new(box_id(), stale.as_millis() as u64),
        every: settings.every,
        conn: None,
        run_id: None,
        up: None,
        boxes: 1,
    };
    std::thread::Builder::new()
        .name("cubegate-fleet".into())
        .spawn(move || sync.run())
        .map(drop)
}

/// The exchange thread's state.
struct Sync {
    exchange: Exchange,
    every: Duration,
    conn: Option<Connection>,
    /// The Redis server last talked to (`INFO server`'s `run_id`).
    run_id: Option<String>,
    /// None until the first round.
    up: Option<bool>,
    boxes: u32,
}

impl Sync {
    fn run(mut self) {
        loop {
            let started = Instant::now();
            match self.round() {
                Ok(boxes) => self.reached(boxes),
                Err(e) => self.lost(&e),
            }
            std::thread::sleep(self.every.saturating_sub(started.elapsed()));
        }
    }

    fn round(&mut self) -> RedisResult<u32> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let mut conn = link::connect()
                    .unwrap_or_else(|| Err(std::io::Error::other("no Redis URL").into()))?;
                let run_id = server_run_id(&mut conn)?;
                if self.run_id.as_ref().is_some_and(|r| *r != run_id) {
                    tracing::info!("fleet: Redis restarted or changed; writing this box's use of the current windows again");
                }
                if self.run_id.as_ref() != Some(&run_id) {
                    self.exchange.forget_sent();
                    self.run_id = Some(run_id);
                }
                self.conn.insert(conn)
            }
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let result = self.exchange.round(conn, now_ms);
        if result.is_err() {
            // A reply may be lost half-read: the next round starts on a new connection.
            self.conn = None;
        }
        result
    }

    fn reached(&mut self, boxes: u32) {
        view::reached(boxes);
        match self.up {
            Some(true) => {}
            Some(false) => tracing::info!("fleet: Redis is back; limits are fleet-wide again"),
            None => tracing::info!(
                box_id = self.exchange.box_id(),
                "fleet: limits are shared with the other boxes through Redis"
            ),
        }
        if boxes != self.boxes {
            tracing::info!(boxes, "fleet: {boxes} boxes share the limits");
            self.boxes = boxes;
        }
        self.up = Some(true);
    }

    fn lost(&mut self, e: &redis::RedisError) {
        self.conn = None;
        view::lost();
        if self.up != Some(false) {
            tracing::warn!(
                "fleet: Redis unreachable ({e}); each box enforces its share of every limit \
                 (1/{} as {} boxes were last seen) until it is back",
                self.boxes,
                self.boxes
            );
        }
        self.up = Some(false);
    }
}

/// The server's `run_id`, which changes when it restarts (empty, without persistence).
fn server_run_id(conn: &mut Connection) -> RedisResult<String> {
    let info: String = redis::cmd("INFO").arg("server").query(conn)?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// This box's name among the fleet's: its host name, process id and a random part (a
/// restarted process is another box).
fn box_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut random = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        u32::from_be_bytes(random)
    )
}
