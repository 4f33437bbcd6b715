//! The boxes of a propagation run: `cubegate serve` processes on one PostgreSQL database,
//! each with one domain served by the simulator and `auth.mode = "jwt"`, and what the bench
//! asks their management API (log in, make a user, set or remove a membership, read
//! `/metrics`). Every box is a `compare::systems::Proc`: its own process group, stopped on
//! drop and by the signal watcher.

use super::client::{request, Answer, Client};
use crate::compare::systems::{free_port, Proc, ADMIN_PASSWORD, FAST_DOMAIN, MODEL};
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const ADMIN_EMAIL: &str = "admin@example.com";
pub const USER_EMAIL: &str = "bench-user@example.com";
pub const USER_PASSWORD: &str = "a long bench passphrase for propagation 7";
/// How long the boxes, started together, may take to serve.
const START_LIMIT: Duration = Duration::from_secs(90);

/// One running box.
pub struct GatewayBox {
    pub proc: Proc,
    /// The public port: data plane, and the management API forwarded.
    pub proxy: SocketAddr,
    /// The management listener (for `/metrics`), from the log line that names it.
    pub management: Option<SocketAddr>,
}

/// What every box is started with.
pub struct Setup<'a> {
    pub bin: &'a Path,
    pub dir: &'a Path,
    pub sim: SocketAddr,
    pub postgres_url: &'a str,
    /// 64 hex digits, sealing the signing keys in the database.
    pub key_encryption_key: &'a str,
}

fn config(setup: &Setup, i: usize, port: u16) -> String {
    // A long access-token life: a run of many slow changes must not outlive the admin's.
    format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = 1\ndriver = \"auto\"\n\n\
         [management]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         admin_email = \"{ADMIN_EMAIL}\"\nadmin_password_env = \"CUBEGATE_ADMIN_PASSWORD\"\n\
         store = \"postgres\"\naccess_token_ttl_s = 86400\n\n\
         [auth]\nmode = \"jwt\"\n\n\
         [[domains]]\nid = \"{FAST_DOMAIN}\"\nname = \"bench\"\n[[domains.backends]]\n\
         kind = \"vllm\"\nurl = \"http://{}\"\nmodels = [\"{MODEL}\"]\n",
        setup.dir.join(format!("box-{i}")).display(),
        setup.sim
    )
}

/// Starts `n` boxes together (the first to reach the database migrates it and makes the
/// admin and the first key) and waits until each answers `/health`.
pub fn start(setup: &Setup, n: usize) -> Result<Vec<GatewayBox>, String> {
    let mut boxes = Vec::with_capacity(n);
    for i in 0..n {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let cfg = setup.dir.join(format!("box-{i}.toml"));
        std::fs::write(&cfg, config(setup, i, port))
            .map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
        let mut cmd = Command::new(setup.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg)
            .env("CUBEGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("CUBEGATE_POSTGRES_URL", setup.postgres_url)
            .env("CUBEGATE_KEY_ENCRYPTION_KEY", setup.key_encryption_key)
            .env("CUBEGATE_LOG", "info");
        let name = format!("box-{i}");
        let log = setup.dir.join(format!("{name}.log"));
        let proc = Proc::spawn(&name, cmd, &log, None)
            .map_err(|e| format!("cannot start {}: {e}", setup.bin.display()))?;
        boxes.push(GatewayBox {
            proc,
            proxy: ([127, 0, 0, 1], port).into(),
            management: None,
        });
    }
    let deadline = Instant::now() + START_LIMIT;
    for b in &mut boxes {
        let health = request("GET", "/health", None, None);
        loop {
            if let Some(st) = b.proc.exited() {
                return Err(format!(
                    "{} exited ({st}): {}",
                    b.proc.name,
                    b.proc.log_tail(5)
                ));
            }
            if Client::new(b.proxy)
                .send(&health)
                .is_ok_and(|a| a.status == 200)
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not serving after {START_LIMIT:?}: {}",
                    b.proc.name,
                    b.proc.log_tail(5)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        b.management = management_addr(&std::fs::read_to_string(&b.proc.log).unwrap_or_default());
    }
    Ok(boxes)
}

/// `listen=ADDR` of the log line `management API listening`.
fn management_addr(log: &str) -> Option<SocketAddr> {
    let line = log
        .lines()
        .find(|l| l.contains("management API listening"))?;
    let rest = line.split("listen=").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `POST /users/tokens/issue`: the access token.
pub fn login(c: &mut Client, email: &str, password: &str) -> Result<String, String> {
    let body = json!({"username": email, "password": password}).to_string();
    let a = c.send(&request("POST", "/users/tokens/issue", None, Some(&body)))?;
    expect(&a, 201, "login")?;
    a.json()["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("login: no access_token in {}", a.describe()))
}

/// `POST /users`: the new user's id.
pub fn create_user(c: &mut Client, admin: &str) -> Result<String, String> {
    let body = json!({"email": USER_EMAIL, "password": USER_PASSWORD}).to_string();
    let a = c.send(&request("POST", "/users", Some(admin), Some(&body)))?;
    expect(&a, 201, "create the user")?;
    a.json()["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("create the user: no id in {}", a.describe()))
}

/// `PUT /domains/{id}/members/{user}` (member) or its `DELETE`.
pub fn membership_request(admin: &str, user: &str, member: bool) -> Vec<u8> {
    let path = format!("/domains/{FAST_DOMAIN}/members/{user}");
    if member {
        let body = json!({"role": "member"}).to_string();
        request("PUT", &path, Some(admin), Some(&body))
    } else {
        request("DELETE", &path, Some(admin), None)
    }
}

/// What a membership change must answer.
pub fn membership_answered(a: &Answer, member: bool) -> Result<(), String> {
    expect(a, if member { 200 } else { 204 }, "membership change")
}

/// The user's chat request on the domain (one short whole answer).
pub fn chat_request(bearer: &str) -> Vec<u8> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    })
    .to_string();
    let path = format!("/proxy/{FAST_DOMAIN}/v1/chat/completions");
    request("POST", &path, Some(bearer), Some(&body))
}

/// `cubegate_store_changes_applied_total` on a box's management listener.
pub fn changes_applied(b: &GatewayBox) -> Option<u64> {
    let a = Client::new(b.management?)
        .send(&request("GET", "/metrics", None, None))
        .ok()?;
    let text = String::from_utf8_lossy(&a.body);
    text.lines()
        .find_map(|l| l.strip_prefix("cubegate_store_changes_applied_total "))
        .and_then(|v| v.trim().parse().ok())
}

fn expect(a: &Answer, status: u16, what: &str) -> Result<(), String> {
    if a.status == status {
        Ok(())
    } else {
        Err(format!("{what}: expected {status}, got {}", a.describe()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn management_address_from_the_log() {
        let log = "2026-11-30T05:34:58Z  INFO waiting\n\
                   2026-11-30T05:34:58Z  INFO management API listening listen=127.0.0.1:41234 https=false keys=1\n";
        assert_eq!(
            super::management_addr(log),
            Some(([127, 0, 0, 1], 41234).into())
        );
        assert_eq!(super::management_addr("nothing"), None);
    }
}
