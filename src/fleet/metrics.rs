//! The fleet's Prometheus series: each GPU host's state and load, and how requests were
//! placed. Read from the hosts' atomics at scrape time; nothing is kept for it.

use super::host::Host;
use super::policy::Placement;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

/// Appends the fleet's series to a scrape. `placements` are the workers' summed counts,
/// indexed by `Placement::index`; `moves` the prefix groups their balancers moved.
pub fn render(out: &mut String, hosts: &[std::sync::Arc<Host>], placements: &[u64], moves: u64) {
    let _ = writeln!(out, "# HELP cubegate_routing_placements_total How the first host of a request was chosen (prefix_hit: it served a longer prefix lately; consistent: the prefix's own host; rebalanced: its group's home, moved off its consistent host to even the hosts' request rates; spill: the hosts before it were over their share).\n# TYPE cubegate_routing_placements_total counter");
    for p in Placement::ALL {
        let n = placements.get(p.index()).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "cubegate_routing_placements_total{{placement=\"{}\"}} {n}",
            p.as_str()
        );
    }
    let _ = writeln!(out, "# HELP cubegate_routing_group_moves_total Prefix groups the box's balancer moved to another home to even the hosts' request rates.\n# TYPE cubegate_routing_group_moves_total counter\ncubegate_routing_group_moves_total {moves}");
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&Host) -> String,
    );
    let series: [Series; 7] = [
        (
            "cubegate_backend_up",
            "gauge",
            "1 while the GPU host is in rotation.",
            |h| u8::from(h.is_up()).to_string(),
        ),
        (
            "cubegate_backend_in_flight",
            "gauge",
            "Requests this box has in flight on the host.",
            |h| h.in_flight().to_string(),
        ),
        (
            "cubegate_backend_queued",
            "gauge",
            "Requests waiting in cubegate's queues with the host as their first choice.",
            |h| h.queued.load(Relaxed).to_string(),
        ),
        (
            "cubegate_backend_published_waiting",
            "gauge",
            "Requests waiting in the host's own queue at its last scrape (vLLM).",
            |h| h.published().waiting.to_string(),
        ),
        (
            "cubegate_backend_published_kv_cache_usage",
            "gauge",
            "The host's KV-cache use at its last scrape (vLLM), 0..1.",
            |h| h.published().kv_cache_usage.to_string(),
        ),
        (
            "cubegate_backend_ejections_total",
            "counter",
            "Times the host was taken out of rotation.",
            |h| h.ejections.load(Relaxed).to_string(),
        ),
        (
            "cubegate_backend_retries_total",
            "counter",
            "Requests that failed on the host before their first byte and were tried on another.",
            |h| h.retries.load(Relaxed).to_string(),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for h in hosts {
            let url = h.url.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "{name}{{backend=\"{url}\"}} {}", value(h));
        }
    }
}
