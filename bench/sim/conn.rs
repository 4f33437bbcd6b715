//! One client connection: reads requests (head, Content-Length or chunked body) with
//! bounded sizes and timeouts, asks the flavor for a [`Reply`], and writes it: a whole
//! body after the simulated generation time, or a stream one chunk per event with the
//! configured delays. Handles the test hooks (`x-sim-stall-ms`, `x-sim-die-after`) and
//! stops generating as soon as the client goes away, counting it in [`Stats`].

use super::http::{self, BodyKind, Echo, HeadError};
use super::{ollama, text, vllm, Config, Flavor, Reply, Shared, Stats, StreamFormat};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads more bytes onto the end of `buf`; Ok(0) = EOF.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let owned = std::mem::take(buf);
    let fut = stream.read(owned.slice_mut(len..));
    match monoio::time::timeout(IDLE_TIMEOUT, fut).await {
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            res
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
    }
}

/// Writes `buf[start..]` fully and hands the buffer back.
async fn write(stream: &mut TcpStream, buf: Vec<u8>, start: usize) -> io::Result<Vec<u8>> {
    match monoio::time::timeout(WRITE_TIMEOUT, stream.write_all(buf.slice(start..))).await {
        Ok((Ok(_), slice)) => Ok(slice.into_inner()),
        Ok((Err(e), _)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// True when the peer has closed or reset the connection (non-blocking peek).
fn peer_gone(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: valid fd owned by `stream`, valid 1-byte buffer.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        return true;
    }
    if n < 0 {
        let e = io::Error::last_os_error().kind();
        return !matches!(e, io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
    }
    false
}

/// Sleeps `d` in slices, watching for the peer going away. Returns true if it did.
async fn sleep_watch(stream: &TcpStream, d: Duration) -> bool {
    const SLICE: Duration = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() {
        if left >= Duration::from_millis(1) && peer_gone(stream) {
            return true;
        }
        let s = left.min(SLICE);
        monoio::time::sleep(s).await;
        left -= s;
    }
    false
}

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
        let reply = if head.method == "GET" && head.path == "/sim/stats" {
            Reply::json(200, sh.stats.json())
        } else {
            sh.stats.requests.fetch_add(1, Relaxed);
            match sh.cfg.flavor {
                Flavor::Vllm => vllm::route(&sh.cfg, &head.method, &head.path, body),
                Flavor::Ollama => ollama::route(&sh.cfg, &head.method, &head.path, body),
            }
        };
        buf.drain(..body_len);
        drop(dechunked);
        let echo = Echo {
            request_id: head.request_id.as_deref(),
            domain_id: head.domain_id.as_deref(),
            saw_authorization: head.saw_authorization,
            lowercase,
        };
        if let Some(ms) = head.stall_ms {
            if sleep_watch(&stream, Duration::from_millis(ms.min(3_600_000))).await {
                return;
            }
        }
        let keep_alive = head.keep_alive;
        let res = match reply {
            Reply::Full {
                status,
                content_type,
                body,
                gen,
            } => {
                if head.die_after.is_some() && gen > 0 {
                    // Hook on a non-streaming generation: the backend dies before answering.
                    return;
                }
                if gen > 0 && sleep_watch(&stream, generation_time(&sh.cfg, gen)).await {
                    return;
                }
                out.clear();
                http::write_head(
                    &mut out,
                    status,
                    content_type,
                    Some(body.len()),
                    keep_alive,
                    &echo,
                );
                if head.method != "HEAD" {
                    out.extend_from_slice(&body);
                }
                write(&mut stream, out, 0).await.map(|o| (o, keep_alive))
            }
            Reply::Stream { fmt, n } => {
                send_stream(
                    &mut stream,
                    &sh,
                    out,
                    &echo,
                    &*fmt,
                    n,
                    head.die_after,
                    keep_alive,
                )
                .await
            }
        };
        match res {
            Ok((o, true)) => out = o,
            _ => return,
        }
    }
}

fn generation_time(cfg: &Config, n: usize) -> Duration {
    cfg.first_token_delay + cfg.token_delay * (n.saturating_sub(1).min(u32::MAX as usize) as u32)
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

/// Decrements the active-streams gauge however the stream ends.
struct ActiveGuard<'a>(&'a Stats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Relaxed);
    }
}

/// Streams one answer. Ok((buf, keep_alive)) when the connection may continue.
#[allow(clippy::too_many_arguments)]
async fn send_stream(
    stream: &mut TcpStream,
    sh: &Shared,
    mut out: Vec<u8>,
    echo: &Echo<'_>,
    fmt: &dyn StreamFormat,
    n: usize,
    die_after: Option<u64>,
    keep_alive: bool,
) -> io::Result<(Vec<u8>, bool)> {
    let stats = &*sh.stats;
    stats.active_streams.fetch_add(1, Relaxed);
    let _guard = ActiveGuard(stats);
    let aborted = |e: io::Error| {
        stats.streams_aborted.fetch_add(1, Relaxed);
        e
    };
    let gone = || io::Error::new(io::ErrorKind::ConnectionAborted, "client went away");
    let died = || {
        stats.streams_died.fetch_add(1, Relaxed);
        io::Error::other("x-sim-die-after")
    };
    out.clear();
    http::write_head(&mut out, 200, fmt.content_type(), None, keep_alive, echo);
    out = write(stream, out, 0).await.map_err(aborted)?;
    if !sh.cfg.first_token_delay.is_zero() && sleep_watch(stream, sh.cfg.first_token_delay).await {
        return Err(aborted(gone()));
    }
    http::chunk_begin(&mut out);
    if fmt.open(&mut out) {
        let start = http::chunk_end(&mut out);
        out = write(stream, out, start).await.map_err(aborted)?;
    }
    let seed = fmt.seed();
    for i in 0..n {
        if die_after == Some(i as u64) {
            return Err(died());
        }
        if i > 0 && !sh.cfg.token_delay.is_zero() && sleep_watch(stream, sh.cfg.token_delay).await {
            return Err(aborted(gone()));
        }
        http::chunk_begin(&mut out);
        fmt.token(i, text::token(seed, i), &mut out);
        let start = http::chunk_end(&mut out);
        out = write(stream, out, start).await.map_err(aborted)?;
    }
    if die_after == Some(n as u64) {
        return Err(died());
    }
    let mut step = 0;
    loop {
        http::chunk_begin(&mut out);
        if !fmt.close(step, &mut out) {
            break;
        }
        let start = http::chunk_end(&mut out);
        out = write(stream, out, start).await.map_err(aborted)?;
        step += 1;
    }
    out.clear();
    out.extend_from_slice(b"0\r\n\r\n");
    out = write(stream, out, 0).await.map_err(aborted)?;
    stats.streams_completed.fetch_add(1, Relaxed);
    Ok((out, keep_alive))
}
