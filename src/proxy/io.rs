//! The client's socket, plain TCP or TLS, behind one read half and one write half.
//!
//! The request path is written once against these types. What differs: splice(2) needs
//! the plain socket (TLS bytes must pass through userspace to be decrypted), so
//! [`ClientRead::plain`]/[`ClientWrite::plain`] hand it out only for plain connections.
//! Both kinds support the cancellable read that the client watch and the drain rely on.

use super::conn::read_more;
use crate::tls::stream::{TlsReader, TlsWriter};
use monoio::buf::{IoBuf, Slice};
use monoio::io::{
    AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, OwnedReadHalf,
    OwnedWriteHalf,
};
use monoio::net::TcpStream;
use rustls::ServerConnection;
use std::io;

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
                super::conn::reserve(&mut buf, want);
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
        super::conn::reserve(&mut buf, want);
        match self {
            ClientRead::Plain(rd) => {
                let len = buf.len();
                let (res, slice) = rd
                    .cancelable_read(monoio::buf::IoBufMut::slice_mut(buf, len..), handle)
                    .await;
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
