//! Answers cubegate gives itself, without a backend: health and the domain's model lists
//! (rendered into the snapshot when it was built, so serving one is a single write).

use super::conn::ClientConn;
use super::error::GatewayError;
use super::RequestId;
use crate::http::head::Method;
use crate::http::response::write_local_response;

pub const HEALTH_BODY: &[u8] = br#"{"status":"ok"}"#;

/// Writes a complete local answer. Returns whether the connection may stay open.
pub async fn respond(
    limit: std::time::Duration,
    conn: &mut ClientConn,
    status: u16,
    body: &[u8],
    content_type: &str,
    request_id: &RequestId,
) -> Result<bool, GatewayError> {
    conn.log.status = status;
    conn.log.bytes = body.len() as u64;
    let keep_alive =
        conn.head.keep_alive && conn.head.framing == crate::http::head::BodyFraming::None;
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    write_local_response(
        &mut out,
        status,
        &[],
        content_type,
        body,
        request_id.as_bytes(),
        keep_alive,
    );
    if conn.head.method == Method::Head {
        out.truncate(out.len() - body.len());
    }
    match super::conn::write_to_client(conn, out, limit).await {
        Some(back) => {
            conn.out = back;
            Ok(keep_alive)
        }
        None => Ok(false),
    }
}
