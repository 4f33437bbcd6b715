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

    /// Freezes the server (SIGSTOP to it and its backends) until the guard is dropped: it
    /// hangs as a server on a dead disk does, its sockets still accepting and acknowledging.
    pub fn freeze(&self) -> Frozen {
        let postmaster = self.pid().expect("PostgreSQL is not running") as i32;
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": the fields after the command's closing paren.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        for &pid in &pids {
            // SAFETY: kill(2) on the server's own processes.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Frozen(pids)
    }
}

/// A frozen server's processes, continued on drop.
pub struct Frozen(Vec<i32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill(2) on processes this guard stopped.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// A Redis server of its own on 127.0.0.1, without persistence (or, from
/// [`Redis::start_persistent`], with Debian's default: an RDB snapshot, written on a clean
/// shutdown and read back at start).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    persistent: bool,
}

impl Redis {
    /// None (skipped) where Redis is not installed and CI does not require it.
    pub fn start() -> Option<Redis> {
        Self::start_with(false)
    }

    /// Like [`Redis::start`], keeping its data over [`Redis::restart_cleanly`].
    pub fn start_persistent() -> Option<Redis> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Option<Redis> {
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
            persistent,
        };
        r.run();
        Some(r)
    }

    /// Starts the server (again, after [`Redis::stop`]: same port, empty unless persistent).
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "Redis is already running");
        let log = self.dir.join("redis.log");
        let save = if self.persistent { "3600 1" } else { "" };
        let mut child = Command::new("/usr/bin/redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", save, "--appendonly", "no", "--logfile"])
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

    /// Stops the server as its service manager would (SIGTERM: a persistent one writes its
    /// snapshot first) and starts it again: a new `run_id`, the same data when persistent.
    pub fn restart_cleanly(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid, which we have not yet waited for.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        self.run();
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
