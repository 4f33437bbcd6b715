//! Active health checks and load scrapes: a thread of their own, off the request path.
//!
//! Every `[health] interval_ms` each registered host is asked, all at once, within
//! `timeout_ms`: vLLM `GET /health` and then `GET /metrics` (its queue and KV-cache use),
//! Ollama `GET /api/version` (Ollama publishes no load; what this box has in flight there
//! is all routing knows). A failed or late check counts towards ejection, a good one
//! re-admits an ejected host once its backoff is over (see [`super::host`]). A host that
//! hangs is therefore out of rotation within about `interval + 2 × timeout`. Hosts that a
//! domain lists with `models = []` are also asked what they serve (vLLM `/v1/models`,
//! Ollama `/api/tags`), every round (once a second when checks are off).
//!
//! Everything a host sends is bounded (head, body, time) and parsed leniently: a metric
//! that is missing or malformed is just not known.

use super::host::Host;
use crate::config::BackendKind;
use crate::proxy::exchange::{exchange, Peer};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest answer read from a health or metrics endpoint.
const MAX_ANSWER: usize = 1 << 20;

#[derive(Clone)]
pub struct HealthSettings {
    /// 0 = no active checks (ejections then end when their backoff does).
    pub interval: Duration,
    pub timeout: Duration,
    /// How `https://` hosts are checked.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Starts the checker thread. It runs until the process ends.
pub fn start(settings: HealthSettings) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("cubegate-health".into())
        .spawn(move || {
            let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build();
            match runtime {
                Ok(mut rt) => rt.block_on(check_forever(settings)),
                Err(e) => tracing::error!("health checker could not start: {e}"),
            }
        })
        .map(|_| ())
}

async fn check_forever(settings: HealthSettings) {
    let tick = if settings.interval.is_zero() {
        Duration::from_millis(250)
    } else {
        settings.interval
    };
    let mut round: u64 = 0;
    loop {
        let started = Instant::now();
        round += 1;
        let hosts = super::hosts();
        if settings.interval.is_zero() {
            hosts.iter().for_each(|h| h.readmit_if_backoff_over());
            // Without health checks, hosts that report their models are still asked, once
            // a second.
            if round % 4 == 1 {
                let asks: Vec<_> = hosts
                    .into_iter()
                    .filter(|h| h.discovers())
                    .map(|h| monoio::spawn(discover_models(h, settings.clone())))
                    .collect();
                for a in asks {
                    a.await;
                }
            }
        } else {
            let checks: Vec<_> = hosts
                .into_iter()
                .map(|h| monoio::spawn(check_host(h, settings.clone())))
                .collect();
            for c in checks {
                c.await;
            }
        }
        monoio::time::sleep(tick.saturating_sub(started.elapsed())).await;
    }
}

/// One round for one host: its health endpoint, then (vLLM) its load.
async fn check_host(host: Arc<Host>, settings: HealthSettings) {
    let path = match host.kind {
        BackendKind::Vllm => "/health",
        BackendKind::Ollama => "/api/version",
    };
    let ok = matches!(get(&host, path, &settings).await, Ok((200..=299, _)));
    host.record_check(ok);
    if ok && host.discovers() {
        discover_models(host.clone(), settings.clone()).await;
    }
    if ok && host.kind == BackendKind::Vllm {
        if let Ok((200..=299, body)) = get(&host, "/metrics", &settings).await {
            let load = parse_vllm_metrics(&body);
            host.record_scrape(load.running, load.waiting, load.kv_cache_usage);
        }
    }
}

/// Asks a host what it serves (vLLM `GET /v1/models`, Ollama `GET /api/tags`) and keeps
/// the answer; an answer that cannot be read keeps the last list.
async fn discover_models(host: Arc<Host>, settings: HealthSettings) {
    let path = match host.kind {
        BackendKind::Vllm => "/v1/models",
        BackendKind::Ollama => "/api/tags",
    };
    if let Ok((200..=299, body)) = get(&host, path, &settings).await {
        match parse_model_list(host.kind, &body) {
            Some(models) => {
                host.record_models(models);
            }
            None => tracing::warn!(host = %host.url, "could not read the host's model list"),
        }
    }
}

/// Most models one host may report (a longer list is cut).
const MAX_MODELS: usize = 1024;

/// The model names of a `/v1/models` (`data[].id`) or `/api/tags` (`models[].name`)
/// answer. Names that are not valid model names are skipped; `None` if the shape is wrong.
pub fn parse_model_list(kind: BackendKind, body: &[u8]) -> Option<Vec<String>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let (list, field) = match kind {
        BackendKind::Vllm => (value.get("data")?.as_array()?, "id"),
        BackendKind::Ollama => (value.get("models")?.as_array()?, "name"),
    };
    Some(
        list.iter()
            .filter_map(|m| m.get(field)?.as_str())
            .filter(|m| crate::config::is_valid_model_name(m))
            .take(MAX_MODELS)
            .map(str::to_string)
            .collect(),
    )
}

/// `GET path` on its own connection, the whole exchange within the timeout.
async fn get(host: &Host, path: &str, settings: &HealthSettings) -> Result<(u16, Vec<u8>), ()> {
    let peer = Peer {
        addr: host.addr,
        tls_name: host.tls.as_ref(),
        tls_config: settings.tls.as_ref(),
    };
    let request = format!(
        "GET {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cubegate-health\r\nConnection: close\r\n\r\n",
        host.base_path, host.authority
    );
    exchange(&peer, request.into_bytes(), MAX_ANSWER, settings.timeout)
        .await
        .map_err(|_| ())
}

/// What a vLLM `/metrics` page says about the host's load.
#[derive(Debug, Default, PartialEq)]
pub struct VllmLoad {
    pub running: u32,
    pub waiting: u32,
    pub kv_cache_usage: f32,
}

/// Reads the queue and KV-cache gauges out of Prometheus text, summed (queues) or maxed
/// (KV use) over the models a host serves. Anything unreadable is skipped.
pub fn parse_vllm_metrics(text: &[u8]) -> VllmLoad {
    let mut load = VllmLoad::default();
    let text = String::from_utf8_lossy(text);
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(value) = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        let count = value.min(u32::MAX as f64) as u32;
        match name {
            "vllm:num_requests_running" => load.running = load.running.saturating_add(count),
            "vllm:num_requests_waiting" => load.waiting = load.waiting.saturating_add(count),
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                load.kv_cache_usage = load.kv_cache_usage.max(value.min(1.0) as f32)
            }
            _ => {}
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_lists_of_both_flavors() {
        let vllm = br#"{"object":"list","data":[{"id":"a"},{"id":"b\"x"},{"id":7},{"id":"c"}]}"#;
        assert_eq!(
            parse_model_list(BackendKind::Vllm, vllm),
            Some(vec!["a".to_string(), "c".to_string()])
        );
        let ollama = br#"{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b"}]}"#;
        assert_eq!(
            parse_model_list(BackendKind::Ollama, ollama),
            Some(vec!["llama3.2:1b".to_string()])
        );
        assert_eq!(parse_model_list(BackendKind::Vllm, b"{\"data\":5}"), None);
        assert_eq!(parse_model_list(BackendKind::Ollama, b"not json"), None);
    }

    #[test]
    fn reads_vllm_gauges_and_skips_junk() {
        let page = b"# HELP vllm:num_requests_running Number of requests\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"a\"} 3.0\n\
vllm:num_requests_running{model_name=\"b\"} 1\n\
vllm:num_requests_waiting{model_name=\"a\"} 7\n\
vllm:kv_cache_usage_perc{model_name=\"a\"} 0.42\n\
vllm:num_requests_waiting{model_name=\"b\"} NaN\n\
vllm:num_requests_waiting{model_name=\"c\"} -4\n\
vllm:prefix_cache_hits_total{model_name=\"a\"} 1e9\n\
garbage line without value\n";
        let load = parse_vllm_metrics(page);
        assert_eq!(load.running, 4);
        assert_eq!(load.waiting, 7);
        assert!((load.kv_cache_usage - 0.42).abs() < 1e-6);
        assert_eq!(parse_vllm_metrics(b"\xff\xfe\x00"), VllmLoad::default());
    }
}
