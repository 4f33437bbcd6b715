//! The routers the fleet benchmark puts in front of the simulated hosts, each started on
//! 127.0.0.1 with a configuration generated into the run's directory (processes, ports
//! and the program search are `compare`'s):
//!
//! | system | what runs |
//! |---|---|
//! | `cubegate-<policy>` | `cubegate serve`, one domain listing every host, `routing = <policy>`, `auth.mode = "none"` |
//! | `sglang-router` | `python3 -m sglang_router.launch_router --policy cache_aware` (pip `sglang-router`) |
//! | `vllm-router` | `vllm-router --policy cache_aware` (pip `vllm-router`) |
//! | `nginx` | an upstream with `least_conn`, keep-alive, no buffering |
//! | `haproxy` | `balance leastconn`, `option httpchk GET /health` every second |
//!
//! Everything else is each system's default (retries, health checks, timeouts): the
//! benchmark measures them as an operator would first run them.

use crate::compare::systems::{find_program, find_sibling, free_port, version_of, Proc};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MODEL: &str = crate::compare::systems::MODEL;
pub const DOMAIN: &str = "00000000-0000-4000-8000-00000000f1ee";

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Cubegate(&'static str),
    SglangRouter,
    VllmRouter,
    Nginx,
    Haproxy,
}

impl System {
    pub const ALL: [System; 8] = [
        System::Cubegate("auto"),
        System::Cubegate("prefix"),
        System::Cubegate("least_loaded"),
        System::Cubegate("round_robin"),
        System::SglangRouter,
        System::VllmRouter,
        System::Nginx,
        System::Haproxy,
    ];

    pub fn name(self) -> String {
        match self {
            System::Cubegate(p) => format!("cubegate-{}", p.replace('_', "-")),
            System::SglangRouter => "sglang-router".into(),
            System::VllmRouter => "vllm-router".into(),
            System::Nginx => "nginx".into(),
            System::Haproxy => "haproxy".into(),
        }
    }

    pub fn label(self) -> String {
        match self {
            System::Cubegate(p) => format!("cubegate, routing = \"{p}\""),
            System::SglangRouter => "sglang-router, --policy cache_aware".into(),
            System::VllmRouter => "vllm-router, --policy cache_aware".into(),
            System::Nginx => "nginx, least_conn".into(),
            System::Haproxy => "HAProxy, balance leastconn".into(),
        }
    }

    pub fn parse(s: &str) -> Option<System> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        let s = if s == "cubegate" { "cubegate-auto" } else { &s };
        System::ALL.into_iter().find(|x| x.name() == s)
    }

    /// A peer router (not one of cubegate's policies).
    pub fn is_peer(self) -> bool {
        !matches!(self, System::Cubegate(_))
    }
}

/// What every system is started with.
pub struct Env {
    pub dir: PathBuf,
    pub cubegate_bin: Option<PathBuf>,
    /// cubegate's `workers`.
    pub workers: usize,
}

/// A system ready for load.
pub struct Running {
    pub proc: Proc,
    /// Where chat completions go.
    pub url: String,
    pub version: String,
    /// cubegate's management listener (its `/metrics`).
    pub metrics: Option<SocketAddr>,
}

fn port() -> Result<u16, String> {
    free_port().map_err(|e| format!("no free port: {e}"))
}

fn write(dir: &Path, file: &str, text: &str) -> Result<PathBuf, String> {
    let p = dir.join(file);
    std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    Ok(p)
}

fn spawn(env: &Env, name: &str, cmd: Command) -> Result<Proc, String> {
    Proc::spawn(name, cmd, &env.dir.join(format!("{name}.log")), None)
        .map_err(|e| format!("cannot start {name}: {e}"))
}

/// Starts `sys` in front of `hosts` (not yet probed). Err = the reason it cannot run.
pub fn start(sys: System, env: &Env, hosts: &[SocketAddr]) -> Result<Running, String> {
    match sys {
        System::Cubegate(policy) => start_cubegate(env, policy, hosts),
        System::SglangRouter => start_sglang(env, hosts),
        System::VllmRouter => start_vllm_router(env, hosts),
        System::Nginx => start_nginx(env, hosts),
        System::Haproxy => start_haproxy(env, hosts),
    }
}

/// How long `sys` may take to answer its first request after starting.
pub fn start_limit(sys: System) -> std::time::Duration {
    std::time::Duration::from_secs(if sys.is_peer() { 60 } else { 20 })
}

/// Why `sys` cannot run here, checked without starting it.
pub fn missing(sys: System, env: &Env) -> Option<String> {
    let python_module = |module: &str, pip: &str| {
        let Some(py) = find_program("python3") else {
            return Some(format!("not installed: no python3 (pip install {pip})"));
        };
        let ok = Command::new(py)
            .args(["-c", &format!("import {module}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!ok).then(|| format!("not installed (pip install {pip})"))
    };
    match sys {
        System::Cubegate(_) => env
            .cubegate_bin
            .is_none()
            .then(|| "not built (cargo build --release)".to_string()),
        System::SglangRouter => python_module("sglang_router", "sglang-router"),
        System::VllmRouter => find_program("vllm-router")
            .is_none()
            .then(|| "not installed (pip install vllm-router)".to_string()),
        System::Nginx => find_program("nginx")
            .is_none()
            .then(|| "not installed (bench/setup)".to_string()),
        System::Haproxy => find_program("haproxy")
            .is_none()
            .then(|| "not installed (bench/setup)".to_string()),
    }
}

/// The cubegate binary: next to this one, or the target directory's.
pub fn cubegate_binary() -> Option<PathBuf> {
    find_sibling("cubegate")
}

pub fn cubegate_config(
    env: &Env,
    (port, management): (u16, u16),
    policy: &str,
    hosts: &[SocketAddr],
) -> String {
    let mut s = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = {}\n\n\
         [management]\nlisten = \"127.0.0.1:{management}\"\ndata_dir = \"{}\"\n\
         admin_email = \"admin@example.com\"\nadmin_password_env = \"CUBEGATE_ADMIN_PASSWORD\"\n\n\
         [auth]\nmode = \"none\"\n\n[[domains]]\nid = \"{DOMAIN}\"\nname = \"fleet\"\n\
         routing = \"{policy}\"\n",
        env.workers,
        env.dir.join("cubegate-data").display()
    );
    for h in hosts {
        let _ = write!(
            s,
            "[[domains.backends]]\nkind = \"vllm\"\nurl = \"http://{h}\"\nmodels = [\"{MODEL}\"]\n"
        );
    }
    s
}

fn start_cubegate(env: &Env, policy: &str, hosts: &[SocketAddr]) -> Result<Running, String> {
    let bin = env
        .cubegate_bin
        .clone()
        .ok_or("not built (cargo build --release)")?;
    let (port, management) = (port()?, port()?);
    let cfg = write(
        &env.dir,
        "cubegate.toml",
        &cubegate_config(env, (port, management), policy, hosts),
    )?;
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env(
            "CUBEGATE_ADMIN_PASSWORD",
            crate::compare::systems::ADMIN_PASSWORD,
        )
        .env("CUBEGATE_LOG", "info");
    Ok(Running {
        proc: spawn(env, "cubegate", cmd)?,
        url: format!("http://127.0.0.1:{port}/proxy/{DOMAIN}/v1/chat/completions"),
        version: version_of(&bin, &["--version"]),
        metrics: Some(([127, 0, 0, 1], management).into()),
    })
}

fn urls(hosts: &[SocketAddr]) -> Vec<String> {
    hosts.iter().map(|h| format!("http://{h}")).collect()
}

fn start_sglang(env: &Env, hosts: &[SocketAddr]) -> Result<Running, String> {
    let py = find_program("python3").ok_or("not installed: no python3")?;
    let (port, metrics) = (port()?, port()?);
    let mut cmd = Command::new(&py);
    cmd.args(["-m", "sglang_router.launch_router", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .args(["--prometheus-host", "127.0.0.1"])
        .args(["--prometheus-port", &metrics.to_string()])
        .args(["--policy", "cache_aware", "--log-level", "warn"])
        .arg("--worker-urls")
        .args(urls(hosts));
    let version = version_of(
        &py,
        &[
            "-c",
            "import importlib.metadata as m; print('sglang-router', m.version('sglang-router'))",
        ],
    );
    Ok(Running {
        proc: spawn(env, "sglang-router", cmd)?,
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        version,
        metrics: None,
    })
}

fn start_vllm_router(env: &Env, hosts: &[SocketAddr]) -> Result<Running, String> {
    let bin = find_program("vllm-router").ok_or("not installed (pip install vllm-router)")?;
    let (port, metrics) = (port()?, port()?);
    let mut cmd = Command::new(&bin);
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--prometheus-host", "127.0.0.1"])
        .args(["--prometheus-port", &metrics.to_string()])
        .args(["--policy", "cache_aware", "--log-level", "warning"])
        .arg("--worker-urls")
        .args(urls(hosts));
    let version = find_program("python3").map_or("unknown".into(), |py| {
        version_of(
            &py,
            &[
                "-c",
                "import importlib.metadata as m; print('vllm-router', m.version('vllm-router'))",
            ],
        )
    });
    Ok(Running {
        proc: spawn(env, "vllm-router", cmd)?,
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        version,
        metrics: None,
    })
}

pub fn nginx_config(dir: &Path, port: u16, hosts: &[SocketAddr]) -> String {
    let d = dir.display();
    let mut s = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
         \x20 client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
         \x20 fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n\
         \x20 scgi_temp_path {d}/nginx-scgi;\n  client_max_body_size 16m;\n\
         \x20 client_body_buffer_size 1m;\n  upstream fleet {{\n    least_conn;\n"
    );
    for h in hosts {
        let _ = writeln!(s, "    server {h};");
    }
    let _ = write!(
        s,
        "    keepalive 256;\n  }}\n  server {{\n    listen 127.0.0.1:{port};\n\
         \x20   location / {{\n      proxy_pass http://fleet;\n      proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
         \x20     proxy_read_timeout 120s;\n    }}\n  }}\n}}\n"
    );
    s
}

fn start_nginx(env: &Env, hosts: &[SocketAddr]) -> Result<Running, String> {
    let bin = find_program("nginx").ok_or("not installed (bench/setup)")?;
    let port = port()?;
    let cfg = write(&env.dir, "nginx.conf", &nginx_config(&env.dir, port, hosts))?;
    let cmd = crate::compare::systems::nginx_command(&bin, &env.dir, &cfg);
    Ok(Running {
        proc: spawn(env, "nginx", cmd)?,
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        version: version_of(&bin, &["-v"]),
        metrics: None,
    })
}

pub fn haproxy_config(port: u16, hosts: &[SocketAddr]) -> String {
    let mut s = format!(
        "global\n  maxconn 8192\n  nbthread 1\n\ndefaults\n  mode http\n  timeout connect 5s\n\
         \x20 timeout client 120s\n  timeout server 120s\n  option http-no-delay\n\n\
         frontend fleet\n  bind 127.0.0.1:{port}\n  default_backend hosts\n\n\
         backend hosts\n  balance leastconn\n  http-reuse always\n\
         \x20 option httpchk GET /health\n"
    );
    for (i, h) in hosts.iter().enumerate() {
        let _ = writeln!(s, "  server h{i} {h} check inter 1s");
    }
    s
}

fn start_haproxy(env: &Env, hosts: &[SocketAddr]) -> Result<Running, String> {
    let bin = find_program("haproxy").ok_or("not installed (bench/setup)")?;
    let port = port()?;
    let cfg = write(&env.dir, "haproxy.cfg", &haproxy_config(port, hosts))?;
    crate::compare::systems::haproxy_check(&bin, &cfg)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-db").arg("-f").arg(&cfg);
    Ok(Running {
        proc: spawn(env, "haproxy", cmd)?,
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        version: version_of(&bin, &["-v"]),
        metrics: None,
    })
}
