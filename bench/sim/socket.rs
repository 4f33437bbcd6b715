//! Socket helpers of the simulator's connections: bounded reads and writes on monoio's
//! owned buffers, and sleeping while watching whether the client went away (a GPU stops
//! generating for a client that left, so the simulator must notice).

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a sleeping request checks its client.
pub const WATCH_SLICE: Duration = Duration::from_millis(20);

/// Reads more bytes onto the end of `buf`; Ok(0) = EOF.
pub async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let owned = std::mem::take(buf);
    let fut = stream.read(owned.slice_mut(len..));
    match monoio::time::timeout(IDLE_TIMEOUT, fut).await {
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            res
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
    }
}

/// Writes `buf[start..]` fully and hands the buffer back.
pub async fn write(stream: &mut TcpStream, buf: Vec<u8>, start: usize) -> io::Result<Vec<u8>> {
    match monoio::time::timeout(WRITE_TIMEOUT, stream.write_all(buf.slice(start..))).await {
        Ok((Ok(_), slice)) => Ok(slice.into_inner()),
        Ok((Err(e), _)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

/// True when the peer has closed or reset the connection (non-blocking peek).
pub fn peer_gone(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: valid fd owned by `stream`, valid 1-byte buffer.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        return true;
    }
    if n < 0 {
        let e = io::Error::last_os_error().kind();
        return !matches!(e, io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
    }
    false
}

/// Sleeps `d` in slices, watching for the peer going away. Returns true if it did.
pub async fn sleep_watch(stream: &TcpStream, d: Duration) -> bool {
    let mut left = d;
    while !left.is_zero() {
        if left >= Duration::from_millis(1) && peer_gone(stream) {
            return true;
        }
        let s = left.min(WATCH_SLICE);
        monoio::time::sleep(s).await;
        left -= s;
    }
    false
}
