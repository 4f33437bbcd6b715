//! One client connection: reads requests (head, Content-Length or chunked body) with
//! bounded sizes and timeouts, applies the fault mode (`hang` holds the request, `refuse`
//! closes the connection, `error` answers 503), asks the flavor for a [`Reply`] and hands
//! it to `answer.rs`. Serves `GET /sim/stats` itself, in every mode.

use super::answer::{self, hold_while_hanging, Request};
use super::http::{self, BodyKind, Echo, HeadError};
use super::socket::{read_more, sleep_watch, write};
use super::{ollama, vllm, Fault, Flavor, Reply, Shared};
use monoio::net::TcpStream;
use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

pub(super) async fn connection(mut stream: TcpStream, sh: Rc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4 * 1024);
    let lowercase = sh.cfg.flavor == Flavor::Vllm;
    loop {
        // Head.
        let (head, head_len) = loop {
            match http::parse_head(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(HeadError(status, why)) => {
                    let _ = bad_request(&mut stream, out, status, why, lowercase).await;
                    return;
                }
            }
            match read_more(&mut stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        buf.drain(..head_len);
        // Body.
        let kind = head.body.unwrap_or(BodyKind::None);
        if head.expect_continue && kind != BodyKind::None {
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            out = match write(&mut stream, out, 0).await {
                Ok(o) => o,
                Err(_) => return,
            };
        }
        let mut dechunked = Vec::new();
        let body_len = match kind {
            BodyKind::None => 0,
            BodyKind::Length(n) => {
                while buf.len() < n {
                    match read_more(&mut stream, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                n
            }
            BodyKind::Chunked => {
                let mut dec = http::Chunked::default();
                loop {
                    match dec.feed(&buf, &mut dechunked) {
                        Ok(used) => {
                            buf.drain(..used);
                        }
                        Err(HeadError(status, why)) => {
                            let _ = bad_request(&mut stream, out, status, why, lowercase).await;
                            return;
                        }
                    }
                    if dec.done() {
                        break;
                    }
                    match read_more(&mut stream, &mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                0
            }
        };
        let body: &[u8] = if kind == BodyKind::Chunked {
            &dechunked
        } else {
            &buf[..body_len]
        };
        // Answer.
        let is_stats = head.method == "GET" && head.path == "/sim/stats";
        let reply = if is_stats {
            Reply::json(200, sh.host.stats_json())
        } else {
            sh.host.stats.requests.fetch_add(1, Relaxed);
            if !hold_while_hanging(&stream, &sh.host).await {
                return;
            }
            match sh.host.fault() {
                Fault::Refuse => return,
                Fault::Error => match sh.cfg.flavor {
                    Flavor::Vllm => vllm::unavailable(),
                    Flavor::Ollama => ollama::unavailable(),
                },
                _ => route(&sh, &head.method, &head.path, body),
            }
        };
        buf.drain(..body_len);
        drop(dechunked);
        if let Some(ms) = head.stall_ms {
            if sleep_watch(&stream, Duration::from_millis(ms.min(3_600_000))).await {
                return;
            }
        }
        let req = Request {
            echo: Echo {
                request_id: head.request_id.as_deref(),
                domain_id: head.domain_id.as_deref(),
                saw_authorization: head.saw_authorization,
                lowercase,
            },
            is_head: head.method == "HEAD",
            keep_alive: head.keep_alive,
            die_after: head.die_after,
        };
        let res = answer::send(&mut stream, &sh, out, reply, &req).await;
        match res {
            Ok((o, true)) => out = o,
            _ => return,
        }
    }
}

fn route(sh: &Shared, method: &str, path: &str, body: &[u8]) -> Reply {
    match sh.cfg.flavor {
        Flavor::Vllm => vllm::route(&sh.cfg, &sh.host, method, path, body),
        Flavor::Ollama => ollama::route(&sh.cfg, &sh.host, method, path, body),
    }
}

async fn bad_request(
    stream: &mut TcpStream,
    mut out: Vec<u8>,
    status: u16,
    why: &str,
    lowercase: bool,
) -> io::Result<Vec<u8>> {
    let echo = Echo {
        request_id: None,
        domain_id: None,
        saw_authorization: false,
        lowercase,
    };
    out.clear();
    let body = format!("{} {}: {}\n", status, http::reason(status), why);
    http::write_head(
        &mut out,
        status,
        "text/plain; charset=utf-8",
        Some(body.len()),
        false,
        &echo,
    );
    out.extend_from_slice(body.as_bytes());
    write(stream, out, 0).await
}
