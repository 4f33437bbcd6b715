//! Moving body bytes with splice(2): socket → pipe → socket, never through userspace.
//!
//! Used for Content-Length bodies that need no inspection (answers without streaming, and
//! request bodies of pass-through domains) when both sides are plain TCP. Each worker keeps
//! one pipe and reuses it; a transfer that fails midway may leave bytes in the pipe, so the
//! pipe is then dropped instead of returned. Whether this beats the userspace copy depends
//! on body sizes: see the README's measurements (`proxy.splice_bodies`).

use monoio::io::as_fd::{AsReadFd, AsWriteFd};
use monoio::io::splice::{SpliceDestination, SpliceSource};
use monoio::net::unix::{new_pipe, Pipe};
use std::time::Duration;

/// The kernel's default pipe size: the most one splice can move.
const STEP: u64 = 64 * 1024;

pub struct SplicePipe {
    read: Pipe,
    write: Pipe,
}

impl SplicePipe {
    pub fn new() -> std::io::Result<SplicePipe> {
        let (read, write) = new_pipe()?;
        Ok(SplicePipe { read, write })
    }
}

#[derive(Debug)]
pub enum SpliceError {
    /// The source ended or failed before `len` bytes.
    Source,
    /// The destination failed or stalled.
    Destination,
}

/// Moves exactly `len` bytes from `src` to `dst`. Each step has `limit` to complete.
/// On error the pipe may hold stray bytes: the caller must not reuse it.
pub async fn splice_exact<S: AsReadFd, D: AsWriteFd>(
    src: &mut S,
    dst: &mut D,
    pipe: &mut SplicePipe,
    mut len: u64,
    limit: Duration,
) -> Result<(), SpliceError> {
    while len > 0 {
        let want = len.min(STEP) as u32;
        let moved = monoio::time::timeout(limit, src.splice_to_pipe(&mut pipe.write, want))
            .await
            .map_err(|_| SpliceError::Source)?
            .map_err(|_| SpliceError::Source)?;
        if moved == 0 {
            return Err(SpliceError::Source);
        }
        let mut left = moved;
        while left > 0 {
            let sent = monoio::time::timeout(limit, dst.splice_from_pipe(&mut pipe.read, left))
                .await
                .map_err(|_| SpliceError::Destination)?
                .map_err(|_| SpliceError::Destination)?;
            if sent == 0 {
                return Err(SpliceError::Destination);
            }
            left -= sent;
        }
        len -= u64::from(moved);
    }
    Ok(())
}
