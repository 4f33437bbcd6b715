//! Listening sockets: bound here, or inherited, either from systemd (socket activation:
//! `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`) or from the previous cubegate process in a
//! hand-over (`CUBEGATE_LISTEN_FDS`, `CUBEGATE_LISTEN_FDNAMES`; see `handover`).
//!
//! Inherited sockets are what makes a restart refuse no connection: the accept queue
//! belongs to the socket, not to a process, so a connection that arrives while one process
//! gives way to the next waits in the queue and the next one accepts it. A socket named
//! `management` serves the management API; every other one is the public listener.

use socket2::Socket;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first passed descriptor (after stdin, stdout, stderr), by the systemd convention.
pub const FIRST_FD: RawFd = 3;
const MAX_FDS: usize = 256;
pub const MANAGEMENT_NAME: &str = "management";
pub const PROXY_NAME: &str = "proxy";

/// Sockets this process was given at start.
#[derive(Default)]
pub struct Inherited {
    pub proxy: Vec<TcpListener>,
    pub management: Option<TcpListener>,
    /// Who passed them, for the log.
    pub from: &'static str,
}

impl Inherited {
    /// How many sockets were passed, public and management together.
    pub fn count(&self) -> usize {
        self.proxy.len() + usize::from(self.management.is_some())
    }
}

/// Takes the sockets passed to this process, if any. Call once, first thing in `serve`.
pub fn take_inherited() -> Result<Option<Inherited>, String> {
    let (count, names, from) = if let Some(n) = systemd_count()? {
        (
            n,
            std::env::var("LISTEN_FDNAMES").unwrap_or_default(),
            "systemd",
        )
    } else if let Ok(n) = std::env::var("CUBEGATE_LISTEN_FDS") {
        let n = n
            .parse::<usize>()
            .map_err(|_| format!("CUBEGATE_LISTEN_FDS={n:?} is not a count"))?;
        let names = std::env::var("CUBEGATE_LISTEN_FDNAMES").unwrap_or_default();
        (n, names, "the previous cubegate process")
    } else {
        return Ok(None);
    };
    if count == 0 || count > MAX_FDS {
        return Err(format!(
            "{count} listening sockets passed; expected 1..={MAX_FDS}"
        ));
    }
    let names: Vec<&str> = names.split(':').collect();
    let mut found = Inherited {
        from,
        ..Inherited::default()
    };
    for i in 0..count {
        let fd = FIRST_FD + i as RawFd;
        let socket = adopt(fd)?;
        let listener: TcpListener = socket.into();
        if names.get(i).copied() == Some(MANAGEMENT_NAME) {
            if found.management.replace(listener).is_some() {
                return Err("more than one socket is named \"management\"".into());
            }
        } else {
            found.proxy.push(listener);
        }
    }
    if found.proxy.is_empty() {
        return Err("the passed sockets include none for the public listener".into());
    }
    Ok(Some(found))
}

/// systemd's count, when the variables are meant for this process.
fn systemd_count() -> Result<Option<usize>, String> {
    let (Ok(fds), Ok(pid)) = (std::env::var("LISTEN_FDS"), std::env::var("LISTEN_PID")) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (an ancestor that did not clear them).
        return Ok(None);
    }
    fds.parse::<usize>()
        .map(Some)
        .map_err(|_| format!("LISTEN_FDS={fds:?} is not a count"))
}

/// Whether descriptor `fd` is open and a socket (read from /proc, without touching it).
pub fn is_open_socket(fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
}

/// Checks that `fd` is a listening TCP socket and takes ownership of it.
fn adopt(fd: RawFd) -> Result<Socket, String> {
    if !is_open_socket(fd) {
        return Err(format!("passed descriptor {fd} is not an open socket"));
    }
    // SAFETY: `fd` is open (checked just above) and, by the socket-passing protocol
    // (systemd's, and `handover`'s which follows it), given to this process for this
    // purpose: descriptors FIRST_FD..FIRST_FD+count were open when the process started,
    // so nothing this process opened can have taken their numbers, and no other code
    // refers to them. Each number is wrapped exactly once (`take_inherited` runs once,
    // first thing in `serve`), so this `OwnedFd` is the descriptor's only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = Socket::from(owned);
    let bad = |what: &str| format!("passed descriptor {fd} is not {what}");
    match socket.r#type() {
        Ok(t) if t == socket2::Type::STREAM => {}
        _ => return Err(bad("a stream socket")),
    }
    if !socket.is_listener().unwrap_or(false) {
        return Err(bad("a listening socket"));
    }
    if socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .is_none()
    {
        return Err(bad("an IP socket"));
    }
    // Not leaked into other children; a hand-over passes them on explicitly.
    socket.set_cloexec(true).map_err(|e| e.to_string())?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Binds the public listener: one SO_REUSEPORT socket per worker, so the kernel spreads
/// connections over the workers.
pub fn bind_proxy(addr: std::net::SocketAddr, workers: usize) -> Result<Vec<TcpListener>, String> {
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers {
        let l =
            bind_one(addr).map_err(|e| format!("cannot listen on {addr} (proxy.listen): {e}"))?;
        // With port 0 the first bind picks the port; the others share it.
        addr = l.local_addr().unwrap_or(addr);
        listeners.push(l);
    }
    Ok(listeners)
}

fn bind_one(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Which sockets each worker accepts on. With as many sockets as workers or more, each
/// socket has one worker; with fewer (an inherited single socket), workers share them.
pub fn per_worker(
    sockets: &[TcpListener],
    workers: usize,
) -> std::io::Result<Vec<Vec<TcpListener>>> {
    let mut out: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    if sockets.len() >= workers {
        for (j, s) in sockets.iter().enumerate() {
            out[j % workers].push(s.try_clone()?);
        }
    } else {
        for (i, mine) in out.iter_mut().enumerate() {
            mine.push(sockets[i % sockets.len()].try_clone()?);
        }
    }
    Ok(out)
}
