//! The way to the fleet's Redis: one client made from `[fleet]` at startup, and
//! connections with short timeouts, so a Redis that is down or slow costs the thread that
//! asks (the exchange, a login) at most `TIMEOUT` per attempt and never a worker anything.

use redis::{Client, Connection, RedisResult};
use std::sync::OnceLock;
use std::time::Duration;

/// Connect, read and write timeout of every Redis call.
pub const TIMEOUT: Duration = Duration::from_millis(200);

static CLIENT: OnceLock<Client> = OnceLock::new();

/// Keeps the client for [`connect`]; false if one was set already.
pub fn install(client: Client) -> bool {
    CLIENT.set(client).is_ok()
}

/// A new connection to the fleet's Redis; None when `[fleet]` has no Redis URL.
pub fn connect() -> Option<RedisResult<Connection>> {
    let client = CLIENT.get()?;
    Some(client.get_connection_with_timeout(TIMEOUT).and_then(|c| {
        c.set_read_timeout(Some(TIMEOUT))?;
        c.set_write_timeout(Some(TIMEOUT))?;
        Ok(c)
    }))
}
