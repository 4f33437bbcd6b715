//! Fault modes of the simulated host, chosen at start (`--fault`) or switched at run time
//! through the control listener (`control.rs`):
//!
//! | mode | what a client sees |
//! |---|---|
//! | `none` | the host works |
//! | `refuse` | connections refused (the listening sockets are closed; rebound on the same address when the mode leaves `refuse`); requests on connections already open are not answered, the connection is closed |
//! | `hang` | connections accepted, nothing answered (not even `/health`), connections held; streams in flight stall. Held requests go on once the mode changes |
//! | `error` | every request, `/health` included, answered 503 with the flavor's JSON error |
//! | `die-mid-stream` | generation answers die: a stream sends a few events ([`DIE_AFTER_EVENTS`] tokens) and the connection is closed without the terminating chunk; a whole answer is cut mid-body. Other routes (`/health`, model lists) answer normally, as on a host whose worker crashes while its server still runs |
//! | `slow` | every simulated time (queue wait follows, prefill, first token, each token) `--slow-factor` times longer |
//!
//! `GET /sim/stats` on the main port is the simulator's own instrumentation and is
//! answered in every mode but `refuse`.
//!
//! Closing the listeners: [`FaultSwitch::set`] shuts every registered listening socket
//! down (`shutdown(2)`), which refuses new connections at once and makes its thread's
//! pending accept fail; that thread (`listen.rs`) then drops the socket and binds a new
//! one (SO_REUSEADDR/SO_REUSEPORT) once the mode is no longer `refuse`.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Token events a stream sends before dying in `die-mid-stream`.
pub const DIE_AFTER_EVENTS: usize = 2;

/// One fault mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    Refuse,
    Hang,
    Error,
    DieMidStream,
    Slow,
}

const ALL: [Fault; 6] = [
    Fault::None,
    Fault::Refuse,
    Fault::Hang,
    Fault::Error,
    Fault::DieMidStream,
    Fault::Slow,
];

impl Fault {
    /// The mode's name on the command line and in the control API.
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Refuse => "refuse",
            Fault::Hang => "hang",
            Fault::Error => "error",
            Fault::DieMidStream => "die-mid-stream",
            Fault::Slow => "slow",
        }
    }

    pub fn parse(name: &str) -> Option<Fault> {
        ALL.into_iter().find(|f| f.name() == name)
    }

    /// What the mode does, in a line (`--help`).
    fn summary(self) -> &'static str {
        match self {
            Fault::None => "The host works",
            Fault::Refuse => "Connections refused (the listening sockets are closed)",
            Fault::Hang => "Connections accepted, nothing answered, not even /health",
            Fault::Error => "Every request, /health included, answered 503",
            Fault::DieMidStream => {
                "Generation answers die after a few events (whole answers cut mid-body)"
            }
            Fault::Slow => "Queue, prefill, first token and every token --slow-factor times slower",
        }
    }

    fn code(self) -> u8 {
        ALL.iter().position(|f| *f == self).unwrap_or(0) as u8
    }

    fn from_code(code: u8) -> Fault {
        ALL.get(usize::from(code)).copied().unwrap_or_default()
    }
}

impl clap::ValueEnum for Fault {
    fn value_variants<'a>() -> &'a [Self] {
        &ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()).help(self.summary()))
    }
}

/// The current mode, and the listening sockets it may have to close.
#[derive(Debug)]
pub struct FaultSwitch {
    mode: AtomicU8,
    slow_factor: u32,
    /// Each simulator thread's listening socket; `None` while it is closed.
    listeners: Mutex<Vec<Option<RawFd>>>,
}

impl FaultSwitch {
    pub fn new(initial: Fault, slow_factor: u32, threads: usize) -> FaultSwitch {
        FaultSwitch {
            mode: AtomicU8::new(initial.code()),
            slow_factor: slow_factor.max(1),
            listeners: Mutex::new(vec![None; threads]),
        }
    }

    pub fn get(&self) -> Fault {
        Fault::from_code(self.mode.load(Relaxed))
    }

    /// How much longer every simulated time is now.
    pub fn time_factor(&self) -> u32 {
        if self.get() == Fault::Slow {
            self.slow_factor
        } else {
            1
        }
    }

    /// Switches to `mode`. Entering `refuse` closes the listeners at once; leaving it
    /// waits (bounded) until every thread listens again, so a client may connect as soon
    /// as this returns.
    pub fn set(&self, mode: Fault) {
        let was = {
            let mut listeners = self.listeners();
            let was = self.get();
            self.mode.store(mode.code(), Relaxed);
            if mode == Fault::Refuse {
                for fd in listeners.iter_mut().filter_map(Option::take) {
                    // SAFETY: `fd` is a listening socket its thread keeps open until it
                    // sees the entry cleared (under this lock); shutdown does not close it.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
            was
        };
        if was == Fault::Refuse && mode != Fault::Refuse {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && self.listeners().iter().any(Option::is_none) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// The listener registry (`listen.rs` publishes and withdraws its sockets here).
    pub fn listeners(&self) -> MutexGuard<'_, Vec<Option<RawFd>>> {
        self.listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in ALL {
            assert_eq!(Fault::parse(f.name()), Some(f));
            assert_eq!(Fault::from_code(f.code()), f);
        }
        assert_eq!(Fault::parse("explode"), None);
    }

    #[test]
    fn slow_stretches_time_only_in_slow_mode() {
        let s = FaultSwitch::new(Fault::None, 10, 0);
        assert_eq!(s.time_factor(), 1);
        s.set(Fault::Slow);
        assert_eq!((s.get(), s.time_factor()), (Fault::Slow, 10));
        s.set(Fault::Error);
        assert_eq!(s.time_factor(), 1);
    }
}
