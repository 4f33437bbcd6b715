//! What this box knows of the fleet it shares limits with, as admission reads it: alone
//! (no `[fleet]` Redis), shared (Redis answers: the other boxes' use counts), or cut off
//! (Redis is configured but unreachable: this box enforces its share of each limit).
//!
//! One `AtomicU64`, written by the exchange thread and read with one relaxed load per
//! limited request, so the request path learns Redis' state without any IO. A leaf: the
//! limiter and admission import it, it imports nothing of theirs.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bit 32: `[fleet]` has a Redis URL; bit 33: the last exchange succeeded; low 32 bits: the
/// boxes last seen (at least 1).
static STATE: AtomicU64 = AtomicU64::new(0);
const CONFIGURED: u64 = 1 << 32;
const UP: u64 = 1 << 33;

/// How this box's limits relate to the fleet's right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fleet {
    /// No Redis: this box's counts are the whole story.
    Alone,
    /// Redis answers: the other boxes' use, as of the last exchange, counts too.
    Shared,
    /// Redis is configured but does not answer: each box takes `limit / boxes` (rounded
    /// up, so no limit becomes 0), `boxes` being how many were last seen (1 if none ever).
    Cut { boxes: u32 },
}

impl Fleet {
    pub fn now() -> Fleet {
        let s = STATE.load(Ordering::Relaxed);
        if s & CONFIGURED == 0 {
            Fleet::Alone
        } else if s & UP != 0 {
            Fleet::Shared
        } else {
            Fleet::Cut {
                boxes: (s as u32).max(1),
            }
        }
    }

    /// The part of `limit` this box enforces.
    pub fn limit(self, limit: u32) -> u32 {
        match self {
            Fleet::Cut { boxes } => limit.div_ceil(boxes.max(1)),
            _ => limit,
        }
    }

    /// `others` (the other boxes' use) if it counts now, else 0.
    pub fn others(self, others: impl FnOnce() -> u32) -> u32 {
        match self {
            Fleet::Shared => others(),
            _ => 0,
        }
    }
}

/// `[fleet]` has a Redis URL: cut off (alone, as one box) until the first exchange.
pub fn configured() {
    STATE.store(CONFIGURED | 1, Ordering::Relaxed);
}

/// An exchange succeeded and saw `boxes` boxes (this one included).
pub fn reached(boxes: u32) {
    STATE.store(CONFIGURED | UP | u64::from(boxes.max(1)), Ordering::Relaxed);
}

/// An exchange failed: the boxes last seen stay for the share.
pub fn lost() {
    STATE.fetch_and(!UP, Ordering::Relaxed);
}

/// `cubegate_fleet_redis_up` and `cubegate_fleet_boxes`, when `[fleet]` has a Redis URL.
pub fn render(out: &mut String) {
    let s = STATE.load(Ordering::Relaxed);
    if s & CONFIGURED == 0 {
        return;
    }
    let up = u8::from(s & UP != 0);
    let _ = writeln!(out, "# HELP cubegate_fleet_redis_up Whether the last exchange of limit counts with the fleet's Redis succeeded (0: each limit is split among the boxes last seen).\n# TYPE cubegate_fleet_redis_up gauge\ncubegate_fleet_redis_up {up}");
    let _ = writeln!(out, "# HELP cubegate_fleet_boxes cubegate boxes sharing the limits, as last seen in Redis.\n# TYPE cubegate_fleet_boxes gauge\ncubegate_fleet_boxes {}", (s as u32).max(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_box_takes_its_share_never_zero() {
        let cut = Fleet::Cut { boxes: 3 };
        assert_eq!((cut.limit(60), cut.limit(61), cut.limit(1)), (20, 21, 1));
        assert_eq!(cut.others(|| 7), 0);
        assert_eq!(Fleet::Shared.others(|| 7), 7);
        assert_eq!(Fleet::Alone.limit(60), 60);
    }
}
