//! The management plane over real HTTP, through the public port: bootstrap admin → users →
//! memberships → tokens → a streamed answer through the data plane → refresh rotation and
//! theft detection → membership removal taking effect at once → restart keeping it all.
//! Also the JWKS (checked with jsonwebtoken), brute-force limiting and bad input.

mod common;
use common::*;
use serde_json::{json, Value};

const D: &str = "dom";

fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Response {
    api_call(gw.addr, method, path, bearer, body)
}

fn chat(gw: &Gateway, access: &str) -> Response {
    let auth = format!("Bearer {access}");
    post_with(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[("Authorization", &auth)],
        &chat_body(VLLM_MODEL, true, ""),
    )
}

fn journey(driver: &str) {
    let vllm = sim("vllm", &[]);
    let body = domains_config(&[(D, &[("vllm", vllm.addr, &[VLLM_MODEL])])])
        .replace("mode = \"none\"", "mode = \"jwt\"");
    let gw = gateway(driver, &body);

    let first = login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
    assert_eq!(first.status, 201, "{}\n{}", first.text(), gw.log());
    let (admin, _) = tokens(&first);
    let profile = call(&gw, "GET", "/users/profile", Some(&admin), None);
    assert_eq!(profile.json()["role"], "admin");

    // Create a user; duplicates and typos are refused.
    let alice_pw = "alice's long passphrase 42";
    let created = call(
        &gw,
        "POST",
        "/users",
        Some(&admin),
        Some(json!({"email": "alice@example.com", "password": alice_pw})),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let alice_id = created.json()["id"].as_str().unwrap().to_string();
    let dup = call(
        &gw,
        "POST",
        "/users",
        Some(&admin),
        Some(json!({"email": "ALICE@example.com", "password": alice_pw})),
    );
    assert_eq!(dup.status, 409);
    let typo = call(
        &gw,
        "POST",
        "/users",
        Some(&admin),
        Some(json!({"emial": "b@example.com", "password": alice_pw})),
    );
    assert_eq!(typo.status, 400);
    assert!(typo.text().contains("emial"), "{}", typo.text());
    let weak = call(
        &gw,
        "POST",
        "/users",
        Some(&admin),
        Some(json!({"email": "b@example.com", "password": "password123"})),
    );
    assert_eq!(weak.status, 400);
    // Judged by zxcvbn, not a word list: a capitalized word, a year and two marks is
    // long enough and still refused, and the answer says why in zxcvbn's words.
    let guessable = call(
        &gw,
        "POST",
        "/users",
        Some(&admin),
        Some(json!({"email": "c@example.com", "password": "Summer2026!!"})),
    );
    assert_eq!(guessable.status, 400, "{}", guessable.text());
    assert_eq!(guessable.json()["error"]["code"], "weak_password");
    let why = guessable.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("too easy to guess:") && why.len() > 50,
        "{why}"
    );

    // Not a member yet: 403.
    let (alice, alice_refresh) = tokens(&login(gw.addr, "alice@example.com", alice_pw));
    assert_eq!(chat(&gw, &alice).status, 403);
    // A user may not change memberships.
    let r = call(
        &gw,
        "PUT",
        &format!("/domains/{D}/members/{alice_id}"),
        Some(&alice),
        Some(json!({"role": "admin"})),
    );
    assert_eq!(r.status, 403);
    let r = call(
        &gw,
        "PUT",
        &format!("/domains/{D}/members/{alice_id}"),
        Some(&admin),
        Some(json!({"role": "member"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Now she streams a chat completion through the data plane.
    let r = chat(&gw, &alice);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("[DONE]"));
    assert_eq!(
        call(&gw, "GET", "/domains", Some(&alice), None).json()["total"],
        1
    );

    // Refresh rotates; presenting the spent one revokes the whole family.
    let (alice2, alice_refresh2) = tokens(&call(
        &gw,
        "POST",
        "/users/tokens/refresh",
        Some(&alice_refresh),
        None,
    ));
    assert_eq!(chat(&gw, &alice2).status, 200);
    assert_eq!(
        call(
            &gw,
            "POST",
            "/users/tokens/refresh",
            Some(&alice_refresh),
            None
        )
        .status,
        401
    );
    assert_eq!(
        call(
            &gw,
            "POST",
            "/users/tokens/refresh",
            Some(&alice_refresh2),
            None
        )
        .status,
        401
    );

    // Removing the membership takes effect on the next request, cached token or not.
    let r = call(
        &gw,
        "DELETE",
        &format!("/domains/{D}/members/{alice_id}"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204);
    assert_eq!(chat(&gw, &alice2).status, 403);

    // The JWKS verifies this box's tokens (checked by an independent implementation).
    let jwks = call(&gw, "GET", "/keys/.well-known/jwks.json", None, None).json();
    let x = jwks["keys"][0]["x"].as_str().unwrap();
    let key = jsonwebtoken::DecodingKey::from_ed_components(x).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_issuer(&["cubegate"]);
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<Value>(&alice2, &key, &v).unwrap();
    assert_eq!(data.claims["sub"], alice_id.as_str());
    assert_eq!(data.claims["type"], "access");

    // Put her back, restart: everything is still there.
    call(
        &gw,
        "PUT",
        &format!("/domains/{D}/members/{alice_id}"),
        Some(&admin),
        Some(json!({"role": "member"})),
    );
    let path = gw.config_path.clone();
    drop(gw);
    let gw = gateway_from(&path);
    let (alice3, _) = tokens(&login(gw.addr, "alice@example.com", alice_pw));
    assert_eq!(chat(&gw, &alice3).status, 200);
    // Tokens issued before the restart still verify (the signing key persisted).
    assert_eq!(chat(&gw, &alice2).status, 200);
}

fn brute_force_is_limited(driver: &str) {
    let gw = gateway(driver, "[auth]\nmode = \"jwt\"\n");
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(login(gw.addr, TEST_ADMIN_EMAIL, "wrong password, wrong").status);
    }
    assert_eq!(&statuses[..4], &[401, 401, 401, 401], "{statuses:?}");
    assert_eq!(statuses[6], 429, "{statuses:?}");
    let limited = login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
    assert_eq!(
        limited.status, 429,
        "even the right password waits out the limit"
    );
    assert!(limited.header("retry-after").is_some());
    // An unknown account gets the same answer as a wrong password.
    let unknown = login(gw.addr, "nobody@example.com", "whatever whatever");
    assert!(unknown.status == 401 || unknown.status == 429);
}

fn first_start_needs_the_admin_password(_driver: &str) {
    let dir = unique_dir("nopw");
    let path = dir.join("c.toml");
    std::fs::write(&path, config_text("legacy", "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cubegate"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("CUBEGATE_ADMIN_PASSWORD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUBEGATE_ADMIN_PASSWORD"), "{err}");
}

fn api_keys_backends_and_disabling(driver: &str) {
    let vllm = sim("vllm", &[]);
    let body = domains_config(&[("cfg", &[("vllm", vllm.addr, &[VLLM_MODEL])])])
        .replace("mode = \"none\"", "mode = \"jwt\"");
    let gw = gateway(driver, &body);
    let (admin, _) = tokens(&login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD));
    let created = call(
        &gw,
        "POST",
        "/domains",
        Some(&admin),
        Some(json!({"name": "lab", "id": "lab"})),
    );
    assert_eq!(created.status, 201, "{}", created.text());
    // No backends yet: the data plane does not know the domain.
    assert_eq!(get_with(&gw, "/proxy/lab/v1/models", &admin).status, 404);
    // Backends are validated like the config file's; the file's domains are not editable.
    let bad = call(
        &gw,
        "PUT",
        "/domains/lab/backends",
        Some(&admin),
        Some(json!([{"kind": "vllm", "url": "ftp://x", "models": ["m"]}])),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    let typo = call(
        &gw,
        "PUT",
        "/domains/lab/backends",
        Some(&admin),
        Some(json!([{"kind": "vllm", "uri": "http://127.0.0.1:1", "models": ["m"]}])),
    );
    assert_eq!(typo.status, 400);
    let sim_url = format!("http://{}", vllm.addr);
    let owned = call(
        &gw,
        "PUT",
        "/domains/cfg/backends",
        Some(&admin),
        Some(json!([{"kind": "vllm", "url": sim_url, "models": ["*"]}])),
    );
    assert_eq!(owned.status, 409);
    let set = call(
        &gw,
        "PUT",
        "/domains/lab/backends",
        Some(&admin),
        Some(json!([{"kind": "vllm", "url": sim_url, "models": [VLLM_MODEL]}])),
    );
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(get_with(&gw, "/proxy/lab/v1/models", &admin).status, 200);

    // An API key works as a bearer token in its one domain, and stops when revoked.
    let k = call(
        &gw,
        "POST",
        "/domains/lab/keys",
        Some(&admin),
        Some(json!({"name": "ci"})),
    );
    assert_eq!(k.status, 201, "{}", k.text());
    let key = k.json()["key"].as_str().unwrap().to_string();
    let key_id = k.json()["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("cg_") && key.len() > 40);
    let chat_in = |domain: &str, bearer: &str| {
        let auth = format!("Bearer {bearer}");
        post_with(
            gw.addr,
            &format!("/proxy/{domain}/v1/chat/completions"),
            &[("Authorization", &auth)],
            &chat_body(VLLM_MODEL, true, ""),
        )
    };
    for _ in 0..3 {
        assert_eq!(chat_in("lab", &key).status, 200);
    }
    // The access records name the key by its id, never by the key itself.
    expect_log(
        &gw,
        &format!("key=\"{key_id}\""),
        std::time::Duration::from_secs(5),
    );
    assert!(
        !gw.log().contains(&key),
        "the API key itself reached the log"
    );
    assert_eq!(
        chat_in("cfg", &key).status,
        403,
        "a key is scoped to its domain"
    );
    let pull = call(
        &gw,
        "POST",
        "/proxy/lab/api/pull",
        Some(&key),
        Some(json!({"model": "x"})),
    );
    assert_eq!(pull.status, 403);
    let r = call(
        &gw,
        "DELETE",
        &format!("/domains/lab/keys/{key_id}"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204);
    let r = chat_in("lab", &key);
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().contains("API key"));
    // A key that expires.
    let short = call(
        &gw,
        "POST",
        "/domains/lab/keys",
        Some(&admin),
        Some(json!({"name": "short", "expires_in_s": 1})),
    )
    .json();
    let short = short["key"].as_str().unwrap().to_string();
    assert!(eventually(std::time::Duration::from_secs(5), || chat_in(
        "lab", &short
    )
    .status
        == 401));

    // Disabling a user stops their tokens at once, cached or not, and their logins.
    let bob_pw = "bob's long passphrase 77";
    let bob = call(
        &gw,
        "POST",
        "/users",
        Some(&admin),
        Some(json!({"email": "bob@example.com", "password": bob_pw})),
    )
    .json();
    let bob_id = bob["id"].as_str().unwrap().to_string();
    call(
        &gw,
        "PUT",
        &format!("/domains/lab/members/{bob_id}"),
        Some(&admin),
        Some(json!({"role": "member"})),
    );
    let (bob_token, _) = tokens(&login(gw.addr, "bob@example.com", bob_pw));
    assert_eq!(chat_in("lab", &bob_token).status, 200);
    let r = call(
        &gw,
        "POST",
        &format!("/users/{bob_id}/disable"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat_in("lab", &bob_token).status, 401);
    assert_eq!(login(gw.addr, "bob@example.com", bob_pw).status, 401);

    // A key made before a restart still works after it, and the API domain is back.
    let k2 = call(
        &gw,
        "POST",
        "/domains/lab/keys",
        Some(&admin),
        Some(json!({"name": "kept"})),
    )
    .json();
    let k2 = k2["key"].as_str().unwrap().to_string();
    let path = gw.config_path.clone();
    drop(gw);
    let gw = gateway_from(&path);
    let kept = get_with(&gw, "/proxy/lab/v1/models", &k2);
    assert_eq!(kept.status, 200, "{}", kept.text());
    let revoked = get_with(&gw, "/proxy/lab/v1/models", &key);
    assert_eq!(revoked.status, 401, "a revoked key stays revoked");
}

fn get_with(gw: &Gateway, path: &str, bearer: &str) -> Response {
    let auth = format!("Bearer {bearer}");
    raw(
        gw.addr,
        &request_bytes("GET", path, &[("Authorization", &auth)], b""),
    )
    .expect("an answer")
}

/// A new signing key signs from now on; tokens of the old one keep working, and the JWKS
/// lists both.
fn signing_key_rotation(driver: &str) {
    let vllm = sim("vllm", &[]);
    let body = domains_config(&[(D, &[("vllm", vllm.addr, &[VLLM_MODEL])])])
        .replace("mode = \"none\"", "mode = \"jwt\"");
    let gw = gateway(driver, &body);
    let (before, _) = tokens(&login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD));
    let kid_of = |t: &str| {
        let h = jsonwebtoken::decode_header(t).unwrap();
        h.kid.unwrap()
    };
    let user = call(
        &gw,
        "POST",
        "/users",
        Some(&before),
        Some(json!({"email": "u@example.com", "password": "some long passphrase"})),
    )
    .json();
    assert_eq!(user["email"], "u@example.com");
    let r = call(&gw, "POST", "/keys/rotate", Some(&before), None);
    assert_eq!(r.status, 201, "{}", r.text());
    let new_kid = r.json()["kid"].as_str().unwrap().to_string();
    let (after, _) = tokens(&login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD));
    assert_eq!(kid_of(&after), new_kid);
    assert_ne!(kid_of(&before), new_kid);
    let jwks = call(&gw, "GET", "/keys/.well-known/jwks.json", None, None).json();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    for t in [&before, &after] {
        assert_eq!(chat(&gw, t).status, 200, "a token of either key works");
    }
    // Only the platform admin rotates.
    let (u, _) = tokens(&login(gw.addr, "u@example.com", "some long passphrase"));
    assert_eq!(
        call(&gw, "POST", "/keys/rotate", Some(&u), None).status,
        403
    );
}

/// Concurrent writers: many users created at once all land; the same email at once lands
/// exactly once.
fn concurrent_writers(driver: &str) {
    let gw = gateway(driver, "[auth]\nmode = \"jwt\"\n");
    let (admin, _) = tokens(&login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD));
    let statuses = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for t in 0..6 {
            let (gw, admin, statuses) = (&gw, &admin, &statuses);
            scope.spawn(move || {
                for i in 0..5 {
                    let email = format!("user{t}-{i}@example.com");
                    let r = call(gw, "POST", "/users", Some(admin), Some(json!({"email": email, "password": "a long enough passphrase"})));
                    statuses.lock().unwrap().push(r.status);
                    let r = call(gw, "POST", "/users", Some(admin), Some(json!({"email": "same@example.com", "password": "a long enough passphrase"})));
                    statuses.lock().unwrap().push(r.status);
                }
            });
        }
    });
    let statuses = statuses.into_inner().unwrap();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        31,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        29,
        "{statuses:?}"
    );
    let users = call(&gw, "GET", "/users", Some(&admin), None).json();
    assert_eq!(users["total"], 32);
}

/// A domain added to the file and reloaded with SIGHUP can take members at once.
fn reloaded_config_domains_take_members(driver: &str) {
    let vllm = sim("vllm", &[]);
    let body = |ids: &[&str]| {
        let mut text = String::from("[auth]\nmode = \"jwt\"\n");
        for id in ids {
            text.push_str(&format!(
                "[[domains]]\nid = \"{id}\"\n[[domains.backends]]\nkind = \"vllm\"\nurl = \"http://{}\"\nmodels = [\"*\"]\n",
                vllm.addr
            ));
        }
        text
    };
    let gw = gateway(driver, &body(&["first"]));
    let (admin, _) = tokens(&login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD));
    let me = call(&gw, "GET", "/users/profile", Some(&admin), None).json();
    let id = me["id"].as_str().unwrap().to_string();
    let put = |d: &str| {
        call(
            &gw,
            "PUT",
            &format!("/domains/{d}/members/{id}"),
            Some(&admin),
            Some(json!({"role": "admin"})),
        )
        .status
    };
    assert_eq!(put("second"), 404);
    // Rewrite the file (keeping its [management] section, hence its store) and reload.
    let old = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, format!("{old}\n[[domains]]\nid = \"second\"\n[[domains.backends]]\nkind = \"vllm\"\nurl = \"http://{}\"\nmodels = [\"*\"]\n", vllm.addr)).unwrap();
    gw.signal("HUP");
    assert!(eventually(std::time::Duration::from_secs(5), || put(
        "second"
    ) == 200));
}

/// Found by review: an outside issuer's token naming a local user's id gets none of that
/// user's memberships; racing a refresh token cannot escape family revocation; an API key
/// dies with its creator's membership; absurd usernames are refused before any work.
fn review_regressions(driver: &str) {
    let vllm = sim("vllm", &[]);
    let secret = "another shared secret, longer than thirty-two bytes";
    let body = format!(
        "{}\n[[auth.trusted]]\nissuer = \"https://other-idp/\"\nhs_secret_env = \"OTHER_SECRET\"\n",
        domains_config(&[(D, &[("vllm", vllm.addr, &[VLLM_MODEL])])])
            .replace("mode = \"none\"", "mode = \"jwt\"")
    );
    let gw = gateway_env(driver, &body, &[("OTHER_SECRET", secret)]);
    let (admin, _) = tokens(&login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD));
    let pw = "carol's long passphrase 9";
    let carol = call(
        &gw,
        "POST",
        "/users",
        Some(&admin),
        Some(json!({"email": "carol@example.com", "password": pw})),
    )
    .json();
    let carol_id = carol["id"].as_str().unwrap().to_string();
    let r = call(
        &gw,
        "PUT",
        &format!("/domains/{D}/members/{carol_id}"),
        Some(&admin),
        Some(json!({"role": "admin"})),
    );
    assert_eq!(r.status, 200);

    // 1. The other issuer says sub = carol's id: her memberships are not its to use.
    let claims = json!({"iss": "https://other-idp/", "sub": carol_id, "exp": unix_in(600)});
    let forged = hs256_token(secret, &claims);
    assert_eq!(chat(&gw, &forged).status, 403);

    // 2. The same refresh token twice at once: whatever wins, no live chain remains.
    let (_, refresh) = tokens(&login(gw.addr, "carol@example.com", pw));
    let results: Vec<Response> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| call(&gw, "POST", "/users/tokens/refresh", Some(&refresh), None))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().filter(|r| r.status == 201).count() <= 1);
    for r in results.iter().filter(|r| r.status == 201) {
        let next = r.json()["refresh_token"].as_str().unwrap().to_string();
        assert_eq!(
            call(&gw, "POST", "/users/tokens/refresh", Some(&next), None).status,
            401
        );
    }

    // 3. Carol's API key stops when she leaves the domain.
    let (carol_token, _) = tokens(&login(gw.addr, "carol@example.com", pw));
    let k = call(
        &gw,
        "POST",
        &format!("/domains/{D}/keys"),
        Some(&carol_token),
        Some(json!({"name": "hers"})),
    );
    assert_eq!(k.status, 201, "{}", k.text());
    let key = k.json()["key"].as_str().unwrap().to_string();
    assert_eq!(chat(&gw, &key).status, 200);
    let r = call(
        &gw,
        "DELETE",
        &format!("/domains/{D}/members/{carol_id}"),
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204);
    assert_eq!(chat(&gw, &key).status, 401);

    // 4. An absurd username is refused before any hashing or bookkeeping.
    let huge = "x".repeat(100_000);
    assert_eq!(login(gw.addr, &huge, "whatever whatever").status, 400);
}

/// The data plane reads a management request whole before passing it on: a trickled body
/// times out at the gateway (the management threads never see it), an oversized one is 413.
fn management_bodies_are_buffered(driver: &str) {
    let gw = gateway(driver, &domains_config(&[]));
    let mut s = connect(gw.addr);
    send(
        &mut s,
        b"POST /users/tokens/issue HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"username\":",
    );
    let r = Reader::new(s).response().expect("an answer");
    assert_eq!(r.status, 408, "{}", r.text());
    let big = format!(r#"{{"username":"{}","password":"x"}}"#, "a".repeat(1 << 20));
    let r = raw(
        gw.addr,
        &request_bytes("POST", "/users/tokens/issue", &[], big.as_bytes()),
    )
    .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    // And the management API still answers.
    assert_eq!(
        login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD).status,
        201
    );
}

for_each_driver!(
    management_bodies_are_buffered,
    review_regressions,
    reloaded_config_domains_take_members,
    signing_key_rotation,
    concurrent_writers,
    journey,
    api_keys_backends_and_disabling,
    brute_force_is_limited,
    first_start_needs_the_admin_password
);
