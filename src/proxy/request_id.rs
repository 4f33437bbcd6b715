//! Request ids: the client's own when it sent a sane one, else made here, unique across
//! workers and restarts. Stored inline (no allocation per request).

use crate::http::headers::is_acceptable_request_id;

const MAX_LEN: usize = 128;

/// A request id, stored inline.
#[derive(Clone, Copy)]
pub struct RequestId {
    bytes: [u8; MAX_LEN],
    len: u8,
}

impl RequestId {
    /// The client's `X-Request-Id`, when it is one we may echo and pass on.
    pub fn from_client(value: &[u8]) -> Option<RequestId> {
        if !is_acceptable_request_id(value) {
            return None;
        }
        let n = value.len().min(MAX_LEN);
        let mut id = RequestId {
            bytes: [0; MAX_LEN],
            len: n as u8,
        };
        id.bytes[..n].copy_from_slice(&value[..n]);
        Some(id)
    }

    /// `<run id:8 hex>-<worker:2 hex>-<sequence:10 hex>`.
    pub fn generate(run_id: u32, worker: usize, seq: u64) -> RequestId {
        let mut id = RequestId {
            bytes: [0; MAX_LEN],
            len: 0,
        };
        let mut at = 0;
        for (value, digits) in [
            (u64::from(run_id), 8),
            ((worker & 0xff) as u64, 2),
            (seq, 10),
        ] {
            if at > 0 {
                id.bytes[at] = b'-';
                at += 1;
            }
            for i in (0..digits).rev() {
                id.bytes[at] = b"0123456789abcdef"[((value >> (4 * i)) & 0xf) as usize];
                at += 1;
            }
        }
        id.len = at as u8;
        id
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_name_run_worker_and_sequence() {
        let id = RequestId::generate(0xdeadbeef, 3, 42);
        assert_eq!(id.as_str(), "deadbeef-03-000000002a");
    }

    #[test]
    fn client_ids_are_kept_only_when_sane() {
        assert_eq!(
            RequestId::from_client(b"abc-123").map(|i| i.as_str().to_string()),
            Some("abc-123".to_string())
        );
        assert!(RequestId::from_client(b"bad\x01id").is_none());
    }
}
