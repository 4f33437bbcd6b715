//! Limits through the management API, over real HTTP on the public port: a domain's sets
//! (over the config file's), a member's own set, an API key's set (also at creation); each
//! set, read back and cleared; bad sets refused naming the field; only the domain's admins
//! and the platform admin; sets gone with their membership or key; kept across a restart
//! and a SIGHUP reload. Reads answer from the published snapshot, so a read shows what the
//! data plane has in force.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A config domain with limits in the file, one without API sets, and the file's settings.
fn config(vllm: std::net::SocketAddr, plain_rpm: u32) -> String {
    let mut text = domains_config(&[
        ("cfg", &[("vllm", vllm, &[VLLM_MODEL])]),
        ("plain", &[("vllm", vllm, &[VLLM_MODEL])]),
    ])
    .replace("mode = \"none\"", "mode = \"jwt\"");
    // `plain` is the last [[domains]]: these tables are its. `cfg` gets its own below.
    text.push_str(&format!(
        "[domains.limits]\nrequests_per_minute = {plain_rpm}\n[domains.member_limits]\nconcurrent = 4\n"
    ));
    text.replace(
        "id = \"cfg\"\n",
        "id = \"cfg\"\n[domains.limits]\nrequests_per_minute = 50\n[domains.member_limits]\ntokens_per_minute = 1000\n",
    )
}

fn call(gw: &Gateway, method: &str, path: &str, bearer: &str, body: Option<Value>) -> Response {
    api_call(gw.addr, method, path, Some(bearer), body)
}

/// `call` that must answer `status`; its JSON (or Null for an empty answer).
#[track_caller]
fn expect(
    gw: &Gateway,
    status: u16,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<Value>,
) -> Value {
    let r = call(gw, method, path, bearer, body);
    assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

/// A new user (with a token), a member of `domain` with `role` when one is given.
fn user(gw: &Gateway, admin: &str, name: &str, domain: Option<(&str, &str)>) -> (String, String) {
    let email = format!("{name}@example.com");
    let password = format!("{name}'s long passphrase 42");
    let created = expect(
        gw,
        201,
        "POST",
        "/users",
        admin,
        Some(json!({"email": email, "password": password})),
    );
    let id = created["id"].as_str().unwrap().to_string();
    if let Some((d, role)) = domain {
        let path = format!("/domains/{d}/members/{id}");
        expect(gw, 200, "PUT", &path, admin, Some(json!({"role": role})));
    }
    let r = login(gw.addr, &email, &password);
    assert_eq!(r.status, 201, "{}", r.text());
    (id, r.json()["access_token"].as_str().unwrap().to_string())
}

/// `PUT {}` on `path` is a 404 whose message has each of `words`.
#[track_caller]
fn refused_naming(gw: &Gateway, admin: &str, path: &str, words: &[&str]) {
    let r = call(gw, "PUT", path, admin, Some(json!({})));
    assert_eq!(r.status, 404, "PUT {path}: {}", r.text());
    for word in words {
        assert!(r.text().contains(word), "PUT {path}: {}", r.text());
    }
}

fn key(gw: &Gateway, admin: &str, domain: &str, body: Value) -> Value {
    expect(
        gw,
        201,
        "POST",
        &format!("/domains/{domain}/keys"),
        admin,
        Some(body),
    )
}

fn set(rpm: u32, tpm: u32, tpd: u32, concurrent: u32) -> Value {
    json!({"requests_per_minute": rpm, "tokens_per_minute": tpm, "tokens_per_day": tpd, "concurrent": concurrent})
}

fn each_kind_is_set_read_and_cleared(driver: &str) {
    let vllm = sim("vllm", &[]);
    let gw = gateway(driver, &config(vllm.addr, 60));
    let admin = admin_token(gw.addr);
    let (alice, _) = user(&gw, &admin, "alice", Some(("cfg", "member")));

    // The file's sets, until the API sets any.
    let got = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(got["source"], "file", "{got}");
    assert_eq!(got["domain"], set(50, 0, 0, 0));
    assert_eq!(got["per_member"], set(0, 1000, 0, 0));
    assert_eq!(got["members"], json!({}));

    // A set present replaces that set whole; an absent one keeps what was in force.
    let put = Some(json!({"per_member": {"concurrent": 2}}));
    let got = expect(&gw, 200, "PUT", "/domains/cfg/limits", &admin, put);
    assert_eq!(got["source"], "api", "{got}");
    assert_eq!(got["domain"], set(50, 0, 0, 0));
    assert_eq!(got["per_member"], set(0, 0, 0, 2));
    let put = Some(json!({"domain": {"tokens_per_day": 10000}, "per_member": null}));
    expect(&gw, 200, "PUT", "/domains/cfg/limits", &admin, put);
    let got = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(got["domain"], set(0, 0, 10000, 0), "{got}");
    assert_eq!(got["per_member"], set(0, 0, 0, 2));
    // Another domain keeps the file's.
    let plain = expect(&gw, 200, "GET", "/domains/plain/limits", &admin, None);
    assert_eq!(plain["source"], "file");
    assert_eq!(plain["domain"], set(60, 0, 0, 0));

    // A member: the domain's default until they have their own set.
    let member = format!("/domains/cfg/members/{alice}/limits");
    let got = expect(&gw, 200, "GET", &member, &admin, None);
    assert_eq!(got["source"], "per_member", "{got}");
    assert_eq!(got["limits"], set(0, 0, 0, 2));
    let three = Some(json!({"requests_per_minute": 3}));
    let got = expect(&gw, 200, "PUT", &member, &admin, three.clone());
    assert_eq!(got["source"], "member", "{got}");
    assert_eq!(got["limits"], set(3, 0, 0, 0));
    // `{}` is a set too: this member has no limits at all, whatever the default.
    let got = expect(&gw, 200, "PUT", &member, &admin, Some(json!({})));
    assert_eq!(
        (&got["source"], &got["limits"]),
        (&json!("member"), &set(0, 0, 0, 0))
    );
    expect(&gw, 200, "PUT", &member, &admin, three);
    let got = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(got["members"], json!({alice.as_str(): set(3, 0, 0, 0)}));

    // An API key: limits at creation, then replaced.
    let made = key(
        &gw,
        &admin,
        "cfg",
        json!({"name": "ci", "limits": {"tokens_per_minute": 500}}),
    );
    assert_eq!(made["limits"], set(0, 500, 0, 0), "{made}");
    let key_id = made["id"].as_str().unwrap().to_string();
    let plain_key = key(&gw, &admin, "cfg", json!({"name": "plain"}));
    assert_eq!(plain_key["limits"], set(0, 0, 0, 0));
    let path = format!("/domains/cfg/keys/{key_id}/limits");
    let got = expect(&gw, 200, "GET", &path, &admin, None);
    assert_eq!(
        (&got["source"], &got["limits"]),
        (&json!("key"), &set(0, 500, 0, 0))
    );
    let got = expect(
        &gw,
        200,
        "PUT",
        &path,
        &admin,
        Some(json!({"concurrent": 1})),
    );
    assert_eq!(got["limits"], set(0, 0, 0, 1), "{got}");
    let got = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(got["keys"], json!({key_id.as_str(): set(0, 0, 0, 1)}));

    // Unknown members and keys, and keys of another domain, are 404 naming what.
    let (bob, _) = user(&gw, &admin, "bob", None);
    let stranger = format!("/domains/cfg/members/{bob}/limits");
    refused_naming(&gw, &admin, &stranger, &[&bob, "not a member"]);
    expect(
        &gw,
        201,
        "POST",
        "/domains",
        &admin,
        Some(json!({"name": "lab", "id": "lab"})),
    );
    let lab_key = key(&gw, &admin, "lab", json!({"name": "lab"}));
    let lab_key = lab_key["id"].as_str().unwrap();
    let elsewhere = format!("/domains/cfg/keys/{lab_key}/limits");
    refused_naming(&gw, &admin, &elsewhere, &[lab_key]);
    refused_naming(&gw, &admin, "/domains/nowhere/limits", &["nowhere"]);

    // Cleared: back to the default, to none, to the file's.
    expect(&gw, 204, "DELETE", &member, &admin, None);
    let got = expect(&gw, 200, "GET", &member, &admin, None);
    assert_eq!(
        (&got["source"], &got["limits"]),
        (&json!("per_member"), &set(0, 0, 0, 2))
    );
    expect(&gw, 204, "DELETE", &path, &admin, None);
    let got = expect(&gw, 200, "GET", &path, &admin, None);
    assert_eq!(
        (&got["source"], &got["limits"]),
        (&json!("none"), &set(0, 0, 0, 0))
    );
    expect(&gw, 204, "DELETE", "/domains/cfg/limits", &admin, None);
    let got = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(got["source"], "file", "{got}");
    assert_eq!(got["domain"], set(50, 0, 0, 0));
    assert_eq!(got["per_member"], set(0, 1000, 0, 0));
    // Clearing what is not set is no error.
    expect(&gw, 204, "DELETE", "/domains/cfg/limits", &admin, None);
    // An API domain has no file: its sets are the API's or none.
    let got = expect(&gw, 200, "GET", "/domains/lab/limits", &admin, None);
    assert_eq!(
        (&got["source"], &got["domain"]),
        (&json!("none"), &set(0, 0, 0, 0))
    );
}

fn bad_sets_are_refused_naming_the_field(driver: &str) {
    let vllm = sim("vllm", &[]);
    let gw = gateway(driver, &config(vllm.addr, 60));
    let admin = admin_token(gw.addr);
    let (alice, _) = user(&gw, &admin, "alice", Some(("cfg", "member")));
    let member = format!("/domains/cfg/members/{alice}/limits");
    let made = key(&gw, &admin, "cfg", json!({"name": "ci"}));
    let key_path = format!("/domains/cfg/keys/{}/limits", made["id"].as_str().unwrap());
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/domains/cfg/limits",
            json!({"domain": {"requests_per_minute": -1}}),
            "domain.requests_per_minute",
        ),
        (
            "/domains/cfg/limits",
            json!({"per_member": {"tokens_per_minute": 1.5}}),
            "per_member.tokens_per_minute",
        ),
        (
            "/domains/cfg/limits",
            json!({"domain": {"concurrent": "3"}}),
            "domain.concurrent",
        ),
        (
            "/domains/cfg/limits",
            json!({"domain": {"tokens_per_day": 4294967296u64}}),
            "domain.tokens_per_day",
        ),
        (
            "/domains/cfg/limits",
            json!({"domain": {"rpm": 1}}),
            "domain.rpm",
        ),
        ("/domains/cfg/limits", json!({"domain": 5}), "domain"),
        ("/domains/cfg/limits", json!({"domains": {}}), "domains"),
        ("/domains/cfg/limits", json!([]), "domain"),
        (
            member.as_str(),
            json!({"requests_per_minute": -5}),
            "requests_per_minute",
        ),
        (member.as_str(), json!({"concurrent": null}), "concurrent"),
        (
            member.as_str(),
            json!({"tokens_per_day": 1e3}),
            "tokens_per_day",
        ),
        (
            key_path.as_str(),
            json!({"requests_per_minute": 1, "burst": 2}),
            "burst",
        ),
        (key_path.as_str(), json!(null), "the body"),
    ];
    for (path, body, field) in cases {
        let r = call(&gw, "PUT", path, &admin, Some(body.clone()));
        assert_eq!(r.status, 400, "PUT {path} {body}: {}", r.text());
        assert_eq!(r.error_code(), "invalid_limits", "{}", r.text());
        assert!(r.text().contains(field), "PUT {path} {body}: {}", r.text());
    }
    let r = call(
        &gw,
        "POST",
        "/domains/cfg/keys",
        &admin,
        Some(json!({"name": "bad", "limits": {"concurrent": -1}})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("limits.concurrent"), "{}", r.text());
    // Nothing was changed by the refusals; the largest figure is taken.
    let got = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(got["source"], "file", "{got}");
    let max = json!({"domain": {"tokens_per_day": u32::MAX}});
    let got = expect(&gw, 200, "PUT", "/domains/cfg/limits", &admin, Some(max));
    assert_eq!(got["domain"]["tokens_per_day"], u32::MAX);
    // Other methods are not limits' business.
    let r = call(&gw, "POST", "/domains/cfg/limits", &admin, Some(json!({})));
    assert_eq!(r.status, 405, "{}", r.text());
}

fn only_admins_set_limits(driver: &str) {
    let vllm = sim("vllm", &[]);
    let gw = gateway(driver, &config(vllm.addr, 60));
    let admin = admin_token(gw.addr);
    let (alice, alice_token) = user(&gw, &admin, "alice", Some(("cfg", "member")));
    let (_, outsider) = user(&gw, &admin, "carol", None);
    let (_, other_admin) = user(&gw, &admin, "dave", Some(("plain", "admin")));
    let member = format!("/domains/cfg/members/{alice}/limits");
    let body = json!({"requests_per_minute": 1});
    for token in [&alice_token, &outsider, &other_admin] {
        for (method, path) in [
            ("GET", "/domains/cfg/limits"),
            ("PUT", "/domains/cfg/limits"),
            ("DELETE", "/domains/cfg/limits"),
            ("PUT", member.as_str()),
        ] {
            let r = call(&gw, method, path, token, Some(json!({"domain": body})));
            assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        }
    }
    let r = api_call(gw.addr, "GET", "/domains/cfg/limits", None, None);
    assert_eq!(r.status, 401);
    // A domain admin of cfg may, on their own domain only.
    let (_, cfg_admin) = user(&gw, &admin, "erin", Some(("cfg", "admin")));
    let got = expect(&gw, 200, "PUT", &member, &cfg_admin, Some(body));
    assert_eq!(got["limits"]["requests_per_minute"], 1);
    let r = call(&gw, "GET", "/domains/plain/limits", &cfg_admin, None);
    assert_eq!(r.status, 403);
}

fn sets_follow_their_owners_restarts_and_reloads(driver: &str) {
    let vllm = sim("vllm", &[]);
    let gw = gateway(driver, &config(vllm.addr, 60));
    let admin = admin_token(gw.addr);
    let (alice, _) = user(&gw, &admin, "alice", Some(("cfg", "member")));
    let member = format!("/domains/cfg/members/{alice}/limits");
    let rpm = |n: u32| Some(json!({"requests_per_minute": n}));

    // Removing the member drops their set (coming back, they start from the default);
    // a role change keeps it.
    expect(&gw, 200, "PUT", &member, &admin, rpm(3));
    let membership = format!("/domains/cfg/members/{alice}");
    let role = |r: &str| Some(json!({"role": r}));
    expect(&gw, 200, "PUT", &membership, &admin, role("admin"));
    assert_eq!(
        expect(&gw, 200, "GET", &member, &admin, None)["source"],
        "member"
    );
    expect(&gw, 204, "DELETE", &membership, &admin, None);
    assert_eq!(call(&gw, "GET", &member, &admin, None).status, 404);
    expect(&gw, 200, "PUT", &membership, &admin, role("member"));
    assert_eq!(
        expect(&gw, 200, "GET", &member, &admin, None)["source"],
        "per_member"
    );

    // Revoking a key drops its set.
    let made = key(
        &gw,
        &admin,
        "cfg",
        json!({"name": "ci", "limits": {"concurrent": 1}}),
    );
    let key_id = made["id"].as_str().unwrap().to_string();
    expect(
        &gw,
        204,
        "DELETE",
        &format!("/domains/cfg/keys/{key_id}"),
        &admin,
        None,
    );
    let got = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(got["keys"], json!({}), "{got}");
    assert_eq!(
        call(
            &gw,
            "GET",
            &format!("/domains/cfg/keys/{key_id}/limits"),
            &admin,
            None
        )
        .status,
        404
    );

    // Set every kind, then restart: all kept.
    let put = Some(json!({"domain": {"tokens_per_minute": 9000}, "per_member": {"concurrent": 2}}));
    expect(&gw, 200, "PUT", "/domains/cfg/limits", &admin, put);
    expect(&gw, 200, "PUT", &member, &admin, rpm(7));
    let kept = key(
        &gw,
        &admin,
        "cfg",
        json!({"name": "kept", "limits": {"tokens_per_day": 5}}),
    );
    let kept_path = format!("/domains/cfg/keys/{}/limits", kept["id"].as_str().unwrap());
    let before = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    let path = gw.config_path.clone();
    drop(gw);
    let gw = gateway_from(&path);
    let admin = admin_token(gw.addr);
    let after = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(after, before);
    assert_eq!(after["source"], "api");
    assert_eq!(after["domain"], set(0, 9000, 0, 0));
    assert_eq!(
        expect(&gw, 200, "GET", &member, &admin, None)["limits"],
        set(7, 0, 0, 0)
    );
    assert_eq!(
        expect(&gw, 200, "GET", &kept_path, &admin, None)["limits"],
        set(0, 0, 5, 0)
    );

    // A reload takes the file's new sets and keeps the API's.
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("requests_per_minute = 60", "requests_per_minute = 70");
    std::fs::write(&path, text).unwrap();
    gw.signal("HUP");
    let plain_rpm = || {
        expect(&gw, 200, "GET", "/domains/plain/limits", &admin, None)["domain"]
            ["requests_per_minute"]
            .clone()
    };
    assert!(
        eventually(Duration::from_secs(5), || plain_rpm() == 70),
        "{}",
        gw.log()
    );
    let after_reload = expect(&gw, 200, "GET", "/domains/cfg/limits", &admin, None);
    assert_eq!(after_reload, before);
}

/// Sets made through the API are enforced on the data plane at once: an API key's (set at
/// its creation) and a member's own, each named in the 429.
fn api_sets_are_enforced(driver: &str) {
    let vllm = sim("vllm", &[]);
    let gw = gateway(driver, &config(vllm.addr, 0));
    let admin = admin_token(gw.addr);
    let chat = |bearer: &str| {
        post_with(
            gw.addr,
            "/proxy/cfg/v1/chat/completions",
            &[("Authorization", &format!("Bearer {bearer}"))],
            &chat_body(VLLM_MODEL, false, ""),
        )
    };
    let created = key(
        &gw,
        &admin,
        "cfg",
        json!({"name": "two a minute", "limits": set(2, 0, 0, 0)}),
    );
    let api_key = created["key"].as_str().unwrap();
    same_minute(5);
    let statuses: Vec<u16> = (0..3).map(|_| chat(api_key).status).collect();
    assert_eq!(statuses, [200, 200, 429]);
    let refused = chat(api_key);
    assert!(
        refused.text().contains("this API key"),
        "{}",
        refused.text()
    );
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("2"));

    let (id, token) = user(&gw, &admin, "mia", Some(("cfg", "member")));
    let path = format!("/domains/cfg/members/{id}/limits");
    expect(&gw, 200, "PUT", &path, &admin, Some(set(1, 0, 0, 0)));
    same_minute(5);
    assert_eq!(chat(&token).status, 200);
    let refused = chat(&token);
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(
        refused.text().contains("you in this domain"),
        "{}",
        refused.text()
    );
}

for_each_driver!(
    api_sets_are_enforced,
    each_kind_is_set_read_and_cleared,
    bad_sets_are_refused_naming_the_field,
    only_admins_set_limits,
    sets_follow_their_owners_restarts_and_reloads,
);
