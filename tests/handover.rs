//! Restarts that refuse no connection and cut no stream.
//!
//! SIGUSR2 hands the listening sockets to a new process (a binary upgrade) while clients
//! keep opening connections and a stream is in flight; a hand-over whose new process
//! cannot start leaves the old one serving; and systemd-style socket activation serves on
//! the passed sockets, including a connection that queued before the process started.

mod common;

use command_fds::{CommandFdExt, FdMapping};
use common::*;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DOMAIN: &str = "3f8a1c2e-0000-4000-8000-000000000001";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn chat_path() -> String {
    format!("/proxy/{DOMAIN}/v1/chat/completions")
}

/// One short chat on a new connection: `Err` says what went wrong.
fn one_request(addr: SocketAddr) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let body = chat_body(MODEL, false, r#","max_tokens":2"#);
    s.write_all(&request_bytes(
        "POST",
        &chat_path(),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    ))
    .map_err(|e| format!("send: {e}"))?;
    match Reader::new(s).response() {
        Some(r) if r.status == 200 && r.complete => Ok(()),
        Some(r) => Err(format!("status {}: {}", r.status, r.text())),
        None => Err("connection closed without an answer".into()),
    }
}

/// Clients that open a new connection per request until told to stop (bounded in count
/// and time). Returns (answered, failures).
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(40);
        let (mut ok, mut failures) = (0, Vec::new());
        for _ in 0..5000 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            match one_request(addr) {
                Ok(()) => ok += 1,
                Err(e) => failures.push(e),
            }
        }
        (ok, failures)
    })
}

/// SIGUSR2 under load: the new process takes the sockets, the old one finishes its stream
/// and exits 0, and no request fails, before, during or after.
fn handover_under_load(driver: &str) {
    let sim = sim("vllm", &["--tokens", "30", "--token-delay-us", "50000"]);
    let models: &[&str] = &[MODEL];
    let mut gw = gateway(
        driver,
        &domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])]),
    );
    let mgmt = management_addr(&gw);
    let mut reaper = Reaper(None);

    // An idle keep-alive connection on the old process: it must see its end when the old
    // process closes it (a copy leaked into the successor would keep it open, silent).
    let mut idle = connect(gw.addr);
    idle.write_all(&request_bytes("GET", "/health", &[], b""))
        .unwrap();
    let mut idle = Reader::new(idle);
    assert_eq!(idle.response().unwrap().status, 200);

    // A stream in flight on the old process.
    let mut stream = send_chat(gw.addr, &chat_path(), MODEL, true);
    let (status, _) = stream.head().expect("stream head");
    assert_eq!(status, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2).map(|_| load(gw.addr, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    gw.signal("USR2");
    assert!(
        eventually(Duration::from_secs(20), || successor_pid(&gw.log())
            .is_some()),
        "no hand-over:\n{}",
        gw.log()
    );
    reaper.0 = successor_pid(&gw.log());

    // The stream started before the hand-over runs to its end on the old process.
    let mut body = Vec::new();
    let mut ended = false;
    for _ in 0..200 {
        match stream.chunk() {
            Some(Some(c)) => body.extend(c),
            Some(None) => {
                ended = true;
                break;
            }
            None => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    assert!(
        ended && text.trim_end().ends_with("data: [DONE]"),
        "stream cut: {text}"
    );
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    assert!(!gw.log().contains("drain deadline reached"), "{}", gw.log());
    let mut byte = [0u8; 1];
    let end = std::io::Read::read(&mut idle.stream, &mut byte);
    assert!(
        matches!(end, Ok(0)),
        "the idle connection of the old process did not end: {end:?}"
    );

    // The load ran across the hand-over and on after the old process left.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let answered = expect_no_failures(clients.into_iter().collect(), "across the hand-over");
    assert!(answered > 20, "only {answered} requests ran");

    // The successor serves both listeners at the same addresses.
    assert_eq!(get(gw.addr, "/health").status, 200);
    let metrics = get(mgmt, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("cubegate_requests_total"));
}

/// A stream that outlives the old process's drain deadline is cut when the old process
/// exits, and its client sees the connection end at once. (A descriptor leaked into the
/// successor would keep the socket open: the client would wait, unanswered, forever.)
fn handover_cut_stream_ends(driver: &str) {
    let sim = sim("vllm", &["--tokens", "200", "--token-delay-us", "50000"]);
    let models: &[&str] = &[MODEL];
    let body = domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])])
        .replace("drain_s = 5", "drain_s = 1");
    let mut gw = gateway(driver, &body);
    let mut reaper = Reaper(None);
    let mut stream = send_chat(gw.addr, &chat_path(), MODEL, true);
    let (status, _) = stream.head().expect("stream head");
    assert_eq!(status, 200);
    gw.signal("USR2");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        gw.log()
    );
    reaper.0 = successor_pid(&gw.log());
    assert!(gw.log().contains("drain deadline reached"), "{}", gw.log());
    // The rest of the stream: cut (no terminating chunk), and the connection ends.
    stream
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut ended = false;
    for _ in 0..400 {
        match stream.chunk() {
            Some(Some(_)) => continue,
            Some(None) => panic!("a stream cut at the drain deadline looked complete"),
            None => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended);
    let mut byte = [0u8; 1];
    let end = std::io::Read::read(&mut stream.stream, &mut byte);
    assert!(
        matches!(end, Ok(0)),
        "the cut connection did not end: {end:?}"
    );
}

/// A hand-over whose new process cannot start (its config is now broken) changes
/// nothing: the old process keeps serving, the management API included.
fn failed_handover_keeps_serving(driver: &str) {
    let sim = sim("vllm", &["--tokens", "3"]);
    let models: &[&str] = &[MODEL];
    let mut gw = gateway(
        driver,
        &domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])]),
    );
    let mgmt = management_addr(&gw);
    let good = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, "[proxy]\nworkers = \"many\"\n").unwrap();
    gw.signal("USR2");
    expect_log(
        &gw,
        "hand-over failed, still serving",
        Duration::from_secs(20),
    );
    one_request(gw.addr).expect("still serving after a failed hand-over");
    assert_eq!(
        get(mgmt, "/metrics").status,
        200,
        "management API paused for good"
    );
    std::fs::write(&gw.config_path, good).unwrap();
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
}

/// Sockets passed the systemd way (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES): cubegate
/// serves on them instead of binding, and a connection made before it started, waiting in
/// the socket's queue, is answered.
fn socket_activation(driver: &str) {
    let sim = sim("vllm", &["--tokens", "3"]);
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let management = TcpListener::bind("127.0.0.1:0").unwrap();
    let (proxy_addr, mgmt_addr) = (
        proxy.local_addr().unwrap(),
        management.local_addr().unwrap(),
    );

    // Connected (the kernel completed the handshake) before any cubegate runs.
    let mut early = connect(proxy_addr);
    early
        .write_all(&request_bytes("GET", "/health", &[], b""))
        .unwrap();

    let models: &[&str] = &[MODEL];
    let dir = unique_dir("socket-activation");
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        config_text(
            driver,
            &domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])]),
        ),
    )
    .unwrap();
    let mut cmd = Command::new("sh");
    // `exec` keeps the shell's pid, so LISTEN_PID=$$ names the gateway process.
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=proxy:management exec \"$0\" serve --config \"$1\"",
        env!("CARGO_BIN_EXE_cubegate"),
    ])
    .arg(&path)
    .env("CUBEGATE_ADMIN_PASSWORD", TEST_ADMIN_PASSWORD);
    cmd.fd_mappings(vec![
        FdMapping {
            parent_fd: OwnedFd::from(proxy),
            child_fd: 3,
        },
        FdMapping {
            parent_fd: OwnedFd::from(management),
            child_fd: 4,
        },
    ])
    .unwrap();
    let gw = spawn_and_wait(cmd, "cubegate listening on ");
    assert_eq!(gw.addr, proxy_addr);
    assert!(gw.log().contains("inherited from systemd"), "{}", gw.log());

    let answer = Reader::new(early)
        .response()
        .expect("the queued connection is served");
    assert_eq!(answer.status, 200);
    one_request(proxy_addr).expect("a chat on the passed socket");
    assert_eq!(get(mgmt_addr, "/metrics").status, 200);
}

for_each_driver!(
    handover_under_load,
    handover_cut_stream_ends,
    failed_handover_keeps_serving,
    socket_activation
);

/// Under systemd: the old process names the new one the main process (`MAINPID=`), the
/// new one sends no second READY=1, and the watchdog keeps being fed after the old one
/// has gone (by the new one, the only process left).
fn handover_tells_systemd(driver: &str) {
    let (server, socket) = notify_listener("notify-handover");
    let mut gw = gateway_env(
        driver,
        "[auth]\nmode = \"none\"\n[timeouts]\ndrain_s = 5\n",
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")],
    );
    let mut reaper = Reaper(None);
    let next = || {
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    gw.signal("USR2");
    let mut seen = Vec::new();
    for _ in 0..20 {
        let m = next();
        let done = m.starts_with("MAINPID=");
        seen.push(m);
        if done {
            break;
        }
    }
    assert!(eventually(Duration::from_secs(5), || successor_pid(
        &gw.log()
    )
    .is_some()));
    reaper.0 = successor_pid(&gw.log());
    let successor = reaper.0.expect("a successor in the log");
    assert_eq!(
        seen.last().map(String::as_str),
        Some(format!("MAINPID={successor}").as_str()),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|m| m == "READY=1"), "{seen:?}");
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    for _ in 0..2 {
        assert_eq!(next(), "WATCHDOG=1");
    }
}

mod notify {
    use super::*;
    #[test]
    fn uring() {
        handover_tells_systemd("uring")
    }
    #[test]
    fn legacy() {
        handover_tells_systemd("legacy")
    }
}
