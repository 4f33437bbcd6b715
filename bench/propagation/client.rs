//! A blocking HTTP/1.1 client on one kept-alive connection: what the propagation bench
//! needs to poll a box as fast as it answers, and to time one management write, without
//! the load generator's machinery. Responses are framed by the load generator's own parser
//! (`crate::load::http`). A kept-alive connection the server has closed is noticed before
//! a request is sent on it (a peek), and a new one is opened; a request already sent is
//! never sent again, since a write the server carried out must not be repeated.

use crate::load::http::{parse_head, BodyLen, Chunked};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Connect, read and write timeout: no answer within it is an error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer: its status and decoded body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The status and the start of the body, for an error message.
    pub fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body);
        format!(
            "HTTP {} {}",
            self.status,
            body.chars().take(200).collect::<String>()
        )
    }
}

/// One server, one connection at a time, kept alive between requests.
pub struct Client {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// Sends `request` (a whole request, see [`request`]) and reads its answer.
    pub fn send(&mut self, request: &[u8]) -> Result<Answer, String> {
        if self.stream.as_ref().is_some_and(closed_by_peer) {
            self.stream = None;
        }
        let res = self.exchange(request);
        if res.is_err() {
            self.stream = None;
        }
        res
    }

    fn exchange(&mut self, request: &[u8]) -> Result<Answer, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            self.stream = Some(s);
        }
        let Some(s) = self.stream.as_mut() else {
            return Err("no connection".into());
        };
        s.write_all(request).map_err(|e| format!("send: {e}"))?;
        self.buf.clear();
        let head = loop {
            if let Some(h) = parse_head(&self.buf).map_err(|e| e.0.to_string())? {
                break h;
            }
            fill(s, &mut self.buf)?;
        };
        let mut body = Vec::new();
        let mut rest = self.buf.split_off(head.len);
        match head.body {
            BodyLen::Empty => {}
            BodyLen::Length(n) => {
                let n = n as usize;
                while rest.len() < n {
                    fill(s, &mut rest)?;
                }
                body = rest[..n].to_vec();
            }
            BodyLen::Chunked => {
                let mut chunked = Chunked::default();
                loop {
                    chunked
                        .feed(&rest, |piece| body.extend_from_slice(piece))
                        .map_err(|e| e.0.to_string())?;
                    if chunked.done() {
                        break;
                    }
                    rest.clear();
                    fill(s, &mut rest)?;
                }
            }
            BodyLen::UntilClose => {
                s.read_to_end(&mut rest).map_err(|e| format!("read: {e}"))?;
                body = rest;
            }
        }
        if head.close || head.body == BodyLen::UntilClose {
            self.stream = None;
        }
        Ok(Answer {
            status: head.status,
            body,
        })
    }
}

/// Whether an idle kept-alive connection was closed by the server (or has bytes nobody
/// asked for): then it cannot carry the next request.
fn closed_by_peer(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: recv(2) on a socket we own, into one valid byte; MSG_PEEK | MSG_DONTWAIT
    // neither consumes data nor blocks.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
}

/// Reads what is there into `buf`; Err when the server closed the connection.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 16 * 1024];
    match s.read(&mut chunk) {
        Ok(0) => Err("connection closed by the server".into()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

/// A request's bytes: `method path`, the headers, and `body` as JSON when there is one.
pub fn request(method: &str, path: &str, bearer: Option<&str>, body: Option<&str>) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    if let Some(t) = bearer {
        r.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}
