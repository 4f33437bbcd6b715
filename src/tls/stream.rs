//! rustls sessions over monoio sockets, with reads that can be cancelled without loss.
//!
//! Why not `monoio-rustls`: its stream has no cancellable read, and dropping one of its
//! reads mid-flight leaves the stream unusable. cubegate needs exactly that read: the client
//! watch (a read kept in flight while a backend works, cancelled when the answer is done)
//! and the drain (an idle keep-alive read cancelled at shutdown) are how a gone client
//! stops the GPU and how a restart ends without waiting for idle timeouts. Here the socket
//! read is monoio's own `cancelable_read` into a ciphertext buffer that outlives it: bytes
//! that race a cancellation are kept for the next read, never lost. All TLS itself (records,
//! handshake, alerts, key updates) is rustls; this file only moves bytes.
//!
//! A session is shared by the read and the write half of one connection through
//! `Rc<RefCell<…>>`. It is borrowed only between awaits, never across one, so the two
//! halves can be used concurrently (the watch reads while the answer is written).

use monoio::buf::IoBufMut;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent};
use rustls::{ConnectionCommon, SideData};
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::rc::Rc;

/// One socket read's worth of ciphertext: a TLS record is at most 16 KiB + overhead.
const CIPHER_READ: usize = 17 * 1024;
/// The largest encryption buffer a connection keeps between writes.
const OUT_KEEP: usize = 32 * 1024;

pub type Shared<C> = Rc<RefCell<C>>;

/// The receiving side: ciphertext read from the socket and not yet given to rustls.
pub struct TlsReader<C> {
    session: Shared<C>,
    cipher: Vec<u8>,
    /// The socket reached EOF (rustls has been told).
    eof: bool,
    /// EOF without close_notify is an error, not an end (backend sessions).
    strict_eof: bool,
}

enum Step {
    Read(usize),
    Again,
    NeedBytes,
}

/// The sending side: the buffer records are encrypted into before they go out.
pub struct TlsWriter<C> {
    session: Shared<C>,
    out: Vec<u8>,
}

/// Both halves of one session, for a stream used whole (an upstream connection).
pub fn pair<C>(session: C) -> (TlsReader<C>, TlsWriter<C>) {
    let session = Rc::new(RefCell::new(session));
    (
        TlsReader {
            session: session.clone(),
            cipher: Vec::new(),
            eof: false,
            strict_eof: false,
        },
        TlsWriter {
            session,
            out: Vec::new(),
        },
    )
}

/// Why a handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    /// The peer spoke plain HTTP to a TLS port (its first byte starts a request line).
    PlainHttp,
    Io(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::PlainHttp => f.write_str("plain HTTP sent to the HTTPS port"),
            HandshakeError::Io(e) => e.fmt(f),
        }
    }
}

/// Runs the handshake to its end on a whole socket. The caller bounds it with a timeout.
/// `detect_plain_http` (a server): a first byte that starts a request line is reported as
/// [`HandshakeError::PlainHttp`].
pub async fn handshake<C, SD, S>(
    io: &mut S,
    reader: &mut TlsReader<C>,
    writer: &mut TlsWriter<C>,
    detect_plain_http: bool,
) -> Result<(), HandshakeError>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
    S: CancelableAsyncReadRent + AsyncWriteRent,
{
    let mut first = detect_plain_http;
    loop {
        writer.flush(io).await?;
        let handshaking = reader.session.borrow().is_handshaking();
        if !handshaking {
            return Ok(());
        }
        // Ciphertext already here that rustls will take: process it before reading more.
        let ready = !reader.cipher.is_empty() && reader.session.borrow().wants_read();
        if !ready && !reader.fill(io, None).await? {
            return Err(HandshakeError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the TLS handshake",
            )));
        }
        // A TLS record starts with its content type (22 = handshake); a letter is a method.
        // Only the connection's very first bytes say so.
        if std::mem::take(&mut first) && reader.cipher.first().is_some_and(u8::is_ascii_uppercase) {
            return Err(HandshakeError::PlainHttp);
        }
        // Whatever processing the new bytes produced (alerts included) goes out first.
        if let Err(e) = reader.process() {
            let _ = writer.flush(io).await;
            return Err(e.into());
        }
    }
}

impl<C> TlsReader<C> {
    /// EOF without close_notify becomes an error (for sessions with backends).
    pub fn require_close_notify(&mut self) {
        self.strict_eof = true;
    }

    /// An idle connection should not keep a read buffer: thousands of idle keep-alive
    /// connections would hold 17 KiB each. Allocated again by the next read.
    fn release_cipher(&mut self) {
        if self.cipher.is_empty() && self.cipher.capacity() > 0 {
            self.cipher = Vec::new();
        }
    }
}

impl<C, SD> TlsReader<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    /// Reads plaintext behind what `buf` holds (its length grows). `Ok(0)` = the peer
    /// closed (close_notify, or EOF without it: HTTP framing finds any truncation). With a
    /// `cancel` handle the socket read can be cancelled: it then fails with the socket's
    /// cancellation error, and any ciphertext that raced it is kept.
    pub async fn read_append<S: CancelableAsyncReadRent>(
        &mut self,
        io: &mut S,
        mut buf: Vec<u8>,
        cancel: Option<&CancelHandle>,
    ) -> (io::Result<usize>, Vec<u8>) {
        loop {
            match self.step(&mut buf) {
                Ok(Step::Read(n)) => return (Ok(n), buf),
                Ok(Step::Again) => continue,
                Ok(Step::NeedBytes) => {}
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.fill(io, cancel).await {
                return (Err(e), buf);
            }
        }
    }

    /// One step without I/O: hand over decrypted bytes, or feed rustls what it can take.
    fn step(&mut self, buf: &mut Vec<u8>) -> io::Result<Step> {
        let mut session = self.session.borrow_mut();
        let state = session
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let waiting = state.plaintext_bytes_to_read();
        if waiting > 0 {
            if buf.capacity() == buf.len() {
                buf.reserve(waiting.min(CIPHER_READ));
            }
            let start = buf.len();
            let room = (buf.capacity() - start).min(waiting);
            // rustls writes into initialised memory: zero only what it is about to fill.
            buf.resize(start + room, 0);
            let n = session.reader().read(&mut buf[start..])?;
            buf.truncate(start + n);
            drop(session);
            self.release_cipher();
            return Ok(Step::Read(n));
        }
        if state.peer_has_closed() {
            return Ok(Step::Read(0));
        }
        if !self.cipher.is_empty() {
            if !session.wants_read() {
                // Nothing rustls would take and nothing to give: more bytes cannot help.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS session cannot make progress",
                ));
            }
            let mut slice = &self.cipher[..];
            let before = slice.len();
            session.read_tls(&mut slice)?;
            let used = before - slice.len();
            self.cipher.drain(..used);
            return Ok(Step::Again);
        }
        if self.eof {
            if self.strict_eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without close_notify",
                ));
            }
            return Ok(Step::Read(0));
        }
        Ok(Step::NeedBytes)
    }

    /// Gives buffered ciphertext to rustls (during the handshake).
    fn process(&mut self) -> io::Result<()> {
        let mut session = self.session.borrow_mut();
        let mut slice = &self.cipher[..];
        let before = slice.len();
        while !slice.is_empty() && session.wants_read() {
            session.read_tls(&mut slice)?;
            session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        let used = before - slice.len();
        self.cipher.drain(..used);
        Ok(())
    }

    /// One socket read into the ciphertext buffer. `Ok(false)` = EOF.
    async fn fill<S: CancelableAsyncReadRent>(
        &mut self,
        io: &mut S,
        cancel: Option<&CancelHandle>,
    ) -> io::Result<bool> {
        let mut cipher = std::mem::take(&mut self.cipher);
        if cipher.capacity() - cipher.len() < CIPHER_READ / 4 {
            cipher.reserve(CIPHER_READ);
        }
        let len = cipher.len();
        let (res, slice) = match cancel {
            Some(handle) => {
                io.cancelable_read(cipher.slice_mut(len..), handle.clone())
                    .await
            }
            None => io.read(cipher.slice_mut(len..)).await,
        };
        self.cipher = slice.into_inner();
        match res? {
            0 => {
                self.eof = true;
                // Tell rustls, so a missing close_notify is seen as such.
                let _ = self.session.borrow_mut().read_tls(&mut io::empty());
                Ok(false)
            }
            _ => Ok(true),
        }
    }
}

impl<C, SD> TlsWriter<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    /// Encrypts and sends all of `data`.
    pub async fn write_all<S: AsyncWriteRent>(
        &mut self,
        io: &mut S,
        mut data: &[u8],
    ) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.session.borrow_mut().writer().write(data)?;
            data = &data[n..];
            self.flush(io).await?;
        }
        Ok(())
    }

    /// Sends every record rustls has ready (handshake messages, alerts, key updates, data).
    pub async fn flush<S: AsyncWriteRent>(&mut self, io: &mut S) -> io::Result<()> {
        loop {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            {
                let mut session = self.session.borrow_mut();
                while session.wants_write() {
                    session.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                // Keep a buffer for the usual answer; not the one a huge write grew.
                if out.capacity() > OUT_KEEP {
                    out = Vec::new();
                }
                self.out = out;
                return Ok(());
            }
            let (res, back) = io.write_all(out).await;
            self.out = back;
            res?;
        }
    }

    /// Sends close_notify, then shuts the socket's sending side.
    pub async fn shutdown<S: AsyncWriteRent>(&mut self, io: &mut S) -> io::Result<()> {
        self.session.borrow_mut().send_close_notify();
        self.flush(io).await?;
        io.shutdown().await
    }
}

impl<C, SD> TlsReader<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<SD>>,
    SD: SideData,
{
    /// Bytes received and not handed out, ciphertext or decrypted (a clean idle
    /// connection has none), or the peer has closed.
    pub fn has_pending(&self) -> bool {
        if !self.cipher.is_empty() || self.eof {
            return true;
        }
        match self.session.borrow_mut().process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            Err(_) => true,
        }
    }
}
