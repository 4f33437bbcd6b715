//! What `cubegate migrate-store` reads out of a SQLite store beyond the [`Storage`] trait:
//! the live refresh tokens and the raw usage rows (the trait answers usage only summed).
//!
//! [`Storage`]: super::store::Storage

use super::sqlite::Store;
use super::store::StoreError;
use crate::usage::tally::{Tally, UsageKey};

impl Store {
    /// (jti, family, user id, expires at) of every refresh token neither spent, revoked
    /// nor expired.
    pub fn live_refresh_tokens(
        &self,
        now: i64,
    ) -> Result<Vec<(String, String, String, i64)>, StoreError> {
        let mut st = self.db.prepare(
            "SELECT jti, family, user_id, expires_at FROM refresh_tokens
             WHERE spent = 0 AND revoked = 0 AND expires_at >= ?1",
        )?;
        let rows = st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every usage row as stored, oldest minute first.
    pub fn usage_rows(&self) -> Result<Vec<(UsageKey, Tally)>, StoreError> {
        let mut st = self.db.prepare(
            "SELECT minute, domain_id, user_id, key_id, model, requests, prompt_tokens,
                    completion_tokens, errors, counted FROM usage ORDER BY minute",
        )?;
        let count = |r: &rusqlite::Row<'_>, i: usize| -> rusqlite::Result<u64> {
            Ok(r.get::<_, i64>(i)?.max(0) as u64)
        };
        let rows = st.query_map([], |r| {
            let key: String = r.get(3)?;
            Ok((
                UsageKey {
                    minute: r.get(0)?,
                    domain: r.get::<_, String>(1)?.into(),
                    user: r.get::<_, String>(2)?.into(),
                    key: (!key.is_empty()).then(|| key.into()),
                    model: r.get::<_, String>(4)?.into(),
                },
                Tally {
                    requests: count(r, 5)?,
                    prompt_tokens: count(r, 6)?,
                    completion_tokens: count(r, 7)?,
                    errors: count(r, 8)?,
                    counted: count(r, 9)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
