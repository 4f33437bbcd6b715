//! Phase `read_model`: reading a request body until its top-level `"model"` is known.
//!
//! The OpenAI SDKs put `messages` before `model`, so the body is read (into the
//! connection's buffer, behind the head, bounded by `limits.max_body_bytes`) until the
//! scanner has the model; what was read is forwarded with the head and the rest streams.
//! `Expect: 100-continue` is answered here, just before the body is needed.

use super::body::{BodyError, BodyTracker};
use super::connection::Connection;
use super::error::GatewayError;
use super::model_scan::ModelScanner;
use super::request::Request;
use super::worker::Worker;
use crate::http::head::BodyFraming;
use crate::scope::Endpoint;
use crate::snapshot::Domain;

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

/// Bodies up to this size are read whole before they are forwarded when the domain has
/// more than one host, so a host that fails before answering can be replaced by another
/// with the same bytes. Larger ones stream (and are not retried elsewhere).
pub const REPLAY_LIMIT: u64 = 1 << 20;

/// Phase `read_model`: reads the body until its top-level `"model"` is known (and, where
/// another host could take a retry, to its end when it is small enough to keep). Domains
/// that pass everything to one backend skip this entirely.
pub async fn read_model(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    domain: &Domain,
    endpoint: Endpoint,
) -> Result<ModelRead, GatewayError> {
    let until = if domain.passthrough {
        Until::Nothing
    } else {
        // Another host could take a retry; or a stream's body may be asked for its usage
        // (`Metering::AskForUsage`), which needs all of it.
        let prompt = matches!(endpoint, Endpoint::Chat | Endpoint::Completions);
        Until::Model {
            endpoint,
            keep: if domain.backends.len() > 1 || prompt {
                REPLAY_LIMIT
            } else {
                0
            },
        }
    };
    read_body(worker, conn, req, until, worker.limits.max_body_bytes).await
}

/// Reads the whole body (at most `max_body` bytes) before anything is forwarded: for the
/// management API, whose few threads must only ever see complete requests (a client
/// trickling a body through the public port cannot hold one of them).
pub async fn read_whole_body(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    max_body: u64,
) -> Result<ModelRead, GatewayError> {
    read_body(worker, conn, req, Until::End, max_body).await
}

/// How far `read_body` reads.
#[derive(Clone, Copy)]
enum Until {
    /// What is already buffered; the rest streams.
    Nothing,
    /// Until the top-level "model" is known (scanning on to the end as it streams), and
    /// to the end of a body of at most `keep` bytes.
    Model { endpoint: Endpoint, keep: u64 },
    /// The end of the body.
    End,
}

async fn read_body(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    until: Until,
    max_body: u64,
) -> Result<ModelRead, GatewayError> {
    let mut tracker = match req.head.framing {
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
    let head = &req.head;
    if head.expect_continue && head.minor_version == 1 && conn.buffer().len() == head.len {
        let interim: &'static [u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        let limit = worker.timeouts.between_chunks();
        if conn.write_within(interim, limit).await.is_none() {
            return Err(GatewayError::BodyIncomplete);
        }
    }
    let scan = matches!(until, Until::Model { .. });
    let mut scanner = ModelScanner::new();
    loop {
        let mut scan_error = None;
        let used = tracker
            .feed(&conn.buffer()[req.consumed..], max_body, |payload| {
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
        req.consumed += used;
        // Chunk framing around tiny chunks must not let the buffer outgrow the body limit.
        if req.body_in_buffer() > max_body.saturating_mul(2).saturating_add(65536) as usize {
            return Err(GatewayError::BodyTooLarge(max_body));
        }
        if let Some(e) = scan_error {
            return Err(GatewayError::InvalidBody(e));
        }
        let done = tracker.is_done();
        if done {
            req.body_done();
        }
        let enough = match until {
            Until::Nothing => true,
            Until::Model { keep, .. } => {
                let known = scanner.model().is_some() || scanner.finished();
                let keeping = match req.head.framing {
                    BodyFraming::Length(n) => n <= keep,
                    _ => (req.body_in_buffer() as u64) <= keep,
                };
                known && !(keeping && keep > 0)
            }
            Until::End => false,
        };
        if done || enough {
            break;
        }
        // Only the current request's bytes are in the buffer from `consumed` on, since
        // the body has not ended: append more.
        conn.read_body(req.body_wait(worker.timeouts.body_read()))
            .await?;
    }
    if let Until::Model { endpoint, .. } = until {
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
