//! Phase `read_model`: reading a request body until its top-level `"model"` is known.
//!
//! The OpenAI SDKs put `messages` before `model`, so the body is read (into the
//! connection's buffer, behind the head, bounded by `limits.max_body_bytes`) until the
//! scanner has the model; what was read is forwarded with the head and the rest streams.
//! `Expect: 100-continue` is answered here, just before the body is needed.

use super::body::{BodyError, BodyTracker};
use super::conn::{write_to_client, ClientConn};
use super::error::GatewayError;
use super::model_scan::ModelScanner;
use super::Worker;
use crate::http::head::BodyFraming;
use crate::scope::Endpoint;
use crate::snapshot::Domain;

const READ_SIZE: usize = 16 * 1024;

/// The body as far as routing needed it.
pub struct ModelRead {
    /// The body's end is still ahead (`None` = no body).
    pub tracker: Option<BodyTracker>,
    /// Still scanning, for a second "model" in the part not yet read.
    pub scanner: Option<ModelScanner>,
}

impl ModelRead {
    pub fn model(&self) -> Option<&str> {
        self.scanner.as_ref().and_then(ModelScanner::model)
    }
}

/// Phase `read_model`: reads the body until its top-level `"model"` is known. Domains that
/// pass everything to one backend skip this entirely.
pub async fn read_model(
    worker: &Worker,
    conn: &mut ClientConn,
    domain: &Domain,
    endpoint: Endpoint,
) -> Result<ModelRead, GatewayError> {
    let until = if domain.passthrough {
        Until::Nothing
    } else {
        Until::Model(endpoint)
    };
    read_body(worker, conn, until, worker.limits.max_body_bytes).await
}

/// Reads the whole body (at most `max_body` bytes) before anything is forwarded: for the
/// management API, whose few threads must only ever see complete requests (a client
/// trickling a body through the public port cannot hold one of them).
pub async fn read_whole_body(
    worker: &Worker,
    conn: &mut ClientConn,
    max_body: u64,
) -> Result<ModelRead, GatewayError> {
    read_body(worker, conn, Until::End, max_body).await
}

/// How far `read_body` reads.
#[derive(Clone, Copy)]
enum Until {
    /// What is already buffered; the rest streams.
    Nothing,
    /// Until the top-level "model" is known (scanning on to the end as it streams).
    Model(Endpoint),
    /// The end of the body.
    End,
}

async fn read_body(
    worker: &Worker,
    conn: &mut ClientConn,
    until: Until,
    max_body: u64,
) -> Result<ModelRead, GatewayError> {
    let mut tracker = match conn.head.framing {
        BodyFraming::None => {
            return Ok(ModelRead {
                tracker: None,
                scanner: None,
            })
        }
        BodyFraming::Length(n) if n > max_body => return Err(GatewayError::BodyTooLarge(max_body)),
        BodyFraming::Length(n) => BodyTracker::length(n),
        BodyFraming::Chunked => BodyTracker::chunked(),
    };
    // The client waits for this before sending a body it announced with Expect.
    if conn.head.expect_continue && conn.head.minor_version == 1 && conn.rbuf.len() == conn.head.len
    {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        let limit = worker.timeouts.between_chunks();
        if write_to_client(conn, interim, limit).await.is_none() {
            return Err(GatewayError::BodyIncomplete);
        }
    }
    let scan = matches!(until, Until::Model(_));
    let mut scanner = ModelScanner::new();
    loop {
        let mut scan_error = None;
        let used = tracker
            .feed(&conn.rbuf[conn.consumed..], max_body, |payload| {
                if scan && scan_error.is_none() {
                    if let Err(e) = scanner.feed(payload) {
                        scan_error = Some(e);
                    }
                }
            })
            .map_err(|e| match e {
                BodyError::Chunk(c) => GatewayError::BadChunkedBody(c),
                BodyError::TooLarge => GatewayError::BodyTooLarge(max_body),
            })?;
        conn.consumed += used;
        // Chunk framing around tiny chunks must not let the buffer outgrow the body limit.
        if conn.consumed - conn.head.len > max_body.saturating_mul(2).saturating_add(65536) as usize
        {
            return Err(GatewayError::BodyTooLarge(max_body));
        }
        if let Some(e) = scan_error {
            return Err(GatewayError::InvalidBody(e));
        }
        let done = tracker.is_done();
        if done {
            conn.body_pending = false;
        }
        let enough = match until {
            Until::Nothing => true,
            Until::Model(_) => scanner.model().is_some() || scanner.finished(),
            Until::End => false,
        };
        if done || enough {
            break;
        }
        // Only the current request's bytes are in the buffer from `consumed` on, since
        // the body has not ended: append more.
        let buf = std::mem::take(&mut conn.rbuf);
        let read =
            monoio::time::timeout(conn.body_wait(worker), conn.rd.read_more(buf, READ_SIZE)).await;
        let Ok((res, buf)) = read else {
            return Err(GatewayError::BodyReadTimeout);
        };
        conn.rbuf = buf;
        match res {
            Ok(0) | Err(_) => return Err(GatewayError::BodyIncomplete),
            Ok(_) => {}
        }
    }
    if let Until::Model(endpoint) = until {
        match scanner.model() {
            Some("") => return Err(GatewayError::InvalidModel("it is empty")),
            Some(_) => {}
            None if endpoint.is_admin() => {}
            None => return Err(GatewayError::MissingModel),
        }
    }
    let done = tracker.is_done();
    Ok(ModelRead {
        tracker: (!done).then_some(tracker),
        scanner: scan.then_some(scanner),
    })
}
