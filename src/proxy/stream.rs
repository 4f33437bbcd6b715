//! Phase `stream_response`: the backend's answer to the client, as it arrives.
//!
//! Every read from the backend is written to the client before the next read is issued:
//! nothing is buffered, so a token reaches the client one read after the GPU produced it.
//! Chunked answers are forwarded byte for byte (the tracker only finds their end).
//!
//! While the answer is awaited and streamed, a read is kept in flight on the client socket
//! (the "client watch"). If the client goes away it completes with EOF or an error at once,
//! and the backend connection is dropped, so the GPU stops generating for nobody. If it
//! completes with data instead (a pipelined request), the data is kept for later. At the end
//! the watch is cancelled through monoio's `Canceller`, which returns any data that raced
//! the cancellation instead of losing it.

use super::body::BodyTracker;
use super::conn::{ClientConn, RequestLog};
use super::error::GatewayError;
use super::io::{ClientWrite, OutBuf};
use super::splice::splice_exact;
use super::upstream::Upstream;
use super::{RequestId, Worker};
use crate::http::head::Method;
use crate::http::response::{
    client_framing, parse_response_head, write_client_head, ClientFraming, ResponseFraming,
};
use futures_util::future::{select, Either};
use monoio::buf::IoBuf;
use monoio::io::Canceller;
use monoio::BufResult;
use std::future::Future;
use std::pin::{pin, Pin};
use std::time::{Duration, Instant};

const READ_SIZE: usize = 16 * 1024;

pub enum StreamEnd {
    Complete {
        upstream_reusable: bool,
        client_keep_alive: bool,
    },
    /// Cut short after the head was sent (client gone, backend died, timeout): the client
    /// connection closes.
    Aborted,
}

pub enum StreamError {
    /// The backend closed or reset before sending a byte of its answer.
    NothingReceived,
    /// Failed before anything was sent to the client: answer with this error.
    Gateway(GatewayError),
}

enum UpRead {
    Data,
    Eof,
    Failed,
    TimedOut,
    ClientGone,
}

/// The client watch: a read kept in flight on the client socket.
struct Watch<'a, W> {
    fut: Option<Pin<&'a mut W>>,
    saved: Option<(usize, Vec<u8>)>,
    /// The watch read has been submitted. It is armed only once the backend keeps us
    /// waiting longer than `WATCH_GRACE`: a quick answer needs no watch (and saves the
    /// read and its cancellation, two io_uring operations per request).
    armed: bool,
}

const WATCH_BUF: usize = 1024;

/// How long a backend may keep the client waiting before the client watch is armed.
const WATCH_GRACE: Duration = Duration::from_millis(20);

pub async fn stream_response(
    worker: &Worker,
    conn: &mut ClientConn,
    up: &mut Upstream,
    request_id: &RequestId,
) -> Result<StreamEnd, StreamError> {
    worker.metrics.streams.up();
    let canceller = Canceller::new();
    // Small: it only has to show that the client is alive or gone (pipelined bytes
    // beyond it stay in the socket for the next head read).
    let watch_buf = Vec::with_capacity(WATCH_BUF);
    // A client already far ahead with pipelined requests is alive and needs no watch; not
    // arming it also keeps the backlog from growing by a read per request.
    let arm_watch = conn.pending_bytes() < worker.limits.max_head_bytes;
    let ClientConn {
        rd,
        wr,
        rbuf,
        head,
        out,
        log,
        ..
    } = conn;
    let watch_fut = pin!(rd.cancelable_read_more(watch_buf, WATCH_BUF, canceller.handle()));
    let mut watch = Watch {
        fut: arm_watch.then_some(watch_fut),
        saved: None,
        armed: false,
    };
    let is_head = head.method == Method::Head;
    let client_minor = head.minor_version;
    let client_wants_keep_alive = head.keep_alive;
    let result = relay(
        worker,
        up,
        &mut watch,
        wr,
        out,
        request_id,
        is_head,
        client_minor,
        client_wants_keep_alive,
        log,
    )
    .await;
    // Stop watching; keep whatever the client sent meanwhile (a pipelined request).
    if let Some(fut) = watch.fut.take() {
        let _ = canceller.cancel();
        let (res, buf) = fut.await;
        // Ok(0) (the client half-closed) needs nothing here: the next head read sees EOF.
        match res {
            Ok(n) if n > 0 => watch.saved = Some((n, buf)),
            _ => {}
        }
    }
    if let Some((n, buf)) = watch.saved {
        rbuf.extend_from_slice(&buf[..n]);
    }
    worker.metrics.streams.down();
    result
}

#[allow(clippy::too_many_arguments)]
async fn relay<W>(
    worker: &Worker,
    up: &mut Upstream,
    watch: &mut Watch<'_, W>,
    wr: &mut ClientWrite,
    out: &mut Vec<u8>,
    request_id: &RequestId,
    is_head: bool,
    client_minor: u8,
    client_wants_keep_alive: bool,
    log: &mut RequestLog,
) -> Result<StreamEnd, StreamError>
where
    W: Future<Output = BufResult<usize, Vec<u8>>>,
{
    let limits = &worker.limits;
    let mut pooled = worker.buffer();
    let ubuf = &mut pooled.buf;
    let deadline = Instant::now() + worker.timeouts.first_byte();
    // Any byte at all (even an interim 1xx) means the backend took the request.
    let mut received_any = false;

    // The response head (skipping interim 1xx answers).
    let head = loop {
        if !ubuf.is_empty() {
            match parse_response_head(ubuf, limits.max_upstream_head_bytes, is_head) {
                Err(why) => {
                    return Err(StreamError::Gateway(GatewayError::UpstreamBadResponse(why)))
                }
                Ok(Some(h)) if h.status == 101 => {
                    return Err(StreamError::Gateway(GatewayError::UpstreamBadResponse(
                        "protocol upgrades are not proxied",
                    )))
                }
                Ok(Some(h)) if (100..200).contains(&h.status) => {
                    ubuf.drain(..h.len);
                    continue;
                }
                Ok(Some(h)) => break h,
                Ok(None) => {}
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let (r, buf) = read_upstream(up, std::mem::take(ubuf), left, watch).await;
        *ubuf = buf;
        match r {
            UpRead::Data => received_any = true,
            UpRead::Eof | UpRead::Failed if !received_any => {
                return Err(StreamError::NothingReceived)
            }
            UpRead::Eof | UpRead::Failed => {
                return Err(StreamError::Gateway(GatewayError::UpstreamBadResponse(
                    "connection closed inside the response head",
                )))
            }
            UpRead::TimedOut => {
                return Err(StreamError::Gateway(GatewayError::UpstreamFirstByteTimeout))
            }
            UpRead::ClientGone => return Ok(StreamEnd::Aborted),
        }
    };

    let framing = client_framing(head.framing, client_minor);
    let client_keep_alive = client_wants_keep_alive && framing != ClientFraming::Close;
    out.clear();
    write_client_head(
        out,
        ubuf,
        &head,
        framing,
        request_id.as_bytes(),
        client_keep_alive,
    );
    let mut tracker = match head.framing {
        ResponseFraming::None => None,
        ResponseFraming::Length(n) => Some(BodyTracker::length(n)),
        ResponseFraming::Chunked => Some(BodyTracker::chunked()),
        ResponseFraming::UntilClose => Some(BodyTracker::UntilClose),
    };
    let decode = framing == ClientFraming::Close && head.framing == ResponseFraming::Chunked;
    let backend_keep_alive = head.keep_alive;
    let status = head.status;
    let head_len = head.len;
    drop(head);

    // Body bytes that came with the head go out in the same write as the client head.
    let mut extra = false;
    let rest = &ubuf[head_len..];
    match tracker.as_mut() {
        Some(t) => {
            let used = track(t, rest, decode, out).map_err(StreamError::Gateway)?;
            if !decode {
                out.extend_from_slice(&rest[..used]);
            }
            extra = used < rest.len();
        }
        None => extra |= !rest.is_empty(),
    }
    let between = worker.timeouts.between_chunks();
    log.status = status;
    let sent = out.len() as u64;
    let Some(back) = write_client(wr, std::mem::take(out), between).await else {
        return Ok(StreamEnd::Aborted);
    };
    *out = back;
    log.first_byte = log.started.map(|s| s.elapsed());
    log.bytes += sent;

    // A plain Content-Length answer needs no look at its bytes: splice it when enabled.
    if let Some(BodyTracker::Length { remaining }) = tracker.as_mut() {
        let plain = (worker.splice && !decode && *remaining > 0)
            .then(|| up.stream.plain_mut().zip(wr.plain()))
            .flatten();
        if let Some((up_plain, wr)) = plain {
            let Some(mut pipe) = worker.take_pipe() else {
                return Ok(StreamEnd::Aborted);
            };
            if splice_exact(up_plain, wr, &mut pipe, *remaining, between)
                .await
                .is_err()
            {
                return Ok(StreamEnd::Aborted);
            }
            worker.return_pipe(pipe);
            log.bytes += *remaining;
            *remaining = 0;
        }
    }

    // The rest of the body, one read at a time.
    while let Some(t) = tracker.as_mut() {
        if t.is_done() {
            break;
        }
        ubuf.clear();
        let (r, buf) = read_upstream(up, std::mem::take(ubuf), between, watch).await;
        *ubuf = buf;
        match r {
            UpRead::Data => {}
            UpRead::Eof if matches!(t, BodyTracker::UntilClose) => break,
            // Backend died or stalled mid-answer: close the client connection without a
            // terminating chunk, so the client sees a truncated answer, not a complete one.
            UpRead::Eof | UpRead::Failed | UpRead::TimedOut => {
                tracing::warn!(
                    request_id = request_id.as_str(),
                    "backend ended the answer early"
                );
                return Ok(StreamEnd::Aborted);
            }
            UpRead::ClientGone => return Ok(StreamEnd::Aborted),
        }
        out.clear();
        let Ok(used) = track(t, ubuf, decode, out) else {
            // Broken framing mid-answer: the head is out, so all we can do is stop.
            return Ok(StreamEnd::Aborted);
        };
        extra |= used < ubuf.len();
        if decode {
            let sent = out.len() as u64;
            let Some(back) = write_client(wr, std::mem::take(out), between).await else {
                return Ok(StreamEnd::Aborted);
            };
            *out = back;
            log.bytes += sent;
        } else {
            let Some(back) = write_client(wr, std::mem::take(ubuf).slice(..used), between).await
            else {
                return Ok(StreamEnd::Aborted);
            };
            *ubuf = back.into_inner();
            log.bytes += used as u64;
        }
    }
    let until_close = matches!(tracker, Some(BodyTracker::UntilClose));
    Ok(StreamEnd::Complete {
        upstream_reusable: backend_keep_alive && !extra && !until_close,
        client_keep_alive,
    })
}

/// Runs body bytes through the tracker; returns how many belong to the body. When
/// decoding (HTTP/1.0 client of a chunked answer) the payload is appended to `out`.
fn track(
    t: &mut BodyTracker,
    input: &[u8],
    decode: bool,
    out: &mut Vec<u8>,
) -> Result<usize, GatewayError> {
    t.feed(input, u64::MAX, |payload| {
        if decode {
            out.extend_from_slice(payload)
        }
    })
    .map_err(|_| GatewayError::UpstreamBadResponse("bad chunked framing"))
}

/// One read from the backend, racing the client watch.
async fn read_upstream<W>(
    up: &mut Upstream,
    buf: Vec<u8>,
    limit: Duration,
    watch: &mut Watch<'_, W>,
) -> (UpRead, Vec<u8>)
where
    W: Future<Output = BufResult<usize, Vec<u8>>>,
{
    let mut read = pin!(monoio::time::timeout(
        limit,
        up.stream.read_more(buf, READ_SIZE)
    ));
    if watch.fut.is_some() && !watch.armed {
        // Give the backend a moment before arming the watch; the read stays in flight
        // either way (select hands back the unfinished future, nothing is cancelled).
        let grace = pin!(monoio::time::sleep(WATCH_GRACE));
        match select(read.as_mut(), grace).await {
            Either::Left((r, _)) => return up_read(r),
            Either::Right(((), _)) => watch.armed = true,
        }
    }
    let result = match watch.fut.as_mut() {
        None => read.await,
        Some(w) => match select(read, w.as_mut()).await {
            Either::Left((r, _)) => r,
            Either::Right(((res, wbuf), read)) => {
                watch.fut = None;
                match res {
                    Ok(n) if n > 0 => {
                        watch.saved = Some((n, wbuf));
                        read.await
                    }
                    // EOF or reset from the client: it is gone. Dropping the pending
                    // read (and then the connection) tells the backend to stop.
                    _ => return (UpRead::ClientGone, Vec::new()),
                }
            }
        },
    };
    up_read(result)
}

fn up_read(
    result: Result<BufResult<usize, Vec<u8>>, monoio::time::error::Elapsed>,
) -> (UpRead, Vec<u8>) {
    match result {
        Ok((Ok(0), b)) => (UpRead::Eof, b),
        Ok((Ok(_), b)) => (UpRead::Data, b),
        Ok((Err(_), b)) => (UpRead::Failed, b),
        Err(_) => (UpRead::TimedOut, Vec::new()),
    }
}

/// Writes to the client with a timeout: a client that stops reading is treated as gone.
/// `None` = the write failed or timed out.
async fn write_client<B: OutBuf>(wr: &mut ClientWrite, buf: B, limit: Duration) -> Option<B> {
    if buf.bytes_init() == 0 {
        return Some(buf);
    }
    match monoio::time::timeout(limit, wr.write_all(buf)).await {
        Ok((Ok(_), buf)) => Some(buf),
        _ => None,
    }
}
