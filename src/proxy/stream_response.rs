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
//! the cancellation instead of losing it. One read of the answer racing the watch, and the
//! buffer it reads into, are in [`super::read_answer`].

use super::answer_tap::AnswerTap;
use super::body::BodyTracker;
use super::connection::{write_within, Connection};
use super::error::GatewayError;
use super::io::ClientWrite;
use super::pool::Upstream;
use super::read_answer::{read_upstream, size_next_read, UpRead, Watch, WATCH_BUF};
use super::request::{Metering, Persistence, Request};
use super::splice::splice_exact;
use super::worker::{Worker, SMALL_BUFFER_SIZE};
use crate::fleet::host::Host;
use crate::http::head::Method;
use crate::http::response::{
    client_framing, parse_response_head, write_client_head, ClientFraming, ResponseFraming,
    ResponseHead,
};
use monoio::buf::IoBuf;
use monoio::io::Canceller;
use monoio::BufResult;
use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

pub enum StreamEnd {
    Complete {
        upstream_reusable: bool,
        client: Persistence,
    },
    /// Cut short after the head was sent (client gone, backend died, timeout): the client
    /// connection closes.
    Aborted,
}

pub enum StreamError {
    /// The backend closed or reset before sending a byte of its answer.
    NothingReceived,
    /// The host was taken out of rotation before it sent a byte (it hangs).
    HostEjected,
    /// The host answered 502 or 503 (nothing was passed on: another host may serve it).
    Unavailable(u16),
    /// Failed before anything was sent to the client: answer with this error.
    Gateway(GatewayError),
}

/// What the caller can still do if this host fails before its first byte.
#[derive(Clone, Copy)]
pub struct Fallback<'a> {
    /// The GPU host, watched for ejection while its first byte is awaited.
    pub host: Option<&'a Host>,
    /// Another host could take the request: a 502/503 answer is not passed on.
    pub retry_unavailable: bool,
}

pub async fn stream_response(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    up: &mut Upstream,
    fallback: Fallback<'_>,
    metering: Metering,
) -> Result<StreamEnd, StreamError> {
    worker.metrics.streams.up();
    let canceller = Canceller::new();
    // Small: it only has to show that the client is alive or gone (pipelined bytes
    // beyond it stay in the socket for the next head read).
    // Allocated by the read itself, once armed: a quick answer allocates nothing.
    let watch_buf = Vec::new();
    // A client already far ahead with pipelined requests is alive and needs no watch; not
    // arming it also keeps the backlog from growing by a read per request.
    let arm_watch = conn.pending_bytes(req.consumed) < worker.limits.max_head_bytes;
    let mut scratch = conn.take_scratch();
    let result = {
        let (rd, wr, rbuf) = conn.split();
        let watch_fut = pin!(rd.cancelable_read_more(watch_buf, WATCH_BUF, canceller.handle()));
        let mut relay = Relay {
            worker,
            up,
            watch: Watch {
                fut: arm_watch.then_some(watch_fut),
                saved: None,
                armed: false,
                client_buf: rbuf,
            },
            wr,
            out: &mut scratch,
            req,
            between: worker.timeouts.between_chunks(),
            fallback,
            tap: AnswerTap::new(metering),
        };
        let result = relay.run().await;
        let mut watch = relay.watch;
        let rbuf = watch.client_buf;
        // Stop watching; keep whatever the client sent meanwhile (a pipelined request).
        if let Some(fut) = watch.fut.take() {
            let _ = canceller.cancel();
            let (res, buf) = fut.await;
            // Ok(0) (the client half-closed) needs nothing here: the next head read sees
            // EOF.
            match res {
                Ok(n) if n > 0 => watch.saved = Some((n, buf)),
                _ => {}
            }
        }
        if let Some((n, buf)) = watch.saved {
            rbuf.extend_from_slice(&buf[..n]);
        }
        result
    };
    conn.return_scratch(scratch);
    worker.metrics.streams.down();
    result
}

/// One answer on its way from a backend to the client.
struct Relay<'a, W> {
    worker: &'a Worker,
    up: &'a mut Upstream,
    watch: Watch<'a, W>,
    wr: &'a mut ClientWrite,
    /// Scratch for the client head (and decoded payload).
    out: &'a mut Vec<u8>,
    req: &'a mut Request,
    /// The limit of every wait after the first byte.
    between: Duration,
    fallback: Fallback<'a>,
    /// The meter and the usage filter.
    tap: AnswerTap,
}

/// What the head step learned that the body steps need.
struct Answer {
    tracker: Option<BodyTracker>,
    /// Chunked from the backend, delimited by close to an HTTP/1.0 client: the payload
    /// is decoded on the way.
    decode: bool,
    backend_keep_alive: bool,
    client: Persistence,
    /// The backend sent bytes past the answer's end: its connection is not reusable.
    extra: bool,
}

/// How a step ends the relay early.
enum Stop {
    /// Cut short after the head was sent: the client connection closes.
    Aborted,
    Failed(StreamError),
}

impl From<StreamError> for Stop {
    fn from(e: StreamError) -> Stop {
        Stop::Failed(e)
    }
}

impl<W> Relay<'_, W>
where
    W: Future<Output = BufResult<usize, Vec<u8>>>,
{
    async fn run(&mut self) -> Result<StreamEnd, StreamError> {
        let mut read_buf = self.worker.take_small_buffer();
        let ubuf = &mut read_buf;
        let steps = async {
            let head = self.read_response_head(ubuf).await?;
            let mut answer = self.send_response_head(ubuf, &head).await?;
            self.splice_response_body(&mut answer).await?;
            self.relay_response_body(ubuf, &mut answer).await?;
            Ok::<_, Stop>(answer)
        };
        let result = steps.await;
        self.worker.recycle(read_buf);
        if let (Some(usage), Ok(_) | Err(Stop::Aborted)) = (self.tap.usage(), &result) {
            self.req.record.usage = Some(usage);
        }
        match result {
            Ok(answer) => {
                let until_close = matches!(answer.tracker, Some(BodyTracker::UntilClose));
                Ok(StreamEnd::Complete {
                    upstream_reusable: answer.backend_keep_alive && !answer.extra && !until_close,
                    client: answer.client,
                })
            }
            Err(Stop::Aborted) => Ok(StreamEnd::Aborted),
            Err(Stop::Failed(e)) => Err(e),
        }
    }

    /// Step 1: the response head, skipping interim 1xx answers, within the first-byte
    /// timeout. The head stays at the start of `ubuf`, body bytes may follow it.
    async fn read_response_head(&mut self, ubuf: &mut Vec<u8>) -> Result<ResponseHead, Stop> {
        let is_head = self.req.head.method == Method::Head;
        let max = self.worker.limits.max_upstream_head_bytes;
        let deadline = Instant::now() + self.worker.timeouts.first_byte();
        let bad = |why| Stop::Failed(StreamError::Gateway(GatewayError::UpstreamBadResponse(why)));
        // Any byte at all (even an interim 1xx) means the backend took the request.
        let mut received_any = false;
        loop {
            if !ubuf.is_empty() {
                match parse_response_head(ubuf, max, is_head) {
                    Err(why) => return Err(bad(why)),
                    Ok(Some(h)) if h.status == 101 => {
                        return Err(bad("protocol upgrades are not proxied"))
                    }
                    Ok(Some(h)) if (100..200).contains(&h.status) => {
                        ubuf.drain(..h.len);
                        continue;
                    }
                    Ok(Some(h))
                        if matches!(h.status, 502 | 503) && self.fallback.retry_unavailable =>
                    {
                        return Err(StreamError::Unavailable(h.status).into())
                    }
                    Ok(Some(h)) => return Ok(h),
                    Ok(None) => {}
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let host = self.fallback.host;
            let (r, buf) = read_upstream(
                self.up,
                std::mem::take(ubuf),
                SMALL_BUFFER_SIZE,
                left,
                &mut self.watch,
                host,
            )
            .await;
            *ubuf = buf;
            match r {
                UpRead::Data => received_any = true,
                UpRead::Eof | UpRead::Failed if !received_any => {
                    return Err(StreamError::NothingReceived.into())
                }
                UpRead::Eof | UpRead::Failed => {
                    return Err(bad("connection closed inside the response head"))
                }
                UpRead::TimedOut => {
                    return Err(StreamError::Gateway(GatewayError::UpstreamFirstByteTimeout).into())
                }
                UpRead::ClientGone => return Err(Stop::Aborted),
                UpRead::HostEjected => return Err(StreamError::HostEjected.into()),
            }
        }
    }

    /// Step 2: the client's head, with the body bytes that came with the backend's head
    /// in the same write. From here on nothing can be answered with an error any more.
    async fn send_response_head(
        &mut self,
        ubuf: &[u8],
        head: &ResponseHead,
    ) -> Result<Answer, Stop> {
        let framing = client_framing(head.framing, self.req.head.minor_version);
        let client_keep_alive = self.req.head.keep_alive && framing != ClientFraming::Close;
        self.out.clear();
        let mut rate = Vec::new();
        if let Some(a) = &self.req.admission {
            a.headers().write(&mut rate);
        }
        write_client_head(
            self.out,
            ubuf,
            head,
            framing,
            self.req.id.as_bytes(),
            client_keep_alive,
            &rate,
        );
        let mut answer = Answer {
            tracker: match head.framing {
                ResponseFraming::None => None,
                ResponseFraming::Length(n) => Some(BodyTracker::length(n)),
                ResponseFraming::Chunked => Some(BodyTracker::chunked()),
                ResponseFraming::UntilClose => Some(BodyTracker::UntilClose),
            },
            decode: framing == ClientFraming::Close && head.framing == ResponseFraming::Chunked,
            backend_keep_alive: head.keep_alive,
            client: Persistence::when(client_keep_alive),
            extra: false,
        };
        self.tap
            .start(ubuf, head, framing == ClientFraming::Chunked);
        let rest = &ubuf[head.len..];
        match answer.tracker.as_mut() {
            Some(t) => {
                let used = self
                    .track(t, rest, answer.decode)
                    .map_err(StreamError::Gateway)?;
                if self.tap.filters() {
                    self.tap.pass(t.is_done(), self.out);
                } else if !answer.decode {
                    self.out.extend_from_slice(&rest[..used]);
                }
                answer.extra = used < rest.len();
            }
            None => answer.extra = !rest.is_empty(),
        }
        self.req.record.status = head.status;
        let sent = self.out.len() as u64;
        let out = std::mem::take(self.out);
        let Some(back) = write_within(self.wr, out, self.between).await else {
            return Err(Stop::Aborted);
        };
        *self.out = back;
        self.req.record.first_byte = Some(self.req.started.elapsed());
        self.req.record.bytes += sent;
        Ok(answer)
    }

    /// Step 3: a plain Content-Length answer needs no look at its bytes: spliced
    /// socket to socket when enabled.
    async fn splice_response_body(&mut self, answer: &mut Answer) -> Result<(), Stop> {
        let Some(BodyTracker::Length { remaining }) = answer.tracker.as_mut() else {
            return Ok(());
        };
        let worker = self.worker;
        let plain = (worker.splice && !answer.decode && *remaining > 0 && !self.tap.metered())
            .then(|| self.up.stream.plain_mut().zip(self.wr.plain()))
            .flatten();
        let Some((up_plain, wr)) = plain else {
            return Ok(());
        };
        let mut pipe = worker.take_pipe().ok_or(Stop::Aborted)?;
        if splice_exact(up_plain, wr, &mut pipe, *remaining, self.between)
            .await
            .is_err()
        {
            return Err(Stop::Aborted);
        }
        worker.return_pipe(pipe);
        self.req.record.bytes += *remaining;
        *remaining = 0;
        Ok(())
    }

    /// Step 4: the rest of the body, one read at a time, each written out before the
    /// next read is issued.
    async fn relay_response_body(
        &mut self,
        ubuf: &mut Vec<u8>,
        answer: &mut Answer,
    ) -> Result<(), Stop> {
        while let Some(t) = answer.tracker.as_mut() {
            if t.is_done() {
                break;
            }
            let want = size_next_read(self.worker, ubuf);
            let (r, buf) = read_upstream(
                self.up,
                std::mem::take(ubuf),
                want,
                self.between,
                &mut self.watch,
                None,
            )
            .await;
            *ubuf = buf;
            match r {
                UpRead::Data => {}
                UpRead::Eof if matches!(t, BodyTracker::UntilClose) => break,
                // Backend died or stalled mid-answer: close the client connection without
                // a terminating chunk, so the client sees a truncated answer, not a
                // complete one.
                UpRead::Eof | UpRead::Failed | UpRead::TimedOut | UpRead::HostEjected => {
                    tracing::warn!(
                        request_id = self.req.id.as_str(),
                        "backend ended the answer early"
                    );
                    return Err(Stop::Aborted);
                }
                UpRead::ClientGone => return Err(Stop::Aborted),
            }
            self.out.clear();
            // Broken framing mid-answer: the head is out, so all we can do is stop.
            let used = self
                .track(t, ubuf, answer.decode)
                .map_err(|_| Stop::Aborted)?;
            answer.extra |= used < ubuf.len();
            if self.tap.filters() {
                self.tap.pass(t.is_done(), self.out);
            }
            if answer.decode || self.tap.filters() {
                let sent = self.out.len() as u64;
                let out = std::mem::take(self.out);
                *self.out = write_within(self.wr, out, self.between)
                    .await
                    .ok_or(Stop::Aborted)?;
                self.req.record.bytes += sent;
            } else {
                let slice = std::mem::take(ubuf).slice(..used);
                *ubuf = write_within(self.wr, slice, self.between)
                    .await
                    .ok_or(Stop::Aborted)?
                    .into_inner();
                self.req.record.bytes += used as u64;
            }
        }
        if self.tap.filters() {
            // An until-close answer ended with its connection: what the filter held goes
            // out now (a chunked one was finished with its last chunk).
            self.out.clear();
            self.tap.pass_rest(self.out);
            if !self.out.is_empty() {
                let sent = self.out.len() as u64;
                let out = std::mem::take(self.out);
                *self.out = write_within(self.wr, out, self.between)
                    .await
                    .ok_or(Stop::Aborted)?;
                self.req.record.bytes += sent;
            }
        }
        Ok(())
    }

    /// Runs answer bytes through the tracker and the tap; once the answer is complete,
    /// its usage is final and the request's limits are settled before its last bytes
    /// reach the client.
    fn track(
        &mut self,
        t: &mut BodyTracker,
        input: &[u8],
        decode: bool,
    ) -> Result<usize, GatewayError> {
        let used = self.tap.track(t, input, decode, self.out)?;
        if t.is_done() && self.tap.metered() {
            self.req.record.usage = self.tap.usage();
            super::admit::settle(self.req);
        }
        Ok(used)
    }
}
