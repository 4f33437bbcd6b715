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
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    raw(
        gw.addr,
        &request_bytes(method, path, &headers, body.as_bytes()),
    )
    .expect("an answer")
}

fn login(gw: &Gateway, email: &str, password: &str) -> Response {
    call(
        gw,
        "POST",
        "/users/tokens/issue",
        None,
        Some(json!({"username": email, "password": password})),
    )
}

#[track_caller]
fn tokens(r: &Response) -> (String, String) {
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["access_token"].as_str().unwrap().to_string(),
        v["refresh_token"].as_str().unwrap().to_string(),
    )
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

    let first = login(&gw, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
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

    // Not a member yet: 403.
    let (alice, alice_refresh) = tokens(&login(&gw, "alice@example.com", alice_pw));
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
    let (alice3, _) = tokens(&login(&gw, "alice@example.com", alice_pw));
    assert_eq!(chat(&gw, &alice3).status, 200);
    // Tokens issued before the restart still verify (the signing key persisted).
    assert_eq!(chat(&gw, &alice2).status, 200);
}

fn brute_force_is_limited(driver: &str) {
    let gw = gateway(driver, "[auth]\nmode = \"jwt\"\n");
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(login(&gw, TEST_ADMIN_EMAIL, "wrong password, wrong").status);
    }
    assert_eq!(&statuses[..4], &[401, 401, 401, 401], "{statuses:?}");
    assert_eq!(statuses[6], 429, "{statuses:?}");
    let limited = login(&gw, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
    assert_eq!(
        limited.status, 429,
        "even the right password waits out the limit"
    );
    assert!(limited.header("retry-after").is_some());
    // An unknown account gets the same answer as a wrong password.
    let unknown = login(&gw, "nobody@example.com", "whatever whatever");
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

for_each_driver!(
    journey,
    brute_force_is_limited,
    first_start_needs_the_admin_password
);
