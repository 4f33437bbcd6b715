//! When each request is meant to be sent.
//!
//! The run's requests form one global sequence 0, 1, 2, …; thread `t` of `T` takes
//! requests `t, t+T, t+2T, …`, so the threads together follow one schedule. Open loop:
//! request `g` is intended at `start + g × interval`, whether or not a connection is free
//! then; its latency is counted from that intended time, so a server that stalls cannot
//! hide the queue it causes (no coordinated omission). Closed loop: a request is intended
//! when a connection takes it. The run stops at `end` (no request is sent at or after it,
//! and none is intended then) or after `requests` requests.
//!
//! Within a thread the connections' tasks share one [`Tickets`] dispenser: a free task
//! takes the next ticket and sleeps until its intended time.

use std::cell::Cell;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    /// Spacing of intended send times across the whole run; None = closed loop.
    pub interval: Option<Duration>,
    /// No request is sent, or intended, at or after this.
    pub end: Option<Instant>,
    /// Requests in the whole run.
    pub requests: Option<u64>,
    /// This thread's share: global index = local × stride + offset.
    pub stride: u64,
    pub offset: u64,
}

impl Schedule {
    /// The interval between requests at `rate` per second.
    pub fn interval_for(rate: f64) -> Duration {
        Duration::from_secs_f64(1.0 / rate)
    }

    /// Global index of this thread's `k`-th request.
    pub fn global(&self, k: u64) -> u64 {
        k * self.stride + self.offset
    }

    /// When this thread's `k`-th request is meant to be sent, asked at `now`; None = the
    /// run is over for this thread.
    pub fn intended(&self, k: u64, now: Instant) -> Option<Instant> {
        let g = self.global(k);
        if self.requests.is_some_and(|n| g >= n) {
            return None;
        }
        let at = match self.interval {
            Some(iv) => {
                let ns = iv.as_nanos().saturating_mul(u128::from(g));
                self.start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
            }
            None => now.max(self.start),
        };
        if let Some(end) = self.end {
            if at >= end || now >= end {
                return None;
            }
        }
        Some(at)
    }

    /// Open loop with an end: how many requests the whole run was meant to send.
    pub fn planned(&self) -> Option<u64> {
        let iv = self.interval?.as_nanos().max(1);
        let planned = match self.end {
            Some(end) => {
                let span = end.saturating_duration_since(self.start).as_nanos();
                u64::try_from(span.div_ceil(iv)).unwrap_or(u64::MAX)
            }
            None => self.requests?,
        };
        Some(self.requests.map_or(planned, |n| n.min(planned)))
    }
}

/// Hands out one thread's requests in order to whichever connection is free.
#[derive(Debug, Default)]
pub struct Tickets {
    next: Cell<u64>,
}

impl Tickets {
    /// The next request's intended time, or None when the run is over.
    pub fn take(&self, s: &Schedule, now: Instant) -> Option<Instant> {
        let k = self.next.get();
        let at = s.intended(k, now)?;
        self.next.set(k + 1);
        Some(at)
    }

    /// Requests taken so far.
    pub fn taken(&self) -> u64 {
        self.next.get()
    }
}
