//! The systems compare measures, how each is configured and started, and the guard that
//! stops every process compare started: on drop (so also on an error or a panic), and
//! from a signal watcher on Ctrl-C / SIGTERM. Each child runs in its own process group
//! (nginx's workers are killed with their master) with `PR_SET_PDEATHSIG`, listens on
//! 127.0.0.1 only, and gets a config generated into compare's temporary directory.
//!
//! Every proxy is given the same share of the machine: `workers` workers/threads/processes
//! pinned to the same CPUs (`proxy_cpus`), while the load generator and the simulator run
//! on the others. Every proxy exposes the same two routes, one per simulator:
//! `/proxy/{FAST_DOMAIN}/v1/...` (whole answers) and `/proxy/{STREAM_DOMAIN}/v1/...`
//! (streamed answers), except HAProxy in TCP mode, which cannot see paths and listens on
//! one port per simulator instead.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
pub const FAST_DOMAIN: &str = "00000000-0000-4000-8000-0000000000fa";
pub const STREAM_DOMAIN: &str = "00000000-0000-4000-8000-0000000000f5";
pub const ISSUER: &str = "cubegate-bench";
pub const ADMIN_PASSWORD: &str = "bench passphrase long enough";

/// The systems, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Cubegate,
    /// cubegate with its management store on PostgreSQL (several boxes' setup).
    CubegatePg,
    Nginx,
    HaproxyJwt,
    HaproxyTcp,
    Litellm,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Direct,
        Kind::Cubegate,
        Kind::CubegatePg,
        Kind::Nginx,
        Kind::HaproxyJwt,
        Kind::HaproxyTcp,
        Kind::Litellm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Cubegate => "cubegate",
            Kind::CubegatePg => "cubegate-pg",
            Kind::Nginx => "nginx",
            Kind::HaproxyJwt => "haproxy-jwt",
            Kind::HaproxyTcp => "haproxy-tcp",
            Kind::Litellm => "litellm",
        }
    }

    /// What the row stands for, for the table.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct to the simulator (floor)",
            Kind::Cubegate => "cubegate, JWT HS256",
            Kind::CubegatePg => "cubegate, JWT HS256, store on PostgreSQL",
            Kind::Nginx => "nginx reverse proxy, no auth",
            Kind::HaproxyJwt => "HAProxy http, jwt_verify HS256",
            Kind::HaproxyTcp => "HAProxy tcp mode",
            Kind::Litellm => "LiteLLM proxy",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        let s = s.trim().to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .or(match s.as_str() {
                "haproxy" => Some(Kind::HaproxyJwt),
                "sim" | "simulator" => Some(Kind::Direct),
                _ => None,
            })
    }
}

/// Process groups started and not yet stopped, for the signal watcher.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<i32>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT / SIGTERM / SIGHUP: kill every process group compare started, then exit.
pub fn install_signal_watcher() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("compare-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let groups: Vec<i32> = live().clone();
                    for g in &groups {
                        // SAFETY: kill(2) on process groups compare created.
                        unsafe { libc::kill(-g, libc::SIGTERM) };
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    for g in &groups {
                        // SAFETY: as above.
                        unsafe { libc::kill(-g, libc::SIGKILL) };
                    }
                    eprintln!("cubegate-bench compare: interrupted; stopped what it started");
                    std::process::exit(128 + sig);
                }
            });
    });
}

/// A child process (and its process group), stopped when dropped.
pub struct Proc {
    pub name: String,
    pub pid: i32,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr into `log`, in its own process group, pinned to
    /// `cpus` when given, and killed when compare dies.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        cpus: Option<&[usize]>,
    ) -> io::Result<Proc> {
        let out = fs::File::create(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // Built before fork: the closure below must only make system calls.
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let pin = match cpus {
            Some(c) if !c.is_empty() => {
                for &i in c {
                    // SAFETY: `set` is a valid cpu_set_t; CPU_SET bounds-checks `i`.
                    unsafe { libc::CPU_SET(i, &mut set) };
                }
                true
            }
            _ => false,
        };
        // SAFETY: setpgid, prctl and sched_setaffinity are async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if pin {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        live().push(pid);
        Ok(Proc {
            name: name.to_string(),
            pid,
            child,
            log: log.to_path_buf(),
        })
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of the process's log that say something: terminal colours and
    /// blank or banner lines (LiteLLM prints both) left out.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<String> = text
            .lines()
            .map(plain_text)
            .filter(|l| l.chars().any(char::is_alphanumeric))
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL to the group at once, and reaped: a crash, not a shutdown.
    pub fn kill(&mut self) {
        // SAFETY: kill(2) on the process group this Proc created.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        live().retain(|g| *g != self.pid);
    }

    /// SIGTERM to the group, up to 3 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on the process group this Proc created.
            unsafe { libc::kill(-self.pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever is left of the group (nginx workers, a stuck child).
        // SAFETY: as above; ESRCH when the group is gone is fine.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        live().retain(|g| *g != self.pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A log line without terminal escape sequences (`ESC [ … letter`), trimmed.
fn plain_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: parameters and intermediates up to a final byte in '@'..='~'.
            if chars.next() == Some('[') {
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out.trim().to_string()
}

/// A temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p =
            std::env::temp_dir().join(format!("cubegate-compare-{}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A free port on 127.0.0.1 (bound and released; the system starts on it right after).
pub fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `name` on PATH or in the usual sbin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A binary of this workspace: next to the running executable, or in the target
/// directory's `release/` (preferred) or `debug/` (from a test binary in `deps/`).
pub fn find_sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut cands = vec![dir.join(name)];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(profile) = dir.parent() {
            if let Some(target) = profile.parent() {
                cands.insert(0, target.join("release").join(name));
            }
            cands.push(profile.join(name));
        }
    }
    cands.into_iter().find(|p| is_executable(p))
}

/// First line of a command's output (stdout, else stderr), bounded in time.
pub fn version_of(program: &Path, args: &[&str]) -> String {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(child) = child else {
        return "unknown".into();
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(out)) => {
            let text = if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
                out.stdout
            } else {
                out.stderr
            };
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("unknown")
                .to_string()
        }
        _ => {
            // SAFETY: the child this function started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            "unknown".into()
        }
    }
}

/// Where load goes for one kind of request.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    pub model: String,
    /// The certificate to trust for an https:// URL.
    pub cacert: Option<PathBuf>,
}

/// The certificate the proxies serve with `--tls`.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
}

impl TlsFiles {
    pub fn create(dir: &Path) -> Result<TlsFiles, String> {
        let (cert, key) = cubegate::gen_cert(&cubegate::GenCert {
            out_dir: dir.join("tls"),
            names: vec!["127.0.0.1".into(), "localhost".into()],
            days: 2,
            force: true,
        })?;
        let combined = dir.join("tls").join("combined.pem");
        let text = fs::read_to_string(&cert).map_err(|e| e.to_string())?
            + &fs::read_to_string(&key).map_err(|e| e.to_string())?;
        fs::write(&combined, text).map_err(|e| e.to_string())?;
        Ok(TlsFiles {
            cert,
            key,
            combined,
        })
    }
}

/// What every system is set up with.
pub struct Env {
    pub dir: PathBuf,
    /// `--tls`: the proxies' certificate.
    pub tls: Option<TlsFiles>,
    /// Simulator answering whole answers quickly.
    pub fast: SocketAddr,
    /// Simulator streaming with a delay between tokens.
    pub stream: SocketAddr,
    pub secret: String,
    pub token: String,
    pub workers: usize,
    pub proxy_cpus: Option<Vec<usize>>,
    pub cubegate_bin: Option<PathBuf>,
    /// The database `cubegate-pg` runs on, or why there is none.
    pub shared_store: Result<SharedStore, String>,
}

/// A throwaway PostgreSQL database for `cubegate-pg`, and the key its signing keys are
/// sealed with (fixed for the run: every round's start unseals what the first sealed).
pub struct SharedStore {
    pub url: String,
    /// 64 hex digits.
    pub key_encryption_key: String,
}

/// A system ready for load.
pub struct Running {
    /// None for direct (nothing between the load and the simulator).
    pub proc: Option<Proc>,
    pub fast: Endpoint,
    pub stream: Endpoint,
    pub bearer: Option<String>,
    pub version: String,
    /// E.g. cubegate's runtime driver.
    pub notes: Vec<String>,
}

/// Sends one real request through an endpoint (with the bearer token, if any); Ok when
/// it is answered with a 2xx.
pub type Probe<'a> = &'a dyn Fn(&Endpoint, Option<&str>) -> Result<(), String>;

/// Why a system is not measured.
#[derive(Debug, Clone)]
pub enum NotRun {
    Skipped(String),
    Failed(String),
}

fn proxy_urls(env: &Env, port: u16) -> (Endpoint, Endpoint) {
    let ep = |d: &str| proxy_endpoint(env, port, &format!("/proxy/{d}/v1/chat/completions"));
    (ep(FAST_DOMAIN), ep(STREAM_DOMAIN))
}

/// A proxy's endpoint: https with the bench certificate under `--tls`.
fn proxy_endpoint(env: &Env, port: u16, path: &str) -> Endpoint {
    let scheme = if env.tls.is_some() { "https" } else { "http" };
    Endpoint {
        url: format!("{scheme}://127.0.0.1:{port}{path}"),
        model: MODEL.into(),
        cacert: env.tls.as_ref().map(|t| t.cert.clone()),
    }
}

/// Starts `kind` and waits until it answers; `probe` sends one real request through an
/// endpoint (with the bearer token) and says whether it got a 2xx.
pub fn start(kind: Kind, env: &Env, probe: Probe) -> Result<Running, NotRun> {
    let running = match kind {
        Kind::Direct => {
            let ep = |a: SocketAddr| Endpoint {
                url: format!("http://{a}/v1/chat/completions"),
                model: MODEL.into(),
                cacert: None,
            };
            Running {
                proc: None,
                fast: ep(env.fast),
                stream: ep(env.stream),
                bearer: None,
                version: "cubegate-bench backend --flavor vllm".into(),
                notes: Vec::new(),
            }
        }
        Kind::Cubegate => start_cubegate(env, None)?,
        Kind::CubegatePg => match &env.shared_store {
            Ok(store) => start_cubegate(env, Some(store))?,
            Err(why) => return Err(NotRun::Skipped(why.clone())),
        },
        Kind::Nginx => start_nginx(env)?,
        Kind::HaproxyJwt => start_haproxy(env, true)?,
        Kind::HaproxyTcp => start_haproxy(env, false)?,
        Kind::Litellm => super::litellm::start(env)?,
    };
    let limit = if kind == Kind::Litellm {
        super::litellm::START_LIMIT
    } else {
        Duration::from_secs(20)
    };
    wait_ready(running, probe, limit)
}

fn wait_ready(mut r: Running, probe: Probe, limit: Duration) -> Result<Running, NotRun> {
    let deadline = Instant::now() + limit;
    let mut last;
    loop {
        if let Some(p) = r.proc.as_mut() {
            if let Some(st) = p.exited() {
                return Err(NotRun::Failed(format!(
                    "{} exited ({st}) while starting: {}",
                    p.name,
                    p.log_tail(5).replace('\n', " | ")
                )));
            }
        }
        let up = |e: &Endpoint| {
            let addr = super::load_addr(&e.url)?;
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .map(drop)
                .map_err(|e| format!("connect: {e}"))
        };
        let res = up(&r.fast)
            .and_then(|_| probe(&r.fast, r.bearer.as_deref()))
            .and_then(|_| probe(&r.stream, r.bearer.as_deref()));
        match res {
            Ok(()) => return Ok(r),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            let tail = r
                .proc
                .as_ref()
                .map(|p| p.log_tail(5).replace('\n', " | "))
                .filter(|t| !t.is_empty())
                .map(|t| format!("; its log ends: {t}"))
                .unwrap_or_default();
            return Err(NotRun::Failed(format!(
                "not ready after {} s ({last}){tail}",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn spawn(env: &Env, name: &str, cmd: Command) -> Result<Proc, NotRun> {
    Proc::spawn(
        name,
        cmd,
        &env.dir.join(format!("{name}.log")),
        env.proxy_cpus.as_deref(),
    )
    .map_err(|e| NotRun::Failed(format!("cannot start {name}: {e}")))
}

pub(super) fn write(env: &Env, file: &str, text: &str) -> Result<PathBuf, NotRun> {
    let p = env.dir.join(file);
    fs::write(&p, text)
        .map_err(|e| NotRun::Failed(format!("cannot write {}: {e}", p.display())))?;
    Ok(p)
}

pub(super) fn port() -> Result<u16, NotRun> {
    free_port().map_err(|e| NotRun::Failed(format!("no free port: {e}")))
}

/// cubegate's config for the bench: JWT auth with one HS256 issuer, one domain per
/// simulator, `workers` workers, no access records (every peer runs without its access
/// log); the management store in `data_dir` (SQLite) or, with
/// `postgres`, on the database named by `CUBEGATE_POSTGRES_URL`.
pub fn cubegate_config(env: &Env, port: u16, data: &Path, postgres: bool) -> String {
    let mut s = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nworkers = {}\ndriver = \"auto\"\naccess_log = false\n{}\n\
         [management]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         admin_email = \"admin@example.com\"\nadmin_password_env = \"CUBEGATE_ADMIN_PASSWORD\"\n{}\n\
         [auth]\nmode = \"jwt\"\n\n[[auth.trusted]]\nissuer = \"{ISSUER}\"\n\
         hs_secret_env = \"CUBEGATE_BENCH_SECRET\"\n",
        env.workers,
        env.tls.as_ref().map_or(String::new(), |t| format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            t.cert.display(),
            t.key.display()
        )),
        data.display(),
        if postgres { "store = \"postgres\"\n" } else { "" }
    );
    for (id, name, addr) in [
        (FAST_DOMAIN, "bench-fast", env.fast),
        (STREAM_DOMAIN, "bench-stream", env.stream),
    ] {
        let _ = write!(
            s,
            "\n[[domains]]\nid = \"{id}\"\nname = \"{name}\"\n[[domains.backends]]\n\
             kind = \"vllm\"\nurl = \"http://{addr}\"\nmodels = [\"{MODEL}\"]\n"
        );
    }
    s
}

/// cubegate, its management store in SQLite, or with `shared` on PostgreSQL (`cubegate-pg`:
/// the same config otherwise, so the two rows differ only by the store).
fn start_cubegate(env: &Env, shared: Option<&SharedStore>) -> Result<Running, NotRun> {
    let Some(bin) = env.cubegate_bin.clone() else {
        return Err(NotRun::Skipped(
            "not built (run `cargo build --release`)".into(),
        ));
    };
    let name = if shared.is_some() {
        "cubegate-pg"
    } else {
        "cubegate"
    };
    let data = env.dir.join(format!("{name}-data"));
    let command = |cfg: &Path| {
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(cfg)
            .env("CUBEGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("CUBEGATE_BENCH_SECRET", &env.secret)
            .env("CUBEGATE_LOG", "info");
        if let Some(store) = shared {
            cmd.env("CUBEGATE_POSTGRES_URL", &store.url)
                .env("CUBEGATE_KEY_ENCRYPTION_KEY", &store.key_encryption_key);
        }
        cmd
    };
    let config = |port| cubegate_config(env, port, &data, shared.is_some());
    // The first start of a store creates the platform admin, hashing its password with
    // argon2 (19 MiB): a one-time cost that would otherwise be the run's peak RSS. Start
    // once to bootstrap the store, stop, then start the instance that is measured.
    if !data.exists() {
        let port = port()?;
        let cfg = write(env, &format!("{name}-bootstrap.toml"), &config(port))?;
        let mut boot = spawn(env, &format!("{name}-bootstrap"), command(&cfg))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if boot.exited().is_some() || Instant::now() >= deadline {
                return Err(NotRun::Failed(format!(
                    "cubegate did not start: {}",
                    boot.log_tail(5).replace('\n', " | ")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        boot.stop();
        // A PostgreSQL store leaves data_dir unmade: mark the bootstrap as done.
        fs::create_dir_all(&data)
            .map_err(|e| NotRun::Failed(format!("cannot make {}: {e}", data.display())))?;
    }
    let port = port()?;
    let cfg = write(env, &format!("{name}.toml"), &config(port))?;
    let proc = spawn(env, name, command(&cfg))?;
    let (fast, stream) = proxy_urls(env, port);
    Ok(Running {
        proc: Some(proc),
        fast,
        stream,
        bearer: Some(env.token.clone()),
        version: version_of(&bin, &["--version"]),
        notes: Vec::new(),
    })
}

/// cubegate's runtime driver from its startup log line
/// (`cubegate listening on … driver=Uring why="…"`).
pub fn driver_from_log(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("cubegate listening"))?;
    let field = |key: &str| -> Option<String> {
        let i = line.find(key)? + key.len();
        let rest = &line[i..];
        if let Some(q) = rest.strip_prefix('"') {
            Some(q[..q.find('"')?].to_string())
        } else {
            Some(rest.split_whitespace().next()?.to_string())
        }
    };
    let driver = field("driver=")?;
    Some(match field("why=") {
        Some(why) => format!("{driver} ({why})"),
        None => driver,
    })
}

pub fn nginx_config(env: &Env, port: u16) -> String {
    let d = env.dir.display();
    let mut s = format!(
        "daemon off;\nmaster_process on;\nworker_processes {};\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 75s;\n\
         \x20 client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
         \x20 fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n\
         \x20 scgi_temp_path {d}/nginx-scgi;\n",
        env.workers
    );
    for (name, addr) in [("fast", env.fast), ("stream", env.stream)] {
        let _ = writeln!(
            s,
            "  upstream {name} {{ server {addr}; keepalive 64; keepalive_timeout 4s; }}"
        );
    }
    match &env.tls {
        None => {
            let _ = writeln!(s, "  server {{\n    listen 127.0.0.1:{port};");
        }
        Some(t) => {
            let _ = writeln!(
                s,
                "  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {};\n\
                 \x20   ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;",
                t.cert.display(),
                t.key.display()
            );
        }
    }
    for (domain, name) in [(FAST_DOMAIN, "fast"), (STREAM_DOMAIN, "stream")] {
        let _ = writeln!(
            s,
            "    location /proxy/{domain}/ {{\n      proxy_pass http://{name}/;\n\
             \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
             \x20     proxy_buffering off;\n      proxy_read_timeout 120s;\n    }}"
        );
    }
    s.push_str("  }\n}\n");
    s
}

/// nginx in the foreground (`daemon off` is in the config) with `dir` as its prefix.
pub fn nginx_command(bin: &Path, dir: &Path, cfg: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .arg("-c")
        .arg(cfg);
    cmd
}

fn start_nginx(env: &Env) -> Result<Running, NotRun> {
    let Some(bin) = find_program("nginx") else {
        return Err(NotRun::Skipped("not installed".into()));
    };
    let port = port()?;
    let cfg = write(env, "nginx.conf", &nginx_config(env, port))?;
    let proc = spawn(env, "nginx", nginx_command(&bin, &env.dir, &cfg))?;
    let (fast, stream) = proxy_urls(env, port);
    Ok(Running {
        proc: Some(proc),
        fast,
        stream,
        bearer: None,
        version: version_of(&bin, &["-v"]),
        notes: Vec::new(),
    })
}

/// HAProxy: `jwt` = http mode verifying the bearer token (HS256 signature with
/// `jwt_verify`, then `iss` and `exp` as cubegate does), paths routed like cubegate's, and
/// `option http-no-delay` (without it HAProxy sends small chunks with MSG_MORE and a
/// stream arrives all at once at its end; operators streaming SSE set it); otherwise tcp
/// mode, one frontend port per simulator.
pub fn haproxy_config(env: &Env, jwt: bool, ports: (u16, u16)) -> String {
    let tls = env.tls.as_ref().map_or(String::new(), |t| {
        format!(" ssl crt {} alpn http/1.1", t.combined.display())
    });
    let mut s = format!(
        "global\n  nbthread {}\n  maxconn 4096\n\n\
         defaults\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
         \x20 maxconn 4096\n",
        env.workers
    );
    if jwt {
        let _ = write!(
            s,
            "  mode http\n  option http-no-delay\n\n\
             frontend bench\n  bind 127.0.0.1:{p}{tls}\n\
             \x20 http-request deny deny_status 401 unless {{ req.hdr_cnt(authorization) eq 1 }}\n\
             \x20 http-request set-var(txn.bearer) http_auth_bearer\n\
             \x20 http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n\
             \x20 http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}\n\
             \x20 http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,\"{secret}\") -m int 1 }}\n\
             \x20 http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {ISSUER} }}\n\
             \x20 http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n\
             \x20 http-request set-var(txn.now) date\n\
             \x20 http-request deny deny_status 401 unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}\n\
             \x20 use_backend stream if {{ path_beg /proxy/{STREAM_DOMAIN}/ }}\n\
             \x20 use_backend fast if {{ path_beg /proxy/{FAST_DOMAIN}/ }}\n",
            p = ports.0,
            secret = env.secret,
        );
        for (name, addr) in [("fast", env.fast), ("stream", env.stream)] {
            let _ = write!(
                s,
                "\nbackend {name}\n  http-request replace-path /proxy/[^/]*(/.*) \\1\n\
                 \x20 http-reuse always\n  server sim {addr}\n"
            );
        }
    } else {
        s.push_str("  mode tcp\n");
        for (name, port, addr) in [("fast", ports.0, env.fast), ("stream", ports.1, env.stream)] {
            let _ = write!(
                s,
                "\nfrontend {name}\n  bind 127.0.0.1:{port}{tls}\n  default_backend {name}\n\
                 \nbackend {name}\n  server sim {addr}\n"
            );
        }
    }
    s
}

fn start_haproxy(env: &Env, jwt: bool) -> Result<Running, NotRun> {
    let Some(bin) = find_program("haproxy") else {
        return Err(NotRun::Skipped("not installed".into()));
    };
    let version = version_of(&bin, &["-v"]);
    if jwt && !haproxy_has_jwt(&version) {
        return Err(NotRun::Skipped(format!(
            "{version}: jwt_verify needs HAProxy 2.5 or later"
        )));
    }
    let ports = (port()?, port()?);
    let name = if jwt { "haproxy-jwt" } else { "haproxy-tcp" };
    let cfg = write(
        env,
        &format!("{name}.cfg"),
        &haproxy_config(env, jwt, ports),
    )?;
    haproxy_check(&bin, &cfg).map_err(NotRun::Failed)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("-db").arg("-f").arg(&cfg);
    let proc = spawn(env, name, cmd)?;
    let (fast, stream) = if jwt {
        proxy_urls(env, ports.0)
    } else {
        let ep = |p: u16| proxy_endpoint(env, p, "/v1/chat/completions");
        (ep(ports.0), ep(ports.1))
    };
    Ok(Running {
        proc: Some(proc),
        fast,
        stream,
        bearer: jwt.then(|| env.token.clone()),
        version,
        notes: Vec::new(),
    })
}

/// `haproxy -c`: Err with HAProxy's words when it refuses the config.
pub fn haproxy_check(bin: &Path, cfg: &Path) -> Result<(), String> {
    let check = Command::new(bin)
        .arg("-c")
        .arg("-q")
        .arg("-f")
        .arg(cfg)
        .output()
        .map_err(|e| format!("haproxy -c: {e}"))?;
    if check.status.success() {
        return Ok(());
    }
    Err(format!(
        "haproxy -c refused the config: {}",
        String::from_utf8_lossy(&check.stderr)
            .trim()
            .replace('\n', " | ")
    ))
}

/// Whether `haproxy -v`'s first line names 2.5 or later.
pub fn haproxy_has_jwt(version_line: &str) -> bool {
    let Some(v) = version_line
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("version"))
        .nth(1)
    else {
        return false;
    };
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    let major: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    (major, minor) >= (2, 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        assert_eq!(Kind::parse(" HAProxy "), Some(Kind::HaproxyJwt));
        assert_eq!(Kind::parse("envoy"), None);
    }

    #[test]
    fn driver_line() {
        let log = "2026-11-23T16:38:49Z  INFO management API listening listen=127.0.0.1:1 keys=1\n\
                   2026-11-23T16:38:49Z  INFO cubegate listening on 127.0.0.1:18080 workers=1 \
                   driver=Uring why=\"auto: io_uring is available\" pinned=false\n";
        assert_eq!(
            driver_from_log(log).as_deref(),
            Some("Uring (auto: io_uring is available)")
        );
        assert_eq!(driver_from_log("nothing"), None);
    }

    #[test]
    fn log_lines_lose_terminal_colours() {
        assert_eq!(
            plain_text("\u{1b}[32mLiteLLM: Proxy initialized\u{1b}[0m  "),
            "LiteLLM: Proxy initialized"
        );
        assert_eq!(plain_text("\u{1b}[1;31mError\u{1b}[0m: x"), "Error: x");
        assert_eq!(plain_text("plain"), "plain");
        // A lone or cut-off escape is dropped, not a panic.
        assert_eq!(plain_text("a\u{1b}"), "a");
        assert_eq!(plain_text("a\u{1b}[1;3"), "a");
    }

    #[test]
    fn haproxy_versions() {
        assert!(haproxy_has_jwt(
            "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
        ));
        assert!(haproxy_has_jwt("HA-Proxy version 3.0.1 2024/06/10"));
        assert!(!haproxy_has_jwt("HA-Proxy version 2.4.22 2023/02/14"));
        assert!(!haproxy_has_jwt("unknown"));
    }
}
