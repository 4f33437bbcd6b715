//! The accepting side of the simulator: one monoio runtime per thread, each with its own
//! SO_REUSEPORT listener on the same address, spawning a task per connection.
//!
//! For the `refuse` fault each thread publishes its listening socket in the fault switch's
//! registry; the switch shuts it down, the thread's pending accept fails, and the thread
//! drops the socket (connections are refused from then on) and binds a new one on the
//! same address once the mode is no longer `refuse` (a socket bound while the mode is
//! `refuse`, at start or in a race with the switch, is shut down at once the same way).

use super::{conn, Fault, Shared};
use monoio::net::TcpListener;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::time::Duration;

/// How often a thread whose listener is closed checks whether to listen again.
const REFUSE_POLL: Duration = Duration::from_millis(5);

/// A non-blocking listening socket on `addr`, shareable with the other threads' sockets.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Runs thread `index`'s runtime: accepts on `listener` (bound to `addr`) until the
/// process ends. Reports on `ready` once it accepts.
pub fn serve_thread(
    index: usize,
    listener: std::net::TcpListener,
    addr: SocketAddr,
    shared: Shared,
    ready: Sender<io::Result<()>>,
) {
    let rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let shared = Rc::new(shared);
        let mut listener = match publish(&shared, index, listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(conn::connection(stream, shared.clone()));
                }
                Err(_) if withdrawn(&shared, index) => {
                    drop(listener);
                    listener = listen_again(&shared, index, addr).await;
                }
                Err(_) => monoio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
}

/// Registers `l` as thread `index`'s listener and hands it to this thread's runtime. In
/// `refuse` mode it is shut down at once instead (and left unregistered), so the thread
/// goes back to waiting: the mode may have changed while it was binding.
fn publish(shared: &Shared, index: usize, l: std::net::TcpListener) -> io::Result<TcpListener> {
    let mut listeners = shared.host.fault.listeners();
    let l = TcpListener::from_std(l)?;
    if shared.host.fault() == Fault::Refuse {
        // SAFETY: `l` is a listening socket this function owns; shutdown does not close it.
        unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
    } else if let Some(slot) = listeners.get_mut(index) {
        *slot = Some(l.as_raw_fd());
    }
    Ok(l)
}

/// True when the fault switch shut this thread's listener down (its entry is cleared).
fn withdrawn(shared: &Shared, index: usize) -> bool {
    shared
        .host
        .fault
        .listeners()
        .get(index)
        .is_some_and(Option::is_none)
}

/// Waits until the mode is no longer `refuse`, then listens on `addr` again.
async fn listen_again(shared: &Shared, index: usize, addr: SocketAddr) -> TcpListener {
    loop {
        monoio::time::sleep(REFUSE_POLL).await;
        if shared.host.fault() == Fault::Refuse {
            continue;
        }
        match bind(addr).and_then(|l| publish(shared, index, l)) {
            Ok(l) => return l,
            // The port may be briefly unavailable; keep trying.
            Err(_) => monoio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
