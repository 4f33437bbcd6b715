//! Logging in and tokens: `POST /users/tokens/issue`, `refresh` and `revoke`, and the
//! password handling behind them.
//!
//! Passwords are hashed with argon2id (m = 19 MiB, t = 2, p = 1, the OWASP baseline); a
//! wrong password and an unknown account cost the same hash and get the same answer;
//! failed logins are limited per account and per client address. Refresh tokens rotate:
//! each refresh spends the old one, and presenting a spent one revokes its whole family.

use super::answer::{body, store_error, Answer};
use super::request::Request;
use super::server::{error_reply, Reply};
use super::store::{Rotation, User};
use super::tokens::random_id;
use super::{unix_now, Management};
use crate::auth::jws::{self, JsonObject};
use crate::auth::{bearer_token, TokenError};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::Deserialize;
use serde_json::json;

/// argon2 takes 19 MiB and tens of milliseconds per hash: at most one per CPU runs at
/// once, whatever the number of connections (a login flood costs queueing, not memory).
static HASH_SLOTS: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());
const HASH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `f` in a hashing slot; `None` when none came free within `HASH_WAIT`.
fn in_hash_slot<T>(f: impl FnOnce() -> T) -> Option<T> {
    let limit = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (lock, freed) = &HASH_SLOTS;
    let taken = lock.lock().unwrap_or_else(|p| p.into_inner());
    let (mut taken, timeout) = freed
        .wait_timeout_while(taken, HASH_WAIT, |t| *t >= limit)
        .unwrap_or_else(|p| p.into_inner());
    if timeout.timed_out() && *taken >= limit {
        return None;
    }
    *taken += 1;
    drop(taken);
    let out = f();
    *lock.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
    freed.notify_one();
    Some(out)
}

pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no randomness for a salt")?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    in_hash_slot(|| {
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .unwrap_or_else(|| Err("too many password operations at once; retry shortly".into()))
}

/// `None`: no hashing slot came free in time.
fn password_matches(hash: &str, password: &str) -> Option<bool> {
    in_hash_slot(|| {
        PasswordHash::new(hash).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
    })
}

/// At least this many characters…
pub const MIN_PASSWORD_CHARS: usize = 12;
/// … and zxcvbn's top score (more than 10^10 guesses). Its 3 still lets `Summer2026!!`
/// and `Winter2025!!x` through; 4 is what passphrases of a few words reach.
const MIN_PASSWORD_SCORE: zxcvbn::Score = zxcvbn::Score::Four;
/// zxcvbn's work grows with the length; past this many characters a password is estimated
/// by its start (which alone must already be strong enough).
const ESTIMATED_CHARS: usize = 100;

/// Whether `p` is strong enough, estimated by zxcvbn (dictionaries of common passwords,
/// names and words, keyboard patterns, dates, repeats, l33t); `context` are words an
/// attacker knows (the account's email). A refusal says why, in zxcvbn's words.
pub fn check_password_strength(p: &str, context: &[&str]) -> Result<(), String> {
    if p.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "the password must have at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    let estimated: String = p.chars().take(ESTIMATED_CHARS).collect();
    let mut words: Vec<&str> = vec!["cubegate"];
    for c in context {
        words.push(c);
        words.extend(c.split(['@', '.', '-', '_', '+']).filter(|w| w.len() > 2));
    }
    let entropy = zxcvbn::zxcvbn(&estimated, &words);
    if entropy.score() >= MIN_PASSWORD_SCORE {
        return Ok(());
    }
    let mut why = String::from("the password is too easy to guess:");
    match entropy.feedback() {
        Some(feedback) => {
            if let Some(warning) = feedback.warning() {
                why.push_str(&format!(" {warning}"));
            }
            for s in feedback.suggestions() {
                why.push_str(&format!(" {s}"));
            }
        }
        // zxcvbn gives feedback only to its weakest scores; a near miss gets its advice.
        None => why.push_str(" Add another word or two. Uncommon words are better."),
    }
    Err(why)
}

/// A refresh token of this box, signature and expiry checked.
fn own_refresh_claims(m: &Management, token: &[u8]) -> Result<(String, JsonObject), TokenError> {
    let parsed = jws::parse(token)?;
    let snapshot = m.published.load();
    let own = snapshot
        .keys
        .issuers
        .iter()
        .find(|i| i.own)
        .ok_or(TokenError::UnknownIssuer)?;
    if parsed.payload.get("iss").and_then(|v| v.as_str()) != Some(own.issuer.as_str()) {
        return Err(TokenError::WrongIssuer);
    }
    let verified = own.candidates(parsed.kid.as_deref()).any(|k| {
        k.verify(parsed.alg, parsed.signing_input, &parsed.signature)
            .is_ok()
    });
    if !verified {
        return Err(TokenError::BadSignature);
    }
    let exp = parsed
        .payload
        .get("exp")
        .and_then(|v| v.as_f64())
        .ok_or(TokenError::MissingExp)?;
    if (unix_now() as f64) > exp {
        return Err(TokenError::Expired);
    }
    if parsed.payload.get("type").and_then(|v| v.as_str()) != Some("refresh") {
        return Err(TokenError::Malformed("not a refresh token"));
    }
    let jti = parsed
        .payload
        .get("jti")
        .and_then(|v| v.as_str())
        .ok_or(TokenError::Malformed("no jti"))?;
    Ok((jti.to_string(), parsed.payload))
}

/// A signed access + refresh pair, not yet stored: the refresh token is usable only once
/// its `jti` is in the store (the family lives there, not in the token).
struct Pair {
    access: String,
    refresh: String,
    jti: String,
    expires_at: i64,
}

fn sign_pair(m: &Management, user: &User) -> Pair {
    let now = unix_now();
    let access = m.sign(&json!({
        "iss": m.issuer, "sub": user.id, "iat": now, "exp": now + m.access_ttl as i64,
        "jti": random_id(), "type": "access", "role": user.role.as_str(),
    }));
    let jti = random_id();
    let expires_at = now + m.refresh_ttl as i64;
    let refresh = m.sign(&json!({
        "iss": m.issuer, "sub": user.id, "iat": now, "exp": expires_at,
        "jti": jti, "type": "refresh",
    }));
    Pair {
        access,
        refresh,
        jti,
        expires_at,
    }
}

fn pair_reply(p: Pair) -> Reply {
    Reply::json(
        201,
        &json!({"access_token": p.access, "refresh_token": p.refresh}),
    )
}

/// A new login: a new refresh family.
fn issue_pair(m: &Management, user: &User) -> Answer {
    let pair = sign_pair(m, user);
    m.store()
        .insert_refresh(&pair.jti, &random_id(), &user.id, pair.expires_at)
        .map_err(store_error)?;
    Ok(pair_reply(pair))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

pub(super) fn issue(m: &Management, req: &Request) -> Answer {
    let login: Login = body(req)?;
    if login.username.len() > 254 || login.password.len() > 1024 {
        return Err(error_reply(
            400,
            "invalid_body",
            "username (at most 254 bytes) or password (at most 1024 bytes) too long",
        ));
    }
    let too_many = |secs: u64| {
        let mut r = error_reply(
            429,
            "too_many_attempts",
            "too many failed logins; retry later",
        );
        r.headers.push(("Retry-After", secs.to_string()));
        r
    };
    if let Some(secs) = m.login_limited(&login.username, req.client, false) {
        return Err(too_many(secs));
    }
    let user = m
        .store()
        .user_by_email(&login.username)
        .map_err(store_error)?;
    // The same argon2 cost whether or not the account exists.
    let hash = user
        .as_ref()
        .map_or(m.dummy_hash(), |u| u.password_hash.as_str());
    let Some(matches) = password_matches(hash, &login.password) else {
        return Err(error_reply(
            503,
            "busy",
            "too many logins at once; retry shortly",
        ));
    };
    match user {
        Some(u) if matches && !u.disabled => issue_pair(m, &u),
        _ => Err(match m.login_limited(&login.username, req.client, true) {
            Some(secs) => too_many(secs),
            None => error_reply(401, "invalid_credentials", "wrong email or password"),
        }),
    }
}

pub(super) fn refresh(m: &Management, req: &Request) -> Answer {
    let token = req
        .authorization
        .as_deref()
        .and_then(|v| bearer_token(v.as_bytes()))
        .ok_or_else(|| {
            error_reply(
                401,
                "invalid_token",
                "send the refresh token as Authorization: Bearer <refresh token>",
            )
        })?;
    let (jti, claims) = own_refresh_claims(m, token)
        .map_err(|e| error_reply(401, "invalid_token", &e.to_string()))?;
    let user_id = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("");
    let user = m.store().user_by_id(user_id).map_err(store_error)?;
    let refused = |why: &str| error_reply(401, "invalid_token", why);
    let Some(user) = user.filter(|u| !u.disabled) else {
        return Err(refused("the user of this token is unknown or disabled"));
    };
    // Spending the old token and storing the new one is one transaction, which also
    // re-checks the family and the user: a racing replay, revoke or disable wins or loses
    // as a whole, never leaving a live token behind.
    let pair = sign_pair(m, &user);
    let rotated = m
        .store()
        .rotate_refresh(&jti, &pair.jti, pair.expires_at, unix_now())
        .map_err(store_error)?;
    match rotated {
        Rotation::Rotated => Ok(pair_reply(pair)),
        Rotation::Reused => Err(refused(
            "refresh token already used or revoked; every token of its family is revoked now",
        )),
        Rotation::Invalid => Err(refused(
            "refresh token unknown, expired, or its user is disabled",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    refresh_token: String,
}

pub(super) fn revoke(m: &Management, req: &Request) -> Answer {
    // The refresh token in the body wins (the header may carry the caller's access
    // token); otherwise the header's.
    let token = if req.body.is_empty() {
        req.authorization
            .as_deref()
            .and_then(|v| bearer_token(v.as_bytes()))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| error_reply(401, "invalid_token", "send the refresh token to revoke"))?
    } else {
        body::<RevokeBody>(req)?.refresh_token.into_bytes()
    };
    let (jti, _) = own_refresh_claims(m, &token)
        .map_err(|e| error_reply(401, "invalid_token", &e.to_string()))?;
    m.store().revoke_family_of(&jti).map_err(store_error)?;
    Ok(Reply::empty(204))
}

#[cfg(test)]
mod password_tests {
    use super::check_password_strength;

    #[test]
    fn strength_is_estimated_not_listed() {
        for weak in [
            "Summer2026!!",
            "Winter2025!!x",
            "Password123!",
            "qwertyuiop123",
            "aaaaaaaaaaaaaa",
        ] {
            let why = check_password_strength(weak, &[]).unwrap_err();
            assert!(
                why.starts_with("the password is too easy to guess"),
                "{weak}: {why}"
            );
        }
        // What zxcvbn says is passed on.
        let why = check_password_strength("Summer2026!!", &[]).unwrap_err();
        assert!(
            why.len() > "the password is too easy to guess".len(),
            "{why}"
        );
        assert!(check_password_strength("short", &[])
            .unwrap_err()
            .contains("12 characters"));
        for strong in [
            "correct horse battery staple",
            "Zq8#tLp2!vWx9rKm4&bench",
            "an admin's long passphrase 42",
        ] {
            assert_eq!(check_password_strength(strong, &[]), Ok(()), "{strong}");
        }
        // A very long password is estimated by its first 100 characters: a repeat.
        let long = "x7#Kq".repeat(10_000);
        assert!(check_password_strength(&long, &[]).is_err());
    }
}
