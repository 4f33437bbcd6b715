//! Phase `authenticate`: who is calling, from the `Authorization` header.
//!
//! The verdict comes from [`crate::auth`] (the worker's token cache first, a signature
//! check on a miss). One case waits: a token signed with a key this box has not seen
//! (unknown `kid`) of an issuer whose keys come from a JWKS URL may mean the identity
//! provider just rotated its keys, so the fetcher is asked to refresh that issuer's JWKS
//! and the request waits for that attempt (at most a rate-limit window and a fetch) before
//! it is answered. A verdict the cache already held was waited for once and is not waited
//! for again; a refresh that changed keys empties the caches, so a token refused before
//! it is checked anew. The other case that waits: with `[auth] check_url`, a token that is
//! neither an API key nor a JWT of a trusted issuer is settled by the check service
//! ([`super::auth_check`]), its verdict cached like a verified token's.

use super::auth_check::check_with_service;
use super::connection::Connection;
use super::error::GatewayError;
use super::request::Request;
use super::worker::Worker;
use crate::auth::jwks_fetch::FORCED_MIN_INTERVAL;
use crate::auth::{jwks_url_of, AuthError, Authenticated, Identity, Refusal, TokenError};
use crate::snapshot::{Snapshot, SnapshotRef};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a request with an unknown `kid` waits for a JWKS refresh: a whole rate-limit
/// window (the refresh may be deferred to its end) and the fetch.
const JWKS_WAIT: Duration = FORCED_MIN_INTERVAL.saturating_add(Duration::from_secs(3));
/// How often the wait looks for a new snapshot.
const JWKS_POLL: Duration = Duration::from_millis(20);

/// Phase `authenticate`. Authentication comes before the domain is looked up, so an
/// anonymous caller cannot probe which domains exist.
pub async fn authenticate(
    worker: &Worker,
    conn: &Connection,
    req: &Request,
    snapshot: &SnapshotRef,
) -> Result<Identity, GatewayError> {
    let authorization = req.head.authorization.map(|s| s.of(conn.buffer()));
    let check = |s: &Snapshot| {
        worker.auth.authenticate(
            authorization,
            &s.keys,
            &s.directory,
            s.revocation_epoch,
            &mut worker.tokens.borrow_mut(),
        )
    };
    let authenticated = match check(snapshot) {
        Err(
            refusal @ Refusal {
                error: AuthError::Token(TokenError::UnknownKey),
                from_cache: false,
            },
        ) => match authorization.and_then(|a| jwks_url_of(a, &snapshot.keys)) {
            Some(url) => {
                let url = url.to_string();
                wait_for_refresh(worker, &url, &check).await?
            }
            None => return Err(refusal.into()),
        },
        Err(Refusal {
            error: AuthError::NeedsCheck,
            ..
        }) => check_with_service(worker, conn, req, authorization).await?,
        other => other?,
    };
    Ok(authenticated.identity)
}

/// Asks the JWKS fetcher to refresh `url` and waits (bounded) until that attempt has
/// finished; then checks again against the keys in force. The attempt may be deferred to
/// the end of the URL's rate-limit window, so the wait covers the window.
async fn wait_for_refresh(
    worker: &Worker,
    url: &str,
    check: &dyn Fn(&Snapshot) -> Result<Authenticated, Refusal>,
) -> Result<Authenticated, Refusal> {
    let attempts = worker.jwks_refresh.attempts(url);
    let before = attempts.load(Ordering::Acquire);
    worker.jwks_refresh.request(url);
    let deadline = Instant::now() + JWKS_WAIT;
    while attempts.load(Ordering::Acquire) == before && Instant::now() < deadline {
        monoio::time::sleep(JWKS_POLL).await;
    }
    let fresh = worker.snapshot.borrow_mut().current();
    check(&fresh)
}
