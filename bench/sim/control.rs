//! The control listener (`--control ADDR`): switches the fault mode and reports the
//! counters at run time, whatever the main port is doing (it is a plain thread with
//! blocking sockets, outside the simulator's runtimes, so `hang` and `refuse` never reach
//! it). One request per connection, answered with `Connection: close`:
//!
//! | request | answer |
//! |---|---|
//! | `PUT /fault/{none,refuse,hang,error,die-mid-stream,slow}` (or `POST`) | 200 `{"fault":"<mode>"}` once the mode holds (after `refuse` → `none` the port listens again) |
//! | `GET /fault` | 200 `{"fault":"<mode>"}` |
//! | `GET /stats` | 200 the `/sim/stats` JSON: requests, `by_status`, streams, `fault`, `running`, `waiting`, `prefix_cache_queries`, `prefix_cache_hits`, `kv_cache_usage`, `cached_blocks`, `queue_waits_over_100ms`, `prefills_over_100ms` |
//!
//! Anything else: 404 (unknown path or mode) or 405 (wrong method).

use super::fault::Fault;
use super::host::Host;
use super::http;
use super::text::json_str;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// A control client gets this long to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the control API on `listener` from a thread of its own; returns its address.
pub fn start(listener: TcpListener, host: Arc<Host>) -> io::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("sim-control".to_string())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &host);
            }
        })?;
    Ok(addr)
}

fn serve(mut stream: TcpStream, host: &Host) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head = loop {
        match http::parse_head(&buf) {
            Ok(Some((head, _))) => break head,
            Ok(None) => {}
            Err(http::HeadError(status, why)) => {
                return reply(
                    &mut stream,
                    status,
                    &format!("{{\"error\":{}}}", json_str(why)),
                );
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (status, body) = answer(host, &head.method, &head.path);
    reply(&mut stream, status, &body)
}

/// The control API's routes.
fn answer(host: &Host, method: &str, path: &str) -> (u16, String) {
    let mode = |f: Fault| (200, format!("{{\"fault\":\"{}\"}}", f.name()));
    match (method, path) {
        ("GET", "/stats") => (
            200,
            String::from_utf8_lossy(&host.stats_json()).into_owned(),
        ),
        ("GET", "/fault") => mode(host.fault()),
        ("PUT" | "POST", _) if path.starts_with("/fault/") => {
            match Fault::parse(&path["/fault/".len()..]) {
                Some(f) => {
                    host.fault.set(f);
                    mode(f)
                }
                None => (
                    404,
                    "{\"error\":\"unknown fault mode: use none, refuse, hang, error, die-mid-stream or slow\"}"
                        .to_string(),
                ),
            }
        }
        (_, "/stats" | "/fault") => (405, "{\"error\":\"method not allowed\"}".to_string()),
        _ if path.starts_with("/fault/") => (
            405,
            "{\"error\":\"method not allowed: use PUT\"}".to_string(),
        ),
        _ => (404, "{\"error\":\"not found\"}".to_string()),
    }
}

fn reply(stream: &mut TcpStream, status: u16, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        http::reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Config, Flavor, GpuConfig};

    fn host() -> Host {
        Host::new(&Config {
            flavor: Flavor::Vllm,
            listen: "127.0.0.1:0".to_string(),
            models: vec!["m".to_string()],
            tokens: 1,
            token_delay: Duration::ZERO,
            first_token_delay: Duration::ZERO,
            threads: 1,
            embed_dim: 1,
            gpu: GpuConfig::default(),
        })
    }

    #[test]
    fn routes() {
        let h = host();
        assert_eq!(answer(&h, "PUT", "/fault/slow").0, 200);
        assert_eq!(h.fault(), Fault::Slow);
        assert_eq!(answer(&h, "GET", "/fault").1, "{\"fault\":\"slow\"}");
        assert_eq!(answer(&h, "POST", "/fault/die-mid-stream").0, 200);
        assert_eq!(h.fault(), Fault::DieMidStream);
        assert_eq!(answer(&h, "PUT", "/fault/explode").0, 404);
        assert_eq!(answer(&h, "GET", "/fault/none").0, 405);
        assert_eq!(answer(&h, "DELETE", "/stats").0, 405);
        assert_eq!(answer(&h, "GET", "/nope").0, 404);
        let (status, stats) = answer(&h, "GET", "/stats");
        let v: serde_json::Value = serde_json::from_str(&stats).expect("json");
        assert_eq!((status, v["fault"].as_str()), (200, Some("die-mid-stream")));
    }
}
