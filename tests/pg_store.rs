//! The PostgreSQL store against a real server (`tests/common/services.rs`).
//!
//! It answers as the SQLite store does: one run of every `Storage` method, with its
//! edge cases, goes through both stores, each answer is asserted and written down, and the
//! two transcripts must be the same line for line. Then what only a shared store meets:
//! boxes migrating and spending one refresh token at the same moment, the server going
//! away (or hanging) and coming back, and changes notified to the other boxes.

mod common;

use common::services::Postgres;
use cubegate::internals::auth::claims::Role;
use cubegate::internals::auth::directory::DomainRole;
use cubegate::internals::mgmt::postgres::{connect_listener, PgStore, CHANGES_CHANNEL};
use cubegate::internals::mgmt::sqlite::Store;
use cubegate::internals::mgmt::store::{
    ApiKeyRow, Domain, LimitsOf, Rotation, SealedKey, Storage, StoreError, UsageGroup,
    UsageGroupValue, UsageQuery, UsageRow, User,
};
use cubegate::internals::usage::limits::{ApiLimits, DomainLimits, Limits};
use cubegate::internals::usage::tally::{Tally, UsageKey};
use postgres::fallible_iterator::FallibleIterator;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

/// Every answer a store gave, in order, as text.
#[derive(Default)]
struct Transcript(Vec<String>);

impl Transcript {
    /// Writes `answer` down (a `Db` error by its kind only: its text is the database's
    /// own) and hands it back.
    fn note<T: Debug>(
        &mut self,
        what: &str,
        answer: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let shown = match &answer {
            Err(StoreError::Db(_)) => "Err(Db(..))".to_string(),
            other => format!("{other:?}"),
        };
        self.0.push(format!("{what}: {shown}"));
        answer
    }

    /// Writes a successful answer down and returns what it carries.
    fn ok<T: Debug>(&mut self, what: &str, answer: Result<T, StoreError>) -> T {
        match self.note(what, answer) {
            Ok(value) => value,
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

fn user(id: &str, email: &str, created_at: i64) -> User {
    User {
        id: id.into(),
        email: email.into(),
        password_hash: "$argon2id$h".into(),
        first_name: "Ada".into(),
        last_name: "Löwe".into(),
        role: Role::User,
        disabled: false,
        created_at,
    }
}

fn domain(id: &str, name: &str) -> Domain {
    Domain {
        id: id.into(),
        name: name.into(),
    }
}

fn api_key(id: &str, domain: &str, digest: u8, expires_at: Option<i64>) -> ApiKeyRow {
    ApiKeyRow {
        id: id.into(),
        domain_id: domain.into(),
        name: format!("key {id}"),
        digest: vec![digest; 32],
        created_by: "u1".into(),
        expires_at,
    }
}

fn rpm(n: u32) -> Limits {
    Limits {
        requests_per_minute: n,
        ..Limits::default()
    }
}

fn conflict<T>(answer: Result<T, StoreError>) -> Option<&'static str> {
    match answer {
        Err(StoreError::Conflict(what)) => Some(what),
        _ => None,
    }
}

fn is_db_error<T>(answer: Result<T, StoreError>) -> bool {
    matches!(answer, Err(StoreError::Db(_)))
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// Reads every set, and writes it down in a stable order (the maps' own is random).
fn read_limits(s: &dyn Storage, t: &mut Transcript) -> ApiLimits {
    let api = s.api_limits().unwrap();
    t.0.push(format!("limits: {}", limits_text(&api)));
    api
}

fn limits_text(api: &ApiLimits) -> String {
    let domains: BTreeMap<String, _> = api
        .domains
        .iter()
        .map(|(d, l)| (d.to_string(), l))
        .collect();
    let members: BTreeMap<String, BTreeMap<&String, _>> = (api.members.iter())
        .map(|(d, m)| (d.to_string(), m.iter().collect()))
        .collect();
    let keys: BTreeMap<_, _> = api.keys.iter().collect();
    format!("{domains:?} {members:?} {keys:?}")
}

fn users(s: &mut dyn Storage, t: &mut Transcript) {
    assert_eq!(t.ok("count", s.user_count()), 0);
    let mut admin = user("u1", "A@x.io", 5);
    admin.role = Role::Admin;
    t.ok("u1", s.insert_user(&admin));
    // One account whatever the email's ASCII case; the id is unique too.
    let same_email = t.note("same email", s.insert_user(&user("u2", "a@X.IO", 5)));
    assert_eq!(conflict(same_email), Some("a user with this email"));
    let same_id = t.note("same id", s.insert_user(&user("u1", "other@x.io", 5)));
    assert_eq!(conflict(same_id), Some("a user with this email"));
    // Only ASCII folds (SQLite's NOCASE): É and é are two addresses.
    for (id, email, at) in [
        ("u3", "Éve@x.io", 5),
        ("u4", "éve@x.io", 5),
        ("u5", "b@x.io", 5),
        ("u6", "C@x.io", 5),
        ("u7", "z@x.io", 1),
        ("u8", "ez@x.io", 5),
    ] {
        t.ok(email, s.insert_user(&user(id, email, at)));
    }
    let found = t.ok("by email", s.user_by_email("a@x.io"));
    assert_eq!(found, Some(admin.clone()));
    let found = t.ok("by É", s.user_by_email("ÉVE@X.IO"));
    assert_eq!(found.map(|u| u.id).as_deref(), Some("u3"));
    assert_eq!(t.ok("no one", s.user_by_email("nobody@x.io")), None);
    assert_eq!(t.ok("by id", s.user_by_id("u1")), Some(admin));
    assert_eq!(t.ok("no id", s.user_by_id("U1")), None);
    // Oldest first, then by email, ASCII case aside, in byte order ("ez" before "Éve").
    let emails: Vec<String> = (t.ok("users", s.users()).into_iter())
        .map(|u| u.email)
        .collect();
    assert_eq!(
        emails,
        [
            "z@x.io",
            "A@x.io",
            "b@x.io",
            "C@x.io",
            "ez@x.io",
            "Éve@x.io",
            "éve@x.io"
        ]
    );
    assert_eq!(t.ok("count", s.user_count()), 7);
}

fn domains_and_memberships(s: &mut dyn Storage, t: &mut Transcript) {
    for (id, name, at) in [
        ("d1", "one", 2),
        ("d0", "zero", 2),
        ("d2", "two", 1),
        ("D1", "ONE", 2),
    ] {
        t.ok(id, s.insert_domain(&domain(id, name), at));
    }
    let same_id = t.note("same id", s.insert_domain(&domain("d1", "uno"), 3));
    assert_eq!(conflict(same_id), Some("a domain with this id or name"));
    let same_name = t.note("same name", s.insert_domain(&domain("d9", "one"), 3));
    assert_eq!(conflict(same_name), Some("a domain with this id or name"));
    let ids: Vec<String> = (t.ok("domains", s.domains()).into_iter())
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["d2", "D1", "d0", "d1"]);
    t.ok("mark d0", s.mark_config_domain("d0"));
    t.ok("mark none", s.mark_config_domain("nope"));
    assert_eq!(t.ok("d0 config", s.domain_from_config("d0")), Some(true));
    assert_eq!(t.ok("d1 config", s.domain_from_config("d1")), Some(false));
    assert_eq!(t.ok("no config", s.domain_from_config("nope")), None);

    for (d, u) in [("nope", "u1"), ("d1", "nobody")] {
        let answer = t.note("unknown member", s.set_membership(d, u, DomainRole::Member));
        assert!(matches!(
            answer,
            Err(StoreError::NotFound("the domain or the user"))
        ));
    }
    t.ok("member", s.set_membership("d1", "u1", DomainRole::Member));
    t.ok("admin", s.set_membership("d1", "u1", DomainRole::Admin));
    t.ok(
        "d2 member",
        s.set_membership("d2", "u5", DomainRole::Member),
    );
    let mut all = t.ok("memberships", s.memberships());
    all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let expected = [
        ("d1", "u1", DomainRole::Admin),
        ("d2", "u5", DomainRole::Member),
    ];
    assert_eq!(
        all,
        expected.map(|(d, u, r)| (d.to_string(), u.to_string(), r))
    );
    assert!(t.ok("remove", s.remove_membership("d2", "u5")));
    assert!(!t.ok("remove again", s.remove_membership("d2", "u5")));
}

/// Spends `old` for `new` (expiring at 100) at `now`, and writes the answer down.
fn rotate(s: &mut dyn Storage, t: &mut Transcript, old: &str, new: &str, now: i64) -> Rotation {
    let answer = s.rotate_refresh(old, new, 100, now);
    t.ok(&format!("{old}->{new} at {now}"), answer)
}

fn refresh_tokens(s: &mut dyn Storage, t: &mut Transcript) {
    t.ok("r1", s.insert_refresh("r1", "f1", "u1", 100));
    let again = t.note("r1 again", s.insert_refresh("r1", "f1", "u1", 100));
    assert_eq!(conflict(again), Some("a refresh token with this id"));
    let no_user = t.note("no user", s.insert_refresh("rx", "fx", "nobody", 100));
    assert!(is_db_error(no_user));
    assert_eq!(rotate(s, t, "r1", "r2", 10), Rotation::Rotated);
    // r1 presented again: refused, and its whole family (r2 too) revoked.
    assert_eq!(rotate(s, t, "r1", "r3", 10), Rotation::Reused);
    assert_eq!(rotate(s, t, "r2", "r4", 10), Rotation::Reused);
    assert_eq!(rotate(s, t, "nope", "r5", 10), Rotation::Invalid);
    // Expired: nothing changes (so in its time it still rotates).
    t.ok("r5", s.insert_refresh("r5", "f5", "u1", 5));
    assert_eq!(rotate(s, t, "r5", "r6", 10), Rotation::Invalid);
    assert_eq!(rotate(s, t, "r5", "r6", 1), Rotation::Rotated);
    assert!(t.ok("revoke family", s.revoke_family_of("r6")));
    assert_eq!(rotate(s, t, "r6", "r7", 1), Rotation::Reused);
    assert!(!t.ok("revoke none", s.revoke_family_of("nope")));
    // Disabling revokes the user's tokens; one issued while disabled does not rotate.
    t.ok("r8", s.insert_refresh("r8", "f8", "u5", 100));
    assert!(t.ok("disable", s.set_disabled("u5", true)));
    let u5 = t.ok("disabled", s.user_by_id("u5"));
    assert!(u5.is_some_and(|u| u.disabled));
    assert_eq!(rotate(s, t, "r8", "r9", 1), Rotation::Reused);
    t.ok("r10", s.insert_refresh("r10", "f10", "u5", 100));
    assert_eq!(rotate(s, t, "r10", "r11", 1), Rotation::Invalid);
    assert!(t.ok("enable", s.set_disabled("u5", false)));
    assert_eq!(rotate(s, t, "r10", "r11", 1), Rotation::Rotated);
    assert!(!t.ok("disable no one", s.set_disabled("nobody", true)));
}

fn api_keys_and_backends(s: &mut dyn Storage, t: &mut Transcript) {
    let keys = [
        api_key("k1", "d1", 1, None),
        api_key("k2", "d1", 2, Some(50)),
        api_key("k3", "d1", 3, Some(5)),
    ];
    for k in &keys {
        t.ok(&k.id, s.insert_api_key(k, 1));
    }
    assert_eq!(
        conflict(t.note(
            "same digest",
            s.insert_api_key(&api_key("k4", "d1", 1, None), 1)
        )),
        Some("an API key with this id or digest")
    );
    assert!(is_db_error(t.note(
        "no domain",
        s.insert_api_key(&api_key("k5", "nope", 5, None), 1)
    )));
    let live = |t: &mut Transcript, s: &dyn Storage| {
        let mut rows = t.ok("live", s.live_api_keys(10));
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        format!("{rows:?}")
    };
    assert_eq!(live(t, s), format!("{:?}", &keys[..2]));
    assert!(!t.ok("other domain", s.revoke_api_key("d2", "k1")));
    assert!(t.ok("revoke", s.revoke_api_key("d1", "k2")));
    assert!(!t.ok("revoke again", s.revoke_api_key("d1", "k2")));
    assert_eq!(live(t, s), format!("{:?}", &keys[..1]));

    t.ok("backends", s.set_backends("d1", r#"[{"url":"a"}]"#));
    t.ok("replaced", s.set_backends("d1", r#"[{"url":"b"}]"#));
    t.ok("d2", s.set_backends("d2", "[]"));
    t.ok("config's", s.set_backends("d0", "[]"));
    assert!(is_db_error(
        t.note("no domain", s.set_backends("nope", "[]"))
    ));
    let set = sorted(t.ok("api backends", s.api_backends()));
    let expected = [("d1", "one", r#"[{"url":"b"}]"#), ("d2", "two", "[]")];
    assert_eq!(
        set,
        expected.map(|(a, b, c)| (a.into(), b.into(), c.into()))
    );
}

/// Runs after `api_keys_and_backends`: u1 is d1's admin, k1 live, k2 revoked, k3 expired.
fn limits(s: &mut dyn Storage, t: &mut Transcript) {
    let most = Limits {
        requests_per_minute: u32::MAX,
        tokens_per_minute: 1,
        tokens_per_day: 2,
        concurrent: 3,
    };
    let both = DomainLimits {
        domain: rpm(100),
        per_member: most,
    };
    assert!(t.ok("domain", s.set_domain_limits("d1", &both)));
    assert!(!t.ok("no domain", s.set_domain_limits("nope", &both)));
    assert!(t.ok("member", s.set_member_limits("d1", "u1", &rpm(5))));
    assert!(t.ok("member again", s.set_member_limits("d1", "u1", &rpm(6))));
    assert!(!t.ok("stranger", s.set_member_limits("d1", "u5", &rpm(5))));
    assert!(t.ok("key", s.set_key_limits("d1", "k1", &rpm(7))));
    assert!(!t.ok("other domain's key", s.set_key_limits("d0", "k1", &rpm(7))));
    assert!(!t.ok("revoked key", s.set_key_limits("d1", "k2", &rpm(7))));
    assert!(t.ok("expired key", s.set_key_limits("d1", "k3", &rpm(8))));
    let api = read_limits(s, t);
    assert_eq!(api.domains["d1"], both);
    assert_eq!(api.members["d1"]["u1"], rpm(6));
    assert_eq!((api.keys["k1"], api.keys["k3"]), (rpm(7), rpm(8)));
    // A role change keeps the member's set; removing the member drops it.
    t.ok("role", s.set_membership("d1", "u1", DomainRole::Member));
    assert_eq!(s.api_limits().unwrap().members["d1"]["u1"], rpm(6));
    t.ok("removed", s.remove_membership("d1", "u1"));
    t.ok("back", s.set_membership("d1", "u1", DomainRole::Admin));
    assert!(s.api_limits().unwrap().members.is_empty());
    // Revoking a key drops its set.
    t.ok("revoke", s.revoke_api_key("d1", "k1"));
    let api = read_limits(s, t);
    assert_eq!(api.keys.keys().collect::<Vec<_>>(), ["k3"]);
    assert!(t.ok("clear", s.clear_limits(LimitsOf::Domain("d1"))));
    assert!(!t.ok("clear again", s.clear_limits(LimitsOf::Domain("d1"))));
    assert!(!t.ok("clear other", s.clear_limits(LimitsOf::Key("d0", "k3"))));
    assert!(t.ok("clear key", s.clear_limits(LimitsOf::Key("d1", "k3"))));
    assert!(!t.ok("no set", s.clear_limits(LimitsOf::Member("d1", "u1"))));
    t.ok("set", s.set_member_limits("d1", "u1", &most));
    assert!(t.ok("clear member", s.clear_limits(LimitsOf::Member("d1", "u1"))));
    let api = read_limits(s, t);
    assert!(api.domains.is_empty() && api.members.is_empty() && api.keys.is_empty());
}

fn usage_key(minute: i64, domain: &str, user: &str, key: Option<&str>, model: &str) -> UsageKey {
    UsageKey {
        minute,
        domain: domain.into(),
        user: user.into(),
        key: key.map(Into::into),
        model: model.into(),
    }
}

fn tally(requests: u64, prompt: u64, completion: u64, errors: u64, counted: u64) -> Tally {
    Tally {
        requests,
        prompt_tokens: prompt,
        completion_tokens: completion,
        errors,
        counted,
    }
}

fn usage(s: &mut dyn Storage, t: &mut Transcript) {
    // The last minute of an hour and of a day, and the first of the next.
    let m = 29_001_599;
    let batch = [
        (usage_key(m, "d", "u1", None, "a,b"), tally(2, 10, 20, 1, 2)),
        (
            usage_key(m, "d", "u1", Some("k1"), "a,b"),
            tally(1, 1, 1, 0, 1),
        ),
        (usage_key(m + 1, "d", "u2", None, "B"), tally(1, 0, 0, 1, 0)),
        (
            usage_key(m + 1, "e", "u1", None, "a,b"),
            tally(4, 4, 4, 0, 4),
        ),
    ];
    t.ok("record", s.record_usage(&batch));
    // The same row again (another worker, a retry, another box): added, not replaced.
    let again = [(usage_key(m, "d", "u1", None, "a,b"), tally(3, 5, 5, 0, 3))];
    t.ok("again", s.record_usage(&again));
    t.ok("nothing", s.record_usage(&[]));
    for group in UsageGroup::ALL {
        for (domain, user) in [
            (None, None),
            (Some("d"), None),
            (None, Some("u1")),
            (Some("d"), Some("u2")),
        ] {
            let q = UsageQuery {
                from_minute: m,
                to_minute: m + 2,
                domain,
                user,
                group,
            };
            t.ok(
                &format!("{} {domain:?} {user:?}", group.as_str()),
                s.usage(&q),
            );
        }
    }
    let by = |group, from, to| UsageQuery {
        from_minute: from,
        to_minute: to,
        domain: Some("d"),
        user: None,
        group,
    };
    let models = t.ok("models", s.usage(&by(UsageGroup::Model, m, m + 2)));
    let name = |n: &str| UsageGroupValue::Name(n.into());
    assert_eq!(
        models,
        [
            // Byte order: "B" before "a,b".
            UsageRow {
                group: name("B"),
                sums: tally(1, 0, 0, 1, 0)
            },
            UsageRow {
                group: name("a,b"),
                sums: tally(6, 16, 26, 1, 6)
            },
        ]
    );
    let keys = t.ok("keys", s.usage(&by(UsageGroup::Key, m, m + 1)));
    assert_eq!(
        keys.iter().map(|r| r.group.clone()).collect::<Vec<_>>(),
        [name(""), name("k1")]
    );
    let days = t.ok("days", s.usage(&by(UsageGroup::Day, m, m + 2)));
    let starts = [m / 1440 * 86400, (m + 1) / 1440 * 86400];
    assert_eq!(
        days.iter().map(|r| r.group.clone()).collect::<Vec<_>>(),
        starts.map(UsageGroupValue::Start)
    );
    assert_eq!(t.ok("prune", s.prune_usage(m + 1)), 2);
    assert_eq!(t.ok("prune again", s.prune_usage(m + 1)), 0);
    let left = t.ok("left", s.usage(&by(UsageGroup::Day, 0, i64::MAX)));
    assert_eq!(left.len(), 1);
}

/// Every method, edge cases included, on a fresh store.
fn exercise(s: &mut dyn Storage) -> Transcript {
    let mut t = Transcript::default();
    users(s, &mut t);
    domains_and_memberships(s, &mut t);
    refresh_tokens(s, &mut t);
    api_keys_and_backends(s, &mut t);
    limits(s, &mut t);
    usage(s, &mut t);
    t
}

/// A database whose default collation is not byte order (ICU's en-US, as so many servers
/// run with a en_US locale), so only the store's own `COLLATE "C"` keeps SQLite's order.
fn linguistic_database(pg: &Postgres, db: &str) -> String {
    let mut admin = postgres::Client::connect(&pg.url("postgres"), postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {db} TEMPLATE template0 LOCALE 'C.UTF-8'
             LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        ))
        .expect("PostgreSQL 15 or later, built with ICU");
    pg.url(db)
}

#[test]
fn postgres_answers_as_sqlite_does() {
    let Some(pg) = Postgres::start() else { return };
    let dir = common::temp_dir("pg-conformance");
    let embedded = exercise(&mut Store::open(&dir.join("t.db")).unwrap());
    let url = linguistic_database(&pg, "conformance");
    let shared = exercise(&mut PgStore::connect(&url).unwrap());
    for (i, (a, b)) in embedded.0.iter().zip(&shared.0).enumerate() {
        assert_eq!(a, b, "answer {i}: SQLite's, then PostgreSQL's");
    }
    assert_eq!(embedded.0.len(), shared.0.len());
    // Connecting again keeps everything, and migrations are not re-run.
    let again = PgStore::connect(&url).unwrap();
    assert_eq!(again.user_count().unwrap(), 7);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn boxes_starting_together_migrate_once() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.database("together");
    let start = std::sync::Barrier::new(4);
    let answers: Vec<Result<u64, StoreError>> = std::thread::scope(|scope| {
        let boxes: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    PgStore::connect(&url)?.user_count()
                })
            })
            .collect();
        boxes.into_iter().map(|b| b.join().unwrap()).collect()
    });
    for answer in answers {
        assert_eq!(answer.unwrap(), 0);
    }
    let mut raw = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let rows = raw
        .query("SELECT version FROM cubegate_schema", &[])
        .unwrap();
    assert_eq!(rows.len(), 1);
}

#[test]
fn one_of_two_boxes_spending_a_token_rotates_it() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.database("rotation");
    let mut a = PgStore::connect(&url).unwrap();
    let mut b = PgStore::connect(&url).unwrap();
    a.insert_user(&user("u1", "u1@x.io", 1)).unwrap();
    for round in 0..20 {
        let old = format!("r{round}");
        a.insert_refresh(&old, &format!("f{round}"), "u1", 100)
            .unwrap();
        let start = std::sync::Barrier::new(2);
        let spenders = [(&mut a, "a"), (&mut b, "b")];
        let mut answers = std::thread::scope(|scope| {
            let spending = spenders.map(|(store, side)| {
                let (start, old) = (&start, &old);
                scope.spawn(move || {
                    start.wait();
                    store
                        .rotate_refresh(old, &format!("{side}{round}"), 100, 1)
                        .unwrap()
                })
            });
            spending.map(|s| s.join().unwrap())
        });
        answers.sort_by_key(|r| *r == Rotation::Rotated);
        assert_eq!(
            answers,
            [Rotation::Reused, Rotation::Rotated],
            "round {round}"
        );
        // The reuse revoked the family: the token the winner got is dead too.
        for new in [format!("a{round}"), format!("b{round}")] {
            let answer = a.rotate_refresh(&new, "next", 100, 1).unwrap();
            assert_ne!(answer, Rotation::Rotated, "round {round}: {new}");
        }
    }
}

#[test]
fn a_lost_server_is_unavailable_until_it_is_back() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let store = PgStore::connect(&pg.database("outage")).unwrap();
    store.insert_user(&user("u1", "u1@x.io", 1)).unwrap();
    pg.stop();
    for _ in 0..2 {
        let asked = Instant::now();
        let answer = store.user_count();
        assert!(
            matches!(answer, Err(StoreError::Unavailable(_))),
            "{answer:?}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(6),
            "{:?}",
            asked.elapsed()
        );
    }
    let answer = store.insert_user(&user("u2", "u2@x.io", 1));
    assert!(
        matches!(answer, Err(StoreError::Unavailable(_))),
        "{answer:?}"
    );
    pg.run();
    assert_eq!(store.user_count().unwrap(), 1);
    // Restarted while the store sat idle (over the second after which it checks its
    // session before use): its first call already works.
    pg.stop();
    pg.run();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(store.user_count().unwrap(), 1);
}

#[test]
fn a_hung_server_is_unavailable_after_the_statement_timeout() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.database("hung");
    let store = PgStore::connect(&url).unwrap();
    let mut locker = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let answer = store.user_count();
    assert!(
        matches!(answer, Err(StoreError::Unavailable(_))),
        "{answer:?}"
    );
    tx.rollback().unwrap();
    assert_eq!(store.user_count().unwrap(), 0);
}

#[test]
fn changes_the_data_plane_sees_are_notified() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.database("notify");
    let mut store = PgStore::connect(&url).unwrap();
    let mut listener = connect_listener(&url).unwrap();
    listener
        .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
        .unwrap();
    let next_version = |listener: &mut postgres::Client| -> i64 {
        let mut pending = listener.notifications();
        let mut within = pending.timeout_iter(Duration::from_secs(5));
        let n = within.next().unwrap().expect("a notification within 5 s");
        assert_eq!(n.channel(), CHANGES_CHANNEL);
        n.payload().parse().unwrap()
    };
    let before = store.state_version().unwrap();
    store.insert_user(&user("u1", "u1@x.io", 1)).unwrap();
    let version = next_version(&mut listener);
    assert!(version > before);
    assert_eq!(store.state_version().unwrap(), version);
    // Usage and refresh tokens are not the data plane's: no notification, no new version.
    let row = (usage_key(1, "d", "u1", None, "m"), tally(1, 0, 0, 0, 0));
    store.record_usage(&[row]).unwrap();
    store.insert_refresh("r1", "f1", "u1", 100).unwrap();
    assert_eq!(store.state_version().unwrap(), version);
    // So the next notification is the next change's.
    store.insert_domain(&domain("d1", "one"), 1).unwrap();
    assert_eq!(next_version(&mut listener), version + 1);
    store
        .set_domain_limits("d1", &DomainLimits::default())
        .unwrap();
    assert_eq!(next_version(&mut listener), version + 2);

    let sealed = |kid: &str, at: i64, blob: &[u8]| SealedKey {
        kid: kid.into(),
        created_at_ns: at,
        sealed: blob.to_vec(),
    };
    store
        .insert_sealed_key(&sealed("k2", 2, b"sealed two"))
        .unwrap();
    assert_eq!(next_version(&mut listener), version + 3);
    store
        .insert_sealed_key(&sealed("k1", 2, b"sealed one"))
        .unwrap();
    store
        .insert_sealed_key(&sealed("k0", 3, b"sealed zero"))
        .unwrap();
    let again = store.insert_sealed_key(&sealed("k1", 4, b"other"));
    assert_eq!(conflict(again), Some("a signing key with this kid"));
    let kids: Vec<(String, i64)> = (store.sealed_keys().unwrap().into_iter())
        .map(|k| (k.kid, k.created_at_ns))
        .collect();
    assert_eq!(kids, [("k1".into(), 2), ("k2".into(), 2), ("k0".into(), 3)]);
    assert_eq!(store.sealed_keys().unwrap()[0].sealed, b"sealed one");
}

#[test]
fn a_bad_connection_string_is_named_without_its_password() {
    for url in [
        "postgresql://cubegate:s3cret-pw@127.0.0.1:port/db",
        "host=127.0.0.1 password=s3cret-pw port=nope",
    ] {
        let Err(e) = PgStore::connect(url) else {
            panic!("{url} connected")
        };
        let text = e.to_string();
        assert!(matches!(e, StoreError::Db(_)), "{text}");
        assert!(text.contains("port") && !text.contains("s3cret"), "{text}");
    }
    // An unquoted password with a space reads as a further option: not quoted back.
    let Err(e) = PgStore::connect("host=127.0.0.1 password=s3cret pw=x") else {
        panic!("an unknown option connected")
    };
    assert!(!e.to_string().contains("pw"), "{e}");
    // Nothing listening: the store is unavailable, not refused.
    let Err(e) = PgStore::connect("postgresql://cubegate@127.0.0.1:1/db") else {
        panic!("port 1 took a connection")
    };
    assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
}

/// `migrate-store` that fails part way through the usage (the connection lost, a row the
/// target refuses) must leave no usage behind: a second run copies usage only into minutes
/// the target has none for, so a partial first copy would make it skip the rest for good.
#[test]
fn a_migration_failing_in_its_usage_loses_none_on_the_next_run() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.database("partial");
    drop(PgStore::connect(&url).unwrap());
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    // The target refuses one row, far into the copy.
    db.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.model = 'poison' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON usage
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("cubegate-partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut source = Store::open(&dir.join("cubegate.db")).unwrap();
    let rows: Vec<(UsageKey, Tally)> = (0..1500)
        .map(|i| {
            let model = if i == 1200 { "poison" } else { "m" };
            (
                usage_key(1_000 + i, "d", "u", None, model),
                tally(1, 0, 0, 0, 0),
            )
        })
        .collect();
    source.record_usage(&rows).unwrap();
    drop(source);
    let migrate = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cubegate"))
            .args(["migrate-store", "--from"])
            .arg(&dir)
            .args(["--to", "postgres", "--force"])
            .env("CUBEGATE_POSTGRES_URL", &url)
            .env("CUBEGATE_KEY_ENCRYPTION_KEY", "ab".repeat(32))
            .output()
            .unwrap()
    };
    let first = migrate();
    assert_eq!(first.status.code(), Some(2), "{first:?}");
    db.batch_execute("DROP TRIGGER refuse_poison ON usage")
        .unwrap();
    let second = migrate();
    assert!(second.status.success(), "{second:?}");
    let copied: i64 = db
        .query_one("SELECT COALESCE(SUM(requests), 0)::BIGINT FROM usage", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        copied,
        1500,
        "after a failed first run: {}",
        String::from_utf8_lossy(&second.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
