//! Every way a proxied request can fail, and the one place that maps each to a response.
//!
//! A `GatewayError` says where and why; `status`, `kind` and `message` turn it into the
//! contract's OpenAI-shaped JSON (`{"error":{"message","type","code"}}`). Messages name the
//! cause in words a user can act on, and never echo a token. `auth`'s own verdicts
//! ([`Refusal`], [`Denied`]) become `GatewayError`s here, at the boundary.

use crate::auth::{AuthError, Denied, Refusal, TokenError};
use crate::http::HttpError;
use crate::scope::DomainId;
use std::fmt;

#[derive(Debug)]
pub enum GatewayError {
    /// The request could not be read as one HTTP message.
    Http(HttpError),
    HeaderReadTimeout,
    BodyReadTimeout,
    BodyTooLarge(u64),
    BadChunkedBody(crate::http::chunked::ChunkError),
    /// The client closed before its body was complete.
    BodyIncomplete,
    NoRoute,
    MethodNotAllowed(&'static str),
    UnknownDomain(String),
    UnknownModel {
        domain: DomainId,
        model: String,
    },
    MissingModel,
    InvalidModel(&'static str),
    /// The body failed the model scan (not an object, a disguised or repeated "model").
    InvalidBody(super::model_scan::ScanError),
    /// Dot segments or encoded characters in the path.
    BadPath,
    NoOllamaBackend(DomainId),
    /// Every host that could serve the request is out of rotation.
    NoHealthyBackend,
    /// Every host with room is taken and cubegate's queue is full.
    QueueFull,
    /// Waited `timeouts.queue_s` for a host with room.
    QueueTimeout,
    Unauthorized(AuthError),
    /// The check service (`[auth] check_url`) is down, slow or answered nonsense: not the
    /// client's fault, so not a 401.
    AuthCheckUnavailable,
    Forbidden(String),
    UpstreamConnect(std::io::Error),
    UpstreamConnectTimeout,
    UpstreamFirstByteTimeout,
    /// The backend stopped reading the request.
    UpstreamWriteTimeout,
    UpstreamBadResponse(&'static str),
    UpstreamClosed,
    /// The backend answered 502/503 and no other host could take the request.
    UpstreamUnavailable(u16),
    /// Over a limit of the domain, the member or the API key.
    RateLimited(Box<crate::usage::admission::Refusal>),
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            Http(e) => e.status(),
            HeaderReadTimeout | BodyReadTimeout => 408,
            BodyTooLarge(_) => 413,
            BadChunkedBody(_) | BodyIncomplete | MissingModel | InvalidModel(_)
            | InvalidBody(_) | BadPath => 400,
            NoRoute | UnknownDomain(_) | UnknownModel { .. } | NoOllamaBackend(_) => 404,
            MethodNotAllowed(_) => 405,
            Unauthorized(_) => 401,
            Forbidden(_) => 403,
            UpstreamConnect(_)
            | UpstreamBadResponse(_)
            | UpstreamClosed
            | UpstreamUnavailable(_) => 502,
            UpstreamConnectTimeout | UpstreamFirstByteTimeout | UpstreamWriteTimeout => 504,
            NoHealthyBackend | QueueTimeout | AuthCheckUnavailable => 503,
            QueueFull | RateLimited(_) => 429,
        }
    }

    /// The OpenAI error `type`.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            408 | 504 => "timeout_error",
            429 => "rate_limit_error",
            s if s >= 500 => "upstream_error",
            _ => "invalid_request_error",
        }
    }

    /// The OpenAI error `code`: stable and machine-readable.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            Http(e) => e.code(),
            HeaderReadTimeout => "header_read_timeout",
            BodyReadTimeout => "body_read_timeout",
            BodyTooLarge(_) => "body_too_large",
            BadChunkedBody(_) => "bad_chunked_body",
            BodyIncomplete => "body_incomplete",
            NoRoute => "no_route",
            MethodNotAllowed(_) => "method_not_allowed",
            UnknownDomain(_) => "domain_not_found",
            UnknownModel { .. } => "model_not_found",
            MissingModel => "model_required",
            InvalidModel(_) => "invalid_model",
            InvalidBody(_) => "invalid_body",
            BadPath => "bad_path",
            NoOllamaBackend(_) => "no_ollama_backend",
            NoHealthyBackend => "no_healthy_backend",
            QueueFull => "queue_full",
            QueueTimeout => "queue_timeout",
            Unauthorized(_) => "invalid_token",
            AuthCheckUnavailable => "auth_check_unavailable",
            Forbidden(_) => "forbidden",
            UpstreamConnect(_) => "backend_unreachable",
            UpstreamConnectTimeout => "backend_connect_timeout",
            UpstreamFirstByteTimeout => "backend_timeout",
            UpstreamWriteTimeout => "backend_write_timeout",
            UpstreamBadResponse(_) => "backend_bad_response",
            UpstreamClosed => "backend_closed",
            UpstreamUnavailable(_) => "backend_unavailable",
            RateLimited(_) => "rate_limit_exceeded",
        }
    }

    /// Whether the connection's framing can no longer be trusted (or the body was not
    /// read), so the connection must close after the error.
    pub fn closes_connection(&self) -> bool {
        use GatewayError::*;
        matches!(
            self,
            Http(_)
                | HeaderReadTimeout
                | BodyReadTimeout
                | BodyTooLarge(_)
                | BadChunkedBody(_)
                | BodyIncomplete
                | InvalidBody(_)
                | UpstreamWriteTimeout
        )
    }

    /// Seconds a client should wait before trying again (`Retry-After`), for the
    /// refusals that pass.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            GatewayError::NoHealthyBackend
            | GatewayError::QueueFull
            | GatewayError::AuthCheckUnavailable => Some(1),
            GatewayError::QueueTimeout => Some(5),
            GatewayError::RateLimited(r) => Some(r.retry_after_s.max(1)),
            _ => None,
        }
    }

    /// The error as the JSON body of the contract.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "code": self.code(),
            }
        }))
        .unwrap_or_default()
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GatewayError::*;
        match self {
            Http(e) => write!(f, "{e}"),
            HeaderReadTimeout => f.write_str("timed out waiting for the request head"),
            BodyReadTimeout => f.write_str("timed out waiting for the request body"),
            BodyTooLarge(n) => write!(f, "request body too large (limit {n} bytes)"),
            BadChunkedBody(e) => write!(f, "malformed chunked request body: {e}"),
            BodyIncomplete => f.write_str("the request body ended before its declared length"),
            NoRoute => f.write_str(
                "no such route: use /proxy/<domain_id>/v1/... or /proxy/<domain_id>/api/...",
            ),
            MethodNotAllowed(what) => write!(f, "method not allowed: {what}"),
            UnknownDomain(d) => write!(f, "domain {d:?} does not exist"),
            UnknownModel { domain, model } => write!(
                f,
                "model {model:?} is not served in domain {domain:?}; GET /proxy/{domain}/v1/models lists the models it offers"
            ),
            MissingModel => f.write_str(
                "the request body has no top-level \"model\" string: say which model to use",
            ),
            InvalidModel(why) => write!(f, "invalid \"model\" value: {why}"),
            InvalidBody(e) => write!(f, "cannot route this request: {e}"),
            BadPath => f.write_str(
                "the path contains dot segments, empty segments, backslashes or percent-encoding, which are refused",
            ),
            NoOllamaBackend(d) => write!(
                f,
                "domain {d:?} has no Ollama backend for Ollama's native /api/... routes; use /v1/..."
            ),
            NoHealthyBackend => f.write_str(
                "no GPU host serving this model is in rotation (they failed health checks or recent requests); retry after the time in Retry-After",
            ),
            QueueFull => f.write_str(
                "every GPU host serving this model is at its max_in_flight and the wait queue is full; retry after the time in Retry-After",
            ),
            QueueTimeout => f.write_str(
                "no GPU host serving this model had room within timeouts.queue_s; retry after the time in Retry-After",
            ),
            Unauthorized(why) => write!(f, "{why}"),
            AuthCheckUnavailable => f.write_str(
                "the authentication service that checks this token (auth.check_url) is unavailable; retry after the time in Retry-After",
            ),
            Forbidden(why) => write!(f, "{why}"),
            UpstreamConnect(e) => write!(f, "could not connect to the backend: {e}"),
            UpstreamConnectTimeout => f.write_str("timed out connecting to the backend"),
            UpstreamFirstByteTimeout => {
                f.write_str("the backend did not start answering in time")
            }
            UpstreamWriteTimeout => f.write_str("the backend stopped reading the request"),
            UpstreamBadResponse(why) => write!(f, "the backend sent an invalid response: {why}"),
            UpstreamClosed => f.write_str("the backend closed the connection without answering"),
            RateLimited(r) => write!(f, "{r}"),
            UpstreamUnavailable(status) => write!(
                f,
                "the backend answered {status} and no other host serving this model could take the request"
            ),
        }
    }
}

impl From<HttpError> for GatewayError {
    fn from(e: HttpError) -> Self {
        GatewayError::Http(e)
    }
}

impl From<Refusal> for GatewayError {
    fn from(r: Refusal) -> Self {
        GatewayError::Unauthorized(r.error)
    }
}

/// A disabled user's credential is a bad token (401, with its challenge); the rest is 403.
impl From<Denied> for GatewayError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Disabled => GatewayError::Unauthorized(AuthError::Token(TokenError::Disabled)),
            Denied::NotInDomain(_) | Denied::AdminOnly => GatewayError::Forbidden(d.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = GatewayError::UnknownModel {
            domain: "d".into(),
            model: "m".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("\"m\""));
        assert_eq!(e.status(), 404);
    }

    #[test]
    fn auth_verdicts_keep_their_answers() {
        let disabled = GatewayError::from(Denied::Disabled);
        assert_eq!(disabled.status(), 401);
        assert_eq!(disabled.to_string(), "the user of this token is disabled");
        let outside = GatewayError::from(Denied::NotInDomain("d1".into()));
        assert_eq!(outside.status(), 403);
        assert_eq!(outside.to_string(), "this token may not use domain \"d1\"");
        let admin = GatewayError::from(Denied::AdminOnly);
        assert_eq!(admin.status(), 403);
        assert_eq!(
            admin.to_string(),
            "only domain admins may pull, push, create, copy or delete models, or use endpoints cubegate does not know"
        );
        let refused = GatewayError::from(Refusal {
            error: AuthError::Missing,
            from_cache: false,
        });
        assert_eq!(refused.status(), 401);
        assert_eq!(refused.code(), "invalid_token");
    }
}
