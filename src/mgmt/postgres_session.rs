//! One session with the PostgreSQL server, and what its errors mean to the store.
//!
//! Every session is made one way ([`session_config`], shared by the store and a `LISTEN`
//! thread): the connection string's settings plus a connect timeout and TCP keepalives,
//! then a `statement_timeout`, so neither a server that vanished nor one that hangs holds
//! the management plane. Errors are read in one place: the server's SQLSTATE says whether
//! the work was refused (`Db`, or `Conflict`/`NotFound` where the store names the case) or
//! the server is going away or timed the statement out (`Unavailable`); an error without
//! one is `Unavailable` when it closed the connection, else `Db` (a value that does not
//! convert). Sessions are plain TCP (or a Unix socket): a connection string that demands
//! TLS is refused as a setting, by `check-config` too. A session idle for a second is checked with an empty query before it is used
//! again, so a server restarted meanwhile costs no failed call.

use super::store::StoreError;
use postgres::config::{ChannelBinding, SslMode};
use postgres::error::SqlState;
use postgres::{Client, Config, NoTls};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A server that vanished is given up on after about idle + interval × retries while the
/// connection is quiet, and after the user timeout while a request goes unacknowledged
/// (the kernel would otherwise retransmit for many minutes).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// A session idle this long is checked (one empty query) before it is used again: the
/// server may have closed it meanwhile (a restart, a fail-over), and the call should not
/// be the one to find out. Calls in a burst skip the check.
const RECHECK_IDLE: Duration = Duration::from_secs(1);
const RECHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Each session's first statement: no statement (or lock wait) outlasts it.
/// Notices ("already exists, skipping") are not errors: only warnings and worse reach the log.
const SESSION_SETUP: &str = "SET statement_timeout = '10s'; SET client_min_messages = warning";

/// A connection and when it was last used.
pub(super) struct Session {
    pub(super) client: Client,
    pub(super) last_used: Instant,
}

impl Session {
    /// A new session. A server that refuses these credentials or has no such database is
    /// `Db` (a setting to fix: waiting will not help); any other failure is `Unavailable`.
    ///
    /// The `postgres` client bounds only the TCP connect: a server that accepts and then
    /// never answers (frozen, its disk stalled) would hold the caller for as long as it
    /// hangs. So the session is made on a thread of its own and waited for at most
    /// [`OPEN_LIMIT`]; past it the caller gets `Unavailable` and the thread finishes (or
    /// gives up) by itself. At most [`MAX_OPENING`] such threads exist at once.
    pub(super) fn open(config: &Config) -> Result<Session, StoreError> {
        let Some(slot) = OpeningSlot::take() else {
            return Err(StoreError::Unavailable(
                "earlier connection attempts to PostgreSQL are still unanswered".into(),
            ));
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let config = config.clone();
        std::thread::Builder::new()
            .name("cubegate-pg-open".into())
            .spawn(move || {
                let _slot = slot;
                let _ = tx.send(Session::open_here(&config));
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start a thread: {e}")))?;
        rx.recv_timeout(OPEN_LIMIT).unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "PostgreSQL took the connection but did not answer within {OPEN_LIMIT:?}"
            )))
        })
    }

    fn open_here(config: &Config) -> Result<Session, StoreError> {
        let unreachable = |e: postgres::Error| StoreError::Unavailable(describe(&e));
        let mut client = config.connect(NoTls).map_err(|e| {
            let refused = e.code().is_some_and(|c| {
                c.code().starts_with("28") || *c == SqlState::INVALID_CATALOG_NAME
            });
            if refused {
                StoreError::Db(describe(&e))
            } else {
                unreachable(e)
            }
        })?;
        client.batch_execute(SESSION_SETUP).map_err(unreachable)?;
        Ok(Session {
            client,
            last_used: Instant::now(),
        })
    }

    /// The session, unless it is closed (checked with a query after [`RECHECK_IDLE`]).
    pub(super) fn still_open(mut self) -> Option<Session> {
        let stale = self.last_used.elapsed() >= RECHECK_IDLE;
        let lost =
            self.client.is_closed() || (stale && self.client.is_valid(RECHECK_TIMEOUT).is_err());
        if lost {
            self.abandon();
            return None;
        }
        Some(self)
    }

    /// Lets the session go without waiting: closing a client waits for the server to take
    /// its goodbye, which a hung server never does, so that wait happens on a thread of
    /// its own.
    pub(super) fn abandon(self) {
        let dropped = std::thread::Builder::new()
            .name("cubegate-pg-close".into())
            .spawn(move || drop(self));
        if let Err(e) = dropped {
            tracing::warn!("cannot close a PostgreSQL session in the background: {e}");
        }
    }
}

/// The longest a caller waits for a new session (the TCP connect's own limit and a
/// moment for the server's answer).
const OPEN_LIMIT: Duration = Duration::from_secs(6);
/// Session-opening threads at most at once: a hung server holds each until it answers or
/// the kernel gives up on it.
const MAX_OPENING: usize = 4;
static OPENING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_OPENING`] places for a session-opening thread, given back on drop.
struct OpeningSlot;

impl OpeningSlot {
    fn take() -> Option<OpeningSlot> {
        use std::sync::atomic::Ordering;
        OPENING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_OPENING).then_some(n + 1)
            })
            .ok()
            .map(|_| OpeningSlot)
    }
}

impl Drop for OpeningSlot {
    fn drop(&mut self) {
        OPENING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl From<postgres::Error> for StoreError {
    /// The server going away (or timing the statement out) is `Unavailable`; a refusal
    /// of the work, or a value that does not convert, is `Db`.
    fn from(e: postgres::Error) -> Self {
        let going_away = match e.code() {
            Some(code) => server_unavailable(code),
            None => e.is_closed(),
        };
        if going_away {
            StoreError::Unavailable(describe(&e))
        } else {
            StoreError::Db(describe(&e))
        }
    }
}

fn server_unavailable(code: &SqlState) -> bool {
    code.code().starts_with("08")
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::QUERY_CANCELED,
        ]
        .contains(code)
}

/// The error with its cause: the server's message and SQLSTATE, or what failed locally.
fn describe(e: &postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// `e` as `answer` when the server refused the work with `code`, else as usual.
fn refused_as(e: postgres::Error, code: SqlState, answer: StoreError) -> StoreError {
    if e.code() == Some(&code) {
        answer
    } else {
        e.into()
    }
}

/// `e` as `what` existing already when it broke a unique index.
pub(super) fn conflict(e: postgres::Error, what: &'static str) -> StoreError {
    refused_as(e, SqlState::UNIQUE_VIOLATION, StoreError::Conflict(what))
}

/// `e` as `what` not found when it broke a foreign key.
pub(super) fn missing(e: postgres::Error, what: &'static str) -> StoreError {
    refused_as(
        e,
        SqlState::FOREIGN_KEY_VIOLATION,
        StoreError::NotFound(what),
    )
}

/// Parses a connection string (URL or key=value) and adds the timeouts every session of
/// ours has. A parse error says which option's value is wrong, never the value: other
/// messages of the parser can quote a piece of the string (an unquoted password with a
/// space in it reads as further options), so they are replaced by what the string must be.
pub(crate) fn session_config(url: &str) -> Result<Config, StoreError> {
    let mut config: Config = url.parse().map_err(|e: postgres::Error| {
        let which = std::error::Error::source(&e)
            .map(ToString::to_string)
            .filter(|why| why.starts_with("invalid value for option"));
        let why = which.unwrap_or_else(|| "expected a postgresql:// URL or key=value pairs".into());
        StoreError::Db(format!("PostgreSQL connection string: {why}"))
    })?;
    // Sessions are made without TLS: a string that demands it could never connect, and
    // waiting would not help.
    let needs_tls = config.get_ssl_mode() == SslMode::Require
        || config.get_channel_binding() == ChannelBinding::Require;
    if needs_tls {
        return Err(StoreError::Db(
            "PostgreSQL connection string: sslmode=require (or channel_binding=require) asks for TLS, which cubegate does not speak to PostgreSQL: use sslmode=prefer or disable, on a private network or through a TLS tunnel".into(),
        ));
    }
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    Ok(config)
}
