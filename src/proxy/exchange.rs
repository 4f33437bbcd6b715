//! One small request and its whole answer, on a connection of its own: the health
//! checker's probes ([`crate::fleet::health`]) and the custom-authentication call
//! (`[auth] check_url`, phase [`super::authenticate`]).
//!
//! Not the forwarding path (that pools connections and streams answers as they come):
//! these answers are small and read whole, so everything the peer sends is bounded — the
//! head, the body, and the time of the whole exchange, TLS handshake included — and
//! anything unexpected is an error that says what went wrong, for the log.

use super::body::BodyTracker;
use super::io::BackendStream;
use crate::http::response::{parse_response_head, ResponseFraming};
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest answer head read.
const MAX_HEAD: usize = 16 * 1024;

/// Where an exchange goes.
pub struct Peer<'a> {
    pub addr: SocketAddr,
    /// `https://`: the name its certificate must carry.
    pub tls_name: Option<&'a ServerName<'static>>,
    /// The roots `https://` peers are checked against (`None`: none could be loaded).
    pub tls_config: Option<&'a Arc<rustls::ClientConfig>>,
}

/// Sends `request` (a whole HTTP/1.1 request with `Connection: close`) to `peer` and reads
/// the answer's status and body (at most `max_body` bytes), all within `limit`.
pub async fn exchange(
    peer: &Peer<'_>,
    request: Vec<u8>,
    max_body: usize,
    limit: Duration,
) -> Result<(u16, Vec<u8>), String> {
    match monoio::time::timeout(limit, exchange_unbounded(peer, request, max_body, limit)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
}

async fn exchange_unbounded(
    peer: &Peer<'_>,
    request: Vec<u8>,
    max_body: usize,
    limit: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect_addr(peer.addr)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", peer.addr))?;
    let _ = tcp.set_nodelay(true);
    let mut stream = match (peer.tls_name, peer.tls_config) {
        (None, _) => BackendStream::plain(tcp),
        (Some(name), Some(config)) => BackendStream::tls(tcp, config.clone(), name.clone(), limit)
            .await
            .map_err(|e| format!("{}: {e}", peer.addr))?,
        (Some(_), None) => {
            return Err(
                "https://, but no CA certificates are trusted: set proxy.backend_ca_file".into(),
            )
        }
    };
    let (res, _) = stream.write_all(request).await;
    res.map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let head = loop {
        let parsed = parse_response_head(&buf, MAX_HEAD, false)
            .map_err(|e| format!("invalid answer head: {e:?}"))?;
        if let Some(h) = parsed {
            break h;
        }
        let (res, b) = stream.read_more(buf, 4096).await;
        buf = b;
        match res {
            Ok(0) => return Err("closed the connection without an answer".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    };
    let too_large = || format!("answer larger than {max_body} bytes");
    let mut tracker = match head.framing {
        ResponseFraming::None => return Ok((head.status, Vec::new())),
        ResponseFraming::Length(n) if n > max_body as u64 => return Err(too_large()),
        ResponseFraming::Length(n) => BodyTracker::length(n),
        ResponseFraming::Chunked => BodyTracker::chunked(),
        ResponseFraming::UntilClose => BodyTracker::UntilClose,
    };
    let mut body = Vec::new();
    let mut at = head.len;
    loop {
        tracker
            .feed(&buf[at..], max_body as u64, |payload| {
                body.extend_from_slice(payload)
            })
            .map_err(|e| format!("invalid answer body: {e:?}"))?;
        if body.len() > max_body {
            return Err(too_large());
        }
        if tracker.is_done() {
            break;
        }
        buf.clear();
        at = 0;
        let (res, b) = stream.read_more(buf, 16 * 1024).await;
        buf = b;
        match res {
            Ok(0) if matches!(tracker, BodyTracker::UntilClose) => break,
            Ok(0) => return Err("closed the connection before the answer ended".into()),
            Err(e) => return Err(format!("reading the answer: {e}")),
            Ok(_) => {}
        }
    }
    Ok((head.status, body))
}
