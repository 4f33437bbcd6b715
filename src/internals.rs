//! The internals that tests, benches and fuzz targets exercise, named here on purpose.
//!
//! Every other module of the crate is private: an item nothing uses is a compiler warning,
//! not a silent `pub`. What an outside test needs is re-exported below, under the path it
//! has inside the crate, so a test reads `internals::auth::jws::parse` for the function
//! that lives in `src/auth/jws.rs`. This is not an API: it changes with the code.

pub mod auth {
    pub use crate::auth::{verify_token, Authenticator, TokenError};
    pub mod cache {
        pub use crate::auth::cache::TokenCache;
    }
    pub mod check {
        pub use crate::auth::check::{read_answer, CheckVerdict, MAX_ANSWER_BYTES};
    }
    pub mod claims {
        pub use crate::auth::claims::{ClaimRules, Role, VerifiedClaims};
    }
    pub mod directory {
        pub use crate::auth::directory::{Directory, DomainRole};
    }
    pub mod jws {
        pub use crate::auth::jws::{
            parse, Alg, AlgSet, KeyMaterial, VerifyingKey, MAX_TOKEN_BYTES,
        };
    }
    pub mod keys {
        pub use crate::auth::keys::{parse_jwks, IssuerKeys, KeyStore, MAX_JWKS_BYTES, MAX_KEYS};
    }
}

pub mod config {
    pub use crate::config::{AuthConfig, BackendKind, Config, ConfigError, Limits, Routing};
}

pub mod fleet {
    pub mod balance {
        pub use crate::fleet::balance::{Balancer, Hub, Pool};
    }
    pub mod host {
        pub use crate::fleet::host::Host;
    }
    pub mod policy {
        pub use crate::fleet::policy::{rank, Placement, RoutingState};
    }
    pub mod prefix {
        pub use crate::fleet::prefix::PrefixKeys;
    }
}

pub mod http {
    pub mod chunked {
        pub use crate::http::chunked::{ChunkError, ChunkedDecoder};
    }
    pub mod head {
        pub use crate::http::head::{
            check_partial, parse_request_head, worth_parsing, Method, RequestHead,
        };
    }
    pub mod response {
        pub use crate::http::response::{
            client_framing, parse_response_head, write_client_head, ClientFraming, ResponseFraming,
            ResponseHead,
        };
    }
}

pub mod mgmt {
    pub mod postgres {
        pub use crate::mgmt::postgres::{connect_listener, PgStore, CHANGES_CHANNEL};
    }
    pub mod sqlite {
        pub use crate::mgmt::sqlite::Store;
    }
    pub mod store {
        pub use crate::mgmt::store::{
            ApiKeyRow, Domain, LimitsOf, Rotation, SealedKey, Storage, StoreError, UsageGroup,
            UsageGroupValue, UsageQuery, UsageRow, User,
        };
    }
}

pub mod proxy {
    pub mod io {
        pub use crate::proxy::io::BackendStream;
    }
    pub mod model_scan {
        pub use crate::proxy::model_scan::{ModelScanner, ScanError};
    }
    pub mod route {
        pub use crate::proxy::route::classify;
    }
}

pub mod snapshot {
    pub use crate::snapshot::Snapshot;
}

pub mod scope {
    pub use crate::scope::DomainId;
}

pub mod usage {
    pub mod fleet {
        pub use crate::usage::fleet::exchange::Exchange;
        pub use crate::usage::fleet::view::Fleet;
    }
    pub mod limiter {
        pub use crate::usage::limiter::{counters, prune, Scope};
    }
    pub mod limits {
        pub use crate::usage::limits::{ApiLimits, DomainLimits, Limits};
    }
    pub mod tally {
        pub use crate::usage::tally::{Tally, UsageKey};
    }
}

pub mod tls {
    pub use crate::tls::backend_config;
    pub mod gen_cert {
        pub use crate::tls::gen_cert::{gen_cert, GenCert};
    }
}
