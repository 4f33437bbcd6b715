//! `[[domains]] sticky`: what pins a conversation to one GPU host beyond its prefix — an
//! `X-Session-Id` header (the default), the body's OpenAI `"user"` field (`sticky =
//! "user"`), or nothing (`"none"`). Real gateway, simulated vLLM hosts on loopback, both
//! drivers; where each request went is read from its access record (`backend`).

mod common;
use common::*;
use serde_json::json;
use std::collections::HashSet;

const HOSTS: usize = 4;

/// The gateway over four hosts, one domain per `sticky` value, JSON access records.
fn fleet(driver: &str) -> (Vec<Proc>, Gateway) {
    let hosts: Vec<Proc> = (0..HOSTS).map(|_| sim("vllm", &[])).collect();
    let mut text = String::from("[auth]\nmode = \"none\"\n\n");
    for sticky in ["header", "user", "none"] {
        text +=
            &format!("[[domains]]\nid = \"{sticky}\"\nrouting = \"auto\"\nsticky = \"{sticky}\"\n");
        for h in &hosts {
            text += &format!(
                "[[domains.backends]]\nkind = \"vllm\"\nurl = \"http://{}\"\nmodels = [\"{VLLM_MODEL}\"]\n",
                h.addr
            );
        }
    }
    let gw = gateway_with_env(driver, "", &text, &[("CUBEGATE_LOG_FORMAT", "json")]);
    (hosts, gw)
}

/// A chat whose system prompt (its first 512 body bytes, the prefix key) is `topic`'s
/// own, with `user` (any JSON value) after the messages, as the OpenAI SDKs send it.
fn body(topic: &str, user: serde_json::Value) -> String {
    let system = format!(
        "{topic}: {}",
        "Answer the customer briefly and kindly. ".repeat(20)
    );
    let mut b = json!({
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        "model": VLLM_MODEL,
        "max_tokens": 2,
    });
    if !user.is_null() {
        b["user"] = user;
    }
    b.to_string()
}

/// Sends `body` to `domain` as request `id` (with `headers`) and says which host served it.
fn host_of(gw: &Gateway, domain: &str, id: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut h = vec![("X-Request-Id", id)];
    h.extend_from_slice(headers);
    let r = post_with(
        gw.addr,
        &format!("/proxy/{domain}/v1/chat/completions"),
        &h,
        body,
    );
    assert_eq!(r.status, 200, "{id}: {}", r.text());
    access_record(gw, id)["backend"]
        .as_str()
        .expect("backend")
        .to_string()
}

/// Hosts that served one user's (or session's) requests over eight different prompts.
fn hosts_of(
    gw: &Gateway,
    domain: &str,
    tag: &str,
    user: serde_json::Value,
    headers: &[(&str, &str)],
) -> HashSet<String> {
    (0..8)
        .map(|t| {
            let id = format!("{domain}-{tag}-{t}");
            host_of(
                gw,
                domain,
                &id,
                headers,
                &body(&format!("{tag} topic {t}"), user.clone()),
            )
        })
        .collect()
}

fn user_field_pins_each_user_to_one_host(driver: &str) {
    let (_hosts, gw) = fleet(driver);
    let mut homes = HashSet::new();
    for u in 0..12 {
        let name = format!("end-user-{u}");
        let used = hosts_of(&gw, "user", &name, json!(name), &[]);
        assert_eq!(used.len(), 1, "{name}'s requests spread over {used:?}");
        homes.extend(used);
    }
    // Twelve users all on one of four hosts by chance: 4^-11.
    assert!(homes.len() >= 2, "every user on one host: {homes:?}");

    // The header still wins over the field: one session, many users, one host.
    let used: HashSet<String> = (0..6)
        .map(|u| {
            host_of(
                &gw,
                "user",
                &format!("session-{u}"),
                &[("X-Session-Id", "session-7")],
                &body(&format!("session topic {u}"), json!(format!("someone-{u}"))),
            )
        })
        .collect();
    assert_eq!(used.len(), 1, "one session spread over {used:?}");

    // A `user` that is no string, or empty, pins nothing: such requests place by prefix.
    for (tag, user) in [
        ("null", json!(null)),
        ("number", json!(42)),
        ("empty", json!("")),
        ("object", json!({"id": "x"})),
    ] {
        let used = hosts_of(&gw, "user", tag, user, &[]);
        // Eight prompts all on one of four hosts by chance: 4^-7.
        assert!(used.len() >= 2, "{tag}: eight prefixes on one host");
    }
}

fn without_user_stickiness_the_field_is_ignored(driver: &str) {
    let (_hosts, gw) = fleet(driver);
    // The default (`header`) and `none` place by prefix whatever the user.
    for domain in ["header", "none"] {
        let used = hosts_of(&gw, domain, "same-user", json!("one-user"), &[]);
        assert!(used.len() >= 2, "{domain}: the user field pinned {used:?}");
    }
    // The header pins under the default…
    let used = hosts_of(
        &gw,
        "header",
        "sess",
        json!(null),
        &[("X-Session-Id", "s-1")],
    );
    assert_eq!(used.len(), 1, "header: one session spread over {used:?}");
    // … and not under `none`.
    let used = hosts_of(&gw, "none", "sess", json!(null), &[("X-Session-Id", "s-1")]);
    assert!(used.len() >= 2, "none: the session header pinned {used:?}");
}

for_each_driver!(
    user_field_pins_each_user_to_one_host,
    without_user_stickiness_the_field_is_ignored,
);
