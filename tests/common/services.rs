//! Real PostgreSQL and Redis servers for the tests that need them, started on loopback from
//! Debian's packages (`postgresql`, `redis-server`; `.ci/run` installs both), each in a
//! temporary directory of its own and stopped on drop.
//!
//! PostgreSQL is `bench/services.rs`, shared with the benchmarks; this file adds the tests'
//! policy: where a server is not installed the test says it is skipped and returns, unless
//! `CI` or `CUBEGATE_REQUIRE_SERVICES` is set: then a missing server fails the test, so CI
//! never skips them. Any other failure to start fails the test.

#[path = "../../bench/services.rs"]
mod shared;

pub use shared::Postgres;
use shared::{free_port, wait_until_accepting, StartError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Whether a missing server must fail the test rather than skip it.
fn required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("CUBEGATE_REQUIRE_SERVICES").is_some()
}

/// Skips (None, with a line saying so) or fails when `what` is not installed.
fn missing<T>(what: &str, install: &str) -> Option<T> {
    assert!(
        !required(),
        "{what} is not installed and CI needs it: apt-get install {install}"
    );
    eprintln!("SKIPPED: {what} is not installed (apt-get install {install})");
    None
}

impl Postgres {
    /// None (skipped) where PostgreSQL is not installed and CI does not require it.
    pub fn start() -> Option<Postgres> {
        match Postgres::start_in(&std::env::temp_dir()) {
            Ok(pg) => Some(pg),
            Err(StartError::NotInstalled) => missing("PostgreSQL", "postgresql"),
            Err(StartError::Failed(why)) => panic!("{why}"),
        }
    }

    /// Starts the server again after [`Postgres::stop`] (same data, same port).
    pub fn run(&mut self) {
        self.restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Creates an empty database and returns its connection string.
    pub fn database(&self, db: &str) -> String {
        self.create_database(db).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A Redis server of its own on 127.0.0.1, without persistence.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// None (skipped) where Redis is not installed and CI does not require it.
    pub fn start() -> Option<Redis> {
        let bin = Path::new("/usr/bin/redis-server");
        if !bin.exists() {
            return missing("Redis", "redis-server");
        }
        let port = free_port().unwrap();
        let dir =
            std::env::temp_dir().join(format!("cubegate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            port,
            dir,
            child: None,
        };
        r.run();
        Some(r)
    }

    /// Starts the server (again, after [`Redis::stop`]: same port, empty).
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "Redis is already running");
        let log = self.dir.join("redis.log");
        let mut child = Command::new("/usr/bin/redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--logfile"])
            .arg(&log)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        if let Err(e) = wait_until_accepting(addr, &mut child, "Redis", &log) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{e}");
        }
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
