//! Phase `route`: what a path asks for.
//!
//! `classify` turns the request target into a [`Route`] (borrowing from the read buffer);
//! which backend serves it is decided later, once the model is known. Endpoints are
//! classified into [`Endpoint`] kinds (`crate::scope`, shared with `auth`) the way Cube AI
//! distinguishes permissions (chat, completions, embeddings, model read, admin) so
//! authorization can narrow a role per endpoint without redesign.

use super::error::GatewayError;
use crate::http::head::{Method, RequestHead, Span};
use crate::scope::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/...`: OpenAI-compatible, served by vLLM and Ollama alike.
    OpenAi,
    /// `/api/...`: Ollama's native API, Ollama backends only.
    Ollama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Health,
    /// `/users/*`, `/domains/*`, `/keys/*`.
    Management,
    Proxy {
        domain: &'a str,
        api: Api,
        endpoint: Endpoint,
        /// What the backend receives: the path from `/v1` or `/api` on, query included.
        upstream_target: &'a str,
    },
    NotFound,
    /// A path with dot segments or encoded separators: refused, never normalized.
    BadPath,
}

/// Where a request goes, as spans into the connection's buffer: the later phases need
/// the buffer mutably while they still look at the route.
#[derive(Debug, Clone, Copy)]
pub enum Destination {
    Health,
    /// `/users/*`, `/domains/*`, `/keys/*`, `/backends`: the whole target goes to the
    /// management API.
    Management,
    Proxy(ProxyRoute),
}

#[derive(Debug, Clone, Copy)]
pub struct ProxyRoute {
    pub domain: Span,
    pub api: Api,
    pub endpoint: Endpoint,
    /// What the backend receives: the path from `/v1` or `/api` on, query included.
    pub upstream_target: Span,
}

/// Phase `route`: what the request's target asks for.
pub fn route(buf: &[u8], head: &RequestHead) -> Result<Destination, GatewayError> {
    let target = head.target_str(buf)?;
    match classify(head.method, target) {
        Route::Health => Ok(Destination::Health),
        Route::Management => Ok(Destination::Management),
        Route::NotFound => Err(GatewayError::NoRoute),
        Route::BadPath => Err(GatewayError::BadPath),
        Route::Proxy {
            domain,
            api,
            endpoint,
            upstream_target,
        } => Ok(Destination::Proxy(ProxyRoute {
            domain: span_in(buf, domain),
            api,
            endpoint,
            upstream_target: span_in(buf, upstream_target),
        })),
    }
}

/// The span of `part`, a slice of `buf`.
fn span_in(buf: &[u8], part: &str) -> Span {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    Span {
        start: start as u32,
        end: (start + part.len()) as u32,
    }
}

/// What a path asks for, borrowing from it.
pub fn classify(method: Method, target: &str) -> Route<'_> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path == "/health" {
        return Route::Health;
    }
    for prefix in ["/users", "/domains", "/keys", "/backends"] {
        if path == prefix || path.starts_with(prefix) && path.as_bytes()[prefix.len()] == b'/' {
            return Route::Management;
        }
    }
    let Some(rest) = path.strip_prefix("/proxy/") else {
        return Route::NotFound;
    };
    let Some((domain, _)) = rest.split_once('/') else {
        return Route::NotFound;
    };
    // upstream_target keeps the query string: slice it from the full target.
    let upstream_target = &target["/proxy/".len() + domain.len()..];
    let sub = &path["/proxy/".len() + domain.len()..];
    if domain.is_empty() {
        return Route::NotFound;
    }
    if has_dot_segment_or_encoding(sub) {
        return Route::BadPath;
    }
    let (api, endpoint) = if let Some(v1) = sub.strip_prefix("/v1/") {
        (Api::OpenAi, openai_endpoint(method, v1))
    } else if let Some(api) = sub.strip_prefix("/api/") {
        (Api::Ollama, ollama_endpoint(api))
    } else {
        return Route::NotFound;
    };
    Route::Proxy {
        domain,
        api,
        endpoint,
        upstream_target,
    }
}

fn openai_endpoint(method: Method, p: &str) -> Endpoint {
    match p {
        "models" => Endpoint::ListModels,
        "chat/completions" | "responses" => Endpoint::Chat,
        "completions" => Endpoint::Completions,
        "embeddings" | "rerank" | "score" => Endpoint::Embeddings,
        _ if p.starts_with("models/") && method == Method::Delete => Endpoint::Admin,
        _ if p.starts_with("models/") => Endpoint::ModelRead,
        _ => Endpoint::Other,
    }
}

fn ollama_endpoint(p: &str) -> Endpoint {
    match p {
        "tags" => Endpoint::ListTags,
        "chat" => Endpoint::Chat,
        "generate" => Endpoint::Completions,
        "embed" | "embeddings" => Endpoint::Embeddings,
        "show" | "version" => Endpoint::ModelRead,
        "pull" | "push" | "create" | "copy" | "delete" | "ps" => Endpoint::Admin,
        _ if p.starts_with("blobs/") => Endpoint::Admin,
        _ => Endpoint::Other,
    }
}

/// Backends normalize paths their own way; a path that could mean two things is refused.
fn has_dot_segment_or_encoding(p: &str) -> bool {
    p.contains('%')
        || p.contains('\\')
        || p.contains("//")
        || p.split('/').any(|seg| seg == "." || seg == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(classify(Method::Get, "/health"), Route::Health);
        assert_eq!(
            classify(Method::Post, "/users/tokens/issue"),
            Route::Management
        );
        assert_eq!(classify(Method::Get, "/domainsx"), Route::NotFound);
        assert_eq!(
            classify(Method::Post, "/proxy/d1/v1/chat/completions?x=1"),
            Route::Proxy {
                domain: "d1",
                api: Api::OpenAi,
                endpoint: Endpoint::Chat,
                upstream_target: "/v1/chat/completions?x=1"
            }
        );
        assert!(matches!(
            classify(Method::Post, "/proxy/d1/api/pull"),
            Route::Proxy {
                endpoint: Endpoint::Admin,
                api: Api::Ollama,
                ..
            }
        ));
        assert!(matches!(
            classify(Method::Delete, "/proxy/d1/v1/models/x"),
            Route::Proxy {
                endpoint: Endpoint::Admin,
                ..
            }
        ));
        assert_eq!(classify(Method::Get, "/proxy/d1"), Route::NotFound);
        assert_eq!(classify(Method::Get, "/proxy//v1/models"), Route::NotFound);
        assert_eq!(classify(Method::Get, "/proxy/d1/v2/x"), Route::NotFound);
    }

    #[test]
    fn refuses_ambiguous_paths() {
        for p in [
            "/proxy/d/v1/../admin",
            "/proxy/d/v1/./models",
            "/proxy/d/api/%2e%2e/x",
            "/proxy/d/v1//models",
            "/proxy/d/v1/a\\b",
        ] {
            assert_eq!(classify(Method::Get, p), Route::BadPath, "{p}");
        }
    }
}
