//! HTTPS on the management listener: a rustls server session over a blocking socket.
//!
//! Passwords and tokens cross this listener, so with `[management] tls_cert`/`tls_key` set
//! it speaks only TLS (1.2 and 1.3, ALPN `http/1.1`, the certificate from a
//! [`crate::tls::CertStore`] that SIGHUP reloads). The management threads are few, so
//! every wait is bounded as on the plain path: the handshake must end within
//! `timeouts.header_read` (as on the public port), and each read of the request steps
//! rustls by hand — one socket read, then the records it completed — so the request's
//! whole deadline is checked between socket reads even when a client trickles a TLS
//! record a byte at a time (`rustls::StreamOwned` would loop inside one `read` until a
//! record is whole). A client that speaks plain HTTP to the port is told so, with the
//! public port's answer (400 `plain_http_on_https_port`), and the connection closes.

use super::request::{Wire, IO_TIMEOUT};
use rustls::{ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A management connection after its handshake.
pub struct Https {
    conn: ServerConnection,
    sock: TcpStream,
}

/// Why no TLS session came up.
pub enum NoSession {
    /// The client's first byte starts a request line: plain HTTP on the HTTPS port. The
    /// socket is handed back to answer it.
    PlainHttp(TcpStream),
    /// Closed, too slow, or not TLS that rustls accepts.
    Failed(io::Error),
}

impl From<io::Error> for NoSession {
    fn from(e: io::Error) -> Self {
        NoSession::Failed(e)
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

/// Runs the server side of the handshake on `sock`, all of it within `limit`.
pub fn accept(
    sock: TcpStream,
    config: Arc<ServerConfig>,
    limit: Duration,
) -> Result<Https, NoSession> {
    let deadline = Instant::now() + limit;
    sock.set_read_timeout(Some(limit))?;
    sock.set_write_timeout(Some(limit.min(IO_TIMEOUT)))?;
    // A TLS record starts with its content type (22 = handshake); a letter is a method.
    let mut first = [0u8; 1];
    match sock.peek(&mut first) {
        Ok(0) => return Err(NoSession::Failed(io::ErrorKind::UnexpectedEof.into())),
        Ok(_) if first[0].is_ascii_uppercase() => return Err(NoSession::PlainHttp(sock)),
        Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut https = Https { conn, sock };
    while https.conn.is_handshaking() {
        https.send_pending()?;
        if !https.conn.is_handshaking() {
            break;
        }
        if https.receive(deadline)? == 0 {
            return Err(NoSession::Failed(io::ErrorKind::UnexpectedEof.into()));
        }
    }
    // The handshake's last flight (and TLS 1.3 session tickets) go out now.
    https.send_pending()?;
    Ok(https)
}

impl Https {
    /// Writes what rustls has encrypted and not yet sent.
    fn send_pending(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    /// One socket read (waiting at most until `deadline`), then the records it completed.
    /// Returns the bytes read (0 = the peer closed).
    fn receive(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out("the TLS peer took too long"));
        }
        self.sock.set_read_timeout(Some(left.min(IO_TIMEOUT)))?;
        let n = self.conn.read_tls(&mut self.sock)?;
        if let Err(e) = self.conn.process_new_packets() {
            // The alert that says why goes out before the connection closes.
            let _ = self.send_pending();
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        // Whatever processing produced (key updates, alerts) goes out first.
        self.send_pending()?;
        Ok(n)
    }

    /// Ends the session: close_notify, then the socket closes when dropped.
    pub fn close(mut self) {
        self.conn.send_close_notify();
        let _ = self.send_pending();
    }
}

impl Wire for Https {
    fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                // 0 = close_notify: the peer ended the session.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EOF without close_notify, among others.
                Err(e) => return Err(e),
            }
            // Nothing decrypted yet: one more socket read. At EOF rustls knows it, and the
            // next `reader().read` says so.
            self.receive(deadline)?;
        }
    }
}

impl Write for Https {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.conn.writer().write(buf)?;
        self.send_pending()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.writer().flush()?;
        self.send_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server configuration with a fresh self-signed certificate, and a client trusting it.
    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let dir = std::env::temp_dir().join(format!("cubegate-https-unit-{}", std::process::id()));
        let (cert, key) = crate::tls::gen_cert::gen_cert(&crate::tls::gen_cert::GenCert {
            out_dir: dir,
            names: vec!["localhost".into()],
            days: 1,
            force: true,
        })
        .unwrap();
        let store =
            crate::tls::CertStore::load(crate::tls::Listener::Management, &cert, &key).unwrap();
        let client = crate::tls::pinned::client_config(Arc::new(store));
        let store =
            crate::tls::CertStore::load(crate::tls::Listener::Management, &cert, &key).unwrap();
        (crate::tls::server_config(Arc::new(store)), client)
    }

    /// A session whose client trickles a TLS record one byte every 100 ms: the read gives
    /// up at its deadline, though bytes keep arriving (each socket read succeeds).
    #[test]
    fn a_trickled_record_is_bounded_by_the_deadline() {
        let (server, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let trickler = std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let conn = rustls::ClientConnection::new(client, name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
            while tls.conn.is_handshaking() {
                tls.conn.complete_io(&mut tls.sock).unwrap();
            }
            // One whole record, sent a byte at a time.
            tls.conn.writer().write_all(b"GET / HTTP/1.1\r\n").unwrap();
            let mut record = Vec::new();
            tls.conn.write_tls(&mut record).unwrap();
            for byte in record {
                if tls.sock.write_all(&[byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let (sock, _) = listener.accept().unwrap();
        let mut session = accept(sock, server, Duration::from_secs(5))
            .map_err(|_| "handshake")
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let read = session.read_until(&mut buf, started + Duration::from_millis(700));
        let waited = started.elapsed();
        assert!(read.is_err(), "read {read:?}");
        assert!(waited < Duration::from_secs(2), "held for {waited:?}");
        drop(session);
        let _ = trickler.join();
    }
}
