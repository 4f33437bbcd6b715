//! Authentication and authorization: the seam between parsing a request and routing it.
//!
//! `authenticate` turns the `Authorization` header into an [`Identity`]; `authorize`
//! decides whether that identity may use a domain's endpoint. The data plane calls exactly
//! these two, in that order, before anything reaches a backend. Today two modes exist:
//! `none` (development: every caller is an anonymous platform admin, announced loudly at
//! startup) and `jwt`, which fails closed until the verifier (ring, per-core cache, JWKS)
//! is plugged in behind `authenticate`.

use crate::config::AuthMode;
use crate::proxy::error::GatewayError;
use crate::proxy::route::Endpoint;
use crate::snapshot::Domain;

/// Who is calling, as far as the data plane needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Sent upstream as `X-User-Id`.
    pub user_id: std::borrow::Cow<'static, str>,
    pub platform_admin: bool,
}

pub struct Authenticator {
    mode: AuthMode,
}

impl Authenticator {
    pub fn new(mode: AuthMode) -> Authenticator {
        Authenticator { mode }
    }

    /// Checks the bearer credential. `authorization` is the raw header value, if any.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Identity, GatewayError> {
        match self.mode {
            AuthMode::None => Ok(Identity {
                user_id: std::borrow::Cow::Borrowed("anonymous"),
                platform_admin: true,
            }),
            AuthMode::Jwt => {
                let Some(value) = authorization else {
                    return Err(GatewayError::Unauthorized(
                        "missing bearer token: send Authorization: Bearer <token>",
                    ));
                };
                if bearer_token(value).is_none() {
                    return Err(GatewayError::Unauthorized(
                        "the Authorization header must be \"Bearer <token>\"",
                    ));
                }
                Err(GatewayError::Unauthorized(
                    "token verification is not available in this build yet (auth.mode = \"jwt\"); \
                     set auth.mode = \"none\" for development",
                ))
            }
        }
    }

    /// May `who` use `endpoint` of `domain`?
    pub fn authorize(
        &self,
        who: &Identity,
        _domain: &Domain,
        endpoint: Endpoint,
    ) -> Result<(), GatewayError> {
        if endpoint.is_admin() && !who.platform_admin {
            return Err(GatewayError::Forbidden(
                "only domain admins may pull, push, create, copy or delete models",
            ));
        }
        Ok(())
    }
}

/// The token of a `Bearer` credential (scheme case-insensitive, RFC 6750 token68 charset).
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    if value.len() < 8 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = value[7..].trim_ascii();
    let ok = !token.is_empty()
        && token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b));
    ok.then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(b"Bearer abc.def"), Some(&b"abc.def"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer a b"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
    }

    #[test]
    fn jwt_mode_fails_closed() {
        let a = Authenticator::new(AuthMode::Jwt);
        assert!(a.authenticate(None).is_err());
        assert!(a.authenticate(Some(b"Bearer x.y.z")).is_err());
        let a = Authenticator::new(AuthMode::None);
        assert!(a.authenticate(None).unwrap().platform_admin);
    }
}
