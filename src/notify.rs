//! systemd's notify protocol: readiness, the watchdog, and reload/stop announcements.
//!
//! `READY=1` is sent once every worker listens and the store is open. The watchdog is fed
//! from the main thread only while every worker has stamped its heartbeat recently: the
//! stamps come from a task on each worker's own event loop, so a worker that hangs stops
//! the `WATCHDOG=1` messages and systemd restarts the service. Outside systemd
//! (`NOTIFY_SOCKET` unset) everything here is a no-op.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
    /// Half of `WATCHDOG_USEC`: how often to feed the watchdog.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let path = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|p| !p.is_empty());
        let socket = path.and_then(|p| UnixDatagram::unbound().ok().map(|s| (s, p)));
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0 && socket.is_some())
            .map(|us| Duration::from_micros(us / 2));
        Notifier {
            socket,
            watchdog_every,
        }
    }

    pub fn send(&self, state: &str) {
        let Some((socket, path)) = &self.socket else {
            return;
        };
        let sent = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        } else {
            socket.send_to(state.as_bytes(), path)
        };
        if let Err(e) = sent {
            tracing::warn!("systemd notify ({state}) failed: {e}");
        }
    }
}

/// Per-worker heartbeats: milliseconds since `origin`, stamped by each worker's loop.
pub struct Heartbeats {
    origin: Instant,
    stamps: Vec<AtomicU64>,
    /// Workers whose listener is up.
    listening: std::sync::atomic::AtomicUsize,
}

impl Heartbeats {
    pub fn new(workers: usize) -> Heartbeats {
        Heartbeats {
            origin: Instant::now(),
            stamps: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            listening: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A worker's listener is up (called once per worker).
    pub fn listening(&self) {
        self.listening.fetch_add(1, Ordering::Release);
    }

    /// Waits (bounded) until every worker listens.
    pub fn wait_all_listening(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.listening.load(Ordering::Acquire) < self.stamps.len() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Called from worker `i`'s own event loop.
    pub fn beat(&self, i: usize) {
        let now = self.origin.elapsed().as_millis() as u64;
        if let Some(s) = self.stamps.get(i) {
            s.store(now, Ordering::Relaxed);
        }
    }

    /// Every worker beat within `within`.
    pub fn all_fresh(&self, within: Duration) -> bool {
        let now = self.origin.elapsed().as_millis() as u64;
        let limit = within.as_millis() as u64;
        self.stamps
            .iter()
            .all(|s| now.saturating_sub(s.load(Ordering::Relaxed)) <= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_over_a_datagram_socket() {
        let dir = std::env::temp_dir().join(format!("cubegate-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), path.display().to_string())),
            watchdog_every: None,
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn heartbeats_go_stale() {
        let h = Heartbeats::new(2);
        h.beat(0);
        h.beat(1);
        assert!(h.all_fresh(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(30));
        h.beat(0);
        assert!(!h.all_fresh(Duration::from_millis(10)));
    }
}
