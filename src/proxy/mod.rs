//! The data plane: one [`worker::Worker`] per core serves client connections and forwards
//! them to GPU hosts.
//!
//! A request's life is a list of named phases, each a function in the module of its name,
//! run in order by [`serve`]:
//! [`route`] → [`authenticate`] → [`authorize`] → [`answer_locally`] or [`read_model`] →
//! [`admit`] → [`choose_backends`] → [`forward`] (→ [`send_request`], [`stream_response`])
//! → [`log`].
//! The [`connection`] owns the sockets and the read buffer and outlives its requests; each
//! [`request`] is a fresh value. Below them: socket types ([`io`]), body framing
//! ([`body`]), the model scanner ([`model_scan`]), upstream pools ([`pool`]), small
//! whole exchanges such as health probes and the auth check ([`exchange`]), splice
//! ([`splice`]) and the one error map ([`error`]). Worker state is explicit and
//! per-thread: nothing on this path takes a lock or writes memory another core reads,
//! except the limit counters of a limited request (atomics, [`crate::usage::limiter`]).

pub mod admit;
pub mod answer_locally;
pub mod answer_tap;
pub mod auth_check;
pub mod authenticate;
pub mod authorize;
pub mod body;
pub mod choose_backends;
pub mod connection;
pub mod error;
pub mod exchange;
pub mod forward;
pub mod io;
pub mod log;
pub mod model_scan;
pub mod pool;
pub mod read_answer;
pub mod read_model;
pub mod request;
pub mod request_id;
pub mod route;
pub mod send_request;
pub mod serve;
pub mod splice;
pub mod stream_response;
pub mod upstream;
pub mod worker;
