//! Failed logins counted over the whole fleet (`[fleet]`), so an attacker spreading guesses
//! over the boxes behind a balancer meets the same limit as on one box.
//!
//! Beside each box's own table (`Management::login_limited`, which keeps counting and is
//! all there is without Redis, or while Redis is unreachable), a failure is `INCR`ed in
//! Redis under `cubegate:login:account:{email}` and `cubegate:login:addr:{ip}`, which
//! expire one window after their first failure; a login is refused while either holds the
//! limit. Logins run on the management plane's threads, so the round trip (bounded by
//! `link::TIMEOUT`) never costs a data-plane worker anything.

use crate::usage::fleet::link;
use crate::usage::fleet::view::Fleet;
use redis::{Connection, RedisResult};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// The management plane's connection to Redis, made on first use and after a failure.
static CONNECTION: Mutex<Option<Connection>> = Mutex::new(None);

/// `Some(retry_after_s)` when the fleet has seen `limit` failures or more for the account
/// or the address within `window`; counts one more when `failed`. None without Redis, or
/// when it does not answer (the box's own table then decides alone).
pub fn fleet_limited(
    email: &str,
    client: IpAddr,
    failed: bool,
    limit: u32,
    window: Duration,
) -> Option<u64> {
    if Fleet::now() != Fleet::Shared {
        return None;
    }
    let keys = [
        format!("cubegate:login:account:{}", email.to_lowercase()),
        format!("cubegate:login:addr:{client}"),
    ];
    let mut held = CONNECTION.lock().unwrap_or_else(|p| p.into_inner());
    let conn = match &mut *held {
        Some(conn) => conn,
        None => held.insert(link::connect()?.ok()?),
    };
    match count(conn, &keys, failed, limit, window) {
        Ok(limited) => limited,
        Err(e) => {
            tracing::debug!("login limit: Redis did not answer ({e}); this box's count decides");
            *held = None;
            None
        }
    }
}

/// One round trip reads (or increments) both counts with their time to live; a count
/// left without one (its first `EXPIRE` lost) gets it in a second.
fn count(
    conn: &mut Connection,
    keys: &[String; 2],
    failed: bool,
    limit: u32,
    window: Duration,
) -> RedisResult<Option<u64>> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd(if failed { "INCR" } else { "GET" })
            .arg(key)
            .cmd("TTL")
            .arg(key);
    }
    let (a, a_ttl, b, b_ttl): (Option<u64>, i64, Option<u64>, i64) = pipe.query(conn)?;
    let mut limited = None;
    for (key, count, ttl) in [(&keys[0], a, a_ttl), (&keys[1], b, b_ttl)] {
        let Some(count) = count else { continue };
        // -1: the key has no expiry (this failure is its first).
        let ttl = if ttl == -1 {
            redis::cmd("EXPIRE")
                .arg(key)
                .arg(window.as_secs())
                .exec(conn)?;
            window.as_secs()
        } else {
            ttl.max(1) as u64
        };
        if count >= u64::from(limit) {
            limited = limited.max(Some(ttl));
        }
    }
    Ok(limited)
}
