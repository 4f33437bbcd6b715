//! Header names and the small byte-level helpers used on them.
//!
//! One place for each header fact: which headers are hop-by-hop, which ones the proxy owns
//! and replaces (identity, framing), and case-insensitive comparisons that never allocate.

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the ones the
/// proxy writes itself and must not let a client or backend supply: framing, identity and
/// tracing headers.
pub fn is_hop_by_hop_request(name: &[u8]) -> bool {
    const DROP: &[&[u8]] = &[
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
        b"authorization",
        b"x-user-id",
        b"x-domain-id",
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"x-real-ip",
    ];
    // Compared with '_' read as '-': CGI/WSGI-style servers turn `X_User_Id` into the
    // same variable as `X-User-Id`.
    DROP.iter().any(|d| eq_ignore_case_dash(name, d))
}

fn eq_ignore_case_dash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let x = if *x == b'_' { b'-' } else { *x };
            x.eq_ignore_ascii_case(y)
        })
}

/// Response headers a backend sends that describe its hop, not the answer.
pub fn is_hop_by_hop_response(name: &[u8]) -> bool {
    const DROP: &[&[u8]] = &[
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    ];
    DROP.iter().any(|d| eq_ignore_case(name, d))
}

pub fn eq_ignore_case(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| eq_ignore_case(t.trim_ascii(), token))
}

/// A request id a client may choose: short and printable, so it can go into logs and
/// upstream headers as is. Anything else is replaced by a generated one.
pub fn is_acceptable_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!has_token(b"closed", b"close"));
        assert!(is_hop_by_hop_request(b"Transfer-Encoding"));
        assert!(is_hop_by_hop_request(b"AUTHORIZATION"));
        assert!(is_hop_by_hop_request(b"X_User_Id"));
        assert!(is_hop_by_hop_request(b"Forwarded"));
        assert!(!is_hop_by_hop_request(b"content-type"));
    }
}
