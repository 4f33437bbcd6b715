//! What the management plane stores, and the [`Storage`] trait it stores it through.
//!
//! The management plane only talks to `dyn Storage`; [`crate::mgmt::sqlite::Store`] is the
//! embedded implementation, [`crate::mgmt::postgres::PgStore`] the same answers on a
//! PostgreSQL server that a fleet of boxes shares. Roles are `auth`'s enums (`Role` on the platform, `DomainRole` in a
//! domain), never strings. Limits set through the API are kept per domain, per member and
//! per API key ([`LimitsOf`]) and read back whole, as the data plane gets them. Usage sums
//! go in through the same trait (the usage writer holds a store of its own) and come out
//! grouped as the usage API asks ([`UsageQuery`]).

use crate::auth::claims::Role;
use crate::auth::directory::DomainRole;
use crate::usage::limits::{ApiLimits, DomainLimits, Limits};
use crate::usage::tally::{Tally, UsageKey};

/// A stored API key (never the key itself: only its SHA-256).
#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    pub id: String,
    pub domain_id: String,
    pub name: String,
    pub digest: Vec<u8>,
    pub created_by: String,
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub email: String,
    pub password_hash: String,
    pub first_name: String,
    pub last_name: String,
    pub role: Role,
    pub disabled: bool,
    pub created_at: i64,
}

#[cfg(test)]
impl User {
    /// An enabled user with the platform role `user`, for the stores' tests.
    pub(crate) fn plain(id: &str, email: &str) -> User {
        User {
            id: id.into(),
            email: email.into(),
            password_hash: "h".into(),
            first_name: String::new(),
            last_name: String::new(),
            role: Role::User,
            disabled: false,
            created_at: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub id: String,
    pub name: String,
}

/// A limit set's four columns, as both stores' schemas name them, in the order of
/// [`limit_figures`].
pub const LIMIT_COLUMNS: &str =
    "requests_per_minute, tokens_per_minute, tokens_per_day, concurrent";
/// A domain's members' default set, likewise.
pub const MEMBER_LIMIT_COLUMNS: &str =
    "member_requests_per_minute, member_tokens_per_minute, member_tokens_per_day, member_concurrent";

/// The four figures of a set, in the columns' order.
pub fn limit_figures(l: &Limits) -> [u32; 4] {
    [
        l.requests_per_minute,
        l.tokens_per_minute,
        l.tokens_per_day,
        l.concurrent,
    ]
}

/// Whose limit set, among those the management API sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitsOf<'a> {
    /// A domain's own set and its members' default.
    Domain(&'a str),
    /// One member's own set: (domain id, user id).
    Member(&'a str, &'a str),
    /// One API key's set: (domain id, key id).
    Key(&'a str, &'a str),
}

/// What usage rows are summed by in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Domain,
    User,
    Key,
    Model,
    Hour,
    Day,
}

impl UsageGroup {
    pub const ALL: [UsageGroup; 6] = [
        UsageGroup::Domain,
        UsageGroup::User,
        UsageGroup::Key,
        UsageGroup::Model,
        UsageGroup::Hour,
        UsageGroup::Day,
    ];

    /// The `group_by` value that asks for it.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageGroup::Domain => "domain",
            UsageGroup::User => "user",
            UsageGroup::Key => "key",
            UsageGroup::Model => "model",
            UsageGroup::Hour => "hour",
            UsageGroup::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<UsageGroup> {
        UsageGroup::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// Usage between two minutes (`from` inclusive, `to` exclusive), of one domain and/or one
/// user when set, summed by `group`.
#[derive(Debug, Clone, Copy)]
pub struct UsageQuery<'a> {
    pub from_minute: i64,
    pub to_minute: i64,
    pub domain: Option<&'a str>,
    pub user: Option<&'a str>,
    pub group: UsageGroup,
}

/// One group's sums: a name (domain, user, key — "" for none — or model), or the unix
/// second an hour or a day starts at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageGroupValue {
    Name(String),
    Start(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub group: UsageGroupValue,
    pub sums: Tally,
}

/// A signing key as a shared store keeps it: its private half sealed
/// ([`super::keyring`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey {
    pub kid: String,
    /// Keys made later sign; nanoseconds since the epoch.
    pub created_at_ns: i64,
    pub sealed: Vec<u8>,
}

/// What spending a refresh token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The old token is spent and the new one stored, in its family.
    Rotated,
    /// The old token was spent or revoked already: its family is revoked now.
    Reused,
    /// Unknown, expired, or its user is disabled: nothing changed.
    Invalid,
}

#[derive(Debug)]
pub enum StoreError {
    Conflict(&'static str),
    NotFound(&'static str),
    /// The database refused or failed the work (nothing was changed).
    Db(String),
    /// The database cannot be reached (a shared store down or its connection lost).
    Unavailable(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Conflict(what) => write!(f, "{what} already exists"),
            StoreError::NotFound(what) => write!(f, "{what} not found"),
            StoreError::Db(e) => write!(f, "store error: {e}"),
            StoreError::Unavailable(e) => write!(f, "store unreachable: {e}"),
        }
    }
}

/// What the management plane needs from a store. SQLite backs one box; PostgreSQL, shared,
/// backs a fleet.
pub trait Storage: Send {
    fn user_count(&self) -> Result<u64, StoreError>;

    fn insert_user(&self, u: &User) -> Result<(), StoreError>;

    fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError>;

    fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError>;

    fn users(&self) -> Result<Vec<User>, StoreError>;

    fn insert_refresh(
        &self,
        jti: &str,
        family: &str,
        user_id: &str,
        expires_at: i64,
    ) -> Result<(), StoreError>;

    /// In one transaction: spends `old` and stores `new` in its family, if `old` is live and
    /// its user enabled; revokes the family if `old` was spent or revoked already.
    fn rotate_refresh(
        &mut self,
        old: &str,
        new: &str,
        new_expires_at: i64,
        now: i64,
    ) -> Result<Rotation, StoreError>;

    /// Revokes the family of a refresh token. Returns whether the token was known.
    fn revoke_family_of(&self, jti: &str) -> Result<bool, StoreError>;

    fn insert_domain(&self, d: &Domain, now: i64) -> Result<(), StoreError>;

    fn domains(&self) -> Result<Vec<Domain>, StoreError>;

    fn set_membership(&self, domain: &str, user: &str, role: DomainRole) -> Result<(), StoreError>;

    fn remove_membership(&self, domain: &str, user: &str) -> Result<bool, StoreError>;

    /// (domain id, user id, role) of every membership.
    fn memberships(&self) -> Result<Vec<(String, String, DomainRole)>, StoreError>;

    fn mark_config_domain(&self, id: &str) -> Result<(), StoreError>;

    fn domain_from_config(&self, id: &str) -> Result<Option<bool>, StoreError>;

    /// Sets a domain's backends (JSON, validated by the caller).
    fn set_backends(&self, domain: &str, backends_json: &str) -> Result<(), StoreError>;

    /// (domain id, name, backends JSON) of every domain whose backends the API set.
    fn api_backends(&self) -> Result<Vec<(String, String, String)>, StoreError>;

    fn insert_api_key(&self, k: &ApiKeyRow, now: i64) -> Result<(), StoreError>;

    fn revoke_api_key(&self, domain: &str, id: &str) -> Result<bool, StoreError>;

    fn live_api_keys(&self, now: i64) -> Result<Vec<ApiKeyRow>, StoreError>;

    /// Sets a domain's limits (both sets); false when there is no such domain.
    fn set_domain_limits(&self, domain: &str, set: &DomainLimits) -> Result<bool, StoreError>;

    /// Sets a member's own limits; false when `user` is not a member of `domain`. They go
    /// with the membership: removing it drops them.
    fn set_member_limits(&self, domain: &str, user: &str, set: &Limits)
        -> Result<bool, StoreError>;

    /// Sets an API key's limits; false when `key` is not an unrevoked key of `domain`.
    /// Revoking the key drops them.
    fn set_key_limits(&self, domain: &str, key: &str, set: &Limits) -> Result<bool, StoreError>;

    /// Clears one set (the file's or the domain's default applies again); false when none
    /// was set.
    fn clear_limits(&self, of: LimitsOf<'_>) -> Result<bool, StoreError>;

    /// Every set the API set, as the data plane gets them (keys: unrevoked ones only).
    fn api_limits(&self) -> Result<ApiLimits, StoreError>;

    /// Disables or enables a user; disabling also revokes every refresh token of theirs.
    fn set_disabled(&mut self, user: &str, disabled: bool) -> Result<bool, StoreError>;

    /// Adds each row's sums to what is stored for its key, all rows in one transaction.
    fn record_usage(&mut self, rows: &[(UsageKey, Tally)]) -> Result<(), StoreError>;

    /// Stored usage as `q` asks, ordered by group.
    fn usage(&self, q: &UsageQuery<'_>) -> Result<Vec<UsageRow>, StoreError>;

    /// Deletes the usage of minutes before `before_minute`; returns how many rows went.
    fn prune_usage(&self, before_minute: i64) -> Result<u64, StoreError>;

    /// The signing keys a shared store keeps, oldest first. SQLite keeps none: one box's
    /// keys are files under `data_dir` ([`super::keyring::KeyHome`]).
    fn sealed_keys(&self) -> Result<Vec<SealedKey>, StoreError> {
        Err(StoreError::Db("this store keeps no signing keys".into()))
    }

    fn insert_sealed_key(&self, _key: &SealedKey) -> Result<(), StoreError> {
        Err(StoreError::Db("this store keeps no signing keys".into()))
    }

    /// Stores `key` only if the store holds none yet; false when another box was first.
    fn insert_first_sealed_key(&self, _key: &SealedKey) -> Result<bool, StoreError> {
        Err(StoreError::Db("this store keeps no signing keys".into()))
    }
}
