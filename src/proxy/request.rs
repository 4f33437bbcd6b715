//! One request's state, made fresh for each request on a connection.
//!
//! The connection ([`super::connection::Connection`]) outlives its requests and owns the
//! sockets and the read buffer; a [`Request`] holds what belongs to one exchange: the
//! parsed head (spans into the connection's buffer), how much of the body has been read,
//! its deadline, who is calling, and the facts its access record will say. Nothing has to
//! be reset by hand between requests: the next request is a new value.

use super::body::BodyTracker;
use super::model_scan::ModelScanner;
use super::request_id::RequestId;
use crate::auth::Identity;
use crate::http::head::{BodyFraming, RequestHead, Span};
use crate::snapshot::Domain;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Whether the client connection may carry another request after this answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    KeepAlive,
    Close,
}

impl Persistence {
    /// `KeepAlive` only when both agree.
    pub fn and(self, other: Persistence) -> Persistence {
        match (self, other) {
            (Persistence::KeepAlive, Persistence::KeepAlive) => Persistence::KeepAlive,
            _ => Persistence::Close,
        }
    }

    pub fn when(keep: bool) -> Persistence {
        if keep {
            Persistence::KeepAlive
        } else {
            Persistence::Close
        }
    }

    pub fn is_keep_alive(self) -> bool {
        self == Persistence::KeepAlive
    }
}

pub struct Request {
    pub head: RequestHead,
    pub id: RequestId,
    /// When the head was complete.
    pub started: Instant,
    /// Bytes of the connection's buffer that belong to this request: the head and the
    /// part of the body read so far. Whatever follows is the next request's.
    pub consumed: usize,
    body_pending: bool,
    body_deadline: Instant,
    /// Who is calling, once authenticated.
    pub identity: Option<Identity>,
    /// Its hold on the limits that apply to it (phase `admit`).
    pub admission: Option<crate::usage::admission::Admission>,
    pub record: AccessRecord,
}

impl Request {
    /// A request whose head (`head.len` bytes at the start of the connection's buffer)
    /// was just parsed.
    pub fn new(head: RequestHead, id: RequestId, body_total: Duration) -> Request {
        let started = Instant::now();
        Request {
            consumed: head.len,
            body_pending: head.framing != BodyFraming::None,
            body_deadline: started + body_total,
            head,
            id,
            started,
            identity: None,
            admission: None,
            record: AccessRecord::default(),
        }
    }

    /// The body has not been read to its end: the connection cannot carry another
    /// request, since where this one ends is unknown.
    pub fn body_pending(&self) -> bool {
        self.body_pending
    }

    pub fn body_done(&mut self) {
        self.body_pending = false;
    }

    /// Body bytes read so far (they sit right after the head).
    pub fn body_in_buffer(&self) -> usize {
        self.consumed - self.head.len
    }

    /// How long the next body read may wait: the pause limit, cut by the whole-body
    /// deadline.
    pub fn body_wait(&self, pause: Duration) -> Duration {
        let left = self.body_deadline.saturating_duration_since(Instant::now());
        pause.min(left)
    }

    /// Keep-alive as far as the request allows it: the client asked for it and the body
    /// was read to its end.
    pub fn persistence(&self) -> Persistence {
        Persistence::when(self.head.keep_alive && !self.body_pending)
    }
}

/// The facts of one request for its access record and metrics. Never a token, a password
/// or a prompt: the path is logged without its query, the user by id.
#[derive(Default)]
pub struct AccessRecord {
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// From the request's start to the answer's head going out.
    pub first_byte: Option<Duration>,
    /// The backend chosen (the last one tried).
    pub backend: Option<SocketAddr>,
    /// The model the body named (shared with the worker's earlier records of it).
    pub model: Option<std::rc::Rc<str>>,
    pub domain: Option<Span>,
    /// (metrics slot of the domain, route kind) of a proxied request.
    pub route: Option<(u16, usize)>,
    /// How the first host was chosen.
    pub placement: Option<crate::fleet::policy::Placement>,
    /// Tokens the answer used, as the meter read them (`None`: not a metered answer).
    pub usage: Option<crate::usage::Usage>,
}

/// What the proxy knows about a request once it has decided to forward it (the request's
/// own state, its head and identity, is in [`Request`]).
pub struct ForwardRequest<'a> {
    pub domain: &'a Domain,
    /// Path from `/v1` or `/api` on, with the query.
    pub upstream_target: Span,
    /// Where the body ends; `None` = no body or all of it read.
    pub tracker: Option<BodyTracker>,
    /// Still watching the body for a second `"model"`.
    pub scanner: Option<ModelScanner>,
    /// To the management listener: the client's Authorization goes along (the management
    /// API authenticates itself) and no identity headers are added.
    pub management: bool,
    pub metering: Metering,
}

/// Whether and how the answer's tokens are counted ([`crate::usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metering {
    Off,
    On,
    /// A streamed OpenAI request the client sent without `stream_options`: the gateway adds
    /// `"stream_options":{"include_usage":true}` after the body's `{` (at this payload
    /// offset) and takes the usage event back out of the answer.
    AskForUsage {
        open_at: usize,
    },
}
