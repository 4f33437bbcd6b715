//! A throwaway PostgreSQL server on loopback, for what needs a real database: the tests
//! (`tests/common/services.rs` includes this file) and the benchmarks of several boxes on
//! one store (`cubegate-bench propagation`, `compare`'s `cubegate-pg`). One copy of how a
//! cluster is made, started and stopped, compiled into both.
//!
//! The cluster is Debian's `postgresql` package (the newest under /usr/lib/postgresql) run
//! from a directory of its own: initdb with local logins trusted for user `cubegate`,
//! `fsync` off, listening on 127.0.0.1 only; stopped and its directory removed on drop.
//! PostgreSQL refuses to run as root, so as root it runs as the package's `postgres` user
//! (the child's uid and gid are set before exec). It is asked to shut down when the thread
//! that started it dies (`PR_SET_PDEATHSIG`), so a killed test or bench leaves no server
//! behind. Failures are returned, not panicked: the caller decides whether a missing server
//! skips a test, fails it, or is a line in a benchmark's report.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after it is started.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// Why a server is not running.
#[derive(Debug)]
pub enum StartError {
    /// Its package is not installed.
    NotInstalled,
    Failed(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::NotInstalled => f.write_str("not installed"),
            StartError::Failed(why) => f.write_str(why),
        }
    }
}

/// A free loopback port (bound and released: another process could take it meanwhile,
/// which only makes the server fail to start, loudly).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// Waits until `addr` accepts connections; Err (with the server's `log`) when `child`
/// exits first or [`START_LIMIT`] passes.
pub fn wait_until_accepting(
    addr: SocketAddr,
    child: &mut Child,
    what: &str,
    log: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + START_LIMIT;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited ({status}) before accepting connections:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{what} did not accept connections on {addr} within {START_LIMIT:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    ))
}

/// The uid and gid to run PostgreSQL as: ours unless we are root.
fn unprivileged() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    // SAFETY: `name` is a valid C string; getpwnam returns null or a pointer to a static
    // record that stays valid until the next getpw* call, and it is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err("running as root and there is no `postgres` user to run PostgreSQL as".into());
    }
    // SAFETY: checked non-null above.
    let pw = unsafe { &*pw };
    Ok(Some((pw.pw_uid, pw.pw_gid)))
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", path.display())),
        None => Ok(()),
    }
}

/// A PostgreSQL cluster of its own on 127.0.0.1, trusting local connections (user
/// `cubegate`), with `fsync` off (thrown away afterwards).
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    owner: Option<(u32, u32)>,
    pub port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// Makes a cluster in a new directory under `parent` and starts it.
    pub fn start_in(parent: &Path) -> Result<Postgres, StartError> {
        let bin = Self::find_bin().ok_or(StartError::NotInstalled)?;
        let failed = StartError::Failed;
        let owner = unprivileged().map_err(failed)?;
        let dir = parent.join(format!(
            "cubegate-pg-{}-{}",
            std::process::id(),
            free_port().map_err(failed)?
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("cannot make {}: {e}", dir.display())))?;
        // From here on, dropping `pg` removes the directory.
        let mut pg = Postgres {
            bin,
            dir,
            owner,
            port: free_port().map_err(failed)?,
            child: None,
        };
        chown(&pg.dir, owner).map_err(failed)?;
        let out = Self::as_owner(Command::new(pg.bin.join("initdb")), owner)
            .args([
                "-U",
                "cubegate",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(pg.dir.join("data"))
            .output()
            .map_err(|e| failed(format!("cannot run initdb: {e}")))?;
        if !out.status.success() {
            return Err(failed(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        pg.restart().map_err(failed)?;
        Ok(pg)
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

    /// Starts the server (again, after [`Postgres::stop`]: same data, same port) and waits
    /// until it takes a login.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Err("PostgreSQL is already running".into());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open {}: {e}", self.log_path().display()))?;
        chown(&self.log_path(), self.owner)?;
        let mut cmd = Self::as_owner(Command::new(self.bin.join("postgres")), self.owner);
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. It runs after the uid change (which would
        // clear it): SIGINT is PostgreSQL's fast shutdown.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        if let Err(e) = wait_until_accepting(addr, &mut child, "PostgreSQL", &self.log_path()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        self.child = Some(child);
        // Accepting TCP comes a moment before accepting logins: wait for a real one.
        let deadline = Instant::now() + START_LIMIT;
        loop {
            match postgres::Client::connect(&self.url("postgres"), postgres::NoTls) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("PostgreSQL never took a login: {e}"))
                }
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

    /// The server's process id while it runs (the tests freeze it by pid).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A connection string for database `db` as the trusted user.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://cubegate@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database and returns its connection string.
    pub fn create_database(&self, db: &str) -> Result<String, String> {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .map_err(|e| format!("connect to PostgreSQL: {e}"))?;
        c.batch_execute(&format!("CREATE DATABASE {db}"))
            .map_err(|e| format!("create database {db}: {e}"))?;
        Ok(self.url(db))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
