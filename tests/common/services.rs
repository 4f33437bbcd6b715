//! Real PostgreSQL and Redis servers for the tests that need them, started on loopback from
//! Debian's packages (`postgresql`, `redis-server`; `.ci/run` installs both), each in a
//! temporary directory of its own and stopped on drop.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the cluster is made and
//! run as the package's `postgres` user (the child's uid and gid are set before exec).
//! Where a server is not installed the test says it is skipped and returns, unless
//! `CI` or `CUBEGATE_REQUIRE_SERVICES` is set: then a missing server fails the test, so CI
//! never skips them.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after it is started.
const START_LIMIT: Duration = Duration::from_secs(30);

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

/// A free loopback port (bound and released: another process could take it meanwhile,
/// which only makes the server fail to start, loudly).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_until_accepting(addr: SocketAddr, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + START_LIMIT;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before accepting connections:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not accept connections on {addr} within {START_LIMIT:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The uid and gid to run PostgreSQL as: ours unless we are root.
fn unprivileged() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: `name` is a valid C string; getpwnam returns null or a pointer to a static
    // record that stays valid until the next getpw* call, and it is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root and there is no `postgres` user to run PostgreSQL as"
    );
    // SAFETY: checked non-null above.
    let pw = unsafe { &*pw };
    Some((pw.pw_uid, pw.pw_gid))
}

fn chown(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown the data directory");
    }
}

/// A PostgreSQL cluster of its own on 127.0.0.1, trusting local connections (user
/// `cubegate`), with `fsync` off (a test cluster, thrown away).
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    owner: Option<(u32, u32)>,
    pub port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// None (skipped) where PostgreSQL is not installed and CI does not require it.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = Self::find_bin() else {
            return missing("PostgreSQL", "postgresql");
        };
        let owner = unprivileged();
        let dir = std::env::temp_dir().join(format!(
            "cubegate-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        chown(&dir, owner);
        let data = dir.join("data");
        let out = Self::as_owner(Command::new(bin.join("initdb")), owner)
            .args([
                "-U",
                "cubegate",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            bin,
            dir,
            owner,
            port: free_port(),
            child: None,
        };
        pg.run();
        Some(pg)
    }

    fn find_bin() -> Option<PathBuf> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
            .collect();
        versions.sort();
        versions.pop()
    }

    fn as_owner(mut cmd: Command, owner: Option<(u32, u32)>) -> Command {
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir("/");
        cmd
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Starts the server (again, after [`Postgres::stop`]: same data, same port).
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "PostgreSQL is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        chown(&self.log_path(), self.owner);
        let mut child = Self::as_owner(Command::new(self.bin.join("postgres")), self.owner)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        wait_until_accepting(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            &mut child,
            "PostgreSQL",
            &self.log_path(),
        );
        self.child = Some(child);
        // Accepting TCP comes a moment before accepting logins: wait for a real one.
        let deadline = Instant::now() + START_LIMIT;
        loop {
            match postgres::Client::connect(&self.url("postgres"), postgres::NoTls) {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => panic!("PostgreSQL never took a login: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid, which we have not yet waited for.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP to it and its backends) until the guard is dropped: it
    /// hangs as a server on a dead disk does, its sockets still accepting and acknowledging.
    pub fn freeze(&self) -> Frozen {
        let Some(child) = &self.child else {
            panic!("PostgreSQL is not running");
        };
        let postmaster = child.id() as i32;
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

    /// A connection string for database `db` as the trusted user.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://cubegate@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database and returns its connection string.
    pub fn database(&self, db: &str) -> String {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("connect to PostgreSQL");
        c.batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("create the database");
        self.url(db)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
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

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
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
        let port = free_port();
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
        wait_until_accepting(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            &mut child,
            "Redis",
            &log,
        );
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
