//! The accept loop of one listening socket on one worker: every accepted connection
//! becomes a task of its own, bounded by `max_connections`, until draining starts.
//!
//! What shaped it: a connection's task is the largest object an open connection costs
//! (every phase's state lives in it), so how it is spawned matters; and a bug in one
//! connection must not end the loop (or the worker) that serves every other.

use crate::proxy::serve::serve_connection;
use crate::proxy::worker::{OpenConnection, Worker};
use monoio::net::TcpListener;
use std::rc::Rc;
use std::time::Duration;

/// Accepts on one listening socket until draining starts; the socket is then closed here
/// (another process may still hold it: a hand-over's successor keeps accepting on it).
pub async fn accept_loop(worker: Rc<Worker>, listener: TcpListener) {
    loop {
        if worker.draining.get() {
            break;
        }
        if worker.connections.get() >= worker.max_connections {
            // Full: stop accepting until a connection closes; new ones wait in the
            // kernel's backlog instead of costing memory here.
            monoio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let handle = worker.drain.borrow().handle();
        match listener.cancelable_accept(handle).await {
            Ok((stream, peer)) => {
                // A bug that panics while serving one connection must not take the worker
                // (and every connection its listener would accept) down with it.
                let served = std::panic::AssertUnwindSafe(serve_connection(
                    worker.clone(),
                    stream,
                    peer,
                    OpenConnection::new(worker.clone()),
                ));
                // A combinator, not an `async move` block: a block awaiting `served` keeps
                // the captured future *and* the future it awaits, twice the connection's
                // size in every task (`cubegate-bench load --measure-pid`: 8.8 KB more per
                // open connection).
                use futures_util::FutureExt;
                monoio::spawn(served.catch_unwind().map(move |r| {
                    if r.is_err() {
                        tracing::error!(%peer, "connection handler panicked; connection closed");
                    }
                }));
            }
            Err(_) if worker.draining.get() => break,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(worker = worker.id, "accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
