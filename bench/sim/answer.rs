//! Writing one answer: a whole body, or a stream one chunk per event. A generation
//! ([`Work`]) first runs on the GPU host: it waits for a slot in the batch (FIFO, the
//! client watched meanwhile), pays the prefill of its uncached prompt tokens, then takes
//! the configured first-token and per-token delays. The fault mode is read at each step,
//! so a switch at run time reaches the answers in flight: `hang` stalls them, `slow`
//! stretches the delays that follow, `die-mid-stream` cuts them.

use super::batch::Slot;
use super::fault::{Fault, DIE_AFTER_EVENTS};
use super::host::{Host, Running, Stats};
use super::http::{self, Echo};
use super::socket::{peer_gone, sleep_watch, write, WATCH_SLICE};
use super::{text, Reply, Shared, StreamFormat, Work};
use monoio::net::TcpStream;
use std::io;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// What the answer needs to know of its request.
pub(super) struct Request<'a> {
    pub echo: Echo<'a>,
    pub is_head: bool,
    pub keep_alive: bool,
    /// The `x-sim-die-after` test hook.
    pub die_after: Option<u64>,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "client went away")
}

/// Sends `reply`. Ok((buf, keep_alive)) when the connection may continue.
pub(super) async fn send(
    stream: &mut TcpStream,
    sh: &Shared,
    out: Vec<u8>,
    reply: Reply,
    req: &Request<'_>,
) -> io::Result<(Vec<u8>, bool)> {
    let host = &*sh.host;
    match reply {
        Reply::Full {
            status,
            content_type,
            body,
            work,
        } => {
            let cut = match work {
                Some(work) => generate_whole(stream, sh, &work, req).await?,
                None => false,
            };
            let whole = Whole {
                status,
                content_type,
                body: &body,
            };
            write_whole(stream, host, out, whole, req, cut).await
        }
        Reply::Stream { fmt, work } => {
            let running = run_on_gpu(stream, host, &work).await?;
            send_stream(stream, sh, out, &*fmt, running, work.output_tokens, req).await
        }
    }
}

/// Runs a whole answer's generation (queue, prefill, every token). Ok(true) when the
/// answer is to be cut (`die-mid-stream`).
async fn generate_whole(
    stream: &TcpStream,
    sh: &Shared,
    work: &Work,
    req: &Request<'_>,
) -> io::Result<bool> {
    let host = &*sh.host;
    if req.die_after.is_some() && work.output_tokens > 0 {
        // Hook on a non-streaming generation: the backend dies before answering.
        return Err(io::Error::other("x-sim-die-after"));
    }
    let running = run_on_gpu(stream, host, work).await?;
    let decode = generation_time(sh, work.output_tokens);
    if work.output_tokens > 0 && sleep_scaled(stream, host, decode).await {
        return Err(gone());
    }
    if !hold_while_hanging(stream, host).await {
        return Err(gone());
    }
    // Generated: the GPU is done with it before the answer leaves (as in vLLM, whose
    // engine finishes a request before the server sends it).
    drop(running);
    Ok(host.fault() == Fault::DieMidStream)
}

/// Waits for a slot, then runs the prefill. The returned [`Running`] holds the slot and
/// the prompt's blocks until it drops.
async fn run_on_gpu<'a>(
    stream: &TcpStream,
    host: &'a Host,
    work: &Work,
) -> io::Result<Running<'a>> {
    let arrived = Instant::now();
    let slot = match host.batch.try_admit() {
        Some(slot) => slot,
        None => wait_for_slot(stream, host).await?,
    };
    let queued = arrived.elapsed();
    let (mut running, prefill) = host.start(slot, &work.model, &work.prompt);
    host.stats.gpu_time(queued, prefill);
    if sleep_scaled(stream, host, prefill).await {
        return Err(gone());
    }
    running.prefilled();
    Ok(running)
}

/// Queues for a slot (FIFO), watching the client: one that leaves is taken out of the
/// queue (by dropping its admission).
async fn wait_for_slot<'a>(stream: &TcpStream, host: &'a Host) -> io::Result<Slot<'a>> {
    let mut admission = pin!(host.batch.admit());
    loop {
        match monoio::time::timeout(WATCH_SLICE, admission.as_mut()).await {
            Ok(slot) => return Ok(slot),
            Err(_) if peer_gone(stream) => return Err(gone()),
            Err(_) => {}
        }
    }
}

/// In `hang`, holds the request (watching its client) until the mode changes. False if
/// the client went away meanwhile.
pub(super) async fn hold_while_hanging(stream: &TcpStream, host: &Host) -> bool {
    while host.fault() == Fault::Hang {
        if sleep_watch(stream, WATCH_SLICE).await {
            return false;
        }
    }
    true
}

/// Sleeps `d`, stretched in `slow` mode; true if the client went away.
async fn sleep_scaled(stream: &TcpStream, host: &Host, d: Duration) -> bool {
    !d.is_zero() && sleep_watch(stream, d * host.fault.time_factor()).await
}

fn generation_time(sh: &Shared, n: usize) -> Duration {
    let cfg = &sh.cfg;
    cfg.first_token_delay + cfg.token_delay * (n.saturating_sub(1).min(u32::MAX as usize) as u32)
}

/// A whole answer's status, content type and body.
struct Whole<'b> {
    status: u16,
    content_type: &'b str,
    body: &'b [u8],
}

/// Writes a whole answer; `cut` (`die-mid-stream`) sends its head and half its body, and
/// the connection closes.
async fn write_whole(
    stream: &mut TcpStream,
    host: &Host,
    mut out: Vec<u8>,
    whole: Whole<'_>,
    req: &Request<'_>,
    cut: bool,
) -> io::Result<(Vec<u8>, bool)> {
    let Whole {
        status,
        content_type,
        body,
    } = whole;
    out.clear();
    // A cut answer dies unannounced: no `Connection: close`.
    let keep_alive = req.keep_alive || cut;
    let length = Some(body.len());
    http::write_head(
        &mut out,
        status,
        content_type,
        length,
        keep_alive,
        &req.echo,
    );
    if cut {
        out.extend_from_slice(&body[..body.len() / 2]);
    } else if !req.is_head {
        out.extend_from_slice(body);
    }
    host.stats.answered(status);
    let out = write(stream, out, 0).await?;
    if cut {
        host.stats.answers_cut.fetch_add(1, Relaxed);
        return Err(io::Error::other("die-mid-stream"));
    }
    Ok((out, req.keep_alive))
}

/// Decrements the active-streams gauge however the stream ends.
struct ActiveGuard<'a>(&'a Stats);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Relaxed);
    }
}

/// Streams one answer of `n` tokens; `running` (its place on the GPU) ends with its
/// last token, before the closing events.
async fn send_stream(
    stream: &mut TcpStream,
    sh: &Shared,
    mut out: Vec<u8>,
    fmt: &dyn StreamFormat,
    running: Running<'_>,
    n: usize,
    req: &Request<'_>,
) -> io::Result<(Vec<u8>, bool)> {
    let host = &*sh.host;
    let stats = &host.stats;
    stats.active_streams.fetch_add(1, Relaxed);
    let _guard = ActiveGuard(stats);
    let aborted = |e: io::Error| {
        stats.streams_aborted.fetch_add(1, Relaxed);
        e
    };
    let died = || {
        stats.streams_died.fetch_add(1, Relaxed);
        io::Error::other("the stream died")
    };
    // Dies here: the test hook's token, or a few events into `die-mid-stream`.
    let dies_at = |i: usize| {
        req.die_after == Some(i as u64)
            || (host.fault() == Fault::DieMidStream && (i >= DIE_AFTER_EVENTS || i == n))
    };
    out.clear();
    http::write_head(
        &mut out,
        200,
        fmt.content_type(),
        None,
        req.keep_alive,
        &req.echo,
    );
    stats.answered(200);
    out = write(stream, out, 0).await.map_err(aborted)?;
    if sleep_scaled(stream, host, sh.cfg.first_token_delay).await {
        return Err(aborted(gone()));
    }
    http::chunk_begin(&mut out);
    if fmt.open(&mut out) {
        let start = http::chunk_end(&mut out);
        out = write(stream, out, start).await.map_err(aborted)?;
    }
    let seed = fmt.seed();
    for i in 0..n {
        if !hold_while_hanging(stream, host).await {
            return Err(aborted(gone()));
        }
        if dies_at(i) {
            return Err(died());
        }
        if i > 0 && sleep_scaled(stream, host, sh.cfg.token_delay).await {
            return Err(aborted(gone()));
        }
        http::chunk_begin(&mut out);
        fmt.token(i, text::token(seed, i), &mut out);
        let start = http::chunk_end(&mut out);
        out = write(stream, out, start).await.map_err(aborted)?;
    }
    if dies_at(n) {
        return Err(died());
    }
    drop(running);
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
    Ok((out, req.keep_alive))
}
