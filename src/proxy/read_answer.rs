//! One read of a backend's answer (phase `stream_response`), racing the client watch, and
//! the buffer it reads into.
//!
//! What shaped it is what an open stream costs. Thousands of streams sit here at once,
//! each waiting for its next token, so what one of them holds while it waits is the
//! gateway's memory per stream: its read buffer (2 KiB while the answer trickles, a pooled
//! 16 KiB one only while it flows) and this future (one timer for all its waits).

use super::pool::Upstream;
use super::worker::{Worker, BUFFER_SIZE, SMALL_BUFFER_SIZE};
use crate::fleet::host::Host;
use futures_util::future::{select, Either};
use monoio::BufResult;
use std::future::Future;
use std::pin::{pin, Pin};
use std::time::{Duration, Instant};

/// How one read of the answer ended.
pub enum UpRead {
    /// The host was taken out of rotation while its first byte was awaited.
    HostEjected,
    Data,
    Eof,
    Failed,
    TimedOut,
    ClientGone,
}

/// The client watch: a read kept in flight on the client socket.
pub struct Watch<'a, W> {
    pub fut: Option<Pin<&'a mut W>>,
    pub saved: Option<(usize, Vec<u8>)>,
    /// The watch read has been submitted. It is armed only once the backend keeps us
    /// waiting longer than `WATCH_GRACE`: a quick answer needs no watch (and saves the
    /// read and its cancellation, two io_uring operations per request).
    pub armed: bool,
    /// The client's read buffer (its request, anything pipelined): trimmed to what it
    /// holds when the watch arms, so a long wait keeps no spare room.
    pub client_buf: &'a mut Vec<u8>,
}

/// The client watch's read: it only has to show that the client is alive or gone.
pub const WATCH_BUF: usize = 512;
/// Spare room in the client's read buffer worth giving back while an answer is awaited.
const TRIM_SPARE: usize = 1024;

/// How often a host's rotation is looked at while its first byte is awaited.
const EJECTION_POLL: Duration = Duration::from_millis(100);

/// How long a backend may keep the client waiting before the client watch is armed.
const WATCH_GRACE: Duration = Duration::from_millis(20);

/// Empties `ubuf` for the next read of an answer's body and sizes it by the last read,
/// which `ubuf` holds: one that filled its buffer (the answer flows) gets a pooled
/// `BUFFER_SIZE` one; a trickle (under half of `SMALL_BUFFER_SIZE`: a token or two) goes
/// back to a small one, and the large buffer back to the pool, so thousands of streams
/// waiting for their next token hold 2 KiB each, not 16. Returns the read's size.
pub fn size_next_read(worker: &Worker, ubuf: &mut Vec<u8>) -> usize {
    let (last, cap) = (ubuf.len(), ubuf.capacity());
    if last >= cap && cap < BUFFER_SIZE {
        worker.recycle(std::mem::replace(ubuf, worker.take_buffer()));
    } else if last < SMALL_BUFFER_SIZE / 2 && cap > SMALL_BUFFER_SIZE {
        worker.recycle(std::mem::replace(ubuf, worker.take_small_buffer()));
    }
    ubuf.clear();
    ubuf.capacity()
}

/// One read of up to `want` bytes from the backend, racing the client watch.
///
/// One timer serves every wait of the read: arming the watch after `WATCH_GRACE`, looking
/// at the host's rotation every `EJECTION_POLL` while its first byte is awaited, and the
/// read's `limit`. (A monoio timer is 640 bytes, aligned to 128, and this future lives in
/// every open stream's task: three timers here made each stream 1.6 KB larger.)
pub async fn read_upstream<W>(
    up: &mut Upstream,
    buf: Vec<u8>,
    want: usize,
    limit: Duration,
    watch: &mut Watch<'_, W>,
    host: Option<&Host>,
) -> (UpRead, Vec<u8>)
where
    W: Future<Output = BufResult<usize, Vec<u8>>>,
{
    let started = Instant::now();
    let deadline = started + limit;
    let wake = |watch: &Watch<'_, W>, now: Instant| {
        let mut at = deadline;
        if watch.fut.is_some() && !watch.armed {
            at = at.min(started + WATCH_GRACE);
        }
        if host.is_some() {
            at = at.min(now + EJECTION_POLL);
        }
        at
    };
    let mut read = pin!(up.stream.read_more(buf, want));
    let mut timer = pin!(monoio::time::sleep_until(wake(watch, started).into()));
    loop {
        // Before the grace is over the watch is not submitted: the read races the timer
        // alone (a quick answer saves the watch's read and its cancellation).
        let armed = watch.fut.as_mut().filter(|_| watch.armed);
        let woke = match armed {
            None => match select(read.as_mut(), timer.as_mut()).await {
                Either::Left((r, _)) => return up_read(r),
                Either::Right(_) => true,
            },
            Some(w) => match select(read.as_mut(), select(w.as_mut(), timer.as_mut())).await {
                Either::Left((r, _)) => return up_read(r),
                Either::Right((Either::Left(((res, wbuf), _)), _)) => {
                    watch.fut = None;
                    match res {
                        Ok(n) if n > 0 => {
                            watch.saved = Some((n, wbuf));
                            false
                        }
                        // EOF or reset from the client: it is gone. Dropping the pending
                        // read (and then the connection) tells the backend to stop.
                        _ => return (UpRead::ClientGone, Vec::new()),
                    }
                }
                Either::Right((Either::Right(_), _)) => true,
            },
        };
        let now = Instant::now();
        if woke {
            if now >= deadline {
                // Dropping the read cancels it.
                return (UpRead::TimedOut, Vec::new());
            }
            if host.is_some_and(|h| !h.is_up()) {
                return (UpRead::HostEjected, Vec::new());
            }
            if watch.fut.is_some() && !watch.armed && now >= started + WATCH_GRACE {
                watch.armed = true;
                if watch.client_buf.capacity() - watch.client_buf.len() > TRIM_SPARE {
                    watch.client_buf.shrink_to_fit();
                }
            }
        }
        timer.as_mut().reset(wake(watch, now).into());
    }
}

fn up_read(result: BufResult<usize, Vec<u8>>) -> (UpRead, Vec<u8>) {
    match result {
        (Ok(0), b) => (UpRead::Eof, b),
        (Ok(_), b) => (UpRead::Data, b),
        (Err(_), b) => (UpRead::Failed, b),
    }
}
