//! Test harness: starts the real `cubegate` binary and the backend simulator on loopback
//! and speaks raw HTTP/1.1 to them with std sockets (every socket has a timeout, every loop
//! a bound), so the tests exercise exactly what a client on the wire sees.

#![allow(dead_code)]

pub mod services;

use rustls::pki_types::pem::PemObject;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
pub const DRIVERS: [&str; 2] = ["uring", "legacy"];

/// Generates one `#[test]` per runtime driver for each listed function `fn(&str)`.
#[macro_export]
macro_rules! for_each_driver {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name("uring") } )*
        }
        mod legacy {
            $( #[test] fn $name() { super::$name("legacy") } )*
        }
    };
}

/// A child process killed on drop, whose stderr is collected in the background.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Sends `sig` and expects the process to exit 0 within 20 s (failing with its log).
    pub fn expect_clean_exit(&mut self, sig: &str) {
        self.signal(sig);
        let code = self.wait_exit(Duration::from_secs(20));
        assert_eq!(code, Some(0), "after SIG{sig}:\n{}", self.log());
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Spawns `cmd`, waits (bounded) for a stderr line containing `marker` followed by an
/// address, and returns the process with that address.
pub fn spawn_and_wait(mut cmd: Command, marker: &str) -> Proc {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_string();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(i) = line.find(&marker) {
                    let rest = &line[i + marker.len()..];
                    // Plain or JSON log lines: the address runs until a character that
                    // cannot be in one.
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
                        .collect();
                    if let Ok(a) = addr.parse::<SocketAddr>() {
                        let _ = tx.send(a);
                        sent = true;
                    }
                }
            }
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(addr) => Proc { child, addr, log },
        Err(_) => {
            let _ = child.kill();
            panic!("process did not start; log:\n{}", log.lock().unwrap());
        }
    }
}

/// Starts the simulator: `flavor` is "vllm" or "ollama".
pub fn sim(flavor: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cubegate-bench"));
    cmd.args(["backend", "--flavor", flavor, "--listen", "127.0.0.1:0"]);
    cmd.args(extra);
    spawn_and_wait(cmd, "listening on ")
}

/// The platform admin every test gateway bootstraps.
pub const TEST_ADMIN_EMAIL: &str = "admin@cubegate.test";
pub const TEST_ADMIN_PASSWORD: &str = "correct horse battery staple";

/// A fresh, empty directory no other gateway of this run uses.
pub fn unique_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("cubegate-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cubegate-test-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A gateway config: `[proxy]` with a free port and the driver, plus `body`.
pub fn config_text(driver: &str, body: &str) -> String {
    config_text_with(driver, "", body)
}

/// Like `config_text`, with extra `[proxy]` lines.
pub fn config_text_with(driver: &str, proxy_extra: &str, body: &str) -> String {
    // Every gateway gets its own management listener port and store.
    let management = if body.contains("[management]") {
        String::new()
    } else {
        format!(
            "[management]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_email = \"{TEST_ADMIN_EMAIL}\"\n\n",
            unique_dir("store").display()
        )
    };
    // Active health checks are the fleet tests' subject; elsewhere they would only race
    // the stand-in backends (garbage servers, closed ports) a test sets up on purpose.
    let health = if body.contains("[health]") {
        ""
    } else {
        "[health]\ninterval_ms = 0\n\n"
    };
    // Two workers unless the test chooses (what is per worker, such as the wait queue,
    // is only deterministic with one).
    let workers = if proxy_extra.contains("workers") {
        ""
    } else {
        "workers = 2\n"
    };
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{workers}driver = \"{driver}\"\n{proxy_extra}\n\n{management}{health}{body}\n"
    )
}

pub struct Gateway {
    pub proc: Proc,
    pub config_path: PathBuf,
}

impl std::ops::Deref for Gateway {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// Starts `cubegate serve` with `[proxy]` filled in and `body` (auth, domains, …) after it.
pub fn gateway(driver: &str, body: &str) -> Gateway {
    gateway_with(driver, "", body)
}

/// Like `gateway`, with extra `[proxy]` lines.
pub fn gateway_with(driver: &str, proxy_extra: &str, body: &str) -> Gateway {
    gateway_with_env(driver, proxy_extra, body, &[])
}

/// Like `gateway`, with environment variables set on the gateway process (e.g. the
/// secret an `[[auth.trusted]] hs_secret_env` names).
pub fn gateway_env(driver: &str, body: &str, envs: &[(&str, &str)]) -> Gateway {
    gateway_with_env(driver, "", body, envs)
}

/// Like `gateway`, with extra `[proxy]` lines and environment variables.
pub fn gateway_with_env(
    driver: &str,
    proxy_extra: &str,
    body: &str,
    envs: &[(&str, &str)],
) -> Gateway {
    let dir = unique_dir("gw");
    let path = dir.join(format!("cubegate-{driver}.toml"));
    std::fs::write(&path, config_text_with(driver, proxy_extra, body)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cubegate"));
    cmd.args(["serve", "--config"]).arg(&path);
    cmd.env("CUBEGATE_LOG", "info");
    cmd.env("CUBEGATE_ADMIN_PASSWORD", TEST_ADMIN_PASSWORD);
    cmd.envs(envs.iter().copied());
    Gateway {
        proc: spawn_and_wait(cmd, "cubegate listening on "),
        config_path: path,
    }
}

/// The management listener of a gateway (its port is chosen at start; the log says it,
/// as `listen=ADDR` in human lines or `"listen":"ADDR"` in JSON ones).
pub fn management_addr(gw: &Gateway) -> SocketAddr {
    let log = gw.log();
    log.lines()
        .filter(|l| l.contains("management API listening"))
        .find_map(|l| {
            let rest = l
                .split("listen=")
                .nth(1)
                .or_else(|| l.split("\"listen\":\"").nth(1))?;
            rest.split(|c: char| c.is_whitespace() || c == '"')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no management address in the log:\n{log}"))
}

/// Starts `cubegate serve` on an existing config file (a restart keeps its store).
pub fn gateway_from(config_path: &std::path::Path) -> Gateway {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cubegate"));
    cmd.args(["serve", "--config"]).arg(config_path);
    cmd.env("CUBEGATE_LOG", "info");
    cmd.env("CUBEGATE_ADMIN_PASSWORD", TEST_ADMIN_PASSWORD);
    Gateway {
        proc: spawn_and_wait(cmd, "cubegate listening on "),
        config_path: config_path.to_path_buf(),
    }
}

/// `[auth] mode = "none"` and one domain per (id, backends) where each backend is
/// (kind, addr, models).
/// (kind, address, models) of one backend.
pub type BackendSpec<'a> = (&'a str, SocketAddr, &'a [&'a str]);

pub fn domains_config(domains: &[(&str, &[BackendSpec])]) -> String {
    let mut s = String::from("[auth]\nmode = \"none\"\n\n[timeouts]\nfirst_byte_s = 2\nbetween_chunks_s = 2\nheader_read_ms = 1000\nbody_read_ms = 1000\ndrain_s = 5\n\n");
    for (id, backends) in domains {
        s.push_str(&format!("[[domains]]\nid = \"{id}\"\n"));
        for (kind, addr, models) in backends.iter() {
            let models: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
            s.push_str(&format!(
                "[[domains.backends]]\nkind = \"{kind}\"\nurl = \"http://{addr}\"\nmodels = [{}]\n",
                models.join(", ")
            ));
        }
    }
    s
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
    /// For chunked answers: each chunk's payload, in order.
    pub chunks: Vec<Vec<u8>>,
    /// The body ended properly (length reached or terminating chunk seen).
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// The contract's error code, for error answers.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Reads HTTP responses off one connection.
pub struct Reader<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

impl<S: Read> Reader<S> {
    pub fn new(stream: S) -> Reader<S> {
        Reader {
            stream,
            buf: Vec::new(),
        }
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn read_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Some(line);
            }
            match self.fill() {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    fn read_exact_body(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            match self.fill() {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Reads a response head. `None` if the connection closed first.
    pub fn head(&mut self) -> Option<(u16, Vec<(String, String)>)> {
        let status_line = self.read_line()?;
        let status_line = String::from_utf8_lossy(&status_line).into_owned();
        let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let (n, v) = line.split_once(':')?;
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        Some((status, headers))
    }

    /// Reads one chunk of a chunked body: `Some(None)` at the terminating chunk, `None`
    /// when the connection ended first.
    pub fn chunk(&mut self) -> Option<Option<Vec<u8>>> {
        let size_line = self.read_line()?;
        let size_text = String::from_utf8_lossy(&size_line).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // Trailers until the empty line.
            loop {
                let l = self.read_line()?;
                if l.is_empty() {
                    return Some(None);
                }
            }
        }
        let data = self.read_exact_body(size + 2)?;
        Some(Some(data[..size].to_vec()))
    }

    /// Reads a whole response (head + body). `head_request` for HEAD.
    pub fn response(&mut self) -> Option<Response> {
        let (status, headers) = self.head()?;
        let mut r = Response {
            status,
            headers,
            body: Vec::new(),
            chunks: Vec::new(),
            complete: false,
        };
        if status == 100 {
            r.complete = true;
            return Some(r);
        }
        if r.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                match self.chunk() {
                    Some(Some(c)) => {
                        r.body.extend_from_slice(&c);
                        r.chunks.push(c);
                    }
                    Some(None) => {
                        r.complete = true;
                        break;
                    }
                    None => break,
                }
            }
        } else if let Some(len) = r.header("content-length") {
            let n: usize = len.parse().unwrap();
            if let Some(b) = self.read_exact_body(n) {
                r.body = b;
                r.complete = true;
            }
        } else if status != 204 && status != 304 {
            loop {
                match self.fill() {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            r.body = std::mem::take(&mut self.buf);
            r.complete = true;
        }
        Some(r)
    }

    /// Bytes read past what was handed out.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

impl Reader<TcpStream> {
    /// Whether the peer closed the connection (reads EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let r = matches!(self.fill(), Ok(0) | Err(_));
        self.stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        r && self.buf.is_empty()
    }
}

/// Sends raw bytes on a new connection and reads one response.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<Response> {
    let mut s = connect(addr);
    s.write_all(bytes).unwrap();
    Reader::new(s).response()
}

pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (n, v) in headers {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut v = r.into_bytes();
    v.extend_from_slice(body);
    v
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    raw(addr, &request_bytes("GET", path, &[], b"")).expect("response")
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> Response {
    post_with(addr, path, &[], body)
}

pub fn post_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    raw(addr, &request_bytes("POST", path, &h, body.as_bytes())).expect("response")
}

/// The simulator's counters.
pub fn sim_stats(sim: &Proc) -> serde_json::Value {
    get(sim.addr, "/sim/stats").json()
}

/// Polls `cond` every 20 ms for at most `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub const VLLM_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
pub const OLLAMA_MODEL: &str = "llama3.2:1b";

pub fn chat_body(model: &str, stream: bool, extra: &str) -> String {
    format!(
        r#"{{"messages":[{{"role":"user","content":"tell me about gateways"}}],"model":"{model}","stream":{stream}{extra}}}"#
    )
}

/// Opens a connection and sends a chat request for `model` to `path`; read the answer
/// from the returned reader.
pub fn send_chat(addr: SocketAddr, path: &str, model: &str, stream: bool) -> Reader {
    let mut r = Reader::new(connect(addr));
    let body = chat_body(model, stream, "");
    let req = request_bytes(
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    r.stream.write_all(&req).unwrap();
    r
}

/// Seconds since the epoch plus `secs` (for `exp` claims).
pub fn unix_in(secs: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs
}

/// An HS256 token over `claims`, signed with `secret` (ring).
pub fn hs256_token(secret: &str, claims: &serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let input = format!(
        "{}.{}",
        B64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        B64.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// Sends `raw`, expects `status` and `code`, and (when `closes`) that the gateway then
/// closes the connection.
pub fn expect_refusal(
    addr: SocketAddr,
    raw: &[u8],
    status: u16,
    code: &str,
    closes: bool,
) -> Response {
    let mut s = connect(addr);
    send(&mut s, raw);
    let mut r = Reader::new(s);
    let resp = r
        .response()
        .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(raw)));
    assert_eq!(
        resp.status,
        status,
        "{:?}: {}",
        String::from_utf8_lossy(raw),
        resp.text()
    );
    assert_eq!(
        resp.error_code(),
        code,
        "{:?}",
        String::from_utf8_lossy(raw)
    );
    let msg = resp.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(msg.len() > 10, "error message should explain: {msg}");
    if closes {
        assert_eq!(resp.header("connection"), Some("close"));
        assert!(r.closed(), "connection should close after {code}");
    }
    resp
}

/// Whether the peer has closed the connection: a read returns EOF (or a reset) rather
/// than timing out.
pub fn peer_closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
        Ok(_) => false,
    }
}

/// Writes to a stream, ignoring errors (for tests that expect the peer to hang up).
pub fn send(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

/// `cubegate gen-cert` into `dir` (replacing what is there): (cert.pem, key.pem).
pub fn gen_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let out = Command::new(env!("CARGO_BIN_EXE_cubegate"))
        .args(["gen-cert", "--force", "--out-dir"])
        .arg(dir)
        .output()
        .expect("run gen-cert");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// `[proxy]` lines that turn HTTPS on with these files.
pub fn tls_lines(cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert.display(),
        key.display()
    )
}

/// A TLS client connection to a gateway.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A client that trusts exactly the certificate in `cert`.
pub fn client_config(
    cert: &std::path::Path,
    tls12_only: bool,
) -> std::sync::Arc<rustls::ClientConfig> {
    build_client(&[cert], tls12_only)
}

pub fn build_client(
    certs: &[&std::path::Path],
    tls12_only: bool,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

/// Connects and completes the handshake (so a refused certificate shows up here).
pub fn tls_connect(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let tcp = connect(addr);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// What a load client thread reports: requests answered, and what went wrong with the rest.
pub type LoadOutcome = std::thread::JoinHandle<(usize, Vec<String>)>;

/// Joins load client threads and asserts that none of their requests failed during
/// `what`. Returns how many were answered.
pub fn expect_no_failures(clients: Vec<LoadOutcome>, what: &str) -> usize {
    let (mut answered, mut failures) = (0, Vec::new());
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        answered += ok;
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed {what}, e.g. {:?}",
        failures.len(),
        answered + failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("{answered} requests answered {what}");
    answered
}

/// Waits (bounded) until the process's log contains `needle`; fails with the log.
pub fn expect_log(p: &Proc, needle: &str, limit: Duration) {
    assert!(
        eventually(limit, || p.log().contains(needle)),
        "no {needle:?} in the log within {limit:?}:\n{}",
        p.log()
    );
}

/// The value of an unlabelled (or exactly labelled) series on a `/metrics` page.
pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = get(addr, "/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Runs `cubegate check-config --config path` (bounded: killed after 30 s); returns the
/// exit code and stderr.
pub fn check_config(path: &std::path::Path) -> (Option<i32>, String) {
    run_cubegate(&["check-config", "--config"], path, &[])
}

/// Runs `cubegate <args> <path>` with `envs` (bounded: killed after 30 s); returns the
/// exit code (None when killed) and stderr.
pub fn run_cubegate(
    args: &[&str],
    path: &std::path::Path,
    envs: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cubegate"))
        .args(args)
        .arg(path)
        .envs(envs.iter().copied())
        .env("CUBEGATE_ADMIN_PASSWORD", TEST_ADMIN_PASSWORD)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cubegate");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.and_then(|s| s.code()), err)
}

/// A datagram socket standing in for systemd's notify socket (reads time out after 5 s):
/// the socket and the path to put in `NOTIFY_SOCKET`.
pub fn notify_listener(tag: &str) -> (std::os::unix::net::UnixDatagram, String) {
    let path = unique_dir(tag).join("notify.sock");
    let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (server, path.display().to_string())
}

/// The control address a simulator started with `--control` printed
/// (`listening on A control on B`).
pub fn control_addr(p: &Proc) -> SocketAddr {
    expect_log(p, " control on ", Duration::from_secs(10));
    let log = p.log();
    log.lines()
        .find_map(|l| l.split(" control on ").nth(1)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no control address in\n{log}"))
}

pub fn put(addr: SocketAddr, path: &str) -> Response {
    raw(addr, &request_bytes("PUT", path, &[], b"")).expect("response")
}

/// Switches a simulator's fault mode through its control listener.
pub fn set_fault(control: SocketAddr, mode: &str) {
    let r = put(control, &format!("/fault/{mode}"));
    assert_eq!(r.status, 200, "PUT /fault/{mode}: {}", r.text());
}

/// A management API call on `addr`, with an optional bearer token and JSON body.
pub fn api_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<serde_json::Value>,
) -> Response {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    raw(
        addr,
        &request_bytes(method, path, &headers, body.as_bytes()),
    )
    .expect("an answer")
}

/// `POST /users/tokens/issue` for `email`.
pub fn login(addr: SocketAddr, email: &str, password: &str) -> Response {
    api_call(
        addr,
        "POST",
        "/users/tokens/issue",
        None,
        Some(serde_json::json!({"username": email, "password": password})),
    )
}

/// (access token, refresh token) of a `201` token answer.
#[track_caller]
pub fn tokens(r: &Response) -> (String, String) {
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["access_token"].as_str().unwrap().to_string(),
        v["refresh_token"].as_str().unwrap().to_string(),
    )
}

/// An access token of the platform admin every test gateway bootstraps.
pub fn admin_token(addr: SocketAddr) -> String {
    let r = login(addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
    assert_eq!(r.status, 201, "admin login: {}", r.text());
    r.json()["access_token"].as_str().unwrap().to_string()
}

/// The access record (a JSON log line: start the gateway with `CUBEGATE_LOG_FORMAT=json`)
/// of the request with this `X-Request-Id`, waited for (bounded); its `fields`.
pub fn access_record(gw: &Proc, request_id: &str) -> serde_json::Value {
    let needle = format!("\"request_id\":\"{request_id}\"");
    let find = || {
        gw.log()
            .lines()
            .find(|l| l.contains(&needle) && l.contains("\"target\":\"cubegate::access\""))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON log line"))
    };
    assert!(
        eventually(Duration::from_secs(10), || find().is_some()),
        "no access record for {request_id}:\n{}",
        gw.log()
    );
    find().unwrap()["fields"].clone()
}

/// Reads one request (head + Content-Length or chunked body) off `s`.
pub fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
            let body = &req[end + 4..];
            if head.contains("transfer-encoding: chunked") {
                if body.ends_with(b"0\r\n\r\n") {
                    return Some(req);
                }
            } else {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap_or(0));
                if body.len() >= len {
                    return Some(req);
                }
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
}

/// A backend that records each request and answers it with `answer(i)`; after answering it
/// may write `extra` on the same connection (an unsolicited second answer).
pub fn scripted_backend(
    requests: usize,
    extra: Option<&'static [u8]>,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        let mut served = 0;
        let mut conns = Vec::new();
        while served < requests {
            let Ok((mut s, _)) = listener.accept() else {
                break;
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            while served < requests {
                let Some(req) = read_request(&mut s) else {
                    break;
                };
                record.lock().unwrap().push(req);
                served += 1;
                let body = format!("answer-{served}");
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                if let Some(extra) = extra {
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = s.write_all(extra);
                    // Keep the socket open: the gateway must notice the stray bytes itself.
                    conns.push(s);
                    break;
                }
            }
        }
    });
    (addr, seen)
}

/// Waits (at most ~6 s) until the wall clock's minute has more than `need` seconds left,
/// so a test's requests fall in one window.
pub fn same_minute(need: u64) {
    let left = || {
        60 - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 60
    };
    if left() <= need {
        std::thread::sleep(Duration::from_secs(left() + 1));
    }
}

/// Kills a process this test started indirectly (a hand-over's successor) when dropped.
pub struct Reaper(pub Option<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The pid of a hand-over's successor, from the old process's log.
pub fn successor_pid(log: &str) -> Option<u32> {
    log.lines()
        .find(|l| l.contains("hand-over complete"))?
        .split("successor=")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}
