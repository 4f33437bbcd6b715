//! Phase `authenticate`: who is calling, from the `Authorization` header.
//!
//! The verdict comes from [`crate::auth`] (the worker's token cache first, a signature
//! check on a miss). One case waits: a token signed with a key this box has not seen
//! (unknown `kid`) of an issuer whose keys come from a JWKS URL may mean the identity
//! provider just rotated its keys, so the fetcher is asked to refresh and the request
//! waits a moment for new keys before it is answered. A verdict the cache already held
//! was waited for once and is not waited for again.

use super::connection::Connection;
use super::error::GatewayError;
use super::request::Request;
use super::worker::Worker;
use crate::auth::{AuthError, Identity, Refusal, TokenError};
use crate::snapshot::{Snapshot, SnapshotRef};
use std::time::{Duration, Instant};

/// How long a request with an unknown `kid` waits for a JWKS refresh.
const JWKS_WAIT: Duration = Duration::from_millis(1500);
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
        Err(Refusal {
            error: AuthError::Token(TokenError::UnknownKey),
            from_cache: false,
        }) if snapshot.keys.has_fetched_issuers() => {
            let fresh = wait_for_new_keys(worker).await;
            check(&fresh)?
        }
        other => other?,
    };
    Ok(authenticated.identity)
}

/// Asks the JWKS fetcher for a refresh now and waits (bounded) until a new snapshot is
/// published; returns the snapshot to check again against.
async fn wait_for_new_keys(worker: &Worker) -> SnapshotRef {
    let before = worker.snapshot.borrow().published_generation();
    worker.jwks_refresh.request();
    let deadline = Instant::now() + JWKS_WAIT;
    while worker.snapshot.borrow().published_generation() == before && Instant::now() < deadline {
        monoio::time::sleep(JWKS_POLL).await;
    }
    worker.snapshot.borrow_mut().current()
}
