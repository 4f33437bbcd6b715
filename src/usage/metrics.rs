//! Limit rejections by domain, scope and limit, per worker (plain counters summed at
//! scrape time, like the rest of `crate::metrics`, which renders these and so is not
//! imported here).

use super::admission::{LimitKind, Refusal, ScopeKind};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// `crate::metrics::DOMAIN_SLOTS` (a test there holds them equal): domains by metrics slot.
pub const SLOTS: usize = 256;

const SCOPES: [ScopeKind; 3] = [ScopeKind::Domain, ScopeKind::Member, ScopeKind::Key];
const KINDS: [LimitKind; 4] = [
    LimitKind::RequestsPerMinute,
    LimitKind::TokensPerMinute,
    LimitKind::TokensPerDay,
    LimitKind::Concurrent,
];
type Block = [AtomicU64; SCOPES.len() * KINDS.len()];

/// One worker's rejections; a domain's block is allocated at its first rejection.
#[derive(Debug)]
pub struct LimitRejections(Box<[OnceLock<Box<Block>>]>);

impl Default for LimitRejections {
    fn default() -> Self {
        LimitRejections((0..SLOTS).map(|_| OnceLock::new()).collect())
    }
}

impl LimitRejections {
    pub fn count(&self, slot: u16, refusal: &Refusal) {
        let Some(cell) = self.0.get(usize::from(slot)) else {
            return;
        };
        let block = cell.get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        let scope = SCOPES.iter().position(|s| *s == refusal.scope).unwrap_or(0);
        let kind = KINDS.iter().position(|k| *k == refusal.kind).unwrap_or(0);
        block[scope * KINDS.len() + kind].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, slot: usize, i: usize) -> u64 {
        self.0[slot]
            .get()
            .map_or(0, |b| b[i].load(Ordering::Relaxed))
    }
}

/// `cubegate_limit_rejections_total{domain,scope,limit}`, summed over `workers`; `names`
/// are the domains by metrics slot.
pub fn render<'a>(
    out: &mut String,
    names: &[String],
    workers: impl Iterator<Item = &'a LimitRejections> + Clone,
    label: impl Fn(&str) -> String,
) {
    let _ = writeln!(out, "# HELP cubegate_limit_rejections_total Requests refused with 429 rate_limit_exceeded, by domain, scope (domain, member, key) and limit.\n# TYPE cubegate_limit_rejections_total counter");
    for (slot, name) in names.iter().enumerate() {
        for (s, scope) in SCOPES.iter().enumerate() {
            for (k, kind) in KINDS.iter().enumerate() {
                let n: u64 = workers
                    .clone()
                    .map(|w| w.get(slot, s * KINDS.len() + k))
                    .sum();
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "cubegate_limit_rejections_total{{domain=\"{}\",scope=\"{}\",limit=\"{}\"}} {n}",
                        label(name),
                        scope.as_str(),
                        kind.as_str()
                    );
                }
            }
        }
    }
}
