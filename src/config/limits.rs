//! `[limits]` and `[timeouts]`: every size and every wait on the request path comes from
//! here, with the defaults a GPU gateway needs (long first-byte waits: GPUs queue).

use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Request line + headers, bytes (431 past it; 414 when the request line alone is over).
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    /// Request body, bytes (413 past it).
    pub max_body_bytes: u64,
    /// Response head from a backend, bytes (502 past it).
    pub max_upstream_head_bytes: usize,
    /// Open client connections, all workers together; past it a worker stops accepting
    /// until one closes (new connections wait in the kernel's backlog).
    pub max_connections: usize,
    /// Requests that may wait at once for a host with room (over all workers).
    pub max_queued: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            max_upstream_head_bytes: 64 * 1024,
            max_connections: 65536,
            max_queued: 4096,
        }
    }
}

/// Timeouts. Every wait on the network has one of these.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From the first byte of a request to the end of its head (408 past it).
    pub header_read_ms: u64,
    /// An idle keep-alive connection is closed after this long.
    pub idle_keepalive_s: u64,
    /// Longest pause while reading a request body (408 past it).
    pub body_read_ms: u64,
    pub upstream_connect_ms: u64,
    /// From the request sent to the backend's response head (504 past it). Long, since a
    /// loaded GPU host may queue a request for a while before its first token.
    pub first_byte_s: u64,
    /// Longest silence between two reads of a streamed answer, and longest a client may
    /// take to accept a write.
    pub between_chunks_s: u64,
    /// The whole request body must arrive within this (a client trickling one byte per
    /// `body_read_ms` cannot hold a connection and a backend slot for days).
    pub body_total_s: u64,
    /// How long SIGTERM waits for in-flight requests and streams.
    pub drain_s: u64,
    /// Longest wait in cubegate's queue for a host with room (`max_in_flight`).
    pub queue_s: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read_ms: 10_000,
            idle_keepalive_s: 75,
            body_read_ms: 30_000,
            upstream_connect_ms: 3_000,
            first_byte_s: 300,
            between_chunks_s: 120,
            body_total_s: 300,
            drain_s: 30,
            queue_s: 30,
        }
    }
}

impl Timeouts {
    pub fn header_read(&self) -> Duration {
        Duration::from_millis(self.header_read_ms)
    }
    pub fn idle_keepalive(&self) -> Duration {
        Duration::from_secs(self.idle_keepalive_s)
    }
    pub fn body_read(&self) -> Duration {
        Duration::from_millis(self.body_read_ms)
    }
    pub fn upstream_connect(&self) -> Duration {
        Duration::from_millis(self.upstream_connect_ms)
    }
    pub fn first_byte(&self) -> Duration {
        Duration::from_secs(self.first_byte_s)
    }
    pub fn between_chunks(&self) -> Duration {
        Duration::from_secs(self.between_chunks_s)
    }
    pub fn body_total(&self) -> Duration {
        Duration::from_secs(self.body_total_s)
    }
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_s)
    }
    pub fn queue(&self) -> Duration {
        Duration::from_secs(self.queue_s)
    }
}
