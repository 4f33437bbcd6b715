//! Sockets that are plain TCP or TLS: the client's (one read half and one write half,
//! used concurrently) and a backend's ([`BackendStream`], used whole).
//!
//! The request path is written once against these types. What differs: splice(2) needs
//! the plain socket (TLS bytes must pass through userspace to be decrypted), so the
//! `plain` accessors hand it out only for plain connections. Both kinds support the
//! cancellable read that the client watch and the drain rely on.

use crate::tls::stream::{TlsReader, TlsWriter};
use monoio::buf::{IoBuf, IoBufMut, Slice};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent,
    OwnedReadHalf, OwnedWriteHalf,
};
use monoio::net::TcpStream;
use rustls::{ClientConnection, ServerConnection};
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Makes sure a read into `buf` has room for `want` bytes (monoio reads into the spare
/// capacity; a full buffer would read 0 bytes and look like EOF).
pub fn reserve(buf: &mut Vec<u8>, want: usize) {
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
}

/// Reads more bytes behind what `buf` already holds. monoio reads into a `Vec` from its
/// start (and sets its length), so appending goes through a slice of the spare capacity.
pub async fn read_more<R: AsyncReadRent>(
    rd: &mut R,
    mut buf: Vec<u8>,
    want: usize,
) -> (io::Result<usize>, Vec<u8>) {
    reserve(&mut buf, want);
    let len = buf.len();
    let (res, slice) = rd.read(buf.slice_mut(len..)).await;
    (res, slice.into_inner())
}

pub enum ClientRead {
    Plain(OwnedReadHalf<TcpStream>),
    Tls {
        tcp: OwnedReadHalf<TcpStream>,
        tls: TlsReader<ServerConnection>,
    },
}

pub enum ClientWrite {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls {
        tcp: OwnedWriteHalf<TcpStream>,
        tls: TlsWriter<ServerConnection>,
    },
}

/// A buffer that can be written out whole: owned for io_uring, readable for encryption.
pub trait OutBuf: IoBuf {
    fn bytes(&self) -> &[u8];
}

impl OutBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl OutBuf for &'static [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl OutBuf for bytes::Bytes {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl OutBuf for Slice<Vec<u8>> {
    fn bytes(&self) -> &[u8] {
        &self.get_ref()[self.begin()..self.end()]
    }
}

impl ClientRead {
    /// Reads more bytes behind what `buf` holds.
    pub async fn read_more(&mut self, buf: Vec<u8>, want: usize) -> (io::Result<usize>, Vec<u8>) {
        match self {
            ClientRead::Plain(rd) => read_more(rd, buf, want).await,
            ClientRead::Tls { tcp, tls } => {
                let mut buf = buf;
                reserve(&mut buf, want);
                tls.read_append(tcp, buf, None).await
            }
        }
    }

    /// Like `read_more`, but `handle` can cancel it; bytes that race the cancellation are
    /// returned (plain) or kept for the next read (TLS), never lost.
    pub async fn cancelable_read_more(
        &mut self,
        mut buf: Vec<u8>,
        want: usize,
        handle: CancelHandle,
    ) -> (io::Result<usize>, Vec<u8>) {
        reserve(&mut buf, want);
        match self {
            ClientRead::Plain(rd) => {
                let len = buf.len();
                let (res, slice) = rd.cancelable_read(buf.slice_mut(len..), handle).await;
                (res, slice.into_inner())
            }
            ClientRead::Tls { tcp, tls } => tls.read_append(tcp, buf, Some(&handle)).await,
        }
    }

    /// The socket itself, for splice; `None` under TLS.
    pub fn plain(&mut self) -> Option<&mut OwnedReadHalf<TcpStream>> {
        match self {
            ClientRead::Plain(rd) => Some(rd),
            ClientRead::Tls { .. } => None,
        }
    }
}

impl ClientWrite {
    pub async fn write_all<B: OutBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        match self {
            ClientWrite::Plain(wr) => {
                let (res, buf) = wr.write_all(buf).await;
                (res.map(|_| ()), buf)
            }
            ClientWrite::Tls { tcp, tls } => {
                let res = tls.write_all(tcp, buf.bytes()).await;
                (res, buf)
            }
        }
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            ClientWrite::Plain(wr) => wr.shutdown().await,
            ClientWrite::Tls { tcp, tls } => tls.shutdown(tcp).await,
        }
    }

    /// The socket itself, for splice; `None` under TLS.
    pub fn plain(&mut self) -> Option<&mut OwnedWriteHalf<TcpStream>> {
        match self {
            ClientWrite::Plain(wr) => Some(wr),
            ClientWrite::Tls { .. } => None,
        }
    }
}

/// A connection to a backend: plain, or TLS for `https://` backends.
pub struct BackendStream {
    tcp: TcpStream,
    tls: Option<Box<BackendTls>>,
}

struct BackendTls {
    reader: TlsReader<ClientConnection>,
    writer: TlsWriter<ClientConnection>,
    /// The name the session was made and verified for.
    name: rustls::pki_types::ServerName<'static>,
}

impl BackendStream {
    pub fn plain(tcp: TcpStream) -> BackendStream {
        BackendStream { tcp, tls: None }
    }

    /// Runs the TLS handshake on a fresh connection, bounded by `limit`; the backend's
    /// certificate must chain to `config`'s roots and carry `name`.
    pub async fn tls(
        mut tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
        limit: Duration,
    ) -> io::Result<BackendStream> {
        let session = ClientConnection::new(config, name.clone()).map_err(io::Error::other)?;
        let (mut reader, mut writer) = crate::tls::stream::pair(session);
        // A backend's TLS session must end with close_notify: an answer delimited by the
        // connection's end could otherwise be cut by anyone on the path.
        reader.require_close_notify();
        let shake = crate::tls::stream::handshake(&mut tcp, &mut reader, &mut writer, false);
        match monoio::time::timeout(limit, shake).await {
            Ok(Ok(())) => Ok(BackendStream {
                tcp,
                tls: Some(Box::new(BackendTls {
                    reader,
                    writer,
                    name,
                })),
            }),
            Ok(Err(e)) => Err(io::Error::other(format!("TLS handshake: {e}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }

    /// The name a TLS session was verified for; `None` for plain connections.
    pub fn tls_name(&self) -> Option<&rustls::pki_types::ServerName<'static>> {
        self.tls.as_ref().map(|t| &t.name)
    }

    /// Reads more bytes behind what `buf` holds.
    pub async fn read_more(&mut self, buf: Vec<u8>, want: usize) -> (io::Result<usize>, Vec<u8>) {
        match &mut self.tls {
            None => read_more(&mut self.tcp, buf, want).await,
            Some(tls) => {
                let mut buf = buf;
                reserve(&mut buf, want);
                tls.reader.read_append(&mut self.tcp, buf, None).await
            }
        }
    }

    pub async fn write_all<B: OutBuf>(&mut self, buf: B) -> (io::Result<()>, B) {
        match &mut self.tls {
            None => {
                let (res, buf) = self.tcp.write_all(buf).await;
                (res.map(|_| ()), buf)
            }
            Some(tls) => {
                let res = tls.writer.write_all(&mut self.tcp, buf.bytes()).await;
                (res, buf)
            }
        }
    }

    /// The socket, for splice and for the idle check; `None` under TLS for splice.
    pub fn plain_mut(&mut self) -> Option<&mut TcpStream> {
        match self.tls {
            None => Some(&mut self.tcp),
            Some(_) => None,
        }
    }

    pub fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    /// Ciphertext already read and not yet decrypted: an idle connection has none.
    pub fn has_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.reader.has_pending())
    }
}
